//! `jelou-worker enqueue`: publish jobs from the shell, with publisher confirms.
//!
//! Jobs come from flags (`--bot --user --text`, or `--bot --user --template NAME
//! --language L --param V ...` for a template job) or as JSON, one job per line, from
//! a file or stdin. Each line is checked as the worker would read it; a line that the
//! worker would refuse is reported (line number and reason) and not published. Every
//! published job's jobId is printed once the broker confirmed it. The exit status is
//! non-zero when any line was refused, by this check or by the broker.

use std::{
    io::{BufRead, IsTerminal},
    path::PathBuf,
};

use anyhow::Context;
use chrono::Utc;
use futures_util::{StreamExt, stream};
use lapin::{BasicProperties, types::ShortString};

use crate::{
    broker::{self, Published, Publisher, Topology},
    cli::UsageError,
    config::Settings,
    job::parse_job_with,
};

/// Jobs confirmed concurrently: enough to keep the broker busy.
const IN_FLIGHT: usize = 256;

/// Where the jobs come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// One text job from flags.
    Text {
        bot: String,
        user: String,
        text: String,
        job_id: Option<String>,
    },
    /// One template (HSM) job from flags.
    Template {
        bot: String,
        user: String,
        /// The template's name (`elementName`).
        name: String,
        language: String,
        /// Values for the template's placeholders, in order.
        params: Vec<String>,
        job_id: Option<String>,
    },
    /// JSON lines from a file, or stdin for `-`.
    Lines(PathBuf),
}

/// One job to publish, as read.
struct Line {
    number: usize,
    body: Vec<u8>,
    job_id: String,
    /// Set when the body has no jobId: the worker will use the AMQP message_id.
    message_id: Option<String>,
}

/// Publishes the jobs; returns how many were published and how many refused.
pub async fn run(settings: &Settings, source: Source) -> anyhow::Result<(usize, usize)> {
    let mut refused = 0usize;
    let lines = read_lines(settings, source, &mut refused)?;
    if lines.is_empty() && refused == 0 {
        return Err(UsageError(
            "no job given: pass --bot/--user/--text, or JSON lines with --file (or on stdin)"
                .into(),
        )
        .into());
    }
    let amqp = &settings.amqp;
    let timeout = amqp.operation_timeout();
    let connected = broker::connect(amqp, "jelou-worker enqueue").await?;
    let conn = connected.connection;
    if amqp.declare_topology {
        Topology::for_settings(settings)
            .declare(&conn, timeout)
            .await?;
    }
    let publisher = Publisher::open(&conn, timeout).await?;
    let counts = publish_all(&publisher, &amqp.jobs_queue, lines, refused).await;
    publisher.close().await;
    let _ = conn.close(200, "done".into()).await;
    Ok(counts)
}

/// Publishes the lines to `queue`, [`IN_FLIGHT`] at a time, printing each confirmed
/// jobId and each refusal; returns how many were published and how many refused,
/// counting the `refused` before (which the progress counts as done too).
async fn publish_all(
    publisher: &Publisher,
    queue: &str,
    lines: Vec<Line>,
    mut refused: usize,
) -> (usize, usize) {
    let progress = Progress::new(lines.len());
    let mut published = 0usize;
    let results = stream::iter(lines)
        .map(|line| {
            let publisher = publisher.clone();
            let queue = queue.to_owned();
            async move {
                let props = properties(line.message_id.as_deref());
                let r = publisher.publish("", &queue, &line.body, props).await;
                (line, r)
            }
        })
        .buffered(IN_FLIGHT);
    tokio::pin!(results);
    while let Some((line, r)) = results.next().await {
        match r {
            Ok(Published::Routed) => {
                published += 1;
                println!("{}", line.job_id);
            }
            Ok(Published::Unroutable) => {
                refused += 1;
                eprintln!(
                    "line {}: the broker has no queue `{queue}`: not published",
                    line.number
                );
            }
            Err(e) => {
                refused += 1;
                eprintln!("line {}: not published: {e}", line.number);
            }
        }
        progress.tick(published + refused);
    }
    progress.finish();
    (published, refused)
}

