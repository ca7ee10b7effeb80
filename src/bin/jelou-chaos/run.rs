//! One chaos run: the world, the fleet under faults, the drain, the ledger.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Context;
use jelou_worker::{broker, config::Settings};
use lapin::Connection;
use tokio_util::sync::CancellationToken;

use crate::{
    args::Args,
    collect::{self, Results},
    faults::{self, Event, Schedule},
    fleet::{self, Fleet},
    jelou::{ChaosJelou, Trouble},
    ledger,
    load::{self, Published},
    report::Report,
    setup,
};

/// The world of a run.
struct World {
    settings: Settings,
    conn: Connection,
    jelou: ChaosJelou,
    results: Results,
}

pub(crate) async fn run(args: &Args, seed: u64) -> anyhow::Result<Report> {
    let bin = fleet::locate_worker(args.worker_bin.as_deref())?;
    let jelou = ChaosJelou::start()
        .await
        .context("starting the stand-in Jelou")?;
    let prefix = format!("chaos-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let settings = setup::settings(
        &prefix,
        &args.amqp_url,
        args.queue_type,
        &jelou.stand_in.base_url(),
    )?;
    let conn = broker::connect(&settings.amqp, "jelou-chaos")
        .await
        .context("connecting to the broker")?
        .connection;
    let world = World {
        settings,
        conn,
        jelou,
        results: Results::default(),
    };
    let outcome = run_in(args, seed, bin, &world).await;
    setup::cleanup(&world.conn, &world.settings).await;
    let _ = world.conn.close(200, "done".into()).await;
    outcome
}

async fn run_in(
    args: &Args,
    seed: u64,
    bin: std::path::PathBuf,
    w: &World,
) -> anyhow::Result<Report> {
    setup::declare(&w.conn, &w.settings).await?;
    let collector = collect::consume(
        &w.conn,
        &setup::results_queue(&w.settings),
        w.results.clone(),
    )
    .await?;
    let t0 = Instant::now();
    let mut fleet = Fleet::new(bin, &w.settings, t0);
    for _ in 0..args.workers {
        fleet.spawn()?;
    }
    let stop = CancellationToken::new();
    let producer = tokio::spawn(produce(w.settings.clone(), seed, args.rate, stop.clone()));
    let events = inject(args, seed, t0, &mut fleet, &w.jelou).await;
    stop.cancel();
    let published = producer.await.context("the producer panicked")??;
    let events = events?;
    w.jelou.set(Trouble::None);
    let drained_s = drain(&published, &w.results, &mut fleet, args.drain_timeout).await;
    tokio::time::sleep(Duration::from_secs(5)).await; // late duplicates
    fleet.watch();
    fleet.sample_end_rss();
    let workers = fleet.stop_all().await;
    let leftovers = leftovers(&w.conn, &w.settings).await?;
    let dead = collect::dead_letters(&w.conn, &w.settings.amqp.dead_letter_queue).await?;
    collector.abort();
    let sent = w.jelou.log();
    let results = w.results.all();
    let ledger = ledger::build(&ledger::Inputs {
        t0,
        published: &published,
        sent: &sent,
        results: &results,
        dead: &dead,
        events: &events,
        prefetch: w.settings.amqp.prefetch,
    });
    Ok(Report::new(
        args, seed, events, workers, ledger, leftovers, drained_s,
    ))
}

/// A producer with a connection of its own.
async fn produce(
    s: Settings,
    seed: u64,
    rate: u32,
    stop: CancellationToken,
) -> anyhow::Result<Vec<Published>> {
    let conn = broker::connect(&s.amqp, "jelou-chaos producer")
        .await?
        .connection;
    let out = load::run(&conn, &s.amqp.jobs_queue, seed, rate, stop).await;
    let _ = conn.close(200, "done".into()).await;
    out
}

/// Injects faults at the schedule's moments for `--duration`; what was injected.
async fn inject(
    args: &Args,
    seed: u64,
    t0: Instant,
    fleet: &mut Fleet,
    jelou: &ChaosJelou,
) -> anyhow::Result<Vec<Event>> {
    let end = t0 + Duration::from_secs(args.duration);
    let mut schedule = Schedule::new(seed, Duration::from_secs(args.every), t0, args.kinds());
    let mut events = Vec::new();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fleet.watch();
        if schedule.trouble_until.is_some_and(|u| Instant::now() >= u) {
            schedule.trouble_until = None;
            jelou.set(Trouble::None);
        }
        if Instant::now() < schedule.next_at {
            continue;
        }
        let Some(kind) = schedule.pick(t0.elapsed()) else {
            continue;
        };
        let at_s = t0.elapsed().as_secs_f64();
        let event = faults::inject(kind, &mut schedule, fleet, jelou, at_s).await?;
        eprintln!(
            "jelou-chaos: {at_s:7.1} s  {:?}  {}",
            event.kind, event.detail
        );
        events.push(event);
    }
    Ok(events)
}

/// Waits until every published job has a result, at most `timeout_s`; how long it
/// took (None: it did not).
async fn drain(
    published: &[Published],
    results: &Results,
    fleet: &mut Fleet,
    timeout_s: u64,
) -> Option<f64> {
    let start = Instant::now();
    eprintln!(
        "jelou-chaos: faults stopped; draining {} jobs",
        published.len()
    );
    while start.elapsed() < Duration::from_secs(timeout_s) {
        fleet.watch();
        let done: std::collections::HashSet<String> =
            results.all().into_iter().map(|o| o.job).collect();
        if published.iter().all(|p| done.contains(&p.job)) {
            return Some(start.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    None
}

/// Messages left in the worker's queues (tokens aside), fleet stopped; by queue.
async fn leftovers(conn: &Connection, s: &Settings) -> anyhow::Result<BTreeMap<String, u32>> {
    let mut out = BTreeMap::new();
    for q in broker::Topology::for_settings(s).queue_names() {
        if q == s.amqp.dead_letter_queue {
            continue;
        }
        let n = collect::leftovers(conn, &q).await?;
        if n > 0 {
            out.insert(q, n);
        }
    }
    Ok(out)
}
