//! Where a background mount keeps its log and its status socket, a log
//! file bounded in size, and a log writer that never blocks the thread
//! that logs ([`non_blocking`]).
//!
//! Both live in the user's state folder, named after the mountpoint the
//! way `systemd-escape --path` names it (`/data/provena` →
//! `data-provena`): `$XDG_STATE_HOME/provenafs/data-provena.log` (that is
//! `~/.local/state/provenafs/…`) and `…/data-provena.sock`.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A log file is rotated once it passes this many bytes…
pub const MAX_BYTES: usize = 10 << 20;
/// …and this many rotated files (`NAME.log.1` newest) are kept beside it.
pub const KEPT: usize = 3;

/// `$XDG_STATE_HOME/provenafs`. None when no home folder is known.
pub fn state_dir() -> Option<PathBuf> {
    let base = directories::BaseDirs::new()?;
    let dir = base
        .state_dir()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| base.home_dir().join(".local/state"));
    Some(dir.join("provenafs"))
}

/// The mountpoint as a file name, as `systemd-escape --path` writes it:
/// `/` between folders becomes `-`; bytes other than letters, digits,
/// `_`, `.` and `:` (and a leading `.`) become `\xNN`. `/` alone is `-`.
pub fn mount_name(mountpoint: &Path) -> String {
    let s = mountpoint.as_os_str().as_encoded_bytes();
    let trimmed: Vec<&[u8]> = s.split(|b| *b == b'/').filter(|c| !c.is_empty()).collect();
    if trimmed.is_empty() {
        return "-".into();
    }
    let mut out = String::new();
    for (i, comp) in trimmed.iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        for (j, b) in comp.iter().enumerate() {
            let keep = b.is_ascii_alphanumeric()
                || matches!(b, b'_' | b':')
                || (*b == b'.' && (i, j) != (0, 0));
            if keep {
                out.push(*b as char);
            } else {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
    }
    // File names stop at 255 bytes: a very deep mountpoint is shortened,
    // kept apart from others by a hash of the whole.
    if out.len() > 120 {
        use sha2::Digest;
        let h = hex::encode(&sha2::Sha256::digest(out.as_bytes())[..8]);
        let mut cut = 100;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out = format!("{}-{h}", &out[..cut]);
    }
    out
}

/// The default log of a background mount at `mountpoint` (see the module
/// doc). None when no home folder is known.
pub fn default_path(mountpoint: &Path) -> Option<PathBuf> {
    Some(state_dir()?.join(format!("{}.log", mount_name(mountpoint))))
}

/// Where the daemon of the mount at `mountpoint` answers `provenafs
/// status`. A Unix socket path has room for 107 bytes only: a longer one
/// is named by a hash.
pub fn socket_path(mountpoint: &Path) -> Option<PathBuf> {
    let dir = state_dir()?;
    let p = dir.join(format!("{}.sock", mount_name(mountpoint)));
    if p.as_os_str().len() < 100 {
        return Some(p);
    }
    use sha2::Digest;
    let h = hex::encode(&sha2::Sha256::digest(mount_name(mountpoint).as_bytes())[..8]);
    Some(dir.join(format!("{h}.sock")))
}

/// A log file opened for appending, created 0600, rotated past
/// [`MAX_BYTES`] with [`KEPT`] old files. Errors: the file cannot be
/// opened or created (its folder must exist), or is not a file of this
/// user's (a symlink, a FIFO, a file another user made first at a name
/// they could guess in a shared folder such as `/tmp`: what we log is
/// never written into a neighbour's file).
pub fn open(path: &Path) -> Result<Box<dyn Write + Send>, String> {
    use std::os::unix::fs::MetadataExt;
    let f =
        open_append(path).map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
    let md = f
        .metadata()
        .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
    // A device (`/dev/null`) is nobody's file to read back; anything else
    // must be a file of this user's.
    use std::os::unix::fs::FileTypeExt;
    let device = md.file_type().is_char_device();
    if !device && (!md.is_file() || md.uid() != nix::unistd::geteuid().as_raw()) {
        return Err(format!(
            "log file {} is not a file of yours (owner uid {}); choose another --log-file",
            path.display(),
            md.uid()
        ));
    }
    // A log in our own state folder is ours alone, whatever mode an older
    // version left it with.
    if path
        .parent()
        .is_some_and(|p| Some(p) == state_dir().as_deref())
    {
        let _ = f.set_permissions(std::fs::Permissions::from_mode(0o600));
    }
    Ok(Box::new(Rotating {
        path: path.to_path_buf(),
        written: md.len(),
        // Never a device: renaming /dev/null away is not rotating a log.
        rotates: md.is_file(),
        file: f,
    }))
}

/// [`open`], given up after `stall` (a log folder on an NFS home that
/// hangs must not hang the mount's start: see [`crate::folder`]).
pub fn open_within(
    path: &Path,
    stall: std::time::Duration,
) -> Result<Box<dyn Write + Send>, String> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let folder = crate::folder::Folder::new("log folder", dir, "not logging", stall, 1);
    let p = path.to_path_buf();
    match folder.run_blocking("open the log", move || {
        open(&p).map_err(std::io::Error::other)
    }) {
        Ok(w) => Ok(w),
        Err(crate::folder::FolderError::Io(e)) => Err(e.to_string()),
        Err(e) => Err(format!(
            "cannot open log file {}: its folder is {e} (within {stall:?})",
            path.display()
        )),
    }
}

