//! provenafs as an admin meets it (issue 11, safety and visibility): it
//! unmounts only its own mounts and never a busy one unasked, checks the
//! data store before mounting, goes with its terminal and takes its mount
//! with it when killed, never stacks two mounts, pins no folder, shows in
//! `df` and `findmnt`, and tells in its log why a reader was refused.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn data() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/data/a.csv", b"x,y\n1,2\n");
    write(d.path(), "10378.1/2/b.bin", &bytes(2, 100_000));
    write(d.path(), "10378.1/3/c.txt", b"denied\n");
    d
}

/// Unmounts (lazily) whatever provenafs mount is left at a path when a
/// test ends, passed or failed: a failed test leaks no mount.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new(BIN)
            .args(["unmount", "--lazy"])
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process whose working folder is `dir`, and one that holds `file`
/// open: the two ways a mount is usually busy.
fn holders(dir: &Path, file: &Path) -> (Child, Child) {
    let cwd = Command::new("sleep")
        .arg("120")
        .current_dir(dir)
        .spawn()
        .unwrap();
    let open = Command::new("sh")
        .arg("-c")
        .arg("exec 3<\"$1\"; exec sleep 120")
        .arg("sh")
        .arg(file)
        .current_dir("/")
        .spawn()
        .unwrap();
    // Until the shell has opened the file and become `sleep`.
    wait_until("the holder opened the file", 10, || {
        std::fs::read_to_string(format!("/proc/{}/comm", open.id()))
            .is_ok_and(|c| c.trim() == "sleep")
    });
    (cwd, open)
}

#[test]
fn unmount_acts_only_on_provenafs_mounts() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    // A tmpfs of our own: refused in one line, still mounted after.
    let t = tempfile::tempdir().unwrap();
    let tp = t.path().to_str().unwrap();
    let out = sh(&format!("mount -t tmpfs provenafs-test-tmpfs '{tp}'"));
    assert!(out.status.success(), "{}", stderr_of(&out));
    for target in [tp, "/proc"] {
        let out = sim.run(&mut sim.command(&["unmount", target]));
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("not a provenafs mount"), "{err}");
    }
    assert!(is_mounted(t.path()) && Path::new("/proc/self").exists());
    // `--lazy` changes nothing about that.
    let out = sim.run(&mut sim.command(&["unmount", "--lazy", tp]));
    assert_eq!(out.status.code(), Some(1));
    assert!(is_mounted(t.path()));
    assert!(sh(&format!("umount '{tp}'")).status.success());
    // Not a mount at all.
    let out = sim.run(&mut sim.command(&["unmount", tp]));
    assert!(
        stderr_of(&out).contains("is not a mount point"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_busy_mount_is_named_not_detached_unless_lazy() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let m = sim.mount(&[]);
    let mp = m.path().to_str().unwrap();
    let (mut cwd, mut open) = holders(&m.join("10378.1/1"), &m.join("10378.1/1/data/a.csv"));
    let out = sim.run(&mut sim.command(&["unmount", mp]));
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("busy"), "{err}");
    for c in [&cwd, &open] {
        assert!(err.contains(&format!("{} (sleep)", c.id())), "{err}");
    }
    assert!(err.contains("--lazy"), "{err}");
    // Still mounted and serving.
    assert!(is_mounted(m.path()));
    assert_eq!(
        std::fs::read(m.join("10378.1/1/data/a.csv")).unwrap(),
        b"x,y\n1,2\n"
    );
    // The explicit opt-in detaches it now.
    let out = sim.run(&mut sim.command(&["unmount", "--lazy", mp]));
    assert!(out.status.success(), "{}", stderr_of(&out));
    wait_until("detached", 5, || !is_mounted(m.path()));
    for c in [&mut cwd, &mut open] {
        let _ = c.kill();
        let _ = c.wait();
    }
    // Another user may not unmount it (and is told whose it is).
    let m3 = sim.mount(&[]);
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            BIN,
            "unmount",
        ])
        .arg(m3.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("not your mount (mounted by uid 0)"),
        "{}",
        stderr_of(&out)
    );
    assert!(is_mounted(m3.path()));
    // An idle mount unmounts plainly.
    let m2 = sim.mount(&[]);
    let out = sim.run(&mut sim.command(&["unmount", m2.path().to_str().unwrap()]));
    assert!(out.status.success(), "{}", stderr_of(&out));
    wait_until("unmounted", 5, || !is_mounted(m2.path()));
}

