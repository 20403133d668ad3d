//! Node endpoints: the health check and the host's facts and capacity.

use hyper::Method;

use super::{Client, ClientError};
use crate::node::NodeInfo;

impl Client {
    /// `GET /healthz`: succeeds when the daemon answers `200`.
    pub async fn health(&self) -> Result<(), ClientError> {
        self.call_empty(Method::GET, "/healthz", None).await?;
        Ok(())
    }

    /// `GET /v1/node`: the host's facts and capacity.
    pub async fn node(&self) -> Result<NodeInfo, ClientError> {
        Ok(self.call(Method::GET, "/v1/node", None).await?.1)
    }
}
