//! The listener sections: `[server]`, `[http]`, `[grpc]`, `[websocket]`, `[admin]`, and
//! `[telemetry]`.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::{
    ClientAuth, Config, ListenerAuthConfig, MAX_BODY_BYTES_LIMIT, Problems, Secret, TlsConfig,
};

/// Process-wide lifecycle settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// How long a SIGTERM/SIGINT drain may take before the process exits anyway.
    pub shutdown_timeout_ms: u64,
    /// How often the config file is checked for changes to reload (0 = only on SIGHUP).
    pub config_watch_interval_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout_ms: 10_000,
            config_watch_interval_ms: 2_000,
        }
    }
}

/// The HTTP ingest listener.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to bind; port 0 picks a free port (the bound address is printed on stdout).
    pub listen: String,
    /// Open connections beyond this are closed right after accept.
    pub max_connections: usize,
    /// Open connections per source address beyond this are closed right after accept
    /// (0 = no limit).
    pub max_connections_per_address: usize,
    /// A connection's first request must start within this time of accept (a silent socket or
    /// a partial HTTP/2 preface is closed), and HTTP/1.1 request headers must arrive within it.
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight is closed when its next request does not start
    /// within this time (HTTP/1.1 keep-alive and HTTP/2).
    pub idle_timeout_ms: u64,
    /// HTTP/2 keep-alive: PING connections with requests in flight this often, closing them when
    /// the answer does not come within the same time (0 = no pings).
    pub h2_keepalive_interval_ms: u64,
    /// A client must deliver a whole request body within this time.
    pub body_read_timeout_ms: u64,
    /// Requests handled at once on this listener; more get 503 with Retry-After.
    pub max_concurrent_requests: usize,
    /// Open connections per principal on this listener (0 = no limit); a connection whose
    /// principal is at its limit gets 429 and is closed.
    pub max_connections_per_principal: usize,
    /// Live tails (Server-Sent Events, docs/consume.md) open at once on this listener; more
    /// get 503 with Retry-After.
    pub max_subscribers: usize,
    /// Live tails open at once per principal; more get 429.
    pub max_subscribers_per_principal: usize,
    /// A live tail without records sends a heartbeat comment this often.
    pub sse_heartbeat_ms: u64,
    /// Cross-origin requests from web pages (CORS); off while `allowed_origins` is empty.
    pub cors: CorsConfig,
    /// TLS for this listener; plain TCP when absent.
    pub tls: Option<TlsConfig>,
    /// Which credentials this listener accepts.
    pub auth: ListenerAuthConfig,
    /// Behind a load balancer: the PROXY protocol and forwarding headers.
    pub proxy: crate::ProxyConfig,
    /// The cluster id the Kafka REST Proxy v3 API (`/v3/clusters/…`) answers with; empty turns
    /// the v3 API off.
    pub kafka_rest_cluster_id: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_connections: 10_000,
            max_connections_per_address: 1024,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            h2_keepalive_interval_ms: 30_000,
            body_read_timeout_ms: 30_000,
            max_concurrent_requests: 4096,
            max_connections_per_principal: 1000,
            max_subscribers: 1000,
            max_subscribers_per_principal: 100,
            sse_heartbeat_ms: 15_000,
            cors: CorsConfig::default(),
            tls: None,
            auth: ListenerAuthConfig::default(),
            proxy: crate::ProxyConfig::default(),
            kafka_rest_cluster_id: "sluice".into(),
        }
    }
}

/// CORS on the HTTP listener (docs/http.md "Calling from web pages").
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins whose pages may call the API: exact (`https://app.example.com`), any subdomain
    /// (`https://*.example.com`), or `*` (any origin; not with credentials). Empty: CORS off.
    pub allowed_origins: Vec<String>,
    /// Methods a page may use.
    pub allowed_methods: Vec<String>,
    /// Request headers a page may send.
    pub allowed_headers: Vec<String>,
    /// Response headers a page may read (besides the CORS-safelisted ones).
    pub expose_headers: Vec<String>,
    /// Whether a page may send the browser's credentials (cookies, client certificates) and
    /// read the answer (`Access-Control-Allow-Credentials: true`).
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight's answer.
    pub max_age_secs: u64,
}

