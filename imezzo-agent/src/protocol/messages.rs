//! What travels between server and client: the [`Msg`] enum, its framing
//! (`u32 body_len | u16 version | rkyv body`), and the checks every received frame passes
//! before any field is used. docs/protocol.md is the specification.

use crate::attrs::{Attrs, FileKind};
use crate::op::{JournalEntry, Op, RelPath};

/// The protocol version this agent speaks; it travels in every frame header.
pub const PROTOCOL_VERSION: u16 = 6;
/// Bytes of a frame header: `u32` body length then `u16` version, both little-endian.
pub const HEADER_LEN: usize = 6;
/// Largest body accepted on the control stream (both directions) and from a client on a
/// fetch stream.
pub const MAX_CONTROL_BODY: usize = 1 << 20;
/// Largest body accepted from the server on a fetch stream (a `Data` chunk plus its
/// envelope, or an `Attrs` answer with many xattrs).
pub const MAX_DATA_BODY: usize = 16 << 20;
/// What a [`FrameDecoder`] allocates for a body before its bytes come, and the least it grows
/// it by: the declared length alone reserves nothing more (a hostile header costs at most
/// this), and a body never holds more than twice its received bytes plus this.
pub const BODY_AHEAD: usize = 64 << 10;
/// Largest `bytes` of one `Data` frame.
pub const DATA_CHUNK: usize = 1 << 20;
/// Longest path accepted from the wire (Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;
/// Most paths in one `FetchAttrs`.
pub const MAX_ATTRS_PATHS: usize = 1024;
/// Most other names of one object in an `Attrs` answer ([`Links::names`]).
pub const MAX_LINK_NAMES: usize = 64;
/// Largest regular file whose content may travel inside its manifest entry (`data`).
pub const INLINE_DATA_MAX: u64 = 64 << 10;

/// A journal's volume id: the big-endian bytes of the journal's `u128` (journal.md).
pub type VolumeId = [u8; 16];

/// The wire form of a journal's volume id.
pub fn volume_id(v: u128) -> VolumeId {
    v.to_be_bytes()
}

/// Every message of the protocol, on every stream and in both directions. One enum, so a
/// message on the wrong stream or from the wrong side is recognised and named.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Msg {
    // Control stream, client to server.
    Hello {
        volume_id: Option<VolumeId>,
        last_applied: Option<u64>,
        window: u32,
        agent: String,
    },
    Ack {
        applied_seq: u64,
    },
    // Control stream, server to client.
    Welcome {
        volume_id: VolumeId,
        start: Start,
        agent: String,
    },
    Refuse {
        reason: String,
    },
    Entries {
        from_seq: u64,
        entries: Vec<JournalEntry>,
    },
    Manifest {
        entries: Vec<ManifestEntry>,
    },
    ManifestEnd {
        seq: u64,
        /// The journal's last seq the server knew when its walk ended: above `seq`, the
        /// tree changed while it was walked, and the manifest may mix moments.
        journal_last: u64,
    },
    Heartbeat {
        sent_through: u64,
        journal_last: u64,
    },
    // Fetch streams, client to server.
    Fetch {
        req_id: u64,
        path: RelPath,
        offset: u64,
        len: u64,
        ino: Option<u64>,
    },
    FetchAttrs {
        req_id: u64,
        paths: Vec<RelPath>,
        /// Answer with each object's [`Links`] too (repairs ask; replay's prefetch does not).
        links: bool,
    },
    /// The directory `path` and what it holds, as manifest entries: its children only, or
    /// (`recursive`) its whole subtree. Answered `Listing`* then `ListingEnd`, or `Gone`
    /// (no directory there now) or `Unreadable`.
    FetchListing {
        req_id: u64,
        path: RelPath,
        recursive: bool,
    },
    // Fetch streams, server to client.
    Data {
        req_id: u64,
        offset: u64,
        bytes: Vec<u8>,
    },
    DataEnd {
        req_id: u64,
        file_size: u64,
    },
    Attrs {
        req_id: u64,
        attrs: Vec<Option<Attrs>>,
        /// Empty unless `FetchAttrs` asked for `links`; then one per path, `Some` only for
        /// a non-directory the server found with more than one link.
        links: Vec<Option<Links>>,
    },
    Gone {
        req_id: u64,
    },
    /// Entries of a `FetchListing` answer, in walk order: the directory first, every
    /// directory before what it holds.
    Listing {
        req_id: u64,
        entries: Vec<ManifestEntry>,
    },
    /// The listing is complete. `seq`: the journal's last seq when the walk began; the
    /// listing shows the tree as of that seq or later.
    ListingEnd {
        req_id: u64,
        seq: u64,
    },
    Unreadable {
        req_id: u64,
        reason: String,
    },
    // Control stream, server to client (protocol 5; last, so the others keep their tags).
    /// The master's state, read after the entries through `through_seq` were journalled
    /// and sent before them: what replay would otherwise fetch for them (the attributes of
    /// the paths they name and their parents, the bytes they write: small files whole,
    /// short ranges of larger ones),
    /// so a batch of small changes costs no fetch round trip. Valid for entries up to
    /// `through_seq` only; a later `Attached` replaces it.
    Attached {
        through_seq: u64,
        attrs: Vec<(RelPath, Option<Attrs>)>,
        data: Vec<AttachedData>,
    },
}

