//! The control protocol: one JSON object per line each way (see `docs/control.md`).
//!
//! Request: `{"cmd":"<verb>", ...arguments}`. Reply: `{"ok":true, ...results}` or
//! `{"ok":false,"kind":"<error kind>","error":"<message>"}`. Parsing is strict (unknown fields
//! are refused, so a typo in an argument name is an error rather than a silently ignored
//! argument) and every failure is a reply, never a dropped connection.

use super::knobs::{CacheMode, KnobSetting};
use super::{ControlTarget, CtlError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Version of the protocol, returned by `ping`. Bumped when a verb or field changes meaning.
pub const PROTOCOL_VERSION: u32 = 1;

/// Every verb, as the `cmd` field spells it.
pub const VERBS: [&str; 12] = [
    "ping",
    "stats",
    "modes",
    "set-mode",
    "set",
    "knobs",
    "flush",
    "flush-progress",
    "cancel-flush",
    "detach",
    "attach",
    "mark",
];

/// One request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Liveness and protocol version.
    Ping,
    /// Counters, windows and gauges.
    Stats,
    /// The cache mode of each export.
    Modes,
    /// Switch the cache mode (of one export, or of all when `export` is absent).
    SetMode {
        mode: CacheMode,
        #[serde(default)]
        flush_first: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        export: Option<String>,
    },
    /// Set one knob; `value` is a string (`"8M"`) or a number (`8388608`).
    Set {
        knob: String,
        value: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        export: Option<String>,
    },
    /// Every knob's value.
    Knobs {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        export: Option<String>,
    },
    /// Start writing back all dirty data.
    Flush,
    /// Where the flush stands.
    FlushProgress,
    /// Stop a running flush.
    CancelFlush,
    /// Flush the export's dirty data and detach it from the cache.
    Detach { export: String },
    /// Attach the export to the cache again.
    Attach { export: String },
    /// Put a named mark in the recording log (of one export, or of every recorded one).
    Mark {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        export: Option<String>,
    },
}

/// Parses one request line (without its newline).
///
/// # Errors
/// [`CtlError::Protocol`] for anything that is not a request object with a known `cmd`, and
/// for missing, mistyped or unknown arguments (the message names the verb).
pub fn parse_request(line: &[u8]) -> Result<Request, CtlError> {
    let text =
        std::str::from_utf8(line).map_err(|_| CtlError::Protocol("request is not UTF-8".to_owned()))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(CtlError::Protocol(
            "empty request (expected a JSON object such as {\"cmd\":\"stats\"})".to_owned(),
        ));
    }
    // serde_json bounds nesting depth (128), so a deeply nested line cannot overflow the stack.
    let value: Value =
        serde_json::from_str(text).map_err(|e| CtlError::Protocol(format!("malformed JSON: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(CtlError::Protocol(
            "request must be a JSON object such as {\"cmd\":\"stats\"}".to_owned(),
        ));
    };
    let cmd = match object.get("cmd") {
        Some(Value::String(cmd)) => cmd.clone(),
        Some(_) => return Err(CtlError::Protocol("\"cmd\" must be a string".to_owned())),
        None => return Err(CtlError::Protocol("missing \"cmd\" (the verb)".to_owned())),
    };
    if !VERBS.contains(&cmd.as_str()) {
        return Err(CtlError::Protocol(format!("unknown command {cmd:?} (known: {})", VERBS.join(", "))));
    }
    serde_json::from_value(value).map_err(|e| CtlError::Protocol(format!("bad {cmd:?} request: {e}")))
}

/// The reply to a request that failed.
#[must_use]
pub fn error_reply(error: &CtlError) -> Value {
    json!({ "ok": false, "kind": error.kind(), "error": error.message() })
}

fn ok_with(fields: Map<String, Value>) -> Value {
    let mut reply = Map::new();
    reply.insert("ok".to_owned(), Value::Bool(true));
    reply.extend(fields);
    Value::Object(reply)
}

fn ok() -> Value {
    ok_with(Map::new())
}

/// `[{"export": NAME, "mode": MODE, "state": "attached"|"detached"}, ...]`, in the order of
/// [`ControlTarget::modes`]; an export the target gives no state for counts as attached.
fn export_list(target: &dyn ControlTarget) -> Vec<Value> {
    let states = target.export_states();
    target
        .modes()
        .into_iter()
        .map(|(export, mode)| {
            let state = states
                .iter()
                .find(|(name, _)| *name == export)
                .map_or(super::ExportState::Attached, |(_, state)| *state);
            json!({ "export": export, "mode": mode, "state": state })
        })
        .collect()
}

fn field(name: &str, value: Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(name.to_owned(), value);
    m
}

fn to_value<T: Serialize>(what: &str, v: &T) -> Result<Value, CtlError> {
    serde_json::to_value(v).map_err(|e| CtlError::Failed(format!("cannot encode {what}: {e}")))
}

/// The text of a `set` value: a JSON string as is, a number in decimal.
fn value_text(value: &Value) -> Result<String, CtlError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(CtlError::Invalid("\"value\" must be a string or a number".to_owned())),
    }
}

/// Runs one request against the engine and builds the reply (`ok` true or false).
pub fn dispatch(target: &dyn ControlTarget, request: &Request) -> Value {
    match try_dispatch(target, request) {
        Ok(reply) => reply,
        Err(e) => error_reply(&e),
    }
}

