//! `provenafs demo`: sample datasets, the emulator in-process, a mount in
//! the foreground. Ctrl-C unmounts and removes the sample data.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::api::ApiConfig;
use crate::auth::AuthConfig;
use crate::fs::fuse::FuseConfig;
use crate::fs::tree::TreeConfig;
use crate::mount::MountConfig;
use crate::s3::aws::S3Config;
use crate::secret::Secret;
use crate::sim::{Sim, SimConfig};

/// Deterministic pseudo-random bytes (xorshift), so the demo's large file
/// has the same checksum everywhere.
pub fn pseudo_random(mut seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes the demo datasets under `root`.
pub fn generate(root: &Path) -> std::io::Result<()> {
    let sst = root.join("10378.1/1687966");
    fs::create_dir_all(sst.join("data"))?;
    fs::write(
        sst.join("metadata.json"),
        r#"{"name": "Sea surface temperature, Great Barrier Reef (sample)", "description": "Daily SST at reef sites, demo data"}"#,
    )?;
    let mut csv = fs::File::create(sst.join("data/sst.csv"))?;
    writeln!(csv, "date,site,lat,lon,sst_c")?;
    for day in 0..365u32 {
        for (i, site) in ["Heron", "Lizard", "Davies", "Moore"].iter().enumerate() {
            let t = 24.0 + 3.0 * ((day as f64) / 58.0).sin() + i as f64 * 0.4;
            writeln!(
                csv,
                "2025-{:03},{site},-{}.{},{}.{},{t:.2}",
                day + 1,
                14 + i * 3,
                i,
                145 + i,
                day % 10
            )?;
        }
    }
    fs::write(
        sst.join("data/large.bin"),
        pseudo_random(0x5eed, 48 * 1024 * 1024),
    )?;
    fs::write(
        sst.join("README.txt"),
        "Sample dataset served by the provenafs demo.\n",
    )?;

    let coral = root.join("10378.1/1687967");
    fs::create_dir_all(coral.join("surveys/2024/north"))?;
    fs::create_dir_all(coral.join("surveys/2025/south"))?;
    fs::create_dir_all(coral.join("notes with spaces"))?;
    fs::write(
        coral.join("metadata.json"),
        r#"{"name": "Coral cover surveys (nested sample)", "description": "A nested folder tree"}"#,
    )?;
    fs::write(
        coral.join("surveys/2024/north/transect-1.csv"),
        "transect,cover\n1,0.42\n2,0.38\n",
    )?;
    fs::write(
        coral.join("surveys/2025/south/transect-9.csv"),
        "transect,cover\n9,0.51\n",
    )?;
    fs::write(
        coral.join("notes with spaces/réef notes ü.txt"),
        "unicode names work\n",
    )?;
    fs::write(coral.join("surveys/empty.txt"), "")?;

    let other = root.join("102.100.100/42");
    fs::create_dir_all(&other)?;
    fs::write(
        other.join("metadata.json"),
        r#"{"name": "Another deployment's handle prefix"}"#,
    )?;
    fs::write(
        other.join("hello.txt"),
        "hello from another handle prefix\n",
    )?;
    Ok(())
}

/// Sample files whose SHA-256 the demo prints, relative to the data folder
/// (and so to the mountpoint): `sha256sum -c` on the printed lines checks
/// the mount end to end.
const CHECKED: &[&str] = &[
    "10378.1/1687966/data/sst.csv",
    "10378.1/1687966/data/large.bin",
    "10378.1/1687967/surveys/2024/north/transect-1.csv",
    "102.100.100/42/hello.txt",
];

/// `sha256sum` lines for the sample files as they will appear under `mountpoint`.
fn checksums(data: &Path, mountpoint: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut out = String::new();
    for rel in CHECKED {
        let bytes = fs::read(data.join(rel))?;
        let sum = hex::encode(sha2::Sha256::digest(&bytes));
        out.push_str(&format!("{sum}  {}\n", mountpoint.join(rel).display()));
    }
    Ok(out)
}

pub fn run(mountpoint: &Path) -> Result<(), String> {
    crate::mount::check_mountpoint(mountpoint).map_err(|e| e.to_string())?;
    let mountpoint = std::path::absolute(mountpoint)
        .map_err(|e| format!("cannot resolve {}: {e}", mountpoint.display()))?;
    let data = tempfile::Builder::new()
        .prefix("provenafs-demo-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    generate(data.path()).map_err(|e| format!("cannot write demo data: {e}"))?;
    let sums =
        checksums(data.path(), &mountpoint).map_err(|e| format!("cannot read demo data: {e}"))?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let sim = rt
        .block_on(Sim::start(SimConfig {
            root: data.path().to_path_buf(),
            ..SimConfig::default()
        }))
        .map_err(|e| e.to_string())?;
    let cfg = MountConfig {
        mountpoint: mountpoint.clone(),
        token: Secret::new(sim.env.offline_token.clone()),
        auth: AuthConfig {
            realm_url: sim.env.auth_url.clone(),
            ..AuthConfig::default()
        },
        api: ApiConfig {
            base_url: sim.env.api_url.clone(),
            ..ApiConfig::default()
        },
        s3: S3Config {
            endpoint: Some(sim.env.s3_endpoint.clone()),
            ..S3Config::default()
        },
        tree: TreeConfig::default(),
        read: crate::read::ReadConfig::default(),
        fuse: FuseConfig::default(),
        max_threads: 16,
        allow_other: false,
        allow_root: false,
        logs_to_file: false,
        explicit_modes: false,
        log_file: None,
        announce: false,
    };
    let m = mountpoint.display().to_string();
    let data_dir = data.path().display().to_string();
    eprintln!(
        "provenafs demo: emulator at {addr}, sample data in {data_dir}\n\
         Mounting at {m}...",
        addr = sim.addr,
    );
    // The mount serves on this thread until it ends; another one says
    // when it is ready, once the kernel lists it.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (done, mountpoint, m) = (done.clone(), mountpoint.clone(), m.clone());
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while !done.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < deadline
            {
                if crate::mount::is_mountpoint(&mountpoint) {
                    eprintln!(
                        "provenafs demo: ready, mounted at {m}. Press Ctrl-C here (or run \
                         `provenafs unmount {m}`) to stop.\n\
                         Try, in another terminal:\n\
                         \x20 ls {m}\n\
                         \x20 ls -l {m}/10378.1/1687966/data\n\
                         \x20 head {m}/10378.1/1687966/data/sst.csv\n\
                         \x20 find {m}/10378.1/1687967\n\
                         The sample files' SHA-256 follow on standard output, to compare \
                         with `sha256sum` (or save them and run `sha256sum -c FILE`):"
                    );
                    // On standard output: `provenafs demo DIR > sums` keeps
                    // just what `sha256sum -c sums` checks.
                    print!("{sums}");
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        })
    };
    let r = crate::mount::run(cfg, &rt).map_err(|e| e.to_string());
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watcher.join();
    sim.stop();
    let unmounted = if r.is_ok() {
        format!("unmounted {m}; ")
    } else {
        String::new()
    };
    match data.close() {
        Ok(()) => eprintln!(
            "provenafs demo: {unmounted}stopped the emulator and removed the sample data in {data_dir}."
        ),
        Err(e) => eprintln!(
            "provenafs demo: {unmounted}stopped the emulator, but could not remove {data_dir}: {e}"
        ),
    }
    r
}
