//! S3 or the data store API accepts and never answers: every operation
//! ends within `--request-timeout`, a killed reader is gone at once, one
//! stuck object slows nothing else, and credentials renew without
//! stopping reads. Stalls come from the emulator (`s3_hang`, `api_hang`).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

/// Requests the emulator has ever hung.
fn hung_total(sim: &Sim) -> u64 {
    sim.stats()["faults"]["hung_total"].as_u64().unwrap()
}

/// Waits until the emulator has hung a request more than `before` in all
/// (robust where earlier hung requests end and retry meanwhile).
fn until_hung_more_than(sim: &Sim, before: u64) {
    let t = Instant::now();
    while hung_total(sim) <= before {
        assert!(t.elapsed() < Duration::from_secs(10), "no new request hung");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the emulator holds at least `n` requests hung.
fn until_hanging(sim: &Sim, n: u64) {
    let t = Instant::now();
    while sim.stats()["faults"]["hanging"].as_u64().unwrap() < n {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "fewer than {n} requests hung"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills `pid` with `sig` and returns how long it took to be gone.
fn kill_and_time(child: &mut std::process::Child, sig: i32) -> Duration {
    let t = Instant::now();
    unsafe { libc::kill(child.id() as i32, sig) };
    let _ = child.wait();
    t.elapsed()
}

#[test]
fn every_operation_ends_within_the_request_timeout_and_a_retry_fails_at_once() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let data = bytes(1, 8 * MIB as usize);
    write(d.path(), "10378.1/1/stuck.bin", &data);
    write(d.path(), "10378.1/1/ok.bin", b"fine\n");
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&["--request-timeout", "3"]);
    let stuck = m.join("10378.1/1/stuck.bin");
    let mut p = Py::start();
    p.open("s", &stuck).unwrap();
    p.random("s");
    sim.s3_hang("stuck.bin");
    // A read: one bound (3 s), not attempts x attempt timeouts.
    let t = Instant::now();
    let e = p.pread("s", 2 * MIB, 4096).unwrap_err();
    let first = t.elapsed();
    assert!(e == libc::ETIMEDOUT || e == libc::EIO, "errno {e}");
    assert!(
        first >= Duration::from_millis(2500) && first < Duration::from_millis(4500),
        "{first:?}"
    );
    // The same range again: at once.
    let t = Instant::now();
    assert!(p.pread("s", 2 * MIB, 4096).is_err());
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // Through the page cache (the kernel's read-ahead, then its own read
    // of the page): one bound in all, not two.
    let t = Instant::now();
    let r = std::fs::read(&stuck);
    assert!(r.is_err());
    assert!(
        t.elapsed() < Duration::from_millis(4500),
        "{:?}",
        t.elapsed()
    );
    // A lookup whose LIST hangs, an unknown handle (fetch-dataset hangs)
    // and the root listing (the registry hangs): each within the bound.
    let t = Instant::now();
    let e = errno_of(std::fs::metadata(m.join("10378.1/1/stuck.bin.new")));
    assert_eq!(e, libc::ETIMEDOUT, "lookup");
    assert!(
        t.elapsed() < Duration::from_millis(4500),
        "{:?}",
        t.elapsed()
    );
    sim.api_hang(true);
    for what in ["10378.1/999", ""] {
        let t = Instant::now();
        let r = if what.is_empty() {
            std::fs::read_dir(m.path()).map(|_| ())
        } else {
            std::fs::metadata(m.join(what)).map(|_| ())
        };
        assert_eq!(errno_of(r), libc::ETIMEDOUT, "{what:?}");
        assert!(
            t.elapsed() < Duration::from_millis(4500),
            "{what:?}: {:?}",
            t.elapsed()
        );
    }
    // Stalls over: everything works again (ranges not failed just now).
    sim.api_hang(false);
    sim.s3_hang("");
    assert_eq!(
        p.pread("s", 6 * MIB, 4096),
        Ok((
            4096,
            md5_hex(&data[6 * MIB as usize..6 * MIB as usize + 4096])
        ))
    );
    assert_eq!(
        std::fs::read(m.join("10378.1/1/ok.bin")).unwrap(),
        b"fine\n"
    );
    let stats = m.stats();
    assert!(stats["timed_out"] >= 1, "{stats:?}");
}

#[test]
fn a_name_looked_up_again_fails_within_one_bound() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/f.bin", b"f");
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&["--request-timeout", "3", "--metadata-ttl", "1"]);
    let f = m.join("10378.1/1/f.bin");
    std::fs::metadata(&f).unwrap();
    sim.s3_hang("f.bin");
    std::thread::sleep(Duration::from_millis(1200));
    // The kernel revalidates its entry (one lookup), and when that fails
    // looks the name up afresh (a second): one bound in all, not two.
    let t = Instant::now();
    assert_eq!(errno_of(std::fs::metadata(&f)), libc::ETIMEDOUT);
    assert!(
        t.elapsed() < Duration::from_millis(4500),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    assert_eq!(errno_of(std::fs::metadata(&f)), libc::ETIMEDOUT);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    sim.s3_hang("");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(std::fs::read(&f).unwrap(), b"f");
}

#[test]
fn a_reader_killed_while_stuck_is_gone_at_once() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/stuck.bin", &bytes(2, 4 * MIB as usize));
    write(d.path(), "10378.1/1/stuckdir/x", b"x");
    write(d.path(), "10378.1/1/ok.bin", b"fine\n");
    let sim = Sim::start(d, &[]);
    // The default bound (30 s): only interrupts can free these readers.
    let m = sim.mount(&[]);
    let stuck = m.join("10378.1/1/stuck.bin");
    std::fs::metadata(&stuck).unwrap();
    std::fs::metadata(m.join("10378.1/1/stuckdir")).unwrap();
    // From here on, everything whose key or listing holds "stuck" hangs.
    sim.s3_hang("stuck");
    // kill -9 of a reader waiting for its read (the kernel's read-ahead).
    let mut p = Py::start();
    p.open("s", &stuck).unwrap();
    p.send("pread s 4096 0");
    until_hanging(&sim, 1);
    let took = kill_and_time(&mut p.child, libc::SIGKILL);
    assert!(
        took < Duration::from_secs(2),
        "kill -9 of a reader: {took:?}"
    );
    // Ctrl-C of `cat` (SIGINT, default action) stuck on the same object.
    let mut cat = Command::new("cat")
        .arg(&stuck)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let took = kill_and_time(&mut cat, libc::SIGINT);
    assert!(took < Duration::from_secs(2), "Ctrl-C of cat: {took:?}");
    // Requests the kernel waits for itself need the interrupt to reach us:
    // a lookup (`stat`) and a listing (`ls`) that hang.
    for (what, args) in [
        ("stat", vec![m.join("10378.1/1/stuck.other")]),
        ("ls", vec![m.join("10378.1/1/stuckdir")]),
    ] {
        let before = hung_total(&sim);
        let mut c = Command::new(what)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        until_hung_more_than(&sim, before);
        let took = kill_and_time(&mut c, libc::SIGKILL);
        assert!(took < Duration::from_secs(2), "kill -9 of {what}: {took:?}");
    }
    // The mount is unharmed, and the fetches those readers left behind
    // (their requests were interrupted, the GETs went on) serve the next
    // reader once S3 answers again: nothing is left failing.
    assert_eq!(
        std::fs::read(m.join("10378.1/1/ok.bin")).unwrap(),
        b"fine\n"
    );
    assert!(m.stats()["interrupted"] >= 2);
    sim.s3_hang("");
    assert_eq!(
        sha256(&stuck),
        sha256(&sim.root().join("10378.1/1/stuck.bin"))
    );
}

