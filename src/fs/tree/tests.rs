//! Unit tests of the tree against the in-memory store: names, versions,
//! races with listings, forgetting and collection.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::*;
use crate::api::ApiError;
use crate::s3::memory::{MemoryFactory, MemoryStore};
use crate::wire::{ItemDataset, S3Location};

struct FakeRegistry {
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
impl Registry for FakeRegistry {
    async fn list(&self) -> Result<Vec<ItemDataset>, ApiError> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        Ok(self
            .items
            .iter()
            .filter(|i| i.id != "1.2/hidden")
            .cloned()
            .collect())
    }
    async fn fetch(&self, handle: &str, _deadline: Deadline) -> Result<ItemDataset, ApiError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        self.items
            .iter()
            .find(|i| i.id == handle)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(handle.into()))
    }
}

fn registry(handles: &[&str]) -> Arc<FakeRegistry> {
    Arc::new(FakeRegistry {
        items: handles.iter().map(|h| item(h)).collect(),
        lists: AtomicU64::new(0),
        fetches: AtomicU64::new(0),
    })
}

fn soon() -> Deadline {
    Deadline::after(Duration::from_secs(5))
}

fn tree_over(store: Arc<MemoryStore>, reg: Arc<FakeRegistry>, ttl: Duration) -> Arc<Tree> {
    Arc::new(Tree::new(
        TreeConfig {
            metadata_ttl: ttl,
            ..TreeConfig::default()
        },
        reg,
        Arc::new(MemoryFactory(store)),
    ))
}

fn setup() -> (Arc<Tree>, Arc<FakeRegistry>, Arc<MemoryStore>) {
    let reg = registry(&["1.2/3", "1.2/4", "7/8", "1.2/hidden"]);
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
    let tree = tree_over(store.clone(), reg.clone(), Duration::from_secs(60));
    (tree, reg, store)
}

/// Sorted: a listing streams in S3's order, files held back a little.
fn names(v: &[DirEntry]) -> Vec<String> {
    let mut n: Vec<String> = v.iter().map(|e| e.name.to_string()).collect();
    n.sort();
    n
}

/// The attributes a readdirplus would hand out for `dir`'s listing.
fn listed(t: &Tree, dir: u64, entries: &[DirEntry]) -> Vec<(String, Attr)> {
    let mut out = Vec::new();
    t.fill(dir, entries, false, |_, e, a| {
        // Inode 0: a name gone since the listing (readers skip it).
        if a.ino != 0 {
            out.push((e.name.to_string(), *a));
        }
        false
    });
    out
}

async fn dataset(t: &Arc<Tree>, handle: &str) -> u64 {
    let (p, s) = handle.split_once('/').unwrap();
    let p = t.lookup(ROOT_INO, p, soon()).await.unwrap();
    t.lookup(p.ino, s, soon()).await.unwrap().ino
}

#[tokio::test]
async fn a_folder_shadows_its_object_across_page_boundaries() {
    // One key per page: `x` (object), `x-1`, `x.txt`, then prefix `x/`.
    let store = Arc::new(MemoryStore::with_page_size(1));
    for k in ["x", "x-1", "x.txt", "x/inner", "y"] {
        store.put(&format!("datasets/1-2-3/{k}"), "v");
    }
    let t = tree_over(store, registry(&["1.2/3"]), Duration::from_secs(60));
    let d = dataset(&t, "1.2/3").await;
    let (stream, drive) = t.open_dir(d).unwrap();
    assert!(drive);
    // A second opener shares the listing in flight instead of starting one.
    let (again, drive2) = t.open_dir(d).unwrap();
    assert!(!drive2 && Arc::ptr_eq(&stream, &again));
    t.drive(d, &stream).await;
    let e = stream.all().await.unwrap();
    assert_eq!(names(&e), ["x", "x-1", "x.txt", "y"]);
    let x = e.iter().find(|x| &*x.name == "x").unwrap();
    assert_eq!(x.kind, FileKind::Directory, "the folder wins");
    assert_eq!(e.len(), 4, "no duplicate `x`");
}

