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

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        time::{Duration, Instant},
    };

    use crate::{
        faults::{Event, Kind},
        jelou::{Answer, Sent},
        ledger::{self, Inputs},
        load::{Expect, Published},
    };

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    /// Conversation 1: message 0 published at 0 ms, message 1 at 10 ms; `sends` are
    /// (position, ms) arrivals at Jelou; `kill_at_s` a kill -9, if any.
    fn violations(sends: &[(u32, u64)], kill_at_s: Option<f64>) -> (usize, usize) {
        let t0 = Instant::now();
        let published: Vec<Published> = (0..2)
            .map(|pos| Published {
                job: format!("c1-{pos}"),
                conv: Some((1, pos)),
                expect: Expect::Success,
                at: at(t0, u64::from(pos) * 10),
            })
            .collect();
        let sent: Vec<Sent> = sends
            .iter()
            .map(|(pos, ms)| Sent {
                job: format!("c1-{pos}"),
                at: at(t0, *ms),
                answer: Answer::Accepted,
            })
            .collect();
        let events: Vec<Event> = kill_at_s
            .map(|s| Event {
                at_s: s,
                kind: Kind::Kill9,
                detail: String::new(),
                injected: true,
            })
            .into_iter()
            .collect();
        let l = ledger::build(&Inputs {
            t0,
            published: &published,
            sent: &sent,
            results: &[],
            dead: &HashMap::new(),
            events: &events,
            prefetch: 32,
        });
        (l.order_violations.len(), l.unexplained_violations)
    }

    #[test]
    fn in_order_sends_with_retries_are_no_violation() {
        assert_eq!(violations(&[(0, 100), (0, 300), (1, 400)], None), (0, 0));
    }

    #[test]
    fn a_later_message_before_an_earlier_ones_resend_is_a_violation() {
        assert_eq!(violations(&[(0, 100), (1, 200), (0, 300)], None), (1, 1));
    }

    #[test]
    fn a_kill_between_the_earlier_ones_publication_and_last_send_explains_it() {
        assert_eq!(
            violations(&[(0, 100), (1, 200), (0, 300)], Some(0.15)),
            (1, 0)
        );
        // A kill after the earlier one's last send explains nothing.
        assert_eq!(
            violations(&[(0, 100), (1, 200), (0, 300)], Some(0.5)),
            (1, 1)
        );
    }
}
