//! The event bus: every change of a VM becomes an [`Event`] with a sequence
//! number. A bounded buffer keeps the recent ones so a client that
//! reconnects with `since=SEQ` misses nothing still buffered, and learns
//! (a `resync` event) when it asked for more than the buffer holds.
//!
//! Sequence numbers start at the daemon's start time in microseconds, so they
//! keep growing across daemon restarts: a client holding a number from
//! before a restart is told to resync instead of silently missing events.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::persist::timestamp;
use crate::storage::StorageEvents;
use crate::vm::record::Vm;

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Sequence number: strictly increasing, also the SSE `id`.
    pub seq: u64,
    /// When it happened (RFC 3339, UTC).
    pub time: String,
    /// What happened.
    #[serde(flatten)]
    pub body: EventBody,
}

/// What an event reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    /// A VM was created or changed; `vm` is its new view.
    Vm {
        /// The VM after the change.
        vm: Box<Vm>,
    },
    /// A VM was deleted.
    VmDeleted {
        /// Its UUID.
        id: Uuid,
        /// Its name.
        name: String,
    },
    /// A VM left this host by live migration: it runs on `target` now.
    /// The last event about it here.
    VmMigrated {
        /// Its UUID.
        id: Uuid,
        /// Its name.
        name: String,
        /// The daemon it went to (URL).
        target: String,
    },
    /// A live migration began, progressed or ended (on either end).
    Migration {
        /// The migration after the change.
        migration: Box<crate::spec::Migration>,
    },
    /// An image was added or changed (import progress, ready, failed).
    Image {
        /// The image after the change.
        image: Box<crate::spec::Image>,
    },
    /// An image was deleted (or its import cancelled).
    ImageDeleted {
        /// Its name.
        name: String,
    },
    /// A volume was created or changed.
    Volume {
        /// The volume after the change.
        volume: Box<crate::spec::Volume>,
    },
    /// A volume was deleted.
    VolumeDeleted {
        /// Its name.
        name: String,
    },
    /// Sent first (and only) to a client whose `since` is older than the
    /// buffer or unknown: events were missed, re-list to resynchronize.
    /// The stream goes on with new events after it.
    Resync {
        /// The `since` the client asked for.
        requested: u64,
        /// The oldest sequence number still buffered, if any.
        oldest: Option<u64>,
    },
}

impl EventBody {
    /// The SSE event name (`vm`, `vm_deleted`, `image`, …, `resync`).
    pub fn name(&self) -> &'static str {
        match self {
            EventBody::Vm { .. } => "vm",
            EventBody::VmDeleted { .. } => "vm_deleted",
            EventBody::VmMigrated { .. } => "vm_migrated",
            EventBody::Migration { .. } => "migration",
            EventBody::Image { .. } => "image",
            EventBody::ImageDeleted { .. } => "image_deleted",
            EventBody::Volume { .. } => "volume",
            EventBody::VolumeDeleted { .. } => "volume_deleted",
            EventBody::Resync { .. } => "resync",
        }
    }
}

/// The image and volume stores publish here.
impl StorageEvents for EventBus {
    fn image_changed(&self, image: &crate::spec::Image) {
        self.publish(EventBody::Image {
            image: Box::new(image.clone()),
        });
    }

    fn image_deleted(&self, name: &str) {
        self.publish(EventBody::ImageDeleted {
            name: name.to_string(),
        });
    }

    fn volume_changed(&self, volume: &crate::spec::Volume) {
        self.publish(EventBody::Volume {
            volume: Box::new(volume.clone()),
        });
    }

    fn volume_deleted(&self, name: &str) {
        self.publish(EventBody::VolumeDeleted {
            name: name.to_string(),
        });
    }
}

/// Publishes events and replays the buffered ones.
#[derive(Debug)]
pub struct EventBus {
    inner: Mutex<Inner>,
    live: broadcast::Sender<Event>,
}

#[derive(Debug)]
struct Inner {
    last_seq: u64,
    capacity: usize,
    buffer: VecDeque<Event>,
}

/// What a subscriber gets: the events to replay, then the live feed.
#[derive(Debug)]
pub struct Subscription {
    /// Buffered events after `since` (possibly led by a `resync`).
    pub backlog: Vec<Event>,
    /// New events from now on. Events already in `backlog` may appear here
    /// too; skip those whose `seq` is not above the last one seen.
    pub live: broadcast::Receiver<Event>,
}

impl EventBus {
    /// A bus keeping the last `capacity` events.
    pub fn new(capacity: usize) -> EventBus {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        EventBus::starting_at(capacity, start)
    }

