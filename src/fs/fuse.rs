//! The fuser adapter: one thin method per FUSE operation.
//!
//! Every operation that may touch the network is handed to a tokio task
//! with its reply ([`ProvenaFs::run`]), so the FUSE worker threads never
//! wait on S3 or the API. Each such task answers within the request
//! timeout (ETIMEDOUT otherwise) and at once when the process it works
//! for is being killed (EINTR), so no process ever hangs in the kernel
//! waiting for us. Errors become errnos here and only here ([`errno`]),
//! logged once.
//!
//! Interrupts: the kernel sends `FUSE_INTERRUPT` when the waiting process
//! gets any signal it handles or dies of. Only the second ends the
//! request: answering EINTR to a SIGCHLD or SIGALRM a program handles
//! would fail its `stat` or `read` of a regular file, which programs do not
//! expect (modern NFS behaves the same: only fatal signals interrupt). For
//! a caught signal the request goes on, watched until it ends in case a
//! fatal signal follows (the kernel sends no second interrupt).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, RequestId, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tracing::{debug, info_span, Instrument, Span};

use super::passthrough::Passthrough;
use super::tree::{Attr, Chunk, DirStream, FileKind, Tree};
use super::FsError;
use crate::provenance::{Manifest, Opened, Tally, WhoCache};
use crate::read::{OpenFile, Reader};
use crate::retry::Deadline;

/// Ownership and modes shown for every inode.
#[derive(Clone, Debug)]
pub struct FuseConfig {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    /// Bound of every operation (`--request-timeout`).
    pub request_timeout: Duration,
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
            request_timeout: crate::retry::DEFAULT_REQUEST_TIMEOUT,
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
        FsError::TimedOut => Errno::ETIMEDOUT,
        FsError::Interrupted => Errno::EINTR,
        FsError::Io(_) => Errno::EIO,
    }
}

/// A reply that can carry an error: every reply type of fuser.
trait Fail {
    fn fail(self, e: Errno);
}

macro_rules! fail_impl {
    ($($t:ty),*) => {$(
        impl Fail for $t {
            fn fail(self, e: Errno) {
                self.error(e)
            }
        }
    )*};
}
fail_impl!(
    ReplyEntry,
    ReplyData,
    ReplyOpen,
    ReplyDirectory,
    ReplyDirectoryPlus
);

/// How many of each FUSE operation this mount answered, for the stats line.
#[derive(Default)]
pub struct OpCounts {
    pub lookup: AtomicU64,
    pub forget: AtomicU64,
    pub getattr: AtomicU64,
    pub open: AtomicU64,
    pub read: AtomicU64,
    pub opendir: AtomicU64,
    pub readdir: AtomicU64,
    pub interrupted: AtomicU64,
    pub timed_out: AtomicU64,
    /// Bytes returned to readers.
    pub bytes_read: AtomicU64,
    /// Every error answered, counted and its cause logged once.
    pub errors: super::errors::ErrorLog,
}

/// What a mount holds and has done, for `SIGUSR1` and the unmount line.
#[derive(Clone)]
pub struct MountStats {
    tree: Arc<Tree>,
    reader: Arc<Reader>,
    files: Arc<Mutex<HashMap<u64, OpenHandle>>>,
    ops: Arc<OpCounts>,
    manifest: Arc<Manifest>,
    passthrough: Arc<Passthrough>,
}

/// An open file and what its reads add to in the read manifest.
type OpenHandle = (Arc<OpenFile>, Arc<Tally>);

impl MountStats {
    /// What the mount's readers read.
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// Bytes returned to readers.
    pub fn bytes_read(&self) -> u64 {
        self.ops.bytes_read.load(Ordering::Relaxed)
    }

    /// Blocks found in the memory or disk cache, and blocks fetched.
    pub fn cache_hits_misses(&self) -> (u64, u64) {
        let s = &self.reader.stats;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (n(&s.memory_hits) + n(&s.disk_hits), n(&s.misses))
    }

    /// The errors answered to readers.
    pub fn errors(&self) -> &super::errors::ErrorLog {
        &self.ops.errors
    }

