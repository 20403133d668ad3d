//! `vmlet image …` and `vmlet volume …`: the daemon's image store and named
//! volumes, an import's progress (a bar redrawn on a terminal, plain lines
//! otherwise), and how images and volumes are rendered.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{
    bytes, columns, key_values, mib, opt_bytes, shown, shown_list, unless_json, write_flush,
    CliError, ClientOptions, Output,
};
use crate::client::Client;
use crate::storage::images::{Image, ImageImport, ImageStatus, ImportPhase, ImportProgress};
use crate::storage::volumes::{Volume, VolumeCreate};

/// How often `image import` asks the daemon how the import is going.
const IMPORT_POLL: Duration = Duration::from_millis(200);
/// How often `image import` prints a progress line when stderr is not a
/// terminal (and at each phase change).
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Cells of the progress bar drawn on a terminal.
const BAR_WIDTH: usize = 30;

/// `vmlet image …`: the daemon's image store.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum ImageCommand {
    /// List every image (failed imports too, until deleted).
    List,
    /// Show one image.
    Show {
        /// The image's name.
        name: String,
    },
    /// Import an image (raw, qcow2, vmdk, vdi or vhdx; stored as qcow2) and
    /// follow the import until it is ready. Ctrl-C stops following; the
    /// import goes on (`vmlet image delete` cancels it).
    #[command(group(clap::ArgGroup::new("source").required(true).args(["file", "from_url"])))]
    Import {
        /// The image's name.
        name: String,
        /// A file under the daemon's import directory (VMLET_IMPORT_DIR).
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// An http(s) URL the daemon downloads (`--url` names the daemon).
        #[arg(long, value_name = "URL")]
        from_url: Option<String>,
        /// Expected SHA-256 of the source file (hex).
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// Return once the import has started.
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete an image, or cancel its import (refused while a VM uses it).
    Delete {
        /// The image's name.
        name: String,
    },
}

/// `vmlet volume …`: the daemon's named volumes.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum VolumeCommand {
    /// List every volume.
    List,
    /// Show one volume.
    Show {
        /// The volume's name.
        name: String,
    },
    /// Create a volume: blank (--size-mib), or a full copy of an image
    /// (--image, grown to --size-mib when given).
    Create {
        /// The volume's name.
        name: String,
        /// Size in MiB.
        #[arg(long, value_name = "N")]
        size_mib: Option<u64>,
        /// Copy this (ready) image.
        #[arg(long, value_name = "IMAGE")]
        image: Option<String>,
    },
    /// Grow a volume (online when its VM runs); it never shrinks.
    Resize {
        /// The volume's name.
        name: String,
        /// New size in MiB.
        #[arg(long, value_name = "N")]
        size_mib: u64,
    },
    /// Delete a volume (refused while a VM uses it).
    Delete {
        /// The volume's name.
        name: String,
    },
}

/// Runs `vmlet image CMD`, printing to `out`. An import's progress goes to
/// standard error: a bar redrawn in place on a terminal, a line every few
/// seconds otherwise.
pub async fn run_image(
    cmd: ImageCommand,
    opts: &ClientOptions,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let client = opts.client()?;
    let json = opts.output == Output::Json;
    let text = match cmd {
        ImageCommand::List => {
            let images = client.list_images().await?;
            shown_list(json, "images", &images, render_image_list)
        }
        ImageCommand::Show { name } => shown(json, &client.get_image(&name).await?, render_image),
        ImageCommand::Import {
            name,
            file,
            from_url,
            sha256,
            no_wait,
        } => {
            // The daemon wants an absolute path; a relative one is taken
            // from here.
            let path = file.map(|p| std::path::absolute(&p).unwrap_or(p));
            let request = ImageImport {
                name,
                path,
                url: from_url,
                sha256,
            };
            let image = client.import_image(&request).await?;
            let image = if no_wait {
                image
            } else {
                let stderr = std::io::stderr();
                let tty = stderr.is_terminal();
                let mut progress = ProgressView::new(stderr.lock(), tty);
                let result = follow_import(&client, image, &mut progress).await;
                progress.finish();
                result?
            };
            shown(json, &image, |image| {
                if image.status == ImageStatus::Importing {
                    format!(
                        "importing image {} from {} (follow it with `vmlet image show {}`)\n",
                        image.name, image.source, image.name
                    )
                } else {
                    format!("imported image {}: {}\n", image.name, image_summary(image))
                }
            })
        }
        ImageCommand::Delete { name } => {
            client.delete_image(&name).await?;
            unless_json(json, || format!("deleted image {name}\n"))
        }
    };
    write_flush(out, &text)
}

