//! provenafs shaped like the tools its users know (issue 11, "Conventional"):
//! usage errors, per-command flags, peers' mount flags, man page and
//! completions, handles as copied, `ls` of a missing folder, tokens that
//! say where they came from, `whoami`, `logout` revoking, the emulator's
//! env file, file and folder modes, where a background mount logs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn data() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/data/a.csv", b"a,b\n1,2\n");
    write(d.path(), "10378.1/1/top.txt", b"top");
    write(d.path(), "10378.1/2/x.txt", b"x");
    d
}

/// The binary with no deployment, token or config around it.
fn bare(args: &[&str], home: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env("XDG_CONFIG_HOME", home)
        .env("HOME", home)
        .env_remove("RRAP_OFFLINE_TOKEN")
        .env_remove("PROVENAFS_CONFIG")
        .env_remove("PROVENAFS_LOG")
        .env_remove("RUST_LOG");
    for k in [
        "PROVENA_AUTH_URL",
        "PROVENA_API_URL",
        "PROVENA_S3_ENDPOINT",
        "PROVENA_DOMAIN",
        "PROVENA_REALM",
    ] {
        c.env_remove(k);
    }
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

/// A token file only its owner can read.
fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[test]
fn usage_errors_keep_clap_message_and_exit_2() {
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| bare(args, home.path()).output().unwrap();

    let out = run(&["mout", "/x"]);
    let err = text(&out.stderr);
    assert_eq!(code(&out), Some(2), "{err}");
    assert!(err.contains("'mount'"), "suggests mount: {err}");
    assert!(err.contains("Usage: provenafs"), "{err}");

    let out = run(&["mount"]);
    let err = text(&out.stderr);
    assert_eq!(code(&out), Some(2), "{err}");
    assert!(err.contains("<MOUNTPOINT>"), "names what is missing: {err}");

    let out = run(&["mount", "/m", "-o", "alow_other"]);
    let err = text(&out.stderr);
    assert_eq!(code(&out), Some(2), "{err}");
    assert!(err.contains("unknown mount option `alow_other`"), "{err}");
    assert!(err.contains("Usage: provenafs mount"), "{err}");

    let out = run(&["mount", "/m", "--file-mode", "rw"]);
    assert_eq!(code(&out), Some(2));
    assert!(text(&out.stderr).contains("not an octal mode"));
    let out = run(&["mount", "/m", "-o", "uid"]);
    assert_eq!(code(&out), Some(2));
    let out = run(&["unmount"]);
    assert_eq!(code(&out), Some(2));

    for ok in [
        &["--help"][..],
        &["--version"][..],
        &["mount", "--help"][..],
        &["help", "ls"][..],
    ] {
        let out = run(ok);
        assert_eq!(code(&out), Some(0), "{ok:?}: {}", text(&out.stderr));
    }

    // Runtime failures are 1, with one line.
    let out = run(&["ls", "10378.1/1"]);
    let err = text(&out.stderr);
    assert_eq!(code(&out), Some(1), "{err}");
    assert!(err.contains("no offline token"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let out = run(&["unmount", "-l", "/nonexistent/provenafs-mnt"]);
    assert_eq!(code(&out), Some(1), "{}", text(&out.stderr));
}

#[test]
fn each_command_lists_only_the_flags_it_uses() {
    let home = tempfile::tempdir().unwrap();
    let help = |cmd: &str| text(&bare(&[cmd, "--help"], home.path()).output().unwrap().stdout);
    let has = |h: &str, f: &str| h.lines().any(|l| l.trim_start().contains(f));

    let mount = help("mount");
    for f in [
        "-o <OPTIONS>",
        "--read-only",
        "--debug",
        "--auto-unmount",
        "-f, --foreground",
        "--file-mode <OCTAL>",
        "--dir-mode <OCTAL>",
        "--token-file",
        "--api-url",
        "--s3-endpoint",
        "--auth-url",
        "--config",
    ] {
        assert!(has(&mount, f), "mount --help lacks {f}:\n{mount}");
    }
    let login = help("login");
    for f in ["--auth-url", "--domain", "--realm", "--config", "--no-qr"] {
        assert!(has(&login, f), "login --help lacks {f}");
    }
    for f in [
        "--api-url",
        "--s3-endpoint",
        "--s3-region",
        "--token-file",
        "--request-timeout",
    ] {
        assert!(!has(&login, f), "login --help shows {f}:\n{login}");
    }
    let datasets = help("datasets");
    for f in [
        "--auth-url",
        "--token-file",
        "--api-url",
        "--request-timeout",
    ] {
        assert!(has(&datasets, f), "datasets --help lacks {f}");
    }
    for f in ["--s3-endpoint", "--s3-region"] {
        assert!(!has(&datasets, f), "datasets --help shows {f}");
    }
    let ls = help("ls");
    for f in ["--auth-url", "--token-file", "--api-url", "--s3-endpoint"] {
        assert!(has(&ls, f), "ls --help lacks {f}");
    }
    let whoami = help("whoami");
    assert!(has(&whoami, "--token-file") && !has(&whoami, "--s3-endpoint"));
    let unmount = help("unmount");
    assert!(has(&unmount, "-l, --lazy"), "{unmount}");
    assert!(has(&help("status"), "--json"));
}

#[test]
fn generate_prints_a_man_page_and_completions() {
    let home = tempfile::tempdir().unwrap();
    let gen = |what: &str| {
        let out = bare(&["generate", what], home.path()).output().unwrap();
        assert_eq!(code(&out), Some(0), "{what}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let man = gen("man");
    assert!(
        man.contains(".TH provenafs 1"),
        "{}",
        &man[..200.min(man.len())]
    );
    assert!(
        man.contains("PROVENAFS MOUNT"),
        "subcommands have their section"
    );
    assert!(man.contains("file\\-mode"), "mount's flags are in it");
    // man(1) can render it, when installed.
    if Command::new("man").arg("--version").output().is_ok() {
        let p = home.path().join("provenafs.1");
        std::fs::write(&p, &man).unwrap();
        let out = Command::new("man")
            .arg("-l")
            .arg(&p)
            .env("MANPAGER", "cat")
            .env("PAGER", "cat")
            .output()
            .unwrap();
        assert!(text(&out.stdout).contains("read-only"), "man -l renders it");
    }
    assert!(gen("complete-bash").contains("_provenafs()"));
    assert!(gen("complete-zsh").starts_with("#compdef provenafs"));
    assert!(gen("complete-fish").contains("complete -c provenafs"));
    let out = bare(&["generate", "complete-tcsh"], home.path())
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(2));
    // `generate` is never mistaken for mount.fuse3's `SOURCE MOUNTPOINT -o`.
    let out = bare(&["generate", "man", "-o", "x"], home.path())
        .output()
        .unwrap();
    assert!(text(&out.stderr).contains("unexpected argument"));
}

#[test]
fn handles_as_copied_and_ls_of_a_missing_folder() {
    let sim = Sim::start(data(), &[]);
    let ls = |target: &str| sim.run(&mut sim.command(&["ls", target]));
    let plain = ok(&ls("10378.1/1"));
    assert!(
        plain.contains("PRE data/") && plain.contains("top.txt"),
        "{plain}"
    );
    for form in [
        "10378.1/1/",
        "https://hdl.handle.net/10378.1/1",
        "http://hdl.handle.net/10378.1/1/",
        "hdl.handle.net/10378.1/1",
    ] {
        assert_eq!(ok(&ls(form)), plain, "{form}");
    }
    let sub = ok(&ls("https://hdl.handle.net/10378.1/1/data"));
    assert!(sub.contains("a.csv"), "{sub}");
    // A file lists itself, as `aws s3 ls` does.
    assert!(ok(&ls("10378.1/1/data/a.csv")).contains("a.csv"));

    for missing in [
        "10378.1/1/no/such/path",
        "10378.1/1/no/such/path/",
        "10378.1/1/dat/",
    ] {
        let out = ls(missing);
        let err = text(&out.stderr);
        assert_eq!(code(&out), Some(1), "{missing}: {err}");
        assert!(err.contains("no such folder"), "{err}");
        assert!(out.stdout.is_empty(), "no listing for {missing}");
    }
    // `ls -r` streams; its summary counts what was listed.
    let all = ok(&sim.run(&mut sim.command(&["ls", "-r", "10378.1/1/"])));
    assert!(all.contains("Total Objects: 2"), "{all}");
    // Logs written to a pipe carry no colour codes.
    let out = sim.run(sim.command(&["ls", "10378.1/1"]).env("RUST_LOG", "debug"));
    assert!(!out.stderr.is_empty(), "debug logs expected");
    assert!(!out.stderr.contains(&0x1b), "ANSI codes in piped logs");

    // A config file's `dataset` and `--dataset` take the same forms: the
    // mount checks them before anything else (a bad one is refused).
    let home = tempfile::tempdir().unwrap();
    let cfg = home.path().join("c.toml");
    std::fs::write(&cfg, "dataset = [\"10378.1/1/x/y\"]\n").unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let out = sim.run(&mut sim.command(&[
        "mount",
        mnt.path().to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]));
    assert_eq!(code(&out), Some(1));
    assert!(text(&out.stderr).contains("not a dataset handle"));
    let out = sim.run(&mut sim.command(&[
        "mount",
        mnt.path().to_str().unwrap(),
        "--dataset",
        "hdl.handle.net/nonsense",
    ]));
    assert_eq!(code(&out), Some(2));
}

#[test]
fn token_errors_name_their_source_and_whoami_shows_the_user() {
    let sim = Sim::start(data(), &[]);
    let home = tempfile::tempdir().unwrap();
    let dir = home.path();

    // From the environment.
    let out = ok(&sim.run(&mut sim.command(&["whoami"])));
    assert!(out.contains("sim-user"), "{out}");
    assert!(out.contains("sim-user@example.org"), "{out}");
    assert!(out.contains("Sim User"), "{out}");
    assert!(out.contains("token    RRAP_OFFLINE_TOKEN"), "{out}");
    let out = sim.run(
        sim.command(&["whoami"])
            .env("RRAP_OFFLINE_TOKEN", "eyJh.eyJi.c2ln"),
    );
    let err = text(&out.stderr);
    assert_eq!(code(&out), Some(1), "{err}");
    assert!(
        err.contains("from RRAP_OFFLINE_TOKEN was rejected") && err.contains("unset it"),
        "{err}"
    );
    let out = sim.run(sim.command(&["datasets"]).env("RRAP_OFFLINE_TOKEN", "abc"));
    assert!(text(&out.stderr).contains("offline token from RRAP_OFFLINE_TOKEN is malformed"));

    // From --token-file.
    let good = token_file(dir, "good", sim.token());
    let out = ok(&sim.run(
        sim.command(&["whoami", "--token-file", good.to_str().unwrap()])
            .env_remove("RRAP_OFFLINE_TOKEN"),
    ));
    assert!(
        out.contains(&format!("--token-file {}", good.display())),
        "{out}"
    );
    let bad = token_file(dir, "bad", "eyJh.eyJi.c2ln");
    let out =
        sim.run(&mut sim.command(&["ls", "10378.1/1", "--token-file", bad.to_str().unwrap()]));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("from --token-file {} was rejected", bad.display())),
        "{err}"
    );

    // From the config file's token_file.
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, format!("token_file = \"{}\"\n", bad.display())).unwrap();
    let out = sim.run(
        sim.command(&["whoami", "--config", cfg.to_str().unwrap()])
            .env_remove("RRAP_OFFLINE_TOKEN"),
    );
    let err = text(&out.stderr);
    assert_eq!(code(&out), Some(1));
    assert!(err.contains("the config file's token_file"), "{err}");
    assert!(err.contains(cfg.to_str().unwrap()), "{err}");

    // From the stored login.
    let stored = dir.join("provenafs/token");
    std::fs::create_dir_all(stored.parent().unwrap()).unwrap();
    token_file(stored.parent().unwrap(), "token", "eyJh.eyJi.c2ln");
    let out = sim.run(
        sim.command(&["datasets"])
            .env_remove("RRAP_OFFLINE_TOKEN")
            .env("XDG_CONFIG_HOME", dir),
    );
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("the stored login at {}", stored.display()))
            && err.contains("provenafs login"),
        "{err}"
    );
}