#[test]
fn a_caught_signal_never_fails_a_slow_operation() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/slow.bin", b"slow but there\n");
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&[]);
    std::fs::metadata(m.join("10378.1/1")).unwrap();
    // A lookup that hangs a while, then is answered.
    sim.s3_hang("slow.bin");
    let mut p = Py::start();
    p.send(&format!(
        "open s {}",
        m.join("10378.1/1/slow.bin").display()
    ));
    until_hanging(&sim, 1);
    // Signals the process handles and lives on: the kernel interrupts the
    // request each time, and the request must go on, not fail with EINTR.
    for _ in 0..3 {
        unsafe { libc::kill(p.child.id() as i32, libc::SIGUSR2) };
        std::thread::sleep(Duration::from_millis(200));
    }
    sim.s3_hang("");
    assert_eq!(p.answer(), Ok(vec![]), "the open went through");
    assert_eq!(p.read_all("s"), Ok((15, md5_hex(b"slow but there\n"))));
    assert_eq!(m.stats()["interrupted"], 0, "no operation was cut short");
    // A fatal signal after a caught one (the kernel interrupts only once)
    // still ends the wait at once.
    sim.s3_hang("slow.bin.other");
    let before = hung_total(&sim);
    let mut q = Py::start();
    q.send(&format!(
        "open s {}",
        m.join("10378.1/1/slow.bin.other").display()
    ));
    until_hung_more_than(&sim, before);
    unsafe { libc::kill(q.child.id() as i32, libc::SIGUSR2) };
    std::thread::sleep(Duration::from_millis(300));
    let took = kill_and_time(&mut q.child, libc::SIGKILL);
    assert!(
        took < Duration::from_secs(2),
        "kill -9 after a caught signal: {took:?}"
    );
    assert_eq!(m.stats()["interrupted"], 1);
}

