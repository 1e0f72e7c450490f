//! Replay of the namespace: objects made, removed, renamed and linked.

use super::*;

impl Replayer {
    pub(super) fn make(
        &mut self,
        path: &RelPath,
        what: Make,
        seq: Option<u64>,
        data: &mut dyn DataSource,
    ) -> Result<Applied, ReplayError> {
        let op = what.op_name();
        let e = match self.entry(path, op, seq)? {
            Lookup::Found(e) => e,
            Lookup::Missing => return self.missing(path, data),
            Lookup::Stale => return Ok(Applied::AlreadyApplied),
        };
        let loc = e.loc();
        let old = loc.stat().ctx(op, path)?;
        if let Some(st) = &old {
            if self.placed_since(st, seq) {
                return Ok(self.done_already(&[Some(&e)], data));
            }
            if what.matches(st, &loc).ctx(op, path)? {
                // What this op made, or an earlier object it now stands for: either way,
                // from here on it is this op's.
                if let Some(s) = seq {
                    self.marks.set(InodeId::of(st), self.mark_for(s, false))?;
                }
                return Ok(self.done_already(&[Some(&e)], data));
            }
            // A rename cannot put a directory over a file, nor anything over a directory
            // that may hold files: the replica has diverged.
            if is_kind(st, libc::S_IFDIR) || matches!(what, Make::Dir { .. }) {
                return Ok(Applied::NeedsResync { path: path.clone() });
            }
            // Otherwise a stale non-directory is replaced, atomically, below. One a full
            // sync placed may be the master's from after this op: compared again later.
            if self.mark(st).is_none() {
                self.doubts.push(path.clone());
            }
        }
        let master = self.master(path, data)?.filter(|a| a.kind == what.kind());
        let tmp = Temp::new(e.parent.as_fd(), matches!(what, Make::Dir { .. }));
        what.create_at(e.parent.as_fd(), &tmp.name).ctx(op, path)?;
        let tloc = tmp.loc();
        match &master {
            Some(a) => self.apply_attrs(&tloc, a, false).ctx(op, path)?,
            // Gone at the master already (a later op removes or renames it): at least undo
            // our umask. Owner and times follow when a later op places it.
            None => {
                if let Some(mode) = what.mode() {
                    tloc.chmod(mode).ctx(op, path)?;
                }
            }
        }
        let Some(tst) = tloc.stat().ctx(op, path)? else {
            return Err(io::Error::from_raw_os_error(libc::ENOENT)).ctx(op, path);
        };
        let tid = InodeId::of(&tst);
        self.mark_ahead(tid, seq.map(|s| self.mark_for(s, false)))?;
        if let Err(err) = tmp.rename_to(&e.name) {
            // The temporary is gone, and its inode with it.
            self.marks.remove(tid);
            return Err(err).ctx(op, path);
        }
        if let Some(st) = &old {
            self.forget_if_freed(st);
        }
        self.restore_dir_times(e.parent.as_fd(), &e.parent_rel, data);
        Ok(Applied::Changed)
    }

    pub(super) fn remove(
        &mut self,
        path: &RelPath,
        dir: bool,
        seq: Option<u64>,
        data: &mut dyn DataSource,
    ) -> Result<Applied, ReplayError> {
        let op = if dir { "rmdir" } else { "unlink" };
        // A missing parent: the name is absent, which is what the op wants.
        let Lookup::Found(e) = self.entry(path, op, seq)? else {
            return Ok(Applied::AlreadyApplied);
        };
        let loc = e.loc();
        let Some(st) = loc.stat().ctx(op, path)? else {
            return Ok(self.done_already(&[Some(&e)], data));
        };
        if self.placed_after(&st, seq) {
            return Ok(self.done_already(&[Some(&e)], data));
        }
        // After the op the master has nothing at this name, whatever the replica holds
        // there: the object the op removed; an object of another kind (the replica is stale:
        // a full sync's tree from a later moment, a name an entry could not place); or a
        // directory that is not empty (the master's was removed empty, or moved out of the
        // export whole, which capture journals as this rmdir). Nothing beneath it can be
        // named by a later entry (a tree moved back in arrives whole): it goes, subtree and
        // all. (Left in place, a stale directory stood for a later mkdir of the same name,
        // with its old mode, times and children.)
        let is_dir = is_kind(&st, libc::S_IFDIR);
        match sys::unlinkat(e.parent.as_fd(), &e.name, is_dir) {
            Ok(()) => {}
            Err(err) if errno(&err) == libc::ENOENT => return Ok(self.done_already(&[Some(&e)], data)),
            Err(err) if is_dir && matches!(errno(&err), libc::ENOTEMPTY | libc::EEXIST) => {
                let mut freed = Vec::new();
                beneath::remove_tree(e.parent.as_fd(), &e.name, &mut |st| {
                    freed.push(InodeId::of(st))
                })
                .ctx(op, path)?;
                for id in freed {
                    self.marks.remove(id);
                }
            }
            Err(err) => return Err(err).ctx(op, path),
        }
        self.forget_if_freed(&st);
        self.restore_dir_times(e.parent.as_fd(), &e.parent_rel, data);
        Ok(Applied::Changed)
    }

