//! The image store (`STATE_DIR/images/`), like a node-local Glance: images
//! are imported from a file under the import directory or from an http(s)
//! URL, checked, converted to qcow2, and never written again: VM disks are
//! overlays on them.
//!
//! An import runs in the background and shows on the image (`status`
//! `importing`, `progress`) and in `image` events. It is assembled in
//! `images/.tmp/` and becomes visible by rename only when finished, so a
//! failed, cancelled or interrupted import leaves no image file behind. Its
//! record (`NAME.json`) is written when the import starts: a failed one
//! stays listed as `failed` with its error until it is deleted or imported
//! again, and one a restart interrupted becomes `failed` ("interrupted:
//! vmlet restarted") when the daemon starts again.
//!
//! Sources are untrusted. A URL may reach only public addresses unless
//! `[images] import_allowed_networks` allows more (see [`super::fetch`]); a
//! source is at most `import_max_bytes`; `qemu-img` inspects it under
//! resource limits and converts it from the format probed once (never
//! probed again); images with a backing file or an external data file, and
//! virtual sizes above `max_virtual_bytes`, are refused. Files and records
//! are private to the daemon (0600 in 0700 directories).
//!
//! Why this file is long: one import runs as one pipeline (fetch or copy,
//! hash, probe under limits, convert, verify, publish) with its cleanup on
//! every failure and on restart; split, its steps would hide that cleanup.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::persist::{self, timestamp};
use crate::spec::{validate_name, FieldError, SpecError};
pub use crate::spec::{Image, ImageImport, ImageStatus, ImportPhase, ImportProgress};
use crate::storage::fetch::{redact, FetchError, FetchLimits, Fetcher, IpNet, NetworkPolicy};
use crate::storage::qemu_img::{qcow2_header_refusal, QemuImg};
use crate::storage::Layout;
use crate::storage::{StorageError, StorageEvents};
use serde::{Deserialize, Serialize};

/// Image imports (`[images]` in the file). Imported files are untrusted:
/// URL imports may not reach internal networks, and `qemu-img` runs on
/// them under limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageSettings {
    /// Networks (CIDRs) URL imports may fetch from although the default
    /// deny list covers them (loopback, private, link-local, CGNAT, …),
    /// e.g. `["10.20.0.0/16"]` for an internal mirror. Empty: only public
    /// addresses.
    pub import_allowed_networks: Vec<IpNet>,
    /// Seconds to resolve and connect to a URL's host (per redirect hop).
    pub import_connect_timeout_s: u64,
    /// Seconds a URL import waits for the response or the next bytes before
    /// it fails.
    pub import_idle_timeout_s: u64,
    /// Seconds a whole URL download may take.
    pub import_timeout_s: u64,
    /// Largest source an import accepts, in bytes (a URL's `Content-Length`
    /// is checked up front, the bytes as they come).
    pub import_max_bytes: u64,
    /// Largest virtual size (what the guest sees) of an imported image, in
    /// bytes; checked before converting.
    pub max_virtual_bytes: u64,
    /// Seconds `qemu-img convert` of an import may take before it is killed.
    pub convert_timeout_s: u64,
}

impl Default for ImageSettings {
    fn default() -> Self {
        ImageSettings {
            import_allowed_networks: Vec::new(),
            import_connect_timeout_s: 10,
            import_idle_timeout_s: 60,
            import_timeout_s: 6 * 3600,
            import_max_bytes: 64 << 30,
            max_virtual_bytes: 1 << 40,
            convert_timeout_s: 3600,
        }
    }
}

/// Formats an import may be in; each is stored as qcow2.
pub const IMPORT_FORMATS: [&str; 5] = ["raw", "qcow2", "vmdk", "vdi", "vhdx"];

/// How often import progress is published at most.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// The error of an import a restart interrupted.
pub const INTERRUPTED: &str = "interrupted: vmlet restarted";

