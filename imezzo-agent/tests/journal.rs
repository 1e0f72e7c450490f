//! The server journal against docs/journal.md: round trips, reopen, batch atomicity under
//! kill -9 of a real writer process, a model of appends, compactions and reopens, retention,
//! corruption and the format-1 fixture.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imezzo_agent::journal::{Journal, JournalError, PathVersion, ReadFrom, FILE_NAME, FORMAT};
use imezzo_agent::op::{JournalEntry, Op, RelPath, Timestamp, WriteSource};
use redb::{ReadableTable, TableDefinition};

/// The tables as docs/journal.md names them, to tamper with the file behind the journal's back.
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// xorshift64*: reproducible randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn write(path: &str, offset: u64, len: u64) -> Op {
    Op::Write { path: path.into(), offset, len, source: None, mode: None, ino: None }
}

fn entries(r: ReadFrom) -> Vec<JournalEntry> {
    match r {
        ReadFrom::Entries(v) => v,
        ReadFrom::Expired { first_retained } => panic!("expected entries, got Expired at {first_retained}"),
    }
}

fn all_entries(j: &Journal) -> Vec<JournalEntry> {
    entries(j.read_from(j.first_seq(), usize::MAX).unwrap())
}

#[test]
fn appended_batches_read_back_in_order_with_their_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    assert_eq!((j.first_seq(), j.last_seq()), (1, 0));
    let a = vec![Op::Mkdir { path: "d".into(), mode: 0o755 }, Op::Create { path: "d/f".into(), mode: 0o644 }];
    let b = vec![
        write("d/f", 0, 4096),
        Op::Rename { path: "d/f".into(), new_path: "d/g".into(), exchange: false, noreplace: true },
    ];
    assert_eq!(j.append(a.clone()).unwrap(), 1..3);
    assert_eq!(j.append(b.clone()).unwrap(), 3..5);
    let got = all_entries(&j);
    let want: Vec<JournalEntry> =
        a.into_iter().chain(b).enumerate().map(|(i, op)| JournalEntry { seq: i as u64 + 1, op }).collect();
    assert_eq!(got, want);
    assert_eq!(entries(j.read_from(4, 10).unwrap()), want[3..]);
    assert_eq!(entries(j.read_from(2, 1).unwrap()), want[1..2]);
    assert!(entries(j.read_from(5, 10).unwrap()).is_empty(), "a caught-up client gets nothing");
}

#[test]
fn seqs_and_the_volume_id_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (volume, first_range) = {
        let j = Journal::open(dir.path()).unwrap();
        (j.volume_id(), j.append(vec![write("f", 0, 1), write("g", 0, 1)]).unwrap())
    };
    assert_eq!(first_range, 1..3);
    let j = Journal::open(dir.path()).unwrap();
    assert_eq!(j.volume_id(), volume);
    assert_eq!(j.last_seq(), 2);
    assert_eq!(j.append(vec![write("h", 0, 1)]).unwrap(), 3..4);
    assert_eq!(all_entries(&j).iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(j.version_of(&"g".into()).unwrap(), PathVersion::ChangedAt(2));
}

#[test]
fn two_journals_get_different_volume_ids() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert_ne!(Journal::open(a.path()).unwrap().volume_id(), Journal::open(b.path()).unwrap().volume_id());
}

#[test]
fn a_second_open_of_an_open_journal_is_refused_as_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _held = Journal::open(dir.path()).unwrap();
    let err = Journal::open(dir.path()).unwrap_err();
    assert!(matches!(err, JournalError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("another process"), "{err}");
}

#[test]
fn a_missing_state_dir_is_reported_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let err = Journal::open(dir.path().join("absent")).unwrap_err();
    assert!(matches!(err, JournalError::StateDir { .. }), "{err}");
    assert!(err.to_string().contains("imezzo init"), "{err}");
}

