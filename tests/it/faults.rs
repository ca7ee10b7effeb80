//! Faults, caused for real: the worker process killed with SIGKILL, its broker
//! connection closed by the broker, signals, a stand-in Jelou that fails on cue,
//! poison jobs, two workers on one queue. Each test checks that nothing was lost:
//! every job ends with a result, and Jelou saw no more requests than allowed.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::utils::*;
use jelou_worker::{config::QueueType, stand_in::Reply};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn duplicates(by_id: &HashMap<String, Vec<Value>>) -> usize {
    by_id.values().map(|v| v.len() - 1).sum()
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Requests that carried a message (the circuit's probes post `{}`).
fn sends(env: &TestEnv) -> usize {
    env.jelou
        .seen()
        .iter()
        .filter(|s| &s.body[..] != b"{}")
        .count()
}

/// Publishes `n` jobs, starts `workers` worker processes, kills one (kill -9) once
/// Jelou has seen `kill_after` requests (starting a replacement when it was the only
/// one), and checks that every job got a result, with duplicates (results and sends)
/// bounded by what the killed worker had in flight.
async fn kill_one_worker(name: &str, workers: usize, n: usize, kill_after: u64) {
    let mut env = TestEnv::new(name).await;
    let prefetch = 16;
    env.settings.amqp.prefetch = prefetch;
    env.jelou
        .always(Reply::Success.after(Duration::from_millis(100)));
    env.declare().await;
    let jobs = ids(name, n);
    for id in &jobs {
        env.publish(&text_job(id, "B")).await;
    }
    let mut daemons = Vec::new();
    for _ in 0..workers {
        daemons.push(Daemon::start(&env.settings).await);
    }
    assert!(env.jelou.wait_for(kill_after, WAIT).await);
    daemons.remove(0).kill().await;
    if daemons.is_empty() {
        daemons.push(Daemon::start(&env.settings).await);
    }
    let mut by_id = results_for(&env, &jobs, WAIT).await;
    for d in &mut daemons {
        d.signal("TERM");
        assert_eq!(d.exit_code(WAIT).await, Some(0));
    }
    drain_rest(&env, &mut by_id).await;
    assert_eq!(by_id.len(), jobs.len());
    assert!(by_id.values().flatten().all(|r| r["status"] == "success"));
    let prefetch = prefetch as usize;
    assert!(
        duplicates(&by_id) <= prefetch,
        "{} duplicate results",
        duplicates(&by_id)
    );
    assert!(
        sends(&env) <= jobs.len() + prefetch,
        "{} sends for {} jobs",
        sends(&env),
        jobs.len()
    );
    assert_eq!(env.message_count(&env.settings.amqp.jobs_queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_loses_no_job_and_no_result() {
    kill_one_worker("kill9", 1, 80, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_queue_and_survive_one_being_killed() {
    kill_one_worker("twoworkers", 2, 150, 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_state_survives_a_kill_while_the_job_is_parked() {
    let mut env = TestEnv::new("parkkill").await;
    // The unordered path: what is checked here lives on the jobs, retry and delay
    // queues (order on has its own tests in `order`).
    env.settings.order.enabled = false;
    env.jelou
        .always(Reply::json(503, json!({"message": "down"})));
    env.settings.retry.initial_interval_ms = 2_000;
    env.settings.retry.multiplier = 1.0;
    env.settings.retry.max_interval_ms = 2_000;
    env.settings.retry.max_attempts = 3;
    env.settings.retry.park_threshold_ms = 1_000;
    env.settings.jelou.circuit_failure_threshold = 0;
    env.declare().await;
    env.publish(&text_job("p-1", "B")).await;
    let first = Daemon::start(&env.settings).await;
    assert!(env.jelou.wait_for(1, WAIT).await);
    // Wait until the job sits in a delay queue, then kill the worker.
    let delay_queues: Vec<String> = [1, 2]
        .iter()
        .map(|s| format!("{}.delay.{s}s", env.settings.amqp.jobs_queue))
        .collect();
    eventually("the job to be parked", WAIT, || async {
        let mut parked = 0;
        for q in &delay_queues {
            parked += env.message_count(q).await;
        }
        parked == 1
    })
    .await;
    first.kill().await;
    let mut second = Daemon::start(&env.settings).await;
    let r = env.result().await.json();
    assert_eq!(r["error"]["kind"], "retries_exhausted", "{r}");
    assert_eq!(r["attempts"], 3, "attempts counted across the kill");
    assert_eq!(
        env.jelou.count(),
        3,
        "max_attempts was not reset by the crash"
    );
    second.signal("TERM");
    assert_eq!(second.exit_code(WAIT).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_broker_connection_is_rebuilt_and_work_resumes() {
    let mut env = TestEnv::new("reconnect").await;
    env.jelou
        .always(Reply::Success.after(Duration::from_millis(100)));
    env.declare().await;
    let jobs = ids("r", 60);
    for id in &jobs {
        env.publish(&text_job(id, "B")).await;
    }
    env.settings.amqp.prefetch = 8;
    let mut daemon = Daemon::start(&env.settings).await;
    assert!(env.jelou.wait_for(10, WAIT).await);
    let closed = close_connections_of(daemon.pid());
    assert!(closed >= 1, "no broker connection found for the worker");
    // The supervisor reconnects: a second connection, consuming again.
    eventually("a reconnect", WAIT, || async {
        daemon.metric("jelou_worker_broker_connects_total").await == Some(2.0)
    })
    .await;
    daemon.wait_ready(true, WAIT).await;
    let mut by_id = results_for(&env, &jobs, WAIT).await;
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(WAIT).await, Some(0));
    drain_rest(&env, &mut by_id).await;
    assert_eq!(by_id.len(), jobs.len());
    assert!(duplicates(&by_id) <= 8, "{} duplicates", duplicates(&by_id));
    assert!(
        daemon.log_text().contains("lost the broker; reconnecting"),
        "{}",
        daemon.log_text()
    );
}

/// The rows of `rabbitmqctl -q list_<what> --no-table-headers <columns>`, split on tabs.
fn rabbitmqctl_list(what: &str, columns: &[&str]) -> Vec<Vec<String>> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", &format!("list_{what}"), "--no-table-headers"])
        .args(columns)
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

/// Closes the broker connections of process `pid` (by the name the worker gives
/// them); how many it closed.
fn close_connections_of(pid: u32) -> usize {
    let mut closed = 0;
    let name = format!(
        "{{\"connection_name\",\"jelou-worker {} pid {pid}\"}}",
        jelou_worker::worker::hostname()
    );
    for row in rabbitmqctl_list("connections", &["pid", "client_properties"]) {
        if !row.iter().any(|column| column.contains(&name)) {
            continue;
        }
        let status = std::process::Command::new("rabbitmqctl")
            .args([
                "-q",
                "close_connection",
                &row[0],
                "test closes the connection",
            ])
            .status()
            .unwrap();
        assert!(status.success());
        closed += 1;
    }
    closed
}

/// Deliveries of `queue` the broker holds unacknowledged.
fn unacked(queue: &str) -> Option<u64> {
    rabbitmqctl_list("queues", &["name", "messages_unacknowledged"])
        .into_iter()
        .find(|row| row[0] == queue)
        .and_then(|row| row.get(1)?.trim().parse().ok())
}

/// Acks are coalesced into `multiple` acks (src/acks.rs): the jobs that finished
/// behind a slow one must be acked (not redelivered after a crash), and the slow one
/// must not be covered by their acks (it would be lost in the crash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_acked_around_a_running_one_which_is_not() {
    let mut env = TestEnv::new("acks").await;
    // The unordered path: what is checked here lives on the jobs, retry and delay
    // queues (order on has its own tests in `order`).
    env.settings.order.enabled = false;
    let slow = Arc::new(AtomicBool::new(true));
    let slow_now = slow.clone();
    env.jelou
        .set_handler(move |seen, _| match seen.json()["userId"].as_str() {
            Some("slow") if slow_now.load(Ordering::SeqCst) => {
                Reply::Success.after(Duration::from_secs(60))
            }
            _ => Reply::Success,
        });
    env.settings.jelou.request_timeout_ms = 120_000;
    env.declare().await;
    // The slow job gets the lowest delivery tag: every other one is above it.
    let mut first = text_job("acks-slow", "B");
    first["message"]["userId"] = json!("slow");
    env.publish(&first).await;
    let fast = ids("acks-fast", 10);
    for id in &fast {
        env.publish(&text_job(id, "B")).await;
    }
    let daemon = Daemon::start(&env.settings).await;
    let by_id = results_for(&env, &fast, WAIT).await;
    assert_eq!(by_id.len(), fast.len());
    let jobs_queue = env.settings.amqp.jobs_queue.clone();
    eventually("only the slow job unacked", WAIT, || {
        let q = jobs_queue.clone();
        async move { unacked(&q) == Some(1) }
    })
    .await;
    daemon.kill().await;
    // What the broker has back is the slow job alone.
    eventually("the slow job back in the queue", WAIT, || async {
        env.message_count(&jobs_queue).await == 1
    })
    .await;
    slow.store(false, Ordering::SeqCst);
    let mut next = Daemon::start(&env.settings).await;
    let r = env.result().await.json();
    assert_eq!(
        (r["jobId"].as_str(), r["status"].as_str()),
        (Some("acks-slow"), Some("success"))
    );
    next.signal("TERM");
    assert_eq!(next.exit_code(WAIT).await, Some(0));
    assert_eq!(env.message_count(&jobs_queue).await, 0);
    assert_eq!(
        sends(&env),
        fast.len() + 2,
        "the fast jobs were sent once each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_readyz_is_503_and_healthz_200() {
    let mut env = TestEnv::new("nobroker").await;
    env.settings.amqp.operation_timeout_ms = 1_000;
    let mut settings = env.settings.clone();
    settings.server.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = command(&settings, &["run"])
        .env(
            "JELOU_WORKER__AMQP__URL",
            format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()),
        )
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let addr = settings.server.listen;
    eventually("/healthz to answer", WAIT, || async {
        http_get(addr, "/healthz").await.map(|r| r.0) == Some(200)
    })
    .await;
    assert_eq!(http_get(addr, "/readyz").await.map(|r| r.0), Some(503));
    // It keeps trying (a daemon outlives a broker outage) and says why.
    eventually("a retry to be logged", WAIT, || async {
        std::fs::read_to_string(log.path())
            .unwrap_or_default()
            .contains("broker unavailable; retrying")
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "the worker gave up");
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().unwrap().to_string())
        .status();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_jobs_and_hands_back_waiting_ones() {
    let mut env = TestEnv::new("sigterm").await;
    // The unordered path: what is checked here lives on the jobs, retry and delay
    // queues (order on has its own tests in `order`).
    env.settings.order.enabled = false;
    env.jelou
        .set_handler(|seen, _| match seen.json()["userId"].as_str() {
            Some("slow") => Reply::Success.after(Duration::from_millis(1500)),
            _ => Reply::status(503),
        });
    env.settings.retry.initial_interval_ms = 3_000;
    env.settings.retry.multiplier = 1.0;
    env.settings.retry.max_interval_ms = 3_000;
    env.settings.retry.park_threshold_ms = 10_000;
    env.settings.jelou.circuit_failure_threshold = 0;
    env.declare().await;
    let mut slow = text_job("t-slow", "B");
    slow["message"]["userId"] = json!("slow");
    env.publish(&slow).await;
    env.publish(&text_job("t-waiting", "B")).await;
    let mut daemon = Daemon::start(&env.settings).await;
    assert!(
        env.jelou.wait_for(2, WAIT).await,
        "both jobs were sent once"
    );
    let started = std::time::Instant::now();
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(WAIT).await, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the waiting job held up shutdown"
    );
    // The in-flight job finished and published its result, and its ack went out
    // before the connection closed: nothing is left in the jobs queue.
    assert_eq!(env.message_count(&env.settings.amqp.jobs_queue).await, 0);
    let r = env.result().await.json();
    assert_eq!(
        (r["jobId"].as_str(), r["status"].as_str()),
        (Some("t-slow"), Some("success"))
    );
    // The waiting one is back on the broker with its attempt count.
    let retry_queue = format!("{}.retry", env.settings.amqp.jobs_queue);
    let back = env.drain(&retry_queue).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].json()["jobId"], "t-waiting");
    assert_eq!(
        back[0].header("x-jelou-attempts"),
        Some(lapin::types::AMQPValue::LongLongInt(1))
    );
    // Put it back and let a new worker finish it: attempts go on from 1.
    env.jelou.always(Reply::Success);
    env.channel
        .basic_publish(
            "".into(),
            retry_queue.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            &back[0].body,
            back[0].properties.clone(),
        )
        .await
        .unwrap();
    let mut next = Daemon::start(&env.settings).await;
    let r = env.result().await.json();
    assert_eq!(
        (r["jobId"].as_str(), r["attempts"].as_u64()),
        (Some("t-waiting"), Some(2))
    );
    next.signal("TERM");
    assert_eq!(next.exit_code(WAIT).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_the_job_returns_to_the_queue() {
    let mut env = TestEnv::new("sigtwice").await;
    // The unordered path: what is checked here lives on the jobs, retry and delay
    // queues (order on has its own tests in `order`).
    env.settings.order.enabled = false;
    env.jelou
        .always(Reply::Success.after(Duration::from_secs(60)));
    env.settings.jelou.request_timeout_ms = 120_000;
    env.settings.shutdown.grace_period_ms = 120_000;
    env.declare().await;
    env.publish(&text_job("s-1", "B")).await;
    let mut daemon = Daemon::start(&env.settings).await;
    assert!(env.jelou.wait_for(1, WAIT).await);
    daemon.signal("TERM");
    daemon.wait_ready(false, WAIT).await;
    let started = std::time::Instant::now();
    daemon.signal("INT");
    assert_eq!(daemon.exit_code(WAIT).await, Some(130));
    assert!(started.elapsed() < Duration::from_secs(5));
    eventually("the job to be back in the queue", WAIT, || async {
        env.message_count(&env.settings.amqp.jobs_queue).await == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_opens_the_circuit_instead_of_burning_the_backlog() {
    let mut env = TestEnv::new("circuit").await;
    // Thirty jobs of one user in flight at once (order off): with order on they go
    // one at a time, and the first exhausts its attempts before the threshold.
    env.settings.order.enabled = false;
    let down = Arc::new(AtomicBool::new(true));
    let flag = down.clone();
    env.jelou.set_handler(move |_, _| {
        if flag.load(Ordering::SeqCst) {
            Reply::status(503)
        } else {
            Reply::Success
        }
    });
    env.settings.amqp.prefetch = 4;
    env.settings.retry.max_attempts = 3;
    env.settings.retry.max_elapsed_ms = 120_000;
    env.settings.jelou.circuit_failure_threshold = 3;
    env.settings.jelou.circuit_probe_interval_ms = 200;
    env.settings.jelou.circuit_max_probe_interval_ms = 400;
    env.declare().await;
    let jobs = ids("o", 30);
    for id in &jobs {
        env.publish(&text_job(id, "B")).await;
    }
    let mut daemon = Daemon::start(&env.settings).await;
    eventually("the circuit to open", WAIT, || async {
        daemon.metric("jelou_worker_circuit_state").await == Some(1.0)
    })
    .await;
    // While it is open only probes reach Jelou.
    let during = sends(&env);
    assert!(
        env.jelou.wait_for(env.jelou.count() + 2, WAIT).await,
        "it keeps probing"
    );
    assert_eq!(
        sends(&env),
        during,
        "messages were sent while the circuit was open"
    );
    assert!(during <= 4 + 3, "{during} sends before the circuit opened");
    down.store(false, Ordering::SeqCst);
    let by_id = results_for(&env, &jobs, WAIT).await;
    assert!(
        by_id.values().flatten().all(|r| r["status"] == "success"),
        "the outage failed jobs: {by_id:?}"
    );
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(WAIT).await, Some(0));
    let log = daemon.log_text();
    assert!(
        log.contains("circuit open") && log.contains("circuit closed"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_fail_one_job_then_pause_until_they_work() {
    let mut env = TestEnv::new("creds").await;
    let revoked = Arc::new(AtomicBool::new(true));
    let flag = revoked.clone();
    env.jelou.set_handler(move |_, _| {
        if flag.load(Ordering::SeqCst) {
            Reply::json(401, json!({"message": "invalid credentials"}))
        } else {
            Reply::Success
        }
    });
    env.settings.amqp.prefetch = 1;
    env.settings.jelou.circuit_probe_interval_ms = 200;
    env.settings.jelou.circuit_max_probe_interval_ms = 400;
    env.declare().await;
    let jobs = ids("c", 6);
    for id in &jobs {
        env.publish(&text_job(id, "B")).await;
    }
    let mut daemon = Daemon::start(&env.settings).await;
    let first = env.result().await.json();
    assert_eq!(first["jobId"], "c-0");
    assert_eq!(first["error"]["kind"], "rejected");
    assert_eq!(first["error"]["httpStatus"], 401);
    eventually("the credentials pause", WAIT, || async {
        daemon.metric("jelou_worker_circuit_state").await == Some(2.0)
    })
    .await;
    assert!(
        env.jelou.wait_for(env.jelou.count() + 2, WAIT).await,
        "it keeps probing"
    );
    assert_eq!(
        sends(&env),
        1,
        "the backlog was sent with refused credentials"
    );
    revoked.store(false, Ordering::SeqCst);
    let by_id = results_for(&env, &jobs[1..], WAIT).await;
    for id in &jobs[1..] {
        assert_eq!(by_id[id][0]["status"], "success", "{id}");
    }
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(WAIT).await, Some(0));
    assert!(
        daemon.log_text().contains("jelou.client_secret"),
        "the log tells the operator what to fix"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_its_bot_and_the_rate_limit_spaces_sends() {
    let env = TestEnv::new("ratelimit").await;
    let limited = Arc::new(AtomicBool::new(false));
    env.jelou.set_handler(move |seen, _| {
        if seen.path.contains("/bots/A/") && !limited.swap(true, Ordering::SeqCst) {
            Reply::status(429).with_header("retry-after", "2")
        } else {
            Reply::Success
        }
    });
    env.declare().await;
    env.publish(&text_job("a-0", "A")).await;
    let mut daemon = Daemon::start(&env.settings).await;
    // Once the 429 has been handled (its retry scheduled), more jobs for both bots.
    // (Its retry waits in the retry queue with order off, in its partition's wait
    // queue with order on.)
    eventually("the 429 to be handled", WAIT, || async {
        let mut scheduled = 0.0;
        for mode in ["retry_queue", "wait_queue"] {
            let name = format!(r#"jelou_worker_retries_scheduled_total{{mode="{mode}"}}"#);
            scheduled += daemon.metric(&name).await.unwrap_or(0.0);
        }
        scheduled == 1.0
    })
    .await;
    for i in 1..4 {
        env.publish(&text_job(&format!("a-{i}"), "A")).await;
        env.publish(&text_job(&format!("b-{i}"), "Bb")).await;
    }
    env.results(7, WAIT).await;
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(WAIT).await, Some(0));
    let seen = env.jelou.seen();
    let limited_at = seen
        .iter()
        .find(|s| s.path.contains("/bots/A/"))
        .unwrap()
        .at;
    for s in seen.iter().filter(|s| s.path.contains("/bots/A/")).skip(1) {
        assert!(
            s.at - limited_at >= Duration::from_millis(1950),
            "bot A sent {:?} after its 429",
            s.at - limited_at
        );
    }
    let b_first = seen
        .iter()
        .find(|s| s.path.contains("/bots/Bb/"))
        .unwrap()
        .at;
    assert!(
        b_first - limited_at < Duration::from_millis(1500),
        "bot Bb was held up by bot A's 429"
    );

    // A per-bot rate limit of 5/s spaces 8 sends over at least 7 intervals of 200 ms.
    let mut env2 = TestEnv::new("ratelimit2").await;
    env2.settings.jelou.rate_limit_per_second = 5.0;
    env2.declare().await;
    for i in 0..8 {
        env2.publish(&text_job(&format!("r-{i}"), "C")).await;
    }
    let worker = env2.start_worker_with(env2.settings.clone());
    env2.results(8, WAIT).await;
    worker.stop().await.unwrap();
    let seen = env2.jelou.seen();
    let span = seen.last().unwrap().at - seen[0].at;
    assert!(
        span >= Duration::from_millis(1350),
        "8 sends at 5/s took only {span:?}"
    );
}

/// A job that hangs every worker that takes it: the worker is killed each time, and
/// after `amqp.max_deliveries` redeliveries the job ends with `delivery_limit`.
async fn poison(queue_type: QueueType, name: &str) {
    let mut env = TestEnv::with_queue_type(name, queue_type).await;
    // The unordered path: what is checked here lives on the jobs, retry and delay
    // queues (order on has its own tests in `order`).
    env.settings.order.enabled = false;
    env.jelou
        .always(Reply::Success.after(Duration::from_secs(300)));
    env.settings.jelou.request_timeout_ms = 600_000;
    env.settings.amqp.max_deliveries = 2;
    env.declare().await;
    env.publish(&text_job("poison-1", "B")).await;
    let queues = [
        env.settings.amqp.jobs_queue.clone(),
        format!("{}.retry", env.settings.amqp.jobs_queue),
    ];
    for round in 1..=3u64 {
        let daemon = Daemon::start(&env.settings).await;
        assert!(
            env.jelou.wait_for(round, WAIT).await,
            "delivery {round} did not reach Jelou"
        );
        // Kill only once the broker holds one delivery of the job. On a classic queue
        // a redelivery is counted by a copy, confirmed before its original is acked;
        // a kill in that instant leaves both (at least once, as documented), and the
        // copy can reach Jelou first. That window is not what this test is about.
        eventually("the job held in one delivery", WAIT, || async {
            queues.iter().map(|q| unacked(q).unwrap_or(0)).sum::<u64>() == 1
        })
        .await;
        daemon.kill().await;
    }
    let mut daemon = Daemon::start(&env.settings).await;
    let r = env.result().await.json();
    assert_eq!(r["error"]["kind"], "delivery_limit", "{r}");
    assert_eq!(env.jelou.count(), 3, "the poison job was not sent again");
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].json()["jobId"], "poison-1");
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(WAIT).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_jobs_end_with_delivery_limit_on_quorum_queues() {
    poison(QueueType::Quorum, "poisonq").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_jobs_end_with_delivery_limit_on_classic_queues() {
    poison(QueueType::Classic, "poisonc").await;
}
