//! The lag rows' workload and arithmetic: a paced writer on the server's tree, and the lag of
//! each of its operations from what the replica's observer saw.
//!
//! Operation k writes [`CONTENT_LEN`] bytes that name k to one file, opened with
//! `O_CREAT | O_TRUNC` (the common way a program rewrites a file), and its close time is
//! recorded. One operation in [`NEW_EVERY`] creates a file of its own; the others overwrite
//! one of [`WORKING_FILES`] files that exist on both sides before the run.
//!
//! A replica file whose content names op k shows that op k and every earlier op on that file
//! have arrived: a write superseded by a later one on the same file is delivered by it. So
//! op k's arrival is the first time the observer read op k or a later op from its file.

use std::{
    collections::HashMap,
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::exec;

/// Files overwritten during a run; they exist on both sides before it starts.
pub const WORKING_FILES: u32 = 1000;
/// Directories the files are spread over.
pub const DIRS: u32 = 10;
/// Bytes each operation writes.
pub const CONTENT_LEN: usize = 1024;
/// One operation in this many creates a new file.
const NEW_EVERY: u64 = 4;
const HEADER: &[u8] = b"imezzo-bench op ";

/// The file an operation writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// `d<i % DIRS>/w<i>`, overwritten again and again.
    Working(u32),
    /// `d<k % DIRS>/n<k>`, created by op k alone.
    New(u64),
}

impl Target {
    /// The file op `k` writes: a fixed, well-spread sequence, the same in every run.
    pub fn of_op(k: u64) -> Target {
        if k.is_multiple_of(NEW_EVERY) {
            Target::New(k)
        } else {
            Target::Working((mix(k) % u64::from(WORKING_FILES)) as u32)
        }
    }

    pub fn dir_index(self) -> u32 {
        match self {
            Target::Working(i) => i % DIRS,
            Target::New(k) => (k % u64::from(DIRS)) as u32,
        }
    }

    pub fn rel_path(self) -> PathBuf {
        let name = match self {
            Target::Working(i) => format!("w{i}"),
            Target::New(k) => format!("n{k}"),
        };
        Path::new(&dir_name(self.dir_index())).join(name)
    }

    /// The target named `name` in directory `dir_index`, if the name is one of ours (tools'
    /// temporary names are not).
    pub fn parse(dir_index: u32, name: &[u8]) -> Option<Target> {
        let name = std::str::from_utf8(name).ok()?;
        // Leading zeros are not how we name files: such a name is not ours.
        let number = |s: &str| {
            !s.is_empty()
                && s.bytes().all(|b| b.is_ascii_digit())
                && (s == "0" || !s.starts_with('0'))
        };
        let target = if let Some(i) = name.strip_prefix('w') {
            let i: u32 = number(i).then(|| i.parse().ok())??;
            (i < WORKING_FILES).then_some(Target::Working(i))?
        } else {
            let k = name.strip_prefix('n')?;
            Target::New(number(k).then(|| k.parse().ok())??)
        };
        (target.dir_index() == dir_index).then_some(target)
    }
}

pub fn dir_name(index: u32) -> String {
    format!("d{index}")
}

