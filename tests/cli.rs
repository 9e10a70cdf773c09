//! The mount command's answers to bad input and its lifecycle: each failure
//! is one clear line, a non-zero exit, and nothing left mounted.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn small() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/a.txt", b"a");
    d
}

/// Runs `mount` on a fresh empty folder and expects it to fail with `needle`.
fn refused(sim: &Sim, envs: &[(&str, Option<&str>)], extra: &[&str], needle: &str) {
    let mnt = tempfile::tempdir().unwrap();
    let mut args = vec!["mount", mnt.path().to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut c = sim.command(&args);
    for (k, v) in envs {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    // At trace level, for the secret scan; then as a user sees it.
    let traced = sim.run(&mut c);
    assert!(!traced.status.success(), "mount should fail ({needle})");
    let out = sim.run(c.env_remove("RUST_LOG"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mount should fail ({needle})");
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err:?}");
    assert!(!is_mounted(mnt.path()), "nothing mounted");
}

#[test]
fn bad_tokens_and_endpoints_fail_before_mounting() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(small(), &[]);
    refused(
        &sim,
        &[("RRAP_OFFLINE_TOKEN", None)],
        &[],
        "no offline token",
    );
    refused(
        &sim,
        &[("RRAP_OFFLINE_TOKEN", Some("not a token"))],
        &[],
        "offline token",
    );
    refused(
        &sim,
        &[("RRAP_OFFLINE_TOKEN", Some("abc.def"))],
        &[],
        "malformed",
    );
    refused(
        &sim,
        &[("RRAP_OFFLINE_TOKEN", Some("eyJh.eyJi.c2ln"))],
        &[],
        "rejected",
    );
    refused(
        &sim,
        &[(
            "PROVENA_AUTH_URL",
            Some("http://127.0.0.1:9/auth/realms/rrap"),
        )],
        &[],
        "cannot reach the identity service",
    );
    let tf = tempfile::NamedTempFile::new().unwrap();
    refused(
        &sim,
        &[],
        &["--token-file", "/nonexistent/token"],
        "cannot read token file",
    );
    std::fs::write(tf.path(), "\n").unwrap();
    refused(
        &sim,
        &[],
        &["--token-file", tf.path().to_str().unwrap()],
        "empty",
    );
}

#[test]
fn bad_input_table() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(small(), &[]);
    let open_token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(open_token.path(), sim.token()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(open_token.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let tf = open_token.path().to_str().unwrap();
    type Case<'a> = (&'a [(&'a str, Option<&'a str>)], &'a [&'a str], &'a str);
    let cases: &[Case] = &[
        (&[], &["--token-file", tf], "readable by other users"),
        (
            &[("PROVENA_API_URL", Some("http://data-api.example.org"))],
            &[],
            "plain http",
        ),
        (
            &[],
            &["--s3-endpoint", "http://s3.example.org:9000"],
            "plain http",
        ),
        (&[("RRAP_OFFLINE_TOKEN", None)], &[], "no offline token"),
        (&[("RRAP_OFFLINE_TOKEN", Some("abc.def"))], &[], "malformed"),
        (
            &[("RRAP_OFFLINE_TOKEN", Some("eyJh.eyJi.c2ln"))],
            &[],
            "rejected",
        ),
    ];
    for (envs, flags, needle) in cases {
        refused(&sim, envs, flags, needle);
    }
    // Usage errors are clap's whole message (what is wrong, the usage
    // line, the --help hint) and status 2; nothing is mounted.
    for (flags, needle) in [
        (&["--no-such-flag"][..], "unexpected argument"),
        (&["--metadata-ttl", "soon"][..], "invalid value"),
        (&["--file-mode", "0888"][..], "not an octal mode"),
        (&["-o", "dir_mode=4755"][..], "more than 0777"),
        (&["-o", "alow_other"][..], "unknown mount option"),
    ] {
        let mnt = tempfile::tempdir().unwrap();
        let mut args = vec!["mount", mnt.path().to_str().unwrap()];
        args.extend_from_slice(flags);
        let out = sim.run(&mut sim.command(&args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(needle), "expected {needle:?} in {err:?}");
        assert!(err.contains("try '--help'"), "{err}");
        assert!(!is_mounted(mnt.path()));
    }
    // --allow-insecure-http lifts the http refusal (and then the endpoint
    // is simply unreachable).
    refused(
        &sim,
        &[("PROVENA_AUTH_URL", Some("http://127.1:9/auth/realms/rrap"))],
        &["--allow-insecure-http"],
        "cannot reach the identity service",
    );
}

#[test]
fn bad_mountpoints_are_refused() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(small(), &[]);
    let out = sim.run(&mut sim.command(&["mount", "/nonexistent/mnt"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let full = tempfile::tempdir().unwrap();
    std::fs::write(full.path().join("x"), "x").unwrap();
    let out = sim.run(&mut sim.command(&["mount", full.path().to_str().unwrap()]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
    // A second mount on the same point.
    let m = sim.mount(&[]);
    let out = sim.run(&mut sim.command(&["mount", m.path().to_str().unwrap()]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already a mount point"));
    assert_eq!(std::fs::read(m.join("10378.1/1/a.txt")).unwrap(), b"a");
}

#[test]
fn token_file_works_and_foreground_unmounts_on_sigterm() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(small(), &[]);
    let tf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tf.path(), format!("{}\n", sim.token())).unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let mut child = sim
        .command(&[
            "mount",
            mnt.path().to_str().unwrap(),
            "--foreground",
            "--token-file",
            tf.path().to_str().unwrap(),
        ])
        .env_remove("RRAP_OFFLINE_TOKEN")
        .stdout(Stdio::null())
        .stderr(sim_stderr(&sim))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_mounted(mnt.path()) {
        assert!(
            Instant::now() < deadline,
            "foreground mount did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        std::fs::read(mnt.path().join("10378.1/1/a.txt")).unwrap(),
        b"a"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit: {status}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!is_mounted(mnt.path()), "unmounted");
}

#[test]
fn background_mount_ends_on_unmount() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(small(), &[]);
    let mnt = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let log = mnt.path().with_extension("log");
    sim.scan_log(&log);
    let out = sim.run(&mut sim.command(&[
        "mount",
        mnt.path().to_str().unwrap(),
        "--log-file",
        log.to_str().unwrap(),
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "returns once ready"
    );
    assert!(is_mounted(mnt.path()));
    match std::fs::read(mnt.path().join("10378.1/1/a.txt")) {
        Ok(b) => assert_eq!(b, b"a"),
        Err(e) => {
            // Seen once under load and not reproduced since: say all we know.
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            panic!(
                "read after mount: {e}\nlog tail (newest first):\n{}",
                tail.join("\n")
            );
        }
    }
    // `fusermount3 -u` works on it. Under a loaded machine the kernel may
    // still be finishing the read's release for a moment (EBUSY), as a
    // user retrying would see.
    let mut tries = 0;
    loop {
        let out = Command::new("fusermount3")
            .arg("-u")
            .arg(mnt.path())
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        tries += 1;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(tries < 10 && err.contains("busy"), "fusermount3 -u: {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!is_mounted(mnt.path()));
}

#[test]
fn demo_serves_the_sample_data_until_interrupted() {
    if !fuse_available() {
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    // The checksums alone on standard output: `demo DIR > sums` keeps
    // what `sha256sum -c sums` checks.
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(BIN)
        .args(["demo", mnt.path().to_str().unwrap()])
        .env_remove("RRAP_OFFLINE_TOKEN")
        .stdout(Stdio::from(out.reopen().unwrap()))
        .stderr(Stdio::from(log.reopen().unwrap()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !is_mounted(mnt.path()) {
        assert!(Instant::now() < deadline, "demo did not mount");
        std::thread::sleep(Duration::from_millis(100));
    }
    let csv = std::fs::read_to_string(mnt.path().join("10378.1/1687966/data/sst.csv")).unwrap();
    assert!(csv.starts_with("date,site,lat,lon,sst_c\n"));
    assert_eq!(
        std::fs::metadata(mnt.path().join("10378.1/1687966/data/large.bin"))
            .unwrap()
            .len(),
        48 << 20
    );
    // It says when it is ready, and the checksums it prints are the mount's.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut said = String::new();
    let mut printed = String::new();
    while !said.contains("ready, mounted at") || !printed.contains("hello.txt\n") {
        assert!(
            Instant::now() < deadline,
            "demo never said it is ready: {said}"
        );
        std::thread::sleep(Duration::from_millis(50));
        said = std::fs::read_to_string(log.path()).unwrap();
        printed = std::fs::read_to_string(out.path()).unwrap();
    }
    let mp = mnt.path().to_str().unwrap();
    assert!(said.contains(&format!("ready, mounted at {mp}")), "{said}");
    let sums: Vec<&str> = printed.lines().collect();
    assert_eq!(sums.len(), 4, "{printed}");
    assert!(sums
        .iter()
        .all(|l| l.len() > 66 && l.as_bytes()[64] == b' ' && l.contains(mp)));
    for line in sums {
        let (sum, path) = line.split_once("  ").unwrap();
        assert_eq!(sha256(Path::new(path)), sum, "{path}");
    }
    let data = said
        .split("sample data in ")
        .nth(1)
        .and_then(|s| s.lines().next())
        .expect("demo names its data folder")
        .to_string();
    assert!(Path::new(&data).is_dir());
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!is_mounted(mnt.path()));
    assert!(!Path::new(&data).exists(), "sample data removed");
    let said = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        said.contains(&format!("removed the sample data in {data}")),
        "{said}"
    );
}

#[test]
fn a_finished_mount_never_unmounts_the_next_one_at_the_same_place() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(small(), &[]);
    let mnt = tempfile::tempdir().unwrap();
    let mp = mnt.path().to_str().unwrap();
    let ok = |args: &[&str]| {
        let out = sim.run(&mut sim.command(args));
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&["mount", mp]);
    let pid =
        String::from_utf8_lossy(&sh(&format!("pgrep -f -- '{BIN} mount {mp}' | head -1")).stdout)
            .trim()
            .parse::<i32>()
            .expect("daemon pid");
    // Hold the first daemon still while its mount goes and a new one comes,
    // then let it notice and finish: it must leave the new mount alone.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    ok(&["unmount", mp]);
    ok(&["mount", mp]);
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        is_mounted(mnt.path()),
        "the new mount survived the old daemon's exit"
    );
    assert_eq!(
        std::fs::read(mnt.path().join("10378.1/1/a.txt")).unwrap(),
        b"a"
    );
    ok(&["unmount", mp]);
}