/// Where a client starts, chosen by the server in `Welcome`.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Start {
    /// The journal holds everything after the client's last applied seq.
    Resume { from_seq: u64 },
    /// The client rebuilds from a manifest consistent with `manifest_seq`.
    FullSync {
        manifest_seq: u64,
        why: FullSyncReason,
    },
}

/// Why the server sends a full sync; for the operator's logs.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum FullSyncReason {
    /// The client has no complete replica (new, or a full sync was interrupted).
    NewClient,
    /// The client's replica belongs to another volume.
    OtherVolume { client_volume: VolumeId },
    /// Entries the client needs were dropped by retention.
    Expired { first_retained: u64 },
    /// The client applied entries this journal never wrote (journal replaced or restored).
    AheadOfJournal { last_seq: u64 },
}

impl std::fmt::Display for FullSyncReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FullSyncReason::NewClient => write!(f, "the client has no complete replica yet"),
            FullSyncReason::OtherVolume { client_volume } => {
                write!(f, "the client's replica belongs to volume {}", hex::encode(client_volume))
            }
            FullSyncReason::Expired { first_retained } => write!(
                f,
                "the client's resume point is older than the journal's first retained seq {first_retained} \
                 (raise the server's retention if this happens often)"
            ),
            FullSyncReason::AheadOfJournal { last_seq } => write!(
                f,
                "the client applied entries past the journal's last seq {last_seq} (was the server's journal replaced?)"
            ),
        }
    }
}

/// One object of a full-sync manifest.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ManifestEntry {
    pub path: RelPath,
    pub attrs: Attrs,
    /// The xattrs were too large to travel inline: `attrs.xattrs` is empty and the client
    /// fetches them with `FetchAttrs`.
    pub xattrs_omitted: bool,
    /// Shared by every name of one multiply-linked regular file within this manifest.
    pub link_group: Option<u64>,
    /// The whole content of a regular file of at most [`INLINE_DATA_MAX`] bytes, when the
    /// server chose to send it here rather than have the client fetch it; its length is
    /// `attrs.size`.
    pub data: Option<Vec<u8>>,
}

/// Bytes of the regular file at `path` from `offset` on, as the inode `ino` held them when
/// the server read them: the whole content of a small file (`offset` 0), or the range a
/// write entry names in a larger one. At most [`INLINE_DATA_MAX`] bytes. `to_eof`: the file
/// ended where these bytes end.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct AttachedData {
    pub path: RelPath,
    pub ino: u64,
    pub offset: u64,
    pub bytes: Vec<u8>,
    pub to_eof: bool,
}

