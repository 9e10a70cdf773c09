//! End to end: the emulator and a real FUSE mount, checked with real
//! commands (`find`, `sha256sum`, `cp`, `touch`) and file reads.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;

/// A data folder with the shapes people upload.
fn sample() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    write(
        r,
        "10378.1/1687966/metadata.json",
        br#"{"name":"SST","description":"sea"}"#,
    );
    write(
        r,
        "10378.1/1687966/data/sst.csv",
        b"date,sst\n2025-01-01,27.1\n",
    );
    write(
        r,
        "10378.1/1687966/data/big.bin",
        &bytes(7, 50 * 1000 * 1000 + 123),
    );
    write(r, "10378.1/1687966/data/nested/deeper/leaf.txt", b"leaf\n");
    write(r, "10378.1/1687966/empty", b"");
    write(
        r,
        "10378.1/1687966/with space/ünïcødé 日本.txt",
        b"unicode\n",
    );
    write(r, "10378.1/2000/readme.md", b"# second\n");
    write(r, "102.100.100/42/x", b"x");
    d
}

#[test]
fn serves_the_folder_byte_for_byte() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(sample(), &[]);
    let m = sim.mount(&[]);
    assert_eq!(
        tree(m.path()),
        tree(sim.root()),
        "same tree as the data folder"
    );
    let out = sh(&format!(
        "cd '{}' && find . -type f -print0 | sort -z | xargs -0 sha256sum",
        m.path().display()
    ));
    assert!(out.status.success());
    let src = sh(&format!(
        "cd '{}' && find . -type f -print0 | sort -z | xargs -0 sha256sum",
        sim.root().display()
    ));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&src.stdout)
    );
    // cp -r of a whole dataset, then a recursive diff.
    let copy = tempfile::tempdir().unwrap();
    let out = sh(&format!(
        "cp -r '{}' '{}/ds' && diff -r '{}' '{}/ds'",
        m.join("10378.1/1687966").display(),
        copy.path().display(),
        sim.root().join("10378.1/1687966").display(),
        copy.path().display()
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn attributes_are_read_only_and_owned_by_the_user() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(sample(), &[]);
    let m = sim.mount(&[]);
    let f = std::fs::metadata(m.join("10378.1/1687966/data/sst.csv")).unwrap();
    assert_eq!(f.permissions().mode() & 0o777, 0o444);
    assert_eq!(f.len(), 25);
    let d = std::fs::metadata(m.join("10378.1/1687966/data")).unwrap();
    assert!(d.is_dir());
    assert_eq!(d.permissions().mode() & 0o777, 0o555);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(f.uid(), unsafe { libc::getuid() });
    assert_eq!(
        std::fs::metadata(m.join("10378.1/1687966/empty"))
            .unwrap()
            .len(),
        0
    );
}

#[test]
fn ranged_reads_at_odd_offsets() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(sample(), &[]);
    let m = sim.mount(&[]);
    let want = std::fs::read(sim.root().join("10378.1/1687966/data/big.bin")).unwrap();
    let mut f = std::fs::File::open(m.join("10378.1/1687966/data/big.bin")).unwrap();
    let len = want.len() as u64;
    for (off, n) in [
        (0u64, 1usize),
        (1, 4095),
        (4097, 131_073),
        (12_345_677, 3),
        (len - 5, 5),
        (len - 1, 100),
        (len / 2 + 1, 1 << 20),
    ] {
        f.seek(SeekFrom::Start(off)).unwrap();
        let mut buf = vec![0u8; n];
        let mut got = 0;
        while got < n {
            let r = f.read(&mut buf[got..]).unwrap();
            if r == 0 {
                break;
            }
            got += r;
        }
        let end = (off as usize + n).min(want.len());
        assert_eq!(
            &buf[..got],
            &want[off as usize..end],
            "offset {off} len {n}"
        );
    }
    // Past the end: zero bytes.
    f.seek(SeekFrom::Start(len + 10)).unwrap();
    let mut buf = [0u8; 10];
    assert_eq!(f.read(&mut buf).unwrap(), 0);
}

