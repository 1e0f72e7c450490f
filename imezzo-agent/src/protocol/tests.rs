//! The protocol's behaviour, tested on a simulated pair of endpoints: one server session
//! over an in-memory journal, one client session over an in-memory replica, virtual time,
//! per-direction latency, held acknowledgements and disconnections. Every run is bounded
//! in steps, so a livelock fails instead of hanging.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::*;
use crate::attrs::{Attrs, FileKind};
use crate::op::{JournalEntry, Op, RelPath, Timestamp};

const VOLUME: VolumeId = [7; 16];
const MAX_STEPS: usize = 20_000;
const MAX_OUTPUTS_PER_STEP: usize = 100_000;

/// The journal entry with this seq: writes to one of a few paths, so later entries cover
/// earlier ones and supersession has something to drop.
fn entry(seq: u64) -> JournalEntry {
    JournalEntry {
        seq,
        op: Op::Write {
            path: RelPath(format!("f{}", seq % 7).into_bytes()),
            offset: 0,
            len: 10,
            source: None,
            mode: None,
            ino: Some(100 + seq % 7),
        },
    }
}

fn attrs(kind: FileKind, size: u64) -> Attrs {
    Attrs {
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        atime: Timestamp { sec: 1, nsec: 2 },
        mtime: Timestamp { sec: 3, nsec: 4 },
        size,
        rdev: 0,
        symlink_target: None,
        xattrs: Vec::new(),
    }
}

/// A journal in memory with the store's contract: consecutive seqs, a retained suffix with
/// superseded gaps, `Expired` below the first retained seq.
#[derive(Debug, Clone, Default)]
struct FakeJournal {
    /// Every entry ever appended: the model of the master tree.
    history: Vec<JournalEntry>,
    retained: Vec<JournalEntry>,
    first_retained: u64,
    last_seq: u64,
}

impl FakeJournal {
    fn new() -> FakeJournal {
        FakeJournal {
            first_retained: 1,
            ..Default::default()
        }
    }

    fn append(&mut self, n: u64) {
        for _ in 0..n {
            self.last_seq += 1;
            let e = entry(self.last_seq);
            self.history.push(e.clone());
            self.retained.push(e);
        }
    }

    fn read_from(&self, from: u64, max: usize) -> JournalRead {
        if from < self.first_retained {
            return JournalRead::Expired {
                first_retained: self.first_retained,
            };
        }
        if from > self.last_seq + 1 {
            return JournalRead::AheadOfJournal {
                last_seq: self.last_seq,
            };
        }
        JournalRead::Entries(
            self.retained
                .iter()
                .filter(|e| e.seq >= from)
                .take(max)
                .cloned()
                .collect(),
        )
    }

    /// Drops `seq`, which a later retained entry of the same path covers.
    fn supersede(&mut self, seq: u64) -> bool {
        let Some(i) = self.retained.iter().position(|e| e.seq == seq) else {
            return false;
        };
        let path = self.retained[i].op.path().clone();
        if !self.retained[i + 1..].iter().any(|e| e.op.path() == &path) {
            return false;
        }
        self.retained.remove(i);
        true
    }

    /// Drops every entry through `seq`.
    fn expire_through(&mut self, seq: u64) {
        self.retained.retain(|e| e.seq > seq);
        self.first_retained = self.first_retained.max(seq + 1);
    }

    /// The master tree as of `seq`: each path with the seq of its last change.
    fn tree_at(&self, seq: u64) -> BTreeMap<Vec<u8>, u64> {
        let mut t = BTreeMap::new();
        for e in self.history.iter().filter(|e| e.seq <= seq) {
            t.insert(e.op.path().0.clone(), e.seq);
        }
        t
    }
}

/// The client's replica in memory: each path with the seq of the change it reflects (for a
/// manifest entry, carried in `size`), and what the client keeps durably.
#[derive(Debug, Default)]
struct Replica {
    durable: ClientState,
    tree: BTreeMap<Vec<u8>, u64>,
    /// Seqs handed to `Apply`, in order, over every session.
    applied: Vec<u64>,
    manifest: Vec<ManifestEntry>,
    manifest_complete: Option<u64>,
    /// What the last `ManifestComplete` said of the walk racing with changes.
    manifest_raced: Option<bool>,
    full_syncs: Vec<(u64, FullSyncReason)>,
    /// `inline_data` of each `StartManifest` the server asked for.
    inline_asked: Vec<bool>,
    /// Hold `PersistAndAck` instead of doing it (a slow disk).
    hold_acks: bool,
    held: Vec<(VolumeId, u64)>,
}

struct Pair {
    now: Instant,
    latency: Duration,
    journal: FakeJournal,
    server_config: ServerConfig,
    client_config: ClientConfig,
    server: ServerSession,
    client: ClientSession,
    to_server: VecDeque<(Instant, Vec<u8>)>,
    to_client: VecDeque<(Instant, Vec<u8>)>,
    /// Drop everything the server sends (a one-way network cut).
    cut_to_client: bool,
    /// Entries appended to the journal while a manifest walk runs (the walk races them).
    race_appends: u64,
    replica: Replica,
    server_close: Option<CloseReason>,
    client_close: Option<CloseReason>,
    /// Every message the server sent, per session (index = session number).
    server_sent: Vec<Vec<Msg>>,
    /// Seqs sent in `Entries` during this session, and the last `Ack` the server received.
    sent_seqs: Vec<u64>,
    acked_at_server: u64,
    /// Largest number of entries ever in flight beyond the server's last received `Ack`.
    max_unacked: usize,
}

impl Pair {
    fn new() -> Pair {
        Pair::with(
            ClientState::default(),
            ServerConfig::default(),
            ClientConfig::default(),
        )
    }

    fn with(state: ClientState, server_config: ServerConfig, client_config: ClientConfig) -> Pair {
        let now = Instant::now();
        Pair {
            now,
            latency: Duration::ZERO,
            journal: FakeJournal::new(),
            server: ServerSession::with_config(VOLUME, now, server_config.clone()),
            client: ClientSession::with_config(state, now, client_config.clone()),
            server_config,
            client_config,
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            cut_to_client: false,
            race_appends: 0,
            replica: Replica {
                durable: state,
                ..Default::default()
            },
            server_close: None,
            client_close: None,
            server_sent: vec![Vec::new()],
            sent_seqs: Vec::new(),
            acked_at_server: 0,
            max_unacked: 0,
        }
    }

    fn append(&mut self, n: u64) {
        self.journal.append(n);
        self.server.handle_appended(self.now, self.journal.last_seq);
    }

    /// A restart of both agents (or a lost connection): in-flight bytes and held
    /// acknowledgements are lost, the replica's durable state and files remain.
    fn reconnect(&mut self) {
        self.to_server.clear();
        self.to_client.clear();
        self.replica.held.clear();
        self.server = ServerSession::with_config(VOLUME, self.now, self.server_config.clone());
        self.client =
            ClientSession::with_config(self.replica.durable, self.now, self.client_config.clone());
        self.server_close = None;
        self.client_close = None;
        self.server_sent.push(Vec::new());
        self.sent_seqs.clear();
        self.acked_at_server = 0;
    }

    /// Does everything that is due now; false when nothing was.
    fn step(&mut self) -> bool {
        let mut progress = false;
        // A session that keeps asking for work with nothing in between livelocks inside one
        // step: bound that too.
        for n in 0.. {
            let Some(o) = self.server.poll_output() else {
                break;
            };
            assert!(
                n < MAX_OUTPUTS_PER_STEP,
                "the server keeps producing outputs: a livelock ({o:?})"
            );
            progress = true;
            self.server_does(o);
        }
        for n in 0.. {
            let Some(o) = self.client.poll_output() else {
                break;
            };
            assert!(
                n < MAX_OUTPUTS_PER_STEP,
                "the client keeps producing outputs: a livelock ({o:?})"
            );
            progress = true;
            self.client_does(o);
        }
        while self.to_server.front().is_some_and(|(t, _)| *t <= self.now) {
            let (_, frame) = self.to_server.pop_front().unwrap();
            if let Ok(Msg::Ack { applied_seq }) = decode_body(&frame[HEADER_LEN..]) {
                self.acked_at_server = applied_seq;
            }
            self.server.handle_stream_data(self.now, &frame);
            progress = true;
        }
        while self.to_client.front().is_some_and(|(t, _)| *t <= self.now) {
            let (_, frame) = self.to_client.pop_front().unwrap();
            self.client.handle_stream_data(self.now, &frame);
            progress = true;
        }
        progress
    }

    /// Runs until nothing is left to do but wait for a timer; deliveries in flight are
    /// waited for (time jumps to them).
    fn run(&mut self) {
        for _ in 0..MAX_STEPS {
            if self.step() {
                continue;
            }
            let next = self
                .to_server
                .front()
                .map(|x| x.0)
                .into_iter()
                .chain(self.to_client.front().map(|x| x.0))
                .min();
            match next {
                Some(t) => self.set_time(t),
                None => return,
            }
        }
        panic!("no quiescence after {MAX_STEPS} steps: a livelock");
    }

