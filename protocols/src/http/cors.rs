//! CORS on the HTTP listener (docs/http.md "Calling from web pages"): preflights answered
//! before any authentication, and the answers of allowed origins marked for the browser.

use bytes::Bytes;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::Full;
use sluice_config::CorsConfig;

use super::error_body;

/// An allowed origin.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    /// `scheme://*.suffix[:port]`: any subdomain of `suffix` (not `suffix` itself).
    Subdomain {
        scheme: String,
        suffix: String,
        port: Option<String>,
    },
}

/// The CORS policy of one listener.
#[derive(Debug)]
pub struct Cors {
    origins: Vec<Pattern>,
    methods: Vec<String>,
    headers: Vec<String>,
    allow_methods: HeaderValue,
    allow_headers: HeaderValue,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: HeaderValue,
}

/// `scheme`, host and port of an origin (`https://a.example.com:8443`).
fn parts(origin: &str) -> Option<(&str, &str, Option<&str>)> {
    let (scheme, rest) = origin.split_once("://")?;
    match rest.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => Some((scheme, host, Some(port))),
        _ => Some((scheme, rest, None)),
    }
}

impl Cors {
    /// The policy `cfg` describes, or `None` when it allows no origin (CORS off). The
    /// configuration was validated.
    pub fn new(cfg: &CorsConfig) -> Option<Self> {
        if cfg.allowed_origins.is_empty() {
            return None;
        }
        let origins = cfg
            .allowed_origins
            .iter()
            .filter_map(|o| {
                if o == "*" {
                    return Some(Pattern::Any);
                }
                let (scheme, host, port) = parts(o)?;
                Some(match host.strip_prefix("*.") {
                    Some(suffix) => Pattern::Subdomain {
                        scheme: scheme.to_ascii_lowercase(),
                        suffix: format!(".{}", suffix.to_ascii_lowercase()),
                        port: port.map(str::to_string),
                    },
                    None => Pattern::Exact(o.to_ascii_lowercase()),
                })
            })
            .collect();
        let join = |v: &[String]| HeaderValue::from_str(&v.join(", ")).ok();
        let lower: Vec<String> = cfg
            .allowed_headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        Some(Self {
            origins,
            methods: cfg.allowed_methods.clone(),
            allow_methods: join(&cfg.allowed_methods).unwrap_or(HeaderValue::from_static("")),
            allow_headers: join(&lower).unwrap_or(HeaderValue::from_static("")),
            headers: lower,
            expose: (!cfg.expose_headers.is_empty())
                .then(|| join(&cfg.expose_headers))
                .flatten(),
            credentials: cfg.allow_credentials,
            max_age: HeaderValue::from(cfg.max_age_secs),
        })
    }

    /// Whether pages of `origin` may call the API.
    pub fn allows(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        self.origins.iter().any(|p| match p {
            Pattern::Any => true,
            Pattern::Exact(o) => *o == origin,
            Pattern::Subdomain {
                scheme,
                suffix,
                port,
            } => parts(&origin).is_some_and(|(s, host, p)| {
                s == scheme
                    && host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && p == port.as_deref()
            }),
        })
    }

