//! Paths whose bytes replay could not take from the master at their entry (see [`Pending`]).

use super::*;

/// Paths whose replay could not take what it needed from the master, because the master had
/// already moved past them: a write to a file renamed since (`write tmp; rename tmp f`, or
/// any change followed by a rename of a parent directory), read when only the new name
/// exists. Replay reports those operations `Obsolete`, expecting a later entry to account
/// for them; a later rename moves the object but carries no data. So the driver keeps the
/// paths, follows them through the renames, links and removals that come after, and once
/// every entry received is durable and the stream has been idle for [`REPAIR_IDLE`] (so no
/// entry still to come moves these names) fetches whatever the master has there, whole.
/// Under changes that never pause, the repair waits for the first pause: fetching earlier
/// would put the master's current content under names later entries still move.
/// `true` marks a path where the replica was found to differ (`NeedsResync`): a directory
/// there needs a full resync, its content being unknown.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub(super) paths: std::collections::BTreeMap<Vec<u8>, bool>,
    /// Consecutive repairs at which the master had nothing at a path; past
    /// [`PENDING_MISSES`] it is dropped (nothing at that name needs fetching).
    pub(super) misses: HashMap<Vec<u8>, u32>,
    /// Changed since last saved.
    pub(super) changed: bool,
    /// Paths a listing named, with its seq: the entries up to that seq that are still to
    /// come are older than the listing, which already saw what they did, so they neither
    /// move nor drop these paths (a rename the replay skips as already applied would carry
    /// a failed placement off to another name, and the failed one be taken for repaired).
    pub(super) as_of: HashMap<Vec<u8>, u64>,
}

impl Pending {
    pub(super) fn load(file: &Path) -> Pending {
        let mut p = Pending::default();
        let Ok(text) = std::fs::read_to_string(file) else {
            return p;
        };
        for line in text.lines() {
            let (flag, rest) = line.split_at(line.len().min(1));
            // `<flag><hex path>[ <listing seq>]`
            let mut fields = rest.split_whitespace();
            let Some(Ok(path)) = fields.next().map(hex::decode) else { continue };
            if let Some(Ok(seq)) = fields.next().map(str::parse::<u64>) {
                p.as_of.insert(path.clone(), seq);
            }
            p.paths.insert(path, flag == "d");
        }
        p
    }

    /// Saves the set durably when it changed (removes the file when empty).
    pub(super) fn save(&mut self, file: &Path) -> Result<(), ClientError> {
        match self.take_changes() {
            Some(text) => Pending::write(file, text),
            None => Ok(()),
        }
    }

    /// What [`Pending::save`] writes, as the set is now, for [`Pending::write`] later (on
    /// the durable point's thread): `None` when unchanged since last taken, `Some(None)`
    /// when the file is to go (the set is empty).
    pub(super) fn take_changes(&mut self) -> Option<Option<String>> {
        if !self.changed {
            return None;
        }
        self.changed = false;
        if self.paths.is_empty() {
            return Some(None);
        }
        let mut text = String::new();
        for (path, diverged) in &self.paths {
            text.push(if *diverged { 'd' } else { 'p' });
            text.push_str(&hex::encode(path));
            // Held where a listing put it until the stream passes the listing's seq, after
            // a restart too (the entries before it are replayed again).
            if let Some(seq) = self.as_of.get(path) {
                text.push_str(&format!(" {seq}"));
            }
            text.push('\n');
        }
        Some(Some(text))
    }

