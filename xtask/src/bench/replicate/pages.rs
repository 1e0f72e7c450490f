//! The pages rows' workload (issue 10's first target): one big file that both sides already
//! hold, then [`WRITES`] pwrites of one [`PAGE`] each, at distinct pages chosen at random, with
//! new random bytes; and how the bench tells that the replica holds them without reading the
//! whole file again.
//!
//! Every change is made from a seed, so a run can be repeated; each round of each tool gets
//! its own seed, so that a change always brings bytes the replica does not hold yet.

use std::{
    collections::HashSet,
    fs::{self, File, OpenOptions},
    os::unix::fs::{FileExt, MetadataExt},
    path::Path,
    time::Instant,
};

use anyhow::{bail, Context, Result};

/// Bytes of one write: a page.
pub const PAGE: usize = 4096;
/// Writes of one change.
pub const WRITES: usize = 256;

/// splitmix64: the next value of the sequence whose state is `state`.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `count` distinct page numbers below `file_pages`, in the order drawn from `seed`.
pub fn choose_pages(file_pages: u64, count: usize, seed: u64) -> Result<Vec<u64>> {
    if (count as u64) > file_pages {
        bail!("{count} distinct pages cannot be chosen from a file of {file_pages} pages");
    }
    let mut state = seed;
    let mut seen = HashSet::with_capacity(count);
    let mut pages = Vec::with_capacity(count);
    while pages.len() < count {
        let page = next(&mut state) % file_pages;
        if seen.insert(page) {
            pages.push(page);
        }
    }
    Ok(pages)
}

/// One change: the pages written, in write order, and the bytes of each.
pub struct Change {
    pages: Vec<u64>,
    bytes: Vec<u8>,
}

impl Change {
    /// The change of seed `seed` to a file of `file_bytes` bytes (whole pages only).
    pub fn new(file_bytes: u64, seed: u64) -> Result<Change> {
        let pages = choose_pages(file_bytes / PAGE as u64, WRITES, seed)?;
        let mut state = seed.rotate_left(32) ^ 0xb17e_5eed;
        let mut bytes = Vec::with_capacity(WRITES * PAGE);
        while bytes.len() < WRITES * PAGE {
            bytes.extend_from_slice(&next(&mut state).to_le_bytes());
        }
        Ok(Change { pages, bytes })
    }

    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// The new bytes of the `index`th page written.
    fn page_bytes(&self, index: usize) -> &[u8] {
        &self.bytes[index * PAGE..(index + 1) * PAGE]
    }

    fn offset(&self, index: usize) -> u64 {
        self.pages[index] * PAGE as u64
    }

    /// Opens `path` for writing (no truncation), pwrites every page and closes it. Returns the
    /// moment just before the first pwrite.
    pub fn apply(&self, path: &Path) -> Result<Instant> {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("could not open {} for writing", path.display()))?;
        let first_write = Instant::now();
        for index in 0..self.pages.len() {
            file.write_all_at(self.page_bytes(index), self.offset(index))
                .with_context(|| format!("could not write {}", path.display()))?;
        }
        drop(file);
        Ok(first_write)
    }
}

/// Size and modification time of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    size: u64,
    mtime: (i64, i64),
}

impl Stamp {
    pub fn of(path: &Path) -> Result<Stamp> {
        let meta =
            fs::metadata(path).with_context(|| format!("could not stat {}", path.display()))?;
        Ok(Stamp::from(&meta))
    }

