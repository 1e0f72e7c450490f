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
