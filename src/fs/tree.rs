//! The inode table: root → handle prefix → dataset → S3 folders and objects.
//!
//! It owns names, inode numbers, listings and their TTLs, and knows nothing
//! of FUSE. Network calls are made without holding the table lock; results
//! are merged in afterwards, so one slow listing never blocks other lookups.
//!
//! Costs it promises (see docs/SEMANTICS.md): a lookup in a folder listed
//! within the metadata TTL makes no request, positive or negative; a lookup
//! of one handle never lists the registry; the registry is listed at most
//! once per TTL however many `ls` run.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tracing::{debug, warn};

use super::dirstream::DirStream;
use super::names;
use super::FsError;
use crate::api::{ApiError, DataStoreClient};
use crate::s3::{ObjectMeta, ObjectStore, StoreFactory};
use crate::wire::{split_handle, ItemDataset};

pub const ROOT_INO: u64 = 1;

/// The registry as the tree needs it.
#[async_trait]
pub trait Catalog: Send + Sync {
    async fn list(&self) -> Result<Vec<ItemDataset>, ApiError>;
    async fn fetch(&self, handle: &str) -> Result<ItemDataset, ApiError>;
}

#[async_trait]
impl Catalog for DataStoreClient {
    async fn list(&self) -> Result<Vec<ItemDataset>, ApiError> {
        self.list_datasets().await
    }
    async fn fetch(&self, handle: &str) -> Result<ItemDataset, ApiError> {
        self.fetch_dataset(handle).await
    }
}

#[derive(Clone, Debug)]
pub struct TreeConfig {
    /// How long listings, attributes and negative lookups are trusted.
    pub metadata_ttl: Duration,
    /// Keys per ListObjectsV2 page.
    pub list_page_size: i32,
    /// Only these handles exist (`--dataset`); the registry is never listed.
    pub datasets: Option<Vec<String>>,
    /// Show `by-name/<dataset name>` symlinks to the handle folders.
    pub by_name: bool,
}

impl Default for TreeConfig {
    fn default() -> Self {
        Self {
            metadata_ttl: Duration::from_secs(60),
            list_page_size: 1000,
            datasets: None,
            by_name: false,
        }
    }
}

/// One dataset: where its objects live and how to reach them.
pub struct Dataset {
    pub handle: String,
    pub bucket: String,
    /// Key prefix, always ending in `/`.
    pub prefix: String,
    pub updated: SystemTime,
    /// Human-readable name from the registry, for `by-name/`.
    pub name: Option<String>,
    pub store: Arc<dyn ObjectStore>,
    /// Read credentials were asked for ahead of the first listing.
    pub prepared: std::sync::atomic::AtomicBool,
}

/// Name of the folder of symlinks by dataset name (`--by-name`). It cannot
/// clash with a handle prefix, which starts with a digit.
pub const BY_NAME: &str = "by-name";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    File,
    Symlink,
}

/// Attributes of one inode, FUSE-agnostic.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    pub size: u64,
    pub mtime: SystemTime,
}

#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: String,
    pub attr: Attr,
}

/// What `open` needs of a file: where to read it and which version.
#[derive(Clone)]
pub struct FileRef {
    pub dataset: Arc<Dataset>,
    pub meta: ObjectMeta,
}

#[derive(Clone)]
enum Kind {
    Root,
    Prefix(String),
    Dir {
        ds: Arc<Dataset>,
        prefix: String,
    },
    File {
        ds: Arc<Dataset>,
        meta: ObjectMeta,
    },
    /// `by-name/`.
    ByName,
    /// `by-name/<name>` → `../<prefix>/<suffix>`.
    Link(String),
}

impl Kind {
    fn file_kind(&self) -> FileKind {
        match self {
            Kind::File { .. } => FileKind::File,
            Kind::Link(_) => FileKind::Symlink,
            _ => FileKind::Directory,
        }
    }
}

struct Listing {
    at: Instant,
    children: BTreeMap<String, u64>,
    /// The same entries, as open handles read them.
    stream: Arc<DirStream>,
}

struct Node {
    parent: u64,
    name: String,
    kind: Kind,
    /// The object changed under an open file: refresh before the next open.
    stale: bool,
    listing: Option<Listing>,
    /// A listing being fetched now, shared by everyone who opens the folder.
    pending: Option<Arc<DirStream>>,
    /// Names recently found missing, with when.
    missing: HashMap<String, Instant>,
}

#[derive(Default)]
struct State {
    nodes: HashMap<u64, Node>,
    index: HashMap<(u64, String), u64>,
    next_ino: u64,
    datasets: HashMap<String, Arc<Dataset>>,
    /// Handles seen in the last registry listing, and when.
    registry: Option<(Instant, BTreeSet<String>)>,
    hidden_logged: HashSet<String>,
}

pub struct Tree {
    cfg: TreeConfig,
    catalog: Arc<dyn Catalog>,
    stores: Arc<dyn StoreFactory>,
    state: Mutex<State>,
    /// Single flight for registry listings.
    registry_refresh: tokio::sync::Mutex<()>,
    mounted_at: SystemTime,
}

