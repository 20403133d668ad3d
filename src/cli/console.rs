//! `vmlet console VM`: the VM's serial console in this terminal, like
//! `virsh console`. The terminal goes into raw mode (every key goes to the
//! guest, Ctrl-C included) until the escape key (Ctrl-] by default) detaches
//! or the VM stops. `--print-log` prints the console log's tail instead.

use std::io::{IsTerminal, Write};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::{CliError, ClientOptions, Output};
use crate::client::Endpoint;
use crate::console::ConsoleKind;

/// `vmlet vm console VM` (and its alias `vmlet console VM`): attach, print
/// the log, or hand out a browser URL.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ConsoleArgs {
    /// The VM (UUID or name).
    pub vm: String,
    /// The key that detaches: ^X for a control key, or one character.
    #[arg(long, default_value = DEFAULT_ESCAPE, value_parser = parse_escape)]
    pub escape: u8,
    /// Print the end of the console log instead of attaching (works
    /// for stopped VMs too).
    #[arg(long = "print-log", conflicts_with = "vnc")]
    pub print_log: bool,
    /// With --print-log: how many bytes from the end (default 64 KiB).
    #[arg(long, value_name = "N", requires = "print_log")]
    pub tail_bytes: Option<u64>,
    /// With --print-log: `current` prints only the current (or last)
    /// boot, from vmlet's `--- vmlet: boot N started` line on.
    #[arg(long, value_name = "WHICH", requires = "print_log", value_parser = ["current"])]
    pub boot: Option<String>,
    /// Print a one-time URL of the VM's graphical console (noVNC) to open
    /// in a browser, instead of attaching. It works once, within a minute.
    #[arg(long)]
    pub vnc: bool,
}

/// Runs `vmlet vm console` / `vmlet console` as `args` say.
pub async fn run_console_args(
    args: ConsoleArgs,
    opts: &ClientOptions,
    out: &mut impl Write,
) -> Result<(), CliError> {
    if args.vnc {
        run_console_vnc(opts, &args.vm, out).await
    } else if args.print_log {
        run_console_log(opts, &args.vm, args.tail_bytes, args.boot.is_some(), out).await
    } else {
        run_console(opts, &args.vm, args.escape).await
    }
}

/// `vmlet vm console VM --vnc`: asks for a one-time VNC token and prints the
/// browser page's URL (with `-o json`, the token as the API returns it).
pub async fn run_console_vnc(
    opts: &ClientOptions,
    vm: &str,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let client = opts.client()?;
    let token = client.console_token(vm, ConsoleKind::Vnc).await?;
    let text = if opts.output == Output::Json {
        super::pretty(&token)
    } else {
        vnc_message(client.endpoint(), &token)
    };
    super::write_flush(out, &text)
}

/// What `--vnc` prints: the full URL when the daemon is reached over TCP;
/// over the unix socket a browser cannot follow, so the path and what to
/// put in front of it.
pub fn vnc_message(endpoint: &Endpoint, token: &crate::console::ConsoleToken) -> String {
    let page = token.page_url.as_deref().unwrap_or(&token.url);
    match endpoint {
        Endpoint::Tcp { url, .. } => format!(
            "{}{page}\n(one-time URL, valid until {})\n",
            url.trim_end_matches('/'),
            token.expires_at
        ),
        Endpoint::Unix(socket) => format!(
            "{page}\n(one-time path, valid until {}: open it on the daemon's TCP listener, \
             http://HOST:PORT{page}; {} is a unix socket a browser cannot reach)\n",
            token.expires_at,
            socket.display()
        ),
    }
}

/// The default escape key, Ctrl-] (as in telnet and `virsh console`).
pub const DEFAULT_ESCAPE: &str = "^]";

/// Parses an escape key: `^X` (Ctrl-X, for `@`, `A`–`Z`, `[`, `\`, `]`,
/// `^`, `_`) or one ASCII character.
pub fn parse_escape(text: &str) -> Result<u8, String> {
    let bytes = text.as_bytes();
    match bytes {
        [b'^', c] if (b'@'..=b'_').contains(&c.to_ascii_uppercase()) => {
            Ok(c.to_ascii_uppercase() & 0x1f)
        }
        [c] if c.is_ascii() => Ok(*c),
        _ => Err(format!(
            "{text:?} is not an escape key: use ^X (a control key) or one ASCII character"
        )),
    }
}

/// Splits what was typed at the escape key: the bytes before it, and
/// whether it was pressed.
pub fn split_at_escape(typed: &[u8], escape: u8) -> (&[u8], bool) {
    match typed.iter().position(|&b| b == escape) {
        Some(at) => (&typed[..at], true),
        None => (typed, false),
    }
}

