//! Objects replaced or deleted while in use, through real opens of a real
//! mount: an open handle reads the version it opened or gets ESTALE, every
//! open after a change sees exactly the new version, and a listing already
//! on its way never undoes a change. The first three tests are the small
//! inputs of issue 10, kept as they were written there.

mod common;

use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
const F: &str = "10378.1/1/f.bin";

/// Waits out a metadata TTL of 1 s.
fn after_ttl() {
    std::thread::sleep(Duration::from_millis(1200));
}

#[test]
fn mixed_versions() {
    if !fuse_available() {
        return;
    }
    // An 8 MiB object, `--metadata-ttl 1 --cache-dir DIR`.
    let d = tempfile::tempdir().unwrap();
    let v1 = bytes(1, 8 * MIB as usize);
    let v2 = bytes(2, 8 * MIB as usize);
    write(d.path(), F, &v1);
    let sim = Sim::start(d, &[]);
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().join("c");
    let m = sim.mount(&[
        "--metadata-ttl",
        "1",
        "--cache-dir",
        cache_dir.to_str().unwrap(),
    ]);
    let path = m.join(F);
    // Process 1 opens it and reads all of it.
    let mut p1 = Py::start();
    p1.open("a", &path).unwrap();
    assert_eq!(p1.read_all("a"), Ok((8 * MIB, md5_hex(&v1))));
    // The object is replaced by another 8 MiB.
    replace(sim.root(), F, &v2);
    // After the TTL, process 2 opens it and reads 4 KiB.
    after_ttl();
    let mut p2 = Py::start();
    p2.open("b", &path).unwrap();
    assert_eq!(p2.pread("b", 0, 4096), Ok((4096, md5_hex(&v2[..4096]))));
    // Process 1 re-reads through its old handle and closes: its own
    // version (from the kernel's cache of its inode), or ESTALE.
    match p1.read_all("a") {
        Ok(got) => assert_eq!(got, (8 * MIB, md5_hex(&v1)), "the old handle's own version"),
        Err(e) => assert_eq!(e, libc::ESTALE),
    }
    p1.close("a");
    // A fresh md5sum matches the new version, and keeps doing so.
    for _ in 0..2 {
        assert_eq!(md5sum(&path), md5_hex(&v2));
        after_ttl();
    }
}

#[test]
fn cut_short() {
    if !fuse_available() {
        return;
    }
    // A 4 MiB object, handle 1 open.
    let d = tempfile::tempdir().unwrap();
    let v1 = bytes(3, 4 * MIB as usize);
    let v2 = bytes(4, 8 * MIB as usize);
    write(d.path(), F, &v1);
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&["--metadata-ttl", "1"]);
    let path = m.join(F);
    let mut p = Py::start();
    p.open("h1", &path).unwrap();
    assert_eq!(p.pread("h1", 0, 4096), Ok((4096, md5_hex(&v1[..4096]))));
    // Replaced by an 8 MiB one; after the TTL handle 2 opens (size 8 MiB).
    replace(sim.root(), F, &v2);
    after_ttl();
    p.open("h2", &path).unwrap();
    assert_eq!(p.size("h2"), 8 * MIB);
    assert_eq!(p.size("h1"), 4 * MIB, "handle 1 keeps its version's size");
    // Handle 1 reads at 5 MiB, past its own version's end: its EOF.
    assert_eq!(p.pread("h1", 5 * MIB, 4096), Ok((0, md5_hex(b""))));
    // Handle 2 reads the whole new version: no EOF at 5 MiB.
    assert_eq!(p.read_all("h2"), Ok((8 * MIB, md5_hex(&v2))));
    assert_eq!(
        p.pread("h2", 5 * MIB, 4096),
        Ok((
            4096,
            md5_hex(&v2[5 * MIB as usize..5 * MIB as usize + 4096])
        ))
    );
    assert_eq!(md5sum(&path), md5_hex(&v2));
}

