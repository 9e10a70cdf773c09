//! A directory listing that fills while readers read it.
//!
//! A folder of 100,000 objects takes 100 ListObjectsV2 pages. The first
//! `readdir` is answered as soon as the first page is in; later ones wait
//! only for the entries they ask for. One stream serves every open handle
//! of the folder (and is kept as the folder's listing when complete), so an
//! open handle costs no copy of the listing: readdir offsets are indices
//! into the one append-only list.
//!
//! Entries are names and kinds only: which inode a name stands for is
//! asked of the inode table when the entry is handed out, so a change
//! detected after a page arrived is never undone by that page.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::inode::FileKind;
use crate::fs::FsError;

/// One name of a listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: Arc<str>,
    pub kind: FileKind,
}

#[derive(Default)]
struct State {
    entries: Vec<DirEntry>,
    done: bool,
    error: Option<FsError>,
}

#[derive(Default)]
pub struct DirStream {
    state: Mutex<State>,
    grew: Notify,
}

/// What a reader gets: entries from its offset (possibly none if the
/// listing ended there).
pub struct Chunk {
    pub entries: Vec<DirEntry>,
    pub done: bool,
}

/// Most entries handed out per call: a FUSE reply (4 KiB, or one page
/// with readdirplus) holds fewer than this anyway.
const CHUNK: usize = 256;

impl DirStream {
    pub fn complete(entries: Vec<DirEntry>) -> Self {
        Self {
            state: Mutex::new(State {
                entries,
                done: true,
                error: None,
            }),
            grew: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, more: impl IntoIterator<Item = DirEntry>) {
        let mut st = self.lock();
        let before = st.entries.len();
        st.entries.extend(more);
        if st.entries.len() > before {
            drop(st);
            self.grew.notify_waiters();
        }
    }

    pub fn finish(&self, result: Result<(), FsError>) {
        let mut st = self.lock();
        // Kept as the folder's listing for the TTL: no room to spare.
        st.entries.shrink_to_fit();
        st.done = true;
        st.error = result.err();
        drop(st);
        self.grew.notify_waiters();
    }

    /// Entries from `from` if any are there or the listing ended; `None`
    /// means "not yet".
    pub fn try_from(&self, from: usize) -> Option<Result<Chunk, FsError>> {
        let st = self.lock();
        if from < st.entries.len() {
            let end = st.entries.len().min(from + CHUNK);
            return Some(Ok(Chunk {
                entries: st.entries[from..end].to_vec(),
                // Not "done" if it ended in an error: the reader must still
                // come back for that error.
                done: st.done && end == st.entries.len() && st.error.is_none(),
            }));
        }
        if st.done {
            return Some(match &st.error {
                Some(e) => Err(e.clone()),
                None => Ok(Chunk {
                    entries: Vec::new(),
                    done: true,
                }),
            });
        }
        None
    }

    /// Like [`try_from`](Self::try_from), waiting until there is an answer.
    pub async fn wait_from(&self, from: usize) -> Result<Chunk, FsError> {
        loop {
            let grew = self.grew.notified();
            tokio::pin!(grew);
            // Registered before checking, so a push in between is not missed.
            grew.as_mut().enable();
            if let Some(r) = self.try_from(from) {
                return r;
            }
            grew.await;
        }
    }

    /// Waits until the listing has ended; its error if it ended in one.
    pub async fn finished(&self) -> Result<(), FsError> {
        loop {
            let grew = self.grew.notified();
            tokio::pin!(grew);
            grew.as_mut().enable();
            {
                let st = self.lock();
                if st.done {
                    return st.error.clone().map_or(Ok(()), Err);
                }
            }
            grew.await;
        }
    }

    /// Waits until the listing has its first entries or has ended; the
    /// error if it ended in one before any entry.
    pub async fn wait_started(&self) -> Result<(), FsError> {
        loop {
            let grew = self.grew.notified();
            tokio::pin!(grew);
            grew.as_mut().enable();
            {
                let st = self.lock();
                if !st.entries.is_empty() {
                    return Ok(());
                }
                if st.done {
                    return st.error.clone().map_or(Ok(()), Err);
                }
            }
            grew.await;
        }
    }

    /// The entries so far (for a finished listing: all of them).
    pub fn entries(&self) -> Vec<DirEntry> {
        self.lock().entries.clone()
    }

    /// Whether the listing has ended (well or not).
    pub fn is_done(&self) -> bool {
        self.lock().done
    }

    /// Every entry, once the listing has ended.
    pub async fn all(&self) -> Result<Vec<DirEntry>, FsError> {
        let mut out = Vec::new();
        loop {
            let c = self.wait_from(out.len()).await?;
            let empty = c.entries.is_empty();
            out.extend(c.entries);
            if c.done || empty {
                // An empty chunk only comes with the end.
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(n: &str) -> DirEntry {
        DirEntry {
            name: n.into(),
            kind: FileKind::File,
        }
    }

    #[tokio::test]
    async fn readers_wait_only_for_what_they_ask() {
        let s = Arc::new(DirStream::default());
        assert!(s.try_from(0).is_none());
        let reader = {
            let s = s.clone();
            tokio::spawn(async move { s.wait_from(0).await.map(|c| c.entries.len()) })
        };
        s.push([e("a"), e("b")]);
        assert_eq!(reader.await.unwrap().unwrap(), 2);
        let tail = {
            let s = s.clone();
            tokio::spawn(async move { s.all().await.map(|v| v.len()) })
        };
        s.push([e("c")]);
        s.finish(Ok(()));
        assert_eq!(tail.await.unwrap().unwrap(), 3);
        let end = s.try_from(3).unwrap().unwrap();
        assert!(end.done && end.entries.is_empty());
    }

    #[tokio::test]
    async fn an_error_reaches_readers_past_the_entries() {
        let s = DirStream::default();
        s.push([e("a")]);
        s.finish(Err(FsError::Io("boom".into())));
        assert_eq!(s.wait_from(0).await.unwrap().entries.len(), 1);
        assert!(s.wait_from(1).await.is_err());
    }
}
