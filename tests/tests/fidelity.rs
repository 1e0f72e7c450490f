//! Replica fidelity: after each scenario the replica must be identical to the export in type,
//! mode, owner, nanosecond times, xattrs, hard-link groups, device numbers, symlink targets,
//! sizes and bytes (judged by `imezzo verify`). Each test pins one divergence that was found
//! by real tools or the differential tester.

use imezzo_tests::replica::*;
use imezzo_tests::sys;
use std::path::Path;
use std::time::Duration;

/// Long enough for a repair after an idle stream; short enough that a divergence fails fast.
const SETTLE: Duration = Duration::from_secs(30);

#[allow(dead_code)]
fn ok<T>(r: sys::SysResult<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:?}"))
}

#[allow(dead_code)]
fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

#[test]
fn symlink_targets_of_255_to_4095_bytes_replicate_whole() {
    let mut r = Replication::started("longlink");
    for len in [255usize, 256, 300, 1000, 4095] {
        let target: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        std::os::unix::fs::symlink(&target, r.e(&format!("l{len}"))).unwrap();
    }
    // Directories in the target, as a real long target has.
    let nested = "d/".repeat(2000) + "end";
    assert_eq!(nested.len(), 4003);
    std::os::unix::fs::symlink(&nested, r.e("nested")).unwrap();
    r.assert_identical(SETTLE, "symlinks with long targets");
    let got = std::fs::read_link(r.r("l4095")).unwrap();
    assert_eq!(got.as_os_str().len(), 4095);
    r.assert_no_panic();
}

#[test]
fn a_full_sync_groups_hard_links_of_symlinks_devices_fifos_and_sockets() {
    let mut r = Replication::new("fullgroups");
    std::os::unix::fs::symlink("some/target", r.e("sym")).unwrap();
    ok(sys::mknod(&r.e("chr"), libc::S_IFCHR | 0o640, libc::makedev(1, 3)));
    ok(sys::mknod(&r.e("blk"), libc::S_IFBLK | 0o600, libc::makedev(7, 0)));
    ok(sys::mknod(&r.e("fifo"), libc::S_IFIFO | 0o644, 0));
    drop(std::os::unix::net::UnixListener::bind(r.e("sock")).unwrap());
    r.export.dirs("d");
    for name in ["sym", "chr", "blk", "fifo", "sock"] {
        // link(2) does not follow a final symlink: the symlink itself gets a second name.
        ok(sys::link(&r.e(name), &r.e(&format!("{name}-2"))));
        ok(sys::link(&r.e(name), &r.e(&format!("d/{name}-3"))));
    }
    r.start_server(&[]);
    r.start_client();
    r.assert_identical(SETTLE, "hard links of non-regular objects after a full sync");
    r.assert_no_panic();
}

#[test]
fn a_non_empty_directory_moved_out_of_the_export_leaves_the_replica() {
    let mut r = Replication::started("moveout");
    r.export.dirs("d/e/f");
    r.export.put("d/a", b"a\n");
    r.export.put("d/e/f/b", b"b\n");
    r.export.dirs("keep");
    r.assert_identical(SETTLE, "the tree before it moves out");
    let out = r.export.s("moved-out");
    ok(sys::rename(&r.e("d"), &out));
    r.export.put("keep/after", b"after the move\n");
    r.assert_identical(SETTLE, "a non-empty directory moved out");
    assert!(!exists(&r.r("d")), "the moved-out tree is still on the replica");
    r.assert_no_panic();
}
