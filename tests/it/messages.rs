//! Speaking Jelou's language, black-box against the real local RabbitMQ and a stand-in
//! Jelou: messages that break a documented rule are refused before they are sent (and
//! the result says which field and which rule), template (HSM) jobs go to the HSM
//! endpoint and come back with its id, Jelou's documented error bodies reach the
//! result, and `validate` / `enqueue --template` on the command line.

use std::time::Duration;

use crate::utils::*;
use jelou_worker::stand_in::Reply;
use lapin::BasicProperties;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn message_job(job_id: &str, message: Value) -> Value {
    json!({"jobId": job_id, "botId": "B", "message": message})
}

fn template_job(job_id: &str, user: &str, template: Value) -> Value {
    json!({"jobId": job_id, "botId": "B", "userId": user, "template": template})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_breaks_a_rule_fails_at_once_saying_which_field_and_rule() {
    let env = TestEnv::new("msg-rules").await;
    env.declare().await;
    let buttons: Vec<Value> = ["1", "2", "3", "4"]
        .iter()
        .map(|t| json!({"title": t}))
        .collect();
    let cases = [
        (
            message_job(
                "r-buttons",
                json!({"type": "quick_reply", "userId": "u", "text": "Rate us", "quick_replies": buttons}),
            ),
            "message.quick_replies: 4 buttons, at most 3",
        ),
        (
            message_job(
                "r-http",
                json!({"type": "image", "userId": "u", "mediaUrl": "http://cdn.example.com/a.png"}),
            ),
            "message.mediaUrl: must be an https:// URL",
        ),
        (
            message_job(
                "r-long",
                json!({"type": "text", "userId": "u", "text": "ñ".repeat(4097)}),
            ),
            "message.text: 4097 characters, at most 4096",
        ),
        (
            message_job(
                "r-filename",
                json!({"type": "file", "userId": "u", "mediaUrl": "https://x.io/a.pdf"}),
            ),
            "message.filename: required",
        ),
        (
            template_job("r-language", "593", json!({"elementName": "order_shipped"})),
            "template.language: required",
        ),
        (
            json!({"jobId": "r-both", "botId": "B", "userId": "u",
                   "message": {"type": "text", "userId": "u", "text": "x"},
                   "template": {"elementName": "x", "language": "es"}}),
            "a job carries either message or template (with a top-level userId), not both",
        ),
    ];
    for (job, _) in &cases {
        env.publish(job).await;
    }
    // The worker goes on: valid jobs after them are sent.
    env.publish(&message_job(
        "r-ok",
        json!({"type": "quick_reply", "userId": "u", "text": "Rate us", "quick_replies": buttons[..3]}),
    ))
    .await;
    env.publish(&message_job(
        "r-unknown",
        json!({"type": "poll", "userId": "u", "question": "?"}),
    ))
    .await;
    let worker = env.start_worker();
    let results = by_job_id(&env.results(cases.len() + 2, WAIT).await);
    for (job, reason) in &cases {
        let r = &results[job["jobId"].as_str().unwrap()];
        assert_eq!(r["status"], "failure", "{r}");
        assert_eq!(r["error"]["kind"], "invalid_job", "{r}");
        assert_eq!(r["error"]["message"], *reason, "{r}");
        assert_eq!(r["attempts"], 0);
        assert_eq!(r["botId"], "B");
    }
    assert_eq!(results["r-language"]["userId"], "593");
    assert_eq!(results["r-ok"]["status"], "success");
    // A type the worker has no rules for is sent as given.
    assert_eq!(results["r-unknown"]["status"], "success");
    let sent: Vec<Value> = env.jelou.seen().iter().map(|s| s.json()).collect();
    assert_eq!(sent.len(), 2, "nothing invalid is sent: {sent:?}");
    // Every refused job is dead-lettered, body untouched.
    assert_eq!(env.dead_letters().await.len(), cases.len());
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_validation_off_only_the_base_checks_remain() {
    let env = TestEnv::new("msg-novalidate").await;
    env.declare().await;
    let mut settings = env.settings.clone();
    settings.jelou.validate_messages = false;
    let raw = r#"{"jobId":"v-off","botId":"B","message":{"type":"image","userId":"u","mediaUrl":"http://x/a.png"}}"#;
    env.publish_raw(raw.as_bytes(), BasicProperties::default())
        .await;
    env.publish(&message_job(
        "v-nouser",
        json!({"type": "text", "text": "x"}),
    ))
    .await;
    let worker = env.start_worker_with(settings);
    let results = by_job_id(&env.results(2, WAIT).await);
    assert_eq!(results["v-off"]["status"], "success");
    assert_eq!(results["v-nouser"]["error"]["kind"], "invalid_job");
    let seen = env.jelou.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].body.as_ref(),
        br#"{"type":"image","userId":"u","mediaUrl":"http://x/a.png"}"#
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_job_is_sent_to_the_hsm_endpoint_for_its_user() {
    let env = TestEnv::new("hsm").await;
    env.declare().await;
    let raw = r##"{"jobId":"t-1","botId":"BOT/1","userId":"593987654321","template":{"elementName":"order_shipped","language":"es","parameters":["Ana", "#42"],"campaignId":"c-9"},"deadline":"2099-01-01T00:00:00Z"}"##;
    env.publish_raw(
        raw.as_bytes(),
        BasicProperties::default().with_correlation_id("corr-t".into()),
    )
    .await;
    let worker = env.start_worker();
    let result = env.result().await;
    let r = result.json();
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["messageId"], "hsm-1");
    assert_eq!(r["botId"], "BOT/1");
    assert_eq!(r["userId"], "593987654321");
    assert_eq!(r["attempts"], 1);
    assert_eq!(result.correlation_id().as_deref(), Some("corr-t"));
    let seen = env.jelou.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path, "/v2/whatsapp/BOT%2F1/hsm");
    assert_eq!(seen[0].content_type.as_deref(), Some("application/json"));
    assert!(
        seen[0]
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Basic ")),
        "{:?}",
        seen[0].authorization
    );
    // The template as written, plus exactly one destination: the job's userId.
    assert_eq!(
        String::from_utf8(seen[0].body.to_vec()).unwrap(),
        r##"{"destinations":["593987654321"],"elementName":"order_shipped","language":"es","parameters":["Ana", "#42"],"campaignId":"c-9"}"##
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_answers_are_classified_and_retried_as_messages_are() {
    let env = TestEnv::new("hsm-answers").await;
    env.declare().await;
    env.jelou
        .set_handler(|seen, _| match seen.recipient().as_str() {
            // No entry for the destination: it may have been sent, never resent.
            "other" => Reply::json(200, json!([{"id": "x", "destination": "someone-else"}])),
            "missing" => Reply::json(
                400,
                json!({"message": ["Template does not exist"], "status": "failed"}),
            ),
            "flaky" if seen_count(seen) == 0 => Reply::json(503, json!({"message": "busy"})),
            _ => Reply::Success,
        });
    for (id, user) in [
        ("h-other", "other"),
        ("h-missing", "missing"),
        ("h-flaky", "flaky"),
    ] {
        env.publish(&template_job(
            id,
            user,
            json!({"elementName": "x", "language": "es"}),
        ))
        .await;
    }
    let worker = env.start_worker();
    let results = by_job_id(&env.results(3, WAIT).await);
    let other = &results["h-other"]["error"];
    assert_eq!(other["kind"], "rejected");
    assert_eq!(other["httpStatus"], 200);
    assert!(
        other["message"]
            .as_str()
            .unwrap()
            .contains("without an entry for destination other"),
        "{other}"
    );
    assert_eq!(results["h-other"]["attempts"], 1);
    let missing = &results["h-missing"]["error"];
    assert_eq!(missing["kind"], "rejected");
    assert_eq!(missing["httpStatus"], 400);
    assert_eq!(
        missing["message"],
        "Jelou answered 400 Bad Request: Template does not exist"
    );
    assert_eq!(results["h-missing"]["attempts"], 1);
    assert_eq!(results["h-flaky"]["status"], "success");
    assert_eq!(results["h-flaky"]["attempts"], 2);
    worker.stop().await.unwrap();
}

/// How many earlier requests the stand-in saw for this request's recipient (a
/// handler sees the request before it is recorded).
fn seen_count(seen: &jelou_worker::stand_in::Seen) -> usize {
    use std::sync::{Mutex, OnceLock};
    static COUNTS: OnceLock<Mutex<std::collections::HashMap<String, usize>>> = OnceLock::new();
    let mut counts = COUNTS.get_or_init(Default::default).lock().unwrap();
    let n = counts.entry(seen.recipient()).or_insert(0);
    *n += 1;
    *n - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jelou_documented_error_codes_reach_the_result() {
    let env = TestEnv::new("msg-codes").await;
    env.declare().await;
    env.jelou
        .set_handler(|seen, _| match seen.recipient().as_str() {
            "nobot" => Reply::json(
                404,
                json!({"code": "bot_not_found", "description": "The bot does not exist"}),
            ),
            _ => Reply::json(
                422,
                json!({"code": "unprocessable_entity", "description": "userId is not valid"}),
            ),
        });
    let text = |id: &str, user: &str| {
        message_job(id, json!({"type": "text", "userId": user, "text": "Hola"}))
    };
    env.publish(&text("c-404", "nobot")).await;
    env.publish(&text("c-422", "bad")).await;
    let worker = env.start_worker();
    let results = by_job_id(&env.results(2, WAIT).await);
    let e = &results["c-404"]["error"];
    assert_eq!(
        (&e["kind"], &e["httpStatus"], &e["code"]),
        (&json!("rejected"), &json!(404), &json!("bot_not_found"))
    );
    assert_eq!(
        e["message"],
        "Jelou answered 404 Not Found: The bot does not exist"
    );
    let e = &results["c-422"]["error"];
    assert_eq!(e["code"], "unprocessable_entity");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .ends_with("userId is not valid"),
        "{e}"
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_checks_a_file_without_a_broker() {
    // No broker, no credentials: an unreachable amqp.url and none set.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jobs.jsonl");
    std::fs::write(
        &file,
        concat!(
            r#"{"botId":"B","message":{"type":"text","userId":"u","text":"Hola"}}"#,
            "\n\n",
            r#"{"botId":"B","message":{"type":"quick_reply","userId":"u","text":"?","quick_replies":[{"title":"a"},{"title":"a"}]}}"#,
            "\n",
            r#"{"botId":"B","userId":"593","template":{"elementName":"order_shipped","language":"es","parameters":["Ana"]}}"#,
            "\n",
            r#"{"botId":"B","userId":"593","template":{"elementName":"x","language":"es","type":"image"}}"#,
            "\n",
        ),
    )
    .unwrap();
    let validate = |path: &std::path::Path| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_jelou-worker"));
        cmd.arg("validate")
            .arg(path)
            .env("JELOU_WORKER__AMQP__URL", "amqp://127.0.0.1:1/%2f")
            .env_remove("JELOU_WORKER__JELOU__CLIENT_SECRET")
            .env_remove("JELOU_WORKER__JELOU__CLIENT_ID")
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null());
        cmd
    };
    let out = validate(&file).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "line 3: message.quick_replies[1].title: \"a\" repeats quick_replies[0]; titles must be unique",
            "line 5: template.mediaUrl: required",
            "2 of 4 job(s) invalid by the contract and Jelou's rules per message type",
        ],
        "{stdout}"
    );
    let good = dir.path().join("good.jsonl");
    std::fs::write(
        &good,
        r#"{"botId":"B","message":{"type":"text","userId":"u","text":"Hola"}}"#,
    )
    .unwrap();
    let out = validate(&good).output().await.unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 job(s) checked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_refuses_invalid_lines_and_publishes_template_jobs() {
    let env = TestEnv::new("msg-enqueue").await;
    let out = run_ok(
        &env.settings,
        &[
            "enqueue",
            "--bot",
            "B",
            "--user",
            "593",
            "--template",
            "order_shipped",
            "--language",
            "es",
            "--param",
            "Ana",
            "--param",
            "#42",
            "--job-id",
            "e-template",
        ],
    )
    .await;
    assert_eq!(out.trim(), "e-template");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jobs.jsonl");
    std::fs::write(
        &file,
        r#"{"botId":"B","message":{"type":"sticker","userId":"u","mediaUrl":"ftp://x/s.webp"}}"#,
    )
    .unwrap();
    let out = command(
        &env.settings,
        &["enqueue", "--file", file.to_str().unwrap()],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 1: not published: message.mediaUrl: must be an https:// URL"),
        "{stderr}"
    );
    let worker = env.start_worker();
    let r = env.result().await.json();
    assert_eq!(
        (&r["jobId"], &r["status"], &r["userId"]),
        (&json!("e-template"), &json!("success"), &json!("593"))
    );
    let seen = env.jelou.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].json(),
        json!({"destinations": ["593"], "elementName": "order_shipped", "language": "es", "parameters": ["Ana", "#42"]})
    );
    worker.stop().await.unwrap();
}
