//! Safe calls into a cache folder that others may write to: everything
//! relative to an open descriptor, no symlink followed, no FIFO waited on,
//! owner and mode checked on the descriptor (see issue 21).

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{openat, AtFlags, OFlag, AT_FDCWD as CWD};
use nix::sys::stat::{fstat, fstatat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// Creates and removes a file in `dir`: a call the file system's server
/// must answer (a `stat` may be answered from a client's cache). The
/// probe of a folder that stopped answering (see [`crate::folder`]).
pub(crate) fn probe_by_a_file(dir: &OwnedFd) -> std::io::Result<()> {
    let name = format!(".probe-{}-{:x}", std::process::id(), rand::random::<u64>());
    let fd = openat(
        dir,
        name.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )?;
    drop(fd);
    unlinkat(dir, name.as_str(), UnlinkatFlags::NoRemoveDir)?;
    Ok(())
}

/// Opens `name` in `dir` for reading, as a file anyone may have put
/// there: never following a symlink, never blocking on a FIFO, never
/// taking a terminal. The caller checks what it opened (`fstat`).
pub(crate) fn open_untrusted<P: ?Sized + nix::NixPath>(
    dir: impl AsFd,
    name: &P,
) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Removes from `dir` the regular files whose names start with one of
/// `prefixes` and that are older than an hour: what a writer or a probe
/// killed mid-way left (no one is still writing them). One folder's
/// entries, never a walk.
pub(crate) fn remove_stale(dir: &OwnedFd, prefixes: &[&str]) {
    let Ok(dup) = dir.try_clone() else {
        return;
    };
    let Ok(mut d) = nix::dir::Dir::from_fd(dup) else {
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for e in d.iter().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let Ok(st) = fstatat(dir, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        if st.st_mode & libc::S_IFMT == libc::S_IFREG && now - st.st_mtime > 3600 {
            let _ = unlinkat(dir, name.as_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// Opens the folder at `path` (which the user gave: a symlink to a folder
/// is followed), to be checked on its descriptor and used through it.
pub(crate) fn open_folder(path: &Path) -> nix::Result<OwnedFd> {
    openat(
        CWD,
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Opens folder `name` in `dir` without following a symlink there.
pub(crate) fn open_dir_at<P: ?Sized + nix::NixPath>(
    dir: impl AsFd,
    name: &P,
) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Creates `d` (and parents) with `mode`, set explicitly so the umask
/// cannot drop the group bits of a group cache.
pub(crate) fn make_dir(d: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match fs::DirBuilder::new().mode(mode & 0o777).create(d) {
        Ok(()) => fs::set_permissions(d, fs::Permissions::from_mode(mode)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = d.parent() {
                fs::DirBuilder::new().recursive(true).create(parent)?;
            }
            make_dir(d, mode)
        }
        Err(e) => Err(e),
    }
}

/// A private cache that other users can read would leak data they may not
/// be allowed to see, and one another user owns could be steered by them
/// (blocks of their making, read as ours): refuse both, as ssh refuses a
/// readable key. `dir` is checked on its open descriptor `fd` (the name
/// may be replaced meanwhile); a group cache may be another member's
/// folder, but must be closed to others.
pub(crate) fn check_private(dir: &Path, fd: &OwnedFd, group: bool) -> std::io::Result<()> {
    let st = fstat(fd)?;
    let mode = st.st_mode & 0o7777;
    let open_bits = if group { 0o007 } else { 0o077 };
    if mode & open_bits != 0 {
        return Err(std::io::Error::other(format!(
            "cache folder {} is open to {} (mode {:o}); run `chmod {} {}`{}",
            dir.display(),
            if group {
                "other users"
            } else {
                "other users or the group"
            },
            mode,
            if group { "3770" } else { "700" },
            dir.display(),
            if group {
                ""
            } else {
                ", or pass --cache-group to share it with the group"
            }
        )));
    }
    let me = nix::unistd::geteuid().as_raw();
    if !group && st.st_uid != me {
        return Err(std::io::Error::other(format!(
            "cache folder {} belongs to another user (uid {}); use a folder of your own",
            dir.display(),
            st.st_uid
        )));
    }
    Ok(())
}
