//! Pending data writes, coalesced into extents per file until the next flush.
//!
//! The ranges are exact: a replica fetches the bytes that were written, not a range
//! covering them (256 random 4 KiB writes into a 1 GiB file used to become one 246 MiB
//! range). Memory and journal entries stay bounded whatever the pattern: a file with more
//! than [`MAX_RANGES_PER_FILE`] ranges, or the largest file while all of them together hold
//! more than [`MAX_RANGES`], is *coarsened*: its closest neighbours are merged (the gaps
//! between them joined) until a quarter of its ranges are gone. The replica then reads the
//! bytes between close writes too, which is the least it can read with fewer ranges, and
//! never the whole file because of the pattern alone.

use std::collections::{BTreeMap, HashMap};

/// Most exact ranges one file keeps pending before they are coarsened.
pub const MAX_RANGES_PER_FILE: usize = 16 * 1024;
/// Most ranges all pending files keep together before the largest is coarsened.
pub const MAX_RANGES: usize = 64 * 1024;

/// One file's pending change: (inode, whole file?, ranges `[start, end)`).
pub type PendingFile = (u64, bool, Vec<(u64, u64)>);

#[derive(Default, Debug)]
struct FileExtents {
    /// Disjoint, non-adjacent `[start, end)` ranges, by start.
    ranges: BTreeMap<u64, u64>,
    /// Changed somewhere we cannot say (the mmap safety net): the whole file.
    whole: bool,
}

impl FileExtents {
    /// Adds `[s, e)`, merging what it overlaps or touches. Returns how many ranges the
    /// file holds more (or fewer) than before.
    fn insert(&mut self, mut s: u64, mut e: u64) -> isize {
        let before = self.ranges.len();
        if let Some((&a, &b)) = self.ranges.range(..=s).next_back() {
            if b >= s {
                self.ranges.remove(&a);
                s = a;
                e = e.max(b);
            }
        }
        while let Some((&a, &b)) = self.ranges.range(s..=e).next() {
            self.ranges.remove(&a);
            e = e.max(b);
        }
        self.ranges.insert(s, e);
        self.ranges.len() as isize - before as isize
    }

    /// Merges the closest neighbours until a quarter of the ranges are gone. Returns the
    /// change in the number of ranges.
    fn coarsen(&mut self) -> isize {
        let v: Vec<(u64, u64)> = std::mem::take(&mut self.ranges).into_iter().collect();
        let merges = v.len() / 4;
        // The gaps, smallest first: gap i lies between range i and range i+1.
        let mut gaps: Vec<(u64, usize)> = v.windows(2).enumerate().map(|(i, w)| (w[1].0 - w[0].1, i)).collect();
        let mut join = vec![false; v.len()];
        if merges > 0 {
            gaps.select_nth_unstable(merges - 1);
            for &(_, i) in &gaps[..merges] {
                join[i] = true;
            }
        }
        let mut start = None;
        for (i, &(s, e)) in v.iter().enumerate() {
            let s = *start.get_or_insert(s);
            if !join[i] {
                self.ranges.insert(s, e);
                start = None;
            }
        }
        self.ranges.len() as isize - v.len() as isize
    }
}

#[derive(Default, Debug)]
pub struct Extents {
    order: Vec<u64>,
    files: HashMap<u64, FileExtents>,
    /// Ranges held by all files together.
    total: usize,
    /// Coarsenings since the counter was last read (for the capture's statistics).
    coarsened: u64,
}

impl Extents {
    fn file(&mut self, ino: u64) -> &mut FileExtents {
        if !self.files.contains_key(&ino) {
            self.order.push(ino);
        }
        self.files.entry(ino).or_default()
    }

    pub fn add(&mut self, ino: u64, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let f = self.file(ino);
        if f.whole {
            return;
        }
        let mut delta = f.insert(start, end);
        if f.ranges.len() > MAX_RANGES_PER_FILE {
            delta += f.coarsen();
            self.coarsened += 1;
        }
        self.total = self.total.saturating_add_signed(delta);
        while self.total > MAX_RANGES {
            // The file with the most ranges gives way; files of a few ranges each cannot,
            // and then they are bounded by the events of one batch anyway.
            let Some(big) = self.files.values_mut().filter(|f| f.ranges.len() >= 4).max_by_key(|f| f.ranges.len())
            else {
                break;
            };
            let d = big.coarsen();
            self.total = self.total.saturating_add_signed(d);
            self.coarsened += 1;
        }
    }

