//! The integration tests: one binary, one module per subject, all against the real
//! local RabbitMQ (never a mock) and a stand-in Jelou. `utils` is the shared harness.
//!
//! ```sh
//! cargo test --locked --test it                  # all of them (cluster tests are ignored)
//! cargo test --locked --test it -- end_to_end::  # one module
//! ```

mod utils;

mod bench_smoke;
mod cluster;
mod end_to_end;
mod faults;
mod hostile;
mod messages;
mod observability;
mod operations;
mod order;
mod refused_results;
mod tls;
