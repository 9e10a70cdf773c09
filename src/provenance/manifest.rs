//! The read manifest: what a mount's readers read, aggregated per object
//! version and reader, never per read.
//!
//! Bounded whatever the job: a version's first [`READERS_PER_VERSION`]
//! reading processes are kept one by one; later ones (a PyTorch
//! DataLoader's workers, new every epoch; a shell loop; `xargs`) are
//! merged into one reader per (UID, Slurm job, command) of that version,
//! marked `merged`; and at most [`MAX_ENTRIES`] entries are kept in all.
//!
//! An open registers (object version, reader) once and hands back its
//! [`Tally`]; every FUSE read of that handle then adds to it with atomic
//! updates only (no lock, no I/O). The kernel answers reads of pages it
//! already holds without asking the daemon, so `bytes_read` counts what
//! the daemon served; every `open(2)` does reach the daemon, so which
//! reader opened which version is complete.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::who::Who;

/// One object version of one dataset.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Object {
    handle: Arc<str>,
    key: Arc<str>,
    etag: Arc<str>,
}

/// One object version and one reader of it (merged: the version's later
/// readers of that UID, job and command, see the module docs).
type Pair = (Object, Arc<Who>, bool);

/// What one reader did with one object version. Times are milliseconds
/// since the Unix epoch (`u64::MAX` for a first time: not yet; 0 for a
/// last time: not yet).
#[derive(Debug)]
pub struct Tally {
    opens: AtomicU64,
    bytes: AtomicU64,
    reads: AtomicU64,
    first_ms: AtomicU64,
    last_ms: AtomicU64,
    first_open_ms: AtomicU64,
    last_open_ms: AtomicU64,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            opens: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            first_ms: AtomicU64::new(u64::MAX),
            last_ms: AtomicU64::new(0),
            first_open_ms: AtomicU64::new(u64::MAX),
            last_open_ms: AtomicU64::new(0),
        }
    }
}

impl Tally {
    /// `n` bytes returned to a reader now: the read path's whole cost. A
    /// read at the end of the file (nothing returned) is no read.
    pub fn read(&self, n: u64) {
        if n == 0 {
            return;
        }
        let now = now_ms();
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.first_ms.fetch_min(now, Ordering::Relaxed);
        self.last_ms.fetch_max(now, Ordering::Relaxed);
        // Last, and Release: a checkpoint that counts this read (Acquire,
        // in `Manifest::fingerprint`) also sees its bytes and times.
        self.reads.fetch_add(1, Ordering::Release);
    }

    fn opened(&self) {
        let now = now_ms();
        self.opens.fetch_add(1, Ordering::Relaxed);
        self.first_open_ms.fetch_min(now, Ordering::Relaxed);
        self.last_open_ms.fetch_max(now, Ordering::Relaxed);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reading processes kept one by one per object version; past them, a
/// version's readers are merged by (UID, Slurm job, command).
pub const READERS_PER_VERSION: usize = 8;

/// Most (object version, reader) entries kept in all: about 30 MB. Past
/// it, an open that would need a new entry adds to its merged reader if
/// that exists, else is counted in `dropped` (a mount reading more than
/// this many files); what is kept stays right.
pub const MAX_ENTRIES: usize = 100_000;

/// A mount's read manifest.
pub struct Manifest {
    mountpoint: String,
    started: SystemTime,
    entries: Mutex<HashMap<Pair, Arc<Tally>>>,
    /// Each version's size, and how many of its readers are kept one by
    /// one.
    sizes: Mutex<HashMap<Object, (u64, usize)>>,
    /// Dataset names (from the registry), by handle.
    names: Mutex<HashMap<String, String>>,
    dropped: AtomicU64,
}

/// An object version being opened.
pub struct Opened<'a> {
    /// Its dataset's handle and name.
    pub handle: &'a str,
    pub name: Option<&'a str>,
    /// Its S3 key, ETag (without quotes) and size in bytes.
    pub key: &'a str,
    pub etag: &'a str,
    pub size: u64,
}

impl Manifest {
    pub fn new(mountpoint: &str) -> Self {
        Self {
            mountpoint: mountpoint.to_string(),
            started: SystemTime::now(),
            entries: Mutex::new(HashMap::new()),
            sizes: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            dropped: AtomicU64::new(0),
        }
    }

