//! Per-user order across a fleet (contract section 4; `order.enabled`).
//!
//! Producers publish to the jobs queue as always. One worker of the fleet, the one
//! that holds the router's token, moves each job to the partition queue of its user
//! (`hash(botId, userId) mod order.partitions`), stamped with a sequence number.
//! Each partition is owned by one worker at a time (the holder of the token in its
//! lock queue, see [`lease`]), which holds the partition's jobs in per-user lanes ([`lanes`]) and
//! starts a user's next job only when the previous one has ended. A job that must wait
//! long (its retry, its bot's pause or pacing, its user's pacing) goes to the
//! partition's wait queue, which the owner holds in memory without using a slot of the
//! partition queue, so other users and bots go on.
//!
//! Every worker takes about an equal share of the partitions ([`balance`]): the fleet's
//! size is the consumer count of the members queue, and a worker over its share hands
//! partitions back (see [`partition`]); a worker under its share watches the others'
//! partitions and takes those handed back, or left by a worker that died.
//!
//! | file | concern |
//! |---|---|
//! | [`router`] | jobs queue → partition queues, in order |
//! | [`partition`] | one partition: take over, run, hand back |
//! | [`lanes`] | which held job may start, which must wait on the broker (pure) |
//! | [`balance`] | how many partitions to own (pure) |
//! | [`lease`] | ownership by token |

mod balance;
mod lanes;
mod lease;
mod partition;
mod router;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use lapin::Connection;
use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    broker::{BrokerError, bounded, consume},
    pipeline::{Session, Shared, Stops},
};

/// How often each worker looks at the fleet's size and its share.
const REBALANCE_EVERY: Duration = Duration::from_secs(1);

/// What the ordered consumption needs from its session, shared by the router's and
/// the partitions' tasks.
pub(crate) struct Ctx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) connection: Arc<Connection>,
    pub(crate) session: Arc<Session>,
    pub(crate) tracker: TaskTracker,
    pub(crate) stops: Stops,
    /// The session's consumer tag, which every consumer's tag starts with.
    pub(crate) tag: String,
}

/// A partition task, as the balancer keeps it.
struct Handle {
    state: Arc<AtomicU8>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), String>>,
}

/// Order on: routes and works partitions until shutdown (`Ok(None)`) or a failure
/// (`Ok(Some(reason))`).
pub(crate) async fn consume(ctx: Arc<Ctx>) -> Result<Option<String>, BrokerError> {
    let timeout = ctx.shared.settings.amqp.operation_timeout();
    let members_channel = bounded(timeout, "channel.open", ctx.connection.create_channel()).await?;
    let members = ctx.shared.topology.members_queue();
    let _membership = consume::consume(
        &members_channel,
        &members,
        &format!("{}-member", ctx.tag),
        1,
        timeout,
    )
    .await?;
    let mut router = tokio::spawn(router::run(ctx.clone()));
    ctx.shared.set_ready(true);
    tracing::info!(
        partitions = ctx.shared.topology.partitions,
        prefetch = ctx.shared.settings.amqp.prefetch,
        "consuming, in order per user"
    );
    let mut partitions: HashMap<u16, Handle> = HashMap::new();
    let mut tick = tokio::time::interval(REBALANCE_EVERY);
    let end = loop {
        tokio::select! {
            _ = ctx.stops.shutdown.cancelled() => break None,
            _ = ctx.session.lost.cancelled() => break Some("the session was lost".to_string()),
            routed = &mut router => break Some(match routed {
                Ok(()) => "the router stopped".into(),
                Err(e) => format!("the router panicked: {e}"),
            }),
            _ = tick.tick() => {
                if !ctx.connection.status().connected() {
                    break Some("the connection was lost".to_string());
                }
                if let Some(reason) = reap(&mut partitions) {
                    break Some(reason);
                }
                let (_, workers) = match lease::counts(&members_channel, &members, timeout).await {
                    Ok(c) => c,
                    Err(e) => break Some(e.to_string()),
                };
                if let Err(e) = rebalance(&ctx, &mut partitions, workers).await {
                    break Some(e.to_string());
                }
            }
        }
    };
    ctx.shared.set_ready(false);
    if end.is_some() {
        router.abort();
        for h in partitions.values() {
            h.task.abort();
        }
        return Ok(end);
    }
    tracing::info!("shutting down: routing stops; partitions are handed back as their jobs finish");
    // The router first: what it routes while it stops reaches partitions that still
    // consume, and is handed back with the rest. (A partition that stopped consuming
    // first could be assigned a job it never sees: the broker would return it to the
    // back of the partition queue, behind its user's later jobs.) Then each partition
    // finishes its running jobs (within the grace period), hands back what it holds,
    // and returns its token.
    let _ = router.await;
    for h in partitions.values() {
        h.stop.cancel();
    }
    for (_, h) in partitions.drain() {
        let _ = h.task.await;
    }
    Ok(None)
}

