//! Exports on btrfs (and XFS), issue 9 finding 5.
//!
//! btrfs gives every subvolume, the top-level one included, an anonymous device number of
//! its own: `stat(2)` reports it, while the super block's `s_dev` (what a probe reading
//! `inode->i_sb->s_dev` sees) is another. Capture keyed on one and filtered on the other
//! journalled nothing that it resolves through an inode (creates, writes, truncates). The
//! probes now report a btrfs inode's subvolume device, as `stat(2)` does, so a nested
//! subvolume is a boundary exactly like a mount point: not walked, not captured, and its
//! inode numbers (which repeat from one subvolume to the next) are never taken for ours.

use imezzo_tests::replica::*;
use imezzo_tests::sys::{self, AT_FDCWD};
use imezzo_tests::*;
use libc::{O_APPEND, O_CREAT, O_RDWR, O_WRONLY};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

fn ok<T>(r: sys::SysResult<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:?}"))
}

fn write_op(path: &str, offset: u64, len: u64) -> serde_json::Value {
    json!({"op": "write", "path": path, "offset": offset, "len": len})
}

fn subvolume_create(p: &Path) {
    let out = Command::new("btrfs")
        .args(["subvolume", "create"])
        .arg(p)
        .output()
        .unwrap_or_else(|e| panic!("cannot run btrfs (btrfs-progs): {e}"));
    assert!(
        out.status.success(),
        "btrfs subvolume create {p:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything capture resolves through an inode the kernel hands it: a create (the inode
/// the new fd refers to), writes and appends (fd -> inode), ftruncate, a store through a
/// shared mmap (the dirty-inode safety net), and paths relative to a directory fd inside
/// the root (the fd's inode); then the path-resolved calls for good measure.
fn creates_writes_and_attributes_are_journalled(fs: Fs) {
    fs.put("old", &[b'o'; 8192]);
    std::fs::File::open(fs.p("old"))
        .unwrap()
        .sync_all()
        .unwrap();
    let mut cap = Capture::start(&fs.root);

    let f = ok(sys::open(&fs.p("a"), O_WRONLY | O_CREAT, 0o644));
    assert_eq!(ok(sys::write(&f, b"hi\n")), 3);
    drop(f);
    let f = ok(sys::open(&fs.p("a"), O_WRONLY | O_APPEND, 0));
    assert_eq!(ok(sys::write(&f, b"more\n")), 5);
    ok(sys::ftruncate(&f, 2));
    drop(f);
    // A writer that moves CPUs between its append and its ftruncate may have the append
    // journalled after the truncate (harmless: replay reads the bytes from the master as it
    // is then); what matters is the create first, every byte, and the truncate.
    // The append's run may still be open when the marker's create is handled (an open is
    // never preceded by the runs, as it may truncate): a second marker collects it.
    let mut ops = cap.mark();
    ops.extend(cap.mark());
    let ops: Vec<serde_json::Value> = ops.iter().map(normalize).collect();
    assert_eq!(ops[0], json!({"op": "create", "path": "a", "mode": perm(&fs.p("a"))}), "{}", fmt_ops(&ops));
    assert_eq!(write_extents(&ops, "a"), vec![(0, 8)], "{}", fmt_ops(&ops));
    let truncates: Vec<&serde_json::Value> = ops.iter().filter(|op| op["op"] == "truncate").collect();
    assert_eq!(truncates, [&json!({"op": "truncate", "path": "a", "size": 2})], "{}", fmt_ops(&ops));
    assert!(ops[1..].iter().all(|op| op["op"] == "write" || op["op"] == "truncate"), "{}", fmt_ops(&ops));

    let root = ok(sys::dir(&fs.root));
    drop(ok(sys::openat(
        root.as_raw_fd(),
        Path::new("b"),
        O_WRONLY | O_CREAT,
        0o600,
    )));
    cap.expect(&[json!({"op": "create", "path": "b", "mode": perm(&fs.p("b"))})]);
    ok(sys::mkdir(&fs.p("d"), 0o755));
    ok(sys::rename(&fs.p("b"), &fs.p("d/b")));
    ok(sys::chmod(&fs.p("a"), 0o640));
    ok(sys::link(&fs.p("a"), &fs.p("d/a2")));
    ok(sys::truncate(&fs.p("d/a2"), 1));
    ok(sys::unlink(&fs.p("a")));
    cap.expect(&[
        json!({"op": "mkdir", "path": "d", "mode": 0o755}),
        json!({"op": "rename", "path": "b", "new_path": "d/b"}),
        json!({"op": "setattr", "path": "a", "mode": 0o640}),
        json!({"op": "link", "path": "a", "new_path": "d/a2"}),
        // Journalled under the object's first name.
        json!({"op": "truncate", "path": "a", "size": 1}),
        json!({"op": "unlink", "path": "a"}),
        // The name the change was journalled under went: it is journalled again under
        // the name the object keeps (a client replaying the truncate later finds no `a`).
        write_op("d/a2", 0, 1),
        {
            let m = std::fs::symlink_metadata(fs.p("d/a2")).unwrap();
            json!({"op": "setattr", "path": "d/a2", "mode": 0o640, "uid": m.uid(), "gid": m.gid(),
                   "atime": {"sec": m.atime(), "nsec": m.atime_nsec()},
                   "mtime": {"sec": m.mtime(), "nsec": m.mtime_nsec()}})
        },
    ]);

    let f = ok(sys::open(&fs.p("old"), O_RDWR, 0));
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        std::ptr::write_volatile((p as *mut u8).add(4096 + 7), b'Y');
        assert_eq!(libc::munmap(p, 8192), 0);
    }
    drop(f);
    let (before, op) = cap.ops_until_with(
        |op| op["op"] == "write" && op["path"] == "old",
        OP_TIMEOUT,
        "the write of `old`",
    );
    assert_eq!(op["source"], "mmap", "the store through mmap: {op}");
    assert!(
        before.is_empty(),
        "before the store through mmap: {}",
        fmt_ops(&before)
    );
    cap.stop();
}

#[test]
fn btrfs_export_journals_creates_and_writes() {
    creates_writes_and_attributes_are_journalled(Fs::btrfs("btrfs-capture"));
}

#[test]
fn xfs_export_journals_creates_and_writes() {
    creates_writes_and_attributes_are_journalled(Fs::xfs("xfs-capture"));
}

/// An export that is itself a subvolume (its root directory is inode 256, as is every
/// subvolume's) works the same.
#[test]
fn btrfs_subvolume_export_journals_creates_and_writes() {
    let fs = Fs::btrfs("btrfs-subvol-export");
    let vol = fs.p("vol");
    subvolume_create(&vol);
    let mut cap = Capture::start(&vol);
    let f = ok(sys::openat(
        AT_FDCWD,
        &vol.join("f"),
        O_WRONLY | O_CREAT,
        0o644,
    ));
    assert_eq!(ok(sys::write(&f, &[b'x'; 100])), 100);
    drop(f);
    cap.expect(&[
        json!({"op": "create", "path": "f", "mode": perm(&vol.join("f"))}),
        write_op("f", 0, 100),
    ]);
    cap.stop();
}

/// Inode numbers repeat from one subvolume to the next: a write or truncate in a nested
/// subvolume must never be journalled as one to the export's file of the same number, and
/// the nested subvolume's root (inode 256, like the exported subvolume's own root) must not
/// be taken for the export's root.
#[test]
fn btrfs_nested_subvolume_is_a_boundary_and_its_inode_numbers_are_not_ours() {
    let fs = Fs::btrfs("btrfs-nested");
    let vol = fs.p("vol");
    subvolume_create(&vol);
    for i in 0..8 {
        std::fs::write(vol.join(format!("f{i}")), [b'v'; 64]).unwrap();
    }
    let inner = vol.join("inner");
    subvolume_create(&inner);
    for i in 0..8 {
        std::fs::write(inner.join(format!("g{i}")), [b'i'; 64]).unwrap();
    }
    let vol_meta = std::fs::metadata(&vol).unwrap();
    let inner_meta = std::fs::metadata(&inner).unwrap();
    assert_eq!(
        vol_meta.ino(),
        inner_meta.ino(),
        "both subvolume roots are inode 256"
    );
    assert_ne!(
        vol_meta.dev(),
        inner_meta.dev(),
        "each subvolume has its own st_dev"
    );
    // A file of the nested subvolume with the inode number of one of the export's.
    let ours: Vec<u64> = (0..8)
        .map(|i| std::fs::metadata(vol.join(format!("f{i}"))).unwrap().ino())
        .collect();
    let twin = (0..8)
        .map(|i| inner.join(format!("g{i}")))
        .find(|p| ours.contains(&std::fs::metadata(p).unwrap().ino()))
        .expect("inode numbers repeat across subvolumes");

    let mut cap = Capture::start(&vol);
    let f = ok(sys::open(&twin, O_WRONLY | O_APPEND, 0));
    assert_eq!(ok(sys::write(&f, b"inner\n")), 6);
    ok(sys::ftruncate(&f, 3));
    drop(f);
    ok(sys::truncate(&twin, 1));
    drop(ok(sys::open(&inner.join("new"), O_WRONLY | O_CREAT, 0o644)));
    cap.expect(&[]);

    // The nested subvolume's own name is ours (it is a directory of the export).
    ok(sys::chmod(&inner, 0o700));
    ok(sys::chmod(&vol, 0o750));
    cap.expect(&[
        json!({"op": "setattr", "path": "inner", "mode": 0o700}),
        json!({"op": "setattr", "path": "", "mode": 0o750}),
    ]);
    cap.stop();
}

/// A btrfs master's files, made before and after the server starts, arrive on a tmpfs
/// replica.
#[test]
fn btrfs_master_replicates_to_a_tmpfs_replica() {
    let mut r = Replication::between("btrfs-repl", FsKind::Btrfs, FsKind::Tmpfs);
    r.export.dirs("pre/d");
    r.export.put("pre/d/f", b"present at the initial sync\n");
    r.start_server(&[]);
    r.start_client();
    r.assert_identical(CONVERGE_TIMEOUT, "initial sync from btrfs");

    std::fs::write(r.e("a"), b"hi\n").unwrap();
    {
        let f = ok(sys::open(&r.e("a"), O_WRONLY | O_APPEND, 0));
        ok(sys::write(&f, &b"x".repeat(100_000)));
    }
    std::fs::create_dir(r.e("dir")).unwrap();
    for i in 0..20 {
        std::fs::write(
            r.e(&format!("dir/f{i}")),
            format!("file {i}\n").repeat(i + 1),
        )
        .unwrap();
    }
    ok(sys::truncate(&r.e("dir/f3"), 2));
    ok(sys::chmod(&r.e("dir/f4"), 0o600));
    ok(sys::link(&r.e("dir/f5"), &r.e("pre/f5-link")));
    ok(sys::rename(&r.e("dir/f6"), &r.e("pre/d/f6")));
    ok(sys::unlink(&r.e("dir/f7")));
    ok(sys::symlink("dir/f8", &r.e("sl")));
    {
        let f = ok(sys::open(&r.e("pre/d/f"), O_RDWR, 0));
        ok(sys::pwrite64(&f, b"CHANGED", 8));
    }
    r.assert_identical(CONVERGE_TIMEOUT, "live changes on btrfs");
    r.assert_no_panic();
}
