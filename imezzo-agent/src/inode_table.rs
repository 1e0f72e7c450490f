//! The agent's picture of the exported tree: inode -> names, name -> inode.
//!
//! Built by one walk of the root at start and kept current by namespace events. Each inode
//! records its links as (parent inode, name), never full paths, so renaming a directory is
//! one update however deep its subtree; a path is computed on demand by walking up to the
//! root. Hard links are several links of one inode. The walk stays on the root's device.

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::Path,
    time::SystemTime,
};

use crate::op::RelPath;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

impl Kind {
    pub fn of(ft: fs::FileType) -> Kind {
        if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_symlink() {
            Kind::Symlink
        } else {
            let _ = ft.is_fifo();
            Kind::Other
        }
    }
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    links: Vec<(u64, Box<[u8]>)>,
    children: HashMap<Box<[u8]>, u64>,
}

#[derive(Debug)]
pub struct InodeTable {
    root: u64,
    nodes: HashMap<u64, Node>,
}

/// Splits a relative path into normal components, resolving `.` and `..` lexically.
/// `None` when `..` climbs above the root.
pub fn components(path: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out)
}

pub fn join(parts: &[&[u8]]) -> RelPath {
    RelPath(parts.join(&b'/'))
}

/// Inode change times (ctime) at or after which the build walk notes an object as changed:
/// one bound for directories, one for everything else (see the server's restart catch-up).
#[derive(Clone, Copy, Debug)]
pub struct ChangedSince {
    pub dirs: SystemTime,
    pub others: SystemTime,
}

impl ChangedSince {
    fn covers(&self, kind: Kind, meta: &fs::Metadata) -> bool {
        let bound = if kind == Kind::Dir { self.dirs } else { self.others };
        let ctime = (meta.ctime(), meta.ctime_nsec());
        let since = match bound.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => (i64::try_from(d.as_secs()).unwrap_or(i64::MAX), i64::from(d.subsec_nanos())),
            // A bound before 1970: everything is newer.
            Err(_) => return true,
        };
        ctime >= since
    }
}

/// An object the build walk found changed since a [`ChangedSince`] bound: its parent
/// directory's inode and its name (the root itself is `(0, [])`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changed {
    pub parent: u64,
    pub name: Box<[u8]>,
    pub kind: Kind,
}

impl InodeTable {
    /// Walks `root` (which must be a directory) without leaving its device.
    pub fn build(root: &Path) -> io::Result<InodeTable> {
        Ok(Self::build_noting(root, None)?.0)
    }

    /// [`build`](Self::build), also listing every name whose inode changed since `since`
    /// (by its ctime, which no system call can set back), in walk order.
    pub fn build_noting(root: &Path, since: Option<ChangedSince>) -> io::Result<(InodeTable, Vec<Changed>)> {
        let meta = fs::symlink_metadata(root)?;
        let mut table = InodeTable { root: meta.ino(), nodes: HashMap::new() };
        table.nodes.insert(meta.ino(), Node { kind: Kind::Dir, links: Vec::new(), children: HashMap::new() });
        let mut changed = Vec::new();
        if since.is_some_and(|s| s.covers(Kind::Dir, &meta)) {
            changed.push(Changed { parent: 0, name: Box::default(), kind: Kind::Dir });
        }
        table.walk_noting(root, meta.ino(), meta.dev(), since.map(|s| (s, &mut changed)))?;
        Ok((table, changed))
    }

    /// Adds what lies below directory `dir` (inode `dir_ino`, already in the table).
    pub fn walk(&mut self, dir: &Path, dir_ino: u64, dev: u64) -> io::Result<usize> {
        self.walk_noting(dir, dir_ino, dev, None)
    }

