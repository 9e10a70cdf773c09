//! Calls into folders on file systems provenafs does not control: the
//! shared cache folder and its `creds-<uid>/` (Lustre, GPFS, NFS), the log
//! and state folders (a home folder that is itself NFS), a job's
//! `$TMPDIR`. Those stall (a metadata server failing over, a full quota,
//! an NFS server gone), and the kernel parks the calling thread for as
//! long, often where no signal reaches it. This module owns the rules for
//! every such call, so that a stalled folder costs the mount that folder
//! and nothing else:
//!
//! - a call runs on a thread of its own, never on an async worker, and is
//!   waited for no longer than the folder's stall timeout (or the caller's
//!   deadline, if sooner); the caller then goes on without it;
//! - a call that is still running after the stall timeout (whoever waits
//!   for it) marks the folder as not answering: said once in the log, shown
//!   by `provenafs status`, and from then on calls are refused at once,
//!   without touching the file system, so callers take their fallback
//!   (reads go to S3, leases to the daemon's own, blocks are not written);
//! - after a backoff (5 s, doubling to 60 s) the folder is probed in the
//!   background with a small call of its owner's choosing (creating and
//!   removing a file: one the file system's server must answer); a probe
//!   that answers in time makes the folder usable again (said once too). A
//!   stuck call that finally returns starts a probe at once. Callers never
//!   wait for a probe: while the folder is not answering, every call is
//!   refused at once;
//! - threads parked in stuck calls are bounded: each folder has a number of
//!   slots, and a call that finds none free is refused, not queued.
//!
//! The closures given here do the file system work; they own what they
//! touch (`Arc`s, descriptors), since a stuck one outlives its caller.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use thiserror::Error;
use tracing::{info, warn};

use crate::retry::Deadline;

/// The first wait before a folder that stopped answering is tried again…
const FIRST_RETRY: Duration = Duration::from_secs(5);
/// …doubling up to this.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// A patient call (see [`Folder::run_blocking_patient`]) may take this
/// many stall timeouts.
const PATIENCE: u32 = 6;

/// Calls beyond a folder's slots that only clean-ups may use (see
/// [`Folder::spawn_cleanup`]).
const RESERVE: usize = 8;

/// Why a call into a folder gave no answer.
#[derive(Debug, Error)]
pub enum FolderError {
    /// The folder did not answer within its stall timeout, now or lately
    /// (then the call was not even tried).
    #[error("not answering")]
    NotAnswering,
    /// Every slot of the folder holds a call still running.
    #[error("too many calls in flight")]
    Busy,
    /// The call answered, with an error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// One folder that may stall, and its calls (see the module docs).
/// Cloning gives another handle to the same folder and state.
#[derive(Clone)]
pub struct Folder(Arc<Inner>);

/// A folder's probe (see the module docs).
type Probe = Box<dyn Fn() -> std::io::Result<()> + Send + Sync>;

struct Inner {
    /// What it is, for messages: "shared cache folder".
    what: &'static str,
    /// Its probe; without one, a `stat` of its path.
    probe: std::sync::OnceLock<Probe>,
    path: PathBuf,
    /// What the mount does meanwhile, for messages: "reads go to S3".
    fallback: &'static str,
    stall: Duration,
    slots: usize,
    state: Mutex<State>,
    note: Mutex<Option<String>>,
}

/// What a running call is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Bounded by the stall timeout; one running past it means the folder
    /// does not answer.
    Normal,
    /// May take [`PATIENCE`] stall timeouts (a large listing, a large
    /// write and its `fsync`): not a stall before that.
    Patient,
    /// Ends something another call started (a claim, a lock): may use the
    /// reserve slots.
    Cleanup,
    /// The folder's own probe.
    Probe,
}

