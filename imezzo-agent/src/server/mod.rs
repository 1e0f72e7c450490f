//! The server agent (`imezzo server`): capture → journal → one QUIC session per client.
//!
//! What runs, and why in this order at start:
//! 1. the node identity is loaded and the journal opened (`<state>/journal.redb`);
//! 2. capture starts on a thread of its own: the probes are attached, then the inode table
//!    walks the tree. From here on every change is journalled, so any later walk (a
//!    client's manifest) can only miss what the journal will deliver after it;
//! 3. the QUIC endpoint is bound; only now is the server "ready".
//!
//! The capture thread runs [`Capture::run_batches`] and appends each batch (one drain of the
//! ring buffer, ~2 ms of changes) to the journal as one group commit, then publishes the
//! journal's last seq on a `watch` channel that wakes every session. A failed append stops
//! the server: redb refuses writes after an I/O error, and carrying on would drop changes.
//!
//! Per connection, a task completes the pinned handshake, then owns a [`ServerSession`] (the
//! protocol's state machine) for the control stream: it feeds it the stream's bytes, the
//! journal's growth and the time, and carries out what it asks: journal reads on the
//! blocking pool, the manifest walk on a blocking thread (through a bounded channel, so a
//! slow client stalls the walk rather than grow the server). Fetch streams are served by
//! their own tasks, one per stream: a fetch reads the master file's *current* bytes when it
//! is asked (InterMezzo's rule), skipping holes, in 1 MiB chunks.
//!
//! A compaction task bounds the journal to `--retain-bytes`.

mod admission;
mod catchup;
mod export;

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::attrs::{Attrs, FileKind};
use crate::capture::{self, Capture, CaptureConfig, CaptureError, CaptureStats, CaptureWaker, NamesAsker, NamesQuery, NamesServed};
use crate::config::ServerOptions;
use crate::identity::{Identity, IdentityError, NodeId};
use crate::journal::{Journal, JournalError};
use crate::op::{Op, RelPath};
use crate::protocol::{
    self, Attached, CloseReason, FetchRequest, FetchRequestReader, JournalRead, Links, ManifestEntry, Msg,
    ServerOutput, ServerSession, Start, VolumeId, DATA_CHUNK, MAX_LINK_NAMES,
};
use crate::transport::{self, TransportError};

