//! Node failures on a 3-node RabbitMQ cluster, with the worker running as a real
//! process against all three nodes, under a steady stream of jobs.
//!
//! These tests need the throwaway cluster of `scripts/cluster.sh` (nodes c1..c3 on
//! ports 5681..5683; the broker on 5672 is not used) and `JELOU_CLUSTER_TESTS=1`, so
//! they are `#[ignore]`d by default. `scripts/ci-cluster.sh` starts the cluster, runs
//!
//! ```sh
//! JELOU_CLUSTER_TESTS=1 cargo test --locked --test it -- --ignored --test-threads=1 cluster::
//! ```
//!
//! and always stops the cluster. Each test appends its measurements (failover times,
//! duplicates) to `target/tmp/cluster/report.txt`; the workers' logs are kept beside it.
//!
//! What each failure test proves, for one kind of failure:
//!
//! - no job is lost: every jobId gets a success result;
//! - duplicates stay within what was in flight: extra requests to Jelou and extra
//!   results are each at most `amqp.prefetch`;
//! - the worker moves on in bounded time, and `/readyz` follows its connection.
//!
//! Roles: the jobs queue is declared through node L, so L leads it; the worker is on
//! node W != L (restarted until its random start node is not L); the test's producer
//! and result collector use the third node T, which is never failed, so that what is
//! measured is the worker's failover.

mod harness;

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime},
};

use harness::*;
use jelou_worker::stand_in::{Reply, StandIn};

/// Jobs in flight per worker: the bound on duplicates.
const PREFETCH: u16 = 32;
/// How long "Jelou" takes to answer each request.
const JELOU_LATENCY: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// kill -9 of the node that leads the jobs queue (not the worker's node).
    KillLeader,
    /// kill -9 of the node the worker is connected to (not the leader).
    KillWorkersNode,
    /// SIGSTOP of the worker's node for this long, then SIGCONT.
    FreezeWorkersNode(Duration),
    /// SIGSTOP of the jobs queue's leader for this long, then SIGCONT.
    FreezeLeader(Duration),
}

impl Fault {
    fn kills(self) -> bool {
        matches!(self, Fault::KillLeader | Fault::KillWorkersNode)
    }

    fn hits_workers_node(self) -> bool {
        matches!(self, Fault::KillWorkersNode | Fault::FreezeWorkersNode(_))
    }
}

struct Scenario {
    name: &'static str,
    fault: Fault,
    /// The node that leads the jobs queue.
    leader: u8,
    jobs: usize,
    /// Jobs published per second.
    rate: u32,
    /// Upper bound on the time from the fault until the worker sends to Jelou again.
    /// For a frozen leader: from the new leader's election (the broker's doing, and
    /// its timing varies), or from the thaw if no leader was elected before it.
    resume_within: Duration,
}

const FREEZE: Duration = Duration::from_secs(20);

/// The worker's connection lives (its node is not the one killed); the quorum queue's
/// followers elect a new leader and the worker's consumer carries on with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs JELOU_CLUSTER_TESTS=1 (a 3-node cluster); .ci/run sets it"]
async fn killing_the_jobs_queue_leader_loses_nothing() {
    failover(Scenario {
        name: "kill-leader",
        fault: Fault::KillLeader,
        leader: 1,
        jobs: 2_000,
        rate: 200,
        resume_within: Duration::from_secs(10),
    })
    .await;
}

/// The worker's connection is reset at once: it reconnects to another node, and the
/// broker hands the jobs that were in flight on the dead connection to the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs JELOU_CLUSTER_TESTS=1 (a 3-node cluster); .ci/run sets it"]
async fn killing_the_workers_node_loses_nothing() {
    failover(Scenario {
        name: "kill-workers-node",
        fault: Fault::KillWorkersNode,
        leader: 2,
        jobs: 2_000,
        rate: 200,
        resume_within: Duration::from_secs(10),
    })
    .await;
}

