//! The fixed newstyle handshake: option haggling until an export is chosen.

use super::{ConnError, ExportState, Shared};
use crate::nbd::proto::{self, OptionHeader, handshake_flags, info, opt, rep};
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What a successful handshake hands to the transmission phase.
pub(super) struct Session {
    pub(super) export: Arc<ExportState>,
    pub(super) structured: bool,
    /// `base:allocation` was selected for this export: BLOCK_STATUS is allowed.
    pub(super) block_status: bool,
}

/// Longest option payload the server skips to keep the handshake going; longer ones end it.
const MAX_OPTION_DISCARD: u32 = 1 << 20;

/// Runs option haggling. `Ok(None)` means the client aborted cleanly.
pub(super) async fn handshake<R, W>(
    reader: &mut R,
    writer: &mut W,
    shared: &Shared,
) -> Result<Option<Session>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer
        .write_all(&proto::encode_greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES))
        .await?;
    writer.flush().await?;
    let mut flag_bytes = [0u8; 4];
    reader.read_exact(&mut flag_bytes).await?;
    let client_flags = proto::decode_client_flags(flag_bytes)?;
    let fixed = client_flags & proto::client_flags::FIXED_NEWSTYLE != 0;
    let no_zeroes = client_flags & proto::client_flags::NO_ZEROES != 0;
    let mut structured = false;
    // The export `base:allocation` was selected for (NBD_OPT_SET_META_CONTEXT); it counts only
    // if the client then opens that same export.
    let mut meta_context: Option<String> = None;
    let mut out = Vec::with_capacity(512);
    let mut payload = Vec::new();
    loop {
        let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
        reader.read_exact(&mut hdr).await?;
        let header = OptionHeader::decode(&hdr)?;
        let option = header.option;
        if !fixed && option != opt::EXPORT_NAME {
            // Plain newstyle knows no option replies: the spec says hang up.
            return Err(ConnError::Refused(
                "non-fixed newstyle client sent an option other than EXPORT_NAME",
            ));
        }
        if header.len > proto::MAX_OPTION_PAYLOAD {
            if option == opt::EXPORT_NAME {
                return Err(ConnError::Refused("EXPORT_NAME payload too long"));
            }
            // Say why, then skip the payload without storing it. A payload no real option could
            // need is not worth reading at all: the connection ends (the spec allows a hard
            // disconnect for a client that looks like a denial of service).
            out.clear();
            proto::encode_option_reply(&mut out, option, rep::ERR_TOO_BIG, b"option payload too large");
            writer.write_all(&out).await?;
            writer.flush().await?;
            if header.len > MAX_OPTION_DISCARD {
                return Err(ConnError::Refused("option payload of gigantic length"));
            }
            discard(reader, u64::from(header.len)).await?;
            continue;
        }
        payload.clear();
        payload.resize(header.len as usize, 0);
        reader.read_exact(&mut payload).await?;
        out.clear();
        match option {
            opt::EXPORT_NAME => {
                let name =
                    proto::parse_string(&payload).map_err(|_| ConnError::Refused("bad export name"))?;
                let Some(export) = shared.find(name).cloned() else {
                    // EXPORT_NAME cannot carry an error: the spec says terminate the session.
                    return Err(ConnError::Refused("EXPORT_NAME for an unknown export"));
                };
                out.extend_from_slice(&export.size.to_be_bytes());
                out.extend_from_slice(&export.flags(structured).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; proto::EXPORT_NAME_PADDING]);
                }
                writer.write_all(&out).await?;
                writer.flush().await?;
                let block_status = selected_for(&meta_context, &export);
                return Ok(Some(Session { export, structured, block_status }));
            }
            opt::ABORT => {
                proto::encode_option_reply(&mut out, option, rep::ACK, &[]);
                // The client may already have closed; that is fine.
                let _ = writer.write_all(&out).await;
                let _ = writer.flush().await;
                return Ok(None);
            }
            opt::LIST => {
                if payload.is_empty() {
                    for e in &shared.exports {
                        proto::encode_option_reply(
                            &mut out,
                            option,
                            rep::SERVER,
                            &proto::encode_rep_server(&e.export.name, &e.export.description),
                        );
                    }
                    proto::encode_option_reply(&mut out, option, rep::ACK, &[]);
                } else {
                    proto::encode_option_reply(&mut out, option, rep::ERR_INVALID, b"LIST takes no data");
                }
            }
            opt::INFO | opt::GO => match proto::InfoRequest::parse(&payload) {
                Err(proto::OptionParseError::Invalid(why)) => {
                    proto::encode_option_reply(&mut out, option, rep::ERR_INVALID, why.as_bytes());
                }
                Ok(request) => match shared.find(&request.name).cloned() {
                    None => {
                        proto::encode_option_reply(&mut out, option, rep::ERR_UNKNOWN, b"no such export");
                    }
                    Some(export) => {
                        encode_info_replies(&mut out, option, &export, &request, structured);
                        proto::encode_option_reply(&mut out, option, rep::ACK, &[]);
                        if option == opt::GO {
                            writer.write_all(&out).await?;
                            writer.flush().await?;
                            let block_status = selected_for(&meta_context, &export);
                            return Ok(Some(Session { export, structured, block_status }));
                        }
                    }
                },
            },
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = option == opt::SET_META_CONTEXT;
                match proto::MetaContextRequest::parse(&payload) {
                    Err(proto::OptionParseError::Invalid(why)) => {
                        proto::encode_option_reply(&mut out, option, rep::ERR_INVALID, why.as_bytes());
                    }
                    // The spec: SET needs structured replies, which carry the block status chunks.
                    Ok(_) if set && !structured => proto::encode_option_reply(
                        &mut out,
                        option,
                        rep::ERR_INVALID,
                        b"SET_META_CONTEXT needs structured replies first",
                    ),
                    Ok(request) => match shared.find(&request.export_name) {
                        None => {
                            proto::encode_option_reply(&mut out, option, rep::ERR_UNKNOWN, b"no such export");
                        }
                        Some(export) => {
                            // LIST with no query lists every context; "base:" lists the base ones.
                            let matches = |q: &String| q == proto::BASE_ALLOCATION || (!set && q == "base:");
                            let selected =
                                (!set && request.queries.is_empty()) || request.queries.iter().any(matches);
                            if selected {
                                let id = if set { proto::BASE_ALLOCATION_ID } else { 0 };
                                let payload = proto::encode_rep_meta_context(id, proto::BASE_ALLOCATION);
                                proto::encode_option_reply(&mut out, option, rep::META_CONTEXT, &payload);
                            }
                            if set {
                                // Each SET replaces the previous selection.
                                meta_context = selected.then(|| export.export.name.clone());
                            }
                            proto::encode_option_reply(&mut out, option, rep::ACK, &[]);
                        }
                    },
                }
            }
            opt::STRUCTURED_REPLY => {
                if payload.is_empty() {
                    structured = true;
                    proto::encode_option_reply(&mut out, option, rep::ACK, &[]);
                } else {
                    proto::encode_option_reply(
                        &mut out,
                        option,
                        rep::ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    );
                }
            }
            _ => proto::encode_option_reply(&mut out, option, rep::ERR_UNSUP, b"option not supported"),
        }
        writer.write_all(&out).await?;
        writer.flush().await?;
    }
}

