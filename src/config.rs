//! Configuration: every key of the contract's section 6, typed and validated.
//!
//! Layers, later wins: the built-in defaults below (`Default` impls), then
//! `config/default.toml`, then the file named by `--config` / `JELOU_WORKER_CONFIG`,
//! then environment variables `JELOU_WORKER__<SECTION>__<KEY>`.
//!
//! The doc comment on each field is the user's reference for that key: keep it true.
//! Secrets (`jelou.client_secret`, the password inside `amqp.url`) are held in
//! [`secrecy`] wrappers so that neither `Debug` nor an error message can print them.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Prefix of the environment variables read as configuration.
pub const ENV_PREFIX: &str = "JELOU_WORKER";

/// Why the configuration could not be used. Each message is one line naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(String),
    #[error("configuration: {key}: {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub jelou: JelouSettings,
    pub retry: RetrySettings,
    pub order: OrderSettings,
    pub server: ServerSettings,
    pub shutdown: ShutdownSettings,
    pub log: LogSettings,
}

/// The kind of queue the jobs and dead-letter queues are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, durable Raft queues: the right choice for production.
    Quorum,
    /// Single-node queues, for brokers or tests where quorum queues are not wanted.
    Classic,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// `[amqp]`: the broker, the queues and exchanges, and how many jobs are in flight.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    /// Broker URL(s). Several URLs separated by commas name the nodes of one cluster;
    /// they are tried in turn, starting at a random one so that many workers spread
    /// over the nodes. `amqps://` is TLS. The password is a secret: it is never logged.
    /// A `heartbeat` query parameter overrides `amqp.heartbeat_secs`.
    pub url: AmqpUrls,
    /// The durable queue jobs are consumed from.
    pub jobs_queue: String,
    /// `quorum` (default) or `classic`: the type of the jobs, dead-letter and delay queues.
    pub queue_type: QueueType,
    /// The durable topic exchange results are published to.
    pub result_exchange: String,
    /// Routing key of success results.
    pub success_routing_key: String,
    /// Routing key of failure results.
    pub failure_routing_key: String,
    /// The durable fanout exchange failed jobs are dead-lettered through.
    pub dead_letter_exchange: String,
    /// The durable queue bound to `dead_letter_exchange` that keeps failed jobs.
    pub dead_letter_queue: String,
    /// Jobs in flight per worker (the consumer's prefetch), 1 to 65535.
    pub prefetch: u16,
    /// Declare the queues and exchanges at start. When false the worker declares
    /// nothing and fails at start, naming what is missing, if any does not exist.
    pub declare_topology: bool,
    /// A job body larger than this many bytes is invalid (kind `invalid_job`).
    pub max_job_bytes: usize,
    /// A job redelivered more than this many times without finishing fails with
    /// kind `delivery_limit` (it probably crashes or hangs workers).
    pub max_deliveries: u32,
    /// AMQP heartbeat in seconds: how fast a dead or frozen broker node is noticed.
    pub heartbeat_secs: u16,
    /// Bound on every broker operation (connect, declare, publish confirm), in ms,
    /// so that a frozen node can never hang the worker; and on how long publishes the
    /// broker refuses (nack) are retried before the connection is dropped.
    pub operation_timeout_ms: u64,
    /// PEM file of the CA(s) that sign the broker's certificate for `amqps://`
    /// (default: the system's roots).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS with the broker (with `tls_client_key_file`).
    pub tls_client_cert_file: Option<PathBuf>,
    /// PEM (PKCS#8) private key of `tls_client_cert_file`.
    pub tls_client_key_file: Option<PathBuf>,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: AmqpUrls::parse("amqp://guest:guest@127.0.0.1:5672/%2f").expect("valid default"),
            jobs_queue: "jelou.jobs".into(),
            queue_type: QueueType::Quorum,
            result_exchange: "jelou.results".into(),
            success_routing_key: "success".into(),
            failure_routing_key: "failure".into(),
            dead_letter_exchange: "jelou.dead".into(),
            dead_letter_queue: "jelou.jobs.dead".into(),
            prefetch: 64,
            declare_topology: true,
            max_job_bytes: 262_144,
            max_deliveries: 5,
            heartbeat_secs: 10,
            operation_timeout_ms: 15_000,
            tls_ca_file: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
        }
    }
}