/// Mode of image files and records: the daemon's alone.
const FILE_MODE: u32 = 0o600;

/// Mode of the directories the store creates.
const DIR_MODE: u32 = 0o700;

enum Source {
    File(PathBuf),
    Url(reqwest::Url),
}

#[derive(Debug)]
struct Entry {
    image: Image,
    task: Option<tokio::task::AbortHandle>,
}

/// The image store.
#[derive(Debug)]
pub struct ImageStore {
    layout: Layout,
    qemu_img: QemuImg,
    import_dir: PathBuf,
    fetcher: Fetcher,
    max_virtual_bytes: u64,
    convert_timeout: Duration,
    events: Arc<dyn StorageEvents>,
    entries: Mutex<BTreeMap<String, Entry>>,
}

/// Removes a directory tree when dropped (an import's scratch space).
struct TmpDir(PathBuf);

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl ImageStore {
    /// Opens the store: loads the images, marks imports a restart
    /// interrupted `failed` and removes their leftovers.
    pub fn open(
        layout: Layout,
        qemu_img: QemuImg,
        import_dir: PathBuf,
        settings: &ImageSettings,
        events: Arc<dyn StorageEvents>,
    ) -> std::io::Result<ImageStore> {
        let dir = layout.images_dir();
        create_private_dir(&dir)?;
        // Directories made before images were kept private.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(DIR_MODE))?;
        if !import_dir.exists() {
            create_private_dir(&import_dir)?;
        }
        let tmp = layout.import_tmp_dir();
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        let mut entries = BTreeMap::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let loaded = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    serde_json::from_slice::<Image>(&bytes).map_err(|e| e.to_string())
                });
            let mut image = match loaded {
                // The name makes file paths: it must be valid and the
                // record's own.
                Ok(image)
                    if validate_name("name", &image.name).is_err()
                        || path.file_stem() != Some(std::ffi::OsStr::new(&image.name)) =>
                {
                    tracing::error!(file = %path.display(), "skipping image metadata with a foreign name");
                    continue;
                }
                Ok(image) => image,
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "skipping unreadable image metadata");
                    continue;
                }
            };
            let file = layout.image_file(&image.name);
            match image.status {
                ImageStatus::Ready if file.is_file() => {
                    let _ = std::fs::set_permissions(&file, private_file());
                }
                ImageStatus::Ready => {
                    tracing::warn!(image = %image.name, "image metadata without its file: removing");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                ImageStatus::Importing | ImageStatus::Failed => {
                    // An import killed after renaming its file in but
                    // before recording it ready: the file is unverified.
                    let _ = std::fs::remove_file(&file);
                    if image.status == ImageStatus::Importing {
                        tracing::warn!(image = %image.name, "import interrupted by a restart: failed");
                        image.status = ImageStatus::Failed;
                        image.progress = None;
                        image.error = Some(INTERRUPTED.into());
                        write_record(&dir, &image).map_err(std::io::Error::other)?;
                    }
                }
            }
            let _ = std::fs::set_permissions(&path, private_file());
            entries.insert(image.name.clone(), Entry { image, task: None });
        }
        let fetcher = Fetcher::new(
            NetworkPolicy::new(settings.import_allowed_networks.clone()),
            FetchLimits {
                connect_timeout: Duration::from_secs(settings.import_connect_timeout_s),
                idle_timeout: Duration::from_secs(settings.import_idle_timeout_s),
                total_timeout: Duration::from_secs(settings.import_timeout_s),
                max_bytes: settings.import_max_bytes,
            },
        );
        Ok(ImageStore {
            layout,
            qemu_img,
            import_dir,
            fetcher,
            max_virtual_bytes: settings.max_virtual_bytes,
            convert_timeout: Duration::from_secs(settings.convert_timeout_s),
            events,
            entries: Mutex::new(entries),
        })
    }

    /// Every image, by name.
    pub fn list(&self) -> Vec<Image> {
        let entries = self.entries.lock().unwrap();
        entries.values().map(|e| e.image.clone()).collect()
    }

    /// Image `name`.
    pub fn get(&self, name: &str) -> Result<Image, StorageError> {
        let entries = self.entries.lock().unwrap();
        entries
            .get(name)
            .map(|e| e.image.clone())
            .ok_or_else(|| StorageError::NotFound(format!("image {name}")))
    }

    /// The file and virtual size of ready image `name`, for a disk that
    /// names it in field `field`.
    pub fn ready_file(&self, name: &str, field: &str) -> Result<(PathBuf, u64), StorageError> {
        let image = self
            .get(name)
            .map_err(|_| StorageError::field(field, format!("no image {name:?}")))?;
        if image.status != ImageStatus::Ready {
            return Err(StorageError::field(
                field,
                format!("image {name:?} is {}, not ready", image.status.as_str()),
            ));
        }
        Ok((
            self.layout.image_file(name),
            image.virtual_size.unwrap_or(0),
        ))
    }

    /// Starts importing; returns the image in `importing` state.
    pub fn import(self: &Arc<Self>, request: ImageImport) -> Result<Image, StorageError> {
        let source = self.check_request(&request)?;
        let mut entries = self.entries.lock().unwrap();
        if let Some(existing) = entries.get(&request.name) {
            if existing.image.status != ImageStatus::Failed {
                return Err(StorageError::Conflict(format!(
                    "image {} already exists",
                    request.name
                )));
            }
        }
        let image = Image {
            name: request.name.clone(),
            status: ImageStatus::Importing,
            source: match &source {
                Source::File(path) => path.display().to_string(),
                Source::Url(url) => redact(url),
            },
            source_format: None,
            format: "qcow2".into(),
            virtual_size: None,
            actual_size: None,
            sha256: None,
            source_sha256: None,
            progress: Some(ImportProgress {
                phase: ImportPhase::Fetch,
                bytes_done: 0,
                bytes_total: None,
            }),
            error: None,
            created_at: timestamp(SystemTime::now()),
        };
        // Recorded before it starts, so a restart finds it and marks it
        // failed instead of forgetting it.
        write_record(&self.layout.images_dir(), &image)?;
        let store = self.clone();
        let name = request.name.clone();
        let expected = request.sha256.as_ref().map(|s| s.to_ascii_lowercase());
        let task = tokio::spawn(async move {
            let result = store.run_import(&name, source, expected).await;
            store.finish_import(&name, result);
        });
        entries.insert(
            request.name.clone(),
            Entry {
                image: image.clone(),
                task: Some(task.abort_handle()),
            },
        );
        drop(entries);
        tracing::info!(image = %image.name, source = %image.source, "import started");
        self.publish(&image);
        Ok(image)
    }

    fn check_request(&self, request: &ImageImport) -> Result<Source, StorageError> {
        let mut errors = match validate_name("name", &request.name) {
            Ok(()) => vec![],
            Err(e) => e.errors,
        };
        let mut field = |f: &str, m: String| {
            errors.push(FieldError {
                field: f.into(),
                message: m,
            })
        };
        if let Some(sum) = &request.sha256 {
            if sum.len() != 64 || !sum.chars().all(|c| c.is_ascii_hexdigit()) {
                field("sha256", "must be 64 hex digits".into());
            }
        }
        let source = match (&request.path, &request.url) {
            (Some(path), None) => match self.check_import_path(path) {
                Ok(real) => Some(Source::File(real)),
                Err(message) => {
                    field("path", message);
                    None
                }
            },
            (None, Some(url)) => match reqwest::Url::parse(url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => {
                    // An address in the URL is checked at once; a name
                    // after its lookup, when the import runs.
                    match self.fetcher.check_literal(&url) {
                        Ok(()) => Some(Source::Url(url)),
                        Err(e) => {
                            field("url", e.to_string());
                            None
                        }
                    }
                }
                Ok(url) => {
                    field(
                        "url",
                        format!("scheme {} is not http or https", url.scheme()),
                    );
                    None
                }
                Err(e) => {
                    field("url", format!("not a URL: {e}"));
                    None
                }
            },
            _ => {
                field("path", "give exactly one of path or url".into());
                None
            }
        };
        match source {
            Some(source) if errors.is_empty() => Ok(source),
            _ => Err(StorageError::Invalid(SpecError { errors })),
        }
    }

    /// A local source must resolve (symlinks included) to a regular file
    /// under the import directory.
    fn check_import_path(&self, path: &Path) -> Result<PathBuf, String> {
        if !path.is_absolute() {
            return Err("must be an absolute path".into());
        }
        let root = std::fs::canonicalize(&self.import_dir).map_err(|e| {
            format!(
                "the import directory {} is unusable: {e}",
                self.import_dir.display()
            )
        })?;
        let real = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !real.starts_with(&root) {
            // Say exactly how to get it in: the daemon reads local files
            // from its import directory only.
            return Err(format!(
                "{} is outside the import directory {root}: copy it there \
                 (`cp {} {root}/`) and import that copy, or import it from a URL",
                path.display(),
                path.display(),
                root = root.display()
            ));
        }
        if !real.is_file() {
            return Err(format!("{} is not a regular file", path.display()));
        }
        Ok(real)
    }

    async fn run_import(
        &self,
        name: &str,
        source: Source,
        expected_sha256: Option<String>,
    ) -> Result<Image, StorageError> {
        let tmp_root = self.layout.import_tmp_dir();
        let scratch = TmpDir(tmp_root.join(format!("{name}-{}", uuid::Uuid::new_v4())));
        create_private_dir(&scratch.0).map_err(|e| StorageError::io("creating", &scratch.0, e))?;
        let raw = scratch.0.join("source");
        let source_sha256 = match &source {
            Source::File(path) => self.copy_file(name, path, &raw).await?,
            Source::Url(url) => self.download(name, url, &raw).await?,
        };
        if let Some(expected) = expected_sha256 {
            if expected != source_sha256 {
                return Err(StorageError::Refused(format!(
                    "sha256 checksum mismatch: expected {expected}, the source has {source_sha256}"
                )));
            }
        }
        self.set_progress(name, ImportPhase::Convert, None);
        // Before qemu-img opens it: opening a qcow2 with an external data
        // file would open that file too.
        if let Some(why) =
            qcow2_header_refusal(&raw).map_err(|e| StorageError::io("reading", &raw, e))?
        {
            return Err(StorageError::Refused(why));
        }
        // Probed once, under limits: the file is only inspected, then
        // converted from the format found (named explicitly from now on),
        // never handed to a guest as is.
        let info = self.qemu_img.info_untrusted(&raw, None).await?;
        if !IMPORT_FORMATS.contains(&info.format.as_str()) {
            return Err(StorageError::Refused(format!(
                "format {} is not importable ({})",
                info.format,
                IMPORT_FORMATS.join(", ")
            )));
        }
        if let Some(backing) = &info.backing_filename {
            return Err(StorageError::Refused(format!(
                "the image has a backing file ({backing}); import a flattened image (qemu-img convert)"
            )));
        }
        let external = info.external_files(&raw);
        if !external.is_empty() {
            return Err(StorageError::Refused(format!(
                "the image refers to other files ({}); import a self-contained image",
                external.join(", ")
            )));
        }
        if info.virtual_size > self.max_virtual_bytes {
            return Err(StorageError::Refused(format!(
                "the virtual size of {} bytes is larger than the limit of {} bytes ([images] max_virtual_bytes)",
                info.virtual_size, self.max_virtual_bytes
            )));
        }
        let converted = scratch.0.join("image.qcow2");
        self.qemu_img
            .convert_untrusted_to_qcow2(&raw, &info.format, &converted, self.convert_timeout)
            .await?;
        let _ = std::fs::remove_file(&raw);
        let stored = self
            .qemu_img
            .info_untrusted(&converted, Some("qcow2"))
            .await?;
        // qemu-img creates files by the umask and does not sync them.
        std::fs::File::open(&converted)
            .and_then(|f| {
                f.set_permissions(private_file())?;
                f.sync_all()
            })
            .map_err(|e| StorageError::io("syncing", &converted, e))?;
        let converted_for_hash = converted.clone();
        let sha256 = tokio::task::spawn_blocking(move || sha256_file(&converted_for_hash))
            .await
            .map_err(|e| StorageError::Failed(e.to_string()))?
            .map_err(|e| StorageError::io("hashing", &converted, e))?;
        let mut image = self.get(name)?;
        image.status = ImageStatus::Ready;
        image.source_format = Some(info.format.clone());
        image.virtual_size = Some(stored.virtual_size);
        image.actual_size = stored.actual_size;
        image.sha256 = Some(sha256);
        image.source_sha256 = Some(source_sha256);
        image.progress = None;
        image.error = None;
        // The file first (made durable by syncing the directory), then the
        // record saying ready: a restart in between finds an `importing`
        // record, removes the file and marks the import failed.
        let dir = self.layout.images_dir();
        let target = self.layout.image_file(name);
        let placed = std::fs::rename(&converted, &target)
            .and_then(|()| sync_dir(&dir))
            .map_err(|e| StorageError::io("renaming into place", &target, e))
            .and_then(|()| write_record(&dir, &image));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&target);
            return Err(e);
        }
        Ok(image)
    }

    fn finish_import(&self, name: &str, result: Result<Image, StorageError>) {
        let image = {
            let mut entries = self.entries.lock().unwrap();
            let Some(entry) = entries.get_mut(name) else {
                // Deleted while it finished: nothing may stay behind.
                if result.is_ok() {
                    let _ = std::fs::remove_file(self.layout.image_file(name));
                    let _ = std::fs::remove_file(self.layout.image_meta(name));
                }
                return;
            };
            entry.task = None;
            match result {
                Ok(image) => {
                    tracing::info!(image = %name, "import finished");
                    entry.image = image;
                }
                Err(e) => {
                    tracing::warn!(image = %name, error = %e, "import failed");
                    entry.image.status = ImageStatus::Failed;
                    entry.image.progress = None;
                    entry.image.error = Some(e.to_string());
                    if let Err(e) = write_record(&self.layout.images_dir(), &entry.image) {
                        tracing::error!(image = %name, error = %e, "recording the failed import");
                    }
                }
            }
            entry.image.clone()
        };
        self.publish(&image);
    }

    /// Deletes image `name` (which no VM may use: the caller checks), or
    /// cancels its import.
    pub fn delete(&self, name: &str) -> Result<(), StorageError> {
        let mut entries = self.entries.lock().unwrap();
        let Some(entry) = entries.get(name) else {
            return Err(StorageError::NotFound(format!("image {name}")));
        };
        if let Some(task) = &entry.task {
            task.abort();
        }
        if entry.image.status == ImageStatus::Ready {
            let file = self.layout.image_file(name);
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io("removing", &file, e)),
            }
        }
        let _ = std::fs::remove_file(self.layout.image_meta(name));
        entries.remove(name);
        drop(entries);
        tracing::info!(image = %name, "deleted");
        self.events.image_deleted(name);
        Ok(())
    }

    async fn copy_file(&self, name: &str, src: &Path, dst: &Path) -> Result<String, StorageError> {
        let mut input = tokio::fs::File::open(src)
            .await
            .map_err(|e| StorageError::io("opening", src, e))?;
        let total = input.metadata().await.ok().map(|m| m.len());
        let limit = self.fetcher.limits().max_bytes;
        if total.is_some_and(|t| t > limit) {
            return Err(StorageError::Refused(format!(
                "{} is larger than the limit of {limit} bytes ([images] import_max_bytes)",
                src.display()
            )));
        }
        let mut sink = Sink::create(self, name, dst, total).await?;
        let mut buf = vec![0u8; 1024 * 1024];
        loop {
            let n = input
                .read(&mut buf)
                .await
                .map_err(|e| StorageError::io("reading", src, e))?;
            if n == 0 {
                break;
            }
            sink.write(&buf[..n]).await?;
            // The file may grow while it is read.
            if sink.done > limit {
                return Err(StorageError::Refused(format!(
                    "{} is larger than the limit of {limit} bytes ([images] import_max_bytes)",
                    src.display()
                )));
            }
        }
        sink.finish().await
    }

    /// Downloads `url` to `dst` through the checked [`Fetcher`]; the real
    /// URL is used only for the request, errors show it redacted.
    async fn download(
        &self,
        name: &str,
        url: &reqwest::Url,
        dst: &Path,
    ) -> Result<String, StorageError> {
        let limits = self.fetcher.limits().clone();
        let fetch = async {
            let mut download = self.fetcher.open(url).await?;
            let total = download.content_length();
            let mut sink = Sink::create(self, name, dst, total).await?;
            while let Some(chunk) = download.chunk().await? {
                sink.write(&chunk).await?;
            }
            if let Some(total) = total {
                if sink.done != total {
                    return Err(StorageError::Failed(format!(
                        "could not fetch {}: got {} of {total} bytes",
                        download.shown(),
                        sink.done
                    )));
                }
            }
            sink.finish().await
        };
        match tokio::time::timeout(limits.total_timeout, fetch).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout {
                url: redact(url),
                what: format!(
                    "the download took longer than {} s ([images] import_timeout_s)",
                    limits.total_timeout.as_secs()
                ),
            }
            .into()),
        }
    }

    fn set_progress(&self, name: &str, phase: ImportPhase, done: Option<(u64, Option<u64>)>) {
        let image = {
            let mut entries = self.entries.lock().unwrap();
            let Some(entry) = entries.get_mut(name) else {
                return;
            };
            let progress = entry.image.progress.get_or_insert(ImportProgress {
                phase,
                bytes_done: 0,
                bytes_total: None,
            });
            progress.phase = phase;
            if let Some((bytes_done, bytes_total)) = done {
                progress.bytes_done = bytes_done;
                progress.bytes_total = bytes_total;
            }
            entry.image.clone()
        };
        self.publish(&image);
    }

    fn publish(&self, image: &Image) {
        self.events.image_changed(image);
    }
}

