//! The human-readable table, notes and targets printed before the JSON line.

use std::fmt::Write as _;

use crate::report::{Report, RunReport, Target};

/// The human-readable table, notes and targets.
pub(crate) fn render_table(report: &Report) -> String {
    let mut out = String::new();
    write_head(&mut out);
    for r in &report.runs {
        write_row(&mut out, r);
    }
    let _ = writeln!(out);
    for r in &report.runs {
        write_notes(&mut out, r);
    }
    if !report.targets.is_empty() {
        write_targets(&mut out, &report.targets, report.options.repeat);
    }
    let _ = write!(
        out,
        "\n{}",
        if report.ok {
            "every job got exactly one result".to_string()
        } else {
            format!("FAILED: {}", report.problems.join("; "))
        }
    );
    out
}

/// A figure with `decimals` decimals, or `-`.
fn opt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "-".to_string(),
    }
}

/// A ratio as a whole percentage, or `-`.
fn pct(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("{:.0} %", v * 100.0),
        None => "-".to_string(),
    }
}

/// The two lines of column names and units.
fn write_head(out: &mut String) {
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:>5} {:>6} {:>9} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8} {:>5}",
        "run",
        "jobs",
        "pref.",
        "Jelou",
        "jobs/s",
        "vs null",
        "vs bound",
        "1st res.",
        "p50",
        "p99",
        "CPU s/1k",
        "CPU",
        "peak RSS",
        "1 res"
    );
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:>5} {:>6} {:>9} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8} {:>5}",
        "", "", "", "ms", "", "", "", "ms", "ms", "ms", "jobs", "% core", "MiB", "each"
    );
}

/// One run's line of the table.
fn write_row(out: &mut String, r: &RunReport) {
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:>5} {:>6} {:>9} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8} {:>5}",
        r.name,
        r.jobs,
        r.prefetch,
        r.jelou_latency_ms,
        opt(r.jobs_per_sec, 0),
        pct(r.vs_null_pipeline),
        pct(r.vs_bound),
        opt(r.first_result_ms, 1),
        opt(r.latency_p50_ms, 0),
        opt(r.latency_p99_ms, 0),
        opt(r.cpu_seconds_per_1000_jobs, 3),
        format!("{:.1}", r.cpu_share_of_a_core * 100.0),
        opt(r.peak_rss_mib, 1),
        if r.results.exactly_one_result_each {
            "yes"
        } else {
            "NO"
        },
    );
}

/// One run's notes under the table: start-up, window, memory, the others' CPU.
fn write_notes(out: &mut String, r: &RunReport) {
    let _ = writeln!(
        out,
        "{}: {}; started in {:.0} ms; window {:.2} s, {} jobs done; RSS now {} MiB; CPU over the window, % of a core: stand-in {:.0}, bench {:.0}, RabbitMQ {}, machine busy {}{}",
        r.name,
        r.pipeline,
        r.startup_ms,
        r.window_secs,
        r.jobs_done_in_window,
        opt(r.rss_mib, 1),
        r.stand_in_cpu_share * 100.0,
        r.bench_cpu_share * 100.0,
        r.broker_cpu_share
            .map_or("-".to_string(), |s| format!("{:.0}", s * 100.0)),
        pct(r.machine_busy),
        r.prefill_jobs_per_sec.map_or(String::new(), |p| format!(
            "; queue filled at {p:.0} jobs/s"
        )),
    );
    if let Some(c) = &r.order_check {
        let _ = writeln!(
            out,
            "{}: {} users, order {}: Jelou got {} messages; {} out of their user's order, {} while the user's previous one was unanswered",
            r.name,
            r.users,
            if r.order { "on" } else { "off" },
            c.messages,
            c.out_of_order,
            c.overlapping,
        );
    }
}

/// The targets, each met or missed.
fn write_targets(out: &mut String, targets: &[Target], repeat: u8) {
    if repeat > 1 {
        let _ = writeln!(out, "\ntargets (median of {repeat} runs):");
    } else {
        let _ = writeln!(out, "\ntargets:");
    }
    for t in targets {
        let _ = writeln!(
            out,
            "  {:<42} {:>9.3} {} {:<6} {}",
            t.what,
            t.value,
            t.op,
            t.limit,
            if t.met { "met" } else { "MISSED" }
        );
    }
}
