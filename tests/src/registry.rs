//! A stand-in Schema Registry for the tests: no Confluent or Apicurio server installs from
//! this machine's package sources, so this serves the two documented Confluent REST endpoints
//! Sluice uses, and only those, with the registry's answer shapes:
//!
//! - `GET /subjects/{subject}/versions/{version|latest}` →
//!   `{"subject", "id", "version", "schema", "schemaType"}` (`schemaType` left out for Avro, as
//!   the registry does), 404 `{"error_code": 40401, …}` for an unknown subject, 40402 for an
//!   unknown version;
//! - `GET /subjects/{subject}/versions` → `[1, 2, …]`.
//!
//! Over TLS (a certificate from the test CA), with auth required (401 otherwise): Basic with
//! the user and password given at start, or Bearer with the password as the token. "Down"
//! means down: the listener is closed, so connections are refused, and `up` binds the same
//! port again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::pki::Ca;

/// (id, schema, schemaType) per version, by subject.
type Subjects = BTreeMap<String, Vec<(u32, String, Option<String>)>>;

pub struct SchemaRegistry {
    addr: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    subjects: Arc<Mutex<Subjects>>,
    next_id: Mutex<u32>,
    hits: Arc<AtomicU64>,
    paths: Arc<Mutex<BTreeMap<String, u64>>>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
    auth: Vec<String>,
}

impl SchemaRegistry {
    /// Starts on 127.0.0.1:0 over TLS, requiring `user:password`.
    pub async fn start(ca: &Ca, user: &str, password: &str) -> Result<Arc<Self>> {
        let acceptor = crate::pki::loopback_acceptor(ca, "registry")?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let r = Arc::new(Self {
            addr: listener.local_addr()?,
            acceptor,
            subjects: Arc::default(),
            // Ids as a real registry hands them out: global, increasing, not per subject.
            next_id: Mutex::new(100),
            hits: Arc::default(),
            paths: Arc::default(),
            server: Mutex::new(None),
            auth: vec![
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
                ),
                format!("Bearer {password}"),
            ],
        });
        r.serve(listener);
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// Registers a new version of `subject`; its schema id.
    pub fn register(&self, subject: &str, schema: &str, schema_type: Option<&str>) -> u32 {
        let mut next = self.next_id.lock().unwrap();
        *next += 1;
        self.subjects
            .lock()
            .unwrap()
            .entry(subject.to_string())
            .or_default()
            .push((*next, schema.to_string(), schema_type.map(String::from)));
        *next
    }

    /// Requests answered so far (any status).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Requests for `path` answered so far.
    pub fn hits_of(&self, path: &str) -> u64 {
        self.paths.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// Closes the listener: connections are refused until [`SchemaRegistry::up`].
    pub fn down(&self) {
        if let Some(h) = self.server.lock().unwrap().take() {
            h.abort();
        }
    }

    /// Listens on the same port again.
    pub async fn up(&self) -> Result<()> {
        let listener = TcpListener::bind(self.addr).await?;
        self.serve(listener);
        Ok(())
    }

    fn serve(&self, listener: TcpListener) {
        let (acceptor, subjects, hits, auth, paths) = (
            self.acceptor.clone(),
            self.subjects.clone(),
            self.hits.clone(),
            self.auth.clone(),
            self.paths.clone(),
        );
        let h = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, subjects, hits, auth, paths) = (
                    acceptor.clone(),
                    subjects.clone(),
                    hits.clone(),
                    auth.clone(),
                    paths.clone(),
                );
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let (subjects, hits, auth, paths) =
                            (subjects.clone(), hits.clone(), auth.clone(), paths.clone());
                        async move {
                            hits.fetch_add(1, Ordering::SeqCst);
                            *paths
                                .lock()
                                .unwrap()
                                .entry(req.uri().path().to_string())
                                .or_default() += 1;
                            let authorized = req
                                .headers()
                                .get(hyper::header::AUTHORIZATION)
                                .is_some_and(|v| auth.iter().any(|a| v.as_bytes() == a.as_bytes()));
                            let (status, body) = if authorized {
                                answer(&subjects.lock().unwrap(), req.uri().path())
                            } else {
                                (401, json!({"error_code": 401, "message": "Unauthorized"}))
                            };
                            let mut r =
                                hyper::Response::new(Full::new(Bytes::from(body.to_string())));
                            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            r.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                hyper::header::HeaderValue::from_static(
                                    "application/vnd.schemaregistry.v1+json",
                                ),
                            );
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
            // Aborting this task drops `conns`, closing every open connection too.
        });
        *self.server.lock().unwrap() = Some(h);
    }
}

impl Drop for SchemaRegistry {
    fn drop(&mut self) {
        self.down();
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(x) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(x);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn answer(subjects: &Subjects, path: &str) -> (u16, Value) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let not_found = |code: u32, what: &str| (404, json!({"error_code": code, "message": what}));
    match parts.as_slice() {
        ["subjects", subject, "versions"] => match subjects.get(&decode(subject)) {
            Some(v) => (200, json!((1..=v.len()).collect::<Vec<_>>())),
            None => not_found(40401, "Subject not found."),
        },
        ["subjects", subject, "versions", version] => {
            let subject = decode(subject);
            let Some(versions) = subjects.get(&subject) else {
                return not_found(40401, "Subject not found.");
            };
            let n = match *version {
                "latest" | "-1" => versions.len(),
                v => match v.parse::<usize>() {
                    Ok(n) if (1..=versions.len()).contains(&n) => n,
                    _ => return not_found(40402, "Version not found."),
                },
            };
            let (id, schema, ty) = &versions[n - 1];
            let mut body = json!({"subject": subject, "version": n, "id": id, "schema": schema});
            if let Some(t) = ty {
                body["schemaType"] = json!(t);
            }
            (200, body)
        }
        _ => (
            404,
            json!({"error_code": 404, "message": "HTTP 404 Not Found"}),
        ),
    }
}
