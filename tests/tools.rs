//! Other tools on the same credential chain: `provenafs credentials` as an
//! AWS `credential_process` (read by boto3 from a venv), its `--env`
//! lines, and `provenafs url`. None of these mount, so FUSE is not needed.
//!
//! `credentials` prints secrets on standard output by design, so its
//! standard output never joins the emulator's secret scan (see
//! [`Sim::run`]); its standard error always does.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use common::*;

const SST: &str = "10378.1/1687966";
const DENIED: &str = "10378.1/7";

fn data() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "10378.1/1687966/data/sst.csv",
        b"date,sst_c\n1,24.0\n",
    );
    write(d.path(), "10378.1/1687966/data/big.bin", &bytes(7, 200_000));
    write(d.path(), "10378.1/1687966/notes with spaces/a.txt", b"a\n");
    write(d.path(), "10378.1/1687966/README.txt", b"readme\n");
    write(d.path(), "10378.1/7/secret.txt", b"not for you\n");
    d
}

fn start() -> Sim {
    Sim::start(data(), &["--deny", DENIED])
}

/// Runs `provenafs credentials ARGS` at trace level: standard output kept
/// out of the secret scan, standard error in it.
fn credentials(sim: &Sim, args: &[&str]) -> Output {
    let mut all = vec!["credentials"];
    all.extend_from_slice(args);
    let out = sim.command(&all).output().expect("run provenafs");
    let err = String::from_utf8_lossy(&out.stderr);
    sim.note(&err);
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn credentials_print_credential_process_json_and_only_that() {
    let sim = start();
    let before = SystemTime::now();
    let out = credentials(&sim, &[SST]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The whole of standard output is one JSON object: an SDK parses all of it.
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("only JSON on stdout");
    let o = v.as_object().unwrap();
    let mut keys: Vec<&str> = o.keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "AccessKeyId",
            "Expiration",
            "SecretAccessKey",
            "SessionToken",
            "Version"
        ]
    );
    assert_eq!(v["Version"], 1);
    let secret = v["SecretAccessKey"].as_str().unwrap();
    let session = v["SessionToken"].as_str().unwrap();
    let issued = sim.secrets();
    assert!(
        issued.iter().any(|s| s == secret),
        "the emulator's secret key"
    );
    assert!(
        issued.iter().any(|s| s == session),
        "the emulator's session token"
    );
    // ISO 8601 in UTC to the second, about the emulator's credential lifetime ahead.
    let exp = v["Expiration"].as_str().unwrap();
    assert_eq!(exp.len(), "2026-11-30T07:00:00Z".len(), "{exp}");
    assert!(exp.ends_with('Z') && exp.as_bytes()[10] == b'T', "{exp}");
    let at = provenafs::wire::parse_expiry(exp).unwrap();
    let ttl = at.duration_since(before).unwrap();
    assert!(
        // The emulator's default, as the real service's: 8 hours.
        ttl > Duration::from_secs(28_700) && ttl <= Duration::from_secs(28_801),
        "{exp}: {ttl:?}"
    );
    // Nothing secret (and, at the default level, nothing at all) on stderr.
    let err = text(&out.stderr);
    assert!(!err.contains(secret) && !err.contains(session));
    let quiet = sim
        .command(&["credentials", SST])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(quiet.status.success());
    assert_eq!(text(&quiet.stderr), "", "a credential_process says nothing");
    // A handle as pasted.
    let pasted = credentials(&sim, &[&format!("https://hdl.handle.net/{SST}/")]);
    assert!(pasted.status.success(), "{}", text(&pasted.stderr));
    assert_eq!(sim.stat("credentials_issued"), 3);
}

