//! What a version's readers needed first, remembered for the next open.
//!
//! HDF5, netCDF-4, GeoTIFF and sqlite readers walk a file's metadata one
//! dependent read at a time: superblock, object headers, B-tree nodes,
//! then chunks. Each is a round trip to S3 (20 ms and more over a real
//! network). The ranges one reader asked for in its first second are,
//! for the next reader of the same version (another process, node or
//! mount), the same walk: asked all at once, in parallel, as the file is
//! opened, they cost one round trip instead of a chain of them.
//!
//! A record is a few hundred bytes of JSON in `hints/` of the state folder
//! (`$XDG_STATE_HOME/provenafs`, a home folder other nodes share), one file
//! per version (its name a SHA-256 of bucket, key and ETag, so nothing of
//! the key shows) and one per series: files of one folder whose names
//! differ only in their digits (`ocean_20240101.nc`, `ocean_20240102.nc`)
//! and whose sizes differ by at most a quarter usually share a layout, so
//! a version with no record of its own tries its series' latest. All of
//! it goes through a [`Folder`]: a state folder that stalls costs hints,
//! never a read.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::cache::ObjectId;
use super::fetch::Why;
use super::pattern::OpenFile;
use super::{lock, Reader};
use crate::folder::Folder;
use crate::retry::Deadline;

/// How long after a version's first read its readers' ranges are recorded.
pub(super) const FIRST_SECOND: Duration = Duration::from_secs(1);
/// Most ranges one record keeps (reads closer than [`MERGE_GAP`] are one).
const MAX_RANGES: usize = 64;
/// Reads this close together are recorded as one range.
const MERGE_GAP: u64 = 64 * 1024;
/// Most blocks a record may ask for at an open.
const MAX_BLOCKS: u64 = 16;
/// Largest record file read (a record is well under 2 KiB).
const MAX_RECORD: u64 = 64 * 1024;
/// Records kept in the folder; past it the oldest go, at a mount's start.
const KEPT: usize = 4096;
/// Records written between two trims of the folder (a mount that opens
/// a million versions must not leave a million files).
const TRIM_EVERY: u64 = 1024;
/// Sizes within this fraction of each other may share a series' record.
const SERIES_SIZE_SLACK: f64 = 0.25;
/// A hot series' next files are bought up to this many bytes ahead of its
/// reader (a quarter second of a 500 MiB/s link): xarray's
/// `open_mfdataset` opens every file of the series in a row, its CPU a
/// few ms a file, faster than six files ahead could come; a download of
/// the series would have them all on their way.
const SERIES_AHEAD_BYTES: u64 = 128 << 20;
/// ...and never fewer files than this, nor more than [`SERIES_AHEAD_MOST`].
const SERIES_AHEAD_LEAST: u64 = 6;
const SERIES_AHEAD_MOST: u64 = 24;

/// The records of one state folder.
pub struct Hints {
    folder: Folder,
    dir: PathBuf,
    /// Each series' latest first second in this mount, as it is being
    /// recorded (a series is read file after file: the next file opens
    /// before the one before is closed and its record written).
    latest: Mutex<std::collections::HashMap<String, (u64, Recalled)>>,
    /// Records written, for [`TRIM_EVERY`].
    writes: std::sync::atomic::AtomicU64,
}

/// Which records an open version reads and writes: its own and its
/// series'.
#[derive(Clone)]
struct Names {
    own: String,
    series: Option<String>,
    size: u64,
}

/// One version's first second of reads, as this mount saw it.
#[derive(Default)]
pub(super) struct FirstSecond(Mutex<Record>);

#[derive(Default)]
struct Record {
    since: Option<Instant>,
    ranges: Vec<(u64, u64)>,
    /// Where it goes when the second is over (None: not at all, as for a
    /// version whose own record was recalled).
    to: Option<(Arc<Hints>, Names)>,
    written: bool,
    /// The version was bought whole (see `buy.rs`): the next open buys it
    /// at once.
    bought: bool,
}

