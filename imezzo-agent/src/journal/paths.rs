//! How journal operations relate to paths: which names an op changes (for `versions`), and
//! the ancestor relation between `/`-separated relative paths (root = empty).

use crate::op::{Op, RelPath};

/// A path an op changes, and whether it changes *what the name refers to* (a namespace
/// change: create, remove, rename, hard link, rescan) rather than only the object's
/// content or attributes. docs/journal.md, "Versions".
pub(crate) struct Change<'a> {
    pub path: &'a RelPath,
    pub renames: bool,
}

/// The paths `op` changes, one or two.
pub(crate) fn changes(op: &Op) -> impl Iterator<Item = Change<'_>> {
    let (first, second) = match op {
        Op::Create { path, .. }
        | Op::Mkdir { path, .. }
        | Op::Mknod { path, .. }
        | Op::Symlink { path, .. }
        | Op::Unlink { path }
        | Op::Rmdir { path }
        | Op::Rescan { path, .. }
        | Op::Relist { path, .. } => (Change { path, renames: true }, None),
        // The existing name still refers to the same object (whose link count changed);
        // the new name now refers to it.
        Op::Link { path, new_path } => {
            (Change { path, renames: false }, Some(Change { path: new_path, renames: true }))
        }
        Op::Rename { path, new_path, .. } => {
            (Change { path, renames: true }, Some(Change { path: new_path, renames: true }))
        }
        Op::Write { path, .. }
        | Op::Truncate { path, .. }
        | Op::Setattr { path, .. }
        | Op::Setxattr { path, .. }
        | Op::Removexattr { path, .. } => (Change { path, renames: false }, None),
    };
    std::iter::once(first).chain(second)
}

/// The names a namespace op touches (both for link and rename), or none for content and
/// attribute ops. Compaction's supersession rules stop at any of these (S1 to S4).
pub(crate) fn namespace_names(op: &Op) -> Option<(&RelPath, Option<&RelPath>)> {
    match op {
        Op::Create { path, .. }
        | Op::Mkdir { path, .. }
        | Op::Mknod { path, .. }
        | Op::Symlink { path, .. }
        | Op::Unlink { path }
        | Op::Rmdir { path }
        | Op::Rescan { path, .. }
        | Op::Relist { path, .. } => Some((path, None)),
        Op::Link { path, new_path } | Op::Rename { path, new_path, .. } => Some((path, Some(new_path))),
        Op::Write { .. } | Op::Truncate { .. } | Op::Setattr { .. } | Op::Setxattr { .. } | Op::Removexattr { .. } => {
            None
        }
    }
}

pub(crate) use crate::op::ancestors;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hard_link_renames_only_its_new_name() {
        let op = Op::Link { path: "a".into(), new_path: "b".into() };
        let got: Vec<_> = changes(&op).map(|c| (c.path.display().into_owned(), c.renames)).collect();
        assert_eq!(got, [("a".to_string(), false), ("b".to_string(), true)]);
    }
}
