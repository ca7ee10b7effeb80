//! The shipped dashboard (`deploy/grafana/jelou-worker.json`) and alert rules
//! (`deploy/prometheus/alerts.yml`) against a live worker: every `jelou_worker_*` name
//! they use is one the worker exports, every metric the worker exports has a panel,
//! and every alert's runbook row exists in the README. And the worker's logs never
//! hold up its jobs: with stderr not read at all, jobs are still done and the lines it
//! had to drop are counted.
//!
//! (`promtool check rules` / `promtool test rules` check the rules' syntax and
//! behaviour: see `deploy/check.sh`.)

use std::{collections::BTreeSet, path::Path, time::Duration};

use crate::utils::*;
use jelou_worker::stand_in::Reply;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// Names the dashboard shows that no worker exports yet, and why. Remove an entry
/// once the worker exports the metric (this test fails to remind you).
const PENDING: &[(&str, &str)] = &[];

/// Names from other exporters: the depth of the jobs queue and of the dead-letter
/// queue come from RabbitMQ's own plugin, rabbitmq_prometheus, scraped per queue
/// (`/metrics/per-object`): the broker knows them even when no worker runs, which is
/// when "jobs pile up and no worker finishes any" must fire. (`up` is Prometheus' own.)
const EXTERNAL: &[&str] = &[
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_messages",
];

fn shipped(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every identifier in `text` that starts with `prefix`. The whole text is read, not
/// only the queries: a description naming a metric must name a real one too.
fn names_with_prefix(text: &str, prefix: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// The sample names a scrape can contain, from its `# TYPE` lines (so a family with no
/// sample yet, such as a counter by label, counts) and its samples.
fn exported(scrape: &str) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = families(scrape)
        .into_iter()
        .flat_map(|(_, samples)| samples)
        .collect();
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        if let Some(name) = line.split(['{', ' ']).next().filter(|n| !n.is_empty()) {
            names.insert(name.to_string());
        }
    }
    names
}

/// The sample names of a family of metrics of type `kind` (a `# TYPE` line).
fn sample_names(family: &str, kind: &str) -> Vec<String> {
    let suffixes: &[&str] = match kind {
        "counter" => &["_total"],
        "histogram" => &["_bucket", "_sum", "_count"],
        "summary" => &["", "_sum", "_count"],
        "info" => &["_info"],
        _ => &[""],
    };
    suffixes.iter().map(|s| format!("{family}{s}")).collect()
}

