//! A disk that UEFI firmware boots, for the Secure Boot and disk-boot
//! tests: an EFI system partition (a FAT file system on the whole disk, no
//! partition table; OVMF reads it as it is) holding Debian's signed shim as
//! the removable-media loader `\EFI\BOOT\BOOTX64.EFI`, Debian's signed GRUB
//! beside it (where shim looks for `grubx64.efi`), a `grub.cfg`, and the
//! test guest's kernel and initrd. Under Secure Boot the firmware checks
//! shim against its db (Microsoft's UEFI CA), shim checks GRUB and GRUB (via
//! shim) checks the kernel against Debian's key, which shim carries.
//!
//! shim and GRUB come from `scripts/fetch-signed-boot.sh` (apt-get download
//! into `target/signed-boot/`, nothing installed); the FAT file system is
//! made with dosfstools and mtools (`scripts/setup.sh --test`).
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::guest::{lock_exclusive, repo_dir, target_dir};

/// Debian's signed boot loaders, as fetched.
#[derive(Debug)]
pub struct SignedBoot {
    /// shim, signed by Microsoft's UEFI CA.
    pub shim: PathBuf,
    /// The monolithic GRUB, signed by Debian.
    pub grub: PathBuf,
}

/// Fetches shim and GRUB once (cached under target/) and returns their
/// paths. Safe when many tests call it at once: the script is run under an
/// exclusive lock on `target/signed-boot.lock`. Panics, with the script's
/// output, when the fetch fails.
pub fn signed_boot() -> &'static SignedBoot {
    static BOOT: OnceLock<SignedBoot> = OnceLock::new();
    BOOT.get_or_init(fetch)
}

fn fetch() -> SignedBoot {
    let target = target_dir();
    let script = repo_dir().join("scripts/fetch-signed-boot.sh");
    std::fs::create_dir_all(&target).unwrap();
    let lock_path = target.join("signed-boot.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("signed boot: cannot open {}: {e}", lock_path.display()));
    lock_exclusive(&lock).unwrap();
    let output = Command::new("bash")
        .arg(&script)
        .env("TARGET_DIR", &target)
        .output()
        .unwrap_or_else(|e| panic!("signed boot: cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "signed boot: {} failed ({}):\n{stderr}{stdout}",
        script.display(),
        output.status
    );
    let dir = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("signed boot: no output directory:\n{stderr}"));
    let boot = SignedBoot {
        shim: dir.join("shimx64.efi"),
        grub: dir.join("grubx64.efi"),
    };
    for path in [&boot.shim, &boot.grub] {
        assert!(path.is_file(), "signed boot: {} is missing", path.display());
    }
    drop(lock);
    boot
}

/// Writes at `path` a 64 MiB raw disk with an EFI system partition that
/// boots `kernel` and `initrd` with `cmdline` through shim and GRUB.
///
/// The signed GRUB is built with the prefix `/EFI/debian` and reads
/// `$prefix/grub.cfg` (on the device it was loaded from) before trying
/// `$cmdpath/grub.cfg`: the configuration goes there.
pub fn esp_disk(path: &Path, kernel: &Path, initrd: &Path, cmdline: &str) {
    let boot = signed_boot();
    let cfg = path.with_extension("grub.cfg");
    std::fs::write(
        &cfg,
        format!("set timeout=0\nlinux /vmlinuz {cmdline}\ninitrd /initrd.img\nboot\n"),
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    file.set_len(64 * 1024 * 1024).unwrap();
    drop(file);
    let image = path.to_str().expect("a UTF-8 path").to_string();
    run("mkfs.vfat", &["-n", "VMLETESP", &image]);
    run(
        "mmd",
        &["-i", &image, "::EFI", "::EFI/BOOT", "::EFI/debian"],
    );
    let copies: [(&Path, &str); 5] = [
        (&boot.shim, "::EFI/BOOT/BOOTX64.EFI"),
        (&boot.grub, "::EFI/BOOT/grubx64.efi"),
        (&cfg, "::EFI/debian/grub.cfg"),
        (kernel, "::vmlinuz"),
        (initrd, "::initrd.img"),
    ];
    for (from, to) in copies {
        run("mcopy", &["-i", &image, from.to_str().unwrap(), to]);
    }
    std::fs::remove_file(&cfg).unwrap();
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e} (scripts/setup.sh --test installs it)"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pe` (a PE32+ or PE32 image, such as an EFI-stub kernel) without its
/// Authenticode signature: the Certificate Table data directory entry is
/// zeroed and the attribute certificates it pointed at (at the end of the
/// file, where signing tools put them) are cut off. The result is the image
/// as it was before signing, apart from its (unchecked) PE checksum.
/// Errors name what is missing or malformed; an unsigned image is an
/// error, so a test cannot strip "nothing" and believe it made a change.
pub fn strip_authenticode(pe: &[u8]) -> Result<Vec<u8>, String> {
    let u16_at = |at: usize| -> Result<u16, String> {
        pe.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("truncated at {at:#x}"))
    };
    let u32_at = |at: usize| -> Result<u32, String> {
        pe.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format!("truncated at {at:#x}"))
    };
    if pe.get(..2) != Some(b"MZ") {
        return Err("no MZ header".into());
    }
    let header = u32_at(0x3c)? as usize;
    if pe.get(header..header + 4) != Some(b"PE\0\0") {
        return Err(format!("no PE signature at {header:#x}"));
    }
    // The optional header follows the 4-byte signature and the 20-byte
    // COFF header; its data directories start at 112 (PE32+) or 96 (PE32).
    let optional = header + 24;
    let (count_at, directories) = match u16_at(optional)? {
        0x20b => (optional + 108, optional + 112),
        0x10b => (optional + 92, optional + 96),
        magic => return Err(format!("unknown optional header magic {magic:#x}")),
    };
    // The Certificate Table is data directory 4 (8 bytes each).
    const CERTIFICATE_TABLE: usize = 4;
    if (u32_at(count_at)? as usize) <= CERTIFICATE_TABLE {
        return Err("no Certificate Table data directory".into());
    }
    let entry = directories + CERTIFICATE_TABLE * 8;
    // Unlike the other directories, this one holds a file offset.
    let offset = u32_at(entry)? as usize;
    let size = u32_at(entry + 4)? as usize;
    if size == 0 {
        return Err("not signed (empty Certificate Table)".into());
    }
    if offset.checked_add(size) != Some(pe.len()) {
        return Err(format!(
            "the certificates ({offset:#x}+{size:#x}) are not at the end of the {:#x}-byte file",
            pe.len()
        ));
    }
    let mut out = pe[..offset].to_vec();
    out[entry..entry + 8].fill(0);
    Ok(out)
}
