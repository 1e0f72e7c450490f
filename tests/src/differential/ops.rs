//! The operations a differential worker performs: generated from a seed, printed one a line
//! (`kind key=value ...`, the line is also what [`Op::parse`] reads back, so a log replays),
//! and executed with the raw syscall each one names.
//!
//! Paths are relative to the export root and drawn from a small namespace (four short names
//! and one 255-byte name, up to three levels deep), so that concurrent workers collide:
//! renames over existing objects, exchanges of a directory and a file, links into a directory
//! another worker is removing. Most operations therefore fail now and then (ENOENT, EEXIST,
//! ENOTDIR...): the log records each result, and a failure is part of the workload, not an
//! error of the tester.

use crate::replica::Rng;
use std::ffi::CString;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The 255-byte name of the namespace (NAME_MAX).
pub fn long_name() -> String {
    let mut s = String::from("long-");
    while s.len() < 255 {
        s.push((b'a' + (s.len() % 26) as u8) as char);
    }
    s
}

/// `a` and `b` are mostly directories, the others mostly leaves; any may be anything.
const SHORT_NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
/// Where the fault injector's fill files go: outside the workers' namespace.
pub const FILL_PREFIX: &str = "fill-";
/// Largest offset of a far write or fallocate (sparse files stay cheap to compare).
const FAR: u64 = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteHow {
    Write,
    Pwrite,
    Writev,
    Pwritev,
    Pwritev2,
    Append,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyHow {
    CopyFileRange,
    Sendfile,
    Splice,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Fifo,
    Sock,
    Chr,
    Blk,
}

/// One operation. Field meanings follow the syscalls; `seed` fields make data, symlink
/// targets and xattr values reproducible from the line alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Create {
        p: String,
        mode: u32,
    },
    Write {
        p: String,
        how: WriteHow,
        off: u64,
        len: u64,
        seed: u64,
    },
    Copy {
        src: String,
        dst: String,
        how: CopyHow,
        off_in: u64,
        off_out: u64,
        len: u64,
    },
    /// mode: 0, or FALLOC_FL_KEEP_SIZE (1), PUNCH_HOLE|KEEP_SIZE (3), ZERO_RANGE (16).
    Fallocate {
        p: String,
        mode: i32,
        off: u64,
        len: u64,
    },
    Truncate {
        p: String,
        len: u64,
        fd: bool,
    },
    /// Stores through a shared mapping of an existing range, msync, munmap.
    Mmap {
        p: String,
        off: u64,
        len: u64,
        seed: u64,
    },
    /// One IORING_OP_WRITE forced to an io-wq worker thread.
    IoUring {
        p: String,
        off: u64,
        len: u64,
        seed: u64,
    },
    Mkdir {
        p: String,
        mode: u32,
    },
    Mknod {
        p: String,
        kind: NodeKind,
        major: u32,
        minor: u32,
        mode: u32,
    },
    Symlink {
        p: String,
        tlen: usize,
        seed: u64,
    },
    /// linkat without AT_SYMLINK_FOLLOW: works for every type but directories.
    Link {
        old: String,
        new: String,
    },
    /// O_TMPFILE in `dir` ("." is the root), `len` bytes written, then linkat to `p`.
    Tmpfile {
        dir: String,
        p: String,
        len: u64,
        seed: u64,
    },
    /// renameat2 flags: 0, RENAME_NOREPLACE (1), RENAME_EXCHANGE (2), RENAME_WHITEOUT (4).
    Rename {
        old: String,
        new: String,
        flags: u32,
    },
    Unlink {
        p: String,
    },
    Rmdir {
        p: String,
    },
    /// rm -rf (never follows symlinks).
    RmTree {
        p: String,
    },
    SetXattr {
        p: String,
        name: String,
        len: usize,
        seed: u64,
        nofollow: bool,
    },
    RemoveXattr {
        p: String,
        name: String,
        nofollow: bool,
    },
    Chmod {
        p: String,
        mode: u32,
    },
    Chown {
        p: String,
        uid: u32,
        gid: u32,
        nofollow: bool,
    },
    /// Seconds of -1 mean UTIME_NOW, -2 UTIME_OMIT.
    Utimes {
        p: String,
        asec: i64,
        ansec: i64,
        msec: i64,
        mnsec: i64,
        nofollow: bool,
    },
    /// A small tree built in the sibling directory (same file system), renamed to `p`.
    MoveIn {
        p: String,
        n: u32,
        seed: u64,
    },
    /// `p` renamed into the sibling directory; removed there unless `keep`.
    MoveOut {
        p: String,
        seed: u64,
        keep: bool,
    },
    /// `mb` MiB of real data written to `p` (the fault injector's fill of the replica).
    Fill {
        p: String,
        mb: u64,
    },
}

fn name_of(k: NodeKind) -> &'static str {
    match k {
        NodeKind::Fifo => "fifo",
        NodeKind::Sock => "sock",
        NodeKind::Chr => "chr",
        NodeKind::Blk => "blk",
    }
}

fn write_how_name(h: WriteHow) -> &'static str {
    match h {
        WriteHow::Write => "write",
        WriteHow::Pwrite => "pwrite",
        WriteHow::Writev => "writev",
        WriteHow::Pwritev => "pwritev",
        WriteHow::Pwritev2 => "pwritev2",
        WriteHow::Append => "append",
    }
}