/// How often the journal's size is checked against the retention bound.
const COMPACT_CHECK: Duration = Duration::from_secs(1);
/// How often compaction runs for supersession alone, when retention does not force it: a
/// compaction scans every retained entry.
const SUPERSEDE_EVERY: Duration = Duration::from_secs(600);
/// A disconnected client's retention floor is kept this long (it may be reconnecting).
const FLOOR_GRACE: Duration = Duration::from_secs(600);
/// Compaction keeps what clients need up to this many times `retain_bytes`.
const FLOOR_HOLD_FACTOR: u64 = 4;
/// While clients hold the journal above `retain_bytes`, compaction re-plans this often.
const HELD_REPLAN: Duration = Duration::from_secs(10);
/// A journal read of at most this many entries (a client keeping up with the tail) runs on
/// the session's task; a longer one on the blocking pool.
const INLINE_READ_ENTRIES: u64 = 64;
/// Most manifest entries, and inline data bytes, per chunk handed from the walk to the
/// session.
const MANIFEST_CHUNK: export::WalkChunk = export::WalkChunk {
    entries: 256,
    data: 512 << 10,
};
/// Most bytes taken from a stream per read.
const READ_CHUNK: usize = 64 << 10;
/// File bytes read per hand-off to the blocking pool when answering a fetch.
const READ_BATCH: usize = 4 << 20;
/// A client must open its control stream within this after the handshake.
const CONTROL_STREAM_WAIT: Duration = Duration::from_secs(10);
/// Longest reason text put in a CONNECTION_CLOSE (it must fit one packet).
const CLOSE_TEXT_MAX: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("cannot start capturing changes under {}: {error}", export.display())]
    Capture {
        export: PathBuf,
        error: CaptureError,
    },
    #[error("cannot open the exported directory {}: {error}; give an existing directory to --export", path.display())]
    Export {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(
        "the journal failed to record changes ({0}); the server stopped so that no change goes unrecorded: fix \
         the cause (free space, dmesg), then restart it; clients resume where they were"
    )]
    JournalAppend(String),
    #[error("the capture thread stopped unexpectedly ({0}); this is a bug: restart the server, and please report it")]
    CaptureThread(String),
    #[error("cannot use {}: {error}; check the permissions and free space of the state dir", path.display())]
    Mark {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// A running server: capture is journalling and the endpoint is bound.
pub struct Server {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    id: NodeId,
    shared: Arc<Shared>,
    retain_bytes: u64,
    capture: CaptureThread,
}

/// What every connection task reads.
struct Shared {
    journal: Arc<Journal>,
    export: Arc<export::Export>,
    volume: VolumeId,
    /// The journal's last seq, published after each append.
    appended: watch::Receiver<u64>,
    /// Per client, the lowest seq its session still needs (`ServerSession::retention_floor`)
    /// and, once it disconnected, when: compaction keeps those entries (see [`compact_loop`]).
    floors: std::sync::Mutex<std::collections::HashMap<NodeId, (u64, Option<Instant>)>>,
    /// Connections held, per node and in all (admission.rs).
    admission: admission::Admission,
    /// Asks the capture thread which names an inode has (for `FetchAttrs` with `links`).
    names: NamesAsker,
}

impl Shared {
    fn set_floor(&self, id: NodeId, floor: Option<u64>) {
        if let Some(f) = floor {
            if let Ok(mut m) = self.floors.lock() {
                m.insert(id, (f, None));
            }
        }
    }

    fn disconnected(&self, id: NodeId) {
        if let Ok(mut m) = self.floors.lock() {
            if let Some(e) = m.get_mut(&id) {
                e.1 = Some(Instant::now());
            }
        }
    }

    /// The lowest seq a connected (or lately connected) client still needs.
    fn retention_floor(&self) -> Option<u64> {
        let mut m = self.floors.lock().ok()?;
        m.retain(|_, (_, gone)| gone.is_none_or(|t| t.elapsed() < FLOOR_GRACE));
        m.values().map(|(f, _)| *f).min()
    }
}

impl Server {
    /// Loads the identity, opens the journal, starts capture, then binds the endpoint.
    pub async fn start(opts: &ServerOptions) -> Result<Server, ServerError> {
        let identity = Identity::load(&opts.state)?;
        let state = opts.state.clone();
        let journal_existed = catchup::journal_exists(&opts.state);
        let journal = Arc::new(blocking(move || Journal::open(&state)).await??);
        let export_root =
            std::fs::canonicalize(&opts.export).map_err(|error| ServerError::Export {
                path: opts.export.clone(),
                error,
            })?;
        let export =
            Arc::new(
                export::Export::open(&export_root).map_err(|error| ServerError::Export {
                    path: export_root.clone(),
                    error,
                })?,
            );
        let (appended_tx, appended) = watch::channel(journal.last_seq());
        let (names, names_rx) = capture::names_channel().map_err(|e| ServerError::CaptureThread(format!("cannot make its eventfd: {e}")))?;
        let capture = CaptureThread::start(
            export_root.clone(),
            export.clone(),
            opts.state.clone(),
            journal_existed,
            journal.clone(),
            appended_tx,
            names_rx,
        )
        .await?;
        let endpoint = transport::server_endpoint(&identity, opts.listen, opts.allow.clone())?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|error| TransportError::Bind {
                addr: opts.listen,
                error,
            })?;
        let volume = protocol::volume_id(journal.volume_id());
        log::info!(
            "journal {} (volume {}) at seq {}, retaining {} bytes",
            journal.path().display(),
            hex::encode(volume),
            journal.last_seq(),
            opts.retain_bytes
        );
        Ok(Server {
            endpoint,
            local_addr,
            id: identity.id,
            shared: Arc::new(Shared {
                journal,
                export,
                volume,
                appended,
                floors: Default::default(),
                admission: admission::Admission::default(),
                names,
            }),
            retain_bytes: opts.retain_bytes,
            capture,
        })
    }

    /// The address the endpoint is bound to (the real port when `--listen` said 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// This server's node id, the one clients pass as `--server-id`.
    pub fn node_id(&self) -> NodeId {
        self.id
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.shared.journal
    }

    /// Serves clients until `shutdown` completes (then closes every connection with code 0
    /// and stops capture, journalling what it already saw) or the journal fails.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        tokio::pin!(shutdown);
        let mut sessions = JoinSet::new();
        let compactor = tokio::spawn(compact_loop(self.shared.clone(), self.retain_bytes));
        let mut failed = self.capture.failed.clone();
        let result = loop {
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                changed = failed.changed() => {
                    let reason = failed.borrow().clone();
                    match (changed, reason) {
                        (Ok(()), Some(reason)) => break Err(ServerError::JournalAppend(reason)),
                        (Ok(()), None) => {}
                        (Err(_), _) => break Err(ServerError::CaptureThread("it ended on its own".into())),
                    }
                }
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) if sessions.len() >= admission::TOTAL + admission::HANDSHAKES => {
                        crate::report!(Warn, "server: connection attempts refused (too many at once)",
                            "refused a connection attempt from {}: {} connections and handshakes in progress",
                            incoming.remote_address(), sessions.len());
                        incoming.refuse();
                    }
                    Some(incoming) => {
                        sessions.spawn(serve_connection(incoming, self.shared.clone()));
                    }
                    None => break Ok(()),
                },
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        };
        compactor.abort();
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"the server is shutting down");
        sessions.shutdown().await;
        let capture = std::mem::replace(&mut self.capture, CaptureThread::stopped());
        let stats = blocking(move || capture.stop()).await.unwrap_or_default();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        log::info!(
            "server stopped: journal at seq {}; capture saw {} events, {} drops, {} rescans, {} files' write ranges coarsened",
            self.shared.journal.last_seq(),
            stats.events,
            stats.drops,
            stats.rescans,
            stats.coarsened
        );
        result
    }
}