/// `path` opened for appending, created 0600, never through a symlink.
fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// A log file rotated past [`MAX_BYTES`]: `NAME.log` becomes `NAME.log.1`,
/// `.1` becomes `.2`, ..., and the oldest past [`KEPT`] goes. Our own, not
/// the `file-rotate` crate, which stats every entry of the log's folder
/// (at start and each rotation) to find its files: on an NFS home that is
/// one metadata call per file there, a hung mount point in the folder hung
/// the mount's start, and an unreadable folder panicked.
struct Rotating {
    path: PathBuf,
    file: std::fs::File,
    /// Bytes in the current file.
    written: u64,
    /// A regular file (rotated); not a device such as `/dev/null`.
    rotates: bool,
}

impl Rotating {
    /// `NAME.log.N` (`.0`: the current file while it is being rotated).
    fn numbered(&self, n: usize) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    /// Rotates, or (the file cannot be renamed, or the new one made)
    /// stops trying and writes on: a failure must not shift the old files
    /// again at every line.
    fn rotate(&mut self) {
        if std::fs::rename(&self.path, self.numbered(0)).is_err() {
            self.rotates = false;
            return;
        }
        // The name is free now, and only a file made right now, ours, is
        // taken for the log (not one a neighbour made in between, in a
        // folder such as /tmp).
        match std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.path)
        {
            Ok(f) => {
                for n in (1..KEPT).rev() {
                    let _ = std::fs::rename(self.numbered(n), self.numbered(n + 1));
                }
                let _ = std::fs::rename(self.numbered(0), self.numbered(1));
                self.file = f;
                self.written = 0;
            }
            Err(_) => {
                // Write on into the file we have (named `.0` now).
                self.rotates = false;
            }
        }
    }
}

