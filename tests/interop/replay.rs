//! `ubcache replay`: the replay half of recording.
//!
//! - Model-based: random sequences of writes, FUA writes, trims, zeroings, flushes and marks are
//!   encoded as a log; replaying to every end point must equal an in-memory model of the disk
//!   after that entry, and every `--unflushed` crash state must lie within what the durability
//!   contract allows (every flushed and FUA write present; each sector written since the last
//!   FLUSH either old or one of the values written to it since, never older than its last FUA).
//! - Bad input through the binary: torn and corrupt logs, foreign files, an existing `--out`,
//!   end points past the log, flags that do not go together.
//! - The `--check` loop: stops at the first failing point naming it, `--keep-going` counts, and a
//!   command that changes the image is refused.

use crate::support as common;

use common::s;
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use ubcache::record::format::{LogHeader, Record, WriteData};
use ubcache::record::replay::crash::Unflushed;
use ubcache::record::replay::image::ImageOptions;
use ubcache::record::replay::{EndPoint, ReplayRequest, replay};

const SECTOR: u64 = 512;
const SECTORS: u64 = 64;
const SIZE: u64 = SECTOR * SECTORS;

/// Encodes a log of `records` for an export of `size` bytes.
fn encode_log(size: u64, records: &[Record]) -> Vec<u8> {
    let mut out = LogHeader::new("", size, SECTOR as u32).encode().unwrap();
    for (seq, r) in records.iter().enumerate() {
        r.encode(seq as u64, &mut out).unwrap();
    }
    out
}

fn write_log(dir: &Path, records: &[Record]) -> PathBuf {
    let path = dir.join("log");
    std::fs::write(&path, encode_log(SIZE, records)).unwrap();
    path
}

fn write(sector: u64, data: Vec<u8>, fua: bool) -> Record {
    Record::Write { offset: sector * SECTOR, data: WriteData::Bytes(data), fua }
}

/// A test operation, sector-aligned as a kernel client sends them.
#[derive(Debug, Clone)]
enum TestOp {
    Write { sector: u64, sectors: u64, fill: u8, fua: bool },
    ZeroWrite { sector: u64, sectors: u64 },
    Trim { sector: u64, sectors: u64 },
    Zero { sector: u64, sectors: u64 },
    Flush,
    Mark(u8),
}

fn op_strategy() -> impl Strategy<Value = TestOp> {
    let range = (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=(SECTORS - s).min(8)));
    prop_oneof![
        6 => (range.clone(), 1u8..=255, prop::bool::weighted(0.2))
            .prop_map(|((sector, sectors), fill, fua)| TestOp::Write { sector, sectors, fill, fua }),
        1 => range.clone().prop_map(|(sector, sectors)| TestOp::ZeroWrite { sector, sectors }),
        1 => range.clone().prop_map(|(sector, sectors)| TestOp::Trim { sector, sectors }),
        1 => range.prop_map(|(sector, sectors)| TestOp::Zero { sector, sectors }),
        2 => Just(TestOp::Flush),
        1 => (0u8..4).prop_map(TestOp::Mark),
    ]
}

/// The records of `ops` (flushes numbered from 1) and the model: the disk after each entry.
fn build(ops: &[TestOp]) -> (Vec<Record>, Vec<Vec<u8>>) {
    let mut disk = vec![0u8; SIZE as usize];
    let (mut records, mut states, mut flushes) = (Vec::new(), Vec::new(), 0);
    for (i, op) in ops.iter().enumerate() {
        let span =
            |sector: u64, sectors: u64| (sector * SECTOR) as usize..((sector + sectors) * SECTOR) as usize;
        let record = match *op {
            TestOp::Write { sector, sectors, fill, fua } => {
                // Each sector gets a distinct value, so torn and reordered states are visible.
                let data: Vec<u8> = (0..sectors * SECTOR)
                    .map(|b| fill.wrapping_add((b / SECTOR) as u8).wrapping_add(i as u8))
                    .collect();
                disk[span(sector, sectors)].copy_from_slice(&data);
                write(sector, data, fua)
            }
            TestOp::ZeroWrite { sector, sectors } => {
                disk[span(sector, sectors)].fill(0);
                Record::Write {
                    offset: sector * SECTOR,
                    data: WriteData::Zeros(sectors * SECTOR),
                    fua: false,
                }
            }
            TestOp::Trim { sector, sectors } => {
                disk[span(sector, sectors)].fill(0);
                Record::Trim { offset: sector * SECTOR, len: sectors * SECTOR, fua: false }
            }
            TestOp::Zero { sector, sectors } => {
                disk[span(sector, sectors)].fill(0);
                Record::WriteZeroes {
                    offset: sector * SECTOR,
                    len: sectors * SECTOR,
                    fua: false,
                    no_hole: false,
                }
            }
            TestOp::Flush => {
                flushes += 1;
                Record::Flush { number: flushes }
            }
            TestOp::Mark(m) => Record::Mark { name: format!("m{m}") },
        };
        records.push(record);
        states.push(disk.clone());
    }
    (records, states)
}

