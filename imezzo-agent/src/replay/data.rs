//! Replay of data: writes (in place, or whole files built aside) and truncates.

use super::*;

impl Replayer {
    pub(super) fn write(
        &mut self,
        path: &RelPath,
        offset: u64,
        len: u64,
        ino: Option<u64>,
        seq: Option<u64>,
        data: &mut dyn DataSource,
    ) -> Result<Applied, ReplayError> {
        const OP: &str = "write";
        let e = match self.entry(path, OP, seq)? {
            Lookup::Found(e) => e,
            Lookup::Missing => return self.missing(path, data),
            Lookup::Stale => return Ok(Applied::AlreadyApplied),
        };
        let master = match self.master(path, data)? {
            Some(a) if a.kind == FileKind::Regular => a,
            // The master's file is gone or replaced: a later op accounts for it, and the
            // bytes written then cannot be read any more.
            _ => return Ok(Applied::Obsolete),
        };
        let loc = e.loc();
        let st = loc.stat().ctx(OP, path)?;
        if let Some(st) = &st {
            if self.placed_after(st, seq) {
                return Ok(Applied::AlreadyApplied);
            }
            if !is_kind(st, libc::S_IFREG) {
                return Ok(Applied::NeedsResync { path: path.clone() });
            }
        }
        let end = offset.saturating_add(len).min(master.size);
        if ino.is_some() && end <= offset {
            // Nothing to read, but the size and times below must be those of the object
            // written to, not of another one that took its name since.
            data.read_range(path, offset, 0, ino)
                .map_err(|source| ReplayError::Source {
                    path: path.display().into_owned(),
                    source,
                })?;
        }
        // A file still empty (just created) has no old content a reader could lose, so it
        // is filled in place: one inode and one rename less per new file.
        let whole = offset == 0
            && len >= master.size
            && st.is_none_or(|s| s.st_nlink == 1 && s.st_size > 0);
        if whole {
            self.rewrite(&e, st.as_ref(), Written { path, ino }, end, &master, data)?;
            return Ok(Applied::Changed);
        }
        if st.is_none() {
            // Only part of a file we do not have: the rest must come from a resync.
            return Ok(Applied::NeedsResync { path: path.clone() });
        }
        let fd = sys::openat(
            e.parent.as_fd(),
            &e.name,
            libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
            0,
        )
        .ctx(OP, path)?;
        let st = sys::fstat(fd.as_fd()).ctx(OP, path)?;
        if !is_kind(&st, libc::S_IFREG) {
            return Ok(Applied::NeedsResync { path: path.clone() });
        }
        self.copy_range(
            fd.as_fd(),
            st.st_size as u64,
            Written { path, ino },
            offset,
            end,
            data,
        )?;
        if sys::fstat(fd.as_fd()).ctx(OP, path)?.st_size as u64 != master.size {
            sys::ftruncate(fd.as_fd(), master.size).ctx(OP, path)?;
        }
        loc.set_times(Some(master.atime), Some(master.mtime))
            .ctx(OP, path)?;
        Ok(Applied::Changed)
    }

    /// Builds the whole file under a temporary name and renames it over the old one.
    pub(super) fn rewrite(
        &mut self,
        e: &Entry,
        old: Option<&libc::stat>,
        written: Written<'_>,
        end: u64,
        master: &Attrs,
        data: &mut dyn DataSource,
    ) -> Result<(), ReplayError> {
        const OP: &str = "write";
        let path = written.path;
        // The mark says which op placed this name's object; the new inode stands for the
        // same object, so it carries the mark over (whatever its volume).
        let carried = old.and_then(|st| self.marks.get(InodeId::of(st)));
        let tmp = Temp::new(e.parent.as_fd(), false);
        let fd = sys::openat(
            e.parent.as_fd(),
            &tmp.name,
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_NOFOLLOW,
            0o600,
        )
        .ctx(OP, path)?;
        self.copy_range(fd.as_fd(), 0, written, 0, end, data)?;
        sys::ftruncate(fd.as_fd(), master.size).ctx(OP, path)?;
        let tid = InodeId::of(&sys::fstat(fd.as_fd()).ctx(OP, path)?);
        drop(fd);
        let tloc = tmp.loc();
        self.apply_attrs(&tloc, master, false).ctx(OP, path)?;
        // M1, and M6: a file that had no mark gets none, not a stale one.
        self.mark_ahead(tid, carried)?;
        if let Err(err) = tmp.rename_to(&e.name) {
            self.marks.remove(tid);
            return Err(err).ctx(OP, path);
        }
        if let Some(st) = old {
            self.forget_if_freed(st);
        }
        self.restore_dir_times(e.parent.as_fd(), &e.parent_rel, data);
        Ok(())
    }

    /// Copies the master's bytes `[start, end)` into `fd`, whose size is `eof`, leaving
    /// zero-filled blocks as holes: skipped at or past EOF, punched inside existing data.
    pub(super) fn copy_range(
        &self,
        fd: BorrowedFd<'_>,
        mut eof: u64,
        written: Written<'_>,
        start: u64,
        end: u64,
        data: &mut dyn DataSource,
    ) -> Result<(), ReplayError> {
        const OP: &str = "write";
        let Written { path, ino } = written;
        let mut pos = start;
        while pos < end {
            let want = (end - pos).min(CHUNK);
            let mut buf =
                data.read_range(path, pos, want, ino)
                    .map_err(|source| ReplayError::Source {
                        path: path.display().into_owned(),
                        source,
                    })?;
            buf.truncate(want as usize);
            eof = sys::pwrite_sparse(fd, &buf, pos, eof).ctx(OP, path)?;
            pos += buf.len() as u64;
            if (buf.len() as u64) < want {
                break; // the master's file ends here
            }
        }
        Ok(())
    }

    pub(super) fn truncate(
        &mut self,
        path: &RelPath,
        size: u64,
        seq: Option<u64>,
        data: &mut dyn DataSource,
    ) -> Result<Applied, ReplayError> {
        const OP: &str = "truncate";
        let e = match self.entry(path, OP, seq)? {
            Lookup::Found(e) => e,
            Lookup::Missing => return self.missing(path, data),
            Lookup::Stale => return Ok(Applied::AlreadyApplied),
        };
        let loc = e.loc();
        let Some(st) = loc.stat().ctx(OP, path)? else {
            return self.missing(path, data);
        };
        if self.placed_after(&st, seq) {
            return Ok(Applied::AlreadyApplied);
        }
        if !is_kind(&st, libc::S_IFREG) {
            return Ok(Applied::NeedsResync { path: path.clone() });
        }
        let fd = sys::openat(
            e.parent.as_fd(),
            &e.name,
            libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
            0,
        )
        .ctx(OP, path)?;
        sys::ftruncate(fd.as_fd(), size).ctx(OP, path)?;
        if let Some(a) = self.master(path, data)? {
            if a.kind == FileKind::Regular {
                loc.set_times(Some(a.atime), Some(a.mtime)).ctx(OP, path)?;
            }
        }
        Ok(Applied::Changed)
    }

    // ---- attribute operations --------------------------------------------------------
}