#[test]
fn env_lines_export_the_keys_region_and_only_a_custom_endpoint() {
    let sim = start();
    let out = credentials(&sim, &["--env", SST]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines = text(&out.stdout);
    assert!(
        lines.lines().all(|l| l.starts_with("export AWS_")),
        "only export lines"
    );
    // What a shell gets from `eval "$(provenafs credentials --env H)"`.
    let names = [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_CREDENTIAL_EXPIRATION",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL_S3",
    ];
    let script = format!(
        "eval \"$LINES\"; printf '%s\\n' {}",
        names.map(|n| format!("\"${n}\"")).join(" ")
    );
    let shell = Command::new("sh")
        .args(["-c", &script])
        .env("LINES", &lines)
        .output()
        .unwrap();
    assert!(shell.status.success());
    let got = text(&shell.stdout);
    let vals: Vec<&str> = got.lines().collect();
    assert_eq!(vals.len(), names.len(), "{:?}", names);
    let issued = sim.secrets();
    assert!(vals[0].starts_with("ASIA"));
    assert!(issued.iter().any(|s| s == vals[1]), "the secret key");
    assert!(issued.iter().any(|s| s == vals[2]), "the session token");
    assert!(provenafs::wire::parse_expiry(vals[3]).is_some());
    assert_eq!(vals[4], "ap-southeast-2");
    assert_eq!(vals[5], "ap-southeast-2");
    assert_eq!(vals[6], sim.env["PROVENA_S3_ENDPOINT"]);
    assert!(!text(&out.stderr).contains(vals[1]));

    // AWS S3 itself (no endpoint): no endpoint line; another region as asked.
    let aws = sim
        .command(&["credentials", "--env", "--s3-region", "us-west-2", SST])
        .env_remove("PROVENA_S3_ENDPOINT")
        .output()
        .unwrap();
    sim.note(&text(&aws.stderr));
    assert!(aws.status.success(), "{}", text(&aws.stderr));
    let lines = text(&aws.stdout);
    assert!(!lines.contains("AWS_ENDPOINT_URL_S3"), "{lines:?}");
    assert!(lines.contains("export AWS_REGION='us-west-2'\n"));
}

#[test]
fn a_dataset_the_user_may_not_read_gets_one_line_and_no_credentials() {
    let sim = start();
    for args in [vec![DENIED], vec!["--env", DENIED]] {
        // As a user (or an SDK showing a credential_process's stderr) sees it.
        let mut all = vec!["credentials"];
        all.extend_from_slice(&args);
        let out = sim.run(sim.command(&all).env_remove("RUST_LOG"));
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(text(&out.stdout), "", "nothing on stdout");
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err:?}");
        assert!(
            err.starts_with("provenafs: ") && err.contains(DENIED),
            "{err:?}"
        );
        assert!(err.contains("sufficient permissions"), "{err:?}");
        // At trace level too: fails, and its stderr joins the scan.
        let traced = credentials(&sim, &args);
        assert_eq!(traced.status.code(), Some(1));
        assert!(traced.stdout.is_empty());
    }
    // Not a dataset, not a handle.
    let out = credentials(&sim, &["10378.1/999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let out = credentials(&sim, &["not-a-handle"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert_eq!(sim.stat("credentials_issued"), 0);
}

#[test]
fn url_names_datasets_folders_and_files_and_refuses_what_is_not_there() {
    let sim = start();
    let url = |target: &str| {
        let out = sim.run(&mut sim.command(&["url", target]));
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let ok = |target: &str, want: &str| {
        let (code, out, err) = url(target);
        assert_eq!(code, Some(0), "{target}: {err}");
        assert_eq!(out, format!("{want}\n"), "{target}");
    };
    let root = "s3://provena-bucket/datasets/10378-1-1687966/";
    // The dataset: no S3 call, so no credentials asked for.
    ok(SST, root);
    ok(&format!("https://hdl.handle.net/{SST}"), root);
    ok(&format!("{SST}/"), root);
    assert_eq!(sim.stat("credentials_issued"), 0);
    // Folders end in `/`, given with or without it.
    ok(&format!("{SST}/data"), &format!("{root}data/"));
    ok(&format!("{SST}/data/"), &format!("{root}data/"));
    ok(
        &format!("{SST}/notes with spaces"),
        &format!("{root}notes with spaces/"),
    );
    // Files.
    ok(
        &format!("{SST}/data/sst.csv"),
        &format!("{root}data/sst.csv"),
    );
    ok(
        &format!("hdl:{SST}/README.txt"),
        &format!("{root}README.txt"),
    );
    // What is not there: one line, exit 1, nothing on stdout.
    for missing in ["data/nope.csv", "dat", "data/sst.csv/", "nothing/"] {
        let target = format!("{SST}/{missing}");
        let out = sim.run(sim.command(&["url", &target]).env_remove("RUST_LOG"));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{target}");
        assert!(out.stdout.is_empty(), "{target}");
        assert_eq!(
            err,
            format!("provenafs: no such file or folder: {target}\n"),
            "{target}"
        );
    }
    let (code, _, err) = url("10378.1/999/x");
    assert_eq!(code, Some(1));
    assert!(err.contains("no dataset with handle 10378.1/999"), "{err}");
    // A dataset the user may see but not read: its root is named, a path
    // in it cannot be checked.
    ok(DENIED, "s3://provena-bucket/datasets/10378-1-7/");
    let (code, _, err) = url(&format!("{DENIED}/secret.txt"));
    assert_eq!(code, Some(1));
    assert!(err.contains("sufficient permissions"), "{err}");
}

fn venv_dir() -> PathBuf {
    std::env::temp_dir().join(format!("provenafs-test-venv-{}", std::process::id()))
}

/// A Python venv with boto3, made once per test run; `None` (the test
/// skips) when it cannot be made, except under CI, where that fails.
fn boto3_python() -> Option<&'static Path> {
    static VENV: OnceLock<Option<PathBuf>> = OnceLock::new();
    VENV.get_or_init(|| {
        let dir = venv_dir();
        // Tests run on threads of one process, and which is last cannot
        // be told: the venv goes when the process exits.
        extern "C" fn remove_venv() {
            let _ = std::fs::remove_dir_all(venv_dir());
        }
        unsafe { libc::atexit(remove_venv) };
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .output()
            .map(|o| (o.status.success(), text(&o.stderr)));
        let python = dir.join("bin/python");
        let installed = match made {
            Ok((true, _)) => Command::new(&python)
                .args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "boto3"])
                .output()
                .map(|o| (o.status.success(), text(&o.stderr))),
            other => other,
        };
        match installed {
            Ok((true, _)) => Some(python),
            failed => {
                let why = match failed {
                    Ok((_, err)) => err,
                    Err(e) => e.to_string(),
                };
                let _ = std::fs::remove_dir_all(&dir);
                if std::env::var_os("CI").is_some() {
                    panic!("CI needs python3 -m venv (apt-get install python3-venv) and pip install boto3 from PyPI: {why}");
                }
                eprintln!("skipping: no venv with boto3 ({why})");
                None
            }
        }
    })
    .as_deref()
}

