//! The server's end: [`ServerSession`] runs one client's control stream, and
//! [`FetchRequestReader`] reads and checks the request on one fetch stream.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::messages::{
    entry_size_estimate, manifest_size_estimate, wire_path_problem, xattrs_size_estimate, FrameDecoder, FrameError,
    AttachedData, FullSyncReason, ManifestEntry, Msg, Side, Start, StreamKind, VolumeId, MAX_ATTRS_PATHS,
    MAX_CONTROL_BODY,
};
use crate::attrs::Attrs;
use super::{CloseReason, JournalRead};
use crate::op::{JournalEntry, RelPath};

/// Estimated bytes per `Entries` or `Manifest` frame: half the control limit, so an
/// estimate that is off by a factor of two still fits.
const FRAME_BUDGET: usize = MAX_CONTROL_BODY / 2;
/// A manifest entry whose xattrs alone exceed this travels without them (`xattrs_omitted`).
const INLINE_XATTRS_MAX: usize = 256 << 10;

/// What the server read of the master for a journal read's entries: [`Msg::Attached`]'s
/// content. The driver keeps its estimated size within [`ATTACHED_BUDGET`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attached {
    pub attrs: Vec<(RelPath, Option<Attrs>)>,
    pub data: Vec<AttachedData>,
}

/// Estimated bytes of one `Attached` frame at most: a quarter of the control limit.
pub const ATTACHED_BUDGET: usize = MAX_CONTROL_BODY / 4;

/// The server's limits and timers.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Most journal entries in flight beyond a client's last `Ack` (the client's own
    /// window, from its `Hello`, may lower it).
    pub window: u32,
    /// Most entries per `Entries` frame.
    pub max_batch: usize,
    /// A `Heartbeat` goes out after this long without sending.
    pub heartbeat: Duration,
    /// A client that sends no `Hello` within this is dropped.
    pub hello_timeout: Duration,
    /// This agent's name and version, sent in `Welcome` for the client's logs.
    pub agent: String,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            window: 4096,
            max_batch: 1024,
            heartbeat: Duration::from_secs(1),
            hello_timeout: Duration::from_secs(10),
            agent: concat!("imezzo ", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// What a [`ServerSession`] asks its driver to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOutput {
    /// Write this message on the control stream ([`super::encode`]).
    Send(Msg),
    /// Read the journal (`read_from(from, max)`) and report with `handle_journal`.
    ReadJournal { from: u64, max: usize },
    /// Take the journal's last seq *now*, report it with `handle_manifest_begin`, then walk
    /// the tree (parents first) feeding `handle_manifest_entries`, and end with
    /// `handle_manifest_end` (or `handle_manifest_failed`). With `inline_data`, put the
    /// content of each regular file of at most [`super::INLINE_DATA_MAX`] bytes in its
    /// entry's `data` (when it reads whole and unchanged); without, leave every `data` out.
    StartManifest { inline_data: bool },
    /// Close the connection with this reason; the session does nothing more.
    Close(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    /// `Hello` accepted; the first journal read decides between resume and full sync.
    Deciding {
        from: u64,
    },
    /// Full sync decided; waiting for the driver's `manifest_seq`.
    WaitManifestSeq,
    SendingManifest {
        manifest_seq: u64,
    },
    Streaming,
    Closed,
}

impl Phase {
    fn describe(self) -> &'static str {
        match self {
            Phase::AwaitHello => "waiting for Hello",
            Phase::Deciding { .. } => "deciding where the client resumes",
            Phase::WaitManifestSeq => "starting a full sync",
            Phase::SendingManifest { .. } => "sending the manifest",
            Phase::Streaming => "streaming the journal",
            Phase::Closed => "closed",
        }
    }
}

