//! The replication client (`imezzo client --mode replicate`): keeps a root a duplicate of
//! the server's export by replaying its journal.
//!
//! Durable state, in the state dir:
//! - the node identity (`imezzo init`);
//! - `client.state`: the volume the replica belongs to and the last seq applied *and*
//!   durable, replaced atomically (temporary file, fsync, rename, fsync of the directory);
//! - `replay-marks.redb` (and its `.log`): replay's sequence marks (see the replay module);
//! - `replay-pending`, while paths wait to be fetched again (see [`Pending`]).
//!
//! The driver has two halves. The *session loop* (async) owns the QUIC connection and a
//! [`ClientSession`] (the protocol's state machine): it feeds it what the control stream
//! delivers and hands every action it asks for, in order, to the *worker*. The worker (an
//! OS thread) owns the [`Replayer`] and the full-sync state and carries the actions out:
//! replaying an entry, applying a manifest entry, making a batch durable (`syncfs`, then
//! `client.state`), after which it reports back and the loop acknowledges. Replay asks the
//! master for current bytes and attributes through fetch streams, blocking the worker on
//! the runtime (`Handle::block_on`); the loop keeps reading the control stream meanwhile,
//! within the window it announced, and a full work queue stalls it (backpressure up to the
//! server's walk).
//!
//! Replay reads the master's *current* state, which may already be past the entry being
//! replayed: a file written then renamed is gone under the name the write names. Replay
//! reports such entries `Obsolete`; the driver keeps those paths ([`Pending`]), follows
//! them through later renames, and once the stream is idle and every entry durable (the
//! replica's names are then the master's) fetches them whole from their current names.
//!
//! A lost connection is retried with backoff (1 s doubling to 10 s); a refusal (this node
//! not allowed, the server not the pinned one, another protocol version) is fatal. After a
//! reconnect the client resumes from its durable last applied seq; the server answers with
//! a full sync when the journal no longer holds it. A replay that finds the replica
//! diverged (or a `rescan` entry) makes the client resync in full at its next durable
//! point: a full sync keeps every file whose size and mtime already match.

mod replica;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::config::ClientOptions;
use crate::identity::{Identity, IdentityError};
use crate::op::{JournalEntry, Op, RelPath};
use crate::protocol::{
    self, ClientOutput, ClientSession, ClientState, CloseReason, FetchEvent, FetchExchange, FileAttrs, ManifestEntry,
    Msg, VolumeId,
};
use crate::replay::{Applied, Attrs, DataSource, MarkStore, Recovered, ReplayError, Replayer};
use crate::transport::{self, TransportError};

pub use replica::FullSyncStats;

/// The durable state's file name inside the state dir.
pub const STATE_FILE: &str = "client.state";
/// Replay's sequence marks inside the state dir (with its log, `<name>.log`).
pub const MARKS_FILE: &str = "replay-marks.redb";
/// Paths still to be fetched whole (see [`Pending`]), inside the state dir.
pub const PENDING_FILE: &str = "replay-pending";
/// More pending paths than this and a full resync is cheaper.
const PENDING_MAX: usize = 10_000;
/// Durable points a pending path may stay absent at the master before it is dropped.
const PENDING_MISSES: u32 = 4;
/// First pause after a failed connection; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A connection attempt that gets no answer for this long counts as unreachable. quinn does
/// not see ICMP errors, so a dead server only shows as silence.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Work items queued for the worker before the session loop stops reading.
const WORK_QUEUE: usize = 1024;
/// Most manifest entries per work item: the worker takes them in one wake-up instead of one
/// each (waking it per small file cost about a quarter of the client's CPU in a full sync).
const MANIFEST_BATCH: usize = 256;
/// A batch closes once it holds this much inline file content.
const MANIFEST_BATCH_BYTES: usize = 1 << 20;
/// Most inline file content queued for the worker: `WORK_QUEUE` batches of it would be a
/// gigabyte. 4 MiB keeps the worker fed as well as 16 did (50k small files, same time) with
/// a peak RSS 10 MiB lower.
const MANIFEST_QUEUE_BYTES: usize = 4 << 20;
/// Most bytes taken from a stream per read.
const READ_CHUNK: usize = 256 << 10;
/// Repairs wait for the stream to be idle this long: with the master ahead, names that
/// later entries will still move must not be filled with the master's current content.
const REPAIR_IDLE: Duration = Duration::from_millis(1500);
/// "in sync" is printed at most this often.
const IN_SYNC_EVERY: Duration = Duration::from_secs(1);
/// Entries whose paths are fetched ahead in one round trip.
const PREFETCH_ENTRIES: usize = 256;
/// Files at most this large that queued entries write are fetched ahead, whole.
const PREFETCH_DATA_MAX: u64 = 256 << 10;
/// Fetches ahead in flight at once.
const PREFETCH_DATA_CONCURRENCY: usize = 32;
/// Attempts at an entry that fails on the replica's file system before resyncing instead.
const LOCAL_RETRIES: u32 = 3;

/// What the client reports as it goes; the binary prints some of it, the demo measures lag.
#[derive(Debug, Clone)]
pub enum ClientEvent {
    Connected {
        server: SocketAddr,
    },
    /// The server sends a full sync (manifest) at this seq, for this reason.
    FullSyncStarted {
        manifest_seq: u64,
        why: String,
    },
    /// The replica was rebuilt from the manifest and is durable at `seq`.
    InitialSyncDone {
        seq: u64,
        stats: FullSyncStats,
    },
    /// The server resumes the stream after the durable last applied seq.
    Resumed {
        from_seq: u64,
    },
    /// One journal entry was replayed (not yet durable).
    Applied {
        seq: u64,
        op: Op,
        at: Instant,
    },
    /// Connected, and every entry the server has is applied and durable.
    InSync {
        seq: u64,
    },
    /// The server could not be reached; the next attempt is in `retry_in`.
    Unreachable {
        retry_in: Duration,
        reason: String,
    },
    /// An established connection ended; the client reconnects.
    Disconnected {
        reason: String,
    },
}

/// Where events go. Called from several threads.
pub type EventSink = Arc<dyn Fn(ClientEvent) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Refused by the server, or the server is not the pinned one: retrying cannot help.
    #[error(transparent)]
    Refused(TransportError),
    #[error("{0}; nothing to retry: fix the cause, then restart the client")]
    Protocol(CloseReason),
    #[error(transparent)]
    Transport(TransportError),
    #[error("cannot use the replica root {}: {error}; create the directory or correct --root", path.display())]
    Root { path: PathBuf, error: io::Error },
    #[error(
        "the state dir {} is inside the replica root {}: a full sync would replace it with the server's tree; \
         give a --state outside --root",
        state.display(), root.display()
    )]
    StateInsideRoot { state: PathBuf, root: PathBuf },
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("cannot {action} the client state {}: {error}; check the state dir's disk and permissions", path.display())]
    State { action: &'static str, path: PathBuf, error: io::Error },
    #[error(
        "the client state {} is damaged ({reason}): move it aside and restart the client, which then resyncs in full",
        path.display()
    )]
    StateCorrupt { path: PathBuf, reason: String },
    #[error("the replay worker stopped unexpectedly ({0}); this is a bug: restart the client, and please report it")]
    Worker(String),
}

// ---- durable state ----------------------------------------------------------------------

