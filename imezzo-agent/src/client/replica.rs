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

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::{DataEnd, FetchFail, Fetcher, Stop};
use crate::op::{RelPath, Timestamp};
use crate::protocol::{FileAttrs, FileKind, ManifestEntry};
use crate::replay::TEMP_PREFIX;
use crate::server::{cstring, fd_path, is_absent, openat2_strict, split_parent};

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
    root: PathBuf,
    /// `O_PATH | O_DIRECTORY` on the replica root.
    root_fd: Arc<OwnedFd>,
    fetcher: Fetcher,
    manifest_seq: u64,
    /// Every path the manifest named (the root excluded): what survives the final sweep.
    names: HashSet<Vec<u8>>,
    /// Directories in manifest order, for the attribute pass: (path, attrs, xattrs omitted).
    dirs: Vec<(RelPath, FileAttrs, bool)>,
    /// Directories this sync created: nothing of the replica was in them before.
    created_dirs: HashSet<Vec<u8>>,
    /// The directory the last entry was placed in: the walk lists a directory's entries one
    /// after another, so resolving the parent again for each of them is wasted work.
    last_dir: Option<(Vec<u8>, Arc<OwnedFd>)>,
    /// Hard-link group -> its first name.
    groups: HashMap<u64, RelPath>,
    /// (name, first name of its group), linked once every fetch is done.
    links: Vec<(RelPath, RelPath)>,
    fetches: Vec<FetchJob>,
    permits: Arc<Semaphore>,
    stats: FullSyncStats,
    started: Instant,
}

