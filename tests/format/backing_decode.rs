//! The backing superblock codec and the choice between its two copies: layout, damage
//! detection (every bit of a copy), raw-image detection, and a bounded fuzz batch proving
//! the decoders never panic and accept only what they would encode themselves.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ubcache::dev::{BlockDev, MemDev, SimDev};
use ubcache::format::{
    self, BACKING_DATA_OFFSET_BYTES, BACKING_HEADER_BYTES, BACKING_SB_B_OFFSET_BYTES, BACKING_SB_BLOCK_BYTES,
    BACKING_SB_MAGIC, BACKING_SB_RECORD_BYTES, BackingSbCopy, BackingState, BackingSuperblock, FormatError,
    StoredCacheMode, Uuid,
};

const COPIES: [BackingSbCopy; 2] = [BackingSbCopy::A, BackingSbCopy::B];

fn sample(seq: u64) -> BackingSuperblock {
    let mut sb = BackingSuperblock::new(Uuid([0x11; 16]), 1 << 20).unwrap();
    sb.state = BackingState::Dirty;
    sb.set_uuid = Uuid([0x22; 16]);
    sb.cache_mode = StoredCacheMode::Writeback;
    sb.seq = seq;
    sb
}

/// The 8 KiB header as the writer leaves it.
fn header_of(sb: &BackingSuperblock) -> Vec<u8> {
    let mut h = sb.encode_copy(BackingSbCopy::A).to_vec();
    h.extend_from_slice(&sb.encode_copy(BackingSbCopy::B));
    assert_eq!(h.len() as u64, BACKING_HEADER_BYTES);
    h
}

fn mem_dev_with_header(header: &[u8], len: u64) -> MemDev {
    let dev = MemDev::new(len);
    dev.write_at(header, 0).unwrap();
    dev
}

#[test]
fn layout_keeps_every_field_and_the_crc_in_one_sector() {
    assert_eq!(BACKING_SB_RECORD_BYTES, 512);
    assert_eq!(BACKING_SB_B_OFFSET_BYTES, 4096);
    assert_eq!(BACKING_DATA_OFFSET_BYTES, 8192, "exports keep their size");
    let sb = sample(77);
    for copy in COPIES {
        let block = sb.encode_copy(copy);
        assert_eq!(block.len(), BACKING_SB_BLOCK_BYTES);
        assert_eq!(&block[..8], &BACKING_SB_MAGIC);
        assert!(block[BACKING_SB_RECORD_BYTES..].iter().all(|&b| b == 0), "nothing outside the first sector");
        let crc = u32::from_le_bytes(block[508..512].try_into().unwrap());
        assert_eq!(crc, crc32c::crc32c(&block[..508]));
        assert_eq!(u64::from_le_bytes(block[72..80].try_into().unwrap()), copy.offset_bytes(), "own address");
        assert_eq!(u64::from_le_bytes(block[80..88].try_into().unwrap()), 77, "seq");
        assert_eq!(BackingSuperblock::decode_copy(&block, copy).unwrap(), sb);
    }
    assert_eq!(sb.encode(), sb.encode_copy(BackingSbCopy::A));
    assert_eq!(BackingSuperblock::decode(&sb.encode()).unwrap(), sb);
    assert_eq!(sb.export_bytes(), (1 << 20) - 8192);
}

#[test]
fn a_copy_read_at_the_other_address_is_refused() {
    let sb = sample(3);
    let b_block = sb.encode_copy(BackingSbCopy::B);
    assert!(matches!(
        BackingSuperblock::decode_copy(&b_block, BackingSbCopy::A),
        Err(FormatError::WrongAddress { recorded: 4096, actual: 0 })
    ));
    // Copy B's block written over copy A: A is refused, B is used.
    let mut header = header_of(&sb);
    header[..4096].copy_from_slice(&b_block);
    let read = format::decode_backing_header(&header).unwrap().unwrap();
    assert_eq!(read.copy, BackingSbCopy::B);
    assert!(matches!(read.other_copy_error, Some(FormatError::WrongAddress { .. })));
}

