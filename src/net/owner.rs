//! Which daemon a tap belongs to. Several daemons (each with its own state
//! dir) may share one host, so a tap's name (`vmt` + MAC) says nothing about
//! whose it is. Every tap vmlet makes is marked at creation with the link
//! alias (`IFLA_IFALIAS`) `vmlet:ID`, where ID is a random id stored once in
//! the state dir (`STATE_DIR/daemon-id`); stale-tap cleanup only ever
//! removes taps with this daemon's mark.

use std::io::Write;
use std::path::Path;

use super::NetError;

/// The file in the state dir that holds the daemon's id.
pub const ID_FILE: &str = "daemon-id";

/// Hex digits in an id (64 random bits).
const ID_LEN: usize = 16;

/// The alias prefix of vmlet's taps.
pub const MARK_PREFIX: &str = "vmlet:";

/// The mark (`vmlet:ID`) of the daemon whose state dir is `state_dir`:
/// reads `STATE_DIR/daemon-id`, or creates it with a fresh random id the
/// first time. A file that holds anything but an id is an error (naming
/// the file), not silently replaced: replacing it would orphan every tap
/// the daemon made under the old id.
pub fn daemon_mark(state_dir: &Path) -> Result<String, NetError> {
    let path = state_dir.join(ID_FILE);
    let what = |op: &str| format!("{op} {}", path.display());
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if valid_id(id) {
                Ok(mark(id))
            } else {
                Err(NetError::Invalid(format!(
                    "{} must hold {ID_LEN} lowercase hex digits (the daemon's tap mark), not {id:?}",
                    path.display()
                )))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(state_dir).map_err(|e| NetError::io(what("create"), e))?;
            let mut bytes = [0u8; ID_LEN / 2];
            getrandom::fill(&mut bytes)
                .map_err(|e| NetError::io("read random bytes", std::io::Error::other(e)))?;
            let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            // create_new: the state dir is locked by one daemon, but never
            // overwrite an id that appeared meanwhile.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| NetError::io(what("create"), e))?;
            file.write_all(format!("{id}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| NetError::io(what("write"), e))?;
            Ok(mark(&id))
        }
        Err(e) => Err(NetError::io(what("read"), e)),
    }
}

fn mark(id: &str) -> String {
    format!("{MARK_PREFIX}{id}")
}

fn valid_id(id: &str) -> bool {
    id.len() == ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = daemon_mark(&state).unwrap();
        assert!(first.starts_with(MARK_PREFIX), "{first}");
        assert_eq!(first.len(), MARK_PREFIX.len() + ID_LEN);
        assert_eq!(daemon_mark(&state).unwrap(), first);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(daemon_mark(other.path()).unwrap(), first);
    }

    #[test]
    fn a_damaged_id_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ID_FILE), "not an id\n").unwrap();
        let err = daemon_mark(dir.path()).unwrap_err();
        assert!(matches!(err, NetError::Invalid(_)), "{err}");
        assert!(err.to_string().contains(ID_FILE), "{err}");
        // Untouched: the operator decides.
        assert_eq!(
            std::fs::read_to_string(dir.path().join(ID_FILE)).unwrap(),
            "not an id\n"
        );
    }

    #[test]
    fn ids_are_sixteen_lowercase_hex_digits() {
        assert!(valid_id("0123456789abcdef"));
        assert!(!valid_id("0123456789ABCDEF"));
        assert!(!valid_id("0123456789abcde"));
        assert!(!valid_id("0123456789abcdefa"));
        assert!(!valid_id("0123456789abcdeg"));
    }
}