/// A multiply-linked master object's identity and the other names the server knows it
/// by, so that a client recreating one name from the master's current state makes the
/// others links of it rather than separate objects (docs/reliability.md, repairs).
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Links {
    /// The master's inode number (groups answers about several names of one object).
    pub ino: u64,
    /// The master's link count: `names` may be fewer (names outside the export, names
    /// the server does not know yet, more than [`MAX_LINK_NAMES`]).
    pub nlink: u64,
    /// Other names of this inode now, each checked on the master just before the answer;
    /// never the asked path, at most [`MAX_LINK_NAMES`].
    pub names: Vec<RelPath>,
}

/// Which side of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Server => "server",
            Side::Client => "client",
        })
    }
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Server => Side::Client,
            Side::Client => Side::Server,
        }
    }
}

/// Which kind of stream a message belongs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Control,
    Fetch,
}

impl Msg {
    /// The message's name, for close reasons and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::Ack { .. } => "Ack",
            Msg::Welcome { .. } => "Welcome",
            Msg::Refuse { .. } => "Refuse",
            Msg::Entries { .. } => "Entries",
            Msg::Attached { .. } => "Attached",
            Msg::Manifest { .. } => "Manifest",
            Msg::ManifestEnd { .. } => "ManifestEnd",
            Msg::Heartbeat { .. } => "Heartbeat",
            Msg::Fetch { .. } => "Fetch",
            Msg::FetchAttrs { .. } => "FetchAttrs",
            Msg::Data { .. } => "Data",
            Msg::DataEnd { .. } => "DataEnd",
            Msg::Attrs { .. } => "Attrs",
            Msg::Gone { .. } => "Gone",
            Msg::FetchListing { .. } => "FetchListing",
            Msg::Listing { .. } => "Listing",
            Msg::ListingEnd { .. } => "ListingEnd",
            Msg::Unreadable { .. } => "Unreadable",
        }
    }

    /// The side that may send this message.
    pub fn sender(&self) -> Side {
        match self {
            Msg::Hello { .. }
            | Msg::Ack { .. }
            | Msg::Fetch { .. }
            | Msg::FetchAttrs { .. }
            | Msg::FetchListing { .. } => Side::Client,
            _ => Side::Server,
        }
    }

    /// The stream this message travels on.
    pub fn stream(&self) -> StreamKind {
        match self {
            Msg::Fetch { .. }
            | Msg::FetchAttrs { .. }
            | Msg::Data { .. }
            | Msg::DataEnd { .. }
            | Msg::Attrs { .. }
            | Msg::Gone { .. }
            | Msg::FetchListing { .. }
            | Msg::Listing { .. }
            | Msg::ListingEnd { .. }
            | Msg::Unreadable { .. } => StreamKind::Fetch,
            _ => StreamKind::Control,
        }
    }
}

/// Why a received frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of protocol version {theirs} (this agent speaks {ours})")]
    Version { theirs: u16, ours: u16 },
    #[error("a frame of {len} bytes, over this stream's limit of {max}")]
    Oversized { len: usize, max: usize },
    #[error("a malformed frame ({0})")]
    Malformed(String),
    #[error("a stream that ended inside a frame ({buffered} bytes of an unfinished frame)")]
    Truncated { buffered: usize },
}

/// Why a message could not be encoded; a bug of the sender, never of the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("a {name} message of {len} bytes exceeds the largest frame ({max}); this is a bug: please report it")]
    TooLarge {
        name: &'static str,
        len: usize,
        max: usize,
    },
    #[error("cannot archive a {name} message: {reason}")]
    Archive { name: &'static str, reason: String },
}

/// One frame: header and archived body, ready to write to a stream.
pub fn encode(msg: &Msg) -> Result<Vec<u8>, EncodeError> {
    encode_bytes(msg).map(|frame| frame.to_vec())
}

