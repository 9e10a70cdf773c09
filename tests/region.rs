//! A wrong `--s3-region` or `--s3-endpoint`: a redirect to the bucket's
//! region is followed once and remembered for the bucket (every dataset
//! in it), with one log line; an S3 400 without a body fails the read
//! (EIO) with one log line naming the region and endpoint, and is not
//! taken for refused credentials (no renewal, no refresh loop).
//!
//! Needs the emulator's `s3_region` and `s3_bare_400` faults.

mod common;

use common::*;

const MIB: usize = 1 << 20;

fn data() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/a.bin", &bytes(51, MIB));
    write(d.path(), "10378.1/2/b.bin", &bytes(52, MIB));
    write(d.path(), "10378.1/2/c.bin", &bytes(53, MIB));
    write(d.path(), "10378.1/2/bad.bin", &bytes(54, MIB));
    d
}

fn same(sim: &Sim, m: &Mount, rel: &str) {
    let got = std::fs::read(m.join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"));
    assert!(
        got == std::fs::read(sim.root().join(rel)).unwrap(),
        "{rel} differs"
    );
}

/// Lines of the mount's log that contain every one of `parts`.
fn lines(m: &Mount, parts: &[&str]) -> Vec<String> {
    log_text(m)
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_redirect_to_the_buckets_region_is_followed_once_and_remembered() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &["--s3-bucket-region", "ap-southeast-2"]);
    let endpoint = sim.env["PROVENA_S3_ENDPOINT"].clone();
    let m = sim.mount(&["--s3-region", "us-east-1"]);
    let issued = sim.stat("credentials_issued");
    same(&sim, &m, "10378.1/1/a.bin");
    // The lookup's LIST and its guess at the file's first bytes go out
    // together, before either learns the region: each is redirected once
    // (the guess is not followed: it is a guess).
    let redirects = sim.stat("s3_redirect");
    assert!(
        (1..=2).contains(&redirects),
        "one redirect for the bucket (two requests at once): {redirects}"
    );
    // Another dataset in the same bucket: signed for the right region at once.
    same(&sim, &m, "10378.1/2/b.bin");
    assert_eq!(
        sim.stat("s3_redirect"),
        redirects,
        "the region is remembered"
    );
    // A redirect is no refused credential: one set per dataset read.
    assert_eq!(sim.stat("credentials_issued"), issued + 2);
    let said = lines(&m, &["is in region ap-southeast-2, not us-east-1"]);
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("WARN"), "{}", said[0]);
    // A custom endpoint stays: only the signing region changes.
    assert!(said[0].contains(&endpoint), "{}", said[0]);

    // The bucket moves (the emulator's region changes): followed again.
    sim.post("/_sim/faults?s3_region=eu-west-1");
    same(&sim, &m, "10378.1/2/c.bin");
    let moved = sim.stat("s3_redirect") - redirects;
    assert!((1..=2).contains(&moved), "followed again: {moved}");
    let said = lines(&m, &["is in region eu-west-1, not ap-southeast-2"]);
    assert_eq!(said.len(), 1, "{said:?}");
}

#[test]
fn a_bare_400_fails_the_read_with_one_line_and_renews_nothing() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let endpoint = sim.env["PROVENA_S3_ENDPOINT"].clone();
    let m = sim.mount(&[]);
    same(&sim, &m, "10378.1/2/b.bin");
    let issued = sim.stat("credentials_issued");
    // A lookup (its listing) answered a bare 400: the lookup fails.
    sim.post("/_sim/faults?s3_bare_400=bad.bin");
    let err = std::fs::metadata(m.join("10378.1/2/bad.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    sim.post("/_sim/faults?s3_bare_400=");
    // A read (its GET) answered a bare 400: the read fails.
    std::fs::metadata(m.join("10378.1/2/c.bin")).unwrap();
    sim.post("/_sim/faults?s3_bare_400=c.bin");
    let err = std::fs::read(m.join("10378.1/2/c.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let answered = sim.stat("s3_bare_400");
    assert!(answered >= 2, "{answered}");
    // No credential renewal, however often it happens.
    assert_eq!(sim.stat("credentials_issued"), issued);
    // One line per failure (no retry: as many as S3 answered at most),
    // naming the region and endpoint and what to check.
    let said = lines(&m, &["WARN", "HTTP 400 without a reason"]);
    assert!(
        !said.is_empty() && said.len() as u64 <= answered,
        "{answered} answers: {said:#?}"
    );
    for l in &said {
        for part in [
            "ap-southeast-2",
            endpoint.as_str(),
            "--s3-region",
            "--s3-endpoint",
        ] {
            assert!(l.contains(part), "{part} not in {l}");
        }
    }
    sim.post("/_sim/faults?s3_bare_400=");
    // Once the fault is gone (and the read layer's few seconds of failure
    // memory are over), both read: nothing else was remembered of it.
    std::thread::sleep(std::time::Duration::from_secs(6));
    same(&sim, &m, "10378.1/2/c.bin");
    same(&sim, &m, "10378.1/2/bad.bin");
}
