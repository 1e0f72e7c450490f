//! Namespace changes: create, mkdir, mknod, symlink, link, unlink, rmdir, rename.
//!
//! Each test sets up its tree before the capture starts (so the agent learns it
//! from its initial walk) unless the scenario is about live tracking, performs
//! the syscall under test, then uses a marker file to collect and assert the
//! exact journal.

use imezzo_tests::sys::{self, AT_FDCWD};
use imezzo_tests::*;
use libc::{O_CREAT, O_EXCL, O_RDWR, O_TRUNC, O_WRONLY};
use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

fn rel(s: &str) -> &Path {
    Path::new(s)
}

// ---------------------------------------------------------------- create

#[test]
fn open_o_creat_with_absolute_path_journals_create_with_mode() {
    let fs = Fs::tmpfs("open-creat");
    let mut cap = Capture::start(&fs.root);
    drop(sys::open(&fs.p("new.txt"), O_WRONLY | O_CREAT, 0o640).unwrap());
    cap.expect(&[json!({"op": "create", "path": "new.txt", "mode": perm(&fs.p("new.txt"))})]);
}

#[test]
fn openat_o_creat_relative_to_dirfd_inside_root_journals_create() {
    let fs = Fs::tmpfs("openat-dirfd");
    fs.dirs("d/e");
    let mut cap = Capture::start(&fs.root);
    let d = sys::dir(&fs.p("d/e")).unwrap();
    drop(sys::openat(d.as_raw_fd(), rel("f"), O_WRONLY | O_CREAT | O_EXCL, 0o600).unwrap());
    cap.expect(&[json!({"op": "create", "path": "d/e/f", "mode": perm(&fs.p("d/e/f"))})]);
}

#[test]
fn openat_o_creat_at_fdcwd_with_absolute_path_journals_create() {
    let fs = Fs::tmpfs("openat-cwd");
    fs.dirs("d");
    let mut cap = Capture::start(&fs.root);
    drop(sys::openat(AT_FDCWD, &fs.p("d/f"), O_WRONLY | O_CREAT, 0o644).unwrap());
    cap.expect(&[json!({"op": "create", "path": "d/f", "mode": perm(&fs.p("d/f"))})]);
}

#[test]
fn creat_of_new_file_journals_create() {
    let fs = Fs::tmpfs("creat-new");
    let mut cap = Capture::start(&fs.root);
    drop(sys::creat(&fs.p("c"), 0o604).unwrap());
    cap.expect(&[json!({"op": "create", "path": "c", "mode": perm(&fs.p("c"))})]);
}

#[test]
fn openat2_o_creat_relative_to_root_dirfd_journals_create() {
    let fs = Fs::tmpfs("openat2");
    fs.dirs("sub");
    let mut cap = Capture::start(&fs.root);
    let root = sys::dir(&fs.root).unwrap();
    const RESOLVE_BENEATH: u64 = 0x08;
    drop(
        sys::openat2(
            root.as_raw_fd(),
            rel("sub/g"),
            O_WRONLY | O_CREAT,
            0o600,
            RESOLVE_BENEATH,
        )
        .unwrap(),
    );
    cap.expect(&[json!({"op": "create", "path": "sub/g", "mode": perm(&fs.p("sub/g"))})]);
}

#[test]
fn open_o_creat_of_existing_file_journals_nothing() {
    let fs = Fs::tmpfs("creat-existing");
    fs.put("f", b"hello");
    let mut cap = Capture::start(&fs.root);
    drop(sys::open(&fs.p("f"), O_WRONLY | O_CREAT, 0o644).unwrap());
    drop(sys::openat(AT_FDCWD, &fs.p("f"), O_RDWR | O_CREAT, 0o600).unwrap());
    cap.expect(&[]);
    assert_eq!(std::fs::read(fs.p("f")).unwrap(), b"hello");
}

#[test]
fn open_o_creat_o_trunc_of_new_file_journals_only_create() {
    let fs = Fs::tmpfs("creat-trunc-new");
    let mut cap = Capture::start(&fs.root);
    drop(sys::open(&fs.p("n"), O_WRONLY | O_CREAT | O_TRUNC, 0o644).unwrap());
    cap.expect(&[json!({"op": "create", "path": "n", "mode": perm(&fs.p("n"))})]);
}

#[test]
fn openat_on_dirfd_of_a_renamed_directory_creates_under_the_new_name() {
    let fs = Fs::tmpfs("openat-renamed");
    fs.dirs("d");
    let mut cap = Capture::start(&fs.root);
    let d = sys::dir(&fs.p("d")).unwrap();
    sys::rename(&fs.p("d"), &fs.p("e")).unwrap();
    drop(sys::openat(d.as_raw_fd(), rel("f"), O_WRONLY | O_CREAT, 0o644).unwrap());
    cap.expect(&[
        json!({"op": "rename", "path": "d", "new_path": "e"}),
        json!({"op": "create", "path": "e/f", "mode": perm(&fs.p("e/f"))}),
    ]);
}

#[test]
fn openat_from_a_dirfd_above_the_root_creates_inside_the_root() {
    let fs = Fs::tmpfs("openat-above");
    let mut cap = Capture::start(&fs.root);
    let mnt = sys::dir(&fs.mnt).unwrap();
    drop(sys::openat(mnt.as_raw_fd(), rel("root/x"), O_WRONLY | O_CREAT, 0o644).unwrap());
    cap.expect(&[json!({"op": "create", "path": "x", "mode": perm(&fs.p("x"))})]);
}

#[test]
fn openat_with_dotdot_from_the_sibling_into_the_root_journals_create() {
    let fs = Fs::tmpfs("openat-dotdot");
    let mut cap = Capture::start(&fs.root);
    let sib = sys::dir(&fs.sibling).unwrap();
    drop(sys::openat(sib.as_raw_fd(), rel("../root/y"), O_WRONLY | O_CREAT, 0o644).unwrap());
    cap.expect(&[json!({"op": "create", "path": "y", "mode": perm(&fs.p("y"))})]);
}

#[test]
fn create_through_a_symlinked_directory_journals_the_real_path() {
    let fs = Fs::tmpfs("create-via-symlink");
    fs.dirs("real");
    std::os::unix::fs::symlink("real", fs.p("ln")).unwrap();
    let mut cap = Capture::start(&fs.root);
    drop(sys::open(&fs.p("ln/f"), O_WRONLY | O_CREAT, 0o644).unwrap());
    cap.expect(&[json!({"op": "create", "path": "real/f", "mode": perm(&fs.p("real/f"))})]);
}