    fn from(meta: &fs::Metadata) -> Stamp {
        Stamp {
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

/// Polls a replica file for a change: every written page with its new bytes, and the
/// export's size and mtime. Pages already seen holding their bytes are not read again, so a
/// poll reads at most the change's pages.
pub struct Arrival<'a> {
    change: &'a Change,
    /// Indices (in write order) of the pages not yet seen on the replica.
    pending: Vec<usize>,
    buffer: Vec<u8>,
}

impl<'a> Arrival<'a> {
    pub fn new(change: &'a Change) -> Arrival<'a> {
        Arrival {
            change,
            pending: (0..change.pages.len()).collect(),
            buffer: vec![0; PAGE],
        }
    }

    /// Pages not seen on the replica yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether `replica` now holds every page of the change and has the size and mtime of
    /// `expected`. A missing or short file is not there yet.
    pub fn advance(&mut self, replica: &Path, expected: Stamp) -> bool {
        let Ok(file) = File::open(replica) else {
            return false;
        };
        let (change, buffer) = (self.change, &mut self.buffer);
        self.pending.retain(|&index| {
            let arrived = file.read_exact_at(buffer, change.offset(index)).is_ok()
                && buffer[..] == *change.page_bytes(index);
            !arrived
        });
        self.pending.is_empty()
            && file
                .metadata()
                .is_ok_and(|meta| Stamp::from(&meta) == expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_distinct_within_the_file_and_follow_the_seed() {
        let pages = choose_pages(262_144, WRITES, 7).unwrap();
        assert_eq!(pages.len(), WRITES);
        assert!(pages.iter().all(|&page| page < 262_144));
        assert_eq!(pages.iter().collect::<HashSet<_>>().len(), WRITES);
        assert_eq!(pages, choose_pages(262_144, WRITES, 7).unwrap());
        assert_ne!(pages, choose_pages(262_144, WRITES, 8).unwrap());
        // Spread over the file, not bunched at its start.
        assert!(pages.iter().any(|&page| page > 262_144 / 2));
    }

    #[test]
    fn every_page_of_a_file_just_large_enough_is_chosen_once() {
        let mut pages = choose_pages(WRITES as u64, WRITES, 1).unwrap();
        pages.sort_unstable();
        assert_eq!(pages, (0..WRITES as u64).collect::<Vec<_>>());
        assert!(choose_pages(WRITES as u64 - 1, WRITES, 1).is_err());
    }

    #[test]
    fn changes_of_two_seeds_bring_different_bytes() {
        let a = Change::new(1 << 30, 0).unwrap();
        let b = Change::new(1 << 30, 1).unwrap();
        assert_eq!(a.bytes.len(), WRITES * PAGE);
        assert_ne!(a.page_bytes(0), b.page_bytes(0));
        assert_ne!(a.page_bytes(0), a.page_bytes(1));
        assert!(Change::new(WRITES as u64 * PAGE as u64 - 1, 0).is_err());
    }

    #[test]
    fn arrival_needs_every_page_and_the_stamp() {
        let dir = crate::tmpfs::make_temp_dir("imezzo-xtask-pages-test").unwrap();
        let (export, replica) = (dir.join("export"), dir.join("replica"));
        let size = 2 * WRITES * PAGE;
        fs::write(&export, vec![0xa5_u8; size]).unwrap();
        fs::write(&replica, vec![0xa5_u8; size]).unwrap();
        let change = Change::new(size as u64, 3).unwrap();
        let mut arrival = Arrival::new(&change);
        change.apply(&export).unwrap();
        let expected = Stamp::of(&export).unwrap();
        assert!(!arrival.advance(&replica, expected));
        assert_eq!(arrival.pending(), WRITES);

        // Half the pages arrive: they are not read again.
        let file = OpenOptions::new().write(true).open(&replica).unwrap();
        for index in 0..WRITES / 2 {
            file.write_all_at(change.page_bytes(index), change.offset(index))
                .unwrap();
        }
        assert!(!arrival.advance(&replica, expected));
        assert_eq!(arrival.pending(), WRITES / 2);

        // Every page, but not yet the export's mtime.
        for index in WRITES / 2..WRITES {
            file.write_all_at(change.page_bytes(index), change.offset(index))
                .unwrap();
        }
        file.set_modified(std::time::UNIX_EPOCH).unwrap();
        assert!(!arrival.advance(&replica, expected));
        assert_eq!(arrival.pending(), 0);
        file.set_modified(fs::metadata(&export).unwrap().modified().unwrap())
            .unwrap();
        drop(file);
        assert!(arrival.advance(&replica, expected));
        fs::remove_dir_all(&dir).unwrap();
    }
}
