//! Flipped bits in cache metadata (btree nodes, journal records, bucket tables, superblocks) are
//! detected with a clear error when the cache set is opened: never a panic, never a silent wrong
//! read. Where a flip hits metadata that is no longer in use, the set opens and every read is
//! still right.

use crate::fixtures::{TINY, tiny_config};
use std::sync::Arc;
use ubcache::cache::{CacheError, CacheMode, CacheSet, Metadata};
use ubcache::check::ProblemKind;
use ubcache::dev::{BlockDev, DevError, FaultDev, FaultOp, FaultRule, MemDev, OpInfo};
use ubcache::format::{self, JOURNAL_MAGIC, RecordHeader, TABLE_MAGIC};

const EXPORT: usize = 256 * 1024;
const CACHE: usize = 1 << 20;

fn pattern(round: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(round)).collect()
}

/// A cache image with a multi-node btree of dirty keys, a checkpoint, and then `rounds` more
/// write+FLUSH rounds (one journal record each) that only the journal holds. Returns the cache
/// image, the backing image, and the expected export contents.
fn build(rounds: u8) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let cache = Arc::new(MemDev::new(CACHE as u64));
    let backing = Arc::new(MemDev::new(EXPORT as u64 + 8192));
    let c: Arc<dyn BlockDev> = Arc::clone(&cache) as _;
    let b: Arc<dyn BlockDev> = Arc::clone(&backing) as _;
    ubcache::cache::format(&c, std::slice::from_ref(&b), TINY).unwrap();
    let mut cfg = tiny_config(CacheMode::Writeback);
    cfg.sequential_cutoff = 0;
    cfg.max_uncommitted_entries = 10_000;
    let set = CacheSet::open(Arc::clone(&c), std::slice::from_ref(&b), cfg.clone()).unwrap();
    let dev = set.device(0).unwrap();
    let mut model = vec![0u8; EXPORT];
    // Many small scattered keys: several btree nodes of 2 KiB.
    for i in 0..200usize {
        let off = (i * 7919 % (EXPORT / 512)) * 512;
        let data = pattern(i as u8, 512);
        dev.write_at(&data, off as u64).unwrap();
        model[off..off + 512].copy_from_slice(&data);
    }
    drop(dev);
    set.close().unwrap();
    let set = CacheSet::open(Arc::clone(&c), std::slice::from_ref(&b), cfg).unwrap();
    let dev = set.device(0).unwrap();
    for r in 0..rounds {
        let off = usize::from(r) * 4096 + 1024;
        let data = pattern(200 + r, 1024);
        dev.write_at(&data, off as u64).unwrap();
        model[off..off + data.len()].copy_from_slice(&data);
        dev.sync().unwrap();
    }
    drop(dev);
    drop(set);
    (cache.snapshot(), backing.snapshot(), model)
}

fn open(cache: Vec<u8>, backing: &[u8]) -> (Result<CacheSet, CacheError>, Arc<dyn BlockDev>) {
    let c: Arc<dyn BlockDev> = Arc::new(MemDev::from_bytes(cache));
    let b: Arc<dyn BlockDev> = Arc::new(MemDev::from_bytes(backing.to_vec()));
    let set = CacheSet::open(c, std::slice::from_ref(&b), tiny_config(CacheMode::Writeback));
    (set, b)
}

fn reads_match(set: &CacheSet, model: &[u8]) -> bool {
    let mut buf = vec![0u8; model.len()];
    set.device(0).unwrap().read_at(&mut buf, 0).is_ok_and(|()| buf == model)
}

/// Offsets (bytes) of every sector in `image` that starts with `magic`.
fn find_magic(image: &[u8], magic: &[u8], step: usize) -> Vec<usize> {
    (0..image.len() / step).map(|i| i * step).filter(|&o| image[o..].starts_with(magic)).collect()
}

#[test]
fn intact_image_opens_and_reads_back() {
    let (cache, backing, model) = build(3);
    let (set, _) = open(cache, &backing);
    let set = set.unwrap();
    assert_eq!(set.recovery().replayed_entries, 3);
    assert!(reads_match(&set, &model));
}

