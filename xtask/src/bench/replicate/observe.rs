//! The replica observer of the lag rows: inotify on the replica's directories, and on every
//! event naming one of the writer's files, that file read whole and its op recorded.
//!
//! Tools land a file in different ways: imezzo replays a whole-file rewrite as a temporary
//! file renamed into place and a range in place, rsync always renames a temporary file. The
//! watched events cover both (`IN_MOVED_TO`, `IN_CLOSE_WRITE`, `IN_MODIFY`, `IN_CREATE`);
//! reading the content, rather than trusting the event, is what says which op arrived. A
//! queue overflow is answered by reading every file of the watched directories again.

use std::{
    collections::HashMap,
    ffi::CString,
    fs::{self, File},
    io::Read,
    os::{fd::AsRawFd, fd::FromRawFd, fd::OwnedFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::{self, JoinHandle},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use super::lag::{self, Observation, Target, CONTENT_LEN};

/// What the observer saw once stopped.
pub struct Observed {
    pub observations: Vec<Observation>,
    /// inotify queue overflows (each answered by a rescan).
    pub overflows: u64,
}

pub struct Observer {
    stop: Arc<AtomicBool>,
    latest: Arc<Mutex<HashMap<Target, u64>>>,
    thread: Option<JoinHandle<Result<Observed>>>,
}

const WATCHED: u32 = libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO | libc::IN_MODIFY | libc::IN_CREATE;

impl Observer {
    /// Watches the lag workload's directories under `replica`, which must exist.
    pub fn start(replica: &Path) -> Result<Observer> {
        // SAFETY: inotify_init1 has no memory effects; the fd is owned at once.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error())
                .context("could not create an inotify instance for the replica observer");
        }
        // SAFETY: raw is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut dirs = HashMap::new();
        for index in 0..lag::DIRS {
            let dir = replica.join(lag::dir_name(index));
            let path = CString::new(dir.as_os_str().as_bytes())
                .context("the replica path holds a NUL byte")?;
            // SAFETY: path is a valid NUL-terminated string for the duration of the call.
            let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), WATCHED) };
            if wd < 0 {
                return Err(std::io::Error::last_os_error()).with_context(|| {
                    format!(
                        "could not watch {} (was the workload's tree replicated?)",
                        dir.display()
                    )
                });
            }
            dirs.insert(wd, (index, dir));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(Mutex::new(HashMap::new()));
        let thread = {
            let (stop, latest) = (Arc::clone(&stop), Arc::clone(&latest));
            thread::spawn(move || watch(&fd, &dirs, &stop, &latest))
        };
        Ok(Observer {
            stop,
            latest,
            thread: Some(thread),
        })
    }

    /// How many files of `last` (the last op written to each) the replica has not shown
    /// holding that op or a later one yet.
    pub fn behind(&self, last: &HashMap<Target, u64>) -> usize {
        let latest = lock(&self.latest);
        last.iter()
            .filter(|(target, op)| latest.get(target).is_none_or(|seen| seen < op))
            .count()
    }

    pub fn finish(mut self) -> Result<Observed> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(observed)) => observed,
            Some(Err(_)) => bail!("the replica observer thread panicked"),
            None => bail!("the replica observer was already stopped"),
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Seen<'a> {
    latest: &'a Mutex<HashMap<Target, u64>>,
    observations: Vec<Observation>,
}

impl Seen<'_> {
    /// Reads `target`'s file and records its op if it is later than any seen there.
    fn read(&mut self, target: Target, path: &Path) {
        let Some(op) = read_op(path) else { return };
        let at = Instant::now();
        let mut latest = lock(self.latest);
        // A sighting of the op already seen there, or of an older one, changes no arrival.
        if latest.get(&target).is_some_and(|&seen| seen >= op) {
            return;
        }
        latest.insert(target, op);
        self.observations.push(Observation { target, op, at });
    }
}

