//! mount(8)'s ways of calling us, turned into ordinary `provenafs mount`
//! arguments before clap sees them.
//!
//! - `provenafs mount MNT -o allow_other,uid=1000,cache_dir=/x`
//! - `mount -t fuse.provenafs SOURCE MNT -o ...` runs `mount.fuse3`, which
//!   runs `provenafs SOURCE MNT -o ...`
//! - `mount -t provenafs SOURCE MNT -o ...` runs `mount.provenafs SOURCE
//!   MNT [-sfnv] -o ...` (a symlink to this binary)
//!
//! Every `-o` option is the long flag of the same name (`cache_dir=X` is
//! `--cache-dir X`), plus mount(8)'s generic options, which mean nothing
//! for a read-only FUSE mount and are accepted silently. A SOURCE shaped
//! like a dataset handle pins that dataset (`--dataset`).

use std::ffi::OsString;

/// Subcommands; anything else in first position is the mount(8) form.
const SUBCOMMANDS: &[&str] = &[
    "mount",
    "unmount",
    "status",
    "login",
    "logout",
    "whoami",
    "datasets",
    "ls",
    "generate",
    "credentials",
    "url",
    "prefetch",
    "sim",
    "demo",
    "help",
];

/// Generic mount(8) / fstab / systemd options that need no action here.
fn ignored(opt: &str) -> bool {
    matches!(
        opt,
        "" | "defaults"
            | "ro"
            // Always read-only; mount(8) adds `rw` on its own when `ro` is absent.
            | "rw"
            | "_netdev"
            | "nofail"
            | "auto"
            | "noauto"
            | "user"
            | "nouser"
            | "users"
            | "owner"
            | "group"
            | "dev"
            | "nodev"
            | "suid"
            | "nosuid"
            | "exec"
            | "noexec"
            | "atime"
            | "noatime"
            | "relatime"
            | "norelatime"
            | "strictatime"
            | "diratime"
            | "nodiratime"
            | "async"
            | "sync"
            | "dirsync"
            | "lazytime"
            | "nolazytime"
            | "silent"
            | "loud"
            // Always on: the kernel checks the modes we show.
            | "default_permissions"
    ) || opt.starts_with("x-")
        || opt.starts_with("comment=")
        || opt.starts_with("fsname=")
        || opt.starts_with("subtype=")
}

/// `mount -f` (fake): everything but the mount itself, which for us is
/// nothing to do.
pub const FAKE: &str = "--mount-helper-fake";

/// Rewrites `argv` into the `provenafs mount ...` form where needed.
/// `mount_flags` are the long flags `mount` accepts (without `--`) and
/// whether each takes a value.
pub fn normalize(
    argv: Vec<OsString>,
    mount_flags: &[(String, bool)],
) -> Result<Vec<OsString>, String> {
    let Some(argv0) = argv.first().cloned() else {
        return Ok(argv);
    };
    let name = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let first = argv.get(1).map(|a| a.to_string_lossy().into_owned());
    // mount.fuse3 always passes `-o` (it adds `rw,dev,suid` at least), so
    // a mistyped subcommand (`provenafs mout /mnt`) is not taken for it.
    let has_o = argv.iter().any(|a| a.to_string_lossy().starts_with("-o"));
    let helper = name.starts_with("mount.")
        || (has_o
            && first.as_deref().is_some_and(|f| {
                !f.starts_with('-') && !SUBCOMMANDS.contains(&f) && argv.len() >= 3
            }));
    if helper {
        return helper_form(&argv, mount_flags);
    }
    if first.as_deref() == Some("mount") {
        let mut out = vec![argv0, "mount".into()];
        out.extend(expand(&argv[2..], mount_flags)?);
        return Ok(out);
    }
    Ok(argv)
}

