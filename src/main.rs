//! The command line (contract section 7): parse the arguments, load the
//! configuration, run the subcommand until it ends or a signal arrives.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use jelou_worker::{
    cli::{self, UsageError},
    config::{LogFormat, Settings},
    logging, worker,
};
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
        /// The botId of a job given by flags (with --text, or --template).
        #[arg(long, requires = "user", conflicts_with = "file")]
        bot: Option<String>,
        /// The userId (recipient) of a job given by flags.
        #[arg(long, requires = "bot")]
        user: Option<String>,
        /// The text of a text job given by flags.
        #[arg(long, requires = "bot", conflicts_with = "template")]
        text: Option<String>,
        /// The name (elementName) of an approved WhatsApp template: a template (HSM) job,
        /// which may be sent outside the 24-hour window.
        #[arg(long, value_name = "NAME", requires_all = ["bot", "language"])]
        template: Option<String>,
        /// The template's language, e.g. `es` (with --template).
        #[arg(long, requires = "template")]
        language: Option<String>,
        /// A value for the template's next placeholder (repeatable, in order).
        #[arg(long = "param", value_name = "V", requires = "template")]
        params: Vec<String>,
        /// The jobId of a job given by flags (default: generated).
        #[arg(long, requires = "bot")]
        job_id: Option<String>,
        /// Read jobs as JSON, one per line, from this file (`-`: stdin, the default).
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
    },
    /// See the whole system work on this machine, without Jelou credentials.
    Demo,
    /// Check jobs (JSON lines from a file or stdin) as the worker would, without a
    /// broker: prints each invalid line's number and reason; non-zero if any.
    Validate {
        /// The jobs file (`-` or nothing: stdin).
        #[arg(value_name = "PATH")]
        file: Option<PathBuf>,
    },
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

/// How a command reports a failure: the daemons (`run`, `stand-in`) in the configured
/// log format, the commands a person runs as one plain line (see [`cli`]).
#[derive(Clone, Copy, PartialEq)]
enum Reporting {
    Logged,
    Plain,
}

impl Command {
    fn reporting(&self) -> Reporting {
        match self {
            Command::Run | Command::StandIn { .. } => Reporting::Logged,
            _ => Reporting::Plain,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let reporting = cli.command.reporting();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => return configuration_failed(cli.config.as_deref(), reporting, &e),
    };
    match cli.command {
        // The demo talks to a person: readable output, only problems logged.
        Command::Demo | Command::Validate { .. } => {
            logging::init(LogFormat::Text, "error,lapin=off")
        }
        _ => logging::init(settings.log.format, &settings.log.level),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) if reporting == Reporting::Logged => {
            tracing::error!(error = %e, "cannot start the async runtime");
            logging::finish();
            return ExitCode::FAILURE;
        }
        Err(e) => {
            let code = failed(
                reporting,
                &anyhow::Error::new(e).context("cannot start the async runtime"),
            );
            logging::finish();
            return code;
        }
    };
    let code = match runtime.block_on(dispatch(cli.command, settings)) {
        Ok(code) => code,
        Err(e) => failed(reporting, &e),
    };
    // What the runtime logs while it stops is still buffered; then write it all out.
    drop(runtime);
    logging::finish();
    code
}

/// A configuration that cannot be used: one line naming the key, exit status 2.
fn configuration_failed(
    config: Option<&std::path::Path>,
    reporting: Reporting,
    error: &jelou_worker::config::ConfigError,
) -> ExitCode {
    let format = match reporting {
        Reporting::Logged => Settings::peek_log_format(config),
        Reporting::Plain => LogFormat::Text,
    };
    eprintln!("{}", logging::fatal_line(format, &error.to_string()));
    ExitCode::from(2)
}

/// Reports a command's failure; its exit status.
fn failed(reporting: Reporting, error: &anyhow::Error) -> ExitCode {
    match reporting {
        Reporting::Logged => {
            tracing::error!(error = format!("{error:#}"), "failed");
            ExitCode::FAILURE
        }
        Reporting::Plain => {
            eprintln!("{}", cli::error_line(error));
            ExitCode::from(cli::exit_status(error))
        }
    }
}

