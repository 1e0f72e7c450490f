//! Reads of the exported tree on behalf of clients: a file's current bytes, an object's
//! current attributes, and the manifest walk.
//!
//! Paths from the wire (fetch requests) are resolved beneath the export with `openat2`
//! under `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`: a client that asks
//! for `a/b` where `a` is a symlink gets `Gone`, never the bytes or attributes of whatever
//! the link points at outside the export. Journal paths never cross a symlink (capture
//! names objects by their real place in the tree), so nothing legitimate is refused.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use crate::attrs::{Attrs, FileKind};
use crate::beneath::{cstring, is_absent, sys, Loc, Tree};
use crate::op::{JournalEntry, Op, RelPath};
use crate::protocol::{Attached, AttachedData, ManifestEntry, ATTACHED_BUDGET, INLINE_DATA_MAX, MAX_ATTRS_PATHS};
use crate::replay::TEMP_PREFIX;

/// The exported tree, held open.
#[derive(Debug)]
pub(crate) struct Export {
    tree: Tree,
}

impl Export {
    pub fn open(root: &Path) -> io::Result<Export> {
        Ok(Export {
            tree: Tree::open(root)?,
        })
    }

    pub fn root(&self) -> &Path {
        self.tree.path()
    }

    /// Opens the regular file at `path` for reading; `Ok(None)` when nothing, or something
    /// other than a regular file, is there now (the client is told `Gone`).
    pub fn open_regular(&self, path: &RelPath) -> io::Result<Option<File>> {
        Ok(self
            .tree
            .open_regular(path.as_bytes())?
            .map(|(file, _)| file))
    }

    /// The whole content of the regular file at `path`, if it is still the inode `ino` and
    /// reads as exactly `size` bytes; `None` when it cannot be read or changed meanwhile
    /// (the client then fetches it). Meant for small files: everything is read at once.
    fn read_whole(&self, path: &RelPath, ino: u64, size: u64) -> Option<Vec<u8>> {
        let read = (|| -> io::Result<Option<Vec<u8>>> {
            let Some((file, meta)) = self.tree.open_regular(path.as_bytes())? else {
                return Ok(None);
            };
            if meta.ino() != ino || meta.len() != size {
                return Ok(None);
            }
            // One byte more than expected is asked for, so a file that grew is noticed.
            let mut data = Vec::with_capacity(size as usize + 1);
            io::Read::read_to_end(&mut io::Read::take(&file, size + 1), &mut data)?;
            Ok((data.len() as u64 == size).then_some(data))
        })();
        match read {
            Ok(data) => data,
            Err(e) => {
                log::debug!(
                    "manifest: {:?} will be fetched, reading it inline failed: {e}",
                    path.display()
                );
                None
            }
        }
    }