#[test]
fn flipped_bit_in_a_btree_node_is_detected_at_open() {
    let (cache, backing, model) = build(0);
    let nodes = find_magic(&cache, &ubcache_btree::format::NODE_MAGIC, TINY.node_bytes as usize);
    assert!(nodes.len() >= 3, "expected a multi-node btree, found {} nodes", nodes.len());
    let mut detected = 0;
    for &node in &nodes {
        // A byte inside the first bset (keys), and one in the header.
        for delta in [40usize, 300] {
            let mut img = cache.clone();
            img[node + delta] ^= 0x10;
            match open(img, &backing).0 {
                Err(CacheError::Corrupted(c)) => {
                    detected += 1;
                    assert!(matches!(c.what, Metadata::BtreeNode | Metadata::Btree), "{c}");
                    // A node that fails its checksum is named by its place, with the btree's
                    // own error kept as the cause.
                    if c.what == Metadata::BtreeNode {
                        assert_eq!(c.at, Some(node as u64), "{c}");
                        assert!(c.source.is_some(), "{c}");
                    }
                }
                Err(e) => panic!("node at {node}+{delta}: expected Corrupted, got {e}"),
                // A slot the current tree no longer uses: harmless, and reads stay right.
                Ok(set) => assert!(reads_match(&set, &model), "node at {node}+{delta}: silent wrong read"),
            }
        }
    }
    assert!(detected > 0, "no flipped node bit was detected");
}

#[test]
fn flipped_bit_in_a_journal_record_before_the_last_is_corruption() {
    let (cache, backing, model) = build(3);
    let geometry = format::read_cache_superblock(&MemDev::from_bytes(cache.clone())).unwrap().sb.geometry;
    let region = geometry.journal_region();
    let jr = &cache[region.offset_bytes as usize..(region.offset_bytes + region.len_bytes) as usize];
    let mut records: Vec<(u64, usize)> = find_magic(jr, &JOURNAL_MAGIC, 512)
        .into_iter()
        .filter_map(|o| RecordHeader::decode(&jr[o..]).ok().map(|h| (h.first_seq, o)))
        .collect();
    records.sort_unstable();
    let n = records.len();
    assert!(n >= 4, "expected a checkpoint and 3 records, found {n}");
    // The middle of the three post-checkpoint records: a valid newer record follows it.
    let (_, middle) = records[n - 2];
    let mut img = cache.clone();
    img[region.offset_bytes as usize + middle + 100] ^= 0x01;
    match open(img, &backing).0 {
        Err(CacheError::Corrupted(c)) => assert_eq!(c.what, Metadata::Journal, "{c}"),
        Err(e) => panic!("expected Corrupted, got {e}"),
        Ok(_) => panic!("a damaged journal record in the middle of the chain was accepted"),
    }
    // The last record: indistinguishable from a write torn by a crash, so it is dropped and
    // reported (RecoveryReport::torn_tail), never applied half-way.
    let (_, last) = records[n - 1];
    let mut img = cache.clone();
    img[region.offset_bytes as usize + last + 100] ^= 0x01;
    let set = open(img, &backing).0.unwrap();
    assert!(set.recovery().torn_tail);
    assert_eq!(set.recovery().replayed_entries, 2);
    let mut buf = vec![0u8; model.len()];
    set.device(0).unwrap().read_at(&mut buf, 0).unwrap();
    // Everything but the last round's write (at 2*4096+1024) reads as the model says.
    assert_eq!(buf[..2 * 4096 + 1024], model[..2 * 4096 + 1024]);
    assert_eq!(buf[2 * 4096 + 2048..], model[2 * 4096 + 2048..]);
}

