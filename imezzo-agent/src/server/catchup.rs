//! The restart catch-up: what changed in the export while no server was capturing it.
//!
//! Capture journals every change from the moment its probes are attached; what happened
//! before (the server was stopped, killed, or the machine was down) is found by the start-up
//! walk of the inode table, by change time. An inode's ctime is set by the kernel to the
//! current time on every change of its data, attributes, xattrs or names, and no system call
//! sets it back, so "changed since T" is "ctime >= T".
//!
//! T comes from the `captured-through` file in the state dir: after every journal commit,
//! and every tenth of a second while nothing changes, the capture thread records the time its
//! last drain started; every change whose system call had returned by then is journalled.
//! A change still inside its system call at that moment may carry an older ctime than its
//! event, so T is moved back by a margin: [`DIR_MARGIN`] for directories (whose changes are
//! short system calls: create, unlink, rename, chmod), [`FILE_MARGIN`] for the rest (a large
//! write sets the times when it starts and returns when it ends).
//!
//! What is found becomes journal entries before the server accepts clients:
//! - files, symlinks and devices changed in place: the operations that recreate each from
//!   the master's current state ([`Attrs::recreate_ops`]), so a resuming client fetches
//!   those files and nothing else;
//! - each changed directory (names were added, removed or renamed, and the old names are
//!   known nowhere but on the clients): a `relist` of it, which makes clients compare that
//!   directory's subtree with the master's listing, removing what the master no longer
//!   has and fetching what differs. A changed directory beneath another is compared with
//!   it, so it gets no relist of its own. Relists come first, parents before children, so
//!   the objects recreated after them have their directories.
//!
//! The file is written without fsync: a kill -9 leaves it in the page cache, and a power
//! cut that loses it leaves an older time, which only widens the catch-up. Its record names
//! the journal's volume, so a mark never applies to another journal. Without a valid mark
//! on a journal that existed before this start, nothing is known: the root is rescanned.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::export::Export;
use crate::capture::inode_table::{ChangedSince, Kind};
use crate::op::{ancestors, Op, RelPath};

/// The mark's file name inside the state dir.
pub const FILE_NAME: &str = "captured-through";
/// How far before the mark a directory's change time still counts as not journalled.
pub const DIR_MARGIN: Duration = Duration::from_millis(250);
/// How far before the mark any other object's change time still counts as not journalled.
pub const FILE_MARGIN: Duration = Duration::from_secs(10);
/// More changed objects than this are caught up by a rescan rather than one by one.
const MAX_ONE_BY_ONE: usize = 100_000;

const MAGIC: &[u8; 8] = b"imzmark1";
const RECORD: usize = 8 + 16 + 8 + 8;

/// The `captured-through` mark of one journal (one volume).
pub struct CapturedThrough {
    path: PathBuf,
    file: File,
    volume: u128,
}

impl CapturedThrough {
    /// Opens (creating it if absent) the mark in `state_dir` for the journal `volume`.
    pub fn open(state_dir: &Path, volume: u128) -> io::Result<CapturedThrough> {
        let path = state_dir.join(FILE_NAME);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        Ok(CapturedThrough { path, file, volume })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded time, if the file holds a whole record for this volume.
    pub fn read(&self) -> Option<SystemTime> {
        let mut buf = Vec::with_capacity(RECORD);
        (&self.file).read_to_end(&mut buf).ok()?;
        decode(&buf, self.volume)
    }

    /// Records `t`; no fsync (see the module's text).
    pub fn write(&self, t: SystemTime) -> io::Result<()> {
        self.file.write_all_at(&encode(t, self.volume), 0)
    }
}

fn encode(t: SystemTime, volume: u128) -> [u8; RECORD] {
    let ns = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let mut rec = [0u8; RECORD];
    rec[..8].copy_from_slice(MAGIC);
    rec[8..24].copy_from_slice(&volume.to_be_bytes());
    rec[24..32].copy_from_slice(&ns.to_le_bytes());
    let sum = crate::checksum::fnv1a(&rec[..32]);
    rec[32..].copy_from_slice(&sum.to_le_bytes());
    rec
}

fn decode(rec: &[u8], volume: u128) -> Option<SystemTime> {
    if rec.len() != RECORD || &rec[..8] != MAGIC {
        return None;
    }
    let sum = u64::from_le_bytes(rec[32..40].try_into().ok()?);
    if sum != crate::checksum::fnv1a(&rec[..32]) || u128::from_be_bytes(rec[8..24].try_into().ok()?) != volume {
        return None;
    }
    let ns = u64::from_le_bytes(rec[24..32].try_into().ok()?);
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(ns))
}

/// What the start-up walk is asked to look for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// A journal created by this start: no client can hold anything of it.
    Nothing,
    /// Changes since the mark, with the margins.
    Since(SystemTime),
    /// Nothing is known of what happened while down: rescan the root.
    Rescan(&'static str),
}

