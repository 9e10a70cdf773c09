//! `provenafs status`: the provenafs mounts of this machine and, for the
//! caller's own, the live figures their daemons answer on a Unix socket.

use std::path::Path;

/// Runs `provenafs status [MOUNTPOINT] [--json]`; returns what to print.
///
/// Errors: a MOUNTPOINT that is not a provenafs mount.
pub fn run(mountpoint: Option<&Path>, json: bool) -> Result<String, String> {
    let _ = (mountpoint, json);
    Err("status: not yet".into())
}