/// Polls `image` until its import ends: `Ok` with the ready image, or the
/// image's error. Progress is shown on `view`.
async fn follow_import(
    client: &Client,
    mut image: Image,
    view: &mut ProgressView<impl Write>,
) -> Result<Image, CliError> {
    let name = image.name.clone();
    let created_at = image.created_at.clone();
    loop {
        match image.status {
            ImageStatus::Ready => return Ok(image),
            ImageStatus::Failed => {
                return Err(CliError::ImportFailed {
                    name,
                    error: image.error.unwrap_or_else(|| "no reason given".into()),
                })
            }
            ImageStatus::Importing => view.update(&image),
        }
        tokio::time::sleep(IMPORT_POLL).await;
        image = match client.get_image(&name).await {
            Err(e) if e.status() == Some(404) => return Err(CliError::ImageGone { name }),
            other => other?,
        };
        // Deleted and imported again between two looks: not ours any more.
        if image.created_at != created_at {
            return Err(CliError::ImageGone { name });
        }
    }
}

/// What makes a plain progress line due at once when it changes: the
/// phase and the source size.
type PlainKey = Option<(ImportPhase, Option<u64>)>;

/// Shows an import's progress: a bar redrawn in place on a terminal, or a
/// plain line at each phase change and every few seconds.
struct ProgressView<W: Write> {
    out: W,
    tty: bool,
    /// When the last plain line was printed, with its phase and total.
    last_line: Option<(Instant, PlainKey)>,
    /// Whether a bar is on screen.
    drawn: bool,
}

impl<W: Write> ProgressView<W> {
    fn new(out: W, tty: bool) -> Self {
        ProgressView {
            out,
            tty,
            last_line: None,
            drawn: false,
        }
    }

    /// Shows `image`'s progress (write errors are ignored: progress is
    /// only a courtesy).
    fn update(&mut self, image: &Image) {
        let progress = image.progress.as_ref();
        if self.tty {
            let bar = progress_bar(&image.name, progress, BAR_WIDTH);
            let _ = write!(self.out, "\r{bar}\x1b[K");
            self.drawn = true;
        } else {
            // A new phase or a size now known is worth a line at once.
            let key = progress.map(|p| (p.phase, p.bytes_total));
            let due = match self.last_line {
                None => true,
                Some((at, last)) => last != key || at.elapsed() >= PLAIN_PROGRESS_EVERY,
            };
            if !due {
                return;
            }
            self.last_line = Some((Instant::now(), key));
            let _ = writeln!(self.out, "{}", progress_line(&image.name, progress));
        }
        let _ = self.out.flush();
    }

    /// Clears the bar, so what follows starts on a clean line.
    fn finish(&mut self) {
        if self.drawn {
            let _ = write!(self.out, "\r\x1b[K");
            let _ = self.out.flush();
            self.drawn = false;
        }
    }
}

/// Runs `vmlet volume CMD`, printing to `out`.
pub async fn run_volume(
    cmd: VolumeCommand,
    opts: &ClientOptions,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let client = opts.client()?;
    let json = opts.output == Output::Json;
    let text = match cmd {
        VolumeCommand::List => {
            let volumes = client.list_volumes().await?;
            shown_list(json, "volumes", &volumes, render_volume_list)
        }
        VolumeCommand::Show { name } => {
            shown(json, &client.get_volume(&name).await?, render_volume)
        }
        VolumeCommand::Create {
            name,
            size_mib,
            image,
        } => {
            let volume = client
                .create_volume(&VolumeCreate {
                    name,
                    size_mib,
                    image: image.clone(),
                })
                .await?;
            shown(json, &volume, |volume| {
                let from = image.map_or(String::new(), |i| format!(" from image {i}"));
                format!(
                    "created volume {}{from}: {}\n",
                    volume.name,
                    mib(volume.size_mib)
                )
            })
        }
        VolumeCommand::Resize { name, size_mib } => {
            let volume = client.resize_volume(&name, size_mib).await?;
            shown(json, &volume, |volume| {
                format!(
                    "resized volume {} to {}\n",
                    volume.name,
                    mib(volume.size_mib)
                )
            })
        }
        VolumeCommand::Delete { name } => {
            client.delete_volume(&name).await?;
            unless_json(json, || format!("deleted volume {name}\n"))
        }
    };
    write_flush(out, &text)
}