/// [`encode`], as `Bytes` that a QUIC stream takes without copying (`write_chunk`): the
/// body is archived straight behind room left for the header, in one buffer sized ahead
/// for the message, so a 1 MiB `Data` frame costs one copy of its bytes, not four.
pub fn encode_bytes(msg: &Msg) -> Result<bytes::Bytes, EncodeError> {
    // The body starts 16 bytes in: rkyv aligns relative to the buffer's start, so a
    // 16-byte lead gives the body the very layout it would have on its own.
    const LEAD: usize = 16;
    let hint = match msg {
        Msg::Data { bytes, .. } => bytes.len() + 64,
        Msg::Entries { entries, .. } => entries.len() * 160,
        Msg::Attached { attrs, data, .. } => {
            attrs.len() * 256 + data.iter().map(|d| d.bytes.len() + 64).sum::<usize>()
        }
        Msg::Manifest { entries } | Msg::Listing { entries, .. } => entries.len() * 256,
        _ => 256,
    };
    let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(LEAD + hint);
    buf.extend_from_slice(&[0u8; LEAD]);
    let mut buf =
        rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(msg, buf).map_err(|e| {
            EncodeError::Archive {
                name: msg.name(),
                reason: e.to_string(),
            }
        })?;
    let body_len = buf.len() - LEAD;
    if body_len > MAX_DATA_BODY {
        return Err(EncodeError::TooLarge {
            name: msg.name(),
            len: body_len,
            max: MAX_DATA_BODY,
        });
    }
    buf[LEAD - HEADER_LEN..LEAD - 2].copy_from_slice(&(body_len as u32).to_le_bytes());
    buf[LEAD - 2..LEAD].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    Ok(bytes::Bytes::from_owner(buf).slice(LEAD - HEADER_LEN..))
}

/// Validates and deserializes one frame body (without its header).
pub fn decode_body(body: &[u8]) -> Result<Msg, FrameError> {
    // rkyv's validation checks alignment; a body sliced out of a stream buffer has none,
    // so it is copied into an aligned buffer first.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    decode_aligned(&aligned)
}

/// Validates and deserializes a body that already lies in an aligned buffer.
fn decode_aligned(body: &rkyv::util::AlignedVec<16>) -> Result<Msg, FrameError> {
    rkyv::from_bytes::<Msg, rkyv::rancor::Error>(body)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// A message as [`FrameDecoder::next_frame`] gives it.
#[derive(Debug)]
pub enum Frame {
    /// A `Data` message, its bytes where they arrived.
    Data {
        req_id: u64,
        offset: u64,
        bytes: DataBytes,
    },
    /// Any other message, decoded.
    Other(Msg),
}

/// A `Data` message's bytes inside the frame body they arrived in.
#[derive(Clone)]
pub struct DataBytes {
    body: rkyv::util::AlignedVec<16>,
    start: usize,
    len: usize,
}

impl std::ops::Deref for DataBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.body[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for DataBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataBytes({} bytes)", self.len)
    }
}

impl PartialEq for DataBytes {
    fn eq(&self, other: &DataBytes) -> bool {
        **self == **other
    }
}

impl Eq for DataBytes {}

/// Splits a stream's bytes into messages. Feed it what the stream delivers with
/// [`push`](Self::push), then take messages with [`next_msg`](Self::next_msg) until `None`.
///
/// Each body is gathered straight into its own 16-byte aligned buffer, sized from the
/// header once the header has been checked, and validated where it lies: a byte from the
/// network is copied once before rkyv reads it, however the stream chopped the frames.
#[derive(Debug)]
pub struct FrameDecoder {
    /// The header being gathered.
    head: [u8; HEADER_LEN],
    head_len: usize,
    /// The body being gathered, and its length from the header.
    body: Option<(rkyv::util::AlignedVec<16>, usize)>,
    /// Whole bodies not yet decoded, in order.
    ready: std::collections::VecDeque<rkyv::util::AlignedVec<16>>,
    max_body: usize,
    /// Set at the first error: the stream is unusable from there on (reported once the
    /// bodies before it have been taken).
    failed: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder accepting bodies of at most `max_body` bytes.
    pub fn new(max_body: usize) -> FrameDecoder {
        FrameDecoder {
            head: [0; HEADER_LEN],
            head_len: 0,
            body: None,
            ready: std::collections::VecDeque::new(),
            max_body,
            failed: None,
        }
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.failed.is_none() {
            match &mut self.body {
                None => {
                    let take = (HEADER_LEN - self.head_len).min(bytes.len());
                    self.head[self.head_len..self.head_len + take].copy_from_slice(&bytes[..take]);
                    self.head_len += take;
                    bytes = &bytes[take..];
                    if self.head_len == HEADER_LEN {
                        self.start_body();
                    }
                }
                Some((body, len)) => {
                    let take = (*len - body.len()).min(bytes.len());
                    // Grown as bytes arrive, to at most twice what came plus BODY_AHEAD: a
                    // header declaring 16 MiB costs nothing until about 8 MiB have come.
                    // Doubling (not BODY_AHEAD at a time) keeps the copies of regrowth below
                    // one per byte: a 1 MiB body grown 64 KiB at a time was copied 7 times
                    // over.
                    let need = body.len() + take;
                    if body.capacity() < need {
                        let want = (need + BODY_AHEAD).max(2 * body.capacity()).min(*len);
                        body.reserve_exact(want - body.len());
                    }
                    body.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if body.len() == *len {
                        let (body, _) = self.body.take().expect("matched above");
                        self.ready.push_back(body);
                    }
                }
            }
        }
    }

