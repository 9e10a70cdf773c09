//! Leases (access tokens, dataset read credentials) shared by every
//! process of one user through a shared cache folder, so that N mounts of
//! a job array cause about one exchange and one credential call per
//! lifetime, not N.
//!
//! They live in `CACHE/creds-<uid>/`: created `0700` and checked to be this
//! user's own real folder of that mode before anything in it is trusted or
//! written, files `0600`, whatever the cache's group settings (a
//! `--cache-group` member can read blocks, never these). Each lease is one
//! JSON file replaced atomically (written to a temporary name, renamed);
//! who refreshes it first holds `NAME.lock`, an exclusive-create file with
//! its host, PID and deadline (as block claims do, see
//! [`crate::read::cache`]): no `flock` across nodes.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

/// The per-user folder of shared leases.
#[derive(Clone, Debug)]
pub struct SharedLeases {
    dir: PathBuf,
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

impl SharedLeases {
    /// The leases folder below `cache_dir`, created if missing. None (with
    /// one warning) when it is not this user's private folder: nothing is
    /// then shared, each process renews its own.
    pub fn open(cache_dir: &Path) -> Option<SharedLeases> {
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        let dir = cache_dir.join(format!("creds-{uid}"));
        let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() && m.uid() == uid && m.mode() & 0o077 == 0 => {
                Some(SharedLeases { dir })
            }
            Ok(_) => {
                warn!(
                    folder = %dir.display(),
                    "not a private folder of this user; tokens and credentials are not shared"
                );
                None
            }
            Err(e) => {
                warn!(folder = %dir.display(), error = %e, "cannot use; tokens and credentials are not shared");
                None
            }
        }
    }

    /// The lease `name`, if one is stored, readable, ours and usable.
    pub fn read<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Option<(Stored<T>, Duration)> {
        let path = self.dir.join(name);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .ok()?;
        let m = f.metadata().ok()?;
        // SAFETY: getuid cannot fail.
        if !m.is_file() || m.uid() != unsafe { libc::getuid() } || m.mode() & 0o077 != 0 {
            return None;
        }
        let mut text = String::new();
        f.take(64 * 1024).read_to_string(&mut text).ok()?;
        let stored: Stored<T> = serde_json::from_str(&text).ok()?;
        let left = stored.usable_for()?;
        Some((stored, left))
    }

    /// Stores `value`, valid for `lifetime` from now (replacing any older).
    pub fn write<T: Serialize>(&self, name: &str, value: T, lifetime: Duration) {
        let now = now_ms();
        let stored = Stored {
            value,
            issued_ms: now,
            expires_ms: now + lifetime.as_millis() as u64,
        };
        let Ok(text) = serde_json::to_vec(&stored) else {
            return;
        };
        let tmp = self.dir.join(format!(
            ".tmp-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .and_then(|mut f| {
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                f.write_all(&text)
            })
            .and_then(|()| std::fs::rename(&tmp, self.dir.join(name)));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            debug!(name, error = %e, "cannot share a lease");
        }
    }

    /// Removes the lease `name` (refused by the service: the others must
    /// not be handed it again).
    pub fn forget(&self, name: &str) {
        let _ = std::fs::remove_file(self.dir.join(name));
    }

    /// Takes the right to refresh `name` until `until`; None when another
    /// live process holds it (a lock past its deadline, or whose owner on
    /// this host is gone, is taken over).
    pub fn lock(&self, name: &str, until: SystemTime) -> Option<LeaseLock> {
        let path = self.dir.join(format!("{name}.lock"));
        let until_ms = until
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let me = format!("{} {} {until_ms}\n", host(), std::process::id());
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
            {
                Ok(mut f) => {
                    let _ = f.write_all(me.as_bytes());
                    return Some(LeaseLock { path, token: me });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    // A lock whose line is not whole yet is being taken
                    // right now (created, then written): live, unless it
                    // was left so long ago that its taker died.
                    let being_written = !text.ends_with('\n')
                        && std::fs::symlink_metadata(&path)
                            .and_then(|m| m.modified())
                            .is_ok_and(|t| t.elapsed().is_ok_and(|a| a < LOCK_WRITE_GRACE));
                    if being_written || lock_live(&text) {
                        return None;
                    }
                    let _ = std::fs::remove_file(&path);
                }
                // Cannot lock here: refresh without the lock.
                Err(_) => {
                    return Some(LeaseLock {
                        path,
                        token: String::new(),
                    })
                }
            }
        }
        None
    }
}

