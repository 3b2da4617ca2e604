//! Configuration reload: what can change at run time is swapped in; the rest stays.

use super::*;

/// Re-reads the configuration file and swaps in what can change at run time: API keys, JWT
/// issuers, mTLS rules, quotas and stream settings. A file that does not load or validate is
/// rejected with a logged reason, and the running configuration stays.
pub struct Reloader {
    pub(super) path: Option<std::path::PathBuf>,
    pub(super) auth: Arc<Swap<Authenticator>>,
    pub(super) gateway: Arc<Gateway>,
    pub(super) reloads: Family<ReloadLabels, Counter>,
    pub(super) limits: HttpLimits,
    pub(super) in_flight_budget: Gauge,
    pub(super) schema_registry: Option<Arc<crate::schema::Registry>>,
    /// The schema files the configuration names: a change to one reloads like a change to the
    /// configuration file.
    pub(super) schema_files: std::sync::Mutex<Vec<std::path::PathBuf>>,
}

/// Every local schema file `config` names.
pub(super) fn schema_files(config: &Config) -> Vec<std::path::PathBuf> {
    config
        .schemas
        .values()
        .flat_map(|s| s.value.iter().chain(s.key.iter()).chain(s.previous.iter()))
        .map(std::path::PathBuf::from)
        .collect()
}

/// The HTTP listener's run-time resizable limits.
#[derive(Clone)]
pub(super) struct HttpLimits {
    pub(super) connections: Budget,
    pub(super) concurrency: Budget,
    pub(super) per_principal: Arc<PrincipalConnections>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ReloadLabels {
    result: &'static str,
}

impl Reloader {
    /// Loads and applies the configuration file; false if it was rejected.
    pub async fn reload(&self) -> bool {
        let applied = self.try_reload().await;
        let result = if applied.is_ok() { "ok" } else { "rejected" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
        match applied {
            Ok(()) => {
                tracing::info!(
                    "configuration reloaded: API keys, JWT issuers, mTLS rules, quotas, stream settings and schemas (listeners, TLS files and log settings are not reloaded)"
                );
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration reload rejected; the running configuration stays");
                false
            }
        }
    }

    async fn try_reload(&self) -> anyhow::Result<()> {
        let config = Config::load(self.path.as_deref(), std::env::vars())?;
        let auth = Authenticator::new(&config.auth).map_err(|e| anyhow::anyhow!("auth: {e}"))?;
        // A schema that does not compile refuses the whole reload; the running ones stay (and
        // so do the running credentials: nothing is applied before everything is checked).
        // A local file that changed must also be compatible with the running version.
        let running = self.gateway.schemas();
        let schemas =
            crate::schema::Schemas::load(&config, self.schema_registry.as_ref(), Some(&running))
                .map_err(anyhow::Error::msg)?;
        auth.start().await;
        self.auth.store(auth);
        *self.schema_files.lock().expect("schema files lock") = schema_files(&config);
        if let Some(r) = &self.schema_registry {
            // Subjects named for the first time are fetched now (within two request deadlines;
            // the background refresh goes on).
            let _ = tokio::time::timeout(r.deadline() * 2, r.refresh()).await;
        }
        self.gateway.reload(Policy::new(
            &config.streams,
            &config.quotas,
            schemas,
            self.gateway.cluster(),
        ));
        sluice_protocols::grpc::codec::set_max_events(config.streams.max_events_per_request());
        self.gateway
            .budget()
            .set_total(config.limits.max_in_flight_bytes);
        self.in_flight_budget
            .set(config.limits.max_in_flight_bytes as i64);
        self.limits
            .connections
            .set_total(config.http.max_connections as u64);
        self.limits
            .concurrency
            .set_total(config.http.max_concurrent_requests as u64);
        self.limits
            .per_principal
            .set_max(config.http.max_connections_per_principal);
        Ok(())
    }

    /// Reloads whenever the file's modification time changes, checking every `every`.
    pub(super) async fn watch(self: Arc<Self>, every: Duration) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let stamps = || {
            let stamp = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let files = self.schema_files.lock().expect("schema files lock").clone();
            std::iter::once(path.clone())
                .chain(files)
                .map(|p| (stamp(&p), p))
                .collect::<Vec<_>>()
        };
        let mut seen = stamps();
        loop {
            tokio::time::sleep(every).await;
            let now = stamps();
            if now != seen {
                self.reload().await;
                // What the reload left in force (a new file list when it applied).
                seen = stamps();
            }
        }
    }
}
