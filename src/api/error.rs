//! The one place errors become HTTP statuses and error bodies:
//! `{"error":{"code":"…","message":"…"}}`, with the field named on 422 and
//! the running task named on a busy 409.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::spec::FieldError;
use crate::vm::actor::VmError;
use crate::vm::state::Task;

/// An error answer of the API.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// What went wrong, for a person.
    pub message: String,
    /// Every invalid field (422 only).
    pub fields: Vec<FieldError>,
    /// The task a busy VM is running (409 `busy` only).
    pub task: Option<Task>,
}

/// The error body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error inside [`ErrorBody`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// `bad_request`, `unauthorized`, `not_found`, `conflict`, `busy`,
    /// `payload_too_large`, `invalid_spec`, `invalid_request` (a query
    /// parameter out of range), `unavailable`, `timeout`,
    /// `stale_generation`.
    pub code: &'static str,
    /// What went wrong.
    pub message: String,
    /// The first invalid field (422).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Every invalid field (422).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldError>,
    /// The operation in progress that the request conflicts with (409 busy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            fields: vec![],
            task: None,
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401: missing or wrong credentials.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 404: no such route or object.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 413: the body is over the limit.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than {limit} bytes"),
        )
    }

    /// 422 naming one field.
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::invalid(vec![FieldError {
            field: field.into(),
            message: message.into(),
        }])
    }

    /// 422 `invalid_request`: a request parameter (not part of a spec) is
    /// out of range; `field` names it.
    pub fn invalid_request(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            code: "invalid_request",
            ..ApiError::invalid_field(field, message)
        }
    }

    /// 422 naming every invalid field.
    pub fn invalid(fields: Vec<FieldError>) -> ApiError {
        let message = fields
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        ApiError {
            fields,
            ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_spec", message)
        }
    }
}

impl From<VmError> for ApiError {
    fn from(e: VmError) -> ApiError {
        let message = e.to_string();
        match e {
            VmError::NotFound(_) | VmError::Gone => ApiError::not_found(message),
            VmError::Busy(task) => ApiError {
                task: Some(task),
                ..ApiError::new(StatusCode::CONFLICT, "busy", message)
            },
            VmError::NotNow(_) | VmError::Refused(_) | VmError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", message)
            }
            VmError::Invalid(spec) => ApiError::invalid(spec.errors),
            VmError::StaleGeneration(_) => {
                ApiError::new(StatusCode::PRECONDITION_FAILED, "stale_generation", message)
            }
            VmError::Failed(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
            VmError::Timeout(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", message)
            }
            VmError::NoSpace(_) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "no_space", message)
            }
        }
    }
}

impl From<crate::migration::MigrationError> for ApiError {
    fn from(e: crate::migration::MigrationError) -> ApiError {
        use crate::migration::MigrationError as M;
        let message = e.to_string();
        match e {
            M::NotFound(_) => ApiError::not_found(message),
            M::Vm(e) => ApiError::from(e),
            M::Invalid(spec) => ApiError::invalid(spec.errors),
            M::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            // The target's refusal keeps its class: a conflict there
            // (capacity, a name in use) is one here, and so is a field it
            // found invalid (an unknown image or CPU model).
            M::Refused { status, .. } => match status {
                409 => ApiError::new(StatusCode::CONFLICT, "conflict", message),
                422 => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_spec", message),
                507 => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "no_space", message),
                _ => ApiError::new(StatusCode::BAD_GATEWAY, "target_failed", message),
            },
            M::Unreachable(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "target_unreachable", message)
            }
            M::Failed(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message),
        }
    }
}

impl From<crate::storage::StorageError> for ApiError {
    fn from(e: crate::storage::StorageError) -> ApiError {
        ApiError::from(VmError::from(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                field: self.fields.first().map(|f| f.field.clone()),
                fields: self.fields,
                task: self.task,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_errors_map_to_documented_statuses() {
        let cases = [
            (VmError::NotFound("x".into()), 404, "not_found"),
            (VmError::Busy(Task::Stop), 409, "busy"),
            (VmError::Refused("no".into()), 409, "conflict"),
            (
                VmError::NotNow(crate::vm::state::Refusal::PausedNotStarted),
                409,
                "conflict",
            ),
            (VmError::Conflict("taken".into()), 409, "conflict"),
            (VmError::Failed("qemu".into()), 503, "unavailable"),
            (VmError::Timeout("slow".into()), 503, "timeout"),
            (VmError::Gone, 404, "not_found"),
            (VmError::NoSpace("full".into()), 507, "no_space"),
            (
                VmError::StaleGeneration("changed".into()),
                412,
                "stale_generation",
            ),
        ];
        for (err, status, code) in cases {
            let api = ApiError::from(err);
            assert_eq!((api.status.as_u16(), api.code), (status, code));
        }
        let busy = ApiError::from(VmError::Busy(Task::Stop));
        assert_eq!(busy.task, Some(Task::Stop));
        assert!(busy.message.contains("stop"));
    }
}
