//! Sluice's configuration: the TOML model, its defaults, validation that reports every error with
//! its key path, and `SLUICE_…` environment overrides.
//!
//! Every key is documented in `docs/configuration.md`; every file in `config/examples/` is loaded
//! by a test.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod mqtt;
pub use mqtt::{MqttConfig, TopicError, TopicMap, TopicRuleConfig};

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "SLUICE_";
/// Separator between key path segments in an environment variable name.
pub const ENV_SEPARATOR: &str = "__";

/// Largest accepted `max_body_bytes`: one request is one log frame, and frames stay far below the
/// 4 GiB an offset index position can address.
pub const MAX_BODY_BYTES_LIMIT: u64 = 256 * 1024 * 1024;
/// Largest number of partitions a stream may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// The whole configuration. Every section has defaults, so an empty file (or none) is valid.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub http: HttpConfig,
    pub grpc: GrpcConfig,
    pub websocket: WebSocketConfig,
    pub mqtt: MqttConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub limits: LimitsConfig,
    pub streams: StreamsConfig,
    pub telemetry: TelemetryConfig,
    pub auth: AuthConfig,
    pub quotas: QuotasConfig,
}

/// What a quota does with a request over it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPolicy {
    /// Answer at once with a retry hint computed from the bucket.
    #[default]
    Reject,
    /// Hold the request until it fits, up to `quotas.max_delay_ms`, then reject.
    Delay,
}

/// Which bucket a quota rule counts against.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum QuotaScope {
    /// One bucket per stream, shared by every principal.
    Stream,
    /// One bucket per principal, across streams.
    Principal,
    /// One bucket per principal and stream.
    PrincipalStream,
}

impl QuotaScope {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaScope::Stream => "stream",
            QuotaScope::Principal => "principal",
            QuotaScope::PrincipalStream => "principal_stream",
        }
    }
}

/// Rate limits (GCRA) on events and bytes.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct QuotasConfig {
    /// Longest time a `delay` rule holds a request before rejecting it.
    pub max_delay_ms: u64,
    /// Buckets per rule past which idle ones (full again) are dropped, at most once a second.
    pub max_tracked_keys: usize,
    /// Principals named in throttling metrics; every other principal is counted as `other`.
    pub metrics_principals: Vec<String>,
    /// For each scope, the first rule matching the request's stream and principal applies; the
    /// three scopes all apply.
    pub rules: Vec<QuotaRule>,
}

impl Default for QuotasConfig {
    fn default() -> Self {
        Self {
            max_delay_ms: 1000,
            max_tracked_keys: 100_000,
            metrics_principals: Vec::new(),
            rules: Vec::new(),
        }
    }
}

fn star() -> String {
    "*".into()
}

/// One quota rule.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuotaRule {
    pub scope: QuotaScope,
    /// Glob pattern of the streams this rule applies to.
    #[serde(default = "star")]
    pub streams: String,
    /// Glob pattern of the principals this rule applies to.
    #[serde(default = "star")]
    pub principals: String,
    pub events_per_sec: Option<u32>,
    pub bytes_per_sec: Option<u32>,
    /// Events that may arrive at once (default: one second's worth).
    pub burst_events: Option<u32>,
    /// Bytes that may arrive at once (default: one second's worth).
    pub burst_bytes: Option<u32>,
    #[serde(default)]
    pub policy: QuotaPolicy,
}

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
    /// TLS for this listener; plain TCP when absent.
    pub tls: Option<TlsConfig>,
    /// Which credentials this listener accepts.
    pub auth: ListenerAuthConfig,
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
            tls: None,
            auth: ListenerAuthConfig::default(),
        }
    }
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

/// Whether a TLS listener asks for client certificates.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// No client certificates.
    #[default]
    None,
    /// A client may present a certificate; if it does, it must verify.
    Optional,
    /// Every client must present a certificate that verifies.
    Required,
}

/// TLS settings of a listener (TLS 1.2 and 1.3 only).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// PEM bundle of the CAs client certificates must chain to.
    pub client_ca_file: Option<PathBuf>,
    /// PEM CRLs checked against client certificates.
    #[serde(default)]
    pub crl_files: Vec<PathBuf>,
    /// How often the files are checked for changes (they are reloaded without a restart).
    #[serde(default = "default_tls_reload_ms")]
    pub reload_interval_ms: u64,
    /// A TLS handshake must finish within this time.
    #[serde(default = "default_handshake_ms")]
    pub handshake_timeout_ms: u64,
}

/// Accepts a TOML date-time or a string holding one; keeps its RFC 3339 text.
fn datetime_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Datetime(toml::value::Datetime),
        Text(String),
    }
    Ok(Option::<Either>::deserialize(d)?.map(|e| match e {
        Either::Datetime(t) => t.to_string(),
        Either::Text(s) => s,
    }))
}

fn default_tls_reload_ms() -> u64 {
    10_000
}

fn default_handshake_ms() -> u64 {
    10_000
}

/// A credential type a listener can accept.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    ApiKey,
    Jwt,
    Mtls,
}

/// Which credentials a listener accepts.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerAuthConfig {
    pub methods: Vec<AuthMethod>,
    /// Producers without credentials are `anonymous` (which may produce to every stream).
    /// Unset: allowed only when the listener is bound to a loopback address.
    pub allow_anonymous: Option<bool>,
}

impl Default for ListenerAuthConfig {
    fn default() -> Self {
        Self {
            methods: vec![AuthMethod::ApiKey, AuthMethod::Jwt, AuthMethod::Mtls],
            allow_anonymous: None,
        }
    }
}

impl ListenerAuthConfig {
    /// Whether anonymous producers are allowed on a listener bound to `listen`.
    pub fn anonymous_allowed(&self, listen: &str) -> bool {
        self.allow_anonymous.unwrap_or_else(|| {
            listen
                .parse::<SocketAddr>()
                .is_ok_and(|a| a.ip().is_loopback())
        })
    }
}

/// Loads `text` the way the gateway would (no environment): whether it was accepted. An
/// accepted configuration must validate again to no problems and list its producer
/// transports; either failing panics. For the fuzz target (`config/fuzz`, `config_loader`) and
/// its corpus replay.
pub fn fuzz_check(text: &str) -> bool {
    match Config::from_toml_str(text, "fuzz", Vec::<(String, String)>::new()) {
        Ok(c) => {
            let problems = c.validate();
            assert!(problems.is_empty(), "accepted, then invalid: {problems:?}");
            let _ = c.producer_transports();
            true
        }
        Err(_) => false,
    }
}

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
}

/// A secret string: never printed by `Debug`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Credentials and how they map to principals.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub api_keys: Vec<ApiKeyConfig>,
    pub jwt: JwtConfig,
    pub mtls: MtlsConfig,
    pub failures: FailureLimitConfig,
}

/// One API key. The secret itself is never stored, only its SHA-256.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The key's public id; the key presented by a producer is `{id}.{secret}`.
    pub id: String,
    /// Lower-case hex SHA-256 of the whole key `{id}.{secret}` (`sluice keys new` prints it).
    pub secret_sha256: String,
    /// The principal this key authenticates as.
    pub principal: String,
    /// Glob patterns of the streams it may produce to.
    pub streams: Vec<String>,
    /// After this instant (RFC 3339 with offset, as a TOML date-time or a string) the key is
    /// refused.
    #[serde(default, deserialize_with = "datetime_or_string")]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub disabled: bool,
}

/// OAuth2 bearer JWTs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    pub issuers: Vec<IssuerConfig>,
    /// Verified tokens remembered (until they expire) so each is verified once.
    pub cache_max_entries: usize,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            issuers: Vec::new(),
            cache_max_entries: 10_000,
        }
    }
}

/// One trusted token issuer.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Must equal the token's `iss`.
    pub issuer: String,
    /// The token's `aud` must contain one of these.
    pub audiences: Vec<String>,
    /// Accepted `alg` values: RS256/384/512, PS256/384/512, ES256, ES384, EdDSA, HS256.
    pub algorithms: Vec<String>,
    /// A JWKS document on disk (re-read on the refresh interval).
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL (http or https).
    pub jwks_url: Option<String>,
    /// Extra PEM CA bundle for an https JWKS URL (besides the system roots).
    pub jwks_ca_file: Option<PathBuf>,
    /// Shared secret for HS256; HS256 is accepted only when this is set.
    pub hs256_secret: Option<Secret>,
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_interval_ms: u64,
    /// An unknown `kid` triggers a refresh at most this often.
    #[serde(default = "default_jwks_min_refresh")]
    pub jwks_min_refresh_interval_ms: u64,
    /// The claim naming the principal.
    #[serde(default = "default_principal_claim")]
    pub principal_claim: String,
    /// The claim holding permissions: a space-separated string (like `scope`) or an array.
    #[serde(default = "default_permissions_claim")]
    pub permissions_claim: String,
    /// Entries of the permissions claim that start with this prefix grant production to the
    /// stream pattern that follows it (`produce:telemetry.*`). Empty: every entry is a pattern.
    #[serde(default = "default_permission_prefix")]
    pub permission_prefix: String,
}

