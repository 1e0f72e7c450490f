//! The agent's own changes never come back as captured changes: replays in the next issue
//! write into trees the same kernel watches, and must not loop.
//! Runs as root against the real kernel (CI runs it as root; it fails, never skips).

use std::{fs, path::PathBuf, process::Command, time::Duration};

use imezzo_agent::{
    capture::{Capture, CaptureConfig},
    op::Op,
};

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(tag: &str) -> Tmpfs {
        let dir = std::env::temp_dir().join(format!("imezzo-own-{tag}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&dir).status().unwrap();
        assert!(st.success(), "mounting a tmpfs on {} failed (tests run as root)", dir.display());
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

#[test]
fn changes_made_by_the_capturing_process_itself_are_not_journalled() {
    let fs_ = Tmpfs::new("self");
    let root = fs_.0.join("root");
    fs::create_dir(&root).unwrap();
    let cap = Capture::start(&CaptureConfig::new(&root)).expect("probes load (run as root)");
    let handle = cap.spawn();

    // Our own process: create, write, rename, chmod, remove.
    fs::write(root.join("mine"), b"data").unwrap();
    fs::create_dir(root.join("mydir")).unwrap();
    fs::rename(root.join("mine"), root.join("mydir/mine2")).unwrap();
    fs::remove_file(root.join("mydir/mine2")).unwrap();

    // Another process: this one must be seen, and be the first thing seen.
    let st = Command::new("sh").arg("-c").arg(format!("echo x > {}/other", root.display())).status().unwrap();
    assert!(st.success());
    let first = handle.rx.recv_timeout(Duration::from_secs(10)).expect("the other process's create is journalled");
    assert_eq!(first.op, Op::Create { path: "other".into(), mode: 0o644 }, "first op was {first:?}");
    let stats = handle.stop();
    assert_eq!(stats.drops, 0);
}

#[test]
fn chmod_through_proc_self_fd_of_an_o_path_fd_is_journalled_as_setattr() {
    // GNU tar sets a directory's final mode with chmod("/proc/self/fd/N") on an O_PATH fd.
    let fs_ = Tmpfs::new("procfd");
    let root = fs_.0.join("root");
    fs::create_dir_all(root.join("d")).unwrap();
    let cap = Capture::start(&CaptureConfig::new(&root)).expect("probes load (run as root)");
    let handle = cap.spawn();
    let script = format!(
        "import os\nfd = os.open('{}', os.O_PATH)\nos.chmod('/proc/self/fd/%d' % fd, 0o751)\n",
        root.join("d").display()
    );
    let st = Command::new("python3").arg("-c").arg(script).status().unwrap();
    assert!(st.success());
    let first = handle.rx.recv_timeout(Duration::from_secs(10)).expect("the chmod is journalled");
    assert_eq!(
        first.op,
        Op::Setattr { path: "d".into(), mode: Some(0o751), uid: None, gid: None, atime: None, mtime: None },
        "first op was {first:?}"
    );
    handle.stop();
}
