//! The listeners and the producer transports they carry: addresses, the one check that no two
//! listeners share an address, and which transports admit anonymous producers.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::{AuthMethod, Config, ListenerAuthConfig, Problems};

/// A way producers reach the gateway: one transport on one listener, with the credentials it
/// accepts. Anonymity is decided here, per listener and transport, and nowhere else (DESIGN
/// §11): every adapter gets its policy from [`Config::producer_transports`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerTransport {
    /// Stable name: `http` (the HTTP API and WebSocket ingest), `grpc`, `mqtt` (TCP), `mqtts`
    /// (TLS) or `mqtt_ws` (MQTT over WebSocket at `/mqtt` on the HTTP listener).
    pub name: &'static str,
    /// The config key of the listener's address, e.g. `mqtt.tls_listen`.
    pub listen_key: &'static str,
    /// The address the transport is served on.
    pub listen: String,
    /// The config section whose `auth` applies, e.g. `mqtt.auth`.
    pub auth_key: &'static str,
    /// The credential types it accepts.
    pub methods: Vec<AuthMethod>,
    /// Whether producers without credentials are accepted (as `anonymous`).
    pub allow_anonymous: bool,
}

impl Config {
    /// Every enabled producer transport with its listener and the credentials it accepts.
    ///
    /// Each listener decides anonymity from its own address (unset `allow_anonymous`: only on a
    /// loopback address). MQTT over WebSocket shares the HTTP listener, so it follows
    /// `http.auth.allow_anonymous` unless `mqtt.auth.allow_anonymous` is set, and validation
    /// refuses a setting where the two transports of that listener would disagree.
    pub fn producer_transports(&self) -> Vec<ProducerTransport> {
        let t = |name, listen_key, listen: &str, auth_key, auth: &ListenerAuthConfig| {
            ProducerTransport {
                name,
                listen_key,
                listen: listen.to_string(),
                auth_key,
                methods: auth.methods.clone(),
                allow_anonymous: auth.anonymous_allowed(listen),
            }
        };
        let mut out = vec![t(
            "http",
            "http.listen",
            &self.http.listen,
            "http.auth",
            &self.http.auth,
        )];
        if self.grpc.enabled {
            out.push(t(
                "grpc",
                "grpc.listen",
                &self.grpc.listen,
                "grpc.auth",
                &self.grpc.auth,
            ));
        }
        let m = &self.mqtt;
        if m.enabled {
            if m.plaintext {
                out.push(t("mqtt", "mqtt.listen", &m.listen, "mqtt.auth", &m.auth));
            }
            if m.tls.is_some() {
                out.push(t(
                    "mqtts",
                    "mqtt.tls_listen",
                    &m.tls_listen,
                    "mqtt.auth",
                    &m.auth,
                ));
            }
            if m.websocket {
                let http_anonymous = self.http.auth.anonymous_allowed(&self.http.listen);
                out.push(ProducerTransport {
                    allow_anonymous: m.auth.allow_anonymous.unwrap_or(http_anonymous),
                    ..t(
                        "mqtt_ws",
                        "http.listen",
                        &self.http.listen,
                        "mqtt.auth",
                        &m.auth,
                    )
                });
            }
        }
        out
    }

    /// The transport named `name` (see [`ProducerTransport::name`]), if enabled.
    pub fn producer_transport(&self, name: &str) -> Option<ProducerTransport> {
        self.producer_transports()
            .into_iter()
            .find(|t| t.name == name)
    }

    /// Every listener this configuration opens, with its key.
    fn listeners(&self) -> Vec<(&'static str, &str)> {
        let mut out = vec![
            ("http.listen", self.http.listen.as_str()),
            ("admin.listen", self.admin.listen.as_str()),
        ];
        if self.grpc.enabled {
            out.push(("grpc.listen", &self.grpc.listen));
        }
        let m = &self.mqtt;
        if m.enabled && m.plaintext {
            out.push(("mqtt.listen", &m.listen));
        }
        if m.enabled && m.tls.is_some() {
            out.push(("mqtt.tls_listen", &m.tls_listen));
        }
        out
    }

