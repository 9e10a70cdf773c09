//! Other users share the folders a mount writes to (a `--cache-group`
//! cache, a node's `/tmp`): they can neither read what is ours nor steer
//! what we keep. The two users are Debian's system accounts `games`
//! (alice, uid 5) and `man` (mallory, uid 6), made members of one more
//! group (61000) with `setpriv`: `fusermount3` needs a user with an
//! account, and none is made or changed here.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const ALICE: u32 = 5;
const MALLORY: u32 = 6;
const LAB: u32 = 61000;

/// Whether users other than root can mount here (root, and a /dev/fuse
/// they may open). Under CI a machine that cannot is a failure.
fn users_can_mount() -> bool {
    if !fuse_available() {
        return false;
    }
    let world = std::fs::metadata("/dev/fuse").unwrap().mode() & 0o006 == 0o006;
    if unsafe { libc::geteuid() } != 0 || !world {
        assert!(
            std::env::var_os("CI").is_none(),
            "needs root and a /dev/fuse users may open (chmod 666 /dev/fuse, as .ci/run does)"
        );
        eprintln!("skipping: needs root and a world-usable /dev/fuse");
        return false;
    }
    true
}

/// `prog` run as `uid` (group `LAB`), with the emulator's endpoints.
fn as_user(sim: &Sim, uid: u32, prog: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={LAB}"))
        .arg(format!("--groups={LAB}"))
        .arg(prog)
        .env("HOME", "/nonexistent")
        .env("XDG_STATE_HOME", "/nonexistent")
        .env_remove("RRAP_OFFLINE_TOKEN");
    sim.endpoints(&mut c);
    c
}

fn sh_as(sim: &Sim, uid: u32, script: &str) -> Output {
    let mut c = as_user(sim, uid, "sh");
    c.arg("-c").arg(script);
    c.output().unwrap()
}

