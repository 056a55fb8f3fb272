//! The three pieces together, the way the engine uses them: format a cache device, allocate and
//! journal keys, reclaim buckets (journalled generation bumps), checkpoint the bucket table into
//! alternating regions, then "crash" and recover from the device alone: superblock, journal
//! replay, bucket table named by the checkpoint, replayed generations, allocator rebuild. The
//! recovered generations and live/dirty counts must equal those before the crash, for every
//! bucket. (A plain key list stands in for the btree: the checkpoint keeps a copy of it as the
//! "root".)

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;
use ubcache::alloc::{AllocConfig, Allocator, LiveExtent, OpenKind, ReplacementPolicy};
use ubcache::dev::MemDev;
use ubcache::format::{
    self, CacheSuperblock, CheckpointEntry, Geometry, JournalEntry, Key, NodePtr, TableSlot, Uuid,
};
use ubcache::journal::{Journal, JournalConfig};

const DEV_BYTES: u64 = 1 << 20;

struct Engine {
    dev: Arc<MemDev>,
    geometry: Geometry,
    set: Uuid,
    journal: Journal,
    alloc: Allocator,
    /// The "btree": every key ever inserted (stale ones included, as a btree keeps them
    /// until GC).
    keys: Vec<Key>,
    /// Key lists of checkpoints, by checkpoint number (what a btree root would point to).
    roots: HashMap<u64, Vec<Key>>,
    table_slot: TableSlot,
    table_seq: u64,
}

impl Engine {
    fn format(dev: Arc<MemDev>) -> Engine {
        let geometry = Geometry::compute(DEV_BYTES, 8192, 4096).unwrap();
        let set = Uuid::random();
        let sb = CacheSuperblock::new(geometry, set, Uuid::random());
        format::write_cache_superblock(dev.as_ref(), &sb).unwrap();
        let alloc = Allocator::new(&geometry, AllocConfig::default());
        format::write_bucket_table(dev.as_ref(), &geometry, set, TableSlot::A, &alloc.table(1)).unwrap();
        let journal =
            Journal::create(dev.clone(), geometry.journal_region(), set, JournalConfig::default()).unwrap();
        let mut e = Engine {
            dev,
            geometry,
            set,
            journal,
            alloc,
            keys: Vec::new(),
            roots: HashMap::new(),
            table_slot: TableSlot::B,
            table_seq: 0,
        };
        e.checkpoint();
        e
    }

    /// Flush "btree" (remember the key list), write the table to the other region, journal the
    /// checkpoint, commit, release.
    fn checkpoint(&mut self) {
        self.table_seq += 1;
        self.table_slot = self.table_slot.other();
        self.roots.insert(self.table_seq, self.keys.clone());
        let table = self.alloc.table(self.table_seq);
        format::write_bucket_table(self.dev.as_ref(), &self.geometry, self.set, self.table_slot, &table)
            .unwrap();
        let replay_from = self.journal.last_appended_seq() + 1;
        let entry = JournalEntry::Checkpoint(CheckpointEntry {
            root: NodePtr { addr: self.table_seq, seq: 0, len: 0, csum: 0 },
            table_slot: self.table_slot,
            table_seq: self.table_seq,
            replay_from,
        });
        let seq = self.journal.append(&[entry]).unwrap();
        self.journal.commit(seq).unwrap();
        self.journal.release_before(replay_from).unwrap();
    }

    fn write(&mut self, dev_id: u32, start: u64, sectors: u32, dirty: bool) -> bool {
        let Ok(a) = self.alloc.alloc_sectors(OpenKind::Data, sectors) else { return false };
        let key =
            Key { dev: dev_id, end: start + u64::from(a.sectors), size: a.sectors, ptr: a.ptr(), dirty };
        assert!(self.alloc.add_live(a.offset, a.sectors, a.generation, dirty).unwrap());
        self.alloc.unpin(a.bucket).unwrap();
        self.keys.push(key);
        self.journal.append(&[JournalEntry::KeyInsert(key)]).unwrap();
        true
    }

    fn reclaim(&mut self, n: usize, seed: u64) {
        let changes = self.alloc.reclaim(ReplacementPolicy::Random, seed, n);
        let Some(last) = changes.last().map(|c| c.token) else { return };
        let entries: Vec<JournalEntry> = changes.iter().map(|c| c.entry()).collect();
        let seq = self.journal.append(&entries).unwrap();
        self.journal.commit(seq).unwrap();
        self.alloc.mark_gens_durable(last);
    }

