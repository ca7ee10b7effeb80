//! Jelou's documented rules for each message type, checked before a job is sent so
//! that a producer learns what is wrong from the result (`invalid_job`, the field and
//! the rule) instead of from Jelou's 400, after the job crossed the queue.
//!
//! Sources: Jelou's OpenAPI description of `POST /v1/bots/{botId}/messages`
//! (<https://docs.jelou.ai/api-reference/openapi.json>: the request body is a `oneOf`
//! of the message types) and its pages per type under
//! <https://docs.jelou.ai/api/envia-mensajes/>; where Jelou defers to WhatsApp, Meta's
//! Cloud API limits (<https://developers.facebook.com/docs/whatsapp/cloud-api/reference/messages>).
//! Each rule below says which. Only what is documented is enforced: an extra field is
//! Jelou's business, and a `type` the worker does not know is sent as given.

use serde_json::value::RawValue;

use super::shape::{Checked, Kind, Obj, kind, object, problem, string};

/// What checking a message found, when it broke no rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A documented type, every rule kept.
    Valid,
    /// A type the worker has no rules for: sent as given (Jelou may add types first).
    UnknownType(String),
}

/// Every `type` with rules here, as Jelou spells them.
pub const KNOWN_TYPES: [&str; 15] = [
    "text",
    "image",
    "video",
    "audio",
    "file",
    "sticker",
    "location",
    "location_request",
    "contacts",
    "quick_reply",
    "cta_url",
    "voice_call",
    "flow",
    "CAROUSEL",
    "template",
];

/// WhatsApp's limit on a text message's body (Cloud API, `text.body`: 4096 characters).
pub const MAX_TEXT_CHARS: usize = 4096;
/// List options: 1 to 10 rows, a title of at most 24 characters, a description of at
/// most 72 (Jelou's `text` with options; WhatsApp's interactive list rows).
pub const OPTIONS: (usize, usize) = (1, 10);
pub const MAX_OPTION_TITLE_CHARS: usize = 24;
pub const MAX_OPTION_DESCRIPTION_CHARS: usize = 72;
/// Quick replies: 1 to 3 buttons, titles of at most 20 characters, unique and not empty;
/// the optional `title` at most 20 (<https://docs.jelou.ai/api/envia-mensajes/respuestas-rapidas.md>,
/// "Restricciones").
pub const QUICK_REPLIES: (usize, usize) = (1, 3);
pub const MAX_QUICK_REPLY_TITLE_CHARS: usize = 20;

/// Checks `message` (already known to be an object with non-empty string `type` and
/// `userId`) against the rules of its type.
pub fn check_message(message: &RawValue) -> Checked<Verdict> {
    let m = object(message, "message")?;
    let Some(t) = m.peek_str("type") else {
        return Err(problem("message.type", "must be a non-empty string"));
    };
    // Common fields (OpenAPI, every schema): `type` and `userId` required strings
    // (checked when the job was read); `botId` in the body optional.
    m.text("botId", false, None)?;
    match t.as_str() {
        "text" => text(&m)?,
        "image" | "video" => media(&m, true)?,
        "audio" | "sticker" => media(&m, false)?,
        "file" => file(&m)?,
        "location" => location(&m)?,
        // OpenAPI `LocationRequestMessage`: `text` required.
        "location_request" => m.text("text", true, Some(MAX_TEXT_CHARS))?,
        "contacts" => contacts(&m)?,
        "quick_reply" => quick_reply(&m)?,
        "cta_url" => cta_url(&m)?,
        "voice_call" => voice_call(&m)?,
        "flow" => flow(&m)?,
        "CAROUSEL" => carousel(&m)?,
        "template" => template(&m)?,
        _ => return Ok(Verdict::UnknownType(t)),
    }
    Ok(Verdict::Valid)
}

/// `text` (<https://docs.jelou.ai/api/envia-mensajes/texto.md>): `text` required, at
/// most WhatsApp's 4096 characters. With a list of options, the docs show them either
/// under `buttons: {title, buttonText, options: [...]}` or at the top level as
/// `options`: both are accepted, and checked alike.
fn text(m: &Obj) -> Checked<()> {
    m.text("text", true, Some(MAX_TEXT_CHARS))?;
    m.objects("options", false, OPTIONS, "option", option)?;
    m.object("buttons", false, |b| {
        b.text("title", false, None)?;
        b.text("buttonText", false, None)?;
        b.objects("options", true, OPTIONS, "option", option)
    })
}

