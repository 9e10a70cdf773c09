//! Folder listings: the root (handle prefixes), a prefix folder (its
//! datasets), `by-name/`, and folders inside a dataset (ListObjectsV2,
//! page by page, streamed to readers as they arrive).
//!
//! One listing serves everyone who opens the folder while it runs, and the
//! finished one is the folder's cache for the metadata TTL.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, warn};

use super::inode::{FileKind, Kind};
use super::{file_kind, names, Dataset, DirEntry, DirStream, Listing, Tree, BY_NAME};
use crate::fs::FsError;
use crate::retry::Deadline;
use crate::s3::ObjectMeta;

impl Tree {
    /// The listing of directory `ino` to read from: the current one if no
    /// older than the TTL, else one being fetched. `true` means the caller
    /// must [`drive`](Self::drive) it (nobody else is fetching it).
    pub fn open_dir(&self, ino: u64) -> Result<(Arc<DirStream>, bool), FsError> {
        let mut st = self.state();
        let node = st.inodes.get(ino).ok_or(FsError::Stale)?;
        if node.kind.file_kind() != FileKind::Directory {
            return Err(FsError::NotDir);
        }
        if let Some(l) = self.fresh_listing(&st, ino) {
            return Ok((l.stream.clone(), false));
        }
        let d = st.dirs.entry(ino).or_default();
        if let Some(p) = &d.pending {
            return Ok((p.clone(), false));
        }
        let s = Arc::new(DirStream::default());
        d.pending = Some(s.clone());
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
                self.0.abandon(self.1, self.2);
                self.2
                    .finish(Err(FsError::Io("the listing was interrupted".into())));
            }
        }
        let mut guard = Unfinished(self, ino, stream, false);
        let started = self.stamp();
        let result = self.list(ino, stream, started).await;
        guard.3 = true;
        {
            // One step, so no opener in between finds neither the listing
            // nor the one in progress (and starts a second one).
            let mut st = self.state();
            if result.is_ok() {
                let inside_dataset = st
                    .inodes
                    .get(ino)
                    .is_some_and(|n| n.kind.folder().is_some());
                if inside_dataset {
                    // What the listing did not confirm is gone (unless a
                    // later request said otherwise). Root and prefix
                    // folders are not authoritative: any handle opens by
                    // path.
                    for (name, child) in st.inodes.children(ino) {
                        if st.inodes.get(child).is_some_and(|n| n.stamp < started) {
                            st.inodes.remove_name(ino, &name, started);
                        }
                    }
                }
                if let Some(d) = st.dirs.get_mut(&ino) {
                    d.listing = Some(Listing {
                        at: Instant::now(),
                        started,
                        stream: stream.clone(),
                    });
                }
            }
            Self::end_pending_locked(&mut st, ino, stream);
            if result.is_err() {
                self.collect_unlisted(&mut st, ino);
            }
        }
        stream.finish(result);
    }

    /// A listing that will not finish: no longer in progress, and what its
    /// pages installed goes unless the kernel holds it.
    fn abandon(&self, ino: u64, stream: &Arc<DirStream>) {
        let mut st = self.state();
        Self::end_pending_locked(&mut st, ino, stream);
        self.collect_unlisted(&mut st, ino);
    }

    /// Names in `ino` that no listing keeps any more: whatever the kernel
    /// does not hold goes now.
    fn collect_unlisted(&self, st: &mut super::State, ino: u64) {
        for (_, child) in st.inodes.children(ino) {
            self.collect(st, child);
        }
    }

    /// The listing entry of inode `child`, as its name stands now (a newer
    /// answer may have made it another kind than the page said).
    fn entry_of(st: &super::State, child: u64) -> Option<DirEntry> {
        let node = st.inodes.get(child)?;
        Some(DirEntry {
            name: node.name.clone(),
            kind: node.kind.file_kind(),
        })
    }

    fn end_pending_locked(st: &mut super::State, ino: u64, stream: &Arc<DirStream>) {
        if let Some(d) = st.dirs.get_mut(&ino) {
            if d.pending.as_ref().is_some_and(|p| Arc::ptr_eq(p, stream)) {
                d.pending = None;
            }
        }
    }

    /// Starts a listing of directory `ino` on its own task, unless one is
    /// fresh or on its way already; returns it (None: `ino` is gone).
    pub(super) fn start_listing(self: &Arc<Self>, ino: u64) -> Option<Arc<DirStream>> {
        let (stream, drive) = self.open_dir(ino).ok()?;
        if drive {
            let (me, s) = (self.clone(), stream.clone());
            tokio::spawn(async move { me.drive(ino, &s).await });
        }
        Some(stream)
    }

    /// Every entry of directory `ino`, from a listing no older than the
    /// TTL. A listing this starts runs on its own task: a caller that gives
    /// up (its deadline, an interrupt) does not end it for the others
    /// reading it.
    pub async fn readdir(
        self: &Arc<Self>,
        ino: u64,
        deadline: Deadline,
    ) -> Result<Vec<DirEntry>, FsError> {
        let (stream, drive) = self.open_dir(ino)?;
        if drive {
            let (me, s) = (self.clone(), stream.clone());
            tokio::spawn(async move { me.drive(ino, &s).await });
        }
        deadline
            .run(stream.all())
            .await
            .unwrap_or(Err(FsError::TimedOut))
    }

    async fn list(&self, ino: u64, stream: &Arc<DirStream>, stamp: u64) -> Result<(), FsError> {
        let kind = {
            let st = self.state();
            st.inodes.get(ino).ok_or(FsError::Stale)?.kind.clone()
        };
        let deadline = self.request_deadline();
        let names: BTreeMap<String, Kind> = match kind {
            Kind::Root => {
                let prefixes: BTreeSet<String> = self
                    .catalog
                    .handles(deadline)
                    .await?
                    .iter()
                    .filter_map(|d| {
                        crate::wire::split_handle(&d.handle).map(|(p, _)| p.to_string())
                    })
                    .collect();
                let mut out: BTreeMap<String, Kind> =
                    prefixes.into_iter().map(|p| (p, Kind::Prefix)).collect();
                if self.cfg.by_name {
                    out.insert(BY_NAME.to_string(), Kind::ByName);
                }
                out
            }
            Kind::Prefix => {
                let want = {
                    let st = self.state();
                    format!("{}/", st.inodes.get(ino).ok_or(FsError::Stale)?.name)
                };
                self.catalog
                    .handles(deadline)
                    .await?
                    .into_iter()
                    .filter_map(|d| {
                        let suffix = d.handle.strip_prefix(&want)?.to_string();
                        Some((suffix, Kind::Dataset(d)))
                    })
                    .collect()
            }
            Kind::ByName => {
                let named: Vec<(String, String)> = self
                    .catalog
                    .handles(deadline)
                    .await?
                    .iter()
                    .map(|d| (d.handle.clone(), d.name.clone().unwrap_or_default()))
                    .collect();
                names::by_name(&named)
                    .into_iter()
                    .map(|(name, handle)| (name, Kind::Link(format!("../{handle}").into())))
                    .collect()
            }
            // Streams its entries itself, page by page.
            Kind::Dataset(ds) => return self.list_folder(ino, &ds, &ds.prefix, stream).await,
            Kind::Folder { ds, prefix } => {
                return self.list_folder(ino, &ds, &prefix, stream).await
            }
            Kind::File { .. } | Kind::Link(_) => return Err(FsError::NotDir),
        };
        let mut st = self.state();
        let mut out = Vec::with_capacity(names.len());
        for (name, kind) in names {
            let fk = kind.file_kind();
            let child = st.inodes.install(ino, &name, kind, stamp);
            let name = st
                .inodes
                .get(child)
                .map_or_else(|| name.into(), |n| n.name.clone());
            out.push(DirEntry { name, kind: fk });
        }
        drop(st);
        stream.push(out);
        Ok(())
    }

    /// Lists one folder of a dataset, page by page, pushing each entry to
    /// `stream` as soon as it is certain. A file `X` waits until the listing
    /// has passed `X/` (or ended): a folder `X/` would shadow it, and S3
    /// sorts `X` before `X-1`, `X.txt`, ... and only then `X/`.
    async fn list_folder(
        &self,
        ino: u64,
        ds: &Arc<Dataset>,
        prefix: &str,
        stream: &Arc<DirStream>,
    ) -> Result<(), FsError> {
        // Names already given out by this listing (a folder appears once;
        // it shadows an object of the same name).
        let mut given: HashSet<Arc<str>> = HashSet::new();
        // Files waiting for the listing to pass `name/`, each with the
        // stamp of the page that told us about it.
        let mut held: BTreeMap<String, (ObjectMeta, u64)> = BTreeMap::new();
        let mut walk = crate::s3::Pages::new();
        let mut pages = 0u32;
        loop {
            let stamp = self.stamp();
            let page = ds
                .store
                .list(
                    prefix,
                    Some("/"),
                    walk.token(),
                    Some(self.cfg.list_page_size),
                    self.request_deadline(),
                )
                .await?;
            pages += 1;
            let more = walk.advance(&page)?;
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
                let name = rel.trim_end_matches('/');
                // `a//b` lists as prefix `a//`: an empty segment.
                match names::check(name) {
                    Ok(()) if rel.ends_with('/') && !rel[..rel.len() - 1].contains('/') => {
                        if given.contains(name) || st.negative.newer_than(ino, name, stamp) {
                            continue;
                        }
                        let kind = Kind::Folder {
                            ds: ds.clone(),
                            prefix: format!("{prefix}{name}/").into(),
                        };
                        let child = st.inodes.install(ino, name, kind, stamp);
                        if let Some(entry) = Self::entry_of(&st, child) {
                            given.insert(entry.name.clone());
                            out.push(entry);
                        }
                    }
                    Ok(()) => Self::log_hidden(&mut st, &p, names::Hidden::Empty.reason()),
                    Err(why) => Self::log_hidden(&mut st, &p, why.reason()),
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
                        held.insert(name.to_string(), (o, stamp));
                    }
                    Err(why) => Self::log_hidden(&mut st, &o.key, why.reason()),
                }
            }
            let last = !more;
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
                let Some((meta, seen)) = held.remove(&name) else {
                    continue;
                };
                if given.contains(name.as_str()) {
                    // The directory wins; the object is shadowed.
                    let key = meta.key.clone();
                    if st.hidden_logged.len() < 100_000 && st.hidden_logged.insert(key.clone()) {
                        warn!(key = %key.escape_debug(), "object shadowed by a directory of the same name");
                    }
                    continue;
                }
                if st.negative.newer_than(ino, &name, seen) {
                    continue; // found missing since its page was asked for
                }
                let child = st.inodes.install(ino, &name, file_kind(ds, &meta), seen);
                if let Some(entry) = Self::entry_of(&st, child) {
                    given.insert(entry.name.clone());
                    out.push(entry);
                }
            }
            drop(st);
            stream.push(out);
            if !more {
                break;
            }
        }
        debug!(handle = %ds.handle, prefix, pages, entries = given.len(), "listed");
        if let Some(d) = self.state().dirs.get_mut(&ino) {
            d.pages = pages;
            d.probes = 0;
        }
        Ok(())
    }
}
