//! VMs: their states and records, the actor that runs
//! each one, and the manager that holds them all.

pub mod actor;
pub mod claims;
pub mod confinement;
pub mod context;
pub mod disk_ops;
pub mod error;
pub mod events;
pub mod launch;
pub mod manager;
pub mod nic_ops;
pub mod record;
pub mod registry;
pub mod scrape;
pub mod state;
pub mod store;

pub use record::Vm;