/// Where fetched bytes go: the scratch file, the hash and the progress.
struct Sink<'a> {
    store: &'a ImageStore,
    name: &'a str,
    path: &'a Path,
    file: tokio::fs::File,
    hasher: Sha256,
    done: u64,
    total: Option<u64>,
    last_report: Instant,
}

impl<'a> Sink<'a> {
    async fn create(
        store: &'a ImageStore,
        name: &'a str,
        path: &'a Path,
        total: Option<u64>,
    ) -> Result<Sink<'a>, StorageError> {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(path)
            .await
            .map_err(|e| StorageError::io("creating", path, e))?;
        store.set_progress(name, ImportPhase::Fetch, Some((0, total)));
        Ok(Sink {
            store,
            name,
            path,
            file,
            hasher: Sha256::new(),
            done: 0,
            total,
            last_report: Instant::now(),
        })
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        self.file
            .write_all(bytes)
            .await
            .map_err(|e| StorageError::io("writing", self.path, e))?;
        self.hasher.update(bytes);
        self.done += bytes.len() as u64;
        if self.last_report.elapsed() >= PROGRESS_INTERVAL {
            self.last_report = Instant::now();
            self.store
                .set_progress(self.name, ImportPhase::Fetch, Some((self.done, self.total)));
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<String, StorageError> {
        // tokio's File writes in the background: only flush reports an
        // error of the last write (sync_all drops it).
        self.file
            .flush()
            .await
            .map_err(|e| StorageError::io("writing", self.path, e))?;
        self.file
            .sync_all()
            .await
            .map_err(|e| StorageError::io("syncing", self.path, e))?;
        self.store.set_progress(
            self.name,
            ImportPhase::Fetch,
            Some((self.done, self.total.or(Some(self.done)))),
        );
        Ok(hex(&self.hasher.finalize()))
    }
}

/// Creates `dir` (and missing parents) with mode 0700.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

fn private_file() -> std::fs::Permissions {
    std::fs::Permissions::from_mode(FILE_MODE)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    persist::sync_dir(dir).map_err(|e| e.source)
}

/// Writes `image`'s record (`NAME.json`, mode 0600) atomically and durably.
fn write_record(dir: &Path, image: &Image) -> Result<(), StorageError> {
    let name = format!("{}.json", image.name);
    let mut bytes = serde_json::to_vec_pretty(image).expect("an Image serializes");
    bytes.push(b'\n');
    persist::write_atomically(dir, &name, &bytes)
        .map_err(|e| StorageError::io("writing", &dir.join(&name), e.source))
}

/// SHA-256 of a file, as hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::Permissions;

