//! Diagnostics output: tracing to stderr, human or JSON, with a level that can be changed at run
//! time through the admin listener (`PUT /loglevel`).

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};

use sluice_config::{LogFormat, TelemetryConfig};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

struct Level {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The filter as it was last set (EnvFilter does not print back its input faithfully).
    spec: Mutex<String>,
}

static LEVEL: OnceLock<Level> = OnceLock::new();

/// Installs the global tracing subscriber. `RUST_LOG`, when set, overrides the configured level.
pub fn init(cfg: &TelemetryConfig) {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| cfg.log_level.clone());
    let (spec, filter) = match EnvFilter::try_new(&spec) {
        Ok(f) => (spec, f),
        Err(_) => ("info".to_string(), EnvFilter::new("info")),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match cfg.log_format {
        LogFormat::Human => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json()).try_init(),
    };
    if installed.is_ok() {
        let _ = LEVEL.set(Level {
            handle,
            spec: Mutex::new(spec),
        });
    }
}

/// The current log filter, e.g. `info` or `sluice=debug,hyper=warn`.
pub fn level() -> Option<String> {
    LEVEL.get().map(|l| l.spec.lock().unwrap().clone())
}

/// Replaces the log filter; the error says what is wrong with `spec`.
pub fn set_level(spec: &str) -> Result<(), String> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Err("an empty filter; send e.g. `info` or `sluice=debug,hyper=warn`".into());
    }
    let filter =
        EnvFilter::try_new(spec).map_err(|e| format!("`{spec}` is not a log filter: {e}"))?;
    let level = LEVEL
        .get()
        .ok_or("logging was not initialised by this process")?;
    level
        .handle
        .reload(filter)
        .map_err(|e| format!("the filter could not be changed: {e}"))?;
    *level.spec.lock().unwrap() = spec.to_string();
    Ok(())
}
