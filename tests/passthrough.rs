//! Issue 22: a file kept whole in the disk cache (bought) is read by the
//! kernel itself on the next open (FUSE passthrough, Linux 6.9 and later,
//! a root daemon): the bytes are the object's, no read reaches the daemon,
//! and an inode open in the kernel's cached mode is never opened the other
//! way (which the kernel refuses with EIO).

mod common;

use std::os::unix::fs::FileExt;

use common::*;

const MIB: usize = 1 << 20;

/// Whether this kernel and user can use passthrough: Linux 6.9 or later,
/// as root (the mount's own check; the tests' folders are on a local disk).
fn passthrough_expected() -> bool {
    provenafs::fs::passthrough::possible()
}

#[test]
fn a_bought_file_is_read_by_the_kernel_from_the_cache_on_the_next_open() {
    if !fuse_available() {
        return;
    }
    let size = 8 * MIB;
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/index.sqlite", &bytes(7, size));
    let sim = Sim::start(d, WAN);
    let rel = "10378.1/1/index.sqlite";
    let want = sha256(&sim.root().join(rel));
    let m = sim.mount(&[]);
    std::fs::read_dir(m.join("10378.1/1")).unwrap().count();
    // Dependent page reads: the file is bought after a few round trips.
    let f = std::fs::File::open(m.join(rel)).unwrap();
    let mut page = vec![0u8; 4096];
    for i in 0..24 {
        f.read_exact_at(&mut page, ((i * 2_654_435) % (size - 4096)) as u64)
            .unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(2000));
    let st = m.stats();
    assert_eq!(st.get("buys"), Some(&1), "{st:?}");
    // A second handle while the first (cached mode) is open: cached too,
    // right bytes, no EIO.
    assert_eq!(sha256(&m.join(rel)), want);
    assert_eq!(m.stats().get("passthrough_opens"), Some(&0));
    drop(f);
    drop(m);
    // A fresh mount: the file is whole in the cache folder.
    let m = sim.mount(&[]);
    std::fs::read_dir(m.join("10378.1/1")).unwrap().count();
    let before = m.stats();
    let gets0 = sim.stat("s3_get");
    assert_eq!(sha256(&m.join(rel)), want);
    // Two handles at once share the backing file.
    let a = std::fs::File::open(m.join(rel)).unwrap();
    let b = std::fs::File::open(m.join(rel)).unwrap();
    let (mut x, mut y) = (vec![0u8; 65536], vec![0u8; 65536]);
    a.read_exact_at(&mut x, 3 * MIB as u64).unwrap();
    b.read_exact_at(&mut y, 3 * MIB as u64).unwrap();
    assert_eq!(x, y);
    let after = m.stats();
    eprintln!("before {before:?}\nafter {after:?}");
    assert_eq!(sim.stat("s3_get"), gets0, "a cached file made GETs");
    if passthrough_expected() {
        assert!(
            after.get("passthrough_opens").is_some_and(|&n| n >= 3),
            "no passthrough on a kernel that has it: {after:?}"
        );
        assert_eq!(
            after.get("reads"),
            before.get("reads"),
            "reads reached the daemon"
        );
        // Kept once: the whole file, its blocks removed.
        let mut files = Vec::new();
        for shard in std::fs::read_dir(sim.state.path().join("cache/provenafs/v1")).unwrap() {
            let shard = shard.unwrap().path();
            if shard.is_dir() {
                for e in std::fs::read_dir(&shard).unwrap() {
                    let name = e.unwrap().file_name().to_string_lossy().into_owned();
                    if !name.starts_with('.') {
                        files.push(name);
                    }
                }
            }
        }
        assert!(
            files.len() == 1 && files[0].ends_with(".whole"),
            "{files:?}"
        );
    } else {
        eprintln!("no FUSE passthrough here: read through the daemon");
    }
    drop((a, b));
    drop(m);
    // Without passthrough, reads come to the daemon and are served from
    // the whole file (no GET).
    let m = sim.mount(&["--no-passthrough"]);
    std::fs::read_dir(m.join("10378.1/1")).unwrap().count();
    let gets0 = sim.stat("s3_get");
    assert_eq!(sha256(&m.join(rel)), want);
    let st = m.stats();
    assert_eq!(st.get("passthrough_opens"), Some(&0), "{st:?}");
    assert!(st.get("reads").is_some_and(|&n| n > 0), "{st:?}");
    assert_eq!(sim.stat("s3_get"), gets0, "the cached file made GETs");
}

#[test]
fn a_prefetched_file_is_read_by_the_kernel_from_the_cache() {
    prefetched_then_read(&[], passthrough_expected());
}

/// A job array's stage-in: `prefetch` into the folder its nodes share.
/// No whole file there: such a folder is on a cluster file system, whose
/// stalls a read the kernel makes itself would wait out past every bound
/// the mount keeps, and it is trimmed by sampling. Every node reads the
/// blocks, with no GET.
#[test]
fn a_file_prefetched_into_a_job_arrays_folder_is_read_from_its_blocks() {
    prefetched_then_read(&["--cache-shared"], false);
}

fn prefetched_then_read(folder: &[&str], whole: bool) {
    if !fuse_available() {
        return;
    }
    let size = 6 * MIB + 12_345;
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/grid.h5", &bytes(9, size));
    let sim = Sim::start(d, &[]);
    let rel = "10378.1/1/grid.h5";
    let want = sha256(&sim.root().join(rel));
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let cache = cache.to_str().unwrap();
    let mut args = vec!["prefetch", "10378.1/1", "--cache-dir", cache, "--json"];
    args.extend_from_slice(folder);
    let out = sim.run(&mut sim.command(&args));
    assert!(out.status.success(), "{out:?}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("prefetch: {s}");
    let mut flags = vec!["--cache-dir", cache];
    flags.extend_from_slice(folder);
    // Two mounts at once: two nodes of an array (one is enough for a
    // private folder, but costs nothing).
    let nodes = [sim.mount(&flags), sim.mount(&flags)];
    for m in &nodes {
        std::fs::read_dir(m.join("10378.1/1")).unwrap().count();
        let (before, gets0) = (m.stats(), sim.stat("s3_get"));
        assert_eq!(sha256(&m.join(rel)), want);
        let after = m.stats();
        assert_eq!(sim.stat("s3_get"), gets0, "a prefetched file made GETs");
        if whole {
            // Kept whole by `prefetch` (root, Linux 6.9 and later, a
            // private folder on a local disk): the kernel reads it, none
            // of its reads reach the daemon.
            assert_eq!(after.get("passthrough_opens"), Some(&1), "{after:?}");
            assert_eq!(after.get("reads"), before.get("reads"), "{after:?}");
        } else {
            assert_eq!(after.get("passthrough_opens"), Some(&0), "{after:?}");
        }
    }
    if whole {
        assert_eq!(s["files_kept_whole"], 1, "{s}");
    } else {
        // Elsewhere it stays as blocks: a whole file no mount could hand
        // to the kernel is one more write of it for nothing.
        assert_eq!(s["files_kept_whole"], 0, "{s}");
    }
}