    pub(crate) fn validate_listeners(&self, p: &mut Problems) {
        for (path, proxy) in [
            ("grpc.proxy", &self.grpc.proxy),
            ("mqtt.proxy", &self.mqtt.proxy),
        ] {
            if proxy.forwarded_headers {
                p.add(
                    format!("{path}.forwarded_headers"),
                    "forwarding headers are HTTP's; use `protocol = true` (the PROXY protocol) here",
                );
            }
        }
        if self.http.proxy.forwarded_headers && self.http.proxy.trusted_proxies.is_empty() {
            p.add(
                "http.proxy.forwarded_headers",
                "trusts no hop while `http.proxy.trusted_proxies` is empty; list the load balancers' addresses",
            );
        }
        for (path, addr) in [
            ("http.listen", &self.http.listen),
            ("grpc.listen", &self.grpc.listen),
            ("mqtt.listen", &self.mqtt.listen),
            ("mqtt.tls_listen", &self.mqtt.tls_listen),
            ("admin.listen", &self.admin.listen),
        ] {
            if addr.parse::<SocketAddr>().is_err() {
                p.add(
                    path,
                    format!("`{addr}` is not an address like 127.0.0.1:8080 or [::1]:8080"),
                );
            }
        }
        // One check for every pair: two listeners on one address would fail at bind (port 0
        // picks a free port for each).
        let listeners = self.listeners();
        for (i, (path, addr)) in listeners.iter().enumerate() {
            if addr.ends_with(":0") {
                continue;
            }
            if let Some((other, _)) = listeners[..i].iter().find(|(_, a)| a == addr) {
                p.add(
                    *path,
                    format!("`{addr}` is also {other}; every listener needs its own address"),
                );
            }
        }
        let transports = self.producer_transports();
        for t in &transports {
            if t.methods.is_empty() && !t.allow_anonymous {
                p.add(
                    format!("{}.methods", t.auth_key),
                    format!(
                        "is empty and anonymous producers are not allowed on {} ({}): nobody could produce",
                        t.listen_key, t.listen
                    ),
                );
            }
        }
        // Two transports on one listener must agree on anonymity: a producer refused by one
        // must not walk in through the other (DESIGN §11).
        if let (Some(http), Some(ws)) = (
            transports.iter().find(|t| t.name == "http"),
            transports.iter().find(|t| t.name == "mqtt_ws"),
        ) && http.allow_anonymous != ws.allow_anonymous
        {
            let says = |allowed: bool| if allowed { "allows" } else { "refuses" };
            p.add(
                "mqtt.auth.allow_anonymous",
                format!(
                    "{} anonymous MQTT over WebSocket on http.listen ({}), where the HTTP API {} \
                     anonymous producers: the two transports of one listener would disagree. Set \
                     http.auth.allow_anonymous to the same value, or mqtt.websocket = false",
                    says(ws.allow_anonymous),
                    http.listen,
                    says(http.allow_anonymous)
                ),
            );
        }
    }
}

/// A listener behind a load balancer (docs/operations.md "Behind a load balancer"): the real
/// client's address from the PROXY protocol or from forwarding headers, so logs, failure
/// limiting and per-address caps see it. Off by default.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Every connection must start with a PROXY protocol header (v1 or v2, as HAProxy's
    /// `send-proxy`/`send-proxy-v2`, AWS NLB, Envoy send it); connections without one, or from
    /// an address outside `trusted_proxies` (when set), are closed.
    pub protocol: bool,
    /// The load balancers: addresses or CIDR blocks (`10.0.0.0/8`, `::1`). With `protocol`,
    /// the only peers whose header is believed (empty: any peer, for a listener only the
    /// balancer can reach); with `forwarded_headers`, the hops whose `Forwarded` /
    /// `X-Forwarded-For` entries are believed (empty: none).
    pub trusted_proxies: Vec<Cidr>,
    /// HTTP listener only: take the client address from `Forwarded: for=` (RFC 7239) or else
    /// `X-Forwarded-For`, walking from the nearest hop back past trusted proxies.
    pub forwarded_headers: bool,
}

impl ProxyConfig {
    /// Whether `ip` is one of the trusted proxies.
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(ip))
    }
}

/// An address block: an address and how many leading bits of it count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the block (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an address or CIDR block (10.0.0.0/8, fd00::/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}
