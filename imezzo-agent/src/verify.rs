//! Compare two directory trees attribute by attribute: the oracle every replication test
//! ends with (`imezzo verify DIR_A DIR_B`).
//!
//! What is compared, for the two roots and for every path beneath them: presence, file
//! type, regular-file content (byte for byte) and size, permission bits (setuid, setgid and
//! sticky included), owner and group, mtime to the nanosecond (directories too, unless
//! [`VerifyOptions::compare_mtime_of_dirs`] is off), symlink targets, device numbers, every
//! extended attribute, and hard-link groups. What is not: atime and ctime (no replica can
//! set ctime, and reading a file moves atime), the size of directories (a property of the
//! file system, not of the tree), and sparseness (only the bytes a reader sees count).
//!
//! Each tree is walked once, without following symlinks, into a list sorted by path bytes;
//! the two lists are then merged in that order, so the differences come out sorted and the
//! cost is one `lstat` per entry plus a content read only where two sizes match.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    fmt,
    fs::{self, File},
    io::{self, Read},
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
};

use crate::op::{RelPath, Timestamp};

/// What to compare beyond the always-compared attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Compare the mtime of directories (the roots included). On by default: replay must
    /// restore them, and a directory whose entries changed has a new mtime.
    pub compare_mtime_of_dirs: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions { compare_mtime_of_dirs: true }
    }
}

/// Which of the two trees: `A` is the first argument, `B` the second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    A,
    B,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::A => "A",
            Side::B => "B",
        })
    }
}

/// The type of a directory entry, as `lstat` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryType {
    File,
    Dir,
    Symlink,
    Fifo,
    CharDevice,
    BlockDevice,
    Socket,
    /// A `S_IFMT` value Linux does not define; kept rather than guessed.
    Unknown(u32),
}

impl EntryType {
    fn from_mode(mode: u32) -> EntryType {
        match mode & libc::S_IFMT {
            libc::S_IFREG => EntryType::File,
            libc::S_IFDIR => EntryType::Dir,
            libc::S_IFLNK => EntryType::Symlink,
            libc::S_IFIFO => EntryType::Fifo,
            libc::S_IFCHR => EntryType::CharDevice,
            libc::S_IFBLK => EntryType::BlockDevice,
            libc::S_IFSOCK => EntryType::Socket,
            other => EntryType::Unknown(other),
        }
    }
}

impl fmt::Display for EntryType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryType::File => f.write_str("file"),
            EntryType::Dir => f.write_str("dir"),
            EntryType::Symlink => f.write_str("symlink"),
            EntryType::Fifo => f.write_str("fifo"),
            EntryType::CharDevice => f.write_str("char device"),
            EntryType::BlockDevice => f.write_str("block device"),
            EntryType::Socket => f.write_str("socket"),
            EntryType::Unknown(fmt) => write!(f, "unknown type {fmt:#o}"),
        }
    }
}

/// One way in which the trees differ at one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    /// Relative to both roots; `""` is the roots themselves.
    pub path: RelPath,
    pub kind: DifferenceKind,
}

/// What differs. Where a variant carries `a` and `b`, they are the values in tree A and B.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DifferenceKind {
    /// The path exists in one tree only. For a directory this one difference stands for its
    /// whole subtree, which is not listed entry by entry.
    OnlyIn(Side),
    /// Different types; nothing else is compared at this path (nor beneath it).
    Type {
        a: EntryType,
        b: EntryType,
    },
    /// Regular files of different sizes (their content is then not compared).
    Size {
        a: u64,
        b: u64,
    },
    /// Regular files of equal size whose bytes first differ at this offset.
    Content {
        offset: u64,
    },
    /// Permission bits, `mode & 0o7777`.
    Mode {
        a: u32,
        b: u32,
    },
    Uid {
        a: u32,
        b: u32,
    },
    Gid {
        a: u32,
        b: u32,
    },
    Mtime {
        a: Timestamp,
        b: Timestamp,
    },
    SymlinkTarget {
        a: Vec<u8>,
        b: Vec<u8>,
    },
    /// Device number (`st_rdev`) of two char or two block devices.
    Device {
        a: u64,
        b: u64,
    },
    /// An extended attribute present on one side only.
    XattrOnlyIn {
        side: Side,
        name: Vec<u8>,
    },
    XattrValue {
        name: Vec<u8>,
        a: Vec<u8>,
        b: Vec<u8>,
    },
    /// The paths sharing this path's inode differ. Groups list only paths present in both
    /// trees (a path missing on one side is already an [`DifferenceKind::OnlyIn`]), sorted;
    /// each mismatching group is reported once, at its first path.
    LinkGroup {
        a: Vec<RelPath>,
        b: Vec<RelPath>,
    },
}

