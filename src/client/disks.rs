//! A VM's disks and snapshots: attaching and detaching volumes, per-disk
//! I/O limits, and taking, reverting and deleting snapshots.

use hyper::Method;
use serde::Deserialize;

use super::paths::{disk_path, snapshot_path, vm_path};
use super::transport::to_json;
use super::{Client, ClientError};
use crate::spec::{DiskSpec, IoLimits};
use crate::vm::disk_ops::Snapshot;
use crate::vm::Vm;

/// The body of `GET /v1/vms/{id}/snapshots`.
#[derive(Deserialize)]
struct SnapshotList {
    snapshots: Vec<Snapshot>,
}

impl Client {
    /// `POST /v1/vms/{id}/disks`: attaches a volume (`disk.volume`), hot-
    /// plugging it into a running VM. Returns the VM after.
    pub async fn attach_disk(&self, id_or_name: &str, disk: &DiskSpec) -> Result<Vm, ClientError> {
        let path = format!("{}/disks", vm_path(id_or_name)?);
        Ok(self
            .call(Method::POST, &path, Some(&to_json(disk)))
            .await?
            .1)
    }

    /// `DELETE /v1/vms/{id}/disks/{disk}`: detaches a disk (unplugging it
    /// from a running VM). Returns the VM after.
    pub async fn detach_disk(&self, id_or_name: &str, disk: &str) -> Result<Vm, ClientError> {
        let path = disk_path(id_or_name, disk)?;
        Ok(self.call(Method::DELETE, &path, None).await?.1)
    }

    /// `PUT /v1/vms/{id}/disks/{disk}/limits`: replaces a disk's I/O limits
    /// (applied at once to a running VM). Returns the VM after.
    pub async fn set_disk_limits(
        &self,
        id_or_name: &str,
        disk: &str,
        limits: &IoLimits,
    ) -> Result<Vm, ClientError> {
        let path = format!("{}/limits", disk_path(id_or_name, disk)?);
        Ok(self
            .call(Method::PUT, &path, Some(&to_json(limits)))
            .await?
            .1)
    }

    /// `GET /v1/vms/{id}/snapshots`: a VM's snapshots, oldest first.
    pub async fn list_snapshots(&self, id_or_name: &str) -> Result<Vec<Snapshot>, ClientError> {
        let path = format!("{}/snapshots", vm_path(id_or_name)?);
        let (_, list): (_, SnapshotList) = self.call(Method::GET, &path, None).await?;
        Ok(list.snapshots)
    }

    /// `POST /v1/vms/{id}/snapshots`: takes a snapshot (memory and disks of
    /// a running VM, disks only of a stopped one).
    pub async fn create_snapshot(
        &self,
        id_or_name: &str,
        name: &str,
    ) -> Result<Snapshot, ClientError> {
        let path = format!("{}/snapshots", vm_path(id_or_name)?);
        let body = serde_json::json!({ "name": name });
        Ok(self.call(Method::POST, &path, Some(&body)).await?.1)
    }

    /// `POST /v1/vms/{id}/snapshots/{name}/revert`: goes back to a snapshot.
    /// Returns the VM after.
    pub async fn revert_snapshot(&self, id_or_name: &str, name: &str) -> Result<Vm, ClientError> {
        let path = format!("{}/revert", snapshot_path(id_or_name, name)?);
        Ok(self.call(Method::POST, &path, None).await?.1)
    }

    /// `DELETE /v1/vms/{id}/snapshots/{name}`.
    pub async fn delete_snapshot(&self, id_or_name: &str, name: &str) -> Result<(), ClientError> {
        let path = snapshot_path(id_or_name, name)?;
        self.call_empty(Method::DELETE, &path, None).await?;
        Ok(())
    }
}