fn default_leeway() -> u64 {
    30
}
fn default_jwks_refresh() -> u64 {
    300_000
}
fn default_jwks_min_refresh() -> u64 {
    10_000
}
fn default_principal_claim() -> String {
    "sub".into()
}
fn default_permissions_claim() -> String {
    "scope".into()
}
fn default_permission_prefix() -> String {
    "produce:".into()
}

/// Client certificates to principals.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MtlsConfig {
    /// Tried in order; the first rule whose pattern matches decides.
    pub rules: Vec<MtlsRule>,
}

/// Which part of a client certificate a rule looks at.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CertField {
    /// A URI subject alternative name, e.g. a SPIFFE id.
    SanUri,
    /// A DNS subject alternative name.
    SanDns,
    /// The subject's common name.
    Cn,
}

/// One mapping rule from a certificate to a principal.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MtlsRule {
    pub field: CertField,
    /// Glob pattern the field's value must match.
    pub pattern: String,
    /// The principal; `{value}` stands for the matched value. Default: the value itself.
    pub principal: Option<String>,
    /// Glob patterns of the streams it may produce to.
    pub streams: Vec<String>,
}

/// Limits on failed authentications per source address.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FailureLimitConfig {
    /// Failures allowed per address within a window; beyond it the address gets 429.
    pub max_failures: u32,
    pub window_ms: u64,
    /// Most addresses tracked at once (older windows are dropped first); also the most
    /// remembered credentials.
    pub max_tracked_addresses: usize,
    /// Credentials that authenticated within this time still get in from a throttled address,
    /// so producers behind one NAT are not locked out by a guesser there (0 = never).
    pub remember_ok_ms: u64,
}

impl Default for FailureLimitConfig {
    fn default() -> Self {
        Self {
            max_failures: 20,
            window_ms: 60_000,
            max_tracked_addresses: 100_000,
            remember_ok_ms: 3_600_000,
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

/// Which log the gateway appends to.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogKind {
    /// The embedded durable log under `data_dir`.
    #[default]
    Embedded,
    /// Apache Kafka (or a Kafka-compatible broker), configured in `[log.kafka]`.
    Kafka,
}

/// The log the gateway appends to.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub kind: LogKind,
    /// Directory of the embedded log (created if missing; locked against a second process).
    pub data_dir: PathBuf,
    /// A segment rolls over once it holds this many bytes.
    pub segment_bytes: u64,
    /// A segment rolls over once its first append is this old (0 = never by age).
    pub segment_ms: u64,
    /// One offset- and time-index entry per this many bytes of log.
    pub index_interval_bytes: u64,
    /// Upper bound of bytes written by one group commit (one write + one fsync).
    pub max_group_bytes: u64,
    /// For streams with `ack = "received"`: how long written data may wait for an fsync.
    pub flush_interval_ms: u64,
    /// How often retention runs per partition.
    pub retention_check_interval_ms: u64,
    /// Fault injection for tests of backpressure: every group commit waits this long first.
    /// Never set this in production.
    pub fault_append_delay_ms: u64,
    /// The Kafka sink, used when `kind = "kafka"`.
    pub kafka: KafkaConfig,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            kind: LogKind::Embedded,
            data_dir: PathBuf::from("./data"),
            segment_bytes: 128 * 1024 * 1024,
            segment_ms: 7 * 24 * 3600 * 1000,
            index_interval_bytes: 4096,
            max_group_bytes: 8 * 1024 * 1024,
            flush_interval_ms: 1000,
            retention_check_interval_ms: 60_000,
            fault_append_delay_ms: 0,
            kafka: KafkaConfig::default(),
        }
    }
}

/// Compression of record batches sent to Kafka.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum KafkaCompression {
    None,
    Gzip,
    Lz4,
    Snappy,
    #[default]
    Zstd,
}

impl KafkaCompression {
    /// librdkafka's name of the codec.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaCompression::None => "none",
            KafkaCompression::Gzip => "gzip",
            KafkaCompression::Lz4 => "lz4",
            KafkaCompression::Snappy => "snappy",
            KafkaCompression::Zstd => "zstd",
        }
    }
}

/// How the gateway connects to the brokers.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum KafkaSecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl KafkaSecurityProtocol {
    /// librdkafka's name of the protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaSecurityProtocol::Plaintext => "plaintext",
            KafkaSecurityProtocol::Ssl => "ssl",
            KafkaSecurityProtocol::SaslPlaintext => "sasl_plaintext",
            KafkaSecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            KafkaSecurityProtocol::SaslPlaintext | KafkaSecurityProtocol::SaslSsl
        )
    }

    pub fn uses_tls(self) -> bool {
        matches!(
            self,
            KafkaSecurityProtocol::Ssl | KafkaSecurityProtocol::SaslSsl
        )
    }
}

/// SASL mechanisms towards the brokers.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum KafkaSaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl KafkaSaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaSaslMechanism::Plain => "PLAIN",
            KafkaSaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            KafkaSaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// `[log.kafka.security]`: TLS and SASL towards the brokers.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSecurityConfig {
    pub protocol: KafkaSecurityProtocol,
    pub sasl_mechanism: Option<KafkaSaslMechanism>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<Secret>,
    /// CA bundle (PEM) to verify the brokers; the system's roots when unset.
    pub ssl_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS towards the brokers, with `ssl_key_file`.
    pub ssl_cert_file: Option<PathBuf>,
    pub ssl_key_file: Option<PathBuf>,
    pub ssl_key_password: Option<Secret>,
    /// Check that the broker's certificate names the host connected to (default true).
    pub ssl_verify_hostname: Option<bool>,
}

/// `[log.kafka]`: the Kafka sink. One idempotent producer (acks=all) is shared by the process.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list of brokers to bootstrap from.
    pub bootstrap_servers: String,
    /// Topic of a stream: `{stream}` replaced by the stream name, e.g. `sluice.{stream}`.
    pub topic: String,
    /// Identifies the gateway's connections in broker logs and quotas.
    pub client_id: String,
    pub compression: KafkaCompression,
    /// How long the producer waits to fill a batch before sending it.
    pub linger_ms: u64,
    /// Largest record batch sent to one partition (librdkafka `batch.size`).
    pub batch_bytes: u64,
    /// Most events in one record batch (librdkafka `batch.num.messages`).
    pub batch_events: u64,
    /// An event not delivered within this long fails with a retryable error (includes retries).
    pub message_timeout_ms: u64,
    /// Bytes the producer may queue; past it new events get 503 (librdkafka
    /// `queue.buffering.max.kbytes`). `limits.max_in_flight_bytes` normally binds first.
    pub queue_max_bytes: u64,
    /// Events the producer may queue (librdkafka `queue.buffering.max.messages`).
    pub queue_max_events: u64,
    /// Create missing topics (declared streams at startup; others on first use when
    /// `streams.auto_create` is on) with the stream's `partitions` and `replication_factor`.
    pub create_topics: bool,
    /// Replication factor of topics Sluice creates.
    pub replication_factor: u32,
    /// Timeout of metadata and topic-creation requests.
    pub metadata_timeout_ms: u64,
    /// How often the brokers are probed for readiness (and a topic's partition count checked).
    pub health_check_interval_ms: u64,
    /// How often the partition counts of known topics are refreshed.
    pub metadata_refresh_ms: u64,
    pub security: KafkaSecurityConfig,
    /// Raw librdkafka producer properties, e.g. `"socket.keepalive.enable" = "true"`. Properties
    /// Sluice sets itself or relies on are refused (see docs/kafka.md).
    pub overrides: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            topic: "{stream}".into(),
            client_id: "sluice".into(),
            compression: KafkaCompression::Zstd,
            linger_ms: 5,
            batch_bytes: 1_000_000,
            batch_events: 10_000,
            message_timeout_ms: 30_000,
            queue_max_bytes: 1 << 30,
            queue_max_events: 1_000_000,
            create_topics: false,
            replication_factor: 1,
            metadata_timeout_ms: 5_000,
            health_check_interval_ms: 1_000,
            metadata_refresh_ms: 30_000,
            security: KafkaSecurityConfig::default(),
            overrides: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// The librdkafka producer properties of this configuration: what Sluice sets itself
    /// (idempotence, acks=all, batching, security, …), then the raw overrides. The gateway's
    /// producer and the load generator's direct-to-Kafka peer both use exactly these.
    pub fn producer_properties(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| p.push((k.to_string(), v));
        set("bootstrap.servers", self.bootstrap_servers.clone());
        set("client.id", self.client_id.clone());
        set("enable.idempotence", "true".into());
        set("acks", "all".into());
        set("compression.codec", self.compression.as_str().into());
        set("linger.ms", self.linger_ms.to_string());
        set("batch.size", self.batch_bytes.to_string());
        set("batch.num.messages", self.batch_events.to_string());
        set("message.timeout.ms", self.message_timeout_ms.to_string());
        set(
            "queue.buffering.max.kbytes",
            self.queue_max_bytes.div_ceil(1024).to_string(),
        );
        set(
            "queue.buffering.max.messages",
            self.queue_max_events.to_string(),
        );
        // Sluice creates topics itself (log.kafka.create_topics); a metadata request must not.
        set("allow.auto.create.topics", "false".into());
        // Broker round-trip times for `sluice_kafka_broker_rtt_seconds` (an override wins; "0"
        // turns the statistics off).
        set("statistics.interval.ms", "10000".into());
        let s = &self.security;
        set("security.protocol", s.protocol.as_str().into());
        if let Some(m) = s.sasl_mechanism {
            set("sasl.mechanism", m.as_str().into());
        }
        if let Some(u) = &s.sasl_username {
            set("sasl.username", u.clone());
        }
        if let Some(pw) = &s.sasl_password {
            set("sasl.password", pw.0.clone());
        }
        for (key, path) in [
            ("ssl.ca.location", &s.ssl_ca_file),
            ("ssl.certificate.location", &s.ssl_cert_file),
            ("ssl.key.location", &s.ssl_key_file),
        ] {
            if let Some(path) = path {
                set(key, path.display().to_string());
            }
        }
        if let Some(pw) = &s.ssl_key_password {
            set("ssl.key.password", pw.0.clone());
        }
        if let Some(v) = s.ssl_verify_hostname {
            set(
                "ssl.endpoint.identification.algorithm",
                if v { "https" } else { "none" }.into(),
            );
        }
        for (key, value) in &self.overrides {
            set(key, value.clone());
        }
        p
    }
}