/// A folder of `uid`'s in `parent`, mode `mode`.
fn folder_of(parent: &Path, name: &str, uid: u32, mode: u32) -> std::path::PathBuf {
    let p = parent.join(name);
    std::fs::create_dir(&p).unwrap();
    std::os::unix::fs::chown(&p, Some(uid), Some(LAB)).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn token_of(sim: &Sim, dir: &Path, uid: u32) -> std::path::PathBuf {
    let tf = dir.join(format!("token-{uid}"));
    std::fs::write(&tf, sim.token()).unwrap();
    std::os::unix::fs::chown(&tf, Some(uid), Some(LAB)).unwrap();
    std::fs::set_permissions(&tf, std::fs::Permissions::from_mode(0o600)).unwrap();
    tf
}

/// Alice's mount at `mnt` (in the foreground, as a child we can kill).
struct AliceMount {
    child: std::process::Child,
    mnt: std::path::PathBuf,
}

impl AliceMount {
    fn start(sim: &Sim, mnt: &Path, args: &[&str]) -> AliceMount {
        let mut c = as_user(sim, ALICE, BIN);
        c.arg("mount")
            .arg(mnt)
            .arg("--foreground")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(mnt) {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("alice's mount ended ({status}): {err}");
            }
            assert!(Instant::now() < deadline, "alice's mount did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        AliceMount {
            child,
            mnt: mnt.to_path_buf(),
        }
    }
}

impl Drop for AliceMount {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// Names in `dir` (looked at as root).
fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_group_member_cannot_redirect_anothers_credentials_folder() {
    if !users_can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/f.txt", b"hello\n");
    // Access tokens renewed every few seconds: each goes to the folder.
    let sim = Sim::start(d, &["--access-token-ttl", "6"]);
    let top = tempfile::tempdir().unwrap();
    std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let token = token_of(&sim, top.path(), ALICE);
    let poke = |mnt: &Path, n: &mut u32| {
        // A handle not known yet: one API call, with the access token.
        *n += 1;
        let _ = sh_as(
            &sim,
            ALICE,
            &format!(
                "stat {}/10378.1/{} 2>/dev/null",
                mnt.display(),
                3_000_000 + *n
            ),
        );
    };
    let mut n = 0;

    // A group cache alice's mount makes itself: sticky, so no member can
    // rename her credentials folder.
    let area = folder_of(top.path(), "alice-area", ALICE, 0o755);
    let cache = area.join("made-by-alice");
    let mnt = folder_of(top.path(), "mnt1", ALICE, 0o700);
    let args = [
        "--token-file",
        token.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--cache-shared",
        "--cache-group",
    ];
    {
        let _m = AliceMount::start(&sim, &mnt, &args);
        poke(&mnt, &mut n);
        assert_eq!(std::fs::metadata(&cache).unwrap().mode() & 0o7777, 0o3770);
        let creds = cache.join(format!("creds-{ALICE}"));
        assert!(creds.is_dir());
        let out = sh_as(
            &sim,
            MALLORY,
            &format!("mv '{}' '{}/.gone'", creds.display(), cache.display()),
        );
        assert!(!out.status.success(), "mallory renamed alice's folder");
    }

    // One made by someone else without the sticky bit (2770): mallory
    // swaps the folder for one of her own; alice's mount notices and keeps
    // its tokens to itself.
    let cache = folder_of(top.path(), "made-2770", ALICE, 0o2770);
    let mnt = folder_of(top.path(), "mnt2", ALICE, 0o700);
    let args = [
        "--token-file",
        token.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--cache-shared",
        "--cache-group",
    ];
    let _m = AliceMount::start(&sim, &mnt, &args);
    let creds = cache.join(format!("creds-{ALICE}"));
    poke(&mnt, &mut n);
    assert!(
        names_in(&creds).iter().any(|n| n.starts_with("token-")),
        "tokens are shared there at first: {:?}",
        names_in(&creds)
    );
    let out = sh_as(
        &sim,
        MALLORY,
        &format!(
            "mv '{c}' '{top}/.gone' && mkdir '{c}' && chmod 777 '{c}'",
            c = creds.display(),
            top = cache.display()
        ),
    );
    assert!(out.status.success(), "{out:?}");
    // And plants a FIFO and a link where a lock of alice's could be read.
    for name in ["token-x.lock", "creds-x.lock"] {
        let _ = sh_as(
            &sim,
            MALLORY,
            &format!("mkfifo '{}/{name}'", creds.display()),
        );
    }
    let _ = sh_as(
        &sim,
        MALLORY,
        &format!("ln -s /dev/zero '{}/zero.lock'", creds.display()),
    );
    let planted = names_in(&creds);
    // Renewals go on (every 4 s here) for 10 s: none reaches her folder.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        poke(&mnt, &mut n);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        names_in(&creds),
        planted,
        "alice's daemon wrote into mallory's folder"
    );
    // Her mount still reads (its tokens are its own now).
    let out = sh_as(
        &sim,
        ALICE,
        &format!("cat {}/10378.1/1/f.txt", mnt.display()),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n", "{out:?}");
    // No thread of hers blocked in the FIFO.
    let pid = _m.child.id();
    let blocked: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("wchan")).ok())
        .filter(|w| w.contains("pipe") || w.contains("fifo"))
        .collect();
    assert!(blocked.is_empty(), "{blocked:?}");
}