    /// Lets `d` of virtual time pass, firing timers and deliveries as they fall due.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        for _ in 0..MAX_STEPS {
            self.run();
            let next = [self.server.poll_timeout(), self.client.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= end => self.set_time(t.max(self.now)),
                _ => {
                    self.now = end;
                    self.run();
                    return;
                }
            }
        }
        panic!("timers fired more than {MAX_STEPS} times in {d:?}");
    }

    fn set_time(&mut self, t: Instant) {
        self.now = t;
        if self.server.poll_timeout().is_some_and(|x| x <= t) {
            self.server.handle_timeout(t);
        }
        if self.client.poll_timeout().is_some_and(|x| x <= t) {
            self.client.handle_timeout(t);
        }
    }

    fn server_does(&mut self, o: ServerOutput) {
        match o {
            ServerOutput::Send(msg) => {
                if let Msg::Entries { entries, .. } = &msg {
                    self.sent_seqs.extend(entries.iter().map(|e| e.seq));
                    let unacked = self
                        .sent_seqs
                        .iter()
                        .filter(|&&s| s > self.acked_at_server)
                        .count();
                    self.max_unacked = self.max_unacked.max(unacked);
                }
                let frame = encode(&msg).expect("the server's messages encode");
                assert!(
                    frame.len() - HEADER_LEN <= MAX_CONTROL_BODY,
                    "{} frame over the control limit",
                    msg.name()
                );
                self.server_sent.last_mut().unwrap().push(msg);
                if !self.cut_to_client {
                    self.to_client.push_back((self.now + self.latency, frame));
                }
            }
            ServerOutput::ReadJournal { from, max } => {
                let read = self.journal.read_from(from, max);
                self.server.handle_journal(self.now, read);
            }
            ServerOutput::StartManifest { inline_data } => {
                self.replica.inline_asked.push(inline_data);
                let seq = self.journal.last_seq;
                self.server.handle_manifest_begin(self.now, seq);
                // The walk runs while capture keeps appending: it may see changes after
                // `seq`, which the stream then delivers again.
                self.journal.append(self.race_appends);
                let mut walk = vec![ManifestEntry {
                    path: RelPath::default(),
                    attrs: attrs(FileKind::Directory, 0),
                    xattrs_omitted: false,
                    link_group: None,
                    data: None,
                }];
                for (path, seq) in self.journal.tree_at(self.journal.last_seq) {
                    walk.push(ManifestEntry {
                        path: RelPath(path),
                        attrs: attrs(FileKind::Regular, seq),
                        xattrs_omitted: false,
                        link_group: None,
                        // As the real walk does, content only when asked, as long as `size`.
                        data: (inline_data && seq <= INLINE_DATA_MAX)
                            .then(|| vec![seq as u8; seq as usize]),
                    });
                }
                for chunk in walk.chunks(2) {
                    self.server
                        .handle_manifest_entries(self.now, chunk.to_vec());
                }
                // The driver hears of appends while the walk runs.
                self.server.handle_appended(self.now, self.journal.last_seq);
                self.server.handle_manifest_end(self.now);
            }
            ServerOutput::Close(r) => self.server_close = Some(r),
        }
    }

    fn client_does(&mut self, o: ClientOutput) {
        let r = &mut self.replica;
        match o {
            ClientOutput::Send(msg) => {
                let frame = encode(&msg).expect("the client's messages encode");
                self.to_server.push_back((self.now + self.latency, frame));
            }
            ClientOutput::BeginFullSync {
                volume_id,
                manifest_seq,
                why,
            } => {
                r.durable = ClientState {
                    volume_id: Some(volume_id),
                    last_applied: None,
                };
                r.full_syncs.push((manifest_seq, why));
                r.manifest.clear();
                r.manifest_complete = None;
                r.tree.clear();
            }
            // The simulated server attaches nothing (the driver's reads do).
            ClientOutput::Attached { .. } => {}
            ClientOutput::ApplyManifest(e) => {
                if e.attrs.kind == FileKind::Regular {
                    r.tree.insert(e.path.0.clone(), e.attrs.size);
                }
                r.manifest.push(e);
            }
            ClientOutput::ManifestComplete { seq, raced } => {
                r.manifest_complete = Some(seq);
                r.manifest_raced = Some(raced);
            }
            ClientOutput::Apply(e) => {
                r.tree.insert(e.op.path().0.clone(), e.seq);
                r.applied.push(e.seq);
            }
            ClientOutput::PersistAndAck { volume_id, seq } => {
                if r.hold_acks {
                    r.held.push((volume_id, seq));
                } else {
                    self.persist(volume_id, seq);
                }
            }
            ClientOutput::Close(reason) => self.client_close = Some(reason),
        }
    }

    fn persist(&mut self, volume_id: VolumeId, seq: u64) {
        self.replica.durable = ClientState {
            volume_id: Some(volume_id),
            last_applied: Some(seq),
        };
        self.client.handle_applied(self.now, seq);
    }

    /// The slow disk catches up: every held `PersistAndAck` is done.
    fn release_acks(&mut self) {
        for (v, seq) in std::mem::take(&mut self.replica.held) {
            self.persist(v, seq);
        }
    }

    fn welcome(&self, session: usize) -> Start {
        self.server_sent[session]
            .iter()
            .find_map(|m| match m {
                Msg::Welcome { start, .. } => Some(start.clone()),
                _ => None,
            })
            .expect("a Welcome was sent")
    }

    fn assert_open(&self) {
        assert_eq!(self.server_close, None, "the server closed");
        assert_eq!(self.client_close, None, "the client closed");
    }
}

fn full_sync(manifest_seq: u64, why: FullSyncReason) -> Start {
    Start::FullSync { manifest_seq, why }
}

// ---- handshake and streaming ----------------------------------------------------------

#[test]
fn new_client_gets_a_full_sync_then_the_stream() {
    let mut p = Pair::new();
    p.append(5);
    p.run();
    p.assert_open();
    assert_eq!(p.welcome(0), full_sync(5, FullSyncReason::NewClient));
    assert_eq!(p.replica.manifest_complete, Some(5));
    assert_eq!(p.replica.manifest_raced, Some(false));
    assert_eq!(
        p.replica.manifest[0].path,
        RelPath::default(),
        "the root comes first"
    );
    assert_eq!(p.replica.tree, p.journal.tree_at(5));
    assert_eq!(
        p.replica.durable,
        ClientState {
            volume_id: Some(VOLUME),
            last_applied: Some(5)
        }
    );
    assert!(p.replica.applied.is_empty());

    p.append(3);
    p.run();
    assert_eq!(p.replica.applied, [6, 7, 8]);
    assert_eq!(p.replica.durable.last_applied, Some(8));
    assert_eq!(p.server.acked_seq(), Some(8));
    assert_eq!(p.replica.tree, p.journal.tree_at(8));
    p.assert_open();
}

#[test]
fn client_resumes_after_a_disconnect_without_a_full_sync() {
    let mut p = Pair::new();
    p.append(5);
    p.run();
    p.append(4);
    p.run();
    p.reconnect();
    p.append(3);
    p.run();
    p.assert_open();
    assert_eq!(p.welcome(1), Start::Resume { from_seq: 10 });
    assert_eq!(
        p.replica.full_syncs.len(),
        1,
        "only the first connection synced in full"
    );
    assert_eq!(p.replica.applied, (6..=12).collect::<Vec<_>>());
    assert_eq!(p.replica.durable.last_applied, Some(12));
}

#[test]
fn entries_applied_but_not_yet_durable_are_sent_again_after_a_crash() {
    let mut p = Pair::new();
    p.append(5);
    p.run();
    p.replica.hold_acks = true;
    p.append(5);
    p.run();
    assert_eq!(p.replica.applied, [6, 7, 8, 9, 10]);
    assert_eq!(
        p.replica.durable.last_applied,
        Some(5),
        "nothing made durable yet"
    );
    p.replica.hold_acks = false;
    p.reconnect();
    p.run();
    p.assert_open();
    assert_eq!(p.welcome(1), Start::Resume { from_seq: 6 });
    assert_eq!(p.replica.applied, [6, 7, 8, 9, 10, 6, 7, 8, 9, 10]);
    assert_eq!(p.replica.durable.last_applied, Some(10));
}

#[test]
fn client_behind_retention_gets_a_full_sync() {
    let state = ClientState {
        volume_id: Some(VOLUME),
        last_applied: Some(3),
    };
    let mut p = Pair::with(state, ServerConfig::default(), ClientConfig::default());
    p.journal.append(20);
    p.journal.expire_through(10);
    p.run();
    p.assert_open();
    assert_eq!(
        p.welcome(0),
        full_sync(20, FullSyncReason::Expired { first_retained: 11 })
    );
    assert_eq!(p.replica.durable.last_applied, Some(20));
    assert_eq!(p.replica.tree, p.journal.tree_at(20));
}

#[test]
fn client_of_another_volume_gets_a_full_sync() {
    let other = [9; 16];
    let state = ClientState {
        volume_id: Some(other),
        last_applied: Some(3),
    };
    let mut p = Pair::with(state, ServerConfig::default(), ClientConfig::default());
    p.journal.append(4);
    p.run();
    p.assert_open();
    assert_eq!(
        p.welcome(0),
        full_sync(
            4,
            FullSyncReason::OtherVolume {
                client_volume: other
            }
        )
    );
    assert_eq!(
        p.replica.durable,
        ClientState {
            volume_id: Some(VOLUME),
            last_applied: Some(4)
        }
    );
}

#[test]
fn client_ahead_of_the_journal_gets_a_full_sync() {
    let state = ClientState {
        volume_id: Some(VOLUME),
        last_applied: Some(50),
    };
    let mut p = Pair::with(state, ServerConfig::default(), ClientConfig::default());
    p.journal.append(20);
    p.run();
    p.assert_open();
    assert_eq!(
        p.welcome(0),
        full_sync(20, FullSyncReason::AheadOfJournal { last_seq: 20 })
    );
    assert_eq!(p.replica.durable.last_applied, Some(20));
}

#[test]
fn interrupted_full_sync_starts_over_as_a_new_client() {
    let mut p = Pair::new();
    p.append(5);
    // The client records the volume with no last applied seq, then dies before the end.
    p.replica.hold_acks = true;
    p.run();
    assert_eq!(
        p.replica.durable,
        ClientState {
            volume_id: Some(VOLUME),
            last_applied: None
        }
    );
    p.replica.hold_acks = false;
    p.reconnect();
    p.run();
    p.assert_open();
    assert_eq!(p.welcome(1), full_sync(5, FullSyncReason::NewClient));
    assert_eq!(p.replica.durable.last_applied, Some(5));
}

#[test]
fn only_a_new_client_is_sent_file_content_inside_the_manifest() {
    let mut p = Pair::new();
    p.append(5);
    p.run();
    p.assert_open();
    assert_eq!(p.replica.inline_asked, [true]);
    let files: Vec<&ManifestEntry> = p
        .replica
        .manifest
        .iter()
        .filter(|e| e.attrs.kind == FileKind::Regular)
        .collect();
    assert!(!files.is_empty());
    assert!(
        files
            .iter()
            .all(|e| e.data.as_ref().map(Vec::len) == Some(e.attrs.size as usize)),
        "{files:?}"
    );

    // A client that fell out of retention probably holds most files already.
    let state = ClientState {
        volume_id: Some(VOLUME),
        last_applied: Some(3),
    };
    let mut p = Pair::with(state, ServerConfig::default(), ClientConfig::default());
    p.journal.append(20);
    p.journal.expire_through(10);
    p.run();
    p.assert_open();
    assert_eq!(p.replica.inline_asked, [false]);
    assert!(p.replica.manifest.iter().all(|e| e.data.is_none()));
}

