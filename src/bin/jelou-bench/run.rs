//! One invocation's runs: the names each run declares, and running a child process
//! against them while measuring it.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow};
use futures_util::StreamExt;
use jelou_worker::{
    broker::Topology,
    config::{AmqpSettings, AmqpUrls, LogSettings, OrderSettings, Settings},
    job::header,
};
use lapin::{
    Channel, Connection,
    options::{BasicConsumeOptions, BasicQosOptions, ExchangeDeleteOptions, QueueDeleteOptions},
    types::FieldTable,
};

use crate::{
    amqp::{Collector, connect, message_count, on_broker, prefill, wait_consuming},
    args::Args,
    child::{ChildProcess, locate_worker},
    lean_jelou::LeanJelou,
    probes::{Clock, Memory, Probe, Sample},
    report::{Measured, RunReport},
    scenarios::{Mode, Pipeline, RunSpec, specs_for},
};

/// After the last expected result: time for a duplicate, if any, to arrive.
const SETTLE: Duration = Duration::from_millis(300);
/// Bound on each delivery while reading a queue for its token.
const TOKEN_READ: Duration = Duration::from_secs(10);

/// The names of one run's queues and exchanges, unique to the bench invocation.
pub(crate) struct Names {
    settings: Settings,
    pub(crate) topology: Topology,
    /// The bench's own queue that receives every result.
    pub(crate) collected: String,
    /// Every jobId of the run starts with it: `b<tag>-`.
    pub(crate) job_prefix: String,
}

impl Names {
    fn new(tag: &str, run: &str, amqp: &AmqpSettings, spec: &RunSpec, bench: &Bench) -> Self {
        let partitions = bench.partitions;
        let prefix = format!("bench.{tag}.{run}");
        let settings = Settings {
            amqp: AmqpSettings {
                prefetch: spec.prefetch,
                ..amqp.namespaced(&prefix)
            },
            order: OrderSettings {
                enabled: spec.order,
                partitions,
                ..OrderSettings::default()
            },
            log: LogSettings {
                level: bench.log_level.clone(),
                ..LogSettings::default()
            },
            ..Settings::default()
        };
        // The worker declares its retry and delay queues after its retry settings
        // (the defaults, as nothing else is set), and with order on its ordered queues
        // after `order` (passed to it below): the bench declares, counts and deletes
        // the same ones.
        let topology = Topology::for_settings(&settings);
        Self {
            topology,
            collected: format!("{prefix}.collected"),
            job_prefix: format!("b{tag}-"),
            settings,
        }
    }

    fn queues(&self) -> Vec<String> {
        let mut queues = self.topology.queue_names();
        queues.push(self.collected.clone());
        queues
    }

    fn exchanges(&self) -> [&str; 2] {
        [
            &self.topology.result_exchange,
            &self.topology.dead_letter_exchange,
        ]
    }

    /// The configuration of the child, as `JELOU_WORKER__*` variables.
    fn child_env(&self, stand_in: &LeanJelou) -> Vec<(String, String)> {
        let a = &self.settings.amqp;
        let url: Vec<&str> = a.url.expose().collect();
        [
            ("AMQP__URL", url.join(",")),
            ("AMQP__QUEUE_TYPE", a.queue_type.as_str().to_string()),
            ("AMQP__JOBS_QUEUE", a.jobs_queue.clone()),
            ("AMQP__RESULT_EXCHANGE", a.result_exchange.clone()),
            ("AMQP__DEAD_LETTER_EXCHANGE", a.dead_letter_exchange.clone()),
            ("AMQP__DEAD_LETTER_QUEUE", a.dead_letter_queue.clone()),
            ("AMQP__PREFETCH", a.prefetch.to_string()),
            ("ORDER__ENABLED", self.settings.order.enabled.to_string()),
            (
                "ORDER__PARTITIONS",
                self.settings.order.partitions.to_string(),
            ),
            ("JELOU__BASE_URL", stand_in.base_url()),
            ("JELOU__CLIENT_ID", "jelou-bench".to_string()),
            ("JELOU__CLIENT_SECRET", "jelou-bench".to_string()),
            // Port 0: the system picks a free one; the bench needs no metrics.
            ("SERVER__LISTEN", "127.0.0.1:0".to_string()),
            ("LOG__LEVEL", self.settings.log.level.clone()),
        ]
        .into_iter()
        .map(|(key, value)| (format!("JELOU_WORKER__{key}"), value))
        .collect()
    }
}

