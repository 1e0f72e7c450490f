//! What the agent must not journal: changes outside the root (on the same
//! file system and on another one), and operations that change nothing.
//! (Changes made by the agent's own process are tested elsewhere.)

use imezzo_tests::sys::{self, AT_FDCWD};
use imezzo_tests::*;
use libc::{O_CREAT, O_RDONLY, O_RDWR, O_WRONLY};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Every kind of change, inside `dir` (which must exist and be empty).
fn churn(dir: &Path) {
    let p = |s: &str| dir.join(s);
    let f = sys::open(&p("f"), O_WRONLY | O_CREAT, 0o644).unwrap();
    sys::write(&f, &[b'x'; 500]).unwrap();
    sys::pwrite64(&f, &[b'y'; 100], 4096).unwrap();
    sys::fallocate(&f, 0, 0, 16384).unwrap();
    sys::ftruncate(&f, 100).unwrap();
    drop(f);
    sys::mkdir(&p("d"), 0o755).unwrap();
    sys::mknod(&p("fifo"), libc::S_IFIFO | 0o644, 0).unwrap();
    sys::symlink("f", &p("s")).unwrap();
    sys::link(&p("f"), &p("d/h")).unwrap();
    sys::rename(&p("f"), &p("g")).unwrap();
    sys::chmod(&p("g"), 0o600).unwrap();
    sys::chown(&p("g"), 11, 12).unwrap();
    sys::utimensat(AT_FDCWD, Some(&p("g")), None, 0).unwrap();
    sys::setxattr(&p("g"), "user.k", b"v", 0).unwrap();
    sys::removexattr(&p("g"), "user.k").unwrap();
    sys::truncate(&p("g"), 0).unwrap();
    sys::unlink(&p("d/h")).unwrap();
    sys::unlink(&p("s")).unwrap();
    sys::unlink(&p("fifo")).unwrap();
    sys::rmdir(&p("d")).unwrap();
    sys::unlink(&p("g")).unwrap();
}

#[test]
fn changes_in_a_sibling_directory_on_the_same_fs_journal_nothing() {
    let fs = Fs::tmpfs("filter-sibling");
    let mut cap = Capture::start(&fs.root);
    churn(&fs.sibling);
    cap.expect(&[]);
}

#[test]
fn changes_in_the_parent_of_the_root_journal_nothing() {
    let fs = Fs::tmpfs("filter-parent");
    std::fs::create_dir(fs.mnt.join("up")).unwrap();
    let mut cap = Capture::start(&fs.root);
    churn(&fs.mnt.join("up"));
    sys::chmod(&fs.mnt, 0o711).unwrap();
    cap.expect(&[]);
}

#[test]
fn changes_in_directories_whose_names_extend_the_root_name_journal_nothing() {
    let fs = Fs::tmpfs("filter-prefix");
    let root2 = fs.mnt.join("root2");
    let root_bak = fs.mnt.join("root.bak");
    std::fs::create_dir(&root2).unwrap();
    std::fs::create_dir(&root_bak).unwrap();
    let mut cap = Capture::start(&fs.root);
    churn(&root2);
    churn(&root_bak);
    cap.expect(&[]);
}

#[test]
fn changes_on_an_unrelated_tmpfs_journal_nothing() {
    let fs = Fs::tmpfs("filter-main");
    let other = Fs::tmpfs("filter-other");
    let mut cap = Capture::start(&fs.root);
    churn(&other.root);
    churn(&other.sibling);
    cap.expect(&[]);
}

#[test]
fn changes_on_an_unrelated_ext4_journal_nothing() {
    let fs = Fs::tmpfs("filter-main-ext4");
    let other = Fs::ext4("filter-other-ext4");
    let mut cap = Capture::start(&fs.root);
    churn(&other.root);
    cap.expect(&[]);
}

