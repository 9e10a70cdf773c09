//! `provenafs prefetch`: stage-in to a cache folder, then a mount on that
//! folder reads what was staged with no S3 GET (issue 13's proof), counted
//! by the emulator.

mod common;

use std::path::Path;

use common::*;

const MIB: usize = 1 << 20;

/// Dataset 10378.1/1: a file over one 8 MiB part, sizes that are not whole
/// blocks, a folder with a subfolder, an empty file. 10378.1/2: one more.
const FILES: &[(&str, usize)] = &[
    ("10378.1/1/big.bin", 9 * MIB + 12_345),
    ("10378.1/1/data/a.csv", 3 * MIB + 7),
    ("10378.1/1/data/sub/b.bin", 100 * 1024 + 3),
    ("10378.1/1/empty.txt", 0),
    ("10378.1/2/other.bin", 2 * MIB + 1),
];

fn data() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (i, (rel, len)) in FILES.iter().enumerate() {
        write(d.path(), rel, &bytes(100 + i as u64, *len));
    }
    d
}

fn size_of(prefix: &str) -> u64 {
    FILES
        .iter()
        .filter(|(r, _)| r.starts_with(prefix))
        .map(|(_, l)| *l as u64)
        .sum()
}

/// Runs `prefetch ARGS... --cache-dir CACHE`.
fn prefetch(sim: &Sim, cache: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["prefetch"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--cache-dir", cache.to_str().unwrap()]);
    sim.run(&mut sim.command(&all))
}

fn json(out: &std::process::Output) -> serde_json::Value {
    let text = ok(out);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {text:?}"))
}

/// The summary line among standard error's (trace logs included).
fn summary(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines()
        .find(|l| l.starts_with("provenafs: prefetched"))
        .unwrap_or_else(|| panic!("no summary line in: {err}"))
        .to_string()
}

/// Reads every file under `rel` of the mount and compares it with the
/// emulator's copy; returns the S3 GETs that took.
fn read_all(sim: &Sim, m: &Mount, rels: &[&str]) -> u64 {
    // Listings first: they cost LISTs, never GETs, and are not the point.
    for rel in rels {
        std::fs::metadata(m.join(rel)).unwrap();
    }
    let before = sim.stat("s3_get");
    for rel in rels {
        assert_eq!(
            sha256(&m.join(rel)),
            sha256(&sim.root().join(rel)),
            "{rel}: other bytes through the mount"
        );
    }
    sim.stat("s3_get") - before
}

#[test]
fn a_prefetched_dataset_is_then_read_with_no_get_and_a_rerun_fetches_nothing() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");

    let gets = sim.stat("s3_get");
    let s = json(&prefetch(&sim, &cache, &["10378.1/1", "--json"]));
    let want = size_of("10378.1/1/");
    assert_eq!(s["files"], 4, "{s}");
    assert_eq!(s["bytes"], want, "{s}");
    assert_eq!(s["fetched_bytes"], want, "{s}");
    assert_eq!(s["cached_bytes"], 0, "{s}");
    assert_eq!(s["files_already_cached"], 1, "the empty file: {s}");
    assert_eq!(s["failed"], serde_json::json!([]), "{s}");
    assert!(s["seconds"].as_f64().unwrap() >= 0.0, "{s}");
    assert!(s["mib_per_s"].as_f64().is_some(), "{s}");
    // 10 blocks of big.bin in parts of 8: 2 GETs; one each for a.csv, b.bin.
    assert_eq!(s["gets"], 4, "{s}");
    assert_eq!(sim.stat("s3_get") - gets, 4, "what it says it sent");

    // A mount on that folder: every byte, no GET.
    let m = sim.mount(&["--cache-dir", cache.to_str().unwrap()]);
    let rels: Vec<&str> = FILES
        .iter()
        .map(|(r, _)| *r)
        .filter(|r| r.starts_with("10378.1/1/"))
        .collect();
    assert_eq!(read_all(&sim, &m, &rels), 0, "the mount sent a GET");
    drop(m);

    // Again: nothing to fetch, and the line says so.
    let gets = sim.stat("s3_get");
    let out = prefetch(&sim, &cache, &["10378.1/1"]);
    ok(&out);
    let line = summary(&out);
    assert!(line.contains("prefetched 4 files, 0.0 MiB"), "{line}");
    assert!(line.contains("already cached"), "{line}");
    assert_eq!(sim.stat("s3_get"), gets, "a rerun sent a GET");
}

