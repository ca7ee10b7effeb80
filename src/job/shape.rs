//! Reading the shape of untrusted JSON one level at a time, for the rules in
//! [`super::rules`] and [`super::template`].
//!
//! A message is kept as raw bytes and never parsed into a whole tree: each object is
//! split into its fields ([`Obj`]), each field kept raw until a rule looks inside it.
//! So a rule only ever descends as deep as Jelou's documented shapes go, and a hostile
//! depth anywhere else is skipped by serde_json's iterative skipping, never recursed
//! into. Every duplicate of a key is kept, and a rule checks each one: whichever
//! Jelou reads, it satisfies the rule (the job is still sent as written).

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A broken rule: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field's path: `message.quick_replies[3].title`.
    pub field: String,
    /// What is wrong: `21 characters, at most 20`.
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.what)
    }
}

pub type Checked<T> = Result<T, Problem>;

pub fn problem(field: &str, what: impl Into<String>) -> Problem {
    Problem {
        field: field.to_string(),
        what: what.into(),
    }
}

/// The JSON kind of a raw value, from its first byte (serde_json keeps no leading
/// whitespace in a [`RawValue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

pub fn kind(raw: &RawValue) -> Kind {
    match raw.get().as_bytes().first() {
        Some(b'n') => Kind::Null,
        Some(b't' | b'f') => Kind::Bool,
        Some(b'"') => Kind::String,
        Some(b'[') => Kind::Array,
        Some(b'{') => Kind::Object,
        _ => Kind::Number,
    }
}

/// `n noun` with an English plural: `1 button`, `4 buttons`.
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The fields of one JSON object, in order, duplicates included, values raw.
pub struct Obj<'a> {
    path: String,
    fields: Vec<(String, &'a RawValue)>,
}

struct Fields<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    fields.push((k, v));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

/// Reads `raw` as an object named `path`.
pub fn object<'a>(raw: &'a RawValue, path: &str) -> Checked<Obj<'a>> {
    if kind(raw) != Kind::Object {
        return Err(problem(path, "must be a JSON object"));
    }
    let Fields(fields) =
        serde_json::from_str(raw.get()).map_err(|e| problem(path, e.to_string()))?;
    Ok(Obj {
        path: path.to_string(),
        fields,
    })
}

/// Reads `raw` as an array named `path`; its items stay raw.
pub fn array<'a>(raw: &'a RawValue, path: &str) -> Checked<Vec<&'a RawValue>> {
    if kind(raw) != Kind::Array {
        return Err(problem(path, "must be a JSON array"));
    }
    serde_json::from_str(raw.get()).map_err(|e| problem(path, e.to_string()))
}

/// Reads `raw` as a string named `path`.
pub fn string(raw: &RawValue, path: &str) -> Checked<String> {
    if kind(raw) != Kind::String {
        return Err(problem(path, "must be a string"));
    }
    serde_json::from_str(raw.get()).map_err(|e| problem(path, e.to_string()))
}

/// A string of at most `max` characters (Unicode scalar values, not bytes).
pub fn max_chars(s: &str, max: usize, path: &str) -> Checked<()> {
    let n = s.chars().count();
    if n > max {
        return Err(problem(path, format!("{n} characters, at most {max}")));
    }
    Ok(())
}

/// An `https://` URL with a host. Jelou answers `INVALID_MEDIA_URL` to anything else
/// (<https://docs.jelou.ai/api/envia-mensajes/imagen.md>, "Requisitos de URL"). Whether
/// it points straight at a file of the right type and size cannot be known without
/// fetching it, which the worker never does.
pub fn https_url(s: &str, path: &str) -> Checked<()> {
    match url::Url::parse(s) {
        Ok(u) if u.scheme() == "https" && u.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
        _ => Err(problem(path, "must be an https:// URL")),
    }
}

/// A web link for a button: `http://` or `https://` with a host.
pub fn web_url(s: &str, path: &str) -> Checked<()> {
    match url::Url::parse(s) {
        Ok(u)
            if matches!(u.scheme(), "https" | "http")
                && u.host_str().is_some_and(|h| !h.is_empty()) =>
        {
            Ok(())
        }
        _ => Err(problem(path, "must be an http:// or https:// URL")),
    }
}

impl<'a> Obj<'a> {
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path of one of this object's fields.
    pub fn at(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    /// Every value given for `key`, JSON null counting as absent.
    pub fn all(&self, key: &str) -> Vec<&'a RawValue> {
        self.fields
            .iter()
            .filter(|(k, v)| k == key && kind(v) != Kind::Null)
            .map(|(_, v)| *v)
            .collect()
    }

    pub fn has(&self, key: &str) -> bool {
        !self.all(key).is_empty()
    }

    /// Whether the key is written at all, even as null.
    pub fn written(&self, key: &str) -> bool {
        self.fields.iter().any(|(k, _)| k == key)
    }

    /// The last string given for `key`, if any and if it is one (for choosing a rule;
    /// the rule itself checks every value).
    pub fn peek_str(&self, key: &str) -> Option<String> {
        self.all(key)
            .last()
            .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
    }

