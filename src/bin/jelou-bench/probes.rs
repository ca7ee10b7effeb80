//! What the bench reads from `/proc`: CPU times (of the child, the stand-in's
//! threads, the bench itself, RabbitMQ and the whole machine) and memory.

use std::time::Instant;

use jelou_worker::config::AmqpUrls;

use crate::STAND_IN_THREAD;

/// Microseconds since the bench started: the one clock of enqueue and receive times.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock(pub(crate) Instant);

impl Clock {
    pub(crate) fn now_us(self) -> u64 {
        self.0.elapsed().as_micros() as u64
    }
}

/// Reads CPU times from `/proc`: the child's, the stand-in's threads', the bench's
/// own, RabbitMQ's (when it runs on this machine) and the whole machine's.
pub(crate) struct Probe {
    pub(crate) clock_ticks: f64,
    /// The processes listening on the broker's ports, when it runs on this machine.
    pub(crate) broker_pids: Vec<u32>,
}

/// CPU seconds used so far, at one moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    pub(crate) at_us: u64,
    pub(crate) child_cpu: f64,
    pub(crate) stand_in_cpu: f64,
    /// This process without the stand-in's threads.
    pub(crate) bench_cpu: f64,
    pub(crate) broker_cpu: Option<f64>,
    /// (busy, total) ticks of all CPUs, from `/proc/stat`.
    pub(crate) machine: Option<(u64, u64)>,
}

impl Probe {
    pub(crate) fn new(urls: &AmqpUrls) -> Self {
        // SAFETY: sysconf only reads a constant of the system.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Self {
            clock_ticks: if ticks > 0 { ticks as f64 } else { 100.0 },
            broker_pids: local_broker_pids(urls),
        }
    }

    pub(crate) fn sample(&self, child: u32, clock: Clock) -> Sample {
        let secs = |path: &str| cpu_ticks(path).map(|t| t as f64 / self.clock_ticks);
        let stand_in_cpu: f64 = std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|task| {
                std::fs::read_to_string(task.path().join("comm"))
                    .is_ok_and(|comm| comm.trim().starts_with(STAND_IN_THREAD))
            })
            .filter_map(|task| secs(&task.path().join("stat").to_string_lossy()))
            .sum();
        let broker_cpu = (!self.broker_pids.is_empty())
            .then(|| {
                self.broker_pids
                    .iter()
                    .map(|pid| secs(&format!("/proc/{pid}/stat")))
                    .sum::<Option<f64>>()
            })
            .flatten();
        Sample {
            at_us: clock.now_us(),
            child_cpu: secs(&format!("/proc/{child}/stat")).unwrap_or(0.0),
            bench_cpu: secs("/proc/self/stat").unwrap_or(0.0) - stand_in_cpu,
            stand_in_cpu,
            broker_cpu,
            machine: machine_ticks(),
        }
    }
}

/// The processes listening on the loopback ports of `urls`: the RabbitMQ node(s) under
/// test, and no other broker that happens to run on this machine.
fn local_broker_pids(urls: &AmqpUrls) -> Vec<u32> {
    let sockets = listening_sockets(&loopback_ports(urls));
    if sockets.is_empty() {
        return Vec::new();
    }
    pids_holding(&sockets)
}

/// The ports of the URLs in `urls` whose host is this machine.
fn loopback_ports(urls: &AmqpUrls) -> Vec<u16> {
    urls.expose()
        .filter_map(|raw| url::Url::parse(raw).ok())
        // `amqp` is not a scheme the URL standard knows, so its host stays a plain
        // string (never an `Ipv4`): compare the text.
        .filter(|u| {
            u.host_str().is_some_and(|host| {
                host.eq_ignore_ascii_case("localhost")
                    || host
                        .trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            })
        })
        .map(|u| {
            u.port()
                .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 })
        })
        .collect()
}

/// Inodes of the listening sockets (state 0A) on `ports`, as `socket:[inode]`.
fn listening_sockets(ports: &[u16]) -> Vec<String> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
                    let inode = fields.get(9)?;
                    (fields.get(3) == Some(&"0A") && ports.contains(&port))
                        .then(|| format!("socket:[{inode}]"))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The processes with one of `sockets` open.
fn pids_holding(sockets: &[String]) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|target| {
                        sockets.iter().any(|s| target.as_os_str() == s.as_str())
                    })
                })
        })
        .collect()
}

/// utime + stime of a `/proc/.../stat` file, in clock ticks.
fn cpu_ticks(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count the
    // fields after its closing one. utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// (busy, total) ticks of all CPUs since boot.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// A process's memory, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    /// `VmHWM`: the most resident memory it ever had.
    pub(crate) peak_kib: Option<u64>,
    /// `VmRSS`: resident memory now.
    pub(crate) current_kib: Option<u64>,
}

impl Memory {
    pub(crate) fn of(pid: u32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        };
        Self {
            peak_kib: field("VmHWM:"),
            current_kib: field("VmRSS:"),
        }
    }
}
