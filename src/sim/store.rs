//! The emulator's view of its data folder: datasets and S3 keys.
//!
//! `ROOT/<prefix>/<suffix>/` is the dataset `<prefix>/<suffix>`; a file at
//! `ROOT/<prefix>/<suffix>/<rel>` is the object
//! `datasets/<prefix with . as ->-<suffix>/<rel>` of [`BUCKET`]. Everything is
//! read from disk at request time, so tests may change files while serving.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use md5::{Digest, Md5};

pub const BUCKET: &str = "provena-bucket";

#[derive(Clone, Debug)]
pub struct SimDataset {
    pub handle: String,
    pub dir: PathBuf,
    /// `datasets/<dashed>/`
    pub s3_prefix: String,
    pub name: String,
    pub description: String,
    pub created: i64,
    /// What orders the registry list (newest first): `updated_timestamp`
    /// from metadata.json if it has one, else the folder's mtime.
    pub updated: i64,
    /// `release_status` from metadata.json (`NOT_RELEASED` if absent).
    pub release_status: String,
}

/// `10378.1/1687966` → `datasets/10378-1-1687966/`, as the service derives it.
pub fn s3_prefix_of(handle: &str) -> String {
    format!("datasets/{}/", handle.replace(['.', '/'], "-"))
}

pub struct FolderStore {
    root: PathBuf,
    etags: Etags,
    /// Objects whose keys no file name can hold (`a//b`, `x/../y`, folder
    /// markers, names over 255 bytes, an object beside a same-named prefix).
    extra: BTreeMap<String, ObjectFile>,
    /// The dataset list, re-read at most once a second: every S3 request
    /// resolves its key to a dataset, and the registry is paged.
    datasets: Mutex<Option<(Instant, Arc<Vec<SimDataset>>)>>,
    /// Sorted names of folders listed recently, by path and folder mtime:
    /// a page of a 100,000-file folder costs its own 1,000 stats, not all.
    folders: Mutex<HashMap<PathBuf, (SystemTime, FolderNames)>>,
}

/// A folder's entries, sorted: (name, or name + `/` for a folder; is a folder).
type FolderNames = Arc<Vec<(String, bool)>>;

/// One S3 object on disk.
#[derive(Clone, Debug)]
pub struct ObjectFile {
    pub key: String,
    pub path: PathBuf,
    /// Content held in memory (extra keys) instead of a file.
    pub data: Option<bytes::Bytes>,
    /// The file itself, opened once: size, ETag and bytes all come from
    /// this one version, even if a test replaces the file meanwhile.
    pub file: Option<Arc<fs::File>>,
    pub size: u64,
    pub modified: SystemTime,
    pub etag: String,
}

pub enum Entry {
    Object(ObjectFile),
    Prefix(String),
}

impl Entry {
    pub fn key(&self) -> &str {
        match self {
            Entry::Object(o) => &o.key,
            Entry::Prefix(p) => p,
        }
    }
}

fn unix(t: std::io::Result<SystemTime>) -> i64 {
    t.ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Identity and version of a file on disk: if any part changes, the file
/// was replaced or rewritten and its ETag must be computed again.
type Version = (u64, i64, i64, u64);

fn version(md: &fs::Metadata) -> Version {
    (md.len(), md.mtime(), md.mtime_nsec(), md.ino())
}

/// ETags as S3 computes them for single-part uploads: the MD5 of the
/// content (peers such as rclone verify downloads against it). Computed
/// once per file version and remembered; concurrent first requests (a
/// job array's mounts listing at once) wait for one hash instead of each
/// hashing the file.
#[derive(Default)]
struct Etags(
    std::sync::Mutex<std::collections::HashMap<PathBuf, (Version, String)>>,
    std::sync::Mutex<()>,
);

impl Etags {
    /// The ETag of the version `md` describes, if already known.
    fn known(&self, path: &Path, md: &fs::Metadata) -> Option<String> {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.get(path)
            .filter(|(seen, _)| *seen == version(md))
            .map(|(_, e)| e.clone())
    }

    /// The ETag of open file `f`, whose metadata is `md` (from `f` itself,
    /// so the hash and the metadata describe the same version).
    fn of(&self, path: &Path, f: &fs::File, md: &fs::Metadata) -> String {
        if let Some(e) = self.known(path, md) {
            return e;
        }
        let _hashing = self.1.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = self.known(path, md) {
            return e;
        }
        let v = version(md);
        let e = md5_file(f).unwrap_or_else(|_| format!("{:032x}", v.0 ^ v.3));
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_path_buf(), (v, e.clone()));
        e
    }
}

