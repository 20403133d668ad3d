//! The `/v1/events` server-sent event stream: [`Client::events`] opens it,
//! [`SseParser`] frames the `text/event-stream` bytes, [`decode_event`]
//! reads each message as an [`Event`], and [`EventStream`] ties them
//! together as the body arrives.

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header;
use hyper::Method;
use serde_json::Value;

use super::{Client, ClientError, RawResponse};
use crate::vm::events::Event;

impl Client {
    /// `GET /v1/events[?since=N]`: follows the event stream. `since` replays
    /// the buffered events after that sequence number first.
    pub async fn events(&self, since: Option<u64>) -> Result<EventStream, ClientError> {
        let path = match since {
            Some(n) => format!("/v1/events?since={n}"),
            None => "/v1/events".to_string(),
        };
        let response = self
            .send(
                Method::GET,
                &path,
                None,
                Vec::new(),
                Some("text/event-stream"),
            )
            .await?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|source| self.http_error(source))?
                .to_bytes();
            let raw = RawResponse {
                status,
                headers: parts.headers,
                body,
            };
            return Err(raw.api_error().expect("a non-2xx status is an error"));
        }
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type.starts_with("text/event-stream") {
            return Err(ClientError::Decode {
                request: format!("GET {path}"),
                reason: format!("content-type is {content_type:?}, not text/event-stream"),
            });
        }
        Ok(EventStream {
            endpoint: self.endpoint.to_string(),
            body: response.into_body(),
            parser: SseParser::default(),
            done: false,
        })
    }
}

/// One server-sent event as framed on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseMessage {
    /// The `id:` field, if any.
    pub id: Option<String>,
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines, joined by `\n`.
    pub data: String,
}

/// Incremental parser of the `text/event-stream` format: feed it bytes as
/// they arrive, take whole events out. Lines end with `\n` or `\r\n`;
/// comment lines (`:` keep-alives) and `retry:` are skipped, and an event
/// without data is not dispatched (as in the HTML standard).
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes not yet forming a whole line.
    pending: Vec<u8>,
    /// The event being assembled.
    current: SseMessage,
    /// Whether `current` has seen a `data` line.
    has_data: bool,
    /// Events complete and not yet taken.
    ready: std::collections::VecDeque<SseMessage>,
}

impl SseParser {
    /// Feeds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(newline) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let end = start + newline;
            let mut line = &self.pending[start..end];
            if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            let line = String::from_utf8_lossy(line).into_owned();
            self.line(&line);
            start = end + 1;
        }
        self.pending.drain(..start);
    }

    /// The next complete event, if any.
    pub fn next_message(&mut self) -> Option<SseMessage> {
        self.ready.pop_front()
    }

    fn line(&mut self, line: &str) {
        if line.is_empty() {
            let message = std::mem::take(&mut self.current);
            if std::mem::take(&mut self.has_data) {
                self.ready.push_back(message);
            }
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.current.event = Some(value.to_string()),
            // An id with NUL is ignored, as the standard says.
            "id" if !value.contains('\0') => self.current.id = Some(value.to_string()),
            _ => {}
        }
    }
}

/// Decodes an SSE message's data as an [`Event`]. The `id` and event name
/// fill in `seq` and `type` when the data leaves them out.
pub fn decode_event(message: &SseMessage) -> Result<Event, ClientError> {
    let decode_error = |reason: String| ClientError::Decode {
        request: "GET /v1/events".to_string(),
        reason,
    };
    let mut value: Value = serde_json::from_str(&message.data)
        .map_err(|e| decode_error(format!("event data is not JSON ({e}): {}", message.data)))?;
    if let Some(object) = value.as_object_mut() {
        if let Some(seq) = message.id.as_deref().and_then(|id| id.parse::<u64>().ok()) {
            object.entry("seq").or_insert(seq.into());
        }
        if let Some(name) = &message.event {
            object.entry("type").or_insert(name.as_str().into());
        }
    }
    serde_json::from_value(value).map_err(|e| decode_error(format!("event {e}")))
}

