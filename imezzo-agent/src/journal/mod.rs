//! The server journal: the durable, ordered record of every change under the exported tree,
//! in `<state dir>/journal.redb`.
//!
//! docs/journal.md is the specification: tables, the commit sequence, the invariants J1 to J9
//! named in comments here, recovery, compaction rules S1 to S4, and format versions.
//!
//! A `Journal` is shared (`Arc<Journal>`) between the capture loop, which appends, and every
//! client session, which reads: redb gives each read an MVCC snapshot, so readers never wait
//! for the appender, and serializes writers (appends and compactions) itself.

mod paths;
mod supersede;

use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, DatabaseError, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::op::{JournalEntry, Op, RelPath};

/// The journal's file name inside the state dir.
pub const FILE_NAME: &str = "journal.redb";
/// The format this code writes and reads (docs/journal.md, "Versions of the format").
pub const FORMAT: u64 = 2;
/// redb's page cache cap: its default (1 GiB) would let a long read of the journal grow the
/// server agent far past its memory target.
const CACHE_BYTES: usize = 32 << 20;

/// seq -> rkyv archive of `JournalEntry { seq, op }`.
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
/// path -> (seq of its last change, seq of its last namespace change).
const VERSIONS: TableDefinition<&[u8], (u64, u64)> = TableDefinition::new("versions");
/// name -> value; the names below.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const META_FORMAT: &str = "format";
const META_VOLUME_ID: &str = "volume_id";
const META_FIRST_SEQ: &str = "first_seq";
const META_LAST_SEQ: &str = "last_seq";
const META_STORED_BYTES: &str = "stored_bytes";

/// Bytes a record costs in `stored_bytes` besides its archive: its u64 key (J6).
const KEY_BYTES: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot use the state dir {dir} for the journal: {source}; create it with `imezzo init --state DIR` and check its permissions")]
    StateDir { dir: PathBuf, source: std::io::Error },
    #[error("the journal {path} is in use by another process (another `imezzo server` with this --state dir?): stop it, or give this server its own state dir")]
    Locked { path: PathBuf },
    #[error("the journal {path} has format {found}, newer than this imezzo reads ({supported}): run the newer imezzo, or move the file aside to start a new journal (every client then resyncs in full)")]
    NewerFormat { path: PathBuf, found: u64, supported: u64 },
    #[error("the journal {path} has format {found}, written by an older imezzo; this one reads format {supported} only: move the file aside and restart the server (a new journal starts and every client resyncs in full)")]
    OlderFormat { path: PathBuf, found: u64, supported: u64 },
    #[error("the journal {path} is damaged ({reason}): move the file aside and restart the server; a new journal starts and every client resyncs in full")]
    BadMeta { path: PathBuf, reason: String },
    #[error("journal entry {seq} in {path} is corrupt ({reason}): the server cannot stream past it; move the file aside and restart the server, and every client resyncs in full")]
    Corrupt { path: PathBuf, seq: u64, reason: String },
    #[error("a client resumes at seq {requested} but this journal's last seq is {last_seq}: the client applied entries this journal never wrote (was the journal replaced or restored from an older copy?); the client must resync in full")]
    AheadOfJournal { requested: u64, last_seq: u64 },
    #[error("cannot read /dev/urandom to draw the journal's volume id: {source}")]
    Entropy { source: std::io::Error },
    #[error("cannot encode journal entry {seq}: {reason}")]
    Encode { seq: u64, reason: String },
    #[error("journal {path}: {source}; check the disk (free space, dmesg), then restart the server")]
    Storage { path: PathBuf, source: Box<redb::Error> },
}

pub type Result<T, E = JournalError> = std::result::Result<T, E>;

/// What `read_from` found at a resume point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFrom {
    /// The retained entries from the resume point on, in seq order, possibly with gaps where
    /// entries were superseded; empty when the client is caught up.
    Entries(Vec<JournalEntry>),
    /// Entries the client needs were dropped by retention: it must resync in full.
    Expired { first_retained: u64 },
}

/// The version of a path: the seq of its last change (docs/journal.md, "Versions").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathVersion {
    /// Last changed by the entry with this seq.
    ChangedAt(u64),
    /// Not changed at or after this seq (the journal's first retained seq): the last change,
    /// if any, is older than the retained journal.
    OlderThan(u64),
}

