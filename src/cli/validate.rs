//! `jelou-worker validate`: checks jobs (JSON lines from a file or stdin) by the
//! rules the worker applies when it reads them (contract section 1, and Jelou's rules
//! per message type unless `jelou.validate_messages` is off), without a broker or
//! credentials, so that producers can run it in their own CI.
//!
//! Each invalid line is printed with its number and reason, as `enqueue` and the
//! result's `error.message` word it; the exit status is non-zero if any line is
//! invalid.

use std::{
    io::{BufRead, Write},
    path::Path,
};

use anyhow::Context;

use crate::{config::Settings, job::parse_job_with};

/// What checking a set of lines found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Non-blank lines read.
    pub checked: usize,
    /// Those a worker would refuse, with their line numbers and reasons.
    pub invalid: Vec<(usize, String)>,
    /// Valid lines whose message type has no rules here (sent as given), with the type.
    pub unchecked: Vec<(usize, String)>,
}

/// Checks every non-blank line of `input`.
pub fn check(input: impl BufRead, max_bytes: usize, validate: bool) -> anyhow::Result<Report> {
    let mut report = Report::default();
    for (i, line) in input.split(b'\n').enumerate() {
        let line = line.context("cannot read the jobs")?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        report.checked += 1;
        // The jobId fallback is irrelevant here: any id will do.
        match parse_job_with(&line, Some("-"), max_bytes, validate) {
            Ok(job) => {
                if let Some(t) = job.unchecked_type {
                    report.unchecked.push((i + 1, t));
                }
            }
            Err(invalid) => report.invalid.push((i + 1, invalid.reason)),
        }
    }
    Ok(report)
}

/// Runs the command on `path` (`-` or none: stdin), printing to `out`; Ok(true) when
/// every line is valid.
pub fn run(settings: &Settings, path: Option<&Path>, out: &mut impl Write) -> anyhow::Result<bool> {
    let max = settings.amqp.max_job_bytes;
    let validate = settings.jelou.validate_messages;
    let report = match path {
        Some(p) if p.as_os_str() != "-" => check(
            std::io::BufReader::new(
                std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?,
            ),
            max,
            validate,
        )?,
        _ => check(std::io::stdin().lock(), max, validate)?,
    };
    for (line, reason) in &report.invalid {
        writeln!(out, "line {line}: {reason}")?;
    }
    for (line, t) in &report.unchecked {
        let shown: String = t.chars().take(64).collect();
        writeln!(
            out,
            "line {line}: note: message type {shown:?} has no rules in this worker: it is sent as given, unchecked"
        )?;
    }
    let rules = if validate {
        "the contract and Jelou's rules per message type"
    } else {
        "the contract's base checks only (jelou.validate_messages is off)"
    };
    if report.invalid.is_empty() {
        writeln!(
            out,
            "{} job(s) checked by {rules}: all valid",
            report.checked
        )?;
    } else {
        writeln!(
            out,
            "{} of {} job(s) invalid by {rules}",
            report.invalid.len(),
            report.checked
        )?;
    }
    Ok(report.invalid.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_each_invalid_line_with_its_number_and_reason() {
        let input = concat!(
            r#"{"botId":"B","message":{"type":"text","userId":"u","text":"Hola"}}"#,
            "\n\n",
            r#"{"botId":"B","message":{"type":"image","userId":"u","mediaUrl":"http://x/a.png"}}"#,
            "\n",
            r#"{"botId":"B","message":{"type":"poll","userId":"u"}}"#,
            "\n",
            r#"{"botId":"B","userId":"u","template":{"elementName":"x"}}"#,
            "\n",
            "not json\n",
        );
        let report = check(input.as_bytes(), 262_144, true).unwrap();
        assert_eq!(report.checked, 5);
        assert_eq!(
            report.invalid[..2],
            [
                (3, "message.mediaUrl: must be an https:// URL".to_string()),
                (5, "template.language: required".to_string()),
            ]
        );
        assert_eq!(report.invalid[2].0, 6);
        assert_eq!(report.unchecked, [(4, "poll".to_string())]);
        // Validation off: only the base checks.
        let report = check(input.as_bytes(), 262_144, false).unwrap();
        assert_eq!(report.invalid.len(), 1);
    }
}