#[tokio::test]
async fn walks_root_prefix_dataset_and_folders() {
    let (t, reg, _) = setup();
    assert_eq!(
        names(&t.readdir(ROOT_INO, soon()).await.unwrap()),
        ["1.2", "7"]
    );
    let p = t.lookup(ROOT_INO, "1.2", soon()).await.unwrap();
    assert_eq!(names(&t.readdir(p.ino, soon()).await.unwrap()), ["3", "4"]);
    let d = t.lookup(p.ino, "3", soon()).await.unwrap();
    assert_eq!(
        reg.fetches.load(Ordering::Relaxed),
        0,
        "listed handle needs no fetch"
    );
    let e = t.readdir(d.ino, soon()).await.unwrap();
    assert_eq!(names(&e), ["a.csv", "clash", "data", "marker"]);
    let clash = e.iter().find(|x| &*x.name == "clash").unwrap();
    assert_eq!(clash.kind, FileKind::Directory, "directory wins");
    let a = t.lookup(d.ino, "a.csv", soon()).await.unwrap();
    assert_eq!((a.kind, a.size), (FileKind::File, 5));
    assert_eq!(
        reg.lists.load(Ordering::Relaxed),
        1,
        "registry listed once per TTL"
    );
}

#[tokio::test]
async fn lookups_in_listed_folders_make_no_requests() {
    let (t, _, store) = setup();
    let d = dataset(&t, "1.2/3").await;
    t.readdir(d, soon()).await.unwrap();
    let before = (
        store.lists.load(Ordering::Relaxed),
        store.heads.load(Ordering::Relaxed),
    );
    t.lookup(d, "a.csv", soon()).await.unwrap();
    assert!(matches!(
        t.lookup(d, ".git", soon()).await,
        Err(FsError::NotFound)
    ));
    assert!(matches!(
        t.lookup(d, "nothing-here", soon()).await,
        Err(FsError::NotFound)
    ));
    let after = (
        store.lists.load(Ordering::Relaxed),
        store.heads.load(Ordering::Relaxed),
    );
    assert_eq!(before, after);
}

#[tokio::test]
async fn unlisted_handle_resolves_by_name_and_made_up_names_leave_nothing() {
    let (t, reg, _) = setup();
    let p = t.lookup(ROOT_INO, "1.2", soon()).await.unwrap();
    let h = t.lookup(p.ino, "hidden", soon()).await.unwrap();
    assert_eq!(h.kind, FileKind::Directory);
    assert_eq!(
        reg.lists.load(Ordering::Relaxed),
        0,
        "lookup never lists the registry"
    );
    for _ in 0..2 {
        assert!(matches!(
            t.lookup(p.ino, "999", soon()).await,
            Err(FsError::NotFound)
        ));
    }
    assert_eq!(
        reg.fetches.load(Ordering::Relaxed),
        2,
        "negative lookups are cached"
    );
    assert!(matches!(
        t.lookup(ROOT_INO, ".git", soon()).await,
        Err(FsError::NotFound)
    ));
    // A dataset resolved by name stays visible in its prefix folder.
    assert_eq!(
        names(&t.readdir(p.ino, soon()).await.unwrap()),
        ["3", "4", "hidden"]
    );
    // A made-up prefix opens (a handle under it might exist) but is not
    // listed, and once the kernel forgets it, it is gone.
    let made_up = t.lookup(ROOT_INO, "31337", soon()).await.unwrap();
    assert!(matches!(
        t.lookup(made_up.ino, "1", soon()).await,
        Err(FsError::NotFound)
    ));
    assert_eq!(
        names(&t.readdir(ROOT_INO, soon()).await.unwrap()),
        ["1.2", "7"]
    );
    t.forget(made_up.ino, 1);
    assert!(matches!(t.getattr(made_up.ino), Err(FsError::Stale)));
}

