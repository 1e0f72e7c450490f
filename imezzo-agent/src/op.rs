//! Journal operations: what changed, named by path relative to the exported root.
//!
//! The journal records operations and metadata, never file data (InterMezzo's rule): a
//! `Write` names a byte range, and whoever replays it reads the current bytes from the
//! master file. The JSON form is documented in docs/journal-format.md.

use serde::Serialize;

/// A path relative to the root, as raw bytes (`/`-separated, no leading `/`, `""` = root).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RelPath(pub Vec<u8>);

impl RelPath {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// The directory holding this path (`""` for a top-level name); `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        let b = &self.0;
        if b.is_empty() {
            return None;
        }
        Some(RelPath(b[..b.iter().rposition(|&c| c == b'/').unwrap_or(0)].to_vec()))
    }
    pub fn display(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }
}

/// The proper ancestors of `path`, nearest first, ending with the root `""` (none for the
/// root itself).
pub(crate) fn ancestors(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    let slashes = path.iter().enumerate().rev().filter(|&(_, &b)| b == b'/').map(move |(i, _)| &path[..i]);
    let root: Option<&[u8]> = (!path.is_empty()).then_some(&[][..]);
    slashes.chain(root)
}

impl Serialize for RelPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.display())
    }
}

impl From<&str> for RelPath {
    fn from(s: &str) -> Self {
        RelPath(s.as_bytes().to_vec())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    Create { path: RelPath, mode: u32 },
    Mkdir { path: RelPath, mode: u32 },
    Mknod { path: RelPath, mode: u32, rdev: u64 },
    Symlink { path: RelPath, target: RelPath },
    Link { path: RelPath, new_path: RelPath },
    Unlink { path: RelPath },
    Rmdir { path: RelPath },
    Rename {
        path: RelPath,
        new_path: RelPath,
        #[serde(skip_serializing_if = "is_false")]
        exchange: bool,
        #[serde(skip_serializing_if = "is_false")]
        noreplace: bool,
    },
    Write {
        path: RelPath,
        offset: u64,
        len: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        source: Option<WriteSource>,
        #[serde(skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
        /// The master's inode the bytes were written to, when capture knew it: replay
        /// takes data only from that object, never from another one that took its name
        /// since (a rename, an exchange, `mv f f~` then a new `f`). Not in the JSON form.
        #[serde(skip)]
        ino: Option<u64>,
    },
    Truncate { path: RelPath, size: u64 },
    Setattr {
        path: RelPath,
        #[serde(skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        gid: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        atime: Option<Timestamp>,
        #[serde(skip_serializing_if = "Option::is_none")]
        mtime: Option<Timestamp>,
    },
    Setxattr { path: RelPath, name: RelPath },
    Removexattr { path: RelPath, name: RelPath },
    /// Changes below `path` were lost or cannot be described op by op: the consumer must
    /// compare that subtree as a whole.
    Rescan { path: RelPath, reason: String },
    /// The names directly in the directory `path` may differ from what the ops before
    /// said (the server was down while they changed): the consumer must compare that
    /// directory's children, and fetch whole any directory among them it does not have.
    Relist { path: RelPath, reason: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteSource {
    Fallocate,
    Mmap,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JournalEntry {
    pub seq: u64,
    #[serde(flatten)]
    pub op: Op,
}

impl Op {
    /// The paths whose master attributes replaying this op may ask for: its path, a
    /// rename's or link's other side, and the directories holding them (whose times it
    /// restores). The client fetches them ahead per batch; the server attaches them.
    pub fn asked_paths(&self) -> Vec<RelPath> {
        let mut out = Vec::with_capacity(4);
        let mut add = |p: &RelPath| {
            for q in [Some(p.clone()), p.parent()].into_iter().flatten() {
                if !out.contains(&q) {
                    out.push(q);
                }
            }
        };
        add(self.path());
        if let Op::Rename { new_path, .. } | Op::Link { new_path, .. } = self {
            add(new_path);
        }
        out
    }

    pub fn path(&self) -> &RelPath {
        match self {
            Op::Create { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Mknod { path, .. }
            | Op::Symlink { path, .. }
            | Op::Link { path, .. }
            | Op::Unlink { path }
            | Op::Rmdir { path }
            | Op::Rename { path, .. }
            | Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::Setattr { path, .. }
            | Op::Setxattr { path, .. }
            | Op::Removexattr { path, .. }
            | Op::Rescan { path, .. }
            | Op::Relist { path, .. } => path,
        }
    }
}

impl std::fmt::Display for JournalEntry {
    /// One line for humans: `seq op path [-> new_path] [details]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
        let obj = v.as_object().ok_or(std::fmt::Error)?;
        let s = |k: &str| obj.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
        write!(f, "{:>8} {:<11} {}", self.seq, s("op"), s("path"))?;
        if obj.contains_key("new_path") {
            write!(f, " -> {}", s("new_path"))?;
        }
        for (k, val) in obj {
            if !matches!(k.as_str(), "seq" | "op" | "path" | "new_path") {
                write!(f, " {k}={val}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors_run_from_parent_to_root() {
        let all = |p: &str| ancestors(p.as_bytes()).map(|a| String::from_utf8(a.to_vec()).unwrap()).collect::<Vec<_>>();
        assert_eq!(all("a/b/c"), ["a/b", "a", ""]);
        assert_eq!(all("a"), [""]);
        assert!(all("").is_empty());
    }

    #[test]
    fn rename_serializes_with_new_path_and_only_set_flags() {
        let e = JournalEntry {
            seq: 7,
            op: Op::Rename { path: "a".into(), new_path: "b/c".into(), exchange: true, noreplace: false },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v, serde_json::json!({"seq": 7, "op": "rename", "path": "a", "new_path": "b/c", "exchange": true}));
    }

    #[test]
    fn an_entry_survives_an_rkyv_round_trip_with_validation() {
        let e = JournalEntry {
            seq: 42,
            op: Op::Write { path: RelPath(vec![b'a', 0xff]), offset: 4096, len: 10, source: Some(WriteSource::Mmap), mode: None, ino: None },
        };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&e).unwrap();
        let back = rkyv::from_bytes::<JournalEntry, rkyv::rancor::Error>(&bytes).unwrap();
        assert_eq!(back, e);
        assert!(rkyv::from_bytes::<JournalEntry, rkyv::rancor::Error>(&bytes[..bytes.len() / 2]).is_err());
    }

    #[test]
    fn setattr_carries_only_changed_attributes() {
        let e = JournalEntry {
            seq: 1,
            op: Op::Setattr { path: "f".into(), mode: Some(0o600), uid: None, gid: None, atime: None, mtime: None },
        };
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"seq":1,"op":"setattr","path":"f","mode":384}"#);
        assert_eq!(e.to_string(), "       1 setattr     f mode=384");
    }
}
