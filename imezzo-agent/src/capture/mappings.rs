//! Shared writable mappings of watched files, by process, from the probes' mmap, munmap,
//! msync and process-exit reports.
//!
//! Why: a store through a shared mapping shows only as the dirty-inode event of the page
//! fault that makes a page dirty, and that fault comes *before* the bytes are stored; later
//! stores to a page already dirty show nothing at all until writeback cleans it (30 s by
//! default, never on tmpfs). So the file is journalled again, whole, when its mapping is
//! synced (`msync`), goes (`munmap`, a mapping replaced at its address) or its process
//! exits: by then the stores made through it are done. A mapping that lives on without
//! any of these is covered only by the dirty-inode events (docs/architecture.md).

use std::collections::HashMap;

/// Most mappings remembered at once; past that, a process's mappings are let go early and
/// their files journalled again at once (conservative: a refetch more, nothing missed that
/// the dirty-inode net would not miss anyway).
pub const MAX_MAPPINGS: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    ino: u64,
}

#[derive(Debug, Default)]
pub struct Mappings {
    by_tgid: HashMap<u32, Vec<Mapping>>,
    count: usize,
}

impl Mappings {
    /// Process `tgid` mapped `[addr, addr+len)` of inode `ino`. Returns the inodes of the
    /// mappings this one replaced (MAP_FIXED over them) or let go to stay bounded: their
    /// stores are done, journal them.
    pub fn mapped(&mut self, tgid: u32, addr: u64, len: u64, ino: u64) -> Vec<u64> {
        let mut ended = self.unmapped(tgid, addr, len);
        if self.count >= MAX_MAPPINGS {
            let victim = self.by_tgid.keys().copied().find(|&t| t != tgid);
            if let Some(t) = victim {
                ended.extend(self.exited(t));
            }
        }
        if self.count >= MAX_MAPPINGS {
            return ended;
        }
        self.by_tgid.entry(tgid).or_default().push(Mapping { start: addr, end: addr.saturating_add(len), ino });
        self.count += 1;
        ended
    }

    /// Process `tgid` synced `[addr, addr+len)`: the inodes mapped there.
    pub fn synced(&self, tgid: u32, addr: u64, len: u64) -> Vec<u64> {
        let end = addr.saturating_add(len);
        let mut inos: Vec<u64> = self
            .by_tgid
            .get(&tgid)
            .into_iter()
            .flatten()
            .filter(|m| m.start < end && addr < m.end)
            .map(|m| m.ino)
            .collect();
        inos.dedup();
        inos
    }

    /// Process `tgid` unmapped `[addr, addr+len)`: the inodes mapped there. A mapping only
    /// partly unmapped keeps what remains (a hole in its middle is not split off: the
    /// mapping is kept whole, so any later munmap or msync of it still finds it).
    pub fn unmapped(&mut self, tgid: u32, addr: u64, len: u64) -> Vec<u64> {
        let inos = self.synced(tgid, addr, len);
        let end = addr.saturating_add(len);
        if let Some(list) = self.by_tgid.get_mut(&tgid) {
            let before = list.len();
            for m in list.iter_mut().filter(|m| m.start < end && addr < m.end) {
                if addr <= m.start && end < m.end {
                    m.start = end;
                } else if m.start < addr && m.end <= end {
                    m.end = addr;
                }
            }
            list.retain(|m| !(addr <= m.start && m.end <= end));
            self.count -= before - list.len();
            if list.is_empty() {
                self.by_tgid.remove(&tgid);
            }
        }
        inos
    }

    /// Process `tgid` exited: the inodes of all its mappings.
    pub fn exited(&mut self, tgid: u32) -> Vec<u64> {
        let list = self.by_tgid.remove(&tgid).unwrap_or_default();
        self.count -= list.len();
        let mut inos: Vec<u64> = list.into_iter().map(|m| m.ino).collect();
        inos.sort_unstable();
        inos.dedup();
        inos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapping_is_found_by_any_overlapping_sync_or_unmap_of_its_process_only() {
        let mut m = Mappings::default();
        assert!(m.mapped(10, 0x1000, 0x3000, 7).is_empty());
        assert_eq!(m.synced(10, 0x2000, 0x10), vec![7]);
        assert!(m.synced(11, 0x2000, 0x10).is_empty(), "another process");
        assert!(m.synced(10, 0x4000, 0x1000).is_empty(), "past its end");
        assert_eq!(m.unmapped(10, 0x1000, 0x3000), vec![7]);
        assert!(m.synced(10, 0x2000, 0x10).is_empty(), "gone after its munmap");
        assert_eq!(m.count, 0);
    }

    #[test]
    fn a_partial_unmap_reports_the_file_and_keeps_the_rest() {
        let mut m = Mappings::default();
        m.mapped(10, 0x1000, 0x3000, 7);
        assert_eq!(m.unmapped(10, 0x1000, 0x1000), vec![7]);
        assert_eq!(m.unmapped(10, 0x2000, 0x2000), vec![7]);
        assert_eq!(m.count, 0);
    }

    #[test]
    fn a_mapping_placed_over_another_ends_it_and_an_exit_ends_all() {
        let mut m = Mappings::default();
        m.mapped(10, 0x1000, 0x1000, 7);
        assert_eq!(m.mapped(10, 0x1000, 0x1000, 8), vec![7]);
        m.mapped(10, 0x9000, 0x1000, 9);
        assert_eq!(m.exited(10), vec![8, 9]);
        assert!(m.exited(10).is_empty());
        assert_eq!(m.count, 0);
    }

    #[test]
    fn the_table_is_bounded_and_what_it_lets_go_is_reported() {
        let mut m = Mappings::default();
        for t in 0..MAX_MAPPINGS as u32 {
            m.mapped(t, 0x1000, 0x1000, t as u64);
        }
        let ended = m.mapped(u32::MAX, 0x1000, 0x1000, 1 << 40);
        assert_eq!(ended.len(), 1, "one process let go to make room");
        assert_eq!(m.count, MAX_MAPPINGS);
    }
}