    /// `who` opened `what`: the tally its reads add to.
    pub fn opened(&self, what: &Opened<'_>, who: Arc<Who>) -> Arc<Tally> {
        let object = Object {
            handle: what.handle.into(),
            key: what.key.into(),
            etag: what.etag.into(),
        };
        let size = what.size;
        if let Some(n) = what.name {
            if !lock(&self.names).contains_key(what.handle) {
                lock(&self.names).insert(what.handle.to_string(), n.to_string());
            }
        }
        let mut entries = lock(&self.entries);
        if let Some(t) = entries.get(&(object.clone(), who.clone(), false)) {
            let t = t.clone();
            drop(entries);
            t.opened();
            return t;
        }
        let mut sizes = lock(&self.sizes);
        let kept = sizes.get(&object).map_or(0, |(_, k)| *k);
        let full = entries.len() >= MAX_ENTRIES;
        let key = if kept < READERS_PER_VERSION && !full {
            sizes.entry(object.clone()).or_insert((size, 0)).1 += 1;
            (object, who, false)
        } else {
            // Merged with the version's other readers of this user, job
            // and command.
            let merged = Arc::new(Who {
                uid: who.uid,
                pid: 0,
                command: who.command.clone(),
                job: who.job.clone(),
                started: 0,
            });
            let key = (object, merged, true);
            if full && !entries.contains_key(&key) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return Arc::new(Tally::default());
            }
            key
        };
        drop(sizes);
        let tally = entries.entry(key).or_default().clone();
        drop(entries);
        tally.opened();
        tally
    }

    /// A cheap summary that changes whenever a snapshot would (a new pair,
    /// an open, a read, a dropped open): the checkpoint's "anything new?".
    /// One pass over the pairs under their lock, no allocation (opens
    /// wait for it: a few ms at the 1M-pair cap, once per checkpoint).
    pub fn fingerprint(&self) -> Fingerprint {
        let entries = lock(&self.entries);
        let mut f = Fingerprint {
            pairs: entries.len() as u64,
            opens: 0,
            reads: 0,
            dropped: self.dropped.load(Ordering::Relaxed),
        };
        for t in entries.values() {
            f.opens = f.opens.wrapping_add(t.opens.load(Ordering::Relaxed));
            f.reads = f.reads.wrapping_add(t.reads.load(Ordering::Acquire));
        }
        f
    }

    /// What was read, by dataset and file, of the readers `filter` keeps.
    pub fn snapshot(&self, filter: &Filter) -> Snapshot {
        let sizes = lock(&self.sizes).clone();
        let names = lock(&self.names).clone();
        // Copied out first: opens wait for this lock, not for the build.
        let entries: Vec<(Object, Arc<Who>, bool, Arc<Tally>)> = lock(&self.entries)
            .iter()
            .map(|((o, w, m), t)| (o.clone(), w.clone(), *m, t.clone()))
            .collect();
        let mut files: BTreeMap<Object, FileRead> = BTreeMap::new();
        for (object, who, merged, t) in &entries {
            let f = files.entry(object.clone()).or_insert_with(|| FileRead {
                key: object.key.to_string(),
                etag: object.etag.to_string(),
                size: sizes.get(object).map_or(0, |(s, _)| *s),
                ..FileRead::default()
            });
            f.readers.push(ReaderRead {
                merged: *merged,
                who: (**who).clone(),
                opens: t.opens.load(Ordering::Relaxed),
                bytes_read: t.bytes.load(Ordering::Relaxed),
                reads: t.reads.load(Ordering::Relaxed),
                first_read: ms_time(t.first_ms.load(Ordering::Relaxed)),
                last_read: ms_time(t.last_ms.load(Ordering::Relaxed)),
                first_open: ms_time(t.first_open_ms.load(Ordering::Relaxed)),
                last_open: ms_time(t.last_open_ms.load(Ordering::Relaxed)),
            });
        }
        let mut datasets: BTreeMap<String, DatasetRead> = BTreeMap::new();
        for (object, f) in files {
            let d = datasets
                .entry(object.handle.to_string())
                .or_insert_with(|| DatasetRead {
                    handle: object.handle.to_string(),
                    name: names.get(&*object.handle).cloned(),
                    files: Vec::new(),
                });
            d.files.push(f);
        }
        Snapshot {
            mountpoint: self.mountpoint.clone(),
            mounted_at: DateTime::<Utc>::from(self.started),
            taken_at: Utc::now(),
            ended_at: None,
            filter: Filter::default(),
            dropped: self.dropped.load(Ordering::Relaxed),
            datasets: datasets.into_values().collect(),
        }
        .filtered(filter)
    }
}

/// See [`Manifest::fingerprint`]: counts, summed over every pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    pairs: u64,
    opens: u64,
    reads: u64,
    dropped: u64,
}

impl Fingerprint {
    /// Nothing opened yet: nothing to write.
    pub fn is_empty(&self) -> bool {
        self.pairs == 0 && self.dropped == 0
    }
}

fn ms_time(ms: u64) -> Option<DateTime<Utc>> {
    (ms > 0 && ms < u64::MAX).then(|| {
        DateTime::<Utc>::from(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms))
    })
}