#[test]
fn a_wrong_api_url_fails_at_once_with_nothing_mounted() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let api = sim.env["PROVENA_API_URL"].clone();
    // Nothing listening; a wrong path on the right host (HTTP 404); an
    // S3 endpoint where nothing listens.
    for (var, url) in [
        ("PROVENA_API_URL", "http://127.0.0.1:9".to_string()),
        ("PROVENA_API_URL", format!("{api}/v2")),
        ("PROVENA_S3_ENDPOINT", "http://127.0.0.1:9".to_string()),
    ] {
        let mnt = tempfile::tempdir().unwrap();
        let _cleanup = Cleanup(mnt.path().to_path_buf());
        let t = Instant::now();
        let mut c = sim.command(&[
            "mount",
            mnt.path().to_str().unwrap(),
            "--request-timeout",
            "5",
        ]);
        // As a user runs it: the default log level.
        c.env(var, &url).env_remove("RUST_LOG");
        let out = sim.run(&mut c);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{url}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{url}: {err}");
        assert!(err.contains(&url), "the line names {url}: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{url}: took {:?}",
            t.elapsed()
        );
        assert!(!is_mounted(mnt.path()), "{url}: mounted anyway");
    }
}

#[test]
fn a_foreground_mount_goes_with_its_terminal() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let mnt = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(mnt.path().to_path_buf());
    let log = mnt.path().with_extension("log");
    sim.scan_log(&log);
    let mut child = sim
        .command(&[
            "mount",
            mnt.path().to_str().unwrap(),
            "--foreground",
            "--log-file",
            log.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("mounted", 20, || mnt.path().join("10378.1").exists());
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still running after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(!is_mounted(mnt.path()));
    // The mountpoint is an ordinary empty folder again.
    assert_eq!(std::fs::read_dir(mnt.path()).unwrap().count(), 0);
}

#[test]
fn a_killed_daemon_takes_its_mount_with_it() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let m = sim.mount(&[]);
    assert!(m.join("10378.1/1/data/a.csv").exists());
    let pid = m.daemon_pid();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t = Instant::now();
    wait_until("the dead daemon's mount is gone", 5, || {
        !is_mounted(m.path())
    });
    // Usable: no "Transport endpoint is not connected".
    let entries = std::fs::read_dir(m.path()).map(|d| d.count());
    assert_eq!(entries.unwrap(), 0);
    eprintln!("mountpoint usable {:?} after SIGKILL", t.elapsed());
    // The watchdog writes its line just after it unmounts.
    wait_until("the watchdog's log line", 5, || {
        std::fs::read_to_string(&m.log)
            .is_ok_and(|l| l.contains("ended without unmounting; unmounted it"))
    });
    // The same folder mounts again.
    let mp = m.path().to_str().unwrap();
    let out = sim.run(&mut sim.command(&["mount", mp, "--log-file", m.log.to_str().unwrap()]));
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(m.join("10378.1/1/data/a.csv").exists());
    // A clean unmount leaves the watchdog nothing to do, and it goes.
    let out = sim.run(&mut sim.command(&["unmount", mp]));
    assert!(out.status.success(), "{}", stderr_of(&out));
    wait_until("the watchdog ended", 5, || {
        !String::from_utf8_lossy(&sh(&format!("pgrep -f 'provenafs-watchdog {mp}$'")).stdout)
            .contains(char::is_numeric)
    });
}