#[tokio::test]
async fn lookup_without_listing_probes_dir_then_object() {
    let (t, _, store) = setup();
    let d = dataset(&t, "1.2/3").await;
    let data = t.lookup(d, "data", soon()).await.unwrap();
    assert_eq!(data.kind, FileKind::Directory);
    let x = t.lookup(data.ino, "x.bin", soon()).await.unwrap();
    assert_eq!(x.kind, FileKind::File);
    let clash = t.lookup(d, "clash", soon()).await.unwrap();
    assert_eq!(clash.kind, FileKind::Directory);
    let marker = t.lookup(d, "marker", soon()).await.unwrap();
    assert_eq!(marker.kind, FileKind::Directory);
    assert_eq!(store.gets.load(Ordering::Relaxed), 0);
    assert_eq!(
        store.heads.load(Ordering::Relaxed),
        0,
        "lookups cost no HEAD"
    );
    assert!(matches!(
        t.lookup(d, "nope", soon()).await,
        Err(FsError::NotFound)
    ));
    let f = t.open_file(x.ino).unwrap();
    assert_eq!(f.meta.key, "datasets/1-2-3/data/x.bin");
}

#[tokio::test]
async fn a_replaced_object_is_a_new_inode_and_the_old_one_keeps_its_version() {
    let store = Arc::new(MemoryStore::new());
    store.put("datasets/1-2-3/f", vec![1u8; 4]);
    let t = tree_over(store.clone(), registry(&["1.2/3"]), Duration::ZERO);
    let d = dataset(&t, "1.2/3").await;
    let v1 = t.lookup(d, "f", soon()).await.unwrap();
    let open1 = t.open_file(v1.ino).unwrap();
    store.put("datasets/1-2-3/f", vec![2u8; 8]);
    let v2 = t.lookup(d, "f", soon()).await.unwrap();
    assert_ne!(v1.ino, v2.ino, "a new version is a new inode");
    assert_eq!((v1.size, v2.size), (4, 8));
    assert_eq!(t.getattr(v1.ino).unwrap().size, 4, "the old keeps its size");
    assert_ne!(t.open_file(v2.ino).unwrap().meta.etag, open1.meta.etag);
    // Opening the old inode again (a cached dentry) is ESTALE, so the
    // kernel looks the name up and opens the new one.
    assert!(matches!(t.open_file(v1.ino), Err(FsError::Stale)));
    // Deleted: the name goes; the kernel's old inodes stay until forgotten.
    store.delete("datasets/1-2-3/f");
    assert!(matches!(
        t.lookup(d, "f", soon()).await,
        Err(FsError::NotFound)
    ));
    assert!(matches!(t.open_file(v2.ino), Err(FsError::Stale)));
    t.forget(v1.ino, 1);
    t.forget(v2.ino, 1);
    assert!(t.getattr(v1.ino).is_err() && t.getattr(v2.ino).is_err());
}

/// What a [`Hooked`] store does with a listing page it has read: passes
/// it on, holds it, or fails it (given the prefix and whether it is a
/// continuation page).
type ListHook = Box<
    dyn Fn(&str, bool) -> futures::future::BoxFuture<'static, Result<(), crate::s3::S3Error>>
        + Send
        + Sync,
>;

/// An in-memory store whose listings go through a hook after the page is
/// read: a slow network (the page is computed, the answer held), or a
/// failure.
struct Hooked {
    inner: Arc<MemoryStore>,
    hook: ListHook,
}

#[async_trait]
impl crate::s3::ObjectStore for Hooked {
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: Option<i32>,
        deadline: Deadline,
    ) -> Result<crate::s3::ListPage, crate::s3::S3Error> {
        let later = continuation.is_some();
        let page = self
            .inner
            .list(prefix, delimiter, continuation, max_keys, deadline)
            .await;
        (self.hook)(prefix, later).await?;
        page
    }
    async fn head(&self, key: &str, d: Deadline) -> Result<ObjectMeta, crate::s3::S3Error> {
        self.inner.head(key, d).await
    }
    async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
        version: Option<&ObjectMeta>,
        d: Deadline,
    ) -> Result<bytes::Bytes, crate::s3::S3Error> {
        self.inner.get_range(key, range, version, d).await
    }
}