fn request(log: &Path, out: &Path, end: EndPoint) -> ReplayRequest {
    ReplayRequest {
        log: log.to_path_buf(),
        out: out.to_path_buf(),
        end,
        unflushed: None,
        seed: 0,
        states: 1,
        image: ImageOptions { force: true, start_from: None },
    }
}

fn is_flush(r: &Record) -> bool {
    matches!(r, Record::Flush { .. })
}

fn is_fua(r: &Record) -> bool {
    matches!(
        r,
        Record::Write { fua: true, .. }
            | Record::Trim { fua: true, .. }
            | Record::WriteZeroes { fua: true, .. }
    )
}

/// Every end point of a log with the entry it resolves to.
fn end_points(records: &[Record]) -> Vec<(EndPoint, usize)> {
    let mut points = vec![(EndPoint::All, records.len() - 1)];
    let (mut flushes, mut fuas) = (0, 0);
    let mut marks_seen = std::collections::HashSet::new();
    for (i, r) in records.iter().enumerate() {
        points.push((EndPoint::Entry(i as u64), i));
        if is_flush(r) {
            flushes += 1;
            points.push((EndPoint::Flush(flushes), i));
        }
        if is_fua(r) {
            fuas += 1;
            points.push((EndPoint::Fua(fuas), i));
        }
        if let Record::Mark { name } = r {
            if marks_seen.insert(name.clone()) {
                points.push((EndPoint::Mark(name.clone()), i));
            }
        }
    }
    points
}

/// The window of a crash at `end` resolved to entry `at`: (base entry, last window entry), as
/// the replay documents it.
fn window(records: &[Record], end: &EndPoint, at: usize) -> (Option<usize>, usize) {
    let base = records[..=at].iter().rposition(is_flush);
    let last = match end {
        EndPoint::Flush(_) | EndPoint::All => {
            records[at + 1..].iter().position(is_flush).map_or(records.len() - 1, |p| at + p)
        }
        _ => at,
    };
    (base, last)
}

/// Checks `image` against the contract: for every sector, the allowed values are the base value
/// and the value after each window entry touching it, from the last FUA entry touching it on.
fn within_contract(image: &[u8], records: &[Record], states: &[Vec<u8>], base: Option<usize>, last: usize) {
    let zero = vec![0u8; SIZE as usize];
    let base_state = base.map_or(&zero, |b| &states[b]);
    for sector in 0..SECTORS {
        let span = (sector * SECTOR) as usize..((sector + 1) * SECTOR) as usize;
        let mut allowed: Vec<&[u8]> = vec![&base_state[span.clone()]];
        let start = base.map_or(0, |b| b + 1);
        for i in start..=last {
            let touches = match &records[i] {
                Record::Write { offset, data, .. } => span_overlaps(&span, *offset, data.len()),
                Record::Trim { offset, len, .. } | Record::WriteZeroes { offset, len, .. } => {
                    span_overlaps(&span, *offset, *len)
                }
                _ => false,
            };
            if touches {
                if is_fua(&records[i]) {
                    allowed.clear();
                }
                allowed.push(&states[i][span.clone()]);
            }
        }
        let got = &image[span];
        assert!(
            allowed.contains(&got),
            "sector {sector} holds a value the contract does not allow (window {base:?}..={last})"
        );
    }
}