impl Hints {
    /// Records in `dir` (made 0700 if missing), its calls bounded by
    /// `stall`. None when it cannot be made: a mount without hints.
    pub fn open(dir: &Path, stall: Duration) -> Option<Arc<Hints>> {
        let folder = Folder::new("state folder (read hints)", dir, "no read hints", stall, 2);
        // Made (0700) and checked through the folder: a home folder that
        // stalls at the mount's start costs the hints, not the mount; one
        // another user can write is not used (they could plant records or
        // links).
        let d = dir.to_path_buf();
        let made = folder.run_blocking("make the read hints folder", move || {
            use std::os::unix::fs::{DirBuilderExt, MetadataExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)?;
            let m = std::fs::symlink_metadata(&d)?;
            if !m.is_dir() || m.uid() != nix::unistd::geteuid().as_raw() || m.mode() & 0o022 != 0 {
                return Err(std::io::Error::other("not a folder of this user's alone"));
            }
            Ok(())
        });
        if let Err(e) = made {
            tracing::warn!(folder = %dir.display(), error = %e, "no read hints: the folder cannot be used");
            return None;
        }
        let hints = Arc::new(Hints {
            folder,
            dir: dir.to_path_buf(),
            latest: Default::default(),
            writes: Default::default(),
        });
        let d = hints.dir.clone();
        let _ = hints.folder.spawn("trim read hints", move || trim(&d));
        Some(hints)
    }

    fn names(file: &crate::fs::tree::FileRef, id: &ObjectId) -> Names {
        let digest = |s: &str| hex::encode(&Sha256::digest(s.as_bytes())[..16]);
        let own = format!(
            "v-{}.json",
            digest(&format!("{}\n{}\n{}", id.bucket, id.key, id.etag))
        );
        let series = series_name(&id.key)
            .map(|s| format!("s-{}.json", digest(&format!("{}\n{s}", id.bucket))));
        Names {
            own,
            series,
            size: file.meta.size,
        }
    }

    /// The ranges recorded for this version, else for its series (sizes
    /// close enough), within the stall timeout or not at all; and whether
    /// they are the version's own.
    async fn recall(&self, n: &Names, deadline: Deadline) -> Option<(Recalled, bool)> {
        let dir = self.dir.clone();
        let n2 = n.clone();
        let found = self
            .folder
            .run("read hints", Some(deadline), move || {
                if let Some(r) = read_record(&dir.join(&n2.own), n2.size, 0.0) {
                    return Ok(Some((r, true)));
                }
                Ok(n2
                    .series
                    .as_ref()
                    .and_then(|s| read_record(&dir.join(s), n2.size, SERIES_SIZE_SLACK))
                    .map(|r| (r, false)))
            })
            .await
            .ok()
            .flatten();
        if matches!(found, Some((_, true))) {
            return found;
        }
        // A sibling read in this mount, just now, before one on disk.
        let sibling = n.series.as_ref().and_then(|s| {
            let latest = lock(&self.latest);
            let (size, r) = latest.get(s)?;
            close_enough(*size, n.size, SERIES_SIZE_SLACK).then(|| {
                (
                    Recalled {
                        ranges: r
                            .ranges
                            .iter()
                            .map(|&(a, b)| (a.min(n.size), b.min(n.size)))
                            .collect(),
                        bought: r.bought,
                    },
                    false,
                )
            })
        });
        sibling.or(found)
    }

    /// A series' latest first second in this mount, as it is recorded.
    fn latest(&self, n: &Names, ranges: &[(u64, u64)]) {
        let Some(s) = &n.series else {
            return;
        };
        let mut latest = lock(&self.latest);
        if latest.len() >= 256 && !latest.contains_key(s) {
            latest.clear();
        }
        latest.insert(
            s.clone(),
            (
                n.size,
                Recalled {
                    ranges: ranges.to_vec(),
                    bought: false,
                },
            ),
        );
    }

    /// Writes a record (the version's, and its series' latest) in the
    /// background: a new file renamed into place, never a file half
    /// written.
    fn write(&self, n: &Names, ranges: &[(u64, u64)], bought: bool, own_too: bool) {
        let body = |bought: bool| {
            serde_json::json!({
                "v": 1,
                "size": n.size,
                "bought": bought,
                "ranges": ranges.iter().map(|&(s, e)| [s, e - s]).collect::<Vec<_>>(),
            })
            .to_string()
        };
        let dir = self.dir.clone();
        // A series' record never says bought (see `recall`).
        let mut names: Vec<(String, String)> =
            n.series.iter().map(|s| (s.clone(), body(false))).collect();
        if own_too {
            names.push((n.own.clone(), body(bought)));
        }
        if self.writes.fetch_add(1, Ordering::Relaxed) % TRIM_EVERY == TRIM_EVERY - 1 {
            let d = self.dir.clone();
            let _ = self.folder.spawn("trim read hints", move || trim(&d));
        }
        let _ = self.folder.spawn("write read hints", move || {
            use std::os::unix::fs::OpenOptionsExt;
            for (name, body) in names {
                let tmp = dir.join(format!(".{name}.{:x}", rand::random::<u64>()));
                // 0600, as everything of the user's in the state folder; a
                // name of our own making, never an existing file.
                let ok = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&tmp)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, body.as_bytes()))
                    .and_then(|_| std::fs::rename(&tmp, dir.join(&name)));
                if ok.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
        });
    }
}

