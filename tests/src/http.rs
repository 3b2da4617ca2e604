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
