//! `ubcache serve`'s options: what they hold, how sizes and addresses parse, and the checks that
//! need no file system access.

use super::{CacheMode, ServeError, cache_choice, defaults::DEFAULT_DATA_DIR, exports::same_file};
use crate::dev::SECTOR_SIZE;
use crate::nbd::ListenAddr;
use crate::nbd::server::DeviceCalls;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

/// Where the server listens when neither `--listen` nor `--socket` is given: the IANA NBD port
/// on loopback only, so a default run never exposes a disk to the network.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// The port of [`DEFAULT_LISTEN`].
pub const DEFAULT_PORT: u16 = 10809;

/// Longest export name the NBD protocol allows (proto.md: "MUST NOT exceed 4096 bytes").
pub const MAX_EXPORT_NAME_BYTES: usize = 4096;

/// Largest size we accept: file offsets are `off_t`, a signed 64-bit integer.
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Everything `ubcache serve` needs, already parsed.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The backing files or block devices, one per export; empty means `<data_dir>/backing.img`.
    pub backing: Vec<PathBuf>,
    /// The cache file or device (formatted with `ubcache format`). `None` with an empty
    /// `backing` means the default pair in `data_dir`; `None` with `backing` is a passthrough.
    pub cache: Option<PathBuf>,
    /// TCP addresses to listen on. Empty with no `socket` means [`DEFAULT_LISTEN`].
    pub listen: Vec<SocketAddr>,
    /// A Unix socket to listen on.
    pub socket: Option<PathBuf>,
    /// The export names clients ask for, one per `backing`, in the same order. Empty means one
    /// export named `""` (the default export).
    pub export_names: Vec<String>,
    /// The cache mode; `None` picks the mode each backing superblock stores with a cache (the
    /// last `set-mode`; [`super::DEFAULT_CACHED_MODE`] after format), `none` without.
    pub mode: Option<CacheMode>,
    /// Serve what would otherwise be refused to protect data: a Dirty backing device without
    /// its cache (its cached writes are lost), an attached one writable without its cache.
    pub force: bool,
    /// Refuse writes.
    pub read_only: bool,
    /// Open backing files with O_DIRECT where the file system allows it (bypasses the page cache;
    /// falls back to buffered I/O with a warning where it cannot).
    pub direct: bool,
    /// Where default files are created.
    pub data_dir: PathBuf,
    /// Size of the backing file when it is created; checked against an existing file.
    pub size: Option<u64>,
    /// Server worker threads; `None` means one per CPU.
    pub threads: Option<usize>,
    /// The control socket of a cached serve; `None` means `<data_dir>/ubcache.ctl`.
    pub ctl_socket: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP on this address (needs a cache).
    pub metrics: Option<SocketAddr>,
    /// Where device calls run: on the workers (cheap for page-cache hits) or on a blocking pool
    /// (a slow call, like an fsync, does not hold a worker).
    pub device_calls: DeviceCalls,
    /// `--record [NAME=]LOG`: record these exports' requests to these logs (see `cli::record`).
    pub record: Vec<String>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            backing: Vec::new(),
            cache: None,
            listen: Vec::new(),
            socket: None,
            export_names: Vec::new(),
            mode: None,
            force: false,
            read_only: false,
            direct: false,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            size: None,
            threads: None,
            ctl_socket: None,
            metrics: None,
            device_calls: DeviceCalls::default(),
            record: Vec::new(),
        }
    }
}

/// Parses a size such as `4096`, `512K`, `100M`, `1G`, `1GiB`, `2T` (binary units, case does not
/// matter). The size must be a positive multiple of the 512-byte sector.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits_end = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!("bad size {text:?}: expected a number with an optional unit, like 1G or 512M"));
    }
    let number: u64 = digits.parse().map_err(|_| format!("bad size {text:?}: number too large"))?;
    let unit = unit.trim();
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return Err(format!("bad size {text:?}: unknown unit {unit:?} (use K, M, G, T or P)")),
    };
    let bytes = number
        .checked_mul(1u64 << shift)
        .filter(|&b| b <= MAX_SIZE)
        .ok_or_else(|| format!("bad size {text:?}: larger than the maximum {MAX_SIZE} bytes"))?;
    if bytes == 0 {
        return Err(format!("bad size {text:?}: must be greater than zero"));
    }
    if bytes % SECTOR_SIZE != 0 {
        return Err(format!(
            "bad size {text:?}: {bytes} bytes is not a multiple of the {SECTOR_SIZE}-byte sector"
        ));
    }
    Ok(bytes)
}