impl Default for CorsConfig {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        Self {
            allowed_origins: Vec::new(),
            allowed_methods: s(&["GET", "POST"]),
            allowed_headers: s(&[
                "authorization",
                "content-type",
                "content-encoding",
                "x-api-key",
                "idempotency-key",
                "sluice-key",
                "sluice-id",
                "sluice-timestamp",
                "sluice-partition",
                "last-event-id",
                "ce-specversion",
                "ce-id",
                "ce-source",
                "ce-type",
                "ce-time",
                "ce-subject",
                "ce-dataschema",
            ]),
            expose_headers: s(&["sluice-next-cursor", "retry-after"]),
            allow_credentials: false,
            max_age_secs: 600,
        }
    }
}

/// Whether `o` is an origin pattern `http.cors.allowed_origins` takes: `*`, or
/// `scheme://host[:port]` where the host may start with `*.`.
pub fn valid_origin_pattern(o: &str) -> bool {
    if o == "*" {
        return true;
    }
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    let host =
        rest.rsplit_once(':').map_or(
            rest,
            |(h, port)| {
                if port.parse::<u16>().is_ok() { h } else { rest }
            },
        );
    let host = host.strip_prefix("*.").unwrap_or(host);
    matches!(scheme, "http" | "https")
        && !host.is_empty()
        && host.chars().all(|c| {
            c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '[' || c == ']' || c == ':'
        })
        && !host.contains('*')
}

/// The gRPC ingest listener (`sluice.v1.Ingest`, health and reflection).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Serve gRPC at all.
    pub enabled: bool,
    /// Address to bind; port 0 picks a free port (the bound address is printed on stdout).
    pub listen: String,
    /// Open connections beyond this are closed right after accept.
    pub max_connections: usize,
    /// Open connections per source address beyond this are closed right after accept
    /// (0 = no limit).
    pub max_connections_per_address: usize,
    /// A connection with no call in flight is closed when its next call does not start within
    /// this time. (The first call must start within `http.header_read_timeout_ms`.)
    pub idle_timeout_ms: u64,
    /// HTTP/2 keep-alive: PING connections with calls in flight this often, closing them when the
    /// answer does not come within the same time (0 = no pings).
    pub h2_keepalive_interval_ms: u64,
    /// Largest message a client may send (after decompression) or receive.
    pub max_message_bytes: u64,
    /// Concurrent calls (HTTP/2 streams) per connection.
    pub max_concurrent_streams: u32,
    /// Batches of one `PublishStream` call in flight at once; past it the server stops reading
    /// the call (HTTP/2 flow control then holds the client).
    pub max_batches_in_flight: usize,
    /// Open connections per principal on this listener (0 = no limit).
    pub max_connections_per_principal: usize,
    /// TLS for this listener; plain TCP (h2c) when absent.
    pub tls: Option<TlsConfig>,
    /// Which credentials this listener accepts.
    pub auth: ListenerAuthConfig,
    /// Behind a load balancer: the PROXY protocol (`forwarded_headers` does not apply).
    pub proxy: crate::ProxyConfig,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:50051".into(),
            max_connections: 10_000,
            max_connections_per_address: 1024,
            idle_timeout_ms: 300_000,
            h2_keepalive_interval_ms: 30_000,
            max_message_bytes: 8 * 1024 * 1024,
            max_concurrent_streams: 256,
            max_batches_in_flight: 64,
            max_connections_per_principal: 1000,
            tls: None,
            auth: ListenerAuthConfig::default(),
            proxy: crate::ProxyConfig::default(),
        }
    }
}

/// WebSocket ingest on the HTTP listener(s): `GET /v1/streams/{stream}/ws` and `GET /v1/ws`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    pub enabled: bool,
    /// Largest message (a whole frame sequence); larger ones close the socket with 1009.
    pub max_message_bytes: u64,
    /// Frames read but not yet answered, per socket; past it the server stops reading.
    pub max_pending_frames: usize,
    /// A socket with no frame (data, ping or pong) from the client for this long is closed.
    pub idle_timeout_ms: u64,
    /// How often the server pings (0 = never).
    pub ping_interval_ms: u64,
    /// Acks the client does not read within this time close the socket (1008): a stalled
    /// reader cannot make the server buffer without bound.
    pub ack_write_timeout_ms: u64,
    /// Browser origins allowed to connect (`Origin` header, e.g. `https://app.example.com`);
    /// empty: any. Clients that send no Origin (non-browsers) are not affected.
    pub allowed_origins: Vec<String>,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_message_bytes: 1024 * 1024,
            max_pending_frames: 256,
            idle_timeout_ms: 120_000,
            ping_interval_ms: 30_000,
            ack_write_timeout_ms: 10_000,
            allowed_origins: Vec::new(),
        }
    }
}