fn min_time(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max_time(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Which readers a snapshot keeps (all by default).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    /// Only processes of this Slurm job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Only this process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Only what was read at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_time")]
    pub since: Option<SystemTime>,
}

mod opt_time {
    use super::*;
    pub fn serialize<S: serde::Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        t.map(DateTime::<Utc>::from).serialize(s)
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        Ok(Option::<DateTime<Utc>>::deserialize(d)?.map(SystemTime::from))
    }
}

/// The manifest as `provenance --json` prints it and the daemon writes it
/// on unmount. Times are RFC 3339, UTC.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub mountpoint: String,
    pub mounted_at: DateTime<Utc>,
    pub taken_at: DateTime<Utc>,
    /// When the mount ended: set in the file the daemon writes as it ends,
    /// never in a checkpoint written while mounted, so a job script can
    /// tell the final manifest from an earlier checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// The readers it was restricted to.
    #[serde(default)]
    pub filter: Filter,
    /// Opens not recorded: the manifest was full (see `MAX_ENTRIES`).
    #[serde(default)]
    pub dropped: u64,
    pub datasets: Vec<DatasetRead>,
}

/// One dataset's files that were read.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DatasetRead {
    /// Its handle, e.g. `10378.1/1687966`.
    pub handle: String,
    /// Its name in the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Each object version read, by key.
    pub files: Vec<FileRead>,
}

/// One object version read: its totals, and each reader's share.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FileRead {
    /// Its S3 key (the dataset's prefix included).
    pub key: String,
    /// Its ETag as S3 gave it (the version read), without quotes.
    pub etag: String,
    /// Its size in bytes.
    pub size: u64,
    pub opens: u64,
    /// Bytes the daemon returned to readers (page-cache hits not seen).
    pub bytes_read: u64,
    /// FUSE reads answered.
    pub reads: u64,
    /// First and last read answered (none if only opened).
    pub first_read: Option<DateTime<Utc>>,
    pub last_read: Option<DateTime<Utc>>,
    pub readers: Vec<ReaderRead>,
}

/// What one reading process did with one object version.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ReaderRead {
    #[serde(flatten)]
    pub who: Who,
    /// More processes of this UID, job and command than the first
    /// [`READERS_PER_VERSION`] kept one by one, counted together (`pid`
    /// 0).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merged: bool,
    pub opens: u64,
    pub bytes_read: u64,
    pub reads: u64,
    /// First and last read the daemon answered (none: every page it read
    /// came from the kernel's cache, or it read nothing).
    pub first_read: Option<DateTime<Utc>>,
    pub last_read: Option<DateTime<Utc>>,
    /// First and last open.
    #[serde(default)]
    pub first_open: Option<DateTime<Utc>>,
    #[serde(default)]
    pub last_open: Option<DateTime<Utc>>,
}

impl ReaderRead {
    /// When it first and last used the file: its reads, or, for a reader
    /// served from the kernel's cache alone, its opens.
    fn span(&self) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
        (
            min_time(self.first_read, self.first_open),
            max_time(self.last_read, self.last_open),
        )
    }
}

impl Snapshot {
    /// Only what the readers `filter` keeps read: each file's totals are
    /// theirs, and files and datasets nobody kept read are left out.
    pub fn filtered(mut self, filter: &Filter) -> Snapshot {
        let since = filter.since.map(DateTime::<Utc>::from);
        for d in &mut self.datasets {
            for f in &mut d.files {
                f.readers.retain(|r| {
                    filter
                        .job
                        .as_ref()
                        .is_none_or(|j| r.who.job.as_ref() == Some(j))
                        && filter.pid.is_none_or(|p| r.who.pid == p)
                        && since.is_none_or(|s| r.span().1.is_some_and(|l| l >= s))
                });
                f.readers.sort_by_key(|r| (r.who.uid, r.who.pid));
                f.opens = f.readers.iter().map(|r| r.opens).sum();
                f.bytes_read = f.readers.iter().map(|r| r.bytes_read).sum();
                f.reads = f.readers.iter().map(|r| r.reads).sum();
                f.first_read = f
                    .readers
                    .iter()
                    .fold(None, |a, r| min_time(a, r.first_read));
                f.last_read = f.readers.iter().fold(None, |a, r| max_time(a, r.last_read));
            }
            d.files.retain(|f| !f.readers.is_empty());
        }
        self.datasets.retain(|d| !d.files.is_empty());
        if *filter != Filter::default() {
            self.filter = filter.clone();
        }
        self
    }

