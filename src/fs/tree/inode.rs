//! The inode table: every inode the kernel may hold, each named by its
//! parent and name.
//!
//! A file inode is one *version* of an object (its key and ETag): when an
//! object is replaced, its name gets a new inode, and the old one lives on,
//! unnamed, for as long as the kernel holds it (open files read the version
//! they opened, with their own page cache and size). Nothing about an
//! inode ever changes but its bookkeeping, so the kernel may cache it as
//! long as it likes.
//!
//! An inode lives while the kernel holds it (`lookups`, counted as the
//! kernel counts: one per successful lookup and readdirplus entry, less
//! what `forget` returns), while it has named children, or while a
//! listing of its folder within the metadata TTL names it. The table
//! itself only counts; [`super::Tree`] decides when to collect.
//!
//! Every name carries a stamp: the order in which the request that told us
//! about it started. Information is only ever replaced by information from
//! a request started later, so an answer that was already on its way when
//! a change was detected can never undo it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::catalog::Dataset;

pub const ROOT_INO: u64 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    File,
    Symlink,
}

/// Attributes of one inode, FUSE-agnostic.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    pub size: u64,
    pub mtime: SystemTime,
}

/// An object version's ETag, kept small: most are an MD5 in hex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Etag {
    Md5([u8; 16]),
    Other(Box<str>),
}

impl Etag {
    pub fn parse(s: &str) -> Etag {
        let mut b = [0u8; 16];
        let lower = s.bytes().all(|c| !c.is_ascii_uppercase());
        match hex::decode_to_slice(s, &mut b) {
            Ok(()) if lower => Etag::Md5(b),
            _ => Etag::Other(s.into()),
        }
    }
}

impl std::fmt::Display for Etag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Etag::Md5(b) => f.write_str(&hex::encode(b)),
            Etag::Other(s) => f.write_str(s),
        }
    }
}

/// What a file inode is: one version of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub size: u64,
    /// `Last-Modified`, in milliseconds since the epoch (S3's precision;
    /// half the size of a `SystemTime`, and there is one per object).
    pub mtime_ms: i64,
    pub etag: Etag,
}

impl Version {
    pub fn new(size: u64, mtime: SystemTime, etag: Etag) -> Self {
        let mtime_ms = match mtime.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_millis().min(i64::MAX as u128) as i64,
            Err(e) => -(e.duration().as_millis().min(i64::MAX as u128) as i64),
        };
        Self {
            size,
            mtime_ms,
            etag,
        }
    }

    pub fn mtime(&self) -> SystemTime {
        let d = Duration::from_millis(self.mtime_ms.unsigned_abs());
        if self.mtime_ms >= 0 {
            UNIX_EPOCH + d
        } else {
            UNIX_EPOCH - d
        }
    }
}

#[derive(Clone)]
pub enum Kind {
    Root,
    /// A handle prefix (`10378.1`): the inode's name.
    Prefix,
    /// A dataset's top folder: its S3 prefix is the dataset's.
    Dataset(Arc<Dataset>),
    /// A folder below a dataset's top: its whole key prefix, ending in `/`.
    Folder {
        ds: Arc<Dataset>,
        prefix: Arc<str>,
    },
    /// One object version; its key is its folder's prefix plus its name.
    File {
        ds: Arc<Dataset>,
        version: Version,
    },
    /// `by-name/`.
    ByName,
    /// `by-name/<name>` → `../<prefix>/<suffix>`.
    Link(Box<str>),
}

impl Kind {
    pub fn file_kind(&self) -> FileKind {
        match self {
            Kind::File { .. } => FileKind::File,
            Kind::Link(_) => FileKind::Symlink,
            _ => FileKind::Directory,
        }
    }

    /// The dataset and key prefix of a folder inside a dataset.
    pub fn folder(&self) -> Option<(&Arc<Dataset>, &str)> {
        match self {
            Kind::Dataset(ds) => Some((ds, &ds.prefix)),
            Kind::Folder { ds, prefix } => Some((ds, prefix)),
            _ => None,
        }
    }

    /// Whether `self` and `other` are the same thing (the same version of
    /// an object, the same folder): then an inode can stand for both.
    fn same(&self, other: &Kind) -> bool {
        match (self, other) {
            (Kind::File { ds: a, version: v }, Kind::File { ds: b, version: w }) => {
                // Without an ETag (some S3-compatible stores), the time
                // tells versions apart.
                a.handle == b.handle
                    && v.etag == w.etag
                    && v.size == w.size
                    && (v.etag != Etag::Other("".into()) || v.mtime_ms == w.mtime_ms)
            }
            (Kind::Folder { prefix: a, .. }, Kind::Folder { prefix: b, .. }) => a == b,
            (Kind::Dataset(a), Kind::Dataset(b)) => a.handle == b.handle,
            (Kind::Link(a), Kind::Link(b)) => a == b,
            (Kind::Root, Kind::Root)
            | (Kind::Prefix, Kind::Prefix)
            | (Kind::ByName, Kind::ByName) => true,
            _ => false,
        }
    }
}