#[test]
fn inline_data_that_is_not_a_whole_regular_file_is_a_violation() {
    let full = Msg::Welcome {
        volume_id: VOLUME,
        start: Start::FullSync {
            manifest_seq: 0,
            why: FullSyncReason::NewClient,
        },
        agent: String::new(),
    };
    let entry = |kind, size, data: &[u8]| ManifestEntry {
        path: "f".into(),
        attrs: attrs(kind, size),
        xattrs_omitted: false,
        link_group: None,
        data: Some(data.to_vec()),
    };
    let manifest = |e| Msg::Manifest {
        entries: vec![entry(FileKind::Regular, 1, b"a"), e],
    };

    let v = client_violation(
        ClientState::default(),
        &[full.clone(), manifest(entry(FileKind::Regular, 10, b"abc"))],
    );
    assert!(
        v.contains("3 bytes of inline data for a file of size 10"),
        "{v}"
    );
    let v = client_violation(
        ClientState::default(),
        &[full.clone(), manifest(entry(FileKind::Directory, 0, b""))],
    );
    assert!(v.contains("inline data for a Directory"), "{v}");
    let over = vec![0u8; INLINE_DATA_MAX as usize + 1];
    let too_big = manifest(entry(FileKind::Regular, over.len() as u64, &over));
    let v = client_violation(ClientState::default(), &[full.clone(), too_big]);
    assert!(v.contains("over the limit"), "{v}");

    // A refused chunk applies nothing, not even its good first entry.
    let out = client_after(
        ClientState::default(),
        &[full, manifest(entry(FileKind::Regular, 2, b"a"))],
    );
    assert!(
        !out.iter()
            .any(|o| matches!(o, ClientOutput::ApplyManifest(_))),
        "{out:?}"
    );
}

#[test]
fn a_manifest_of_inlined_files_is_split_into_frames_under_the_control_limit() {
    let now = Instant::now();
    let mut s = ServerSession::new(VOLUME, now);
    s.handle_stream_data(now, &frame(&hello(None, None)));
    assert_eq!(
        s.poll_output(),
        Some(ServerOutput::StartManifest { inline_data: true })
    );
    s.handle_manifest_begin(now, 0);
    // 200 files of the largest inline size (12.5 MiB), handed over as the walk does.
    let walk: Vec<ManifestEntry> = (0..200u32)
        .map(|i| ManifestEntry {
            path: RelPath(format!("d/{i:03}").into_bytes()),
            attrs: attrs(FileKind::Regular, INLINE_DATA_MAX),
            xattrs_omitted: false,
            link_group: None,
            data: Some(vec![i as u8; INLINE_DATA_MAX as usize]),
        })
        .collect();
    for chunk in walk.chunks(8) {
        s.handle_manifest_entries(now, chunk.to_vec());
    }
    s.handle_manifest_end(now);
    let mut got = Vec::new();
    let mut frames = 0;
    while let Some(o) = s.poll_output() {
        if let ServerOutput::Send(m @ Msg::Manifest { .. }) = o {
            assert!(
                encode(&m).unwrap().len() - HEADER_LEN <= MAX_CONTROL_BODY,
                "a manifest frame over the limit"
            );
            let Msg::Manifest { entries } = m else {
                unreachable!()
            };
            got.extend(entries);
            frames += 1;
        }
    }
    assert_eq!(got, walk, "every entry, in order, content intact");
    assert!(
        frames >= 25,
        "12.5 MiB of content needs at least 25 frames of 512 KiB, got {frames}"
    );
}

#[test]
fn superseded_entries_leave_gaps_the_client_accepts() {
    let state = ClientState {
        volume_id: Some(VOLUME),
        last_applied: Some(2),
    };
    let config = ServerConfig {
        max_batch: 4,
        ..Default::default()
    };
    let mut p = Pair::with(state, config, ClientConfig::default());
    p.journal.append(30);
    for seq in [3, 4, 9, 15, 16, 17] {
        assert!(p.journal.supersede(seq));
    }
    p.run();
    p.assert_open();
    assert_eq!(p.welcome(0), Start::Resume { from_seq: 3 });
    let retained: Vec<u64> = p
        .journal
        .retained
        .iter()
        .map(|e| e.seq)
        .filter(|&s| s > 2)
        .collect();
    assert_eq!(p.replica.applied, retained);
    assert_eq!(p.replica.durable.last_applied, Some(30));
    // The first batch covers the gap at its start: it begins at 3 with entry 5.
    let first = p.server_sent[0].iter().find_map(|m| match m {
        Msg::Entries { from_seq, entries } => Some((*from_seq, entries[0].seq)),
        _ => None,
    });
    assert_eq!(first, Some((3, 5)));
}

#[test]
fn server_never_has_more_than_the_window_in_flight() {
    let client = ClientConfig {
        window: 8,
        ..Default::default()
    };
    let mut p = Pair::with(ClientState::default(), ServerConfig::default(), client);
    p.run();
    p.replica.hold_acks = true;
    p.append(100);
    p.run();
    assert_eq!(
        p.replica.applied.len(),
        8,
        "exactly one window is sent before any ack"
    );
    assert_eq!(p.server.in_flight(), 8);
    for round in 0.. {
        assert!(round < 100, "no progress");
        p.release_acks();
        p.run();
        if p.replica.durable.last_applied == Some(100) && p.replica.held.is_empty() {
            break;
        }
    }
    p.assert_open();
    assert_eq!(p.replica.applied, (1..=100).collect::<Vec<_>>());
    assert_eq!(p.max_unacked, 8);
}

#[test]
fn server_window_caps_a_greedy_client() {
    let server = ServerConfig {
        window: 5,
        ..Default::default()
    };
    let mut p = Pair::with(ClientState::default(), server, ClientConfig::default());
    p.run();
    p.replica.hold_acks = true;
    p.append(50);
    p.run();
    assert_eq!(p.replica.applied.len(), 5);
    assert_eq!(p.server.window(), 5);
    p.replica.hold_acks = false;
    p.release_acks();
    p.run();
    assert_eq!(p.replica.durable.last_applied, Some(50));
    assert_eq!(p.max_unacked, 5);
}

#[test]
fn batches_respect_the_largest_batch() {
    let server = ServerConfig {
        max_batch: 3,
        ..Default::default()
    };
    let mut p = Pair::with(ClientState::default(), server, ClientConfig::default());
    p.run();
    p.append(10);
    p.run();
    let sizes: Vec<usize> = p.server_sent[0]
        .iter()
        .filter_map(|m| match m {
            Msg::Entries { entries, .. } => Some(entries.len()),
            _ => None,
        })
        .collect();
    assert!(sizes.iter().all(|&n| n <= 3), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 10);
}

#[test]
fn batches_arriving_together_are_made_durable_once() {
    let (state, welcome) = resumed(0);
    let batches = [
        welcome,
        Msg::Entries {
            from_seq: 1,
            entries: vec![entry(1), entry(2)],
        },
        Msg::Entries {
            from_seq: 3,
            entries: vec![entry(3)],
        },
        Msg::Entries {
            from_seq: 4,
            entries: vec![entry(4), entry(5)],
        },
    ];
    let out = client_after(state, &batches);
    let applies = out
        .iter()
        .filter(|o| matches!(o, ClientOutput::Apply(_)))
        .count();
    assert_eq!(applies, 5);
    assert_eq!(
        out.last(),
        Some(&ClientOutput::PersistAndAck {
            volume_id: VOLUME,
            seq: 5
        }),
        "{out:?}"
    );
    assert_eq!(
        out.iter()
            .filter(|o| matches!(o, ClientOutput::PersistAndAck { .. }))
            .count(),
        1
    );
}

#[test]
fn a_trickle_is_acknowledged_batch_by_batch() {
    let (state, welcome) = resumed(0);
    let now = Instant::now();
    let mut c = ClientSession::new(state, now);
    c.handle_stream_data(now, &frame(&welcome));
    for seq in 1..=3 {
        c.handle_stream_data(
            now,
            &frame(&Msg::Entries {
                from_seq: seq,
                entries: vec![entry(seq)],
            }),
        );
        let out: Vec<ClientOutput> = std::iter::from_fn(|| c.poll_output()).collect();
        assert_eq!(
            out.last(),
            Some(&ClientOutput::PersistAndAck {
                volume_id: VOLUME,
                seq
            })
        );
        c.handle_applied(now, seq);
        assert_eq!(
            c.poll_output(),
            Some(ClientOutput::Send(Msg::Ack { applied_seq: seq }))
        );
    }
    assert_eq!(
        c.state(),
        ClientState {
            volume_id: Some(VOLUME),
            last_applied: Some(3)
        }
    );
}

#[test]
fn heartbeats_keep_an_idle_client_connected() {
    let mut p = Pair::new();
    p.append(2);
    p.run();
    p.advance(Duration::from_secs(30));
    p.assert_open();
    let heartbeats = p.server_sent[0]
        .iter()
        .filter(|m| matches!(m, Msg::Heartbeat { .. }))
        .count();
    assert!(heartbeats >= 25, "{heartbeats} heartbeats in 30 s");
    assert_eq!(p.client.server_journal_last(), 2);
}

#[test]
fn a_silent_server_times_the_client_out_within_three_seconds() {
    let mut p = Pair::new();
    p.run();
    p.cut_to_client = true;
    p.advance(Duration::from_secs(2));
    assert!(
        p.client_close.is_none(),
        "closed after 2 s of silence: {:?}",
        p.client_close
    );
    p.advance(Duration::from_millis(1100));
    assert!(
        matches!(p.client_close, Some(CloseReason::Timeout { .. })),
        "{:?}",
        p.client_close
    );
    assert_eq!(p.client_close.as_ref().unwrap().code(), 4);
}

#[test]
fn a_client_that_sends_no_hello_is_dropped() {
    let now = Instant::now();
    let mut s = ServerSession::new(VOLUME, now);
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(10)));
    s.handle_timeout(now + Duration::from_secs(5));
    assert_eq!(s.poll_output(), None);
    s.handle_timeout(now + Duration::from_secs(10));
    assert!(matches!(
        s.poll_output(),
        Some(ServerOutput::Close(CloseReason::Timeout { .. }))
    ));
}

