//! The fuser adapter: one thin method per FUSE operation.
//!
//! Every operation that may touch the network is handed to a tokio task with
//! its reply, so the FUSE worker threads never wait on S3 or the API.
//! Errors become errnos here and only here ([`errno`]), logged once.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;
use tracing::{debug, info_span, warn, Instrument};

use super::dirstream::{Chunk, DirStream};
use super::tree::{Attr, FileKind, Tree};
use super::FsError;
use crate::read::{OpenFile, Reader};

/// Ownership and modes shown for every inode.
#[derive(Clone, Debug)]
pub struct FuseConfig {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
}

impl Default for FuseConfig {
    fn default() -> Self {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Self {
            uid,
            gid,
            file_mode: 0o444,
            dir_mode: 0o555,
        }
    }
}

/// The one place where errors become errnos.
pub fn errno(e: &FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::PermissionDenied(_) => Errno::EACCES,
        FsError::Stale => Errno::ESTALE,
        FsError::ReadOnly => Errno::EROFS,
        FsError::BadHandle => Errno::EBADF,
        FsError::Invalid => Errno::EINVAL,
        FsError::Io(_) => Errno::EIO,
    }
}

fn log_failure(op: &str, e: &FsError) {
    match e {
        // Expected answers, or already logged once where they arose.
        FsError::NotFound | FsError::PermissionDenied(_) => debug!(op, error = %e, "failed"),
        _ => warn!(op, error = %e, "failed"),
    }
}

pub struct ProvenaFs {
    tree: Arc<Tree>,
    reader: Arc<Reader>,
    /// ETag each file had when last opened: an unchanged object keeps the
    /// kernel's page cache across opens (FOPEN_KEEP_CACHE).
    opened_etags: Arc<Mutex<HashMap<u64, String>>>,
    /// Set once mounted: lets us drop the kernel's cached pages and
    /// attributes of a file that changed remotely.
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    cfg: FuseConfig,
    rt: Handle,
    files: Arc<Mutex<HashMap<u64, Arc<OpenFile>>>>,
    dirs: Arc<Mutex<HashMap<u64, Arc<DirStream>>>>,
    next_fh: AtomicU64,
}

impl ProvenaFs {
    pub fn new(tree: Arc<Tree>, reader: Arc<Reader>, cfg: FuseConfig, rt: Handle) -> Self {
        Self {
            tree,
            reader,
            opened_etags: Default::default(),
            notifier: Default::default(),
            cfg,
            rt,
            files: Default::default(),
            dirs: Default::default(),
            next_fh: AtomicU64::new(1),
        }
    }

    /// Where the mount code puts the session's notifier.
    pub fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        fuse_attr(&self.cfg, a)
    }

    fn fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }
}

