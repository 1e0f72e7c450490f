//! Replay's sequence marks, kept in the client's own state rather than on the replica's
//! files: which operation (volume and seq) last placed each object, keyed by the object's
//! inode identity `(st_dev, st_ino)`, which follows it across renames.
//!
//! The rules the replayer keeps with these marks (write-ahead, the order of `sync`, what a
//! crash leaves) are the invariants M1 to M7 of the [`super`] module doc; this file names
//! them where it keeps them.
//!
//! # Storage
//! A [`MarkStore`] holds every mark in memory (a lookup is one hash probe). Changes since
//! the last sync are kept twice: in a set of unsynced changes that `sync` commits to the
//! redb file in one transaction (M3), and appended to a log file beside it,
//! `<store>.log`, which only the page cache keeps (M4). Each commit records which log it
//! took changes from and where they end in it (the cut); the log is kept across commits
//! and rewritten with only the changes not yet committed once it passes
//! [`LOG_COMPACT_BYTES`]. The log is what survives a process crash (`kill -9`) between two
//! syncs; it is never fsynced, and it records the boot it was written in, so after a
//! machine restart it is known to be untrustworthy and dropped.
//!
//! Log layout, all integers little-endian: a 64-byte header (magic `IMZMARK1`, format u32,
//! 4 reserved bytes, the log's epoch u64 (the store's commit generation when it was
//! written), the boot id as 36 ASCII bytes, CRC-32C of the preceding 60 bytes), then 40-byte records (kind u8: 1 set, 2 remove;
//! flags u8: bit 0 `to_new_path`; 2 reserved bytes; dev, ino, volume, seq as u64;
//! CRC-32C of the preceding 36 bytes). A torn or garbled record ends the log.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, DatabaseError, Durability, ReadableTable, TableDefinition};

/// `(dev, ino)` -> `(volume, seq, to_new_path)`.
const MARKS: TableDefinition<(u64, u64), (u64, u64, bool)> = TableDefinition::new("marks");
/// name -> value; the names below.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_FORMAT: &str = "format";
/// Incremented by every commit; the log names the generation it follows.
const META_GENERATION: &str = "generation";
const META_ROOT_DEV: &str = "root_dev";
const META_ROOT_INO: &str = "root_ino";
/// The log a commit took its changes from (the epoch in its header) and where in it they
/// end: the records after that offset were made since, and only the log holds them. A
/// commit runs beside the replay that keeps appending (see [`MarkStore::begin_commit`]), and
/// the log is kept across commits, rewritten only past [`LOG_COMPACT_BYTES`] (creating a
/// file per commit cost the client measurable CPU in ext4's inode allocation).
const META_LOG_EPOCH: &str = "log_epoch";
const META_LOG_CUT: &str = "log_cut";
/// A log longer than this is rewritten (with only the changes not yet committed) after a
/// commit: about 26 000 records.
const LOG_COMPACT_BYTES: u64 = 1 << 20;

/// The store format this code writes and reads.
pub const FORMAT: u64 = 1;
/// redb's page cache: every mark is in our own map already, so redb needs little.
const CACHE_BYTES: usize = 4 << 20;

const LOG_MAGIC: &[u8; 8] = b"IMZMARK1";
const LOG_FORMAT: u32 = 1;
const HEADER_LEN: usize = 64;
const RECORD_LEN: usize = 40;
const BOOT_ID_LEN: usize = 36;
const KIND_SET: u8 = 1;
const KIND_REMOVE: u8 = 2;
const FLAG_TO_NEW_PATH: u8 = 1;

/// An object's identity on this machine: it stays with the object across renames, and is
/// given to another object only once this one is freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InodeId {
    pub dev: u64,
    pub ino: u64,
}

impl InodeId {
    pub fn of(st: &libc::stat) -> InodeId {
        InodeId { dev: st.st_dev, ino: st.st_ino }
    }
}

/// Which operation last placed an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mark {
    /// The journal's volume (see `Replayer::with_volume`): marks of another volume are
    /// ignored, so a journal restarted from seq 1 is not confused with an old one.
    pub volume: u64,
    pub seq: u64,
    /// The operation sent the object to its `new_path` (a rename's, link's or exchange's
    /// destination) rather than placing it at its `path`. A mark is written before the
    /// change it describes (M1), so this tells, for the operation in flight at a crash,
    /// whether its change happened (M2).
    pub to_new_path: bool,
}

