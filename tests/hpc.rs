//! The HPC and service examples in `scripts/` run as written.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn data() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/data/values.csv", b"x,y\n1,2\n");
    write(d.path(), "10378.1/2/other.txt", b"other\n");
    d
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A folder with `provenafs` in it, for PATH.
fn bin_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(BIN, d.path().join("provenafs")).unwrap();
    d
}

fn token_file(sim: &Sim, dir: &Path) -> PathBuf {
    let tf = dir.join("token");
    std::fs::write(&tf, sim.token()).unwrap();
    std::fs::set_permissions(&tf, std::fs::Permissions::from_mode(0o600)).unwrap();
    tf
}

fn slurm_job(sim: &Sim, tmp: &Path, bin: &Path, job: &str, args: &[&str]) -> Command {
    let mut c = Command::new("bash");
    c.arg(repo("scripts/slurm-job.sh"))
        .args(args)
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .env("TMPDIR", tmp)
        .env("SLURM_JOB_ID", job)
        .env("PROVENA_TOKEN_FILE", token_file(sim, tmp))
        .env("PROVENA_DATASETS", "10378.1/1")
        .env("RUST_LOG", "trace")
        .env_remove("RRAP_OFFLINE_TOKEN")
        .env_remove("PROVENA_PROVENANCE")
        // The job's working folder: its read manifest lands there.
        .current_dir(tmp);
    sim.endpoints(&mut c);
    c
}

#[test]
fn slurm_job_mounts_reads_and_always_unmounts() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let tmp = tempfile::tempdir().unwrap();
    let bin = bin_dir();
    let out = sim.run(&mut slurm_job(
        &sim,
        tmp.path(),
        bin.path(),
        "77",
        &[
            "sh",
            "-c",
            "ls \"$PROVENA_MNT\"/10378.1 && cat \"$PROVENA_MNT\"/10378.1/1/data/values.csv \
             && stat -c %a \"$(dirname \"$PROVENA_MNT\")\"",
        ],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Only the pinned dataset exists on the node; the job's folder there
    // (the mountpoint's) is its own: 0700, a name nobody could guess.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\nx,y\n1,2\n700\n");
    // The job went well: its folder (mountpoint, cache, log) is gone.
    assert!(job_dirs(tmp.path(), "77").is_empty(), "job folder left");
    // What the job read is kept in its working folder: the file, the
    // version read (the emulator's ETag), by the job's processes.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("provenance-77.json")).expect("the job's read manifest"),
    )
    .unwrap();
    let ds = &manifest["datasets"][0];
    assert_eq!(ds["handle"], "10378.1/1");
    let f = &ds["files"][0];
    assert!(
        f["key"].as_str().unwrap().ends_with("data/values.csv"),
        "{f}"
    );
    assert!(!f["etag"].as_str().unwrap().is_empty());
    assert_eq!(f["readers"][0]["job"], "77");
    assert_eq!(f["readers"][0]["command"], "cat");

    // A failing analysis still unmounts, and its status is the job's.
    let out = sim.run(&mut slurm_job(
        &sim,
        tmp.path(),
        bin.path(),
        "78",
        &["sh", "-c", "exit 3"],
    ));
    assert_eq!(out.status.code(), Some(3));
    // A failed job keeps its log (and says where), not its mountpoint.
    let dirs = job_dirs(tmp.path(), "78");
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    assert!(!dirs[0].join("mnt").exists());
    assert!(dirs[0].join("mount.log").exists());
    sim.scan_log(&dirs[0].join("mount.log"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mount.log"));

    // scancel or the time limit: Slurm sends SIGTERM to the job's processes.
    // What the job read is still kept (from the live mount or the daemon's
    // final file, whichever comes first; checkpoints, every second here,
    // are beside it meanwhile).
    let mut job = slurm_job(
        &sim,
        tmp.path(),
        bin.path(),
        "79",
        &[
            "sh",
            "-c",
            "cat \"$PROVENA_MNT\"/10378.1/1/data/values.csv >/dev/null && touch read && sleep 60",
        ],
    );
    job.env("PROVENAFS_MANIFEST_EVERY_SECS", "1")
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = job.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tmp.path().join("read").exists() {
        assert!(Instant::now() < deadline, "job did not mount and read");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mnt = job_dirs(tmp.path(), "79")[0].join("mnt");
    unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
    let started = Instant::now();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{status}");
    while is_mounted(&mnt) {
        assert!(started.elapsed() < Duration::from_secs(5), "still mounted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!mnt.exists());
    let kept: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("provenance-79.json")).expect("the killed job's manifest"),
    )
    .unwrap();
    let key = kept["datasets"][0]["files"][0]["key"]
        .as_str()
        .unwrap_or("");
    assert!(key.ends_with("data/values.csv"), "{kept}");
}

/// The line `key=...` of a unit file.
fn unit_line(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .to_string()
}

#[test]
fn systemd_unit_example_starts_notifies_and_stops() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let tmp = tempfile::tempdir().unwrap();
    let tf = token_file(&sim, tmp.path());
    let mnt = tmp.path().join("data-provena");
    let cache = tmp.path().join("cache");
    let unit = std::fs::read_to_string(repo("scripts/provenafs.service")).unwrap();
    assert_eq!(unit_line(&unit, "Type"), "notify");
    // The unit's own command lines, pointed at this test's paths.
    let adapt = |line: String| -> Vec<String> {
        line.replace("/usr/local/bin/provenafs", BIN)
            .replace("/data/provena", mnt.to_str().unwrap())
            .replace("/etc/provenafs/token", tf.to_str().unwrap())
            .replace("/var/cache/provenafs", cache.to_str().unwrap())
            // The unit's group, which this machine does not have.
            .replace("--gid provena", "--gid root")
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let pre = adapt(unit_line(&unit, "ExecStartPre"));
    assert!(Command::new(&pre[0])
        .args(&pre[1..])
        .status()
        .unwrap()
        .success());
    let start = adapt(unit_line(&unit, "ExecStart"));
    let stop = adapt(unit_line(&unit, "ExecStop"));

    let sock_path = tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let log = tmp.path().join("service.log");
    sim.scan_log(&log);
    let mut service = Command::new(&start[0]);
    service
        .args(&start[1..])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("RUST_LOG", "trace")
        .env_remove("RRAP_OFFLINE_TOKEN")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    sim.endpoints(&mut service);
    let mut child = service.spawn().unwrap();
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("READY=1 from the service");
    assert_eq!(&buf[..n], b"READY=1\n");
    assert!(is_mounted(&mnt), "mounted when it says ready");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(info
        .lines()
        .any(|l| l.contains(mnt.to_str().unwrap()) && l.contains("allow_other")));
    assert_eq!(
        std::fs::read(mnt.join("10378.1/2/other.txt")).unwrap(),
        b"other\n"
    );
    assert!(cache.join("v1").is_dir(), "disk cache in use");
    let out = Command::new(&stop[0]).args(&stop[1..]).output().unwrap();
    assert!(out.status.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit after ExecStop: {status}");
    assert!(!is_mounted(&mnt));
}