/// librdkafka properties Sluice sets from `[log.kafka]` itself, with the key to use instead.
pub const KAFKA_MANAGED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "log.kafka.bootstrap_servers"),
    ("metadata.broker.list", "log.kafka.bootstrap_servers"),
    ("client.id", "log.kafka.client_id"),
    ("compression.codec", "log.kafka.compression"),
    ("compression.type", "log.kafka.compression"),
    ("linger.ms", "log.kafka.linger_ms"),
    ("queue.buffering.max.ms", "log.kafka.linger_ms"),
    ("batch.size", "log.kafka.batch_bytes"),
    ("batch.num.messages", "log.kafka.batch_events"),
    ("message.timeout.ms", "log.kafka.message_timeout_ms"),
    ("delivery.timeout.ms", "log.kafka.message_timeout_ms"),
    ("queue.buffering.max.kbytes", "log.kafka.queue_max_bytes"),
    ("queue.buffering.max.messages", "log.kafka.queue_max_events"),
    ("security.protocol", "log.kafka.security.protocol"),
    ("sasl.mechanism", "log.kafka.security.sasl_mechanism"),
    ("sasl.mechanisms", "log.kafka.security.sasl_mechanism"),
    ("sasl.username", "log.kafka.security.sasl_username"),
    ("sasl.password", "log.kafka.security.sasl_password"),
    ("ssl.ca.location", "log.kafka.security.ssl_ca_file"),
    (
        "ssl.certificate.location",
        "log.kafka.security.ssl_cert_file",
    ),
    ("ssl.key.location", "log.kafka.security.ssl_key_file"),
    ("ssl.key.password", "log.kafka.security.ssl_key_password"),
    (
        "ssl.endpoint.identification.algorithm",
        "log.kafka.security.ssl_verify_hostname",
    ),
    (
        "allow.auto.create.topics",
        "log.kafka.create_topics (Sluice creates topics itself)",
    ),
    (
        "partitioner",
        "event keys (Sluice picks partitions with Kafka's murmur2 itself)",
    ),
];

/// Why a raw librdkafka override cannot be used with `streams`, if it cannot.
pub fn kafka_override_conflict(key: &str, value: &str, durable: bool) -> Option<String> {
    if let Some((_, instead)) = KAFKA_MANAGED_PROPERTIES.iter().find(|(k, _)| *k == key) {
        return Some(format!("`{key}` is set by Sluice; use {instead}"));
    }
    let v = value.trim().to_ascii_lowercase();
    match key {
        "enable.idempotence" if v != "true" && durable => Some(
            "idempotence cannot be turned off while a stream acks durably: retries could write \
             an acked event twice or out of order (set every stream's ack = \"received\" first)"
                .into(),
        ),
        "acks" | "request.required.acks" if v != "all" && v != "-1" && durable => Some(format!(
            "acks = {value} while a stream acks durably would ack events one broker failure can \
             lose; durable acks need acks = all"
        )),
        "delivery.report.only.error" if v == "true" => Some(
            "Sluice needs every delivery report to answer producers with partitions and offsets"
                .into(),
        ),
        "transactional.id" => Some("Sluice's producer is idempotent, not transactional".into()),
        _ => None,
    }
}

/// Process-wide resource limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Bytes of events accepted but not yet written (and, for durable streams, fsynced). When it
    /// is exhausted, producers get 503 with Retry-After.
    pub max_in_flight_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_in_flight_bytes: 256 * 1024 * 1024,
        }
    }
}

/// When a producer's request counts as accepted.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// After the events are written and fsynced: they survive a crash or power loss.
    #[default]
    Durable,
    /// After the events are parsed and queued for the log: fire-and-forget.
    Received,
}

impl AckMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AckMode::Durable => "durable",
            AckMode::Received => "received",
        }
    }
}

/// Settings a stream has; `[streams.defaults]` and each `[streams.declare.NAME]`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    pub ack: AckMode,
    /// Partitions of a new stream; a stream's count can grow later, never shrink.
    pub partitions: u32,
    /// Largest request body, after decompression.
    pub max_body_bytes: u64,
    /// Largest single event (key + headers + value).
    pub max_event_bytes: u64,
    /// Most events in one request.
    pub max_events_per_request: u64,
    /// Delete sealed segments whose newest event is older than this (0 = keep forever).
    pub retention_ms: u64,
    /// Delete the oldest sealed segments while a partition is larger than this (0 = no limit).
    pub retention_bytes: u64,
    /// Bytes of this stream's events accepted but not yet acked; when used up its producers get
    /// 503 while other streams go on (0 = only the global `limits.max_in_flight_bytes`).
    pub max_in_flight_bytes: u64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            ack: AckMode::Durable,
            partitions: 1,
            max_body_bytes: 8 * 1024 * 1024,
            max_event_bytes: 1024 * 1024,
            max_events_per_request: 10_000,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: 0,
            max_in_flight_bytes: 0,
        }
    }
}

/// A declared stream's settings: each one set here overrides `[streams.defaults]`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StreamOverrides {
    pub ack: Option<AckMode>,
    pub partitions: Option<u32>,
    pub max_body_bytes: Option<u64>,
    pub max_event_bytes: Option<u64>,
    pub max_events_per_request: Option<u64>,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub max_in_flight_bytes: Option<u64>,
}

impl StreamOverrides {
    /// `defaults` with every setting this declaration names replaced.
    pub fn apply(&self, d: &StreamSettings) -> StreamSettings {
        StreamSettings {
            ack: self.ack.unwrap_or(d.ack),
            partitions: self.partitions.unwrap_or(d.partitions),
            max_body_bytes: self.max_body_bytes.unwrap_or(d.max_body_bytes),
            max_event_bytes: self.max_event_bytes.unwrap_or(d.max_event_bytes),
            max_events_per_request: self
                .max_events_per_request
                .unwrap_or(d.max_events_per_request),
            retention_ms: self.retention_ms.unwrap_or(d.retention_ms),
            retention_bytes: self.retention_bytes.unwrap_or(d.retention_bytes),
            max_in_flight_bytes: self.max_in_flight_bytes.unwrap_or(d.max_in_flight_bytes),
        }
    }
}

/// Streams: which exist, how new ones are created, their settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// Create a stream on its first append; when false only declared streams accept events
    /// (others get 404).
    pub auto_create: bool,
    /// Most streams the gateway will hold; creation beyond this is refused.
    pub max_streams: usize,
    /// Most streams one principal may create by producing to them (counted since the gateway
    /// started), so one producer cannot use up `max_streams` for everyone (0 = no limit).
    pub max_streams_per_principal: usize,
    pub defaults: StreamSettings,
    /// Streams with settings of their own, by name.
    pub declare: BTreeMap<String, StreamOverrides>,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            auto_create: true,
            max_streams: 1000,
            max_streams_per_principal: 250,
            defaults: StreamSettings::default(),
            declare: BTreeMap::new(),
        }
    }
}

