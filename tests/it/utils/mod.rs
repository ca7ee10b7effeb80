//! Shared test harness: a real RabbitMQ (never a mock), a stand-in Jelou on
//! loopback, and names unique to each test so tests run in parallel and clean up
//! (when a test's `TestEnv` is dropped, even if the test panicked).
#![allow(dead_code)] // a harness: not every module uses every helper

mod broker;
mod cleanup;
mod env;
mod http;
mod process;
pub mod raw_http;
mod received;

pub use broker::*;
pub use env::*;
pub use http::*;
pub use process::*;
pub use received::*;