/// One client's control stream, on the server.
///
/// Invariants: `acked ≤ sent_through`; the entries in flight (sent in batches covering
/// seqs beyond `acked`) never exceed the window; every `Entries` starts at
/// `sent_through + 1`; at most one journal read is outstanding.
#[derive(Debug)]
pub struct ServerSession {
    config: ServerConfig,
    volume_id: VolumeId,
    phase: Phase,
    decoder: FrameDecoder,
    out: VecDeque<ServerOutput>,
    hello_deadline: Instant,
    /// When something was last sent; `None` until `Welcome`, since heartbeats only follow it.
    last_send: Option<Instant>,
    window: usize,
    why_full_sync: Option<FullSyncReason>,
    /// Last seq covered by what was sent (the resume point − 1 before any entry).
    sent_through: u64,
    /// The client's last `Ack` (initially its resume point − 1, or the manifest seq).
    acked: u64,
    /// `(last seq covered, entries)` of each sent batch not yet wholly acknowledged.
    in_flight: VecDeque<(u64, usize)>,
    in_flight_entries: usize,
    /// `max` of the outstanding `ReadJournal`.
    reading: Option<usize>,
    /// The master's state read with the outstanding journal read, sent ahead of its
    /// entries (see [`ServerSession::handle_journal_attached`]).
    attached: Option<Attached>,
    /// The last read stopped short of its `max`: nothing more until the journal grows.
    at_end: bool,
    journal_last: u64,
    manifest_chunk: Vec<ManifestEntry>,
    manifest_chunk_bytes: usize,
    client_agent: String,
}

impl ServerSession {
    pub fn new(volume_id: VolumeId, now: Instant) -> ServerSession {
        ServerSession::with_config(volume_id, now, ServerConfig::default())
    }

    pub fn with_config(volume_id: VolumeId, now: Instant, config: ServerConfig) -> ServerSession {
        let hello_deadline = now + config.hello_timeout;
        ServerSession {
            config,
            volume_id,
            phase: Phase::AwaitHello,
            decoder: FrameDecoder::new(MAX_CONTROL_BODY),
            out: VecDeque::new(),
            hello_deadline,
            last_send: None,
            window: 0,
            why_full_sync: None,
            sent_through: 0,
            acked: 0,
            in_flight: VecDeque::new(),
            in_flight_entries: 0,
            reading: None,
            attached: None,
            at_end: false,
            journal_last: 0,
            manifest_chunk: Vec::new(),
            manifest_chunk_bytes: 0,
            client_agent: String::new(),
        }
    }

    // ---- inputs -------------------------------------------------------------------------

    /// Bytes that arrived on the control stream.
    pub fn handle_stream_data(&mut self, _now: Instant, bytes: &[u8]) {
        if self.is_closed() {
            return;
        }
        self.decoder.push(bytes);
        while !self.is_closed() {
            match self.decoder.next_msg() {
                Ok(Some(msg)) => self.handle_msg(msg),
                Ok(None) => break,
                Err(e) => self.frame_error(e),
            }
        }
    }

    /// The client finished its side of the control stream.
    pub fn handle_stream_finished(&mut self, _now: Instant) {
        if self.is_closed() {
            return;
        }
        match self.decoder.finish() {
            Err(e) => self.frame_error(e),
            Ok(()) => {
                self.close(CloseReason::Shutdown { side: Side::Client, detail: "it ended the control stream".into() })
            }
        }
    }

    /// [`ServerSession::handle_journal`], with the master's state read after the entries
    /// were journalled: sent as `Attached` right before the first of them, when they are
    /// streamed at once (never before `Welcome`, never when the read ends the session).
    pub fn handle_journal_attached(&mut self, now: Instant, read: JournalRead, attached: Attached) {
        self.attached = Some(attached);
        self.handle_journal(now, read);
        self.attached = None;
    }

