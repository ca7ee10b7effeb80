//! One partition, as one worker sees it: wait on its lock queue (standby) until the
//! token comes, take over (everything waiting first, then the partition queue), run
//! its jobs through the per-user [`Lanes`], and hand it back when asked.
//!
//! ```text
//! watching the lock ──token──► loading the wait queue ──► owning ──stop / shutdown──► handing back
//! ```
//!
//! The token lives in a queue of its own (`<jobs_queue>.order.<n>.lock`, one consumer
//! active at a time, prefetch 1): a watcher is only ever delivered the token, so it can
//! stop watching at any time, and no worker touches the partition's queues before it
//! holds the token.
//!
//! Handing back: stop taking jobs from the partition queue (what was delivered before
//! the cancel is held too); let the running jobs finish; stop consuming the wait queue;
//! publish every held job to the wait queue, lowest sequence first, and ack the
//! originals; close the partition's channel (nothing is left unacked); then, last,
//! close the lock's, which returns the token. The next owner gets the token only when
//! every job this one held is in the wait queue, and loads them all before it takes a
//! job from the partition queue. (A quorum queue returns what a closed channel held to
//! its back, in any order: that is why nothing is left to the close.)

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    Channel, Consumer,
    message::Delivery,
    options::{BasicAckOptions, BasicCancelOptions},
    types::ShortString,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    Ctx,
    lanes::{Held, Lanes, Left, Move, UserKey},
    lease,
};
use crate::{
    broker::{BrokerError, acks::Acks, bounded, consume::consume},
    job::{RetryState, header, int_header, parse_job_with, string_header},
    pipeline::{self, Ended, WaitPlace, decide},
};

/// What a partition task is doing, for the balancer.
pub(super) const WATCHING: u8 = 0;
pub(super) const OWNING: u8 = 1;
pub(super) const LEAVING: u8 = 2;

/// A started job that left: its user and sequence, and how.
type Done = (Option<UserKey>, u64, Ended);

/// One partition's task.
pub(super) struct Partition {
    pub(super) ctx: Arc<Ctx>,
    pub(super) number: u16,
    /// The lock queue's consumer (the token).
    pub(super) lease: Channel,
    /// The partition and wait queues' consumers, opened on taking over.
    pub(super) channel: Channel,
    pub(super) state: Arc<AtomicU8>,
    /// Cancelled by the balancer: stop watching, or hand the partition back.
    pub(super) stop: CancellationToken,
}

/// An owned partition's moving parts.
struct Owned {
    lanes: Lanes<Delivery>,
    acks: Acks,
    wait: Consumer,
    jobs: Option<Consumer>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// Started jobs not yet left (lanes count only ordered ones).
    running: usize,
    /// What the gauge shows for this partition now.
    shown: HashMap<&'static str, i64>,
}

impl Partition {
    fn wait_queue(&self) -> String {
        self.ctx.shared.topology.wait_queue(self.number)
    }

    fn tag(&self, what: &str) -> String {
        format!("{}-p{}-{what}", self.ctx.tag, self.number)
    }

    /// Runs until stopped or shutdown (`Ok`), or a broker failure (`Err`), and closes
    /// its channels: whatever it still held goes back to the broker, the token last.
    pub(super) async fn run(self) -> Result<(), String> {
        let ran = self.watch_and_own().await;
        let timeout = self.ctx.shared.settings.amqp.operation_timeout();
        let why = if ran.is_ok() {
            "partition handed back"
        } else {
            "partition failed"
        };
        let _ = tokio::time::timeout(timeout, self.channel.close(200, why.into())).await;
        let _ = tokio::time::timeout(timeout, self.lease.close(200, why.into())).await;
        ran
    }

