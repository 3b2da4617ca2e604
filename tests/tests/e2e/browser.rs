//! A real browser: headless Chromium (Debian's chromium and chromium-driver, installed by
//! scripts/install-deps.sh --for-tests), driven over WebDriver, loads examples/browser/ from a
//! local web server, connects to the gateway with a token in the subprotocol, and sends events
//! typed into the page; the test waits for the acks on the page and reads the events back from
//! the log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::{Sluice, api_key_entry, read_log, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Serves files over HTTP/1.1 on 127.0.0.1 (one request per connection): a request path is
/// looked up under each of `roots` in turn (no `..`), so a test page can import the repository's
/// own files (`/clients/js/src/index.js`).
async fn static_server(roots: Vec<PathBuf>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let roots = roots.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let path = path.split('?').next().unwrap().trim_start_matches('/');
                let file = (!path.split('/').any(|c| c == ".." || c.is_empty()))
                    .then(|| roots.iter().find_map(|r| std::fs::read(r.join(path)).ok()))
                    .flatten();
                let (status, body, ctype) = match file {
                    Some(b) if path.ends_with(".js") => ("200 OK", b, "text/javascript"),
                    Some(b) => ("200 OK", b, "text/html; charset=utf-8"),
                    None => ("404 Not Found", b"not found".to_vec(), "text/plain"),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.write_all(&body).await;
            });
        }
    });
    addr
}

struct Driver {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Driver {
        let port = sluice_tests::kafka::free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (scripts/install-deps.sh --for-tests installs chromium-driver)");
        let d = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let up = wait_until(Duration::from_secs(30), || async {
            d.http
                .get(format!("{}/status", d.base))
                .send()
                .await
                .is_ok()
        })
        .await;
        assert!(up, "chromedriver did not start");
        d
    }