impl StreamsConfig {
    /// The largest `max_events_per_request` of any stream (the defaults or a declaration).
    pub fn max_events_per_request(&self) -> u64 {
        self.declare
            .keys()
            .map(|name| self.settings(name).max_events_per_request)
            .fold(self.defaults.max_events_per_request, u64::max)
    }

    /// The settings of `stream`: its declaration over the defaults, or the defaults.
    pub fn settings(&self, stream: &str) -> StreamSettings {
        match self.declare.get(stream) {
            Some(o) => o.apply(&self.defaults),
            None => self.defaults,
        }
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
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Human,
            log_level: "info".into(),
        }
    }
}

/// One problem found in a configuration, with the key path it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `streams.declare.telemetry.partitions`, or the file for syntax errors.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A configuration that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} configuration problem(s):\n{}", .0.len(), render_problems(.0))]
    Invalid(Vec<Problem>),
}

fn render_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Loads `path` (or the defaults when `None`), applies `SLUICE_…` overrides from `env`, and
    /// validates the result.
    pub fn load<I>(path: Option<&Path>, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        let origin = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<defaults>".into());
        Self::from_toml_str(&text, &origin, env)
    }

    /// Parses `text` (named `origin` in errors), applies overrides from `env`, validates.
    pub fn from_toml_str<I>(text: &str, origin: &str, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::Invalid(vec![Problem {
                path: origin.to_string(),
                message: e.to_string().trim_end().to_string(),
            }])
        })?;
        let mut problems = Vec::new();
        apply_env(&mut table, env, &mut problems);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        let (config, mut problems) = deserialize_sections(table, origin);
        if problems.is_empty() {
            problems = config.validate();
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Every semantic problem of this configuration (empty when it is usable).
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut add = |path: &str, message: String| {
            p.push(Problem {
                path: path.to_string(),
                message,
            })
        };
        for (path, addr) in [
            ("http.listen", &self.http.listen),
            ("grpc.listen", &self.grpc.listen),
            ("mqtt.listen", &self.mqtt.listen),
            ("mqtt.tls_listen", &self.mqtt.tls_listen),
            ("admin.listen", &self.admin.listen),
        ] {
            if addr.parse::<SocketAddr>().is_err() {
                add(
                    path,
                    format!("`{addr}` is not an address like 127.0.0.1:8080 or [::1]:8080"),
                );
            }
        }
        if self.http.listen == self.admin.listen && !self.http.listen.ends_with(":0") {
            add("admin.listen", "must differ from http.listen".to_string());
        }
        if self.grpc.enabled
            && !self.grpc.listen.ends_with(":0")
            && (self.grpc.listen == self.http.listen || self.grpc.listen == self.admin.listen)
        {
            add(
                "grpc.listen",
                "must differ from http.listen and admin.listen".to_string(),
            );
        }
        if self.grpc.max_connections == 0 || self.grpc.max_concurrent_streams == 0 {
            add(
                "grpc",
                "max_connections and max_concurrent_streams must be at least 1".into(),
            );
        }
        if !(1..=4096).contains(&self.grpc.max_batches_in_flight) {
            add(
                "grpc.max_batches_in_flight",
                format!(
                    "{} is outside the allowed 1..=4096",
                    self.grpc.max_batches_in_flight
                ),
            );
        }
        if !(1024..=MAX_BODY_BYTES_LIMIT).contains(&self.grpc.max_message_bytes) {
            add(
                "grpc.max_message_bytes",
                format!(
                    "{} is outside the allowed 1024..={MAX_BODY_BYTES_LIMIT}",
                    self.grpc.max_message_bytes
                ),
            );
        }
        self.validate_mqtt(&mut add);
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
            if !(lo..=hi).contains(&v) {
                add(
                    &format!("websocket.{key}"),
                    format!("{v} is outside the allowed {lo}..={hi}"),
                );
            }
        }
        for o in &ws.allowed_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                add(
                    "websocket.allowed_origins",
                    format!("`{o}` is not an origin like https://app.example.com"),
                );
            }
        }
        if self.http.max_connections == 0 {
            add("http.max_connections", "must be at least 1".into());
        }
        if self.http.max_concurrent_requests == 0 {
            add("http.max_concurrent_requests", "must be at least 1".into());
        }
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
            ("log.flush_interval_ms", self.log.flush_interval_ms),
            (
                "log.retention_check_interval_ms",
                self.log.retention_check_interval_ms,
            ),
        ] {
            if v == 0 {
                add(path, "must be at least 1".into());
            }
        }
        if self.log.data_dir.as_os_str().is_empty() {
            add("log.data_dir", "must not be empty".into());
        }
        if !(4096..=(1 << 31)).contains(&self.log.segment_bytes) {
            add(
                "log.segment_bytes",
                format!(
                    "{} is outside the allowed 4096..=2147483648",
                    self.log.segment_bytes
                ),
            );
        }
        if !(64..=(1 << 24)).contains(&self.log.index_interval_bytes) {
            add(
                "log.index_interval_bytes",
                format!(
                    "{} is outside the allowed 64..=16777216",
                    self.log.index_interval_bytes
                ),
            );
        }
        if !(64 * 1024..=(1 << 30)).contains(&self.log.max_group_bytes) {
            add(
                "log.max_group_bytes",
                format!(
                    "{} is outside the allowed 65536..=1073741824",
                    self.log.max_group_bytes
                ),
            );
        }
        if self.streams.max_streams == 0 {
            add("streams.max_streams", "must be at least 1".into());
        }
        if self.streams.declare.len() > self.streams.max_streams {
            add(
                "streams.declare",
                format!(
                    "{} streams are declared but streams.max_streams is {}",
                    self.streams.declare.len(),
                    self.streams.max_streams
                ),
            );
        }
        let mut largest_body = 0;
        let mut check_stream = |prefix: &str, s: &StreamSettings, p: &mut Vec<Problem>| {
            let mut add = |key: &str, message: String| {
                p.push(Problem {
                    path: format!("{prefix}.{key}"),
                    message,
                })
            };
            if !(1..=MAX_PARTITIONS).contains(&s.partitions) {
                add(
                    "partitions",
                    format!(
                        "{} is outside the allowed 1..={MAX_PARTITIONS}",
                        s.partitions
                    ),
                );
            }
            if !(1..=MAX_BODY_BYTES_LIMIT).contains(&s.max_body_bytes) {
                add(
                    "max_body_bytes",
                    format!(
                        "{} is outside the allowed 1..={MAX_BODY_BYTES_LIMIT}",
                        s.max_body_bytes
                    ),
                );
            }
            if s.max_event_bytes == 0 || s.max_event_bytes > s.max_body_bytes {
                add(
                    "max_event_bytes",
                    format!(
                        "{} must be at least 1 and at most max_body_bytes ({})",
                        s.max_event_bytes, s.max_body_bytes
                    ),
                );
            }
            if !(1..=1_000_000).contains(&s.max_events_per_request) {
                add(
                    "max_events_per_request",
                    format!(
                        "{} is outside the allowed 1..=1000000",
                        s.max_events_per_request
                    ),
                );
            }
            largest_body = largest_body.max(s.max_body_bytes);
        };
        check_stream("streams.defaults", &self.streams.defaults, &mut p);
        for (name, o) in &self.streams.declare {
            let prefix = format!("streams.declare.{name}");
            if let Err(e) = check_stream_name(name) {
                p.push(Problem {
                    path: prefix.clone(),
                    message: e.to_string(),
                });
            }
            check_stream(&prefix, &o.apply(&self.streams.defaults), &mut p);
        }
        self.validate_auth(&mut p);
        if self.log.kind == LogKind::Kafka {
            self.validate_kafka(&mut p);
        }
        if self.limits.max_in_flight_bytes < largest_body {
            p.push(Problem {
                path: "limits.max_in_flight_bytes".into(),
                message: format!(
                    "{} is smaller than the largest max_body_bytes ({largest_body}); such a request could never be admitted",
                    self.limits.max_in_flight_bytes
                ),
            });
        }
        p
    }
}

/// JWT algorithms Sluice verifies.
pub const JWT_ALGORITHMS: [&str; 10] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA", "HS256",
];

impl Config {
    /// Whether any stream (the defaults or a declared one) acks durably.
    pub fn any_durable_stream(&self) -> bool {
        self.streams.defaults.ack == AckMode::Durable
            || self
                .streams
                .declare
                .values()
                .any(|o| o.apply(&self.streams.defaults).ack == AckMode::Durable)
    }