fn copy_how_name(h: CopyHow) -> &'static str {
    match h {
        CopyHow::CopyFileRange => "copy_file_range",
        CopyHow::Sendfile => "sendfile",
        CopyHow::Splice => "splice",
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Create { p, mode } => write!(f, "create p={p} mode={mode:o}"),
            Op::Write {
                p,
                how,
                off,
                len,
                seed,
            } => write!(
                f,
                "write p={p} how={} off={off} len={len} seed={seed}",
                write_how_name(*how)
            ),
            Op::Copy {
                src,
                dst,
                how,
                off_in,
                off_out,
                len,
            } => write!(
                f,
                "copy src={src} dst={dst} how={} off_in={off_in} off_out={off_out} len={len}",
                copy_how_name(*how)
            ),
            Op::Fallocate { p, mode, off, len } => {
                write!(f, "fallocate p={p} mode={mode} off={off} len={len}")
            }
            Op::Truncate { p, len, fd } => write!(f, "truncate p={p} len={len} fd={}", *fd as u8),
            Op::Mmap { p, off, len, seed } => {
                write!(f, "mmap p={p} off={off} len={len} seed={seed}")
            }
            Op::IoUring { p, off, len, seed } => {
                write!(f, "io_uring p={p} off={off} len={len} seed={seed}")
            }
            Op::Mkdir { p, mode } => write!(f, "mkdir p={p} mode={mode:o}"),
            Op::Mknod {
                p,
                kind,
                major,
                minor,
                mode,
            } => write!(
                f,
                "mknod p={p} kind={} major={major} minor={minor} mode={mode:o}",
                name_of(*kind)
            ),
            Op::Symlink { p, tlen, seed } => write!(f, "symlink p={p} tlen={tlen} seed={seed}"),
            Op::Link { old, new } => write!(f, "link old={old} new={new}"),
            Op::Tmpfile { dir, p, len, seed } => {
                write!(f, "tmpfile dir={dir} p={p} len={len} seed={seed}")
            }
            Op::Rename { old, new, flags } => write!(
                f,
                "rename old={old} new={new} flags={}",
                match flags {
                    0 => "0",
                    1 => "noreplace",
                    2 => "exchange",
                    4 => "whiteout",
                    _ => "?",
                }
            ),
            Op::Unlink { p } => write!(f, "unlink p={p}"),
            Op::Rmdir { p } => write!(f, "rmdir p={p}"),
            Op::RmTree { p } => write!(f, "rmtree p={p}"),
            Op::SetXattr {
                p,
                name,
                len,
                seed,
                nofollow,
            } => write!(
                f,
                "setxattr p={p} name={name} len={len} seed={seed} nofollow={}",
                *nofollow as u8
            ),
            Op::RemoveXattr { p, name, nofollow } => {
                write!(
                    f,
                    "removexattr p={p} name={name} nofollow={}",
                    *nofollow as u8
                )
            }
            Op::Chmod { p, mode } => write!(f, "chmod p={p} mode={mode:o}"),
            Op::Chown {
                p,
                uid,
                gid,
                nofollow,
            } => {
                write!(
                    f,
                    "chown p={p} uid={uid} gid={gid} nofollow={}",
                    *nofollow as u8
                )
            }
            Op::Utimes {
                p,
                asec,
                ansec,
                msec,
                mnsec,
                nofollow,
            } => write!(
                f,
                "utimes p={p} atime={asec}.{ansec:09} mtime={msec}.{mnsec:09} nofollow={}",
                *nofollow as u8
            ),
            Op::MoveIn { p, n, seed } => write!(f, "movein p={p} n={n} seed={seed}"),
            Op::MoveOut { p, seed, keep } => {
                write!(f, "moveout p={p} seed={seed} keep={}", *keep as u8)
            }
            Op::Fill { p, mb } => write!(f, "fill p={p} mb={mb}"),
        }
    }
}

