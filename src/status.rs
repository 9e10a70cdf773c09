//! `provenafs status`: the provenafs mounts of this machine and, for the
//! caller's own, the live figures their daemons answer on a Unix socket.
//!
//! Each daemon listens on [`crate::logfile::socket_path`] of its
//! mountpoint (in its user's state folder, 0700; the socket 0600), and
//! answers every connection with one JSON object ([`Figures`]) and closes.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::mountinfo::{self, MountEntry};
use crate::provenance::{Filter, Snapshot};

/// One mount as `status --json` prints it. The figures are `null` for a
/// mount whose daemon did not answer (another user's, or a dead one).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Figures {
    pub mountpoint: PathBuf,
    /// The kernel's ID of the mount (`/proc/self/mountinfo`).
    pub mount_id: Option<u64>,
    /// `answering`; `not yours` (another user's mount); `not answering`
    /// (its daemon is stuck or ending); `no status socket` (started with
    /// another `XDG_STATE_HOME`, or by an older provenafs).
    pub state: String,
    /// UID that mounted it, from the mount table.
    pub owner_uid: Option<u32>,
    pub pid: Option<u32>,
    pub log_file: Option<PathBuf>,
    /// Datasets whose folders were resolved.
    pub datasets: Option<u64>,
    /// Bytes returned to readers.
    pub bytes_read: Option<u64>,
    /// Object bytes fetched from S3.
    pub s3_bytes: Option<u64>,
    /// S3 requests sent (retries included).
    pub s3_requests: Option<u64>,
    /// Blocks found in the memory or disk cache.
    pub cache_hits: Option<u64>,
    /// Blocks fetched from S3.
    pub cache_misses: Option<u64>,
    /// Errors answered to readers (EACCES, EIO, ETIMEDOUT...).
    pub errors: Option<u64>,
    /// The last of them, with its time and cause.
    pub last_error: Option<String>,
    pub uptime_s: Option<u64>,
    /// The folders the mount writes to that may stall or be shared (cache,
    /// credentials, log, state), each `answering` or `not answering`
    /// (since when, and what the mount does meanwhile). Absent from an
    /// older daemon's answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub folders: Vec<crate::folder::FolderHealth>,
}

/// Answers `provenafs status` for one mount while it lives; removes the
/// socket when dropped.
pub struct Server {
    path: PathBuf,
    /// Device and inode of our socket file: a newer mount at the same
    /// mountpoint may have replaced it, and its file is not ours to remove.
    id: Option<(u64, u64)>,
}

fn file_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for Server {
    /// Removes the socket, on a thread of its own: a state folder that
    /// does not answer (an NFS home) must not hold the daemon's exit.
    fn drop(&mut self) {
        let (path, id) = (self.path.clone(), self.id);
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("provenafs-fs".into())
            .spawn(move || {
                if id.is_some() && file_id(&path) == id {
                    let _ = std::fs::remove_file(&path);
                }
                let _ = tx.send(());
            });
        if spawned.is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
    }
}

/// What a client asks a daemon: one JSON line, then it reads the answer
/// (one JSON object) to the end. A client that sends nothing (an older
/// `provenafs status`) gets the figures after [`ASK_WAIT`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Ask {
    /// The [`Figures`].
    Status,
    /// The read manifest ([`crate::provenance::Snapshot`]) of the readers
    /// the filter keeps.
    Provenance(Filter),
}

/// Questions a daemon answers at once; others wait their turn.
const ANSWERS_AT_ONCE: usize = 4;

/// How long a daemon waits for a client's question.
const ASK_WAIT: Duration = Duration::from_millis(300);

