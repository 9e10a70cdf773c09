//! Fixtures for tests that mount for real: the emulator as a child process
//! (`provenafs sim`), a mount (`provenafs mount`), request counters.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The WAN profile, faster than `bench.sh --profile wan` (CI time), same
/// shape: a first-byte wait, paced streams, a slow API.
pub const WAN: &[&str] = &[
    "--first-byte-ms",
    "20",
    "--stream-mib-per-s",
    "200",
    "--link-mib-per-s",
    "1000",
    "--api-latency-ms",
    "50",
];

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
    /// `XDG_STATE_HOME` of every command: where background mounts log and
    /// answer `provenafs status`.
    pub state: tempfile::TempDir,
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
        // `KEY=value` or `export KEY=value`, the value maybe quoted.
        let env: HashMap<String, String> = text
            .lines()
            .map(|l| l.trim().trim_start_matches("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| {
                let v = v.trim();
                let v = v
                    .strip_prefix('\'')
                    .and_then(|v| v.strip_suffix('\''))
                    .or_else(|| v.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                    .unwrap_or(v);
                (k.trim().to_string(), v.to_string())
            })
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
            state: tempfile::tempdir().unwrap(),
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
            .env("RUST_LOG", "trace")
            .env("XDG_STATE_HOME", self.state.path())
            // The default disk cache is this emulator's own: one test's
            // blocks never meet another's, and go with it.
            .env("XDG_CACHE_HOME", self.state.path().join("cache"));
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
        for k in [
            "PROVENA_AUTH_URL",
            "PROVENA_API_URL",
            "PROVENA_S3_ENDPOINT",
            "PROVENA_PROV_API_URL",
            "PROVENA_JOB_API_URL",
        ] {
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
        let log = match flags.iter().position(|f| *f == "--log-file") {
            Some(i) => PathBuf::from(flags[i + 1]),
            None => own_log.clone(),
        };
        let out = self.run(&mut self.command(&args));
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount { dir, log }
    }

    /// A `POST` to the emulator's control endpoint, e.g.
    /// `/_sim/faults?s3_hang=x`; returns the answer's body.
    pub fn post(&self, path_and_query: &str) -> String {
        self.http("POST", path_and_query)
    }

    /// S3 requests whose key (or listing prefix, continuation token)
    /// contains `text` hang from now on; `""` clears it.
    pub fn s3_hang(&self, text: &str) {
        self.post(&format!("/_sim/faults?s3_hang={text}"));
    }

    /// Identity and data store requests hang (or no longer).
    pub fn api_hang(&self, on: bool) {
        self.post(&format!("/_sim/faults?api_hang={}", on as u8));
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
        let mut logs = std::mem::take(&mut *self.logs.lock().unwrap());
        // A mount's read manifest, written beside its log as it ends, is
        // output too (and goes with the log).
        let manifests: Vec<PathBuf> = logs
            .iter()
            .map(|p| p.with_extension("provenance.json"))
            .filter(|m| m.exists())
            .collect();
        logs.extend(manifests);
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
        // PROVENAFS_TEST_KEEP_LOGS keeps them for a look at a passing run.
        if std::env::var_os("PROVENAFS_TEST_KEEP_LOGS").is_none() {
            for p in &logs {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

pub struct Mount {
    pub dir: tempfile::TempDir,
    /// The daemon's log.
    pub log: PathBuf,
}

impl Mount {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The process serving this mount.
    pub fn daemon_pid(&self) -> i32 {
        let pattern = format!("provenafs mount {}", self.path().display());
        let out = Command::new("pgrep")
            .arg("-f")
            .arg(&pattern)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        assert_eq!(pids.len(), 1, "one daemon for {pattern}: {text}");
        pids[0]
    }

    /// What the daemon holds and has done: the `stats:` line it logs on
    /// SIGUSR1, as numbers by name.
    pub fn stats(&self) -> HashMap<String, u64> {
        let count = |t: &str| t.matches("stats: ").count();
        let before = count(&std::fs::read_to_string(&self.log).unwrap_or_default());
        unsafe { libc::kill(self.daemon_pid(), libc::SIGUSR1) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if count(&text) > before {
                let line = text.rsplit("stats: ").next().unwrap_or_default();
                let line = line.lines().next().unwrap_or_default();
                return line
                    .split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "no stats line in {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Its daemon ends after the unmount, writing its read manifest.
        let daemon = Command::new("pgrep")
            .arg("-f")
            .arg(format!("provenafs mount {}", self.path().display()))
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()?
                    .trim()
                    .parse::<u32>()
                    .ok()
            });
        // Plainly first, lazily if something still uses it.
        for how in [&["unmount"][..], &["unmount", "--lazy"][..]] {
            let done = Command::new(BIN)
                .args(how)
                .arg(self.dir.path())
                // Already unmounted by the test: nothing to say.
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if done || !is_mounted(self.dir.path()) {
                break;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_mounted(self.dir.path()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(pid) = daemon {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The manifest the daemon wrote beside its log goes with the test.
        let _ = std::fs::remove_file(self.log.with_extension("provenance.json"));
    }
}

/// The folders `scripts/slurm-job.sh` made for job `job` under `tmp`
/// (`provena-JOB.XXXXXXXX`: a name only the job knows).
pub fn job_dirs(tmp: &Path, job: &str) -> Vec<PathBuf> {
    let prefix = format!("provena-{job}.");
    std::fs::read_dir(tmp)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
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
    digest("sha256sum", p)
}

/// The file's MD5, by `md5sum` (a fresh open and read of the whole file).
pub fn md5sum(p: &Path) -> String {
    digest("md5sum", p)
}

fn digest(tool: &str, p: &Path) -> String {
    let out = Command::new(tool).arg(p).output().expect(tool);
    assert!(
        out.status.success(),
        "{tool} {}: {}",
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

/// The MD5 of `b` in hex (the emulator's ETags are the same).
pub fn md5_hex(b: &[u8]) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(b))
}

/// Replaces `rel` under `root` as an upload replaces an object: the new
/// content appears at once and whole (written aside, renamed into place).
pub fn replace(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    let tmp = p.with_extension("uploading");
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
}

const PY_READER: &str = r#"
import hashlib, os, signal, sys
if os.environ.get("PY_DEFAULT_SIGINT"):
    signal.signal(signal.SIGINT, signal.SIG_DFL)
# A signal it handles and lives on (as make's SIGCHLD, a profiler's SIGPROF).
signal.signal(signal.SIGUSR2, lambda *a: None)
fds = {}
for line in sys.stdin:
    p = line.rstrip("\n").split(" ", 2)
    try:
        if p[0] == "open":
            fds[p[1]] = os.open(p[2], os.O_RDONLY); print("ok")
        elif p[0] == "pread":
            n, off = p[2].split(" ")
            b = os.pread(fds[p[1]], int(n), int(off))
            print("ok", len(b), hashlib.md5(b).hexdigest())
        elif p[0] == "readall":
            fd, h, off = fds[p[1]], hashlib.md5(), 0
            while True:
                b = os.pread(fd, 1 << 20, off)
                if not b:
                    break
                h.update(b); off += len(b)
            print("ok", off, h.hexdigest())
        elif p[0] == "size":
            print("ok", os.fstat(fds[p[1]]).st_size)
        elif p[0] == "random":
            os.posix_fadvise(fds[p[1]], 0, 0, os.POSIX_FADV_RANDOM); print("ok")
        elif p[0] == "dontneed":
            os.posix_fadvise(fds[p[1]], 0, 0, os.POSIX_FADV_DONTNEED); print("ok")
        elif p[0] == "close":
            os.close(fds.pop(p[1])); print("ok")
    except OSError as e:
        print("err", e.errno)
    sys.stdout.flush()
"#;

/// A Python process that keeps file handles open and reads through them
/// on command (`os.pread`), as a long-running analysis does.
pub struct Py {
    pub child: Child,
    stdin: std::process::ChildStdin,
    out: std::io::BufReader<std::process::ChildStdout>,
}

/// What a read through [`Py`] returned: its length and MD5, or the errno.
pub type Got = Result<(u64, String), i32>;

impl Py {
    pub fn start() -> Py {
        Self::spawn(false)
    }

    /// One that leaves SIGINT to its default action (terminate), as `cat`
    /// and `cp` do.
    pub fn start_default_sigint() -> Py {
        Self::spawn(true)
    }

    fn spawn(default_sigint: bool) -> Py {
        let mut c = Command::new("python3");
        c.arg("-u").arg("-c").arg(PY_READER);
        if default_sigint {
            c.env("PY_DEFAULT_SIGINT", "1");
        }
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        Py { child, stdin, out }
    }

    /// Sends a command without waiting for its answer.
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The answer to the oldest command not yet answered.
    pub fn answer(&mut self) -> Result<Vec<String>, i32> {
        use std::io::BufRead;
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        match words.first().map(String::as_str) {
            Some("ok") => Ok(words[1..].to_vec()),
            Some("err") => Err(words[1].parse().unwrap()),
            _ => panic!("python reader said {line:?}"),
        }
    }

    fn ask(&mut self, line: &str) -> Result<Vec<String>, i32> {
        self.send(line);
        self.answer()
    }

    pub fn open(&mut self, name: &str, path: &Path) -> Result<(), i32> {
        self.ask(&format!("open {name} {}", path.display()))
            .map(|_| ())
    }

    fn got(r: Result<Vec<String>, i32>) -> Got {
        r.map(|w| (w[0].parse().unwrap(), w[1].clone()))
    }

    pub fn pread(&mut self, name: &str, offset: u64, len: u64) -> Got {
        Self::got(self.ask(&format!("pread {name} {len} {offset}")))
    }

    /// Reads the whole file from its start, 1 MiB at a time.
    pub fn read_all(&mut self, name: &str) -> Got {
        Self::got(self.ask(&format!("readall {name}")))
    }

    pub fn size(&mut self, name: &str) -> u64 {
        self.ask(&format!("size {name}")).unwrap()[0]
            .parse()
            .unwrap()
    }

    /// posix_fadvise(RANDOM): no kernel read-ahead, each read reaches us.
    pub fn random(&mut self, name: &str) {
        self.ask(&format!("random {name}")).unwrap();
    }

    /// posix_fadvise(DONTNEED): the kernel drops its pages of the file,
    /// so the next read reaches the daemon.
    pub fn forget_pages(&mut self, name: &str) {
        self.ask(&format!("dontneed {name}")).unwrap();
    }

    pub fn close(&mut self, name: &str) {
        self.ask(&format!("close {name}")).unwrap();
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One answer of the emulator, as [`Sim::request`] reads it.
pub struct HttpAnswer {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

impl Sim {
    /// One HTTP/1.1 request to the emulator with extra headers and a body,
    /// read whole (the emulator's JSON answers carry a Content-Length).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpAnswer {
        let mut s = TcpStream::connect(&self.addr).expect("emulator answers");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .expect("a status line");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        HttpAnswer {
            status,
            headers,
            body: body.to_string(),
        }
    }

    /// A token-endpoint answer for the refresh grant with `offline`.
    pub fn refresh(&self, offline: &str) -> HttpAnswer {
        let realm = self.env["PROVENA_AUTH_URL"].clone();
        let path = &realm[realm.find("/auth/").expect("realm path")..];
        let form = format!(
            "grant_type=refresh_token&client_id=automated-access&scope=roles&refresh_token={offline}"
        );
        self.request(
            "POST",
            &format!("{path}/protocol/openid-connect/token"),
            &[("Content-Type", "application/x-www-form-urlencoded")],
            form.as_bytes(),
        )
    }

    /// An access token for `offline` (this emulator's printed token if `None`).
    pub fn access_token(&self, offline: Option<&str>) -> String {
        let a = self.refresh(offline.unwrap_or(self.token()));
        assert_eq!(a.status, 200, "{}", a.body);
        a.json()["access_token"].as_str().unwrap().to_string()
    }

    /// A data store API call with `Authorization: Bearer <access>`; a JSON
    /// body makes it a POST, none a GET.
    pub fn api(&self, path: &str, access: &str, body: Option<serde_json::Value>) -> HttpAnswer {
        let auth = format!("Bearer {access}");
        match body {
            Some(b) => self.request(
                "POST",
                path,
                &[
                    ("Authorization", auth.as_str()),
                    ("Content-Type", "application/json"),
                ],
                b.to_string().as_bytes(),
            ),
            None => self.request("GET", path, &[("Authorization", auth.as_str())], b""),
        }
    }
}

/// Every proxy variable a client reads, both cases.
pub const PROXY_VARS: [&str; 8] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// Like [`Sim::mount`], with exactly the proxy settings in `env` (every
/// proxy variable of the test's own environment removed first) and any
/// other variables `env` names.
pub fn mount_with_env(sim: &Sim, flags: &[&str], env: &[(&str, &str)]) -> Mount {
    let dir = tempfile::Builder::new()
        .prefix("provenafs-mnt-")
        .tempdir()
        .unwrap();
    let log = log_file("mount");
    sim.scan_log(&log);
    let mut args = vec!["mount", dir.path().to_str().unwrap()];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--log-file", log.to_str().unwrap()]);
    let mut cmd = sim.command(&args);
    for k in PROXY_VARS {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = sim.run(&mut cmd);
    assert!(
        out.status.success(),
        "mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Mount { dir, log }
}

/// The mount's log so far.
pub fn log_text(m: &Mount) -> String {
    std::fs::read_to_string(&m.log).unwrap_or_default()
}