/// `client.state`: a few text lines, replaced atomically.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(state_dir: &Path) -> StateFile {
        StateFile { path: state_dir.join(STATE_FILE) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The durable state; a new client's (nothing) when the file does not exist.
    pub fn load(&self) -> Result<ClientState, ClientError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ClientState::default()),
            Err(error) => return Err(ClientError::State { action: "read", path: self.path.clone(), error }),
        };
        let corrupt = |reason: String| ClientError::StateCorrupt { path: self.path.clone(), reason };
        let (mut volume, mut last) = (None, None);
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (key, value) = line.split_once(' ').ok_or_else(|| corrupt(format!("line {line:?}")))?;
            let value = value.trim();
            match key {
                "volume" => {
                    volume = Some(if value == "none" {
                        None
                    } else {
                        let mut id = [0u8; 16];
                        hex::decode_to_slice(value, &mut id).map_err(|_| corrupt(format!("volume {value:?}")))?;
                        Some(id)
                    })
                }
                "last_applied" => {
                    last = Some(if value == "none" {
                        None
                    } else {
                        Some(value.parse::<u64>().map_err(|_| corrupt(format!("last_applied {value:?}")))?)
                    })
                }
                other => return Err(corrupt(format!("unknown key {other:?}"))),
            }
        }
        match (volume, last) {
            (Some(volume_id), Some(last_applied)) => Ok(ClientState { volume_id, last_applied }),
            _ => Err(corrupt("a key is missing".into())),
        }
    }

    /// Replaces the state durably: after this returns, a crash leaves the new state.
    pub fn store(&self, state: &ClientState) -> Result<(), ClientError> {
        let err = |action, error| ClientError::State { action, path: self.path.clone(), error };
        let text = format!(
            "# imezzo client state: the replica's volume and the last journal seq applied and durable\nvolume {}\nlast_applied {}\n",
            state.volume_id.map_or_else(|| "none".to_string(), hex::encode),
            state.last_applied.map_or_else(|| "none".to_string(), |s| s.to_string()),
        );
        let tmp = self.path.with_extension("state.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| err("write", e))?;
        f.write_all(text.as_bytes()).map_err(|e| err("write", e))?;
        f.sync_all().map_err(|e| err("fsync", e))?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(|e| err("replace", e))?;
        // The rename is durable only once the directory is.
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| err("fsync the directory of", e))
    }
}

// ---- the outer loop ---------------------------------------------------------------------