impl Op {
    /// Reads back a line printed by `Display` (anything after a tab is a comment).
    pub fn parse(line: &str) -> Result<Op, String> {
        let line = line.split('\t').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let kind = words.next().ok_or("empty line")?;
        let mut kv = std::collections::HashMap::new();
        for w in words {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| format!("not key=value: {w:?}"))?;
            kv.insert(k, v);
        }
        let s = |k: &str| -> Result<String, String> {
            kv.get(k)
                .map(|v| v.to_string())
                .ok_or_else(|| format!("{kind}: missing {k}="))
        };
        let n = |k: &str| -> Result<u64, String> {
            s(k)?
                .parse::<u64>()
                .map_err(|e| format!("{kind}: {k}: {e}"))
        };
        let i = |k: &str| -> Result<i64, String> {
            s(k)?
                .parse::<i64>()
                .map_err(|e| format!("{kind}: {k}: {e}"))
        };
        let o = |k: &str| -> Result<u32, String> {
            u32::from_str_radix(&s(k)?, 8).map_err(|e| format!("{kind}: {k}: {e}"))
        };
        let b = |k: &str| -> Result<bool, String> { Ok(n(k)? != 0) };
        let time = |k: &str| -> Result<(i64, i64), String> {
            let v = s(k)?;
            let (a, b) = v
                .split_once('.')
                .ok_or_else(|| format!("{kind}: {k}: no '.'"))?;
            Ok((
                a.parse().map_err(|e| format!("{k}: {e}"))?,
                b.parse().map_err(|e| format!("{k}: {e}"))?,
            ))
        };
        Ok(match kind {
            "create" => Op::Create {
                p: s("p")?,
                mode: o("mode")?,
            },
            "write" => Op::Write {
                p: s("p")?,
                how: match s("how")?.as_str() {
                    "write" => WriteHow::Write,
                    "pwrite" => WriteHow::Pwrite,
                    "writev" => WriteHow::Writev,
                    "pwritev" => WriteHow::Pwritev,
                    "pwritev2" => WriteHow::Pwritev2,
                    "append" => WriteHow::Append,
                    h => return Err(format!("write: how={h}?")),
                },
                off: n("off")?,
                len: n("len")?,
                seed: n("seed")?,
            },
            "copy" => Op::Copy {
                src: s("src")?,
                dst: s("dst")?,
                how: match s("how")?.as_str() {
                    "copy_file_range" => CopyHow::CopyFileRange,
                    "sendfile" => CopyHow::Sendfile,
                    "splice" => CopyHow::Splice,
                    h => return Err(format!("copy: how={h}?")),
                },
                off_in: n("off_in")?,
                off_out: n("off_out")?,
                len: n("len")?,
            },
            "fallocate" => Op::Fallocate {
                p: s("p")?,
                mode: i("mode")? as i32,
                off: n("off")?,
                len: n("len")?,
            },
            "truncate" => Op::Truncate {
                p: s("p")?,
                len: n("len")?,
                fd: b("fd")?,
            },
            "mmap" => Op::Mmap {
                p: s("p")?,
                off: n("off")?,
                len: n("len")?,
                seed: n("seed")?,
            },
            "io_uring" => Op::IoUring {
                p: s("p")?,
                off: n("off")?,
                len: n("len")?,
                seed: n("seed")?,
            },
            "mkdir" => Op::Mkdir {
                p: s("p")?,
                mode: o("mode")?,
            },
            "mknod" => Op::Mknod {
                p: s("p")?,
                kind: match s("kind")?.as_str() {
                    "fifo" => NodeKind::Fifo,
                    "sock" => NodeKind::Sock,
                    "chr" => NodeKind::Chr,
                    "blk" => NodeKind::Blk,
                    k => return Err(format!("mknod: kind={k}?")),
                },
                major: n("major")? as u32,
                minor: n("minor")? as u32,
                mode: o("mode")?,
            },
            "symlink" => Op::Symlink {
                p: s("p")?,
                tlen: n("tlen")? as usize,
                seed: n("seed")?,
            },
            "link" => Op::Link {
                old: s("old")?,
                new: s("new")?,
            },
            "tmpfile" => Op::Tmpfile {
                dir: s("dir")?,
                p: s("p")?,
                len: n("len")?,
                seed: n("seed")?,
            },
            "rename" => Op::Rename {
                old: s("old")?,
                new: s("new")?,
                flags: match s("flags")?.as_str() {
                    "0" => 0,
                    "noreplace" => 1,
                    "exchange" => 2,
                    "whiteout" => 4,
                    f => return Err(format!("rename: flags={f}?")),
                },
            },
            "unlink" => Op::Unlink { p: s("p")? },
            "rmdir" => Op::Rmdir { p: s("p")? },
            "rmtree" => Op::RmTree { p: s("p")? },
            "setxattr" => Op::SetXattr {
                p: s("p")?,
                name: s("name")?,
                len: n("len")? as usize,
                seed: n("seed")?,
                nofollow: b("nofollow")?,
            },
            "removexattr" => Op::RemoveXattr {
                p: s("p")?,
                name: s("name")?,
                nofollow: b("nofollow")?,
            },
            "chmod" => Op::Chmod {
                p: s("p")?,
                mode: o("mode")?,
            },
            "chown" => Op::Chown {
                p: s("p")?,
                uid: n("uid")? as u32,
                gid: n("gid")? as u32,
                nofollow: b("nofollow")?,
            },
            "utimes" => {
                let (asec, ansec) = time("atime")?;
                let (msec, mnsec) = time("mtime")?;
                Op::Utimes {
                    p: s("p")?,
                    asec,
                    ansec,
                    msec,
                    mnsec,
                    nofollow: b("nofollow")?,
                }
            }
            "movein" => Op::MoveIn {
                p: s("p")?,
                n: n("n")? as u32,
                seed: n("seed")?,
            },
            "moveout" => Op::MoveOut {
                p: s("p")?,
                seed: n("seed")?,
                keep: b("keep")?,
            },
            "fill" => Op::Fill {
                p: s("p")?,
                mb: n("mb")?,
            },
            k => return Err(format!("unknown operation {k:?}")),
        })
    }
}

// ---------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------

/// The operations of one worker: a pure function of (seed, worker, count).
pub fn generate(seed: u64, worker: u32, count: usize) -> Vec<Op> {
    let mut g = Gen {
        rng: Rng(seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(u64::from(worker).wrapping_mul(0x2545_f491_4f6c_dd1d) + 1)),
        long: long_name(),
        mid: long_name()[..120].to_string(),
    };
    (0..count).map(|_| g.op()).collect()
}

struct Gen {
    rng: Rng,
    /// NAME_MAX bytes: as a leaf at the top only, the path argument stays within the 256
    /// bytes the probes copy; deeper it makes the server rescan (by design), which the
    /// generator keeps rare so that rescans do not hide the other divergences.
    long: String,
    /// 120 bytes: long names in directories too.
    mid: String,
}