/// Runs blocking work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServerError::CaptureThread(format!("a blocking task failed: {e}")))
}

/// The capture loop on its own OS thread: it polls the ring buffer every 2 ms (every 100 ms
/// once idle, woken by the probes) and must not share a thread with anything that can stall
/// it.
struct CaptureThread {
    stop: Arc<AtomicBool>,
    /// Rung at stop: an idle capture loop sleeps long.
    waker: Option<CaptureWaker>,
    thread: Option<std::thread::JoinHandle<CaptureStats>>,
    /// Set once, with the reason, when an append fails.
    failed: watch::Receiver<Option<String>>,
}

impl CaptureThread {
    async fn start(
        root: PathBuf,
        export: Arc<export::Export>,
        state: PathBuf,
        journal_existed: bool,
        journal: Arc<Journal>,
        appended: watch::Sender<u64>,
        names: NamesServed,
    ) -> Result<CaptureThread, ServerError> {
        let stop = Arc::new(AtomicBool::new(false));
        let waker = names.waker();
        let (failed_tx, failed) = watch::channel(None);
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), ServerError>>();
        let flag = stop.clone();
        // Capture is built on its thread: it owns kernel objects and never leaves it.
        let thread = std::thread::Builder::new()
            .name("imezzo-capture".into())
            .spawn(move || {
                let started = (|| {
                    let mark = catchup::CapturedThrough::open(&state, journal.volume_id())
                        .map_err(|error| ServerError::Mark { path: state.join(catchup::FILE_NAME), error })?;
                    let plan = catchup::Plan::new(mark.read(), journal_existed, SystemTime::now());
                    let mut cfg = CaptureConfig::new(&root);
                    cfg.changed_since = plan.changed_since();
                    let attached = SystemTime::now();
                    let mut cap = Capture::start(&cfg)
                        .map_err(|error| ServerError::Capture { export: root.clone(), error })?;
                    cap.serve_names(names);
                    let changed = cap.take_changed().unwrap_or_default();
                    let (ops, line) = catchup::ops(plan, &changed, &export);
                    if let Some(line) = line {
                        log::warn!("catch-up: {line}: journalling {} entries for the clients", ops.len());
                    }
                    // Before any client is accepted, so a resuming client sees them first.
                    let seqs = journal.append(ops)?;
                    if !seqs.is_empty() {
                        appended.send_replace(seqs.end - 1);
                    }
                    // Everything before the probes were attached is now journalled, or
                    // (a new journal) in every client's full-sync manifest.
                    mark.write(attached).map_err(|error| ServerError::Mark { path: mark.path().to_owned(), error })?;
                    Ok((cap, mark))
                })();
                let (mut cap, mark) = match started {
                    Ok(started) => started,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return CaptureStats::default();
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let mut broken = false;
                let mut mark_failed = false;
                cap.run_batches(&flag, &mut |batch, through| {
                    if broken {
                        return;
                    }
                    let ops: Vec<Op> = batch.into_iter().map(|e| e.op).collect();
                    match journal.append(ops) {
                        Ok(seqs) if !seqs.is_empty() => {
                            appended.send_replace(seqs.end - 1);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            broken = true;
                            flag.store(true, Ordering::Relaxed);
                            failed_tx.send_replace(Some(e.to_string()));
                            return;
                        }
                    }
                    // Only after the batch is durable: the mark claims it is journalled.
                    if let Err(e) = mark.write(through) {
                        if !mark_failed {
                            log::warn!(
                                "cannot record capture progress in {} ({e}): a restart will compare the whole tree",
                                mark.path().display()
                            );
                            mark_failed = true;
                        }
                    }
                });
                cap.stats()
            })
            .map_err(|e| ServerError::CaptureThread(format!("cannot start it: {e}")))?;
        let mut this = CaptureThread {
            stop,
            waker: Some(waker),
            thread: Some(thread),
            failed,
        };
        match ready_rx.await {
            Ok(Ok(())) => Ok(this),
            Ok(Err(error)) => {
                this.join();
                Err(error)
            }
            Err(_) => {
                this.join();
                Err(ServerError::CaptureThread(
                    "it panicked while starting".into(),
                ))
            }
        }
    }

