//! Logging: JSON lines by default (every line the process writes, panics included),
//! human-readable text on request. `RUST_LOG`, when set, wins over `log.level`.
//!
//! A line is formatted on the thread that logs it, then handed to a thread of its own
//! (`log-writer`) that writes to stderr, several lines per write when they come fast.
//! The hand-over is a bounded buffer of [`BUFFERED_LINES`] lines: when stderr is read
//! too slowly and the buffer is full, lines are dropped and counted
//! (`jelou_worker_log_lines_dropped_total`), so that a runtime thread moving jobs
//! never waits for stderr. Two exceptions are written directly, on the thread that
//! logs them: a panic's line (never lost, even if the process dies next), and every
//! line after [`finish`], which the process calls before it exits to write out what
//! the buffer holds.

use std::{
    io::Write,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, fmt, fmt::writer::MakeWriterExt};

use crate::config::LogFormat;

/// Lines the buffer between the logging threads and the writer holds (each line is
/// a few hundred bytes: about 1 MiB at most). At 20,000 jobs/s with one line per job
/// that is 0.2 s of stderr not being read.
pub const BUFFERED_LINES: usize = 4096;

/// After each write, the writer thread pauses this long before it looks for more
/// lines: lines that come fast are then gathered into one write, and the threads that
/// log them rarely have to wake it (a wake-up costs more than writing a line).
const WRITE_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// The target of a panic's line (its `target` field).
const PANIC_TARGET: &str = "jelou_worker::panic";

/// The writer thread's guard: dropping it writes out the buffer and stops the thread.
static WRITER: Mutex<Option<WorkerGuard>> = Mutex::new(None);
/// Counts the lines dropped because the buffer was full.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();
/// True while lines go through the buffer; false before [`init`] and after [`finish`].
static BUFFERED: AtomicBool = AtomicBool::new(false);

/// Installs the global subscriber (logs go to stderr; command output to stdout) and a
/// panic hook that logs the panic as one line in the same format.
pub fn init(format: LogFormat, level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(level))
        // lapin logs a returned (unroutable) message whole, body included, at WARN;
        // the worker reports those itself without the body.
        .add_directive(
            "lapin::returned_messages=error"
                .parse()
                .expect("valid directive"),
        );
    let (buffered, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(BUFFERED_LINES)
        .lossy(true)
        .thread_name("log-writer")
        // The writer thread flushes whenever the buffer is empty: lines never wait in
        // this BufWriter (nor longer than WRITE_PAUSE in the buffer), they are only
        // gathered into fewer writes.
        .finish(std::io::BufWriter::with_capacity(64 * 1024, WholeWrites));
    let _ = DROPPED.set(buffered.error_counter());
    *WRITER.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
    BUFFERED.store(true, Ordering::SeqCst);
    let writer = buffered
        .with_filter(|meta| meta.target() != PANIC_TARGET && BUFFERED.load(Ordering::Relaxed))
        .or_else(std::io::stderr);
    let builder = fmt().with_env_filter(filter).with_writer(writer);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        // Colours only on a terminal: a log file or collector gets plain text.
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()));
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-text panic payload".into());
        // Written at once to stderr (see PANIC_TARGET above), not through the buffer.
        tracing::error!(target: PANIC_TARGET, panic = %payload, location, "panic");
    }));
}

/// Writes out the lines still in the buffer (waiting at most about a second for a
/// stderr that is not read) and sends every later line directly to stderr. Call it
/// before the process exits.
pub fn finish() {
    BUFFERED.store(false, Ordering::SeqCst);
    let guard = WRITER.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(guard);
}

/// Log lines dropped so far because the buffer was full.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// stderr, each write made whole under stderr's lock: a batch of lines from the
/// writer thread never interleaves with a line written directly (a panic's). The
/// writer thread flushes it after each batch and then pauses ([`WRITE_PAUSE`]).
struct WholeWrites;

impl Write for WholeWrites {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().lock().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()?;
        std::thread::sleep(WRITE_PAUSE);
        Ok(())
    }
}

/// Prints a fatal error before or after logging is set up, as one line in `format`.
pub fn fatal_line(format: LogFormat, message: &str) -> String {
    match format {
        LogFormat::Json => serde_json::json!({
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "level": "ERROR",
            "message": message,
        })
        .to_string(),
        LogFormat::Text => format!("error: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD: &str = "JELOU_WORKER_LOGGING_TEST_CHILD";

    /// Logging is global to a process: the test runs itself again as a child that logs,
    /// panics on a thread, logs more and exits the way `main` does; stderr must hold
    /// all of it, one JSON object a line.
    #[test]
    fn a_panic_and_the_last_lines_before_exit_reach_stderr() {
        if std::env::var_os(CHILD).is_some() {
            init(LogFormat::Json, "info");
            tracing::info!("first line");
            let _ = std::thread::spawn(|| panic!("boom")).join();
            if std::env::var(CHILD).as_deref() == Ok("abrupt") {
                // No finish(): the panic's line must be out already.
                std::process::exit(0);
            }
            for i in 0..1000 {
                tracing::info!(i, "filler");
            }
            tracing::info!("last line");
            finish();
            std::process::exit(0);
        }
        let child = |mode: &str| {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "logging::tests::a_panic_and_the_last_lines_before_exit_reach_stderr",
                    "--nocapture",
                ])
                .env(CHILD, mode)
                .env_remove("RUST_LOG")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "{stderr}");
            let lines: Vec<serde_json::Value> = stderr
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
                .collect();
            (stderr, lines)
        };
        let (stderr, lines) = child("abrupt");
        assert!(
            lines.iter().any(|v| v["message"] == "panic"),
            "no panic line from a process that exits right after it:\n{stderr}"
        );
        let (stderr, lines) = child("1");
        let panic = lines
            .iter()
            .find(|v| v["message"] == "panic")
            .unwrap_or_else(|| panic!("no panic line:\n{stderr}"));
        assert_eq!(panic["panic"], "boom");
        assert_eq!(panic["level"], "ERROR");
        assert!(panic["location"].as_str().unwrap().contains("logging.rs"));
        assert_eq!(
            lines.iter().filter(|v| v["message"] == "filler").count(),
            1000
        );
        // (The panic's line, written at once, may come before lines still buffered.)
        assert!(
            lines.iter().any(|v| v["message"] == "first line"),
            "{stderr}"
        );
        assert_eq!(lines.last().unwrap()["message"], "last line", "{stderr}");
        assert_eq!(dropped_lines(), 0, "nothing logged in this process");
    }
}