    pub fn add_whole(&mut self, ino: u64) {
        let f = self.file(ino);
        f.whole = true;
        let n = f.ranges.len();
        f.ranges.clear();
        self.total -= n;
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// How many times a file's ranges were coarsened since the last call.
    pub fn take_coarsened(&mut self) -> u64 {
        std::mem::take(&mut self.coarsened)
    }

    /// Everything pending, in the order files were first written: (inode, whole, ranges).
    pub fn take(&mut self) -> Vec<PendingFile> {
        let mut files = std::mem::take(&mut self.files);
        let order = std::mem::take(&mut self.order);
        self.total = 0;
        order
            .into_iter()
            .filter_map(|ino| files.remove(&ino).map(|f| (ino, f.whole, f.ranges.into_iter().collect())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_writes_coalesce_into_one_extent() {
        let mut x = Extents::default();
        for i in 0..1000u64 {
            x.add(5, i * 4096, (i + 1) * 4096);
        }
        assert_eq!(x.take(), vec![(5, false, vec![(0, 4096 * 1000)])]);
        assert!(x.is_empty());
    }

    #[test]
    fn disjoint_writes_stay_apart_and_overlaps_merge() {
        let mut x = Extents::default();
        x.add(1, 100, 200);
        x.add(1, 0, 10);
        x.add(1, 150, 300);
        x.add(1, 300, 310);
        x.add(1, 5, 20);
        assert_eq!(x.take(), vec![(1, false, vec![(0, 20), (100, 310)])]);
    }

    #[test]
    fn a_write_spanning_several_ranges_merges_them_all() {
        let mut x = Extents::default();
        for i in 0..10u64 {
            x.add(1, i * 100, i * 100 + 10);
        }
        x.add(1, 50, 750);
        assert_eq!(x.take(), vec![(1, false, vec![(0, 10), (50, 750), (800, 810), (900, 910)])]);
    }

    #[test]
    fn random_page_writes_into_a_large_file_stay_exact() {
        // The case: 256 random 4 KiB writes into 1 GiB, in one batch.
        let mut x = Extents::default();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut want = std::collections::BTreeSet::new();
        for _ in 0..256 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let page = state % (1 << 18);
            want.insert(page);
            x.add(7, page * 4096, page * 4096 + 4096);
        }
        let taken = x.take();
        let bytes: u64 = taken[0].2.iter().map(|(s, e)| e - s).sum();
        assert_eq!(bytes, want.len() as u64 * 4096, "only the pages written");
        assert_eq!(x.take_coarsened(), 0);
    }

    #[test]
    fn past_the_bound_a_file_merges_its_closest_writes_never_into_one_covering_range() {
        let mut x = Extents::default();
        // One-byte writes 1 MiB apart, and every tenth one 4 KiB from its neighbour: past
        // MAX_RANGES_PER_FILE, the close pairs are merged first.
        let n = MAX_RANGES_PER_FILE as u64 + 1;
        let at = |i: u64| if i % 10 == 9 { ((i - 1) << 20) + 4096 } else { i << 20 };
        for i in 0..n {
            x.add(1, at(i), at(i) + 1);
        }
        assert_eq!(x.take_coarsened(), 1);
        let taken = x.take();
        let ranges = &taken[0].2;
        assert!(ranges.len() <= MAX_RANGES_PER_FILE * 3 / 4 + 1, "{} ranges", ranges.len());
        // The close pairs cost 4 KiB each, the other merges 1 MiB each.
        let bytes: u64 = ranges.iter().map(|(s, e)| e - s).sum();
        let merges = n - ranges.len() as u64;
        let close = n / 10;
        assert!(bytes <= n + close * 4096 + (merges - close) * (1 << 20), "{bytes} bytes for {n} written");
        for i in 0..n {
            assert!(ranges.iter().any(|&(s, e)| s <= at(i) && at(i) < e), "write at {} not covered", at(i));
        }
    }

    #[test]
    fn all_files_together_are_bounded() {
        let mut x = Extents::default();
        // 40 files of 3000 ranges each: 120 000 exact ranges would be pending.
        for f in 0..40u64 {
            for i in 0..3000u64 {
                x.add(f, i << 20, (i << 20) + 1);
            }
        }
        assert!(x.total <= MAX_RANGES, "{} ranges pending", x.total);
        let taken = x.take();
        let sum: usize = taken.iter().map(|t| t.2.len()).sum();
        assert!(sum <= MAX_RANGES);
        assert_eq!(taken.len(), 40);
        assert!(x.take_coarsened() > 0);
    }

    #[test]
    fn a_whole_file_change_drops_its_ranges() {
        let mut x = Extents::default();
        x.add(1, 0, 10);
        x.add(1, 100, 110);
        x.add_whole(1);
        x.add(1, 200, 210);
        assert_eq!(x.total, 0);
        assert_eq!(x.take(), vec![(1, true, vec![])]);
    }

    #[test]
    fn files_flush_in_first_write_order() {
        let mut x = Extents::default();
        x.add(9, 0, 1);
        x.add(3, 0, 1);
        x.add(9, 1, 2);
        x.add_whole(4);
        let order: Vec<u64> = x.take().into_iter().map(|(i, _, _)| i).collect();
        assert_eq!(order, vec![9, 3, 4]);
    }
}