fn md5_file(f: &fs::File) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = f.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

/// Opens the regular file at `path` and reads its metadata from the open
/// file, so whatever is learned about it belongs to one version.
fn open_version(path: &Path) -> Option<(fs::File, fs::Metadata)> {
    let f = fs::File::open(path).ok()?;
    let md = f.metadata().ok()?;
    md.is_file().then_some((f, md))
}

impl FolderStore {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            etags: Etags::default(),
            extra: BTreeMap::new(),
            datasets: Mutex::new(None),
            folders: Mutex::new(HashMap::new()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Loads extra objects from a JSON array of `{"key": ..., "data": ...}`.
    pub fn load_extra_keys(&mut self, p: &Path) -> std::io::Result<()> {
        #[derive(serde::Deserialize)]
        struct Extra {
            key: String,
            #[serde(default)]
            data: String,
        }
        let list: Vec<Extra> = serde_json::from_slice(&fs::read(p)?)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        for e in list {
            let data = bytes::Bytes::from(e.data.into_bytes());
            self.extra.insert(
                e.key.clone(),
                ObjectFile {
                    etag: hex::encode(Md5::digest(&data)),
                    size: data.len() as u64,
                    modified: SystemTime::now(),
                    path: PathBuf::new(),
                    data: Some(data),
                    file: None,
                    key: e.key,
                },
            );
        }
        Ok(())
    }

    /// Computes every ETag in the background, so the first listing of a
    /// large dataset does not pay for hashing its files.
    pub fn warm_etags(self: &std::sync::Arc<Self>) {
        let me = self.clone();
        std::thread::spawn(move || {
            for ds in me.datasets().iter() {
                let mut out = BTreeMap::new();
                me.walk(&ds.dir, &ds.s3_prefix, &ds.s3_prefix, &mut out);
            }
        });
    }

    /// All datasets, sorted by handle (cached for a second).
    pub fn datasets(&self) -> Arc<Vec<SimDataset>> {
        let mut cache = self.datasets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, list)) = cache.as_ref() {
            if at.elapsed() < Duration::from_secs(1) {
                return list.clone();
            }
        }
        let list = Arc::new(self.scan_datasets());
        *cache = Some((Instant::now(), list.clone()));
        list
    }

    fn scan_datasets(&self) -> Vec<SimDataset> {
        let mut out = Vec::new();
        let Ok(prefixes) = fs::read_dir(&self.root) else {
            return out;
        };
        for p in prefixes.flatten() {
            let Some(prefix) = p.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if prefix.starts_with('.') || !p.path().is_dir() {
                continue;
            }
            let Ok(suffixes) = fs::read_dir(p.path()) else {
                continue;
            };
            for s in suffixes.flatten() {
                let Some(suffix) = s.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if suffix.starts_with('.') || !s.path().is_dir() {
                    continue;
                }
                out.push(self.describe(&format!("{prefix}/{suffix}"), s.path()));
            }
        }
        out.sort_by(|a, b| a.handle.cmp(&b.handle));
        out
    }

    pub fn dataset(&self, handle: &str) -> Option<SimDataset> {
        let (p, s) = crate::wire::split_handle(handle)?;
        if [p, s].iter().any(|x| x.starts_with('.')) {
            return None;
        }
        let dir = self.root.join(p).join(s);
        dir.is_dir().then(|| self.describe(handle, dir))
    }

    fn describe(&self, handle: &str, dir: PathBuf) -> SimDataset {
        let md = fs::metadata(&dir).ok();
        let meta: serde_json::Value = fs::read(dir.join("metadata.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let text = |k: &str| meta.get(k).and_then(|v| v.as_str()).map(str::to_string);
        // Timestamps in metadata.json win over the folder's times, so a
        // test can fix the registry's order (folder mtimes move whenever a
        // file is added).
        let stamp = |k: &str| meta.get(k).and_then(|v| v.as_i64());
        SimDataset {
            handle: handle.to_string(),
            s3_prefix: s3_prefix_of(handle),
            name: text("name").unwrap_or_else(|| format!("Dataset {handle}")),
            description: text("description").unwrap_or_default(),
            created: stamp("created_timestamp").unwrap_or_else(|| {
                unix(
                    md.as_ref()
                        .map_or(Ok(SystemTime::UNIX_EPOCH), |m| m.created().or(m.modified())),
                )
            }),
            updated: stamp("updated_timestamp").unwrap_or_else(|| {
                unix(
                    md.as_ref()
                        .map_or(Ok(SystemTime::UNIX_EPOCH), |m| m.modified()),
                )
            }),
            // Passed through as written (any text), so a client can be
            // tried on a status it does not know.
            release_status: text("release_status").unwrap_or_else(|| "NOT_RELEASED".into()),
            dir,
        }
    }

    /// The dataset owning `key` and the key's path inside it.
    fn resolve(&self, key: &str) -> Option<(SimDataset, String)> {
        let rest = key.strip_prefix("datasets/")?;
        let (dashed, rel) = rest.split_once('/')?;
        let want = format!("datasets/{dashed}/");
        let ds = self
            .datasets()
            .iter()
            .find(|d| d.s3_prefix == want)?
            .clone();
        Some((ds, rel.to_string()))
    }

    /// The object `key`, if a regular file holds it. Folder keys are `None`
    /// (404 NoSuchKey, never a server error).
    pub fn object(&self, key: &str) -> Option<ObjectFile> {
        if let Some(o) = self.extra.get(key) {
            return Some(o.clone());
        }
        let (ds, rel) = self.resolve(key)?;
        if rel.is_empty()
            || rel
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return None;
        }
        let path = ds.dir.join(&rel);
        let (f, md) = open_version(&path)?;
        Some(ObjectFile {
            key: key.to_string(),
            etag: self.etags.of(&path, &f, &md),
            size: md.len(),
            modified: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            path,
            data: None,
            file: Some(Arc::new(f)),
        })
    }

    /// Every entry whose key starts with `prefix`, sorted by key, with keys
    /// below the next `/` folded into common prefixes when `delimited`.
    /// Only the folder named by `prefix` is read unless not `delimited`.
    /// One page: at most `max` entries with keys after `after`, and whether
    /// more follow.
    pub fn list_page(
        &self,
        prefix: &str,
        delimited: bool,
        after: Option<&str>,
        max: usize,
    ) -> (Vec<Entry>, bool) {
        let mut out: Vec<Entry> = match self.folder_page(prefix, delimited, after, max + 1) {
            Some(page) => page,
            None => self
                .list(prefix, delimited)
                .into_iter()
                .filter(|e| after.is_none_or(|m| e.key() > m))
                .take(max + 1)
                .collect(),
        };
        let truncated = out.len() > max;
        out.truncate(max);
        (out, truncated)
    }

    /// A delimited page of one folder inside a dataset, statting only the
    /// files on the page. `None` for other listings.
    fn folder_page(
        &self,
        prefix: &str,
        delimited: bool,
        after: Option<&str>,
        want: usize,
    ) -> Option<Vec<Entry>> {
        let dir_part = &prefix[..prefix.rfind('/').map_or(0, |i| i + 1)];
        if !delimited || dir_part.is_empty() || dir_part == "datasets/" {
            return None;
        }
        let (ds, rel) = self.resolve(dir_part)?;
        if rel.split('/').any(|s| s == "." || s == "..") || rel.contains("//") {
            return Some(self.overlay(prefix, after, want, Vec::new()));
        }
        let dir = ds.dir.join(rel.trim_end_matches('/'));
        let names = self.folder_names(&dir);
        let partial = &prefix[dir_part.len()..];
        // Sorted by key (a folder's ends in `/`), so the names starting
        // with `partial` are one run, and `after` a point in it.
        let mut start = names.partition_point(|(k, _)| k.as_str() < partial);
        if let Some(a) = after {
            start =
                start.max(names.partition_point(|(k, _)| format!("{dir_part}{k}").as_str() <= a));
        }
        let mut disk = Vec::new();
        for (k, is_dir) in names[start..].iter() {
            if disk.len() >= want || !k.starts_with(partial) {
                break;
            }
            let key = format!("{dir_part}{k}");
            if *is_dir {
                disk.push(Entry::Prefix(key));
            } else {
                let path = dir.join(k);
                if let Ok(md) = fs::metadata(&path) {
                    if md.is_file() {
                        disk.push(Entry::Object(self.file_object(key, path, &md)));
                    }
                }
            }
        }
        Some(self.overlay(prefix, after, want, disk))
    }

    /// Merges the extra (odd) keys under `prefix` into a sorted page.
    fn overlay(
        &self,
        prefix: &str,
        after: Option<&str>,
        want: usize,
        disk: Vec<Entry>,
    ) -> Vec<Entry> {
        let mut out: BTreeMap<String, Entry> =
            disk.into_iter().map(|e| (e.key().to_string(), e)).collect();
        for (k, o) in self.extra.range(prefix.to_string()..) {
            if !k.starts_with(prefix) {
                break;
            }
            let rest = &k[prefix.len()..];
            let e = match rest.find('/') {
                Some(i) => Entry::Prefix(k[..prefix.len() + i + 1].to_string()),
                None => Entry::Object(o.clone()),
            };
            if after.is_none_or(|a| e.key() > a) {
                out.insert(e.key().to_string(), e);
            }
        }
        out.into_values().take(want).collect()
    }

    /// The folder's entries as (name, or name + `/` for a folder), sorted.
    fn folder_names(&self, dir: &Path) -> FolderNames {
        let mtime = fs::metadata(dir)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut cache = self.folders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((t, names)) = cache.get(dir) {
            if *t == mtime {
                return names.clone();
            }
        }
        let mut names = Vec::new();
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                let Some(name) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                // Follows symlinks, as the listing of the whole folder does.
                let Ok(md) = fs::metadata(e.path()) else {
                    continue;
                };
                if md.is_dir() {
                    names.push((format!("{name}/"), true));
                } else if md.is_file() {
                    names.push((name, false));
                }
            }
        }
        names.sort();
        let names = Arc::new(names);
        if cache.len() > 10_000 {
            cache.clear();
        }
        // Folder mtimes tick coarsely (a few ms): a folder changed within the
        // last second may change again under the same mtime, so it is not
        // remembered until it has been quiet for a while.
        if mtime
            .elapsed()
            .is_ok_and(|age| age > Duration::from_secs(1))
        {
            cache.insert(dir.to_path_buf(), (mtime, names.clone()));
        }
        names
    }

    pub fn list(&self, prefix: &str, delimited: bool) -> Vec<Entry> {
        let mut out: BTreeMap<String, Entry> = BTreeMap::new();
        self.list_disk(prefix, delimited, &mut out);
        for (k, o) in self.extra.range(prefix.to_string()..) {
            if !k.starts_with(prefix) {
                break;
            }
            let rest = &k[prefix.len()..];
            match rest.find('/').filter(|_| delimited) {
                Some(i) => {
                    let p = k[..prefix.len() + i + 1].to_string();
                    out.insert(p.clone(), Entry::Prefix(p));
                }
                None => {
                    out.insert(k.clone(), Entry::Object(o.clone()));
                }
            }
        }
        out.into_values().collect()
    }

    fn list_disk(&self, prefix: &str, delimited: bool, out: &mut BTreeMap<String, Entry>) {
        let dir_part = &prefix[..prefix.rfind('/').map_or(0, |i| i + 1)];
        let partial = &prefix[dir_part.len()..];
        match dir_part {
            "" | "datasets/" => {
                for ds in self.datasets().iter() {
                    if !ds.s3_prefix.starts_with(prefix) && !prefix.starts_with(&ds.s3_prefix) {
                        continue;
                    }
                    if delimited {
                        let fold = if dir_part.is_empty() {
                            "datasets/".to_string()
                        } else {
                            ds.s3_prefix.clone()
                        };
                        if fold.starts_with(prefix) {
                            out.insert(fold.clone(), Entry::Prefix(fold));
                        }
                    } else {
                        self.walk(&ds.dir, &ds.s3_prefix, prefix, out);
                    }
                }
            }
            _ => {
                let Some((ds, rel)) = self.resolve(dir_part) else {
                    return;
                };
                if rel.split('/').any(|s| s == "." || s == "..") || rel.contains("//") {
                    return;
                }
                let dir = ds.dir.join(rel.trim_end_matches('/'));
                if delimited {
                    let Ok(rd) = fs::read_dir(&dir) else {
                        return;
                    };
                    for e in rd.flatten() {
                        let Some(name) = e.file_name().to_str().map(str::to_string) else {
                            continue;
                        };
                        if !name.starts_with(partial) {
                            continue;
                        }
                        let key = format!("{dir_part}{name}");
                        let Ok(md) = fs::metadata(e.path()) else {
                            continue;
                        };
                        if md.is_dir() {
                            out.insert(format!("{key}/"), Entry::Prefix(format!("{key}/")));
                        } else if md.is_file() {
                            out.insert(
                                key.clone(),
                                Entry::Object(self.file_object(key, e.path(), &md)),
                            );
                        }
                    }
                } else {
                    self.walk(&dir, dir_part, prefix, out);
                }
            }
        }
    }

    /// The object a regular file on disk holds, as a listing shows it. A
    /// file replaced since `md` was read is described as it is now (size,
    /// time and ETag of one version, never mixed).
    fn file_object(&self, key: String, path: PathBuf, md: &fs::Metadata) -> ObjectFile {
        let (etag, md) = match self.etags.known(&path, md) {
            Some(e) => (e, md.clone()),
            None => match open_version(&path) {
                Some((f, md)) => (self.etags.of(&path, &f, &md), md),
                None => (format!("{:032x}", md.len() ^ md.ino()), md.clone()),
            },
        };
        ObjectFile {
            etag,
            size: md.len(),
            modified: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            path,
            data: None,
            file: None,
            key,
        }
    }

    fn walk(&self, dir: &Path, key_prefix: &str, want: &str, out: &mut BTreeMap<String, Entry>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let key = format!("{key_prefix}{name}");
            let Ok(md) = fs::metadata(e.path()) else {
                continue;
            };
            if md.is_dir() {
                let sub = format!("{key}/");
                if sub.starts_with(want) || want.starts_with(&sub) {
                    self.walk(&e.path(), &sub, want, out);
                }
            } else if md.is_file() && key.starts_with(want) {
                out.insert(
                    key.clone(),
                    Entry::Object(self.file_object(key, e.path(), &md)),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: &[Entry]) -> Vec<&str> {
        v.iter().map(|e| e.key()).collect()
    }

    #[test]
    fn maps_folders_to_keys() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("10378.1/42");
        fs::create_dir_all(d.join("data/sub")).unwrap();
        fs::write(d.join("a.txt"), "a").unwrap();
        fs::write(d.join("data/b c.bin"), "bb").unwrap();
        fs::write(d.join("data/sub/ü"), "").unwrap();
        let s = FolderStore::new(t.path().to_path_buf());
        assert_eq!(s.datasets()[0].s3_prefix, "datasets/10378-1-42/");
        let top = s.list("datasets/10378-1-42/", true);
        assert_eq!(
            keys(&top),
            ["datasets/10378-1-42/a.txt", "datasets/10378-1-42/data/"]
        );
        let all = s.list("datasets/10378-1-42/", false);
        assert_eq!(
            keys(&all),
            [
                "datasets/10378-1-42/a.txt",
                "datasets/10378-1-42/data/b c.bin",
                "datasets/10378-1-42/data/sub/ü"
            ]
        );
        assert_eq!(
            keys(&s.list("datasets/10378-1-42/da", true)),
            ["datasets/10378-1-42/data/"]
        );
        assert_eq!(keys(&s.list("", true)), ["datasets/"]);
        assert_eq!(keys(&s.list("datasets/", true)), ["datasets/10378-1-42/"]);
        assert_eq!(
            s.object("datasets/10378-1-42/data/b c.bin").unwrap().size,
            2
        );
        assert!(s.object("datasets/10378-1-42/data").is_none());
        assert!(s.object("datasets/10378-1-42/data/").is_none());
        assert!(s.object("datasets/10378-1-42/../42/a.txt").is_none());
    }
}
