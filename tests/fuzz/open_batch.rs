//! Whole-image fuzzing of `CacheSet::open`: the golden V1 images (tests/data/golden/) with a few
//! random byte mutations, mostly in the metadata regions, opened as they are. Open must return an
//! error or a working set (which then reads, checks and closes), never panic, hang or allocate
//! what a crafted header claims. Bounded by an iteration count and a time budget so it stays a
//! few seconds in the ordinary suite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::golden::config;
use flate2::read::GzDecoder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ubcache::cache::CacheSet;
use ubcache::dev::{BlockDev, MemDev};
use ubcache::format::{self, JOURNAL_MAGIC, RecordHeader, Uuid};

/// The golden images' metadata (superblocks, journal, bucket table) lies in their first 28 4 KiB
/// buckets; most mutations land there, the rest anywhere (btree nodes, data).
const METADATA_BYTES: usize = 28 * 4096;
const STEMS: [&str; 4] = ["v1-clean", "v1-dirty", "v1-torn-tail", "v1-detached"];

fn golden(stem: &str, suffix: &str) -> Vec<u8> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/golden/{stem}.{suffix}.img.gz"));
    let gz = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    GzDecoder::new(&gz[..]).read_to_end(&mut out).unwrap();
    out
}

/// A few byte flips, extreme values and copied runs (a sector moved elsewhere: a misdirected write).
fn mutate(rng: &mut StdRng, image: &mut [u8]) {
    for _ in 0..rng.gen_range(1..=4) {
        let limit = if rng.gen_bool(0.85) { METADATA_BYTES.min(image.len()) } else { image.len() };
        let mut i = rng.gen_range(0..limit);
        // Half the time the next non-zero byte: the images are mostly zeros that open never reads.
        if rng.gen_bool(0.5)
            && let Some(nz) = image[i..limit].iter().position(|&b| b != 0)
        {
            i += nz;
        }
        match rng.gen_range(0..4) {
            0 => image[i] ^= 1 << rng.gen_range(0..8),
            1 => image[i] = [0u8, 0xff, 0x7f, 0x80, 1][rng.gen_range(0..5)],
            2 => {
                // A big-endian or little-endian u32/u64 field set to an extreme.
                let width = if rng.gen_bool(0.5) { 4 } else { 8 };
                let end = (i + width).min(image.len());
                let fill = if rng.gen_bool(0.5) { 0xff } else { 0x7f };
                image[i..end].fill(fill);
            }
            _ => {
                let from = rng.gen_range(0..image.len() / 512) * 512;
                let to = rng.gen_range(0..limit / 512) * 512;
                let sector = image[from..from + 512].to_vec();
                image[to..to + 512].copy_from_slice(&sector);
            }
        }
    }
}

/// Opens the images; if that works, the set must serve its export, check and close. Returns
/// whether it opened.
fn open_and_use(cache: Vec<u8>, backing: Vec<u8>) -> bool {
    let cache: Arc<dyn BlockDev> = Arc::new(MemDev::from_bytes(cache));
    let backing: Arc<dyn BlockDev> = Arc::new(MemDev::from_bytes(backing));
    let Ok(set) = CacheSet::open(cache, &[backing], config()) else {
        return false;
    };
    for dev in set.devices() {
        let mut buf = vec![0u8; (dev.len().min(64 << 10)) as usize];
        let _ = dev.read_at(&mut buf, 0);
    }
    let _ = set.check();
    let _ = set.close();
    true
}

#[test]
fn open_survives_mutated_golden_images() {
    let mut rng = StdRng::seed_from_u64(0x6f70_656e);
    let budget = Duration::from_secs(4);
    let started = Instant::now();
    let images: Vec<(Vec<u8>, Vec<u8>)> =
        STEMS.iter().map(|s| (golden(s, "cache"), golden(s, "backing"))).collect();
    let (mut tried, mut opened) = (0, 0);
    for round in 0..20_000 {
        if started.elapsed() > budget {
            break;
        }
        let (cache, backing) = &images[round % images.len()];
        let mut cache = cache.clone();
        mutate(&mut rng, &mut cache);
        opened += usize::from(open_and_use(cache, backing.clone()));
        tried += 1;
    }
    eprintln!("{tried} mutated images, {opened} opened");
    assert!(tried >= 50, "only {tried} images in the budget: the batch proves little");
    // Most mutations hit bytes open never reads or that a checksum guards; some must open, or
    // the batch never reaches the code behind the checks.
    assert!(opened > tried / 20, "only {opened} of {tried} mutated images opened");
}

/// A journal record header that claims a record far bigger than the format allows is damaged:
/// replay must not allocate what it says (with a large enough journal region it would).
#[test]
fn a_record_header_claiming_more_than_the_format_limit_is_refused() {
    let set = Uuid([7; 16]);
    let h = RecordHeader {
        entry_count: 0,
        first_seq: 1,
        prev_seq: 0,
        sector: 0,
        prev_sector: 0,
        set_uuid: set,
        entries_len: 0,
        record_sectors: RecordHeader::sectors_for(0) as u32,
    };
    let mut record = format::encode_record(&h, &[]).unwrap();
    assert!(RecordHeader::decode(&record).is_ok());
    assert_eq!(record[..8], JOURNAL_MAGIC);
    // Entry length and sector count patched consistently to just over the limit.
    let entries_len = format::MAX_RECORD_BYTES as u32;
    let sectors = RecordHeader::sectors_for(entries_len as usize) as u32;
    let (len_off, sectors_off) = (64, 68);
    record[len_off..len_off + 4].copy_from_slice(&entries_len.to_le_bytes());
    record[sectors_off..sectors_off + 4].copy_from_slice(&sectors.to_le_bytes());
    let err = RecordHeader::decode(&record).expect_err("a record bigger than the format allows");
    assert!(err.to_string().contains("limit"), "{err}");
}
