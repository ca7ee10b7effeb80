//! Logging: JSON lines by default (every line the process writes, panics included),
//! human-readable text on request. `RUST_LOG`, when set, wins over `log.level`.

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::LogFormat;

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
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
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
        tracing::error!(panic = %payload, location, "panic");
    }));
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