/// One line for humans: `only in A: x/y`, `type: z: file != symlink`,
/// `differs: a/b: mtime 1700000000.123456789 != 1700000000.000000000`.
impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = Shown(&self.path.0);
        match &self.kind {
            DifferenceKind::OnlyIn(side) => return write!(f, "only in {side}: {path}"),
            DifferenceKind::Type { a, b } => return write!(f, "type: {path}: {a} != {b}"),
            _ => {}
        }
        write!(f, "differs: {path}: ")?;
        match &self.kind {
            DifferenceKind::OnlyIn(_) | DifferenceKind::Type { .. } => Ok(()),
            DifferenceKind::Size { a, b } => write!(f, "size {a} != {b}"),
            DifferenceKind::Content { offset } => write!(f, "content from byte {offset}"),
            DifferenceKind::Mode { a, b } => write!(f, "mode {a:04o} != {b:04o}"),
            DifferenceKind::Uid { a, b } => write!(f, "uid {a} != {b}"),
            DifferenceKind::Gid { a, b } => write!(f, "gid {a} != {b}"),
            DifferenceKind::Mtime { a, b } => write!(f, "mtime {} != {}", ShownTime(a), ShownTime(b)),
            DifferenceKind::SymlinkTarget { a, b } => {
                write!(f, "symlink target {} != {}", Shown(a), Shown(b))
            }
            DifferenceKind::Device { a, b } => write!(f, "device {} != {}", ShownDev(*a), ShownDev(*b)),
            DifferenceKind::XattrOnlyIn { side, name } => write!(f, "xattr {} only in {side}", Shown(name)),
            DifferenceKind::XattrValue { name, a, b } => {
                write!(f, "xattr {} {} != {}", Shown(name), ShownValue(a), ShownValue(b))
            }
            DifferenceKind::LinkGroup { a, b } => {
                write!(f, "hard links {} != {}", ShownGroup(a), ShownGroup(b))
            }
        }
    }
}

/// A byte string printed lossily on one line: invalid UTF-8 becomes U+FFFD and control
/// characters are escaped, so a name holding a newline cannot forge a second difference
/// line. The empty path (the roots) prints as `.`.
struct Shown<'a>(&'a [u8]);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(".");
        }
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c.is_control() {
                    write!(f, "{}", c.escape_default())?;
                } else {
                    write!(f, "{c}")?;
                }
            }
            if !chunk.invalid().is_empty() {
                f.write_str("\u{FFFD}")?;
            }
        }
        Ok(())
    }
}

struct ShownTime<'a>(&'a Timestamp);

impl fmt::Display for ShownTime<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:09}", self.0.sec, self.0.nsec)
    }
}

struct ShownDev(u64);

impl fmt::Display for ShownDev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", libc::major(self.0), libc::minor(self.0))
    }
}

/// An xattr value, quoted and escaped (values are often binary, ACLs for one), cut short
/// so one difference stays one readable line.
struct ShownValue<'a>(&'a [u8]);

impl fmt::Display for ShownValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 48;
        let cut = self.0.len().min(SHOWN);
        write!(f, "\"{}\"", self.0[..cut].escape_ascii())?;
        if self.0.len() > SHOWN {
            write!(f, "... ({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

struct ShownGroup<'a>(&'a [RelPath]);

impl fmt::Display for ShownGroup<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", Shown(&p.0))?;
        }
        f.write_str("]")
    }
}