/// Runs the client until `shutdown` completes (then returns `Ok`) or a fatal error.
pub async fn run(
    opts: &ClientOptions,
    events: EventSink,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    let identity = Identity::load(&opts.state)?;
    let root = prepare_root(opts)?;
    let state_file = StateFile::new(&opts.state);
    let mut state = state_file.load()?;
    let (r, recovered) = open_replayer(&root, &opts.state).await?;
    let mut replayer = Some(r);
    let mut force_full: Option<String> = recovered;
    let endpoint = transport::client_endpoint(&identity).map_err(ClientError::Transport)?;
    log::info!(
        "client {} replicating {} into {}; durable state: volume {}, last applied {}",
        identity.id,
        opts.server,
        root.display(),
        state.volume_id.map_or_else(|| "none".to_string(), hex::encode),
        state.last_applied.map_or_else(|| "none".to_string(), |s| s.to_string())
    );
    tokio::pin!(shutdown);
    let mut backoff = MIN_BACKOFF;
    let result = loop {
        let attempt = tokio::select! {
            () = &mut shutdown => break Ok(()),
            a = tokio::time::timeout(CONNECT_TIMEOUT, transport::connect(&endpoint, opts.server, opts.server_id)) => a,
        };
        let conn = match attempt {
            Ok(Ok(conn)) => conn,
            Ok(Err(
                e @ (TransportError::WrongServer { .. }
                | TransportError::Refused { .. }
                | TransportError::Incompatible { .. }),
            )) => {
                break Err(ClientError::Refused(e));
            }
            Ok(Err(
                e @ (TransportError::Tls { .. } | TransportError::Bind { .. } | TransportError::Connect { .. }),
            )) => {
                break Err(ClientError::Transport(e));
            }
            Ok(Err(e)) => {
                if wait_retry(&events, &mut backoff, e.to_string(), &mut shutdown).await {
                    break Ok(());
                }
                continue;
            }
            Err(_) => {
                let reason = format!("no answer from {} within {}s", opts.server, CONNECT_TIMEOUT.as_secs());
                if wait_retry(&events, &mut backoff, reason, &mut shutdown).await {
                    break Ok(());
                }
                continue;
            }
        };
        events(ClientEvent::Connected { server: opts.server });
        let mut hello = state;
        if let Some(why) = force_full.take() {
            log::info!("resyncing in full: {why}");
            hello.last_applied = None;
        }
        let Some(r) = replayer.take() else { break Err(ClientError::Worker("the replayer was lost".into())) };
        let ctx =
            SessionCtx { conn: &conn, root: &root, state_dir: &opts.state, state_file: &state_file, events: &events };
        let (outcome, r) = ctx.run(hello, r, &mut shutdown).await;
        state = state_file.load().unwrap_or(state);
        replayer = match r {
            Some(r) => Some(r),
            // The worker died: start from what is durable with a fresh replayer.
            None => match open_replayer(&root, &opts.state).await {
                Ok((r, recovered)) => {
                    force_full = force_full.or(recovered);
                    Some(r)
                }
                Err(e) => break Err(e),
            },
        };
        match outcome {
            Outcome::Shutdown => break Ok(()),
            Outcome::Fatal(e) => break Err(e),
            Outcome::Resync(why) => force_full = Some(why),
            Outcome::Lost { reason, streamed, immediate } => {
                events(ClientEvent::Disconnected { reason: reason.clone() });
                if streamed {
                    backoff = MIN_BACKOFF;
                }
                // A connection that streamed before it broke is retried at once (the
                // server restarted, or the network blinked); one that failed early backs off.
                if !(streamed || immediate) && wait_retry(&events, &mut backoff, reason, &mut shutdown).await {
                    break Ok(());
                }
            }
        }
    };
    endpoint.close(quinn::VarInt::from_u32(0), b"the client is shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    result
}

/// Reports the failure, sleeps the backoff and doubles it; true when shut down meanwhile.
async fn wait_retry(
    events: &EventSink,
    backoff: &mut Duration,
    reason: String,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> bool {
    let wait = *backoff;
    events(ClientEvent::Unreachable { retry_in: wait, reason });
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    tokio::select! {
        () = shutdown.as_mut() => true,
        () = tokio::time::sleep(wait) => false,
    }
}

/// Opens the replayer on the replica with its sequence marks in the state dir. Also
/// returns a reason to resync in full when the marks of the last unsynced batch were lost
/// to a machine restart (replaying it again by presence alone may leave differences).
async fn open_replayer(root: &Path, state: &Path) -> Result<(Replayer, Option<String>), ClientError> {
    let (root, marks) = (root.to_path_buf(), state.join(MARKS_FILE));
    tokio::task::spawn_blocking(move || {
        let store = MarkStore::open(&marks).map_err(ReplayError::from)?;
        let recovered = match store.recovered() {
            Recovered::Dropped { changes } => Some(format!(
                "the machine restarted during replay and {changes} sequence marks not yet durable were dropped"
            )),
            _ => None,
        };
        Ok((Replayer::open(&root)?.with_marks(store)?, recovered))
    })
    .await
    .map_err(|e| ClientError::Worker(e.to_string()))?
}

fn prepare_root(opts: &ClientOptions) -> Result<PathBuf, ClientError> {
    let root_err = |error| ClientError::Root { path: opts.root.clone(), error };
    match std::fs::symlink_metadata(&opts.root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(root_err(io::Error::from_raw_os_error(libc::ENOTDIR))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir_all(&opts.root).map_err(root_err)?,
        Err(e) => return Err(root_err(e)),
    }
    let root = std::fs::canonicalize(&opts.root).map_err(root_err)?;
    if let Ok(state) = std::fs::canonicalize(&opts.state) {
        if state.starts_with(&root) {
            return Err(ClientError::StateInsideRoot { state, root });
        }
    }
    Ok(root)
}

// ---- one connection ---------------------------------------------------------------------

enum Outcome {
    Shutdown,
    Fatal(ClientError),
    /// Reconnect asking for a full sync.
    Resync(String),
    /// The connection ended. `streamed`: it got as far as streaming the journal;
    /// `immediate`: reconnect without waiting (the server asked for it).
    Lost {
        reason: String,
        streamed: bool,
        immediate: bool,
    },
}

/// What the session loop hands the worker, strictly in the session's order.
enum Work {
    BeginFullSync {
        volume_id: VolumeId,
        manifest_seq: u64,
    },
    /// Consecutive manifest entries, with their share of [`MANIFEST_QUEUE_BYTES`] (given
    /// back when the item is dropped, applied or not).
    Manifest {
        entries: Vec<ManifestEntry>,
        _queued: Option<OwnedSemaphorePermit>,
    },
    ManifestComplete {
        seq: u64,
    },
    Apply(JournalEntry),
    Persist {
        volume_id: VolumeId,
        seq: u64,
    },
    /// Fetch the pending paths again (see [`Pending`]); sent only when every entry received
    /// is durable and the stream has been idle, so the replica's names are the master's.
    Repair,
}

/// What the worker tells the session loop.
enum Report {
    /// Entries through `seq` are applied and durable, and recorded as such; `pending` paths
    /// wait for a repair.
    Persisted {
        seq: u64,
        full_sync: Option<FullSyncStats>,
        pending: usize,
    },
    /// Paths waiting for a repair (at start, and after each repair).
    Pending(usize),
    Resync(String),
    Lost(String),
    Fatal(ClientError),
}

struct SessionCtx<'a> {
    conn: &'a quinn::Connection,
    root: &'a Path,
    state_dir: &'a Path,
    state_file: &'a StateFile,
    events: &'a EventSink,
}

/// Decides when to report "in sync": at most once a second, and at least once after each
/// catch-up.
#[derive(Default)]
struct InSync {
    last_print: Option<Instant>,
    printed: Option<u64>,
    was_in_sync: bool,
    pending: bool,
    deferred: Option<Instant>,
}

impl InSync {
    fn update(&mut self, session: &ClientSession, known: bool, now: Instant, events: &EventSink) {
        let seq = session.state().last_applied;
        let in_sync = known
            && !session.is_closed()
            && seq.is_some_and(|s| s == session.received_through() && session.server_journal_last() <= s);
        if in_sync && (!self.was_in_sync || seq != self.printed) {
            self.pending = true;
        }
        self.was_in_sync = in_sync;
        self.deferred = None;
        let (true, true, Some(seq)) = (self.pending, in_sync, seq) else { return };
        match self.last_print {
            Some(t) if now < t + IN_SYNC_EVERY => self.deferred = Some(t + IN_SYNC_EVERY),
            _ => {
                self.pending = false;
                self.last_print = Some(now);
                self.printed = Some(seq);
                events(ClientEvent::InSync { seq });
            }
        }
    }
}

impl SessionCtx<'_> {
    /// Runs one connection; gives back the replayer unless the worker died with it.
    async fn run(
        &self,
        hello: ClientState,
        replayer: Replayer,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> (Outcome, Option<Replayer>) {
        let mut replayer = Some(replayer);
        let mut worker: Option<WorkerHandle> = None;
        let outcome = self.drive(hello, &mut replayer, &mut worker, shutdown).await;
        // Whatever happened, the connection is done with: fetches in flight fail at once and
        // the worker finishes its current item and stops.
        if !matches!(outcome, Outcome::Lost { .. }) {
            let (code, text): (u32, &[u8]) = match &outcome {
                Outcome::Resync(_) => (0, b"the client resyncs in full"),
                _ => (0, b"the client is shutting down"),
            };
            self.conn.close(quinn::VarInt::from_u32(code), text);
        } else {
            self.conn.close(quinn::VarInt::from_u32(0), b"the client reconnects");
        }
        if let Some(w) = worker {
            drop(w.tx);
            replayer = tokio::task::spawn_blocking(move || w.thread.join().ok()).await.ok().flatten();
        }
        (outcome, replayer)
    }

    async fn drive(
        &self,
        hello: ClientState,
        replayer: &mut Option<Replayer>,
        worker: &mut Option<WorkerHandle>,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Outcome {
        let lost = |reason: String, streamed: bool| Outcome::Lost { reason, streamed, immediate: false };
        let (mut send, mut recv) = match self.conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return lost(format!("connection lost before the handshake ({e})"), false),
        };
        let mut session = ClientSession::new(hello, Instant::now());
        let (report_tx, mut reports) = mpsc::unbounded_channel();
        let fetcher = Fetcher {
            conn: self.conn.clone(),
            rt: Handle::current(),
            next_id: Arc::new(AtomicU64::new(1)),
            lost: Arc::new(Mutex::new(None)),
        };
        let manifest_budget = Arc::new(Semaphore::new(MANIFEST_QUEUE_BYTES));
        let mut in_sync = InSync::default();
        let mut welcomed: Option<Instant> = None;
        let mut full_sync = false;
        let mut full_sync_done = false;
        let mut streamed = false;
        let mut pending_paths = 0usize;
        let mut last_activity = Instant::now();
        let mut repair_asked = false;
        loop {
            let mut held: Option<ClientOutput> = None;
            while let Some(out) = held.take().or_else(|| session.poll_output()) {
                let work = match out {
                    ClientOutput::Send(msg) => {
                        let frame = match protocol::encode(&msg) {
                            Ok(f) => f,
                            Err(e) => return Outcome::Fatal(ClientError::Worker(e.to_string())),
                        };
                        if let Err(e) = send.write_all(&frame).await {
                            return lost(format!("connection lost ({e})"), streamed);
                        }
                        continue;
                    }
                    ClientOutput::BeginFullSync { volume_id, manifest_seq, why } => {
                        full_sync = true;
                        (self.events)(ClientEvent::FullSyncStarted { manifest_seq, why: why.to_string() });
                        Work::BeginFullSync { volume_id, manifest_seq }
                    }
                    ClientOutput::ApplyManifest(e) => {
                        let inline = |e: &ManifestEntry| e.data.as_ref().map_or(0, Vec::len);
                        let mut bytes = inline(&e);
                        let mut entries = vec![e];
                        while entries.len() < MANIFEST_BATCH && bytes < MANIFEST_BATCH_BYTES {
                            match session.poll_output() {
                                Some(ClientOutput::ApplyManifest(e)) => {
                                    bytes += inline(&e);
                                    entries.push(e);
                                }
                                other => {
                                    held = other;
                                    break;
                                }
                            }
                        }
                        let queued = match reserve_queue(&manifest_budget, bytes, shutdown).await {
                            Ok(q) => q,
                            Err(o) => return o,
                        };
                        Work::Manifest { entries, _queued: queued }
                    }
                    ClientOutput::ManifestComplete { seq } => Work::ManifestComplete { seq },
                    ClientOutput::Apply(e) => Work::Apply(e),
                    ClientOutput::PersistAndAck { volume_id, seq } => Work::Persist { volume_id, seq },
                    ClientOutput::Close(reason) => return self.closed_by_session(reason, streamed),
                };
                if worker.is_none() {
                    // Every work item follows Welcome, so the volume is known here.
                    if let Err(o) = self.start_worker(&session, replayer, worker, &fetcher, &report_tx) {
                        return o;
                    }
                }
                if let Err(o) = send_work(worker.as_ref(), work, &mut reports, shutdown, streamed).await {
                    return o;
                }
            }
            if welcomed.is_none() && session.volume_id().is_some() {
                welcomed = Some(Instant::now());
                // At once, so paths a previous session left pending are repaired even if
                // nothing new arrives.
                if worker.is_none() {
                    if let Err(o) = self.start_worker(&session, replayer, worker, &fetcher, &report_tx) {
                        return o;
                    }
                }
                if !full_sync {
                    let from_seq = session.received_through() + 1;
                    let from_seq = session.state().last_applied.map_or(from_seq, |l| l + 1);
                    (self.events)(ClientEvent::Resumed { from_seq });
                    streamed = true;
                }
            }
            // The server's last seq is known once it said something about it; a server
            // with an empty journal says nothing, so two heartbeats' time also will do.
            let known = full_sync_done
                || session.server_journal_last() > 0
                || welcomed.is_some_and(|t| t.elapsed() > Duration::from_millis(2500));
            let all_durable = session.state().last_applied == Some(session.received_through());
            in_sync.update(&session, known && pending_paths == 0, Instant::now(), self.events);
            let deadline = session.poll_timeout().map(tokio::time::Instant::from_std);
            let print_at = in_sync.deferred.map(tokio::time::Instant::from_std);
            let repair_at = (pending_paths > 0 && !repair_asked && all_durable && worker.is_some())
                .then(|| tokio::time::Instant::from_std(last_activity + REPAIR_IDLE));
            tokio::select! {
                biased;
                () = shutdown.as_mut() => return Outcome::Shutdown,
                report = reports.recv() => match report {
                    Some(Report::Persisted { seq, full_sync: stats, pending }) => {
                        (pending_paths, last_activity, repair_asked) = (pending, Instant::now(), false);
                        session.handle_applied(Instant::now(), seq);
                        if let Some(stats) = stats {
                            full_sync_done = true;
                            streamed = true;
                            (self.events)(ClientEvent::InitialSyncDone { seq, stats });
                        }
                    }
                    Some(Report::Pending(n)) => (pending_paths, last_activity, repair_asked) = (n, Instant::now(), false),
                    Some(other) => return report_outcome(other, streamed),
                    None => return Outcome::Fatal(ClientError::Worker("it exited".into())),
                },
                chunk = recv.read_chunk(READ_CHUNK, true) => {
                    let now = Instant::now();
                    match chunk {
                        Ok(Some(chunk)) => {
                            let before = session.received_through();
                            session.handle_stream_data(now, &chunk.bytes);
                            if session.received_through() != before {
                                (last_activity, repair_asked) = (now, false);
                            }
                        }
                        Ok(None) => session.handle_stream_finished(now),
                        Err(quinn::ReadError::ConnectionLost(e)) => return connection_outcome(&e, streamed),
                        Err(e) => return lost(format!("the control stream failed ({e})"), streamed),
                    }
                }
                () = sleep_until(deadline), if deadline.is_some() => session.handle_timeout(Instant::now()),
                () = sleep_until(print_at), if print_at.is_some() => {}
                () = sleep_until(repair_at), if repair_at.is_some() => {
                    repair_asked = true;
                    if let Err(o) = send_work(worker.as_ref(), Work::Repair, &mut reports, shutdown, streamed).await {
                        return o;
                    }
                }
                e = self.conn.closed() => return connection_outcome(&e, streamed),
            }
        }
    }

    fn start_worker(
        &self,
        session: &ClientSession,
        replayer: &mut Option<Replayer>,
        worker: &mut Option<WorkerHandle>,
        fetcher: &Fetcher,
        reports: &mpsc::UnboundedSender<Report>,
    ) -> Result<(), Outcome> {
        let volume = session.volume_id().unwrap_or_default();
        let Some(r) = replayer.take() else {
            return Err(Outcome::Fatal(ClientError::Worker("the replayer was lost".into())));
        };
        *worker = Some(WorkerHandle::start(self, r, volume, fetcher.clone(), reports.clone()).map_err(Outcome::Fatal)?);
        Ok(())
    }

    fn closed_by_session(&self, reason: CloseReason, streamed: bool) -> Outcome {
        let text = reason.to_string();
        self.conn.close(quinn::VarInt::from_u32(reason.code()), text.as_bytes());
        match reason {
            CloseReason::VersionMismatch { .. } => Outcome::Fatal(ClientError::Protocol(reason)),
            CloseReason::Violation { .. } | CloseReason::Internal { .. } => {
                log::warn!("{text}");
                Outcome::Lost { reason: text, streamed, immediate: false }
            }
            _ => Outcome::Lost { reason: text, streamed, immediate: false },
        }
    }
}

/// Queues work for the worker (waiting while its queue is full).
async fn send_work(
    worker: Option<&WorkerHandle>,
    work: Work,
    reports: &mut mpsc::UnboundedReceiver<Report>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    streamed: bool,
) -> Result<(), Outcome> {
    let Some(w) = worker else { return Err(Outcome::Fatal(ClientError::Worker("it never started".into()))) };
    tokio::select! {
        sent = w.tx.send(work) => if sent.is_err() {
            // The worker stopped: its report says why.
            return Err(match reports.recv().await {
                Some(r) => report_outcome(r, streamed),
                None => Outcome::Fatal(ClientError::Worker("it exited".into())),
            });
        },
        () = shutdown.as_mut() => return Err(Outcome::Shutdown),
    }
    Ok(())
}

/// Waits until the worker's queue has room for `bytes` more of inline file content. The
/// worker gives room back as it applies (or drops, when it stops) what is queued, so this
/// always ends.
async fn reserve_queue(
    budget: &Arc<Semaphore>,
    bytes: usize,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<OwnedSemaphorePermit>, Outcome> {
    if bytes == 0 {
        return Ok(None);
    }
    // A batch ends soon after MANIFEST_BATCH_BYTES, far below the whole budget; the cap
    // only keeps an impossible request from waiting forever.
    let n = bytes.min(MANIFEST_QUEUE_BYTES) as u32;
    tokio::select! {
        permit = budget.clone().acquire_many_owned(n) => match permit {
            Ok(p) => Ok(Some(p)),
            Err(_) => Err(Outcome::Fatal(ClientError::Worker("the manifest queue closed".into()))),
        },
        () = shutdown.as_mut() => Err(Outcome::Shutdown),
    }
}

fn report_outcome(report: Report, streamed: bool) -> Outcome {
    match report {
        Report::Resync(why) => Outcome::Resync(why),
        Report::Lost(reason) => Outcome::Lost { reason, streamed, immediate: false },
        Report::Fatal(e) => Outcome::Fatal(e),
        Report::Persisted { .. } | Report::Pending(_) => {
            Outcome::Fatal(ClientError::Worker("an unexpected report".into()))
        }
    }
}

/// What an ended connection means for the next attempt.
fn connection_outcome(e: &quinn::ConnectionError, streamed: bool) -> Outcome {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let text = String::from_utf8_lossy(&c.reason).into_owned();
            let code = c.error_code.into_inner();
            if code == 1 {
                // VersionMismatch: the other agent says which side to upgrade.
                let reason = CloseReason::Refused { reason: text };
                return Outcome::Fatal(ClientError::Protocol(reason));
            }
            let reason = if text.is_empty() { format!("the server closed the connection (code {code})") } else { text };
            // Expired (5): the server sends a full sync on the next connection at once.
            Outcome::Lost { reason, streamed, immediate: code == 5 }
        }
        other => Outcome::Lost { reason: format!("connection lost ({other})"), streamed, immediate: false },
    }
}

fn sleep_until(deadline: Option<tokio::time::Instant>) -> tokio::time::Sleep {
    tokio::time::sleep_until(deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)))
}