#[test]
fn two_mounts_started_together_never_stack() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    for round in 0..3 {
        let mnt = tempfile::tempdir().unwrap();
        let _cleanup = Cleanup(mnt.path().to_path_buf());
        let mp = mnt.path().to_str().unwrap();
        let kids: Vec<Child> = (0..2)
            .map(|_| {
                sim.command(&["mount", mp, "--log-file", "/dev/null"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<std::process::Output> = kids
            .into_iter()
            .map(|k| k.wait_with_output().unwrap())
            .collect();
        let ok = outs.iter().filter(|o| o.status.success()).count();
        let errs: Vec<String> = outs.iter().map(stderr_of).collect();
        assert_eq!(ok, 1, "round {round}: {errs:?}");
        assert!(
            errs.iter().any(|e| e.contains("already a mount point")),
            "round {round}: {errs:?}"
        );
        let stacked = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some(mp))
            .count();
        assert_eq!(stacked, 1, "round {round}");
        let out = sim.run(&mut sim.command(&["unmount", mp]));
        assert!(out.status.success(), "{}", stderr_of(&out));
        wait_until("unmounted", 5, || !is_mounted(mnt.path()));
    }
}

#[test]
fn the_daemon_pins_no_folder_and_shows_in_df_and_findmnt() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let start = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(mnt.path().to_path_buf());
    let log = mnt.path().with_extension("log");
    sim.scan_log(&log);
    // Started from a folder, with a relative mountpoint.
    let rel = format!("../{}", mnt.path().file_name().unwrap().to_str().unwrap());
    let out = sim.run(
        sim.command(&["mount", &rel, "--log-file", log.to_str().unwrap()])
            .current_dir(start.path()),
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let found = Command::new("pgrep")
        .arg("-f")
        .arg(format!("provenafs mount {rel} "))
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&found.stdout).trim().to_string();
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    assert_eq!(cwd, Path::new("/"), "daemon {pid}");
    assert!(mnt.path().join("10378.1").exists());
    // The folder it was started in is free to go.
    std::fs::remove_dir(start.path()).unwrap();

    let mp = mnt.path().to_str().unwrap();
    let df = String::from_utf8_lossy(&sh("df -h").stdout).into_owned();
    assert!(
        df.lines()
            .any(|l| l.starts_with("provenafs") && l.ends_with(mp)),
        "{df}"
    );
    let found =
        String::from_utf8_lossy(&sh("findmnt -n -t fuse.provenafs -o TARGET").stdout).into_owned();
    assert!(found.lines().any(|l| l.trim() == mp), "{found}");
    let st = nix::sys::statvfs::statvfs(mnt.path()).unwrap();
    assert!(st.blocks() > 0);
    assert_eq!(st.blocks_available(), 0);
    assert_eq!(st.blocks_free(), 0);
    let out = sim.run(&mut sim.command(&["unmount", mp]));
    assert!(out.status.success(), "{}", stderr_of(&out));
}

#[test]
fn a_refused_read_has_its_cause_in_the_log_once() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &["--deny", "10378.1/3", "--access-token-ttl", "2"]);
    let m = sim.mount(&[]);
    // A dataset the user may not read.
    let denied = m.join("10378.1/3/c.txt");
    for _ in 0..5 {
        let e = std::fs::read(&denied).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    }
    // A revoked token: the next exchange is refused.
    assert_eq!(
        std::fs::read(m.join("10378.1/1/data/a.csv")).unwrap(),
        b"x,y\n1,2\n"
    );
    sim.revoke();
    std::thread::sleep(Duration::from_secs(3));
    for _ in 0..5 {
        let e = std::fs::read(m.join("10378.1/2/b.bin")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    }
    let log = std::fs::read_to_string(&m.log).unwrap();
    let warned = |needle: &str| {
        log.lines()
            .filter(|l| l.contains(" WARN ") && l.contains(needle))
            .count()
    };
    assert_eq!(
        warned("refused read access to dataset 10378.1/3"),
        1,
        "{log}"
    );
    assert_eq!(warned("offline token rejected"), 1, "{log}");
    let stats = m.stats();
    assert!(stats["errors"] >= 10, "{stats:?}");
}