impl AmqpSettings {
    pub fn operation_timeout(&self) -> Duration {
        Duration::from_millis(self.operation_timeout_ms)
    }

    /// `[amqp]`: its names, then its numbers and TLS files.
    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_names()?;
        if self.prefetch == 0 {
            return Err(invalid("amqp.prefetch", "must be at least 1"));
        }
        if self.max_job_bytes == 0 {
            return Err(invalid("amqp.max_job_bytes", "must be at least 1"));
        }
        if self.max_deliveries == 0 {
            return Err(invalid("amqp.max_deliveries", "must be at least 1"));
        }
        if self.operation_timeout_ms < 100 {
            return Err(invalid("amqp.operation_timeout_ms", "must be at least 100"));
        }
        if self.tls_client_cert_file.is_some() != self.tls_client_key_file.is_some() {
            return Err(invalid(
                "amqp.tls_client_key_file",
                "amqp.tls_client_cert_file and amqp.tls_client_key_file go together",
            ));
        }
        Ok(())
    }

    /// The queue and exchange names and the routing keys.
    fn validate_names(&self) -> Result<(), ConfigError> {
        for (key, name) in [
            ("amqp.jobs_queue", &self.jobs_queue),
            ("amqp.result_exchange", &self.result_exchange),
            ("amqp.dead_letter_exchange", &self.dead_letter_exchange),
            ("amqp.dead_letter_queue", &self.dead_letter_queue),
        ] {
            if name.is_empty() || name.len() > 200 {
                return Err(invalid(key, "must be 1 to 200 characters"));
            }
            if name.starts_with("amq.") {
                return Err(invalid(
                    key,
                    "names starting with `amq.` are reserved by RabbitMQ",
                ));
            }
        }
        for (key, name) in [
            ("amqp.success_routing_key", &self.success_routing_key),
            ("amqp.failure_routing_key", &self.failure_routing_key),
        ] {
            if name.len() > 255 {
                return Err(invalid(key, "must be at most 255 bytes"));
            }
        }
        if self.dead_letter_queue == self.jobs_queue {
            return Err(invalid(
                "amqp.dead_letter_queue",
                "must differ from amqp.jobs_queue",
            ));
        }
        Ok(())
    }
}

/// `[jelou]`: where and how messages are sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JelouSettings {
    /// Jelou's API root; requests go to `{base_url}/v1/bots/{botId}/messages`.
    pub base_url: String,
    /// Jelou client id (the Basic auth user). Required by `run` and `check`.
    pub client_id: Option<String>,
    /// Jelou client secret (the Basic auth password; secret). Required by `run` and `check`.
    pub client_secret: Option<SecretString>,
    /// Time allowed for one attempt, from connecting to the last byte of the response.
    pub request_timeout_ms: u64,
    /// Requests per second per botId from this worker; 0 turns the limit off.
    /// WhatsApp allows 80 messages/s per business number by default.
    pub rate_limit_per_second: f64,
    /// Allow a plain `http://` base_url to a host that is not loopback. Credentials
    /// then cross the network in clear text: only for a trusted private network.
    pub allow_insecure_http: bool,
    /// At most this many bytes of a response body are read; the rest is cut.
    pub max_response_bytes: usize,
    /// PEM file of extra CA(s) trusted for Jelou's certificate (default: system roots).
    pub tls_ca_file: Option<PathBuf>,
    /// Consecutive failed attempts (5xx, timeouts, connection errors) after which the
    /// worker stops taking jobs and probes Jelou instead (circuit open); 0 disables it.
    pub circuit_failure_threshold: u32,
    /// First wait between probes while the circuit is open, in ms; it doubles up to
    /// `circuit_max_probe_interval_ms`.
    pub circuit_probe_interval_ms: u64,
    /// Longest wait between probes while the circuit is open, in ms.
    pub circuit_max_probe_interval_ms: u64,
    /// Check every message (and template) against Jelou's documented rules before
    /// sending it; a job that breaks one fails at once with `invalid_job`. Turn off
    /// for the day Jelou changes a rule before the worker follows: then only `type`
    /// and `userId` (and a template job's shape) are checked.
    pub validate_messages: bool,
}