/// `SOURCE MOUNTPOINT [-s] [-f] [-n] [-v] [-N NS] [-t TYPE] [-o OPTS]...`
fn helper_form(argv: &[OsString], flags: &[(String, bool)]) -> Result<Vec<OsString>, String> {
    let mut positional = Vec::new();
    let mut rest = Vec::new();
    let mut fake = false;
    let mut i = 1;
    while i < argv.len() {
        let a = argv[i].to_string_lossy();
        match a.as_ref() {
            // sloppy, no-mtab, verbose: nothing to do for us.
            "-s" | "-n" | "-v" => {}
            "-f" => fake = true,
            // The type (fuse.provenafs) and a namespace: known already.
            "-t" | "-N" => i += 1,
            "-o" => {
                rest.push(argv[i].clone());
                if let Some(v) = argv.get(i + 1) {
                    rest.push(v.clone());
                }
                i += 1;
            }
            _ if a.starts_with("-o") => rest.push(argv[i].clone()),
            _ if a.starts_with('-') => rest.push(argv[i].clone()),
            _ => positional.push(argv[i].clone()),
        }
        i += 1;
    }
    let [source, mountpoint] = positional.as_slice() else {
        return Err(
            "usage as a mount helper: provenafs SOURCE MOUNTPOINT [-o OPTIONS]".to_string(),
        );
    };
    if fake {
        return Ok(vec![argv[0].clone(), FAKE.into()]);
    }
    let mut out: Vec<OsString> = vec![argv[0].clone(), "mount".into(), mountpoint.clone()];
    // A handle as copied (`https://hdl.handle.net/10378.1/1687966`, a
    // trailing slash) pins that dataset; any other SOURCE is a label.
    let src = source.to_string_lossy();
    if let Ok(h) = crate::wire::normalize_handle(&src) {
        if crate::wire::split_handle(&h).is_some_and(|(p, _)| crate::fs::names::is_handle_prefix(p))
        {
            out.push("--dataset".into());
            out.push(h.into());
        }
    }
    out.extend(expand(&rest, flags)?);
    Ok(out)
}

