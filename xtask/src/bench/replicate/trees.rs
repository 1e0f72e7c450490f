//! The data of the throughput rows, and how the bench tells that a replica has caught up.
//!
//! Bytes are incompressible (from a pseudo-random pool) and no two 4 KiB blocks are equal
//! (each starts with its own number), so neither compression nor block matching can make a
//! tool look faster than the bytes it moves.

use std::{
    fs::{self, File},
    io::Write,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result};

use crate::exec;

const MIB: usize = 1 << 20;
const BLOCK: usize = 4096;
/// Size of the pool of random bytes the data is cut from.
const POOL: usize = 16 * MIB;
/// Directories the small files are spread over.
pub const SMALL_DIRS: u64 = 100;
/// Directories the million files are spread over.
pub const MILLION_DIRS: u64 = 1000;

/// Pseudo-random bytes, made once.
pub struct Pool(Vec<u8>);

impl Pool {
    pub fn new() -> Pool {
        let mut state = 0x1234_5678_9abc_def0_u64;
        let mut bytes = Vec::with_capacity(POOL);
        while bytes.len() < POOL {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            bytes.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        Pool(bytes)
    }

    /// `len` bytes for piece `index` of some data: a slice of the pool chosen by the index,
    /// each 4 KiB block stamped with (index, block number).
    fn fill(&self, index: u64, out: &mut Vec<u8>, len: usize) {
        out.clear();
        let start = (index as usize).wrapping_mul(7919 * BLOCK) % (POOL - len.min(POOL)).max(1);
        out.extend_from_slice(&self.0[start..start + len]);
        for (block, chunk) in out.chunks_mut(BLOCK).enumerate() {
            let stamp = index.rotate_left(20) ^ block as u64;
            let n = chunk.len().min(8);
            chunk[..n].copy_from_slice(&stamp.to_le_bytes()[..n]);
        }
    }
}

/// When the writing of a data set began and when its last file was closed.
#[derive(Clone, Copy)]
pub struct WriteTimes {
    pub first_write: Instant,
    pub last_close: Instant,
}

/// The name of the one big file.
pub const BIG_FILE: &str = "big.bin";

/// One file of `mib` MiB, [`BIG_FILE`], written in 1 MiB writes.
pub fn write_big(dir: &Path, mib: u64, pool: &Pool) -> Result<WriteTimes> {
    let path = dir.join(BIG_FILE);
    let mut chunk = Vec::with_capacity(MIB);
    let first_write = Instant::now();
    let mut file =
        File::create(&path).with_context(|| format!("could not create {}", path.display()))?;
    for index in 0..mib {
        pool.fill(index, &mut chunk, MIB);
        file.write_all(&chunk)
            .with_context(|| format!("could not write {}", path.display()))?;
        if index % 64 == 0 {
            exec::bail_if_interrupted()?;
        }
    }
    drop(file);
    Ok(WriteTimes {
        first_write,
        last_close: Instant::now(),
    })
}

/// Size of small file `index`: 1 to 8 KiB, spread evenly.
pub fn small_size(index: u64) -> usize {
    1024 + (index.wrapping_mul(2_654_435_761) % (7 * 1024 + 1)) as usize
}

/// Bytes of `count` small files.
pub fn small_bytes(count: u64) -> u64 {
    (0..count).map(|i| small_size(i) as u64).sum()
}

/// `count` files of 1 to 8 KiB, `s<i % 100>/f<i>`; the directories are made first.
pub fn write_small(dir: &Path, count: u64, pool: &Pool) -> Result<WriteTimes> {
    for d in 0..SMALL_DIRS.min(count) {
        let sub = dir.join(format!("s{d}"));
        fs::create_dir(&sub).with_context(|| format!("could not create {}", sub.display()))?;
    }
    let mut bytes = Vec::with_capacity(8 * 1024);
    let first_write = Instant::now();
    for i in 0..count {
        let path = dir.join(format!("s{}/f{i}", i % SMALL_DIRS));
        pool.fill(i, &mut bytes, small_size(i));
        fs::write(&path, &bytes).with_context(|| format!("could not write {}", path.display()))?;
        if i % 1024 == 0 {
            exec::bail_if_interrupted()?;
        }
    }
    Ok(WriteTimes {
        first_write,
        last_close: Instant::now(),
    })
}

/// `count` empty files, `m<i % 1000>/e<i>`: the million-file export.
pub fn write_empty(dir: &Path, count: u64) -> Result<()> {
    for d in 0..MILLION_DIRS.min(count) {
        let sub = dir.join(format!("m{d}"));
        fs::create_dir(&sub).with_context(|| format!("could not create {}", sub.display()))?;
    }
    for i in 0..count {
        let path = dir.join(format!("m{}/e{i}", i % MILLION_DIRS));
        File::create(&path).with_context(|| format!("could not create {}", path.display()))?;
        if i % 4096 == 0 {
            exec::bail_if_interrupted()?;
        }
    }
    Ok(())
}

/// Size and modification time of every regular file of a tree, relative paths.
pub struct Snapshot {
    files: Vec<(PathBuf, u64, i64, i64)>,
}

impl Snapshot {
    pub fn take(root: &Path) -> Result<Snapshot> {
        let mut files = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = root.join(&rel);
            for entry in
                fs::read_dir(&dir).with_context(|| format!("could not list {}", dir.display()))?
            {
                let entry = entry.with_context(|| format!("could not list {}", dir.display()))?;
                let meta = entry
                    .metadata()
                    .with_context(|| format!("could not stat {}", entry.path().display()))?;
                let rel = rel.join(entry.file_name());
                if meta.is_dir() {
                    stack.push(rel);
                } else if meta.is_file() {
                    files.push((rel, meta.size(), meta.mtime(), meta.mtime_nsec()));
                }
            }
        }
        Ok(Snapshot { files })
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }
}