/// Every dataset served by one store.
struct OneStore(Arc<dyn crate::s3::ObjectStore>);

impl StoreFactory for OneStore {
    fn open(&self, _h: &str, _b: &str) -> Arc<dyn crate::s3::ObjectStore> {
        self.0.clone()
    }
}

/// A gate a hooked listing waits at (telling `waiting` it does).
struct Gate {
    open: tokio::sync::Semaphore,
    waiting: tokio::sync::Notify,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            open: tokio::sync::Semaphore::new(0),
            waiting: tokio::sync::Notify::new(),
        })
    }

    async fn pass(&self) {
        self.waiting.notify_one();
        let _ = self.open.acquire().await;
    }
}

fn hooked_tree(mem: Arc<MemoryStore>, hook: ListHook) -> Arc<Tree> {
    Arc::new(Tree::new(
        TreeConfig::default(),
        registry(&["1.2/3"]),
        Arc::new(OneStore(Arc::new(Hooked { inner: mem, hook }))),
    ))
}

/// A tree over `mem` whose LISTs are held at `gate` when `hold(prefix,
/// later_page)` says so (read at once, answered when the gate opens).
fn gated_tree(
    mem: Arc<MemoryStore>,
    gate: &Arc<Gate>,
    hold: impl Fn(&str, bool) -> bool + Send + Sync + 'static,
) -> Arc<Tree> {
    let g = gate.clone();
    hooked_tree(
        mem,
        Box::new(move |prefix, later| {
            let held = hold(prefix, later);
            let g = g.clone();
            Box::pin(async move {
                if held {
                    g.pass().await;
                }
                Ok(())
            })
        }),
    )
}

/// Starts listing folder `d` on its own task: its stream, and the task.
fn drive_listing(t: &Arc<Tree>, d: u64) -> (Arc<DirStream>, tokio::task::JoinHandle<()>) {
    let (stream, _) = t.open_dir(d).unwrap();
    let (t, s) = (t.clone(), stream.clone());
    (stream, tokio::spawn(async move { t.drive(d, &s).await }))
}

#[tokio::test]
async fn a_listing_in_flight_never_undoes_a_detected_change() {
    let mem = Arc::new(MemoryStore::with_page_size(1));
    for k in ["a", "b", "c"] {
        mem.put(&format!("datasets/1-2-3/{k}"), "old");
    }
    // Pages after the first are read at once but answered when let go.
    let gate = Gate::new();
    let t = gated_tree(mem.clone(), &gate, |_, later| later);
    let d = dataset(&t, "1.2/3").await;
    let old_a = t.lookup(d, "a", soon()).await.unwrap();
    // The listing has page 1 (`a`, old) and page 2 (`b`) on its way.
    let (stream, driver) = drive_listing(&t, d);
    gate.waiting.notified().await;
    // `a` is replaced and `b` deleted; a lookup of each finds out.
    mem.put("datasets/1-2-3/a", "new!");
    mem.delete("datasets/1-2-3/b");
    t.mark_stale(old_a.ino);
    let new_a = t.lookup(d, "a", soon()).await.unwrap();
    assert_ne!(new_a.ino, old_a.ino);
    assert!(matches!(
        t.lookup(d, "b", soon()).await,
        Err(FsError::NotFound)
    ));
    // Now the old listing finishes: `a` stays new, `b` stays gone.
    gate.open.add_permits(100);
    driver.await.unwrap();
    let entries = stream.all().await.unwrap();
    let got = listed(&t, d, &entries);
    let a = got.iter().find(|(n, _)| n == "a").unwrap().1;
    assert_eq!((a.ino, a.size), (new_a.ino, 4), "the change stands");
    assert!(got.iter().all(|(n, _)| n != "b"), "the deletion stands");
    assert_eq!(t.lookup(d, "a", soon()).await.unwrap().ino, new_a.ino);
}

