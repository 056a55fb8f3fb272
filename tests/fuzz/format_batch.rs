//! A bounded, deterministic fuzz batch over every decoder of `format`: random inputs and
//! mutations of valid encodings (bit flips, byte overwrites, truncation, extension, and field
//! edits with the checksum fixed up so validation past the crc is exercised). Every decoder must
//! return without panicking; every input it accepts must re-encode to the same bytes.
//! (The cargo-fuzz targets in `fuzz/` run the same decoders without bounds.)

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ubcache::format::{
    self, BackingEntry, BackingState, BackingSuperblock, BucketTable, CacheSuperblock, CheckpointEntry,
    Geometry, JournalEntry, Key, NodePtr, Ptr, RecordHeader, SB_A_OFFSET_BYTES, SB_B_OFFSET_BYTES, SB_BYTES,
    SbCopy, TableSlot, Uuid,
};

const ITERATIONS: usize = 20_000;

fn valid_cache_sb(rng: &mut StdRng) -> CacheSuperblock {
    let bucket = 1u64 << rng.gen_range(12..20);
    let geometry = Geometry::compute(bucket * rng.gen_range(40..4000), bucket, 4096.min(bucket)).unwrap();
    let mut sb = CacheSuperblock::new(geometry, Uuid(rng.r#gen()), Uuid(rng.r#gen()));
    sb.seq = rng.r#gen();
    for i in 0..rng.gen_range(0..4u32) {
        sb.backing.push(BackingEntry {
            uuid: Uuid(rng.r#gen()),
            dev_id: i,
            size_bytes: 1 << 30,
            data_offset_bytes: 8192,
        });
    }
    sb
}

fn valid_backing_sb(rng: &mut StdRng) -> BackingSuperblock {
    let mut sb = BackingSuperblock::new(Uuid(rng.r#gen()), rng.gen_range(16_384..1 << 40)).unwrap();
    if rng.gen_bool(0.5) {
        sb.state = if rng.gen_bool(0.5) { BackingState::Dirty } else { BackingState::Clean };
        sb.set_uuid = Uuid(rng.r#gen());
    }
    sb.seq = rng.r#gen();
    sb
}

fn random_key(rng: &mut StdRng) -> Key {
    let size = rng.gen_range(1..1000u32);
    Key {
        dev: rng.gen_range(0..4),
        end: rng.gen_range(u64::from(size)..1 << 40),
        size,
        ptr: Ptr { offset: rng.gen_range(0..1 << 40), generation: rng.r#gen() },
        dirty: rng.r#gen(),
    }
}

fn random_entry(rng: &mut StdRng) -> JournalEntry {
    match rng.gen_range(0..5) {
        0 => JournalEntry::KeyInsert(random_key(rng)),
        1 => JournalEntry::KeyReplace {
            key: random_key(rng),
            expected: if rng.r#gen() { Some(random_key(rng)) } else { None },
        },
        2 => {
            let start = rng.gen_range(0..1 << 40);
            JournalEntry::Invalidate { dev: rng.r#gen(), start, end: start + rng.gen_range(0..1000) }
        }
        3 => JournalEntry::BucketGen { bucket: rng.r#gen(), generation: rng.r#gen() },
        _ => JournalEntry::Checkpoint(CheckpointEntry {
            root: NodePtr { addr: rng.r#gen(), seq: rng.r#gen(), len: rng.r#gen(), csum: rng.r#gen() },
            table_slot: if rng.r#gen() { TableSlot::A } else { TableSlot::B },
            table_seq: rng.r#gen(),
            replay_from: rng.gen_range(1..1 << 40),
        }),
    }
}

fn valid_record(rng: &mut StdRng, set: Uuid) -> (Vec<u8>, u64) {
    let entries: Vec<JournalEntry> = (0..rng.gen_range(1..20)).map(|_| random_entry(rng)).collect();
    let mut bytes = Vec::new();
    for e in &entries {
        e.encode(&mut bytes).unwrap();
    }
    let sector = rng.gen_range(0..1000);
    let first_seq = rng.gen_range(1..1 << 40);
    let h = RecordHeader {
        entry_count: entries.len() as u32,
        first_seq,
        prev_seq: first_seq - 1,
        sector,
        prev_sector: rng.gen_range(0..1000),
        set_uuid: set,
        entries_len: bytes.len() as u32,
        record_sectors: RecordHeader::sectors_for(bytes.len()) as u32,
    };
    (format::encode_record(&h, &bytes).unwrap(), sector)
}

fn valid_table(rng: &mut StdRng) -> BucketTable {
    let n = rng.gen_range(0..300);
    BucketTable {
        seq: rng.r#gen(),
        gens: (0..n).map(|_| rng.r#gen()).collect(),
        prios: (0..n).map(|_| rng.r#gen()).collect(),
    }
}

/// Mutates `bytes` in one of several ways. `crc_at` is where a fixed-layout structure keeps the
/// crc of everything before it, so some mutations can fix it up.
fn mutate(rng: &mut StdRng, bytes: &mut Vec<u8>, crc_at: Option<usize>) {
    match rng.gen_range(0..6) {
        0 if !bytes.is_empty() => {
            for _ in 0..rng.gen_range(1..4) {
                let bit = rng.gen_range(0..bytes.len() * 8);
                bytes[bit / 8] ^= 1 << (bit % 8);
            }
        }
        1 if !bytes.is_empty() => {
            let at = rng.gen_range(0..bytes.len());
            bytes[at] = *[0u8, 1, 0x7f, 0x80, 0xff].get(rng.gen_range(0..5)).unwrap();
        }
        2 => {
            let len = rng.gen_range(0..=bytes.len());
            bytes.truncate(len);
        }
        3 => {
            for _ in 0..rng.gen_range(1..64) {
                bytes.push(rng.r#gen());
            }
        }
        _ => {
            // Field edit with a valid crc: exercises validation beyond the checksum.
            if bytes.len() >= 8 {
                let at = rng.gen_range(0..bytes.len() - 8);
                let v: u64 = match rng.gen_range(0..4) {
                    0 => 0,
                    1 => u64::MAX,
                    2 => rng.gen_range(0..300),
                    _ => rng.r#gen(),
                };
                let width = *[1usize, 2, 4, 8].get(rng.gen_range(0..4)).unwrap();
                bytes[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
            if let Some(c) = crc_at
                && c.checked_add(4).is_some_and(|end| bytes.len() >= end)
            {
                let crc = crc32c::crc32c(&bytes[..c]);
                bytes[c..c + 4].copy_from_slice(&crc.to_le_bytes());
            }
        }
    }
}

#[test]
fn superblock_decoders_survive_random_and_mutated_input() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    let mut accepted = 0;
    for i in 0..ITERATIONS {
        let copy = if rng.r#gen() { SbCopy::A } else { SbCopy::B };
        let mut bytes = if i % 10 == 0 {
            (0..rng.gen_range(0..5000)).map(|_| rng.r#gen()).collect()
        } else {
            valid_cache_sb(&mut rng).encode(copy).unwrap().to_vec()
        };
        if i % 4 != 3 {
            mutate(&mut rng, &mut bytes, Some(SB_BYTES - 4));
        }
        for offset in [SB_A_OFFSET_BYTES, SB_B_OFFSET_BYTES, rng.r#gen()] {
            if let Ok(sb) = CacheSuperblock::decode(&bytes, offset) {
                accepted += 1;
                let copy = if offset == SB_A_OFFSET_BYTES { SbCopy::A } else { SbCopy::B };
                assert_eq!(&sb.encode(copy).unwrap()[..], &bytes[..SB_BYTES], "iteration {i}");
                let _ = sb.features.open_mode();
            }
        }

        let mut bytes = if i % 10 == 0 {
            (0..rng.gen_range(0..5000)).map(|_| rng.r#gen()).collect()
        } else {
            valid_backing_sb(&mut rng).encode().to_vec()
        };
        if i % 4 != 3 {
            // The backing superblock's crc closes its first sector.
            mutate(&mut rng, &mut bytes, Some(format::BACKING_SB_RECORD_BYTES - 4));
        }
        if let Ok(sb) = BackingSuperblock::decode(&bytes) {
            accepted += 1;
            assert_eq!(&sb.encode()[..], &bytes[..SB_BYTES], "iteration {i}");
        }
    }
    assert!(accepted > ITERATIONS / 2, "too few valid inputs ({accepted}): the batch tests only rejection");
}

#[test]
fn journal_decoders_survive_random_and_mutated_input() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0002);
    let set = Uuid(rng.r#gen());
    let mut accepted = 0;
    for i in 0..ITERATIONS {
        let (mut bytes, sector) = if i % 10 == 0 {
            ((0..rng.gen_range(0..3000)).map(|_| rng.r#gen()).collect(), 0)
        } else {
            valid_record(&mut rng, set)
        };
        let crc_at =
            (bytes.len() >= 72).then(|| 72 + u32::from_le_bytes(bytes[64..68].try_into().unwrap()) as usize);
        if i % 4 != 3 {
            mutate(&mut rng, &mut bytes, crc_at);
        }
        let _ = RecordHeader::decode(&bytes);
        if let Ok((h, entries)) = format::decode_record(&bytes, sector, set) {
            accepted += 1;
            let mut enc = Vec::new();
            for e in &entries {
                e.encode(&mut enc).unwrap();
            }
            let again = format::encode_record(&h, &enc).unwrap();
            let covered = format::RECORD_HEADER_LEN + h.entries_len as usize + format::RECORD_TRAILER_LEN;
            assert_eq!(&again[..covered], &bytes[..covered], "iteration {i}");
        }
        // The entry decoder alone, with arbitrary counts.
        let count = if rng.r#gen() { rng.r#gen() } else { rng.gen_range(0..50) };
        let start = bytes.len().min(72);
        if let Ok(entries) = format::decode_entries(&bytes[start..], count) {
            let mut enc = Vec::new();
            for e in &entries {
                e.encode(&mut enc).unwrap();
            }
            assert_eq!(enc, &bytes[start..], "iteration {i}");
        }
    }
    eprintln!("records accepted: {accepted}");
    assert!(accepted > ITERATIONS / 4, "too few valid records ({accepted})");
}

#[test]
fn bucket_table_decoder_survives_random_and_mutated_input() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0003);
    let set = Uuid(rng.r#gen());
    let mut accepted = 0;
    for i in 0..ITERATIONS {
        let slot = if rng.r#gen() { TableSlot::A } else { TableSlot::B };
        let mut bytes = if i % 10 == 0 {
            (0..rng.gen_range(0..2000)).map(|_| rng.r#gen()).collect()
        } else {
            valid_table(&mut rng).encode(slot, set).unwrap()
        };
        let crc_at = (bytes.len() >= 48).then(|| {
            let n = u64::from_le_bytes(bytes[40..48].try_into().unwrap());
            48usize.saturating_add((n as usize).saturating_mul(3))
        });
        if i % 4 != 3 {
            mutate(&mut rng, &mut bytes, crc_at);
        }
        if let Ok(t) = BucketTable::decode(&bytes, slot, set) {
            accepted += 1;
            let again = t.encode(slot, set).unwrap();
            assert_eq!(&again[..], &bytes[..again.len()], "iteration {i}");
        }
    }
    assert!(accepted > ITERATIONS / 4, "too few valid tables ({accepted})");
}

/// Replay over damaged regions: a real journal (with checkpoints and wrap-around) whose region
/// then gets bit flips, zeroed sectors, sectors copied elsewhere and random garbage. Opening
/// must return a result in both recovery modes, never panic; what it returns must be a run of
/// consecutive seqs.
#[test]
fn journal_open_survives_damaged_regions() {
    use std::sync::Arc;
    use ubcache::dev::{BlockDev, MemDev};
    use ubcache::format::Region;
    use ubcache::journal::{Journal, JournalConfig, RecoveryMode};

    let region = Region { offset_bytes: 0, len_bytes: 32 * 1024 };
    let mut rng = StdRng::seed_from_u64(0x5eed_0004);
    let mut opened = 0;
    for round in 0..150 {
        let dev = Arc::new(MemDev::new(region.len_bytes));
        let set = Uuid(rng.r#gen());
        let cfg = JournalConfig { max_record_bytes: 4096, ..JournalConfig::default() };
        let j = Journal::create(dev.clone(), region, set, cfg).unwrap();
        // Every entry ever appended, by seq: replay may return any of them, never anything else.
        let mut history = std::collections::HashMap::new();
        for _ in 0..rng.gen_range(1..120) {
            let batch: Vec<JournalEntry> =
                (0..rng.gen_range(1..20)).map(|_| random_entry(&mut rng)).collect();
            let batch: Vec<JournalEntry> =
                batch.into_iter().filter(|e| !matches!(e, JournalEntry::Checkpoint(_))).collect();
            if batch.is_empty() {
                continue;
            }
            let Ok(last) = j.append(&batch) else { continue };
            let first = last + 1 - batch.len() as u64;
            history.extend(batch.into_iter().enumerate().map(|(i, e)| (first + i as u64, e)));
            if j.commit_all().is_err() || rng.gen_bool(0.2) {
                let from = j.last_appended_seq() + 1;
                let cp = JournalEntry::Checkpoint(CheckpointEntry {
                    root: NodePtr { addr: 1, seq: 1, len: 512, csum: 0 },
                    table_slot: TableSlot::A,
                    table_seq: 1,
                    replay_from: from,
                });
                j.append(&[cp]).unwrap();
                j.commit_all().unwrap();
                j.release_before(from).unwrap();
            }
        }
        drop(j);
        let (_, intact) = Journal::open(dev.clone(), region, set, cfg).unwrap();
        for (seq, e) in &intact.entries {
            assert_eq!(history.get(seq), Some(e), "round {round}: undamaged replay differs at {seq}");
        }
        let mut img = dev.snapshot();
        for _ in 0..rng.gen_range(1..6) {
            let sectors = img.len() / 512;
            let s = rng.gen_range(0..sectors);
            match rng.gen_range(0..4) {
                0 => {
                    let bit = rng.gen_range(0..512 * 8);
                    img[s * 512 + bit / 8] ^= 1 << (bit % 8);
                }
                1 => img[s * 512..(s + 1) * 512].fill(0),
                2 => {
                    let d = rng.gen_range(0..sectors);
                    let copy = img[s * 512..(s + 1) * 512].to_vec();
                    img[d * 512..(d + 1) * 512].copy_from_slice(&copy);
                }
                _ => img[s * 512..(s + 1) * 512].iter_mut().for_each(|b| *b = rng.r#gen()),
            }
        }
        for mode in [RecoveryMode::TolerateTailCorruption, RecoveryMode::AbsoluteConsistency] {
            let damaged = Arc::new(MemDev::new(region.len_bytes));
            damaged.write_at(&img, 0).unwrap();
            let damaged_again = damaged.clone();
            let cfg = JournalConfig { recovery_mode: mode, ..cfg };
            if let Ok((j, replay)) = Journal::open(damaged, region, set, cfg) {
                opened += 1;
                let seqs: Vec<u64> = replay.entries.iter().map(|(s, _)| *s).collect();
                // Consecutive, except where a checkpoint entry (not returned) sat.
                assert!(seqs.windows(2).all(|w| w[1] > w[0] && w[1] - w[0] <= 2), "round {round}: {seqs:?}");
                // Never a wrong or invented entry: whatever replay returns is what was appended
                // at that seq. (Entries can be missing only at the end: a record whose header
                // sector vanished entirely is indistinguishable from one never written.)
                for (seq, e) in &replay.entries {
                    assert_eq!(history.get(seq), Some(e), "round {round}: seq {seq} replayed wrongly");
                }
                // The reopened journal keeps working: a new record lands after what replay
                // found, and the next recovery returns the same entries plus it.
                let marker = JournalEntry::BucketGen { bucket: 1, generation: 1 };
                let seq = j.append(std::slice::from_ref(&marker)).unwrap();
                j.commit(seq).unwrap();
                drop(j);
                let tolerant = JournalConfig { recovery_mode: RecoveryMode::TolerateTailCorruption, ..cfg };
                let (_, again) = Journal::open(damaged_again.clone(), region, set, tolerant)
                    .unwrap_or_else(|e| panic!("round {round} {mode:?}: reopen after recovery failed: {e}"));
                let mut expected = replay.entries.clone();
                expected.push((seq, marker));
                assert_eq!(again.entries, expected, "round {round} {mode:?}");
            }
        }
    }
    eprintln!("damaged journals opened: {opened} of 300");
    assert!(opened > 50, "almost nothing opened ({opened}): damage too heavy to test replay");
}

/// Allocator rebuild from arbitrary tables and keys: a result, never a panic, and a rebuilt
/// allocator passes its own check.
#[test]
fn allocator_rebuild_survives_arbitrary_keys() {
    use ubcache::alloc::{AllocConfig, Allocator, LiveExtent};
    let g = Geometry::compute(1 << 20, 8192, 4096).unwrap();
    let n = g.nbuckets as usize;
    let mut rng = StdRng::seed_from_u64(0x5eed_0005);
    let mut ok = 0;
    for _ in 0..2000 {
        let table = BucketTable {
            seq: 1,
            gens: (0..n).map(|_| rng.gen_range(0..4)).collect(),
            prios: (0..n).map(|_| rng.r#gen()).collect(),
        };
        let device_sectors = g.nbuckets * u64::from(g.bucket_sectors);
        let keys: Vec<LiveExtent> = (0..rng.gen_range(0..30))
            .map(|_| LiveExtent {
                offset: if rng.gen_bool(0.9) { rng.gen_range(0..device_sectors + 10) } else { rng.r#gen() },
                sectors: if rng.gen_bool(0.9) { rng.gen_range(1..9) } else { rng.r#gen() },
                generation: rng.gen_range(0..4),
                dirty: rng.r#gen(),
            })
            .collect();
        let nodes: Vec<u64> = (0..rng.gen_range(0..4)).map(|_| rng.gen_range(0..device_sectors)).collect();
        if let Ok(a) = Allocator::rebuild(&g, &table, keys, nodes, AllocConfig::default()) {
            ok += 1;
            assert!(a.check().is_empty(), "{:?}", a.check());
        }
    }
    assert!(ok > 20, "rebuild accepted almost nothing ({ok})");
}