#[test]
fn openat_with_dotdot_from_inside_the_root_to_the_sibling_journals_nothing() {
    let fs = Fs::tmpfs("filter-dotdot");
    fs.dirs("in");
    let mut cap = Capture::start(&fs.root);
    let d = sys::dir(&fs.p("in")).unwrap();
    let f = sys::openat(
        d.as_raw_fd(),
        Path::new("../../sibling/x"),
        O_WRONLY | O_CREAT,
        0o644,
    )
    .unwrap();
    sys::write(&f, b"outside").unwrap();
    drop(f);
    sys::mkdirat(d.as_raw_fd(), Path::new("../../sibling/y"), 0o755).unwrap();
    assert!(fs.s("x").exists() && fs.s("y").is_dir());
    cap.expect(&[]);
}

#[test]
fn reads_and_metadata_queries_journal_nothing() {
    let fs = Fs::tmpfs("filter-reads");
    fs.dirs("d");
    fs.put("d/f", &[b'r'; 10000]);
    std::os::unix::fs::symlink("d/f", fs.p("l")).unwrap();
    sys::setxattr(&fs.p("d/f"), "user.k", b"v", 0).unwrap();
    let mut cap = Capture::start(&fs.root);
    let data = std::fs::read(fs.p("l")).unwrap();
    assert_eq!(data.len(), 10000);
    let _ = std::fs::metadata(fs.p("d/f")).unwrap();
    let _ = std::fs::symlink_metadata(fs.p("l")).unwrap();
    let _ = std::fs::read_link(fs.p("l")).unwrap();
    let _ = std::fs::read_dir(fs.p("d")).unwrap().count();
    let f = sys::open(&fs.p("d/f"), O_RDWR, 0).unwrap();
    let mut buf = [0u8; 64];
    let n = unsafe {
        libc::pread(
            f.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            64,
            5000,
        )
    };
    assert_eq!(n, 64);
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        assert_eq!(std::ptr::read_volatile((p as *const u8).add(4100)), b'r');
        libc::munmap(p, 8192);
    }
    drop(f);
    let c = cstr(fs.p("d/f"));
    let name = cstr(Path::new("user.k"));
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    assert_eq!(n, 1);
    let n =
        unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    assert!(n > 0);
    assert_eq!(
        unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) },
        0
    );
    drop(sys::open(&fs.p("d"), O_RDONLY | libc::O_DIRECTORY, 0).unwrap());
    cap.expect(&[]);
}

#[test]
fn create_through_a_symlink_in_the_root_pointing_outside_it_journals_nothing() {
    let fs = Fs::tmpfs("filter-symlink-out");
    std::os::unix::fs::symlink("../sibling", fs.p("out")).unwrap();
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("out/f"), O_WRONLY | O_CREAT, 0o644).unwrap();
    sys::write(&f, b"lands in sibling/").unwrap();
    drop(f);
    sys::mkdir(&fs.p("out/d"), 0o755).unwrap();
    assert!(fs.s("f").is_file() && fs.s("d").is_dir());
    cap.expect(&[]);
}

#[test]
fn dirfd_relative_changes_in_a_sibling_closed_at_once_cost_no_rescan() {
    // Other programs on a shared file system create through directory fds and close them
    // before the agent could ask /proc where they pointed: that must not rescan the tree.
    let fs = Fs::tmpfs("filter-dirfd-sibling");
    let mut cap = Capture::start(&fs.root);
    for i in 0..200 {
        let dir = sys::dir(&fs.sibling).unwrap();
        let name = format!("f{i}");
        drop(sys::openat(dir.as_raw_fd(), Path::new(&name), O_WRONLY | O_CREAT, 0o644).unwrap());
        sys::renameat(dir.as_raw_fd(), Path::new(&name), dir.as_raw_fd(), Path::new(&format!("g{i}"))).unwrap();
        drop(dir);
    }
    cap.expect(&[]);
    let (status, stderr) = cap.stop();
    assert!(status.success(), "{stderr:?}");
    let s = summary(&stderr).unwrap_or_else(|| panic!("no summary line in {stderr:?}"));
    assert_eq!(s.rescans, 0, "{stderr:?}");
}
