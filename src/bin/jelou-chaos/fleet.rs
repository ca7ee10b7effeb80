//! The fleet: `jelou-worker run` child processes, started, killed, stopped and
//! watched (an exit nobody asked for is a crash; RSS after warm-up and at the end).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use jelou_worker::config::Settings;
use serde::Serialize;
use std::process::Child;

use tokio::task::JoinHandle;

/// A worker's RSS is taken this long after its start (its caches and pools are full).
pub(crate) const WARMUP: Duration = Duration::from_secs(20);
/// How long a worker may take to exit after SIGTERM (grace period + margin).
const STOP_TIMEOUT: Duration = Duration::from_secs(45);

/// Finds `jelou-worker`: `explicit`, else next to this binary. Run through cargo
/// (`cargo run --bin jelou-chaos` builds only this binary), it first builds the worker
/// with the same profile, so that the current source is what runs.
pub(crate) fn locate_worker(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let exe = std::env::current_exe().context("locating jelou-chaos's own binary")?;
            build_worker(&exe)?;
            exe.with_file_name("jelou-worker")
        }
    };
    if !path.is_file() {
        bail!(
            "{} not found: build it (`cargo build --release --bins`) or pass --worker-bin",
            path.display()
        );
    }
    Ok(path)
}

/// With cargo (the `CARGO` variable), builds `jelou-worker` into `exe`'s directory.
fn build_worker(exe: &Path) -> anyhow::Result<()> {
    let (Some(cargo), Some(dir)) = (std::env::var_os("CARGO"), exe.parent()) else {
        return Ok(());
    };
    let (Some(profile), Some(target)) = (dir.file_name().and_then(|n| n.to_str()), dir.parent())
    else {
        return Ok(());
    };
    let profile = if profile == "debug" { "dev" } else { profile };
    eprintln!("jelou-chaos: building jelou-worker ({profile} profile)");
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--locked",
            "--bin",
            "jelou-worker",
            "--profile",
            profile,
        ])
        .arg("--target-dir")
        .arg(target)
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .status()
        .context("running cargo to build jelou-worker")?;
    anyhow::ensure!(status.success(), "building jelou-worker failed ({status})");
    Ok(())
}

/// How one worker ended (or that it still runs).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct WorkerReport {
    pub(crate) pid: u32,
    pub(crate) started_s: f64,
    pub(crate) ended_s: Option<f64>,
    /// `running`, `killed` (kill -9), `terminated` (SIGTERM, exit 0), or a failure:
    /// `crashed: ...`, `bad exit after SIGTERM: ...`, `hung after SIGTERM`.
    pub(crate) fate: String,
    pub(crate) rss_warm_kib: Option<u64>,
    pub(crate) rss_end_kib: Option<u64>,
    pub(crate) log: String,
}

impl WorkerReport {
    pub(crate) fn failed(&self) -> bool {
        !matches!(self.fate.as_str(), "running" | "killed" | "terminated")
    }
}

struct Running {
    child: Child,
    report: WorkerReport,
    started: Instant,
}

/// Kills what still runs when the fleet is dropped (an error ended the run early).
impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) struct Fleet {
    bin: PathBuf,
    env: Vec<(String, String)>,
    t0: Instant,
    running: Vec<Running>,
    stopping: Vec<JoinHandle<WorkerReport>>,
    pub(crate) ended: Vec<WorkerReport>,
}

impl Fleet {
    pub(crate) fn new(bin: PathBuf, settings: &Settings, t0: Instant) -> Self {
        Self {
            bin,
            env: crate::setup::env_for(settings),
            t0,
            running: Vec::new(),
            stopping: Vec::new(),
            ended: Vec::new(),
        }
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        self.running.iter().map(|r| r.report.pid).collect()
    }

