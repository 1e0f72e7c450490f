//! The client's end: [`ClientSession`] runs the control stream and plans replay (what to
//! apply, when to make it durable and acknowledge), and [`FetchExchange`] checks the
//! server's answer on one fetch stream.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::messages::{
    entry_paths, inline_data_problem, AttachedData, DataBytes, Frame, INLINE_DATA_MAX, wire_path_problem, FrameDecoder, FrameError, FullSyncReason,
    Links, ManifestEntry, Msg, Side, Start, StreamKind, VolumeId, MAX_CONTROL_BODY, MAX_DATA_BODY,
    MAX_LINK_NAMES,
};
use super::CloseReason;
use crate::attrs::{Attrs, FileKind};
use crate::op::{JournalEntry, RelPath};

/// What the client has durably: the volume its replica belongs to and the seq through
/// which it is applied. Both `None` for a new client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientState {
    pub volume_id: Option<VolumeId>,
    /// `None` also while a full sync is unfinished: the replica is not a state of the volume.
    pub last_applied: Option<u64>,
}

/// The client's limits and timers.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Most entries the client accepts beyond its last `Ack` (announced in `Hello`).
    pub window: u32,
    /// The server must answer `Hello` within this.
    pub welcome_timeout: Duration,
    /// A server silent for this long is gone (it sends a heartbeat every second when idle).
    pub silence_timeout: Duration,
    /// This agent's name and version, sent in `Hello` for the server's logs.
    pub agent: String,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            window: 4096,
            welcome_timeout: Duration::from_secs(10),
            silence_timeout: Duration::from_secs(3),
            agent: concat!("imezzo ", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// What a [`ClientSession`] asks its driver to do, strictly in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOutput {
    /// Write this message on the control stream ([`super::encode`]).
    Send(Msg),
    /// A full sync starts: durably record `volume_id` with no last applied seq (so a crash
    /// restarts the full sync), and prepare the root.
    BeginFullSync {
        volume_id: VolumeId,
        manifest_seq: u64,
        why: FullSyncReason,
    },
    /// Create or update this object (parents come first), fetching a regular file's data.
    ApplyManifest(ManifestEntry),
    /// The manifest is whole: remove every local object it did not name and finish its
    /// fetches. A `PersistAndAck` for `seq` follows.
    /// `raced`: the server's tree changed while it was walked (see `Msg::ManifestEnd`).
    ManifestComplete { seq: u64, raced: bool },
    /// The master's state for the entries up to `through_seq` that follow (see
    /// [`Msg::Attached`]): replay uses it instead of fetching it.
    Attached {
        through_seq: u64,
        attrs: Vec<(RelPath, Option<Attrs>)>,
        data: Vec<AttachedData>,
    },
    /// Replay this entry.
    Apply(JournalEntry),
    /// Make every applied change durable, record `volume_id` and `last_applied = seq`
    /// durably, then call `handle_applied(now, seq)`.
    PersistAndAck { volume_id: VolumeId, seq: u64 },
    /// Close the connection with this reason; the session does nothing more.
    Close(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitWelcome,
    Manifest { manifest_seq: u64 },
    Streaming,
    Closed,
}

impl Phase {
    fn describe(self) -> &'static str {
        match self {
            Phase::AwaitWelcome => "waiting for Welcome",
            Phase::Manifest { .. } => "receiving the manifest",
            Phase::Streaming => "streaming the journal",
            Phase::Closed => "closed",
        }
    }
}

/// The control stream, on the client.
///
/// Invariants: entries are handed to the driver in strictly increasing seq order, each
/// batch starting right after the last one covered; never more than the window beyond the
/// last `Ack`; a `PersistAndAck` never names a seq whose entries were not all handed out
/// before it.
#[derive(Debug)]
pub struct ClientSession {
    config: ClientConfig,
    state: ClientState,
    phase: Phase,
    decoder: FrameDecoder,
    out: VecDeque<ClientOutput>,
    /// The volume of this session, from `Welcome`.
    volume_id: Option<VolumeId>,
    /// Welcome deadline, then the silence deadline, moved by every frame received.
    deadline: Instant,
    /// Last seq covered by what was received.
    received_through: u64,
    /// Last seq acknowledged (initially the start point − 1, or the manifest seq).
    acked: u64,
    ack_sent: bool,
    /// `(last seq covered, entries)` of each received batch not yet wholly acknowledged.
    in_flight: VecDeque<(u64, usize)>,
    in_flight_entries: usize,
    /// The seq to make durable once the queued outputs are done; a later batch replaces it.
    pending_persist: Option<u64>,
    server_journal_last: u64,
    server_agent: String,
}