impl Write for Rotating {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.rotates && self.written >= MAX_BYTES as u64 {
            self.rotate();
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Lines a non-blocking log holds while its file does not take them;
/// past that, lines are dropped and counted.
const BUFFERED_LINES: usize = 4096;

/// Keeps the log's writer thread alive; dropped by [`finish`].
static GUARD: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
    std::sync::Mutex::new(None);

/// `w` behind a bounded queue and a writer thread of its own
/// (`provenafs-log`): whoever logs only queues the line, never waits for
/// the file system. When the folder does not take what is written (an NFS
/// home that hangs, a full quota), the queue fills and further lines are
/// dropped and counted; once a write that took longer than `stall`
/// returns, the log says for how long and how many lines were lost. With
/// `file` (the log's path), `provenafs status` shows the log folder as
/// not answering while a write is stuck (see [`crate::folder`]).
/// [`finish`] writes what is queued before the process ends.
pub fn non_blocking(
    w: Box<dyn Write + Send>,
    file: Option<&Path>,
    stall: std::time::Duration,
) -> tracing_appender::non_blocking::NonBlocking {
    let health = std::sync::Arc::new(LogHealth {
        path: file.map(Path::to_path_buf),
        stall,
        writing_since_ms: Default::default(),
        stalls: Default::default(),
        dropped: std::sync::OnceLock::new(),
    });
    let watched = Watched {
        inner: w,
        health: health.clone(),
        dropped_told: 0,
    };
    let (nb, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(BUFFERED_LINES)
        .lossy(true)
        .thread_name("provenafs-log")
        .finish(watched);
    let _ = health.dropped.set(nb.error_counter());
    if health.path.is_some() {
        let r: std::sync::Arc<dyn crate::folder::Reports> = health;
        crate::folder::register(&r);
        // Kept as long as the process: status asks it.
        std::mem::forget(r);
    }
    *GUARD.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard);
    nb
}

/// Writes what the log queue holds (waiting at most a second: a log
/// folder that does not answer must not hold the process's exit). A
/// writer stuck in a write is not waited for at all (its queue may be
/// full, and the writer's crate would then say so on standard output).
pub fn finish() {
    let guard = GUARD.lock().unwrap_or_else(|p| p.into_inner()).take();
    let stuck = crate::folder::all_health()
        .iter()
        .any(|h| h.what == "log folder" && h.state != "answering");
    if stuck {
        std::mem::forget(guard);
    } else {
        drop(guard);
    }
}

/// How the log's writer is doing (see [`non_blocking`]).
struct LogHealth {
    path: Option<PathBuf>,
    stall: std::time::Duration,
    /// When the write in progress started (ms since the epoch; 0: none).
    writing_since_ms: std::sync::atomic::AtomicU64,
    stalls: std::sync::atomic::AtomicU64,
    dropped: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl LogHealth {
    fn dropped(&self) -> u64 {
        self.dropped.get().map_or(0, |c| c.dropped_lines() as u64)
    }
}

impl crate::folder::Reports for LogHealth {
    fn health(&self) -> crate::folder::FolderHealth {
        use std::sync::atomic::Ordering;
        let since = self.writing_since_ms.load(Ordering::Relaxed);
        let stuck = since > 0 && now_ms().saturating_sub(since) > self.stall.as_millis() as u64;
        let folder = self
            .path
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        crate::folder::FolderHealth {
            what: "log folder".into(),
            path: folder,
            state: if stuck { "not answering" } else { "answering" }.into(),
            since: stuck.then(|| {
                chrono::DateTime::<chrono::Utc>::from(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(since),
                )
            }),
            stuck_call: stuck.then(|| "write a log line".into()),
            meanwhile: stuck.then(|| "log lines are dropped and counted".into()),
            note: None,
            stalls: self.stalls.load(Ordering::Relaxed),
            refused: self.dropped(),
        }
    }
}

/// The log's writer, as its thread runs it: notes when a write is in
/// progress, and says in the log when one took longer than the stall
/// timeout (and how many lines were dropped meanwhile).
struct Watched {
    inner: Box<dyn Write + Send>,
    health: std::sync::Arc<LogHealth>,
    /// Dropped lines already said.
    dropped_told: u64,
}

impl Write for Watched {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::sync::atomic::Ordering;
        let start = std::time::Instant::now();
        self.health
            .writing_since_ms
            .store(now_ms().max(1), Ordering::Relaxed);
        let r = self.inner.write(buf);
        self.health.writing_since_ms.store(0, Ordering::Relaxed);
        let took = start.elapsed();
        let dropped = self.health.dropped();
        if took > self.health.stall || dropped > self.dropped_told {
            if took > self.health.stall {
                self.health.stalls.fetch_add(1, Ordering::Relaxed);
            }
            let note = format!(
                "{}  WARN the log folder did not answer for {:.0?}; {} log lines were dropped \
                 meanwhile ({} since the mount started)\n",
                chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ"),
                took,
                dropped - self.dropped_told,
                dropped
            );
            self.dropped_told = dropped;
            let _ = self.inner.write_all(note.as_bytes());
        }
        r
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_like_systemd_escape() {
        assert_eq!(mount_name(Path::new("/data/provena")), "data-provena");
        assert_eq!(mount_name(Path::new("/data/provena/")), "data-provena");
        assert_eq!(mount_name(Path::new("/")), "-");
        assert_eq!(mount_name(Path::new("/mnt/my-lab")), "mnt-my\\x2dlab");
        assert_eq!(mount_name(Path::new("/mnt/a b")), "mnt-a\\x20b");
        assert_eq!(mount_name(Path::new("/.hidden/x.y")), "\\x2ehidden-x.y");
        let deep = format!("/{}", "verylongfolder/".repeat(40));
        let n = mount_name(Path::new(&deep));
        assert!(n.len() < 130, "{n}");
        assert_ne!(n, mount_name(Path::new(&format!("{deep}x"))));
    }