    fn walk_noting(
        &mut self,
        dir: &Path,
        dir_ino: u64,
        dev: u64,
        mut noting: Option<(ChangedSince, &mut Vec<Changed>)>,
    ) -> io::Result<usize> {
        let mut stack = vec![(dir.to_path_buf(), dir_ino)];
        let mut added = 0;
        while let Some((path, ino)) = stack.pop() {
            let entries = match fs::read_dir(&path) {
                Ok(e) => e,
                // Gone or unreadable since: the events that removed it will follow.
                Err(_) => continue,
            };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                let name = entry.file_name();
                let kind = Kind::of(meta.file_type());
                self.link(ino, name.as_encoded_bytes(), meta.ino(), kind);
                if let Some((since, changed)) = noting.as_mut() {
                    if since.covers(kind, &meta) {
                        changed.push(Changed { parent: ino, name: name.as_encoded_bytes().into(), kind });
                    }
                }
                added += 1;
                if kind == Kind::Dir && meta.dev() == dev {
                    stack.push((entry.path(), meta.ino()));
                }
            }
        }
        Ok(added)
    }

    pub fn root(&self) -> u64 {
        self.root
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn contains(&self, ino: u64) -> bool {
        self.nodes.contains_key(&ino)
    }

    pub fn kind(&self, ino: u64) -> Option<Kind> {
        self.nodes.get(&ino).map(|n| n.kind)
    }

    /// One path of `ino` (its first link), relative to the root.
    pub fn path_of(&self, ino: u64) -> Option<RelPath> {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        // Bounded: a cycle would be a bug, not a reason to hang.
        for _ in 0..4096 {
            if cur == self.root {
                parts.reverse();
                return Some(join(&parts));
            }
            let node = self.nodes.get(&cur)?;
            let (parent, name) = node.links.first()?;
            parts.push(name);
            cur = *parent;
        }
        None
    }

    /// The inode at `path`, walking names from the root (symlinks are not followed).
    pub fn lookup(&self, path: &[&[u8]]) -> Option<u64> {
        let mut cur = self.root;
        for c in path {
            cur = *self.nodes.get(&cur)?.children.get(*c)?;
        }
        Some(cur)
    }

    /// The inode named `name` in directory `dir`.
    pub fn lookup_child(&self, dir: u64, name: &[u8]) -> Option<u64> {
        self.nodes.get(&dir)?.children.get(name).copied()
    }

    /// Adds the link `parent/name -> ino`, replacing whatever `name` named before.
    pub fn link(&mut self, parent: u64, name: &[u8], ino: u64, kind: Kind) {
        if let Some(old) = self.nodes.get(&parent).and_then(|p| p.children.get(name)).copied() {
            if old == ino {
                return;
            }
            self.unlink(parent, name);
        }
        let Some(p) = self.nodes.get_mut(&parent) else { return };
        p.children.insert(name.into(), ino);
        let node = self
            .nodes
            .entry(ino)
            .or_insert_with(|| Node { kind, links: Vec::new(), children: HashMap::new() });
        node.kind = kind;
        node.links.push((parent, name.into()));
    }

    /// Removes the link `parent/name`; an inode left with no link leaves the table, with
    /// its subtree. Returns the inode it named.
    pub fn unlink(&mut self, parent: u64, name: &[u8]) -> Option<u64> {
        let ino = self.nodes.get_mut(&parent)?.children.remove(name)?;
        let node = self.nodes.get_mut(&ino)?;
        node.links.retain(|(p, n)| !(*p == parent && &**n == name));
        if node.links.is_empty() {
            self.forget(ino);
        }
        Some(ino)
    }

    fn forget(&mut self, ino: u64) {
        let mut stack = vec![ino];
        while let Some(i) = stack.pop() {
            if let Some(node) = self.nodes.remove(&i) {
                for (_, child) in node.children {
                    if let Some(c) = self.nodes.get_mut(&child) {
                        c.links.retain(|(p, _)| *p != i);
                        if c.links.is_empty() {
                            stack.push(child);
                        }
                    }
                }
            }
        }
    }

    /// `rename(from, to)`: `to` is replaced if it existed.
    pub fn rename(&mut self, from: (u64, &[u8]), to: (u64, &[u8])) {
        let Some(ino) = self.nodes.get(&from.0).and_then(|p| p.children.get(from.1)).copied() else { return };
        // Detach without forgetting: the inode keeps living under its new name.
        if let Some(p) = self.nodes.get_mut(&from.0) {
            p.children.remove(from.1);
        }
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.links.retain(|(p, n)| !(*p == from.0 && &**n == from.1));
        }
        if let Some(old) = self.nodes.get(&to.0).and_then(|p| p.children.get(to.1)).copied() {
            if old != ino {
                self.unlink(to.0, to.1);
            }
        }
        if let Some(p) = self.nodes.get_mut(&to.0) {
            p.children.insert(to.1.into(), ino);
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.links.push((to.0, to.1.into()));
            }
        } else if self.nodes.get(&ino).is_some_and(|n| n.links.is_empty()) {
            self.forget(ino);
        }
    }

    /// `renameat2(RENAME_EXCHANGE)`: the two names swap inodes.
    pub fn exchange(&mut self, a: (u64, &[u8]), b: (u64, &[u8])) {
        let ia = self.nodes.get(&a.0).and_then(|p| p.children.get(a.1)).copied();
        let ib = self.nodes.get(&b.0).and_then(|p| p.children.get(b.1)).copied();
        let (Some(ia), Some(ib)) = (ia, ib) else { return };
        for (ino, (from_p, from_n), (to_p, to_n)) in [(ia, a, b), (ib, b, a)] {
            if let Some(n) = self.nodes.get_mut(&ino) {
                for link in n.links.iter_mut() {
                    if link.0 == from_p && &*link.1 == from_n {
                        *link = (to_p, to_n.into());
                        break;
                    }
                }
            }
        }
        if let Some(p) = self.nodes.get_mut(&a.0) {
            p.children.insert(a.1.into(), ib);
        }
        if let Some(p) = self.nodes.get_mut(&b.0) {
            p.children.insert(b.1.into(), ia);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> InodeTable {
        let mut t = InodeTable { root: 1, nodes: HashMap::new() };
        t.nodes.insert(1, Node { kind: Kind::Dir, links: vec![], children: HashMap::new() });
        t
    }

    #[test]
    fn renaming_a_directory_moves_every_descendant() {
        let mut t = table();
        t.link(1, b"a", 2, Kind::Dir);
        t.link(2, b"b", 3, Kind::Dir);
        t.link(3, b"c", 4, Kind::Dir);
        t.link(4, b"f", 5, Kind::File);
        t.rename((1, b"a"), (1, b"z"));
        assert_eq!(t.path_of(5).unwrap().display(), "z/b/c/f");
        assert_eq!(t.lookup(&[b"z", b"b", b"c", b"f"]), Some(5));
        assert_eq!(t.lookup(&[b"a"]), None);
    }

    #[test]
    fn a_hard_link_keeps_the_inode_after_one_name_goes() {
        let mut t = table();
        t.link(1, b"x", 9, Kind::File);
        t.link(1, b"y", 9, Kind::File);
        t.unlink(1, b"x");
        assert_eq!(t.path_of(9).unwrap().display(), "y");
        t.unlink(1, b"y");
        assert!(!t.contains(9));
    }

    #[test]
    fn rename_over_an_existing_name_forgets_the_replaced_inode() {
        let mut t = table();
        t.link(1, b"a", 2, Kind::File);
        t.link(1, b"b", 3, Kind::File);
        t.rename((1, b"a"), (1, b"b"));
        assert!(!t.contains(3));
        assert_eq!(t.path_of(2).unwrap().display(), "b");
    }

    #[test]
    fn exchange_swaps_names() {
        let mut t = table();
        t.link(1, b"f", 2, Kind::File);
        t.link(1, b"d", 3, Kind::Dir);
        t.link(3, b"inner", 4, Kind::File);
        t.exchange((1, b"f"), (1, b"d"));
        assert_eq!(t.path_of(2).unwrap().display(), "d");
        assert_eq!(t.path_of(4).unwrap().display(), "f/inner");
    }

    #[test]
    fn removing_a_directory_forgets_its_subtree() {
        let mut t = table();
        t.link(1, b"d", 2, Kind::Dir);
        t.link(2, b"f", 3, Kind::File);
        t.unlink(1, b"d");
        assert!(!t.contains(2) && !t.contains(3));
    }

    #[test]
    fn dot_dot_is_resolved_lexically_and_cannot_climb_out() {
        assert_eq!(components(b"a/./b/../c").unwrap(), vec![&b"a"[..], b"c"]);
        assert!(components(b"a/../../x").is_none());
    }
}