/// Whether `base:allocation` was selected for `export`.
fn selected_for(meta_context: &Option<String>, export: &ExportState) -> bool {
    meta_context.as_deref() == Some(export.export.name.as_str())
}

fn encode_info_replies(
    out: &mut Vec<u8>,
    option: u32,
    export: &ExportState,
    request: &proto::InfoRequest,
    structured: bool,
) {
    // NBD_INFO_EXPORT is always sent; the others when asked for.
    let flags = export.flags(structured);
    proto::encode_option_reply(out, option, rep::INFO, &proto::encode_info_export(export.size, flags));
    let asked = |t| request.requests.contains(&t);
    if asked(info::NAME) {
        let payload = proto::encode_info_string(info::NAME, &export.export.name);
        proto::encode_option_reply(out, option, rep::INFO, &payload);
    }
    if asked(info::DESCRIPTION) {
        let desc = proto::truncate_to_char_boundary(&export.export.description, proto::MAX_STRING_LEN);
        proto::encode_option_reply(
            out,
            option,
            rep::INFO,
            &proto::encode_info_string(info::DESCRIPTION, desc),
        );
    }
    if asked(info::BLOCK_SIZE) {
        // Any byte offset and length works (the devices handle partial sectors); one page is
        // the efficient size; one request carries at most MAX_PAYLOAD.
        let payload = proto::encode_info_block_size(1, proto::PREFERRED_BLOCK_SIZE, proto::MAX_PAYLOAD);
        proto::encode_option_reply(out, option, rep::INFO, &payload);
    }
}

/// Reads and drops `n` bytes through a small fixed buffer.
pub(super) async fn discard<R: AsyncRead + Unpin>(reader: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}
