//! Request bodies: JSON parsed with the path of any bad field, so a 422
//! names `disks[0].format`, not just "invalid type".

use axum::body::Bytes;
use serde::de::DeserializeOwned;
use serde_json::error::Category;

use crate::api::error::ApiError;

/// Parses `bytes` as JSON into `T`: malformed JSON is a 400, JSON of the
/// wrong shape a 422 naming the field.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = match serde_path_to_error::deserialize(&mut de) {
        Ok(value) => value,
        Err(e) => {
            // Well-formed JSON missing fields: name them all, not just the
            // first serde stops at.
            if let (Some(missing), Ok(json)) = (missing_field(&e), serde_json::from_slice(bytes)) {
                return Err(every_missing::<T>(json, missing));
            }
            return Err(path_error(e));
        }
    };
    de.end()
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// Like [`parse`], from an already parsed JSON value.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value.clone()).map_err(|e| match missing_field(&e) {
        Some(missing) => every_missing::<T>(value, missing),
        None => path_error(e),
    })
}

/// A field serde found missing: the object it belongs in (as path
/// segments) and its name.
struct Missing {
    object: Vec<Step>,
    field: String,
}

impl Missing {
    /// `disks[0].format`, or `name` at the top.
    fn path(&self) -> String {
        let mut text = String::new();
        for step in &self.object {
            match step {
                Step::Key(key) => {
                    if !text.is_empty() {
                        text.push('.');
                    }
                    text.push_str(key);
                }
                Step::Index(i) => text.push_str(&format!("[{i}]")),
            }
        }
        if !text.is_empty() {
            text.push('.');
        }
        text.push_str(&self.field);
        text
    }
}

/// One step into a JSON value.
#[derive(Clone)]
enum Step {
    Key(String),
    Index(usize),
}

/// The missing field `e` reports, if that is what it is (and its place
/// can be followed in the JSON).
fn missing_field(e: &serde_path_to_error::Error<serde_json::Error>) -> Option<Missing> {
    let inner = e.inner();
    if inner.classify() != Category::Data {
        return None;
    }
    let message = inner.to_string();
    let rest = message.strip_prefix("missing field `")?;
    let field = rest[..rest.find('`')?].to_string();
    let mut object = Vec::new();
    for segment in e.path().iter() {
        match segment {
            serde_path_to_error::Segment::Map { key } => object.push(Step::Key(key.clone())),
            serde_path_to_error::Segment::Seq { index } => object.push(Step::Index(*index)),
            // Enum variants and unknown steps cannot be followed in JSON.
            _ => return None,
        }
    }
    Some(Missing { object, field })
}

fn object_at<'a>(
    value: &'a mut serde_json::Value,
    steps: &[Step],
) -> Option<&'a mut serde_json::Map<String, serde_json::Value>> {
    let mut at = value;
    for step in steps {
        at = match step {
            Step::Key(key) => at.get_mut(key)?,
            Step::Index(i) => at.get_mut(*i)?,
        };
    }
    at.as_object_mut()
}

