//! From probe events to journal operations.
//!
//! [`Capture`] owns the probes, the inode table and the pending write extents. Its loop
//! drains the ring buffer, turns each event into operations named by path, coalesces data
//! writes per file, and flushes them whenever the ring buffer runs dry or before any
//! namespace operation (so the journal stays in causal order). It polls the probes' drop
//! counter: a loss makes it re-walk the tree and journal a `rescan`, never pass silently.

use std::{
    ffi::OsStr,
    fs,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use imezzo_common::{kind, DevIno, FdEvent, PathEvent, FMODE_CREATED, UTIME_OMIT};

pub mod extents;
pub mod inode_table;
pub mod kernel_btf;
pub mod mappings;
pub mod probes;
pub mod syscalls;

use crate::attrs::FileKind;
use crate::beneath::{sys, Tree};
use crate::op::{JournalEntry, Op, RelPath, Timestamp, WriteSource};
use extents::Extents;
use inode_table::{components, join, ChangedSince, InodeTable, Kind};
use probes::{ProbeConfig, ProbeError, Probes};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("root {0} does not exist")]
    RootMissing(PathBuf),
    #[error("root {0} is not a directory")]
    RootNotDir(PathBuf),
    #[error("cannot read root {0}: {1}")]
    RootUnreadable(PathBuf, std::io::Error),
    #[error(
        "another imezzo is already capturing {0} (it holds {1}); stop it first, or watch another root"
    )]
    AlreadyRunning(PathBuf, PathBuf),
    #[error("cannot create the instance lock {0}: {1}")]
    Lock(PathBuf, std::io::Error),
    #[error("--ring-bytes must be a power of two and at least 4096, got {0}")]
    RingSize(u32),
    #[error(transparent)]
    Probes(#[from] ProbeError),
}

#[derive(Clone, Debug)]
pub struct CaptureConfig {
    pub root: PathBuf,
    /// Ring buffer size in bytes, a power of two, at least one page.
    pub ring_bytes: u32,
    /// When set, the start-up walk also lists what changed since these bounds
    /// ([`Capture::take_changed`]): what happened while nobody was capturing.
    pub changed_since: Option<ChangedSince>,
}

impl CaptureConfig {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        CaptureConfig { root: root.into(), ring_bytes: 8 << 20, changed_since: None }
    }
}

/// How long an idle capture loop waits between empty batches: each tells the sink that
/// every change made before its time has been handed over.
const IDLE_MARK: Duration = Duration::from_millis(100);

/// Counters for the status line and the exit summary.
#[derive(Clone, Copy, Debug, Default)]
pub struct CaptureStats {
    pub events: u64,
    pub drops: u64,
    pub rescans: u64,
    pub ops: u64,
    /// Files whose written ranges were too many to keep exact within one batch, and were
    /// rounded out to blocks (see `extents`).
    pub coarsened: u64,
    /// Times the loop woke to drain (every 2 ms while busy, 100 ms once idle).
    pub polls: u64,
    /// Long sleeps that the probes cut short: a write or data event woke the idle loop.
    pub woken: u64,
}

pub struct Capture {
    root: PathBuf,
    dev: u64,
    kernel_dev: u32,
    probes: Probes,
    table: InodeTable,
    pending: Extents,
    /// Shared writable mappings of watched files (see `mappings`).
    mappings: mappings::Mappings,
    seq: u64,
    stats: CaptureStats,
    placeholders: u64,
    /// How far each (cpu, run) of coalesced writes has been journalled, so a run seen
    /// live and later flushed by the probe is journalled once.
    runs_seen: std::collections::HashMap<(u32, u64), u64>,
    /// What the start-up walk found changed since `CaptureConfig::changed_since`.
    changed: Option<Vec<(RelPath, Kind)>>,
    /// When the last batch, empty or not, went to the sink.
    last_emit: Instant,
    /// Inodes of the root's ancestors on its device: paths from them can lead inside.
    ancestors: std::collections::HashSet<u64>,
    /// What was journalled under one name of an inode with several: should that name go
    /// before a client replays those entries, it could no longer read them from the
    /// master there, so the surviving name is described again (see `name_gone`).
    touched: TouchedMap,
    /// `Probes::aio_unread` when last checked.
    aio_unread: u64,
    /// The table was walked during this drain (a rescan) or just before it (the start-up
    /// build): events drained now may predate the walk, which already shows them.
    walked: bool,
    /// What the start-up drain journalled, handed over with the first batch.
    early: Vec<Op>,
    /// Where the server asks which names an inode has (see [`Capture::serve_names`]).
    names: Option<std::sync::mpsc::Receiver<NamesQuery>>,
    /// Rung with each question and at stop, so a long idle sleep does not delay them.
    waker: Option<CaptureWaker>,
    /// `Probes::open_runs`'s sum of run counters at the last drain: a change means writes.
    run_moves: u64,
    _lock: fs::File,
}

/// The asking side of [`NamesQuery`]s: each question wakes the capture loop.
pub struct NamesAsker {
    tx: mpsc::Sender<NamesQuery>,
    waker: CaptureWaker,
}

/// The capture loop's side (see [`Capture::serve_names`]).
pub struct NamesServed {
    rx: mpsc::Receiver<NamesQuery>,
    waker: CaptureWaker,
}

/// A channel for names questions, and the waker of the loop that answers them.
pub fn names_channel() -> std::io::Result<(NamesAsker, NamesServed)> {
    let (tx, rx) = mpsc::channel();
    let waker = CaptureWaker::new()?;
    Ok((NamesAsker { tx, waker: waker.clone() }, NamesServed { rx, waker }))
}

impl NamesAsker {
    /// Sends `q`; false when the capture loop is gone.
    pub fn ask(&self, q: NamesQuery) -> bool {
        let sent = self.tx.send(q).is_ok();
        self.waker.wake();
        sent
    }

}

impl NamesServed {
    /// What wakes the loop, for whoever stops it.
    pub fn waker(&self) -> CaptureWaker {
        self.waker.clone()
    }
}

/// Wakes the capture loop from its sleep: an eventfd it polls beside the ring buffer.
#[derive(Clone)]
pub struct CaptureWaker(Arc<OwnedFd>);

