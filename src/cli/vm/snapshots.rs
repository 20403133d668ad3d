//! `vmlet vm snapshot …`: listing, taking, reverting to and deleting a
//! VM's snapshots, and how snapshots are rendered.

use crate::cli::{bytes, columns, shown, shown_list, unless_json, CliError};
use crate::client::Client;
use crate::vm::disk_ops::Snapshot;

/// `vmlet vm snapshot …`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum SnapshotCommand {
    /// List a VM's snapshots.
    List {
        /// UUID or name.
        vm: String,
    },
    /// Take a snapshot: memory and disks of a running VM, disks only of a
    /// stopped one. Every writable disk must be qcow2.
    Create {
        /// UUID or name.
        vm: String,
        /// The snapshot's name.
        name: String,
    },
    /// Go back to a snapshot (a running VM continues from that moment).
    Revert {
        /// UUID or name.
        vm: String,
        /// The snapshot's name.
        name: String,
    },
    /// Delete a snapshot.
    Delete {
        /// UUID or name.
        vm: String,
        /// The snapshot's name.
        name: String,
    },
}

pub(super) async fn snapshot_command(
    client: &Client,
    cmd: SnapshotCommand,
    json: bool,
) -> Result<String, CliError> {
    Ok(match cmd {
        SnapshotCommand::List { vm } => {
            let snapshots = client.list_snapshots(&vm).await?;
            shown_list(json, "snapshots", &snapshots, render_snapshot_list)
        }
        SnapshotCommand::Create { vm, name } => {
            let snapshot = client.create_snapshot(&vm, &name).await?;
            shown(json, &snapshot, |snapshot| {
                format!(
                    "created snapshot {} of VM {vm} ({})\n",
                    snapshot.name,
                    snapshot_kind(snapshot)
                )
            })
        }
        SnapshotCommand::Revert { vm, name } => {
            let vm = client.revert_snapshot(&vm, &name).await?;
            shown(json, &vm, |vm| {
                format!("reverted VM {} to snapshot {name}\n", vm.name)
            })
        }
        SnapshotCommand::Delete { vm, name } => {
            client.delete_snapshot(&vm, &name).await?;
            unless_json(json, || format!("deleted snapshot {name} of VM {vm}\n"))
        }
    })
}

/// `vm snapshot list` as aligned columns.
pub fn render_snapshot_list(snapshots: &[Snapshot]) -> String {
    let header = ["NAME", "CONTENTS", "STATE SIZE", "CREATED"];
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                snapshot_kind(s).to_string(),
                if s.vm_state {
                    bytes(s.vm_state_size)
                } else {
                    "-".into()
                },
                s.created_at.clone(),
            ]
        })
        .collect();
    columns(&header, &rows)
}

fn snapshot_kind(snapshot: &Snapshot) -> &'static str {
    if snapshot.vm_state {
        "memory+disks"
    } else {
        "disks"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_list_is_aligned_columns() {
        let snapshots = [
            Snapshot {
                name: "before-upgrade".into(),
                vm_state: true,
                vm_state_size: 210 << 20,
                created_at: "2024-05-01T10:00:00.000Z".into(),
                quiesced: true,
            },
            Snapshot {
                name: "cold".into(),
                vm_state: false,
                vm_state_size: 0,
                created_at: "2024-05-02T10:00:00.000Z".into(),
                quiesced: false,
            },
        ];
        let expected = "\
NAME            CONTENTS      STATE SIZE  CREATED
before-upgrade  memory+disks  210MiB      2024-05-01T10:00:00.000Z
cold            disks         -           2024-05-02T10:00:00.000Z
";
        assert_eq!(render_snapshot_list(&snapshots), expected);
    }
}
