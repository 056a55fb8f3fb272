//! Benchmark driver: serves one backing device (a file, or a remote NBD export through
//! `NbdDev`) over NBD on a Unix socket, either through a cache set (`--cache FILE`) or as a
//! plain passthrough. `benches/cache_fio.sh` uses it when the `ubcache` binary cannot yet serve
//! a cached export over an NBD backing.
//!
//! ```text
//! cargo run --release --example cache_serve -- --backing nbd+unix:///?socket=slow.sock \
//!     --socket cached.sock [--cache cache.img --cache-size 2G --mode writeback] \
//!     [--sequential-cutoff 0] [--backing-size 1G]
//! ```
//!
//! With `--cache`, a missing cache file is created and formatted over the backing device
//! (which then gets a backing superblock: the export is 8 KiB shorter); an existing one is
//! opened (recovering if needed). No background writeback runs: the driver measures how the
//! cache absorbs I/O, and dirty data stays cached. SIGINT/SIGTERM stop it cleanly (the server
//! syncs, the set is closed with a checkpoint). It prints `ready <uri>` on stdout when serving.

#![allow(clippy::print_stdout, reason = "the driver prints its ready line for the bench script")]

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use ubcache::cache::{CacheConfig, CacheMode, CacheSet, FormatOptions};
use ubcache::dev::{BlockDev, FileDev, FileDevOptions};
use ubcache::nbd::NbdDev;
use ubcache::nbd::{DeviceCalls, Export, ListenAddr, Server, ServerConfig, build_runtime};

#[derive(Default)]
struct Args {
    backing: String,
    backing_size: Option<u64>,
    socket: PathBuf,
    cache: Option<PathBuf>,
    cache_size: u64,
    mode: Option<CacheMode>,
    sequential_cutoff: Option<u64>,
    blocking_pool: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args { cache_size: 2 << 30, ..Args::default() };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--backing" => a.backing = value()?,
            "--backing-size" => a.backing_size = Some(ubcache::cli::parse_size(&value()?)?),
            "--socket" => a.socket = PathBuf::from(value()?),
            "--cache" => a.cache = Some(PathBuf::from(value()?)),
            "--cache-size" => a.cache_size = ubcache::cli::parse_size(&value()?)?,
            "--mode" => a.mode = Some(value()?.parse().map_err(|e| format!("--mode: {e}"))?),
            "--sequential-cutoff" => {
                // 0 (never bypass) is a valid cutoff, unlike a zero size.
                let v = value()?;
                a.sequential_cutoff = Some(if v == "0" { 0 } else { ubcache::cli::parse_size(&v)? });
            }
            "--blocking-pool" => a.blocking_pool = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.backing.is_empty() || a.socket.as_os_str().is_empty() {
        return Err("--backing and --socket are required".into());
    }
    Ok(a)
}

fn open_backing(a: &Args) -> Result<Arc<dyn BlockDev>, Box<dyn Error>> {
    if a.backing.starts_with("nbd://") || a.backing.starts_with("nbd+unix://") {
        return Ok(Arc::new(NbdDev::connect(&a.backing)?));
    }
    let opts = FileDevOptions { create_with_size: a.backing_size, ..FileDevOptions::default() };
    Ok(Arc::new(FileDev::open(std::path::Path::new(&a.backing), &opts)?))
}

fn main() -> Result<(), Box<dyn Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let a = parse_args()?;
    let backing = open_backing(&a)?;
    let set_and_dev: Option<(CacheSet, Arc<dyn BlockDev>)> = match &a.cache {
        Some(path) => {
            let fresh = !path.exists();
            let opts = FileDevOptions { create_with_size: Some(a.cache_size), ..FileDevOptions::default() };
            let cache: Arc<dyn BlockDev> = Arc::new(FileDev::open(path, &opts)?);
            if fresh {
                ubcache::cache::format(&cache, std::slice::from_ref(&backing), FormatOptions::default())?;
            }
            let mut cfg =
                CacheConfig { mode: a.mode.unwrap_or(CacheMode::Writeback), ..CacheConfig::default() };
            if let Some(cutoff) = a.sequential_cutoff {
                cfg.sequential_cutoff = cutoff;
            }
            let set = CacheSet::open(cache, std::slice::from_ref(&backing), cfg)?;
            let dev = set.device(0).ok_or("the backing device is not attached to this cache set")?;
            Some((set, Arc::new(dev)))
        }
        None => None,
    };
    let dev = set_and_dev.as_ref().map_or_else(|| Arc::clone(&backing), |(_, d)| Arc::clone(d));
    let config = ServerConfig {
        exports: vec![Export::new("", dev)],
        device_calls: if a.blocking_pool { DeviceCalls::BlockingPool } else { DeviceCalls::OnWorkers },
        ..ServerConfig::default()
    };
    let rt = build_runtime(None)?;
    rt.block_on(async {
        let server = Server::bind(config, &[ListenAddr::Unix(a.socket.clone())]).await?;
        for uri in server.uris() {
            println!("ready {uri}");
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        server
            .run(async move {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            })
            .await?;
        Ok::<(), Box<dyn Error>>(())
    })?;
    if let Some((set, dev)) = set_and_dev {
        drop(dev);
        set.close()?;
    }
    Ok(())
}
