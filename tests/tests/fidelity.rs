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
