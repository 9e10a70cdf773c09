//! At scale, with sizes cut to fit CI (scripts/bench-scale.sh runs the full
//! ones): huge folders stream, many datasets list once per TTL, and a cache
//! folder shared by several mounts ("nodes") serves them all.
//!
//! CI scale: a 20,000-object folder (full: 100,000), a nested dataset of
//! 10,000 objects in 110 folders (full: 100,000), 5,000 datasets (as full),
//! a 256 MiB file for the shared cache (full: 1 GiB).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;

/// These tests time things against each other (first entry vs last, find
/// vs raw listing, node 1 vs node 2): one at a time, so they do not time
/// each other's load on two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}
const GETBENCH: &str = env!("CARGO_BIN_EXE_provenafs-getbench");

fn touch_many(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        std::fs::write(dir.join(format!("f{i:06}.dat")), b"").unwrap();
    }
}

/// Peak resident memory of the mount's daemon, in MiB.
fn daemon_peak_rss_mib(mnt: &Path) -> u64 {
    let out = sh(&format!(
        "pgrep -f 'provenafs mount {}' | head -1",
        mnt.display()
    ));
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024
}

#[test]
fn a_huge_folder_streams_and_costs_pages_not_heads() {
    if !fuse_available() {
        return;
    }
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let n = 20_000;
    touch_many(&d.path().join("10378.1/1/big"), n);
    // 30 ms per request, as S3 from a cluster: 21 pages take >0.6 s.
    let sim = Sim::start(d, &["--latency-ms", "30"]);
    let m = sim.mount(&[]);
    let big = m.join("10378.1/1/big");
    std::fs::metadata(&big).unwrap();
    let lists_before = sim.stat("s3_list");
    // The first entry arrives after the first page, not the last.
    let out = sh(&format!(
        "python3 -c \"import os,sys,time; t=time.monotonic(); it=os.scandir(sys.argv[1]); next(it); a=time.monotonic()-t; n=1+sum(1 for _ in it); print(a, time.monotonic()-t, n)\" '{}'",
        big.display()
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let (first, all, count) = (v[0], v[1], v[2] as usize);
    eprintln!("first entry after {first:.3} s, all {count} after {all:.3} s");
    assert_eq!(count, n);
    assert!(
        first * 4.0 < all,
        "first entry {first:.3} s should come long before the last ({all:.3} s)"
    );
    // `ls -l` answers attributes from the listing: no HEAD, no new LIST,
    // and no xattr round trip per file.
    let t = Instant::now();
    let out = sh(&format!("ls -l '{}' | wc -l", big.display()));
    eprintln!(
        "ls -l of {n} listed entries: {:.3} s",
        t.elapsed().as_secs_f64()
    );
    let xattr = sh(&format!(
        "python3 -c \"import os,sys; os.listxattr(sys.argv[1])\" '{}' 2>&1",
        big.join("f000001.dat").display()
    ));
    assert!(
        String::from_utf8_lossy(&xattr.stdout).contains("Operation not supported"),
        "{}",
        String::from_utf8_lossy(&xattr.stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (n + 1).to_string()
    );
    assert_eq!(sim.stat("s3_head"), 0);
    let pages = sim.stat("s3_list") - lists_before;
    assert_eq!(pages, n.div_ceil(1000) as u64, "one listing, paged");
    // Lookups of listed names and of missing ones cost nothing within the TTL.
    for probe in ["f000042.dat", ".git", "__pycache__", "f000042.dat.aux.xml"] {
        let _ = std::fs::metadata(big.join(probe));
        let _ = std::fs::metadata(big.join(probe));
    }
    assert_eq!(sim.stat("s3_list") - lists_before, pages);
    assert_eq!(sim.stat("s3_head"), 0);
    let rss = daemon_peak_rss_mib(m.path());
    eprintln!("daemon peak RSS {rss} MiB after listing {n} entries");
    assert!(rss < 200, "memory stays bounded: {rss} MiB");
}

#[test]
fn find_over_a_nested_dataset_is_close_to_the_raw_listing() {
    if !fuse_available() {
        return;
    }
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    // 10 × 10 folders of 100 files: 10,000 objects, 111 folders.
    for a in 0..10 {
        for b in 0..10 {
            touch_many(&d.path().join(format!("10378.1/5/a{a}/b{b}")), 100);
        }
    }
    let sim = Sim::start(d, &["--latency-ms", "5"]);
    let m = sim.mount(&[]);
    // The raw ListObjectsV2 calls a walk needs, one folder at a time as
    // find goes, through the same S3 client stack.
    let mut walk = Command::new(GETBENCH);
    walk.args(["--walk", "10378.1/5", "1"]);
    for (k, v) in &sim.env {
        walk.env(k, v);
    }
    let out = sim.run(&mut walk);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let raw_secs: f64 = raw[1].parse().unwrap();
    assert_eq!(raw[2], "10000");
    let started = Instant::now();
    let out = sh(&format!(
        "find '{}' -type f | wc -l",
        m.join("10378.1/5").display()
    ));
    let find_secs = started.elapsed().as_secs_f64();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10000");
    eprintln!(
        "find {find_secs:.3} s, raw listing {raw_secs:.3} s ({} calls): ratio {:.2}",
        raw[0],
        find_secs / raw_secs
    );
    assert!(
        find_secs <= 1.5 * raw_secs,
        "find took {find_secs:.3} s, raw ListObjectsV2 {raw_secs:.3} s"
    );
}

#[test]
fn thousands_of_datasets_are_listed_once_per_ttl_and_never_for_a_lookup() {
    if !fuse_available() {
        return;
    }
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    for i in 0..5000 {
        std::fs::create_dir_all(d.path().join(format!("10999.1/{i}"))).unwrap();
    }
    write(d.path(), "10999.1/77/hello.txt", b"hi\n");
    let sim = Sim::start(d, &[]);
    // A lookup by handle fetches that one record, never the registry.
    let m = sim.mount(&[]);
    // Counted from here: the mount's own check of the API (one page of one
    // item) is not a listing.
    let (list0, fetch0) = (sim.stat("api_list"), sim.stat("api_fetch"));
    assert_eq!(
        std::fs::read(m.join("10999.1/77/hello.txt")).unwrap(),
        b"hi\n"
    );
    assert_eq!(sim.stat("api_list") - list0, 0);
    assert_eq!(sim.stat("api_fetch") - fetch0, 1);
    drop(m);
    let m = sim.mount(&["--metadata-ttl", "3", "--registry-ttl", "3"]);
    let list1 = sim.stat("api_list");
    for _ in 0..3 {
        let out = sh(&format!("ls '{}' | wc -l", m.join("10999.1").display()));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5000");
        let out = sh(&format!("ls '{}'", m.path().display()));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10999.1");
    }
    let pages = sim.stat("api_list") - list1;
    assert_eq!(pages, 250, "5,000 datasets in pages of 20, listed once");
    std::thread::sleep(Duration::from_millis(3100));
    let out = sh(&format!("ls '{}' | wc -l", m.join("10999.1").display()));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5000");
    assert_eq!(
        sim.stat("api_list") - list1,
        2 * pages,
        "listed again after the TTL"
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every (path, mode) under `dir`.
fn modes(dir: &Path) -> Vec<(String, u32)> {
    let out = sh(&format!(
        "find '{}' -mindepth 1 -printf '%p %m\\n'",
        dir.display()
    ));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(p, m)| (p.to_string(), u32::from_str_radix(m, 8).unwrap()))
        .collect()
}

#[test]
fn a_second_node_reads_from_the_shared_cache() {
    if !fuse_available() {
        return;
    }
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    write(d.path(), "10378.1/9/big.bin", &bytes(9, size));
    // S3 from a cluster: 20 ms to first byte.
    let sim = Sim::start(d, &["--latency-ms", "20"]);
    let cache_parent = tempfile::tempdir().unwrap();
    let cache = cache_parent.path().join("shared");
    let c = cache.to_str().unwrap();
    let flags = ["--cache-dir", c, "--cache-shared", "--cache-size", "1GiB"];
    let node1 = sim.mount(&flags);
    let node2 = sim.mount(&flags);
    let want = sha256(&sim.root().join("10378.1/9/big.bin"));
    let gets0 = sim.stat("s3_get");
    let read = |p: std::path::PathBuf| {
        let t = Instant::now();
        assert!(sh(&format!("cat '{}' > /dev/null", p.display()))
            .status
            .success());
        t.elapsed().as_secs_f64()
    };
    let first = read(node1.join("10378.1/9/big.bin"));
    // Node 1 writes blocks to the cache behind its reads; as a later job
    // on another node would, start once they are all there.
    let blocks = (size / MIB) as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = sh(&format!(
            "find '{}' -type f -not -name '.*' | wc -l",
            cache.display()
        ));
        let n: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        if n >= blocks {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 1 cached only {n} of {blocks} blocks"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let gets1 = sim.stat("s3_get");
    assert!(gets1 > gets0);
    let second = read(node2.join("10378.1/9/big.bin"));
    // Byte for byte (from the kernel's page cache now, so no new GET either).
    assert_eq!(sha256(&node2.join("10378.1/9/big.bin")), want);
    eprintln!(
        "first node {first:.2} s ({} GETs), second node {second:.2} s: {:.1}x",
        gets1 - gets0,
        first / second
    );
    assert_eq!(sim.stat("s3_get"), gets1, "the second node made no GET");
    assert!(
        first >= 3.0 * second,
        "second read {second:.2} s vs first {first:.2} s"
    );
    // Private by default: folders 0700, files 0600.
    for (p, m) in modes(&cache) {
        let want = if Path::new(&p).is_dir() { 0o700 } else { 0o600 };
        assert_eq!(m, want, "{p}");
    }
    drop((node1, node2));

    // A changed object is never served from the cache: its ETag differs.
    let newer = bytes(10, 3 * MIB);
    write(sim.root(), "10378.1/9/big.bin", &newer);
    let node3 = sim.mount(&flags);
    let before = sim.stat("s3_get");
    assert!(std::fs::read(node3.join("10378.1/9/big.bin")).unwrap() == newer);
    assert!(sim.stat("s3_get") > before);
}

#[test]
fn mounts_evicting_one_shared_cache_keep_it_bounded_and_correct() {
    if !fuse_available() {
        return;
    }
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    for i in 0..4 {
        write(d.path(), &format!("10378.1/3/f{i}"), &bytes(i, 48 * MIB));
    }
    let sim = Sim::start(d, &[]);
    let cache_parent = tempfile::tempdir().unwrap();
    let cache = cache_parent.path().join("c");
    let c = cache.to_str().unwrap();
    let flags = ["--cache-dir", c, "--cache-shared", "--cache-size", "40MiB"];
    let nodes = [sim.mount(&flags), sim.mount(&flags), sim.mount(&flags)];
    // Every node reads every file at once: 3 × 192 MiB through a 40 MiB cache.
    let mut readers = Vec::new();
    for (k, n) in nodes.iter().enumerate() {
        let dir = n.join("10378.1/3");
        let root = sim.root().join("10378.1/3");
        readers.push(std::thread::spawn(move || {
            for i in 0..4 {
                let f = format!("f{}", (i + k) % 4);
                assert_eq!(sha256(&dir.join(&f)), sha256(&root.join(&f)), "{f}");
            }
        }));
    }
    for r in readers {
        r.join().unwrap();
    }
    // Trimming runs beside the writes (a thread of each mount's own): the
    // last blocks written are trimmed within moments.
    let du = || {
        let out = sh(&format!("du -sm '{}' | cut -f1", cache.display()));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let t = std::time::Instant::now();
    let mut mib = du();
    while mib > 48 && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        mib = du();
    }
    eprintln!(
        "shared cache holds {mib} MiB after 576 MiB through a 40 MiB bound ({:?} after the reads)",
        t.elapsed()
    );
    assert!(mib <= 48, "bounded across processes: {mib} MiB");
    // Nothing half-written is left behind.
    let out = sh(&format!(
        "find '{}' -name '.tmp-*' | wc -l",
        cache.display()
    ));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
}

#[test]
fn cache_permissions_private_by_default_group_on_request() {
    if !fuse_available() {
        return;
    }
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/4/x", &bytes(4, 3 * MIB));
    let sim = Sim::start(d, &[]);
    let parent = tempfile::tempdir().unwrap();
    // A folder others can read is refused, with the fix in the message.
    let open = parent.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let out = sim.run(&mut sim.command(&[
        "mount",
        mnt.path().to_str().unwrap(),
        "--cache-dir",
        open.to_str().unwrap(),
    ]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("chmod 700") && err.contains("--cache-group"),
        "{err}"
    );
    assert!(!is_mounted(mnt.path()));
    // The group opt-in: folders 2770, files 0640, whatever the umask;
    // the top folder sticky too (3770), so no member can rename another's
    // `creds-<uid>/` away.
    let group = parent.path().join("group");
    let g = group.to_str().unwrap();
    let m = sim.mount(&["--cache-dir", g, "--cache-group"]);
    std::fs::read(m.join("10378.1/4/x")).unwrap();
    drop(m);
    assert_eq!(mode(&group), 0o3770);
    let all = modes(&group);
    assert!(all.iter().any(|(p, _)| Path::new(p).is_file()));
    for (p, m) in all {
        let want = if Path::new(&p) == group {
            0o3770
        } else if Path::new(&p).is_dir() {
            0o2770
        } else {
            0o640
        };
        assert_eq!(m, want, "{p}");
    }
}
