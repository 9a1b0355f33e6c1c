//! Tollgate's own listeners, below HTTP: accepting TCP and Unix socket
//! connections, TLS / mTLS handshakes, the connection bound and the idle
//! timeout. The gRPC and admin servers read finished connections from an
//! [`Incoming`] queue, so a slow handshake never holds up the next accept.

mod conn;
pub mod limits;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

pub use conn::Conn;
use conn::Transport;
pub use limits::ListenerLimits;
pub use tls::{LiveTls, TlsConfig, TlsError};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    listener: &'static str,
    reason: &'static str,
}

/// Connection metrics of the listeners: `tollgate_listener_connections`
/// (open now), `tollgate_listener_refused_total{reason}` and
/// `tollgate_listener_idle_closed_total`, each by `listener` (`grpc`,
/// `admin`).
#[derive(Debug, Default)]
pub struct ListenerMetrics {
    open: Family<ListenerLabel, Gauge>,
    refused: Family<RefusedLabels, Counter>,
    idle_closed: Family<ListenerLabel, Counter>,
}

impl ListenerMetrics {
    /// Registers the families in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "listener_connections",
            "Connections open on each of Tollgate's own listeners (grpc, admin)",
            self.open.clone(),
        );
        registry.register(
            "listener_refused",
            "Connections refused by listener and reason: max_connections, tls_handshake (untrusted, expired or disallowed client certificate, not TLS), handshake_timeout",
            self.refused.clone(),
        );
        registry.register(
            "listener_idle_closed",
            "Connections closed because nothing was read from them for server.limits.idle_timeout_ms",
            self.idle_closed.clone(),
        );
    }

    fn opened(&self, listener: &'static str) {
        self.open.get_or_create(&ListenerLabel { listener }).inc();
    }

    fn closed(&self, listener: &'static str) {
        self.open.get_or_create(&ListenerLabel { listener }).dec();
    }

    fn refused(&self, listener: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels { listener, reason })
            .inc();
    }

    fn idle_closed(&self, listener: &'static str) {
        self.idle_closed
            .get_or_create(&ListenerLabel { listener })
            .inc();
    }
}

/// How one logical listener (`grpc`, `admin`) accepts: its TLS, bounds and
/// metrics, shared by its TCP and Unix socket accept loops.
pub struct Acceptor {
    name: &'static str,
    tls: Option<Arc<LiveTls>>,
    idle: Duration,
    handshake: Duration,
    slots: Arc<Semaphore>,
    metrics: Arc<ListenerMetrics>,
    log: crate::metrics::Throttle,
}

/// Queue depth between the accept loops and the server.
const QUEUE: usize = 256;

