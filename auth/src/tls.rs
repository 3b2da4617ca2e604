//! TLS for listeners (rustls with the ring provider; TLS 1.2 and 1.3 only): certificate and key
//! from PEM files, optional or required client certificates verified against a CA bundle and
//! CRLs, and reloading when any of the files changes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use sluice_config::{ClientAuth, TlsConfig};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for c in certs(path)? {
        store
            .add(c)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(store)
}

/// Builds a listener's TLS configuration from its files.
pub fn server_config(cfg: &TlsConfig) -> Result<ServerConfig, String> {
    let chain = certs(&cfg.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(|e| format!("{}: {e}", cfg.key_file.display()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match (cfg.client_auth, &cfg.client_ca_file) {
        (ClientAuth::None, _) | (_, None) => builder.with_no_client_auth(),
        (mode, Some(ca)) => {
            let mut crls = Vec::new();
            for f in &cfg.crl_files {
                for crl in CertificateRevocationListDer::pem_file_iter(f)
                    .map_err(|e| format!("{}: {e}", f.display()))?
                {
                    crls.push(crl.map_err(|e| format!("{}: {e}", f.display()))?);
                }
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                .with_crls(crls);
            let v = if mode == ClientAuth::Optional {
                v.allow_unauthenticated()
            } else {
                v
            };
            builder.with_client_cert_verifier(v.build().map_err(|e| e.to_string())?)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A client configuration trusting the system roots plus `extra_ca` (for JWKS URLs).
pub fn client_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut store = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = store.add(c);
    }
    if let Some(ca) = extra_ca {
        for c in certs(ca)? {
            store.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
        }
    }
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())
        .map(|b| b.with_root_certificates(store).with_no_client_auth())
}

/// Certificates the listener's CRLs revoke: (issuer name, serial), both as raw DER.
type RevokedSerials = HashSet<(Vec<u8>, Vec<u8>)>;

fn revoked_serials(cfg: &TlsConfig) -> Result<RevokedSerials, String> {
    let mut out = HashSet::new();
    for f in &cfg.crl_files {
        for crl in CertificateRevocationListDer::pem_file_iter(f)
            .map_err(|e| format!("{}: {e}", f.display()))?
        {
            let crl = crl.map_err(|e| format!("{}: {e}", f.display()))?;
            let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref())
                .map_err(|e| format!("{}: {e}", f.display()))?;
            let issuer = parsed.issuer().as_raw().to_vec();
            for r in parsed.iter_revoked_certificates() {
                out.insert((issuer.clone(), r.raw_serial().to_vec()));
            }
        }
    }
    Ok(out)
}

/// A listener's TLS configuration that follows its files: [`TlsReloader::watch`] checks them on
/// an interval and swaps in a new configuration when one changed; a configuration that fails to
/// load is logged and the previous one keeps serving. New connections use the current one.
pub struct TlsReloader {
    cfg: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// What the current CRLs revoke, for sessions that outlive their handshake.
    revoked: RwLock<Arc<RevokedSerials>>,
    /// Changes on every reload.
    reloaded: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReloader")
            .field("cert_file", &self.cfg.cert_file)
            .finish_non_exhaustive()
    }
}

fn stamps(cfg: &TlsConfig) -> Vec<Option<SystemTime>> {
    let mut files: Vec<&PathBuf> = vec![&cfg.cert_file, &cfg.key_file];
    files.extend(cfg.client_ca_file.iter());
    files.extend(cfg.crl_files.iter());
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

impl TlsReloader {
    pub fn new(cfg: &TlsConfig) -> Result<Arc<Self>, String> {
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(server_config(cfg)?)),
            revoked: RwLock::new(Arc::new(revoked_serials(cfg)?)),
            reloaded: tokio::sync::watch::channel(0).0,
            cfg: cfg.clone(),
        }))
    }

    /// A receiver that changes whenever the files are reloaded.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloaded.subscribe()
    }

    /// Whether the current CRLs revoke the certificate `cert` (DER): for sessions whose
    /// handshake happened before the CRL was loaded.
    pub fn is_revoked(&self, cert: &[u8]) -> bool {
        let Ok((_, c)) = x509_parser::parse_x509_certificate(cert) else {
            return false; // it verified at its handshake; nothing to look up
        };
        let key = (c.issuer().as_raw().to_vec(), c.raw_serial().to_vec());
        self.revoked.read().unwrap().contains(&key)
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap().clone()
    }

    /// Reloads the files whenever their modification times change, until the process ends.
    pub async fn watch(self: Arc<Self>) {
        let mut seen = stamps(&self.cfg);
        let every = Duration::from_millis(self.cfg.reload_interval_ms);
        loop {
            tokio::time::sleep(every).await;
            let now = stamps(&self.cfg);
            if now == seen {
                continue;
            }
            match server_config(&self.cfg).and_then(|c| Ok((c, revoked_serials(&self.cfg)?))) {
                Ok((c, revoked)) => {
                    *self.current.write().unwrap() = Arc::new(c);
                    *self.revoked.write().unwrap() = Arc::new(revoked);
                    self.reloaded.send_modify(|n| *n += 1);
                    seen = now;
                    tracing::info!(cert = %self.cfg.cert_file.display(), "TLS configuration reloaded");
                }
                Err(e) => {
                    // Maybe a half-written file: keep serving and try again next time.
                    tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous configuration");
                }
            }
        }
    }

    /// Handshake timeout of this listener.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.handshake_timeout_ms)
    }
}