/// Why the trees could not be compared (as opposed to: they differ).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("tree {0}: cannot open {1}: {2}; give an existing directory")]
    RootUnreadable(Side, PathBuf, io::Error),
    #[error("tree {0}: {1} is not a directory; verify compares two directory trees")]
    RootNotDir(Side, PathBuf),
    #[error("tree {0}: cannot read {1}: {2}; the trees must stay readable, and unchanged, while verify runs")]
    Unreadable(Side, PathBuf, io::Error),
}

/// The outcome of [`compare_trees`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comparison {
    /// Sorted by path bytes; several differences at one path keep a fixed order (type,
    /// size, content, mode, uid, gid, mtime, target, device, xattrs, hard links).
    pub differences: Vec<Difference>,
    /// Distinct paths beneath the roots seen in either tree (the roots not counted).
    pub entries: usize,
}

/// Every difference between the trees at `a` and `b`; empty when they are identical.
pub fn compare(a: &Path, b: &Path, opts: &VerifyOptions) -> Result<Vec<Difference>, VerifyError> {
    compare_trees(a, b, opts).map(|c| c.differences)
}

/// [`compare`], also counting the entries compared.
pub fn compare_trees(a: &Path, b: &Path, opts: &VerifyOptions) -> Result<Comparison, VerifyError> {
    let tree_a = Tree::walk(Side::A, a)?;
    let tree_b = Tree::walk(Side::B, b)?;
    let mut merge = Merge {
        a: &tree_a,
        b: &tree_b,
        opts,
        buf_a: vec![0; CONTENT_CHUNK],
        buf_b: vec![0; CONTENT_CHUNK],
        out: Vec::new(),
        whole_a: HashSet::new(),
        whole_b: HashSet::new(),
        linkable: Vec::new(),
    };
    let entries = merge.run()?;
    merge.link_groups();
    let mut differences = merge.out;
    // Stable: keeps the fixed per-path order while moving hard-link differences, found in
    // a second pass, next to the other differences of their path.
    differences.sort_by(|x, y| x.path.cmp(&y.path));
    Ok(Comparison { differences, entries })
}

/// Content is compared in chunks of this size, so a file of any size costs two buffers.
const CONTENT_CHUNK: usize = 128 << 10;

/// What `lstat` says of one entry, plus its path relative to the root.
struct Entry {
    rel: RelPath,
    ty: EntryType,
    perm: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: Timestamp,
    rdev: u64,
    dev: u64,
    ino: u64,
    nlink: u64,
}

impl Entry {
    fn new(rel: Vec<u8>, m: &fs::Metadata) -> Entry {
        Entry {
            rel: RelPath(rel),
            ty: EntryType::from_mode(m.mode()),
            perm: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            // The kernel keeps tv_nsec in 0..1e9, so the conversion cannot fail.
            mtime: Timestamp { sec: m.mtime(), nsec: u32::try_from(m.mtime_nsec()).unwrap_or(0) },
            rdev: m.rdev(),
            dev: m.dev(),
            ino: m.ino(),
            nlink: m.nlink(),
        }
    }

    /// Inode identity, for hard-link groups; `None` when no other path can share it.
    fn link_key(&self) -> Option<(u64, u64)> {
        (self.nlink > 1 && self.ty != EntryType::Dir).then_some((self.dev, self.ino))
    }
}

/// One tree, walked: `entries` sorted by path bytes, the root (`""`) first.
struct Tree {
    side: Side,
    root: PathBuf,
    entries: Vec<Entry>,
}