// ---- fetches ----------------------------------------------------------------------------

/// Requests to the server over fetch streams, usable from blocking threads.
#[derive(Clone)]
pub(crate) struct Fetcher {
    conn: quinn::Connection,
    rt: Handle,
    next_id: Arc<AtomicU64>,
    /// Set by the first fetch that finds the connection gone.
    lost: Arc<Mutex<Option<String>>>,
}

/// Why a fetch produced no answer.
#[derive(Debug)]
pub(crate) enum FetchFail {
    /// The connection is gone; the session reconnects.
    Lost(String),
    /// The server could not read it.
    Unreadable(String),
    /// Writing what arrived failed here.
    Local(io::Error),
}

/// How a data fetch ended.
pub(crate) enum DataEnd {
    Done { file_size: u64 },
    Gone,
}

impl Fetcher {
    pub(crate) fn runtime(&self) -> &Handle {
        &self.rt
    }

    pub(crate) fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn lose(&self, why: String) -> FetchFail {
        let mut l = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        l.get_or_insert(why.clone());
        FetchFail::Lost(why)
    }

    /// One exchange on a new stream: the request, then every checked event of the answer.
    async fn exchange(
        &self,
        mut ex: FetchExchange,
        request: Msg,
        on_event: &mut (dyn FnMut(FetchEvent) -> Result<(), FetchFail> + Send),
    ) -> Result<(), FetchFail> {
        let (mut send, mut recv) =
            self.conn.open_bi().await.map_err(|e| self.lose(format!("connection lost ({e})")))?;
        let frame = protocol::encode(&request).map_err(|e| FetchFail::Local(io::Error::other(e.to_string())))?;
        send.write_all(&frame).await.map_err(|e| self.lose(format!("connection lost ({e})")))?;
        let _ = send.finish();
        loop {
            match recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => {
                    let events = ex.handle_stream_data(&chunk.bytes).map_err(|r| self.violation(r))?;
                    for e in events {
                        on_event(e)?;
                    }
                }
                Ok(None) => return ex.handle_stream_finished().map_err(|r| self.violation(r)),
                Err(e) => return Err(self.lose(format!("a fetch stream failed ({e})"))),
            }
        }
    }

    /// A server that broke the protocol on a fetch stream loses its connection.
    fn violation(&self, reason: CloseReason) -> FetchFail {
        let text = reason.to_string();
        log::warn!("{text}");
        self.conn.close(quinn::VarInt::from_u32(reason.code()), text.as_bytes());
        self.lose(text)
    }

    /// The master's current bytes `[offset, offset + len)` of `path`, handed to `sink` as
    /// `(offset, bytes)` in increasing order; ranges not handed over are holes.
    pub(crate) async fn data(
        &self,
        path: RelPath,
        offset: u64,
        len: u64,
        ino: Option<u64>,
        sink: &mut (dyn FnMut(u64, Vec<u8>) -> io::Result<()> + Send),
    ) -> Result<DataEnd, FetchFail> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (ex, request) = FetchExchange::data(id, path, offset, len, ino);
        let mut end = None;
        self.exchange(ex, request, &mut |event| {
            match event {
                FetchEvent::Data { offset, bytes } => sink(offset, bytes).map_err(FetchFail::Local)?,
                FetchEvent::End { file_size } => end = Some(DataEnd::Done { file_size }),
                FetchEvent::Gone => end = Some(DataEnd::Gone),
                FetchEvent::Unreadable { reason } => return Err(FetchFail::Unreadable(reason)),
                FetchEvent::Attrs(_) => {}
            }
            Ok(())
        })
        .await?;
        end.ok_or_else(|| FetchFail::Unreadable("the answer ended without DataEnd".into()))
    }

    /// The master's current attributes of `paths`.
    pub(crate) async fn attrs(&self, paths: Vec<RelPath>) -> Result<Vec<Option<FileAttrs>>, FetchFail> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (ex, request) = FetchExchange::attrs(id, paths);
        let mut answer = None;
        self.exchange(ex, request, &mut |event| {
            match event {
                FetchEvent::Attrs(a) => answer = Some(a),
                FetchEvent::Unreadable { reason } => return Err(FetchFail::Unreadable(reason)),
                _ => {}
            }
            Ok(())
        })
        .await?;
        answer.ok_or_else(|| FetchFail::Unreadable("the answer ended without Attrs".into()))
    }
}