#[test]
fn create_through_a_symlinked_directory_by_a_process_gone_before_the_drain_journals_the_real_path() {
    // The path needs the file system to resolve (a symlink on the way) relative to a
    // directory fd, and the process has closed the fd (it exited) long before its batch is
    // drained: the directory's path comes from the table, not from /proc, and no rescan of
    // the whole tree follows (with batches of 5 ms, tar met this in a fresh clone's CI).
    let fs = Fs::tmpfs("create-via-symlink-gone");
    fs.dirs("d/real");
    std::os::unix::fs::symlink("real", fs.p("d/ln")).unwrap();
    let mut cap = Capture::start(&fs.root);
    let dir = std::ffi::CString::new(fs.p("d").as_os_str().as_bytes()).unwrap();
    let name = std::ffi::CString::new("ln/f").unwrap();
    // SAFETY: the child calls only async-signal-safe functions (open, openat, _exit).
    let child = unsafe { libc::fork() };
    if child == 0 {
        unsafe {
            let d = libc::open(dir.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
            let f = libc::openat(d, name.as_ptr(), O_WRONLY | O_CREAT, 0o644);
            libc::_exit(if d >= 0 && f >= 0 { 0 } else { 1 });
        }
    }
    assert!(child > 0, "fork failed");
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child could not create ln/f");
    cap.expect(&[json!({"op": "create", "path": "d/real/f", "mode": perm(&fs.p("d/real/f"))})]);
}

#[test]
fn non_utf8_name_is_journalled_with_replacement_character() {
    let fs = Fs::tmpfs("non-utf8");
    let mut cap = Capture::start(&fs.root);
    let p = fs.root.join(OsStr::from_bytes(b"caf\xe9"));
    drop(sys::open(&p, O_WRONLY | O_CREAT, 0o644).unwrap());
    cap.expect(&[json!({"op": "create", "path": "caf\u{FFFD}", "mode": perm(&p)})]);
}

// ---------------------------------------------------------------- mkdir / mknod

#[test]
fn mkdir_with_absolute_path_journals_mkdir_with_mode() {
    let fs = Fs::tmpfs("mkdir");
    let mut cap = Capture::start(&fs.root);
    sys::mkdir(&fs.p("dir"), 0o750).unwrap();
    cap.expect(&[json!({"op": "mkdir", "path": "dir", "mode": perm(&fs.p("dir"))})]);
}

#[test]
fn mkdirat_relative_to_dirfd_journals_mkdir() {
    let fs = Fs::tmpfs("mkdirat-dirfd");
    fs.dirs("a");
    let mut cap = Capture::start(&fs.root);
    let a = sys::dir(&fs.p("a")).unwrap();
    sys::mkdirat(a.as_raw_fd(), rel("b"), 0o700).unwrap();
    cap.expect(&[json!({"op": "mkdir", "path": "a/b", "mode": perm(&fs.p("a/b"))})]);
}

#[test]
fn mkdirat_at_fdcwd_with_absolute_path_journals_mkdir() {
    let fs = Fs::tmpfs("mkdirat-cwd");
    let mut cap = Capture::start(&fs.root);
    sys::mkdirat(AT_FDCWD, &fs.p("top"), 0o755).unwrap();
    cap.expect(&[json!({"op": "mkdir", "path": "top", "mode": perm(&fs.p("top"))})]);
}

#[test]
fn mknod_of_fifo_journals_mknod_with_type_and_mode() {
    let fs = Fs::tmpfs("mknod-fifo");
    let mut cap = Capture::start(&fs.root);
    sys::mknod(&fs.p("fifo"), libc::S_IFIFO | 0o640, 0).unwrap();
    let st = sys::lstat(&fs.p("fifo")).unwrap();
    assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFIFO);
    cap.expect(&[json!({"op": "mknod", "path": "fifo", "mode": st.st_mode, "rdev": 0})]);
}

#[test]
fn mknodat_of_fifo_relative_to_dirfd_journals_mknod() {
    let fs = Fs::tmpfs("mknodat-fifo");
    fs.dirs("p");
    let mut cap = Capture::start(&fs.root);
    let d = sys::dir(&fs.p("p")).unwrap();
    sys::mknodat(d.as_raw_fd(), rel("q"), libc::S_IFIFO | 0o600, 0).unwrap();
    let st = sys::lstat(&fs.p("p/q")).unwrap();
    cap.expect(&[json!({"op": "mknod", "path": "p/q", "mode": st.st_mode, "rdev": 0})]);
}

#[test]
fn mknod_of_char_device_journals_rdev_as_stat_reports_it() {
    let fs = Fs::tmpfs("mknod-chr");
    let mut cap = Capture::start(&fs.root);
    sys::mknod(&fs.p("null"), libc::S_IFCHR | 0o600, libc::makedev(1, 3)).unwrap();
    let st = sys::lstat(&fs.p("null")).unwrap();
    assert_eq!(st.st_rdev, libc::makedev(1, 3));
    cap.expect(&[json!({"op": "mknod", "path": "null", "mode": st.st_mode, "rdev": st.st_rdev})]);
}

#[test]
fn mknod_whose_name_is_taken_by_a_directory_before_capture_looks_journals_the_device_it_made() {
    // The agent stats a new name after the fact: by then a directory renamed over the same
    // name must not lend the device its type, mode or device number.
    let fs = Fs::tmpfs("mknod-replaced");
    fs.dirs("d");
    let mut cap = Capture::start(&fs.root);
    let mode = libc::S_IFCHR | 0o640;
    let rdev = libc::makedev(2379, 231086);
    sys::mknod(&fs.p("e"), mode, rdev).unwrap();
    sys::unlink(&fs.p("e")).unwrap();
    sys::rename(&fs.p("d"), &fs.p("e")).unwrap();
    let ops = cap.ops_until(|op| op["op"] == "rename", Duration::from_secs(10));
    let mknod = ops.iter().find(|op| op["op"] == "mknod").unwrap_or_else(|| panic!("no mknod in {}", fmt_ops(&ops)));
    assert_eq!(mknod["mode"], json!(mode), "{}", fmt_ops(&ops));
    assert_eq!(mknod["rdev"], json!(rdev), "{}", fmt_ops(&ops));
}

// ---------------------------------------------------------------- symlink / link