/// One list option: `title` required, at most 24 characters; `description` at most 72.
fn option(o: &Obj) -> Checked<()> {
    o.text("title", true, Some(MAX_OPTION_TITLE_CHARS))?;
    o.text("description", false, Some(MAX_OPTION_DESCRIPTION_CHARS))
}

/// `image` (JPEG/PNG up to 5 MB), `video` (mp4/3gp up to 16 MB): `mediaUrl` required,
/// `text` an optional caption. `audio` (aac, mp4, mpeg, amr, ogg/opus up to 16 MB),
/// `sticker` (webp up to 100 KB): `mediaUrl` only. The media URL must be `https://`
/// (<https://docs.jelou.ai/api/envia-mensajes/imagen.md>); its type and size cannot be
/// checked without fetching it.
fn media(m: &Obj, caption: bool) -> Checked<()> {
    m.media_url("mediaUrl", true)?;
    if caption {
        m.text("text", false, None)?;
    }
    Ok(())
}

/// `file` (any document up to 100 MB): `mediaUrl` and `filename` required, `text`
/// optional.
fn file(m: &Obj) -> Checked<()> {
    m.media_url("mediaUrl", true)?;
    m.text("filename", true, None)?;
    m.text("text", false, None)
}

/// `location`: `coordinates: {lat, long}` required (OpenAPI `LocationMessage`). Each a
/// number (or a numeric string) within the range of latitudes and longitudes.
fn location(m: &Obj) -> Checked<()> {
    m.object("coordinates", true, |c| {
        for (key, limit) in [("lat", 90.0), ("long", 180.0)] {
            c.each(key, true, |v, path| {
                let n = match kind(v) {
                    Kind::Number => serde_json::from_str::<f64>(v.get()).ok(),
                    Kind::String => string(v, path)?.trim().parse::<f64>().ok(),
                    _ => None,
                };
                match n {
                    Some(n) if n.is_finite() && (-limit..=limit).contains(&n) => Ok(()),
                    Some(_) => Err(problem(
                        path,
                        format!("must be between -{limit} and {limit}"),
                    )),
                    None => Err(problem(path, "must be a number")),
                }
            })?;
        }
        Ok(())
    })
}

/// `contacts`: a non-empty `contacts` array (OpenAPI `ContactsMessage`), each with
/// `name: {formatted_name, ...}` (required by WhatsApp), and optional `phones`
/// (`[{phone, type, wa_id}]`, `phone` required in each), `emails`, `addresses` arrays.
fn contacts(m: &Obj) -> Checked<()> {
    m.objects("contacts", true, (1, usize::MAX), "contact", |c| {
        c.object("name", true, |n| n.text("formatted_name", true, None))?;
        c.objects("phones", false, (0, usize::MAX), "phone", |p| {
            p.text("phone", true, None)?;
            p.text("type", false, None)?;
            p.text("wa_id", false, None)
        })?;
        c.objects("emails", false, (0, usize::MAX), "email", |_| Ok(()))?;
        c.objects("addresses", false, (0, usize::MAX), "address", |_| Ok(()))
    })
}

/// `quick_reply` (<https://docs.jelou.ai/api/envia-mensajes/respuestas-rapidas.md>):
/// `text` and `quick_replies: [{title}]` required; 1 to 3 buttons, each title not
/// empty, at most 20 characters and unique; an optional `title` of at most 20.
fn quick_reply(m: &Obj) -> Checked<()> {
    m.text("text", true, Some(MAX_TEXT_CHARS))?;
    m.text("title", false, Some(MAX_QUICK_REPLY_TITLE_CHARS))?;
    m.array(
        "quick_replies",
        true,
        QUICK_REPLIES,
        "button",
        |items, path| {
            let mut titles: Vec<String> = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let b = object(item, &format!("{path}[{i}]"))?;
                b.text("title", true, Some(MAX_QUICK_REPLY_TITLE_CHARS))?;
                let title = b.peek_str("title").unwrap_or_default();
                if let Some(j) = titles.iter().position(|t| *t == title) {
                    return Err(problem(
                        &b.at("title"),
                        format!("\"{title}\" repeats quick_replies[{j}]; titles must be unique"),
                    ));
                }
                titles.push(title);
            }
            Ok(())
        },
    )
}

