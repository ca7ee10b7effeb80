//! The measured child process (the worker, or the null pipeline), and finding the
//! worker's binary.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::probes::Clock;

/// How long a child may take to exit after SIGTERM (the worker's grace period is 30 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

/// Finds the `jelou-worker` binary to measure. Run through cargo (`cargo run --bin
/// jelou-bench` builds only this binary), it first rebuilds the worker with the same
/// profile and target directory, so that the binary measured is the current source and
/// never a stale build lying next to this one.
pub(crate) fn locate_worker(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!("--worker-bin {}: no such file", path.display());
        }
        // Absolute: the child is started in the temporary directory, where a path
        // relative to the bench's own directory would name nothing.
        return std::path::absolute(path)
            .with_context(|| format!("--worker-bin {}", path.display()));
    }
    let exe = std::env::current_exe().context("locating jelou-bench's own binary")?;
    let profile_dir = exe
        .parent()
        .context("jelou-bench's binary has no parent directory")?;
    let worker = profile_dir.join("jelou-worker");
    if let (Some(cargo), Some(profile), Some(target_dir)) = (
        std::env::var_os("CARGO"),
        profile_dir.file_name().and_then(|n| n.to_str()),
        profile_dir.parent(),
    ) {
        // Cargo's `dev` profile builds into `debug/`; every other profile into its name.
        let profile = if profile == "debug" { "dev" } else { profile };
        eprintln!(
            "jelou-bench: building jelou-worker ({profile} profile) so that the current source is measured"
        );
        let status = Command::new(cargo)
            .args(["build", "--bin", "jelou-worker", "--profile", profile])
            .arg("--target-dir")
            .arg(target_dir)
            .arg("--manifest-path")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .status()
            .context("running cargo to build jelou-worker")?;
        if !status.success() {
            bail!("building jelou-worker failed ({status})");
        }
    }
    if !worker.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release --bins`, or pass --worker-bin PATH",
            worker.display()
        );
    }
    Ok(worker)
}

/// The worker or the null pipeline, killed if the bench stops before it does.
pub(crate) struct ChildProcess {
    child: Child,
    pub(crate) program: String,
    log: PathBuf,
    pub(crate) spawned_us: u64,
}

impl ChildProcess {
    pub(crate) fn spawn(
        program: &Path,
        args: &[&str],
        env: &[(String, String)],
        log: PathBuf,
        clock: Clock,
    ) -> anyhow::Result<Self> {
        let out = std::fs::File::create(&log)
            .with_context(|| format!("creating the child's log {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("opening the child's log {}", log.display()))?;
        let mut command = Command::new(program);
        command
            .args(args)
            // No config/default.toml: the child sees only the built-in defaults and
            // the variables below, wherever the bench is started from.
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (key, _) in std::env::vars_os() {
            let inherited = key.to_string_lossy();
            if inherited.starts_with("JELOU_WORKER") || inherited == "RUST_LOG" {
                command.env_remove(&key);
            }
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        let spawned_us = clock.now_us();
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Self {
            child,
            program: program.display().to_string(),
            log,
            spawned_us,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines the child wrote.
    pub(crate) fn log_tail(&self) -> String {
        match std::fs::read_to_string(&self.log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(20)..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", self.log.display()),
        }
    }

    /// SIGTERM, as an orchestrator stops the worker, and waits for a clean exit.
    pub(crate) async fn stop(&mut self) -> Result<(), String> {
        // SAFETY: kill(2) with a pid this process spawned and has not reaped yet (the
        // `Child` still owns it), so the pid cannot name another process.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        if sent != 0 {
            return Err(format!(
                "cannot signal {}: {}",
                self.program,
                std::io::Error::last_os_error()
            ));
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => {
                    let _ = std::fs::remove_file(&self.log);
                    return Ok(());
                }
                Ok(Some(status)) => {
                    return Err(format!(
                        "{} exited with {status} after SIGTERM; its log ({}):\n{}",
                        self.program,
                        self.log.display(),
                        self.log_tail()
                    ));
                }
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!(
                        "{} did not exit within {} s of SIGTERM and was killed",
                        self.program,
                        STOP_TIMEOUT.as_secs()
                    ));
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => return Err(format!("waiting for {}: {e}", self.program)),
            }
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