    /// When its readers first and last used what it holds (reads, or
    /// opens for a reader the kernel's cache served alone).
    pub fn span(&self) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
        let readers = self
            .datasets
            .iter()
            .flat_map(|d| &d.files)
            .flat_map(|f| &f.readers);
        readers.fold((None, None), |(a, b), r| {
            let (first, last) = r.span();
            (min_time(a, first), max_time(b, last))
        })
    }

    /// The default table: one row per dataset.
    pub fn table(&self) -> String {
        let mut rows = vec![[
            "DATASET".to_string(),
            "NAME".into(),
            "FILES".into(),
            "VERSIONS".into(),
            "BYTES READ".into(),
            "FIRST READ".into(),
            "LAST READ".into(),
        ]];
        let t = |x: Option<DateTime<Utc>>| {
            x.map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        };
        for d in &self.datasets {
            let mut keys: Vec<&str> = d.files.iter().map(|f| f.key.as_str()).collect();
            keys.dedup();
            let bytes: u64 = d.files.iter().map(|f| f.bytes_read).sum();
            let first = d.files.iter().fold(None, |a, f| min_time(a, f.first_read));
            let last = d.files.iter().fold(None, |a, f| max_time(a, f.last_read));
            rows.push([
                d.handle.clone(),
                d.name.clone().unwrap_or_else(|| "-".into()),
                keys.len().to_string(),
                d.files.len().to_string(),
                bytes.to_string(),
                t(first),
                t(last),
            ]);
        }
        let widths: Vec<usize> = (0..7)
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for r in &rows {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(v, w)| format!("{v:<w$}"))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        if self.datasets.is_empty() {
            out.push_str("(nothing read");
            out.push_str(if self.filter == Filter::default() {
                ")\n"
            } else {
                " by the readers asked for)\n"
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(pid: u32, job: Option<&str>) -> Arc<Who> {
        Arc::new(Who {
            uid: 1000,
            pid,
            command: Some("python3".into()),
            job: job.map(str::to_string),
            started: 1,
        })
    }

    #[test]
    fn reads_aggregate_per_version_and_filters_pick_readers() {
        let m = Manifest::new("/mnt");
        let o = |handle, key, etag, size| Opened {
            handle,
            name: Some("Reef temperatures"),
            key,
            etag,
            size,
        };
        let a = m.opened(
            &o("10378.1/1", "datasets/10378-1-1/a.nc", "e1", 100),
            who(10, Some("77")),
        );
        a.read(60);
        a.read(40);
        // The same reader opening again adds to the same tally.
        let a2 = m.opened(
            &o("10378.1/1", "datasets/10378-1-1/a.nc", "e1", 100),
            who(10, Some("77")),
        );
        assert!(Arc::ptr_eq(&a, &a2));
        let b = m.opened(
            &o("10378.1/1", "datasets/10378-1-1/a.nc", "e2", 120),
            who(11, Some("78")),
        );
        b.read(5);
        m.opened(
            &o("10378.1/2", "datasets/10378-1-2/b", "e3", 7),
            who(12, None),
        )
        .read(7);

        let all = m.snapshot(&Filter::default());
        assert_eq!(all.datasets.len(), 2);
        let files = &all.datasets[0].files;
        assert_eq!(files.len(), 2, "two versions of a.nc");
        assert_eq!(
            (
                files[0].etag.as_str(),
                files[0].bytes_read,
                files[0].opens,
                files[0].reads
            ),
            ("e1", 100, 2, 2)
        );
        assert!(files[0].first_read.is_some() && files[0].first_read <= files[0].last_read);

        let job = m.snapshot(&Filter {
            job: Some("77".into()),
            ..Filter::default()
        });
        assert_eq!(job.datasets.len(), 1);
        assert_eq!(job.datasets[0].files.len(), 1);
        assert_eq!(job.datasets[0].files[0].etag, "e1");
        let pid = m.snapshot(&Filter {
            pid: Some(12),
            ..Filter::default()
        });
        assert_eq!(pid.datasets[0].handle, "10378.1/2");
        let later = m.snapshot(&Filter {
            since: Some(SystemTime::now() + std::time::Duration::from_secs(60)),
            ..Filter::default()
        });
        assert!(later.datasets.is_empty());
        assert!(later.table().contains("nothing read"));

        // What the daemon writes parses back the same, and filters the
        // same afterwards.
        let text = serde_json::to_string(&all).unwrap();
        let back = serde_json::from_str::<Snapshot>(&text).unwrap();
        assert_eq!(back, all);
        let f = Filter {
            job: Some("77".into()),
            ..Filter::default()
        };
        let mut from_file = back.filtered(&f);
        from_file.taken_at = job.taken_at;
        assert_eq!(from_file, job);
        assert!(all.table().contains("10378.1/1"));
        assert!(all.table().contains("Reef temperatures"));
    }
}
