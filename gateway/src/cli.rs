//! The `sluice` command line: `serve`, `check-config`, `log read`, `log tail`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_config::Config;

use crate::logcmd::{self, ReadArgs};
use crate::{app, telemetry};

#[derive(Parser, Debug)]
#[command(
    name = "sluice",
    version,
    about = "Sluice: the ingress gateway of a stream repository"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (no config file needed: loopback listeners, embedded log under ./data).
    Serve {
        /// TOML configuration file; SLUICE_SECTION__KEY environment variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file (with environment overrides) and report every problem.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Read the embedded log as NDJSON.
    #[command(subcommand)]
    Log(LogCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Print a fresh random API key (once) and the config entry that accepts it.
    New {
        /// The principal the key authenticates as.
        #[arg(long)]
        principal: String,
        /// Glob patterns of the streams it may produce to (repeat or separate with commas).
        #[arg(long, value_delimiter = ',', required = true)]
        streams: Vec<String>,
        /// The key's public id (default: random).
        #[arg(long)]
        id: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum LogCommand {
    /// Print records and exit.
    Read(ReadArgs),
    /// Print records, then keep following new appends until interrupted.
    Tail(ReadArgs),
}

/// Entry point of the `sluice` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { file } => check_config(file),
        Command::Log(LogCommand::Read(args)) => logcmd::run(&args, false),
        Command::Log(LogCommand::Tail(args)) => logcmd::run(&args, true),
        Command::Keys(KeysCommand::New {
            principal,
            streams,
            id,
        }) => new_key(&principal, &streams, id),
    }
}

fn new_key(principal: &str, streams: &[String], id: Option<String>) -> ExitCode {
    use sluice_auth::apikey;
    let id = match id.map_or_else(|| apikey::generate_id().map_err(|_| ()), Ok) {
        Ok(id)
            if !id.is_empty()
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
        {
            id
        }
        _ => {
            eprintln!("sluice keys new: --id must be 1+ characters of a-z A-Z 0-9 - _");
            return ExitCode::from(2);
        }
    };
    let Ok(key) = apikey::generate(&id) else {
        eprintln!("sluice keys new: the system random generator failed");
        return ExitCode::FAILURE;
    };
    let streams = streams
        .iter()
        .map(|s| format!("{:?}", s.trim()))
        .collect::<Vec<_>>()
        .join(", ");
    println!("# The key (shown once; give it to the producer, store it as a secret):");
    println!("{key}");
    println!();
    println!("# Add this to the gateway's configuration (it holds only a hash of the key):");
    println!("[[auth.api_keys]]");
    println!("id = {id:?}");
    println!("secret_sha256 = {:?}", apikey::hash_hex(&key));
    println!("principal = {principal:?}");
    println!("streams = [{streams}]");
    println!("# expires_at = 2027-01-01T00:00:00Z");
    println!("# disabled = false");
    ExitCode::SUCCESS
}

fn load(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(path, std::env::vars()).map_err(|e| {
        eprintln!("sluice: {e}");
        ExitCode::from(2)
    })
}

fn check_config(file: PathBuf) -> ExitCode {
    match load(Some(&file)) {
        Ok(c) => {
            // Schemas are compiled as the gateway would: one that does not is named.
            // Registry subjects are not fetched here (only named); local files are compiled and
            // checked against their `previous` versions.
            let registry = if c.schema_registry.url.is_empty() {
                None
            } else {
                match crate::schema::Registry::new(&c.schema_registry, None) {
                    Ok(r) => Some(std::sync::Arc::new(r)),
                    Err(e) => {
                        eprintln!("{}: {e}", file.display());
                        return ExitCode::FAILURE;
                    }
                }
            };
            if let Err(e) = crate::schema::Schemas::load(&c, registry.as_ref(), None) {
                eprintln!("{}: {e}", file.display());
                return ExitCode::FAILURE;
            }
            println!(
                "{}: ok (http {}, admin {}, log {}, {} declared stream(s), auto_create {})",
                file.display(),
                c.http.listen,
                c.admin.listen,
                match c.log.kind {
                    sluice_config::LogKind::Embedded =>
                        format!("embedded in {}", c.log.data_dir.display()),
                    sluice_config::LogKind::Kafka if c.any_spooled_stream() => format!(
                        "kafka at {}, spooled streams in {}",
                        c.log.kafka.bootstrap_servers,
                        c.log.data_dir.join("spool").display()
                    ),
                    sluice_config::LogKind::Kafka =>
                        format!("kafka at {}", c.log.kafka.bootstrap_servers),
                },
                c.streams.declare.len(),
                c.streams.auto_create
            );
            if !c.schemas.is_empty() {
                println!(
                    "schemas: {}",
                    c.schemas.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn serve(config_path: Option<PathBuf>) -> ExitCode {
    let config = match load(config_path.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    telemetry::init(&config.telemetry);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let running = match app::start(config, config_path).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("sluice: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        // Tests and scripts read the bound addresses from this line (ports may be 0 in config).
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "sluice listening: http={} admin={}{}{}{}",
            running.http_addr,
            running.admin_addr,
            running
                .grpc_addr
                .map(|a| format!(" grpc={a}"))
                .unwrap_or_default(),
            running
                .mqtt_addr
                .map(|a| format!(" mqtt={a}"))
                .unwrap_or_default(),
            running
                .mqtts_addr
                .map(|a| format!(" mqtts={a}"))
                .unwrap_or_default()
        );
        let _ = out.flush();
        drop(out);
        let signal = wait_for_signal(&running.reloader).await;
        tracing::info!(signal, "draining");
        if running.drain().await {
            tracing::info!("drained; bye");
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}

/// Waits for SIGTERM or SIGINT; reloads the configuration on every SIGHUP meanwhile.
async fn wait_for_signal(reloader: &app::Reloader) -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; waiting forever");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                reloader.reload().await;
            }
        }
    }
}