impl ClientSession {
    pub fn new(state: ClientState, now: Instant) -> ClientSession {
        ClientSession::with_config(state, now, ClientConfig::default())
    }

    /// A session that queues its `Hello` at once.
    pub fn with_config(state: ClientState, now: Instant, config: ClientConfig) -> ClientSession {
        let hello = Msg::Hello {
            volume_id: state.volume_id,
            last_applied: state.last_applied,
            window: config.window.max(1),
            agent: config.agent.clone(),
        };
        ClientSession {
            deadline: now + config.welcome_timeout,
            config,
            state,
            phase: Phase::AwaitWelcome,
            decoder: FrameDecoder::new(MAX_CONTROL_BODY),
            out: VecDeque::from([ClientOutput::Send(hello)]),
            volume_id: None,
            received_through: 0,
            acked: 0,
            ack_sent: false,
            in_flight: VecDeque::new(),
            in_flight_entries: 0,
            pending_persist: None,
            server_journal_last: 0,
            server_agent: String::new(),
        }
    }

    // ---- inputs -------------------------------------------------------------------------

    /// Bytes that arrived on the control stream.
    pub fn handle_stream_data(&mut self, now: Instant, bytes: &[u8]) {
        if self.is_closed() {
            return;
        }
        self.decoder.push(bytes);
        while !self.is_closed() {
            match self.decoder.next_msg() {
                Ok(Some(msg)) => {
                    if self.phase != Phase::AwaitWelcome {
                        self.deadline = now + self.config.silence_timeout;
                    }
                    self.handle_msg(now, msg)
                }
                Ok(None) => break,
                Err(e) => self.frame_error(e),
            }
        }
    }

    /// The server finished its side of the control stream.
    pub fn handle_stream_finished(&mut self, _now: Instant) {
        if self.is_closed() {
            return;
        }
        match self.decoder.finish() {
            Err(e) => self.frame_error(e),
            Ok(()) => self.close(CloseReason::Shutdown {
                side: Side::Server,
                detail: "it ended the control stream".into(),
            }),
        }
    }

    /// Entries through `seq` are applied and durable, and `seq` is recorded as the last
    /// applied: the answer to `PersistAndAck`.
    pub fn handle_applied(&mut self, _now: Instant, seq: u64) {
        if self.is_closed() || self.phase == Phase::AwaitWelcome {
            return;
        }
        if seq > self.received_through {
            return self.close(CloseReason::Internal {
                side: Side::Client,
                detail: format!(
                    "the driver reports seq {seq} applied, but only {} was received",
                    self.received_through
                ),
            });
        }
        if seq < self.acked || (seq == self.acked && self.ack_sent) {
            return; // an older PersistAndAck finishing late: nothing new to say
        }
        self.acked = seq;
        self.ack_sent = true;
        self.state = ClientState {
            volume_id: self.volume_id,
            last_applied: Some(seq),
        };
        while let Some(&(through, n)) = self.in_flight.front() {
            if through > seq {
                break;
            }
            self.in_flight.pop_front();
            self.in_flight_entries -= n;
        }
        self.out
            .push_back(ClientOutput::Send(Msg::Ack { applied_seq: seq }));
    }

