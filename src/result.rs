//! Building the result message (contract section 3). Pure.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::outcome::JobOutcome;

/// What a result says about the job it answers.
#[derive(Debug, Clone, Copy)]
pub struct ResultFor<'a> {
    pub job_id: &'a str,
    pub bot_id: Option<&'a str>,
    pub user_id: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResultBody<'a> {
    job_id: &'a str,
    status: &'static str,
    message_id: Option<&'a str>,
    bot_id: Option<&'a str>,
    user_id: Option<&'a str>,
    attempts: u32,
    error: Option<ErrorBody<'a>>,
    completed_at: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody<'a> {
    kind: &'static str,
    message: &'a str,
    http_status: Option<u16>,
    code: Option<&'a str>,
}

/// The JSON body of a result.
pub fn result_body(
    job: ResultFor<'_>,
    outcome: &JobOutcome,
    attempts: u32,
    completed_at: DateTime<Utc>,
) -> Vec<u8> {
    let (status, message_id, error) = match outcome {
        JobOutcome::Success { message_id } => ("success", Some(message_id.as_str()), None),
        JobOutcome::Failure(f) => (
            "failure",
            None,
            Some(ErrorBody {
                kind: f.kind.as_str(),
                message: &f.message,
                http_status: f.http_status,
                code: f.code.as_deref(),
            }),
        ),
    };
    let body = ResultBody {
        job_id: job.job_id,
        status,
        message_id,
        bot_id: job.bot_id,
        user_id: job.user_id,
        attempts,
        error,
        completed_at: completed_at.to_rfc3339_opts(SecondsFormat::Millis, true),
    };
    serde_json::to_vec(&body).expect("a result always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{ErrorKind, JobFailure};
    use serde_json::json;

    fn at() -> DateTime<Utc> {
        "2026-11-24T17:00:01.234Z".parse().unwrap()
    }

    #[test]
    fn success_result_matches_the_contract_example() {
        let body = result_body(
            ResultFor {
                job_id: "order-42-welcome",
                bot_id: Some("BOT_ID"),
                user_id: Some("593987654321"),
            },
            &JobOutcome::Success {
                message_id: "msg_123456789".into(),
            },
            1,
            at(),
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({
                "jobId": "order-42-welcome", "status": "success", "messageId": "msg_123456789",
                "botId": "BOT_ID", "userId": "593987654321", "attempts": 1, "error": null,
                "completedAt": "2026-11-24T17:00:01.234Z"
            })
        );
    }

    #[test]
    fn failure_result_carries_the_error_object() {
        let failure = JobFailure {
            kind: ErrorKind::RetriesExhausted,
            message: "Jelou answered 503".into(),
            http_status: Some(503),
            code: Some("E1".into()),
        };
        let body = result_body(
            ResultFor {
                job_id: "j",
                bot_id: None,
                user_id: None,
            },
            &JobOutcome::Failure(failure),
            8,
            at(),
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], "failure");
        assert_eq!(v["messageId"], serde_json::Value::Null);
        assert_eq!(v["botId"], serde_json::Value::Null);
        assert_eq!(v["attempts"], 8);
        assert_eq!(
            v["error"],
            json!({"kind": "retries_exhausted", "message": "Jelou answered 503", "httpStatus": 503, "code": "E1"})
        );
    }
}