    /// The answer to the outstanding [`ServerOutput::ReadJournal`].
    pub fn handle_journal(&mut self, now: Instant, read: JournalRead) {
        if self.is_closed() {
            return;
        }
        let Some(max) = self.reading.take() else {
            return self.internal("a journal read answered that was never asked for");
        };
        match (self.phase, read) {
            (Phase::Deciding { from }, JournalRead::Entries(entries)) => {
                self.sent_through = from - 1;
                self.acked = from - 1;
                self.phase = Phase::Streaming;
                self.send(
                    now,
                    Msg::Welcome {
                        volume_id: self.volume_id,
                        start: Start::Resume { from_seq: from },
                        agent: self.config.agent.clone(),
                    },
                );
                self.take_entries(now, entries, max);
            }
            (Phase::Deciding { .. }, JournalRead::Expired { first_retained }) => {
                self.start_full_sync(FullSyncReason::Expired { first_retained })
            }
            (Phase::Deciding { .. }, JournalRead::AheadOfJournal { last_seq }) => {
                self.start_full_sync(FullSyncReason::AheadOfJournal { last_seq })
            }
            (Phase::Deciding { .. }, JournalRead::Failed { reason }) => {
                // Tell the client why before closing: it cannot see the server's log.
                let reason = format!("the server cannot read its journal ({reason})");
                self.send(now, Msg::Refuse { reason: reason.clone() });
                self.finish_with(CloseReason::Internal { side: Side::Server, detail: reason });
            }
            (Phase::Streaming, JournalRead::Entries(entries)) => self.take_entries(now, entries, max),
            (Phase::Streaming, JournalRead::Expired { first_retained }) => {
                self.close(CloseReason::Expired { first_retained })
            }
            (Phase::Streaming, JournalRead::AheadOfJournal { last_seq }) => self.internal(&format!(
                "the journal's last seq {last_seq} is behind what this session already sent ({})",
                self.sent_through
            )),
            (Phase::Streaming, JournalRead::Failed { reason }) => {
                self.internal(&format!("reading the journal: {reason}"))
            }
            (phase, _) => self.internal(&format!("a journal read answered while {}", phase.describe())),
        }
    }

    /// The journal's last seq is now `last_seq` (the driver calls this after appends).
    pub fn handle_appended(&mut self, _now: Instant, last_seq: u64) {
        if self.is_closed() {
            return;
        }
        self.journal_last = self.journal_last.max(last_seq);
        self.maybe_read();
    }

    /// The journal's last seq taken before the manifest walk starts.
    pub fn handle_manifest_begin(&mut self, now: Instant, manifest_seq: u64) {
        if self.is_closed() {
            return;
        }
        if self.phase != Phase::WaitManifestSeq {
            return self.internal(&format!("a manifest began while {}", self.phase.describe()));
        }
        let why = self.why_full_sync.take().unwrap_or(FullSyncReason::NewClient);
        self.sent_through = manifest_seq;
        self.acked = manifest_seq;
        self.journal_last = self.journal_last.max(manifest_seq);
        self.phase = Phase::SendingManifest { manifest_seq };
        self.send(
            now,
            Msg::Welcome {
                volume_id: self.volume_id,
                start: Start::FullSync { manifest_seq, why },
                agent: self.config.agent.clone(),
            },
        );
    }

    /// The next objects of the walk, parents before children.
    pub fn handle_manifest_entries(&mut self, now: Instant, entries: Vec<ManifestEntry>) {
        if self.is_closed() {
            return;
        }
        if !matches!(self.phase, Phase::SendingManifest { .. }) {
            return self.internal(&format!("manifest entries arrived while {}", self.phase.describe()));
        }
        for mut e in entries {
            if xattrs_size_estimate(&e.attrs.xattrs) > INLINE_XATTRS_MAX {
                e.attrs.xattrs = Vec::new();
                e.xattrs_omitted = true;
            }
            let size = manifest_size_estimate(&e);
            if !self.manifest_chunk.is_empty() && self.manifest_chunk_bytes + size > FRAME_BUDGET {
                self.flush_manifest(now);
            }
            self.manifest_chunk_bytes += size;
            self.manifest_chunk.push(e);
        }
    }

    /// The walk is complete: the manifest ends and the journal streams from `manifest_seq + 1`.
    pub fn handle_manifest_end(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        let Phase::SendingManifest { manifest_seq } = self.phase else {
            return self.internal(&format!("a manifest ended while {}", self.phase.describe()));
        };
        self.flush_manifest(now);
        self.send(now, Msg::ManifestEnd { seq: manifest_seq, journal_last: self.journal_last });
        self.phase = Phase::Streaming;
        self.at_end = false;
        self.maybe_read();
    }

    /// The walk failed; the client will reconnect and get a new full sync.
    pub fn handle_manifest_failed(&mut self, _now: Instant, reason: &str) {
        if self.is_closed() {
            return;
        }
        self.internal(&format!("walking the exported tree for a manifest: {reason}"));
    }

