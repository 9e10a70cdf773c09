//! Wiring a mount: check the mountpoint, exchange the token, build the
//! layers, mount, serve until unmounted or signalled.
//!
//! Without `--foreground` the command re-runs itself in the foreground as
//! a detached child and returns once the child says the mount is ready, so
//! every failure before that point reaches the user's terminal as one line
//! and a non-zero exit status.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tracing::{debug, info, warn};

use crate::api::ApiConfig;
use crate::auth::{AuthConfig, AuthError};
use crate::fs::fuse::{FuseConfig, MountStats, ProvenaFs};
use crate::fs::tree::{Tree, TreeConfig};
use crate::mountinfo;
use crate::provenance::checkpoint::ManifestFile;
use crate::read::{ReadConfig, Reader};
use crate::s3::aws::S3Config;
use crate::secret::Secret;
use crate::session::{AuthErrorOr, Session};

/// Printed by a detached child on stdout once the mount answers.
const READY: &str = "\u{1}provenafs-ready";
/// …or that it failed, with its exit code: the parent need not wait for
/// the child's exit, which a thread stuck in a hung file system may hold
/// up.
const FAILED: &str = "\u{1}provenafs-failed ";
/// Set in a detached child's environment.
const CHILD_ENV: &str = "PROVENAFS_DETACHED_CHILD";

#[derive(Clone, Debug)]
pub struct MountConfig {
    pub mountpoint: PathBuf,
    pub token: Secret,
    pub auth: AuthConfig,
    pub api: ApiConfig,
    pub s3: S3Config,
    pub tree: TreeConfig,
    pub read: ReadConfig,
    pub fuse: FuseConfig,
    pub max_threads: usize,
    pub allow_other: bool,
    pub allow_root: bool,
    /// Logs go to a file (`--log-file`), not to standard error: a detached
    /// mount keeps standard error only then.
    pub logs_to_file: bool,
    /// `--file-mode` or `--dir-mode` was given: `--allow-other` then
    /// needs no warning about who can read what.
    pub explicit_modes: bool,
    /// Where this mount logs, if to a file: shown by `provenafs status`,
    /// and where the watchdog says what it did.
    pub log_file: Option<PathBuf>,
    /// A foreground mount run by a person: say on a terminal when it is
    /// mounted and when it is unmounted.
    pub announce: bool,
}

#[derive(Debug, Error)]
pub enum MountError {
    #[error("mountpoint {0} does not exist; create it with `mkdir -p {0}`")]
    NoMountpoint(String),
    #[error("mountpoint {0} is not a directory")]
    NotDir(String),
    #[error("mountpoint {0} is not empty; mount on an empty directory")]
    NotEmpty(String),
    #[error("{0} is already a mount point; unmount it first with `provenafs unmount {0}`")]
    AlreadyMounted(String),
    #[error("{0} is a stale mount (transport endpoint not connected); clear it with `fusermount3 -u {0}`")]
    Stale(String),
    #[error("cannot use mountpoint {0}: {1}")]
    Mountpoint(String, std::io::Error),
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error("mount failed: {0} (is fuse3 installed and /dev/fuse available?)")]
    Fuse(std::io::Error),
    #[error("{0}")]
    Other(String),
    /// The detached child failed and already said why.
    #[error("mount process exited with status {0}")]
    ChildFailed(i32),
}

/// Refuses mountpoints that would surprise: missing, not a directory, not
/// empty, already mounted, or left stale by a killed process.
pub fn check_mountpoint(p: &Path) -> Result<(), MountError> {
    let shown = p.display().to_string();
    match std::fs::metadata(p) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return Err(MountError::Stale(shown)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MountError::NoMountpoint(shown))
        }
        Err(e) => return Err(MountError::Mountpoint(shown, e)),
        Ok(m) if !m.is_dir() => return Err(MountError::NotDir(shown)),
        Ok(_) => {}
    }
    if is_mountpoint(p) {
        return Err(MountError::AlreadyMounted(shown));
    }
    let mut rd = std::fs::read_dir(p).map_err(|e| MountError::Mountpoint(shown.clone(), e))?;
    if rd.next().is_some() {
        return Err(MountError::NotEmpty(shown));
    }
    Ok(())
}