    /// A headless Chromium session with a profile of its own; its id.
    async fn session(&self, profile: &Path) -> String {
        let session = self
            .call(
                reqwest::Method::POST,
                "/session",
                Some(json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": "/usr/bin/chromium",
                        "args": ["--headless", "--no-sandbox", "--disable-gpu",
                                 "--disable-background-networking", "--disable-dev-shm-usage",
                                 "--no-first-run", "--window-size=1000,900",
                                 format!("--user-data-dir={}", profile.display())]
                    }
                }}})),
            )
            .await;
        session["sessionId"].as_str().unwrap().to_string()
    }

    /// Opens `url` in session `sid` and waits (30 s at most) until the page's `#out` no longer
    /// says `pending`: what it says then.
    async fn outcome_of(&self, sid: &str, url: &str) -> String {
        self.call(
            reqwest::Method::POST,
            &format!("/session/{sid}/url"),
            Some(json!({"url": url})),
        )
        .await;
        let done = wait_until(Duration::from_secs(30), || async {
            self.text_of(sid, "#out").await != "pending"
        })
        .await;
        assert!(done, "the page never finished");
        self.text_of(sid, "#out").await
    }

    /// The text of the element `css` selects, in session `sid`.
    async fn text_of(&self, sid: &str, css: &str) -> String {
        let e = self
            .call(
                reqwest::Method::POST,
                &format!("/session/{sid}/element"),
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        let id = e[ELEMENT].as_str().unwrap();
        self.call(
            reqwest::Method::GET,
            &format!("/session/{sid}/element/{id}/text"),
            None,
        )
        .await
        .as_str()
        .unwrap()
        .to_string()
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let v: Value = r.send().await.unwrap().json().await.unwrap();
        if v["value"].get("error").is_some() {
            panic!("webdriver {path}: {v}");
        }
        v["value"].clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_sends_events_from_the_example_page() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "web.browser-secret-1234";
    let toml = format!(
        "[http.auth]\nallow_anonymous = false\n{}",
        api_key_entry(key, "browser-user", &["browser"])
    );
    let s = Sluice::start(&tmp.path().join("data"), &toml).unwrap();
    let site = static_server(vec![repo_root()]).await;
    let page = format!(
        "http://{site}/examples/browser/index.html?gateway=ws://{}&stream=browser&token={key}&connect=1",
        s.http
    );

    let d = Driver::start().await;
    let sid = d.session(&tmp.path().join("chromium-profile")).await;
    let at = |p: &str| format!("/session/{sid}{p}");
    d.call(
        reqwest::Method::POST,
        &at("/url"),
        Some(json!({"url": page})),
    )
    .await;
    let find = |css: &'static str| {
        let (d, at) = (&d, at(""));
        async move {
            let e = d
                .call(
                    reqwest::Method::POST,
                    &format!("{at}/element"),
                    Some(json!({"using": "css selector", "value": css})),
                )
                .await;
            e[ELEMENT].as_str().unwrap().to_string()
        }
    };
    let text = |id: String| {
        let (d, at) = (&d, at(""));
        async move {
            d.call(
                reqwest::Method::GET,
                &format!("{at}/element/{id}/text"),
                None,
            )
            .await
            .as_str()
            .unwrap()
            .to_string()
        }
    };
    let state = find("#state").await;
    let connected = wait_until(Duration::from_secs(30), || async {
        text(state.clone()).await == "connected"
    })
    .await;
    assert!(connected, "page state: {}", text(state.clone()).await);

    let input = find("#event").await;
    let send = find("#send").await;
    let typed = [r#"{"temp": 21.5}"#, "hello from chromium", "[1, 2, 3]"];
    for t in typed {
        d.call(
            reqwest::Method::POST,
            &at(&format!("/element/{input}/clear")),
            Some(json!({})),
        )
        .await;
        d.call(
            reqwest::Method::POST,
            &at(&format!("/element/{input}/value")),
            Some(json!({"text": t})),
        )
        .await;
        d.call(
            reqwest::Method::POST,
            &at(&format!("/element/{send}/click")),
            Some(json!({})),
        )
        .await;
    }
    let log_el = find("#log").await;
    let acked = wait_until(Duration::from_secs(30), || async {
        text(log_el.clone()).await.matches("ack browser-").count() == typed.len()
    })
    .await;
    let shown = text(log_el.clone()).await;
    assert!(acked, "acks on the page: {shown:?}");
    assert!(
        shown.contains("ack browser-1: partition 0 offset 0"),
        "{shown:?}"
    );
    let _ = d.call(reqwest::Method::DELETE, &at(""), None).await;

    let log = read_log(&s.data_dir, "browser", &[]).unwrap();
    let values: Vec<&str> = log.iter().map(|e| e["value"].as_str().unwrap()).collect();
    assert_eq!(
        values,
        [r#"{"temp":21.5}"#, r#""hello from chromium""#, "[1,2,3]"]
    );
    assert!(
        log.iter()
            .all(|e| e["headers"]["sluice-principal"] == "browser-user")
    );
    assert_eq!(log[1]["id"], "browser-2");
}

/// The console page (served by the gateway at /console) in headless Chromium: it lists the
/// streams the key may read with their record counts, and shows one stream live over
/// Server-Sent Events with a chart of events per second; the numbers on the page are checked
/// against what the test published, and a screenshot is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_shows_a_stream_live_on_the_console_page() {
    let tmp = tempfile::tempdir().unwrap();
    let (writer, reader) = ("shop.writer-secret-123", "board.reader-secret-456");
    let toml = format!(
        "[http.auth]\nallow_anonymous = false\n[streams.declare.orders]\npartitions = 2\n{}{}",
        api_key_entry(writer, "shop", &["*"]),
        api_key_entry(reader, "board", &[])
            .replace("streams = []\n", "streams = []\nconsume = [\"orders\"]\n"),
    );
    let s = Sluice::start(&tmp.path().join("data"), &toml).unwrap();
    let c = sluice_tests::http::client(Duration::from_secs(20));
    let publish = |n0: usize, n: usize| {
        let events: Vec<Value> = (n0..n0 + n)
            .map(|i| json!({"key": format!("k{i}"), "value": {"n": i}}))
            .collect();
        let c = c.clone();
        let url = s.events_url("orders");
        async move {
            let r = c
                .post(url)
                .header("x-api-key", writer)
                .json(&events)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    // Six records before the page opens: the list counts them; the live view starts at the
    // end, so it does not show them.
    publish(0, 5).await;
    publish(5, 1).await;

    let d = Driver::start().await;
    let sid = d.session(&tmp.path().join("chromium-profile")).await;
    let page = format!("http://{}/console?api_key={reader}&stream=orders", s.http);
    d.call(
        reqwest::Method::POST,
        &format!("/session/{sid}/url"),
        Some(json!({"url": page})),
    )
    .await;
    let listed = wait_until(Duration::from_secs(30), || async {
        d.text_of(&sid, "#status").await == "connected"
            && d.text_of(&sid, "#streams tbody").await.contains("orders")
    })
    .await;
    assert!(listed, "status {:?}", d.text_of(&sid, "#status").await);

    // 30 events in three requests while the page watches.
    for i in 0..3 {
        publish(100 + i * 10, 10).await;
    }
    let live = wait_until(Duration::from_secs(30), || async {
        d.text_of(&sid, "#received").await == "30"
    })
    .await;
    assert!(
        live,
        "received on the page: {}",
        d.text_of(&sid, "#received").await
    );
    assert_eq!(d.text_of(&sid, "#chart-total").await, "30");
    let shown = d.text_of(&sid, "#events").await;
    assert_eq!(shown.lines().count(), 30, "{shown}");
    assert!(shown.contains("{\"n\":129}"), "{shown}");
    // The list: orders with its 2 partitions and all 36 records.
    let counted = wait_until(Duration::from_secs(10), || async {
        d.text_of(&sid, "#streams tbody")
            .await
            .contains("orders 2 36")
    })
    .await;
    assert!(
        counted,
        "list: {:?}",
        d.text_of(&sid, "#streams tbody").await
    );

    let shot = d
        .call(
            reqwest::Method::GET,
            &format!("/session/{sid}/screenshot"),
            None,
        )
        .await;
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot.as_str().unwrap())
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let path = std::env::temp_dir().join("sluice-console.png");
    std::fs::write(&path, &png).unwrap();
    eprintln!("console screenshot: {}", path.display());
    let _ = d
        .call(reqwest::Method::DELETE, &format!("/session/{sid}"), None)
        .await;
}

/// CORS in a real browser: a page of an allowed origin POSTs events with an API key and reads
/// them back (headers and the cursor header readable); the same page from another origin is
/// refused by the browser (the preflight is answered 403, before any authentication).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_calls_the_api_cross_origin_only_from_allowed_origins() {
    let tmp = tempfile::tempdir().unwrap();
    let page_dir = tmp.path().join("page");
    std::fs::create_dir_all(&page_dir).unwrap();
    std::fs::write(
        page_dir.join("cors.html"),
        r#"<!doctype html><meta charset="utf-8"><pre id="out">pending</pre>
<script>
const p = new URLSearchParams(location.search);
const gw = p.get("gateway"), key = p.get("key");
(async () => {
  const out = document.getElementById("out");
  try {
    const r = await fetch(gw + "/v1/streams/web/events", {method: "POST",
      headers: {"content-type": "application/json", "x-api-key": key},
      body: JSON.stringify([{value: {from: "page"}}])});
    const posted = await r.json();
    const read = await fetch(gw + "/v1/streams/web/events?from=start", {headers: {"x-api-key": key}});
    const got = await read.json();
    out.textContent = JSON.stringify({post: r.status, offset: posted.results[0].offset,
      read: read.status, value: got.records[0].value, cursor: read.headers.get("sluice-next-cursor")});
  } catch (e) { out.textContent = "error: " + e; }
})();
</script>"#,
    )
    .unwrap();
    let allowed = static_server(vec![page_dir.clone()]).await;
    let other = static_server(vec![page_dir]).await;
    let key = "web.cors-secret-1234";
    let toml = format!(
        "[http.auth]\nallow_anonymous = false\n[http.cors]\nallowed_origins = [\"http://{allowed}\"]\n{}",
        api_key_entry(key, "page", &["web"]).replace(
            "streams = [\"web\"]\n",
            "streams = [\"web\"]\nconsume = [\"web\"]\n"
        ),
    );
    let s = Sluice::start(&tmp.path().join("data"), &toml).unwrap();
    let d = Driver::start().await;
    let sid = d.session(&tmp.path().join("chromium-profile")).await;
    let run = |site: std::net::SocketAddr| {
        let (d, sid) = (&d, sid.clone());
        let url = format!(
            "http://{site}/cors.html?gateway=http://{}&key={key}",
            s.http
        );
        async move { d.outcome_of(&sid, &url).await }
    };
    let ok = run(allowed).await;
    let v: Value = serde_json::from_str(&ok).unwrap_or_else(|_| panic!("page said {ok}"));
    assert_eq!(v["post"], 200, "{v}");
    assert_eq!(v["offset"], 0, "{v}");
    assert_eq!(v["read"], 200, "{v}");
    assert_eq!(v["value"]["from"], "page", "{v}");
    assert_eq!(v["cursor"], "0:1", "exposed to the page: {v}");
    let refused = run(other).await;
    assert!(
        refused.starts_with("error: "),
        "another origin got through: {refused}"
    );
    // The refused page stored nothing.
    let log = read_log(&s.data_dir, "web", &[]).unwrap();
    assert_eq!(log.len(), 1);
    let _ = d
        .call(reqwest::Method::DELETE, &format!("/session/{sid}"), None)
        .await;
}

/// The JavaScript client's offline queue in a real browser: a page that cannot reach the
/// gateway keeps three events in IndexedDB; the page loaded again (same origin, same profile)
/// with the gateway reachable sends them and empties the queue; the log holds each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_keeps_events_in_indexeddb_until_the_gateway_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let page_dir = tmp.path().join("page");
    std::fs::create_dir_all(&page_dir).unwrap();
    std::fs::write(
        page_dir.join("offline.html"),
        r#"<!doctype html><meta charset="utf-8"><pre id="out">pending</pre>
<script type="module">
import { SluiceClient, IndexedDbQueue } from "/clients/js/src/index.js";
const p = new URLSearchParams(location.search);
const out = document.getElementById("out");
const queue = new IndexedDbQueue("sluice-test");
try {
  if (p.get("phase") === "offline") {
    const c = new SluiceClient({ url: "http://127.0.0.1:9", apiKey: p.get("key"), queue, maxRetries: 0 });
    for (const v of ["idb-1", "idb-2", "idb-3"]) await c.enqueue("offline", { value: v });
    out.textContent = "queued " + (await queue.size());
  } else {
    const c = new SluiceClient({ url: p.get("gateway"), apiKey: p.get("key"), queue });
    const n = await c.flushQueue();
    out.textContent = "flushed " + n + " left " + (await queue.size());
  }
} catch (e) { out.textContent = "error " + e; }
</script>"#,
    )
    .unwrap();
    let site = static_server(vec![page_dir, repo_root()]).await;
    let key = "web.offline-secret-1234";
    let toml = format!(
        "[http.auth]\nallow_anonymous = false\n[http.cors]\nallowed_origins = [\"http://{site}\"]\n{}",
        api_key_entry(key, "page", &["offline"])
    );
    let s = Sluice::start(&tmp.path().join("data"), &toml).unwrap();
    let d = Driver::start().await;
    let sid = d.session(&tmp.path().join("chromium-profile")).await;
    let load = |phase: &'static str| {
        let (d, sid) = (&d, sid.clone());
        let url = format!(
            "http://{site}/offline.html?phase={phase}&gateway=http://{}&key={key}",
            s.http
        );
        async move { d.outcome_of(&sid, &url).await }
    };
    assert_eq!(load("offline").await, "queued 3");
    assert!(read_log(&s.data_dir, "offline", &[]).is_err_or_empty());
    assert_eq!(load("online").await, "flushed 3 left 0");
    let log = read_log(&s.data_dir, "offline", &[]).unwrap();
    let values: Vec<&str> = log.iter().map(|e| e["value"].as_str().unwrap()).collect();
    assert_eq!(values, [r#""idb-1""#, r#""idb-2""#, r#""idb-3""#]);
    let _ = d
        .call(reqwest::Method::DELETE, &format!("/session/{sid}"), None)
        .await;
}

trait EmptyLog {
    fn is_err_or_empty(&self) -> bool;
}

impl EmptyLog for anyhow::Result<Vec<Value>> {
    fn is_err_or_empty(&self) -> bool {
        self.as_ref().map_or(true, |l| l.is_empty())
    }
}