/// Parses a `HOST:PORT` listen address (`127.0.0.1:10809`, `[::1]:10809`, `localhost:0`).
/// Port 0 asks the OS for a free port; the URI printed at start-up carries the real one.
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("bad listen address {text:?}: expected HOST:PORT, like 127.0.0.1:10809"))?;
    if host.is_empty() {
        return Err(format!("bad listen address {text:?}: the host is missing (like 127.0.0.1:{port})"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("bad listen address {text:?}: port {port:?} is not a number from 0 to 65535"))?;
    // A host name: resolve it now so a typo fails at start-up, not later.
    let mut addrs = text.to_socket_addrs().map_err(|e| format!("bad listen address {text:?}: {e}"))?;
    addrs.next().ok_or_else(|| format!("bad listen address {text:?}: the host name resolves to no address"))
}

/// Checks the options that need no file system access.
pub fn validate(opts: &ServeOptions) -> Result<(), ServeError> {
    if opts.cache.is_some() && opts.backing.is_empty() {
        return Err(ServeError::Usage(
            "--cache needs the backing device(s) it caches: add --backing PATH (or give neither \
             to serve the default pair in the data directory)"
                .into(),
        ));
    }
    if cache_choice(opts).is_none() {
        match opts.mode {
            None | Some(CacheMode::None) => {}
            Some(mode) => {
                return Err(ServeError::Usage(format!(
                    "--mode {mode} needs a cache: add --cache PATH (format one with `ubcache format \
                     --cache PATH --backing PATH --size 256M`); without a cache only --mode none works"
                )));
            }
        }
    }
    if opts.metrics.is_some() && cache_choice(opts).is_none() {
        return Err(ServeError::Usage(
            "--metrics needs a cache (the metrics are the cache's statistics); add --cache PATH".into(),
        ));
    }
    if let Some(cache) = &opts.cache
        && let Some(backing) = opts.backing.iter().find(|b| same_file(b, cache))
    {
        return Err(ServeError::Usage(format!(
            "{} is given as both the cache and a backing device",
            backing.display()
        )));
    }
    for name in &opts.export_names {
        if name.len() > MAX_EXPORT_NAME_BYTES {
            return Err(ServeError::Usage(format!(
                "export name is {} bytes long; NBD allows at most {MAX_EXPORT_NAME_BYTES}",
                name.len()
            )));
        }
        if name.contains('\0') {
            return Err(ServeError::Usage(format!("export name {name:?} contains a NUL byte")));
        }
    }
    if opts.threads == Some(0) {
        return Err(ServeError::Usage("--threads must be at least 1".into()));
    }
    if let Some(size) = opts.size {
        // The CLI parses with `parse_size`; library callers get the same rule.
        if size == 0 || size % SECTOR_SIZE != 0 || size > MAX_SIZE {
            return Err(ServeError::Usage(format!(
                "bad size {size}: must be a positive multiple of {SECTOR_SIZE} bytes"
            )));
        }
    }
    Ok(())
}

/// The listeners the options ask for: every `--listen`, plus `--socket`; the default TCP address
/// only when neither is given.
#[must_use]
pub fn listen_addrs(opts: &ServeOptions) -> Vec<ListenAddr> {
    let mut addrs: Vec<ListenAddr> = opts.listen.iter().copied().map(ListenAddr::Tcp).collect();
    if let Some(socket) = &opts.socket {
        addrs.push(ListenAddr::Unix(socket.clone()));
    }
    if addrs.is_empty() {
        addrs.push(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT))));
    }
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::CacheMode;
    use std::path::Path;

    #[test]
    fn parses_sizes_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
    }

    #[test]
    fn rejects_bad_sizes_with_a_reason() {
        for (text, reason) in [
            ("", "expected a number"),
            ("G", "expected a number"),
            ("-1G", "expected a number"),
            ("1X", "unknown unit"),
            ("0", "greater than zero"),
            ("1000", "not a multiple"),
            ("99999999999999999999", "too large"),
            ("9000000P", "larger than the maximum"),
        ] {
            let err = parse_size(text).unwrap_err();
            assert!(err.contains(reason), "{text:?}: {err}");
        }
    }

    #[test]
    fn parses_listen_addresses() {
        assert_eq!(parse_listen_addr("127.0.0.1:0").unwrap(), "127.0.0.1:0".parse().unwrap());
        assert_eq!(parse_listen_addr("[::1]:10809").unwrap(), "[::1]:10809".parse().unwrap());
        assert!(parse_listen_addr("localhost:10809").unwrap().ip().is_loopback());
        for (text, reason) in [
            ("127.0.0.1", "expected HOST:PORT"),
            (":10809", "host is missing"),
            ("127.0.0.1:99999", "not a number"),
            ("127.0.0.1:http", "not a number"),
        ] {
            let err = parse_listen_addr(text).unwrap_err();
            assert!(err.contains(reason), "{text:?}: {err}");
        }
    }

    #[test]
    fn caching_modes_need_a_cache_and_a_cache_needs_backing() {
        let dir = tempfile::tempdir().unwrap();
        let backing = vec![dir.path().join("b.img")];
        for mode in [CacheMode::Writethrough, CacheMode::Writeback, CacheMode::Writearound] {
            let opts = ServeOptions { mode: Some(mode), backing: backing.clone(), ..Default::default() };
            let err = validate(&opts).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains(&format!("--mode {mode} needs a cache")), "{err}");
            // The default pair has a cache, so every mode is fine there.
            assert!(validate(&ServeOptions { mode: Some(mode), ..Default::default() }).is_ok());
        }
        let opts = ServeOptions { cache: Some("c.img".into()), ..Default::default() };
        assert!(validate(&opts).unwrap_err().to_string().contains("--cache needs the backing"));
        let same = ServeOptions { cache: Some(backing[0].clone()), backing, ..Default::default() };
        assert!(validate(&same).unwrap_err().to_string().contains("both the cache and a backing"));
    }

    #[test]
    fn default_listen_only_without_listen_or_socket() {
        let default = listen_addrs(&ServeOptions::default());
        assert!(matches!(default.as_slice(), [ListenAddr::Tcp(a)] if a.to_string() == DEFAULT_LISTEN));
        let socket_only = listen_addrs(&ServeOptions { socket: Some("s.sock".into()), ..Default::default() });
        assert!(matches!(socket_only.as_slice(), [ListenAddr::Unix(p)] if p == Path::new("s.sock")));
    }
}