/// A frozen node resets nothing: the worker notices only from missing heartbeats
/// (twice `amqp.heartbeat_secs`) or a publisher confirm that does not come
/// (`amqp.operation_timeout_ms`), then must consume from another node while the frozen
/// one is still frozen. The jobs it held there come back when the node resumes and
/// sees the closed connection.
///
/// The frozen node also leads the queues the worker declared itself (retry, delay,
/// dead-letter): on RabbitMQ 3.10 subscribing to such a queue hangs until the node is
/// back, so the worker must not make consuming new jobs wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs JELOU_CLUSTER_TESTS=1 (a 3-node cluster); .ci/run sets it"]
async fn freezing_the_workers_node_for_20s_loses_nothing() {
    failover(Scenario {
        name: "freeze-workers-node",
        fault: Fault::FreezeWorkersNode(FREEZE),
        leader: 3,
        jobs: 2_000,
        rate: 80,
        // The worker must be consuming elsewhere well before the node comes back.
        resume_within: Duration::from_secs(12),
    })
    .await;
}

/// The worker's connection lives. The followers of the frozen leader elect a new one
/// after a few seconds (aten's failure detector, not net_ticktime), and channels that
/// were consuming and publishing before the freeze carry on with it. (A *new*
/// basic.consume on that queue would hang until the node is back: on 3.10 the queue's
/// record keeps the old leader while a member is unreachable.) A few jobs that were
/// passing through the frozen leader finish only after it resumes; none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs JELOU_CLUSTER_TESTS=1 (a 3-node cluster); .ci/run sets it"]
async fn freezing_the_jobs_queue_leader_for_20s_loses_nothing() {
    failover(Scenario {
        name: "freeze-leader",
        fault: Fault::FreezeLeader(FREEZE),
        leader: 1,
        jobs: 2_000,
        rate: 80,
        // Measured: the election after 6.5-10 s (once over 15 s), the worker sending
        // again within a second of it.
        resume_within: Duration::from_secs(5),
    })
    .await;
}