#[test]
fn a_set_larger_than_the_cache_is_refused_in_one_line_before_any_get() {
    let sim = Sim::start(data(), &[]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let gets = sim.stat("s3_get");
    let mut c = sim.command(&[
        "prefetch",
        "10378.1/1",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--cache-size",
        "8MiB",
    ]);
    // Only what the user sees: no trace logs around the line.
    c.env("RUST_LOG", "warn");
    let out = sim.run(&mut c);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("--cache-size"), "{err}");
    assert!(err.contains("12.1 MiB"), "names the size: {err}");
    assert_eq!(sim.stat("s3_get"), gets, "nothing fetched");
    assert!(!cache.exists(), "no cache folder made");

    // A path that is neither a file nor a folder: one line too.
    let out = sim.run(
        sim.command(&[
            "prefetch",
            "10378.1/1/nope",
            "--cache-dir",
            cache.to_str().unwrap(),
        ])
        .env("RUST_LOG", "warn"),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "provenafs: no such file or folder: 10378.1/1/nope",
        "{err}"
    );
}

#[test]
fn a_folder_and_a_file_as_targets_stage_just_those() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    // The folder twice (as itself and through a file in it): staged once.
    let s = json(&prefetch(
        &sim,
        &cache,
        &[
            "10378.1/1/data",
            "10378.1/1/data/sub/b.bin",
            "https://hdl.handle.net/10378.1/2/other.bin",
            "--json",
        ],
    ));
    let want = size_of("10378.1/1/data/") + size_of("10378.1/2/");
    assert_eq!(
        (s["files"].as_u64(), s["bytes"].as_u64()),
        (Some(3), Some(want)),
        "{s}"
    );
    let m = sim.mount(&["--cache-dir", cache.to_str().unwrap()]);
    assert_eq!(
        read_all(
            &sim,
            &m,
            &[
                "10378.1/1/data/a.csv",
                "10378.1/1/data/sub/b.bin",
                "10378.1/2/other.bin"
            ]
        ),
        0
    );
    // What was not named was not staged.
    assert!(read_all(&sim, &m, &["10378.1/1/big.bin"]) > 0);
}

/// `scripts/slurm-job.sh` with the emulator's endpoints, a token file and
/// `provenafs` on PATH, as Slurm would start it.
fn slurm_job(sim: &Sim, tmp: &Path, env: &[(&str, &str)], args: &[&str]) -> std::process::Command {
    use std::os::unix::fs::PermissionsExt;
    let bin = tmp.join("bin");
    if !bin.exists() {
        std::fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(BIN, bin.join("provenafs")).unwrap();
    }
    let tf = tmp.join("token");
    std::fs::write(&tf, sim.token()).unwrap();
    std::fs::set_permissions(&tf, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut c = std::process::Command::new("bash");
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-job.sh"))
        .args(args)
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .env("TMPDIR", tmp)
        .env("PROVENA_TOKEN_FILE", &tf)
        .env("PROVENA_DATASETS", "10378.1/1")
        .env("RUST_LOG", "warn")
        .env_remove("RRAP_OFFLINE_TOKEN")
        .env_remove("PROVENA_PROVENANCE")
        // The job's working folder (its read manifest lands there), never
        // the repository.
        .current_dir(tmp);
    for (k, v) in env {
        c.env(k, v);
    }
    sim.endpoints(&mut c);
    c
}

#[test]
fn a_job_array_stages_in_once_and_every_task_reads_the_shared_cache() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("shared-cache");
    let cache_s = cache.to_str().unwrap();
    // The stage-in job: prefetches, mounts nothing, runs nothing.
    let gets = sim.stat("s3_get");
    let out = sim.run(&mut slurm_job(
        &sim,
        tmp.path(),
        &[
            ("SLURM_JOB_ID", "500"),
            ("PROVENA_PREFETCH", "only"),
            ("PROVENA_CACHE", cache_s),
        ],
        &[],
    ));
    assert!(summary(&out).contains("prefetched 4 files"), "{out:?}");
    assert_eq!(sim.stat("s3_get") - gets, 4);
    assert!(job_dirs(tmp.path(), "500").is_empty(), "no job folder");

    // The array's tasks, the first one included (its prefetch finds
    // everything cached): every file read, no GET.
    let gets = sim.stat("s3_get");
    let read = "cd \"$PROVENA_MNT\"/10378.1/1 && sha256sum big.bin data/a.csv data/sub/b.bin";
    for (job, task) in [("501", "0"), ("502", "1")] {
        let out = sim.run(&mut slurm_job(
            &sim,
            tmp.path(),
            &[
                ("SLURM_JOB_ID", job),
                ("SLURM_ARRAY_TASK_ID", task),
                ("SLURM_ARRAY_TASK_MIN", "0"),
                ("PROVENA_PREFETCH", "1"),
                ("PROVENA_CACHE", cache_s),
            ],
            &["sh", "-c", read],
        ));
        let text = ok(&out);
        for rel in ["big.bin", "data/a.csv", "data/sub/b.bin"] {
            let want = sha256(&sim.root().join("10378.1/1").join(rel));
            assert!(text.contains(&format!("{want}  {rel}")), "{rel}: {text}");
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.contains("already cached"),
            task == "0",
            "only the first task prefetches: {err}"
        );
    }
    assert_eq!(sim.stat("s3_get"), gets, "a task sent a GET");

    // Without a shared folder, a stage-in job would stage for nobody.
    let out = sim.run(&mut slurm_job(
        &sim,
        tmp.path(),
        &[("SLURM_JOB_ID", "503"), ("PROVENA_PREFETCH", "only")],
        &[],
    ));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs PROVENA_CACHE"));
}