#[derive(Default)]
struct State {
    /// Calls running, by start (oldest first): what they do, and what they
    /// are.
    running: BTreeMap<(Instant, u64), (&'static str, Kind)>,
    next_id: u64,
    down: Option<Down>,
    /// When the folder last answered again: calls started before that
    /// (still stuck in the old stall) do not mark it down a second time.
    recovered_at: Option<Instant>,
    /// Calls refused because the folder was not answering or full.
    refused: u64,
    /// Times the folder stopped answering.
    stalls: u64,
}

/// A folder that stopped answering.
#[derive(Clone)]
struct Down {
    since: Instant,
    since_wall: SystemTime,
    /// The call that did not answer.
    op: &'static str,
    retry_at: Instant,
    backoff: Duration,
    probing: bool,
}

/// How a folder is doing, for `provenafs status`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FolderHealth {
    /// What it is ("shared cache folder", "log folder", ...).
    pub what: String,
    pub path: PathBuf,
    /// `answering`, or `not answering`.
    pub state: String,
    /// Since when it has not answered (RFC 3339), and the call it did not
    /// answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stuck_call: Option<String>,
    /// What the mount does meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meanwhile: Option<String>,
    /// Anything else to know (a cache at its free-space floor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Times it stopped answering since the mount started.
    pub stalls: u64,
    /// Calls (log lines, for the log folder) given up without trying.
    pub refused: u64,
}

/// Every folder of this process, for `status` (see [`all_health`]).
static FOLDERS: Mutex<Vec<Weak<dyn Reports>>> = Mutex::new(Vec::new());

/// Something whose health `status` shows (a [`Folder`], the log writer).
pub trait Reports: Send + Sync {
    fn health(&self) -> FolderHealth;

    /// Calls running that are not stuck (see [`settle_all`]).
    fn busy(&self) -> usize {
        0
    }

    /// Starts a probe if one is due (asking how a folder is doing is a
    /// reason to look, even when no call comes).
    fn tick(self: Arc<Self>) {}
}

/// Registers `r` for [`all_health`] for as long as it lives.
pub fn register(r: &Arc<dyn Reports>) {
    let mut all = lock(&FOLDERS);
    all.retain(|w| w.strong_count() > 0);
    all.push(Arc::downgrade(r));
}

/// The health of every folder this process uses (a probe of a folder
/// that does not answer is started, if one is due).
pub fn all_health() -> Vec<FolderHealth> {
    let all: Vec<Arc<dyn Reports>> = lock(&FOLDERS).iter().filter_map(Weak::upgrade).collect();
    all.into_iter()
        .map(|r| {
            r.clone().tick();
            r.health()
        })
        .collect()
}

