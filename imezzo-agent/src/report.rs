//! Problem reports an operator can read: one line per kind of problem per interval, with
//! counts.
//!
//! Every per-event warning or notice goes through [`report!`](crate::report!) instead of
//! `log::warn!`. Each call site is one *kind* of problem (a static key with a short
//! description). The first occurrence of a kind is logged at once, in full; later ones within
//! [`INTERVAL`] are only counted (no formatting, no allocation: a lock and an add), and when the
//! interval ends one line sums them up:
//!
//! ```text
//! imezzo: warn: reading "a/b" from the master failed: ...; apply the operation again ...
//! imezzo: warn: replay: an operation failed and will be applied again: 4211 more like it in the last 10 s
//! ```
//!
//! The summary is written by a timer thread within a second of the interval's end, or by the
//! next report of the kind if that comes first, and by [`flush`] at shutdown. A kind that stays
//! quiet for a whole interval starts afresh: its next occurrence is again logged at once.
//! One-off lifecycle lines (connected, full sync, in sync) stay plain `log` calls.

use std::{
    fmt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

/// How long later occurrences of a kind are counted before their summary line.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// How often the timer thread looks for intervals that ended.
const TICK: Duration = Duration::from_secs(1);

/// One kind of problem: a call site of [`report!`](crate::report!), with what is counted.
pub struct Kind {
    /// What the summary line counts, e.g. "replay: an operation failed and will be applied again".
    what: &'static str,
    level: log::Level,
    /// Set once the kind is in a reporter's list (for the timer and [`flush`]).
    registered: AtomicBool,
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    /// When the open interval started (its first occurrence was logged then), in the
    /// reporter's clock; `None` when no interval is open.
    start: Option<Duration>,
    /// Occurrences counted and not logged in the open interval.
    suppressed: u64,
}

/// What one occurrence becomes.
#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    /// The count of the interval that just ended, to be summarised before anything else.
    summary: Option<u64>,
    /// Whether this occurrence is logged in full.
    log_it: bool,
}