/// Listens at `path` (see the module doc) on `rt`, answering with
/// `figures()` or `provenance(filter)`. A socket already there belongs to
/// an earlier mount at the same mountpoint (one that died, or one just
/// unmounted whose daemon is still ending: only one mount can be there at
/// a time) and is replaced. Errors: the socket cannot be made.
pub fn serve(
    path: PathBuf,
    figures: impl Fn() -> Figures + Send + Sync + 'static,
    provenance: impl Fn(&Filter) -> Snapshot + Send + Sync + 'static,
    rt: &tokio::runtime::Handle,
    stall: Duration,
) -> Result<Server, String> {
    use std::os::unix::fs::PermissionsExt;
    // The state folder is often an NFS home: made, bound and set through
    // a folder call, given up after the stall timeout (see
    // crate::folder): a mount without its status socket, never one that
    // does not start.
    let folder = crate::folder::Folder::new(
        "state folder",
        path.parent().unwrap_or(Path::new("/")),
        "`provenafs status` does not see this mount",
        stall,
        2,
    );
    let p = path.clone();
    let (std_listener, id) = folder
        .run_blocking("make the status socket", move || {
            if let Some(dir) = p.parent() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)?;
            }
            let _ = std::fs::remove_file(&p);
            let l = std::os::unix::net::UnixListener::bind(&p)?;
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
            Ok((l, file_id(&p)))
        })
        .map_err(|e| format!("cannot listen at {}: {e}", path.display()))?;
    let server = Server {
        id,
        path: path.clone(),
    };
    std_listener
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let _guard = rt.enter();
    let listener = tokio::net::UnixListener::from_std(std_listener).map_err(|e| e.to_string())?;
    let answer = std::sync::Arc::new(move |ask: Ask| -> Vec<u8> {
        let mut body = match ask {
            Ask::Status => serde_json::to_vec(&figures()),
            Ask::Provenance(f) => serde_json::to_vec(&provenance(&f)),
        }
        .unwrap_or_default();
        body.push(b'\n');
        body
    });
    // Questions answered at once, most: each answer is built and held in
    // full until sent (a large manifest is many MiB).
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(ANSWERS_AT_ONCE));
    rt.spawn(async move {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "status socket failed; `provenafs status` will not see this mount");
                    return;
                }
            };
            let (answer, slots) = (answer.clone(), slots.clone());
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                // One line of at most 64 KiB.
                let mut line = String::new();
                let mut read = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, 64 * 1024));
                let asked = tokio::time::timeout(ASK_WAIT, read.read_line(&mut line)).await;
                let ask = match asked {
                    Ok(Ok(n)) if n > 0 => serde_json::from_str(line.trim()).unwrap_or(Ask::Status),
                    _ => Ask::Status,
                };
                let provenance = matches!(ask, Ask::Provenance(_));
                let Ok(_slot) = slots.acquire_owned().await else {
                    return;
                };
                // Off the runtime's threads: a large manifest takes a while.
                let body = tokio::task::spawn_blocking(move || answer(ask))
                    .await
                    .unwrap_or_default();
                let sent = tokio::time::timeout(Duration::from_secs(30), write.write_all(&body)).await;
                debug!(ok = matches!(sent, Ok(Ok(()))), provenance, "status socket answered");
            });
        }
    });
    Ok(server)
}

/// What asking a mount's daemon gave.
enum Asked {
    Answer(Box<Figures>),
    /// No socket of ours for it: another user's mount, one started with
    /// another state folder, or by an older provenafs.
    NoSocket,
    /// A socket, but no answer within 2 s (a stuck or ending daemon).
    Silent,
}

/// Asks the daemon of `entry` for its figures, 2 s at most, whatever it
/// does: a wedged daemon's full accept queue blocks even the connect, so
/// the asking runs on a thread of its own.
fn ask(entry: &MountEntry) -> Asked {
    let (tx, rx) = std::sync::mpsc::channel();
    let e = entry.clone();
    std::thread::spawn(move || {
        let _ = tx.send(ask_blocking(&e));
    });
    rx.recv_timeout(Duration::from_secs(2))
        .unwrap_or(Asked::Silent)
}

fn ask_blocking(entry: &MountEntry) -> Asked {
    let Some(path) = crate::logfile::socket_path(&entry.mountpoint) else {
        return Asked::NoSocket;
    };
    let mut s = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(_) if !path.exists() => return Asked::NoSocket,
        Err(_) => return Asked::Silent,
    };
    let read = s
        .set_read_timeout(Some(Duration::from_secs(2)))
        .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(2))))
        .and_then(|()| {
            // A daemon of an older provenafs answers without reading the
            // question: its failure to arrive is no failure.
            let _ = send(&mut s, &Ask::Status);
            read_answer(&mut s, 1 << 20)
        });
    let text = read.as_deref().unwrap_or_default();
    // Figures of another mount that was at this path (one lazily
    // detached, still serving its last readers) are not this one's.
    match (&read, serde_json::from_str::<Figures>(text)) {
        // A socket of the same name may belong to a mount elsewhere.
        (Ok(_), Ok(f)) if f.mountpoint == entry.mountpoint && f.mount_id == Some(entry.id) => {
            Asked::Answer(Box::new(f))
        }
        (Ok(_), Ok(_)) => Asked::NoSocket,
        _ => Asked::Silent,
    }
}

