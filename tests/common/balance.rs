//! Resource balance: what a process holds (open fds, mappings of pool memfds) and what arenas
//! hold (blocks in use), counted before and after some work, so that a leak of any of them
//! fails a test on an ordinary run (not only under LeakSanitizer).
//!
//! Fds and mappings are process-wide, and the test harness runs tests on parallel threads: a
//! count taken beside other tests measures them too. [`isolated`] therefore runs a test's body in
//! a process of its own (this test binary re-executed for that one test), where the counts are
//! the body's alone.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flowipc::shm::Arena;

const ISOLATED_ENV: &str = "FLOWIPC_TEST_ISOLATED";

/// What this process and the given arenas hold at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// Open file descriptors.
    pub fds: usize,
    /// Mappings of flowipc pool memfds.
    pub pool_maps: usize,
    /// `blocks_in_use` of each arena passed to [`Held::now`], in order.
    pub blocks: Vec<u64>,
}

impl Held {
    /// Counts now (the arenas' counts are exact when none of them is being used concurrently).
    pub fn now(arenas: &[&Arena]) -> Held {
        start_library_thread();
        Held {
            fds: open_fds(),
            pool_maps: pool_mappings().len(),
            blocks: arenas.iter().map(|a| a.stats().blocks_in_use).collect(),
        }
    }

    /// Waits (up to 10 s: library threads may still be closing what they held) until the counts
    /// are back at `self`, and panics with what differs if they are not.
    pub fn assert_back(&self, arenas: &[&Arena], what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = Held::now(arenas);
            if now == *self {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what}: resources not given back: before {self:?}, after {now:?}\n\
                     pool mappings now: {:#?}\nfds now: {:#?}",
                    pool_mappings(),
                    fd_targets()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Runs `round` once to warm up (lazily made per-process state: thread caches, lock files, the
/// fork handler), then `rounds` more times, and asserts that fds, pool mappings and the
/// arenas' blocks are where they were after the warm-up. Meaningful for fds and mappings only in
/// an [`isolated`] process.
pub fn balanced(rounds: usize, arenas: &[&Arena], mut round: impl FnMut(usize)) {
    round(0);
    let before = Held::now(arenas);
    for i in 1..=rounds {
        round(i);
    }
    before.assert_back(arenas, &format!("{rounds} rounds"));
}

/// Runs `body` in a process of its own: this test binary re-executed to run only `test` (the
/// calling test's name, as the harness knows it), so that process-wide counts measure `body`
/// alone. In the parent, waits for that process and asserts it ran the test and passed, and
/// passes on what the body printed (seen with `--nocapture`). Ignored tests run isolated too.
pub fn isolated(test: &str, body: impl FnOnce()) {
    if std::env::var(ISOLATED_ENV).as_deref() == Ok(test) {
        body();
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            test,
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ISOLATED_ENV, test)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // (The harness's own lines left out; its "test <name> ... " may start the body's first.)
    for line in stdout.lines() {
        let line = match line.strip_prefix("test ") {
            Some(rest) => rest.split_once(" ... ").map_or("", |(_, after)| after),
            None => line,
        };
        let harness = line.starts_with("running ") || line.starts_with("test result:");
        if !line.is_empty() && !harness && line != "ok" {
            println!("{line}");
        }
    }
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "isolated run of {test} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

/// A field of `/proc/self/status` in KiB (`"VmRSS:"`, `"RssAnon:"`, `"RssShmem:"`...); 0 if
/// absent.
pub fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Threads of this process.
pub fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Open fds of this process (the directory handle used to list them not counted).
pub fn open_fds() -> usize {
    fd_targets().len()
}

pub fn fd_targets() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    // The listing's own fd is among them, alike in every count.
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .collect()
}

/// Lines of `/proc/self/maps` that map a flowipc pool.
pub fn pool_mappings() -> Vec<String> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("memfd:flowipc"))
        .map(str::to_owned)
        .collect()
}

/// Starts the process's library thread (it lives with the process, holding its wake-up
/// sockets), so that its first start does not count as something a test failed to give back.
pub fn start_library_thread() {
    use flowipc::transport::{AsyncChannel, Channel, ChannelConfig};
    let (a, _b) = Channel::pair(ChannelConfig::new()).unwrap();
    drop(AsyncChannel::start(a, |_| {}, |_| {}).unwrap());
}
