//! Decoding arbitrary node images returns an error or a valid node: never a panic, never an
//! allocation beyond the image size, never unbounded work. Each input is tried as is and with its
//! checksums resealed, so the fuzzer reaches the structural checks behind the crc32c.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ubcache_btree::format::{self, NodePtr};

/// Largest node size the fuzzer exercises (inputs are cut to it).
const NODE_SIZE: usize = 64 * 1024;

fn check(img: &[u8]) {
    if let Ok(node) = format::decode_node(img, None, NODE_SIZE) {
        if let Err(e) = format::check_decoded(&node, NODE_SIZE) {
            panic!("decoder accepted an invalid node: {e}");
        }
    }
    // Through a pointer that covers the image exactly.
    if img.len() >= 24 {
        let ptr = NodePtr {
            addr: u64::from_le_bytes(img[16..24].try_into().unwrap_or([0; 8])),
            seq: 0,
            len: img.len() as u32,
            csum: format::image_checksum(img),
        };
        let _ = format::decode_node(img, Some(&ptr), NODE_SIZE);
    }
}

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(NODE_SIZE)];
    check(data);
    let mut resealed = data.to_vec();
    format::reseal_checksums(&mut resealed);
    check(&resealed);
});