/// What opening a store found of the changes made after its last sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovered {
    /// Nothing unsynced: the last process synced before it stopped, or this is a new store.
    Nothing,
    /// A process stopped without syncing, during this boot: the page cache kept both its
    /// changes to the replica and its log, so the marks are exactly as they were (M4).
    Unsynced { changes: usize },
    /// The machine restarted since changes were last logged without a sync: the replica may
    /// hold any part of them, so their marks were dropped. Entries applied after the last
    /// sync are replayed again by presence alone, which can leave differences where a name
    /// was reused among them: compare the replica with the master (resync or
    /// `imezzo verify`).
    Dropped { changes: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum MarkStoreError {
    #[error("the mark store {path} is in use by another process (another `imezzo client` with this --state dir?): stop it, or give this client its own state dir")]
    Locked { path: PathBuf },
    #[error("the mark store {path} has format {found}, newer than this imezzo reads ({supported}): run the newer imezzo, or delete the file and its .log (replay then has no marks until it places objects again)")]
    NewerFormat { path: PathBuf, found: u64, supported: u64 },
    #[error("the mark store {path} is damaged ({reason}): delete the file and its .log and restart the client (replay then has no marks until it places objects again)")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot use {path} for replay's marks: {source}; check that the state dir exists and its permissions")]
    Io { path: PathBuf, source: io::Error },
    #[error("mark store {path}: {source}; check the state dir's disk (free space, dmesg), then restart the client")]
    Storage { path: PathBuf, source: Box<redb::Error> },
    #[error("the mark log {path}: {source}; check the state dir's disk (free space, permissions, dmesg), then restart the client")]
    Log { path: PathBuf, source: io::Error },
}

trait AtPath<T> {
    fn at(self, path: &Path) -> Result<T, MarkStoreError>;
}

impl<T, E: Into<redb::Error>> AtPath<T> for Result<T, E> {
    fn at(self, path: &Path) -> Result<T, MarkStoreError> {
        self.map_err(|e| MarkStoreError::Storage { path: path.to_owned(), source: Box::new(e.into()) })
    }
}

/// The redb file and the log of its unsynced changes.
struct Files {
    db: Arc<Database>,
    path: PathBuf,
    log: File,
    log_path: PathBuf,
    /// Where the next record goes.
    log_end: u64,
    /// The epoch in the log's header: the generation when it was (re)written.
    log_epoch: u64,
    /// The log must be rewritten before anything is appended (it was found unusable at
    /// open, or a rewrite failed), or a reopen would drop the new records.
    log_stale: bool,
    boot_id: [u8; BOOT_ID_LEN],
}

/// Replay's sequence marks: in memory only ([`MarkStore::in_memory`]) or backed by a redb
/// file ([`MarkStore::open`]). See the module doc.
///
/// Only `Replayer::sync` commits: dropping a store without it is what a crash does, the
/// unsynced changes then live on in the log alone (M4).
pub struct MarkStore {
    files: Option<Files>,
    marks: HashMap<InodeId, Mark>,
    /// Changes since the last commit, the last one per object winning.
    unsynced: HashMap<InodeId, Option<Mark>>,
    /// Log records not yet written: removals, which may be lost (M5), wait for the next
    /// write-ahead record instead of costing a write each.
    log_buf: Vec<u8>,
    /// The highest seq ever set per volume, removals notwithstanding: an operation above it
    /// cannot meet an object placed after it, whatever the tree holds.
    max_seq: HashMap<u64, u64>,
    generation: u64,
    /// The replica root these marks describe; `None` until bound.
    root: Option<InodeId>,
    /// Every durable mark must go at the next commit (the store was bound to another root).
    clear_durable: bool,
    root_unsynced: bool,
    recovered: Recovered,
    /// The log the last commit took changes from and where they end ([`META_LOG_CUT`]), as
    /// loaded.
    log_cut: Option<(u64, u64)>,
    /// A commit begun and not yet ended: see [`MarkStore::begin_commit`].
    committing: bool,
}

/// The changes of a [`MarkStore`] up to one moment, to be committed to its redb file on any
/// thread while the store takes further changes; see [`MarkStore::begin_commit`].
pub struct PendingCommit {
    db: Arc<Database>,
    path: PathBuf,
    changes: HashMap<InodeId, Option<Mark>>,
    clear_durable: bool,
    root: Option<InodeId>,
    generation: u64,
    log_epoch: u64,
    log_cut: u64,
}

impl PendingCommit {
    /// Commits the changes in one durable transaction; returns the new generation, for
    /// [`MarkStore::end_commit`].
    pub fn run(self) -> Result<u64, MarkStoreError> {
        let path = &self.path;
        let mut txn = self.db.begin_write().at(path)?;
        txn.set_durability(Durability::Immediate);
        {
            if self.clear_durable {
                txn.delete_table(MARKS).at(path)?;
            }
            let mut table = txn.open_table(MARKS).at(path)?;
            for (id, change) in &self.changes {
                match change {
                    Some(m) => {
                        table.insert((id.dev, id.ino), (m.volume, m.seq, m.to_new_path)).at(path)?;
                    }
                    None => {
                        table.remove((id.dev, id.ino)).at(path)?;
                    }
                }
            }
            let mut meta = txn.open_table(META).at(path)?;
            meta.insert(META_FORMAT, FORMAT).at(path)?;
            meta.insert(META_GENERATION, self.generation).at(path)?;
            meta.insert(META_LOG_EPOCH, self.log_epoch).at(path)?;
            meta.insert(META_LOG_CUT, self.log_cut).at(path)?;
            if let Some(root) = self.root {
                meta.insert(META_ROOT_DEV, root.dev).at(path)?;
                meta.insert(META_ROOT_INO, root.ino).at(path)?;
            }
        }
        txn.commit().at(path)?;
        Ok(self.generation)
    }
}

impl std::fmt::Debug for MarkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MarkStore")
            .field("path", &self.path())
            .field("marks", &self.marks.len())
            .field("unsynced", &self.unsynced.len())
            .field("generation", &self.generation)
            .field("recovered", &self.recovered)
            .finish()
    }
}