    /// The answer to a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`),
    /// given before any authentication; `None` for any other request.
    pub fn preflight(&self, method: &Method, headers: &HeaderMap) -> Option<Response<Full<Bytes>>> {
        if method != Method::OPTIONS {
            return None;
        }
        let origin = headers.get(ORIGIN)?.to_str().ok()?;
        let wanted = headers.get(ACCESS_CONTROL_REQUEST_METHOD)?.to_str().ok()?;
        let asked: Vec<String> = headers
            .get_all(ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        let refused = if !self.allows(origin) {
            Some(format!(
                "origin `{origin}` may not call this API (http.cors.allowed_origins)"
            ))
        } else if !self.methods.iter().any(|m| m == wanted) {
            Some(format!(
                "method {wanted} is not allowed (http.cors.allowed_methods)"
            ))
        } else {
            asked
                .iter()
                .find(|h| !self.headers.contains(h))
                .map(|h| format!("header `{h}` is not allowed (http.cors.allowed_headers)"))
        };
        if let Some(why) = refused {
            let mut r = error_body(StatusCode::FORBIDDEN, "cors_refused", &why);
            r.headers_mut()
                .insert(VARY, HeaderValue::from_static("Origin"));
            return Some(r);
        }
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NO_CONTENT;
        let h = r.headers_mut();
        self.mark(origin, h);
        h.insert(ACCESS_CONTROL_ALLOW_METHODS, self.allow_methods.clone());
        h.insert(ACCESS_CONTROL_ALLOW_HEADERS, self.allow_headers.clone());
        h.insert(ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        Some(r)
    }

    /// Marks the answer to a request from an allowed origin so the page may read it (errors
    /// included: a page must see why it was refused).
    pub fn decorate<B>(&self, origin: Option<&HeaderValue>, resp: &mut Response<B>) {
        let Some(origin) = origin.and_then(|o| o.to_str().ok()) else {
            return;
        };
        if !self.allows(origin) {
            resp.headers_mut()
                .append(VARY, HeaderValue::from_static("Origin"));
            return;
        }
        let h = resp.headers_mut();
        self.mark(origin, h);
        if let Some(e) = &self.expose {
            h.insert(ACCESS_CONTROL_EXPOSE_HEADERS, e.clone());
        }
    }

    fn mark(&self, origin: &str, h: &mut HeaderMap) {
        if let Ok(v) = HeaderValue::from_str(origin) {
            h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, v);
        }
        h.append(VARY, HeaderValue::from_static("Origin"));
        if self.credentials {
            h.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str]) -> Cors {
        Cors::new(&CorsConfig {
            allowed_origins: origins.iter().map(|o| o.to_string()).collect(),
            ..CorsConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn origins_match_exactly_or_as_subdomains() {
        let c = cors(&["https://app.example.com", "https://*.shop.test:8443"]);
        assert!(c.allows("https://app.example.com"));
        assert!(c.allows("HTTPS://APP.EXAMPLE.COM"));
        assert!(!c.allows("http://app.example.com"), "scheme");
        assert!(!c.allows("https://app.example.com:8443"), "port");
        assert!(!c.allows("https://evil.app.example.com"), "exact is exact");
        assert!(c.allows("https://eu.shop.test:8443"));
        assert!(c.allows("https://a.b.shop.test:8443"));
        assert!(
            !c.allows("https://shop.test:8443"),
            "the apex is not a subdomain"
        );
        assert!(
            !c.allows("https://evilshop.test:8443"),
            "a lookalike suffix"
        );
        assert!(!c.allows("https://eu.shop.test"), "port");
        assert!(cors(&["*"]).allows("http://anything.test"));
        assert!(
            Cors::new(&CorsConfig::default()).is_none(),
            "off without origins"
        );
    }

    #[test]
    fn preflights_are_answered_or_refused_by_origin_method_and_headers() {
        let c = cors(&["https://app.example.com"]);
        let pre = |origin: &str, method: &str, headers: &str| {
            let mut h = HeaderMap::new();
            h.insert(ORIGIN, origin.parse().unwrap());
            h.insert(ACCESS_CONTROL_REQUEST_METHOD, method.parse().unwrap());
            if !headers.is_empty() {
                h.insert(ACCESS_CONTROL_REQUEST_HEADERS, headers.parse().unwrap());
            }
            c.preflight(&Method::OPTIONS, &h).unwrap()
        };
        let ok = pre("https://app.example.com", "POST", "Content-Type, X-Api-Key");
        assert_eq!(ok.status(), 204);
        assert_eq!(
            ok.headers()[ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example.com"
        );
        assert_eq!(ok.headers()[ACCESS_CONTROL_MAX_AGE], "600");
        assert!(
            ok.headers()[ACCESS_CONTROL_ALLOW_HEADERS]
                .to_str()
                .unwrap()
                .contains("x-api-key")
        );
        for (o, m, h) in [
            ("https://other.example.com", "POST", ""),
            ("https://app.example.com", "DELETE", ""),
            ("https://app.example.com", "POST", "x-secret"),
        ] {
            let r = pre(o, m, h);
            assert_eq!(r.status(), 403, "{o} {m} {h}");
            assert!(!r.headers().contains_key(ACCESS_CONTROL_ALLOW_ORIGIN));
        }
        // Not a preflight: no answer of its own.
        assert!(c.preflight(&Method::OPTIONS, &HeaderMap::new()).is_none());
        assert!(c.preflight(&Method::POST, &HeaderMap::new()).is_none());
    }
}