/// The families of a scrape (its `# TYPE` lines), each with its sample names.
fn families(scrape: &str) -> Vec<(String, Vec<String>)> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let mut words = rest.split_whitespace();
            let (family, kind) = (words.next()?, words.next()?);
            Some((family.to_string(), sample_names(family, kind)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_metrics_the_worker_exports() {
    let dashboard = shipped("deploy/grafana/jelou-worker.json");
    let alerts = shipped("deploy/prometheus/alerts.yml");
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    let used_by = [("dashboard", &dashboard), ("alerts", &alerts)];
    let dashboard_names = names_with_prefix(&dashboard, "jelou_worker_");
    // The reading works: names of each kind are found.
    for expected in [
        "jelou_worker_jobs_finished_total",
        "jelou_worker_jelou_request_duration_seconds_bucket",
        "jelou_worker_jobs_in_flight",
    ] {
        assert!(dashboard_names.contains(expected), "{dashboard_names:?}");
    }

    let env = TestEnv::new("observability").await;
    // A metric by label shows up once it has a sample: one job retried once (503),
    // then done, and one rejected.
    env.jelou
        .set_handler(|seen, n| match seen.json()["userId"].as_str() {
            Some("reject") => Reply::json(400, json!({"message": "no"})),
            _ if n == 1 => Reply::status(503),
            _ => Reply::Success,
        });
    env.declare().await;
    let mut daemon = Daemon::start(&env.settings).await;
    env.publish(&text_job("o-retried", "B")).await;
    let mut rejected = text_job("o-rejected", "B");
    rejected["message"]["userId"] = json!("reject");
    env.publish(&rejected).await;
    env.results(2, WAIT).await;
    let (status, scrape) = daemon.get("/metrics").await.expect("/metrics answers");
    assert_eq!(status, 200);
    let exported = exported(&scrape);
    let pending: BTreeSet<&str> = PENDING.iter().map(|(name, _)| *name).collect();

    let mut problems = Vec::new();
    for (file, text) in used_by {
        for name in names_with_prefix(text, "jelou_worker_") {
            if !exported.contains(&name) && !pending.contains(name.as_str()) {
                problems.push(format!(
                    "{file} uses {name}, which the worker does not export"
                ));
            }
        }
        for name in names_with_prefix(text, "rabbitmq_") {
            // The plugin's own name, in comments and descriptions.
            if name != "rabbitmq_prometheus" && !EXTERNAL.contains(&name.as_str()) {
                problems.push(format!(
                    "{file} uses {name}: not one of the RabbitMQ metrics listed in EXTERNAL"
                ));
            }
        }
    }
    for (name, why) in PENDING {
        if exported.contains(*name) {
            problems.push(format!(
                "{name} is exported now: remove it from PENDING ({why})"
            ));
        }
        if !dashboard_names.contains(*name) {
            problems.push(format!(
                "{name} is in PENDING but the dashboard does not use it"
            ));
        }
    }
    // The other way round: every metric the worker exports is on the dashboard.
    for (family, samples) in families(&scrape) {
        if family.starts_with("jelou_worker_")
            && !samples.iter().any(|s| dashboard_names.contains(s))
        {
            problems.push(format!(
                "the worker exports {family} but no dashboard panel shows it"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n\nscrape:\n{scrape}",
        problems.join("\n")
    );

    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(WAIT).await, Some(0));
}

#[test]
fn every_alert_names_a_runbook_row_of_the_readme() {
    let alerts = shipped("deploy/prometheus/alerts.yml");
    let readme = shipped("README.md");
    let section = readme
        .split("### When things go wrong")
        .nth(1)
        .expect("the README has a \"When things go wrong\" section");
    let section = section.split("\n#").next().unwrap();
    let rows: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook:"))
        .collect();
    let alert_count = alerts
        .lines()
        .filter(|l| l.trim().starts_with("- alert:"))
        .count();
    assert!(alert_count >= 7, "{alerts}");
    assert_eq!(rows.len(), alert_count, "every alert has a runbook line");
    for runbook in rows {
        let row = runbook
            .split_once("row \"")
            .and_then(|(_, rest)| rest.rsplit_once('"'))
            .map(|(row, _)| row)
            .unwrap_or_else(|| panic!("runbook without `row \"...\"`: {runbook}"));
        assert!(
            runbook.contains("README.md#when-things-go-wrong"),
            "{runbook}"
        );
        assert!(
            section
                .lines()
                .any(|l| l.starts_with(&format!("| {row} |"))),
            "the README's \"When things go wrong\" table has no row `{row}`"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_hold_up_jobs_and_dropped_lines_are_counted() {
    let env = TestEnv::new("log-drops").await;
    env.declare().await;
    // stderr is a pipe nobody reads: once its buffer (64 KiB) is full, every write to
    // it would block. At trace level the worker logs far more than that and the
    // log buffer.
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut settings = env.settings.clone();
    settings.server.listen = listen;
    let mut child = command(&settings, &["run"])
        .env("JELOU_WORKER__LOG__LEVEL", "trace")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _unread_stderr = child.stderr.take();
    eventually("the worker consumes", WAIT, || async {
        http_get(listen, "/readyz").await.map(|(s, _)| s) == Some(200)
    })
    .await;
    // Published in one pipelined, confirmed burst.
    let jobs = 500;
    let ch = env.conn.create_channel().await.unwrap();
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for i in 0..jobs {
        let body = text_job(&format!("log-{i}"), "B").to_string();
        confirms.push(
            ch.basic_publish(
                "".into(),
                env.settings.amqp.jobs_queue.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                body.as_bytes(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap(),
        );
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack());
    }
    env.results(jobs, Duration::from_secs(60)).await;
    let (_, scrape) = http_get(listen, "/metrics").await.unwrap();
    let dropped: f64 = scrape
        .lines()
        .find_map(|l| l.strip_prefix("jelou_worker_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no jelou_worker_log_lines_dropped_total:\n{scrape}"));
    assert!(dropped > 0.0, "no line dropped:\n{scrape}");
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}