    /// Call when [`poll_timeout`](Self::poll_timeout)'s instant has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() || now < self.deadline {
            return;
        }
        let what = if self.phase == Phase::AwaitWelcome {
            format!(
                "the server did not answer Hello within {:?}",
                self.config.welcome_timeout
            )
        } else {
            format!(
                "the server sent nothing for {:?} (it sends a heartbeat every second)",
                self.config.silence_timeout
            )
        };
        self.close(CloseReason::Timeout { what });
    }

    // ---- outputs ------------------------------------------------------------------------

    pub fn poll_output(&mut self) -> Option<ClientOutput> {
        if let Some(o) = self.out.pop_front() {
            return Some(o);
        }
        // Only once every Apply before it was handed out: entries arriving while the driver
        // applies join the same durable batch (one fsync for many entries).
        let seq = self.pending_persist.take()?;
        let volume_id = self.volume_id?;
        Some(ClientOutput::PersistAndAck { volume_id, seq })
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.is_closed()).then_some(self.deadline)
    }

    // ---- state --------------------------------------------------------------------------

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The volume of this session, once welcomed.
    pub fn volume_id(&self) -> Option<VolumeId> {
        self.volume_id
    }

    /// The durable state as this session knows it (updated by `handle_applied`).
    pub fn state(&self) -> ClientState {
        self.state
    }

    /// The last seq covered by what was received.
    pub fn received_through(&self) -> u64 {
        self.received_through
    }

    /// The journal's last seq at the server, from its latest heartbeat or batch.
    pub fn server_journal_last(&self) -> u64 {
        self.server_journal_last
    }

    /// How many seqs the replica is behind the server's journal, as last heard.
    pub fn behind(&self) -> u64 {
        self.server_journal_last.saturating_sub(self.acked)
    }

    pub fn server_agent(&self) -> &str {
        &self.server_agent
    }

    // ---- internals ----------------------------------------------------------------------

    fn handle_msg(&mut self, now: Instant, msg: Msg) {
        match (self.phase, msg) {
            (
                Phase::AwaitWelcome,
                Msg::Welcome {
                    volume_id,
                    start,
                    agent,
                },
            ) => {
                self.server_agent = agent;
                self.deadline = now + self.config.silence_timeout;
                match start {
                    Start::Resume { from_seq } => {
                        let expected = self.state.last_applied.and_then(|l| l.checked_add(1));
                        if self.state.volume_id != Some(volume_id) || expected != Some(from_seq) {
                            return self.violation(format!(
                                "Welcome resumes volume {} at seq {from_seq}, but this replica is volume {} \
                                 applied through {:?}",
                                hex::encode(volume_id),
                                self.state.volume_id.map_or_else(|| "none".to_string(), hex::encode),
                                self.state.last_applied
                            ));
                        }
                        self.volume_id = Some(volume_id);
                        self.received_through = from_seq - 1;
                        self.acked = from_seq - 1;
                        self.phase = Phase::Streaming;
                    }
                    Start::FullSync { manifest_seq, why } => {
                        self.volume_id = Some(volume_id);
                        self.state = ClientState {
                            volume_id: Some(volume_id),
                            last_applied: None,
                        };
                        self.received_through = manifest_seq;
                        self.acked = manifest_seq;
                        self.server_journal_last = manifest_seq;
                        self.phase = Phase::Manifest { manifest_seq };
                        self.out.push_back(ClientOutput::BeginFullSync {
                            volume_id,
                            manifest_seq,
                            why,
                        });
                    }
                }
            }
            (Phase::AwaitWelcome, Msg::Refuse { reason }) => {
                self.close(CloseReason::Refused { reason })
            }
            (Phase::Manifest { .. }, Msg::Manifest { entries }) => {
                // The whole chunk is checked before any of it is handed out, as for `Entries`.
                for e in &entries {
                    if let Some(problem) = wire_path_problem(&e.path) {
                        return self.bad_path("Manifest", &e.path, problem);
                    }
                    if let Some(problem) = inline_data_problem(e) {
                        return self
                            .violation(format!("Manifest entry {:?} {problem}", e.path.display()));
                    }
                }
                self.out
                    .extend(entries.into_iter().map(ClientOutput::ApplyManifest));
            }
            (Phase::Manifest { manifest_seq }, Msg::ManifestEnd { seq, journal_last }) => {
                if seq != manifest_seq {
                    return self.violation(format!(
                        "ManifestEnd {seq} for a manifest announced at {manifest_seq}"
                    ));
                }
                self.phase = Phase::Streaming;
                self.server_journal_last = self.server_journal_last.max(journal_last);
                self.out.push_back(ClientOutput::ManifestComplete { seq, raced: journal_last > seq });
                self.pending_persist = Some(seq);
            }
            (Phase::Streaming, Msg::Entries { from_seq, entries }) => {
                self.take_entries(from_seq, entries)
            }
            (Phase::Streaming, Msg::Attached { through_seq, attrs, data }) => {
                self.take_attached(through_seq, attrs, data)
            }
            (
                Phase::Manifest { .. } | Phase::Streaming,
                Msg::Heartbeat {
                    sent_through,
                    journal_last,
                },
            ) => {
                if sent_through != self.received_through {
                    return self.violation(format!(
                        "Heartbeat says {sent_through} was sent, but the stream delivered through {}",
                        self.received_through
                    ));
                }
                self.server_journal_last = self.server_journal_last.max(journal_last);
            }
            (phase, msg) => {
                let detail = if msg.sender() == Side::Client {
                    format!("{} is a client message", msg.name())
                } else if msg.stream() == StreamKind::Fetch {
                    format!(
                        "{} belongs on a fetch stream, not the control stream",
                        msg.name()
                    )
                } else {
                    format!("{} while {}", msg.name(), phase.describe())
                };
                self.violation(detail)
            }
        }
    }

    fn take_attached(&mut self, through_seq: u64, attrs: Vec<(RelPath, Option<Attrs>)>, data: Vec<AttachedData>) {
        // It comes before the entries it is for: at least one of them is still to come.
        if through_seq <= self.received_through {
            return self.violation(format!(
                "Attached through seq {through_seq}, but the stream delivered through {} already",
                self.received_through
            ));
        }
        for p in attrs.iter().map(|(p, _)| p).chain(data.iter().map(|d| &d.path)) {
            if let Some(problem) = wire_path_problem(p) {
                return self.bad_path("Attached", p, problem);
            }
        }
        if let Some(d) = data.iter().find(|d| d.bytes.len() as u64 > INLINE_DATA_MAX) {
            return self.violation(format!(
                "Attached with {} bytes of {:?}, over the inline limit of {INLINE_DATA_MAX}",
                d.bytes.len(),
                d.path.display()
            ));
        }
        self.out.push_back(ClientOutput::Attached { through_seq, attrs, data });
    }

    fn take_entries(&mut self, from_seq: u64, entries: Vec<JournalEntry>) {
        // Written as a subtraction: a hostile manifest seq of 2^64 - 1 must not overflow.
        if from_seq.checked_sub(1) != Some(self.received_through) {
            return self.violation(format!(
                "Entries from seq {from_seq}, but the stream delivered through {} (a gap or a repeat)",
                self.received_through
            ));
        }
        if entries.is_empty() {
            return self.violation(format!("an empty Entries at seq {from_seq}"));
        }
        if self.in_flight_entries + entries.len() > self.config.window as usize {
            return self.violation(format!(
                "{} entries beyond the last Ack {}, over the window of {}",
                self.in_flight_entries + entries.len(),
                self.acked,
                self.config.window
            ));
        }
        // Check the whole batch before handing any of it out, so a bad batch applies nothing.
        let mut prev = from_seq - 1;
        for e in &entries {
            if e.seq <= prev {
                return self.violation(format!(
                    "Entries with seq {} after {prev} (not increasing)",
                    e.seq
                ));
            }
            prev = e.seq;
            for p in entry_paths(&e.op).into_iter().flatten() {
                if let Some(problem) = wire_path_problem(p) {
                    return self.bad_path("Entries", p, problem);
                }
            }
        }
        let n = entries.len();
        self.out
            .extend(entries.into_iter().map(ClientOutput::Apply));
        self.received_through = prev;
        self.server_journal_last = self.server_journal_last.max(prev);
        self.in_flight.push_back((prev, n));
        self.in_flight_entries += n;
        self.pending_persist = Some(prev);
    }

    fn bad_path(&mut self, msg: &str, path: &RelPath, problem: &str) {
        self.violation(format!(
            "{msg} names a path that {problem}: {:?}",
            path.display()
        ))
    }

    fn frame_error(&mut self, e: FrameError) {
        match e {
            FrameError::Version { theirs, ours } => self.close(CloseReason::VersionMismatch {
                local: Side::Client,
                ours,
                theirs,
            }),
            other => self.violation(format!("sent {other}")),
        }
    }

    fn violation(&mut self, detail: String) {
        self.close(CloseReason::Violation {
            peer: Side::Server,
            detail,
        })
    }

    /// Closes at once. Queued applies are dropped: nothing from a broken stream is applied
    /// after the break, and the durable state still names a consistent point.
    fn close(&mut self, reason: CloseReason) {
        self.phase = Phase::Closed;
        self.out.clear();
        self.pending_persist = None;
        self.out.push_back(ClientOutput::Close(reason));
    }
}

