//! The stand-in Jelou with troubles that can be switched on for a while (5xx bursts,
//! 429 for one bot, answers slower than the workers' request timeout, an outage), and
//! a log of every request: which job, when, and how it was answered.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use jelou_worker::stand_in::{Reply, Seen, StandIn};
use serde::Serialize;

/// Text of a message the stand-in rejects (400): `reject <jobId>`.
pub(crate) const REJECT: &str = "reject ";

/// What Jelou does wrong for now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Trouble {
    None,
    /// Most requests get 503.
    Burst503,
    /// One bot's requests get 429 with `Retry-After: 2`.
    Throttle(String),
    /// Half the requests are answered (503) only after the request timeout.
    Slow,
    /// Every request gets 503.
    Outage,
}

/// How a request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// 200, success: the message was delivered.
    Accepted,
    /// 400: a verdict, the message was not delivered and never will be.
    Rejected,
    /// 429, 503, or too late: to be retried.
    Failed,
}

/// One request Jelou received.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub(crate) job: String,
    pub(crate) at: Instant,
    pub(crate) answer: Answer,
}

struct State {
    trouble: Mutex<Trouble>,
    log: Mutex<Vec<Sent>>,
}

pub(crate) struct ChaosJelou {
    pub(crate) stand_in: StandIn,
    state: Arc<State>,
}

impl ChaosJelou {
    pub(crate) async fn start() -> std::io::Result<Self> {
        let stand_in = StandIn::start_on("127.0.0.1:0".parse().expect("valid"), false).await?;
        let state = Arc::new(State {
            trouble: Mutex::new(Trouble::None),
            log: Mutex::new(Vec::new()),
        });
        let s = state.clone();
        stand_in.set_handler(move |seen, _| answer(&s, seen));
        Ok(Self { stand_in, state })
    }

    pub(crate) fn set(&self, trouble: Trouble) {
        *self.state.trouble.lock().expect("not poisoned") = trouble;
    }

    /// Every request so far.
    pub(crate) fn log(&self) -> Vec<Sent> {
        self.state.log.lock().expect("not poisoned").clone()
    }
}

/// The worker posts the job's `message` object as the body: its `text` is
/// `[reject ]<jobId>`.
fn answer(state: &State, seen: &Seen) -> Reply {
    let text = seen.json()["text"].as_str().unwrap_or_default().to_string();
    let (reject, job) = match text.strip_prefix(REJECT) {
        Some(job) => (true, job.to_string()),
        None => (false, text),
    };
    let bot = seen.path.split('/').nth(3).unwrap_or_default().to_string();
    let trouble = state.trouble.lock().expect("not poisoned").clone();
    let failing = match trouble {
        Trouble::None => None,
        Trouble::Burst503 => fastrand::u8(..10).lt(&7).then(|| Reply::status(503)),
        Trouble::Throttle(b) if b == bot => Some(
            Reply::json(429, serde_json::json!({"message": "slow down"}))
                .with_header("retry-after", "2"),
        ),
        Trouble::Throttle(_) => None,
        Trouble::Slow => fastrand::bool().then(|| {
            let late = Duration::from_millis(crate::setup::REQUEST_TIMEOUT_MS + 1_000);
            Reply::status(503).after(late)
        }),
        Trouble::Outage => Some(Reply::status(503)),
    };
    let (reply, answer) = match failing {
        Some(reply) => (reply, Answer::Failed),
        None if reject => (
            Reply::json(
                400,
                serde_json::json!({"message": "chaos says no", "code": "CHAOS"}),
            ),
            Answer::Rejected,
        ),
        None => (
            Reply::Success.after(Duration::from_millis(fastrand::u64(2..40))),
            Answer::Accepted,
        ),
    };
    state.log.lock().expect("not poisoned").push(Sent {
        job,
        at: seen.at,
        answer,
    });
    reply
}
