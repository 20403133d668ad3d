//! A scratch network namespace (`ip netns add vmlet-test-XXXXXXXX`), for
//! tests of host networking that must not touch the host's own links.
//! Dropping it kills every process still inside and deletes it, even when
//! the test failed. Needs root (as do the tests that use it).
#![allow(dead_code)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::SCRATCH_PREFIX;

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    /// Its name (`vmlet-test-` and 8 hex digits).
    pub name: String,
}

impl NetNs {
    /// Creates a fresh namespace with `lo` up.
    pub fn new() -> NetNs {
        let name = format!(
            "{SCRATCH_PREFIX}{}",
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let out = run("ip", &["netns", "add", &name]);
        assert!(
            out.status.success(),
            "ip netns add {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip -n NAME args...` and returns its stdout; panics with its
    /// stderr when it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = self.ip_output(args);
        assert!(
            out.status.success(),
            "ip -n {} {} failed ({}): {}",
            self.name,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ip -n NAME args...`; whether it succeeded.
    pub fn ip_ok(&self, args: &[&str]) -> bool {
        self.ip_output(args).status.success()
    }

    /// Runs `ip -n NAME args...`: its stdout, or its status and stderr
    /// when it fails.
    pub fn ip_try(&self, args: &[&str]) -> Result<String, String> {
        let out = self.ip_output(args);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            ))
        }
    }

    fn ip_output(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `ip netns exec NAME cmd...` to completion.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(cmd);
        run("ip", &all)
    }

    /// The namespace's link names (`ip -o link show`, without the `@PEER`
    /// suffix of veth and VLAN links).
    pub fn links(&self) -> Vec<String> {
        self.ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|line| {
                // "3: veth0@if2: <BROADCAST,...> mtu ..."
                let name = line.split(": ").nth(1)?;
                Some(name.split('@').next().unwrap_or(name).to_string())
            })
            .collect()
    }

    /// Pids of the processes in the namespace (`ip netns pids NAME`).
    pub fn pids(&self) -> Vec<i32> {
        let out = run("ip", &["netns", "pids", &self.name]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Default for NetNs {
    fn default() -> NetNs {
        NetNs::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting only unmounts the name; kill what is inside so the
        // namespace (and its links) really go, then wait for them to die.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = run("ip", &["netns", "del", &self.name]);
        if !out.status.success() {
            eprintln!(
                "ip netns del {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {program} {}: {e}", args.join(" ")))
}
