//! One-time console tokens.
//!
//! A token is 32 random bytes (256 bits) given to the client once, as
//! lowercase hex. vmlet keeps only its SHA-256, so the store (or a memory
//! dump of it) cannot be replayed. A token opens one console of one VM, once,
//! before it expires (60 s by default, like nova-consoleauth's TTL).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::console::ConsoleKind;

/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;

/// What a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The VM.
    pub vm: Uuid,
    /// Which console.
    pub kind: ConsoleKind,
}

/// A token just issued: the secret (shown once) and when it expires.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The token, 64 hex digits.
    pub token: String,
    /// Wall-clock expiry.
    pub expires_at: SystemTime,
}

/// Why a token was refused. Every case answers 401 with the same code; the
/// message tells an operator which it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Never issued, or already used (used tokens are forgotten).
    #[error("unknown or already used console token")]
    Unknown,
    /// Issued, but its lifetime is over.
    #[error("console token expired")]
    Expired,
    /// Valid, but for another VM than the one asked for.
    #[error("console token is for another VM")]
    OtherVm,
}

struct Entry {
    grant: Grant,
    expires: Instant,
}

/// The live tokens, by hash.
#[derive(Default)]
pub struct TokenStore {
    ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], Entry>>,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStore")
            .field("ttl", &self.ttl)
            .field("live", &self.entries.lock().map(|e| e.len()).unwrap_or(0))
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl TokenStore {
    /// A store whose tokens live `ttl`.
    pub fn new(ttl: Duration) -> TokenStore {
        TokenStore {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// How long a token lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Issues a token for `grant`. Fails only when the OS has no randomness.
    pub fn issue(&self, grant: Grant) -> std::io::Result<Issued> {
        let mut secret = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
        let token: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("token store lock");
        // Forget expired tokens here, so the map never grows without bound.
        entries.retain(|_, e| e.expires > now);
        entries.insert(
            digest(&token),
            Entry {
                grant,
                expires: now + self.ttl,
            },
        );
        Ok(Issued {
            token,
            expires_at: SystemTime::now() + self.ttl,
        })
    }

    /// Uses up `token`: the grant when the token is live (and, with `vm`,
    /// for that VM). A token is removed on any use, even a refused one, so
    /// it never works twice.
    pub fn redeem(&self, token: &str, vm: Option<Uuid>) -> Result<Grant, TokenError> {
        let entry = self
            .entries
            .lock()
            .expect("token store lock")
            .remove(&digest(token))
            .ok_or(TokenError::Unknown)?;
        Self::check(&entry, vm)
    }

    /// Checks `token` without using it (for the console page, whose
    /// websocket then uses it).
    pub fn peek(&self, token: &str) -> Result<Grant, TokenError> {
        let entries = self.entries.lock().expect("token store lock");
        let entry = entries.get(&digest(token)).ok_or(TokenError::Unknown)?;
        Self::check(entry, None)
    }

    fn check(entry: &Entry, vm: Option<Uuid>) -> Result<Grant, TokenError> {
        if entry.expires <= Instant::now() {
            return Err(TokenError::Expired);
        }
        if vm.is_some_and(|vm| vm != entry.grant.vm) {
            return Err(TokenError::OtherVm);
        }
        Ok(entry.grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Grant {
        Grant {
            vm: Uuid::new_v4(),
            kind: ConsoleKind::Vnc,
        }
    }

    #[test]
    fn a_token_works_once() {
        let store = TokenStore::new(Duration::from_secs(60));
        let g = grant();
        let issued = store.issue(g).unwrap();
        assert_eq!(issued.token.len(), 2 * TOKEN_BYTES);
        assert_eq!(store.peek(&issued.token), Ok(g));
        assert_eq!(store.redeem(&issued.token, Some(g.vm)), Ok(g));
        assert_eq!(
            store.redeem(&issued.token, Some(g.vm)),
            Err(TokenError::Unknown)
        );
    }

    #[test]
    fn tokens_are_random_and_kept_as_hashes() {
        let store = TokenStore::new(Duration::from_secs(60));
        let a = store.issue(grant()).unwrap().token;
        let b = store.issue(grant()).unwrap().token;
        assert_ne!(a, b);
        let entries = store.entries.lock().unwrap();
        assert!(entries.contains_key(&digest(&a)));
        assert!(!entries.keys().any(|k| k.as_slice() == a.as_bytes()));
    }

    #[test]
    fn expired_tokens_are_refused() {
        let store = TokenStore::new(Duration::ZERO);
        let issued = store.issue(grant()).unwrap();
        assert_eq!(store.peek(&issued.token), Err(TokenError::Expired));
        assert_eq!(store.redeem(&issued.token, None), Err(TokenError::Expired));
        assert_eq!(store.redeem(&issued.token, None), Err(TokenError::Unknown));
    }

    #[test]
    fn a_token_for_one_vm_does_not_open_another_and_is_burnt() {
        let store = TokenStore::new(Duration::from_secs(60));
        let g = grant();
        let issued = store.issue(g).unwrap();
        assert_eq!(
            store.redeem(&issued.token, Some(Uuid::new_v4())),
            Err(TokenError::OtherVm)
        );
        assert_eq!(
            store.redeem(&issued.token, Some(g.vm)),
            Err(TokenError::Unknown)
        );
    }

    #[test]
    fn unknown_tokens_are_refused() {
        let store = TokenStore::new(Duration::from_secs(60));
        assert_eq!(store.peek("00"), Err(TokenError::Unknown));
        assert_eq!(store.redeem("", None), Err(TokenError::Unknown));
    }
}