impl MarkStore {
    /// A store that lives as long as the replayer: marks protect replaying entries again
    /// within one process, never across a restart. For tests and one-shot replays.
    pub fn in_memory() -> MarkStore {
        MarkStore {
            files: None,
            marks: HashMap::new(),
            unsynced: HashMap::new(),
            log_buf: Vec::new(),
            max_seq: HashMap::new(),
            generation: 0,
            root: None,
            clear_durable: false,
            root_unsynced: false,
            recovered: Recovered::Nothing,
            log_cut: None,
            committing: false,
        }
    }

    /// Opens the store at `path` (created if absent) and its log `<path>.log`: loads every
    /// mark into memory, then the log's changes if the log was written during this boot
    /// after the last commit (M4). See [`MarkStore::recovered`] for what it found.
    pub fn open(path: impl AsRef<Path>) -> Result<MarkStore, MarkStoreError> {
        MarkStore::open_in_boot(path.as_ref(), boot_id())
    }

    /// [`MarkStore::open`] as if the machine's boot id were `boot_id`: a test changes it to
    /// play a machine restart.
    pub(crate) fn open_in_boot(path: &Path, boot_id: [u8; BOOT_ID_LEN]) -> Result<MarkStore, MarkStoreError> {
        let path = path.to_path_buf();
        let created = !path.try_exists().map_err(|source| MarkStoreError::Io { path: path.clone(), source })?;
        let mut builder = Database::builder();
        builder.set_cache_size(CACHE_BYTES).create_with_file_format_v3(true);
        let db = builder.create(&path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => MarkStoreError::Locked { path: path.clone() },
            e => MarkStoreError::Storage { path: path.clone(), source: Box::new(e.into()) },
        })?;
        if created {
            // The new file's name must survive a power cut as well as its contents.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|source| MarkStoreError::Io { path: dir.to_path_buf(), source })?;
            }
        }
        let (generation, root, marks, log_cut) = load(&db, &path)?;
        let mut max_seq = HashMap::new();
        for m in marks.values() {
            bump(&mut max_seq, m);
        }
        let mut log_path = path.clone().into_os_string();
        log_path.push(".log");
        let log_path = PathBuf::from(log_path);
        let log = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&log_path)
            .map_err(|source| MarkStoreError::Log { path: log_path.clone(), source })?;
        let mut store = MarkStore {
            files: Some(Files {
                db: Arc::new(db),
                path,
                log,
                log_path,
                log_end: 0,
                log_epoch: 0,
                log_stale: true,
                boot_id,
            }),
            marks,
            unsynced: HashMap::new(),
            log_buf: Vec::new(),
            max_seq,
            generation,
            root,
            clear_durable: false,
            root_unsynced: false,
            recovered: Recovered::Nothing,
            log_cut,
            committing: false,
        };
        store.recover_log()?;
        Ok(store)
    }

    /// The redb file, `None` for an in-memory store.
    pub fn path(&self) -> Option<&Path> {
        self.files.as_ref().map(|f| f.path.as_path())
    }

    /// What opening found of changes made after the last sync.
    pub fn recovered(&self) -> Recovered {
        self.recovered
    }

    /// The mark of `id`, synced or not.
    pub fn get(&self, id: InodeId) -> Option<Mark> {
        self.marks.get(&id).copied()
    }

    /// How many objects carry a mark.
    pub fn len(&self) -> usize {
        self.marks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }

    /// How many objects' marks changed since the last sync.
    pub fn unsynced(&self) -> usize {
        self.unsynced.len()
    }

    /// The highest seq ever marked in `volume`, removed marks included.
    pub fn max_seq(&self, volume: u64) -> Option<u64> {
        self.max_seq.get(&volume).copied()
    }

    /// Records `mark` for `id`, in memory and in the log, before returning (M1): once this
    /// returns `Ok`, a process crash keeps it. The replayer calls this itself; it is public
    /// for tools and tests that need to set up a store.
    /// On `Err` nothing changed, in memory or in the log.
    pub fn set(&mut self, id: InodeId, mark: Mark) -> Result<(), MarkStoreError> {
        if self.marks.get(&id) == Some(&mark) {
            return Ok(());
        }
        if self.files.is_some() {
            let mut record = Vec::with_capacity(RECORD_LEN);
            push_record(&mut record, KIND_SET, id, Some(mark));
            self.write_log(&record)?;
        }
        self.marks.insert(id, mark);
        self.unsynced.insert(id, Some(mark));
        bump(&mut self.max_seq, &mark);
        Ok(())
    }

    /// Forgets the mark of `id`, whose object is gone. The log record waits for the next
    /// write (M5): losing it in a crash leaves a stale entry, which M6 makes harmless.
    pub fn remove(&mut self, id: InodeId) {
        // `marks` holds every durable and unsynced mark: absent there, there is nothing.
        if self.marks.remove(&id).is_none() {
            return;
        }
        self.unsynced.insert(id, None);
        if self.files.is_some() {
            push_record(&mut self.log_buf, KIND_REMOVE, id, None);
        }
    }

    /// Ties the store to the replica root `root`. Marks recorded for another root describe
    /// another tree: they are all dropped (at once in memory, durably at the next sync).
    pub(crate) fn bind_root(&mut self, root: InodeId) -> Result<(), MarkStoreError> {
        match self.root {
            Some(r) if r == root => return Ok(()),
            Some(r) => {
                log::warn!(
                    "replay: the mark store {} describes another replica root (dev {} ino {}), not this one (dev {} \
                     ino {}): dropping its {} marks",
                    self.path().map(|p| p.display().to_string()).unwrap_or_default(),
                    r.dev,
                    r.ino,
                    root.dev,
                    root.ino,
                    self.marks.len()
                );
                self.marks.clear();
                self.unsynced.clear();
                self.log_buf.clear();
                self.max_seq.clear();
                self.clear_durable = true;
                self.rewrite_log()?;
            }
            None => {}
        }
        self.root = Some(root);
        self.root_unsynced = true;
        Ok(())
    }

    /// Commits every change since the last commit in one durable redb transaction, then
    /// empties the log (M3): [`MarkStore::begin_commit`], `run` and
    /// [`MarkStore::end_commit`] at once. The replayer takes those steps itself, after the
    /// replica is durable: committing before would let the store describe placements the
    /// durable tree lacks.
    #[cfg(test)]
    pub(crate) fn commit(&mut self) -> Result<(), MarkStoreError> {
        match self.begin_commit() {
            Some(c) => {
                let generation = c.run()?;
                self.end_commit(generation)
            }
            None => Ok(()),
        }
    }

    /// Takes every change since the last commit for a [`PendingCommit`], which may run on
    /// another thread while this store takes further changes (the replay goes on while the
    /// replica is synced); `None` when there is nothing to commit. Call
    /// [`MarkStore::end_commit`] with its result before beginning another.
    ///
    /// Meanwhile the log keeps growing: a crash before the commit resumes what follows the
    /// previous commit's cut, one after resumes only what follows this one's
    /// ([`META_LOG_CUT`]), so the changes made beside the commit survive either way (M4).
    pub(crate) fn begin_commit(&mut self) -> Option<PendingCommit> {
        debug_assert!(!self.committing, "a mark commit begun while another is in flight");
        let Some(files) = &self.files else {
            self.unsynced.clear();
            self.clear_durable = false;
            self.root_unsynced = false;
            return None;
        };
        // Buffered removals are in `unsynced`: committed now, or lost with the log (M5).
        self.log_buf.clear();
        if self.unsynced.is_empty() && !self.clear_durable && !self.root_unsynced {
            return None;
        }
        self.committing = true;
        let commit = PendingCommit {
            db: files.db.clone(),
            path: files.path.clone(),
            changes: std::mem::take(&mut self.unsynced),
            clear_durable: std::mem::take(&mut self.clear_durable),
            root: self.root,
            generation: self.generation + 1,
            // A stale log is rewritten before anything is appended to it: nothing after
            // its end is a change.
            log_epoch: files.log_epoch,
            log_cut: files.log_end,
        };
        self.root_unsynced = false;
        Some(commit)
    }

    /// Records that the commit [`MarkStore::begin_commit`] gave out is durable as
    /// `generation`; past [`LOG_COMPACT_BYTES`], rewrites the log with only the changes made
    /// since.
    pub(crate) fn end_commit(&mut self, generation: u64) -> Result<(), MarkStoreError> {
        self.committing = false;
        self.generation = generation;
        self.log_cut = None;
        match &mut self.files {
            Some(f) if f.log_end > LOG_COMPACT_BYTES => {
                // Until rewritten, a reopen resumes the log from the commit's cut; if this
                // fails, `log_stale` makes the next append retry it.
                f.log_stale = true;
                self.rewrite_log()
            }
            _ => Ok(()),
        }
    }

    /// Reads the log at open: replays it when it follows the last commit during this boot,
    /// drops it otherwise, and leaves it ready for appending.
    fn recover_log(&mut self) -> Result<(), MarkStoreError> {
        let f = self.files.as_mut().expect("only file stores have a log");
        let mut bytes = Vec::new();
        {
            use std::io::Read;
            let mut r = &f.log;
            r.read_to_end(&mut bytes).map_err(|source| MarkStoreError::Log { path: f.log_path.clone(), source })?;
        }
        let header = parse_header(&bytes);
        let records: Vec<(u8, InodeId, Option<Mark>)> =
            bytes.get(HEADER_LEN..).unwrap_or_default().chunks_exact(RECORD_LEN).map_while(parse_record).collect();
        // The records no commit has taken: those after the last commit's cut when this is
        // the log it took them from, all of them when the log was rewritten since (its
        // epoch is the current generation); none of an older log.
        let fresh = match (header, self.log_cut) {
            (Some((epoch, _)), Some((cut_epoch, cut))) if epoch == cut_epoch => {
                Some((cut.saturating_sub(HEADER_LEN as u64) / RECORD_LEN as u64) as usize)
            }
            (Some((epoch, _)), _) if epoch == self.generation => Some(0),
            _ => None,
        };
        match (header, fresh) {
            (Some((epoch, boot)), Some(skip)) if boot == f.boot_id => {
                f.log_end = (HEADER_LEN + records.len() * RECORD_LEN) as u64;
                f.log_epoch = epoch;
                f.log_stale = false;
                // A torn record ends the log: cut it so appends follow the last whole one.
                if bytes.len() as u64 != f.log_end {
                    f.log
                        .set_len(f.log_end)
                        .map_err(|source| MarkStoreError::Log { path: f.log_path.clone(), source })?;
                }
                let log_path = f.log_path.clone();
                let n = records.len().saturating_sub(skip);
                for (kind, id, mark) in records.into_iter().skip(skip) {
                    resume(&mut self.marks, &mut self.unsynced, &mut self.max_seq, kind, id, mark);
                }
                if n > 0 {
                    log::info!(
                        "replay: resumed {n} unsynced mark changes from {} (the last client stopped without syncing)",
                        log_path.display()
                    );
                    self.recovered = Recovered::Unsynced { changes: n };
                }
                Ok(())
            }
            // Written after the last commit but before a restart of the machine: the page
            // cache that held the changes to the replica is gone, and which of them reached
            // the disk is unknown, so the log cannot describe the tree (M4).
            (Some(_), Some(skip)) if records.len() > skip => {
                let n = records.len() - skip;
                log::warn!(
                    "replay: the machine restarted while {n} mark changes in {} were unsynced: they are dropped, and \
                     entries applied after the last sync will be replayed by presence alone; compare the replica with \
                     the master",
                    f.log_path.display()
                );
                self.recovered = Recovered::Dropped { changes: n };
                self.rewrite_log()
            }
            // An older generation (the commit went through, the rewrite did not), or no
            // usable header: everything in it is already committed or never was logged.
            _ => self.rewrite_log(),
        }
    }


    /// Replaces the log with one naming the current generation and boot that holds every
    /// change not yet committed. Built aside and renamed over the old one, so a crash at any
    /// point leaves one of the two whole (a log cut in place and then rewritten lost, in
    /// between, the changes it was to hold again).
    fn rewrite_log(&mut self) -> Result<(), MarkStoreError> {
        let generation = self.generation;
        let Some(f) = &mut self.files else { return Ok(()) };
        let mut bytes = Vec::with_capacity(HEADER_LEN + self.unsynced.len() * RECORD_LEN);
        bytes.extend_from_slice(&encode_header(generation, &f.boot_id));
        for (id, change) in &self.unsynced {
            push_record(&mut bytes, if change.is_some() { KIND_SET } else { KIND_REMOVE }, *id, *change);
        }
        let mut tmp = f.log_path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let err = |source| MarkStoreError::Log { path: f.log_path.clone(), source };
        let log = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        log.write_all_at(&bytes, 0).map_err(err)?;
        std::fs::rename(&tmp, &f.log_path).map_err(err)?;
        f.log = log;
        f.log_end = bytes.len() as u64;
        f.log_epoch = generation;
        f.log_stale = false;
        self.log_buf.clear();
        Ok(())
    }

    /// Appends the buffered records, then `record`, to the log, in one write. On `Err`,
    /// `record` is not logged and the buffered records wait for the next try; the log's end
    /// does not move, so the next write covers whatever part this one left.
    fn write_log(&mut self, record: &[u8]) -> Result<(), MarkStoreError> {
        if self.files.as_ref().is_some_and(|f| f.log_stale) {
            // The changes not yet committed are all in `unsynced`: the rewritten log holds
            // them before anything new.
            self.rewrite_log()?;
        }
        let Some(f) = &mut self.files else { return Ok(()) };
        let mut out = std::mem::take(&mut self.log_buf);
        out.extend_from_slice(record);
        match f.log.write_all_at(&out, f.log_end) {
            Ok(()) => {
                f.log_end += out.len() as u64;
                Ok(())
            }
            Err(source) => {
                out.truncate(out.len() - record.len());
                self.log_buf = out;
                Err(MarkStoreError::Log { path: f.log_path.clone(), source })
            }
        }
    }
}

