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
    let value = serde_path_to_error::deserialize(&mut de).map_err(path_error)?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// Like [`parse`], from an already parsed JSON value.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(path_error)
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