    /// What replay will ask of the master for `entries`, read now (after they were
    /// journalled): the attributes of the paths they name and of their parents, and the
    /// bytes they write, from the inode each names: small regular files whole, ranges of
    /// at most 64 KiB of larger ones.
    /// Sent ahead of the entries as `Attached`, it saves the client a fetch round trip per
    /// batch and a fetch stream per small file. Bounded by [`ATTACHED_BUDGET`]; whatever
    /// is left out (unreadable, too large, past the budget) the client fetches as before.
    pub fn attach(&self, entries: &[JournalEntry]) -> Attached {
        let mut out = Attached::default();
        let mut budget = ATTACHED_BUDGET;
        // Regular files named: (inode, size, small enough to attach whole).
        let mut found: HashMap<RelPath, (u64, u64, bool)> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        'paths: for e in entries {
            for p in e.op.asked_paths() {
                if !seen.insert(p.clone()) {
                    continue;
                }
                if out.attrs.len() >= MAX_ATTRS_PATHS {
                    break 'paths;
                }
                let Ok(a) = self.attrs_with_stat(&p) else { continue };
                let cost = 128
                    + p.0.len()
                    + a.as_ref().map_or(0, |(a, _)| {
                        crate::protocol::xattrs_size_estimate(&a.xattrs)
                            + a.symlink_target.as_ref().map_or(0, |t| t.len())
                    });
                if cost > budget {
                    break 'paths;
                }
                budget -= cost;
                let a = a.map(|(a, st)| {
                    if a.kind == FileKind::Regular {
                        found.insert(p.clone(), (st.st_ino, a.size, a.size <= INLINE_DATA_MAX));
                    }
                    a
                });
                out.attrs.push((p, a));
            }
        }
        // A file written, then renamed within the batch, holds its bytes under its new name
        // by now: they are read there, from the same inode, and attached under that name
        // (the client follows the batch's renames as well).
        let later = crate::names::later_names(entries.iter().map(|e| &e.op), |op| {
            matches!(op, Op::Write { ino: Some(_), .. })
        });
        let mut whole_done = std::collections::HashSet::new();
        for (i, e) in entries.iter().enumerate() {
            let Op::Write { path, ino: Some(ino), offset, len, .. } = &e.op else { continue };
            let path = later.get(&i).unwrap_or(path);
            let Some(&(at, size, small)) = found.get(path) else { continue };
            if at != *ino {
                continue;
            }
            if small {
                if size as usize + 64 > budget || !whole_done.insert(path.clone()) {
                    continue;
                }
                if let Some(bytes) = self.read_whole(path, at, size) {
                    budget -= size as usize + 64;
                    out.data.push(AttachedData { path: path.clone(), ino: at, offset: 0, bytes, to_eof: true });
                }
            } else if *len <= INLINE_DATA_MAX && *len as usize + 64 <= budget {
                if let Some((bytes, to_eof)) = self.read_range(path, at, *offset, *len) {
                    budget -= bytes.len() + 64;
                    out.data.push(AttachedData { path: path.clone(), ino: at, offset: *offset, bytes, to_eof });
                }
            }
        }
        out
    }

    /// Bytes `[offset, offset+len)` of the regular file at `path` if it is still the inode
    /// `ino`, and whether the file ended there; `None` when it cannot be read (the client
    /// then fetches them). Holes read as zeros.
    fn read_range(&self, path: &RelPath, ino: u64, offset: u64, len: u64) -> Option<(Vec<u8>, bool)> {
        let (file, meta) = self.tree.open_regular(path.as_bytes()).ok()??;
        if meta.ino() != ino {
            return None;
        }
        let want = len.min(meta.len().saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            match sys::pread(file.as_fd(), &mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(_) => return None,
            }
        }
        buf.truncate(got);
        Some((buf, offset + len >= meta.len() || got < want))
    }

    /// The current attributes of `path`, without following its final component;
    /// `Ok(None)` when nothing is there (or its parent is not a directory of the tree).
    pub fn attrs(&self, path: &RelPath) -> io::Result<Option<Attrs>> {
        self.tree.attrs(path)
    }

    /// [`Export::attrs`] and the `lstat` they were read with.
    pub fn attrs_with_stat(&self, path: &RelPath) -> io::Result<Option<(Attrs, libc::stat)>> {
        self.tree.attrs_with_stat(path)
    }

    /// Whether `path` names, now, the object `(dev, ino)` (false when it cannot be told).
    pub fn same_object(&self, path: &RelPath, dev: u64, ino: u64) -> bool {
        let Ok(Some((dir, name))) = self.tree.parent(path.as_bytes()) else {
            return false;
        };
        matches!(Loc::entry(dir.as_fd(), &name).stat(),
            Ok(Some(st)) if st.st_dev == dev && st.st_ino == ino)
    }

    /// Walks the tree in pre-order (the root `""` first, every directory before what it
    /// holds) and hands the manifest over in chunks of at most `chunk.entries` entries and
    /// about `chunk.data` bytes of inline data. With `inline_data`, each regular file of at
    /// most [`INLINE_DATA_MAX`] bytes carries its content (a link group's first name only:
    /// the others are links to it). `sink` returns false to stop the walk (the client went
    /// away). Replay's temporaries are left out; other file systems mounted inside the
    /// export are listed but not entered (capture does not see into them).
    pub fn walk(
        &self,
        inline_data: bool,
        chunk: WalkChunk,
        sink: &mut dyn FnMut(Vec<ManifestEntry>) -> bool,
    ) -> io::Result<WalkStats> {
        self.walk_from(&RelPath::default(), true, inline_data, chunk, sink)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the exported directory disappeared"))
    }

    /// [`Export::walk`] from the directory `scope` (its first entry), through its whole
    /// subtree or, unless `recursive`, its children only. `Ok(None)` when no directory is at
    /// `scope` now. Link groups are numbered within this walk only.
    pub fn walk_from(
        &self,
        scope: &RelPath,
        recursive: bool,
        inline_data: bool,
        chunk: WalkChunk,
        sink: &mut dyn FnMut(Vec<ManifestEntry>) -> bool,
    ) -> io::Result<Option<WalkStats>> {
        let Some((root_attrs, _)) = self.tree.attrs_with_stat(scope)? else {
            return Ok(None);
        };
        if root_attrs.kind != FileKind::Directory {
            return Ok(None);
        }
        // Directories of another file system are listed, never entered.
        let Some((_, root_st)) = self.tree.attrs_with_stat(&RelPath::default())? else {
            return Err(io::Error::new(io::ErrorKind::NotFound, "the exported directory disappeared"));
        };
        let mut stats = WalkStats::default();
        let mut groups: HashMap<(u64, u64), u64> = HashMap::new();
        let mut batch = Vec::with_capacity(chunk.entries);
        let mut batch_data = 0usize;
        batch.push(ManifestEntry {
            path: scope.clone(),
            attrs: root_attrs,
            xattrs_omitted: false,
            link_group: None,
            data: None,
        });
        let mut stack: Vec<Vec<u8>> = vec![scope.0.clone()];
        while let Some(dir_rel) = stack.pop() {
            let shown = || self.root().join(OsStr::from_bytes(&dir_rel));
            // Removed or replaced (by a symlink too) while we walked: the journal accounts for it.
            let Some(dir) = self.tree.open_dir_with(&dir_rel, libc::O_RDONLY)? else {
                continue;
            };
            let listing = match sys::read_dir(dir.as_fd()) {
                Ok(l) => l,
                Err(e) if is_absent(&e) => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("listing {}: {e}", shown().display()),
                    ))
                }
            };
            for (name, _) in listing {
                if name.starts_with(TEMP_PREFIX) {
                    continue;
                }
                let mut rel = dir_rel.clone();
                if !rel.is_empty() {
                    rel.push(b'/');
                }
                rel.extend_from_slice(&name);
                let path = || self.root().join(OsStr::from_bytes(&rel));
                let (attrs, st) = match Loc::entry(dir.as_fd(), &cstring(&name)?).attrs() {
                    Ok(Some(a)) => a,
                    Ok(None) => continue,
                    Err(e) if is_absent(&e) => continue,
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("{}: {e}", path().display()),
                        ))
                    }
                };
                let regular = attrs.kind == FileKind::Regular;
                // (group, whether this is the group's first name)
                // Any object but a directory can have several names (hard links of
                // symlinks, devices, fifos and sockets too): each group is one object.
                let link_group = if attrs.kind != FileKind::Directory && st.st_nlink > 1 {
                    let next = groups.len() as u64 + 1;
                    let group = *groups.entry((st.st_dev, st.st_ino)).or_insert(next);
                    Some((group, group == next))
                } else {
                    None
                };
                stats.entries += 1;
                if regular {
                    stats.bytes += attrs.size;
                }
                let wire_path = RelPath(rel.clone());
                let data = if inline_data
                    && regular
                    && attrs.size <= INLINE_DATA_MAX
                    && link_group.is_none_or(|(_, first)| first)
                {
                    self.read_whole(&wire_path, st.st_ino, attrs.size)
                } else {
                    None
                };
                if let Some(d) = &data {
                    stats.inline_files += 1;
                    batch_data += d.len();
                }
                let is_dir = attrs.kind == FileKind::Directory;
                batch.push(ManifestEntry {
                    path: wire_path,
                    attrs,
                    xattrs_omitted: false,
                    link_group: link_group.map(|(group, _)| group),
                    data,
                });
                if is_dir && recursive {
                    if st.st_dev == root_st.st_dev {
                        stack.push(rel);
                    } else {
                        crate::report!(Warn, "server: mounts inside the export skipped", 
                            "{} is another file system mounted inside the export: its contents are not replicated",
                            path().display()
                        );
                    }
                }
                if batch.len() >= chunk.entries || batch_data >= chunk.data {
                    batch_data = 0;
                    if !sink(std::mem::replace(
                        &mut batch,
                        Vec::with_capacity(chunk.entries),
                    )) {
                        return Ok(Some(stats));
                    }
                }
            }
        }
        if !batch.is_empty() {
            sink(batch);
        }
        Ok(Some(stats))
    }
}

