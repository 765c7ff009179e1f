//! `keydrop-load disk`: how long a small append followed by `fdatasync` takes on the
//! filesystem of a node's data folder, alone and while another file there is deleted.
//!
//! Every order's answer waits for the journal's fsync, so the first figure is the
//! floor under an order's latency. The deletion phases are there for what they found
//! on ext4 mounted with online `discard`: deleting a file trims its blocks in the next
//! journal commit, and the next fsync of every writer on that filesystem waits for
//! it. RocksDB deletes its obsolete table files (64 MiB each) after a compaction, and
//! any other service on the disk deletes its own; deleting the same bytes a chunk at a
//! time spreads the trim over many commits.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Args;
use rand::RngCore;
use serde::Serialize;

use crate::stats::{format_us, new_histogram, write_json, Percentiles};

/// Appends one probe phase may make, whatever the disk's speed.
const APPENDS_PER_PHASE_MAX: u64 = 1_000_000;
/// Time the probe runs before the deletion starts, and on after it ends, so the
/// phase sees the disk on both sides of it.
const AROUND_DELETION: Duration = Duration::from_millis(500);
/// Pause between two chunks of a chunked deletion.
const CHUNK_PAUSE: Duration = Duration::from_millis(50);
const MIB: u64 = 1 << 20;

#[derive(Args, Debug, Clone)]
pub struct DiskArgs {
    /// A folder on the filesystem to probe, such as a node's data folder. The probe
    /// writes in a temporary folder inside it and removes it at the end.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Seconds of appends in each phase (at least; a deletion phase also runs
    /// 0.5 s on each side of the deletion).
    #[arg(long, default_value_t = 3.0)]
    pub secs: f64,
    /// Bytes per append: about a journal group commit of 20 orders.
    #[arg(long, default_value_t = 2048)]
    pub append_bytes: usize,
    /// Size of the file deleted in the second and third phases, in MiB; 0 skips them.
    #[arg(long, default_value_t = 256)]
    pub delete_mib: u64,
    /// Chunk of the third phase's deletion, in MiB: the file is truncated by this
    /// much at a time, each step synced, 50 ms apart.
    #[arg(long, default_value_t = 8)]
    pub chunk_mib: u64,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub dir: String,
    /// The mount the folder is on, from /proc/self/mountinfo, when it could be read.
    pub mount: Option<Mount>,
    pub append_bytes: usize,
    pub phases: Vec<Phase>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    pub mount_point: String,
    pub fs_type: String,
    pub source: String,
    pub options: String,
    /// `discard` among the mount's or the filesystem's options: deletions trim
    /// synchronously with the journal commit.
    pub online_discard: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: String,
    /// Latency of one append and its `fdatasync`, in µs.
    pub append_sync: Percentiles,
    /// How long the deletion took, for the deletion phases.
    pub deletion_us: Option<u64>,
}

/// How a phase deletes its file while the appends run.
#[derive(Debug, Clone, Copy)]
enum Deletion {
    None,
    AtOnce { bytes: u64 },
    Chunked { bytes: u64, chunk_bytes: u64 },
}

pub fn main(args: DiskArgs) -> Result<()> {
    let report = run(&args)?;
    print(&report);
    if let Some(path) = &args.json {
        write_json(&path.to_string_lossy(), &report)?;
    }
    Ok(())
}

pub fn run(args: &DiskArgs) -> Result<DiskReport> {
    ensure!(
        args.secs.is_finite() && args.secs > 0.0 && args.secs <= 600.0,
        "--secs must be more than 0 and at most 600: {}",
        args.secs
    );
    ensure!(
        (1..=MIB as usize).contains(&args.append_bytes),
        "--append-bytes must be from 1 to {MIB}: {}",
        args.append_bytes
    );
    ensure!(args.chunk_mib >= 1, "--chunk-mib must be at least 1");
    ensure!(
        args.delete_mib <= 64 * 1024,
        "--delete-mib must be at most 65536"
    );
    let base =
        fs::canonicalize(&args.dir).with_context(|| format!("no folder {}", args.dir.display()))?;
    let work = tempfile::Builder::new()
        .prefix("keydrop-disk-probe.")
        .tempdir_in(&base)
        .with_context(|| format!("creating a folder in {}", base.display()))?;
    let secs = Duration::from_secs_f64(args.secs);

    let mut phases = vec![probe_phase(
        work.path(),
        "alone",
        args.append_bytes,
        secs,
        Deletion::None,
    )?];
    if args.delete_mib > 0 {
        let size = format!("{} MiB", args.delete_mib);
        phases.push(probe_phase(
            work.path(),
            &format!("while {size} is deleted at once"),
            args.append_bytes,
            secs,
            Deletion::AtOnce {
                bytes: args.delete_mib * MIB,
            },
        )?);
        phases.push(probe_phase(
            work.path(),
            &format!("while {size} is deleted {} MiB at a time", args.chunk_mib),
            args.append_bytes,
            secs,
            Deletion::Chunked {
                bytes: args.delete_mib * MIB,
                chunk_bytes: args.chunk_mib * MIB,
            },
        )?);
    }
    let mount = fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|text| mount_of(&base, &text));
    work.close().context("removing the probe's folder")?;
    Ok(DiskReport {
        dir: base.display().to_string(),
        mount,
        append_bytes: args.append_bytes,
        phases,
    })
}