    async fn watch_and_own(&self) -> Result<(), String> {
        let timeout = self.ctx.shared.settings.amqp.operation_timeout();
        let err = |e: BrokerError| e.to_string();
        let lock = self.ctx.shared.topology.lock_queue(self.number);
        let publisher = &self.ctx.session.publisher;
        lease::ensure_token(&self.lease, publisher, &lock, timeout)
            .await
            .map_err(err)?;
        let mut lease = consume(&self.lease, &lock, &self.tag("lock"), 1, timeout)
            .await
            .map_err(err)?;
        let token = loop {
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                _ = self.ctx.stops.shutdown.cancelled() => return Ok(()),
                _ = self.ctx.session.lost.cancelled() => return Err("the session was lost".into()),
                next = lease.next() => match next {
                    Some(Ok(d)) if lease::is_token(&d) => break d,
                    // Nothing else belongs in a lock queue.
                    Some(Ok(d)) => { let _ = d.acker.ack(BasicAckOptions::default()).await; }
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Err(format!("the broker cancelled the consumer of {lock}")),
                },
            }
        };
        self.state.store(OWNING, Ordering::Relaxed);
        let metrics = &self.ctx.shared.metrics.order;
        metrics.partitions_owned.inc();
        let owned = self.own().await;
        let result = match owned {
            Ok(mut owned) => self.work(&mut owned).await,
            Err(e) => Err(e.to_string()),
        };
        metrics.partitions_owned.dec();
        // The token goes back with the lock's channel, closed after this one (`run`).
        drop(token);
        result
    }

    /// Takes the partition over: every job of the wait queue first (those delivered
    /// with or after the token, as many as the queue holds), then the partition queue.
    async fn own(&self) -> Result<Owned, BrokerError> {
        let shared = &self.ctx.shared;
        let timeout = shared.settings.amqp.operation_timeout();
        let (ready, _) = lease::counts(&self.channel, &self.wait_queue(), timeout).await?;
        let wait = consume(
            &self.channel,
            &self.wait_queue(),
            &self.tag("wait"),
            0,
            timeout,
        )
        .await?;
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let order = &shared.settings.order;
        let mut o = Owned {
            lanes: Lanes::new(order.user_min_interval_ms, order.wait_bound_ms),
            acks: Acks::start(self.channel.clone(), self.ctx.session.lost.clone()),
            wait,
            jobs: None,
            done_tx,
            done_rx,
            running: 0,
            shown: HashMap::new(),
        };
        let loading = async {
            for _ in 0..ready {
                match o.wait.next().await {
                    Some(Ok(d)) => self.hold(&mut o, d, true),
                    _ => break,
                }
            }
        };
        if tokio::time::timeout(timeout, loading).await.is_err() {
            tracing::warn!(
                partition = self.number,
                "the wait queue did not deliver all it holds in time; going on"
            );
        }
        let prefetch = shared.settings.amqp.prefetch;
        let queue = shared.topology.partition_queue(self.number);
        o.jobs = Some(consume(&self.channel, &queue, &self.tag("jobs"), prefetch, timeout).await?);
        tracing::info!(partition = self.number, "owning a partition");
        Ok(o)
    }

    /// Runs the partition until stopped, then hands it back.
    async fn work(&self, o: &mut Owned) -> Result<(), String> {
        let end = loop {
            // Stopped by the balancer, or at shutdown once the router has finished
            // (see `order::consume`): not on the shutdown signal itself.
            if self.stop.is_cancelled() {
                break Ok(());
            }
            self.schedule(o).await?;
            let wake = o
                .lanes
                .next_wake(now_ms())
                .map(|t| (t - now_ms()).max(0) as u64);
            let sleep = pipeline::sleep_long(wake.map_or(Duration::MAX, Duration::from_millis));
            tokio::select! {
                _ = self.stop.cancelled() => break Ok(()),
                _ = self.ctx.session.lost.cancelled() => break Err("the session was lost".to_string()),
                Some(done) = o.done_rx.recv() => self.left(o, done),
                next = next_job(&mut o.jobs) => match next {
                    Some(Ok(d)) => self.hold(o, d, false),
                    Some(Err(e)) => break Err(e.to_string()),
                    None => break Err("the broker cancelled a partition's consumer (queue deleted?)".into()),
                },
                next = o.wait.next() => match next {
                    Some(Ok(d)) => self.hold(o, d, true),
                    Some(Err(e)) => break Err(e.to_string()),
                    None => break Err("the broker cancelled a wait queue's consumer (queue deleted?)".into()),
                },
                _ = sleep => {}
            }
        };
        self.show(o, HashMap::new());
        end?;
        self.hand_back(o).await.map_err(|e| e.to_string())
    }

    /// Holds a delivery in its user's lane (an unreadable job runs at once: it fails).
    fn hold(&self, o: &mut Owned, d: Delivery, from_wait: bool) {
        let shared = &self.ctx.shared;
        let headers = d.properties.headers().clone();
        // A not-before no worker could have written (beyond retry.max_elapsed_ms) is
        // ignored, as the job's own run would: a forged one cannot park a user for ever.
        let now = now_ms();
        let state =
            RetryState::from_headers(headers.as_ref()).bounded(now, shared.policy.max_elapsed);
        let seq = headers
            .as_ref()
            .and_then(|h| int_header(h, header::SEQ))
            .unwrap_or(0)
            .max(0) as u64;
        let reason = headers
            .as_ref()
            .and_then(|h| string_header(h, header::WAIT_REASON))
            .and_then(|r| known_reason(&r));
        let message_id = d.properties.message_id().as_ref().map(ShortString::as_str);
        // Read for its user only: a job that breaks a message rule keeps its place in
        // its user's lane, and fails there, unsent, when its turn comes.
        let job = parse_job_with(
            &d.data,
            message_id,
            shared.settings.amqp.max_job_bytes,
            false,
        );
        let Ok(job) = job else {
            self.start(o, None, seq, d);
            return;
        };
        let held = Held {
            seq,
            not_before_ms: state.not_before_ms,
            deadline_ms: job.deadline.map(|t| t.timestamp_millis()),
            from_wait,
            reason,
            item: d,
        };
        o.lanes.push((job.bot_id, job.user_id), held);
    }

    /// Starts what is due, sends back what would wait long, updates the gauge.
    async fn schedule(&self, o: &mut Owned) -> Result<(), String> {
        let now = now_ms();
        for (user, held) in o.lanes.take_ready(now) {
            self.start(o, Some(user), held.seq, held.item);
        }
        for m in o.lanes.take_moves(now) {
            self.send_to_wait(o, m).await.map_err(|e| e.to_string())?;
        }
        let counts = o.lanes.waiting_by_reason(now);
        self.show(o, counts);
        Ok(())
    }

    /// Runs one job; its end comes back through `done`.
    fn start(&self, o: &mut Owned, user: Option<UserKey>, seq: u64, delivery: Delivery) {
        let ctx = self.ctx.clone();
        let acks = o.acks.clone();
        let done = o.done_tx.clone();
        let place = WaitPlace::Partition {
            wait_queue: self.wait_queue(),
        };
        o.running += 1;
        self.ctx.tracker.spawn(async move {
            let Ok(_permit) = ctx.shared.running.clone().acquire_owned().await else {
                return;
            };
            let ended = pipeline::process(
                ctx.shared.clone(),
                ctx.session.clone(),
                acks,
                delivery,
                ctx.stops.clone(),
                place,
            )
            .await;
            let _ = done.send((user, seq, ended));
        });
    }

    fn left(&self, o: &mut Owned, (user, seq, ended): Done) {
        o.running -= 1;
        let Some(user) = user else {
            return;
        };
        let how = match ended {
            Ended::Moved => Left::Moved,
            Ended::Completed | Ended::Abandoned => Left::Done,
        };
        let copy_here = o.lanes.holds(&user, seq);
        o.lanes.left(&user, seq, how, copy_here);
    }

    /// Publishes a held job to the wait queue (its retry state and order kept, a new
    /// time if its user's pacing set one), confirmed, then acks the original.
    async fn send_to_wait(&self, o: &Owned, m: Move<Delivery>) -> Result<(), BrokerError> {
        let d = &m.item;
        let mut state = RetryState::from_headers(d.properties.headers().as_ref());
        if let Some(t) = m.not_before_ms {
            state.not_before_ms = Some(t);
        }
        self.ctx
            .shared
            .metrics
            .order
            .waited(m.reason.unwrap_or("user_order"));
        self.republish(o, d, &state, m.reason).await
    }

    async fn republish(
        &self,
        o: &Owned,
        d: &Delivery,
        state: &RetryState,
        reason: Option<&'static str>,
    ) -> Result<(), BrokerError> {
        let headers = decide::copy_headers(d.properties.headers().as_ref(), state, None, reason);
        let properties = d
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        let queue = self.wait_queue();
        self.ctx
            .session
            .publisher
            .publish("", &queue, &d.data, properties)
            .await?;
        o.acks.ack(d.delivery_tag);
        Ok(())
    }

    /// Hands the partition back (see the module doc).
    async fn hand_back(&self, o: &mut Owned) -> Result<(), BrokerError> {
        self.state.store(LEAVING, Ordering::Relaxed);
        let timeout = self.ctx.shared.settings.amqp.operation_timeout();
        let cancel = |tag: String| {
            let channel = self.channel.clone();
            async move {
                bounded(
                    timeout,
                    "basic.cancel",
                    channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
                )
                .await
            }
        };
        cancel(self.tag("jobs")).await?;
        // Deliveries that arrived before the cancel are held and handed back in order
        // with the rest: left to the channel's close, they would return to the back
        // of the partition queue, behind later jobs of their users.
        if let Some(mut jobs) = o.jobs.take() {
            while let Ok(Some(Ok(d))) = tokio::time::timeout(timeout, jobs.next()).await {
                self.hold(o, d, false);
            }
        }
        // The running jobs finish (at shutdown, within the grace period: a job that
        // waits is handed back to the wait queue by itself).
        while o.running > 0 {
            match o.done_rx.recv().await {
                Some(done) => self.left(o, done),
                None => break,
            }
        }
        cancel(self.tag("wait")).await?;
        while let Ok(Some(Ok(d))) = tokio::time::timeout(timeout, o.wait.next()).await {
            self.hold(o, d, true);
        }
        let held = o.lanes.drain_held();
        let count = held.len();
        for h in held {
            let state = RetryState::from_headers(h.item.properties.headers().as_ref());
            self.republish(o, &h.item, &state, h.reason).await?;
        }
        let _ = tokio::time::timeout(timeout, o.acks.flush()).await;
        tracing::info!(
            partition = self.number,
            handed_back = count,
            "handed a partition back"
        );
        Ok(())
    }

    /// Moves this partition's part of the waiting gauge to `counts`.
    fn show(&self, o: &mut Owned, counts: HashMap<&'static str, i64>) {
        let metrics = &self.ctx.shared.metrics.order;
        for reason in crate::metrics::WAIT_REASONS {
            let new = counts.get(reason).copied().unwrap_or(0);
            let old = o.shown.get(reason).copied().unwrap_or(0);
            metrics.waiting_add(reason, new - old);
        }
        o.shown = counts;
    }
}

/// The next delivery of the partition queue; pending while not consuming it.
async fn next_job(jobs: &mut Option<Consumer>) -> Option<lapin::Result<Delivery>> {
    match jobs {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

fn known_reason(r: &str) -> Option<&'static str> {
    crate::metrics::WAIT_REASONS.into_iter().find(|k| *k == r)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
