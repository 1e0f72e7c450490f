//! The worker thread: owns the [`Replayer`] and the full sync, and carries out the
//! session's actions in order.

use super::*;

pub(super) struct WorkerHandle {
    pub(super) tx: mpsc::Sender<Work>,
    pub(super) thread: std::thread::JoinHandle<Replayer>,
}

impl WorkerHandle {
    pub(super) fn start(
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
            syncer: Syncer::start(ctx.state_file.clone(), reports.clone())?,
            replayer: replayer.with_volume(u64::from_be_bytes(v)),
            fetcher,
            root: ctx.root.to_path_buf(),
            state_file: ctx.state_file.clone(),
            events: ctx.events.clone(),
            reports,
            full: None,
            finished_full: None,
            needs_resync: None,
            resync_owed: false,
            pending: Pending::load(&ctx.state_dir.join(PENDING_FILE)),
            pending_file: ctx.state_dir.join(PENDING_FILE),
            cache: HashMap::new(),
            data: HashMap::new(),
            later: HashMap::new(),
            moved_writes: Default::default(),
            prefetched: 0,
            attached: Attachment::default(),
            retry: HashMap::new(),
            disk_full: false,
        };
        let thread = std::thread::Builder::new()
            .name("imezzo-replay".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| ClientError::Worker(format!("cannot start it: {e}")))?;
        Ok(WorkerHandle { tx, thread })
    }
}

/// Why the worker stops.
pub(super) enum Stop {
    Lost(String),
    Fatal(ClientError),
}

pub(super) struct Worker {
    pub(super) replayer: Replayer,
    /// Makes durable points durable beside the replay (see [`super::durable`]).
    pub(super) syncer: Syncer,
    pub(super) fetcher: Fetcher,
    pub(super) root: PathBuf,
    pub(super) state_file: StateFile,
    pub(super) events: EventSink,
    pub(super) reports: mpsc::UnboundedSender<Report>,
    pub(super) full: Option<full_sync::FullSync>,
    /// A full sync finished, not yet reported (it is with the next persist).
    pub(super) finished_full: Option<FullSyncStats>,
    /// A full resync asked for and not yet reported to the session.
    pub(super) needs_resync: Option<String>,
    /// A full resync owed, reported or not, until `begin_full_sync`: while it is, no durable
    /// point says an entry is applied (the state file says `last_applied none`), so a
    /// client killed before its full sync begins makes one at restart. (Held in memory only,
    /// a rescan covered by a durable point was lost for good with a kill in that window.)
    pub(super) resync_owed: bool,
    pub(super) pending: Pending,
    pub(super) pending_file: PathBuf,
    /// The master's attributes fetched ahead for the next `prefetched` entries.
    pub(super) cache: HashMap<RelPath, Option<Attrs>>,
    /// Bytes those entries write (small files whole, ranges of larger ones), by (path,
    /// inode), fetched ahead at once instead of one round trip per entry.
    pub(super) data: DataCache,
    /// Where the object of an entry fetched ahead is once the later renames among those
    /// entries are applied, by seq, where that is another name than the entry's: its
    /// attributes and bytes are asked for there ([`crate::names::later_names`]).
    pub(super) later: HashMap<u64, RelPath>,
    /// Writes replay could not take bytes for, the master having moved their file on before
    /// the move reached this client: (path, followed through later entries) -> the inode
    /// written. See [`Worker::follow_moved_writes`].
    pub(super) moved_writes: std::collections::BTreeMap<Vec<u8>, u64>,
    pub(super) prefetched: usize,
    /// The newest [`Attachment`] the server sent.
    pub(super) attached: Attachment,
    /// Pending paths whose repair failed on the replica (or was refused): attempts so far
    /// and when the next is due. Retried one by one, with backoff, never by a full resync.
    pub(super) retry: HashMap<Vec<u8>, (u32, Instant)>,
    /// The replica's file system was found full: said once, entries and repairs do not
    /// wait on retries meanwhile, and the repair rounds poll until room returns.
    pub(super) disk_full: bool,
}