/// What a fetch stream delivered, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchEvent {
    /// Bytes of the file at `offset` (increasing offsets; uncovered ranges are holes).
    Data { offset: u64, bytes: DataBytes },
    /// The answer is complete; the file had this size when read.
    End { file_size: u64 },
    /// One entry per requested path, in order, and (when asked) each one's links, checked:
    /// one per path, `Some` only beside a non-directory, each name a valid path.
    Attrs(Vec<Option<Attrs>>, Vec<Option<Links>>),
    /// Nothing (or no regular file) is at the path now: a later entry accounts for it.
    Gone,
    /// Entries of a listing, checked: the directory asked for first, then only objects
    /// beneath it (its children only, unless the listing is recursive).
    Listing(Vec<ManifestEntry>),
    /// The listing is complete; it shows the tree as of journal seq `seq` or later.
    ListingEnd { seq: u64 },
    /// The server could not read it; report and retry later.
    Unreadable { reason: String },
}

#[derive(Debug, Clone)]
enum Expect {
    /// `[start, end)` asked; `next`: where the next chunk may start.
    Data {
        start: u64,
        end: u64,
        next: u64,
    },
    Attrs {
        count: usize,
        links: bool,
    },
    Listing {
        scope: RelPath,
        recursive: bool,
        /// The directory itself came (it is the first entry).
        started: bool,
    },
}

