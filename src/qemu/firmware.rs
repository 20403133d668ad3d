//! UEFI firmware, found the way QEMU's management tools find it: through
//! the firmware descriptors (`*.json`, schema in QEMU's
//! `docs/interop/firmware.json`) that distributions install, e.g. Debian's
//! `ovmf` in `/usr/share/qemu/firmware/`. vmlet reads them once at start
//! ([`FirmwareCatalog::load`]) and picks, per VM, the first descriptor (in
//! file name order) that fits the firmware asked for and the VM's pinned
//! machine type ([`FirmwareCatalog::select`]). Nothing here opens a
//! firmware file: the VM layer does, and QEMU gets fds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::spec::{Firmware, UEFI_NODES};

/// Largest descriptor file read (they are well under 2 KiB).
const MAX_DESCRIPTOR_BYTES: u64 = 64 * 1024;

/// The architecture vmlet's guests have.
const ARCHITECTURE: &str = "x86_64";

/// Why no firmware could be picked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FirmwareError {
    /// No descriptor fits.
    #[error(
        "no {wanted} firmware for machine type {machine} in the firmware descriptors of {dirs}: \
         is the `ovmf` package installed?"
    )]
    NotFound {
        /// What was asked for (`uefi`, `uefi-secure`).
        wanted: &'static str,
        /// The VM's machine type.
        machine: String,
        /// The directories searched.
        dirs: String,
    },
    /// `bios` needs no descriptor.
    #[error("bios firmware is QEMU's own; it has no descriptor")]
    NotUefi,
}

/// A UEFI firmware build: its code and the template of its variable store
/// (NVRAM), both raw flash images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UefiFirmware {
    /// The descriptor it came from.
    pub descriptor: PathBuf,
    /// The firmware code (`pflash0`, read only).
    pub code: PathBuf,
    /// The variable store template each VM's NVRAM is copied from.
    pub vars_template: PathBuf,
    /// Secure Boot: SMM on, the flash protected from the guest.
    pub secure: bool,
}

/// The descriptor fields vmlet uses; others (`tags`, `description`, …) are
/// ignored, as the schema grows.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Descriptor {
    interface_types: Vec<String>,
    mapping: Mapping,
    targets: Vec<Target>,
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Mapping {
    device: String,
    /// `split` (code and vars apart; the default), `combined` or `stateless`.
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    executable: Option<FlashFile>,
    #[serde(default)]
    nvram_template: Option<FlashFile>,
}

#[derive(Debug, Clone, Deserialize)]
struct FlashFile {
    filename: PathBuf,
    format: String,
}

#[derive(Debug, Clone, Deserialize)]
struct Target {
    architecture: String,
    #[serde(default)]
    machines: Vec<String>,
}

/// The firmware descriptors found at start, in QEMU's order.
#[derive(Debug, Clone, Default)]
pub struct FirmwareCatalog {
    entries: Vec<(PathBuf, Descriptor)>,
    dirs: Vec<PathBuf>,
}

