//! Fixtures for tests that mount for real: the emulator as a child process
//! (`provenafs sim`), a mount (`provenafs mount`), request counters.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_provenafs");

/// Whether this machine can mount FUSE. Under CI a missing FUSE is a
/// failure, not a skip.
pub fn fuse_available() -> bool {
    let ok =
        Path::new("/dev/fuse").exists() && Command::new("fusermount3").arg("-V").output().is_ok();
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("FUSE is required under CI: /dev/fuse and fusermount3 (apt-get install fuse3)");
        }
        eprintln!("skipping: FUSE not available (no /dev/fuse or fusermount3)");
    }
    ok
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    provenafs::demo::pseudo_random(seed | 1, len)
}

pub fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

pub struct Sim {
    pub child: Child,
    pub data: tempfile::TempDir,
    pub env: HashMap<String, String>,
    pub addr: String,
}

impl Sim {
    /// Starts `provenafs sim` over `data` with extra flags.
    pub fn start(data: tempfile::TempDir, flags: &[&str]) -> Sim {
        Self::spawn(data, flags, None)
    }

    /// Like [`start`](Self::start), with the emulator's log in `log`.
    pub fn start_logged(data: tempfile::TempDir, flags: &[&str], log: &Path) -> Sim {
        Self::spawn(data, flags, Some(log))
    }

    fn spawn(data: tempfile::TempDir, flags: &[&str], log: Option<&Path>) -> Sim {
        let envfile = data.path().with_extension("env");
        let _ = std::fs::remove_file(&envfile);
        let child = Command::new(BIN)
            .arg("sim")
            .arg("--root")
            .arg(data.path())
            .arg("--env-file")
            .arg(&envfile)
            .args(flags)
            .stdout(Stdio::null())
            .stderr(match log {
                Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
                None => Stdio::inherit(),
            })
            .spawn()
            .expect("start emulator");
        let deadline = Instant::now() + Duration::from_secs(20);
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&envfile) {
                if t.contains("RRAP_OFFLINE_TOKEN=") {
                    break t;
                }
            }
            assert!(Instant::now() < deadline, "emulator did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        let env: HashMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let addr = env["PROVENA_API_URL"]
            .trim_start_matches("http://")
            .to_string();
        Sim {
            child,
            data,
            env,
            addr,
        }
    }

    pub fn root(&self) -> &Path {
        self.data.path()
    }

    pub fn token(&self) -> &str {
        &self.env["RRAP_OFFLINE_TOKEN"]
    }

    /// A `provenafs` command with the emulator's endpoints and token set.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args).env_remove("PROVENAFS_LOG");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn http(&self, method: &str, path: &str) -> String {
        let mut s = TcpStream::connect(&self.addr).expect("connect emulator");
        write!(s, "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", self.addr).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
    }

    /// Request counters of the emulator.
    pub fn stats(&self) -> serde_json::Value {
        let body = self.http("GET", "/_sim/stats");
        // The body may be chunked; take the JSON object inside.
        let start = body.find('{').unwrap();
        let end = body.rfind('}').unwrap();
        serde_json::from_str(&body[start..=end]).unwrap()
    }

    pub fn stat(&self, name: &str) -> u64 {
        self.stats()[name].as_u64().unwrap()
    }

    pub fn revoke(&self) {
        self.http("POST", "/_sim/revoke");
    }

    pub fn set_faults(&self, s3: f64, api: f64) {
        self.http("POST", &format!("/_sim/faults?s3_rate={s3}&api_rate={api}"));
    }

    /// Every secret the emulator handed out.
    pub fn secrets(&self) -> Vec<String> {
        let body = self.http("GET", "/_sim/secrets");
        let start = body.find('[').unwrap();
        let end = body.rfind(']').unwrap();
        serde_json::from_str(&body[start..=end]).unwrap()
    }

    /// Mounts in the background and returns once the mount is ready.
    pub fn mount(&self, flags: &[&str]) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("provenafs-mnt-")
            .tempdir()
            .unwrap();
        let mut args = vec!["mount", dir.path().to_str().unwrap()];
        args.extend_from_slice(flags);
        let out = self.command(&args).output().expect("run mount");
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount { dir }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

pub struct Mount {
    pub dir: tempfile::TempDir,
}

impl Mount {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new(BIN)
            .arg("unmount")
            .arg(self.dir.path())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_mounted(self.dir.path()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn is_mounted(p: &Path) -> bool {
    provenafs::mount::is_mountpoint(p)
}

/// Runs a shell command; returns its output.
pub fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run sh")
}

pub fn sha256(p: &Path) -> String {
    use sha2::Digest;
    let data = std::fs::read(p).unwrap();
    hex::encode(sha2::Sha256::digest(&data))
}

/// Files under `root`, relative, sorted.
pub fn tree(root: &Path) -> Vec<String> {
    let out = Command::new("find")
        .arg(".")
        .arg("-mindepth")
        .arg("1")
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "find failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}