impl Default for JelouSettings {
    fn default() -> Self {
        Self {
            base_url: "https://api.jelou.ai".into(),
            client_id: None,
            client_secret: None,
            request_timeout_ms: 10_000,
            rate_limit_per_second: 0.0,
            allow_insecure_http: false,
            max_response_bytes: 65_536,
            tls_ca_file: None,
            circuit_failure_threshold: 20,
            circuit_probe_interval_ms: 1_000,
            circuit_max_probe_interval_ms: 60_000,
            validate_messages: true,
        }
    }
}

impl JelouSettings {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// `[jelou]`: the base URL first, then the limits and the client id.
    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_base_url()?;
        if self.request_timeout_ms == 0 {
            return Err(invalid("jelou.request_timeout_ms", "must be at least 1"));
        }
        if !self.rate_limit_per_second.is_finite() || self.rate_limit_per_second < 0.0 {
            return Err(invalid(
                "jelou.rate_limit_per_second",
                "must be 0 (off) or a positive number",
            ));
        }
        if self.max_response_bytes < 256 {
            return Err(invalid("jelou.max_response_bytes", "must be at least 256"));
        }
        if self.circuit_probe_interval_ms == 0
            || self.circuit_max_probe_interval_ms < self.circuit_probe_interval_ms
        {
            return Err(invalid(
                "jelou.circuit_max_probe_interval_ms",
                "must be at least jelou.circuit_probe_interval_ms, which must be at least 1",
            ));
        }
        if let Some(id) = &self.client_id
            && id.contains(':')
        {
            return Err(invalid(
                "jelou.client_id",
                "must not contain ':' (Basic auth)",
            ));
        }
        Ok(())
    }

    /// `jelou.base_url`: a URL, https (or http where allowed), with no query,
    /// fragment or credentials.
    fn validate_base_url(&self) -> Result<(), ConfigError> {
        let base = url::Url::parse(&self.base_url)
            .map_err(|e| invalid("jelou.base_url", format!("not a URL: {e}")))?;
        match base.scheme() {
            "https" => {}
            "http" if self.allow_insecure_http || is_loopback_host(&base) => {}
            "http" => {
                return Err(invalid(
                    "jelou.base_url",
                    "plain http:// to a non-loopback host would send credentials in clear text; \
                     use https:// or set jelou.allow_insecure_http = true",
                ));
            }
            other => {
                return Err(invalid(
                    "jelou.base_url",
                    format!("scheme `{other}` is not http(s)"),
                ));
            }
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(invalid(
                "jelou.base_url",
                "must not have a query or fragment",
            ));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(invalid(
                "jelou.base_url",
                "must not carry credentials; use jelou.client_id / jelou.client_secret",
            ));
        }
        Ok(())
    }

    /// The credentials, or an error naming the missing key.
    pub fn credentials(&self) -> Result<(String, SecretString), ConfigError> {
        let id = self
            .client_id
            .clone()
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                invalid(
                    "jelou.client_id",
                    "required (set JELOU_WORKER__JELOU__CLIENT_ID)",
                )
            })?;
        let secret = self
            .client_secret
            .clone()
            .filter(|s| !s.expose_secret().is_empty())
            .ok_or_else(|| {
                invalid(
                    "jelou.client_secret",
                    "required (set JELOU_WORKER__JELOU__CLIENT_SECRET)",
                )
            })?;
        if id.contains(':') {
            return Err(invalid(
                "jelou.client_id",
                "must not contain ':' (Basic auth)",
            ));
        }
        Ok((id, secret))
    }
}

/// `[retry]`: the schedule of attempts for one job.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// Nominal wait before the second attempt, in ms.
    pub initial_interval_ms: u64,
    /// Each nominal wait is the previous one times this (at least 1.0).
    pub multiplier: f64,
    /// Cap of the nominal wait, in ms (a `Retry-After` may exceed it).
    pub max_interval_ms: u64,
    /// Attempts per job, counted across restarts and redeliveries.
    pub max_attempts: u32,
    /// A retry whose wait would end more than this many ms after the first attempt
    /// is not made: the job fails with `retries_exhausted` at once.
    pub max_elapsed_ms: u64,
    /// Waits shorter than this (ms) are slept in the worker; longer ones park the job
    /// on the broker (`<jobs_queue>.delay.*` queues) so it holds no prefetch slot and
    /// survives a restart.
    pub park_threshold_ms: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            initial_interval_ms: 500,
            multiplier: 2.0,
            max_interval_ms: 60_000,
            max_attempts: 8,
            max_elapsed_ms: 900_000,
            park_threshold_ms: 5_000,
        }
    }
}

