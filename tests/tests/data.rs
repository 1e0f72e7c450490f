//! Data changes: the write(2) family, copy_file_range, sendfile, splice,
//! fallocate, truncate, O_TRUNC, stores through a shared mmap, io_uring, and reflinks.

use imezzo_tests::sys::{self, AT_FDCWD};
use imezzo_tests::*;
use libc::{O_APPEND, O_CREAT, O_RDONLY, O_RDWR, O_TRUNC, O_WRONLY};
use std::os::fd::AsRawFd;
use std::time::Duration;

fn write_op(path: &str, offset: u64, len: u64) -> serde_json::Value {
    json!({"op": "write", "path": path, "offset": offset, "len": len})
}

// ---------------------------------------------------------------- write family

#[test]
fn write_journals_offset_and_len_at_the_file_position() {
    let fs = Fs::tmpfs("write");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    sys::lseek(&f, 10, libc::SEEK_SET).unwrap();
    assert_eq!(sys::write(&f, &[b'w'; 20]).unwrap(), 20);
    drop(f);
    cap.expect(&[write_op("f", 10, 20)]);
}

#[test]
fn pwrite64_journals_exact_offset_and_len() {
    let fs = Fs::tmpfs("pwrite64");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    assert_eq!(sys::pwrite64(&f, &[b'p'; 300], 5000).unwrap(), 300);
    drop(f);
    cap.expect(&[write_op("f", 5000, 300)]);
}

#[test]
fn writev_journals_one_write_covering_all_iovecs() {
    let fs = Fs::tmpfs("writev");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    sys::lseek(&f, 7, libc::SEEK_SET).unwrap();
    assert_eq!(
        sys::writev(&f, &[b"abc", b"defgh", b"ijklmnopq"]).unwrap(),
        17
    );
    drop(f);
    cap.expect(&[write_op("f", 7, 17)]);
}

#[test]
fn pwritev_journals_exact_offset_and_total_len() {
    let fs = Fs::tmpfs("pwritev");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    assert_eq!(
        sys::pwritev(&f, &[&[1u8; 10], &[2u8; 20]], 4096).unwrap(),
        30
    );
    drop(f);
    cap.expect(&[write_op("f", 4096, 30)]);
}

#[test]
fn pwritev2_with_an_offset_journals_exact_offset_and_len() {
    let fs = Fs::tmpfs("pwritev2");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    assert_eq!(sys::pwritev2(&f, &[b"wxyz", b"1234"], 123, 0).unwrap(), 8);
    drop(f);
    cap.expect(&[write_op("f", 123, 8)]);
}

#[test]
fn pwritev2_with_offset_minus_one_journals_a_write_at_the_file_position() {
    let fs = Fs::tmpfs("pwritev2-pos");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    sys::lseek(&f, 50, libc::SEEK_SET).unwrap();
    assert_eq!(sys::pwritev2(&f, &[b"abcdef"], -1, 0).unwrap(), 6);
    drop(f);
    cap.expect(&[write_op("f", 50, 6)]);
}

#[test]
fn pwritev2_with_rwf_append_journals_a_write_at_the_end_of_file() {
    let fs = Fs::tmpfs("pwritev2-append");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    assert_eq!(
        sys::pwritev2(&f, &[b"tail"], 0, sys::RWF_APPEND).unwrap(),
        4
    );
    drop(f);
    assert_eq!(std::fs::metadata(fs.p("f")).unwrap().len(), 104);
    cap.expect(&[write_op("f", 100, 4)]);
}

#[test]
fn write_on_an_o_append_fd_journals_a_write_at_the_end_of_file() {
    let fs = Fs::tmpfs("o-append");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY | O_APPEND, 0).unwrap();
    assert_eq!(sys::write(&f, b"12345").unwrap(), 5);
    drop(f);
    cap.expect(&[write_op("f", 100, 5)]);
}

#[test]
fn create_then_write_journals_create_then_write() {
    let fs = Fs::tmpfs("create-write");
    let mut cap = Capture::start(&fs.root);
    let f = sys::openat(AT_FDCWD, &fs.p("n"), O_WRONLY | O_CREAT | O_TRUNC, 0o644).unwrap();
    sys::write(&f, b"hello world").unwrap();
    drop(f);
    cap.expect(&[
        json!({"op": "create", "path": "n", "mode": perm(&fs.p("n"))}),
        write_op("n", 0, 11),
    ]);
}

