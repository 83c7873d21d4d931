//! The `tokensync` command: parse the arguments, load and check the configuration, set up
//! logging, run the command, turn its outcome into an exit code.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tokensync::config::Config;
use tokensync::run::{self, Outcome};
use tokensync::telemetry::{self, LogFormat};

/// Applies bulk partial updates of access tokens from CSV and JSON Lines files to PostgreSQL.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The TOML configuration file [default: ./tokensync.toml when it exists].
    #[arg(long, global = true, value_name = "FILE", env = "TOKENSYNC_CONFIG")]
    config: Option<PathBuf>,

    /// Process what is in the incoming folder once, then exit.
    #[arg(long)]
    run_now: bool,

    /// How log lines are written to standard error.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the database if needed, then create or upgrade the schema.
    Migrate,
    /// A full dry run of batch files against the database: nothing is written or moved.
    Validate {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

/// Keeps glibc from keeping the memory of Argon2id hashes.
///
/// Every hash allocates ~19 MiB and frees it. glibc serves such blocks with `mmap` at first,
/// but raises its threshold after the first free, and then keeps them in its arenas: a batch
/// of pass codes grew to 440 MiB. A fixed threshold keeps them on `mmap`, returned at once.
fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a tuning parameter of the allocator, before any thread
    // of ours allocates.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn main() -> ExitCode {
    fix_mmap_threshold();
    let runtime = tokio::runtime::Runtime::new().expect("a Tokio runtime");
    runtime.block_on(run())
}

async fn run() -> ExitCode {
    let args = Args::parse();
    telemetry::init_logging(args.log_format);

    let default_file = PathBuf::from("tokensync.toml");
    let file = args
        .config
        .or_else(|| default_file.is_file().then_some(default_file));
    let config = match Config::load(file.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("tokensync: {error}");
            return Outcome::Trouble.into();
        }
    };

    let is_daemon = args.command.is_none() && !args.run_now;
    let metrics = (is_daemon || config.metrics.textfile.is_some() && args.run_now)
        .then(telemetry::install_recorder);
    if is_daemon {
        tracing::info!(config = %config.summary(), "Configuration.");
    } else {
        tracing::debug!(config = %config.summary(), "Configuration.");
    }

    let outcome = match args.command {
        Some(Command::Migrate) => match tokensync::db::migrate(&config.database).await {
            Ok(()) => Outcome::Clean,
            Err(error) => {
                tracing::error!("{:#}", anyhow::Error::from(error));
                Outcome::Trouble
            }
        },
        Some(Command::Validate { files }) => run::validate(&config, &files).await,
        None if args.run_now => run::run_now(&config, metrics).await,
        None => {
            let metrics = metrics.expect("the daemon installs the recorder");
            tokensync::daemon::run(&config, metrics).await
        }
    };
    outcome.into()
}
