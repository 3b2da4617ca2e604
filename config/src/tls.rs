//! TLS for a listener (`[http.tls]`, `[grpc.tls]`, `[mqtt.tls]`, `[admin.tls]`).

use std::path::PathBuf;

use serde::Deserialize;

use crate::{Config, Problems};

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

fn default_tls_reload_ms() -> u64 {
    10_000
}

fn default_handshake_ms() -> u64 {
    10_000
}

impl Config {
    pub(crate) fn validate_tls(&self, p: &mut Problems) {
        for (section, tls) in [
            ("http", &self.http.tls),
            ("grpc", &self.grpc.tls),
            ("mqtt", &self.mqtt.tls),
            ("admin", &self.admin.tls),
        ] {
            let Some(tls) = tls else { continue };
            if tls.client_auth != ClientAuth::None && tls.client_ca_file.is_none() {
                p.add(
                    format!("{section}.tls.client_ca_file"),
                    "is required when client_auth is optional or required",
                );
            }
            if !tls.crl_files.is_empty() && tls.client_ca_file.is_none() {
                p.add(
                    format!("{section}.tls.crl_files"),
                    "CRLs need client_ca_file (they apply to client certificates)",
                );
            }
            if tls.reload_interval_ms < 100 {
                p.add(
                    format!("{section}.tls.reload_interval_ms"),
                    "must be at least 100",
                );
            }
            if tls.handshake_timeout_ms == 0 {
                p.add(
                    format!("{section}.tls.handshake_timeout_ms"),
                    "must be at least 1",
                );
            }
        }
    }
}