    fn stopped() -> CaptureThread {
        CaptureThread {
            stop: Arc::new(AtomicBool::new(true)),
            waker: None,
            thread: None,
            failed: watch::channel(None).1,
        }
    }

    /// Stops capture (it journals what the kernel already delivered) and waits for it.
    fn stop(mut self) -> CaptureStats {
        self.join()
    }

    fn join(&mut self) -> CaptureStats {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(waker) = &self.waker {
            waker.wake();
        }
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for CaptureThread {
    fn drop(&mut self) {
        self.join();
    }
}

/// Bounds the journal: whenever its entries exceed `retain_bytes`, and every
/// [`SUPERSEDE_EVERY`] for superseded entries alone. Entries a connected client (or one
/// disconnected less than [`FLOOR_GRACE`] ago) still needs are kept, up to
/// [`FLOOR_HOLD_FACTOR`] times `retain_bytes`: past that the slowest client is let go and
/// resyncs in full when it comes back.
async fn compact_loop(shared: Arc<Shared>, retain_bytes: u64) {
    let journal = shared.journal.clone();
    let mut last_full = Instant::now();
    let mut held_logged = false;
    let mut last_held = Instant::now();
    loop {
        tokio::time::sleep(COMPACT_CHECK).await;
        let j = journal.clone();
        let due = last_full.elapsed() >= SUPERSEDE_EVERY;
        let floor = shared.retention_floor();
        // While a client holds the journal above `retain_bytes`, each round would plan the
        // whole journal again for little: re-plan at most every HELD_REPLAN.
        let held_recently = held_logged && last_held.elapsed() < HELD_REPLAN;
        let run = tokio::task::spawn_blocking(move || -> Result<Option<_>, JournalError> {
            let stored = j.stored_bytes()?;
            let hold = retain_bytes.saturating_mul(FLOOR_HOLD_FACTOR);
            if (stored > retain_bytes && !(held_recently && stored <= hold)) || due {
                let keep = floor.filter(|_| stored <= hold);
                return j.compact_keeping(retain_bytes, keep).map(|r| Some((r, stored, keep)));
            }
            Ok(None)
        })
        .await;
        let run = match run {
            Ok(Ok(Some((r, stored, keep)))) => {
                if keep.is_some() && r.stored_bytes > retain_bytes {
                    last_held = Instant::now();
                    if !held_logged {
                        log::info!(
                            "journal above --retain-bytes ({} bytes of {retain_bytes}): keeping entries from seq {} for a connected client",
                            r.stored_bytes,
                            keep.unwrap_or_default()
                        );
                        held_logged = true;
                    }
                } else {
                    held_logged = false;
                }
                if floor.is_some() && keep.is_none() {
                    log::warn!(
                        "journal at {stored} bytes, over {FLOOR_HOLD_FACTOR} times --retain-bytes: dropping entries a slow client still needs (it resyncs in full)"
                    );
                }
                Ok(Ok(Some(r)))
            }
            other => other.map(|o| o.map(|o| o.map(|(r, _, _)| r))),
        };
        match run {
            Ok(Ok(Some(r))) => {
                last_full = Instant::now();
                if r.superseded + r.expired > 0 {
                    log::info!(
                        "journal compacted: {} superseded and {} expired entries dropped; first retained seq {}, {} bytes",
                        r.superseded,
                        r.expired,
                        r.first_seq,
                        r.stored_bytes
                    );
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => log::error!("journal compaction failed: {e}"),
            Err(e) => log::error!("journal compaction stopped: {e}"),
        }
    }
}

// ---- one connection -------------------------------------------------------------------

async fn serve_connection(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let addr = incoming.remote_address();
    let (conn, id) = match transport::accept(incoming).await {
        Ok(accepted) => accepted,
        // The verifier has already logged the refused id and what to do.
        Err(e @ TransportError::ClientNotAllowed { .. }) => return log::debug!("{e}"),
        Err(e) => return crate::report!(Warn, "server: connection attempts that failed", "{e}"),
    };
    let _slot = match shared.admission.admit(id) {
        Ok(slot) => slot,
        Err(why) => {
            crate::report!(Warn, "server: connections refused (too many per node or in all)", "refused a connection of client {id}: {why}");
            let reason = CloseReason::Refused { reason: why };
            return close(&conn, id, &reason);
        }
    };
    crate::report!(Info, "server: client connections", "client {id} connected from {addr}");
    let outcome = control(&conn, id, &shared).await;
    shared.disconnected(id);
    crate::report!(Info, "server: client disconnections", "client {id} disconnected: {outcome}");
}

/// Closes the connection with the session's reason, and logs it when it is a fault.
fn close(conn: &quinn::Connection, id: NodeId, reason: &CloseReason) {
    let mut text = reason.to_string();
    if text.len() > CLOSE_TEXT_MAX {
        let mut cut = CLOSE_TEXT_MAX;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    match reason {
        CloseReason::Violation { .. }
        | CloseReason::Internal { .. }
        | CloseReason::VersionMismatch { .. } => {
            log::warn!("closing the connection of client {id}: {reason}")
        }
        _ => log::debug!("closing the connection of client {id}: {reason}"),
    }
    conn.close(quinn::VarInt::from_u32(reason.code()), text.as_bytes());
}

enum WalkEvent {
    Entries(Vec<ManifestEntry>),
    End(export::WalkStats),
    Failed(String),
}

/// Walks the export on a blocking thread; a bounded channel makes a slow client stall the
/// walk instead of buffering the tree in memory.
fn start_walk(shared: Arc<Shared>, inline_data: bool) -> mpsc::Receiver<WalkEvent> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let walked = shared
            .export
            .walk(inline_data, MANIFEST_CHUNK, &mut |entries| {
                tx.blocking_send(WalkEvent::Entries(entries)).is_ok()
            });
        let _ = tx.blocking_send(match walked {
            Ok(stats) => WalkEvent::End(stats),
            Err(e) => WalkEvent::Failed(format!("{} ({e})", shared.export.root().display())),
        });
    });
    rx
}

/// Runs the control stream of one client; returns why it ended, for the log.
async fn control(conn: &quinn::Connection, id: NodeId, shared: &Arc<Shared>) -> String {
    let (mut send, mut recv) =
        match tokio::time::timeout(CONTROL_STREAM_WAIT, conn.accept_bi()).await {
            Err(_) => {
                let reason = CloseReason::Timeout {
                    what: "the client opened no control stream".into(),
                };
                close(conn, id, &reason);
                return reason.to_string();
            }
            Ok(Err(e)) => return format!("connection lost before its control stream ({e})"),
            Ok(Ok(streams)) => streams,
        };
    // Fetch streams come after the control stream (the client fetches only once welcomed),
    // so the first stream accepted above is the control stream.
    let fetches = AbortOnDrop(tokio::spawn(serve_fetches(
        conn.clone(),
        shared.clone(),
        id,
    )));
    let mut session = ServerSession::new(shared.volume, Instant::now());
    let mut appended = shared.appended.clone();
    let mut appended_open = true;
    session.handle_appended(Instant::now(), *appended.borrow_and_update());
    let mut read_job: Option<JoinHandle<(JournalRead, Attached)>> = None;
    let mut manifest: Option<mpsc::Receiver<WalkEvent>> = None;
    let mut manifest_started = Instant::now();
    loop {
        while let Some(out) = session.poll_output() {
            match out {
                ServerOutput::Send(msg) => {
                    log_sent(id, &msg);
                    let frame = match protocol::encode_bytes(&msg) {
                        Ok(frame) => frame,
                        Err(e) => {
                            let reason = CloseReason::Internal {
                                side: protocol::Side::Server,
                                detail: e.to_string(),
                            };
                            close(conn, id, &reason);
                            return reason.to_string();
                        }
                    };
                    if let Err(e) = send.write_chunk(frame).await {
                        return match e {
                            quinn::WriteError::ConnectionLost(c) => describe_close(&c),
                            e => format!("the control stream failed ({e})"),
                        };
                    }
                }
                ServerOutput::ReadJournal { from, max } => {
                    let s = shared.clone();
                    let job = move || {
                        let read = journal_read(s.journal.read_from(from, max));
                        // Read after the entries were journalled, so it is the master's
                        // state as of them or later (what the client would fetch).
                        let attached = match &read {
                            JournalRead::Entries(entries) => s.export.attach(entries),
                            _ => Attached::default(),
                        };
                        (read, attached)
                    };
                    if shared.journal.last_seq().saturating_sub(from) < INLINE_READ_ENTRIES {
                        // A client keeping up reads the few entries of the last batch: a
                        // read of the journal's cached pages and a few stats, cheaper here
                        // than the two thread hand-offs of the blocking pool.
                        let (read, attached) = job();
                        session.handle_journal_attached(Instant::now(), read, attached);
                    } else {
                        read_job = Some(tokio::task::spawn_blocking(job));
                    }
                }
                ServerOutput::StartManifest { inline_data } => {
                    // The seq before the walk: whatever the walk races with is journalled
                    // after it and streamed after the manifest (replay is idempotent).
                    let manifest_seq = shared.journal.last_seq();
                    session.handle_manifest_begin(Instant::now(), manifest_seq);
                    manifest_started = Instant::now();
                    manifest = Some(start_walk(shared.clone(), inline_data));
                }
                ServerOutput::Close(reason) => {
                    close(conn, id, &reason);
                    let _ = send.finish();
                    return reason.to_string();
                }
            }
        }
        shared.set_floor(id, session.retention_floor());
        let deadline = session.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            biased;
            chunk = recv.read_chunk(READ_CHUNK, true) => {
                let now = Instant::now();
                match chunk {
                    Ok(Some(chunk)) => session.handle_stream_data(now, &chunk.bytes),
                    Ok(None) => session.handle_stream_finished(now),
                    Err(quinn::ReadError::ConnectionLost(c)) => return describe_close(&c),
                    Err(e) => return format!("the control stream failed ({e})"),
                }
            }
            read = async { match read_job.as_mut() { Some(job) => job.await, None => std::future::pending().await } },
                if read_job.is_some() => {
                read_job = None;
                let (read, attached) = read.unwrap_or_else(|e| {
                    (JournalRead::Failed { reason: format!("the journal reader stopped ({e})") }, Attached::default())
                });
                session.handle_journal_attached(Instant::now(), read, attached);
            }
            event = async { match manifest.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } },
                if manifest.is_some() => {
                let now = Instant::now();
                match event {
                    Some(WalkEvent::Entries(entries)) => session.handle_manifest_entries(now, entries),
                    Some(WalkEvent::End(stats)) => {
                        manifest = None;
                        log::info!(
                            "client {id}: manifest of {} entries ({} bytes of files, {} files inline) sent in {:.1?}",
                            stats.entries + 1,
                            stats.bytes,
                            stats.inline_files,
                            manifest_started.elapsed()
                        );
                        // What was journalled while the walk ran tells the client it raced.
                        session.handle_appended(now, *appended.borrow_and_update());
                        session.handle_manifest_end(now);
                    }
                    Some(WalkEvent::Failed(reason)) => {
                        manifest = None;
                        session.handle_manifest_failed(now, &reason);
                    }
                    None => {
                        manifest = None;
                        session.handle_manifest_failed(now, "the walk stopped unexpectedly");
                    }
                }
            }
            changed = appended.changed(), if appended_open => match changed {
                Ok(()) => {
                    let last = *appended.borrow_and_update();
                    session.handle_appended(Instant::now(), last);
                }
                // Capture stopped: the server is shutting down and will close us.
                Err(_) => appended_open = false,
            },
            () = sleep_until(deadline), if deadline.is_some() => session.handle_timeout(Instant::now()),
            e = conn.closed() => {
                drop(fetches);
                return describe_close(&e);
            }
        }
    }
}

