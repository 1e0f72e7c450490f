//! Names that move with the namespace: paths held in a map, carried along by the renames,
//! links and removals of the journal entries that follow.
//!
//! Two readers of the stream need this. The client's pending set ([`crate::client`]) keeps
//! the paths replay could not finish and follows them until they are fetched again. And
//! whoever reads the master's bytes for a batch of entries (the server attaching them, the
//! client fetching them ahead) must know where a file written under one name lives once the
//! batch is over: a database writes `pg_stat/pgstat.tmp` and renames it over `pgstat.stat`
//! in the same instant, and by the time anyone reads, only the new name holds the bytes
//! ([`later_names`]).

use std::collections::{BTreeMap, HashMap};

use crate::op::{Op, RelPath};

/// The upper end (exclusive) of the paths strictly beneath `prefix` in byte order:
/// `prefix/` up to, not including, `prefix0` (`'0'` follows `'/'`).
fn beneath(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut lo = prefix.to_vec();
    lo.push(b'/');
    let mut hi = prefix.to_vec();
    hi.push(b'/' + 1);
    (lo, hi)
}

/// Takes `prefix` and every path beneath it out of `names`, as (suffix after `prefix`,
/// value); `""` is the suffix of `prefix` itself.
pub(crate) fn take_subtree<V>(names: &mut BTreeMap<Vec<u8>, V>, prefix: &[u8]) -> Vec<(Vec<u8>, V)> {
    let mut out = Vec::new();
    if let Some(v) = names.remove(prefix) {
        out.push((Vec::new(), v));
    }
    let (lo, hi) = beneath(prefix);
    let keys: Vec<Vec<u8>> = names.range(lo..hi).map(|(k, _)| k.clone()).collect();
    for k in keys {
        if let Some(v) = names.remove(&k) {
            out.push((k[prefix.len()..].to_vec(), v));
        }
    }
    out
}

/// Puts what [`take_subtree`] took back under `prefix`. A value already at one of the
/// names is kept and `merge`d with the one put there.
pub(crate) fn put_subtree<V>(
    names: &mut BTreeMap<Vec<u8>, V>,
    prefix: &[u8],
    items: Vec<(Vec<u8>, V)>,
    mut merge: impl FnMut(&mut V, V),
) {
    for (suffix, v) in items {
        let mut p = prefix.to_vec();
        p.extend_from_slice(&suffix);
        match names.entry(p) {
            std::collections::btree_map::Entry::Occupied(mut o) => merge(o.get_mut(), v),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(v);
            }
        }
    }
}

/// Moves the names of `names` as `op` moves them: a rename carries a name and everything
/// beneath it to the new place (whatever was at the destination is dropped), an exchange
/// swaps the two subtrees, a link copies the name, an unlink or rmdir drops it. Other
/// operations change nothing. `dropped` is told every name taken out of its place, moved
/// ones included (the old name). Returns whether anything changed.
pub(crate) fn follow<V: Clone>(
    names: &mut BTreeMap<Vec<u8>, V>,
    op: &Op,
    merge: impl FnMut(&mut V, V),
    mut dropped: impl FnMut(&[u8]),
) -> bool {
    if names.is_empty() {
        return false;
    }
    let mut tell = |prefix: &[u8], items: &[(Vec<u8>, V)]| {
        for (suffix, _) in items {
            let mut p = prefix.to_vec();
            p.extend_from_slice(suffix);
            dropped(&p);
        }
        !items.is_empty()
    };
    match op {
        Op::Rename { path, new_path, exchange: false, .. } => {
            if path == new_path {
                return false;
            }
            let replaced = take_subtree(names, new_path.as_bytes());
            let moved = take_subtree(names, path.as_bytes());
            let changed = tell(new_path.as_bytes(), &replaced) | tell(path.as_bytes(), &moved);
            put_subtree(names, new_path.as_bytes(), moved, merge);
            changed
        }
        Op::Rename { path, new_path, exchange: true, .. } => {
            let a = take_subtree(names, path.as_bytes());
            let b = take_subtree(names, new_path.as_bytes());
            let changed = tell(path.as_bytes(), &a) | tell(new_path.as_bytes(), &b);
            let mut merge = merge;
            put_subtree(names, new_path.as_bytes(), a, &mut merge);
            put_subtree(names, path.as_bytes(), b, &mut merge);
            changed
        }
        Op::Link { path, new_path } => match names.get(path.as_bytes()).cloned() {
            Some(v) => {
                put_subtree(names, new_path.as_bytes(), vec![(Vec::new(), v)], merge);
                true
            }
            None => false,
        },
        Op::Unlink { path } => match names.remove(path.as_bytes()) {
            Some(_) => {
                dropped(path.as_bytes());
                true
            }
            None => false,
        },
        Op::Rmdir { path } => {
            let gone = take_subtree(names, path.as_bytes());
            tell(path.as_bytes(), &gone)
        }
        _ => false,
    }
}

/// Operations whose object stays at their path once applied, and which replay completes
/// from the master's current state of that object (its attributes, and for a write its
/// bytes): the ones [`later_names`] follows.
pub(crate) fn completes_from_master(op: &Op) -> bool {
    matches!(
        op,
        Op::Create { .. }
            | Op::Mkdir { .. }
            | Op::Mknod { .. }
            | Op::Symlink { .. }
            | Op::Write { .. }
            | Op::Truncate { .. }
            | Op::Setattr { .. }
            | Op::Setxattr { .. }
            | Op::Removexattr { .. }
    )
}