/// The client's end of one fetch stream: builds the request and checks every frame of the
/// answer against it (request id, range, order, completeness).
#[derive(Debug)]
pub struct FetchExchange {
    req_id: u64,
    expect: Expect,
    decoder: FrameDecoder,
    done: bool,
}

impl FetchExchange {
    /// A request for the bytes `[offset, offset + len)` of `path` (only from inode `ino`,
    /// when given: another object there now is answered `Gone`); write the message on a
    /// new bidirectional stream, then finish the stream's send side.
    pub fn data(
        req_id: u64,
        path: RelPath,
        offset: u64,
        len: u64,
        ino: Option<u64>,
    ) -> (FetchExchange, Msg) {
        let end = offset.saturating_add(len);
        let len = end - offset;
        let ex = FetchExchange {
            req_id,
            expect: Expect::Data {
                start: offset,
                end,
                next: offset,
            },
            decoder: FrameDecoder::new(MAX_DATA_BODY),
            done: false,
        };
        (
            ex,
            Msg::Fetch {
                req_id,
                path,
                offset,
                len,
                ino,
            },
        )
    }

    /// A request for the current attributes of `paths` (at most [`super::MAX_ATTRS_PATHS`]),
    /// with `links`, each object's other names too.
    pub fn attrs(req_id: u64, paths: Vec<RelPath>, links: bool) -> (FetchExchange, Msg) {
        let ex = FetchExchange {
            req_id,
            expect: Expect::Attrs { count: paths.len(), links },
            decoder: FrameDecoder::new(MAX_DATA_BODY),
            done: false,
        };
        (ex, Msg::FetchAttrs { req_id, paths, links })
    }

    /// A request for the directory `path` and its children (or, `recursive`, its whole
    /// subtree) as manifest entries.
    pub fn listing(req_id: u64, path: RelPath, recursive: bool) -> (FetchExchange, Msg) {
        let ex = FetchExchange {
            req_id,
            expect: Expect::Listing { scope: path.clone(), recursive, started: false },
            decoder: FrameDecoder::new(MAX_DATA_BODY),
            done: false,
        };
        (ex, Msg::FetchListing { req_id, path, recursive })
    }

