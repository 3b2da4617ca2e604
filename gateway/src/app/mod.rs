//! Wiring: open the log, build the gateway, bind the listeners, serve, drain (`mod.rs`); the
//! admin endpoints (`admin.rs`); configuration reload (`reload.rs`).

mod admin;
mod reload;

use admin::{AdminActions, loglevel};
pub use reload::Reloader;
use reload::{HttpLimits, ReloadLabels};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use sluice_config::{Config, LogKind};
use sluice_core::metrics::Metrics;
use sluice_log::{Log, LogMetrics, LogOptions};
use sluice_protocols::gate::Gate;
use sluice_protocols::grpc::GrpcOptions;
use sluice_protocols::http::HttpOptions;
use sluice_protocols::http::ws::WsOptions;
use sluice_protocols::mqtt::{Mqtt, MqttOptions};
use sluice_protocols::server::{self, ServerOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sluice_auth::{Authenticator, Swap};
use sluice_core::Budget;
use sluice_protocols::server::{AddressSlots, PrincipalConnections};

use crate::admission::{Gateway, Policy};
use crate::dedup::{Dedup, DedupMetrics, Restored};
use crate::kafka::{KafkaMetrics, KafkaSink};
use crate::sink::Sink;
use crate::sink::spool::{Spool, SpoolMetrics};
use crate::sink::stream_options;
use sluice_config::DedupStore;
use sluice_core::Ingest as _;

/// A started gateway: its bound addresses and the handle to drain it.
pub struct Running {
    /// Applies configuration changes (SIGHUP).
    pub reloader: Arc<Reloader>,
    pub http_addr: SocketAddr,
    /// The gRPC listener's address, when `grpc.enabled`.
    pub grpc_addr: Option<SocketAddr>,
    /// The MQTT listeners' addresses (plain TCP, TLS), when enabled.
    pub mqtt_addr: Option<SocketAddr>,
    pub mqtts_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    drained: JoinHandle<()>,
    admin: JoinHandle<()>,
    admin_stop: watch::Sender<bool>,
    gateway: Arc<Gateway>,
    ready: Arc<AtomicBool>,
    shutdown_timeout: Duration,
}

/// Opens the log and binds every listener of `config` (read from `path`, if any, which is also
/// what reloads re-read); serving starts at once.
pub async fn start(config: Config, path: Option<std::path::PathBuf>) -> anyhow::Result<Running> {
    let mut registry = Registry::with_prefix("sluice");
    let metrics = Metrics::default();
    metrics.register(&mut registry);
    let log_metrics = LogMetrics::default();
    log_metrics.register(&mut registry);
    registry.register(
        "build",
        "Build information",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    let ready_gauge = Gauge::<i64>::default();
    registry.register(
        "ready",
        "1 while /readyz answers 200, 0 while it answers 503 (set at each scrape)",
        ready_gauge.clone(),
    );
    let in_flight_budget = Gauge::<i64>::default();
    registry.register(
        "in_flight_budget_bytes",
        "Configured in-flight budget (limits.max_in_flight_bytes)",
        in_flight_budget.clone(),
    );
    in_flight_budget.set(config.limits.max_in_flight_bytes as i64);
    let reloads = Family::<ReloadLabels, Counter>::default();
    registry.register(
        "config_reloads",
        "Configuration reloads (SIGHUP or file change) by result: ok or rejected",
        reloads.clone(),
    );

    let sink = match config.log.kind {
        LogKind::Embedded => Sink::Embedded(open_embedded(&config, log_metrics).await?),
        LogKind::Kafka => {
            let kafka_metrics = KafkaMetrics::default();
            kafka_metrics.register(&mut registry);
            let k = KafkaSink::new(&config.log.kafka, config.streams.max_streams, kafka_metrics)
                .context("log.kafka")?;
            // Declared streams' topics are looked up (and created, with create_topics) in the
            // background, so a cluster that is down does not keep the gateway from starting.
            tokio::spawn(prepare_topics(k.clone(), config.streams.clone()));
            // The spool opens when a stream acks "spooled", and also when it holds a backlog
            // from an earlier run (which its forwarders then send on).
            let spool = if config.any_spooled_stream()
                || config.log.data_dir.join("spool").join("streams").is_dir()
            {
                let spool_metrics = SpoolMetrics::default();
                spool_metrics.register(&mut registry);
                let spool_log_metrics = LogMetrics::default();
                spool_log_metrics.register(registry.sub_registry_with_prefix("spool"));
                Some(
                    Spool::open(
                        &config.log.data_dir,
                        &config.log.spool,
                        k.clone(),
                        &config.streams,
                        spool_log_metrics,
                        spool_metrics,
                    )
                    .await?,
                )
            } else {
                None
            };
            Sink::Kafka(k, spool)
        }
    };
    let dedup_metrics = DedupMetrics::default();
    dedup_metrics.register(&mut registry);
    let dedup = Arc::new(match config.dedup.store {
        DedupStore::Embedded => Dedup::embedded(config.dedup.max_entries, dedup_metrics),
        DedupStore::Redis => {
            // Kept in the data directory: a restarted gateway's older claims are recognised
            // as its own (over Kafka as well, whose data directory holds the spool).
            let instance = Some(instance_id(&config.log.data_dir)?);
            Dedup::redis(&config.dedup.redis, instance, dedup_metrics)?
        }
    });
    if let (Sink::Kafka(k, _), Some(redis)) = (&sink, dedup.redis_store()) {
        // Over Kafka the claims an earlier boot left are reconciled from its journal: the
        // keys it had in flight are looked up in their topics, the ones found are marked
        // stored, and only then is this boot's heartbeat published, after which other
        // gateways take over the rest (docs/exactly-once.md). The probe below refreshes the
        // heartbeat every second.
        let (journal, earlier) = crate::dedup::journal::Journal::open(
            &config.log.data_dir,
            redis.boot(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        )
        .context("the dedup journal")?;
        let restored = if earlier.keys.is_empty() {
            Vec::new()
        } else {
            find_in_kafka(k, &config.streams, &earlier).await
        };
        dedup.set_journal(journal);
        let dedup = dedup.clone();
        let reconcile = async move {
            let mut pause = Duration::from_millis(500);
            while let Err(why) = dedup.restore(&restored).await {
                tracing::warn!(error = %why, "could not reconcile the dedup journal into Redis yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
            earlier.forget();
        };
        // Before serving when Redis answers; else in the background (streams with dedup answer
        // 503 until it does, and no other gateway takes the earlier claims over meanwhile).
        let _ = tokio::time::timeout(Duration::from_secs(5), tokio::spawn(reconcile)).await;
    }
    if let Sink::Embedded(log) = &sink {
        let events = read_dedup_keys(log, &config).await?;
        let restore = {
            let dedup = dedup.clone();
            async move {
                let started = std::time::Instant::now();
                let mut pause = Duration::from_millis(500);
                loop {
                    match dedup.restore(&events).await {
                        Ok(()) => break,
                        Err(why) => {
                            tracing::warn!(error = %why, "could not restore the dedup window from the log yet; retrying");
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_secs(10));
                        }
                    }
                }
                if !events.is_empty() {
                    tracing::info!(
                        keys = events.len(),
                        ms = started.elapsed().as_millis() as u64,
                        "dedup window restored from the log"
                    );
                }
            }
        };
        if dedup.is_redis() {
            // Redis may be away at start: the gateway serves (streams with dedup answer 503
            // until Redis answers) while this retries.
            tokio::spawn(restore);
        } else {
            restore.await;
        }
    }
    if dedup.is_redis() {
        // Redis is asked once a second whether it answers, for /readyz and the metric (and
        // this gateway's heartbeat is refreshed).
        every(
            Duration::from_secs(1),
            Arc::downgrade(&dedup),
            |d| async move { d.probe().await },
        );
    }
    let mqtt_sessions = mqtt_session_store(&config, &dedup, &metrics)?;
    let schema_registry = if config.schema_registry.url.is_empty() {
        None
    } else {
        let r = crate::schema::Registry::new(
            &config.schema_registry,
            Some(config.log.data_dir.join("schema-cache")),
        )
        .map_err(anyhow::Error::msg)?;
        r.register_metrics(&mut registry);
        Some(Arc::new(r))
    };
    let schemas = crate::schema::Schemas::load(&config, schema_registry.as_ref(), None)
        .map_err(anyhow::Error::msg)?;
    if let Some(r) = &schema_registry {
        // One refresh before serving, so the first events need not wait for the task; a
        // registry that is down or silent delays the start by at most two request deadlines
        // (the background refresh goes on).
        let _ = tokio::time::timeout(r.deadline() * 2, r.refresh()).await;
        every(r.refresh_every(), Arc::downgrade(r), |r| async move {
            r.refresh().await
        });
    }
    let traces = if config.telemetry.traces.enabled {
        let m = crate::traces::TraceMetrics::default();
        m.register(&mut registry);
        let instance = instance_id(&config.log.data_dir).ok();
        Some(Arc::new(crate::traces::Traces::new(
            &config.telemetry.traces,
            instance,
            m,
        )?))
    } else {
        None
    };
    let gateway = Arc::new(
        Gateway::new(
            config.streams.clone(),
            sink,
            config.limits.max_in_flight_bytes,
            &config.quotas,
            metrics.clone(),
            dedup,
            schemas,
        )
        .with_traces(traces),
    );
    // With Redis as the state store, every gateway on it says once a second that it shares
    // cluster-wide quotas, which tells each how many do.
    if let Some(c) = gateway.cluster() {
        c.metrics().register(&mut registry);
        every(
            crate::quota::MEMBERS_EVERY,
            Arc::downgrade(&c),
            |c| async move { c.announce(false).await },
        );
    }
    gateway.schema_metrics().register(&mut registry);
    // Idle streams' expired dedup keys are freed now and then.
    every(
        Duration::from_secs(5),
        Arc::downgrade(&gateway),
        |g| async move { g.sweep_dedup() },
    );

    let http_listener = bind(&config.http.listen)
        .await
        .with_context(|| format!("binding http.listen {}", config.http.listen))?;
    let admin_listener = bind(&config.admin.listen)
        .await
        .with_context(|| format!("binding admin.listen {}", config.admin.listen))?;
    let grpc_listener = if config.grpc.enabled {
        Some(
            bind(&config.grpc.listen)
                .await
                .with_context(|| format!("binding grpc.listen {}", config.grpc.listen))?,
        )
    } else {
        None
    };
    let grpc_addr = grpc_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let m = &config.mqtt;
    let mqtt_listener = if m.enabled && m.plaintext {
        Some(
            bind(&m.listen)
                .await
                .with_context(|| format!("binding mqtt.listen {}", m.listen))?,
        )
    } else {
        None
    };
    let mqtts_listener = if m.enabled && m.tls.is_some() {
        Some(
            bind(&m.tls_listen)
                .await
                .with_context(|| format!("binding mqtt.tls_listen {}", m.tls_listen))?,
        )
    } else {
        None
    };
    let mqtt_addr = mqtt_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let mqtts_addr = mqtts_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;
    let http_addr = http_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let authenticator =
        Authenticator::new(&config.auth).map_err(|e| anyhow::anyhow!("auth: {e}"))?;
    authenticator.start().await;
    let auth = Arc::new(Swap::new(authenticator));
    // Anonymity is decided per listener and transport, in one place (DESIGN §11).
    let policy_of = |name: &str| {
        let t = config
            .producer_transport(name)
            .expect("policies are asked only for enabled transports");
        if t.allow_anonymous {
            tracing::warn!(
                transport = t.name,
                listen = %t.listen,
                "anonymous producers are allowed (the listener is bound to loopback, or {}.allow_anonymous = true); they may produce to and read every stream",
                t.auth_key
            );
        }
        sluice_auth::ListenerPolicy::of(&t)
    };
    let policy = policy_of("http");
    let tls = tls_listener("http.tls", config.http.tls.as_ref())?;
    let admin_tls = tls_listener("admin.tls", config.admin.tls.as_ref())?;

    let ready = Arc::new(AtomicBool::new(false));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let limits = HttpLimits {
        connections: Budget::new(config.http.max_connections as u64),
        concurrency: Budget::new(config.http.max_concurrent_requests as u64),
        per_principal: PrincipalConnections::new(config.http.max_connections_per_principal),
    };
    let mqtt = if config.mqtt.enabled {
        let m = &config.mqtt;
        let websocket_policy = if m.websocket {
            policy_of("mqtt_ws")
        } else {
            sluice_auth::ListenerPolicy::closed()
        };
        let mut opts = MqttOptions::from_config(m, auth.clone(), websocket_policy, tls.clone())
            .map_err(anyhow::Error::msg)?;
        opts.sessions = mqtt_sessions;
        Some(Mqtt::new(gateway.clone(), opts))
    } else {
        None
    };
    let mut mqtt_listeners = Vec::new();
    if let Some(mqtt) = &mqtt {
        let m = &config.mqtt;
        for (listener, tls, transport) in [
            (mqtt_listener, None, "mqtt"),
            (
                mqtts_listener,
                tls_listener("mqtt.tls", m.tls.as_ref())?,
                "mqtts",
            ),
        ] {
            if let Some(listener) = listener {
                let settings = sluice_protocols::mqtt::ListenerSettings {
                    connections: Budget::new(m.max_connections as u64),
                    per_address: AddressSlots::new(m.max_connections_per_address),
                    tls,
                    policy: policy_of(transport),
                    proxy: Arc::new(m.proxy.clone()),
                };
                mqtt_listeners.push(tokio::spawn(mqtt.clone().serve(
                    listener,
                    settings,
                    signalled(shutdown_rx.clone()),
                )));
            }
        }
    }
    let http_opts = HttpOptions {
        server: ServerOptions {
            connections: limits.connections.clone(),
            per_address: AddressSlots::new(config.http.max_connections_per_address),
            header_read_timeout: Duration::from_millis(config.http.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(config.http.idle_timeout_ms),
            h2_keepalive: keepalive(config.http.h2_keepalive_interval_ms),
            tls: tls.clone(),
            protocol: "http",
            proxy: Arc::new(config.http.proxy.clone()),
        },
        body_read_timeout: Duration::from_millis(config.http.body_read_timeout_ms),
        gate: Gate {
            auth: auth.clone(),
            policy,
            per_principal: limits.per_principal.clone(),
            tls: tls.clone(),
        },
        concurrency: limits.concurrency.clone(),
        max_subscribers: config.http.max_subscribers,
        max_subscribers_per_principal: config.http.max_subscribers_per_principal,
        sse_heartbeat: Duration::from_millis(config.http.sse_heartbeat_ms),
        cors: sluice_protocols::http::cors::Cors::new(&config.http.cors).map(Arc::new),
        kafka_rest_cluster_id: config.http.kafka_rest_cluster_id.clone(),
        websocket: config.websocket.enabled.then(|| {
            let w = &config.websocket;
            WsOptions {
                max_message_bytes: w.max_message_bytes as usize,
                max_pending_frames: w.max_pending_frames,
                idle_timeout: Duration::from_millis(w.idle_timeout_ms),
                ping_interval: Duration::from_millis(w.ping_interval_ms),
                ack_write_timeout: Duration::from_millis(w.ack_write_timeout_ms),
            }
        }),
        allowed_origins: config.websocket.allowed_origins.clone(),
        mqtt: mqtt.as_ref().filter(|_| config.mqtt.websocket).map(|m| {
            (
                Arc::new(m.clone()) as Arc<dyn sluice_protocols::mqtt::WsSessions>,
                config.mqtt.max_packet_bytes,
            )
        }),
    };
    let http = tokio::spawn(sluice_protocols::http::serve(
        http_listener,
        gateway.clone(),
        http_opts,
        signalled(shutdown_rx.clone()),
    ));
    let grpc = match grpc_listener {
        Some(listener) => {
            sluice_protocols::grpc::codec::set_max_events(config.streams.max_events_per_request());
            let grpc_policy = policy_of("grpc");
            let ready_fn = {
                let (ready, gateway) = (ready.clone(), gateway.clone());
                Arc::new(move || ready.load(Ordering::SeqCst) && gateway.sink().health().is_ok())
                    as Arc<dyn Fn() -> bool + Send + Sync>
            };
            let grpc_tls = tls_listener("grpc.tls", config.grpc.tls.as_ref())?;
            let opts = GrpcOptions {
                server: ServerOptions {
                    connections: Budget::new(config.grpc.max_connections as u64),
                    per_address: AddressSlots::new(config.grpc.max_connections_per_address),
                    header_read_timeout: Duration::from_millis(config.http.header_read_timeout_ms),
                    idle_timeout: Duration::from_millis(config.grpc.idle_timeout_ms),
                    h2_keepalive: keepalive(config.grpc.h2_keepalive_interval_ms),
                    tls: grpc_tls.clone(),
                    protocol: "grpc",
                    proxy: Arc::new(config.grpc.proxy.clone()),
                },
                gate: Gate {
                    auth: auth.clone(),
                    policy: grpc_policy,
                    per_principal: PrincipalConnections::new(
                        config.grpc.max_connections_per_principal,
                    ),
                    tls: grpc_tls,
                },
                max_message_bytes: config.grpc.max_message_bytes as usize,
                max_concurrent_streams: config.grpc.max_concurrent_streams,
                max_batches_in_flight: config.grpc.max_batches_in_flight,
                ready: ready_fn,
            };
            Some(tokio::spawn(sluice_protocols::grpc::serve(
                listener,
                gateway.clone(),
                opts,
                signalled(shutdown_rx.clone()),
            )))
        }
        None => None,
    };
    let drained = {
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let requests = async {
                let _ = http.await;
                if let Some(grpc) = grpc {
                    let _ = grpc.await;
                }
            };
            let sessions = async {
                for l in mqtt_listeners {
                    let _ = l.await;
                }
                // MQTT sessions answer what they read, send DISCONNECT 0x8B (MQTT 5), close.
                if let Some(mqtt) = mqtt {
                    mqtt.drain().await;
                }
            };
            tokio::join!(requests, sessions);
            // Every request has been answered; let the writers finish and fsync.
            gateway.sink().close().await;
        })
    };

    let registry = Arc::new(registry);
    let (admin_stop, admin_rx) = watch::channel(false);
    let admin = {
        let (ready, gateway, registry) = (ready.clone(), gateway.clone(), registry.clone());
        let ready_gauge = ready_gauge.clone();
        let connections = Default::default();
        let actions = Arc::new(AdminActions {
            token: config.admin.token.as_ref().map(|t| t.0.clone()),
            open: config.admin.open_for_actions(),
        });
        tokio::spawn(server::serve(
            admin_listener,
            ServerOptions {
                connections: Budget::new(config.admin.max_connections as u64),
                per_address: AddressSlots::new(config.admin.max_connections_per_address),
                header_read_timeout: Duration::from_millis(config.admin.header_read_timeout_ms),
                idle_timeout: Duration::from_millis(config.admin.idle_timeout_ms),
                h2_keepalive: None,
                tls: admin_tls,
                protocol: "admin",
                proxy: Default::default(),
            },
            connections,
            move |req, _| {
                let (ready, gateway, registry) = (ready.clone(), gateway.clone(), registry.clone());
                let ready_gauge = ready_gauge.clone();
                let actions = actions.clone();
                async move {
                    if req.uri().path() == "/loglevel" {
                        if req.method() != Method::GET
                            && req.method() != Method::HEAD
                            && let Err(refused) = actions.check(req.headers())
                        {
                            return refused;
                        }
                        return loglevel(req).await;
                    }
                    admin::respond(
                        req.method(),
                        req.uri().path(),
                        &ready,
                        &gateway,
                        &registry,
                        &ready_gauge,
                    )
                }
            },
            signalled(admin_rx),
        ))
    };
    let reloader = Arc::new(Reloader {
        path,
        auth,
        gateway: gateway.clone(),
        reloads,
        limits,
        in_flight_budget: in_flight_budget.clone(),
        schema_registry,
        schema_files: std::sync::Mutex::new(reload::schema_files(&config)),
    });
    if config.server.config_watch_interval_ms > 0 {
        tokio::spawn(reloader.clone().watch(Duration::from_millis(
            config.server.config_watch_interval_ms,
        )));
    }
    ready.store(true, Ordering::SeqCst);
    match config.log.kind {
        LogKind::Embedded => {
            tracing::info!(%http_addr, %admin_addr, data_dir = %config.log.data_dir.display(), "sluice is serving (embedded log)")
        }
        LogKind::Kafka => {
            tracing::info!(%http_addr, %admin_addr, bootstrap_servers = %config.log.kafka.bootstrap_servers, "sluice is serving (Kafka)")
        }
    }
    Ok(Running {
        reloader,
        http_addr,
        grpc_addr,
        mqtt_addr,
        mqtts_addr,
        admin_addr,
        shutdown,
        drained,
        admin,
        admin_stop,
        gateway,
        ready,
        shutdown_timeout: Duration::from_millis(config.server.shutdown_timeout_ms),
    })
}

/// Opens the embedded log under `log.data_dir` and creates the declared streams.
async fn open_embedded(config: &Config, metrics: LogMetrics) -> anyhow::Result<Log> {
    let log_opts = LogOptions {
        data_dir: config.log.data_dir.clone(),
        segment_bytes: config.log.segment_bytes,
        segment_ms: config.log.segment_ms,
        index_interval_bytes: config.log.index_interval_bytes,
        max_group_bytes: config.log.max_group_bytes,
        flush_interval: Duration::from_millis(config.log.flush_interval_ms),
        retention_check_interval: Duration::from_millis(config.log.retention_check_interval_ms),
        fault_append_delay: Duration::from_millis(config.log.fault_append_delay_ms),
        fault_fsync_fail_after: config.log.fault_fsync_fail_after,
        max_streams: config.streams.max_streams,
        queue_depth: 4096,
        keep_until_released: false,
    };
    let streams_cfg = config.streams.clone();
    let log = Log::open(log_opts, metrics, move |name| {
        stream_options(&streams_cfg, name)
    })
    .await
    .with_context(|| format!("opening the log in {}", config.log.data_dir.display()))?;
    // Declared streams exist from the start: readable, with their partition count fixed.
    for name in config.streams.declare.keys() {
        log.get_or_create(name, stream_options(&config.streams, name))
            .await
            .with_context(|| format!("creating declared stream `{name}`"))?;
    }
    Ok(log)
}

/// Runs `f` on what `weak` points to every `period`, for as long as it lives.
fn every<T, F, Fut>(period: Duration, weak: std::sync::Weak<T>, f: F)
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            match weak.upgrade() {
                Some(t) => f(t).await,
                None => return,
            }
        }
    });
}

