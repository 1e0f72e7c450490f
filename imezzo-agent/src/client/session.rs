//! One connection: the session loop that feeds the protocol's [`ClientSession`] and hands
//! its actions to the worker.

use super::*;

pub(super) enum Outcome {
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
pub(super) enum Work {
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
        /// The walk raced with changes and the session will ask for a verifying full sync:
        /// owed durably until it begins (see `Worker::resync_owed`).
        verify: bool,
    },
    /// The master's state the server read for the entries up to `through_seq` that
    /// follow (see [`Msg::Attached`](crate::protocol::Msg::Attached)).
    Attached(Attachment),
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
pub(super) enum Report {
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

pub(super) struct SessionCtx<'a> {
    pub(super) conn: &'a quinn::Connection,
    pub(super) root: &'a Path,
    pub(super) state_dir: &'a Path,
    pub(super) state_file: &'a StateFile,
    pub(super) events: &'a EventSink,
    /// Full syncs asked in a row because the one before raced with changes (see
    /// [`MAX_VERIFICATIONS`]); zero again after a walk that did not race.
    pub(super) verifications: &'a AtomicU32,
}

/// Decides when to report "in sync": at most once a second, and at least once after each
/// catch-up.
#[derive(Default)]
pub(super) struct InSync {
    pub(super) last_print: Option<Instant>,
    pub(super) printed: Option<u64>,
    pub(super) was_in_sync: bool,
    pub(super) pending: bool,
    pub(super) deferred: Option<Instant>,
}

impl InSync {
    pub(super) fn update(
        &mut self,
        session: &ClientSession,
        known: bool,
        now: Instant,
        events: &EventSink,
    ) {
        let seq = session.state().last_applied;
        let in_sync = known
            && !session.is_closed()
            && seq.is_some_and(|s| {
                s == session.received_through() && session.server_journal_last() <= s
            });
        if in_sync && (!self.was_in_sync || seq != self.printed) {
            self.pending = true;
        }
        self.was_in_sync = in_sync;
        self.deferred = None;
        let (true, true, Some(seq)) = (self.pending, in_sync, seq) else {
            return;
        };
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
    pub(super) async fn run(
        &self,
        hello: ClientState,
        replayer: Replayer,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> (Outcome, Option<Replayer>) {
        let mut replayer = Some(replayer);
        let mut worker: Option<WorkerHandle> = None;
        let outcome = self
            .drive(hello, &mut replayer, &mut worker, shutdown)
            .await;
        // Whatever happened, the connection is done with: fetches in flight fail at once and
        // the worker finishes its current item and stops.
        if !matches!(outcome, Outcome::Lost { .. }) {
            let (code, text): (u32, &[u8]) = match &outcome {
                Outcome::Resync(_) => (0, b"the client resyncs in full"),
                _ => (0, b"the client is shutting down"),
            };
            self.conn.close(quinn::VarInt::from_u32(code), text);
        } else {
            self.conn
                .close(quinn::VarInt::from_u32(0), b"the client reconnects");
        }
        if let Some(w) = worker {
            drop(w.tx);
            replayer = tokio::task::spawn_blocking(move || w.thread.join().ok())
                .await
                .ok()
                .flatten();
        }
        (outcome, replayer)
    }

    pub(super) async fn drive(
        &self,
        hello: ClientState,
        replayer: &mut Option<Replayer>,
        worker: &mut Option<WorkerHandle>,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Outcome {
        let lost = |reason: String, streamed: bool| Outcome::Lost {
            reason,
            streamed,
            immediate: false,
        };
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
        // The manifest's walk raced with changes on the server: once all is applied and
        // quiet, the whole tree is compared again (a new full sync, which keeps whatever
        // matches). Replaying the entries after the manifest over a walk that saw some of
        // them, or saw a directory twice or not at all across a rename, left fsstress's
        // replicas with stale objects, missing links and old attributes.
        let mut verify_owed = false;
        // A full sync some of whose paths failed: "initial sync done" waits for their repair.
        let mut initial_incomplete: Option<FullSyncStats> = None;
        // A durable point asked for within PERSIST_EVERY of the last one waits for the rest
        // of that interval (see PERSIST_EVERY), and is replaced by any later one meanwhile.
        let mut deferred_persist: Option<(VolumeId, u64)> = None;
        let mut last_persist = Instant::now().checked_sub(PERSIST_EVERY).unwrap_or_else(Instant::now);
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
                    ClientOutput::BeginFullSync {
                        volume_id,
                        manifest_seq,
                        why,
                    } => {
                        full_sync = true;
                        (self.events)(ClientEvent::FullSyncStarted {
                            manifest_seq,
                            why: why.to_string(),
                        });
                        Work::BeginFullSync {
                            volume_id,
                            manifest_seq,
                        }
                    }
                    ClientOutput::ApplyManifest(e) => {
                        let mut bytes = queued_bytes(&e);
                        let mut entries = vec![e];
                        while entries.len() < MANIFEST_BATCH && bytes < MANIFEST_BATCH_BYTES {
                            match session.poll_output() {
                                Some(ClientOutput::ApplyManifest(e)) => {
                                    bytes += queued_bytes(&e);
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
                        Work::Manifest {
                            entries,
                            _queued: queued,
                        }
                    }
                    ClientOutput::ManifestComplete { seq, raced } => {
                        if !raced {
                            self.verifications.store(0, Ordering::Relaxed);
                        } else if self.verifications.load(Ordering::Relaxed) < MAX_VERIFICATIONS {
                            verify_owed = true;
                        }
                        Work::ManifestComplete { seq, verify: verify_owed }
                    }
                    ClientOutput::Attached { through_seq, attrs, data } => {
                        Work::Attached(Attachment::new(through_seq, attrs, data))
                    }
                    ClientOutput::Apply(e) => Work::Apply(e),
                    ClientOutput::PersistAndAck { volume_id, seq } => {
                        if last_persist.elapsed() < PERSIST_EVERY {
                            deferred_persist = Some((volume_id, seq));
                            continue;
                        }
                        deferred_persist = None;
                        last_persist = Instant::now();
                        Work::Persist { volume_id, seq }
                    }
                    ClientOutput::Close(reason) => return self.closed_by_session(reason, streamed),
                };
                if worker.is_none() {
                    // Every work item follows Welcome, so the volume is known here.
                    if let Err(o) =
                        self.start_worker(&session, replayer, worker, &fetcher, &report_tx)
                    {
                        return o;
                    }
                }
                if let Err(o) =
                    send_work(worker.as_ref(), work, &mut reports, shutdown, streamed).await
                {
                    return o;
                }
            }
            if welcomed.is_none() && session.volume_id().is_some() {
                welcomed = Some(Instant::now());
                // At once, so paths a previous session left pending are repaired even if
                // nothing new arrives.
                if worker.is_none() {
                    if let Err(o) =
                        self.start_worker(&session, replayer, worker, &fetcher, &report_tx)
                    {
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
            in_sync.update(
                &session,
                known && pending_paths == 0 && !verify_owed,
                Instant::now(),
                self.events,
            );
            let deadline = session.poll_timeout().map(tokio::time::Instant::from_std);
            let print_at = in_sync.deferred.map(tokio::time::Instant::from_std);
            let repair_at = (pending_paths > 0 && !repair_asked && all_durable && worker.is_some())
                .then(|| tokio::time::Instant::from_std(last_activity + REPAIR_IDLE));
            let verify_at = (verify_owed && full_sync_done && pending_paths == 0 && all_durable && worker.is_some())
                .then(|| tokio::time::Instant::from_std(last_activity + REPAIR_IDLE));
            let persist_at =
                deferred_persist.map(|_| tokio::time::Instant::from_std(last_persist + PERSIST_EVERY));
            tokio::select! {
                biased;
                () = shutdown.as_mut() => {
                    // A clean stop keeps the durable point it had put off: queued behind the
                    // entries it covers, the worker syncs it before it stops. A worker whose
                    // queue is full is busy for a while; the older point stands then (replay
                    // from it is idempotent).
                    if let (Some((volume_id, seq)), Some(w)) = (deferred_persist.take(), worker.as_ref()) {
                        let _ = w.tx.try_send(Work::Persist { volume_id, seq });
                    }
                    return Outcome::Shutdown;
                }
                report = reports.recv() => match report {
                    Some(Report::Persisted { seq, full_sync: stats, pending }) => {
                        (pending_paths, last_activity, repair_asked) = (pending, Instant::now(), false);
                        session.handle_applied(Instant::now(), seq);
                        if let Some(stats) = stats {
                            full_sync_done = true;
                            streamed = true;
                            if pending == 0 {
                                (self.events)(ClientEvent::InitialSyncDone { seq, stats });
                            } else {
                                log::warn!(
                                    "initial sync incomplete at seq {seq}: {pending} paths failed; fetching them again, one by one"
                                );
                                initial_incomplete = Some(stats);
                            }
                        } else if pending == 0 {
                            if let Some(stats) = initial_incomplete.take() {
                                (self.events)(ClientEvent::InitialSyncDone { seq, stats });
                            }
                        }
                    }
                    Some(Report::Pending(n)) => {
                        (pending_paths, last_activity, repair_asked) = (n, Instant::now(), false);
                        if n == 0 {
                            if let (Some(stats), Some(seq)) = (initial_incomplete, session.state().last_applied) {
                                initial_incomplete = None;
                                (self.events)(ClientEvent::InitialSyncDone { seq, stats });
                            }
                        }
                    }
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
                () = sleep_until(persist_at), if persist_at.is_some() => {
                    if let Some((volume_id, seq)) = deferred_persist.take() {
                        last_persist = Instant::now();
                        let work = Work::Persist { volume_id, seq };
                        if let Err(o) = send_work(worker.as_ref(), work, &mut reports, shutdown, streamed).await {
                            return o;
                        }
                    }
                }
                () = sleep_until(verify_at), if verify_at.is_some() => {
                    self.verifications.fetch_add(1, Ordering::Relaxed);
                    return Outcome::Resync(
                        "the tree changed while the full sync walked it: comparing it whole again now that it is quiet".into(),
                    );
                }
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

    pub(super) fn start_worker(
        &self,
        session: &ClientSession,
        replayer: &mut Option<Replayer>,
        worker: &mut Option<WorkerHandle>,
        fetcher: &Fetcher,
        reports: &mpsc::UnboundedSender<Report>,
    ) -> Result<(), Outcome> {
        let volume = session.volume_id().unwrap_or_default();
        let Some(r) = replayer.take() else {
            return Err(Outcome::Fatal(ClientError::Worker(
                "the replayer was lost".into(),
            )));
        };
        *worker = Some(
            WorkerHandle::start(self, r, volume, fetcher.clone(), reports.clone())
                .map_err(Outcome::Fatal)?,
        );
        Ok(())
    }

    pub(super) fn closed_by_session(&self, reason: CloseReason, streamed: bool) -> Outcome {
        let text = reason.to_string();
        self.conn
            .close(quinn::VarInt::from_u32(reason.code()), text.as_bytes());
        match reason {
            CloseReason::VersionMismatch { .. } => Outcome::Fatal(ClientError::Protocol(reason)),
            CloseReason::Violation { .. } | CloseReason::Internal { .. } => {
                log::warn!("{text}");
                Outcome::Lost {
                    reason: text,
                    streamed,
                    immediate: false,
                }
            }
            _ => Outcome::Lost {
                reason: text,
                streamed,
                immediate: false,
            },
        }
    }
}

/// Queues work for the worker (waiting while its queue is full).
pub(super) async fn send_work(
    worker: Option<&WorkerHandle>,
    work: Work,
    reports: &mut mpsc::UnboundedReceiver<Report>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    streamed: bool,
) -> Result<(), Outcome> {
    let Some(w) = worker else {
        return Err(Outcome::Fatal(ClientError::Worker(
            "it never started".into(),
        )));
    };
    tokio::select! {
        sent = w.tx.send(work) => if sent.is_err() {
            // The worker stopped: its last report says why. Reports it sent before that
            // (a durable point, a pending count) may still be queued unread: they are
            // already recorded in the state dir, and this connection is over, so they are
            // passed over, not taken for the reason.
            while let Some(r) = reports.recv().await {
                if !matches!(r, Report::Persisted { .. } | Report::Pending(_)) {
                    return Err(report_outcome(r, streamed));
                }
            }
            return Err(Outcome::Fatal(ClientError::Worker("it exited".into())));
        },
        () = shutdown.as_mut() => return Err(Outcome::Shutdown),
    }
    Ok(())
}

/// What a manifest entry holds in memory while it waits in the worker's queue: not only its
/// inline content. Counting that alone let a million empty files queue up by the quarter
/// million (a thousand batches), some 50 MB, whenever the network outran the worker.
fn queued_bytes(e: &ManifestEntry) -> usize {
    let xattrs: usize = e.attrs.xattrs.iter().map(|(name, value)| name.len() + value.len() + 48).sum();
    std::mem::size_of::<ManifestEntry>()
        + e.path.as_bytes().len()
        + e.data.as_ref().map_or(0, Vec::len)
        + xattrs
}

/// Waits until the worker's queue has room for `bytes` more of manifest entries. The
/// worker gives room back as it applies (or drops, when it stops) what is queued, so this
/// always ends.
pub(super) async fn reserve_queue(
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

pub(super) fn report_outcome(report: Report, streamed: bool) -> Outcome {
    match report {
        Report::Resync(why) => Outcome::Resync(why),
        Report::Lost(reason) => Outcome::Lost {
            reason,
            streamed,
            immediate: false,
        },
        Report::Fatal(e) => Outcome::Fatal(e),
        Report::Persisted { .. } | Report::Pending(_) => {
            Outcome::Fatal(ClientError::Worker("an unexpected report".into()))
        }
    }
}

/// What an ended connection means for the next attempt.
pub(super) fn connection_outcome(e: &quinn::ConnectionError, streamed: bool) -> Outcome {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let text = String::from_utf8_lossy(&c.reason).into_owned();
            let code = c.error_code.into_inner();
            if code == 1 {
                // VersionMismatch: the other agent says which side to upgrade.
                let reason = CloseReason::Refused { reason: text };
                return Outcome::Fatal(ClientError::Protocol(reason));
            }
            let reason = if text.is_empty() {
                format!("the server closed the connection (code {code})")
            } else {
                text
            };
            // Expired (5): the server sends a full sync on the next connection at once.
            Outcome::Lost {
                reason,
                streamed,
                immediate: code == 5,
            }
        }
        other => Outcome::Lost {
            reason: format!("connection lost ({other})"),
            streamed,
            immediate: false,
        },
    }
}

pub(super) fn sleep_until(deadline: Option<tokio::time::Instant>) -> tokio::time::Sleep {
    tokio::time::sleep_until(
        deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)),
    )
}
