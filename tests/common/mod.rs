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
    /// Every log this emulator and its mounts wrote, all at trace level
    /// unless a test chose otherwise: scanned for secrets when it stops.
    logs: std::sync::Mutex<Vec<PathBuf>>,
    /// Text captured from commands run through [`Sim::run`].
    outputs: std::sync::Mutex<String>,
}

/// Where a test's logs go (kept after a failure for a look).
fn log_file(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "provenafs-test-{}-{}-{name}.log",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
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
        let own_log = log_file("sim");
        let log = log.unwrap_or(&own_log);
        let child = Command::new(BIN)
            // Every suite run is a trace-level secret scan (see Drop).
            .env("RUST_LOG", "trace")
            .env_remove("PROVENAFS_LOG")
            .arg("sim")
            .arg("--root")
            .arg(data.path())
            .arg("--env-file")
            .arg(&envfile)
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
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
            logs: std::sync::Mutex::new(vec![log.to_path_buf()]),
            outputs: Default::default(),
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
        c.args(args)
            .env_remove("PROVENAFS_LOG")
            .env("RUST_LOG", "trace");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn try_http(&self, method: &str, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(&self.addr).ok()?;
        write!(s, "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", self.addr).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
    }

    fn http(&self, method: &str, path: &str) -> String {
        self.try_http(method, path).expect("emulator answers")
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

    /// Approves or denies a pending device login, as the user would in a browser.
    pub fn decide_device(&self, user_code: &str, approve: bool) {
        let action = if approve { "approve" } else { "deny" };
        self.http(
            "POST",
            &format!("/_sim/device?user_code={user_code}&action={action}"),
        );
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

    /// Points `c` at this emulator's three endpoints, but gives it no token:
    /// for commands that must find one by themselves.
    pub fn endpoints(&self, c: &mut Command) {
        for k in ["PROVENA_AUTH_URL", "PROVENA_API_URL", "PROVENA_S3_ENDPOINT"] {
            c.env(k, &self.env[k]);
        }
        c.env_remove("RRAP_OFFLINE_TOKEN");
    }

    /// Runs a command (see [`command`](Self::command)); its output joins
    /// the secret scan.
    pub fn run(&self, cmd: &mut Command) -> Output {
        let out = cmd.output().expect("run provenafs");
        let mut o = self.outputs.lock().unwrap();
        o.push_str(&String::from_utf8_lossy(&out.stdout));
        o.push_str(&String::from_utf8_lossy(&out.stderr));
        out
    }

    /// Adds text to the secret scan.
    pub fn note(&self, text: &str) {
        self.outputs.lock().unwrap().push_str(text);
    }

    /// Adds a log file to the secret scan.
    pub fn scan_log(&self, p: &Path) {
        self.logs.lock().unwrap().push(p.to_path_buf());
    }

    /// Mounts in the background and returns once the mount is ready.
    pub fn mount(&self, flags: &[&str]) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("provenafs-mnt-")
            .tempdir()
            .unwrap();
        let mut args = vec!["mount", dir.path().to_str().unwrap()];
        args.extend_from_slice(flags);
        let own_log = log_file("mount");
        match flags.iter().position(|f| *f == "--log-file") {
            Some(i) => self.scan_log(Path::new(flags[i + 1])),
            None => {
                args.extend_from_slice(&["--log-file", own_log.to_str().unwrap()]);
                self.scan_log(&own_log);
            }
        }
        let out = self.run(&mut self.command(&args));
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
        let secrets: Vec<String> = self
            .try_http("GET", "/_sim/secrets")
            .and_then(|b| {
                let json = &b[b.find('[')?..=b.rfind(']')?];
                serde_json::from_str(json).ok()
            })
            .unwrap_or_default();
        if secrets.is_empty() && !std::thread::panicking() {
            eprintln!("warning: emulator gone before its secrets were read; logs not scanned");
        }
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            return;
        }
        // The suite-wide promise: no token, credential or signature in any
        // log line at any level, in any message.
        let logs = std::mem::take(&mut *self.logs.lock().unwrap());
        let mut texts = vec![(
            "command output".to_string(),
            self.outputs.lock().unwrap().clone(),
        )];
        for p in &logs {
            if let Ok(t) = std::fs::read(p) {
                texts.push((
                    p.display().to_string(),
                    String::from_utf8_lossy(&t).into_owned(),
                ));
            }
        }
        for (name, text) in &texts {
            for s in &secrets {
                assert!(!text.contains(s.as_str()), "a secret leaked into {name}");
            }
            let lower = text.to_ascii_lowercase();
            assert!(
                !lower.contains("signature="),
                "a SigV4 signature leaked into {name}"
            );
            assert!(
                !lower.contains("x-amz-security-token:"),
                "a session token header leaked into {name}"
            );
        }
        for p in &logs {
            let _ = std::fs::remove_file(p);
        }
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

/// The file's SHA-256, by `sha256sum` (a debug build of sha2 in the test
/// itself would be slower than the mount it measures).
pub fn sha256(p: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    assert!(
        out.status.success(),
        "sha256sum {}: {}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Standard output of a command that must have succeeded.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Names in folder `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
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

/// A log file for a child's standard error, added to the secret scan.
pub fn sim_stderr(sim: &Sim) -> Stdio {
    let p = log_file("stderr");
    sim.scan_log(&p);
    Stdio::from(std::fs::File::create(&p).unwrap())
}