impl RetrySettings {
    /// `[retry]`: the schedule's bounds.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.initial_interval_ms == 0 {
            return Err(invalid("retry.initial_interval_ms", "must be at least 1"));
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(invalid(
                "retry.multiplier",
                "must be a number of at least 1.0",
            ));
        }
        if self.max_interval_ms < self.initial_interval_ms {
            return Err(invalid(
                "retry.max_interval_ms",
                "must be at least retry.initial_interval_ms",
            ));
        }
        if self.max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1"));
        }
        // Thirty days: far beyond any useful retry, and small enough that every time
        // computed from it fits.
        if self.max_elapsed_ms == 0 || self.max_elapsed_ms > 30 * 24 * 3_600_000 {
            return Err(invalid(
                "retry.max_elapsed_ms",
                "must be between 1 and 2592000000 (30 days)",
            ));
        }
        Ok(())
    }
}

/// `[order]`: per-user order and waiting without holding slots (contract section 4).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrderSettings {
    /// Send each user's jobs (same botId and userId) one at a time, in the order they
    /// were queued, across every worker on the jobs queue. Off: jobs are independent
    /// and run as they come (no order, and one broker hop less per job: see the
    /// README's "Order on vs off" for what order costs).
    pub enabled: bool,
    /// With order on, the jobs are split by user into this many partition queues
    /// (`<jobs_queue>.order.<n>`), each worked by one worker at a time: more workers
    /// than partitions add no throughput. Changing it reshuffles users over partitions,
    /// so change it only with the queues drained.
    pub partitions: u16,
    /// A job that would wait longer than this (ms) for its bot's 429 pause, its bot's
    /// pacing, its user's pacing or its next retry goes back to the broker to wait,
    /// holding no slot that other bots' jobs need; shorter waits are slept in the worker.
    pub wait_bound_ms: u64,
    /// With order on: at least this many ms between two sends to the same user (0 =
    /// off). WhatsApp limits how fast one number may write to one user (error 131056).
    pub user_min_interval_ms: u64,
}

impl Default for OrderSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            partitions: 16,
            wait_bound_ms: 1_000,
            user_min_interval_ms: 0,
        }
    }
}

impl OrderSettings {
    pub fn wait_bound(&self) -> Duration {
        Duration::from_millis(self.wait_bound_ms)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1024).contains(&self.partitions) {
            return Err(invalid("order.partitions", "must be 1 to 1024"));
        }
        if self.wait_bound_ms > 60_000 {
            return Err(invalid(
                "order.wait_bound_ms",
                "must be at most 60000: a longer wait in the worker holds a slot other bots need",
            ));
        }
        if self.user_min_interval_ms > 0 && !self.enabled {
            return Err(invalid(
                "order.user_min_interval_ms",
                "needs order.enabled = true (only the worker that owns a user's partition knows when it last wrote to them)",
            ));
        }
        if self.user_min_interval_ms > 24 * 3_600_000 {
            return Err(invalid(
                "order.user_min_interval_ms",
                "must be at most 86400000 (a day)",
            ));
        }
        Ok(())
    }
}

/// `[server]`: the HTTP endpoints for operators.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address of `/metrics` (Prometheus), `/healthz` (alive) and `/readyz` (consuming).
    pub listen: SocketAddr,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".parse().expect("valid default"),
        }
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    /// On SIGTERM/SIGINT, time allowed for in-flight jobs to finish before the rest
    /// are handed back to the queue, in ms.
    pub grace_period_ms: u64,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            grace_period_ms: 30_000,
        }
    }
}