    fn secs(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Starts one more worker on a free metrics port; its pid.
    pub(crate) fn spawn(&mut self) -> anyhow::Result<u32> {
        let port = free_port()?;
        let log = std::env::temp_dir().join(format!(
            "jelou-chaos-worker-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log).context("creating a worker's log")?;
        let mut cmd = std::process::Command::new(&self.bin);
        cmd.arg("run")
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("JELOU_WORKER") || k == "RUST_LOG" {
                cmd.env_remove(&key);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.env("JELOU_WORKER__SERVER__LISTEN", format!("127.0.0.1:{port}"));
        let child = cmd.spawn().context("starting jelou-worker")?;
        let pid = child.id();
        let report = WorkerReport {
            pid,
            started_s: self.secs(),
            ended_s: None,
            fate: "running".into(),
            rss_warm_kib: None,
            rss_end_kib: None,
            log: log.display().to_string(),
        };
        self.running.push(Running {
            child,
            report,
            started: Instant::now(),
        });
        Ok(pid)
    }

    /// Takes the running worker at `index` (modulo the fleet's size) out of the fleet.
    fn take(&mut self, index: usize) -> Option<Running> {
        if self.running.is_empty() {
            return None;
        }
        let i = index % self.running.len();
        Some(self.running.remove(i))
    }

    /// kill -9 of one worker; its pid.
    pub(crate) async fn kill9(&mut self, index: usize) -> Option<u32> {
        let mut r = self.take(index)?;
        let _ = r.child.kill();
        let _ = r.child.wait();
        r.report.ended_s = Some(self.secs());
        r.report.fate = "killed".into();
        let pid = r.report.pid;
        self.ended.push(r.report.clone());
        Some(pid)
    }

    /// SIGTERM to one worker; its exit is awaited in the background; its pid.
    pub(crate) fn terminate(&mut self, index: usize) -> Option<u32> {
        let r = self.take(index)?;
        let pid = r.report.pid;
        let t0 = self.t0;
        self.stopping.push(tokio::spawn(stop(r, t0)));
        Some(pid)
    }

    /// Records an exit nobody asked for as a crash; samples RSS after warm-up.
    pub(crate) fn watch(&mut self) {
        let now = self.secs();
        let mut i = 0;
        while i < self.running.len() {
            let r = &mut self.running[i];
            if let Ok(Some(status)) = r.child.try_wait() {
                let mut report = self.running.remove(i).report.clone();
                report.ended_s = Some(now);
                report.fate = format!("crashed: {status}");
                self.ended.push(report);
                continue;
            }
            if r.report.rss_warm_kib.is_none() && r.started.elapsed() >= WARMUP {
                r.report.rss_warm_kib = rss_kib(r.report.pid);
            }
            i += 1;
        }
    }

    /// Takes every running worker's RSS as its end RSS.
    pub(crate) fn sample_end_rss(&mut self) {
        for r in &mut self.running {
            r.report.rss_end_kib = rss_kib(r.report.pid);
        }
    }

    /// SIGTERM to every worker; waits for them all; every worker's report.
    pub(crate) async fn stop_all(mut self) -> Vec<WorkerReport> {
        self.watch();
        while !self.running.is_empty() {
            self.terminate(0);
        }
        for handle in self.stopping.drain(..) {
            if let Ok(report) = handle.await {
                self.ended.push(report);
            }
        }
        self.ended
            .sort_by(|a, b| a.started_s.total_cmp(&b.started_s));
        self.ended
    }
}

/// SIGTERM, then waits for a clean exit (0) within [`STOP_TIMEOUT`].
async fn stop(mut r: Running, t0: Instant) -> WorkerReport {
    let pid = r.report.pid as libc::pid_t;
    // SAFETY: kill(2) on a child this process spawned and has not reaped (the `Child`
    // still owns it), so the pid cannot name another process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    r.report.fate = loop {
        match r.child.try_wait() {
            Ok(Some(status)) if status.success() => break "terminated".into(),
            Ok(Some(status)) => break format!("bad exit after SIGTERM: {status}"),
            Err(e) => break format!("bad exit after SIGTERM: {e}"),
            Ok(None) if Instant::now() >= deadline => {
                let _ = r.child.kill();
                let _ = r.child.wait();
                break "hung after SIGTERM".into();
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    r.report.ended_s = Some(t0.elapsed().as_secs_f64());
    r.report.clone()
}

/// `VmRSS` of a process, in KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
