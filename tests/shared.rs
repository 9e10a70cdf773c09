//! Mounts sharing one cache folder cooperate (issue 13, first part): a
//! block one process is fetching is waited for by the others, through a
//! claim file beside it, instead of fetched again; a claim whose owner
//! stopped answering is taken over after its deadline.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;

#[test]
fn mounts_reading_one_file_at_once_fetch_it_about_once() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    write(d.path(), "10378.1/9/big.bin", &bytes(9, size));
    // S3 from a cluster: 20 ms to the first byte, so fetches overlap.
    let sim = Sim::start(d, &["--latency-ms", "20"]);
    let cache_parent = tempfile::tempdir().unwrap();
    let cache = cache_parent.path().join("shared");
    let c = cache.to_str().unwrap();
    let flags = ["--cache-dir", c, "--cache-shared", "--cache-size", "1GiB"];
    let (tokens0, creds0) = (sim.stat("tokens_issued"), sim.stat("api_credentials"));
    let mounts: Vec<Mount> = (0..4).map(|_| sim.mount(&flags)).collect();
    let want = sha256(&sim.root().join("10378.1/9/big.bin"));
    let bytes0 = sim.stat("s3_get_bytes");
    // Four readers, one per mount, started together.
    let threads: Vec<_> = mounts
        .iter()
        .map(|m| {
            let p = m.join("10378.1/9/big.bin");
            std::thread::spawn(move || sha256(&p))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), want, "every byte identical");
    }
    let fetched = sim.stat("s3_get_bytes") - bytes0;
    eprintln!(
        "4 mounts, one 64 MiB file: {:.2}× the file from S3",
        fetched as f64 / size as f64
    );
    assert!(
        fetched as f64 <= 1.25 * size as f64,
        "S3 bytes {fetched} for a {size}-byte file read by 4 mounts"
    );
    // The access token and the dataset's read credentials are shared
    // through the folder: about one of each for all four.
    let tokens = sim.stat("tokens_issued") - tokens0;
    let creds = sim.stat("api_credentials") - creds0;
    eprintln!("4 mounts: {tokens} token exchanges, {creds} credential calls");
    assert!(creds <= 2, "{creds} credential calls");
    assert!(tokens <= 2, "{tokens} token exchanges");
    // Kept private, whatever the cache's settings.
    use std::os::unix::fs::PermissionsExt;
    let leases = cache.join(format!("creds-{}", unsafe { libc::getuid() }));
    assert_eq!(
        std::fs::metadata(&leases).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for e in std::fs::read_dir(&leases).unwrap() {
        let e = e.unwrap();
        let mode = e.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", e.path().display());
    }
}