fn try_dispatch(target: &dyn ControlTarget, request: &Request) -> Result<Value, CtlError> {
    Ok(match request {
        Request::Ping => ok_with(
            [
                ("protocol".to_owned(), json!(PROTOCOL_VERSION)),
                ("version".to_owned(), json!(env!("CARGO_PKG_VERSION"))),
            ]
            .into_iter()
            .collect(),
        ),
        Request::Stats => {
            let mut fields = field("stats", to_value("stats", &target.stats())?);
            fields.insert("exports".to_owned(), Value::Array(export_list(target)));
            ok_with(fields)
        }
        Request::Modes => ok_with(field("modes", Value::Array(export_list(target)))),
        Request::SetMode { mode, flush_first, export } => {
            target.set_mode(export.as_deref(), *mode, *flush_first)?;
            ok_with(field("mode", json!(mode)))
        }
        Request::Set { knob, value, export } => {
            let setting = KnobSetting::parse(knob, &value_text(value)?)?;
            target.set_knob(export.as_deref(), setting)?;
            ok_with(
                [
                    ("knob".to_owned(), json!(setting.name())),
                    ("value".to_owned(), json!(setting.value_text())),
                ]
                .into_iter()
                .collect(),
            )
        }
        Request::Knobs { export } => {
            let knobs: Map<String, Value> =
                target.knobs(export.as_deref())?.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            ok_with(field("knobs", Value::Object(knobs)))
        }
        Request::Flush => {
            target.start_flush()?;
            ok()
        }
        Request::FlushProgress => ok_with(field("progress", to_value("progress", &target.flush_progress())?)),
        Request::CancelFlush => {
            target.cancel_flush();
            ok()
        }
        Request::Detach { export } => {
            target.detach(export)?;
            ok()
        }
        Request::Attach { export } => {
            target.attach(export)?;
            ok()
        }
        Request::Mark { name, export } => {
            let marks: Vec<Value> = target
                .mark(export.as_deref(), name)?
                .into_iter()
                .map(|(export, entry)| json!({ "export": export, "entry": entry }))
                .collect();
            ok_with(field("marks", Value::Array(marks)))
        }
    })
}

/// Handles one request line: parse, dispatch, and the reply line (without newline).
pub fn handle_line(target: &dyn ControlTarget, line: &[u8]) -> String {
    let reply = match parse_request(line) {
        Ok(request) => dispatch(target, &request),
        Err(e) => error_reply(&e),
    };
    reply.to_string()
}

/// Decodes a reply line on the client side: the `ok:true` object, or the error it carries.
///
/// # Errors
/// The server's error rebuilt with [`CtlError::from_kind`], or [`CtlError::Protocol`] when
/// the line is not a reply.
pub fn parse_reply(line: &str) -> Result<Map<String, Value>, CtlError> {
    let value: Value = serde_json::from_str(line.trim())
        .map_err(|e| CtlError::Protocol(format!("malformed reply from server: {e}")))?;
    let Value::Object(object) = value else {
        return Err(CtlError::Protocol("reply is not a JSON object".to_owned()));
    };
    match object.get("ok") {
        Some(Value::Bool(true)) => Ok(object),
        Some(Value::Bool(false)) => {
            let message =
                object.get("error").and_then(Value::as_str).unwrap_or("unspecified error").to_owned();
            let kind = object.get("kind").and_then(Value::as_str).unwrap_or("protocol");
            Err(CtlError::from_kind(kind, message))
        }
        _ => Err(CtlError::Protocol("reply has no boolean \"ok\"".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_their_json_form() {
        let requests = [
            Request::Ping,
            Request::Stats,
            Request::SetMode { mode: CacheMode::Writeback, flush_first: true, export: Some("a".to_owned()) },
            Request::Set { knob: "sequential_cutoff".to_owned(), value: json!("8M"), export: None },
            Request::Knobs { export: None },
            Request::FlushProgress,
            Request::Detach { export: "disk0".to_owned() },
        ];
        for r in requests {
            let line = serde_json::to_string(&r).unwrap();
            assert_eq!(parse_request(line.as_bytes()).unwrap(), r, "{line}");
        }
    }

    #[test]
    fn bad_requests_get_messages_that_say_what_is_wrong() {
        let cases: [(&[u8], &str); 9] = [
            (b"", "empty request"),
            (b"{\"cmd\":", "malformed JSON"),
            (b"[1,2]", "must be a JSON object"),
            (b"{\"verb\":\"stats\"}", "missing \"cmd\""),
            (b"{\"cmd\":7}", "must be a string"),
            (b"{\"cmd\":\"explode\"}", "unknown command \"explode\""),
            (b"{\"cmd\":\"set-mode\",\"mode\":\"fast\"}", "unknown variant `fast`"),
            (b"{\"cmd\":\"set-mode\",\"mode\":\"none\",\"flush\":true}", "unknown field `flush`"),
            (b"{\"cmd\":\"detach\"}", "missing field `export`"),
        ];
        for (line, want) in cases {
            let err = parse_request(line).unwrap_err();
            assert!(matches!(err, CtlError::Protocol(_)), "{err:?}");
            assert!(err.to_string().contains(want), "{:?}: {err}", String::from_utf8_lossy(line));
        }
        assert!(parse_request(&[0xff, 0xfe]).unwrap_err().to_string().contains("UTF-8"));
    }

    #[test]
    fn error_replies_keep_their_kind_across_the_wire() {
        let err = CtlError::Busy("flush already running".to_owned());
        let line = error_reply(&err).to_string();
        let back = parse_reply(&line).unwrap_err();
        assert!(matches!(back, CtlError::Busy(ref m) if m == "flush already running"), "{back:?}");
        assert!(parse_reply("{\"ok\":1}").is_err());
        assert!(parse_reply("nonsense").is_err());
        assert_eq!(parse_reply("{\"ok\":true,\"x\":1}").unwrap()["x"], json!(1));
    }
}
