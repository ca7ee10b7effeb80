//! The bench's own side of the broker: filling a run's jobs queue, waiting for the
//! child to consume, and collecting the results.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures_util::{StreamExt, stream::FuturesUnordered};
use jelou_worker::{broker, config::AmqpSettings};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{
        BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::FieldTable,
};
use tokio::sync::Notify;

use crate::{BOT_ID, child::ChildProcess, probes::Clock, run::Names};

/// Publishes awaiting their confirm while filling a queue: enough to keep a quorum
/// queue's Raft log busy, as `jelou-worker enqueue` does with 256.
const PUBLISH_IN_FLIGHT: usize = 1024;
/// Bound on each broker operation of the bench itself (declaring, publishing a job,
/// deleting a queue): a stuck broker fails the run instead of hanging the bench.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);
/// A run whose results stop coming for this long has failed.
const STALL: Duration = Duration::from_secs(60);
/// How long a child may take to start consuming.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one broker operation of the bench under [`BROKER_TIMEOUT`].
pub(crate) async fn on_broker<T>(
    what: &'static str,
    operation: impl std::future::Future<Output = lapin::Result<T>>,
) -> anyhow::Result<T> {
    Ok(broker::bounded(BROKER_TIMEOUT, what, operation).await?)
}

/// Connects to the broker, or says how to start it.
pub(crate) async fn connect(amqp: &AmqpSettings) -> anyhow::Result<Connection> {
    match broker::connect(amqp, "jelou-bench").await {
        Ok(connected) => Ok(connected.connection),
        Err(broker::BrokerError::Connect { reason, .. }) => bail!(
            "RabbitMQ is not reachable at {} ({reason}); start it with `rabbitmq-server -detached` \
             (and wait for `rabbitmqctl await_startup`), or name another broker with --amqp-url",
            amqp.url
        ),
        Err(e) => bail!("RabbitMQ at {}: {e}", amqp.url),
    }
}

/// The userId of user `n`: a phone number, as WhatsApp's.
pub(crate) fn user_id(n: u64) -> String {
    format!("5939{n:08}")
}

/// A job's body, as a producer would write it. The text starts with `m<seq>:`, which
/// the stand-in reads to check each user's order.
fn job_body(job_id: &str, user: &str, seq: u64) -> Vec<u8> {
    format!(
        r#"{{"jobId":"{job_id}","botId":"{BOT_ID}","message":{{"type":"text","userId":"{user}","text":"m{seq}: Hola, este es un mensaje de prueba del benchmark"}}}}"#
    )
    .into_bytes()
}

