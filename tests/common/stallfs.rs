//! A FUSE file system of the tests' own that stops answering on request:
//! a pass-through of a folder, standing in for a cluster file system
//! (Lustre, GPFS, NFS) or an NFS home folder whose server hangs.
//!
//! While stalled, every operation on a path containing the given text
//! (all of them for `""`) waits until [`StallFs::resume`], as a request to
//! a hung server does; others go on. It runs in the test process, on
//! fuser's own thread; a waiting operation waits on a thread of its own,
//! so the others are answered meanwhile.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, OpenFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

/// The stall switch, shared by the file system and the test.
#[derive(Default)]
struct Ctl {
    /// `Some(text)`: operations on paths containing `text` wait.
    stalled: Mutex<Option<String>>,
    resumed: Condvar,
    /// Operations waiting right now.
    waiting: AtomicUsize,
}

impl Ctl {
    fn holds(&self, paths: &[&Path]) -> bool {
        let st = self.stalled.lock().unwrap();
        st.as_ref().is_some_and(|m| {
            paths
                .iter()
                .any(|p| m.is_empty() || p.to_string_lossy().contains(m.as_str()))
        })
    }

    fn wait(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut st = self.stalled.lock().unwrap();
        while st.is_some() {
            st = self.resumed.wait(st).unwrap();
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A mounted stall file system (see the module docs); unmounted, with
/// every waiting operation let go, when dropped.
pub struct StallFs {
    src: tempfile::TempDir,
    mnt: tempfile::TempDir,
    ctl: Arc<Ctl>,
    session: Option<fuser::BackgroundSession>,
}

impl StallFs {
    pub fn mount() -> StallFs {
        let src = tempfile::Builder::new()
            .prefix("stallfs-src-")
            .tempdir()
            .unwrap();
        let mnt = tempfile::Builder::new()
            .prefix("stallfs-mnt-")
            .tempdir()
            .unwrap();
        let ctl = Arc::new(Ctl::default());
        let fs = Pass {
            root: src.path().to_path_buf(),
            ctl: ctl.clone(),
            st: Arc::new(Mutex::new(Table::new())),
        };
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            fuser::MountOption::FSName("stallfs".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        cfg.acl = fuser::SessionACL::All;
        let session = fuser::Session::new(fs, mnt.path(), &cfg)
            .and_then(|s| s.spawn())
            .expect("stallfs mounts");
        StallFs {
            src,
            mnt,
            ctl,
            session: Some(session),
        }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.mnt.path()
    }

    /// The folder it passes through (for looking without waiting).
    pub fn backing(&self) -> &Path {
        self.src.path()
    }

    /// From now on, operations on paths containing `text` (`""`: all)
    /// wait until [`StallFs::resume`].
    pub fn stall(&self, text: &str) {
        *self.ctl.stalled.lock().unwrap() = Some(text.to_string());
    }

    /// Lets every waiting operation go on, and answers again.
    pub fn resume(&self) {
        *self.ctl.stalled.lock().unwrap() = None;
        self.ctl.resumed.notify_all();
    }

    /// A guard that lets every operation go on when dropped: declared
    /// after the mount and emulator that use this file system, it is
    /// dropped before them, so a test that fails while stalled still tears
    /// down (their clean-up would wait on the stall otherwise).
    pub fn resume_on_drop(&self) -> Resume {
        Resume(self.ctl.clone())
    }

    /// Operations waiting right now.
    pub fn waiting(&self) -> usize {
        self.ctl.waiting.load(Ordering::SeqCst)
    }
}

impl Drop for StallFs {
    fn drop(&mut self) {
        self.resume();
        if let Some(s) = self.session.take() {
            if s.umount_and_join().is_err() {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(self.mnt.path())
                    .status();
            }
        }
    }
}

/// See [`StallFs::resume_on_drop`].
pub struct Resume(Arc<Ctl>);

impl Drop for Resume {
    fn drop(&mut self) {
        *self.0.stalled.lock().unwrap() = None;
        self.0.resumed.notify_all();
    }
}

/// Inode numbers and the paths (relative to the source) they stand for.
struct Table {
    paths: HashMap<u64, PathBuf>,
    inos: HashMap<PathBuf, u64>,
    next: u64,
    files: HashMap<u64, Arc<File>>,
    next_fh: u64,
}

impl Table {
    fn new() -> Table {
        let mut t = Table {
            paths: HashMap::new(),
            inos: HashMap::new(),
            next: 2,
            files: HashMap::new(),
            next_fh: 1,
        };
        t.paths.insert(1, PathBuf::new());
        t.inos.insert(PathBuf::new(), 1);
        t
    }

    fn ino(&mut self, rel: &Path) -> u64 {
        if let Some(i) = self.inos.get(rel) {
            return *i;
        }
        let i = self.next;
        self.next += 1;
        self.paths.insert(i, rel.to_path_buf());
        self.inos.insert(rel.to_path_buf(), i);
        i
    }

    fn moved(&mut self, from: &Path, to: &Path) {
        // The entry and everything below it.
        let moving: Vec<(PathBuf, u64)> = self
            .inos
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        if let Some(i) = self.inos.remove(to) {
            self.paths.remove(&i);
        }
        for (p, i) in moving {
            self.inos.remove(&p);
            let np = to.join(p.strip_prefix(from).unwrap());
            self.paths.insert(i, np.clone());
            self.inos.insert(np, i);
        }
    }

    fn gone(&mut self, rel: &Path) {
        if let Some(i) = self.inos.remove(rel) {
            self.paths.remove(&i);
        }
    }
}

struct Pass {
    root: PathBuf,
    ctl: Arc<Ctl>,
    st: Arc<Mutex<Table>>,
}

const TTL: Duration = Duration::ZERO;

fn errno(e: std::io::Error) -> Errno {
    Errno::from(e)
}

fn last() -> Errno {
    Errno::from(std::io::Error::last_os_error())
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn attr(ino: u64, m: &std::fs::Metadata) -> FileAttr {
    let t = |s: i64, ns: i64| {
        if s >= 0 {
            UNIX_EPOCH + Duration::new(s as u64, ns as u32)
        } else {
            UNIX_EPOCH
        }
    };
    let kind = match m.mode() & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    };
    FileAttr {
        ino: INodeNo(ino),
        size: m.size(),
        blocks: m.blocks(),
        atime: t(m.atime(), m.atime_nsec()),
        mtime: t(m.mtime(), m.mtime_nsec()),
        ctime: t(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind,
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: 4096,
        flags: 0,
    }
}

impl Pass {
    fn rel(&self, ino: INodeNo) -> Option<PathBuf> {
        self.st.lock().unwrap().paths.get(&ino.0).cloned()
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Option<PathBuf> {
        self.rel(parent).map(|p| p.join(name))
    }

    fn full(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn file(&self, fh: FileHandle) -> Option<Arc<File>> {
        self.st.lock().unwrap().files.get(&fh.0).cloned()
    }

    /// Runs `op` now, or, while `rels` are stalled, on a thread of its own
    /// once they no longer are.
    fn gate(&self, rels: &[&Path], op: impl FnOnce() + Send + 'static) {
        if self.ctl.holds(rels) {
            let ctl = self.ctl.clone();
            std::thread::spawn(move || {
                ctl.wait();
                op();
            });
        } else {
            op();
        }
    }

    /// Answers `reply` with the entry of `rel` (looked up now).
    fn entry(st: &Arc<Mutex<Table>>, root: &Path, rel: &Path, reply: ReplyEntry) {
        match std::fs::symlink_metadata(root.join(rel)) {
            Ok(m) => {
                let ino = st.lock().unwrap().ino(rel);
                reply.entry(&TTL, &attr(ino, &m), Generation(0));
            }
            Err(e) => reply.error(errno(e)),
        }
    }
}

impl Filesystem for Pass {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        let (st, root) = (self.st.clone(), self.root.clone());
        self.gate(&[&rel.clone()], move || {
            Pass::entry(&st, &root, &rel, reply)
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let Some(rel) = self.rel(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let file = fh.and_then(|fh| self.file(fh));
        let full = self.full(&rel);
        self.gate(&[&rel], move || {
            let m = match &file {
                Some(f) => f.metadata(),
                None => std::fs::symlink_metadata(&full),
            };
            match m {
                Ok(m) => reply.attr(&TTL, &attr(ino.0, &m)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(rel) = self.rel(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let full = self.full(&rel);
        let file = fh.and_then(|fh| self.file(fh));
        self.gate(&[&rel], move || {
            let c = cpath(&full);
            unsafe {
                if let Some(m) = mode {
                    if libc::fchmodat(libc::AT_FDCWD, c.as_ptr(), m & 0o7777, 0) != 0 {
                        return reply.error(last());
                    }
                }
                if uid.is_some() || gid.is_some() {
                    let u = uid.unwrap_or(u32::MAX);
                    let g = gid.unwrap_or(u32::MAX);
                    if libc::lchown(c.as_ptr(), u, g) != 0 {
                        return reply.error(last());
                    }
                }
            }
            if let Some(s) = size {
                let r = match &file {
                    Some(f) => f.set_len(s),
                    None => std::fs::OpenOptions::new()
                        .write(true)
                        .open(&full)
                        .and_then(|f| f.set_len(s)),
                };
                if let Err(e) = r {
                    return reply.error(errno(e));
                }
            }
            if atime.is_some() || mtime.is_some() {
                let ts = |t: Option<TimeOrNow>| match t {
                    None => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                    Some(TimeOrNow::Now) => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    },
                    Some(TimeOrNow::SpecificTime(t)) => {
                        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                        libc::timespec {
                            tv_sec: d.as_secs() as i64,
                            tv_nsec: d.subsec_nanos() as i64,
                        }
                    }
                };
                let times = [ts(atime), ts(mtime)];
                let r = unsafe {
                    libc::utimensat(
                        libc::AT_FDCWD,
                        c.as_ptr(),
                        times.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
                if r != 0 {
                    return reply.error(last());
                }
            }
            match std::fs::symlink_metadata(&full) {
                Ok(m) => reply.attr(&TTL, &attr(ino.0, &m)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let Some(rel) = self.rel(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let full = self.full(&rel);
        self.gate(&[&rel], move || match std::fs::read_link(&full) {
            Ok(t) => reply.data(t.as_os_str().as_bytes()),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        let (st, root) = (self.st.clone(), self.root.clone());
        self.gate(&[&rel.clone()], move || {
            let c = cpath(&root.join(&rel));
            if unsafe { libc::mknod(c.as_ptr(), mode & !umask, rdev as libc::dev_t) } != 0 {
                return reply.error(last());
            }
            Pass::entry(&st, &root, &rel, reply)
        });
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        let (st, root) = (self.st.clone(), self.root.clone());
        self.gate(&[&rel.clone()], move || {
            let c = cpath(&root.join(&rel));
            if unsafe { libc::mkdir(c.as_ptr(), (mode & !umask) & 0o7777) } != 0 {
                return reply.error(last());
            }
            Pass::entry(&st, &root, &rel, reply)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        let (st, root) = (self.st.clone(), self.root.clone());
        self.gate(&[&rel.clone()], move || {
            match std::fs::remove_file(root.join(&rel)) {
                Ok(()) => {
                    st.lock().unwrap().gone(&rel);
                    reply.ok()
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        let (st, root) = (self.st.clone(), self.root.clone());
        self.gate(&[&rel.clone()], move || {
            match std::fs::remove_dir(root.join(&rel)) {
                Ok(()) => {
                    st.lock().unwrap().gone(&rel);
                    reply.ok()
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let Some(rel) = self.child(parent, link_name) else {
            return reply.error(Errno::ENOENT);
        };
        let (st, root, target) = (self.st.clone(), self.root.clone(), target.to_path_buf());
        self.gate(&[&rel.clone()], move || {
            match std::os::unix::fs::symlink(&target, root.join(&rel)) {
                Ok(()) => Pass::entry(&st, &root, &rel, reply),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (Some(from), Some(to)) = (self.child(parent, name), self.child(newparent, newname))
        else {
            return reply.error(Errno::ENOENT);
        };
        let (st, root) = (self.st.clone(), self.root.clone());
        self.gate(&[&from.clone(), &to.clone()], move || {
            let (a, b) = (cpath(&root.join(&from)), cpath(&root.join(&to)));
            let r = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    libc::AT_FDCWD,
                    b.as_ptr(),
                    flags.bits(),
                )
            };
            if r != 0 {
                return reply.error(last());
            }
            st.lock().unwrap().moved(&from, &to);
            reply.ok()
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(rel) = self.rel(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let (st, full) = (self.st.clone(), self.full(&rel));
        self.gate(&[&rel], move || {
            let acc = flags.0 & libc::O_ACCMODE;
            let f = std::fs::OpenOptions::new()
                .read(acc != libc::O_WRONLY)
                .write(acc != libc::O_RDONLY)
                .custom_flags(flags.0 & (libc::O_APPEND | libc::O_NONBLOCK | libc::O_TRUNC))
                .open(&full);
            match f {
                Ok(f) => {
                    let mut t = st.lock().unwrap();
                    let fh = t.next_fh;
                    t.next_fh += 1;
                    t.files.insert(fh, Arc::new(f));
                    reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let (Some(rel), Some(f)) = (self.rel(ino), self.file(fh)) else {
            return reply.error(Errno::EBADF);
        };
        self.gate(&[&rel], move || {
            let mut buf = vec![0u8; size as usize];
            let mut got = 0;
            while got < buf.len() {
                match f.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return reply.error(errno(e)),
                }
            }
            reply.data(&buf[..got])
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let (Some(rel), Some(f)) = (self.rel(ino), self.file(fh)) else {
            return reply.error(Errno::EBADF);
        };
        let data = data.to_vec();
        self.gate(&[&rel], move || {
            // An append-mode file writes at its end, whatever the offset.
            let r = if flags.0 & libc::O_APPEND != 0 {
                use std::io::Write;
                (&*f).write_all(&data)
            } else {
                f.write_all_at(&data, offset)
            };
            match r {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        let rel = self.rel(ino).unwrap_or_default();
        self.gate(&[&rel], move || reply.ok());
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.st.lock().unwrap().files.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let (Some(rel), Some(f)) = (self.rel(ino), self.file(fh)) else {
            return reply.error(Errno::EBADF);
        };
        self.gate(&[&rel], move || match f.sync_all() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let Some(rel) = self.rel(ino) else {
            return reply.error(Errno::ENOENT);
        };
        self.gate(&[&rel], move || {
            reply.opened(FileHandle(0), FopenFlags::empty())
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(rel) = self.rel(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let (st, full) = (self.st.clone(), self.full(&rel));
        self.gate(&[&rel.clone()], move || {
            let rd = match std::fs::read_dir(&full) {
                Ok(rd) => rd,
                Err(e) => return reply.error(errno(e)),
            };
            let mut names: Vec<(OsString, FileType)> = vec![
                (".".into(), FileType::Directory),
                ("..".into(), FileType::Directory),
            ];
            for e in rd.flatten() {
                let kind = match e.file_type() {
                    Ok(t) if t.is_dir() => FileType::Directory,
                    Ok(t) if t.is_symlink() => FileType::Symlink,
                    _ => FileType::RegularFile,
                };
                names.push((e.file_name(), kind));
            }
            for (i, (name, kind)) in names.into_iter().enumerate().skip(offset as usize) {
                let child = if name == "." || name == ".." {
                    ino.0
                } else {
                    st.lock().unwrap().ino(&rel.join(&name))
                };
                if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                    break;
                }
            }
            reply.ok()
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::statvfs(&self.root) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                255,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let rel = self.rel(ino).unwrap_or_default();
        self.gate(&[&rel], move || reply.ok());
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        let (st, root) = (self.st.clone(), self.root.clone());
        self.gate(&[&rel.clone()], move || {
            let full = root.join(&rel);
            let acc = flags & libc::O_ACCMODE;
            let f = std::fs::OpenOptions::new()
                .read(acc != libc::O_WRONLY)
                .write(acc != libc::O_RDONLY)
                .create(true)
                .mode(mode & !umask & 0o7777)
                .custom_flags(flags & (libc::O_EXCL | libc::O_APPEND | libc::O_TRUNC))
                .open(&full);
            let f = match f {
                Ok(f) => f,
                Err(e) => return reply.error(errno(e)),
            };
            let m = match f.metadata() {
                Ok(m) => m,
                Err(e) => return reply.error(errno(e)),
            };
            let mut t = st.lock().unwrap();
            let ino = t.ino(&rel);
            let fh = t.next_fh;
            t.next_fh += 1;
            t.files.insert(fh, Arc::new(f));
            drop(t);
            reply.created(
                &TTL,
                &attr(ino, &m),
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            )
        });
    }
}
