//! Test PKI and token material, generated inside the tests: CAs, server and client certificates
//! (rcgen), JWT signing keys with their JWKs (EC and Ed25519 by rcgen, RSA by `openssl genrsa`,
//! which ring cannot do), a local HTTPS server that serves a JWKS and can rotate keys or go
//! down, and a TLS client with an optional client certificate.

use crate::OutputWithin;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use time::{Duration as TimeDuration, OffsetDateTime};
use tokio::net::{TcpListener, TcpStream};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A certificate authority that issues test certificates.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate with its key, as PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Result<Ca> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ok(Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
        })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `cn` with the given SANs (DNS names, IPs, `uri:` URIs), valid from
    /// `not_before` to `not_after` days from now.
    pub fn issue(
        &self,
        cn: &str,
        sans: &[&str],
        not_before: i64,
        not_after: i64,
    ) -> Result<Issued> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        for san in sans {
            params
                .subject_alt_names
                .push(if let Some(uri) = san.strip_prefix("uri:") {
                    SanType::URI(uri.try_into()?)
                } else if let Ok(ip) = san.parse() {
                    SanType::IpAddress(ip)
                } else {
                    SanType::DnsName((*san).try_into()?)
                });
        }
        let now = OffsetDateTime::now_utc();
        params.not_before = now + TimeDuration::days(not_before);
        params.not_after = now + TimeDuration::days(not_after);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A currently valid certificate with the given serial number.
    pub fn issue_serial(&self, cn: &str, sans: &[&str], serial: u64) -> Result<Issued> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        for san in sans {
            params
                .subject_alt_names
                .push(SanType::DnsName((*san).try_into()?));
        }
        params.serial_number = Some(serial.into());
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A CRL revoking the certificates with these serial numbers.
    pub fn crl(&self, revoked: &[u64]) -> Result<String> {
        let now = OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - TimeDuration::days(1),
            next_update: now + TimeDuration::days(30),
            crl_number: 1u64.into(),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&serial| rcgen::RevokedCertParams {
                    serial_number: serial.into(),
                    revocation_time: now - TimeDuration::hours(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    /// A currently valid certificate.
    pub fn issue_valid(&self, cn: &str, sans: &[&str]) -> Result<Issued> {
        self.issue(cn, sans, -1, 30)
    }
}

/// Writes `contents` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, contents: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, contents)?;
    Ok(p)
}

/// A JWT signing key and its public JWK.
pub struct SigningKey {
    pub alg: Algorithm,
    pub kid: String,
    encoding: EncodingKey,
    pub jwk: Value,
    /// The public key as PEM (SubjectPublicKeyInfo), for algorithm-confusion tests.
    pub public_pem: String,
}

impl SigningKey {
    /// An ES256 key (P-256).
    pub fn es256(kid: &str) -> Result<Self> {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let raw = kp.public_key_raw(); // 0x04 | x | y
        Ok(Self {
            alg: Algorithm::ES256,
            kid: kid.into(),
            encoding: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes())?,
            jwk: json!({"kty":"EC","crv":"P-256","kid":kid,"use":"sig",
                        "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}),
            public_pem: kp.public_key_pem(),
        })
    }

    /// An EdDSA key (Ed25519).
    pub fn ed25519(kid: &str) -> Result<Self> {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        Ok(Self {
            alg: Algorithm::EdDSA,
            kid: kid.into(),
            encoding: EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes())?,
            jwk: json!({"kty":"OKP","crv":"Ed25519","kid":kid,"use":"sig",
                        "x": b64(kp.public_key_raw())}),
            public_pem: kp.public_key_pem(),
        })
    }

    /// A 2048-bit RSA key used with `alg` (RS* or PS*), generated by `openssl`.
    pub fn rsa(kid: &str, alg: Algorithm, dir: &Path) -> Result<Self> {
        let path = dir.join(format!("{kid}.rsa.pem"));
        let ok = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&path)
            .output_within(crate::DEADLINE)
            .context("running openssl")?;
        if !ok.status.success() {
            bail!(
                "openssl genpkey failed: {}",
                String::from_utf8_lossy(&ok.stderr)
            );
        }
        let modulus = std::process::Command::new("openssl")
            .args(["rsa", "-noout", "-modulus", "-in"])
            .arg(&path)
            .output_within(crate::DEADLINE)?;
        let hex = String::from_utf8(modulus.stdout)?;
        let hex = hex.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<_, _>>()?;
        let public = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&path)
            .output_within(crate::DEADLINE)?;
        let pem = std::fs::read(&path)?;
        Ok(Self {
            alg,
            kid: kid.into(),
            encoding: EncodingKey::from_rsa_pem(&pem)?,
            jwk: json!({"kty":"RSA","kid":kid,"use":"sig","n": b64(&n),"e":"AQAB"}),
            public_pem: String::from_utf8(public.stdout)?,
        })
    }

    /// Signs `claims` with this key (and its kid).
    pub fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.encoding).expect("signing")
    }

    /// Signs `claims` claiming `kid` (which may be another key's).
    pub fn sign_as(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, claims, &self.encoding).expect("signing")
    }
}

