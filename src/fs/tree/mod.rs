//! The file tree: root → handle prefix → dataset → S3 folders and objects,
//! and `by-name/`. It owns names, inode numbers, listings and their TTLs,
//! and knows nothing of FUSE.
//!
//! Split as mountpoint-s3 splits its superblock: [`inode`] (the table and
//! its versioning rules), [`catalog`] (which datasets exist), `listing`
//! (folder listings), [`negative`] (names found missing) and
//! [`dirstream`] (a listing that fills while it is read). This module puts
//! them together: lookups, forgetting and collection.
//!
//! Network calls are made without holding the table lock; what they return
//! is merged in afterwards, stamped with when the call started, so one slow
//! call never blocks other lookups and an old answer never overrides a
//! newer one.
//!
//! Costs it promises (see docs/SEMANTICS.md): a lookup in a folder listed
//! within the metadata TTL makes no request, positive or negative; a lookup
//! of one handle never lists the registry; the registry is listed at most
//! once per TTL however many `ls` run.

pub mod catalog;
pub mod dirstream;
pub mod inode;
mod listing;
pub mod negative;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tracing::warn;

use super::names;
use super::FsError;
use crate::retry::Deadline;
use crate::s3::{ObjectMeta, StoreFactory};
pub use catalog::{Catalog, Dataset, Registry};
pub use dirstream::{Chunk, DirEntry, DirStream};
pub use inode::{Attr, FileKind, ROOT_INO};
use inode::{Etag, InodeTable, Kind, Version};
use negative::NegativeCache;

/// Name of the folder of symlinks by dataset name (`--by-name`). It cannot
/// clash with a handle prefix, which starts with a digit.
pub const BY_NAME: &str = "by-name";

#[derive(Clone, Debug)]
pub struct TreeConfig {
    /// How long listings, attributes and negative lookups are trusted.
    pub metadata_ttl: Duration,
    /// How long listings and attributes of a released (or pending)
    /// dataset are trusted: its data no longer changes.
    pub released_ttl: Duration,
    /// How long the registry listing (the datasets shown at the root) is
    /// trusted.
    pub registry_ttl: Duration,
    /// Keys per ListObjectsV2 page.
    pub list_page_size: i32,
    /// Only these handles exist (`--dataset`); the registry is never listed.
    pub datasets: Option<Vec<String>>,
    /// Show `by-name/<dataset name>` symlinks to the handle folders.
    pub by_name: bool,
    /// Bound of one request (a listing page, a lookup's probe).
    pub request_timeout: Duration,
}

