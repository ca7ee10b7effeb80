//! What a test leaves on the broker, and its removal when the test's `TestEnv` is
//! dropped.

use std::time::Duration;

use lapin::{
    Connection, ConnectionProperties,
    options::{ExchangeDeleteOptions, QueueDeleteOptions},
};

use super::{broker::broker_url, env::TestEnv};

/// The queues and exchanges one test declared.
pub(super) struct Leftovers {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Leftovers {
    /// Every queue the worker declares, as the worker names them, plus the test's own.
    pub(super) fn of(env: &TestEnv) -> Self {
        let a = &env.settings.amqp;
        let topology = jelou_worker::broker::Topology::for_settings(&env.settings);
        let mut queues = topology.queue_names();
        // The ordered-work queues, whether or not a worker of this test ran in order.
        let mut ordered = env.settings.clone();
        ordered.order.enabled = true;
        ordered.order.partitions = ordered.order.partitions.max(16);
        let ordered = jelou_worker::broker::Topology::for_settings(&ordered);
        queues.extend(
            ordered
                .queue_names()
                .into_iter()
                .filter(|q| q.contains(".order.")),
        );
        queues.push(env.results_queue.clone());
        // A worker started with other retry settings than `env.settings` may have
        // declared other delay queues: every power of two a test could produce.
        queues.extend((0..13).map(|k| format!("{}.delay.{}s", a.jobs_queue, 1u64 << k)));
        queues.extend(env.extra_queues.iter().cloned());
        Self {
            queues,
            exchanges: vec![a.result_exchange.clone(), a.dead_letter_exchange.clone()],
        }
    }

    /// Deletes them from a thread of its own (with a runtime and a connection of its
    /// own: the test's runtime may be the one blocked here), and waits for it. Never
    /// panics: it also runs while a failed test unwinds.
    pub(super) fn delete_blocking(self) {
        let thread = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(30), self.delete()).await;
            });
        });
        let _ = thread.join();
    }

    async fn delete(&self) {
        let Ok(conn) = Connection::connect(&broker_url(), ConnectionProperties::default()).await
        else {
            return;
        };
        // A channel per queue: an error closes the channel it happened on.
        for q in &self.queues {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        for x in &self.exchanges {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = conn.close(200, "done".into()).await;
    }
}