/// Restores the terminal's mode when dropped.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    /// Puts standard input into raw mode; `None` when it is not a terminal.
    fn enter() -> Result<Option<RawMode>, CliError> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = tcgetattr(&stdin).map_err(|e| CliError::Output(e.into()))?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).map_err(|e| CliError::Output(e.into()))?;
        Ok(Some(RawMode { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}

/// `vmlet console VM`: attaches this terminal to the serial console until
/// `escape` is typed or the console closes.
pub async fn run_console(opts: &ClientOptions, vm: &str, escape: u8) -> Result<(), CliError> {
    let client = opts.client()?;
    let token = client.console_token(vm, ConsoleKind::Serial).await?;
    let mut socket = client.open_console(&token.url).await?;
    eprintln!(
        "Connected to the serial console of {vm} (escape: {}); the last 64 KiB of output follows.",
        describe_escape(escape)
    );
    let raw = RawMode::enter()?;
    let mut stdin = tokio::io::stdin();
    let mut stdout = std::io::stdout();
    let mut typed = vec![0u8; 4096];
    let why = loop {
        tokio::select! {
            message = socket.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    stdout.write_all(&bytes).map_err(CliError::Output)?;
                    stdout.flush().map_err(CliError::Output)?;
                }
                Some(Ok(Message::Text(text))) => {
                    stdout.write_all(text.as_bytes()).map_err(CliError::Output)?;
                    stdout.flush().map_err(CliError::Output)?;
                }
                Some(Ok(Message::Close(frame))) => {
                    break frame
                        .map(|f| f.reason.to_string())
                        .filter(|r| !r.is_empty())
                        .unwrap_or_else(|| "the console closed".into());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break format!("the console broke: {e}"),
                None => break "the console closed".into(),
            },
            read = stdin.read(&mut typed) => {
                let n = read.map_err(CliError::Output)?;
                if n == 0 {
                    break "end of input".into();
                }
                let (before, escaped) = split_at_escape(&typed[..n], escape);
                if !before.is_empty() {
                    let sent = socket.send(Message::Binary(before.to_vec().into())).await;
                    if let Err(e) = sent {
                        break format!("the console broke: {e}");
                    }
                }
                if escaped {
                    let _ = socket.close(None).await;
                    break "detached".into();
                }
            }
        }
    };
    drop(raw);
    eprintln!("\r\n[{why}]");
    Ok(())
}

/// `vmlet console VM --print-log`: prints the log's tail as the guest wrote
/// it (`current_boot`: only the current boot's part).
pub async fn run_console_log(
    opts: &ClientOptions,
    vm: &str,
    tail_bytes: Option<u64>,
    current_boot: bool,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let bytes = opts
        .client()?
        .console_log_of(vm, tail_bytes, current_boot)
        .await?;
    out.write_all(&bytes).map_err(CliError::Output)?;
    out.flush().map_err(CliError::Output)
}

fn describe_escape(escape: u8) -> String {
    if escape < 0x20 {
        format!("Ctrl-{}", (escape | 0x40) as char)
    } else {
        format!("{:?}", escape as char)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keys_parse() {
        assert_eq!(parse_escape("^]"), Ok(0x1d));
        assert_eq!(parse_escape("^a"), Ok(0x01));
        assert_eq!(parse_escape("~"), Ok(b'~'));
        assert!(parse_escape("^").is_ok(), "a lone caret is a character");
        assert!(parse_escape("^1").is_err());
        assert!(parse_escape("ab").is_err());
        assert!(parse_escape("").is_err());
        assert_eq!(describe_escape(0x1d), "Ctrl-]");
    }

    #[test]
    fn the_vnc_url_is_whole_over_tcp_and_a_path_over_the_socket() {
        let token = crate::console::ConsoleToken {
            token: "ab12".into(),
            kind: ConsoleKind::Vnc,
            expires_at: "2024-05-01T10:01:00.000Z".into(),
            url: "/v1/console?token=ab12".into(),
            page_url: Some("/console?token=ab12".into()),
        };
        let tcp = Endpoint::Tcp {
            url: "http://node1:8780/".into(),
            token: None,
        };
        assert_eq!(
            vnc_message(&tcp, &token),
            "http://node1:8780/console?token=ab12\n\
             (one-time URL, valid until 2024-05-01T10:01:00.000Z)\n"
        );
        let text = vnc_message(&Endpoint::Unix("/run/vmlet/vmlet.sock".into()), &token);
        assert!(text.starts_with("/console?token=ab12\n"), "{text}");
        assert!(
            text.contains("http://HOST:PORT/console?token=ab12"),
            "{text}"
        );
        assert!(
            text.contains("/run/vmlet/vmlet.sock is a unix socket"),
            "{text}"
        );
    }

    #[test]
    fn typing_stops_at_the_escape_key() {
        assert_eq!(split_at_escape(b"ls\r", 0x1d), (&b"ls\r"[..], false));
        assert_eq!(split_at_escape(b"ls\x1dmore", 0x1d), (&b"ls"[..], true));
        assert_eq!(split_at_escape(b"\x1d", 0x1d), (&b""[..], true));
    }
}