/// A key's series: its folder and its name with every run of digits made
/// `#` (`a/ocean_20240101.nc` is `a/ocean_#.nc`); None for a name without
/// digits.
fn series_name(key: &str) -> Option<String> {
    let (folder, file) = key.rsplit_once('/').unwrap_or(("", key));
    // The extension stays as it is (`.h5`, `.mp4`: digits of the format,
    // not of the series).
    let (name, ext) = match file.rsplit_once('.') {
        Some((n, e)) if !n.is_empty() => (n, Some(e)),
        _ => (file, None),
    };
    if !name.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut out = String::with_capacity(name.len());
    let mut in_digits = false;
    for c in name.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    if let Some(e) = ext {
        out.push('.');
        out.push_str(e);
    }
    Some(format!("{folder}/{out}"))
}

/// What a record says: the ranges (start, end) in the order the readers
/// first asked for them, and whether the version was bought whole.
#[derive(Debug, PartialEq)]
struct Recalled {
    ranges: Vec<(u64, u64)>,
    bought: bool,
}

/// A record, if the file is one, for a file of `size` (the record's size
/// within `slack` of it; ranges past the end cut).
fn read_record(path: &Path, size: u64, slack: f64) -> Option<Recalled> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut body = String::new();
    f.take(MAX_RECORD).read_to_string(&mut body).ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    if !close_enough(v.get("size")?.as_u64()?, size, slack) {
        return None;
    }
    let ranges = v
        .get("ranges")?
        .as_array()?
        .iter()
        .filter_map(|r| {
            let (s, l) = (r.get(0)?.as_u64()?, r.get(1)?.as_u64()?);
            (s < size).then(|| (s, s.saturating_add(l).min(size)))
        })
        .take(MAX_RANGES)
        .collect::<Vec<_>>();
    let bought = v.get("bought").and_then(|b| b.as_bool()).unwrap_or(false);
    (!ranges.is_empty() || bought).then_some(Recalled { ranges, bought })
}

/// Whether a record of a file of `was` bytes fits one of `size` (within
/// the fraction `slack` of it).
fn close_enough(was: u64, size: u64, slack: f64) -> bool {
    (was as f64 - size as f64).abs() <= slack * size as f64
}

/// Keeps the newest [`KEPT`] records.
fn trim(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, e.path()))
        })
        .collect();
    if files.len() <= KEPT {
        return;
    }
    files.sort();
    let excess = files.len() - KEPT / 2;
    for (_, p) in files.into_iter().take(excess) {
        let _ = std::fs::remove_file(p);
    }
}

impl FirstSecond {
    /// A read of `start..end` ended: recorded while the version's first
    /// second lasts; the first read after it writes the record.
    pub(super) fn note(self: &Arc<Self>, start: u64, end: u64) {
        let mut r = lock(&self.0);
        if r.since.is_none() {
            // Written when the second is over, whether or not a read comes
            // then (and whatever handles closed meanwhile: this task holds
            // the record till then).
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let me = self.clone();
                rt.spawn(async move {
                    tokio::time::sleep(FIRST_SECOND).await;
                    lock(&me.0).finish();
                });
            }
        }
        let since = *r.since.get_or_insert_with(Instant::now);
        if since.elapsed() > FIRST_SECOND {
            r.finish();
            return;
        }
        if let Some(last) = r.ranges.iter_mut().find(|(s, e)| {
            start <= e.saturating_add(MERGE_GAP) && end.saturating_add(MERGE_GAP) >= *s
        }) {
            *last = (last.0.min(start), last.1.max(end));
        } else if r.ranges.len() < MAX_RANGES {
            r.ranges.push((start, end));
        } else {
            return;
        }
        if let Some((hints, names)) = &r.to {
            hints.latest(names, &r.ranges);
        }
    }
}

impl FirstSecond {
    /// The version is being bought whole: said in its record (written
    /// again if it already was).
    pub(super) fn bought(&self) {
        let mut r = lock(&self.0);
        if r.bought {
            return;
        }
        r.bought = true;
        if r.written {
            r.written = false;
            r.finish();
        }
    }
}

impl Record {
    fn finish(&mut self) {
        if self.written || (self.ranges.is_empty() && !self.bought) {
            return;
        }
        self.written = true;
        if let Some((hints, names)) = &self.to {
            // In the order the readers first asked: the first needed are
            // asked first next time.
            hints.write(names, &self.ranges, self.bought, true);
        }
    }
}

impl Drop for FirstSecond {
    fn drop(&mut self) {
        lock(&self.0).finish();
    }
}

