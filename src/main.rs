//! The `ubcache` binary: everything, flags included, lives in the library's [`ubcache::cli`]
//! so tests drive the same code.

fn main() -> std::process::ExitCode {
    ubcache::cli::main()
}
