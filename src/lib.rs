//! vmlet: a node daemon for virtualization hosts. It launches QEMU from
//! generated argument lists and controls each VM over QMP. See
//! `docs/architecture.md` for the architecture; each module's doc says what it
//! owns.

#![warn(missing_docs)]

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod confine;
pub mod console;
pub mod daemon;
pub mod metrics;
pub mod migration;
pub mod net;
pub mod node;
pub mod persist;
pub mod qemu;
pub mod spec;
pub mod storage;
pub mod vm;

/// The message of `err` followed by its sources, `: `-separated.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}