/// Replay's [`DataSource`] over the connection: each call a blocking fetch.
struct NetSource<'a> {
    fetcher: &'a Fetcher,
    /// Answers fetched ahead for the current batch ([`Worker::prefetch`]).
    cache: &'a HashMap<RelPath, Option<Attrs>>,
    /// Contents fetched ahead ([`Worker::prefetch_data`]).
    data: &'a DataCache,
    /// Paths the master had nothing at when replay asked: what replay could not take
    /// from them is fetched later from wherever they went (see [`Pending`]).
    absent: Vec<RelPath>,
}

impl<'a> NetSource<'a> {
    fn new(fetcher: &'a Fetcher) -> NetSource<'a> {
        static NO_CACHE: std::sync::OnceLock<HashMap<RelPath, Option<Attrs>>> = std::sync::OnceLock::new();
        static NO_DATA: std::sync::OnceLock<DataCache> = std::sync::OnceLock::new();
        NetSource {
            fetcher,
            cache: NO_CACHE.get_or_init(HashMap::new),
            data: NO_DATA.get_or_init(HashMap::new),
            absent: Vec::new(),
        }
    }
}

fn fail_to_io(f: FetchFail) -> io::Error {
    match f {
        FetchFail::Lost(why) => io::Error::new(io::ErrorKind::ConnectionAborted, why),
        FetchFail::Unreadable(why) => io::Error::other(format!("the server cannot read it: {why}")),
        FetchFail::Local(e) => e,
    }
}

impl DataSource for NetSource<'_> {
    fn read_range(&mut self, path: &RelPath, offset: u64, len: u64, ino: Option<u64>) -> io::Result<Vec<u8>> {
        if let Some(content) = ino.and_then(|i| self.data.get(&(path.clone(), i))) {
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(content.len());
            let end = usize::try_from(offset.saturating_add(len)).unwrap_or(usize::MAX).min(content.len());
            return Ok(content[start..end].to_vec());
        }
        let mut buf = Vec::new();
        let end = self.fetcher.rt.block_on(self.fetcher.data(path.clone(), offset, len, ino, &mut |at, bytes| {
            // Holes between chunks read as zeros; replay turns zero blocks back into holes.
            let rel = usize::try_from(at - offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
            buf.resize(rel, 0);
            buf.extend_from_slice(&bytes);
            Ok(())
        }));
        match end.map_err(fail_to_io)? {
            DataEnd::Done { file_size } => {
                let want = offset.saturating_add(len).min(file_size).saturating_sub(offset);
                buf.resize(usize::try_from(want).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?, 0);
                Ok(buf)
            }
            // Another file there now: replay leaves the path to be fetched again from
            // wherever the written file went.
            DataEnd::Gone if ino.is_some() => Err(crate::replay::replaced(path)),
            // Nothing there now: a later entry (unlink, rename) accounts for it.
            DataEnd::Gone => Ok(Vec::new()),
        }
    }

    fn attrs(&mut self, path: &RelPath) -> io::Result<Option<Attrs>> {
        let attrs = match self.cache.get(path) {
            Some(a) => a.clone(),
            None => {
                let mut answer =
                    self.fetcher.rt.block_on(self.fetcher.attrs(vec![path.clone()])).map_err(fail_to_io)?;
                answer.pop().flatten().map(Attrs::from)
            }
        };
        if attrs.is_none() {
            self.absent.push(path.clone());
        }
        Ok(attrs)
    }
}

// ---- the worker -------------------------------------------------------------------------

struct WorkerHandle {
    tx: mpsc::Sender<Work>,
    thread: std::thread::JoinHandle<Replayer>,
}

impl WorkerHandle {
    fn start(
        ctx: &SessionCtx<'_>,
        replayer: Replayer,
        volume: VolumeId,
        fetcher: Fetcher,
        reports: mpsc::UnboundedSender<Report>,
    ) -> Result<WorkerHandle, ClientError> {
        let (tx, rx) = mpsc::channel(WORK_QUEUE);
        let mut v = [0u8; 8];
        v.copy_from_slice(&volume[..8]);
        let worker = Worker {
            replayer: replayer.with_volume(u64::from_be_bytes(v)),
            fetcher,
            root: ctx.root.to_path_buf(),
            state_file: ctx.state_file.clone(),
            events: ctx.events.clone(),
            reports,
            full: None,
            finished_full: None,
            needs_resync: None,
            pending: Pending::load(&ctx.state_dir.join(PENDING_FILE)),
            pending_file: ctx.state_dir.join(PENDING_FILE),
            cache: HashMap::new(),
            data: HashMap::new(),
            prefetched: 0,
        };
        let thread = std::thread::Builder::new()
            .name("imezzo-replay".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| ClientError::Worker(format!("cannot start it: {e}")))?;
        Ok(WorkerHandle { tx, thread })
    }
}

/// Why the worker stops.
enum Stop {
    Lost(String),
    Fatal(ClientError),
}

struct Worker {
    replayer: Replayer,
    fetcher: Fetcher,
    root: PathBuf,
    state_file: StateFile,
    events: EventSink,
    reports: mpsc::UnboundedSender<Report>,
    full: Option<replica::FullSync>,
    /// A full sync finished, not yet reported (it is with the next persist).
    finished_full: Option<FullSyncStats>,
    needs_resync: Option<String>,
    pending: Pending,
    pending_file: PathBuf,
    /// The master's attributes fetched ahead for the next `prefetched` entries.
    cache: HashMap<RelPath, Option<Attrs>>,
    /// Whole contents of small files those entries write, by (path, inode), fetched
    /// ahead at once instead of one round trip per entry.
    data: DataCache,
    prefetched: usize,
}

/// Contents fetched ahead: (path, inode written to) -> the file's bytes from offset 0.
type DataCache = HashMap<(RelPath, u64), Vec<u8>>;

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Work>) -> Replayer {
        let _ = self.reports.send(Report::Pending(self.pending.paths.len()));
        let mut queue: VecDeque<Work> = VecDeque::new();
        loop {
            let work = match queue.pop_front() {
                Some(w) => w,
                None => match rx.blocking_recv() {
                    Some(w) => w,
                    None => break,
                },
            };
            if matches!(work, Work::Apply(_)) && self.prefetched == 0 {
                if let Err(stop) = self.prefetch(&work, &mut queue, &mut rx) {
                    self.stop(stop);
                    break;
                }
            }
            let done = match work {
                Work::BeginFullSync { volume_id, manifest_seq } => self.begin_full_sync(volume_id, manifest_seq),
                Work::Manifest { entries, _queued } => match self.full.as_mut() {
                    Some(full) => entries.into_iter().try_for_each(|e| full.apply(e)),
                    None => Err(Stop::Fatal(ClientError::Worker("a manifest entry outside a full sync".into()))),
                },
                Work::ManifestComplete { seq } => self.complete_full_sync(seq),
                Work::Apply(entry) => self.apply(entry),
                Work::Persist { volume_id, seq } => {
                    // A later durable point already queued covers this one: one sync for
                    // both (the session acknowledges the later seq, which implies this one).
                    while queue.len() < PREFETCH_ENTRIES {
                        match rx.try_recv() {
                            Ok(w) => queue.push_back(w),
                            Err(_) => break,
                        }
                    }
                    if queue.iter().any(|w| matches!(w, Work::Persist { .. })) {
                        Ok(())
                    } else {
                        self.persist(volume_id, seq)
                    }
                }
                Work::Repair => self.repair_and_sync(),
            };
            if let Err(stop) = done {
                self.stop(stop);
                break;
            }
        }
        self.replayer
    }

    fn stop(&self, stop: Stop) {
        let _ = self.reports.send(match stop {
            Stop::Lost(why) => Report::Lost(why),
            Stop::Fatal(e) => Report::Fatal(e),
        });
    }

    /// Asks the master, in one round trip, for the attributes of every path the entries
    /// already queued will ask about (the entry, its parent, a rename's other side), instead
    /// of one round trip per question. Reading them now rather than entry by entry is
    /// equally "the master's current state": every entry of the batch happened before now,
    /// and a change after now has an entry of its own, replayed later.
    fn prefetch(
        &mut self,
        first: &Work,
        queue: &mut VecDeque<Work>,
        rx: &mut mpsc::Receiver<Work>,
    ) -> Result<(), Stop> {
        while queue.len() < PREFETCH_ENTRIES {
            match rx.try_recv() {
                Ok(w) => queue.push_back(w),
                Err(_) => break,
            }
        }
        let mut paths: Vec<RelPath> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut entries = 0;
        for work in std::iter::once(first).chain(queue.iter()) {
            let Work::Apply(entry) = work else { break };
            entries += 1;
            let mut add = |p: &RelPath| {
                for q in [Some(p.clone()), parent_of(p)].into_iter().flatten() {
                    if seen.insert(q.clone()) {
                        paths.push(q);
                    }
                }
            };
            add(entry.op.path());
            if let Op::Rename { new_path, .. } | Op::Link { new_path, .. } = &entry.op {
                add(new_path);
            }
        }
        self.cache.clear();
        for chunk in paths.chunks(protocol::MAX_ATTRS_PATHS) {
            match self.fetcher.rt.block_on(self.fetcher.attrs(chunk.to_vec())) {
                Ok(answer) => {
                    for (p, a) in chunk.iter().zip(answer) {
                        self.cache.insert(p.clone(), a.map(Attrs::from));
                    }
                }
                Err(FetchFail::Lost(why)) => return Err(Stop::Lost(why)),
                // Replay asks again, path by path, and reports what fails.
                Err(_) => {}
            }
        }
        self.prefetch_data(std::iter::once(first).chain(queue.iter()).take(entries))?;
        self.prefetched = entries;
        Ok(())
    }

    /// Fetches, concurrently, the whole content of every small regular file the queued
    /// writes take bytes from (by the inode each names), so a burst of small files costs a
    /// few round trips, not one per file. What does not arrive is fetched by replay itself.
    fn prefetch_data<'w>(&mut self, work: impl Iterator<Item = &'w Work>) -> Result<(), Stop> {
        self.data.clear();
        let mut wanted = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for w in work {
            let Work::Apply(entry) = w else { continue };
            let Op::Write { path, ino: Some(ino), .. } = &entry.op else { continue };
            let Some(Some(a)) = self.cache.get(path) else { continue };
            if a.kind == crate::replay::FileKind::Regular
                && a.size <= PREFETCH_DATA_MAX
                && seen.insert((path.clone(), *ino))
            {
                wanted.push((path.clone(), *ino, a.size));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let fetcher = self.fetcher.clone();
        let fetched = self.fetcher.rt.block_on(async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(PREFETCH_DATA_CONCURRENCY));
            let mut jobs = tokio::task::JoinSet::new();
            for (path, ino, size) in wanted {
                let (fetcher, permits) = (fetcher.clone(), permits.clone());
                jobs.spawn(async move {
                    let _permit = permits.acquire_owned().await.ok()?;
                    let mut buf = Vec::new();
                    let end = fetcher
                        .data(path.clone(), 0, size, Some(ino), &mut |at, bytes| {
                            // Holes between chunks read as zeros.
                            buf.resize(at as usize, 0);
                            buf.extend_from_slice(&bytes);
                            Ok(())
                        })
                        .await
                        .ok()?;
                    match end {
                        DataEnd::Done { file_size } => {
                            buf.resize(size.min(file_size) as usize, 0);
                            Some((path, ino, buf))
                        }
                        DataEnd::Gone => None,
                    }
                });
            }
            let mut out = Vec::new();
            while let Some(done) = jobs.join_next().await {
                if let Ok(Some(item)) = done {
                    out.push(item);
                }
            }
            out
        });
        if let Some(why) = self.fetcher.lost() {
            return Err(Stop::Lost(why));
        }
        for (path, ino, bytes) in fetched {
            self.data.insert((path, ino), bytes);
        }
        Ok(())
    }

    fn begin_full_sync(&mut self, volume_id: VolumeId, manifest_seq: u64) -> Result<(), Stop> {
        // Until the manifest is whole the replica is no state of the volume: a crash now
        // must restart the full sync, not resume.
        self.state_file.store(&ClientState { volume_id: Some(volume_id), last_applied: None }).map_err(Stop::Fatal)?;
        let full = replica::FullSync::new(&self.root, self.fetcher.clone(), manifest_seq)
            .map_err(|error| Stop::Fatal(ClientError::Root { path: self.root.clone(), error }))?;
        self.full = Some(full);
        self.needs_resync = None;
        self.pending.clear();
        Ok(())
    }

    fn complete_full_sync(&mut self, seq: u64) -> Result<(), Stop> {
        let Some(full) = self.full.take() else {
            return Err(Stop::Fatal(ClientError::Worker("a manifest end outside a full sync".into())));
        };
        let stats = full.finish(seq)?;
        self.finished_full = Some(stats);
        Ok(())
    }

    fn apply(&mut self, entry: JournalEntry) -> Result<(), Stop> {
        let mut attempt = 0;
        let cache = std::mem::take(&mut self.cache);
        let data = std::mem::take(&mut self.data);
        self.prefetched = self.prefetched.saturating_sub(1);
        let (result, absent) = loop {
            let mut source = NetSource { fetcher: &self.fetcher, cache: &cache, data: &data, absent: Vec::new() };
            let result = self.replayer.apply_entry(&entry, &mut source);
            // A fetch that found the connection gone: the entry is not applied, and nothing
            // after it may be acknowledged. It is replayed after the reconnect.
            if let Some(why) = self.fetcher.lost() {
                return Err(Stop::Lost(why));
            }
            match result {
                // A full disk or a busy state dir may recover: pause, then try again.
                Err(ReplayError::Io { .. } | ReplayError::Marks(_)) if attempt < LOCAL_RETRIES => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                }
                result => break (result, source.absent),
            }
        };
        if self.prefetched > 0 {
            self.cache = cache;
            self.data = data;
        }
        // Names the op itself leaves (the destination of a rename or link) are marked after
        // the pending set follows the op; the others before.
        let moves = matches!(entry.op, Op::Rename { .. } | Op::Link { .. });
        let rescan = matches!(entry.op, Op::Rescan { .. });
        match &result {
            Ok(Applied::Obsolete) | Err(ReplayError::Source { .. }) if !moves => self.pending.mark_op(&entry.op),
            Ok(Applied::NeedsResync { path }) if !moves && !rescan => self.pending.mark_diverged(path),
            _ => {}
        }
        self.pending.follow(&entry.op);
        // Asked after the op, by names valid after it: whatever the master no longer had (a
        // parent whose times were to be restored, a renamed file's data) is fetched from its
        // current name once the stream is idle.
        for p in absent {
            self.pending.insert(p.0, false);
        }
        match result {
            Ok(Applied::NeedsResync { path }) if rescan => {
                let reason = match &entry.op {
                    Op::Rescan { reason, .. } => reason.as_str(),
                    _ => "",
                };
                self.needs_resync
                    .get_or_insert(format!("the server lost track of changes under {:?} ({reason})", path.display()));
            }
            Ok(Applied::NeedsResync { path }) if moves => self.pending.mark_diverged(&path),
            Ok(Applied::Obsolete) | Err(ReplayError::Source { .. }) if moves => self.pending.mark_op(&entry.op),
            Ok(_) => {}
            // The master could not be read (it said so); the path is fetched again later.
            Err(ReplayError::Source { .. }) => {}
            // Refused and logged by the replayer; nothing was changed.
            Err(ReplayError::EscapesRoot { .. } | ReplayError::BadPath { .. } | ReplayError::BadOp { .. }) => {}
            // The state dir or the replica root is unusable: nothing can be made durable.
            Err(e @ (ReplayError::OpenRoot { .. } | ReplayError::NoOpenat2 | ReplayError::Marks(_))) => {
                return Err(Stop::Fatal(e.into()))
            }
            Err(e) => {
                self.needs_resync.get_or_insert(format!("seq {} could not be replayed ({e})", entry.seq));
            }
        }
        (self.events)(ClientEvent::Applied { seq: entry.seq, op: entry.op, at: Instant::now() });
        Ok(())
    }

    fn persist(&mut self, volume_id: VolumeId, seq: u64) -> Result<(), Stop> {
        // Replica first, then its marks (inside `sync`), then what is still pending, then the
        // record of what is applied: a crash between any two leaves a state that replays
        // correctly (pending paths are fetched from the master's current state, so one
        // saved ahead of its entry is merely fetched twice).
        self.replayer.sync().map_err(|e| Stop::Fatal(e.into()))?;
        self.pending.save(&self.pending_file).map_err(Stop::Fatal)?;
        self.state_file
            .store(&ClientState { volume_id: Some(volume_id), last_applied: Some(seq) })
            .map_err(Stop::Fatal)?;
        let pending = self.pending.paths.len();
        let _ = self.reports.send(Report::Persisted { seq, full_sync: self.finished_full.take(), pending });
        if let Some(why) = self.needs_resync.take() {
            let _ = self.reports.send(Report::Resync(why));
        }
        Ok(())
    }
}

