//! Attribute changes: chmod family, chown family, timestamps, extended attributes.

use imezzo_tests::sys::{self, AT_FDCWD, KEEP};
use imezzo_tests::*;
use libc::{O_RDONLY, O_WRONLY};
use std::os::fd::AsRawFd;
use std::path::Path;

fn rel(s: &str) -> &Path {
    Path::new(s)
}

// ---------------------------------------------------------------- mode

#[test]
fn chmod_journals_setattr_mode() {
    let fs = Fs::tmpfs("chmod");
    fs.put("f", b"x");
    let mut cap = Capture::start(&fs.root);
    sys::chmod(&fs.p("f"), 0o600).unwrap();
    cap.expect(&[json!({"op": "setattr", "path": "f", "mode": 0o600})]);
}

#[test]
fn fchmod_journals_setattr_mode() {
    let fs = Fs::tmpfs("fchmod");
    fs.put("f", b"x");
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_RDONLY, 0).unwrap();
    sys::fchmod(&f, 0o640).unwrap();
    drop(f);
    cap.expect(&[json!({"op": "setattr", "path": "f", "mode": 0o640})]);
}

#[test]
fn fchmodat_relative_to_dirfd_journals_setattr_mode() {
    let fs = Fs::tmpfs("fchmodat-dirfd");
    fs.dirs("d");
    fs.put("d/f", b"x");
    let mut cap = Capture::start(&fs.root);
    let d = sys::dir(&fs.p("d")).unwrap();
    sys::fchmodat(d.as_raw_fd(), rel("f"), 0o604).unwrap();
    cap.expect(&[json!({"op": "setattr", "path": "d/f", "mode": 0o604})]);
}

#[test]
fn fchmodat_at_fdcwd_with_absolute_path_journals_setattr_mode() {
    let fs = Fs::tmpfs("fchmodat-cwd");
    fs.dirs("d");
    let mut cap = Capture::start(&fs.root);
    sys::fchmodat(AT_FDCWD, &fs.p("d"), 0o711).unwrap();
    cap.expect(&[json!({"op": "setattr", "path": "d", "mode": 0o711})]);
}

#[test]
fn fchmodat2_with_symlink_nofollow_on_a_file_journals_setattr_mode() {
    let fs = Fs::tmpfs("fchmodat2");
    fs.put("f", b"x");
    let mut cap = Capture::start(&fs.root);
    sys::fchmodat2(AT_FDCWD, &fs.p("f"), 0o620, libc::AT_SYMLINK_NOFOLLOW).unwrap();
    cap.expect(&[json!({"op": "setattr", "path": "f", "mode": 0o620})]);
}

#[test]
fn chmod_of_the_root_itself_journals_setattr_with_empty_path() {
    let fs = Fs::tmpfs("chmod-root");
    let mut cap = Capture::start(&fs.root);
    sys::chmod(&fs.root, 0o700).unwrap();
    cap.expect(&[json!({"op": "setattr", "path": "", "mode": 0o700})]);
}

// ---------------------------------------------------------------- owner

#[test]
fn chown_journals_setattr_uid_and_gid() {
    let fs = Fs::tmpfs("chown");
    fs.put("f", b"x");
    let mut cap = Capture::start(&fs.root);
    sys::chown(&fs.p("f"), 1234, 5678).unwrap();
    cap.expect(&[json!({"op": "setattr", "path": "f", "uid": 1234, "gid": 5678})]);
}

#[test]
fn fchown_journals_setattr_uid_and_gid() {
    let fs = Fs::tmpfs("fchown");
    fs.put("f", b"x");
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_RDONLY, 0).unwrap();
    sys::fchown(&f, 4321, 8765).unwrap();
    drop(f);
    cap.expect(&[json!({"op": "setattr", "path": "f", "uid": 4321, "gid": 8765})]);
}

