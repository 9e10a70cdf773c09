/// jemalloc, not glibc's malloc: glibc keeps freed 1 MiB blocks in per-thread
/// heaps it seldom returns, so a mount's resident memory grew far past what
/// was live (8 parallel readers: 170 MiB resident for about 80 MiB live).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Freed pages go back to the system at once, not after jemalloc's default
/// 10 s: a mount streams gigabytes through short-lived 1 MiB blocks, and
/// pages kept "for reuse" are resident memory the user sees.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"dirty_decay_ms:0,muzzy_decay_ms:0\0";

fn main() {
    // The watchdog of a mount is this binary too (see `mount`).
    if let Some(code) = provenafs::mount::watchdog_main() {
        std::process::exit(code);
    }
    let code = provenafs::cli::main();
    // A daemon's last lines (its stats, where its manifest went) are
    // still queued for its log.
    provenafs::logfile::finish();
    std::process::exit(code);
}
