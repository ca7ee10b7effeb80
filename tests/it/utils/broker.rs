//! The real RabbitMQ the tests run against.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

pub const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const CLIENT_ID: &str = "test-client";
pub const CLIENT_SECRET: &str = "test-secret";

/// The broker URL tests use (`JELOU_TEST_AMQP_URL` overrides).
pub fn broker_url() -> String {
    std::env::var("JELOU_TEST_AMQP_URL").unwrap_or_else(|_| BROKER.to_string())
}

/// Connects, or fails the test with a message that says how to start RabbitMQ.
pub async fn connect() -> Connection {
    match tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&broker_url(), ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "RabbitMQ is not reachable at {} ({e}). These tests need the real broker: \
             start it with `rabbitmq-server -detached` and wait for `rabbitmqctl await_startup`",
            broker_url()
        ),
        Err(_) => panic!(
            "RabbitMQ at {} did not answer within 10 s. Start it with `rabbitmq-server -detached`",
            broker_url()
        ),
    }
}