#[test]
fn zero_length_write_journals_nothing() {
    let fs = Fs::tmpfs("zero-write");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    assert_eq!(sys::write(&f, b"").unwrap(), 0);
    assert_eq!(sys::pwrite64(&f, b"", 50).unwrap(), 0);
    drop(f);
    cap.expect(&[]);
}

#[test]
fn consecutive_writes_are_journalled_as_extents_covering_exactly_the_written_bytes() {
    let fs = Fs::tmpfs("coalesce");
    fs.put("f", b"");
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    for i in 0..10u8 {
        assert_eq!(sys::write(&f, &[i; 100]).unwrap(), 100);
    }
    drop(f);
    let ops = cap.mark();
    assert!(
        ops.iter()
            .all(|o| o["op"] == "write" && o["path"] == "f" && o.get("source").is_none()),
        "expected only write ops on f, got {}\n{}",
        fmt_ops(&ops),
        cap.context()
    );
    assert_eq!(
        write_extents(&ops, "f"),
        vec![(0, 1000)],
        "{}",
        cap.context()
    );
}

#[test]
fn writes_with_a_gap_journal_extents_that_leave_the_gap_out() {
    let fs = Fs::tmpfs("gap");
    fs.put("f", b"");
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    sys::pwrite64(&f, &[1; 100], 0).unwrap();
    sys::pwrite64(&f, &[2; 100], 10000).unwrap();
    drop(f);
    let ops = cap.mark();
    assert!(
        ops.iter().all(|o| o["op"] == "write" && o["path"] == "f"),
        "{}",
        cap.context()
    );
    assert_eq!(
        write_extents(&ops, "f"),
        vec![(0, 100), (10000, 10100)],
        "{}",
        cap.context()
    );
}

#[test]
fn random_page_writes_into_a_large_file_journal_only_the_pages_written() {
    // Issue 10: 256 random 4 KiB pwrites into 1 GiB, written in one burst, were journalled
    // as one range covering them all (246 MiB refetched by the replica for 1 MiB written).
    let fs = Fs::tmpfs("random-pages");
    fs.put("big", b"");
    let f = sys::open(&fs.p("big"), O_WRONLY, 0).unwrap();
    sys::ftruncate(&f, 1 << 30).unwrap();
    drop(f);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("big"), O_WRONLY, 0).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut pages = Vec::new();
    for _ in 0..256 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let page = state % (1 << 18);
        sys::pwrite64(&f, &[7; 4096], (page * 4096) as i64).unwrap();
        pages.push((page * 4096, page * 4096 + 4096));
    }
    drop(f);
    let mut ops = cap.mark();
    // A writer that moved to another CPU leaves its last run in the first CPU's probe slot
    // until the agent polls it: such a write is journalled a little after the marker.
    let want = merge_extents(pages);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while write_extents(&ops, "big") != want {
        match cap.next_op(deadline.saturating_duration_since(std::time::Instant::now())) {
            Some(op) => ops.push(op),
            None => break,
        }
    }
    assert_eq!(
        write_extents(&ops, "big"),
        want,
        "the journalled ranges are not the pages written\n{}",
        cap.context()
    );
}

#[test]
fn interleaved_writes_to_two_files_are_journalled_per_file() {
    let fs = Fs::tmpfs("two-files");
    fs.put("a", b"");
    fs.put("b", b"");
    let mut cap = Capture::start(&fs.root);
    let a = sys::open(&fs.p("a"), O_WRONLY, 0).unwrap();
    let b = sys::open(&fs.p("b"), O_WRONLY, 0).unwrap();
    for _ in 0..4 {
        sys::write(&a, &[b'a'; 50]).unwrap();
        sys::write(&b, &[b'b'; 30]).unwrap();
    }
    drop((a, b));
    let ops = cap.mark();
    assert!(
        ops.iter()
            .all(|o| o["op"] == "write" && (o["path"] == "a" || o["path"] == "b")),
        "{}",
        cap.context()
    );
    assert_eq!(
        write_extents(&ops, "a"),
        vec![(0, 200)],
        "{}",
        cap.context()
    );
    assert_eq!(
        write_extents(&ops, "b"),
        vec![(0, 120)],
        "{}",
        cap.context()
    );
}