    /// Call when [`poll_timeout`](Self::poll_timeout)'s instant has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Closed => {}
            Phase::AwaitHello if now >= self.hello_deadline => self.close(CloseReason::Timeout {
                what: format!("the client sent no Hello within {:?}", self.config.hello_timeout),
            }),
            _ => {
                if let Some(last) = self.last_send {
                    if now >= last + self.config.heartbeat {
                        self.send(
                            now,
                            Msg::Heartbeat { sent_through: self.sent_through, journal_last: self.journal_last },
                        );
                    }
                }
            }
        }
    }

    // ---- outputs ------------------------------------------------------------------------

    pub fn poll_output(&mut self) -> Option<ServerOutput> {
        self.out.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Closed => None,
            Phase::AwaitHello => Some(self.hello_deadline),
            _ => self.last_send.map(|t| t + self.config.heartbeat),
        }
    }

    // ---- state, for drivers and logs ----------------------------------------------------

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The client's last acknowledged seq (its durable state), once streaming.
    pub fn acked_seq(&self) -> Option<u64> {
        (self.phase == Phase::Streaming).then_some(self.acked)
    }

    /// The lowest seq this client still needs from the journal: compaction should keep it
    /// while the client is connected. `None` before the resume point is known.
    pub fn retention_floor(&self) -> Option<u64> {
        match self.phase {
            Phase::Deciding { from } => Some(from),
            Phase::SendingManifest { .. } | Phase::Streaming => Some(self.acked.saturating_add(1)),
            _ => None,
        }
    }

    /// The last seq covered by what was sent.
    pub fn sent_through(&self) -> u64 {
        self.sent_through
    }

    /// Entries sent in batches not yet wholly acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight_entries
    }

    /// The window in force (0 before `Hello`).
    pub fn window(&self) -> usize {
        self.window
    }

    /// The client's agent string from its `Hello`.
    pub fn client_agent(&self) -> &str {
        &self.client_agent
    }

    // ---- internals ----------------------------------------------------------------------

    fn handle_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Hello { volume_id, last_applied, window, agent } => {
                if self.phase != Phase::AwaitHello {
                    return self.violation(format!("Hello again while {}", self.phase.describe()));
                }
                if window == 0 {
                    return self.violation("Hello with a window of 0 entries".into());
                }
                self.client_agent = agent;
                self.window = (window as usize).min(self.config.window as usize).max(1);
                match (volume_id, last_applied) {
                    (None, _) | (_, None) => self.start_full_sync(FullSyncReason::NewClient),
                    (Some(v), _) if v != self.volume_id => {
                        self.start_full_sync(FullSyncReason::OtherVolume { client_volume: v })
                    }
                    (Some(_), Some(last)) => {
                        let Some(from) = last.checked_add(1) else {
                            return self.violation(format!("Hello with last_applied {last}, past any seq"));
                        };
                        self.phase = Phase::Deciding { from };
                        let max = self.window.min(self.config.max_batch).max(1);
                        self.reading = Some(max);
                        self.out.push_back(ServerOutput::ReadJournal { from, max });
                    }
                }
            }
            Msg::Ack { applied_seq } => {
                if self.phase != Phase::Streaming {
                    return self.violation(format!("Ack {applied_seq} while {}", self.phase.describe()));
                }
                if applied_seq < self.acked || applied_seq > self.sent_through {
                    return self.violation(format!(
                        "Ack {applied_seq} outside [{}, {}] (the last ack and the last seq sent)",
                        self.acked, self.sent_through
                    ));
                }
                self.acked = applied_seq;
                while let Some(&(through, n)) = self.in_flight.front() {
                    if through > applied_seq {
                        break;
                    }
                    self.in_flight.pop_front();
                    self.in_flight_entries -= n;
                }
                self.maybe_read();
            }
            other => self.unexpected(&other),
        }
    }

    fn unexpected(&mut self, msg: &Msg) {
        let detail = if msg.sender() == Side::Server {
            format!("{} is a server message", msg.name())
        } else if msg.stream() == StreamKind::Fetch {
            format!("{} belongs on a fetch stream, not the control stream", msg.name())
        } else {
            format!("{} while {}", msg.name(), self.phase.describe())
        };
        self.violation(detail)
    }

    fn start_full_sync(&mut self, why: FullSyncReason) {
        // A client starting from nothing needs every file's bytes: small ones travel in the
        // manifest, saving a fetch stream (and its round trip and tasks) per file. Any other
        // client probably holds most files already and keeps those whose size and mtime
        // match, so inline data would mostly be sent for nothing.
        let inline_data = why == FullSyncReason::NewClient;
        self.why_full_sync = Some(why);
        self.phase = Phase::WaitManifestSeq;
        self.out.push_back(ServerOutput::StartManifest { inline_data });
    }

    /// Sends a journal read's entries as batches, each starting right after the last.
    fn take_entries(&mut self, now: Instant, entries: Vec<JournalEntry>, max: usize) {
        self.at_end = entries.len() < max;
        // The journal is trusted, but a broken order would silently corrupt every replica:
        // check it as the client will.
        let mut prev = self.sent_through;
        for e in &entries {
            if e.seq <= prev {
                return self.internal(&format!("the journal returned seq {} after {prev}", e.seq));
            }
            prev = e.seq;
        }
        if let (Some(a), Some(last)) = (self.attached.take(), entries.last()) {
            if !a.attrs.is_empty() || !a.data.is_empty() {
                let through_seq = last.seq;
                self.send(now, Msg::Attached { through_seq, attrs: a.attrs, data: a.data });
            }
        }
        let mut batch: Vec<JournalEntry> = Vec::new();
        let mut bytes = 0;
        for e in entries {
            let size = entry_size_estimate(&e);
            if !batch.is_empty() && (batch.len() >= self.config.max_batch || bytes + size > FRAME_BUDGET) {
                self.send_batch(now, std::mem::take(&mut batch));
                bytes = 0;
            }
            bytes += size;
            batch.push(e);
        }
        if !batch.is_empty() {
            self.send_batch(now, batch);
        }
        self.maybe_read();
    }

    fn send_batch(&mut self, now: Instant, entries: Vec<JournalEntry>) {
        let Some(last) = entries.last().map(|e| e.seq) else { return };
        let from_seq = self.sent_through + 1;
        self.in_flight.push_back((last, entries.len()));
        self.in_flight_entries += entries.len();
        self.sent_through = last;
        self.journal_last = self.journal_last.max(last);
        self.send(now, Msg::Entries { from_seq, entries });
    }

    fn flush_manifest(&mut self, now: Instant) {
        if self.manifest_chunk.is_empty() {
            return;
        }
        let entries = std::mem::take(&mut self.manifest_chunk);
        self.manifest_chunk_bytes = 0;
        self.send(now, Msg::Manifest { entries });
    }

    /// Asks for more of the journal when the window has room and there may be more.
    fn maybe_read(&mut self) {
        if self.phase != Phase::Streaming || self.reading.is_some() || self.in_flight_entries >= self.window {
            return;
        }
        if self.at_end && self.journal_last <= self.sent_through {
            return;
        }
        let max = (self.window - self.in_flight_entries).min(self.config.max_batch).max(1);
        self.reading = Some(max);
        self.out.push_back(ServerOutput::ReadJournal { from: self.sent_through + 1, max });
    }

    fn send(&mut self, now: Instant, msg: Msg) {
        self.last_send = Some(now);
        self.out.push_back(ServerOutput::Send(msg));
    }

    fn frame_error(&mut self, e: FrameError) {
        match e {
            FrameError::Version { theirs, ours } => {
                self.close(CloseReason::VersionMismatch { local: Side::Server, ours, theirs })
            }
            other => self.violation(format!("sent {other}")),
        }
    }

    fn violation(&mut self, detail: String) {
        self.close(CloseReason::Violation { peer: Side::Client, detail })
    }

    fn internal(&mut self, detail: &str) {
        self.close(CloseReason::Internal { side: Side::Server, detail: detail.to_string() })
    }

    /// Closes at once: whatever was queued is dropped (a broken peer gets nothing more).
    fn close(&mut self, reason: CloseReason) {
        self.out.clear();
        self.finish_with(reason);
    }

    /// Closes after what is already queued.
    fn finish_with(&mut self, reason: CloseReason) {
        self.phase = Phase::Closed;
        self.manifest_chunk.clear();
        self.out.push_back(ServerOutput::Close(reason));
    }
}