impl CaptureWaker {
    pub fn new() -> std::io::Result<CaptureWaker> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a fresh fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        Ok(CaptureWaker(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    pub fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: 8 valid bytes; a full counter (never, at one per question) only means
        // the loop is awake already.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Takes the rings so far, so the next poll sleeps.
    fn reset(&self) {
        let mut count = [0u8; 8];
        // SAFETY: 8 writable bytes; EAGAIN (not rung) is fine.
        unsafe { libc::read(self.0.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
    }
}

/// A question for the capture thread: every path its inode table knows for each inode of
/// the root's device (at most `max` each, none for an inode it does not know), as the
/// table stands after the events drained so far. The table may lag the tree by the events
/// not drained yet: the asker checks each path before trusting it.
pub struct NamesQuery {
    pub inos: Vec<u64>,
    pub max: usize,
    pub reply: std::sync::mpsc::SyncSender<Vec<Vec<RelPath>>>,
}

/// Changes journalled for an inode with several names (see `Capture::touched`).
#[derive(Debug, Default)]
struct Touched {
    data: bool,
    attrs: bool,
    xattrs: Vec<Vec<u8>>,
}

/// Entries `Capture::touched` keeps at most. Past it the map is cleared whole (not oldest
/// first): what was noted for those inodes is forgotten, so a name of one of them unlinked
/// later would not be described again under its surviving names. The capture journals a
/// rescan of the root instead (see `Capture::check_touched`), after every entry noted.
const TOUCHED_MAX: usize = 65_536;

/// `Capture::touched`: bounded, and it says when it had to forget.
#[derive(Debug)]
struct TouchedMap {
    map: std::collections::HashMap<u64, Touched>,
    max: usize,
    /// Entries were forgotten since `take_forgotten`.
    forgotten: usize,
}

impl Default for TouchedMap {
    fn default() -> Self {
        TouchedMap::with_max(TOUCHED_MAX)
    }
}

impl TouchedMap {
    fn with_max(max: usize) -> Self {
        TouchedMap { map: Default::default(), max, forgotten: 0 }
    }

    /// The entry for `ino`, made room for by clearing the map when it is full.
    fn entry(&mut self, ino: u64) -> &mut Touched {
        if self.map.len() >= self.max && !self.map.contains_key(&ino) {
            self.forgotten += self.map.len();
            self.map.clear();
        }
        self.map.entry(ino).or_default()
    }

    fn remove(&mut self, ino: u64) -> Option<Touched> {
        self.map.remove(&ino)
    }

    fn insert(&mut self, ino: u64, t: Touched) {
        *self.entry(ino) = t;
    }

    /// How many entries were forgotten since the last call.
    fn take_forgotten(&mut self) -> usize {
        std::mem::take(&mut self.forgotten)
    }
}

/// `ino` unless it is a placeholder (an object known by name only, see `placeholder_ino`).
fn real_ino(ino: u64) -> Option<u64> {
    (ino >> 63 == 0).then_some(ino)
}

/// The inode numbers of `root`'s ancestors that live on `dev` (up to that file system's
/// own root, or `/`).
fn ancestors_on_device(root: &Path, dev: u64) -> std::collections::HashSet<u64> {
    root.ancestors()
        .skip(1)
        .map_while(|dir| fs::metadata(dir).ok().filter(|m| m.dev() == dev))
        .map(|m| m.ino())
        .collect()
}

/// The kernel's encoding of a device number, `major << 20 | minor`, from `stat`'s.
pub fn kernel_dev(st_dev: u64) -> u32 {
    let major = libc::major(st_dev);
    let minor = libc::minor(st_dev);
    (major << 20) | minor
}

/// Whether `path` lies on btrfs, whose `stat(2)` device is a per-subvolume anonymous
/// device rather than the super block's (see `imezzo_common::BTRFS_SUPER_MAGIC`).
fn is_btrfs(path: &Path) -> bool {
    fs_type(path) == Some(imezzo_common::BTRFS_SUPER_MAGIC)
}

/// Whether `path` lies on XFS (see `imezzo_common::XFS_SUPER_MAGIC`).
fn is_xfs(path: &Path) -> bool {
    fs_type(path) == Some(imezzo_common::XFS_SUPER_MAGIC)
}

/// `statfs(2)`'s `f_type` of the file system `path` lies on.
fn fs_type(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid C string and a zeroed statfs for the kernel to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as u64)
}

fn stat_time(sec: i64, nsec: i64) -> Timestamp {
    Timestamp { sec, nsec: nsec as u32 }
}

/// The longest a data event waits in the ring buffer before the agent looks.
const POLL_MS: i32 = 2;
/// While changes keep coming, one drain (one journal commit, one batch to each client)
/// at most this often: each batch costs both agents a commit's fsync and a round of thread
/// wake-ups whatever it holds. 5 ms cut both agents' CPU under pgbench by a third (2 ms
/// before). It once cost a rescan of the whole tree in a fresh clone's CI: a path the
/// table could not resolve alone, relative to a directory fd tar had closed before the
/// drain; such a path now starts from the directory's path in the table (`locate_slow`).
const BUSY_BATCH: Duration = Duration::from_millis(5);
/// How long a drain waits after a wake-up for the writes that follow the waking event.
const WAKE_SETTLE: Duration = Duration::from_micros(200);
/// Nothing happened for this long: the loop asks the probes to wake it at the next write
/// and sleeps [`SLEEP_MS`] at a time instead of [`POLL_MS`] (an idle export cost 500
/// wakeups a second, 2% of a core).
const QUIET_BEFORE_SLEEP: Duration = Duration::from_millis(50);
/// The longest sleep of an idle loop: what a write waits should the probe's wakeup be lost
/// (a full ring buffer, which is counted and rescanned anyway, or a write racing the ask).
const SLEEP_MS: i32 = 100;

const AT_FDCWD: i64 = -100;

/// The directory fd a path argument is relative to (`AT_FDCWD` when the call takes none).
fn dirfd_of(ev: &PathEvent, second: bool) -> i64 {
    let idx = match (ev.nr, second) {
        (264 | 316 | 265, true) => 2,
        (266, false) => 1,
        (257 | 437 | 258 | 259 | 263 | 268 | 452 | 260 | 261 | 280 | 264 | 316 | 265 | 463 | 466, false) => 0,
        _ => return AT_FDCWD,
    };
    ev.args[idx] as i32 as i64
}

enum Event {
    Fd(FdEvent),
    Path(Box<PathEvent>),
}

/// Copies one ring-buffer record out, checking its kind and size.
fn decode(bytes: &[u8]) -> Option<Event> {
    let k = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    if k == kind::PATH && bytes.len() >= size_of::<PathEvent>() {
        // SAFETY: a PathEvent is plain integers; read_unaligned copes with alignment.
        Some(Event::Path(Box::new(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })))
    } else if k != kind::PATH && bytes.len() >= size_of::<FdEvent>() {
        // SAFETY: as above, for FdEvent.
        Some(Event::Fd(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) }))
    } else {
        None
    }
}

/// Where a path in an event leads.
enum Located {
    /// Beneath the root: its components.
    Inside(Vec<Vec<u8>>),
    /// Elsewhere: not ours.
    Outside,
    /// Beneath the root maybe, but we cannot tell where (a symlinked directory, a name we
    /// do not know): the caller rescans.
    Unknown(String),
}

