//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`, grown by `cargo fuzz run` and
//! kept because each input reached new code) through the same checks the cargo-fuzz targets
//! run, plus a bounded, seeded batch of mutations of those inputs and of random bytes. A crash
//! the fuzzer once found, once its input is added to the corpus, fails CI from then on.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

/// Mutated inputs per target, on top of the corpus itself.
const MUTATIONS: usize = 3_000;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (the corpus is committed with the fuzz targets)", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let inputs: Vec<_> = files.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect();
    assert!(inputs.len() >= 10, "{target}: only {} corpus inputs in {}", inputs.len(), dir.display());
    inputs
}

fn mutate(rng: &mut StdRng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..rng.gen_range(1..5) {
        match rng.gen_range(0..5) {
            0 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                v[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                v[i] = rng.r#gen();
            }
            2 => v.truncate(rng.gen_range(0..=v.len())),
            3 => v.extend((0..rng.gen_range(1..64)).map(|_| rng.r#gen::<u8>())),
            _ if v.len() >= 8 => {
                // A little-endian field set to a boundary value.
                let i = rng.gen_range(0..=v.len() - 8);
                let x: u64 = [0, 1, u64::MAX, u64::from(u32::MAX), 1 << 63][rng.gen_range(0..5)];
                v[i..i + 8].copy_from_slice(&x.to_le_bytes());
            }
            _ => {}
        }
    }
    v
}

fn replay(target: &str, check: impl Fn(&[u8])) {
    let inputs = corpus(target);
    for (path, data) in &inputs {
        // Name the input that fails, so it can be run under `cargo fuzz run <target> <file>`.
        eprintln!("{target}: {}", path.file_name().unwrap().to_string_lossy());
        check(data);
    }
    let mut rng = StdRng::seed_from_u64(0x0f0f_2026);
    for i in 0..MUTATIONS {
        let input = if i % 10 == 0 {
            (0..rng.gen_range(0..4096)).map(|_| rng.r#gen()).collect()
        } else {
            let base = rng.gen_range(0..inputs.len());
            mutate(&mut rng, &inputs[base].1)
        };
        check(&input);
    }
}

#[test]
fn nbd_request_corpus() {
    replay("nbd_request", ubcache::nbd::fuzzing::request_parse);
}

#[test]
fn nbd_option_corpus() {
    replay("nbd_option", |data| {
        ubcache::nbd::fuzzing::option_parse(data);
        if let Some((&0, session)) = data.split_first() {
            ubcache::nbd::fuzzing::server_session(session);
        }
    });
}

#[test]
fn superblock_decode_corpus() {
    replay("superblock_decode", ubcache::fuzzing::superblock_decode);
}

#[test]
fn journal_decode_corpus() {
    replay("journal_decode", ubcache::fuzzing::journal_decode);
}

#[test]
fn btree_node_decode_corpus() {
    replay("btree_node_decode", ubcache_btree::fuzzing::node_decode);
}

#[test]
fn btree_tree_open_corpus() {
    replay("btree_tree_open", ubcache_btree::fuzzing::tree_open);
}

#[test]
fn nbd_client_reply_corpus() {
    replay("nbd_client_reply", ubcache::nbd::fuzzing::client_reply);
}
