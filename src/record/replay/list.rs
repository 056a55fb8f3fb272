//! `ubcache replay LOG --list [--json]`: every entry with its numbers, offsets and sizes, the
//! flush, FUA and mark points, totals, and how the log ends.

use super::index::{EntryInfo, LogEnd, LogIndex, Op, Totals};
use std::fmt::Write as _;

/// The listing as text: a header line, one line per entry, totals, and how the log ends.
pub fn text(index: &LogIndex) -> String {
    let h = &index.header;
    let mut out = format!(
        "log of export {:?}: {} bytes, sector size {}, format version {}, recording {}\n",
        h.export_name, h.export_size, h.sector_size, h.version, h.uuid
    );
    let _ = writeln!(
        out,
        "{:>10} {:>14}  {:<10} {:>14} {:>10}  point",
        "entry", "log offset", "kind", "offset", "length"
    );
    for e in &index.entries {
        let (offset, len) = e
            .op
            .range()
            .map_or((String::new(), String::new()), |r| (r.start.to_string(), (r.end - r.start).to_string()));
        let _ = writeln!(
            out,
            "{:>10} {:>14}  {:<10} {offset:>14} {len:>10}  {}",
            e.number,
            e.log_offset,
            e.op.kind(),
            point(e)
        );
    }
    let t = index.totals();
    out.push_str(&totals_line(&t));
    if let LogEnd::TornTail { .. } = index.end {
        let _ = writeln!(out, "{}", index.end.describe());
    }
    out
}

/// The point an entry is, as `--list` and `--check` name it ("flush 3", "fua 2", "mark \"x\"").
pub fn point(e: &EntryInfo) -> String {
    match (&e.op, e.flush, e.fua) {
        (Op::Mark { name }, _, _) => format!("mark {name:?}"),
        (_, Some(n), _) => format!("flush {n}"),
        (_, _, Some(n)) => format!("fua {n}"),
        _ => String::new(),
    }
}

fn totals_line(t: &Totals) -> String {
    format!(
        "totals: {} entries: {} writes ({} bytes), {} trims and {} zeroings ({} bytes), {} FUA points, {} flushes, {} marks\n",
        t.entries,
        t.writes,
        t.bytes_written,
        t.trims,
        t.zeroes,
        t.bytes_zeroed,
        t.fua_points,
        t.flushes,
        t.marks
    )
}

/// The listing as one JSON document.
pub fn json(index: &LogIndex) -> serde_json::Value {
    let h = &index.header;
    let entries: Vec<serde_json::Value> = index
        .entries
        .iter()
        .map(|e| {
            let mut v = serde_json::json!({
                "entry": e.number,
                "log_offset": e.log_offset,
                "kind": e.op.kind(),
            });
            if let Some(r) = e.op.range() {
                v["offset"] = r.start.into();
                v["length"] = (r.end - r.start).into();
            }
            if let Some(n) = e.flush {
                v["flush"] = n.into();
            }
            if let Some(n) = e.fua {
                v["fua"] = n.into();
            }
            if let Op::Mark { name } = &e.op {
                v["mark"] = name.clone().into();
            }
            v
        })
        .collect();
    let end = match &index.end {
        LogEnd::Clean => serde_json::json!({ "state": "clean" }),
        LogEnd::TornTail { entry, offset, detail } => {
            serde_json::json!({ "state": "torn", "entry": entry, "offset": offset, "detail": detail })
        }
        LogEnd::Corrupt { entry, offset, detail } => {
            serde_json::json!({ "state": "corrupt", "entry": entry, "offset": offset, "detail": detail })
        }
    };
    serde_json::json!({
        "export": h.export_name,
        "export_size": h.export_size,
        "sector_size": h.sector_size,
        "version": h.version,
        "uuid": h.uuid.to_string(),
        "entries": entries,
        "totals": index.totals(),
        "end": end,
    })
}
