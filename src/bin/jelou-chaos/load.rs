//! The steady stream of jobs: conversations of several messages for many users of
//! several bots, some messages Jelou rejects, some jobs that cannot be read.

use std::time::{Duration, Instant};

use anyhow::Context;
use lapin::{BasicProperties, Channel, Connection, options::*};
use tokio_util::sync::CancellationToken;

use crate::jelou::REJECT;

const BOTS: usize = 3;
/// Conversations going on at once.
const ACTIVE: usize = 40;

/// What a job should end as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    Success,
    Rejected,
    Invalid,
}

/// A job that was published (and confirmed by the broker).
#[derive(Debug, Clone)]
pub(crate) struct Published {
    pub(crate) job: String,
    /// The conversation (one bot and user) and the position in it; none for an
    /// unreadable job.
    pub(crate) conv: Option<(u32, u32)>,
    pub(crate) expect: Expect,
    pub(crate) at: Instant,
}

struct Conv {
    id: u32,
    bot: usize,
    len: u32,
    next: u32,
}

/// The generator: deterministic for a seed.
pub(crate) struct Load {
    rng: fastrand::Rng,
    active: Vec<Conv>,
    next_conv: u32,
    invalid: u32,
}

impl Load {
    pub(crate) fn new(seed: u64) -> Self {
        let mut load = Self {
            rng: fastrand::Rng::with_seed(seed ^ 0x10ad),
            active: Vec::new(),
            next_conv: 0,
            invalid: 0,
        };
        while load.active.len() < ACTIVE {
            load.open();
        }
        load
    }

    fn open(&mut self) {
        let conv = Conv {
            id: self.next_conv,
            bot: self.rng.usize(..BOTS),
            len: self.rng.u32(2..=8),
            next: 0,
        };
        self.next_conv += 1;
        self.active.push(conv);
    }

    /// The next job: its body, its jobId (also its AMQP message_id), what it is.
    fn next(&mut self) -> (Vec<u8>, String, Option<(u32, u32)>, Expect) {
        if self.rng.u8(..100) < 4 {
            self.invalid += 1;
            let id = format!("bad{}", self.invalid);
            let body = if self.rng.bool() {
                serde_json::json!({"jobId": id, "botId": "chaos-bot-0"}).to_string()
            } else {
                format!("not json {id}")
            };
            return (body.into_bytes(), id, None, Expect::Invalid);
        }
        let i = self.rng.usize(..self.active.len());
        let c = &mut self.active[i];
        let (conv, pos, bot) = (c.id, c.next, c.bot);
        c.next += 1;
        if c.next == c.len {
            self.active.swap_remove(i);
            self.open();
        }
        let id = format!("c{conv}-{pos}");
        let reject = self.rng.u8(..100) < 5;
        let text = if reject {
            format!("{REJECT}{id}")
        } else {
            id.clone()
        };
        let body = serde_json::json!({
            "jobId": id,
            "botId": format!("chaos-bot-{bot}"),
            "message": {"type": "text", "userId": format!("5939{conv:08}"), "text": text},
        });
        let expect = if reject {
            Expect::Rejected
        } else {
            Expect::Success
        };
        (body.to_string().into_bytes(), id, Some((conv, pos)), expect)
    }
}

/// Publishes `rate` jobs a second to `queue` until `stop`; what was published.
pub(crate) async fn run(
    conn: &Connection,
    queue: &str,
    seed: u64,
    rate: u32,
    stop: CancellationToken,
) -> anyhow::Result<Vec<Published>> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut load = Load::new(seed);
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.is_cancelled() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let (body, job, conv, expect) = load.next();
        let at = Instant::now();
        publish(&ch, queue, &body, &job).await?;
        out.push(Published {
            job,
            conv,
            expect,
            at,
        });
    }
    let _ = ch.close(200, "done".into()).await;
    Ok(out)
}

async fn publish(ch: &Channel, queue: &str, body: &[u8], job: &str) -> anyhow::Result<()> {
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(job.into());
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .context("publishing a job")?
        .await
        .context("waiting for the broker's confirm")?;
    anyhow::ensure!(confirm.is_ack(), "the broker refused job {job}");
    Ok(())
}