/// How a manifest walk cuts its output: a chunk is handed over when it holds `entries`
/// entries or `data` bytes of inline data, whichever comes first (the walk's channel holds
/// a few chunks, so this bounds the server's memory per walking client).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WalkChunk {
    pub entries: usize,
    pub data: usize,
}

/// What a manifest walk listed (the root not counted).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WalkStats {
    pub entries: u64,
    /// Sum of the regular files' sizes.
    pub bytes: u64,
    /// Regular files whose content travelled in the manifest.
    pub inline_files: u64,
}

/// Reads a file's data for a fetch, skipping holes. The data segment around the read
/// position is found once (`SEEK_DATA`, `SEEK_HOLE`) and reused until the reads leave it:
/// on tmpfs a `SEEK_HOLE` scans the file's pages up to the next hole, so asking again for
/// every chunk made a dense 2 GiB file cost quadratic time.
/// Ranges at most this long are read whole, without looking for holes inside them.
const HOLE_PROBE_MIN: u64 = 16 << 20;

pub(crate) struct DataReader {
    file: Arc<File>,
    /// The data segment `[start, end)` the last seek found.
    segment: Option<(u64, u64)>,
}

impl DataReader {
    pub(crate) fn new(file: Arc<File>) -> DataReader {
        DataReader {
            file,
            segment: None,
        }
    }

