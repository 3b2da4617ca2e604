//! Sessions by client identifier (a new CONNECT takes the session over) and wills waiting for
//! their delay.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use tokio::task::AbortHandle;

use super::*;

/// Open sessions by client identifier (a new CONNECT with the same identifier takes the
/// session over), and wills waiting for their delay. Both are bounded: sessions by the
/// connection limits, wills by `max_pending_wills` and `max_pending_will_bytes`.
#[derive(Default)]
pub(in crate::mqtt) struct Registry {
    pub(super) sessions: Mutex<HashMap<SessionKey, (u64, Arc<Signal>)>>,
    pub(super) wills: Mutex<HashMap<SessionKey, (u64, AbortHandle)>>,
    /// The last connection of each session key until it has ended (its persistent session
    /// saved): the next connection waits for it before loading the session. Entries are
    /// removed by the connection itself at its end, so this holds at most one per connection.
    pub(super) ends: Mutex<HashMap<SessionKey, (u64, oneshot::Receiver<()>)>>,
}

/// What a session is told from outside, as bits of its [`Signal`].
pub(in crate::mqtt) mod signal {
    /// A new connection with the same client identifier took the session over.
    pub const KICKED: u8 = 1;
    /// The gateway is draining.
    pub const STOP: u8 = 2;
    /// The configuration or a listener's TLS was reloaded: the session checks whether its
    /// own credentials' sources changed ([`crate::gate::SessionAuth::reload_pending`]).
    pub const RELOAD: u8 = 4;
}

/// A session's one wake-up from outside: taken over, the gateway draining, a reload. One
/// small shared cell a session polls in place, instead of a oneshot and two watch
/// subscriptions whose futures sat in every idle connection's state (~430 bytes; memory per
/// idle connection, BENCHMARKS.md).
pub(in crate::mqtt) struct Signal {
    bits: AtomicU8,
    waker: AtomicWaker,
}

impl Signal {
    /// A signal with `bits` already raised.
    fn new(bits: u8) -> Arc<Self> {
        Arc::new(Self {
            bits: AtomicU8::new(bits),
            waker: AtomicWaker::new(),
        })
    }

    pub(super) fn raise(&self, bits: u8) {
        self.bits.fetch_or(bits, Ordering::AcqRel);
        self.waker.wake();
    }

    /// The bits raised since the last poll (and clears them), or pending until one is.
    pub(super) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<u8> {
        let bits = self.bits.swap(0, Ordering::AcqRel);
        if bits != 0 {
            return Poll::Ready(bits);
        }
        self.waker.register(cx.waker());
        // Raised between the swap and the registration: its wake went to the old waker.
        match self.bits.swap(0, Ordering::AcqRel) {
            0 => Poll::Pending,
            bits => Poll::Ready(bits),
        }
    }
}

impl<I: Ingest> Mqtt<I> {
    /// Registers a session under `key`, taking over (and telling) the session that had it,
    /// and cancels a will still waiting for its delay under that key. The session's signal
    /// starts with RELOAD raised (a reload between its authentication and this registration
    /// reached no signal: it checks once), and with STOP when the gateway is draining.
    pub(super) fn claim(&self, key: &SessionKey, conn_id: u64) -> Arc<Signal> {
        // Lock order: sessions, then wills (as in `will`), so a will is either waiting here
        // (and cancelled) or sees this session and is not scheduled. `raise_all` takes the
        // sessions lock after the drain's `stop` is sent: a session is either registered
        // before (and told) or sees `stop` here.
        let mut sessions = self.registry.sessions.lock().unwrap();
        let stopping = if *self.stop.borrow() { signal::STOP } else { 0 };
        let signal = Signal::new(signal::RELOAD | stopping);
        if let Some((_, old)) = sessions.insert(key.clone(), (conn_id, signal.clone())) {
            old.raise(signal::KICKED);
        }
        if let Some((_, pending)) = self.registry.wills.lock().unwrap().remove(key) {
            pending.abort();
            self.ingest.metrics().mqtt_will("cancelled");
        }
        signal
    }

    /// Raises `bits` on every open session's signal (a drain, a reload).
    pub(in crate::mqtt) fn raise_all(&self, bits: u8) {
        for (_, signal) in self.registry.sessions.lock().unwrap().values() {
            signal.raise(bits);
        }
    }

