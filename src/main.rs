//! The command line (contract section 7): parse the arguments, load the
//! configuration, run the subcommand until it ends or a signal arrives.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use jelou_worker::{cli, config::Settings, logging, worker};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "Sends message jobs from RabbitMQ to Jelou, with retries, and publishes the outcome"
)]
struct Cli {
    /// A TOML configuration file, layered over config/default.toml.
    #[arg(long, global = true, env = "JELOU_WORKER_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker until SIGTERM/SIGINT.
    Run,
    /// Publish jobs to the jobs queue (with confirms) and print their jobIds.
    Enqueue {
        /// The botId of a text job given by flags.
        #[arg(long, requires_all = ["user", "text"], conflicts_with = "file")]
        bot: Option<String>,
        /// The userId (recipient) of a text job given by flags.
        #[arg(long, requires = "bot")]
        user: Option<String>,
        /// The text of a text job given by flags.
        #[arg(long, requires = "bot")]
        text: Option<String>,
        /// The jobId of a text job given by flags (default: generated).
        #[arg(long, requires = "bot")]
        job_id: Option<String>,
        /// Read jobs as JSON, one per line, from this file (`-`: stdin, the default).
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
    },
    /// See the whole system work on this machine, without Jelou credentials.
    Demo,
    /// Inspect or replay the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Check configuration, broker, topology and Jelou credentials (sends no message).
    Check {
        /// The botId used to ask Jelou (an empty object is posted, which Jelou refuses).
        #[arg(long, default_value = "jelou-worker-check")]
        bot: String,
    },
    /// Serve a stand-in Jelou (always answers success) for trying the worker out.
    StandIn {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Pause before each answer, in ms (to mimic Jelou's latency).
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
    /// Exit 0 when GET URL answers 200: a health check for images without curl.
    #[command(hide = true)]
    ProbeHttp { url: String },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Show dead-lettered jobs (jobId, failure kind, when, message); leaves them in place.
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move dead-lettered jobs back onto the jobs queue with a fresh attempt count.
    Replay {
        /// Every dead letter (required when no filter is given).
        #[arg(long, conflicts_with_all = ["kind", "job_id"])]
        all: bool,
        /// Only jobs that failed with this kind (repeatable): rejected, retries_exhausted, ...
        #[arg(long)]
        kind: Vec<String>,
        /// Only this jobId (repeatable).
        #[arg(long)]
        job_id: Vec<String>,
        /// Move at most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            let format = Settings::peek_log_format(cli.config.as_deref());
            eprintln!("{}", logging::fatal_line(format, &e.to_string()));
            return ExitCode::from(2);
        }
    };
    match cli.command {
        // The demo talks to a person: readable output, only problems logged.
        Command::Demo => logging::init(jelou_worker::config::LogFormat::Text, "error,lapin=off"),
        _ => logging::init(settings.log.format, &settings.log.level),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            logging::finish();
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.command, settings));
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "failed");
            ExitCode::FAILURE
        }
    };
    // What the runtime logs while it stops is still buffered; then write it all out.
    drop(runtime);
    logging::finish();
    code
}

async fn dispatch(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run => {
            jelou_worker::metrics::set_prefetch(settings.amqp.prefetch);
            let shutdown = CancellationToken::new();
            tokio::spawn(watch_signals(shutdown.clone()));
            // On a runtime thread, not this one: the jobs the session spawns then start
            // on the thread that received them, instead of waking another.
            tokio::spawn(worker::run(settings, shutdown)).await??;
            Ok(ExitCode::SUCCESS)
        }
        Command::Enqueue {
            bot,
            user,
            text,
            job_id,
            file,
        } => {
            let source = match (bot, user, text) {
                (Some(bot), Some(user), Some(text)) => cli::enqueue::Source::Text {
                    bot,
                    user,
                    text,
                    job_id,
                },
                _ => cli::enqueue::Source::Lines(file.unwrap_or_else(|| "-".into())),
            };
            let (published, refused) = cli::enqueue::run(&settings, source).await?;
            if refused > 0 {
                eprintln!("{published} published, {refused} refused");
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => Ok(if cli::demo::run(settings).await? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
        Command::Dlq {
            action: DlqAction::List { limit, json },
        } => {
            let (letters, total) = cli::dlq::list(&settings, limit).await?;
            if json {
                for l in &letters {
                    println!("{}", serde_json::to_string(l)?);
                }
            } else {
                cli::dlq::print_table(&letters, total);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq {
            action:
                DlqAction::Replay {
                    all,
                    kind,
                    job_id,
                    limit,
                },
        } => {
            for k in &kind {
                if jelou_worker::outcome::ErrorKind::parse(k).is_none() {
                    anyhow::bail!(
                        "--kind {k}: not a failure kind (invalid_job, rejected, retries_exhausted, expired, delivery_limit)"
                    );
                }
            }
            if !all && kind.is_empty() && job_id.is_empty() {
                anyhow::bail!("say what to replay: --all, or --kind KIND / --job-id ID");
            }
            let filter = cli::dlq::Filter {
                kinds: kind,
                job_ids: job_id,
            };
            let done = cli::dlq::replay(&settings, &filter, limit).await?;
            eprintln!(
                "replayed {}, left {} in the dead-letter queue that did not match",
                done.moved.len(),
                done.kept
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { bot } => {
            let findings = cli::check::run(&settings, &bot).await;
            Ok(if cli::check::print(&findings) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::StandIn { listen, latency_ms } => {
            let stand_in = jelou_worker::stand_in::StandIn::start_on(listen, false).await?;
            let latency = std::time::Duration::from_millis(latency_ms);
            stand_in.always(jelou_worker::stand_in::Reply::Success.after(latency));
            tracing::info!(listen = %stand_in.addr(), "stand-in Jelou answering success to every message");
            let shutdown = CancellationToken::new();
            tokio::spawn(watch_signals(shutdown.clone()));
            shutdown.cancelled().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::ProbeHttp { url } => match cli::probe::run(&url).await {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("{e:#}");
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

/// First SIGTERM/SIGINT: graceful shutdown. Second: exit at once; the broker
/// redelivers whatever was not acked, so nothing is lost.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for signals");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received: shutting down (a second signal exits at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting now; unfinished jobs return to the queue");
    logging::finish();
    std::process::exit(130);
}
