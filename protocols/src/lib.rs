//! Sluice's protocol adapters: each decodes its wire format, extracts credentials, calls
//! [`sluice_core::Ingest`], and renders receipts and rejections in its protocol's own terms.
//! No business logic lives here.

pub mod gate;
pub mod grpc;
pub mod http;
pub mod lanes;
pub mod mqtt;
pub mod server;

use bytes::Bytes;
use sluice_core::{
    Event, Ingest, IngestRequest, Principal, Protocol, Receipt, Rejection, StreamName,
};

/// The path of one already-decoded batch (gRPC, WebSocket): admit the principal on the stream,
/// hold the events' bytes in the in-flight budget, append, and count the request's outcome.
pub(crate) async fn append_batch<I: Ingest>(
    ingest: &I,
    principal: Principal,
    protocol: Protocol,
    stream: StreamName,
    content_type: Bytes,
    events: Vec<Event>,
    queued: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<Vec<Receipt>, Rejection> {
    let result = async {
        ingest.admit(&principal, &stream)?;
        let size: usize = events.iter().map(Event::size).sum();
        let reservation = ingest.budget().try_reserve(size)?;
        ingest
            .ingest(IngestRequest {
                principal,
                protocol,
                stream,
                content_type,
                events,
                reservation,
                queued,
            })
            .await
    }
    .await;
    let outcome = match &result {
        Ok(r) if r.iter().any(|r| matches!(r, Receipt::Failed(_))) => "partial",
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    ingest.metrics().request(protocol.as_str(), outcome);
    result
}
