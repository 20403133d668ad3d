//! `/v1/images`: the image store. Imports run in the background: `POST`
//! answers 202 with the image `importing`; follow it with `GET` or the
//! `image` events.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::api::body;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::AppState;
use crate::storage::images::{Image, ImageImport};

/// `GET /v1/images`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageList {
    /// Every image, by name.
    pub images: Vec<Image>,
}

/// List images (failed imports included, until deleted).
#[utoipa::path(get, path = "/v1/images", tag = "images",
    responses((status = 200, body = ImageList)))]
pub async fn list(State(app): State<AppState>) -> Json<ImageList> {
    Json(ImageList {
        images: app.manager.images().list(),
    })
}

/// Show one image: status, import progress, format, sizes, checksums.
#[utoipa::path(get, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name")),
    responses((status = 200, body = Image), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Image>, ApiError> {
    Ok(Json(app.manager.images().get(&name)?))
}

/// Import an image from a file under the import directory or an http(s)
/// URL. Answers 202 at once; the import goes on in the background, and a
/// failed one (a wrong `sha256`, a backing file, a bad format) ends as
/// `failed` with nothing stored.
#[utoipa::path(post, path = "/v1/images", tag = "images",
    request_body = ImageImport,
    responses((status = 202, body = Image, description = "Import started"),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn import(
    State(app): State<AppState>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Image>), ApiError> {
    let request: ImageImport = body::parse(&bytes)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(app.manager.images().import(request)?),
    ))
}

/// Delete an image, or cancel its import. 409 while a VM disk is an
/// overlay on it.
#[utoipa::path(delete, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.manager.delete_image(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
