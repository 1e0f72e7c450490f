//! The command line: start-up errors, signals, the summary line, pinning.
//!
//! The tests here hold `serial()` so that they do not overlap one another;
//! the pinning tests find their agent's instance directory from the BPF ids
//! the agent holds open, so agents started elsewhere do not disturb them.

use imezzo_tests::*;
use std::process::ExitStatus;

fn assert_startup_error(cap: &mut Capture, status: ExitStatus, what: &str) {
    let err = cap.stderr();
    let errors: Vec<_> = err
        .iter()
        .filter(|l| l.starts_with("imezzo: error:"))
        .collect();
    assert!(
        !status.success(),
        "{what}: expected a non-zero exit, got {status}\n{}",
        cap.context()
    );
    assert_eq!(
        errors.len(),
        1,
        "{what}: expected exactly one `imezzo: error:` line\n{}",
        cap.context()
    );
    assert!(
        !err.iter().any(|l| l.contains("panicked")),
        "{what}: the agent panicked\n{}",
        cap.context()
    );
    assert!(
        cap.seen.is_empty(),
        "{what}: no journal expected\n{}",
        cap.context()
    );
}

#[test]
fn capture_of_a_nonexistent_root_fails_with_one_error_line_and_no_panic() {
    let _g = serial();
    let fs = Fs::tmpfs("cli-missing");
    let missing = fs.p("does/not/exist");
    let mut cap = Capture::spawn(&missing, &[]);
    let st = cap.wait_exit(EXIT_TIMEOUT);
    assert_startup_error(&mut cap, st, "nonexistent root");
}

#[test]
fn capture_of_a_root_that_is_a_regular_file_fails_with_one_error_line_and_no_panic() {
    let _g = serial();
    let fs = Fs::tmpfs("cli-file");
    fs.put("plain", b"not a directory");
    let mut cap = Capture::spawn(&fs.p("plain"), &[]);
    let st = cap.wait_exit(EXIT_TIMEOUT);
    assert_startup_error(&mut cap, st, "root is a regular file");
}

#[test]
fn second_capture_on_the_same_root_fails_and_the_first_keeps_journalling() {
    let _g = serial();
    let fs = Fs::tmpfs("cli-twice");
    let mut first = Capture::start(&fs.root);
    let mut second = Capture::spawn(&fs.root, &[]);
    let st = second.wait_exit(EXIT_TIMEOUT);
    assert_startup_error(&mut second, st, "second capture on the same root");
    std::fs::create_dir(fs.p("still-there")).unwrap();
    first.expect(&[
        json!({"op": "mkdir", "path": "still-there", "mode": perm(&fs.p("still-there"))}),
    ]);
    let (st, _) = first.stop();
    assert!(
        st.success(),
        "the first capture should still stop cleanly, got {st}\n{}",
        first.context()
    );
}

#[test]
fn probes_are_pinned_under_sys_fs_bpf_imezzo_while_running_and_unpinned_after_sigint() {
    let _g = serial();
    let fs = Fs::tmpfs("cli-pins");
    let before = pin_instances();
    let mut cap = Capture::start(&fs.root);
    let after = pin_instances();
    // The instance directory is the one holding the programs and maps this
    // agent has open: robust against other agents starting meanwhile.
    let mine: Vec<_> = pin_dirs_of(cap.pid).into_iter().collect();
    assert_eq!(
        mine.len(),
        1,
        "expected the agent's probes pinned in exactly one instance directory under {PIN_BASE}, \
         found {mine:?} (instance dirs before start: {before:?}, after: {after:?})\n{}",
        cap.context()
    );
    let inst = &mine[0];
    assert!(
        !before.contains(inst),
        "{inst:?} existed before the agent started\n{}",
        cap.context()
    );
    let pins: Vec<_> = entries_under(inst)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with("imezzo_"))
                .unwrap_or(false)
        })
        .collect();
    assert!(
        !pins.is_empty(),
        "no pinned object named imezzo_* under {inst:?}: {:?}\n{}",
        entries_under(inst),
        cap.context()
    );

    let (st, _) = cap.stop();
    assert!(
        st.success(),
        "expected exit 0 after SIGINT, got {st}\n{}",
        cap.context()
    );
    assert!(
        !inst.exists(),
        "the instance directory {inst:?} is still there after a clean exit: {:?}\n{}",
        entries_under(inst),
        cap.context()
    );
}