/// Removes ended partition tasks. A partition that failed (a subscription that got
/// no answer, a closed channel) is watched again at the next tick; only a panic ends
/// the session.
fn reap(partitions: &mut HashMap<u16, Handle>) -> Option<String> {
    let ended: Vec<u16> = partitions
        .iter()
        .filter(|(_, h)| h.task.is_finished())
        .map(|(p, _)| *p)
        .collect();
    for p in ended {
        let h = partitions.remove(&p).expect("listed");
        match futures_util::FutureExt::now_or_never(h.task) {
            Some(Ok(Ok(()))) | None => {}
            Some(Ok(Err(reason))) => {
                tracing::warn!(
                    partition = p,
                    reason,
                    "a partition stopped; watching it again"
                )
            }
            Some(Err(e)) => return Some(format!("partition {p} panicked: {e}")),
        }
    }
    None
}

/// Applies the balancer's plan: hands back the surplus, watches or stops watching.
async fn rebalance(
    ctx: &Arc<Ctx>,
    partitions: &mut HashMap<u16, Handle>,
    workers: u32,
) -> Result<(), BrokerError> {
    let with_state = |s: u8| -> Vec<u16> {
        partitions
            .iter()
            .filter(|(_, h)| h.state.load(Ordering::Relaxed) == s)
            .map(|(p, _)| *p)
            .collect()
    };
    let owned = with_state(partition::OWNING);
    let watched = with_state(partition::WATCHING);
    let plan = balance::plan(ctx.shared.topology.partitions, workers, &owned, &watched);
    for p in plan.release.iter().chain(&plan.unwatch) {
        if let Some(h) = partitions.get(p) {
            h.stop.cancel();
        }
    }
    let timeout = ctx.shared.settings.amqp.operation_timeout();
    for p in plan.watch {
        if partitions.contains_key(&p) {
            continue;
        }
        let open = || bounded(timeout, "channel.open", ctx.connection.create_channel());
        let (lease, channel) = (open().await?, open().await?);
        let state = Arc::new(AtomicU8::new(partition::WATCHING));
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            partition::Partition {
                ctx: ctx.clone(),
                number: p,
                lease,
                channel,
                state: state.clone(),
                stop: stop.clone(),
            }
            .run(),
        );
        partitions.insert(p, Handle { state, stop, task });
    }
    Ok(())
}

/// The bytes a user is partitioned by.
pub(crate) fn user_bytes(bot_id: &str, user_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(bot_id.len() + user_id.len() + 1);
    key.extend_from_slice(bot_id.as_bytes());
    key.push(0);
    key.extend_from_slice(user_id.as_bytes());
    key
}

/// The partition of a key: FNV-1a, fixed here so that every worker, of any version,
/// puts a user in the same partition.
pub(crate) fn partition_of(key: &[u8], partitions: u16) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_always_lands_in_the_same_partition_and_users_spread() {
        let key = user_bytes("bot", "593987654321");
        assert_eq!(partition_of(&key, 16), partition_of(&key, 16));
        // FNV-1a of "a" is 0xaf63dc4c8601ec8c: pinned, so a change of hash (which
        // would reorder users in flight during a rolling deploy) fails here.
        assert_eq!(
            partition_of(b"a", 1 << 15),
            (0xaf63_dc4c_8601_ec8c_u64 % (1 << 15)) as u16
        );
        let mut seen = std::collections::HashSet::new();
        for u in 0..200 {
            seen.insert(partition_of(&user_bytes("bot", &u.to_string()), 16));
        }
        assert_eq!(seen.len(), 16, "200 users reach every one of 16 partitions");
        // The bot is part of the key: the same userId under two bots are two users.
        assert_ne!(user_bytes("a", "bc"), user_bytes("ab", "c"));
    }
}
