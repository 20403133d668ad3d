//! What operations in flight have taken: a VM's UUID and name, MACs,
//! volumes, and the images and networks a VM is being made on. Two
//! operations that want the same thing cannot both have it; operations on
//! different things never wait for each other (one slow hot-plug must not
//! stall every create on the host). The set is behind a plain mutex that is
//! never held across an await: taking claims is all or nothing, at once.

use std::collections::HashMap;
use std::sync::Mutex;

use uuid::Uuid;

/// Something an operation may take.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Claim {
    /// A VM's UUID (a create).
    Vm(Uuid),
    /// A VM's name.
    VmName(String),
    /// A MAC address (lower case).
    Mac(String),
    /// A volume (attached, or deleted).
    Volume(String),
    /// An image (shared by the creates that make overlays on it, taken
    /// alone by its delete).
    Image(String),
    /// A network (shared by NICs being put on it, taken alone by its
    /// delete).
    Network(String),
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Claim::Vm(id) => write!(f, "VM {id}"),
            Claim::VmName(name) => write!(f, "the name {name:?}"),
            Claim::Mac(mac) => write!(f, "MAC {mac}"),
            Claim::Volume(name) => write!(f, "volume {name}"),
            Claim::Image(name) => write!(f, "image {name}"),
            Claim::Network(name) => write!(f, "network {name}"),
        }
    }
}

/// How a claim is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Alone: no other operation may hold it at all.
    Alone,
    /// Beside other shared holders (but not beside one holding it alone).
    Shared,
}

/// The claims of every operation in flight.
#[derive(Debug, Default)]
pub struct Claims(Mutex<HashMap<Claim, Held>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Alone,
    Shared(usize),
}

/// Claims taken; they are given back when this is dropped.
#[derive(Debug)]
#[must_use = "claims are released when the guard drops"]
pub struct Taken<'a> {
    claims: &'a Claims,
    held: Vec<(Claim, Hold)>,
}

impl Claims {
    /// Takes every one of `wanted`, or none: the first one another
    /// operation holds in a conflicting way is returned instead.
    pub fn take(&self, wanted: Vec<(Claim, Hold)>) -> Result<Taken<'_>, Claim> {
        let mut map = self.0.lock().unwrap();
        for (claim, hold) in &wanted {
            let free = matches!(
                (map.get(claim), hold),
                (None, _) | (Some(Held::Shared(_)), Hold::Shared)
            );
            if !free {
                return Err(claim.clone());
            }
        }
        // Wanted twice by the same operation (two NICs on one network):
        // counted twice, released twice.
        let mut held = Vec::new();
        for (claim, hold) in wanted {
            match hold {
                Hold::Alone => {
                    if map.insert(claim.clone(), Held::Alone).is_some() {
                        // The same operation asked for it twice alone.
                        continue;
                    }
                }
                Hold::Shared => {
                    let count = match map.get(&claim) {
                        Some(Held::Shared(n)) => n + 1,
                        _ => 1,
                    };
                    map.insert(claim.clone(), Held::Shared(count));
                }
            }
            held.push((claim, hold));
        }
        Ok(Taken { claims: self, held })
    }

    /// Whether an operation holds `claim` now.
    #[cfg(test)]
    pub fn is_held(&self, claim: &Claim) -> bool {
        self.0.lock().unwrap().contains_key(claim)
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let mut map = self.claims.0.lock().unwrap();
        for (claim, hold) in self.held.drain(..) {
            match (hold, map.get(&claim).copied()) {
                (Hold::Shared, Some(Held::Shared(n))) if n > 1 => {
                    map.insert(claim, Held::Shared(n - 1));
                }
                _ => {
                    map.remove(&claim);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(name: &str) -> Claim {
        Claim::Volume(name.into())
    }

    #[test]
    fn alone_excludes_everyone_shared_excludes_only_alone() {
        let claims = Claims::default();
        let a = claims.take(vec![(volume("v"), Hold::Alone)]).unwrap();
        assert_eq!(
            claims.take(vec![(volume("v"), Hold::Alone)]).unwrap_err(),
            volume("v")
        );
        assert!(claims.take(vec![(volume("v"), Hold::Shared)]).is_err());
        // Other things are free meanwhile.
        let b = claims.take(vec![(volume("w"), Hold::Alone)]).unwrap();
        drop(a);
        let image = Claim::Image("debian".into());
        let s1 = claims.take(vec![(image.clone(), Hold::Shared)]).unwrap();
        let s2 = claims.take(vec![(image.clone(), Hold::Shared)]).unwrap();
        assert!(claims.take(vec![(image.clone(), Hold::Alone)]).is_err());
        drop(s1);
        assert!(claims.take(vec![(image.clone(), Hold::Alone)]).is_err());
        drop(s2);
        assert!(!claims.is_held(&image));
        assert!(claims.take(vec![(image, Hold::Alone)]).is_ok());
        drop(b);
    }

    #[test]
    fn taking_is_all_or_nothing_and_release_is_complete() {
        let claims = Claims::default();
        let held = claims.take(vec![(volume("b"), Hold::Alone)]).unwrap();
        let wanted = vec![
            (Claim::VmName("web".into()), Hold::Alone),
            (volume("b"), Hold::Alone),
        ];
        assert_eq!(claims.take(wanted).unwrap_err(), volume("b"));
        // Nothing of the refused set stayed taken.
        assert!(!claims.is_held(&Claim::VmName("web".into())));
        drop(held);
        let net = Claim::Network("lan".into());
        let both = claims
            .take(vec![
                (net.clone(), Hold::Shared),
                (net.clone(), Hold::Shared),
            ])
            .unwrap();
        drop(both);
        assert!(!claims.is_held(&net));
        assert!(!claims.is_held(&volume("b")));
    }
}