impl Tree {
    fn walk(side: Side, given: &Path) -> Result<Tree, VerifyError> {
        let unreadable_root = |e| VerifyError::RootUnreadable(side, given.to_path_buf(), e);
        // The root itself may be given through a symlink (like `diff -r`); resolving it once
        // means the root's own lstat and xattrs are the directory's, not the link's.
        if !fs::metadata(given).map_err(unreadable_root)?.is_dir() {
            return Err(VerifyError::RootNotDir(side, given.to_path_buf()));
        }
        let root = fs::canonicalize(given).map_err(unreadable_root)?;
        let root_meta = fs::symlink_metadata(&root).map_err(|e| VerifyError::Unreadable(side, root.clone(), e))?;
        let mut tree = Tree { side, root, entries: vec![Entry::new(Vec::new(), &root_meta)] };
        // Depth-first with an explicit stack: depth is bounded by the tree, not our stack.
        let mut dirs: Vec<Vec<u8>> = vec![Vec::new()];
        while let Some(dir_rel) = dirs.pop() {
            let dir = tree.path(&dir_rel);
            let unreadable = |e| VerifyError::Unreadable(side, dir.clone(), e);
            for item in fs::read_dir(&dir).map_err(unreadable)? {
                let item = item.map_err(unreadable)?;
                // DirEntry::metadata does not follow symlinks: an lstat relative to the
                // open directory.
                let meta = item.metadata().map_err(|e| VerifyError::Unreadable(side, item.path(), e))?;
                let name = item.file_name();
                let mut rel = Vec::with_capacity(dir_rel.len() + 1 + name.len());
                if !dir_rel.is_empty() {
                    rel.extend_from_slice(&dir_rel);
                    rel.push(b'/');
                }
                rel.extend_from_slice(name.as_bytes());
                if meta.file_type().is_dir() {
                    dirs.push(rel.clone());
                }
                tree.entries.push(Entry::new(rel, &meta));
            }
        }
        tree.entries.sort_unstable_by(|x, y| x.rel.cmp(&y.rel));
        Ok(tree)
    }

    fn path(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(std::ffi::OsStr::from_bytes(rel))
        }
    }

    fn unreadable(&self, rel: &[u8]) -> impl FnOnce(io::Error) -> VerifyError + '_ {
        let path = self.path(rel);
        move |e| VerifyError::Unreadable(self.side, path, e)
    }
}

/// The sorted merge of two walked trees.
struct Merge<'t> {
    a: &'t Tree,
    b: &'t Tree,
    opts: &'t VerifyOptions,
    buf_a: Vec<u8>,
    buf_b: Vec<u8>,
    out: Vec<Difference>,
    /// Directories already reported whole (only in one tree, or facing a non-directory):
    /// their descendants on that side are not listed one by one.
    whole_a: HashSet<RelPath>,
    whole_b: HashSet<RelPath>,
    /// Non-directory paths present in both trees with the same type, as (index in A, index
    /// in B): the candidates for the hard-link comparison.
    linkable: Vec<(usize, usize)>,
}