#[test]
fn a_server_that_never_welcomes_times_the_client_out() {
    let now = Instant::now();
    let mut c = ClientSession::new(ClientState::default(), now);
    assert!(matches!(
        c.poll_output(),
        Some(ClientOutput::Send(Msg::Hello { .. }))
    ));
    c.handle_timeout(now + Duration::from_secs(10));
    match c.poll_output() {
        Some(ClientOutput::Close(CloseReason::Timeout { what })) => {
            assert!(what.contains("did not answer Hello"), "{what}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn retention_expiring_under_a_connected_client_closes_it_and_it_resyncs() {
    let client = ClientConfig {
        window: 4,
        ..Default::default()
    };
    let mut p = Pair::with(ClientState::default(), ServerConfig::default(), client);
    p.run();
    p.replica.hold_acks = true;
    p.append(20);
    p.run();
    p.journal.expire_through(15);
    p.release_acks();
    p.run();
    assert_eq!(
        p.server_close,
        Some(CloseReason::Expired { first_retained: 16 })
    );
    p.replica.hold_acks = false;
    p.reconnect();
    p.run();
    p.assert_open();
    assert_eq!(
        p.welcome(1),
        full_sync(20, FullSyncReason::Expired { first_retained: 16 })
    );
    assert_eq!(p.replica.tree, p.journal.tree_at(20));
}

#[test]
fn changes_racing_the_manifest_walk_are_streamed_after_it() {
    let mut p = Pair::new();
    p.append(5);
    p.race_appends = 3;
    p.run();
    p.assert_open();
    assert_eq!(p.welcome(0), full_sync(5, FullSyncReason::NewClient));
    assert_eq!(
        p.replica.applied,
        [6, 7, 8],
        "what the walk raced with is replayed after it"
    );
    assert_eq!(p.replica.tree, p.journal.tree_at(8));
    assert_eq!(p.replica.manifest_raced, Some(true), "the client is told the walk raced");
}

#[test]
fn the_server_tells_the_driver_which_seqs_a_client_still_needs() {
    let mut p = Pair::new();
    p.append(5);
    p.run();
    assert_eq!(p.server.retention_floor(), Some(6));
    p.replica.hold_acks = true;
    p.append(5);
    p.run();
    assert_eq!(
        p.server.retention_floor(),
        Some(6),
        "nothing new acknowledged"
    );
    p.release_acks();
    p.run();
    assert_eq!(p.server.retention_floor(), Some(11));
}

// ---- a long random scenario -----------------------------------------------------------

/// xorshift64*: a deterministic source for the scenario test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn replica_converges_through_random_appends_compactions_crashes_and_latency() {
    // What the scenarios went through, so a change that stops exercising a path is noticed.
    let (mut resumes, mut full_syncs, mut expired_closes, mut gaps) = (0, 0, 0, 0);
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let server = ServerConfig {
            max_batch: 1 + rng.below(8) as usize,
            ..Default::default()
        };
        let client = ClientConfig {
            window: 1 + rng.below(16) as u32,
            ..Default::default()
        };
        let mut p = Pair::with(ClientState::default(), server, client);
        p.latency = Duration::from_millis(rng.below(5));
        for _ in 0..80 {
            match rng.below(12) {
                0..=4 => p.append(1 + rng.below(6)),
                5 => {
                    let candidates: Vec<u64> = p.journal.retained.iter().map(|e| e.seq).collect();
                    if !candidates.is_empty() {
                        let seq = candidates[rng.below(candidates.len() as u64) as usize];
                        p.journal.supersede(seq);
                    }
                }
                6 => {
                    // A few of the oldest, or nearly everything (overtaking a slow client).
                    let through = if rng.below(2) == 0 {
                        p.journal.first_retained + rng.below(4)
                    } else {
                        p.journal.last_seq.saturating_sub(rng.below(3))
                    };
                    p.journal.expire_through(through.min(p.journal.last_seq));
                }
                7 => p.reconnect(),
                8 => {
                    p.replica.hold_acks = !p.replica.hold_acks;
                    if !p.replica.hold_acks {
                        p.release_acks();
                    }
                }
                9 => p.race_appends = rng.below(3),
                _ => p.advance(Duration::from_millis(rng.below(2000))),
            }
            p.run();
            for closed in [&p.server_close, &p.client_close].into_iter().flatten() {
                assert!(
                    matches!(closed, CloseReason::Expired { .. }),
                    "seed {seed}: unexpected close: {closed}"
                );
                expired_closes += 1;
            }
            if p.server_close.is_some() {
                p.reconnect();
            }
        }
        p.replica.hold_acks = false;
        p.release_acks();
        p.reconnect();
        p.run();
        p.assert_open();
        let last = p.journal.last_seq;
        assert_eq!(p.replica.durable.last_applied, Some(last), "seed {seed}");
        assert_eq!(
            p.replica.tree,
            p.journal.tree_at(last),
            "seed {seed}: the replica diverged"
        );
        assert!(p.max_unacked <= p.server.window(), "seed {seed}");
        for sent in &p.server_sent {
            match sent.iter().find(|m| matches!(m, Msg::Welcome { .. })) {
                Some(Msg::Welcome {
                    start: Start::Resume { .. },
                    ..
                }) => resumes += 1,
                Some(Msg::Welcome {
                    start: Start::FullSync { .. },
                    ..
                }) => full_syncs += 1,
                _ => {}
            }
            for m in sent {
                if let Msg::Entries { from_seq, entries } = m {
                    gaps += entries
                        .windows(2)
                        .filter(|w| w[1].seq > w[0].seq + 1)
                        .count();
                    gaps += usize::from(entries[0].seq > *from_seq);
                }
            }
        }
    }
    assert!(
        resumes > 40 && full_syncs > 40 && expired_closes > 0 && gaps > 0,
        "{resumes} {full_syncs} {expired_closes} {gaps}"
    );
}

// ---- hostile input --------------------------------------------------------------------

fn frame(msg: &Msg) -> Vec<u8> {
    encode(msg).unwrap()
}

fn hello(volume_id: Option<VolumeId>, last_applied: Option<u64>) -> Msg {
    Msg::Hello {
        volume_id,
        last_applied,
        window: 16,
        agent: "test".into(),
    }
}

/// Feeds `input` (then the end of the stream if `finish`) to a fresh server over a journal
/// of 10 entries, answering its requests, and returns why it closed.
fn server_closes_on(input: &[Vec<u8>], finish: bool) -> CloseReason {
    let now = Instant::now();
    let mut journal = FakeJournal::new();
    journal.append(10);
    let mut s = ServerSession::new(VOLUME, now);
    for bytes in input {
        s.handle_stream_data(now, bytes);
        for n in 0.. {
            assert!(
                n < MAX_OUTPUTS_PER_STEP,
                "the server keeps producing outputs: a livelock"
            );
            let Some(o) = s.poll_output() else { break };
            match o {
                ServerOutput::ReadJournal { from, max } => {
                    s.handle_journal(now, journal.read_from(from, max))
                }
                ServerOutput::StartManifest { .. } => {
                    s.handle_manifest_begin(now, journal.last_seq);
                    s.handle_manifest_end(now);
                }
                ServerOutput::Close(r) => return r,
                ServerOutput::Send(_) => {}
            }
        }
    }
    if finish {
        s.handle_stream_finished(now);
    }
    while let Some(o) = s.poll_output() {
        if let ServerOutput::Close(r) = o {
            return r;
        }
    }
    panic!("the server did not close");
}

fn violation_text(r: &CloseReason) -> String {
    match r {
        CloseReason::Violation { detail, .. } => detail.clone(),
        other => panic!("not a violation: {other}"),
    }
}

#[test]
fn version_mismatch_is_refused_with_a_text_naming_the_side_to_upgrade() {
    let mut f = frame(&hello(None, None));
    f[4..6].copy_from_slice(&7u16.to_le_bytes());
    let r = server_closes_on(&[f.clone()], false);
    assert_eq!(r.code(), 1);
    assert_eq!(
        r.to_string(),
        "this server speaks imezzo protocol 6 and the client speaks protocol 7: upgrade the server"
    );

    let mut c = ClientSession::new(ClientState::default(), Instant::now());
    c.handle_stream_data(Instant::now(), &f);
    let close = std::iter::from_fn(|| c.poll_output()).last();
    match close {
        Some(ClientOutput::Close(r)) => assert_eq!(
            r.to_string(),
            "this client speaks imezzo protocol 6 and the server speaks protocol 7: upgrade the client"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_oversized_length_prefix_closes_before_anything_is_allocated() {
    let mut f = vec![0xff, 0xff, 0xff, 0xff];
    f.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    let r = server_closes_on(&[f], false);
    assert!(
        violation_text(&r).contains("over this stream's limit"),
        "{r}"
    );
    assert_eq!(r.code(), 2);

    let mut d = FrameDecoder::new(MAX_CONTROL_BODY);
    d.push(&((MAX_CONTROL_BODY + 1) as u32).to_le_bytes());
    d.push(&PROTOCOL_VERSION.to_le_bytes());
    assert!(matches!(d.next_msg(), Err(FrameError::Oversized { .. })));
    assert_eq!(d.buffered(), 0, "nothing kept of a refused stream");
}

#[test]
fn garbage_bytes_close_the_connection_as_malformed() {
    let mut f = 64u32.to_le_bytes().to_vec();
    f.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    f.extend((0..64u8).map(|i| i.wrapping_mul(37)));
    let r = server_closes_on(&[f], false);
    assert!(violation_text(&r).contains("malformed"), "{r}");
}

#[test]
fn a_truncated_archive_is_malformed() {
    let full = frame(&hello(Some(VOLUME), Some(3)));
    let body_len = full.len() - HEADER_LEN - 8;
    let mut f = (body_len as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    f.extend_from_slice(&full[HEADER_LEN..HEADER_LEN + body_len]);
    let r = server_closes_on(&[f], false);
    assert!(violation_text(&r).contains("malformed"), "{r}");
}

#[test]
fn a_stream_ending_inside_a_frame_is_truncated() {
    let full = frame(&hello(None, None));
    let r = server_closes_on(&[full[..full.len() - 3].to_vec()], true);
    assert!(violation_text(&r).contains("ended inside a frame"), "{r}");
}

#[test]
fn a_server_message_from_a_client_is_a_violation() {
    let entries = Msg::Entries {
        from_seq: 1,
        entries: vec![entry(1)],
    };
    let r = server_closes_on(&[frame(&entries)], false);
    assert_eq!(violation_text(&r), "Entries is a server message");
}

#[test]
fn a_fetch_on_the_control_stream_is_a_violation() {
    let fetch = Msg::Fetch {
        req_id: 1,
        path: "a".into(),
        offset: 0,
        len: 1,
        ino: None,
    };
    let r = server_closes_on(&[frame(&hello(None, None)), frame(&fetch)], false);
    assert!(
        violation_text(&r).contains("belongs on a fetch stream"),
        "{r}"
    );
}

#[test]
fn hello_twice_is_a_violation() {
    let h = frame(&hello(Some(VOLUME), Some(10)));
    let r = server_closes_on(&[h.clone(), h], false);
    assert!(violation_text(&r).starts_with("Hello again"), "{r}");
}

#[test]
fn an_ack_before_hello_or_beyond_what_was_sent_is_a_violation() {
    let r = server_closes_on(&[frame(&Msg::Ack { applied_seq: 1 })], false);
    assert!(violation_text(&r).contains("waiting for Hello"), "{r}");
    let r = server_closes_on(
        &[
            frame(&hello(Some(VOLUME), Some(5))),
            frame(&Msg::Ack { applied_seq: 11 }),
        ],
        false,
    );
    assert!(violation_text(&r).contains("outside [5, 10]"), "{r}");
    let r = server_closes_on(
        &[
            frame(&hello(Some(VOLUME), Some(5))),
            frame(&Msg::Ack { applied_seq: 4 }),
        ],
        false,
    );
    assert!(violation_text(&r).contains("outside [5, 10]"), "{r}");
}

#[test]
fn a_window_of_zero_is_a_violation() {
    let h = Msg::Hello {
        volume_id: None,
        last_applied: None,
        window: 0,
        agent: String::new(),
    };
    let r = server_closes_on(&[frame(&h)], false);
    assert!(violation_text(&r).contains("window of 0"), "{r}");
}

/// A client session with `state`, fed `msgs` as server frames; returns the outputs after
/// its `Hello`.
fn client_after(state: ClientState, msgs: &[Msg]) -> Vec<ClientOutput> {
    let now = Instant::now();
    let mut c = ClientSession::new(state, now);
    assert!(matches!(
        c.poll_output(),
        Some(ClientOutput::Send(Msg::Hello { .. }))
    ));
    for m in msgs {
        c.handle_stream_data(now, &frame(m));
    }
    std::iter::from_fn(|| c.poll_output()).collect()
}

fn client_violation(state: ClientState, msgs: &[Msg]) -> String {
    match client_after(state, msgs).last() {
        Some(ClientOutput::Close(r)) => violation_text(r),
        other => panic!("the client did not close: {other:?}"),
    }
}

fn resumed(last: u64) -> (ClientState, Msg) {
    let state = ClientState {
        volume_id: Some(VOLUME),
        last_applied: Some(last),
    };
    let welcome = Msg::Welcome {
        volume_id: VOLUME,
        start: Start::Resume { from_seq: last + 1 },
        agent: "s".into(),
    };
    (state, welcome)
}

#[test]
fn a_gap_between_batches_is_a_violation() {
    let (state, welcome) = resumed(4);
    let gap = Msg::Entries {
        from_seq: 6,
        entries: vec![entry(6)],
    };
    assert!(client_violation(state, &[welcome, gap]).contains("a gap or a repeat"));
}

#[test]
fn a_repeated_batch_is_a_violation() {
    let (state, welcome) = resumed(4);
    let batch = Msg::Entries {
        from_seq: 5,
        entries: vec![entry(5), entry(6)],
    };
    let v = client_violation(state, &[welcome, batch.clone(), batch]);
    assert!(v.contains("a gap or a repeat"), "{v}");
}

#[test]
fn a_bad_batch_applies_nothing() {
    let (state, welcome) = resumed(4);
    let batch = Msg::Entries {
        from_seq: 5,
        entries: vec![entry(5), entry(7), entry(6)],
    };
    let out = client_after(state, &[welcome, batch]);
    assert!(
        !out.iter().any(|o| matches!(o, ClientOutput::Apply(_))),
        "{out:?}"
    );
    assert!(matches!(out.last(), Some(ClientOutput::Close(_))));
}

#[test]
fn a_resume_the_client_did_not_ask_for_is_a_violation() {
    let state = ClientState {
        volume_id: Some(VOLUME),
        last_applied: Some(4),
    };
    let wrong_seq = Msg::Welcome {
        volume_id: VOLUME,
        start: Start::Resume { from_seq: 3 },
        agent: String::new(),
    };
    assert!(client_violation(state, &[wrong_seq]).contains("Welcome resumes"));
    let wrong_volume = Msg::Welcome {
        volume_id: [1; 16],
        start: Start::Resume { from_seq: 5 },
        agent: String::new(),
    };
    assert!(client_violation(state, &[wrong_volume]).contains("Welcome resumes"));
}

#[test]
fn welcome_twice_is_a_violation() {
    let (state, welcome) = resumed(4);
    assert_eq!(
        client_violation(state, &[welcome.clone(), welcome]),
        "Welcome while streaming the journal"
    );
}

#[test]
fn a_heartbeat_that_disagrees_with_the_stream_is_a_violation() {
    let (state, welcome) = resumed(4);
    let hb = Msg::Heartbeat {
        sent_through: 7,
        journal_last: 9,
    };
    assert!(client_violation(state, &[welcome, hb]).contains("Heartbeat says 7"));
}

#[test]
fn a_path_escaping_the_root_from_the_server_is_a_violation() {
    let (state, welcome) = resumed(4);
    let evil = JournalEntry {
        seq: 5,
        op: Op::Unlink {
            path: "a/../../etc/passwd".into(),
        },
    };
    let v = client_violation(
        state,
        &[
            welcome,
            Msg::Entries {
                from_seq: 5,
                entries: vec![evil],
            },
        ],
    );
    assert!(v.contains("'..' component"), "{v}");

    let full = Msg::Welcome {
        volume_id: VOLUME,
        start: Start::FullSync {
            manifest_seq: 0,
            why: FullSyncReason::NewClient,
        },
        agent: String::new(),
    };
    let evil = ManifestEntry {
        path: "/etc/passwd".into(),
        attrs: attrs(FileKind::Regular, 0),
        xattrs_omitted: false,
        link_group: None,
        data: None,
    };
    let v = client_violation(
        ClientState::default(),
        &[
            full,
            Msg::Manifest {
                entries: vec![evil],
            },
        ],
    );
    assert!(v.contains("absolute"), "{v}");
}

#[test]
fn a_symlink_target_may_be_absolute() {
    let (state, welcome) = resumed(4);
    let link = JournalEntry {
        seq: 5,
        op: Op::Symlink {
            path: "l".into(),
            target: "/etc/passwd".into(),
        },
    };
    let out = client_after(
        state,
        &[
            welcome,
            Msg::Entries {
                from_seq: 5,
                entries: vec![link.clone()],
            },
        ],
    );
    assert_eq!(out[0], ClientOutput::Apply(link));
}

#[test]
fn more_entries_than_the_window_is_a_violation() {
    let (state, welcome) = resumed(0);
    let now = Instant::now();
    let config = ClientConfig {
        window: 2,
        ..Default::default()
    };
    let mut c = ClientSession::with_config(state, now, config);
    c.handle_stream_data(now, &frame(&welcome));
    c.handle_stream_data(
        now,
        &frame(&Msg::Entries {
            from_seq: 1,
            entries: vec![entry(1), entry(2)],
        }),
    );
    c.handle_stream_data(
        now,
        &frame(&Msg::Entries {
            from_seq: 3,
            entries: vec![entry(3)],
        }),
    );
    match std::iter::from_fn(|| c.poll_output()).last() {
        Some(ClientOutput::Close(r)) => {
            assert!(violation_text(&r).contains("over the window of 2"), "{r}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn refuse_closes_the_client_with_the_servers_text() {
    let out = client_after(
        ClientState::default(),
        &[Msg::Refuse {
            reason: "shutting down".into(),
        }],
    );
    assert_eq!(
        out,
        [ClientOutput::Close(CloseReason::Refused {
            reason: "shutting down".into()
        })]
    );
    assert_eq!(
        CloseReason::Refused { reason: "x".into() }.to_string(),
        "the server refused service: x"
    );
}

#[test]
fn a_journal_failure_refuses_the_client_with_the_reason() {
    let now = Instant::now();
    let mut s = ServerSession::new(VOLUME, now);
    s.handle_stream_data(now, &frame(&hello(Some(VOLUME), Some(1))));
    assert!(matches!(
        s.poll_output(),
        Some(ServerOutput::ReadJournal { from: 2, .. })
    ));
    s.handle_journal(
        now,
        JournalRead::Failed {
            reason: "disk on fire".into(),
        },
    );
    match s.poll_output() {
        Some(ServerOutput::Send(Msg::Refuse { reason })) => {
            assert!(reason.contains("disk on fire"))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.poll_output(),
        Some(ServerOutput::Close(CloseReason::Internal { .. }))
    ));
}

fn attached_sample() -> Attached {
    Attached {
        attrs: vec![(RelPath(b"d/f".to_vec()), Some(attrs(FileKind::Regular, 3))), (RelPath(b"gone".to_vec()), None)],
        data: vec![AttachedData { path: RelPath(b"d/f".to_vec()), ino: 12, offset: 0, bytes: b"abc".to_vec(), to_eof: true }],
    }
}

#[test]
fn what_the_server_read_for_a_journal_read_goes_right_before_its_entries() {
    let now = Instant::now();
    let mut s = ServerSession::new(VOLUME, now);
    s.handle_stream_data(now, &frame(&hello(Some(VOLUME), Some(1))));
    assert!(matches!(s.poll_output(), Some(ServerOutput::ReadJournal { from: 2, .. })));
    s.handle_journal_attached(now, JournalRead::Entries(vec![entry(2), entry(3)]), attached_sample());
    let sent: Vec<Msg> = std::iter::from_fn(|| s.poll_output())
        .filter_map(|o| match o {
            ServerOutput::Send(m) => Some(m),
            _ => None,
        })
        .collect();
    let names: Vec<&str> = sent.iter().map(Msg::name).collect();
    assert_eq!(names, ["Welcome", "Attached", "Entries"], "{sent:?}");
    let Msg::Attached { through_seq, attrs, data } = &sent[1] else { unreachable!() };
    assert_eq!((*through_seq, attrs.len(), data.len()), (3, 2, 1));
}

#[test]
fn nothing_is_attached_when_the_read_streams_no_entries() {
    let now = Instant::now();
    let mut s = ServerSession::new(VOLUME, now);
    s.handle_stream_data(now, &frame(&hello(Some(VOLUME), Some(1))));
    assert!(matches!(s.poll_output(), Some(ServerOutput::ReadJournal { .. })));
    s.handle_journal_attached(now, JournalRead::Expired { first_retained: 9 }, attached_sample());
    let out: Vec<ServerOutput> = std::iter::from_fn(|| s.poll_output()).collect();
    assert!(
        !out.iter().any(|o| matches!(o, ServerOutput::Send(Msg::Attached { .. }))),
        "{out:?}"
    );
}

#[test]
fn the_client_hands_on_what_was_attached_before_the_entries_it_is_for() {
    let (state, welcome) = resumed(4);
    let a = attached_sample();
    let attached = Msg::Attached { through_seq: 6, attrs: a.attrs, data: a.data };
    let batch = Msg::Entries { from_seq: 5, entries: vec![entry(5), entry(6)] };
    let out = client_after(state, &[welcome, attached, batch]);
    let kinds: Vec<&str> = out
        .iter()
        .map(|o| match o {
            ClientOutput::Attached { .. } => "attached",
            ClientOutput::Apply(_) => "apply",
            _ => "other",
        })
        .filter(|k| *k != "other")
        .collect();
    assert_eq!(kinds, ["attached", "apply", "apply"], "{out:?}");
}

#[test]
fn an_attachment_for_entries_already_delivered_or_naming_a_bad_path_is_a_violation() {
    let (state, welcome) = resumed(4);
    let late = Msg::Attached { through_seq: 4, attrs: vec![], data: vec![] };
    assert!(client_violation(state, &[welcome, late]).contains("delivered through 4 already"));
    let (state, welcome) = resumed(4);
    let bad = Msg::Attached { through_seq: 5, attrs: vec![(RelPath(b"../x".to_vec()), None)], data: vec![] };
    assert!(client_violation(state, &[welcome, bad]).contains("Attached"));
    let (state, welcome) = resumed(4);
    let big = Msg::Attached {
        through_seq: 5,
        attrs: vec![],
        data: vec![AttachedData { path: RelPath(b"f".to_vec()), ino: 1, offset: 0, bytes: vec![0; INLINE_DATA_MAX as usize + 1], to_eof: true }],
    };
    assert!(client_violation(state, &[welcome, big]).contains("over the inline limit"));
}

// ---- framing --------------------------------------------------------------------------

fn samples() -> Vec<Msg> {
    let a = attrs(FileKind::Symlink, 9);
    vec![
        hello(Some(VOLUME), Some(42)),
        hello(None, None),
        Msg::Ack { applied_seq: 7 },
        Msg::Welcome {
            volume_id: VOLUME,
            start: full_sync(9, FullSyncReason::Expired { first_retained: 3 }),
            agent: "imezzo 0.1.0".into(),
        },
        Msg::Refuse {
            reason: "no".into(),
        },
        Msg::Attached {
            through_seq: 3,
            attrs: vec![(RelPath(b"a".to_vec()), Some(a.clone())), (RelPath(b"b".to_vec()), None)],
            data: vec![AttachedData { path: RelPath(b"a".to_vec()), ino: 5, offset: 4096, bytes: b"xyz".to_vec(), to_eof: false }],
        },
        Msg::Entries {
            from_seq: 1,
            entries: vec![
                entry(1),
                JournalEntry {
                    seq: 2,
                    op: Op::Rename {
                        path: "a".into(),
                        new_path: "b/c".into(),
                        exchange: true,
                        noreplace: false,
                    },
                },
            ],
        },
        Msg::Manifest {
            entries: vec![ManifestEntry {
                path: "d/l".into(),
                attrs: Attrs {
                    symlink_target: Some(b"../t".to_vec()),
                    xattrs: vec![(b"user.a".to_vec(), b"v".to_vec())],
                    ..a.clone()
                },
                xattrs_omitted: false,
                link_group: Some(3),
                data: None,
            }],
        },
        Msg::Manifest {
            entries: vec![ManifestEntry {
                path: "d/small".into(),
                attrs: attrs(FileKind::Regular, 5),
                xattrs_omitted: false,
                link_group: None,
                data: Some(b"hello".to_vec()),
            }],
        },
        Msg::ManifestEnd { seq: 9, journal_last: 9 },
        Msg::Heartbeat {
            sent_through: 9,
            journal_last: 12,
        },
        Msg::Fetch {
            req_id: 1,
            path: "d/f".into(),
            offset: 4096,
            len: 1 << 20,
            ino: None,
        },
        Msg::FetchAttrs {
            req_id: 2,
            paths: vec!["".into(), "d".into()],
            links: true,
        },
        Msg::Data {
            req_id: 1,
            offset: 4096,
            bytes: vec![1, 2, 3],
        },
        Msg::DataEnd {
            req_id: 1,
            file_size: 4099,
        },
        Msg::Attrs {
            req_id: 2,
            attrs: vec![Some(a), None],
            links: vec![
                Some(Links {
                    ino: 12,
                    nlink: 3,
                    names: vec!["d/g".into(), "h".into()],
                }),
                None,
            ],
        },
        Msg::Gone { req_id: 3 },
        Msg::Unreadable {
            req_id: 4,
            reason: "EIO".into(),
        },
    ]
}

#[test]
fn every_message_survives_a_round_trip_through_the_decoder() {
    let mut d = FrameDecoder::new(MAX_DATA_BODY);
    let all: Vec<u8> = samples().iter().flat_map(frame).collect();
    d.push(&all);
    for m in samples() {
        assert_eq!(d.next_msg().unwrap(), Some(m));
    }
    assert_eq!(d.next_msg().unwrap(), None);
    d.finish().unwrap();
}

#[test]
fn frames_split_at_every_byte_still_decode() {
    let all: Vec<u8> = samples().iter().flat_map(frame).collect();
    let mut d = FrameDecoder::new(MAX_DATA_BODY);
    let mut got = Vec::new();
    for b in &all {
        d.push(std::slice::from_ref(b));
        while let Some(m) = d.next_msg().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, samples());
}

/// The bytes of version 6 (body archives of sample messages). A change here means the wire
/// format changed: bump `PROTOCOL_VERSION` and update docs/protocol.md, then this test.
/// (Version 2 added the inode to write entries and to `Fetch`; version 3 the inline `data`
/// of manifest entries; version 4 `links` to `FetchAttrs` and `Attrs`, and version 5 the
/// `Attached` message, which these samples do not hold: only the header's version changed
/// here; version 6 `journal_last` to `ManifestEnd`, likewise.)
#[test]
fn version_6_wire_bytes_are_frozen() {
    let hello = hex::encode(frame(&hello(Some(VOLUME), Some(42))));
    let entries = hex::encode(frame(&Msg::Entries {
        from_seq: 1,
        entries: vec![entry(1)],
    }));
    let manifest = hex::encode(frame(&Msg::Manifest {
        entries: vec![ManifestEntry {
            path: "d/f".into(),
            attrs: attrs(FileKind::Regular, 2),
            xattrs_omitted: false,
            link_group: Some(1),
            data: Some(b"hi".to_vec()),
        }],
    }));
    assert_eq!(hello, HELLO_V6);
    assert_eq!(entries, ENTRIES_V6);
    assert_eq!(manifest, MANIFEST_V6);
}

const HELLO_V6: &str = "48000000060000010707070707070707070707070707070700000000000001000000000000002a000000000000001000000074657374ffffffff0000000000000000000000000000000000000000";
const ENTRIES_V6: &str = "b000000006006631000000000000010000000000000008000000ecffffff020000000000000000000000000000000a0000000000000000000000000000000000000000000000010000000000000065000000000000000000000000000000000000000000000000000000000000000400000000000000010000000000000090ffffff01000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000";
const MANIFEST_V6: &str = "d80000000600642f660068690000f8ffffff0300000000000000a40100000000000000000000010000000000000002000000000000000300000000000000040000000000000002000000000000000000000000000000000000000000000000000000a8ffffff00000000000000000000000000000000010000000000000001000000000000000100000080ffffff02000000000000000500000074ffffff01000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000";

#[test]
fn random_bytes_never_panic_the_decoder_or_the_sessions() {
    let mut rng = Rng(0xDEC0DE);
    let valid: Vec<Vec<u8>> = samples().iter().map(frame).collect();
    for i in 0..10_000 {
        let bytes: Vec<u8> = if i % 2 == 0 {
            // Pure noise, sometimes behind a plausible header.
            let len = rng.below(96) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if i % 4 == 0 && b.len() >= HEADER_LEN {
                let body = (b.len() - HEADER_LEN) as u32;
                b[..4].copy_from_slice(&body.to_le_bytes());
                b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            }
            b
        } else {
            // A valid frame with a few bytes of its body flipped.
            let mut b = valid[rng.below(valid.len() as u64) as usize].clone();
            for _ in 0..1 + rng.below(4) {
                let at = HEADER_LEN + rng.below((b.len() - HEADER_LEN) as u64) as usize;
                b[at] ^= 1 << rng.below(8);
            }
            b
        };
        let mut d = FrameDecoder::new(MAX_CONTROL_BODY);
        d.push(&bytes);
        while let Ok(Some(_)) = d.next_msg() {}
        let _ = d.finish();

        let now = Instant::now();
        let mut s = ServerSession::new(VOLUME, now);
        s.handle_stream_data(now, &bytes);
        s.handle_stream_finished(now);
        while s.poll_output().is_some() {}

        let (state, welcome) = resumed(0);
        let mut c = ClientSession::new(state, now);
        c.handle_stream_data(now, &frame(&welcome));
        c.handle_stream_data(now, &bytes);
        c.handle_stream_finished(now);
        while c.poll_output().is_some() {}

        let mut ex = FetchExchange::data(1, "f".into(), 0, 100, None).0;
        let _ = ex.handle_stream_data(&bytes);
        let _ = ex.handle_stream_finished();
        let mut reader = FetchRequestReader::new();
        let _ = reader.handle_stream_data(&bytes);
        let _ = reader.handle_stream_finished();
    }
}

#[test]
fn large_entries_are_split_into_frames_under_the_control_limit() {
    let now = Instant::now();
    let mut s = ServerSession::new(VOLUME, now);
    s.handle_stream_data(
        now,
        &frame(&Msg::Hello {
            volume_id: Some(VOLUME),
            last_applied: Some(0),
            window: 4096,
            agent: String::new(),
        }),
    );
    let long = |i: u64| RelPath(format!("{i:04}/{}", "x".repeat(4000)).into_bytes());
    let entries: Vec<JournalEntry> = (1..=1000)
        .map(|seq| JournalEntry {
            seq,
            op: Op::Rename {
                path: long(seq),
                new_path: long(seq + 1),
                exchange: false,
                noreplace: false,
            },
        })
        .collect();
    assert!(matches!(
        s.poll_output(),
        Some(ServerOutput::ReadJournal { from: 1, max: 1024 })
    ));
    s.handle_journal(now, JournalRead::Entries(entries));
    let mut frames = 0;
    let mut next = 1;
    while let Some(o) = s.poll_output() {
        if let ServerOutput::Send(m @ Msg::Entries { .. }) = o {
            let Msg::Entries { from_seq, entries } = &m else {
                unreachable!()
            };
            assert_eq!(*from_seq, next);
            next = entries.last().unwrap().seq + 1;
            assert!(encode(&m).unwrap().len() - HEADER_LEN <= MAX_CONTROL_BODY);
            frames += 1;
        }
    }
    assert_eq!(next, 1001);
    assert!(frames > 1, "8 MB of entries need several frames");
}

#[test]
fn a_manifest_entry_with_huge_xattrs_travels_without_them() {
    let now = Instant::now();
    let mut s = ServerSession::new(VOLUME, now);
    s.handle_stream_data(now, &frame(&hello(None, None)));
    assert_eq!(
        s.poll_output(),
        Some(ServerOutput::StartManifest { inline_data: true })
    );
    s.handle_manifest_begin(now, 0);
    let mut big = attrs(FileKind::Regular, 1);
    big.xattrs = (0..8)
        .map(|i| (format!("user.{i}").into_bytes(), vec![0u8; 64 << 10]))
        .collect();
    let small = ManifestEntry {
        path: "s".into(),
        attrs: attrs(FileKind::Regular, 1),
        xattrs_omitted: false,
        link_group: None,
        data: Some(vec![1]),
    };
    let big = ManifestEntry {
        path: "b".into(),
        attrs: big,
        xattrs_omitted: false,
        link_group: None,
        data: None,
    };
    s.handle_manifest_entries(now, vec![big, small.clone()]);
    s.handle_manifest_end(now);
    let sent: Vec<ManifestEntry> = std::iter::from_fn(|| s.poll_output())
        .filter_map(|o| match o {
            ServerOutput::Send(Msg::Manifest { entries }) => Some(entries),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(sent.len(), 2);
    assert!(sent[0].xattrs_omitted && sent[0].attrs.xattrs.is_empty());
    assert_eq!(sent[1], small);
}

// ---- fetch streams --------------------------------------------------------------------

fn fetch_events(ex: &mut FetchExchange, msgs: &[Msg]) -> Result<Vec<FetchEvent>, CloseReason> {
    let mut all = Vec::new();
    for m in msgs {
        all.extend(ex.handle_stream_data(&frame(m))?);
    }
    Ok(all)
}

#[test]
fn a_data_answer_with_a_hole_is_accepted_in_order() {
    let (mut ex, req) = FetchExchange::data(5, "f".into(), 0, 10_000, None);
    assert_eq!(
        req,
        Msg::Fetch {
            req_id: 5,
            path: "f".into(),
            offset: 0,
            len: 10_000,
            ino: None
        }
    );
    let events = fetch_events(
        &mut ex,
        &[
            Msg::Data {
                req_id: 5,
                offset: 0,
                bytes: vec![1; 4096],
            },
            Msg::Data {
                req_id: 5,
                offset: 8192,
                bytes: vec![2; 100],
            },
            Msg::DataEnd {
                req_id: 5,
                file_size: 8292,
            },
        ],
    )
    .unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[2], FetchEvent::End { file_size: 8292 });
    assert!(ex.is_done());
    ex.handle_stream_finished().unwrap();
}

#[test]
fn overlapping_or_out_of_range_data_is_a_violation() {
    let (mut ex, _) = FetchExchange::data(5, "f".into(), 100, 100, None);
    let r = fetch_events(
        &mut ex,
        &[
            Msg::Data {
                req_id: 5,
                offset: 150,
                bytes: vec![0; 20],
            },
            Msg::Data {
                req_id: 5,
                offset: 160,
                bytes: vec![0; 5],
            },
        ],
    );
    assert!(violation_text(&r.unwrap_err()).contains("outside the unanswered part [170, 200)"));
    let (mut ex, _) = FetchExchange::data(5, "f".into(), 100, 100, None);
    let r = fetch_events(
        &mut ex,
        &[Msg::Data {
            req_id: 5,
            offset: 190,
            bytes: vec![0; 20],
        }],
    );
    assert!(r.is_err());
    let (mut ex, _) = FetchExchange::data(5, "f".into(), 100, 100, None);
    let r = fetch_events(
        &mut ex,
        &[Msg::Data {
            req_id: 5,
            offset: 50,
            bytes: vec![0; 20],
        }],
    );
    assert!(r.is_err());
}

#[test]
fn an_answer_for_another_request_is_a_violation() {
    let (mut ex, _) = FetchExchange::data(5, "f".into(), 0, 10, None);
    let r = fetch_events(&mut ex, &[Msg::Gone { req_id: 6 }]);
    assert!(
        violation_text(&r.unwrap_err()).contains("Gone for request 6 on the stream of request 5")
    );
}

#[test]
fn gone_after_some_data_is_a_violation_and_before_it_is_an_answer() {
    let (mut ex, _) = FetchExchange::data(5, "f".into(), 0, 10, None);
    assert_eq!(
        fetch_events(&mut ex, &[Msg::Gone { req_id: 5 }]).unwrap(),
        [FetchEvent::Gone]
    );
    let (mut ex, _) = FetchExchange::data(5, "f".into(), 0, 10, None);
    let r = fetch_events(
        &mut ex,
        &[
            Msg::Data {
                req_id: 5,
                offset: 0,
                bytes: vec![1],
            },
            Msg::Gone { req_id: 5 },
        ],
    );
    assert!(r.is_err());
}

#[test]
fn data_past_the_reported_file_size_is_a_violation() {
    let (mut ex, _) = FetchExchange::data(5, "f".into(), 0, 100, None);
    let r = fetch_events(
        &mut ex,
        &[
            Msg::Data {
                req_id: 5,
                offset: 0,
                bytes: vec![1; 50],
            },
            Msg::DataEnd {
                req_id: 5,
                file_size: 20,
            },
        ],
    );
    assert!(violation_text(&r.unwrap_err()).contains("file size 20"));
}

#[test]
fn a_fetch_stream_ending_before_the_answer_is_a_violation() {
    let (mut ex, _) = FetchExchange::data(5, "f".into(), 0, 100, None);
    fetch_events(
        &mut ex,
        &[Msg::Data {
            req_id: 5,
            offset: 0,
            bytes: vec![1; 50],
        }],
    )
    .unwrap();
    assert!(violation_text(&ex.handle_stream_finished().unwrap_err())
        .contains("before the answer was complete"));
}

#[test]
fn anything_after_a_complete_answer_is_a_violation() {
    let (mut ex, _) = FetchExchange::attrs(2, vec!["a".into()], false);
    let r = fetch_events(
        &mut ex,
        &[
            Msg::Attrs {
                req_id: 2,
                attrs: vec![None],
                links: Vec::new(),
            },
            Msg::Gone { req_id: 2 },
        ],
    );
    assert!(violation_text(&r.unwrap_err()).contains("after the answer was complete"));
}

#[test]
fn attrs_must_answer_every_path() {
    let (mut ex, _) = FetchExchange::attrs(2, vec!["a".into(), "b".into()], false);
    let r = fetch_events(
        &mut ex,
        &[Msg::Attrs {
            req_id: 2,
            attrs: vec![None],
            links: Vec::new(),
        }],
    );
    assert!(violation_text(&r.unwrap_err()).contains("1 answers for 2 paths"));
}

#[test]
fn links_in_an_attrs_answer_are_checked_before_any_name_is_used() {
    let chr = Some(attrs(FileKind::CharDevice, 0));
    let dir = Some(attrs(FileKind::Directory, 0));
    let links = |names: Vec<RelPath>| {
        Some(Links {
            ino: 5,
            nlink: 2,
            names,
        })
    };
    let answer = |attrs: Vec<Option<Attrs>>, links: Vec<Option<Links>>| {
        let n = attrs.len();
        let paths = (0..n).map(|i| RelPath(format!("p{i}").into_bytes())).collect();
        let (mut ex, _) = FetchExchange::attrs(2, paths, true);
        fetch_events(&mut ex, &[Msg::Attrs { req_id: 2, attrs, links }])
    };
    // Asked and well formed: delivered as sent.
    let ok = answer(vec![chr.clone(), None], vec![links(vec!["d/x".into()]), None]).unwrap();
    assert_eq!(
        ok,
        vec![FetchEvent::Attrs(vec![chr.clone(), None], vec![links(vec!["d/x".into()]), None])]
    );
    // Not asked for.
    let (mut ex, _) = FetchExchange::attrs(2, vec!["p0".into()], false);
    let r = fetch_events(
        &mut ex,
        &[Msg::Attrs { req_id: 2, attrs: vec![chr.clone()], links: vec![links(vec![])] }],
    );
    assert!(violation_text(&r.unwrap_err()).contains("links for 1 paths"));
    for (attrs, l, problem) in [
        (vec![chr.clone(), None], vec![links(vec![])], "1 links for 2 paths"),
        (vec![None], vec![links(vec![])], "no object or a directory"),
        (vec![dir.clone()], vec![links(vec![])], "no object or a directory"),
        (vec![chr.clone()], vec![links(vec!["../x".into()])], "'..' component"),
        (vec![chr.clone()], vec![links(vec!["/etc/passwd".into()])], "absolute"),
        (vec![chr.clone()], vec![links(vec![RelPath(b"a\0b".to_vec())])], "NUL"),
        (vec![chr.clone()], vec![links(vec!["".into()])], "the root"),
        (
            vec![chr.clone()],
            vec![links((0..=MAX_LINK_NAMES).map(|i| RelPath(format!("n{i}").into_bytes())).collect())],
            "link names",
        ),
    ] {
        let err = answer(attrs, l).unwrap_err();
        assert!(violation_text(&err).contains(problem), "{problem}: {err}");
    }
}

#[test]
fn the_server_reads_one_checked_request_per_fetch_stream() {
    let mut r = FetchRequestReader::new();
    let req = Msg::Fetch {
        req_id: 1,
        path: "d/f".into(),
        offset: 10,
        len: 20,
        ino: Some(77),
    };
    let f = frame(&req);
    assert_eq!(r.handle_stream_data(&f[..3]).unwrap(), None);
    assert_eq!(
        r.handle_stream_data(&f[3..]).unwrap(),
        Some(FetchRequest::Data {
            req_id: 1,
            path: "d/f".into(),
            offset: 10,
            len: 20,
            ino: Some(77)
        })
    );
    r.handle_stream_finished().unwrap();
    assert!(
        violation_text(&r.handle_stream_data(&f).unwrap_err()).contains("one request per stream")
    );

    let mut r = FetchRequestReader::new();
    let two: Vec<u8> = [frame(&req), frame(&req)].concat();
    assert!(r.handle_stream_data(&two).is_err());

    let mut r = FetchRequestReader::new();
    assert!(violation_text(&r.handle_stream_finished().unwrap_err()).contains("without a request"));
}

#[test]
fn a_fetch_request_escaping_the_root_is_a_violation() {
    for (path, problem) in [
        ("../secret", "'..' component"),
        ("/etc/shadow", "absolute"),
        ("a//b", "empty component"),
        ("a/./b", "'.' component"),
    ] {
        let mut r = FetchRequestReader::new();
        let req = Msg::FetchAttrs {
            req_id: 1,
            paths: vec!["ok".into(), path.into()],
            links: false,
        };
        let err = r.handle_stream_data(&frame(&req)).unwrap_err();
        assert!(violation_text(&err).contains(problem), "{path}: {err}");
    }
    let mut r = FetchRequestReader::new();
    let nul = Msg::Fetch {
        req_id: 1,
        path: RelPath(b"a\0b".to_vec()),
        offset: 0,
        len: 1,
        ino: None,
    };
    assert!(violation_text(&r.handle_stream_data(&frame(&nul)).unwrap_err()).contains("NUL"));
    let mut r = FetchRequestReader::new();
    let wrap = Msg::Fetch {
        req_id: 1,
        path: "a".into(),
        offset: u64::MAX,
        len: 2,
        ino: None,
    };
    assert!(r.handle_stream_data(&frame(&wrap)).is_err());
    let mut r = FetchRequestReader::new();
    let none = Msg::FetchAttrs {
        req_id: 1,
        paths: Vec::new(),
        links: false,
    };
    assert!(r.handle_stream_data(&frame(&none)).is_err());
}

#[test]
fn control_messages_on_a_fetch_stream_are_violations() {
    let mut r = FetchRequestReader::new();
    let err = r
        .handle_stream_data(&frame(&Msg::Ack { applied_seq: 1 }))
        .unwrap_err();
    assert!(violation_text(&err).contains("belongs on the control stream"));
    let (mut ex, _) = FetchExchange::data(5, "f".into(), 0, 10, None);
    let err = ex
        .handle_stream_data(&frame(&Msg::Heartbeat {
            sent_through: 0,
            journal_last: 0,
        }))
        .unwrap_err();
    assert!(violation_text(&err).contains("belongs on the control stream"));
}

#[test]
fn close_codes_are_distinct() {
    let all = [
        CloseReason::Shutdown {
            side: Side::Client,
            detail: String::new(),
        },
        CloseReason::VersionMismatch {
            local: Side::Server,
            ours: 1,
            theirs: 2,
        },
        CloseReason::Violation {
            peer: Side::Client,
            detail: String::new(),
        },
        CloseReason::Refused {
            reason: String::new(),
        },
        CloseReason::Timeout {
            what: String::new(),
        },
        CloseReason::Expired { first_retained: 1 },
        CloseReason::Internal {
            side: Side::Server,
            detail: String::new(),
        },
    ];
    let codes: std::collections::BTreeSet<u32> = all.iter().map(CloseReason::code).collect();
    assert_eq!(codes.len(), all.len());
}

#[test]
fn seqs_at_the_end_of_the_seq_space_do_not_overflow() {
    let full = Msg::Welcome {
        volume_id: VOLUME,
        start: Start::FullSync {
            manifest_seq: u64::MAX,
            why: FullSyncReason::NewClient,
        },
        agent: String::new(),
    };
    let out = client_after(
        ClientState::default(),
        &[
            full,
            Msg::ManifestEnd { seq: u64::MAX, journal_last: u64::MAX },
            Msg::Entries {
                from_seq: 0,
                entries: vec![entry(0)],
            },
        ],
    );
    assert!(
        matches!(
            out.last(),
            Some(ClientOutput::Close(CloseReason::Violation { .. }))
        ),
        "{out:?}"
    );

    let state = ClientState {
        volume_id: Some(VOLUME),
        last_applied: Some(u64::MAX),
    };
    let resume = Msg::Welcome {
        volume_id: VOLUME,
        start: Start::Resume { from_seq: 0 },
        agent: String::new(),
    };
    assert!(client_violation(state, &[resume]).contains("Welcome resumes"));

    let r = server_closes_on(&[frame(&hello(Some(VOLUME), Some(u64::MAX)))], false);
    assert!(violation_text(&r).contains("past any seq"), "{r}");
}

#[test]
fn frames_built_behind_a_header_lead_match_a_plain_archive_of_the_message() {
    for m in samples() {
        let body = rkyv::to_bytes::<rkyv::rancor::Error>(&m).unwrap();
        let mut plain = (body.len() as u32).to_le_bytes().to_vec();
        plain.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        plain.extend_from_slice(&body);
        assert_eq!(
            encode_bytes(&m).unwrap().as_ref(),
            plain.as_slice(),
            "{}",
            m.name()
        );
    }
}

#[test]
fn a_frame_fed_one_byte_at_a_time_after_a_whole_one_decodes_in_order_and_a_bad_version_stops_after_them(
) {
    let first = Msg::Data {
        req_id: 1,
        offset: 0,
        bytes: vec![9; 70_000],
    };
    let second = Msg::DataEnd {
        req_id: 1,
        file_size: 70_000,
    };
    let mut bad = frame(&Msg::Gone { req_id: 2 });
    bad[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
    let mut d = FrameDecoder::new(MAX_DATA_BODY);
    d.push(&frame(&first));
    for b in frame(&second).iter().chain(bad.iter()) {
        d.push(std::slice::from_ref(b));
    }
    assert_eq!(d.next_msg().unwrap(), Some(first));
    assert_eq!(d.next_msg().unwrap(), Some(second));
    assert!(matches!(d.next_msg(), Err(FrameError::Version { .. })));
    assert_eq!(d.buffered(), 0);
}

#[test]
fn a_declared_length_allocates_nothing_ahead_of_the_bytes_beyond_a_small_bound() {
    // A header declaring 16 MiB followed by 10 bytes: the buffer stays small.
    let mut d = FrameDecoder::new(MAX_DATA_BODY);
    let mut bytes = ((MAX_DATA_BODY) as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    bytes.extend_from_slice(&[7; 10]);
    d.push(&bytes);
    assert_eq!(d.next_msg().unwrap(), None);
    assert!(d.body_capacity() <= BODY_AHEAD, "{} bytes allocated for 10 received", d.body_capacity());
    // It grows with the bytes, never past twice them plus the bound.
    let mut received = 10;
    for chunk in [1usize, 1200, 70_000, 1 << 20, 3 << 20] {
        d.push(&vec![7; chunk]);
        received += chunk;
        assert!(
            d.body_capacity() <= 2 * received + BODY_AHEAD,
            "{} bytes allocated for {received} received",
            d.body_capacity()
        );
    }
    // A real large frame still decodes when all of it comes, in odd pieces.
    let msg = Msg::Data { req_id: 1, offset: 0, bytes: vec![9; DATA_CHUNK] };
    let f = frame(&msg);
    let mut d = FrameDecoder::new(MAX_DATA_BODY);
    for piece in f.chunks(1000) {
        d.push(piece);
        assert!(d.body_capacity() <= 2 * d.buffered() + BODY_AHEAD);
    }
    assert_eq!(d.next_msg().unwrap(), Some(msg));
}

fn listed(path: &str, kind: FileKind) -> ManifestEntry {
    ManifestEntry { path: path.into(), attrs: attrs(kind, 0), xattrs_omitted: false, link_group: None, data: None }
}

#[test]
fn a_listing_is_the_directory_asked_for_then_what_lies_beneath_it() {
    let (mut ex, req) = FetchExchange::listing(5, "d".into(), false);
    assert_eq!(req, Msg::FetchListing { req_id: 5, path: "d".into(), recursive: false });
    let entries = vec![listed("d", FileKind::Directory), listed("d/a", FileKind::Regular), listed("d/b", FileKind::Directory)];
    let events = fetch_events(&mut ex, &[Msg::Listing { req_id: 5, entries: entries.clone() }, Msg::ListingEnd { req_id: 5, seq: 40 }]).unwrap();
    assert_eq!(events, vec![FetchEvent::Listing(entries), FetchEvent::ListingEnd { seq: 40 }]);
    assert!(ex.is_done());

    // The root's listing holds top-level names; a recursive one anything beneath.
    let (mut ex, _) = FetchExchange::listing(6, "".into(), true);
    let entries = vec![listed("", FileKind::Directory), listed("x", FileKind::Directory), listed("x/y/z", FileKind::Regular)];
    assert!(fetch_events(&mut ex, &[Msg::Listing { req_id: 6, entries }, Msg::ListingEnd { req_id: 6, seq: 1 }]).is_ok());

    // No directory there: Gone, instead of any entry.
    let (mut ex, _) = FetchExchange::listing(7, "gone".into(), true);
    assert_eq!(fetch_events(&mut ex, &[Msg::Gone { req_id: 7 }]).unwrap(), vec![FetchEvent::Gone]);
}

#[test]
fn a_listing_with_entries_outside_what_was_asked_is_a_violation() {
    let bad = |recursive: bool, entries: Vec<ManifestEntry>, end: bool| {
        let (mut ex, _) = FetchExchange::listing(9, "d".into(), recursive);
        let mut msgs = vec![Msg::Listing { req_id: 9, entries }];
        if end {
            msgs.push(Msg::ListingEnd { req_id: 9, seq: 1 });
        }
        violation_text(&fetch_events(&mut ex, &msgs).unwrap_err())
    };
    let dir = || listed("d", FileKind::Directory);
    assert!(bad(false, vec![listed("d/a", FileKind::Regular)], false).contains("comes first"));
    assert!(bad(false, vec![listed("d", FileKind::Regular)], false).contains("is the listed directory, but a Regular"));
    assert!(bad(false, vec![dir(), listed("e/a", FileKind::Regular)], false).contains("not beneath"));
    assert!(bad(false, vec![dir(), listed("dd/a", FileKind::Regular)], false).contains("not beneath"));
    assert!(bad(false, vec![dir(), listed("d", FileKind::Directory)], false).contains("not beneath"));
    assert!(bad(false, vec![dir(), listed("d/a/b", FileKind::Regular)], false).contains("deeper than the children"));
    assert!(bad(true, vec![dir(), listed("d/../x", FileKind::Regular)], false).contains("'..'"));
    // ListingEnd before the directory itself came.
    let (mut ex, _) = FetchExchange::listing(9, "d".into(), true);
    assert!(violation_text(&fetch_events(&mut ex, &[Msg::ListingEnd { req_id: 9, seq: 1 }]).unwrap_err()).contains("does not answer"));
    // Gone after entries.
    let (mut ex, _) = FetchExchange::listing(9, "d".into(), true);
    let r = fetch_events(&mut ex, &[Msg::Listing { req_id: 9, entries: vec![dir()] }, Msg::Gone { req_id: 9 }]);
    assert!(violation_text(&r.unwrap_err()).contains("does not answer"));
}

#[test]
fn the_server_reads_a_listing_request_and_refuses_a_bad_path() {
    let mut r = FetchRequestReader::new();
    let req = Msg::FetchListing { req_id: 3, path: "a/b".into(), recursive: true };
    assert_eq!(
        r.handle_stream_data(&frame(&req)).unwrap(),
        Some(FetchRequest::Listing { req_id: 3, path: "a/b".into(), recursive: true })
    );
    let mut r = FetchRequestReader::new();
    let req = Msg::FetchListing { req_id: 3, path: "/etc".into(), recursive: false };
    assert!(violation_text(&r.handle_stream_data(&frame(&req)).unwrap_err()).contains("absolute"));
}
