//! VM endpoints: list, get, create (`POST` or idempotent `PUT`), change
//! (`PATCH`), delete,
//! and the lifecycle actions (start, stop, reboot, pause, resume).

use hyper::Method;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::paths::{check_segment, vm_path};
use super::{Client, ClientError};
use crate::vm::Vm;

/// The body of `GET /v1/vms`.
#[derive(Deserialize)]
struct VmList {
    vms: Vec<Vm>,
}

impl Client {
    /// `GET /v1/vms`: every VM.
    pub async fn list_vms(&self) -> Result<Vec<Vm>, ClientError> {
        let (_, list): (_, VmList) = self.call(Method::GET, "/v1/vms", None).await?;
        Ok(list.vms)
    }

    /// `GET /v1/vms/{id}`: one VM, by UUID or name.
    pub async fn get_vm(&self, id_or_name: &str) -> Result<Vm, ClientError> {
        Ok(self.call(Method::GET, &vm_path(id_or_name)?, None).await?.1)
    }

    /// `POST /v1/vms`: creates a VM; the daemon picks its UUID.
    pub async fn create_vm(&self, spec: &Value) -> Result<Vm, ClientError> {
        Ok(self.call(Method::POST, "/v1/vms", Some(spec)).await?.1)
    }

    /// `PUT /v1/vms/{uuid}`: creates a VM with this UUID, or finds it
    /// already created with the same spec (safe to retry). Returns whether
    /// it was created by this call.
    pub async fn put_vm(&self, uuid: Uuid, spec: &Value) -> Result<(bool, Vm), ClientError> {
        let path = format!("/v1/vms/{uuid}");
        let (status, vm) = self.call(Method::PUT, &path, Some(spec)).await?;
        Ok((status == 201, vm))
    }

    /// `PATCH /v1/vms/{id}`: applies JSON merge patch `patch` to the VM's
    /// spec (its pending spec, when it has one). With `generation`, a VM
    /// changed since that generation answers 412 `stale_generation`.
    pub async fn patch_vm(
        &self,
        id_or_name: &str,
        patch: &Value,
        generation: Option<u64>,
    ) -> Result<Vm, ClientError> {
        let mut path = vm_path(id_or_name)?;
        if let Some(generation) = generation {
            path.push_str(&format!("?generation={generation}"));
        }
        Ok(self.call(Method::PATCH, &path, Some(patch)).await?.1)
    }

    /// `DELETE /v1/vms/{id}`; `force` deletes a running VM too, stopping it.
    pub async fn delete_vm(&self, id_or_name: &str, force: bool) -> Result<(), ClientError> {
        self.delete_vm_with(id_or_name, force, false).await
    }

    /// [`Client::delete_vm`]; `delete_volumes` deletes the volumes attached
    /// to it too (they are kept otherwise).
    pub async fn delete_vm_with(
        &self,
        id_or_name: &str,
        force: bool,
        delete_volumes: bool,
    ) -> Result<(), ClientError> {
        let mut path = vm_path(id_or_name)?;
        let query: Vec<&str> = [
            (force, "force=true"),
            (delete_volumes, "delete_volumes=true"),
        ]
        .into_iter()
        .filter_map(|(on, q)| on.then_some(q))
        .collect();
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query.join("&"));
        }
        self.call_empty(Method::DELETE, &path, None).await?;
        Ok(())
    }

    /// `POST /v1/vms/{id}/{action}` (`start`, `stop`, `reboot`, `pause`,
    /// `resume`) with an optional body; returns the VM after the action.
    pub async fn action(
        &self,
        id_or_name: &str,
        action: &str,
        body: Option<&Value>,
    ) -> Result<Vm, ClientError> {
        let path = format!(
            "{}/{}",
            vm_path(id_or_name)?,
            check_segment("action", action)?
        );
        Ok(self.call(Method::POST, &path, body).await?.1)
    }

    /// Starts a VM.
    pub async fn start(&self, id_or_name: &str) -> Result<Vm, ClientError> {
        self.action(id_or_name, "start", None).await
    }

    /// Stops a VM: `force` skips the ACPI power button; `timeout_s` bounds
    /// how long the guest gets to power off (the daemon's default if unset).
    pub async fn stop(
        &self,
        id_or_name: &str,
        force: bool,
        timeout_s: Option<u64>,
    ) -> Result<Vm, ClientError> {
        self.action(id_or_name, "stop", Some(&power_options(force, timeout_s)))
            .await
    }

    /// Reboots a VM's guest by asking it (ACPI); `force` resets the
    /// machine at once; `timeout_s` bounds how long the guest gets to shut
    /// down (the daemon's default if unset).
    pub async fn reboot(&self, id_or_name: &str) -> Result<Vm, ClientError> {
        self.reboot_with(id_or_name, false, None).await
    }

    /// [`Client::reboot`] with its options.
    pub async fn reboot_with(
        &self,
        id_or_name: &str,
        force: bool,
        timeout_s: Option<u64>,
    ) -> Result<Vm, ClientError> {
        self.action(id_or_name, "reboot", Some(&power_options(force, timeout_s)))
            .await
    }

    /// Pauses a VM's vCPUs.
    pub async fn pause(&self, id_or_name: &str) -> Result<Vm, ClientError> {
        self.action(id_or_name, "pause", None).await
    }

    /// Resumes a VM's vCPUs.
    pub async fn resume(&self, id_or_name: &str) -> Result<Vm, ClientError> {
        self.action(id_or_name, "resume", None).await
    }
}

/// The body of a stop or reboot: `force`, and `timeout_s` when given.
fn power_options(force: bool, timeout_s: Option<u64>) -> serde_json::Value {
    let mut body = serde_json::json!({ "force": force });
    if let Some(t) = timeout_s {
        body["timeout_s"] = t.into();
    }
    body
}