/// The daemon's answer, to its end (at most `limit` bytes). A daemon that
/// closes without reading the question (an older provenafs) makes Linux
/// reset the connection after its answer: with an answer in hand, that is
/// its end.
fn read_answer(s: &mut std::os::unix::net::UnixStream, limit: usize) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > limit {
                    return Err(std::io::Error::other("answer too long"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !buf.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(buf).map_err(std::io::Error::other)
}

/// Writes `ask` as one line.
fn send(s: &mut std::os::unix::net::UnixStream, ask: &Ask) -> std::io::Result<()> {
    use std::io::Write;
    let mut line = serde_json::to_vec(ask).map_err(std::io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)
}

/// The read manifest of the mount at `mountpoint`, from its daemon, of the
/// readers `filter` keeps.
///
/// Errors: not a provenafs mount; not one of this user's (its daemon
/// answers its owner only); a daemon that does not answer in 30 s or
/// answers something else (an older provenafs).
pub fn ask_provenance(mountpoint: &Path, filter: &Filter) -> Result<Snapshot, String> {
    let entry = mountinfo::at(mountpoint)
        .filter(MountEntry::is_provenafs)
        .ok_or_else(|| format!("{} is not a provenafs mount", mountpoint.display()))?;
    let path = crate::logfile::socket_path(&entry.mountpoint)
        .ok_or("no state folder (set HOME or XDG_STATE_HOME)")?;
    let not_yours = || {
        // SAFETY: getuid cannot fail.
        let me = unsafe { libc::getuid() };
        entry.user_id().is_some_and(|u| u != me)
    };
    // On a thread of its own, bounded: a wedged daemon's full accept
    // queue blocks even the connect (a job's cleanup must go on).
    let (tx, rx) = std::sync::mpsc::channel();
    let (p, ask) = (path.clone(), Ask::Provenance(filter.clone()));
    std::thread::spawn(move || {
        let r = std::os::unix::net::UnixStream::connect(&p).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.set_write_timeout(Some(Duration::from_secs(5)))?;
            let _ = send(&mut s, &ask);
            read_answer(&mut s, 1 << 30)
        });
        let _ = tx.send(r);
    });
    let shown = entry.mountpoint.display();
    let text = match rx.recv_timeout(Duration::from_secs(40)) {
        Ok(Ok(t)) => t,
        Ok(Err(_)) if not_yours() => {
            return Err(format!(
                "{shown} is another user's mount: only its owner can ask what was read"
            ))
        }
        Ok(Err(e)) => return Err(format!("the daemon of {shown} did not answer: {e}")),
        Err(_) => return Err(format!("the daemon of {shown} did not answer within 40 s")),
    };
    let snap: Snapshot = serde_json::from_str(&text).map_err(|_| {
        format!(
            "the daemon of {} does not keep a read manifest (started by an older provenafs?)",
            entry.mountpoint.display()
        )
    })?;
    if snap.mountpoint != entry.mountpoint.to_string_lossy() {
        return Err(format!("{} is another mount's socket", path.display()));
    }
    Ok(snap)
}

/// The PID of the daemon serving `entry`, if it answers within 2 s.
pub fn daemon_pid(entry: &MountEntry) -> Option<u32> {
    match ask(entry) {
        Asked::Answer(f) => f.pid,
        _ => None,
    }
}

/// Runs `provenafs status [MOUNTPOINT] [--json]`; returns what to print.
///
/// Errors: a MOUNTPOINT that is not a provenafs mount.
pub fn run(mountpoint: Option<&Path>, json: bool) -> Result<String, String> {
    let mut mounts: Vec<MountEntry> = mountinfo::read()
        .into_iter()
        .filter(MountEntry::is_provenafs)
        .collect();
    if let Some(mp) = mountpoint {
        let want = mountinfo::at(mp).map(|e| e.mountpoint);
        mounts.retain(|m| Some(&m.mountpoint) == want.as_ref());
        if mounts.is_empty() {
            return Err(format!("{} is not a provenafs mount", mp.display()));
        }
    }
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    let rows: Vec<Figures> = mounts
        .iter()
        .map(|m| {
            let state = match ask(m) {
                Asked::Answer(mut f) => {
                    f.state = "answering".into();
                    f.owner_uid = m.user_id();
                    return *f;
                }
                _ if m.user_id().is_some_and(|u| u != me) => "not yours",
                Asked::Silent => "not answering",
                Asked::NoSocket => "no status socket",
            };
            Figures {
                mountpoint: m.mountpoint.clone(),
                state: state.into(),
                owner_uid: m.user_id(),
                ..Figures::default()
            }
        })
        .collect();
    if json {
        let mut s = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
        s.push('\n');
        return Ok(s);
    }
    Ok(table(&rows))
}

