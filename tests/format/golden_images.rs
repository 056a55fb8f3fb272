//! Golden images pin on-disk format version 1.
//!
//! `tests/data/golden/` holds cache and backing images written by the format-V1 code and never
//! rewritten since: a clean set, a set with dirty keys, a set whose last journal record is torn,
//! and a detached backing device. Every test here opens those frozen bytes with today's code, so
//! a change to any encoder, decoder, offset, field order or constant that would make a released
//! build's disks unreadable (or read differently) fails here even when the round-trip tests pass,
//! because they change the encoder and decoder together.
//!
//! Each image is gzip-compressed (they are almost all zeros) and kept tiny with the smallest legal
//! geometry: 4 KiB buckets, 48 of them (28 for the fixed regions, 20 for data and btree).
//!
//! The images are made by [`regenerate_golden_images`] (ignored; `cargo test --test format --
//! --ignored golden_images::regenerate`). Run plainly with `--ignored` it
//! builds the images in memory and checks them with the same assertions, so the generator keeps
//! working; with `UBCACHE_WRITE_GOLDEN=1` it also writes them. Only a deliberate format bump
//! does that, and then into files of the new version beside the old ones (see
//! `docs/format.md`, "Compatibility"): the V1 images stay and keep being read.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::golden::config;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use ubcache::cache::{CacheSet, FormatOptions};
use ubcache::dev::{BlockDev, MemDev};
use ubcache::format::{
    self, BACKING_DATA_OFFSET_BYTES, BackingSbCopy, BackingState, BackingSuperblock, CacheSuperblock,
    FormatVersion, JOURNAL_MAGIC, RecordHeader, SB_A_OFFSET_BYTES, SB_B_OFFSET_BYTES, SB_BYTES, SbCopy,
};

/// The smallest legal bucket; 48 buckets leave 20 for data and btree after the fixed regions.
const BUCKET_BYTES: u64 = 4096;
const NODE_BYTES: u64 = 2048;
const NBUCKETS: u64 = 48;
const CACHE_BYTES: u64 = NBUCKETS * BUCKET_BYTES;
/// Exported bytes of the backing device (after its 8 KiB header).
const EXPORT_BYTES: u64 = 32 * 1024;
const BACKING_BYTES: u64 = BACKING_DATA_OFFSET_BYTES + EXPORT_BYTES;

/// The four images, by file stem.
const CLEAN: &str = "v1-clean";
const DIRTY: &str = "v1-dirty";
const TORN: &str = "v1-torn-tail";
const DETACHED: &str = "v1-detached";

/// What every image's data looks like: a byte pattern that no two writes share, so a read of
/// the wrong write, offset or generation shows.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed).wrapping_add((i >> 8) as u8)).collect()
}

/// The writes of the first round (all images): 4 KiB at 0, 2 KiB at 8 KiB.
fn first_round() -> Vec<(u64, Vec<u8>)> {
    vec![(0, pattern(1, 4096)), (8192, pattern(2, 2048))]
}

/// The second round of the torn image: 16 single sectors, none adjacent, each its own key, so
/// their journal record needs two sectors (15 key entries fit in one) and can tear.
fn torn_round() -> Vec<(u64, Vec<u8>)> {
    (0..16u64).map(|i| (16 * 1024 + i * 1024, pattern(10 + i as u8, 512))).collect()
}