fn sleep_until(deadline: Option<tokio::time::Instant>) -> tokio::time::Sleep {
    tokio::time::sleep_until(
        deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)),
    )
}

fn describe_close(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason);
            if reason.is_empty() {
                format!("the client closed the connection (code {})", c.error_code)
            } else {
                format!("the client closed the connection: {reason}")
            }
        }
        quinn::ConnectionError::LocallyClosed => "closed here".into(),
        quinn::ConnectionError::TimedOut => "the client stopped answering (timed out)".into(),
        other => format!("connection lost ({other})"),
    }
}

fn log_sent(id: NodeId, msg: &Msg) {
    match msg {
        Msg::Welcome {
            start: Start::Resume { from_seq },
            ..
        } => crate::report!(Info, "server: clients resuming", "client {id}: resuming at seq {from_seq}"),
        Msg::Welcome {
            start: Start::FullSync { manifest_seq, why },
            ..
        } => {
            crate::report!(Info, "server: clients sent a full sync", "client {id}: full sync at seq {manifest_seq}: {why}")
        }
        Msg::Refuse { reason } => crate::report!(Warn, "server: clients refused", "client {id}: refused: {reason}"),
        _ => {}
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---- fetch streams --------------------------------------------------------------------

async fn serve_fetches(conn: quinn::Connection, shared: Arc<Shared>, id: NodeId) {
    // Each stream has its own task, so a large file does not hold up the small ones; QUIC's
    // stream limit (transport.rs) bounds how many run at once.
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(serve_fetch(conn.clone(), send, recv, shared.clone(), id));
    }
}

async fn serve_fetch(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: Arc<Shared>,
    id: NodeId,
) {
    let mut reader = FetchRequestReader::new();
    let request = loop {
        match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => match reader.handle_stream_data(&chunk.bytes) {
                Ok(Some(request)) => break request,
                Ok(None) => {}
                Err(reason) => return close(&conn, id, &reason),
            },
            Ok(None) => {
                if let Err(reason) = reader.handle_stream_finished() {
                    close(&conn, id, &reason);
                }
                return;
            }
            Err(_) => return,
        }
    };
    let answered = match request {
        FetchRequest::Data {
            req_id,
            path,
            offset,
            len,
            ino,
        } => answer_data(&mut send, &shared, req_id, path, offset, len, ino).await,
        FetchRequest::Attrs { req_id, paths, links } => {
            answer_attrs(&mut send, &shared, req_id, paths, links).await
        }
        FetchRequest::Listing { req_id, path, recursive } => {
            answer_listing(&mut send, &shared, req_id, path, recursive).await
        }
    };
    if answered {
        let _ = send.finish();
    }
}

