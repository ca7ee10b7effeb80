//! The end of a job: for a failure, its body kept in the dead-letter queue; then its
//! result published; both confirmed by the broker; then the ack.

use chrono::Utc;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};

use super::{
    decide,
    finished::{Finished, Progress},
    job_run::{Ended, JobRun},
};
use crate::{
    broker::{BrokerError, Published},
    job::header,
    metrics::OutcomeLabels,
    outcome::JobOutcome,
    result::{ResultFor, result_body},
};

impl JobRun {
    /// Completes a job that ended here, from scratch.
    pub(crate) async fn finish(&self, outcome: JobOutcome, attempts: u32) -> Ended {
        self.complete(outcome, attempts, Progress::default()).await
    }

    /// For a failure, keeps the job in the dead-letter queue first (so that whoever
    /// sees the failure result can already replay it); then publishes the result;
    /// both confirmed; then acks. What could not be published is remembered, so a
    /// redelivery of this job to this worker finishes it without sending it again.
    pub(crate) async fn complete(
        &self,
        outcome: JobOutcome,
        attempts: u32,
        mut progress: Progress,
    ) -> Ended {
        let completed_at = Utc::now();
        if !progress.dead_lettered
            && let JobOutcome::Failure(f) = &outcome
        {
            let headers = decide::dead_letter_headers(
                self.delivery.properties.headers().as_ref(),
                f,
                attempts,
                &self.ident.job_id,
                completed_at,
            );
            if let Err(e) = self.dead_letter(headers).await {
                return self.remember(outcome, attempts, progress, e);
            }
            progress.dead_lettered = true;
        }
        if !progress.result_published {
            if let Err(e) = self.publish_result(&outcome, attempts, completed_at).await {
                return self.remember(outcome, attempts, progress, e);
            }
            progress.result_published = true;
        }
        self.ack();
        self.record(&outcome, attempts, completed_at);
        // Remembered even when acked: an ack is only written to the socket, and is lost
        // if the node dies before reading it (kill -9 of the worker's node). The broker
        // then redelivers the job, and without this it would be sent to Jelou again.
        self.keep(outcome, attempts, progress);
        Ended::Completed
    }

    /// Keeps the failed job's body in the dead-letter queue (confirmed).
    async fn dead_letter(&self, headers: FieldTable) -> Result<(), BrokerError> {
        let s = &self.shared.settings.amqp;
        let properties = self
            .delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        let routing_key = self.delivery.routing_key.as_str();
        let published = self
            .session
            .publisher
            .publish(
                &s.dead_letter_exchange,
                routing_key,
                &self.delivery.data,
                properties,
            )
            .await?;
        if published == Published::Unroutable {
            tracing::error!(exchange = %s.dead_letter_exchange, "no queue is bound to the dead-letter exchange: the failed job's body is not kept");
        }
        Ok(())
    }

    /// Publishes the result (confirmed).
    async fn publish_result(
        &self,
        outcome: &JobOutcome,
        attempts: u32,
        completed_at: chrono::DateTime<Utc>,
    ) -> Result<(), BrokerError> {
        let s = &self.shared.settings.amqp;
        let about = ResultFor {
            job_id: &self.ident.job_id,
            bot_id: self.ident.bot_id.as_deref(),
            user_id: self.ident.user_id.as_deref(),
        };
        let body = result_body(about, outcome, attempts, completed_at);
        let routing_key = match outcome {
            JobOutcome::Success { .. } => &s.success_routing_key,
            JobOutcome::Failure(_) => &s.failure_routing_key,
        };
        let published = self
            .session
            .publisher
            .publish(
                &s.result_exchange,
                routing_key,
                &body,
                self.result_properties(),
            )
            .await?;
        if published == Published::Unroutable {
            self.shared.metrics.results_unroutable.inc();
            tracing::warn!(
                exchange = %s.result_exchange,
                routing_key,
                "no queue is bound to receive this result: it is lost to consumers, but the job is done and is not sent again"
            );
        }
        Ok(())
    }

    /// Metrics and the one log line of a finished job.
    fn record(&self, outcome: &JobOutcome, attempts: u32, completed_at: chrono::DateTime<Utc>) {
        let (status, kind) = match outcome {
            JobOutcome::Success { .. } => ("success", "none"),
            JobOutcome::Failure(f) => ("failure", f.kind.as_str()),
        };
        let metrics = &self.shared.metrics;
        metrics
            .jobs_finished
            .get_or_create(&OutcomeLabels { status, kind })
            .inc();
        if let Some(ts) = self.delivery.properties.timestamp() {
            let age = completed_at.timestamp_millis() as f64 / 1000.0 - *ts as f64;
            if age >= 0.0 {
                metrics.job_latency.observe(age);
            }
        }
        let duration_ms = self.started.elapsed().as_millis() as u64;
        match outcome {
            JobOutcome::Success { message_id } => {
                tracing::info!(
                    outcome = "success",
                    message_id,
                    attempts,
                    duration_ms,
                    "job finished"
                )
            }
            JobOutcome::Failure(f) => tracing::info!(
                outcome = "failure",
                kind = f.kind.as_str(),
                http_status = f.http_status,
                error = %f.message,
                attempts,
                duration_ms,
                "job finished"
            ),
        }
    }

    fn remember(
        &self,
        outcome: JobOutcome,
        attempts: u32,
        progress: Progress,
        error: BrokerError,
    ) -> Ended {
        // Refusals are reported once per episode by the publisher, not once per job.
        if let BrokerError::Refused { .. } = error {
            tracing::debug!(error = %error, "the outcome could not be published; it is kept here for the job's redelivery");
        } else {
            tracing::warn!(error = %error, "could not publish the outcome; it is kept here for the job's redelivery");
        }
        // Kept before the session is failed: the redelivery must find it.
        self.keep(outcome, attempts, progress);
        self.session.fail(&error);
        Ended::Abandoned
    }

    /// Remembers how this job ended, for a redelivery of it to this worker.
    fn keep(&self, outcome: JobOutcome, attempts: u32, progress: Progress) {
        let finished = Finished {
            outcome,
            attempts,
            progress,
        };
        self.shared.finished.put(self.cache_key(), finished);
    }

    /// Acks the delivery. The ack is coalesced with those of other jobs and written
    /// shortly after; if it is lost (the connection drops first) the broker redelivers
    /// the job, and the finished-job cache finishes it without a second send.
    pub(crate) fn ack(&self) {
        self.acks.ack(self.delivery.delivery_tag);
    }

    fn result_properties(&self) -> BasicProperties {
        let correlation = self
            .delivery
            .properties
            .correlation_id()
            .clone()
            .or_else(|| ShortString::try_new(self.ident.job_id.as_str()).ok());
        let mut headers = FieldTable::default();
        headers.insert(
            header::JOB_ID.into(),
            AMQPValue::LongString(self.ident.job_id.as_str().into()),
        );
        let p = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(Utc::now().timestamp().max(0) as u64)
            .with_headers(headers);
        match correlation {
            Some(c) => p.with_correlation_id(c),
            None => p,
        }
    }
}