/// What the whole invocation shares.
pub(crate) struct Bench<'a> {
    /// Eight hex digits unique to this invocation, in every name it declares.
    tag: String,
    clock: Clock,
    pub(crate) amqp: AmqpSettings,
    connection: Connection,
    stand_in: &'a LeanJelou,
    pub(crate) worker_bin: PathBuf,
    self_exe: PathBuf,
    pub(crate) probe: Probe,
    /// `--partitions`.
    partitions: u16,
    /// The worker's `log.level` (`--log-level`).
    log_level: String,
}

impl<'a> Bench<'a> {
    /// Connects to the broker and finds the worker's binary (building it first when run
    /// through cargo).
    pub(crate) async fn new(args: &Args, stand_in: &'a LeanJelou) -> anyhow::Result<Self> {
        let mut amqp = AmqpSettings {
            url: AmqpUrls::parse(&args.amqp_url).map_err(|e| anyhow!("--amqp-url: {e}"))?,
            queue_type: args.queue_type,
            ..AmqpSettings::default()
        };
        amqp.operation_timeout_ms = 10_000;
        let connection = connect(&amqp).await?;
        let worker_bin = locate_worker(args.worker_bin.as_deref())?;
        let self_exe = std::env::current_exe().context("locating jelou-bench's own binary")?;
        let probe = Probe::new(&amqp.url);
        Ok(Self {
            tag: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            clock: Clock(Instant::now()),
            amqp,
            connection,
            stand_in,
            worker_bin,
            self_exe,
            probe,
            partitions: args.partitions,
            log_level: args.log_level.clone(),
        })
    }

    /// Runs every run of the chosen scenarios, logging each to stderr, then closes the
    /// connection.
    pub(crate) async fn run_all(&self, args: &Args) -> anyhow::Result<Vec<RunReport>> {
        let mut runs = Vec::new();
        for scenario in args.scenarios() {
            for spec in specs_for(scenario, args) {
                eprintln!("jelou-bench: {}: {}", spec.name, spec.describe());
                let report = self.run(&spec).await?;
                eprintln!("jelou-bench: {}: {}", report.name, report.summary());
                for problem in &report.problems {
                    eprintln!("jelou-bench: {}: PROBLEM: {problem}", report.name);
                }
                runs.push(report);
            }
        }
        let _ = on_broker(
            "connection.close",
            self.connection.close(200, "benchmark done".into()),
        )
        .await;
        Ok(runs)
    }
}