#[test]
fn symlink_journals_the_target_verbatim() {
    let fs = Fs::tmpfs("symlink");
    let mut cap = Capture::start(&fs.root);
    sys::symlink("../x/./y//z", &fs.p("l")).unwrap();
    cap.expect(&[json!({"op": "symlink", "path": "l", "target": "../x/./y//z"})]);
}

#[test]
fn symlinkat_relative_to_dirfd_journals_symlink() {
    let fs = Fs::tmpfs("symlinkat");
    fs.dirs("d");
    let mut cap = Capture::start(&fs.root);
    let d = sys::dir(&fs.p("d")).unwrap();
    sys::symlinkat("/abs/target", d.as_raw_fd(), rel("l")).unwrap();
    cap.expect(&[json!({"op": "symlink", "path": "d/l", "target": "/abs/target"})]);
}

#[test]
fn symlinkat_at_fdcwd_with_absolute_path_journals_symlink() {
    let fs = Fs::tmpfs("symlinkat-cwd");
    let mut cap = Capture::start(&fs.root);
    sys::symlinkat("dangling", AT_FDCWD, &fs.p("l2")).unwrap();
    cap.expect(&[json!({"op": "symlink", "path": "l2", "target": "dangling"})]);
}

#[test]
fn link_journals_existing_and_new_name() {
    let fs = Fs::tmpfs("link");
    fs.put("a", b"data");
    let mut cap = Capture::start(&fs.root);
    sys::link(&fs.p("a"), &fs.p("b")).unwrap();
    cap.expect(&[json!({"op": "link", "path": "a", "new_path": "b"})]);
}

#[test]
fn linkat_relative_to_two_dirfds_journals_link() {
    let fs = Fs::tmpfs("linkat-dirfd");
    fs.dirs("x");
    fs.dirs("y");
    fs.put("x/a", b"data");
    let mut cap = Capture::start(&fs.root);
    let (x, y) = (sys::dir(&fs.p("x")).unwrap(), sys::dir(&fs.p("y")).unwrap());
    sys::linkat(x.as_raw_fd(), rel("a"), y.as_raw_fd(), rel("b"), 0).unwrap();
    cap.expect(&[json!({"op": "link", "path": "x/a", "new_path": "y/b"})]);
}

#[test]
fn linkat_at_fdcwd_with_absolute_paths_journals_link() {
    let fs = Fs::tmpfs("linkat-cwd");
    fs.put("a", b"data");
    let mut cap = Capture::start(&fs.root);
    sys::linkat(AT_FDCWD, &fs.p("a"), AT_FDCWD, &fs.p("c"), 0).unwrap();
    cap.expect(&[json!({"op": "link", "path": "a", "new_path": "c"})]);
}

#[test]
fn link_then_write_through_the_second_name_journals_write_on_a_linked_name() {
    let fs = Fs::tmpfs("link-write");
    fs.put("a", b"0123456789");
    let mut cap = Capture::start(&fs.root);
    sys::link(&fs.p("a"), &fs.p("b")).unwrap();
    let f = sys::open(&fs.p("b"), O_WRONLY, 0).unwrap();
    assert_eq!(sys::pwrite64(&f, b"xyz", 1).unwrap(), 3);
    drop(f);
    let ops = cap.mark();
    let n: Vec<_> = ops.iter().map(normalize).collect();
    let ok = n.len() == 2
        && n[0] == normalize(&json!({"op": "link", "path": "a", "new_path": "b"}))
        && (n[1] == normalize(&json!({"op": "write", "path": "a", "offset": 1, "len": 3}))
            || n[1] == normalize(&json!({"op": "write", "path": "b", "offset": 1, "len": 3})));
    assert!(
        ok,
        "expected [link a->b, write (a or b) 1+3], got {}\n{}",
        fmt_ops(&n),
        cap.context()
    );
}

#[test]
fn unlink_one_name_then_write_through_the_other_journals_the_remaining_name() {
    let fs = Fs::tmpfs("unlink-other");
    fs.put("a", b"0123456789");
    std::fs::hard_link(fs.p("a"), fs.p("b")).unwrap();
    let mut cap = Capture::start(&fs.root);
    sys::unlink(&fs.p("a")).unwrap();
    let f = sys::open(&fs.p("b"), O_WRONLY, 0).unwrap();
    sys::pwrite64(&f, b"abc", 0).unwrap();
    drop(f);
    cap.expect(&[
        json!({"op": "unlink", "path": "a"}),
        json!({"op": "write", "path": "b", "offset": 0, "len": 3}),
    ]);
}

#[test]
fn unlink_of_the_opened_name_then_write_through_its_fd_journals_the_remaining_name() {
    let fs = Fs::tmpfs("unlink-fd");
    fs.put("a", b"0123456789");
    std::fs::hard_link(fs.p("a"), fs.p("b")).unwrap();
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("a"), O_WRONLY, 0).unwrap();
    sys::unlink(&fs.p("a")).unwrap();
    sys::pwrite64(&f, b"abcd", 4).unwrap();
    drop(f);
    cap.expect(&[
        json!({"op": "unlink", "path": "a"}),
        json!({"op": "write", "path": "b", "offset": 4, "len": 4}),
    ]);
}

// ---------------------------------------------------------------- unlink / rmdir

#[test]
fn unlink_with_absolute_path_journals_unlink() {
    let fs = Fs::tmpfs("unlink");
    fs.put("gone", b"x");
    let mut cap = Capture::start(&fs.root);
    sys::unlink(&fs.p("gone")).unwrap();
    cap.expect(&[json!({"op": "unlink", "path": "gone"})]);
}

#[test]
fn unlinkat_relative_to_dirfd_journals_unlink() {
    let fs = Fs::tmpfs("unlinkat");
    fs.dirs("d");
    fs.put("d/gone", b"x");
    let mut cap = Capture::start(&fs.root);
    let d = sys::dir(&fs.p("d")).unwrap();
    sys::unlinkat(d.as_raw_fd(), rel("gone"), 0).unwrap();
    cap.expect(&[json!({"op": "unlink", "path": "d/gone"})]);
}

#[test]
fn unlinkat_at_fdcwd_of_a_symlink_journals_unlink_of_the_link() {
    let fs = Fs::tmpfs("unlinkat-link");
    fs.put("t", b"x");
    std::os::unix::fs::symlink("t", fs.p("l")).unwrap();
    let mut cap = Capture::start(&fs.root);
    sys::unlinkat(AT_FDCWD, &fs.p("l"), 0).unwrap();
    cap.expect(&[json!({"op": "unlink", "path": "l"})]);
}

