//! The subcommands other than `run` (which is [`crate::worker`]).
//!
//! They talk to a person: a failure is one plain line on stderr, `error: ...`, and
//! the exit status is 2 for a command given wrongly (as for clap's own errors) and 1
//! for any other failure. Only `run`, the daemon, reports in the configured log format.

pub mod check;
pub mod demo;
pub mod dlq;
pub mod enqueue;
pub mod probe;
pub mod validate;

/// A command given wrongly (nothing to do, contradictory or unknown values): like
/// clap's own errors, it exits with status 2. Carried inside an `anyhow::Error`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit status 2 for a [`UsageError`], 1 for any other failure.
pub fn exit_status(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<UsageError>().is_some() {
        2
    } else {
        1
    }
}

/// The one plain line that reports `error` to a person: `error: ` and the error with
/// its causes, on one line.
pub fn error_line(error: &impl std::fmt::Display) -> String {
    let text = format!("{error:#}");
    let one_line: Vec<&str> = text.lines().map(str::trim).collect();
    format!("error: {}", one_line.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_exit_2_and_others_1() {
        let usage = anyhow::Error::new(UsageError("say what to replay".into()));
        assert_eq!(exit_status(&usage), 2);
        assert_eq!(exit_status(&anyhow::anyhow!("broker down")), 1);
    }

    #[test]
    fn an_error_is_one_plain_line_with_its_causes() {
        let e = anyhow::anyhow!("refused\nby the broker").context("cannot connect");
        assert_eq!(
            error_line(&e),
            "error: cannot connect: refused by the broker"
        );
    }
}