#[test]
fn readers_see_whole_batches_while_a_writer_appends() {
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(Journal::open(dir.path()).unwrap());
    let writer = {
        let j = Arc::clone(&j);
        std::thread::spawn(move || {
            for b in 0..150 {
                j.append((0..3).map(|i| write(&format!("f{b}"), i, 1)).collect()).unwrap();
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() || reads == 0 {
        let n = entries(j.read_from(1, usize::MAX).unwrap()).len();
        assert_eq!(n % 3, 0, "a read saw part of a batch ({n} entries)");
        reads += 1;
    }
    writer.join().unwrap();
    assert_eq!(j.last_seq(), 450);
}

// ---------------------------------------------------------------------------------------
// Crash: kill -9 of a process appending batches.

const CRASH_DIR_VAR: &str = "IMEZZO_JOURNAL_CRASH_DIR";

/// A batch's ops name `batch/<id>/<index>/<size>`, so that after a crash the checker can tell
/// which batch each entry belongs to and whether the batch is whole.
fn batch(id: u64) -> Vec<Op> {
    let size = 1 + id % 7;
    (0..size).map(|i| Op::Create { path: format!("batch/{id}/{i}/{size}").as_str().into(), mode: 0o644 }).collect()
}

fn parse_batch(path: &RelPath) -> (u64, u64, u64) {
    let s = path.display();
    let parts: Vec<u64> = s
        .strip_prefix("batch/")
        .unwrap_or_else(|| panic!("unexpected path {s}"))
        .split('/')
        .map(|p| p.parse().unwrap())
        .collect();
    (parts[0], parts[1], parts[2])
}

/// The writer process of `batches_are_all_or_nothing_across_kill_9`: that test re-runs this
/// test binary, filtered to itself, with `CRASH_DIR_VAR` set, and the child lands here.
/// Appends batches until killed.
fn journal_writer_child(dir: PathBuf) -> ! {
    let j = Journal::open(&dir).unwrap();
    let mut next = match entries(j.read_from(j.last_seq().max(1), 1).unwrap()).first() {
        Some(e) => parse_batch(e.op.path()).0 + 1,
        None => 0,
    };
    loop {
        j.append(batch(next)).unwrap();
        next += 1;
    }
}

/// J1 to J3 and batch atomicity, after a crash: seqs dense, every entry decodes, batches whole
/// and in order. Returns the number of batches.
fn check_after_crash(dir: &Path) -> u64 {
    let j = Journal::open(dir).unwrap();
    let all = all_entries(&j);
    assert_eq!(all.len() as u64, j.last_seq(), "seqs are dense from 1 (no compaction ran)");
    let mut expect_id = 0;
    let mut it = all.iter().peekable();
    while let Some(e) = it.next() {
        let (id, index, size) = parse_batch(e.op.path());
        assert_eq!((id, index), (expect_id, 0), "batch starts at seq {}", e.seq);
        for i in 1..size {
            let e = it.next().unwrap_or_else(|| panic!("batch {id} is cut after {i} of {size} entries"));
            assert_eq!(parse_batch(e.op.path()), (id, i, size), "entry {} in batch {id}", e.seq);
        }
        expect_id += 1;
    }
    expect_id
}

#[test]
fn batches_are_all_or_nothing_across_kill_9() {
    if let Some(dir) = std::env::var_os(CRASH_DIR_VAR) {
        journal_writer_child(PathBuf::from(dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut rng = Rng::new(seed);
    let mut batches = 0;
    for round in 0..6 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "batches_are_all_or_nothing_across_kill_9", "--nocapture", "--test-threads=1"])
            .env(CRASH_DIR_VAR, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Let it start and write; then kill it wherever it is (inside a commit, most likely).
        let deadline = Instant::now() + Duration::from_millis(150 + rng.below(250));
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("round {round}: the writer exited by itself with {status} (seed {seed})");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let now = check_after_crash(dir.path());
        assert!(now >= batches, "round {round}: batches went from {batches} to {now} (seed {seed})");
        eprintln!("round {round}: {} batches committed before the kill", now - batches);
        batches = now;
    }
    assert!(batches > 0, "the writer never committed a batch in six rounds");
}

// ---------------------------------------------------------------------------------------
// Crash: power cut, through a storage backend that loses what was not fsynced.

/// A disk whose writes become durable only at `sync_data`. After `ops_left` writes, resizes
/// and syncs, the power is cut: every further call fails.
#[derive(Debug)]
struct Disk {
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Writes since the last sync: after a power cut, any of them may be lost or torn.
    pending: Vec<(usize, Vec<u8>)>,
    ops_left: u64,
}

#[derive(Debug, Clone)]
struct PowerCutDisk(Arc<Mutex<Disk>>);

impl PowerCutDisk {
    fn new(image: Vec<u8>) -> Self {
        PowerCutDisk(Arc::new(Mutex::new(Disk {
            durable: image.clone(),
            current: image,
            pending: Vec::new(),
            ops_left: u64::MAX,
        })))
    }

    fn cut_after(&self, ops: u64) {
        self.0.lock().unwrap().ops_left = ops;
    }

    /// What the platters hold after the cut: the last synced image, then each unsynced write
    /// kept whole, torn at a 512-byte boundary, or lost; or, with `all_landed`, every write
    /// (the cut came as the fsync was about to report success).
    fn after_power_cut(&self, rng: &mut Rng, all_landed: bool) -> Vec<u8> {
        let d = self.0.lock().unwrap();
        let mut image = d.durable.clone();
        image.resize(d.current.len(), 0);
        for (offset, data) in &d.pending {
            let keep = match rng.below(4) {
                _ if all_landed => data.len(),
                0 | 1 => data.len(),
                2 => (rng.below(data.len() as u64 / 512 + 1) * 512).min(data.len() as u64) as usize,
                _ => 0,
            };
            // A write past a later shrink of the file is gone with it.
            let end = (offset + keep).min(image.len());
            if end > *offset {
                image[*offset..end].copy_from_slice(&data[..end - offset]);
            }
        }
        image
    }
}

fn power_is_cut() -> std::io::Error {
    std::io::Error::other("power cut")
}

impl Disk {
    fn step(&mut self) -> std::io::Result<()> {
        self.ops_left = self.ops_left.checked_sub(1).ok_or_else(power_is_cut)?;
        Ok(())
    }
}

impl redb::StorageBackend for PowerCutDisk {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.lock().unwrap().current.len() as u64)
    }

    fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let d = self.0.lock().unwrap();
        let start = offset as usize;
        d.current.get(start..start + len).map(<[u8]>::to_vec).ok_or_else(|| std::io::ErrorKind::UnexpectedEof.into())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d.step()?;
        d.current.resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d.step()?;
        if eventual {
            // Only a barrier: nothing is promised durable yet, so count nothing as durable.
            return Ok(());
        }
        d.durable = d.current.clone();
        d.pending.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d.step()?;
        let start = offset as usize;
        if d.current.len() < start + data.len() {
            d.current.resize(start + data.len(), 0);
        }
        d.current[start..start + data.len()].copy_from_slice(data);
        d.pending.push((start, data.to_vec()));
        Ok(())
    }
}

#[test]
fn every_acknowledged_batch_survives_a_power_cut() {
    let mut rng = Rng::new(7);
    let (mut failed_batch_kept, mut failed_batch_lost) = (0, 0);
    for trial in 0..40 {
        let disk = PowerCutDisk::new(Vec::new());
        let j = Journal::with_backend(disk.clone(), "power-cut disk").unwrap();
        disk.cut_after(rng.below(400));
        let mut acknowledged = 0;
        let failed = loop {
            let id = acknowledged;
            match j.append(batch(id)) {
                Ok(_) => acknowledged += 1,
                Err(_) => break id,
            }
        };
        // Even with the disk answering again, a journal that saw an I/O error refuses to go
        // on (a failed fsync may have lost pages): only a reopen, after recovery, continues.
        disk.cut_after(u64::MAX);
        let err = j.append(batch(failed)).unwrap_err();
        assert!(err.to_string().contains("Previous I/O error"), "trial {trial}: {err}");
        drop(j);
        let image = disk.after_power_cut(&mut rng, trial % 4 == 0);
        let j = Journal::with_backend(PowerCutDisk::new(image), "power-cut disk").unwrap();
        let all = all_entries(&j);
        let ids: BTreeSet<u64> = all.iter().map(|e| parse_batch(e.op.path()).0).collect();
        // Whole batches in order (J1 to J3), every acknowledged one, and at most the one that
        // was being committed when the power went.
        let mut expect_seq = 1;
        for id in &ids {
            for (i, op) in batch(*id).into_iter().enumerate() {
                let e =
                    all.get(expect_seq as usize - 1).unwrap_or_else(|| panic!("trial {trial}: batch {id} cut at {i}"));
                assert_eq!((e.seq, &e.op), (expect_seq, &op), "trial {trial}");
                expect_seq += 1;
            }
        }
        assert_eq!(all.len() as u64 + 1, expect_seq, "trial {trial}: entries outside whole batches");
        let want: BTreeSet<u64> = (0..acknowledged).collect();
        let extra: Vec<u64> = ids.difference(&want).copied().collect();
        assert!(
            want.is_subset(&ids),
            "trial {trial}: acknowledged batches lost: have {ids:?}, acknowledged 0..{acknowledged}"
        );
        assert!(extra.is_empty() || extra == [failed], "trial {trial}: unexpected batches {extra:?}");
        if extra.is_empty() {
            failed_batch_lost += 1;
        } else {
            failed_batch_kept += 1;
        }
        // The recovered journal goes on.
        assert_eq!(j.append(vec![write("after", 0, 1)]).unwrap().start, j.last_seq());
    }
    // Both outcomes of the interrupted commit must have happened, or the trials prove little.
    assert!(failed_batch_kept > 0 && failed_batch_lost > 0, "kept {failed_batch_kept}, lost {failed_batch_lost}");
}

// ---------------------------------------------------------------------------------------
// Model: random appends, compactions and reopens against a plain in-memory log.

/// Every entry ever appended, and the rules of docs/journal.md applied naively.
struct Model {
    log: Vec<JournalEntry>,
    /// Each entry's size as retention counts it, by seq - 1.
    sizes: Vec<u64>,
    retained: BTreeSet<u64>,
    first: u64,
}

fn size_of(e: &JournalEntry) -> u64 {
    8 + rkyv::to_bytes::<rkyv::rancor::Error>(e).unwrap().len() as u64
}

fn is_ancestor(a: &[u8], p: &[u8]) -> bool {
    if a.is_empty() {
        return !p.is_empty();
    }
    p.len() > a.len() && p.starts_with(a) && p[a.len()] == b'/'
}

fn related(a: &[u8], b: &[u8]) -> bool {
    a == b || is_ancestor(a, b) || is_ancestor(b, a)
}

fn namespace_names(op: &Op) -> Vec<&RelPath> {
    match op {
        Op::Create { path, .. }
        | Op::Mkdir { path, .. }
        | Op::Mknod { path, .. }
        | Op::Symlink { path, .. }
        | Op::Unlink { path }
        | Op::Rmdir { path }
        | Op::Rescan { path, .. } => vec![path],
        Op::Link { path, new_path } | Op::Rename { path, new_path, .. } => vec![path, new_path],
        _ => vec![],
    }
}

fn plain_range(op: &Op) -> Option<(u128, u128)> {
    match op {
        Op::Write { offset, len, source: None, mode: None, .. } => {
            Some((*offset as u128, *offset as u128 + *len as u128))
        }
        _ => None,
    }
}

fn attrs(op: &Op) -> Option<[bool; 5]> {
    match op {
        Op::Setattr { mode, uid, gid, atime, mtime, .. } => {
            Some([mode.is_some(), uid.is_some(), gid.is_some(), atime.is_some(), mtime.is_some()])
        }
        _ => None,
    }
}

fn xattr_name(op: &Op) -> Option<&RelPath> {
    match op {
        Op::Setxattr { name, .. } | Op::Removexattr { name, .. } => Some(name),
        _ => None,
    }
}

/// Rules S1 to S4, read straight from docs/journal.md: does `j` supersede `i`, given the
/// entries strictly between them?
fn supersedes(i: &Op, j: &Op, between: &[&JournalEntry]) -> bool {
    let p = i.path();
    if j.path() != p || namespace_names(i).len() + namespace_names(j).len() > 0 {
        return false;
    }
    let namespace_between =
        between.iter().any(|e| namespace_names(&e.op).iter().any(|q| related(q.as_bytes(), p.as_bytes())));
    if namespace_between {
        return false;
    }
    let on_p = |f: fn(&Op) -> bool| between.iter().any(|e| e.op.path() == p && f(&e.op));
    match (i, j) {
        (Op::Write { .. }, Op::Write { .. }) => match (plain_range(i), plain_range(j)) {
            (Some((a, b)), Some((c, d))) => c <= a && b <= d && !on_p(|o| matches!(o, Op::Truncate { .. })),
            _ => false,
        },
        (Op::Truncate { .. }, Op::Truncate { .. }) => !on_p(|o| matches!(o, Op::Write { .. })),
        (Op::Setattr { .. }, Op::Setattr { .. }) => {
            let (a, b) = (attrs(i).unwrap(), attrs(j).unwrap());
            (0..5).all(|k| !a[k] || b[k])
        }
        _ => matches!((xattr_name(i), xattr_name(j)), (Some(a), Some(b)) if a == b),
    }
}

impl Model {
    fn new() -> Self {
        Model { log: Vec::new(), sizes: Vec::new(), retained: BTreeSet::new(), first: 1 }
    }

    fn last(&self) -> u64 {
        self.log.len() as u64
    }

    fn append(&mut self, ops: Vec<Op>) {
        for op in ops {
            let seq = self.last() + 1;
            let entry = JournalEntry { seq, op };
            self.sizes.push(size_of(&entry));
            self.log.push(entry);
            self.retained.insert(seq);
        }
    }

    fn stored(&self) -> u64 {
        self.retained.iter().map(|s| self.sizes[*s as usize - 1]).sum()
    }

    /// Supersession is computed over every entry appended since `first`, dropped ones
    /// included: docs/journal.md promises that compacting in several runs drops exactly what
    /// one run over the full history would.
    fn compact(&mut self, retain_bytes: u64) {
        let history: Vec<&JournalEntry> = self.log[self.first as usize - 1..].iter().collect();
        for (x, i) in history.iter().enumerate() {
            let dropped = (x + 1..history.len()).any(|y| supersedes(&i.op, &history[y].op, &history[x + 1..y]));
            if dropped {
                self.retained.remove(&i.seq);
            }
        }
        let mut stored = self.stored();
        while stored > retain_bytes {
            let s = self.retained.pop_first().unwrap();
            stored -= self.sizes[s as usize - 1];
            self.first = s + 1;
        }
        if self.retained.is_empty() {
            self.first = self.last() + 1;
        }
    }

    /// J9 from its definition: the last entry that names `p`, or renames (creates, removes,
    /// rescans) one of its ancestors.
    fn version_of(&self, p: &[u8]) -> PathVersion {
        let hit = self.log.iter().rev().find(|e| {
            let names_p = e.op.path().as_bytes() == p || namespace_names(&e.op).iter().any(|q| q.as_bytes() == p);
            let renaming: Vec<&RelPath> = match &e.op {
                Op::Link { new_path, .. } => vec![new_path],
                op => namespace_names(op),
            };
            names_p || renaming.iter().any(|q| is_ancestor(q.as_bytes(), p))
        });
        match hit {
            Some(e) if e.seq >= self.first => PathVersion::ChangedAt(e.seq),
            _ => PathVersion::OlderThan(self.first),
        }
    }
}

const PATHS: &[&str] = &["a", "b", "a/x", "a/y", "b/x", "c", "c", "a/x"];
const QUERIES: &[&str] = &["", "a", "b", "a/x", "a/y", "b/x", "c", "a/x/deep", "b/new", "z"];

fn random_path(rng: &mut Rng) -> RelPath {
    // The root now and then: a rescan or rename naming it touches everything.
    if rng.below(16) == 0 {
        "".into()
    } else {
        (*rng.pick(PATHS)).into()
    }
}

/// Mostly content and attribute ops, which compaction may drop, with enough namespace ops
/// between them to exercise what blocks dropping.
fn random_op(rng: &mut Rng) -> Op {
    let path = random_path(rng);
    let other = random_path(rng);
    let some = |rng: &mut Rng, v: u32| (rng.below(2) == 0).then_some(v);
    match rng.below(24) {
        0..=8 => Op::Write {
            path,
            offset: *rng.pick(&[0, 4, 8]),
            len: *rng.pick(&[0, 4, 8, 16]),
            source: *rng.pick(&[None, None, None, Some(WriteSource::Fallocate), Some(WriteSource::Mmap)]),
            mode: None,
            ino: None,
        },
        9..=11 => Op::Truncate { path, size: rng.below(20) },
        12..=14 => Op::Setattr {
            path,
            mode: some(rng, 0o640),
            uid: some(rng, 1000),
            gid: some(rng, 100),
            atime: None,
            mtime: (rng.below(2) == 0).then_some(Timestamp { sec: 5, nsec: 6 }),
        },
        15 => Op::Setxattr { path, name: (*rng.pick(&["user.a", "user.b"])).into() },
        16 => Op::Removexattr { path, name: (*rng.pick(&["user.a", "user.b"])).into() },
        17 => Op::Create { path, mode: 0o644 },
        18 => Op::Mkdir { path, mode: 0o755 },
        19 => Op::Unlink { path },
        20 => Op::Link { path, new_path: other },
        21 => Op::Rename { path, new_path: other, exchange: rng.below(3) == 0, noreplace: false },
        22 => Op::Rmdir { path },
        _ => Op::Rescan { path, reason: "lost".into() },
    }
}

fn check_against_model(j: &Journal, m: &Model, context: &str) {
    assert_eq!((j.first_seq(), j.last_seq()), (m.first, m.last()), "{context}: first and last seq");
    assert_eq!(j.stored_bytes().unwrap(), m.stored(), "{context}: stored bytes");
    for s in m.first.saturating_sub(2)..=m.last() + 1 {
        let got = j.read_from(s, usize::MAX).unwrap();
        if s < m.first {
            assert_eq!(got, ReadFrom::Expired { first_retained: m.first }, "{context}: read_from({s})");
        } else {
            let want: Vec<JournalEntry> = m.retained.range(s..).map(|q| m.log[*q as usize - 1].clone()).collect();
            assert_eq!(entries(got), want, "{context}: read_from({s})");
        }
    }
    assert!(matches!(j.read_from(m.last() + 2, 1), Err(JournalError::AheadOfJournal { .. })), "{context}");
    for q in QUERIES {
        assert_eq!(j.version_of(&(*q).into()).unwrap(), m.version_of(q.as_bytes()), "{context}: version of {q:?}");
    }
}

/// redb's in-memory backend, shared so that a journal can be dropped and reopened on it.
#[derive(Debug, Clone, Default)]
struct SharedMemory(Arc<redb::backends::InMemoryBackend>);

impl redb::StorageBackend for SharedMemory {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.0.read(offset, len)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
        self.0.sync_data(eventual)
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }
}

#[test]
fn random_appends_compactions_and_reopens_match_the_model() {
    let (mut superseded, mut expired) = (0, 0);
    for seed in 1..=40 {
        // In memory, so that a thousand commits do not wait for a thousand fsyncs; the other
        // tests cover the file.
        let disk = SharedMemory::default();
        let mut rng = Rng::new(seed);
        let mut j = Journal::with_backend(disk.clone(), "model disk").unwrap();
        let mut m = Model::new();
        for step in 0..50 {
            let context = format!("seed {seed} step {step}");
            match rng.below(20) {
                0..=11 => {
                    let ops: Vec<Op> = (0..1 + rng.below(5)).map(|_| random_op(&mut rng)).collect();
                    let range = j.append(ops.clone()).unwrap();
                    assert_eq!(range, m.last() + 1..m.last() + 1 + ops.len() as u64, "{context}");
                    m.append(ops);
                }
                12..=16 => {
                    // Mostly supersession alone, sometimes retention down to a fraction.
                    let budget = match rng.below(3) {
                        0 => rng.below(m.stored() + 1),
                        _ => u64::MAX,
                    };
                    let report = j.compact(budget).unwrap();
                    superseded += report.superseded;
                    expired += report.expired;
                    m.compact(budget);
                    assert_eq!(report.first_seq, m.first, "{context}: compaction report");
                }
                _ => {
                    drop(j);
                    j = Journal::with_backend(disk.clone(), "model disk").unwrap();
                }
            }
            check_against_model(&j, &m, &context);
        }
    }
    // The runs must have exercised both kinds of dropping, or they prove little.
    assert!(superseded > 20 && expired > 20, "superseded {superseded}, expired {expired}");
}

// ---------------------------------------------------------------------------------------
// Retention.

#[test]
fn a_client_behind_retention_is_expired_and_one_past_it_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    for i in 0..100 {
        j.append(vec![write(&format!("f{i}"), 0, 1)]).unwrap();
    }
    let total = j.stored_bytes().unwrap();
    let report = j.compact(total / 4).unwrap();
    assert!(report.expired > 0 && report.superseded == 0, "{report:?}");
    assert!(j.stored_bytes().unwrap() <= total / 4);
    let first = j.first_seq();
    assert_eq!(first, report.first_seq);
    assert!(first > 1);
    assert_eq!(j.read_from(1, 10).unwrap(), ReadFrom::Expired { first_retained: first });
    assert_eq!(j.read_from(first - 1, 10).unwrap(), ReadFrom::Expired { first_retained: first });
    assert_eq!(entries(j.read_from(first, 1).unwrap())[0].seq, first);
    // Versions older than the retained journal are no longer exact.
    assert_eq!(j.version_of(&"f0".into()).unwrap(), PathVersion::OlderThan(first));
    assert_eq!(j.version_of(&"f99".into()).unwrap(), PathVersion::ChangedAt(100));
    assert!(report.versions_pruned > 0);
    // Expiry is durable.
    drop(j);
    let j = Journal::open(dir.path()).unwrap();
    assert_eq!(j.first_seq(), first);
    assert_eq!(j.read_from(first - 1, 10).unwrap(), ReadFrom::Expired { first_retained: first });
}

