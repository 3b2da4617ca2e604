//! The embedded log as a sink: a request's events become one frame per partition, appended
//! with group commit, answered per event at the stream's ack point.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::future::join_all;
use sluice_config::{AckMode, StreamsConfig};
use sluice_core::{IngestRequest, Receipt, Rejection};
use sluice_log::{FrameBuilder, LogError, StreamLog, StreamOptions};

use super::kafka::headers::PRODUCER_TIMESTAMP;
use super::{Held, Placement, place};

/// Log options of `name` from the streams configuration.
pub fn stream_options(streams: &StreamsConfig, name: &str) -> StreamOptions {
    let s = streams.settings(name);
    StreamOptions {
        partitions: s.partitions,
        retention_ms: s.retention_ms,
        retention_bytes: s.retention_bytes,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Classifies a log failure once, for every protocol.
pub fn log_rejection(e: LogError) -> Rejection {
    match e {
        LogError::Closed => Rejection::unavailable(
            Duration::from_secs(1),
            "the gateway is shutting down; retry against another instance",
        ),
        LogError::TooManyStreams(n) => Rejection::unavailable(
            Duration::from_secs(60),
            format!(
                "the gateway holds its maximum of {n} streams (streams.max_streams); no new stream can be created"
            ),
        ),
        LogError::Io(_) | LogError::Poisoned(_) => Rejection::unavailable(
            Duration::from_secs(5),
            format!("the log cannot take writes: {e}"),
        ),
        LogError::Locked(_) | LogError::Corrupt(_) => Rejection::Internal {
            message: e.to_string(),
        },
    }
}

/// Encodes the events into one frame per partition, appends them, and answers per event.
pub(super) async fn append(
    stream: &StreamLog,
    req: &IngestRequest,
    ack: AckMode,
    mut held: Held,
    queued: Option<tokio::sync::oneshot::Sender<()>>,
) -> Vec<Receipt> {
    let n = stream.partition_count();
    let sticky = stream.sticky_partition();
    let ts = now_ms();
    let mut receipts = vec![
        Receipt::Failed(Rejection::Internal {
            message: String::new()
        });
        req.events.len()
    ];
    // Group event indexes by partition, keeping request order inside each group; an event that
    // cannot be placed is answered on its own and the others go on.
    let settings = req.admission.settings();
    let mut placements = Vec::with_capacity(req.events.len());
    let mut groups: Vec<(u32, Vec<usize>)> = Vec::new();
    for (i, e) in req.events.iter().enumerate() {
        let placed = match place(e, n, sticky, settings, ts) {
            Ok(p) => p,
            Err(r) => {
                receipts[i] = Receipt::Failed(r);
                placements.push(None);
                continue;
            }
        };
        placements.push(Some(placed));
        match groups.iter_mut().find(|(gp, _)| *gp == placed.partition) {
            Some((_, idx)) => idx.push(i),
            None => groups.push((placed.partition, vec![i])),
        }
    }
    if groups.is_empty() {
        drop(held);
        if let Some(q) = queued {
            let _ = q.send(());
        }
        return receipts;
    }
    let frames: Vec<_> = groups
        .iter()
        .map(|(_, idx)| encode(req, idx, &placements, ts))
        .collect();

    match ack {
        // The spool appends to its own embedded log with durable acks.
        AckMode::Durable | AckMode::Spooled => {
            // Queue every frame first (their order in the log is then fixed), tell the caller,
            // then wait for the writes.
            let mut waits = Vec::with_capacity(groups.len());
            for ((p, _), f) in groups.iter().zip(frames) {
                waits.push(stream.append_queued(*p, f, true).await);
            }
            if let Some(q) = queued {
                let _ = q.send(());
            }
            let results = join_all(waits.into_iter().map(|w| async move {
                match w {
                    Ok(rx) => rx.await.unwrap_or(Err(LogError::Closed)),
                    Err(e) => Err(e),
                }
            }))
            .await;
            for ((p, idx), r) in groups.iter().zip(results) {
                for (j, &i) in idx.iter().enumerate() {
                    receipts[i] = match &r {
                        Ok(base) => Receipt::Appended {
                            partition: *p,
                            offset: base + j as u64,
                        },
                        Err(e) => Receipt::Failed(log_rejection(e.clone())),
                    };
                }
            }
            drop(held);
        }
        AckMode::Received => {
            let last = groups.len() - 1;
            for (g, ((p, idx), f)) in groups.iter().zip(frames).enumerate() {
                // Each queued frame keeps its share of the budget until it is written.
                let share = held.split(if g == last {
                    usize::MAX
                } else {
                    frame_share(req, idx)
                });
                let r = stream.enqueue(*p, f, Some(Box::new(share))).await;
                for &i in idx {
                    receipts[i] = match &r {
                        Ok(()) => Receipt::Received { partition: *p },
                        Err(e) => Receipt::Failed(log_rejection(e.clone())),
                    };
                }
            }
            if let Some(q) = queued {
                let _ = q.send(());
            }
        }
    }
    receipts
}

fn frame_share(req: &IngestRequest, idx: &[usize]) -> usize {
    idx.iter().map(|&i| req.events[i].charge()).sum()
}

/// An event's headers, then the request's record headers: a chain that knows its length (the
/// frame writes the count first).
struct Both<'a, T> {
    first: std::slice::Iter<'a, T>,
    then: std::slice::Iter<'a, T>,
}

impl<'a, T> Both<'a, T> {
    fn new(first: &'a [T], then: &'a [T]) -> Self {
        Self {
            first: first.iter(),
            then: then.iter(),
        }
    }
}

impl<'a, T> Iterator for Both<'a, T> {
    type Item = &'a T;
    fn next(&mut self) -> Option<&'a T> {
        self.first.next().or_else(|| self.then.next())
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.first.len() + self.then.len();
        (n, Some(n))
    }
}

impl<T> ExactSizeIterator for Both<'_, T> {}

fn encode(
    req: &IngestRequest,
    idx: &[usize],
    placements: &[Option<Placement>],
    ts: i64,
) -> sluice_log::Frame {
    let capacity = frame_share(req, idx);
    let mut b = FrameBuilder::new(
        ts,
        &req.content_type,
        req.protocol.as_str().as_bytes(),
        // The identity (source U+001F name); `sluice log read` shows the two as
        // `sluice-principal` and `sluice-principal-source`.
        req.principal().identity().as_bytes(),
        capacity,
    );
    for &i in idx {
        let e = &req.events[i];
        let placed = placements[i].expect("placed events only");
        let headers = Both::new(&e.headers, &req.record_headers)
            .map(|(k, v): &(Bytes, Bytes)| (&k[..], &v[..]));
        match placed.replaced_ms {
            None => b.push_at(
                e.key.as_deref(),
                e.id.as_deref(),
                headers,
                &e.value,
                placed.timestamp_ms,
            ),
            Some(original) => {
                let original = original.to_string();
                let headers: Vec<_> = headers
                    .chain(std::iter::once((
                        PRODUCER_TIMESTAMP.as_bytes(),
                        original.as_bytes(),
                    )))
                    .collect();
                b.push_at(
                    e.key.as_deref(),
                    e.id.as_deref(),
                    headers.into_iter(),
                    &e.value,
                    None,
                )
            }
        }
    }
    b.finish()
}
