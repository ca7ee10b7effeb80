//! The gate every attempt passes through before it is sent: it protects Jelou, the
//! WhatsApp number and the backlog.
//!
//! - **Circuit**: after `jelou.circuit_failure_threshold` consecutive outage-like
//!   failures (5xx, 408, no answer), or any 401/403, the circuit opens: no job is
//!   sent, jobs wait (their attempts untouched) and the prober asks Jelou at growing
//!   intervals, without sending a message ([`JelouClient::probe`]), until it answers.
//! - **Per-bot pacing**: `jelou.rate_limit_per_second` spaces the attempts of one bot;
//!   a 429 pauses every attempt for that bot for at least its `Retry-After`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    config::JelouSettings,
    jelou::{JelouClient, Probe},
    metrics::{Metrics, circuit},
    outcome::Attempt,
};

/// Whether attempts may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    /// Jelou keeps failing.
    OpenOutage,
    /// Jelou refuses the credentials.
    OpenCredentials,
}

/// How long a 429 without `Retry-After` pauses its bot.
const DEFAULT_429_PAUSE: Duration = Duration::from_secs(1);
/// Above this many tracked bots, entries whose pause is over are dropped.
const MAX_TRACKED_BOTS: usize = 10_000;

/// Why an attempt may not start yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WaitReason {
    /// Jelou answered 429 for this bot: it is paused until its `Retry-After`.
    BotPause,
    /// `jelou.rate_limit_per_second` spaces this bot's attempts.
    BotPace,
}

impl WaitReason {
    /// The label of the wait metrics and the `x-jelou-wait-reason` header.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitReason::BotPause => "bot_pause",
            WaitReason::BotPace => "bot_pace",
        }
    }
}

/// The gate's answer for one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Start after this wait (at most the bound asked for); the slot is reserved.
    Now(Duration),
    /// Not within the bound: nothing is reserved; ask again after `wait`.
    Later { wait: Duration, reason: WaitReason },
}

/// One bot's pacing and pause.
#[derive(Debug, Clone, Copy)]
struct BotState {
    /// The next attempt's slot under `jelou.rate_limit_per_second`.
    free_at: Instant,
    /// A 429 pauses the bot until here.
    paused_until: Instant,
    /// Where the last job sent away to wait for a pacing slot was told to come back:
    /// the next one comes back a spacing later, so that they return one by one
    /// instead of all at once.
    horizon: Instant,
}

impl BotState {
    fn new(now: Instant) -> Self {
        Self {
            free_at: now,
            paused_until: now,
            horizon: now,
        }
    }

    fn busy_after(&self, now: Instant) -> bool {
        self.free_at.max(self.paused_until).max(self.horizon) > now
    }
}

/// The admission decision for one attempt of a bot, pure (see [`Gate::reserve`]).
fn plan_admission(
    state: &mut BotState,
    now: Instant,
    spacing: Duration,
    bound: Duration,
) -> Admission {
    if state.paused_until > now + bound {
        return Admission::Later {
            wait: state.paused_until - now,
            reason: WaitReason::BotPause,
        };
    }
    let start = state.free_at.max(state.paused_until).max(now);
    if start - now > bound {
        let back_at = state.horizon.max(start);
        state.horizon = back_at + spacing;
        return Admission::Later {
            wait: back_at - now,
            reason: WaitReason::BotPace,
        };
    }
    state.free_at = start + spacing;
    Admission::Now(start - now)
}

pub struct Gate {
    spacing: Option<Duration>,
    /// The longest a 429 may pause a bot: `retry.max_elapsed_ms`, since no job would
    /// wait longer for a retry anyway.
    max_pause: Duration,
    threshold: u32,
    consecutive_outages: AtomicU32,
    bots: Mutex<HashMap<String, BotState>>,
    circuit: watch::Sender<Circuit>,
    /// A bot recently sent to, for the prober's request.
    last_bot: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
}

