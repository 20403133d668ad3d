//! `vmlet node` and `vmlet events`: the node's summary and the stream of
//! changes to its VMs, images and volumes, and how both are rendered.

use std::io::Write;

use super::storage::{image_line, volume_line};
use super::vm::vm_line;
use super::{key_values, mib, shown, write_flush, CliError, ClientOptions, Output};
use crate::node::NodeInfo;
use crate::vm::events::{Event, EventBody};

/// Runs `vmlet node`, printing to `out`.
pub async fn run_node(opts: &ClientOptions, out: &mut impl Write) -> Result<(), CliError> {
    let node = opts.client()?.node().await?;
    let text = shown(opts.output == Output::Json, &node, render_node);
    write_flush(out, &text)
}

/// Runs `vmlet events`: prints each event as it arrives, one line each,
/// until interrupted. `since` replays the buffered events after that
/// sequence number first. When the stream ends or breaks (the daemon
/// stopped or restarted), it reconnects with `since` set to the last event
/// printed, so nothing buffered is missed; a daemon that no longer has
/// those events (a restarted one) sends a `resync` event first. The first
/// connection is not retried: no daemon at all is an error. A closed output
/// (`| head`) ends it quietly.
pub async fn run_events(
    since: Option<u64>,
    opts: &ClientOptions,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let client = opts.client()?;
    let mut since = since;
    let mut stream = client.events(since).await?;
    let mut delay = RECONNECT_MIN;
    loop {
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(event) => event,
                // A connection reset mid-stream: reconnect below.
                Err(e) if reconnectable(&e) => break,
                Err(e) => return Err(e.into()),
            };
            since = Some(event.seq);
            delay = RECONNECT_MIN;
            let mut line = match opts.output {
                Output::Json => serde_json::to_string(&event).unwrap_or_default(),
                Output::Table => render_event(&event),
            };
            line.push('\n');
            match write_flush(out, &line) {
                Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    return Ok(())
                }
                other => other?,
            }
        }
        if opts.output == Output::Table {
            let after = since.map_or(String::new(), |n| format!(" after event {n}"));
            eprintln!("vmlet: the event stream ended; reconnecting to resume{after}");
        }
        stream = loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RECONNECT_MAX);
            match client.events(since).await {
                Ok(stream) => break stream,
                Err(e) if reconnectable(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        };
    }
}

/// The first wait before reconnecting to the event stream; it doubles up
/// to [`RECONNECT_MAX`] while the daemon stays away.
const RECONNECT_MIN: std::time::Duration = std::time::Duration::from_millis(200);
/// The longest wait between reconnection attempts.
const RECONNECT_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether `e` is the daemon being away (restarting), worth reconnecting
/// after, rather than a refusal that would only repeat.
fn reconnectable(e: &crate::client::ClientError) -> bool {
    use crate::client::ClientError;
    match e {
        ClientError::Connect { .. } | ClientError::Http { .. } => true,
        ClientError::Api { code, .. } => code == "unavailable",
        _ => false,
    }
}