/// `NAME status=…` and the progress, the sizes or the error.
pub(super) fn image_line(image: &Image) -> String {
    let mut line = format!("{} status={}", image.name, image.status.as_str());
    match image.status {
        ImageStatus::Importing => {
            line.push(' ');
            line.push_str(&progress_detail(image.progress.as_ref()));
        }
        ImageStatus::Ready => {
            line.push_str(&format!(
                " size={} allocated={}",
                opt_bytes(image.virtual_size),
                opt_bytes(image.actual_size)
            ));
        }
        ImageStatus::Failed => {}
    }
    if let Some(error) = &image.error {
        line.push_str(&format!(" error={error:?}"));
    }
    line
}

/// `NAME size=… allocated=… attached_to=VM/DISK`.
pub(super) fn volume_line(volume: &Volume) -> String {
    format!(
        "{} size={} allocated={} attached_to={}",
        volume.name,
        mib(volume.size_mib),
        opt_bytes(volume.actual_size),
        attachment_str(volume)
    )
}

fn attachment_str(volume: &Volume) -> String {
    volume
        .attached_to
        .as_ref()
        .map_or("-".to_string(), |a| format!("{}/{}", a.vm_name, a.disk))
}

/// Where an import is: `fetch 45% 12.5MiB/27.8MiB`, `fetch 12.5MiB` (size
/// unknown), `convert 100% 27.8MiB/27.8MiB`.
pub fn progress_detail(progress: Option<&ImportProgress>) -> String {
    let Some(p) = progress else {
        return "starting".to_string();
    };
    match p.bytes_total {
        Some(total) => format!(
            "{} {}% {}/{}",
            p.phase.as_str(),
            percent(p.bytes_done, total),
            bytes(p.bytes_done),
            bytes(total)
        ),
        None => format!("{} {}", p.phase.as_str(), bytes(p.bytes_done)),
    }
}

/// `done` of `total` in whole percent, 0 to 100 (an empty source is done).
fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        100
    } else {
        (u128::from(done.min(total)) * 100 / u128::from(total)) as u64
    }
}

/// One frame of the import progress bar (no `\r`, no newline):
/// `NAME [#########---------]  45%  12.5MiB/27.8MiB  fetch`. The bar has
/// `width` cells; with the size unknown it stays empty and the percentage
/// is `--`.
pub fn progress_bar(name: &str, progress: Option<&ImportProgress>, width: usize) -> String {
    let (filled, pct, amount, phase) = match progress {
        None => (0, "--".to_string(), String::new(), "starting"),
        Some(p) => match p.bytes_total {
            Some(total) => {
                let pct = percent(p.bytes_done, total);
                (
                    (pct as usize * width) / 100,
                    format!("{pct}%"),
                    format!("{}/{}", bytes(p.bytes_done), bytes(total)),
                    p.phase.as_str(),
                )
            }
            None => (0, "--".to_string(), bytes(p.bytes_done), p.phase.as_str()),
        },
    };
    let bar = super::bar(filled, width);
    let mut line = format!("{name} [{bar}] {pct:>4}");
    if !amount.is_empty() {
        line.push_str("  ");
        line.push_str(&amount);
    }
    line.push_str("  ");
    line.push_str(phase);
    line
}

/// One line of import progress for a log: `importing NAME: fetch 45% …`.
pub fn progress_line(name: &str, progress: Option<&ImportProgress>) -> String {
    format!("importing {name}: {}", progress_detail(progress))
}

/// A ready image in a few words: `64MiB (qcow2 from raw, 196KiB
/// allocated)`: the format it is stored in, then the source's.
fn image_summary(image: &Image) -> String {
    let from = image
        .source_format
        .as_deref()
        .map_or(String::new(), |f| format!(" from {f}"));
    format!(
        "{} ({}{from}, {} allocated)",
        opt_bytes(image.virtual_size),
        image.format,
        opt_bytes(image.actual_size)
    )
}