#[test]
fn files_another_user_planted_are_never_taken_as_ours() {
    if !users_can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/f.txt", b"real\n");
    write(d.path(), "10378.1/2/forged.csv", b"never-read\n");
    let sim = Sim::start(d, &[]);
    let top = tempfile::tempdir().unwrap();
    std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The node's /tmp: sticky, everyone writes.
    let shared_tmp = folder_of(top.path(), "node-tmp", 0, 0o1777);
    let token = token_of(&sim, top.path(), ALICE);
    let job = "424242";
    // Mallory, before the job starts, at every name of the job's she can
    // guess: the old manifest and log names, a per-job cache folder.
    let forged = r#"{"mountpoint":"x","mounted_at":"2026-01-01T00:00:00Z","taken_at":"2026-01-01T00:00:00Z","ended_at":"2026-01-01T00:00:00Z","datasets":[{"handle":"10378.1/2","files":[{"key":"datasets/10378-1-2/forged.csv","etag":"e","size":11,"opens":1,"bytes_read":11,"reads":1,"first_read":null,"last_read":null,"readers":[]}]}]}"#;
    let plant = format!(
        "cd '{t}' && printf '%s' '{forged}' > provena-{job}.provenance.json && : > provena-{job}.log \
         && chmod 666 provena-{job}.log && mkdir provena-cache-{job} && mkdir provena-{job}",
        t = shared_tmp.display()
    );
    assert!(sh_as(&sim, MALLORY, &plant).status.success());

    // Alice's job: reads f.txt, and is cancelled (SIGTERM reaches the
    // daemon first, as the script allows for).
    let work = folder_of(top.path(), "work", ALICE, 0o700);
    let bin = folder_of(top.path(), "bin", 0, 0o755);
    std::os::unix::fs::symlink(BIN, bin.join("provenafs")).unwrap();
    let cmd = r#"cat "$PROVENA_MNT/10378.1/1/f.txt" >/dev/null
stat -c '%a %u' "$(dirname "$PROVENA_MNT")" > job-dir-mode
pid=$(provenafs status "$PROVENA_MNT" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["pid"])')
kill -TERM "$pid"
for _ in $(seq 50); do mountpoint -q "$PROVENA_MNT" || break; sleep 0.2; done
sleep 1"#;
    let mut c = as_user(&sim, ALICE, "bash");
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-job.sh"))
        .args(["bash", "-c", cmd])
        .current_dir(&work)
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("TMPDIR", &shared_tmp)
        .env("SLURM_JOB_ID", job)
        .env("PROVENA_DATASETS", "10378.1/1")
        .env("PROVENA_TOKEN_FILE", &token)
        .env("XDG_STATE_HOME", work.join("state"));
    let out = sim.run(&mut c);
    let kept = work.join(format!("provenance-{job}.json"));
    let text = std::fs::read_to_string(&kept).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert!(text.contains("f.txt"), "{text}");
    assert!(!text.contains("forged"), "kept another user's file: {text}");
    // The job's own folder was alice's alone (and is gone with the job);
    // what mallory made is untouched (no log line of alice's in her file).
    let mode = std::fs::read_to_string(work.join("job-dir-mode")).unwrap();
    assert_eq!(mode.trim(), format!("700 {ALICE}"));
    assert!(job_dirs(&shared_tmp, job)
        .iter()
        .all(|d| std::fs::metadata(d).unwrap().uid() == MALLORY));
    assert_eq!(
        std::fs::metadata(shared_tmp.join(format!("provena-{job}.log")))
            .unwrap()
            .len(),
        0
    );

    // The mount itself refuses a log file, or a manifest beside it, that
    // is not a file of the user's.
    let mnt = folder_of(top.path(), "mnt", ALICE, 0o700);
    // (The manifest beside `fresh.log` is `fresh.provenance.json`.)
    let out = sh_as(
        &sim,
        MALLORY,
        &format!(
            "printf x > '{}/fresh.provenance.json'",
            shared_tmp.display()
        ),
    );
    assert!(out.status.success(), "{out:?}");
    for (log, what) in [
        (shared_tmp.join(format!("provena-{job}.log")), "log file"),
        (shared_tmp.join("fresh.log"), "manifest"),
    ] {
        let mut c = as_user(&sim, ALICE, BIN);
        c.arg("mount")
            .arg(&mnt)
            .args(["--token-file", token.to_str().unwrap(), "--log-file"])
            .arg(&log);
        let out = sim.run(&mut c);
        assert!(!out.status.success(), "{what}: mounted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not a file of yours"),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!is_mounted(&mnt));
    }
}