#[test]
fn copy_file_range_into_a_root_file_journals_a_write_at_off_out() {
    let fs = Fs::tmpfs("cfr");
    fs.put("f", &[b'.'; 100]);
    std::fs::write(fs.s("src"), vec![b's'; 5000]).unwrap();
    let mut cap = Capture::start(&fs.root);
    let src = sys::open(&fs.s("src"), O_RDONLY, 0).unwrap();
    let dst = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    let (mut off_in, mut off_out) = (0i64, 3000i64);
    let n = sys::copy_file_range(&src, Some(&mut off_in), &dst, Some(&mut off_out), 4000).unwrap();
    assert_eq!(n, 4000);
    drop((src, dst));
    cap.expect(&[write_op("f", 3000, 4000)]);
}

#[test]
fn copy_file_range_at_the_file_position_journals_a_write_there() {
    let fs = Fs::tmpfs("cfr-pos");
    fs.put("f", &[b'.'; 100]);
    std::fs::write(fs.s("src"), vec![b's'; 5000]).unwrap();
    let mut cap = Capture::start(&fs.root);
    let src = sys::open(&fs.s("src"), O_RDONLY, 0).unwrap();
    let dst = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    sys::lseek(&dst, 64, libc::SEEK_SET).unwrap();
    let n = sys::copy_file_range(&src, None, &dst, None, 1000).unwrap();
    assert_eq!(n, 1000);
    drop((src, dst));
    cap.expect(&[write_op("f", 64, 1000)]);
}

#[test]
fn sendfile_into_a_root_file_journals_a_write_at_the_file_position() {
    let fs = Fs::tmpfs("sendfile");
    fs.put("f", &[b'.'; 100]);
    std::fs::write(fs.s("src"), vec![b's'; 3000]).unwrap();
    let mut cap = Capture::start(&fs.root);
    let src = sys::open(&fs.s("src"), O_RDONLY, 0).unwrap();
    let dst = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    sys::lseek(&dst, 100, libc::SEEK_SET).unwrap();
    let mut off = 500i64;
    let n = sys::sendfile(&dst, &src, Some(&mut off), 2000).unwrap();
    assert_eq!(n, 2000);
    drop((src, dst));
    cap.expect(&[write_op("f", 100, 2000)]);
}

#[test]
fn splice_from_a_pipe_into_a_root_file_journals_a_write_at_off_out() {
    let fs = Fs::tmpfs("splice");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    let (r, w) = sys::pipe().unwrap();
    assert_eq!(sys::write(&w, &[b'p'; 1500]).unwrap(), 1500);
    let dst = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    let mut off_out = 2000i64;
    let n = sys::splice(&r, None, &dst, Some(&mut off_out), 1500).unwrap();
    assert_eq!(n, 1500);
    drop((r, w, dst));
    cap.expect(&[write_op("f", 2000, 1500)]);
}

// ---------------------------------------------------------------- an idle capture

