//! jelou-worker: consumes message jobs from RabbitMQ, sends each to Jelou
//! (`POST /v1/bots/{botId}/messages`, or a template to `POST /v2/whatsapp/{botId}/hsm`)
//! with retries, and publishes the outcome.
//!
//! Read the modules in this order; the pure ones are tested without any I/O.
//!
//! | module | concern |
//! |---|---|
//! | [`config`] | every configuration key, layered and validated |
//! | [`job`] | reading a job (message or template), Jelou's rules per message type, and the retry state kept in its headers (pure) |
//! | [`outcome`] | what an attempt and a job came to; classifying Jelou's answers (pure) |
//! | [`retry`] | the backoff schedule and `Retry-After` (pure) |
//! | [`result`] | the result message (pure) |
//! | [`jelou`] | the HTTP client |
//! | [`gate`] | circuit breaker, per-bot rate limit and 429 pauses |
//! | [`broker`] | connecting, topology, confirmed publishing, coalesced acks |
//! | [`pipeline`] | one delivery, from the broker's hand to its ack: decide, send, publish |
//! | [`order`] | per-user order across the fleet: router, partitions, lanes |
//! | [`worker`] | the supervisor and the consuming session (`run`) |
//! | [`server`] | `/metrics`, `/healthz`, `/readyz` |
//! | [`metrics`] | the Prometheus metrics |
//! | [`cli`] | the other subcommands |
//! | [`logging`] | JSON or text logs |
//! | [`stand_in`] | a stand-in Jelou on loopback, for the demo, tests and benchmark |

pub mod broker;
pub mod cli;
pub mod config;
pub mod gate;
pub mod jelou;
pub mod job;
pub mod logging;
pub mod metrics;
pub(crate) mod order;
pub mod outcome;
pub(crate) mod pipeline;
pub mod result;
pub mod retry;
pub mod server;
pub mod stand_in;
pub mod worker;
