//! VMs: what they are (spec), their states, their records, and the actor
//! that runs each one.

pub mod record;
pub mod spec;
pub mod state;

pub use record::Vm;
