//! Faults, expiry, changed objects and odd keys: the mount must never
//! return a wrong byte, never hang, and keep serving.

mod common;

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;

fn log_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("provenafs-test-{tag}-{}.log", std::process::id()))
}

#[test]
fn every_byte_right_under_faults_and_expiry() {
    if !fuse_available() {
        return;
    }
    // At least 1 GiB in all: five 200 MiB files and 120 small ones.
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("10378.1/1/small")).unwrap();
    for i in 0..5 {
        let p = d.path().join(format!("10378.1/1/big-{i}.bin"));
        assert!(sh(&format!(
            "head -c {} /dev/urandom > '{}'",
            200 * MIB,
            p.display()
        ))
        .status
        .success());
    }
    for i in 0..120 {
        write(
            d.path(),
            &format!("10378.1/1/small/s{i:03}"),
            &bytes(i, 100_000 + i as usize),
        );
    }
    let sim = Sim::start(
        d,
        &[
            "--s3-fault-rate",
            "0.1",
            "--api-fault-rate",
            "0.1",
            "--access-token-ttl",
            "3",
            "--credentials-ttl",
            "4",
        ],
    );
    let log = log_path("faults");
    let m = sim.mount(&["--log-file", log.to_str().unwrap(), "--log-level", "warn"]);
    let started = Instant::now();
    let out = sh(&format!(
        "cd '{}' && find . -type f -print0 | sort -z | xargs -0 sha256sum",
        m.join("10378.1/1").display()
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let src = sh(&format!(
        "cd '{}' && find . -type f -print0 | sort -z | xargs -0 sha256sum",
        sim.root().join("10378.1/1").display()
    ));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&src.stdout)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 125);
    // The read itself makes few API calls (a token and a credential set
    // every few seconds), so 10% may hit none: look up unknown handles,
    // one API call each, until the API side has failed at least once.
    for i in 0..300 {
        if sim.stats()["faults"]["api_injected"].as_u64().unwrap() > 0 {
            break;
        }
        let _ = std::fs::metadata(m.join(&format!("10378.1/none{i}")));
    }
    let stats = sim.stats();
    let retried = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("retrying")
        .count();
    eprintln!(
        "read 1.01 GiB in {:?}: faults injected {}, retries logged {retried}, tokens issued {}, credentials issued {}",
        started.elapsed(),
        stats["faults"],
        stats["tokens_issued"],
        stats["credentials_issued"]
    );
    let injected = &stats["faults"]["s3_injected"];
    let s3_faults: u64 = ["internal_error", "slow_down", "reset", "short_body"]
        .iter()
        .map(|k| injected[k].as_u64().unwrap())
        .sum();
    assert!(s3_faults > 0 && stats["faults"]["api_injected"].as_u64().unwrap() > 0);
    assert!(retried > 0);
    // Still healthy, and faults off: reads work at once.
    sim.set_faults(0.0, 0.0);
    assert_eq!(
        std::fs::read(m.join("10378.1/1/small/s007")).unwrap(),
        bytes(7, 100_007)
    );
    let _ = std::fs::remove_file(log);
}

#[test]
fn slow_reader_outlives_five_credential_lifetimes() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let want = bytes(5, 64 * MIB);
    write(d.path(), "10378.1/1/f.bin", &want);
    let sim = Sim::start(d, &["--access-token-ttl", "2", "--credentials-ttl", "2"]);
    // Memory only: a 64 MiB file is then too large to buy (half the
    // memory cache at most), so every read keeps needing S3.
    let m = sim.mount(&["--no-disk-cache"]);
    let f = std::fs::File::open(m.join("10378.1/1/f.bin")).unwrap();
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    let creds0 = sim.stat("credentials_issued");
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let mut off = 3 * MIB;
    // A strided reader: every read needs S3, spread over > 10 s (5 TTLs).
    while started.elapsed() < Duration::from_secs(11) {
        f.read_exact_at(&mut buf, off as u64).unwrap();
        assert_eq!(&buf[..], &want[off..off + 4096], "offset {off}");
        off = (off + MIB + 4096) % (60 * MIB);
        std::thread::sleep(Duration::from_millis(150));
    }
    let issued = sim.stat("credentials_issued") - creds0;
    assert!(issued >= 4, "credentials refreshed {issued} times");
}

#[test]
fn object_replaced_mid_read_is_estale_then_new_bytes() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/f.bin", &bytes(1, 16 * MIB));
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&[]);
    let path = m.join("10378.1/1/f.bin");
    let f = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..], &bytes(1, 4096)[..]);
    // Replaced underneath, same size, new content.
    let new = bytes(2, 16 * MIB);
    write(sim.root(), "10378.1/1/f.bin", &new);
    let err = f.read_exact_at(&mut buf, 12 * MIB as u64).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    drop(f);
    // Re-open: the new object, whole.
    assert!(
        std::fs::read(&path).unwrap() == new,
        "new content after re-open"
    );
}