#[test]
fn retention_of_zero_empties_the_journal_but_seqs_continue() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    j.append(vec![write("f", 0, 1), write("g", 0, 1)]).unwrap();
    j.compact(0).unwrap();
    assert_eq!((j.first_seq(), j.last_seq(), j.stored_bytes().unwrap()), (3, 2, 0));
    assert!(entries(j.read_from(3, 10).unwrap()).is_empty(), "a caught-up client stays caught up");
    assert_eq!(j.append(vec![write("h", 0, 1)]).unwrap(), 3..4);
}

// ---------------------------------------------------------------------------------------
// Damage.

fn tamper(dir: &Path, f: impl FnOnce(&redb::WriteTransaction)) {
    let db = redb::Database::open(dir.join(FILE_NAME)).unwrap();
    let txn = db.begin_write().unwrap();
    f(&txn);
    txn.commit().unwrap();
}

#[test]
fn a_garbage_record_is_a_corruption_error_naming_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    Journal::open(dir.path()).unwrap().append(vec![write("f", 0, 1), write("g", 0, 1), write("h", 0, 1)]).unwrap();
    tamper(dir.path(), |txn| {
        txn.open_table(ENTRIES).unwrap().insert(2, [0xffu8; 40].as_slice()).unwrap();
    });
    let j = Journal::open(dir.path()).unwrap();
    let err = j.read_from(1, 10).unwrap_err();
    assert!(matches!(err, JournalError::Corrupt { seq: 2, .. }), "{err}");
    assert!(err.to_string().contains("entry 2"), "{err}");
    assert!(matches!(j.compact(u64::MAX), Err(JournalError::Corrupt { seq: 2, .. })));
    // Entries after it still read: the damage is confined to the record.
    assert_eq!(entries(j.read_from(3, 10).unwrap())[0].op, write("h", 0, 1));
}