/// Whether something is mounted at `p` (live or stale).
pub fn is_mountpoint(p: &Path) -> bool {
    mountinfo::at(p).is_some()
}

/// `provenafs unmount [--lazy] MOUNTPOINT`: unmounts a provenafs mount
/// and nothing else. A busy one is left alone (the error names the
/// processes using it) unless `lazy`, which detaches it at once and lets
/// it go when the last user does.
///
/// Errors, each one line: not a mount point; a mount of another kind
/// (named); busy; the unmount itself failed.
pub fn unmount_command(p: &Path, lazy: bool) -> Result<(), String> {
    let shown = p.display();
    let Some(entry) = mountinfo::at(p) else {
        return Err(format!("{shown} is not a mount point"));
    };
    if !entry.is_provenafs() {
        return Err(format!(
            "{shown} is not a provenafs mount (it is {} from {}); not unmounting it",
            entry.fstype, entry.source
        ));
    }
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    if me != 0 {
        if let Some(owner) = entry.user_id().filter(|o| *o != me) {
            return Err(format!(
                "{shown} is not your mount (mounted by uid {owner}); its owner or root can unmount it"
            ));
        }
    }
    // Asked first: once unmounted, its daemon writes what was read (its
    // read manifest) and ends; the command returns after that.
    let daemon = (!lazy).then(|| crate::status::daemon_pid(&entry)).flatten();
    match unmount_once(&entry.mountpoint, lazy) {
        Ok(()) => {
            if let Some(pid) = daemon {
                wait_gone(pid, Duration::from_secs(10));
            }
            Ok(())
        }
        Err(Unmount::Busy) => {
            let users = mountinfo::users(&entry.mountpoint);
            let named = if users.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = users
                    .iter()
                    .map(|u| format!("{} ({})", u.pid, u.command))
                    .collect();
                format!(", used by {}", list.join(", "))
            };
            Err(format!(
                "{shown} is busy{named}; close those, or detach it anyway with `provenafs unmount --lazy {shown}`"
            ))
        }
        Err(Unmount::Failed(e)) => Err(format!("cannot unmount {shown}: {e}")),
    }
}

/// Waits, at most `bound`, for process `pid` to end (gone, or a zombie).
fn wait_gone(pid: u32, bound: Duration) {
    let until = std::time::Instant::now() + bound;
    while std::time::Instant::now() < until {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the command: `Z`, a zombie, has ended.
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                return
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return,
        }
    }
}

/// Why an unmount did not happen.
enum Unmount {
    Busy,
    Failed(String),
}

/// One unmount of the mount at `p`: umount2(2) as root, fusermount3
/// otherwise; `lazy` detaches a busy mount.
fn unmount_once(p: &Path, lazy: bool) -> Result<(), Unmount> {
    if nix::unistd::geteuid().is_root() {
        use nix::mount::MntFlags;
        let mut flags = MntFlags::UMOUNT_NOFOLLOW;
        if lazy {
            flags |= MntFlags::MNT_DETACH;
        }
        return match nix::mount::umount2(p, flags) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EBUSY) => Err(Unmount::Busy),
            Err(e) => Err(Unmount::Failed(e.desc().to_string())),
        };
    }
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    match cmd.arg(p).stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => {
            let why = String::from_utf8_lossy(&o.stderr).trim().to_string();
            if why.to_ascii_lowercase().contains("busy") {
                Err(Unmount::Busy)
            } else {
                Err(Unmount::Failed(why))
            }
        }
        Err(e) => Err(Unmount::Failed(format!("cannot run fusermount3: {e}"))),
    }
}

