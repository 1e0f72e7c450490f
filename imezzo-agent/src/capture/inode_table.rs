//! The agent's picture of the exported tree: inode -> names, name -> inode.
//!
//! Built by one walk of the root at start and kept current by namespace events. Each inode
//! records its links as (parent inode, name), never full paths, so renaming a directory is
//! one update however deep its subtree; a path is computed on demand by walking up to the
//! root. Hard links are several links of one inode. The walk stays on the root's device.
//!
//! Memory is the constraint: the server keeps one entry per inode of the export, and a
//! million-file export must fit in the agent's memory target. So an inode costs one record
//! of 40 bytes (its number, first link and kind; names up to 21 bytes inline) in a hash
//! table keyed by inode, plus one 8-byte slot in a second table that finds a child by
//! (parent, name) by hashing the child's own record: no per-directory maps, no full paths,
//! no allocation per name in the common case. Links beyond an inode's first (hard links)
//! are rare and live in a side map. Nothing lists a directory's children: forgetting a
//! subtree (a directory moved out of the root) scans the table, which is rare and linear.

use std::{
    collections::HashMap,
    fs,
    hash::{BuildHasher, Hash, Hasher},
    io,
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

/// A name as stored, with its inode's kind: short names inline, longer ones on the heap. The
/// kind lives here rather than in [`Node`] because there it would cost a record 8 bytes of
/// padding; here it fills a byte the variants leave free (24 bytes either way).
#[derive(Clone)]
enum Name {
    Short { kind: Kind, len: u8, bytes: [u8; SHORT_NAME] },
    Long { kind: Kind, bytes: Box<[u8]> },
}

/// Names up to this long are stored inline.
const SHORT_NAME: usize = 21;

impl Name {
    fn new(name: &[u8], kind: Kind) -> Name {
        if name.len() <= SHORT_NAME {
            let mut bytes = [0u8; SHORT_NAME];
            bytes[..name.len()].copy_from_slice(name);
            Name::Short { kind, len: name.len() as u8, bytes }
        } else {
            Name::Long { kind, bytes: name.into() }
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Name::Short { len, bytes, .. } => &bytes[..*len as usize],
            Name::Long { bytes, .. } => bytes,
        }
    }

    fn kind(&self) -> Kind {
        match self {
            Name::Short { kind, .. } | Name::Long { kind, .. } => *kind,
        }
    }

    fn set_kind(&mut self, to: Kind) {
        match self {
            Name::Short { kind, .. } | Name::Long { kind, .. } => *kind = to,
        }
    }

    /// The same kind under another name.
    fn renamed(&self, name: &[u8]) -> Name {
        Name::new(name, self.kind())
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

#[derive(Debug)]
struct Node {
    ino: u64,
    /// The first link: parent inode (0 for the root) and name; and the inode's kind.
    parent: u64,
    name: Name,
}

// A million-file export keeps a million of these.
const _: () = assert!(std::mem::size_of::<Node>() == 40);

/// A link: parent directory's inode and name.
type Link = (u64, Box<[u8]>);

/// Every inode's record, in slots of a vector (a large vector grows in place, by mremap,
/// where a hash table of records would hold its old and new arrays at once), found by
/// inode number through an index of 4-byte slot numbers. A free slot has `ino == FREE`.
#[derive(Debug, Default)]
struct Slab {
    slots: Vec<Node>,
    free: Vec<u32>,
    by_ino: hashbrown::HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
}

const FREE: u64 = u64::MAX;

impl Slab {
    fn slot_of(&self, ino: u64) -> Option<u32> {
        let slots = &self.slots;
        self.by_ino.find(self.hasher.hash_one(ino), |&i| slots[i as usize].ino == ino).copied()
    }

    fn get(&self, ino: u64) -> Option<&Node> {
        self.slot_of(ino).map(|i| &self.slots[i as usize])
    }

    fn get_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.slot_of(ino).map(|i| &mut self.slots[i as usize])
    }

    /// Adds a record for an inode not in the slab; returns its slot.
    fn insert(&mut self, node: Node) -> u32 {
        let ino = node.ino;
        let slot = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = node;
                i
            }
            None => {
                self.slots.push(node);
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 inodes")
            }
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.by_ino.insert_unique(hasher.hash_one(ino), slot, |&i| hasher.hash_one(slots[i as usize].ino));
        slot
    }

    fn remove(&mut self, ino: u64) {
        let slots = &self.slots;
        if let Ok(entry) = self.by_ino.find_entry(self.hasher.hash_one(ino), |&i| slots[i as usize].ino == ino) {
            let (slot, _) = entry.remove();
            self.slots[slot as usize] = Node { ino: FREE, parent: FREE, name: Name::new(b"", Kind::Other) };
            self.free.push(slot);
        }
    }

    fn len(&self) -> usize {
        self.by_ino.len()
    }

    fn iter(&self) -> impl Iterator<Item = &Node> {
        self.slots.iter().filter(|n| n.ino != FREE)
    }
}

#[derive(Debug)]
pub struct InodeTable {
    root: u64,
    /// Every inode, by number.
    nodes: Slab,
    /// Slots of the records, found by the (parent, name) of the inode's first link.
    by_name: hashbrown::HashTable<u32>,
    /// Links beyond an inode's first: (parent, name) -> inode, and inode -> those links.
    extra: HashMap<Link, u64>,
    extra_of: HashMap<u64, Vec<Link>>,
    hasher: hashbrown::DefaultHashBuilder,
    /// Stand-in numbers handed out so far to the roots of other devices (see `FOREIGN`).
    foreign: u64,
}

/// Stand-in inode numbers (top two bits set, so no real inode and none of capture's
/// placeholders) for a directory entry on another device than the root's: a mount point,
/// or a nested btrfs subvolume. Its own inode number means nothing on the root's device
/// and may well be one of ours (every btrfs subvolume's root directory is inode 256, an
/// ext4 root is inode 2), so it is known by name only, and nothing beneath it is walked.
pub const FOREIGN: u64 = 3 << 62;

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
        let mut table = InodeTable::with_root(meta.ino());
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
                let number = if meta.dev() == dev {
                    meta.ino()
                } else {
                    crate::report!(Info, "capture: entries on another file system skipped", 
                        "{}: another file system or btrfs subvolume (device {}:{}), not captured",
                        entry.path().display(),
                        libc::major(meta.dev()),
                        libc::minor(meta.dev())
                    );
                    self.foreign += 1;
                    FOREIGN | self.foreign
                };
                self.link(ino, name.as_encoded_bytes(), number, kind);
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

    /// A table holding only the root directory, inode `root`.
    pub fn with_root(root: u64) -> InodeTable {
        let mut t = InodeTable {
            root,
            nodes: Slab::default(),
            by_name: hashbrown::HashTable::new(),
            extra: HashMap::new(),
            extra_of: HashMap::new(),
            hasher: hashbrown::DefaultHashBuilder::default(),
            foreign: 0,
        };
        t.nodes.insert(Node { ino: root, parent: 0, name: Name::new(b"", Kind::Dir) });
        t
    }

    pub fn root(&self) -> u64 {
        self.root
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.len() == 0
    }

    pub fn contains(&self, ino: u64) -> bool {
        self.node(ino).is_some()
    }

    /// Whether `ino` has more than one link in the table.
    pub fn has_extra_links(&self, ino: u64) -> bool {
        self.extra_of.contains_key(&ino)
    }

    pub fn kind(&self, ino: u64) -> Option<Kind> {
        self.node(ino).map(|n| n.name.kind())
    }

    fn node(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(ino)
    }

    fn node_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.nodes.get_mut(ino)
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
            let node = self.node(cur)?;
            if node.parent == 0 {
                return None;
            }
            parts.push(node.name.as_bytes());
            cur = node.parent;
        }
        None
    }

    /// Every path of `ino` the table knows (its first link, then the others), at most
    /// `max`; empty for an inode it does not know.
    pub fn paths_of(&self, ino: u64, max: usize) -> Vec<RelPath> {
        let mut out: Vec<RelPath> = self.path_of(ino).into_iter().collect();
        for (parent, name) in self.extra_of.get(&ino).into_iter().flatten() {
            if out.len() >= max {
                break;
            }
            let Some(dir) = self.path_of(*parent) else { continue };
            let mut p = dir.0;
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(name);
            out.push(RelPath(p));
        }
        out.truncate(max);
        out
    }

    /// The inode at `path`, walking names from the root (symlinks are not followed).
    pub fn lookup(&self, path: &[&[u8]]) -> Option<u64> {
        let mut cur = self.root;
        for c in path {
            cur = self.lookup_child(cur, c)?;
        }
        Some(cur)
    }

    /// The inode named `name` in directory `dir`.
    pub fn lookup_child(&self, dir: u64, name: &[u8]) -> Option<u64> {
        if !self.extra.is_empty() {
            if let Some(&ino) = self.extra.get(&(dir, Box::<[u8]>::from(name))) {
                return Some(ino);
            }
        }
        let slots = &self.nodes.slots;
        self.by_name
            .find(hash_link(&self.hasher, dir, name), |&i| {
                let n = &slots[i as usize];
                n.parent == dir && n.name.as_bytes() == name
            })
            .map(|&i| slots[i as usize].ino)
    }

    /// Adds the link `parent/name -> ino`, replacing whatever `name` named before.
    pub fn link(&mut self, parent: u64, name: &[u8], ino: u64, kind: Kind) {
        if let Some(old) = self.lookup_child(parent, name) {
            if old == ino {
                return;
            }
            self.unlink(parent, name);
        }
        if !self.contains(parent) {
            return;
        }
        match self.node_mut(ino) {
            Some(node) => {
                node.name.set_kind(kind);
                self.add_link(ino, parent, name);
            }
            None => {
                self.nodes.insert(Node { ino, parent, name: Name::new(name, kind) });
                self.index_first(ino, parent, name);
            }
        }
    }

    fn index_first(&mut self, ino: u64, parent: u64, name: &[u8]) {
        let Some(slot) = self.nodes.slot_of(ino) else { return };
        let (slots, hasher) = (&self.nodes.slots, &self.hasher);
        self.by_name.insert_unique(hash_link(hasher, parent, name), slot, |&i| {
            let n = &slots[i as usize];
            hash_link(hasher, n.parent, n.name.as_bytes())
        });
    }

    /// Takes the first-link index entry of `ino` out (before its first link changes).
    fn unindex_first(&mut self, ino: u64) {
        let Some(slot) = self.nodes.slot_of(ino) else { return };
        let n = &self.nodes.slots[slot as usize];
        let hash = hash_link(&self.hasher, n.parent, n.name.as_bytes());
        if let Ok(entry) = self.by_name.find_entry(hash, |&i| i == slot) {
            entry.remove();
        }
    }

    /// Removes one link of `ino`; false if it had no such link. Does not forget the inode.
    fn drop_link(&mut self, ino: u64, parent: u64, name: &[u8]) -> bool {
        let Some(node) = self.node(ino) else { return false };
        if node.parent == parent && node.name.as_bytes() == name {
            self.unindex_first(ino);
            // Promote a further link, if any, to first.
            let next = self.extra_of.get_mut(&ino).and_then(|links| links.pop());
            if self.extra_of.get(&ino).is_some_and(|l| l.is_empty()) {
                self.extra_of.remove(&ino);
            }
            let node = self.node_mut(ino).expect("checked above");
            match next {
                Some((p, n)) => {
                    node.parent = p;
                    node.name = node.name.renamed(&n);
                    self.extra.remove(&(p, n.clone()));
                    self.index_first(ino, p, &n);
                }
                None => {
                    node.parent = 0;
                    node.name = node.name.renamed(b"");
                }
            }
            return true;
        }
        let key = (parent, Box::<[u8]>::from(name));
        if self.extra.remove(&key).is_none() {
            return false;
        }
        if let Some(links) = self.extra_of.get_mut(&ino) {
            links.retain(|(p, n)| !(*p == parent && &**n == name));
            if links.is_empty() {
                self.extra_of.remove(&ino);
            }
        }
        true
    }

    fn linkless(&self, ino: u64) -> bool {
        self.node(ino).is_some_and(|n| n.parent == 0 && ino != self.root)
    }

    /// Removes the link `parent/name`; an inode left with no link leaves the table, with
    /// its subtree. Returns the inode it named.
    pub fn unlink(&mut self, parent: u64, name: &[u8]) -> Option<u64> {
        let ino = self.lookup_child(parent, name)?;
        self.drop_link(ino, parent, name);
        if self.linkless(ino) {
            self.forget(ino);
        }
        Some(ino)
    }

    /// Removes `ino` and everything beneath it. Directories do not list their children, so
    /// this scans the table once per level of the subtree; it runs only when a directory
    /// with contents leaves the table (moved out of the root), which is rare.
    fn forget(&mut self, ino: u64) {
        let is_dir = self.kind(ino) == Some(Kind::Dir);
        let mut gone: std::collections::HashSet<u64> = std::collections::HashSet::from([ino]);
        let mut frontier = vec![ino];
        if is_dir {
            while !frontier.is_empty() {
                let level: std::collections::HashSet<u64> = frontier.drain(..).collect();
                for n in self.nodes.iter() {
                    // A file with links elsewhere is settled below, once its links inside
                    // the subtree are gone.
                    if level.contains(&n.parent) && !gone.contains(&n.ino) && !self.extra_of.contains_key(&n.ino) {
                        gone.insert(n.ino);
                        if n.name.kind() == Kind::Dir {
                            frontier.push(n.ino);
                        }
                    }
                }
            }
        }
        // Links of surviving inodes from inside the subtree go; an inode whose only links
        // were there goes with it. (Nothing links from inside a file.)
        let stale: Vec<(u64, Box<[u8]>, u64)> = if is_dir {
            self.extra.iter().filter(|((p, _), _)| gone.contains(p)).map(|((p, n), i)| (*p, n.clone(), *i)).collect()
        } else {
            Vec::new()
        };
        for (p, n, i) in stale {
            if !gone.contains(&i) {
                self.drop_link(i, p, &n);
            }
        }
        for &i in &gone {
            self.unindex_first(i);
            if let Some(links) = self.extra_of.remove(&i) {
                for (p, n) in links {
                    self.extra.remove(&(p, n));
                }
            }
            self.nodes.remove(i);
        }
        // A hard-linked file inside the subtree with a link outside it survives: its first
        // link pointed inside, so promote one from outside. Only a directory has insides:
        // forgetting a file (every unlink) must not scan the table.
        if !is_dir {
            return;
        }
        let orphans: Vec<u64> = self.nodes.iter().filter(|n| gone.contains(&n.parent)).map(|n| n.ino).collect();
        for i in orphans {
            let (p, n) = {
                let node = self.node(i).expect("listed above");
                (node.parent, node.name.as_bytes().to_vec())
            };
            self.drop_link(i, p, &n);
            if self.linkless(i) {
                self.forget(i);
            }
        }
    }

    /// `rename(from, to)`: `to` is replaced if it existed.
    pub fn rename(&mut self, from: (u64, &[u8]), to: (u64, &[u8])) {
        let Some(ino) = self.lookup_child(from.0, from.1) else { return };
        if let Some(old) = self.lookup_child(to.0, to.1) {
            if old == ino {
                // Two links of one inode: rename(2) does nothing.
                return;
            }
            self.unlink(to.0, to.1);
            // The replaced directory held the renamed inode (the kernel refuses this; the
            // table only ever sees it after missed events): it went with it.
            if !self.contains(ino) {
                return;
            }
        }
        // Detach without forgetting: the inode keeps living under its new name.
        self.drop_link(ino, from.0, from.1);
        if !self.contains(to.0) {
            if self.linkless(ino) {
                self.forget(ino);
            }
            return;
        }
        self.add_link(ino, to.0, to.1);
    }

    /// Gives the existing `ino` the link `parent/name` (first link if it has none).
    fn add_link(&mut self, ino: u64, parent: u64, name: &[u8]) {
        if self.linkless(ino) {
            let node = self.node_mut(ino).expect("linkless implies present");
            node.parent = parent;
            node.name = node.name.renamed(name);
            self.index_first(ino, parent, name);
        } else {
            self.extra.insert((parent, name.into()), ino);
            self.extra_of.entry(ino).or_default().push((parent, name.into()));
        }
    }

    /// `renameat2(RENAME_EXCHANGE)`: the two names swap inodes.
    pub fn exchange(&mut self, a: (u64, &[u8]), b: (u64, &[u8])) {
        let (Some(ia), Some(ib)) = (self.lookup_child(a.0, a.1), self.lookup_child(b.0, b.1)) else { return };
        if ia == ib {
            return;
        }
        self.drop_link(ia, a.0, a.1);
        self.drop_link(ib, b.0, b.1);
        self.add_link(ia, b.0, b.1);
        self.add_link(ib, a.0, a.1);
    }
}