/// What the export of each image must read back.
fn expected_export(rounds: &[Vec<(u64, Vec<u8>)>]) -> Vec<u8> {
    let mut model = vec![0u8; EXPORT_BYTES as usize];
    for round in rounds {
        for (off, data) in round {
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
    }
    model
}

fn arc(d: &Arc<MemDev>) -> Arc<dyn BlockDev> {
    Arc::clone(d) as Arc<dyn BlockDev>
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden")
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::best());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A cache image and a backing image.
struct Images {
    cache: Vec<u8>,
    backing: Vec<u8>,
}

fn load(stem: &str) -> Images {
    let read = |suffix: &str| {
        let path = golden_dir().join(format!("{stem}.{suffix}.img.gz"));
        gunzip(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    };
    Images { cache: read("cache"), backing: read("backing") }
}

// ---------------------------------------------------------------------------------------------
// The generator
// ---------------------------------------------------------------------------------------------

fn write_round(set: &CacheSet, round: &[(u64, Vec<u8>)]) {
    let dev = set.device(0).unwrap();
    for (off, data) in round {
        dev.write_at(data, *off).unwrap();
    }
    set.sync().unwrap();
}

/// Formats a fresh set, opens it in writeback mode and writes the first round.
fn fresh() -> (Arc<MemDev>, Arc<MemDev>, CacheSet) {
    let cache = Arc::new(MemDev::new(CACHE_BYTES));
    let backing = Arc::new(MemDev::new(BACKING_BYTES));
    let opts = FormatOptions { bucket_bytes: BUCKET_BYTES, node_bytes: NODE_BYTES };
    ubcache::cache::format(&arc(&cache), &[arc(&backing)], opts).unwrap();
    let set = CacheSet::open(arc(&cache), &[arc(&backing)], config()).unwrap();
    write_round(&set, &first_round());
    (cache, backing, set)
}

/// The last journal record (highest first seq) of a cache image: its byte offset and length.
fn last_record(cache: &[u8]) -> (usize, usize) {
    let sb = format::read_cache_superblock(&MemDev::from_bytes(cache.to_vec())).unwrap().sb;
    let region = sb.geometry.journal_region();
    let base = region.offset_bytes as usize;
    let jr = &cache[base..base + region.len_bytes as usize];
    let (_, off, h) = (0..jr.len() / 512)
        .map(|s| s * 512)
        .filter(|&o| jr[o..].starts_with(&JOURNAL_MAGIC))
        .filter_map(|o| RecordHeader::decode(&jr[o..]).ok().map(|h| (h.first_seq, o, h)))
        .max_by_key(|(seq, _, _)| *seq)
        .expect("a journal record");
    (base + off, h.record_sectors as usize * 512)
}

/// Makes the four image pairs with today's code.
fn generate() -> Vec<(&'static str, Images)> {
    let mut out = Vec::new();

    // Clean: written, then closed (everything written home, a final checkpoint).
    let (cache, backing, set) = fresh();
    set.write_back_all().unwrap();
    set.close().unwrap();
    out.push((CLEAN, Images { cache: cache.snapshot(), backing: backing.snapshot() }));

    // Dirty: written and FLUSHed in writeback mode, then the power goes (images taken while the
    // set is open: everything acknowledged is durable, nothing written home).
    let (cache, backing, set) = fresh();
    out.push((DIRTY, Images { cache: cache.snapshot(), backing: backing.snapshot() }));
    drop(set);

    // Torn tail: a second round committed as one two-sector record, whose second sector never
    // reached the disk (the commit never returned).
    let (cache, backing, set) = fresh();
    write_round(&set, &torn_round());
    let mut img = cache.snapshot();
    let (off, len) = last_record(&img);
    assert!(len >= 1024, "the torn record must span sectors, it has {len} bytes");
    img[off + len - 512..off + len].fill(0);
    out.push((TORN, Images { cache: img, backing: backing.snapshot() }));
    drop(set);

    // Detached: written, detached (dirty data written home, backing superblock Detached), closed.
    let (cache, backing, set) = fresh();
    set.detach(0).unwrap();
    set.close().unwrap();
    out.push((DETACHED, Images { cache: cache.snapshot(), backing: backing.snapshot() }));
    out
}

/// Makes the images, checks them with the tests' assertions, and writes them only when
/// `UBCACHE_WRITE_GOLDEN=1` (a deliberate format bump; give the files of a new version new names).
#[test]
#[ignore = "generator of the golden images; run with --ignored (set UBCACHE_WRITE_GOLDEN=1 to write)"]
fn regenerate_golden_images() {
    let images = generate();
    for (stem, img) in &images {
        verify(stem, img);
    }
    if std::env::var("UBCACHE_WRITE_GOLDEN").as_deref() == Ok("1") {
        std::fs::create_dir_all(golden_dir()).unwrap();
        for (stem, img) in &images {
            std::fs::write(golden_dir().join(format!("{stem}.cache.img.gz")), gzip(&img.cache)).unwrap();
            std::fs::write(golden_dir().join(format!("{stem}.backing.img.gz")), gzip(&img.backing)).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What each image must say
// ---------------------------------------------------------------------------------------------

/// The cache superblock decodes to the V1 geometry, and today's encoder writes back exactly the
/// stored bytes of both copies (an encoder-only change shows here).
fn check_cache_superblock(stem: &str, cache: &[u8]) -> CacheSuperblock {
    let read = format::read_cache_superblock(&MemDev::from_bytes(cache.to_vec()))
        .unwrap_or_else(|e| panic!("{stem}: cache superblock: {e}"));
    assert!(read.other_copy_error.is_none(), "{stem}: both copies valid");
    let sb = read.sb;
    assert_eq!(sb.version, FormatVersion::V1, "{stem}");
    assert_eq!(sb.geometry.nbuckets, NBUCKETS, "{stem}");
    assert_eq!(sb.geometry.bucket_bytes(), BUCKET_BYTES, "{stem}");
    assert_eq!(sb.geometry.node_bytes(), NODE_BYTES, "{stem}");
    // Detach unregisters the device from the cache superblock.
    let registered = usize::from(stem != DETACHED);
    assert_eq!(sb.backing.len(), registered, "{stem}: backing devices registered");
    for (copy, at) in [(SbCopy::A, SB_A_OFFSET_BYTES), (SbCopy::B, SB_B_OFFSET_BYTES)] {
        let at = at as usize;
        assert!(
            sb.encode(copy).unwrap()[..] == cache[at..at + SB_BYTES],
            "{stem}: cache superblock copy {copy:?} re-encodes to other bytes"
        );
    }
    sb
}

/// The backing superblock decodes, and re-encodes to the stored bytes of both copies.
fn check_backing_superblock(stem: &str, backing: &[u8]) -> BackingSuperblock {
    let sb = format::read_backing_superblock(&MemDev::from_bytes(backing.to_vec()))
        .unwrap_or_else(|e| panic!("{stem}: backing superblock: {e}"))
        .unwrap_or_else(|| panic!("{stem}: backing superblock missing"));
    assert_eq!(sb.version, FormatVersion::V1, "{stem}");
    assert_eq!(sb.data_offset_bytes, BACKING_DATA_OFFSET_BYTES, "{stem}");
    assert_eq!(sb.size_bytes, BACKING_BYTES, "{stem}");
    for (copy, at) in [(BackingSbCopy::A, 0usize), (BackingSbCopy::B, 4096)] {
        assert!(
            sb.encode_copy(copy)[..] == backing[at..at + 4096],
            "{stem}: backing superblock copy {copy:?} re-encodes to other bytes"
        );
    }
    sb
}

/// Every journal record in the image that decodes re-encodes to its stored bytes.
fn check_journal_records(stem: &str, cache: &[u8], sb: &CacheSuperblock) -> usize {
    let region = sb.geometry.journal_region();
    let base = region.offset_bytes as usize;
    let jr = &cache[base..base + region.len_bytes as usize];
    let mut n = 0;
    for s in 0..jr.len() / 512 {
        let Ok((h, entries)) = format::decode_record(&jr[s * 512..], s as u64, sb.set_uuid) else { continue };
        let mut raw = Vec::new();
        for e in &entries {
            e.encode(&mut raw).unwrap();
        }
        let again = format::encode_record(&h, &raw).unwrap();
        assert!(
            again[..] == jr[s * 512..s * 512 + again.len()],
            "{stem}: journal record at sector {s} re-encodes"
        );
        n += 1;
    }
    assert!(n > 0, "{stem}: no journal record decoded");
    n
}

/// What check, recovery and reads of each image must find.
fn verify(stem: &str, img: &Images) {
    let csb = check_cache_superblock(stem, &img.cache);
    let bsb = check_backing_superblock(stem, &img.backing);
    if let Some(entry) = csb.backing.first() {
        assert_eq!(
            (entry.uuid, entry.dev_id),
            (bsb.uuid, 0),
            "{stem}: the cache registers this backing device"
        );
    }
    check_journal_records(stem, &img.cache, &csb);

    let cache = Arc::new(MemDev::from_bytes(img.cache.clone()));
    let backing = Arc::new(MemDev::from_bytes(img.backing.clone()));
    let report = ubcache::check::check(&arc(&cache), &[arc(&backing)]).unwrap();
    assert!(report.is_clean(), "{stem}: check found {:?}", report.problems);

    // Every image holds the first round (4 KiB + 2 KiB = 12 sectors): at home on the backing
    // device once written back (clean, detached), else only in the cache (dirty, torn).
    let want = expected_export(&[first_round()]);
    let home = &img.backing[BACKING_DATA_OFFSET_BYTES as usize..];
    let dirty = matches!(stem, DIRTY | TORN);
    if dirty {
        assert_eq!((report.dirty_keys, report.dirty_sectors), (2, 12), "{stem}");
        assert!(home.iter().all(|&b| b == 0), "{stem}: nothing written home");
    } else {
        assert_eq!((report.dirty_keys, report.dirty_sectors), (0, 0), "{stem}");
        assert!(home == want, "{stem}: the data is home on the backing device");
    }
    let torn_warned = report.warnings.iter().any(|w| w.contains("torn"));
    assert_eq!(torn_warned, stem == TORN, "{stem}: warnings {:?}", report.warnings);
    let want_state = match stem {
        CLEAN => BackingState::Clean,
        DIRTY | TORN => BackingState::Dirty,
        _ => BackingState::Detached,
    };
    assert_eq!(bsb.state, want_state, "{stem}");
    assert_eq!(bsb.set_uuid.is_nil(), stem == DETACHED, "{stem}: a detached device names no set");

    let set = CacheSet::open(arc(&cache), &[arc(&backing)], config())
        .unwrap_or_else(|e| panic!("{stem}: open: {e}"));
    let rec = set.recovery().clone();
    assert_eq!(rec.torn_tail, stem == TORN, "{stem}: {rec:?}");
    assert_eq!(rec.dirty_sectors, if dirty { 12 } else { 0 }, "{stem}: {rec:?}");
    let dev = set.device(0).unwrap();
    assert_eq!(dev.is_detached(), stem == DETACHED, "{stem}");
    let mut buf = vec![0u8; EXPORT_BYTES as usize];
    dev.read_at(&mut buf, 0).unwrap();
    // The torn image's second round never committed: it must not show.
    assert!(buf == want, "{stem}: the export reads other bytes");
    assert!(set.check().unwrap().is_clean(), "{stem}: check after recovery");
    drop(dev);
    set.close().unwrap();
}

#[test]
fn clean_v1_image_opens_checks_and_reads_back() {
    verify(CLEAN, &load(CLEAN));
}

#[test]
fn dirty_v1_image_recovers_its_dirty_keys() {
    verify(DIRTY, &load(DIRTY));
}

#[test]
fn torn_tail_v1_image_drops_the_torn_record_and_says_so() {
    verify(TORN, &load(TORN));
}

#[test]
fn detached_v1_backing_image_opens_detached_with_its_data_home() {
    verify(DETACHED, &load(DETACHED));
}

/// The images in git are what the generator's V1 code wrote: the tests above read them, and
/// this one checks the files are there and small (a format bump adds files, never edits these).
#[test]
fn golden_images_are_present_and_small() {
    let mut total = 0;
    for stem in [CLEAN, DIRTY, TORN, DETACHED] {
        for part in ["cache", "backing"] {
            let path = golden_dir().join(format!("{stem}.{part}.img.gz"));
            total += std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).len();
        }
    }
    assert!(total < 256 * 1024, "golden images take {total} bytes");
}
