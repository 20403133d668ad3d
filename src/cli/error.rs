//! What a client subcommand can fail with ([`CliError`]), and how an error
//! is shown and which exit code it gives (see [`EXIT_CODES_HELP`]).

use std::path::PathBuf;

use uuid::Uuid;

use super::Output;
use crate::client::ClientError;

/// The exit codes of the client subcommands, as `vmlet --help` lists them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes (client subcommands):
  0  success
  1  any other error (e.g. a rejected token, an import that failed)
  2  usage: unknown subcommand or option, missing argument
  3  not found: no such VM, image, volume, network or snapshot
  4  conflict: the object is busy, in the wrong state, changed meanwhile,
     or the name is taken
  5  invalid: the spec, a field or an argument is not acceptable (also
     `vmlet run` and `vmlet argv` with a bad spec file)
  6  unavailable: the daemon cannot be reached, QEMU failed, a timeout,
     or no space left";

/// Exit code: any other error.
pub const EXIT_OTHER: u8 = 1;
/// Exit code: the object does not exist.
pub const EXIT_NOT_FOUND: u8 = 3;
/// Exit code: busy, wrong state, or taken.
pub const EXIT_CONFLICT: u8 = 4;
/// Exit code: the input is not acceptable.
pub const EXIT_INVALID: u8 = 5;
/// Exit code: the daemon or the host could not do it now.
pub const EXIT_UNAVAILABLE: u8 = 6;