/// `cta_url` (<https://docs.jelou.ai/api/envia-mensajes/boton-url.md>): `title`,
/// `text`, `caption` and `parameters: {url, display_text}` required.
fn cta_url(m: &Obj) -> Checked<()> {
    m.text("title", true, None)?;
    m.text("text", true, Some(MAX_TEXT_CHARS))?;
    m.text("caption", true, None)?;
    m.object("parameters", true, |p| {
        p.each("url", true, |v, path| {
            super::shape::web_url(&string(v, path)?, path)
        })?;
        p.text("display_text", true, None)
    })
}

/// `voice_call` (OpenAPI `VoiceCallMessage`): `header`, `text` and
/// `parameters: {display_text}` required.
fn voice_call(m: &Obj) -> Checked<()> {
    m.text("header", true, None)?;
    m.text("text", true, Some(MAX_TEXT_CHARS))?;
    m.object("parameters", true, |p| p.text("display_text", true, None))
}

/// `flow` (OpenAPI `FlowMessage`): `parameters` with `flow_id`, `flow_cta`,
/// `flow_name`, `flow_action_payload`, `mode`, `flow_action` and
/// `flow_message_version`; `title`, `text` and `caption` as in the documented example
/// (strings when given).
fn flow(m: &Obj) -> Checked<()> {
    for key in ["title", "text", "caption"] {
        m.text(key, false, None)?;
    }
    m.object("parameters", true, |p| {
        p.scalar("flow_id", true)?;
        for key in ["flow_cta", "flow_name", "mode", "flow_action"] {
            p.text(key, true, None)?;
        }
        p.object("flow_action_payload", true, |_| Ok(()))?;
        p.scalar("flow_message_version", true)
    })
}

/// `CAROUSEL` (OpenAPI `CarouselMessage`): `text` and `parameters.cards[]` required;
/// each card has `card_index`, `type` `cta_url`, `header: {type: image, image: {link}}`,
/// `body: {text}` and `action: {name, parameters: {display_text, url}}`.
fn carousel(m: &Obj) -> Checked<()> {
    m.text("text", true, Some(MAX_TEXT_CHARS))?;
    m.object("parameters", true, |p| {
        p.objects("cards", true, (1, usize::MAX), "card", |card| {
            card.each("card_index", true, |v, path| match kind(v) {
                Kind::Number if serde_json::from_str::<u64>(v.get()).is_ok() => Ok(()),
                _ => Err(problem(path, "must be a whole number from 0")),
            })?;
            card.literal("type", "cta_url")?;
            card.object("header", true, |h| {
                h.literal("type", "image")?;
                h.object("image", true, |i| i.media_url("link", true))
            })?;
            card.object("body", true, |b| b.text("text", true, None))?;
            card.object("action", true, |a| {
                a.text("name", true, None)?;
                a.object("parameters", true, |p| {
                    p.text("display_text", true, None)?;
                    p.each("url", true, |v, path| {
                        super::shape::web_url(&string(v, path)?, path)
                    })
                })
            })
        })
    })
}