    /// Datasets whose folders this mount has resolved.
    pub fn datasets(&self) -> usize {
        self.tree.stats().datasets
    }

    /// One line: inodes, listings, negative names, open files, blocks in
    /// flight, cache hits and misses, FUSE operations.
    pub fn line(&self) -> String {
        let t = self.tree.stats();
        let s = &self.reader.stats;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let o = &self.ops;
        let fields: [(&str, u64); 26] = [
            ("inodes", t.inodes as u64),
            ("listings", t.listings as u64),
            ("negative", t.negative as u64),
            ("open_files", lock(&self.files).len() as u64),
            ("fetches_in_flight", self.reader.fetches_in_flight() as u64),
            ("memory_hits", n(&s.memory_hits)),
            ("disk_hits", n(&s.disk_hits)),
            ("misses", n(&s.misses)),
            ("disk_writes", n(&s.disk_writes)),
            ("disk_meta_ops", self.reader.disk_meta_ops()),
            ("buys", n(&s.buys)),
            ("follows_stopped", n(&s.follows_stopped)),
            ("hinted", n(&s.hinted)),
            ("waits", n(&s.waits)),
            ("passthrough_opens", n(&self.passthrough.opens)),
            ("lookups", n(&o.lookup)),
            ("forgets", n(&o.forget)),
            ("getattrs", n(&o.getattr)),
            ("opens", n(&o.open)),
            ("reads", n(&o.read)),
            ("opendirs", n(&o.opendir)),
            ("readdirs", n(&o.readdir)),
            ("interrupted", n(&o.interrupted)),
            ("timed_out", n(&o.timed_out)),
            ("bytes_read", n(&o.bytes_read)),
            ("errors", o.errors.count()),
        ];
        fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// An operation running on a task, as an interrupt finds it.
struct InFlight {
    /// The thread that made the request.
    pid: u32,
    /// Ends the operation with EINTR.
    cancel: Option<oneshot::Sender<()>>,
    /// A caught signal interrupted it: watched for a fatal one.
    watched: bool,
}

/// Whether thread `pid` is being killed: a signal pending that it neither
/// catches nor ignores and whose default action ends it (the kernel turns
/// most into SIGKILL; SIGQUIT, SIGABRT and others that dump core stay as
/// they are), or it is gone. A thread we cannot see (another PID
/// namespace, `/proc` mounted `hidepid`) counts as not being killed: its
/// operation then ends at its bound, never by a caught signal.
fn being_killed(pid: u32) -> bool {
    let status = match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && pid != 0 => return true,
        Err(_) => return false,
    };
    let mask = |field: &str| {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
            .unwrap_or(0)
    };
    let bit = |sig: i32| 1u64 << (sig - 1);
    let pending = mask("SigPnd:") | mask("ShdPnd:");
    if pending & bit(libc::SIGKILL) != 0 {
        return true;
    }
    // Signals whose default action is not to end the process.
    let harmless = [
        libc::SIGCHLD,
        libc::SIGCONT,
        libc::SIGURG,
        libc::SIGWINCH,
        libc::SIGSTOP,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
    ]
    .iter()
    .fold(0u64, |m, s| m | bit(*s));
    pending & !(mask("SigCgt:") | mask("SigIgn:")) & !harmless != 0
}

/// Ends operation `unique` with EINTR, if it is still running.
fn cancel(interrupts: &Mutex<HashMap<u64, InFlight>>, unique: u64) {
    let tx = lock(interrupts)
        .get_mut(&unique)
        .and_then(|op| op.cancel.take());
    if let Some(tx) = tx {
        let _ = tx.send(());
    }
}

/// Removes an operation's entry however its task ends (even by a panic).
struct Registered(Arc<Mutex<HashMap<u64, InFlight>>>, u64);

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.0).remove(&self.1);
    }
}