impl Kind {
    pub const fn new(what: &'static str, level: log::Level) -> Kind {
        Kind { what, level, registered: AtomicBool::new(false), window: Mutex::new(Window { start: None, suppressed: 0 }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One occurrence at `now`.
    fn note(&self, now: Duration, interval: Duration) -> Verdict {
        let mut w = self.lock();
        match w.start {
            Some(start) if now < start + interval => {
                w.suppressed += 1;
                Verdict { summary: None, log_it: false }
            }
            _ => {
                let summary = std::mem::take(&mut w.suppressed);
                w.start = Some(now);
                Verdict { summary: (summary > 0).then_some(summary), log_it: true }
            }
        }
    }

    /// Closes the open interval if it ended by `now` (or whatever its age when `all`); the
    /// count to summarise, if any.
    fn expire(&self, now: Duration, interval: Duration, all: bool) -> Option<u64> {
        let mut w = self.lock();
        let start = w.start?;
        if !all && now < start + interval {
            return None;
        }
        w.start = None;
        let n = std::mem::take(&mut w.suppressed);
        (n > 0).then_some(n)
    }
}

type Clock = Box<dyn Fn() -> Duration + Send + Sync>;
type Sink = Box<dyn Fn(log::Level, fmt::Arguments<'_>) + Send + Sync>;

/// Counts occurrences per kind against a clock and writes lines to a sink. The process has
/// one, [`global`], writing to `log`; tests make their own with a virtual clock.
pub struct Reporter {
    interval: Duration,
    clock: Clock,
    sink: Sink,
    kinds: Mutex<Vec<&'static Kind>>,
}

impl Reporter {
    pub fn new(interval: Duration, clock: Clock, sink: Sink) -> Reporter {
        Reporter { interval, clock, sink, kinds: Mutex::new(Vec::new()) }
    }

    /// One occurrence of `kind`; `detail` is formatted only if it is logged.
    pub fn report(&'static self, kind: &'static Kind, detail: fmt::Arguments<'_>) {
        if !kind.registered.load(Ordering::Acquire) {
            self.register(kind);
        }
        let verdict = kind.note((self.clock)(), self.interval);
        if let Some(n) = verdict.summary {
            self.summarise(kind, n);
        }
        if verdict.log_it {
            (self.sink)(kind.level, detail);
        }
    }

    fn register(&'static self, kind: &'static Kind) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !kind.registered.swap(true, Ordering::AcqRel) {
            kinds.push(kind);
        }
    }

    fn summarise(&self, kind: &Kind, n: u64) {
        let secs = self.interval.as_secs_f64();
        (self.sink)(kind.level, format_args!("{}: {n} more like it in the last {secs} s", kind.what));
    }

    /// Writes the summary of every interval that has ended; with `all`, of every open one.
    pub fn flush_at_end(&self, all: bool) {
        let now = (self.clock)();
        let kinds = self.kinds.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        for kind in kinds {
            if let Some(n) = kind.expire(now, self.interval, all) {
                self.summarise(kind, n);
            }
        }
    }
}

/// The process's reporter: writes through `log`, and a timer thread writes summaries within
/// [`TICK`] of their interval's end.
pub fn global() -> &'static Reporter {
    let mut fresh = false;
    let r = GLOBAL.get_or_init(|| {
        fresh = true;
        let origin = Instant::now();
        Reporter::new(
            INTERVAL,
            Box::new(move || origin.elapsed()),
            Box::new(|level, args| log::log!(level, "{args}")),
        )
    });
    if fresh {
        let spawned = std::thread::Builder::new().name("imezzo-report".into()).spawn(|| loop {
            std::thread::sleep(TICK);
            global().flush_at_end(false);
        });
        if let Err(e) = spawned {
            log::warn!("cannot start the log summary timer ({e}): summaries come with the next report");
        }
    }
    r
}

static GLOBAL: OnceLock<Reporter> = OnceLock::new();

/// Writes every pending summary now; call before the process exits.
pub fn flush() {
    if let Some(r) = GLOBAL.get() {
        r.flush_at_end(true);
    }
}

/// Reports one occurrence of a kind of problem: `report!(Warn, "what is counted", "detail {}", x)`.
/// The first occurrence per [`INTERVAL`] is logged in full at `level`; the rest are counted.
#[macro_export]
macro_rules! report {
    ($level:ident, $what:expr, $($detail:tt)+) => {{
        static KIND: $crate::report::Kind = $crate::report::Kind::new($what, ::log::Level::$level);
        if ::log::log_enabled!(::log::Level::$level) {
            $crate::report::global().report(&KIND, format_args!($($detail)+));
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    };

    /// A reporter on a virtual clock (milliseconds) whose lines land in a vector.
    fn virtual_reporter() -> (&'static Reporter, Arc<AtomicU64>, Arc<Mutex<Vec<String>>>) {
        let now = Arc::new(AtomicU64::new(0));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (n, l) = (now.clone(), lines.clone());
        let r = Reporter::new(
            Duration::from_secs(10),
            Box::new(move || Duration::from_millis(n.load(Ordering::SeqCst))),
            Box::new(move |level, args| l.lock().unwrap().push(format!("{level}: {args}"))),
        );
        (Box::leak(Box::new(r)), now, lines)
    }

    #[test]
    fn first_is_logged_the_rest_counted_and_summarised_at_the_interval_end() {
        static K: Kind = Kind::new("replay failed", log::Level::Warn);
        let (r, now, lines) = virtual_reporter();
        for i in 0..5000 {
            now.store(i, Ordering::SeqCst); // 5 s of events, one a millisecond
            r.report(&K, format_args!("detail {i}"));
        }
        assert_eq!(*lines.lock().unwrap(), ["WARN: detail 0"]);
        now.store(9_999, Ordering::SeqCst);
        r.flush_at_end(false);
        assert_eq!(lines.lock().unwrap().len(), 1, "the interval has not ended");
        now.store(10_000, Ordering::SeqCst);
        r.flush_at_end(false);
        assert_eq!(
            *lines.lock().unwrap(),
            ["WARN: detail 0", "WARN: replay failed: 4999 more like it in the last 10 s"]
        );
        // Quiet for the whole interval: the next one is logged at once again.
        now.store(30_000, Ordering::SeqCst);
        r.report(&K, format_args!("later"));
        assert_eq!(lines.lock().unwrap().last().unwrap(), "WARN: later");
        assert_eq!(lines.lock().unwrap().len(), 3);
    }

    #[test]
    fn the_next_report_summarises_an_ended_interval_when_the_timer_did_not() {
        static K: Kind = Kind::new("rescan", log::Level::Info);
        let (r, now, lines) = virtual_reporter();
        r.report(&K, format_args!("a"));
        now.store(1_000, Ordering::SeqCst);
        r.report(&K, format_args!("b"));
        r.report(&K, format_args!("c"));
        now.store(12_000, Ordering::SeqCst);
        r.report(&K, format_args!("d"));
        assert_eq!(
            *lines.lock().unwrap(),
            ["INFO: a", "INFO: rescan: 2 more like it in the last 10 s", "INFO: d"]
        );
        // A continuous flood: two lines per interval, whatever its rate.
        for ms in 12_001..60_000 {
            now.store(ms, Ordering::SeqCst);
            r.report(&K, format_args!("x"));
        }
        assert!(lines.lock().unwrap().len() <= 3 + 2 * 5, "{:?}", lines.lock().unwrap());
    }

    #[test]
    fn kinds_are_counted_apart_and_flush_writes_every_open_count() {
        static A: Kind = Kind::new("kind a", log::Level::Warn);
        static B: Kind = Kind::new("kind b", log::Level::Warn);
        let (r, _now, lines) = virtual_reporter();
        for _ in 0..3 {
            r.report(&A, format_args!("a"));
            r.report(&B, format_args!("b"));
        }
        r.flush_at_end(true);
        let got = lines.lock().unwrap().clone();
        assert_eq!(
            got,
            [
                "WARN: a",
                "WARN: b",
                "WARN: kind a: 2 more like it in the last 10 s",
                "WARN: kind b: 2 more like it in the last 10 s"
            ]
        );
        // Nothing pending: a second flush writes nothing.
        r.flush_at_end(true);
        assert_eq!(lines.lock().unwrap().len(), 4);
    }

    #[test]
    fn a_suppressed_report_does_not_format_its_detail() {
        static K: Kind = Kind::new("counted", log::Level::Warn);
        struct Counting<'a>(&'a AtomicU64);
        impl fmt::Display for Counting<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fetch_add(1, Ordering::SeqCst);
                f.write_str("x")
            }
        }
        let (r, _now, _lines) = virtual_reporter();
        let formatted = AtomicU64::new(0);
        for _ in 0..100 {
            r.report(&K, format_args!("{}", Counting(&formatted)));
        }
        assert_eq!(formatted.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn reports_from_many_threads_are_all_counted() {
        static K: Kind = Kind::new("threads", log::Level::Warn);
        let (r, now, lines) = virtual_reporter();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        r.report(&K, format_args!("t"));
                    }
                });
            }
        });
        now.store(10_000, Ordering::SeqCst);
        r.flush_at_end(false);
        assert_eq!(
            *lines.lock().unwrap(),
            ["WARN: t", "WARN: threads: 3999 more like it in the last 10 s"]
        );
    }
}