impl Worker {
    /// A repair, made durable (the replica, then the pending set; the applied seq does not
    /// move).
    fn repair_and_sync(&mut self) -> Result<(), Stop> {
        self.repair()?;
        self.replayer.sync().map_err(|e| Stop::Fatal(e.into()))?;
        self.pending.save(&self.pending_file).map_err(Stop::Fatal)?;
        let _ = self.reports.send(Report::Pending(self.pending.paths.len()));
        if let Some(why) = self.needs_resync.take() {
            let _ = self.reports.send(Report::Resync(why));
        }
        Ok(())
    }

    /// Fetches every pending path the master has now, whole, from its current state: the
    /// data and attributes replay could not take when the master had already moved on.
    fn repair(&mut self) -> Result<(), Stop> {
        if self.pending.paths.is_empty() {
            return Ok(());
        }
        if self.pending.paths.len() > PENDING_MAX {
            self.pending.clear();
            self.needs_resync.get_or_insert(format!("over {PENDING_MAX} paths to fetch again"));
            return Ok(());
        }
        let paths: Vec<(Vec<u8>, bool)> = self.pending.paths.iter().map(|(p, d)| (p.clone(), *d)).collect();
        let mut dirs = Vec::new();
        for chunk in paths.chunks(protocol::MAX_ATTRS_PATHS) {
            let ask = chunk.iter().map(|(p, _)| RelPath(p.clone())).collect();
            let answer = match self.fetcher.rt.block_on(self.fetcher.attrs(ask)) {
                Ok(a) => a,
                Err(FetchFail::Lost(why)) => return Err(Stop::Lost(why)),
                Err(e) => {
                    log::warn!("cannot read the master's attributes of paths to fetch again: {e:?}");
                    continue;
                }
            };
            for ((path, diverged), attrs) in chunk.iter().zip(answer) {
                // Absent at the master: a later entry renames or removes it; keep it a while.
                let Some(attrs) = attrs.map(Attrs::from) else {
                    self.pending.missed(path);
                    continue;
                };
                let rel = RelPath(path.clone());
                match self.repair_one(&rel, &attrs, *diverged) {
                    Ok(true) => {
                        self.pending.remove(path);
                        if attrs.kind == crate::replay::FileKind::Directory {
                            dirs.push((rel, attrs));
                        }
                    }
                    Ok(false) => {
                        self.pending.remove(path);
                        self.needs_resync.get_or_insert(format!(
                            "the replica's {:?} differs from the server's in a way one path cannot repair",
                            rel.display()
                        ));
                    }
                    Err(e @ ReplayError::Source { .. }) => {
                        if let Some(why) = self.fetcher.lost() {
                            return Err(Stop::Lost(why));
                        }
                        log::warn!("cannot fetch {:?} again yet: {e}", rel.display());
                        self.pending.missed(path);
                    }
                    Err(e) => {
                        if let Some(why) = self.fetcher.lost() {
                            return Err(Stop::Lost(why));
                        }
                        self.pending.remove(path);
                        self.needs_resync.get_or_insert(format!("fetching {:?} again failed ({e})", rel.display()));
                    }
                }
            }
        }
        // Directories last, deepest first: what was placed inside them moved their times.
        for (path, a) in dirs.into_iter().rev() {
            let op = a.setattr_op(&path);
            if let Err(e) = self.replayer.apply(&op, &mut NetSource::new(&self.fetcher)) {
                log::warn!("cannot set the attributes of {:?}: {e}", path.display());
            }
        }
        if let Some(why) = self.fetcher.lost() {
            return Err(Stop::Lost(why));
        }
        Ok(())
    }