pub struct ProvenaFs {
    tree: Arc<Tree>,
    reader: Arc<Reader>,
    /// Set once mounted: lets us tell the kernel a name changed remotely.
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    cfg: FuseConfig,
    rt: Handle,
    files: Arc<Mutex<HashMap<u64, OpenHandle>>>,
    /// What was read, by whom (`provenafs provenance`).
    manifest: Arc<Manifest>,
    who: WhoCache,
    dirs: Arc<Mutex<HashMap<u64, Arc<DirStream>>>>,
    next_fh: AtomicU64,
    /// Operations in flight on tasks, by request id: how to interrupt each.
    interrupts: Arc<Mutex<HashMap<u64, InFlight>>>,
    ops: Arc<OpCounts>,
    /// Inodes read through a backing file (see `passthrough.rs`).
    passthrough: Arc<Passthrough>,
}

impl ProvenaFs {
    pub fn new(
        tree: Arc<Tree>,
        reader: Arc<Reader>,
        manifest: Arc<Manifest>,
        cfg: FuseConfig,
        rt: Handle,
    ) -> Self {
        Self {
            tree,
            reader,
            manifest,
            who: WhoCache::default(),
            notifier: Default::default(),
            cfg,
            rt,
            files: Default::default(),
            dirs: Default::default(),
            next_fh: AtomicU64::new(1),
            interrupts: Default::default(),
            ops: Default::default(),
            passthrough: Default::default(),
        }
    }

    /// Where the mount code puts the session's notifier.
    pub fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    pub fn stats(&self) -> MountStats {
        MountStats {
            passthrough: self.passthrough.clone(),
            tree: self.tree.clone(),
            reader: self.reader.clone(),
            files: self.files.clone(),
            ops: self.ops.clone(),
            manifest: self.manifest.clone(),
        }
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        fuse_attr(&self.cfg, a)
    }

    fn fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// The deadline of work done for one operation: a little before the
    /// operation's own bound, so the work answers with what happened.
    fn work_deadline(&self) -> Deadline {
        Deadline::after(
            self.cfg
                .request_timeout
                .saturating_sub(Duration::from_millis(100)),
        )
    }

