//! `jelou-chaos`: a fleet of `jelou-worker` processes, a stand-in Jelou and a steady
//! stream of jobs, under faults injected at seeded random moments; then a ledger of
//! what was published, sent and answered, and a verdict. See the README's
//! "Reliability" section.

mod args;
mod collect;
mod faults;
mod fleet;
mod jelou;
mod ledger;
mod load;
mod order;
mod report;
mod run;
mod setup;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = args::Args::parse();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..1_000_000));
    eprintln!("jelou-chaos: seed {seed} (give it back with --seed {seed})");
    let report = match run::run(&args, seed).await {
        Ok(report) => report,
        Err(e) => {
            eprintln!("jelou-chaos: could not run: {e:#}");
            return ExitCode::from(2);
        }
    };
    report.print();
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).expect("serializable");
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("jelou-chaos: writing {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if report.verdict == "pass" {
        if !args.keep_logs {
            for w in &report.worker_processes {
                let _ = std::fs::remove_file(&w.log);
            }
        }
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