/// A claim file of another node's (`HOST PID DEADLINE_MS TOKEN`) on
/// block `index` of `rel` in the shared `cache`, made before the shared
/// folder's first use.
fn claim_of_another_node(sim: &Sim, cache: &Path, rel: &str, index: u64, until_ms: u128) {
    use std::os::unix::fs::PermissionsExt;
    let data = std::fs::read(sim.root().join(rel)).unwrap();
    let (handle, path) = rel.split_at(rel.find('/').unwrap() + 1);
    let (suffix, path) = path.split_at(path.find('/').unwrap());
    let key = format!(
        "datasets/{}-{suffix}{path}",
        handle.trim_end_matches('/').replace('.', "-")
    );
    let name =
        provenafs::read::cache::block_file_name("provena-bucket", &key, &md5_hex(&data), index);
    let shard = cache.join("v1").join(&name[..2]);
    std::fs::create_dir_all(&shard).unwrap();
    std::fs::write(
        shard.join(format!(".claim-{name}")),
        format!("othernode 4242 {until_ms} 1f2e3d\n"),
    )
    .unwrap();
    for d in [cache, &cache.join("v1"), &shard] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
}

#[test]
fn prefetch_waits_for_blocks_others_claimed_and_never_counts_them_unseen() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    // Another node was fetching blocks 2..5 of big.bin
    // when it was killed: its claims stay live (for other hosts) until
    // their deadline, a minute from now.
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 60_000;
    for i in 2..6 {
        claim_of_another_node(&sim, &cache, "10378.1/1/big.bin", i, until);
    }
    let t = std::time::Instant::now();
    let out = prefetch(
        &sim,
        &cache,
        &[
            "10378.1/1/big.bin",
            "--cache-shared",
            "--json",
            "--request-timeout",
            "4",
        ],
    );
    let j = json(&out);
    assert_eq!(j["failed"].as_array().unwrap().len(), 0, "{j}");
    // Waited for them (half the request time), then fetched them itself.
    assert!(
        t.elapsed() >= std::time::Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        j["fetched_bytes"].as_u64().unwrap(),
        size_of("10378.1/1/big.bin"),
        "{j}"
    );
    assert_eq!(j["cached_bytes"].as_u64().unwrap(), 0, "{j}");
    // Every block is there: a mount on the folder reads with no GET.
    let m = sim.mount(&["--cache-dir", cache.to_str().unwrap(), "--cache-shared"]);
    assert_eq!(read_all(&sim, &m, &["10378.1/1/big.bin"]), 0);
}
