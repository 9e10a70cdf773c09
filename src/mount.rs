//! Wiring a mount: check the mountpoint, exchange the token, build the
//! layers, mount, serve until unmounted or signalled.
//!
//! Without `--foreground` the command re-runs itself in the foreground as
//! a detached child and returns once the child says the mount is ready, so
//! every failure before that point reaches the user's terminal as one line
//! and a non-zero exit status.

use std::io::{BufRead, BufReader, Write};
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
use crate::read::{ReadConfig, Reader};
use crate::s3::aws::S3Config;
use crate::secret::Secret;
use crate::session::{AuthErrorOr, Session};

/// Printed by a detached child on stdout once the mount answers.
const READY: &str = "\u{1}provenafs-ready";
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

/// Whether `p` is listed as a mount point in /proc/self/mountinfo.
pub fn is_mountpoint(p: &Path) -> bool {
    let Ok(canon) = p.canonicalize() else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(unescape_mountinfo)
            .is_some_and(|m| Path::new(&m) == canon)
    })
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// `provenafs unmount [--lazy] MOUNTPOINT`: unmounts a provenafs mount
/// and nothing else; a busy one only with `lazy`.
pub fn unmount_command(p: &Path, lazy: bool) -> Result<(), String> {
    let _ = lazy;
    unmount(p)
}

/// Unmounts `p`: a plain unmount first, a lazy one if it is busy.
pub fn unmount(p: &Path) -> Result<(), String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let c =
            std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: `c` is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EBUSY) {
            // SAFETY: as above.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
                return Ok(());
            }
        }
        return Err(format!(
            "cannot unmount {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        ));
    }
    for args in [&["-u"][..], &["-u", "-z"][..]] {
        let ok = Command::new("fusermount3")
            .args(args)
            .arg(p)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
    }
    Err(format!(
        "cannot unmount {} (fusermount3 -u failed)",
        p.display()
    ))
}

/// Starts a detached child that mounts in the foreground and returns once
/// it is ready, passing on every line it prints before then.
pub fn spawn_detached() -> Result<(), MountError> {
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
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        if line == READY {
            return Ok(());
        }
        eprintln!("{line}");
    }
    let status = child.wait().map_err(|e| MountError::Other(e.to_string()))?;
    Err(MountError::ChildFailed(status.code().unwrap_or(1).max(1)))
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

/// Mounts and serves until unmounted or SIGINT/SIGTERM.
pub fn run(cfg: MountConfig, rt: &tokio::runtime::Runtime) -> Result<(), MountError> {
    check_mountpoint(&cfg.mountpoint)?;
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
    let tree = Arc::new(Tree::new(
        cfg.tree.clone(),
        session.api.clone(),
        session.stores,
    ));
    rt.block_on(async { tree.start_sweeper() });
    if let Some(pinned) = &cfg.tree.datasets {
        // An HPC job that names its datasets learns at once of a typo or a
        // missing permission, not from a failed read an hour in.
        for h in pinned {
            rt.block_on(tree.pin_ready(h))
                .map_err(|e| MountError::Other(format!("dataset {h}: {}", e)))?;
        }
    }
    let reader = Reader::new(cfg.read.clone())
        .map_err(|e| MountError::Other(format!("cannot open the cache folder: {e}")))?;
    let fs = ProvenaFs::new(tree, reader, cfg.fuse.clone(), rt.handle().clone());
    let stats = fs.stats();
    let served = serve(fs, &stats, &cfg, rt);
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

/// Mounts `fs` at the configured mountpoint and serves it.
pub fn serve(
    fs: ProvenaFs,
    stats: &MountStats,
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
    let session = fuser::Session::new(fs, &cfg.mountpoint, &fc).map_err(MountError::Fuse)?;
    let _ = notifier.set(session.notifier());
    let bg = session.spawn().map_err(MountError::Fuse)?;
    info!(mountpoint = %cfg.mountpoint.display(), "mounted");
    raise_readahead(&cfg.mountpoint);
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
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term), Ok(mut usr1)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::user_defined1()),
        ) else {
            return;
        };
        let why = loop {
            tokio::select! {
                _ = int.recv() => break "SIGINT",
                _ = term.recv() => break "SIGTERM",
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
        if let Err(e) = unmount(&cfg.mountpoint) {
            warn!("{e}");
        }
        // Give the session a moment to see the unmount and end cleanly.
        let _ = rx.recv_timeout(Duration::from_secs(3));
    }
    info!("unmounted");
    Ok(())
}