    fn validate_kafka(&self, p: &mut Vec<Problem>) {
        let k = &self.log.kafka;
        let mut add = |key: &str, message: String| {
            p.push(Problem {
                path: format!("log.kafka.{key}"),
                message,
            })
        };
        let servers: Vec<&str> = k.bootstrap_servers.split(',').map(str::trim).collect();
        if k.bootstrap_servers.trim().is_empty() {
            add("bootstrap_servers", "must name at least one broker".into());
        } else {
            for s in servers {
                let port = s.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
                if !matches!(port, Some((h, Ok(_))) if !h.is_empty()) {
                    add(
                        "bootstrap_servers",
                        format!("`{s}` is not a broker address like kafka-1:9092"),
                    );
                }
            }
        }
        match k.topic.matches("{stream}").count() {
            1 => {
                let rest = k.topic.replace("{stream}", "");
                if let Some(c) = rest
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
                {
                    add(
                        "topic",
                        format!(
                            "`{c}` cannot be part of a Kafka topic name (allowed: a-z A-Z 0-9 . _ -)"
                        ),
                    );
                } else if rest.len() > 200 {
                    add(
                        "topic",
                        "the template leaves too little of Kafka's 249 characters for stream names"
                            .into(),
                    );
                }
            }
            n => add(
                "topic",
                format!(
                    "must contain `{{stream}}` exactly once (found {n} times), e.g. `sluice.{{stream}}`"
                ),
            ),
        }
        if k.client_id.trim().is_empty() {
            add("client_id", "must not be empty".into());
        }
        for (key, v, lo, hi) in [
            ("linger_ms", k.linger_ms, 0, 900_000),
            ("batch_bytes", k.batch_bytes, 1, i32::MAX as u64),
            ("batch_events", k.batch_events, 1, 1_000_000),
            (
                "message_timeout_ms",
                k.message_timeout_ms,
                1,
                i32::MAX as u64,
            ),
            (
                "queue_max_bytes",
                k.queue_max_bytes,
                1024,
                (i32::MAX as u64) * 1024,
            ),
            ("queue_max_events", k.queue_max_events, 1, i32::MAX as u64),
            ("replication_factor", k.replication_factor as u64, 1, 32_767),
            ("metadata_timeout_ms", k.metadata_timeout_ms, 1, 3_600_000),
            (
                "health_check_interval_ms",
                k.health_check_interval_ms,
                10,
                3_600_000,
            ),
            ("metadata_refresh_ms", k.metadata_refresh_ms, 10, 86_400_000),
        ] {
            if !(lo..=hi).contains(&v) {
                add(key, format!("{v} is outside the allowed {lo}..={hi}"));
            }
        }
        let sec = &k.security;
        if sec.protocol.uses_sasl() {
            if sec.sasl_mechanism.is_none() {
                add(
                    "security.sasl_mechanism",
                    format!(
                        "protocol {} needs one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
                        sec.protocol.as_str()
                    ),
                );
            }
            if sec.sasl_username.is_none() || sec.sasl_password.is_none() {
                add(
                    "security",
                    format!(
                        "protocol {} needs sasl_username and sasl_password",
                        sec.protocol.as_str()
                    ),
                );
            }
        } else if sec.sasl_mechanism.is_some()
            || sec.sasl_username.is_some()
            || sec.sasl_password.is_some()
        {
            add(
                "security",
                format!(
                    "SASL settings need protocol = \"sasl_plaintext\" or \"sasl_ssl\" (it is {})",
                    sec.protocol.as_str()
                ),
            );
        }
        let tls_files = sec.ssl_ca_file.is_some()
            || sec.ssl_cert_file.is_some()
            || sec.ssl_key_file.is_some()
            || sec.ssl_key_password.is_some()
            || sec.ssl_verify_hostname.is_some();
        if tls_files && !sec.protocol.uses_tls() {
            add(
                "security",
                format!(
                    "ssl_* settings need protocol = \"ssl\" or \"sasl_ssl\" (it is {})",
                    sec.protocol.as_str()
                ),
            );
        }
        if sec.ssl_cert_file.is_some() != sec.ssl_key_file.is_some() {
            add(
                "security",
                "ssl_cert_file and ssl_key_file go together".into(),
            );
        }
        let durable = self.any_durable_stream();
        for (key, value) in &k.overrides {
            if let Some(why) = kafka_override_conflict(key, value, durable) {
                p.push(Problem {
                    path: format!("log.kafka.overrides.\"{key}\""),
                    message: why,
                });
            }
        }
    }

    fn validate_mqtt(&self, add: &mut impl FnMut(&str, String)) {
        let m = &self.mqtt;
        if !m.enabled {
            return;
        }
        let mut addrs = vec![
            ("http.listen", &self.http.listen),
            ("admin.listen", &self.admin.listen),
        ];
        if self.grpc.enabled {
            addrs.push(("grpc.listen", &self.grpc.listen));
        }
        let mut own = Vec::new();
        if m.plaintext {
            own.push(("mqtt.listen", &m.listen));
        }
        if m.tls.is_some() {
            own.push(("mqtt.tls_listen", &m.tls_listen));
        }
        for (i, (path, addr)) in own.iter().enumerate() {
            if addr.ends_with(":0") {
                continue;
            }
            let others = addrs.iter().chain(&own[..i]);
            if let Some((other, _)) = others.into_iter().find(|(_, a)| a == addr) {
                add(path, format!("`{addr}` is also {other}"));
            }
        }
        if !m.plaintext && m.tls.is_none() && !m.websocket {
            add(
                "mqtt.plaintext",
                "is false, and neither [mqtt.tls] nor mqtt.websocket is on: MQTT has no listener (set mqtt.enabled = false instead)".into(),
            );
        }
        for (key, v, lo, hi) in [
            ("max_connections", m.max_connections as u64, 1, 10_000_000),
            (
                "max_packet_bytes",
                u64::from(m.max_packet_bytes),
                64,
                256 * 1024 * 1024,
            ),
            ("receive_maximum", u64::from(m.receive_maximum), 1, 65_535),
            ("connect_timeout_ms", m.connect_timeout_ms, 100, 600_000),
            (
                "max_keep_alive_secs",
                u64::from(m.max_keep_alive_secs),
                1,
                65_535,
            ),
            ("write_timeout_ms", m.write_timeout_ms, 10, 3_600_000),
            ("max_hold_ms", m.max_hold_ms, 0, 3_600_000),
            (
                "max_pending_will_bytes",
                m.max_pending_will_bytes,
                0,
                1 << 40,
            ),
            (
                "max_pending_wills",
                m.max_pending_wills as u64,
                0,
                10_000_000,
            ),
        ] {
            if !(lo..=hi).contains(&v) {
                add(
                    &format!("mqtt.{key}"),
                    format!("{v} is outside the allowed {lo}..={hi}"),
                );
            }
        }
        if let Err((i, e)) = TopicMap::compile(&m.topics) {
            add(&format!("mqtt.topics[{i}]"), e);
        }
    }

