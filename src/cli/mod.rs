//! The subcommands other than `run` (which is [`crate::worker`]).

pub mod check;
pub mod demo;
pub mod dlq;
pub mod enqueue;
pub mod probe;
pub mod validate;