/// Waits, at most `limit`, until no folder has a call running that is
/// not stuck: what a mount started in the background (ending claims,
/// writing blocks, storing a lease) is done before the process exits. A
/// folder that does not answer is not waited for.
pub fn settle_all(limit: Duration) {
    let t = Instant::now();
    loop {
        let busy: usize = lock(&FOLDERS)
            .iter()
            .filter_map(Weak::upgrade)
            .map(|r| r.busy())
            .sum();
        if busy == 0 || t.elapsed() >= limit {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A call admitted into a folder: ends (its slot freed, its outcome
/// noted) when dropped, on the thread that ran it.
struct Ticket {
    folder: Arc<Inner>,
    key: (Instant, u64),
    kind: Kind,
    /// The call ran to its end (not dropped untried, not a panic).
    answered: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.folder.finish(self.key, self.kind, self.answered);
    }
}

impl Folder {
    /// A folder at `path` (for messages), known as `what`, whose calls
    /// answer within `stall` or are given up, at most `slots` of them
    /// running at once; `fallback` says what the mount does while it does
    /// not answer.
    pub fn new(
        what: &'static str,
        path: &Path,
        fallback: &'static str,
        stall: Duration,
        slots: usize,
    ) -> Folder {
        let inner = Arc::new(Inner {
            what,
            probe: std::sync::OnceLock::new(),
            path: path.to_path_buf(),
            fallback,
            stall,
            slots: slots.max(1),
            state: Mutex::new(State::default()),
            note: Mutex::new(None),
        });
        let r: Arc<dyn Reports> = inner.clone();
        register(&r);
        Folder(inner)
    }

    /// Sets how the folder is probed while it does not answer: a small
    /// call its server must answer (creating and removing a file there),
    /// better than the default `stat` of its path, which a client may
    /// answer from its cache. Only the first call counts.
    pub fn set_probe(&self, probe: impl Fn() -> std::io::Result<()> + Send + Sync + 'static) {
        let _ = self.0.probe.set(Box::new(probe));
    }

    /// Sets (or clears) what `status` says of the folder besides whether
    /// it answers.
    pub fn set_note(&self, note: Option<String>) {
        *lock(&self.0.note) = note;
    }

    /// Its stall timeout.
    pub fn stall_timeout(&self) -> Duration {
        self.0.stall
    }

    /// Where it is (for messages).
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// Calls running now (stuck ones included).
    pub fn in_flight(&self) -> usize {
        self.0.lock().running.len()
    }

    /// Whether calls are tried now (false while it is not answering).
    pub fn answering(&self) -> bool {
        self.0.lock().down.is_none()
    }

    /// Runs `f` on a thread of its own, waiting for it until the stall
    /// timeout or `deadline`, whichever comes first. Refused at once (not
    /// tried) while the folder is not answering, every slot is taken, or
    /// `deadline` has passed.
    pub async fn run<T, F>(
        &self,
        op: &'static str,
        deadline: Option<Deadline>,
        f: F,
    ) -> Result<T, FolderError>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        let wait = deadline.map_or(self.0.stall, |d| d.remaining().min(self.0.stall));
        self.run_kind(op, Kind::Normal, deadline, wait, f).await
    }

    /// [`Folder::run`] for a call that may rightly take longer than the
    /// stall timeout (a large write and its `fsync`): waited for up to six
    /// stall timeouts, and not taken for a stall before that.
    pub async fn run_patient<T, F>(&self, op: &'static str, f: F) -> Result<T, FolderError>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        let wait = self.0.stall * PATIENCE;
        self.run_kind(op, Kind::Patient, None, wait, f).await
    }

    async fn run_kind<T, F>(
        &self,
        op: &'static str,
        kind: Kind,
        deadline: Option<Deadline>,
        wait: Duration,
        f: F,
    ) -> Result<T, FolderError>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        if deadline.is_some_and(|d| d.expired()) {
            return Err(FolderError::NotAnswering);
        }
        let mut ticket = self.0.admit(op, kind)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        spawn(move || {
            let r = f();
            ticket.answered = true;
            drop(ticket);
            let _ = tx.send(r);
        })?;
        let bound = match kind {
            Kind::Patient => self.0.stall * PATIENCE,
            _ => self.0.stall,
        };
        let started = Instant::now();
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => r.map_err(FolderError::Io),
            // The thread died (a panic in `f`).
            Ok(Err(_)) => Err(FolderError::Io(std::io::Error::other(
                "the call into the folder died",
            ))),
            Err(_) => {
                if started.elapsed() >= bound {
                    self.0.stopped(op);
                }
                Err(FolderError::NotAnswering)
            }
        }
    }

    /// [`Folder::run`] for a caller that is not async (start-up, a thread
    /// of its own): blocks the calling thread, never past the stall
    /// timeout.
    pub fn run_blocking<T, F>(&self, op: &'static str, f: F) -> Result<T, FolderError>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        self.blocking(op, Kind::Normal, self.0.stall, f)
    }

    /// [`Folder::run_blocking`] for a call that may rightly take longer
    /// than the stall timeout (listing a shard folder of many thousands of
    /// blocks, a large write and its `fsync`): waited for up to six stall
    /// timeouts, and not taken for a stall before that.
    pub fn run_blocking_patient<T, F>(&self, op: &'static str, f: F) -> Result<T, FolderError>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        self.blocking(op, Kind::Patient, self.0.stall * PATIENCE, f)
    }

    fn blocking<T, F>(
        &self,
        op: &'static str,
        kind: Kind,
        wait: Duration,
        f: F,
    ) -> Result<T, FolderError>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        let mut ticket = self.0.admit(op, kind)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        spawn(move || {
            let r = f();
            ticket.answered = true;
            drop(ticket);
            let _ = tx.send(r);
        })?;
        match rx.recv_timeout(wait) {
            Ok(r) => r.map_err(FolderError::Io),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                self.0.stopped(op);
                Err(FolderError::NotAnswering)
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(FolderError::Io(
                std::io::Error::other("the call into the folder died"),
            )),
        }
    }

    /// Runs `f` on a thread of its own and does not wait for it (work
    /// whose outcome nobody needs: writing a block, storing a lease).
    /// Refused, and `f` dropped untried, as [`Folder::run`] would refuse it.
    pub fn spawn<F>(&self, op: &'static str, f: F) -> Result<(), FolderError>
    where
        F: FnOnce() + Send + 'static,
    {
        self.spawn_kind(op, Kind::Normal, f)
    }

    /// [`Folder::spawn`] for a call that may rightly take longer than the
    /// stall timeout (a whole file written): not taken for a stall before
    /// [`PATIENCE`] stall timeouts.
    pub fn spawn_patient<F>(&self, op: &'static str, f: F) -> Result<(), FolderError>
    where
        F: FnOnce() + Send + 'static,
    {
        self.spawn_kind(op, Kind::Patient, f)
    }

    /// [`Folder::spawn`] for a call that ends what another started (a
    /// claim, a lock): it may use a few reserve slots when the others are
    /// all taken, so a busy folder still gets its claims ended. Refused
    /// while the folder does not answer.
    pub fn spawn_cleanup<F>(&self, op: &'static str, f: F) -> Result<(), FolderError>
    where
        F: FnOnce() + Send + 'static,
    {
        self.spawn_kind(op, Kind::Cleanup, f)
    }

    fn spawn_kind<F>(&self, op: &'static str, kind: Kind, f: F) -> Result<(), FolderError>
    where
        F: FnOnce() + Send + 'static,
    {
        let ticket = self.0.admit(op, kind)?;
        spawn(move || {
            // The whole ticket moves in (not just the field set below):
            // it ends with the call, on this thread.
            let mut ticket = ticket;
            f();
            ticket.answered = true;
        })
    }
}

/// A thread for one call: an idle one that ran an earlier call, or a new
/// one. Not tokio's blocking pool: the runtime waits for that pool's
/// threads when it shuts down, and a call stuck in a hung file system
/// would hold the daemon's exit; these are never waited for. A thread
/// stuck in a call is simply not idle, so later calls get other threads
/// (as many as the folders' slots let in). Reused rather than one started
/// per call: starting and ending a thread maps and unmaps its stack, a
/// TLB flush on every core, about a tenth of the daemon's CPU when it
/// serves blocks from the disk cache.
fn spawn(f: impl FnOnce() + Send + 'static) -> Result<(), FolderError> {
    let mut q = lock(&THREADS.0);
    // Each call queued has an idle thread of its own to take it.
    if q.idle > q.calls.len() {
        q.calls.push_back(Box::new(f));
        THREADS.1.notify_one();
        return Ok(());
    }
    drop(q);
    std::thread::Builder::new()
        .name("provenafs-fs".into())
        .spawn(move || serve(Box::new(f)))
        .map(drop)
        .map_err(FolderError::Io)
}

type Call = Box<dyn FnOnce() + Send + 'static>;

/// Calls waiting for an idle thread, and how many threads are idle.
#[derive(Default)]
struct Threads {
    calls: std::collections::VecDeque<Call>,
    idle: usize,
}

static THREADS: (Mutex<Threads>, std::sync::Condvar) = (
    Mutex::new(Threads {
        calls: std::collections::VecDeque::new(),
        idle: 0,
    }),
    std::sync::Condvar::new(),
);

/// How long a thread with no call waits for one before it ends.
const THREAD_IDLE: Duration = Duration::from_secs(10);

/// A thread's life: `first`, then each call queued for an idle thread,
/// until none comes for [`THREAD_IDLE`].
fn serve(first: Call) {
    let mut call = Some(first);
    loop {
        if let Some(c) = call.take() {
            c();
        }
        let mut q = lock(&THREADS.0);
        loop {
            if let Some(c) = q.calls.pop_front() {
                call = Some(c);
                break;
            }
            q.idle += 1;
            let (g, waited) = THREADS
                .1
                .wait_timeout(q, THREAD_IDLE)
                .unwrap_or_else(|p| p.into_inner());
            q = g;
            q.idle -= 1;
            if waited.timed_out() && q.calls.is_empty() {
                return;
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Lets a call in, or says why not (see the module docs).
    fn admit(self: &Arc<Self>, op: &'static str, kind: Kind) -> Result<Ticket, FolderError> {
        let now = Instant::now();
        let mut st = self.lock();
        // A call running past the stall timeout (one nobody waits for, a
        // write in the background) that started since the folder last
        // answered: the folder does not answer. (Patient calls have their
        // own bound; calls stuck since an earlier stall are counted once.)
        if st.down.is_none() {
            let since = st.recovered_at;
            let stuck = st
                .running
                .iter()
                .filter(|(&(start, _), (_, k))| {
                    *k != Kind::Patient && since.is_none_or(|r| start >= r)
                })
                .map(|(&(start, _), &(op, _))| (start, op))
                .next();
            if let Some((start, op)) = stuck {
                if now.duration_since(start) >= self.stall {
                    self.mark_down(&mut st, op);
                }
            }
        }
        if let Some(d) = st.down.as_ref() {
            let due = !d.probing && now >= d.retry_at;
            st.refused += 1;
            if due {
                self.start_probe(st);
            }
            return Err(FolderError::NotAnswering);
        }
        let room = self.slots + if kind == Kind::Cleanup { RESERVE } else { 0 };
        if st.running.len() >= room {
            st.refused += 1;
            return Err(FolderError::Busy);
        }
        Ok(self.ticket(&mut st, op, kind))
    }

    fn ticket(self: &Arc<Self>, st: &mut State, op: &'static str, kind: Kind) -> Ticket {
        st.next_id += 1;
        let key = (Instant::now(), st.next_id);
        st.running.insert(key, (op, kind));
        Ticket {
            folder: self.clone(),
            key,
            kind,
            answered: false,
        }
    }

    /// Probes the folder on a thread of its own (nobody waits for it).
    /// Takes the state's lock guard, to let it go before the thread starts.
    fn start_probe(self: &Arc<Self>, mut st: MutexGuard<'_, State>) {
        let Some(d) = st.down.as_mut() else {
            return;
        };
        d.probing = true;
        let ticket = self.ticket(&mut st, "probe", Kind::Probe);
        drop(st);
        let me = self.clone();
        // Should the thread not start (or the probe panic), the ticket
        // ends unanswered: a failed probe, never taken for an answer.
        let _ = spawn(move || {
            let mut ticket = ticket;
            let _ = match me.probe.get() {
                Some(p) => p(),
                None => std::fs::symlink_metadata(&me.path).map(drop),
            };
            ticket.answered = true;
        });
    }

    /// A call (or a probe) ended: ran to its end (`answered`), or not.
    fn finish(self: &Arc<Self>, key: (Instant, u64), kind: Kind, answered: bool) {
        let took = key.0.elapsed();
        let mut st = self.lock();
        st.running.remove(&key);
        let Some(d) = st.down.as_mut() else {
            return;
        };
        if kind == Kind::Probe {
            d.probing = false;
            if answered && took < self.stall {
                let down_for = d.since.elapsed();
                st.down = None;
                st.recovered_at = Some(Instant::now());
                info!(
                    folder = %self.path.display(),
                    "the {} answers again (it did not for {:.0?})",
                    self.what,
                    down_for
                );
            } else {
                // Slower than the stall timeout, or not run at all: not
                // yet; wait longer before the next try.
                d.backoff = (d.backoff * 2).min(MAX_RETRY);
                d.retry_at = Instant::now() + d.backoff;
            }
            return;
        }
        // A stuck call returned at last: the folder may answer now; a
        // probe tells, at once.
        if answered && !d.probing {
            self.start_probe(st);
        }
    }

    /// A call waited for its whole bound.
    fn stopped(&self, op: &'static str) {
        let mut st = self.lock();
        if st.down.is_none() {
            self.mark_down(&mut st, op);
        }
    }

    fn mark_down(&self, st: &mut State, op: &'static str) {
        st.stalls += 1;
        st.down = Some(Down {
            since: Instant::now(),
            since_wall: SystemTime::now(),
            op,
            retry_at: Instant::now() + FIRST_RETRY,
            backoff: FIRST_RETRY,
            probing: false,
        });
        warn!(
            folder = %self.path.display(),
            "the {} did not answer within {:?} ({op}); {} until it does",
            self.what,
            self.stall,
            self.fallback
        );
    }
}

impl Reports for Inner {
    fn health(&self) -> FolderHealth {
        let st = self.lock();
        let down = st.down.clone();
        FolderHealth {
            what: self.what.to_string(),
            path: self.path.clone(),
            state: if down.is_some() {
                "not answering".into()
            } else {
                "answering".into()
            },
            since: down.as_ref().map(|d| d.since_wall.into()),
            stuck_call: down.as_ref().map(|d| d.op.to_string()),
            meanwhile: down.as_ref().map(|_| self.fallback.to_string()),
            note: lock(&self.note).clone(),
            stalls: st.stalls,
            refused: st.refused,
        }
    }

    fn tick(self: Arc<Self>) {
        let st = self.lock();
        if st
            .down
            .as_ref()
            .is_some_and(|d| !d.probing && Instant::now() >= d.retry_at)
        {
            self.start_probe(st);
        }
    }

    fn busy(&self) -> usize {
        let st = self.lock();
        if st.down.is_some() {
            return 0;
        }
        let now = Instant::now();
        st.running
            .keys()
            .filter(|(start, _)| now.duration_since(*start) < self.stall)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A gate calls wait at while it is shut, as a hung file system does.
    #[derive(Clone, Default)]
    struct Gate(Arc<AtomicBool>);

    impl Gate {
        fn shut(&self, on: bool) {
            self.0.store(on, Ordering::SeqCst)
        }
        fn pass(&self) {
            while self.0.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Waits (at most 2 s) for the folder to answer again.
    fn until_answering(f: &Folder) {
        let t = Instant::now();
        while !f.answering() {
            assert!(t.elapsed() < Duration::from_secs(2), "never answered again");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn callers_never_wait_for_a_probe_and_a_stuck_probe_keeps_it_down() {
        let f = folder(4);
        let gate = Gate::default();
        let probed = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (g, n) = (gate.clone(), probed.clone());
        f.set_probe(move || {
            n.fetch_add(1, Ordering::SeqCst);
            g.pass();
            Ok(())
        });
        gate.shut(true);
        let g = gate.clone();
        assert!(matches!(
            f.run_blocking("stuck", move || {
                g.pass();
                Ok(())
            }),
            Err(FolderError::NotAnswering)
        ));
        // Past the first retry (5 s): a call starts the probe, and is
        // refused at once; the probe hangs, and no other starts.
        f.0.lock().down.as_mut().unwrap().retry_at = Instant::now();
        let t = Instant::now();
        for _ in 0..5 {
            assert!(f.run_blocking("call", || Ok(())).is_err());
        }
        assert!(t.elapsed() < Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(probed.load(Ordering::SeqCst), 1);
        gate.shut(false);
        until_answering(&f);
        assert!(f.run_blocking("call", || Ok(())).is_ok());
    }

    fn folder(slots: usize) -> Folder {
        Folder::new(
            "test folder",
            Path::new("/test"),
            "the test goes on",
            Duration::from_millis(200),
            slots,
        )
    }

    #[tokio::test]
    async fn a_stuck_call_is_given_up_and_the_folder_is_refused_until_it_answers() {
        let f = folder(4);
        let gate = Gate::default();
        assert_eq!(f.run("ok", None, || Ok(1)).await.unwrap(), 1);
        gate.shut(true);
        let g = gate.clone();
        let t = Instant::now();
        let r = f.run("stuck", None, move || {
            g.pass();
            Ok(2)
        });
        assert!(matches!(r.await, Err(FolderError::NotAnswering)));
        assert!(
            t.elapsed() < Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
        let h = f.0.health();
        assert_eq!(h.state, "not answering");
        assert_eq!(h.stuck_call.as_deref(), Some("stuck"));
        // Refused at once, untried, while it does not answer.
        let tried = Arc::new(AtomicBool::new(false));
        let t2 = tried.clone();
        let t = Instant::now();
        let r = f.run("next", None, move || {
            t2.store(true, Ordering::SeqCst);
            Ok(3)
        });
        assert!(matches!(r.await, Err(FolderError::NotAnswering)));
        assert!(t.elapsed() < Duration::from_millis(50));
        assert!(!tried.load(Ordering::SeqCst));
        // The stuck call returns: a probe of the folder's own follows at
        // once, answers, and calls go in again.
        gate.shut(false);
        until_answering(&f);
        assert_eq!(f.run("after", None, || Ok(4)).await.unwrap(), 4);
        assert_eq!(f.0.health().state, "answering");
        assert_eq!(f.0.health().stalls, 1);
    }

    #[test]
    fn a_call_stuck_since_an_earlier_stall_does_not_keep_it_down() {
        let f = folder(4);
        let gate = Gate::default();
        let forever = Gate::default();
        gate.shut(true);
        forever.shut(true);
        // One call stuck for good (a dead server behind one file), one
        // stuck only while the folder was.
        let g = forever.clone();
        f.spawn("stuck for good", move || g.pass()).unwrap();
        let g = gate.clone();
        assert!(f
            .run_blocking("stuck", move || {
                g.pass();
                Ok(())
            })
            .is_err());
        assert!(!f.answering());
        gate.shut(false);
        until_answering(&f);
        // The old stuck call is not taken for a new stall.
        for _ in 0..20 {
            assert!(f.run_blocking("call", || Ok(())).is_ok());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(f.0.health().stalls, 1);
        forever.shut(false);
    }

    #[test]
    fn a_patient_call_is_not_a_stall_and_cleanups_have_room() {
        let f = folder(1);
        assert!(f
            .run_blocking_patient("list", || {
                std::thread::sleep(Duration::from_millis(350));
                Ok(())
            })
            .is_ok());
        assert!(f.answering());
        let gate = Gate::default();
        gate.shut(true);
        let g = gate.clone();
        f.spawn("write", move || g.pass()).unwrap();
        // The one slot is taken: a write is refused, a clean-up is not.
        assert!(matches!(f.spawn("write", || {}), Err(FolderError::Busy)));
        assert!(f.spawn_cleanup("end a claim", || {}).is_ok());
        gate.shut(false);
    }

    #[tokio::test]
    async fn parked_threads_are_bounded_by_the_slots() {
        let f = folder(2);
        let gate = Gate::default();
        gate.shut(true);
        for _ in 0..2 {
            let g = gate.clone();
            f.spawn("write", move || g.pass()).unwrap();
        }
        // Both slots hold a stuck call: the third is refused, not parked.
        let g = gate.clone();
        assert!(matches!(
            f.spawn("write", move || g.pass()),
            Err(FolderError::Busy)
        ));
        // Past the stall timeout the stuck background calls mark it.
        std::thread::sleep(Duration::from_millis(250));
        assert!(matches!(
            f.run("read", None, || Ok(())).await,
            Err(FolderError::NotAnswering)
        ));
        assert!(!f.answering());
        gate.shut(false);
        until_answering(&f);
        assert!(f.run("read", None, || Ok(())).await.is_ok());
    }

    #[tokio::test]
    async fn a_short_deadline_gives_up_without_marking_the_folder() {
        let f = folder(4);
        let d = Deadline::after(Duration::from_millis(20));
        let r = f.run("slow", Some(d), || {
            std::thread::sleep(Duration::from_millis(60));
            Ok(())
        });
        assert!(matches!(r.await, Err(FolderError::NotAnswering)));
        assert_eq!(f.0.health().state, "answering");
        // An answer with an error is an answer.
        let r = f.run("missing", None, || {
            Err::<(), _>(std::io::Error::from(std::io::ErrorKind::NotFound))
        });
        assert!(matches!(r.await, Err(FolderError::Io(_))));
        assert_eq!(f.0.health().state, "answering");
    }

    #[test]
    fn a_blocking_caller_is_bounded_too() {
        let f = folder(4);
        let t = Instant::now();
        let r = f.run_blocking("stuck", || {
            std::thread::sleep(Duration::from_millis(600));
            Ok(())
        });
        assert!(matches!(r, Err(FolderError::NotAnswering)));
        assert!(t.elapsed() < Duration::from_millis(400));
        assert!(all_health()
            .iter()
            .any(|h| h.what == "test folder" && h.state == "not answering"));
    }
}