#[test]
fn eight_readers_stuck_on_one_object_slow_nothing_else() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "10378.1/1/stuck.bin",
        &bytes(3, 32 * MIB as usize),
    );
    let other = bytes(4, 8 * MIB as usize);
    write(d.path(), "10378.1/1/other.bin", &other);
    write(d.path(), "10378.1/2/elsewhere.bin", &other);
    write(d.path(), "10378.1/1/cached.bin", &other);
    let sim = Sim::start(d, &[]);
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("c");
    let cache_flags = ["--cache-dir", dir.to_str().unwrap()];
    // A first mount puts cached.bin in the disk cache.
    {
        let m = sim.mount(&cache_flags);
        assert_eq!(
            sha256(&m.join("10378.1/1/cached.bin")),
            sha256(&sim.root().join("10378.1/1/cached.bin"))
        );
        std::thread::sleep(Duration::from_millis(500)); // disk writes land
    }
    let m = sim.mount(&cache_flags);
    for p in [
        "10378.1/1/stuck.bin",
        "10378.1/1/other.bin",
        "10378.1/2/elsewhere.bin",
        "10378.1/1/cached.bin",
    ] {
        std::fs::metadata(m.join(p)).unwrap();
    }
    sim.s3_hang("stuck.bin");
    // Eight sequential readers, each from its own part of the object, so
    // each has GETs of its own hung (and kernel read-ahead waiting).
    let readers: Vec<_> = (0..8)
        .map(|i| {
            Command::new("dd")
                .arg(format!("if={}", m.join("10378.1/1/stuck.bin").display()))
                .arg("of=/dev/null")
                .arg("bs=1M")
                .arg(format!("skip={}", i * 4))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    until_hanging(&sim, 8);
    std::thread::sleep(Duration::from_millis(300));
    for (what, path, off) in [
        ("another object", "10378.1/1/other.bin", 3 * MIB),
        ("another dataset", "10378.1/2/elsewhere.bin", 5 * MIB),
        ("a disk-cache hit", "10378.1/1/cached.bin", 2 * MIB),
    ] {
        // The step before may have left its block's GETs (in parts) on
        // their way after its read was answered: let them land first.
        std::thread::sleep(Duration::from_millis(300));
        let gets_before = sim.stat("s3_get");
        let mut p = Py::start();
        p.open("f", &m.join(path)).unwrap();
        let t = Instant::now();
        let got = p.pread("f", off, 4096);
        let took = t.elapsed();
        assert_eq!(
            got,
            Ok((4096, md5_hex(&other[off as usize..off as usize + 4096]))),
            "{what}"
        );
        assert!(took < Duration::from_secs(1), "{what} took {took:?}");
        if what == "a disk-cache hit" {
            assert_eq!(
                sim.stat("s3_get"),
                gets_before,
                "the disk-cache hit made a GET"
            );
        }
    }
    // Random reads of it (exact reads, no read-ahead) come from disk too.
    let gets_before = sim.stat("s3_get");
    let mut p = Py::start();
    p.open("c", &m.join("10378.1/1/cached.bin")).unwrap();
    p.random("c");
    for off in [7 * MIB + 5, MIB + 77, 4 * MIB, 6 * MIB + 4096] {
        assert_eq!(
            p.pread("c", off, 4096),
            Ok((4096, md5_hex(&other[off as usize..off as usize + 4096])))
        );
    }
    assert_eq!(
        sim.stat("s3_get"),
        gets_before,
        "random reads of it made no GET"
    );
    for mut r in readers {
        let took = kill_and_time(&mut r, libc::SIGKILL);
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
}

#[test]
fn credentials_renew_in_the_background_while_the_api_hangs() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let data = bytes(5, 64 * MIB as usize);
    write(d.path(), "10378.1/1/big.bin", &data);
    // Read credentials valid 30 s; the access token outlives the test.
    let sim = Sim::start(d, &["--credentials-ttl", "30"]);
    let m = sim.mount(&[]);
    let t0 = Instant::now();
    let mut p = Py::start();
    p.open("b", &m.join("10378.1/1/big.bin")).unwrap();
    p.random("b");
    let check = |p: &mut Py, off: u64| {
        let t = Instant::now();
        let got = p.pread("b", off, 4096);
        let took = t.elapsed();
        assert_eq!(
            got,
            Ok((4096, md5_hex(&data[off as usize..off as usize + 4096]))),
            "read at {off} ({:?} in)",
            t0.elapsed()
        );
        took
    };
    check(&mut p, 0);
    sim.api_hang(true);
    // Renewal is due at 20 s and hangs; reads go on with the set in hand.
    for (at, off) in [(12, 10 * MIB), (21, 20 * MIB), (25, 30 * MIB)] {
        let wait = Duration::from_secs(at).saturating_sub(t0.elapsed());
        std::thread::sleep(wait);
        let took = check(&mut p, off);
        assert!(
            took < Duration::from_secs(2),
            "read at {at} s took {took:?}"
        );
    }
    sim.api_hang(false);
    // Past the expiry (30 s): reads work again, with new credentials.
    std::thread::sleep(Duration::from_secs(32).saturating_sub(t0.elapsed()));
    let took = check(&mut p, 40 * MIB);
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(sim.stat("credentials_issued") >= 2);
}

#[test]
fn s3_refusing_the_credentials_renews_them_once_and_retries() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let data = bytes(6, 16 * MIB as usize);
    write(d.path(), "10378.1/1/f.bin", &data);
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&[]);
    let mut p = Py::start();
    p.open("f", &m.join("10378.1/1/f.bin")).unwrap();
    p.random("f");
    let mut off = 0;
    let mut read = |p: &mut Py| {
        off += MIB + 4096;
        assert_eq!(
            p.pread("f", off, 4096),
            Ok((4096, md5_hex(&data[off as usize..off as usize + 4096])))
        );
    };
    read(&mut p);
    // Revoked (InvalidAccessKeyId), re-keyed (SignatureDoesNotMatch),
    // expired early (ExpiredToken): one new set each, and the read works.
    for action in ["forget", "rotate", "expire"] {
        let before = sim.stat("credentials_issued");
        sim.post(&format!("/_sim/credentials?action={action}"));
        read(&mut p);
        assert_eq!(sim.stat("credentials_issued"), before + 1, "{action}");
    }
    // S3's clock 30 minutes ahead (RequestTimeTooSkewed): the read works
    // (signed with S3's time from then on), and the log says so once.
    sim.post("/_sim/faults?clock_skew=1800");
    read(&mut p);
    read(&mut p);
    sim.post("/_sim/faults?clock_skew=0");
    let log = std::fs::read_to_string(&m.log).unwrap();
    assert_eq!(
        log.matches("this machine's clock is about 30 minutes behind S3's")
            .count(),
        1,
        "{}",
        log.lines()
            .filter(|l| l.contains("clock"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn memory_pressure_never_fails_a_read() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for i in 0..8 {
        write(
            d.path(),
            &format!("10378.1/1/f{i}"),
            &bytes(10 + i, 24 * MIB as usize),
        );
    }
    let sim = Sim::start(d, &[]);
    // The smallest caches there are: eight readers evict each other.
    let m = sim.mount(&["--memory-cache-size", "1MiB", "--max-memory", "1MiB"]);
    let dir = m.join("10378.1/1");
    let out = sh(&format!(
        "cd '{}' && for i in 0 1 2 3 4 5 6 7; do sha256sum f$i & done; wait",
        dir.display()
    ));
    let src = sh(&format!(
        "cd '{}' && sha256sum f0 f1 f2 f3 f4 f5 f6 f7",
        sim.root().join("10378.1/1").display()
    ));
    let sorted = |o: &std::process::Output| {
        let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sorted(&out), sorted(&src));
}