impl Tree {
    pub fn new(cfg: TreeConfig, catalog: Arc<dyn Catalog>, stores: Arc<dyn StoreFactory>) -> Self {
        let mut st = State {
            next_ino: ROOT_INO + 1,
            ..Default::default()
        };
        st.nodes.insert(
            ROOT_INO,
            Node {
                parent: ROOT_INO,
                name: String::new(),
                stale: false,
                kind: Kind::Root,
                listing: None,
                pending: None,
                missing: HashMap::new(),
            },
        );
        Self {
            cfg,
            catalog,
            stores,
            state: Mutex::new(st),
            registry_refresh: tokio::sync::Mutex::new(()),
            mounted_at: SystemTime::now(),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.cfg.metadata_ttl
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent maps (every
        // mutation is a single insert), so poisoning is not fatal.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh(&self, at: Instant) -> bool {
        at.elapsed() < self.cfg.metadata_ttl
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let st = self.state();
        let node = st.nodes.get(&ino).ok_or(FsError::NotFound)?;
        Ok(self.attr_of(ino, &node.kind))
    }

    fn attr_of(&self, ino: u64, kind: &Kind) -> Attr {
        match kind {
            Kind::File { meta, .. } => Attr {
                ino,
                kind: FileKind::File,
                size: meta.size,
                mtime: meta.last_modified,
            },
            Kind::Link(target) => Attr {
                ino,
                kind: FileKind::Symlink,
                size: target.len() as u64,
                mtime: self.mounted_at,
            },
            Kind::Dir { ds, prefix } if *prefix == ds.prefix => Attr {
                ino,
                kind: FileKind::Directory,
                size: 0,
                mtime: ds.updated,
            },
            _ => Attr {
                ino,
                kind: FileKind::Directory,
                size: 0,
                mtime: self.mounted_at,
            },
        }
    }

    /// Inode for `name` under `parent`, reusing the number it had before
    /// unless it changed between file and directory.
    fn intern(&self, st: &mut State, parent: u64, name: &str, kind: Kind) -> u64 {
        let key = (parent, name.to_string());
        if let Some(&ino) = st.index.get(&key) {
            if let Some(node) = st.nodes.get_mut(&ino) {
                if node.kind.file_kind() == kind.file_kind() {
                    node.kind = kind;
                    node.stale = false;
                    return ino;
                }
            }
        }
        let ino = st.next_ino;
        st.next_ino += 1;
        st.nodes.insert(
            ino,
            Node {
                parent,
                name: name.to_string(),
                stale: false,
                kind,
                listing: None,
                pending: None,
                missing: HashMap::new(),
            },
        );
        st.index.insert(key, ino);
        ino
    }

    fn entry(&self, st: &mut State, parent: u64, name: &str, kind: Kind) -> Attr {
        let ino = self.intern(st, parent, name, kind.clone());
        self.attr_of(ino, &kind)
    }

    fn log_hidden(&self, st: &mut State, key: &str, why: names::Hidden) {
        if st.hidden_logged.insert(key.to_string()) {
            warn!(key = %key.escape_debug(), reason = why.reason(), "S3 key hidden from the mount");
        }
    }

    fn dataset_from(&self, st: &mut State, item: &ItemDataset) -> Arc<Dataset> {
        if let Some(ds) = st.datasets.get(&item.id) {
            return ds.clone();
        }
        let mut prefix = item.s3.path.trim_start_matches('/').to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let ds = Arc::new(Dataset {
            handle: item.id.clone(),
            bucket: item.s3.bucket_name.clone(),
            store: self.stores.open(&item.id, &item.s3.bucket_name),
            prefix,
            name: item.name().map(str::to_string),
            prepared: Default::default(),
            updated: item
                .updated_timestamp
                .or(item.created_timestamp)
                .filter(|t| *t > 0)
                .map(|t| UNIX_EPOCH + Duration::from_secs(t as u64))
                .unwrap_or(self.mounted_at),
        });
        st.datasets.insert(item.id.clone(), ds.clone());
        ds
    }

    /// Loads a pinned dataset (`--dataset`) and its read credentials, so a
    /// typo or a missing permission fails the mount, not the first read.
    pub async fn pin_ready(&self, handle: &str) -> Result<(), FsError> {
        self.pin(handle).await?;
        let ds = self.state().datasets.get(handle).cloned();
        match ds {
            Some(ds) => Ok(ds.store.prepare().await?),
            None => Err(FsError::NotFound),
        }
    }

    /// Loads a pinned dataset (`--dataset`): its record is fetched once.
    pub async fn pin(&self, handle: &str) -> Result<(), FsError> {
        if self.state().datasets.contains_key(handle) {
            return Ok(());
        }
        let item = self.catalog.fetch(handle).await?;
        if item.id != handle {
            warn!(asked = %handle, got = %item.id, "fetch-dataset returned another handle");
            return Err(FsError::NotFound);
        }
        let mut st = self.state();
        self.dataset_from(&mut st, &item);
        Ok(())
    }

    fn pinned(&self, handle: &str) -> bool {
        self.cfg
            .datasets
            .as_ref()
            .is_none_or(|p| p.iter().any(|h| h == handle))
    }

    /// The registry's handles, listed at most once per TTL; with pinned
    /// datasets, just those (the registry is never listed).
    async fn registry(&self) -> Result<BTreeSet<String>, FsError> {
        if let Some(pinned) = &self.cfg.datasets {
            for h in pinned {
                self.pin(h).await?;
            }
            return Ok(pinned.iter().cloned().collect());
        }
        if let Some((at, set)) = &self.state().registry {
            if self.fresh(*at) {
                return Ok(set.clone());
            }
        }
        let _flight = self.registry_refresh.lock().await;
        if let Some((at, set)) = &self.state().registry {
            if self.fresh(*at) {
                return Ok(set.clone());
            }
        }
        let items = self.catalog.list().await?;
        let mut st = self.state();
        let mut set = BTreeSet::new();
        for item in &items {
            if split_handle(&item.id).is_none() {
                warn!(handle = %item.id, "registry returned a malformed handle; skipped");
                continue;
            }
            self.dataset_from(&mut st, item);
            set.insert(item.id.clone());
        }
        st.registry = Some((Instant::now(), set.clone()));
        Ok(set)
    }

    pub async fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        let kind = {
            let st = self.state();
            let node = st.nodes.get(&parent).ok_or(FsError::NotFound)?;
            if let Some(l) = node.listing.as_ref().filter(|l| self.fresh(l.at)) {
                // Listed recently: the listing is the answer, both ways.
                return match l.children.get(name) {
                    Some(&ino) => Ok(self.attr_of(ino, &st.nodes[&ino].kind)),
                    None => Err(FsError::NotFound),
                };
            }
            if node.missing.get(name).is_some_and(|at| self.fresh(*at)) {
                return Err(FsError::NotFound);
            }
            node.kind.clone()
        };
        let found = match kind {
            Kind::Root if name == BY_NAME && self.cfg.by_name => {
                let mut st = self.state();
                Ok(self.entry(&mut st, ROOT_INO, BY_NAME, Kind::ByName))
            }
            Kind::Root => self.lookup_prefix(name),
            Kind::Prefix(p) => self.lookup_dataset(parent, &p, name).await,
            Kind::Dir { ds, prefix } => self.lookup_object(parent, &ds, &prefix, name).await,
            Kind::ByName => {
                // Names come only from the registry: list it (once per TTL).
                self.readdir(parent).await?;
                let st = self.state();
                match st.index.get(&(parent, name.to_string())) {
                    Some(&ino) => Ok(self.attr_of(ino, &st.nodes[&ino].kind)),
                    None => Err(FsError::NotFound),
                }
            }
            Kind::File { .. } | Kind::Link(_) => Err(FsError::NotDir),
        };
        if let Err(FsError::NotFound) = found {
            let mut st = self.state();
            if let Some(node) = st.nodes.get_mut(&parent) {
                node.missing.insert(name.to_string(), Instant::now());
            }
        }
        found
    }

    fn lookup_prefix(&self, name: &str) -> Result<Attr, FsError> {
        // Any name shaped like a handle prefix resolves, so a handle that
        // is not listed still opens by path; nothing is fetched until a
        // suffix below it is looked up.
        if !names::is_handle_prefix(name) {
            return Err(FsError::NotFound);
        }
        if let Some(p) = &self.cfg.datasets {
            if !p
                .iter()
                .any(|h| split_handle(h).is_some_and(|(hp, _)| hp == name))
            {
                return Err(FsError::NotFound);
            }
        }
        let mut st = self.state();
        Ok(self.entry(&mut st, ROOT_INO, name, Kind::Prefix(name.to_string())))
    }

    async fn lookup_dataset(
        &self,
        parent: u64,
        prefix: &str,
        suffix: &str,
    ) -> Result<Attr, FsError> {
        if !names::is_handle_suffix(suffix) {
            return Err(FsError::NotFound);
        }
        let handle = format!("{prefix}/{suffix}");
        if !self.pinned(&handle) {
            return Err(FsError::NotFound);
        }
        let known = self.state().datasets.get(&handle).cloned();
        let ds = match known {
            Some(ds) => ds,
            None => {
                let item = self.catalog.fetch(&handle).await?;
                if item.id != handle {
                    warn!(asked = %handle, got = %item.id, "fetch-dataset returned another handle");
                    return Err(FsError::NotFound);
                }
                let mut st = self.state();
                self.dataset_from(&mut st, &item)
            }
        };
        // Someone is about to look inside: fetch its credentials meanwhile
        // (once; later ones come with the first request that needs them).
        if !ds.prepared.swap(true, std::sync::atomic::Ordering::Relaxed) {
            let store = ds.store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.prepare().await {
                    debug!(error = %e, "read credentials not ready");
                }
            });
        }
        let mut st = self.state();
        let prefix = ds.prefix.clone();
        Ok(self.entry(&mut st, parent, suffix, Kind::Dir { ds, prefix }))
    }

    async fn lookup_object(
        &self,
        parent: u64,
        ds: &Arc<Dataset>,
        dir: &str,
        name: &str,
    ) -> Result<Attr, FsError> {
        if names::check(name).is_err() {
            return Err(FsError::NotFound);
        }
        let key = format!("{dir}{name}");
        let sub = format!("{key}/");
        // One LIST with the name as prefix answers both questions: the
        // object `key` sorts first if it exists, and everything under
        // `key/` folds into one common prefix. No HEAD per lookup.
        let page = ds.store.list(&key, Some("/"), None, Some(100)).await?;
        let mut is_dir = page.prefixes.contains(&sub);
        if !is_dir && page.next.is_some() {
            // Many siblings sort between `key` and `key/` (`key.txt`, `key-1`...).
            let p = ds.store.list(&sub, Some("/"), None, Some(1)).await?;
            is_dir = !p.objects.is_empty() || !p.prefixes.is_empty();
        }
        let mut st = self.state();
        if is_dir {
            return Ok(self.entry(
                &mut st,
                parent,
                name,
                Kind::Dir {
                    ds: ds.clone(),
                    prefix: sub,
                },
            ));
        }
        match page.objects.into_iter().find(|o| o.key == key) {
            Some(meta) => Ok(self.entry(
                &mut st,
                parent,
                name,
                Kind::File {
                    ds: ds.clone(),
                    meta,
                },
            )),
            None => Err(FsError::NotFound),
        }
    }

    /// The listing of directory `ino` to read from: the current one if no
    /// older than the TTL, else one being fetched. `true` means the caller
    /// must [`drive`](Self::drive) it (nobody else is fetching it).
    pub fn open_dir(&self, ino: u64) -> Result<(Arc<DirStream>, bool), FsError> {
        let mut st = self.state();
        let node = st.nodes.get_mut(&ino).ok_or(FsError::NotFound)?;
        if node.kind.file_kind() != FileKind::Directory {
            return Err(FsError::NotDir);
        }
        if let Some(l) = node.listing.as_ref().filter(|l| self.fresh(l.at)) {
            return Ok((l.stream.clone(), false));
        }
        if let Some(p) = &node.pending {
            return Ok((p.clone(), false));
        }
        let s = Arc::new(DirStream::default());
        node.pending = Some(s.clone());
        Ok((s, true))
    }

    /// Fetches the listing [`open_dir`](Self::open_dir) asked for, filling
    /// `stream` as pages arrive, and keeps it as the folder's listing.
    pub async fn drive(&self, ino: u64, stream: &Arc<DirStream>) {
        // Should this future be dropped or panic before the end, whoever
        // waits on the listing gets an error instead of waiting forever.
        struct Unfinished<'a>(&'a Tree, u64, &'a Arc<DirStream>, bool);
        impl Drop for Unfinished<'_> {
            fn drop(&mut self) {
                if self.3 {
                    return;
                }
                let mut st = self.0.state();
                if let Some(node) = st.nodes.get_mut(&self.1) {
                    if node
                        .pending
                        .as_ref()
                        .is_some_and(|p| Arc::ptr_eq(p, self.2))
                    {
                        node.pending = None;
                    }
                }
                drop(st);
                self.2
                    .finish(Err(FsError::Io("the listing was interrupted".into())));
            }
        }
        let mut guard = Unfinished(self, ino, stream, false);
        let result = self.fill(ino, stream).await;
        guard.3 = true;
        let mut st = self.state();
        if let Some(node) = st.nodes.get_mut(&ino) {
            if node
                .pending
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(p, stream))
            {
                node.pending = None;
            }
            if let Ok(children) = &result {
                node.missing.clear();
                node.listing = Some(Listing {
                    at: Instant::now(),
                    children: children.clone(),
                    stream: stream.clone(),
                });
            }
        }
        drop(st);
        stream.finish(result.map(|_| ()));
    }

    /// Every entry of directory `ino`, from a listing no older than the TTL.
    pub async fn readdir(&self, ino: u64) -> Result<Vec<DirEntry>, FsError> {
        let (stream, drive) = self.open_dir(ino)?;
        if drive {
            self.drive(ino, &stream).await;
        }
        stream.all().await
    }

    async fn fill(
        &self,
        ino: u64,
        stream: &Arc<DirStream>,
    ) -> Result<BTreeMap<String, u64>, FsError> {
        let kind = {
            let st = self.state();
            st.nodes.get(&ino).ok_or(FsError::NotFound)?.kind.clone()
        };
        let children = match kind {
            Kind::Root => {
                let handles = self.registry().await?;
                let mut st = self.state();
                let mut prefixes: BTreeSet<String> = handles
                    .iter()
                    .filter_map(|h| split_handle(h).map(|(p, _)| p.to_string()))
                    .collect();
                // Prefixes resolved by name stay visible too.
                prefixes.extend(
                    st.index
                        .keys()
                        .filter(|(p, _)| *p == ROOT_INO)
                        .map(|(_, n)| n.clone()),
                );
                let mut out: BTreeMap<String, u64> = prefixes
                    .into_iter()
                    .map(|p| {
                        let ino = self.intern(&mut st, ROOT_INO, &p, Kind::Prefix(p.clone()));
                        (p, ino)
                    })
                    .collect();
                if self.cfg.by_name {
                    let ino = self.intern(&mut st, ROOT_INO, BY_NAME, Kind::ByName);
                    out.insert(BY_NAME.to_string(), ino);
                }
                out
            }
            Kind::ByName => {
                let handles = self.registry().await?;
                let mut st = self.state();
                let named: Vec<(String, String)> = handles
                    .iter()
                    .filter_map(|h| st.datasets.get(h))
                    .map(|d| (d.handle.clone(), d.name.clone().unwrap_or_default()))
                    .collect();
                let mut out = BTreeMap::new();
                for (name, handle) in names::by_name(&named) {
                    let target = format!("../{handle}");
                    let ino = self.intern(&mut st, ino, &name, Kind::Link(target));
                    out.insert(name, ino);
                }
                out
            }
            Kind::Prefix(p) => {
                let handles = self.registry().await?;
                let mut st = self.state();
                let want = format!("{p}/");
                let mut out = BTreeMap::new();
                let datasets: Vec<Arc<Dataset>> = st
                    .datasets
                    .values()
                    .filter(|d| {
                        d.handle.starts_with(&want)
                            && (handles.contains(&d.handle)
                                || st
                                    .index
                                    .contains_key(&(ino, d.handle[want.len()..].to_string())))
                    })
                    .cloned()
                    .collect();
                for ds in datasets {
                    let suffix = ds.handle[want.len()..].to_string();
                    let prefix = ds.prefix.clone();
                    let child = self.intern(&mut st, ino, &suffix, Kind::Dir { ds, prefix });
                    out.insert(suffix, child);
                }
                out
            }
            // Streams its entries itself, page by page.
            Kind::Dir { ds, prefix } => return self.list_dir(ino, &ds, &prefix, stream).await,
            Kind::File { .. } | Kind::Link(_) => return Err(FsError::NotDir),
        };
        let entries = self.entries(&self.state(), &children);
        stream.push(entries);
        Ok(children)
    }

    fn entries(&self, st: &State, children: &BTreeMap<String, u64>) -> Vec<DirEntry> {
        children
            .iter()
            .filter_map(|(name, ino)| {
                st.nodes.get(ino).map(|n| DirEntry {
                    name: name.clone(),
                    attr: self.attr_of(*ino, &n.kind),
                })
            })
            .collect()
    }

    /// Lists one folder of a dataset, page by page, pushing each entry to
    /// `stream` as soon as it is certain. A file `X` waits until the listing
    /// has passed `X/` (or ended): a folder `X/` would shadow it, and S3
    /// sorts `X` before `X-1`, `X.txt`, ... and only then `X/`.
    async fn list_dir(
        &self,
        ino: u64,
        ds: &Arc<Dataset>,
        prefix: &str,
        stream: &Arc<DirStream>,
    ) -> Result<BTreeMap<String, u64>, FsError> {
        let mut children: BTreeMap<String, u64> = BTreeMap::new();
        let mut held: BTreeMap<String, ObjectMeta> = BTreeMap::new();
        let mut token = None;
        let mut pages = 0;
        loop {
            let page = ds
                .store
                .list(
                    prefix,
                    Some("/"),
                    token.take(),
                    Some(self.cfg.list_page_size),
                )
                .await?;
            pages += 1;
            // The greatest key this page reached: everything up to it is known.
            let reached = page
                .objects
                .last()
                .map(|o| o.key.clone())
                .into_iter()
                .chain(page.prefixes.last().cloned())
                .max();
            let mut out = Vec::new();
            let mut st = self.state();
            for p in page.prefixes {
                // A server that answers outside the prefix is ignored.
                let Some(rel) = p.strip_prefix(prefix) else {
                    continue;
                };
                let name = rel.trim_end_matches('/').to_string();
                // `a//b` lists as prefix `a//`: an empty segment.
                match names::check(&name) {
                    Ok(()) if rel.ends_with('/') && !rel[..rel.len() - 1].contains('/') => {
                        if children.contains_key(&name) {
                            continue;
                        }
                        let sub = format!("{prefix}{name}/");
                        let kind = Kind::Dir {
                            ds: ds.clone(),
                            prefix: sub,
                        };
                        let child = self.intern(&mut st, ino, &name, kind.clone());
                        out.push(DirEntry {
                            name: name.clone(),
                            attr: self.attr_of(child, &kind),
                        });
                        children.insert(name, child);
                    }
                    Ok(()) => self.log_hidden(&mut st, &p, names::Hidden::Empty),
                    Err(why) => self.log_hidden(&mut st, &p, why),
                }
            }
            for o in page.objects {
                let Some(name) = o.key.strip_prefix(prefix) else {
                    continue;
                };
                if name.is_empty() {
                    continue; // the folder marker of this directory itself
                }
                match names::check(name) {
                    Ok(()) => {
                        held.insert(name.to_string(), o);
                    }
                    Err(why) => self.log_hidden(&mut st, &o.key, why),
                }
            }
            let last = page.next.is_none();
            // Release held files whose possible shadowing folder is behind us.
            let ready: Vec<String> = held
                .keys()
                .filter(|n| {
                    last || reached
                        .as_ref()
                        .is_some_and(|r| format!("{prefix}{n}/").as_str() <= r.as_str())
                })
                .cloned()
                .collect();
            for name in ready {
                let Some(meta) = held.remove(&name) else {
                    continue;
                };
                if children.contains_key(&name) {
                    // The directory wins; the object is shadowed.
                    let key = meta.key.clone();
                    if st.hidden_logged.insert(key.clone()) {
                        warn!(key = %key.escape_debug(), "object shadowed by a directory of the same name");
                    }
                    continue;
                }
                let kind = Kind::File {
                    ds: ds.clone(),
                    meta,
                };
                let child = self.intern(&mut st, ino, &name, kind.clone());
                out.push(DirEntry {
                    name: name.clone(),
                    attr: self.attr_of(child, &kind),
                });
                children.insert(name, child);
            }
            drop(st);
            stream.push(out);
            match page.next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        debug!(handle = %ds.handle, prefix, pages, entries = children.len(), "listed");
        Ok(children)
    }

    /// What `open` needs to read file `ino`.
    pub fn file(&self, ino: u64) -> Result<FileRef, FsError> {
        let st = self.state();
        match &st.nodes.get(&ino).ok_or(FsError::NotFound)?.kind {
            Kind::File { ds, meta } => Ok(FileRef {
                dataset: ds.clone(),
                meta: meta.clone(),
            }),
            _ => Err(FsError::IsDir),
        }
    }

    /// Marks file `ino` as changed remotely (a read met a new ETag): its
    /// folder's listing is dropped and the next open looks it up again.
    pub fn mark_stale(&self, ino: u64) {
        let mut st = self.state();
        let Some(node) = st.nodes.get_mut(&ino) else {
            return;
        };
        node.stale = true;
        let parent = node.parent;
        if let Some(p) = st.nodes.get_mut(&parent) {
            p.listing = None;
        }
    }

    /// Like [`file`](Self::file), but first refreshes a file marked stale.
    pub async fn file_fresh(&self, ino: u64) -> Result<FileRef, FsError> {
        let refresh = {
            let st = self.state();
            let node = st.nodes.get(&ino).ok_or(FsError::NotFound)?;
            match (node.stale, st.nodes.get(&node.parent).map(|p| &p.kind)) {
                (true, Some(Kind::Dir { ds, prefix })) => {
                    Some((node.parent, ds.clone(), prefix.clone(), node.name.clone()))
                }
                _ => None,
            }
        };
        if let Some((parent, ds, prefix, name)) = refresh {
            let attr = self.lookup_object(parent, &ds, &prefix, &name).await?;
            if attr.ino != ino {
                // No longer a file at all: this inode is gone.
                return Err(FsError::Stale);
            }
        }
        self.file(ino)
    }

    /// Where symlink `ino` points.
    pub fn readlink(&self, ino: u64) -> Result<String, FsError> {
        match &self.state().nodes.get(&ino).ok_or(FsError::NotFound)?.kind {
            Kind::Link(t) => Ok(t.clone()),
            _ => Err(FsError::Invalid),
        }
    }

    /// Whether `ino` is a directory (for opendir); no network.
    pub fn is_dir(&self, ino: u64) -> Result<bool, FsError> {
        let st = self.state();
        Ok(st
            .nodes
            .get(&ino)
            .ok_or(FsError::NotFound)?
            .kind
            .file_kind()
            == FileKind::Directory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::memory::{MemoryFactory, MemoryStore};
    use crate::wire::S3Location;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct FakeCatalog {
        items: Vec<ItemDataset>,
        lists: AtomicU64,
        fetches: AtomicU64,
    }

    fn item(handle: &str) -> ItemDataset {
        ItemDataset {
            id: handle.into(),
            display_name: None,
            collection_format: None,
            s3: S3Location {
                bucket_name: "b".into(),
                path: format!("datasets/{}/", handle.replace(['.', '/'], "-")),
                s3_uri: None,
            },
            created_timestamp: Some(1),
            updated_timestamp: Some(2),
            release_status: None,
            extra: Default::default(),
        }
    }

    #[async_trait]
    impl Catalog for FakeCatalog {
        async fn list(&self) -> Result<Vec<ItemDataset>, ApiError> {
            self.lists.fetch_add(1, Ordering::Relaxed);
            Ok(self
                .items
                .iter()
                .filter(|i| i.id != "1.2/hidden")
                .cloned()
                .collect())
        }
        async fn fetch(&self, handle: &str) -> Result<ItemDataset, ApiError> {
            self.fetches.fetch_add(1, Ordering::Relaxed);
            self.items
                .iter()
                .find(|i| i.id == handle)
                .cloned()
                .ok_or_else(|| ApiError::NotFound(handle.into()))
        }
    }

    fn setup() -> (Tree, Arc<FakeCatalog>, Arc<MemoryStore>) {
        let cat = Arc::new(FakeCatalog {
            items: vec![
                item("1.2/3"),
                item("1.2/4"),
                item("7/8"),
                item("1.2/hidden"),
            ],
            lists: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
        });
        let store = Arc::new(MemoryStore::new());
        for k in [
            "datasets/1-2-3/a.csv",
            "datasets/1-2-3/data/x.bin",
            "datasets/1-2-3/data/sub/y",
            "datasets/1-2-3/clash",
            "datasets/1-2-3/clash/inner",
            "datasets/1-2-3/./dot",
            "datasets/1-2-3/marker/",
            "datasets/1-2-hidden/z",
        ] {
            store.put(k, "hello");
        }
        let tree = Tree::new(
            TreeConfig::default(),
            cat.clone(),
            Arc::new(MemoryFactory(store.clone())),
        );
        (tree, cat, store)
    }

    /// Sorted: a listing streams in S3's order, files held back a little.
    fn names(v: &[DirEntry]) -> Vec<&str> {
        let mut n: Vec<&str> = v.iter().map(|e| e.name.as_str()).collect();
        n.sort();
        n
    }

    #[tokio::test]
    async fn a_folder_shadows_its_object_across_page_boundaries() {
        let cat = Arc::new(FakeCatalog {
            items: vec![item("1.2/3")],
            lists: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
        });
        // One key per page: `x` (object), `x-1`, `x.txt`, then prefix `x/`.
        let store = Arc::new(MemoryStore::with_page_size(1));
        for k in ["x", "x-1", "x.txt", "x/inner", "y"] {
            store.put(&format!("datasets/1-2-3/{k}"), "v");
        }
        let t = Tree::new(
            TreeConfig::default(),
            cat,
            Arc::new(MemoryFactory(store.clone())),
        );
        let p = t.lookup(ROOT_INO, "1.2").await.unwrap();
        let d = t.lookup(p.ino, "3").await.unwrap();
        let (stream, drive) = t.open_dir(d.ino).unwrap();
        assert!(drive);
        // A second opener shares the listing in flight instead of starting one.
        let (again, drive2) = t.open_dir(d.ino).unwrap();
        assert!(!drive2 && Arc::ptr_eq(&stream, &again));
        t.drive(d.ino, &stream).await;
        let e = stream.all().await.unwrap();
        assert_eq!(names(&e), ["x", "x-1", "x.txt", "y"]);
        let x = e.iter().find(|x| x.name == "x").unwrap();
        assert_eq!(x.attr.kind, FileKind::Directory, "the folder wins");
        assert_eq!(e.len(), 4, "no duplicate `x`");
    }

    #[tokio::test]
    async fn walks_root_prefix_dataset_and_folders() {
        let (t, cat, _) = setup();
        assert_eq!(names(&t.readdir(ROOT_INO).await.unwrap()), ["1.2", "7"]);
        let p = t.lookup(ROOT_INO, "1.2").await.unwrap();
        assert_eq!(names(&t.readdir(p.ino).await.unwrap()), ["3", "4"]);
        let d = t.lookup(p.ino, "3").await.unwrap();
        assert_eq!(
            cat.fetches.load(Ordering::Relaxed),
            0,
            "listed handle needs no fetch"
        );
        let e = t.readdir(d.ino).await.unwrap();
        assert_eq!(names(&e), ["a.csv", "clash", "data", "marker"]);
        assert!(e.iter().all(|x| x.name != "." && x.name != "dot"));
        let clash = e.iter().find(|x| x.name == "clash").unwrap();
        assert_eq!(clash.attr.kind, FileKind::Directory, "directory wins");
        let a = t.lookup(d.ino, "a.csv").await.unwrap();
        assert_eq!((a.kind, a.size), (FileKind::File, 5));
        assert_eq!(
            cat.lists.load(Ordering::Relaxed),
            1,
            "registry listed once per TTL"
        );
    }

    #[tokio::test]
    async fn lookups_in_listed_folders_make_no_requests() {
        let (t, _, store) = setup();
        let p = t.lookup(ROOT_INO, "1.2").await.unwrap();
        let d = t.lookup(p.ino, "3").await.unwrap();
        t.readdir(d.ino).await.unwrap();
        let before = (
            store.lists.load(Ordering::Relaxed),
            store.heads.load(Ordering::Relaxed),
        );
        t.lookup(d.ino, "a.csv").await.unwrap();
        assert!(matches!(
            t.lookup(d.ino, ".git").await,
            Err(FsError::NotFound)
        ));
        let after = (
            store.lists.load(Ordering::Relaxed),
            store.heads.load(Ordering::Relaxed),
        );
        assert_eq!(before, after);
    }

    #[tokio::test]
    async fn unlisted_handle_resolves_by_name_and_unknown_is_enoent() {
        let (t, cat, _) = setup();
        let p = t.lookup(ROOT_INO, "1.2").await.unwrap();
        let h = t.lookup(p.ino, "hidden").await.unwrap();
        assert_eq!(h.kind, FileKind::Directory);
        assert_eq!(
            cat.lists.load(Ordering::Relaxed),
            0,
            "lookup never lists the registry"
        );
        assert!(matches!(
            t.lookup(p.ino, "999").await,
            Err(FsError::NotFound)
        ));
        assert!(matches!(
            t.lookup(p.ino, "999").await,
            Err(FsError::NotFound)
        ));
        assert_eq!(
            cat.fetches.load(Ordering::Relaxed),
            2,
            "negative lookups are cached"
        );
        assert!(matches!(
            t.lookup(ROOT_INO, ".git").await,
            Err(FsError::NotFound)
        ));
        // A dataset resolved by name stays visible in its prefix folder.
        assert_eq!(
            names(&t.readdir(p.ino).await.unwrap()),
            ["3", "4", "hidden"]
        );
    }

    #[tokio::test]
    async fn lookup_without_listing_probes_dir_then_object() {
        let (t, _, store) = setup();
        let p = t.lookup(ROOT_INO, "1.2").await.unwrap();
        let d = t.lookup(p.ino, "3").await.unwrap();
        let data = t.lookup(d.ino, "data").await.unwrap();
        assert_eq!(data.kind, FileKind::Directory);
        let x = t.lookup(data.ino, "x.bin").await.unwrap();
        assert_eq!(x.kind, FileKind::File);
        let clash = t.lookup(d.ino, "clash").await.unwrap();
        assert_eq!(clash.kind, FileKind::Directory);
        let marker = t.lookup(d.ino, "marker").await.unwrap();
        assert_eq!(marker.kind, FileKind::Directory);
        assert_eq!(store.gets.load(Ordering::Relaxed), 0);
        assert_eq!(
            store.heads.load(Ordering::Relaxed),
            0,
            "lookups cost no HEAD"
        );
        assert!(matches!(
            t.lookup(d.ino, "nope").await,
            Err(FsError::NotFound)
        ));
        let f = t.file(x.ino).unwrap();
        assert_eq!(f.meta.key, "datasets/1-2-3/data/x.bin");
    }

    /// What the tree must show for `keys` (relative to the dataset), by the
    /// rules of docs/SEMANTICS.md: paths, directories ending in `/`.
    fn model(keys: &[String]) -> std::collections::BTreeSet<String> {
        let mut dirs = std::collections::BTreeSet::new();
        let mut files = std::collections::BTreeSet::new();
        for k in keys {
            let segs: Vec<&str> = k.split('/').collect();
            let mut path = String::new();
            let mut ok = true;
            for s in &segs[..segs.len() - 1] {
                if names::check(s).is_err() {
                    ok = false;
                    break;
                }
                path.push_str(s);
                path.push('/');
                dirs.insert(path.clone());
            }
            let last = segs[segs.len() - 1];
            if ok && !last.is_empty() && names::check(last).is_ok() {
                files.insert(format!("{path}{last}"));
            }
        }
        files.retain(|f| !dirs.contains(&format!("{f}/")));
        dirs.into_iter().chain(files).collect()
    }

    async fn walk(t: &Tree, ino: u64, path: String, out: &mut std::collections::BTreeSet<String>) {
        let entries = t.readdir(ino).await.unwrap();
        let mut seen = HashSet::new();
        for e in entries {
            assert!(names::check(&e.name).is_ok(), "bad name {:?}", e.name);
            assert!(seen.insert(e.name.clone()), "duplicate {:?}", e.name);
            // Every listed name also resolves by lookup, to the same kind.
            assert_eq!(t.lookup(ino, &e.name).await.unwrap().kind, e.attr.kind);
            match e.attr.kind {
                FileKind::Directory => {
                    let p = format!("{path}{}/", e.name);
                    out.insert(p.clone());
                    Box::pin(walk(t, e.attr.ino, p, out)).await;
                }
                FileKind::File => {
                    out.insert(format!("{path}{}", e.name));
                }
                FileKind::Symlink => panic!("no symlinks inside a dataset"),
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(128)
        ))]

        /// Keys drawn from a tiny alphabet with `/`, `.` and a control
        /// character, listed over pages of 1 to 4 keys: the tree shows
        /// exactly the model, with valid, unique names, whatever the paging.
        #[test]
        fn tree_matches_the_key_model(
            keys in proptest::collection::btree_set("[ab./\u{1}]{1,7}", 0..20),
            page in 1usize..5,
        ) {
            let keys: Vec<String> = keys.into_iter().collect();
            let store = Arc::new(MemoryStore::with_page_size(page));
            for k in &keys {
                store.put(&format!("datasets/1-2-3/{k}"), "x");
            }
            let cat = Arc::new(FakeCatalog {
                items: vec![item("1.2/3")],
                lists: AtomicU64::new(0),
                fetches: AtomicU64::new(0),
            });
            let tree = Tree::new(TreeConfig::default(), cat, Arc::new(MemoryFactory(store)));
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let got = rt.block_on(async {
                let p = tree.lookup(ROOT_INO, "1.2").await.unwrap();
                let d = tree.lookup(p.ino, "3").await.unwrap();
                let mut out = std::collections::BTreeSet::new();
                walk(&tree, d.ino, String::new(), &mut out).await;
                out
            });
            proptest::prop_assert_eq!(got, model(&keys));
        }
    }
}
