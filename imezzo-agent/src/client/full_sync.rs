//! Full sync: rebuilds the replica from the server's manifest, fetching only what differs.
//!
//! Entries arrive parents first. Each object is placed beneath the root through directory
//! fds opened with `openat2` (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so neither a hostile
//! manifest nor a symlink planted in the replica leads outside it. New objects are built
//! under a temporary name (`.imezzo-tmp.*`, which replay sweeps after a crash), given their
//! owner, mode, xattrs and times, then renamed into place: a reader of the replica sees the
//! old object or the whole new one.
//!
//! Regular files whose size and mtime already match are kept (a restart or a resync after
//! lost events costs a walk, not a copy). A small file whose content came inline in its
//! manifest entry is written at once, on this thread; the others are fetched whole, many at
//! once ([`FETCH_CONCURRENCY`] streams). Holes the server reports stay holes. The names of a
//! hard-link group are linked to the group's first name once its data is in.
//!
//! When the manifest ends: every fetch is awaited, links are made, every object the
//! manifest did not name is removed, and directories get their attributes last and
//! deepest first (creating or removing a child changes a directory's mtime).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::path_set::PathSet;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::{DataEnd, FetchFail, Fetcher, Stop};
use crate::attrs::{Attrs, FileKind};
use crate::beneath::{self, cstring, is_kind, set_attrs_fd, split_parent, sys, Loc, Tree};
use crate::op::RelPath;
use crate::protocol::ManifestEntry;
use crate::replay::TEMP_PREFIX;

/// Files fetched at once during a full sync, each on its own stream.
pub const FETCH_CONCURRENCY: usize = 16;
/// Finished fetches are collected every this many manifest entries.
const REAP_EVERY: u64 = 256;

/// What a full sync did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FullSyncStats {
    /// Manifest entries, the root included.
    pub entries: u64,
    /// Regular files fetched on fetch streams, and their bytes.
    pub fetched_files: u64,
    pub fetched_bytes: u64,
    /// Regular files written from the content inline in their manifest entry, and its bytes.
    pub inlined_files: u64,
    pub inlined_bytes: u64,
    /// Regular files kept because their size and mtime already matched.
    pub kept_files: u64,
    /// Local objects the manifest did not name, removed (a directory counts once).
    pub removed: u64,
    /// Objects that could not be placed (logged one by one).
    pub failed: u64,
    pub elapsed: Duration,
}

enum Fetched {
    Bytes(u64),
    Gone,
}

type FetchJob = JoinHandle<(RelPath, Result<Fetched, FetchFail>)>;

pub(crate) struct FullSync {
    /// The replica.
    tree: Arc<Tree>,
    fetcher: Fetcher,
    manifest_seq: u64,
    /// Every path the manifest named (the root excluded): what survives the final sweep.
    names: PathSet,
    /// Directories in manifest order, for the attribute pass: (path, attrs, xattrs omitted).
    dirs: Vec<(RelPath, Attrs, bool)>,
    /// Directories this sync created: nothing of the replica was in them before.
    created_dirs: HashSet<Vec<u8>>,
    /// Every directory a sync of children only kept (its own contents were not compared,
    /// see [`FullSync::names_seen`]), with whether its mtime is not the master's (see
    /// [`FullSync::kept_dirs_that_differ`]).
    kept_dirs: BTreeMap<Vec<u8>, bool>,
    /// The directory the last entry was placed in: the walk lists a directory's entries one
    /// after another, so resolving the parent again for each of them is wasted work.
    last_dir: Option<(Vec<u8>, Arc<OwnedFd>)>,
    /// Hard-link group -> its first name.
    groups: HashMap<u64, RelPath>,
    /// (name, first name of its group), linked once every fetch is done.
    links: Vec<(RelPath, RelPath)>,
    /// Replica objects (dev, ino) this sync kept in place, attributes set: see
    /// [`FullSync::keep`].
    kept: HashSet<(u64, u64)>,
    fetches: Vec<FetchJob>,
    permits: Arc<Semaphore>,
    stats: FullSyncStats,
    /// Paths that could not be placed: the worker keeps them pending, retried one by one.
    failed_paths: Vec<Vec<u8>>,
    started: Instant,
    /// Paths replay knew to differ from the master (the client's pending set): their size
    /// and mtime may match while their bytes do not (replay copies the master's times), so
    /// they are fetched, never kept.
    refetch: HashSet<Vec<u8>>,
    /// Keep only files the replica has not changed since this time (its ctime, s and ns):
    /// those replay touched since the last full sync may hold bytes of another moment than
    /// their size and mtime say (replay copies the master's times as it goes).
    untouched_since: Option<(i64, i64)>,
    /// The directory this sync makes the master's: the root for a full sync, one
    /// directory for a resync of what the server lost track of (see [`FullSync::scoped`]).
    scope: Vec<u8>,
    /// The whole subtree of `scope`, or only its children.
    recursive: bool,
    /// A full sync (from the session's manifest), not a resync of one directory.
    whole: bool,
}