#[test]
fn unlinkat_with_at_removedir_journals_rmdir() {
    let fs = Fs::tmpfs("unlinkat-rmdir");
    fs.dirs("d/empty");
    let mut cap = Capture::start(&fs.root);
    let d = sys::dir(&fs.p("d")).unwrap();
    sys::unlinkat(d.as_raw_fd(), rel("empty"), libc::AT_REMOVEDIR).unwrap();
    cap.expect(&[json!({"op": "rmdir", "path": "d/empty"})]);
}

#[test]
fn rmdir_with_absolute_path_journals_rmdir() {
    let fs = Fs::tmpfs("rmdir");
    fs.dirs("e");
    let mut cap = Capture::start(&fs.root);
    sys::rmdir(&fs.p("e")).unwrap();
    cap.expect(&[json!({"op": "rmdir", "path": "e"})]);
}

#[test]
fn failed_namespace_syscalls_journal_nothing() {
    let fs = Fs::tmpfs("failures");
    fs.put("f", b"x");
    fs.dirs("full");
    fs.put("full/child", b"x");
    let mut cap = Capture::start(&fs.root);
    assert_eq!(
        sys::unlink(&fs.p("missing")).unwrap_err().errno,
        libc::ENOENT
    );
    assert_eq!(
        sys::mkdir(&fs.p("full"), 0o755).unwrap_err().errno,
        libc::EEXIST
    );
    assert_eq!(
        sys::rmdir(&fs.p("full")).unwrap_err().errno,
        libc::ENOTEMPTY
    );
    assert_eq!(
        sys::rename(&fs.p("missing"), &fs.p("other"))
            .unwrap_err()
            .errno,
        libc::ENOENT
    );
    assert_eq!(
        sys::link(&fs.p("f"), &fs.p("full/child"))
            .unwrap_err()
            .errno,
        libc::EEXIST
    );
    assert_eq!(
        sys::open(&fs.p("f"), O_WRONLY | O_CREAT | O_EXCL, 0o644)
            .unwrap_err()
            .errno,
        libc::EEXIST
    );
    assert_eq!(
        sys::symlink("t", &fs.p("f")).unwrap_err().errno,
        libc::EEXIST
    );
    assert_eq!(
        sys::mknod(&fs.p("f"), libc::S_IFIFO | 0o644, 0)
            .unwrap_err()
            .errno,
        libc::EEXIST
    );
    cap.expect(&[]);
}

// ---------------------------------------------------------------- rename

#[test]
fn rename_of_a_file_journals_rename() {
    let fs = Fs::tmpfs("rename");
    fs.put("a", b"x");
    let mut cap = Capture::start(&fs.root);
    sys::rename(&fs.p("a"), &fs.p("b")).unwrap();
    cap.expect(&[json!({"op": "rename", "path": "a", "new_path": "b"})]);
}

#[test]
fn renameat_between_two_dirfds_journals_rename() {
    let fs = Fs::tmpfs("renameat-dirfd");
    fs.dirs("a");
    fs.dirs("b");
    fs.put("a/f", b"x");
    let mut cap = Capture::start(&fs.root);
    let (a, b) = (sys::dir(&fs.p("a")).unwrap(), sys::dir(&fs.p("b")).unwrap());
    sys::renameat(a.as_raw_fd(), rel("f"), b.as_raw_fd(), rel("g")).unwrap();
    cap.expect(&[json!({"op": "rename", "path": "a/f", "new_path": "b/g"})]);
}

#[test]
fn renameat_at_fdcwd_with_absolute_paths_journals_rename() {
    let fs = Fs::tmpfs("renameat-cwd");
    fs.dirs("a");
    fs.put("a/f", b"x");
    let mut cap = Capture::start(&fs.root);
    sys::renameat(AT_FDCWD, &fs.p("a/f"), AT_FDCWD, &fs.p("g")).unwrap();
    cap.expect(&[json!({"op": "rename", "path": "a/f", "new_path": "g"})]);
}

#[test]
fn rename_over_an_existing_file_journals_one_rename_and_later_writes_use_the_new_name() {
    let fs = Fs::tmpfs("rename-over");
    fs.put("a", b"aaaa");
    fs.put("b", b"bbbbbbbb");
    let mut cap = Capture::start(&fs.root);
    sys::rename(&fs.p("a"), &fs.p("b")).unwrap();
    let f = sys::open(&fs.p("b"), O_WRONLY, 0).unwrap();
    sys::pwrite64(&f, b"zz", 2).unwrap();
    drop(f);
    cap.expect(&[
        json!({"op": "rename", "path": "a", "new_path": "b"}),
        json!({"op": "write", "path": "b", "offset": 2, "len": 2}),
    ]);
}

#[test]
fn rename_of_directory_with_deep_subtree_then_write_journals_the_new_path() {
    let fs = Fs::tmpfs("rename-deep");
    fs.dirs("top/l1/l2/l3/l4/l5");
    fs.put("top/l1/l2/l3/l4/l5/f", b"0123456789");
    let mut cap = Capture::start(&fs.root);
    sys::rename(&fs.p("top"), &fs.p("moved")).unwrap();
    let f = sys::open(&fs.p("moved/l1/l2/l3/l4/l5/f"), O_WRONLY, 0).unwrap();
    sys::pwrite64(&f, b"ABCD", 2).unwrap();
    drop(f);
    cap.expect(&[
        json!({"op": "rename", "path": "top", "new_path": "moved"}),
        json!({"op": "write", "path": "moved/l1/l2/l3/l4/l5/f", "offset": 2, "len": 4}),
    ]);
}