#[test]
fn deleted_while_open() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let v1 = bytes(5, 4 * MIB as usize);
    write(d.path(), F, &v1);
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&["--metadata-ttl", "1"]);
    let path = m.join(F);
    let mut p = Py::start();
    p.open("h", &path).unwrap();
    p.random("h");
    assert_eq!(p.pread("h", 0, 4096), Ok((4096, md5_hex(&v1[..4096]))));
    std::fs::remove_file(sim.root().join(F)).unwrap();
    // An uncached read of a handle opened before the delete: ESTALE, as
    // SEMANTICS promises (not ENOENT).
    assert_eq!(p.pread("h", 3 * MIB, 4096), Err(libc::ESTALE));
    assert_eq!(p.pread("h", 3 * MIB, 4096), Err(libc::ESTALE), "and again");
    after_ttl();
    let err = std::fs::metadata(&path).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "gone for new opens");
}

#[test]
fn replaced_and_seen_by_a_read_then_every_open_gets_the_new_version() {
    if !fuse_available() {
        return;
    }
    // TTL long: only the read that meets the new ETag tells the mount.
    let d = tempfile::tempdir().unwrap();
    let v1 = bytes(6, 6 * MIB as usize);
    let v2 = bytes(7, 3 * MIB as usize + 5);
    write(d.path(), F, &v1);
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&["--metadata-ttl", "300"]);
    let path = m.join(F);
    let mut p = Py::start();
    p.open("old", &path).unwrap();
    p.random("old");
    assert_eq!(p.pread("old", 0, 4096), Ok((4096, md5_hex(&v1[..4096]))));
    replace(sim.root(), F, &v2);
    assert_eq!(p.pread("old", 5 * MIB, 4096), Err(libc::ESTALE));
    // Every open from now on, within the TTL too, sees the new version.
    for i in 0..3 {
        let mut q = Py::start();
        q.open("new", &path).unwrap();
        assert_eq!(q.size("new"), v2.len() as u64, "open {i}");
        assert_eq!(q.read_all("new"), Ok((v2.len() as u64, md5_hex(&v2))));
    }
    assert_eq!(std::fs::metadata(&path).unwrap().len(), v2.len() as u64);
    // The old handle still never mixes: its cached first page, or ESTALE.
    assert_eq!(p.pread("old", 0, 4096), Ok((4096, md5_hex(&v1[..4096]))));
    assert_eq!(p.pread("old", 4 * MIB, 4096), Err(libc::ESTALE));
}

#[test]
fn a_listing_on_its_way_never_undoes_a_change() {
    if !fuse_available() {
        return;
    }
    // One key per listing page; the second page of the folder's listing
    // hangs (its continuation token names the first page's last key)
    // while `a` is found to have changed.
    let d = tempfile::tempdir().unwrap();
    let v1 = bytes(8, 4 * MIB as usize);
    let v2 = bytes(9, 5 * MIB as usize);
    for (name, data) in [("a", &v1), ("b", &v1), ("c", &v1)] {
        write(d.path(), &format!("10378.1/1/{name}"), data);
    }
    let sim = Sim::start(d, &["--page-size", "1"]);
    let m = sim.mount(&["--metadata-ttl", "300"]);
    let dir = m.join("10378.1/1");
    let a = dir.join("a");
    let mut p = Py::start();
    p.open("old", &a).unwrap();
    p.random("old");
    assert_eq!(p.pread("old", 0, 4096), Ok((4096, md5_hex(&v1[..4096]))));
    sim.s3_hang(&hex::encode("datasets/10378-1-1/a"));
    let ls = std::process::Command::new("ls")
        .arg("-l")
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The listing has page 1 (`a`, old) and waits for page 2.
    let t = Instant::now();
    while sim.stats()["faults"]["hanging"].as_u64().unwrap() == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the listing never hung"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Meanwhile `a` is replaced, and a read finds out.
    replace(sim.root(), "10378.1/1/a", &v2);
    assert_eq!(p.pread("old", 3 * MIB, 4096), Err(libc::ESTALE));
    let mut q = Py::start();
    q.open("new", &a).unwrap();
    assert_eq!(q.size("new"), 5 * MIB);
    // The listing finishes with what it had: the change stands.
    sim.s3_hang("");
    let out = ls.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.ends_with(" a"))
        .unwrap_or_else(|| panic!("no `a` in {text}"));
    assert!(
        line.contains(&(5 * MIB).to_string()),
        "ls -l shows the new size: {line}"
    );
    assert_eq!(std::fs::metadata(&a).unwrap().len(), 5 * MIB);
    assert_eq!(md5sum(&a), md5_hex(&v2));
}
