//! Serves one file over NBD, for benchmarking the request path with fio or nbdkit-style tools.
//!
//! Usage: `serve_file FILE [tcp:HOST:PORT | unix:PATH]... [--workers N] [--read-only] [--blocking-pool]`
//! (default `tcp:127.0.0.1:10809`). Stops on Ctrl-C, after syncing.

use std::path::PathBuf;
use std::sync::Arc;
use ubcache::dev::{FileDev, FileDevOptions};
use ubcache::nbd::{DeviceCalls, Export, ListenAddr, Server, ServerConfig, build_runtime};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let mut args = std::env::args().skip(1);
    let file = PathBuf::from(args.next().ok_or("usage: serve_file FILE [tcp:HOST:PORT|unix:PATH]...")?);
    let mut listen = Vec::new();
    let mut workers = None;
    let mut read_only = false;
    let mut device_calls = DeviceCalls::OnWorkers;
    while let Some(arg) = args.next() {
        if arg == "--workers" {
            workers = Some(args.next().ok_or("--workers needs a number")?.parse()?);
        } else if arg == "--blocking-pool" {
            device_calls = DeviceCalls::BlockingPool;
        } else if arg == "--inline" {
            device_calls = DeviceCalls::Inline;
        } else if arg == "--read-only" {
            read_only = true;
        } else if let Some(addr) = arg.strip_prefix("tcp:") {
            listen.push(ListenAddr::Tcp(addr.parse()?));
        } else if let Some(path) = arg.strip_prefix("unix:") {
            listen.push(ListenAddr::Unix(path.into()));
        } else {
            return Err(format!("unknown argument {arg:?}").into());
        }
    }
    if listen.is_empty() {
        listen.push(ListenAddr::Tcp("127.0.0.1:10809".parse()?));
    }
    let dev = FileDev::open(&file, &FileDevOptions { read_only, ..Default::default() })?;
    let export = Export { read_only, ..Export::new("", Arc::new(dev)) };
    let runtime = build_runtime(workers)?;
    runtime.block_on(async {
        let config = ServerConfig { exports: vec![export], device_calls, ..Default::default() };
        let server = Server::bind(config, &listen).await?;
        for uri in server.uris() {
            eprintln!("serving {uri}");
        }
        server
            .run(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}