/// Pending connections a listener's kernel queue holds (capped by `net.core.somaxconn`):
/// tokio's default of 1024 overflowed in a reconnect storm of 10,000 devices, and each SYN
/// dropped costs its device a 1 s retransmit (BENCHMARKS.md, MQTT fleets).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener on `addr` (resolved; the first address) with [`LISTEN_BACKLOG`].
/// Like `TcpListener::bind`, each resolved address is tried until one binds.
async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for sa in tokio::net::lookup_host(addr).await? {
        let attempt = (|| {
            let socket = if sa.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            // As TcpListener::bind does: a restarted gateway binds while old connections
            // linger.
            socket.set_reuseaddr(true)?;
            socket.bind(sa)?;
            socket.listen(LISTEN_BACKLOG)
        })();
        match attempt {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
    }))
}

/// Where persistent MQTT sessions are kept: beside the dedup window, in Redis when that is
/// Redis (any gateway of a fleet resumes a session), else in files under `data_dir`.
fn mqtt_session_store(
    config: &Config,
    dedup: &Arc<Dedup>,
    metrics: &Metrics,
) -> anyhow::Result<Arc<dyn sluice_protocols::mqtt::store::SessionStore>> {
    let m = &config.mqtt;
    if !m.enabled || m.max_session_expiry_secs == 0 {
        return Ok(Arc::new(sluice_protocols::mqtt::store::NoSessions));
    }
    if let Some(redis) = dedup.redis_store() {
        return Ok(Arc::new(crate::sessions::RedisSessions::new(
            redis,
            dedup.metrics().clone(),
            &config.dedup.redis.key_prefix,
            m.max_sessions_per_principal,
            m.max_sessions,
        )));
    }
    let files = crate::sessions::FileSessions::open(
        &config.log.data_dir.join("mqtt-sessions"),
        m.max_sessions_per_principal,
        m.max_sessions,
        metrics.mqtt_sessions_stored.clone(),
    )
    .context("opening the MQTT session store")?;
    every(
        crate::sessions::SWEEP_EVERY,
        Arc::downgrade(&files),
        |f| async move {
            let _ = tokio::task::spawn_blocking(move || f.sweep()).await;
        },
    );
    Ok(Arc::new(crate::sessions::SharedFiles(files)))
}

