//! A connection's appends, started in arrival order (one [`Chain`]) and polled by the
//! connection's own task.

use super::*;

/// A connection's appends, polled by the connection's own task (no task per append).
pub(super) struct Appender<I> {
    pub(super) ingest: Arc<I>,
    pub(super) principal: Principal,
    /// Appends in flight; made by the first append and dropped when the last one ends (an
    /// idle connection holds none: memory per idle connection).
    pub(super) appends: Option<FuturesUnordered<Append>>,
    /// Appends not started yet: the one before has not reached the log's queue.
    pub(super) to_start: VecDeque<(u64, StreamName, Vec<Event>, Vec<usize>)>,
    /// Starts each append once the one before is in the log's queue (its order fixed).
    pub(super) chain: Chain,
}

impl<I: Ingest> Appender<I> {
    pub(super) fn new(ingest: Arc<I>, principal: Principal) -> Self {
        Appender {
            ingest,
            principal,
            appends: None,
            to_start: VecDeque::new(),
            chain: Chain::default(),
        }
    }

    /// Whether an append is in flight.
    pub(super) fn in_flight(&self) -> bool {
        self.appends.as_ref().is_some_and(|a| !a.is_empty())
    }

    /// Starts the next queued append once the one before is in the log's queue, so a
    /// connection's publishes of one stream are appended in the order they arrived while their
    /// writes still share group commits.
    pub(super) fn start(&mut self) {
        if !self.chain.ready() {
            return;
        }
        let Some((id, stream, events, idx)) = self.to_start.pop_front() else {
            return;
        };
        let queued_tx = self.chain.next();
        let (ingest, principal) = (self.ingest.clone(), self.principal.clone());
        let span = tracing::debug_span!("batch", stream = %stream, events = events.len());
        self.appends
            .get_or_insert_default()
            .push(Box::pin(tracing::Instrument::instrument(
                async move {
                    let out = crate::append_batch(
                        &*ingest,
                        &principal,
                        Protocol::Mqtt,
                        &stream,
                        CONTENT_TYPE,
                        events,
                        Some(queued_tx),
                    )
                    .await;
                    (id, idx, out)
                },
                span,
            )));
    }

    /// Runs what is queued and in flight to its end after the connection closed: publishes
    /// read before a DISCONNECT (QoS 0 ones in particular) are still appended, in order.
    /// Bounded: at most `MAX_GROUPS` batches of `MAX_GROUP` publishes were read.
    /// Returns the outcomes, by group, for the session to know which QoS 2 publishes it stored.
    pub(super) async fn finish(mut self) -> Vec<(u64, Vec<usize>, Outcome)> {
        let mut outcomes = Vec::new();
        loop {
            self.start();
            let in_flight = self.in_flight();
            if !in_flight && self.to_start.is_empty() {
                return outcomes;
            }
            let waiting = self.chain.waiting();
            tokio::select! {
                out = next_outcome(&mut self.appends), if in_flight => outcomes.push(out),
                _ = self.chain.wait(), if waiting => {}
            }
        }
    }
}

/// The next outcome of `appends` (pending while none is in flight); frees the set once it is
/// empty. (Of the field, not the appender: the loop waits on the chain beside it.)
pub(super) async fn next_outcome(
    appends: &mut Option<FuturesUnordered<Append>>,
) -> (u64, Vec<usize>, Outcome) {
    let Some(set) = appends.as_mut().filter(|a| !a.is_empty()) else {
        return std::future::pending().await;
    };
    let out = set.next().await;
    if set.is_empty() {
        *appends = None;
    }
    match out {
        Some(out) => out,
        None => std::future::pending().await,
    }
}