impl Bench<'_> {
    /// Runs one child and cleans up its queues and exchanges whatever happened, Ctrl-C
    /// included (the child is killed when its handle is dropped).
    async fn run(&self, spec: &RunSpec) -> anyhow::Result<RunReport> {
        let names = Names::new(&self.tag, &spec.name, &self.amqp, spec, self);
        let outcome = tokio::select! {
            report = self.measure(spec, &names) => report,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
        self.clean_up(&names).await;
        outcome
    }

    async fn measure(&self, spec: &RunSpec, names: &Names) -> anyhow::Result<RunReport> {
        let (collector, prefill_rate) = self.prepare(spec, names).await?;
        let channel = on_broker("channel.open", self.connection.create_channel()).await?;
        let requests_before = self.stand_in.answered();
        self.stand_in.record(spec.check_order);
        let mut child = self.spawn(spec, names)?;
        wait_consuming(&channel, &names.topology.jobs_queue, &mut child).await?;
        let start = self.probe.sample(child.pid(), self.clock);
        let startup_ms = start.at_us.saturating_sub(child.spawned_us) as f64 / 1000.0;

        let mut problems = Vec::new();
        let end = self.watch(spec, &collector, &child, &mut problems).await;
        let memory = Memory::of(child.pid());
        if let Err(e) = child.stop().await {
            problems.push(e);
        }
        let jelou_requests = self.stand_in.answered() - requests_before;
        let received = self.stand_in.record(false);
        let left = left_in_queue(spec, &self.connection, &channel, names, &collector).await?;
        let tally = collector.snapshot();
        collector.stop().await;
        Ok(RunReport::new(
            spec,
            Measured {
                start,
                end,
                memory,
                startup_ms,
                prefill_rate,
                left: u64::from(left),
                jelou_requests,
                received: spec.check_order.then_some(received),
                tally,
                problems,
            },
        ))
    }

    /// Declares the run's names, starts collecting results, sets the stand-in's delay
    /// and fills the jobs queue (the jobs/s it was filled at, if it has jobs).
    async fn prepare(
        &self,
        spec: &RunSpec,
        names: &Names,
    ) -> anyhow::Result<(Arc<Collector>, Option<f64>)> {
        let timeout = self.amqp.operation_timeout();
        names
            .topology
            .declare(&self.connection, timeout)
            .await
            .context("declaring the run's queues and exchanges")?;
        let collector = Collector::start(&self.connection, names, spec.jobs, self.clock).await?;
        self.stand_in.answer_after(spec.latency, spec.jitter_pct);
        let prefill_rate = if spec.jobs > 0 {
            Some(prefill(&self.connection, names, spec.jobs, spec.users, self.clock).await?)
        } else {
            None
        };
        Ok((collector, prefill_rate))
    }

    /// Lets the child work (until every job has its result, or for the watch's
    /// duration); the sample that ends the window.
    async fn watch(
        &self,
        spec: &RunSpec,
        collector: &Collector,
        child: &ChildProcess,
        problems: &mut Vec<String>,
    ) -> Sample {
        match spec.mode {
            Mode::Drain => {
                if let Err(stalled) = collector.wait_for(spec.jobs).await {
                    problems.push(stalled);
                }
                let end = self.probe.sample(child.pid(), self.clock);
                tokio::time::sleep(SETTLE).await;
                end
            }
            Mode::Watch(duration) => {
                tokio::time::sleep(duration).await;
                self.probe.sample(child.pid(), self.clock)
            }
        }
    }

    fn spawn(&self, spec: &RunSpec, names: &Names) -> anyhow::Result<ChildProcess> {
        let (program, args): (&Path, &[&str]) = match spec.pipeline {
            Pipeline::Worker => (&self.worker_bin, &["run"]),
            Pipeline::Null => (&self.self_exe, &["--null-pipeline"]),
        };
        let log = std::env::temp_dir().join(format!("jelou-bench-{}-{}.log", self.tag, spec.name));
        ChildProcess::spawn(
            program,
            args,
            &names.child_env(self.stand_in),
            log,
            self.clock,
        )
    }

    /// Deletes what the run declared. Failures are reported, not fatal: the names are
    /// unique to this invocation, so a leftover never disturbs another run.
    async fn clean_up(&self, names: &Names) {
        let queues = names.queues();
        let items = queues
            .iter()
            .map(|q| (q.as_str(), true))
            .chain(names.exchanges().into_iter().map(|e| (e, false)));
        let mut channel: Option<Channel> = None;
        for (name, is_queue) in items {
            let ch = match channel.take() {
                Some(ch) if ch.status().connected() => ch,
                _ => match on_broker("channel.open", self.connection.create_channel()).await {
                    Ok(ch) => ch,
                    Err(e) => {
                        eprintln!(
                            "jelou-bench: warning: cannot clean up `{name}` and the rest of the run's names: {e:#}"
                        );
                        return;
                    }
                },
            };
            let deleted = if is_queue {
                on_broker(
                    "queue.delete",
                    ch.queue_delete(name.into(), QueueDeleteOptions::default()),
                )
                .await
                .map(drop)
            } else {
                on_broker(
                    "exchange.delete",
                    ch.exchange_delete(name.into(), ExchangeDeleteOptions::default()),
                )
                .await
            };
            match deleted {
                // A timed-out channel may still get its answer later: use a new one.
                Err(e) => eprintln!("jelou-bench: warning: could not delete `{name}`: {e:#}"),
                Ok(()) => channel = Some(ch),
            }
        }
        if let Some(ch) = channel {
            let _ = on_broker("channel.close", ch.close(200, "cleaned up".into())).await;
        }
    }
}

