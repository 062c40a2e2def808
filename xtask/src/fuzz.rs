//! `cargo run -p xtask -- fuzz ...`: builds and runs the fuzz targets of `fuzz/` (cargo-fuzz's
//! layout, libFuzzer from the `libfuzzer-sys` crate) with the stable toolchain: no nightly, no
//! cargo-fuzz. `RUSTC_BOOTSTRAP=1` lets stable take the `-Z` flags, and the flags are the ones
//! cargo-fuzz passes (sanitizer coverage for libFuzzer's feedback, AddressSanitizer, debug
//! assertions and overflow checks, `--cfg fuzzing`), for the host target only (build scripts and
//! proc macros stay uninstrumented).
//!
//! * `fuzz build`: builds every target into `target/fuzz`.
//! * `fuzz seeds`: writes each target's seed corpus into `fuzz/corpus/<target>/` (valid inputs
//!   the library's own encoders make; any target binary writes them all, see
//!   `flowipc_fuzz::init`).
//! * `fuzz run <target> [libFuzzer args]`: builds, writes the seeds, and fuzzes `<target>` on
//!   its corpus (new inputs go there) and its committed regressions (`fuzz/regressions/<target>/`),
//!   crashes into `fuzz/artifacts/<target>/`. Pass e.g. `-runs=10000000` or `-max_total_time=60`.
//! * `fuzz ci [--secs N]`: what `.ci/run` runs: builds, writes the seeds, replays every
//!   committed regression input, then fuzzes each target for N seconds (default 15); fails on
//!   any crash, leak, timeout or out-of-memory.
//!
//! Every subcommand takes `--no-asan`: the same without AddressSanitizer (into
//! `target/fuzz-nosan`), about twice as fast; the long runs use it.
//!
//! Each run gets its own scratch directory (`FLOWIPC_FUZZ_DIR`, for the session targets' run
//! dirs), removed afterwards.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Result;

/// Every target, in the order `fuzz ci` runs them.
pub const TARGETS: [&str; 8] = [
    "transport_frames",
    "transport_fds",
    "msg_frames",
    "shm_blobs",
    "shm_tables",
    "struc_dispatch",
    "login_server",
    "login_client",
];

/// The host target: the sanitizer needs one given explicitly.
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// cargo-fuzz's flags (its defaults: sancov with 8-bit counters, PC table and compare tracing),
/// plus debug assertions and overflow checks; [`ASAN`] is added unless `--no-asan`.
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks -Cforce-frame-pointers=yes";

/// AddressSanitizer (cargo-fuzz's default sanitizer).
const ASAN: &str = " -Zsanitizer=address";

/// AddressSanitizer's options unless the caller sets `ASAN_OPTIONS`: a small quarantine and no
/// fake stacks (each target makes channels, whose 64 KiB receive buffers would otherwise come
/// from fresh pages at every input: the default options cost more than half the speed).
const ASAN_OPTIONS: &str = "quarantine_size_mb=16:detect_stack_use_after_return=0";

/// libFuzzer options every run gets: a per-input time limit (a hang is a finding) and room for
/// the arenas' mappings.
const COMMON: [&str; 3] = ["-timeout=30", "-rss_limit_mb=4096", "-print_final_stats=1"];

/// The usage text of `fuzz`.
pub const USAGE: &str = "\
  fuzz build       build every fuzz target (stable toolchain, RUSTC_BOOTSTRAP=1; each fuzz
                   command takes --no-asan: without AddressSanitizer, into target/fuzz-nosan)
  fuzz seeds       write each target's seed corpus into fuzz/corpus/<target>/
  fuzz run <target> [libFuzzer args]
                   fuzz one target on its corpus and regressions
  fuzz ci [--secs N]
                   replay the regressions, then fuzz each target N s (default 15)";

struct Paths {
    root: PathBuf,
    /// Where the build goes (`target/fuzz`, or `target/fuzz-nosan` without the sanitizer).
    target_dir: PathBuf,
    bins: PathBuf,
    asan: bool,
}

impl Paths {
    fn new(root: &Path, asan: bool) -> Paths {
        let target_dir = root.join(if asan {
            "target/fuzz"
        } else {
            "target/fuzz-nosan"
        });
        Paths {
            root: root.to_owned(),
            bins: target_dir.join(TRIPLE).join("release"),
            target_dir,
            asan,
        }
    }

    fn corpus(&self, target: &str) -> PathBuf {
        self.root.join("fuzz/corpus").join(target)
    }

    fn regressions(&self, target: &str) -> PathBuf {
        self.root.join("fuzz/regressions").join(target)
    }
}