impl Merge<'_> {
    /// Walks both sorted lists once; returns the number of distinct paths beneath the roots.
    fn run(&mut self) -> Result<usize, VerifyError> {
        let (ea, eb) = (&self.a.entries, &self.b.entries);
        let (mut i, mut j, mut seen) = (0, 0, 0);
        loop {
            let order = match (ea.get(i), eb.get(j)) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(x), Some(y)) => x.rel.cmp(&y.rel),
            };
            match order {
                std::cmp::Ordering::Less => {
                    self.only_in(Side::A, i);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    self.only_in(Side::B, j);
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    self.both(i, j)?;
                    i += 1;
                    j += 1;
                }
            }
            seen += 1;
        }
        // Both roots are always present and always common.
        Ok(seen - 1)
    }

    fn only_in(&mut self, side: Side, idx: usize) {
        let (tree, whole) = match side {
            Side::A => (self.a, &mut self.whole_a),
            Side::B => (self.b, &mut self.whole_b),
        };
        let e = &tree.entries[idx];
        // Parents sort before their children (a prefix is smaller), so a parent reported
        // whole is already in the set when its children come by.
        let covered = whole.contains(&RelPath(parent(&e.rel.0).to_vec()));
        if e.ty == EntryType::Dir {
            whole.insert(e.rel.clone());
        }
        if !covered {
            self.out.push(Difference { path: e.rel.clone(), kind: DifferenceKind::OnlyIn(side) });
        }
    }

    fn both(&mut self, i: usize, j: usize) -> Result<(), VerifyError> {
        // Copy the tree references out of `self`, so the entries stay borrowed while `self`
        // is mutated.
        let (ta, tb) = (self.a, self.b);
        let (a, b) = (&ta.entries[i], &tb.entries[j]);
        let mut kinds = Vec::new();
        if a.ty != b.ty {
            kinds.push(DifferenceKind::Type { a: a.ty, b: b.ty });
            if a.ty == EntryType::Dir {
                self.whole_a.insert(a.rel.clone());
            }
            if b.ty == EntryType::Dir {
                self.whole_b.insert(b.rel.clone());
            }
        } else {
            if a.ty == EntryType::File && a.size != b.size {
                kinds.push(DifferenceKind::Size { a: a.size, b: b.size });
            } else if a.ty == EntryType::File {
                if let Some(offset) = self.first_content_difference(a, b)? {
                    kinds.push(DifferenceKind::Content { offset });
                }
            }
            if a.perm != b.perm {
                kinds.push(DifferenceKind::Mode { a: a.perm, b: b.perm });
            }
            if a.uid != b.uid {
                kinds.push(DifferenceKind::Uid { a: a.uid, b: b.uid });
            }
            if a.gid != b.gid {
                kinds.push(DifferenceKind::Gid { a: a.gid, b: b.gid });
            }
            let mtime_counts = a.ty != EntryType::Dir || self.opts.compare_mtime_of_dirs;
            if mtime_counts && a.mtime != b.mtime {
                kinds.push(DifferenceKind::Mtime { a: a.mtime, b: b.mtime });
            }
            if a.ty == EntryType::Symlink {
                let target_a = fs::read_link(ta.path(&a.rel.0)).map_err(ta.unreadable(&a.rel.0))?;
                let target_b = fs::read_link(tb.path(&b.rel.0)).map_err(tb.unreadable(&b.rel.0))?;
                if target_a != target_b {
                    kinds.push(DifferenceKind::SymlinkTarget {
                        a: target_a.into_os_string().into_encoded_bytes(),
                        b: target_b.into_os_string().into_encoded_bytes(),
                    });
                }
            }
            if matches!(a.ty, EntryType::CharDevice | EntryType::BlockDevice) && a.rdev != b.rdev {
                kinds.push(DifferenceKind::Device { a: a.rdev, b: b.rdev });
            }
            compare_xattrs(a, b, ta, tb, &mut kinds)?;
            if a.ty != EntryType::Dir {
                self.linkable.push((i, j));
            }
        }
        self.out.extend(kinds.into_iter().map(|kind| Difference { path: a.rel.clone(), kind }));
        Ok(())
    }

    /// The offset of the first differing byte of two regular files of equal size, reading
    /// both in step; `None` when identical.
    fn first_content_difference(&mut self, a: &Entry, b: &Entry) -> Result<Option<u64>, VerifyError> {
        let (rel_a, rel_b) = (&a.rel.0, &b.rel.0);
        let mut fa = File::open(self.a.path(rel_a)).map_err(self.a.unreadable(rel_a))?;
        let mut fb = File::open(self.b.path(rel_b)).map_err(self.b.unreadable(rel_b))?;
        let mut offset = 0u64;
        loop {
            let na = fill(&mut fa, &mut self.buf_a).map_err(self.a.unreadable(rel_a))?;
            let nb = fill(&mut fb, &mut self.buf_b).map_err(self.b.unreadable(rel_b))?;
            let (ca, cb) = (&self.buf_a[..na], &self.buf_b[..nb]);
            if ca != cb {
                // A shorter read means the file ended there (it shrank since the lstat):
                // the first byte past the shorter one differs.
                let at = ca.iter().zip(cb).position(|(x, y)| x != y).unwrap_or(na.min(nb));
                return Ok(Some(offset + at as u64));
            }
            if na == 0 {
                return Ok(None);
            }
            offset += na as u64;
        }
    }

    /// Hard links: for every path present in both trees, the paths sharing its inode in A
    /// must be the paths sharing its inode in B (both counted among the common paths only).
    fn link_groups(&mut self) {
        let (ea, eb) = (&self.a.entries, &self.b.entries);
        // Inode -> positions in `linkable`, in ascending order, so two groups holding the
        // same paths are equal slices.
        let mut groups_a: HashMap<(u64, u64), Vec<usize>> = HashMap::new();
        let mut groups_b: HashMap<(u64, u64), Vec<usize>> = HashMap::new();
        for (c, &(i, j)) in self.linkable.iter().enumerate() {
            if let Some(k) = ea[i].link_key() {
                groups_a.entry(k).or_default().push(c);
            }
            if let Some(k) = eb[j].link_key() {
                groups_b.entry(k).or_default().push(c);
            }
        }
        let mut reported_a = HashSet::new();
        let mut reported_b = HashSet::new();
        for (c, &(i, j)) in self.linkable.iter().enumerate() {
            let (ka, kb) = (ea[i].link_key(), eb[j].link_key());
            if ka.is_none() && kb.is_none() {
                continue;
            }
            let alone = [c];
            let group_a = ka.map_or(&alone[..], |k| &groups_a[&k]);
            let group_b = kb.map_or(&alone[..], |k| &groups_b[&k]);
            if group_a == group_b {
                continue;
            }
            // Once per group: a group already shown (on either side) has been shown with
            // all of its members.
            if ka.is_some_and(|k| reported_a.contains(&k)) || kb.is_some_and(|k| reported_b.contains(&k)) {
                continue;
            }
            reported_a.extend(ka);
            reported_b.extend(kb);
            let names = |g: &[usize]| g.iter().map(|&c| ea[self.linkable[c].0].rel.clone()).collect();
            let kind = DifferenceKind::LinkGroup { a: names(group_a), b: names(group_b) };
            self.out.push(Difference { path: ea[i].rel.clone(), kind });
        }
    }
}

