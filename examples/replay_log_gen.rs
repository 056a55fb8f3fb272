//! Writes a synthetic recording log, for measuring `ubcache replay`:
//!
//! ```text
//! replay_log_gen LOG EXPORT_MIB LOG_MIB WRITE_KIB FLUSH_EVERY [SEED]
//! ```
//!
//! `LOG_MIB` of write data in writes of `WRITE_KIB` at random aligned offsets of an export of
//! `EXPORT_MIB`, a FLUSH after every `FLUSH_EVERY` writes, a mark every 100 flushes. The data is
//! pseudo-random (incompressible, never all zero), so every write is stored in full.

use std::io::Write;
use ubcache::record::format::{LogHeader, Record, WriteData};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        return Err("usage: replay_log_gen LOG EXPORT_MIB LOG_MIB WRITE_KIB FLUSH_EVERY [SEED]".into());
    }
    let export: u64 = args[2].parse::<u64>()? << 20;
    let total: u64 = args[3].parse::<u64>()? << 20;
    let write: u64 = args[4].parse::<u64>()? << 10;
    let flush_every: u64 = args[5].parse()?;
    let mut seed: u64 = args.get(6).map_or(Ok(1), |s| s.parse())?;
    if write == 0 || export < write || flush_every == 0 {
        return Err("write size must be non-zero and fit the export; FLUSH_EVERY at least 1".into());
    }
    let mut next = move || {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        seed ^ (seed >> 29)
    };
    let mut out = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&args[1])?);
    out.write_all(&LogHeader::new("bench", export, 512).encode()?)?;
    let (mut seq, mut flushes, mut written) = (0u64, 0u64, 0u64);
    let mut buf = Vec::with_capacity(write as usize + 64);
    let mut data = vec![0u8; write as usize];
    while written < total {
        for chunk in data.chunks_mut(8) {
            let word = next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        let offset = next() % (export / write) * write;
        buf.clear();
        Record::Write { offset, data: WriteData::Bytes(data.clone()), fua: false }.encode(seq, &mut buf)?;
        seq += 1;
        written += write;
        if written / write % flush_every == 0 {
            flushes += 1;
            Record::Flush { number: flushes }.encode(seq, &mut buf)?;
            seq += 1;
            if flushes % 100 == 0 {
                Record::Mark { name: format!("flush-{flushes}") }.encode(seq, &mut buf)?;
                seq += 1;
            }
        }
        out.write_all(&buf)?;
    }
    out.flush()?;
    eprintln!("{}: {seq} entries, {flushes} flushes, {written} bytes of writes", args[1]);
    Ok(())
}
