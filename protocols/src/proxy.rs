//! Behind a load balancer: the PROXY protocol (v1 text and v2 binary, as HAProxy specifies
//! them) read at the start of a connection, and the `Forwarded` / `X-Forwarded-For` headers of
//! HTTP requests, each believed only from trusted proxies (docs/operations.md "Behind a load
//! balancer").

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use sluice_config::ProxyConfig;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 header's signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// The longest v2 address block and TLVs Sluice reads (HAProxy's own limit is 536 bytes in
/// all); longer headers are refused.
const V2_MAX_BODY: usize = 520;

/// A listener's proxy settings, shared by its connections.
pub type ProxySettings = Arc<ProxyConfig>;

/// Reads the PROXY protocol header at the start of `io` within `timeout`: the client's address
/// it carries, `None` for a header that carries none (v2 `LOCAL` — a balancer's own health
/// check — or v1 `UNKNOWN`), or why the connection is to be closed. Reads exactly the header's
/// bytes, so what follows is the client's own stream.
pub async fn read_header<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> Result<Option<SocketAddr>, String> {
    tokio::time::timeout(timeout, read(io))
        .await
        .unwrap_or_else(|_| Err(format!("no PROXY header within {} ms", timeout.as_millis())))
}

async fn read<R: AsyncRead + Unpin>(io: &mut R) -> Result<Option<SocketAddr>, String> {
    let io_err = |e: std::io::Error| format!("reading the PROXY header: {e}");
    // 15 bytes are in every header: `PROXY UNKNOWN\r\n` is the shortest v1 one, and v2's fixed
    // part is 16.
    let mut head = [0u8; 16];
    io.read_exact(&mut head[..15]).await.map_err(io_err)?;
    if head[..12] == V2_SIGNATURE {
        io.read_exact(&mut head[15..16]).await.map_err(io_err)?;
        let len = u16::from_be_bytes([head[14], head[15]]) as usize;
        if len > V2_MAX_BODY {
            return Err(format!("PROXY v2 header of {len} bytes is too long"));
        }
        let mut body = vec![0u8; len];
        io.read_exact(&mut body).await.map_err(io_err)?;
        return parse_v2(head[12], head[13], &body);
    }
    if &head[..6] != b"PROXY " {
        return Err("the connection does not start with a PROXY protocol header".into());
    }
    let mut line = head[..15].to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err("PROXY v1 header without CRLF within 107 bytes".into());
        }
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await.map_err(io_err)?;
        line.push(b[0]);
    }
    parse_v1(&line)
}

/// A v1 line, `PROXY TCP4 <src> <dst> <sport> <dport>\r\n` or `PROXY UNKNOWN…\r\n`.
pub fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, String> {
    let text = std::str::from_utf8(line)
        .ok()
        .and_then(|t| t.strip_suffix("\r\n"))
        .ok_or("PROXY v1 header is not a text line")?;
    let parts: Vec<&str> = text.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        [
            "PROXY",
            family @ ("TCP4" | "TCP6"),
            src,
            _dst,
            sport,
            _dport,
        ] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| format!("PROXY v1 source `{src}` is not an address"))?;
            if ip.is_ipv4() != (*family == "TCP4") {
                return Err(format!("PROXY v1 source `{src}` is not {family}"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| format!("PROXY v1 source port `{sport}` is not a port"))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(format!(
            "malformed PROXY v1 header `{}`",
            text.escape_debug()
        )),
    }
}

/// A v2 header's version/command byte, family byte and body.
pub fn parse_v2(ver_cmd: u8, family: u8, body: &[u8]) -> Result<Option<SocketAddr>, String> {
    if ver_cmd >> 4 != 2 {
        return Err(format!("PROXY v2 header with version {}", ver_cmd >> 4));
    }
    match ver_cmd & 0x0f {
        0 => return Ok(None), // LOCAL: the balancer's own connection
        1 => {}
        c => return Err(format!("PROXY v2 header with unknown command {c}")),
    }
    let short = || {
        format!(
            "PROXY v2 address block of {} bytes is too short",
            body.len()
        )
    };
    match family >> 4 {
        // AF_INET: src, dst (4 bytes each), sport, dport.
        1 => {
            let b = body.get(..12).ok_or_else(short)?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            Ok(Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([b[8], b[9]]),
            )))
        }
        // AF_INET6: 16 bytes each.
        2 => {
            let b = body.get(..36).ok_or_else(short)?;
            let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&b[..16]).expect("16 bytes"));
            Ok(Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([b[32], b[33]]),
            )))
        }
        // AF_UNSPEC, AF_UNIX: no client address to take.
        0 | 3 => Ok(None),
        f => Err(format!("PROXY v2 header with unknown family {f}")),
    }
}

/// The client's address per the request's forwarding headers, when the connection's peer is a
/// trusted proxy: `Forwarded` (RFC 7239) `for=` entries if present, else `X-Forwarded-For`,
/// walked from the nearest hop back; the first address that is not itself a trusted proxy is
/// the client. `None` (keep the peer) when the peer is not trusted, the headers are absent, or
/// an entry is not an address (`unknown`, an obfuscated identifier, garbage).
pub fn forwarded_client(
    proxy: &ProxyConfig,
    peer: SocketAddr,
    headers: &http::HeaderMap,
) -> Option<IpAddr> {
    if !proxy.forwarded_headers || !proxy.trusts(peer.ip()) {
        return None;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    let forwarded = headers.get_all(http::header::FORWARDED);
    if forwarded.iter().next().is_some() {
        for value in forwarded {
            for element in value.to_str().ok()?.split(',') {
                let node = element.split(';').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    k.trim().eq_ignore_ascii_case("for").then(|| v.trim())
                })?;
                hops.push(node_address(node)?);
            }
        }
    } else {
        for value in headers.get_all("x-forwarded-for") {
            for entry in value.to_str().ok()?.split(',') {
                hops.push(node_address(entry.trim())?);
            }
        }
    }
    // Bounded: a header of thousands of hops is looked at only from its near end.
    hops.iter()
        .rev()
        .take(32)
        .copied()
        .find(|ip| !proxy.trusts(*ip))
}