/// The daemon unmounting its own mount on a signal: a plain unmount, and
/// a lazy one if it is busy (the reader holding it then gets errors, not
/// a hang, once the daemon is gone).
fn unmount(p: &Path) -> Result<(), String> {
    match unmount_once(p, false) {
        Ok(()) => Ok(()),
        Err(Unmount::Busy) => match unmount_once(p, true) {
            Ok(()) => Ok(()),
            Err(Unmount::Busy) => Err(format!("cannot unmount {}: busy", p.display())),
            Err(Unmount::Failed(e)) => Err(format!("cannot unmount {}: {e}", p.display())),
        },
        Err(Unmount::Failed(e)) => Err(format!("cannot unmount {}: {e}", p.display())),
    }
}

/// Starts a detached child that mounts in the foreground and returns once
/// it is ready, passing on every line it prints before then. Errors: the
/// child failed (its exit code), or was not ready within `ready_within`
/// (then it is stopped).
pub fn spawn_detached(ready_within: Duration) -> Result<(), MountError> {
    let exe = std::env::current_exe().map_err(|e| MountError::Other(e.to_string()))?;
    let (reader, writer) = std::io::pipe().map_err(|e| MountError::Other(e.to_string()))?;
    let writer2 = writer
        .try_clone()
        .map_err(|e| MountError::Other(e.to_string()))?;
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .arg("--foreground")
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2);
    // SAFETY: setsid is async-signal-safe; it detaches the child from the
    // terminal so a Ctrl-C there does not reach it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| MountError::Other(e.to_string()))?;
    drop(cmd);
    // The child's lines, read on a thread of their own so the wait for
    // them is bounded: every step of the child's start is bounded (network
    // calls by the request timeout, folders by the stall timeout), but a
    // child stuck anyway must not leave the user's shell (or a Slurm job)
    // hanging for good.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let give_up = std::time::Instant::now() + ready_within;
    loop {
        let left = give_up.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == READY => return Ok(()),
            Ok(line) => match line.strip_prefix(FAILED) {
                Some(code) => {
                    let code = code.trim().parse().unwrap_or(1);
                    // Reaped by whoever is left: not waited for here.
                    std::thread::spawn(move || child.wait());
                    return Err(MountError::ChildFailed(code));
                }
                None => eprintln!("{line}"),
            },
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                return Err(MountError::Other(format!(
                    "the mount did not come up within {}s (stopped); its log says why",
                    ready_within.as_secs()
                )));
            }
        }
    }
    let status = child.wait().map_err(|e| MountError::Other(e.to_string()))?;
    Err(MountError::ChildFailed(status.code().unwrap_or(1).max(1)))
}

/// Tells the parent of a detached child that the mount failed (with
/// `code`), after the child has said why: the parent returns at once.
pub fn signal_failed(code: i32) {
    if is_detached_child() {
        println!("{FAILED}{code}");
        let _ = std::io::stdout().flush();
    }
}

/// Whether this process is the detached child of a background mount.
pub fn is_detached_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// After the mount is ready, a detached child tells its parent and stops
/// writing to the parent's pipe.
fn signal_ready(logs_to_file: bool) {
    notify_systemd();
    if !is_detached_child() {
        return;
    }
    println!("{READY}");
    let _ = std::io::stdout().flush();
    // SAFETY: plain fd juggling on fds we own; /dev/null always opens.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 1);
            if !logs_to_file {
                libc::dup2(null, 2);
            }
            libc::close(null);
        }
    }
}

/// Tells systemd (a `Type=notify` unit) that the mount is ready.
fn notify_systemd() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return warn!("cannot notify systemd: {e}"),
    };
    let sent = if let Some(abs) = path.to_str().and_then(|p| p.strip_prefix('@')) {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes())
            .and_then(|a| sock.send_to_addr(b"READY=1\n", &a))
    } else {
        sock.send_to(b"READY=1\n", &path)
    };
    match sent {
        Ok(_) => debug!("told systemd the mount is ready"),
        Err(e) => warn!("cannot notify systemd: {e}"),
    }
}

