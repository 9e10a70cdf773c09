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
    write(
        d.path(),
        "10378.1/1/killed.bin",
        &bytes(9, 2 * MIB as usize),
    );
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&[
        "--cache-dir",
        cache.to_str().unwrap(),
        "--cache-shared",
        "--request-timeout",
        TIMEOUT,
    ]);
    let _resume = fs.resume_on_drop();
    let mut p = Py::start();
    p.open("small", &m.join("10378.1/1/small.bin")).unwrap();
    assert_eq!(p.read_all("small").unwrap().1, md5_hex(&small));
    p.open("big", &m.join("10378.1/1/big.bin")).unwrap();
    p.random("big");
    // The cluster file system stops answering.
    fs.stall("");
    // A reader waiting on the folder (its file's first block is looked
    // for there first) dies at once when killed.
    let gone = killed_after(&m.join("10378.1/1/killed.bin"), Duration::from_millis(500));
    assert!(gone < Duration::from_secs(2), "{gone:?}");

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

/// Starts `cat PATH` and kills it with SIGKILL after `after`: how long it
/// took to be gone.
fn killed_after(path: &Path, after: Duration) -> Duration {
    let mut cat = Command::new("cat")
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let t = Instant::now();
    unsafe { libc::kill(cat.id() as i32, libc::SIGKILL) };
    let _ = cat.wait();
    t.elapsed()
}

/// Files in the backing folder of the credentials folder.
fn leases_in(fs: &StallFs) -> Vec<(String, std::time::SystemTime)> {
    let uid = unsafe { libc::geteuid() };
    std::fs::read_dir(fs.backing().join(format!("cache/creds-{uid}")))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().modified().unwrap(),
            )
        })
        .collect()
}

