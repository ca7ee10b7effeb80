//! Template (HSM) jobs: a job carrying `template` and a top-level `userId` instead of
//! `message`, sent to Jelou's individual template send,
//! `POST {base_url}/v2/whatsapp/{botId}/hsm`, which works outside WhatsApp's 24-hour
//! window (the messages endpoint does not).
//!
//! The request body is the producer's `template` object as written, plus
//! `"destinations": [userId]`: exactly one destination per job, so that one job has one
//! result. Body fields (Jelou's HSM send): `elementName` (the template's name),
//! `destinations`, `language`, `type` (`text`, `image`, `document`, `video`; default
//! text), `parameters` (strings for the placeholders), `mediaUrl` (required for image
//! and document templates), `filename`, `buttonPayloads`, `actions`,
//! `headerParameters`, `buttonParameters` (`[{type: "URL", payload, param}]`),
//! `ltoParams` (`{expirationTime}`), `cards` (`[{mediaUrl, params, buttonParameters}]`),
//! `expirationTime`, `campaignId`.

use serde_json::value::RawValue;

use super::shape::{Checked, Kind, kind, object, problem, string};

/// The template types Jelou's HSM send accepts.
pub const TEMPLATE_TYPES: [&str; 4] = ["text", "image", "document", "video"];

/// What every template job must be, whether or not `jelou.validate_messages` is on:
/// an object, without `destinations` (the worker sets it from `userId`; a second one
/// would make the body ambiguous).
pub fn check_shape(template: &RawValue) -> Checked<()> {
    let t = object(template, "template")?;
    if t.written("destinations") {
        return Err(problem(
            "template.destinations",
            "must not be given: the worker sends to the job's userId",
        ));
    }
    Ok(())
}

/// Jelou's rules for a template send (HSM): `elementName` and `language` required;
/// `type` one of [`TEMPLATE_TYPES`]; `mediaUrl` an `https://` URL, required for image
/// and document templates; `parameters` (and each card's `params`) strings.
pub fn check_template(template: &RawValue) -> Checked<()> {
    check_shape(template)?;
    let t = object(template, "template")?;
    t.text("elementName", true, None)?;
    t.text("language", true, None)?;
    t.each("type", false, |v, path| {
        let ty = string(v, path)?;
        if TEMPLATE_TYPES.contains(&ty.as_str()) {
            Ok(())
        } else {
            Err(problem(
                path,
                format!("\"{ty}\" is not one of {}", TEMPLATE_TYPES.join(", ")),
            ))
        }
    })?;
    let media = matches!(t.peek_str("type").as_deref(), Some("image" | "document"));
    t.media_url("mediaUrl", media)?;
    t.text("filename", false, None)?;
    strings(&t.all("parameters"), &t.at("parameters"))?;
    strings(&t.all("headerParameters"), &t.at("headerParameters"))?;
    for key in ["buttonPayloads", "actions"] {
        t.array(key, false, (0, usize::MAX), "item", |_, _| Ok(()))?;
    }
    t.objects("buttonParameters", false, (0, usize::MAX), "button", |_| {
        Ok(())
    })?;
    t.object("ltoParams", false, |_| Ok(()))?;
    t.objects("cards", false, (0, usize::MAX), "card", |card| {
        card.media_url("mediaUrl", false)?;
        strings(&card.all("params"), &card.at("params"))?;
        card.objects("buttonParameters", false, (0, usize::MAX), "button", |_| {
            Ok(())
        })
    })
}

/// Each of `values` (a field's occurrences) is an array of strings.
fn strings(values: &[&RawValue], path: &str) -> Checked<()> {
    for v in values {
        for (i, item) in super::shape::array(v, path)?.iter().enumerate() {
            if kind(item) != Kind::String {
                return Err(problem(&format!("{path}[{i}]"), "must be a string"));
            }
        }
    }
    Ok(())
}