/// Every single-bit flip anywhere in a copy's block is detected by the copy's decoder; with
/// the other copy intact the device still reads the right superblock and reports the damage.
#[test]
fn every_bit_flip_in_a_copy_is_detected_and_the_other_copy_used() {
    let sb = sample(12);
    let header = header_of(&sb);
    for copy in COPIES {
        let start = copy.offset_bytes() as usize;
        for bit in 0..BACKING_SB_BLOCK_BYTES * 8 {
            let mut damaged = header.clone();
            damaged[start + bit / 8] ^= 1 << (bit % 8);
            let block = &damaged[start..start + BACKING_SB_BLOCK_BYTES];
            assert!(BackingSuperblock::decode_copy(block, copy).is_err(), "{copy:?} bit {bit} not detected");
            let read = format::decode_backing_header(&damaged)
                .unwrap_or_else(|e| panic!("{copy:?} bit {bit}: one good copy must be enough, got {e}"))
                .unwrap_or_else(|| panic!("{copy:?} bit {bit}: read as a raw image"));
            assert_eq!(read.sb, sb, "{copy:?} bit {bit}");
            assert_ne!(read.copy, copy, "{copy:?} bit {bit}: the damaged copy was used");
            assert!(read.other_copy_error.is_some() && !read.copies_identical);
        }
    }
}

/// Both copies damaged: an error naming both, never "raw image" (which would serve the data
/// shifted by the header) and never a wrong superblock.
#[test]
fn both_copies_damaged_is_an_error_not_a_raw_image() {
    let sb = sample(5);
    let mut rng = StdRng::seed_from_u64(0xb5b_0002);
    for _ in 0..2000 {
        let mut header = header_of(&sb);
        for copy in COPIES {
            let bit = rng.gen_range(0..BACKING_SB_RECORD_BYTES * 8);
            header[copy.offset_bytes() as usize + bit / 8] ^= 1 << (bit % 8);
        }
        let has_magic = header[..8] == BACKING_SB_MAGIC || header[4096..4104] == BACKING_SB_MAGIC;
        match format::decode_backing_header(&header) {
            Err(FormatError::NoValidBackingSuperblock { .. }) => {}
            Ok(None) => assert!(!has_magic, "a header with the magic read as raw"),
            other => panic!("both copies damaged, got {other:?}"),
        }
    }
    // Through a device, with a magic intact: a clear corruption error.
    let mut header = header_of(&sb);
    header[20] ^= 1;
    header[4096 + 20] ^= 1;
    let dev = mem_dev_with_header(&header, 1 << 20);
    let err = format::read_backing_superblock(&dev).unwrap_err();
    assert!(matches!(err, FormatError::NoValidBackingSuperblock { .. }), "{err}");
    assert!(err.is_corruption());
    assert!(err.to_string().contains("copy A") && err.to_string().contains("copy B"), "{err}");
}