/// What one `compact` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompactReport {
    /// Entries dropped because a later entry re-applies them (rules S1 to S4).
    pub superseded: u64,
    /// Oldest entries dropped to fit the retention size.
    pub expired: u64,
    /// `versions` records dropped because they are older than the retained journal.
    pub versions_pruned: u64,
    pub first_seq: u64,
    pub stored_bytes: u64,
}

pub struct Journal {
    db: Database,
    path: PathBuf,
    volume_id: u128,
    // Mirrors of meta for cheap reads; both only grow (J1, J7), so concurrent writers
    // finishing out of order update them with fetch_max.
    first_seq: AtomicU64,
    last_seq: AtomicU64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("volume_id", &format_args!("{:032x}", self.volume_id))
            .field("first_seq", &self.first_seq())
            .field("last_seq", &self.last_seq())
            .finish()
    }
}

/// Attach the journal's path to a redb error.
trait AtPath<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T, E: Into<redb::Error>> AtPath<T> for std::result::Result<T, E> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|e| JournalError::Storage { path: path.to_owned(), source: Box::new(e.into()) })
    }
}

impl Journal {
    /// Opens `<state_dir>/journal.redb`, creating it (with a new volume id) if absent. After a
    /// crash, redb rolls back any commit whose checksums do not verify before this returns.
    pub fn open(state_dir: impl AsRef<Path>) -> Result<Journal> {
        let dir = state_dir.as_ref();
        let state_dir_err = |source| JournalError::StateDir { dir: dir.to_owned(), source };
        if !std::fs::metadata(dir).map_err(state_dir_err)?.is_dir() {
            return Err(state_dir_err(std::io::ErrorKind::NotADirectory.into()));
        }
        let path = dir.join(FILE_NAME);
        let created = !path.try_exists().map_err(state_dir_err)?;
        let db = builder().create(&path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => JournalError::Locked { path: path.clone() },
            e => JournalError::Storage { path: path.clone(), source: Box::new(e.into()) },
        })?;
        if created {
            // The new file's name must survive a power cut as well as its contents.
            File::open(dir).and_then(|d| d.sync_all()).map_err(state_dir_err)?;
        }
        Self::init(db, path)
    }

    /// Opens a journal kept in `backend` instead of a file: `redb::backends::InMemoryBackend`
    /// for simulations and tests, or a test backend that injects faults. Errors name it
    /// `label`.
    pub fn with_backend(backend: impl redb::StorageBackend, label: impl Into<PathBuf>) -> Result<Journal> {
        let path = label.into();
        let db = builder().create_with_backend(backend).at(&path)?;
        Self::init(db, path)
    }

    /// Creates the tables and meta of a new journal, or checks those of an existing one.
    fn init(mut db: Database, path: PathBuf) -> Result<Journal> {
        // A v2 file (none is expected: we create v3) becomes v3, the only format redb 3 reads.
        db.upgrade().at(&path)?;
        let mut txn = db.begin_write().at(&path)?;
        txn.set_durability(Durability::Immediate);
        let (volume_id, first_seq, last_seq, fresh) = {
            let mut meta = txn.open_table(META).at(&path)?;
            let entries = txn.open_table(ENTRIES).at(&path)?;
            txn.open_table(VERSIONS).at(&path)?;
            match meta_u64(&meta, META_FORMAT, &path)? {
                None => {
                    if entries.len().at(&path)? != 0 {
                        return Err(bad_meta(&path, "entries without a format record"));
                    }
                    // J8: the volume id is drawn once, in the transaction creating the journal.
                    let volume_id = random_volume_id().map_err(|source| JournalError::Entropy { source })?;
                    meta.insert(META_FORMAT, FORMAT.to_le_bytes().as_slice()).at(&path)?;
                    meta.insert(META_VOLUME_ID, volume_id.to_be_bytes().as_slice()).at(&path)?;
                    meta.insert(META_FIRST_SEQ, 1u64.to_le_bytes().as_slice()).at(&path)?;
                    meta.insert(META_LAST_SEQ, 0u64.to_le_bytes().as_slice()).at(&path)?;
                    meta.insert(META_STORED_BYTES, 0u64.to_le_bytes().as_slice()).at(&path)?;
                    (volume_id, 1, 0, true)
                }
                Some(found) if found > FORMAT => {
                    return Err(JournalError::NewerFormat { path, found, supported: FORMAT });
                }
                Some(found) if found < FORMAT => {
                    return Err(JournalError::OlderFormat { path, found, supported: FORMAT });
                }
                Some(_) => {
                    let id = meta
                        .get(META_VOLUME_ID)
                        .at(&path)?
                        .and_then(|v| <[u8; 16]>::try_from(v.value()).ok())
                        .ok_or_else(|| bad_meta(&path, "no valid volume id"))?;
                    let first = need_u64(&meta, META_FIRST_SEQ, &path)?;
                    let last = need_u64(&meta, META_LAST_SEQ, &path)?;
                    if first > last.saturating_add(1) {
                        return Err(bad_meta(&path, &format!("first seq {first} is past last seq {last} + 1")));
                    }
                    (u128::from_be_bytes(id), first, last, false)
                }
            }
        };
        if fresh {
            txn.commit().at(&path)?;
        } else {
            txn.abort().at(&path)?;
        }
        Ok(Journal { db, path, volume_id, first_seq: AtomicU64::new(first_seq), last_seq: AtomicU64::new(last_seq) })
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This journal's identity, random, fixed when the file was created (J8). A client that
    /// resumes against another volume id must resync in full.
    pub fn volume_id(&self) -> u128 {
        self.volume_id
    }

    /// The highest seq ever assigned, 0 when none (J1).
    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }

    /// The first retained seq: a client may resume at any seq from here to `last_seq() + 1`.
    pub fn first_seq(&self) -> u64 {
        self.first_seq.load(Ordering::Acquire)
    }

    /// The logical size of the retained entries, as retention measures it (J6).
    pub fn stored_bytes(&self) -> Result<u64> {
        let txn = self.db.begin_read().at(&self.path)?;
        let meta = txn.open_table(META).at(&self.path)?;
        need_u64(&meta, META_STORED_BYTES, &self.path)
    }

    /// Appends `ops` as one group commit: consecutive seqs from `last_seq() + 1`, all in one
    /// durable redb transaction (J1, J2). Returns the seqs assigned; once this returns `Ok`,
    /// the batch survives a crash.
    pub fn append(&self, ops: Vec<Op>) -> Result<Range<u64>> {
        if ops.is_empty() {
            let next = self.last_seq() + 1;
            return Ok(next..next);
        }
        let path = &self.path;
        let mut txn = self.db.begin_write().at(path)?;
        txn.set_durability(Durability::Immediate);
        let range = {
            let mut meta = txn.open_table(META).at(path)?;
            let mut entries = txn.open_table(ENTRIES).at(path)?;
            let mut versions = txn.open_table(VERSIONS).at(path)?;
            // The transaction, not the mirror, is the authority on the last seq.
            let last = need_u64(&meta, META_LAST_SEQ, path)?;
            let mut stored = need_u64(&meta, META_STORED_BYTES, path)?;
            let start = last + 1;
            let mut seq = start;
            for op in ops {
                let entry = JournalEntry { seq, op };
                let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&entry)
                    .map_err(|e| JournalError::Encode { seq, reason: e.to_string() })?;
                entries.insert(seq, bytes.as_slice()).at(path)?;
                stored += KEY_BYTES + bytes.len() as u64;
                for change in paths::changes(&entry.op) {
                    let key = change.path.as_bytes();
                    let (_, name_seq) = versions.get(key).at(path)?.map(|g| g.value()).unwrap_or((0, 0));
                    let name_seq = if change.renames { seq } else { name_seq };
                    versions.insert(key, (seq, name_seq)).at(path)?;
                }
                seq += 1;
            }
            meta.insert(META_LAST_SEQ, (seq - 1).to_le_bytes().as_slice()).at(path)?;
            meta.insert(META_STORED_BYTES, stored.to_le_bytes().as_slice()).at(path)?;
            start..seq
        };
        txn.commit().at(path)?;
        self.last_seq.fetch_max(range.end - 1, Ordering::AcqRel);
        Ok(range)
    }

    /// The retained entries from `seq` on (at most `max`), or `Expired` when `seq` is below
    /// the first retained seq. `seq` is the client's last applied seq + 1.
    pub fn read_from(&self, seq: u64, max: usize) -> Result<ReadFrom> {
        let path = &self.path;
        let txn = self.db.begin_read().at(path)?;
        let meta = txn.open_table(META).at(path)?;
        // One snapshot for the bounds and the entries, so a concurrent compaction cannot
        // expire entries between the check and the read.
        let first = need_u64(&meta, META_FIRST_SEQ, path)?;
        let last = need_u64(&meta, META_LAST_SEQ, path)?;
        if seq < first {
            return Ok(ReadFrom::Expired { first_retained: first });
        }
        if seq > last.saturating_add(1) {
            return Err(JournalError::AheadOfJournal { requested: seq, last_seq: last });
        }
        let entries = txn.open_table(ENTRIES).at(path)?;
        let mut out = Vec::new();
        for item in entries.range(seq..).at(path)?.take(max) {
            let (k, v) = item.at(path)?;
            out.push(decode(path, k.value(), v.value())?);
        }
        Ok(ReadFrom::Entries(out))
    }

    /// The seq of the last change of `path` (J9): of the path itself, or of a rename, removal,
    /// creation or rescan of one of its ancestors.
    pub fn version_of(&self, path: &RelPath) -> Result<PathVersion> {
        let file = &self.path;
        let txn = self.db.begin_read().at(file)?;
        let meta = txn.open_table(META).at(file)?;
        let first = need_u64(&meta, META_FIRST_SEQ, file)?;
        let versions = txn.open_table(VERSIONS).at(file)?;
        let mut latest = versions.get(path.as_bytes()).at(file)?.map_or(0, |g| g.value().0);
        for ancestor in paths::ancestors(path.as_bytes()) {
            if let Some(g) = versions.get(ancestor).at(file)? {
                latest = latest.max(g.value().1);
            }
        }
        Ok(if latest >= first { PathVersion::ChangedAt(latest) } else { PathVersion::OlderThan(first) })
    }

    /// Drops superseded entries (S1 to S4), then the oldest entries while the retained size is
    /// above `retain_bytes`, then `versions` records older than the retained journal. Never
    /// reorders entries or changes a seq (J4). See [`Journal::compact_keeping`].
    pub fn compact(&self, retain_bytes: u64) -> Result<CompactReport> {
        self.compact_keeping(retain_bytes, None)
    }

    /// [`Journal::compact`], keeping every entry from `keep_from` on (the lowest seq a
    /// connected client still needs) even when the retained size is above `retain_bytes`.
    ///
    /// The supersession plan is made from a read snapshot, outside any write transaction, so
    /// appends (the capture's commits) are never held up by the decoding of the whole
    /// journal; the planned drops are then applied in write transactions of at most
    /// [`COMPACT_CHUNK`] entries each. This is safe because an entry is dropped only for a
    /// *later* retained entry that covers it: entries appended after the snapshot can only
    /// add covers, never take one away (J4: nothing but compaction deletes, and compaction
    /// runs one at a time).
    pub fn compact_keeping(&self, retain_bytes: u64, keep_from: Option<u64>) -> Result<CompactReport> {
        let path = &self.path;
        let mut report = CompactReport::default();
        let dropped = {
            let txn = self.db.begin_read().at(path)?;
            let entries = txn.open_table(ENTRIES).at(path)?;
            let mut planner = supersede::Planner::new();
            for item in entries.range::<u64>(..).at(path)? {
                let (k, v) = item.at(path)?;
                let entry = decode(path, k.value(), v.value())?;
                planner.push(entry.seq, &entry.op);
            }
            planner.finish()
        };
        for chunk in dropped.chunks(COMPACT_CHUNK) {
            let mut txn = self.db.begin_write().at(path)?;
            txn.set_durability(Durability::Immediate);
            {
                let mut meta = txn.open_table(META).at(path)?;
                let mut entries = txn.open_table(ENTRIES).at(path)?;
                let mut stored = need_u64(&meta, META_STORED_BYTES, path)?;
                for &seq in chunk {
                    if let Some(v) = entries.remove(seq).at(path)? {
                        stored = stored.saturating_sub(KEY_BYTES + v.value().len() as u64);
                        report.superseded += 1;
                    }
                }
                meta.insert(META_STORED_BYTES, stored.to_le_bytes().as_slice()).at(path)?;
            }
            txn.commit().at(path)?;
        }

        let mut txn = self.db.begin_write().at(path)?;
        txn.set_durability(Durability::Immediate);
        {
            let mut meta = txn.open_table(META).at(path)?;
            let mut entries = txn.open_table(ENTRIES).at(path)?;
            let mut versions = txn.open_table(VERSIONS).at(path)?;
            let old_first = need_u64(&meta, META_FIRST_SEQ, path)?;
            let last = need_u64(&meta, META_LAST_SEQ, path)?;
            let mut stored = need_u64(&meta, META_STORED_BYTES, path)?;

            let mut first = old_first;
            while stored > retain_bytes {
                // A connected client's resume point is kept (its session asks for it next).
                let oldest = entries.first().at(path)?.map(|(k, _)| k.value());
                if let (Some(oldest), Some(keep)) = (oldest, keep_from) {
                    if oldest >= keep {
                        break;
                    }
                }
                let Some((k, v)) = entries.pop_first().at(path)? else {
                    // J6 says this cannot happen; an empty table holds nothing.
                    log::warn!("journal {}: stored size {stored} with no entries; resetting it", path.display());
                    stored = 0;
                    first = last + 1;
                    break;
                };
                stored = stored.saturating_sub(KEY_BYTES + v.value().len() as u64);
                first = first.max(k.value() + 1);
                report.expired += 1;
                if report.expired >= COMPACT_CHUNK as u64 {
                    // Bounded: the rest waits for the next round.
                    break;
                }
            }
            if entries.is_empty().at(path)? {
                first = last + 1;
            }

            if first > old_first {
                // Every record now below `first` answers `OlderThan(first)` with or without
                // it (J9), so it can go.
                let before = versions.len().at(path)?;
                versions.retain(|_, (seq, _)| seq >= first).at(path)?;
                report.versions_pruned = before - versions.len().at(path)?;
                meta.insert(META_FIRST_SEQ, first.to_le_bytes().as_slice()).at(path)?;
            }
            meta.insert(META_STORED_BYTES, stored.to_le_bytes().as_slice()).at(path)?;
            report.first_seq = first;
            report.stored_bytes = stored;
        }
        if report.expired + report.versions_pruned == 0 && report.first_seq == self.first_seq() {
            txn.abort().at(path)?;
        } else {
            txn.commit().at(path)?;
            self.first_seq.fetch_max(report.first_seq, Ordering::AcqRel);
        }
        Ok(report)
    }
}