    fn validate_auth(&self, p: &mut Vec<Problem>) {
        let mut add = |path: String, message: String| p.push(Problem { path, message });
        for (section, tls) in [
            ("http", &self.http.tls),
            ("grpc", &self.grpc.tls),
            ("mqtt", &self.mqtt.tls),
            ("admin", &self.admin.tls),
        ] {
            let Some(tls) = tls else { continue };
            if tls.client_auth != ClientAuth::None && tls.client_ca_file.is_none() {
                add(
                    format!("{section}.tls.client_ca_file"),
                    "is required when client_auth is optional or required".into(),
                );
            }
            if !tls.crl_files.is_empty() && tls.client_ca_file.is_none() {
                add(
                    format!("{section}.tls.crl_files"),
                    "CRLs need client_ca_file (they apply to client certificates)".into(),
                );
            }
            if tls.reload_interval_ms < 100 {
                add(
                    format!("{section}.tls.reload_interval_ms"),
                    "must be at least 100".into(),
                );
            }
            if tls.handshake_timeout_ms == 0 {
                add(
                    format!("{section}.tls.handshake_timeout_ms"),
                    "must be at least 1".into(),
                );
            }
        }
        let transports = self.producer_transports();
        for t in &transports {
            if t.methods.is_empty() && !t.allow_anonymous {
                add(
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
            add(
                "mqtt.auth.allow_anonymous".into(),
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
        let mut ids = std::collections::HashSet::new();
        for (i, k) in self.auth.api_keys.iter().enumerate() {
            let at = |key: &str| format!("auth.api_keys[{i}].{key}");
            if k.id.is_empty()
                || !k
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                add(
                    at("id"),
                    format!("`{}` must be 1+ characters of a-z A-Z 0-9 - _", k.id),
                );
            }
            if !ids.insert(k.id.as_str()) {
                add(at("id"), format!("`{}` is used by another key", k.id));
            }
            if k.secret_sha256.len() != 64
                || !k
                    .secret_sha256
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
            {
                add(
                    at("secret_sha256"),
                    "must be 64 lower-case hex digits (`sluice keys new` prints it)".into(),
                );
            }
            if k.principal.is_empty() {
                add(at("principal"), "must not be empty".into());
            }
            if let Some(t) = &k.expires_at
                && !t
                    .parse::<toml::value::Datetime>()
                    .is_ok_and(|t| t.date.is_some() && t.time.is_some() && t.offset.is_some())
            {
                add(
                    at("expires_at"),
                    "must be a date-time with an offset, e.g. 2027-01-01T00:00:00Z".into(),
                );
            }
        }
        let mut issuers = std::collections::HashSet::new();
        for (i, iss) in self.auth.jwt.issuers.iter().enumerate() {
            let at = |key: &str| format!("auth.jwt.issuers[{i}].{key}");
            if iss.issuer.is_empty() {
                add(at("issuer"), "must not be empty".into());
            }
            if !issuers.insert(iss.issuer.as_str()) {
                add(
                    at("issuer"),
                    format!("`{}` is configured twice", iss.issuer),
                );
            }
            if iss.audiences.is_empty() {
                add(at("audiences"), "must name at least one audience".into());
            }
            if iss.algorithms.is_empty() {
                add(at("algorithms"), "must name at least one algorithm".into());
            }
            for a in &iss.algorithms {
                if !JWT_ALGORITHMS.contains(&a.as_str()) {
                    add(
                        at("algorithms"),
                        format!("`{a}` is not one of {}", JWT_ALGORITHMS.join(", ")),
                    );
                }
            }
            let hs = iss.algorithms.iter().any(|a| a == "HS256");
            match (&iss.hs256_secret, hs) {
                (Some(_), false) => add(
                    at("hs256_secret"),
                    "is set but HS256 is not in algorithms".into(),
                ),
                (None, true) => add(
                    at("algorithms"),
                    "HS256 needs hs256_secret (it is never verified with a public key)".into(),
                ),
                (Some(sec), true) if sec.0.len() < 32 => {
                    add(at("hs256_secret"), "must be at least 32 bytes".into())
                }
                _ => {}
            }
            let asymmetric = iss.algorithms.iter().any(|a| a != "HS256");
            match (&iss.jwks_file, &iss.jwks_url) {
                (Some(_), Some(_)) => add(
                    at("jwks_url"),
                    "set either jwks_file or jwks_url, not both".into(),
                ),
                (None, None) if asymmetric => add(
                    at("jwks_url"),
                    "public-key algorithms need jwks_file or jwks_url".into(),
                ),
                _ => {}
            }
            if let Some(u) = &iss.jwks_url
                && !(u.starts_with("http://") || u.starts_with("https://"))
            {
                add(
                    at("jwks_url"),
                    format!("`{u}` must be an http:// or https:// URL"),
                );
            }
            if iss.jwks_refresh_interval_ms < 1000 {
                add(
                    at("jwks_refresh_interval_ms"),
                    "must be at least 1000".into(),
                );
            }
            if iss.principal_claim.is_empty() {
                add(at("principal_claim"), "must not be empty".into());
            }
        }
        for (i, r) in self.auth.mtls.rules.iter().enumerate() {
            if r.pattern.is_empty() {
                add(
                    format!("auth.mtls.rules[{i}].pattern"),
                    "must not be empty".into(),
                );
            }
        }
        for (i, r) in self.quotas.rules.iter().enumerate() {
            let at = |key: &str| format!("quotas.rules[{i}].{key}");
            if r.events_per_sec.is_none() && r.bytes_per_sec.is_none() {
                add(
                    at("events_per_sec"),
                    "a rule needs events_per_sec, bytes_per_sec or both".into(),
                );
            }
            for (key, v) in [
                ("events_per_sec", r.events_per_sec),
                ("bytes_per_sec", r.bytes_per_sec),
                ("burst_events", r.burst_events),
                ("burst_bytes", r.burst_bytes),
            ] {
                if v == Some(0) {
                    add(at(key), "must be at least 1".into());
                }
            }
            if r.burst_events.is_some() && r.events_per_sec.is_none() {
                add(at("burst_events"), "needs events_per_sec".into());
            }
            if r.burst_bytes.is_some() && r.bytes_per_sec.is_none() {
                add(at("burst_bytes"), "needs bytes_per_sec".into());
            }
        }
        if self.quotas.max_tracked_keys == 0 {
            add(
                "quotas.max_tracked_keys".into(),
                "must be at least 1".into(),
            );
        }
        let f = &self.auth.failures;
        if f.max_failures == 0 || f.window_ms == 0 || f.max_tracked_addresses == 0 {
            add(
                "auth.failures".into(),
                "max_failures, window_ms and max_tracked_addresses must be at least 1".into(),
            );
        }
    }
}

/// Why a stream name is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamNameError {
    #[error("a stream name must not be empty")]
    Empty,
    #[error("a stream name has at most 249 characters; this one has {0}")]
    TooLong(usize),
    #[error("`.` and `..` are not stream names")]
    Dots,
    #[error("a stream name may contain only a-z, A-Z, 0-9, `.`, `_` and `-`; found {0:?}")]
    BadChar(char),
}

/// Checks Kafka's topic rules: 1–249 characters of `[a-zA-Z0-9._-]`, neither `.` nor `..`.
pub fn check_stream_name(name: &str) -> Result<(), StreamNameError> {
    if name.is_empty() {
        return Err(StreamNameError::Empty);
    }
    if name.len() > 249 {
        return Err(StreamNameError::TooLong(name.chars().count()));
    }
    if name == "." || name == ".." {
        return Err(StreamNameError::Dots);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(StreamNameError::BadChar(c));
    }
    Ok(())
}

/// Deserializes each top-level section on its own, so that a mistake in one section does not
/// hide the mistakes in the others (serde stops at the first error it meets).
fn deserialize_sections(table: toml::Table, origin: &str) -> (Config, Vec<Problem>) {
    fn section<T: for<'de> Deserialize<'de> + Default>(
        table: &toml::Table,
        key: &str,
        origin: &str,
        problems: &mut Vec<Problem>,
    ) -> T {
        let Some(v) = table.get(key) else {
            return T::default();
        };
        T::deserialize(v.clone()).unwrap_or_else(|e| {
            problems.push(Problem {
                path: key.to_string(),
                message: format!("{} (in {origin})", e.message().trim_end()),
            });
            T::default()
        })
    }
    const SECTIONS: [&str; 12] = [
        "server",
        "http",
        "grpc",
        "websocket",
        "mqtt",
        "admin",
        "log",
        "limits",
        "streams",
        "telemetry",
        "auth",
        "quotas",
    ];
    let mut problems = Vec::new();
    for key in table.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            problems.push(Problem {
                path: key.clone(),
                message: format!(
                    "unknown section (in {origin}); expected one of {}",
                    SECTIONS.join(", ")
                ),
            });
        }
    }
    let p = &mut problems;
    let config = Config {
        server: section(&table, "server", origin, p),
        http: section(&table, "http", origin, p),
        grpc: section(&table, "grpc", origin, p),
        websocket: section(&table, "websocket", origin, p),
        mqtt: section(&table, "mqtt", origin, p),
        admin: section(&table, "admin", origin, p),
        log: section(&table, "log", origin, p),
        limits: section(&table, "limits", origin, p),
        streams: section(&table, "streams", origin, p),
        telemetry: section(&table, "telemetry", origin, p),
        auth: section(&table, "auth", origin, p),
        quotas: section(&table, "quotas", origin, p),
    };
    (config, problems)
}