/// The HSM request body: `template` as the producer wrote it, with
/// `"destinations": [user_id]` added as its first field. `template` must have passed
/// [`check_shape`].
pub fn hsm_body(template: &RawValue, user_id: &str) -> Box<RawValue> {
    let text = template.get();
    // A RawValue object starts with `{` (serde_json keeps no surrounding whitespace).
    let rest = text[1..].trim_start();
    let destinations = serde_json::to_string(&[user_id]).expect("a string array always serialises");
    let body = if rest.starts_with('}') {
        format!("{{\"destinations\":{destinations}}}")
    } else {
        format!("{{\"destinations\":{destinations},{rest}")
    };
    RawValue::from_string(body).expect("a valid object with one more field is valid JSON")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn raw(v: &Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).unwrap()
    }

    fn check(v: Value) -> Result<(), String> {
        check_template(&raw(&v)).map_err(|p| p.to_string())
    }

    fn base() -> Value {
        json!({"elementName": "order_shipped", "language": "es", "parameters": ["Ana", "42"]})
    }

    fn with(key: &str, value: Value) -> Value {
        let mut v = base();
        v[key] = value;
        v
    }

    fn without(key: &str) -> Value {
        let mut v = base();
        v.as_object_mut().unwrap().remove(key);
        v
    }

    #[test]
    fn required_fields_and_types() {
        assert_eq!(check(base()), Ok(()));
        assert_eq!(check(without("parameters")), Ok(()));
        assert_eq!(
            check(without("elementName")),
            Err("template.elementName: required".into())
        );
        assert_eq!(
            check(without("language")),
            Err("template.language: required".into())
        );
        assert_eq!(
            check(with("language", json!(""))),
            Err("template.language: must not be empty".into())
        );
        assert_eq!(
            check(with("parameters", json!(["Ana", 42]))),
            Err("template.parameters[1]: must be a string".into())
        );
        assert_eq!(
            check(with("parameters", json!({"name": "Ana"}))),
            Err("template.parameters: must be a JSON array".into())
        );
        assert_eq!(
            check(with("type", json!("sticker"))),
            Err("template.type: \"sticker\" is not one of text, image, document, video".into())
        );
        assert_eq!(check(with("type", json!("video"))), Ok(()));
    }

    #[test]
    fn media_templates_need_an_https_media_url() {
        for ty in ["image", "document"] {
            assert_eq!(
                check(with("type", json!(ty))),
                Err("template.mediaUrl: required".into())
            );
            let mut v = with("type", json!(ty));
            v["mediaUrl"] = json!("https://cdn.example.com/a.pdf");
            assert_eq!(check(v.clone()), Ok(()));
            v["mediaUrl"] = json!("http://cdn.example.com/a.pdf");
            assert_eq!(
                check(v),
                Err("template.mediaUrl: must be an https:// URL".into())
            );
        }
        let cards =
            json!([{"mediaUrl": "https://x.io/a.png", "params": ["a"], "buttonParameters": []}]);
        assert_eq!(check(with("cards", cards)), Ok(()));
        let cards = json!([{"mediaUrl": "x.io/a.png"}]);
        assert_eq!(
            check(with("cards", cards)),
            Err("template.cards[0].mediaUrl: must be an https:// URL".into())
        );
        let buttons = json!([{"type": "URL", "payload": "p", "param": "x"}]);
        assert_eq!(check(with("buttonParameters", buttons)), Ok(()));
    }

    #[test]
    fn destinations_are_the_workers_to_set() {
        let v = with("destinations", json!(["593"]));
        assert_eq!(
            check_shape(&raw(&v)).unwrap_err().field,
            "template.destinations"
        );
        assert!(check_shape(&raw(&json!([]))).is_err());
        assert!(check_shape(&raw(&json!({}))).is_ok());
    }

    #[test]
    fn the_body_is_the_template_as_written_plus_one_destination() {
        let t = RawValue::from_string(
            r#"{"elementName":"x","language":"es","parameters":["a"],"extra":{"k":[1, 2]}}"#.into(),
        )
        .unwrap();
        assert_eq!(
            hsm_body(&t, "5939\"8").get(),
            r#"{"destinations":["5939\"8"],"elementName":"x","language":"es","parameters":["a"],"extra":{"k":[1, 2]}}"#
        );
        let empty = RawValue::from_string("{ }".into()).unwrap();
        assert_eq!(hsm_body(&empty, "u").get(), r#"{"destinations":["u"]}"#);
        let spaced = RawValue::from_string("{  \"a\" : 1 }".into()).unwrap();
        let body: Value = serde_json::from_str(hsm_body(&spaced, "u").get()).unwrap();
        assert_eq!(body, json!({"destinations": ["u"], "a": 1}));
    }
}
