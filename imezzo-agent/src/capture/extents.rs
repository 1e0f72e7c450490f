//! Pending data writes, coalesced into extents per file until the next flush.
//!
//! Memory stays bounded whatever the event rate: one entry per file written since the last
//! flush, and at most [`MAX_RANGES`] ranges per file (beyond that, one covering range: the
//! replica re-reads a little more, nothing is lost).

use std::collections::HashMap;

pub const MAX_RANGES: usize = 32;

/// One file's pending change: (inode, whole file?, ranges `[start, end)`).
pub type PendingFile = (u64, bool, Vec<(u64, u64)>);

#[derive(Default, Debug)]
struct FileExtents {
    /// Sorted, disjoint, non-adjacent `[start, end)` ranges.
    ranges: Vec<(u64, u64)>,
    /// Changed somewhere we cannot say (the mmap safety net): the whole file.
    whole: bool,
}

#[derive(Default, Debug)]
pub struct Extents {
    order: Vec<u64>,
    files: HashMap<u64, FileExtents>,
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
        // Merge with every range that overlaps or touches [start, end).
        let (mut s, mut e) = (start, end);
        f.ranges.retain(|&(a, b)| {
            if b < s || a > e {
                true
            } else {
                s = s.min(a);
                e = e.max(b);
                false
            }
        });
        let at = f.ranges.partition_point(|&(a, _)| a < s);
        f.ranges.insert(at, (s, e));
        if f.ranges.len() > MAX_RANGES {
            let lo = f.ranges[0].0;
            let hi = f.ranges[f.ranges.len() - 1].1;
            f.ranges = vec![(lo, hi)];
        }
    }

    pub fn add_whole(&mut self, ino: u64) {
        let f = self.file(ino);
        f.whole = true;
        f.ranges.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Everything pending, in the order files were first written: (inode, whole, ranges).
    pub fn take(&mut self) -> Vec<PendingFile> {
        let files = std::mem::take(&mut self.files);
        let order = std::mem::take(&mut self.order);
        let mut files = files;
        order
            .into_iter()
            .filter_map(|ino| files.remove(&ino).map(|f| (ino, f.whole, f.ranges)))
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
        assert_eq!(x.take(), vec![(1, false, vec![(0, 10), (100, 300)])]);
    }

    #[test]
    fn ranges_per_file_are_bounded() {
        let mut x = Extents::default();
        for i in 0..1000u64 {
            x.add(1, i * 10, i * 10 + 1);
        }
        let taken = x.take();
        assert!(taken[0].2.len() <= MAX_RANGES);
        assert_eq!(taken[0].2.first().unwrap().0, 0);
        assert_eq!(taken[0].2.last().unwrap().1, 9991);
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