/// The plain form: one row a mount, then its last error and log.
fn table(rows: &[Figures]) -> String {
    if rows.is_empty() {
        return "No provenafs mounts.\n".into();
    }
    let num = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
    let size = |v: Option<u64>| v.map_or("-".to_string(), human);
    let mut lines = vec![[
        "MOUNTPOINT".to_string(),
        "STATE".into(),
        "PID".into(),
        "UPTIME".into(),
        "DATASETS".into(),
        "READ".into(),
        "FROM S3".into(),
        "REQUESTS".into(),
        "HITS".into(),
        "MISSES".into(),
        "ERRORS".into(),
    ]];
    for r in rows {
        lines.push([
            r.mountpoint.display().to_string(),
            r.state.clone(),
            r.pid.map_or("-".into(), |p| p.to_string()),
            r.uptime_s.map_or("-".into(), uptime),
            num(r.datasets),
            size(r.bytes_read),
            size(r.s3_bytes),
            num(r.s3_requests),
            num(r.cache_hits),
            num(r.cache_misses),
            num(r.errors),
        ]);
    }
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (n, l) in lines.iter().enumerate() {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if n == 0 {
            continue;
        }
        let r = &rows[n - 1];
        if let Some(e) = &r.last_error {
            out.push_str(&format!("  last error: {e}\n"));
        }
        for f in r.folders.iter().filter(|f| f.note.is_some()) {
            out.push_str(&format!(
                "  {} {}: {}\n",
                f.what,
                f.path.display(),
                f.note.as_deref().unwrap_or("")
            ));
        }
        for f in r.folders.iter().filter(|f| f.state != "answering") {
            let since = f
                .since
                .map(|t| format!(" since {}", t.format("%Y-%m-%dT%H:%M:%SZ")))
                .unwrap_or_default();
            let meanwhile = f.meanwhile.as_deref().unwrap_or("");
            out.push_str(&format!(
                "  {} {}: {}{since}; {meanwhile}\n",
                f.what,
                f.path.display(),
                f.state
            ));
        }
        if let Some(p) = &r.log_file {
            out.push_str(&format!("  log: {}\n", p.display()));
        }
    }
    out
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn uptime(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_reads_at_a_glance() {
        let rows = vec![
            Figures {
                mountpoint: "/data/p".into(),
                state: "answering".into(),
                pid: Some(42),
                uptime_s: Some(3725),
                datasets: Some(2),
                bytes_read: Some(3 << 30),
                s3_bytes: Some(1536),
                s3_requests: Some(7),
                cache_hits: Some(10),
                cache_misses: Some(3),
                errors: Some(1),
                last_error: Some("read: permission denied".into()),
                log_file: Some("/root/.local/state/provenafs/data-p.log".into()),
                ..Figures::default()
            },
            Figures {
                mountpoint: "/other".into(),
                state: "not yours".into(),
                ..Figures::default()
            },
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("MOUNTPOINT  STATE"), "{t}");
        assert!(
            lines[1].contains("1h02m")
                && lines[1].contains("3.0 GiB")
                && lines[1].contains("1.5 KiB"),
            "{t}"
        );
        assert_eq!(lines[2], "  last error: read: permission denied");
        assert!(lines[3].ends_with("data-p.log"));
        assert!(
            lines[4].starts_with("/other ") && lines[4].contains("not yours"),
            "{t}"
        );
    }

    #[test]
    fn an_older_daemon_that_answers_without_reading_is_still_heard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            // The question has arrived, unread, when the answer goes.
            std::thread::sleep(Duration::from_millis(100));
            use std::io::Write;
            c.write_all(b"{\"answer\":1}\n").unwrap();
        });
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        send(&mut s, &Ask::Status).unwrap();
        server.join().unwrap();
        assert_eq!(read_answer(&mut s, 1 << 20).unwrap(), "{\"answer\":1}\n");
    }
}