/// Whether a replay error means the replica's file system has no room (or quota) left.
pub(super) fn is_disk_full(e: &ReplayError) -> bool {
    matches!(e, ReplayError::Io { source, .. }
        if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
}

/// Whether a pending path is one the master can be asked about: not one replay refused as
/// malformed (absolute, a NUL, an empty, `.` or `..` component).
fn askable(p: &[u8]) -> bool {
    p.is_empty()
        || (!p.contains(&0)
            && p.split(|&c| c == b'/')
                .all(|c| !c.is_empty() && c != b"." && c != b".."))
}

/// Longest wait between two attempts at one failed path.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// While the replica is full, the wait between two attempts.
const FULL_POLL: Duration = Duration::from_secs(2);

/// The master's state the server attached to a journal read: attributes by path, whole
/// small files by (path, inode). Valid for the entries up to `through` only: a later change
/// has an entry of its own, and its state may be newer than this.
#[derive(Debug, Default)]
pub(super) struct Attachment {
    pub(super) through: u64,
    pub(super) attrs: HashMap<RelPath, Option<Attrs>>,
    pub(super) data: HashMap<(RelPath, u64), Vec<Piece>>,
}

impl Attachment {
    pub(super) fn new(
        through: u64,
        attrs: Vec<(RelPath, Option<Attrs>)>,
        data: Vec<crate::protocol::AttachedData>,
    ) -> Attachment {
        let mut pieces: HashMap<(RelPath, u64), Vec<Piece>> = HashMap::new();
        for d in data {
            let piece = Piece { offset: d.offset, bytes: d.bytes, to_eof: d.to_eof };
            pieces.entry((d.path, d.ino)).or_default().push(piece);
        }
        Attachment {
            through,
            attrs: attrs.into_iter().collect(),
            data: pieces,
        }
    }
}

/// Bytes fetched ahead: (path, inode written to) -> the pieces of that file read.
pub(super) type DataCache = HashMap<(RelPath, u64), Vec<Piece>>;

/// Bytes of the master's file from `offset` on, as one fetch read them.
#[derive(Debug, Clone)]
pub(super) struct Piece {
    pub(super) offset: u64,
    pub(super) bytes: Vec<u8>,
    /// The file ended at the piece's end when it was read.
    pub(super) to_eof: bool,
}

impl Piece {
    /// Bytes `[offset, offset+len)` when this piece holds them all (or all the file has
    /// of them): fewer than `len` means the file ends there.
    pub(super) fn slice(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let end = self.offset + self.bytes.len() as u64;
        let want_end = offset.saturating_add(len);
        if offset < self.offset || (want_end > end && !self.to_eof) {
            return None;
        }
        let a = usize::try_from(offset - self.offset).ok()?.min(self.bytes.len());
        let b = usize::try_from(want_end.min(end) - self.offset).ok()?.max(a);
        Some(&self.bytes[a..b])
    }
}

impl Worker {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Work>) -> Replayer {
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
            let done = self.settle(false).and_then(|()| match work {
                Work::BeginFullSync {
                    volume_id,
                    manifest_seq,
                } => self.begin_full_sync(volume_id, manifest_seq),
                Work::Manifest { entries, _queued } => match self.full.as_mut() {
                    Some(full) => entries.into_iter().try_for_each(|e| full.apply(e)),
                    None => Err(Stop::Fatal(ClientError::Worker(
                        "a manifest entry outside a full sync".into(),
                    ))),
                },
                Work::ManifestComplete { seq, verify } => self.complete_full_sync(seq, verify),
                Work::Attached(a) => {
                    self.attached = a;
                    Ok(())
                }
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
            });
            if let Err(stop) = done {
                self.stop(stop);
                break;
            }
        }
        // A clean stop keeps the durable point in flight; after an error it is moot.
        if let Err(stop) = self.settle(true) {
            self.stop(stop);
        }
        self.replayer
    }

    /// Ends the durable point in flight once it is done (waiting for it when `wait`).
    pub(super) fn settle(&mut self, wait: bool) -> Result<(), Stop> {
        match self.syncer.finished(wait) {
            Some(result) => {
                let generation = result.map_err(Stop::Fatal)?;
                self.replayer.end_sync(generation).map_err(|e| Stop::Fatal(e.into()))
            }
            None => Ok(()),
        }
    }

    pub(super) fn stop(&self, stop: Stop) {
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
    pub(super) fn prefetch(
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
        let mut window = Vec::new();
        let mut last_seq = 0;
        for work in std::iter::once(first).chain(queue.iter()) {
            let Work::Apply(entry) = work else { break };
            window.push(entry);
            last_seq = entry.seq;
            for q in entry.op.asked_paths() {
                if seen.insert(q.clone()) {
                    paths.push(q);
                }
            }
        }
        let entries = window.len();
        // A file created or written and renamed within these entries (`write tmp; rename
        // tmp f`) has only its new name on the master by now: its object is asked for
        // there (the rename's entry asks about that name anyway), not left to a repair.
        self.later = crate::names::later_names(window.iter().map(|e| &e.op), crate::names::completes_from_master)
            .into_iter()
            .map(|(i, name)| (window[i].seq, name))
            .collect();
        self.cache.clear();
        // What the server attached for these entries needs no round trip.
        let attached = last_seq <= self.attached.through;
        if attached {
            paths.retain(|p| match self.attached.attrs.get(p) {
                Some(a) => {
                    self.cache.insert(p.clone(), a.clone());
                    false
                }
                None => true,
            });
        }
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
        self.prefetch_data(std::iter::once(first).chain(queue.iter()).take(entries), attached)?;
        self.prefetched = entries;
        Ok(())
    }

    /// Fetches, concurrently, the bytes the queued writes take from the master (by the
    /// inode each names): the whole content of small files, the written range of larger
    /// ones. A burst of small files, or of page writes into a large one, then costs a few
    /// round trips, not one per entry. What does not arrive is fetched by replay itself.
    pub(super) fn prefetch_data<'w>(
        &mut self,
        work: impl Iterator<Item = &'w Work>,
        attached: bool,
    ) -> Result<(), Stop> {
        self.data.clear();
        // (path, inode, offset, len): a whole file is read from 0 to its size.
        let mut wanted: Vec<(RelPath, u64, u64, u64)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut range_bytes = 0u64;
        for w in work {
            let Work::Apply(entry) = w else { continue };
            let Op::Write {
                path,
                ino: Some(ino),
                offset,
                len,
                ..
            } = &entry.op
            else {
                continue;
            };
            let path = self.later.get(&entry.seq).unwrap_or(path);
            let Some(Some(a)) = self.cache.get(path) else {
                continue;
            };
            if a.kind != FileKind::Regular {
                continue;
            }
            let key = (path.clone(), *ino);
            if attached {
                // What the server attached for this inode: all of it is kept for replay,
                // and a write it covers needs no fetch.
                if let Some(pieces) = self.attached.data.get(&key) {
                    let held = self.data.entry(key.clone()).or_default();
                    if held.is_empty() {
                        held.extend(pieces.iter().cloned());
                    }
                }
                // Replay reads the entry's own range (or, from 0, the whole file it covers).
                if self.data.get(&key).is_some_and(|p| p.iter().any(|p| p.slice(*offset, *len).is_some())) {
                    continue;
                }
            }
            let job = if a.size <= PREFETCH_DATA_MAX {
                (path.clone(), *ino, 0, a.size)
            } else {
                let len = (*len).min(a.size.saturating_sub(*offset));
                if len == 0 || len > PREFETCH_RANGE_MAX || range_bytes + len > PREFETCH_RANGE_BYTES {
                    continue;
                }
                (path.clone(), *ino, *offset, len)
            };
            if seen.insert(job.clone()) {
                if job.2 != 0 || job.3 != a.size {
                    range_bytes += job.3;
                }
                wanted.push(job);
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let fetcher = self.fetcher.clone();
        let fetched = self.fetcher.rt.block_on(async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(PREFETCH_DATA_CONCURRENCY));
            let mut jobs = tokio::task::JoinSet::new();
            for (path, ino, offset, len) in wanted {
                let (fetcher, permits) = (fetcher.clone(), permits.clone());
                jobs.spawn(async move {
                    let _permit = permits.acquire_owned().await.ok()?;
                    let mut buf = Vec::new();
                    let end = fetcher
                        .data(path.clone(), offset, len, Some(ino), &mut |at, bytes| {
                            // Holes between chunks read as zeros.
                            buf.resize((at - offset) as usize, 0);
                            buf.extend_from_slice(bytes);
                            Ok(())
                        })
                        .await
                        .ok()?;
                    match end {
                        DataEnd::Done { file_size } => {
                            let end = (offset + len).min(file_size);
                            buf.resize(end.saturating_sub(offset) as usize, 0);
                            let to_eof = offset + len >= file_size;
                            Some((path, ino, Piece { offset, bytes: buf, to_eof }))
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
        for (path, ino, piece) in fetched {
            self.data.entry((path, ino)).or_default().push(piece);
        }
        Ok(())
    }

    pub(super) fn begin_full_sync(
        &mut self,
        volume_id: VolumeId,
        manifest_seq: u64,
    ) -> Result<(), Stop> {
        // Until the manifest is whole the replica is no state of the volume: a crash now
        // must restart the full sync, not resume. (After the durable point in flight,
        // whose state file would say otherwise.)
        self.settle(true)?;
        self.state_file
            .store(&ClientState {
                volume_id: Some(volume_id),
                last_applied: None,
            })
            .map_err(Stop::Fatal)?;
        let mut full = full_sync::FullSync::new(&self.root, self.fetcher.clone(), manifest_seq)
            .map_err(|error| {
                Stop::Fatal(ClientError::Root {
                    path: self.root.clone(),
                    error,
                })
            })?;
        // What replay left pending is fetched whole by this sync, never kept by its size and
        // mtime: the pending set is cleared only because the sync covers it.
        full.refetch(self.pending.paths.keys().cloned());
        if let Some(t) = self.last_full_sync() {
            full.keep_only_untouched_since(t);
        }
        self.full = Some(full);
        self.needs_resync = None;
        self.resync_owed = false;
        self.pending.clear();
        self.moved_writes.clear();
        Ok(())
    }

    /// Where the time of the last completed full sync is kept (next to the pending set).
    fn stamp_file(&self) -> PathBuf {
        self.pending_file.with_file_name("full-sync.time")
    }

    /// When the last full sync completed, as the replica's clock gives ctimes (s, ns).
    fn last_full_sync(&self) -> Option<(i64, i64)> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.stamp_file()).ok().map(|m| (m.ctime(), m.ctime_nsec()))
    }

    pub(super) fn complete_full_sync(&mut self, seq: u64, verify: bool) -> Result<(), Stop> {
        let Some(full) = self.full.take() else {
            return Err(Stop::Fatal(ClientError::Worker(
                "a manifest end outside a full sync".into(),
            )));
        };
        let (stats, failed) = full.finish(seq)?;
        crate::memory::release_freed();
        // Made durable with the persist that acknowledges the manifest, before it: a client
        // killed afterwards still fetches them again after its restart.
        for path in failed {
            self.pending.insert(path, false);
        }
        // When this replica was last whole, as the ctime of a file written now (the clock
        // the replica's ctimes come from): a later full sync keeps by size and mtime only
        // files replay has not touched since (best effort: without it, every file may be
        // kept, as before).
        let _ = std::fs::remove_file(self.stamp_file());
        if let Err(e) = std::fs::write(self.stamp_file(), format!("{seq}\n")) {
            log::warn!("cannot record the full sync's time: {e}");
        }
        self.finished_full = Some(stats);
        // A walk that raced with changes is no state of the volume until the verifying
        // full sync the session asks for once quiet: a client killed before then makes one
        // at restart.
        self.resync_owed |= verify;
        Ok(())
    }

    /// A write whose file the master renamed before the rename reached this client (`write
    /// tmp; rename tmp f` in two journal reads, so the window of [`Worker::later`] did not
    /// hold both): replay found nothing (or another file) at its name and left the path
    /// pending, to be fetched once the stream pauses, which a busy master may never do.
    /// The inode written is followed by name through the entries after it, and once a rename
    /// has carried it somewhere, the write is replayed there, whole, from that inode: what a
    /// write entry for it at this point of the stream would do. When the name holds another
    /// object by then, nothing is done (the pending path stays, as before).
    pub(super) fn follow_moved_writes(
        &mut self,
        entry: &JournalEntry,
        result: &Result<Applied, ReplayError>,
        cache: &HashMap<RelPath, Option<Attrs>>,
        data: &DataCache,
    ) -> Result<(), Stop> {
        if let (Op::Write { path, ino: Some(ino), .. }, Ok(Applied::Obsolete) | Err(ReplayError::Source { .. })) =
            (&entry.op, result)
        {
            if self.moved_writes.len() < MOVED_WRITES_MAX {
                self.moved_writes.insert(path.0.clone(), *ino);
            }
            return Ok(());
        }
        if self.moved_writes.is_empty()
            || !crate::names::follow(&mut self.moved_writes, &entry.op, |held, newer| *held = newer, |_| {})
        {
            return Ok(());
        }
        let Op::Rename { path: from, new_path, exchange, .. } = &entry.op else {
            return Ok(());
        };
        // What the rename put in place: at its destination, and for an exchange at its
        // source too.
        let mut carried = Vec::new();
        for side in [Some(new_path), exchange.then_some(from)].into_iter().flatten() {
            let taken = crate::names::take_subtree(&mut self.moved_writes, side.as_bytes());
            carried.extend(taken.into_iter().map(|(suffix, ino)| ([side.as_bytes(), &suffix].concat(), ino)));
        }
        for (path, ino) in carried {
            let write = JournalEntry {
                seq: entry.seq,
                op: Op::Write { path: RelPath(path), offset: 0, len: u64::MAX, source: None, mode: None, ino: Some(ino) },
            };
            let mut source = NetSource { fetcher: &self.fetcher, cache, data, follow: None, absent: Vec::new() };
            let r = self.replayer.apply_entry(&write, &mut source);
            if let Some(why) = self.fetcher.lost() {
                return Err(Stop::Lost(why));
            }
            log::debug!("client: the write renamed away before seq {} replayed at {}: {r:?}", entry.seq, write.op.path().display());
        }
        Ok(())
    }

    pub(super) fn apply(&mut self, entry: JournalEntry) -> Result<(), Stop> {
        let mut attempt = 0;
        let cache = std::mem::take(&mut self.cache);
        let data = std::mem::take(&mut self.data);
        self.prefetched = self.prefetched.saturating_sub(1);
        // Doubts a repair raised are moot: it placed the master's current objects.
        drop(self.replayer.take_doubts());
        let follow = self.later.remove(&entry.seq).map(|to| (entry.op.path().clone(), to));
        let (result, absent) = loop {
            let mut source = NetSource {
                fetcher: &self.fetcher,
                cache: &cache,
                data: &data,
                follow: follow.clone(),
                absent: Vec::new(),
            };
            let result = self.replayer.apply_entry(&entry, &mut source);
            // A fetch that found the connection gone: the entry is not applied, and nothing
            // after it may be acknowledged. It is replayed after the reconnect.
            if let Some(why) = self.fetcher.lost() {
                return Err(Stop::Lost(why));
            }
            match result {
                // A full disk or a busy state dir may recover: pause, then try again.
                Err(ref e @ (ReplayError::Io { .. } | ReplayError::Marks(_)))
                    if attempt < LOCAL_RETRIES && !(self.disk_full && is_disk_full(e)) =>
                {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                }
                result => break (result, source.absent),
            }
        };
        // Names the op itself leaves (the destination of a rename or link) are marked after
        // the pending set follows the op; the others before.
        let moves = matches!(entry.op, Op::Rename { .. } | Op::Link { .. });
        let rescan = matches!(entry.op, Op::Rescan { .. } | Op::Relist { .. });
        match &result {
            Ok(Applied::Obsolete) | Err(ReplayError::Source { .. }) if !moves => {
                self.pending.mark_op(&entry.op)
            }
            Ok(Applied::NeedsResync { path }) if !moves && !rescan => {
                self.pending.mark_diverged(path)
            }
            _ => {}
        }
        self.pending.follow_entry(&entry.op, entry.seq);
        // Asked after the op, by names valid after it: whatever the master no longer had (a
        // parent whose times were to be restored, a renamed file's data) is fetched from its
        // current name once the stream is idle.
        // So is what replay decided against objects a full sync placed (their moment is
        // unknown).
        for p in absent.into_iter().chain(self.replayer.take_doubts()) {
            self.pending.insert(p.0, false);
        }
        let followed = self.follow_moved_writes(&entry, &result, &cache, &data);
        if self.prefetched > 0 {
            self.cache = cache;
            self.data = data;
        }
        followed?;
        match result {
            // Capture lost track of changes (events lost, a path it could not follow): a
            // full resync, whose manifest is consistent with one seq and supersedes every
            // entry up to it. (A subtree compared in the stream instead, from a listing
            // taken while the master kept changing, left fsstress's replicas further from
            // the master: the entries between the rescan and the listing's seq, replayed on
            // a subtree already past them, mix two moments.)
            Ok(Applied::NeedsResync { path }) if matches!(entry.op, Op::Rescan { .. }) => {
                let reason = match &entry.op {
                    Op::Rescan { reason, .. } => reason.as_str(),
                    _ => "",
                };
                self.needs_resync.get_or_insert(format!(
                    "the server lost track of changes under {:?} ({reason})",
                    path.display()
                ));
            }
            // The names directly in a directory changed while the server was down: that
            // directory's subtree, not the whole replica, is compared with the master's
            // listing, before the entries after this one. The whole subtree: the listing's
            // marks make every entry before it beneath the directory stale, which holds only
            // for what the listing compared. (Compared children only, a directory at one of
            // the names was taken for the master's whatever it held: an old one moved away
            // and replaced under its name kept its contents, and an xattr set on a file two
            // levels below was skipped as meant for another directory.)
            Ok(Applied::NeedsResync { path }) if rescan => {
                let reason = match &entry.op {
                    Op::Relist { reason, .. } => reason.as_str(),
                    _ => "",
                };
                crate::report!(Info, "client: directories compared with the master's (the server lost track of them)",
                    "seq {}: comparing {:?} with the master's ({reason})", entry.seq, path.display());
                self.resync_dir(&path, true)?;
            }
            Ok(Applied::NeedsResync { path }) if moves => self.pending.mark_diverged(&path),
            Ok(Applied::Obsolete) | Err(ReplayError::Source { .. }) if moves => {
                self.pending.mark_op(&entry.op)
            }
            Ok(_) => {}
            // The master could not be read (it said so); the path is fetched again later.
            Err(ReplayError::Source { .. }) => {}
            // Refused and logged by the replayer; nothing was changed. The replica is not the
            // master's while it is refused: the path stays pending (and the client out of
            // "in sync") until a repair succeeds.
            Err(
                ReplayError::EscapesRoot { .. }
                | ReplayError::BadPath { .. }
                | ReplayError::BadOp { .. },
            ) => self.pending.mark_op(&entry.op),
            // The state dir or the replica root is unusable: nothing can be made durable.
            Err(
                e @ (ReplayError::OpenRoot { .. } | ReplayError::NoOpenat2 | ReplayError::Marks(_)),
            ) => return Err(Stop::Fatal(e.into())),
            // Failed on the replica (no room, no permission...): the paths it touches are
            // fetched again, one by one with backoff, from the master's current state; the
            // entries after it go on.
            Err(e) => {
                if is_disk_full(&e) {
                    self.note_disk_full(&e);
                } else {
                    crate::report!(Warn, "client: entries that failed (their paths fetched again later)",
                        "seq {}: {e}; the path is fetched again later", entry.seq);
                }
                self.pending.mark_op(&entry.op);
                if let Op::Rename { path, .. } | Op::Link { path, .. } = &entry.op {
                    self.pending.insert(path.0.clone(), false);
                }
            }
        }
        (self.events)(ClientEvent::Applied {
            seq: entry.seq,
            op: entry.op,
            at: Instant::now(),
        });
        Ok(())
    }

    pub(super) fn persist(&mut self, volume_id: VolumeId, seq: u64) -> Result<(), Stop> {
        // Replica first, then its marks, then what is still pending, then the record of what
        // is applied, on the durable-point thread while replay goes on: a crash between any
        // two leaves a state that replays correctly (pending paths are fetched from the
        // master's current state, so one saved ahead of its entry is merely fetched twice).
        self.settle(true)?;
        let point = self.replayer.begin_sync().map_err(|e| Stop::Fatal(e.into()))?;
        self.resync_owed |= self.needs_resync.is_some();
        let job = Job {
            point,
            pending: self.pending.take_changes(),
            pending_file: self.pending_file.clone(),
            state: ClientState {
                volume_id: Some(volume_id),
                last_applied: (!self.resync_owed).then_some(seq),
            },
            persisted: Report::Persisted {
                seq,
                full_sync: self.finished_full.take(),
                pending: self.pending.paths.len(),
            },
            resync: self.needs_resync.take(),
        };
        self.syncer.begin(job).map_err(Stop::Fatal)
    }
}

impl Worker {
    /// A repair, made durable (the replica, then the pending set; the applied seq does not
    /// move).
    pub(super) fn repair_and_sync(&mut self) -> Result<(), Stop> {
        self.settle(true)?;
        self.repair()?;
        self.replayer.sync().map_err(|e| Stop::Fatal(e.into()))?;
        if self.needs_resync.is_some() && !self.resync_owed {
            // The pending set may have been given up for the resync (over PENDING_MAX
            // paths): durably owed before the emptied set is saved.
            self.resync_owed = true;
            let mut state = self.state_file.load().map_err(Stop::Fatal)?;
            state.last_applied = None;
            self.state_file.store(&state).map_err(Stop::Fatal)?;
        }
        self.pending.save(&self.pending_file).map_err(Stop::Fatal)?;
        let _ = self.reports.send(Report::Pending(self.pending.paths.len()));
        if let Some(why) = self.needs_resync.take() {
            let _ = self.reports.send(Report::Resync(why));
        }
        Ok(())
    }

    /// Removes whatever the replica holds at `path`, which the master has had nothing at
    /// through [`PENDING_MISSES`] repairs with every entry received applied.
    pub(super) fn remove_stale(&mut self, path: &RelPath) -> Result<(), Stop> {
        let fetcher = self.fetcher.clone();
        let mut source = NetSource::new(&fetcher);
        match self.replayer.apply(&Op::Unlink { path: path.clone() }, &mut source) {
            Ok(Applied::Changed) => {
                crate::report!(Info, "client: objects the master no longer has, removed at a repair",
                    "removed {:?}: the master has had nothing there since the stream went idle", path.display());
            }
            Ok(_) => {}
            Err(e) => {
                if let Some(why) = self.fetcher.lost() {
                    return Err(Stop::Lost(why));
                }
                crate::report!(Warn, "client: objects the master no longer has that could not be removed",
                    "cannot remove {:?}, which the master no longer has: {e}", path.display());
            }
        }
        Ok(())
    }

    /// Fetches every pending path the master has now, whole, from its current state: the
    /// data and attributes replay could not take when the master had already moved on.
    pub(super) fn repair(&mut self) -> Result<(), Stop> {
        if self.pending.paths.is_empty() {
            return Ok(());
        }
        if self.pending.paths.len() > PENDING_MAX {
            self.pending.clear();
        self.moved_writes.clear();
            self.needs_resync
                .get_or_insert(format!("over {PENDING_MAX} paths to fetch again"));
            return Ok(());
        }
        let now = Instant::now();
        self.retry.retain(|p, _| self.pending.paths.contains_key(p));
        let paths: Vec<(Vec<u8>, bool)> = self
            .pending
            .paths
            .iter()
            .filter(|(p, _)| self.retry.get(*p).is_none_or(|(_, due)| *due <= now))
            // A path replay refused as malformed stays pending (the replica is not the
            // master's), but is never asked for.
            .filter(|(p, _)| askable(p))
            .map(|(p, d)| (p.clone(), *d))
            .collect();
        let mut full_now = false;
        let mut dirs = Vec::new();
        // Names this round made links of a repaired name, by the master inode they are of.
        let mut linked: HashMap<Vec<u8>, u64> = HashMap::new();
        for chunk in paths.chunks(protocol::MAX_ATTRS_PATHS) {
            let ask = chunk.iter().map(|(p, _)| RelPath(p.clone())).collect();
            let answer = match self.fetcher.rt.block_on(self.fetcher.attrs_and_links(ask)) {
                Ok(a) => a,
                Err(FetchFail::Lost(why)) => return Err(Stop::Lost(why)),
                Err(e) => {
                    crate::report!(Warn, "client: attribute reads for paths to fetch again that failed", 
                        "cannot read the master's attributes of paths to fetch again: {e:?}"
                    );
                    continue;
                }
            };
            for ((path, diverged), (attrs, links)) in chunk.iter().zip(answer) {
                // Absent at the master: a later entry renames or removes it; keep it a while.
                // Still absent at the last repair that asks, with every entry applied: the
                // replica must have nothing there either (an object a raced full sync
                // placed, a rename's source the replica could not move).
                let Some(attrs) = attrs else {
                    if self.pending.missed(path) {
                        self.remove_stale(&RelPath(path.clone()))?;
                    }
                    continue;
                };
                let rel = RelPath(path.clone());
                if full_now {
                    // Still full: the rest waits for the next round.
                    continue;
                }
                // A directory above it is not on the replica (an earlier placement failed, or
                // replay moved it off): nothing can be placed beneath it, and retrying the
                // path itself failed for ever (fsstress round s08: 160 objects a round,
                // "its parent is not a directory of the replica"). That directory is
                // compared whole instead, which places the path with everything else there.
                match self.replayer.missing_ancestor(&rel) {
                    Ok(Some(missing)) => {
                        self.pending.remove(path);
                        self.retry.remove(path);
                        self.pending.insert(missing.parent().unwrap_or_default().0, false);
                        self.pending.insert(missing.0, true);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => return Err(Stop::Fatal(e.into())),
                }
                // A directory whose content is unknown: compared with the master's, whole.
                if attrs.kind == FileKind::Directory && *diverged {
                    self.resync_dir(&rel, true)?;
                    if self.pending.paths.contains_key(path) {
                        // Failed again: retried with the same backoff as a file.
                        let (n, _) = self.retry.get(path).copied().unwrap_or((0, now));
                        let wait = retry_wait(n);
                        self.retry.insert(path.clone(), (n + 1, Instant::now() + wait));
                    } else {
                        self.retry.remove(path);
                    }
                    continue;
                }
                // Already made a link of its object, attributes and all, by an earlier
                // name of this round.
                if links.as_ref().is_some_and(|l| linked.get(path) == Some(&l.ino)) {
                    self.pending.remove(path);
                    self.retry.remove(path);
                    continue;
                }
                match self.repair_one(&rel, &attrs, *diverged, links.as_ref(), &mut linked) {
                    Ok(true) => {
                        self.pending.remove(path);
                        self.retry.remove(path);
                        if self.disk_full {
                            self.disk_full = false;
                            log::info!("the replica has room again: resuming");
                        }
                        if attrs.kind == FileKind::Directory {
                            dirs.push((rel, attrs));
                        }
                    }
                    // Not repairable by itself (its type cannot change in place, a symlink
                    // whose target was not read): its directory's children are compared
                    // with the master's, which places it whatever it is.
                    Ok(false) => {
                        self.pending.remove(path);
                        let parent = rel.parent().unwrap_or_default();
                        self.resync_dir(&parent, false)?;
                    }
                    Err(e @ ReplayError::Source { .. }) => {
                        if let Some(why) = self.fetcher.lost() {
                            return Err(Stop::Lost(why));
                        }
                        crate::report!(Warn, "client: paths that could not be fetched again yet", "cannot fetch {:?} again yet: {e}", rel.display());
                        let _ = self.pending.missed(path);
                    }
                    // Failed on the replica, or refused: kept, and tried again later (the
                    // paths that did not fail are not held up, nor is the stream).
                    Err(e) => {
                        if let Some(why) = self.fetcher.lost() {
                            return Err(Stop::Lost(why));
                        }
                        let (n, _) = self.retry.get(path).copied().unwrap_or((0, now));
                        let wait = if is_disk_full(&e) {
                            full_now = true;
                            self.note_disk_full(&e);
                            FULL_POLL
                        } else {
                            if n == 0 || n.is_power_of_two() {
                                log::warn!(
                                    "cannot fetch {:?} again ({e}); attempt {}, retrying it later",
                                    rel.display(),
                                    n + 1
                                );
                            }
                            retry_wait(n)
                        };
                        self.retry.insert(path.clone(), (n + 1, Instant::now() + wait));
                    }
                }
            }
        }
        // Directories last, deepest first: what was placed inside them moved their times.
        for (path, a) in dirs.into_iter().rev() {
            let op = a.setattr_op(&path);
            if let Err(e) = self.replayer.apply(&op, &mut NetSource::new(&self.fetcher)) {
                crate::report!(Warn, "client: directories whose attributes could not be set", "cannot set the attributes of {:?}: {e}", path.display());
            }
        }
        if let Some(why) = self.fetcher.lost() {
            return Err(Stop::Lost(why));
        }
        Ok(())
    }

    /// Makes the directory `scope` the master's from a listing of it: its whole subtree, or
    /// (unless `recursive`) its children, and then, whole, each child directory that had
    /// to be created. Objects the listing does not name are removed; files whose size and
    /// mtime match are kept unless they are pending or replay touched them since the last
    /// full sync; everything placed or kept is marked as the master's as of the listing's
    /// seq, so the entries before that seq still to come are already applied; pending
    /// paths it covers are done with, unless they failed (those stay pending, to be
    /// retried). Nothing at `scope` at the master: nothing to do (a later
    /// entry accounts for it).
    pub(super) fn resync_dir(&mut self, scope: &RelPath, recursive: bool) -> Result<(), Stop> {
        let mut queue = vec![(scope.clone(), recursive)];
        while let Some((scope, recursive)) = queue.pop() {
            // A scope whose directory above is not on the replica could place nothing:
            // that directory is compared whole instead.
            let (scope, recursive) = match self.replayer.missing_ancestor(&scope) {
                Ok(Some(missing)) => {
                    // Made in its parent, whose times the master's are then fetched again.
                    self.pending.insert(missing.parent().unwrap_or_default().0, false);
                    (missing, true)
                }
                Ok(None) => (scope, recursive),
                Err(e) => return Err(Stop::Fatal(e.into())),
            };
            let covered: Vec<Vec<u8>> = self
                .pending
                .paths
                .keys()
                .filter(|p| covers(scope.as_bytes(), recursive, p))
                .cloned()
                .collect();
            let mut sync = full_sync::FullSync::scoped(&self.root, self.fetcher.clone(), scope.clone(), recursive)
                .map_err(|error| Stop::Fatal(ClientError::Root { path: self.root.clone(), error }))?;
            // Files replay touched since the last full sync may hold another moment's bytes
            // under the master's size and mtime; pending ones are owed bytes: both fetched.
            sync.refetch(covered.iter().cloned());
            if let Some(t) = self.last_full_sync() {
                sync.keep_only_untouched_since(t);
            }
            let mut listing = self.fetcher.listing(scope.clone(), recursive);
            let complete = loop {
                match listing.blocking_recv() {
                    Some(Listed::Entries(entries)) => {
                        for e in entries {
                            sync.apply(e)?;
                        }
                    }
                    Some(Listed::End { seq }) => break Some(seq),
                    // No directory there now: the entries after this one account for it.
                    Some(Listed::Gone) => break None,
                    Some(Listed::Failed(FetchFail::Lost(why))) => return Err(Stop::Lost(why)),
                    Some(Listed::Failed(e)) => {
                        crate::report!(Warn, "client: directories that could not be compared with the master's yet",
                            "cannot compare {:?} with the master's yet ({e:?}); retrying later", scope.display());
                        // Kept pending (durably, with the next save) and retried by repair.
                        self.pending.insert(scope.0.clone(), true);
                        break None;
                    }
                    None => {
                        return Err(Stop::Lost(self.fetcher.lost().unwrap_or_else(|| "a listing fetch stopped".into())))
                    }
                }
            };
            drop(listing);
            let Some(as_of) = complete else {
                sync.abandon()?;
                continue;
            };
            let new_dirs = if recursive { Vec::new() } else { sync.new_dirs() };
            // Kept directories whose mtime is not the master's are compared next, children
            // only, as this one was (see `FullSync::kept_dirs_that_differ`).
            let differing = sync.kept_dirs_that_differ();
            let names = sync.names_seen();
            let (_, failed) = sync.finish(0)?;
            let failed_set: std::collections::HashSet<&Vec<u8>> = failed.iter().collect();
            // What the listing placed or kept is the master's as of `as_of`: the entries
            // before it that are still to come (they were journalled before the listing
            // was walked) must not take it back to an older state (a chmod's or a
            // truncate's value, a create of a name since removed). Not named, in a compare
            // of children only: the scope and the directories kept in it, whose contents
            // were not all compared (see `FullSync::names_seen`).
            for (name, whole) in names.iter().filter(|(n, _)| !failed_set.contains(n)) {
                self.replayer
                    .mark_as_of(&RelPath(name.clone()), whole.then_some(as_of))
                    .map_err(|e| Stop::Fatal(e.into()))?;
                if !whole {
                    // A name of a hard-link group whose other names are outside the listing:
                    // the repair asks the server for them and links them (a split group is
                    // mended there, never by a listing that sees one name).
                    self.pending.insert_as_of(name.clone(), false, as_of);
                }
            }
            for p in &covered {
                if !failed_set.contains(p) {
                    self.pending.remove(p);
                    self.retry.remove(p);
                }
            }
            for p in failed {
                // Retried by repair; a directory among them is compared whole again. Named
                // as of the listing: the entries before `as_of` still to come must not
                // move or drop it (see `Pending::as_of`).
                self.pending.insert_as_of(p, true, as_of);
            }
            queue.extend(new_dirs.into_iter().map(|d| (RelPath(d), true)));
            queue.extend(differing.into_iter().map(|d| (RelPath(d), false)));
        }
        Ok(())
    }

    /// Says once that the replica is full; [`Worker::repair`] says when room returned.
    pub(super) fn note_disk_full(&mut self, e: &ReplayError) {
        if !self.disk_full {
            self.disk_full = true;
            log::warn!(
                "the replica's file system is full ({e}): paused; what could not be written is \
                 fetched again, by itself, once there is room (free space or raise the quota)"
            );
        }
    }

    /// Makes `path` what the master has now (`attrs`); false when one path cannot be
    /// repaired by itself (a type the replica cannot change in place, a directory of
    /// unknown content, a symlink whose target was not read): the caller then compares
    /// its directory with the master's listing.
    ///
    /// Hard links: a name recreated alone would be a separate object on the replica, and a
    /// later change through another name of the master's object would miss it. So the
    /// answer carries the master object's other names (`links`: the server's capture knows
    /// every link of a multiply-linked inode, and checks each against the export), and once
    /// `path` is right each of them is made a link of it, replacing whatever the replica
    /// had there, with the master's attributes (one object: one set). The recreated name is
    /// the group's anchor rather than an existing replica name because only it has just
    /// been made right; linking costs no data. Names linked are noted in `linked` (by the
    /// master's inode) so that a later pending name of the same group is not made again.
    /// Conversely, a replica object at `path` with more links than the master's has names
    /// the master's has not (a stale link): `path` leaves it to them and is made anew.
    pub(super) fn repair_one(
        &mut self,
        path: &RelPath,
        a: &Attrs,
        diverged: bool,
        links: Option<&Links>,
        linked: &mut HashMap<Vec<u8>, u64>,
    ) -> Result<bool, ReplayError> {
        use FileKind as K;
        if a.kind == K::Directory && diverged {
            return Ok(false);
        }
        // The root is never made, only given the master's attributes (its times, after a
        // directory was made again in it).
        let ops = if path.0.is_empty() && a.kind == K::Directory {
            Some(vec![a.setattr_op(path)])
        } else {
            a.recreate_ops(path)
        };
        let Some(ops) = ops else {
            return Ok(false);
        };
        // Answers already read: replay asks the master again only about what is not here.
        let mut known: HashMap<RelPath, Option<Attrs>> = HashMap::new();
        known.insert(path.clone(), Some(a.clone()));
        for name in links.map(|l| l.names.as_slice()).unwrap_or_default() {
            known.insert(name.clone(), Some(a.clone()));
        }
        let fetcher = self.fetcher.clone();
        let source = || {
            let mut s = NetSource::new(&fetcher);
            s.cache = &known;
            s
        };
        if a.kind != K::Directory {
            let master_links = links.map_or(1, |l| l.nlink);
            if self.replayer.nlink(path)?.is_some_and(|n| n > master_links) {
                let unlink = Op::Unlink { path: path.clone() };
                self.replayer.apply(&unlink, &mut source())?;
            }
        }
        for op in ops {
            match self.replayer.apply(&op, &mut source())? {
                Applied::NeedsResync { .. } => return Ok(false),
                Applied::Changed | Applied::AlreadyApplied | Applied::Obsolete => {}
            }
        }
        // The ops set the master's xattrs; an object found in place may hold others.
        self.replayer.converge_xattrs(path, &a.xattrs)?;
        if let Some(l) = links {
            for name in &l.names {
                if name == path || !askable(name.as_bytes()) {
                    continue;
                }
                let link = Op::Link {
                    path: path.clone(),
                    new_path: name.clone(),
                };
                match self.replayer.apply(&link, &mut source()) {
                    Ok(Applied::Changed | Applied::AlreadyApplied) => {
                        linked.insert(name.0.clone(), l.ino);
                    }
                    // The replica lacks its directory yet (entries still to replay make it,
                    // and the name) or has a directory there: left to replay and repairs.
                    Ok(other) => log::debug!(
                        "cannot link {:?} to {:?} yet: {other:?}",
                        name.display(),
                        path.display()
                    ),
                    Err(e) => {
                        if self.fetcher.lost().is_some() {
                            return Err(e);
                        }
                        crate::report!(Warn, "client: hard links that could not be made while fetching a path again",
                            "cannot link {:?} to {:?}: {e}", name.display(), path.display());
                    }
                }
            }
        }
        log::debug!(
            "fetched {:?} again from the master's current state",
            path.display()
        );
        Ok(true)
    }
}

/// The wait before attempt `n + 1` at a failed path: 1 s, doubling, at most [`RETRY_MAX`].
fn retry_wait(n: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.saturating_pow(n.min(5))).min(RETRY_MAX)
}

/// Whether a resync of `scope` (its subtree, or its children only) covers `path`.
fn covers(scope: &[u8], recursive: bool, path: &[u8]) -> bool {
    if path == scope {
        return true;
    }
    let rest = if scope.is_empty() {
        Some(path)
    } else {
        path.strip_prefix(scope).and_then(|r| r.strip_prefix(b"/"))
    };
    rest.is_some_and(|r| !r.is_empty() && (recursive || !r.contains(&b'/')))
}

