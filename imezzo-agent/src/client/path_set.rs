//! A set of paths packed into one byte array: what a full sync remembers of the manifest.
//!
//! A full sync must know, when it sweeps the replica at the end, every path the manifest
//! named. As a `HashSet<Vec<u8>>` a million paths cost some 80 MB (a 24-byte `Vec` in each
//! slot of a table kept at most 7/8 full, and a heap block per path); here each path is its
//! bytes and a length prefix in one array, found through a table of 4-byte offsets: about a
//! third of that, which is what keeps a client's full sync of a million files inside its
//! memory target.

use std::hash::BuildHasher;

#[derive(Default)]
pub(crate) struct PathSet {
    /// Each path as a LEB128 length and its bytes, in insertion order.
    bytes: Vec<u8>,
    /// Offsets into `bytes` of each path's length prefix.
    index: hashbrown::HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl PathSet {
    /// Adds `path`; false if it was already there.
    pub fn insert(&mut self, path: &[u8]) -> bool {
        let hash = self.hasher.hash_one(path);
        let bytes = &self.bytes;
        if self.index.find(hash, |&at| entry(bytes, at).1 == path).is_some() {
            return false;
        }
        let at = u32::try_from(self.bytes.len()).expect("the paths of one sync take less than 4 GiB");
        let mut len = path.len();
        loop {
            let low = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                self.bytes.push(low);
                break;
            }
            self.bytes.push(low | 0x80);
        }
        self.bytes.extend_from_slice(path);
        let (bytes, hasher) = (&self.bytes, &self.hasher);
        self.index.insert_unique(hash, at, |&at| hasher.hash_one(entry(bytes, at).1));
        true
    }

    pub fn contains(&self, path: &[u8]) -> bool {
        let bytes = &self.bytes;
        self.index.find(self.hasher.hash_one(path), |&at| entry(bytes, at).1 == path).is_some()
    }

    /// Every path, in the order they were first inserted.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            if at >= self.bytes.len() {
                return None;
            }
            let (next, path) = entry(&self.bytes, at as u32);
            at = next;
            Some(path)
        })
    }
}

/// The path stored at `at`, and where the next one starts.
fn entry(bytes: &[u8], at: u32) -> (usize, &[u8]) {
    let mut at = at as usize;
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let byte = bytes[at];
        at += 1;
        len |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    (at + len, &bytes[at..at + len])
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn holds_each_path_once_and_lists_them_in_insertion_order() {
        let long = vec![b'x'; 300];
        let paths: Vec<&[u8]> = vec![b"a", b"", b"a/b", &long, b"a/b/c"];
        let mut set = PathSet::default();
        for path in &paths {
            assert!(set.insert(path));
        }
        for path in &paths {
            assert!(!set.insert(path), "{path:?} inserted twice");
            assert!(set.contains(path));
        }
        assert!(!set.contains(b"a/"));
        assert!(!set.contains(&long[1..]));
        assert_eq!(set.iter().collect::<Vec<_>>(), paths);
    }

    #[test]
    fn agrees_with_a_hash_set_over_many_paths() {
        let mut set = PathSet::default();
        let mut reference = BTreeSet::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 200) as usize;
            let path: Vec<u8> = (0..len).map(|i| b'a' + ((state >> (i % 60)) % 3) as u8).collect();
            assert_eq!(set.insert(&path), reference.insert(path.clone()));
        }
        for path in &reference {
            assert!(set.contains(path));
        }
        let listed: BTreeSet<Vec<u8>> = set.iter().map(<[u8]>::to_vec).collect();
        assert_eq!(listed, reference);
    }
}
