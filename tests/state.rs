//! What the daemon keeps, and what it trusts: inodes live while the kernel
//! holds them (FUSE forget) or a listing names them; made-up names leave
//! nothing but a bounded negative cache, and the kernel caches them too;
//! a refused dataset is refused from memory; the cache folder is input,
//! not trusted; the log file is private.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;

#[test]
fn inodes_the_kernel_forgets_and_expired_listings_leave_the_daemon() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for i in 0..200 {
        write(d.path(), &format!("10378.1/1/gone/g{i:03}"), b"x");
    }
    write(d.path(), "10378.1/1/keep", b"k");
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&["--metadata-ttl", "1"]);
    let gone = m.join("10378.1/1/gone");
    std::fs::metadata(m.join("10378.1/1/keep")).unwrap();
    let baseline = m.stats()["inodes"];
    // `ls -l`: the kernel now holds 200 more inodes (readdirplus).
    assert!(sh(&format!("ls -l '{}' > /dev/null", gone.display()))
        .status
        .success());
    assert!(m.stats()["inodes"] >= baseline + 200);
    // The objects are deleted; after the TTL each old name is looked at
    // again: the kernel drops its entry and forgets the inode.
    std::fs::remove_dir_all(sim.root().join("10378.1/1/gone")).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    for i in 0..200 {
        let e = std::fs::metadata(gone.join(format!("g{i:03}"))).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
    // Forgotten and swept: back to what the kernel still holds.
    let t = Instant::now();
    loop {
        let s = m.stats();
        if s["inodes"] <= baseline + 1 {
            assert!(s["forgets"] >= 200, "{s:?}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "inodes stay: {s:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn made_up_names_leave_nothing_and_the_kernel_remembers_them() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/a.csv", b"a");
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&["--metadata-ttl", "60"]);
    let ds = m.join("10378.1/1");
    assert_eq!(names(&ds), ["a.csv"]);
    let before = m.stats();
    for round in 0..2 {
        for i in 0..2000 {
            let e = std::fs::metadata(ds.join(format!("made-up-{i}"))).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        }
        let s = m.stats();
        assert_eq!(
            s["inodes"], before["inodes"],
            "round {round}: no inode per made-up name"
        );
        if round == 1 {
            // The kernel cached every "no such name" (an entry with inode
            // 0 and the TTL): the second round never reached the daemon.
            assert_eq!(s["lookups"], before["lookups"] + 2000, "{s:?}");
        }
    }
    // Made-up handles: a prefix opens (a handle under it might exist) but
    // no made-up name ever shows in a listing.
    assert!(std::fs::metadata(m.join("99999")).unwrap().is_dir());
    for p in ["99999/1", "10378.1/777"] {
        let e = std::fs::metadata(m.join(p)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{p}");
    }
    assert_eq!(names(m.path()), ["10378.1"]);
    assert_eq!(names(&m.join("10378.1")), ["1"]);
    assert!(m.stats()["negative"] <= 16_384);
}

#[test]
fn a_refused_dataset_is_refused_from_memory_and_keeps_the_token() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/a", b"a");
    write(d.path(), "10378.1/2/b", b"b");
    let sim = Sim::start(d, &["--deny", "10378.1/2"]);
    let m = sim.mount(&[]);
    let e = std::fs::read_dir(m.join("10378.1/2")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    let tokens = sim.stat("tokens_issued");
    for _ in 0..5 {
        let e = std::fs::read_dir(m.join("10378.1/2")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        let e = std::fs::read(m.join("10378.1/2/b")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    }
    assert_eq!(
        sim.stat("tokens_issued"),
        tokens,
        "no Keycloak exchange per ls"
    );
    assert_eq!(
        sim.stat("credentials_refused"),
        1,
        "one data store call per TTL"
    );
    assert_eq!(std::fs::read(m.join("10378.1/1/a")).unwrap(), b"a");
}

#[test]
fn a_hostile_cache_folder_never_hangs_misleads_or_exhausts_memory() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let f = bytes(7, 8 * MIB);
    write(d.path(), "10378.1/1/f.bin", &f);
    write(d.path(), "10378.1/1/other.bin", &bytes(8, MIB));
    let sim = Sim::start(d, &[]);
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("c");
    let flags = ["--cache-dir", dir.to_str().unwrap()];
    {
        // A valid block of another object, to link to.
        let m = sim.mount(&flags);
        std::fs::read(m.join("10378.1/1/other.bin")).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    let block = |key: &str, etag: &str, i: u64| {
        let name = provenafs::read::cache::block_file_name("provena-bucket", key, etag, i);
        dir.join("v1").join(&name[..2]).join(name)
    };
    let key = "datasets/10378-1-1/f.bin";
    let etag = md5_hex(&f);
    let other = block("datasets/10378-1-1/other.bin", &md5_hex(&bytes(8, MIB)), 0);
    let other_before = std::fs::read(&other).expect("the other object's block is on disk");
    let valid_len = 8 + 3 * 4 + "provena-bucket".len() + key.len() + etag.len() + 8 + 8 + 4 + MIB;
    let paths: Vec<_> = (0..7).map(|i| block(key, &etag, i)).collect();
    for p in &paths {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    }
    let fifo = std::ffi::CString::new(paths[0].to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    std::os::unix::fs::symlink(&other, &paths[1]).unwrap();
    std::fs::write(&paths[2], vec![0x5a; valid_len]).unwrap(); // garbage, right length
    std::fs::write(&paths[3], b"P").unwrap(); // truncated
    let huge = std::fs::File::create(&paths[4]).unwrap();
    huge.set_len(8 << 30).unwrap(); // 8 GiB, sparse
    std::os::unix::fs::symlink("/etc/passwd", &paths[5]).unwrap();
    std::fs::create_dir(&paths[6]).unwrap();
    let passwd = std::fs::read("/etc/passwd").unwrap();

    let m = sim.mount(&flags);
    let t = Instant::now();
    assert_eq!(
        sha256(&m.join("10378.1/1/f.bin")),
        sha256(&sim.root().join("10378.1/1/f.bin"))
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    let pid = m.daemon_pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(hwm < 512 * 1024, "peak RSS {hwm} KiB");
    std::thread::sleep(Duration::from_millis(500));
    // Each bad entry is gone or replaced by a good block; what links
    // pointed to is untouched; a folder is left alone.
    for (i, p) in paths.iter().enumerate().take(6) {
        if let Ok(md) = std::fs::symlink_metadata(p) {
            assert!(
                md.is_file() && md.len() == valid_len as u64,
                "entry {i}: {md:?}"
            );
        }
    }
    assert!(paths[6].is_dir());
    assert_eq!(std::fs::read(&other).unwrap(), other_before);
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd);
}

#[test]
fn the_log_file_is_created_private() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/a", b"a");
    let sim = Sim::start(d, &[]);
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("mount.log");
    let _m = sim.mount(&["--log-file", log.to_str().unwrap()]);
    let mode = std::fs::metadata(&log).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
}
