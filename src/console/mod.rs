//! Consoles: the serial console hub of a running VM (its log, history and
//! live stream), and the one-time tokens that open a console websocket.
//!
//! A leaf module: it knows unix sockets and files, not VMs or HTTP. The
//! websockets themselves are in `api/console.rs`.

pub mod serial;
pub mod tokens;

use serde::{Deserialize, Serialize};

/// Which console a token opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleKind {
    /// The VM's display through its VNC server (RFB over the websocket).
    Vnc,
    /// The serial console (ttyS0): raw bytes both ways.
    Serial,
}

impl ConsoleKind {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsoleKind::Vnc => "vnc",
            ConsoleKind::Serial => "serial",
        }
    }
}

/// A console token, shown once (`POST /v1/vms/{id}/console`).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConsoleToken {
    /// The one-time token (256 random bits, hex).
    pub token: String,
    /// Which console it opens.
    #[serde(rename = "type")]
    pub kind: ConsoleKind,
    /// When it stops working if unused (RFC 3339).
    pub expires_at: String,
    /// The websocket to open, relative to the API's base URL.
    pub url: String,
    /// The browser page (noVNC) for a `vnc` token, relative to the API's
    /// base URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_url: Option<String>,
}