/// `status --json` as a list of objects by mountpoint.
fn status_json(sim: &Sim, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["status", "--json"];
    all.extend_from_slice(args);
    let out = sim.run(&mut sim.command(&all));
    assert!(out.status.success(), "{}", stderr_of(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn entry<'a>(list: &'a [serde_json::Value], m: &Mount) -> &'a serde_json::Value {
    list.iter()
        .find(|e| e["mountpoint"] == m.path().to_str().unwrap())
        .unwrap_or_else(|| panic!("{} not in {list:?}", m.path().display()))
}

#[test]
fn status_lists_the_mounts_with_live_figures() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &["--deny", "10378.1/3"]);
    let a = sim.mount(&[]);
    let b = sim.mount(&[]);
    let file = std::fs::read(a.join("10378.1/2/b.bin")).unwrap();
    assert_eq!(file, bytes(2, 100_000));
    let list = status_json(&sim, &[]);
    let e = entry(&list, &a);
    for key in [
        "mountpoint",
        "pid",
        "log_file",
        "datasets",
        "bytes_read",
        "s3_bytes",
        "s3_requests",
        "cache_hits",
        "cache_misses",
        "errors",
        "last_error",
        "uptime_s",
    ] {
        assert!(e.get(key).is_some(), "{key} missing: {e}");
    }
    assert_eq!(e["state"], "answering");
    assert_eq!(e["pid"], a.daemon_pid());
    assert_eq!(e["log_file"], a.log.to_str().unwrap());
    assert!(e["datasets"].as_u64().unwrap() >= 1, "{e}");
    assert!(e["bytes_read"].as_u64().unwrap() >= 100_000, "{e}");
    assert!(e["s3_bytes"].as_u64().unwrap() >= 100_000, "{e}");
    assert!(e["s3_requests"].as_u64().unwrap() >= 1, "{e}");
    assert!(e["cache_misses"].as_u64().unwrap() >= 1, "{e}");
    assert_eq!(e["errors"], 0);
    assert!(e["last_error"].is_null());
    // The other mount has read nothing.
    let eb = entry(&list, &b);
    assert_eq!(eb["bytes_read"], 0);
    assert_eq!(eb["s3_requests"], 0);
    // A refusal shows as an error, with its cause.
    let denied = std::fs::read(a.join("10378.1/3/c.txt")).unwrap_err();
    assert_eq!(denied.raw_os_error(), Some(libc::EACCES));
    let one = status_json(&sim, &[a.path().to_str().unwrap()]);
    assert_eq!(one.len(), 1);
    assert!(one[0]["errors"].as_u64().unwrap() >= 1, "{}", one[0]);
    let last = one[0]["last_error"].as_str().unwrap();
    assert!(
        last.contains("refused read access to dataset 10378.1/3"),
        "{last}"
    );
    // The plain form: a table a person reads.
    let out = sim.run(&mut sim.command(&["status"]));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.starts_with("MOUNTPOINT"), "{table}");
    assert!(
        table.contains(a.path().to_str().unwrap()) && table.contains("answering"),
        "{table}"
    );
    assert!(table.contains("last error: "), "{table}");
    // Another user sees the mounts, not their figures.
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        BIN,
        "status",
        "--json",
    ])
    .env("HOME", "/nonexistent")
    .env("XDG_STATE_HOME", sim.state.path());
    let out = sim.run(&mut c);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let theirs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let e = entry(&theirs, &a);
    assert_eq!(e["state"], "not yours", "{e}");
    assert!(e["bytes_read"].is_null());
    // Not a provenafs mount: one line, exit 1.
    let out = sim.run(&mut sim.command(&["status", "/proc"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("not a provenafs mount"));
}

#[test]
fn modes_give_a_shared_mount_to_one_group() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    // By group name; nobody's primary group is nogroup (65534).
    let m = sim.mount(&[
        "--allow-other",
        "--gid",
        "nogroup",
        "--file-mode",
        "0440",
        "--dir-mode",
        "0550",
    ]);
    let as_user = |gid: u32, path: &Path| {
        Command::new("setpriv")
            .arg("--reuid=65534")
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg("cat")
            .arg(path)
            .output()
            .unwrap()
    };
    let f = m.join("10378.1/1/data/a.csv");
    let member = as_user(65534, &f);
    assert!(member.status.success(), "{}", stderr_of(&member));
    assert_eq!(member.stdout, b"x,y\n1,2\n");
    let outsider = as_user(4242, &f);
    assert!(!outsider.status.success());
    assert!(
        stderr_of(&outsider).contains("Permission denied"),
        "{}",
        stderr_of(&outsider)
    );
    let log = std::fs::read_to_string(&m.log).unwrap();
    assert!(!log.contains("every user of this machine"), "{log}");
    // --allow-other alone says who can now read what.
    let open = sim.mount(&["--allow-other"]);
    assert!(as_user(4242, &open.join("10378.1/1/data/a.csv"))
        .status
        .success());
    let log = std::fs::read_to_string(&open.log).unwrap();
    let warned = log
        .lines()
        .filter(|l| l.contains("every user of this machine can read every dataset"))
        .count();
    assert_eq!(warned, 1, "{log}");
}

