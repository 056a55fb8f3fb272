//! `set-mode` is stored in the backing superblock (as bcache stores `cache_mode`), and a set
//! opened without an explicit mode uses it; an explicit mode wins and is stored in turn. Checked
//! on the engine (`CacheConfig::stored_mode`) and through `cli::build_exports` (`--mode`
//! given or not) across restarts.

use crate::fixtures::{arc, format_open, tiny_config};
use std::sync::Arc;
use ubcache::cache::{CacheConfig, CacheMode, CacheSet};
use ubcache::cli::{ServeOptions, build_exports};
use ubcache::dev::{BlockDev, MemDev};
use ubcache::format::{StoredCacheMode, read_backing_superblock};

fn stored(backing: &Arc<dyn BlockDev>) -> StoredCacheMode {
    read_backing_superblock(backing.as_ref()).unwrap().unwrap().cache_mode
}

fn reopen(cache: &Arc<dyn BlockDev>, backing: &Arc<dyn BlockDev>, cfg: CacheConfig) -> CacheSet {
    CacheSet::open(Arc::clone(cache), &[Arc::clone(backing)], cfg).unwrap()
}

#[test]
fn set_mode_is_stored_and_used_when_no_mode_is_given() {
    let cache = arc(MemDev::new(1 << 20));
    let backing = arc(MemDev::new(8192 + (1 << 20)));
    let stored_cfg = CacheConfig { stored_mode: true, ..tiny_config(CacheMode::Writethrough) };
    let set = format_open(&cache, &backing, stored_cfg.clone());
    assert_eq!(set.device(0).unwrap().mode(), CacheMode::Writethrough, "format stores writethrough");
    set.device(0).unwrap().set_mode(CacheMode::Writeback, false).unwrap();
    assert_eq!(stored(&backing), StoredCacheMode::Writeback, "set-mode writes the superblock at once");
    // Dirty data across the restart too.
    set.device(0).unwrap().write_at(&[7u8; 4096], 0).unwrap();
    set.close().unwrap();

    // No mode given: the stored one, even though the config's `mode` says writethrough.
    let set = reopen(&cache, &backing, stored_cfg.clone());
    let dev = set.device(0).unwrap();
    assert_eq!(dev.mode(), CacheMode::Writeback);
    dev.write_at(&[8u8; 4096], 4096).unwrap();
    assert_eq!(set.stats().dirty_bytes, 2 * 4096, "writes are cached dirty again");
    drop(dev);
    set.close().unwrap();

    // An explicit mode wins and is stored.
    let set =
        reopen(&cache, &backing, CacheConfig { stored_mode: false, ..tiny_config(CacheMode::Writearound) });
    assert_eq!(set.device(0).unwrap().mode(), CacheMode::Writearound);
    assert_eq!(stored(&backing), StoredCacheMode::Writearound);
    set.close().unwrap();
    let set = reopen(&cache, &backing, stored_cfg);
    assert_eq!(set.device(0).unwrap().mode(), CacheMode::Writearound);
    let mut buf = [0u8; 8192];
    set.device(0).unwrap().read_at(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 7) && buf[4096..].iter().all(|&b| b == 8));
    set.close().unwrap();
}

#[test]
fn serve_without_mode_uses_the_stored_mode_and_an_explicit_mode_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let opts =
        ServeOptions { data_dir: dir.path().to_path_buf(), size: Some(16 << 20), ..Default::default() };
    let open = |opts: &ServeOptions| {
        let (exports, locks, set) = build_exports(opts).unwrap().into_parts();
        let set = set.expect("cached");
        let mode = set.devices()[0].mode();
        (exports, locks, set, mode)
    };
    let (exports, locks, set, mode) = open(&opts);
    assert_eq!(mode, CacheMode::Writethrough);
    set.devices()[0].set_mode(CacheMode::Writeback, false).unwrap();
    drop(exports);
    set.close().unwrap();
    drop(locks);

    let (exports, locks, set, mode) = open(&opts);
    assert_eq!(mode, CacheMode::Writeback, "no --mode: the mode set-mode stored");
    drop(exports);
    set.close().unwrap();
    drop(locks);

    let explicit = ServeOptions { mode: Some(CacheMode::None), ..opts.clone() };
    let (exports, locks, set, mode) = open(&explicit);
    assert_eq!(mode, CacheMode::None, "--mode wins");
    drop(exports);
    set.close().unwrap();
    drop(locks);

    let (_exports, _locks, set, mode) = open(&opts);
    assert_eq!(mode, CacheMode::None, "--mode was stored");
    set.close().unwrap();
}