impl Default for TreeConfig {
    fn default() -> Self {
        Self {
            metadata_ttl: Duration::from_secs(60),
            released_ttl: Duration::from_secs(24 * 3600),
            registry_ttl: Duration::from_secs(600),
            list_page_size: 1000,
            datasets: None,
            by_name: false,
            request_timeout: crate::retry::DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// Where a lookup hands the first bytes of a file it fetched beside its
/// probe (the read path, which serves the file's first read from them).
pub trait FirstBytes: Send + Sync {
    /// Whether guesses are wanted at all.
    fn wanted(&self) -> bool {
        true
    }

    /// `head`: bytes `0..head.len()` of `file`'s version.
    fn offer(&self, file: &FileRef, head: Bytes);
}

/// How much of a file a lookup in an unlisted folder fetches beside its
/// LIST: `cat`'s first read (128 KiB), 2.5 ms more at 50 MiB/s a stream.
pub const FIRST_BYTES: u64 = 128 * 1024;

/// How long a lookup waits, once its LIST has answered, for the first
/// bytes asked beside it (they come a transfer of FIRST_BYTES later).
const FIRST_BYTES_WAIT: Duration = Duration::from_millis(10);

/// What `open` needs of a file: where to read it and which version.
#[derive(Clone)]
pub struct FileRef {
    pub dataset: Arc<Dataset>,
    pub meta: ObjectMeta,
}

/// A complete listing of a folder.
struct Listing {
    at: Instant,
    /// Stamp of when it started: names not confirmed since are gone.
    started: u64,
    stream: Arc<DirStream>,
}

/// What is known of a folder's contents as a whole.
#[derive(Default)]
struct DirState {
    listing: Option<Listing>,
    /// A listing being fetched now, shared by everyone who opens the folder.
    pending: Option<Arc<DirStream>>,
    /// ListObjectsV2 pages the last complete listing of this folder took
    /// (0: never listed).
    pages: u32,
    /// Lookups that probed S3 since the last listing expired.
    probes: u32,
}

struct State {
    inodes: InodeTable,
    dirs: HashMap<u64, DirState>,
    negative: NegativeCache,
    /// Keys already logged as hidden (each once; bounded).
    hidden_logged: HashSet<String>,
    /// Lookups whose request failed (timed out, S3 or the API down), when
    /// and how: the kernel's second try (it revalidates a name, then looks
    /// it up afresh) fails at once instead of waiting out a second stall.
    failed: HashMap<(u64, Box<str>), (Instant, FsError)>,
}

/// A folder listed again by lookups past its TTL (see
/// `Tree::probe_or_relist`) whose last listing took at most this many
/// pages is waited for by the lookup that starts it (a few round trips:
/// the lookups after it then need none); a longer one is not.
const RELIST_WAIT_PAGES: u32 = 10;

/// The most a lookup waits for such a listing before probing its name.
const RELIST_WAIT: Duration = Duration::from_secs(2);

/// How long a failed lookup is remembered.
const LOOKUP_FAILURE_MEMORY: Duration = Duration::from_secs(5);

/// How much the tree holds, for the stats line.
#[derive(Clone, Copy, Debug, Default)]
pub struct TreeStats {
    /// Datasets resolved (their S3 location known).
    pub datasets: usize,
    pub inodes: usize,
    pub listings: usize,
    pub negative: usize,
}

pub struct Tree {
    cfg: TreeConfig,
    catalog: Arc<Catalog>,
    state: Mutex<State>,
    /// Orders requests by when they started (see [`inode`]).
    ticks: AtomicU64,
    /// Takes the first bytes lookups fetch; none fetched until set.
    first_bytes: OnceLock<Arc<dyn FirstBytes>>,
}

/// What a lookup must ask the network.
enum Ask {
    Dataset(String),
    Object(Arc<Dataset>, String),
    /// List the folder again (or join the listing on its way), and if
    /// `wait`, answer from it; else, or if that gives no answer, probe.
    Relist {
        ds: Arc<Dataset>,
        dir: String,
        wait: bool,
    },
    ByName,
}

impl Tree {
    pub fn new(
        cfg: TreeConfig,
        registry: Arc<dyn Registry>,
        stores: Arc<dyn StoreFactory>,
    ) -> Self {
        let mounted_at = SystemTime::now();
        let catalog = Arc::new(Catalog::new(
            registry,
            stores,
            // Never shorter than the metadata TTL: what the root shows is
            // metadata too.
            cfg.registry_ttl.max(cfg.metadata_ttl),
            cfg.datasets.clone(),
            mounted_at,
        ));
        Self {
            state: Mutex::new(State {
                inodes: InodeTable::new(mounted_at),
                dirs: HashMap::new(),
                negative: NegativeCache::new(cfg.metadata_ttl),
                failed: HashMap::new(),
                hidden_logged: HashSet::new(),
            }),
            cfg,
            catalog,
            ticks: AtomicU64::new(1),
            first_bytes: OnceLock::new(),
        }
    }

    /// From now on, a lookup that probes S3 for a name in a folder never
    /// listed also fetches the name's first [`FIRST_BYTES`] beside its
    /// LIST, and hands them to `sink` when they are of the version it
    /// found: the file's first read then needs no request of its own (a
    /// dataset's first file costs its API calls and one S3 round trip).
    pub fn set_first_bytes(&self, sink: Arc<dyn FirstBytes>) {
        let _ = self.first_bytes.set(sink);
    }

    /// How long the kernel may keep `ino`'s attributes and name: the
    /// released TTL inside a released dataset, else the metadata TTL.
    pub fn ttl(&self, ino: u64) -> Duration {
        let st = self.state();
        self.ttl_of(st.inodes.get(ino).map(|n| &n.kind))
    }

    /// How long the kernel may remember that a name does not exist.
    pub fn negative_ttl(&self) -> Duration {
        self.cfg.metadata_ttl
    }

    /// Trust in what is known of a `kind`: a released dataset's never
    /// changes; a pending one's does not change unless its release is
    /// denied, which the registry tells within its TTL; anything else only
    /// for the metadata TTL.
    pub(crate) fn ttl_of(&self, kind: Option<&Kind>) -> Duration {
        let ds = match kind {
            Some(Kind::Dataset(ds))
            | Some(Kind::Folder { ds, .. })
            | Some(Kind::File { ds, .. }) => Some(ds),
            _ => None,
        };
        let metadata = self.cfg.metadata_ttl;
        match ds {
            Some(ds) if ds.release.is_released() => self.cfg.released_ttl.max(metadata),
            Some(ds) if ds.release.is_pending() => self
                .cfg
                .released_ttl
                .min(self.cfg.registry_ttl)
                .max(metadata),
            _ => metadata,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent maps (every
        // mutation is a single insert or remove), so poisoning is not fatal.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new stamp: taken when a request starts.
    fn stamp(&self) -> u64 {
        self.ticks.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn request_deadline(&self) -> Deadline {
        Deadline::after(self.cfg.request_timeout)
    }

    fn fresh_listing<'a>(&self, st: &'a State, dir: u64) -> Option<&'a Listing> {
        st.dirs
            .get(&dir)
            .and_then(|d| d.listing.as_ref())
            .filter(|l| self.listing_fresh(st, dir, l))
    }

    /// Whether `l`, the listing of `dir`, is still trusted: by the TTL of
    /// its dataset's release status now (a release denied since shortens
    /// it at once).
    fn listing_fresh(&self, st: &State, dir: u64, l: &Listing) -> bool {
        l.at.elapsed() < self.ttl_of(st.inodes.get(dir).map(|n| &n.kind))
    }

    /// Attributes of `ino`; ESTALE for an inode this mount does not know.
    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        self.state().inodes.attr(ino).ok_or(FsError::Stale)
    }

    /// Where symlink `ino` points.
    pub fn readlink(&self, ino: u64) -> Result<String, FsError> {
        match &self.state().inodes.get(ino).ok_or(FsError::Stale)?.kind {
            Kind::Link(t) => Ok(t.to_string()),
            _ => Err(FsError::Invalid),
        }
    }

    /// Looks `name` up in `parent`. On success the kernel is taken to hold
    /// one more reference to the inode returned (the caller replies it).
    pub async fn lookup(
        self: &Arc<Self>,
        parent: u64,
        name: &str,
        deadline: Deadline,
    ) -> Result<Attr, FsError> {
        let ask = {
            let mut st = self.state();
            match self.lookup_local(&mut st, parent, name)? {
                Ok(attr) => return Ok(attr),
                Err(ask) => ask,
            }
        };
        let key = (parent, Box::<str>::from(name));
        if let Some((at, e)) = self.state().failed.get(&key) {
            if at.elapsed() < LOOKUP_FAILURE_MEMORY {
                return Err(e.clone());
            }
        }
        let result = self.ask(parent, name, ask, deadline).await;
        let mut st = self.state();
        match &result {
            Err(e) if !matches!(e, FsError::NotFound | FsError::Interrupted) => {
                if st.failed.len() >= 4096 {
                    st.failed
                        .retain(|_, (at, _)| at.elapsed() < LOOKUP_FAILURE_MEMORY);
                }
                st.failed.insert(key, (Instant::now(), e.clone()));
            }
            _ => {
                st.failed.remove(&key);
            }
        }
        result
    }

    /// The network part of a lookup.
    async fn ask(
        self: &Arc<Self>,
        parent: u64,
        name: &str,
        ask: Ask,
        deadline: Deadline,
    ) -> Result<Attr, FsError> {
        let ask = match ask {
            Ask::Relist { ds, dir, wait } => {
                // The folder's listing starts (or is joined) on its own
                // task. A short one (a few pages) is waited for, within a
                // bound, and answers this lookup; a long one is not (a
                // listing of a hundred thousand names outlasts a lookup),
                // and neither its failure nor its slowness fails this
                // lookup: the name is probed as ever.
                if let Some(listing) = self.start_listing(parent).filter(|_| wait) {
                    let within = deadline.min(Deadline::after(RELIST_WAIT));
                    if let Some(Ok(())) = within.run(listing.finished()).await {
                        let mut st = self.state();
                        if let Ok(attr) = self.lookup_local(&mut st, parent, name)? {
                            return Ok(attr);
                        }
                    }
                }
                Ask::Object(ds, dir)
            }
            other => other,
        };
        let stamp = self.stamp();
        match ask {
            Ask::Dataset(handle) => {
                let ds = match self.catalog.fetch(&handle, deadline).await {
                    Err(FsError::NotFound) => {
                        let mut st = self.state();
                        // Resolved by a later request meanwhile: that wins.
                        if let Some(ino) = st.inodes.child(parent, name) {
                            return Ok(Self::counted(&mut st, ino));
                        }
                        st.negative.insert(parent, name, stamp);
                        return Err(FsError::NotFound);
                    }
                    other => other?,
                };
                // No read credentials yet: a `stat` or `ls -l` of dataset
                // folders needs none (the data store pays for each); the
                // first listing or read inside asks for them.
                let mut st = self.state();
                let ino = st.inodes.install(parent, name, Kind::Dataset(ds), stamp);
                Ok(Self::counted(&mut st, ino))
            }
            Ask::Object(ds, dir) => {
                let mut stamp = stamp;
                // A change found while the probe was on its way (a read met
                // a new ETag) makes its answer out of date: ask once more,
                // so the kernel's re-lookup after ESTALE gets what is there.
                for attempt in 0..2 {
                    let head = (attempt == 0)
                        .then(|| {
                            self.guess_first_bytes(&ds, parent, &format!("{dir}{name}"), deadline)
                        })
                        .flatten();
                    // However this lookup ends, the guess ends with it.
                    let _stop = head
                        .as_ref()
                        .map(|h| crate::task::AbortOnDrop(h.abort_handle()));
                    let found = self.probe(&ds, &dir, name, deadline).await?;
                    let is_file = matches!(found, Some(Kind::File { .. }));
                    let head = match head {
                        Some(h) if is_file => tokio::time::timeout(FIRST_BYTES_WAIT, h)
                            .await
                            .ok()
                            .and_then(|r| r.ok())
                            .flatten(),
                        _ => None,
                    };
                    let mut st = self.state();
                    // What a later request said of the name wins over this
                    // answer, either way.
                    let newer = st
                        .inodes
                        .child(parent, name)
                        .filter(|i| st.inodes.get(*i).is_some_and(|n| n.stamp > stamp));
                    let ino = match (found, newer) {
                        (_, Some(ino)) => ino,
                        (Some(_), None) if st.negative.newer_than(parent, name, stamp) => {
                            return Err(FsError::NotFound)
                        }
                        (Some(kind), None) => {
                            st.negative.remove(parent, name);
                            st.inodes.install(parent, name, kind, stamp)
                        }
                        (None, None) => {
                            st.inodes.remove_name(parent, name, stamp);
                            st.negative.insert(parent, name, stamp);
                            return Err(FsError::NotFound);
                        }
                    };
                    let stale = st.inodes.get(ino).is_some_and(|n| n.stale);
                    if !stale || attempt == 1 {
                        let attr = Self::counted(&mut st, ino);
                        drop(st);
                        if let Some((bytes, meta)) = head {
                            self.offer_first_bytes(ino, bytes, &meta);
                        }
                        return Ok(attr);
                    }
                    drop(st);
                    stamp = self.stamp();
                }
                unreachable!("the second attempt always answers")
            }
            Ask::Relist { .. } => unreachable!("turned into a probe above"),
            Ask::ByName => {
                // Names come only from the registry: list it (once per TTL).
                self.readdir(parent, deadline).await?;
                let mut st = self.state();
                match st.inodes.child(parent, name) {
                    Some(ino) => Ok(Self::counted(&mut st, ino)),
                    None => Err(FsError::NotFound),
                }
            }
        }
    }

    /// A lookup answered from memory (`Ok(Ok)`), known missing
    /// (`Err(NotFound)`), or what to ask (`Ok(Err)`).
    fn lookup_local(
        &self,
        st: &mut State,
        parent: u64,
        name: &str,
    ) -> Result<Result<Attr, Ask>, FsError> {
        let node = st.inodes.get(parent).ok_or(FsError::Stale)?;
        match &node.kind {
            Kind::File { .. } | Kind::Link(_) => Err(FsError::NotDir),
            Kind::Root => {
                // Any name shaped like a handle prefix resolves, so a handle
                // that is not listed still opens by path; nothing is fetched
                // until a suffix below it is looked up.
                let kind = if name == BY_NAME && self.cfg.by_name {
                    Kind::ByName
                } else if names::is_handle_prefix(name) && self.catalog.allows_prefix(name) {
                    Kind::Prefix
                } else {
                    return Err(FsError::NotFound);
                };
                let stamp = self.stamp();
                let ino = st.inodes.install(parent, name, kind, stamp);
                Ok(Ok(Self::counted(st, ino)))
            }
            Kind::Prefix => {
                let handle = format!("{}/{name}", node.name);
                if !names::is_handle_suffix(name) || !self.catalog.allows(&handle) {
                    return Err(FsError::NotFound);
                }
                if let Some(ds) = self.catalog.known(&handle) {
                    let stamp = self.stamp();
                    let ino = st.inodes.install(parent, name, Kind::Dataset(ds), stamp);
                    return Ok(Ok(Self::counted(st, ino)));
                }
                if st.negative.contains(parent, name) {
                    return Err(FsError::NotFound);
                }
                Ok(Err(Ask::Dataset(handle)))
            }
            Kind::Dataset(_) | Kind::Folder { .. } => {
                let Some((ds, dir)) = node.kind.folder() else {
                    return Err(FsError::NotDir);
                };
                let ask = Ask::Object(ds.clone(), dir.to_string());
                if names::check(name).is_err() {
                    return Err(FsError::NotFound);
                }
                // A listing within its TTL is the answer, both ways; a name
                // it did not confirm (stamped before it) is gone.
                if let Some(started) = self.fresh_listing(st, parent).map(|l| l.started) {
                    let found = st.inodes.child(parent, name).and_then(|ino| {
                        let n = st.inodes.get(ino)?;
                        (n.stamp >= started).then_some((ino, n.stale))
                    });
                    return match found {
                        Some((ino, false)) => Ok(Ok(Self::counted(st, ino))),
                        // Known out of date: ask S3 what it is now.
                        Some((_, true)) => Ok(Err(ask)),
                        None => Err(FsError::NotFound),
                    };
                }
                if st.negative.contains(parent, name) {
                    return Err(FsError::NotFound);
                }
                let (ds, dir) = (ds.clone(), dir.to_string());
                Ok(Err(self.probe_or_relist(st, parent, ds, dir)))
            }
            Kind::ByName => match self.fresh_listing(st, parent) {
                Some(_) => match st.inodes.child(parent, name) {
                    Some(ino) => Ok(Ok(Self::counted(st, ino))),
                    None => Err(FsError::NotFound),
                },
                None => Ok(Err(Ask::ByName)),
            },
        }
    }

    /// How to look a name up in folder `parent`, whose listing has expired
    /// (or never was): probe the name, until the probes since the last listing cost as many
    /// requests as listing the folder again did, then list it again (on
    /// its own task; the name is still probed). A
    /// `cat *` in a large folder past the TTL thus costs at most two
    /// listings' worth of LISTs per TTL (one per lookup before), and a
    /// lone lookup in a huge folder stays one LIST.
    fn probe_or_relist(&self, st: &mut State, parent: u64, ds: Arc<Dataset>, dir: String) -> Ask {
        // A TTL of zero keeps no listing: listing again would be waste.
        let relist = match st.dirs.get_mut(&parent) {
            _ if self.cfg.metadata_ttl.is_zero() => None,
            Some(d) if d.pages > 0 => {
                d.probes += 1;
                if d.probes > d.pages {
                    d.probes = 0;
                    Some(d.pages <= RELIST_WAIT_PAGES)
                } else {
                    None
                }
            }
            _ => None,
        };
        match relist {
            Some(wait) => Ask::Relist { ds, dir, wait },
            None => Ask::Object(ds, dir),
        }
    }

    /// Counts the kernel's new reference to `ino` and returns its attributes.
    fn counted(st: &mut State, ino: u64) -> Attr {
        st.inodes.count_lookup(ino);
        st.inodes
            .attr(ino)
            .unwrap_or_else(|| unreachable!("inode {ino} was just installed"))
    }

    /// Starts fetching the first bytes of `key`, if a sink takes them and
    /// folder `parent` was never listed (in a listed one, the lookup of a
    /// name that lists no longer is a `stat` as often as an `open`).
    fn guess_first_bytes(
        &self,
        ds: &Arc<Dataset>,
        parent: u64,
        key: &str,
        deadline: Deadline,
    ) -> Option<tokio::task::JoinHandle<Option<(Bytes, ObjectMeta)>>> {
        if !self.first_bytes.get()?.wanted() {
            return None;
        }
        if self.state().dirs.get(&parent).is_some_and(|d| d.pages > 0) {
            return None;
        }
        let (store, key) = (ds.store.clone(), key.to_string());
        Some(tokio::spawn(async move {
            // A folder or a missing name is a 404: no guess, no harm.
            store
                .get_first(&key, FIRST_BYTES, deadline)
                .await
                .ok()
                .flatten()
        }))
    }

    /// Hands `bytes` (the start of `meta`'s version) to the sink if file
    /// `ino` is that version, by ETag and size.
    fn offer_first_bytes(&self, ino: u64, bytes: Bytes, meta: &ObjectMeta) {
        let (Some(sink), Ok(file)) = (self.first_bytes.get(), self.open_file(ino)) else {
            return;
        };
        let same = !meta.etag.is_empty()
            && file.meta.etag == meta.etag
            && file.meta.size == meta.size
            && file.meta.key == meta.key;
        if same && bytes.len() as u64 == meta.size.min(FIRST_BYTES) {
            sink.offer(&file, bytes);
        }
    }

    /// What `dir` + `name` is in S3: one LIST with the name as prefix
    /// answers both questions (the object `key` sorts first if it exists,
    /// and everything under `key/` folds into one common prefix). No HEAD.
    async fn probe(
        &self,
        ds: &Arc<Dataset>,
        dir: &str,
        name: &str,
        deadline: Deadline,
    ) -> Result<Option<Kind>, FsError> {
        let key = format!("{dir}{name}");
        let sub = format!("{key}/");
        let page = ds
            .store
            .list(&key, Some("/"), None, Some(100), deadline)
            .await?;
        let mut is_dir = page.prefixes.contains(&sub);
        if !is_dir && page.next.is_some() {
            // Many siblings sort between `key` and `key/` (`key.txt`, `key-1`...).
            let p = ds
                .store
                .list(&sub, Some("/"), None, Some(1), deadline)
                .await?;
            is_dir = !p.objects.is_empty() || !p.prefixes.is_empty();
        }
        if is_dir {
            return Ok(Some(Kind::Folder {
                ds: ds.clone(),
                prefix: sub.into(),
            }));
        }
        Ok(page
            .objects
            .into_iter()
            .find(|o| o.key == key)
            .map(|meta| file_kind(ds, &meta)))
    }

    /// What `open` needs to read file `ino`: ESTALE if it is out of date
    /// (the kernel then looks the name up again and opens what is there now).
    pub fn open_file(&self, ino: u64) -> Result<FileRef, FsError> {
        let st = self.state();
        let node = st.inodes.get(ino).ok_or(FsError::Stale)?;
        let Kind::File { ds, version } = &node.kind else {
            return Err(FsError::IsDir);
        };
        if node.stale {
            return Err(FsError::Stale);
        }
        let dir = st
            .inodes
            .get(node.parent)
            .and_then(|p| p.kind.folder().map(|(_, dir)| dir.to_string()))
            .ok_or(FsError::Stale)?;
        Ok(FileRef {
            dataset: ds.clone(),
            meta: ObjectMeta {
                key: format!("{dir}{}", node.name),
                size: version.size,
                etag: version.etag.to_string(),
                last_modified: version.mtime(),
            },
        })
    }

    /// The next `n` files after file `ino` in its folder, in name order,
    /// among those this mount knows (listed or looked up) and `keep`
    /// accepts (given the full key and the size): what a reader of a
    /// series of files (`ocean_20240101.nc`, `ocean_20240102.nc`, ...)
    /// opens next. No network: only what the inode table holds.
    pub fn files_after(
        &self,
        ino: u64,
        n: usize,
        keep: impl Fn(&str, u64) -> bool,
    ) -> Vec<FileRef> {
        let st = self.state();
        let Some(node) = st.inodes.get(ino) else {
            return Vec::new();
        };
        let Some(dir) = st
            .inodes
            .get(node.parent)
            .and_then(|p| p.kind.folder().map(|(_, dir)| dir.to_string()))
        else {
            return Vec::new();
        };
        // The few names right after this one (a folder may hold 100,000:
        // no sort of them all per open), then those `keep` accepts.
        let mut kids: Vec<(Arc<str>, u64)> = Vec::with_capacity(4 * n + 1);
        for (name, i) in st.inodes.children(node.parent) {
            if *name <= *node.name {
                continue;
            }
            let at = kids.partition_point(|k| k.0 < name);
            if at < 4 * n {
                kids.insert(at, (name, i));
                kids.truncate(4 * n);
            }
        }
        kids.into_iter()
            .filter_map(|(name, i)| {
                let sib = st.inodes.get(i)?;
                let Kind::File { ds, version } = &sib.kind else {
                    return None;
                };
                let key = format!("{dir}{name}");
                (!sib.stale && keep(&key, version.size)).then(|| FileRef {
                    dataset: ds.clone(),
                    meta: ObjectMeta {
                        key,
                        size: version.size,
                        etag: version.etag.to_string(),
                        last_modified: version.mtime(),
                    },
                })
            })
            .take(n)
            .collect()
    }

    /// A read of `ino` met another version of its object (or none): the
    /// next open looks it up again, and no listing already on its way can
    /// make it current. Returns its folder and name (to tell the kernel).
    pub fn mark_stale(&self, ino: u64) -> Option<(u64, Arc<str>)> {
        let stamp = self.stamp();
        self.state().inodes.mark_stale(ino, stamp)
    }

    /// The kernel dropped `n` references to `ino` (FUSE forget).
    pub fn forget(&self, ino: u64, n: u64) {
        let mut st = self.state();
        if st.inodes.forget(ino, n) {
            self.collect(&mut st, ino);
        }
    }

    /// Removes `ino` if nothing keeps it any more, then its folder if that
    /// was all that kept the folder.
    fn collect(&self, st: &mut State, mut ino: u64) {
        loop {
            let Some(node) = st.inodes.get(ino) else {
                return;
            };
            let busy = st
                .dirs
                .get(&ino)
                .is_some_and(|d| d.pending.is_some() || d.listing.is_some());
            if ino == ROOT_INO || node.lookups > 0 || busy || st.inodes.has_children(ino) {
                return;
            }
            // Still named by its folder's listing (within the TTL, or read
            // by an open directory handle), or by one on its way: the end of
            // that listing decides (it may just have confirmed this name; a
            // lookup waiting for it answers from the table).
            let parent = node.parent;
            let named = st.inodes.child(parent, &node.name) == Some(ino);
            let listed = st.dirs.get(&parent).is_some_and(|d| {
                d.pending.is_some() || d.listing.as_ref().is_some_and(|l| node.stamp >= l.started)
            }) && named;
            if listed {
                return;
            }
            st.dirs.remove(&ino);
            match st.inodes.remove(ino) {
                Some(p) => ino = p,
                None => return,
            }
        }
    }

    /// Drops listings past their TTL and whatever only they kept. A
    /// listing an open directory handle still reads is kept (with the
    /// inodes it names) until the handle is closed: `readdir` hands its
    /// entries out as they are, however long the reader takes.
    pub fn sweep(&self) {
        let mut st = self.state();
        let expired: Vec<u64> = st
            .dirs
            .iter()
            .filter(|(ino, d)| {
                d.listing.as_ref().is_some_and(|l| {
                    !self.listing_fresh(&st, **ino, l) && Arc::strong_count(&l.stream) == 1
                })
            })
            .map(|(ino, _)| *ino)
            .collect();
        for dir in &expired {
            if let Some(d) = st.dirs.get_mut(dir) {
                d.listing = None;
            }
            for (_, child) in st.inodes.children(*dir) {
                self.collect(&mut st, child);
            }
            self.collect(&mut st, *dir);
        }
        let State { dirs, inodes, .. } = &mut *st;
        // A folder's listing cost (`pages`) is kept while its inode lives:
        // lookups past the TTL weigh probing against listing again by it.
        dirs.retain(|ino, d| {
            inodes.get(*ino).is_some()
                && (d.listing.is_some() || d.pending.is_some() || d.pages > 0)
        });
    }

    /// Sweeps every half TTL (at least every second, at most every 30 s)
    /// while the tree lives.
    pub fn start_sweeper(self: &Arc<Self>) {
        let me: Weak<Self> = Arc::downgrade(self);
        let every =
            (self.cfg.metadata_ttl / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match me.upgrade() {
                    Some(t) => t.sweep(),
                    None => return,
                }
            }
        });
    }

    pub fn stats(&self) -> TreeStats {
        let datasets = self.catalog.resolved_count();
        let st = self.state();
        TreeStats {
            datasets,
            inodes: st.inodes.len(),
            listings: st.dirs.values().filter(|d| d.listing.is_some()).count(),
            negative: st.negative.len(),
        }
    }

    /// Whether any of `entries` still stands for something (a chunk whose
    /// names were all deleted since is skipped, not answered empty: an
    /// empty answer is the end of the folder to the kernel).
    pub fn any_live(&self, parent: u64, entries: &[DirEntry]) -> bool {
        let st = self.state();
        entries
            .iter()
            .any(|e| st.inodes.child(parent, &e.name).is_some())
    }

    /// Hands out `entries` (a chunk of `parent`'s listing) with the
    /// attributes of what each name stands for *now*; with `plus`, each
    /// entry `add` takes is counted as a kernel reference (readdirplus).
    /// `add(k, entry, attr)` returns true when it is full (the entry was
    /// not taken).
    ///
    /// A name gone since the listing is handed out with inode 0: the
    /// kernel makes no entry for it and readers (glibc's `readdir`, Go)
    /// skip it, as a deleted slot. Skipping it here instead could leave an
    /// answer empty, which the kernel takes for the end of the folder.
    pub fn fill(
        &self,
        parent: u64,
        entries: &[DirEntry],
        plus: bool,
        mut add: impl FnMut(usize, &DirEntry, &Attr) -> bool,
    ) {
        let mut st = self.state();
        for (k, e) in entries.iter().enumerate() {
            let live = st
                .inodes
                .child(parent, &e.name)
                .and_then(|ino| st.inodes.attr(ino));
            let attr = live.unwrap_or(Attr {
                ino: 0,
                kind: e.kind,
                size: 0,
                mtime: SystemTime::UNIX_EPOCH,
            });
            if add(k, e, &attr) {
                return;
            }
            if plus && attr.ino != 0 {
                st.inodes.count_lookup(attr.ino);
            }
        }
    }

    /// Loads a pinned dataset (`--dataset`) and its read credentials, so a
    /// typo or a missing permission fails the mount, not the first read.
    pub async fn pin_ready(&self, handle: &str) -> Result<(), FsError> {
        let deadline = self.request_deadline();
        let ds = self.catalog.fetch(handle, deadline).await?;
        Ok(ds.store.prepare(deadline).await?)
    }

    fn log_hidden(st: &mut State, key: &str, why: &str) {
        if st.hidden_logged.len() < 100_000 && st.hidden_logged.insert(key.to_string()) {
            warn!(key = %key.escape_debug(), reason = why, "S3 key hidden from the mount");
        }
    }
}

/// The inode kind of an object as a listing or probe describes it.
fn file_kind(ds: &Arc<Dataset>, meta: &ObjectMeta) -> Kind {
    Kind::File {
        ds: ds.clone(),
        version: Version::new(meta.size, meta.last_modified, Etag::parse(&meta.etag)),
    }
}

#[cfg(test)]
mod tests;