/// splitmix64's finaliser: spreads consecutive ops over the working files.
fn mix(k: u64) -> u64 {
    let mut z = k.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The bytes op `k` writes: a line naming it, repeated to [`CONTENT_LEN`].
pub fn content(k: u64, out: &mut [u8; CONTENT_LEN]) {
    let line = format!("imezzo-bench op {k:020}\n");
    // Whole-slice copies, not a byte loop: xtask runs unoptimised, and at 10 000 ops a second
    // both the writer and the observer render a content per op.
    for chunk in out.chunks_mut(line.len()) {
        chunk.copy_from_slice(&line.as_bytes()[..chunk.len()]);
    }
}

/// The op whose whole content `bytes` is; None for a partial or foreign content.
pub fn parse_content(bytes: &[u8]) -> Option<u64> {
    if bytes.len() != CONTENT_LEN {
        return None;
    }
    let digits = bytes.strip_prefix(HEADER)?.get(..20)?;
    let k: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let mut expected = [0; CONTENT_LEN];
    content(k, &mut expected);
    (expected[..] == *bytes).then_some(k)
}

/// Makes the directories and the working files (with a content that names no op).
pub fn prepare(export: &Path) -> Result<()> {
    for d in 0..DIRS {
        let dir = export.join(dir_name(d));
        fs::create_dir(&dir).with_context(|| format!("could not create {}", dir.display()))?;
    }
    for i in 0..WORKING_FILES {
        let path = export.join(Target::Working(i).rel_path());
        fs::write(&path, b"not written yet\n")
            .with_context(|| format!("could not write {}", path.display()))?;
    }
    Ok(())
}

/// What the paced writer did.
pub struct Written {
    /// Close time of each op, indexed by op.
    pub closes: Vec<Instant>,
    pub started: Instant,
}

impl Written {
    /// Operations a second actually achieved, first start to last close.
    pub fn achieved_rate(&self) -> f64 {
        match self.closes.last() {
            Some(last) => {
                self.closes.len() as f64 / last.duration_since(self.started).as_secs_f64().max(1e-9)
            }
            None => 0.0,
        }
    }

    /// The last op written to each file.
    pub fn last_op_per_target(&self) -> HashMap<Target, u64> {
        let mut last = HashMap::new();
        for k in 0..self.closes.len() as u64 {
            last.insert(Target::of_op(k), k);
        }
        last
    }
}

/// Writes `rate` ops a second for `duration` under `export`. Op k is due at k / rate after
/// the start; when the writer falls behind it writes without pausing, and the achieved rate
/// says so.
pub fn write_paced(export: &Path, rate: u32, duration: Duration) -> Result<Written> {
    let total = (f64::from(rate) * duration.as_secs_f64()).round() as u64;
    let mut closes = Vec::with_capacity(total as usize);
    let mut bytes = [0; CONTENT_LEN];
    let started = Instant::now();
    for k in 0..total {
        let due = started + Duration::from_secs_f64(k as f64 / f64::from(rate));
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        let path = export.join(Target::of_op(k).rel_path());
        content(k, &mut bytes);
        let mut file =
            File::create(&path).with_context(|| format!("could not create {}", path.display()))?;
        file.write_all(&bytes)
            .with_context(|| format!("could not write {}", path.display()))?;
        drop(file);
        closes.push(Instant::now());
        if k % 256 == 0 {
            exec::bail_if_interrupted()?;
        }
    }
    Ok(Written { closes, started })
}

/// The observer read op `op`'s content from `target` at `at`.
#[derive(Clone, Copy, Debug)]
pub struct Observation {
    pub target: Target,
    pub op: u64,
    pub at: Instant,
}

/// Each op's lag: the first time its file was seen holding it or a later op, minus its close
/// time; None for an op never seen arrive. An arrival before the close (a tool may replicate
/// a write before the writer closes) counts as no lag.
pub fn lags(closes: &[Instant], observations: &[Observation]) -> Vec<Option<Duration>> {
    // Per file, the observations that raised the highest op seen so far, in time order: both
    // times and ops then increase along each list.
    let mut sorted: Vec<&Observation> = observations.iter().collect();
    sorted.sort_by_key(|obs| obs.at);
    let mut per_target: HashMap<Target, Vec<(u64, Instant)>> = HashMap::new();
    for obs in sorted {
        let seen = per_target.entry(obs.target).or_default();
        if seen.last().is_none_or(|&(op, _)| obs.op > op) {
            seen.push((obs.op, obs.at));
        }
    }
    closes
        .iter()
        .enumerate()
        .map(|(k, close)| {
            let k = k as u64;
            let seen = per_target.get(&Target::of_op(k))?;
            let first = seen.partition_point(|&(op, _)| op < k);
            seen.get(first)
                .map(|&(_, at)| at.saturating_duration_since(*close))
        })
        .collect()
}

/// The lag statistics of one run.
#[derive(Clone, Copy, Debug, Default)]
pub struct LagStats {
    pub ops: usize,
    /// Ops never seen arrive.
    pub lost: usize,
    /// Nearest-rank percentiles over every op; None when the percentile falls on a lost op.
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    /// The largest lag of a delivered op.
    pub max: Option<Duration>,
}

pub fn stats(lags: &[Option<Duration>]) -> LagStats {
    let mut sorted = lags.to_vec();
    // Lost ops sort last, as if infinitely late.
    sorted.sort_by_key(|lag| (lag.is_none(), *lag));
    LagStats {
        ops: lags.len(),
        lost: lags.iter().filter(|lag| lag.is_none()).count(),
        p50: percentile(&sorted, 0.50).flatten(),
        p99: percentile(&sorted, 0.99).flatten(),
        max: lags.iter().flatten().max().copied(),
    }
}

/// Nearest-rank percentile of sorted values: the smallest value with at least `p` of all
/// values at or below it. None for no values.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fourth_op_creates_a_file_and_the_others_overwrite_working_files() {
        assert_eq!(Target::of_op(0), Target::New(0));
        assert_eq!(Target::of_op(8), Target::New(8));
        let working: Vec<Target> = (1..4).map(Target::of_op).collect();
        assert!(working
            .iter()
            .all(|t| matches!(t, Target::Working(i) if *i < WORKING_FILES)));
    }

    #[test]
    fn target_names_round_trip_and_temporary_names_are_refused() {
        for target in [Target::Working(0), Target::Working(999), Target::New(12345)] {
            let path = target.rel_path();
            let name = path.file_name().unwrap().to_str().unwrap();
            assert_eq!(
                Target::parse(target.dir_index(), name.as_bytes()),
                Some(target)
            );
        }
        assert_eq!(Target::parse(3, b"w3"), Some(Target::Working(3)));
        assert_eq!(Target::parse(4, b"w3"), None, "w3 lives in d3");
        assert_eq!(
            Target::parse(3, b".w3.Xa1b2c"),
            None,
            "rsync's temporary name"
        );
        assert_eq!(Target::parse(3, b".imezzo-tmp.w3"), None);
        assert_eq!(Target::parse(0, b"w1000"), None, "beyond the working set");
        assert_eq!(Target::parse(0, b"n"), None);
        assert_eq!(Target::parse(1, b"w01"), None, "not how we name w1");
        assert_eq!(Target::parse(0, b"n0"), Some(Target::New(0)));
    }

    #[test]
    fn content_names_its_op_and_partial_content_names_none() {
        let mut bytes = [0; CONTENT_LEN];
        content(42, &mut bytes);
        assert_eq!(parse_content(&bytes), Some(42));
        assert_eq!(parse_content(&bytes[..512]), None);
        assert_eq!(parse_content(&[]), None);
        let mut torn = bytes;
        torn[600] = 0;
        assert_eq!(parse_content(&torn), None);
        assert_eq!(parse_content(b"not written yet\n"), None);
    }

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    /// Two ops on one working file and the ops between them on other files.
    fn ops_on_one_file() -> (u64, u64) {
        let first = (1..)
            .find(|&k| matches!(Target::of_op(k), Target::Working(_)))
            .unwrap();
        let second = (first + 1..)
            .find(|&k| Target::of_op(k) == Target::of_op(first))
            .unwrap();
        (first, second)
    }

    #[test]
    fn a_superseded_write_arrives_with_the_write_that_supersedes_it() {
        let base = Instant::now();
        let (first, second) = ops_on_one_file();
        let closes: Vec<Instant> = (0..=second).map(|k| at(base, k)).collect();
        // Only the second write is ever seen on the file, 50 ms after it closed.
        let seen = Observation {
            target: Target::of_op(second),
            op: second,
            at: at(base, second + 50),
        };
        let lags = lags(&closes, &[seen]);
        assert_eq!(lags[second as usize], Some(Duration::from_millis(50)));
        assert_eq!(
            lags[first as usize],
            Some(Duration::from_millis(second + 50 - first))
        );
        assert_eq!(lags[0], None, "op 0 wrote another file, never seen");
    }

    #[test]
    fn an_earlier_write_seen_does_not_deliver_a_later_one() {
        let base = Instant::now();
        let (first, second) = ops_on_one_file();
        let closes: Vec<Instant> = (0..=second).map(|k| at(base, k)).collect();
        let seen = Observation {
            target: Target::of_op(first),
            op: first,
            at: at(base, second + 5),
        };
        let lags = lags(&closes, &[seen]);
        assert_eq!(
            lags[first as usize],
            Some(Duration::from_millis(second + 5 - first))
        );
        assert_eq!(lags[second as usize], None);
    }

    #[test]
    fn arrival_is_the_first_sight_even_when_observations_come_unordered() {
        let base = Instant::now();
        let closes = vec![at(base, 0)];
        let target = Target::of_op(0);
        let late = Observation {
            target,
            op: 0,
            at: at(base, 30),
        };
        let early = Observation {
            target,
            op: 0,
            at: at(base, 10),
        };
        assert_eq!(
            lags(&closes, &[late, early]),
            vec![Some(Duration::from_millis(10))]
        );
    }

    #[test]
    fn an_arrival_before_the_close_is_no_lag() {
        let base = Instant::now();
        let closes = vec![at(base, 10)];
        let seen = Observation {
            target: Target::of_op(0),
            op: 0,
            at: at(base, 5),
        };
        assert_eq!(lags(&closes, &[seen]), vec![Some(Duration::ZERO)]);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.50), Some(50));
        assert_eq!(percentile(&values, 0.99), Some(99));
        assert_eq!(percentile(&values, 1.0), Some(100));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile::<u32>(&[], 0.5), None);
    }

    #[test]
    fn lost_ops_count_as_infinitely_late_in_percentiles() {
        let ms = |m| Some(Duration::from_millis(m));
        let mut lags: Vec<Option<Duration>> = (1..=98).map(ms).collect();
        lags.extend([None, None]);
        let stats = stats(&lags);
        assert_eq!(stats.ops, 100);
        assert_eq!(stats.lost, 2);
        assert_eq!(stats.p50, ms(50));
        assert_eq!(stats.p99, None, "the 99th value is a lost op");
        assert_eq!(stats.max, ms(98), "the largest lag of a delivered op");

        let stats = super::stats(&[ms(3), ms(1), ms(2)]);
        assert_eq!((stats.p50, stats.p99, stats.max), (ms(2), ms(3), ms(3)));
    }
}