impl Reader {
    /// At an open of `f`: the first of this version's opens in this mount
    /// looks up what earlier readers of it (or of its series) needed first
    /// and asks for all of it at once, for the blocks not already here;
    /// and arranges for this mount's own first second to be written for
    /// the next. A future for the caller to spawn (None: nothing to do).
    pub fn recall(
        self: &Arc<Self>,
        f: &Arc<OpenFile>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let hints = self.hints.clone()?;
        let names = Hints::names(&f.file, &f.id);
        {
            let mut r = lock(&f.version.first.0);
            if r.to.is_some() || r.written || r.since.is_some() {
                return None;
            }
            r.to = Some((hints.clone(), names.clone()));
        }
        let (me, f) = (self.clone(), f.clone());
        Some(async move {
            let deadline = Deadline::after(hints.folder.stall_timeout());
            let Some((rec, own)) = hints.recall(&names, deadline).await else {
                return;
            };
            if own {
                // Nothing new to write: the next reader finds the same.
                let mut r = lock(&f.version.first.0);
                r.written = true;
                r.bought |= rec.bought;
            }
            // Readers that needed most of the file in their first second
            // (a series read file after file, as open_mfdataset does:
            // netCDF-C reads the first 4 MiB of each): it is fetched
            // whole at open, in parallel, not a round trip per range;
            // from S3 at most its size. And a version its own readers
            // bought (they paid the rent before). Never because a sibling
            // was bought: that says nothing of what this file's readers
            // need (one of a year of daily files bought must not buy the
            // other 364 at open).
            let covered: u64 = rec.ranges.iter().map(|(s, e)| e - s).sum();
            let most = covered.saturating_mul(2) >= f.size();
            if (rec.bought && own) || most {
                let at = rec.ranges.first().map_or(0, |r| r.0);
                // Already on disk (a remount, another node of a shared
                // folder): nothing to buy; its first block is brought to
                // memory for the reader about to ask for it, the rest is
                // read from disk as read. One look, not one per block.
                if me.on_disk(&f, at).await {
                    me.ask_hinted(&f, &rec.ranges);
                    return;
                }
                // The first range is the one a reader waits for first;
                // buying starts there.
                me.stats.hinted.fetch_add(1, Ordering::Relaxed);
                me.ask_hinted(&f, &rec.ranges[..rec.ranges.len().min(1)]);
                me.start_buy(&f, at);
                return;
            }
            me.ask_hinted(&f, &rec.ranges);
        })
    }

    /// Whether `f` is of a series whose readers in this mount needed half
    /// or more of each file in their first second: worth fetching its
    /// next files ([`Reader::series_ahead`]). No I/O.
    pub fn series_hot(&self, f: &OpenFile) -> bool {
        let Some(hints) = &self.hints else {
            return false;
        };
        let Some(series) = Hints::names(&f.file, &f.id).series else {
            return false;
        };
        let latest = lock(&hints.latest);
        latest.get(&series).is_some_and(|(size, r)| {
            r.ranges
                .iter()
                .map(|(s, e)| e - s)
                .sum::<u64>()
                .saturating_mul(2)
                >= *size
        })
    }

    /// How many of a hot series' next files to buy ahead of a reader of
    /// `f` (see [`SERIES_AHEAD_BYTES`]).
    /// Without a disk cache, what half the memory cache holds (at least
    /// one file): buys there land in memory, and more would evict each
    /// other and the reader's blocks.
    pub fn series_depth(&self, f: &OpenFile) -> usize {
        let size = f.size().max(1);
        let depth = match self.disk {
            Some(_) => (SERIES_AHEAD_BYTES / size).max(SERIES_AHEAD_LEAST),
            None => (self.cfg.memory_cache / 2 / size).max(1),
        };
        depth.min(SERIES_AHEAD_MOST) as usize
    }

    /// Whether the object `key` of `size` bytes is of `f`'s series (see
    /// the module docs): what [`Reader::series_ahead`] may fetch.
    pub fn in_series_of(&self, f: &OpenFile, key: &str, size: u64) -> bool {
        series_name(&f.id.key).is_some_and(|s| series_name(key).as_deref() == Some(s.as_str()))
            && close_enough(size, f.size(), SERIES_SIZE_SLACK)
    }

