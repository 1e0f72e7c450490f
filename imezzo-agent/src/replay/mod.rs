//! Replay of journal operations onto a client's replica root.
//!
//! A [`Replayer`] holds an `O_PATH` descriptor of the replica root and applies one [`Op`] at
//! a time. It does no networking: what the journal does not carry (file bytes, the owner
//! and times of a new object) it asks of a [`DataSource`], which answers with the master's
//! *current* state.
//!
//! # Safety of paths
//! Every path comes from the wire and is checked before anything is touched: an absolute
//! path or a `..` component is refused as [`ReplayError::EscapesRoot`]; an empty or `.`
//! component, a NUL byte, an over-long name, or the reserved prefix `.imezzo-tmp.` as
//! [`ReplayError::BadPath`]. The parent directory is then opened with `openat2` under
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`: a symlink anywhere in
//! the parent chain is refused, never followed, so nothing outside the root is reached even
//! if the replica was tampered with. The final component is only ever handled by `*at`
//! syscalls relative to that parent, without following it.
//!
//! # Idempotence
//! Every operation can be applied again: creating what exists with the same type (and
//! target, inode, device number) is [`Applied::AlreadyApplied`], removing what is absent
//! too, a rename whose source is gone and whose destination exists is taken as done. Data
//! and attribute operations are idempotent by value: they set, from the master's current
//! state, what the first application set.
//!
//! After a crash the client replays up to one batch again on a tree that already has it.
//! Presence alone cannot tell "not applied yet" from "applied, and the name reused later"
//! (`create t; rename t f; create t` replayed again would move the new `t` over `f`), so
//! [`Replayer::apply_entry`] also records which operation placed each object (create,
//! mkdir, mknod, symlink, link, rename): a [`Mark`] of volume and seq, kept in a
//! [`MarkStore`] in the client's own state and keyed by the object's inode identity
//! `(st_dev, st_ino)`, which follows the object across renames. Nothing of it is written on
//! the replica's files, which are compared attribute by attribute with the master's, xattrs
//! included. An operation meeting an object placed by a *later* operation leaves it alone,
//! and a rename that finds its destination already placed by it removes a source that
//! replay itself resurrected. [`Replayer::apply`] uses no marks: presence alone.
//!
//! # Sequence marks and crashes
//! The marks must describe the tree at whatever moment a crash picks, and the store is a
//! file of its own: nothing orders its writes with the replica's but these invariants.
//!
//! - **M1, write-ahead.** The mark of an operation that places an object is recorded (in
//!   memory and in the store's log) *before* the change that gives the object its name: the
//!   rename of a temporary into place, a rename, an exchange, a link. An object placed by an
//!   applied operation therefore carries that operation's mark, or a later one's.
//! - **M2, a mark ahead of its change is recognisable.** A change that fails puts the
//!   previous mark back, so only the operation in flight at a crash (or one whose failure
//!   could not even be logged) has its mark without its change. A temporary never got its
//!   name: it is removed with its mark when the replayer opens. A rename or exchange marks
//!   each object it moves with the side it goes to ([`Mark::to_new_path`]): finding at
//!   `path` an object that op s sends to `new_path`, or at `new_path` one it sends to
//!   `path`, means s did not run. A link is recognised by inode, the mark aside. Any other
//!   operation meeting such an object sees it placed by s: if it comes before s it was
//!   applied already, so it loses nothing by being skipped.
//! - **M3, sync orders the two files.** [`Replayer::sync`] makes the replica durable
//!   (`syncfs`) and only then commits every mark change up to its start, in one redb
//!   transaction. Every committed mark describes a change made before the `syncfs`, so
//!   already durable: the durable store is never ahead of the durable tree. The caller
//!   acknowledges a seq only after the sync. The client runs the `syncfs` and the commit on
//!   another thread while replay goes on ([`Replayer::begin_sync`], [`DurablePoint`]): the
//!   marks are taken at the start, and changes made meanwhile keep theirs for the next sync
//!   (the tree may then be ahead of the store, as between any two syncs).
//! - **M4, between syncs the page cache holds both.** Every mark change is also appended to
//!   `<store>.log`, never fsynced. A process crash (`kill -9`, a panic) loses neither the
//!   replica's changes nor the log, so the next open during the same boot replays the log
//!   and the marks are exactly as at the crash ([`Recovered::Unsynced`]). Each commit
//!   records where in the log the changes it took end (it may run beside further changes),
//!   and an open resumes what follows that cut; the log is kept across commits and
//!   rewritten (built aside, renamed over) only once long. A machine restart
//!   (power loss, kernel crash) keeps an unknown part of each, unordered, so the log (which
//!   names its boot) is dropped ([`Recovered::Dropped`]) and the entries applied since the
//!   last sync are replayed by presence alone, which can leave a difference where a name was
//!   reused among them: the caller should then compare the replica with the master. This is
//!   the one guarantee of marks kept on the files themselves that a separate file cannot give
//!   short of an fsync per operation.
//! - **M5, removal.** When replay frees an object (unlinks its last name, removes a
//!   directory, renames or replaces something over it, removes a resurrected subtree or a
//!   stale temporary), it removes the object's entry. That removal is logged lazily: a crash
//!   may lose it and leave a stale entry.
//! - **M6, stale entries are harmless.** A stale entry `(v, m)` outlives an inode freed
//!   after op m was applied. Replay writes or clears the entry of every object it creates
//!   before naming it (M1), so an object replay creates never inherits one. An object created
//!   outside replay (a resync, a person) on a reused inode number came after op m; a mark only
//!   makes replay skip operations with seq ≤ m of volume v, which were applied before that
//!   object existed, so skipping them loses nothing newer. A journal restarted from seq 1 has
//!   a new volume id, and marks of another volume are ignored.
//! - **M7, cheap lookups.** Every mark is in memory. The store keeps the highest seq it ever
//!   marked per volume: an operation above it (every entry applied for the first time) meets
//!   no later object, so it skips the mark check of each directory on its path. The redb file
//!   is written once per sync; the log costs one write per placement.
//!
//! # Atomicity
//! New objects are built under a temporary name `.imezzo-tmp.<random>` in the target
//! directory, given their owner, mode, xattrs and times, then renamed into place: a crash
//! leaves either the finished object or a temporary, and [`Replayer::open`] removes every
//! stale temporary. A write covering the whole file (from 0 to at least the master's size)
//! is built the same way; a partial write is done in place, and so is the first write into
//! an empty file (there is no old content to keep). A file with more than one hard link is
//! always written in place, since a rename would split the link group.
//! Zero-filled 4 KiB blocks are left as holes (skipped past EOF, punched inside data), so
//! sparse files stay sparse.
//!
//! # What each operation asks of the [`DataSource`]
//! | op | `attrs` of | `read_range` of |
//! | --- | --- | --- |
//! | create, mkdir, mknod, symlink | `path`, its parent | |
//! | link | `new_path`, its parent | |
//! | unlink, rmdir | the parent | |
//! | rename | `new_path` (and `path` for an exchange), both parents | |
//! | write | `path`, and its parent for a whole-file rewrite | `path` |
//! | truncate | `path` | |
//! | setxattr | `path` | |
//! | setattr, removexattr, rescan | | |
//!
//! Whenever the replica lacks what an operation needs (its target, source or parent), the
//! replayer also asks `attrs` of that path: absent at the master means a later operation
//! accounts for it ([`Applied::Obsolete`]), present means the replica has diverged
//! ([`Applied::NeedsResync`]). Parent attributes restore the directory's times, which
//! every name change bumps. Owner and times of a new object come from the master because
//! the journal records neither (InterMezzo: replay restores the recorded owner and times).

mod attributes;
mod data;
mod marks;
mod namespace;
mod source;

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

pub use marks::{InodeId, Mark, MarkStore, MarkStoreError, Recovered};
pub use source::{replaced, DataSource, DirSource};

use crate::attrs::{Attrs, FileKind};
use crate::beneath::{self, errno, is_kind, sys, xattr_is_local, Loc, Tree};

use crate::op::{JournalEntry, Op, RelPath, Timestamp, WriteSource};

pub use crate::beneath::TEMP_PREFIX;

/// Bytes asked of the data source at a time.
const CHUNK: u64 = 8 << 20;

/// What applying one operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The replica changed.
    Changed,
    /// The replica already reflected the operation; nothing was changed.
    AlreadyApplied,
    /// The object the operation concerns is gone at the master too, so a later operation
    /// in the journal (an unlink, a rename) accounts for it; or the operation carries no
    /// value to apply (a change of times capture could not read). Nothing was changed; the
    /// caller fetches the path again from the master's current state.
    Obsolete,
    /// The replica differs from what the operation presumes (a type mismatch, a missing
    /// parent or file the master still has), or the operation was a rescan: the caller
    /// must compare the subtree at `path` with the master as a whole.
    NeedsResync { path: RelPath },
}

/// Why an operation was not applied. Each is about one operation; the replica is left as
/// it was before it, except where the message says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot open the replica root {}: {source}; create the directory or correct --root", root.display())]
    OpenRoot { root: PathBuf, source: io::Error },
    #[error("this kernel lacks openat2 (Linux 5.6 or later), which replay needs to keep every path beneath the root; upgrade the kernel")]
    NoOpenat2,
    #[error("refused path {path:?}: it leads outside the replica root (absolute, `..`, or through a symlink); nothing was changed. The sender is faulty or hostile, or someone planted a symlink in the replica: check both")]
    EscapesRoot { path: String },
    #[error("refused path {path:?}: {why}; nothing was changed. The sender is faulty or hostile: check its version")]
    BadPath { path: String, why: &'static str },
    #[error(
        "refused operation on {path:?}: {why}; nothing was changed. The sender is faulty or hostile: check its version"
    )]
    BadOp { path: String, why: &'static str },
    #[error("reading {path:?} from the server failed: {source}; nothing was changed: the path is fetched again once the stream is quiet")]
    Source { path: String, source: io::Error },
    #[error("{op} {path:?} failed in the replica: {source}; check the replica's file system (space, permissions), then apply the operation again or resync the path")]
    Io {
        op: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("making the replica {} durable failed: {source}; do not acknowledge anything applied since the last sync, check the replica's disk (dmesg), then restart the client", root.display())]
    Sync { root: PathBuf, source: io::Error },
    #[error("recording replay's sequence marks failed ({0}); nothing more was changed in the replica, apply the operation again once the state dir is usable")]
    Marks(#[from] MarkStoreError),
}

/// Adds the operation and path to an I/O error.
trait Ctx<T> {
    fn ctx(self, op: &'static str, path: &RelPath) -> Result<T, ReplayError>;
}

impl<T> Ctx<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &RelPath) -> Result<T, ReplayError> {
        self.map_err(|source| ReplayError::Io {
            op,
            path: path.display().into_owned(),
            source,
        })
    }
}

fn refuse_escape(path: &RelPath) -> ReplayError {
    crate::report!(Warn, "replay: paths refused", "replay: refused path {:?}: it leads outside the root", path.display());
    ReplayError::EscapesRoot {
        path: path.display().into_owned(),
    }
}

fn refuse_bad(path: &RelPath, why: &'static str) -> ReplayError {
    crate::report!(Warn, "replay: paths refused", "replay: refused path {:?}: {why}", path.display());
    ReplayError::BadPath {
        path: path.display().into_owned(),
        why,
    }
}

fn bad_op(path: &RelPath, why: &'static str) -> ReplayError {
    crate::report!(Warn, "replay: operations refused", "replay: refused operation on {:?}: {why}", path.display());
    ReplayError::BadOp {
        path: path.display().into_owned(),
        why,
    }
}

/// Checks a path from the wire against the rules in the module doc. `""` is the root.
pub(crate) fn check_rel_path(path: &RelPath) -> Result<(), ReplayError> {
    let b = path.as_bytes();
    if b.is_empty() {
        return Ok(());
    }
    if b[0] == b'/' {
        return Err(refuse_escape(path));
    }
    if b.contains(&0) {
        return Err(refuse_bad(path, "it contains a NUL byte"));
    }
    if b.len() >= libc::PATH_MAX as usize {
        return Err(refuse_bad(path, "it is longer than PATH_MAX"));
    }
    // `..` anywhere is refused even where it would stay inside (`a/../b`): the journal never
    // produces one, so it can only come from a faulty or hostile sender.
    if b.split(|&c| c == b'/').any(|c| c == b"..") {
        return Err(refuse_escape(path));
    }
    for c in b.split(|&c| c == b'/') {
        if c.is_empty() {
            return Err(refuse_bad(path, "it has an empty component"));
        }
        if c == b"." {
            return Err(refuse_bad(path, "it has a `.` component"));
        }
        if c.len() > 255 {
            return Err(refuse_bad(path, "a component is longer than 255 bytes"));
        }
        if c.starts_with(TEMP_PREFIX) {
            return Err(refuse_bad(
                path,
                "it uses the prefix .imezzo-tmp., reserved for replay's temporary files",
            ));
        }
    }
    Ok(())
}

/// A checked path as (parent, final component); `None` for the root.
fn split(path: &RelPath) -> Result<Option<(RelPath, CString)>, ReplayError> {
    check_rel_path(path)?;
    let b = path.as_bytes();
    if b.is_empty() {
        return Ok(None);
    }
    let (parent, name) = match b.iter().rposition(|&c| c == b'/') {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (&b[..0], b),
    };
    let name = CString::new(name).map_err(|_| refuse_bad(path, "it contains a NUL byte"))?;
    Ok(Some((RelPath(parent.to_vec()), name)))
}

/// A name in an open parent directory.
struct Entry {
    parent: OwnedFd,
    parent_rel: RelPath,
    name: CString,
}

impl Entry {
    fn loc(&self) -> Loc {
        Loc::entry(self.parent.as_fd(), &self.name)
    }
}

/// The outcome of looking up an operation's parent directory.
enum Lookup<T> {
    Found(T),
    /// The parent is missing, or is not a directory, in the replica.
    Missing,
    /// A directory on the way was placed by an operation after this one: the operation
    /// concerns an earlier object of that name, and the replica is already past it.
    Stale,
}

/// The object an attribute operation names: an entry, or the root itself.
enum Target {
    Root,
    Entry(Entry),
}

/// A temporary name in a directory, removed on drop unless the object was renamed into
/// place: an error at any step leaves nothing behind.
struct Temp<'a> {
    dir: BorrowedFd<'a>,
    name: CString,
    is_dir: bool,
    armed: bool,
}

impl<'a> Temp<'a> {
    fn new(dir: BorrowedFd<'a>, is_dir: bool) -> Temp<'a> {
        Temp {
            dir,
            name: beneath::temp_name(),
            is_dir,
            armed: true,
        }
    }

    fn loc(&self) -> Loc {
        Loc::entry(self.dir, &self.name)
    }

    /// Renames the temporary over `name` in the same directory; the temporary is gone
    /// either way once this returns.
    fn rename_to(mut self, name: &CStr) -> io::Result<()> {
        sys::renameat2(self.dir, &self.name, self.dir, name, 0)?;
        self.armed = false;
        Ok(())
    }
}

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        if self.armed {
            match sys::unlinkat(self.dir, &self.name, self.is_dir) {
                Ok(()) => {}
                Err(e) if errno(&e) == libc::ENOENT => {}
                Err(e) => log::warn!("replay: could not remove temporary {:?}: {e}", self.name),
            }
        }
    }
}

/// How to create one object.
enum Make {
    Regular {
        mode: u32,
    },
    Dir {
        mode: u32,
    },
    /// fifo, socket, character or block device: `mode` includes the type bits.
    Node {
        mode: u32,
        rdev: u64,
    },
    Symlink {
        target: CString,
    },
}

impl Make {
    fn kind(&self) -> FileKind {
        match self {
            Make::Regular { .. } => FileKind::Regular,
            Make::Dir { .. } => FileKind::Directory,
            Make::Node { mode, .. } => FileKind::from_mode(*mode).unwrap_or(FileKind::Fifo),
            Make::Symlink { .. } => FileKind::Symlink,
        }
    }

    fn op_name(&self) -> &'static str {
        match self {
            Make::Regular { .. } => "create",
            Make::Dir { .. } => "mkdir",
            Make::Node { .. } => "mknod",
            Make::Symlink { .. } => "symlink",
        }
    }

    /// Whether the existing object `st` at `loc` is what this would create.
    fn matches(&self, st: &libc::stat, loc: &Loc) -> io::Result<bool> {
        Ok(match self {
            Make::Regular { .. } => is_kind(st, libc::S_IFREG),
            Make::Dir { .. } => is_kind(st, libc::S_IFDIR),
            Make::Node { mode, rdev } => {
                let fmt = mode & libc::S_IFMT;
                is_kind(st, fmt)
                    && (!matches!(fmt, libc::S_IFCHR | libc::S_IFBLK) || st.st_rdev == *rdev)
            }
            Make::Symlink { target } => {
                is_kind(st, libc::S_IFLNK) && loc.readlink()? == target.to_bytes()
            }
        })
    }

    fn create_at(&self, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
        match self {
            Make::Regular { mode } => sys::openat(
                dir,
                name,
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                mode & 0o7777,
            )
            .map(drop),
            Make::Dir { mode } => sys::mkdirat(dir, name, mode & 0o7777),
            Make::Node { mode, rdev } => sys::mknodat(dir, name, *mode, *rdev),
            Make::Symlink { target } => sys::symlinkat(target, dir, name),
        }
    }

    fn mode(&self) -> Option<u32> {
        match self {
            Make::Regular { mode } | Make::Dir { mode } | Make::Node { mode, .. } => {
                Some(mode & 0o7777)
            }
            Make::Symlink { .. } => None,
        }
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Create { .. } => "create",
        Op::Mkdir { .. } => "mkdir",
        Op::Mknod { .. } => "mknod",
        Op::Symlink { .. } => "symlink",
        Op::Link { .. } => "link",
        Op::Unlink { .. } => "unlink",
        Op::Rmdir { .. } => "rmdir",
        Op::Rename { .. } => "rename",
        Op::Write { .. } => "write",
        Op::Truncate { .. } => "truncate",
        Op::Setattr { .. } => "setattr",
        Op::Setxattr { .. } => "setxattr",
        Op::Removexattr { .. } => "removexattr",
        Op::Rescan { .. } => "rescan",
        Op::Relist { .. } => "relist",
    }
}

/// Checks an xattr name from the wire.
fn xattr_name(path: &RelPath, name: &RelPath) -> Result<CString, ReplayError> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() > 255 {
        return Err(bad_op(
            path,
            "the xattr name is empty or longer than 255 bytes",
        ));
    }
    CString::new(b).map_err(|_| bad_op(path, "the xattr name contains a NUL byte"))
}

/// Replays journal operations beneath one replica root. See the module doc.
#[derive(Debug)]
pub struct Replayer {
    /// `O_PATH | O_DIRECTORY`: every lookup starts here.
    root: Tree,
    root_id: InodeId,
    volume: u64,
    marks: MarkStore,
    /// Temporaries `open` removed before a store was attached: [`Replayer::with_marks`]
    /// removes their marks, which an interrupted create may have written ahead (M2).
    swept: Vec<InodeId>,
    /// Names (valid after their op) whose object an op judged against objects of unknown
    /// moment: see [`Replayer::take_doubts`].
    doubts: Vec<RelPath>,
}

/// The replica's changes up to one moment and their marks, made durable by
/// [`DurablePoint::run`] on any thread: see [`Replayer::begin_sync`].
pub struct DurablePoint {
    fd: OwnedFd,
    root: PathBuf,
    marks: Option<marks::PendingCommit>,
}

impl DurablePoint {
    /// `syncfs` of the replica's file system, then the marks' commit (M3: the tree first;
    /// marks committed before it could describe placements a power cut takes back).
    /// Returns what [`Replayer::end_sync`] takes.
    pub fn run(self) -> Result<Option<u64>, ReplayError> {
        sys::syncfs(self.fd.as_fd()).map_err(|source| ReplayError::Sync { root: self.root, source })?;
        Ok(match self.marks {
            Some(c) => Some(c.run()?),
            None => None,
        })
    }
}

impl Replayer {
    /// Opens the replica root (which must exist) and removes the temporaries a crash may
    /// have left: one walk of the tree's directories.
    pub fn open(root: &Path) -> Result<Replayer, ReplayError> {
        let tree = Tree::open(root).map_err(|source| ReplayError::OpenRoot {
            root: root.to_path_buf(),
            source,
        })?;
        // Probe openat2 now rather than fail every operation later.
        match tree.open_at(b"", libc::O_PATH | libc::O_DIRECTORY) {
            Ok(_) => {}
            Err(e) if errno(&e) == libc::ENOSYS => return Err(ReplayError::NoOpenat2),
            Err(source) => {
                return Err(ReplayError::OpenRoot {
                    root: root.to_path_buf(),
                    source,
                })
            }
        }
        let root_st = sys::fstat(tree.fd()).map_err(|source| ReplayError::OpenRoot {
            root: root.to_path_buf(),
            source,
        })?;
        let root_id = InodeId::of(&root_st);
        let mut marks = MarkStore::in_memory();
        marks.bind_root(root_id)?;
        let mut r = Replayer {
            root: tree,
            root_id,
            volume: 0,
            marks,
            swept: Vec::new(),
            doubts: Vec::new(),
        };
        let (n, swept) = r.sweep()?;
        r.swept = swept;
        if n > 0 {
            log::info!(
                "replay: removed {n} temporaries left by an interrupted replay in {}",
                root.display()
            );
        }
        Ok(r)
    }

    /// Sets the volume recorded in sequence marks: marks from another volume, or from a
    /// journal restarted from scratch under a new volume id, are then ignored. Defaults to 0.
    pub fn with_volume(mut self, volume: u64) -> Replayer {
        self.volume = volume;
        self
    }

    /// [`Replayer::with_volume`] on a replayer already in use (the volume is known once the
    /// server has answered).
    pub fn set_volume(&mut self, volume: u64) {
        self.volume = volume;
    }

    /// Keeps sequence marks in `store` (by default they live in memory, for this replayer
    /// only): `Replayer::open(root)?.with_marks(MarkStore::open(state_dir.join("replay-marks.redb"))?)`.
    /// A store that describes another replica root is emptied. Marks written ahead for the
    /// temporaries `open` removed are dropped (M2). Check [`MarkStore::recovered`] before:
    /// [`Recovered::Dropped`] means the replica must be compared with the master.
    pub fn with_marks(mut self, mut store: MarkStore) -> Result<Replayer, ReplayError> {
        store.bind_root(self.root_id)?;
        for id in self.swept.drain(..) {
            store.remove(id);
        }
        self.marks = store;
        Ok(self)
    }

    /// The sequence marks, for inspection.
    pub fn marks(&self) -> &MarkStore {
        &self.marks
    }

    /// Hands the store back, unsynced changes included (as a crash would leave them, M4).
    pub fn into_marks(self) -> MarkStore {
        self.marks
    }

    /// Names the ops applied since the last call left holding what may not be the master's,
    /// valid after those ops: the caller compares them with the master once no entry still
    /// to come moves them (the client's pending set). An unmarked object was placed by a
    /// full sync, whose walk raced with the master: it may show a moment before or after an
    /// op. Where replay decided against such an object (moved an unmarked source over
    /// another object, swapped one, or replaced one of another kind), either guess can be
    /// wrong. Replayed, a `RENAME_WHITEOUT` the walk had seen done moved the whiteout over
    /// the renamed file (soak seed 796580863014 on XFS); judged done, the whiteout's
    /// `mknod` then replaced a fifo the walk had placed from a later moment (seed 11 on
    /// ext4). Only names that then differ from what the master holds there now are kept
    /// (kind, and a non-directory's size and mtime), and a replayed op marks what it
    /// places, so only the first ops after a full sync over old objects can raise one.
    pub fn take_doubts(&mut self) -> Vec<RelPath> {
        std::mem::take(&mut self.doubts)
    }

    /// The replica root this replayer was opened on.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Applies one operation without sequence marks: idempotent by presence only.
    pub fn apply(&mut self, op: &Op, data: &mut dyn DataSource) -> Result<Applied, ReplayError> {
        self.apply_inner(op, None, data)
    }

    /// Applies one journal entry, recording and honouring sequence marks, so replaying a
    /// batch again after a crash converges (see the module doc). Apply entries in
    /// sequence order.
    pub fn apply_entry(
        &mut self,
        entry: &JournalEntry,
        data: &mut dyn DataSource,
    ) -> Result<Applied, ReplayError> {
        self.apply_inner(&entry.op, Some(entry.seq), data)
    }

    /// Makes every change applied so far durable: `syncfs` of the replica's file system
    /// (one call per batch however many files it touched), then one commit of the sequence
    /// marks (M3). Acknowledge a seq only after this returns `Ok`.
    pub fn sync(&mut self) -> Result<(), ReplayError> {
        let point = self.begin_sync()?;
        let generation = point.run()?;
        self.end_sync(generation)
    }

    /// [`Replayer::sync`] in three steps, so that the slow middle one runs on another
    /// thread while this replayer goes on applying: takes the marks of every change applied
    /// so far into a [`DurablePoint`], whose `run` syncs the replica's file system and then
    /// commits them; pass its result to [`Replayer::end_sync`] before the next `begin_sync`
    /// (or `sync`). Changes applied meanwhile are synced or not by that `syncfs`, but their
    /// marks wait for the next durable point: the durable tree may be ahead of the durable
    /// marks, never behind them (M3).
    pub fn begin_sync(&mut self) -> Result<DurablePoint, ReplayError> {
        // syncfs refuses O_PATH descriptors: open the root for reading just for this.
        let fd = sys::openat(self.root.fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0).map_err(|source| {
            ReplayError::Sync {
                root: self.root.path().to_path_buf(),
                source,
            }
        })?;
        Ok(DurablePoint {
            fd,
            root: self.root.path().to_path_buf(),
            marks: self.marks.begin_commit(),
        })
    }

    /// Ends what [`Replayer::begin_sync`] began, with what its [`DurablePoint::run`] returned.
    pub fn end_sync(&mut self, generation: Option<u64>) -> Result<(), ReplayError> {
        if let Some(g) = generation {
            self.marks.end_commit(g)?;
        }
        Ok(())
    }

    /// The link count of the non-directory at `path` on the replica; `None` when nothing,
    /// or a directory, is there.
    pub fn nlink(&self, path: &RelPath) -> Result<Option<u64>, ReplayError> {
        let Lookup::Found(t) = self.target(path, None)? else {
            return Ok(None);
        };
        let st = self.target_loc(&t).stat().ctx("stat", path)?;
        Ok(st
            .filter(|st| !is_kind(st, libc::S_IFDIR))
            .map(|st| st.st_nlink as u64))
    }

    /// The shallowest proper ancestor of `path` that is not a directory of the replica
    /// (absent, or a file or device where the master has a directory); `None` when every
    /// one is, or when that ancestor is a symlink (never replaced for a path beneath it:
    /// replay refuses such a path, loudly, as leading outside the root).
    pub fn missing_ancestor(&self, path: &RelPath) -> Result<Option<RelPath>, ReplayError> {
        let bytes = path.as_bytes();
        for (i, _) in bytes.iter().enumerate().filter(|(_, &b)| b == b'/') {
            let prefix = &bytes[..i];
            if self.root.open_dir(prefix).ctx("stat", path)?.is_some() {
                continue;
            }
            // Its parent is a directory (checked the step before, or the root).
            let st = match self.root.parent(prefix).ctx("stat", path)? {
                Some((dir, name)) => Loc::entry(dir.as_fd(), &name).stat().ctx("stat", path)?,
                None => None,
            };
            if st.is_some_and(|st| is_kind(&st, libc::S_IFLNK)) {
                return Ok(None);
            }
            return Ok(Some(RelPath(prefix.to_vec())));
        }
        Ok(None)
    }

    /// Removes every `.imezzo-tmp.*` beneath the root, and their marks; returns how many.
    pub fn sweep_temps(&mut self) -> Result<usize, ReplayError> {
        let (n, freed) = self.sweep()?;
        for id in freed {
            self.marks.remove(id);
        }
        Ok(n)
    }

    /// Removes every temporary; returns how many, and the objects freed.
    fn sweep(&mut self) -> Result<(usize, Vec<InodeId>), ReplayError> {
        let root = RelPath::default();
        let mut removed = 0;
        let mut freed = Vec::new();
        // Directories to visit by path, not by open fd, so a wide tree does not exhaust
        // descriptors.
        let mut queue: Vec<Vec<u8>> = vec![Vec::new()];
        while let Some(rel) = queue.pop() {
            let c = if rel.is_empty() {
                c".".to_owned()
            } else {
                sys::cstring(&rel).ctx("sweep", &root)?
            };
            let dir = match sys::openat2(
                self.root.fd(),
                &c,
                libc::O_RDONLY | libc::O_DIRECTORY,
                sys::RESOLVE_STRICT,
            ) {
                Ok(fd) => fd,
                // Gone, replaced, or too deep to name: nothing of ours to find there.
                Err(e)
                    if matches!(
                        errno(&e),
                        libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::ENAMETOOLONG
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e).ctx("sweep", &RelPath(rel)),
            };
            for (name, is_dir) in sys::read_dir(dir.as_fd()).ctx("sweep", &RelPath(rel.clone()))? {
                if name.starts_with(TEMP_PREFIX) {
                    let c = sys::cstring(&name).ctx("sweep", &root)?;
                    beneath::remove_tree(dir.as_fd(), &c, &mut |st| freed.push(InodeId::of(st)))
                        .ctx("sweep", &RelPath(rel.clone()))?;
                    removed += 1;
                } else if is_dir {
                    let mut sub = rel.clone();
                    if !sub.is_empty() {
                        sub.push(b'/');
                    }
                    sub.extend_from_slice(&name);
                    queue.push(sub);
                }
            }
        }
        Ok((removed, freed))
    }

    fn apply_inner(
        &mut self,
        op: &Op,
        seq: Option<u64>,
        data: &mut dyn DataSource,
    ) -> Result<Applied, ReplayError> {
        let doubts_before = self.doubts.len();
        let r = match op {
            Op::Create { path, mode } => self.make(path, Make::Regular { mode: *mode }, seq, data),
            Op::Mkdir { path, mode } => self.make(path, Make::Dir { mode: *mode }, seq, data),
            Op::Mknod { path, mode, rdev } => {
                let make = match mode & libc::S_IFMT {
                    0 | libc::S_IFREG => Make::Regular { mode: *mode },
                    libc::S_IFIFO | libc::S_IFCHR | libc::S_IFBLK | libc::S_IFSOCK => Make::Node {
                        mode: *mode,
                        rdev: *rdev,
                    },
                    _ => {
                        return Err(bad_op(
                            path,
                            "mknod of a type that is not a fifo, socket, device or regular file",
                        ))
                    }
                };
                self.make(path, make, seq, data)
            }
            Op::Symlink { path, target } => {
                let t = target.as_bytes();
                if t.is_empty() || t.contains(&0) {
                    return Err(bad_op(
                        path,
                        "the symlink target is empty or contains a NUL byte",
                    ));
                }
                let target = CString::new(t)
                    .map_err(|_| bad_op(path, "the symlink target contains a NUL byte"))?;
                self.make(path, Make::Symlink { target }, seq, data)
            }
            Op::Link { path, new_path } => self.link(path, new_path, seq, data),
            Op::Unlink { path } => self.remove(path, false, seq, data),
            Op::Rmdir { path } => self.remove(path, true, seq, data),
            // RENAME_NOREPLACE is not passed on: the master's rename succeeded, so the
            // destination was free there, and whatever the replica has in its place is stale.
            Op::Rename {
                path,
                new_path,
                exchange,
                noreplace: _,
            } => self.rename(path, new_path, *exchange, seq, data),
            Op::Write {
                path,
                offset,
                len,
                ino,
                source,
                mode,
            } => {
                let len = if shifts_to_end(*source, *mode) { u64::MAX - *offset } else { *len };
                self.write(path, *offset, len, *ino, seq, data)
            }
            Op::Truncate { path, size } => self.truncate(path, *size, seq, data),
            Op::Setattr {
                path,
                mode,
                uid,
                gid,
                atime,
                mtime,
            } => self.setattr(path, *mode, *uid, *gid, *atime, *mtime, seq, data),
            Op::Setxattr { path, name } => self.setxattr(path, name, seq, data),
            Op::Removexattr { path, name } => self.removexattr(path, name, seq, data),
            Op::Rescan { path, .. } | Op::Relist { path, .. } => {
                check_rel_path(path)?;
                Ok(Applied::NeedsResync { path: path.clone() })
            }
        };
        match &r {
            Ok(a) => log::debug!("replay: {} {:?}: {a:?}", op_name(op), op.path().display()),
            // One kind per class of failure, so a summary line says which class it counts.
            // The master moved on since the entry (the file renamed, removed or replaced): an
            // ordinary race under a busy tree, repaired from the master's current state.
            Err(e @ ReplayError::Source { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                crate::report!(Info, "replay: operations whose object the server no longer had (fetched again once quiet)", "replay: {e}")
            }
            Err(e @ ReplayError::Source { .. }) => {
                crate::report!(Warn, "replay: operations whose master state could not be read", "replay: {e}")
            }
            Err(e @ ReplayError::Io { .. }) => {
                crate::report!(Warn, "replay: operations that failed on the replica", "replay: {e}")
            }
            Err(e @ (ReplayError::EscapesRoot { .. } | ReplayError::BadPath { .. } | ReplayError::BadOp { .. })) => {
                crate::report!(Warn, "replay: operations refused", "replay: {e}")
            }
            Err(e) => crate::report!(Warn, "replay: operations that failed", "replay: {e}"),
        }
        self.keep_real_doubts(doubts_before, data);
        r
    }

    /// Drops the doubts the last op raised (from index `from`) where the replica now holds
    /// what the master holds there (see `looks_like`): the op's outcome agrees with the
    /// master's present, whichever moment the full sync's objects were of. (A file a full
    /// sync placed, renamed over another, is then not fetched again whole.)
    fn keep_real_doubts(&mut self, from: usize, data: &mut dyn DataSource) {
        let raised: Vec<RelPath> = self.doubts.drain(from..).collect();
        for path in raised {
            let here = match self.target(&path, None) {
                Ok(Lookup::Found(t)) => self.target_loc(&t).stat().ok().flatten(),
                _ => None,
            };
            let agrees = match (here, self.master(&path, data)) {
                (Some(st), Ok(Some(a))) => namespace::looks_like(&st, &a),
                _ => false,
            };
            if !agrees {
                self.doubts.push(path);
            }
        }
    }

    // ---- lookups -------------------------------------------------------------------

    /// Opens the directory `parent` beneath the root for the operation `seq`.
    fn open_dir(
        &self,
        path: &RelPath,
        parent: &RelPath,
        seq: Option<u64>,
    ) -> Result<Lookup<OwnedFd>, ReplayError> {
        let open = |dir: BorrowedFd<'_>, rel: &[u8]| -> Result<Option<OwnedFd>, ReplayError> {
            let c = if rel.is_empty() {
                c".".to_owned()
            } else {
                sys::cstring(rel).ctx("resolve", path)?
            };
            match sys::openat2(
                dir,
                &c,
                libc::O_PATH | libc::O_DIRECTORY,
                sys::RESOLVE_STRICT,
            ) {
                Ok(fd) => Ok(Some(fd)),
                Err(e) => match errno(&e) {
                    libc::ENOENT | libc::ENOTDIR => Ok(None),
                    // ELOOP: a symlink in the chain (RESOLVE_NO_SYMLINKS); EXDEV: the walk
                    // would have left the root.
                    libc::ELOOP | libc::EXDEV => Err(refuse_escape(path)),
                    libc::ENOSYS => Err(ReplayError::NoOpenat2),
                    _ => Err(e).ctx("resolve", path),
                },
            }
        };
        let (Some(s), true, false) = (seq, self.may_meet_later(seq), parent.as_bytes().is_empty())
        else {
            return Ok(
                open(self.root.fd(), parent.as_bytes())?.map_or(Lookup::Missing, Lookup::Found)
            );
        };
        // Replaying again after a crash, a directory on the way may be a later one of the
        // same name (`rename x z; mkdir x`): an operation from before would then land in
        // the wrong directory. So walk one component at a time and check each mark.
        let mut dir: Option<OwnedFd> = None;
        for comp in parent.as_bytes().split(|&c| c == b'/') {
            let at = dir.as_ref().map_or(self.root.fd(), |d| d.as_fd());
            let Some(next) = open(at, comp)? else {
                return Ok(Lookup::Missing);
            };
            let st = sys::fstat(next.as_fd()).ctx("resolve", path)?;
            if self.mark(&st).is_some_and(|m| m.seq > s) {
                return Ok(Lookup::Stale);
            }
            dir = Some(next);
        }
        Ok(dir.map_or(Lookup::Missing, Lookup::Found))
    }

    /// The entry `path` names, which must not be the root.
    fn entry(
        &self,
        path: &RelPath,
        op: &'static str,
        seq: Option<u64>,
    ) -> Result<Lookup<Entry>, ReplayError> {
        let Some((parent_rel, name)) = split(path)? else {
            return Err(bad_op(
                path,
                match op {
                    "write" | "truncate" => "the root is a directory, it has no data",
                    _ => "the root itself cannot be created, removed, renamed or linked",
                },
            ));
        };
        Ok(match self.open_dir(path, &parent_rel, seq)? {
            Lookup::Found(parent) => Lookup::Found(Entry {
                parent,
                parent_rel,
                name,
            }),
            Lookup::Missing => Lookup::Missing,
            Lookup::Stale => Lookup::Stale,
        })
    }

    /// The object `path` names, the root included.
    fn target(&self, path: &RelPath, seq: Option<u64>) -> Result<Lookup<Target>, ReplayError> {
        match split(path)? {
            None => Ok(Lookup::Found(Target::Root)),
            Some((parent_rel, name)) => Ok(match self.open_dir(path, &parent_rel, seq)? {
                Lookup::Found(parent) => Lookup::Found(Target::Entry(Entry {
                    parent,
                    parent_rel,
                    name,
                })),
                Lookup::Missing => Lookup::Missing,
                Lookup::Stale => Lookup::Stale,
            }),
        }
    }

    fn target_loc(&self, t: &Target) -> Loc {
        match t {
            Target::Root => Loc::dir(self.root.fd()),
            Target::Entry(e) => e.loc(),
        }
    }

    fn master(
        &self,
        path: &RelPath,
        data: &mut dyn DataSource,
    ) -> Result<Option<Attrs>, ReplayError> {
        data.attrs(path).map_err(|source| ReplayError::Source {
            path: path.display().into_owned(),
            source,
        })
    }

    /// Records that the object at `path` is the master's as of journal seq `seq` (placed or
    /// checked by a resync from a listing at that seq): operations before `seq` on it are
    /// then already applied. Nothing there: nothing to record.
    /// `None` clears the object's mark instead: an object a resync made anew never keeps
    /// the mark of a freed object whose inode number it reuses (M6).
    pub fn mark_as_of(&mut self, path: &RelPath, seq: Option<u64>) -> Result<(), ReplayError> {
        let st = match self.root.parent(path.as_bytes()) {
            Ok(Some((dir, name))) => Loc::entry(dir.as_fd(), &name).stat(),
            Ok(None) if path.as_bytes().is_empty() => Loc::dir(self.root.fd()).stat(),
            Ok(None) => return Ok(()),
            Err(e) => Err(e),
        };
        if let Some(st) = st.ctx("mark", path)? {
            match seq {
                Some(seq) => self.marks.set(InodeId::of(&st), self.mark_for(seq, false))?,
                None => self.marks.remove(InodeId::of(&st)),
            }
        }
        Ok(())
    }

    /// What to answer when the replica lacks what an operation on `path` needs.
    fn missing(&self, path: &RelPath, data: &mut dyn DataSource) -> Result<Applied, ReplayError> {
        Ok(match self.master(path, data)? {
            None => Applied::Obsolete,
            Some(_) => Applied::NeedsResync { path: path.clone() },
        })
    }

    // ---- sequence marks ------------------------------------------------------------

    /// The mark of the object `st`, if an operation of this volume placed it.
    fn mark(&self, st: &libc::stat) -> Option<Mark> {
        self.marks
            .get(InodeId::of(st))
            .filter(|m| m.volume == self.volume)
    }

    /// Some object may carry a mark above `seq` (M7): when not, no lookup can find a later
    /// object, and the per-directory checks are skipped.
    fn may_meet_later(&self, seq: Option<u64>) -> bool {
        seq.is_some_and(|s| self.marks.max_seq(self.volume).is_some_and(|m| m > s))
    }

    /// The object `st` was placed by an operation after `seq`.
    fn placed_after(&self, st: &libc::stat, seq: Option<u64>) -> bool {
        seq.is_some_and(|s| self.mark(st).is_some_and(|m| m.seq > s))
    }

    /// The object `st` was placed by the operation `seq` or a later one.
    fn placed_since(&self, st: &libc::stat, seq: Option<u64>) -> bool {
        seq.is_some_and(|s| self.mark(st).is_some_and(|m| m.seq >= s))
    }

    /// The mark operation `seq` gives what it places at its `path`, or (`to_new_path`) what
    /// it sends to its `new_path`.
    fn mark_for(&self, seq: u64, to_new_path: bool) -> Mark {
        Mark {
            volume: self.volume,
            seq,
            to_new_path,
        }
    }

    /// Records `mark` for the object `id` *before* the change that places it (M1); `None`
    /// clears the entry, so that an object replay creates without a seq never inherits a
    /// stale one (M6). Returns the mark it replaces, for [`Replayer::unmark`].
    fn mark_ahead(&mut self, id: InodeId, mark: Option<Mark>) -> Result<Option<Mark>, ReplayError> {
        let prev = self.marks.get(id);
        match mark {
            Some(m) => self.marks.set(id, m)?,
            None => self.marks.remove(id),
        }
        Ok(prev)
    }

    /// Puts back the mark `prev` of `id` after the change it was written ahead of failed (M2).
    fn unmark(&mut self, id: InodeId, prev: Option<Mark>) {
        let r = match prev {
            Some(m) => self.marks.set(id, m),
            None => {
                self.marks.remove(id);
                Ok(())
            }
        };
        if let Err(e) = r {
            // The mark stays ahead of a change that did not happen: M2 recognises it.
            log::warn!("replay: cannot put back a sequence mark: {e}");
        }
    }

    /// The object `st` (as it was before) is gone from the tree: if that was its last name,
    /// its entry goes too (M5).
    fn forget_if_freed(&mut self, st: &libc::stat) {
        if is_kind(st, libc::S_IFDIR) || st.st_nlink <= 1 {
            self.marks.remove(InodeId::of(st));
        }
    }

    // ---- metadata ------------------------------------------------------------------

    /// Gives the object at `loc` the master's owner, mode, xattrs and times (times last,
    /// since the others change ctime only but a write would change mtime). With `prune`,
    /// xattrs the master lacks are removed too.
    fn apply_attrs(&self, loc: &Loc, a: &Attrs, prune: bool) -> io::Result<()> {
        // chown before chmod: chown clears set-user-ID and set-group-ID bits. Both before
        // xattrs: chown drops security.capability.
        loc.chown(Some(a.uid), Some(a.gid))?;
        if a.kind != FileKind::Symlink {
            loc.chmod(a.mode)?;
        }
        for (name, value) in &a.xattrs {
            if xattr_is_local(name) {
                continue;
            }
            let c = sys::cstring(name)?;
            match loc.set_xattr(&c, value) {
                Ok(()) => {}
                // A namespace this file system or host does not allow (e.g. user.* on a
                // symlink, security.* without the LSM): one attribute must not stall replay.
                Err(e) if matches!(errno(&e), libc::ENOTSUP | libc::EPERM | libc::EACCES) => {
                    crate::report!(Warn, "replay: xattrs this file system or host does not allow",
                        "replay: cannot set xattr {} on {:?}: {e}", String::from_utf8_lossy(name), loc.name())
                }
                Err(e) => return Err(e),
            }
        }
        if prune {
            for name in loc.list_xattrs()? {
                if !xattr_is_local(&name) && !a.xattrs.iter().any(|(n, _)| *n == name) {
                    loc.remove_xattr(&sys::cstring(&name)?)?;
                }
            }
        }
        loc.set_times(Some(a.atime), Some(a.mtime))
    }

    /// Puts back the master's times on a directory whose entries just changed (a name
    /// change bumps the directory's mtime, which the journal does not record).
    fn restore_dir_times(&self, dir: BorrowedFd<'_>, rel: &RelPath, data: &mut dyn DataSource) {
        match data.attrs(rel) {
            Ok(Some(a)) if a.kind == FileKind::Directory => {
                if let Err(e) = Loc::dir(dir).set_times(Some(a.atime), Some(a.mtime)) {
                    crate::report!(Warn, "replay: directory times that could not be restored",
                        "replay: cannot restore the times of directory {:?}: {e}", rel.display());
                }
            }
            Ok(_) => {}
            // The next change in this directory restores them again: not worth failing an
            // operation that is already done.
            Err(e) => log::warn!(
                "replay: cannot read the master's times of {:?}: {e}",
                rel.display()
            ),
        }
    }
}

fn found<T>(l: Lookup<T>) -> Option<T> {
    match l {
        Lookup::Found(t) => Some(t),
        Lookup::Missing | Lookup::Stale => None,
    }
}

/// The file a write's bytes come from: its name on the master and, when capture knew it,
/// its inode (bytes are never taken from another file that took the name since).
#[derive(Clone, Copy)]
struct Written<'a> {
    path: &'a RelPath,
    ino: Option<u64>,
}

/// `FALLOC_FL_COLLAPSE_RANGE` and `FALLOC_FL_INSERT_RANGE`: both move every byte after the
/// offset (and change the size), not only the range they name.
const FALLOC_FL_COLLAPSE_RANGE: u32 = 0x08;
const FALLOC_FL_INSERT_RANGE: u32 = 0x20;

/// Whether a write changed everything from its offset to the master's end, whatever its
/// length says: a collapse or insert range shifts the rest of the file, and a whole-file
/// write from the safety net (mmap, io_uring, reflink) was sized when capture saw it, maybe
/// before the write that set it off had grown the file.
fn shifts_to_end(source: Option<WriteSource>, mode: Option<u32>) -> bool {
    match source {
        Some(WriteSource::Mmap) => true,
        Some(WriteSource::Fallocate) => {
            mode.is_some_and(|m| m & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE) != 0)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_insert_and_whole_file_writes_reach_the_masters_end() {
        assert!(shifts_to_end(Some(WriteSource::Fallocate), Some(FALLOC_FL_COLLAPSE_RANGE)));
        assert!(shifts_to_end(Some(WriteSource::Fallocate), Some(FALLOC_FL_INSERT_RANGE)));
        assert!(shifts_to_end(Some(WriteSource::Mmap), None));
        // Allocating, punching and zeroing change only the range they name.
        for mode in [0, 1, 3, 0x10, 0x11] {
            assert!(!shifts_to_end(Some(WriteSource::Fallocate), Some(mode)), "{mode:#x}");
        }
        assert!(!shifts_to_end(None, None));
    }

    fn refused(p: &str) -> bool {
        check_rel_path(&RelPath::from(p)).is_err()
    }

    #[test]
    fn paths_that_leave_or_bend_the_root_are_refused() {
        for p in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/..",
            "..",
            "a//b",
            "a/",
            "./a",
            "a/./b",
            ".imezzo-tmp.1",
            "d/.imezzo-tmp.x/f",
        ] {
            assert!(refused(p), "{p:?} should be refused");
        }
        assert!(check_rel_path(&RelPath(b"a\0b".to_vec())).is_err());
        assert!(matches!(
            check_rel_path(&RelPath::from("a/../../x")),
            Err(ReplayError::EscapesRoot { .. })
        ));
        assert!(matches!(
            check_rel_path(&RelPath::from("a//b")),
            Err(ReplayError::BadPath { .. })
        ));
    }

    #[test]
    fn ordinary_paths_pass_and_split_at_the_last_slash() {
        for p in ["", "a", "a/b/c", "...", "..a", "a..", ".hidden", "a b/ü"] {
            assert!(!refused(p), "{p:?} should pass");
        }
        let (parent, name) = split(&RelPath::from("a/b/c")).unwrap().unwrap();
        assert_eq!(
            (parent.as_bytes(), name.to_bytes()),
            (&b"a/b"[..], &b"c"[..])
        );
        let (parent, name) = split(&RelPath::from("c")).unwrap().unwrap();
        assert_eq!((parent.as_bytes(), name.to_bytes()), (&b""[..], &b"c"[..]));
        assert!(split(&RelPath::from("")).unwrap().is_none());
    }
}