    pub(super) fn rename(
        &mut self,
        path: &RelPath,
        new_path: &RelPath,
        exchange: bool,
        seq: Option<u64>,
        data: &mut dyn DataSource,
    ) -> Result<Applied, ReplayError> {
        const OP: &str = "rename";
        // Both paths are checked before anything is touched.
        split(new_path)?;
        let from = self.entry(path, OP, seq)?;
        let to = self.entry(new_path, OP, seq)?;
        if matches!(from, Lookup::Stale) {
            return Ok(Applied::AlreadyApplied);
        }
        let (from, to_stale) = (found(from), matches!(to, Lookup::Stale));
        let to = found(to);
        let src = match &from {
            Some(e) => e.loc().stat().ctx(OP, path)?,
            None => None,
        };
        let dst = match &to {
            Some(e) => e.loc().stat().ctx(OP, new_path)?,
            None => None,
        };
        if to_stale {
            // The destination's directory came after this op, so the op was applied.
            if !exchange {
                self.remove_resurrected(from.as_ref(), src.as_ref(), seq, path, data);
            }
            return Ok(self.done_already(&[from.as_ref()], data));
        }
        if let (Some(s), Some(m)) = (seq, src.as_ref().and_then(|st| self.mark(st))) {
            // At the source: a later op's object, or this op's come from `new_path` (an
            // exchange done). This op's own mark sending it to `new_path` means the mark was
            // written and the rename never ran (M2): go on.
            if m.seq > s || (m.seq == s && !m.to_new_path) {
                return Ok(self.done_already(&[from.as_ref(), to.as_ref()], data));
            }
        }
        if let (Some(s), Some(m)) = (seq, dst.as_ref().and_then(|st| self.mark(st))) {
            // At the destination: a later op's object, or the one this op sent there. This
            // op's mark sending it to `path` is an exchange that never ran (M2): go on.
            if m.seq > s || (m.seq == s && m.to_new_path) {
                if !exchange {
                    self.remove_resurrected(from.as_ref(), src.as_ref(), seq, path, data);
                }
                return Ok(self.done_already(&[from.as_ref(), to.as_ref()], data));
            }
        }
        let (Some(f), Some(t), Some(src_st)) = (&from, &to, &src) else {
            // No source. Unless an exchange, a destination means the rename is done.
            if !exchange && dst.is_some() {
                return Ok(self.done_already(&[from.as_ref(), to.as_ref()], data));
            }
            return self.missing(new_path, data);
        };
        if exchange && dst.is_none() {
            return self.missing(new_path, data);
        }
        // A full sync's object moved over another, or swapped: see `take_doubts`. (A
        // marked source renamed over an unmarked destination, a save by rename, is not in
        // doubt: the source is of this op's moment, the destination of one before.)
        let doubtful = dst.as_ref().is_some_and(|d| {
            self.mark(src_st).is_none() || (exchange && self.mark(d).is_none())
        });
        if doubtful {
            self.doubts.push(new_path.clone());
            if exchange {
                self.doubts.push(path.clone());
            }
        }
        if let (true, Some(dst_st)) = (exchange, &dst) {
            // Unmarked objects a full sync placed may already show the exchange: its walk
            // raced with the master and saw it done. An exchange is its own inverse, so
            // replaying it then would undo it. When each name already holds what the
            // master holds there now, and swapping would not, it is done (differential
            // seed 4 on tmpfs under load: a directory and a device swapped back). Objects
            // replay placed are never judged so (their marks decided above): the master's
            // state now may be past a later exchange that undid this one, and skipping both
            // sent the changes between them to the wrong object (differential seed
            // 796574861007 on btrfs).
            if self.mark(src_st).is_none() && self.mark(dst_st).is_none() {
                let (ms, md) = (self.master(path, data)?, self.master(new_path, data)?);
                let like = |st: &libc::stat, a: &Option<Attrs>| a.as_ref().is_some_and(|a| looks_like(st, a));
                if like(src_st, &ms) && like(dst_st, &md) && !(like(src_st, &md) && like(dst_st, &ms)) {
                    return Ok(self.done_already(&[from.as_ref(), to.as_ref()], data));
                }
            }
        }
        // M1: the moved objects' marks before the move.
        let mut ahead = Vec::new();
        if let Some(s) = seq {
            let id = InodeId::of(src_st);
            ahead.push((id, self.mark_ahead(id, Some(self.mark_for(s, true)))?));
            if let (true, Some(d)) = (exchange, &dst) {
                let id = InodeId::of(d);
                match self.mark_ahead(id, Some(self.mark_for(s, false))) {
                    Ok(prev) => ahead.push((id, prev)),
                    Err(e) => {
                        self.unmark_all(ahead);
                        return Err(e);
                    }
                }
            }
        }
        let flags = if exchange { libc::RENAME_EXCHANGE } else { 0 };
        let mut replaced_stale = false;
        let mut renamed = sys::renameat2(f.parent.as_fd(), &f.name, t.parent.as_fd(), &t.name, flags);
        let diverged = |e: &io::Error| matches!(errno(e), libc::ENOTEMPTY | libc::EEXIST | libc::EISDIR | libc::ENOTDIR);
        if let (Err(e), false, Some(_)) = (&renamed, exchange, &dst) {
            if diverged(e) {
                // A directory over a file, anything over a non-empty directory: the master's
                // rename succeeded, so what the replica holds at `new_path` is stale (a full
                // sync's walk that raced with a rename saw the directory twice, under both
                // names). It goes, subtree and all, as an unlink would take it, and the
                // rename is made; the destination is compared whole once the stream is idle.
                // (Refused instead, the source stayed where the master has nothing: fsstress
                // under a full resync left such trees.)
                let mut freed = Vec::new();
                beneath::remove_tree(t.parent.as_fd(), &t.name, &mut |st| freed.push(InodeId::of(st)))
                    .ctx(OP, new_path)?;
                for id in freed {
                    self.marks.remove(id);
                }
                replaced_stale = true;
                renamed = sys::renameat2(f.parent.as_fd(), &f.name, t.parent.as_fd(), &t.name, flags);
            }
        }
        if let Err(e) = renamed {
            self.unmark_all(ahead);
            if diverged(&e) {
                return Ok(Applied::NeedsResync {
                    path: new_path.clone(),
                });
            }
            return Err(e).ctx(OP, path);
        }
        if let (false, Some(d)) = (exchange, &dst) {
            // Renaming a name onto another name of the same inode changes nothing.
            if InodeId::of(d) != InodeId::of(src_st) {
                self.forget_if_freed(d);
            }
        }
        // Owner, mode and times of the moved object(s) converge on the master's (the object
        // may have been created with ones the master no longer had).
        let moved = if exchange {
            vec![(t, new_path), (f, path)]
        } else {
            vec![(t, new_path)]
        };
        for (e, p) in moved {
            let loc = e.loc();
            let st = loc.stat().ctx(OP, p)?;
            if let (Some(st), Some(a)) = (st, self.master(p, data)?) {
                if FileKind::from_mode(st.st_mode) == Some(a.kind) {
                    self.apply_attrs(&loc, &a, true).ctx(OP, p)?;
                }
            }
        }
        self.restore_dir_times(f.parent.as_fd(), &f.parent_rel, data);
        if t.parent_rel != f.parent_rel {
            self.restore_dir_times(t.parent.as_fd(), &t.parent_rel, data);
        }
        if replaced_stale {
            return Ok(Applied::NeedsResync { path: new_path.clone() });
        }
        Ok(Applied::Changed)
    }