/// Mounts and serves until unmounted or SIGINT/SIGTERM (or SIGHUP in the
/// foreground: a closed terminal).
pub fn run(mut cfg: MountConfig, rt: &tokio::runtime::Runtime) -> Result<(), MountError> {
    // Absolute before the daemon leaves the folder it was started in.
    cfg.mountpoint = std::path::absolute(&cfg.mountpoint)
        .map_err(|e| MountError::Mountpoint(cfg.mountpoint.display().to_string(), e))?;
    check_mountpoint(&cfg.mountpoint)?;
    let reader = Reader::new(cfg.read.clone())
        .map_err(|e| MountError::Other(format!("cannot open the cache folder: {e}")))?;
    // A cache folder shared with other processes (a job array's nodes)
    // shares this user's access token and read credentials too.
    if let Some(dir) = cfg
        .read
        .disk
        .as_ref()
        .filter(|d| d.shared)
        .map(|d| d.dir.clone())
    {
        crate::session::share_leases(&dir, &cfg.token, &mut cfg.auth, &cfg.api, &mut cfg.s3);
    }
    // Exchange now: a bad token or an unreachable service fails here,
    // before anything is mounted.
    let session = rt
        .block_on(Session::connect(
            cfg.token.clone(),
            cfg.auth.clone(),
            cfg.api.clone(),
            cfg.s3.clone(),
        ))
        .map_err(|e| match e {
            AuthErrorOr::Auth(a) => MountError::Auth(a),
            AuthErrorOr::Other(o) => MountError::Other(o),
        })?;
    // And the data store with it: a wrong --api-url fails here in one
    // line, not later as an error on every access.
    let probe = cfg.tree.datasets.as_ref().and_then(|d| d.first());
    rt.block_on(session.api.check(
        crate::retry::Deadline::after(cfg.api.request_timeout),
        probe.map(String::as_str),
    ))
    .map_err(|e| match e {
        crate::api::ApiError::Auth(a) => MountError::Auth(a),
        e => MountError::Other(e.to_string()),
    })?;
    rt.block_on(crate::s3::aws::probe(&cfg.s3))
        .map_err(MountError::Other)?;
    let s3_counters = session.stores.counters();
    let tree = Arc::new(Tree::new(
        cfg.tree.clone(),
        session.api.clone(),
        session.stores,
    ));
    // A lookup's guess at a file's first bytes goes to the read path.
    tree.set_first_bytes(reader.clone());
    rt.block_on(async { tree.start_sweeper() });
    if let Some(pinned) = &cfg.tree.datasets {
        // An HPC job that names its datasets learns at once of a typo or a
        // missing permission, not from a failed read an hour in.
        for h in pinned {
            rt.block_on(tree.pin_ready(h))
                .map_err(|e| MountError::Other(format!("dataset {h}: {}", e)))?;
        }
    }
    if cfg.allow_other && !cfg.explicit_modes {
        let said = format!(
            "--allow-other without --file-mode/--dir-mode: every user of this machine can read \
             every dataset this token can read (files {:o}, folders {:o}); give the mount to a \
             group with --gid GROUP --file-mode 0440 --dir-mode 0550",
            cfg.fuse.file_mode, cfg.fuse.dir_mode
        );
        warn!("{said}");
        // Also to the person mounting (a background mount's standard
        // error reaches their terminal until it is mounted).
        if cfg.logs_to_file {
            eprintln!("provenafs: warning: {said}");
        }
    }
    // A daemon must not pin the folder it was started in (that folder
    // could then not be unmounted or removed). Every path it uses from
    // here on is absolute.
    if let Err(e) = std::env::set_current_dir("/") {
        warn!(error = %e, "cannot change to /");
    }
    let manifest = Arc::new(crate::provenance::Manifest::new(
        &cfg.mountpoint.to_string_lossy(),
    ));
    let fs = ProvenaFs::new(
        tree,
        reader,
        manifest.clone(),
        cfg.fuse.clone(),
        rt.handle().clone(),
    );
    let stats = fs.stats();
    // Written while mounted too: a daemon killed outright (no SIGTERM)
    // still leaves its last checkpoint.
    let manifest_file = manifest_file(&manifest, &cfg)?;
    let checkpoints = manifest_file
        .as_ref()
        .map(|f| f.spawn_checkpoints(crate::provenance::checkpoint::every(), rt.handle()));
    let served = serve(fs, &stats, s3_counters, &cfg, rt);
    drop(checkpoints);
    if let Some(f) = &manifest_file {
        f.finish();
    }
    // One line for the operator: what the mount held and did.
    info!("stats: {}", stats.line());
    served
}