/// `image list` as aligned columns: importing images show their
/// progress, failed ones their error.
pub fn render_image_list(images: &[Image]) -> String {
    let header = ["NAME", "STATUS", "SIZE", "ALLOCATED", "FORMAT", "DETAIL"];
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|image| {
            vec![
                image.name.clone(),
                image.status.as_str().to_string(),
                opt_bytes(image.virtual_size),
                opt_bytes(image.actual_size),
                // What VMs get: the stored format (`image show` has the
                // source's).
                image.format.clone(),
                match image.status {
                    ImageStatus::Importing => progress_detail(image.progress.as_ref()),
                    _ => image.error.clone().unwrap_or_default(),
                },
            ]
        })
        .collect();
    columns(&header, &rows)
}

/// `image show` as `key: value` lines.
pub fn render_image(image: &Image) -> String {
    let mut lines: Vec<(String, String)> = vec![
        ("name".into(), image.name.clone()),
        ("status".into(), image.status.as_str().into()),
    ];
    if let Some(error) = &image.error {
        lines.push(("error".into(), error.clone()));
    }
    if image.status == ImageStatus::Importing {
        lines.push(("progress".into(), progress_detail(image.progress.as_ref())));
    }
    lines.push(("source".into(), image.source.clone()));
    lines.push((
        "format".into(),
        match &image.source_format {
            Some(from) => format!("{} (imported from {from})", image.format),
            None => image.format.clone(),
        },
    ));
    lines.push(("size".into(), opt_bytes(image.virtual_size)));
    lines.push(("allocated".into(), opt_bytes(image.actual_size)));
    lines.push((
        "sha256".into(),
        image.sha256.clone().unwrap_or_else(|| "-".into()),
    ));
    lines.push((
        "source sha256".into(),
        image.source_sha256.clone().unwrap_or_else(|| "-".into()),
    ));
    lines.push(("created".into(), image.created_at.clone()));
    key_values(&lines)
}

/// `volume list` as aligned columns.
pub fn render_volume_list(volumes: &[Volume]) -> String {
    let header = ["NAME", "SIZE", "ALLOCATED", "ATTACHED TO"];
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                mib(v.size_mib),
                opt_bytes(v.actual_size),
                attachment_str(v),
            ]
        })
        .collect();
    columns(&header, &rows)
}