    /// Runs `work` on the runtime and answers with `done(reply, value)`,
    /// or with the error: its own, EINTR if the kernel interrupts the
    /// request first, ETIMEDOUT if it outlasts the request timeout.
    fn run<R, T>(
        &self,
        req: &Request,
        op: &'static str,
        span: Span,
        reply: R,
        work: impl Future<Output = Result<T, FsError>> + Send + 'static,
        done: impl FnOnce(R, T) + Send + 'static,
    ) where
        R: Fail + Send + 'static,
        T: Send + 'static,
    {
        let unique = req.unique().0;
        let (tx, rx) = oneshot::channel::<()>();
        lock(&self.interrupts).insert(
            unique,
            InFlight {
                pid: req.pid(),
                cancel: Some(tx),
                watched: false,
            },
        );
        let registered = Registered(self.interrupts.clone(), unique);
        let ops = self.ops.clone();
        let bound = self.cfg.request_timeout;
        self.rt.spawn(
            async move {
                let outcome = tokio::select! {
                    biased;
                    r = work => r,
                    Ok(()) = rx => Err(FsError::Interrupted),
                    _ = tokio::time::sleep(bound) => Err(FsError::TimedOut),
                };
                drop(registered);
                match outcome {
                    Ok(v) => done(reply, v),
                    Err(e) => {
                        match e {
                            FsError::Interrupted => ops.interrupted.fetch_add(1, Ordering::Relaxed),
                            FsError::TimedOut => ops.timed_out.fetch_add(1, Ordering::Relaxed),
                            _ => 0,
                        };
                        ops.errors.record(op, &e);
                        reply.fail(errno(&e))
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// A read met another version of `ino`'s object (or none): marks it stale
/// and tells the kernel its name may stand for something else now, so the
/// next open looks it up. Off the runtime: the kernel may wait for locks
/// held by requests only our runtime can answer.
fn name_changed(tree: &Tree, notifier: &std::sync::OnceLock<fuser::Notifier>, ino: u64) {
    let Some((parent, name)) = tree.mark_stale(ino) else {
        return;
    };
    if let Some(n) = notifier.get().cloned() {
        std::thread::spawn(move || {
            let _ = n.inval_entry(INodeNo(parent), OsStr::new(&*name));
        });
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

/// What the kernel caches as "no such name" for the TTL: an entry with
/// inode 0 (an ENOENT error would not be cached).
fn negative_attr(cfg: &FuseConfig) -> FileAttr {
    fuse_attr(
        cfg,
        &Attr {
            ino: 0,
            kind: FileKind::File,
            size: 0,
            mtime: SystemTime::UNIX_EPOCH,
        },
    )
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
        // Read-ahead requests the kernel sends without a process waiting
        // on each. The kernel's default (12) lets a few readers stuck on a
        // stalled object hold every slot, and every other file's reads
        // then queue behind them until the stall times out.
        let _ = config.set_max_background(128);
        let _ = config.set_congestion_threshold(96);
        // Passthrough: whole files in the disk cache read by the kernel
        // itself. Only a daemon with CAP_SYS_ADMIN may open backing files
        // (root, here), on Linux 6.9 and later; elsewhere every read comes
        // to us, as before. A stack depth of 1: a backing file on a plain
        // file system (a cache on overlayfs is refused at open_backing,
        // and that open is then cached), and the mount itself can still
        // be an overlay's lower layer.
        if self.reader.keeps_whole_files() && nix::unistd::geteuid().is_root() {
            let granted = config
                .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
                .and_then(|()| {
                    config
                        .set_max_stack_depth(1)
                        .map(drop)
                        .map_err(|_| InitFlags::FUSE_PASSTHROUGH)
                });
            match granted {
                Ok(()) => {
                    self.passthrough.enable();
                    self.reader.enable_whole_files();
                    debug!("FUSE passthrough on: files kept whole in the disk cache are read by the kernel");
                }
                Err(_) => debug!("the kernel has no FUSE passthrough (Linux 6.9 and later): every read comes here"),
            }
        }
        Ok(())
    }

    fn interrupt(&self, _req: &Request, unique: RequestId) -> Result<(), Errno> {
        let Some(pid) = lock(&self.interrupts).get(&unique.0).map(|op| op.pid) else {
            // Not seen yet (another thread is dispatching it), or already
            // answered: the kernel sends it again, or drops it.
            return Err(Errno::EAGAIN);
        };
        // /proc is read without holding the table every operation takes.
        if being_killed(pid) {
            cancel(&self.interrupts, unique.0);
            return Ok(());
        }
        let first = lock(&self.interrupts)
            .get_mut(&unique.0)
            .is_some_and(|op| !std::mem::replace(&mut op.watched, true));
        if first {
            let interrupts = self.interrupts.clone();
            self.rt.spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if !lock(&interrupts).contains_key(&unique.0) {
                        return; // answered meanwhile
                    }
                    if being_killed(pid) {
                        cancel(&interrupts, unique.0);
                        return;
                    }
                }
            });
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.ops.lookup.fetch_add(1, Ordering::Relaxed);
        let Some(name) = name.to_str().map(str::to_string) else {
            reply.error(Errno::ENOENT);
            return;
        };
        let tree = self.tree.clone();
        let cfg = self.cfg.clone();
        let neg_ttl = self.tree.negative_ttl();
        let deadline = self.work_deadline();
        let span = info_span!("lookup", parent = parent.0, name = %name);
        self.run(
            req,
            "lookup",
            span,
            reply,
            async move {
                match tree.lookup(parent.0, &name, deadline).await {
                    Ok(a) => Ok(Some((a, tree.ttl(a.ino)))),
                    Err(FsError::NotFound) => Ok(None),
                    Err(e) => Err(e),
                }
            },
            move |reply, found| match found {
                // Names and attributes inside a released dataset are kept
                // by the kernel for the released TTL.
                Some((a, ttl)) => reply.entry(&ttl, &fuse_attr(&cfg, &a), Generation(0)),
                // A negative entry the kernel caches for the TTL.
                None => reply.entry(&neg_ttl, &negative_attr(&cfg), Generation(0)),
            },
        );
    }

    // fuser's `batch_forget` calls this once per inode (its ForgetOne type
    // is not public, so it cannot be overridden).
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.ops.forget.fetch_add(1, Ordering::Relaxed);
        self.tree.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.ops.getattr.fetch_add(1, Ordering::Relaxed);
        let _s = info_span!("getattr", ino = ino.0).entered();
        match self.tree.getattr(ino.0) {
            Ok(a) => reply.attr(&self.tree.ttl(ino.0), &self.attr(&a)),
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

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.ops.open.fetch_add(1, Ordering::Relaxed);
        let _s = info_span!("open", ino = ino.0).entered();
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            reply.error(Errno::EROFS);
            return;
        }
        // No network: the inode is one version of one object. A stale one
        // answers ESTALE, and the kernel then looks the name up again and
        // opens what is there now.
        match self.tree.open_file(ino.0) {
            Ok(f) => {
                let fh = self.fh();
                // Every open reaches us (reads of cached pages do not):
                // who opened which version is recorded here.
                let tally = self.manifest.opened(
                    &Opened {
                        handle: &f.dataset.handle,
                        name: f.dataset.name.as_deref(),
                        key: &f.meta.key,
                        etag: &f.meta.etag,
                        size: f.meta.size,
                    },
                    self.who.get(req.uid(), req.pid()),
                );
                let of = Arc::new(self.reader.open(f));
                let through = self
                    .passthrough
                    .open(ino.0, &reply, || self.reader.whole_file(&of));
                if through.is_none() {
                    if let Some(recall) = self.reader.recall(&of) {
                        self.rt
                            .spawn(recall.instrument(info_span!("read_hints", ino = ino.0)));
                    }
                    // A series read file after file: the next files too.
                    if self.reader.series_hot(&of) {
                        let depth = self.reader.series_depth(&of);
                        let next = self.tree.files_after(ino.0, depth, |key, size| {
                            self.reader.in_series_of(&of, key, size)
                        });
                        if let Some(ahead) = self.reader.series_ahead(next) {
                            self.rt
                                .spawn(ahead.instrument(info_span!("series_ahead", ino = ino.0)));
                        }
                    }
                }
                lock(&self.files).insert(fh, (of, tally));
                match through {
                    // Read by the kernel from the cache folder's file.
                    Some(id) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id),
                    // Its content never changes: whatever the kernel
                    // cached of this inode stays valid across opens.
                    None => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
                }
            }
            Err(e) => {
                self.ops.errors.record("open", &e);
                reply.error(errno(&e))
            }
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.ops.read.fetch_add(1, Ordering::Relaxed);
        let Some((file, tally)) = lock(&self.files).get(&fh.0).cloned() else {
            reply.error(Errno::EBADF);
            return;
        };
        let reader = self.reader.clone();
        let deadline = self.work_deadline();
        let span = info_span!("read", ino = ino.0, offset, size);
        let (tree, notifier) = (self.tree.clone(), self.notifier.clone());
        let ops = self.ops.clone();
        self.run(
            req,
            "read",
            span,
            reply,
            async move {
                let r = reader.read(&file, offset, size, deadline).await;
                if let Err(FsError::Stale) = r {
                    name_changed(&tree, &notifier, ino.0);
                }
                r
            },
            move |reply, b| {
                ops.bytes_read.fetch_add(b.len() as u64, Ordering::Relaxed);
                tally.read(b.len() as u64);
                reply.data(&b)
            },
        );
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.files).remove(&fh.0);
        self.passthrough.release(ino.0);
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

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.ops.opendir.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("opendir", ino = ino.0);
        let (stream, drive) = match self.tree.open_dir(ino.0) {
            Ok(v) => v,
            Err(e) => return reply.error(errno(&e)),
        };
        if drive {
            // The listing outlives this call: later readdirs read it as it
            // grows, and every page is bounded on its own.
            let tree = self.tree.clone();
            let s = stream.clone();
            let span = info_span!("list_dir", ino = ino.0);
            self.rt
                .spawn(async move { tree.drive(ino.0, &s).await }.instrument(span));
        }
        let dirs = self.dirs.clone();
        let fh = self.fh();
        let s = stream.clone();
        // Wait for the first page, so a folder that cannot be listed (no
        // permission, no such dataset) fails at opendir.
        self.run(
            req,
            "opendir",
            span,
            reply,
            async move { s.wait_started().await },
            move |reply, ()| {
                lock(&dirs).insert(fh, stream);
                reply.opened(FileHandle(fh), FopenFlags::empty());
            },
        );
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        self.ops.readdir.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("readdir", ino = ino.0, offset);
        let Some(stream) = lock(&self.dirs).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let from = offset.saturating_sub(2) as usize;
        let tree = self.tree.clone();
        match ready_chunk(&tree, ino.0, &stream, from) {
            Some(Ok(c)) => fill_dir(&tree, ino.0, offset, from, c, reply),
            Some(Err(e)) => reply.error(errno(&e)),
            None => self.run(
                req,
                "readdir",
                span,
                reply,
                async move {
                    live_chunk(&tree, ino.0, &stream, from)
                        .await
                        .map(|c| (tree, c))
                },
                move |reply, (tree, (at, c))| fill_dir(&tree, ino.0, offset, at, c, reply),
            ),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        self.ops.readdir.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("readdirplus", ino = ino.0, offset);
        let Some(stream) = lock(&self.dirs).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let dot = match self.tree.getattr(ino.0) {
            Ok(a) => self.attr(&a),
            Err(e) => return reply.error(errno(&e)),
        };
        let cfg = self.cfg.clone();
        // The folder's TTL serves its entries: they share its dataset.
        let ttl = self.tree.ttl(ino.0);
        let tree = self.tree.clone();
        let from = offset.saturating_sub(2) as usize;
        let plus = Plus { cfg, ttl, dot };
        match ready_chunk(&tree, ino.0, &stream, from) {
            Some(Ok(c)) => fill_dir_plus(&tree, &plus, ino.0, offset, from, c, reply),
            Some(Err(e)) => reply.error(errno(&e)),
            None => self.run(
                req,
                "readdirplus",
                span,
                reply,
                async move {
                    live_chunk(&tree, ino.0, &stream, from)
                        .await
                        .map(|c| (tree, c))
                },
                move |reply, (tree, (at, c))| {
                    fill_dir_plus(&tree, &plus, ino.0, offset, at, c, reply)
                },
            ),
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
        // As the peers do for object storage: a large fixed size and no
        // free space, so plain `df` lists the mount (it hides file systems
        // of 0 blocks) and nothing thinks it can write here.
        const BLOCK: u32 = 4096;
        const SIZE: u64 = 1 << 50; // 1 PiB
        reply.statfs(SIZE / BLOCK as u64, 0, 0, 0, 0, BLOCK, 255, BLOCK);
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
        // stop asking (it answers EOPNOTSUPP itself from then on): `ls -l`
        // would otherwise send two per file (security.selinux,
        // system.posix_acl_access), 200,000 round trips for a folder of
        // 100,000.
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

/// The chunk of the listing from entry `from`, if it can be answered at
/// once: it is there and holds a live name, or the listing ended there.
fn ready_chunk(
    tree: &Tree,
    dir: u64,
    stream: &DirStream,
    from: usize,
) -> Option<Result<Chunk, FsError>> {
    match stream.try_from(from)? {
        Ok(c) if c.entries.is_empty() || tree.any_live(dir, &c.entries) => Some(Ok(c)),
        Ok(_) => None, // all gone since: skip ahead, on a task
        Err(e) => Some(Err(e)),
    }
}

/// The first chunk from entry `from` on that holds a live name (or the
/// end), waiting for pages as they come, with the index it starts at.
async fn live_chunk(
    tree: &Tree,
    dir: u64,
    stream: &DirStream,
    mut from: usize,
) -> Result<(usize, Chunk), FsError> {
    loop {
        let c = stream.wait_from(from).await?;
        if c.entries.is_empty() || tree.any_live(dir, &c.entries) {
            return Ok((from, c));
        }
        from += c.entries.len();
    }
}

/// Offsets: 1 and 2 are `.` and `..`; entry `i` of the listing is `i + 3`.
/// `at` is the index of the chunk's first entry. Each name is handed out as
/// what it stands for now (see [`Tree::fill`]).
fn fill_dir(
    tree: &Tree,
    ino: u64,
    offset: u64,
    at: usize,
    chunk: Chunk,
    mut reply: ReplyDirectory,
) {
    for (i, name) in [(0u64, "."), (1, "..")] {
        if offset <= i && reply.add(INodeNo(ino), i + 1, FileType::Directory, name) {
            return reply.ok();
        }
    }
    tree.fill(ino, &chunk.entries, false, |k, e, attr| {
        let kind = match e.kind {
            FileKind::Directory => FileType::Directory,
            FileKind::File => FileType::RegularFile,
            FileKind::Symlink => FileType::Symlink,
        };
        reply.add(INodeNo(attr.ino), (at + k) as u64 + 3, kind, &*e.name)
    });
    reply.ok();
}

/// What a readdirplus answer needs besides the entries.
struct Plus {
    cfg: FuseConfig,
    ttl: Duration,
    /// The folder's own attributes, for `.` and `..`.
    dot: FileAttr,
}

fn fill_dir_plus(
    tree: &Tree,
    plus: &Plus,
    ino: u64,
    offset: u64,
    at: usize,
    chunk: Chunk,
    mut reply: ReplyDirectoryPlus,
) {
    for (i, name) in [(0u64, "."), (1, "..")] {
        // `.` and `..` carry no lookup count; zero TTL keeps it so.
        if offset <= i
            && reply.add(
                INodeNo(plus.dot.ino.0),
                i + 1,
                name,
                &Duration::ZERO,
                &plus.dot,
                Generation(0),
            )
        {
            return reply.ok();
        }
    }
    // Every entry taken counts as a kernel reference (readdirplus is a
    // lookup), in the same step as it is handed out.
    tree.fill(ino, &chunk.entries, true, |k, e, attr| {
        reply.add(
            INodeNo(attr.ino),
            (at + k) as u64 + 3,
            &*e.name,
            &plus.ttl,
            &fuse_attr(&plus.cfg, attr),
            Generation(0),
        )
    });
    reply.ok();
}

#[cfg(test)]
mod tests {
    use super::being_killed;
    use std::process::{Command, Stdio};

    /// A stopped child with `sig` pending (a stopped process takes no
    /// signals, so it stays pending), after it set up its handlers.
    fn stopped_with_pending(script: &str, sig: i32) -> std::process::Child {
        let child = Command::new("python3")
            .args(["-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut child = child;
        let mut ready = [0u8; 1];
        use std::io::Read;
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut ready)
            .unwrap();
        let pid = child.id() as i32;
        unsafe {
            libc::kill(pid, libc::SIGSTOP);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        unsafe {
            libc::kill(pid, sig);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        child
    }

    const SETUP: &str = "import signal, sys, time\n\
        signal.signal(signal.SIGUSR2, lambda *a: None)\n\
        sys.stdout.write('r'); sys.stdout.flush()\n\
        time.sleep(60)\n";

    #[test]
    fn only_a_signal_that_ends_the_process_counts_as_being_killed() {
        assert!(!being_killed(std::process::id()));
        assert!(being_killed(u32::MAX - 7), "a process that is gone");
        // Caught and survived: not being killed.
        let mut c = stopped_with_pending(SETUP, libc::SIGUSR2);
        assert!(!being_killed(c.id()));
        let _ = c.kill();
        let _ = c.wait();
        // Default action: core dump (not turned into SIGKILL): killed.
        let mut c = stopped_with_pending(SETUP, libc::SIGQUIT);
        assert!(being_killed(c.id()));
        let _ = c.kill();
        let _ = c.wait();
        // A harmless default (SIGWINCH): not killed.
        let mut c = stopped_with_pending(SETUP, libc::SIGWINCH);
        assert!(!being_killed(c.id()));
        let _ = c.kill();
        let _ = c.wait();
    }
}