/// `node` as `key: value` lines.
pub fn render_node(node: &NodeInfo) -> String {
    let vms = if node.vms_by_state.is_empty() {
        "none".to_string()
    } else {
        node.vms_by_state
            .iter()
            .map(|(state, n)| format!("{state}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut lines: Vec<(String, String)> = vec![
        ("hostname".into(), node.hostname.clone()),
        ("vmlet".into(), node.vmlet_version.clone()),
        ("cpus".into(), node.cpus.to_string()),
        ("memory".into(), mib(node.memory_mib)),
        (
            "qemu".into(),
            format!("{} {}", node.qemu_binary, node.qemu_version),
        ),
        (
            "accel".into(),
            if node.accel_reason.is_empty() {
                node.accel.clone()
            } else {
                format!("{} ({})", node.accel, node.accel_reason)
            },
        ),
        ("profiles".into(), node.profiles.join(", ")),
        ("machines".into(), machines_line(node)),
        (
            "cpu models".into(),
            format!("{} usable (`-o json` lists them)", node.cpu_models.len()),
        ),
        ("vms".into(), vms),
        ("stop grace".into(), format!("{}s", node.stop_grace_s)),
    ];
    let inv = &node.inventory;
    for (name, r) in [
        ("vcpus", &inv.vcpus),
        ("memory_mib", &inv.memory_mib),
        ("disk_gib", &inv.disk_gib),
    ] {
        lines.push((
            name.into(),
            format!(
                "{} free of {} × {} − {} reserved, {} allocated",
                r.free, r.total, r.allocation_ratio, r.reserved, r.allocated
            ),
        ));
    }
    key_values(&lines)
}

/// The machine types in brief: how many, and what the default profile
/// gets (the full list is in `-o json`).
fn machines_line(node: &NodeInfo) -> String {
    let count = node.machine_types.len();
    match &node.default_machine_type {
        Some(t) => format!(
            "{count} types; profile {} gets {t}",
            crate::spec::DEFAULT_PROFILE
        ),
        None => format!("{count} types"),
    }
}

/// One event as one line (no newline): `SEQ TIME vm NAME state=… task=… gen=…`.
pub fn render_event(event: &Event) -> String {
    let what = match &event.body {
        EventBody::Vm { vm } => format!("vm {}", vm_line(vm)),
        EventBody::VmDeleted { id, name } => format!("vm_deleted {name} id={id}"),
        EventBody::VmMigrated { id, name, target } => {
            format!("vm_migrated {name} id={id} target={target}")
        }
        EventBody::Migration { migration: m } => format!(
            "migration {} vm={} role={} phase={}{}",
            m.id,
            m.vm_name,
            match m.role {
                crate::spec::Role::Source => "source",
                crate::spec::Role::Target => "target",
            },
            m.phase.as_str(),
            m.error
                .as_deref()
                .map(|e| format!(" error={e:?}"))
                .unwrap_or_default()
        ),
        EventBody::Image { image } => format!("image {}", image_line(image)),
        EventBody::ImageDeleted { name } => format!("image_deleted {name}"),
        EventBody::Volume { volume } => format!("volume {}", volume_line(volume)),
        EventBody::VolumeDeleted { name } => format!("volume_deleted {name}"),
        EventBody::Resync { requested, oldest } => format!(
            "resync requested={requested} oldest={} (events were missed: list VMs, images and volumes again)",
            oldest.map_or("-".to_string(), |o| o.to_string())
        ),
    };
    format!("{} {} {what}", event.seq, event.time)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::fixtures::{as_received, fetch, image, ready_image, vm, volume};
    use crate::storage::images::ImageStatus;
    use crate::vm::state::PowerState;
    use uuid::Uuid;

    #[test]
    fn node_is_key_values() {
        let node = NodeInfo {
            hostname: "h1".into(),
            vmlet_version: "0.1.0".into(),
            cpus: 8,
            memory_mib: 16384,
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_version: "8.2.2".into(),
            machine_types: vec!["microvm".into(), "pc-q35-8.1".into(), "pc-q35-8.2".into()],
            default_machine_type: Some("pc-q35-8.2".into()),
            cpu_models: vec!["max".into(), "qemu64".into()],
            accel: "tcg".into(),
            accel_reason: "/dev/kvm missing".into(),
            profiles: vec!["microvm".into(), "q35".into()],
            vms_by_state: [("running".to_string(), 2), ("stopped".to_string(), 1)].into(),
            inventory: crate::node::Inventory::new(
                &crate::config::CapacitySettings::default(),
                crate::node::HostTotals {
                    cpus: 8,
                    memory_mib: 16384,
                    disk_gib: 100,
                },
                crate::node::Usage {
                    vcpus: 3,
                    memory_mib: 1024,
                    disk_gib: 10,
                },
            ),
            stop_grace_s: 60,
        };
        let expected = "\
hostname:   h1
vmlet:      0.1.0
cpus:       8
memory:     16GiB
qemu:       qemu-system-x86_64 8.2.2
accel:      tcg (/dev/kvm missing)
profiles:   microvm, q35
machines:   3 types; profile q35 gets pc-q35-8.2
cpu models: 2 usable (`-o json` lists them)
vms:        running=2 stopped=1
stop grace: 60s
vcpus:      29 free of 8 × 4 − 0 reserved, 3 allocated
memory_mib: 14848 free of 16384 × 1 − 512 reserved, 1024 allocated
disk_gib:   90 free of 100 × 1 − 0 reserved, 10 allocated
";
        assert_eq!(render_node(&node), expected);
    }

    #[test]
    fn events_are_one_line_each() {
        let mut v = vm("web", 1);
        v.state = as_received(PowerState::Running);
        v.generation = 5;
        let time = "2024-05-01T10:00:00.000Z".to_string();
        let event = |seq, body| Event {
            seq,
            time: time.clone(),
            body,
        };
        assert_eq!(
            render_event(&event(7, EventBody::Vm { vm: Box::new(v) })),
            "7 2024-05-01T10:00:00.000Z vm web state=running task=- gen=5"
        );
        assert_eq!(
            render_event(&event(
                8,
                EventBody::VmDeleted {
                    id: Uuid::from_u128(1),
                    name: "web".into()
                }
            )),
            "8 2024-05-01T10:00:00.000Z vm_deleted web id=00000000-0000-0000-0000-000000000001"
        );
        assert!(render_event(&event(
            9,
            EventBody::Resync {
                requested: 3,
                oldest: Some(5)
            }
        ))
        .starts_with("9 2024-05-01T10:00:00.000Z resync requested=3 oldest=5"));
    }

    #[test]
    fn storage_events_are_one_line_each() {
        let time = "2024-05-01T10:00:00.000Z".to_string();
        let event = |seq, body| Event {
            seq,
            time: time.clone(),
            body,
        };
        let mut importing = image("deb", ImageStatus::Importing);
        importing.progress = Some(fetch(1 << 20, Some(4 << 20)));
        assert_eq!(
            render_event(&event(
                1,
                EventBody::Image {
                    image: Box::new(importing)
                }
            )),
            "1 2024-05-01T10:00:00.000Z image deb status=importing fetch 25% 1MiB/4MiB"
        );
        assert_eq!(
            render_event(&event(
                2,
                EventBody::Image {
                    image: Box::new(ready_image("deb"))
                }
            )),
            "2 2024-05-01T10:00:00.000Z image deb status=ready size=64MiB allocated=196KiB"
        );
        let mut failed = image("deb", ImageStatus::Failed);
        failed.error = Some("checksum mismatch".into());
        assert_eq!(
            render_event(&event(
                3,
                EventBody::Image {
                    image: Box::new(failed)
                }
            )),
            "3 2024-05-01T10:00:00.000Z image deb status=failed error=\"checksum mismatch\""
        );
        assert_eq!(
            render_event(&event(4, EventBody::ImageDeleted { name: "deb".into() })),
            "4 2024-05-01T10:00:00.000Z image_deleted deb"
        );
        assert_eq!(
            render_event(&event(
                5,
                EventBody::Volume {
                    volume: Box::new(volume("data", 1024))
                }
            )),
            "5 2024-05-01T10:00:00.000Z volume data size=1GiB allocated=192KiB attached_to=-"
        );
        assert_eq!(
            render_event(&event(
                6,
                EventBody::VolumeDeleted {
                    name: "data".into()
                }
            )),
            "6 2024-05-01T10:00:00.000Z volume_deleted data"
        );
    }
}