    fn writeback(&mut self, i: usize) {
        let Some(k) = self.keys.get(i).copied() else { return };
        if !k.dirty {
            return;
        }
        let clean = Key { dirty: false, ..k };
        if self.alloc.set_clean(k.ptr.offset, k.size, k.ptr.generation).unwrap() {
            self.keys[i] = clean;
            self.journal.append(&[JournalEntry::KeyReplace { key: clean, expected: Some(k) }]).unwrap();
        }
    }
}

/// Recovery from the device alone.
fn recover(dev: &Arc<MemDev>, roots: &HashMap<u64, Vec<Key>>) -> Allocator {
    let read = format::read_cache_superblock(dev.as_ref()).unwrap();
    let g = read.sb.geometry;
    let (_, replay) =
        Journal::open(dev.clone(), g.journal_region(), read.sb.set_uuid, JournalConfig::default()).unwrap();
    let (_, cp) = replay.checkpoint.clone().expect("formatted with a checkpoint");
    let mut table =
        format::read_bucket_table(dev.as_ref(), &g, read.sb.set_uuid, cp.table_slot, cp.table_seq).unwrap();
    let mut keys = roots[&cp.root.addr].clone();
    for (_, e) in &replay.entries {
        match e {
            JournalEntry::KeyInsert(k) => keys.push(*k),
            JournalEntry::KeyReplace { key, expected: Some(old) } => {
                let at = keys.iter().position(|k| k == old).expect("replaced key present");
                keys[at] = *key;
            }
            JournalEntry::BucketGen { bucket, generation } => table.gens[*bucket as usize] = *generation,
            other => panic!("unexpected entry {other:?}"),
        }
    }
    Allocator::rebuild(&g, &table, keys.iter().map(LiveExtent::from), [], AllocConfig::default()).unwrap()
}

#[test]
fn recovered_generations_and_counts_equal_the_committed_state() {
    for seed in 0..8u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let dev = Arc::new(MemDev::new(DEV_BYTES));
        let mut e = Engine::format(dev.clone());
        let mut reclaimed = 0;
        for step in 0..600 {
            match rng.gen_range(0..10) {
                0..=5 => {
                    let start = rng.gen_range(0..1_000_000u64);
                    if !e.write(rng.gen_range(0..3), start, rng.gen_range(1..24), rng.gen_bool(0.5)) {
                        e.reclaim(4, step);
                    }
                }
                6 => {
                    let i = rng.gen_range(0..e.keys.len().max(1));
                    e.writeback(i);
                }
                7 => {
                    let before = e.alloc.stats().free_pending;
                    e.reclaim(rng.gen_range(1..4), step);
                    reclaimed += 1;
                    assert_eq!(e.alloc.stats().free_pending, before, "all gen changes were made durable");
                }
                8 => e.journal.commit_all().unwrap(),
                _ => {
                    if rng.gen_bool(0.3) {
                        e.checkpoint();
                    }
                }
            }
        }
        // Everything appended is committed; then the machine "crashes".
        e.journal.commit_all().unwrap();
        let before = e.alloc.clone();
        let roots = e.roots.clone();
        drop(e);
        let after = recover(&dev, &roots);
        for (b, (x, y)) in before.buckets().iter().zip(after.buckets()).enumerate() {
            assert_eq!(x.generation, y.generation, "seed {seed} bucket {b}: generation");
            assert_eq!(
                (x.live_sectors, x.dirty_sectors),
                (y.live_sectors, y.dirty_sectors),
                "seed {seed} bucket {b} ({:?} -> {:?})",
                x.state,
                y.state
            );
        }
        assert!(reclaimed > 10);
        assert!(after.check().is_empty(), "{:?}", after.check());
        assert!(before.buckets().iter().any(|b| b.generation > 0), "seed {seed}: no bucket was ever reused");
        // Recovery only reads: a second one from the same bytes gives the same allocator.
        let again = recover(&Arc::new(MemDev::from_bytes(dev.snapshot())), &roots);
        assert_eq!(again.buckets(), after.buckets());
    }
}