/// The right to refresh one lease; released when dropped.
pub struct LeaseLock {
    path: PathBuf,
    token: String,
}

impl Drop for LeaseLock {
    fn drop(&mut self) {
        if !self.token.is_empty()
            && std::fs::read_to_string(&self.path).is_ok_and(|t| t == self.token)
        {
            let _ = std::fs::remove_file(&self.path);
        }
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

/// Gets a lease through the shared folder: a usable stored one, else the
/// one another process is refreshing right now (waited for, polling), else
/// a fresh one from `fetch`, stored for the others. Bounded by `deadline`:
/// past half of it, `fetch` is called whatever the others do.
pub async fn get_or_fetch<T, E, F, Fut>(
    shared: &SharedLeases,
    name: &str,
    deadline: crate::retry::Deadline,
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
        if let Some((s, left)) = shared.read::<T>(name) {
            debug!(name, "lease from the shared folder");
            return Ok((s.value, left));
        }
        let until = SystemTime::now() + deadline.remaining();
        match shared.lock(name, until) {
            Some(l) => break Some(l),
            None if give_up.expired() => break None,
            None => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(250));
            }
        }
    };
    // Written by the holder just before we took the lock?
    if let Some((s, left)) = shared.read::<T>(name) {
        return Ok((s.value, left));
    }
    let (value, lifetime) = fetch().await?;
    let json = serde_json::to_value(&value).ok();
    if let Some(j) = json {
        shared.write(name, j, lifetime);
    }
    drop(lock);
    Ok((value, lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_being_written_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let s = SharedLeases::open(dir.path()).unwrap();
        let until = SystemTime::now() + Duration::from_secs(30);
        // Another process has created the lock and not yet written its line.
        std::fs::write(s.dir.join("x.lock"), "").unwrap();
        assert!(s.lock("x", until).is_none(), "taken over mid-write");
        // A whole line of a dead owner is taken over.
        std::fs::write(s.dir.join("x.lock"), format!("{} 999999999 1\n", host())).unwrap();
        assert!(s.lock("x", until).is_some());
    }

    #[test]
    fn a_lease_is_shared_until_a_third_of_its_life_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let s = SharedLeases::open(dir.path()).unwrap();
        let m = std::fs::metadata(
            dir.path()
                .join(format!("creds-{}", unsafe { libc::getuid() })),
        )
        .unwrap();
        assert_eq!(m.mode() & 0o777, 0o700);
        assert!(s.read::<String>("x").is_none());
        s.write("x", "v".to_string(), Duration::from_secs(300));
        let (got, left) = s.read::<String>("x").unwrap();
        assert_eq!(got.value, "v");
        assert!(left > Duration::from_secs(290));
        let f = std::fs::metadata(s.dir.join("x")).unwrap();
        assert_eq!(f.mode() & 0o777, 0o600);
        // Past two thirds of its life: not handed out.
        let old = Stored {
            value: "old",
            issued_ms: now_ms() - 250_000,
            expires_ms: now_ms() + 50_000,
        };
        std::fs::write(s.dir.join("y"), serde_json::to_vec(&old).unwrap()).unwrap();
        std::fs::set_permissions(s.dir.join("y"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(s.read::<String>("y").is_none());
        // A readable-by-others file is not trusted.
        s.write("z", "v".to_string(), Duration::from_secs(300));
        std::fs::set_permissions(s.dir.join("z"), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(s.read::<String>("z").is_none());
    }

    #[test]
    fn one_lock_holder_at_a_time_and_dead_holders_lose_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = SharedLeases::open(dir.path()).unwrap();
        let soon = SystemTime::now() + Duration::from_secs(30);
        let a = s.lock("t", soon).unwrap();
        assert!(s.lock("t", soon).is_none());
        drop(a);
        let b = s.lock("t", soon).unwrap();
        std::mem::forget(b);
        // A holder that is gone (no such PID on this host).
        std::fs::write(
            s.dir.join("t.lock"),
            format!("{} 999999999 {}\n", host(), now_ms() + 30_000),
        )
        .unwrap();
        assert!(s.lock("t", soon).is_some());
    }
}