#[test]
fn an_idle_capture_sleeps_and_a_write_to_a_file_held_open_wakes_it() {
    // A write that grows or starts a run puts nothing in the ring buffer: the agent used to
    // find it by polling every 2 ms, 500 wakeups a second on an idle export. Now an idle
    // loop sleeps long and the probes wake it at the next such write.
    let fs = Fs::tmpfs("idle-wake");
    fs.put("log", b"");
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("log"), O_WRONLY | O_APPEND, 0).unwrap();
    for i in 0..4u64 {
        // Long past the quiet time after which the loop sleeps.
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(sys::write(&f, b"line\n").unwrap(), 5);
        cap.ops_until_with(
            |op| op["op"] == "write" && op["path"] == "log" && op["offset"].as_u64().unwrap_or(0) + op["len"].as_u64().unwrap_or(0) >= 5 * (i + 1),
            Duration::from_secs(10),
            &format!("the append {i} to the open file"),
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let (status, stderr) = cap.stop();
    drop(f);
    assert!(status.success(), "{stderr:?}");
    let s = summary(&stderr).unwrap_or_else(|| panic!("no summary line in {stderr:?}"));
    // About 3 s of test: a loop that never slept would have woken some 1 500 times.
    assert!(s.polls < 600, "the idle loop kept polling: {s:?}");
    // Each append came while the loop slept (the first may race the sleep's start).
    assert!(s.woken >= 2, "the probes did not wake the sleeping loop: {s:?}");
}

// ---------------------------------------------------------------- fallocate

#[test]
fn fallocate_plain_journals_a_write_with_source_fallocate() {
    let fs = Fs::tmpfs("fallocate");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    sys::fallocate(&f, 0, 4096, 8192).unwrap();
    drop(f);
    cap.expect(&[json!({"op": "write", "path": "f", "offset": 4096, "len": 8192, "source": "fallocate", "mode": 0})]);
}

#[test]
fn fallocate_punch_hole_journals_a_write_with_source_fallocate_and_mode() {
    let fs = Fs::tmpfs("punch");
    fs.put("f", &[b'd'; 16384]);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    sys::fallocate(&f, mode, 4096, 8192).unwrap();
    drop(f);
    cap.expect(&[json!({"op": "write", "path": "f", "offset": 4096, "len": 8192, "source": "fallocate", "mode": mode})]);
}

#[test]
fn pages_written_back_on_ext4_journal_only_the_pages_written_never_the_whole_file() {
    // ext4's flush worker marks a file's inode dirty while it writes the file's pages out.
    // The dirty-inode safety net took that for a change no probe saw and journalled the
    // whole file: at every checkpoint of a PostgreSQL database on ext4 its largest table
    // (135 MB under pgbench) was read again by the server and refetched by the replica.
    let fs = Fs::ext4("writeback");
    fs.put("table", b"");
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("table"), O_RDWR, 0).unwrap();
    let mut pages = Vec::new();
    // A table growing page by page, then pages rewritten in place, each round flushed the
    // way a checkpoint does (syncfs: the flush worker writes the pages out, the caller waits).
    for round in 0..4u64 {
        for page in 0..64u64 {
            let at = (round * 64 + page) * 8192;
            sys::pwrite64(&f, &[round as u8 + 1; 8192], at as i64).unwrap();
            pages.push((at, at + 8192));
        }
        for page in (0..round * 64).step_by(7) {
            sys::pwrite64(&f, &[9; 8192], (page * 8192) as i64).unwrap();
        }
        assert_eq!(unsafe { libc::syncfs(f.as_raw_fd()) }, 0);
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(f);
    let ops = cap.mark();
    let whole: Vec<_> = ops.iter().filter(|o| o["source"] == "mmap").collect();
    assert!(whole.is_empty(), "writeback was journalled as a change of the whole file: {whole:?}\n{}", cap.context());
    assert_eq!(write_extents(&ops, "table"), merge_extents(pages), "{}", cap.context());
}

#[test]
fn fallocate_zero_range_on_ext4_journals_a_write_with_source_fallocate_and_mode() {
    // tmpfs does not implement FALLOC_FL_ZERO_RANGE (EOPNOTSUPP): use ext4.
    let fs = Fs::ext4("zero-range");
    fs.put("f", &[b'd'; 16384]);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    let mode = libc::FALLOC_FL_ZERO_RANGE;
    sys::fallocate(&f, mode, 1000, 5000).unwrap();
    drop(f);
    cap.expect(&[json!({"op": "write", "path": "f", "offset": 1000, "len": 5000, "source": "fallocate", "mode": mode})]);
}

// ---------------------------------------------------------------- truncate

#[test]
fn truncate_shrinking_journals_truncate_with_the_new_size() {
    let fs = Fs::tmpfs("truncate");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    sys::truncate(&fs.p("f"), 40).unwrap();
    cap.expect(&[json!({"op": "truncate", "path": "f", "size": 40})]);
}

#[test]
fn ftruncate_extending_journals_truncate_with_the_new_size() {
    let fs = Fs::tmpfs("ftruncate");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    sys::ftruncate(&f, 100_000).unwrap();
    drop(f);
    cap.expect(&[json!({"op": "truncate", "path": "f", "size": 100_000})]);
}

#[test]
fn open_o_trunc_of_an_existing_file_journals_truncate_to_zero() {
    let fs = Fs::tmpfs("o-trunc");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    drop(sys::open(&fs.p("f"), O_WRONLY | O_TRUNC, 0).unwrap());
    cap.expect(&[json!({"op": "truncate", "path": "f", "size": 0})]);
}

#[test]
fn a_rewrite_through_o_trunc_journals_the_truncate_before_the_bytes_written_after_it() {
    // The agent handles the open's event after the write that follows it has begun a run:
    // that run must not be journalled ahead of the truncate, which would cut it on replay.
    let fs = Fs::tmpfs("o-trunc-rewrite");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    for round in 0..20 {
        let f = sys::open(&fs.p("f"), O_WRONLY | O_TRUNC, 0).unwrap();
        sys::write(&f, &[b'x'; 300]).unwrap();
        drop(f);
        let ops = cap.mark();
        let trunc = ops.iter().position(|op| op["op"] == "truncate");
        let last_write = ops.iter().rposition(|op| op["op"] == "write");
        assert!(
            trunc.is_some() && last_write.is_some() && last_write > trunc,
            "round {round}: the write must follow the truncate\n{}",
            fmt_ops(&ops)
        );
    }
}

#[test]
fn openat_o_creat_o_trunc_of_an_existing_file_journals_truncate_to_zero() {
    let fs = Fs::tmpfs("o-creat-trunc");
    fs.dirs("d");
    fs.put("d/f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    let d = sys::dir(&fs.p("d")).unwrap();
    drop(
        sys::openat(
            d.as_raw_fd(),
            std::path::Path::new("f"),
            O_WRONLY | O_CREAT | O_TRUNC,
            0o644,
        )
        .unwrap(),
    );
    cap.expect(&[json!({"op": "truncate", "path": "d/f", "size": 0})]);
}

#[test]
fn creat_of_an_existing_file_journals_truncate_to_zero() {
    let fs = Fs::tmpfs("creat-existing");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    drop(sys::creat(&fs.p("f"), 0o644).unwrap());
    cap.expect(&[json!({"op": "truncate", "path": "f", "size": 0})]);
}

#[test]
fn writes_then_shrinking_ftruncate_journal_the_truncate_after_the_writes() {
    let fs = Fs::tmpfs("write-truncate");
    fs.put("f", b"");
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    for _ in 0..10 {
        sys::write(&f, &[b'x'; 100]).unwrap();
    }
    sys::ftruncate(&f, 10).unwrap();
    drop(f);
    let ops = cap.mark();
    let n: Vec<_> = ops.iter().map(normalize).collect();
    // Replaying the journal must give a 10-byte file: every write must come
    // before the truncate, and together the writes must cover [0, 10).
    let ok = n.last()
        == Some(&normalize(
            &json!({"op": "truncate", "path": "f", "size": 10}),
        ))
        && n[..n.len() - 1]
            .iter()
            .all(|o| o["op"] == "write" && o["path"] == "f")
        && write_extents(&n, "f")
            .first()
            .map(|&(a, b)| a == 0 && b >= 10)
            .unwrap_or(false);
    assert!(
        ok,
        "expected writes of f covering [0,10) then truncate f 10, got {}\n{}",
        fmt_ops(&n),
        cap.context()
    );
}

#[test]
fn truncate_then_write_journals_the_truncate_before_the_write() {
    let fs = Fs::tmpfs("truncate-write");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    sys::ftruncate(&f, 0).unwrap();
    sys::pwrite64(&f, &[b'n'; 50], 0).unwrap();
    drop(f);
    cap.expect(&[
        json!({"op": "truncate", "path": "f", "size": 0}),
        write_op("f", 0, 50),
    ]);
}

#[test]
fn write_then_unlink_journals_the_unlink_last() {
    let fs = Fs::tmpfs("write-unlink");
    fs.put("f", b"");
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    sys::write(&f, &[b'x'; 64]).unwrap();
    sys::unlink(&fs.p("f")).unwrap();
    drop(f);
    let n: Vec<_> = cap.mark().iter().map(normalize).collect();
    let unlink = normalize(&json!({"op": "unlink", "path": "f"}));
    let ok = n == vec![normalize(&write_op("f", 0, 64)), unlink.clone()] || n == vec![unlink];
    assert!(
        ok,
        "expected [write f 0+64, unlink f] or [unlink f], got {}\n{}",
        fmt_ops(&n),
        cap.context()
    );
}

// ---------------------------------------------------------------- ext4

#[test]
fn pwrite64_on_ext4_journals_exact_offset_and_len() {
    let fs = Fs::ext4("pwrite-ext4");
    fs.put("f", &[b'.'; 100]);
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("f"), O_WRONLY, 0).unwrap();
    sys::pwrite64(&f, &[b'e'; 4096], 8192).unwrap();
    drop(f);
    cap.expect(&[write_op("f", 8192, 4096)]);
}

// ---------------------------------------------------------------- mmap

fn mmap_store_journals_an_mmap_write(fs: Fs) {
    const SIZE: usize = 3 * 4096;
    fs.put("m", &[b'a'; SIZE]);
    // Make the set-up data clean on a block device, as for a file written long ago.
    std::fs::File::open(fs.p("m")).unwrap().sync_all().unwrap();
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("m"), O_RDWR, 0).unwrap();
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let b = p as *mut u8;
        std::ptr::write_volatile(b.add(100), b'Z');
        std::ptr::write_volatile(b.add(4096 + 7), b'Y');
        assert_eq!(libc::munmap(p, SIZE), 0);
    }
    drop(f);
    let data = std::fs::read(fs.p("m")).unwrap();
    assert_eq!((data[100], data[4096 + 7]), (b'Z', b'Y'));
    let (before, op) = cap.ops_until_with(
        |o| o["op"] == "write" && o["path"] == "m",
        Duration::from_secs(20),
        "a write op for m (source mmap)",
    );
    assert!(
        before.is_empty(),
        "unexpected ops before the mmap write: {}\n{}",
        fmt_ops(&before),
        cap.context()
    );
    assert_eq!(
        normalize(&op),
        normalize(&json!({"op": "write", "path": "m", "offset": 0, "len": SIZE, "source": "mmap"})),
        "{}",
        cap.context()
    );
    // Nothing else is journalled for the file afterwards (times changed by the fault are implied).
    let rest = cap.mark();
    assert!(
        rest.iter()
            .all(|o| o["op"] == "write" && o["path"] == "m" && o["source"] == "mmap"),
        "unexpected ops after the mmap write: {}\n{}",
        fmt_ops(&rest),
        cap.context()
    );
}