/// The daemon's event stream, read as it arrives.
#[derive(Debug)]
pub struct EventStream {
    endpoint: String,
    body: Incoming,
    parser: SseParser,
    done: bool,
}

impl EventStream {
    /// The next event; `None` when the daemon ended the stream.
    pub async fn next(&mut self) -> Option<Result<Event, ClientError>> {
        let message = match self.next_message().await? {
            Ok(message) => message,
            Err(e) => return Some(Err(e)),
        };
        Some(decode_event(&message))
    }

    /// The next event as framed on the wire, undecoded; `None` when the
    /// daemon ended the stream (a half-received event is dropped).
    pub async fn next_message(&mut self) -> Option<Result<SseMessage, ClientError>> {
        loop {
            if let Some(message) = self.parser.next_message() {
                return Some(Ok(message));
            }
            if self.done {
                return None;
            }
            match self.body.frame().await {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Err(source)) => {
                    self.done = true;
                    return Some(Err(ClientError::Http {
                        endpoint: self.endpoint.clone(),
                        source,
                    }));
                }
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.parser.push(data);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(parser: &mut SseParser) -> Vec<SseMessage> {
        std::iter::from_fn(|| parser.next_message()).collect()
    }

    fn msg(id: Option<&str>, event: Option<&str>, data: &str) -> SseMessage {
        SseMessage {
            id: id.map(Into::into),
            event: event.map(Into::into),
            data: data.into(),
        }
    }

    #[test]
    fn sse_events_split_at_every_byte_come_out_whole() {
        let wire = b": keep-alive\n\nid: 7\nevent: vm\ndata: {\"a\":1}\n\nid: 8\r\nevent: resync\r\ndata: x\r\n\r\n";
        for split in 0..wire.len() {
            let mut parser = SseParser::default();
            parser.push(&wire[..split]);
            let mut got = messages(&mut parser);
            parser.push(&wire[split..]);
            got.extend(messages(&mut parser));
            assert_eq!(
                got,
                vec![
                    msg(Some("7"), Some("vm"), "{\"a\":1}"),
                    msg(Some("8"), Some("resync"), "x")
                ],
                "split at {split}"
            );
        }
        // One byte at a time too.
        let mut parser = SseParser::default();
        let mut got = Vec::new();
        for b in wire {
            parser.push(&[*b]);
            got.extend(messages(&mut parser));
        }
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn sse_data_lines_join_with_newlines_and_comments_are_skipped() {
        let mut parser = SseParser::default();
        parser.push(b"data: one\n: a comment\ndata:two\ndata\nretry: 5\n\n");
        assert_eq!(messages(&mut parser), vec![msg(None, None, "one\ntwo\n")]);
    }

    #[test]
    fn sse_events_without_data_or_unterminated_are_not_dispatched() {
        let mut parser = SseParser::default();
        parser.push(b"event: vm\nid: 3\n\n:ping\n\ndata: half");
        assert!(messages(&mut parser).is_empty());
        // The field state of the dropped event does not leak into the next.
        parser.push(b"\n\n");
        assert_eq!(messages(&mut parser), vec![msg(None, None, "half")]);
    }

    #[test]
    fn event_data_decodes_with_seq_and_type_from_the_framing() {
        let full = msg(
            Some("9"),
            Some("vm_deleted"),
            r#"{"seq":9,"time":"2024-01-01T00:00:00.000Z","type":"vm_deleted","id":"00000000-0000-0000-0000-000000000000","name":"web"}"#,
        );
        let event = decode_event(&full).unwrap();
        assert_eq!(event.seq, 9);
        assert_eq!(event.body.name(), "vm_deleted");
        let bare = msg(
            Some("10"),
            Some("resync"),
            r#"{"time":"t","requested":3,"oldest":null}"#,
        );
        let event = decode_event(&bare).unwrap();
        assert_eq!(event.seq, 10);
        assert_eq!(
            event.body,
            crate::vm::events::EventBody::Resync {
                requested: 3,
                oldest: None
            }
        );
        let err = decode_event(&msg(None, None, "not json")).unwrap_err();
        assert!(err.to_string().contains("not JSON"), "{err}");
    }
}