/// What a client subcommand could not do.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The daemon could not be reached or refused the request.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The spec file could not be read.
    #[error("reading the spec {path}")]
    ReadSpec {
        /// The file (`-` for standard input).
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The spec file is not a JSON object.
    #[error("the spec {path} is not a JSON object: {reason}")]
    SpecNotJson {
        /// The file (`-` for standard input).
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// `--id` and the spec's `uuid` disagree.
    #[error("--id {id} differs from the spec's uuid {spec}")]
    UuidMismatch {
        /// `--id`.
        id: Uuid,
        /// The spec's `uuid`.
        spec: String,
    },
    /// The token file could not be read.
    #[error("reading the token file {path}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The token file holds no token.
    #[error("the token file {path} is empty")]
    EmptyToken {
        /// The file.
        path: PathBuf,
    },
    /// The output could not be written.
    #[error("writing the output")]
    Output(#[source] std::io::Error),
    /// An image import ended `failed`.
    #[error("import of image {name} failed: {error}")]
    ImportFailed {
        /// The image.
        name: String,
        /// The image's error.
        error: String,
    },
    /// The image being followed was deleted (or deleted and imported
    /// again) meanwhile.
    #[error("image {name} was deleted while it was being imported")]
    ImageGone {
        /// The image.
        name: String,
    },
    /// `vm start --wait-ready`: the marker did not appear in time.
    #[error("VM {vm} started, but its serial console did not print {marker:?} within {timeout_s}s{} (see `vmlet vm console {vm} --print-log --boot current`)", if *.agent { " and its guest agent did not answer" } else { "" })]
    NotReady {
        /// The VM.
        vm: String,
        /// The text waited for.
        marker: String,
        /// The wait, in seconds.
        timeout_s: u64,
        /// Whether an answer of the guest agent would have done too.
        agent: bool,
    },
    /// `vm start --wait-ready`: the VM stopped while vmlet waited for it.
    #[error("VM {vm} is {state} while waiting for {marker:?} on its serial console")]
    StoppedWhileWaiting {
        /// The VM.
        vm: String,
        /// Its state.
        state: String,
        /// The text waited for.
        marker: String,
    },
    /// `vm migrate`: the migration ended without completing (the VM runs
    /// on the source as before).
    #[error("migration of VM {vm} {phase}: {error} (the VM still runs here)")]
    MigrationFailed {
        /// The VM.
        vm: String,
        /// `failed` or `cancelled`.
        phase: String,
        /// Why.
        error: String,
    },
    /// `vm edit` or `vm set` could not make a change (the editor failed,
    /// the edited file is not a spec, a `key=value` is malformed).
    #[error("{0}")]
    Edit(String),
}

impl CliError {
    /// The error's code: the API's own for an answer of the daemon
    /// (`not_found`, `conflict`, `invalid_spec`…), else one of the same
    /// family for what failed on this side.
    pub fn code(&self) -> String {
        match self {
            CliError::Client(ClientError::Api { code, .. }) => code.clone(),
            CliError::Client(ClientError::Connect { .. } | ClientError::Http { .. }) => {
                "unavailable".into()
            }
            CliError::Client(
                ClientError::BadEndpoint { .. }
                | ClientError::BadSegment { .. }
                | ClientError::BadPath { .. },
            )
            | CliError::SpecNotJson { .. }
            | CliError::UuidMismatch { .. } => "invalid_argument".into(),
            CliError::Client(ClientError::Websocket { .. }) => "console".into(),
            CliError::Client(ClientError::Tls { .. }) => "tls".into(),
            CliError::Client(ClientError::CaFile { .. }) => "unreadable_file".into(),
            CliError::Client(ClientError::Decode { .. }) => "bad_response".into(),
            CliError::ReadSpec { .. }
            | CliError::TokenFile { .. }
            | CliError::EmptyToken { .. } => "unreadable_file".into(),
            CliError::Output(_) => "output".into(),
            CliError::ImportFailed { .. } => "import_failed".into(),
            CliError::ImageGone { .. } => "not_found".into(),
            CliError::NotReady { .. } => "timeout".into(),
            CliError::StoppedWhileWaiting { .. } => "conflict".into(),
            CliError::Edit(_) => "invalid_argument".into(),
            CliError::MigrationFailed { .. } => "migration_failed".into(),
        }
    }

    /// The process exit code for this error (see [`EXIT_CODES_HELP`]).
    pub fn exit_code(&self) -> u8 {
        exit_code_for(&self.code())
    }

    /// The message with its causes, `: `-separated.
    pub fn message(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            // `#[error(transparent)]` repeats the message as its source.
            if !text.ends_with(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        text
    }
}

/// The exit code of an error code (the API's or [`CliError::code`]'s).
pub fn exit_code_for(code: &str) -> u8 {
    match code {
        "not_found" => EXIT_NOT_FOUND,
        "conflict" | "busy" | "stale_generation" => EXIT_CONFLICT,
        "invalid_spec"
        | "invalid_request"
        | "invalid_argument"
        | "bad_request"
        | "payload_too_large"
        | "unsupported_media_type"
        | "method_not_allowed" => EXIT_INVALID,
        "unavailable" | "timeout" | "no_space" => EXIT_UNAVAILABLE,
        _ => EXIT_OTHER,
    }
}

/// How a failed client subcommand reports `error` on standard error: a
/// `vmlet: …` line, or with `-o json` the API's error body
/// `{"error":{"code":"…","message":"…"}}` (with `field`/`fields` when the
/// daemon named them), one line.
pub fn error_text(error: &CliError, output: Output) -> String {
    match output {
        Output::Table => format!("vmlet: {}\n", error.message()),
        Output::Json => {
            let mut detail = serde_json::json!({
                "code": error.code(),
                "message": match error {
                    CliError::Client(ClientError::Api { message, .. }) => message.clone(),
                    other => other.message(),
                },
            });
            if let CliError::Client(ClientError::Api { field, task, .. }) = error {
                if let Some(field) = field {
                    detail["field"] = field.clone().into();
                }
                if let Some(task) = task {
                    detail["task"] = task.clone().into();
                }
            }
            let mut text = serde_json::json!({ "error": detail }).to_string();
            text.push('\n');
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_a_code_an_exit_code_and_a_json_form() {
        let api = |status, code: &str, field: Option<&str>| {
            CliError::Client(ClientError::Api {
                status,
                code: code.into(),
                message: "it went wrong".into(),
                field: field.map(Into::into),
                task: None,
            })
        };
        for (status, code, exit) in [
            (404, "not_found", EXIT_NOT_FOUND),
            (409, "conflict", EXIT_CONFLICT),
            (409, "busy", EXIT_CONFLICT),
            (412, "stale_generation", EXIT_CONFLICT),
            (422, "invalid_spec", EXIT_INVALID),
            (422, "invalid_request", EXIT_INVALID),
            (400, "bad_request", EXIT_INVALID),
            (503, "unavailable", EXIT_UNAVAILABLE),
            (503, "timeout", EXIT_UNAVAILABLE),
            (507, "no_space", EXIT_UNAVAILABLE),
            (401, "unauthorized", EXIT_OTHER),
        ] {
            assert_eq!(api(status, code, None).exit_code(), exit, "{code}");
        }
        let err = api(422, "invalid_spec", Some("vcpus"));
        assert_eq!(
            error_text(&err, Output::Json),
            "{\"error\":{\"code\":\"invalid_spec\",\"field\":\"vcpus\",\"message\":\"it went wrong\"}}\n"
        );
        assert_eq!(
            error_text(&err, Output::Table),
            "vmlet: 422 invalid_spec: it went wrong (field vcpus)\n"
        );
        // Errors of this side: their own codes, the message with its cause.
        let unreadable = CliError::TokenFile {
            path: "/x/token".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(unreadable.exit_code(), EXIT_OTHER);
        assert_eq!(
            error_text(&unreadable, Output::Table),
            "vmlet: reading the token file /x/token: entity not found\n"
        );
        let mismatch = CliError::UuidMismatch {
            id: Uuid::nil(),
            spec: "x".into(),
        };
        assert_eq!(mismatch.exit_code(), EXIT_INVALID);
        let json: serde_json::Value =
            serde_json::from_str(&error_text(&mismatch, Output::Json)).unwrap();
        assert_eq!(json["error"]["code"], "invalid_argument");
    }
}