/// Writes one message on a fetch stream; false when the stream is gone.
async fn write_msg(send: &mut quinn::SendStream, msg: &Msg) -> bool {
    match protocol::encode_bytes(msg) {
        Ok(frame) => send.write_chunk(frame).await.is_ok(),
        Err(e) => {
            crate::report!(Error, "server: answers that could not be encoded", "cannot encode a {} answer: {e}", msg.name());
            false
        }
    }
}

async fn answer_data(
    send: &mut quinn::SendStream,
    shared: &Arc<Shared>,
    req_id: u64,
    path: RelPath,
    offset: u64,
    len: u64,
    ino: Option<u64>,
) -> bool {
    let s = shared.clone();
    let p = path.clone();
    // One blocking call opens the file and reads the first batch: a small file costs one
    // hand-off to the blocking pool, not one per step.
    let opened = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let Some(file) = s.export.open_regular(&p)? else {
            return Ok(None);
        };
        let meta = file.metadata()?;
        // Another file under this name now: the bytes asked for went with their file.
        if ino.is_some_and(|i| i != meta.ino()) {
            return Ok(None);
        }
        let size = meta.len();
        let end = offset.saturating_add(len).min(size);
        let mut reader = export::DataReader::new(Arc::new(file));
        let first = reader.next_chunks(offset, end, DATA_CHUNK, READ_BATCH)?;
        Ok(Some((reader, size, end, first)))
    })
    .await;
    let unreadable = |e: &dyn std::fmt::Display| Msg::Unreadable {
        req_id,
        reason: e.to_string(),
    };
    let (mut reader, size, end, mut chunks) = match opened {
        Ok(Ok(Some(opened))) => opened,
        Ok(Ok(None)) => return write_msg(send, &Msg::Gone { req_id }).await,
        Ok(Err(e)) => {
            crate::report!(Warn, "server: files a client asked for that could not be read", "cannot read {:?} for a client: {e}", path.display());
            return write_msg(send, &unreadable(&e)).await;
        }
        Err(e) => return write_msg(send, &unreadable(&e)).await,
    };
    while let Some(&(last_at, ref last)) = chunks.last() {
        let pos = last_at + last.len() as u64;
        for (at, bytes) in chunks {
            if !write_msg(
                send,
                &Msg::Data {
                    req_id,
                    offset: at,
                    bytes,
                },
            )
            .await
            {
                return false;
            }
        }
        if pos >= end {
            break;
        }
        let next = tokio::task::spawn_blocking(move || {
            let read = reader.next_chunks(pos, end, DATA_CHUNK, READ_BATCH);
            (reader, read)
        })
        .await;
        chunks = match next {
            Ok((r, Ok(more))) => {
                reader = r;
                more
            }
            Ok((_, Err(e))) => {
                crate::report!(Warn, "server: files a client asked for that could not be read", "cannot read {:?} for a client: {e}", path.display());
                return write_msg(send, &unreadable(&e)).await;
            }
            Err(e) => return write_msg(send, &unreadable(&e)).await,
        };
    }
    // The size the range was cut at: bytes past it, if the file grew meanwhile, come with the
    // journal entry of the write that grew it.
    write_msg(
        send,
        &Msg::DataEnd {
            req_id,
            file_size: size,
        },
    )
    .await
}