#[test]
fn a_valid_record_stored_at_the_wrong_key_is_a_corruption_error() {
    let dir = tempfile::tempdir().unwrap();
    Journal::open(dir.path()).unwrap().append(vec![write("f", 0, 1), write("g", 0, 1)]).unwrap();
    tamper(dir.path(), |txn| {
        let mut t = txn.open_table(ENTRIES).unwrap();
        let one = t.get(1).unwrap().unwrap().value().to_vec();
        t.insert(2, one.as_slice()).unwrap();
    });
    let err = Journal::open(dir.path()).unwrap().read_from(2, 10).unwrap_err();
    assert!(matches!(err, JournalError::Corrupt { seq: 2, .. }), "{err}");
    assert!(err.to_string().contains("wrong key"), "{err}");
}

#[test]
fn a_journal_of_a_newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Journal::open(dir.path()).unwrap());
    tamper(dir.path(), |txn| {
        txn.open_table(META).unwrap().insert("format", (FORMAT + 1).to_le_bytes().as_slice()).unwrap();
    });
    let err = Journal::open(dir.path()).unwrap_err();
    assert!(matches!(err, JournalError::NewerFormat { found, supported: FORMAT, .. } if found == FORMAT + 1), "{err}");
}

// ---------------------------------------------------------------------------------------
// Format fixtures.

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/journal-v2.redb")
}

