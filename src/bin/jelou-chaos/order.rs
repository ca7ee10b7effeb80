//! The per-user order check: in each conversation (one bot and user), no later
//! message may reach Jelou before an earlier one's last send, unless a crash happened
//! while the earlier one was queued or in flight.

use std::{
    collections::{BTreeMap, HashMap},
    time::Instant,
};

use crate::ledger::{Inputs, Ledger, Violation};

/// First and last send of one message.
#[derive(Clone, Copy)]
struct Sends {
    first: Instant,
    last: Instant,
}

/// Per conversation: position → (jobId, published at, sends).
type Convs<'a> = HashMap<u32, BTreeMap<u32, (&'a str, Instant, Sends)>>;

fn conversations<'a>(i: &'a Inputs) -> Convs<'a> {
    let mut sends: HashMap<&str, Sends> = HashMap::new();
    for s in i.sent {
        sends
            .entry(s.job.as_str())
            .and_modify(|x| {
                x.first = x.first.min(s.at);
                x.last = x.last.max(s.at);
            })
            .or_insert(Sends {
                first: s.at,
                last: s.at,
            });
    }
    let mut convs: Convs = HashMap::new();
    for p in i.published {
        let (Some((conv, pos)), Some(s)) = (p.conv, sends.get(p.job.as_str())) else {
            continue;
        };
        convs
            .entry(conv)
            .or_default()
            .insert(pos, (p.job.as_str(), p.at, *s));
    }
    convs
}

pub(crate) fn check(i: &Inputs, l: &mut Ledger) {
    let crashes = super::ledger::crash_moments(i.events);
    let secs = |at: Instant| at.saturating_duration_since(i.t0).as_secs_f64();
    for msgs in conversations(i).values() {
        let msgs: Vec<_> = msgs.values().collect();
        for (a, earlier) in msgs.iter().enumerate() {
            for later in &msgs[a + 1..] {
                let (e_job, e_pub, e) = **earlier;
                let (l_job, _, s) = **later;
                if s.first >= e.last {
                    continue;
                }
                let (from, to) = (secs(e_pub), secs(e.last));
                let crash = crashes
                    .iter()
                    .find(|(at, _)| *at >= from && *at <= to)
                    .map(|(_, what)| what.clone());
                l.order_violations.push(Violation {
                    earlier: e_job.to_string(),
                    later: l_job.to_string(),
                    earlier_published_s: from,
                    earlier_last_send_s: to,
                    later_first_send_s: secs(s.first),
                    crash,
                    faults_meanwhile: meanwhile(i, from, to),
                });
            }
        }
    }
    l.unexplained_violations = l
        .order_violations
        .iter()
        .filter(|v| v.crash.is_none())
        .count();
}

/// The faults injected between `from` and `to` (seconds since t0).
fn meanwhile(i: &Inputs, from: f64, to: f64) -> Vec<String> {
    i.events
        .iter()
        .filter(|e| e.at_s >= from && e.at_s <= to)
        .map(|e| format!("{:?} at {:.1} s", e.kind, e.at_s))
        .collect()
}