/// Expands every `-o a,b=c` (or `-oa,b=c`) into flags; other arguments
/// pass through unchanged.
fn expand(args: &[OsString], flags: &[(String, bool)]) -> Result<Vec<OsString>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].to_string_lossy().into_owned();
        let opts = if a == "-o" {
            i += 1;
            match args.get(i) {
                Some(v) => v.to_string_lossy().into_owned(),
                None => return Err("-o needs a value".to_string()),
            }
        } else if let Some(v) = a.strip_prefix("-o") {
            v.to_string()
        } else {
            out.push(args[i].clone());
            i += 1;
            continue;
        };
        for opt in opts.split(',') {
            let opt = opt.trim();
            if ignored(opt) {
                continue;
            }
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            let flag = key.replace('_', "-");
            let Some((_, takes_value)) = flags.iter().find(|(f, _)| *f == flag) else {
                return Err(format!("unknown mount option `{key}`"));
            };
            match (takes_value, value) {
                (true, Some(v)) => {
                    out.push(format!("--{flag}").into());
                    out.push(v.into());
                }
                (true, None) => {
                    return Err(format!("mount option `{key}` needs a value ({key}=...)"))
                }
                (false, None) => out.push(format!("--{flag}").into()),
                (false, Some(_)) => return Err(format!("mount option `{key}` takes no value")),
            }
        }
        i += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Vec<(String, bool)> {
        [
            ("allow-other", false),
            ("allow-root", false),
            ("uid", true),
            ("gid", true),
            ("cache-dir", true),
            ("token-file", true),
            ("dataset", true),
            ("config", true),
        ]
        .iter()
        .map(|(f, v)| (f.to_string(), *v))
        .collect()
    }

    fn run(args: &[&str]) -> Result<Vec<String>, String> {
        let argv = args.iter().map(OsString::from).collect();
        normalize(argv, &flags()).map(|v| {
            v.into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        })
    }

    #[test]
    fn o_options_become_flags() {
        assert_eq!(
            run(&[
                "provenafs",
                "mount",
                "/m",
                "-o",
                "allow_other,uid=1000,ro,_netdev,nofail",
                "-f"
            ])
            .unwrap(),
            [
                "provenafs",
                "mount",
                "/m",
                "--allow-other",
                "--uid",
                "1000",
                "-f"
            ]
        );
        assert_eq!(
            run(&["provenafs", "mount", "/m", "-ocache_dir=/c"]).unwrap(),
            ["provenafs", "mount", "/m", "--cache-dir", "/c"]
        );
    }

    #[test]
    fn mount_fuse3_and_mount_helper_forms() {
        // mount.fuse3 runs `provenafs SOURCE MOUNTPOINT -o OPTS`.
        assert_eq!(
            run(&[
                "provenafs",
                "provena",
                "/data/p",
                "-o",
                "rw,allow_root,token_file=/t"
            ])
            .unwrap(),
            [
                "provenafs",
                "mount",
                "/data/p",
                "--allow-root",
                "--token-file",
                "/t"
            ]
        );
        // mount(8) runs `mount.provenafs SOURCE MOUNTPOINT -n -o OPTS`; a
        // handle as SOURCE pins that dataset.
        assert_eq!(
            run(&[
                "/sbin/mount.provenafs",
                "10378.1/1687966",
                "/d",
                "-n",
                "-o",
                "gid=5"
            ])
            .unwrap(),
            [
                "/sbin/mount.provenafs",
                "mount",
                "/d",
                "--dataset",
                "10378.1/1687966",
                "--gid",
                "5"
            ]
        );
    }

    #[test]
    fn helper_source_handles_as_copied_and_peer_flags() {
        let f: Vec<(String, bool)> = flags()
            .into_iter()
            .chain(
                [
                    ("debug", false),
                    ("auto-unmount", false),
                    ("read-only", false),
                ]
                .iter()
                .map(|(f, v)| (f.to_string(), *v)),
            )
            .collect();
        let run = |args: &[&str]| {
            normalize(args.iter().map(OsString::from).collect(), &f).map(|v| {
                v.into_iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            run(&[
                "mount.provenafs",
                "https://hdl.handle.net/10378.1/1687966/",
                "/d",
                "-o",
                "ro,debug,auto_unmount,read_only"
            ])
            .unwrap(),
            [
                "mount.provenafs",
                "mount",
                "/d",
                "--dataset",
                "10378.1/1687966",
                "--debug",
                "--auto-unmount",
                "--read-only"
            ]
        );
        // New subcommands are never taken for the mount.fuse3 form.
        for sub in ["generate", "status", "whoami"] {
            assert_eq!(
                run(&["provenafs", sub, "x", "-o", "y"]).unwrap(),
                ["provenafs", sub, "x", "-o", "y"]
            );
        }
    }

    #[test]
    fn bad_options_are_named() {
        assert_eq!(
            run(&["provenafs", "mount", "/m", "-o", "alow_other"]).unwrap_err(),
            "unknown mount option `alow_other`"
        );
        assert!(run(&["provenafs", "mount", "/m", "-o", "uid"])
            .unwrap_err()
            .contains("needs a value"));
        assert!(run(&["provenafs", "mount", "/m", "-o", "allow_other=1"])
            .unwrap_err()
            .contains("takes no value"));
        assert!(run(&["mount.provenafs", "only-one"]).is_err());
        // A typo is not the mount.fuse3 form (that always has -o).
        assert_eq!(
            run(&["provenafs", "mout", "/m"]).unwrap(),
            ["provenafs", "mout", "/m"]
        );
    }

    #[test]
    fn helper_flags_with_values_and_fake_mounts() {
        assert_eq!(
            run(&[
                "mount.provenafs",
                "p",
                "/d",
                "-t",
                "provenafs",
                "-N",
                "/proc/1/ns/mnt",
                "-o",
                "default_permissions"
            ])
            .unwrap(),
            ["mount.provenafs", "mount", "/d"]
        );
        assert_eq!(
            run(&["mount.provenafs", "p", "/d", "-f", "-o", "ro"]).unwrap(),
            ["mount.provenafs", FAKE]
        );
    }

    #[test]
    fn other_commands_pass_through() {
        assert_eq!(
            run(&["provenafs", "ls", "10378.1/1"]).unwrap(),
            ["provenafs", "ls", "10378.1/1"]
        );
        assert_eq!(
            run(&["provenafs", "--help"]).unwrap(),
            ["provenafs", "--help"]
        );
    }
}