    #[test]
    fn log_rotates_and_stays_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.log");
        let mut w = open(&p).unwrap();
        let line = vec![b'x'; 1 << 20];
        for _ in 0..(MAX_BYTES >> 20) * (KEPT + 3) {
            w.write_all(&line).unwrap();
        }
        w.flush().unwrap();
        drop(w);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["m.log", "m.log.1", "m.log.2", "m.log.3"]);
        for n in names {
            let md = std::fs::metadata(dir.path().join(&n)).unwrap();
            assert_eq!(md.permissions().mode() & 0o777, 0o600, "{n}");
            assert!(md.len() <= (MAX_BYTES + (1 << 20)) as u64, "{n}");
        }
        assert!(open(&dir.path().join("no/such/dir/x.log")).is_err());
    }

    #[test]
    fn a_device_is_written_never_rotated_and_others_files_are_refused() {
        let mut w = open(Path::new("/dev/null")).unwrap();
        let line = vec![b'x'; 1 << 20];
        for _ in 0..(MAX_BYTES >> 20) + 2 {
            w.write_all(&line).unwrap();
        }
        assert!(Path::new("/dev/null").exists());
        assert!(!Path::new("/dev/null.1").exists());
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("l.log");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        assert!(open(&link).is_err(), "a symlink is not our log");
    }

    #[test]
    fn a_log_folder_that_does_not_take_lines_costs_dropped_lines_not_a_wait() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        /// A writer whose file system hangs until let go.
        struct Hung(Arc<AtomicBool>, Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Hung {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                while self.0.load(Ordering::SeqCst) {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                self.1.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let hung = Arc::new(AtomicBool::new(true));
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        let mut nb = non_blocking(
            Box::new(Hung(hung.clone(), got.clone())),
            Some(&path),
            std::time::Duration::from_millis(100),
        );
        let t = std::time::Instant::now();
        for i in 0..3 * BUFFERED_LINES {
            nb.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        let h = crate::folder::all_health()
            .into_iter()
            .find(|h| h.what == "log folder" && h.path == dir.path())
            .unwrap();
        assert_eq!(h.state, "not answering");
        assert!(h.refused > 0, "dropped lines are counted: {h:?}");
        hung.store(false, Ordering::SeqCst);
        let t = std::time::Instant::now();
        loop {
            let text = String::from_utf8_lossy(&got.lock().unwrap()).into_owned();
            if text.contains("the log folder did not answer for") {
                assert!(text.contains("log lines were dropped"), "{text}");
                break;
            }
            assert!(t.elapsed() < std::time::Duration::from_secs(5));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