impl Plan {
    /// Decides from the mark and whether the journal existed before this start. A mark in
    /// the future (the clock was set back while the server was down) cannot be trusted.
    pub fn new(mark: Option<SystemTime>, journal_existed: bool, now: SystemTime) -> Plan {
        match mark {
            _ if !journal_existed => Plan::Nothing,
            None => Plan::Rescan("no record of how far the previous run had journalled"),
            Some(t) if t > now + Duration::from_secs(1) => {
                Plan::Rescan("the clock is behind the previous run's record (was it set back?)")
            }
            Some(t) => Plan::Since(t),
        }
    }

    pub fn changed_since(&self) -> Option<ChangedSince> {
        match *self {
            Plan::Since(t) => Some(ChangedSince {
                dirs: t.checked_sub(DIR_MARGIN).unwrap_or(SystemTime::UNIX_EPOCH),
                others: t.checked_sub(FILE_MARGIN).unwrap_or(SystemTime::UNIX_EPOCH),
            }),
            _ => None,
        }
    }
}

/// The journal entries that bring a resuming client up to what the walk found, and a line
/// for the log.
pub fn ops(plan: Plan, changed: &[(RelPath, Kind)], export: &Export) -> (Vec<Op>, Option<String>) {
    let rescan = |reason: String| (vec![Op::Rescan { path: RelPath::default(), reason: reason.clone() }], Some(reason));
    match plan {
        Plan::Nothing => return (Vec::new(), None),
        Plan::Rescan(why) => return rescan(format!("changes while the server was down are unknown: {why}")),
        Plan::Since(_) => {}
    }
    if changed.len() > MAX_ONE_BY_ONE {
        return rescan(format!("{} objects changed while the server was down", changed.len()));
    }
    let mut dirs: Vec<&RelPath> = changed.iter().filter(|(_, k)| *k == Kind::Dir).map(|(p, _)| p).collect();
    // Parents first: a path sorts after every proper prefix of it ('/' sorts low).
    dirs.sort_by(|a, b| a.as_bytes().split(|&c| c == b'/').cmp(b.as_bytes().split(|&c| c == b'/')));
    let reason = "changed while the server was down";
    // Sorted parents first, so an ancestor, if relisted, is among those kept before it.
    let mut relisted: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
    let mut ops: Vec<Op> = Vec::new();
    for d in &dirs {
        if !ancestors(d.as_bytes()).any(|a| relisted.contains(a)) {
            relisted.insert(d.as_bytes());
            ops.push(Op::Relist { path: (*d).clone(), reason: reason.into() });
        }
    }
    for (path, kind) in changed {
        if *kind == Kind::Dir {
            continue;
        }
        match export.attrs(path) {
            Ok(Some(a)) => match a.recreate_ops(path) {
                Some(more) => ops.extend(more),
                None => return rescan(format!("cannot read the symlink {:?}", path.display())),
            },
            // Gone since the walk: the event of its removal is journalled after these.
            Ok(None) => {}
            Err(e) => return rescan(format!("cannot read {:?} ({e})", path.display())),
        }
    }
    let line = (!changed.is_empty()).then(|| {
        format!(
            "{} directories and {} other objects changed while the server was down",
            dirs.len(),
            changed.len() - dirs.len()
        )
    });
    (ops, line)
}

/// Whether `<state_dir>/<journal file>` exists, asked before the journal is opened.
pub fn journal_exists(state_dir: &Path) -> bool {
    fs::symlink_metadata(state_dir.join(crate::journal::FILE_NAME)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_reads_back_for_its_volume_only() {
        let dir = tempfile::tempdir().unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_800_000_000, 123_456_789);
        let mark = CapturedThrough::open(dir.path(), 7).unwrap();
        assert_eq!(mark.read(), None, "a new file holds no mark");
        mark.write(t).unwrap();
        assert_eq!(CapturedThrough::open(dir.path(), 7).unwrap().read(), Some(t));
        assert_eq!(CapturedThrough::open(dir.path(), 8).unwrap().read(), None, "another volume's mark");
    }

    #[test]
    fn a_torn_or_damaged_record_is_no_mark() {
        let rec = encode(SystemTime::UNIX_EPOCH + Duration::from_secs(5), 1);
        assert!(decode(&rec, 1).is_some());
        assert_eq!(decode(&rec[..20], 1), None);
        for i in 0..RECORD {
            let mut bad = rec;
            bad[i] ^= 0x40;
            assert_eq!(decode(&bad, 1), None, "byte {i} flipped");
        }
    }

    #[test]
    fn the_plan_trusts_a_mark_only_for_an_existing_journal_and_a_sane_clock() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let before = now - Duration::from_secs(60);
        assert_eq!(Plan::new(Some(before), false, now), Plan::Nothing);
        assert_eq!(Plan::new(None, false, now), Plan::Nothing);
        assert_eq!(Plan::new(Some(before), true, now), Plan::Since(before));
        assert!(matches!(Plan::new(None, true, now), Plan::Rescan(_)));
        assert!(matches!(Plan::new(Some(now + Duration::from_secs(30)), true, now), Plan::Rescan(_)));
        let since = Plan::Since(before).changed_since().unwrap();
        assert_eq!(since.dirs, before - DIR_MARGIN);
        assert_eq!(since.others, before - FILE_MARGIN);
    }
}
