//! `jelou-bench`: how fast and how lean the worker is, measured on the local RabbitMQ.
//!
//! ```sh
//! cargo run --release --bin jelou-bench -- [--scenario instant,latency,idle,backlog,conversations] [--jobs N] [--order on|off] ...
//! ```
//!
//! # What runs
//!
//! Every run starts a fresh child process, so that its CPU time and its peak memory
//! (`VmHWM`) belong to that run alone:
//!
//! - the worker under test is the real `jelou-worker run` binary (the one built next to
//!   this one), configured only through `JELOU_WORKER__*` variables. It runs in the
//!   temporary directory, so no `config/default.toml` is read: what is not set here is
//!   the built-in default;
//! - the *null pipeline* is this binary re-executed with `--null-pipeline`: the same
//!   consume → publish a fixed result with publisher confirms → ack path, with no HTTP
//!   and no parsing, written as a minimal lapin program would be. It is the ceiling the
//!   worker is compared with, on the same broker, back to back.
//!
//! Jelou is a [`LeanJelou`] on loopback inside this process, on a runtime thread of its
//! own (named `stand-in`) whose CPU time is measured, to show that it is not the limit.
//! It is a minimal HTTP/1.1 server rather than the crate's axum stand-in: on a small
//! machine the stand-in's CPU is taken from the worker and the broker, while the real
//! Jelou costs the worker's machine nothing.
//!
//! # How it measures
//!
//! - Jobs are put on the queue before the child starts, with confirmed, pipelined
//!   publishing (as `jelou-worker enqueue` does), into queues and exchanges named for
//!   the run (`bench.<tag>.<run>.*`) and deleted after it, whatever happened.
//! - The clock starts when the broker reports a consumer on the jobs queue (polled every
//!   millisecond); the child's start-up until then is reported apart (`startup_ms`).
//! - Throughput is jobs / (last result − consume start).
//! - A job's latency runs from its enqueue time, carried in its jobId in µs (finer than
//!   the AMQP timestamp, which is in seconds), or from the consume start for a job
//!   enqueued before it, to its result reaching this process. With a queue filled in
//!   advance that is mostly time spent waiting in the queue (p50 ≈ half the drain); the
//!   time to the first result is the latency of a job that does not wait.
//! - CPU is the child's utime + stime (`/proc/<pid>/stat`) over the window; peak RSS is
//!   its `VmHWM` (`/proc/<pid>/status`) at the end of the window, start-up included.
//! - Each job has a user: its own in `instant`, `latency`, `idle` and `backlog` (with
//!   order on, one user's jobs go one at a time, which would measure one user, not the
//!   worker); job `seq` of `conversations` is user `seq % --users`'s.
//! - Jobs left after a run are counted in every queue that holds jobs: the jobs queue,
//!   the retry and delay queues and, with order on, the partition and wait queues.
//! - Every job must get exactly one result, matched by the result's `correlation_id`
//!   (the jobId); otherwise the exit status is 1. Exit status 2: the bench could not
//!   run (RabbitMQ down, worker binary missing, ...).
//!
//! The table goes to stdout, then the same figures as one JSON line (also written to
//! `--json PATH`); progress goes to stderr.
//!
//! # Where things are
//!
//! `args` (the command line), `scenarios` (the runs each scenario is made of), `run`
//! (one run: its names, the child, the measurement), `amqp` (filling the queue,
//! collecting results), `child` (the child process), `probes` (`/proc`), `report`
//! (figures, checks, targets, JSON), `table` (the text table), `null_pipeline` (the
//! ceiling, when re-executed with `--null-pipeline`), `lean_jelou` (the stand-in).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

mod amqp;
mod args;
mod child;
mod lean_jelou;
mod null_pipeline;
mod probes;
mod report;
mod run;
mod scenarios;
mod table;

use args::Args;
use lean_jelou::LeanJelou;
use report::Report;
use run::Bench;

/// Thread name of the stand-in's runtime, to find its threads in `/proc/self/task`.
/// (Linux keeps 15 bytes of a thread name.)
const STAND_IN_THREAD: &str = "stand-in";
/// The botId of every benchmark job.
const BOT_ID: &str = "bench-bot";

fn main() -> ExitCode {
    let args = Args::parse();
    if args.null_pipeline {
        return null_pipeline::main();
    }
    match bench(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("jelou-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Starts the stand-in on a runtime of its own and runs the bench on another; true
/// when every check passed, an error when the bench could not run.
fn bench(args: Args) -> anyhow::Result<bool> {
    // The stand-in gets a runtime of its own so its CPU time can be told apart.
    let stand_in_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(STAND_IN_THREAD)
        .enable_all()
        .build()
        .context("cannot start the stand-in's runtime")?;
    let stand_in = stand_in_runtime
        .block_on(LeanJelou::start())
        .context("cannot start the stand-in Jelou")?;
    // The bench's own work (filling queues, collecting results) is light: one thread,
    // so that it takes as little CPU from the worker and the broker as it can.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = runtime.block_on(run_bench(args, &stand_in));
    drop(stand_in);
    outcome
}

/// Runs the chosen scenarios, prints the table and the JSON; true when every check passed.
async fn run_bench(args: Args, stand_in: &LeanJelou) -> anyhow::Result<bool> {
    let bench = Bench::new(&args, stand_in).await?;
    let mut runs = bench.run_all(&args).await?;
    report::compare_with_null_pipeline(&mut runs);
    let report = Report::new(&args, &bench, runs);
    report.publish(args.json.as_deref())?;
    Ok(report.ok)
}
