//! `imezzo capture`: the journal of a directory, printed live.

use std::{
    io::Write,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
};

use imezzo_agent::capture::{probes::Probes, Capture, CaptureConfig};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn stop_on_signals() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn run(root: PathBuf, json: bool, ring_bytes: u32) -> anyhow::Result<()> {
    let mut cap = Capture::start(&CaptureConfig {
        root,
        ring_bytes,
        changed_since: None,
    })?;
    stop_on_signals();
    eprintln!(
        "imezzo: capture ready: journalling changes under {}",
        cap.root().display()
    );
    let stdout = std::io::stdout();
    let mut out = std::io::LineWriter::new(stdout.lock());
    cap.run(&STOP, &mut |entry| {
        let line = if json {
            serde_json::to_string(&entry).unwrap_or_default()
        } else {
            entry.to_string()
        };
        // A closed stdout (`| head`) ends the capture rather than the process.
        if writeln!(out, "{line}").is_err() {
            STOP.store(true, Ordering::Relaxed);
        }
    });
    let s = cap.stats();
    eprintln!(
        "imezzo: capture stopped: events={} drops={} rescans={} ops={} coarsened={} polls={} woken={}",
        s.events, s.drops, s.rescans, s.ops, s.coarsened, s.polls, s.woken
    );
    Ok(())
}

/// `imezzo capture --empty-probe`: an empty program on every syscall's exit until Ctrl-C.
pub fn empty_probe() -> anyhow::Result<()> {
    let probe = Probes::load_empty()?;
    stop_on_signals();
    eprintln!("imezzo: capture ready: an empty probe on every syscall's exit, nothing journalled");
    while !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(probe);
    eprintln!("imezzo: capture stopped: events=0 drops=0");
    Ok(())
}