impl Gate {
    pub fn new(settings: &JelouSettings, max_pause: Duration, metrics: Arc<Metrics>) -> Self {
        let spacing = (settings.rate_limit_per_second > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / settings.rate_limit_per_second));
        Self {
            spacing,
            max_pause,
            threshold: settings.circuit_failure_threshold,
            consecutive_outages: AtomicU32::new(0),
            bots: Mutex::new(HashMap::new()),
            circuit: watch::channel(Circuit::Closed).0,
            last_bot: Mutex::new(None),
            metrics,
        }
    }

    pub fn circuit(&self) -> Circuit {
        *self.circuit.borrow()
    }

    /// Waits until the circuit is closed. Cancel-safe.
    pub async fn circuit_closed(&self) {
        let mut rx = self.circuit.subscribe();
        let _ = rx.wait_for(|c| *c == Circuit::Closed).await;
    }

    /// When may an attempt for `bot` start? A wait of at most `bound` is reserved
    /// (the caller sleeps it out); a longer one is not, and the caller should let the
    /// job wait on the broker (holding no slot another bot needs), then ask again.
    pub fn reserve(&self, bot: &str, bound: Duration) -> Admission {
        let admission = {
            let mut bots = self.bots.lock().expect("not poisoned");
            let now = Instant::now();
            if bots.len() > MAX_TRACKED_BOTS {
                bots.retain(|_, b| b.busy_after(now));
            }
            let state = bots
                .entry(bot.to_string())
                .or_insert_with(|| BotState::new(now));
            plan_admission(state, now, self.spacing.unwrap_or_default(), bound)
        };
        if !matches!(admission, Admission::Now(Duration::ZERO)) {
            self.metrics.rate_limited_waits.inc();
        }
        admission
    }

    /// Learns from an attempt's outcome.
    pub fn report(&self, bot: &str, attempt: &Attempt) {
        *self.last_bot.lock().expect("not poisoned") = Some(bot.to_string());
        let failure = match attempt {
            Attempt::Delivered { .. } => {
                self.consecutive_outages.store(0, Ordering::Relaxed);
                return;
            }
            Attempt::Failed(f) => f,
        };
        if failure.is_rate_limited() {
            let pause = failure
                .retry_after
                .unwrap_or(DEFAULT_429_PAUSE)
                .min(self.max_pause);
            let mut bots = self.bots.lock().expect("not poisoned");
            let now = Instant::now();
            let state = bots
                .entry(bot.to_string())
                .or_insert_with(|| BotState::new(now));
            state.paused_until = state.paused_until.max(now + pause);
            tracing::warn!(
                bot_id = bot,
                pause_ms = pause.as_millis() as u64,
                "Jelou answered 429: pausing this bot"
            );
        }
        if failure.is_auth() {
            self.open(Circuit::OpenCredentials, &failure.message);
        } else if failure.is_outage() {
            let n = self.consecutive_outages.fetch_add(1, Ordering::Relaxed) + 1;
            if self.threshold > 0 && n >= self.threshold {
                self.open(Circuit::OpenOutage, &failure.message);
            }
        } else {
            self.consecutive_outages.store(0, Ordering::Relaxed);
        }
    }

    fn open(&self, state: Circuit, why: &str) {
        let changed = self.circuit.send_if_modified(|c| {
            if *c == Circuit::Closed {
                *c = state;
                true
            } else {
                false
            }
        });
        if !changed {
            return;
        }
        match state {
            Circuit::OpenCredentials => {
                self.metrics.circuit_state.set(circuit::OPEN_CREDENTIALS);
                tracing::error!(
                    reason = why,
                    "Jelou refused the credentials: no more jobs are sent until it accepts them. \
                     Check jelou.client_id and jelou.client_secret (JELOU_WORKER__JELOU__CLIENT_SECRET); \
                     jobs wait in the queue meanwhile"
                );
            }
            _ => {
                self.metrics.circuit_state.set(circuit::OPEN_OUTAGE);
                tracing::warn!(
                    reason = why,
                    failures = self.threshold,
                    "circuit open: Jelou keeps failing; jobs wait in the queue while it is probed"
                );
            }
        }
    }

    fn close(&self) {
        self.consecutive_outages.store(0, Ordering::Relaxed);
        if self.circuit.send_replace(Circuit::Closed) != Circuit::Closed {
            self.metrics.circuit_state.set(circuit::CLOSED);
            tracing::info!("circuit closed: Jelou answers again; sending resumes");
        }
    }

    /// While the circuit is open, probes Jelou at growing intervals and closes the
    /// circuit when it answers with working credentials. Runs until `stop`.
    pub async fn run_prober(
        self: Arc<Self>,
        client: JelouClient,
        settings: JelouSettings,
        stop: CancellationToken,
    ) {
        let first = Duration::from_millis(settings.circuit_probe_interval_ms);
        let max = Duration::from_millis(settings.circuit_max_probe_interval_ms);
        let mut rx = self.circuit.subscribe();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.wait_for(|c| *c != Circuit::Closed) => if r.is_err() { return },
            }
            let mut interval = first;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                let bot = self
                    .last_bot
                    .lock()
                    .expect("not poisoned")
                    .clone()
                    .unwrap_or_else(|| "probe".into());
                match client.probe(&bot).await {
                    Probe::Healthy(_) => {
                        self.close();
                        break;
                    }
                    Probe::BadCredentials(why) => {
                        tracing::error!(
                            reason = why,
                            next_probe_ms = (interval * 2).min(max).as_millis() as u64,
                            "Jelou still refuses the credentials"
                        );
                        if self.circuit() == Circuit::OpenOutage {
                            self.circuit.send_replace(Circuit::OpenCredentials);
                            self.metrics.circuit_state.set(circuit::OPEN_CREDENTIALS);
                        }
                    }
                    Probe::Unreachable(why) => {
                        tracing::warn!(
                            reason = why,
                            next_probe_ms = (interval * 2).min(max).as_millis() as u64,
                            "Jelou still failing"
                        );
                    }
                }
                interval = (interval * 2).min(max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::AttemptFailure;

    fn gate(threshold: u32, rate: f64) -> Gate {
        let settings = JelouSettings {
            circuit_failure_threshold: threshold,
            rate_limit_per_second: rate,
            ..JelouSettings::default()
        };
        Gate::new(
            &settings,
            Duration::from_secs(900),
            Arc::new(Metrics::new()),
        )
    }

    fn status(code: u16, retry_after: Option<Duration>) -> Attempt {
        Attempt::Failed(AttemptFailure {
            retryable: matches!(code, 408 | 429 | 500..=599),
            http_status: Some(code),
            code: None,
            message: format!("HTTP {code}"),
            retry_after,
        })
    }

    #[test]
    fn outages_open_the_circuit_at_the_threshold_and_success_resets() {
        let g = gate(3, 0.0);
        g.report("b", &status(503, None));
        g.report("b", &status(503, None));
        g.report(
            "b",
            &Attempt::Delivered {
                message_id: "m".into(),
            },
        );
        g.report("b", &status(500, None));
        g.report("b", &status(502, None));
        assert_eq!(g.circuit(), Circuit::Closed);
        g.report("b", &Attempt::Failed(AttemptFailure::transport("reset")));
        assert_eq!(g.circuit(), Circuit::OpenOutage);
        g.close();
        assert_eq!(g.circuit(), Circuit::Closed);
    }

    #[test]
    fn verdicts_and_rate_limits_do_not_open_it_but_auth_does() {
        let g = gate(1, 0.0);
        g.report("b", &status(400, None));
        g.report("b", &status(429, None));
        assert_eq!(g.circuit(), Circuit::Closed);
        g.report("b", &status(401, None));
        assert_eq!(g.circuit(), Circuit::OpenCredentials);
        let off = gate(0, 0.0);
        for _ in 0..100 {
            off.report("b", &status(503, None));
        }
        assert_eq!(off.circuit(), Circuit::Closed);
    }

    const BOUND: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spaces_attempts_per_bot() {
        let g = gate(0, 10.0);
        let waits: Vec<_> = (0..5).map(|_| g.reserve("a", BOUND)).collect();
        let ms = |n| Admission::Now(Duration::from_millis(n));
        assert_eq!(waits, [ms(0), ms(100), ms(200), ms(300), ms(400)]);
        assert_eq!(g.reserve("b", BOUND), ms(0));
    }

    #[tokio::test(start_paused = true)]
    async fn pacing_beyond_the_bound_sends_jobs_away_one_spacing_apart() {
        let g = gate(0, 2.0);
        // 2/s with a 1 s bound: three slots within reach (0, 0.5, 1.0 s)...
        for _ in 0..3 {
            assert!(matches!(g.reserve("a", BOUND), Admission::Now(_)));
        }
        // ...the rest come back one by one, from the first free slot on.
        let later: Vec<_> = (0..3).map(|_| g.reserve("a", BOUND)).collect();
        let back = |ms| Admission::Later {
            wait: Duration::from_millis(ms),
            reason: WaitReason::BotPace,
        };
        assert_eq!(later, [back(1500), back(2000), back(2500)]);
        // Coming back at its time, the first is admitted at once.
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(g.reserve("a", BOUND), Admission::Now(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_the_whole_bot_for_its_retry_after() {
        let g = gate(0, 0.0);
        g.report("a", &status(429, Some(Duration::from_secs(7))));
        assert_eq!(
            g.reserve("a", BOUND),
            Admission::Later {
                wait: Duration::from_secs(7),
                reason: WaitReason::BotPause
            }
        );
        assert_eq!(g.reserve("b", BOUND), Admission::Now(Duration::ZERO));
        // Within the bound, the rest of a pause is slept out.
        tokio::time::advance(Duration::from_millis(6500)).await;
        assert_eq!(
            g.reserve("a", BOUND),
            Admission::Now(Duration::from_millis(500))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn circuit_closed_waits_while_the_circuit_is_open() {
        let g = Arc::new(gate(1, 0.0));
        g.report("a", &status(503, None));
        let waiting = tokio::spawn({
            let g = g.clone();
            async move { g.circuit_closed().await }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiting.is_finished());
        g.close();
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
    }
}
