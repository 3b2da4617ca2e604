//! Batches of one stream from one connection (a gRPC `PublishStream` call, a WebSocket) are
//! appended in the order they arrived: one lane per stream takes its batches in order, merges
//! those already waiting into one append, and starts the next append as soon as the previous
//! one is in the log's queue (its order fixed), so pipelined batches keep their order in the
//! log (per key, as a producer expects) while their writes still share group commits.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use sluice_core::{
    Admission, Event, Ingest, Protocol, Receipt, Rejection, StreamName, TraceHeaders,
};
use tokio::sync::{mpsc, oneshot};

/// The outcome of one batch: a receipt per event, or the batch's rejection.
pub type Outcome = Result<Vec<Receipt>, Rejection>;

struct Item {
    /// The batch's admission (the adapter admitted it before parsing it).
    admission: Admission,
    content_type: Bytes,
    events: Vec<Event>,
    reply: oneshot::Sender<Outcome>,
}

/// The lanes of one connection, by stream. Bounded: past `max_lanes` streams, lanes with
/// nothing queued are dropped (their tasks end), and a new one starts when needed.
pub struct Lanes<I> {
    ingest: Arc<I>,
    protocol: Protocol,
    depth: usize,
    lanes: HashMap<StreamName, mpsc::Sender<Item>>,
    /// The connection's trace context (gRPC call metadata, WebSocket upgrade headers), for
    /// every batch it sends.
    trace: Option<TraceHeaders>,
}

const MAX_LANES: usize = 256;

impl<I: Ingest> Lanes<I> {
    /// `depth`: batches that may queue per stream (the caller bounds its pending batches too).
    pub fn new(ingest: Arc<I>, protocol: Protocol, depth: usize) -> Self {
        Self {
            ingest,
            protocol,
            depth: depth.max(1),
            lanes: HashMap::new(),
            trace: None,
        }
    }

    /// Gives every batch of the connection the trace context it was opened with.
    pub fn with_trace(mut self, trace: Option<TraceHeaders>) -> Self {
        self.trace = trace;
        self
    }

    /// Queues an admitted batch behind the earlier batches of its stream; the receiver gets its
    /// outcome.
    pub async fn submit(
        &mut self,
        admission: Admission,
        content_type: Bytes,
        events: Vec<Event>,
    ) -> oneshot::Receiver<Outcome> {
        let (reply, rx) = oneshot::channel();
        let stream = admission.stream().clone();
        if self.lanes.len() >= MAX_LANES && !self.lanes.contains_key(&stream) {
            self.lanes.retain(|_, tx| tx.capacity() < tx.max_capacity());
        }
        let tx = self
            .lanes
            .entry(stream.clone())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(self.depth);
                tokio::spawn(run(
                    self.ingest.clone(),
                    self.protocol,
                    self.trace.clone(),
                    rx,
                ));
                tx
            })
            .clone();
        let item = Item {
            admission,
            content_type,
            events,
            reply,
        };
        // The lane ends only when its sender is dropped, so this send waits for room at most.
        let _ = tx.send(item).await;
        rx
    }
}

/// One stream's lane: appends queued batches in order, merging those already waiting (same
/// content type, within the stream's events-per-request limit) into one append under the first
/// one's admission (same principal and stream; admitted by the adapter as it read them).
async fn run<I: Ingest>(
    ingest: Arc<I>,
    protocol: Protocol,
    trace: Option<TraceHeaders>,
    mut rx: mpsc::Receiver<Item>,
) {
    let mut next: Option<Item> = None;
    let mut chain = Chain::default();
    loop {
        // The next append starts once the one before is queued (or refused): order is kept,
        // and the writes of both can share a group commit.
        chain.wait().await;
        let first = match next.take() {
            Some(i) => i,
            None => match rx.recv().await {
                Some(i) => i,
                None => return,
            },
        };
        let admission = first.admission.clone();
        let limit = admission.settings().max_events_per_request as usize;
        let content_type = first.content_type.clone();
        let mut total = first.events.len();
        let mut group = vec![first];
        while let Ok(item) = rx.try_recv() {
            if item.content_type != content_type || total + item.events.len() > limit {
                next = Some(item);
                break;
            }
            total += item.events.len();
            group.push(item);
        }
        // Empty batches are answered on their own (an empty request is malformed).
        let (empty, group): (Vec<Item>, Vec<Item>) =
            group.into_iter().partition(|i| i.events.is_empty());
        for i in empty {
            let _ = i.reply.send(Err(Rejection::Malformed {
                message: "the batch holds no events".into(),
            }));
        }
        if group.is_empty() {
            continue;
        }
        let counts: Vec<usize> = group.iter().map(|i| i.events.len()).collect();
        let mut replies = Vec::with_capacity(group.len());
        let mut events = Vec::with_capacity(total);
        for i in group {
            events.extend(i.events);
            replies.push(i.reply);
        }
        let queued = chain.next();
        let ingest2 = ingest.clone();
        let trace = trace.clone();
        tokio::spawn(async move {
            let outcome = crate::append_admitted(
                &*ingest2,
                Ok(admission),
                protocol,
                content_type,
                events,
                Some(queued),
                trace,
            )
            .await;
            match outcome {
                Ok(receipts) => {
                    let mut rest = receipts.into_iter();
                    for (reply, n) in replies.into_iter().zip(counts) {
                        let _ = reply.send(Ok(rest.by_ref().take(n).collect()));
                    }
                }
                Err(r) => {
                    for reply in replies {
                        let _ = reply.send(Err(r.clone()));
                    }
                }
            }
        });
    }
}

/// Appends started one after another, each once the one before is in the log's queue (its
/// position fixed) or refused: what keeps a connection's batches in order while their writes
/// still share group commits. Used by the lanes here and by the MQTT session's appender.
#[derive(Debug, Default)]
pub(crate) struct Chain {
    last_queued: Option<oneshot::Receiver<()>>,
}

impl Chain {
    /// Whether the next append may start now (for loops that poll rather than wait).
    pub(crate) fn ready(&mut self) -> bool {
        if let Some(rx) = &mut self.last_queued {
            if let Err(oneshot::error::TryRecvError::Empty) = rx.try_recv() {
                return false;
            }
            self.last_queued = None;
        }
        true
    }

    /// Whether an append was started and is not yet queued.
    pub(crate) fn waiting(&self) -> bool {
        self.last_queued.is_some()
    }

    /// Waits until the next append may start. Cancel-safe (for `select!`): dropped before the
    /// append is queued, it keeps waiting for that append next time.
    pub(crate) async fn wait(&mut self) {
        if let Some(rx) = &mut self.last_queued {
            let _ = rx.await;
            self.last_queued = None;
        }
    }

    /// Starts the next append: the sender goes into its `IngestRequest::queued`.
    pub(crate) fn next(&mut self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        self.last_queued = Some(rx);
        tx
    }
}
