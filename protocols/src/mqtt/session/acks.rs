//! Answers, in the order publishes arrived: settling each group's outcome into its items,
//! holding what may be retried, and writing PUBACK/PUBREC into the write buffer (no I/O here).

use super::*;

/// The "code" of a 3.1.1 connection the server ends: 3.1.1 has no DISCONNECT, so none is sent.
const V3_CLOSE: u8 = rc::SUCCESS;

impl<I: Ingest> Session<I> {
    /// Settles the outcomes that arrived for the head and writes the answers that are due.
    pub(super) fn settle_and_answer(&mut self) -> Result<(), Close> {
        loop {
            self.settle();
            let before = self.pending.len();
            self.answer_head()?;
            // A popped head may have uncovered a group whose outcome is already there.
            if self.pending.len() == before
                || self.pending.front().is_none_or(|g| g.outcome.is_none())
            {
                return Ok(());
            }
        }
    }

    /// Records the head group's outcome, if it arrived, in its items.
    pub(super) fn settle(&mut self) {
        let v5 = self.v5();
        let closing = self.closing;
        let max_hold = self.mqtt.opts.max_hold;
        let Some(g) = self.pending.front_mut() else {
            return;
        };
        let Some((idx, outcome)) = g.outcome.take() else {
            return;
        };
        let lost = || Rejection::Internal {
            message: "the append ended without an answer".into(),
        };
        let per_item: Vec<Result<(), Rejection>> = match outcome {
            // One receipt per event; should one be missing, its publish fails instead of
            // waiting forever at the head.
            Ok(receipts) => {
                let mut receipts = receipts.into_iter();
                (0..idx.len())
                    .map(|_| match receipts.next() {
                        // A duplicate is in the log already: success, like its original.
                        Some(
                            Receipt::Appended { .. }
                            | Receipt::Received { .. }
                            | Receipt::Spooled { .. }
                            | Receipt::Duplicate { .. }
                            // Stored in the dead-letter stream: taken, not to be resent.
                            | Receipt::DeadLettered { .. },
                        ) => Ok(()),
                        Some(Receipt::Failed(r)) => Err(r),
                        None => Err(lost()),
                    })
                    .collect()
            }
            Err(r) => vec![Err(r); idx.len()],
        };
        let now = Instant::now();
        let mut retry_after: Option<Duration> = None;
        for (i, r) in idx.into_iter().zip(per_item) {
            let item = &mut g.items[i];
            item.state = match r {
                Ok(()) => State::Done(None),
                Err(r) => {
                    // Draining: nothing is held any more, everything is answered.
                    let holdable = item.packet_id.is_some()
                        && !closing
                        && match &r {
                            Rejection::Unavailable { .. } => g
                                .held_since
                                .is_none_or(|s| now.duration_since(s) < max_hold),
                            // 3.1.1 has no way to say "over quota": hold the ack until it fits.
                            Rejection::OverQuota { .. } => !v5,
                            _ => false,
                        };
                    if holdable {
                        let wait = r.retry_after().unwrap_or(Duration::from_millis(100));
                        retry_after = Some(retry_after.map_or(wait, |w| w.min(wait)));
                        State::Hold(r)
                    } else {
                        State::Done(Some(refusal_of(&r)))
                    }
                }
            };
        }
        match retry_after {
            Some(wait) => {
                g.held_since.get_or_insert(now);
                let wait = wait.clamp(Duration::from_millis(10), Duration::from_secs(1));
                g.retry_at = Some(now + wait);
            }
            None => {
                g.held_since = None;
                g.retry_at = None;
            }
        }
    }

    /// Appends the head group's held publishes again.
    pub(super) fn retry(&mut self) {
        let Some(g) = self.pending.front_mut() else {
            return;
        };
        g.retry_at = None;
        let Some(stream) = g.stream.clone() else {
            return;
        };
        let mut idx = Vec::new();
        let mut events = Vec::new();
        for (i, item) in g.items.iter_mut().enumerate() {
            if matches!(item.state, State::Hold(_)) {
                idx.push(i);
                events.push(item.event.clone());
                item.state = State::Submitted;
            }
        }
        if idx.is_empty() {
            return;
        }
        // The head goes first: nothing after it can be answered before it anyway.
        self.appender
            .to_start
            .push_front((g.id, stream, events, idx));
        self.appender.start();
    }

    /// Writes the answers of settled publishes, in the order they arrived, from the head.
    pub(super) fn answer_head(&mut self) -> Result<(), Close> {
        let v5 = self.v5();
        let limit = self.mqtt.opts.quota_disconnect_after;
        while let Some(g) = self.pending.front_mut() {
            while g.next < g.items.len() {
                let item = &mut g.items[g.next];
                let refusal = match &mut item.state {
                    State::Done(r) => r.take(),
                    _ => break,
                };
                g.next += 1;
                match &refusal {
                    Some(r) if r.code == rc::QUOTA_EXCEEDED => {
                        self.over_quota += 1;
                        self.over_quota_qos0 = item.packet_id.is_none();
                    }
                    None => self.over_quota = 0,
                    _ => {}
                }
                let Some(id) = item.packet_id else {
                    // QoS 0 has no answer; 3.1.1 still ends the connection on what it cannot
                    // signal otherwise (not authorized, unmapped topic, …), except quota.
                    if let Some(r) = refusal
                        && !v5
                        && r.code != rc::QUOTA_EXCEEDED
                    {
                        return Err(error(V3_CLOSE, r.label, r.message));
                    }
                    continue;
                };
                self.unanswered -= 1;
                if item.qos2 {
                    self.qos2_pending.remove(&id.get());
                }
                match refusal {
                    None => {
                        if item.qos2 {
                            self.qos2_received.insert(id.get());
                        }
                        let _ = self.codec.ack(item.qos2, id, 0, None, &mut self.wbuf);
                    }
                    Some(r) if v5 => {
                        let mut message = r.message;
                        message.truncate(message.floor_char_boundary(256));
                        let _ =
                            self.codec
                                .ack(item.qos2, id, r.code, Some(message), &mut self.wbuf);
                    }
                    // 3.1.1 has no reason codes: the connection ends; the client resends.
                    Some(r) => return Err(error(V3_CLOSE, r.label, r.message)),
                }
                item.event = Event::default();
            }
            if limit > 0 && self.over_quota >= limit {
                let (code, what) = if self.over_quota_qos0 {
                    (rc::MESSAGE_RATE_TOO_HIGH, "message rate too high")
                } else {
                    (rc::QUOTA_EXCEEDED, "quota exceeded")
                };
                return Err(error(
                    code,
                    "quota",
                    format!("{what}: {} publishes in a row over quota", self.over_quota),
                ));
            }
            if g.next < g.items.len() {
                break;
            }
            self.pending.pop_front();
        }
        Ok(())
    }
}
