//! `imezzo verify`: the oracle of every replication test, so each attribute it claims to
//! compare is changed here alone, on one side of two otherwise identical trees, and must
//! come out as exactly one difference. Runs as root (chown, mknod); it fails, never skips.

use std::{
    ffi::{CString, OsStr},
    fs,
    os::unix::{
        ffi::OsStrExt,
        fs::{lchown, symlink, PermissionsExt},
    },
    path::{Path, PathBuf},
    process::Command,
};

use imezzo_agent::{
    op::{RelPath, Timestamp},
    verify::{compare, compare_trees, Difference, DifferenceKind, EntryType, Side, VerifyOptions},
};

/// Every entry of the sample trees carries this mtime, so two trees built apart compare
/// equal; tests that move a time use [`set_mtime`] after [`stamp`].
const STAMP: Timestamp = Timestamp { sec: 1_700_000_000, nsec: 123_456_789 };

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_mtime(p: &Path, t: Timestamp) {
    let times =
        [libc::timespec { tv_sec: t.sec, tv_nsec: 0 }, libc::timespec { tv_sec: t.sec, tv_nsec: t.nsec.into() }];
    // SAFETY: a NUL-terminated path and a two-element timespec array, as utimensat wants.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, cpath(p).as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(rc, 0, "utimensat {}: {}", p.display(), std::io::Error::last_os_error());
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let name = CString::new(name).unwrap();
    // SAFETY: NUL-terminated path and name; `value` is valid for `value.len()` bytes.
    let rc = unsafe { libc::lsetxattr(cpath(p).as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(rc, 0, "lsetxattr {}: {}", p.display(), std::io::Error::last_os_error());
}

fn remove_xattr(p: &Path, name: &str) {
    let name = CString::new(name).unwrap();
    // SAFETY: NUL-terminated path and name.
    let rc = unsafe { libc::lremovexattr(cpath(p).as_ptr(), name.as_ptr()) };
    assert_eq!(rc, 0, "lremovexattr {}: {}", p.display(), std::io::Error::last_os_error());
}

fn mkfifo(p: &Path) {
    // SAFETY: NUL-terminated path.
    let rc = unsafe { libc::mkfifo(cpath(p).as_ptr(), 0o640) };
    assert_eq!(rc, 0, "mkfifo {}: {}", p.display(), std::io::Error::last_os_error());
}

fn mknod_char(p: &Path, major: u32, minor: u32) {
    // SAFETY: NUL-terminated path.
    let rc = unsafe { libc::mknod(cpath(p).as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(major, minor)) };
    assert_eq!(rc, 0, "mknod {} (tests run as root): {}", p.display(), std::io::Error::last_os_error());
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// Sets every mtime in the tree, the root included, to [`STAMP`]: creating entries moved
/// the directories' mtimes.
fn stamp(root: &Path) {
    for entry in fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if fs::symlink_metadata(&path).unwrap().is_dir() {
            stamp(&path);
        } else {
            set_mtime(&path, STAMP);
        }
    }
    set_mtime(root, STAMP);
}

/// One of every kind of entry verify knows, with owners, odd modes, xattrs and a hard link.
fn build_sample(root: &Path) {
    fs::create_dir(root).unwrap();
    fs::write(root.join("file"), b"hello, world\n").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::write(root.join("dir/sub/deep"), vec![42u8; 300_000]).unwrap();
    fs::write(root.join("dir/owned"), b"owned").unwrap();
    lchown(root.join("dir/owned"), Some(1234), Some(5678)).unwrap();
    fs::write(root.join("linked"), b"one inode").unwrap();
    fs::hard_link(root.join("linked"), root.join("dir/also-linked")).unwrap();
    symlink("file", root.join("link")).unwrap();
    symlink("/nowhere/at/all", root.join("dangling")).unwrap();
    mkfifo(&root.join("fifo"));
    mknod_char(&root.join("null-ish"), 1, 3);
    set_xattr(&root.join("file"), "user.colour", b"blue");
    set_xattr(&root.join("dir"), "user.tag", b"\x00\x01binary");
    set_xattr(root, "user.root", b"yes");
    chmod(&root.join("file"), 0o4755);
    chmod(&root.join("dir/sub"), 0o1777);
    fs::write(root.join(OsStr::from_bytes(b"caf\xe9")), b"latin-1 name").unwrap();
    stamp(root);
}

/// Two identical sample trees `a` and `b` in one temporary directory.
struct Pair {
    _tmp: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
}

impl Pair {
    fn new() -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        build_sample(&a);
        build_sample(&b);
        Pair { _tmp: tmp, a, b }
    }

    fn diffs(&self) -> Vec<Difference> {
        compare(&self.a, &self.b, &VerifyOptions::default()).expect("both trees are readable")
    }
}

fn one(path: &str, kind: DifferenceKind) -> Vec<Difference> {
    vec![Difference { path: RelPath::from(path), kind }]
}

#[test]
fn identical_trees_have_no_differences() {
    let pair = Pair::new();
    let c = compare_trees(&pair.a, &pair.b, &VerifyOptions::default()).unwrap();
    assert_eq!(c.differences, vec![]);
    // file empty dir dir/sub dir/sub/deep dir/owned linked dir/also-linked link dangling
    // fifo null-ish caf\xe9
    assert_eq!(c.entries, 13);
}

#[test]
fn a_tree_compared_with_itself_is_identical() {
    let pair = Pair::new();
    assert_eq!(compare(&pair.a, &pair.a, &VerifyOptions::default()).unwrap(), vec![]);
}

#[test]
fn same_size_content_change_is_found_at_its_offset() {
    let pair = Pair::new();
    fs::write(pair.b.join("file"), b"hello, World\n").unwrap();
    stamp(&pair.b);
    assert_eq!(pair.diffs(), one("file", DifferenceKind::Content { offset: 7 }));
}

#[test]
fn size_difference_is_reported_without_a_content_difference() {
    let pair = Pair::new();
    fs::write(pair.b.join("file"), b"hello, world!\n").unwrap();
    stamp(&pair.b);
    assert_eq!(pair.diffs(), one("file", DifferenceKind::Size { a: 13, b: 14 }));
}

#[test]
fn lost_setuid_bit_is_a_mode_difference() {
    let pair = Pair::new();
    chmod(&pair.b.join("file"), 0o755);
    assert_eq!(pair.diffs(), one("file", DifferenceKind::Mode { a: 0o4755, b: 0o755 }));
}

#[test]
fn lost_sticky_bit_on_a_directory_is_a_mode_difference() {
    let pair = Pair::new();
    chmod(&pair.b.join("dir/sub"), 0o777);
    assert_eq!(pair.diffs(), one("dir/sub", DifferenceKind::Mode { a: 0o1777, b: 0o777 }));
}

#[test]
fn owner_difference_is_reported() {
    let pair = Pair::new();
    lchown(pair.b.join("dir/owned"), Some(1235), None).unwrap();
    assert_eq!(pair.diffs(), one("dir/owned", DifferenceKind::Uid { a: 1234, b: 1235 }));
}

#[test]
fn group_difference_is_reported() {
    let pair = Pair::new();
    lchown(pair.b.join("dir/owned"), None, Some(0)).unwrap();
    assert_eq!(pair.diffs(), one("dir/owned", DifferenceKind::Gid { a: 5678, b: 0 }));
}

#[test]
fn one_nanosecond_of_mtime_is_a_difference() {
    let pair = Pair::new();
    let later = Timestamp { nsec: STAMP.nsec + 1, ..STAMP };
    set_mtime(&pair.b.join("dir/sub/deep"), later);
    assert_eq!(pair.diffs(), one("dir/sub/deep", DifferenceKind::Mtime { a: STAMP, b: later }));
}

#[test]
fn symlink_mtime_is_compared_without_following_it() {
    let pair = Pair::new();
    let other = Timestamp { sec: 1, nsec: 0 };
    set_mtime(&pair.b.join("link"), other);
    assert_eq!(pair.diffs(), one("link", DifferenceKind::Mtime { a: STAMP, b: other }));
}

#[test]
fn directory_mtime_is_compared_unless_turned_off() {
    let pair = Pair::new();
    let other = Timestamp { sec: 1_600_000_000, nsec: 5 };
    set_mtime(&pair.b.join("dir"), other);
    set_mtime(&pair.b, other);
    let want = vec![
        Difference { path: RelPath::from(""), kind: DifferenceKind::Mtime { a: STAMP, b: other } },
        Difference { path: RelPath::from("dir"), kind: DifferenceKind::Mtime { a: STAMP, b: other } },
    ];
    assert_eq!(pair.diffs(), want);
    let lenient = VerifyOptions { compare_mtime_of_dirs: false };
    assert_eq!(compare(&pair.a, &pair.b, &lenient).unwrap(), vec![]);
}

#[test]
fn root_attributes_are_compared() {
    let pair = Pair::new();
    chmod(&pair.b, 0o700);
    let mode_a = fs::metadata(&pair.a).unwrap().permissions().mode() & 0o7777;
    assert_eq!(pair.diffs(), one("", DifferenceKind::Mode { a: mode_a, b: 0o700 }));
}

#[test]
fn symlink_target_difference_is_reported() {
    let pair = Pair::new();
    fs::remove_file(pair.b.join("link")).unwrap();
    symlink("empty", pair.b.join("link")).unwrap();
    stamp(&pair.b);
    let want = DifferenceKind::SymlinkTarget { a: b"file".to_vec(), b: b"empty".to_vec() };
    assert_eq!(pair.diffs(), one("link", want));
}

#[test]
fn file_replaced_by_a_symlink_is_a_type_difference() {
    let pair = Pair::new();
    fs::remove_file(pair.b.join("empty")).unwrap();
    symlink("file", pair.b.join("empty")).unwrap();
    stamp(&pair.b);
    assert_eq!(pair.diffs(), one("empty", DifferenceKind::Type { a: EntryType::File, b: EntryType::Symlink }));
}

#[test]
fn fifo_facing_an_empty_file_is_a_type_difference() {
    let pair = Pair::new();
    fs::remove_file(pair.b.join("fifo")).unwrap();
    fs::write(pair.b.join("fifo"), b"").unwrap();
    chmod(&pair.b.join("fifo"), 0o640);
    stamp(&pair.b);
    assert_eq!(pair.diffs(), one("fifo", DifferenceKind::Type { a: EntryType::Fifo, b: EntryType::File }));
}

#[test]
fn directory_facing_a_file_hides_the_directory_contents() {
    let pair = Pair::new();
    fs::remove_dir_all(pair.b.join("dir/sub")).unwrap();
    fs::write(pair.b.join("dir/sub"), b"").unwrap();
    chmod(&pair.b.join("dir/sub"), 0o1777);
    stamp(&pair.b);
    assert_eq!(pair.diffs(), one("dir/sub", DifferenceKind::Type { a: EntryType::Dir, b: EntryType::File }));
}

#[test]
fn device_numbers_are_compared() {
    let pair = Pair::new();
    fs::remove_file(pair.b.join("null-ish")).unwrap();
    mknod_char(&pair.b.join("null-ish"), 1, 5);
    stamp(&pair.b);
    let want = DifferenceKind::Device { a: libc::makedev(1, 3), b: libc::makedev(1, 5) };
    assert_eq!(pair.diffs(), one("null-ish", want));
}

#[test]
fn missing_and_extra_entries_are_listed_once_per_subtree_in_path_order() {
    let pair = Pair::new();
    fs::remove_dir_all(pair.b.join("dir/sub")).unwrap();
    fs::write(pair.b.join("extra"), b"").unwrap();
    fs::create_dir_all(pair.b.join("newdir/inner")).unwrap();
    fs::write(pair.b.join("newdir/inner/x"), b"").unwrap();
    // Sorts between "dir" and "dir/sub" by bytes ('-' < '/'), so it checks the subtree is
    // recognised by its parent, not by adjacency.
    fs::write(pair.b.join("dir-x"), b"").unwrap();
    stamp(&pair.b);
    let want = vec![
        Difference { path: RelPath::from("dir-x"), kind: DifferenceKind::OnlyIn(Side::B) },
        Difference { path: RelPath::from("dir/sub"), kind: DifferenceKind::OnlyIn(Side::A) },
        Difference { path: RelPath::from("extra"), kind: DifferenceKind::OnlyIn(Side::B) },
        Difference { path: RelPath::from("newdir"), kind: DifferenceKind::OnlyIn(Side::B) },
    ];
    assert_eq!(pair.diffs(), want);
}

#[test]
fn xattr_value_difference_is_reported() {
    let pair = Pair::new();
    set_xattr(&pair.b.join("file"), "user.colour", b"bluE");
    let want = DifferenceKind::XattrValue { name: b"user.colour".to_vec(), a: b"blue".to_vec(), b: b"bluE".to_vec() };
    assert_eq!(pair.diffs(), one("file", want));
}

#[test]
fn xattr_missing_on_one_side_is_reported() {
    let pair = Pair::new();
    remove_xattr(&pair.b.join("dir"), "user.tag");
    set_xattr(&pair.b.join("dir/owned"), "user.new", b"");
    let want = vec![
        Difference {
            path: RelPath::from("dir"),
            kind: DifferenceKind::XattrOnlyIn { side: Side::A, name: b"user.tag".to_vec() },
        },
        Difference {
            path: RelPath::from("dir/owned"),
            kind: DifferenceKind::XattrOnlyIn { side: Side::B, name: b"user.new".to_vec() },
        },
    ];
    assert_eq!(pair.diffs(), want);
}

#[test]
fn root_xattrs_are_compared() {
    let pair = Pair::new();
    set_xattr(&pair.b, "user.root", b"no");
    let want = DifferenceKind::XattrValue { name: b"user.root".to_vec(), a: b"yes".to_vec(), b: b"no".to_vec() };
    assert_eq!(pair.diffs(), one("", want));
}

#[test]
fn broken_hard_link_with_identical_content_is_one_group_difference() {
    let pair = Pair::new();
    // Same bytes, owner, mode and times, but its own inode: only the grouping differs.
    fs::remove_file(pair.b.join("dir/also-linked")).unwrap();
    fs::write(pair.b.join("dir/also-linked"), b"one inode").unwrap();
    stamp(&pair.b);
    let want = DifferenceKind::LinkGroup {
        a: vec![RelPath::from("dir/also-linked"), RelPath::from("linked")],
        b: vec![RelPath::from("dir/also-linked")],
    };
    assert_eq!(pair.diffs(), one("dir/also-linked", want));
}

#[test]
fn extra_hard_link_between_common_files_is_reported() {
    let pair = Pair::new();
    fs::remove_file(pair.b.join("dir/owned")).unwrap();
    fs::hard_link(pair.b.join("linked"), pair.b.join("dir/owned")).unwrap();
    fs::write(pair.a.join("dir/owned"), b"one inode").unwrap();
    stamp(&pair.a);
    stamp(&pair.b);
    let mut d = pair.diffs();
    // The re-linked file also took the inode's owner, which is not the point here.
    d.retain(|d| matches!(d.kind, DifferenceKind::LinkGroup { .. }));
    // Reported once, at the group's first path; "dir/owned" and "linked" belong to it.
    let want = DifferenceKind::LinkGroup {
        a: vec![RelPath::from("dir/also-linked"), RelPath::from("linked")],
        b: vec![RelPath::from("dir/also-linked"), RelPath::from("dir/owned"), RelPath::from("linked")],
    };
    assert_eq!(d, one("dir/also-linked", want));
}

#[test]
fn hard_link_partner_missing_on_one_side_is_only_a_missing_entry() {
    let pair = Pair::new();
    fs::remove_file(pair.b.join("dir/also-linked")).unwrap();
    stamp(&pair.b);
    assert_eq!(pair.diffs(), one("dir/also-linked", DifferenceKind::OnlyIn(Side::A)));
}

#[test]
fn non_utf8_names_compare_and_print() {
    let pair = Pair::new();
    let name = OsStr::from_bytes(b"caf\xe9");
    fs::write(pair.b.join(name), b"latin-1 nAme").unwrap();
    stamp(&pair.b);
    let d = pair.diffs();
    assert_eq!(d, vec![Difference { path: RelPath(b"caf\xe9".to_vec()), kind: DifferenceKind::Content { offset: 9 } }]);
    assert_eq!(d[0].to_string(), "differs: caf\u{FFFD}: content from byte 9");
}

#[test]
fn missing_root_is_an_error_naming_it() {
    let pair = Pair::new();
    let missing = pair.a.with_file_name("nope");
    let err = compare(&pair.a, &missing, &VerifyOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("tree B: cannot open ") && msg.contains("nope"), "{msg}");
}

fn imezzo(args: &[&OsStr]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_imezzo")).arg("verify").args(args).output().unwrap();
    let code = out.status.code().expect("imezzo verify exits, it is not killed");
    (code, String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn binary_exits_0_on_identical_trees_with_a_summary() {
    let pair = Pair::new();
    let (code, stdout, stderr) = imezzo(&[pair.a.as_os_str(), pair.b.as_os_str()]);
    assert_eq!((code, stdout.as_str(), stderr.as_str()), (0, "imezzo verify: identical (13 entries)\n", ""));
}

#[test]
fn binary_exits_1_and_lists_differences_sorted() {
    let pair = Pair::new();
    chmod(&pair.b.join("file"), 0o644);
    set_mtime(&pair.b.join("dir/owned"), Timestamp { sec: 1_700_000_000, nsec: 0 });
    fs::remove_file(pair.b.join("empty")).unwrap();
    set_mtime(&pair.b, STAMP);
    let (code, stdout, _) = imezzo(&[pair.a.as_os_str(), pair.b.as_os_str()]);
    assert_eq!(code, 1);
    assert_eq!(
        stdout,
        "differs: dir/owned: mtime 1700000000.123456789 != 1700000000.000000000\n\
         only in A: empty\n\
         differs: file: mode 4755 != 0644\n\
         imezzo verify: 3 differences\n"
    );
}

#[test]
fn binary_exits_2_with_one_error_line_when_a_tree_is_missing() {
    let pair = Pair::new();
    let missing = pair.a.with_file_name("missing");
    let (code, stdout, stderr) = imezzo(&[missing.as_os_str(), pair.b.as_os_str()]);
    assert_eq!(code, 2);
    assert_eq!(stdout, "");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("imezzo: error: tree A: cannot open ") && stderr.contains("missing"), "{stderr}");
}

#[test]
fn binary_exits_2_when_a_tree_is_a_file() {
    let pair = Pair::new();
    let file = pair.b.join("file");
    let (code, stdout, stderr) = imezzo(&[pair.a.as_os_str(), file.as_os_str()]);
    assert_eq!((code, stdout.as_str()), (2, ""));
    assert_eq!(
        stderr,
        format!("imezzo: error: tree B: {} is not a directory; verify compares two directory trees\n", file.display())
    );
}