#[test]
fn store_through_shared_mmap_on_tmpfs_journals_a_write_with_source_mmap() {
    mmap_store_journals_an_mmap_write(Fs::tmpfs("mmap-tmpfs"));
}

#[test]
fn store_through_shared_mmap_on_ext4_journals_a_write_with_source_mmap() {
    mmap_store_journals_an_mmap_write(Fs::ext4("mmap-ext4"));
}

// ---------------------------------------------------------------- io_uring

/// An io_uring write changes the file with no write(2)-family syscall. The
/// journal must still show a write whose extents cover the written bytes
/// (whatever `source` the agent gives it).
fn io_uring_write_is_journalled(fs: Fs, in_worker: bool) {
    io_uring_write_is_journalled_with(fs, in_worker, true)
}

/// With `clean` false the pages written stay dirty from the set-up write, so the io_uring
/// write marks nothing dirty (no new dirty page) and, on XFS, whose timestamp updates are
/// transactions, no inode either.
fn io_uring_write_is_journalled_with(fs: Fs, in_worker: bool, clean: bool) {
    fs.put("u", &[b'.'; 10000]);
    if clean {
        std::fs::File::open(fs.p("u")).unwrap().sync_all().unwrap();
    }
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("u"), O_WRONLY, 0).unwrap();
    let n = sys::io_uring_write(&f, &[b'U'; 3000], 5000, in_worker).unwrap();
    assert_eq!(n, 3000);
    drop(f);
    assert_eq!(
        &std::fs::read(fs.p("u")).unwrap()[5000..8000],
        &[b'U'; 3000][..]
    );
    let (mut ops, first) = cap.ops_until_with(
        |o| o["op"] == "write" && o["path"] == "u",
        Duration::from_secs(20),
        "a write op for u (io_uring)",
    );
    ops.push(first);
    ops.extend(cap.mark());
    assert!(
        ops.iter().all(|o| o["op"] == "write" && o["path"] == "u"),
        "expected only write ops on u, got {}\n{}",
        fmt_ops(&ops),
        cap.context()
    );
    let ext = write_extents(&ops, "u");
    assert!(
        ext.iter().any(|&(a, b)| a <= 5000 && b >= 8000),
        "the journalled extents {ext:?} do not cover the written bytes [5000, 8000)\n{}",
        cap.context()
    );
}