impl Gen {
    fn pct(&mut self, p: u64) -> bool {
        self.rng.below(100) < p
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.rng.below(xs.len() as u64) as usize]
    }

    /// A leaf name: any of the namespace.
    fn name(&mut self) -> String {
        match self.rng.below(100) {
            0..=2 => self.long.clone(),
            5..=7 => self.mid.clone(),
            8..=24 => self.pick(&SHORT_NAMES[..2]).to_string(),
            _ => self.pick(&SHORT_NAMES[2..]).to_string(),
        }
    }

    /// A directory component: mostly `a` or `b`, so that directories exist to go into.
    fn dir_name(&mut self) -> String {
        match self.rng.below(100) {
            0..=84 => self.pick(&SHORT_NAMES[..2]).to_string(),
            85..=87 => self.mid.clone(),
            _ => self.pick(&SHORT_NAMES[2..]).to_string(),
        }
    }

    fn depth(&mut self) -> usize {
        match self.rng.below(10) {
            0..=3 => 1,
            4..=8 => 2,
            _ => 3,
        }
    }

    fn path(&mut self) -> String {
        let depth = self.depth();
        let mut v: Vec<String> = (1..depth).map(|_| self.dir_name()).collect();
        let mut leaf = self.name();
        if depth > 1 && leaf.len() == 255 && self.pct(90) {
            leaf = self.mid.clone();
        }
        v.push(leaf);
        v.join("/")
    }

    /// A path for a new directory: its own name is a directory component too, mostly.
    fn dir_path(&mut self) -> String {
        let depth = self.depth();
        let mut v: Vec<String> = (0..depth).map(|_| self.dir_name()).collect();
        if self.pct(25) {
            *v.last_mut().unwrap() = self.name();
        }
        v.join("/")
    }

    fn seed(&mut self) -> u64 {
        self.rng.next_u64() >> 16
    }

    fn off(&mut self) -> u64 {
        match self.rng.below(10) {
            0..=6 => self.rng.below(64 << 10),
            7..=8 => self.rng.below(1 << 20),
            _ => self.rng.below(FAR),
        }
    }

    fn len(&mut self) -> u64 {
        match self.rng.below(10) {
            0..=5 => 1 + self.rng.below(4096),
            6..=8 => 1 + self.rng.below(64 << 10),
            _ => 1 + self.rng.below(1 << 20),
        }
    }

    fn time(&mut self) -> (i64, i64) {
        match self.rng.below(20) {
            0 => (-1, 0), // UTIME_NOW
            1 => (-2, 0), // UTIME_OMIT
            _ => (
                self.rng.below(4_000_000_000) as i64,
                self.rng.below(1_000_000_000) as i64,
            ),
        }
    }

    fn xattr_name(&mut self) -> String {
        if self.pct(60) {
            format!("user.k{}", self.rng.below(3))
        } else {
            format!("trusted.k{}", self.rng.below(2))
        }
    }

    fn op(&mut self) -> Op {
        match self.rng.below(100) {
            0..=7 => Op::Create {
                p: self.path(),
                mode: 0o600 | self.rng.below(0o200) as u32,
            },
            8..=20 => Op::Write {
                p: self.path(),
                how: self.pick(&[
                    WriteHow::Write,
                    WriteHow::Pwrite,
                    WriteHow::Writev,
                    WriteHow::Pwritev,
                    WriteHow::Pwritev2,
                    WriteHow::Append,
                ]),
                off: self.off(),
                len: self.len(),
                seed: self.seed(),
            },
            21..=24 => Op::Copy {
                src: self.path(),
                dst: self.path(),
                how: self.pick(&[CopyHow::CopyFileRange, CopyHow::Sendfile, CopyHow::Splice]),
                off_in: self.rng.below(64 << 10),
                off_out: self.off(),
                len: self.len(),
            },
            25..=27 => Op::Fallocate {
                p: self.path(),
                mode: self.pick(&[0, 1, 3, 16]),
                off: self.off(),
                len: self.len(),
            },
            28..=30 => Op::Truncate {
                p: self.path(),
                len: self.off(),
                fd: self.pct(50),
            },
            31..=32 => Op::Mmap {
                p: self.path(),
                off: self.rng.below(64 << 10),
                len: 1 + self.rng.below(16 << 10),
                seed: self.seed(),
            },
            33 => Op::IoUring {
                p: self.path(),
                off: self.off(),
                len: 1 + self.rng.below(16 << 10),
                seed: self.seed(),
            },
            34..=42 => Op::Mkdir {
                p: self.dir_path(),
                mode: 0o700 | self.rng.below(0o100) as u32,
            },
            43..=46 => Op::Mknod {
                p: self.path(),
                kind: self.pick(&[NodeKind::Fifo, NodeKind::Sock, NodeKind::Chr, NodeKind::Blk]),
                major: self.rng.below(4096) as u32,
                minor: self.rng.below(1 << 20) as u32,
                mode: self.rng.below(0o1000) as u32,
            },
            47..=50 => Op::Symlink {
                p: self.path(),
                tlen: match self.rng.below(4) {
                    0 | 1 => 1 + self.rng.below(40) as usize,
                    2 => 200 + self.rng.below(200) as usize,
                    _ => 1 + self.rng.below(4095) as usize,
                },
                seed: self.seed(),
            },
            51..=54 => Op::Link {
                old: self.path(),
                new: self.path(),
            },
            55..=56 => Op::Tmpfile {
                dir: if self.pct(50) {
                    ".".into()
                } else {
                    self.name()
                },
                p: self.path(),
                len: self.rng.below(8192),
                seed: self.seed(),
            },
            57..=66 => Op::Rename {
                old: self.path(),
                new: self.path(),
                flags: self.pick(&[0, 0, 1, 2, 2, 4]),
            },
            67..=68 => Op::Unlink { p: self.path() },
            69 => Op::Rmdir { p: self.path() },
            70..=71 => Op::RmTree { p: self.path() },
            72..=76 => Op::SetXattr {
                p: self.path(),
                name: self.xattr_name(),
                len: if self.pct(80) {
                    self.rng.below(64) as usize
                } else {
                    self.rng.below(4000) as usize
                },
                seed: self.seed(),
                nofollow: self.pct(50),
            },
            77..=79 => Op::RemoveXattr {
                p: self.path(),
                name: self.xattr_name(),
                nofollow: self.pct(50),
            },
            80..=83 => Op::Chmod {
                p: self.path(),
                mode: self.rng.below(0o10000) as u32,
            },
            84..=87 => Op::Chown {
                p: self.path(),
                uid: if self.pct(30) {
                    0
                } else {
                    self.rng.below(1 << 31) as u32
                },
                gid: if self.pct(30) {
                    0
                } else {
                    self.rng.below(1 << 31) as u32
                },
                nofollow: self.pct(50),
            },
            88..=93 => {
                let (asec, ansec) = self.time();
                let (msec, mnsec) = self.time();
                Op::Utimes {
                    p: self.path(),
                    asec,
                    ansec,
                    msec,
                    mnsec,
                    nofollow: self.pct(50),
                }
            }
            94..=96 => Op::MoveIn {
                p: self.dir_path(),
                n: 1 + self.rng.below(6) as u32,
                seed: self.seed(),
            },
            _ => Op::MoveOut {
                p: self.path(),
                seed: self.seed(),
                keep: self.pct(30),
            },
        }
    }
}

