//! Sluice's protocol adapters: each decodes its wire format, extracts credentials, calls
//! [`sluice_core::Ingest`], and renders receipts and rejections in its protocol's own terms.
//! No business logic lives here.

pub mod gate;
pub mod grpc;
pub mod http;
pub mod lanes;
pub mod mqtt;
pub mod proxy;
pub mod server;

use bytes::Bytes;
use sluice_core::{
    Admission, Event, Ingest, IngestRequest, Principal, Protocol, Receipt, Rejection, StreamName,
    TraceHeaders,
};

/// The path of one already-decoded batch (gRPC, WebSocket, MQTT): admit the principal on the
/// stream, then [`append_admitted`].
pub(crate) async fn append_batch<I: Ingest>(
    ingest: &I,
    principal: &Principal,
    protocol: Protocol,
    stream: &StreamName,
    content_type: Bytes,
    events: Vec<Event>,
    queued: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<Vec<Receipt>, Rejection> {
    let admitted = ingest.admit(principal, stream);
    append_admitted(
        ingest,
        admitted,
        protocol,
        content_type,
        events,
        queued,
        None,
    )
    .await
}

/// Appends a batch whose admission was decided (authorized once, by [`Ingest::admit`]) and
/// counts the request's outcome. The events are already in memory, so no budget was reserved
/// while receiving them: admission charges their exact size.
pub(crate) async fn append_admitted<I: Ingest>(
    ingest: &I,
    admitted: Result<Admission, Rejection>,
    protocol: Protocol,
    content_type: Bytes,
    events: Vec<Event>,
    queued: Option<tokio::sync::oneshot::Sender<()>>,
    trace: Option<TraceHeaders>,
) -> Result<Vec<Receipt>, Rejection> {
    let result = match admitted {
        Ok(admission) => {
            ingest
                .ingest(IngestRequest {
                    admission,
                    protocol,
                    content_type,
                    record_headers: Vec::new(),
                    events,
                    reservation: ingest.budget().empty(),
                    queued,
                    trace,
                })
                .await
        }
        Err(r) => Err(r),
    };
    let outcome = match &result {
        Ok(r) if r.iter().any(|r| matches!(r, Receipt::Failed(_))) => "partial",
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    ingest.metrics().request(protocol.as_str(), outcome);
    result
}

/// Replays the seed corpora of the fuzz targets in `protocols/fuzz` (the MQTT one is replayed
/// beside its codec): `ok-*` seeds decode into at least one event, `bad-*` seeds are refused,
/// none panics.
#[cfg(test)]
mod fuzz_corpora {
    fn replay(target: &str, decode: impl Fn(&[u8]) -> Result<usize, String>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("the seed corpus exists") {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let result = decode(&std::fs::read(&path).unwrap());
            if name.starts_with("ok-") {
                assert!(
                    matches!(result, Ok(n) if n >= 1),
                    "{target}/{name}: {result:?}"
                );
            } else if name.starts_with("bad-") {
                assert!(
                    result.is_err(),
                    "{target}/{name} should be refused: {result:?}"
                );
            }
            seen += 1;
        }
        assert!(seen >= 5, "only {seen} seeds in {}", dir.display());
    }

    #[test]
    fn http_body() {
        replay("http_body", |d| {
            crate::http::body::decode_request(d).map_err(|r| r.to_string())
        });
    }

    #[test]
    fn ws_frame() {
        replay("ws_frame", |d| {
            crate::http::ws::decode_frame(&bytes::Bytes::copy_from_slice(d), 1000)
                .map(|(_, n)| n)
                .map_err(|r| r.to_string())
        });
    }

    #[test]
    fn grpc_message() {
        replay("grpc_message", |d| crate::grpc::decode_publish(d, 1000));
    }
}