    /// A bus whose first event gets `last_seq + 1`.
    pub fn starting_at(capacity: usize, last_seq: u64) -> EventBus {
        let (live, _) = broadcast::channel(capacity.clamp(16, 65536));
        EventBus {
            inner: Mutex::new(Inner {
                last_seq,
                capacity: capacity.max(1),
                buffer: VecDeque::new(),
            }),
            live,
        }
    }

    /// Publishes an event and returns its sequence number.
    pub fn publish(&self, body: EventBody) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        inner.last_seq += 1;
        let event = Event {
            seq: inner.last_seq,
            time: timestamp(SystemTime::now()),
            body,
        };
        if inner.buffer.len() == inner.capacity {
            inner.buffer.pop_front();
        }
        inner.buffer.push_back(event.clone());
        // Sent under the lock so live order matches sequence order.
        let _ = self.live.send(event);
        inner.last_seq
    }

    /// The last sequence number handed out.
    pub fn last_seq(&self) -> u64 {
        self.inner.lock().unwrap().last_seq
    }

    /// Subscribes from `since`: `None` means only new events; `Some(n)`
    /// replays the buffered events after `n`, led by a `resync` event when
    /// events after `n` are no longer buffered or `n` is from the future.
    pub fn subscribe(&self, since: Option<u64>) -> Subscription {
        let inner = self.inner.lock().unwrap();
        let live = self.live.subscribe();
        let Some(since) = since else {
            return Subscription {
                backlog: vec![],
                live,
            };
        };
        let oldest = inner.buffer.front().map(|e| e.seq);
        // Complete when every event after `since` is still buffered: the
        // first one after it is the oldest buffered, or none was published.
        let first_needed = since.saturating_add(1);
        let complete = since <= inner.last_seq
            && match oldest {
                Some(oldest) => first_needed >= oldest,
                None => since == inner.last_seq,
            };
        let backlog = if complete {
            inner
                .buffer
                .iter()
                .filter(|e| e.seq > since)
                .cloned()
                .collect()
        } else {
            // The client must re-list; replaying what is left would only
            // confuse it.
            vec![Event {
                seq: inner.last_seq,
                time: timestamp(SystemTime::now()),
                body: EventBody::Resync {
                    requested: since,
                    oldest,
                },
            }]
        };
        Subscription { backlog, live }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deleted(n: u32) -> EventBody {
        EventBody::VmDeleted {
            id: Uuid::nil(),
            name: format!("vm{n}"),
        }
    }

    #[test]
    fn sequence_numbers_grow_and_replay_starts_after_since() {
        let bus = EventBus::starting_at(10, 100);
        for n in 0..5 {
            assert_eq!(bus.publish(deleted(n)), 101 + n as u64);
        }
        let sub = bus.subscribe(Some(102));
        let seqs: Vec<u64> = sub.backlog.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![103, 104, 105]);
        assert!(bus.subscribe(Some(105)).backlog.is_empty());
        assert!(bus.subscribe(None).backlog.is_empty());
    }

    #[test]
    fn since_older_than_the_buffer_gets_a_resync() {
        let bus = EventBus::starting_at(3, 0);
        for n in 0..6 {
            bus.publish(deleted(n));
        }
        // Buffer holds 4, 5, 6; since=3 still has everything after it.
        assert_eq!(bus.subscribe(Some(3)).backlog.len(), 3);
        let sub = bus.subscribe(Some(2));
        assert_eq!(sub.backlog.len(), 1);
        assert_eq!(
            sub.backlog[0].body,
            EventBody::Resync {
                requested: 2,
                oldest: Some(4)
            }
        );
    }

    #[test]
    fn since_from_the_future_or_an_empty_buffer_gets_a_resync() {
        let bus = EventBus::starting_at(3, 50);
        assert!(bus.subscribe(Some(50)).backlog.is_empty());
        let sub = bus.subscribe(Some(10));
        assert!(matches!(sub.backlog[0].body, EventBody::Resync { .. }));
        bus.publish(deleted(0));
        let sub = bus.subscribe(Some(999));
        assert!(matches!(sub.backlog[0].body, EventBody::Resync { .. }));
    }

    #[tokio::test]
    async fn live_subscribers_see_new_events() {
        let bus = EventBus::starting_at(3, 0);
        let mut sub = bus.subscribe(None);
        bus.publish(deleted(0));
        let event = sub.live.recv().await.unwrap();
        assert_eq!(event.seq, 1);
        assert_eq!(event.body.name(), "vm_deleted");
    }
}
