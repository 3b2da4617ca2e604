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
}

/// Open connections per principal, bounded by a limit.
#[derive(Debug, Default)]
pub struct PrincipalConnections {
    max: std::sync::atomic::AtomicUsize,
    open: std::sync::Mutex<std::collections::HashMap<Arc<str>, usize>>,
}

/// One connection counted against a principal; dropping it releases the count.
#[derive(Debug)]
pub struct PrincipalSlot {
    name: Arc<str>,
    table: Arc<PrincipalConnections>,
}

impl Drop for PrincipalSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap();
        if let Some(n) = open.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.name);
            }
        }
    }
}

impl PrincipalConnections {
    /// A table allowing `max` connections per principal (0 = no limit).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.into(),
            open: Default::default(),
        })
    }

    /// Changes the limit; connections already counted stay open.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts `conn` against `principal` the first time it authenticates; false if that
    /// principal already has its maximum of open connections.
    pub fn admit(self: &Arc<Self>, conn: &ConnInfo, principal: &str) -> bool {
        let mut slot = conn.principal.lock().unwrap();
        let max = self.max.load(std::sync::atomic::Ordering::Relaxed);
        if slot.is_some() || max == 0 {
            return true;
        }
        let mut open = self.open.lock().unwrap();
        let n = open.entry(Arc::from(principal)).or_insert(0);
        if *n >= max {
            if *n == 0 {
                open.remove(principal);
            }
            return false;
        }
        *n += 1;
        *slot = Some(PrincipalSlot {
            name: Arc::from(principal),
            table: self.clone(),
        });
        true
    }
}

/// Connection-level settings of a listener.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Connections beyond this limit (one unit each; resizable at run time) are closed right
    /// after accept.
    pub connections: sluice_core::Budget,
    /// HTTP/1.1 clients must send request headers within this time.
    pub header_read_timeout: Duration,
    /// TLS, when the listener has it.
    pub tls: Option<Arc<TlsReloader>>,
    /// The protocol of the listener, for its connections' tracing spans.
    pub protocol: &'static str,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            connections: sluice_core::Budget::new(10_000),
            header_read_timeout: Duration::from_secs(10),
            tls: None,
            protocol: "http",
        }
    }
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
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
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
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
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
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024);
    tune(&mut builder);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    while let Some((stream, peer, permit)) =
        accept_within(&listener, &opts.connections, shutdown.as_mut(), |_| {}).await
    {
        let span = tracing::info_span!("conn", protocol = opts.protocol, peer = %peer);
        let (handler, builder, watcher, gauge, tls) = (
            handler.clone(),
            builder.clone(),
            graceful.watcher(),
            connections.clone(),
            opts.tls.clone(),
        );
        gauge.inc();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                // The TLS handshake runs here, never in the accept loop, so a slow client holds
                // only its own connection.
                match tls {
                    None => {
                        let info = ConnInfo {
                            peer,
                            client_cert: None,
                            principal: Default::default(),
                        };
                        serve_io(TokioIo::new(stream), info, handler, &builder, watcher).await;
                    }
                    Some(tls) => {
                        if let Some((tls_stream, client_cert)) =
                            accept_tls(&tls, stream, peer).await
                        {
                            let info = ConnInfo {
                                peer,
                                client_cert,
                                principal: Default::default(),
                            };
                            serve_io(TokioIo::new(tls_stream), info, handler, &builder, watcher)
                                .await;
                        }
                    }
                }
                gauge.dec();
                drop(permit);
            },
            span,
        ));
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The next connection on `listener` that fits in `connections` (one unit each, held by the
/// returned reservation), with TCP_NODELAY set; `None` once `shutdown` completes. Connections
/// beyond the limit are closed right after accept (`refused` hears of each); accept errors
/// (out of file descriptors and the like) back off instead of spinning.
pub async fn accept_within<S: Future<Output = ()>>(
    listener: &TcpListener,
    connections: &sluice_core::Budget,
    mut shutdown: std::pin::Pin<&mut S>,
    refused: impl Fn(SocketAddr),
) -> Option<(tokio::net::TcpStream, SocketAddr, sluice_core::Reservation)> {
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
        let Ok(permit) = connections.try_reserve(1) else {
            tracing::debug!(%peer, "connection refused: listener at max_connections");
            refused(peer);
            continue;
        };
        let _ = stream.set_nodelay(true);
        return Some((stream, peer, permit));
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

async fn serve_io<IO, F, Fut, B>(
    io: IO,
    info: ConnInfo,
    handler: F,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    F: Fn(Request<Incoming>, ConnInfo) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let peer = info.peer;
    let svc = service_fn(move |req| {
        let (h, info) = (handler.clone(), info.clone());
        async move { Ok::<_, Infallible>(h(req, info).await) }
    });
    let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