#[test]
fn lchown_of_a_symlink_journals_setattr_on_the_link_not_its_target() {
    let fs = Fs::tmpfs("lchown");
    fs.put("f", b"x");
    std::os::unix::fs::symlink("f", fs.p("l")).unwrap();
    let mut cap = Capture::start(&fs.root);
    sys::lchown(&fs.p("l"), 2001, 2002).unwrap();
    let st = sys::lstat(&fs.p("f")).unwrap();
    assert_eq!(
        (st.st_uid, st.st_gid),
        (0, 0),
        "the target must be untouched"
    );
    cap.expect(&[json!({"op": "setattr", "path": "l", "uid": 2001, "gid": 2002})]);
}

#[test]
fn fchownat_relative_to_dirfd_journals_setattr_uid_and_gid() {
    let fs = Fs::tmpfs("fchownat-dirfd");
    fs.dirs("d");
    fs.put("d/f", b"x");
    let mut cap = Capture::start(&fs.root);
    let d = sys::dir(&fs.p("d")).unwrap();
    sys::fchownat(d.as_raw_fd(), rel("f"), 42, 43, 0).unwrap();
    cap.expect(&[json!({"op": "setattr", "path": "d/f", "uid": 42, "gid": 43})]);
}

#[test]
fn fchownat_at_fdcwd_with_symlink_nofollow_journals_setattr_on_the_link() {
    let fs = Fs::tmpfs("fchownat-nofollow");
    fs.put("f", b"x");
    std::os::unix::fs::symlink("f", fs.p("l")).unwrap();
    let mut cap = Capture::start(&fs.root);
    sys::fchownat(AT_FDCWD, &fs.p("l"), 7, 8, libc::AT_SYMLINK_NOFOLLOW).unwrap();
    cap.expect(&[json!({"op": "setattr", "path": "l", "uid": 7, "gid": 8})]);
}

#[test]
fn chown_changing_only_the_gid_journals_only_gid() {
    let fs = Fs::tmpfs("chown-gid");
    fs.put("f", b"x");
    let mut cap = Capture::start(&fs.root);
    sys::chown(&fs.p("f"), KEEP, 777).unwrap();
    cap.expect(&[json!({"op": "setattr", "path": "f", "gid": 777})]);
}

// ---------------------------------------------------------------- times

#[test]
fn utimensat_with_explicit_times_journals_atime_and_mtime_as_stat_shows() {
    let fs = Fs::tmpfs("utimensat");
    fs.put("f", b"x");
    let mut cap = Capture::start(&fs.root);
    let times = [
        sys::timespec(1_000_000_000, 123_456_789),
        sys::timespec(1_500_000_000, 987_654_321),
    ];
    sys::utimensat(AT_FDCWD, Some(&fs.p("f")), Some(times), 0).unwrap();
    let (atime, mtime) = stat_times(&fs.p("f"));
    assert_eq!(
        (&atime, &mtime),
        (
            &ts(1_000_000_000, 123_456_789),
            &ts(1_500_000_000, 987_654_321)
        )
    );
    cap.expect(&[json!({"op": "setattr", "path": "f", "atime": atime, "mtime": mtime})]);
}

#[test]
fn utimensat_to_now_relative_to_dirfd_journals_times_as_stat_shows() {
    let fs = Fs::tmpfs("utimensat-now");
    fs.dirs("d");
    fs.put("d/f", b"x");
    let f = fs.p("d/f");
    sys::utimensat(
        AT_FDCWD,
        Some(&f),
        Some([sys::timespec(1, 0), sys::timespec(2, 0)]),
        0,
    )
    .unwrap();
    let mut cap = Capture::start(&fs.root);
    let d = sys::dir(&fs.p("d")).unwrap();
    sys::utimensat(d.as_raw_fd(), Some(rel("f")), None, 0).unwrap();
    let (atime, mtime) = stat_times(&f);
    cap.expect(&[json!({"op": "setattr", "path": "d/f", "atime": atime, "mtime": mtime})]);
}

