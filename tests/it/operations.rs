//! What operators use: metrics and health endpoints on a live worker, `demo`, `dlq
//! list/replay` on real dead letters, `check` with good and broken configurations,
//! and `enqueue`.

use std::time::Duration;

use crate::utils::*;
use jelou_worker::stand_in::Reply;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_follow_the_work() {
    let env = TestEnv::new("metrics").await;
    env.jelou.set_handler(|seen, _| {
        if seen.json()["userId"] == "reject" {
            Reply::json(400, json!({"message": "no"}))
        } else {
            Reply::Success
        }
    });
    env.declare().await;
    let daemon = Daemon::start(&env.settings).await;
    assert_eq!(daemon.get("/healthz").await.map(|(s, _)| s), Some(200));
    assert_eq!(daemon.get("/readyz").await.map(|(s, _)| s), Some(200));
    assert_eq!(
        daemon.metric("jelou_worker_broker_connected").await,
        Some(1.0)
    );
    assert_eq!(
        daemon.metric("jelou_worker_jobs_in_flight").await,
        Some(0.0)
    );

    let mut stamped = text_job("m-1", "B");
    stamped["message"]["userId"] = json!("ok");
    env.publish_raw(
        stamped.to_string().as_bytes(),
        lapin::BasicProperties::default().with_timestamp(chrono::Utc::now().timestamp() as u64),
    )
    .await;
    let mut rejected = text_job("m-2", "B");
    rejected["message"]["userId"] = json!("reject");
    env.publish(&rejected).await;
    env.publish_raw(b"garbage", lapin::BasicProperties::default())
        .await;
    env.results(3, WAIT).await;

    let success = r#"jelou_worker_jobs_finished_total{status="success",kind="none"}"#;
    let reject = r#"jelou_worker_jobs_finished_total{status="failure",kind="rejected"}"#;
    let invalid = r#"jelou_worker_jobs_finished_total{status="failure",kind="invalid_job"}"#;
    eventually("the counters to move", WAIT, || async {
        daemon.metric(success).await == Some(1.0)
            && daemon.metric(reject).await == Some(1.0)
            && daemon.metric(invalid).await == Some(1.0)
    })
    .await;
    assert_eq!(
        daemon
            .metric(r#"jelou_worker_http_attempts_total{class="2xx"}"#)
            .await,
        Some(1.0)
    );
    assert_eq!(
        daemon
            .metric(r#"jelou_worker_http_attempts_total{class="4xx"}"#)
            .await,
        Some(1.0)
    );
    assert_eq!(
        daemon
            .metric("jelou_worker_jelou_request_duration_seconds_count")
            .await,
        Some(2.0)
    );
    assert_eq!(
        daemon
            .metric("jelou_worker_job_latency_seconds_count")
            .await,
        Some(1.0)
    );
    assert_eq!(
        daemon.metric("jelou_worker_jobs_in_flight").await,
        Some(0.0)
    );
    let (_, text) = daemon.get("/metrics").await.unwrap();
    assert!(
        text.contains(r#"jelou_worker_broker_node{node="127.0.0.1:5672"} 1"#),
        "{text}"
    );
    assert!(
        !text.contains(CLIENT_SECRET) && !text.contains("guest:guest"),
        "secrets in metrics"
    );
    let mut daemon = daemon;
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(WAIT).await, Some(0));
    // Every log line is one JSON object and no secret is logged.
    let log = daemon.log_text();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string());
    }
    assert!(
        !log.contains(CLIENT_SECRET) && !log.contains("guest:guest"),
        "secrets in the log"
    );
    // One structured line per finished job, with jobId and botId, without the body.
    let finished: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["message"] == "job finished")
        .collect();
    assert_eq!(finished.len(), 3, "{log}");
    let first = finished
        .iter()
        .find(|v| v["span"]["job_id"] == "m-1")
        .expect("a line for m-1");
    assert_eq!(first["span"]["bot_id"], "B");
    assert_eq!(first["outcome"], "success");
    assert_eq!(first["attempts"], 1);
    assert!(first["duration_ms"].is_u64());
    assert!(!log.contains("Hello"), "a message body reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_shows_the_whole_system_and_cleans_up() {
    let _broker = connect().await;
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_jelou-worker"))
            .arg("demo")
            .env("JELOU_WORKER__AMQP__URL", broker_url())
            .env(
                "JELOU_WORKER__SERVER__LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .output(),
    )
    .await
    .expect("the demo finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("Every job ended as expected."), "{stdout}");
    for line in [
        "success            8",
        "rejected           1",
        "invalid_job        2",
        "expired            1",
    ] {
        assert!(stdout.contains(line), "summary lacks `{line}`:\n{stdout}");
    }
    assert!(
        stdout.contains("demo-flaky        success  messageId"),
        "{stdout}"
    );
    assert!(!stdout.contains('✗'), "{stdout}");
    // A message refused by Jelou's rules, with its reason; a template job delivered.
    assert!(
        stdout.contains(
            "demo-four-buttons failure  invalid_job: message.quick_replies: 4 buttons, at most 3"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("demo-template     success  messageId hsm-"),
        "{stdout}"
    );
    // It removed the queues it declared.
    let prefix = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("queues"))
        .and_then(|l| l.trim().split(".*").next())
        .expect("the demo names its queues")
        .to_string();
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let gone = ch
        .queue_declare(
            format!("{prefix}.jobs").as_str().into(),
            passive,
            lapin::types::FieldTable::default(),
        )
        .await
        .is_err();
    assert!(gone, "the demo left {prefix}.jobs behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_replay_move_real_dead_letters() {
    let env = TestEnv::new("dlq").await;
    env.jelou
        .set_handler(|seen, _| match seen.json()["userId"].as_str() {
            Some("bad") => Reply::json(
                400,
                json!({"message": "bad user", "error": {"code": "E_USER"}}),
            ),
            _ => Reply::status(503),
        });
    let mut settings = env.settings.clone();
    settings.retry.max_attempts = 2;
    settings.jelou.circuit_failure_threshold = 0;
    env.declare().await;
    let mut bad = text_job("d-rejected", "B");
    bad["message"]["userId"] = json!("bad");
    env.publish(&bad).await;
    env.publish(&text_job("d-exhausted", "B")).await;
    env.publish_raw(
        br#"{"jobId":"d-invalid"}"#,
        lapin::BasicProperties::default(),
    )
    .await;
    let worker = env.start_worker_with(settings.clone());
    env.results(3, WAIT).await;
    worker.stop().await.unwrap();

    // list: three, with kinds, and they stay in place.
    let out = run_ok(&settings, &["dlq", "list", "--json"]).await;
    let listed: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: std::collections::HashMap<String, String> = listed
        .iter()
        .map(|d| {
            (
                d["jobId"].as_str().unwrap().to_string(),
                d["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(kinds.len(), 3, "{listed:?}");
    assert_eq!(kinds["d-rejected"], "rejected");
    assert_eq!(kinds["d-exhausted"], "retries_exhausted");
    assert_eq!(kinds["d-invalid"], "invalid_job");
    assert_eq!(
        env.message_count(&settings.amqp.dead_letter_queue).await,
        3,
        "list must not consume"
    );
    let table = run_ok(&settings, &["dlq", "list"]).await;
    assert!(
        table.contains("3 shown, 3 in the dead-letter queue"),
        "{table}"
    );

    // replay needs a filter or --all.
    let refused = command(&settings, &["dlq", "replay"])
        .output()
        .await
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.starts_with("error: say what to replay"), "{stderr}");
    // replay by kind moves only that one, with a fresh attempt count.
    let out = run_ok(&settings, &["dlq", "replay", "--kind", "retries_exhausted"]).await;
    assert_eq!(out.trim(), "d-exhausted");
    assert_eq!(env.message_count(&settings.amqp.dead_letter_queue).await, 2);
    let moved = env.drain(&settings.amqp.jobs_queue).await;
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].json()["jobId"], "d-exhausted");
    assert!(
        moved[0].header("x-jelou-attempts").is_none(),
        "the attempt count must start afresh"
    );
    assert!(moved[0].header("x-jelou-error-kind").is_none());
    // Put it back to work: with Jelou fixed it now succeeds, counting from 1.
    env.jelou.always(Reply::Success);
    env.publish_raw(&moved[0].body, moved[0].properties.clone())
        .await;
    let worker = env.start_worker_with(settings.clone());
    let r = env.result().await.json();
    assert_eq!(
        (
            r["jobId"].as_str(),
            r["status"].as_str(),
            r["attempts"].as_u64()
        ),
        (Some("d-exhausted"), Some("success"), Some(1))
    );
    worker.stop().await.unwrap();

    // replay by jobId, then --all.
    let out = run_ok(&settings, &["dlq", "replay", "--job-id", "d-invalid"]).await;
    assert_eq!(out.trim(), "d-invalid");
    let out = run_ok(&settings, &["dlq", "replay", "--all"]).await;
    assert_eq!(out.trim(), "d-rejected");
    assert_eq!(env.message_count(&settings.amqp.dead_letter_queue).await, 0);
    assert_eq!(
        env.message_count(&settings.amqp.jobs_queue).await,
        2,
        "nothing lost mid-move"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_good_configuration_and_names_each_problem() {
    let env = TestEnv::new("check").await;
    env.jelou
        .always(Reply::json(400, json!({"message": "type is required"})));
    env.declare().await;
    let stdout = run_ok(&env.settings, &["check"]).await;
    assert!(stdout.contains("ready to run"), "{stdout}");
    assert!(stdout.contains("credentials are accepted"), "{stdout}");
    // check sent no message: only the empty probe object reached Jelou.
    let seen = env.jelou.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(&seen[0].body[..], b"{}");

    // Refused credentials.
    env.jelou
        .always(Reply::json(401, json!({"message": "invalid credentials"})));
    let out = command(&env.settings, &["check"]).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success());
    assert!(
        stdout.contains("FAIL jelou") && stdout.contains("credentials refused"),
        "{stdout}"
    );

    // No broker, and Jelou unreachable.
    let mut broken = env.settings.clone();
    broken.jelou.base_url = format!("http://127.0.0.1:{}", free_port());
    let out = command(&broken, &["check"])
        .env(
            "JELOU_WORKER__AMQP__URL",
            format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()),
        )
        .env("JELOU_WORKER__JELOU__REQUEST_TIMEOUT_MS", "1000")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success());
    assert!(stdout.contains("FAIL broker"), "{stdout}");
    assert!(
        stdout.contains("FAIL jelou") && stdout.contains("unreachable"),
        "{stdout}"
    );

    // A bad value: one line naming the key, before anything else.
    let out = command(&env.settings, &["check"])
        .env("JELOU_WORKER__RETRY__MAX_ATTEMPTS", "0")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("retry.max_attempts"), "{stderr}");
    assert!(stderr.starts_with("error: configuration: "), "{stderr}");
}

/// The commands a person runs (`enqueue`, `dlq`, `check`, `demo`) report a failure as
/// one plain line, `error: ...`, never as the daemon's JSON log line (the tests'
/// `log.format` is json): exit status 2 when the command was given wrongly, as for
/// clap's own errors, and 1 for any other failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_failures_are_one_plain_line_exit_2_for_usage_errors() {
    let settings = jelou_worker::config::Settings::default();
    let unreachable = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let cases: [(&[&str], i32, &str); 4] = [
        (
            &["enqueue", "--file", "/dev/null"],
            2,
            "error: no job given",
        ),
        (
            &["dlq", "replay", "--kind", "nope"],
            2,
            "error: --kind nope: not a failure kind",
        ),
        (&["dlq", "replay"], 2, "error: say what to replay"),
        (&["dlq", "list"], 1, "error: cannot connect to the broker"),
    ];
    for (args, code, start) in cases {
        let out = command(&settings, args)
            .env("JELOU_WORKER__AMQP__URL", &unreachable)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
        assert!(stderr.starts_with(start), "{args:?}: {stderr}");
        assert!(!stderr.contains("secret"), "{args:?}: {stderr}");
    }
    // clap's own usage errors exit 2 too.
    let out = command(&settings, &["dlq", "replay", "--all", "--kind", "rejected"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_publishes_from_flags_and_json_lines() {
    let env = TestEnv::new("enqueue").await;
    let out = run_ok(
        &env.settings,
        &[
            "enqueue", "--bot", "B1", "--user", "593", "--text", "Hola", "--job-id", "e-flag",
        ],
    )
    .await;
    assert_eq!(out.trim(), "e-flag");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jobs.jsonl");
    std::fs::write(
        &file,
        "{\"jobId\":\"e-1\",\"botId\":\"B\",\"message\":{\"type\":\"text\",\"userId\":\"u\",\"text\":\"Hi\"}}\n\n\
         {\"botId\":\"B\"}\n\
         {\"botId\":\"B\",\"message\":{\"type\":\"image\",\"userId\":\"u\",\"mediaUrl\":\"https://x\"}}\n",
    )
    .unwrap();
    let out = command(
        &env.settings,
        &["enqueue", "--file", file.to_str().unwrap()],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a refused line makes the exit non-zero"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 3") && stderr.contains("message is missing"),
        "{stderr}"
    );
    let printed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(printed.len(), 2);
    assert_eq!(printed[0], "e-1");
    let generated = printed[1].clone();
    assert!(uuid::Uuid::parse_str(&generated).is_ok());

    // The printed ids are the ones the worker uses.
    let worker = env.start_worker();
    let results = by_job_id(&env.results(3, WAIT).await);
    assert!(
        results.contains_key("e-flag")
            && results.contains_key("e-1")
            && results.contains_key(&generated),
        "{results:?}"
    );
    assert_eq!(results["e-flag"]["botId"], "B1");
    worker.stop().await.unwrap();
}
