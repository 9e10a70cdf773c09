//! Bytes the daemon keeps per known object: a counting allocator measures
//! the inode table and listing of a folder of 100,000 objects (the number
//! bench/SCALE.md states). Before issue 10 the same measure gave 632 bytes,
//! kept for the life of the mount; now it is about 216, and goes with the
//! listing's TTL unless the kernel holds the inode.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use provenafs::api::ApiError;
use provenafs::fs::tree::{Registry, Tree, TreeConfig, ROOT_INO};
use provenafs::retry::Deadline;
use provenafs::s3::memory::{MemoryFactory, MemoryStore};
use provenafs::wire::{ItemDataset, S3Location};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

struct One(AtomicU64);

#[async_trait]
impl Registry for One {
    async fn list(&self) -> Result<Vec<ItemDataset>, ApiError> {
        Ok(vec![item()])
    }
    async fn fetch(&self, _h: &str, _d: Deadline) -> Result<ItemDataset, ApiError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(item())
    }
}

fn item() -> ItemDataset {
    ItemDataset {
        id: "10378.1/1687966".into(),
        display_name: None,
        collection_format: None,
        s3: S3Location {
            bucket_name: "rrap-storage-bucket".into(),
            path: "datasets/10378-1-1687966/".into(),
            s3_uri: None,
        },
        created_timestamp: Some(1),
        updated_timestamp: Some(2),
        release_status: None,
        extra: Default::default(),
    }
}

#[test]
fn a_known_object_costs_about_a_fifth_of_a_kilobyte() {
    const N: usize = 100_000;
    let store = Arc::new(MemoryStore::new());
    for i in 0..N {
        // Names as a model's output folder has them, ETags MD5s.
        store.put(
            &format!("datasets/10378-1-1687966/data/sst_{i:06}.nc"),
            i.to_le_bytes().to_vec(),
        );
    }
    let tree = Arc::new(Tree::new(
        TreeConfig {
            metadata_ttl: Duration::from_secs(3600),
            ..TreeConfig::default()
        },
        Arc::new(One(AtomicU64::new(0))),
        Arc::new(MemoryFactory(store)),
    ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = || Deadline::after(Duration::from_secs(60));
    let data = rt.block_on(async {
        let p = tree.lookup(ROOT_INO, "10378.1", deadline()).await.unwrap();
        let d = tree.lookup(p.ino, "1687966", deadline()).await.unwrap();
        tree.lookup(d.ino, "data", deadline()).await.unwrap().ino
    });
    let before = LIVE.load(Ordering::Relaxed);
    let n = rt.block_on(async { tree.readdir(data, deadline()).await.unwrap().len() });
    assert_eq!(n, N);
    let after = LIVE.load(Ordering::Relaxed);
    let per = (after - before) as f64 / N as f64;
    println!("daemon state per known object: {per:.0} bytes");
    assert!(per < 250.0, "{per:.0} bytes per object");
    // The listing's TTL over (swept), nothing the kernel holds: it all goes.
    drop(tree);
    assert!(LIVE.load(Ordering::Relaxed) < before, "freed with the tree");
}