/// Raises the kernel's read-ahead for this mount to 4 MiB, so sequential
/// reads reach us as 1 MiB requests instead of 128 KiB ones (measured:
/// about +20% cold sequential throughput). FUSE caps read-ahead at mount
/// time; only root can raise it afterwards, through the mount's bdi.
fn raise_readahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = md.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&path, "4096") {
        Ok(()) => debug!(path, "read-ahead raised to 4 MiB"),
        Err(e) => debug!(path, error = %e, "cannot raise read-ahead (not root?)"),
    }
}

/// Holds the mountpoint folder locked while it is checked and mounted, so
/// that of two mounts started at once exactly one mounts and the other
/// sees the first's mount (never two stacked mounts). The lock is the
/// folder's own `flock`: it needs no shared path, and a second process
/// that opens the folder after the mount meets the mount instead.
struct MountLock(#[allow(dead_code)] Option<nix::fcntl::Flock<std::fs::File>>);

impl MountLock {
    fn take(mountpoint: &Path) -> Result<MountLock, MountError> {
        use nix::fcntl::{Flock, FlockArg};
        let shown = mountpoint.display().to_string();
        let mut file = std::fs::File::open(mountpoint)
            .map_err(|e| MountError::Mountpoint(shown.clone(), e))?;
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => return Ok(MountLock(Some(l))),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                    if std::time::Instant::now() >= give_up {
                        return Err(MountError::Other(format!(
                            "{shown} is locked by another process (a mount still starting?); try again"
                        )));
                    }
                    file = f;
                    std::thread::sleep(Duration::from_millis(20));
                }
                // A file system without flock (some NFS setups): mount
                // without the guard rather than not at all.
                Err((_, e)) => {
                    debug!(error = %e, "cannot lock the mountpoint; mounting without the guard");
                    return Ok(MountLock(None));
                }
            }
        }
    }
}

/// Set in the environment of the watchdog process: the mount's ID…
const WATCHDOG_ENV: &str = "PROVENAFS_WATCHDOG_MOUNT_ID";
/// …and the mount's log file, opened only to say what it did (the file
/// may have been rotated in between).
const WATCHDOG_LOG_ENV: &str = "PROVENAFS_WATCHDOG_LOG";

/// Starts the watchdog of the mount `entry`: a small process (this binary
/// again) that waits for the daemon to end, then unmounts the mount if it
/// is still there, so a daemon killed by SIGKILL, a crash or the OOM
/// killer leaves a usable mountpoint, not "Transport endpoint is not
/// connected" (libfuse's `auto_unmount`, for root mounts too). It learns
/// of the end through a pipe whose write end only the daemon holds.
fn spawn_watchdog(
    entry: &mountinfo::MountEntry,
    log_file: Option<&Path>,
) -> Result<std::io::PipeWriter, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (reader, writer) = std::io::pipe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    // Nothing of the daemon's environment (its token above all) but what
    // the watchdog needs: where fusermount3 is and where the state is.
    cmd.arg0("provenafs-watchdog")
        .arg(&entry.mountpoint)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env(WATCHDOG_ENV, entry.id.to_string())
        .current_dir("/")
        .stdin(reader)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for k in ["HOME", "XDG_STATE_HOME"] {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    if let Some(p) = log_file {
        cmd.env(WATCHDOG_LOG_ENV, p);
    }
    // SAFETY: setsid and close_range are async-signal-safe. Its own
    // session keeps a Ctrl-C in the mount's terminal from reaching it;
    // every inherited descriptor (above all /dev/fuse, which would keep
    // the dead mount's connection open) is closed when it execs.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| e.to_string())?;
    debug!(pid = child.id(), mount_id = entry.id, "watchdog started");
    Ok(writer)
}