async fn answer_attrs(
    send: &mut quinn::SendStream,
    shared: &Arc<Shared>,
    req_id: u64,
    paths: Vec<RelPath>,
    links: bool,
) -> bool {
    let s = shared.clone();
    let read = tokio::task::spawn_blocking(move || {
        let found = paths
            .iter()
            .map(|p| {
                s.export
                    .attrs_with_stat(p)
                    .map_err(|e| format!("{:?}: {e}", p.display()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let links = if links {
            other_names(&s, &paths, &found)
        } else {
            Vec::new()
        };
        Ok::<_, String>((found.into_iter().map(|f| f.map(|(a, _)| a)).collect(), links))
    })
    .await;
    let msg = match read {
        Ok(Ok((attrs, links))) => Msg::Attrs { req_id, attrs, links },
        Ok(Err(reason)) => {
            crate::report!(Warn, "server: attributes a client asked for that could not be read", "cannot read attributes for a client: {reason}");
            Msg::Unreadable { req_id, reason }
        }
        Err(e) => Msg::Unreadable {
            req_id,
            reason: e.to_string(),
        },
    };
    write_msg(send, &msg).await
}

/// A directory's listing (or subtree) as manifest entries, walked on a blocking thread
/// through a bounded channel as the full sync's manifest is, so a slow client stalls the
/// walk rather than grow the server.
async fn answer_listing(
    send: &mut quinn::SendStream,
    shared: &Arc<Shared>,
    req_id: u64,
    path: RelPath,
    recursive: bool,
) -> bool {
    let (tx, mut rx) = mpsc::channel(4);
    // Noted before the walk: whatever the walk races with is journalled after it.
    let seq = shared.journal.last_seq();
    let s = shared.clone();
    let p = path.clone();
    let walk = tokio::task::spawn_blocking(move || {
        s.export.walk_from(&p, recursive, true, MANIFEST_CHUNK, &mut |entries| {
            tx.blocking_send(entries).is_ok()
        })
    });
    while let Some(entries) = rx.recv().await {
        if !write_msg(send, &Msg::Listing { req_id, entries }).await {
            // The client went away: the walk stops at its next chunk (the channel closed).
            return false;
        }
    }
    let msg = match walk.await {
        Ok(Ok(Some(_))) => Msg::ListingEnd { req_id, seq },
        Ok(Ok(None)) => Msg::Gone { req_id },
        Ok(Err(e)) => {
            crate::report!(Warn, "server: directories a client asked for that could not be listed", "cannot list {:?} for a client: {e}", path.display());
            Msg::Unreadable { req_id, reason: e.to_string() }
        }
        Err(e) => Msg::Unreadable { req_id, reason: e.to_string() },
    };
    write_msg(send, &msg).await
}

/// Longest wait for the capture thread's answer about names; past it the answer goes
/// without names (a client then recreates the object alone, as before links travelled).
const NAMES_WAIT: Duration = Duration::from_secs(2);
/// Most bytes of link names in one `Attrs` answer (far below the fetch stream's limit).
const NAMES_BYTES_MAX: usize = 4 << 20;

/// The [`Links`] of each answer of a `FetchAttrs` that asked for them: for a non-directory
/// with several links, its inode, link count and every other name the capture's inode
/// table knows for it, each checked on the export now (same device and inode), since the
/// table may lag the tree. One question to the capture thread for the whole answer.
fn other_names(
    s: &Shared,
    paths: &[RelPath],
    found: &[Option<(Attrs, libc::stat)>],
) -> Vec<Option<Links>> {
    let multi = |f: &Option<(Attrs, libc::stat)>| {
        f.as_ref()
            .filter(|(a, st)| a.kind != FileKind::Directory && st.st_nlink > 1)
            .map(|(_, st)| *st)
    };
    let inos: Vec<u64> = found.iter().filter_map(multi).map(|st| st.st_ino).collect();
    if inos.is_empty() {
        return vec![None; found.len()];
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    // One more than the wire allows: the asked path itself is among them.
    let max = MAX_LINK_NAMES + 1;
    let known = if s.names.ask(NamesQuery { inos, max, reply: tx }) {
        rx.recv_timeout(NAMES_WAIT).unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut known = known.into_iter();
    let mut bytes = 0usize;
    paths
        .iter()
        .zip(found)
        .map(|(path, f)| {
            let st = multi(f)?;
            let candidates = known.next().unwrap_or_default();
            let mut names = Vec::new();
            for name in candidates {
                if names.len() >= MAX_LINK_NAMES || bytes >= NAMES_BYTES_MAX {
                    break;
                }
                if name == *path || name.as_bytes().is_empty() || protocol::wire_path_problem(&name).is_some() {
                    continue;
                }
                if s.export.same_object(&name, st.st_dev, st.st_ino) {
                    bytes += name.as_bytes().len();
                    names.push(name);
                }
            }
            Some(Links {
                ino: st.st_ino,
                nlink: st.st_nlink as u64,
                names,
            })
        })
        .collect()
}

/// The journal's answer to a read, in the protocol's own terms (the session does not know
/// the store).
fn journal_read(r: crate::journal::Result<crate::journal::ReadFrom>) -> JournalRead {
    use crate::journal::{JournalError, ReadFrom};
    match r {
        Ok(ReadFrom::Entries(v)) => JournalRead::Entries(v),
        Ok(ReadFrom::Expired { first_retained }) => JournalRead::Expired { first_retained },
        Err(JournalError::AheadOfJournal { last_seq, .. }) => {
            JournalRead::AheadOfJournal { last_seq }
        }
        Err(e) => JournalRead::Failed {
            reason: e.to_string(),
        },
    }
}
