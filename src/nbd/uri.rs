//! NBD URIs (the NBD project's `doc/uri.md`): `nbd://HOST[:PORT][/EXPORT]` and
//! `nbd+unix:///[EXPORT]?socket=PATH`. The server prints them, the CLI prints them, and the
//! client and [`super::NbdDev`] parse them, all through this one module so that what one side
//! writes the other reads back.
//!
//! The export name is the URI's path without its leading `/` (so `nbd://host//disk` names the
//! export `/disk`, as the specification's own example shows). Both the name and the socket path
//! are percent-encoded except for RFC 3986 unreserved characters and `/`: a `/` is an ordinary
//! character in a URI path and in a query, so it is kept readable, while `?`, `#`, `%`, `&`,
//! spaces and non-ASCII bytes, which would change how the URI splits, are encoded.

use super::ListenAddr;

/// The port a URI without one means (IANA's NBD port).
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD URI points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UriTarget {
    /// `HOST:PORT`, with the default port filled in.
    Tcp(String),
    /// The Unix socket of `?socket=`.
    Unix(std::path::PathBuf),
}

/// The URI a client uses to reach `export_name` through `addr`. The default export `""` has no
/// path over TCP (`nbd://HOST:PORT`), and an empty one over a Unix socket.
#[must_use]
pub fn export_uri(addr: &ListenAddr, export_name: &str) -> String {
    let name = percent_encode(export_name);
    match addr {
        ListenAddr::Tcp(sock) if export_name.is_empty() => format!("nbd://{sock}"),
        ListenAddr::Tcp(sock) => format!("nbd://{sock}/{name}"),
        ListenAddr::Unix(path) => {
            format!("nbd+unix:///{name}?socket={}", percent_encode(&path.to_string_lossy()))
        }
    }
}

/// Percent-encodes every byte but RFC 3986 unreserved characters and `/`.
#[must_use]
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Parses an NBD URI into its target and export name; `None` when it is not one we can use (an
/// unknown scheme, no host, no `socket=` for a Unix socket, a bad `%` escape, or a name that is
/// not UTF-8).
#[must_use]
pub fn parse(uri: &str) -> Option<(UriTarget, String)> {
    if let Some(rest) = uri.strip_prefix("nbd://") {
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty() {
            return None;
        }
        let has_port = authority.rsplit_once(':').is_some_and(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
            && !authority.ends_with(']');
        let addr = if has_port { authority.to_owned() } else { format!("{authority}:{DEFAULT_PORT}") };
        Some((UriTarget::Tcp(addr), percent_decode(path)?))
    } else if let Some(rest) = uri.strip_prefix("nbd+unix://") {
        let rest = rest.strip_prefix('/')?;
        let (path, query) = rest.split_once('?')?;
        let socket = query.split('&').find_map(|kv| kv.strip_prefix("socket="))?;
        Some((UriTarget::Unix(percent_decode(socket)?.into()), percent_decode(path)?))
    } else {
        None
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_the_export_and_encode_odd_characters() {
        let tcp = ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap());
        assert_eq!(export_uri(&tcp, ""), "nbd://127.0.0.1:10809");
        assert_eq!(export_uri(&tcp, "disk 1"), "nbd://127.0.0.1:10809/disk%201");
        let v6 = ListenAddr::Tcp("[::1]:5".parse().unwrap());
        assert_eq!(export_uri(&v6, ""), "nbd://[::1]:5");
        let unix = ListenAddr::Unix("/tmp/a b/s.sock".into());
        assert_eq!(export_uri(&unix, ""), "nbd+unix:///?socket=/tmp/a%20b/s.sock");
        assert_eq!(export_uri(&unix, "d?x"), "nbd+unix:///d%3Fx?socket=/tmp/a%20b/s.sock");
        assert_eq!(percent_encode("disk-1_a.b~/x"), "disk-1_a.b~/x");
        assert_eq!(percent_encode("a b?&%#"), "a%20b%3F%26%25%23");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    /// The export-name table of the NBD URI specification (`doc/uri.md`, "NBD URI export
    /// name"), read by our parser; then every name we print parses back to itself, `/` included
    /// (the two printers once disagreed: one wrote `%2F`, the other `/`).
    #[test]
    fn export_names_follow_the_nbd_uri_specification_and_round_trip() {
        let tcp = |name: &str| (UriTarget::Tcp("example.com:10809".into()), name.to_owned());
        let table = [
            ("nbd://example.com/disk", "disk"),
            ("nbd://example.com/", ""),
            ("nbd://example.com", ""),
            ("nbd://example.com//disk", "/disk"),
            ("nbd://example.com/hello%20world", "hello world"),
        ];
        for (uri, name) in table {
            assert_eq!(parse(uri), Some(tcp(name)), "{uri}");
        }
        assert_eq!(
            parse("nbd+unix:///disk?socket=sock"),
            Some((UriTarget::Unix("sock".into()), "disk".into()))
        );
        let tcp_addr = ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap());
        assert_eq!(export_uri(&tcp_addr, "/disk"), "nbd://127.0.0.1:10809//disk", "the spec's own form");
        assert_eq!(export_uri(&tcp_addr, "a/b"), "nbd://127.0.0.1:10809/a/b");
        let unix_addr = ListenAddr::Unix("/run/a b/nbd.sock".into());
        for name in ["", "disk", "/disk", "a/b", "hello world", "d?x&y=1#z", "100%", "é"] {
            for addr in [&tcp_addr, &unix_addr] {
                let (target, parsed) = parse(&export_uri(addr, name)).expect(name);
                assert_eq!(parsed, name, "{addr:?}");
                match (addr, target) {
                    (ListenAddr::Tcp(sa), UriTarget::Tcp(t)) => assert_eq!(t, sa.to_string()),
                    (ListenAddr::Unix(p), UriTarget::Unix(t)) => assert_eq!(&t, p),
                    (a, t) => panic!("{a:?} parsed as {t:?}"),
                }
            }
        }
    }

    #[test]
    fn uris_parse_into_targets_and_export_names() {
        assert_eq!(
            parse("nbd://127.0.0.1:10809/disk"),
            Some((UriTarget::Tcp("127.0.0.1:10809".into()), "disk".into()))
        );
        assert_eq!(parse("nbd://localhost"), Some((UriTarget::Tcp("localhost:10809".into()), String::new())));
        assert_eq!(parse("nbd://[::1]:99/"), Some((UriTarget::Tcp("[::1]:99".into()), String::new())));
        assert_eq!(parse("nbd://[::1]/a"), Some((UriTarget::Tcp("[::1]:10809".into()), "a".into())));
        assert_eq!(
            parse("nbd+unix:///my%20disk?socket=/tmp/a%20b.sock"),
            Some((UriTarget::Unix("/tmp/a b.sock".into()), "my disk".into()))
        );
        for bad in ["http://x", "nbd://", "nbd+unix:///disk", "nbd+unix://x?socket=/s", "nbd://h/%zz"] {
            assert!(parse(bad).is_none(), "{bad} accepted");
        }
    }
}