#[test]
fn odd_keys_never_break_listing_or_escape() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/9/ok.txt", b"ok\n");
    let p = "datasets/10378-1-9/";
    let long = "n".repeat(300);
    let keys = serde_json::json!([
        {"key": format!("{p}a//b"), "data": "empty segment"},
        {"key": format!("{p}./dot"), "data": "dot"},
        {"key": format!("{p}x/../y"), "data": "dotdot"},
        {"key": format!("{p}../escape"), "data": "escape"},
        {"key": format!("{p}marker/"), "data": ""},
        {"key": format!("{p}{long}"), "data": "too long"},
        {"key": format!("{p}both"), "data": "shadowed object"},
        {"key": format!("{p}both/inner.txt"), "data": "inner\n"},
        {"key": format!("{p}sp ace/é.txt"), "data": "unicode\n"},
        {"key": format!("{p}plus+sign 100%"), "data": "plus\n"},
        {"key": format!("{p}ctl\u{1}name"), "data": "control"},
        {"key": format!("{p}nl\nname"), "data": "newline"},
    ]);
    let kf = d.path().with_extension("keys.json");
    std::fs::write(&kf, keys.to_string()).unwrap();
    let sim = Sim::start(d, &["--extra-keys", kf.to_str().unwrap()]);
    let log = log_path("oddkeys");
    let m = sim.mount(&["--log-file", log.to_str().unwrap(), "--metadata-ttl", "1"]);
    let ds = m.join("10378.1/9");
    let names = names(&ds);
    assert_eq!(
        names,
        [
            "a",
            "both",
            "marker",
            "ok.txt",
            "plus+sign 100%",
            "sp ace",
            "x"
        ]
    );
    assert!(
        std::fs::metadata(ds.join("both")).unwrap().is_dir(),
        "the directory wins"
    );
    assert_eq!(
        std::fs::read(ds.join("both/inner.txt")).unwrap(),
        b"inner\n"
    );
    assert_eq!(
        std::fs::read(ds.join("sp ace/é.txt")).unwrap(),
        b"unicode\n"
    );
    assert_eq!(std::fs::read(ds.join("plus+sign 100%")).unwrap(), b"plus\n");
    assert_eq!(
        std::fs::read_dir(ds.join("marker")).unwrap().count(),
        0,
        "folder marker: empty directory"
    );
    assert_eq!(std::fs::read_dir(ds.join("a")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(ds.join("x")).unwrap().count(), 0);
    for hidden in ["ctl\u{1}name", "nl\nname"] {
        assert!(std::fs::metadata(ds.join(hidden)).is_err());
    }
    // `find` walks it all without an error, twice (TTL expired in between).
    for _ in 0..2 {
        let out = sh(&format!("find '{}' | wc -l", ds.display()));
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10");
        std::thread::sleep(Duration::from_millis(1100));
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let hidden_lines = text
        .lines()
        .filter(|l| l.contains("hidden from the mount") || l.contains("shadowed"))
        .count();
    assert_eq!(hidden_lines, 8, "each odd key logged once:\n{text}");
    let _ = std::fs::remove_file(log);
}

#[test]
fn revoked_token_gives_eacces_and_one_log_line() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/a", b"a");
    write(d.path(), "10378.1/2/b", b"b");
    let sim = Sim::start(d, &["--access-token-ttl", "1"]);
    let log = log_path("revoked");
    let m = sim.mount(&["--log-file", log.to_str().unwrap()]);
    assert_eq!(std::fs::read(m.join("10378.1/1/a")).unwrap(), b"a");
    sim.revoke();
    std::thread::sleep(Duration::from_millis(1500));
    for _ in 0..5 {
        let err = std::fs::read(m.join("10378.1/2/b")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        text.matches("offline token was rejected").count(),
        1,
        "{text}"
    );
    // Still mounted and answering.
    assert!(is_mounted(m.path()));
    let _ = std::fs::remove_file(log);
}

#[test]
fn sigterm_during_heavy_reads_unmounts_cleanly() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for i in 0..4 {
        let p = d.path().join(format!("10378.1/1/f{i}"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        assert!(sh(&format!(
            "head -c {} /dev/urandom > '{}'",
            128 * MIB,
            p.display()
        ))
        .status
        .success());
    }
    let sim = Sim::start(d, &["--latency-ms", "20"]);
    let mnt = tempfile::tempdir().unwrap();
    let mut child = sim
        .command(&["mount", mnt.path().to_str().unwrap(), "--foreground"])
        .stdout(Stdio::null())
        .stderr(sim_stderr(&sim))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_mounted(mnt.path()) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    let readers: Vec<_> = (0..4)
        .map(|i| {
            std::process::Command::new("cat")
                .arg(mnt.path().join(format!("10378.1/1/f{i}")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = child.wait().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "exit took {:?}",
        t.elapsed()
    );
    assert!(status.success(), "{status}");
    for mut r in readers {
        let _ = r.wait();
    }
    assert!(!is_mounted(mnt.path()), "no stuck mount");
}

#[test]
fn no_secret_in_any_log_line_at_trace() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/f.bin", &bytes(3, 9 * MIB));
    write(d.path(), "10378.1/2/g", b"g");
    let sim_log = log_path("sim-trace");
    let sim = Sim::start_logged(
        d,
        &[
            "--access-token-ttl",
            "2",
            "--credentials-ttl",
            "2",
            "--s3-fault-rate",
            "0.2",
            "--deny",
            "10378.1/2",
            "--log-level",
            "trace",
        ],
        &sim_log,
    );
    let log = log_path("mount-trace");
    let m = sim.mount(&["--log-file", log.to_str().unwrap(), "--log-level", "trace"]);
    assert_eq!(
        sha256(&m.join("10378.1/1/f.bin")),
        sha256(&sim.root().join("10378.1/1/f.bin"))
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        std::fs::read(m.join("10378.1/1/f.bin")).unwrap().len(),
        9 * MIB
    );
    let _ = std::fs::read_dir(m.join("10378.1/2"));
    sim.revoke();
    std::thread::sleep(Duration::from_secs(2));
    let _ = std::fs::read_dir(m.join("10378.1/1"));
    drop(m);
    // A failed mount's message, too.
    let bad = sim.run(&mut sim.command(&["mount", "/nonexistent"]));
    let secrets = sim.secrets();
    assert!(secrets.len() >= 4, "{} secrets issued", secrets.len());
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str(&std::fs::read_to_string(&sim_log).unwrap());
    text.push_str(&String::from_utf8_lossy(&bad.stderr));
    assert!(text.lines().count() > 100, "trace logs were written");
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "a secret leaked into the logs");
    }
    assert!(
        !text.to_ascii_lowercase().contains("signature="),
        "a SigV4 signature leaked"
    );
    assert!(
        !text.to_ascii_lowercase().contains("x-amz-security-token:"),
        "a session token header leaked"
    );
    let _ = std::fs::remove_file(log);
    let _ = std::fs::remove_file(sim_log);
}

#[test]
fn a_listing_whose_continuation_tokens_go_in_circles_fails_and_never_hangs() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for i in 0..10 {
        write(d.path(), &format!("10378.1/1/loop/f{i}.txt"), b"x\n");
    }
    write(d.path(), "10378.1/1/fine/a.txt", b"a\n");
    // Pages of 3: the folder takes 4 of them.
    let sim = Sim::start(d, &["--page-size", "3"]);
    let m = sim.mount(&[]);
    sim.post("/_sim/faults?s3_list_loop=loop");
    let t = std::time::Instant::now();
    let e = std::fs::read_dir(m.join("10378.1/1/loop"))
        .and_then(|rd| rd.collect::<Result<Vec<_>, _>>())
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(names(&m.join("10378.1/1/fine")), ["a.txt"]);
    // `provenafs ls` and `prefetch` walk listings too.
    for args in [
        &["ls", "-r", "10378.1/1/loop"][..],
        &["prefetch", "10378.1/1/loop", "--cache-dir"][..],
    ] {
        let cache = tempfile::tempdir().unwrap();
        let mut all = args.to_vec();
        let c = cache.path().join("c");
        if args[0] == "prefetch" {
            all.push(c.to_str().unwrap());
        }
        let out = sim.run(&mut sim.command(&all));
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("continuation token"), "{args:?}: {err}");
    }
}

#[test]
fn an_answer_of_another_range_is_an_error_never_data() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let data = bytes(21, 3 * MIB);
    write(d.path(), "10378.1/1/shift.bin", &data);
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&[]);
    let mut p = Py::start();
    p.open("s", &m.join("10378.1/1/shift.bin")).unwrap();
    p.random("s");
    // A proxy hands back the piece one byte later (honestly labelled).
    sim.post("/_sim/faults?s3_range_shift=shift");
    for at in [MIB as u64, 2 * MIB as u64 + 4096] {
        assert_eq!(p.pread("s", at, 4096), Err(libc::EIO), "at {at}");
    }
    sim.post("/_sim/faults?s3_range_shift=");
    std::thread::sleep(Duration::from_secs(6)); // past the failure memory
    let at = MIB;
    assert_eq!(
        p.pread("s", at as u64, 4096),
        Ok((4096, md5_hex(&data[at..at + 4096])))
    );
}
