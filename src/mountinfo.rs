//! The mount table as the kernel shows it (`/proc/self/mountinfo`): which
//! mounts are provenafs mounts, and who is using one.

use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo` (see proc(5)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// ID of the mount (field 1). The kernel reuses IDs at once: a new
    /// mount at the same path may get the ID of one just unmounted.
    pub id: u64,
    /// ID of the mount it sits on (field 2).
    pub parent: u64,
    /// `major:minor` of the file system (field 3).
    pub dev: String,
    /// Where it is mounted (field 5), unescaped.
    pub mountpoint: PathBuf,
    /// File system type, e.g. `fuse.provenafs`, `tmpfs`.
    pub fstype: String,
    /// Mount source, e.g. `provenafs`.
    pub source: String,
    /// Per-superblock options, e.g. `ro,user_id=1000,group_id=1000`.
    pub super_options: String,
}

impl MountEntry {
    /// A provenafs mount: type `fuse.provenafs`, or a root mount made by an
    /// older build (type `fuse`, source `provenafs`).
    pub fn is_provenafs(&self) -> bool {
        self.fstype == "fuse.provenafs" || (self.fstype == "fuse" && self.source == "provenafs")
    }

    /// The UID that mounted it (FUSE's `user_id=` option).
    pub fn user_id(&self) -> Option<u32> {
        self.super_options
            .split(',')
            .find_map(|o| o.strip_prefix("user_id="))
            .and_then(|v| v.parse().ok())
    }
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                id: f.first()?.parse().ok()?,
                parent: f.get(1)?.parse().ok()?,
                dev: f.get(2)?.to_string(),
                mountpoint: PathBuf::from(unescape(f.get(4)?)),
                fstype: r.first()?.to_string(),
                source: unescape(r.get(1)?),
                super_options: r.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// This process's mount table. Empty when `/proc` cannot be read.
pub fn read() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// The mount on top at `path`, if any: of the mounts at that path, the
/// one no other sits on.
///
/// `path` itself is not touched first (a stalled mount would hang even a
/// `stat` of its root): its parent is resolved and its name taken as
/// given. Only when that names no mount is `path` resolved in full (a
/// symlink to a mountpoint).
pub fn at(path: &Path) -> Option<MountEntry> {
    let table = read();
    let top = |p: &Path| {
        let here: Vec<&MountEntry> = table.iter().filter(|e| e.mountpoint == p).collect();
        here.iter()
            .find(|e| !here.iter().any(|o| o.parent == e.id))
            .or(here.last())
            .map(|e| (*e).clone())
    };
    top(&lexical(path)).or_else(|| path.canonicalize().ok().and_then(|c| top(&c)))
}

/// `path` made absolute with its parent's symlinks resolved, without
/// touching `path` itself.
fn lexical(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => parent
            .canonicalize()
            .map(|p| p.join(name))
            .unwrap_or(abs.clone()),
        _ => abs,
    }
}

/// Mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// A process using a mount: its working folder, root, an open file or a
/// mapped file lies below the mountpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`).
    pub command: String,
}

/// The processes using anything below `mountpoint`, found through
/// `/proc/*/cwd`, `/proc/*/root`, `/proc/*/fd/*` and `/proc/*/maps`.
/// Only link *names* are read, never the files: a stalled mount cannot
/// hang the search. Processes we may not inspect are missed.
pub fn users(mountpoint: &Path) -> Vec<User> {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let dir = p.path();
        if uses(&dir, mountpoint) {
            let command = std::fs::read_to_string(dir.join("comm"))
                .map(|c| c.trim_end().to_string())
                .unwrap_or_default();
            out.push(User { pid, command });
        }
    }
    out.sort_by_key(|u| u.pid);
    out
}

fn uses(proc_dir: &Path, mountpoint: &Path) -> bool {
    let below = |p: &Path| p.starts_with(mountpoint);
    let link = |name: &str| std::fs::read_link(proc_dir.join(name)).ok();
    if link("cwd").is_some_and(|p| below(&p)) || link("root").is_some_and(|p| below(&p)) {
        return true;
    }
    if let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) {
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|p| below(&p)) {
                return true;
            }
        }
    }
    // Mapped files: the path is everything from the sixth field on. A
    // process stuck faulting a page of a stalled mount can hold its memory
    // map locked: its maps are read on a thread given one second.
    let maps_path = proc_dir.join("maps");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read_to_string(maps_path));
    });
    let Ok(Ok(maps)) = rx.recv_timeout(std::time::Duration::from_secs(1)) else {
        return false;
    };
    maps.lines().any(|l| {
        l.splitn(6, ' ')
            .nth(5)
            .map(str::trim_start)
            .is_some_and(|p| p.starts_with('/') && below(Path::new(p)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
40 22 0:35 / /mnt/my\\040data rw,relatime - tmpfs tmpfs rw,size=1024k
41 22 0:36 / /data/p ro,nosuid,nodev,relatime - fuse.provenafs provenafs ro,user_id=0,group_id=0,default_permissions
42 22 0:37 / /data/old ro,nosuid,nodev - fuse provenafs ro,user_id=1000,group_id=1000
43 22 0:38 / /data/other ro - fuse.sshfs host:/x ro,user_id=1000
";

    #[test]
    fn parses_and_recognizes_provenafs() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 5);
        assert_eq!(m[1].mountpoint, Path::new("/mnt/my data"));
        assert_eq!(m[1].fstype, "tmpfs");
        assert!(!m[1].is_provenafs());
        assert!(m[2].is_provenafs());
        assert_eq!(m[2].id, 41);
        assert_eq!(m[2].dev, "0:36");
        assert_eq!(m[2].user_id(), Some(0));
        assert!(m[3].is_provenafs());
        assert_eq!(m[3].user_id(), Some(1000));
        assert!(!m[4].is_provenafs());
        assert!(!m[0].is_provenafs());
    }

    #[test]
    fn our_own_use_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("held")).unwrap();
        // This process is left out; a child holding the folder is found.
        assert!(users(dir.path())
            .iter()
            .all(|u| u.pid != std::process::id()));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(dir.path())
            .spawn()
            .unwrap();
        let found = users(dir.path());
        let _ = child.kill();
        let _ = child.wait();
        drop(f);
        assert!(
            found
                .iter()
                .any(|u| u.pid == child.id() && u.command == "sleep"),
            "{found:?}"
        );
    }
}
