//! Authentication and authorization against the real binary on 127.0.0.1:0 over TLS: API keys,
//! JWTs from a local HTTPS JWKS server that rotates keys, HS256, and client certificates; every
//! accepted method and the rejected cases, each with its exact protocol error.

use sluice_tests::OutputWithin;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use sluice_auth::apikey::hash_hex as auth_hash;
use sluice_protocols::grpc::pb;
use sluice_protocols::grpc::pb::ingest_client::IngestClient;
use sluice_tests::pki::{self, Answer, Ca, JwksServer, SigningKey, tls_client, tls_post};
use sluice_tests::{Sluice, metric, read_log, wait_until};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const ISS_A: &str = "https://idp.test/a";
const ISS_DOWN: &str = "https://idp.test/down";
const ISS_HS: &str = "https://idp.test/hs";
const HS_SECRET: &str = "an-hs256-secret-that-is-long-enough-1234";

fn claims(iss: &str, sub: &str, scope: &str) -> Value {
    json!({"iss": iss, "sub": sub, "aud": "sluice", "exp": pki::now() + 3600, "scope": scope})
}

fn with(mut c: Value, key: &str, v: Value) -> Value {
    c[key] = v;
    c
}

fn without(mut c: Value, key: &str) -> Value {
    c.as_object_mut().unwrap().remove(key);
    c
}

struct World {
    _tmp: tempfile::TempDir,
    ca: Ca,
    s: Sluice,
    jwks: JwksServer,
    client: Arc<rustls::ClientConfig>,
    rsa: SigningKey,
    ps: SigningKey,
    ec: SigningKey,
    ed: SigningKey,
}

const GOOD_KEY: &str = "good.s3cr3t-s3cr3t-s3cr3t";
const EXPIRED_KEY: &str = "old.s3cr3t-s3cr3t-s3cr3t";
const DISABLED_KEY: &str = "off.s3cr3t-s3cr3t-s3cr3t";

async fn world(max_failures: u32) -> World {
    world_with(max_failures, 0).await
}

async fn world_with(max_failures: u32, min_refresh_ms: u64) -> World {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::new("test-ca").unwrap();
    let server = ca
        .issue_valid("sluice", &["localhost", "127.0.0.1"])
        .unwrap();
    let rsa = SigningKey::rsa("rsa-1", Algorithm::RS256, dir).unwrap();
    let ps = SigningKey::rsa("ps-1", Algorithm::PS256, dir).unwrap();
    let ec = SigningKey::es256("ec-1").unwrap();
    let ed = SigningKey::ed25519("ed-1").unwrap();
    let jwks = JwksServer::start(&ca, &[&rsa, &ps, &ec, &ed])
        .await
        .unwrap();
    let w = |n: &str, c: &str| pki::write(dir, n, c).unwrap().display().to_string();
    let config = format!(
        r#"
[http.tls]
cert_file = "{cert}"
key_file = "{key}"
client_auth = "optional"
client_ca_file = "{ca}"

[http.auth]
allow_anonymous = false

[grpc.tls]
cert_file = "{cert}"
key_file = "{key}"
client_auth = "optional"
client_ca_file = "{ca}"

[grpc.auth]
allow_anonymous = false

[auth.failures]
max_failures = {max_failures}
window_ms = 600000

[[auth.api_keys]]
id = "good"
secret_sha256 = "{good}"
principal = "svc-good"
streams = ["a.*"]

[[auth.api_keys]]
id = "old"
secret_sha256 = "{old}"
principal = "svc-old"
streams = ["*"]
expires_at = 2001-01-01T00:00:00Z

[[auth.api_keys]]
id = "off"
secret_sha256 = "{off}"
principal = "svc-off"
streams = ["*"]
disabled = true

[[auth.jwt.issuers]]
issuer = "{ISS_A}"
audiences = ["sluice"]
algorithms = ["RS256", "PS256", "ES256", "EdDSA"]
jwks_url = "{url}"
jwks_ca_file = "{ca}"
jwks_min_refresh_interval_ms = {min_refresh_ms}
leeway_s = 0

[[auth.jwt.issuers]]
issuer = "{ISS_DOWN}"
audiences = ["sluice"]
algorithms = ["ES256"]
jwks_url = "https://127.0.0.1:1/jwks.json"
jwks_min_refresh_interval_ms = 0

[[auth.jwt.issuers]]
issuer = "{ISS_HS}"
audiences = ["sluice"]
algorithms = ["HS256"]
hs256_secret = "{HS_SECRET}"
permissions_claim = "streams"
permission_prefix = ""

[[auth.mtls.rules]]
field = "san_uri"
pattern = "spiffe://test/*"
streams = ["m.*"]

[[auth.mtls.rules]]
field = "cn"
pattern = "legacy-*"
principal = "cn:{{value}}"
streams = ["m.legacy"]
"#,
        cert = w("server.pem", &server.cert_pem),
        key = w("server.key", &server.key_pem),
        ca = w("ca.pem", &ca.cert_pem()),
        good = auth_hash(GOOD_KEY),
        old = auth_hash(EXPIRED_KEY),
        off = auth_hash(DISABLED_KEY),
        url = jwks.url(),
    );
    let s = Sluice::start(&dir.join("data"), &config).unwrap();
    let client = tls_client(&ca.cert_pem(), None).unwrap();
    World {
        _tmp: tmp,
        ca,
        s,
        jwks,
        client,
        rsa,
        ps,
        ec,
        ed,
    }
}