/// One change read back from the log at open.
fn resume(
    marks: &mut HashMap<InodeId, Mark>,
    unsynced: &mut HashMap<InodeId, Option<Mark>>,
    max_seq: &mut HashMap<u64, u64>,
    kind: u8,
    id: InodeId,
    mark: Option<Mark>,
) {
    match (kind, mark) {
        (KIND_SET, Some(m)) => {
            marks.insert(id, m);
            unsynced.insert(id, Some(m));
            bump(max_seq, &m);
        }
        _ => {
            marks.remove(&id);
            unsynced.insert(id, None);
        }
    }
}

fn bump(max_seq: &mut HashMap<u64, u64>, m: &Mark) {
    let e = max_seq.entry(m.volume).or_insert(m.seq);
    *e = (*e).max(m.seq);
}

/// Reads generation, root and every mark; creates the tables of a new store.
#[allow(clippy::type_complexity)]
fn load(
    db: &Database,
    path: &Path,
) -> Result<(u64, Option<InodeId>, HashMap<InodeId, Mark>, Option<(u64, u64)>), MarkStoreError> {
    let txn = db.begin_write().at(path)?;
    let (generation, root, marks, log_cut) = {
        let meta = txn.open_table(META).at(path)?;
        let table = txn.open_table(MARKS).at(path)?;
        let get =
            |name: &str| -> Result<Option<u64>, MarkStoreError> { Ok(meta.get(name).at(path)?.map(|v| v.value())) };
        match get(META_FORMAT)? {
            Some(found) if found > FORMAT => {
                return Err(MarkStoreError::NewerFormat { path: path.to_owned(), found, supported: FORMAT })
            }
            Some(found) if found < FORMAT => {
                return Err(MarkStoreError::Corrupt {
                    path: path.to_owned(),
                    reason: format!("unknown old format {found}"),
                })
            }
            _ => {}
        }
        let generation = get(META_GENERATION)?.unwrap_or(0);
        let root = match (get(META_ROOT_DEV)?, get(META_ROOT_INO)?) {
            (Some(dev), Some(ino)) => Some(InodeId { dev, ino }),
            _ => None,
        };
        let mut marks = HashMap::new();
        for row in table.iter().at(path)? {
            let (k, v) = row.at(path)?;
            let (dev, ino) = k.value();
            let (volume, seq, to_new_path) = v.value();
            marks.insert(InodeId { dev, ino }, Mark { volume, seq, to_new_path });
        }
        let log_cut = match (get(META_LOG_EPOCH)?, get(META_LOG_CUT)?) {
            (Some(epoch), Some(cut)) => Some((epoch, cut)),
            _ => None,
        };
        (generation, root, marks, log_cut)
    };
    // Keeps the tables of a new store; nothing else was written.
    txn.commit().at(path)?;
    Ok((generation, root, marks, log_cut))
}