/// One phase: appends with `fdatasync` on a thread of their own for `secs`, while
/// this thread deletes a file as `deletion` says.
fn probe_phase(
    dir: &Path,
    name: &str,
    append_bytes: usize,
    secs: Duration,
    deletion: Deletion,
) -> Result<Phase> {
    let doomed = dir.join("deleted.bin");
    if let Deletion::AtOnce { bytes } | Deletion::Chunked { bytes, .. } = deletion {
        write_synced_file(&doomed, bytes)?;
        // Let the file's own writeback settle, so the phase times the deletion alone.
        std::thread::sleep(AROUND_DELETION);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let appender = {
        let path = dir.join("appended.bin");
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("disk-probe".into())
            .spawn(move || append_until(&path, append_bytes, &stop))
            .context("starting the probe thread")?
    };
    let started = Instant::now();
    let deleted = match deletion {
        Deletion::None => Ok(None),
        Deletion::AtOnce { .. } | Deletion::Chunked { .. } => {
            std::thread::sleep(AROUND_DELETION);
            let deleting = Instant::now();
            delete(&doomed, deletion).map(|()| {
                let took = deleting.elapsed();
                std::thread::sleep(AROUND_DELETION);
                Some(took.as_micros() as u64)
            })
        }
    };
    match secs.checked_sub(started.elapsed()) {
        Some(rest) if deleted.is_ok() => std::thread::sleep(rest),
        _ => {}
    }
    // Stopped before any error is returned: the thread must not outlive the phase.
    stop.store(true, Ordering::Relaxed);
    let appended = appender
        .join()
        .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?;
    let deletion_us = deleted?;
    let histogram = appended?;
    ensure!(!histogram.is_empty(), "no append finished in the phase");
    Ok(Phase {
        name: name.to_string(),
        append_sync: Percentiles::of(&histogram),
        deletion_us,
    })
}

/// Appends `append_bytes` and `fdatasync`s, timing each, until `stop` (or the cap).
fn append_until(
    path: &Path,
    append_bytes: usize,
    stop: &AtomicBool,
) -> Result<hdrhistogram::Histogram<u64>> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let block = vec![0x5a_u8; append_bytes];
    let mut histogram = new_histogram();
    let mut appends = 0;
    while !stop.load(Ordering::Relaxed) && appends < APPENDS_PER_PHASE_MAX {
        let began = Instant::now();
        file.write_all(&block).context("appending")?;
        file.sync_data().context("fdatasync")?;
        histogram.saturating_record(began.elapsed().as_micros().max(1) as u64);
        appends += 1;
    }
    drop(file);
    fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    Ok(histogram)
}

/// Writes the file the phase deletes, 1 MiB of random bytes at a time (random, so no
/// layer below can store it as zeros), and syncs it.
fn write_synced_file(path: &Path, bytes: u64) -> Result<()> {
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut chunk = vec![0u8; MIB as usize];
    rand::thread_rng().fill_bytes(&mut chunk);
    let mut left = bytes;
    while left > 0 {
        let part = left.min(MIB);
        file.write_all(&chunk[..part as usize])
            .context("writing the file to delete")?;
        left -= part;
    }
    file.sync_all().context("syncing the file to delete")
}

fn delete(path: &Path, deletion: Deletion) -> Result<()> {
    match deletion {
        Deletion::None => Ok(()),
        Deletion::AtOnce { .. } => {
            fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
        }
        Deletion::Chunked { chunk_bytes, .. } => {
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            let mut size = file.metadata()?.len();
            while size > 0 {
                size = size.saturating_sub(chunk_bytes);
                file.set_len(size).context("truncating")?;
                file.sync_all().context("syncing the truncation")?;
                std::thread::sleep(CHUNK_PAUSE);
            }
            drop(file);
            fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
        }
    }
}

