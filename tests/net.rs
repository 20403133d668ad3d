//! Host networking against the real kernel, each test inside a fresh
//! network namespace so the host's interfaces are never touched. Needs root.

mod common;

use std::fs::File;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use vmlet::net::bridge::{self, LinkInfo};
use vmlet::net::tap;
use vmlet::net::NetError;

/// A network namespace that is deleted on drop, even when the test fails.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vmlet-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        Netns { name }
    }

    /// Runs `ip -n NS args…`.
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Runs `body` on a thread that has entered this namespace, on a
    /// current-thread runtime, and returns its result (re-raising panics).
    fn run<F, Fut>(&self, body: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let path = format!("/run/netns/{}", self.name);
        let thread = std::thread::spawn(move || {
            let ns = File::open(&path).expect("open netns");
            // SAFETY: a valid namespace fd; only this thread changes namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(body());
        });
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn must_link(name: &str) -> LinkInfo {
    bridge::link(name)
        .await
        .expect("link")
        .unwrap_or_else(|| panic!("{name} is missing"))
}

fn assert_errno(err: &NetError, errno: i32, name: &str) {
    assert_eq!(err.errno(), Some(errno), "{err}");
    assert!(err.to_string().contains(name), "{err}");
}

#[test]
fn bridge_with_mtu_is_up() {
    let ns = Netns::new();
    ns.run(|| async {
        assert_eq!(bridge::link("br-test").await.unwrap(), None);
        bridge::create_bridge("br-test", Some(1400)).await.unwrap();
        let br = must_link("br-test").await;
        assert_eq!(br.kind.as_deref(), Some("bridge"));
        assert_eq!(br.mtu, Some(1400));
        assert!(br.up);
        assert_eq!(br.master, None);

        let all = bridge::links().await.unwrap();
        assert!(all.iter().any(|l| l.name == "lo"), "{all:?}");
        assert!(all.iter().any(|l| l == &br), "{all:?}");

        bridge::create_bridge("br-nomtu", None).await.unwrap();
        assert_eq!(must_link("br-nomtu").await.mtu, Some(1500));
    });
}

#[test]
fn vlan_on_veth_enslaved_to_bridge() {
    let ns = Netns::new();
    ns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up0p"]);
    ns.run(|| async {
        bridge::create_bridge("br-v42", Some(1400)).await.unwrap();
        let br = must_link("br-v42").await;
        bridge::set_up("up0").await.unwrap();
        let up0 = must_link("up0").await;
        assert!(up0.up);
        assert_eq!(up0.kind.as_deref(), Some("veth"));

        // Errors about the uplink come before the kernel is asked.
        let err = bridge::create_vlan("nope.7", "nope", 7, None)
            .await
            .unwrap_err();
        assert_errno(&err, libc::ENODEV, "ENODEV");
        assert!(matches!(
            bridge::create_vlan("up0.0", "up0", 0, None).await,
            Err(NetError::Invalid(_))
        ));

        match bridge::create_vlan("up0.42", "up0", 42, None).await {
            Ok(()) => {
                bridge::set_master_mtu_up("up0.42", "br-v42", Some(1400))
                    .await
                    .unwrap();
                let vlan = must_link("up0.42").await;
                assert_eq!(vlan.kind.as_deref(), Some("vlan"));
                assert_eq!(vlan.vlan_id, Some(42));
                assert_eq!(vlan.master, Some(br.index));
                assert_eq!(vlan.mtu, Some(1400));
                assert!(vlan.up);
                assert_eq!(must_link("br-v42").await.mtu, Some(1400));

                bridge::create_vlan("up0.43", "up0", 43, Some(1300))
                    .await
                    .unwrap();
                let vlan = must_link("up0.43").await;
                assert_eq!((vlan.vlan_id, vlan.mtu), (Some(43), Some(1300)));
                let err = bridge::create_vlan("up0.43", "up0", 43, None)
                    .await
                    .unwrap_err();
                assert_errno(&err, libc::EEXIST, "EEXIST");
            }
            Err(err) => {
                // Only a kernel without 802.1Q (no 8021q module, as in some
                // test containers) may refuse, and it says EOPNOTSUPP.
                assert_errno(&err, libc::EOPNOTSUPP, "EOPNOTSUPP");
                common::skip(
                    "vlan_on_veth_enslaved_to_bridge (VLAN part)",
                    format!("this kernel has no 802.1Q support (8021q): {err}"),
                );
                // The bridge side still works with the veth as its port.
                bridge::set_master_mtu_up("up0", "br-v42", Some(1400))
                    .await
                    .unwrap();
                let port = must_link("up0").await;
                assert_eq!(port.master, Some(br.index));
                assert_eq!(port.mtu, Some(1400));
                assert_eq!(must_link("br-v42").await.mtu, Some(1400));
            }
        }
    });
}

#[test]
fn tap_enslaved_then_gone_when_dropped() {
    let ns = Netns::new();
    ns.run(|| async {
        bridge::create_bridge("br-tap", Some(1400)).await.unwrap();
        let br = must_link("br-tap").await;
        for (name, queues) in [("tap-q1", 1), ("tap-q2", 2)] {
            let tap = tap::open_tap(name, queues).unwrap();
            assert_eq!(tap.name, name);
            assert_eq!(tap.fds.len(), queues as usize);
            for fd in &tap.fds {
                // SAFETY: querying the flags of an fd we own.
                let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
                assert_ne!(flags & libc::FD_CLOEXEC, 0);
            }
            let before = must_link(name).await;
            assert_eq!(before.kind.as_deref(), Some("tun"));
            assert!(!before.up);

            bridge::set_master_mtu_up(name, "br-tap", Some(1400))
                .await
                .unwrap();
            let after = must_link(name).await;
            assert_eq!(after.master, Some(br.index));
            assert_eq!(after.mtu, Some(1400));
            assert!(after.up);

            drop(tap);
            assert_eq!(bridge::link(name).await.unwrap(), None);
        }
        if std::path::Path::new("/dev/vhost-net").exists() {
            assert_eq!(tap::open_vhost(2).unwrap().len(), 2);
        } else {
            // Without the device QEMU runs without vhost: no fds, no error.
            assert_eq!(tap::open_vhost(2).unwrap().len(), 0);
            common::skip(
                "tap_enslaved_then_gone_when_dropped (vhost part)",
                "/dev/vhost-net is missing (no vhost_net module), so no vhost fd can be opened",
            );
        }
    });
}

#[test]
fn kernel_errors_carry_errno_names() {
    let ns = Netns::new();
    ns.ip(&[
        "link", "add", "port0", "type", "veth", "peer", "name", "port0p",
    ]);
    ns.run(|| async {
        bridge::create_bridge("br-dup", None).await.unwrap();
        let err = bridge::create_bridge("br-dup", None).await.unwrap_err();
        assert_errno(&err, libc::EEXIST, "EEXIST");
        assert!(err.to_string().contains("br-dup"), "{err}");

        let err = bridge::set_master_mtu_up("port0", "br-missing", None)
            .await
            .unwrap_err();
        assert_errno(&err, libc::ENODEV, "ENODEV");

        let err = bridge::set_master_mtu_up("port0", "port0", None)
            .await
            .unwrap_err();
        assert!(matches!(err, NetError::Invalid(_)), "{err}");

        let err = bridge::set_up("missing0").await.unwrap_err();
        assert_errno(&err, libc::ENODEV, "ENODEV");

        // An MTU the bridge refuses: the error is named and no bridge is left.
        let err = bridge::create_bridge("br-badmtu", Some(10))
            .await
            .unwrap_err();
        assert_errno(&err, libc::EINVAL, "EINVAL");
        assert_eq!(bridge::link("br-badmtu").await.unwrap(), None);

        assert!(matches!(
            bridge::create_bridge("a-name-that-is-too-long", None).await,
            Err(NetError::Invalid(_))
        ));
        assert!(matches!(
            bridge::link("bad/name").await,
            Err(NetError::Invalid(_))
        ));
    });
}

#[test]
fn delete_link_is_idempotent() {
    let ns = Netns::new();
    ns.run(|| async {
        bridge::create_bridge("br-del", None).await.unwrap();
        bridge::delete_link("br-del").await.unwrap();
        assert_eq!(bridge::link("br-del").await.unwrap(), None);
        bridge::delete_link("br-del").await.unwrap();
        bridge::delete_link("never-was").await.unwrap();
    });
}

#[test]
fn concurrent_calls_from_many_tasks() {
    let ns = Netns::new();
    ns.run(|| async {
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                tokio::spawn(async move {
                    let name = format!("br-c{i}");
                    bridge::create_bridge(&name, Some(1400)).await.unwrap();
                    assert!(must_link(&name).await.up);
                    bridge::delete_link(&name).await.unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let left = bridge::links().await.unwrap();
        assert!(!left.iter().any(|l| l.name.starts_with("br-c")), "{left:?}");
    });
}
