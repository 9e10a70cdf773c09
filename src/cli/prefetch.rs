//! `provenafs prefetch HANDLE[/PATH]... --cache-dir DIR`: stage datasets
//! into a cache folder ahead of a job (see [`crate::prefetch`]).
//!
//! Words: a progress bar on standard error when it is a terminal; the
//! one-line summary on standard error otherwise (a job script's standard
//! output stays its own, as with `mount`); `--json` prints one object on
//! standard output instead. Exit 1 when anything failed or was refused.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{ConnectArgs, Exit, LogArgs};
use crate::prefetch::{self, PrefetchConfig};
use crate::read::cache::DiskCache;
use crate::read::DiskConfig;

#[derive(Args, Clone)]
pub struct PrefetchArgs {
    /// HANDLE, HANDLE/FOLDER or HANDLE/FILE (repeatable), e.g.
    /// 10378.1/1687966/data (also as https://hdl.handle.net/...).
    #[arg(required = true, value_name = "HANDLE[/PATH]")]
    pub targets: Vec<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The cache folder the mount will use (`mount --cache-dir`), created 0700.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Disk cache budget, as the mount's: a set larger than this is
    /// refused before anything is fetched [default: 10GiB].
    #[arg(long, value_parser = super::parse_size)]
    pub cache_size: Option<u64>,
    /// The cache folder is shared by several mounts (as `mount --cache-shared`).
    #[arg(long)]
    pub cache_shared: bool,
    /// Let the owner's group read the cache (as `mount --cache-group`).
    #[arg(long)]
    pub cache_group: bool,
    /// Ranged GETs of 8 MiB in flight at once [default: 16].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub parallel: Option<u32>,
    /// Print one JSON object (files, bytes, fetched_bytes, cached_bytes,
    /// files_already_cached, files_kept_whole, kept_whole_seconds, gets,
    /// seconds, mib_per_s, failed) on
    /// standard output instead of the summary line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub log: LogArgs,
}

/// `provenafs prefetch`.
pub fn prefetch(a: PrefetchArgs) -> Result<(), Exit> {
    let file = crate::config::load(a.connect.identity.config.as_deref())?;
    super::init_daemon_logging(
        a.log.level().as_deref(),
        a.log.log_file.as_deref(),
        "warn",
        crate::retry::stall_timeout(crate::retry::DEFAULT_REQUEST_TIMEOUT),
    )?;
    let dir = a
        .cache_dir
        .clone()
        .or_else(|| file.cache_dir.clone())
        .ok_or_else(|| "prefetch needs --cache-dir (the folder the mount will use)".to_string())?;
    let disk_cfg = DiskConfig {
        dir: super::absolute(&dir)?,
        limit: super::size_setting(a.cache_size, &file.cache_size, 10 << 30)?,
        shared: a.cache_shared || file.cache_shared.unwrap_or(false),
        group: a.cache_group || file.cache_group.unwrap_or(false),
        default: false,
    };
    let rt = super::runtime()?;
    // A shared folder others already use shares tokens and credentials
    // with them; one not made yet has no one to share with (and is made
    // only once the set is known to fit).
    let shared_dir =
        (disk_cfg.shared && is_dir_within(&disk_cfg.dir)).then(|| disk_cfg.dir.clone());
    let session = rt.block_on(a.connect.session(shared_dir.as_deref()))?;
    let request_timeout = session.api.request_timeout();
    let cfg = PrefetchConfig {
        parts_in_flight: a.parallel.map_or(16, |n| n as usize),
        request_timeout,
        // A mount's kernel reads a whole file itself (FUSE passthrough):
        // worth one more write of it where mounts can, and are let.
        keep_whole: crate::fs::passthrough::possible() && !file.no_passthrough.unwrap_or(false),
        ..PrefetchConfig::default()
    };
    let terminal = std::io::stderr().is_terminal();
    let listing = crate::browse::progress();
    listing.set_message("Listing...");
    let items = rt.block_on(prefetch::resolve(
        &session.api,
        session.stores.as_ref(),
        &a.targets,
        request_timeout,
    ));
    listing.finish_and_clear();
    let items = items?;
    // Refused before the cache folder is even created.
    prefetch::fits(&items, cfg.block_size, disk_cfg.limit)?;
    let disk = DiskCache::open(&disk_cfg, crate::retry::stall_timeout(request_timeout))
        .map_err(|e| format!("cannot use the cache folder {}: {e}", dir.display()))?;
    let total: u64 = items.iter().map(|i| i.meta.size).sum();
    let bar = if terminal {
        bar(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_message(format!("0/{} files", items.len()));
    let summary = rt.block_on(prefetch::run(&items, disk, cfg, bar.clone()));
    bar.finish_and_clear();
    // Written blocks go to disk on the blocking pool, already awaited:
    // nothing left to wait for.
    rt.shutdown_timeout(Duration::from_secs(2));
    if a.json {
        let text = serde_json::to_string(&summary).map_err(|e| e.to_string())?;
        super::print_out(&format!("{text}\n"))?;
    } else {
        eprintln!("provenafs: {}", summary.line());
    }
    if summary.failed.is_empty() {
        Ok(())
    } else {
        Err(Exit::Code(1))
    }
}

/// Bytes, files, rate and ETA, on standard error.
fn bar(total: u64) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {binary_bytes}/{binary_total_bytes} {msg} {binary_bytes_per_sec} ETA {eta}",
    ) {
        pb.set_style(style);
    }
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// Whether `dir` is a folder, asked on a thread of its own and given up
/// (as not one) after the stall timeout: a cluster file system that hangs
/// must not hang the command before it says anything.
fn is_dir_within(dir: &std::path::Path) -> bool {
    let stall = crate::retry::stall_timeout(crate::retry::DEFAULT_REQUEST_TIMEOUT);
    let folder = crate::folder::Folder::new("cache folder", dir, "not shared", stall, 1);
    let d = dir.to_path_buf();
    folder
        .run_blocking("look at the cache folder", move || Ok(d.is_dir()))
        .unwrap_or(false)
}
