//! Requests to a test daemon's HTTP API, and assertions on its answers,
//! shared by the tests that drive `vmlet serve` over HTTP.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;
use vmlet::client::{EventStream, Method};
use vmlet::vm::events::Event;

use super::daemon::Daemon;

/// Sends a request and returns its status and JSON body (`null` when empty).
pub async fn call(d: &Daemon, method: Method, path: &str, body: Option<&Value>) -> (u16, Value) {
    d.client
        .request_json(method.clone(), path, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// [`call`] that expects `status`; returns the body.
pub async fn expect(
    d: &Daemon,
    method: Method,
    path: &str,
    body: Option<&Value>,
    status: u16,
) -> Value {
    let (got, answer) = call(d, method.clone(), path, body).await;
    assert_eq!(got, status, "{method} {path}: {answer}");
    answer
}

/// `POST /v1/vms`, expecting 201; returns the VM.
pub async fn create_vm(d: &Daemon, spec: &Value) -> Value {
    expect(d, Method::POST, "/v1/vms", Some(spec), 201).await
}

/// `DELETE /v1/vms/{id}?force=true`, expecting 204.
pub async fn force_delete_vm(d: &Daemon, id: &str) {
    let path = format!("/v1/vms/{id}?force=true");
    expect(d, Method::DELETE, &path, None, 204).await;
}

/// Asserts an error answer with `status`, `code` and a message; returns
/// the `error` object.
pub fn assert_error(answer: &(u16, Value), status: u16, code: &str) -> Value {
    let (got, body) = answer;
    assert_eq!(*got, status, "expected {status} {code}, got: {body}");
    let error = &body["error"];
    assert_eq!(error["code"], code, "error code in {body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error message in {body}"
    );
    error.clone()
}

/// Asserts a 422 naming `field` (first, and among `fields`).
pub fn assert_invalid_field(answer: &(u16, Value), field: &str) {
    let error = assert_error(answer, 422, "invalid_spec");
    assert_eq!(error["field"], field, "field in {error}");
    let fields: Vec<&str> = error["fields"]
        .as_array()
        .map(|a| a.iter().filter_map(|f| f["field"].as_str()).collect())
        .unwrap_or_default();
    assert!(fields.contains(&field), "fields in {error}");
}

/// A VM's `id`.
pub fn id_of(vm: &Value) -> String {
    vm["id"].as_str().expect("VM has an id").to_string()
}

/// A VM's `id` as a UUID.
pub fn uuid_of(vm: &Value) -> Uuid {
    id_of(vm).parse().expect("VM id is a UUID")
}

/// The next event, or `None` when none comes within `timeout`.
pub async fn next_event(stream: &mut EventStream, timeout: Duration) -> Option<Event> {
    match tokio::time::timeout(timeout, stream.next()).await {
        Ok(Some(Ok(event))) => Some(event),
        Ok(Some(Err(e))) => panic!("event stream failed: {e}"),
        Ok(None) => panic!("the daemon ended the event stream"),
        Err(_) => None,
    }
}

/// The next event, which must come within `timeout`.
pub async fn expect_event_within(stream: &mut EventStream, timeout: Duration) -> Event {
    next_event(stream, timeout)
        .await
        .unwrap_or_else(|| panic!("no event within {timeout:?}"))
}

/// A one-time token for VM `id`'s console of `kind` (`vnc` or `serial`).
pub async fn console_token(d: &Daemon, id: &str, kind: &str) -> String {
    let token = expect(
        d,
        Method::POST,
        &format!("/v1/vms/{id}/console"),
        Some(&serde_json::json!({ "type": kind })),
        201,
    )
    .await;
    token["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {token}"))
        .to_string()
}

/// A one-time token for VM `id`'s serial console.
pub async fn serial_token(d: &Daemon, id: &str) -> String {
    console_token(d, id, "serial").await
}
