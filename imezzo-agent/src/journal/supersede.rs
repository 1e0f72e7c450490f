//! Compaction's supersession rules S1 to S4 (docs/journal.md, "Supersession") as a pure
//! single pass over entries in sequence order.
//!
//! For every path the planner keeps the *open candidates*: earlier entries that a later entry
//! on the same path could still supersede. A later entry of the same kind that covers a
//! candidate drops it; an entry that would make dropping unsafe closes (forgets) candidates.
//! Forgetting is always safe: it only means fewer drops.

use std::collections::BTreeMap;

use super::paths;
use crate::op::{Op, RelPath};

/// Above this many tracked paths the planner forgets every open candidate, so that one
/// compaction of a journal full of distinct names stays within a few tens of MB.
pub(crate) const MAX_TRACKED_PATHS: usize = 200_000;

#[derive(Default)]
struct Candidates {
    /// S1: plain writes, keyed by (offset, seq), valued by the range's end (offset + len,
    /// which may exceed u64 for a nonsensical range, hence u128).
    writes: BTreeMap<(u64, u64), u128>,
    /// S2: the last truncate with no write after it.
    truncate: Option<u64>,
    /// S3: setattrs as (seq, bit set of the attributes they carry), none a subset of a later one.
    setattrs: Vec<(u64, u8)>,
    /// S4: per xattr name, the last setxattr or removexattr.
    xattrs: BTreeMap<Vec<u8>, u64>,
}

pub(crate) struct Planner {
    paths: BTreeMap<Vec<u8>, Candidates>,
    dropped: Vec<u64>,
    limit: usize,
}

impl Planner {
    pub(crate) fn new() -> Self {
        Self::with_limit(MAX_TRACKED_PATHS)
    }

    pub(crate) fn with_limit(limit: usize) -> Self {
        Planner { paths: BTreeMap::new(), dropped: Vec::new(), limit }
    }

    /// Feed the next retained entry; entries must come in increasing `seq` order.
    pub(crate) fn push(&mut self, seq: u64, op: &Op) {
        if let Some((a, b)) = paths::namespace_names(op) {
            // The name may now refer to another object, or an ancestor or descendant did:
            // nothing before this entry on a related path may be superseded by anything after.
            self.forget_related(a);
            if let Some(b) = b {
                self.forget_related(b);
            }
            return;
        }
        if self.paths.len() >= self.limit && !self.paths.contains_key(op.path().as_bytes()) {
            self.paths.clear();
        }
        let c = self.paths.entry(op.path().as_bytes().to_vec()).or_default();
        match op {
            Op::Write { offset, len, source, mode, .. } => {
                // S2: a write between two truncates makes the first one's cut matter.
                c.truncate = None;
                if source.is_some() || mode.is_some() {
                    return;
                }
                let (start, end) = (*offset, *offset as u128 + *len as u128);
                // S1: every open plain write whose range lies inside [start, end).
                let inside: Vec<(u64, u64)> = c
                    .writes
                    .range((start, 0)..)
                    .take_while(|((o, _), _)| (*o as u128) <= end)
                    .filter(|(_, e)| **e <= end)
                    .map(|(k, _)| *k)
                    .collect();
                for k in inside {
                    c.writes.remove(&k);
                    self.dropped.push(k.1);
                }
                c.writes.insert((start, seq), end);
            }
            Op::Truncate { .. } => {
                // S1: a truncate between two writes is not redone by the later write.
                c.writes.clear();
                if let Some(earlier) = c.truncate.replace(seq) {
                    self.dropped.push(earlier);
                }
            }
            Op::Setattr { .. } => {
                let mask = setattr_mask(op);
                let dropped = &mut self.dropped;
                c.setattrs.retain(|&(s, m)| {
                    let covered = m & !mask == 0;
                    if covered {
                        dropped.push(s);
                    }
                    !covered
                });
                c.setattrs.push((seq, mask));
            }
            Op::Setxattr { name, .. } | Op::Removexattr { name, .. } => {
                if let Some(earlier) = c.xattrs.insert(name.as_bytes().to_vec(), seq) {
                    self.dropped.push(earlier);
                }
            }
            // Namespace ops returned above.
            _ => {}
        }
    }

    /// The sequence numbers to drop, ascending.
    pub(crate) fn finish(mut self) -> Vec<u64> {
        self.dropped.sort_unstable();
        self.dropped
    }

