//! Where a background mount keeps its log and its status socket, and a log
//! file bounded in size.
//!
//! Both live in the user's state folder, named after the mountpoint the
//! way `systemd-escape --path` names it (`/data/provena` →
//! `data-provena`): `$XDG_STATE_HOME/provenafs/data-provena.log` (that is
//! `~/.local/state/provenafs/…`) and `…/data-provena.sock`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use file_rotate::{compression::Compression, suffix::AppendCount, ContentLimit, FileRotate};

/// A log file is rotated once it passes this many bytes…
pub const MAX_BYTES: usize = 10 << 20;
/// …and this many rotated files (`NAME.log.1` newest) are kept beside it.
pub const KEPT: usize = 3;

/// `$XDG_STATE_HOME/provenafs` (created 0700 when asked for with
/// [`state_dir_created`]). None when no home folder is known.
pub fn state_dir() -> Option<PathBuf> {
    let base = directories::BaseDirs::new()?;
    let dir = base
        .state_dir()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| base.home_dir().join(".local/state"));
    Some(dir.join("provenafs"))
}

/// [`state_dir`], created readable by its owner only if missing.
pub fn state_dir_created() -> Result<PathBuf, String> {
    let dir = state_dir().ok_or("cannot tell the state folder: set HOME or XDG_STATE_HOME")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
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
/// opened or created (its folder must exist).
pub fn open(path: &Path) -> Result<Box<dyn Write + Send>, String> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).create(true).append(true).mode(0o600);
    // Opened once here to report a failure: the rotating writer would
    // silently write nowhere.
    let f = options
        .open(path)
        .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
    // A log in our own state folder is ours alone, whatever mode an older
    // version left it with.
    if path
        .parent()
        .is_some_and(|p| Some(p) == state_dir().as_deref())
    {
        let _ = f.set_permissions(std::fs::Permissions::from_mode(0o600));
    }
    drop(f);
    Ok(Box::new(NeverPanics(FileRotate::new(
        path,
        AppendCount::new(KEPT),
        ContentLimit::BytesSurpassed(MAX_BYTES),
        Compression::None,
        Some(options),
    ))))
}

/// A log writer that fails instead of panicking. `file_rotate` asserts on
/// its own view of the rotated files (which another process may change:
/// a user deleting `NAME.log.*`, two mounts given one log file), and a
/// panic while tracing holds its writer lock would poison it, after which
/// every log call on every FUSE thread panics too.
struct NeverPanics<W>(W);

impl<W: Write> Write for NeverPanics<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let inner = &mut self.0;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.write(buf)))
            .unwrap_or_else(|_| Err(std::io::Error::other("log rotation failed")))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let inner = &mut self.0;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.flush()))
            .unwrap_or_else(|_| Err(std::io::Error::other("log rotation failed")))
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
    fn a_panicking_writer_fails_instead() {
        struct Bad;
        impl Write for Bad {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                panic!("rotation assert")
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut w = NeverPanics(Bad);
        assert!(w.write(b"x").is_err());
        assert!(w.write(b"y").is_err());
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
}