    pub fn req_id(&self) -> u64 {
        self.req_id
    }

    /// The answer is complete.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Bytes that arrived on the stream: the events they complete, or the reason to close
    /// the connection.
    pub fn handle_stream_data(&mut self, bytes: &[u8]) -> Result<Vec<FetchEvent>, CloseReason> {
        self.decoder.push(bytes);
        let mut events = Vec::new();
        loop {
            let frame = match self.decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(events),
                Err(FrameError::Version { theirs, ours }) => {
                    return Err(CloseReason::VersionMismatch {
                        local: Side::Client,
                        ours,
                        theirs,
                    })
                }
                Err(e) => return Err(self.violation(format!("sent {e}"))),
            };
            if self.done {
                let name = match &frame {
                    Frame::Data { .. } => "Data",
                    Frame::Other(msg) => msg.name(),
                };
                return Err(self.violation(format!("{name} after the answer was complete")));
            }
            events.push(match frame {
                Frame::Data { req_id, offset, bytes } => self.check_data(req_id, offset, bytes)?,
                Frame::Other(msg) => self.check(msg)?,
            });
        }
    }

    /// The server finished the stream: a violation unless the answer was complete.
    pub fn handle_stream_finished(&mut self) -> Result<(), CloseReason> {
        if let Err(e) = self.decoder.finish() {
            return Err(self.violation(format!("sent {e}")));
        }
        if !self.done {
            return Err(self.violation("ended the stream before the answer was complete".into()));
        }
        Ok(())
    }

    /// A `Data` message: for this request, inside the unanswered part of the range asked.
    fn check_data(&mut self, id: u64, offset: u64, bytes: DataBytes) -> Result<FetchEvent, CloseReason> {
        self.check_id("Data", id)?;
        let Expect::Data { end, next, .. } = &mut self.expect else {
            return Err(self.violation("Data does not answer this request".into()));
        };
        let chunk_end = offset.checked_add(bytes.len() as u64);
        if offset < *next || bytes.is_empty() || chunk_end.is_none_or(|e| e > *end) {
            let (next, end) = (*next, *end);
            return Err(self.violation(format!(
                "Data of {} bytes at {offset}, outside the unanswered part [{next}, {end}) of the request",
                bytes.len()
            )));
        }
        *next = chunk_end.unwrap_or(*end);
        Ok(FetchEvent::Data { offset, bytes })
    }

    fn check_id(&self, name: &str, id: u64) -> Result<(), CloseReason> {
        if id != self.req_id {
            return Err(self.violation(format!(
                "{name} for request {id} on the stream of request {}",
                self.req_id
            )));
        }
        Ok(())
    }

    /// Any message but `Data` ([`check_data`](Self::check_data): the decoder hands it over
    /// apart).
    fn check(&mut self, msg: Msg) -> Result<FetchEvent, CloseReason> {
        let id = match &msg {
            Msg::DataEnd { req_id, .. }
            | Msg::Attrs { req_id, .. }
            | Msg::Gone { req_id }
            | Msg::Listing { req_id, .. }
            | Msg::ListingEnd { req_id, .. }
            | Msg::Unreadable { req_id, .. } => *req_id,
            other => {
                let detail = if other.sender() == Side::Client {
                    format!("{} is a client message", other.name())
                } else {
                    format!(
                        "{} belongs on the control stream, not a fetch stream",
                        other.name()
                    )
                };
                return Err(self.violation(detail));
            }
        };
        self.check_id(msg.name(), id)?;
        match (&mut self.expect, msg) {
            (Expect::Data { start, next, .. }, Msg::DataEnd { file_size, .. }) => {
                // Bytes cannot have come from past the file's end as it was read.
                let next = *next;
                if next > *start && file_size < next {
                    return Err(self.violation(format!(
                        "DataEnd with file size {file_size} after data up to {next}"
                    )));
                }
                self.done = true;
                Ok(FetchEvent::End { file_size })
            }
            (Expect::Attrs { count, links: asked }, Msg::Attrs { attrs, links, .. }) => {
                if attrs.len() != *count {
                    let count = *count;
                    return Err(self.violation(format!(
                        "Attrs with {} answers for {count} paths",
                        attrs.len()
                    )));
                }
                if let Some(problem) = links_problem(&attrs, &links, *asked) {
                    return Err(self.violation(format!("Attrs with {problem}")));
                }
                self.done = true;
                Ok(FetchEvent::Attrs(attrs, links))
            }
            // Gone only instead of data, not after some of it.
            (Expect::Data { start, next, .. }, Msg::Gone { .. }) if next == start => {
                self.done = true;
                Ok(FetchEvent::Gone)
            }
            (Expect::Listing { started: false, .. }, Msg::Gone { .. }) => {
                self.done = true;
                Ok(FetchEvent::Gone)
            }
            (Expect::Listing { scope, recursive, started }, Msg::Listing { entries, .. }) => {
                for e in &entries {
                    let problem = wire_path_problem(&e.path)
                        .map(str::to_string)
                        .or_else(|| inline_data_problem(e))
                        .or_else(|| listing_problem(scope, *recursive, *started, e));
                    if let Some(problem) = problem {
                        let detail = format!("Listing entry {:?} {problem}", e.path.display());
                        return Err(self.violation(detail));
                    }
                    *started = true;
                }
                Ok(FetchEvent::Listing(entries))
            }
            (Expect::Listing { started: true, .. }, Msg::ListingEnd { seq, .. }) => {
                self.done = true;
                Ok(FetchEvent::ListingEnd { seq })
            }
            (_, Msg::Unreadable { reason, .. }) => {
                self.done = true;
                Ok(FetchEvent::Unreadable { reason })
            }
            (_, msg) => Err(self.violation(format!("{} does not answer this request", msg.name()))),
        }
    }

    fn violation(&self, detail: String) -> CloseReason {
        CloseReason::Violation {
            peer: Side::Server,
            detail: format!("on fetch stream {}: {detail}", self.req_id),
        }
    }
}