    /// After a rename found already done, an object at its source with an older mark can
    /// only have been re-created by replaying the ops before it again (every op that
    /// places an object marks it, and marks only grow): remove it, with whatever replay
    /// put inside. An unmarked object is never touched.
    pub(super) fn remove_resurrected(
        &mut self,
        from: Option<&Entry>,
        src: Option<&libc::stat>,
        seq: Option<u64>,
        path: &RelPath,
        data: &mut dyn DataSource,
    ) {
        let (Some(f), Some(st), Some(s)) = (from, src, seq) else {
            return;
        };
        if self.mark(st).is_none_or(|m| m.seq >= s) {
            return;
        }
        let mut freed = Vec::new();
        match beneath::remove_tree(f.parent.as_fd(), &f.name, &mut |st| {
            freed.push(InodeId::of(st))
        }) {
            Ok(()) => log::debug!(
                "replay: removed {:?}, re-created by replaying again",
                path.display()
            ),
            Err(e) => log::warn!(
                "replay: cannot remove {:?}, re-created by replaying again: {e}",
                path.display()
            ),
        }
        for id in freed {
            self.marks.remove(id);
        }
        self.restore_dir_times(f.parent.as_fd(), &f.parent_rel, data);
    }

    /// A name change found done: its directories still get the master's times. Done
    /// already may mean done by another route, which the master's directory times do not
    /// show (a tree moved in over an empty directory is journalled as a `mkdir` the replica
    /// finds done: soak seed 796584519193 on ext4 kept the root's older mtime), or done by
    /// this op before a crash that came before the times were put back.
    pub(super) fn done_already(&self, dirs: &[Option<&Entry>], data: &mut dyn DataSource) -> Applied {
        let mut restored: Vec<&RelPath> = Vec::new();
        for e in dirs.iter().flatten() {
            if !restored.contains(&&e.parent_rel) {
                self.restore_dir_times(e.parent.as_fd(), &e.parent_rel, data);
                restored.push(&e.parent_rel);
            }
        }
        Applied::AlreadyApplied
    }

