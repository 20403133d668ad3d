//! Golden argv corpus: each `tests/golden/NAME.json` (accelerator, run
//! directory, spec) must produce exactly `tests/golden/NAME.argv`, one
//! argument per line. Run with `VMLET_UPDATE_GOLDEN=1` to rewrite the `.argv`
//! files after an intended change, then review the diff. Storage files live
//! under the state directory `/var/lib/vmlet`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use vmlet::qemu::accel::Accel;
use vmlet::qemu::argv::{self, LaunchInputs, RunPaths};
use vmlet::qemu::launch_files;
use vmlet::qemu::nic::{NicBackend, NicPlan};
use vmlet::qemu::profile::Profiles;
use vmlet::spec::{MachinePin, VmSpec};
use vmlet::storage::Layout;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    accel: Accel,
    run_dir: PathBuf,
    /// The VM's pin, as the daemon would have set it at create.
    machine: MachinePin,
    spec: VmSpec,
}

fn render(case: &Case, profiles: &Profiles) -> String {
    case.spec
        .validate(|p| profiles.caps(p))
        .expect("golden specs are valid");
    let paths = RunPaths::new(&case.run_dir, case.spec.uuid);
    // NICs on the network named `user` use user-mode networking; the others
    // get tap fds numbered from 10 (one per queue), as the daemon would pass.
    let mut next_fd = 10;
    let nics: Vec<NicPlan> = case
        .spec
        .nics
        .iter()
        .map(|nic| NicPlan {
            spec: nic.clone(),
            backend: if nic.network == "user" {
                NicBackend::User
            } else {
                let fds = (0..nic.queue_count())
                    .map(|_| {
                        next_fd += 1;
                        (next_fd - 1).to_string()
                    })
                    .collect();
                NicBackend::Tap {
                    fds,
                    vhost_fds: vec![],
                }
            },
        })
        .collect();
    // Disks, kernel and initrd: the files the daemon would open, with fd
    // numbers counted from 100.
    let layout = Layout::new(Path::new("/var/lib/vmlet"));
    let disks = vmlet::vm::launch::disk_plans(
        &layout,
        case.spec.uuid,
        &case.spec.disks,
        case.spec.cloud_init.is_some(),
    );
    // As the daemon runs QEMU as root: jailed, the kernel and initrd
    // copied into the jail.
    let n = launch_files::numbered(&case.spec, &disks, 100, true);
    let argv = argv::build(LaunchInputs {
        spec: &case.spec,
        profile: profiles.get(&case.spec.profile).unwrap(),
        machine: &case.machine,
        accel: case.accel,
        paths: &paths,
        jailed: true,
        run_fds: &n.run,
        disks: &disks,
        disk_sets: &n.sets,
        passed_fds: &n.passed,
        boot_files: n.boot.as_ref(),
        nics: &nics,
        pflash: n.pflash,
    });
    let mut text = argv.join("\n");
    text.push('\n');
    text
}

#[test]
fn argv_matches_golden_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("VMLET_UPDATE_GOLDEN").is_some();
    let profiles = Profiles::built_in().unwrap();
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 12, "the corpus has {} cases", inputs.len());

    let mut failures = Vec::new();
    for input in &inputs {
        let case: Case = serde_json::from_str(&std::fs::read_to_string(input).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", input.display()));
        let got = render(&case, &profiles);
        let golden = input.with_extension("argv");
        if update {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (VMLET_UPDATE_GOLDEN=1 creates it)",
                golden.display()
            )
        });
        if got != want {
            failures.push(format!(
                "{}:\n--- want\n{want}--- got\n{got}",
                golden.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "argv differs from the golden corpus (VMLET_UPDATE_GOLDEN=1 rewrites it):\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_golden_argv_has_its_input() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "argv") {
            assert!(
                path.with_extension("json").exists(),
                "{} has no .json input",
                path.display()
            );
        }
    }
}
