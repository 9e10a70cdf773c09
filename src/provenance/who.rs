//! Who opened a file: the UID and thread ID the kernel puts in every FUSE
//! request, turned into the process (its thread group), its command and
//! its Slurm job.
//!
//! The job comes from the process's cgroup, which the kernel enforces:
//! Slurm's cgroup plugins put every task under a `job_<ID>` folder (v1:
//! `/slurm/uid_U/job_J/step_S`; v2:
//! `/system.slice/<node>_slurmstepd.scope/job_J/step_S/...`); where there
//! is none (`proctrack/linuxproc`, a container with its own cgroup
//! namespace), from `SLURM_JOB_ID` in `/proc/PID/environ` (readable by the
//! process's owner and by root).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// One reading process, as the manifest names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Who {
    pub uid: u32,
    /// The process (thread group) ID: every thread of a reader is one
    /// reader.
    pub pid: u32,
    /// Its command name when it opened the file (as `ps -o comm`: at most
    /// 15 bytes), if the process was still there to ask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Its Slurm job ID, if it runs in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// When it started, in clock ticks since boot: two processes the
    /// kernel gave the same PID are two readers.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub started: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Most processes remembered: past it the table starts afresh (a process
/// is then looked up again at its next open).
const KEPT: usize = 4096;

/// What `/proc` said of each process. An open costs two small reads:
/// `/proc/TID/status` (the thread's process) and `/proc/PID/stat` (its
/// command now, and its start time); the job is read once per process.
#[derive(Default)]
pub struct WhoCache {
    jobs: Mutex<HashMap<(u32, u64), Option<String>>>,
}

impl WhoCache {
    /// The process of thread `tid` of user `uid`. A TID of 0 (a request
    /// the kernel makes on its own) or one gone already has no command or
    /// job.
    pub fn get(&self, uid: u32, tid: u32) -> Arc<Who> {
        let unknown = || {
            Arc::new(Who {
                uid,
                pid: tid,
                ..Who::default()
            })
        };
        if tid == 0 {
            return unknown();
        }
        let pid = std::fs::read_to_string(format!("/proc/{tid}/status"))
            .ok()
            .and_then(|s| tgid_of(&s))
            .unwrap_or(tid);
        let Some((command, started)) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .as_deref()
            .and_then(parse_stat)
        else {
            return unknown();
        };
        let key = (pid, started);
        let cached = lock(&self.jobs).get(&key).cloned();
        let job = match cached {
            Some(j) => j,
            None => {
                let j = job_of(pid);
                let mut m = lock(&self.jobs);
                if m.len() >= KEPT {
                    m.clear();
                }
                m.insert(key, j.clone());
                j
            }
        };
        Arc::new(Who {
            uid,
            pid,
            command: Some(command),
            job,
            started,
        })
    }
}

/// The `Tgid:` of a `/proc/TID/status`.
fn tgid_of(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The command (field 2, in parentheses, which it may itself contain) and
/// start time (field 22, in clock ticks since boot) of a `/proc/PID/stat`.
fn parse_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let command = stat.get(open + 1..close)?.to_string();
    // Fields after the command start at field 3 (the state).
    let started = stat
        .get(close + 1..)?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    Some((command, started))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The Slurm job of process `pid`: the `job_<ID>` folder of its cgroup
/// (the kernel's word), else its environment's `SLURM_JOB_ID`.
fn job_of(pid: u32) -> Option<String> {
    if let Some(j) = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|cg| job_in_cgroup(&cg))
    {
        return Some(j);
    }
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    job_in_environ(&env)
}

/// `SLURM_JOB_ID` in a NUL-separated environment block, if it is a job ID
/// (digits, with `_` for an array task's own ID as some sites set it).
pub fn job_in_environ(env: &[u8]) -> Option<String> {
    env.split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(b"SLURM_JOB_ID="))
        .filter_map(|v| std::str::from_utf8(v).ok())
        .find(|v| is_job_id(v))
        .map(str::to_string)
}

/// The ID of the first `job_<ID>` folder in a `/proc/PID/cgroup` file.
pub fn job_in_cgroup(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        // `hierarchy:controllers:path`; the path may hold `:` itself.
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .flat_map(|p| p.split('/'))
        .filter_map(|seg| seg.strip_prefix("job_"))
        .find(|id| is_job_id(id))
        .map(str::to_string)
}

fn is_job_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 32 && v.bytes().all(|b| b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_comes_from_the_environment_or_the_cgroup() {
        let env = b"HOME=/root\0SLURM_JOB_ID=4242\0PATH=/bin\0";
        assert_eq!(job_in_environ(env).as_deref(), Some("4242"));
        assert_eq!(job_in_environ(b"SLURM_JOB_ID=\0X=1"), None);
        assert_eq!(job_in_environ(b"SLURM_JOB_ID=$(rm -rf)\0"), None);
        let v1 = "12:memory:/slurm/uid_1000/job_77/step_0\n3:cpuset:/slurm/uid_1000/job_77/step_0/task_0\n";
        assert_eq!(job_in_cgroup(v1).as_deref(), Some("77"));
        let v2 = "0::/system.slice/node1_slurmstepd.scope/job_123456/step_batch/user/task_0\n";
        assert_eq!(job_in_cgroup(v2).as_deref(), Some("123456"));
        assert_eq!(
            job_in_cgroup("0::/user.slice/user-0.slice/session-1.scope\n"),
            None
        );
    }

    #[test]
    fn a_stat_line_gives_command_and_start_even_with_odd_names() {
        let line = "4321 (my (odd) cmd) S 1 4321 4321 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(line), Some(("my (odd) cmd".into(), 987654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_thread_is_its_process() {
        let cache = WhoCache::default();
        let me = std::process::id();
        let a = cache.get(0, me);
        assert!(a.command.is_some() && a.started > 0);
        // Another thread of this process: the same reader.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let _ = done_rx.recv();
        });
        let live = rx.recv().unwrap();
        assert_ne!(live, me);
        assert_eq!(*cache.get(0, live), *a);
        done_tx.send(()).unwrap();
        t.join().unwrap();
        assert_eq!(cache.get(5, 0).command, None);
        assert_eq!(tgid_of("Name:\tx\nTgid:\t42\nPid:\t43\n"), Some(42));
    }
}