/// Fills the jobs queue with confirmed, pipelined publishing; returns the jobs/s reached.
/// Each jobId is `b<tag>-<seq>-<enqueue time in µs>`; it is also the AMQP `message_id`,
/// which is what the null pipeline, which does not read bodies, answers with. Job `seq`
/// is user `seq % users`'s.
pub(crate) async fn prefill(
    connection: &Connection,
    names: &Names,
    jobs: u64,
    users: u64,
    clock: Clock,
) -> anyhow::Result<f64> {
    let channel = on_broker("channel.open", connection.create_channel()).await?;
    on_broker(
        "confirm.select",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    let queue = names.topology.jobs_queue.as_str();
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for seq in 0..jobs {
        let job_id = format!("{}{seq}-{}", names.job_prefix, clock.now_us());
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
            .with_message_id(job_id.as_str().into());
        let body = job_body(&job_id, &user_id(seq % users.max(1)), seq);
        let confirm = on_broker(
            "basic.publish",
            channel.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            ),
        )
        .await
        .with_context(|| format!("publishing job {seq} to `{queue}`"))?;
        pending.push(confirm);
        if pending.len() >= PUBLISH_IN_FLIGHT {
            expect_routed(next_confirm(&mut pending).await?, queue)?;
        }
    }
    while !pending.is_empty() {
        expect_routed(next_confirm(&mut pending).await?, queue)?;
    }
    let _ = on_broker("channel.close", channel.close(200, "jobs published".into())).await;
    Ok(jobs as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// The next publisher confirm to arrive, within [`BROKER_TIMEOUT`].
async fn next_confirm(
    pending: &mut FuturesUnordered<lapin::PublisherConfirm>,
) -> anyhow::Result<lapin::Result<Confirmation>> {
    match tokio::time::timeout(BROKER_TIMEOUT, pending.next()).await {
        Ok(Some(confirmation)) => Ok(confirmation),
        Ok(None) => bail!("no publish is waiting for a confirm"),
        Err(_) => bail!(
            "the broker confirmed no job within {} s",
            BROKER_TIMEOUT.as_secs()
        ),
    }
}

fn expect_routed(confirmation: lapin::Result<Confirmation>, queue: &str) -> anyhow::Result<()> {
    match confirmation.context("waiting for a publisher confirm")? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => bail!("the broker has no queue `{queue}` to take the job"),
        Confirmation::Nack(_) => bail!("the broker refused (nack) a job for `{queue}`"),
        Confirmation::NotRequested => bail!("the broker did not confirm a job (confirms are off)"),
    }
}

/// Polls the jobs queue until the broker reports a consumer: the moment the clock
/// starts. Fails early, with its log, if the child exits first.
pub(crate) async fn wait_consuming(
    channel: &Channel,
    queue: &str,
    child: &mut ChildProcess,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.exited() {
            bail!(
                "{} exited ({status}) before consuming; its log:\n{}",
                child.program,
                child.log_tail()
            );
        }
        let declared = passive_declare(channel, queue)
            .await
            .context("checking the jobs queue for a consumer")?;
        if declared.consumer_count() > 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not start consuming within {} s; its log:\n{}",
                child.program,
                START_TIMEOUT.as_secs(),
                child.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The queue's counts, without declaring it.
async fn passive_declare(channel: &Channel, queue: &str) -> anyhow::Result<lapin::Queue> {
    on_broker(
        "queue.declare",
        channel.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
}

/// The queue's ready message count, without declaring it.
pub(crate) async fn message_count(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    Ok(passive_declare(channel, queue).await?.message_count())
}

/// Receives every result of a run (auto-ack, from a queue bound to the run's result
/// exchange with `#`) and counts them per job.
pub(crate) struct Collector {
    /// Closing it ends the consumer; the queue, auto-delete, goes with it.
    channel: Channel,
    tally: Mutex<Tally>,
    progress: Notify,
}

/// What the results said so far.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tally {
    /// Results per job, by sequence number.
    counts: Vec<u8>,
    /// (enqueued, received) in µs of [`Clock`], for each job's first result.
    pub(crate) times: Vec<(u64, u64)>,
    /// Jobs with at least one result.
    pub(crate) unique: u64,
    /// Results beyond the first for a job.
    pub(crate) duplicates: u64,
    /// Failure results (routing key `failure`).
    pub(crate) failures: u64,
    /// Results whose correlation_id names no job of this run.
    pub(crate) strays: u64,
}

impl Collector {
    /// Declares the run's results queue, bound to its result exchange, and starts
    /// receiving from it.
    pub(crate) async fn start(
        connection: &Connection,
        names: &Names,
        jobs: u64,
        clock: Clock,
    ) -> anyhow::Result<Arc<Self>> {
        let channel = on_broker("channel.open", connection.create_channel()).await?;
        let queue = names.collected.as_str();
        declare_results_queue(&channel, queue, &names.topology.result_exchange).await?;
        let consumer = on_broker(
            "basic.consume",
            channel.basic_consume(
                queue.into(),
                "jelou-bench-results".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        let collector = Arc::new(Self {
            channel,
            tally: Mutex::new(Tally {
                counts: vec![0; jobs as usize],
                times: Vec::with_capacity(jobs as usize),
                ..Tally::default()
            }),
            progress: Notify::new(),
        });
        collector
            .clone()
            .receive(consumer, names.job_prefix.clone(), clock);
        Ok(collector)
    }

    /// Counts each result as it arrives. Ends when the channel closes
    /// ([`Collector::stop`], or the run's clean-up).
    fn receive(self: Arc<Self>, mut consumer: lapin::Consumer, prefix: String, clock: Clock) {
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let received = clock.now_us();
                let job = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .and_then(|id| parse_job_id(id.as_str(), &prefix));
                let success = delivery.routing_key.as_str() != "failure";
                self.tally
                    .lock()
                    .expect("not poisoned")
                    .record(job, success, received);
                self.progress.notify_one();
            }
        });
    }

    /// Waits until `n` jobs have a result; fails when none came for [`STALL`].
    pub(crate) async fn wait_for(&self, n: u64) -> Result<(), String> {
        loop {
            let notified = self.progress.notified();
            let unique = self.tally.lock().expect("not poisoned").unique;
            if unique >= n {
                return Ok(());
            }
            if tokio::time::timeout(STALL, notified).await.is_err() {
                return Err(format!(
                    "stalled: {unique} of {n} jobs have a result, and none came in {} s",
                    STALL.as_secs()
                ));
            }
        }
    }

    /// Stops receiving: closes the channel, which deletes the auto-delete queue.
    pub(crate) async fn stop(&self) {
        let _ = on_broker(
            "channel.close",
            self.channel.close(200, "results collected".into()),
        )
        .await;
    }

    pub(crate) fn snapshot(&self) -> Tally {
        self.tally.lock().expect("not poisoned").clone()
    }
}

/// The results queue of a run: exclusive and auto-delete, bound to `exchange` with `#`.
async fn declare_results_queue(
    channel: &Channel,
    queue: &str,
    exchange: &str,
) -> anyhow::Result<()> {
    on_broker(
        "queue.declare",
        channel.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .with_context(|| format!("declaring the results queue `{queue}`"))?;
    on_broker(
        "queue.bind",
        channel.queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    Ok(())
}

/// `b<tag>-<seq>-<µs>` → (seq, enqueue µs), for jobIds of this run only.
fn parse_job_id(id: &str, prefix: &str) -> Option<(usize, u64)> {
    let (seq, enqueued) = id.strip_prefix(prefix)?.split_once('-')?;
    Some((seq.parse().ok()?, enqueued.parse().ok()?))
}

impl Tally {
    fn record(&mut self, job: Option<(usize, u64)>, success: bool, received: u64) {
        let Some((seq, enqueued)) = job.filter(|(seq, _)| *seq < self.counts.len()) else {
            self.strays += 1;
            return;
        };
        if !success {
            self.failures += 1;
        }
        if self.counts[seq] == 0 {
            self.unique += 1;
            self.times.push((enqueued, received));
        } else {
            self.duplicates += 1;
        }
        self.counts[seq] = self.counts[seq].saturating_add(1);
    }
}
