//! The read path: turns `read(offset, size)` on an open file into ranged
//! GETs pinned to the ETag seen at open.

use bytes::Bytes;
use tracing::{info_span, Instrument};

use crate::fs::tree::FileRef;
use crate::fs::FsError;

/// One open file.
pub struct OpenFile {
    file: FileRef,
}

impl OpenFile {
    pub fn new(file: FileRef) -> Self {
        Self { file }
    }

    pub fn size(&self) -> u64 {
        self.file.meta.size
    }

    /// Up to `size` bytes from `offset`; fewer only at end of file.
    pub async fn read(&self, offset: u64, size: u32) -> Result<Bytes, FsError> {
        let end = offset.saturating_add(size as u64).min(self.size());
        if offset >= end {
            return Ok(Bytes::new());
        }
        let meta = &self.file.meta;
        let span = info_span!("read", key = %meta.key, offset, size);
        self.file
            .dataset
            .store
            .get_range(&meta.key, offset..end, Some(&meta.etag))
            .instrument(span)
            .await
            .map_err(FsError::from)
    }
}