/// `volume show` as `key: value` lines.
pub fn render_volume(volume: &Volume) -> String {
    let lines: Vec<(String, String)> = vec![
        ("name".into(), volume.name.clone()),
        ("size".into(), mib(volume.size_mib)),
        ("allocated".into(), opt_bytes(volume.actual_size)),
        ("format".into(), volume.format.clone()),
        (
            "attached to".into(),
            match &volume.attached_to {
                Some(a) => format!("VM {} ({}) as {}", a.vm_name, a.vm, a.disk),
                None => "-".into(),
            },
        ),
        ("created".into(), volume.created_at.clone()),
    ];
    key_values(&lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::fixtures::{fetch, image, ready_image, volume};
    use uuid::Uuid;

    #[test]
    fn progress_bar_frames() {
        let p = fetch(12 << 20, Some(40 << 20));
        assert_eq!(
            progress_bar("debian", Some(&p), 20),
            "debian [######--------------]  30%  12MiB/40MiB  fetch"
        );
        let done = ImportProgress {
            phase: ImportPhase::Convert,
            ..fetch(40 << 20, Some(40 << 20))
        };
        assert_eq!(
            progress_bar("debian", Some(&done), 10),
            "debian [##########] 100%  40MiB/40MiB  convert"
        );
        // A download of unknown size: an empty bar and the bytes so far.
        assert_eq!(
            progress_bar("web", Some(&fetch(1536, None)), 4),
            "web [----]   --  1.5KiB  fetch"
        );
        assert_eq!(progress_bar("web", None, 4), "web [----]   --  starting");
        // An empty source is complete; more than the total does not overflow.
        assert_eq!(
            progress_bar("e", Some(&fetch(0, Some(0))), 4),
            "e [####] 100%  0B/0B  fetch"
        );
        assert_eq!(
            progress_bar("e", Some(&fetch(9, Some(3))), 4),
            "e [####] 100%  9B/3B  fetch"
        );
        assert_eq!(
            progress_line("debian", Some(&p)),
            "importing debian: fetch 30% 12MiB/40MiB"
        );
        assert_eq!(
            progress_line("web", Some(&fetch(5 << 20, None))),
            "importing web: fetch 5MiB"
        );
    }

    #[test]
    fn progress_view_draws_in_place_on_a_terminal_and_lines_otherwise() {
        let mut importing = image("deb", ImageStatus::Importing);
        importing.progress = Some(fetch(1 << 20, Some(2 << 20)));
        let mut view = ProgressView::new(Vec::new(), true);
        view.update(&importing);
        view.update(&importing);
        view.finish();
        let text = String::from_utf8(view.out).unwrap();
        let frame = format!(
            "\r{}\x1b[K",
            progress_bar("deb", importing.progress.as_ref(), BAR_WIDTH)
        );
        assert_eq!(text, format!("{frame}{frame}\r\x1b[K"));

        let mut view = ProgressView::new(Vec::new(), false);
        importing.progress = Some(fetch(0, None));
        view.update(&importing);
        // Within the interval, same phase and size: nothing new.
        importing.progress = Some(fetch(1024, None));
        view.update(&importing);
        // The size became known: a line at once.
        importing.progress = Some(fetch(1 << 20, Some(2 << 20)));
        view.update(&importing);
        view.update(&importing);
        importing.progress.as_mut().unwrap().phase = ImportPhase::Convert;
        view.update(&importing);
        view.finish();
        assert_eq!(
            String::from_utf8(view.out).unwrap(),
            "importing deb: fetch 0B\n\
             importing deb: fetch 50% 1MiB/2MiB\n\
             importing deb: convert 50% 1MiB/2MiB\n"
        );
    }

    #[test]
    fn image_list_shows_progress_and_errors() {
        let mut importing = image("fedora", ImageStatus::Importing);
        importing.progress = Some(fetch(300 << 20, Some(1200 << 20)));
        let mut failed = image("broken", ImageStatus::Failed);
        failed.error = Some("sha256: checksum mismatch".into());
        let text = render_image_list(&[ready_image("debian"), importing, failed]);
        let expected = "\
NAME    STATUS     SIZE   ALLOCATED  FORMAT  DETAIL
debian  ready      64MiB  196KiB     qcow2
fedora  importing  -      -          qcow2   fetch 25% 300MiB/1.2GiB
broken  failed     -      -          qcow2   sha256: checksum mismatch
";
        assert_eq!(text, expected);
        assert_eq!(
            render_image_list(&[]),
            "NAME  STATUS  SIZE  ALLOCATED  FORMAT  DETAIL\n"
        );
    }

    #[test]
    fn image_show_is_key_values() {
        let expected = format!(
            "\
name:          debian
status:        ready
source:        /srv/import/debian.raw
format:        qcow2 (imported from raw)
size:          64MiB
allocated:     196KiB
sha256:        {}
source sha256: {}
created:       2024-05-01T10:00:00.000Z
",
            "ab".repeat(32),
            "cd".repeat(32)
        );
        assert_eq!(render_image(&ready_image("debian")), expected);
        let mut importing = image("fedora", ImageStatus::Importing);
        importing.progress = Some(fetch(0, None));
        let text = render_image(&importing);
        assert!(text.contains("progress:      fetch 0B\n"), "{text}");
        assert!(text.contains("size:          -\n"), "{text}");
    }

    #[test]
    fn volume_list_and_show() {
        let mut attached = volume("data", 2048);
        attached.attached_to = Some(crate::storage::volumes::VolumeAttachment {
            vm: Uuid::from_u128(1),
            vm_name: "web".into(),
            disk: "disk1".into(),
        });
        let text = render_volume_list(&[attached.clone(), volume("scratch", 100)]);
        let expected = "\
NAME     SIZE    ALLOCATED  ATTACHED TO
data     2GiB    192KiB     web/disk1
scratch  100MiB  192KiB     -
";
        assert_eq!(text, expected);
        let expected = "\
name:        data
size:        2GiB
allocated:   192KiB
format:      qcow2
attached to: VM web (00000000-0000-0000-0000-000000000001) as disk1
created:     2024-05-01T10:00:00.000Z
";
        assert_eq!(render_volume(&attached), expected);
    }
}