/// This gateway's instance id, kept in its data directory (made at first start): its claims in
/// a shared dedup store carry it, so other gateways can tell when it restarted.
fn instance_id(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("instance-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let mut b = [0u8; 8];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
                .map_err(|_| anyhow::anyhow!("no randomness for the instance id"))?;
            let id = crate::dedup::redis::hex(&b);
            std::fs::create_dir_all(data_dir)?;
            std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
            Ok(id)
        }
    }
}

/// The events of the keys an earlier boot journaled that are in Kafka, as restored keys: each
/// journaled stream's topic read from its oldest entry's time to its end. Retried while Kafka
/// does not answer, for up to 30 s; then the gateway starts without them (their claims are
/// taken over, and their events may be stored twice: docs/exactly-once.md).
async fn find_in_kafka(
    k: &KafkaSink,
    streams: &sluice_config::StreamsConfig,
    earlier: &crate::dedup::journal::Earlier,
) -> Vec<Restored> {
    let started = std::time::Instant::now();
    let give_up = started + Duration::from_secs(30);
    let mut pause = Duration::from_millis(200);
    loop {
        let (k, streams, journaled) = (k.clone(), streams.clone(), earlier.clone());
        let found = tokio::task::spawn_blocking(move || -> Result<Vec<Restored>, String> {
            let earlier = journaled;
            let mut out = Vec::new();
            for (stream, from) in &earlier.from_ms {
                let settings = streams.settings(stream);
                let name: Arc<str> = Arc::from(stream.as_str());
                k.scan(stream, from - 1_000, give_up, |p, r| {
                    out.extend(earlier.matching(&name, &settings, p, r));
                })?;
            }
            Ok(out)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match found {
            Ok(found) => {
                tracing::info!(
                    journaled = earlier.keys.len(),
                    found = found.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "dedup journal of the last run reconciled with Kafka"
                );
                return found;
            }
            Err(why) if std::time::Instant::now() + pause < give_up => {
                tracing::warn!(error = %why, "could not read Kafka to reconcile the dedup journal yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(why) => {
                tracing::error!(error = %why, keys = earlier.keys.len(), "could not read Kafka to reconcile the dedup journal; starting without it (events in flight at the last stop may be stored twice)");
                return Vec::new();
            }
        }
    }
}

/// The events still in the dedup window of each stream with `dedup = true`, read back from the
/// embedded log, oldest first: each partition from `dedup_window_ms` ago, at most its newest
/// `dedup_window_events` records with a key. An acked event is in the log, so the window
/// rebuilt from these answers retries of every event acked before a restart (or SIGKILL).
async fn read_dedup_keys(log: &Log, config: &Config) -> anyhow::Result<Vec<Restored>> {
    let data_dir = config.log.data_dir.clone();
    let streams = config.streams.clone();
    let names = log.stream_names();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Restored>> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut all = Vec::new();
        for name in names {
            let s = streams.settings(&name);
            if !s.dedup {
                continue;
            }
            let from = now_ms.saturating_sub(s.dedup_window_ms as i64);
            let cap = s.dedup_window_events as usize;
            let stream: Arc<str> = Arc::from(name.as_str());
            let mut records = Vec::new();
            for (partition, dir) in sluice_log::partition_dirs(&data_dir, &name)? {
                let mut reader = sluice_log::PartitionReader::from_time(&dir, from)?;
                let mut newest = std::collections::VecDeque::new();
                while let Some(r) = reader.next_record()? {
                    let Some(restored) = Restored::of_record(&stream, s, partition, r) else {
                        continue;
                    };
                    if newest.len() == cap {
                        newest.pop_front();
                    }
                    newest.push_back(restored);
                }
                records.extend(newest);
            }
            records.sort_by_key(|r| r.ts_ms);
            let skip = records.len().saturating_sub(cap);
            all.extend(records.into_iter().skip(skip));
        }
        Ok(all)
    })
    .await
    .context("reading the dedup window from the log")?
    .context("reading the dedup window from the log")
}

/// Looks up (or creates) the topics of the declared streams, retrying while Kafka is away.
async fn prepare_topics(kafka: KafkaSink, streams: sluice_config::StreamsConfig) {
    for name in streams.declare.keys() {
        let mut wait = Duration::from_millis(200);
        loop {
            match kafka
                .get_or_create(name, &streams.settings(name), true)
                .await
            {
                Ok(_) => break,
                Err(e @ sluice_core::Rejection::Unavailable { .. }) => {
                    tracing::debug!(stream = %name, error = %e, "declared stream's topic not ready; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
                Err(e) => {
                    tracing::warn!(stream = %name, error = %e, "declared stream's topic is not usable");
                    break;
                }
            }
        }
    }
}

/// A listener's TLS configuration, reloaded when its files change.
fn tls_listener(
    key: &str,
    cfg: Option<&sluice_config::TlsConfig>,
) -> anyhow::Result<Option<Arc<sluice_auth::tls::TlsReloader>>> {
    let Some(cfg) = cfg else { return Ok(None) };
    let reloader =
        sluice_auth::tls::TlsReloader::new(cfg).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
    tokio::spawn(reloader.clone().watch());
    Ok(Some(reloader))
}

async fn signalled(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|&stop| stop).await;
}

impl Running {
    /// Drains: readiness turns false, listeners stop accepting, in-flight requests are appended
    /// and answered, the log is flushed. Returns false if `server.shutdown_timeout_ms` passed
    /// before everything finished.
    pub async fn drain(self) -> bool {
        self.ready.store(false, Ordering::SeqCst);
        self.shutdown.send_replace(true);
        // Shortly before the deadline, whatever still waits for its ack point is answered with
        // a retryable error, so no producer is left with a cut connection and no answer.
        let margin = (self.shutdown_timeout / 5).min(Duration::from_secs(2));
        let answer_at = self.shutdown_timeout.saturating_sub(margin);
        let gateway = self.gateway.clone();
        let answer = tokio::spawn(async move {
            tokio::time::sleep(answer_at).await;
            tracing::warn!(
                in_flight_bytes = gateway.in_flight_bytes(),
                "drain deadline near: answering what is still in flight with a retryable error"
            );
            gateway.answer_in_flight_now();
        });
        let in_time = tokio::time::timeout(self.shutdown_timeout, self.drained)
            .await
            .is_ok();
        answer.abort();
        // Dedup settlements that run after their answers (Redis): recorded before exiting, so
        // a retry after the restart is recognised without waiting for the claims to expire.
        let settled =
            tokio::time::timeout(Duration::from_secs(2), self.gateway.dedup().settled()).await;
        // Everything answered and settled: the next start has no claim of this run to look up.
        if in_time && settled.is_ok() {
            self.gateway.dedup().clear_journal();
        }
        // The other gateways' local shares (should Redis go away) count one gateway less.
        if let Some(c) = self.gateway.cluster() {
            let _ = tokio::time::timeout(Duration::from_secs(1), c.announce(true)).await;
        }
        // The spans of what was drained go out before the process exits.
        if let Some(t) = self.gateway.traces() {
            t.shutdown(Duration::from_secs(2)).await;
        }
        if !in_time {
            tracing::warn!(
                in_flight_bytes = self.gateway.in_flight_bytes(),
                "drain deadline passed; exiting (what was still in flight was answered with a retryable error, none of it acked)"
            );
        }
        self.admin_stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.admin).await;
        in_time
    }
}

/// HTTP/2 keep-alive pings every `ms` (0: none).
fn keepalive(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}