/// One of every op, with a non-UTF-8 name, then a compaction: the fixture holds gaps.
fn fixture_ops() -> Vec<Op> {
    vec![
        Op::Mkdir { path: "d".into(), mode: 0o755 },
        Op::Create { path: "d/f".into(), mode: 0o644 },
        write("d/f", 0, 10),
        write("d/f", 0, 100),
        Op::Write { path: "d/f".into(), offset: 4096, len: 8192, source: Some(WriteSource::Fallocate), mode: Some(3), ino: None },
        Op::Write { path: "d/f".into(), offset: 0, len: 12288, source: Some(WriteSource::Mmap), mode: None, ino: Some(42) },
        Op::Truncate { path: "d/f".into(), size: 7 },
        Op::Setattr {
            path: "d/f".into(),
            mode: Some(0o600),
            uid: Some(1000),
            gid: Some(1000),
            atime: Some(Timestamp { sec: 1_700_000_000, nsec: 1 }),
            mtime: Some(Timestamp { sec: -1, nsec: 999_999_999 }),
        },
        Op::Setxattr { path: "d/f".into(), name: "user.color".into() },
        Op::Removexattr { path: "d/f".into(), name: "user.color".into() },
        Op::Mknod { path: "d/fifo".into(), mode: 0o10644, rdev: 0 },
        Op::Symlink { path: "d/l".into(), target: "../x".into() },
        Op::Link { path: "d/f".into(), new_path: "d/g".into() },
        Op::Create { path: RelPath(b"d/\xff\xfe".to_vec()), mode: 0o644 },
        Op::Rename { path: "d".into(), new_path: "e".into(), exchange: false, noreplace: true },
        Op::Rename { path: "e/g".into(), new_path: "e/l".into(), exchange: true, noreplace: false },
        Op::Unlink { path: "e/fifo".into() },
        Op::Rmdir { path: "e/empty".into() },
        Op::Rescan { path: "e/sub".into(), reason: "ring buffer full".into() },
    ]
}