impl FirmwareCatalog {
    /// Reads the descriptors of `dirs` (highest priority first): a file
    /// shadows the same name in later directories, an empty file hides it
    /// (QEMU's rules), and the survivors are taken in file name order.
    /// Returns the catalog and one warning per file that could not be read
    /// or parsed (skipped); missing directories are simply empty.
    pub fn load(dirs: &[PathBuf]) -> (FirmwareCatalog, Vec<String>) {
        let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
        for dir in dirs {
            let Ok(listing) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in listing.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".json") && !by_name.contains_key(&name) {
                    by_name.insert(name, entry.path());
                }
            }
        }
        let mut files = Vec::new();
        let mut warnings = Vec::new();
        for path in by_name.into_values() {
            match read_limited(&path) {
                Ok(text) => files.push((path, text)),
                Err(e) => warnings.push(format!("{}: {e}", path.display())),
            }
        }
        let (mut catalog, more) = FirmwareCatalog::parse(files);
        catalog.dirs = dirs.to_vec();
        warnings.extend(more);
        (catalog, warnings)
    }

    /// The catalog of descriptor texts already in priority order; an empty
    /// text is a mask and skipped, an unparsable one is skipped with a
    /// warning.
    pub fn parse(files: Vec<(PathBuf, String)>) -> (FirmwareCatalog, Vec<String>) {
        let mut entries = Vec::new();
        let mut warnings = Vec::new();
        for (path, text) in files {
            if text.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Descriptor>(&text) {
                Ok(d) => entries.push((path, d)),
                Err(e) => warnings.push(format!("{}: {e}", path.display())),
            }
        }
        (
            FirmwareCatalog {
                entries,
                dirs: vec![],
            },
            warnings,
        )
    }

    /// The first firmware that gives `firmware` on machine type `machine`
    /// (the VM's pinned, versioned type, e.g. `pc-q35-10.0`):
    /// - `uefi`: UEFI on split flash (code + raw vars template) that neither
    ///   needs SMM nor enforces Secure Boot with enrolled keys;
    /// - `uefi-secure`: one with `secure-boot`, `enrolled-keys` and
    ///   `requires-smm`.
    pub fn select(&self, firmware: Firmware, machine: &str) -> Result<UefiFirmware, FirmwareError> {
        let secure = match firmware {
            Firmware::Bios => return Err(FirmwareError::NotUefi),
            Firmware::Uefi => false,
            Firmware::UefiSecure => true,
        };
        self.entries
            .iter()
            .find_map(|(path, d)| fits(d, secure, machine).map(|(code, vars)| (path, code, vars)))
            .map(|(path, code, vars)| UefiFirmware {
                descriptor: path.clone(),
                code: code.to_path_buf(),
                vars_template: vars.to_path_buf(),
                secure,
            })
            .ok_or_else(|| FirmwareError::NotFound {
                wanted: firmware.as_str(),
                machine: machine.to_string(),
                dirs: if self.dirs.is_empty() {
                    "(none)".into()
                } else {
                    self.dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            })
    }

    /// How many usable descriptors were read.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no descriptor was read (`ovmf` not installed).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The code and vars template of `d`, if it gives UEFI (`secure` or not)
/// on `machine`.
fn fits<'a>(d: &'a Descriptor, secure: bool, machine: &str) -> Option<(&'a Path, &'a Path)> {
    let has = |f: &str| d.features.iter().any(|x| x == f);
    if !d.interface_types.iter().any(|t| t == "uefi") {
        return None;
    }
    let m = &d.mapping;
    if m.device != "flash" || m.mode.as_deref().is_some_and(|mode| mode != "split") {
        return None;
    }
    let code = m.executable.as_ref()?;
    let vars = m.nvram_template.as_ref()?;
    if code.format != "raw" || vars.format != "raw" {
        return None;
    }
    if !code.filename.is_absolute() || !vars.filename.is_absolute() {
        return None;
    }
    let targeted = d.targets.iter().any(|t| {
        t.architecture == ARCHITECTURE && t.machines.iter().any(|glob| glob_match(glob, machine))
    });
    if !targeted {
        return None;
    }
    let wanted = if secure {
        has("secure-boot") && has("enrolled-keys") && has("requires-smm")
    } else {
        !has("requires-smm") && !has("enrolled-keys")
    };
    wanted.then_some((code.filename.as_path(), vars.filename.as_path()))
}