#[test]
fn io_uring_write_submitted_inline_on_tmpfs_is_journalled_covering_the_written_bytes() {
    io_uring_write_is_journalled(Fs::tmpfs("uring-inline"), false);
}

#[test]
fn io_uring_write_in_a_worker_thread_on_tmpfs_is_journalled_covering_the_written_bytes() {
    io_uring_write_is_journalled(Fs::tmpfs("uring-worker"), true);
}

#[test]
fn io_uring_write_in_a_worker_thread_on_ext4_is_journalled_covering_the_written_bytes() {
    io_uring_write_is_journalled(Fs::ext4("uring-worker-ext4"), true);
}

#[test]
fn io_uring_write_into_pages_already_dirty_on_xfs_is_journalled_covering_the_written_bytes() {
    io_uring_write_is_journalled_with(Fs::xfs("uring-dirty-xfs"), false, false);
}

#[test]
fn store_through_shared_mmap_into_a_page_already_dirty_on_xfs_journals_an_mmap_write() {
    // The page is dirty from the write(2) before the capture starts: the store's fault dirties
    // no page, and XFS logs the new mtime in a transaction, marking no inode dirty.
    let fs = Fs::xfs("mmap-dirty-xfs");
    const SIZE: usize = 3 * 4096;
    fs.put("m", &[b'a'; SIZE]);
    let mut cap = Capture::start(&fs.root);
    std::thread::sleep(Duration::from_millis(20));
    let f = sys::open(&fs.p("m"), O_RDWR, 0).unwrap();
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), SIZE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        std::ptr::write_volatile((p as *mut u8).add(4096 + 7), b'Y');
        assert_eq!(libc::munmap(p, SIZE), 0);
    }
    drop(f);
    let (_, op) = cap.ops_until_with(
        |o| o["op"] == "write" && o["path"] == "m",
        Duration::from_secs(20),
        "a write op for m (a store into a dirty page on XFS)",
    );
    assert_eq!(
        normalize(&op),
        normalize(&json!({"op": "write", "path": "m", "offset": 0, "len": SIZE, "source": "mmap"})),
        "{}",
        cap.context()
    );
}