/// The request a client made on a fetch stream, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchRequest {
    /// Answer with `Data` chunks (at most [`super::DATA_CHUNK`] bytes each, increasing
    /// offsets, holes left out) then `DataEnd`, or `Gone` / `Unreadable`. With `ino`, a
    /// file at `path` that is another inode is `Gone`.
    Data { req_id: u64, path: RelPath, offset: u64, len: u64, ino: Option<u64> },
    /// Answer with `Attrs`, one per path in order (with `links`, each non-directory's
    /// [`super::Links`] too), or `Unreadable`.
    Attrs { req_id: u64, paths: Vec<RelPath>, links: bool },
    /// Answer with `Listing` chunks (the directory `path` first, then its children, or its
    /// whole subtree when `recursive`, in walk order) then `ListingEnd`, or `Gone` when no
    /// directory is there now, or `Unreadable`.
    Listing { req_id: u64, path: RelPath, recursive: bool },
}

impl FetchRequest {
    pub fn req_id(&self) -> u64 {
        match self {
            FetchRequest::Data { req_id, .. }
            | FetchRequest::Attrs { req_id, .. }
            | FetchRequest::Listing { req_id, .. } => *req_id,
        }
    }
}

/// The server's end of one fetch stream: reads exactly one request and checks it (paths,
/// range), so the driver's file reader only ever sees a path fit to resolve.
#[derive(Debug)]
pub struct FetchRequestReader {
    decoder: FrameDecoder,
    got_request: bool,
}

