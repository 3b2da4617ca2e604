//! A hyper server loop shared by every HTTP-based listener: bounded connections, HTTP/1.1 and
//! h2c on one port, header read timeout, graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use sluice_auth::tls::TlsReloader;
use sluice_core::metrics::ConnectionMetrics;
use tokio::net::TcpListener;

/// What a handler knows about the connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The client certificate (DER) that TLS verified, if the client presented one.
    pub client_cert: Option<Arc<[u8]>>,
    /// The principal this connection counts against, once a request authenticated (shared by
    /// all requests of the connection, released when it closes).
    pub principal: Arc<std::sync::Mutex<Option<PrincipalSlot>>>,
    /// The connection's places in its listener's limits (connections, per address), held by
    /// every clone: an upgraded WebSocket or MQTT-over-WebSocket session keeps them until it
    /// ends, not only until hyper hands the socket over.
    pub admitted: Option<Arc<Admitted>>,
}

/// Open things counted per key (connections per principal, per source address), bounded by a
/// limit (0 = no limit, and then nothing is counted). Entries exist only while their key has
/// something open, so the map is bounded by what is open.
#[derive(Debug)]
pub struct Counted<K: std::hash::Hash + Eq + Clone> {
    max: std::sync::atomic::AtomicUsize,
    open: std::sync::Mutex<std::collections::HashMap<K, usize>>,
}

/// One thing counted against a key; dropping it releases the count.
#[derive(Debug)]
pub struct Slot<K: std::hash::Hash + Eq + Clone> {
    key: K,
    table: Arc<Counted<K>>,
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap();
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Counted<K> {
    /// A table allowing `max` per key (0 = no limit).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.into(),
            open: Default::default(),
        })
    }

    /// Changes the limit; what is already counted stays.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts one more for `key`: `Ok(None)` when there is no limit (nothing counted), `Err`
    /// when `key` has its maximum open.
    #[allow(clippy::result_unit_err)]
    pub fn take(self: &Arc<Self>, key: K) -> Result<Option<Slot<K>>, ()> {
        let max = self.max.load(std::sync::atomic::Ordering::Relaxed);
        if max == 0 {
            return Ok(None);
        }
        let mut open = self.open.lock().unwrap();
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= max {
            return Err(());
        }
        *n += 1;
        Ok(Some(Slot {
            key,
            table: self.clone(),
        }))
    }
}

/// Open connections per principal.
pub type PrincipalConnections = Counted<Arc<str>>;
/// A connection counted against its principal.
pub type PrincipalSlot = Slot<Arc<str>>;
/// Open connections per source address.
pub type AddressSlots = Counted<std::net::IpAddr>;
/// A connection counted against its source address.
pub type AddressSlot = Slot<std::net::IpAddr>;

impl PrincipalConnections {
    /// Counts `conn` against `principal` the first time it authenticates; false if that
    /// principal already has its maximum of open connections.
    pub fn admit(self: &Arc<Self>, conn: &ConnInfo, principal: &str) -> bool {
        let mut slot = conn.principal.lock().unwrap();
        if slot.is_some() {
            return true;
        }
        match self.take(Arc::from(principal)) {
            Ok(taken) => {
                *slot = taken;
                true
            }
            Err(()) => false,
        }
    }
}

/// Connection-level settings of a listener.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Connections beyond this limit (one unit each; resizable at run time) are closed right
    /// after accept.
    pub connections: sluice_core::Budget,
    /// Open connections per source address; beyond it new ones are closed right after accept.
    pub per_address: Arc<AddressSlots>,
    /// The first request of a connection must start within this time of accept (a silent
    /// socket, a partial HTTP/2 preface or request head is closed), and HTTP/1.1 clients must
    /// send each request's headers within it.
    pub header_read_timeout: Duration,
    /// With no request in flight, a connection whose next request does not start within this
    /// time of the last one's end is closed (HTTP/1.1 keep-alive and HTTP/2 alike).
    pub idle_timeout: Duration,
    /// HTTP/2: PING a connection with calls in flight this often and close it if the answer
    /// does not come within the same time (a peer that vanished). `None`: no pings.
    pub h2_keepalive: Option<Duration>,
    /// TLS, when the listener has it.
    pub tls: Option<Arc<TlsReloader>>,
    /// The protocol of the listener, for its connections' tracing spans.
    pub protocol: &'static str,
    /// Behind a load balancer: the PROXY protocol and (HTTP) forwarding headers.
    pub proxy: crate::proxy::ProxySettings,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            connections: sluice_core::Budget::new(10_000),
            per_address: AddressSlots::new(0),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            h2_keepalive: Some(Duration::from_secs(30)),
            tls: None,
            protocol: "http",
            proxy: Default::default(),
        }
    }
}

/// What an accepted connection holds until it closes: its place in the listener's connection
/// limit and in its address's.
#[derive(Debug)]
pub struct Admitted {
    _connection: sluice_core::Reservation,
    _address: Option<AddressSlot>,
}

