//! The main path, end to end, against the real local RabbitMQ and a stand-in Jelou:
//! every row of the contract's section 2 table, invalid jobs, jobId/correlation rules,
//! deadlines, the result's AMQP properties, the dead-letter queue, concurrency.

use std::time::{Duration, Instant};

use crate::utils::*;
use base64::Engine;
use jelou_worker::stand_in::Reply;
use lapin::BasicProperties;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_job_is_sent_once_and_its_success_published() {
    let env = TestEnv::new("success").await;
    let worker = env.start_worker();
    let job = text_job("order-42-welcome", "BOT_ID");
    env.declare().await;
    env.publish(&job).await;
    let result = env.result().await;

    let body = result.json();
    assert_eq!(body["jobId"], "order-42-welcome");
    assert_eq!(body["status"], "success");
    assert_eq!(body["messageId"], "msg-1");
    assert_eq!(body["botId"], "BOT_ID");
    assert_eq!(body["userId"], "593987654321");
    assert_eq!(body["attempts"], 1);
    assert_eq!(body["error"], serde_json::Value::Null);
    assert!(chrono::DateTime::parse_from_rfc3339(body["completedAt"].as_str().unwrap()).is_ok());
    assert!(body["completedAt"].as_str().unwrap().ends_with('Z'));
    // The result's AMQP properties (contract section 3).
    assert_eq!(result.routing_key, "success");
    assert_eq!(result.correlation_id().as_deref(), Some("order-42-welcome"));
    assert_eq!(
        result.header_str("x-job-id").as_deref(),
        Some("order-42-welcome")
    );
    assert_eq!(
        result
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(*result.properties.delivery_mode(), Some(2));
    // What reached "Jelou".
    let seen = env.jelou.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path, "/v1/bots/BOT_ID/messages");
    let expected_auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    );
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(expected_auth.as_str())
    );
    assert_eq!(seen[0].content_type.as_deref(), Some("application/json"));
    assert_eq!(seen[0].json(), job["message"]);
    // Acked: nothing left, nothing dead-lettered.
    worker.stop().await.unwrap();
    assert_eq!(env.message_count(&env.settings.amqp.jobs_queue).await, 0);
    assert!(env.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_message_type_is_sent_byte_for_byte() {
    let env = TestEnv::new("types").await;
    let messages = [
        r#"{"type":"text","userId":"u1","text":"Hola"}"#,
        r#"{"type":"text","userId":"u1","text":"Pick","options":[{"title":"A"},{"title":"B"}]}"#,
        r#"{"type":"text","userId":"u1","text":"Pick","buttons":{"title":"Menu","buttonText":"See","options":[{"title":"A","description":"a"}]}}"#,
        r#"{"type":"quick_reply","userId":"u1","text":"?","quick_replies":[{"title":"Yes","payload":"y"}]}"#,
        r#"{"type":"image","userId":"u1","mediaUrl":"https://x/a.png","text":"caption"}"#,
        r#"{"type":"video","userId":"u1","mediaUrl":"https://x/a.mp4"}"#,
        r#"{"type":"audio","userId":"u1","mediaUrl":"https://x/a.ogg"}"#,
        r#"{"type":"file","userId":"u1","mediaUrl":"https://x/a.pdf","filename":"a.pdf"}"#,
        r#"{"type":"sticker","userId":"u1","mediaUrl":"https://x/s.webp"}"#,
        r#"{"type":"location","userId":"u1","coordinates":{"lat":-2.19,"long":-79.88},"name":"GYE"}"#,
        r#"{"type":"location_request","userId":"u1","text":"Where are you?"}"#,
        r#"{"type":"contacts","userId":"u1","contacts":[{"name":{"formatted_name":"Ana"}}]}"#,
        r#"{"type":"cta_url","userId":"u1","title":"Hi","text":"Open","caption":"Jelou","parameters":{"url":"https://x","display_text":"Go"}}"#,
        r#"{"type":"voice_call","userId":"u1","header":"Support","text":"Call us","parameters":{"display_text":"Call"}}"#,
        r#"{"type":"flow","userId":"u1","text":"Sign up","parameters":{"flow_id":"f1","flow_cta":"Start","flow_name":"signup","flow_action_payload":{"screen":"A"},"mode":"published","flow_action":"navigate","flow_message_version":"3"}}"#,
        r#"{"type":"CAROUSEL","userId":"u1","text":"Plans","parameters":{"cards":[{"card_index":0,"type":"cta_url","header":{"type":"image","image":{"link":"https://x/a.png"}},"body":{"text":"A"},"action":{"name":"cta_url","parameters":{"display_text":"Buy","url":"https://x/a"}}}]},  "spaced": true}"#,
        r#"{"type":"template","userId":"u1","templateId":"welcome","parameters":{"name":"Ana"}}"#,
    ];
    env.declare().await;
    for (i, m) in messages.iter().enumerate() {
        let body = format!(r#"{{"jobId":"t{i}","botId":"B","message":{m}}}"#);
        env.publish_raw(body.as_bytes(), BasicProperties::default())
            .await;
    }
    let worker = env.start_worker();
    let results = by_job_id(&env.results(messages.len(), WAIT).await);
    assert!(
        results.values().all(|r| r["status"] == "success"),
        "{results:#?}"
    );
    let mut sent: Vec<String> = env
        .jelou
        .seen()
        .iter()
        .map(|s| String::from_utf8(s.body.to_vec()).unwrap())
        .collect();
    let mut expected: Vec<String> = messages.iter().map(|m| m.to_string()).collect();
    sent.sort();
    expected.sort();
    assert_eq!(
        sent, expected,
        "bodies must reach Jelou exactly as the producer wrote them"
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bot_ids_stay_inside_one_path_segment() {
    let env = TestEnv::new("botids").await;
    let bots = ["../x", ".", "..", "a/b", "?", "#", "%2F", "a b"];
    let want = [
        "/v1/bots/..%2Fx/messages",
        "/v1/bots/%2E/messages",
        "/v1/bots/%2E%2E/messages",
        "/v1/bots/a%2Fb/messages",
        "/v1/bots/%3F/messages",
        "/v1/bots/%23/messages",
        "/v1/bots/%252F/messages",
        "/v1/bots/a%20b/messages",
    ];
    env.declare().await;
    for (i, bot) in bots.iter().enumerate() {
        env.publish(&text_job(&format!("b{i}"), bot)).await;
    }
    let worker = env.start_worker();
    let results = by_job_id(&env.results(bots.len(), WAIT).await);
    for (i, bot) in bots.iter().enumerate() {
        assert_eq!(results[&format!("b{i}")]["botId"], *bot);
    }
    let mut paths: Vec<String> = env.jelou.seen().into_iter().map(|s| s.path).collect();
    paths.sort();
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(paths, want);
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_without_success_is_rejected_and_never_resent() {
    let env = TestEnv::new("bad2xx").await;
    env.jelou.always(Reply::json(
        200,
        json!({"success": false, "messageId": "m"}),
    ));
    env.declare().await;
    let job = text_job("j-2xx", "B");
    env.publish(&job).await;
    let worker = env.start_worker();
    let r = env.result().await;
    let body = r.json();
    assert_eq!(r.routing_key, "failure");
    assert_eq!(body["status"], "failure");
    assert_eq!(body["messageId"], serde_json::Value::Null);
    assert_eq!(body["attempts"], 1);
    assert_eq!(body["error"]["kind"], "rejected");
    assert_eq!(body["error"]["httpStatus"], 200);
    assert_eq!(env.jelou.count(), 1);
    // The failed job's original body is kept in the dead-letter queue.
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].json(), job);
    assert_eq!(
        dead[0].header_str("x-jelou-error-kind").as_deref(),
        Some("rejected")
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_statuses_are_retried_until_success() {
    let env = TestEnv::new("retryable").await;
    // 408, 429, 500, then success: 4 attempts, max_attempts 4.
    env.jelou.set_handler(|_, n| match n {
        1 => Reply::status(408),
        2 => Reply::status(429),
        3 => Reply::json(500, json!({"message": "boom"})),
        _ => Reply::Success,
    });
    env.declare().await;
    env.publish(&text_job("j-retry", "B")).await;
    let worker = env.start_worker();
    let body = env.result().await.json();
    assert_eq!(body["status"], "success", "{body}");
    assert_eq!(body["attempts"], 4);
    assert_eq!(env.jelou.count(), 4);
    assert!(env.dead_letters().await.is_empty());
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_4xx_are_rejected_at_once_with_jelous_code() {
    let env = TestEnv::new("reject4xx").await;
    env.declare().await;
    let statuses = [400u16, 401, 403, 404, 422, 302];
    for s in statuses {
        env.publish(&text_job(&format!("s{s}"), &format!("bot{s}")))
            .await;
    }
    env.jelou.set_handler(|seen, _| {
        let status: u16 = seen.path.trim_start_matches("/v1/bots/bot").trim_end_matches("/messages").parse().unwrap();
        match status {
            422 => Reply::json(422, json!({"message": ["userId is invalid", "text too long"], "error": {"key": "validation_error"}})),
            302 => Reply::status(302).with_header("location", "http://evil.example/steal"),
            s => Reply::json(s, json!({"message": "no", "error": {"code": format!("E{s}")}})),
        }
    });
    let mut settings = env.settings.clone();
    settings.jelou.circuit_failure_threshold = 0;
    // All six are sent before the 401 opens the credentials circuit: the worker takes
    // them straight from the jobs queue (order off), with no router hop in between.
    settings.order.enabled = false;
    let worker = env.start_worker_with(settings);
    let results = by_job_id(&env.results(statuses.len(), WAIT).await);
    for s in statuses {
        let r = &results[&format!("s{s}")];
        assert_eq!(r["error"]["kind"], "rejected", "{s}: {r}");
        assert_eq!(r["error"]["httpStatus"], s);
        assert_eq!(r["attempts"], 1);
    }
    assert_eq!(results["s400"]["error"]["code"], "E400");
    assert_eq!(results["s422"]["error"]["code"], "validation_error");
    assert!(
        results["s422"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("userId is invalid; text too long")
    );
    assert_eq!(results["s302"]["error"]["code"], serde_json::Value::Null);
    // (A 401 also opens the credentials circuit, whose probe posts `{}`: not a message.)
    let sends = env
        .jelou
        .seen()
        .iter()
        .filter(|s| &s.body[..] != b"{}")
        .count();
    assert_eq!(sends, statuses.len(), "no retry, no redirect followed");
    assert_eq!(env.dead_letters().await.len(), statuses.len());
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_5xx_exhausts_max_attempts() {
    let env = TestEnv::new("exhaust").await;
    env.jelou.always(Reply::json(
        503,
        json!({"message": "down", "error": {"code": "UNAVAILABLE"}}),
    ));
    env.declare().await;
    env.publish(&text_job("j-exhaust", "B")).await;
    let worker = env.start_worker();
    let body = env.result().await.json();
    assert_eq!(body["error"]["kind"], "retries_exhausted", "{body}");
    assert_eq!(body["attempts"], 4);
    assert_eq!(body["error"]["httpStatus"], 503);
    assert_eq!(body["error"]["code"], "UNAVAILABLE");
    assert_eq!(env.jelou.count(), 4, "exactly max_attempts requests");
    assert_eq!(env.dead_letters().await.len(), 1);
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_and_timeouts_are_retried() {
    let env = TestEnv::new("transport").await;
    // Timeouts: the stand-in answers after the request timeout, then promptly.
    env.jelou.set_handler(|_, n| {
        if n <= 2 {
            Reply::Success.after(Duration::from_millis(1500))
        } else {
            Reply::Success
        }
    });
    let mut settings = env.settings.clone();
    settings.jelou.request_timeout_ms = 300;
    env.declare().await;
    env.publish(&text_job("j-timeout", "B")).await;
    let worker = env.start_worker_with(settings.clone());
    let body = env.result().await.json();
    assert_eq!(body["status"], "success", "{body}");
    assert_eq!(body["attempts"], 3);
    worker.stop().await.unwrap();

    // Connection refused: nothing listens on the port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    settings.jelou.base_url = format!("http://{closed}");
    env.publish(&text_job("j-refused", "B")).await;
    let worker = env.start_worker_with(settings);
    let body = env.result().await.json();
    assert_eq!(body["error"]["kind"], "retries_exhausted", "{body}");
    assert_eq!(body["attempts"], 4);
    assert_eq!(body["error"]["httpStatus"], serde_json::Value::Null);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("connect"),
        "{body}"
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_a_minimum_wait_beyond_max_interval() {
    let env = TestEnv::new("retryafter").await;
    env.jelou.set_handler(|_, n| {
        if n == 1 {
            Reply::status(429).with_header("retry-after", "2")
        } else {
            Reply::Success
        }
    });
    env.declare().await;
    env.publish(&text_job("j-ra", "B")).await;
    let worker = env.start_worker();
    let body = env.result().await.json();
    assert_eq!(body["status"], "success");
    assert_eq!(body["attempts"], 2);
    let seen = env.jelou.seen();
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= Duration::from_millis(1950),
        "second attempt only {gap:?} after a Retry-After of 2 s"
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_elapsed_gives_up_at_once_instead_of_a_pointless_wait() {
    let env = TestEnv::new("elapsed").await;
    env.jelou
        .always(Reply::status(503).with_header("retry-after", "30"));
    let mut settings = env.settings.clone();
    settings.retry.max_elapsed_ms = 10_000;
    settings.retry.max_attempts = 10;
    env.declare().await;
    env.publish(&text_job("j-elapsed", "B")).await;
    let started = Instant::now();
    let worker = env.start_worker_with(settings);
    let body = env.result().await.json();
    assert_eq!(body["error"]["kind"], "retries_exhausted", "{body}");
    assert_eq!(body["attempts"], 1);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it waited for nothing"
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_get_invalid_job_and_go_to_the_dead_letter_queue() {
    let env = TestEnv::new("invalid").await;
    let mut settings = env.settings.clone();
    settings.amqp.max_job_bytes = 1000;
    env.declare().await;
    let cases: Vec<(Vec<u8>, BasicProperties)> = vec![
        (b"not json at all".to_vec(), BasicProperties::default().with_message_id("m-notjson".into())),
        (br#"{"jobId":"j-nobot","message":{"type":"text","userId":"u"}}"#.to_vec(), BasicProperties::default()),
        (br#"{"jobId":"j-nouser","botId":"B","message":{"type":"text"}}"#.to_vec(), BasicProperties::default()),
        (br#"{"jobId":"j-deadline","botId":"B","message":{"type":"text","userId":"u"},"deadline":"soon"}"#.to_vec(), BasicProperties::default()),
        (format!(r#"{{"jobId":"j-big","botId":"B","message":{{"type":"text","userId":"u","text":"{}"}}}}"#, "x".repeat(2000)).into_bytes(), BasicProperties::default().with_message_id("m-big".into())),
        (b"\xff\xfe\x00".to_vec(), BasicProperties::default()),
    ];
    for (body, props) in &cases {
        env.publish_raw(body, props.clone()).await;
    }
    // The worker keeps running: a valid job after them still succeeds.
    env.publish(&text_job("j-valid", "B")).await;
    let worker = env.start_worker_with(settings);
    let results = env.results(cases.len() + 1, WAIT).await;
    let by_id = by_job_id(&results);
    assert_eq!(by_id["j-valid"]["status"], "success");
    for id in ["m-notjson", "j-nobot", "j-nouser", "j-deadline", "m-big"] {
        let r = &by_id[id];
        assert_eq!(r["error"]["kind"], "invalid_job", "{id}: {r}");
        assert_eq!(r["attempts"], 0);
        assert_eq!(r["error"]["httpStatus"], serde_json::Value::Null);
    }
    assert_eq!(by_id["j-nouser"]["botId"], "B");
    assert_eq!(by_id["j-nobot"]["botId"], serde_json::Value::Null);
    assert!(
        by_id["j-nobot"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("botId")
    );
    assert!(
        by_id["m-big"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_job_bytes")
    );
    assert_eq!(env.jelou.count(), 1, "invalid jobs are never sent");
    // Every invalid job's original body is in the dead-letter queue, untouched.
    let mut dead: Vec<Vec<u8>> = env
        .dead_letters()
        .await
        .into_iter()
        .map(|d| d.body)
        .collect();
    let mut want: Vec<Vec<u8>> = cases.into_iter().map(|(b, _)| b).collect();
    dead.sort();
    want.sort();
    assert_eq!(dead, want);
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_id_and_correlation_id_rules() {
    let env = TestEnv::new("ids").await;
    env.declare().await;
    let no_id = json!({"botId": "B", "message": {"type": "text", "userId": "u", "text": "Hi"}});
    // 1. jobId in the body wins; the job's correlation_id is echoed.
    env.publish_raw(
        text_job("body-id", "B").to_string().as_bytes(),
        BasicProperties::default()
            .with_message_id("ignored".into())
            .with_correlation_id("corr-1".into()),
    )
    .await;
    // 2. No jobId: the AMQP message_id.
    env.publish_raw(
        no_id.to_string().as_bytes(),
        BasicProperties::default().with_message_id("from-mid".into()),
    )
    .await;
    // 3. Neither: a generated UUID, used as correlation_id too.
    env.publish_raw(no_id.to_string().as_bytes(), BasicProperties::default())
        .await;
    let worker = env.start_worker();
    let results = env.results(3, WAIT).await;
    let find = |id: &str| results.iter().find(|r| r.json()["jobId"] == id).cloned();
    let r1 = find("body-id").expect("body jobId used");
    assert_eq!(r1.correlation_id().as_deref(), Some("corr-1"));
    assert_eq!(r1.header_str("x-job-id").as_deref(), Some("body-id"));
    let r2 = find("from-mid").expect("message_id used");
    assert_eq!(r2.correlation_id().as_deref(), Some("from-mid"));
    let r3 = results
        .iter()
        .find(|r| r.json()["jobId"] != "body-id" && r.json()["jobId"] != "from-mid")
        .unwrap();
    let generated = r3.json()["jobId"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
    assert_eq!(r3.correlation_id(), Some(generated.clone()));
    assert_eq!(r3.header_str("x-job-id"), Some(generated));
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_expire_jobs_not_yet_sent_or_waiting_to_retry() {
    let env = TestEnv::new("deadline").await;
    env.jelou.always(Reply::status(503));
    let mut settings = env.settings.clone();
    settings.retry.initial_interval_ms = 1_000;
    settings.retry.max_interval_ms = 1_000;
    settings.retry.max_attempts = 100;
    env.declare().await;
    let mut past = text_job("j-past", "B");
    past["deadline"] = json!("2020-01-01T00:00:00Z");
    env.publish(&past).await;
    let mut soon = text_job("j-soon", "B");
    soon["deadline"] = json!((chrono::Utc::now() + chrono::Duration::seconds(3)).to_rfc3339());
    env.publish(&soon).await;
    let worker = env.start_worker_with(settings);
    let results = by_job_id(&env.results(2, WAIT).await);
    assert_eq!(results["j-past"]["error"]["kind"], "expired");
    assert_eq!(results["j-past"]["attempts"], 0);
    assert_eq!(
        results["j-past"]["error"]["httpStatus"],
        serde_json::Value::Null
    );
    let soon = &results["j-soon"];
    assert_eq!(soon["error"]["kind"], "expired", "{soon}");
    assert!(soon["attempts"].as_u64().unwrap() >= 1);
    assert_eq!(soon["error"]["httpStatus"], 503);
    // No attempt started after the deadline.
    assert_eq!(env.jelou.count(), soon["attempts"].as_u64().unwrap());
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_jobs_run_concurrently_up_to_prefetch() {
    let env = TestEnv::new("concurrency").await;
    let latency = Duration::from_millis(1000);
    env.jelou.always(Reply::Success.after(latency));
    env.declare().await;
    let n = 30;
    for i in 0..n {
        // Thirty users: one user's jobs are sent one at a time (per-user order).
        let mut job = text_job(&format!("c{i}"), "B");
        job["message"]["userId"] = format!("5939{i:08}").into();
        env.publish(&job).await;
    }
    let started = Instant::now();
    let worker = env.start_worker();
    let results = env.results(n, WAIT).await;
    let took = started.elapsed();
    assert_eq!(by_job_id(&results).len(), n);
    // 30 jobs of 1 s each with prefetch 32: about one latency, far from the 30 s sum.
    assert!(
        took < latency * 4,
        "30 slow jobs took {took:?}: they were not concurrent"
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_result_still_acks_the_job_and_never_resends_it() {
    let env = TestEnv::new("unroutable").await;
    env.declare().await;
    // Unbind the collector: results have nowhere to go.
    env.channel
        .queue_unbind(
            env.results_queue.as_str().into(),
            env.settings.amqp.result_exchange.as_str().into(),
            "#".into(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    env.publish(&text_job("j-lost-result", "B")).await;
    let worker = env.start_worker();
    assert!(env.jelou.wait_for(1, WAIT).await);
    // Stopping lets the job finish; had it not been acked, closing the connection
    // would put it back in the queue.
    worker.stop().await.unwrap();
    assert_eq!(
        env.message_count(&env.settings.amqp.jobs_queue).await,
        0,
        "the job was not acked"
    );
    assert_eq!(env.jelou.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_with_other_arguments_fails_the_start_naming_the_key() {
    let env = TestEnv::new("mismatch").await;
    // A producer declared the jobs queue as classic, without the dead-letter exchange.
    env.channel
        .queue_declare(
            env.settings.amqp.jobs_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let worker = env.start_worker();
    let err = tokio::time::timeout(WAIT, worker.handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains(&env.settings.amqp.jobs_queue), "{text}");
    assert!(text.contains("amqp.queue_type"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_declaring_the_worker_names_what_is_missing() {
    let env = TestEnv::new("nodeclare").await;
    let mut settings = env.settings.clone();
    settings.amqp.declare_topology = false;
    let worker = env.start_worker_with(settings);
    let err = tokio::time::timeout(WAIT, worker.handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!("queue `{}`", env.settings.amqp.jobs_queue)),
        "{text}"
    );
    assert!(
        text.contains(&format!("queue `{}`", env.settings.amqp.dead_letter_queue)),
        "{text}"
    );
    assert!(text.contains("declare_topology"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_waits_park_the_job_on_a_delay_queue() {
    let env = TestEnv::new("park").await;
    env.jelou.set_handler(|_, n| {
        if n == 1 {
            Reply::status(503).with_header("retry-after", "2")
        } else {
            Reply::Success
        }
    });
    let mut settings = env.settings.clone();
    settings.retry.park_threshold_ms = 1_000;
    // Delay queues are where an unordered worker parks; an ordered one uses its
    // partition's wait queue (see the order module's tests).
    settings.order.enabled = false;
    let mut env = env;
    env.settings = settings.clone();
    env.declare().await;
    env.publish(&text_job("j-park", "B")).await;
    let worker = env.start_worker_with(settings);
    assert!(env.jelou.wait_for(1, WAIT).await);
    // While it waits, the job sits in a delay queue, holding no prefetch slot.
    let delay_queue = format!("{}.delay.2s", env.settings.amqp.jobs_queue);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut parked = false;
    while Instant::now() < deadline && !parked {
        parked = env.message_count(&delay_queue).await == 1;
    }
    assert!(parked, "the job was not parked in {delay_queue}");
    let body = env.result().await.json();
    assert_eq!(body["status"], "success");
    assert_eq!(body["attempts"], 2, "the attempt count survives parking");
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_queues_work_too() {
    let env = TestEnv::with_queue_type("classic", jelou_worker::config::QueueType::Classic).await;
    env.declare().await;
    env.publish(&text_job("j-classic", "B")).await;
    let worker = env.start_worker();
    let body = env.result().await.json();
    assert_eq!(body["status"], "success");
    worker.stop().await.unwrap();
}