#[tokio::test]
async fn forgotten_inodes_go_and_expired_listings_take_theirs_along() {
    let store = Arc::new(MemoryStore::new());
    for i in 0..100 {
        store.put(&format!("datasets/1-2-3/f{i}"), "x");
    }
    let t = tree_over(store, registry(&["1.2/3"]), Duration::from_millis(200));
    let d = dataset(&t, "1.2/3").await;
    let before = t.stats().inodes;
    let entries = t.readdir(d, soon()).await.unwrap();
    assert_eq!(entries.len(), 100);
    // A readdirplus hands out (and the kernel holds) the first 10.
    let mut held = Vec::new();
    t.fill(d, &entries[..10], true, |_, _, a| {
        held.push(a.ino);
        false
    });
    assert_eq!(t.stats().inodes, before + 100);
    // Made-up names leave nothing in the table.
    for i in 0..1000 {
        let _ = t.lookup(d, &format!("nope{i}"), soon()).await;
    }
    assert_eq!(t.stats().inodes, before + 100);
    tokio::time::sleep(Duration::from_millis(250)).await;
    t.sweep();
    assert_eq!(t.stats().inodes, before + 10, "only what the kernel holds");
    for ino in held {
        t.forget(ino, 1);
    }
    assert_eq!(t.stats().inodes, before);
    assert_eq!(t.stats().listings, 0);
}

#[tokio::test]
async fn an_open_directory_handle_keeps_its_listing_past_the_ttl() {
    let store = Arc::new(MemoryStore::new());
    for i in 0..600 {
        store.put(&format!("datasets/1-2-3/f{i:03}"), "x");
    }
    let t = tree_over(store, registry(&["1.2/3"]), Duration::from_millis(100));
    let d = dataset(&t, "1.2/3").await;
    let entries = t.readdir(d, soon()).await.unwrap();
    // A slow `os.scandir` loop holds the stream past TTL and sweeps.
    let (held, _) = (t.open_dir(d).unwrap(), ());
    assert!(held.0.is_done());
    tokio::time::sleep(Duration::from_millis(250)).await;
    t.sweep();
    let mut seen = 0;
    t.fill(d, &entries, false, |_, _, a| {
        seen += (a.ino != 0) as usize;
        false
    });
    assert_eq!(seen, 600, "every entry still handed out, alive");
    // Once the handle is closed, the next sweep takes it all.
    drop(held);
    drop(entries);
    let before = t.stats().inodes;
    t.sweep();
    assert_eq!(t.stats().inodes, before - 600);
}

#[tokio::test]
async fn an_older_not_found_never_hides_a_newer_found() {
    let mem = Arc::new(MemoryStore::new());
    // The first probe of `x` is read at once but answered when let go.
    let gate = Gate::new();
    let first = std::sync::atomic::AtomicBool::new(false);
    let t = gated_tree(mem.clone(), &gate, move |prefix, _| {
        prefix.ends_with("/x") && !first.swap(true, Ordering::SeqCst)
    });
    let d = dataset(&t, "1.2/3").await;
    // Lookup 1 finds nothing, but its answer is slow to come back...
    let first = {
        let t = t.clone();
        tokio::spawn(async move { t.lookup(d, "x", soon()).await })
    };
    gate.waiting.notified().await;
    // ...while `x` is created and lookup 2 finds it.
    mem.put("datasets/1-2-3/x", "new");
    let found = t.lookup(d, "x", soon()).await.unwrap();
    gate.open.add_permits(1);
    let late = first.await.unwrap();
    assert_eq!(
        late.map(|a| a.ino).ok(),
        Some(found.ino),
        "the newer answer wins"
    );
    assert_eq!(t.lookup(d, "x", soon()).await.unwrap().ino, found.ino);
}

