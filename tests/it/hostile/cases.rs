//! The hostile jobs of `hostile_jobs_get_the_contracts_answer_and_the_worker_keeps_working`:
//! each with the outcome the contract gives it.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldArray, FieldTable, LongString},
};
use serde_json::json;

use super::job;

/// One hostile job: published with `message_id` = `label`; `result_id` is the jobId
/// its result must carry; `outcome` is "success" or the failure kind.
pub struct Case {
    pub label: &'static str,
    pub result_id: String,
    pub body: Vec<u8>,
    pub props: BasicProperties,
    pub outcome: &'static str,
}

fn case(label: &'static str, body: impl Into<Vec<u8>>, outcome: &'static str) -> Case {
    Case {
        label,
        result_id: label.to_string(),
        body: body.into(),
        props: BasicProperties::default(),
        outcome,
    }
}

/// Properties with these AMQP headers.
pub fn headers(pairs: Vec<(&str, AMQPValue)>) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in pairs {
        table.insert(k.into(), v);
    }
    BasicProperties::default().with_headers(table)
}

/// botIds with NUL, controls, CRLF, ANSI escapes, an RTL override, dots and slashes:
/// (case label, botId, the one path Jelou must see).
pub const BOTS: [(&str, &str, &str); 6] = [
    ("bot-nul", "a\u{0}b", "/v1/bots/a%00b/messages"),
    (
        "bot-crlf",
        "x\r\nX-Evil: 1\r\n\r\nGET / HTTP/1.1",
        "/v1/bots/x%0D%0AX-Evil%3A%201%0D%0A%0D%0AGET%20%2F%20HTTP%2F1.1/messages",
    ),
    (
        "bot-ctl",
        "\u{1b}[31m\u{7f}\u{1}",
        "/v1/bots/%1B%5B31m%7F%01/messages",
    ),
    (
        "bot-rtl",
        "\u{202e}gnp.exe",
        "/v1/bots/%E2%80%AEgnp.exe/messages",
    ),
    (
        "bot-dots",
        "../../admin",
        "/v1/bots/..%2F..%2Fadmin/messages",
    ),
    ("bot-query", "b?x=1#f", "/v1/bots/b%3Fx%3D1%23f/messages"),
];

/// A jobId a correlation_id cannot hold (800 bytes).
pub fn wide_id() -> String {
    "🦀".repeat(200)
}

/// The cases, and the messages that must reach Jelou byte for byte.
pub struct Table {
    pub cases: Vec<Case>,
    pub verbatim: Vec<(&'static str, String)>,
}

impl Table {
    /// Every case, for a worker whose `amqp.max_job_bytes` is `max`.
    pub fn new(max: usize) -> Self {
        let mut table = Table {
            cases: Vec::new(),
            verbatim: Vec::new(),
        };
        table.deep(max);
        table.huge(max);
        table.utf8();
        table.bots();
        table.duplicates();
        table.deadlines();
        table.retry_headers();
        table.odd_ids();
        table.plain();
        table
    }