pub struct Inode {
    pub parent: u64,
    pub name: Arc<str>,
    pub kind: Kind,
    /// References the kernel holds (lookups replied, less those forgotten).
    pub lookups: u32,
    /// When the request that told us about it started.
    pub stamp: u64,
    /// Out of date: a newer version replaced it, it vanished, or a read met
    /// a changed object. Opens fail with ESTALE (the kernel then looks the
    /// name up again) and lookups ask S3 again.
    pub stale: bool,
}

pub struct InodeTable {
    nodes: HashMap<u64, Inode>,
    /// Each folder's names → the inode each stands for now.
    names: HashMap<u64, HashMap<Arc<str>, u64>>,
    next_ino: u64,
    mounted_at: SystemTime,
}

impl InodeTable {
    pub fn new(mounted_at: SystemTime) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_INO,
            Inode {
                parent: ROOT_INO,
                name: "".into(),
                kind: Kind::Root,
                lookups: 1,
                stamp: 0,
                stale: false,
            },
        );
        Self {
            nodes,
            names: HashMap::new(),
            next_ino: ROOT_INO + 1,
            mounted_at,
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Inode> {
        self.nodes.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Inode> {
        self.nodes.get_mut(&ino)
    }

    /// The inode `name` in `parent` stands for now.
    pub fn child(&self, parent: u64, name: &str) -> Option<u64> {
        self.names.get(&parent)?.get(name).copied()
    }

    /// The names in `parent` and their inodes.
    pub fn children(&self, parent: u64) -> Vec<(Arc<str>, u64)> {
        self.names
            .get(&parent)
            .map(|m| m.iter().map(|(n, i)| (n.clone(), *i)).collect())
            .unwrap_or_default()
    }

    pub fn has_children(&self, ino: u64) -> bool {
        self.names.get(&ino).is_some_and(|m| !m.is_empty())
    }

    pub fn attr(&self, ino: u64) -> Option<Attr> {
        self.nodes.get(&ino).map(|n| self.attr_of(ino, &n.kind))
    }

    pub fn attr_of(&self, ino: u64, kind: &Kind) -> Attr {
        let (size, mtime) = match kind {
            Kind::File { version, .. } => (version.size, version.mtime()),
            Kind::Link(target) => (target.len() as u64, self.mounted_at),
            Kind::Dataset(ds) => (0, ds.updated),
            _ => (0, self.mounted_at),
        };
        Attr {
            ino,
            kind: kind.file_kind(),
            size,
            mtime,
        }
    }

    /// Records what a request started at `stamp` learned: `name` in
    /// `parent` is `kind`. Returns the inode the name stands for now: the
    /// same one if nothing changed, a new one for a new version (the old
    /// one turns stale and unnamed), or the present one untouched if it
    /// comes from a request started later than this one.
    pub fn install(&mut self, parent: u64, name: &str, kind: Kind, stamp: u64) -> u64 {
        if let Some(ino) = self.child(parent, name) {
            if let Some(node) = self.nodes.get_mut(&ino) {
                if node.stamp > stamp {
                    return ino;
                }
                if node.kind.same(&kind) {
                    node.stamp = stamp;
                    node.stale = false;
                    node.kind = kind;
                    return ino;
                }
            }
            self.unname(parent, name);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let name: Arc<str> = name.into();
        self.nodes.insert(
            ino,
            Inode {
                parent,
                name: name.clone(),
                kind,
                lookups: 0,
                stamp,
                stale: false,
            },
        );
        self.names.entry(parent).or_default().insert(name, ino);
        ino
    }

    /// `name` in `parent` is gone, as a request started at `stamp` found.
    /// Ignored if a later request told us otherwise. Returns whether it was
    /// taken away.
    pub fn remove_name(&mut self, parent: u64, name: &str, stamp: u64) -> bool {
        let Some(ino) = self.child(parent, name) else {
            return false;
        };
        if self.nodes.get(&ino).is_some_and(|n| n.stamp > stamp) {
            return false;
        }
        self.unname(parent, name);
        true
    }

    /// Takes `name` away from its inode, which turns stale (the kernel may
    /// still hold it) or goes at once if nobody holds it.
    fn unname(&mut self, parent: u64, name: &str) {
        let Some(map) = self.names.get_mut(&parent) else {
            return;
        };
        let Some(ino) = map.remove(name) else {
            return;
        };
        if map.is_empty() {
            self.names.remove(&parent);
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.stale = true;
            if node.lookups == 0 && !self.names.contains_key(&ino) {
                self.nodes.remove(&ino);
            }
        }
    }

    /// Marks `ino` out of date as of `stamp` (a read met another version):
    /// listings already on their way cannot make it current again. Returns
    /// its folder and name the first time only (to tell the kernel once).
    pub fn mark_stale(&mut self, ino: u64, stamp: u64) -> Option<(u64, Arc<str>)> {
        let node = self.nodes.get_mut(&ino)?;
        node.stamp = node.stamp.max(stamp);
        if std::mem::replace(&mut node.stale, true) {
            return None;
        }
        Some((node.parent, node.name.clone()))
    }

    /// The kernel took one more reference to `ino`.
    pub fn count_lookup(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.lookups = n.lookups.saturating_add(1);
        }
    }

    /// The kernel dropped `n` references to `ino`; returns whether none are left.
    pub fn forget(&mut self, ino: u64, n: u64) -> bool {
        match self.nodes.get_mut(&ino) {
            Some(node) if ino != ROOT_INO => {
                node.lookups = node.lookups.saturating_sub(n.min(u32::MAX as u64) as u32);
                node.lookups == 0
            }
            _ => false,
        }
    }

    /// Removes `ino` (and its name, if it still has it); returns its
    /// parent. The caller has checked nothing holds it.
    pub fn remove(&mut self, ino: u64) -> Option<u64> {
        if ino == ROOT_INO {
            return None;
        }
        let node = self.nodes.remove(&ino)?;
        if self.child(node.parent, &node.name) == Some(ino) {
            if let Some(map) = self.names.get_mut(&node.parent) {
                map.remove(&*node.name);
                if map.is_empty() {
                    self.names.remove(&node.parent);
                }
            }
        }
        Some(node.parent)
    }

    /// Inodes in the table.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(ds: &Arc<Dataset>, etag: &str, size: u64) -> Kind {
        Kind::File {
            ds: ds.clone(),
            version: Version::new(size, SystemTime::UNIX_EPOCH, Etag::parse(etag)),
        }
    }

    #[test]
    fn an_inode_stays_small() {
        // Per known object: measured as a whole by tests/memory.rs.
        assert!(
            std::mem::size_of::<Inode>() <= 88,
            "{}",
            std::mem::size_of::<Inode>()
        );
        let t = UNIX_EPOCH + Duration::from_millis(1_764_000_000_123);
        assert_eq!(Version::new(1, t, Etag::parse("x")).mtime(), t);
    }

    #[test]
    fn etags_are_compact_and_round_trip() {
        let md5 = "0123456789abcdef0123456789abcdef";
        assert!(matches!(Etag::parse(md5), Etag::Md5(_)));
        assert_eq!(Etag::parse(md5).to_string(), md5);
        for other in ["abc-12", "0123456789ABCDEF0123456789ABCDEF", ""] {
            assert!(matches!(Etag::parse(other), Etag::Other(_)));
            assert_eq!(Etag::parse(other).to_string(), other);
        }
    }

    #[test]
    fn a_new_version_gets_a_new_inode_and_old_news_never_wins() {
        let ds = super::super::catalog::tests::dataset("1/2");
        let mut t = InodeTable::new(SystemTime::UNIX_EPOCH);
        let v1 = t.install(ROOT_INO, "f", file(&ds, "aa", 4), 10);
        assert_eq!(t.install(ROOT_INO, "f", file(&ds, "aa", 4), 11), v1);
        t.count_lookup(v1);
        let v2 = t.install(ROOT_INO, "f", file(&ds, "bb", 8), 12);
        assert_ne!(v1, v2);
        assert!(t.get(v1).unwrap().stale, "the old version is stale");
        assert_eq!(t.attr(v1).unwrap().size, 4, "and keeps its size");
        // A listing page fetched before the change cannot bring v1 back.
        assert_eq!(t.install(ROOT_INO, "f", file(&ds, "aa", 4), 11), v2);
        assert!(!t.remove_name(ROOT_INO, "f", 11));
        assert!(t.remove_name(ROOT_INO, "f", 13));
        assert_eq!(t.child(ROOT_INO, "f"), None);
        // v2 was never held by the kernel: gone with its name; v1 waits.
        assert!(t.get(v2).is_none());
        assert!(t.forget(v1, 1));
        assert_eq!(t.remove(v1), Some(ROOT_INO));
        assert_eq!(t.len(), 1);
    }
}
