//! HTTP helpers shared by the end-to-end modules.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

/// An HTTP client whose every request gives up after `timeout`, so a hung gateway fails the test
/// instead of hanging it.
pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .expect("HTTP client")
}

/// One HTTP answer: status, JSON body (panics if the body is not JSON: every Sluice answer is),
/// `Retry-After`, and how long it took.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
    pub retry_after: Option<String>,
    pub took: Duration,
}

impl Answer {
    /// Sends `req` and reads the answer.
    pub async fn of(req: reqwest::RequestBuilder) -> Answer {
        Self::try_of(req).await.expect("request sent, answer read")
    }

    /// Sends `req` and reads the answer; an error if the connection failed (a gateway that
    /// was killed, say).
    pub async fn try_of(req: reqwest::RequestBuilder) -> Result<Answer, reqwest::Error> {
        let start = Instant::now();
        let r = req.send().await?;
        let status = r.status();
        let retry_after = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().expect("ASCII Retry-After").to_string());
        let text = r.text().await?;
        Ok(Answer {
            status,
            body: serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}")),
            retry_after,
            took: start.elapsed(),
        })
    }
}

/// The next `n` text frames of a WebSocket as JSON (acks and nacks), in the order they came,
/// skipping pings; panics when one does not come within 30 s or the socket ends.
pub async fn ws_answers<S>(ws: &mut S, n: usize) -> Vec<Value>
where
    S: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use futures_util::StreamExt;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("an answer within 30 s")
            .expect("socket open")
            .expect("a frame");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            out.push(serde_json::from_str(&t).expect("answers are JSON"));
        }
    }
    out
}
