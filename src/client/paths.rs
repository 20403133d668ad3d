//! API paths built from VM, disk, snapshot, NIC, image, volume and network
//! names. A name goes into a path unchanged or is refused: nothing the
//! caller types can reach another route.

use super::ClientError;

/// Checks that `value` can go into a URL path as one segment unchanged.
/// VM names and UUIDs only use these characters, so nothing is lost by
/// refusing the rest instead of percent-encoding it.
pub fn check_segment<'a>(what: &'static str, value: &'a str) -> Result<&'a str, ClientError> {
    let ok = !value.is_empty()
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(value)
    } else {
        Err(ClientError::BadSegment {
            what,
            value: value.to_string(),
        })
    }
}

pub(super) fn vm_path(id: &str) -> Result<String, ClientError> {
    Ok(format!("/v1/vms/{}", check_segment("VM id or name", id)?))
}

pub(super) fn image_path(name: &str) -> Result<String, ClientError> {
    Ok(format!("/v1/images/{}", check_segment("image name", name)?))
}

pub(super) fn volume_path(name: &str) -> Result<String, ClientError> {
    Ok(format!(
        "/v1/volumes/{}",
        check_segment("volume name", name)?
    ))
}

pub(super) fn network_path(name: &str) -> Result<String, ClientError> {
    Ok(format!(
        "/v1/networks/{}",
        check_segment("network name", name)?
    ))
}

/// `/v1/vms/{id}/nics/{nic}`: `nic` is a MAC (`52:54:00:12:34:56`) or an
/// index, so `:` is allowed besides what [`check_segment`] takes.
pub(super) fn nic_path(vm: &str, nic: &str) -> Result<String, ClientError> {
    let ok = !nic.is_empty() && nic.bytes().all(|b| b.is_ascii_alphanumeric() || b == b':');
    let path = format!("{}/nics/{nic}", vm_path(vm)?);
    if !ok {
        return Err(ClientError::BadPath {
            path,
            reason: "a NIC is named by its MAC (52:54:00:12:34:56) or its index".into(),
        });
    }
    Ok(path)
}

pub(super) fn disk_path(vm: &str, disk: &str) -> Result<String, ClientError> {
    Ok(format!(
        "{}/disks/{}",
        vm_path(vm)?,
        check_segment("disk name", disk)?
    ))
}

pub(super) fn snapshot_path(vm: &str, snapshot: &str) -> Result<String, ClientError> {
    Ok(format!(
        "{}/snapshots/{}",
        vm_path(vm)?,
        check_segment("snapshot name", snapshot)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_allow_names_and_uuids_only() {
        for ok in ["web-1", "a.b_c", "0f3c9a2e-1111-4222-8333-944445555666"] {
            assert_eq!(check_segment("VM", ok).unwrap(), ok);
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "a?x=1",
            "%2e",
            "é",
            "a\r\nX: y",
        ] {
            assert!(
                matches!(
                    check_segment("VM", bad),
                    Err(ClientError::BadSegment { .. })
                ),
                "{bad:?}"
            );
        }
        assert_eq!(vm_path("web").unwrap(), "/v1/vms/web");
        assert!(vm_path("../node").is_err());
        assert_eq!(image_path("deb-12").unwrap(), "/v1/images/deb-12");
        assert_eq!(volume_path("data").unwrap(), "/v1/volumes/data");
        assert_eq!(disk_path("web", "d1").unwrap(), "/v1/vms/web/disks/d1");
        assert_eq!(
            snapshot_path("web", "s1").unwrap(),
            "/v1/vms/web/snapshots/s1"
        );
        assert!(image_path("a/b").is_err());
        assert!(disk_path("web", "..").is_err());
    }
}