    fn deep(&mut self, max: usize) {
        // Deep nesting: inside the message (kept as raw bytes, sent as is), in an
        // ignored field, and as the whole body.
        let depth = 100_000;
        let deep_message = format!(
            r#"{{"type":"text","userId":"u","text":"deep","x":{}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let body = format!(r#"{{"jobId":"deep-msg","botId":"B","message":{deep_message}}}"#);
        self.verbatim.push(("deep-msg", deep_message));
        self.cases.push(case("deep-msg", body, "success"));
        let body = format!(
            r#"{{"jobId":"deep-extra","botId":"B","extra":{}1{},"message":{{"type":"text","userId":"u","text":"t"}}}}"#,
            "{\"a\":".repeat(depth / 5),
            "}".repeat(depth / 5)
        );
        self.cases.push(case("deep-extra", body, "success"));
        let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        self.cases.push(case("deep-body", body, "invalid_job"));
        self.cases
            .push(case("deep-unclosed", "[".repeat(max), "invalid_job"));
    }

    fn huge(&mut self, max: usize) {
        // A huge string: exactly amqp.max_job_bytes is processed (and sent intact); one
        // byte more is invalid. (In a field of its own: `text` has WhatsApp's limit.)
        let frame = |id: &str, text: &str| {
            format!(
                r#"{{"jobId":"{id}","botId":"B","message":{{"type":"text","userId":"u","text":"t","pad":"{text}"}}}}"#
            )
        };
        let room = max - frame("huge-at-max", "").len();
        let text = "é".repeat(room / 2) + &"a".repeat(room % 2);
        let body = frame("huge-at-max", &text);
        assert_eq!(body.len(), max);
        self.verbatim.push((
            "huge-at-max",
            format!(r#"{{"type":"text","userId":"u","text":"t","pad":"{text}"}}"#),
        ));
        self.cases.push(case("huge-at-max", body, "success"));
        let body = frame("huge-over-1", &format!("{text}a"));
        assert_eq!(body.len(), max + 1);
        self.cases.push(case("huge-over-1", body, "invalid_job"));
    }

    fn utf8(&mut self) {
        // Invalid UTF-8: in the message (which is sent to Jelou), in the botId, and in a
        // field that is otherwise ignored (a body that is not UTF-8 is not JSON).
        let mut body =
            br#"{"jobId":"utf8-msg","botId":"B","message":{"type":"text","userId":"u","text":"#
                .to_vec();
        body.extend_from_slice(b"\"\xc3\x28\xff\"}}");
        self.cases.push(case("utf8-msg", body, "invalid_job"));
        let mut body = br#"{"jobId":"utf8-bot","botId":""#.to_vec();
        body.extend_from_slice(b"\xed\xa0\x80\",\"message\":{\"type\":\"text\",\"userId\":\"u\"}}");
        self.cases.push(case("utf8-bot", body, "invalid_job"));
        let mut body = br#"{"jobId":"utf8-extra","botId":"B","note":""#.to_vec();
        body.extend_from_slice(b"\xfe\",\"message\":{\"type\":\"text\",\"userId\":\"u\"}}");
        self.cases.push(case("utf8-extra", body, "invalid_job"));
    }

    fn bots(&mut self) {
        // NUL, controls, CRLF (header injection), ANSI escapes, RTL override, dots and
        // slashes in botId: data, never structure. The path stays one segment.
        for (id, bot, _) in BOTS {
            self.cases
                .push(case(id, job(id, bot).to_string(), "success"));
        }
    }

    fn duplicates(&mut self) {
        // Duplicate keys: ambiguous (which one would Jelou read?), so invalid, also when
        // one of them is spelled with an escape; a duplicate the worker does not read is
        // the producer's business and goes through as written.
        let dups = [
            (
                "dup-bot",
                r#"{"jobId":"dup-bot","botId":"B","botId":"C","message":{"type":"text","userId":"u"}}"#,
                "invalid_job",
            ),
            (
                "dup-escaped",
                r#"{"jobId":"dup-escaped","botId":"B","botI\u0064":"C","message":{"type":"text","userId":"u"}}"#,
                "invalid_job",
            ),
            (
                "dup-type",
                r#"{"jobId":"dup-type","botId":"B","message":{"type":"text","type":"image","userId":"u"}}"#,
                "invalid_job",
            ),
            (
                "dup-user",
                r#"{"jobId":"dup-user","botId":"B","message":{"type":"text","userId":"u","userId":"v"}}"#,
                "invalid_job",
            ),
            (
                "dup-text",
                r#"{"jobId":"dup-text","botId":"B","message":{"type":"text","userId":"u","text":"a","text":"b"}}"#,
                "success",
            ),
        ];
        for (id, body, outcome) in dups {
            self.cases.push(case(id, body, outcome));
        }
        self.verbatim.push((
            "dup-text",
            r#"{"type":"text","userId":"u","text":"a","text":"b"}"#.into(),
        ));
    }

    fn deadlines(&mut self) {
        // Deadlines at the ends of RFC 3339's range, and an impossible date.
        let with_deadline = |id: &str, d: &str| {
            let mut j = job(id, "B");
            j["deadline"] = json!(d);
            j.to_string()
        };
        self.cases.push(case(
            "deadline-year1",
            with_deadline("deadline-year1", "0001-01-01T00:00:00Z"),
            "expired",
        ));
        self.cases.push(case(
            "deadline-9999",
            with_deadline("deadline-9999", "9999-12-31T23:59:59.999999999+14:00"),
            "success",
        ));
        self.cases.push(case(
            "deadline-feb30",
            with_deadline("deadline-feb30", "2026-02-30T00:00:00Z"),
            "invalid_job",
        ));
    }

    fn retry_headers(&mut self) {
        // Retry headers of the wrong AMQP type, or absurd, are ignored.
        let attempts = "x-jelou-attempts";
        let header_cases: Vec<(&'static str, BasicProperties)> = vec![
            (
                "hdr-string",
                headers(vec![(attempts, AMQPValue::LongString("3".into()))]),
            ),
            (
                "hdr-negative",
                headers(vec![(attempts, AMQPValue::LongLongInt(-5))]),
            ),
            (
                "hdr-max",
                headers(vec![(attempts, AMQPValue::LongLongInt(i64::MAX))]),
            ),
            (
                "hdr-double",
                headers(vec![(attempts, AMQPValue::Double(2.5))]),
            ),
            (
                "hdr-array",
                headers(vec![(
                    attempts,
                    AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongLongInt(1)])),
                )]),
            ),
            (
                "hdr-table",
                headers(vec![(
                    attempts,
                    AMQPValue::FieldTable(FieldTable::default()),
                )]),
            ),
            ("hdr-void", headers(vec![(attempts, AMQPValue::Void)])),
            (
                "hdr-garbage-state",
                headers(vec![
                    (
                        "x-jelou-not-before",
                        AMQPValue::LongString("tomorrow".into()),
                    ),
                    ("x-jelou-first-attempt-at", AMQPValue::Boolean(true)),
                    ("x-jelou-last-status", AMQPValue::LongLongInt(70_000)),
                    (
                        "x-jelou-last-error",
                        AMQPValue::LongString(LongString::from(b"\xff\xfe".to_vec())),
                    ),
                ]),
            ),
            (
                "hdr-not-before-negative",
                headers(vec![(
                    "x-jelou-not-before",
                    AMQPValue::LongLongInt(i64::MIN),
                )]),
            ),
        ];
        for (id, props) in header_cases {
            self.cases.push(Case {
                props,
                ..case(id, job(id, "B").to_string(), "success")
            });
        }
    }

    fn odd_ids(&mut self) {
        // jobIds that a correlation_id cannot hold (800 bytes), or that hold a NUL.
        let wide = wide_id();
        let body = json!({"jobId": wide, "botId": "B", "message": {"type": "text", "userId": "u", "text": "t"}});
        self.cases.push(Case {
            result_id: wide.clone(),
            ..case("wide-id", body.to_string(), "success")
        });
        let body = json!({"jobId": "a\u{0}b", "botId": "B", "message": {"type": "text", "userId": "u", "text": "t"}});
        self.cases.push(Case {
            result_id: "a\u{0}b".into(),
            ..case("nul-id", body.to_string(), "success")
        });
    }

    fn plain(&mut self) {
        // After all that, an ordinary job.
        self.cases
            .push(case("plain", job("plain", "B").to_string(), "success"));
    }
}