impl Admitted {
    /// Counts the connection against the client's address `ip` once a PROXY header named it
    /// (the balancer's address was not counted at accept); false, and the connection is to be
    /// closed, when that address has its maximum open.
    pub fn count_address(&mut self, per_address: &Arc<AddressSlots>, ip: std::net::IpAddr) -> bool {
        match per_address.take(ip) {
            Ok(slot) => {
                self._address = slot;
                true
            }
            Err(()) => false,
        }
    }
}

/// What a PROXY-protocol listener does first with an accepted connection: refuses a peer that
/// is not a trusted proxy, reads the header within `timeout`, and counts the connection against
/// the client's address. The client's address (the peer's for a header without one), or `None`
/// when the connection is to be closed.
pub async fn proxied<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    peer: SocketAddr,
    proxy: &sluice_config::ProxyConfig,
    timeout: Duration,
    per_address: &Arc<AddressSlots>,
    admitted: &mut Admitted,
) -> Option<SocketAddr> {
    if !proxy.trusted_proxies.is_empty() && !proxy.trusts(peer.ip()) {
        tracing::debug!(%peer, "connection refused: not from a trusted proxy (proxy.trusted_proxies)");
        return None;
    }
    let client = match crate::proxy::read_header(io, timeout).await {
        Ok(client) => client.unwrap_or(peer),
        Err(why) => {
            tracing::debug!(%peer, reason = %why, "connection refused: PROXY protocol header");
            return None;
        }
    };
    if !admitted.count_address(per_address, client.ip()) {
        tracing::debug!(%peer, %client, "connection refused: its address has max_connections_per_address open");
        return None;
    }
    Some(client)
}

/// Serves `handler` on `listener` until `shutdown` completes, then stops accepting and waits
/// for open connections to finish their in-flight requests (idle keep-alive connections are
/// closed). The caller bounds the wait with its own deadline.
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    opts: ServerOptions,
    connections: ConnectionMetrics,
    handler: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn(Request<Incoming>, ConnInfo) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_with(listener, opts, connections, handler, shutdown, |_| {}).await
}

/// [`serve`], with `tune` adjusting the HTTP/2 settings (e.g. gRPC's concurrent streams).
pub async fn serve_with<F, Fut, B>(
    listener: TcpListener,
    opts: ServerOptions,
    connections: ConnectionMetrics,
    handler: F,
    shutdown: impl Future<Output = ()>,
    tune: impl FnOnce(&mut auto::Builder<TokioExecutor>),
) where
    F: Fn(Request<Incoming>, ConnInfo) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(opts.h2_keepalive)
        .keep_alive_timeout(opts.h2_keepalive.unwrap_or(Duration::from_secs(20)))
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024);
    tune(&mut builder);
    let builder = Arc::new(builder);
    let deadlines = Deadlines {
        first_request: opts.header_read_timeout,
        idle: opts.idle_timeout,
    };
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    // With the PROXY protocol, connections are counted against the client's address once the
    // header named it, not against the balancer's at accept.
    let proxied_listener = opts.proxy.protocol;
    let no_limit = AddressSlots::new(0);
    while let Some((mut stream, peer, mut permit)) = accept_within(
        &listener,
        &opts.connections,
        if proxied_listener {
            &no_limit
        } else {
            &opts.per_address
        },
        shutdown.as_mut(),
        |_| {},
    )
    .await
    {
        let span = tracing::info_span!(
            "conn",
            protocol = opts.protocol,
            peer = tracing::field::Empty
        );
        let (handler, builder, watcher, gauge, tls) = (
            handler.clone(),
            builder.clone(),
            graceful.watcher(),
            connections.clone(),
            opts.tls.clone(),
        );
        let (proxy, per_address) = (opts.proxy.clone(), opts.per_address.clone());
        let header_timeout = opts.header_read_timeout;
        gauge.inc();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let peer = if proxied_listener {
                    match proxied(
                        &mut stream,
                        peer,
                        &proxy,
                        header_timeout,
                        &per_address,
                        &mut permit,
                    )
                    .await
                    {
                        Some(client) => client,
                        None => {
                            gauge.dec();
                            return;
                        }
                    }
                } else {
                    peer
                };
                tracing::Span::current().record("peer", tracing::field::display(peer));
                let permit = Arc::new(permit);
                // The TLS handshake runs here, never in the accept loop, so a slow client holds
                // only its own connection.
                let info = |client_cert| ConnInfo {
                    peer,
                    client_cert,
                    principal: Default::default(),
                    admitted: Some(permit.clone()),
                };
                match tls {
                    None => {
                        let io = TokioIo::new(stream);
                        serve_io(io, info(None), handler, &builder, watcher, deadlines).await;
                    }
                    Some(tls) => {
                        if let Some((tls_stream, cert)) = accept_tls(&tls, stream, peer).await {
                            let io = TokioIo::new(tls_stream);
                            serve_io(io, info(cert), handler, &builder, watcher, deadlines).await;
                        }
                    }
                }
                gauge.dec();
            },
            span,
        ));
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The next connection on `listener` that fits in `connections` (one unit each) and in its
/// source address's share (`per_address`), with TCP_NODELAY set, and what it holds of both;
/// `None` once `shutdown` completes. Connections beyond either limit are closed right after
/// accept (`refused` hears of each); accept errors (out of file descriptors and the like) back
/// off instead of spinning.
pub async fn accept_within<S: Future<Output = ()>>(
    listener: &TcpListener,
    connections: &sluice_core::Budget,
    per_address: &Arc<AddressSlots>,
    mut shutdown: std::pin::Pin<&mut S>,
    refused: impl Fn(SocketAddr),
) -> Option<(tokio::net::TcpStream, SocketAddr, Admitted)> {
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => return None,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(address) = per_address.take(peer.ip()) else {
            tracing::debug!(%peer, "connection refused: its address has max_connections_per_address open");
            refused(peer);
            continue;
        };
        let Ok(connection) = connections.try_reserve(1) else {
            tracing::debug!(%peer, "connection refused: listener at max_connections");
            refused(peer);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let admitted = Admitted {
            _connection: connection,
            _address: address,
        };
        return Some((stream, peer, admitted));
    }
}

