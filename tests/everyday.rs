//! Everyday use: login (device flow), finding datasets, the config file,
//! mount(8)/fstab options, pinned datasets, `by-name/`, unmount as a user.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Three datasets with names, one file each plus a folder.
fn data() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (h, name) in [
        ("10378.1/1", "Coral cover survey"),
        ("10378.1/2", "Reef temperatures"),
        ("102.100.100/7", "Seagrass maps"),
    ] {
        write(
            d.path(),
            &format!("{h}/metadata.json"),
            serde_json::json!({"name": name, "description": format!("About {name}")})
                .to_string()
                .as_bytes(),
        );
        write(d.path(), &format!("{h}/data/values.csv"), b"x,y\n1,2\n");
    }
    d
}

/// A `provenafs` command that must find its token by itself (no
/// RRAP_OFFLINE_TOKEN), with its config under `home`.
fn cmd(sim: &Sim, home: &Path, args: &[&str]) -> Command {
    let mut c = sim.command(args);
    c.env_remove("RRAP_OFFLINE_TOKEN")
        .env("XDG_CONFIG_HOME", home)
        .env_remove("BROWSER")
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY");
    c
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn login_approved_in_the_browser_then_everything_uses_the_stored_token() {
    let sim = Sim::start(data(), &["--device-interval", "1"]);
    let home = tempfile::tempdir().unwrap();
    // A "browser" that notes the address it was asked to open.
    let opened = home.path().join("opened.txt");
    let browser = home.path().join("browser.sh");
    std::fs::write(
        &browser,
        format!("#!/bin/sh\necho \"$1\" > '{}'\n", opened.display()),
    )
    .unwrap();
    std::fs::set_permissions(&browser, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut login = cmd(&sim, home.path(), &["login"])
        .env("BROWSER", &browser)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the instructions as a user would, then approve in the "browser".
    let mut err = BufReader::new(login.stderr.take().unwrap());
    let mut shown = String::new();
    let code = loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "no URL in: {shown}");
        shown.push_str(&line);
        if let Some(i) = line.find("user_code=") {
            break line[i + 10..].trim().to_string();
        }
    };
    assert!(shown.contains(&code), "the code is shown: {shown}");
    // The verification page exists and names the code.
    let url = shown
        .lines()
        .find(|l| l.contains("user_code="))
        .unwrap()
        .trim()
        .to_string();
    let page = sh(&format!("python3 -c \"import urllib.request,sys; print(urllib.request.urlopen(sys.argv[1]).read().decode())\" '{url}'"));
    assert!(String::from_utf8_lossy(&page.stdout).contains(&code));
    sim.decide_device(&code, true);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    shown.push_str(&rest);
    let status = login.wait().unwrap();
    assert!(status.success(), "login failed: {shown}");
    assert!(shown.contains("scan it"), "QR code offered: {shown}");
    assert!(shown.contains("browser window was opened"), "{shown}");
    let url_opened = std::fs::read_to_string(&opened).unwrap();
    assert!(
        url_opened.contains(&format!("user_code={code}")),
        "{url_opened}"
    );
    let token_path = home.path().join("provenafs/token");
    assert_eq!(mode(&token_path), 0o600);
    assert_eq!(mode(token_path.parent().unwrap()), 0o700);
    let token = std::fs::read_to_string(&token_path).unwrap();
    assert_eq!(token.trim().split('.').count(), 3, "a JWT");
    assert!(sim.secrets().iter().any(|s| s == token.trim()));

    // Every command finds the stored token.
    let out = ok(&sim.run(&mut cmd(&sim, home.path(), &["datasets"])));
    assert!(
        out.contains("10378.1/1") && out.contains("Coral cover survey"),
        "{out}"
    );
    let mnt = tempfile::tempdir().unwrap();
    ok(&sim.run(&mut cmd(
        &sim,
        home.path(),
        &["mount", mnt.path().to_str().unwrap()],
    )));
    assert_eq!(
        std::fs::read(mnt.path().join("10378.1/2/data/values.csv")).unwrap(),
        b"x,y\n1,2\n"
    );
    ok(&sim.run(&mut cmd(
        &sim,
        home.path(),
        &["unmount", mnt.path().to_str().unwrap()],
    )));

    // Logout forgets it; then commands say how to log in.
    ok(&sim.run(&mut cmd(&sim, home.path(), &["logout"])));
    assert!(!token_path.exists());
    let out = sim.run(&mut cmd(&sim, home.path(), &["datasets"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("provenafs login"));
}

#[test]
fn login_print_slow_down_denied_and_expired() {
    // A server that wants 6 s between polls while advertising 1 s.
    let sim = Sim::start(
        data(),
        &[
            "--auto-approve",
            "--device-interval",
            "1",
            "--device-min-interval",
            "3",
        ],
    );
    let home = tempfile::tempdir().unwrap();
    let started = Instant::now();
    // Not through `sim.run`: printing the token is the point here, so only
    // its standard error joins the secret scan.
    let out = cmd(&sim, home.path(), &["login", "--print", "--no-qr"])
        .output()
        .unwrap();
    sim.note(&String::from_utf8_lossy(&out.stderr));
    let stdout = ok(&out);
    assert_eq!(stdout.lines().count(), 1, "only the token on stdout");
    assert_eq!(stdout.trim().split('.').count(), 3);
    assert!(
        !home.path().join("provenafs/token").exists(),
        "--print stores nothing"
    );
    assert!(sim.stat("device_slow_downs") >= 1);
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "slow_down adds 5 s to the interval"
    );
    assert_eq!(
        sim.stat("device_slow_downs"),
        1,
        "after one slow_down the client polls slowly enough"
    );

    // Denied in the browser: a clear message, exit 1.
    let sim = Sim::start(data(), &["--device-interval", "1"]);
    let mut login = cmd(&sim, home.path(), &["login", "--no-qr"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(login.stderr.take().unwrap());
    let code = loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0);
        if let Some(i) = line.find("user_code=") {
            break line[i + 10..].trim().to_string();
        }
    };
    sim.decide_device(&code, false);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(!login.wait().unwrap().success());
    assert!(rest.contains("denied"), "{rest}");

    // Never approved: the code expires.
    let sim = Sim::start(
        data(),
        &["--device-interval", "1", "--device-expires-in", "2"],
    );
    let out = sim.run(&mut cmd(&sim, home.path(), &["login", "--no-qr"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expired"), "{err}");
    assert!(!home.path().join("provenafs/token").exists());
}

#[test]
fn datasets_and_ls_without_mounting() {
    let sim = Sim::start(data(), &["--page-size", "2"]);
    let table = ok(&sim.run(&mut sim.command(&["datasets"])));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("HANDLE"), "{table}");
    assert_eq!(lines.len(), 4, "all pages: {table}");
    assert!(table.contains("Seagrass maps") && table.contains("NOT_RELEASED"));
    let json = ok(&sim.run(&mut sim.command(&["datasets", "--json", "--search", "reef"])));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["handle"], "10378.1/2");
    assert_eq!(v[0]["name"], "Reef temperatures");

    let top = ok(&sim.run(&mut sim.command(&["ls", "10378.1/1"])));
    assert!(top.contains("PRE data/"), "{top}");
    assert!(top.contains("metadata.json"), "{top}");
    let sub = ok(&sim.run(&mut sim.command(&["ls", "10378.1/1/data"])));
    assert!(sub.trim().ends_with("8 values.csv"), "{sub}");
    let all = ok(&sim.run(&mut sim.command(&["ls", "-r", "10378.1/1"])));
    assert!(
        all.contains("data/values.csv") && all.contains("Total Objects: 2"),
        "{all}"
    );
    let bad = sim.run(&mut sim.command(&["ls", "10378.1/404"]));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("10378.1/404"));
    let bad = sim.run(&mut sim.command(&["ls", "nonsense"]));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a dataset handle"));
}

/// A config file holding what the environment holds for the emulator.
fn config_file(sim: &Sim, dir: &Path, extra: &str) -> std::path::PathBuf {
    let tf = dir.join("token");
    std::fs::write(&tf, sim.token()).unwrap();
    std::fs::set_permissions(&tf, std::fs::Permissions::from_mode(0o600)).unwrap();
    let p = dir.join("config.toml");
    std::fs::write(
        &p,
        format!(
            "auth_url = \"{}\"\napi_url = \"{}\"\ns3_endpoint = \"{}\"\ntoken_file = \"{}\"\n{extra}",
            sim.env["PROVENA_AUTH_URL"],
            sim.env["PROVENA_API_URL"],
            sim.env["PROVENA_S3_ENDPOINT"],
            tf.display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn config_file_and_precedence() {
    let sim = Sim::start(data(), &[]);
    let home = tempfile::tempdir().unwrap();
    let cfg_dir = home.path().join("provenafs");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    config_file(&sim, &cfg_dir, "");
    // The file alone (found in XDG_CONFIG_HOME) is enough.
    let bare = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("XDG_CONFIG_HOME", home.path())
            .env("RUST_LOG", "trace");
        c
    };
    let out = ok(&sim.run(&mut bare(&["datasets"])));
    assert!(out.contains("Reef temperatures"));
    // Environment beats the file; a flag beats the environment.
    let dead = "http://127.0.0.1:9";
    let out = sim.run(bare(&["datasets"]).env("PROVENA_API_URL", dead));
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:9"));
    let out = sim.run(
        bare(&["datasets", "--api-url", &sim.env["PROVENA_API_URL"]]).env("PROVENA_API_URL", dead),
    );
    ok(&out);
    // --domain derives both URLs (and refuses nothing on https).
    let out = sim.run(&mut bare(&[
        "datasets",
        "--domain",
        "invalid.example",
        "--auth-url",
        dead,
    ]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:9"));
    // A typo in the file is named.
    std::fs::write(cfg_dir.join("config.toml"), "metdata_ttl = 3\n").unwrap();
    let out = sim.run(&mut bare(&["datasets"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `metdata_ttl`"));
}

#[test]
fn o_options_and_mount_8_helpers_and_fstab() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(&sim, dir.path(), "");
    // -o in mount(8)'s form.
    let m = sim.mount(&[
        "-o",
        "ro,uid=1234,gid=2345,_netdev,nofail,metadata_ttl=5,allow_root",
    ]);
    let md = std::fs::metadata(m.join("10378.1/1/data/values.csv")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 2345));
    drop(m);
    let bad = sim.run(&mut sim.command(&["mount", "/tmp", "-o", "alow_other"]));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown mount option `alow_other`"));

    // `mount -t fuse.provenafs` runs mount.fuse3, which runs `provenafs`
    // from PATH; `mount -t provenafs` runs `mount.provenafs`.
    // mount(8) runs helpers with no PATH, so /bin/sh's default applies:
    // provenafs must be installed in a system folder, as the README says.
    let installed = Path::new("/usr/local/bin/provenafs");
    let _ = std::fs::remove_file(installed);
    std::os::unix::fs::symlink(BIN, installed).expect("install into /usr/local/bin (needs root)");
    struct Uninstall<'a>(&'a Path);
    impl Drop for Uninstall<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _uninstall = Uninstall(installed);
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(BIN, bin.path().join("mount.provenafs")).unwrap();
    let path = format!(
        "{}:/usr/sbin:/sbin:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap()
    );
    let mount8 = |prog: &str, args: &[&str]| {
        let mut c = Command::new(prog);
        c.args(args)
            .env("PATH", &path)
            .env("RUST_LOG", "trace")
            .env_remove("RRAP_OFFLINE_TOKEN");
        sim.run(&mut c)
    };
    let mnt = tempfile::tempdir().unwrap();
    let mp = mnt.path().to_str().unwrap();
    let opts = format!("config={},_netdev", cfg.display());
    let out = mount8(
        "mount",
        &["-t", "fuse.provenafs", "provena", mp, "-o", &opts],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(mnt.path().join("102.100.100/7/data/values.csv")).unwrap(),
        b"x,y\n1,2\n"
    );
    assert!(is_mounted(mnt.path()));
    ok(&sim.run(&mut sim.command(&["unmount", mp])));

    // `mount -t provenafs` finds /sbin/mount.provenafs (libmount looks in
    // /sbin only, which a test should not touch) and calls it like this;
    // a handle as source pins that dataset.
    let helper = bin.path().join("mount.provenafs");
    let out = mount8(
        helper.to_str().unwrap(),
        &["10378.1/2", mp, "-n", "-o", &opts],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = names(&mnt.path().join("10378.1"));
    assert_eq!(names, ["2"]);
    ok(&sim.run(&mut sim.command(&["unmount", mp])));

    // An fstab line, mounted by its mountpoint alone.
    let fstab = dir.path().join("fstab");
    std::fs::write(
        &fstab,
        format!("provena {mp} fuse.provenafs {opts},nofail,x-systemd.automount 0 0\n"),
    )
    .unwrap();
    let out = mount8("mount", &["-T", fstab.to_str().unwrap(), mp]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read_dir(mnt.path().join("10378.1"))
            .unwrap()
            .count()
            == 2
    );
    let out = Command::new("umount").arg(mp).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pinned_datasets_never_list_the_registry() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let m = sim.mount(&["--dataset", "10378.1/2", "--dataset", "102.100.100/7"]);
    let root = names(m.path());
    assert_eq!(root, ["102.100.100", "10378.1"]);
    let inner = names(&m.join("10378.1"));
    assert_eq!(inner, ["2"]);
    let err = std::fs::metadata(m.join("10378.1/1")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    assert_eq!(
        std::fs::read(m.join("10378.1/2/data/values.csv")).unwrap(),
        b"x,y\n1,2\n"
    );
    assert_eq!(sim.stat("api_list"), 0, "registry never listed");
    // A typo fails the mount at once, not at the first read.
    let bad = sim.run(&mut sim.command(&["mount", "/tmp/x-none", "--dataset", "10378.1/404"]));
    assert!(!bad.status.success());
    let mnt = tempfile::tempdir().unwrap();
    let out = sim.run(&mut sim.command(&[
        "mount",
        mnt.path().to_str().unwrap(),
        "--dataset",
        "10378.1/404",
    ]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dataset 10378.1/404"), "{err}");
    assert!(!is_mounted(mnt.path()));
    // So does a dataset whose files the user may not read.
    let sim = Sim::start(data(), &["--deny", "10378.1/2"]);
    let out = sim.run(&mut sim.command(&[
        "mount",
        mnt.path().to_str().unwrap(),
        "--dataset",
        "10378.1/2",
    ]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dataset 10378.1/2") && err.contains("permission denied"),
        "{err}"
    );
    assert!(!is_mounted(mnt.path()));
}

#[test]
fn by_name_view_links_to_handles() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let m = sim.mount(&["--by-name"]);
    let names = names(&m.join("by-name"));
    assert_eq!(
        names,
        ["Coral cover survey", "Reef temperatures", "Seagrass maps"]
    );
    let link = m.join("by-name/Seagrass maps");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new("../102.100.100/7")
    );
    assert_eq!(
        std::fs::read(link.join("data/values.csv")).unwrap(),
        b"x,y\n1,2\n"
    );
    let out = sh(&format!(
        "ls '{}/by-name/Reef temperatures/data'",
        m.path().display()
    ));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "values.csv");
}

#[test]
fn a_user_mounts_and_unmounts_without_root() {
    if !fuse_available() {
        return;
    }
    let world = std::fs::metadata("/dev/fuse").unwrap().permissions().mode() & 0o006 == 0o006;
    if unsafe { libc::geteuid() } != 0 || !world {
        // Distributions ship /dev/fuse as 0666; some containers do not.
        assert!(
            std::env::var_os("CI").is_none(),
            "needs root and a /dev/fuse users may open (chmod 666 /dev/fuse, as .ci/run does)"
        );
        eprintln!("skipping: needs root and a world-usable /dev/fuse");
        return;
    }
    let sim = Sim::start(data(), &[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let tf = dir.path().join("token");
    std::fs::write(&tf, sim.token()).unwrap();
    std::fs::set_permissions(&tf, std::fs::Permissions::from_mode(0o600)).unwrap();
    let nobody = 65534;
    for p in [&mnt, &tf] {
        std::os::unix::fs::chown(p, Some(nobody), Some(nobody)).unwrap();
    }
    let as_nobody = |args: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
            .args(args)
            .env("HOME", "/nonexistent")
            .env("RUST_LOG", "trace")
            .env_remove("RRAP_OFFLINE_TOKEN");
        sim.endpoints(&mut c);
        sim.run(&mut c)
    };
    let mp = mnt.to_str().unwrap();
    let out = as_nobody(&["mount", mp, "--token-file", tf.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&mnt));
    // Killed, the user's daemon takes its mount with it too (its watchdog
    // unmounts through fusermount3), and the folder mounts again.
    let found = Command::new("pgrep")
        .arg("-f")
        .arg(format!("provenafs mount {mp} "))
        .output()
        .unwrap();
    let pid: i32 = String::from_utf8_lossy(&found.stdout)
        .trim()
        .parse()
        .unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_mounted(&mnt) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !is_mounted(&mnt),
        "the killed daemon's mount is gone within 5 s"
    );
    let out = as_nobody(&["mount", mp, "--token-file", tf.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&mnt));
    let out = as_nobody(&["unmount", mp]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_mounted(&mnt) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!is_mounted(&mnt), "unmounted by its user");
}