/// Shell-style match of `name` against `glob` (`*` any run, `?` one
/// character), as the descriptors' machine lists use.
fn glob_match(glob: &str, name: &str) -> bool {
    let (g, n): (Vec<char>, Vec<char>) = (glob.chars().collect(), name.chars().collect());
    // Iterative wildcard matching with backtracking to the last `*`.
    let (mut gi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if gi < g.len() && (g[gi] == '?' || g[gi] == n[ni]) {
            gi += 1;
            ni += 1;
        } else if gi < g.len() && g[gi] == '*' {
            star = Some((gi, ni));
            gi += 1;
        } else if let Some((sg, sn)) = star {
            gi = sg + 1;
            ni = sn + 1;
            star = Some((sg, sn + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|c| *c == '*')
}

fn read_limited(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_DESCRIPTOR_BYTES)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// The fd sets QEMU reads a UEFI VM's firmware code and NVRAM through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PflashSets {
    /// The code (read only, raw).
    pub code: u32,
    /// The VM's NVRAM (writable qcow2).
    pub vars: u32,
    /// Secure Boot: SMM on, flash writes only from SMM.
    pub secure: bool,
}

/// The opaque tag of the firmware code's fd.
pub const CODE_TAG: &str = "firmware:code";
/// The opaque tag of the NVRAM's fd.
pub const VARS_TAG: &str = "firmware:nvram";

/// The block nodes of the firmware code (raw, read only) and the NVRAM
/// (qcow2, so internal snapshots can hold it; no backing file), bottom up.
pub fn blockdevs(sets: PflashSets) -> Vec<Value> {
    let [code, vars] = UEFI_NODES;
    vec![
        json!({
            "driver": "file",
            "node-name": format!("{code}-file"),
            "filename": format!("/dev/fdset/{}", sets.code),
            "read-only": true,
        }),
        json!({
            "driver": "raw",
            "node-name": code,
            "file": format!("{code}-file"),
            "read-only": true,
        }),
        json!({
            "driver": "file",
            "node-name": format!("{vars}-file"),
            "filename": format!("/dev/fdset/{}", sets.vars),
            "read-only": false,
        }),
        json!({
            "driver": "qcow2",
            "node-name": vars,
            "file": format!("{vars}-file"),
            "backing": null,
            "read-only": false,
        }),
    ]
}

/// What a UEFI VM adds to `-machine`: its flash nodes, and SMM for
/// Secure Boot.
pub fn machine_options(sets: PflashSets) -> String {
    // Fixed node names (no commas): nothing to escape.
    let [code, vars] = UEFI_NODES;
    let mut options = format!(",pflash0={code},pflash1={vars}");
    if sets.secure {
        options.push_str(",smm=on");
    }
    options
}

/// The `-global` that lets only SMM code write the flash (Secure Boot).
pub const SECURE_FLASH_GLOBAL: &str = "driver=cfi.pflash01,property=secure,value=on";

/// The `-fw_cfg` item that tells OVMF not to fall back to its legacy
/// loader for a kernel given with `-kernel` (edk2's runtime switch,
/// OvmfPkg/RUNTIME_CONFIG.md). Without it, a kernel that fails Secure
/// Boot verification is started anyway by that loader; with it, firmware
/// that knows the switch refuses the kernel. Older OVMF builds (Debian
/// 12's 2022.11) predate the switch and ignore it: there a directly loaded
/// kernel is not verified, and only a disk boot (shim, grub, kernel) is.
pub const NO_LEGACY_LOADER_FW_CFG: &str = "name=opt/org.tianocore/EnableLegacyLoader,string=no";

/// Why a Secure Boot VM with a directly loaded kernel may run an unverified
/// kernel: said in the start log (the firmware's version cannot be read
/// from its descriptor, so vmlet cannot tell whether it honours
/// [`NO_LEGACY_LOADER_FW_CFG`]).
pub const KERNEL_BOOT_SECURE_BOOT_CAVEAT: &str =
    "uefi-secure with boot.type kernel: the firmware is told not to start a kernel that fails \
     verification (opt/org.tianocore/EnableLegacyLoader=no), but OVMF builds that predate \
     that switch (Debian 12's 2022.11) start it anyway; boot from a disk (shim, grub, \
     kernel) for an enforced chain";

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(code: &str, vars: &str, machines: &[&str], features: &[&str]) -> String {
        json!({
            "description": "test",
            "interface-types": ["uefi"],
            "mapping": {
                "device": "flash",
                "executable": {"filename": code, "format": "raw"},
                "nvram-template": {"filename": vars, "format": "raw"}
            },
            "targets": [{"architecture": "x86_64", "machines": machines}],
            "features": features,
            "tags": []
        })
        .to_string()
    }

    /// Debian 12's `ovmf` descriptors (trimmed of descriptions).
    fn debian() -> Vec<(PathBuf, String)> {
        vec![
            (
                "/usr/share/qemu/firmware/40-edk2-x86_64-secure-enrolled.json".into(),
                descriptor(
                    "/usr/share/OVMF/OVMF_CODE_4M.ms.fd",
                    "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
                    &["pc-q35-*"],
                    &[
                        "acpi-s3",
                        "amd-sev",
                        "enrolled-keys",
                        "requires-smm",
                        "secure-boot",
                        "verbose-dynamic",
                    ],
                ),
            ),
            (
                "/usr/share/qemu/firmware/50-edk2-x86_64-secure.json".into(),
                descriptor(
                    "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
                    "/usr/share/OVMF/OVMF_VARS_4M.fd",
                    &["pc-q35-*"],
                    &[
                        "acpi-s3",
                        "amd-sev",
                        "requires-smm",
                        "secure-boot",
                        "verbose-dynamic",
                    ],
                ),
            ),
            (
                "/usr/share/qemu/firmware/60-edk2-x86_64.json".into(),
                descriptor(
                    "/usr/share/OVMF/OVMF_CODE_4M.fd",
                    "/usr/share/OVMF/OVMF_VARS_4M.fd",
                    &["pc-i440fx-*", "pc-q35-*"],
                    &["acpi-s3", "amd-sev", "verbose-dynamic"],
                ),
            ),
        ]
    }

    #[test]
    fn debian_descriptors_give_uefi_and_secure_boot() {
        let (catalog, warnings) = FirmwareCatalog::parse(debian());
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(catalog.len(), 3);
        let uefi = catalog.select(Firmware::Uefi, "pc-q35-10.0").unwrap();
        assert_eq!(uefi.code, Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd"));
        assert_eq!(
            uefi.vars_template,
            Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd")
        );
        assert!(!uefi.secure);
        assert!(uefi.descriptor.ends_with("60-edk2-x86_64.json"));
        let secure = catalog.select(Firmware::UefiSecure, "pc-q35-9.2").unwrap();
        assert_eq!(secure.code, Path::new("/usr/share/OVMF/OVMF_CODE_4M.ms.fd"));
        assert_eq!(
            secure.vars_template,
            Path::new("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
        );
        assert!(secure.secure);
        // i440fx has plain UEFI, but no descriptor offers it Secure Boot.
        assert!(catalog.select(Firmware::Uefi, "pc-i440fx-10.0").is_ok());
        assert!(catalog
            .select(Firmware::UefiSecure, "pc-i440fx-10.0")
            .is_err());
        // microvm: none at all.
        let err = catalog.select(Firmware::Uefi, "microvm").unwrap_err();
        assert!(err.to_string().contains("ovmf"), "{err}");
        assert_eq!(
            catalog.select(Firmware::Bios, "pc-q35-10.0"),
            Err(FirmwareError::NotUefi)
        );
    }

    #[test]
    fn no_descriptors_name_the_package() {
        let (catalog, _) = FirmwareCatalog::parse(vec![]);
        assert!(catalog.is_empty());
        let err = catalog
            .select(Firmware::UefiSecure, "pc-q35-10.0")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("uefi-secure") && err.contains("`ovmf`"),
            "{err}"
        );
        assert!(err.contains("pc-q35-10.0"), "{err}");
    }

    #[test]
    fn priority_order_wins_and_unfit_descriptors_are_skipped() {
        let mut files = vec![
            // Needs SMM: not plain uefi.
            (
                "10-smm.json".into(),
                descriptor(
                    "/a/smm-code.fd",
                    "/a/smm-vars.fd",
                    &["pc-q35-*"],
                    &["requires-smm"],
                ),
            ),
            // Wrong architecture.
            (
                "11-arm.json".into(),
                descriptor("/a/arm.fd", "/a/arm-vars.fd", &["pc-q35-*"], &[])
                    .replace("x86_64", "aarch64"),
            ),
            // qcow2 vars, stateless and relative paths: not what vmlet copies.
            (
                "12-qcow2.json".into(),
                descriptor("/a/q.fd", "/a/q-vars.fd", &["pc-q35-*"], &[])
                    .replace("\"format\":\"raw\"}}", "\"format\":\"qcow2\"}}"),
            ),
            (
                "13-stateless.json".into(),
                descriptor("/a/s.fd", "/a/s-vars.fd", &["pc-q35-*"], &[]).replace(
                    "\"device\":\"flash\"",
                    "\"device\":\"flash\",\"mode\":\"stateless\"",
                ),
            ),
            (
                "14-relative.json".into(),
                descriptor("a/r.fd", "a/r-vars.fd", &["pc-q35-*"], &[]),
            ),
            // A BIOS descriptor.
            (
                "15-bios.json".into(),
                descriptor("/a/b.fd", "/a/b-vars.fd", &["pc-q35-*"], &[])
                    .replace("[\"uefi\"]", "[\"bios\"]"),
            ),
            // Broken and masked files are skipped.
            ("16-broken.json".into(), "{ not json".into()),
            ("17-masked.json".into(), String::new()),
            (
                "20-good.json".into(),
                descriptor("/a/good.fd", "/a/good-vars.fd", &["pc-q35-10.*"], &[]),
            ),
        ];
        files.push((
            "30-later.json".into(),
            descriptor("/a/later.fd", "/a/later-vars.fd", &["pc-q35-*"], &[]),
        ));
        let (catalog, warnings) = FirmwareCatalog::parse(files);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("16-broken.json"), "{warnings:?}");
        let got = catalog.select(Firmware::Uefi, "pc-q35-10.0").unwrap();
        assert_eq!(got.code, Path::new("/a/good.fd"));
        // The machine glob decides: 9.2 falls through to the later one.
        let got = catalog.select(Firmware::Uefi, "pc-q35-9.2").unwrap();
        assert_eq!(got.code, Path::new("/a/later.fd"));
        assert!(catalog.select(Firmware::UefiSecure, "pc-q35-9.2").is_err());
    }

    #[test]
    fn load_applies_directory_priority_and_masks() {
        let root = std::env::temp_dir().join(format!("vmlet-fw-{}", uuid::Uuid::new_v4()));
        let (etc, usr) = (root.join("etc"), root.join("usr"));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&usr).unwrap();
        let write =
            |dir: &Path, name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        write(
            &usr,
            "50-a.json",
            &descriptor("/usr/a.fd", "/usr/a-vars.fd", &["pc-q35-*"], &[]),
        );
        write(
            &usr,
            "60-b.json",
            &descriptor("/usr/b.fd", "/usr/b-vars.fd", &["pc-q35-*"], &[]),
        );
        write(&usr, "README", "not a descriptor");
        // /etc shadows 50-a with its own file, and the later 60-b stays.
        write(
            &etc,
            "50-a.json",
            &descriptor("/etc/a.fd", "/etc/a-vars.fd", &["pc-q35-*"], &[]),
        );
        let dirs = vec![etc.clone(), usr.clone(), root.join("missing")];
        let (catalog, warnings) = FirmwareCatalog::load(&dirs);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(catalog.len(), 2);
        assert_eq!(
            catalog.select(Firmware::Uefi, "pc-q35-10.0").unwrap().code,
            Path::new("/etc/a.fd")
        );
        // An empty file in /etc masks the packaged one.
        write(&etc, "50-a.json", "");
        let (catalog, _) = FirmwareCatalog::load(&dirs);
        assert_eq!(catalog.len(), 1);
        assert_eq!(
            catalog.select(Firmware::Uefi, "pc-q35-10.0").unwrap().code,
            Path::new("/usr/b.fd")
        );
        let err = FirmwareCatalog::load(&[root.join("missing")])
            .0
            .select(Firmware::Uefi, "pc-q35-10.0")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&root.join("missing").display().to_string()),
            "{err}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn globs_match_like_the_shell() {
        assert!(glob_match("pc-q35-*", "pc-q35-10.0"));
        assert!(glob_match("pc-q35-*", "pc-q35-"));
        assert!(!glob_match("pc-q35-*", "pc-i440fx-10.0"));
        assert!(!glob_match("pc-q35-*", "q35"));
        assert!(glob_match("pc-*-10.?", "pc-q35-10.0"));
        assert!(!glob_match("pc-*-10.?", "pc-q35-10.10"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYbc"));
        assert!(!glob_match("a*b*c", "aXXbYYbd"));
        assert!(glob_match("microvm", "microvm"));
    }

    #[test]
    fn flash_nodes_read_fd_sets_and_secure_boot_adds_smm() {
        let sets = PflashSets {
            code: 7,
            vars: 8,
            secure: false,
        };
        let nodes = blockdevs(sets);
        assert_eq!(nodes[0]["filename"], "/dev/fdset/7");
        assert_eq!(nodes[1]["node-name"], "efi-code");
        assert_eq!(nodes[1]["read-only"], true);
        assert_eq!(nodes[2]["filename"], "/dev/fdset/8");
        assert_eq!(nodes[3]["driver"], "qcow2");
        assert!(nodes[3]["backing"].is_null() && nodes[3].get("backing").is_some());
        assert_eq!(machine_options(sets), ",pflash0=efi-code,pflash1=efi-vars");
        let secure = PflashSets {
            secure: true,
            ..sets
        };
        assert_eq!(
            machine_options(secure),
            ",pflash0=efi-code,pflash1=efi-vars,smm=on"
        );
    }
}