/// Most entries one compaction write transaction deletes: appends wait for at most that.
pub const COMPACT_CHUNK: usize = 4096;

fn builder() -> redb::Builder {
    let mut b = Database::builder();
    b.set_cache_size(CACHE_BYTES).create_with_file_format_v3(true);
    b
}

/// Decodes the record at key `seq`, validating it (J3).
fn decode(path: &Path, seq: u64, bytes: &[u8]) -> Result<JournalEntry> {
    // redb hands out slices inside its pages with no alignment promise; rkyv's validation
    // would reject a misaligned archive, so copy into an aligned buffer first.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    let entry = rkyv::from_bytes::<JournalEntry, rkyv::rancor::Error>(&aligned).map_err(|e| JournalError::Corrupt {
        path: path.to_owned(),
        seq,
        reason: e.to_string(),
    })?;
    if entry.seq != seq {
        let reason = format!("the record is entry {}, stored at the wrong key", entry.seq);
        return Err(JournalError::Corrupt { path: path.to_owned(), seq, reason });
    }
    Ok(entry)
}

fn bad_meta(path: &Path, reason: &str) -> JournalError {
    JournalError::BadMeta { path: path.to_owned(), reason: reason.to_owned() }
}

fn meta_u64(meta: &impl ReadableTable<&'static str, &'static [u8]>, name: &str, path: &Path) -> Result<Option<u64>> {
    let Some(v) = meta.get(name).at(path)? else { return Ok(None) };
    let bytes = <[u8; 8]>::try_from(v.value()).map_err(|_| bad_meta(path, &format!("meta `{name}` is not 8 bytes")))?;
    Ok(Some(u64::from_le_bytes(bytes)))
}

