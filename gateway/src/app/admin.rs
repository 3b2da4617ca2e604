//! The admin listener's endpoints: health, readiness, metrics, the log level, and who may
//! run actions that change behaviour.

use super::*;

pub(super) fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `GET /loglevel` answers the current log filter; `PUT /loglevel` with a filter as the body
/// (`debug`, `sluice=debug,hyper=warn`, …) replaces it until the next restart.
/// Who may run admin actions that change the gateway's behaviour (`PUT /loglevel`).
pub(super) struct AdminActions {
    /// `admin.token`: when set, every action must present it as a bearer token.
    pub(super) token: Option<String>,
    /// Without a token: whether the listener itself restricts who reaches it (loopback, or
    /// TLS with required client certificates).
    pub(super) open: bool,
}

impl AdminActions {
    /// Ok, or the answer refusing the action (401 without the right token, 403 when actions
    /// are closed because no token is configured on a listener reachable from the network).
    #[allow(clippy::result_large_err)] // answered at once
    pub(super) fn check(&self, headers: &http::HeaderMap) -> Result<(), Response<Full<Bytes>>> {
        let Some(token) = &self.token else {
            return if self.open {
                Ok(())
            } else {
                Err(plain(
                    StatusCode::FORBIDDEN,
                    "admin actions are off: the admin listener is reachable from the network; \
                     set admin.token (or admin TLS with client_auth = \"required\")\n"
                        .into(),
                ))
            };
        };
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compared in constant time (as digests, so the length does not leak either).
        let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
        if bool::from(subtle::ConstantTimeEq::ct_eq(
            digest(presented).as_ref(),
            digest(token).as_ref(),
        )) {
            return Ok(());
        }
        let mut r = plain(
            StatusCode::UNAUTHORIZED,
            "this admin action needs `Authorization: Bearer <admin.token>`\n".into(),
        );
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"sluice-admin\""),
        );
        Err(r)
    }
}

pub(super) async fn loglevel(req: http::Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    match *req.method() {
        Method::GET | Method::HEAD => match crate::telemetry::level() {
            Some(l) => plain(StatusCode::OK, format!("{l}\n")),
            None => plain(
                StatusCode::NOT_FOUND,
                "logging is not set up by this process\n".into(),
            ),
        },
        Method::PUT | Method::POST => {
            let body = http_body_util::Limited::new(req.into_body(), 4096)
                .collect()
                .await;
            let Ok(body) = body else {
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "a log filter is at most 4096 bytes\n".into(),
                );
            };
            let spec = String::from_utf8_lossy(&body.to_bytes()).into_owned();
            match crate::telemetry::set_level(&spec) {
                Ok(()) => {
                    tracing::warn!(
                        filter = spec.trim(),
                        "log level changed through the admin listener"
                    );
                    plain(StatusCode::OK, format!("{}\n", spec.trim()))
                }
                Err(e) => plain(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        _ => plain(StatusCode::METHOD_NOT_ALLOWED, "use GET or PUT\n".into()),
    }
}

pub(super) fn respond(
    method: &Method,
    path: &str,
    ready: &AtomicBool,
    gateway: &Gateway,
    registry: &Registry,
    ready_gauge: &Gauge,
) -> Response<Full<Bytes>> {
    let text = plain;
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            if !ready.load(Ordering::SeqCst) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: draining\n".into(),
                )
            } else if let Err(why) = gateway.sink().health() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                )
            } else {
                let mut degraded = Vec::new();
                // Streams without dedup are served; those with it answer 503 (retryable) until
                // the store answers again, so the gateway stays in its load balancer.
                if let Err(why) = gateway.dedup().health() {
                    degraded.push(format!("{why}; streams with dedup answer 503"));
                }
                // Spooled streams take events while Kafka is away; the others answer 503.
                if let Some(why) = gateway.sink().degraded() {
                    degraded.push(why);
                }
                if degraded.is_empty() {
                    text(StatusCode::OK, "ready\n".into())
                } else {
                    text(
                        StatusCode::OK,
                        format!("ready (degraded: {})\n", degraded.join("; ")),
                    )
                }
            }
        }
        "/metrics" => {
            let is_ready = ready.load(Ordering::SeqCst) && gateway.sink().health().is_ok();
            ready_gauge.set(i64::from(is_ready));
            gateway
                .metrics()
                .in_flight_bytes
                .set(gateway.in_flight_bytes() as i64);
            let mut out = String::with_capacity(16 * 1024);
            if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
                return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"));
            }
            let mut r = text(StatusCode::OK, out);
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "admin endpoints: /healthz /readyz /metrics /loglevel\n".into(),
        ),
    }
}