/// Applies `SLUICE_SECTION__KEY=value` variables onto `table`. Key path segments are lowercased;
/// a value that parses as a TOML value (number, boolean, array, quoted string) is taken as such,
/// anything else as a plain string. Variables without `__` are not configuration keys.
fn apply_env<I>(table: &mut toml::Table, env: I, problems: &mut Vec<Problem>)
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains(ENV_SEPARATOR))
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split(ENV_SEPARATOR)
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(|s| s.is_empty()) {
            problems.push(Problem {
                path: name.clone(),
                message: "empty key segment in environment variable name".into(),
            });
            continue;
        }
        let value = parse_env_value(&raw);
        if let Err(message) = set_path(table, &path, value) {
            problems.push(Problem {
                path: name.clone(),
                message,
            });
        }
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Ok(()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [seg, rest @ ..] => match table
            .entry(seg.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(t) => set_path(t, rest, value),
            _ => Err(format!("`{seg}` is not a section")),
        },
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let c = Config::from_toml_str("", "t", no_env()).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.http.listen, "127.0.0.1:8080");
        assert_eq!(c.admin.listen, "127.0.0.1:9090");
        assert_eq!(c.log.data_dir, PathBuf::from("./data"));
        assert!(c.streams.auto_create);
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let text = r#"
            [http]
            listen = "nowhere"
            [log]
            segment_bytes = 10
            [streams.defaults]
            partitions = 0
            [streams.declare."bad name"]
            max_event_bytes = 999999999
        "#;
        let Err(ConfigError::Invalid(problems)) = Config::from_toml_str(text, "t", no_env()) else {
            panic!("expected invalid config");
        };
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert!(paths.contains(&"http.listen"), "{paths:?}");
        assert!(paths.contains(&"log.segment_bytes"), "{paths:?}");
        assert!(paths.contains(&"streams.defaults.partitions"), "{paths:?}");
        assert!(paths.contains(&"streams.declare.bad name"), "{paths:?}");
        assert!(
            paths.contains(&"streams.declare.bad name.max_event_bytes"),
            "{paths:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.message.contains("only a-z, A-Z, 0-9")),
            "{problems:?}"
        );
    }

    fn problems(text: &str) -> Vec<Problem> {
        match Config::from_toml_str(text, "t", no_env()) {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected invalid config, got {other:?}"),
        }
    }

    #[test]
    fn kafka_settings_parse_with_their_defaults() {
        let text = r#"
            [log]
            kind = "kafka"
            [log.kafka]
            bootstrap_servers = "k1:9092, k2:9093"
            topic = "sluice.{stream}"
            compression = "lz4"
            [log.kafka.security]
            protocol = "sasl_ssl"
            sasl_mechanism = "SCRAM-SHA-512"
            sasl_username = "gw"
            sasl_password = "s3cret-s3cret"
            [log.kafka.overrides]
            "socket.keepalive.enable" = "true"
        "#;
        let c = Config::from_toml_str(text, "t", no_env()).unwrap();
        assert_eq!(c.log.kind, LogKind::Kafka);
        let k = &c.log.kafka;
        assert_eq!(k.compression, KafkaCompression::Lz4);
        assert_eq!(k.topic, "sluice.{stream}");
        assert_eq!(k.linger_ms, KafkaConfig::default().linger_ms);
        assert_eq!(
            k.security.sasl_mechanism,
            Some(KafkaSaslMechanism::ScramSha512)
        );
        assert!(!format!("{k:?}").contains("s3cret"), "password printed");
        assert_eq!(KafkaConfig::default().compression, KafkaCompression::Zstd);
    }

    #[test]
    fn kafka_conflicts_and_gaps_are_rejected_with_their_paths() {
        let p = problems(
            r#"
            [log]
            kind = "kafka"
            [log.kafka]
            bootstrap_servers = "nohost"
            topic = "events"
            message_timeout_ms = 0
            [log.kafka.security]
            protocol = "sasl_plaintext"
            ssl_ca_file = "/ca.pem"
            [log.kafka.overrides]
            "enable.idempotence" = "false"
            "acks" = "1"
            "linger.ms" = "5"
            "delivery.report.only.error" = "true"
        "#,
        );
        let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "log.kafka.bootstrap_servers",
            "log.kafka.topic",
            "log.kafka.message_timeout_ms",
            "log.kafka.security.sasl_mechanism",
            "log.kafka.security",
            "log.kafka.overrides.\"enable.idempotence\"",
            "log.kafka.overrides.\"acks\"",
            "log.kafka.overrides.\"linger.ms\"",
            "log.kafka.overrides.\"delivery.report.only.error\"",
        ] {
            assert!(paths.contains(&want), "{want} missing from {p:#?}");
        }
        let linger = p.iter().find(|p| p.path.contains("linger.ms")).unwrap();
        assert!(linger.message.contains("log.kafka.linger_ms"), "{linger:?}");
    }

    #[test]
    fn idempotence_may_be_off_only_when_no_stream_acks_durably() {
        let base = r#"
            [log]
            kind = "kafka"
            [log.kafka.overrides]
            "enable.idempotence" = "false"
            "acks" = "1"
            [streams.defaults]
            ack = "received"
        "#;
        Config::from_toml_str(base, "t", no_env()).unwrap();
        let p = problems(&format!(
            "{base}\n[streams.declare.audit]\nack = \"durable\"\n"
        ));
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(p[0].message.contains("durabl"), "{p:#?}");
        // The same overrides are not checked while the embedded log is in use.
        Config::from_toml_str(
            &base.replace("kind = \"kafka\"", "kind = \"embedded\""),
            "t",
            no_env(),
        )
        .unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let Err(ConfigError::Invalid(p)) =
            Config::from_toml_str("[http]\nlisten_addr = \"x\"\n", "f.toml", no_env())
        else {
            panic!("expected invalid config");
        };
        assert_eq!(p.len(), 1);
        assert!(p[0].message.contains("listen_addr"), "{:?}", p[0]);
    }

    #[test]
    fn type_errors_in_several_sections_are_all_reported() {
        let text = "[http]\nlisten = 5\n[log]\nsegment_bytes = \"big\"\n[extra]\n";
        let Err(ConfigError::Invalid(p)) = Config::from_toml_str(text, "f.toml", no_env()) else {
            panic!("expected invalid config");
        };
        let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, vec!["extra", "http", "log"], "{p:?}");
        assert!(p[1].message.contains("string"), "{:?}", p[1]);
    }

    #[test]
    fn syntax_errors_name_the_file_and_line() {
        let Err(ConfigError::Invalid(p)) =
            Config::from_toml_str("[http\nlisten = 1\n", "f.toml", no_env())
        else {
            panic!("expected invalid config");
        };
        assert_eq!(p[0].path, "f.toml");
        assert!(p[0].message.contains("line 1"), "{:?}", p[0]);
    }

    #[test]
    fn environment_overrides_file_values() {
        let env = vec![
            ("SLUICE_HTTP__LISTEN".to_string(), "127.0.0.1:0".to_string()),
            (
                "SLUICE_STREAMS__AUTO_CREATE".to_string(),
                "false".to_string(),
            ),
            (
                "SLUICE_STREAMS__DEFAULTS__PARTITIONS".to_string(),
                "3".to_string(),
            ),
            ("SLUICE_LOG__DATA_DIR".to_string(), "/tmp/x".to_string()),
            ("SLUICE_UNRELATED".to_string(), "ignored".to_string()),
        ];
        let c = Config::from_toml_str("[http]\nlisten = \"127.0.0.1:1\"\n", "t", env).unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:0");
        assert!(!c.streams.auto_create);
        assert_eq!(c.streams.defaults.partitions, 3);
        assert_eq!(c.log.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn environment_typos_are_reported() {
        let env = vec![("SLUICE_HTTP__LISTN".to_string(), "x".to_string())];
        let Err(ConfigError::Invalid(p)) = Config::from_toml_str("", "t", env) else {
            panic!("expected invalid config");
        };
        assert!(p[0].message.contains("listn"), "{p:?}");
    }

    #[test]
    fn declared_streams_override_defaults() {
        let text = r#"
            [streams.defaults]
            ack = "durable"
            partitions = 2
            [streams.declare.fast]
            ack = "received"
        "#;
        let c = Config::from_toml_str(text, "t", no_env()).unwrap();
        let fast = c.streams.settings("fast");
        assert_eq!(fast.ack, AckMode::Received);
        assert_eq!(fast.partitions, 2);
        assert_eq!(c.streams.settings("other").ack, AckMode::Durable);
    }

    #[test]
    fn anonymous_is_allowed_by_default_only_on_loopback() {
        let l = ListenerAuthConfig::default();
        assert!(l.anonymous_allowed("127.0.0.1:8080"));
        assert!(l.anonymous_allowed("[::1]:8080"));
        assert!(!l.anonymous_allowed("0.0.0.0:8080"));
        assert!(!l.anonymous_allowed("10.1.2.3:8080"));
        let explicit = ListenerAuthConfig {
            allow_anonymous: Some(false),
            ..ListenerAuthConfig::default()
        };
        assert!(!explicit.anonymous_allowed("127.0.0.1:8080"));
    }

    /// The transports' anonymity, by name, for `text`.
    fn anonymity(text: &str) -> Vec<(&'static str, bool)> {
        let c = Config::from_toml_str(text, "t", no_env()).unwrap();
        c.producer_transports()
            .into_iter()
            .map(|t| (t.name, t.allow_anonymous))
            .collect()
    }

    #[test]
    fn anonymity_is_decided_per_listener_and_transport() {
        // Defaults: everything on loopback, everything open to local producers.
        assert_eq!(
            anonymity(""),
            [
                ("http", true),
                ("grpc", true),
                ("mqtt", true),
                ("mqtt_ws", true)
            ]
        );
        // The HTTP listener on the network: the HTTP API and MQTT over WebSocket on it both
        // refuse anonymous producers; the MQTT TCP listener, still on loopback, does not.
        assert_eq!(
            anonymity("[http]\nlisten = \"0.0.0.0:8080\"\n"),
            [
                ("http", false),
                ("grpc", true),
                ("mqtt", true),
                ("mqtt_ws", false)
            ]
        );
        // The MQTT TLS listener on the network refuses them; the loopback TCP one does not.
        let tls = "[mqtt]\ntls_listen = \"0.0.0.0:8883\"\n[mqtt.tls]\ncert_file = \"c\"\nkey_file = \"k\"\n";
        assert_eq!(
            anonymity(tls),
            [
                ("http", true),
                ("grpc", true),
                ("mqtt", true),
                ("mqtts", false),
                ("mqtt_ws", true)
            ]
        );
        let c = Config::from_toml_str(tls, "t", no_env()).unwrap();
        let mqtts = c.producer_transport("mqtts").unwrap();
        assert_eq!(
            (mqtts.listen.as_str(), mqtts.listen_key),
            ("0.0.0.0:8883", "mqtt.tls_listen")
        );
    }

    #[test]
    fn transports_of_one_listener_that_disagree_on_anonymity_are_refused() {
        for (text, ok) in [
            // MQTT allows anonymous producers where HTTP refuses them (the hole of issue 14).
            (
                "[http]\nlisten = \"0.0.0.0:8080\"\n[mqtt.auth]\nallow_anonymous = true\n",
                false,
            ),
            // MQTT refuses them where HTTP (on loopback) allows them.
            ("[mqtt.auth]\nallow_anonymous = false\n", false),
            // Either side made to agree, or MQTT over WebSocket off: accepted.
            (
                "[http.auth]\nallow_anonymous = false\n[mqtt.auth]\nallow_anonymous = false\n",
                true,
            ),
            (
                "[mqtt]\nwebsocket = false\n[mqtt.auth]\nallow_anonymous = false\n",
                true,
            ),
            ("[http.auth]\nallow_anonymous = false\n", true),
        ] {
            match Config::from_toml_str(text, "t", no_env()) {
                Ok(_) => assert!(ok, "accepted: {text}"),
                Err(ConfigError::Invalid(problems)) => {
                    assert!(!ok, "refused: {text}: {problems:?}");
                    assert_eq!(problems.len(), 1, "{problems:?}");
                    assert_eq!(problems[0].path, "mqtt.auth.allow_anonymous");
                    assert!(
                        problems[0].message.contains("would disagree"),
                        "{}",
                        problems[0].message
                    );
                }
                Err(e) => panic!("{e}"),
            }
        }
        // With MQTT over WebSocket following the HTTP listener, it is as closed as HTTP.
        assert_eq!(
            anonymity("[http.auth]\nallow_anonymous = false\n"),
            [
                ("http", false),
                ("grpc", true),
                ("mqtt", true),
                ("mqtt_ws", false)
            ]
        );
    }

    #[test]
    fn a_transport_nobody_could_use_is_named() {
        let text = "[mqtt]\ntls_listen = \"0.0.0.0:8883\"\n[mqtt.tls]\ncert_file = \"c\"\nkey_file = \"k\"\n[mqtt.auth]\nmethods = []\n";
        let Err(ConfigError::Invalid(problems)) = Config::from_toml_str(text, "t", no_env()) else {
            panic!("expected invalid config");
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "mqtt.auth.methods");
        assert!(
            problems[0]
                .message
                .contains("mqtt.tls_listen (0.0.0.0:8883)"),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn auth_settings_are_validated() {
        let text = r#"
            [http.tls]
            cert_file = "c.pem"
            key_file = "k.pem"
            client_auth = "required"
            [[auth.api_keys]]
            id = "a.b"
            secret_sha256 = "XYZ"
            principal = "p"
            streams = ["*"]
            expires_at = "tomorrow"
            [[auth.jwt.issuers]]
            issuer = "i"
            audiences = []
            algorithms = ["HS256", "none"]
        "#;
        let Err(ConfigError::Invalid(p)) = Config::from_toml_str(text, "t", no_env()) else {
            panic!("expected invalid config");
        };
        let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "http.tls.client_ca_file",
            "auth.api_keys[0].id",
            "auth.api_keys[0].secret_sha256",
            "auth.api_keys[0].expires_at",
            "auth.jwt.issuers[0].audiences",
            "auth.jwt.issuers[0].algorithms",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
        assert!(
            p.iter()
                .any(|p| p.message.contains("HS256 needs hs256_secret")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|p| p.message.contains("`none` is not one of")),
            "{p:?}"
        );
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let s = Secret("hunter2-hunter2-hunter2-hunter2-x".into());
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn stream_names_follow_kafka_rules() {
        assert!(check_stream_name("orders.v1-eu_2").is_ok());
        assert_eq!(check_stream_name(""), Err(StreamNameError::Empty));
        assert_eq!(check_stream_name("."), Err(StreamNameError::Dots));
        assert_eq!(check_stream_name(".."), Err(StreamNameError::Dots));
        assert_eq!(check_stream_name("a/b"), Err(StreamNameError::BadChar('/')));
        assert!(check_stream_name(&"a".repeat(249)).is_ok());
        assert_eq!(
            check_stream_name(&"a".repeat(250)),
            Err(StreamNameError::TooLong(250))
        );
    }

    #[test]
    fn the_secure_example_allows_no_anonymous_producer_anywhere() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/secure.toml");
        let c = Config::load(Some(&path), no_env()).unwrap();
        let transports = c.producer_transports();
        let names: Vec<&str> = transports.iter().map(|t| t.name).collect();
        assert_eq!(names, ["http", "grpc", "mqtts", "mqtt_ws"]);
        for t in &transports {
            assert!(!t.allow_anonymous, "{t:?}");
        }
        // Explicitly so: moved to a loopback address, nothing opens up.
        let env = [
            ("SLUICE_HTTP__LISTEN", "127.0.0.1:0"),
            ("SLUICE_GRPC__LISTEN", "127.0.0.1:0"),
            ("SLUICE_MQTT__TLS_LISTEN", "127.0.0.1:0"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let c = Config::load(Some(&path), env).unwrap();
        assert!(c.producer_transports().iter().all(|t| !t.allow_anonymous));
    }

    /// Replays the `config_loader` fuzz target's seed corpus (config/fuzz/corpus): `ok-*` seeds
    /// are accepted, `bad-*` seeds refused, none panics.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config_loader");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("the seed corpus exists") {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            let accepted = fuzz_check(&text);
            if name.starts_with("ok-") {
                assert!(accepted, "{name} should be accepted");
            } else if name.starts_with("bad-") {
                assert!(!accepted, "{name} should be refused");
            }
            seen += 1;
        }
        assert!(seen >= 8, "only {seen} seeds");
    }

    /// Every property Sluice sets for the producer is one an override may not set (or, for the
    /// guarantees, may set only to Sluice's own value), so the two lists cannot drift apart.
    #[test]
    fn managed_kafka_properties_and_refused_overrides_agree() {
        let mut k = KafkaConfig::default();
        k.security.sasl_mechanism = Some(KafkaSaslMechanism::ScramSha512);
        k.security.sasl_username = Some("u".into());
        k.security.sasl_password = Some(Secret("p".into()));
        k.security.ssl_ca_file = Some("ca.pem".into());
        k.security.ssl_cert_file = Some("c.pem".into());
        k.security.ssl_key_file = Some("k.pem".into());
        k.security.ssl_key_password = Some(Secret("kp".into()));
        k.security.ssl_verify_hostname = Some(true);
        let props = k.producer_properties();
        for (key, value) in &props {
            match key.as_str() {
                // Guarantees: refused only when weakened while a stream acks durably.
                "enable.idempotence" | "acks" => {
                    assert!(kafka_override_conflict(key, value, true).is_none(), "{key}");
                    let weaker = if key == "acks" { "1" } else { "false" };
                    assert!(
                        kafka_override_conflict(key, weaker, true).is_some(),
                        "{key}"
                    );
                }
                // Tunable by an override on purpose (documented in docs/kafka.md).
                "statistics.interval.ms" => {
                    assert!(kafka_override_conflict(key, "0", true).is_none())
                }
                _ => assert!(
                    kafka_override_conflict(key, value, true).is_some(),
                    "`{key}` is set by Sluice but an override could replace it"
                ),
            }
        }
        // And every managed property is one Sluice actually sets (or an alias of one).
        let set: std::collections::HashSet<&str> = props.iter().map(|(k, _)| k.as_str()).collect();
        for (key, instead) in KAFKA_MANAGED_PROPERTIES {
            let alias = matches!(
                *key,
                "metadata.broker.list"
                    | "compression.type"
                    | "queue.buffering.max.ms"
                    | "delivery.timeout.ms"
                    | "sasl.mechanisms"
                    | "partitioner"
            );
            assert!(
                set.contains(key) || alias,
                "{key} ({instead}) is refused but never set"
            );
        }
    }

    #[test]
    fn every_example_config_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(Some(&path), no_env())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 2, "expected example configs in {}", dir.display());
    }
}