#[test]
fn bpftool_lists_an_imezzo_program_while_capture_runs() {
    let _g = serial();
    let fs = Fs::tmpfs("cli-bpftool");
    let mut cap = Capture::start(&fs.root);
    let progs = bpftool_json(&["prog", "show"]);
    let names: Vec<String> = progs
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        names.iter().any(|n| n.starts_with("imezzo_")),
        "bpftool lists no program named imezzo_*; names: {names:?}\n{}",
        cap.context()
    );
    let (st, _) = cap.stop();
    assert!(st.success(), "{}", cap.context());
}

#[test]
fn sigterm_stops_capture_cleanly_with_a_summary_line_and_unpins() {
    let _g = serial();
    let fs = Fs::tmpfs("cli-sigterm");
    let mut cap = Capture::start(&fs.root);
    let pins = pin_dirs_of(cap.pid);
    assert!(
        !pins.is_empty(),
        "no pinned probes found for the agent\n{}",
        cap.context()
    );
    std::fs::create_dir(fs.p("d")).unwrap();
    let _ = cap.mark();
    cap.signal(libc::SIGTERM);
    let st = cap.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        st.code(),
        Some(0),
        "expected exit 0 after SIGTERM, got {st}\n{}",
        cap.context()
    );
    let err = cap.stderr();
    assert!(
        summary(&err).is_some(),
        "no `imezzo: capture stopped:` summary line\n{}",
        cap.context()
    );
    assert!(
        !err.iter().any(|l| l.contains("panicked")),
        "{}",
        cap.context()
    );
    let left: Vec<_> = pins.iter().filter(|p| p.exists()).collect();
    assert!(
        left.is_empty(),
        "pins left behind after SIGTERM: {left:?}\n{}",
        cap.context()
    );
}

#[test]
fn summary_on_sigint_counts_the_journalled_ops() {
    let _g = serial();
    let fs = Fs::tmpfs("cli-summary");
    let mut cap = Capture::start(&fs.root);
    for i in 0..5 {
        std::fs::create_dir(fs.p(&format!("d{i}"))).unwrap();
    }
    let _ = cap.mark();
    let (st, err) = cap.stop();
    assert_eq!(
        st.code(),
        Some(0),
        "expected exit 0 after SIGINT, got {st}\n{}",
        cap.context()
    );
    let s = summary(&err).unwrap_or_else(|| panic!("no summary line\n{}", cap.context()));
    assert_eq!(
        s.ops,
        cap.seen.len() as u64,
        "summary ops= vs journal lines printed: {s:?}\n{}",
        cap.context()
    );
    assert!(
        s.events >= 6,
        "6 changes were made, summary says events={}\n{}",
        s.events,
        cap.context()
    );
    assert_eq!((s.drops, s.rescans), (0, 0), "{}", cap.context());
}

#[test]
fn journal_seq_counts_from_one_without_gaps() {
    let _g = serial();
    let fs = Fs::tmpfs("cli-seq");
    let mut cap = Capture::start(&fs.root);
    for i in 0..10 {
        std::fs::write(fs.p(&format!("f{i}")), b"x").unwrap();
    }
    std::fs::create_dir(fs.p("d")).unwrap();
    let _ = cap.mark();
    let seqs: Vec<_> = cap.seen.iter().map(|o| o["seq"].as_u64()).collect();
    let want: Vec<_> = (1..=cap.seen.len() as u64).map(Some).collect();
    assert_eq!(seqs, want, "{}", cap.context());
    let (st, _) = cap.stop();
    assert!(st.success(), "{}", cap.context());
}