#[test]
fn renewals_go_on_while_the_credentials_folder_is_stalled() {
    if !fuse_available() {
        return;
    }
    let fs = StallFs::mount();
    let cache = cache_in(&fs);
    let d = tempfile::tempdir().unwrap();
    let data = bytes(5, 8 * MIB as usize);
    write(d.path(), "10378.1/1/f.bin", &data);
    write(d.path(), "10378.1/2/b.txt", b"other\n");
    write(d.path(), "10378.1/3/c.txt", b"third\n");
    // Tokens renewed after 8 s (a third of 12 left), credentials after
    // 10 s; both in hand end by 15 s.
    let sim = Sim::start(d, &["--access-token-ttl", "12", "--credentials-ttl", "15"]);
    let m = sim.mount(&[
        "--cache-dir",
        cache.to_str().unwrap(),
        "--cache-shared",
        "--request-timeout",
        TIMEOUT,
    ]);
    let _resume = fs.resume_on_drop();
    let t0 = Instant::now();
    let mut p = Py::start();
    p.open("f", &m.join("10378.1/1/f.bin")).unwrap();
    p.random("f");
    assert!(p.pread("f", 0, 4096).is_ok());
    assert!(!leases_in(&fs).is_empty(), "leases are shared");
    // Only the credentials folder stops answering (blocks are fine).
    fs.stall("creds-");
    // A dataset opened now needs credentials: its reader waits for the
    // folder's stall timeout at most, and dies at once if killed.
    let gone = killed_after(&m.join("10378.1/3/c.txt"), Duration::from_millis(500));
    assert!(gone < Duration::from_secs(2), "{gone:?}");
    // Past the end of the token and credentials in hand: renewed without
    // the folder.
    std::thread::sleep(Duration::from_secs(17).saturating_sub(t0.elapsed()));
    let (got, t) = timed(|| p.pread("f", 5 * MIB, 4096));
    let at = 5 * MIB as usize;
    assert_eq!(got, Ok((4096, md5_hex(&data[at..at + 4096]))));
    assert!(t < STALL + Duration::from_secs(2), "{t:?}");
    let (b, t) = timed(|| std::fs::read(m.join("10378.1/2/b.txt")));
    assert_eq!(b.unwrap(), b"other\n");
    assert!(t < STALL + Duration::from_secs(2), "{t:?}");
    assert_eq!(
        folder_state(&sim, &m, "credentials folder"),
        "not answering"
    );
    // It answers again: the next renewal is shared there again.
    fs.resume();
    let before = leases_in(&fs);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut probe = 9_000_000;
    loop {
        let now = leases_in(&fs);
        if now.iter().any(|l| !before.contains(l)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no lease stored after the folder answered again: {now:?}"
        );
        // Lookups of handles not known yet (each an API call) keep the
        // access token renewing.
        probe += 1;
        let _ = std::fs::metadata(m.join(&format!("10378.1/{probe}")));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(folder_state(&sim, &m, "credentials folder"), "answering");
}

#[test]
fn a_stalled_log_folder_never_blocks_the_mount() {
    if !fuse_available() {
        return;
    }
    let fs = StallFs::mount();
    let d = tempfile::tempdir().unwrap();
    let small = bytes(6, MIB as usize);
    write(d.path(), "10378.1/1/small.bin", &small);
    write(d.path(), "10378.1/1/big.bin", &bytes(7, 8 * MIB as usize));
    write(d.path(), "10378.1/1/hung.bin", &bytes(8, MIB as usize));
    write(
        d.path(),
        "10378.1/1/fresh.bin",
        &bytes(10, 4 * MIB as usize),
    );
    let sim = Sim::start(d, &[]);
    let log = fs.path().join("mount.log");
    let m = sim.mount(&[
        "--log-file",
        log.to_str().unwrap(),
        "--log-level",
        "debug",
        "--request-timeout",
        TIMEOUT,
    ]);
    let _resume = fs.resume_on_drop();
    let mut p = Py::start();
    p.open("small", &m.join("10378.1/1/small.bin")).unwrap();
    assert_eq!(p.read_all("small").unwrap().1, md5_hex(&small));
    // Looked up (listed) before S3 starts failing: opens need no request.
    for f in ["big.bin", "fresh.bin"] {
        assert!(std::fs::metadata(m.join(&format!("10378.1/1/{f}"))).is_ok());
    }
    // The home folder hangs, and S3 hiccups: warnings to log, from every
    // thread that meets one.
    fs.stall("");
    sim.set_faults(1.0, 0.0);
    let mut readers = Vec::new();
    for k in 1..8u64 {
        let path = m.join("10378.1/1/big.bin");
        readers.push(std::thread::spawn(move || {
            let mut p = Py::start();
            p.open("b", &path).unwrap();
            p.random("b");
            let _ = p.pread("b", k * MIB, 4096);
        }));
    }
    std::thread::sleep(Duration::from_secs(3));
    sim.set_faults(0.0, 0.0);
    // A memory-cache hit, a lookup, a new read: at once.
    p.forget_pages("small");
    let (got, t) = timed(|| p.pread("small", 0, 4096));
    assert_eq!(got, Ok((4096, md5_hex(&small[..4096]))));
    assert!(t < Duration::from_millis(500), "memory hit took {t:?}");
    let (r, t) = timed(|| std::fs::metadata(m.join("10378.1/1/nope")));
    assert!(r.is_err() && t < Duration::from_millis(500), "{t:?}");
    for r in readers {
        r.join().unwrap();
    }
    // A file not read yet (big.bin's failed blocks are remembered for 5 s).
    let (got, t) = timed(|| std::fs::read(m.join("10378.1/1/fresh.bin")).unwrap());
    assert_eq!(got.len(), 4 * MIB as usize);
    assert!(t < Duration::from_secs(3), "{t:?}");
    sim.s3_hang("hung.bin");
    let gone = killed_after(&m.join("10378.1/1/hung.bin"), Duration::from_millis(500));
    assert!(gone < Duration::from_secs(2), "{gone:?}");
    sim.s3_hang("");
    assert_eq!(folder_state(&sim, &m, "log folder"), "not answering");
    // It answers again: the log says how long it did not, and goes on.
    fs.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("the log folder did not answer for") {
            break;
        }
        assert!(Instant::now() < deadline, "no word of the stall in the log");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(folder_state(&sim, &m, "log folder"), "answering");
    assert!(m.stats().contains_key("bytes_read"));
}

#[test]
fn a_mount_whose_log_or_cache_folder_hangs_at_start_fails_in_time() {
    if !fuse_available() {
        return;
    }
    let fs = StallFs::mount();
    let cache = cache_in(&fs);
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/f.txt", b"x\n");
    let sim = Sim::start(d, &[]);
    let _resume = fs.resume_on_drop();
    fs.stall("");
    let log = fs.path().join("mount.log");
    for (args, says) in [
        (
            vec!["--log-file", log.to_str().unwrap()],
            "cannot open log file",
        ),
        (
            vec!["--cache-dir", cache.to_str().unwrap(), "--cache-shared"],
            "did not answer",
        ),
    ] {
        let mnt = tempfile::tempdir().unwrap();
        let mut all = vec![
            "mount",
            mnt.path().to_str().unwrap(),
            "--request-timeout",
            TIMEOUT,
        ];
        all.extend_from_slice(&args);
        let (out, t) = timed(|| sim.run(&mut sim.command(&all)));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(t < STALL + Duration::from_secs(5), "{args:?}: {t:?}");
        assert!(!is_mounted(mnt.path()));
    }
}
