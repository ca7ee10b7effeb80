//! The subcommands other than `run` (which is [`crate::worker`]).

pub mod enqueue;
pub mod probe;