fn watch(
    fd: &OwnedFd,
    dirs: &HashMap<i32, (u32, PathBuf)>,
    stop: &AtomicBool,
    latest: &Mutex<HashMap<Target, u64>>,
) -> Result<Observed> {
    let mut seen = Seen {
        latest,
        observations: Vec::new(),
    };
    let mut overflows = 0;
    // Aligned for inotify_event; room for many events per read.
    let mut buffer = vec![0_u64; 64 * 1024 / 8];
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd we pass.
        let ready = unsafe { libc::poll(&mut poll, 1, if stopping { 0 } else { 20 }) };
        if ready > 0 {
            let bytes = buffer.len() * 8;
            // SAFETY: the buffer is valid for `bytes` bytes of writes.
            let read = unsafe { libc::read(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), bytes) };
            if read > 0 {
                // SAFETY: the first `read` bytes were just written by the kernel; u8 has no
                // alignment or validity requirements.
                let events = unsafe {
                    std::slice::from_raw_parts(buffer.as_ptr().cast::<u8>(), read as usize)
                };
                for event in parse_events(events) {
                    match event {
                        Event::Overflow => {
                            overflows += 1;
                            rescan(dirs, &mut seen);
                        }
                        Event::Named { wd, name } => {
                            let Some((index, dir)) = dirs.get(&wd) else {
                                continue;
                            };
                            if let Some(target) = Target::parse(*index, name) {
                                seen.read(target, &dir.join(std::ffi::OsStr::from_bytes(name)));
                            }
                        }
                    }
                }
                continue;
            }
        }
        if stopping {
            return Ok(Observed {
                observations: seen.observations,
                overflows,
            });
        }
    }
}

/// After an overflow: every file of ours in the watched directories, read again.
fn rescan(dirs: &HashMap<i32, (u32, PathBuf)>, seen: &mut Seen) {
    for (index, dir) in dirs.values() {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if let Some(target) = Target::parse(*index, name.as_bytes()) {
                seen.read(target, &entry.path());
            }
        }
    }
}

/// The op whose content the file holds whole; None for a partial, foreign or missing file.
fn read_op(path: &Path) -> Option<u64> {
    let mut file = File::open(path).ok()?;
    let mut bytes = [0_u8; CONTENT_LEN + 1];
    let mut filled = 0;
    while filled < bytes.len() {
        match file.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(_) => return None,
        }
    }
    lag::parse_content(&bytes[..filled])
}

#[derive(Debug, PartialEq, Eq)]
enum Event<'a> {
    Overflow,
    Named { wd: i32, name: &'a [u8] },
}

/// The events in one read of an inotify fd: `struct inotify_event` records (wd, mask,
/// cookie, len, then `len` bytes of NUL-padded name), back to back.
fn parse_events(mut bytes: &[u8]) -> Vec<Event<'_>> {
    const HEADER: usize = 16;
    let mut events = Vec::new();
    while bytes.len() >= HEADER {
        let word = |at: usize| {
            u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let wd = word(0) as i32;
        let mask = word(4);
        let len = word(12) as usize;
        let Some(name) = bytes.get(HEADER..HEADER + len) else {
            break;
        };
        if mask & libc::IN_Q_OVERFLOW != 0 {
            events.push(Event::Overflow);
        } else if len > 0 {
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            events.push(Event::Named {
                wd,
                name: &name[..end],
            });
        }
        bytes = &bytes[HEADER + len..];
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(wd: i32, mask: u32, name: &[u8], padded: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&wd.to_ne_bytes());
        bytes.extend_from_slice(&mask.to_ne_bytes());
        bytes.extend_from_slice(&0_u32.to_ne_bytes());
        bytes.extend_from_slice(&(padded as u32).to_ne_bytes());
        let mut name = name.to_vec();
        name.resize(padded, 0);
        bytes.extend_from_slice(&name);
        bytes
    }

    #[test]
    fn inotify_records_are_split_and_names_unpadded() {
        let mut bytes = record(3, libc::IN_MOVED_TO, b"w12", 16);
        bytes.extend(record(-1, libc::IN_Q_OVERFLOW, b"", 0));
        bytes.extend(record(4, libc::IN_CLOSE_WRITE, b"n400", 16));
        assert_eq!(
            parse_events(&bytes),
            vec![
                Event::Named {
                    wd: 3,
                    name: b"w12"
                },
                Event::Overflow,
                Event::Named {
                    wd: 4,
                    name: b"n400"
                },
            ]
        );
    }

    #[test]
    fn a_truncated_record_ends_the_parse() {
        let mut bytes = record(3, libc::IN_MODIFY, b"w12", 16);
        bytes.truncate(20);
        assert_eq!(parse_events(&bytes), vec![]);
    }
}