    fn forget_related(&mut self, name: &RelPath) {
        let name = name.as_bytes();
        if name.is_empty() {
            self.paths.clear();
            return;
        }
        self.paths.remove(name);
        for a in paths::ancestors(name) {
            self.paths.remove(a);
        }
        let mut prefix = name.to_vec();
        prefix.push(b'/');
        let below: Vec<Vec<u8>> = self
            .paths
            .range(prefix.clone()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        for k in below {
            self.paths.remove(&k);
        }
    }
}

/// The attributes a setattr carries, one bit each.
pub(crate) fn setattr_mask(op: &Op) -> u8 {
    match op {
        Op::Setattr { mode, uid, gid, atime, mtime, .. } => {
            (mode.is_some() as u8)
                | (uid.is_some() as u8) << 1
                | (gid.is_some() as u8) << 2
                | (atime.is_some() as u8) << 3
                | (mtime.is_some() as u8) << 4
        }
        _ => 0,
    }
}

/// Plan over a whole sequence at once.
#[cfg(test)]
fn plan<'a>(entries: impl IntoIterator<Item = (u64, &'a Op)>) -> Vec<u64> {
    let mut p = Planner::new();
    for (seq, op) in entries {
        p.push(seq, op);
    }
    p.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{Timestamp, WriteSource};

    fn write(path: &str, offset: u64, len: u64) -> Op {
        Op::Write { path: path.into(), offset, len, source: None, mode: None, ino: None }
    }
    fn chmod(path: &str, mode: u32) -> Op {
        Op::Setattr { path: path.into(), mode: Some(mode), uid: None, gid: None, atime: None, mtime: None }
    }
    fn plan_of(ops: &[Op]) -> Vec<u64> {
        plan(ops.iter().enumerate().map(|(i, op)| (i as u64 + 1, op)))
    }

    #[test]
    fn a_write_inside_a_later_write_of_the_same_file_is_dropped() {
        let ops = [write("f", 10, 5), write("g", 0, 100), write("f", 0, 100)];
        assert_eq!(plan_of(&ops), [1]);
    }

    #[test]
    fn a_write_only_partly_covered_is_kept() {
        assert!(plan_of(&[write("f", 50, 60), write("f", 0, 100)]).is_empty());
        assert!(plan_of(&[write("f", 0, 100), write("f", 0, 50)]).is_empty());
    }

    #[test]
    fn a_range_ending_where_the_later_one_ends_is_covered() {
        assert_eq!(plan_of(&[write("f", 100, 0), write("f", 90, 10), write("f", 0, 100)]), [1, 2]);
    }

    #[test]
    fn a_truncate_between_two_writes_keeps_the_first() {
        let ops = [write("f", 0, 10), Op::Truncate { path: "f".into(), size: 0 }, write("f", 0, 10)];
        assert!(plan_of(&ops).is_empty());
    }

    #[test]
    fn fallocate_and_mmap_writes_neither_supersede_nor_get_superseded() {
        let falloc =
            Op::Write { path: "f".into(), offset: 0, len: 100, source: Some(WriteSource::Fallocate), mode: Some(3), ino: None };
        let mmap = Op::Write { path: "f".into(), offset: 0, len: 100, source: Some(WriteSource::Mmap), mode: None, ino: None };
        assert!(plan_of(&[write("f", 0, 10), falloc.clone()]).is_empty());
        assert!(plan_of(&[falloc, write("f", 0, 100)]).is_empty());
        assert!(plan_of(&[mmap, write("f", 0, 100)]).is_empty());
    }

    #[test]
    fn a_rename_of_an_ancestor_between_two_writes_keeps_the_first() {
        let ops = [
            write("d/f", 0, 10),
            Op::Rename { path: "d".into(), new_path: "e".into(), exchange: false, noreplace: false },
            write("d/f", 0, 10),
        ];
        assert!(plan_of(&ops).is_empty());
    }

    #[test]
    fn a_hard_link_of_the_file_between_two_writes_keeps_the_first() {
        let ops = [write("f", 0, 10), Op::Link { path: "f".into(), new_path: "g".into() }, write("f", 0, 10)];
        assert!(plan_of(&ops).is_empty());
    }

    #[test]
    fn a_namespace_change_of_an_unrelated_path_does_not_block() {
        let ops = [
            write("d/f", 0, 10),
            Op::Unlink { path: "d/g".into() },
            Op::Mkdir { path: "df".into(), mode: 0o755 },
            write("d/f", 0, 10),
        ];
        assert_eq!(plan_of(&ops), [1]);
    }

    #[test]
    fn a_rescan_of_the_root_blocks_everything() {
        let ops = [write("d/f", 0, 10), Op::Rescan { path: "".into(), reason: "lost".into() }, write("d/f", 0, 10)];
        assert!(plan_of(&ops).is_empty());
    }

    #[test]
    fn a_second_truncate_drops_the_first_unless_a_write_came_between() {
        let t = |s| Op::Truncate { path: "f".into(), size: s };
        assert_eq!(plan_of(&[t(10), chmod("f", 0o600), t(20)]), [1]);
        assert!(plan_of(&[t(10), write("f", 20, 10), t(25)]).is_empty());
    }

    #[test]
    fn a_setattr_is_dropped_only_when_a_later_one_sets_every_attribute_it_set() {
        let both =
            Op::Setattr { path: "f".into(), mode: Some(0o600), uid: Some(1), gid: None, atime: None, mtime: None };
        let times = Op::Setattr {
            path: "f".into(),
            mode: None,
            uid: None,
            gid: None,
            atime: None,
            mtime: Some(Timestamp { sec: 1, nsec: 2 }),
        };
        assert_eq!(plan_of(&[chmod("f", 0o644), write("f", 0, 1), both.clone()]), [1]);
        assert!(plan_of(&[both.clone(), chmod("f", 0o644)]).is_empty());
        assert!(plan_of(&[chmod("f", 0o644), times]).is_empty());
    }

    #[test]
    fn xattr_changes_of_one_name_supersede_each_other() {
        let set = |n: &str| Op::Setxattr { path: "f".into(), name: n.into() };
        let rm = |n: &str| Op::Removexattr { path: "f".into(), name: n.into() };
        assert_eq!(plan_of(&[set("user.a"), set("user.b"), rm("user.a")]), [1]);
    }

    #[test]
    fn forgetting_candidates_past_the_path_limit_only_drops_less() {
        let mut p = Planner::with_limit(2);
        for (seq, op) in [write("a", 0, 1), write("b", 0, 1), write("c", 0, 1), write("a", 0, 1), write("c", 0, 1)]
            .iter()
            .enumerate()
        {
            p.push(seq as u64 + 1, op);
        }
        assert_eq!(p.finish(), [3]);
    }
}
