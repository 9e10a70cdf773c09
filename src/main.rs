fn main() {
    std::process::exit(provenafs::cli::main());
}
