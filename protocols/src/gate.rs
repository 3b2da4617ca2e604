//! The one authentication step every adapter takes: credentials → principal → a connection
//! slot of that principal, with failures counted and logged the same way on every protocol.
//!
//! A [`Gate`] belongs to one producer transport on one listener (HTTP API, gRPC, MQTT over TCP,
//! TLS or WebSocket), so whether anonymous producers are accepted is that transport's own
//! decision (`sluice_config::Config::producer_transports`), never borrowed from another listener.

use std::sync::Arc;
use std::time::Duration;

use sluice_auth::{AuthFailure, Authenticator, Credentials, FailureKind, ListenerPolicy, Swap};
use sluice_core::metrics::Metrics;
use sluice_core::{Principal, Rejection};

use crate::server::{ConnInfo, PrincipalConnections};

/// How one producer transport authenticates its producers.
#[derive(Clone)]
pub struct Gate {
    /// Turns credentials into a principal (replaced on configuration reload).
    pub auth: Arc<Swap<Authenticator>>,
    /// Which credentials this transport accepts, and whether it accepts none.
    pub policy: ListenerPolicy,
    /// Open connections per principal (shared by the listeners of one protocol).
    pub per_principal: Arc<PrincipalConnections>,
}

/// Why [`Gate::admit`] turned a producer away.
#[derive(Debug)]
pub enum Refused {
    /// The credentials were missing, wrong, throttled or cannot be checked now.
    Auth(AuthFailure),
    /// The principal already has its maximum of open connections.
    Connections(Principal),
}

impl Refused {
    /// The rejection every protocol renders in its own terms.
    pub fn rejection(self) -> Rejection {
        match self {
            Refused::Auth(f) => Rejection::from(f),
            Refused::Connections(p) => Rejection::OverQuota {
                retry_after: Duration::from_secs(1),
                message: format!(
                    "principal `{}` has its maximum of open connections; reuse one of them",
                    p.name()
                ),
            },
        }
    }
}

impl Gate {
    /// The principal behind `creds` on connection `conn`, counted against its connection limit
    /// the first time the connection authenticates. Failures are counted in
    /// `sluice_auth_failures_total{protocol,…}` and logged (never the credential itself;
    /// throttled attempts only at debug level, so a brute-force run cannot flood the log).
    pub async fn admit(
        &self,
        protocol: &'static str,
        metrics: &Metrics,
        conn: &ConnInfo,
        creds: Credentials<'_>,
    ) -> Result<Principal, Refused> {
        let principal = self
            .auth
            .load()
            .authenticate(&self.policy, conn.peer.ip(), creds)
            .await
            .map_err(|f| {
                metrics.auth_failure(protocol, f.method, f.reason);
                if let FailureKind::Throttled(_) = f.kind {
                    tracing::debug!(peer = %conn.peer, protocol, "authentication throttled");
                } else {
                    tracing::info!(peer = %conn.peer, protocol, method = f.method, reason = f.reason, "authentication failed");
                }
                Refused::Auth(f)
            })?;
        if !self.per_principal.admit(conn, principal.name()) {
            return Err(Refused::Connections(principal));
        }
        Ok(principal)
    }
}