    /// At an open of a file of a hot series ([`Reader::series_hot`]: a
    /// series read file after file): the `next` files of the series (see
    /// [`crate::fs::tree::Tree::files_after`]) are bought now, while the
    /// reader is on this one, as a download of the whole series would
    /// have them. Bounded by the caller ([`Reader::series_depth`]) and by
    /// the buys' own bounds (8 files, 16 parts at once), each only if not
    /// on disk already. A
    /// future for the caller to spawn (None: nothing to do).
    pub fn series_ahead(
        self: &Arc<Self>,
        next: Vec<crate::fs::tree::FileRef>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        if next.is_empty() {
            return None;
        }
        let me = self.clone();
        Some(async move {
            for file in next {
                let of = me.open(file);
                if !me.on_disk(&of, 0).await {
                    me.start_buy(&of, 0);
                }
            }
        })
    }

    /// Whether block of byte `at` of `f` is in the disk cache (one look;
    /// brought to memory if so, for the reader about to ask for it): a
    /// version already there (a remount, another node) is not bought
    /// again.
    async fn on_disk(&self, f: &OpenFile, at: u64) -> bool {
        let Some(disk) = &self.disk else {
            return false;
        };
        let i = at / self.cfg.block_size;
        let (key, len) = (self.key(f, i), self.block_len(f, i));
        if self.mem.contains(&key) {
            return true;
        }
        let deadline = self.disk_deadline(Deadline::after(self.cfg.request_timeout));
        match disk.load_block(key.clone(), len, deadline).await {
            Some(b) => {
                self.mem.insert(key, b);
                true
            }
            None => false,
        }
    }

    /// Fetches the blocks covering `ranges` (the first [`MAX_BLOCKS`], in
    /// the order given) that are neither here nor on their way, all at
    /// once, a GET each (one stream is a tenth of the link: a GET of many
    /// blocks brings its last block late).
    fn ask_hinted(self: &Arc<Self>, f: &OpenFile, ranges: &[(u64, u64)]) {
        let bs = self.cfg.block_size;
        let mut blocks: Vec<u64> = Vec::new();
        let most = MAX_BLOCKS.min(self.cfg.memory_cache / bs / 2) as usize;
        for i in ranges
            .iter()
            .filter(|(s, e)| s < e)
            .flat_map(|&(s, e)| s / bs..=(e - 1) / bs)
        {
            if blocks.len() >= most {
                break;
            }
            if !blocks.contains(&i) && self.known(&self.key(f, i)).is_none() {
                blocks.push(i);
            }
        }
        if blocks.is_empty() {
            return;
        }
        self.stats
            .hinted
            .fetch_add(blocks.len() as u64, Ordering::Relaxed);
        tracing::debug!(
            blocks = blocks.len(),
            "asking for the ranges earlier readers needed first"
        );
        let deadline = Deadline::after(self.cfg.request_timeout);
        for i in blocks {
            // Within the read-ahead budget, as read-ahead: many files
            // opened at once must not reserve memory past it.
            let Ok(permit) = self.budget.clone().try_acquire_owned() else {
                break;
            };
            drop(self.start_fetch(f, i, i, deadline, Some(permit), Why::Ahead));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_names_hide_digits() {
        assert_eq!(
            series_name("a/b/ocean_20240101.nc").as_deref(),
            Some("a/b/ocean_#.nc")
        );
        assert_eq!(
            series_name("a/b/ocean_20240102.nc"),
            series_name("a/b/ocean_20240101.nc")
        );
        assert_eq!(
            series_name("v2/run1_t003.h5").as_deref(),
            Some("v2/run#_t#.h5")
        );
        assert_eq!(series_name("a/readme.txt"), None);
    }

    #[test]
    fn first_second_merges_and_bounds() {
        let fs = Arc::new(FirstSecond::default());
        fs.note(0, 16384);
        fs.note(16384, 81920);
        fs.note(59_715_584, 59_723_776);
        fs.note(58_830_848, 58_982_400);
        for k in 0..200u64 {
            fs.note(1 << 30 | k << 20, (1 << 30 | k << 20) + 10);
        }
        let r = lock(&fs.0);
        assert_eq!(r.ranges[0], (0, 81920));
        assert_eq!(r.ranges.len(), MAX_RANGES);
    }

    #[test]
    fn records_round_trip_and_refuse_other_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        std::fs::write(
            &p,
            r#"{"v":1,"size":1000,"ranges":[[0,100],[900,500],[2000,5]]}"#,
        )
        .unwrap();
        assert_eq!(
            read_record(&p, 1000, 0.0),
            Some(Recalled {
                ranges: vec![(0, 100), (900, 1000)],
                bought: false
            })
        );
        assert_eq!(read_record(&p, 1100, 0.0), None);
        assert!(read_record(&p, 1100, 0.25).is_some());
        std::fs::write(&p, "not json").unwrap();
        assert_eq!(read_record(&p, 1000, 0.0), None);
    }
}