#[test]
fn utimensat_omitting_atime_journals_only_mtime() {
    let fs = Fs::tmpfs("utimensat-omit");
    fs.put("f", b"x");
    let mut cap = Capture::start(&fs.root);
    let times = [
        sys::timespec(0, libc::UTIME_OMIT),
        sys::timespec(1_600_000_000, 5),
    ];
    sys::utimensat(AT_FDCWD, Some(&fs.p("f")), Some(times), 0).unwrap();
    let (_, mtime) = stat_times(&fs.p("f"));
    assert_eq!(mtime, ts(1_600_000_000, 5));
    cap.expect(&[json!({"op": "setattr", "path": "f", "mtime": mtime})]);
}

#[test]
fn utimensat_with_symlink_nofollow_journals_setattr_on_the_link() {
    let fs = Fs::tmpfs("utimensat-link");
    fs.put("f", b"x");
    std::os::unix::fs::symlink("f", fs.p("l")).unwrap();
    let mut cap = Capture::start(&fs.root);
    let times = [
        sys::timespec(1_100_000_000, 1),
        sys::timespec(1_200_000_000, 2),
    ];
    sys::utimensat(
        AT_FDCWD,
        Some(&fs.p("l")),
        Some(times),
        libc::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
    let (atime, mtime) = stat_times(&fs.p("l"));
    assert_eq!(mtime, ts(1_200_000_000, 2));
    cap.expect(&[json!({"op": "setattr", "path": "l", "atime": atime, "mtime": mtime})]);
}

#[test]
fn futimens_journals_atime_and_mtime_as_stat_shows() {
    let fs = Fs::tmpfs("futimens");
    fs.put("f", b"x");
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    sys::futimens(
        &f,
        Some([
            sys::timespec(1_300_000_000, 11),
            sys::timespec(1_400_000_000, 22),
        ]),
    )
    .unwrap();
    drop(f);
    let (atime, mtime) = stat_times(&fs.p("f"));
    assert_eq!(
        (&atime, &mtime),
        (&ts(1_300_000_000, 11), &ts(1_400_000_000, 22))
    );
    cap.expect(&[json!({"op": "setattr", "path": "f", "atime": atime, "mtime": mtime})]);
}

#[test]
fn utimes_journals_microsecond_times_as_stat_shows() {
    let fs = Fs::tmpfs("utimes");
    fs.put("f", b"x");
    let mut cap = Capture::start(&fs.root);
    let tv = [
        libc::timeval {
            tv_sec: 1_111_111_111,
            tv_usec: 222_222,
        },
        libc::timeval {
            tv_sec: 1_333_333_333,
            tv_usec: 444_444,
        },
    ];
    sys::utimes(&fs.p("f"), Some(tv)).unwrap();
    let (atime, mtime) = stat_times(&fs.p("f"));
    assert_eq!(
        (&atime, &mtime),
        (
            &ts(1_111_111_111, 222_222_000),
            &ts(1_333_333_333, 444_444_000)
        )
    );
    cap.expect(&[json!({"op": "setattr", "path": "f", "atime": atime, "mtime": mtime})]);
}

// ---------------------------------------------------------------- xattrs

#[test]
fn setxattr_journals_setxattr_with_the_name() {
    let fs = Fs::tmpfs("setxattr");
    fs.put("f", b"x");
    let mut cap = Capture::start(&fs.root);
    sys::setxattr(&fs.p("f"), "user.color", b"red", 0).unwrap();
    cap.expect(&[json!({"op": "setxattr", "path": "f", "name": "user.color"})]);
}

#[test]
fn setxattr_on_a_directory_journals_setxattr_on_the_directory() {
    let fs = Fs::tmpfs("setxattr-dir");
    fs.dirs("d/e");
    let mut cap = Capture::start(&fs.root);
    sys::setxattr(&fs.p("d/e"), "user.tag", b"1", 0).unwrap();
    cap.expect(&[json!({"op": "setxattr", "path": "d/e", "name": "user.tag"})]);
}

#[test]
fn lsetxattr_journals_setxattr_with_the_name() {
    let fs = Fs::tmpfs("lsetxattr");
    fs.put("f", b"x");
    let mut cap = Capture::start(&fs.root);
    sys::lsetxattr(&fs.p("f"), "user.shape", b"round", 0).unwrap();
    cap.expect(&[json!({"op": "setxattr", "path": "f", "name": "user.shape"})]);
}

#[test]
fn fsetxattr_journals_setxattr_with_the_name() {
    let fs = Fs::tmpfs("fsetxattr");
    fs.put("f", b"x");
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_RDONLY, 0).unwrap();
    sys::fsetxattr(&f, "user.size", b"big", 0).unwrap();
    drop(f);
    cap.expect(&[json!({"op": "setxattr", "path": "f", "name": "user.size"})]);
}