    fn record(name: &str, status: ImageStatus) -> Image {
        Image {
            name: name.into(),
            status,
            source: "/import/x.raw".into(),
            source_format: None,
            format: "qcow2".into(),
            virtual_size: None,
            actual_size: None,
            sha256: None,
            source_sha256: None,
            progress: Some(ImportProgress {
                phase: ImportPhase::Convert,
                bytes_done: 5,
                bytes_total: Some(5),
            }),
            error: None,
            created_at: "2024-01-01T00:00:00Z".into(),
        }
    }

    /// A kill -9 after the converted file was renamed in but before the
    /// record said ready (or at any earlier point): the restart finds an
    /// `importing` record, fails it and removes the unverified file and the
    /// scratch space; a ready image keeps its file, made private.
    #[test]
    fn opening_fails_interrupted_imports_and_removes_their_files() {
        let state = tempfile::tempdir().unwrap();
        let layout = Layout::new(state.path());
        let dir = layout.images_dir();
        std::fs::create_dir_all(layout.import_tmp_dir().join("half-abc")).unwrap();
        std::fs::write(layout.import_tmp_dir().join("half-abc/source"), b"x").unwrap();
        write_record(&dir, &record("half", ImageStatus::Importing)).unwrap();
        std::fs::write(layout.image_file("half"), b"unverified").unwrap();
        let mut ready = record("done", ImageStatus::Ready);
        ready.progress = None;
        write_record(&dir, &ready).unwrap();
        std::fs::write(layout.image_file("done"), b"qcow2").unwrap();
        std::fs::set_permissions(layout.image_file("done"), Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();

        let store = ImageStore::open(
            layout.clone(),
            QemuImg::new(Path::new("qemu-img")),
            state.path().join("import"),
            &ImageSettings::default(),
            Arc::new(crate::storage::Unobserved),
        )
        .unwrap();
        let half = store.get("half").unwrap();
        assert_eq!(half.status, ImageStatus::Failed);
        assert_eq!(half.error.as_deref(), Some(INTERRUPTED));
        assert_eq!(half.progress, None);
        assert!(!layout.image_file("half").exists());
        assert!(!layout.import_tmp_dir().exists());
        // The failure is recorded on disk, not only in memory.
        let on_disk: Image =
            serde_json::from_slice(&std::fs::read(layout.image_meta("half")).unwrap()).unwrap();
        assert_eq!(on_disk, half);
        assert_eq!(store.get("done").unwrap().status, ImageStatus::Ready);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&layout.image_file("done")), 0o600);
        assert_eq!(mode(&layout.image_meta("half")), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&state.path().join("import")), 0o700);
    }
}