    /// Runs `check` on every value of `key`; `required`: at least one must be given.
    pub fn each(
        &self,
        key: &str,
        required: bool,
        mut check: impl FnMut(&'a RawValue, &str) -> Checked<()>,
    ) -> Checked<()> {
        let path = self.at(key);
        let values = self.all(key);
        if required && values.is_empty() {
            return Err(problem(&path, "required"));
        }
        for v in values {
            check(v, &path)?;
        }
        Ok(())
    }

    /// A string field. Required means present and not blank; `max` in characters.
    pub fn text(&self, key: &str, required: bool, max: Option<usize>) -> Checked<()> {
        self.each(key, required, |v, path| {
            let s = string(v, path)?;
            if required && s.trim().is_empty() {
                return Err(problem(path, "must not be empty"));
            }
            if let Some(max) = max {
                max_chars(&s, max, path)?;
            }
            Ok(())
        })
    }

    /// A string field holding an `https://` URL.
    pub fn media_url(&self, key: &str, required: bool) -> Checked<()> {
        self.each(key, required, |v, path| https_url(&string(v, path)?, path))
    }

    /// A string or a number (ids and versions are written either way in Jelou's examples).
    pub fn scalar(&self, key: &str, required: bool) -> Checked<()> {
        self.each(key, required, |v, path| match kind(v) {
            Kind::Number => Ok(()),
            Kind::String if !string(v, path)?.trim().is_empty() => Ok(()),
            Kind::String => Err(problem(path, "must not be empty")),
            _ => Err(problem(path, "must be a string or a number")),
        })
    }

    /// An object field, checked by `check`.
    pub fn object(
        &self,
        key: &str,
        required: bool,
        mut check: impl FnMut(&Obj<'a>) -> Checked<()>,
    ) -> Checked<()> {
        self.each(key, required, |v, path| check(&object(v, path)?))
    }

    /// An array field of `min..=max` items, `noun` naming one in messages; `check`
    /// sees the items and the field's path.
    pub fn array(
        &self,
        key: &str,
        required: bool,
        (min, max): (usize, usize),
        noun: &str,
        mut check: impl FnMut(&[&'a RawValue], &str) -> Checked<()>,
    ) -> Checked<()> {
        self.each(key, required, |v, path| {
            let items = array(v, path)?;
            if items.len() < min {
                return Err(problem(
                    path,
                    format!("{}, at least {min}", count(items.len(), noun)),
                ));
            }
            if items.len() > max {
                return Err(problem(
                    path,
                    format!("{}, at most {max}", count(items.len(), noun)),
                ));
            }
            check(&items, path)
        })
    }

    /// An array of objects, each checked by `check` (named `path[i]`).
    pub fn objects(
        &self,
        key: &str,
        required: bool,
        bounds: (usize, usize),
        noun: &str,
        mut check: impl FnMut(&Obj<'a>) -> Checked<()>,
    ) -> Checked<()> {
        self.array(key, required, bounds, noun, |items, path| {
            for (i, item) in items.iter().enumerate() {
                check(&object(item, &format!("{path}[{i}]"))?)?;
            }
            Ok(())
        })
    }

    /// A field that must be exactly the string `want`.
    pub fn literal(&self, key: &str, want: &str) -> Checked<()> {
        self.each(key, true, |v, path| {
            if string(v, path)? == want {
                Ok(())
            } else {
                Err(problem(path, format!("must be \"{want}\"")))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn an_object_keeps_duplicates_and_treats_null_as_absent() {
        let r = raw(r#"{"a":1,"a":"x","b":null,"c":[1]}"#);
        let o = object(&r, "m").unwrap();
        assert_eq!(o.all("a").len(), 2);
        assert!(!o.has("b") && o.written("b"));
        assert_eq!(o.at("c"), "m.c");
        assert_eq!(o.peek_str("a").as_deref(), Some("x"));
        // Every duplicate is checked.
        assert_eq!(
            o.text("a", true, None).unwrap_err().to_string(),
            "m.a: must be a string"
        );
        assert_eq!(
            o.text("b", true, None).unwrap_err().to_string(),
            "m.b: required"
        );
    }

    #[test]
    fn kinds_lengths_and_urls() {
        assert_eq!(kind(&raw("-1.5")), Kind::Number);
        assert_eq!(kind(&raw("[]")), Kind::Array);
        assert!(max_chars(&"é".repeat(20), 20, "p").is_ok());
        assert_eq!(
            max_chars(&"é".repeat(21), 20, "p").unwrap_err().to_string(),
            "p: 21 characters, at most 20"
        );
        assert!(https_url("https://cdn.example.com/a.png?x=1", "p").is_ok());
        for bad in [
            "http://x/a.png",
            "ftp://x",
            "https://",
            "/a.png",
            "",
            "https//x",
        ] {
            assert!(https_url(bad, "p").is_err(), "{bad}");
        }
        assert!(web_url("http://x.io", "p").is_ok());
        assert!(web_url("javascript:alert(1)", "p").is_err());
        assert!(object(&raw("[1]"), "p").is_err());
        assert!(array(&raw("{}"), "p").is_err());
        assert_eq!(count(1, "card"), "1 card");
        assert_eq!(count(0, "card"), "0 cards");
    }

    #[test]
    fn deep_values_the_rules_do_not_read_are_skipped_without_recursion() {
        let depth = 100_000;
        let deep = format!(
            r#"{{"x":{}{},"t":"ok"}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let r = raw(&deep);
        let o = object(&r, "m").unwrap();
        assert!(o.text("t", true, None).is_ok());
        // A rule that reads the deep field sees only its first level.
        assert_eq!(array(o.all("x")[0], "m.x").unwrap().len(), 1);
    }
}