#[test]
fn setxattrat_relative_to_dirfd_journals_setxattr_with_the_name() {
    let fs = Fs::tmpfs("setxattrat");
    fs.dirs("d");
    fs.put("d/f", b"x");
    let mut cap = Capture::start(&fs.root);
    let d = sys::dir(&fs.p("d")).unwrap();
    sys::setxattrat(d.as_raw_fd(), rel("f"), 0, "user.at", b"v", 0).unwrap();
    cap.expect(&[json!({"op": "setxattr", "path": "d/f", "name": "user.at"})]);
}

#[test]
fn setxattr_with_xattr_create_on_an_existing_name_fails_and_journals_nothing() {
    let fs = Fs::tmpfs("setxattr-fail");
    fs.put("f", b"x");
    sys::setxattr(&fs.p("f"), "user.color", b"red", 0).unwrap();
    let mut cap = Capture::start(&fs.root);
    let e = sys::setxattr(&fs.p("f"), "user.color", b"blue", libc::XATTR_CREATE).unwrap_err();
    assert_eq!(e.errno, libc::EEXIST);
    cap.expect(&[]);
}

fn with_xattr(tag: &str) -> Fs {
    let fs = Fs::tmpfs(tag);
    fs.put("f", b"x");
    sys::setxattr(&fs.p("f"), "user.color", b"red", 0).unwrap();
    fs
}

#[test]
fn removexattr_journals_removexattr_with_the_name() {
    let fs = with_xattr("removexattr");
    let mut cap = Capture::start(&fs.root);
    sys::removexattr(&fs.p("f"), "user.color").unwrap();
    cap.expect(&[json!({"op": "removexattr", "path": "f", "name": "user.color"})]);
}

#[test]
fn lremovexattr_journals_removexattr_with_the_name() {
    let fs = with_xattr("lremovexattr");
    let mut cap = Capture::start(&fs.root);
    sys::lremovexattr(&fs.p("f"), "user.color").unwrap();
    cap.expect(&[json!({"op": "removexattr", "path": "f", "name": "user.color"})]);
}

#[test]
fn fremovexattr_journals_removexattr_with_the_name() {
    let fs = with_xattr("fremovexattr");
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_RDONLY, 0).unwrap();
    sys::fremovexattr(&f, "user.color").unwrap();
    drop(f);
    cap.expect(&[json!({"op": "removexattr", "path": "f", "name": "user.color"})]);
}

#[test]
fn removexattrat_relative_to_dirfd_journals_removexattr_with_the_name() {
    let fs = with_xattr("removexattrat");
    let mut cap = Capture::start(&fs.root);
    let root = sys::dir(&fs.root).unwrap();
    sys::removexattrat(root.as_raw_fd(), rel("f"), 0, "user.color").unwrap();
    cap.expect(&[json!({"op": "removexattr", "path": "f", "name": "user.color"})]);
}