// ---------------------------------------------------------------------------
// Execution
// ---------------------------------------------------------------------------

/// Where a worker runs: the export root and the sibling directory (same file system).
pub struct Env {
    pub root: PathBuf,
    pub sibling: PathBuf,
    /// Tags the worker's objects in the sibling directory.
    pub worker: u32,
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("NUL in path")
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn chk(r: i64) -> Result<i64, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

/// A symbolic errno for the log.
pub fn errno_name(e: i32) -> String {
    let n = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EMLINK => "EMLINK",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::ERANGE => "ERANGE",
        libc::EOVERFLOW => "EOVERFLOW",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

struct Fd(i32);
impl Drop for Fd {
    fn drop(&mut self) {
        unsafe {
            libc::close(self.0);
        }
    }
}

fn open(p: &Path, flags: i32, mode: u32) -> Result<Fd, i32> {
    let cp = c(p);
    let r = unsafe { libc::open(cp.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    chk(r as i64).map(|fd| Fd(fd as i32))
}

/// Opens a regular file (created if `flags` has O_CREAT) without following a final symlink,
/// and never opens anything else: the namespace holds device nodes with arbitrary numbers,
/// some of which are real devices of this machine (a watchdog, a disk). The object is first
/// looked at through an O_PATH descriptor, then reopened through /proc/self/fd, which reaches
/// the same inode even if another worker renames something else onto the name meanwhile.
fn open_reg(p: &Path, flags: i32) -> Result<Fd, i32> {
    if flags & libc::O_CREAT != 0 {
        match open(p, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0o644) {
            Ok(_) | Err(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
    let probe = open(p, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    chk(unsafe { libc::fstat(probe.0, &mut st) } as i64)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(libc::EINVAL);
    }
    let flags = flags & !(libc::O_CREAT | libc::O_EXCL);
    open(Path::new(&format!("/proc/self/fd/{}", probe.0)), flags, 0)
}

fn data(seed: u64, len: usize) -> Vec<u8> {
    Rng(seed).bytes(len)
}

/// A symlink target of exactly `tlen` bytes. Never absolute and never `..` beyond a leading
/// `../`, so that the operations which follow symlinks (chmod, chown, setxattr, utimes,
/// truncate, open of a path through a linked directory) stay inside the mount: at worst
/// `../x` from the root names a missing entry of the mount's top directory. A third of the
/// short targets name the workers' own namespace, so that followed links hit real objects.
pub fn symlink_target(tlen: usize, seed: u64) -> Vec<u8> {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_-/";
    let mut r = Rng(seed);
    if tlen == 1 && r.below(2) == 0 {
        return SHORT_NAMES[r.below(6) as usize].as_bytes().to_vec();
    }
    let mut t: Vec<u8> = (0..tlen)
        .map(|_| CHARS[r.below(CHARS.len() as u64) as usize])
        .collect();
    if t[0] == b'/' {
        t[0] = b'x';
    }
    if tlen > 3 && r.below(3) == 0 {
        t[..3].copy_from_slice(b"../");
    }
    if tlen == 4 && r.below(2) == 0 {
        t[3] = SHORT_NAMES[r.below(6) as usize].as_bytes()[0];
    }
    t
}

fn timespec(sec: i64, nsec: i64) -> libc::timespec {
    match sec {
        -1 => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        -2 => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        _ => libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    }
}

fn rm_rf(p: &Path) -> Result<(), i32> {
    let meta = std::fs::symlink_metadata(p).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    let r = if meta.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    };
    r.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
}

fn write_all_at(fd: &Fd, buf: &[u8], off: u64) -> Result<(), i32> {
    let mut done = 0usize;
    while done < buf.len() {
        let n = chk(unsafe {
            libc::pwrite(
                fd.0,
                buf[done..].as_ptr() as *const libc::c_void,
                buf.len() - done,
                (off + done as u64) as i64,
            )
        } as i64)?;
        done += n as usize;
    }
    Ok(())
}

impl Op {
    /// Performs the operation under `env`; Ok, or the errno of the call that failed.
    pub fn run(&self, env: &Env) -> Result<(), i32> {
        let at = |p: &str| -> PathBuf {
            if p == "." {
                env.root.clone()
            } else if env.root == Path::new(".") {
                PathBuf::from(p)
            } else {
                env.root.join(p)
            }
        };
        match self {
            Op::Create { p, mode } => {
                open(&at(p), libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, *mode).map(|_| ())
            }
            Op::Write {
                p,
                how,
                off,
                len,
                seed,
            } => {
                let buf = data(*seed, *len as usize);
                let flags = libc::O_WRONLY
                    | libc::O_CREAT
                    | if *how == WriteHow::Append {
                        libc::O_APPEND
                    } else {
                        0
                    };
                let f = open_reg(&at(p), flags)?;
                let (a, b) = buf.split_at(buf.len() / 2);
                let iov = [
                    libc::iovec {
                        iov_base: a.as_ptr() as *mut _,
                        iov_len: a.len(),
                    },
                    libc::iovec {
                        iov_base: b.as_ptr() as *mut _,
                        iov_len: b.len(),
                    },
                ];
                let r = unsafe {
                    match how {
                        WriteHow::Write | WriteHow::Append => {
                            if *how == WriteHow::Write {
                                libc::lseek(f.0, *off as i64, libc::SEEK_SET);
                            }
                            libc::write(f.0, buf.as_ptr() as *const _, buf.len()) as i64
                        }
                        WriteHow::Pwrite => {
                            libc::pwrite(f.0, buf.as_ptr() as *const _, buf.len(), *off as i64)
                                as i64
                        }
                        WriteHow::Writev => {
                            libc::lseek(f.0, *off as i64, libc::SEEK_SET);
                            libc::writev(f.0, iov.as_ptr(), 2) as i64
                        }
                        WriteHow::Pwritev => {
                            libc::pwritev(f.0, iov.as_ptr(), 2, *off as i64) as i64
                        }
                        WriteHow::Pwritev2 => {
                            libc::pwritev2(f.0, iov.as_ptr(), 2, *off as i64, libc::RWF_DSYNC)
                                as i64
                        }
                    }
                };
                chk(r).map(|_| ())
            }
            Op::Copy {
                src,
                dst,
                how,
                off_in,
                off_out,
                len,
            } => {
                let s = open_reg(&at(src), libc::O_RDONLY)?;
                let d = open_reg(&at(dst), libc::O_WRONLY | libc::O_CREAT)?;
                let mut oi = *off_in as i64;
                let mut oo = *off_out as i64;
                let len = *len as usize;
                let r = unsafe {
                    match how {
                        CopyHow::CopyFileRange => {
                            libc::copy_file_range(s.0, &mut oi, d.0, &mut oo, len, 0) as i64
                        }
                        CopyHow::Sendfile => {
                            libc::lseek(d.0, oo, libc::SEEK_SET);
                            libc::sendfile(d.0, s.0, &mut oi, len) as i64
                        }
                        CopyHow::Splice => {
                            let mut fds = [0i32; 2];
                            chk(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) as i64)?;
                            let (rp, wp) = (Fd(fds[0]), Fd(fds[1]));
                            let n = libc::splice(
                                s.0,
                                &mut oi,
                                wp.0,
                                std::ptr::null_mut(),
                                len.min(65536),
                                0,
                            );
                            if n <= 0 {
                                n as i64
                            } else {
                                libc::splice(
                                    rp.0,
                                    std::ptr::null_mut(),
                                    d.0,
                                    &mut oo,
                                    n as usize,
                                    0,
                                ) as i64
                            }
                        }
                    }
                };
                chk(r).map(|_| ())
            }
            Op::Fallocate { p, mode, off, len } => {
                let f = open_reg(&at(p), libc::O_WRONLY)?;
                chk(unsafe { libc::fallocate(f.0, *mode, *off as i64, *len as i64) } as i64)
                    .map(|_| ())
            }
            Op::Truncate { p, len, fd } => {
                if *fd {
                    let f = open_reg(&at(p), libc::O_WRONLY)?;
                    chk(unsafe { libc::ftruncate(f.0, *len as i64) } as i64).map(|_| ())
                } else {
                    let cp = c(&at(p));
                    chk(unsafe { libc::truncate(cp.as_ptr(), *len as i64) } as i64).map(|_| ())
                }
            }
            Op::Mmap { p, off, len, seed } => {
                let f = open_reg(&at(p), libc::O_RDWR)?;
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                chk(unsafe { libc::fstat(f.0, &mut st) } as i64)?;
                let size = st.st_size as u64;
                // Only within the file: a store past EOF is SIGBUS.
                if size == 0 {
                    return Err(libc::ENXIO);
                }
                let off = off % size;
                let len = (*len).min(size - off) as usize;
                let page = off & !4095;
                let maplen = (off - page) as usize + len;
                let m = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        maplen,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        f.0,
                        page as i64,
                    )
                };
                if m == libc::MAP_FAILED {
                    return Err(errno());
                }
                let buf = data(*seed, len);
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        buf.as_ptr(),
                        (m as *mut u8).add((off - page) as usize),
                        len,
                    );
                    libc::msync(m, maplen, libc::MS_SYNC);
                    libc::munmap(m, maplen);
                }
                Ok(())
            }
            Op::IoUring { p, off, len, seed } => {
                let f = open_reg(&at(p), libc::O_WRONLY)?;
                let owned = unsafe {
                    <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(libc::dup(f.0))
                };
                crate::sys::io_uring_write(&owned, &data(*seed, *len as usize), *off, true)
                    .map(|_| ())
                    .map_err(|e| e.errno)
            }
            Op::Mkdir { p, mode } => {
                let cp = c(&at(p));
                chk(unsafe { libc::mkdir(cp.as_ptr(), *mode) } as i64).map(|_| ())
            }
            Op::Mknod {
                p,
                kind,
                major,
                minor,
                mode,
            } => {
                let cp = c(&at(p));
                let (t, dev) = match kind {
                    NodeKind::Fifo => (libc::S_IFIFO, 0),
                    NodeKind::Sock => (libc::S_IFSOCK, 0),
                    NodeKind::Chr => (libc::S_IFCHR, libc::makedev(*major, *minor)),
                    NodeKind::Blk => (libc::S_IFBLK, libc::makedev(*major, *minor)),
                };
                chk(unsafe { libc::mknod(cp.as_ptr(), t | (mode & 0o7777), dev) } as i64)
                    .map(|_| ())
            }
            Op::Symlink { p, tlen, seed } => {
                let t = CString::new(symlink_target(*tlen, *seed)).unwrap();
                let cp = c(&at(p));
                chk(unsafe { libc::symlink(t.as_ptr(), cp.as_ptr()) } as i64).map(|_| ())
            }
            Op::Link { old, new } => {
                let (o, n) = (c(&at(old)), c(&at(new)));
                chk(unsafe {
                    libc::linkat(libc::AT_FDCWD, o.as_ptr(), libc::AT_FDCWD, n.as_ptr(), 0)
                } as i64)
                .map(|_| ())
            }
            Op::Tmpfile { dir, p, len, seed } => {
                let f = open(&at(dir), libc::O_TMPFILE | libc::O_RDWR, 0o640)?;
                write_all_at(&f, &data(*seed, *len as usize), 0)?;
                let n = c(&at(p));
                let empty = CString::new("").unwrap();
                chk(unsafe {
                    libc::linkat(
                        f.0,
                        empty.as_ptr(),
                        libc::AT_FDCWD,
                        n.as_ptr(),
                        libc::AT_EMPTY_PATH,
                    )
                } as i64)
                .map(|_| ())
            }
            Op::Rename { old, new, flags } => {
                let (o, n) = (c(&at(old)), c(&at(new)));
                chk(unsafe {
                    libc::syscall(
                        libc::SYS_renameat2,
                        libc::AT_FDCWD,
                        o.as_ptr(),
                        libc::AT_FDCWD,
                        n.as_ptr(),
                        *flags,
                    )
                })
                .map(|_| ())
            }
            Op::Unlink { p } => {
                let cp = c(&at(p));
                chk(unsafe { libc::unlink(cp.as_ptr()) } as i64).map(|_| ())
            }
            Op::Rmdir { p } => {
                let cp = c(&at(p));
                chk(unsafe { libc::rmdir(cp.as_ptr()) } as i64).map(|_| ())
            }
            Op::RmTree { p } => rm_rf(&at(p)),
            Op::SetXattr {
                p,
                name,
                len,
                seed,
                nofollow,
            } => {
                let cp = c(&at(p));
                let cn = CString::new(name.as_str()).unwrap();
                let v = data(*seed, *len);
                let f = if *nofollow {
                    libc::lsetxattr
                } else {
                    libc::setxattr
                };
                chk(
                    unsafe { f(cp.as_ptr(), cn.as_ptr(), v.as_ptr() as *const _, v.len(), 0) }
                        as i64,
                )
                .map(|_| ())
            }
            Op::RemoveXattr { p, name, nofollow } => {
                let cp = c(&at(p));
                let cn = CString::new(name.as_str()).unwrap();
                let f = if *nofollow {
                    libc::lremovexattr
                } else {
                    libc::removexattr
                };
                chk(unsafe { f(cp.as_ptr(), cn.as_ptr()) } as i64).map(|_| ())
            }
            Op::Chmod { p, mode } => {
                let cp = c(&at(p));
                chk(unsafe { libc::chmod(cp.as_ptr(), *mode) } as i64).map(|_| ())
            }
            Op::Chown {
                p,
                uid,
                gid,
                nofollow,
            } => {
                let cp = c(&at(p));
                let f = if *nofollow { libc::lchown } else { libc::chown };
                chk(unsafe { f(cp.as_ptr(), *uid, *gid) } as i64).map(|_| ())
            }
            Op::Utimes {
                p,
                asec,
                ansec,
                msec,
                mnsec,
                nofollow,
            } => {
                let cp = c(&at(p));
                let ts = [timespec(*asec, *ansec), timespec(*msec, *mnsec)];
                let fl = if *nofollow {
                    libc::AT_SYMLINK_NOFOLLOW
                } else {
                    0
                };
                chk(unsafe { libc::utimensat(libc::AT_FDCWD, cp.as_ptr(), ts.as_ptr(), fl) } as i64)
                    .map(|_| ())
            }
            Op::MoveIn { p, n, seed } => {
                let stage = env.sibling.join(format!("in-w{}-{seed}", env.worker));
                let r = build_tree(&stage, *n, *seed).and_then(|()| {
                    let (o, d) = (c(&stage), c(&at(p)));
                    chk(unsafe { libc::rename(o.as_ptr(), d.as_ptr()) } as i64).map(|_| ())
                });
                if r.is_err() {
                    let _ = rm_rf(&stage);
                }
                r
            }
            Op::MoveOut { p, seed, keep } => {
                let out = env.sibling.join(format!("out-w{}-{seed}", env.worker));
                let (o, d) = (c(&at(p)), c(&out));
                chk(unsafe { libc::rename(o.as_ptr(), d.as_ptr()) } as i64)?;
                if !*keep {
                    rm_rf(&out)?;
                }
                Ok(())
            }
            Op::Fill { p, mb } => {
                let f = open_reg(&at(p), libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC)?;
                let chunk = data(*mb, 1 << 20);
                for i in 0..*mb {
                    write_all_at(&f, &chunk, i << 20)?;
                }
                Ok(())
            }
        }
    }
}

/// A small tree of every kind of object, with attributes, made at `top` (not yet existing).
fn build_tree(top: &Path, n: u32, seed: u64) -> Result<(), i32> {
    let mut r = Rng(seed);
    let mk = |p: &Path, mode: u32| -> Result<(), i32> {
        let cp = c(p);
        chk(unsafe { libc::mkdir(cp.as_ptr(), mode) } as i64).map(|_| ())
    };
    mk(top, 0o755)?;
    mk(&top.join("sub"), 0o750)?;
    for i in 0..n {
        let dir = if i % 2 == 0 {
            top.to_path_buf()
        } else {
            top.join("sub")
        };
        let f = dir.join(format!("f{i}"));
        let len = r.below(20_000) as usize;
        std::fs::write(&f, data(r.next_u64(), len))
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        let cf = c(&f);
        let name = CString::new("user.m").unwrap();
        let v = data(r.next_u64(), 10);
        unsafe {
            libc::setxattr(
                cf.as_ptr(),
                name.as_ptr(),
                v.as_ptr() as *const _,
                v.len(),
                0,
            );
            libc::chown(cf.as_ptr(), r.below(70000) as u32, r.below(70000) as u32);
            libc::chmod(cf.as_ptr(), 0o600 | r.below(0o200) as u32);
            let ts = [
                timespec(0, libc::UTIME_OMIT),
                timespec(r.below(2_000_000_000) as i64, r.below(1_000_000_000) as i64),
            ];
            libc::utimensat(libc::AT_FDCWD, cf.as_ptr(), ts.as_ptr(), 0);
        }
        match i % 4 {
            0 => {
                let l = c(&dir.join(format!("h{i}")));
                unsafe { libc::link(cf.as_ptr(), l.as_ptr()) };
            }
            1 => {
                let t =
                    CString::new(symlink_target(1 + r.below(300) as usize, r.next_u64())).unwrap();
                let l = c(&dir.join(format!("s{i}")));
                unsafe { libc::symlink(t.as_ptr(), l.as_ptr()) };
            }
            2 => {
                let l = c(&dir.join(format!("p{i}")));
                unsafe { libc::mknod(l.as_ptr(), libc::S_IFIFO | 0o640, 0) };
            }
            _ => {
                let l = c(&dir.join(format!("c{i}")));
                unsafe {
                    libc::mknod(
                        l.as_ptr(),
                        libc::S_IFCHR | 0o600,
                        libc::makedev(r.below(300) as u32, r.below(300) as u32),
                    )
                };
            }
        }
    }
    let sub = c(&top.join("sub"));
    let ts = [
        timespec(0, libc::UTIME_OMIT),
        timespec(r.below(2_000_000_000) as i64, 5),
    ];
    unsafe { libc::utimensat(libc::AT_FDCWD, sub.as_ptr(), ts.as_ptr(), 0) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_generated_op_prints_a_line_that_parses_back_to_itself() {
        for w in 0..4 {
            for op in generate(7, w, 2000) {
                let line = op.to_string();
                assert!(!line.contains('\n'));
                assert_eq!(
                    Op::parse(&format!("{line}\t# w0 #1 = ok")).unwrap(),
                    op,
                    "{line}"
                );
            }
        }
    }

    #[test]
    fn generation_is_a_function_of_the_seed() {
        assert_eq!(generate(42, 1, 100), generate(42, 1, 100));
        assert_ne!(generate(42, 1, 100), generate(42, 2, 100));
        assert_ne!(generate(42, 1, 100), generate(43, 1, 100));
    }

    #[test]
    fn the_long_name_is_name_max() {
        assert_eq!(long_name().len(), 255);
    }
}
