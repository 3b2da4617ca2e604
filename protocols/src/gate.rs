//! The one authentication step every adapter takes: credentials → principal → a connection
//! slot of that principal, with failures counted and logged the same way on every protocol.
//!
//! A [`Gate`] belongs to one producer transport on one listener (HTTP API, gRPC, MQTT over TCP,
//! TLS or WebSocket), so whether anonymous producers are accepted is that transport's own
//! decision (`sluice_config::Config::producer_transports`), never borrowed from another listener.

use std::sync::Arc;
use std::time::Duration;

use sluice_auth::{
    AuthFailure, Authenticator, Credentials, FailureKind, ListenerPolicy, OwnedCredentials, Swap,
};
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
    /// The listener's TLS, when it has it: sessions with a client certificate are checked
    /// against its CRLs again when they are reloaded.
    pub tls: Option<Arc<sluice_auth::tls::TlsReloader>>,
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
        if !self.per_principal.admit(conn, principal.identity()) {
            return Err(Refused::Connections(principal));
        }
        Ok(principal)
    }
}

/// How long a session waits before its principal is checked again when its credential is still
/// within its expiry (a clock step, or the end of a leeway): never a busy loop.
const MIN_RECHECK: Duration = Duration::from_secs(1);

/// What a long-lived session (MQTT connection, WebSocket, gRPC stream) keeps to check its
/// principal again: its credentials, and a subscription to configuration reloads.
#[derive(Clone)]
pub struct SessionAuth {
    creds: OwnedCredentials,
    principal: Principal,
    reloaded: tokio::sync::watch::Receiver<u64>,
    /// The listener's TLS reloads, for a session with a client certificate.
    tls_reloaded: Option<tokio::sync::watch::Receiver<u64>>,
    next_expiry: Option<tokio::time::Instant>,
}

/// Why [`Gate::recheck`] ends a session.
#[derive(Debug)]
pub enum Revoked {
    /// The credential is no longer accepted (key removed or disabled, token expired, issuer or
    /// rule gone).
    Credentials(AuthFailure),
    /// The credential is still accepted but grants something else now (permissions narrowed or
    /// changed): the session ends so that the client reconnects under the new grant.
    Changed,
}

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Revoked::Credentials(a) => {
                write!(f, "credentials no longer accepted: {}", a.description)
            }
            Revoked::Changed => {
                f.write_str("the principal's permissions changed; reconnect to use the new ones")
            }
        }
    }
}

impl SessionAuth {
    /// Completes when the session's principal must be checked again: the configuration was
    /// reloaded, or its credential reached its expiry.
    pub async fn due(&mut self) {
        match self.next_expiry {
            Some(at) => tokio::select! {
                _ = self.reloaded() => {}
                _ = tokio::time::sleep_until(at) => {}
            },
            None => self.reloaded().await,
        }
    }

    /// When the credential reaches its expiry (and must be checked again), if it expires: for a
    /// session that folds this deadline into a timer of its own instead of [`SessionAuth::due`].
    pub fn expiry(&self) -> Option<tokio::time::Instant> {
        self.next_expiry
    }

    /// Whether the configuration or the listener's TLS was reloaded since the session's
    /// principal was last checked (for a session told of reloads by a signal of its own
    /// instead of [`SessionAuth::reloaded`]).
    pub fn reload_pending(&self) -> bool {
        self.reloaded.has_changed().unwrap_or(false)
            || self
                .tls_reloaded
                .as_ref()
                .is_some_and(|rx| rx.has_changed().unwrap_or(false))
    }

    /// Completes when the configuration or the listener's TLS was reloaded (the session's
    /// principal must be checked again).
    pub async fn reloaded(&mut self) {
        let tls = async {
            let changed = match self.tls_reloaded.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => false,
            };
            if !changed {
                std::future::pending::<()>().await;
            }
        };
        let reloaded = async {
            if self.reloaded.changed().await.is_err() {
                // The gateway is going away: nothing will change any more.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = reloaded => {}
            _ = tls => {}
        }
    }

    fn schedule(&mut self) {
        self.next_expiry = self.principal.expires_at().map(|t| {
            let left = t
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::Instant::now() + left.max(MIN_RECHECK)
        });
    }
}

impl Gate {
    /// [`Gate::admit`] for a long-lived session: also what it needs to be checked again.
    pub async fn admit_session(
        &self,
        protocol: &'static str,
        metrics: &Metrics,
        conn: &ConnInfo,
        creds: Credentials<'_>,
    ) -> Result<(Principal, SessionAuth), Refused> {
        // Subscribed before authenticating, so a reload that lands in between is seen.
        let reloaded = self.auth.subscribe();
        let principal = self.admit(protocol, metrics, conn, creds).await?;
        let tls_reloaded = self
            .tls
            .as_ref()
            .filter(|_| conn.client_cert.is_some())
            .map(|t| t.subscribe());
        let mut session = SessionAuth {
            creds: OwnedCredentials::of(&creds, conn.client_cert.clone()),
            principal: principal.clone(),
            reloaded,
            tls_reloaded,
            next_expiry: None,
        };
        session.schedule();
        Ok((principal, session))
    }

    /// Checks a session's principal again with the current configuration (after
    /// [`SessionAuth::due`]): Ok while it stands as it was, else why the session ends.
    pub async fn recheck(&self, s: &mut SessionAuth) -> Result<(), Revoked> {
        s.reloaded.borrow_and_update();
        if let Some(rx) = s.tls_reloaded.as_mut() {
            rx.borrow_and_update();
        }
        // A certificate the listener's CRLs revoke now ends the session, whatever else it
        // presented (its TLS identity is gone).
        if let (Some(tls), Some(cert)) = (&self.tls, s.creds.as_credentials().client_cert)
            && tls.is_revoked(cert)
        {
            return Err(Revoked::Credentials(AuthFailure::new(
                "mtls",
                "revoked_certificate",
                "the client certificate was revoked",
            )));
        }
        let now = self
            .auth
            .load()
            .recheck(&self.policy, s.creds.as_credentials())
            .await
            .map_err(Revoked::Credentials)?;
        if !now.same_grant(&s.principal) {
            return Err(Revoked::Changed);
        }
        s.principal = now;
        s.schedule();
        Ok(())
    }
}