    /// Tells every session when the configuration or `gate`'s TLS is reloaded, until the
    /// gateway drains (or is gone): one task per gate, not a subscription per session.
    pub(in crate::mqtt) fn forward_reloads(self: &Arc<Self>, gate: &crate::gate::Gate) {
        let mut config = gate.auth.subscribe();
        let mut tls = gate.tls.as_ref().map(|t| t.subscribe());
        let mut stop = self.stop.subscribe();
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let tls_changed = async {
                    let changed = match tls.as_mut() {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => false,
                    };
                    if !changed {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    r = config.changed() => if r.is_err() { return },
                    () = tls_changed => {}
                    _ = stop.changed() => return,
                }
                let Some(this) = this.upgrade() else { return };
                this.raise_all(signal::RELOAD);
            }
        });
    }

    /// Records that connection `conn_id` holds `key` until `ended` says it has ended; returns
    /// the previous connection's signal, to wait for before loading the session it saves.
    pub(super) fn follow(
        &self,
        key: &SessionKey,
        conn_id: u64,
        ended: oneshot::Receiver<()>,
    ) -> Option<oneshot::Receiver<()>> {
        let mut ends = self.registry.ends.lock().unwrap();
        ends.insert(key.clone(), (conn_id, ended)).map(|(_, e)| e)
    }

    /// Connection `conn_id` has ended (and saved its session).
    pub(super) fn ended(&self, key: &SessionKey, conn_id: u64) {
        let mut ends = self.registry.ends.lock().unwrap();
        if ends.get(key).is_some_and(|(id, _)| *id == conn_id) {
            ends.remove(key);
        }
    }

    pub(in crate::mqtt) fn release(&self, key: &SessionKey, conn_id: u64) {
        let mut sessions = self.registry.sessions.lock().unwrap();
        if sessions.get(key).is_some_and(|(id, _)| *id == conn_id) {
            sessions.remove(key);
        }
    }

    /// Publishes a will now, or after its delay unless a new connection of the session
    /// comes first.
    pub(super) fn will(
        self: &Arc<Self>,
        key: SessionKey,
        conn_id: u64,
        principal: Principal,
        w: PreparedWill,
    ) {
        let this = self.clone();
        if w.delay_secs == 0 {
            tokio::spawn(async move { this.append_will(principal, w).await });
            return;
        }
        let sessions = self.registry.sessions.lock().unwrap();
        if sessions.contains_key(&key) {
            // A new connection of the session is already there (this one was released first).
            self.ingest.metrics().mqtt_will("cancelled");
            return;
        }
        let mut wills = self.registry.wills.lock().unwrap();
        let held = self.opts.pending_will_bytes.try_reserve(w.event.size());
        if wills.len() >= self.opts.max_pending_wills || held.is_err() {
            drop(wills);
            drop(sessions);
            self.ingest.metrics().mqtt_will("shed");
            tokio::spawn(async move { this.append_will(principal, w).await });
            return;
        }
        let key2 = key.clone();
        let task = tokio::spawn(async move {
            // Its bytes count against max_pending_will_bytes until it is appended (or cancelled).
            let _held = held;
            tokio::time::sleep(Duration::from_secs(u64::from(w.delay_secs))).await;
            {
                let mut wills = this.registry.wills.lock().unwrap();
                if wills.get(&key2).is_some_and(|(id, _)| *id == conn_id) {
                    wills.remove(&key2);
                }
            }
            this.append_will(principal, w).await;
        });
        wills.insert(key, (conn_id, task.abort_handle()));
    }

    async fn append_will(&self, principal: Principal, w: PreparedWill) {
        let deadline = Instant::now() + self.opts.max_hold;
        loop {
            let r = crate::append_batch(
                &*self.ingest,
                &principal,
                Protocol::Mqtt,
                &w.stream,
                CONTENT_TYPE,
                vec![w.event.clone()],
                None,
            )
            .await;
            let failure = match r {
                Ok(receipts) => receipts.into_iter().find_map(|r| match r {
                    Receipt::Failed(r) => Some(r),
                    _ => None,
                }),
                Err(r) => Some(r),
            };
            match failure {
                None => {
                    self.ingest.metrics().mqtt_will("appended");
                    return;
                }
                Some(r) if r.retry_after().is_some() && Instant::now() < deadline => {
                    let wait = r.retry_after().unwrap_or_default();
                    tokio::time::sleep(
                        wait.clamp(Duration::from_millis(10), Duration::from_secs(1)),
                    )
                    .await;
                }
                Some(r) => {
                    tracing::warn!(stream = %w.stream, principal = principal.name(), error = %r, "MQTT will not appended");
                    self.ingest.metrics().mqtt_will("failed");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is raised before the session polls is not lost, bits accumulate until taken, and
    /// a raise wakes a session waiting on its signal.
    #[tokio::test]
    async fn a_signal_keeps_what_was_raised_and_wakes_its_session() {
        let s = Signal::new(signal::RELOAD);
        s.raise(signal::STOP);
        let bits = std::future::poll_fn(|cx| s.poll_take(cx)).await;
        assert_eq!(bits, signal::RELOAD | signal::STOP);
        let waiting = {
            let s = s.clone();
            tokio::spawn(async move { std::future::poll_fn(|cx| s.poll_take(cx)).await })
        };
        // Not ready before anything is raised.
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        s.raise(signal::KICKED);
        let bits = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the raise woke the waiting session")
            .unwrap();
        assert_eq!(bits, signal::KICKED);
    }
}