    pub(super) fn unmark_all(&mut self, ahead: Vec<(InodeId, Option<Mark>)>) {
        for (id, prev) in ahead.into_iter().rev() {
            self.unmark(id, prev);
        }
    }

    pub(super) fn link(
        &mut self,
        path: &RelPath,
        new_path: &RelPath,
        seq: Option<u64>,
        data: &mut dyn DataSource,
    ) -> Result<Applied, ReplayError> {
        const OP: &str = "link";
        split(new_path)?;
        let from = match self.entry(path, OP, seq)? {
            Lookup::Stale => return Ok(Applied::AlreadyApplied),
            l => found(l),
        };
        let to = match self.entry(new_path, OP, seq)? {
            Lookup::Found(e) => e,
            Lookup::Missing => return self.missing(new_path, data),
            Lookup::Stale => return Ok(Applied::AlreadyApplied),
        };
        let src = match &from {
            Some(e) => e.loc().stat().ctx(OP, path)?,
            None => None,
        };
        let tloc = to.loc();
        let dst = tloc.stat().ctx(OP, new_path)?;
        if let Some(d) = &dst {
            if src.is_some_and(|s| InodeId::of(&s) == InodeId::of(d)) {
                // Linked already. The inode becomes this op's unless a later op placed it.
                if let (Some(s), false) = (seq, self.placed_since(d, seq)) {
                    self.marks.set(InodeId::of(d), self.mark_for(s, true))?;
                }
                return Ok(Applied::AlreadyApplied);
            }
            if self.placed_since(d, seq) {
                return Ok(Applied::AlreadyApplied);
            }
            if is_kind(d, libc::S_IFDIR) {
                return Ok(Applied::NeedsResync {
                    path: new_path.clone(),
                });
            }
        }
        let (Some(f), Some(s)) = (&from, &src) else {
            return self.missing(new_path, data);
        };
        if self.placed_after(s, seq) {
            // The source is a later object than the one this op linked.
            return Ok(Applied::AlreadyApplied);
        }
        if is_kind(s, libc::S_IFDIR) {
            return Ok(Applied::NeedsResync {
                path: new_path.clone(),
            });
        }
        // M1: the inode's mark before its new name. A link not done is recognised by inode.
        let id = InodeId::of(s);
        let ahead = match seq {
            Some(q) => Some(self.mark_ahead(id, Some(self.mark_for(q, true)))?),
            None => None,
        };
        let linked = if dst.is_none() {
            sys::linkat(f.parent.as_fd(), &f.name, to.parent.as_fd(), &to.name)
        } else {
            // Replace the stale object atomically: link under a temporary name, rename over.
            let tmp = Temp::new(to.parent.as_fd(), false);
            sys::linkat(f.parent.as_fd(), &f.name, to.parent.as_fd(), &tmp.name)
                .and_then(|()| tmp.rename_to(&to.name))
        };
        if let Err(e) = linked {
            if let Some(prev) = ahead {
                self.unmark(id, prev);
            }
            return Err(e).ctx(OP, new_path);
        }
        if let Some(d) = &dst {
            self.forget_if_freed(d);
        }
        if let Some(a) = self.master(new_path, data)? {
            if FileKind::from_mode(s.st_mode) == Some(a.kind) {
                self.apply_attrs(&tloc, &a, false).ctx(OP, new_path)?;
            }
        }
        self.restore_dir_times(to.parent.as_fd(), &to.parent_rel, data);
        Ok(Applied::Changed)
    }

    // ---- data operations -----------------------------------------------------------
}

/// Whether the replica's object `st` could be the master's `a`: the same kind and, for a
/// non-directory, the same size and mtime (a directory's own times follow its contents).
pub(super) fn looks_like(st: &libc::stat, a: &Attrs) -> bool {
    if FileKind::from_mode(st.st_mode) != Some(a.kind) {
        return false;
    }
    a.kind == FileKind::Directory
        || (st.st_size as u64 == a.size && st.st_mtime == a.mtime.sec && st.st_mtime_nsec as u32 == a.mtime.nsec)
}