/// Starts the worker until its (random) start node is not `avoid`; returns it and its node.
async fn start_worker_off(config: &WorkerConfig, avoid: u8, test: &str) -> (WorkerProcess, u8) {
    for attempt in 1..=12 {
        let log = output_dir().join(format!("{test}-worker-{attempt}.log"));
        let mut worker = WorkerProcess::start(config, &worker_urls(&NODES), log);
        let node = worker.wait_ready(Duration::from_secs(30)).await;
        if node != avoid {
            return (worker, node);
        }
        let status = worker
            .terminate(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(status.success(), "the worker exited with {status}");
    }
    panic!("12 workers in a row started on node c{avoid}: the start node is not random");
}

async fn failover(s: Scenario) {
    let test_started = Instant::now();
    let cluster = Cluster::require().await;
    let names = Names::new(s.name);
    let jelou = StandIn::start().await.expect("start the stand-in Jelou");
    jelou.always(Reply::Success.after(JELOU_LATENCY));

    names.declare_jobs_queue_on(s.leader).await;
    assert_eq!(
        cluster.leader(&names.jobs_queue, s.leader).await,
        s.leader,
        "the declaring node leads a new quorum queue"
    );
    let config = WorkerConfig {
        names: names.clone(),
        jelou_base_url: jelou.base_url(),
        prefetch: PREFETCH,
    };
    let (worker, w) = start_worker_off(&config, s.leader, s.name).await;
    let t = NODES
        .into_iter()
        .find(|n| *n != s.leader && *n != w)
        .expect("three nodes");
    names.declare_results_queue_on(t).await;
    let collector = Collector::start(names.results_queue.clone(), starting_at(t));
    let observer = Observer::start(worker.listen);
    let producer = produce(
        names.jobs_queue.clone(),
        names.prefix.clone(),
        s.jobs,
        s.rate,
        starting_at(t),
    );

    // Fail a node once a fifth of the stream has gone through.
    assert!(
        jelou
            .wait_for((s.jobs / 5) as u64, Duration::from_secs(60))
            .await,
        "the stream did not get going: {} requests {}",
        jelou.count(),
        worker.log_tail(30)
    );
    let victim = if s.fault.hits_workers_node() {
        w
    } else {
        s.leader
    };
    let before = worker.metrics().await.expect("metrics before the fault");
    let fault_at = Instant::now();
    let fault_wall = SystemTime::now();
    let mut thawed_at = None;
    match s.fault {
        Fault::KillLeader | Fault::KillWorkersNode => cluster.kill(victim).await,
        Fault::FreezeWorkersNode(pause) | Fault::FreezeLeader(pause) => {
            let frozen = cluster.freeze(victim).await;
            // The scenario itself: the node stays frozen this long whatever happens.
            tokio::time::sleep(pause).await;
            frozen.thaw();
            thawed_at = Some(Instant::now());
        }
    }

    let produced = tokio::time::timeout(Duration::from_secs(180), producer)
        .await
        .expect("the producer finishes within 180 s")
        .expect("the producer did not panic")
        .unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<String> = (0..s.jobs)
        .map(|i| format!("{}-{i:05}", names.prefix))
        .collect();
    if let Err(e) = collector.wait_for(&ids, Duration::from_secs(90)).await {
        panic!("jobs lost: {e} {}", worker.log_tail(60));
    }
    wait_idle(&worker, &names, t).await;
    let all_in_at = Instant::now();
    let samples = observer.stop().await;
    let collected = collector.stop().await;
    let after = worker.metrics().await.expect("metrics after the fault");

    // No job lost, every result a success.
    assert_eq!(
        collected.by_job.len(),
        s.jobs,
        "results for unknown jobIds?"
    );
    let failures: Vec<_> = collected
        .by_job
        .iter()
        .filter(|(_, got)| got.iter().any(|g| g.status != "success"))
        .map(|(id, _)| id)
        .collect();
    assert!(failures.is_empty(), "jobs that failed: {failures:?}");

    // Duplicates within what was in flight.
    let results: usize = collected.by_job.values().map(Vec::len).sum();
    let duplicate_results = results - s.jobs;
    let mut requests: HashMap<String, usize> = HashMap::new();
    let seen = jelou.seen();
    for r in &seen {
        let id = r.json()["text"].as_str().unwrap_or("?").to_string();
        *requests.entry(id).or_default() += 1;
    }
    assert_eq!(
        requests.len(),
        s.jobs,
        "every job reached Jelou (and nothing else did)"
    );
    let duplicate_requests = seen.len() - s.jobs;
    let mut sent_twice: Vec<&String> = requests
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    sent_twice.sort();
    let mut results_twice: Vec<&String> = collected
        .by_job
        .iter()
        .filter(|(_, got)| got.len() > 1)
        .map(|(id, _)| id)
        .collect();
    results_twice.sort();
    let allowed = usize::from(PREFETCH) + produced.republished;
    assert!(
        duplicate_requests <= allowed,
        "{duplicate_requests} jobs sent to Jelou twice: more than the {allowed} that can be in flight"
    );
    assert!(
        duplicate_results <= allowed,
        "{duplicate_results} duplicate results: more than the {allowed} that can be in flight"
    );

    // How long the worker took to move on, as seen by "Jelou" and by /readyz.
    let mut request_times: Vec<Instant> = seen.iter().map(|r| r.at).collect();
    let (gap_start, gap) =
        longest_gap(&mut request_times, fault_at).expect("requests after the fault");
    let resumed = gap_start + gap - fault_at;
    let mut result_times: Vec<Instant> = collected
        .by_job
        .values()
        .flat_map(|g| g.iter().map(|g| g.at))
        .collect();
    let (_, results_gap) =
        longest_gap(&mut result_times, fault_at).expect("results after the fault");
    let after_fault: Vec<&Sample> = samples.iter().filter(|x| x.at >= fault_at).collect();
    let not_ready = after_fault.iter().find(|x| x.ready != Some(200));
    let ready_again = not_ready.and_then(|nr| {
        after_fault
            .iter()
            .find(|x| x.at > nr.at && x.ready == Some(200) && x.connects > before.connects)
    });
    let last = samples.last().expect("samples");
    assert_eq!(last.ready, Some(200), "/readyz is 200 once consuming again");
    assert_ne!(last.node, None, "the worker reports its node");

    if s.fault.hits_workers_node() {
        assert!(
            not_ready.is_some(),
            "/readyz never left 200 although the worker's node failed"
        );
        let again = ready_again.unwrap_or_else(|| {
            panic!(
                "/readyz did not come back to 200 on a new connection {}",
                worker.log_tail(40)
            )
        });
        assert_ne!(again.node, Some(victim), "reconnected to the failed node?");
        assert!(
            after.failovers > before.failovers,
            "the move to another node is not counted in jelou_worker_broker_failovers_total"
        );
    } else {
        // The worker's own node lives: it may keep its connection (the quorum queue
        // client follows the new leader) or reconnect; either way it ends up
        // consuming, and not from the failed node.
        assert_ne!(last.node, Some(victim), "still on the failed node?");
    }
    // A frozen leader: nothing can be consumed until its followers elect a new one.
    let (resume_bound, election) = match s.fault {
        Fault::FreezeLeader(pause) => {
            let elected = leader_elected_at(&names.jobs_queue, victim, fault_wall)
                .and_then(|t| t.duration_since(fault_wall).ok())
                .filter(|e| *e < pause);
            (elected.unwrap_or(pause) + s.resume_within, elected)
        }
        _ => (s.resume_within, None),
    };
    assert!(
        resumed <= resume_bound,
        "the worker sent nothing to Jelou for {gap:?}, until {resumed:?} after the fault \
         (bound {resume_bound:?}; new leader elected after {election:?}) {}",
        worker.log_tail(60)
    );
    if let (Some(thawed), true) = (thawed_at, s.fault.hits_workers_node()) {
        // Its node frozen, not dead: the worker must not wait for it to come back.
        assert!(
            fault_at + resumed < thawed,
            "the worker resumed only after the frozen node came back"
        );
        let during = seen
            .iter()
            .filter(|r| r.at > fault_at + resumed && r.at < thawed)
            .count();
        assert!(during > 0, "no job was processed while the node was frozen");
    }

    let status = worker
        .terminate(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "SIGTERM ends the worker with 0: {status}");
    let rel = |i: Option<&&Sample>| {
        i.map(|x| format!("{} ms", (x.at - fault_at).as_millis()))
            .unwrap_or_else(|| "never".into())
    };
    report(&format!(
        "{name}: {jobs} jobs at {rate}/s, prefetch {PREFETCH}, Jelou latency {lat:?}; \
         worker on c{w}, jobs-queue leader c{l}, failed c{victim}: \
         /readyz 503 at {nr}, 200 again (new connection) at {ra}; \
         Jelou requests resumed {resumed} ms after the fault (longest pause {gap} ms); \
         new jobs-queue leader elected {elected}; \
         longest pause in results {rg} ms; duplicate requests {duplicate_requests}, \
         duplicate results {duplicate_results}; producer republished {rp}, \
         collector reconnects {cr}; worker connects {c0} -> {c1}, failovers {f0} -> {f1}; \
         all results in {done} ms after the fault; test took {took:.1} s; \
         sent twice: {sent_twice:?}; results twice: {results_twice:?}",
        name = s.name,
        jobs = s.jobs,
        rate = s.rate,
        lat = JELOU_LATENCY,
        l = s.leader,
        nr = rel(not_ready),
        ra = rel(ready_again),
        resumed = resumed.as_millis(),
        elected = match (s.fault, election) {
            (Fault::FreezeLeader(_), Some(e)) => format!("{} ms after the fault", e.as_millis()),
            (Fault::FreezeLeader(_), None) => "only after the thaw".to_string(),
            _ => "(not measured)".to_string(),
        },
        gap = gap.as_millis(),
        rg = results_gap.as_millis(),
        rp = produced.republished,
        cr = collected.reconnects,
        c0 = before.connects,
        c1 = after.connects,
        f0 = before.failovers,
        f1 = after.failovers,
        done = (all_in_at - fault_at).as_millis(),
        took = test_started.elapsed().as_secs_f64(),
    ));

    if s.fault.kills() {
        cluster.revive(victim).await;
    }
    names.cleanup(&cluster, t).await;
}

/// Waits until the jobs queue is empty and the worker has nothing in flight, so that
/// late duplicates (redeliveries after a failover) are counted too.
async fn wait_idle(worker: &WorkerProcess, names: &Names, via: u8) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let in_flight = worker.metrics().await.map(|m| m.in_flight);
        let ready = names.jobs_ready(&starting_at(via)).await;
        if in_flight == Some(0) && ready == Some(0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not settle: {in_flight:?} in flight, {ready:?} jobs ready {}",
            worker.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Six workers, each given the nodes in another order, land on at least two nodes
/// (all on one node has probability 3 x (1/3)^6 = 1/243 with a random start), and
/// all of them take jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs JELOU_CLUSTER_TESTS=1 (a 3-node cluster); .ci/run sets it"]
async fn workers_spread_over_the_nodes_and_share_the_jobs() {
    let test_started = Instant::now();
    let cluster = Cluster::require().await;
    let names = Names::new("spread");
    let jelou = StandIn::start().await.expect("start the stand-in Jelou");
    jelou.always(Reply::Success.after(JELOU_LATENCY));
    names.declare_jobs_queue_on(1).await;
    names.declare_results_queue_on(1).await;
    let config = WorkerConfig {
        names: names.clone(),
        jelou_base_url: jelou.base_url(),
        prefetch: PREFETCH,
    };
    let orders: [[u8; 3]; 6] = [
        [1, 2, 3],
        [1, 3, 2],
        [2, 1, 3],
        [2, 3, 1],
        [3, 1, 2],
        [3, 2, 1],
    ];
    let mut workers: Vec<WorkerProcess> = orders
        .iter()
        .enumerate()
        .map(|(i, order)| {
            let log = output_dir().join(format!("spread-worker-{i}.log"));
            WorkerProcess::start(&config, &worker_urls(order), log)
        })
        .collect();
    let mut nodes = Vec::new();
    for w in &mut workers {
        nodes.push(w.wait_ready(Duration::from_secs(30)).await);
    }
    let mut distinct = nodes.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() >= 2,
        "all six workers connected to c{}: the start node is not random",
        distinct[0]
    );

    let jobs = 300;
    let collector = Collector::start(names.results_queue.clone(), starting_at(1));
    let produced = produce(
        names.jobs_queue.clone(),
        names.prefix.clone(),
        jobs,
        300,
        starting_at(1),
    )
    .await
    .expect("the producer did not panic")
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(produced.confirmed, jobs);
    let ids: Vec<String> = (0..jobs)
        .map(|i| format!("{}-{i:05}", names.prefix))
        .collect();
    collector
        .wait_for(&ids, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let collected = collector.stop().await;
    assert_eq!(collected.by_job.len(), jobs);

    let mut finished = Vec::new();
    for w in &workers {
        finished.push(w.metrics().await.expect("metrics").jobs_finished);
    }
    assert_eq!(
        finished.iter().sum::<u64>(),
        jobs as u64,
        "each job finished once (no failure here)"
    );
    assert!(
        finished.iter().all(|n| *n > 0),
        "every worker takes a share of the queue: {finished:?}"
    );
    for w in workers {
        let status = w
            .terminate(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(status.success(), "SIGTERM ends the worker with 0: {status}");
    }
    report(&format!(
        "spread: 6 workers with the 6 orders of the node list landed on nodes {nodes:?}; \
         jobs finished per worker {finished:?}; test took {:.1} s",
        test_started.elapsed().as_secs_f64()
    ));
    names.cleanup(&cluster, 1).await;
}
