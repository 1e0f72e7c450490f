//! Replay of attributes: owner, mode, times and xattrs.

use super::*;

impl Replayer {
    #[expect(
        clippy::too_many_arguments,
        reason = "one argument per field of Op::Setattr"
    )]
    pub(super) fn setattr(
        &mut self,
        path: &RelPath,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<Timestamp>,
        mtime: Option<Timestamp>,
        seq: Option<u64>,
        data: &mut dyn DataSource,
    ) -> Result<Applied, ReplayError> {
        const OP: &str = "setattr";
        if (mode, uid, gid, atime, mtime) == (None, None, None, None, None) {
            // Times changed, but capture could not read them: the object was not at its name
            // any more when it looked (known by a placeholder, a whiteout). Applying nothing
            // would leave the replica's times behind for good; the path is fetched again
            // from the master once the stream is idle.
            return Ok(Applied::Obsolete);
        }
        let t = match self.target(path, seq)? {
            Lookup::Found(t) => t,
            Lookup::Missing => return self.missing(path, data),
            Lookup::Stale => return Ok(Applied::AlreadyApplied),
        };
        let loc = self.target_loc(&t);
        let Some(st) = loc.stat().ctx(OP, path)? else {
            return self.missing(path, data);
        };
        if self.placed_after(&st, seq) {
            return Ok(Applied::AlreadyApplied);
        }
        // Owner first: chown clears set-user-ID and set-group-ID bits the mode may set.
        if uid.is_some() || gid.is_some() {
            loc.chown(uid, gid).ctx(OP, path)?;
        }
        if let Some(m) = mode {
            loc.chmod(m).ctx(OP, path)?;
        }
        if atime.is_some() || mtime.is_some() {
            loc.set_times(atime, mtime).ctx(OP, path)?;
        }
        Ok(Applied::Changed)
    }

    pub(super) fn setxattr(
        &mut self,
        path: &RelPath,
        name: &RelPath,
        seq: Option<u64>,
        data: &mut dyn DataSource,
    ) -> Result<Applied, ReplayError> {
        const OP: &str = "setxattr";
        let cname = xattr_name(path, name)?;
        let t = match self.target(path, seq)? {
            Lookup::Found(t) => t,
            Lookup::Missing => return self.missing(path, data),
            Lookup::Stale => return Ok(Applied::AlreadyApplied),
        };
        let Some(master) = self.master(path, data)? else {
            return Ok(Applied::Obsolete);
        };
        let loc = self.target_loc(&t);
        let Some(st) = loc.stat().ctx(OP, path)? else {
            return Ok(Applied::NeedsResync { path: path.clone() });
        };
        if self.placed_after(&st, seq) {
            return Ok(Applied::AlreadyApplied);
        }
        match master
            .xattrs
            .iter()
            .find(|(n, _)| n.as_slice() == name.as_bytes())
        {
            Some((_, value)) => {
                if loc.get_xattr(&cname).ctx(OP, path)?.as_deref() == Some(value.as_slice()) {
                    return Ok(Applied::AlreadyApplied);
                }
                loc.set_xattr(&cname, value).ctx(OP, path)?;
            }
            // Removed at the master since: the replica follows the current state.
            None => {
                if !loc.remove_xattr(&cname).ctx(OP, path)? {
                    return Ok(Applied::AlreadyApplied);
                }
            }
        }
        if is_access_acl(name) {
            // The kernel keeps the group bits and the ACL mask in step: the mode follows.
            loc.chmod(master.mode).ctx(OP, path)?;
        }
        Ok(Applied::Changed)
    }

    /// Makes the xattrs of the object at `path` exactly `wanted` (the host-local ones
    /// aside): a repair fetches the master's object again, and a directory or file it finds
    /// in place kept xattrs the master has removed since, under a name the removal's entry
    /// could not reach (fsstress under a full resync: `user.x1` left on directories).
    pub fn converge_xattrs(&mut self, path: &RelPath, wanted: &[(Vec<u8>, Vec<u8>)]) -> Result<(), ReplayError> {
        const OP: &str = "xattrs";
        let Lookup::Found(t) = self.target(path, None)? else {
            return Ok(());
        };
        let loc = self.target_loc(&t);
        if loc.stat().ctx(OP, path)?.is_none() {
            return Ok(());
        }
        loc.sync_xattrs(wanted).ctx(OP, path)
    }

    pub(super) fn removexattr(
        &mut self,
        path: &RelPath,
        name: &RelPath,
        seq: Option<u64>,
        data: &mut dyn DataSource,
    ) -> Result<Applied, ReplayError> {
        const OP: &str = "removexattr";
        let cname = xattr_name(path, name)?;
        let t = match self.target(path, seq)? {
            Lookup::Found(t) => t,
            Lookup::Missing => return self.missing(path, data),
            Lookup::Stale => return Ok(Applied::AlreadyApplied),
        };
        let loc = self.target_loc(&t);
        let Some(st) = loc.stat().ctx(OP, path)? else {
            return self.missing(path, data);
        };
        if self.placed_after(&st, seq) {
            return Ok(Applied::AlreadyApplied);
        }
        let removed = loc.remove_xattr(&cname).ctx(OP, path)?;
        if is_access_acl(name) {
            // Removing an access ACL (`setfacl -b`) gives the file its mode back from the
            // ACL's owner/group/other entries, a change no chmod of the master journalled:
            // take the mode the master has now.
            if let Some(m) = self.master(path, data)? {
                if m.kind.type_bits() == st.st_mode & libc::S_IFMT {
                    loc.chmod(m.mode).ctx(OP, path)?;
                    return Ok(Applied::Changed);
                }
            }
        }
        Ok(if removed {
            Applied::Changed
        } else {
            Applied::AlreadyApplied
        })
    }
}

/// The xattr holding a POSIX access ACL, whose changes change the mode too.
fn is_access_acl(name: &RelPath) -> bool {
    name.as_bytes() == b"system.posix_acl_access"
}
