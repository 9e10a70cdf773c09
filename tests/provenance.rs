//! Issue 15: reads become provenance. A mount read by processes of
//! different Slurm jobs; `provenafs provenance` lists exactly each job's
//! datasets, files and versions (the emulator's ETags); `--model-run`
//! makes a record the provenance API (the emulator's) refuses until its
//! placeholders are filled in, then registers; the daemon writes its
//! manifest beside its log on unmount.

mod common;

use std::process::Command;

use common::*;

fn dataset_sim() -> Sim {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/data/a.nc", &bytes(1, 300_000));
    write(d.path(), "10378.1/1/data/b.csv", b"x,y\n1,2\n");
    write(d.path(), "10378.1/2/c.bin", &bytes(3, 50_000));
    Sim::start(d, &[])
}

/// `cat`s `files` under `m` as a process of Slurm job `job`.
fn read_as_job(m: &Mount, job: &str, files: &[&str]) -> u32 {
    let mut c = Command::new("cat");
    c.args(files.iter().map(|f| m.join(f)))
        .env("SLURM_JOB_ID", job)
        .stdout(std::process::Stdio::null());
    let child = c.spawn().unwrap();
    let pid = child.id();
    assert!(child.wait_with_output().unwrap().status.success());
    pid
}

fn provenance(sim: &Sim, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["provenance"];
    a.extend_from_slice(args);
    let out = sim.run(&mut sim.command(&a));
    let text = ok(&out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `provenance --from FILE --json --job JOB`: a written manifest, read
/// back filtered as a live one.
fn job_in_file(sim: &Sim, file: &std::path::Path, job: &str) -> serde_json::Value {
    let file = file.to_str().unwrap();
    provenance(sim, &["--from", file, "--json", "--job", job])
}

/// (dataset, key, etag) of each file in a manifest.
fn files_of(v: &serde_json::Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for d in v["datasets"].as_array().unwrap() {
        for f in d["files"].as_array().unwrap() {
            out.push((
                d["handle"].as_str().unwrap().to_string(),
                f["key"].as_str().unwrap().to_string(),
                f["etag"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

#[test]
fn each_jobs_reads_are_its_own_and_become_a_registrable_model_run() {
    if !fuse_available() {
        return;
    }
    let sim = dataset_sim();
    let m = sim.mount(&[]);
    let mnt = m.path().to_str().unwrap();
    let etag = |rel: &str| md5_hex(&std::fs::read(sim.root().join(rel)).unwrap());
    let pid_101 = read_as_job(&m, "101", &["10378.1/1/data/a.nc"]);
    read_as_job(&m, "202", &["10378.1/1/data/b.csv", "10378.1/2/c.bin"]);

    // Job 101: exactly its one file, at the emulator's version.
    let j101 = provenance(&sim, &[mnt, "--json", "--job", "101"]);
    assert_eq!(
        files_of(&j101),
        [(
            "10378.1/1".into(),
            "datasets/10378-1-1/data/a.nc".into(),
            etag("10378.1/1/data/a.nc")
        )]
    );
    let f = &j101["datasets"][0]["files"][0];
    assert_eq!(f["bytes_read"], 300_000, "{f}");
    assert_eq!(f["readers"][0]["job"], "101");
    assert_eq!(f["readers"][0]["pid"], pid_101);
    assert_eq!(f["readers"][0]["command"], "cat");
    // Job 202: two datasets.
    let j202 = provenance(&sim, &[mnt, "--json", "--job", "202"]);
    assert_eq!(
        files_of(&j202),
        [
            (
                "10378.1/1".into(),
                "datasets/10378-1-1/data/b.csv".into(),
                etag("10378.1/1/data/b.csv")
            ),
            (
                "10378.1/2".into(),
                "datasets/10378-1-2/c.bin".into(),
                etag("10378.1/2/c.bin")
            ),
        ]
    );
    // The threads of one reader are one reader (the kernel names the
    // thread in each request); a reader the kernel's cache serves alone
    // is still seen opening the file.
    let py = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, threading\n\
             def r(p): open(p, 'rb').read()\n\
             ts = [threading.Thread(target=r, args=(p,)) for p in sys.argv[1:]]\n\
             [t.start() for t in ts]; [t.join() for t in ts]\n\
             open(sys.argv[1], 'rb').read()\n",
        )
        .arg(m.join("10378.1/2/c.bin"))
        .arg(m.join("10378.1/1/data/b.csv"))
        .env("SLURM_JOB_ID", "303")
        .status()
        .unwrap();
    assert!(py.success());
    let j303 = provenance(&sim, &[mnt, "--json", "--job", "303"]);
    assert_eq!(files_of(&j303).len(), 2, "{j303}");
    let pids: std::collections::BTreeSet<u64> = j303["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| d["files"].as_array().unwrap())
        .flat_map(|f| f["readers"].as_array().unwrap())
        .map(|r| r["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 1, "one process, however many threads: {j303}");
    for d in j303["datasets"].as_array().unwrap() {
        for f in d["files"].as_array().unwrap() {
            // Job 202 read these first: the kernel's cache served them.
            assert!(f["readers"][0]["first_open"].is_string(), "{f}");
        }
    }
    let run303 = provenance(&sim, &[mnt, "--model-run", "--job", "303"]);
    assert_eq!(run303["inputs"].as_array().unwrap().len(), 2);

    // By process, and since a time after everything: what they say.
    let by_pid = provenance(&sim, &[mnt, "--json", "--pid", &pid_101.to_string()]);
    assert_eq!(files_of(&by_pid), files_of(&j101));
    let later = provenance(&sim, &[mnt, "--json", "--since", "2999-01-01T00:00:00Z"]);
    assert!(files_of(&later).is_empty());
    // The table: one row per dataset.
    let table = ok(&sim.run(&mut sim.command(&["provenance", mnt])));
    assert!(
        table.contains("10378.1/1") && table.contains("10378.1/2"),
        "{table}"
    );

    // A model run from job 202's reads.
    let mut record = provenance(
        &sim,
        &[
            mnt,
            "--model-run",
            "--job",
            "202",
            "--template",
            "10378.1/2=10378.1/77",
        ],
    );
    let inputs = record["inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 2);
    assert_eq!(inputs[0]["dataset_id"], "10378.1/1");
    assert_eq!(inputs[0]["dataset_type"], "DATA_STORE");
    assert_eq!(inputs[0]["resources"]["data/b.csv"], "data/b.csv");
    assert_eq!(inputs[1]["dataset_template_id"], "10378.1/77");
    assert!(record["start_time"].as_i64() <= record["end_time"].as_i64());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.json");
    let register = |record: &serde_json::Value| {
        std::fs::write(&file, serde_json::to_vec(record).unwrap()).unwrap();
        sim.run(&mut sim.command(&["provenance", "register", file.to_str().unwrap()]))
    };
    // As printed: refused, with the API's words.
    let out = register(&record);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HTTP 422") && err.contains("display_name"),
        "{err}"
    );
    // ... and every field still to fill in named at once.
    assert!(
        err.contains("still empty") && err.contains("associations.modeller_id"),
        "{err}"
    );
    assert_eq!(sim.stat("prov_registered"), 0);
    // The versions read travel in an annotation.
    let versions: serde_json::Value = serde_json::from_str(
        record["annotations"]["provenafs_versions_read"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(versions["10378.1/2"]["c.bin"], etag("10378.1/2/c.bin"));
    // Filled in: registered, and the new record's handle printed.
    record["display_name"] = "Reef model run".into();
    record["description"] = "Read by job 202".into();
    record["workflow_template_id"] = "10378.1/500".into();
    record["associations"]["modeller_id"] = "10378.1/600".into();
    for i in record["inputs"].as_array_mut().unwrap() {
        if i["dataset_template_id"] == "" {
            i["dataset_template_id"] = "10378.1/78".into();
        }
    }
    let out = register(&record);
    let handle = ok(&out);
    assert!(handle.trim().starts_with("10378.1/"), "{handle}");
    assert_eq!(sim.stat("prov_registered"), 1);
    // A dataset the data store does not serve is refused (HTTP 400).
    record["inputs"][0]["dataset_id"] = "10378.1/404404".into();
    let out = register(&record);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("HTTP 400") && err.contains("10378.1/404404"),
        "{err}"
    );

    // On unmount the manifest is written beside the log.
    let manifest = m.log.with_extension("provenance.json");
    let _ = std::fs::remove_file(&manifest);
    // `unmount` returns once the daemon has written it.
    ok(&sim.run(&mut sim.command(&["unmount", mnt])));
    assert!(manifest.exists(), "no manifest at {}", manifest.display());
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(files_of(&written).len(), 3);
    assert!(written["ended_at"].is_string(), "the final write is marked");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&manifest).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "it names the user's processes");
    // ... and read back later, filtered as a live one.
    let from = job_in_file(&sim, &manifest, "101");
    assert_eq!(files_of(&from), files_of(&j101));
    let _ = std::fs::remove_file(&manifest);
}

/// A daemon killed outright (SIGKILL: the OOM killer, `scancel -s KILL`)
/// never reaches its unmount; what its readers read up to the last
/// checkpoint is still beside its log. A later read lands in the next
/// checkpoint, and a checkpoint replaces the mount's own earlier one
/// instead of keeping it as an earlier mount's.
#[test]
fn a_killed_daemon_leaves_its_last_checkpoint() {
    if !fuse_available() {
        return;
    }
    let sim = dataset_sim();
    let m = mount_with_env(&sim, &[], &[("PROVENAFS_MANIFEST_EVERY_SECS", "1")]);
    let manifest = m.log.with_extension("provenance.json");
    let read_back = || -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(&manifest).ok()?).ok()
    };
    let wait_for = |n: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(v) = read_back().filter(|v| files_of(v).len() == n) {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint with {n} files at {}: {:?}",
                manifest.display(),
                read_back()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    read_as_job(&m, "701", &["10378.1/1/data/a.nc"]);
    let first = wait_for(1);
    read_as_job(&m, "702", &["10378.1/2/c.bin"]);
    let second = wait_for(2);
    assert_eq!(first["mounted_at"], second["mounted_at"]);
    // One file beside the log: the mount's own checkpoints replace each
    // other (an earlier mount's would be kept under its mount time).
    let stem = m.log.file_stem().unwrap().to_string_lossy().into_owned();
    let kept: Vec<_> = std::fs::read_dir(m.log.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{stem}.provenance")))
        .collect();
    assert_eq!(kept, vec![format!("{stem}.provenance.json")]);
    assert!(
        second.get("ended_at").is_none(),
        "a checkpoint is not final"
    );

    unsafe { libc::kill(m.daemon_pid(), libc::SIGKILL) };
    // The watchdog takes the dead mount away; the manifest stays.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while is_mounted(m.path()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let left = read_back().expect("the last checkpoint survives the kill");
    assert!(left.get("ended_at").is_none(), "{left}");
    let mut files = files_of(&left);
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files[0].1.ends_with("data/a.nc"), "{files:?}");
    assert!(files[1].1.ends_with("c.bin"), "{files:?}");
    let job = job_in_file(&sim, &manifest, "702");
    assert_eq!(files_of(&job).len(), 1);
}