/// For the operations of `ops` that `track` picks (by index in `ops`), the name their
/// object has once every later operation of `ops` is applied, where that is another name
/// than the operation's own path: the renames of the file or of a directory above it,
/// followed in order. An object whose name a later operation removes or gives to another
/// object (an unlink, an rmdir, a rename over it, a new object created there) is left out:
/// its name at the end is unknown.
///
/// The master's current state of such an object is read under that name: the same object
/// as the operation's, for a write when its inode says so (a change after the batch gets
/// entries of its own, replayed later, as for any other path).
pub(crate) fn later_names<'a>(
    ops: impl IntoIterator<Item = &'a Op>,
    track: impl Fn(&Op) -> bool,
) -> HashMap<usize, RelPath> {
    let ops: Vec<&Op> = ops.into_iter().collect();
    let mut out = HashMap::new();
    // Only a rename, or a link and the removal of the old name, gives an object another
    // name: most batches have neither, and are not followed at all (every journal read of
    // the server and every window of the client goes through here).
    if !ops.iter().any(|op| matches!(op, Op::Rename { .. } | Op::Link { .. })) {
        return out;
    }
    // Names to the indexes of the operations whose object is there now.
    let mut names: BTreeMap<Vec<u8>, Vec<usize>> = BTreeMap::new();
    for (i, op) in ops.iter().enumerate() {
        // A new object at a name: whatever was followed there is not it.
        if matches!(op, Op::Create { .. } | Op::Mkdir { .. } | Op::Mknod { .. } | Op::Symlink { .. }) {
            names.remove(op.path().as_bytes());
        }
        follow(&mut names, op, |held, more| held.extend(more), |_| {});
        if track(op) {
            names.entry(op.path().0.clone()).or_default().push(i);
        }
    }
    for (name, indexes) in names {
        for i in indexes {
            if ops[i].path().as_bytes() != name.as_slice() && !out.contains_key(&i) {
                out.insert(i, RelPath(name.clone()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath(s.as_bytes().to_vec())
    }
    fn write(path: &str) -> Op {
        Op::Write { path: p(path), offset: 0, len: 1, source: None, mode: None, ino: Some(1) }
    }
    fn rename(from: &str, to: &str, exchange: bool) -> Op {
        Op::Rename { path: p(from), new_path: p(to), exchange, noreplace: false }
    }
    fn later(ops: &[Op]) -> Vec<(usize, String)> {
        let mut v: Vec<(usize, String)> = later_names(ops, completes_from_master)
            .into_iter()
            .map(|(i, n)| (i, n.display().into_owned()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_file_written_then_renamed_over_another_is_read_under_its_new_name() {
        let ops = [
            Op::Create { path: p("pg_stat/pgstat.tmp"), mode: 0o600 },
            write("pg_stat/pgstat.tmp"),
            rename("pg_stat/pgstat.tmp", "pg_stat/pgstat.stat", false),
        ];
        assert_eq!(later(&ops), [(0, "pg_stat/pgstat.stat".into()), (1, "pg_stat/pgstat.stat".into())]);
    }

    #[test]
    fn renames_of_the_directories_above_and_of_the_file_again_are_followed_in_order() {
        let ops = [
            write("a/b/f"),
            rename("a/b", "a/c", false),
            rename("a/c/f", "g", false),
            write("a/c/h"),
            rename("a", "z", false),
        ];
        assert_eq!(later(&ops), [(0, "g".into()), (3, "z/c/h".into())]);
    }

    #[test]
    fn an_exchange_swaps_what_is_followed_under_both_names() {
        let ops = [write("x"), write("y"), rename("x", "y", true)];
        assert_eq!(later(&ops), [(0, "y".into()), (1, "x".into())]);
    }

    #[test]
    fn an_object_whose_name_is_removed_or_taken_is_not_followed() {
        let ops = [
            write("a"),
            rename("a", "b", false),
            Op::Unlink { path: p("b") },
            write("c"),
            rename("c", "d", false),
            rename("e", "d", false),
            write("f"),
            Op::Create { path: p("f"), mode: 0o600 },
            rename("f", "g", false),
            write("k/h"),
            rename("k/h", "k/i", false),
            Op::Rmdir { path: p("k") },
        ];
        assert_eq!(later(&ops), [(7, "g".into())]);
    }

    #[test]
    fn a_linked_file_is_followed_under_a_name_it_keeps() {
        let ops = [write("a"), Op::Link { path: p("a"), new_path: p("b") }, Op::Unlink { path: p("a") }];
        assert_eq!(later(&ops), [(0, "b".into())]);
        assert!(later(&[write("a"), rename("b", "c", false)]).is_empty());
    }

    #[test]
    fn follow_tells_every_name_it_took_from_its_place() {
        let mut names: BTreeMap<Vec<u8>, bool> =
            [("d/x", false), ("d/y/z", true), ("e", false), ("dd", false)].into_iter().map(|(k, v)| (k.as_bytes().to_vec(), v)).collect();
        let mut told = Vec::new();
        assert!(follow(&mut names, &rename("d", "e", false), |a, b| *a |= b, |n| told.push(String::from_utf8(n.to_vec()).unwrap())));
        told.sort();
        assert_eq!(told, ["d/x", "d/y/z", "e"]);
        let keys: Vec<String> = names.keys().map(|k| String::from_utf8(k.clone()).unwrap()).collect();
        assert_eq!(keys, ["dd", "e/x", "e/y/z"]);
        assert!(!follow(&mut names, &rename("q", "r", false), |a, b| *a |= b, |_| {}));
    }
}