/// The jobs left on the broker once the child is gone (whatever it did not ack is back
/// in its queue); a watched run then also waits for the results still on their way.
async fn left_in_queue(
    spec: &RunSpec,
    connection: &Connection,
    channel: &Channel,
    names: &Names,
    collector: &Collector,
) -> anyhow::Result<u32> {
    let left = jobs_left(connection, channel, names)
        .await
        .context("counting the jobs left in the queues")?;
    let _ = on_broker("channel.close", channel.close(200, "run measured".into())).await;
    if let Mode::Watch(_) = spec.mode {
        // Results of the jobs finished while the child stopped may still be on
        // their way: wait until every job is accounted for (or give up).
        collector
            .wait_for(spec.jobs.saturating_sub(u64::from(left)))
            .await
            .ok();
        tokio::time::sleep(SETTLE).await;
    }
    Ok(left)
}

/// The jobs in every queue of the worker's topology that can hold one: the jobs queue,
/// the retry and delay queues and, with order on, the partition queues (jobs the router
/// moved) and the wait queues (jobs waiting their turn). Not the dead-letter queue: a
/// job there has failed, and got a failure result.
///
/// The ordered queues also hold ownership tokens, which are not jobs: one in the
/// router's queue and one in each wait queue whose partition was ever taken (0 or 1
/// each: a token is created only in a queue with no message and no consumer, and with
/// one worker nothing else can create a second one). Whether a queue holds its token
/// cannot be told from its count, so the messages of the router's and the wait queues
/// are read (basic.get, never acked; closing the channel puts them back) and those
/// with the `x-jelou-token` header are not counted. The members queue holds nothing.
async fn jobs_left(
    connection: &Connection,
    channel: &Channel,
    names: &Names,
) -> anyhow::Result<u32> {
    let t = &names.topology;
    let queues: Vec<String> = t
        .queue_names()
        .into_iter()
        .filter(|q| *q != t.dead_letter_queue)
        .collect();
    let counts = settled_counts(channel, &queues).await?;
    let with_tokens: Vec<String> = (0..t.partitions)
        .map(|p| t.lock_queue(p))
        .chain((t.partitions > 0).then(|| t.router_queue()))
        .collect();
    let mut left = 0;
    for (queue, count) in queues.iter().zip(counts) {
        left += if count > 0 && with_tokens.contains(queue) {
            count - tokens_in(connection, queue, count).await?
        } else {
            count
        };
    }
    Ok(left)
}

/// The message counts of `queues` once they stop changing: a quorum queue applies the
/// acks and returns of a closed connection through its log, a moment after the close.
async fn settled_counts(channel: &Channel, queues: &[String]) -> anyhow::Result<Vec<u32>> {
    let mut last = Vec::with_capacity(queues.len());
    for queue in queues {
        last.push(message_count(channel, queue).await?);
    }
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut now = Vec::with_capacity(queues.len());
        for queue in queues {
            now.push(message_count(channel, queue).await?);
        }
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

/// How many of the `count` messages of `queue` are ownership tokens. Receives them
/// without acking on a channel of its own, whose close puts them back (a consumer, as
/// quorum queues with a single active consumer refuse basic.get; the child is gone,
/// so this consumer is the active one).
async fn tokens_in(connection: &Connection, queue: &str, count: u32) -> anyhow::Result<u32> {
    let channel = on_broker("channel.open", connection.create_channel()).await?;
    let counted = async {
        on_broker(
            "basic.qos",
            channel.basic_qos(
                count.min(u32::from(u16::MAX)) as u16,
                BasicQosOptions::default(),
            ),
        )
        .await?;
        let mut consumer = on_broker(
            "basic.consume",
            channel.basic_consume(
                queue.into(),
                "jelou-bench-token-count".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let mut tokens = 0;
        for n in 0..count {
            let delivery = match tokio::time::timeout(TOKEN_READ, consumer.next()).await {
                Ok(Some(delivery)) => delivery?,
                Ok(None) => anyhow::bail!("the consumer of `{queue}` ended"),
                Err(_) => anyhow::bail!(
                    "`{queue}` delivered {n} of its {count} messages within {} s",
                    TOKEN_READ.as_secs()
                ),
            };
            let token = delivery
                .properties
                .headers()
                .as_ref()
                .is_some_and(|h| h.inner().contains_key(header::TOKEN));
            tokens += u32::from(token);
        }
        Ok(tokens)
    }
    .await;
    let _ = on_broker("channel.close", channel.close(200, "tokens counted".into())).await;
    counted.with_context(|| format!("reading `{queue}` for its token"))
}
