//! Live migration endpoints: start one (`POST /v1/vms/{id}/migrate`), list,
//! show and cancel, and the calls one daemon makes on another's API during
//! a migration (prepare, the byte streams, finish).

use hyper::Method;
use serde::Deserialize;
use uuid::Uuid;

use super::paths::{check_segment, vm_path};
use super::upgrade::Upgraded;
use super::{Client, ClientError};
use crate::spec::{FinishRequest, MigrateRequest, Migration};
use crate::vm::manager::IncomingRequest;

/// The `Upgrade` protocol of migration streams.
pub const STREAM_PROTOCOL: &str = "vmlet-migration/1";

/// The body of `GET /v1/migrations`.
#[derive(Deserialize)]
struct MigrationList {
    migrations: Vec<Migration>,
}

fn to_value<T: serde::Serialize>(body: &T) -> serde_json::Value {
    serde_json::to_value(body).expect("request bodies serialize")
}

impl Client {
    /// `POST /v1/vms/{id}/migrate`: moves running VM `id_or_name` to the
    /// daemon `request.target` names. Answers at once (`202`) with the
    /// migration, which then runs on its own.
    pub async fn migrate_vm(
        &self,
        id_or_name: &str,
        request: &MigrateRequest,
    ) -> Result<Migration, ClientError> {
        let path = format!("{}/migrate", vm_path(id_or_name)?);
        Ok(self
            .call(Method::POST, &path, Some(&to_value(request)))
            .await?
            .1)
    }

    /// `GET /v1/migrations`: every migration this daemon knows, newest first.
    pub async fn list_migrations(&self) -> Result<Vec<Migration>, ClientError> {
        let (_, list): (_, MigrationList) = self.call(Method::GET, "/v1/migrations", None).await?;
        Ok(list.migrations)
    }

    /// `GET /v1/migrations/{id}`.
    pub async fn get_migration(&self, id: Uuid) -> Result<Migration, ClientError> {
        Ok(self
            .call(Method::GET, &format!("/v1/migrations/{id}"), None)
            .await?
            .1)
    }

    /// `POST /v1/migrations/{id}/cancel`.
    pub async fn cancel_migration(&self, id: Uuid) -> Result<Migration, ClientError> {
        Ok(self
            .call(Method::POST, &format!("/v1/migrations/{id}/cancel"), None)
            .await?
            .1)
    }

    /// `POST /v1/migrations/incoming` (daemon to daemon): prepares this
    /// daemon to receive a VM.
    pub async fn prepare_incoming(
        &self,
        request: &IncomingRequest,
    ) -> Result<Migration, ClientError> {
        Ok(self
            .call(
                Method::POST,
                "/v1/migrations/incoming",
                Some(&to_value(request)),
            )
            .await?
            .1)
    }

    /// `POST /v1/migrations/{id}/finish` (daemon to daemon): the memory
    /// arrived complete; the target runs the guest from now on.
    pub async fn finish_incoming(
        &self,
        id: Uuid,
        measured: &FinishRequest,
    ) -> Result<Migration, ClientError> {
        Ok(self
            .call(
                Method::POST,
                &format!("/v1/migrations/{id}/finish"),
                Some(&to_value(measured)),
            )
            .await?
            .1)
    }

    /// `POST /v1/migrations/{id}/memory` upgraded: the memory stream.
    pub async fn memory_stream(&self, id: Uuid) -> Result<Upgraded, ClientError> {
        self.upgrade(&format!("/v1/migrations/{id}/memory"), STREAM_PROTOCOL)
            .await
    }

    /// `POST /v1/migrations/{id}/disks/{disk}` upgraded: disk `disk`'s NBD
    /// stream.
    pub async fn disk_stream(&self, id: Uuid, disk: &str) -> Result<Upgraded, ClientError> {
        let disk = check_segment("disk", disk)?;
        self.upgrade(
            &format!("/v1/migrations/{id}/disks/{disk}"),
            STREAM_PROTOCOL,
        )
        .await
    }
}