/// Output format of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (panics included): for log collectors.
    Json,
    /// Human-readable lines: for a terminal.
    Text,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `json` (default) or `text`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `info,jelou_worker=debug`; `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

impl LogSettings {
    /// `[log]`: a non-empty, valid tracing filter.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map_err(|e| invalid("log.level", format!("not a valid filter: {e}")))?;
        Ok(())
    }
}

/// The broker URL(s) of `amqp.url`. Holds secrets: `Debug` and `Display` redact passwords.
#[derive(Clone)]
pub struct AmqpUrls(Vec<SecretString>);

impl AmqpUrls {
    /// Parses a comma-separated list of `amqp://` / `amqps://` URLs.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut urls = Vec::new();
        for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let parsed = url::Url::parse(raw)
                .map_err(|e| format!("`{}` is not a URL: {e}", redact_url(raw)))?;
            if !matches!(parsed.scheme(), "amqp" | "amqps") {
                return Err(format!(
                    "`{}` must start with amqp:// or amqps://",
                    redact_url(raw)
                ));
            }
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(format!("`{}` has no host", redact_url(raw)));
            }
            urls.push(SecretString::from(raw.to_string()));
        }
        if urls.is_empty() {
            return Err("no URL given".into());
        }
        Ok(Self(urls))
    }

    /// The URLs, secrets included: only for connecting.
    pub fn expose(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|s| s.expose_secret())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for AmqpUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUrls({self})")
    }
}

impl fmt::Display for AmqpUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self.expose().map(redact_url).collect();
        f.write_str(&shown.join(","))
    }
}

impl<'de> Deserialize<'de> for AmqpUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        AmqpUrls::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// A URL with its password replaced by `***`, safe to log. Unparseable input is
/// replaced whole, since it might hold a password we cannot locate.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable URL>".into(),
    }
}

impl Settings {
    /// Loads the layers (see the module doc) and validates the result.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// [`Settings::load`] with the environment given, so tests need not touch the
    /// process environment.
    pub fn load_from(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        if let Some(path) = file
            && !path.exists()
        {
            return Err(ConfigError::Load(format!(
                "--config {}: no such file",
                path.display()
            )));
        }
        let settings: Settings = layers(file, env)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Load(one_line(&e.to_string())))?;
        settings.validate()?;
        Ok(settings)
    }

    /// The `log.format` the layers name, read even when other values are bad, so that
    /// a configuration error can be reported in the format the operator asked for.
    pub fn peek_log_format(file: Option<&std::path::Path>) -> LogFormat {
        match layers(file, std::env::vars())
            .build()
            .and_then(|c| c.get_string("log.format"))
        {
            Ok(f) if f.eq_ignore_ascii_case("text") => LogFormat::Text,
            _ => LogFormat::Json,
        }
    }

    /// Checks every value whose type alone does not make it valid, section by
    /// section in a fixed order, so the first error reported is always the same.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.amqp.validate()?;
        self.jelou.validate()?;
        self.retry.validate()?;
        self.order.validate()?;
        self.log.validate()
    }
}