/// The admin listener: `/healthz`, `/readyz`, `/metrics`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: String,
    /// TLS for the admin listener (client certificates can restrict who scrapes it).
    pub tls: Option<TlsConfig>,
    /// Open connections; the admin listener's own, so producers cannot take them.
    pub max_connections: usize,
    /// Open connections per source address beyond this are closed right after accept, so one
    /// client cannot hold every admin connection (0 = no limit).
    pub max_connections_per_address: usize,
    /// A connection's first request must start within this time of accept.
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight is closed after this time.
    pub idle_timeout_ms: u64,
    /// Bearer token that actions changing the gateway's behaviour (`PUT /loglevel`) require.
    /// Without it they are allowed only on a loopback admin listener or one whose TLS requires
    /// client certificates.
    pub token: Option<Secret>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9090".into(),
            tls: None,
            max_connections: 64,
            max_connections_per_address: 16,
            header_read_timeout_ms: 5_000,
            idle_timeout_ms: 30_000,
            token: None,
        }
    }
}

impl AdminConfig {
    /// Whether actions that change behaviour may run without the token: the listener is on a
    /// loopback address, or its TLS requires a client certificate.
    pub fn open_for_actions(&self) -> bool {
        let loopback = self
            .listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        let certified = self
            .tls
            .as_ref()
            .is_some_and(|t| t.client_auth == ClientAuth::Required);
        loopback || certified
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Diagnostics output.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// A tracing filter such as `info` or `sluice=debug,hyper=warn`.
    pub log_level: String,
    /// Distributed tracing of events (W3C Trace Context, OpenTelemetry spans over OTLP).
    pub traces: TracesConfig,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Human,
            log_level: "info".into(),
            traces: TracesConfig::default(),
        }
    }
}

/// `[telemetry.traces]`: W3C trace contexts taken from producers and stored with their events,
/// and Sluice's own spans (receive, admission, append, ack) exported over OTLP/gRPC
/// (docs/operations.md, "Traces").
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracesConfig {
    /// Off by default: no trace context is read or written and nothing is exported.
    pub enabled: bool,
    /// The OTLP/gRPC endpoint spans are exported to, e.g. `http://otel-collector:4317`. Unset:
    /// contexts are still propagated into the records, but no span is exported.
    pub otlp_endpoint: Option<String>,
    /// The share of traces Sluice starts (or receives unsampled) that it samples, 0.0 to 1.0.
    pub sampling_ratio: f64,
    /// Whether a producer's own sampling decision (the `traceparent` flag) wins over
    /// `sampling_ratio` (OpenTelemetry's parent-based sampler).
    pub parent_based: bool,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// How long one export may take before it is abandoned (its spans are counted as failed).
    pub export_timeout_ms: u64,
    /// Finished spans waiting to be exported; more are dropped and counted.
    pub max_queued_spans: usize,
    /// Spans per export request.
    pub max_export_batch: usize,
}

impl Default for TracesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            otlp_endpoint: None,
            sampling_ratio: 0.01,
            parent_based: true,
            service_name: "sluice".into(),
            export_timeout_ms: 10_000,
            max_queued_spans: 8192,
            max_export_batch: 512,
        }
    }
}