/// An HS256 token signed with `secret`.
pub fn hs256(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("signing")
}

/// An unsigned token (`alg: none`).
pub fn unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    )
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// A local HTTPS server serving a JWKS document that tests can replace or take down.
/// A TLS acceptor for a test server on loopback: a certificate from `ca` for 127.0.0.1 and
/// localhost, named `cn`.
pub fn loopback_acceptor(ca: &Ca, cn: &str) -> Result<tokio_rustls::TlsAcceptor> {
    let cert = ca.issue_valid(cn, &["127.0.0.1", "localhost"])?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes())?],
        PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())?,
    )?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

pub struct JwksServer {
    pub addr: SocketAddr,
    doc: Arc<Mutex<Option<String>>>,
    hits: Arc<Mutex<u64>>,
}

impl JwksServer {
    /// Serves `keys` at `https://127.0.0.1:PORT/jwks.json` with a certificate from `ca`.
    pub async fn start(ca: &Ca, keys: &[&SigningKey]) -> Result<JwksServer> {
        let acceptor = loopback_acceptor(ca, "jwks")?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let doc = Arc::new(Mutex::new(Some(jwks(keys))));
        let hits = Arc::new(Mutex::new(0));
        let (d, h) = (doc.clone(), hits.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, d, h) = (acceptor.clone(), d.clone(), h.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |_req| {
                        let (d, h) = (d.clone(), h.clone());
                        async move {
                            *h.lock().unwrap() += 1;
                            let body = d.lock().unwrap().clone();
                            let mut r = hyper::Response::new(Full::new(Bytes::from(
                                body.clone().unwrap_or_default(),
                            )));
                            if body.is_none() {
                                *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                            }
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(JwksServer { addr, doc, hits })
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/jwks.json", self.addr.port())
    }

    /// Serves these keys from now on (a key rotation).
    pub fn set_keys(&self, keys: &[&SigningKey]) {
        *self.doc.lock().unwrap() = Some(jwks(keys));
    }

    /// Answers 503 from now on (the identity provider is down).
    pub fn go_down(&self) {
        *self.doc.lock().unwrap() = None;
    }

    /// Requests served so far.
    pub fn hits(&self) -> u64 {
        *self.hits.lock().unwrap()
    }
}

fn jwks(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

/// A TLS client trusting `ca`, with an optional client certificate.
pub fn tls_client(ca_pem: &str, client: Option<&Issued>) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes())?)?;
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    Ok(Arc::new(match client {
        Some(c) => b.with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(c.cert_pem.as_bytes())?],
            PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())?,
        )?,
        None => b.with_no_client_auth(),
    }))
}

/// A response as a test sees it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Value,
}

/// POSTs `body` as JSON over TLS to `addr` with `headers`. An error means the TLS handshake or
/// the connection failed.
pub async fn tls_post(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Answer> {
    tls_request(addr, tls, http::Method::POST, path, headers, body).await
}

/// Sends one request over a new TLS connection; an error (never a hang) when the gateway has
/// not answered within [`crate::DEADLINE`].
pub async fn tls_request(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Answer> {
    tokio::time::timeout(
        crate::DEADLINE,
        tls_request_now(addr, tls, method, path, headers, body),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no answer over TLS within {:?}", crate::DEADLINE))?
}

async fn tls_request_now(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Answer> {
    let tcp = TcpStream::connect(addr).await?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(body.to_string())))?)
        .await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok(Answer {
        status,
        headers,
        body,
    })
}