/// True when the URL's host is a loopback name or address.
pub fn is_loopback_host(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// The configuration layers, later wins: `config/default.toml`, the `--config` file,
/// the `JELOU_WORKER__*` variables of `env`. (The built-in defaults come from serde.)
fn layers(
    file: Option<&std::path::Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> config::ConfigBuilder<config::builder::DefaultState> {
    let env: std::collections::HashMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
        .collect();
    let mut builder = config::Config::builder().add_source(
        config::File::new("config/default.toml", config::FileFormat::Toml).required(false),
    );
    if let Some(path) = file {
        builder = builder.add_source(config::File::new(
            &path.to_string_lossy(),
            config::FileFormat::Toml,
        ));
    }
    builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(false)
            .source(Some(env)),
    )
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from(
            None,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = load(&[]).unwrap();
        assert_eq!(s.amqp.jobs_queue, "jelou.jobs");
        assert_eq!(s.amqp.queue_type, QueueType::Quorum);
        assert_eq!(s.amqp.prefetch, 64);
        assert_eq!(s.amqp.max_job_bytes, 262_144);
        assert_eq!(s.amqp.max_deliveries, 5);
        assert_eq!(s.jelou.base_url, "https://api.jelou.ai");
        assert_eq!(s.retry.max_attempts, 8);
        assert_eq!(s.retry.max_elapsed_ms, 900_000);
        assert_eq!(s.server.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(s.log.format, LogFormat::Json);
    }

    #[test]
    fn environment_overrides_and_parses_numbers() {
        let s = load(&[
            ("JELOU_WORKER__AMQP__PREFETCH", "128"),
            ("JELOU_WORKER__JELOU__CLIENT_SECRET", "12345"),
            ("JELOU_WORKER__AMQP__QUEUE_TYPE", "classic"),
        ])
        .unwrap();
        assert_eq!(s.amqp.prefetch, 128);
        assert_eq!(s.amqp.queue_type, QueueType::Classic);
        assert_eq!(s.jelou.client_secret.unwrap().expose_secret(), "12345");
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let e = load(&[("JELOU_WORKER__AMQP__PREFETCH", "0")]).unwrap_err();
        assert!(e.to_string().contains("amqp.prefetch"), "{e}");
        let e = load(&[("JELOU_WORKER__AMQP__PREFETCH", "lots")]).unwrap_err();
        assert!(e.to_string().contains("prefetch"), "{e}");
        let e = load(&[("JELOU_WORKER__RETRY__MULTIPLIER", "0.5")]).unwrap_err();
        assert!(e.to_string().contains("retry.multiplier"), "{e}");
        let e = load(&[("JELOU_WORKER__AMQP__NOPE", "1")]).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        assert_eq!(e.to_string().lines().count(), 1);
    }

    #[test]
    fn plain_http_only_to_loopback_unless_allowed() {
        assert!(load(&[("JELOU_WORKER__JELOU__BASE_URL", "http://127.0.0.1:8080")]).is_ok());
        assert!(load(&[("JELOU_WORKER__JELOU__BASE_URL", "http://localhost:8080")]).is_ok());
        let e = load(&[("JELOU_WORKER__JELOU__BASE_URL", "http://jelou.internal")]).unwrap_err();
        assert!(e.to_string().contains("jelou.base_url"), "{e}");
        assert!(
            load(&[
                ("JELOU_WORKER__JELOU__BASE_URL", "http://jelou.internal"),
                ("JELOU_WORKER__JELOU__ALLOW_INSECURE_HTTP", "true"),
            ])
            .is_ok()
        );
    }

    #[test]
    fn secrets_never_show_in_debug_or_errors() {
        let s = load(&[
            (
                "JELOU_WORKER__AMQP__URL",
                "amqp://user:hunter2@h1:5672/%2f,amqps://u:hunter3@h2/v",
            ),
            ("JELOU_WORKER__JELOU__CLIENT_SECRET", "s3cr3t-value"),
        ])
        .unwrap();
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("hunter3"),
            "{dbg}"
        );
        assert!(!dbg.contains("s3cr3t-value"), "{dbg}");
        assert_eq!(s.amqp.url.len(), 2);
        let e = load(&[("JELOU_WORKER__AMQP__URL", "http://user:hunter2@h1")]).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("amqp"), "{e}");
    }

    #[test]
    fn credentials_are_required_with_key_names() {
        let s = load(&[]).unwrap();
        let e = s.jelou.credentials().unwrap_err();
        assert!(e.to_string().contains("jelou.client_id"), "{e}");
        let s = load(&[("JELOU_WORKER__JELOU__CLIENT_ID", "me")]).unwrap();
        let e = s.jelou.credentials().unwrap_err();
        assert!(e.to_string().contains("jelou.client_secret"), "{e}");
    }
}

/// The one way to give a run names of its own (the tests, the demo, the bench).
impl AmqpSettings {
    /// These settings with every queue and exchange the worker declares named under
    /// `prefix`: `{prefix}.jobs` (and after it the retry and delay queues),
    /// `{prefix}.results`, `{prefix}.dead` and `{prefix}.jobs.dead`, so that a run
    /// never touches real traffic on the same broker.
    pub fn namespaced(&self, prefix: &str) -> AmqpSettings {
        AmqpSettings {
            jobs_queue: format!("{prefix}.jobs"),
            result_exchange: format!("{prefix}.results"),
            dead_letter_exchange: format!("{prefix}.dead"),
            dead_letter_queue: format!("{prefix}.jobs.dead"),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod namespaced_tests {
    use super::AmqpSettings;

    #[test]
    fn namespaced_renames_every_queue_and_exchange_and_keeps_the_rest() {
        let base = AmqpSettings {
            prefetch: 7,
            ..AmqpSettings::default()
        };
        let a = base.namespaced("t.x");
        assert_eq!(a.jobs_queue, "t.x.jobs");
        assert_eq!(a.result_exchange, "t.x.results");
        assert_eq!(a.dead_letter_exchange, "t.x.dead");
        assert_eq!(a.dead_letter_queue, "t.x.jobs.dead");
        assert_eq!(a.prefetch, 7);
        assert_eq!(a.success_routing_key, base.success_routing_key);
    }
}