/// The mount holding `path` (canonical): the entry of /proc/self/mountinfo with the
/// longest mount point that contains it.
pub fn mount_of(path: &Path, mountinfo: &str) -> Option<Mount> {
    mountinfo
        .lines()
        .filter_map(parse_mountinfo_line)
        .filter(|mount| path.starts_with(&mount.mount_point))
        .max_by_key(|mount| mount.mount_point.len())
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`:
/// mount point is field 5, mount options field 6, then optional fields up to `-`,
/// then the filesystem type, the source and the filesystem's own options.
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (before, after) = line.split_once(" - ")?;
    let mut fields = before.split(' ');
    let mount_point = unescape_octal(fields.nth(4)?);
    let mount_options = fields.next()?;
    let mut after = after.split(' ');
    let fs_type = after.next()?.to_string();
    let source = unescape_octal(after.next()?);
    let super_options = after.next().unwrap_or("");
    let online_discard = mount_options
        .split(',')
        .chain(super_options.split(','))
        .any(|option| option == "discard");
    Some(Mount {
        mount_point,
        fs_type,
        source,
        options: format!("{mount_options}; filesystem {super_options}"),
        online_discard,
    })
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match escaped
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok())
        {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn print(report: &DiskReport) {
    println!(
        "{}-byte appends, each followed by fdatasync, in {}",
        report.append_bytes, report.dir
    );
    match &report.mount {
        Some(mount) => println!(
            "  on {} ({} from {}; mount {}){}",
            mount.mount_point,
            mount.fs_type,
            mount.source,
            mount.options,
            if mount.online_discard {
                ": online discard, so a deletion's trim is part of the next journal commit"
            } else {
                ""
            }
        ),
        None => println!("  (mount not found in /proc/self/mountinfo)"),
    }
    for phase in &report.phases {
        let p = &phase.append_sync;
        print!(
            "  {:<40} {:>7} appends  p50 {}  p99 {}  p99.9 {}  max {}",
            phase.name,
            p.count,
            format_us(p.p50_us),
            format_us(p.p99_us),
            format_us(p.p999_us),
            format_us(p.max_us)
        );
        match phase.deletion_us {
            Some(us) => println!("  (deletion took {})", format_us(us)),
            None => println!(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard,resv_strict
25 22 0:21 / /dev/shm rw,nosuid,nodev shared:3 - tmpfs tmpfs rw,size=24683656k
30 22 254:16 / /var/lib/key\\040drop rw,noatime shared:9 - xfs /dev/vdb rw,attr2,inode64
31 22 254:32 / /srv rw,noatime,discard shared:10 master:2 - ext4 /dev/vdc rw
";

    #[test]
    fn finds_the_mount_with_the_longest_prefix_and_its_discard_option() {
        let root = mount_of(Path::new("/var/tmp/x"), MOUNTINFO).unwrap();
        assert_eq!(root.mount_point, "/");
        assert_eq!(root.fs_type, "ext4");
        assert_eq!(root.source, "/dev/vda");
        assert!(
            root.online_discard,
            "discard among the filesystem's options"
        );

        let escaped = mount_of(Path::new("/var/lib/key drop/db"), MOUNTINFO).unwrap();
        assert_eq!(escaped.mount_point, "/var/lib/key drop");
        assert_eq!(escaped.fs_type, "xfs");
        assert!(!escaped.online_discard);

        let optional_fields = mount_of(Path::new("/srv/keydrop"), MOUNTINFO).unwrap();
        assert_eq!(optional_fields.source, "/dev/vdc");
        assert!(
            optional_fields.online_discard,
            "discard among the mount's options"
        );

        // A path component is not a string prefix: /srvx is on /.
        assert_eq!(
            mount_of(Path::new("/srvx"), MOUNTINFO).unwrap().mount_point,
            "/"
        );
        assert_eq!(mount_of(Path::new("/x"), "garbage\n\n"), None);
    }

    #[test]
    fn octal_escapes_are_decoded_and_anything_else_kept() {
        assert_eq!(unescape_octal(r"a\040b\011c\134d"), "a b\tc\\d");
        assert_eq!(unescape_octal(r"trailing\04"), r"trailing\04");
        assert_eq!(unescape_octal(r"not\999octal"), r"not\999octal");
    }

    /// A short probe in `dir`: 512-byte appends, 1 MiB chunks.
    fn quick_probe(dir: &Path, secs: f64, delete_mib: u64) -> DiskArgs {
        DiskArgs {
            dir: dir.to_path_buf(),
            secs,
            append_bytes: 512,
            delete_mib,
            chunk_mib: 1,
            json: None,
        }
    }

    #[test]
    fn every_phase_is_timed_and_nothing_is_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let report = run(&quick_probe(dir.path(), 0.2, 3)).unwrap();
        let names: Vec<&str> = report.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "alone",
                "while 3 MiB is deleted at once",
                "while 3 MiB is deleted 1 MiB at a time"
            ]
        );
        for phase in &report.phases {
            assert!(phase.append_sync.count > 0, "{}", phase.name);
            assert!(phase.append_sync.p50_us <= phase.append_sync.max_us);
        }
        assert_eq!(report.phases[0].deletion_us, None);
        // Three 1 MiB truncations, each followed by a 50 ms pause.
        assert!(report.phases[2].deletion_us.unwrap() >= 150_000);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn bad_arguments_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let base = quick_probe(dir.path(), 0.1, 0);
        for bad in [
            DiskArgs {
                secs: 0.0,
                ..base.clone()
            },
            DiskArgs {
                secs: f64::NAN,
                ..base.clone()
            },
            DiskArgs {
                append_bytes: 0,
                ..base.clone()
            },
            DiskArgs {
                chunk_mib: 0,
                ..base.clone()
            },
            DiskArgs {
                dir: dir.path().join("missing"),
                ..base.clone()
            },
        ] {
            assert!(run(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(run(&base).unwrap().phases.len(), 1);
    }
}