/// Puts a stand-in for the missing field `m` into `json`. `None`: no
/// stand-in passes; `Some(next)`: it does, and `next` is the next missing
/// field outside it (if that is what stops the body now).
fn fill<T: DeserializeOwned>(
    json: &mut serde_json::Value,
    m: &Missing,
    budget: &mut usize,
) -> Option<Option<Missing>> {
    let path = m.path();
    let inside = |at: &str| {
        at == path || at.starts_with(&format!("{path}.")) || at.starts_with(&format!("{path}["))
    };
    for stand_in in [
        serde_json::Value::Null,
        0.into(),
        "".into(),
        // A string some types insist on the form of (a UUID).
        "00000000-0000-0000-0000-000000000000".into(),
        false.into(),
        serde_json::json!([]),
        serde_json::json!({}),
    ] {
        object_at(json, &m.object)?.insert(m.field.clone(), stand_in.clone());
        loop {
            *budget = budget.checked_sub(1)?;
            let e = match serde_path_to_error::deserialize::<_, T>(json.clone()) {
                Ok(_) => return Some(None),
                Err(e) => e,
            };
            let at = e.path().to_string();
            let message = e.inner().to_string();
            // An enum tag: the first variant serde expects.
            if stand_in.is_string() && message.starts_with("unknown variant ``") {
                if let Some(variant) = message
                    .split("expected `")
                    .nth(1)
                    .and_then(|rest| rest.split('`').next())
                {
                    object_at(json, &m.object)?.insert(m.field.clone(), variant.into());
                    continue;
                }
            }
            // Where serde reports a problem of an enum's content: at the
            // enum, an ancestor of the field.
            let above = at.is_empty() || at == "." || path.starts_with(&format!("{at}."));
            match missing_field(&e) {
                // A required field of the stand-in itself: fill it too.
                Some(nested)
                    if stand_in.is_object()
                        && inside(&nested.path())
                        && fill::<T>(json, &nested, budget).is_some() =>
                {
                    continue;
                }
                // The next field missing elsewhere.
                Some(next) if !inside(&at) => return Some(Some(next)),
                Some(_) => {}
                // Another problem, not this stand-in's: it passed.
                None if !inside(&at) && !above => return Some(None),
                None => {}
            }
            break;
        }
    }
    None
}

/// The 422 for a body missing `first` and maybe more: serde stops at the
/// first, so each is filled in with a stand-in value of whatever type
/// passes (an object gets stand-ins for its own required fields, an enum
/// tag the first variant serde names), and the body tried again, until it
/// is complete. The stand-ins only find the next missing field; nothing is
/// built from them, and the fields inside a stand-in are not reported.
fn every_missing<T: DeserializeOwned>(mut json: serde_json::Value, first: Missing) -> ApiError {
    /// More than any request body of the API has.
    const MAX_FIELDS: usize = 64;
    let mut budget = 4 * MAX_FIELDS;
    let mut missing = vec![first.path()];
    let mut current = first;
    while missing.len() < MAX_FIELDS {
        match fill::<T>(&mut json, &current, &mut budget) {
            Some(Some(next)) => {
                missing.push(next.path());
                current = next;
            }
            _ => break,
        }
    }
    let mut error = ApiError::invalid(
        missing
            .iter()
            .map(|field| crate::spec::FieldError {
                field: field.clone(),
                message: "is required".into(),
            })
            .collect(),
    );
    error.message = match missing.as_slice() {
        [one] => format!("missing field {one}"),
        many => format!("missing fields {}", many.join(", ")),
    };
    error
}

/// An optional body: empty (or JSON `null`) means `T::default()`.
pub fn parse_optional<T: DeserializeOwned + Default>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) || bytes.trim_ascii() == b"null" {
        Ok(T::default())
    } else {
        parse(bytes)
    }
}

fn path_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    match inner.classify() {
        Category::Data => {
            let field = if path == "." {
                "body".to_string()
            } else {
                path
            };
            ApiError::invalid_field(field, strip_position(&inner.to_string()))
        }
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::bad_request(format!("malformed JSON: {inner}"))
        }
    }
}