    /// The data at or after `pos` and before `end`, in chunks of at most `max` bytes, about
    /// `budget` bytes in all; each chunk stops at a hole. Empty when nothing is left.
    pub(crate) fn next_chunks(
        &mut self,
        mut pos: u64,
        end: u64,
        max: usize,
        budget: usize,
    ) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut taken = 0usize;
        while pos < end && taken < budget {
            let Some((seg_start, seg_end)) = self.segment_at(pos, end)? else {
                break;
            };
            pos = pos.max(seg_start);
            let stop = end.min(seg_end).min(pos + max as u64);
            let buf = self.read_at(pos, stop)?;
            if buf.is_empty() {
                // The file ends here (it shrank since the seek).
                self.segment = None;
                break;
            }
            pos += buf.len() as u64;
            taken += buf.len();
            out.push((pos - buf.len() as u64, buf));
        }
        Ok(out)
    }

    /// The data segment holding `pos`, or the next one before `end`.
    fn segment_at(&mut self, pos: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
        if let Some((s, e)) = self.segment {
            if s <= pos && pos < e {
                return Ok(Some((s, e)));
            }
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        let data = if data < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => return Ok(None),
                // A file system without SEEK_DATA: treat everything as data.
                Some(libc::EINVAL | libc::EOPNOTSUPP) => {
                    self.segment = Some((pos, u64::MAX));
                    return Ok(self.segment);
                }
                _ => return Err(e),
            }
        } else {
            data as u64
        };
        if data >= end {
            return Ok(None);
        }
        if end - data <= HOLE_PROBE_MIN {
            // A short range is read whole: looking for its end's hole costs a scan to the
            // next hole, which for a dense file is its end, per request. Zeros sent for a
            // hole inside it become a hole again on the client (replay punches zero blocks).
            self.segment = Some((data, end));
            return Ok(self.segment);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            u64::MAX
        } else {
            (hole as u64).max(data + 1)
        };
        self.segment = Some((data, hole));
        Ok(self.segment)
    }

    fn read_at(&self, from: u64, to: u64) -> io::Result<Vec<u8>> {
        let fd = self.file.as_raw_fd();
        let mut buf = vec![0u8; (to - from) as usize];
        let mut got = 0usize;
        while got < buf.len() {
            // SAFETY: `buf[got..]` is writable for its length.
            let n = unsafe {
                libc::pread(
                    fd,
                    buf[got..].as_mut_ptr().cast(),
                    buf.len() - got,
                    (from + got as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            got += n as usize;
        }
        buf.truncate(got);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_sparse_file_reads_as_its_data_segments_and_a_dense_one_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let f = File::create(&path).unwrap();
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        f.write_all_at(&[2u8; 4096], 20 << 20).unwrap();
        f.set_len(40 << 20).unwrap();
        drop(f);
        let mut r = DataReader::new(Arc::new(File::open(&path).unwrap()));
        let chunks = r.next_chunks(0, 40 << 20, 1 << 20, 4 << 20).unwrap();
        let got: Vec<(u64, usize)> = chunks.iter().map(|(at, b)| (*at, b.len())).collect();
        // A file system without SEEK_HOLE support would report one dense range instead.
        if got.len() > 1 {
            assert_eq!(got, vec![(0, 4096), (20 << 20, 4096)]);
            assert!(chunks[1].1.iter().all(|&b| b == 2));
        }
        assert!(
            r.next_chunks((20 << 20) + 4096, 40 << 20, 1 << 20, 4 << 20)
                .unwrap()
                .is_empty(),
            "a trailing hole has no data"
        );
        // A short range is read whole, zeros of its holes included.
        let mut r = DataReader::new(Arc::new(File::open(&path).unwrap()));
        let short = r.next_chunks(0, 8192, 1 << 20, 4 << 20).unwrap();
        assert_eq!(
            short
                .iter()
                .map(|(at, b)| (*at, b.len()))
                .collect::<Vec<_>>(),
            vec![(0, 8192)]
        );
        assert!(short[0].1[4096..].iter().all(|&b| b == 0));

        let dense = dir.path().join("dense");
        std::fs::write(&dense, vec![7u8; (3 << 20) + 10]).unwrap();
        let mut r = DataReader::new(Arc::new(File::open(&dense).unwrap()));
        let first = r.next_chunks(0, (3 << 20) + 10, 1 << 20, 2 << 20).unwrap();
        assert_eq!(
            first
                .iter()
                .map(|(at, b)| (*at, b.len()))
                .collect::<Vec<_>>(),
            vec![(0, 1 << 20), (1 << 20, 1 << 20)]
        );
        let rest = r
            .next_chunks(2 << 20, (3 << 20) + 10, 1 << 20, 2 << 20)
            .unwrap();
        assert_eq!(
            rest.iter()
                .map(|(at, b)| (*at, b.len()))
                .collect::<Vec<_>>(),
            vec![(2 << 20, 1 << 20), (3 << 20, 10)]
        );
    }
}
