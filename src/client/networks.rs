//! Network endpoints (list, get, create, delete) and a VM's NICs on them
//! (attach, detach).

use hyper::Method;
use serde::Deserialize;

use super::paths::{network_path, nic_path, vm_path};
use super::transport::to_json;
use super::{Client, ClientError};
use crate::net::networks::{Network, NetworkSpec};
use crate::spec::NicSpec;
use crate::vm::Vm;

/// The body of `GET /v1/networks`.
#[derive(Deserialize)]
struct NetworkList {
    networks: Vec<Network>,
}

impl Client {
    /// `GET /v1/networks`: every network, with the NICs on it.
    pub async fn list_networks(&self) -> Result<Vec<Network>, ClientError> {
        let (_, list): (_, NetworkList) = self.call(Method::GET, "/v1/networks", None).await?;
        Ok(list.networks)
    }

    /// `GET /v1/networks/{name}`.
    pub async fn get_network(&self, name: &str) -> Result<Network, ClientError> {
        Ok(self.call(Method::GET, &network_path(name)?, None).await?.1)
    }

    /// `POST /v1/networks`: creates (or adopts) the bridge, the VLAN device.
    pub async fn create_network(&self, spec: &NetworkSpec) -> Result<Network, ClientError> {
        Ok(self
            .call(Method::POST, "/v1/networks", Some(&to_json(spec)))
            .await?
            .1)
    }

    /// `DELETE /v1/networks/{name}` (refused while NICs are on it).
    pub async fn delete_network(&self, name: &str) -> Result<(), ClientError> {
        self.call_empty(Method::DELETE, &network_path(name)?, None)
            .await?;
        Ok(())
    }

    /// `POST /v1/vms/{id}/nics`: adds a NIC (hot-plugged into a running VM).
    /// Returns the VM after.
    pub async fn attach_nic(&self, id_or_name: &str, nic: &NicSpec) -> Result<Vm, ClientError> {
        let path = format!("{}/nics", vm_path(id_or_name)?);
        Ok(self.call(Method::POST, &path, Some(&to_json(nic))).await?.1)
    }

    /// `DELETE /v1/vms/{id}/nics/{nic}`: removes a NIC by MAC or index
    /// (unplugging it from a running VM). Returns the VM after.
    pub async fn detach_nic(&self, id_or_name: &str, nic: &str) -> Result<Vm, ClientError> {
        let path = nic_path(id_or_name, nic)?;
        Ok(self.call(Method::DELETE, &path, None).await?.1)
    }
}