impl Default for FetchRequestReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FetchRequestReader {
    pub fn new() -> FetchRequestReader {
        FetchRequestReader { decoder: FrameDecoder::new(MAX_CONTROL_BODY), got_request: false }
    }

    /// Bytes that arrived on the stream: the request once it is complete, or the reason
    /// to close the connection.
    pub fn handle_stream_data(&mut self, bytes: &[u8]) -> Result<Option<FetchRequest>, CloseReason> {
        self.decoder.push(bytes);
        let msg = match self.decoder.next_msg() {
            Ok(Some(msg)) => msg,
            Ok(None) => return Ok(None),
            Err(FrameError::Version { theirs, ours }) => {
                return Err(CloseReason::VersionMismatch { local: Side::Server, ours, theirs })
            }
            Err(e) => return Err(violation(format!("sent {e} on a fetch stream"))),
        };
        if self.got_request {
            return Err(violation(format!(
                "{} after its request on a fetch stream (one request per stream)",
                msg.name()
            )));
        }
        self.got_request = true;
        let request = match msg {
            Msg::Fetch { req_id, path, offset, len, ino } => {
                if offset.checked_add(len).is_none() {
                    return Err(violation(format!("Fetch {req_id} of a range past 2^64 ({offset} + {len})")));
                }
                check_path(req_id, &path)?;
                FetchRequest::Data { req_id, path, offset, len, ino }
            }
            Msg::FetchAttrs { req_id, paths, links } => {
                if paths.is_empty() || paths.len() > MAX_ATTRS_PATHS {
                    return Err(violation(format!(
                        "FetchAttrs {req_id} of {} paths (1 to {MAX_ATTRS_PATHS} allowed)",
                        paths.len()
                    )));
                }
                for p in &paths {
                    check_path(req_id, p)?;
                }
                FetchRequest::Attrs { req_id, paths, links }
            }
            Msg::FetchListing { req_id, path, recursive } => {
                check_path(req_id, &path)?;
                FetchRequest::Listing { req_id, path, recursive }
            }
            other => {
                let detail = if other.sender() == Side::Server {
                    format!("{} is a server message", other.name())
                } else {
                    format!("{} belongs on the control stream, not a fetch stream", other.name())
                };
                return Err(violation(detail));
            }
        };
        // A second request already buffered behind the first is as wrong as a late one.
        if self.decoder.buffered() > 0 {
            return Err(violation("more bytes after its request on a fetch stream (one request per stream)".into()));
        }
        Ok(Some(request))
    }

    /// The client finished its side: fine after the request, a violation before it.
    pub fn handle_stream_finished(&mut self) -> Result<(), CloseReason> {
        if let Err(e) = self.decoder.finish() {
            return Err(violation(format!("sent {e} on a fetch stream")));
        }
        if !self.got_request {
            return Err(violation("ended a fetch stream without a request".into()));
        }
        Ok(())
    }
}

fn check_path(req_id: u64, path: &RelPath) -> Result<(), CloseReason> {
    match wire_path_problem(path) {
        None => Ok(()),
        Some(problem) => {
            Err(violation(format!("request {req_id} names a path that {problem}: {:?}", path.display())))
        }
    }
}

fn violation(detail: String) -> CloseReason {
    CloseReason::Violation { peer: Side::Client, detail }
}