async fn dispatch(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run => run(settings).await,
        Command::Enqueue {
            bot,
            user,
            text,
            template,
            language,
            params,
            job_id,
            file,
        } => {
            let source = match (bot, user, text, template) {
                (Some(bot), Some(user), Some(text), None) => cli::enqueue::Source::Text {
                    bot,
                    user,
                    text,
                    job_id,
                },
                (Some(bot), Some(user), None, Some(name)) => cli::enqueue::Source::Template {
                    bot,
                    user,
                    name,
                    language: language.unwrap_or_default(),
                    params,
                    job_id,
                },
                (Some(_), ..) => {
                    anyhow::bail!("--bot and --user need --text, or --template and --language")
                }
                _ => cli::enqueue::Source::Lines(file.unwrap_or_else(|| "-".into())),
            };
            enqueue(&settings, source).await
        }
        Command::Validate { file } => {
            let mut out = std::io::stdout().lock();
            let valid = cli::validate::run(&settings, file.as_deref(), &mut out)?;
            Ok(success_if(valid))
        }
        Command::Demo => Ok(success_if(cli::demo::run(settings).await?)),
        Command::Dlq {
            action: DlqAction::List { limit, json },
        } => dlq_list(&settings, limit, json).await,
        Command::Dlq {
            action:
                DlqAction::Replay {
                    all,
                    kind,
                    job_id,
                    limit,
                },
        } => dlq_replay(&settings, all, kind, job_id, limit).await,
        Command::Check { bot } => {
            let findings = cli::check::run(&settings, &bot).await;
            Ok(success_if(cli::check::print(&findings)))
        }
        Command::StandIn { listen, latency_ms } => stand_in(listen, latency_ms).await,
        Command::ProbeHttp { url } => Ok(probe_http(&url).await),
    }
}

/// Exit status 0 when `ok`, else 1.
fn success_if(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The daemon, until SIGTERM/SIGINT.
async fn run(settings: Settings) -> anyhow::Result<ExitCode> {
    jelou_worker::metrics::set_prefetch(settings.amqp.prefetch);
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    // On a runtime thread, not this one: the jobs the session spawns then start
    // on the thread that received them, instead of waking another.
    tokio::spawn(worker::run(settings, shutdown)).await??;
    Ok(ExitCode::SUCCESS)
}

async fn enqueue(settings: &Settings, source: cli::enqueue::Source) -> anyhow::Result<ExitCode> {
    let (published, refused) = cli::enqueue::run(settings, source).await?;
    if refused > 0 {
        eprintln!("{published} published, {refused} refused");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn dlq_list(settings: &Settings, limit: usize, json: bool) -> anyhow::Result<ExitCode> {
    let (letters, total) = cli::dlq::list(settings, limit).await?;
    if json {
        for l in &letters {
            println!("{}", serde_json::to_string(l)?);
        }
    } else {
        cli::dlq::print_table(&letters, total);
    }
    Ok(ExitCode::SUCCESS)
}

async fn dlq_replay(
    settings: &Settings,
    all: bool,
    kinds: Vec<String>,
    job_ids: Vec<String>,
    limit: Option<usize>,
) -> anyhow::Result<ExitCode> {
    for k in &kinds {
        if jelou_worker::outcome::ErrorKind::parse(k).is_none() {
            return Err(UsageError(format!(
                "--kind {k}: not a failure kind (invalid_job, rejected, retries_exhausted, expired, delivery_limit)"
            ))
            .into());
        }
    }
    if !all && kinds.is_empty() && job_ids.is_empty() {
        return Err(
            UsageError("say what to replay: --all, or --kind KIND / --job-id ID".into()).into(),
        );
    }
    let filter = cli::dlq::Filter { kinds, job_ids };
    let done = cli::dlq::replay(settings, &filter, limit).await?;
    eprintln!(
        "replayed {}, left {} in the dead-letter queue that did not match",
        done.moved.len(),
        done.kept
    );
    Ok(ExitCode::SUCCESS)
}

/// A stand-in Jelou answering success, until SIGTERM/SIGINT.
async fn stand_in(listen: std::net::SocketAddr, latency_ms: u64) -> anyhow::Result<ExitCode> {
    let stand_in = jelou_worker::stand_in::StandIn::start_on(listen, false).await?;
    let latency = std::time::Duration::from_millis(latency_ms);
    stand_in.always(jelou_worker::stand_in::Reply::Success.after(latency));
    tracing::info!(listen = %stand_in.addr(), "stand-in Jelou answering success to every message");
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    shutdown.cancelled().await;
    Ok(ExitCode::SUCCESS)
}

async fn probe_http(url: &str) -> ExitCode {
    match cli::probe::run(url).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
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