impl FullSync {
    pub fn new(root: &Path, fetcher: Fetcher, manifest_seq: u64) -> io::Result<FullSync> {
        let mut sync = Self::scoped(root, fetcher, RelPath::default(), true)?;
        sync.manifest_seq = manifest_seq;
        sync.whole = true;
        Ok(sync)
    }

    /// A sync of the directory `scope` only, from a listing of it: its whole subtree, or
    /// (unless `recursive`) its children, whose own contents are left alone except for the
    /// directories this sync had to create ([`FullSync::new_dirs`]).
    pub fn scoped(root: &Path, fetcher: Fetcher, scope: RelPath, recursive: bool) -> io::Result<FullSync> {
        Ok(FullSync {
            scope: scope.0,
            recursive,
            whole: false,
            tree: Arc::new(Tree::open(root)?),
            fetcher,
            manifest_seq: 0,
            names: PathSet::default(),
            dirs: Vec::new(),
            created_dirs: HashSet::new(),
            kept_dirs: BTreeMap::new(),
            last_dir: None,
            groups: HashMap::new(),
            links: Vec::new(),
            kept: HashSet::new(),
            fetches: Vec::new(),
            permits: Arc::new(Semaphore::new(FETCH_CONCURRENCY)),
            refetch: HashSet::new(),
            untouched_since: None,
            stats: FullSyncStats::default(),
            failed_paths: Vec::new(),
            started: Instant::now(),
        })
    }

    /// Paths whose content must be fetched even when their size and mtime match.
    pub fn refetch(&mut self, paths: impl IntoIterator<Item = Vec<u8>>) {
        self.refetch.extend(paths);
    }

    /// Keeps (by size and mtime) only files whose ctime on the replica is before `t`.
    pub fn keep_only_untouched_since(&mut self, t: (i64, i64)) {
        self.untouched_since = Some(t);
    }

    /// The directories this sync created or replaced, below its scope: a sync of the
    /// children only leaves them empty, for a recursive sync of each.
    pub fn new_dirs(&self) -> Vec<Vec<u8>> {
        let mut dirs: Vec<Vec<u8>> = self.created_dirs.iter().filter(|d| **d != self.scope).cloned().collect();
        dirs.sort();
        dirs
    }

    /// The directories a sync of children only kept (a directory was at the name already)
    /// whose mtime differs from the master's: their names may differ too, so each is
    /// compared in turn. A listing does not say which directory is which: the replica's may
    /// be one the master has since moved away and replaced by another under the same name,
    /// and the entries that said so are superseded by the listing's marks.
    pub fn kept_dirs_that_differ(&self) -> Vec<Vec<u8>> {
        self.kept_dirs.iter().filter(|(_, differs)| **differs).map(|(d, _)| d.clone()).collect()
    }

    /// Every path the listing named (the scope included), each with whether it was seen
    /// whole: not for the names of hard-link groups that had no other name in the
    /// listing (their other names lie outside it, and whether the replica's object is
    /// linked to them is not known here).
    ///
    /// The scope is named only by a recursive sync, and the directories a sync of
    /// children only kept are left out: what is beneath them was not compared, so they
    /// are not the master's as of the listing. Marked so, replay would take every earlier
    /// entry for a path beneath them as meant for another directory of that name, and skip
    /// it (an xattr set while the server was down on a file two levels below a compared
    /// directory was lost so). The entries for the directory itself are replayed in order
    /// after the compare, and end where the master is.
    pub fn names_seen(&self) -> Vec<(Vec<u8>, bool)> {
        let linked: HashSet<&RelPath> = self.links.iter().map(|(_, first)| first).collect();
        let lone: HashSet<&[u8]> =
            self.groups.values().filter(|first| !linked.contains(first)).map(|p| p.as_bytes()).collect();
        let mut names: Vec<(Vec<u8>, bool)> = self
            .names
            .iter()
            .filter(|n| !self.kept_dirs.contains_key(*n) && (self.recursive || *n != self.scope))
            .map(|n| (n.to_vec(), !lone.contains(n)))
            .collect();
        if self.recursive {
            names.push((self.scope.clone(), true));
        }
        names
    }

