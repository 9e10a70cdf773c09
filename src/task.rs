//! Small helpers for spawned tasks.

/// Aborts a spawned task when dropped: work that only an answer still on
/// its way needs (a guess at a file's first bytes, the second of two GETs
/// racing) ends with whoever gave up waiting for it.
pub struct AbortOnDrop(pub tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