/// serde_json appends " at line 1 column 40"; the field path says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::VmSpec;

    #[test]
    fn a_wrongly_typed_field_is_named_and_bad_json_is_a_400() {
        let body = br#"{"uuid":"6c1f2b4e-8a1d-4a57-9a51-2f3c0d9e8b11","name":"a","vcpus":"two","memory_mib":64,"boot":{"type":"firmware"}}"#;
        let err = parse::<VmSpec>(body).unwrap_err();
        assert_eq!(err.status.as_u16(), 422);
        assert_eq!(err.fields[0].field, "vcpus");
        assert!(!err.message.contains("line"), "{}", err.message);

        let body = br#"{"uuid":"6c1f2b4e-8a1d-4a57-9a51-2f3c0d9e8b11","name":"a","vcpus":1,"memory_mib":64,"boot":{"type":"firmware"},"disks":[{"path":"/x","format":"vmdk"}]}"#;
        let err = parse::<VmSpec>(body).unwrap_err();
        assert_eq!(err.fields[0].field, "disks[0].format");

        let err = parse::<VmSpec>(b"{\"name\": ").unwrap_err();
        assert_eq!(err.status.as_u16(), 400);
        let err = parse::<serde_json::Value>(b"{} trailing").unwrap_err();
        assert_eq!(err.status.as_u16(), 400);
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        a: u32,
        b: String,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        count: u64,
        flag: bool,
        list: Vec<Inner>,
        maybe: Option<String>,
    }

    #[test]
    fn every_missing_field_is_named_without_a_body_prefix() {
        let err = parse::<Outer>(b"{}").unwrap_err();
        assert_eq!(err.status.as_u16(), 422);
        assert_eq!(err.code, "invalid_spec");
        let fields: Vec<&str> = err.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["name", "count", "flag", "list"]);
        assert_eq!(err.message, "missing fields name, count, flag, list");
        assert!(!err.message.contains("body"), "{}", err.message);

        let err =
            parse::<Outer>(br#"{"name":"x","count":1,"flag":true,"list":[{"a":1,"b":"y"},{}]}"#)
                .unwrap_err();
        let fields: Vec<&str> = err.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["list[1].a", "list[1].b"]);
        assert_eq!(err.message, "missing fields list[1].a, list[1].b");

        let err = from_value::<Outer>(serde_json::json!({"count": 1, "flag": false, "list": []}))
            .unwrap_err();
        assert_eq!(err.message, "missing field name");
        // A missing field after a wrongly typed one: the type error comes
        // first, as before.
        let err = parse::<Outer>(br#"{"name":"x","count":"many"}"#).unwrap_err();
        assert_eq!(err.fields[0].field, "count");
    }

    #[test]
    fn a_missing_spec_field_is_listed_with_the_others() {
        let err = parse::<VmSpec>(br#"{"uuid":"6c1f2b4e-8a1d-4a57-9a51-2f3c0d9e8b11","boot":{}}"#)
            .unwrap_err();
        let fields: Vec<&str> = err.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields[0], "boot.type", "{fields:?}");
        let err = parse::<VmSpec>(br#"{"boot":{"type":"kernel"},"vcpus":1}"#).unwrap_err();
        let mut fields: Vec<&str> = err.fields.iter().map(|f| f.field.as_str()).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            ["boot.kernel", "memory_mib", "name", "uuid"],
            "{fields:?}"
        );
        let err =
            parse::<VmSpec>(br#"{"uuid":"6c1f2b4e-8a1d-4a57-9a51-2f3c0d9e8b11"}"#).unwrap_err();
        let fields: Vec<&str> = err.fields.iter().map(|f| f.field.as_str()).collect();
        // Past `boot`, an enum object of its own, too.
        let mut sorted = fields.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            ["boot", "memory_mib", "name", "vcpus"],
            "{fields:?}"
        );
        assert!(
            err.message.starts_with("missing fields "),
            "{}",
            err.message
        );
    }

    #[derive(Debug, Default, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Optional {
        #[serde(default)]
        force: bool,
    }

    #[test]
    fn an_optional_body_may_be_empty_or_null() {
        for empty in ["", "  \n", "null", " null\n"] {
            let parsed: Optional = parse_optional(&Bytes::from(empty)).unwrap();
            assert_eq!(parsed, Optional::default(), "{empty:?}");
        }
        let parsed: Optional = parse_optional(&Bytes::from(r#"{"force":true}"#)).unwrap();
        assert!(parsed.force);
        let err = parse_optional::<Optional>(&Bytes::from("nul")).unwrap_err();
        assert_eq!(err.status.as_u16(), 400);
        let err = parse_optional::<Optional>(&Bytes::from(r#""yes""#)).unwrap_err();
        assert_eq!(err.status.as_u16(), 422);
    }
}