#[test]
fn raw_images_are_told_apart_from_superblocks() {
    // All zero, random data, and a device too small for a header: raw.
    assert!(format::read_backing_superblock(&MemDev::new(1 << 20)).unwrap().is_none());
    let mut rng = StdRng::seed_from_u64(0xb5b_0003);
    let random: Vec<u8> = (0..1 << 16).map(|_| rng.r#gen()).collect();
    assert!(format::read_backing_superblock(&MemDev::from_bytes(random)).unwrap().is_none());
    assert!(format::read_backing_superblock(&MemDev::new(4)).unwrap().is_none());
    assert!(format::read_backing_superblock(&MemDev::new(0)).unwrap().is_none());

    // Sector 0 overwritten (a partitioning tool, say): copy B still identifies the device.
    let sb = sample(30);
    let mut header = header_of(&sb);
    header[..512].fill(0);
    let read =
        format::read_backing_superblock_copies(&mem_dev_with_header(&header, 1 << 20)).unwrap().unwrap();
    assert_eq!((read.sb, read.copy), (sb, BackingSbCopy::B));
    assert!(matches!(read.other_copy_error, Some(FormatError::BadMagic { .. })));
}

/// A copy A rolled back by the device (a lost write of a durable rewrite) while copy B holds
/// the newer superblock of the same device: the higher seq wins.
#[test]
fn same_device_copies_pick_the_higher_seq() {
    let old = sample(40);
    let mut new = sample(41);
    new.state = BackingState::Clean;
    let mut header = header_of(&new);
    header[..4096].copy_from_slice(&old.encode_copy(BackingSbCopy::A));
    let read = format::decode_backing_header(&header).unwrap().unwrap();
    assert_eq!((read.sb, read.copy, read.copies_identical), (new.clone(), BackingSbCopy::B, false));

    // The normal interrupted rewrite: A new, B old. A wins.
    let mut header = header_of(&old);
    header[..4096].copy_from_slice(&new.encode_copy(BackingSbCopy::A));
    let read = format::decode_backing_header(&header).unwrap().unwrap();
    assert_eq!((read.sb, read.copy), (new.clone(), BackingSbCopy::A));

    // Equal seqs (a writer that did not bump it): A, written first, wins.
    let mut same_seq = new.clone();
    same_seq.state = BackingState::Dirty;
    let mut header = header_of(&new);
    header[..4096].copy_from_slice(&same_seq.encode_copy(BackingSbCopy::A));
    assert_eq!(format::decode_backing_header(&header).unwrap().unwrap().sb, same_seq);
}

/// Copies of different devices (copy B left over from an earlier format with a higher seq):
/// copy A, written first by the newer format, wins whatever the seqs say.
#[test]
fn copies_of_different_uuids_pick_copy_a() {
    let mut leftover = sample(1 << 40);
    leftover.uuid = Uuid([0xee; 16]);
    let fresh = sample(1);
    let mut header = header_of(&leftover);
    header[..4096].copy_from_slice(&fresh.encode_copy(BackingSbCopy::A));
    let read = format::decode_backing_header(&header).unwrap().unwrap();
    assert_eq!((read.sb, read.copy), (fresh, BackingSbCopy::A));
}

#[test]
fn writer_refuses_invalid_superblocks_without_writing() {
    let dev = SimDev::new(1 << 20);
    let mut bad = sample(2);
    bad.set_uuid = Uuid::NIL; // Dirty without a cache set.
    assert!(matches!(format::write_backing_superblock(&dev, &bad), Err(FormatError::Invalid(_))));
    let mut bad = sample(2);
    bad.data_offset_bytes = 4096; // data would overwrite copy B
    assert!(matches!(format::write_backing_superblock(&dev, &bad), Err(FormatError::Invalid(_))));
    let mut too_big = sample(2);
    too_big.size_bytes = 2 << 20;
    assert!(matches!(format::write_backing_superblock(&dev, &too_big), Err(FormatError::Invalid(_))));
    assert_eq!(dev.stats().writes, 0, "nothing may be written for a refused superblock");

    // A valid one: two copies, each synced before the next step.
    format::write_backing_superblock(&dev, &sample(2)).unwrap();
    let stats = dev.stats();
    assert_eq!((stats.writes, stats.syncs, stats.unsynced_writes), (2, 2, 0));
    let read = format::read_backing_superblock_copies(&dev).unwrap().unwrap();
    assert!(read.copies_identical && read.other_copy_error.is_none());
    assert_eq!(read.sb, sample(2));
}

#[test]
fn device_smaller_than_the_superblock_says_is_refused() {
    let sb = sample(1);
    let dev = mem_dev_with_header(&header_of(&sb), 64 * 1024);
    assert!(matches!(format::read_backing_superblock(&dev), Err(FormatError::Invalid(_))));
    // A header cut short by the device end: copy B is missing, not a panic.
    let mut short = sb.encode_copy(BackingSbCopy::A).to_vec();
    short.extend_from_slice(&[0; 100]);
    let read = format::decode_backing_header(&short).unwrap().unwrap();
    assert_eq!(read.copy, BackingSbCopy::A);
    assert!(matches!(read.other_copy_error, Some(FormatError::Truncated { .. })));
}

fn valid_random(rng: &mut StdRng) -> BackingSuperblock {
    let mut sb = BackingSuperblock::new(Uuid(rng.r#gen()), rng.gen_range(8193..1 << 50)).unwrap();
    match rng.gen_range(0..3) {
        0 => {}
        1 => {
            sb.state = BackingState::Clean;
            sb.set_uuid = Uuid(rng.r#gen());
        }
        _ => {
            sb.state = BackingState::Dirty;
            sb.set_uuid = Uuid(rng.r#gen());
        }
    }
    sb.cache_mode = [
        StoredCacheMode::Writethrough,
        StoredCacheMode::Writeback,
        StoredCacheMode::Writearound,
        StoredCacheMode::None,
    ][rng.gen_range(0..4)];
    sb.seq = rng.r#gen();
    sb
}

/// Mutates a header: bit flips, byte overwrites, field edits with the copy's crc fixed up (so
/// the checks behind the crc are reached), truncation, extension.
fn mutate(rng: &mut StdRng, h: &mut Vec<u8>) {
    for _ in 0..rng.gen_range(1..4) {
        match rng.gen_range(0..5) {
            0 if !h.is_empty() => {
                let bit = rng.gen_range(0..h.len() * 8);
                h[bit / 8] ^= 1 << (bit % 8);
            }
            1 | 2 => {
                let copy = COPIES[rng.gen_range(0..2)].offset_bytes() as usize;
                if h.len() >= copy + BACKING_SB_RECORD_BYTES {
                    let at = copy + rng.gen_range(0..BACKING_SB_RECORD_BYTES - 8);
                    let v: u64 = [0, u64::MAX, rng.gen_range(0..9000), rng.r#gen()][rng.gen_range(0..4)];
                    let width = [1usize, 2, 4, 8][rng.gen_range(0..4)];
                    h[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
                    let crc = crc32c::crc32c(&h[copy..copy + 508]);
                    h[copy + 508..copy + 512].copy_from_slice(&crc.to_le_bytes());
                }
            }
            3 => h.truncate(rng.gen_range(0..=h.len())),
            _ => h.extend((0..rng.gen_range(1..64)).map(|_| rng.r#gen::<u8>())),
        }
    }
}

/// Checks one input against every decoder: no panic, and whatever is accepted is exactly what
/// the encoder would write.
fn check_input(input: &[u8], accepted: &mut usize) {
    for copy in COPIES {
        if let Ok(sb) = BackingSuperblock::decode_copy(input, copy) {
            assert_eq!(&sb.encode_copy(copy)[..], &input[..BACKING_SB_BLOCK_BYTES]);
        }
    }
    let _ = BackingSuperblock::decode(input);
    if let Ok(Some(read)) = format::decode_backing_header(input) {
        *accepted += 1;
        let start = read.copy.offset_bytes() as usize;
        assert_eq!(&read.sb.encode_copy(read.copy)[..], &input[start..start + BACKING_SB_BLOCK_BYTES]);
    }
}

#[test]
fn fuzz_batch_decoders_never_panic_and_accept_only_canonical_copies() {
    let mut rng = StdRng::seed_from_u64(0xb5b_0004);
    let mut accepted = 0;
    const ITERATIONS: usize = 6000;
    for i in 0..ITERATIONS {
        let mut input = if i % 8 == 0 {
            let len = rng.gen_range(0..10_000);
            let mut v: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            // Random bytes behind a real magic, to get past the first check.
            if v.len() >= 8 && rng.gen_bool(0.5) {
                v[..8].copy_from_slice(&BACKING_SB_MAGIC);
            }
            v
        } else {
            header_of(&valid_random(&mut rng))
        };
        if i % 4 != 3 {
            mutate(&mut rng, &mut input);
        }
        check_input(&input, &mut accepted);
    }
    assert!(
        accepted > ITERATIONS / 2,
        "only {accepted} inputs accepted: the batch would test rejection only"
    );
}
