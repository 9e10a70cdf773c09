//! Whole files: a version whose every block is in the folder (bought, see
//! `read/buy.rs`, or prefetched) is also kept as one plain file,
//! `<hash>.whole` in its shard, which the kernel can read directly (FUSE
//! passthrough, Linux 6.9 and later, a root daemon) at the speed of the
//! disk under it: no block files opened, checked and copied per read.
//! Counted and evicted with the blocks (the same shards, the same bound).
//!
//! Only in a folder no one else may write and no other mount uses (not
//! `--cache-shared`, not `--cache-group`): a plain file has no header to
//! check, and the kernel hands its bytes to readers as the object's; a
//! shared folder is trimmed by sampling, which a few large files would
//! throw off. And the kernel reads it only where the folder is on a local
//! file system ([`DiskCache::local`]): a read the kernel sends to a stalled
//! NFS or Lustre server waits as long as the server does, past every
//! bound the mount keeps on its own calls into the folder.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fstat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use sha2::{Digest, Sha256};

use super::fd::open_untrusted;
use super::DiskCache;
use crate::read::cache::{BlockKey, ObjectId};

impl DiskCache {
    /// The name of `id`'s whole file: a hash (its first two hex digits are
    /// its shard, as a block's), then `.whole`.
    fn whole_name(id: &ObjectId) -> String {
        let mut h = Sha256::new();
        h.update(b"whole\n");
        for part in [&id.bucket, &id.key, &id.etag] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        format!("{}.whole", hex::encode(h.finalize()))
    }

    /// Whether whole files may be kept: nobody but this user can write the
    /// folder, and no other mount uses it (see the module docs).
    pub fn keeps_whole_files(&self) -> bool {
        self.file_mode & 0o077 == 0 && !self.shared
    }

    /// Whether the kernel may read this folder's whole files itself: they
    /// are kept, and the folder is on a local file system.
    pub fn hands_whole_files_to_the_kernel(&self) -> bool {
        self.keeps_whole_files() && self.local
    }