impl Capture {
    /// Checks the root, takes the instance lock, loads the probes, then walks the tree.
    /// The probes are attached before the walk, so no change falls between the two.
    pub fn start(cfg: &CaptureConfig) -> Result<Capture, CaptureError> {
        if !cfg.ring_bytes.is_power_of_two() || cfg.ring_bytes < 4096 {
            return Err(CaptureError::RingSize(cfg.ring_bytes));
        }
        let root = match fs::canonicalize(&cfg.root) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CaptureError::RootMissing(cfg.root.clone()))
            }
            Err(e) => return Err(CaptureError::RootUnreadable(cfg.root.clone(), e)),
        };
        let meta = fs::metadata(&root).map_err(|e| CaptureError::RootUnreadable(root.clone(), e))?;
        if !meta.is_dir() {
            return Err(CaptureError::RootNotDir(cfg.root.clone()));
        }
        let instance = format!("dev{}-ino{}", meta.dev(), meta.ino());
        let lock = take_lock(&root, &instance)?;
        let kdev = kernel_dev(meta.dev());
        let probes = Probes::load(&ProbeConfig {
            root: &root,
            kernel_dev: kdev,
            btrfs: is_btrfs(&root),
            xfs: is_xfs(&root),
            ring_bytes: cfg.ring_bytes,
            instance: &instance,
        })?;
        crate::memory::release_freed();
        let (table, found) = InodeTable::build_noting(&root, cfg.changed_since)
            .map_err(|e| CaptureError::RootUnreadable(root.clone(), e))?;
        crate::memory::release_freed();
        let changed = cfg.changed_since.map(|_| {
            found
                .into_iter()
                .filter_map(|c| {
                    if c.name.is_empty() {
                        return Some((RelPath::default(), c.kind));
                    }
                    let parent = table.path_of(c.parent)?;
                    let path = if parent.0.is_empty() {
                        RelPath(c.name.to_vec())
                    } else {
                        RelPath([parent.0.as_slice(), b"/", &c.name].concat())
                    };
                    Some((path, c.kind))
                })
                .collect()
        });
        log::info!(
            "capturing {} (device {}:{}, {} inodes), probes pinned in {}",
            root.display(),
            libc::major(meta.dev()),
            libc::minor(meta.dev()),
            table.len(),
            probes.pin_dir().display()
        );
        let ancestors = ancestors_on_device(&root, meta.dev());
        let mut cap = Capture {
            root,
            dev: meta.dev(),
            kernel_dev: kdev,
            probes,
            table,
            pending: Extents::default(),
            mappings: mappings::Mappings::default(),
            seq: 0,
            stats: CaptureStats::default(),
            placeholders: 0,
            runs_seen: Default::default(),
            changed,
            last_emit: Instant::now(),
            ancestors,
            touched: Default::default(),
            aio_unread: 0,
            walked: true,
            early: Vec::new(),
            names: None,
            waker: None,
            run_moves: 0,
            _lock: lock,
        };
        // The events of the start-up walk's time are drained now, while the table is the
        // walk's (it may already show them). Whatever comes after `start` returns is past
        // the walk: left to the first drain of `run`, an exchange and its undoing made
        // right after start-up were taken for one the walk had seen, and the write between
        // them journalled under the other name (`namespace::an_exchange_and_its_undoing_...`
        // failed when the test outran the first poll).
        let mut early = Vec::new();
        cap.drain_with_runs(&mut early);
        cap.flush(&mut early);
        cap.walked = false;
        cap.early = early;
        Ok(cap)
    }

    /// Answers [`NamesQuery`]s from `rx` from now on, between two drains of the ring buffer
    /// (so within a few milliseconds, however busy the export). Whoever asks rings `waker`
    /// after sending, and whoever stops the loop too: an idle loop sleeps long.
    pub fn serve_names(&mut self, served: NamesServed) {
        self.names = Some(served.rx);
        self.waker = Some(served.waker);
    }

    fn answer_names(&mut self) {
        let Some(rx) = &self.names else { return };
        while let Ok(q) = rx.try_recv() {
            let answer = q.inos.iter().map(|&ino| self.table.paths_of(ino, q.max)).collect();
            // The asker may have given up waiting: nothing to do.
            let _ = q.reply.send(answer);
        }
    }

    /// An inode number no real inode has (top bit set), for objects seen by name only.
    fn placeholder_ino(&mut self) -> u64 {
        self.placeholders += 1;
        (1 << 63) | self.placeholders
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn stats(&self) -> CaptureStats {
        self.stats
    }

    /// What the start-up walk found changed since `CaptureConfig::changed_since`, each name
    /// with its kind, parents before what they hold; `None` when that was not asked (or
    /// already taken).
    pub fn take_changed(&mut self) -> Option<Vec<(RelPath, Kind)>> {
        self.changed.take()
    }

    /// Runs until `stop` is set, handing each journal entry to `sink`.
    pub fn run(&mut self, stop: &AtomicBool, sink: &mut dyn FnMut(JournalEntry)) {
        self.run_batches(stop, &mut |batch, _| batch.into_iter().for_each(&mut *sink));
    }

    /// Runs until `stop` is set, handing over the entries of each batch (one drain of the
    /// ring buffer) together: the unit a durable journal commits at once. With each batch
    /// comes the time the drain started: every change whose system call had returned by
    /// then is in this batch or an earlier one. While nothing changes, an empty batch
    /// carries that time every [`IDLE_MARK`].
    pub fn run_batches(&mut self, stop: &AtomicBool, sink: &mut dyn FnMut(Vec<JournalEntry>, SystemTime)) {
        let mut out = std::mem::take(&mut self.early);
        let mut last_drop_check = Instant::now();
        let mut idle = true;
        let mut busy_at = Instant::now();
        let mut asleep = false;
        while !stop.load(Ordering::Relaxed) {
            let waker = self.waker.as_ref().map_or(-1, CaptureWaker::fd);
            let mut pfds = [
                libc::pollfd { fd: self.probes.events_fd(), events: libc::POLLIN, revents: 0 },
                // A negative fd is ignored by poll.
                libc::pollfd { fd: waker, events: libc::POLLIN, revents: 0 },
            ];
            // Data events do not wake us (see `Filter::wake_bytes`): polling every couple of
            // milliseconds bounds their delay and lets a storm coalesce into few extents.
            // Asleep, the probes wake us at the next data event or write.
            let timeout = if asleep { SLEEP_MS } else { POLL_MS };
            // SAFETY: two valid pollfds.
            unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout) };
            let woken = pfds[0].revents != 0;
            self.stats.polls += 1;
            self.stats.woken += u64::from(asleep && woken);
            if pfds[1].revents != 0 {
                if let Some(w) = &self.waker {
                    w.reset();
                }
            }
            if woken && idle {
                // A namespace event woke an idle loop (an open, a create): the write and
                // close that usually follow it within microseconds land in this same drain
                // instead of the next poll, 2 ms later. Under a storm the batch pause below
                // does this already, and any extra wait would let the ring buffer fill.
                thread::sleep(WAKE_SETTLE);
            }
            let before = self.stats.events;
            let moves_before = self.run_moves;
            let started = Instant::now();
            let drained_at = SystemTime::now();
            self.drain_with_runs(&mut out);
            self.walked = false;
            self.flush(&mut out);
            if last_drop_check.elapsed() >= Duration::from_millis(20) || !out.is_empty() {
                self.check_drops(&mut out);
                last_drop_check = Instant::now();
            }
            self.check_touched(&mut out);
            self.emit(&mut out, drained_at, sink);
            self.answer_names();
            idle = self.stats.events == before && self.run_moves == moves_before;
            if !idle {
                busy_at = Instant::now();
                asleep = false;
            } else if asleep || busy_at.elapsed() >= QUIET_BEFORE_SLEEP {
                // Asked at every sleep: a wakeup the probe owed but could not deliver (a
                // full ring) must not leave us sleeping long for good.
                self.probes.ask_wake();
                // A write between the drain above and the ask put nothing in the ring and
                // saw no flag: the runs tell.
                let (_, after) = self.probes.open_runs();
                asleep = after == self.run_moves;
            }
            if !idle {
                // Under a storm, drain in batches: a consumer that chases every event
                // bounces the ring's cache lines and slows the writers it watches.
                let batch = BUSY_BATCH;
                if let Some(rest) = batch.checked_sub(started.elapsed()) {
                    thread::sleep(rest);
                }
            }
        }
        // Whatever the kernel delivered before we were told to stop is still journalled.
        let drained_at = SystemTime::now();
        self.drain_with_runs(&mut out);
        self.flush(&mut out);
        self.check_drops(&mut out);
        self.check_touched(&mut out);
        self.last_emit = Instant::now().checked_sub(IDLE_MARK).unwrap_or(self.last_emit);
        self.emit(&mut out, drained_at, sink);
    }

    fn emit(&mut self, out: &mut Vec<Op>, drained_at: SystemTime, sink: &mut dyn FnMut(Vec<JournalEntry>, SystemTime)) {
        if out.is_empty() {
            if self.last_emit.elapsed() >= IDLE_MARK {
                self.last_emit = Instant::now();
                sink(Vec::new(), drained_at);
            }
            return;
        }
        self.last_emit = Instant::now();
        let batch = out
            .drain(..)
            .map(|op| {
                self.seq += 1;
                JournalEntry { seq: self.seq, op }
            })
            .collect::<Vec<_>>();
        self.stats.ops += batch.len() as u64;
        sink(batch, drained_at);
    }

    /// Runs capture on a thread of its own, for embedding and tests.
    pub fn spawn(mut self) -> CaptureHandle {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            self.run(&flag, &mut |e| {
                let _ = tx.send(e);
            });
            self.stats
        });
        CaptureHandle { stop, rx, thread: Some(thread) }
    }

    fn drain(&mut self, out: &mut Vec<Op>) {
        loop {
            let event = {
                let Some(item) = self.probes.events.next() else { break };
                decode(&item)
            };
            self.stats.events += 1;
            match event {
                Some(Event::Path(ev)) => {
                    self.flush(out);
                    self.on_path(&ev, out);
                }
                Some(Event::Fd(ev)) => self.on_fd(&ev, out),
                None => {}
            }
        }
        self.flush(out);
    }

    /// The part of a write run not journalled yet.
    fn add_run(&mut self, cpu: u32, run: u64, ino: u64, start: u64, end: u64) {
        let seen = self.runs_seen.entry((cpu, run)).or_insert(start);
        let from = (*seen).max(start);
        if end > from {
            *seen = end;
            self.pending.add(ino, from, end);
        }
        // Runs older than the previous one on this CPU can no longer be seen live.
        if self.runs_seen.len() > 64 {
            let newest: std::collections::HashMap<u32, u64> =
                self.runs_seen.keys().fold(Default::default(), |mut m, &(c, r)| {
                    let e = m.entry(c).or_insert(r);
                    *e = (*e).max(r);
                    m
                });
            self.runs_seen.retain(|&(c, r), _| r + 1 >= newest[&c]);
        }
    }

    /// Drains the ring buffer, then takes the writes still held in the probes' per-CPU runs
    /// (a writer that has not closed its file yet). A run carries no place in the ring's
    /// order, so a snapshot of the runs counts only if no ring event arrived after it was
    /// taken: a `link a b` drained after a write through `b` that followed it would journal
    /// the write first (seen under load, `namespace::link_then_write_through_the_second_name_...`).
    /// A run left out stays in its map and is taken at the writer's close or a later drain;
    /// under a namespace storm that never pauses, the fourth snapshot is taken as it is.
    fn drain_with_runs(&mut self, out: &mut Vec<Op>) {
        self.drain(out);
        for attempt in 0..4 {
            let (runs, moves) = self.probes.open_runs();
            self.run_moves = moves;
            let before = self.stats.events;
            self.drain(out);
            if self.stats.events == before || attempt == 3 {
                for (cpu, r) in runs {
                    if r.dev == self.kernel_dev && self.table.contains(r.ino) {
                        self.add_run(cpu, r.run, r.ino, r.start, r.end);
                    }
                }
                return;
            }
        }
    }

    fn check_drops(&mut self, out: &mut Vec<Op>) {
        let drops = self.probes.drops();
        if drops > self.stats.drops {
            let lost = drops - self.stats.drops;
            self.stats.drops = drops;
            self.rescan(format!("{lost} events lost (ring buffer full)"), out);
        }
        let unread = self.probes.aio_unread();
        if unread > self.aio_unread {
            let calls = unread - self.aio_unread;
            self.aio_unread = unread;
            self.rescan(format!("{calls} io_submit calls with more control blocks than the probes read"), out);
        }
    }

    /// When the touched map had to forget, journals a rescan of the root: it comes after
    /// every change noted for those inodes, so whatever one of their names going later
    /// would have described again is compared whole instead.
    fn check_touched(&mut self, out: &mut Vec<Op>) {
        let forgotten = self.touched.take_forgotten();
        if forgotten == 0 {
            return;
        }
        crate::report!(
            Warn,
            "capture: changes to multiply-linked files forgotten (too many at once), tree rescanned",
            "{forgotten} multiply-linked files changed since the map of them (at most {TOUCHED_MAX}) was last cleared: rescanning {}",
            self.root.display()
        );
        self.flush(out);
        self.stats.rescans += 1;
        out.push(Op::Rescan {
            path: RelPath::default(),
            reason: format!("{forgotten} changes to multiply-linked files forgotten (over {TOUCHED_MAX})"),
        });
    }

    /// A path cut at the probes' copy names something beneath the directory its copied
    /// part names up to its last `/`: that directory (the deepest one the table knows on
    /// the way) is rescanned, not the whole tree. Two cut paths (a rename) rescan their
    /// deepest common directory. A copied part that leads outside the root, where the root
    /// is not beneath it either, is not ours (a `..` in the uncopied rest could still climb
    /// back in; no program is known to write such paths).
    fn rescan_cut(&mut self, ev: &PathEvent, out: &mut Vec<Op>) {
        let reason = format!("a path longer than the probes copy ({} bytes)", imezzo_common::PATH_CAP);
        let mut scopes: Vec<Vec<Vec<u8>>> = Vec::new();
        let paths = [
            (1u32, ev.start_a, &ev.path_a[..ev.len_a as usize], false),
            (2u32, ev.start_b, &ev.path_b[..ev.len_b as usize], true),
        ];
        for (bit, start, bytes, second) in paths {
            // (Bit 2 of a symlink call is its target, which is content, not a path.)
            if ev.truncated & bit == 0 || (bit == 2 && matches!(ev.nr, 88 | 266)) {
                continue;
            }
            let prefix = match bytes.iter().rposition(|&c| c == b'/') {
                Some(0) => &bytes[..1],
                Some(i) => &bytes[..i],
                None => &b"."[..],
            };
            match self.locate(start, prefix, ev.tgid, dirfd_of(ev, second), false) {
                Located::Inside(parts) => match self.deepest_known_dir(parts) {
                    Some(parts) => scopes.push(parts),
                    None => return self.rescan(reason, out),
                },
                Located::Outside => {
                    let root = self.root.as_os_str().as_bytes();
                    let abs = prefix.starts_with(b"/").then_some(prefix);
                    if abs.is_none_or(|p| root.starts_with(p)) {
                        return self.rescan(reason, out);
                    }
                }
                Located::Unknown(_) => return self.rescan(reason, out),
            }
        }
        let Some(first) = scopes.first().cloned() else { return };
        let common = scopes.iter().fold(first, |acc, p| {
            acc.iter().zip(p).take_while(|(a, b)| a == b).map(|(a, _)| a.clone()).collect()
        });
        self.rescan_dir(common, reason, out);
    }

    /// The longest prefix of `parts` that the table knows as directories all the way, or
    /// `None` when one of them is known as something else (a symlink may lead anywhere).
    fn deepest_known_dir(&self, parts: Vec<Vec<u8>>) -> Option<Vec<Vec<u8>>> {
        let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
        let mut known = 0;
        for i in 1..=refs.len() {
            match self.table.lookup(&refs[..i]) {
                None => break,
                Some(ino) if self.table.kind(ino) == Some(Kind::Dir) => known = i,
                Some(_) => return None,
            }
        }
        Some(parts[..known].to_vec())
    }

    /// Re-walks the directory `parts` (the root when empty) and journals a rescan of it.
    fn rescan_dir(&mut self, parts: Vec<Vec<u8>>, reason: String, out: &mut Vec<Op>) {
        if parts.is_empty() {
            return self.rescan(reason, out);
        }
        let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
        let path = join(&refs);
        let Some(parent) = self.table.lookup(&refs[..refs.len() - 1]) else {
            return self.rescan(reason, out);
        };
        crate::report!(Info, "capture: changes the probes could not resolve, directory rescanned", "{reason}: rescanning {:?}", path.display());
        self.flush(out);
        let name = refs[refs.len() - 1];
        self.table.unlink(parent, name);
        self.walked = true;
        let abs = self.abs(&path);
        if let Ok(meta) = fs::symlink_metadata(&abs) {
            let kind = Kind::of(meta.file_type());
            self.table.link(parent, name, meta.ino(), kind);
            if kind == Kind::Dir {
                if let Err(e) = self.table.walk(&abs, meta.ino(), self.dev) {
                    crate::report!(Error, "capture: rescans that failed", "rescan of {} failed: {e}", abs.display());
                }
            }
        }
        self.stats.rescans += 1;
        out.push(Op::Rescan { path, reason });
    }

    /// Re-walks the whole tree and journals a rescan of the root.
    fn rescan(&mut self, reason: String, out: &mut Vec<Op>) {
        crate::report!(Warn, "capture: changes the probes could not resolve, tree rescanned", "{reason}: rescanning {}", self.root.display());
        self.flush(out);
        self.walked = true;
        match InodeTable::build(&self.root) {
            Ok(t) => self.table = t,
            Err(e) => crate::report!(Error, "capture: rescans that failed", "rescan of {} failed: {e}", self.root.display()),
        }
        self.pending = Extents::default();
        self.stats.rescans += 1;
        out.push(Op::Rescan { path: RelPath::default(), reason });
    }

    fn flush(&mut self, out: &mut Vec<Op>) {
        self.stats.coarsened += self.pending.take_coarsened();
        for (ino, whole, ranges) in self.pending.take() {
            let Some(path) = self.table.path_of(ino) else { continue };
            if self.table.has_extra_links(ino) {
                self.note(ino, &Op::Truncate { path: RelPath::default(), size: 0 });
            }
            if whole {
                let len = fs::symlink_metadata(self.abs(&path)).map(|m| m.len()).unwrap_or(0);
                out.push(Op::Write { path, offset: 0, len, source: Some(WriteSource::Mmap), mode: None, ino: real_ino(ino) });
            } else {
                for (start, end) in ranges {
                    out.push(Op::Write {
                        path: path.clone(),
                        offset: start,
                        len: end - start,
                        source: None,
                        mode: None,
                        ino: real_ino(ino),
                    });
                }
            }
        }
    }

    /// Remembers what `op` changed when its inode has several names (see `touched`).
    fn note(&mut self, ino: u64, op: &Op) {
        if !self.table.has_extra_links(ino) {
            return;
        }
        let t = self.touched.entry(ino);
        match op {
            Op::Write { .. } | Op::Truncate { .. } => t.data = true,
            Op::Setattr { .. } => t.attrs = true,
            Op::Setxattr { name, .. } | Op::Removexattr { name, .. } => {
                if !t.xattrs.contains(&name.0) {
                    t.xattrs.push(name.0.clone());
                }
            }
            _ => {}
        }
    }

    /// A name of `ino` went (unlink, or replaced by a rename): if changes were journalled
    /// for it while it had several names and it keeps one, those changes are journalled
    /// again under the name it keeps, from the master's current state.
    fn name_gone(&mut self, ino: u64, out: &mut Vec<Op>) {
        let Some(t) = self.touched.remove(ino) else { return };
        let Some(path) = self.table.path_of(ino) else { return };
        let Some(meta) = fs::symlink_metadata(self.abs(&path)).ok().filter(|m| m.ino() == ino) else { return };
        if self.table.has_extra_links(ino) {
            // Still several names: whatever is described now may have to be again.
            self.touched.insert(ino, Touched { data: t.data, attrs: t.attrs, xattrs: t.xattrs.clone() });
        }
        if t.data && meta.is_file() {
            out.push(Op::Write { path: path.clone(), offset: 0, len: meta.len(), source: None, mode: None, ino: real_ino(ino) });
        }
        for name in t.xattrs {
            out.push(Op::Setxattr { path: path.clone(), name: RelPath(name) });
        }
        if t.attrs || t.data {
            out.push(Op::Setattr {
                path,
                mode: Some(meta.mode() & 0o7777),
                uid: Some(meta.uid()),
                gid: Some(meta.gid()),
                atime: Some(stat_time(meta.atime(), meta.atime_nsec())),
                mtime: Some(stat_time(meta.mtime(), meta.mtime_nsec())),
            });
        }
    }

    fn abs(&self, rel: &RelPath) -> PathBuf {
        if rel.0.is_empty() {
            self.root.clone()
        } else {
            self.root.join(OsStr::from_bytes(&rel.0))
        }
    }

    fn on_fd(&mut self, ev: &FdEvent, out: &mut Vec<Op>) {
        // A mapping synced or gone: the stores through it are done, and the file is
        // journalled again whole (the dirty-inode event of its first store came before
        // the bytes, and later stores to dirty pages raise none).
        let ended = match ev.kind {
            kind::MAPPED if ev.file.dev == self.kernel_dev => self.mappings.mapped(ev.tgid, ev.a, ev.b, ev.file.ino),
            kind::MAPPED => return,
            kind::SYNCED => self.mappings.synced(ev.tgid, ev.a, ev.b),
            kind::UNMAPPED => self.mappings.unmapped(ev.tgid, ev.a, ev.b),
            kind::EXITED => self.mappings.exited(ev.tgid),
            _ => Vec::new(),
        };
        if matches!(ev.kind, kind::MAPPED | kind::SYNCED | kind::UNMAPPED | kind::EXITED) {
            for ino in ended {
                if self.table.contains(ino) {
                    self.pending.add_whole(ino);
                }
            }
            return;
        }
        if ev.file.dev != self.kernel_dev || !self.table.contains(ev.file.ino) {
            return;
        }
        match ev.kind {
            kind::WRITE if ev.c != 0 => self.add_run(ev.cpu, ev.c, ev.file.ino, ev.a, ev.a.saturating_add(ev.b)),
            kind::WRITE => self.pending.add(ev.file.ino, ev.a, ev.a.saturating_add(ev.b)),
            kind::DIRTY => {
                log::debug!(
                    "capture: inode {} changed outside the write probes (process {}, syscall or fault code {}, dirty {:#x}, task flags {:#x}): journalled whole",
                    ev.file.ino, ev.tgid, ev.nr, ev.a, ev.b
                );
                self.pending.add_whole(ev.file.ino)
            }
            kind::TRUNCATE => {
                self.flush(out);
                self.note(ev.file.ino, &Op::Truncate { path: RelPath::default(), size: 0 });
                if let Some(path) = self.table.path_of(ev.file.ino) {
                    out.push(Op::Truncate { path, size: ev.a });
                }
            }
            kind::FALLOCATE => {
                self.flush(out);
                self.note(ev.file.ino, &Op::Truncate { path: RelPath::default(), size: 0 });
                if let Some(path) = self.table.path_of(ev.file.ino) {
                    out.push(Op::Write {
                        path,
                        offset: ev.a,
                        len: ev.b,
                        source: Some(WriteSource::Fallocate),
                        mode: Some(ev.c as u32),
                        ino: real_ino(ev.file.ino),
                    });
                }
            }
            _ => {}
        }
    }

    /// Resolves one path argument of an event.
    fn locate(&self, start: DevIno, bytes: &[u8], tgid: u32, dirfd: i64, follow: bool) -> Located {
        let mut loc = self.locate_raw(start, bytes, tgid, dirfd);
        // Calls that follow a final symlink act on its target.
        for _ in 0..8 {
            let Located::Inside(parts) = &loc else { break };
            if !follow || parts.is_empty() {
                break;
            }
            let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
            let Some(ino) = self.table.lookup(&refs) else { break };
            if self.table.kind(ino) != Some(Kind::Symlink) {
                break;
            }
            let Ok(target) = fs::read_link(self.abs(&join(&refs))) else { break };
            let target = target.as_os_str().as_bytes();
            loc = if target.starts_with(b"/") {
                self.locate_abs(target)
            } else {
                let mut joined = refs[..refs.len() - 1].join(&b'/');
                joined.push(b'/');
                joined.extend_from_slice(target);
                match components(&joined) {
                    Some(c) => Located::Inside(c.into_iter().map(|c| c.to_vec()).collect()),
                    None => Located::Outside,
                }
            };
        }
        loc
    }

    fn locate_abs(&self, bytes: &[u8]) -> Located {
        let root = self.root.as_os_str().as_bytes();
        let rest = if root == b"/" {
            Some(&bytes[1..])
        } else if bytes.starts_with(root) && matches!(bytes.get(root.len()), None | Some(b'/')) {
            Some(&bytes[root.len()..])
        } else {
            None
        };
        match rest.map(components) {
            Some(Some(c)) => Located::Inside(c.into_iter().map(|c| c.to_vec()).collect()),
            _ => Located::Outside,
        }
    }

    fn locate_raw(&self, start: DevIno, bytes: &[u8], tgid: u32, dirfd: i64) -> Located {
        if bytes.first() == Some(&b'/') {
            return match self.locate_abs(bytes) {
                Located::Inside(parts) if !self.parent_known(&parts) => self.locate_slow(bytes, tgid, dirfd, None),
                other => other,
            };
        }
        if start.dev != self.kernel_dev {
            return Located::Outside;
        }
        let base = if start.ino == self.table.root() {
            Some(Vec::new())
        } else {
            self.table.path_of(start.ino).map(|p| p.0)
        };
        let Some(mut joined) = base else {
            // A directory on our device that is not in the tree: from an ancestor of the
            // root a path descends into it; from anywhere else only `..` climbs into it
            // (or a symlink, the documented limit of capture). Asking /proc about every
            // other process writing on a shared file system would cost a lookup per
            // event and, when the process had already closed its fd, a rescan of the
            // whole tree.
            let climbs = bytes.split(|b| *b == b'/').any(|c| c == b"..");
            if bytes.is_empty() || !(climbs || self.ancestors.contains(&start.ino)) {
                return Located::Outside;
            }
            return self.locate_slow(bytes, tgid, dirfd, None);
        };
        // `joined[..start_len]` is the start directory's path, for the slow path.
        let start_len = joined.len();
        if !bytes.is_empty() {
            if !joined.is_empty() {
                joined.push(b'/');
            }
            joined.extend_from_slice(bytes);
        }
        let dotdot = bytes.split(|b| *b == b'/').any(|c| c == b"..");
        match components(&joined) {
            Some(c) if !dotdot || self.parent_known_refs(&c) => {
                let parts: Vec<Vec<u8>> = c.into_iter().map(|c| c.to_vec()).collect();
                if self.parent_known(&parts) {
                    Located::Inside(parts)
                } else {
                    // A symlinked directory on the way, or one we do not know yet: ask
                    // the file system where the path really leads.
                    self.locate_slow(bytes, tgid, dirfd, Some(&joined[..start_len]))
                }
            }
            _ => self.locate_slow(bytes, tgid, dirfd, Some(&joined[..start_len])),
        }
    }

    /// Every directory on the way to the last component is a directory the table knows.
    fn parent_known(&self, parts: &[Vec<u8>]) -> bool {
        let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
        self.parent_known_refs(&refs)
    }

    fn parent_known_refs(&self, parts: &[&[u8]]) -> bool {
        if parts.is_empty() {
            return true;
        }
        let mut cur = self.table.root();
        for c in &parts[..parts.len() - 1] {
            match self.table.lookup_child(cur, c) {
                Some(next) if self.table.kind(next) == Some(Kind::Dir) => cur = next,
                _ => return false,
            }
        }
        true
    }

    /// Resolves a path through the file system as it is now: the start directory from
    /// /proc (the process's cwd or dirfd) or the table, the parent canonicalized, so
    /// symlinked directories and `..` lead where the kernel went. Racy by nature: used only
    /// when the table alone cannot answer.
    ///
    /// A process may have closed its directory fd before the batch is drained (tar does):
    /// then the start directory's path in the table (`start_dir`, when the table knows it)
    /// stands in for it. That is its path at the event (the table follows the events in
    /// order), so when the directory has been moved since, nothing is found there and the
    /// tree is rescanned, as it always was without the table's answer; but most often the
    /// directory is still where it was, and a whole rescan is saved.
    fn locate_slow(&self, bytes: &[u8], tgid: u32, dirfd: i64, start_dir: Option<&[u8]>) -> Located {
        let mut from_table = false;
        let base: PathBuf = if bytes.first() == Some(&b'/') {
            PathBuf::from("/")
        } else {
            let (link, gone) = if dirfd == AT_FDCWD {
                (format!("/proc/{tgid}/cwd"), "exited")
            } else {
                (format!("/proc/{tgid}/fd/{dirfd}"), "closed its directory fd")
            };
            match (fs::read_link(link), start_dir) {
                (Ok(p), _) => p,
                (Err(_), Some(dir)) => {
                    from_table = true;
                    self.root.join(OsStr::from_bytes(dir))
                }
                (Err(_), None) => {
                    return Located::Unknown(format!("process {tgid} {gone} before its path could be resolved"))
                }
            }
        };
        let full = base.join(OsStr::from_bytes(bytes));
        let (parent, name) = match (full.parent(), full.file_name()) {
            (Some(p), Some(n)) => (p.to_path_buf(), Some(n.as_bytes().to_vec())),
            // `.`/`..` as the last component, or the root itself: the object is a directory.
            _ => (full.clone(), None),
        };
        let Ok(real_parent) = fs::canonicalize(&parent) else {
            if from_table {
                return Located::Unknown(format!(
                    "process {tgid} closed its directory fd, and the directory has moved, before its path could be resolved"
                ));
            }
            // The directory is gone already; its removal will be journalled on its own.
            return Located::Outside;
        };
        let Ok(rel) = real_parent.strip_prefix(&self.root) else { return Located::Outside };
        let mut parts: Vec<Vec<u8>> = rel.iter().map(|c| c.as_bytes().to_vec()).collect();
        match name {
            Some(n) if n != b".." && n != b"." => parts.push(n),
            _ => {}
        }
        Located::Inside(parts)
    }

    fn on_path(&mut self, ev: &PathEvent, out: &mut Vec<Op>) {
        // An open that neither created nor truncated changed nothing: whatever its path
        // (a reader of a long path must not cost a rescan per open).
        if matches!(ev.nr, 2 | 257 | 437) && ev.f_mode & FMODE_CREATED == 0 {
            const O_TRUNC: u64 = 0o1000;
            const O_ACCMODE: u64 = 0o3;
            let flags = if ev.nr == 2 { ev.args[1] } else { ev.args[2] };
            if flags & O_TRUNC == 0 || flags & O_ACCMODE == 0 {
                return;
            }
        }
        if ev.truncated & 1 != 0 || ev.truncated & 2 != 0 && !matches!(ev.nr, 88 | 266) {
            self.rescan_cut(ev, out);
            return;
        }
        let a = &ev.path_a[..ev.len_a as usize];
        let b = &ev.path_b[..ev.len_b as usize];
        let args = ev.args;
        const AT_SYMLINK_NOFOLLOW: u64 = 0x100;
        const AT_REMOVEDIR: u64 = 0x200;
        let nr = ev.nr;
        match nr {
            // open, creat, openat, openat2
            2 | 85 | 257 | 437 => self.on_open(ev, out),
            83 | 258 => {
                let mode = if nr == 83 { args[1] } else { args[2] } as u32;
                self.on_new(ev, Kind::Dir, out, |path, meta| Op::Mkdir {
                    path,
                    mode: meta.map(|m| m.mode() & 0o7777).unwrap_or(mode & 0o7777),
                });
            }
            133 | 259 => {
                let (mode, rdev) = if nr == 133 { (args[1], args[2]) } else { (args[2], args[3]) };
                let mode = mode as u32;
                self.on_new(ev, if matches!(mode & libc::S_IFMT, 0 | libc::S_IFREG) { Kind::File } else { Kind::Other }, out, |path, meta| {
                    let ty = mode & libc::S_IFMT;
                    if ty == 0 || ty == libc::S_IFREG {
                        Op::Create { path, mode: meta.map(|m| m.mode() & 0o7777).unwrap_or(mode & 0o7777) }
                    } else {
                        // The type always from the call; the rest from the object only if it
                        // is one of that type (a fifo replaced by another fifo is harmless:
                        // the events that replaced it follow).
                        let meta = meta.filter(|m| m.mode() & libc::S_IFMT == ty);
                        Op::Mknod { path, mode: meta.map(|m| m.mode()).unwrap_or(mode), rdev: meta.map(|m| m.rdev()).unwrap_or(rdev) }
                    }
                });
            }
            88 | 266 => {
                // The probes copy at most PATH_CAP bytes of the target: a copy that fills the
                // buffer may be cut, so the whole target is read from the master (never
                // journal a shortened one; if it cannot be read, rescan).
                let short = ev.truncated & 2 != 0 || b.len() + 1 >= imezzo_common::PATH_CAP;
                let copied = RelPath(b.to_vec());
                let root = self.root.clone();
                let unread = std::cell::Cell::new(None::<RelPath>);
                self.on_new(ev, Kind::Symlink, out, |path, meta| {
                    let target = if !short {
                        copied
                    } else {
                        match meta.filter(|m| m.file_type().is_symlink()).and_then(|_| {
                            fs::read_link(root.join(OsStr::from_bytes(&path.0))).ok()
                        }) {
                            Some(t) => RelPath(t.as_os_str().as_bytes().to_vec()),
                            None => {
                                unread.set(Some(path.clone()));
                                copied
                            }
                        }
                    };
                    Op::Symlink { path, target }
                });
                if unread.take().is_some() {
                    self.rescan("a symlink target longer than the probes copy, gone before it could be read".into(), out);
                }
            }
            87 | 84 | 263 => {
                let dir = nr == 84 || (nr == 263 && args[2] & AT_REMOVEDIR != 0);
                match self.locate(ev.start_a, a, ev.tgid, dirfd_of(ev, false), false) {
                    Located::Inside(parts) if !parts.is_empty() => {
                        let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
                        let path = join(&refs);
                        let mut gone = None;
                        if let Some(parent) = self.table.lookup(&refs[..refs.len() - 1]) {
                            gone = self.table.unlink(parent, refs[refs.len() - 1]);
                        }
                        out.push(if dir { Op::Rmdir { path } } else { Op::Unlink { path } });
                        if let Some(ino) = gone {
                            self.name_gone(ino, out);
                        }
                    }
                    Located::Unknown(why) => self.rescan(why, out),
                    _ => {}
                }
            }
            82 | 264 | 316 => self.on_rename(ev, a, b, if nr == 316 { args[4] } else { 0 }, out),
            86 | 265 => self.on_link(ev, a, b, out),
            76 => self.on_attr(ev, true, out, |path, _| Op::Truncate { path, size: args[1] }),
            90 | 91 | 268 | 452 => {
                let (mode, follow) = match nr {
                    90 | 91 => (args[1], true),
                    268 => (args[2], true),
                    _ => (args[2], args[3] & AT_SYMLINK_NOFOLLOW == 0),
                };
                self.on_attr(ev, follow, out, |path, _| Op::Setattr {
                    path,
                    mode: Some(mode as u32 & 0o7777),
                    uid: None,
                    gid: None,
                    atime: None,
                    mtime: None,
                });
            }
            92 | 93 | 94 | 260 => {
                let (uid, gid, follow) = match nr {
                    92 | 93 => (args[1], args[2], true),
                    94 => (args[1], args[2], false),
                    _ => (args[2], args[3], args[4] & AT_SYMLINK_NOFOLLOW == 0),
                };
                let id = |v: u64| (v as u32 != u32::MAX).then_some(v as u32);
                self.on_attr(ev, follow, out, |path, _| Op::Setattr {
                    path,
                    mode: None,
                    uid: id(uid),
                    gid: id(gid),
                    atime: None,
                    mtime: None,
                });
            }
            132 | 235 | 261 | 280 => {
                let follow = !(nr == 280 && args[3] & AT_SYMLINK_NOFOLLOW != 0);
                // utimensat can leave either time alone (UTIME_OMIT): journal what changed.
                let set_atime = nr != 280 || ev.extra[0] != UTIME_OMIT;
                let set_mtime = nr != 280 || ev.extra[1] != UTIME_OMIT;
                self.on_attr(ev, follow, out, |path, meta| Op::Setattr {
                    path,
                    mode: None,
                    uid: None,
                    gid: None,
                    atime: meta.filter(|_| set_atime).map(|m| stat_time(m.atime(), m.atime_nsec())),
                    mtime: meta.filter(|_| set_mtime).map(|m| stat_time(m.mtime(), m.mtime_nsec())),
                });
            }
            188 | 189 | 190 | 463 | 197 | 198 | 199 | 466 => {
                let follow = match nr {
                    189 | 198 => false,
                    463 | 466 => args[2] & AT_SYMLINK_NOFOLLOW == 0,
                    _ => true,
                };
                let name = RelPath(b.to_vec());
                let set = matches!(nr, 188 | 189 | 190 | 463);
                self.on_attr(ev, follow, out, move |path, _| {
                    if set {
                        Op::Setxattr { path, name }
                    } else {
                        Op::Removexattr { path, name }
                    }
                });
            }
            _ => {}
        }
    }

    fn on_open(&mut self, ev: &PathEvent, out: &mut Vec<Op>) {
        if ev.result.dev != self.kernel_dev {
            return;
        }
        const O_TRUNC: u64 = 0o1000;
        const O_ACCMODE: u64 = 0o3;
        const O_TMPFILE: u64 = 0o20000000;
        let flags = match ev.nr {
            2 => ev.args[1],
            85 => O_TRUNC | 1,
            _ => ev.args[2],
        };
        if flags & O_TMPFILE != 0 {
            // Nameless until linkat(AT_EMPTY_PATH) gives it one; journalled then.
            return;
        }
        if ev.f_mode & FMODE_CREATED != 0 {
            let ino = ev.result.ino;
            self.on_new_known(ev, ino, Kind::File, out, |path, meta| Op::Create {
                path,
                mode: meta.map(|m| m.mode() & 0o7777).unwrap_or(0o644),
            });
        } else if flags & O_TRUNC != 0 && flags & O_ACCMODE != 0 {
            if let Some(path) = self.table.path_of(ev.result.ino) {
                out.push(Op::Truncate { path, size: 0 });
            }
        }
    }

    /// A new name for a new object whose inode the agent learns with lstat.
    fn on_new(
        &mut self,
        ev: &PathEvent,
        kind: Kind,
        out: &mut Vec<Op>,
        make: impl FnOnce(RelPath, Option<&fs::Metadata>) -> Op,
    ) {
        self.on_new_known(ev, 0, kind, out, make)
    }

    #[allow(clippy::too_many_arguments)]
    fn on_new_known(
        &mut self,
        ev: &PathEvent,
        known_ino: u64,
        known_kind: Kind,
        out: &mut Vec<Op>,
        make: impl FnOnce(RelPath, Option<&fs::Metadata>) -> Op,
    ) {
        let a = &ev.path_a[..ev.len_a as usize];
        match self.locate(ev.start_a, a, ev.tgid, dirfd_of(ev, false), false) {
            Located::Inside(parts) if !parts.is_empty() => {
                let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
                let path = join(&refs);
                let Some(parent) = self.table.lookup(&refs[..refs.len() - 1]) else {
                    // Its directory is unknown to us: we missed something.
                    self.rescan(format!("new {} in an unknown directory", path.display()), out);
                    return;
                };
                let meta = fs::symlink_metadata(self.abs(&path)).ok();
                let name = refs[refs.len() - 1];
                // An inode the table already names elsewhere is not the one this call just
                // made: the name was taken over since by an object capture already knew (a
                // directory exchanged or renamed onto it before this event was drained).
                // Taken for the new object, it got a second link: fsstress round s17, `mkdir
                // de` drained after `renameat2(df/d11, de, RENAME_EXCHANGE)` gave d11's
                // inode both names, the exchange then found one inode on both sides and did
                // nothing, and `rename df/d11 de/d15` made that inode its own child: every
                // later write, setattr, setxattr and link source under de/d15 was journalled
                // without "d15" (1 352 entries), and the replica lost them in silence.
                let known_elsewhere =
                    |i: u64| self.table.contains(i) && self.table.lookup_child(parent, name) != Some(i);
                let (ino, kind) = match (&meta, known_ino) {
                    (_, ino) if ino != 0 => (ino, known_kind),
                    // What is there now is what the call made only if it is of the kind the
                    // call makes: a name taken over since (a directory renamed over a device
                    // just made) must not lend the new object its type, mode or inode.
                    (Some(m), _)
                        if m.dev() == self.dev
                            && Kind::of(m.file_type()) == known_kind
                            && !known_elsewhere(m.ino()) =>
                    {
                        (m.ino(), known_kind)
                    }
                    // Already gone (or replaced) by the time we look: the events that did it
                    // follow. Name it with a placeholder inode so they find it by path.
                    _ => (self.placeholder_ino(), known_kind),
                };
                let meta = meta.filter(|m| m.ino() == ino);
                self.table.link(parent, name, ino, kind);
                out.push(make(path, meta.as_ref()));
            }
            Located::Unknown(why) => self.rescan(why, out),
            _ => {}
        }
    }

    /// An attribute change of an existing object.
    fn on_attr(
        &mut self,
        ev: &PathEvent,
        follow: bool,
        out: &mut Vec<Op>,
        make: impl FnOnce(RelPath, Option<&fs::Metadata>) -> Op,
    ) {
        let a = &ev.path_a[..ev.len_a as usize];
        match self.locate(ev.start_a, a, ev.tgid, dirfd_of(ev, false), follow) {
            Located::Inside(parts) => {
                let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
                let Some(ino) = self.table.lookup(&refs) else {
                    // A name capture never learned (its creation was missed or journalled
                    // under a name it had already left): the change is not dropped; the
                    // object is described whole, as it is now, and learned.
                    let known_parent = !refs.is_empty() && self.table.lookup(&refs[..refs.len() - 1]).is_some();
                    if known_parent && fs::symlink_metadata(self.abs(&join(&refs))).is_ok_and(|m| m.dev() == self.dev) {
                        self.moved_in(parts, out);
                    }
                    return;
                };
                // The object's current name: the one in the event may already be stale.
                let path = self.table.path_of(ino).unwrap_or_else(|| join(&refs));
                let meta = fs::symlink_metadata(self.abs(&path)).ok().filter(|m| m.ino() == ino);
                let op = make(path, meta.as_ref());
                self.note(ino, &op);
                out.push(op);
            }
            Located::Unknown(why) => self.rescan(why, out),
            Located::Outside => {}
        }
    }

    fn on_rename(&mut self, ev: &PathEvent, a: &[u8], b: &[u8], flags: u64, out: &mut Vec<Op>) {
        const RENAME_NOREPLACE: u64 = 1;
        const RENAME_EXCHANGE: u64 = 2;
        const RENAME_WHITEOUT: u64 = 4;
        let from = self.locate(ev.start_a, a, ev.tgid, dirfd_of(ev, false), false);
        let to = self.locate(ev.start_b, b, ev.tgid, dirfd_of(ev, true), false);
        match (from, to) {
            (Located::Unknown(why), _) | (_, Located::Unknown(why)) => self.rescan(why, out),
            (Located::Inside(f), Located::Inside(t)) if !f.is_empty() && !t.is_empty() => {
                let fr: Vec<&[u8]> = f.iter().map(|p| &p[..]).collect();
                let tr: Vec<&[u8]> = t.iter().map(|p| &p[..]).collect();
                let (Some(fp), Some(tp)) =
                    (self.table.lookup(&fr[..fr.len() - 1]), self.table.lookup(&tr[..tr.len() - 1]))
                else {
                    self.rescan(format!("rename between unknown directories ({})", join(&fr).display()), out);
                    return;
                };
                let exchange = flags & RENAME_EXCHANGE != 0;
                // Paths resolved after the fact can name one place for both ends (a parent
                // renamed since): then the table is left as the plain rules leave it.
                let distinct = fr != tr;
                let from_known = !distinct || self.table.lookup(&fr).is_some();
                let to_known = !distinct || self.table.lookup(&tr).is_some();
                // Both names of one inode in the table, the old one still that inode's on
                // the master?
                let same_inode = distinct && from_known && self.table.lookup(&fr) == self.table.lookup(&tr);
                let still = same_inode && {
                    let ino = self.table.lookup(&fr);
                    fs::symlink_metadata(self.abs(&join(&fr))).is_ok_and(|m| Some(m.ino()) == ino)
                };
                // rename(2) onto the same inode (a name onto itself, or onto another of its
                // hard links) succeeds and does nothing: it moves no name and leaves no
                // whiteout. A whiteout journalled for it would replace the file on the
                // replica, and give its name in the table to a device that is not there
                // (differential seed 31 on btrfs).
                if still {
                    return;
                }
                let noop = !distinct;
                let (fname, tname) = (fr[fr.len() - 1], tr[tr.len() - 1]);
                if exchange && from_known != to_known {
                    // One side is a name capture never learned. The exchange is journalled as
                    // it happened (a replica holding both names swaps them); in the table the
                    // known object moves to the other name, and the unknown one is described
                    // whole where it landed (kept as it is by a replica that has it).
                    let (landed, (kp, kn), (up, un)) = if from_known {
                        (f.clone(), (fp, fname), (tp, tname))
                    } else {
                        (t.clone(), (tp, tname), (fp, fname))
                    };
                    self.table.unlink(up, un);
                    self.table.rename((kp, kn), (up, un));
                    out.push(Op::Rename { path: join(&fr), new_path: join(&tr), exchange: true, noreplace: false });
                    self.moved_in(landed, out);
                    return;
                }
                if !exchange && same_inode {
                    // The table holds both names for one inode, but the old name no longer
                    // holds it on the master: the table had learned the destination from a
                    // later state (an object described whole as it is now). The rename did
                    // move an object, and what is left to say is that the old name went.
                    self.table.unlink(fp, fname);
                    out.push(Op::Unlink { path: join(&fr) });
                    if flags & RENAME_WHITEOUT != 0 {
                        self.whiteout(f.clone(), out);
                    }
                    return;
                }
                // In a drain with a walk of the table (a rescan drained before this op, the
                // start-up build), each name holding now what the table has there, two
                // objects: the walk came after this op.
                // Applied again, an exchange (its own inverse) would swap the two back and a
                // rename would move what was made at the old name since over the object it
                // moved; either way later changes would be journalled under the wrong names or
                // none (differential seed 796574861007 on btrfs). The table stays as it is.
                // (Only in such a drain: a later exchange back, still to be drained, leaves the
                // names so too, and the writes between the two must follow the first.)
                let now = |r: &[&[u8]]| {
                    fs::symlink_metadata(self.abs(&join(r))).ok().filter(|m| m.dev() == self.dev).map(|m| m.ino())
                };
                let (ia, ib) = (self.table.lookup(&fr), self.table.lookup(&tr));
                let shown = self.walked && distinct && ia.is_some() && ib.is_some() && ia != ib && now(&fr) == ia && now(&tr) == ib;
                let replaced = if exchange || shown { None } else { ib.filter(|&i| Some(i) != ia) };
                match (shown, exchange, from_known) {
                    (true, _, _) => {}
                    (false, true, _) => self.table.exchange((fp, fname), (tp, tname)),
                    (false, false, true) => self.table.rename((fp, fname), (tp, tname)),
                    // What was at the destination is replaced even though the source was
                    // never learned.
                    (false, false, false) => {
                        self.table.unlink(tp, tname);
                    }
                }
                out.push(Op::Rename {
                    path: join(&fr),
                    new_path: join(&tr),
                    exchange,
                    noreplace: flags & RENAME_NOREPLACE != 0,
                });
                if let Some(ino) = replaced {
                    self.name_gone(ino, out);
                }
                if !exchange && !from_known {
                    // Describe the object whole at its new name: its creation was never
                    // journalled (or journalled under a name it had left already).
                    self.moved_in(t.clone(), out);
                }
                if flags & RENAME_WHITEOUT != 0 && !noop {
                    // The whiteout (a character device 0:0) now at the old name is a new
                    // object of its own.
                    self.whiteout(f.clone(), out);
                }
            }
            (Located::Inside(f), _) if !f.is_empty() => {
                // Moved out of the root: gone, as far as the replica is concerned.
                let fr: Vec<&[u8]> = f.iter().map(|p| &p[..]).collect();
                let path = join(&fr);
                let parent = self.table.lookup(&fr[..fr.len() - 1]);
                let ino = self.table.lookup(&fr);
                let dir = ino.and_then(|i| self.table.kind(i)) == Some(Kind::Dir);
                if let Some(p) = parent {
                    self.table.unlink(p, fr[fr.len() - 1]);
                }
                out.push(if dir { Op::Rmdir { path } } else { Op::Unlink { path } });
                if flags & RENAME_WHITEOUT != 0 {
                    self.whiteout(f.clone(), out);
                }
            }
            (_, Located::Inside(t)) if !t.is_empty() => self.moved_in(t, out),
            _ => {}
        }
    }

    /// The whiteout a RENAME_WHITEOUT left at the old name `f`, journalled as the mknod of
    /// a character device 0:0 it was, never described from what the name holds when the
    /// agent reads the event: by then a directory on the way may have been renamed (the
    /// name leads nowhere and nothing was journalled), or a later exchange may have put
    /// another object there (fsstress: a device with several names, described as one more
    /// link of them, so the exchange that followed left the replica's name in that group).
    /// Replay gives it the master's attributes; it is named in the table by a placeholder.
    fn whiteout(&mut self, f: Vec<Vec<u8>>, out: &mut Vec<Op>) {
        let refs: Vec<&[u8]> = f.iter().map(|p| &p[..]).collect();
        let path = join(&refs);
        let Some(parent) = self.table.lookup(&refs[..refs.len() - 1]) else {
            self.rescan(format!("a whiteout in an unknown directory ({})", path.display()), out);
            return;
        };
        let ino = self.placeholder_ino();
        self.table.link(parent, refs[refs.len() - 1], ino, Kind::Other);
        out.push(Op::Mknod { path, mode: libc::S_IFCHR, rdev: 0 });
    }

    /// Something arrived from outside the root (rename or link): add it to the table and
    /// let the consumer compare it as a whole.
    fn moved_in(&mut self, t: Vec<Vec<u8>>, out: &mut Vec<Op>) {
        let tr: Vec<&[u8]> = t.iter().map(|p| &p[..]).collect();
        let path = join(&tr);
        let abs = self.abs(&path);
        if let (Some(parent), Ok(meta)) = (self.table.lookup(&tr[..tr.len() - 1]), fs::symlink_metadata(&abs)) {
            let kind = Kind::of(meta.file_type());
            // The name read now may hold another object already: one the table knows by
            // another name, which cannot be a further hard link of it (a directory, or a
            // file with one link), came here by a rename whose event follows this one. What
            // moved in has left the name, and the events that moved it on describe it where
            // it went (from a name the table does not know). Described as this name, the
            // object here would get a second name in the table and be journalled twice.
            let known_elsewhere = meta.dev() == self.dev
                && self.table.contains(meta.ino())
                && self.table.lookup(&tr) != Some(meta.ino())
                && (kind == Kind::Dir || meta.nlink() <= 1);
            if known_elsewhere {
                return;
            }
            self.table.link(parent, tr[tr.len() - 1], meta.ino(), kind);
            if kind == Kind::Dir {
                let _ = self.table.walk(&abs, meta.ino(), self.dev);
            }
        }
        match self.recreate(&path) {
            Some(ops) => out.extend(ops),
            None => {
                self.stats.rescans += 1;
                out.push(Op::Rescan { path, reason: "moved in from outside the root".into() });
            }
        }
    }

    /// The operations that make a consumer's copy of `path` (just moved in from outside the
    /// root, or a nameless O_TMPFILE just linked in) what it is now, walking a directory's
    /// subtree parents first: each object created, regular files' data fetched whole, hard
    /// links within the root as links, directory times last and deepest first. `None` when
    /// the subtree is too large to describe op by op (a rescan covers it instead) or could
    /// not be read.
    fn recreate(&mut self, path: &RelPath) -> Option<Vec<Op>> {
        const MAX_OBJECTS: usize = 50_000;
        let mut ops = Vec::new();
        let mut dirs = Vec::new();
        let mut seen: std::collections::HashMap<u64, RelPath> = std::collections::HashMap::new();
        let mut stack = vec![path.clone()];
        let mut objects = 0;
        let tree = Tree::open(&self.root).ok()?;
        while let Some(rel) = stack.pop() {
            objects += 1;
            if objects > MAX_OBJECTS {
                return None;
            }
            let (attrs, st) = match tree.attrs_with_stat(&rel) {
                Ok(Some(a)) => a,
                // Gone again already: its removal follows in the journal.
                Ok(None) => continue,
                Err(_) => return None,
            };
            let is_dir = attrs.kind == FileKind::Directory;
            if !is_dir && st.st_nlink > 1 {
                // Another name of this object (of any type but a directory): inside this
                // subtree, or elsewhere in the tree.
                let under = |p: &RelPath| p == path || p.0.starts_with(&[path.0.as_slice(), b"/"].concat());
                let elsewhere = self.table.path_of(st.st_ino).filter(|p| !under(p));
                if let Some(first) = seen.get(&st.st_ino).cloned().or(elsewhere) {
                    ops.push(Op::Link { path: first, new_path: rel });
                    continue;
                }
                seen.insert(st.st_ino, rel.clone());
            }
            let mut made = attrs.recreate_ops(&rel)?;
            for op in &mut made {
                if let Op::Write { ino, .. } = op {
                    *ino = Some(st.st_ino);
                }
            }
            ops.extend(made);
            if is_dir && st.st_dev == self.dev {
                dirs.push(attrs.setattr_op(&rel));
                let dir = tree.open_dir_with(rel.as_bytes(), libc::O_RDONLY).ok()??;
                let mut names: Vec<Vec<u8>> =
                    sys::read_dir(std::os::fd::AsFd::as_fd(&dir)).ok()?.into_iter().map(|(name, _)| name).collect();
                // Reverse order on the stack: children come out in name order.
                names.sort_unstable_by(|a, b| b.cmp(a));
                for name in names {
                    let mut child = rel.0.clone();
                    if !child.is_empty() {
                        child.push(b'/');
                    }
                    child.extend_from_slice(&name);
                    stack.push(RelPath(child));
                }
            }
        }
        ops.extend(dirs.into_iter().rev());
        Some(ops)
    }

    fn on_link(&mut self, ev: &PathEvent, a: &[u8], b: &[u8], out: &mut Vec<Op>) {
        let to = self.locate(ev.start_b, b, ev.tgid, dirfd_of(ev, true), false);
        let from = self.locate(ev.start_a, a, ev.tgid, dirfd_of(ev, false), ev.nr == 265 && ev.args[4] & 0x400 != 0);
        match (from, to) {
            (Located::Unknown(why), _) | (_, Located::Unknown(why)) => self.rescan(why, out),
            (Located::Inside(f), Located::Inside(t)) if !t.is_empty() => {
                let fr: Vec<&[u8]> = f.iter().map(|p| &p[..]).collect();
                let tr: Vec<&[u8]> = t.iter().map(|p| &p[..]).collect();
                let ino = self.table.lookup(&fr);
                match (ino, self.table.lookup(&tr[..tr.len() - 1])) {
                    (Some(ino), Some(tp)) if !fr.is_empty() => {
                        let kind = self.table.kind(ino).unwrap_or(Kind::File);
                        self.table.link(tp, tr[tr.len() - 1], ino, kind);
                        out.push(Op::Link { path: self.table.path_of(ino).unwrap_or_else(|| join(&fr)), new_path: join(&tr) });
                    }
                    _ => self.moved_in(t, out),
                }
            }
            (_, Located::Inside(t)) if !t.is_empty() => self.moved_in(t, out),
            _ => {}
        }
    }
}

