//! Everything that talks to QEMU: profiles, the command line, the process,
//! and QMP. Leaf code: knows nothing of the API or the VM registry.

pub mod accel;
pub mod agent;
pub mod argv;
pub mod capabilities;
pub mod disk;
pub mod exit;
pub mod firmware;
pub mod hotplug;
pub mod instance;
pub mod launch_files;
pub mod migrate;
pub mod nic;
pub mod process;
pub mod profile;
pub mod qmp;
pub mod tpm;