    /// `id`'s whole file, open for reading, if it is there, a regular file
    /// of this user's, written by nobody else, of exactly `size` bytes.
    /// Blocking: a call into the folder.
    pub fn open_whole(&self, id: &ObjectId, size: u64) -> Option<OwnedFd> {
        if !self.keeps_whole_files() {
            return None;
        }
        let name = Self::whole_name(id);
        let shard = self.shard(&name)?;
        let fd = open_untrusted(shard, name.as_str()).ok()?;
        let st = fstat(&fd).ok()?;
        let ours = st.st_uid == nix::unistd::geteuid().as_raw();
        let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
        if !ours || !regular || st.st_mode & 0o022 != 0 || st.st_size as u64 != size {
            return None;
        }
        // Opened without blocking on a FIFO; read as a plain file now.
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty())).ok()?;
        // Recently used, for eviction (a minute's precision, as blocks).
        let now = std::time::SystemTime::now();
        let age = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
            - st.st_mtime;
        if age >= 60 {
            let _ = std::fs::File::from(fd.try_clone().ok()?).set_modified(now);
        }
        Some(fd)
    }

    /// The size of `id`'s whole file, if one of this user's is there (not
    /// checked further: see [`DiskCache::open_whole`] for that). Blocking:
    /// one `stat` in the folder.
    pub(super) fn whole_size(&self, id: &ObjectId) -> Option<u64> {
        if !self.keeps_whole_files() {
            return None;
        }
        let name = Self::whole_name(id);
        let st = nix::sys::stat::fstatat(
            self.shard(&name)?,
            name.as_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .ok()?;
        let ours = st.st_uid == nix::unistd::geteuid().as_raw();
        let plain = st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_mode & 0o022 == 0;
        (ours && plain).then_some(st.st_size as u64)
    }

    /// Sets the block size of the mount using the cache (default 1 MiB).
    pub fn set_block_size(&self, bs: u64) {
        self.block_size
            .store(bs, std::sync::atomic::Ordering::Relaxed);
    }

    /// Block `k` (`len` bytes) from its version's whole file, if that is
    /// there (the block files of a version kept whole are removed).
    /// Blocking: a call into the folder.
    pub(super) fn whole_block(&self, k: &BlockKey, len: u64) -> Option<bytes::Bytes> {
        use std::io::{Read, Seek};
        if !self.keeps_whole_files() {
            return None;
        }
        let name = Self::whole_name(&k.object);
        let fd = open_untrusted(self.shard(&name)?, name.as_str()).ok()?;
        let st = fstat(&fd).ok()?;
        let start = k.index * self.block_size.load(std::sync::atomic::Ordering::Relaxed);
        if st.st_uid != nix::unistd::geteuid().as_raw()
            || st.st_mode & libc::S_IFMT != libc::S_IFREG
            || st.st_mode & 0o022 != 0
            || (st.st_size as u64) < start + len
        {
            return None;
        }
        // Into a kept buffer's spare room, exactly `len` bytes or none (no
        // zeroing of what the read is about to fill).
        let mut file = std::fs::File::from(fd);
        file.seek(std::io::SeekFrom::Start(start)).ok()?;
        let mut buf = super::buffers::take(len as usize);
        (&file).take(len).read_to_end(&mut buf).ok()?;
        (buf.len() as u64 == len).then(|| super::buffers::share(buf))
    }

    /// Puts `id`'s blocks (of `block_size`; `size` bytes in all) together
    /// as its whole file, in the background, if there is room: from the
    /// folder, a block missing there (a write dropped while the folder was
    /// busy) from `fill(index, len)`; nothing if that fails too.
    pub fn keep_whole(
        self: &Arc<Self>,
        id: Arc<ObjectId>,
        size: u64,
        block_size: u64,
        fill: impl Fn(u64, u64) -> Option<bytes::Bytes> + Send + 'static,
    ) {
        if !self.keeps_whole_files() || size == 0 {
            return;
        }
        let me = self.clone();
        let _ = self.folder.spawn_patient("write a whole file", move || {
            me.make_whole(&id, size, block_size, &fill);
        });
    }

    /// [`DiskCache::keep_whole`], waited for (`provenafs prefetch`, whose
    /// process ends when it is done), with no fill: a block missing from
    /// the folder means not kept whole. Whether the file is whole now.
    pub async fn keep_whole_now(
        self: &Arc<Self>,
        id: Arc<ObjectId>,
        size: u64,
        block_size: u64,
    ) -> bool {
        if !self.keeps_whole_files() || size == 0 {
            return false;
        }
        let me = self.clone();
        self.folder
            .run_patient("write a whole file", move || {
                Ok(me.make_whole(&id, size, block_size, &|_, _| None))
            })
            .await
            .unwrap_or(false)
    }

    /// Blocking: writes `id`'s whole file if there is room, then removes
    /// its blocks. Whether the file is whole now (`true` too when it was
    /// already).
    fn make_whole(
        self: &Arc<Self>,
        id: &Arc<ObjectId>,
        size: u64,
        block_size: u64,
        fill: &dyn Fn(u64, u64) -> Option<bytes::Bytes>,
    ) -> bool {
        // On the folder's thread: the floor's check may call into it.
        if !self.room_for(0) || !self.fits(size) {
            return false;
        }
        match self.write_whole(id, size, block_size, fill) {
            Ok(true) => {
                tracing::debug!(key = %id.key, size, "kept whole for passthrough");
                // Its blocks are the same bytes again: gone, and read
                // from the whole file from now on (`whole_block`).
                let freed = self.remove_blocks(id, size, block_size);
                let used = self.used.load(std::sync::atomic::Ordering::Relaxed);
                self.used
                    .fetch_sub(freed.min(used), std::sync::atomic::Ordering::Relaxed);
                self.added(size);
                true
            }
            Ok(false) => true,
            Err(e) => {
                tracing::debug!(key = %id.key, error = %e, "not kept whole");
                false
            }
        }
    }

    /// Removes the block files of `id` (kept whole now); the bytes freed.
    /// Blocking: calls into the folder.
    fn remove_blocks(&self, id: &Arc<ObjectId>, size: u64, bs: u64) -> u64 {
        let mut freed = 0;
        for index in 0..size.div_ceil(bs) {
            let k = BlockKey {
                object: id.clone(),
                index,
            };
            let name = Self::name(&k);
            let Some(shard) = self.shard(&name) else {
                continue;
            };
            if unlinkat(shard.as_fd(), name.as_str(), UnlinkatFlags::NoRemoveDir).is_ok() {
                freed += super::header_len(&k) as u64 + (size - index * bs).min(bs);
            }
        }
        freed
    }

    /// Blocking: `Ok(false)` when it is already there.
    fn write_whole(
        &self,
        id: &Arc<ObjectId>,
        size: u64,
        bs: u64,
        fill: &dyn Fn(u64, u64) -> Option<bytes::Bytes>,
    ) -> std::io::Result<bool> {
        let name = Self::whole_name(id);
        let shard = self
            .shard(&name)
            .ok_or_else(|| std::io::Error::other("no shard folder"))?;
        if self.open_whole(id, size).is_some() {
            return Ok(false);
        }
        let tmp = format!(".tmp-whole-{:x}", rand::random::<u64>());
        let fd = openat(
            shard,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(self.file_mode & 0o700),
        )?;
        let written = (|| {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::from(fd));
            for index in 0..size.div_ceil(bs) {
                let len = (size - index * bs).min(bs);
                let k = BlockKey {
                    object: id.clone(),
                    index,
                };
                let block = self
                    .get(&k, len)
                    .or_else(|| fill(index, len))
                    .filter(|b| b.len() as u64 == len)
                    .ok_or_else(|| {
                        std::io::Error::other(format!("block {index} could not be had"))
                    })?;
                out.write_all(&block)?;
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_data()
        })();
        let installed = written.and_then(|()| {
            renameat(shard, tmp.as_str(), shard, name.as_str()).map_err(std::io::Error::from)
        });
        if let Err(e) = installed {
            let _ = unlinkat(shard.as_fd(), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            return Err(e);
        }
        Ok(true)
    }
}
