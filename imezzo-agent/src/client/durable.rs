//! Durable points off the replay thread.
//!
//! A durable point (at most every [`super::PERSIST_EVERY`] under load) makes the replica, its
//! sequence marks, the pending set and the state file durable, then lets the session
//! acknowledge the seq. Its `syncfs` and three fsyncs took the replay thread off its work
//! for several milliseconds each time, which was the tail of the lag at 10 000 changes/s
//! (docs/benchmarks.md). The worker now takes a [`DurablePoint`] (the marks of every change
//! applied so far, see `Replayer::begin_sync`) and hands it here with the rest of the
//! record; it goes on applying meanwhile. Order within a point is unchanged: the replica,
//! then its marks, then the pending set, then the state file, and only then the report that
//! lets the session acknowledge. One point is in flight at a time: the worker waits for it
//! before beginning the next (or a synchronous `sync`), so the order between points holds
//! too. Changes applied while a point is in flight may be synced by its `syncfs`, but their
//! marks wait for the next point: the durable tree may run ahead of the durable marks,
//! which is what every crash before a commit left already (M3, M4 in `replay`).

use super::*;
use crate::replay::DurablePoint;

/// One durable point and the record that follows it.
pub(super) struct Job {
    pub(super) point: DurablePoint,
    /// [`Pending::take_changes`] at the point.
    pub(super) pending: Option<Option<String>>,
    pub(super) pending_file: PathBuf,
    pub(super) state: ClientState,
    /// Sent once all of it is durable: what lets the session acknowledge.
    pub(super) persisted: Report,
    pub(super) resync: Option<String>,
}

/// The thread that makes durable points durable.
pub(super) struct Syncer {
    tx: Option<std::sync::mpsc::Sender<Job>>,
    done: std::sync::mpsc::Receiver<Result<Option<u64>, ClientError>>,
    thread: Option<std::thread::JoinHandle<()>>,
    in_flight: bool,
}

impl Syncer {
    pub(super) fn start(state_file: StateFile, reports: mpsc::UnboundedSender<Report>) -> Result<Syncer, ClientError> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("imezzo-durable".into())
            .spawn(move || {
                for job in rx {
                    let result = make_durable(job, &state_file, &reports);
                    if done_tx.send(result).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| ClientError::Worker(format!("cannot start its durable-point thread: {e}")))?;
        Ok(Syncer { tx: Some(tx), done, thread: Some(thread), in_flight: false })
    }

    /// Hands `job` to the thread. Call [`Syncer::finished`] until it answers first.
    pub(super) fn begin(&mut self, job: Job) -> Result<(), ClientError> {
        debug_assert!(!self.in_flight, "a durable point begun while another is in flight");
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if !sent {
            return Err(ClientError::Worker("its durable-point thread has stopped".into()));
        }
        self.in_flight = true;
        Ok(())
    }

    /// What the point in flight came to (for `Replayer::end_sync`), waiting for it when
    /// `wait`; `None` when no point is in flight, or (not waiting) it is not done yet.
    pub(super) fn finished(&mut self, wait: bool) -> Option<Result<Option<u64>, ClientError>> {
        if !self.in_flight {
            return None;
        }
        let result = if wait {
            self.done.recv().ok()?
        } else {
            self.done.try_recv().ok()?
        };
        self.in_flight = false;
        Some(result)
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn make_durable(job: Job, state_file: &StateFile, reports: &mpsc::UnboundedSender<Report>) -> Result<Option<u64>, ClientError> {
    let generation = job.point.run()?;
    if let Some(text) = job.pending {
        Pending::write(&job.pending_file, text)?;
    }
    state_file.store(&job.state)?;
    let _ = reports.send(job.persisted);
    if let Some(why) = job.resync {
        let _ = reports.send(Report::Resync(why));
    }
    Ok(generation)
}