/// The watchdog process's main (see [`spawn_watchdog`]); None when this
/// process is not a watchdog. Returns the exit status.
pub fn watchdog_main() -> Option<i32> {
    let id: u64 = std::env::var(WATCHDOG_ENV).ok()?.parse().ok()?;
    let mountpoint = PathBuf::from(std::env::args_os().nth(1)?);
    // Blocks until the daemon is gone: end of file once its end closes.
    let mut buf = [0u8; 64];
    loop {
        match std::io::Read::read(&mut std::io::stdin(), &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    // Still there, on top at its path, and dead? Then the daemon ended
    // without unmounting. The kernel reuses mount IDs at once, so a mount
    // made there since may carry the same ID: only a dead connection
    // (statfs always asks the daemon) tells
    // ours apart from a live newcomer, which is left alone.
    match mountinfo::at(&mountpoint) {
        Some(top) if top.id == id && top.is_provenafs() => {}
        _ => return Some(0),
    }
    // A request already waiting when the connection ends fails with
    // ECONNABORTED; one after, with ENOTCONN.
    use nix::errno::Errno;
    match nix::sys::statfs::statfs(&mountpoint) {
        Err(Errno::ENOTCONN | Errno::ECONNABORTED) => {}
        _ => return Some(0),
    }
    let unmounted = unmount_once(&mountpoint, true);
    // Its status socket answers no more.
    if let Some(sock) = crate::logfile::socket_path(&mountpoint) {
        if std::os::unix::net::UnixStream::connect(&sock).is_err() {
            let _ = std::fs::remove_file(sock);
        }
    }
    let (code, said) = match unmounted {
        Ok(()) => (0, "ended without unmounting; unmounted it".to_string()),
        Err(Unmount::Busy) | Err(Unmount::Failed(_)) => (
            1,
            format!(
                "ended; cannot unmount it (run `fusermount3 -u -z {}`)",
                mountpoint.display()
            ),
        ),
    };
    if let Some(log) = std::env::var_os(WATCHDOG_LOG_ENV) {
        // The daemon's own log (checked as its own when it started),
        // through the same checks: never a file someone else put there.
        if let Ok(mut f) = crate::logfile::open(std::path::Path::new(&log)) {
            let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ");
            let _ = writeln!(
                f,
                "{now}  WARN provenafs-watchdog: the daemon of {} {said}",
                mountpoint.display()
            );
        }
    }
    Some(code)
}

/// Mounts `fs` at the configured mountpoint and serves it.
fn serve(
    fs: ProvenaFs,
    stats: &MountStats,
    s3_counters: Arc<crate::s3::aws::S3Counters>,
    cfg: &MountConfig,
    rt: &tokio::runtime::Runtime,
) -> Result<(), MountError> {
    use fuser::MountOption;
    let mut fc = fuser::Config::default();
    fc.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("provenafs".into()),
        MountOption::Subtype("provenafs".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
    ];
    if cfg.allow_other {
        fc.acl = fuser::SessionACL::All;
    } else if cfg.allow_root {
        fc.acl = fuser::SessionACL::RootAndOwner;
    }
    fc.n_threads = Some(cfg.max_threads.max(1));
    fc.clone_fd = true;
    let notifier = fs.notifier_slot();
    // Caught from before the mount answers: a signal that arrives as soon
    // as the mount is visible must not meet the default action (SIGHUP's
    // would kill the daemon and leave the mount to the watchdog).
    let (mut int, mut term, mut usr1, mut hup) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _rt = rt.enter();
        let catch = |k: SignalKind| {
            signal(k).map_err(|e| MountError::Other(format!("cannot catch signals: {e}")))
        };
        (
            catch(SignalKind::interrupt())?,
            catch(SignalKind::terminate())?,
            catch(SignalKind::user_defined1())?,
            // Started under `nohup`: a closed terminal must not end it.
            if sighup_ignored() {
                None
            } else {
                Some(catch(SignalKind::hangup())?)
            },
        )
    };
    let lock = MountLock::take(&cfg.mountpoint)?;
    // Checked again under the lock: a mount started at the same moment
    // may have won.
    check_mountpoint(&cfg.mountpoint)?;
    let session = fuser::Session::new(fs, &cfg.mountpoint, &fc).map_err(MountError::Fuse)?;
    drop(lock);
    let _ = notifier.set(session.notifier());
    let bg = session.spawn().map_err(MountError::Fuse)?;
    info!(mountpoint = %cfg.mountpoint.display(), "mounted");
    raise_readahead(&cfg.mountpoint);
    // Kept until this function returns: its end closing tells the
    // watchdog the daemon is gone.
    let ours = mountinfo::at(&cfg.mountpoint).filter(|e| e.is_provenafs());
    let own_id = ours.as_ref().map(|e| e.id);
    let _watchdog = match &ours {
        Some(entry) => match spawn_watchdog(entry, cfg.log_file.as_deref()) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!("cannot start the watchdog (a killed daemon would leave a stale mount): {e}");
                None
            }
        },
        None => None,
    };
    let _status = status_server(stats, s3_counters, own_id, cfg, rt);
    signal_ready(cfg.logs_to_file);

    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        // Not `bg.join()`: dropping fuser 0.18's mount handle unmounts the
        // mountpoint *path* again (its liveness check reads the dead
        // connection's POLLERR as "still mounted"), and by then a new mount
        // may sit there: `provenafs unmount` followed at once by a new
        // `mount` lost the new one. The session has ended when its thread
        // has; the handle is then forgotten, never dropped.
        while !bg.guard.is_finished() {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::mem::forget(bg);
        let _ = tx2.send("unmounted");
    });
    let stats = stats.clone();
    let foreground = !is_detached_child();
    let announce = cfg.announce && std::io::stderr().is_terminal();
    if announce {
        eprintln!(
            "provenafs: mounted at {} (Ctrl-C unmounts)",
            cfg.mountpoint.display()
        );
    }
    rt.spawn(async move {
        let why = loop {
            tokio::select! {
                _ = int.recv() => break "SIGINT",
                _ = term.recv() => break "SIGTERM",
                // A closed terminal: the mount goes with it, cleanly.
                _ = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if foreground {
                        break "SIGHUP";
                    }
                    info!("SIGHUP ignored: a background mount runs until `provenafs unmount`");
                }
                // `kill -USR1 PID`: what the mount holds, in the log (at
                // the default level too: the operator asked for it).
                _ = usr1.recv() => warn!("stats: {}", stats.line()),
            }
        };
        let _ = tx.send(why);
    });
    let why = rx.recv().unwrap_or("unmounted");
    if why != "unmounted" {
        info!(signal = why, "unmounting");
        // Only our own mount: as root, an unmount of the path would take
        // whatever was mounted over it since (and lazily, if busy).
        match mountinfo::at(&cfg.mountpoint) {
            Some(top) if Some(top.id) == own_id && top.is_provenafs() => {
                if let Err(e) = unmount(&cfg.mountpoint) {
                    warn!("{e}");
                }
            }
            Some(top) => warn!(
                fstype = %top.fstype,
                "another mount now covers {}; not unmounting it",
                cfg.mountpoint.display()
            ),
            None => {}
        }
        // Give the session a moment to see the unmount and end cleanly.
        let _ = rx.recv_timeout(Duration::from_secs(3));
    }
    info!("unmounted");
    if announce {
        eprintln!("provenafs: unmounted {}", cfg.mountpoint.display());
    }
    Ok(())
}