#[test]
fn a_background_mount_logs_to_a_private_file_and_says_where() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &["--deny", "10378.1/3"]);
    let mnt = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(mnt.path().to_path_buf());
    let mp = mnt.path().to_str().unwrap();
    let out = sim.run(&mut sim.command(&["mount", mp]));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let name = mp
        .trim_start_matches('/')
        .replace('-', "\\x2d")
        .replace('/', "-");
    let log = sim
        .state
        .path()
        .join("provenafs")
        .join(format!("{name}.log"));
    sim.scan_log(&log);
    assert!(out.stdout.is_empty());
    let said = stderr_of(&out);
    assert_eq!(
        said,
        format!("provenafs: mounted at {mp}; logs in {}\n", log.display())
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&log), 0o600);
    assert_eq!(mode(log.parent().unwrap()), 0o700);
    let e = std::fs::read(mnt.path().join("10378.1/3/c.txt")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    wait_until("the cause in the log", 5, || {
        std::fs::read_to_string(&log)
            .is_ok_and(|t| t.contains("refused read access to dataset 10378.1/3"))
    });
    let list = status_json(&sim, &[mp]);
    assert_eq!(list[0]["log_file"], log.to_str().unwrap());
    let out = sim.run(&mut sim.command(&["unmount", mp]));
    assert!(out.status.success(), "{}", stderr_of(&out));
}

#[test]
fn a_quick_remount_answers_status_and_nohup_keeps_a_mount() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let mnt = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(mnt.path().to_path_buf());
    let mp = mnt.path().to_str().unwrap();
    let log = mnt.path().with_extension("log");
    sim.scan_log(&log);
    let mount = |extra: &[&str]| {
        let mut args = vec!["mount", mp, "--log-file", log.to_str().unwrap()];
        args.extend_from_slice(extra);
        sim.command(&args)
    };
    // Unmounted and mounted again at once: the new daemon answers status,
    // not the old one on its way out.
    for _ in 0..3 {
        let out = sim.run(&mut mount(&[]));
        assert!(out.status.success(), "{}", stderr_of(&out));
        let out = sim.run(&mut sim.command(&["unmount", mp]));
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    let out = sim.run(&mut mount(&[]));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let daemons = || {
        let found = Command::new("pgrep")
            .arg("-f")
            .arg(format!("provenafs mount {mp} "))
            .output()
            .unwrap();
        String::from_utf8_lossy(&found.stdout)
            .lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .collect::<Vec<u64>>()
    };
    // The old daemons end within seconds of their unmount.
    wait_until("one daemon left", 10, || daemons().len() == 1);
    let pid = daemons()[0];
    let list = status_json(&sim, &[mp]);
    assert_eq!(list[0]["state"], "answering", "{list:?}");
    assert_eq!(list[0]["pid"], pid);
    let out = sim.run(&mut sim.command(&["unmount", mp]));
    assert!(out.status.success(), "{}", stderr_of(&out));
    wait_until("unmounted", 5, || !is_mounted(mnt.path()));

    // Under nohup a foreground mount outlives its terminal (SIGHUP).
    let template = sim.command(&[]);
    let mut nohup = Command::new("nohup");
    nohup
        .args([BIN, "mount", mp, "--foreground", "--log-file"])
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in template.get_envs() {
        if let Some(v) = v {
            nohup.env(k, v);
        }
    }
    let mut child = nohup.spawn().unwrap();
    wait_until("mounted", 20, || mnt.path().join("10378.1").exists());
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "nohup'd mount ended on SIGHUP"
    );
    assert!(mnt.path().join("10378.1").exists());
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!is_mounted(mnt.path()));
}

#[test]
fn a_stopping_daemon_never_unmounts_what_covers_its_mount() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let m = sim.mount(&[]);
    let mp = m.path().to_str().unwrap().to_string();
    let pid = m.daemon_pid();
    // An admin mounts something else over it...
    let out = sh(&format!("mount -t tmpfs provenafs-test-cover '{mp}'"));
    assert!(out.status.success(), "{}", stderr_of(&out));
    std::fs::write(m.join("mine"), b"keep").unwrap();
    // ...and then the daemon is stopped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_until("the daemon ended", 10, || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::read(m.join("mine")).unwrap(),
        b"keep",
        "the covering tmpfs was unmounted"
    );
    let log = std::fs::read_to_string(&m.log).unwrap();
    assert!(log.contains("another mount now covers"), "{log}");
    assert!(sh(&format!("umount '{mp}'")).status.success());
    // What is left underneath is a dead provenafs mount, which unmount clears.
    let out = sim.run(&mut sim.command(&["unmount", &mp]));
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(!is_mounted(m.path()));
}
