fn main() {
    // The watchdog of a mount is this binary too (see `mount`).
    if let Some(code) = provenafs::mount::watchdog_main() {
        std::process::exit(code);
    }
    std::process::exit(provenafs::cli::main());
}
