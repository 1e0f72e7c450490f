//! `imezzo verify DIR_A DIR_B`.

use std::{
    io::{self, BufWriter, Write},
    path::PathBuf,
    process::ExitCode,
};

use clap::Args;
use imezzo_agent::verify::{self, VerifyOptions};

/// Compare two directory trees and print every difference, one a line.
///
/// Compared at every path and at the roots: presence, type, content byte for byte, size,
/// permission bits (setuid, setgid, sticky), uid and gid, mtime to the nanosecond,
/// symlink targets, device numbers, extended attributes and hard-link groups. Not
/// compared: atime, ctime, directory sizes, sparseness. Symlinks are never followed.
///
/// Lines read `only in A: PATH`, `type: PATH: file != symlink` or
/// `differs: PATH: WHAT A != B`, sorted by path; a summary line ends the output.
///
/// Exit status: 0 when the trees are identical, 1 when they differ, 2 when they cannot be
/// compared (a directory missing or unreadable).
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The first tree, "A" in the output.
    pub dir_a: PathBuf,
    /// The second tree, "B" in the output.
    pub dir_b: PathBuf,
    /// Do not compare the mtime of directories (the roots included).
    #[arg(long)]
    pub ignore_dir_mtimes: bool,
}

/// Runs the comparison and prints it. Returns the exit status itself rather than an error
/// for `main` to print: verify follows cmp(1) and diff(1), where 1 means "they differ" and
/// trouble is 2, so its errors cannot take the binary's usual exit status 1.
pub fn run(args: VerifyArgs) -> ExitCode {
    let opts = VerifyOptions { compare_mtime_of_dirs: !args.ignore_dir_mtimes };
    let comparison = match verify::compare_trees(&args.dir_a, &args.dir_b, &opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imezzo: error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut out = BufWriter::new(io::stdout().lock());
    // A closed stdout (`| head`) stops the listing but not the verdict: the exit status
    // still says whether the trees differ.
    let mut printed = comparison.differences.iter().try_for_each(|d| writeln!(out, "{d}"));
    if printed.is_ok() {
        printed = match comparison.differences.len() {
            0 => writeln!(out, "imezzo verify: identical ({} entries)", comparison.entries),
            1 => writeln!(out, "imezzo verify: 1 difference"),
            n => writeln!(out, "imezzo verify: {n} differences"),
        };
    }
    let _ = printed.and_then(|()| out.flush());
    if comparison.differences.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