#[test]
fn login_warns_of_overrides_and_logout_revokes_at_the_identity_service() {
    let sim = Sim::start(data(), &["--auto-approve", "--device-interval", "1"]);
    let home = tempfile::tempdir().unwrap();
    let stored = home.path().join("provenafs/token");
    let login = |envs: &[(&str, &str)]| {
        let mut c = sim.command(&["login", "--no-qr", "--no-browser"]);
        c.env("XDG_CONFIG_HOME", home.path())
            .env_remove("DISPLAY")
            .env_remove("BROWSER");
        for (k, v) in envs {
            c.env(k, v);
        }
        let out = sim.run(&mut c);
        assert_eq!(code(&out), Some(0), "login: {}", text(&out.stderr));
        text(&out.stderr)
    };
    // RRAP_OFFLINE_TOKEN is set (sim.command sets it): a warning.
    let said = login(&[]);
    assert!(
        said.contains("warning: RRAP_OFFLINE_TOKEN takes precedence"),
        "{said}"
    );
    assert!(stored.exists());
    let token = std::fs::read_to_string(&stored).unwrap();
    let copy = token_file(home.path(), "copy", token.trim());
    let no_env = |args: &[&str]| {
        let mut c = sim.command(args);
        c.env_remove("RRAP_OFFLINE_TOKEN")
            .env("XDG_CONFIG_HOME", home.path());
        c
    };
    ok(&sim.run(&mut no_env(&[
        "whoami",
        "--token-file",
        copy.to_str().unwrap(),
    ])));

    // Logout revokes, then deletes.
    let out = sim.run(&mut no_env(&["logout"]));
    let said = text(&out.stderr);
    assert_eq!(code(&out), Some(0), "{said}");
    assert!(said.contains("Revoked the offline token"), "{said}");
    assert!(!stored.exists());
    let out = sim.run(&mut no_env(&[
        "whoami",
        "--token-file",
        copy.to_str().unwrap(),
    ]));
    let err = text(&out.stderr);
    assert_eq!(code(&out), Some(1), "revoked: {err}");
    assert!(
        err.contains("was rejected") && err.contains("invalid_grant"),
        "{err}"
    );
    // The emulator's own token was not touched.
    ok(&sim.run(&mut sim.command(&["whoami"])));

    // A config file's token_file also takes precedence: a warning.
    let cfg = home.path().join("provenafs/config.toml");
    std::fs::write(&cfg, format!("token_file = \"{}\"\n", copy.display())).unwrap();
    let said = login(&[("RRAP_OFFLINE_TOKEN", "")]);
    assert!(said.contains("the config file's token_file"), "{said}");
    std::fs::remove_file(&cfg).unwrap();

    // The identity service cannot be reached: removed, but NOT revoked.
    let token = std::fs::read_to_string(&stored).unwrap();
    let copy2 = token_file(home.path(), "copy2", token.trim());
    let out =
        sim.run(no_env(&["logout"]).env("PROVENA_AUTH_URL", "http://127.0.0.1:9/auth/realms/rrap"));
    let err = text(&out.stderr);
    assert_eq!(code(&out), Some(1), "{err}");
    assert!(
        err.contains("NOT revoked") && err.contains("127.0.0.1:9"),
        "{err}"
    );
    assert!(!stored.exists(), "deleted all the same");
    ok(&sim.run(&mut no_env(&[
        "whoami",
        "--token-file",
        copy2.to_str().unwrap(),
    ])));
    let out = sim.run(&mut no_env(&["logout"]));
    assert!(text(&out.stderr).contains("Not logged in"));
}