fn span_overlaps(span: &std::ops::Range<usize>, offset: u64, len: u64) -> bool {
    (offset as usize) < span.end && (offset + len) as usize > span.start
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn replay_to_every_end_point_equals_the_model(ops in prop::collection::vec(op_strategy(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let (records, states) = build(&ops);
        let log = write_log(dir.path(), &records);
        let out = dir.path().join("img");
        for (end, at) in end_points(&records) {
            replay(&request(&log, &out, end.clone())).unwrap();
            prop_assert!(std::fs::read(&out).unwrap() == states[at], "replay to {} differs from the model", end);
        }
    }

    #[test]
    fn unflushed_states_lie_within_the_contract(ops in prop::collection::vec(op_strategy(), 1..40), seed in 0u64..1000) {
        let dir = tempfile::tempdir().unwrap();
        let (records, states) = build(&ops);
        let log = write_log(dir.path(), &records);
        let out = dir.path().join("img");
        for (end, at) in end_points(&records) {
            let (base, last) = window(&records, &end, at);
            for mode in [Unflushed::None, Unflushed::All, Unflushed::Random, Unflushed::Torn] {
                let mut req = request(&log, &out, end.clone());
                req.unflushed = Some(mode);
                req.seed = seed;
                replay(&req).unwrap();
                let image = std::fs::read(&out).unwrap();
                within_contract(&image, &records, &states, base, last);
                if mode == Unflushed::All {
                    prop_assert!(image == states[last], "--unflushed all at {} is not the state before the next flush", end);
                }
            }
        }
    }
}

/// `--unflushed none` keeps a FUA write of the window and drops the plain one; torn states cut
/// a multi-sector write at sector boundaries and, over many seeds, show prefixes, subsets,
/// whole writes and dropped writes.
#[test]
fn unflushed_none_keeps_fua_writes_and_torn_states_tear_at_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let records = vec![
        write(0, vec![1; 512], false),
        Record::Flush { number: 1 },
        write(0, vec![2; 4096], false),
        write(16, vec![3; 512], true),
        Record::Flush { number: 2 },
    ];
    let log = write_log(dir.path(), &records);
    let out = dir.path().join("img");
    let mut req = request(&log, &out, EndPoint::Flush(1));
    req.unflushed = Some(Unflushed::None);
    replay(&req).unwrap();
    let image = std::fs::read(&out).unwrap();
    assert_eq!(image[0], 1, "the flushed write is kept");
    assert_eq!(image[512], 0, "the unflushed write is dropped");
    assert_eq!(image[16 * 512], 3, "the FUA write is durable at its reply");

    let mut seen = std::collections::HashSet::new();
    for seed in 0..64 {
        req.unflushed = Some(Unflushed::Torn);
        req.seed = seed;
        replay(&req).unwrap();
        let image = std::fs::read(&out).unwrap();
        let sectors: Vec<u8> = (0..8).map(|i| image[i * 512]).collect();
        for i in 0..8 {
            assert!(
                image[i * 512..(i + 1) * 512].iter().all(|&b| b == sectors[i]),
                "sector {i} is torn inside"
            );
        }
        seen.insert(sectors);
    }
    assert!(seen.contains(&vec![2; 8]), "some state keeps the whole write");
    assert!(seen.contains([1, 0, 0, 0, 0, 0, 0, 0].as_slice()), "some state drops it");
    assert!(seen.len() > 4, "torn states vary: {seen:?}");
}

/// Several states get numbered paths and the seeds that rebuild them.
#[test]
fn states_are_written_to_numbered_images() {
    let dir = tempfile::tempdir().unwrap();
    let mut records = vec![Record::Flush { number: 1 }];
    records.extend((0..16).map(|i| write(i, vec![i as u8 + 1; 512], false)));
    let log = write_log(dir.path(), &records);
    let mut req = request(&log, &dir.path().join("state-{n}.img"), EndPoint::Flush(1));
    req.unflushed = Some(Unflushed::Random);
    req.seed = 40;
    req.states = 3;
    let written = replay(&req).unwrap();
    assert_eq!(written.iter().map(|w| w.seed).collect::<Vec<_>>(), vec![Some(40), Some(41), Some(42)]);
    let images: Vec<Vec<u8>> =
        (0..3).map(|i| std::fs::read(dir.path().join(format!("state-{i}.img"))).unwrap()).collect();
    assert!(images[0] != images[1] || images[1] != images[2], "three random states are not all the same");
    // State 1 alone, from its own seed, is the same image.
    req.out = dir.path().join("one.img");
    req.states = 1;
    req.seed = 41;
    replay(&req).unwrap();
    assert!(std::fs::read(dir.path().join("one.img")).unwrap() == images[1]);
}

/// Trims and zeroings read back as zeros even over a start image full of data.
#[test]
fn trims_and_zeroings_read_back_as_zeros_over_a_start_image() {
    let dir = tempfile::tempdir().unwrap();
    let start = dir.path().join("start.img");
    std::fs::write(&start, vec![0xaa; SIZE as usize]).unwrap();
    let records = vec![
        Record::Trim { offset: 0, len: 4096, fua: false },
        Record::WriteZeroes { offset: 8192, len: 4096, fua: false, no_hole: true },
        Record::Write { offset: 16384, data: WriteData::Zeros(512), fua: false },
    ];
    let log = write_log(dir.path(), &records);
    let out = dir.path().join("img");
    let mut req = request(&log, &out, EndPoint::All);
    req.image.start_from = Some(start);
    replay(&req).unwrap();
    let image = std::fs::read(&out).unwrap();
    assert!(image[..4096].iter().all(|&b| b == 0));
    assert!(image[4096..8192].iter().all(|&b| b == 0xaa));
    assert!(image[8192..12288].iter().all(|&b| b == 0));
    assert!(image[16384..16896].iter().all(|&b| b == 0));
    assert!(image[16896..].iter().all(|&b| b == 0xaa));
}

// ---- through the binary ----

fn ubcache(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::ubcache_bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A small log: a write, flush 1, a mark, a FUA write, a trim, flush 2.
fn small_log() -> Vec<Record> {
    vec![
        write(0, vec![b'A'; 512], false),
        Record::Flush { number: 1 },
        Record::Mark { name: "after mkfs".into() },
        write(1, vec![b'B'; 1024], true),
        Record::Trim { offset: 0, len: 512, fua: false },
        Record::Flush { number: 2 },
    ]
}

#[test]
fn list_shows_entries_points_and_totals() {
    let dir = tempfile::tempdir().unwrap();
    let log = write_log(dir.path(), &small_log());
    let (code, out, err) = ubcache(&["replay", s(&log), "--list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("flush 1") && out.contains("flush 2"), "{out}");
    assert!(
        out.contains("mark \"after mkfs\"") && out.contains("fua 1") && out.contains("fua-write"),
        "{out}"
    );
    assert!(out.contains("totals: 6 entries: 2 writes (1536 bytes), 1 trims"), "{out}");

    let (code, out, err) = ubcache(&["replay", s(&log), "--list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["entries"].as_array().unwrap().len(), 6);
    assert_eq!(v["entries"][3]["fua"], 1);
    assert_eq!(v["entries"][2]["mark"], "after mkfs");
    assert_eq!(v["totals"]["flushes"], 2);
    assert_eq!(v["end"]["state"], "clean");
}

#[test]
fn a_torn_tail_is_reported_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = encode_log(SIZE, &small_log());
    let log = dir.path().join("log");
    std::fs::write(&log, &bytes[..bytes.len() - 5]).unwrap();
    let (code, out, err) = ubcache(&["replay", s(&log), "--list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("torn tail at entry 5"), "{out}");
    assert!(out.contains("totals: 5 entries"), "{out}");
    // What precedes the tail replays; the torn flush is not there.
    let img = dir.path().join("img");
    let (code, _, err) = ubcache(&["replay", s(&log), "--out", s(&img), "--to-flush", "1"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = ubcache(&["replay", s(&log), "--out", s(&img), "--to-flush", "2", "--force"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("flush 2 is not in the log: it has 1 flushes") && err.contains("torn tail"),
        "{err}"
    );
}

#[test]
fn a_corrupt_record_is_an_error_naming_entry_and_offset_after_what_precedes_it() {
    let dir = tempfile::tempdir().unwrap();
    let records = small_log();
    let bytes = encode_log(SIZE, &records);
    // Offset of entry 3 (the FUA write): the header and three records before it.
    let header = encode_log(SIZE, &[]).len();
    let entry3 = encode_log(SIZE, &records[..3]).len();
    let mut damaged = bytes;
    damaged[entry3 + 40] ^= 0x10; // inside the FUA write's data
    let log = dir.path().join("log");
    std::fs::write(&log, &damaged).unwrap();
    assert!(header < entry3);
    let (code, out, err) = ubcache(&["replay", s(&log), "--list"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("mark \"after mkfs\""), "the entries before the damage are listed: {out}");
    assert!(err.contains(&format!("entry 3, byte offset {entry3}")), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    // Replaying what precedes the damage works; past it is an error.
    let img = dir.path().join("img");
    let (code, _, err) = ubcache(&["replay", s(&log), "--out", s(&img), "--to-mark", "after mkfs"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&img).unwrap()[0], b'A');
    let (code, _, err) = ubcache(&["replay", s(&log), "--out", s(&img), "--force", "--to-fua", "1"]);
    assert_eq!(code, 1);
    assert!(err.contains("FUA write 1 is not in the log") && err.contains("corrupt at entry 3"), "{err}");
}

#[test]
fn bad_requests_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let log = write_log(dir.path(), &small_log());
    let img = dir.path().join("img");
    std::fs::write(&img, b"precious").unwrap();
    let (code, _, err) = ubcache(&["replay", s(&log), "--out", s(&img), "--all"]);
    assert_eq!(code, 1);
    assert!(err.contains("exists: refusing to overwrite it without --force"), "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), b"precious");

    let (code, _, err) = ubcache(&["replay", s(&log), "--out", s(&img), "--force", "--to-flush", "3"]);
    assert_eq!(code, 1);
    assert!(err.contains("flush 3 is not in the log: it has 2 flushes"), "{err}");
    let (code, _, err) = ubcache(&["replay", s(&log), "--out", s(&img), "--force", "--to-mark", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("mark \"nope\" is not in the log: its marks are \"after mkfs\""), "{err}");
    let (code, _, err) = ubcache(&["replay", s(&log), "--out", s(&img), "--force", "--to-entry", "6"]);
    assert_eq!(code, 1);
    assert!(err.contains("entry 6 is not in the log: its entries are 0..=5"), "{err}");

    // Usage errors: exit 2.
    let (code, _, err) = ubcache(&["replay", s(&log), "--out", s(&img), "--force"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = ubcache(&["replay", s(&log), "--out", s(&img), "--all", "--to-flush", "1"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = ubcache(&[
        "replay",
        s(&log),
        "--out",
        s(&img),
        "--force",
        "--all",
        "--unflushed",
        "none",
        "--states",
        "2",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--states above 1 needs --unflushed random or torn"), "{err}");

    let foreign = dir.path().join("foreign");
    std::fs::write(&foreign, b"not a log at all, just some text that is long enough to hold a header")
        .unwrap();
    let (code, _, err) = ubcache(&["replay", s(&foreign), "--list"]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a ubcache recording log"), "{err}");
    let (code, _, err) = ubcache(&["replay", s(&dir.path().join("missing")), "--list"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read log"), "{err}");
}

/// A log whose byte 0 is 'A' at flush 1 and 2, 'B' at flush 3, 'C' at flush 4; the check fails
/// while byte 0 is 'B'.
fn check_log(dir: &Path) -> PathBuf {
    write_log(
        dir,
        &[
            Record::Flush { number: 1 },
            write(0, vec![b'A'; 512], false),
            Record::Flush { number: 2 },
            Record::Mark { name: "before B".into() },
            write(0, vec![b'B'; 512], false),
            Record::Flush { number: 3 },
            write(0, vec![b'C'; 512], false),
            Record::Flush { number: 4 },
        ],
    )
}

const NOT_B: &str = "test \"$(head -c 1 {image})\" != B";

#[test]
fn check_stops_at_the_first_failing_point_naming_entry_and_mark() {
    let dir = tempfile::tempdir().unwrap();
    let log = check_log(dir.path());
    let (code, out, err) = ubcache(&["replay", s(&log), "--check", NOT_B, "--each", "flush"]);
    assert_eq!(code, 1, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "one line per point up to the failure: {out}");
    assert!(lines[0].starts_with("flush 1 (entry 0") && lines[0].ends_with("ok"), "{out}");
    assert!(
        lines[2].starts_with("flush 3 (entry 5") && lines[2].contains("after mark \"before B\""),
        "{out}"
    );
    assert!(lines[2].contains("FAILED (exit status 1)"), "{out}");
    assert!(err.contains("check failed at flush 3 (entry 5"), "{err}");

    let (code, out, err) = ubcache(&["replay", s(&log), "--check", NOT_B, "--each", "flush", "--keep-going"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(err.contains("1 of 4 flush points failed; the first: flush 3"), "{err}");

    let (code, out, err) = ubcache(&["replay", s(&log), "--check", "true {image}", "--each", "mark"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("mark \"before B\" (entry 3") && out.contains("checked 1 mark points: all passed"),
        "{out}"
    );
}

#[test]
fn check_refuses_a_command_that_changes_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let log = check_log(dir.path());
    let img = dir.path().join("img");
    let (code, _, err) = ubcache(&[
        "replay",
        s(&log),
        "--out",
        s(&img),
        "--check",
        "sleep 0.05; echo x >> {image}",
        "--each",
        "flush",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("the check command changed the image at flush 1"), "{err}");
}

/// `{image}` is quoted for the shell, so a path with spaces and quotes is one word.
#[test]
fn check_quotes_the_image_path() {
    let dir = tempfile::tempdir().unwrap();
    let log = check_log(dir.path());
    let img = dir.path().join("it's an image");
    let (code, out, err) =
        ubcache(&["replay", s(&log), "--out", s(&img), "--check", "test -f {image}", "--each", "flush"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("checked 4 flush points: all passed"), "{out}");
}

/// `--force` replaces a stale image, never the replay's own input.
#[test]
fn out_is_never_the_log_or_the_start_image() {
    let dir = tempfile::tempdir().unwrap();
    let log = write_log(dir.path(), &small_log());
    let before = std::fs::read(&log).unwrap();
    let (code, _, err) = ubcache(&["replay", s(&log), "--out", s(&log), "--force", "--all"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is the log: refusing to overwrite it"), "{err}");
    let (code, _, err) =
        ubcache(&["replay", s(&log), "--out", s(&log), "--force", "--check", "true", "--each", "flush"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(std::fs::read(&log).unwrap(), before);

    let start = dir.path().join("start.img");
    std::fs::write(&start, vec![7u8; SIZE as usize]).unwrap();
    let (code, _, err) =
        ubcache(&["replay", s(&log), "--out", s(&start), "--force", "--all", "--start-from", s(&start)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is the start image"), "{err}");
    assert!(std::fs::read(&start).unwrap().iter().all(|&b| b == 7));
}

/// Points after damage in the middle of a log were never checked: the run fails after checking
/// what precedes it.
#[test]
fn check_over_a_damaged_log_fails_after_the_intact_points() {
    let dir = tempfile::tempdir().unwrap();
    let records = small_log();
    let mut bytes = encode_log(SIZE, &records);
    let entry3 = encode_log(SIZE, &records[..3]).len();
    bytes[entry3 + 40] ^= 0x01;
    let log = dir.path().join("log");
    std::fs::write(&log, &bytes).unwrap();
    let (code, out, err) = ubcache(&["replay", s(&log), "--check", "true", "--each", "flush"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("flush 1 (entry 1") && out.contains("checked 1 flush points"), "{out}");
    assert!(err.contains(&format!("entry 3, byte offset {entry3}")), "{err}");
}

// ---- the worked example: ext4 over nbdfuse + loop ----

const EXT4_TOOLS: &[&str] =
    &["nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "mount", "umount", "e2fsck", "debugfs", "mountpoint"];

/// Runs `examples/crash-test-ext4.sh MODE` against the binary under test.
fn crash_test_ext4(mode: &str) -> (i32, String, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/crash-test-ext4.sh");
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    // e2fsprogs and losetup live in sbin, which a test's PATH may lack.
    path.push(":/usr/sbin:/sbin");
    let mut cmd = Command::new("bash");
    cmd.arg(script).arg(mode).env("UBCACHE", common::ubcache_bin()).env("PATH", path);
    let out = common::run_bounded(&mut cmd, std::time::Duration::from_secs(600));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The worked example of docs/crash-testing.md: every flush point of a correct ext4 workload
/// passes e2fsck and the content verifier; the same workload with one fsync skipped is caught
/// at the first flush point after the file was declared durable.
#[test]
fn ext4_crash_test_example_finds_the_planted_bug() {
    if !common::require_tools(EXT4_TOOLS)
        || !common::require_root("the ext4 crash-test example (losetup, mount)")
    {
        return;
    }
    let (code, out, err) = crash_test_ext4("correct");
    assert_eq!(code, 0, "the correct workload must pass every point:\n{out}\n{err}");
    let passed: Vec<&str> = out.lines().filter(|l| l.contains("flush points: all passed")).collect();
    assert_eq!(passed.len(), 2, "both checks ran over every flush point:\n{out}");
    assert!(!out.contains("FAILED"), "{out}");

    let (code, out, err) = crash_test_ext4("buggy");
    assert_eq!(code, 1, "the skipped fsync must be caught:\n{out}\n{err}");
    let failed = out
        .lines()
        .find(|l| l.contains("FAILED"))
        .unwrap_or_else(|| panic!("no failing point:\n{out}\n{err}"));
    assert!(failed.contains("after mark \"durable-3\""), "{failed}");
    assert!(out.contains("work/f3 is missing or wrong"), "{out}");
}