#[test]
fn a_claim_whose_owner_stopped_is_taken_over_after_its_deadline() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let data = bytes(5, 3 * MIB);
    write(d.path(), "10378.1/5/f.bin", &data);
    let sim = Sim::start(d, &[]);
    let cache_parent = tempfile::tempdir().unwrap();
    let cache = cache_parent.path().join("shared");
    let c = cache.to_str().unwrap();
    let m = sim.mount(&[
        "--cache-dir",
        c,
        "--cache-shared",
        "--request-timeout",
        "10",
    ]);
    // The object's S3 location and version, as the mount keys its blocks.
    let url = ok(&sim.run(&mut sim.command(&["url", "10378.1/5/f.bin"])));
    let (bucket, key) = url
        .trim()
        .trim_start_matches("s3://")
        .split_once('/')
        .unwrap();
    let etag = md5_hex(&data);
    // A process that claimed block 0 and then stopped (SIGSTOP): alive,
    // silent, with a deadline 2 s away.
    let mut owner = Command::new("sleep").arg("60").spawn().unwrap();
    unsafe { libc::kill(owner.id() as i32, libc::SIGSTOP) };
    let host = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap();
    let until = std::time::SystemTime::now() + Duration::from_secs(2);
    let until_ms = until
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let name = provenafs::read::cache::block_file_name(bucket, key, &etag, 0);
    let shard = cache.join("v1").join(&name[..2]);
    std::fs::create_dir_all(&shard).unwrap();
    let claim = shard.join(format!(".claim-{name}"));
    std::fs::write(
        &claim,
        format!("{} {} {until_ms} 1\n", host.trim(), owner.id()),
    )
    .unwrap();
    let t = Instant::now();
    let got = std::fs::read(m.join("10378.1/5/f.bin")).unwrap();
    let took = t.elapsed();
    let _ = owner.kill();
    let _ = owner.wait();
    assert!(got == data, "every byte right");
    // Waited for the claim (not fetched at once), but not past its deadline.
    assert!(
        took >= Duration::from_millis(1500),
        "did not wait: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "waited too long: {took:?}");
    // The takeover's own claim is gone once the block is written.
    let t = Instant::now();
    while claim.exists() {
        assert!(t.elapsed() < Duration::from_secs(5), "claim left behind");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_shared_folder_is_never_walked_whole() {
    if !fuse_available() {
        return;
    }
    // 96 files of 4 MiB (384 MiB) through a 64 MiB shared cache.
    let d = tempfile::tempdir().unwrap();
    for i in 0..96 {
        write(
            d.path(),
            &format!("10378.1/8/f{i:02}.bin"),
            &bytes(i, 4 * MIB),
        );
    }
    let sim = Sim::start(d, &[]);
    let cache_parent = tempfile::tempdir().unwrap();
    let cache = cache_parent.path().join("shared");
    let c = cache.to_str().unwrap();
    let limit = 64 * MIB as u64;
    let m = sim.mount(&["--cache-dir", c, "--cache-shared", "--cache-size", "64MiB"]);
    for i in 0..96 {
        let p = m.join(&format!("10378.1/8/f{i:02}.bin"));
        assert_eq!(
            sha256(&p),
            sha256(&sim.root().join(format!("10378.1/8/f{i:02}.bin")))
        );
    }
    let stats = m.stats();
    let written_gib = (stats["disk_writes"] as f64) / 1024.0;
    let per_gib = stats["disk_meta_ops"] as f64 / written_gib;
    // Folder size on disk now.
    let used: u64 = walk(&cache.join("v1"));
    eprintln!(
        "shared cache: {} blocks written, {} entries read ({per_gib:.0} per GiB written), folder {:.0} MiB of a {} MiB bound",
        stats["disk_writes"],
        stats["disk_meta_ops"],
        used as f64 / MIB as f64,
        limit / MIB as u64
    );
    // About 2.5 entries read per block written (a full walk per pass
    // would be about 10), and bounded.
    assert!(
        per_gib < 4.0 * 1024.0,
        "{per_gib} entries read per GiB written"
    );
    assert!(
        used < limit * 3 / 2,
        "folder {used} bytes for a {limit}-byte bound"
    );
}

fn walk(p: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(p).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() { walk(&e.path()) } else { m.len() };
    }
    total
}

#[test]
fn a_set_s3_refuses_costs_one_credential_call_for_every_mount() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let data = bytes(11, 16 * MIB);
    write(d.path(), "10378.1/1/f.bin", &data);
    let sim = Sim::start(d, &[]);
    let cache_parent = tempfile::tempdir().unwrap();
    let cache = cache_parent.path().join("shared");
    let c = cache.to_str().unwrap();
    let mounts: Vec<Mount> = (0..4)
        .map(|_| sim.mount(&["--cache-dir", c, "--cache-shared"]))
        .collect();
    let mut readers: Vec<Py> = Vec::new();
    for (k, m) in mounts.iter().enumerate() {
        let mut p = Py::start();
        p.open("f", &m.join("10378.1/1/f.bin")).unwrap();
        p.random("f");
        assert!(p.pread("f", k as u64 * MIB as u64, 4096).is_ok());
        readers.push(p);
    }
    // S3 refuses the set the four share (expired early, revoked): each
    // mount meets the refusal; one new set serves them all.
    let issued = sim.stat("credentials_issued");
    sim.post("/_sim/credentials?action=expire");
    for (k, p) in readers.iter_mut().enumerate() {
        let at = (8 + k) * MIB;
        assert_eq!(
            p.pread("f", at as u64, 4096),
            Ok((4096, md5_hex(&data[at..at + 4096])))
        );
    }
    let n = sim.stat("credentials_issued") - issued;
    assert_eq!(
        n, 1,
        "{n} credential calls for 4 mounts meeting one refusal"
    );
}