impl Config {
    fn validate_traces(&self, p: &mut Problems) {
        let t = &self.telemetry.traces;
        if !(0.0..=1.0).contains(&t.sampling_ratio) {
            p.add(
                "telemetry.traces.sampling_ratio",
                format!("{} is outside 0.0..=1.0", t.sampling_ratio),
            );
        }
        if let Some(url) = &t.otlp_endpoint {
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
                p.add(
                    "telemetry.traces.otlp_endpoint",
                    "must be an http(s):// URL with a host, e.g. http://otel-collector:4317",
                );
            }
        }
        if t.service_name.trim().is_empty() {
            p.add("telemetry.traces.service_name", "must not be empty");
        }
        p.in_range(
            "telemetry.traces.export_timeout_ms",
            t.export_timeout_ms,
            1,
            60_000,
        );
        p.in_range(
            "telemetry.traces.max_queued_spans",
            t.max_queued_spans as u64,
            1,
            1_000_000,
        );
        p.in_range(
            "telemetry.traces.max_export_batch",
            t.max_export_batch as u64,
            1,
            t.max_queued_spans.max(1) as u64,
        );
    }

    pub(crate) fn validate_servers(&self, p: &mut Problems) {
        self.validate_traces(p);
        if self.grpc.max_connections == 0 || self.grpc.max_concurrent_streams == 0 {
            p.add(
                "grpc",
                "max_connections and max_concurrent_streams must be at least 1",
            );
        }
        p.in_range(
            "grpc.max_batches_in_flight",
            self.grpc.max_batches_in_flight as u64,
            1,
            4096,
        );
        p.in_range(
            "grpc.max_message_bytes",
            self.grpc.max_message_bytes,
            1024,
            MAX_BODY_BYTES_LIMIT,
        );
        let ws = &self.websocket;
        for (key, v, lo, hi) in [
            (
                "max_message_bytes",
                ws.max_message_bytes,
                1024,
                MAX_BODY_BYTES_LIMIT,
            ),
            (
                "max_pending_frames",
                ws.max_pending_frames as u64,
                1,
                65_536,
            ),
            ("idle_timeout_ms", ws.idle_timeout_ms, 100, 86_400_000),
            ("ping_interval_ms", ws.ping_interval_ms, 0, 86_400_000),
            (
                "ack_write_timeout_ms",
                ws.ack_write_timeout_ms,
                10,
                3_600_000,
            ),
        ] {
            p.in_range(format!("websocket.{key}"), v, lo, hi);
        }
        for o in &ws.allowed_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                p.add(
                    "websocket.allowed_origins",
                    format!("`{o}` is not an origin like https://app.example.com"),
                );
            }
        }
        if self.http.max_connections == 0 {
            p.add("http.max_connections", "must be at least 1");
        }
        if self.http.max_concurrent_requests == 0 {
            p.add("http.max_concurrent_requests", "must be at least 1");
        }
        let cors = &self.http.cors;
        for o in &cors.allowed_origins {
            if !valid_origin_pattern(o) {
                p.add(
                    "http.cors.allowed_origins",
                    format!("`{o}` is not `*` or an origin like https://app.example.com or https://*.example.com"),
                );
            }
        }
        if cors.allow_credentials && cors.allowed_origins.iter().any(|o| o == "*") {
            p.add(
                "http.cors.allow_credentials",
                "browsers refuse credentials with any origin (`*`): name the origins",
            );
        }
        for m in &cors.allowed_methods {
            if m.is_empty() || !m.chars().all(|c| c.is_ascii_uppercase()) {
                p.add(
                    "http.cors.allowed_methods",
                    format!("`{m}` is not a method like POST"),
                );
            }
        }
        for h in cors.allowed_headers.iter().chain(&cors.expose_headers) {
            if h.is_empty() || !h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                p.add("http.cors", format!("`{h}` is not a header name"));
            }
        }
        // A semaphore's permits are bounded; 0 would refuse every live tail.
        p.in_range(
            "http.max_subscribers",
            self.http.max_subscribers as u64,
            1,
            1 << 20,
        );
        p.in_range(
            "http.sse_heartbeat_ms",
            self.http.sse_heartbeat_ms,
            10,
            600_000,
        );
        for (path, v) in [
            (
                "http.header_read_timeout_ms",
                self.http.header_read_timeout_ms,
            ),
            ("http.idle_timeout_ms", self.http.idle_timeout_ms),
            ("grpc.idle_timeout_ms", self.grpc.idle_timeout_ms),
            (
                "admin.header_read_timeout_ms",
                self.admin.header_read_timeout_ms,
            ),
            ("admin.idle_timeout_ms", self.admin.idle_timeout_ms),
            ("admin.max_connections", self.admin.max_connections as u64),
            ("http.body_read_timeout_ms", self.http.body_read_timeout_ms),
            (
                "server.shutdown_timeout_ms",
                self.server.shutdown_timeout_ms,
            ),
        ] {
            p.at_least_one(path, v);
        }
    }
}
