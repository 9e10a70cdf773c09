//! Leases (access tokens, dataset read credentials) shared by every
//! process of one user through a shared cache folder, so that N mounts of
//! a job array cause about one exchange and one credential call per
//! lifetime, not N.
//!
//! They live in `CACHE/creds-<uid>/`, a folder on a file system shared
//! with other users and nodes, so:
//!
//! - the folder is opened once, without following symlinks, and checked
//!   on its descriptor (a real folder, this user's, mode `0700`); every
//!   file in it is reached relative to that descriptor (`openat` with
//!   `O_NOFOLLOW`, `O_NONBLOCK` for anything that may be a FIFO, owner and
//!   mode checked on the open file), so a neighbour who renames the folder
//!   away and puts another in its place (a `--cache-group` folder is
//!   group-writable) never receives a secret: the daemon notices the
//!   swap, says so once, and keeps its leases to itself from then on;
//! - every call into it goes through its [`Folder`] (see
//!   [`crate::folder`]): off the async workers, bounded by the stall
//!   timeout; while the folder does not answer, the daemon gets its own
//!   leases, as if nothing were shared;
//! - files are `0600` whatever the cache's group settings (a member can
//!   read blocks, never these). Each lease is one JSON file replaced
//!   atomically (written to a temporary name, renamed); who refreshes it
//!   first holds `NAME.lock`, an exclusive-create file with its host, PID
//!   and deadline (as block claims do, see [`crate::read::cache::shared`]):
//!   no `flock` across nodes.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::folder::{Folder, FolderError};
use crate::retry::Deadline;

/// The per-user folder of shared leases. Clones share it.
#[derive(Clone)]
pub struct SharedLeases(Arc<Inner>);

struct Inner {
    /// `CACHE/creds-<uid>`, for messages and the check that it is still
    /// there.
    dir: PathBuf,
    /// The folder itself, opened once.
    fd: OwnedFd,
    /// Its inode, to tell it from a folder put in its place.
    ino: u64,
    uid: u32,
    folder: Folder,
    /// It was found moved or replaced: nothing is shared any more.
    moved: AtomicBool,
}

impl std::fmt::Debug for SharedLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLeases")
            .field("dir", &self.0.dir)
            .finish_non_exhaustive()
    }
}

/// One lease as stored: its value, and its life in wall-clock time.
#[derive(Serialize, Deserialize)]
pub struct Stored<T> {
    pub value: T,
    /// Issued and expiring, in milliseconds since the Unix epoch.
    pub issued_ms: u64,
    pub expires_ms: u64,
}

