//! `GET /v1/events`: server-sent events with sequence ids.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use crate::api::error::ApiError;
use crate::api::AppState;
use crate::vm::events::{Event, EventBody};

/// `GET /v1/events` options.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct EventsQuery {
    /// Replay buffered events after this sequence number first. Without it
    /// (and without a `Last-Event-ID` header) only new events are sent.
    pub since: Option<u64>,
}

fn to_sse(event: &Event) -> SseEvent {
    SseEvent::default()
        .id(event.seq.to_string())
        .event(event.body.name())
        .data(serde_json::to_string(event).expect("events always serialize"))
}

/// Stream events (`text/event-stream`). Each has `id: SEQ`, `event: TYPE`
/// (`vm`, `vm_deleted`, `resync`) and `data:` the event as JSON. A client
/// that reconnects with `since` (or `Last-Event-ID`) gets what it missed,
/// or a `resync` event when that is no longer buffered: then re-list.
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(EventsQuery),
    responses((status = 200, content_type = "text/event-stream", body = Event,
        description = "A stream of server-sent events; each `data` is one Event")))]
pub async fn stream(
    State(app): State<AppState>,
    Query(query): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad_request("Last-Event-ID must be a sequence number"))?,
        ),
        None => None,
    };
    let since = query.since.or(last_event_id);
    let subscription = app.manager.events().subscribe(since);
    let mut last = subscription
        .backlog
        .last()
        .map(|e| e.seq)
        .or(since)
        .unwrap_or(0);
    let backlog = stream::iter(subscription.backlog.into_iter().map(|e| Ok(to_sse(&e))));
    let shutdown = app.shutdown.clone();
    let live = stream::unfold(subscription.live, move |mut live| {
        let mut shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = shutdown.wait_for(|down| *down) => None,
                received = live.recv() => match received {
                    Ok(event) => Some((event, live)),
                    Err(RecvError::Closed) => None,
                    Err(RecvError::Lagged(missed)) => {
                        // Too slow a reader: say so, as for a stale `since`.
                        tracing::warn!(missed, "event subscriber lagged");
                        let resync = Event {
                            seq: 0,
                            time: crate::persist::timestamp(std::time::SystemTime::now()),
                            body: EventBody::Resync { requested: 0, oldest: None },
                        };
                        Some((resync, live))
                    }
                },
            }
        }
    })
    .filter_map(move |event| {
        // The live feed may repeat what the backlog already sent.
        let keep = matches!(event.body, EventBody::Resync { .. }) || event.seq > last;
        if keep && event.seq > last {
            last = event.seq;
        }
        let item = keep.then(|| Ok(to_sse(&event)));
        async move { item }
    });
    Ok(
        Sse::new(backlog.chain(live))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))),
    )
}
