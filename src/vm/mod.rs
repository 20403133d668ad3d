//! VMs: what they are (spec) and, later, their lifecycle.

pub mod spec;
