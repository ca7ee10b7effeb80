//! The ceiling: the worker's broker path (consume with a prefetch, publish a result
//! with publisher confirms, ack) and nothing else: no HTTP, no parsing, no logs, no
//! metrics. Written as a minimal, well-tuned lapin program: one channel consuming,
//! one publishing, a task per delivery so that confirms overlap, on the same runtime
//! as the worker's (tokio's multi-threaded default).

use std::{process::ExitCode, sync::Arc};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use jelou_worker::{
    broker,
    config::{AmqpSettings, Settings},
    outcome::JobOutcome,
    result::{ResultFor, result_body},
};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, Consumer,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions,
    },
    types::{FieldTable, ShortString},
};
use tokio::signal::unix::{SignalKind, signal};

pub(crate) fn main() -> ExitCode {
    let settings = match Settings::load(None) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("null pipeline: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("null pipeline: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("null pipeline: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Consumes until SIGTERM.
async fn run(settings: Settings) -> anyhow::Result<()> {
    let amqp = &settings.amqp;
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let broker::Connected { connection, .. } =
        broker::connect(amqp, "jelou-bench null pipeline").await?;
    let (publishing, mut consumer) = open_channels(&connection, amqp).await?;
    let body = fixed_result();
    let exchange = ShortString::from(amqp.result_exchange.as_str());
    let routing_key = ShortString::from(amqp.success_routing_key.as_str());
    loop {
        tokio::select! {
            _ = term.recv() => break,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    tokio::spawn(finish(
                        publishing.clone(),
                        exchange.clone(),
                        routing_key.clone(),
                        body.clone(),
                        delivery,
                    ));
                }
                Some(Err(e)) => return Err(e).context("consuming"),
                None => bail!("the broker cancelled the consumer (queue deleted?)"),
            },
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// A channel with publisher confirms to publish results on, and a consumer of the
/// jobs queue (with the prefetch) on a channel of its own.
async fn open_channels(
    connection: &Connection,
    amqp: &AmqpSettings,
) -> anyhow::Result<(Channel, Consumer)> {
    let publishing = connection
        .create_channel()
        .await
        .context("opening the publishing channel")?;
    publishing
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    let consuming = connection
        .create_channel()
        .await
        .context("opening the consuming channel")?;
    consuming
        .basic_qos(amqp.prefetch, BasicQosOptions::default())
        .await
        .context("setting the prefetch")?;
    let consumer = consuming
        .basic_consume(
            amqp.jobs_queue.as_str().into(),
            "jelou-bench-null-pipeline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("consuming the jobs queue")?;
    Ok((publishing, consumer))
}

/// A real success result, built once: the same size on the wire as the worker's.
fn fixed_result() -> Arc<[u8]> {
    // A userId of the same length as every bench job's.
    let user_id = crate::amqp::user_id(0);
    result_body(
        ResultFor {
            job_id: "b00000000-0-0",
            bot_id: Some(crate::BOT_ID),
            user_id: Some(&user_id),
        },
        &JobOutcome::Success {
            message_id: "msg-1".into(),
        },
        1,
        chrono::Utc::now(),
    )
    .into()
}

/// Publishes the fixed result (correlation_id = the job's message_id), waits for
/// its confirm, acks the job.
async fn finish(
    channel: Channel,
    exchange: ShortString,
    routing_key: ShortString,
    body: Arc<[u8]>,
    delivery: Delivery,
) {
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    if let Some(id) = delivery.properties.message_id().clone() {
        properties = properties.with_correlation_id(id);
    }
    let finished = async {
        let confirm = channel
            .basic_publish(
                exchange,
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await
            .context("publishing a result")?;
        match confirm.await.context("waiting for a result's confirm")? {
            Confirmation::Ack(None) => {}
            _ => bail!("the broker did not take a result"),
        }
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .context("acking a job")?;
        anyhow::Ok(())
    };
    if let Err(e) = finished.await {
        eprintln!("null pipeline: {e:#}");
    }
}
