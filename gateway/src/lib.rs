//! The Sluice gateway: admission, the embedded log sink, telemetry, admin endpoints, wiring and
//! graceful drain. The `sluice` binary is a thin shell around [`cli::main`].

pub mod admission;
pub mod app;
pub mod cli;
pub mod dedup;
pub mod logcmd;
pub mod quota;
mod read;
pub mod schema;
pub mod sessions;
pub mod sink;
/// The Kafka sink, at its old path (the load generator and tests use it).
pub use sink::kafka;
pub mod telemetry;
pub mod traces;
