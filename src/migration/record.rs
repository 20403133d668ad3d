//! Migrations as they are kept on disk: `STATE_DIR/migrations/ID.json`,
//! written atomically at every phase, so a daemon that restarts knows
//! which migrations were under way, in which phase, and what to undo.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::persist::{write_atomically, PersistError};
use crate::spec::Migration;
use crate::vm::Vm;

/// Finished migrations kept for listing (the oldest go first).
pub const KEEP_FINISHED: usize = 50;

/// One migration's file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationFile {
    /// The migration as the API shows it.
    pub migration: Migration,
    /// Source only: the target daemon's token, to reach it again after a
    /// restart (the file is mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Target only: the arriving VM, to clean up after if it never arrives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<Box<Vm>>,
    /// Target only: the volumes made for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// Target only: its QEMU (pid and start time), to stop after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<(i32, u64)>,
}

/// The migrations directory.
#[derive(Debug, Clone)]
pub struct Records {
    dir: PathBuf,
}

impl Records {
    /// The records under `state_dir/migrations` (made if missing).
    pub fn open(state_dir: &Path) -> std::io::Result<Records> {
        let dir = state_dir.join("migrations");
        std::fs::create_dir_all(&dir)?;
        Ok(Records { dir })
    }

    /// Saves `file` (replacing its earlier version).
    pub fn save(&self, file: &MigrationFile) -> Result<(), PersistError> {
        let bytes = serde_json::to_vec_pretty(file).expect("a migration record serializes");
        write_atomically(&self.dir, &name(file.migration.id), &bytes)
    }

    /// Every readable record; unreadable ones are logged and skipped.
    pub fn load_all(&self) -> Vec<MigrationFile> {
        let mut files = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return files;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_record = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".json") && !n.starts_with('.'));
            if !is_record {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(file) => files.push(file),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable migration record")
                }
            }
        }
        files.sort_by(|a: &MigrationFile, b| a.migration.started_at.cmp(&b.migration.started_at));
        files
    }

    /// Removes migration `id`'s record.
    pub fn remove(&self, id: Uuid) {
        let _ = std::fs::remove_file(self.dir.join(name(id)));
    }
}

fn name(id: Uuid) -> String {
    format!("{id}.json")
}