impl Acceptor {
    /// An acceptor for the listener `name` under `limits`; with `tls`, TCP
    /// connections must complete a TLS handshake first.
    pub fn new(
        name: &'static str,
        tls: Option<Arc<LiveTls>>,
        limits: &ListenerLimits,
        metrics: Arc<ListenerMetrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            tls,
            idle: limits.idle_timeout(),
            handshake: limits.handshake_timeout(),
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            metrics,
            log: crate::metrics::Throttle::new(Duration::from_secs(10)),
        })
    }

    /// Accepts on `listener` until `stop` turns true, queueing finished
    /// connections on `queue`.
    pub fn serve_tcp(
        self: &Arc<Self>,
        listener: TcpListener,
        queue: mpsc::Sender<Conn>,
        mut stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let this = self.clone();
        let local = listener.local_addr().ok();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        this.accept_failed(&e).await;
                        continue;
                    }
                };
                let Some(slot) = this.slot() else { continue };
                // A response is several small HTTP/2 frames; Nagle's
                // algorithm against the peer's delayed ACK would hold them.
                let _ = tcp.set_nodelay(true);
                match &this.tls {
                    None => {
                        let conn = this.conn(Transport::Tcp(tcp), Some(peer), local, slot);
                        if queue.send(conn).await.is_err() {
                            return;
                        }
                    }
                    Some(tls) => {
                        let (this, tls, queue) = (this.clone(), tls.acceptor(), queue.clone());
                        tokio::spawn(async move {
                            match tokio::time::timeout(this.handshake, tls.accept(tcp)).await {
                                Ok(Ok(stream)) => {
                                    let transport = Transport::Tls(Box::new(stream));
                                    let _ = queue
                                        .send(this.conn(transport, Some(peer), local, slot))
                                        .await;
                                }
                                Ok(Err(e)) => {
                                    this.metrics.refused(this.name, "tls_handshake");
                                    this.log.warn(|| {
                                        tracing::warn!(listener = this.name, %peer, error = %e, "tls handshake refused");
                                    });
                                }
                                Err(_) => this.metrics.refused(this.name, "handshake_timeout"),
                            }
                        });
                    }
                }
            }
        })
    }

    /// Accepts on a Unix socket until `stop` turns true. Unix sockets are
    /// plaintext: file permissions decide who may connect.
    pub fn serve_unix(
        self: &Arc<Self>,
        listener: UnixListener,
        queue: mpsc::Sender<Conn>,
        mut stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    accepted = listener.accept() => accepted,
                };
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        this.accept_failed(&e).await;
                        continue;
                    }
                };
                let Some(slot) = this.slot() else { continue };
                let conn = this.conn(Transport::Unix(stream), None, None, slot);
                if queue.send(conn).await.is_err() {
                    return;
                }
            }
        })
    }

    /// A free connection slot, or None (counted) at `max_connections`: the
    /// connection just accepted is then dropped, closing it at once.
    fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slot = self.slots.clone().try_acquire_owned().ok();
        if slot.is_none() {
            self.metrics.refused(self.name, "max_connections");
            self.log.warn(|| {
                tracing::warn!(
                    listener = self.name,
                    "connection refused: server.limits.max_connections reached"
                );
            });
        }
        slot
    }

    fn conn(
        &self,
        transport: Transport,
        peer: Option<SocketAddr>,
        local: Option<SocketAddr>,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> Conn {
        Conn::new(
            transport,
            peer,
            local,
            self.idle,
            slot,
            self.metrics.clone(),
            self.name,
        )
    }

    /// Out of file descriptors and the like: logged, then a short pause so
    /// the loop does not spin while nothing can be accepted.
    async fn accept_failed(&self, e: &std::io::Error) {
        self.log.warn(|| {
            tracing::warn!(listener = self.name, error = %e, "accept failed");
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connections ready for a server: a `Stream` for tonic and an
/// `axum::serve::Listener` for axum.
pub struct Incoming {
    queue: mpsc::Receiver<Conn>,
    local: SocketAddr,
}

/// A queue from accept loops to one server listening at `local`.
pub fn queue(local: SocketAddr) -> (mpsc::Sender<Conn>, Incoming) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (tx, Incoming { queue: rx, local })
}

impl tokio_stream::Stream for Incoming {
    type Item = Result<Conn, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.queue.poll_recv(cx).map(|c| c.map(Ok))
    }
}

impl axum::serve::Listener for Incoming {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.queue.recv().await {
            Some(conn) => {
                let peer = conn
                    .peer()
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
                (conn, peer)
            }
            // The accept loops ended (shutdown): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Binds a Unix socket at `path` with permissions `mode`, replacing a stale
/// socket file left by an earlier run (never any other kind of file).
pub fn bind_unix(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; remove it or choose another path",
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Watches the TLS files of `live` and swaps in changed certificates; a
/// failed reload keeps the last good one serving, logged once per distinct
/// error and counted as `tollgate_reloads_total{source="tls_<listener>",
/// result="rejected"}`.
pub fn watch_tls(
    live: Vec<Arc<LiveTls>>,
    poll: Duration,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<Option<crate::policy::reload::WatchHandle>, notify::Error> {
    if live.is_empty() {
        return Ok(None);
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for dir in live.iter().flat_map(|l| l.dirs()) {
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    let last_error =
        std::sync::Mutex::new(std::collections::HashMap::<&'static str, String>::new());
    crate::policy::reload::watch(dirs, Duration::from_millis(200), poll, move || {
        let mut last = last_error.lock().unwrap_or_else(|p| p.into_inner());
        for tls in &live {
            let source = match tls.name() {
                "admin" => "tls_admin",
                _ => "tls_grpc",
            };
            match tls.reload() {
                Ok(false) => {
                    last.remove(tls.name());
                    metrics.reload(source, "unchanged");
                }
                Ok(true) => {
                    last.remove(tls.name());
                    tracing::info!(listener = tls.name(), "tls certificates reloaded");
                    metrics.reload(source, "swapped");
                }
                Err(e) => {
                    let message = e.to_string();
                    if last.get(tls.name()) != Some(&message) {
                        tracing::error!(listener = tls.name(), error = %message, "tls reload rejected; still serving the last good certificate");
                        metrics.reload(source, "rejected");
                        last.insert(tls.name(), message);
                    } else {
                        metrics.reload(source, "unchanged");
                    }
                }
            }
        }
    })
    .map(Some)
}