/// This boot's id; all zeroes where the kernel does not tell (then no log is ever trusted
/// across a reopen, which is safe).
fn boot_id() -> [u8; BOOT_ID_LEN] {
    let mut id = [0u8; BOOT_ID_LEN];
    match std::fs::read("/proc/sys/kernel/random/boot_id") {
        Ok(b) if b.len() > BOOT_ID_LEN => id.copy_from_slice(&b[..BOOT_ID_LEN]),
        Ok(_) => log::warn!(
            "replay: /proc/sys/kernel/random/boot_id is malformed; unsynced marks will not survive a restart"
        ),
        Err(e) => log::warn!("replay: cannot read the boot id ({e}); unsynced marks will not survive a restart"),
    }
    id
}

fn encode_header(generation: u64, boot_id: &[u8; BOOT_ID_LEN]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(LOG_MAGIC);
    h[8..12].copy_from_slice(&LOG_FORMAT.to_le_bytes());
    h[16..24].copy_from_slice(&generation.to_le_bytes());
    h[24..60].copy_from_slice(boot_id);
    let crc = crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

/// `(generation, boot id)` of a valid header; all-zero boot ids never match a live one.
fn parse_header(b: &[u8]) -> Option<(u64, [u8; BOOT_ID_LEN])> {
    let h = b.get(..HEADER_LEN)?;
    if &h[0..8] != LOG_MAGIC || h[8..12] != LOG_FORMAT.to_le_bytes() || h[60..64] != crc32c(&h[..60]).to_le_bytes() {
        return None;
    }
    let generation = u64::from_le_bytes(h[16..24].try_into().ok()?);
    let boot: [u8; BOOT_ID_LEN] = h[24..60].try_into().ok()?;
    if boot == [0; BOOT_ID_LEN] {
        return None;
    }
    Some((generation, boot))
}

fn push_record(out: &mut Vec<u8>, kind: u8, id: InodeId, mark: Option<Mark>) {
    let mut r = [0u8; RECORD_LEN];
    r[0] = kind;
    let m = mark.unwrap_or(Mark { volume: 0, seq: 0, to_new_path: false });
    r[1] = if m.to_new_path { FLAG_TO_NEW_PATH } else { 0 };
    r[4..12].copy_from_slice(&id.dev.to_le_bytes());
    r[12..20].copy_from_slice(&id.ino.to_le_bytes());
    r[20..28].copy_from_slice(&m.volume.to_le_bytes());
    r[28..36].copy_from_slice(&m.seq.to_le_bytes());
    let crc = crc32c(&r[..36]);
    r[36..40].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&r);
}