/// The TLS handshake of an accepted connection, bounded by the listener's handshake timeout:
/// the stream and the client certificate (DER) TLS verified, if the client presented one.
pub async fn accept_tls(
    tls: &TlsReloader,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) -> Option<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    Option<Arc<[u8]>>,
)> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    match tokio::time::timeout(tls.handshake_timeout(), acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => {
            let client_cert = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Arc::<[u8]>::from(c.as_ref()));
            Some((tls_stream, client_cert))
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// When a connection without a request in flight is closed.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    /// After accept, until the first request starts.
    first_request: Duration,
    /// After a request ends, until the next starts.
    idle: Duration,
}

/// What a connection's watchdog knows of its requests.
struct Activity {
    opened: tokio::time::Instant,
    started: std::sync::atomic::AtomicBool,
    in_flight: std::sync::atomic::AtomicUsize,
    /// Milliseconds from `opened` to the end of the last request.
    last_end_ms: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        use std::sync::atomic::Ordering::SeqCst;
        self.started.store(true, SeqCst);
        self.in_flight.fetch_add(1, SeqCst);
        InFlight(self.clone())
    }

    /// When the connection is closed if nothing starts before; `None` while a request is in
    /// flight.
    fn deadline(&self, d: Deadlines) -> Option<tokio::time::Instant> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.in_flight.load(SeqCst) > 0 {
            return None;
        }
        Some(if self.started.load(SeqCst) {
            self.opened + Duration::from_millis(self.last_end_ms.load(SeqCst)) + d.idle
        } else {
            self.opened + d.first_request
        })
    }
}

/// A request in flight, until its response body is done or dropped (a gRPC stream stays in
/// flight as long as its response streams).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::SeqCst;
        let a = &self.0;
        let ms = a.opened.elapsed().as_millis() as u64;
        a.last_end_ms.fetch_max(ms, SeqCst);
        a.in_flight.fetch_sub(1, SeqCst);
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

async fn serve_io<IO, F, Fut, B>(
    io: IO,
    info: ConnInfo,
    handler: F,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    deadlines: Deadlines,
) where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    F: Fn(Request<Incoming>, ConnInfo) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let peer = info.peer;
    let activity = Arc::new(Activity {
        opened: tokio::time::Instant::now(),
        started: false.into(),
        in_flight: 0.into(),
        last_end_ms: 0.into(),
    });
    let svc = {
        let activity = activity.clone();
        service_fn(move |req| {
            let in_flight = activity.begin();
            let (h, info) = (handler.clone(), info.clone());
            async move {
                let resp = h(req, info).await;
                Ok::<_, Infallible>(resp.map(|body| Tracked {
                    body,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let conn = watcher.watch(builder.serve_connection_with_upgrades(io, svc).into_owned());
    tokio::pin!(conn);
    // The watchdog: a connection that starts no request within its deadline is dropped (which
    // closes the socket). Requests in flight are bounded by their own timeouts.
    loop {
        let wake = activity
            .deadline(deadlines)
            .unwrap_or_else(|| tokio::time::Instant::now() + deadlines.idle);
        tokio::select! {
            ended = &mut conn => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(wake) => {
                if activity
                    .deadline(deadlines)
                    .is_some_and(|d| d <= tokio::time::Instant::now())
                {
                    let why = if activity.started.load(std::sync::atomic::Ordering::SeqCst) {
                        "idle"
                    } else {
                        "no request"
                    };
                    tracing::debug!(%peer, why, "connection closed: its deadline passed");
                    return;
                }
            }
        }
    }
}