/// Adds a difference for every xattr name present on one side only or with another value.
fn compare_xattrs(
    a: &Entry,
    b: &Entry,
    ta: &Tree,
    tb: &Tree,
    kinds: &mut Vec<DifferenceKind>,
) -> Result<(), VerifyError> {
    let xa = xattrs(&ta.path(&a.rel.0)).map_err(ta.unreadable(&a.rel.0))?;
    let xb = xattrs(&tb.path(&b.rel.0)).map_err(tb.unreadable(&b.rel.0))?;
    if xa == xb {
        return Ok(());
    }
    // Both lists are sorted by name: merge them.
    let (mut p, mut q) = (0, 0);
    loop {
        let order = match (xa.get(p), xb.get(q)) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((na, _)), Some((nb, _))) => na.cmp(nb),
        };
        match order {
            std::cmp::Ordering::Less => {
                kinds.push(DifferenceKind::XattrOnlyIn { side: Side::A, name: xa[p].0.clone() });
                p += 1;
            }
            std::cmp::Ordering::Greater => {
                kinds.push(DifferenceKind::XattrOnlyIn { side: Side::B, name: xb[q].0.clone() });
                q += 1;
            }
            std::cmp::Ordering::Equal => {
                let ((name, va), (_, vb)) = (&xa[p], &xb[q]);
                if va != vb {
                    kinds.push(DifferenceKind::XattrValue { name: name.clone(), a: va.clone(), b: vb.clone() });
                }
                p += 1;
                q += 1;
            }
        }
    }
    Ok(())
}