/// Walks a replica against a [`Snapshot`], resuming where the last walk met a file not yet
/// there, so that polling a large tree costs little while it fills.
pub struct Catchup {
    next: usize,
}

impl Catchup {
    pub fn new() -> Catchup {
        Catchup { next: 0 }
    }

    /// Whether every file of the snapshot now has its size and mtime under `replica`
    /// (files already matched are not looked at again).
    pub fn advance(&mut self, snapshot: &Snapshot, replica: &Path) -> bool {
        while let Some((rel, size, sec, nsec)) = snapshot.files.get(self.next) {
            match fs::symlink_metadata(replica.join(rel)) {
                Ok(meta)
                    if meta.is_file()
                        && meta.size() == *size
                        && meta.mtime() == *sec
                        && meta.mtime_nsec() == *nsec => {}
                _ => return false,
            }
            self.next += 1;
        }
        true
    }

    /// The file the last walk stopped at, not yet matched on the replica.
    pub fn waiting_on<'a>(&self, snapshot: &'a Snapshot) -> Option<&'a Path> {
        snapshot.files.get(self.next).map(|(rel, ..)| rel.as_path())
    }

    /// Starts over, after a full comparison found a difference.
    pub fn restart(&mut self) {
        self.next = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_files_are_one_to_eight_kib() {
        let sizes: Vec<usize> = (0..10_000).map(small_size).collect();
        assert!(sizes.iter().all(|&s| (1024..=8 * 1024).contains(&s)));
        let mean = sizes.iter().sum::<usize>() / sizes.len();
        assert!((4000..5300).contains(&mean), "mean {mean}");
    }

    #[test]
    fn pieces_differ_in_every_block() {
        let pool = Pool::new();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        pool.fill(0, &mut a, MIB);
        pool.fill(16, &mut b, MIB);
        assert_eq!(a.len(), MIB);
        for (x, y) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
            assert_ne!(x, y);
        }
        let blocks: std::collections::HashSet<&[u8]> = a.chunks(BLOCK).collect();
        assert_eq!(
            blocks.len(),
            MIB / BLOCK,
            "no two blocks of a piece are equal"
        );
    }
}