/// An address of a forwarding entry: `192.0.2.7`, `"[2001:db8::1]:4711"`, `192.0.2.7:80`.
fn node_address(node: &str) -> Option<IpAddr> {
    let node = node.trim_matches('"');
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = node.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    node.strip_prefix('[')
        .and_then(|n| n.split(']').next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(trusted: &[&str], forwarded: bool) -> ProxyConfig {
        ProxyConfig {
            protocol: true,
            trusted_proxies: trusted.iter().map(|t| t.parse().unwrap()).collect(),
            forwarded_headers: forwarded,
        }
    }

    #[tokio::test]
    async fn v1_and_v2_headers_are_read_to_their_last_byte() {
        let mut v1: &[u8] = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 8080\r\nGET / HTTP/1.1\r\n";
        let got = read_header(&mut v1, Duration::from_secs(1)).await.unwrap();
        assert_eq!(got, Some("203.0.113.7:51000".parse().unwrap()));
        assert_eq!(v1, b"GET / HTTP/1.1\r\n");

        let mut v1: &[u8] = b"PROXY TCP6 2001:db8::7 ::1 4711 80\r\nrest";
        let got = read_header(&mut v1, Duration::from_secs(1)).await.unwrap();
        assert_eq!(got, Some("[2001:db8::7]:4711".parse().unwrap()));
        let mut unknown: &[u8] = b"PROXY UNKNOWN\r\nx";
        assert_eq!(
            read_header(&mut unknown, Duration::from_secs(1)).await,
            Ok(None)
        );
        assert_eq!(unknown, b"x");

        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 12 + 5]);
        v2.extend_from_slice(&[198, 51, 100, 9, 10, 0, 0, 1, 0x1f, 0x90, 0x00, 0x50]);
        v2.extend_from_slice(&[0x04, 0, 2, b'h', b'i']); // a TLV, skipped
        v2.extend_from_slice(b"\x10MQTT");
        let mut r = &v2[..];
        let got = read_header(&mut r, Duration::from_secs(1)).await.unwrap();
        assert_eq!(got, Some("198.51.100.9:8080".parse().unwrap()));
        assert_eq!(r, b"\x10MQTT");
        // LOCAL: the balancer's health check.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(
            read_header(&mut &local[..], Duration::from_secs(1)).await,
            Ok(None)
        );
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PROXY TCP4 999.1.1.1 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 ::1 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 99999 2\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            &[b'P'; 200],
            b"short",
        ] {
            let mut r = bad;
            assert!(
                read_header(&mut r, Duration::from_secs(1)).await.is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut long = V2_SIGNATURE.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(
            read_header(&mut &long[..], Duration::from_secs(1))
                .await
                .is_err()
        );
        let mut v3 = V2_SIGNATURE.to_vec();
        v3.extend_from_slice(&[0x31, 0x11, 0, 12]);
        v3.extend_from_slice(&[0; 12]);
        assert!(
            read_header(&mut &v3[..], Duration::from_secs(1))
                .await
                .is_err()
        );
        // A client that sends nothing is closed at the deadline.
        let (mut quiet, _keep) = tokio::io::duplex(64);
        let err = read_header(&mut quiet, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(err.contains("within"), "{err}");
    }

    #[test]
    fn forwarding_headers_are_believed_only_from_trusted_hops() {
        let proxy = cfg(&["10.0.0.0/8"], true);
        let lb: SocketAddr = "10.0.0.5:40000".parse().unwrap();
        let mut h = http::HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "198.51.100.1, 203.0.113.9, 10.1.1.1".parse().unwrap(),
        );
        // The nearest untrusted hop is the client (198.51.100.1 could be forged by it).
        assert_eq!(
            forwarded_client(&proxy, lb, &h),
            Some("203.0.113.9".parse().unwrap())
        );
        // From an untrusted peer the header is ignored.
        let direct: SocketAddr = "192.0.2.1:1".parse().unwrap();
        assert_eq!(forwarded_client(&proxy, direct, &h), None);
        // Off: ignored.
        assert_eq!(forwarded_client(&cfg(&["10.0.0.0/8"], false), lb, &h), None);
        // Forwarded wins over X-Forwarded-For, with quoted IPv6 and ports.
        h.insert(
            http::header::FORWARDED,
            r#"for="[2001:db8::9]:4711";proto=https, for=10.2.2.2"#
                .parse()
                .unwrap(),
        );
        assert_eq!(
            forwarded_client(&proxy, lb, &h),
            Some("2001:db8::9".parse().unwrap())
        );
        // An entry that is not an address: keep the peer.
        h.insert(http::header::FORWARDED, "for=unknown".parse().unwrap());
        assert_eq!(forwarded_client(&proxy, lb, &h), None);
    }
}