    /// Replaces `file` durably with `text` (removes it for `None`).
    pub(super) fn write(file: &Path, text: Option<String>) -> Result<(), ClientError> {
        let err = |action, error| ClientError::State {
            action,
            path: file.to_path_buf(),
            error,
        };
        match text {
            None => match std::fs::remove_file(file) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(err("remove", e)),
            },
            Some(text) => {
                let tmp = file.with_extension("tmp");
                let mut f = std::fs::File::create(&tmp).map_err(|e| err("write", e))?;
                f.write_all(text.as_bytes()).map_err(|e| err("write", e))?;
                f.sync_all().map_err(|e| err("fsync", e))?;
                std::fs::rename(&tmp, file).map_err(|e| err("replace", e))?;
            }
        }
        let dir = file.parent().unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err("fsync the directory of", e))
    }

    pub(super) fn clear(&mut self) {
        if !self.paths.is_empty() {
            self.changed = true;
        }
        self.paths.clear();
        self.misses.clear();
        self.as_of.clear();
    }

    pub(super) fn insert(&mut self, path: Vec<u8>, diverged: bool) {
        let e = self.paths.entry(path).or_insert(false);
        *e |= diverged;
        self.changed = true;
    }

    /// A path named by a listing as of `seq` (see [`Pending::as_of`]).
    pub(super) fn insert_as_of(&mut self, path: Vec<u8>, diverged: bool, seq: u64) {
        self.as_of.insert(path.clone(), seq);
        self.insert(path, diverged);
    }

    pub(super) fn remove(&mut self, path: &[u8]) {
        self.misses.remove(path);
        self.as_of.remove(path);
        if self.paths.remove(path).is_some() {
            self.changed = true;
        }
    }

    /// The master had nothing at `path` at a repair. Returns true when that was the last
    /// time asked ([`PENDING_MISSES`]): the path is dropped.
    pub(super) fn missed(&mut self, path: &[u8]) -> bool {
        let n = self.misses.entry(path.to_vec()).or_insert(0);
        *n += 1;
        if *n >= PENDING_MISSES {
            self.remove(path);
            return true;
        }
        false
    }

    /// The path an `Obsolete` op could not finish.
    pub(super) fn mark_op(&mut self, op: &Op) {
        match op {
            Op::Unlink { .. } | Op::Rmdir { .. } | Op::Rescan { .. } | Op::Relist { .. } => {}
            Op::Rename {
                path,
                new_path,
                exchange,
                ..
            } => {
                self.insert(new_path.0.clone(), false);
                if *exchange {
                    self.insert(path.0.clone(), false);
                }
            }
            Op::Link { new_path, .. } => self.insert(new_path.0.clone(), false),
            other => self.insert(other.path().0.clone(), false),
        }
    }

    /// A path where replay found the replica diverged. Within a pending subtree this is
    /// expected (the objects there were never placed) and fetching them is enough.
    pub(super) fn mark_diverged(&mut self, path: &RelPath) {
        let covered = self.covers(path.as_bytes());
        self.insert(path.0.clone(), !covered);
    }

    /// Whether `path` or one of its ancestors is pending.
    pub(super) fn covers(&self, path: &[u8]) -> bool {
        let mut p = path;
        loop {
            if self.paths.contains_key(p) {
                return true;
            }
            match p.iter().rposition(|&b| b == b'/') {
                Some(i) => p = &p[..i],
                None => return false,
            }
        }
    }

    /// [`Pending::follow`] for the entry `seq`: the paths a listing named as of `seq` or
    /// later stay where they are.
    pub(super) fn follow_entry(&mut self, op: &Op, seq: u64) {
        self.as_of.retain(|_, listed| *listed >= seq);
        let held: Vec<(Vec<u8>, bool)> = self
            .as_of
            .keys()
            .filter_map(|p| self.paths.remove_entry(p))
            .collect();
        self.follow(op);
        // Put back as they were: unchanged, so not saved again for it.
        self.paths.extend(held);
    }

    /// Follows a namespace entry: pending paths move with renames, are copied by links and
    /// dropped with removals ([`crate::names::follow`]).
    pub(super) fn follow(&mut self, op: &Op) {
        let misses = &mut self.misses;
        let moved = crate::names::follow(&mut self.paths, op, |held, more| *held |= more, |old| {
            misses.remove(old);
        });
        self.changed |= moved;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn rename(from: &str, to: &str, exchange: bool) -> Op {
        Op::Rename {
            path: from.into(),
            new_path: to.into(),
            exchange,
            noreplace: false,
        }
    }

    pub(super) fn paths(p: &Pending) -> Vec<String> {
        p.paths
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    #[test]
    pub(super) fn a_pending_path_follows_renames_of_itself_and_of_its_parents() {
        let mut p = Pending::default();
        p.mark_op(&Op::Write {
            path: "d/tmp".into(),
            offset: 0,
            len: 3,
            source: None,
            mode: None,
            ino: None,
        });
        p.follow(&rename("d/tmp", "d/file", false));
        assert_eq!(paths(&p), ["d/file"]);
        p.follow(&rename("d", "e", false));
        assert_eq!(paths(&p), ["e/file"]);
        // A sibling whose name shares the prefix is not beneath it.
        p.insert(b"e-x".to_vec(), false);
        p.follow(&rename("e", "f", false));
        assert_eq!(paths(&p), ["e-x", "f/file"]);
    }

    #[test]
    pub(super) fn an_exchange_swaps_pending_subtrees() {
        let mut p = Pending::default();
        p.insert(b"a/x".to_vec(), false);
        p.insert(b"b".to_vec(), true);
        p.follow(&rename("a", "b", true));
        assert_eq!(paths(&p), ["a", "b/x"]);
        assert_eq!(
            p.paths.get(b"a".as_slice()),
            Some(&true),
            "the flag travels with its object"
        );
    }

    #[test]
    pub(super) fn removals_drop_pending_paths_and_a_rename_over_a_name_drops_what_was_there() {
        let mut p = Pending::default();
        for path in ["d/a", "d/b/c", "f", "g", "h"] {
            p.insert(path.as_bytes().to_vec(), false);
        }
        p.follow(&Op::Rmdir { path: "d".into() });
        p.follow(&Op::Unlink { path: "f".into() });
        assert_eq!(paths(&p), ["g", "h"]);
        p.follow(&rename("g", "h", false));
        assert_eq!(paths(&p), ["h"]);
        p.follow(&Op::Link {
            path: "h".into(),
            new_path: "k".into(),
        });
        assert_eq!(paths(&p), ["h", "k"]);
    }

    #[test]
    pub(super) fn a_path_a_listing_failed_to_place_stays_put_through_the_entries_it_already_saw() {
        // A resync of "" listed the master as of seq 400 and could not place "b/e" (no
        // room). Entries 237..=400 come after it, replay skips them as already applied, and
        // they must not carry the path off: an exchange moved it to another name, which the
        // repair then found right, and "b/e" stayed wrong while the client said "in sync".
        let mut p = Pending::default();
        p.insert_as_of(b"b/e".to_vec(), true, 400);
        p.insert(b"x".to_vec(), false);
        p.follow_entry(&rename("long", "b/e", true), 362);
        p.follow_entry(&rename("b/b/a", "long", true), 366);
        p.follow_entry(&Op::Unlink { path: "b/e".into() }, 380);
        p.follow_entry(&rename("x", "y", false), 390);
        assert_eq!(
            paths(&p),
            ["b/e", "y"],
            "only the path named by the stream moves"
        );
        assert_eq!(p.paths.get(b"b/e".as_slice()), Some(&true));
        // Past the listing's seq the path follows entries again.
        p.follow_entry(&rename("b/e", "b/z", false), 401);
        assert_eq!(paths(&p), ["b/z", "y"]);
        assert!(p.as_of.is_empty());
    }

    #[test]
    pub(super) fn a_path_absent_at_every_repair_is_eventually_dropped() {
        let mut p = Pending::default();
        p.insert(b"gone".to_vec(), false);
        for _ in 1..PENDING_MISSES {
            p.missed(b"gone");
        }
        assert_eq!(paths(&p), ["gone"]);
        p.missed(b"gone");
        assert!(p.paths.is_empty());
    }

    #[test]
    pub(super) fn the_pending_set_survives_save_and_load_and_an_empty_set_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(PENDING_FILE);
        let mut p = Pending::default();
        p.insert(b"a/b".to_vec(), false);
        p.insert(vec![b'n', 0xff, b'/', b'x'], true);
        p.insert_as_of(b"listed".to_vec(), true, 400);
        p.save(&file).unwrap();
        let mut back = Pending::load(&file);
        assert_eq!(back.paths, p.paths);
        assert_eq!(back.as_of, p.as_of, "a listing's seq survives a restart");
        // Reloaded, the listed path is still held through the entries the listing saw.
        back.follow_entry(&Op::Unlink { path: "listed".into() }, 399);
        assert!(back.paths.contains_key(b"listed".as_slice()));
        p.clear();
        p.save(&file).unwrap();
        assert!(!file.exists());
    }
}
