//! CI smoke test of the shipped benchmark (`jelou-bench`): every scenario at a tiny
//! size against the real local RabbitMQ, with order on (the default). It checks that the benchmark works and that
//! every job got exactly one result; it never asserts speed, which depends on the
//! machine.

use std::process::Command;

use serde_json::Value;

#[test]
fn every_scenario_runs_and_every_job_gets_exactly_one_result() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_jelou-bench"));
    command.args([
        "--scenario",
        "instant,latency,idle,backlog,conversations",
        "--jobs",
        "300",
        "--latency-ms",
        "20",
        "--idle-secs",
        "1",
        "--backlog-jobs",
        "1000",
        "--backlog-secs",
        "1",
        "--users",
        "5",
        "--messages-per-user",
        "4",
        // The worker built for this test run, not whatever lies in target/release.
        "--worker-bin",
        env!("CARGO_BIN_EXE_jelou-worker"),
    ]);
    // Same override as the other integration tests (tests/it/utils).
    if let Ok(url) = std::env::var("JELOU_TEST_AMQP_URL") {
        command.args(["--amqp-url", &url]);
    }
    let output = command.output().expect("jelou-bench can be started");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if let Some(line) = stderr
        .lines()
        .find(|l| l.contains("RabbitMQ is not reachable"))
    {
        panic!("the benchmark needs the real broker: {line}");
    }
    assert!(
        output.status.success(),
        "jelou-bench exited with {}\n--- stderr ---\n{stderr}\n--- stdout ---\n{stdout}",
        output.status
    );

    let last = stdout.lines().last().unwrap_or_default();
    let report: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("the last line of stdout is not the JSON report ({e}): {last}"));
    assert_eq!(report["ok"], true, "report: {report:#}");
    let runs = report["runs"].as_array().expect("runs is an array");
    let names: Vec<&str> = runs.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "null-pipeline",
            "instant",
            "latency",
            "idle",
            "backlog-200",
            "backlog-1000",
            "conv-order-on",
            "conv-order-off"
        ]
    );
    for run in runs {
        let name = &run["name"];
        let results = &run["results"];
        assert_eq!(
            results["exactly_one_result_each"], true,
            "{name}: {results}"
        );
        assert_eq!(results["duplicates"], 0, "{name}: {results}");
        assert_eq!(results["failures"], 0, "{name}: {results}");
        assert!(
            run["peak_rss_mib"].as_f64().is_some_and(|m| m > 0.0),
            "{name}: no peak RSS measured: {run}"
        );
    }
    // The drained runs finished every job; the idle worker got none.
    for run in &runs[..3] {
        assert_eq!(run["results"]["done"], 300, "{}", run["name"]);
        assert!(run["jobs_per_sec"].as_f64().is_some_and(|r| r > 0.0));
    }
    assert_eq!(runs[3]["results"]["done"], 0);
    // Conversations: 5 users × 4 messages, both ways; with order on, the stand-in saw
    // each user's messages one at a time and in order.
    for run in &runs[6..] {
        assert_eq!(run["results"]["done"], 20, "{}", run["name"]);
        assert_eq!(run["order_check"]["messages"], 20, "{}", run["name"]);
        assert_eq!(run["order_check"]["users"], 5, "{}", run["name"]);
    }
    assert_eq!(runs[6]["order"], true);
    assert_eq!(runs[6]["order_check"]["out_of_order"], 0, "{}", runs[6]);
    assert_eq!(runs[6]["order_check"]["overlapping"], 0, "{}", runs[6]);
    assert_eq!(runs[7]["order"], false);
}