    /// A whole header is in: checks it, then opens the body's buffer.
    fn start_body(&mut self) {
        let h = self.head;
        self.head_len = 0;
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let version = u16::from_le_bytes([h[4], h[5]]);
        // The version first: a peer of another version may frame differently, and "upgrade"
        // is the useful message, not "oversized".
        if version != PROTOCOL_VERSION {
            self.failed = Some(FrameError::Version {
                theirs: version,
                ours: PROTOCOL_VERSION,
            });
            return;
        }
        // Checked before anything is allocated for the body.
        if len > self.max_body {
            self.failed = Some(FrameError::Oversized {
                len,
                max: self.max_body,
            });
            return;
        }
        let body = rkyv::util::AlignedVec::<16>::with_capacity(len.min(BODY_AHEAD));
        if len == 0 {
            self.ready.push_back(body);
        } else {
            self.body = Some((body, len));
        }
    }

    /// The next complete message, `Ok(None)` when more bytes are needed. After an error
    /// every call returns the same error.
    pub fn next_msg(&mut self) -> Result<Option<Msg>, FrameError> {
        let Some(body) = self.next_body()? else {
            return Ok(None);
        };
        decode_aligned(&body).map(Some).map_err(|e| self.fail(e))
    }

    /// [`next_msg`](Self::next_msg), except that a `Data` message's bytes are left in the
    /// body they arrived in (validated all the same): decoding them into the message's
    /// `Vec` would copy every fetched byte once more.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some(body) = self.next_body()? else {
            return Ok(None);
        };
        let archived = rkyv::access::<ArchivedMsg, rkyv::rancor::Error>(&body)
            .map_err(|e| self.fail(FrameError::Malformed(e.to_string())))?;
        let data = match archived {
            ArchivedMsg::Data { req_id, offset, bytes } => Some((
                req_id.to_native(),
                offset.to_native(),
                bytes.as_ptr() as usize - body.as_ptr() as usize,
                bytes.len(),
            )),
            _ => None,
        };
        if let Some((req_id, offset, start, len)) = data {
            let bytes = DataBytes { body, start, len };
            return Ok(Some(Frame::Data { req_id, offset, bytes }));
        }
        match rkyv::deserialize::<Msg, rkyv::rancor::Error>(archived) {
            Ok(msg) => Ok(Some(Frame::Other(msg))),
            Err(e) => Err(self.fail(FrameError::Malformed(e.to_string()))),
        }
    }

    /// The next whole body, still archived; after an error, once the bodies before it are
    /// taken, the error.
    fn next_body(&mut self) -> Result<Option<rkyv::util::AlignedVec<16>>, FrameError> {
        if let Some(body) = self.ready.pop_front() {
            return Ok(Some(body));
        }
        match self.failed.clone() {
            Some(e) => Err(self.fail(e)),
            None => Ok(None),
        }
    }

    /// The stream is unusable from here on: every later call returns `e`, and nothing of a
    /// refused stream is kept.
    fn fail(&mut self, e: FrameError) -> FrameError {
        self.failed = Some(e.clone());
        self.ready.clear();
        self.body = None;
        self.head_len = 0;
        e
    }

    /// Bytes allocated for the body being gathered (at most twice what came plus [`BODY_AHEAD`]).
    pub fn body_capacity(&self) -> usize {
        self.body.as_ref().map_or(0, |(b, _)| b.capacity())
    }

    /// Bytes received but not yet returned as a message.
    pub fn buffered(&self) -> usize {
        self.head_len
            + self.body.as_ref().map_or(0, |(b, _)| b.len())
            + self
                .ready
                .iter()
                .map(|b| HEADER_LEN + b.len())
                .sum::<usize>()
    }

    /// The stream ended: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None if self.buffered() > 0 => Err(FrameError::Truncated {
                buffered: self.buffered(),
            }),
            None => Ok(()),
        }
    }
}