#[test]
fn deep_subtree_created_live_then_renamed_then_written_journals_the_new_path() {
    let fs = Fs::tmpfs("rename-deep-live");
    let mut cap = Capture::start(&fs.root);
    let mut expected = Vec::new();
    let mut rel_path = String::from("top");
    sys::mkdir(&fs.p(&rel_path), 0o755).unwrap();
    expected.push(json!({"op": "mkdir", "path": rel_path.clone(), "mode": perm(&fs.p(&rel_path))}));
    for i in 1..=5 {
        rel_path = format!("{rel_path}/l{i}");
        sys::mkdir(&fs.p(&rel_path), 0o755).unwrap();
        expected
            .push(json!({"op": "mkdir", "path": rel_path.clone(), "mode": perm(&fs.p(&rel_path))}));
    }
    let file = format!("{rel_path}/f");
    drop(sys::open(&fs.p(&file), O_WRONLY | O_CREAT, 0o644).unwrap());
    expected.push(json!({"op": "create", "path": file.clone(), "mode": perm(&fs.p(&file))}));
    cap.expect(&expected);

    sys::rename(&fs.p("top/l1"), &fs.p("l1-moved")).unwrap();
    let f = sys::open(&fs.p("l1-moved/l2/l3/l4/l5/f"), O_WRONLY, 0).unwrap();
    sys::write(&f, b"hello").unwrap();
    drop(f);
    cap.expect(&[
        json!({"op": "rename", "path": "top/l1", "new_path": "l1-moved"}),
        json!({"op": "write", "path": "l1-moved/l2/l3/l4/l5/f", "offset": 0, "len": 5}),
    ]);
}

#[test]
fn write_through_fd_opened_before_a_directory_rename_journals_the_new_path() {
    let fs = Fs::tmpfs("rename-open-fd");
    fs.dirs("d/e");
    fs.put("d/e/f", b"0123456789");
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("d/e/f"), O_WRONLY, 0).unwrap();
    sys::rename(&fs.p("d"), &fs.p("z")).unwrap();
    sys::pwrite64(&f, b"Q", 9).unwrap();
    drop(f);
    cap.expect(&[
        json!({"op": "rename", "path": "d", "new_path": "z"}),
        json!({"op": "write", "path": "z/e/f", "offset": 9, "len": 1}),
    ]);
}

#[test]
fn write_then_rename_journals_write_under_old_name_before_the_rename_or_under_new_name_after() {
    let fs = Fs::tmpfs("write-rename");
    fs.put("f", b"");
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    sys::write(&f, b"0123456789").unwrap();
    sys::rename(&fs.p("f"), &fs.p("g")).unwrap();
    drop(f);
    let ops: Vec<_> = cap.mark().iter().map(normalize).collect();
    let write_f = normalize(&json!({"op": "write", "path": "f", "offset": 0, "len": 10}));
    let write_g = normalize(&json!({"op": "write", "path": "g", "offset": 0, "len": 10}));
    let rename = normalize(&json!({"op": "rename", "path": "f", "new_path": "g"}));
    assert!(
        ops == vec![write_f, rename.clone()] || ops == vec![rename, write_g],
        "expected [write f, rename f->g] or [rename f->g, write g], got {}\n{}",
        fmt_ops(&ops),
        cap.context()
    );
}

#[test]
fn renameat2_exchange_of_file_and_directory_journals_exchange_and_later_ops_use_swapped_paths() {
    let fs = Fs::tmpfs("exchange");
    fs.put("f", b"abc");
    fs.dirs("d");
    fs.put("d/c", b"xyz");
    let mut cap = Capture::start(&fs.root);
    sys::renameat2(
        AT_FDCWD,
        &fs.p("f"),
        AT_FDCWD,
        &fs.p("d"),
        libc::RENAME_EXCHANGE,
    )
    .unwrap();
    // "d" is now the regular file, "f" the directory holding "c".
    let d = sys::open(&fs.p("d"), O_WRONLY, 0).unwrap();
    sys::pwrite64(&d, b"1", 0).unwrap();
    drop(d);
    let c = sys::open(&fs.p("f/c"), O_WRONLY, 0).unwrap();
    sys::pwrite64(&c, b"2", 2).unwrap();
    drop(c);
    cap.expect(&[
        json!({"op": "rename", "path": "f", "new_path": "d", "exchange": true}),
        json!({"op": "write", "path": "d", "offset": 0, "len": 1}),
        json!({"op": "write", "path": "f/c", "offset": 2, "len": 1}),
    ]);
}

#[test]
fn renameat2_noreplace_relative_to_dirfd_journals_noreplace() {
    let fs = Fs::tmpfs("noreplace");
    fs.put("a", b"x");
    let mut cap = Capture::start(&fs.root);
    let root = sys::dir(&fs.root).unwrap();
    sys::renameat2(
        root.as_raw_fd(),
        rel("a"),
        root.as_raw_fd(),
        rel("b"),
        libc::RENAME_NOREPLACE,
    )
    .unwrap();
    cap.expect(&[json!({"op": "rename", "path": "a", "new_path": "b", "noreplace": true})]);
}

#[test]
fn renameat2_noreplace_onto_an_existing_name_fails_and_journals_nothing() {
    let fs = Fs::tmpfs("noreplace-fail");
    fs.put("a", b"x");
    fs.put("b", b"y");
    let mut cap = Capture::start(&fs.root);
    let e = sys::renameat2(
        AT_FDCWD,
        &fs.p("a"),
        AT_FDCWD,
        &fs.p("b"),
        libc::RENAME_NOREPLACE,
    )
    .unwrap_err();
    assert_eq!(e.errno, libc::EEXIST);
    cap.expect(&[]);
}

// ---------------------------------------------------------------- ext4

#[test]
fn namespace_ops_on_ext4_journal_like_on_tmpfs() {
    let fs = Fs::ext4("ns-ext4");
    fs.put("old", b"x");
    let mut cap = Capture::start(&fs.root);
    sys::mkdir(&fs.p("d"), 0o755).unwrap();
    drop(sys::open(&fs.p("d/f"), O_WRONLY | O_CREAT, 0o644).unwrap());
    sys::rename(&fs.p("d/f"), &fs.p("g")).unwrap();
    sys::symlink("g", &fs.p("s")).unwrap();
    sys::link(&fs.p("g"), &fs.p("h")).unwrap();
    sys::unlink(&fs.p("old")).unwrap();
    sys::rmdir(&fs.p("d")).unwrap();
    cap.expect(&[
        json!({"op": "mkdir", "path": "d", "mode": 0o755}),
        json!({"op": "create", "path": "d/f", "mode": perm(&fs.p("g"))}),
        json!({"op": "rename", "path": "d/f", "new_path": "g"}),
        json!({"op": "symlink", "path": "s", "target": "g"}),
        json!({"op": "link", "path": "g", "new_path": "h"}),
        json!({"op": "unlink", "path": "old"}),
        json!({"op": "rmdir", "path": "d"}),
    ]);
}