    /// Gives up on a sync whose listing did not come whole: its fetches are awaited, and
    /// nothing is swept (what the listing did not name may well exist at the master).
    pub fn abandon(mut self) -> Result<(), Stop> {
        self.reap(true)
    }

    /// Places one manifest entry (a regular file's data may still be arriving after).
    pub fn apply(&mut self, entry: ManifestEntry) -> Result<(), Stop> {
        if let Some(why) = self.fetcher.lost() {
            return Err(Stop::Lost(why));
        }
        self.stats.entries += 1;
        if self.stats.entries.is_multiple_of(REAP_EVERY) {
            self.reap(false)?;
        }
        let ManifestEntry {
            path,
            attrs,
            xattrs_omitted,
            link_group,
            data,
        } = entry;
        let Some((parent, name)) = split_parent(path.as_bytes()) else {
            self.dirs.push((path, attrs, xattrs_omitted));
            return Ok(());
        };
        if path
            .as_bytes()
            .split(|&b| b == b'/')
            .any(|c| c.starts_with(TEMP_PREFIX))
        {
            crate::report!(Warn, "full sync: entries skipped (reserved prefix)", 
                "full sync: skipped {:?}: the prefix .imezzo-tmp. is reserved for replay",
                path.display()
            );
            self.failed(path.as_bytes());
            return Ok(());
        }
        self.names.insert(path.as_bytes());
        // Placing an object may remove a directory at its path, with what is beneath: a
        // cached directory there is gone.
        if self
            .last_dir
            .as_ref()
            .is_some_and(|(cached, _)| is_self_or_beneath(cached, path.as_bytes()))
        {
            self.last_dir = None;
        }
        // A second name of a non-regular object (symlink, device, fifo, socket) is linked to
        // its first once the manifest ends, as regular files' are (see `regular`).
        if let Some(group) = link_group.filter(|_| {
            !matches!(attrs.kind, FileKind::Regular | FileKind::Directory)
        }) {
            if let Some(first) = self.groups.get(&group) {
                self.links.push((path.clone(), first.clone()));
                return Ok(());
            }
            self.groups.insert(group, path.clone());
        }
        let placed = (|| -> io::Result<()> {
            let Some(dir) = self.parent_dir(parent)? else {
                return Err(io::Error::other(
                    "its parent is not a directory of the replica",
                ));
            };
            let name = cstring(name)?;
            // A regular file in a directory this sync made has nothing to keep, and its
            // rename replaces whatever an earlier entry of the same name left: asking what
            // is there would cost a lookup per file of a new replica for nothing.
            let existing = if attrs.kind == FileKind::Regular && self.created_dirs.contains(parent)
            {
                None
            } else {
                Loc::entry(dir.as_fd(), &name).stat()?
            };
            match attrs.kind {
                FileKind::Directory => {
                    match existing {
                        Some(st) if is_kind(&st, libc::S_IFDIR) => {
                            if !self.recursive && path.0 != self.scope {
                                let differs = st.st_mtime != attrs.mtime.sec
                                    || st.st_mtime_nsec != i64::from(attrs.mtime.nsec);
                                self.kept_dirs.insert(path.0.clone(), differs);
                            }
                        }
                        Some(_) => {
                            beneath::remove_tree(dir.as_fd(), &name, &mut |_| {})?;
                            // Owner-only until the attribute pass at the end gives it the
                            // master's mode.
                            sys::mkdirat(dir.as_fd(), &name, 0o700)?;
                            self.created_dirs.insert(path.0.clone());
                        }
                        None => {
                            sys::mkdirat(dir.as_fd(), &name, 0o700)?;
                            self.created_dirs.insert(path.0.clone());
                        }
                    }
                    self.dirs
                        .push((path.clone(), attrs.clone(), xattrs_omitted));
                }
                FileKind::Regular => self.regular(
                    dir,
                    name,
                    existing,
                    &path,
                    &attrs,
                    xattrs_omitted,
                    link_group,
                    data,
                )?,
                FileKind::Symlink => {
                    let target = attrs.symlink_target.clone().ok_or_else(|| {
                        io::Error::other("a symlink without a target in the manifest")
                    })?;
                    let same = match existing {
                        Some(st) if is_kind(&st, libc::S_IFLNK) => {
                            Loc::entry(dir.as_fd(), &name).readlink()? == target
                        }
                        _ => false,
                    };
                    let same = same && existing.is_some_and(|st| self.keep(&st, link_group));
                    let attrs = self.full_xattrs(&path, &attrs, xattrs_omitted)?;
                    if same {
                        Loc::entry(dir.as_fd(), &name).set_attrs(&attrs)?;
                    } else {
                        let tmp = beneath::temp_name();
                        sys::symlinkat(&cstring(&target)?, dir.as_fd(), &tmp)?;
                        place(dir.as_fd(), &tmp, &name, &attrs)?;
                    }
                }
                FileKind::Fifo
                | FileKind::CharDevice
                | FileKind::BlockDevice
                | FileKind::Socket => {
                    let bits = attrs.kind.type_bits();
                    let devices =
                        matches!(attrs.kind, FileKind::CharDevice | FileKind::BlockDevice);
                    let same = existing.is_some_and(|st| {
                        is_kind(&st, bits)
                            && (!devices || st.st_rdev == attrs.rdev)
                            && self.keep(&st, link_group)
                    });
                    let attrs = self.full_xattrs(&path, &attrs, xattrs_omitted)?;
                    if same {
                        Loc::entry(dir.as_fd(), &name).set_attrs(&attrs)?;
                    } else {
                        let tmp = beneath::temp_name();
                        sys::mknodat(dir.as_fd(), &tmp, bits | attrs.mode, attrs.rdev)?;
                        place(dir.as_fd(), &tmp, &name, &attrs)?;
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = placed {
            self.failed(path.as_bytes());
            crate::report!(Warn, "full sync: objects that could not be placed (fetched again later)",
                "full sync: cannot place {:?}: {e}", path.display());
        }
        Ok(())
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one manifest entry, taken apart by the caller that already matched on it"
    )]
    fn regular(
        &mut self,
        dir: Arc<OwnedFd>,
        name: CString,
        existing: Option<libc::stat>,
        path: &RelPath,
        attrs: &Attrs,
        xattrs_omitted: bool,
        link_group: Option<u64>,
        data: Option<Vec<u8>>,
    ) -> io::Result<()> {
        if let Some(group) = link_group {
            if let Some(first) = self.groups.get(&group) {
                self.links.push((path.clone(), first.clone()));
                return Ok(());
            }
            self.groups.insert(group, path.clone());
        }
        let trusted = |st: &libc::stat| {
            !self.refetch.contains(path.as_bytes())
                && self
                    .untouched_since
                    .is_none_or(|t| (st.st_ctime, st.st_ctime_nsec) < t)
        };
        if let Some(st) = existing.filter(trusted) {
            let same = is_kind(&st, libc::S_IFREG)
                && st.st_size as u64 == attrs.size
                && st.st_mtime == attrs.mtime.sec
                && st.st_mtime_nsec == attrs.mtime.nsec as i64;
            if same && self.keep(&st, link_group) {
                let attrs = self.full_xattrs(path, attrs, xattrs_omitted)?;
                Loc::entry(dir.as_fd(), &name).set_attrs(&attrs)?;
                self.stats.kept_files += 1;
                return Ok(());
            }
        }
        // A resync of one directory sees only the names of a hard-link group inside it:
        // the replica's object, when it has other names too, is brought up to date in
        // place, so the names outside the listing stay linked to it.
        if !self.whole && link_group.is_some() {
            if existing.is_some_and(|st| is_kind(&st, libc::S_IFREG) && st.st_nlink > 1) {
                let fd = sys::openat(dir.as_fd(), &name, libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK, 0)?;
                let file = File::from(fd);
                let mut eof = file.metadata()?.len();
                let size = match data {
                    Some(d) => {
                        sys::pwrite_sparse(file.as_fd(), &d, 0, eof)?;
                        d.len() as u64
                    }
                    None => {
                        let end = self.fetcher.runtime().block_on(self.fetcher.data(
                            path.clone(),
                            0,
                            u64::MAX,
                            None,
                            &mut |at, chunk| {
                                eof = sys::pwrite_sparse(file.as_fd(), chunk, at, eof)?;
                                Ok(())
                            },
                        ));
                        match end {
                            Ok(DataEnd::Done { file_size }) => file_size,
                            // Gone since the walk: a later entry accounts for it.
                            Ok(DataEnd::Gone) => return Ok(()),
                            Err(FetchFail::Lost(why)) => return Err(io::Error::new(io::ErrorKind::ConnectionAborted, why)),
                            Err(FetchFail::Unreadable(why)) => return Err(io::Error::other(format!("the server cannot read it: {why}"))),
                            Err(FetchFail::Local(e)) => return Err(e),
                        }
                    }
                };
                file.set_len(size)?;
                let attrs = self.full_xattrs(path, attrs, xattrs_omitted)?;
                set_attrs_fd(file.as_fd(), &attrs)?;
                self.stats.fetched_files += 1;
                self.stats.fetched_bytes += size;
                return Ok(());
            }
        }
        if let Some(data) = data {
            // No fetch: a task, a stream and a round trip would cost far more than writing a
            // file this small here.
            write_inline(
                &self.fetcher,
                dir.as_fd(),
                &name,
                path,
                attrs,
                xattrs_omitted,
                &data,
            )?;
            self.stats.inlined_files += 1;
            self.stats.inlined_bytes += data.len() as u64;
            return Ok(());
        }
        let rt = self.fetcher.runtime().clone();
        let permit = rt
            .block_on(self.permits.clone().acquire_owned())
            .map_err(|_| io::Error::other("the fetch limiter closed"))?;
        let fetcher = self.fetcher.clone();
        let (path, attrs) = (path.clone(), attrs.clone());
        self.fetches.push(rt.spawn_blocking(move || {
            let _permit = permit;
            let r = fetch_file(&fetcher, dir.as_fd(), &name, &path, &attrs, xattrs_omitted);
            (path, r)
        }));
        Ok(())
    }

    /// Whether the replica's object `st`, found at an entry's path and alike in kind and
    /// content, may stay and take the entry's attributes in place; when it may, it is this
    /// entry's from now on. Attributes set on an inode reach every name it has on the
    /// replica, and the replica's link groups can be stale (a name the master since
    /// replaced by another object, or unlinked and linked elsewhere): an object with other
    /// names is kept only for an entry of a link group (whose other names are linked to it
    /// at the end, and any other name of it is replaced by its own entry or swept), and
    /// only once (two entries, of two groups or not, never share one replica inode).
    /// Otherwise the entry's object is made anew and renamed over it, which leaves the
    /// inode to its other names.
    fn keep(&mut self, st: &libc::stat, link_group: Option<u64>) -> bool {
        (link_group.is_some() || st.st_nlink <= 1) && self.kept.insert((st.st_dev, st.st_ino))
    }

    /// The directory `rel` beneath the root, from the one-entry cache when it is the last
    /// entry's.
    fn parent_dir(&mut self, rel: &[u8]) -> io::Result<Option<Arc<OwnedFd>>> {
        if let Some((cached, fd)) = &self.last_dir {
            if cached == rel {
                return Ok(Some(fd.clone()));
            }
        }
        let Some(fd) = self.tree.open_dir(rel)? else {
            self.last_dir = None;
            return Ok(None);
        };
        let fd = Arc::new(fd);
        self.last_dir = Some((rel.to_vec(), fd.clone()));
        Ok(Some(fd))
    }

    /// The attributes with their xattrs, fetched when the manifest left them out.
    fn full_xattrs(&self, path: &RelPath, attrs: &Attrs, omitted: bool) -> io::Result<Attrs> {
        if !omitted {
            return Ok(attrs.clone());
        }
        fetch_xattrs(&self.fetcher, path, attrs.clone())
    }

    /// Collects finished fetches (all of them when `all`).
    fn reap(&mut self, all: bool) -> Result<(), Stop> {
        let rt = self.fetcher.runtime().clone();
        let mut pending = Vec::new();
        for job in std::mem::take(&mut self.fetches) {
            if !all && !job.is_finished() {
                pending.push(job);
                continue;
            }
            match rt.block_on(job) {
                Ok((_, Ok(Fetched::Bytes(n)))) => {
                    self.stats.fetched_files += 1;
                    self.stats.fetched_bytes += n;
                }
                // Gone since the walk: a later journal entry accounts for it.
                Ok((_, Ok(Fetched::Gone))) => {}
                Ok((_, Err(FetchFail::Lost(why)))) => return Err(Stop::Lost(why)),
                Ok((path, Err(FetchFail::Unreadable(why)))) => {
                    self.failed(path.as_bytes());
                    crate::report!(Warn, "full sync: files the server could not read", 
                        "full sync: the server cannot read {:?} ({why}); it is missing from the replica",
                        path.display()
                    );
                }
                Ok((path, Err(FetchFail::Local(e)))) => {
                    self.failed(path.as_bytes());
                    crate::report!(Warn, "full sync: files that could not be written", 
                        "full sync: cannot write {:?} into the replica: {e}",
                        path.display()
                    );
                }
                Err(e) => {
                    self.stats.failed += 1;
                    crate::report!(Warn, "full sync: fetch tasks that failed", "full sync: a fetch task failed: {e}");
                }
            }
        }
        self.fetches = pending;
        Ok(())
    }

    /// One object that could not be placed (or removed): counted, and kept for a retry.
    fn failed(&mut self, path: &[u8]) {
        self.stats.failed += 1;
        self.failed_paths.push(path.to_vec());
    }

    /// The manifest is whole: finish fetches, link, sweep, then directory attributes.
    /// Returns the stats and the paths that failed (to fetch again, one by one).
    pub fn finish(mut self, seq: u64) -> Result<(FullSyncStats, Vec<Vec<u8>>), Stop> {
        if self.whole && seq != self.manifest_seq {
            log::warn!(
                "full sync: the manifest ended at seq {seq}, announced at {}",
                self.manifest_seq
            );
        }
        self.reap(true)?;
        if let Some(why) = self.fetcher.lost() {
            return Err(Stop::Lost(why));
        }
        for (path, first) in std::mem::take(&mut self.links) {
            if let Err(e) = self.link(&path, &first) {
                self.failed(path.as_bytes());
                crate::report!(Warn, "full sync: hard links that could not be made", 
                    "full sync: cannot link {:?} to {:?}: {e}",
                    path.display(),
                    first.display()
                );
            }
        }
        self.sweep();
        for (path, attrs, omitted) in std::mem::take(&mut self.dirs).into_iter().rev() {
            let done = (|| -> io::Result<()> {
                let attrs = self.full_xattrs(&path, &attrs, omitted)?;
                match self.tree.parent(path.as_bytes())? {
                    Some((dir, name)) => Loc::entry(dir.as_fd(), &name).set_attrs(&attrs),
                    None if path.as_bytes().is_empty() => {
                        Loc::dir(self.tree.fd()).set_attrs(&attrs)
                    }
                    None => Err(io::Error::from_raw_os_error(libc::ENOENT)),
                }
            })();
            if let Err(e) = done {
                self.failed(path.as_bytes());
                crate::report!(Warn, "full sync: directories whose attributes could not be set", 
                    "full sync: cannot set the attributes of directory {:?}: {e}",
                    path.display()
                );
            }
        }
        self.stats.elapsed = self.started.elapsed();
        let s = &self.stats;
        let what = if self.whole {
            format!("full sync at seq {seq}")
        } else {
            format!("resync of {:?}{}", RelPath(self.scope.clone()).display(), if self.recursive { "" } else { " (its children)" })
        };
        // A full sync is news for the operator; a resync of one directory is counted by
        // the worker, not logged one by one.
        let level = if self.whole { log::Level::Info } else { log::Level::Debug };
        log::log!(
            level,
            "{what}: {} entries, {} files fetched ({} bytes), {} inline in the manifest ({} bytes), \
             {} kept, {} removed, {} failed, in {:.1?}",
            s.entries,
            s.fetched_files,
            s.fetched_bytes,
            s.inlined_files,
            s.inlined_bytes,
            s.kept_files,
            s.removed,
            s.failed,
            s.elapsed
        );
        Ok((self.stats, self.failed_paths))
    }

    /// Makes `path` a hard link of `first` (fetched or kept by now).
    fn link(&self, path: &RelPath, first: &RelPath) -> io::Result<()> {
        let (Some((fdir, fname)), Some((pdir, pname))) = (
            self.tree.parent(first.as_bytes())?,
            self.tree.parent(path.as_bytes())?,
        ) else {
            // The first name's directory was gone at the master (a later entry accounts for
            // the group), or the root was named as a link.
            return Ok(());
        };
        let Some(fst) = Loc::entry(fdir.as_fd(), &fname).stat()? else {
            // The first name was gone at the master: a later entry accounts for the group.
            return Ok(());
        };
        if let Some(st) = Loc::entry(pdir.as_fd(), &pname).stat()? {
            if st.st_dev == fst.st_dev && st.st_ino == fst.st_ino {
                return Ok(());
            }
        }
        let tmp = beneath::temp_name();
        sys::linkat(fdir.as_fd(), &fname, pdir.as_fd(), &tmp)?;
        replace(pdir.as_fd(), &tmp, &pname)
    }

    /// Removes every local object the manifest did not name, and stale temporaries. The
    /// walk descends by descriptor and removes with [`beneath::remove_tree`]: a directory a
    /// local user swaps for a symlink meanwhile is neither entered nor followed.
    fn sweep(&mut self) {
        let mut stack: Vec<Vec<u8>> = vec![self.scope.clone()];
        while let Some(rel) = stack.pop() {
            let shown = || RelPath(rel.clone());
            let listing = self
                .tree
                .open_dir_with(&rel, libc::O_RDONLY)
                .and_then(|dir| {
                    dir.map(|d| sys::read_dir(d.as_fd()).map(|l| (d, l)))
                        .transpose()
                });
            let (dir, listing) = match listing {
                Ok(Some(l)) => l,
                Ok(None) => continue,
                Err(e) => {
                    self.failed(&rel);
                    crate::report!(Warn, "full sync: directories that could not be listed", "full sync: cannot list {:?}: {e}", shown().display());
                    continue;
                }
            };
            for (name, is_dir) in listing {
                let mut child = rel.clone();
                if !child.is_empty() {
                    child.push(b'/');
                }
                child.extend_from_slice(&name);
                if self.names.contains(&child) {
                    if is_dir && self.recursive {
                        stack.push(child);
                    }
                    continue;
                }
                let removed =
                    cstring(&name).and_then(|c| beneath::remove_tree(dir.as_fd(), &c, &mut |_| {}));
                match removed {
                    Ok(()) => self.stats.removed += 1,
                    Err(e) => {
                        self.failed(&child);
                        crate::report!(Warn, "full sync: objects that could not be removed", 
                            "full sync: cannot remove {:?} (the server has no such object): {e}",
                            RelPath(child).display()
                        );
                    }
                }
            }
        }
    }
}

/// Fetches a whole regular file into a temporary, gives it its attributes, and renames it
/// over `name`.
fn fetch_file(
    fetcher: &Fetcher,
    dir: BorrowedFd<'_>,
    name: &CStr,
    path: &RelPath,
    attrs: &Attrs,
    xattrs_omitted: bool,
) -> Result<Fetched, FetchFail> {
    let (tmp, file) = create_temp(dir).map_err(FetchFail::Local)?;
    let unlink_tmp = || {
        let _ = sys::unlinkat(dir, &tmp, false);
    };
    let mut bytes = 0u64;
    let mut eof = 0u64;
    // The whole current file: bytes the file gained since the walk arrive now rather than
    // with the journal entry that follows.
    let end = fetcher.runtime().block_on(fetcher.data(
        path.clone(),
        0,
        u64::MAX,
        None,
        &mut |at, chunk| {
            eof = sys::pwrite_sparse(file.as_fd(), chunk, at, eof)?;
            bytes += chunk.len() as u64;
            Ok(())
        },
    ));
    let result = (|| {
        match end? {
            DataEnd::Done { file_size } => file.set_len(file_size).map_err(FetchFail::Local)?,
            DataEnd::Gone => return Ok(Fetched::Gone),
        }
        finish_file(fetcher, dir, file, &tmp, name, path, attrs, xattrs_omitted)
            .map_err(FetchFail::Local)?;
        Ok(Fetched::Bytes(bytes))
    })();
    if !matches!(result, Ok(Fetched::Bytes(_))) {
        unlink_tmp();
    }
    result
}

/// Writes a regular file whose whole content came in its manifest entry: a temporary, its
/// attributes, then the rename over `name`, exactly as a fetched file is finished.
fn write_inline(
    fetcher: &Fetcher,
    dir: BorrowedFd<'_>,
    name: &CStr,
    path: &RelPath,
    attrs: &Attrs,
    xattrs_omitted: bool,
    data: &[u8],
) -> io::Result<()> {
    let (tmp, file) = create_temp(dir)?;
    let result = sys::pwrite_sparse(file.as_fd(), data, 0, 0)
        .and_then(|_| file.set_len(data.len() as u64))
        .and_then(|()| finish_file(fetcher, dir, file, &tmp, name, path, attrs, xattrs_omitted));
    if result.is_err() {
        let _ = sys::unlinkat(dir, &tmp, false);
    }
    result
}

/// A new, empty temporary file in `dir`, owner-only until it is given its attributes.
fn create_temp(dir: BorrowedFd<'_>) -> io::Result<(CString, File)> {
    let tmp = beneath::temp_name();
    let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW;
    let fd = sys::openat(dir, &tmp, flags, 0o600)?;
    Ok((tmp, File::from(fd)))
}

/// The last steps of a regular file whose content is written into the temporary `tmp`
/// (open as `file`): the xattrs the manifest left out are fetched, the attributes are set
/// through the open file (no path lookup), then `tmp` is renamed over `name`. The caller
/// removes `tmp` if this fails.
#[expect(
    clippy::too_many_arguments,
    reason = "the temporary, where it goes, and what it gets"
)]
fn finish_file(
    fetcher: &Fetcher,
    dir: BorrowedFd<'_>,
    file: File,
    tmp: &CStr,
    name: &CStr,
    path: &RelPath,
    attrs: &Attrs,
    xattrs_omitted: bool,
) -> io::Result<()> {
    if xattrs_omitted {
        set_attrs_fd(file.as_fd(), &fetch_xattrs(fetcher, path, attrs.clone())?)?;
    } else {
        set_attrs_fd(file.as_fd(), attrs)?;
    }
    drop(file);
    replace(dir, tmp, name)
}

/// The master's current xattrs of `path` in `attrs` (for entries whose xattrs were too
/// large for the manifest).
fn fetch_xattrs(fetcher: &Fetcher, path: &RelPath, mut attrs: Attrs) -> io::Result<Attrs> {
    let answer = fetcher
        .runtime()
        .block_on(fetcher.attrs(vec![path.clone()]));
    match answer {
        Ok(mut v) => {
            if let Some(Some(current)) = v.pop() {
                attrs.xattrs = current.xattrs;
            }
            Ok(attrs)
        }
        Err(FetchFail::Local(e)) => Err(e),
        Err(FetchFail::Lost(why) | FetchFail::Unreadable(why)) => Err(io::Error::other(why)),
    }
}

/// Renames the temporary `tmp` (never a directory) over `name`, removing a directory there
/// if there is one (rename(2) cannot replace a directory with anything else). The rename is
/// tried first: a directory in the way is rare, and asking beforehand cost a lookup per file.
fn replace(dir: BorrowedFd<'_>, tmp: &CStr, name: &CStr) -> io::Result<()> {
    let rename = || sys::renameat2(dir, tmp, dir, name, 0);
    match rename() {
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
            if Loc::entry(dir, name)
                .stat()?
                .is_some_and(|st| is_kind(&st, libc::S_IFDIR))
            {
                beneath::remove_tree(dir, name, &mut |_| {})?;
            }
            rename()
        }
        r => r,
    }
}

/// Gives the temporary `tmp` its attributes and renames it over `name`; removes it if
/// either fails.
fn place(dir: BorrowedFd<'_>, tmp: &CStr, name: &CStr, attrs: &Attrs) -> io::Result<()> {
    let r = Loc::entry(dir, tmp)
        .set_attrs(attrs)
        .and_then(|()| replace(dir, tmp, name));
    if r.is_err() {
        let _ = sys::unlinkat(dir, tmp, false);
    }
    r
}

/// A fresh temporary name, reserved for replay (`.imezzo-tmp.`), unique in this process.

/// Whether `path` is `dir` or lies beneath it (`a` holds `a` and `a/b`, not `ab`).
fn is_self_or_beneath(path: &[u8], dir: &[u8]) -> bool {
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.is_empty() || rest[0] == b'/')
}