fn fuse_attr(cfg: &FuseConfig, a: &Attr) -> FileAttr {
    let (kind, perm, nlink) = match a.kind {
        FileKind::Directory => (FileType::Directory, cfg.dir_mode, 2),
        FileKind::File => (FileType::RegularFile, cfg.file_mode, 1),
        FileKind::Symlink => (FileType::Symlink, 0o777, 1),
    };
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind,
        perm,
        nlink,
        uid: cfg.uid,
        gid: cfg.gid,
        rdev: 0,
        blksize: 128 * 1024,
        flags: 0,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Filesystem for ProvenaFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        use fuser::InitFlags;
        let want = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS;
        if let Err(missing) = config.add_capabilities(want) {
            debug!(?missing, "kernel lacks some FUSE capabilities");
        }
        let _ = config.set_max_readahead(1024 * 1024);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str().map(str::to_string) else {
            reply.error(Errno::ENOENT);
            return;
        };
        let tree = self.tree.clone();
        let cfg = self.cfg.clone();
        let span = info_span!("lookup", parent = parent.0, name = %name);
        self.rt.spawn(
            async move {
                match tree.lookup(parent.0, &name).await {
                    Ok(a) => {
                        let ttl = tree.ttl();
                        reply.entry(&ttl, &fuse_attr(&cfg, &a), Generation(0))
                    }
                    Err(FsError::NotFound) => {
                        // A negative entry the kernel may cache for the TTL.
                        reply.error(Errno::ENOENT)
                    }
                    Err(e) => {
                        log_failure("lookup", &e);
                        reply.error(errno(&e))
                    }
                }
            }
            .instrument(span),
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _s = info_span!("getattr", ino = ino.0).entered();
        match self.tree.getattr(ino.0) {
            Ok(a) => reply.attr(&self.tree.ttl(), &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _s = info_span!("readlink", ino = ino.0).entered();
        match self.tree.readlink(ino.0) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            reply.error(Errno::EROFS);
            return;
        }
        let fh = self.fh();
        let (tree, reader) = (self.tree.clone(), self.reader.clone());
        let (files, etags) = (self.files.clone(), self.opened_etags.clone());
        let span = info_span!("open", ino = ino.0);
        self.rt.spawn(
            async move {
                match tree.file_fresh(ino.0).await {
                    Ok(f) => {
                        let etag = f.meta.etag.clone();
                        let same = lock(&etags).insert(ino.0, etag.clone()) == Some(etag);
                        let flags = if same {
                            FopenFlags::FOPEN_KEEP_CACHE
                        } else {
                            FopenFlags::empty()
                        };
                        lock(&files).insert(fh, Arc::new(reader.open(f)));
                        reply.opened(FileHandle(fh), flags);
                    }
                    Err(e) => {
                        log_failure("open", &e);
                        reply.error(errno(&e))
                    }
                }
            }
            .instrument(span),
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(file) = lock(&self.files).get(&fh.0).cloned() else {
            reply.error(Errno::EBADF);
            return;
        };
        let reader = self.reader.clone();
        let (tree, notifier) = (self.tree.clone(), self.notifier.clone());
        let span = info_span!("read", ino = ino.0, offset, size);
        self.rt.spawn(
            async move {
                match reader.read(&file, offset, size).await {
                    Ok(b) => reply.data(&b),
                    Err(e) => {
                        log_failure("read", &e);
                        reply.error(errno(&e));
                        if let FsError::Stale = e {
                            tree.mark_stale(ino.0);
                            // Drop the kernel's cached attributes (the size
                            // may have changed). Attributes only: dropping
                            // pages would wait on page locks held by reads
                            // that only our runtime can answer (a deadlock,
                            // seen in tests). The page cache goes at the
                            // next open, which sees a new ETag. Off the
                            // runtime, so no worker ever blocks on the kernel.
                            if let Some(n) = notifier.get().cloned() {
                                std::thread::spawn(move || {
                                    let _ = n.inval_inode(ino, -1, 0);
                                });
                            }
                        }
                    }
                }
            }
            .instrument(span),
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.files).remove(&fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _s = info_span!("opendir", ino = ino.0).entered();
        let (stream, drive) = match self.tree.open_dir(ino.0) {
            Ok(v) => v,
            Err(e) => return reply.error(errno(&e)),
        };
        if drive {
            // The listing outlives this call: later readdirs read it as it grows.
            let tree = self.tree.clone();
            let s = stream.clone();
            let span = info_span!("list_dir", ino = ino.0);
            self.rt
                .spawn(async move { tree.drive(ino.0, &s).await }.instrument(span));
        }
        let dirs = self.dirs.clone();
        let fh = self.fh();
        let span = info_span!("opendir_wait", ino = ino.0);
        self.rt.spawn(
            async move {
                // Wait for the first page, so a folder that cannot be listed
                // (no permission, no such dataset) fails at opendir.
                match stream.wait_started().await {
                    Ok(()) => {
                        lock(&dirs).insert(fh, stream);
                        reply.opened(FileHandle(fh), FopenFlags::empty());
                    }
                    Err(e) => {
                        log_failure("opendir", &e);
                        reply.error(errno(&e))
                    }
                }
            }
            .instrument(span),
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let _s = info_span!("readdir", ino = ino.0, offset).entered();
        let Some(stream) = lock(&self.dirs).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let from = offset.saturating_sub(2) as usize;
        match stream.try_from(from) {
            Some(r) => fill_dir(ino.0, offset, r, reply),
            None => {
                self.rt.spawn(async move {
                    let r = stream.wait_from(from).await;
                    fill_dir(ino.0, offset, r, reply)
                });
            }
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let _s = info_span!("readdirplus", ino = ino.0, offset).entered();
        let Some(stream) = lock(&self.dirs).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let dot = match self.tree.getattr(ino.0) {
            Ok(a) => self.attr(&a),
            Err(e) => return reply.error(errno(&e)),
        };
        let cfg = self.cfg.clone();
        let ttl = self.tree.ttl();
        let from = offset.saturating_sub(2) as usize;
        match stream.try_from(from) {
            Some(r) => fill_dir_plus(&cfg, ttl, dot, offset, r, reply),
            None => {
                self.rt.spawn(async move {
                    let r = stream.wait_from(from).await;
                    fill_dir_plus(&cfg, ttl, dot, offset, r, reply)
                });
            }
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if mask.bits() & libc::W_OK != 0 {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Terminal probes (TCGETS from Python's open) and the like: not a tty.
        reply.error(Errno::ENOTTY);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // No extended attributes. ENOSYS (not ENODATA) makes the kernel
        // stop asking: `ls -l` would otherwise send two per file
        // (security.selinux, system.posix_acl_access), 200,000 round trips
        // for a folder of 100,000.
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    // Everything that would change the tree: read-only.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _r: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _t: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _req: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _i: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _o: u64,
        _l: u64,
        _m: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}

/// Offsets: 1 and 2 are `.` and `..`; entry `i` of the listing is `i + 3`.
fn fill_dir(ino: u64, offset: u64, r: Result<Chunk, FsError>, mut reply: ReplyDirectory) {
    let chunk = match r {
        Ok(c) => c,
        Err(e) => {
            log_failure("readdir", &e);
            return reply.error(errno(&e));
        }
    };
    for (i, name) in [(0u64, "."), (1, "..")] {
        if offset <= i && reply.add(INodeNo(ino), i + 1, FileType::Directory, name) {
            return reply.ok();
        }
    }
    let base = offset.max(2);
    for (k, e) in chunk.entries.iter().enumerate() {
        let kind = match e.attr.kind {
            FileKind::Directory => FileType::Directory,
            FileKind::File => FileType::RegularFile,
            FileKind::Symlink => FileType::Symlink,
        };
        if reply.add(INodeNo(e.attr.ino), base + k as u64 + 1, kind, &e.name) {
            break;
        }
    }
    reply.ok();
}

fn fill_dir_plus(
    cfg: &FuseConfig,
    ttl: Duration,
    dot: FileAttr,
    offset: u64,
    r: Result<Chunk, FsError>,
    mut reply: ReplyDirectoryPlus,
) {
    let chunk = match r {
        Ok(c) => c,
        Err(e) => {
            log_failure("readdirplus", &e);
            return reply.error(errno(&e));
        }
    };
    for (i, name) in [(0u64, "."), (1, "..")] {
        // `.` and `..` carry no lookup count; zero TTL keeps it so.
        if offset <= i
            && reply.add(
                INodeNo(dot.ino.0),
                i + 1,
                name,
                &Duration::ZERO,
                &dot,
                Generation(0),
            )
        {
            return reply.ok();
        }
    }
    let base = offset.max(2);
    for (k, e) in chunk.entries.iter().enumerate() {
        if reply.add(
            INodeNo(e.attr.ino),
            base + k as u64 + 1,
            &e.name,
            &ttl,
            &fuse_attr(cfg, &e.attr),
            Generation(0),
        ) {
            break;
        }
    }
    reply.ok();
}