/// A capture running on its own thread; [`CaptureHandle::stop`] joins it.
pub struct CaptureHandle {
    stop: Arc<AtomicBool>,
    pub rx: mpsc::Receiver<JournalEntry>,
    thread: Option<thread::JoinHandle<CaptureStats>>,
}

impl CaptureHandle {
    pub fn stop(mut self) -> CaptureStats {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for CaptureHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One agent per root: an exclusive lock the kernel releases if the agent dies.
fn take_lock(root: &Path, instance: &str) -> Result<fs::File, CaptureError> {
    let dir = Path::new("/run/imezzo");
    let path = dir.join(format!("{instance}.lock"));
    fs::create_dir_all(dir).map_err(|e| CaptureError::Lock(path.clone(), e))?;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| CaptureError::Lock(path.clone(), e))?;
    // SAFETY: flock on an fd we own.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(CaptureError::AlreadyRunning(root.to_path_buf(), path));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_touched_map_says_how_much_it_forgot_once() {
        let mut t = TouchedMap::with_max(2);
        t.entry(1).data = true;
        t.entry(2).attrs = true;
        // Noting an inode already there never forgets.
        t.entry(1).attrs = true;
        assert_eq!(t.take_forgotten(), 0);
        // A third inode clears the two before it: the capture must rescan for them.
        t.entry(3).data = true;
        assert_eq!(t.take_forgotten(), 2);
        assert_eq!(t.take_forgotten(), 0, "reported once");
        assert!(t.remove(1).is_none() && t.remove(2).is_none());
        assert!(t.remove(3).is_some_and(|x| x.data));
        // Re-inserting into a full map forgets too.
        t.entry(4);
        t.entry(5);
        t.insert(6, Touched::default());
        assert_eq!(t.take_forgotten(), 2);
    }
}