#[tokio::test]
async fn a_listing_that_fails_part_way_leaves_nothing_behind() {
    let mem = Arc::new(MemoryStore::new());
    for i in 0..1500 {
        mem.put(&format!("datasets/1-2-3/f{i:04}"), "x");
    }
    // Every page after the first is lost.
    let t = hooked_tree(
        mem,
        Box::new(|_, later| {
            Box::pin(async move {
                if later {
                    return Err(crate::s3::S3Error::Network("page 2 lost".into()));
                }
                Ok(())
            })
        }),
    );
    let d = dataset(&t, "1.2/3").await;
    let before = t.stats().inodes;
    assert!(t.readdir(d, soon()).await.is_err());
    assert_eq!(t.stats().inodes, before, "page 1's names did not stay");
}

/// What the tree must show for `keys` (relative to the dataset), by the
/// rules of docs/SEMANTICS.md: paths, directories ending in `/`.
fn model(keys: &[String]) -> BTreeSet<String> {
    let mut dirs = BTreeSet::new();
    let mut files = BTreeSet::new();
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

async fn walk(t: &Arc<Tree>, ino: u64, path: String, out: &mut BTreeSet<String>) {
    let entries = t.readdir(ino, soon()).await.unwrap();
    let mut seen = HashSet::new();
    for (name, attr) in listed(t, ino, &entries) {
        assert!(names::check(&name).is_ok(), "bad name {name:?}");
        assert!(seen.insert(name.clone()), "duplicate {name:?}");
        // Every listed name also resolves by lookup, to the same inode.
        assert_eq!(t.lookup(ino, &name, soon()).await.unwrap().ino, attr.ino);
        match attr.kind {
            FileKind::Directory => {
                let p = format!("{path}{name}/");
                out.insert(p.clone());
                Box::pin(walk(t, attr.ino, p, out)).await;
            }
            FileKind::File => {
                out.insert(format!("{path}{name}"));
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
        let tree = tree_over(store, registry(&["1.2/3"]), Duration::from_secs(60));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let got = rt.block_on(async {
            let d = dataset(&tree, "1.2/3").await;
            let mut out = BTreeSet::new();
            walk(&tree, d, String::new(), &mut out).await;
            out
        });
        proptest::prop_assert_eq!(got, model(&keys));
    }
}

#[tokio::test]
async fn lookups_past_the_ttl_list_a_large_folder_again_instead_of_probing_each_name() {
    // 50 files in pages of 10: a listing costs 5 LISTs.
    let store = Arc::new(MemoryStore::with_page_size(10));
    for i in 0..50 {
        store.put(&format!("datasets/1-2-3/f{i:02}"), "x");
    }
    let t = tree_over(
        store.clone(),
        registry(&["1.2/3"]),
        Duration::from_millis(200),
    );
    let d = dataset(&t, "1.2/3").await;
    assert_eq!(t.readdir(d, soon()).await.unwrap().len(), 50);
    let lists = || store.lists.load(Ordering::Relaxed);
    assert_eq!(lists(), 5);
    tokio::time::sleep(Duration::from_millis(250)).await;
    t.sweep();
    // Changed while the listing was expired: the answers must say so.
    store.delete("datasets/1-2-3/f49");
    store.put("datasets/1-2-3/f50", "new");
    let before = lists();
    // `cat *` after the TTL: a lookup of every name the shell globbed.
    for i in 0..50 {
        let r = t.lookup(d, &format!("f{i:02}"), soon()).await;
        if i == 49 {
            assert!(matches!(r, Err(FsError::NotFound)), "f49 is gone: {r:?}");
        } else {
            assert!(r.is_ok(), "f{i:02}: {r:?}");
        }
    }
    assert!(t.lookup(d, "f50", soon()).await.is_ok(), "f50 is new");
    // 5 probes; the 6th lookup starts the listing (5 pages) and waits for
    // it (a short one), which answers it and the rest; a probe per name
    // made 51 LISTs.
    assert_eq!(lists() - before, 5 + 5, "LISTs for 51 lookups past the TTL");

    // A lone lookup in a folder never listed stays one LIST.
    let t = tree_over(
        store.clone(),
        registry(&["1.2/3"]),
        Duration::from_millis(200),
    );
    let d = dataset(&t, "1.2/3").await;
    let before = lists();
    assert!(t.lookup(d, "f07", soon()).await.is_ok());
    assert_eq!(lists() - before, 1);
}

#[tokio::test]
async fn a_name_forgotten_while_its_folder_is_listed_stays_listed() {
    let mem = Arc::new(MemoryStore::with_page_size(1));
    for k in ["a", "b", "c"] {
        mem.put(&format!("datasets/1-2-3/{k}"), "v");
    }
    // The folder's third page is read at once but answered when let go:
    // by then the second has confirmed `a` (page 1's file waits for it).
    let gate = Gate::new();
    let pages = AtomicU64::new(0);
    let t = gated_tree(mem.clone(), &gate, move |prefix, _| {
        prefix.ends_with("1-2-3/") && pages.fetch_add(1, Ordering::SeqCst) == 2
    });
    let d = dataset(&t, "1.2/3").await;
    let a = t.lookup(d, "a", soon()).await.unwrap();
    let (stream, driver) = drive_listing(&t, d);
    gate.waiting.notified().await;
    // Page 1 confirmed `a`; then the kernel lets go of it.
    t.forget(a.ino, 1);
    gate.open.add_permits(100);
    driver.await.unwrap();
    let got = listed(&t, d, &stream.all().await.unwrap());
    assert_eq!(
        names_of(&got),
        ["a", "b", "c"],
        "every name listed is there"
    );
    let lists = mem.lists.load(Ordering::Relaxed);
    assert!(t.lookup(d, "a", soon()).await.is_ok());
    assert_eq!(
        mem.lists.load(Ordering::Relaxed),
        lists,
        "answered by the listing"
    );
}

fn names_of(v: &[(String, Attr)]) -> Vec<&str> {
    let mut n: Vec<&str> = v.iter().map(|(n, _)| n.as_str()).collect();
    n.sort();
    n
}

#[derive(Default)]
struct Offers(std::sync::Mutex<Vec<(String, Bytes)>>);

impl FirstBytes for Offers {
    fn offer(&self, file: &FileRef, head: Bytes) {
        self.0.lock().unwrap().push((file.meta.key.clone(), head));
    }
}

#[tokio::test]
async fn a_lookup_in_an_unlisted_folder_fetches_the_files_first_bytes_beside_its_list() {
    let store = Arc::new(MemoryStore::new());
    let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    store.put("datasets/1-2-3/big", big.clone());
    store.put("datasets/1-2-3/small", "tiny");
    store.put("datasets/1-2-3/dir/x", "x");
    store.put("datasets/1-2-3/later", "x");
    let t = tree_over(store.clone(), registry(&["1.2/3"]), Duration::from_secs(60));
    let offers = Arc::new(Offers::default());
    t.set_first_bytes(offers.clone());
    let d = dataset(&t, "1.2/3").await;
    let gets = || store.gets.load(Ordering::Relaxed);
    t.lookup(d, "big", soon()).await.unwrap();
    t.lookup(d, "small", soon()).await.unwrap();
    let got = offers.0.lock().unwrap().clone();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, "datasets/1-2-3/big");
    assert_eq!(&got[0].1[..], &big[..FIRST_BYTES as usize]);
    assert_eq!(
        (got[1].0.as_str(), &got[1].1[..]),
        ("datasets/1-2-3/small", &b"tiny"[..])
    );
    // A folder's name: a GET that finds nothing, no offer.
    t.lookup(d, "dir", soon()).await.unwrap();
    assert_eq!(offers.0.lock().unwrap().len(), 2);
    // Once the folder is listed, lookups past its TTL guess no more.
    t.readdir(d, soon()).await.unwrap();
    let t2 = tree_over(
        store.clone(),
        registry(&["1.2/3"]),
        Duration::from_millis(1),
    );
    t2.set_first_bytes(offers.clone());
    let d2 = dataset(&t2, "1.2/3").await;
    t2.readdir(d2, soon()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let before = gets();
    t2.lookup(d2, "later", soon()).await.unwrap();
    assert_eq!(gets(), before, "a LIST, no GET");
    assert_eq!(offers.0.lock().unwrap().len(), 2);
}