fn need_u64(meta: &impl ReadableTable<&'static str, &'static [u8]>, name: &str, path: &Path) -> Result<u64> {
    meta_u64(meta, name, path)?.ok_or_else(|| bad_meta(path, &format!("meta `{name}` is missing")))
}

fn random_volume_id() -> std::io::Result<u128> {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(u128::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &str, offset: u64, len: u64) -> Op {
        Op::Write { path: path.into(), offset, len, source: None, mode: None, ino: None }
    }

    fn seqs(r: ReadFrom) -> Vec<u64> {
        match r {
            ReadFrom::Entries(v) => v.iter().map(|e| e.seq).collect(),
            ReadFrom::Expired { first_retained } => panic!("expired at {first_retained}"),
        }
    }

    #[test]
    fn an_empty_batch_assigns_nothing_and_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.append(vec![]).unwrap(), 1..1);
        assert_eq!(j.append(vec![write("f", 0, 1)]).unwrap(), 1..2);
        assert_eq!(j.append(vec![]).unwrap(), 2..2);
        assert_eq!(j.last_seq(), 1);
    }

    #[test]
    fn a_rename_of_a_directory_changes_the_version_of_every_descendant() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.append(vec![write("a/x", 0, 1)]).unwrap();
        let r = j
            .append(vec![Op::Rename { path: "a".into(), new_path: "b".into(), exchange: false, noreplace: false }])
            .unwrap();
        // Neither b/x nor b/deep/y was ever journalled by name.
        assert_eq!(j.version_of(&"b/x".into()).unwrap(), PathVersion::ChangedAt(r.start));
        assert_eq!(j.version_of(&"b/deep/y".into()).unwrap(), PathVersion::ChangedAt(r.start));
        assert_eq!(j.version_of(&"a/x".into()).unwrap(), PathVersion::ChangedAt(r.start));
        assert_eq!(j.version_of(&"c".into()).unwrap(), PathVersion::OlderThan(1));
    }

    #[test]
    fn a_setattr_of_a_directory_does_not_change_its_descendants() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.append(vec![write("d/f", 0, 1)]).unwrap();
        j.append(vec![Op::Setattr {
            path: "d".into(),
            mode: Some(0o700),
            uid: None,
            gid: None,
            atime: None,
            mtime: None,
        }])
        .unwrap();
        assert_eq!(j.version_of(&"d/f".into()).unwrap(), PathVersion::ChangedAt(1));
        assert_eq!(j.version_of(&"d".into()).unwrap(), PathVersion::ChangedAt(2));
    }

    #[test]
    fn compaction_drops_a_covered_write_and_keeps_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.append(vec![write("f", 0, 10), write("g", 0, 1), write("f", 0, 20)]).unwrap();
        let before = j.stored_bytes().unwrap();
        let report = j.compact(u64::MAX).unwrap();
        assert_eq!(report.superseded, 1);
        assert_eq!(report.expired, 0);
        assert!(j.stored_bytes().unwrap() < before);
        assert_eq!(seqs(j.read_from(1, 10).unwrap()), [2, 3]);
        assert_eq!(j.first_seq(), 1);
    }

    #[test]
    fn a_compaction_with_nothing_to_do_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.append(vec![write("f", 0, 10)]).unwrap();
        let report = j.compact(u64::MAX).unwrap();
        assert_eq!((report.superseded, report.expired, report.versions_pruned, report.first_seq), (0, 0, 0, 1));
    }

    #[test]
    fn a_client_ahead_of_the_journal_is_told_to_resync() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.append(vec![write("f", 0, 10)]).unwrap();
        assert_eq!(seqs(j.read_from(2, 10).unwrap()), Vec::<u64>::new());
        assert!(matches!(j.read_from(3, 10), Err(JournalError::AheadOfJournal { requested: 3, last_seq: 1 })));
    }
}