#[test]
fn the_env_file_can_be_sourced_and_sim_says_what_next() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let sim = Sim::start_logged(data(), &[], log.path());
    let env_file = sim.root().with_extension("env");
    let lines = std::fs::read_to_string(&env_file).unwrap();
    assert!(
        lines.contains(
            "\nexport PROVENA_AUTH_URL PROVENA_API_URL PROVENA_PROV_API_URL PROVENA_JOB_API_URL \
             PROVENA_S3_ENDPOINT RRAP_OFFLINE_TOKEN\n"
        ),
        "{lines}"
    );
    // `source FILE` (`.` in sh) then a command: the values reach it.
    let home = tempfile::tempdir().unwrap();
    let out = sim.run(
        Command::new("sh")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", home.path())
            .arg("-c")
            .arg(format!(". '{}' && '{BIN}' datasets", env_file.display())),
    );
    assert!(
        text(&out.stdout).contains("10378.1/1"),
        "{}",
        text(&out.stderr)
    );
    let said = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        said.contains(&format!("source {}", env_file.display())),
        "{said}"
    );
    assert!(said.contains("provenafs mount /tmp/provena"), "{said}");
}

/// What a new user sees in the emulator's terminal during the demo: a
/// mount, a listing and a read are no errors (the mount's S3 endpoint
/// check, an unsigned `HEAD /`, was logged as three ERROR lines).
#[test]
fn a_mount_and_a_read_log_no_error_in_the_emulator() {
    if !fuse_available() {
        return;
    }
    let log = tempfile::NamedTempFile::new().unwrap();
    let sim = Sim::start_logged(data(), &[], log.path());
    let m = sim.mount(&[]);
    assert_eq!(std::fs::read(m.join("10378.1/1/top.txt")).unwrap(), b"top");
    drop(m);
    let said = std::fs::read_to_string(log.path()).unwrap();
    let errors: Vec<&str> = said.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn mount_takes_peer_flags_modes_and_handles_and_says_where_it_logs() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let parent = tempfile::tempdir().unwrap();
    let mnt = parent.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    let log = parent.path().join("mount.log");
    sim.scan_log(&log);
    // A relative mountpoint and log file, as typed in the folder above.
    let out = sim.run(
        sim.command(&[
            "mount",
            "m",
            "--read-only",
            "--auto-unmount",
            "--debug",
            "-o",
            "ro,read_only,auto_unmount,debug,file_mode=0440,dir_mode=0550",
            "--dataset",
            "https://hdl.handle.net/10378.1/1/",
            "--log-file",
            "mount.log",
        ])
        .current_dir(parent.path()),
    );
    assert!(ok(&out).is_empty(), "standard output stays the caller's");
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        said.trim(),
        format!(
            "provenafs: mounted at {}; logs in {}",
            mnt.display(),
            log.display()
        )
    );
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new(BIN)
                .arg("unmount")
                .arg(self.0)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    let _guard = Unmount(&mnt);
    assert_eq!(names(&mnt), ["10378.1"]);
    assert_eq!(
        names(&mnt.join("10378.1")),
        ["1"],
        "only the pinned dataset"
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&mnt.join("10378.1/1/top.txt")), 0o440);
    assert_eq!(mode(&mnt.join("10378.1/1/data")), 0o550);
    assert_eq!(
        std::fs::read(mnt.join("10378.1/1/data/a.csv")).unwrap(),
        b"a,b\n1,2\n"
    );
    // --debug logs at debug level, without colour codes, in the file.
    let logged = std::fs::read(&log).unwrap();
    assert!(text(&logged).contains("DEBUG"), "{}", text(&logged));
    assert!(!logged.contains(&0x1b), "ANSI codes in the log file");
    let out = sim.run(&mut sim.command(&["unmount", mnt.to_str().unwrap()]));
    ok(&out);
    assert!(!is_mounted(&mnt));
}