#[test]
fn create_inside_a_directory_made_during_capture_on_ext4_journals_both() {
    let fs = Fs::ext4("mkdir-create-ext4");
    let mut cap = Capture::start(&fs.root);
    sys::mkdir(&fs.p("d"), 0o755).unwrap();
    drop(sys::open(&fs.p("d/f"), O_WRONLY | O_CREAT, 0o644).unwrap());
    cap.expect(&[
        json!({"op": "mkdir", "path": "d", "mode": perm(&fs.p("d"))}),
        json!({"op": "create", "path": "d/f", "mode": perm(&fs.p("d/f"))}),
    ]);
}

// ---------------------------------------------------------------- crossing the root's boundary
//
// The journal format does not fix which ops a move across the root's boundary
// produces, but it cannot be silent: the consumer has to learn that the name
// appeared (create/mkdir/symlink..., or a rescan covering it) or disappeared.

fn assert_journal_covers(cap: &Capture, ops: &[serde_json::Value], name: &str) {
    let covers = |o: &serde_json::Value| {
        let p = o["path"].as_str().unwrap_or("\u{0}");
        p == name || p.starts_with(&format!("{name}/")) || (o["op"] == "rescan" && p.is_empty())
    };
    assert!(
        !ops.is_empty() && ops.iter().all(covers),
        "expected a non-empty journal about {name:?} (or a rescan of the root), got {}\n{}",
        fmt_ops(ops),
        cap.context()
    );
}

#[test]
fn rename_of_a_tree_from_the_sibling_into_the_root_is_journalled() {
    let fs = Fs::tmpfs("move-in");
    std::fs::create_dir_all(fs.s("t/sub")).unwrap();
    std::fs::write(fs.s("t/sub/f"), b"data").unwrap();
    let mut cap = Capture::start(&fs.root);
    sys::rename(&fs.s("t"), &fs.p("t")).unwrap();
    let ops = cap.mark();
    assert_journal_covers(&cap, &ops, "t");
    // The agent now knows the moved-in tree: a write inside it has its path.
    let f = sys::open(&fs.p("t/sub/f"), O_WRONLY, 0).unwrap();
    sys::pwrite64(&f, b"X", 1).unwrap();
    drop(f);
    cap.expect(&[json!({"op": "write", "path": "t/sub/f", "offset": 1, "len": 1})]);
}

#[test]
fn a_name_moved_in_then_reused_before_the_drain_is_not_given_to_the_object_now_there() {
    // Drained together (the agent is stopped meanwhile): a tree moved in as b/f, moved on to
    // b/e, and a file a/c renamed to b/f. Described from what b/f held at the drain, the
    // moved-in tree took the file for itself: the table gave the file a second name, the
    // exchange that followed moved only that one, and a file made in the tree was journalled
    // beneath the file's other name (differential seed 796574861013 on ext4: replica files
    // left empty, their data journalled as writes to "b/f/b").
    let fs = Fs::tmpfs("move-in-reused");
    fs.dirs("a");
    fs.dirs("b/a");
    fs.put("a/c", b"file");
    std::fs::create_dir_all(fs.s("t")).unwrap();
    std::fs::write(fs.s("t/inside"), b"data").unwrap();
    let mut cap = Capture::start(&fs.root);
    cap.signal(libc::SIGSTOP);
    sys::rename(&fs.s("t"), &fs.p("b/f")).unwrap();
    sys::rename(&fs.p("b/f"), &fs.p("b/e")).unwrap();
    sys::rename(&fs.p("a/c"), &fs.p("b/f")).unwrap();
    cap.signal(libc::SIGCONT);
    let ops = cap.mark();
    let has = |op: &str, path: &str| ops.iter().any(|o| o["op"] == op && o["path"] == path);
    assert!(
        has("mkdir", "b/e") && has("create", "b/e/inside") && !has("create", "b/f"),
        "the tree is described where it went (b/e), and the file is not described as it: {}\n{}",
        fmt_ops(&ops),
        cap.context()
    );
    // The tree is at b/e and the file at b/f, for the table too.
    sys::renameat2(AT_FDCWD, &fs.p("b/a"), AT_FDCWD, &fs.p("b/e"), libc::RENAME_EXCHANGE).unwrap();
    let f = sys::open(&fs.p("b/a/new"), O_WRONLY | O_CREAT, 0o644).unwrap();
    sys::pwrite64(&f, b"X", 0).unwrap();
    drop(f);
    let f = sys::open(&fs.p("b/f"), O_WRONLY, 0).unwrap();
    sys::pwrite64(&f, b"Y", 1).unwrap();
    drop(f);
    cap.expect(&[
        json!({"op": "rename", "path": "b/a", "new_path": "b/e", "exchange": true}),
        json!({"op": "create", "path": "b/a/new", "mode": perm(&fs.p("b/a/new"))}),
        json!({"op": "write", "path": "b/a/new", "offset": 0, "len": 1}),
        json!({"op": "write", "path": "b/f", "offset": 1, "len": 1}),
    ]);
}

/// A directory whose name ends the probes' copy of any path beneath it (nothing short of the
/// root is known then), made before the agent starts.
fn long_dir(fs: &Fs) -> String {
    let long = "l".repeat(250);
    fs.dirs(&long);
    long
}

/// With the agent stopped, makes a path through `long` (whose drain walks the whole tree
/// again) and then `changes`, so the agent drains them together, after the walk has seen the
/// changes.
fn drained_after_a_whole_tree_rescan(cap: &mut Capture, fs: &Fs, long: &str, changes: impl FnOnce()) {
    cap.signal(libc::SIGSTOP);
    drop(sys::open(&fs.p(&format!("{long}/m")), O_WRONLY | O_CREAT, 0o644).unwrap());
    changes();
    cap.signal(libc::SIGCONT);
    let ops = cap.mark();
    assert!(
        ops.iter().any(|o| o["op"] == "rescan" && o["path"] == ""),
        "the long path rescans the whole tree: {}",
        fmt_ops(&ops)
    );
}

#[test]
fn an_exchange_drained_after_a_rescan_that_saw_it_is_not_undone_in_the_table() {
    // Drained together (the agent is stopped meanwhile): a path longer than the probes copy,
    // whose drain walks the whole tree again, then an exchange the walk already saw. Applied
    // to the new table, the exchange swapped it back, and every write to either file was
    // journalled under the other's name from then on (differential seed 796574861007 on
    // btrfs: a file's later writes journalled as another directory's file).
    let fs = Fs::tmpfs("exchange-after-rescan");
    let long = long_dir(&fs);
    fs.dirs("a");
    fs.put("a/c", b"c");
    fs.put("a/d", b"d");
    let mut cap = Capture::start(&fs.root);
    drained_after_a_whole_tree_rescan(&mut cap, &fs, &long, || {
        sys::renameat2(AT_FDCWD, &fs.p("a/c"), AT_FDCWD, &fs.p("a/d"), libc::RENAME_EXCHANGE).unwrap();
    });
    let f = sys::open(&fs.p("a/c"), O_WRONLY, 0).unwrap();
    sys::pwrite64(&f, b"D", 1).unwrap();
    drop(f);
    cap.expect(&[json!({"op": "write", "path": "a/c", "offset": 1, "len": 1})]);
}