#[test]
fn boto3_reads_a_dataset_through_credential_process() {
    let Some(python) = boto3_python() else {
        return;
    };
    let sim = start();
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("aws-config");
    std::fs::write(
        &config,
        format!(
            "[profile sst]\ncredential_process = {BIN} credentials {SST}\nregion = ap-southeast-2\nendpoint_url = {ep}\n\n\
             [profile denied]\ncredential_process = {BIN} credentials {DENIED}\nregion = ap-southeast-2\nendpoint_url = {ep}\n",
            ep = sim.env["PROVENA_S3_ENDPOINT"]
        ),
    )
    .unwrap();
    let script = r#"
import hashlib, sys, boto3, botocore.exceptions
s3 = boto3.Session(profile_name="sst").client("s3")
page = s3.list_objects_v2(Bucket=sys.argv[1], Prefix=sys.argv[2])
for o in page["Contents"]:
    body = s3.get_object(Bucket=sys.argv[1], Key=o["Key"])["Body"].read()
    print(o["Key"][len(sys.argv[2]):], hashlib.sha256(body).hexdigest())
try:
    boto3.Session(profile_name="denied").client("s3").list_objects_v2(Bucket=sys.argv[1], Prefix="x")
    print("denied: listed")
except botocore.exceptions.CredentialRetrievalError as e:
    print("denied:", str(e).replace("\n", " "), file=sys.stderr)
"#;
    // The user's environment, as a credential_process inherits it: the
    // emulator's endpoints and token; no AWS settings of this machine.
    let mut c = Command::new(python);
    c.args(["-c", script, "provena-bucket", "datasets/10378-1-1687966/"])
        .env("HOME", home.path())
        .env("AWS_CONFIG_FILE", &config)
        .env("AWS_SHARED_CREDENTIALS_FILE", home.path().join("none"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("XDG_STATE_HOME", sim.state.path())
        .env("RUST_LOG", "trace");
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") && !k.starts_with("AWS_CONFIG") && !k.starts_with("AWS_SHARED") {
            c.env_remove(&k);
        }
    }
    for (k, v) in &sim.env {
        c.env(k, v);
    }
    let out = c.output().expect("run python");
    // boto3 prints no secrets; the provenafs it ran logged at trace level.
    sim.note(&text(&out.stdout));
    sim.note(&text(&out.stderr));
    let got = text(&out.stdout);
    assert!(out.status.success(), "boto3: {}\n{got}", text(&out.stderr));
    use sha2::Digest;
    let mut want: Vec<String> = [
        "README.txt",
        "data/big.bin",
        "data/sst.csv",
        "notes with spaces/a.txt",
    ]
    .iter()
    .map(|rel| {
        let bytes = std::fs::read(sim.root().join(SST).join(rel)).unwrap();
        format!("{rel} {}", hex::encode(sha2::Sha256::digest(&bytes)))
    })
    .collect();
    want.sort();
    let mut lines: Vec<&str> = got.lines().collect();
    lines.sort();
    assert_eq!(lines, want);
    // One credential_process run served the listing and every read.
    assert_eq!(sim.stat("credentials_issued"), 1);
    // The refused dataset: boto3 shows provenafs's one line.
    let err = text(&out.stderr);
    assert!(
        err.contains("denied:") && err.contains("sufficient permissions"),
        "{err}"
    );
}