/// The file the mount's read manifest goes to, beside its log (see
/// [`crate::provenance::manifest_path`]), so a batch job can keep it with
/// its outputs. `None` (said in the log) without a state folder.
/// The mount's manifest file. Errors: something not ours is already at
/// its path, or its folder does not answer (the mount fails: a job must
/// not run without its record, or with someone else's).
fn manifest_file(
    manifest: &Arc<crate::provenance::Manifest>,
    cfg: &MountConfig,
) -> Result<Option<Arc<ManifestFile>>, MountError> {
    let path = crate::provenance::manifest_path(cfg.log_file.as_deref(), &cfg.mountpoint);
    let Some(path) = path else {
        warn!("no state folder (set HOME or XDG_STATE_HOME): the read manifest is not written");
        return Ok(None);
    };
    let stall = crate::retry::stall_timeout(cfg.read.request_timeout);
    ManifestFile::new(manifest.clone(), path, stall)
        .map(|f| Some(Arc::new(f)))
        .map_err(MountError::Other)
}

/// Whether SIGHUP was ignored when this process started (`nohup`).
fn sighup_ignored() -> bool {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    // Asking means setting: set "ignore", look at the old, put it back.
    let probe = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: swaps SIGHUP's disposition and puts the old one back at
    // once; nothing has installed a handler for it yet.
    unsafe {
        match sigaction(Signal::SIGHUP, &probe) {
            Ok(old) => {
                let _ = sigaction(Signal::SIGHUP, &old);
                matches!(old.handler(), SigHandler::SigIgn)
            }
            Err(_) => false,
        }
    }
}

