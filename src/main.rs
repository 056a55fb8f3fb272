//! The `ubcache` command line.

fn main() {
    eprintln!("ubcache: no commands yet");
    std::process::exit(2);
}
