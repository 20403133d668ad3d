//! Helpers for the storage tests: `qemu-img`, checksums, test image files,
//! a tiny HTTP server for URL imports, and tmpfs mounts for full disks.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Bytes in a MiB.
pub const MIB: u64 = 1024 * 1024;

/// Runs `qemu-img` with `args`, whatever its outcome.
pub fn try_qemu_img<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("running qemu-img")
}

/// Runs `qemu-img` with `args`; panics with its stderr when it fails.
/// Returns its stdout.
pub fn qemu_img<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = try_qemu_img(args);
    assert!(
        out.status.success(),
        "qemu-img {:?} failed: {}",
        args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates an empty image `name` in `dir` with `qemu-img create -f FORMAT`,
/// of `size` as `qemu-img` takes it (e.g. `"64M"`); returns its path.
pub fn create_image(dir: &Path, name: &str, format: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    qemu_img(&[
        OsStr::new("create"),
        OsStr::new("-q"),
        OsStr::new("-f"),
        OsStr::new(format),
        path.as_os_str(),
        OsStr::new(size),
    ]);
    path
}

/// `qemu-img info --output=json` of `path` (`-U`: a daemon may hold it).
pub fn image_info(path: &Path) -> Value {
    let out = qemu_img(&[
        OsStr::new("info"),
        OsStr::new("-U"),
        OsStr::new("--output=json"),
        path.as_os_str(),
    ]);
    serde_json::from_str(&out).expect("qemu-img info prints JSON")
}

/// `qemu-img compare` of two images with explicit formats; true when
/// their guest-visible contents are identical.
pub fn images_identical(a: &Path, a_format: &str, b: &Path, b_format: &str) -> bool {
    let out = try_qemu_img(&[
        OsStr::new("compare"),
        OsStr::new("-U"),
        OsStr::new("-f"),
        OsStr::new(a_format),
        OsStr::new("-F"),
        OsStr::new(b_format),
        a.as_os_str(),
        b.as_os_str(),
    ]);
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// SHA-256 of a file, as lowercase hex.
pub fn sha256_of(path: &Path) -> String {
    let mut file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A sparse raw image of `len` bytes with a recognizable pattern at its
/// start and in its middle (so a conversion that loses data shows).
pub fn write_pattern_raw(path: &Path, len: u64) -> PathBuf {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(len).unwrap();
    let head: Vec<u8> = b"VMLET-STORAGE-TEST-PATTERN\n"
        .iter()
        .copied()
        .cycle()
        .take(64 * 1024)
        .collect();
    file.write_all_at(&head, 0).unwrap();
    let middle: Vec<u8> = (0..32 * 1024u32).map(|i| (i % 251) as u8).collect();
    file.write_all_at(&middle, len / 2).unwrap();
    path.to_path_buf()
}

/// A raw file of `len` bytes of random data (does not compress or sparsify).
pub fn write_random(path: &Path, len: u64) -> PathBuf {
    let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
    let mut out = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1024 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        urandom.read_exact(&mut buf[..n]).unwrap();
        out.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    out.sync_all().unwrap();
    path.to_path_buf()
}

/// Names in directory `dir` (none when it does not exist).
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    };
    names.sort();
    names
}

/// Every file (not directory) under `dir`, recursively, relative to it.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(path);
            } else {
                files.push(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    files.sort();
    files
}

/// How a [`HttpServer`] answers one path.
#[derive(Clone)]
pub enum Reply {
    /// 200 with this body (and its Content-Length).
    File(Arc<Vec<u8>>),
    /// 200 announcing `announced` bytes, then only `body` before closing.
    Truncated {
        /// What is sent.
        body: Arc<Vec<u8>>,
        /// The Content-Length claimed.
        announced: u64,
    },
}

/// A minimal HTTP/1.1 server on 127.0.0.1 (one thread, one request per
/// connection): known paths get their [`Reply`], others 404. Stopped on drop.
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serves `routes` (path, reply).
    pub fn start(routes: Vec<(String, Reply)>) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let routes = routes.clone();
                std::thread::spawn(move || serve(stream, &routes));
            }
        });
        HttpServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(mut stream: TcpStream, routes: &[(String, Reply)]) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    let reply = routes.iter().find(|(p, _)| *p == path).map(|(_, r)| r);
    let _ = match reply {
        Some(Reply::File(body)) => stream
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )
            .and_then(|()| stream.write_all(body)),
        Some(Reply::Truncated { body, announced }) => stream
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {announced}\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .and_then(|()| stream.write_all(body)),
        None => stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
        ),
    };
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// A tmpfs mounted at a directory, unmounted on drop (lazily when busy),
/// even when the test failed.
pub struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of `size` (e.g. `"16M"`) at `path` (created if
    /// missing). `Err` with the reason when mounting is not possible here
    /// (not root, no CAP_SYS_ADMIN).
    pub fn mount(path: &Path, size: &str) -> Result<TmpfsMount, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0755"))
            .arg("tmpfs")
            .arg(path)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(TmpfsMount {
            path: path.to_path_buf(),
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes still free on it.
    pub fn free_bytes(&self) -> u64 {
        let stat = nix::sys::statvfs::statvfs(&self.path).unwrap();
        stat.blocks_available() as u64 * stat.fragment_size() as u64
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}
