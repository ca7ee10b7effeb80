//! Messages read back from the broker, and the jobs tests publish.

use std::{collections::HashMap, time::Duration};

use lapin::{BasicProperties, message::Delivery, types::AMQPValue};
use serde_json::Value;

/// A message read back from the broker.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: Vec<u8>,
    pub routing_key: String,
    pub properties: BasicProperties,
}

impl From<Delivery> for Received {
    fn from(d: Delivery) -> Self {
        Self {
            body: d.data,
            routing_key: d.routing_key.to_string(),
            properties: d.properties,
        }
    }
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn header(&self, name: &str) -> Option<AMQPValue> {
        self.properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name).cloned())
    }

    pub fn header_str(&self, name: &str) -> Option<String> {
        match self.header(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }
    }

    pub fn correlation_id(&self) -> Option<String> {
        self.properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string())
    }
}

/// Results indexed by jobId.
pub fn by_job_id(results: &[Received]) -> HashMap<String, Value> {
    results
        .iter()
        .map(|r| {
            let v = r.json();
            (v["jobId"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

/// A valid text job.
pub fn text_job(job_id: &str, bot: &str) -> Value {
    serde_json::json!({
        "jobId": job_id,
        "botId": bot,
        "message": {"type": "text", "userId": "593987654321", "text": "Hello"}
    })
}

/// Reads results until every id in `ids` has at least one; returns them all by jobId.
pub async fn results_for(
    env: &super::TestEnv,
    ids: &[String],
    timeout: Duration,
) -> HashMap<String, Vec<Value>> {
    let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while ids.iter().any(|id| !by_id.contains_key(id)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing results for {:?}",
            ids.iter()
                .filter(|id| !by_id.contains_key(*id))
                .take(10)
                .collect::<Vec<_>>()
        );
        drain_rest(env, &mut by_id).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    by_id
}

/// Adds whatever results are queued now to `by_id`.
pub async fn drain_rest(env: &super::TestEnv, by_id: &mut HashMap<String, Vec<Value>>) {
    for r in env.drain(&env.results_queue.clone()).await {
        let v = r.json();
        by_id
            .entry(v["jobId"].as_str().unwrap().to_string())
            .or_default()
            .push(v);
    }
}