impl FullSync {
    pub fn new(root: &Path, fetcher: Fetcher, manifest_seq: u64) -> io::Result<FullSync> {
        let c = cstring(root.as_os_str().as_bytes())?;
        // SAFETY: NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(FullSync {
            root: root.to_path_buf(),
            // SAFETY: a fresh fd from the kernel.
            root_fd: Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }),
            fetcher,
            manifest_seq,
            names: HashSet::new(),
            dirs: Vec::new(),
            created_dirs: HashSet::new(),
            last_dir: None,
            groups: HashMap::new(),
            links: Vec::new(),
            fetches: Vec::new(),
            permits: Arc::new(Semaphore::new(FETCH_CONCURRENCY)),
            stats: FullSyncStats::default(),
            started: Instant::now(),
        })
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
        let ManifestEntry { path, attrs, xattrs_omitted, link_group, data } = entry;
        let Some((parent, name)) = split_parent(&path) else {
            self.dirs.push((path, attrs, xattrs_omitted));
            return Ok(());
        };
        if path.as_bytes().split(|&b| b == b'/').any(|c| c.starts_with(TEMP_PREFIX)) {
            log::warn!("full sync: skipped {:?}: the prefix .imezzo-tmp. is reserved for replay", path.display());
            self.stats.failed += 1;
            return Ok(());
        }
        self.names.insert(path.0.clone());
        // Placing an object may remove a directory at its path, with what is beneath: a
        // cached directory there is gone.
        if self.last_dir.as_ref().is_some_and(|(cached, _)| is_self_or_beneath(cached, path.as_bytes())) {
            self.last_dir = None;
        }
        let placed = (|| -> io::Result<()> {
            let Some(dir) = self.parent_dir(parent)? else {
                return Err(io::Error::other("its parent is not a directory of the replica"));
            };
            let name = cstring(name)?;
            // A regular file in a directory this sync made has nothing to keep, and its
            // rename replaces whatever an earlier entry of the same name left: asking what
            // is there would cost a lookup per file of a new replica for nothing.
            let existing = if attrs.kind == FileKind::Regular && self.created_dirs.contains(parent) {
                None
            } else {
                lstat_at(dir.as_fd(), &name)?
            };
            match attrs.kind {
                FileKind::Directory => {
                    match existing {
                        Some(st) if is_kind(&st, libc::S_IFDIR) => {}
                        Some(st) => {
                            remove_at(dir.as_fd(), &name, &st)?;
                            mkdir_at(dir.as_fd(), &name)?;
                            self.created_dirs.insert(path.0.clone());
                        }
                        None => {
                            mkdir_at(dir.as_fd(), &name)?;
                            self.created_dirs.insert(path.0.clone());
                        }
                    }
                    self.dirs.push((path.clone(), attrs.clone(), xattrs_omitted));
                }
                FileKind::Regular => {
                    self.regular(dir, name, existing, &path, &attrs, xattrs_omitted, link_group, data)?
                }
                FileKind::Symlink => {
                    let target = attrs
                        .symlink_target
                        .clone()
                        .ok_or_else(|| io::Error::other("a symlink without a target in the manifest"))?;
                    let same = match existing {
                        Some(st) if is_kind(&st, libc::S_IFLNK) => readlink_at(dir.as_fd(), &name)? == target,
                        _ => false,
                    };
                    let attrs = self.full_xattrs(&path, &attrs, xattrs_omitted)?;
                    if same {
                        set_attrs_at(dir.as_fd(), &name, &attrs)?;
                    } else {
                        let tmp = temp_name();
                        let t = cstring(&target)?;
                        // SAFETY: valid C strings and fd.
                        cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), tmp.as_ptr()) })?;
                        place(dir.as_fd(), &tmp, &name, &attrs)?;
                    }
                }
                FileKind::Fifo | FileKind::CharDevice | FileKind::BlockDevice | FileKind::Socket => {
                    let bits = crate::replay::FileKind::from(attrs.kind).type_bits();
                    let devices = matches!(attrs.kind, FileKind::CharDevice | FileKind::BlockDevice);
                    let same = existing.is_some_and(|st| is_kind(&st, bits) && (!devices || st.st_rdev == attrs.rdev));
                    let attrs = self.full_xattrs(&path, &attrs, xattrs_omitted)?;
                    if same {
                        set_attrs_at(dir.as_fd(), &name, &attrs)?;
                    } else {
                        let tmp = temp_name();
                        // SAFETY: valid C string and fd.
                        cvt(unsafe { libc::mknodat(dir.as_raw_fd(), tmp.as_ptr(), bits | attrs.mode, attrs.rdev) })?;
                        place(dir.as_fd(), &tmp, &name, &attrs)?;
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = placed {
            self.stats.failed += 1;
            log::warn!("full sync: cannot place {:?}: {e}", path.display());
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
        attrs: &FileAttrs,
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
        if let Some(st) = existing {
            let same = is_kind(&st, libc::S_IFREG)
                && st.st_size as u64 == attrs.size
                && st.st_mtime == attrs.mtime.sec
                && st.st_mtime_nsec == attrs.mtime.nsec as i64;
            if same {
                let attrs = self.full_xattrs(path, attrs, xattrs_omitted)?;
                set_attrs_at(dir.as_fd(), &name, &attrs)?;
                self.stats.kept_files += 1;
                return Ok(());
            }
        }
        if let Some(data) = data {
            // No fetch: a task, a stream and a round trip would cost far more than writing a
            // file this small here.
            write_inline(&self.fetcher, dir.as_fd(), &name, path, attrs, xattrs_omitted, &data)?;
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

    /// The directory `rel` beneath the root, from the one-entry cache when it is the last
    /// entry's.
    fn parent_dir(&mut self, rel: &[u8]) -> io::Result<Option<Arc<OwnedFd>>> {
        if let Some((cached, fd)) = &self.last_dir {
            if cached == rel {
                return Ok(Some(fd.clone()));
            }
        }
        let Some(fd) = open_dir(&self.root_fd, rel)? else {
            self.last_dir = None;
            return Ok(None);
        };
        let fd = Arc::new(fd);
        self.last_dir = Some((rel.to_vec(), fd.clone()));
        Ok(Some(fd))
    }

    /// The attributes with their xattrs, fetched when the manifest left them out.
    fn full_xattrs(&self, path: &RelPath, attrs: &FileAttrs, omitted: bool) -> io::Result<FileAttrs> {
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
                    self.stats.failed += 1;
                    log::warn!(
                        "full sync: the server cannot read {:?} ({why}); it is missing from the replica",
                        path.display()
                    );
                }
                Ok((path, Err(FetchFail::Local(e)))) => {
                    self.stats.failed += 1;
                    log::warn!("full sync: cannot write {:?} into the replica: {e}", path.display());
                }
                Err(e) => {
                    self.stats.failed += 1;
                    log::warn!("full sync: a fetch task failed: {e}");
                }
            }
        }
        self.fetches = pending;
        Ok(())
    }

    /// The manifest is whole: finish fetches, link, sweep, then directory attributes.
    pub fn finish(mut self, seq: u64) -> Result<FullSyncStats, Stop> {
        if seq != self.manifest_seq {
            log::warn!("full sync: the manifest ended at seq {seq}, announced at {}", self.manifest_seq);
        }
        self.reap(true)?;
        if let Some(why) = self.fetcher.lost() {
            return Err(Stop::Lost(why));
        }
        for (path, first) in std::mem::take(&mut self.links) {
            if let Err(e) = self.link(&path, &first) {
                self.stats.failed += 1;
                log::warn!("full sync: cannot link {:?} to {:?}: {e}", path.display(), first.display());
            }
        }
        self.sweep();
        for (path, attrs, omitted) in std::mem::take(&mut self.dirs).into_iter().rev() {
            let done = (|| -> io::Result<()> {
                let attrs = self.full_xattrs(&path, &attrs, omitted)?;
                match split_parent(&path) {
                    None => set_attrs_path(&fd_path(self.root_fd.as_fd(), b""), true, &attrs),
                    Some((parent, name)) => {
                        let dir = open_dir(&self.root_fd, parent)?
                            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
                        set_attrs_at(dir.as_fd(), &cstring(name)?, &attrs)
                    }
                }
            })();
            if let Err(e) = done {
                self.stats.failed += 1;
                log::warn!("full sync: cannot set the attributes of directory {:?}: {e}", path.display());
            }
        }
        self.stats.elapsed = self.started.elapsed();
        let s = &self.stats;
        log::info!(
            "full sync at seq {seq}: {} entries, {} files fetched ({} bytes), {} inline in the manifest ({} bytes), \
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
        Ok(self.stats)
    }

    /// Makes `path` a hard link of `first` (fetched or kept by now).
    fn link(&self, path: &RelPath, first: &RelPath) -> io::Result<()> {
        let (Some((fp, fname)), Some((pp, pname))) = (split_parent(first), split_parent(path)) else {
            return Err(io::Error::other("the root cannot be a hard link"));
        };
        let Some(fdir) = open_dir(&self.root_fd, fp)? else { return Ok(()) };
        let fname = cstring(fname)?;
        let Some(fst) = lstat_at(fdir.as_fd(), &fname)? else {
            // The first name was gone at the master: a later entry accounts for the group.
            return Ok(());
        };
        let pdir = open_dir(&self.root_fd, pp)?.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let pname = cstring(pname)?;
        if let Some(st) = lstat_at(pdir.as_fd(), &pname)? {
            if st.st_dev == fst.st_dev && st.st_ino == fst.st_ino {
                return Ok(());
            }
        }
        let tmp = temp_name();
        // SAFETY: valid C strings and fds.
        cvt(unsafe { libc::linkat(fdir.as_raw_fd(), fname.as_ptr(), pdir.as_raw_fd(), tmp.as_ptr(), 0) })?;
        replace(pdir.as_fd(), &tmp, &pname)
    }

    /// Removes every local object the manifest did not name, and stale temporaries.
    fn sweep(&mut self) {
        let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
        while let Some(rel) = stack.pop() {
            let dir = self.root.join(OsStr::from_bytes(&rel));
            let listing = match std::fs::read_dir(&dir) {
                Ok(l) => l,
                Err(e) => {
                    log::warn!("full sync: cannot list {}: {e}", dir.display());
                    continue;
                }
            };
            for item in listing.flatten() {
                let name = item.file_name();
                let mut child = rel.clone();
                if !child.is_empty() {
                    child.push(b'/');
                }
                child.extend_from_slice(name.as_bytes());
                let Ok(ft) = item.file_type() else { continue };
                if self.names.contains(&child) {
                    if ft.is_dir() {
                        stack.push(child);
                    }
                    continue;
                }
                let p = item.path();
                // remove_dir_all does not follow symlinks, and the walk only enters real
                // directories: nothing outside the root is touched.
                let removed = if ft.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                match removed {
                    Ok(()) => self.stats.removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        self.stats.failed += 1;
                        log::warn!("full sync: cannot remove {} (the server has no such object): {e}", p.display());
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
    attrs: &FileAttrs,
    xattrs_omitted: bool,
) -> Result<Fetched, FetchFail> {
    let (tmp, file) = create_temp(dir).map_err(FetchFail::Local)?;
    let unlink_tmp = || {
        // SAFETY: valid C string and fd.
        unsafe { libc::unlinkat(dir.as_raw_fd(), tmp.as_ptr(), 0) };
    };
    let mut bytes = 0u64;
    // The whole current file: bytes the file gained since the walk arrive now rather than
    // with the journal entry that follows.
    let end = fetcher.runtime().block_on(fetcher.data(path.clone(), 0, u64::MAX, None, &mut |at, chunk| {
        file.write_all_at(&chunk, at)?;
        bytes += chunk.len() as u64;
        Ok(())
    }));
    let result = (|| {
        match end? {
            DataEnd::Done { file_size } => file.set_len(file_size).map_err(FetchFail::Local)?,
            DataEnd::Gone => return Ok(Fetched::Gone),
        }
        finish_file(fetcher, dir, file, &tmp, name, path, attrs, xattrs_omitted).map_err(FetchFail::Local)?;
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
    attrs: &FileAttrs,
    xattrs_omitted: bool,
    data: &[u8],
) -> io::Result<()> {
    let (tmp, file) = create_temp(dir)?;
    let result = (&file)
        .write_all(data)
        .and_then(|()| finish_file(fetcher, dir, file, &tmp, name, path, attrs, xattrs_omitted));
    if result.is_err() {
        // SAFETY: valid C string and fd.
        unsafe { libc::unlinkat(dir.as_raw_fd(), tmp.as_ptr(), 0) };
    }
    result
}

/// A new, empty temporary file in `dir`, owner-only until it is given its attributes.
fn create_temp(dir: BorrowedFd<'_>) -> io::Result<(CString, File)> {
    let tmp = temp_name();
    // SAFETY: valid C string and fd.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            tmp.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from the kernel.
    Ok((tmp, File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
}

/// The last steps of a regular file whose content is written into the temporary `tmp`
/// (open as `file`): the xattrs the manifest left out are fetched, the attributes are set
/// through the open file (no path lookup), then `tmp` is renamed over `name`. The caller
/// removes `tmp` if this fails.
#[expect(clippy::too_many_arguments, reason = "the temporary, where it goes, and what it gets")]
fn finish_file(
    fetcher: &Fetcher,
    dir: BorrowedFd<'_>,
    file: File,
    tmp: &CStr,
    name: &CStr,
    path: &RelPath,
    attrs: &FileAttrs,
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
fn fetch_xattrs(fetcher: &Fetcher, path: &RelPath, mut attrs: FileAttrs) -> io::Result<FileAttrs> {
    let answer = fetcher.runtime().block_on(fetcher.attrs(vec![path.clone()]));
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

// ---- file system helpers ------------------------------------------------------------------

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn is_kind(st: &libc::stat, bits: u32) -> bool {
    st.st_mode & libc::S_IFMT == bits
}

/// The directory `rel` beneath the root, `None` when it is not one.
fn open_dir(root: &OwnedFd, rel: &[u8]) -> io::Result<Option<OwnedFd>> {
    let c = cstring(if rel.is_empty() { b"." } else { rel })?;
    match openat2_strict(root.as_fd(), &c, libc::O_PATH | libc::O_DIRECTORY) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if is_absent(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<libc::stat>> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid C string, fd and out-pointer.
    let r = unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOENT) { Ok(None) } else { Err(e) };
    }
    // SAFETY: fstatat succeeded.
    Ok(Some(unsafe { st.assume_init() }))
}

fn readlink_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: valid C string and fd; `buf` is writable for its length.
    let n = unsafe { libc::readlinkat(dir.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // Owner-only until the attribute pass at the end gives it the master's mode.
    // SAFETY: valid C string and fd.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) })
}

/// Removes what is at `name` (a directory with everything in it).
fn remove_at(dir: BorrowedFd<'_>, name: &CStr, st: &libc::stat) -> io::Result<()> {
    if is_kind(st, libc::S_IFDIR) {
        return std::fs::remove_dir_all(fd_path(dir, name.to_bytes()));
    }
    // SAFETY: valid C string and fd.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) })
}

/// Renames the temporary `tmp` (never a directory) over `name`, removing a directory there
/// if there is one (rename(2) cannot replace a directory with anything else). The rename is
/// tried first: a directory in the way is rare, and asking beforehand cost a lookup per file.
fn replace(dir: BorrowedFd<'_>, tmp: &CStr, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings and fd.
    let rename = || cvt(unsafe { libc::renameat(dir.as_raw_fd(), tmp.as_ptr(), dir.as_raw_fd(), name.as_ptr()) });
    match rename() {
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
            if let Some(st) = lstat_at(dir, name)? {
                if is_kind(&st, libc::S_IFDIR) {
                    remove_at(dir, name, &st)?;
                }
            }
            rename()
        }
        r => r,
    }
}

/// Gives the temporary `tmp` its attributes and renames it over `name`; removes it if
/// either fails.
fn place(dir: BorrowedFd<'_>, tmp: &CStr, name: &CStr, attrs: &FileAttrs) -> io::Result<()> {
    let r = set_attrs_at(dir, tmp, attrs).and_then(|()| replace(dir, tmp, name));
    if r.is_err() {
        // SAFETY: valid C string and fd.
        unsafe { libc::unlinkat(dir.as_raw_fd(), tmp.as_ptr(), 0) };
    }
    r
}

/// A fresh temporary name, reserved for replay (`.imezzo-tmp.`), unique in this process.
fn temp_name() -> CString {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut name = TEMP_PREFIX.to_vec();
    name.extend_from_slice(format!("sync-{}-{n}", std::process::id()).as_bytes());
    // No NUL can be in it.
    CString::new(name).unwrap_or_default()
}

fn set_attrs_at(dir: BorrowedFd<'_>, name: &CStr, attrs: &FileAttrs) -> io::Result<()> {
    set_attrs_path(&fd_path(dir, name.to_bytes()), false, attrs)
}

/// [`set_attrs_path`] through an open regular file.
fn set_attrs_fd(fd_ref: BorrowedFd<'_>, attrs: &FileAttrs) -> io::Result<()> {
    let fd = fd_ref.as_raw_fd();
    // SAFETY (all calls below): a valid fd and buffers.
    cvt(unsafe { libc::fchown(fd, attrs.uid, attrs.gid) })?;
    cvt(unsafe { libc::fchmod(fd, attrs.mode & 0o7777) })?;
    sync_xattrs(XattrsOf::Fd(fd_ref), &attrs.xattrs)?;
    let times = [timespec(attrs.atime), timespec(attrs.mtime)];
    cvt(unsafe { libc::futimens(fd, times.as_ptr()) })
}

fn timespec(t: Timestamp) -> libc::timespec {
    libc::timespec { tv_sec: t.sec as libc::time_t, tv_nsec: t.nsec as libc::c_long }
}

/// Owner, mode, xattrs, then times (in that order: chown clears set-id bits, and every other
/// change moves ctime only). `follow`: the path is a /proc magic link to the object itself.
fn set_attrs_path(path: &Path, follow: bool, attrs: &FileAttrs) -> io::Result<()> {
    let c = cstring(path.as_os_str().as_bytes())?;
    // SAFETY (all calls below): valid C strings and buffers.
    cvt(unsafe {
        if follow {
            libc::chown(c.as_ptr(), attrs.uid, attrs.gid)
        } else {
            libc::lchown(c.as_ptr(), attrs.uid, attrs.gid)
        }
    })?;
    if attrs.kind != FileKind::Symlink {
        cvt(unsafe { libc::chmod(c.as_ptr(), attrs.mode & 0o7777) })?;
    }
    sync_xattrs(if follow { XattrsOf::Path(&c) } else { XattrsOf::Link(&c) }, &attrs.xattrs)?;
    let times = [timespec(attrs.atime), timespec(attrs.mtime)];
    let flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) })
}

/// The object whose xattrs [`sync_xattrs`] sets.
#[derive(Clone, Copy)]
enum XattrsOf<'a> {
    /// The path, following a final symlink (a /proc magic link to the object).
    Path(&'a CStr),
    /// The path itself, not following it.
    Link(&'a CStr),
    Fd(BorrowedFd<'a>),
}

impl XattrsOf<'_> {
    fn list(self, buf: &mut [u8]) -> isize {
        let (ptr, len) = (buf.as_mut_ptr().cast(), buf.len());
        // SAFETY: a valid C string or fd; `buf` is writable for its length.
        unsafe {
            match self {
                XattrsOf::Path(p) => libc::listxattr(p.as_ptr(), ptr, len),
                XattrsOf::Link(p) => libc::llistxattr(p.as_ptr(), ptr, len),
                XattrsOf::Fd(fd) => libc::flistxattr(fd.as_raw_fd(), ptr, len),
            }
        }
    }

    fn remove(self, name: &CStr) -> libc::c_int {
        // SAFETY: valid C strings or fd.
        unsafe {
            match self {
                XattrsOf::Path(p) => libc::removexattr(p.as_ptr(), name.as_ptr()),
                XattrsOf::Link(p) => libc::lremovexattr(p.as_ptr(), name.as_ptr()),
                XattrsOf::Fd(fd) => libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()),
            }
        }
    }

    fn set(self, name: &CStr, value: &[u8]) -> libc::c_int {
        let (ptr, len) = (value.as_ptr().cast(), value.len());
        // SAFETY: valid C strings or fd; `value` is readable for its length.
        unsafe {
            match self {
                XattrsOf::Path(p) => libc::setxattr(p.as_ptr(), name.as_ptr(), ptr, len, 0),
                XattrsOf::Link(p) => libc::lsetxattr(p.as_ptr(), name.as_ptr(), ptr, len, 0),
                XattrsOf::Fd(fd) => libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), ptr, len, 0),
            }
        }
    }
}

/// Makes the object's xattrs exactly `wanted`, except the host-local SELinux label.
fn sync_xattrs(of: XattrsOf<'_>, wanted: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let n = loop {
        let r = of.list(&mut buf);
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            Some(libc::ENOTSUP) => break 0,
            _ => return Err(e),
        }
    };
    for name in buf[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        if name == b"security.selinux" || wanted.iter().any(|(w, _)| w == name) {
            continue;
        }
        if of.remove(&cstring(name)?) < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENODATA) {
                return Err(e);
            }
        }
    }
    for (name, value) in wanted {
        cvt(of.set(&cstring(name)?, value))
            .map_err(|e| io::Error::new(e.kind(), format!("xattr {}: {e}", String::from_utf8_lossy(name))))?;
    }
    Ok(())
}

/// Whether `path` is `dir` or lies beneath it (`a` holds `a` and `a/b`, not `ab`).
fn is_self_or_beneath(path: &[u8], dir: &[u8]) -> bool {
    path.strip_prefix(dir).is_some_and(|rest| rest.is_empty() || rest[0] == b'/')
}