impl World {
    async fn post_with(
        &self,
        client: &Arc<rustls::ClientConfig>,
        stream: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Answer> {
        tls_post(
            self.s.http,
            client,
            &format!("/v1/streams/{stream}/events"),
            headers,
            "[1]",
        )
        .await
    }

    async fn bearer(&self, stream: &str, token: &str) -> Answer {
        let h = format!("Bearer {token}");
        self.post_with(&self.client, stream, &[("authorization", &h)])
            .await
            .unwrap()
    }

    async fn api_key(&self, stream: &str, key: &str) -> Answer {
        self.post_with(&self.client, stream, &[("x-api-key", key)])
            .await
            .unwrap()
    }
}

impl World {
    /// A tonic client of the gRPC listener over TLS, with a client certificate if given.
    async fn grpc(&self, cert: Option<&pki::Issued>) -> IngestClient<Channel> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca.cert_pem()))
            .domain_name("localhost");
        if let Some(c) = cert {
            tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
        }
        let ch = Channel::from_shared(format!("https://{}", self.s.grpc.unwrap()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        IngestClient::new(ch)
    }
}

/// One gRPC Publish of one event with `metadata`; the principal it was stored under, or the
/// status.
async fn grpc_publish(
    w: &World,
    c: &mut IngestClient<Channel>,
    stream: &str,
    metadata: &[(&'static str, &str)],
) -> Result<String, tonic::Status> {
    let mut req = tonic::Request::new(pb::PublishRequest {
        stream: stream.into(),
        events: vec![pb::Event {
            value: b"1".to_vec().into(),
            ..Default::default()
        }],
        content_type: String::new(),
        idempotency_key: String::new(),
    });
    for (k, v) in metadata {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    let resp = c.publish(req).await?.into_inner();
    let Some(pb::event_result::Result::Position(p)) = &resp.results[0].result else {
        panic!("{resp:?}");
    };
    let log = read_log(&w.s.data_dir, stream, &[]).unwrap();
    Ok(
        log[p.offset.unwrap() as usize]["headers"]["sluice-principal"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_accepts_every_method_and_maps_every_failure_to_its_status() {
    let w = world(10_000).await;
    let mut c = w.grpc(None).await;
    let bearer = |t: &str| format!("Bearer {t}");

    // Accepted: API key (two ways), JWT, client certificate.
    let ok = grpc_publish(&w, &mut c, "a.g", &[("x-api-key", GOOD_KEY)]).await;
    assert_eq!(ok.unwrap(), "svc-good");
    let ok = grpc_publish(&w, &mut c, "a.g", &[("authorization", &bearer(GOOD_KEY))]).await;
    assert_eq!(ok.unwrap(), "svc-good");
    let t = w.ec.sign(&claims(ISS_A, "grpc-svc", "produce:a.*"));
    let ok = grpc_publish(&w, &mut c, "a.g", &[("authorization", &bearer(&t))]).await;
    assert_eq!(ok.unwrap(), "grpc-svc");
    let device =
        w.ca.issue_valid("device-9", &["uri:spiffe://test/device-9"])
            .unwrap();
    let mut dc = w.grpc(Some(&device)).await;
    let ok = grpc_publish(&w, &mut dc, "m.g", &[]).await;
    assert_eq!(ok.unwrap(), "spiffe://test/device-9");

    // Rejected, each with its status and cause.
    let expired = w.rsa.sign(&with(
        claims(ISS_A, "u", "produce:a.*"),
        "exp",
        json!(pki::now() - 60),
    ));
    let forged = {
        let other = SigningKey::es256("ec-1").unwrap(); // same kid, different key
        other.sign(&claims(ISS_A, "u", "produce:a.*"))
    };
    let (expired_b, forged_b) = (bearer(&expired), bearer(&forged));
    type Metadata<'a> = Vec<(&'static str, &'a str)>;
    let cases: [(&str, Metadata, tonic::Code, &str); 7] = [
        (
            "missing",
            vec![],
            tonic::Code::Unauthenticated,
            "credentials are required",
        ),
        (
            "unknown key",
            vec![("x-api-key", "good.wrong-secret")],
            tonic::Code::Unauthenticated,
            "unknown API key",
        ),
        (
            "expired key",
            vec![("x-api-key", EXPIRED_KEY)],
            tonic::Code::Unauthenticated,
            "expired",
        ),
        (
            "disabled key",
            vec![("x-api-key", DISABLED_KEY)],
            tonic::Code::Unauthenticated,
            "disabled",
        ),
        (
            "expired JWT",
            vec![("authorization", &expired_b)],
            tonic::Code::Unauthenticated,
            "expired",
        ),
        (
            "forged JWT",
            vec![("authorization", &forged_b)],
            tonic::Code::Unauthenticated,
            "signature",
        ),
        (
            "other stream",
            vec![("x-api-key", GOOD_KEY)],
            tonic::Code::PermissionDenied,
            "`b.g`",
        ),
    ];
    for (case, md, code, needle) in cases {
        let stream = if case == "other stream" { "b.g" } else { "a.g" };
        let e = grpc_publish(&w, &mut c, stream, &md).await.expect_err(case);
        assert_eq!(e.code(), code, "{case}: {e:?}");
        assert!(
            e.message().contains(needle),
            "{case}: {:?} lacks {needle:?}",
            e.message()
        );
    }
    let m = w.s.metrics().await;
    assert!(
        metric(
            &m,
            "sluice_auth_failures_total",
            "protocol=\"grpc\",method=\"api_key\",reason=\"expired_key\""
        ) >= 1.0,
        "{m}"
    );
}

/// 200, and the event is in the log under `principal`.
fn accepted(w: &World, a: &Answer, stream: &str, principal: &str) {
    assert_eq!(a.status, 200, "{:?}", a.body);
    let offset = a.body["results"][0]["offset"].as_u64().unwrap() as usize;
    let log = read_log(&w.s.data_dir, stream, &[]).unwrap();
    assert_eq!(log[offset]["headers"]["sluice-principal"], principal);
}

/// 401 with a Bearer challenge; `invalid_token` unless no credentials were presented.
fn unauthenticated(case: &str, a: &Answer, needle: &str, invalid_token: bool) {
    assert_eq!(a.status, 401, "{case}: {:?}", a.body);
    assert_eq!(a.body["error"]["code"], "unauthenticated", "{case}");
    let msg = a.body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(needle),
        "{case}: {msg:?} should contain {needle:?}"
    );
    let challenge = a.headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.starts_with("Bearer realm=\"sluice\""),
        "{case}: {challenge}"
    );
    assert_eq!(
        challenge.contains("error=\"invalid_token\""),
        invalid_token,
        "{case}: {challenge}"
    );
}

fn forbidden(case: &str, a: &Answer, stream: &str) {
    assert_eq!(a.status, 403, "{case}: {:?}", a.body);
    assert_eq!(a.body["error"]["code"], "forbidden", "{case}");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("`{stream}`")),
        "{case}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_is_accepted_and_every_bad_credential_gets_its_exact_error() {
    let w = world(10_000).await;
    let tmp = tempfile::tempdir().unwrap();

    // ---- accepted, one per method and algorithm ----
    accepted(
        &w,
        &w.api_key("a.keys", GOOD_KEY).await,
        "a.keys",
        "svc-good",
    );
    accepted(
        &w,
        &w.bearer("a.keys", GOOD_KEY).await,
        "a.keys",
        "svc-good",
    );
    for (k, who) in [(&w.rsa, "rs"), (&w.ps, "ps"), (&w.ec, "es"), (&w.ed, "ed")] {
        let t = k.sign(&claims(ISS_A, who, "produce:a.* produce:other"));
        accepted(&w, &w.bearer("a.jwt", &t).await, "a.jwt", who);
        // The second use of the same token is served from the verified-token cache.
        accepted(&w, &w.bearer("a.jwt", &t).await, "a.jwt", who);
    }
    let hs = pki::hs256(
        HS_SECRET.as_bytes(),
        &with(claims(ISS_HS, "hs-svc", ""), "streams", json!(["h.*"])),
    );
    accepted(&w, &w.bearer("h.x", &hs).await, "h.x", "hs-svc");
    let device =
        w.ca.issue_valid("device-1", &["uri:spiffe://test/device-1"])
            .unwrap();
    let device_tls = tls_client(&w.ca.cert_pem(), Some(&device)).unwrap();
    let a = w.post_with(&device_tls, "m.x", &[]).await.unwrap();
    accepted(&w, &a, "m.x", "spiffe://test/device-1");
    let legacy = w.ca.issue_valid("legacy-7", &[]).unwrap();
    let legacy_tls = tls_client(&w.ca.cert_pem(), Some(&legacy)).unwrap();
    accepted(
        &w,
        &w.post_with(&legacy_tls, "m.legacy", &[]).await.unwrap(),
        "m.legacy",
        "cn:legacy-7",
    );
    // An explicit credential wins over the connection's certificate.
    let a = w
        .post_with(&device_tls, "a.keys", &[("x-api-key", GOOD_KEY)])
        .await
        .unwrap();
    accepted(&w, &a, "a.keys", "svc-good");

    // ---- key rotation: a new kid appears in the JWKS and is fetched on first sight ----
    let ec2 = SigningKey::es256("ec-2").unwrap();
    w.jwks.set_keys(&[&w.rsa, &w.ps, &w.ec, &w.ed, &ec2]);
    let t = ec2.sign(&claims(ISS_A, "rotated", "produce:a.*"));
    accepted(&w, &w.bearer("a.jwt", &t).await, "a.jwt", "rotated");

    // ---- rejected: every case names its cause ----
    let counts = |m: &str| {
        (
            sluice_tests::metric_sum(m, "sluice_auth_failures_total", r#"protocol="http""#),
            sluice_tests::metric_or_zero(
                m,
                "sluice_requests_total",
                r#"protocol="http",outcome="unauthenticated""#,
            ) + sluice_tests::metric_or_zero(
                m,
                "sluice_requests_total",
                r#"protocol="http",outcome="unavailable""#,
            ),
        )
    };
    let before = counts(&w.s.metrics().await);
    let base = claims(ISS_A, "u", "produce:a.*");
    let mut n = 0;
    let mut case = |name: &str| {
        n += 1;
        format!("case {n}: {name}")
    };

    unauthenticated(
        &case("missing credentials"),
        &w.post_with(&w.client, "a.x", &[]).await.unwrap(),
        "credentials are required",
        false,
    );
    unauthenticated(
        &case("unknown API key"),
        &w.api_key("a.x", "good.wrong-secret").await,
        "unknown API key",
        true,
    );
    unauthenticated(
        &case("unknown key id"),
        &w.bearer("a.x", "nobody.secret").await,
        "unknown API key",
        true,
    );
    unauthenticated(
        &case("expired API key"),
        &w.api_key("a.x", EXPIRED_KEY).await,
        "`old` has expired",
        true,
    );
    unauthenticated(
        &case("disabled API key"),
        &w.api_key("a.x", DISABLED_KEY).await,
        "`off` is disabled",
        true,
    );
    let a = w
        .post_with(
            &w.client,
            "a.x",
            &[("authorization", "Digest username=\"a\"")],
        )
        .await
        .unwrap();
    unauthenticated(
        &case("neither a bearer nor a basic scheme"),
        &a,
        "must be `Bearer <token>`",
        true,
    );
    // Basic carries an API key's id and secret (Kafka REST clients): checked as that key.
    let a = w
        .post_with(&w.client, "a.x", &[("authorization", "Basic Zm9vOmJhcg==")])
        .await
        .unwrap();
    unauthenticated(&case("basic, an unknown key"), &a, "unknown API key", true);
    let a = w
        .post_with(&w.client, "a.x", &[("authorization", "Basic !!!")])
        .await
        .unwrap();
    unauthenticated(
        &case("basic, not base64"),
        &a,
        "`Basic base64(<key id>:<secret>)`",
        true,
    );
    let t =
        w.ec.sign(&with(base.clone(), "exp", json!(pki::now() - 60)));
    unauthenticated(
        &case("expired JWT"),
        &w.bearer("a.x", &t).await,
        "expired",
        true,
    );
    let t =
        w.ec.sign(&with(base.clone(), "nbf", json!(pki::now() + 3600)));
    unauthenticated(
        &case("nbf in the future"),
        &w.bearer("a.x", &t).await,
        "not valid yet",
        true,
    );
    let t = w.ec.sign(&with(base.clone(), "nbf", json!("99999999999")));
    unauthenticated(
        &case("nbf of the wrong type (CVE-2026-25537)"),
        &w.bearer("a.x", &t).await,
        "`nbf`",
        true,
    );
    let t =
        w.ec.sign(&with(base.clone(), "iss", json!("https://evil.test")));
    unauthenticated(
        &case("untrusted issuer"),
        &w.bearer("a.x", &t).await,
        "`https://evil.test` is not trusted",
        true,
    );
    let t = w.ec.sign(&with(base.clone(), "aud", json!("someone-else")));
    unauthenticated(
        &case("wrong audience"),
        &w.bearer("a.x", &t).await,
        "not for this audience",
        true,
    );
    let t = w.ec.sign(&without(base.clone(), "exp"));
    unauthenticated(
        &case("no exp"),
        &w.bearer("a.x", &t).await,
        "no `exp` claim",
        true,
    );
    let t = w.ec.sign(&without(base.clone(), "sub"));
    unauthenticated(
        &case("no principal claim"),
        &w.bearer("a.x", &t).await,
        "no `sub` claim",
        true,
    );
    let impostor = SigningKey::es256("ec-2").unwrap(); // same kid, other key
    let t = impostor.sign(&base);
    unauthenticated(
        &case("bad signature"),
        &w.bearer("a.x", &t).await,
        "signature does not verify",
        true,
    );
    let mut forged = w.ec.sign(&base);
    forged.push('x');
    unauthenticated(
        &case("tampered signature"),
        &w.bearer("a.x", &forged).await,
        "",
        true,
    );
    unauthenticated(
        &case("alg none"),
        &w.bearer("a.x", &pki::unsigned(&base)).await,
        "alg none",
        true,
    );
    let t = pki::hs256(w.rsa.public_pem.as_bytes(), &base);
    unauthenticated(
        &case("HS256 signed with the RSA public key"),
        &w.bearer("a.x", &t).await,
        "HS256 is not accepted",
        true,
    );
    let t = pki::hs256(w.rsa.public_pem.as_bytes(), &claims(ISS_HS, "x", ""));
    unauthenticated(
        &case("HS256 with the public key against an HS issuer"),
        &w.bearer("h.x", &t).await,
        "signature does not verify",
        true,
    );
    let t = SigningKey::rsa("rsa-9", Algorithm::RS384, tmp.path())
        .unwrap()
        .sign(&base);
    unauthenticated(
        &case("algorithm not allowed for the issuer"),
        &w.bearer("a.x", &t).await,
        "RS384 is not accepted",
        true,
    );
    let hits = w.jwks.hits();
    let t = w.ec.sign_as(Some("nope"), &base);
    unauthenticated(
        &case("unknown kid, also after a refresh"),
        &w.bearer("a.x", &t).await,
        "no signing key with kid `nope`",
        true,
    );
    assert!(
        w.jwks.hits() > hits,
        "an unknown kid triggers a JWKS refresh"
    );
    unauthenticated(
        &case("malformed token"),
        &w.bearer("a.x", "a.b.c").await,
        "not base64url JSON",
        true,
    );
    unauthenticated(
        &case("garbage token"),
        &w.bearer("a.x", "!!!.???.###").await,
        "",
        true,
    );

    // The identity provider goes down: keys already fetched keep serving.
    w.jwks.go_down();
    let t = ec2.sign(&claims(ISS_A, "cached", "produce:a.*"));
    accepted(&w, &w.bearer("a.jwt", &t).await, "a.jwt", "cached");
    let t = SigningKey::es256("ec-3").unwrap().sign(&base); // published only after the outage
    unauthenticated(
        &case("JWKS down, key not cached"),
        &w.bearer("a.x", &t).await,
        "kid `ec-3`",
        true,
    );
    // An issuer whose JWKS was never reachable: nothing cached, answer 503 + Retry-After.
    let down_key = SigningKey::es256("d-1").unwrap();
    let a = w
        .bearer("a.x", &down_key.sign(&claims(ISS_DOWN, "u", "")))
        .await;
    assert_eq!(
        a.status,
        503,
        "{}: {:?}",
        case("JWKS down, no key set at all"),
        a.body
    );
    assert_eq!(a.headers["retry-after"], "5");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot be loaded")
    );

    // Client certificates: another CA, expired, and one that no rule maps.
    let other = Ca::new("other-ca")
        .unwrap()
        .issue_valid("x", &["uri:spiffe://test/x"])
        .unwrap();
    let r = w
        .post_with(
            &tls_client(&w.ca.cert_pem(), Some(&other)).unwrap(),
            "m.x",
            &[],
        )
        .await;
    assert!(
        r.is_err(),
        "{}: {r:?}",
        case("client certificate from another CA")
    );
    let expired =
        w.ca.issue("old-device", &["uri:spiffe://test/old"], -30, -1)
            .unwrap();
    let r = w
        .post_with(
            &tls_client(&w.ca.cert_pem(), Some(&expired)).unwrap(),
            "m.x",
            &[],
        )
        .await;
    assert!(r.is_err(), "{}: {r:?}", case("expired client certificate"));
    let unmapped = w.ca.issue_valid("printer", &["uri:urn:printer"]).unwrap();
    let a = w
        .post_with(
            &tls_client(&w.ca.cert_pem(), Some(&unmapped)).unwrap(),
            "m.x",
            &[],
        )
        .await
        .unwrap();
    unauthenticated(
        &case("certificate matches no mapping rule"),
        &a,
        "matches no mTLS mapping rule",
        true,
    );

    // Authorization: valid principals, streams they may not produce to.
    forbidden(
        &case("API key outside its streams"),
        &w.api_key("b.x", GOOD_KEY).await,
        "b.x",
    );
    let t =
        w.ed.sign(&claims(ISS_A, "scoped", "produce:a.only other:b.x"));
    forbidden(
        &case("JWT scope outside its streams"),
        &w.bearer("b.x", &t).await,
        "b.x",
    );
    forbidden(
        &case("JWT array claim outside its streams"),
        &w.bearer("a.x", &hs).await,
        "a.x",
    );
    forbidden(
        &case("mTLS principal outside its streams"),
        &w.post_with(&device_tls, "a.x", &[]).await.unwrap(),
        "a.x",
    );
    // Every 401 above (and each 503 of an issuer whose keys cannot be fetched) was counted as an
    // authentication failure, and nothing else was (403s are authorization).
    let after = counts(&w.s.metrics().await);
    let refused = after.1 - before.1;
    assert!(refused >= 10.0, "{before:?} {after:?}");
    assert_eq!(after.0 - before.0, refused, "{before:?} {after:?}");

    // Failures are counted by method and reason.
    let m = w.s.metrics().await;
    for (method, reason, at_least) in [
        ("none", "missing", 1.0),
        ("api_key", "unknown_key", 2.0),
        ("api_key", "expired_key", 1.0),
        ("jwt", "expired", 1.0),
        ("jwt", "alg_none", 1.0),
        ("jwt", "unknown_kid", 2.0),
        ("mtls", "no_matching_rule", 1.0),
    ] {
        let v = metric(
            &m,
            "sluice_auth_failures_total",
            &format!("protocol=\"http\",method=\"{method}\",reason=\"{reason}\""),
        );
        assert!(v >= at_least, "auth failures {method}/{reason}: {v}");
    }
}

// Multi-threaded: the JWKS server runs on the test's runtime while the test thread waits for the
// gateway to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_from_one_address_are_throttled() {
    let w = world(3).await;
    for _ in 0..3 {
        let a = w.api_key("a.x", "good.wrong").await;
        assert_eq!(a.status, 401);
    }
    // Now even a valid key from this address waits for the window to pass, unless it
    // authenticated recently (attacks::a_guesser_behind_a_shared_address): this one has not.
    let a = w.api_key("a.x", GOOD_KEY).await;
    assert_eq!(a.status, 429, "{:?}", a.body);
    assert_eq!(a.body["error"]["code"], "over_quota");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too many failed authentication attempts")
    );
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((500..=600).contains(&retry), "Retry-After {retry}");
    let m = w.s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "sluice_auth_failures_total",
            "protocol=\"http\",method=\"any\",reason=\"too_many_failures\""
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kids_cannot_make_the_gateway_hammer_the_identity_provider() {
    let w = world_with(10_000, 3_600_000).await;
    assert_eq!(w.jwks.hits(), 1, "one fetch at startup");
    for i in 0..5 {
        let t = w.ec.sign_as(
            Some(&format!("flood-{i}")),
            &claims(ISS_A, "u", "produce:a.*"),
        );
        let a = w.bearer("a.x", &t).await;
        unauthenticated("unknown kid", &a, &format!("kid `flood-{i}`"), true);
    }
    assert_eq!(
        w.jwks.hits(),
        1,
        "refreshes are rate limited by jwks_min_refresh_interval_ms"
    );
    // Known keys keep working meanwhile.
    let t = w.ec.sign(&claims(ISS_A, "fine", "produce:a.*"));
    accepted(&w, &w.bearer("a.x", &t).await, "a.x", "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_and_certificate_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::new("ca").unwrap();
    let first = ca.issue_valid("first", &["localhost"]).unwrap();
    let cert = pki::write(dir, "server.pem", &first.cert_pem).unwrap();
    let key = pki::write(dir, "server.key", &first.key_pem).unwrap();
    let ca_file = pki::write(dir, "ca.pem", &ca.cert_pem()).unwrap();
    let crl_file = pki::write(dir, "revoked.crl.pem", &ca.crl(&[666]).unwrap()).unwrap();
    let config = format!(
        "[http.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nclient_auth = \"required\"\nclient_ca_file = {ca_file:?}\ncrl_files = [{crl_file:?}]\nreload_interval_ms = 100\n\
         [admin.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n\
         [http.auth]\nmethods = [\"mtls\"]\nallow_anonymous = false\n\
         [[auth.mtls.rules]]\nfield = \"san_dns\"\npattern = \"*.devices.test\"\nstreams = [\"*\"]\n"
    );
    let s = Sluice::start(&dir.join("data"), &config).unwrap();
    let device = ca.issue_valid("d", &["pump-1.devices.test"]).unwrap();
    let with_cert = tls_client(&ca.cert_pem(), Some(&device)).unwrap();
    let no_cert = tls_client(&ca.cert_pem(), None).unwrap();
    let url = "/v1/streams/pumps/events";
    let a = tls_post(s.http, &with_cert, url, &[], "[1]").await.unwrap();
    assert_eq!(a.status, 200, "{:?}", a.body);
    // The admin listener is TLS too.
    let a = pki::tls_request(s.admin, &no_cert, http::Method::GET, "/readyz", &[], "")
        .await
        .unwrap();
    assert_eq!((a.status, a.body.as_str()), (200, Some("ready\n")));
    assert!(
        sluice_tests::http::client(sluice_tests::DEADLINE)
            .get(s.admin_url("readyz"))
            .send()
            .await
            .is_err(),
        "plain HTTP to a TLS admin listener"
    );
    let r = tls_post(s.http, &no_cert, url, &[], "[1]").await;
    assert!(r.is_err(), "no certificate where one is required: {r:?}");
    let revoked = ca
        .issue_serial("stolen", &["pump-9.devices.test"], 666)
        .unwrap();
    let r = tls_post(
        s.http,
        &tls_client(&ca.cert_pem(), Some(&revoked)).unwrap(),
        url,
        &[],
        "[1]",
    )
    .await;
    assert!(
        r.is_err(),
        "a certificate revoked by the configured CRL: {r:?}"
    );
    let unrevoked = ca
        .issue_serial("fine", &["pump-2.devices.test"], 667)
        .unwrap();
    let a = tls_post(
        s.http,
        &tls_client(&ca.cert_pem(), Some(&unrevoked)).unwrap(),
        url,
        &[],
        "[1]",
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "a certificate the CRL does not list");
    // This listener accepts only mTLS: an API key is refused by method, with the cert present.
    let a = tls_post(s.http, &with_cert, url, &[("x-api-key", "k.v")], "[1]")
        .await
        .unwrap();
    unauthenticated("method not accepted", &a, "does not accept api_key", true);

    // Replace the server certificate on disk: new connections get it without a restart.
    let other_ca = Ca::new("ca-2").unwrap();
    let second = other_ca.issue_valid("second", &["localhost"]).unwrap();
    std::fs::write(&key, &second.key_pem).unwrap();
    std::fs::write(&cert, &second.cert_pem).unwrap();
    let trusts_second = tls_client(&other_ca.cert_pem(), Some(&device)).unwrap();
    let reloaded = wait_until(Duration::from_secs(10), || async {
        tls_post(s.http, &trusts_second, url, &[], "[1]")
            .await
            .is_ok_and(|a| a.status == 200)
    })
    .await;
    assert!(reloaded, "the new certificate was never served");
    assert!(
        tls_post(s.http, &with_cert, url, &[], "[1]").await.is_err(),
        "the old chain is gone"
    );
}

#[test]
fn keys_new_prints_a_key_and_a_config_entry_that_accepts_it() {
    let out = std::process::Command::new(sluice_tests::binary())
        .args(["keys", "new", "--principal", "svc", "--streams", "a.*,b"])
        .output_within(sluice_tests::DEADLINE)
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text.lines().nth(1).unwrap().to_string();
    let entry: String = text
        .lines()
        .skip_while(|l| !l.starts_with("[[auth"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        entry.contains(&format!(
            "secret_sha256 = \"{}\"",
            sluice_tests::sha256sum(&key)
        )),
        "{entry}"
    );
    assert!(entry.contains("streams = [\"a.*\", \"b\"]"), "{entry}");
    assert!(
        !entry.contains(key.split_once('.').unwrap().1),
        "the secret must not be in the config entry"
    );
    let cfg = sluice_config::Config::from_toml_str(&entry, "keys new", Vec::new())
        .expect("the printed entry is valid config");
    let keys = sluice_auth::apikey::ApiKeys::new(&cfg.auth.api_keys);
    assert_eq!(keys.verify(&key).unwrap().name(), "svc");
}

/// POSTs one event to `stream` with `token` as a bearer token; the status.
async fn post_bearer(s: &Sluice, stream: &str, token: String) -> u16 {
    reqwest::Client::new()
        .post(s.events_url(stream))
        .bearer_auth(token)
        .json(&json!([1]))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_file_is_reread_on_the_refresh_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let first = SigningKey::es256("file-1").unwrap();
    let second = SigningKey::ed25519("file-2").unwrap();
    let jwks = |keys: &[&SigningKey]| {
        json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
    };
    let file = pki::write(dir, "jwks.json", &jwks(&[&first])).unwrap();
    // Unknown kids may not trigger refreshes (1 h); only the 1 s interval re-reads the file.
    // The failure limit is lifted: the test polls with a token that fails until the refresh.
    let config = format!(
        "[http.auth]\nallow_anonymous = false\n[auth.failures]\nmax_failures = 1000000\n\
         [[auth.jwt.issuers]]\nissuer = \"file-issuer\"\naudiences = [\"sluice\"]\nalgorithms = [\"ES256\", \"EdDSA\"]\n\
         jwks_file = {file:?}\njwks_refresh_interval_ms = 1000\njwks_min_refresh_interval_ms = 3600000\n"
    );
    let s = Sluice::start(&dir.join("data"), &config).unwrap();
    let post = |token: String| post_bearer(&s, "f", token);
    assert_eq!(
        post(first.sign(&claims("file-issuer", "a", "produce:*"))).await,
        200
    );
    let t2 = second.sign(&claims("file-issuer", "b", "produce:*"));
    assert_eq!(post(t2.clone()).await, 401, "file-2 is not published yet");
    std::fs::write(&file, jwks(&[&first, &second])).unwrap();
    let picked_up = wait_until(Duration::from_secs(10), || {
        let t = second.sign(&claims("file-issuer", "b", "produce:*"));
        let f = post(t);
        async move { f.await == 200 }
    })
    .await;
    assert!(
        picked_up,
        "the periodic refresh never re-read the JWKS file"
    );
}

/// A WebSocket over TLS to the HTTP listener, or the HTTP status of the refused upgrade.
async fn wss(
    w: &World,
    client: &Arc<rustls::ClientConfig>,
    path: &str,
    headers: &[(&'static str, &str)],
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    u16,
> {
    use tokio_tungstenite::tungstenite::Error;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tcp = tokio::net::TcpStream::connect(w.s.http).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(client.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    let mut req = format!("wss://localhost:{}{path}", w.s.http.port())
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    match tokio_tungstenite::client_async(req, tls).await {
        Ok((ws, _)) => Ok(ws),
        Err(Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_tls_accepts_every_method_and_refuses_bad_credentials_before_the_upgrade() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let w = world(10_000).await;
    let send_one = |mut ws: tokio_tungstenite::WebSocketStream<_>| async move {
        ws.send(Message::text("1")).await.unwrap();
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    return v["offset"].as_u64().expect("an ack") as usize;
                }
                _ => continue,
            }
        }
    };
    let principal_at = |stream: &str, offset: usize| {
        read_log(&w.s.data_dir, stream, &[]).unwrap()[offset]["headers"]["sluice-principal"]
            .as_str()
            .unwrap()
            .to_string()
    };

    // A JWT in the subprotocol (the browser way), an API key in the query, a client certificate.
    let t = w.ec.sign(&claims(ISS_A, "ws-user", "produce:a.*"));
    let proto = format!("sluice.v1, bearer.{t}");
    let ws = wss(
        &w,
        &w.client,
        "/v1/streams/a.ws/ws",
        &[("sec-websocket-protocol", &proto)],
    )
    .await
    .unwrap();
    let o = send_one(ws).await;
    assert_eq!(principal_at("a.ws", o), "ws-user");
    let ws = wss(
        &w,
        &w.client,
        &format!("/v1/streams/a.ws/ws?api_key={GOOD_KEY}"),
        &[],
    )
    .await
    .unwrap();
    let o = send_one(ws).await;
    assert_eq!(principal_at("a.ws", o), "svc-good");
    let device =
        w.ca.issue_valid("device-ws", &["uri:spiffe://test/device-ws"])
            .unwrap();
    let device_tls = tls_client(&w.ca.cert_pem(), Some(&device)).unwrap();
    let ws = wss(&w, &device_tls, "/v1/streams/m.ws/ws", &[])
        .await
        .unwrap();
    let o = send_one(ws).await;
    assert_eq!(principal_at("m.ws", o), "spiffe://test/device-ws");

    // Refused before the upgrade, with HTTP statuses.
    let expired = w.rsa.sign(&with(
        claims(ISS_A, "u", "produce:a.*"),
        "exp",
        json!(pki::now() - 60),
    ));
    let forged = SigningKey::es256("ec-1")
        .unwrap()
        .sign(&claims(ISS_A, "u", "produce:a.*"));
    for (case, path, status) in [
        ("missing", "/v1/streams/a.ws/ws".to_string(), 401),
        (
            "expired JWT",
            format!("/v1/streams/a.ws/ws?access_token={expired}"),
            401,
        ),
        (
            "forged JWT",
            format!("/v1/streams/a.ws/ws?access_token={forged}"),
            401,
        ),
        (
            "disabled key",
            format!("/v1/streams/a.ws/ws?api_key={DISABLED_KEY}"),
            401,
        ),
        (
            "other stream",
            format!("/v1/streams/b.ws/ws?api_key={GOOD_KEY}"),
            403,
        ),
    ] {
        let got = wss(&w, &w.client, &path, &[]).await.err();
        assert_eq!(got, Some(status), "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_entry_hashed_as_the_docs_say_is_accepted() {
    // docs/auth.md: secret_sha256 is `printf %s "$KEY" | sha256sum` of the whole key, id and dot
    // included. A fixed vector, computed outside this code base.
    const KEY: &str = "vector.s3cret-from-the-docs";
    const HASH: &str = "8820aba81d9d63b3353bdb82daa0e178f42e7a382b46cea15bce0e9431d3efc5";
    assert_eq!(sluice_tests::sha256sum(KEY), HASH);
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        &format!(
            "[http.auth]\nallow_anonymous = false\n[[auth.api_keys]]\nid = \"vector\"\nsecret_sha256 = \"{HASH}\"\nprincipal = \"v\"\nstreams = [\"*\"]\n"
        ),
    )
    .unwrap();
    let c = reqwest::Client::new();
    for (key, want) in [(KEY, 200), ("vector.s3cret-from-the-doc", 401), ("", 401)] {
        let mut req = c.post(s.events_url("v")).json(&json!([1]));
        if !key.is_empty() {
            req = req.header("x-api-key", key);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), want, "key {key:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_without_kid_leeway_and_the_verified_token_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let one = SigningKey::es256("only").unwrap();
    let (two_a, two_b) = (
        SigningKey::es256("two-a").unwrap(),
        SigningKey::es256("two-b").unwrap(),
    );
    let jwks = |keys: &[&SigningKey]| {
        json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
    };
    let one_file = pki::write(dir, "one.json", &jwks(&[&one])).unwrap();
    let two_file = pki::write(dir, "two.json", &jwks(&[&two_a, &two_b])).unwrap();
    let issuer = |name: &str, file: &std::path::Path, leeway: u32| {
        format!(
            "[[auth.jwt.issuers]]\nissuer = \"{name}\"\naudiences = [\"sluice\"]\nalgorithms = [\"ES256\"]\n\
             jwks_file = {file:?}\nleeway_s = {leeway}\njwks_refresh_interval_ms = 1000\n"
        )
    };
    let config = format!(
        "[http.auth]\nallow_anonymous = false\n[auth.failures]\nmax_failures = 1000000\n{}{}",
        issuer("one-key", &one_file, 30),
        issuer("two-keys", &two_file, 0)
    );
    let s = Sluice::start(&dir.join("data"), &config).unwrap();
    let post = |token: String| post_bearer(&s, "j", token);
    let expiring = |iss: &str, exp_in: i64| {
        with(
            claims(iss, "svc", "produce:*"),
            "exp",
            json!(pki::now() + exp_in),
        )
    };
    // No kid: fine when the issuer has exactly one key, refused when it has two.
    assert_eq!(
        post(one.sign_as(None, &claims("one-key", "svc", "produce:*"))).await,
        200
    );
    assert_eq!(
        post(two_a.sign_as(None, &claims("two-keys", "svc", "produce:*"))).await,
        401
    );
    assert_eq!(
        post(two_a.sign(&claims("two-keys", "svc", "produce:*"))).await,
        200
    );
    // leeway_s: 10 s past exp is within 30 s of leeway, not within 0; 60 s is past both.
    assert_eq!(post(one.sign(&expiring("one-key", -10))).await, 200);
    assert_eq!(post(one.sign(&expiring("one-key", -60))).await, 401);
    assert_eq!(post(two_a.sign(&expiring("two-keys", -10))).await, 401);
    // The cache: a token verified once is accepted until it expires without being verified
    // again, so it outlives its key's removal from the JWKS; a new token of that key does not.
    let verified = two_b.sign(&claims("two-keys", "cached", "produce:*"));
    assert_eq!(post(verified.clone()).await, 200);
    std::fs::write(&two_file, jwks(&[&two_a])).unwrap();
    let removed = wait_until(Duration::from_secs(10), || {
        let fresh = two_b.sign(&with(
            claims("two-keys", "fresh", "produce:*"),
            "jti",
            json!(pki::now().to_string() + &format!("{:?}", std::time::Instant::now())),
        ));
        let f = post(fresh);
        async move { f.await == 401 }
    })
    .await;
    assert!(removed, "the refresh never dropped two-b");
    assert_eq!(post(verified).await, 200, "served from the cache");
}
