//! The replication protocol between a server and its replication clients, as sans-IO state
//! machines (docs/protocol.md is the specification).
//!
//! Nothing here touches a socket, a file or a clock. A driver owns the QUIC connection,
//! the journal and the replayer, and:
//! - feeds each session what arrives (`handle_stream_data`, `handle_stream_finished`), the
//!   answers to what the session asked (`handle_journal`, `handle_manifest_*`,
//!   `handle_applied`), and the time (`now` on every call, `handle_timeout` when
//!   `poll_timeout` says);
//! - then drains `poll_output` and carries out each output in order: write a message with
//!   [`encode`], read the journal, walk the tree, apply an entry, persist and acknowledge,
//!   or close the connection with [`CloseReason::code`] and its text.
//!
//! [`ServerSession`] and [`ClientSession`] run the control stream; [`FetchRequestReader`]
//! and [`FetchExchange`] check the two ends of a fetch stream.

mod client;
mod messages;
mod server;
#[cfg(test)]
mod tests;

pub use client::{
    ClientConfig, ClientOutput, ClientSession, ClientState, FetchEvent, FetchExchange,
};
pub use messages::{
    decode_body, encode, encode_bytes, volume_id, wire_path_problem, xattrs_size_estimate, AttachedData,
    DataBytes, EncodeError, Frame, FrameDecoder,
    FrameError, FullSyncReason, Links, ManifestEntry, Msg, Side, Start, StreamKind, VolumeId, DATA_CHUNK,
    HEADER_LEN, INLINE_DATA_MAX, MAX_ATTRS_PATHS, MAX_CONTROL_BODY, MAX_LINK_NAMES, MAX_DATA_BODY, MAX_PATH_LEN,
    PROTOCOL_VERSION, BODY_AHEAD,
};
pub use server::{
    Attached, FetchRequest, FetchRequestReader, ServerConfig, ServerOutput, ServerSession, ATTACHED_BUDGET,
};

use crate::op::JournalEntry;

/// Why a session closed its connection. The text is for the operator on both sides: the
/// driver logs it and sends it with [`code`](Self::code) in QUIC's CONNECTION_CLOSE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    #[error("{side} shut down: {detail}")]
    Shutdown { side: Side, detail: String },
    #[error("{}", version_mismatch_text(*local, *ours, *theirs))]
    VersionMismatch { local: Side, ours: u16, theirs: u16 },
    #[error("the {peer} broke the protocol: {detail}; closing this connection (a bug or a hostile peer; nothing else is affected)")]
    Violation { peer: Side, detail: String },
    #[error("the server refused service: {reason}")]
    Refused { reason: String },
    #[error("timed out: {what}")]
    Timeout { what: String },
    #[error(
        "the client fell behind the server journal's retention while connected (first retained seq \
         {first_retained}); it reconnects and resyncs in full; raise the server's retention if this recurs"
    )]
    Expired { first_retained: u64 },
    #[error("internal error on the {side}: {detail}; see that side's log")]
    Internal { side: Side, detail: String },
}

impl CloseReason {
    /// The QUIC application error code (docs/protocol.md, close reasons).
    pub fn code(&self) -> u32 {
        match self {
            CloseReason::Shutdown { .. } => 0,
            CloseReason::VersionMismatch { .. } => 1,
            CloseReason::Violation { .. } => 2,
            CloseReason::Refused { .. } => 3,
            CloseReason::Timeout { .. } => 4,
            CloseReason::Expired { .. } => 5,
            CloseReason::Internal { .. } => 6,
        }
    }
}

fn version_mismatch_text(local: Side, ours: u16, theirs: u16) -> String {
    let peer = local.other();
    let (local_v, peer_v) = (ours, theirs);
    let older = if local_v < peer_v { local } else { peer };
    format!(
        "this {local} speaks imezzo protocol {local_v} and the {peer} speaks protocol {peer_v}: upgrade the {older}"
    )
}

/// The answer to a [`ServerOutput::ReadJournal`]: the journal's `read_from`, in the
/// protocol's own terms so the session does not depend on the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalRead {
    /// Retained entries from the asked seq on, in seq order, possibly with superseded gaps;
    /// empty when there is nothing after it yet.
    Entries(Vec<JournalEntry>),
    /// The asked seq is below the first retained one.
    Expired { first_retained: u64 },
    /// The asked seq is past the journal's last seq + 1.
    AheadOfJournal { last_seq: u64 },
    /// The read failed.
    Failed { reason: String },
}