// ---------------------------------------------------------------- reflink

const FICLONE: libc::c_ulong = 0x4004_9409;
const FICLONERANGE: libc::c_ulong = 0x4020_940d;

/// FICLONE and FICLONERANGE replace a file's bytes with no write syscall (XFS reflinks):
/// the destination must be journalled as written, whole.
#[test]
fn ficlone_and_ficlonerange_on_xfs_journal_a_write_of_the_destination() {
    let fs = Fs::xfs("reflink");
    const SIZE: usize = 256 << 10;
    fs.put("src", &[b's'; SIZE]);
    fs.put("whole", &[b'w'; SIZE]);
    fs.put("range", &[b'r'; SIZE]);
    for name in ["src", "whole", "range"] {
        std::fs::File::open(fs.p(name)).unwrap().sync_all().unwrap();
    }
    let mut cap = Capture::start(&fs.root);
    let src = sys::open(&fs.p("src"), O_RDONLY, 0).unwrap();
    for (name, cmd) in [("whole", FICLONE), ("range", FICLONERANGE)] {
        let dst = sys::open(&fs.p(name), O_RDWR, 0).unwrap();
        let range: [u64; 4] = [src.as_raw_fd() as u64, 0, 64 << 10, 128 << 10];
        let rc = unsafe {
            if cmd == FICLONE {
                libc::ioctl(dst.as_raw_fd(), cmd, src.as_raw_fd())
            } else {
                libc::ioctl(dst.as_raw_fd(), cmd, range.as_ptr())
            }
        };
        assert_eq!(rc, 0, "{name}: {}", std::io::Error::last_os_error());
        drop(dst);
        let (_, op) = cap.ops_until_with(
            |o| o["op"] == "write" && o["path"] == name,
            Duration::from_secs(20),
            &format!("a write op for {name} (reflink)"),
        );
        assert_eq!(
            normalize(&op),
            normalize(&json!({"op": "write", "path": name, "offset": 0, "len": SIZE, "source": "mmap"})),
            "{}",
            cap.context()
        );
    }
    let data = std::fs::read(fs.p("range")).unwrap();
    assert_eq!((data[(128 << 10) - 1], data[128 << 10], data[192 << 10]), (b'r', b's', b'r'));
}

// ---------------------------------------------------------------- libaio