/// Why a listing entry does not belong in the answer to a listing of `scope`: the first
/// entry is the directory itself, every later one lies beneath it (directly, unless the
/// listing is recursive).
fn listing_problem(scope: &RelPath, recursive: bool, started: bool, e: &ManifestEntry) -> Option<String> {
    let path = e.path.as_bytes();
    if !started {
        if path != scope.as_bytes() {
            return Some("comes first, where the directory asked for belongs".into());
        }
        if e.attrs.kind != FileKind::Directory {
            return Some(format!("is the listed directory, but a {:?}", e.attrs.kind));
        }
        return None;
    }
    let scope = scope.as_bytes();
    let rest = if scope.is_empty() {
        Some(path)
    } else {
        path.strip_prefix(scope).and_then(|r| r.strip_prefix(b"/"))
    };
    match rest {
        None | Some([]) => Some("is not beneath the directory asked for".into()),
        Some(r) if !recursive && r.contains(&b'/') => {
            Some("is deeper than the children asked for".into())
        }
        Some(_) => None,
    }
}

/// What is wrong with an `Attrs` answer's links, if anything: links not asked for, not one
/// per path, beside nothing or a directory, too many names, or a name that is not a path
/// beneath the root (the root itself included).
fn links_problem(attrs: &[Option<Attrs>], links: &[Option<Links>], asked: bool) -> Option<String> {
    if links.is_empty() {
        return None;
    }
    if !asked || links.len() != attrs.len() {
        return Some(format!("{} links for {} paths (asked: {asked})", links.len(), attrs.len()));
    }
    for (i, (a, l)) in attrs.iter().zip(links).enumerate() {
        let Some(l) = l else { continue };
        match a {
            Some(a) if a.kind != FileKind::Directory => {}
            _ => return Some(format!("links for answer {i}, which is no object or a directory")),
        }
        if l.names.len() > MAX_LINK_NAMES {
            return Some(format!("{} link names for answer {i} ({MAX_LINK_NAMES} allowed)", l.names.len()));
        }
        for n in &l.names {
            if n.as_bytes().is_empty() {
                return Some(format!("the root as a link name of answer {i}"));
            }
            if let Some(p) = wire_path_problem(n) {
                return Some(format!("link name {:?} of answer {i}: {p}", n.display()));
            }
        }
    }
    None
}