#[test]
fn listings_are_paginated() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for i in 0..7 {
        write(d.path(), &format!("10378.1/{}/f", 100 + i), b"x");
    }
    for i in 0..11 {
        write(d.path(), &format!("10378.1/100/many/file-{i:02}"), b"y");
    }
    let sim = Sim::start(d, &["--page-size", "3"]);
    let m = sim.mount(&[]);
    let suffixes = std::fs::read_dir(m.join("10378.1")).unwrap().count();
    assert_eq!(suffixes, 7);
    assert!(
        sim.stat("api_list") >= 3,
        "registry listed over several pages"
    );
    let lists_before = sim.stat("s3_list");
    let files = std::fs::read_dir(m.join("10378.1/100/many"))
        .unwrap()
        .count();
    assert_eq!(files, 11);
    assert!(
        sim.stat("s3_list") - lists_before >= 4,
        "folder listed over several pages"
    );
}

#[test]
fn denied_and_unknown_datasets() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(sample(), &["--deny", "10378.1/2000"]);
    let m = sim.mount(&[]);
    // Visible (metadata access) but not readable.
    let names: Vec<String> = std::fs::read_dir(m.join("10378.1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.contains(&"2000".to_string()));
    let err = std::fs::read_dir(m.join("10378.1/2000")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    let err = std::fs::metadata(m.join("10378.1/2000/readme.md")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    // Unknown handle, unknown prefix, non-handle names.
    for p in [
        "10378.1/999999",
        "99999.9/1",
        ".git",
        "10378.1/1687966/nope",
    ] {
        let err = std::fs::metadata(m.join(p)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{p}: {err}");
    }
    // The rest of the mount still works.
    assert_eq!(std::fs::read(m.join("102.100.100/42/x")).unwrap(), b"x");
}

#[test]
fn unlisted_handle_resolves_by_path() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(sample(), &[]);
    let m = sim.mount(&[]);
    // The mount's own check of the API (one page of one item) aside.
    let before = sim.stat("api_list");
    assert!(before <= 1);
    // No `ls` of the root or prefix first: straight to the file.
    assert_eq!(
        std::fs::read(m.join("10378.1/2000/readme.md")).unwrap(),
        b"# second\n"
    );
    assert_eq!(
        sim.stat("api_list") - before,
        0,
        "a lookup by handle never lists the registry"
    );
}

#[test]
fn every_write_is_erofs() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(sample(), &[]);
    let m = sim.mount(&[]);
    let ds = m.join("10378.1/1687966");
    let erofs = |r: std::io::Result<()>| {
        let e = r.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    };
    erofs(std::fs::write(ds.join("new"), b"x"));
    erofs(std::fs::write(ds.join("empty"), b"x"));
    erofs(
        std::fs::OpenOptions::new()
            .append(true)
            .open(ds.join("data/sst.csv"))
            .map(|_| ()),
    );
    erofs(std::fs::create_dir(ds.join("dir")));
    erofs(std::fs::remove_file(ds.join("empty")));
    erofs(std::fs::remove_dir(ds.join("data/nested/deeper")));
    erofs(std::fs::rename(ds.join("empty"), ds.join("empty2")));
    erofs(std::fs::set_permissions(
        ds.join("empty"),
        std::fs::Permissions::from_mode(0o777),
    ));
    erofs(std::os::unix::fs::symlink("x", ds.join("link")));
    let out = sh(&format!("touch '{}'", ds.join("empty").display()));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"));
}

#[test]
fn reads_survive_token_and_credential_expiry() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(
        sample(),
        &["--access-token-ttl", "2", "--credentials-ttl", "3"],
    );
    let m = sim.mount(&["--metadata-ttl", "1"]);
    let f = m.join("10378.1/1687966/data/big.bin");
    let want = sha256(&sim.root().join("10378.1/1687966/data/big.bin"));
    assert_eq!(sha256(&f), want);
    let tokens = sim.stat("tokens_issued");
    let creds = sim.stat("credentials_issued");
    std::thread::sleep(Duration::from_secs(4));
    // Everything issued so far has expired.
    assert_eq!(sha256(&f), want);
    assert_eq!(
        std::fs::read(m.join("10378.1/1687966/data/sst.csv"))
            .unwrap()
            .len(),
        25
    );
    assert!(
        std::fs::read_dir(m.join("10378.1/1687966/data"))
            .unwrap()
            .count()
            >= 3
    );
    assert!(sim.stat("tokens_issued") > tokens, "access token refreshed");
    assert!(
        sim.stat("credentials_issued") > creds,
        "credentials refreshed"
    );
}