/// One io_submit of a buffered IOCB_CMD_PWRITE per (fd, bytes, offset), all in one call,
/// then every completion waited for.
fn aio_pwrites(writes: &[(i32, &[u8], i64)]) {
    #[repr(C)]
    #[derive(Default)]
    struct Iocb {
        data: u64,
        key: u32,
        rw_flags: u32,
        opcode: u16,
        reqprio: i16,
        fildes: u32,
        buf: u64,
        nbytes: u64,
        offset: i64,
        reserved2: u64,
        flags: u32,
        resfd: u32,
    }
    let n = writes.len() as i64;
    let mut ctx: u64 = 0;
    let mut cbs: Vec<Iocb> = writes
        .iter()
        .map(|&(fd, buf, offset)| Iocb {
            opcode: 1,
            fildes: fd as u32,
            buf: buf.as_ptr() as u64,
            nbytes: buf.len() as u64,
            offset,
            ..Default::default()
        })
        .collect();
    let mut list: Vec<*mut Iocb> = cbs.iter_mut().map(|c| c as *mut Iocb).collect();
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_io_setup, n, &mut ctx as *mut u64), 0, "io_setup");
        assert_eq!(libc::syscall(libc::SYS_io_submit, ctx, n, list.as_mut_ptr()), n, "io_submit");
        let mut events = vec![0u64; 4 * writes.len()];
        let mut got = 0;
        while got < n {
            let r = libc::syscall(
                libc::SYS_io_getevents,
                ctx,
                1i64,
                n - got,
                events.as_mut_ptr().add(4 * got as usize),
                std::ptr::null::<libc::timespec>(),
            );
            assert!(r > 0, "io_getevents");
            got += r;
        }
        libc::syscall(libc::SYS_io_destroy, ctx);
    }
}

#[test]
fn every_write_of_an_io_submit_with_many_control_blocks_is_journalled() {
    // tmpfs: a new file's first buffered aio write marks no inode dirty, so only the
    // io_submit probe sees these; it used to read the first 4 control blocks only.
    let fs = Fs::tmpfs("aio-many");
    let names: Vec<String> = (0..12).map(|i| format!("a{i}")).collect();
    let mut cap = Capture::start(&fs.root);
    let fds: Vec<_> = names.iter().map(|n| sys::open(&fs.p(n), O_CREAT | O_WRONLY, 0o644).unwrap()).collect();
    let data = [b'A'; 100];
    let writes: Vec<(i32, &[u8], i64)> = fds.iter().map(|f| (f.as_raw_fd(), &data[..], 0)).collect();
    aio_pwrites(&writes);
    drop(fds);
    for n in &names {
        cap.ops_until_with(
            |o| o["op"] == "write" && o["path"] == n.as_str(),
            Duration::from_secs(20),
            &format!("a write op for {n}"),
        );
    }
}

#[test]
fn an_io_submit_with_more_control_blocks_than_the_probe_reads_rescans() {
    let fs = Fs::tmpfs("aio-rescan");
    let mut cap = Capture::start(&fs.root);
    let f = sys::open(&fs.p("big"), O_CREAT | O_WRONLY, 0o644).unwrap();
    let data = [b'B'; 10];
    let writes: Vec<(i32, &[u8], i64)> = (0..100).map(|i| (f.as_raw_fd(), &data[..], i * 10)).collect();
    aio_pwrites(&writes);
    drop(f);
    cap.ops_until_with(|o| o["op"] == "rescan", Duration::from_secs(20), "a rescan (control blocks not read)");
}

#[test]
fn io_uring_writes_to_files_just_created_on_tmpfs_are_all_journalled() {
    // A write in the clock tick of the create sets no new time: tmpfs marks no inode dirty,
    // so only the io_uring completion shows it.
    let fs = Fs::tmpfs("uring-new");
    let mut cap = Capture::start(&fs.root);
    let names: Vec<String> = (0..20).map(|i| format!("n{i}")).collect();
    for n in &names {
        let f = sys::open(&fs.p(n), O_CREAT | O_WRONLY, 0o644).unwrap();
        assert_eq!(sys::io_uring_write(&f, &[b'N'; 8192], 0, false).unwrap(), 8192);
    }
    for n in &names {
        cap.ops_until_with(
            |o| o["op"] == "write" && o["path"] == n.as_str(),
            Duration::from_secs(20),
            &format!("a write op for {n} (io_uring, just created)"),
        );
    }
}
