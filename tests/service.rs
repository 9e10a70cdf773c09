//! The real service served well (issue 12): credentials only when a
//! dataset's objects are needed, the registry listed gently (pages of 20,
//! ragged pages, a page that fails, its own TTL), released datasets trusted
//! longer, and tokens without roles refused up front. The emulator behaves
//! as the real service does (`../shared/docs/provena-api.md`).

mod common;

use std::time::Duration;

use common::*;

/// `n` datasets `10378.1/1..=n`, each with `data/f.txt`.
fn many(n: usize) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for i in 1..=n {
        write(
            d.path(),
            &format!("10378.1/{i}/data/f.txt"),
            format!("{i}\n").as_bytes(),
        );
    }
    d
}

fn credential_calls(sim: &Sim) -> u64 {
    sim.stat("credentials_issued") + sim.stat("credentials_refused")
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn credentials_only_when_a_datasets_objects_are_listed_or_read() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(many(30), &[]);
    let m = sim.mount(&[]);
    let before = credential_calls(&sim);
    // `ls -l` of the prefix folder and a `stat` of every dataset folder.
    let out = sh(&format!("ls -l '{}' | wc -l", m.join("10378.1").display()));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "31");
    for i in 1..=30 {
        assert!(m.join(&format!("10378.1/{i}")).is_dir());
    }
    assert_eq!(
        credential_calls(&sim) - before,
        0,
        "no credential call for folders"
    );
    // Listing one dataset asks for its credentials, once.
    assert_eq!(names(&m.join("10378.1/7")), ["data"]);
    assert_eq!(
        std::fs::read(m.join("10378.1/7/data/f.txt")).unwrap(),
        b"7\n"
    );
    assert_eq!(credential_calls(&sim) - before, 1);
}

/// Handles `provenafs datasets --json` lists, and its stderr.
fn datasets(sim: &Sim, extra: &[&str]) -> (Vec<String>, String) {
    let mut args = vec!["datasets", "--json"];
    args.extend_from_slice(extra);
    let out = sim.run(&mut sim.command(&args));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let handles = v
        .iter()
        .map(|d| d["handle"].as_str().unwrap().to_string())
        .collect();
    (handles, stderr_of(&out))
}

#[test]
fn the_registry_is_listed_in_pages_of_20_ragged_ones_included_and_cached() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(many(45), &["--ragged-pages"]);
    let before = sim.stat("api_list");
    let (mut handles, err) = datasets(&sim, &[]);
    handles.sort();
    handles.dedup();
    assert_eq!(
        handles.len(),
        45,
        "every dataset once, short and empty pages included"
    );
    assert!(!err.contains("incomplete"), "{err}");
    let pages = sim.stat("api_list") - before;
    assert!(pages >= 3, "pages of at most 20: {pages}");
    // Bigger pages when asked for.
    let before = sim.stat("api_list");
    let (handles, _) = datasets(&sim, &["--registry-page-size", "1000"]);
    assert_eq!(handles.len(), 45);
    assert!(sim.stat("api_list") - before < pages);
    // A mount lists the registry once per --registry-ttl, not per `ls`.
    let m = sim.mount(&["--metadata-ttl", "1"]);
    let before = sim.stat("api_list");
    for _ in 0..2 {
        assert_eq!(names(&m.join("10378.1")).len(), 45);
        std::thread::sleep(Duration::from_millis(1200));
    }
    assert!(
        sim.stat("api_list") - before <= pages,
        "listed once within the registry TTL"
    );
}

#[test]
fn a_registry_page_that_cannot_be_read_is_reported_and_handles_still_open() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(many(45), &["--fail-list-page", "2"]);
    let (handles, err) = datasets(&sim, &[]);
    assert!(
        handles.len() >= 20 && handles.len() < 45,
        "{}",
        handles.len()
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("incomplete")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("by its handle"), "{err}");
    // A dataset the listing could not reach still opens by its handle.
    let missing = (1..=45)
        .map(|i| format!("10378.1/{i}"))
        .find(|h| !handles.contains(h))
        .unwrap();
    let m = sim.mount(&[]);
    assert_eq!(names(&m.join("10378.1")).len(), handles.len());
    let suffix = missing.rsplit('/').next().unwrap();
    assert_eq!(
        std::fs::read(m.join(&format!("{missing}/data/f.txt"))).unwrap(),
        format!("{suffix}\n").as_bytes()
    );
    let log = std::fs::read_to_string(&m.log).unwrap();
    assert!(log.contains("cannot be read by the data store"), "{log}");
}

#[test]
fn released_datasets_are_trusted_for_the_released_ttl() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for (h, status) in [("10378.1/1", "RELEASED"), ("10378.1/2", "NOT_RELEASED")] {
        write(
            d.path(),
            &format!("{h}/metadata.json"),
            serde_json::json!({"name": h, "release_status": status})
                .to_string()
                .as_bytes(),
        );
        write(d.path(), &format!("{h}/data/a.txt"), b"a");
    }
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&["--metadata-ttl", "1"]);
    let list = |h: &str| names(&m.join(&format!("{h}/data")));
    assert_eq!(list("10378.1/1"), ["a.txt"]);
    assert_eq!(list("10378.1/2"), ["a.txt"]);
    let before = sim.stat("s3_list");
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(list("10378.1/1"), ["a.txt"]);
    assert_eq!(
        sim.stat("s3_list") - before,
        0,
        "the released dataset is not listed again"
    );
    assert_eq!(list("10378.1/2"), ["a.txt"]);
    assert!(sim.stat("s3_list") - before >= 1, "the other one is");
}

#[test]
fn a_token_without_roles_is_refused_in_one_line() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(many(2), &["--offline-token-scope", "offline_access"]);
    let mnt = tempfile::tempdir().unwrap();
    for args in [
        vec!["mount", mnt.path().to_str().unwrap()],
        vec!["datasets"],
        vec!["ls", "10378.1/1"],
    ] {
        let mut c = sim.command(&args);
        c.env_remove("RUST_LOG");
        let out = sim.run(&mut c);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("`roles` scope"), "{args:?}: {err}");
        assert!(
            err.contains("RRAP_OFFLINE_TOKEN"),
            "names the source: {err}"
        );
        assert!(err.contains("provenafs login"), "{err}");
    }
    assert!(!is_mounted(mnt.path()));
}

#[test]
fn a_registry_page_that_times_out_is_asked_again_with_half_the_size() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(many(200), &[]);
    // Pages of more than 5 records take past the API gateway's limit.
    sim.post("/_sim/faults?list_max_page=5");
    let (list0, e0) = (sim.stat("api_list"), sim.stat("api_list_504"));
    let (mut handles, err) = datasets(&sim, &[]);
    handles.sort();
    handles.dedup();
    assert_eq!(handles.len(), 200, "{err}");
    assert!(!err.contains("incomplete"), "{err}");
    // 20 → 10 → 5, each slow page asked once (at the real gateway each
    // costs 29 s), then the size that worked is kept: not a timeout
    // before every page. It is tried larger again after 16 pages that
    // answered (the registry may have recovered): one more slow page each
    // time, here twice in 40 pages.
    let (calls, slow) = (sim.stat("api_list") - list0, sim.stat("api_list_504") - e0);
    assert_eq!(calls - slow, 40, "{calls} calls");
    assert_eq!(slow, 2 + 2, "{slow} slow pages in {calls} calls");
}