impl<T> Stored<T> {
    /// Life left, if at least a third of its whole life (the point where
    /// [`crate::lease`] renews): later, a fresh one is due anyway.
    pub fn usable_for(&self) -> Option<Duration> {
        let now = now_ms();
        let whole = self.expires_ms.saturating_sub(self.issued_ms);
        let left = self.expires_ms.saturating_sub(now);
        (left > whole / 3 && left > 0).then(|| Duration::from_millis(left))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Most bytes read of a lease or lock file: a planted file (a link to
/// `/dev/zero`, a huge file) costs no more.
const MAX_FILE: u64 = 64 * 1024;

/// Calls into the folder running at once (renewals are few).
const SLOTS: usize = 8;

/// Opens `name` in `dir` for reading as a regular file of `uid`, mode
/// `0600` or stricter: never a symlink, never blocking on a FIFO, never a
/// file someone else made. `None` when there is no such file.
fn open_ours(dir: &OwnedFd, name: &str, uid: u32) -> std::io::Result<Option<std::fs::File>> {
    let fd = match crate::read::cache::disk::open_untrusted(dir, name) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let st = fstat(&fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != uid || st.st_mode & 0o077 != 0 {
        return Err(std::io::Error::other("not a private file of this user"));
    }
    Ok(Some(std::fs::File::from(fd)))
}

/// The text of `file`, at most [`MAX_FILE`] bytes.
fn text_of(file: std::fs::File) -> std::io::Result<String> {
    let mut text = String::new();
    file.take(MAX_FILE).read_to_string(&mut text)?;
    Ok(text)
}

impl SharedLeases {
    /// The leases folder below `cache_dir`, created if missing, its calls
    /// bounded by `stall`. None (with one warning) when it is not this
    /// user's private folder, or does not answer: nothing is then shared,
    /// each process renews its own.
    pub fn open(cache_dir: &Path, stall: Duration) -> Option<SharedLeases> {
        let uid = nix::unistd::geteuid().as_raw();
        let dir = cache_dir.join(format!("creds-{uid}"));
        let folder = Folder::new(
            "credentials folder",
            &dir,
            "each mount renews its own access token and read credentials",
            stall,
            SLOTS,
        );
        let (top, name) = (cache_dir.to_path_buf(), format!("creds-{uid}"));
        let opened = folder.run_blocking("open the credentials folder", move || {
            let top = crate::read::cache::disk::open_folder(&top)?;
            match mkdirat(&top, name.as_str(), Mode::from_bits_truncate(0o700)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
            let fd = crate::read::cache::disk::open_dir_at(&top, name.as_str())?;
            let st = fstat(&fd)?;
            if st.st_uid != uid || st.st_mode & 0o077 != 0 {
                return Err(std::io::Error::other(format!(
                    "not a private folder of this user (owner uid {}, mode {:o})",
                    st.st_uid,
                    st.st_mode & 0o7777
                )));
            }
            crate::read::cache::disk::remove_stale(&fd, &[".tmp-", ".probe-"]);
            Ok((fd, st.st_ino))
        });
        match opened {
            Ok((fd, ino)) => {
                if let Ok(probe_fd) = fd.try_clone() {
                    folder.set_probe(move || crate::read::cache::disk::probe_by_a_file(&probe_fd));
                }
                Some(SharedLeases(Arc::new(Inner {
                    dir,
                    fd,
                    ino,
                    uid,
                    folder,
                    moved: AtomicBool::new(false),
                })))
            }
            Err(e) => {
                warn!(folder = %dir.display(), error = %e, "cannot use; tokens and credentials are not shared");
                None
            }
        }
    }

    /// Whether the folder is still there, at its name: a folder renamed
    /// away (and maybe replaced by another's) is no longer shared with
    /// anyone, so nothing more goes into it. Blocking: a call into the
    /// folder's parent.
    fn still_in_place(inner: &Inner) -> bool {
        if inner.moved.load(Ordering::Relaxed) {
            return false;
        }
        let here = std::fs::symlink_metadata(&inner.dir)
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == inner.ino);
        if !here && !inner.moved.swap(true, Ordering::Relaxed) {
            warn!(
                folder = %inner.dir.display(),
                "the credentials folder was moved or replaced (by another user of the cache \
                 folder?); tokens and credentials are no longer shared"
            );
        }
        here
    }

    /// The lease `name`, if one is stored, ours and usable. Errors: the
    /// folder did not answer (or no longer is where it was).
    async fn read<T>(
        &self,
        name: &str,
        deadline: Deadline,
    ) -> Result<Option<(Stored<T>, Duration)>, FolderError>
    where
        T: for<'de> Deserialize<'de> + Send + 'static,
    {
        let (inner, name) = (self.0.clone(), name.to_string());
        self.0
            .folder
            .run("read a lease", Some(deadline), move || {
                if !Self::still_in_place(&inner) {
                    return Err(std::io::Error::other("moved"));
                }
                // Anything but a private file of ours is no lease.
                let Ok(Some(f)) = open_ours(&inner.fd, &name, inner.uid) else {
                    return Ok(None);
                };
                let stored: Option<Stored<T>> =
                    text_of(f).ok().and_then(|t| serde_json::from_str(&t).ok());
                Ok(stored.and_then(|s| s.usable_for().map(|left| (s, left))))
            })
            .await
    }

    /// Takes the right to refresh `name` until `until`: `Ok(None)` when
    /// another live process holds it (a lock past its deadline, or whose
    /// owner on this host is gone, is taken over).
    async fn lock(
        &self,
        name: &str,
        until: SystemTime,
        deadline: Deadline,
    ) -> Result<Option<LeaseLock>, FolderError> {
        let (inner, lock) = (self.0.clone(), format!("{name}.lock"));
        let me = self.clone();
        self.0
            .folder
            .run("take a lease lock", Some(deadline), move || {
                let until_ms = until
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                let token = format!("{} {} {until_ms}\n", host(), std::process::id());
                for _ in 0..2 {
                    match openat(
                        &inner.fd,
                        lock.as_str(),
                        OFlag::O_WRONLY
                            | OFlag::O_CREAT
                            | OFlag::O_EXCL
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o600),
                    ) {
                        Ok(fd) => {
                            let _ = std::fs::File::from(fd).write_all(token.as_bytes());
                            return Ok(Some(LeaseLock {
                                leases: me,
                                name: lock,
                                token,
                            }));
                        }
                        Err(Errno::EEXIST) => {
                            // Not a private file of ours (a FIFO, a link, a
                            // neighbour's): not a lock of ours; removed.
                            let text = match open_ours(&inner.fd, &lock, inner.uid) {
                                Ok(Some(f)) => text_of(f).unwrap_or_default(),
                                Ok(None) => continue,
                                Err(_) => String::new(),
                            };
                            // A lock whose line is not whole yet is being
                            // taken right now (created, then written):
                            // live, unless it was left so long ago that its
                            // taker died.
                            let being_written = !text.ends_with('\n')
                                && fstatat(&inner.fd, lock.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                                    .is_ok_and(|st| {
                                        st.st_mode & libc::S_IFMT == libc::S_IFREG
                                            && (now_ms() / 1000).abs_diff(st.st_mtime.max(0) as u64)
                                                < LOCK_WRITE_GRACE.as_secs()
                                    });
                            if being_written || lock_live(&text) {
                                return Ok(None);
                            }
                            let _ = unlinkat(&inner.fd, lock.as_str(), UnlinkatFlags::NoRemoveDir);
                        }
                        // Cannot lock here: refresh without the lock.
                        Err(_) => {
                            return Ok(Some(LeaseLock {
                                leases: me,
                                name: lock,
                                token: String::new(),
                            }))
                        }
                    }
                }
                Ok(None)
            })
            .await
    }

    /// Stores `value`, valid for `lifetime` from now (replacing any
    /// older), then lets `lock` go: in the background, through the folder.
    fn store(
        &self,
        name: &str,
        value: serde_json::Value,
        lifetime: Duration,
        lock: Option<LeaseLock>,
    ) {
        let (inner, name) = (self.0.clone(), name.to_string());
        let _ = self.0.folder.spawn("store a lease", move || {
            if Self::still_in_place(&inner) {
                if let Err(e) = Self::write_now(&inner, &name, value, lifetime) {
                    debug!(name, error = %e, "cannot share a lease");
                }
            }
            // The lock goes after the lease is there (its drop makes one
            // more call into the folder, after this one).
            drop(lock);
        });
    }

    fn write_now(
        inner: &Inner,
        name: &str,
        value: serde_json::Value,
        lifetime: Duration,
    ) -> std::io::Result<()> {
        let now = now_ms();
        let stored = Stored {
            value,
            issued_ms: now,
            expires_ms: now + lifetime.as_millis() as u64,
        };
        let text = serde_json::to_vec(&stored).map_err(std::io::Error::other)?;
        let tmp = format!(".tmp-{}-{:x}", std::process::id(), rand::random::<u64>());
        let fd = openat(
            &inner.fd,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        let written = std::fs::File::from(fd)
            .write_all(&text)
            .and_then(|()| renameat(&inner.fd, tmp.as_str(), &inner.fd, name).map_err(Into::into));
        if written.is_err() {
            let _ = unlinkat(&inner.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        written
    }

    /// Removes the lease `name` if it holds the value a service just
    /// refused (`refused` says which), so no process is handed it again; a
    /// fresh one another process stored meanwhile stays. In the
    /// background, through the folder.
    pub fn forget_if(
        &self,
        name: &str,
        refused: impl Fn(&serde_json::Value) -> bool + Send + 'static,
    ) {
        let (inner, name) = (self.0.clone(), name.to_string());
        let _ = self.0.folder.spawn("forget a lease", move || {
            let Ok(Some(f)) = open_ours(&inner.fd, &name, inner.uid) else {
                return;
            };
            let Ok(ino) = fstat(&f).map(|st| st.st_ino) else {
                return;
            };
            let stored: Option<Stored<serde_json::Value>> =
                text_of(f).ok().and_then(|t| serde_json::from_str(&t).ok());
            if !stored.is_some_and(|s| refused(&s.value)) {
                return;
            }
            // Still that file (not one stored since): the window between
            // this look and the removal is a few microseconds; a set
            // stored in it is lost, and fetched again by whoever needs it.
            if fstatat(&inner.fd, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .is_ok_and(|st| st.st_ino == ino)
            {
                let _ = unlinkat(&inner.fd, name.as_str(), UnlinkatFlags::NoRemoveDir);
            }
        });
    }
}

/// The right to refresh one lease; released when dropped.
pub struct LeaseLock {
    leases: SharedLeases,
    name: String,
    token: String,
}

impl Drop for LeaseLock {
    /// Removes the lock file while it is still ours, through the folder.
    fn drop(&mut self) {
        if self.token.is_empty() {
            return;
        }
        let inner = self.leases.0.clone();
        let (name, token) = (
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.token),
        );
        let _ = self
            .leases
            .0
            .folder
            .spawn_cleanup("release a lease lock", move || {
                let ours = open_ours(&inner.fd, &name, inner.uid)
                    .ok()
                    .flatten()
                    .and_then(|f| text_of(f).ok())
                    .is_some_and(|t| t == token);
                if ours {
                    let _ = unlinkat(&inner.fd, name.as_str(), UnlinkatFlags::NoRemoveDir);
                }
            });
    }
}

/// How long a lock file without its whole line is taken as being written.
const LOCK_WRITE_GRACE: Duration = Duration::from_secs(10);

fn lock_live(text: &str) -> bool {
    let mut f = text.split_whitespace();
    let (Some(h), Some(pid), Some(until)) = (f.next(), f.next(), f.next()) else {
        return false;
    };
    let (Ok(pid), Ok(until)) = (pid.parse::<i32>(), until.parse::<u64>()) else {
        return false;
    };
    if now_ms() >= until {
        return false;
    }
    if h == host() {
        return nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            != Err(nix::errno::Errno::ESRCH);
    }
    true
}

fn host() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().replace(char::is_whitespace, "_"))
        .unwrap_or_else(|_| "unknown".into())
}

/// A file name for a lease of `parts` (a realm, a token, a handle): a
/// hash, so no name, handle or token shows in the folder.
pub fn lease_name(kind: &str, parts: &[&str]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    format!("{kind}-{}", hex::encode(&h.finalize()[..16]))
}

/// Gets a lease through the shared folder: a usable stored one (not one
/// `refused` says a service just refused: another process may not have
/// removed it yet), else the one another process is refreshing right now
/// (waited for, polling), else a fresh one from `fetch`, stored for the
/// others. Bounded by `deadline`: past half of it, `fetch` is called
/// whatever the others do. A folder that does not answer (or was moved)
/// is left alone: `fetch` is called, and what it gets is this process's
/// own.
pub async fn get_or_fetch<T, E, F, Fut>(
    shared: &SharedLeases,
    name: &str,
    deadline: Deadline,
    refused: impl Fn(&T) -> bool,
    fetch: F,
) -> Result<(T, Duration), E>
where
    T: Serialize + for<'de> Deserialize<'de> + Send + 'static,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(T, Duration), E>>,
{
    let give_up = deadline.sooner_by(deadline.remaining() / 2);
    let mut wait = Duration::from_millis(20);
    let lock = loop {
        match shared.read::<T>(name, deadline).await {
            Ok(Some((s, left))) if !refused(&s.value) => {
                debug!(name, "lease from the shared folder");
                return Ok((s.value, left));
            }
            Ok(_) => {}
            Err(_) => return fetch().await,
        }
        let until = SystemTime::now() + deadline.remaining();
        match shared.lock(name, until, deadline).await {
            Ok(Some(l)) => break Some(l),
            Ok(None) if give_up.expired() => break None,
            Ok(None) => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(250));
            }
            Err(_) => return fetch().await,
        }
    };
    // Written by the holder just before we took the lock?
    if let Ok(Some((s, left))) = shared.read::<T>(name, deadline).await {
        if !refused(&s.value) {
            return Ok((s.value, left));
        }
    }
    let (value, lifetime) = fetch().await?;
    match serde_json::to_value(&value) {
        Ok(j) => shared.store(name, j, lifetime, lock),
        Err(_) => drop(lock),
    }
    Ok((value, lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const STALL: Duration = Duration::from_secs(5);

    fn soon() -> Deadline {
        Deadline::after(Duration::from_secs(5))
    }

    fn dir_of(s: &SharedLeases) -> PathBuf {
        s.0.dir.clone()
    }

    /// Waits until the folder's background calls are done.
    fn settle(s: &SharedLeases) {
        let t = std::time::Instant::now();
        while s.0.folder.in_flight() > 0 && t.elapsed() < STALL {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn store(s: &SharedLeases, name: &str, v: &str, life: Duration) {
        s.store(name, serde_json::json!(v), life, None);
        settle(s);
    }

    #[tokio::test]
    async fn a_lock_being_written_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let s = SharedLeases::open(dir.path(), STALL).unwrap();
        let until = SystemTime::now() + Duration::from_secs(30);
        // Another process has created the lock and not yet written its line.
        let lock = dir_of(&s).join("x.lock");
        std::fs::write(&lock, "").unwrap();
        std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(
            s.lock("x", until, soon()).await.unwrap().is_none(),
            "taken over mid-write"
        );
        // A whole line of a dead owner is taken over.
        std::fs::write(&lock, format!("{} 999999999 1\n", host())).unwrap();
        assert!(s.lock("x", until, soon()).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_lease_is_shared_until_a_third_of_its_life_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let s = SharedLeases::open(dir.path(), STALL).unwrap();
        let m = std::fs::metadata(dir_of(&s)).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700);
        assert!(s.read::<String>("x", soon()).await.unwrap().is_none());
        store(&s, "x", "v", Duration::from_secs(300));
        let (got, left) = s.read::<String>("x", soon()).await.unwrap().unwrap();
        assert_eq!(got.value, "v");
        assert!(left > Duration::from_secs(290));
        let f = std::fs::metadata(dir_of(&s).join("x")).unwrap();
        assert_eq!(f.mode() & 0o777, 0o600);
        // Past two thirds of its life: not handed out.
        let old = Stored {
            value: "old",
            issued_ms: now_ms() - 250_000,
            expires_ms: now_ms() + 50_000,
        };
        let y = dir_of(&s).join("y");
        std::fs::write(&y, serde_json::to_vec(&old).unwrap()).unwrap();
        std::fs::set_permissions(&y, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(s.read::<String>("y", soon()).await.unwrap().is_none());
        // A readable-by-others file is not trusted.
        store(&s, "z", "v", Duration::from_secs(300));
        std::fs::set_permissions(dir_of(&s).join("z"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        assert!(s.read::<String>("z", soon()).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn one_lock_holder_at_a_time_and_dead_holders_lose_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = SharedLeases::open(dir.path(), STALL).unwrap();
        let soon_ = SystemTime::now() + Duration::from_secs(30);
        let a = s.lock("t", soon_, soon()).await.unwrap().unwrap();
        assert!(s.lock("t", soon_, soon()).await.unwrap().is_none());
        drop(a);
        settle(&s);
        let b = s.lock("t", soon_, soon()).await.unwrap().unwrap();
        std::mem::forget(b);
        // A holder that is gone (no such PID on this host).
        std::fs::write(
            dir_of(&s).join("t.lock"),
            format!("{} 999999999 {}\n", host(), now_ms() + 30_000),
        )
        .unwrap();
        assert!(s.lock("t", soon_, soon()).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_planted_fifo_or_link_never_blocks_nor_reads_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let s = SharedLeases::open(dir.path(), STALL).unwrap();
        let d = dir_of(&s);
        nix::unistd::mkfifo(&d.join("f.lock"), Mode::from_bits_truncate(0o600)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.join("z.lock")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.join("z")).unwrap();
        nix::unistd::mkfifo(&d.join("f"), Mode::from_bits_truncate(0o600)).unwrap();
        let until = SystemTime::now() + Duration::from_secs(30);
        let t = std::time::Instant::now();
        // Neither is a lock of ours: removed, and the lock taken.
        assert!(s.lock("f", until, soon()).await.unwrap().is_some());
        assert!(s.lock("z", until, soon()).await.unwrap().is_some());
        assert!(s.read::<String>("f", soon()).await.unwrap().is_none());
        assert!(s.read::<String>("z", soon()).await.unwrap().is_none());
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn only_the_refused_value_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let s = SharedLeases::open(dir.path(), STALL).unwrap();
        store(&s, "c", "fresh", Duration::from_secs(300));
        // Another process refused the old one: the fresh one stays.
        s.forget_if("c", |v| v == "old");
        settle(&s);
        assert!(s.read::<String>("c", soon()).await.unwrap().is_some());
        s.forget_if("c", |v| v == "fresh");
        settle(&s);
        assert!(s.read::<String>("c", soon()).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_refused_lease_not_yet_removed_is_never_taken_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = SharedLeases::open(dir.path(), STALL).unwrap();
        store(&s, "tok", "old", Duration::from_secs(300));
        let got = get_or_fetch(
            &s,
            "tok",
            soon(),
            |v: &String| v == "old",
            || async { Ok::<_, ()>(("new".to_string(), Duration::from_secs(300))) },
        )
        .await
        .unwrap();
        assert_eq!(got.0, "new");
        settle(&s);
        // ... and the fresh one is there for the others.
        let (stored, _) = s.read::<String>("tok", soon()).await.unwrap().unwrap();
        assert_eq!(stored.value, "new");
    }

    #[tokio::test]
    async fn a_folder_moved_away_is_no_longer_used() {
        let dir = tempfile::tempdir().unwrap();
        let s = SharedLeases::open(dir.path(), STALL).unwrap();
        let d = dir_of(&s);
        // A neighbour renames it away and makes one of their own there.
        std::fs::rename(&d, dir.path().join(".gone")).unwrap();
        std::fs::create_dir(&d).unwrap();
        let got = get_or_fetch(
            &s,
            "tok",
            soon(),
            |_: &String| false,
            || async { Ok::<_, ()>(("secret".to_string(), Duration::from_secs(300))) },
        )
        .await
        .unwrap();
        assert_eq!(got.0, "secret");
        settle(&s);
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            0,
            "nothing in theirs"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join(".gone")).unwrap().count(),
            0,
            "nor in ours, now that nobody finds it"
        );
    }
}