    /// Makes `path` what the master has now (`attrs`); false when that takes a full resync
    /// (a type the replica cannot change in place, or a directory of unknown content).
    fn repair_one(&mut self, path: &RelPath, a: &Attrs, diverged: bool) -> Result<bool, ReplayError> {
        use crate::replay::FileKind as K;
        if a.kind == K::Directory && diverged {
            return Ok(false);
        }
        let Some(ops) = a.recreate_ops(path) else { return Ok(false) };
        for op in ops {
            match self.replayer.apply(&op, &mut NetSource::new(&self.fetcher))? {
                Applied::NeedsResync { .. } => return Ok(false),
                Applied::Changed | Applied::AlreadyApplied | Applied::Obsolete => {}
            }
        }
        log::debug!("fetched {:?} again from the master's current state", path.display());
        Ok(true)
    }
}

fn parent_of(p: &RelPath) -> Option<RelPath> {
    let b = p.as_bytes();
    if b.is_empty() {
        return None;
    }
    Some(RelPath(b[..b.iter().rposition(|&c| c == b'/').unwrap_or(0)].to_vec()))
}

/// Paths whose replay could not take what it needed from the master, because the master had
/// already moved past them: a write to a file renamed since (`write tmp; rename tmp f`, or
/// any change followed by a rename of a parent directory), read when only the new name
/// exists. Replay reports those operations `Obsolete`, expecting a later entry to account
/// for them; a later rename moves the object but carries no data. So the driver keeps the
/// paths, follows them through the renames, links and removals that come after, and once
/// every entry received is durable and the stream has been idle for [`REPAIR_IDLE`] (so no
/// entry still to come moves these names) fetches whatever the master has there, whole.
/// Under changes that never pause, the repair waits for the first pause: fetching earlier
/// would put the master's current content under names later entries still move.
/// `true` marks a path where the replica was found to differ (`NeedsResync`): a directory
/// there needs a full resync, its content being unknown.
#[derive(Debug, Default)]
struct Pending {
    paths: std::collections::BTreeMap<Vec<u8>, bool>,
    /// Consecutive repairs at which the master had nothing at a path; past
    /// [`PENDING_MISSES`] it is dropped (nothing at that name needs fetching).
    misses: HashMap<Vec<u8>, u32>,
    /// Changed since last saved.
    changed: bool,
}

impl Pending {
    fn load(file: &Path) -> Pending {
        let mut p = Pending::default();
        let Ok(text) = std::fs::read_to_string(file) else { return p };
        for line in text.lines() {
            let (flag, hex_path) = line.split_at(line.len().min(1));
            if let Ok(path) = hex::decode(hex_path.trim()) {
                p.paths.insert(path, flag == "d");
            }
        }
        p
    }