/// Answers `provenafs status` for this mount (see [`crate::status`]);
/// None (with a warning) when the socket cannot be made.
fn status_server(
    stats: &MountStats,
    s3: Arc<crate::s3::aws::S3Counters>,
    mount_id: Option<u64>,
    cfg: &MountConfig,
    rt: &tokio::runtime::Runtime,
) -> Option<crate::status::Server> {
    use std::sync::atomic::Ordering;
    let path = match crate::logfile::socket_path(&cfg.mountpoint) {
        Some(p) => p,
        None => {
            warn!("no state folder (set HOME or XDG_STATE_HOME): `provenafs status` will not see this mount");
            return None;
        }
    };
    let manifest = stats.manifest().clone();
    let stats = stats.clone();
    let started = std::time::Instant::now();
    let mountpoint = cfg.mountpoint.clone();
    let log_file = cfg.log_file.clone();
    let pid = std::process::id();
    let figures = move || {
        let (hits, misses) = stats.cache_hits_misses();
        crate::status::Figures {
            mountpoint: mountpoint.clone(),
            mount_id,
            state: "answering".into(),
            owner_uid: None,
            pid: Some(pid),
            log_file: log_file.clone(),
            datasets: Some(stats.datasets() as u64),
            bytes_read: Some(stats.bytes_read()),
            s3_bytes: Some(s3.bytes.load(Ordering::Relaxed)),
            s3_requests: Some(s3.requests.load(Ordering::Relaxed)),
            cache_hits: Some(hits),
            cache_misses: Some(misses),
            errors: Some(stats.errors().count()),
            last_error: stats.errors().last().map(|(at, e)| {
                let at: chrono::DateTime<chrono::Utc> = at.into();
                format!("{} {e}", at.format("%Y-%m-%dT%H:%M:%SZ"))
            }),
            uptime_s: Some(started.elapsed().as_secs()),
            folders: crate::folder::all_health(),
        }
    };
    let provenance = move |f: &crate::provenance::Filter| manifest.snapshot(f);
    let stall = crate::retry::stall_timeout(cfg.read.request_timeout);
    match crate::status::serve(path, figures, provenance, rt.handle(), stall) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("`provenafs status` will not see this mount: {e}");
            None
        }
    }
}