fn parse_record(r: &[u8]) -> Option<(u8, InodeId, Option<Mark>)> {
    if r.len() != RECORD_LEN || r[36..40] != crc32c(&r[..36]).to_le_bytes() {
        return None;
    }
    let u = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().expect("8 bytes"));
    let id = InodeId { dev: u(4), ino: u(12) };
    match r[0] {
        KIND_SET => {
            Some((KIND_SET, id, Some(Mark { volume: u(20), seq: u(28), to_new_path: r[1] & FLAG_TO_NEW_PATH != 0 })))
        }
        KIND_REMOVE => Some((KIND_REMOVE, id, None)),
        _ => None,
    }
}

/// CRC-32C (Castagnoli), bit by bit: records are 36 bytes, so a table buys nothing.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ino: u64) -> InodeId {
        InodeId { dev: 7, ino }
    }

    fn mark(seq: u64) -> Mark {
        Mark { volume: 3, seq, to_new_path: seq.is_multiple_of(2) }
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn records_and_headers_round_trip_and_a_flipped_bit_is_caught() {
        let mut buf = Vec::new();
        push_record(&mut buf, KIND_SET, id(9), Some(mark(12)));
        assert_eq!(parse_record(&buf), Some((KIND_SET, id(9), Some(mark(12)))));
        buf[13] ^= 1;
        assert_eq!(parse_record(&buf), None);
        let h = encode_header(5, &[b'a'; BOOT_ID_LEN]);
        assert_eq!(parse_header(&h), Some((5, [b'a'; BOOT_ID_LEN])));
        assert_eq!(parse_header(&encode_header(5, &[0; BOOT_ID_LEN])), None);
    }

    #[test]
    fn committed_marks_survive_a_reopen() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("m.redb");
        let mut s = MarkStore::open(&path).unwrap();
        s.set(id(1), mark(10)).unwrap();
        s.set(id(2), mark(11)).unwrap();
        s.remove(id(1));
        s.commit().unwrap();
        assert_eq!(s.unsynced(), 0);
        drop(s);
        let s = MarkStore::open(&path).unwrap();
        assert_eq!((s.get(id(1)), s.get(id(2))), (None, Some(mark(11))));
        assert_eq!(s.recovered(), Recovered::Nothing);
        assert_eq!(s.max_seq(3), Some(11));
    }

    #[test]
    fn unsynced_changes_come_back_from_the_log_in_the_same_boot() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("m.redb");
        let mut s = MarkStore::open(&path).unwrap();
        s.set(id(1), mark(1)).unwrap();
        s.commit().unwrap();
        s.set(id(2), mark(2)).unwrap();
        s.remove(id(1));
        // The removal is only buffered: a later write carries it.
        s.set(id(3), mark(3)).unwrap();
        drop(s); // a crash: no commit
        let s = MarkStore::open(&path).unwrap();
        assert_eq!(s.recovered(), Recovered::Unsynced { changes: 3 });
        assert_eq!((s.get(id(1)), s.get(id(2)), s.get(id(3))), (None, Some(mark(2)), Some(mark(3))));
        assert_eq!(s.unsynced(), 3, "recovered changes are still to be committed");
    }

    #[test]
    fn a_log_from_before_a_machine_restart_is_dropped() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("m.redb");
        let before = [b'1'; BOOT_ID_LEN];
        let mut s = MarkStore::open_in_boot(&path, before).unwrap();
        s.set(id(1), mark(1)).unwrap();
        s.commit().unwrap();
        s.set(id(2), mark(2)).unwrap();
        drop(s);
        let s = MarkStore::open_in_boot(&path, [b'2'; BOOT_ID_LEN]).unwrap();
        assert_eq!(s.recovered(), Recovered::Dropped { changes: 1 });
        assert_eq!((s.get(id(1)), s.get(id(2))), (Some(mark(1)), None));
        drop(s);
        // Dropped once: the next open finds a clean log.
        let s = MarkStore::open_in_boot(&path, [b'2'; BOOT_ID_LEN]).unwrap();
        assert_eq!(s.recovered(), Recovered::Nothing);
    }

    #[test]
    fn a_torn_last_record_ends_the_log_and_the_next_append_follows_the_last_whole_one() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("m.redb");
        let mut s = MarkStore::open(&path).unwrap();
        s.set(id(1), mark(1)).unwrap();
        s.set(id(2), mark(2)).unwrap();
        drop(s);
        let log = dir.path().join("m.redb.log");
        let len = std::fs::metadata(&log).unwrap().len();
        File::options().write(true).open(&log).unwrap().set_len(len - 7).unwrap();
        let mut s = MarkStore::open(&path).unwrap();
        assert_eq!((s.get(id(1)), s.get(id(2))), (Some(mark(1)), None));
        s.set(id(3), mark(3)).unwrap();
        drop(s);
        let s = MarkStore::open(&path).unwrap();
        assert_eq!((s.get(id(1)), s.get(id(2)), s.get(id(3))), (Some(mark(1)), None, Some(mark(3))));
    }

    #[test]
    fn a_log_left_behind_by_a_commit_whose_reset_did_not_happen_is_ignored() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("m.redb");
        let mut s = MarkStore::open(&path).unwrap();
        s.set(id(1), mark(1)).unwrap();
        let log = dir.path().join("m.redb.log");
        let before_commit = std::fs::read(&log).unwrap();
        s.commit().unwrap();
        drop(s);
        // The commit went through, the log still holds its changes under the old generation.
        std::fs::write(&log, &before_commit).unwrap();
        let s = MarkStore::open(&path).unwrap();
        assert_eq!(s.recovered(), Recovered::Nothing);
        assert_eq!(s.get(id(1)), Some(mark(1)));
    }

    /// A commit runs beside further changes; `stop` says how far it got before the crash.
    fn crash_during_a_commit_beside_changes(stop: usize) -> (tempfile::TempDir, MarkStore) {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("m.redb");
        let mut s = MarkStore::open(&path).unwrap();
        s.set(id(1), mark(1)).unwrap();
        s.set(id(2), mark(2)).unwrap();
        let c = s.begin_commit().unwrap();
        s.set(id(3), mark(3)).unwrap();
        s.remove(id(2));
        s.set(id(4), mark(4)).unwrap();
        if stop >= 1 {
            let generation = c.run().unwrap();
            if stop >= 2 {
                s.end_commit(generation).unwrap();
            }
        } else {
            drop(c);
        }
        drop(s);
        let s = MarkStore::open(&path).unwrap();
        (dir, s)
    }

    #[test]
    fn changes_made_beside_a_commit_survive_a_crash_before_during_or_after_it() {
        // Before the commit ran, after it ran but before the log was rewritten, and after.
        for stop in 0..3 {
            let (_dir, s) = crash_during_a_commit_beside_changes(stop);
            assert_eq!(
                (s.get(id(1)), s.get(id(2)), s.get(id(3)), s.get(id(4))),
                (Some(mark(1)), None, Some(mark(3)), Some(mark(4))),
                "crash at stage {stop}"
            );
            let resumed = if stop == 0 { 5 } else { 3 };
            assert_eq!(s.recovered(), Recovered::Unsynced { changes: resumed }, "crash at stage {stop}");
        }
    }

    #[test]
    fn the_log_is_kept_across_commits_and_rewritten_once_long() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("m.redb");
        let log = dir.path().join("m.redb.log");
        let mut s = MarkStore::open(&path).unwrap();
        s.set(id(1), mark(1)).unwrap();
        s.commit().unwrap();
        let kept = std::fs::metadata(&log).unwrap().len();
        assert_eq!(kept, (HEADER_LEN + RECORD_LEN) as u64, "a short log is not rewritten");
        let n = LOG_COMPACT_BYTES / RECORD_LEN as u64 + 10;
        for i in 0..n {
            s.set(id(100 + i), mark(2)).unwrap();
        }
        let c = s.begin_commit().unwrap();
        s.set(id(7), mark(3)).unwrap();
        let generation = c.run().unwrap();
        s.end_commit(generation).unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().len(), (HEADER_LEN + RECORD_LEN) as u64);
        drop(s);
        let s = MarkStore::open(&path).unwrap();
        assert_eq!(s.recovered(), Recovered::Unsynced { changes: 1 });
        assert_eq!((s.get(id(1)), s.get(id(100 + n - 1)), s.get(id(7))), (Some(mark(1)), Some(mark(2)), Some(mark(3))));
    }

    #[test]
    fn binding_another_root_drops_every_mark_durably() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("m.redb");
        let mut s = MarkStore::open(&path).unwrap();
        s.bind_root(id(100)).unwrap();
        s.set(id(1), mark(1)).unwrap();
        s.commit().unwrap();
        s.bind_root(id(100)).unwrap();
        assert_eq!(s.len(), 1);
        s.bind_root(id(200)).unwrap();
        assert!(s.is_empty());
        s.commit().unwrap();
        drop(s);
        let mut s = MarkStore::open(&path).unwrap();
        assert!(s.is_empty());
        s.bind_root(id(200)).unwrap();
        assert_eq!(s.max_seq(3), None);
    }

    #[test]
    fn a_second_open_of_the_same_store_is_refused() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("m.redb");
        let _s = MarkStore::open(&path).unwrap();
        assert!(matches!(MarkStore::open(&path), Err(MarkStoreError::Locked { .. })));
    }
}