    /// Saves the set durably when it changed (removes the file when empty).
    fn save(&mut self, file: &Path) -> Result<(), ClientError> {
        if !self.changed {
            return Ok(());
        }
        let err = |action, error| ClientError::State { action, path: file.to_path_buf(), error };
        if self.paths.is_empty() {
            match std::fs::remove_file(file) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(err("remove", e)),
            }
        } else {
            let mut text = String::new();
            for (path, diverged) in &self.paths {
                text.push(if *diverged { 'd' } else { 'p' });
                text.push_str(&hex::encode(path));
                text.push('\n');
            }
            let tmp = file.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp).map_err(|e| err("write", e))?;
            f.write_all(text.as_bytes()).map_err(|e| err("write", e))?;
            f.sync_all().map_err(|e| err("fsync", e))?;
            std::fs::rename(&tmp, file).map_err(|e| err("replace", e))?;
        }
        let dir = file.parent().unwrap_or(Path::new("."));
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| err("fsync the directory of", e))?;
        self.changed = false;
        Ok(())
    }

    fn clear(&mut self) {
        if !self.paths.is_empty() {
            self.changed = true;
        }
        self.paths.clear();
        self.misses.clear();
    }

    fn insert(&mut self, path: Vec<u8>, diverged: bool) {
        let e = self.paths.entry(path).or_insert(false);
        *e |= diverged;
        self.changed = true;
    }

    fn remove(&mut self, path: &[u8]) {
        self.misses.remove(path);
        if self.paths.remove(path).is_some() {
            self.changed = true;
        }
    }

    /// The master had nothing at `path` at a repair.
    fn missed(&mut self, path: &[u8]) {
        let n = self.misses.entry(path.to_vec()).or_insert(0);
        *n += 1;
        if *n >= PENDING_MISSES {
            self.remove(path);
        }
    }

    /// The path an `Obsolete` op could not finish.
    fn mark_op(&mut self, op: &Op) {
        match op {
            Op::Unlink { .. } | Op::Rmdir { .. } | Op::Rescan { .. } => {}
            Op::Rename { path, new_path, exchange, .. } => {
                self.insert(new_path.0.clone(), false);
                if *exchange {
                    self.insert(path.0.clone(), false);
                }
            }
            Op::Link { new_path, .. } => self.insert(new_path.0.clone(), false),
            other => self.insert(other.path().0.clone(), false),
        }
    }

    /// A path where replay found the replica diverged. Within a pending subtree this is
    /// expected (the objects there were never placed) and fetching them is enough.
    fn mark_diverged(&mut self, path: &RelPath) {
        let covered = self.covers(path.as_bytes());
        self.insert(path.0.clone(), !covered);
    }

    /// Whether `path` or one of its ancestors is pending.
    fn covers(&self, path: &[u8]) -> bool {
        let mut p = path;
        loop {
            if self.paths.contains_key(p) {
                return true;
            }
            match p.iter().rposition(|&b| b == b'/') {
                Some(i) => p = &p[..i],
                None => return false,
            }
        }
    }

    /// Takes out `prefix` and every pending path beneath it, as (suffix, flag).
    fn take_subtree(&mut self, prefix: &[u8]) -> Vec<(Vec<u8>, bool)> {
        let mut out = Vec::new();
        self.misses.remove(prefix);
        if let Some(d) = self.paths.remove(prefix) {
            out.push((Vec::new(), d));
        }
        let mut lo = prefix.to_vec();
        lo.push(b'/');
        let mut hi = prefix.to_vec();
        hi.push(b'/' + 1);
        let keys: Vec<Vec<u8>> = self.paths.range(lo..hi).map(|(k, _)| k.clone()).collect();
        for k in keys {
            self.misses.remove(&k);
            if let Some(d) = self.paths.remove(&k) {
                out.push((k[prefix.len()..].to_vec(), d));
            }
        }
        if !out.is_empty() {
            self.changed = true;
        }
        out
    }

    fn put_subtree(&mut self, prefix: &[u8], items: Vec<(Vec<u8>, bool)>) {
        for (suffix, d) in items {
            let mut p = prefix.to_vec();
            p.extend_from_slice(&suffix);
            self.insert(p, d);
        }
    }

    /// Follows a namespace entry: pending paths move with renames, are copied by links and
    /// dropped with removals.
    fn follow(&mut self, op: &Op) {
        if self.paths.is_empty() {
            return;
        }
        match op {
            Op::Rename { path, new_path, exchange: false, .. } => {
                // Whatever was at the destination is replaced.
                self.take_subtree(new_path.as_bytes());
                let moved = self.take_subtree(path.as_bytes());
                self.put_subtree(new_path.as_bytes(), moved);
            }
            Op::Rename { path, new_path, exchange: true, .. } => {
                let a = self.take_subtree(path.as_bytes());
                let b = self.take_subtree(new_path.as_bytes());
                self.put_subtree(new_path.as_bytes(), a);
                self.put_subtree(path.as_bytes(), b);
            }
            Op::Link { path, new_path } => {
                if let Some(&d) = self.paths.get(path.as_bytes()) {
                    self.insert(new_path.0.clone(), d);
                }
            }
            Op::Unlink { path } => self.remove(path.as_bytes()),
            Op::Rmdir { path } => {
                self.take_subtree(path.as_bytes());
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rename(from: &str, to: &str, exchange: bool) -> Op {
        Op::Rename { path: from.into(), new_path: to.into(), exchange, noreplace: false }
    }

    fn paths(p: &Pending) -> Vec<String> {
        p.paths.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect()
    }

    #[test]
    fn a_pending_path_follows_renames_of_itself_and_of_its_parents() {
        let mut p = Pending::default();
        p.mark_op(&Op::Write { path: "d/tmp".into(), offset: 0, len: 3, source: None, mode: None, ino: None });
        p.follow(&rename("d/tmp", "d/file", false));
        assert_eq!(paths(&p), ["d/file"]);
        p.follow(&rename("d", "e", false));
        assert_eq!(paths(&p), ["e/file"]);
        // A sibling whose name shares the prefix is not beneath it.
        p.insert(b"e-x".to_vec(), false);
        p.follow(&rename("e", "f", false));
        assert_eq!(paths(&p), ["e-x", "f/file"]);
    }

    #[test]
    fn an_exchange_swaps_pending_subtrees() {
        let mut p = Pending::default();
        p.insert(b"a/x".to_vec(), false);
        p.insert(b"b".to_vec(), true);
        p.follow(&rename("a", "b", true));
        assert_eq!(paths(&p), ["a", "b/x"]);
        assert_eq!(p.paths.get(b"a".as_slice()), Some(&true), "the flag travels with its object");
    }

    #[test]
    fn removals_drop_pending_paths_and_a_rename_over_a_name_drops_what_was_there() {
        let mut p = Pending::default();
        for path in ["d/a", "d/b/c", "f", "g", "h"] {
            p.insert(path.as_bytes().to_vec(), false);
        }
        p.follow(&Op::Rmdir { path: "d".into() });
        p.follow(&Op::Unlink { path: "f".into() });
        assert_eq!(paths(&p), ["g", "h"]);
        p.follow(&rename("g", "h", false));
        assert_eq!(paths(&p), ["h"]);
        p.follow(&Op::Link { path: "h".into(), new_path: "k".into() });
        assert_eq!(paths(&p), ["h", "k"]);
    }

    #[test]
    fn a_path_absent_at_every_repair_is_eventually_dropped() {
        let mut p = Pending::default();
        p.insert(b"gone".to_vec(), false);
        for _ in 1..PENDING_MISSES {
            p.missed(b"gone");
        }
        assert_eq!(paths(&p), ["gone"]);
        p.missed(b"gone");
        assert!(p.paths.is_empty());
    }

    #[test]
    fn the_pending_set_survives_save_and_load_and_an_empty_set_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(PENDING_FILE);
        let mut p = Pending::default();
        p.insert(b"a/b".to_vec(), false);
        p.insert(vec![b'n', 0xff, b'/', b'x'], true);
        p.save(&file).unwrap();
        let back = Pending::load(&file);
        assert_eq!(back.paths, p.paths);
        p.clear();
        p.save(&file).unwrap();
        assert!(!file.exists());
    }
}