#[test]
fn flipped_bit_in_the_bucket_table_is_detected() {
    let (cache, backing, model) = build(1);
    let tables = find_magic(&cache, &TABLE_MAGIC, 512);
    assert_eq!(tables.len(), 2, "two bucket-table slots expected");
    let mut detected = 0;
    for t in tables {
        let mut img = cache.clone();
        img[t + 40] ^= 0x04;
        match open(img, &backing).0 {
            Err(CacheError::Corrupted(_)) => detected += 1,
            Err(e) => panic!("expected Corrupted, got {e}"),
            // The slot the last checkpoint does not name is not read.
            Ok(set) => assert!(reads_match(&set, &model)),
        }
    }
    assert_eq!(detected, 1, "exactly the current table must be detected as damaged");
}

#[test]
fn one_bad_superblock_copy_is_survived_two_are_an_error() {
    let (cache, backing, model) = build(1);
    let mut one = cache;
    one[format::SB_A_OFFSET_BYTES as usize + 64] ^= 0xff;
    let set = open(one.clone(), &backing).0.unwrap();
    assert!(reads_match(&set, &model));
    one[format::SB_B_OFFSET_BYTES as usize + 64] ^= 0xff;
    assert!(matches!(open(one, &backing).0, Err(CacheError::Corrupted(_))));
}

#[test]
fn offline_check_reports_a_damaged_node_instead_of_failing() {
    let (cache, backing, _) = build(0);
    let c: Arc<dyn BlockDev> = Arc::new(MemDev::from_bytes(cache.clone()));
    let b: Arc<dyn BlockDev> = Arc::new(MemDev::from_bytes(backing));
    let clean = ubcache::check::check(&c, std::slice::from_ref(&b)).unwrap();
    assert!(clean.is_clean(), "{:?}", clean.problems);
    assert!(clean.dirty_sectors > 0 && clean.nodes >= 3);
    let json = serde_json::to_string(&clean).unwrap();
    assert!(json.contains("\"dirty_sectors\""));
    let mut found_problem = false;
    for node in find_magic(&cache, &ubcache_btree::format::NODE_MAGIC, TINY.node_bytes as usize) {
        let mut img = cache.clone();
        img[node + 40] ^= 0x10;
        let c: Arc<dyn BlockDev> = Arc::new(MemDev::from_bytes(img));
        let r = ubcache::check::check(&c, std::slice::from_ref(&b)).unwrap();
        found_problem |= !r.is_clean();
        // A damaged node is a btree problem, whichever step meets it first.
        let kinds =
            [ProblemKind::MetadataUnloadable, ProblemKind::BtreeInvariant, ProblemKind::BtreeUnreadable];
        assert!(r.problems.iter().all(|p| kinds.contains(&p.kind)), "{:?}", r.problems);
    }
    assert!(found_problem, "check found no problem in any damaged node");
}

/// A device failure while reading a btree node used to reach the caller as an I/O error at
/// offset 0 with the cause folded into a string: it must stay the device's own error, with
/// the offset that failed.
#[test]
fn a_failing_node_read_is_the_devices_error_with_its_offset() {
    let (cache, backing, _) = build(0);
    let nodes: Vec<u64> = find_magic(&cache, &ubcache_btree::format::NODE_MAGIC, TINY.node_bytes as usize)
        .into_iter()
        .map(|o| o as u64)
        .collect();
    let node_bytes = TINY.node_bytes;
    let in_a_node = {
        let nodes = nodes.clone();
        move |op: &OpInfo| nodes.iter().any(|&n| op.offset < n + node_bytes && n < op.offset + op.len)
    };
    let faulty = FaultDev::new(MemDev::from_bytes(cache));
    faulty.add_rule(FaultRule::every(FaultOp::Read).matching(in_a_node));
    let c: Arc<dyn BlockDev> = Arc::new(faulty);
    let b: Arc<dyn BlockDev> = Arc::new(MemDev::from_bytes(backing));
    match CacheSet::open(c, &[b], tiny_config(CacheMode::Writeback)) {
        Err(CacheError::Dev(DevError::Io { offset, .. })) => {
            assert!(nodes.iter().any(|&n| (n..n + node_bytes).contains(&offset)), "offset {offset}");
        }
        Err(e) => panic!("expected the device's I/O error, got {e:?}"),
        Ok(_) => panic!("opened without reading a btree node"),
    }
}
