//! The folders a mount writes to (the shared cache and its
//! `creds-<uid>/`, the log folder) are on file systems that stall: with
//! each of them hung (a FUSE file system of the tests' own that stops
//! answering on request, `common/stallfs.rs`), reads of other objects and
//! memory-cache hits answer at once, a read that needed the folder goes to
//! S3 within the stall timeout, renewals go on, a killed reader is gone
//! within 2 s, and once the folder answers again the mount uses it again.

mod common;
#[path = "common/stallfs.rs"]
mod stallfs;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use stallfs::StallFs;

const MIB: u64 = 1 << 20;

/// `--request-timeout` of these mounts: the stall timeout is a third.
const TIMEOUT: &str = "6";
const STALL: Duration = Duration::from_secs(2);

/// A private cache folder inside the stall file system.
fn cache_in(fs: &StallFs) -> std::path::PathBuf {
    let c = fs.path().join("cache");
    std::fs::create_dir(&c).unwrap();
    std::fs::set_permissions(&c, std::fs::Permissions::from_mode(0o700)).unwrap();
    c
}

/// The mount's folder of that description, from `status --json`.
fn folder_state(sim: &Sim, m: &Mount, what: &str) -> String {
    let out = sim.run(&mut sim.command(&["status", "--json", m.path().to_str().unwrap()]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    all[0]["folders"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["what"] == what)
        .map(|f| f["state"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no {what} in {all}"))
}

/// Times `f`, which must succeed.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

/// Block files in the backing folder of a cache (looked at without the
/// stall file system).
fn blocks_in(backing: &Path) -> usize {
    let v1 = backing.join("cache/v1");
    std::fs::read_dir(&v1)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .count()
}

#[test]
fn a_stalled_shared_cache_is_a_miss_and_stalls_nothing_else() {
    if !fuse_available() {
        return;
    }
    let fs = StallFs::mount();
    let cache = cache_in(&fs);
    let d = tempfile::tempdir().unwrap();
    let big = bytes(1, 24 * MIB as usize);
    let small = bytes(2, MIB as usize);
    write(d.path(), "10378.1/1/big.bin", &big);
    write(d.path(), "10378.1/1/small.bin", &small);
    write(d.path(), "10378.1/1/hung.bin", &bytes(3, 4 * MIB as usize));
    write(d.path(), "10378.1/1/after.bin", &bytes(4, 2 * MIB as usize));
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&[
        "--cache-dir",
        cache.to_str().unwrap(),
        "--cache-shared",
        "--request-timeout",
        TIMEOUT,
    ]);
    let mut p = Py::start();
    p.open("small", &m.join("10378.1/1/small.bin")).unwrap();
    assert_eq!(p.read_all("small").unwrap().1, md5_hex(&small));
    p.open("big", &m.join("10378.1/1/big.bin")).unwrap();
    p.random("big");
    // The cluster file system stops answering.
    fs.stall("");

    // A read of a block nobody has: the folder is given up after the
    // stall timeout, and S3 answers.
    let (got, first) = timed(|| p.pread("big", 3 * MIB, 4096));
    let at = 3 * MIB as usize;
    assert_eq!(got, Ok((4096, md5_hex(&big[at..at + 4096]))));
    eprintln!("first read with the folder stalled: {first:?}");
    assert!(first < STALL + Duration::from_secs(2), "{first:?}");
    // From now on the folder is not even tried: every read goes to S3 at
    // once, a whole file too (claims, writes, waits: none).
    let (got, t) = timed(|| p.pread("big", 9 * MIB, 4096));
    assert!(got.is_ok() && t < Duration::from_secs(1), "{got:?} {t:?}");
    let (got, t) = timed(|| std::fs::read(m.join("10378.1/1/big.bin")).unwrap());
    assert!(got == big, "wrong bytes");
    assert!(t < Duration::from_secs(3), "{t:?}");
    assert_eq!(
        folder_state(&sim, &m, "shared cache folder"),
        "not answering"
    );
    // A memory-cache hit and a lookup of a missing name, at once.
    p.forget_pages("small");
    let (got, t) = timed(|| p.pread("small", 0, 4096));
    assert_eq!(got, Ok((4096, md5_hex(&small[..4096]))));
    assert!(t < Duration::from_millis(500), "memory hit took {t:?}");
    let (r, t) = timed(|| std::fs::metadata(m.join("10378.1/1/nope.txt")));
    assert!(r.is_err() && t < Duration::from_millis(500), "{t:?}");
    // A reader stuck on S3 (not on the folder) dies at once when killed.
    sim.s3_hang("hung.bin");
    let mut cat = Command::new("cat")
        .arg(m.join("10378.1/1/hung.bin"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let t = Instant::now();
    unsafe { libc::kill(cat.id() as i32, libc::SIGKILL) };
    let _ = cat.wait();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    sim.s3_hang("");
    // Threads parked in the folder are bounded, not one per block read.
    let parked = fs.waiting();
    assert!(parked <= 8, "{parked} calls parked in the stalled folder");

    // It answers again: the next reads use it again (blocks are kept).
    fs.resume();
    let before = blocks_in(fs.backing());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let after = std::fs::read(m.join("10378.1/1/after.bin")).unwrap();
        assert_eq!(after.len(), 2 * MIB as usize);
        if blocks_in(fs.backing()) > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the folder answers again but no block was written in 20 s"
        );
        // Another file each time: the kernel keeps the pages read.
        std::thread::sleep(Duration::from_millis(500));
        p.open("b2", &m.join("10378.1/1/big.bin")).unwrap();
        p.random("b2");
        p.forget_pages("b2");
        let _ = p.pread("b2", 20 * MIB, 4096);
        p.close("b2");
    }
    assert_eq!(folder_state(&sim, &m, "shared cache folder"), "answering");
}
