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

mod durable;
mod fetch;
mod full_sync;
mod path_set;
mod pending;
mod session;
mod state;
mod worker;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::attrs::{Attrs, FileKind};
use crate::config::ClientOptions;
use crate::identity::{Identity, IdentityError};
use crate::op::{JournalEntry, Op, RelPath};
use crate::protocol::{
    self, ClientOutput, ClientSession, ClientState, CloseReason, FetchEvent, FetchExchange,
    Links, ManifestEntry, Msg, VolumeId,
};
use crate::replay::{Applied, DataSource, MarkStore, Recovered, ReplayError, Replayer};
use crate::transport::{self, TransportError};

pub use full_sync::FullSyncStats;
pub use state::StateFile;

use durable::*;
use fetch::*;
use pending::*;
use session::*;
use worker::*;

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
/// A batch closes once its entries hold this much memory (inline file content mostly).
const MANIFEST_BATCH_BYTES: usize = 1 << 20;
/// Most memory of manifest entries queued for the worker (entries and their inline
/// content): `WORK_QUEUE` batches of content would be a gigabyte. 4 MiB keeps the worker fed
/// as well as 16 did (50k small files, same time) with a peak RSS 10 MiB lower.
const MANIFEST_QUEUE_BYTES: usize = 4 << 20;
/// Most bytes taken from a stream per read.
const READ_CHUNK: usize = 256 << 10;
/// Repairs wait for the stream to be idle this long: with the master ahead, names that
/// later entries will still move must not be filled with the master's current content.
/// Entries arrive within milliseconds of their change (lag p99 under 25 ms at 10 000
/// changes a second), so half a second without one means the master has paused. A file
/// written under a temporary name and renamed (how PostgreSQL, editors and package managers
/// save) no longer waits for it: its bytes are read where the renames put it (`names.rs`,
/// [`Worker::follow_moved_writes`]); what still does is a file whose name another object
/// took before its rename reached the client.
const REPAIR_IDLE: Duration = Duration::from_millis(500);
/// "in sync" is printed at most this often.
const IN_SYNC_EVERY: Duration = Duration::from_secs(1);
/// Durable points (a sync of the replica, its marks and the applied seq, then the `Ack`)
/// are at most this frequent: a steady stream of small batches shares one instead of paying
/// three fsyncs each. It delays only the acknowledgement: entries are applied, and visible
/// on the replica, as soon as they arrive; the first durable point after a quiet spell is
/// taken at once. 100 ms: at 1 000 changes a second the durable points (three fsyncs each)
/// were still a sixth of the client's CPU at 10 ms, and 100 ms took 13% off the client's
/// CPU against 25 ms (0.77 against 0.89 CPU s per 10 000 changes, three alternated runs on
/// 12-07). What it costs: a client killed replays up to 100 ms of entries again
/// (idempotent), and the server keeps them that much longer.
const PERSIST_EVERY: Duration = Duration::from_millis(100);
/// Full syncs asked in a row because the walk before raced with changes: under changes
/// that never pause long enough for a walk, the client goes on from the last one (its
/// differences then wait for the next full sync or repair).
const MAX_VERIFICATIONS: u32 = 2;
/// Entries whose paths are fetched ahead in one round trip.
const PREFETCH_ENTRIES: usize = 256;
/// Writes renamed away before their rename arrived, followed at once (past this many, the
/// others wait for the pending repair at the next pause).
const MOVED_WRITES_MAX: usize = 4096;
/// Files at most this large that queued entries write are fetched ahead, whole.
const PREFETCH_DATA_MAX: u64 = 256 << 10;
/// Larger files' written ranges at most this long are fetched ahead...
const PREFETCH_RANGE_MAX: u64 = 1 << 20;
/// ...up to this many bytes for one batch of queued entries.
const PREFETCH_RANGE_BYTES: u64 = 64 << 20;
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
    State {
        action: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error(
        "the client state {} is damaged ({reason}): move it aside and restart the client, which then resyncs in full",
        path.display()
    )]
    StateCorrupt { path: PathBuf, reason: String },
    #[error("the replay worker stopped unexpectedly ({0}); this is a bug: restart the client, and please report it")]
    Worker(String),
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
    if recovered.is_some() && state.last_applied.is_some() {
        // The marks' loss is known at this open only: owed durably, so that a client killed
        // before the full sync begins still makes it at the next start.
        state.last_applied = None;
        state_file.store(&state)?;
    }
    let mut replayer = Some(r);
    let mut force_full: Option<String> = recovered;
    let endpoint = transport::client_endpoint(&identity).map_err(ClientError::Transport)?;
    log::info!(
        "client {} replicating {} into {}; durable state: volume {}, last applied {}",
        identity.id,
        opts.server,
        root.display(),
        state
            .volume_id
            .map_or_else(|| "none".to_string(), hex::encode),
        state
            .last_applied
            .map_or_else(|| "none".to_string(), |s| s.to_string())
    );
    tokio::pin!(shutdown);
    let mut backoff = MIN_BACKOFF;
    let verifications = AtomicU32::new(0);
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
                e @ (TransportError::Tls { .. }
                | TransportError::Bind { .. }
                | TransportError::Connect { .. }),
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
                let reason = format!(
                    "no answer from {} within {}s",
                    opts.server,
                    CONNECT_TIMEOUT.as_secs()
                );
                if wait_retry(&events, &mut backoff, reason, &mut shutdown).await {
                    break Ok(());
                }
                continue;
            }
        };
        events(ClientEvent::Connected {
            server: opts.server,
        });
        let mut hello = state;
        if let Some(why) = force_full.take() {
            log::info!("resyncing in full: {why}");
            hello.last_applied = None;
        }
        let Some(r) = replayer.take() else {
            break Err(ClientError::Worker("the replayer was lost".into()));
        };
        let ctx = SessionCtx {
            conn: &conn,
            root: &root,
            state_dir: &opts.state,
            state_file: &state_file,
            events: &events,
            verifications: &verifications,
        };
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
            Outcome::Lost {
                reason,
                streamed,
                immediate,
            } => {
                events(ClientEvent::Disconnected {
                    reason: reason.clone(),
                });
                if streamed {
                    backoff = MIN_BACKOFF;
                }
                // A connection that streamed before it broke is retried at once (the
                // server restarted, or the network blinked); one that failed early backs off.
                if !(streamed || immediate)
                    && wait_retry(&events, &mut backoff, reason, &mut shutdown).await
                {
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
    events(ClientEvent::Unreachable {
        retry_in: wait,
        reason,
    });
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    tokio::select! {
        () = shutdown.as_mut() => true,
        () = tokio::time::sleep(wait) => false,
    }
}

/// Opens the replayer on the replica with its sequence marks in the state dir. Also
/// returns a reason to resync in full when the marks of the last unsynced batch were lost
/// to a machine restart (replaying it again by presence alone may leave differences).
async fn open_replayer(
    root: &Path,
    state: &Path,
) -> Result<(Replayer, Option<String>), ClientError> {
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
    let root_err = |error| ClientError::Root {
        path: opts.root.clone(),
        error,
    };
    match std::fs::symlink_metadata(&opts.root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(root_err(io::Error::from_raw_os_error(libc::ENOTDIR))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&opts.root).map_err(root_err)?
        }
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
