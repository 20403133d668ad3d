//! Storage endpoints: images (list, get, import, delete) and volumes
//! (list, get, create, resize, delete).

use hyper::Method;
use serde::Deserialize;

use super::paths::{image_path, volume_path};
use super::transport::to_json;
use super::{Client, ClientError};
use crate::storage::images::{Image, ImageImport};
use crate::storage::volumes::{Volume, VolumeCreate};

/// The body of `GET /v1/images`.
#[derive(Deserialize)]
struct ImageList {
    images: Vec<Image>,
}

/// The body of `GET /v1/volumes`.
#[derive(Deserialize)]
struct VolumeList {
    volumes: Vec<Volume>,
}

impl Client {
    /// `GET /v1/images`: every image (failed imports included).
    pub async fn list_images(&self) -> Result<Vec<Image>, ClientError> {
        let (_, list): (_, ImageList) = self.call(Method::GET, "/v1/images", None).await?;
        Ok(list.images)
    }

    /// `GET /v1/images/{name}`.
    pub async fn get_image(&self, name: &str) -> Result<Image, ClientError> {
        Ok(self.call(Method::GET, &image_path(name)?, None).await?.1)
    }

    /// `POST /v1/images`: starts an import; returns the image, `importing`.
    pub async fn import_image(&self, request: &ImageImport) -> Result<Image, ClientError> {
        Ok(self
            .call(Method::POST, "/v1/images", Some(&to_json(request)))
            .await?
            .1)
    }

    /// `DELETE /v1/images/{name}` (also cancels an import under way).
    pub async fn delete_image(&self, name: &str) -> Result<(), ClientError> {
        self.call_empty(Method::DELETE, &image_path(name)?, None)
            .await?;
        Ok(())
    }

    /// `GET /v1/volumes`: every volume.
    pub async fn list_volumes(&self) -> Result<Vec<Volume>, ClientError> {
        let (_, list): (_, VolumeList) = self.call(Method::GET, "/v1/volumes", None).await?;
        Ok(list.volumes)
    }

    /// `GET /v1/volumes/{name}`.
    pub async fn get_volume(&self, name: &str) -> Result<Volume, ClientError> {
        Ok(self.call(Method::GET, &volume_path(name)?, None).await?.1)
    }

    /// `POST /v1/volumes`: creates a volume, blank or copied from an image.
    pub async fn create_volume(&self, request: &VolumeCreate) -> Result<Volume, ClientError> {
        Ok(self
            .call(Method::POST, "/v1/volumes", Some(&to_json(request)))
            .await?
            .1)
    }

    /// `POST /v1/volumes/{name}/resize`: grows a volume to `size_mib`.
    pub async fn resize_volume(&self, name: &str, size_mib: u64) -> Result<Volume, ClientError> {
        let path = format!("{}/resize", volume_path(name)?);
        let body = serde_json::json!({ "size_mib": size_mib });
        Ok(self.call(Method::POST, &path, Some(&body)).await?.1)
    }

    /// `DELETE /v1/volumes/{name}` (refused while a VM uses it).
    pub async fn delete_volume(&self, name: &str) -> Result<(), ClientError> {
        self.call_empty(Method::DELETE, &volume_path(name)?, None)
            .await?;
        Ok(())
    }
}
