//! vmlet: a node daemon for virtualization hosts. It launches QEMU from
//! generated argument lists and controls each VM over QMP. See DESIGN.md for
//! the architecture; each module's doc says what it owns.

#![warn(missing_docs)]

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod events;
pub mod node;
pub mod qemu;
pub mod storage;
pub mod vm;