/// The parent of a relative path; `""` (the root) for a top-level name.
fn parent(rel: &[u8]) -> &[u8] {
    rel.iter().rposition(|&c| c == b'/').map_or(&[][..], |p| &rel[..p])
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn fill(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Every extended attribute of `path` itself (a symlink's own, never its target's), as
/// (name, value) sorted by name. A file system without xattr support has none.
fn xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY (both closures): `cpath` and `name` are NUL-terminated and outlive the calls;
    // each buffer is valid for writes of the length passed with it.
    let names = sized_read(|buf| unsafe { libc::llistxattr(cpath.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) });
    let names = match names {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names.split(|&c| c == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).map_err(|_| io::ErrorKind::InvalidData)?;
        let value = sized_read(|buf| unsafe {
            libc::lgetxattr(cpath.as_ptr(), cname.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        })?;
        out.push((name.to_vec(), value));
    }
    out.sort_unstable();
    Ok(out)
}

/// Runs a `*xattr` call that fills a buffer: first into a small buffer (most files have no
/// or small xattrs, so one call), then, on ERANGE, asks the size and retries. The value can
/// grow between the two calls, hence the loop; it is bounded so a file rewritten
/// continuously ends the verify with an error instead of spinning.
fn sized_read(mut call: impl FnMut(&mut [u8]) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    for _ in 0..8 {
        let n = call(&mut buf);
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) {
            return Err(err);
        }
        let needed = call(&mut []);
        if needed < 0 {
            return Err(io::Error::last_os_error());
        }
        buf = vec![0u8; needed as usize + 1];
    }
    Err(io::Error::other("extended attributes kept changing while being read"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(path: &str, kind: DifferenceKind) -> String {
        Difference { path: path.into(), kind }.to_string()
    }

    #[test]
    fn difference_lines_have_the_documented_shape() {
        assert_eq!(d("x/y", DifferenceKind::OnlyIn(Side::A)), "only in A: x/y");
        assert_eq!(
            d("z", DifferenceKind::Type { a: EntryType::File, b: EntryType::Symlink }),
            "type: z: file != symlink"
        );
        let (a, b) = (Timestamp { sec: 1_700_000_000, nsec: 123_456_789 }, Timestamp { sec: 1_700_000_000, nsec: 0 });
        assert_eq!(
            d("a/b", DifferenceKind::Mtime { a, b }),
            "differs: a/b: mtime 1700000000.123456789 != 1700000000.000000000"
        );
        assert_eq!(d("f", DifferenceKind::Mode { a: 0o4755, b: 0o755 }), "differs: f: mode 4755 != 0755");
        assert_eq!(d("f", DifferenceKind::Content { offset: 7 }), "differs: f: content from byte 7");
        assert_eq!(d("", DifferenceKind::Uid { a: 0, b: 1 }), "differs: .: uid 0 != 1");
        assert_eq!(
            d("n", DifferenceKind::Device { a: libc::makedev(1, 3), b: libc::makedev(8, 17) }),
            "differs: n: device 1:3 != 8:17"
        );
        assert_eq!(
            d("f", DifferenceKind::LinkGroup { a: vec!["f".into(), "g".into()], b: vec!["f".into()] }),
            "differs: f: hard links [f, g] != [f]"
        );
        assert_eq!(
            d("f", DifferenceKind::XattrOnlyIn { side: Side::B, name: b"user.k".to_vec() }),
            "differs: f: xattr user.k only in B"
        );
    }

    #[test]
    fn names_print_lossily_on_one_line() {
        assert_eq!(Shown(b"caf\xe9/x").to_string(), "caf\u{FFFD}/x");
        assert_eq!(Shown(b"two\nlines").to_string(), "two\\nlines");
        assert_eq!(Shown(b"").to_string(), ".");
    }

    #[test]
    fn xattr_values_are_escaped_and_cut_short() {
        assert_eq!(ShownValue(b"a\"\x00").to_string(), "\"a\\\"\\x00\"");
        let long = vec![b'v'; 100];
        assert_eq!(ShownValue(&long).to_string(), format!("\"{}\"... (100 bytes)", "v".repeat(48)));
    }

    #[test]
    fn parent_of_a_top_level_name_is_the_root() {
        assert_eq!(parent(b"a"), b"");
        assert_eq!(parent(b"a/b/c"), b"a/b");
    }

    #[test]
    fn content_difference_past_the_first_chunk_reports_its_exact_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        let mut bytes = vec![7u8; CONTENT_CHUNK * 2 + 10];
        fs::write(a.join("f"), &bytes).unwrap();
        bytes[CONTENT_CHUNK + 3] = 8;
        fs::write(b.join("f"), &bytes).unwrap();
        let opts = VerifyOptions { compare_mtime_of_dirs: false };
        let contents: Vec<_> = compare(&a, &b, &opts)
            .unwrap()
            .into_iter()
            .filter(|d| matches!(d.kind, DifferenceKind::Content { .. }))
            .collect();
        let want = Difference { path: "f".into(), kind: DifferenceKind::Content { offset: CONTENT_CHUNK as u64 + 3 } };
        assert_eq!(contents, vec![want]);
    }
}