#[test]
fn a_mkdir_drained_after_an_exchange_took_its_name_gives_no_directory_two_names() {
    // Drained late (the agent is stopped meanwhile): `mkdir de`, then an exchange that puts
    // a directory capture already knows at `de`. The agent learns a new directory's inode
    // by looking at its name when it drains the mkdir; it found the known directory there
    // and gave it a second name, the exchange then did nothing, and the move of `df/d11`
    // into `de` made that directory its own child: every later change beneath `de/d15` was
    // journalled without "d15" and lost on the replica (fsstress round s17: 2 167 entries).
    let fs = Fs::tmpfs("mkdir-then-exchange");
    fs.dirs("df/d11");
    let mut cap = Capture::start(&fs.root);
    cap.signal(libc::SIGSTOP);
    sys::mkdir(&fs.p("de"), 0o755).unwrap();
    sys::renameat2(AT_FDCWD, &fs.p("df/d11"), AT_FDCWD, &fs.p("de"), libc::RENAME_EXCHANGE).unwrap();
    sys::rename(&fs.p("df/d11"), &fs.p("de/d15")).unwrap();
    cap.signal(libc::SIGCONT);
    cap.mark();
    fs.put("de/d15/f", b"x");
    sys::chmod(&fs.p("de/d15/f"), 0o600).unwrap();
    sys::chmod(&fs.p("de"), 0o700).unwrap();
    let ops = cap.mark();
    let paths: Vec<_> = ops
        .iter()
        .filter(|o| o["op"] == "setattr")
        .map(|o| o["path"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(paths, ["de/d15/f", "de"], "setattrs journalled under other names: {}", fmt_ops(&ops));
}

#[test]
fn an_exchange_and_its_undoing_drained_together_keep_the_write_between_under_its_name_then() {
    // Outside a drain with a walk, both names holding what the table has is an exchange back
    // still to be drained: the table follows both, and the write between them is journalled
    // under the name its file had then.
    let fs = Fs::tmpfs("exchange-twice");
    fs.dirs("a");
    fs.put("a/c", b"c");
    fs.put("a/d", b"d");
    let mut cap = Capture::start(&fs.root);
    cap.signal(libc::SIGSTOP);
    let exchange = || sys::renameat2(AT_FDCWD, &fs.p("a/c"), AT_FDCWD, &fs.p("a/d"), libc::RENAME_EXCHANGE).unwrap();
    exchange();
    let f = sys::open(&fs.p("a/c"), O_WRONLY, 0).unwrap();
    sys::pwrite64(&f, b"D", 1).unwrap();
    drop(f);
    exchange();
    cap.signal(libc::SIGCONT);
    let swap = json!({"op": "rename", "path": "a/c", "new_path": "a/d", "exchange": true});
    cap.expect(&[swap.clone(), json!({"op": "write", "path": "a/c", "offset": 1, "len": 1}), swap]);
}

#[test]
fn a_rename_drained_after_a_rescan_that_saw_it_leaves_the_table_as_the_walk_found_it() {
    // As above, with a rename and a new file at the old name: applied to the walked table,
    // the rename moved the new file over the renamed one, whose writes then had no path.
    let fs = Fs::tmpfs("rename-after-rescan");
    let long = long_dir(&fs);
    fs.dirs("a");
    fs.put("a/x", b"x");
    let mut cap = Capture::start(&fs.root);
    drained_after_a_whole_tree_rescan(&mut cap, &fs, &long, || {
        sys::rename(&fs.p("a/x"), &fs.p("a/y")).unwrap();
        drop(sys::open(&fs.p("a/x"), O_WRONLY | O_CREAT, 0o644).unwrap());
    });
    for (name, at) in [("a/y", 0), ("a/x", 1)] {
        let f = sys::open(&fs.p(name), O_WRONLY, 0).unwrap();
        sys::pwrite64(&f, b"W", at).unwrap();
        drop(f);
    }
    cap.expect(&[
        json!({"op": "write", "path": "a/y", "offset": 0, "len": 1}),
        json!({"op": "write", "path": "a/x", "offset": 1, "len": 1}),
    ]);
}

#[test]
fn rename_of_a_file_from_the_root_to_the_sibling_is_journalled() {
    let fs = Fs::tmpfs("move-out");
    fs.put("leaving", b"data");
    let mut cap = Capture::start(&fs.root);
    sys::rename(&fs.p("leaving"), &fs.s("arrived")).unwrap();
    let ops = cap.mark();
    assert_journal_covers(&cap, &ops, "leaving");
    // ...and the file, now outside, is no longer journalled.
    let f = sys::open(&fs.s("arrived"), O_WRONLY, 0).unwrap();
    sys::pwrite64(&f, b"X", 1).unwrap();
    drop(f);
    cap.expect(&[]);
}

// ---------------------------------------------------------------- fast sequences

/// mkdir d; create d/f; write; rename d/f -> f<i>; rmdir d — a hundred times,
/// as fast as the test can go. Every object is gone or renamed again before
/// the agent reads its event, so the agent cannot rely on looking names up
/// after the fact.
///
/// The namespace operations must come exactly in order. Each write must come
/// once: under `d/f` between its create and its rename, or, when the writer
/// moved to another CPU before the rename (its coalesced run is still held by
/// the first CPU's probe), under `f<i>` after the rename. Journalling a write
/// late is safe (replay fetches the master's current bytes); journalling it
/// early is not, and is what this test refuses.
fn rapid_sequences_journal_exactly(fs: Fs) {
    let mut cap = Capture::start(&fs.root);
    let mut namespace = Vec::new();
    for i in 0..100 {
        sys::mkdir(&fs.p("d"), 0o755).unwrap();
        let f = sys::open(&fs.p("d/f"), O_WRONLY | O_CREAT, 0o644).unwrap();
        sys::write(&f, b"abc").unwrap();
        drop(f);
        let g = format!("f{i}");
        sys::rename(&fs.p("d/f"), &fs.p(&g)).unwrap();
        sys::rmdir(&fs.p("d")).unwrap();
        namespace.push(json!({"op": "mkdir", "path": "d", "mode": 0o755}));
        namespace.push(json!({"op": "create", "path": "d/f", "mode": perm(&fs.p(&g))}));
        namespace.push(json!({"op": "rename", "path": "d/f", "new_path": g}));
        namespace.push(json!({"op": "rmdir", "path": "d"}));
    }
    // A write still held in a CPU's run when the marker is drained is journalled after the
    // marker, in the same batch (a drain's writes follow its namespace ops): a second marker
    // collects it. (With one, a loaded CI machine saw "the write of iteration 90 was never
    // journalled": the writer had left that CPU, and capture drained it only then.)
    let mut got = cap.mark();
    got.extend(cap.mark());
    let got: Vec<serde_json::Value> = got.iter().map(normalize).collect();
    let want: Vec<serde_json::Value> = namespace.iter().map(normalize).collect();
    let fail = |why: String| -> ! {
        panic!("{why}\n  namespace expected: {}\n  got: {}\n{}", fmt_ops(&want), fmt_ops(&got), cap.context())
    };
    let names: Vec<serde_json::Value> = got.iter().filter(|op| op["op"] != "write").cloned().collect();
    if names != want {
        fail("the namespace operations differ from the ones made, or come in another order".into());
    }
    // Walk the journal, tracking which iteration the namespace ops have reached.
    let mut written = [false; 100];
    let mut seen_ns = 0usize;
    for op in &got {
        if op["op"] != "write" {
            seen_ns += 1;
            continue;
        }
        if op["offset"] != 0 || op["len"] != 3 {
            fail(format!("unexpected write {op}"));
        }
        let path = op["path"].as_str().unwrap_or_default();
        let i = if path == "d/f" {
            // Between create i (namespace index 4i+1) and rename i (4i+2).
            if seen_ns % 4 != 2 {
                fail(format!("write of d/f journalled outside a create..rename window: {op}"));
            }
            seen_ns / 4
        } else {
            let i: usize = path.strip_prefix('f').and_then(|n| n.parse().ok()).unwrap_or(usize::MAX);
            if i >= 100 || seen_ns < 4 * i + 3 {
                fail(format!("write {op} journalled before the rename that named it"));
            }
            i
        };
        if std::mem::replace(&mut written[i], true) {
            fail(format!("write of iteration {i} journalled twice"));
        }
    }
    if let Some(i) = written.iter().position(|w| !w) {
        fail(format!("the write of iteration {i} was never journalled"));
    }
}

#[test]
fn rapid_mkdir_create_rename_rmdir_sequences_on_tmpfs_journal_exactly() {
    rapid_sequences_journal_exactly(Fs::tmpfs("rapid-tmpfs"));
}

#[test]
fn rapid_mkdir_create_rename_rmdir_sequences_on_ext4_journal_exactly() {
    rapid_sequences_journal_exactly(Fs::ext4("rapid-ext4"));
}

#[test]
fn concurrent_changes_from_several_threads_are_all_journalled_in_per_thread_order() {
    const THREADS: usize = 4;
    const N: usize = 50;
    let fs = Fs::tmpfs("threads");
    for t in 0..THREADS {
        fs.dirs(&format!("t{t}"));
    }
    let mut cap = Capture::start(&fs.root);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let fs = &fs;
            s.spawn(move || {
                for i in 0..N {
                    let (a, b) = (fs.p(&format!("t{t}/f{i}")), fs.p(&format!("t{t}/g{i}")));
                    let f = sys::open(&a, O_WRONLY | O_CREAT, 0o644).unwrap();
                    sys::write(&f, &[b'x'; 10]).unwrap();
                    drop(f);
                    sys::rename(&a, &b).unwrap();
                }
            });
        }
    });
    // A write is held in its CPU's run until that CPU writes elsewhere or capture takes the
    // run at a drain; a thread that moved to another CPU between its write and its rename
    // has the rename journalled first, and the write after it under the name its inode has
    // then (replay fetches by inode, so the replica ends the same). A second marker collects
    // a write still held when the first is drained. (CI saw thread 2's write of f5 missing
    // before one marker.)
    let mut ops = cap.mark();
    ops.extend(cap.mark());
    let ops: Vec<_> = ops.iter().map(normalize).collect();
    for t in 0..THREADS {
        let prefix = format!("t{t}/");
        let mine: Vec<_> = ops
            .iter()
            .filter(|o| o["path"].as_str().unwrap_or("").starts_with(&prefix))
            .cloned()
            .collect();
        let names: Vec<_> = mine.iter().filter(|o| o["op"] != "write").cloned().collect();
        let mut want = Vec::new();
        for i in 0..N {
            let (a, b) = (format!("t{t}/f{i}"), format!("t{t}/g{i}"));
            want.push(normalize(
                &json!({"op": "create", "path": a, "mode": perm(&fs.p(&b))}),
            ));
            want.push(normalize(
                &json!({"op": "rename", "path": a, "new_path": b}),
            ));
        }
        assert_eq!(names, want, "thread {t}'s namespace ops differ\n{}", cap.context());
        let at = |o: &serde_json::Value| mine.iter().position(|m| m == o).unwrap();
        for i in 0..N {
            let (a, b) = (format!("t{t}/f{i}"), format!("t{t}/g{i}"));
            let writes: Vec<_> = mine
                .iter()
                .filter(|o| o["op"] == "write" && (o["path"] == a.as_str() || o["path"] == b.as_str()))
                .collect();
            let [w] = writes.as_slice() else {
                panic!("thread {t}, file {i}: writes {writes:?}, one wanted\n{}", cap.context());
            };
            assert_eq!((&w["offset"], &w["len"]), (&json!(0), &json!(10)), "thread {t}, file {i}");
            let create = at(&want[2 * i]);
            let rename = at(&want[2 * i + 1]);
            let pos = at(w);
            let in_order = if w["path"] == a.as_str() {
                create < pos && pos < rename
            } else {
                rename < pos
            };
            assert!(in_order, "thread {t}, file {i}: {w} out of order\n{}", cap.context());
        }
    }
    assert_eq!(
        ops.len(),
        THREADS * N * 3,
        "unexpected extra ops: {}\n{}",
        fmt_ops(&ops),
        cap.context()
    );
}