/// Runs `fuzz <args>`; `Ok(false)`: a target failed.
pub fn run(root: &Path, args: &[&str]) -> Result<bool> {
    // `--no-asan` (after the subcommand): without AddressSanitizer, about twice as fast (what
    // the long runs use: ASan sees nothing of the shared mappings the unsafe code reads, and
    // Rust's own checks stay on).
    let asan = !args.contains(&"--no-asan");
    let args: Vec<&str> = args.iter().copied().filter(|a| *a != "--no-asan").collect();
    let p = Paths::new(root, asan);
    match args.as_slice() {
        ["build"] => build(&p).map(|()| true),
        ["seeds"] => {
            build(&p)?;
            seeds(&p).map(|()| true)
        }
        ["run", target, extra @ ..] => {
            check_target(target)?;
            build(&p)?;
            seeds(&p)?;
            let mut a: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            a.push(p.corpus(target).display().to_string());
            let reg = p.regressions(target);
            if reg.is_dir() {
                a.push(reg.display().to_string());
            }
            fuzz(&p, target, &a)
        }
        ["ci"] | ["ci", "--secs", _] => {
            let secs: u64 = match args.get(2) {
                Some(s) => s.parse()?,
                None => 15,
            };
            build(&p)?;
            seeds(&p)?;
            ci(&p, secs)
        }
        _ => Err(format!("usage:\n{USAGE}").into()),
    }
}

fn check_target(target: &str) -> Result<()> {
    if TARGETS.contains(&target) {
        Ok(())
    } else {
        Err(format!("no fuzz target {target:?}; targets: {}", TARGETS.join(", ")).into())
    }
}

fn build(p: &Paths) -> Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--bins",
            "--target",
            TRIPLE,
            "--manifest-path",
        ])
        .arg(p.root.join("fuzz/Cargo.toml"))
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "RUSTFLAGS",
            format!("{RUSTFLAGS}{}", if p.asan { ASAN } else { "" }),
        )
        .env("CARGO_TARGET_DIR", &p.target_dir)
        .status()?;
    if !status.success() {
        return Err("building the fuzz targets failed".into());
    }
    Ok(())
}

/// Writes the seed corpora: any target binary does it for all (`flowipc_fuzz::init`).
fn seeds(p: &Paths) -> Result<()> {
    let status = Command::new(p.bins.join(TARGETS[0]))
        .env("FLOWIPC_FUZZ_WRITE_SEEDS", p.root.join("fuzz/corpus"))
        .env("ASAN_OPTIONS", "detect_leaks=0")
        .status()?;
    if !status.success() {
        return Err("writing the seed corpora failed".into());
    }
    Ok(())
}

/// Runs target `target` with libFuzzer arguments `args` (and the common ones) in a scratch
/// directory of its own; returns whether it exited cleanly.
fn fuzz(p: &Paths, target: &str, args: &[String]) -> Result<bool> {
    let scratch = p
        .root
        .join("target/fuzz-scratch")
        .join(format!("{target}-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let artifacts = p.root.join("fuzz/artifacts").join(target);
    std::fs::create_dir_all(&artifacts)?;
    std::fs::create_dir_all(p.corpus(target))?;
    let asan_options = std::env::var("ASAN_OPTIONS").unwrap_or_else(|_| ASAN_OPTIONS.into());
    let status = Command::new(p.bins.join(target))
        .args(COMMON)
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(args)
        .env("FLOWIPC_FUZZ_DIR", &scratch)
        .env("ASAN_OPTIONS", asan_options)
        .status();
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(status?.success())
}

/// Replays each target's regressions, then fuzzes it for `secs` seconds.
fn ci(p: &Paths, secs: u64) -> Result<bool> {
    let mut failed = Vec::new();
    for target in TARGETS {
        let reg = p.regressions(target);
        let mut inputs: Vec<String> = match std::fs::read_dir(&reg) {
            Ok(dir) => dir
                .filter_map(|e| e.ok())
                .map(|e| e.path().display().to_string())
                .collect(),
            Err(_) => Vec::new(),
        };
        inputs.sort();
        if !inputs.is_empty() {
            println!("== {target}: replaying {} regression inputs", inputs.len());
            if !fuzz(p, target, &inputs)? {
                failed.push(format!("{target} (a regression input)"));
                continue;
            }
        }
        println!("== {target}: fuzzing for {secs} s");
        let mut args = vec![format!("-max_total_time={secs}")];
        args.push(p.corpus(target).display().to_string());
        if reg.is_dir() {
            args.push(reg.display().to_string());
        }
        if !fuzz(p, target, &args)? {
            failed.push(target.to_string());
        }
    }
    if failed.is_empty() {
        println!("fuzz: {} targets, no crash", TARGETS.len());
        Ok(true)
    } else {
        println!("fuzz: failed: {}", failed.join(", "));
        Ok(false)
    }
}
