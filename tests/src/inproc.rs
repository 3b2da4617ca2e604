//! The middle layer of tests: the protocol adapters and the MQTT session run in-process against a
//! fake [`Ingest`] the test drives by hand (when an append is queued, what it answers), over
//! in-memory pipes, usually with tokio's paused clock — so ordering, windows, takeover and drain
//! are checked step by step, and "nothing happens" is a deterministic check rather than a wait.

use std::sync::Arc;
use std::time::Duration;

use sluice_config::{AuthConfig, MqttConfig, StreamSettings};
use sluice_core::metrics::Metrics;
use sluice_core::{
    Admission, Budget, Event, Ingest, IngestRequest, Principal, Receipt, Rejection, StreamName,
};
use sluice_protocols::gate::Gate;
use sluice_protocols::mqtt::{Mqtt, MqttOptions, Stream};
use sluice_protocols::server::ConnInfo;
use tokio::io::DuplexStream;
use tokio::sync::{mpsc, oneshot};

use crate::mqtt::Raw;

/// How long a test waits for something that must happen (virtual time when the clock is paused).
pub const WAIT: Duration = Duration::from_secs(30);

/// An [`Ingest`] that hands every batch to the test as a [`Call`] and answers what the test says.
/// Admission grants every stream the principal's permissions allow, with default settings.
pub struct FakeIngest {
    calls: mpsc::UnboundedSender<Call>,
    metrics: Metrics,
    budget: Budget,
    settings: StreamSettings,
}

/// The batches the adapters appended, in the order they were started.
pub struct Calls(mpsc::UnboundedReceiver<Call>);

impl FakeIngest {
    pub fn new() -> (Arc<Self>, Calls) {
        Self::with_settings(StreamSettings::default())
    }

    pub fn with_settings(settings: StreamSettings) -> (Arc<Self>, Calls) {
        let (tx, rx) = mpsc::unbounded_channel();
        let fake = Arc::new(Self {
            calls: tx,
            metrics: Metrics::default(),
            budget: Budget::new(1 << 30),
            settings,
        });
        (fake, Calls(rx))
    }
}

impl Ingest for FakeIngest {
    fn admit(&self, principal: &Principal, stream: &StreamName) -> Result<Admission, Rejection> {
        if !principal.may_produce_to(stream.as_str()) {
            return Err(Rejection::Forbidden {
                stream: stream.to_string(),
            });
        }
        Ok(Admission::granted(
            principal.clone(),
            stream.clone(),
            self.settings,
        ))
    }

    async fn ingest(&self, mut req: IngestRequest) -> Result<Vec<Receipt>, Rejection> {
        let (reply, answer) = oneshot::channel();
        let call = Call {
            stream: req.stream().to_string(),
            principal: req.principal().name().to_string(),
            protocol: req.protocol.as_str(),
            events: std::mem::take(&mut req.events),
            queued: req.queued.take(),
            reply: Some(reply),
        };
        if self.calls.send(call).is_err() {
            return Err(Rejection::unavailable(Duration::from_secs(1), "test over"));
        }
        answer.await.unwrap_or_else(|_| {
            Err(Rejection::Internal {
                message: "the test dropped the call without answering".into(),
            })
        })
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn budget(&self) -> &Budget {
        &self.budget
    }
}

/// One batch an adapter appended: what it holds, and the handles to answer it.
pub struct Call {
    pub stream: String,
    pub principal: String,
    pub protocol: &'static str,
    pub events: Vec<Event>,
    queued: Option<oneshot::Sender<()>>,
    reply: Option<oneshot::Sender<Result<Vec<Receipt>, Rejection>>>,
}

impl Call {
    /// The events' values, as text.
    pub fn values(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| String::from_utf8_lossy(&e.value).into_owned())
            .collect()
    }

    /// Says the batch is in the log's queue (its order fixed): the adapter may start the next.
    pub fn queue(&mut self) {
        if let Some(q) = self.queued.take() {
            let _ = q.send(());
        }
    }

    /// Appends every event, at offsets from `first`.
    pub fn append(self, first: u64) {
        let n = self.events.len() as u64;
        self.answer(Ok((first..first + n)
            .map(|offset| Receipt::Appended {
                partition: 0,
                offset,
            })
            .collect()));
    }

    /// Refuses the whole batch.
    pub fn refuse(self, r: Rejection) {
        self.answer(Err(r));
    }

    pub fn answer(mut self, outcome: Result<Vec<Receipt>, Rejection>) {
        self.queue();
        let _ = self.reply.take().expect("answered once").send(outcome);
    }
}

impl Calls {
    /// The next batch; panics if none comes within [`WAIT`].
    pub async fn next(&mut self) -> Call {
        tokio::time::timeout(WAIT, self.0.recv())
            .await
            .expect("a batch within the wait")
            .expect("the fake is alive")
    }

    /// The next batch if one comes within `d` (with the clock paused, `d` passes as soon as
    /// everything else is idle, so `None` means nothing would ever come by then).
    pub async fn within(&mut self, d: Duration) -> Option<Call> {
        tokio::time::timeout(d, self.0.recv()).await.ok().flatten()
    }
}

/// An MQTT server in-process: the real session code over in-memory pipes, against a fake log.
pub struct MqttHarness {
    pub mqtt: Arc<Mqtt<FakeIngest>>,
    gate: Arc<Gate>,
}

impl MqttHarness {
    /// Anonymous producers allowed; `configure` adjusts the `[mqtt]` settings first.
    pub fn new(ingest: Arc<FakeIngest>, configure: impl FnOnce(&mut MqttConfig)) -> Self {
        let mut m = MqttConfig::default();
        configure(&mut m);
        let auth = Arc::new(sluice_core::Swap::new(
            sluice_auth::Authenticator::new(&AuthConfig::default()).expect("authenticator"),
        ));
        let policy = sluice_auth::ListenerPolicy {
            methods: Vec::new(),
            allow_anonymous: true,
        };
        let opts =
            MqttOptions::from_config(&m, auth.clone(), policy.clone(), None).expect("mqtt options");
        let per_principal = opts.per_principal.clone();
        let gate = Arc::new(Gate {
            auth,
            policy,
            per_principal,
            tls: None,
        });
        Self {
            mqtt: Mqtt::new(ingest, opts),
            gate,
        }
    }

    /// A new client connection (not yet connected at the MQTT level); its session runs in a
    /// task whose handle says when it ended.
    pub fn client(&self, is_v5: bool) -> (Raw<DuplexStream>, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mqtt, gate) = (self.mqtt.clone(), self.gate.clone());
        let conn = ConnInfo {
            peer: "127.0.0.1:1".parse().unwrap(),
            client_cert: None,
            principal: Default::default(),
            admitted: None,
        };
        let session = tokio::spawn(async move { mqtt.session(Stream(server), conn, &gate).await });
        (Raw::over(client, is_v5), session)
    }
}