/// What is wrong with a path from the wire, if anything: it must be relative,
/// `/`-separated, without empty, `.` or `..` components or NUL, at most [`MAX_PATH_LEN`]
/// bytes; `""` is the root.
pub fn wire_path_problem(path: &RelPath) -> Option<&'static str> {
    let p = path.as_bytes();
    if p.is_empty() {
        return None;
    }
    if p.len() > MAX_PATH_LEN {
        return Some("is longer than PATH_MAX");
    }
    if p.contains(&0) {
        return Some("contains a NUL byte");
    }
    if p[0] == b'/' {
        return Some("is absolute");
    }
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" => return Some("has an empty component"),
            b"." => return Some("has a '.' component"),
            b".." => return Some("has a '..' component"),
            _ => {}
        }
    }
    None
}

/// The paths of an entry that name objects in the tree (a symlink's target is content, not
/// a path of the tree, and may legitimately be absolute).
pub(crate) fn entry_paths(op: &Op) -> [Option<&RelPath>; 2] {
    match op {
        Op::Link { path, new_path } | Op::Rename { path, new_path, .. } => {
            [Some(path), Some(new_path)]
        }
        other => [Some(other.path()), None],
    }
}

/// A generous estimate of an entry's archived size, used to keep frames far below the
/// control limit without encoding twice.
pub(crate) fn entry_size_estimate(e: &JournalEntry) -> usize {
    let var = match &e.op {
        Op::Symlink { path, target } => path.0.len() + target.0.len(),
        Op::Link { path, new_path } | Op::Rename { path, new_path, .. } => {
            path.0.len() + new_path.0.len()
        }
        Op::Setxattr { path, name } | Op::Removexattr { path, name } => path.0.len() + name.0.len(),
        Op::Rescan { path, reason } | Op::Relist { path, reason } => path.0.len() + reason.len(),
        other => other.path().0.len(),
    };
    // Fixed part: the enum's widest variant (under 100 bytes) plus padding of each buffer.
    128 + var
}

/// Like [`entry_size_estimate`] for a manifest entry.
pub(crate) fn manifest_size_estimate(m: &ManifestEntry) -> usize {
    176 + m.path.0.len()
        + m.attrs.symlink_target.as_ref().map_or(0, Vec::len)
        + xattrs_size_estimate(&m.attrs.xattrs)
        + m.data.as_ref().map_or(0, Vec::len)
}

/// What is wrong with a manifest entry's inline data, if anything: only a regular file's
/// content may travel inline, whole, and within [`INLINE_DATA_MAX`].
pub(crate) fn inline_data_problem(m: &ManifestEntry) -> Option<String> {
    let data = m.data.as_ref()?;
    if m.attrs.kind != FileKind::Regular {
        return Some(format!("carries inline data for a {:?}", m.attrs.kind));
    }
    if data.len() as u64 != m.attrs.size {
        return Some(format!(
            "carries {} bytes of inline data for a file of size {}",
            data.len(),
            m.attrs.size
        ));
    }
    if m.attrs.size > INLINE_DATA_MAX {
        return Some(format!(
            "carries {} bytes of inline data, over the limit of {INLINE_DATA_MAX}",
            data.len()
        ));
    }
    None
}

pub fn xattrs_size_estimate(x: &[(Vec<u8>, Vec<u8>)]) -> usize {
    x.iter().map(|(n, v)| 32 + n.len() + v.len()).sum()
}
