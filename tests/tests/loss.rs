//! Event loss: when the ring buffer overflows the agent must say so and
//! journal a `rescan` instead of silently dropping changes.

use imezzo_tests::sys;
use imezzo_tests::*;
use libc::{O_CREAT, O_WRONLY};
use std::time::{Duration, Instant};

/// The process state letter from /proc/PID/stat ('T' = stopped).
fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 1..].trim_start().chars().next()
}

#[test]
fn ring_overflow_while_the_agent_is_stopped_reports_loss_and_journals_a_rescan() {
    let fs = Fs::tmpfs("loss");
    fs.put("big", b"");
    fs.dirs("burst");
    let mut cap = Capture::start_with(&fs.root, &["--ring-bytes", "16384"]);

    cap.signal(libc::SIGSTOP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while proc_state(cap.pid) != Some('T') {
        assert!(
            Instant::now() < deadline,
            "the agent did not stop after SIGSTOP\n{}",
            cap.context()
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // 20 000 pwrites of 4 KiB, none adjacent to another (so they cannot all
    // coalesce into one extent), plus a few hundred creates.
    let f = sys::open(&fs.p("big"), O_WRONLY, 0).unwrap();
    let buf = [0x5au8; 4096];
    for i in 0..20_000i64 {
        assert_eq!(sys::pwrite64(&f, &buf, i * 8192).unwrap(), 4096);
    }
    drop(f);
    for i in 0..500 {
        drop(
            sys::open(
                &fs.p(&format!("burst/file-{i:04}")),
                O_WRONLY | O_CREAT,
                0o644,
            )
            .unwrap(),
        );
    }
    cap.signal(libc::SIGCONT);

    let line = cap.wait_stderr(
        |l| l.contains("lost") && l.contains("rescan"),
        Duration::from_secs(60),
    );
    assert!(
        line.is_some(),
        "no stderr line mentioning `lost` and `rescan` after the overflow\n{}",
        cap.context()
    );

    let (_, rescan) = cap.ops_until_with(
        |o| o["op"] == "rescan",
        Duration::from_secs(60),
        "a rescan op",
    );
    assert_eq!(
        rescan["path"],
        "",
        "the rescan should cover the whole root: {rescan}\n{}",
        cap.context()
    );
    assert!(
        rescan["reason"]
            .as_str()
            .map(|s| !s.is_empty())
            .unwrap_or(false),
        "the rescan op needs a non-empty reason: {rescan}\n{}",
        cap.context()
    );

    // The journal keeps working after the loss.
    let _ = cap.mark();

    let (status, stderr) = cap.stop();
    assert!(
        status.success(),
        "expected exit 0 after SIGINT, got {status}\n{}",
        cap.context()
    );
    let s =
        summary(&stderr).unwrap_or_else(|| panic!("no summary line on stop\n{}", cap.context()));
    assert!(
        s.drops > 0,
        "the summary must report drops > 0: {s:?}\n{}",
        cap.context()
    );
    assert!(
        s.rescans >= 1,
        "the summary must report at least one rescan: {s:?}\n{}",
        cap.context()
    );
}

/// A path longer than the probes copy cannot be followed op by op: the agent rescans the
/// deepest directory the copied part names, not the whole tree.
#[test]
fn a_path_longer_than_the_probes_copy_rescans_the_deepest_directory_it_names_not_the_root() {
    let fs = Fs::tmpfs("longpath");
    let deep: String = (0..5).map(|i| format!("{}{i}", "d".repeat(60))).collect::<Vec<_>>().join("/");
    fs.dirs(&deep);
    fs.dirs("elsewhere");
    let mut cap = Capture::start(&fs.root);
    fs.put(&format!("{deep}/f"), b"x");
    let (_, rescan) = cap.ops_until_with(|o| o["op"] == "rescan", Duration::from_secs(10), "a rescan op");
    let path = rescan["path"].as_str().unwrap_or_default().to_string();
    assert!(
        !path.is_empty() && deep.starts_with(&path) && path.len() < deep.len(),
        "want a rescan of a directory on the way to {deep:?}, got {rescan}\n{}",
        cap.context()
    );
    // Changes elsewhere are still journalled op by op afterwards.
    fs.put("elsewhere/g", b"y");
    cap.ops_until_with(|o| o["op"] == "create" && o["path"] == "elsewhere/g", Duration::from_secs(10), "the create of elsewhere/g");
}