/// A job's AMQP properties: JSON, persistent, stamped now, with the `message_id`
/// the worker will take as its jobId when the body has none.
fn properties(message_id: Option<&str>) -> BasicProperties {
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(Utc::now().timestamp().max(0) as u64);
    match message_id.and_then(|id| ShortString::try_new(id).ok()) {
        Some(id) => props.with_message_id(id),
        None => props,
    }
}

/// The jobs of `source`, each checked as the worker would read it; a job the worker
/// would refuse is reported on stderr, counted in `refused` and left out.
fn read_lines(
    settings: &Settings,
    source: Source,
    refused: &mut usize,
) -> anyhow::Result<Vec<Line>> {
    let raw = match source {
        Source::Text {
            bot,
            user,
            text,
            job_id,
        } => flag_job(
            serde_json::json!({
                "botId": bot,
                "message": {"type": "text", "userId": user, "text": text},
            }),
            job_id,
        )?,
        Source::Template {
            bot,
            user,
            name,
            language,
            params,
            job_id,
        } => flag_job(
            serde_json::json!({
                "botId": bot,
                "userId": user,
                "template": {"elementName": name, "language": language, "parameters": params},
            }),
            job_id,
        )?,
        Source::Lines(path) => json_lines(&path)?,
    };
    Ok(check_lines(settings, raw, refused))
}

/// The one job of flags, as line 1, with its jobId if one was given.
fn flag_job(
    mut job: serde_json::Value,
    job_id: Option<String>,
) -> anyhow::Result<Vec<(usize, Vec<u8>)>> {
    if let Some(id) = job_id {
        job["jobId"] = serde_json::Value::String(id);
    }
    Ok(vec![(1, serde_json::to_vec(&job)?)])
}

/// The non-blank lines of a file, or of stdin for `-`, with their line numbers.
fn json_lines(path: &std::path::Path) -> anyhow::Result<Vec<(usize, Vec<u8>)>> {
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        if std::io::stdin().is_terminal() {
            eprintln!("reading jobs from stdin, one JSON object per line (Ctrl-D to end)");
        }
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        ))
    };
    let mut out = Vec::new();
    for (i, line) in reader.split(b'\n').enumerate() {
        let line = line.context("cannot read the jobs")?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        out.push((i + 1, line));
    }
    Ok(out)
}

/// Checks each body as the worker would read it: the ones it accepts, with the jobId
/// it will use; the others are reported on stderr and counted in `refused`.
fn check_lines(settings: &Settings, raw: Vec<(usize, Vec<u8>)>, refused: &mut usize) -> Vec<Line> {
    let mut lines = Vec::with_capacity(raw.len());
    for (number, body) in raw {
        // The id we print must be the one the worker will use: generate it here and
        // pass it as the AMQP message_id when the body has none.
        let generated = uuid::Uuid::new_v4().to_string();
        match parse_job_with(
            &body,
            Some(&generated),
            settings.amqp.max_job_bytes,
            settings.jelou.validate_messages,
        ) {
            Ok(job) => {
                let message_id = (job.job_id == generated).then_some(generated);
                lines.push(Line {
                    number,
                    body,
                    job_id: job.job_id,
                    message_id,
                });
            }
            Err(invalid) => {
                *refused += 1;
                eprintln!("line {number}: not published: {}", invalid.reason);
            }
        }
    }
    lines
}

/// A progress bar on a terminal, a plain line every 10 % otherwise.
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: usize,
}

impl Progress {
    pub(crate) fn new(total: usize) -> Self {
        let bar = (total > 1 && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} {eta}")
                    .expect("valid template"),
            );
            bar
        });
        Self { bar, total }
    }

    pub(crate) fn tick(&self, done: usize) {
        match &self.bar {
            Some(bar) => bar.set_position(done as u64),
            None if self.total >= 1000 && done.is_multiple_of(self.total / 10) => {
                eprintln!("{done}/{} done", self.total)
            }
            None => {}
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
