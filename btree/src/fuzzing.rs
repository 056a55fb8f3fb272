//! The check shared by the cargo-fuzz target `fuzz/fuzz_targets/btree_node_decode.rs` and the
//! corpus replay test of the root crate (`tests/fuzz/corpus.rs`): decoding any bytes as a node
//! returns an error or a node that satisfies every invariant, never a panic.

use crate::format::{self, NodePtr};

/// The node size the fuzz inputs are decoded with (inputs are cut to it).
pub const FUZZ_NODE_SIZE: usize = 64 * 1024;

/// Decodes `data` (cut to [`FUZZ_NODE_SIZE`]) as a node image, as it is and with its checksums
/// resealed so the checks behind them are reached. Panics only if the decoder accepts a node
/// that breaks an invariant: that is the bug the fuzzer looks for.
pub fn node_decode(data: &[u8]) {
    let data = &data[..data.len().min(FUZZ_NODE_SIZE)];
    check_image(data);
    let mut resealed = data.to_vec();
    format::reseal_checksums(&mut resealed);
    check_image(&resealed);
}

#[allow(clippy::panic)] // The fuzzer's finding, reported the only way a fuzz target can.
fn check_image(img: &[u8]) {
    if let Ok(node) = format::decode_node(img, None, FUZZ_NODE_SIZE)
        && let Err(e) = format::check_decoded(&node, FUZZ_NODE_SIZE)
    {
        panic!("decoder accepted an invalid node: {e}");
    }
    // Through a pointer that covers the image exactly (and names the address the header claims).
    if let Some(addr) = img.get(16..24).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes) {
        let ptr = NodePtr {
            addr,
            seq: 0,
            len: u32::try_from(img.len()).unwrap_or(u32::MAX),
            csum: format::image_checksum(img),
        };
        let _ = format::decode_node(img, Some(&ptr), FUZZ_NODE_SIZE);
    }
}