fn hash_link(hasher: &hashbrown::DefaultHashBuilder, parent: u64, name: &[u8]) -> u64 {
    let mut h = hasher.build_hasher();
    parent.hash(&mut h);
    name.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> InodeTable {
        InodeTable::with_root(1)
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
    fn paths_of_lists_every_link_of_an_inode_up_to_the_bound() {
        let mut t = table();
        t.link(1, b"d", 2, Kind::Dir);
        t.link(1, b"a", 9, Kind::Other);
        t.link(2, b"b", 9, Kind::Other);
        t.link(1, b"c", 9, Kind::Other);
        let all: Vec<String> = t.paths_of(9, 10).iter().map(|p| p.display().into_owned()).collect();
        assert_eq!(all, ["a", "d/b", "c"]);
        t.rename((1, b"d"), (1, b"e"));
        assert_eq!(t.paths_of(9, 2).len(), 2);
        assert!(t.paths_of(9, 10).iter().any(|p| p.display() == "e/b"));
        t.unlink(1, b"a");
        assert_eq!(t.paths_of(9, 10).len(), 2);
        assert_eq!(t.paths_of(2, 10).len(), 1, "a directory: its one name");
        assert!(t.paths_of(77, 10).is_empty());
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
    fn a_directory_moved_out_takes_its_subtree_but_a_file_linked_outside_survives() {
        let mut t = table();
        t.link(1, b"d", 2, Kind::Dir);
        t.link(2, b"sub", 3, Kind::Dir);
        t.link(3, b"f", 4, Kind::File);
        t.link(1, b"outside-link-with-a-rather-long-name", 4, Kind::File);
        t.link(2, b"g", 5, Kind::File);
        // A rename to a parent the table does not know: the directory left the root.
        t.rename((1, b"d"), (999, b"elsewhere"));
        assert!(!t.contains(2) && !t.contains(3) && !t.contains(5));
        assert_eq!(t.path_of(4).unwrap().display(), "outside-link-with-a-rather-long-name");
        assert_eq!(t.lookup(&[b"d"]), None);
        assert_eq!(t.len(), 2);
    }

    /// The reference: links as a plain map, forgetting by the definition.
    #[derive(Default)]
    struct Model {
        links: std::collections::BTreeMap<(u64, Vec<u8>), u64>,
        kinds: HashMap<u64, Kind>,
    }

    impl Model {
        fn forget(&mut self, ino: u64) {
            self.kinds.remove(&ino);
            let children: Vec<_> = self.links.iter().filter(|((p, _), _)| *p == ino).map(|(k, v)| (k.clone(), *v)).collect();
            for (k, child) in children {
                self.links.remove(&k);
                if !self.links.values().any(|&i| i == child) {
                    self.forget(child);
                }
            }
        }
        fn unlink(&mut self, p: u64, n: &[u8]) {
            if let Some(ino) = self.links.remove(&(p, n.to_vec())) {
                if !self.links.values().any(|&i| i == ino) {
                    self.forget(ino);
                }
            }
        }
        fn link(&mut self, p: u64, n: &[u8], ino: u64, kind: Kind) {
            if let Some(&old) = self.links.get(&(p, n.to_vec())) {
                if old == ino {
                    return;
                }
                self.unlink(p, n);
            }
            if !self.kinds.contains_key(&p) {
                return;
            }
            self.links.insert((p, n.to_vec()), ino);
            self.kinds.insert(ino, kind);
        }
        fn rename(&mut self, from: (u64, &[u8]), to: (u64, &[u8])) {
            let Some(&ino) = self.links.get(&(from.0, from.1.to_vec())) else { return };
            if let Some(&old) = self.links.get(&(to.0, to.1.to_vec())) {
                if old == ino {
                    return;
                }
                self.unlink(to.0, to.1);
                if !self.kinds.contains_key(&ino) {
                    return;
                }
            }
            self.links.remove(&(from.0, from.1.to_vec()));
            if !self.kinds.contains_key(&to.0) {
                if !self.links.values().any(|&i| i == ino) {
                    self.forget(ino);
                }
                return;
            }
            self.links.insert((to.0, to.1.to_vec()), ino);
        }
        fn exchange(&mut self, a: (u64, &[u8]), b: (u64, &[u8])) {
            let ka = (a.0, a.1.to_vec());
            let kb = (b.0, b.1.to_vec());
            let (Some(&ia), Some(&ib)) = (self.links.get(&ka), self.links.get(&kb)) else { return };
            self.links.insert(ka, ib);
            self.links.insert(kb, ia);
        }
    }

    #[test]
    fn random_namespace_changes_agree_with_a_plain_reference_model() {
        let names: [&[u8]; 5] = [b"a", b"b", b"c", b"x", b"a-name-longer-than-twenty-two-bytes"];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut biggest = 0;
        for _round in 0..300 {
            let mut t = table();
            let mut m = Model::default();
            m.kinds.insert(1, Kind::Dir);
            let mut history: Vec<String> = Vec::new();
            for _ in 0..150 {
                // Directories are inodes 1..=8 (the root is 1), files 9..=20; a parent is
                // a known directory, or now and then one outside the root (100).
                let mut dirs: Vec<u64> = m.kinds.iter().filter(|(_, k)| **k == Kind::Dir).map(|(i, _)| *i).collect();
                dirs.sort_unstable();
                let dir = |r: u64| if r == 0 { 100 } else { dirs[(r as usize) % dirs.len()] };
                let (p, q) = (dir(next(12)), dir(next(12)));
                let (n, o) = (names[next(5) as usize], names[next(5) as usize]);
                let op = next(20);
                match if op < 9 { 0 } else if op < 12 { 1 } else if op < 16 { 2 } else { 3 } {
                    0 => {
                        let ino = 2 + next(19);
                        let kind = if ino <= 8 { Kind::Dir } else { Kind::File };
                        // A directory has one link; a file may get more.
                        if kind == Kind::Dir && m.kinds.contains_key(&ino) {
                            continue;
                        }
                        history.push(format!("link {p}/{} -> {ino}", String::from_utf8_lossy(n)));
                        t.link(p, n, ino, kind);
                        m.link(p, n, ino, kind);
                    }
                    1 => {
                        history.push(format!("unlink {p}/{}", String::from_utf8_lossy(n)));
                        t.unlink(p, n);
                        m.unlink(p, n);
                    }
                    2 => {
                        // rename(2) refuses to move a directory into itself or below.
                        let moved = m.links.get(&(p, n.to_vec())).copied();
                        let mut up = Some(q);
                        let mut into_itself = false;
                        while let Some(d) = up {
                            if Some(d) == moved {
                                into_itself = true;
                            }
                            up = m.links.iter().find(|(_, &i)| i == d).map(|((pp, _), _)| *pp);
                        }
                        if into_itself {
                            continue;
                        }
                        history.push(format!("rename {p}/{} {q}/{}", String::from_utf8_lossy(n), String::from_utf8_lossy(o)));
                        t.rename((p, n), (q, o));
                        m.rename((p, n), (q, o));
                    }
                    _ => {
                        let (a, b) = (m.links.get(&(p, n.to_vec())).copied(), m.links.get(&(q, o.to_vec())).copied());
                        // Exchanging a directory with something inside it is refused too.
                        let below = |x: Option<u64>, y: u64| {
                            let mut up = Some(y);
                            while let Some(d) = up {
                                if Some(d) == x {
                                    return true;
                                }
                                up = m.links.iter().find(|(_, &i)| i == d).map(|((pp, _), _)| *pp);
                            }
                            false
                        };
                        if below(a, q) || below(b, p) {
                            continue;
                        }
                        history.push(format!("exchange {p}/{} {q}/{}", String::from_utf8_lossy(n), String::from_utf8_lossy(o)));
                        t.exchange((p, n), (q, o));
                        m.exchange((p, n), (q, o));
                    }
                }
                assert_eq!(t.len(), m.kinds.len(), "inode counts differ: {t:?} after\n{}", history.join("\n"));
                biggest = biggest.max(t.len());
                for ((p, n), ino) in &m.links {
                    assert_eq!(t.lookup_child(*p, n), Some(*ino), "link {p}/{:?} after\n{}", String::from_utf8_lossy(n), history.join("\n"));
                }
                for (ino, kind) in &m.kinds {
                    assert_eq!(t.kind(*ino), Some(*kind), "inode {ino}");
                    if *ino != 1 {
                        let path = t.path_of(*ino).expect("a known inode has a path");
                        let parts: Vec<&[u8]> = path.as_bytes().split(|&c| c == b'/').collect();
                        assert_eq!(t.lookup(&parts), Some(*ino), "path_of({ino}) = {}", path.display());
                    }
                }
            }
        }
        // The walk must have built trees worth checking, not stayed at the root.
        assert!(biggest >= 10, "the largest table had {biggest} inodes");
    }

    #[test]
    fn dot_dot_is_resolved_lexically_and_cannot_climb_out() {
        assert_eq!(components(b"a/./b/../c").unwrap(), vec![&b"a"[..], b"c"]);
        assert!(components(b"a/../../x").is_none());
    }
}