/// Set to regenerate the fixture, on purpose only, when the format number changes:
/// `IMEZZO_REGENERATE_JOURNAL_FIXTURE=1 cargo test -p imezzo-agent --test journal format_2_fixture`
/// (the test then checks the fresh fixture as usual).
const REGENERATE_FIXTURE_VAR: &str = "IMEZZO_REGENERATE_JOURNAL_FIXTURE";

fn write_fixture() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(dir.path()).unwrap();
        j.append(fixture_ops()).unwrap();
        assert_eq!(j.compact(u64::MAX).unwrap().superseded, 2);
    }
    std::fs::create_dir_all(fixture_path().parent().unwrap()).unwrap();
    std::fs::copy(dir.path().join(FILE_NAME), fixture_path()).unwrap();
}

#[test]
fn format_2_fixture_still_opens_and_reads() {
    if std::env::var_os(REGENERATE_FIXTURE_VAR).is_some() {
        write_fixture();
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture_path(), dir.path().join(FILE_NAME))
        .unwrap_or_else(|e| panic!("{}: {e}; regenerate it with {REGENERATE_FIXTURE_VAR}=1", fixture_path().display()));
    let j = Journal::open(dir.path()).unwrap();
    let want: Vec<JournalEntry> = fixture_ops()
        .into_iter()
        .enumerate()
        .map(|(i, op)| JournalEntry { seq: i as u64 + 1, op })
        // Superseded: the write at 3 by the write at 4, the setxattr at 9 by the removexattr at 10.
        .filter(|e| e.seq != 3 && e.seq != 9)
        .collect();
    assert_eq!(all_entries(&j), want);
    assert_eq!((j.first_seq(), j.last_seq()), (1, 19));
    let want_versions = [
        ("d", PathVersion::ChangedAt(15)),
        ("d/f", PathVersion::ChangedAt(15)),
        ("e", PathVersion::ChangedAt(15)),
        ("e/f", PathVersion::ChangedAt(15)),
        ("e/l", PathVersion::ChangedAt(16)),
        ("e/fifo", PathVersion::ChangedAt(17)),
        ("e/sub/q", PathVersion::ChangedAt(19)),
        ("x", PathVersion::OlderThan(1)),
    ];
    for (p, want) in want_versions {
        assert_eq!(j.version_of(&p.into()).unwrap(), want, "version of {p}");
    }
    assert_eq!(j.append(vec![write("e/f", 0, 1)]).unwrap(), 20..21);
    assert_eq!(j.version_of(&"e/f".into()).unwrap(), PathVersion::ChangedAt(20));
}

#[test]
fn a_format_1_journal_is_refused_with_a_message_to_move_it_aside() {
    // Format 1 had no inode in write entries; its archives do not fit format 2's layout.
    let v1 = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/journal-v1.redb");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&v1, dir.path().join(FILE_NAME)).unwrap_or_else(|e| panic!("{}: {e}", v1.display()));
    let err = Journal::open(dir.path()).unwrap_err();
    assert!(matches!(err, JournalError::OlderFormat { found: 1, supported: 2, .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("move the file aside"), "{text}");
}