/// `template` through the messages endpoint (OpenAPI `TemplateMessage`): `templateId`
/// required; `parameters`, when given, an object of the template's variables.
fn template(m: &Obj) -> Checked<()> {
    m.text("templateId", true, None)?;
    m.object("parameters", false, |_| Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn check(v: &Value) -> Result<Verdict, String> {
        let raw = RawValue::from_string(v.to_string()).unwrap();
        check_message(&raw).map_err(|p| p.to_string())
    }

    fn valid(v: Value) {
        assert_eq!(check(&v), Ok(Verdict::Valid), "{v}");
    }

    fn invalid(v: Value, want: &str) {
        assert_eq!(check(&v), Err(want.to_string()), "{v}");
    }

    /// `v` with `key` (a `/`-separated JSON pointer) removed.
    fn without(v: &Value, pointer: &str) -> Value {
        let mut v = v.clone();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let parent = if parent.is_empty() {
            &mut v
        } else {
            v.pointer_mut(parent).unwrap()
        };
        parent.as_object_mut().unwrap().remove(key);
        v
    }

    /// `v` with the value at `pointer` replaced (or added to its object).
    fn with(v: &Value, pointer: &str, new: Value) -> Value {
        let mut v = v.clone();
        if let Some(slot) = v.pointer_mut(pointer) {
            *slot = new;
        } else {
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            let parent = if parent.is_empty() {
                &mut v
            } else {
                v.pointer_mut(parent).unwrap()
            };
            parent.as_object_mut().unwrap().insert(key.into(), new);
        }
        v
    }

    fn msg(t: &str, rest: Value) -> Value {
        let mut v = json!({"type": t, "userId": "593987654321"});
        v.as_object_mut()
            .unwrap()
            .extend(rest.as_object().unwrap().clone());
        v
    }

    /// Each required field removed in turn gives `<path>: required`.
    fn each_required(v: &Value, pointers: &[&str]) {
        for p in pointers {
            let field = format!("message{}", p.replace('/', "."));
            let field = fix_indexes(&field);
            invalid(without(v, p), &format!("{field}: required"));
        }
    }

    /// `message.a.0.b` → `message.a[0].b`.
    fn fix_indexes(path: &str) -> String {
        let mut out = String::new();
        for part in path.split('.') {
            if part.parse::<usize>().is_ok() {
                out.push_str(&format!("[{part}]"));
            } else {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(part);
            }
        }
        out
    }

    #[test]
    fn text() {
        let v = msg("text", json!({"text": "Hola"}));
        valid(v.clone());
        each_required(&v, &["/text"]);
        valid(with(&v, "/text", json!("é".repeat(4096))));
        invalid(
            with(&v, "/text", json!("é".repeat(4097))),
            "message.text: 4097 characters, at most 4096",
        );
        invalid(
            with(&v, "/text", json!("  ")),
            "message.text: must not be empty",
        );
        invalid(
            with(&v, "/text", json!(5)),
            "message.text: must be a string",
        );
        invalid(
            with(&v, "/botId", json!(1)),
            "message.botId: must be a string",
        );
        valid(with(&v, "/botId", json!("B")));
    }

    #[test]
    fn text_with_options_top_level_or_under_buttons() {
        let opts = |n: usize| -> Value {
            (0..n)
                .map(|i| json!({"title": format!("Option {i}"), "description": "d"}))
                .collect()
        };
        let top = msg("text", json!({"text": "Pick", "options": opts(2)}));
        let nested = msg(
            "text",
            json!({"text": "Pick", "buttons": {"title": "Menu", "buttonText": "See", "options": opts(2)}}),
        );
        for (v, at) in [(top, "/options"), (nested, "/buttons/options")] {
            let field = format!("message{}", at.replace('/', "."));
            valid(v.clone());
            valid(with(&v, at, opts(10)));
            valid(with(&v, at, opts(1)));
            invalid(
                with(&v, at, opts(11)),
                &format!("{field}: 11 options, at most 10"),
            );
            invalid(
                with(&v, at, opts(0)),
                &format!("{field}: 0 options, at least 1"),
            );
            let t = format!("{at}/0/title");
            valid(with(&v, &t, json!("x".repeat(24))));
            invalid(
                with(&v, &t, json!("x".repeat(25))),
                &format!("{field}[0].title: 25 characters, at most 24"),
            );
            let d = format!("{at}/1/description");
            valid(with(&v, &d, json!("x".repeat(72))));
            invalid(
                with(&v, &d, json!("x".repeat(73))),
                &format!("{field}[1].description: 73 characters, at most 72"),
            );
            invalid(
                without(&v, &format!("{at}/1/title")),
                &format!("{field}[1].title: required"),
            );
            invalid(
                with(&v, &format!("{at}/0"), json!("A")),
                &format!("{field}[0]: must be a JSON object"),
            );
        }
        let v = msg(
            "text",
            json!({"text": "Pick", "buttons": {"title": "Menu"}}),
        );
        invalid(v, "message.buttons.options: required");
    }

    #[test]
    fn media() {
        for t in ["image", "video", "audio", "sticker"] {
            let v = msg(t, json!({"mediaUrl": "https://cdn.example.com/a"}));
            valid(v.clone());
            each_required(&v, &["/mediaUrl"]);
            for bad in ["http://cdn.example.com/a", "cdn.example.com/a", "https://"] {
                invalid(
                    with(&v, "/mediaUrl", json!(bad)),
                    "message.mediaUrl: must be an https:// URL",
                );
            }
        }
        valid(msg(
            "image",
            json!({"mediaUrl": "https://x.io/a.png", "text": "Our menu"}),
        ));
        invalid(
            msg(
                "video",
                json!({"mediaUrl": "https://x.io/a.mp4", "text": 1}),
            ),
            "message.text: must be a string",
        );
    }

    #[test]
    fn file() {
        let v = msg(
            "file",
            json!({"mediaUrl": "https://x.io/a.pdf", "filename": "a.pdf", "text": "Invoice"}),
        );
        valid(v.clone());
        valid(without(&v, "/text"));
        each_required(&v, &["/mediaUrl", "/filename"]);
        invalid(
            with(&v, "/filename", json!("")),
            "message.filename: must not be empty",
        );
    }

    #[test]
    fn location() {
        let v = msg(
            "location",
            json!({"coordinates": {"lat": -2.19, "long": -79.88}}),
        );
        valid(v.clone());
        each_required(
            &v,
            &["/coordinates", "/coordinates/lat", "/coordinates/long"],
        );
        valid(with(&v, "/coordinates/lat", json!("-2.19")));
        valid(with(&v, "/coordinates/lat", json!(90)));
        invalid(
            with(&v, "/coordinates/lat", json!(90.01)),
            "message.coordinates.lat: must be between -90 and 90",
        );
        valid(with(&v, "/coordinates/long", json!(-180)));
        invalid(
            with(&v, "/coordinates/long", json!(-180.5)),
            "message.coordinates.long: must be between -180 and 180",
        );
        invalid(
            with(&v, "/coordinates/long", json!("west")),
            "message.coordinates.long: must be a number",
        );
    }

    #[test]
    fn location_request() {
        let v = msg("location_request", json!({"text": "Where are you?"}));
        valid(v.clone());
        each_required(&v, &["/text"]);
    }

    #[test]
    fn contacts() {
        let v = msg(
            "contacts",
            json!({"contacts": [{
                "name": {"formatted_name": "Ana Pérez", "first_name": "Ana"},
                "phones": [{"phone": "+593987654321", "type": "CELL", "wa_id": "593987654321"}],
                "emails": [{"email": "ana@example.com", "type": "WORK"}],
                "addresses": [{"city": "Guayaquil"}]
            }]}),
        );
        valid(v.clone());
        each_required(
            &v,
            &[
                "/contacts",
                "/contacts/0/name",
                "/contacts/0/name/formatted_name",
                "/contacts/0/phones/0/phone",
            ],
        );
        valid(without(&v, "/contacts/0/phones"));
        invalid(
            with(&v, "/contacts", json!([])),
            "message.contacts: 0 contacts, at least 1",
        );
        invalid(
            with(&v, "/contacts/0/emails", json!("a@b")),
            "message.contacts[0].emails: must be a JSON array",
        );
    }

    #[test]
    fn quick_reply() {
        let buttons =
            |n: usize| -> Value { (0..n).map(|i| json!({"title": format!("B{i}")})).collect() };
        let v = msg(
            "quick_reply",
            json!({"text": "Continue?", "title": "Question", "quick_replies": buttons(3)}),
        );
        valid(v.clone());
        valid(without(&v, "/title"));
        valid(with(&v, "/quick_replies", buttons(1)));
        each_required(&v, &["/text", "/quick_replies", "/quick_replies/1/title"]);
        invalid(
            with(&v, "/quick_replies", buttons(4)),
            "message.quick_replies: 4 buttons, at most 3",
        );
        invalid(
            with(&v, "/quick_replies", buttons(0)),
            "message.quick_replies: 0 buttons, at least 1",
        );
        valid(with(&v, "/quick_replies/0/title", json!("ñ".repeat(20))));
        invalid(
            with(&v, "/quick_replies/0/title", json!("ñ".repeat(21))),
            "message.quick_replies[0].title: 21 characters, at most 20",
        );
        invalid(
            with(&v, "/quick_replies/2/title", json!("B0")),
            "message.quick_replies[2].title: \"B0\" repeats quick_replies[0]; titles must be unique",
        );
        invalid(
            with(&v, "/quick_replies/1/title", json!("")),
            "message.quick_replies[1].title: must not be empty",
        );
        valid(with(&v, "/title", json!("x".repeat(20))));
        invalid(
            with(&v, "/title", json!("x".repeat(21))),
            "message.title: 21 characters, at most 20",
        );
    }

    #[test]
    fn cta_url() {
        let v = msg(
            "cta_url",
            json!({"title": "Welcome", "text": "Visit us", "caption": "Jelou",
                   "parameters": {"url": "https://apps.jelou.ai", "display_text": "Visit"}}),
        );
        valid(v.clone());
        each_required(
            &v,
            &[
                "/title",
                "/text",
                "/caption",
                "/parameters",
                "/parameters/url",
                "/parameters/display_text",
            ],
        );
        invalid(
            with(&v, "/parameters/url", json!("apps.jelou.ai")),
            "message.parameters.url: must be an http:// or https:// URL",
        );
    }

    #[test]
    fn voice_call() {
        let v = msg(
            "voice_call",
            json!({"header": "Support", "text": "Call us", "parameters": {"display_text": "Call"}}),
        );
        valid(v.clone());
        each_required(
            &v,
            &[
                "/header",
                "/text",
                "/parameters",
                "/parameters/display_text",
            ],
        );
    }

    #[test]
    fn flow() {
        let v = msg(
            "flow",
            json!({"title": "Sign up", "text": "Fill in the form", "caption": "Jelou",
                   "parameters": {"flow_id": "123456", "flow_cta": "Start", "flow_name": "signup",
                                  "flow_action_payload": {"screen": "WELCOME"}, "mode": "published",
                                  "flow_action": "navigate", "flow_message_version": "3"}}),
        );
        valid(v.clone());
        valid(without(&v, "/caption"));
        valid(with(&v, "/parameters/flow_id", json!(123456)));
        each_required(
            &v,
            &[
                "/parameters",
                "/parameters/flow_id",
                "/parameters/flow_cta",
                "/parameters/flow_name",
                "/parameters/flow_action_payload",
                "/parameters/mode",
                "/parameters/flow_action",
                "/parameters/flow_message_version",
            ],
        );
        invalid(
            with(&v, "/parameters/flow_action_payload", json!("x")),
            "message.parameters.flow_action_payload: must be a JSON object",
        );
    }

    #[test]
    fn carousel() {
        let card = json!({
            "card_index": 0, "type": "cta_url",
            "header": {"type": "image", "image": {"link": "https://x.io/a.png"}},
            "body": {"text": "Plan A"},
            "action": {"name": "cta_url", "parameters": {"display_text": "Buy", "url": "https://x.io/a"}}
        });
        let v = msg(
            "CAROUSEL",
            json!({"text": "Our plans", "parameters": {"cards": [card]}}),
        );
        valid(v.clone());
        let c = "/parameters/cards/0";
        let mut required = vec![
            "/text".to_string(),
            "/parameters".into(),
            "/parameters/cards".into(),
        ];
        for p in [
            "card_index",
            "type",
            "header",
            "header/type",
            "header/image",
            "header/image/link",
            "body",
            "body/text",
            "action",
            "action/name",
            "action/parameters",
            "action/parameters/display_text",
            "action/parameters/url",
        ] {
            required.push(format!("{c}/{p}"));
        }
        let required: Vec<&str> = required.iter().map(String::as_str).collect();
        each_required(&v, &required);
        invalid(
            with(&v, "/parameters/cards/0/type", json!("quick_reply")),
            "message.parameters.cards[0].type: must be \"cta_url\"",
        );
        invalid(
            with(
                &v,
                "/parameters/cards/0/header/image/link",
                json!("http://x.io/a.png"),
            ),
            "message.parameters.cards[0].header.image.link: must be an https:// URL",
        );
        invalid(
            with(&v, "/parameters/cards/0/card_index", json!(-1)),
            "message.parameters.cards[0].card_index: must be a whole number from 0",
        );
        invalid(
            with(&v, "/parameters/cards", json!([])),
            "message.parameters.cards: 0 cards, at least 1",
        );
    }

    #[test]
    fn template_message() {
        let v = msg(
            "template",
            json!({"templateId": "order_shipped", "parameters": {"name": "Ana"}}),
        );
        valid(v.clone());
        valid(without(&v, "/parameters"));
        each_required(&v, &["/templateId"]);
        invalid(
            with(&v, "/parameters", json!(["Ana"])),
            "message.parameters: must be a JSON object",
        );
    }

    #[test]
    fn unknown_types_are_not_checked() {
        assert_eq!(
            check(&msg("poll", json!({"anything": [1, 2]}))),
            Ok(Verdict::UnknownType("poll".into()))
        );
        // Jelou spells it CAROUSEL: another case is a type the worker does not know.
        assert_eq!(
            check(&msg("carousel", json!({}))),
            Ok(Verdict::UnknownType("carousel".into()))
        );
        for t in KNOWN_TYPES {
            assert!(check(&msg(t, json!({}))).is_err(), "{t} has rules");
        }
    }

    #[test]
    fn every_duplicate_of_a_checked_field_is_checked() {
        let raw =
            RawValue::from_string(r#"{"type":"text","userId":"u","text":"ok","text":""}"#.into())
                .unwrap();
        assert_eq!(
            check_message(&raw).unwrap_err().to_string(),
            "message.text: must not be empty"
        );
        let raw =
            RawValue::from_string(r#"{"type":"text","userId":"u","text":"a","text":"b"}"#.into())
                .unwrap();
        assert_eq!(check_message(&raw), Ok(Verdict::Valid));
    }
}
