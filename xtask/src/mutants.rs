//! `cargo run -p xtask -- mutants`: shows that the checks of the lock-free protocols still catch
//! the bugs they were shown to catch.
//!
//! Each [`Mutation`] names a file, one exact piece of code in it (which must occur exactly once:
//! a mutation that no longer applies is an error, so the list follows the code) and what to put
//! there instead, and the check that must fail once it is applied: the loom models (all of them,
//! or the named models, each of which must fail), or a test that races real threads and
//! processes. The work happens in a scratch copy of the workspace
//! (`target/mutants/work`, with its own target directories so that the incremental builds of
//! one mutation after another stay cheap); the checkout is never touched.
//!
//! A mutation survives if its check passes; then the task prints the table and exits 1.
//! Race-based checks are probabilistic: such a check is run up to three times and counts as
//! failing if any run fails.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::Result;

/// The check a mutation must make fail.
#[derive(Clone, Copy)]
enum Check {
    /// Every loom model (`--cfg flowipc_loom`, `LOOM_MAX_PREEMPTIONS=3`).
    Loom,
    /// These loom models (names as in `loom-tests`, without the module), run alone: each of them
    /// must fail.
    LoomModels(&'static [&'static str]),
    /// One test target of the crate (`cargo test --release <args>`), run up to three times.
    Race(&'static [&'static str]),
}

struct Mutation {
    name: &'static str,
    file: &'static str,
    /// Pieces of code and what replaces each (every piece must occur exactly once).
    edits: &'static [(&'static str, &'static str)],
    check: Check,
}

const STRESS: Check = Check::Race(&["--test", "shm_stress"]);

/// The environment of a loom run.
const LOOM_ENV: &[(&str, &str)] = &[
    ("RUSTFLAGS", "--cfg flowipc_loom"),
    ("CARGO_TARGET_DIR", "../loom-target"),
    ("LOOM_MAX_PREEMPTIONS", "3"),
];

/// The mutations, most important first.
const MUTATIONS: &[Mutation] = &[
    Mutation {
        name: "free-list push CAS Release -> Relaxed",
        file: "src/shm/lockfree.rs",
        edits: &[("pack(first, next_tag(cur)),\n            Ordering::Release,", "pack(first, next_tag(cur)),\n            Ordering::Relaxed,")],
        check: Check::Loom,
    },
    Mutation {
        name: "free-list pop head load Acquire -> Relaxed",
        file: "src/shm/lockfree.rs",
        edits: &[("let mut cur = head.load(Ordering::Acquire);", "let mut cur = head.load(Ordering::Relaxed);")],
        check: Check::Loom,
    },
    Mutation {
        name: "free-list pop CAS Acquire -> Relaxed",
        file: "src/shm/lockfree.rs",
        edits: &[("pack(next, next_tag(cur)),\n            Ordering::Acquire,\n            Ordering::Acquire,", "pack(next, next_tag(cur)),\n            Ordering::Relaxed,\n            Ordering::Relaxed,")],
        check: Check::Loom,
    },
    Mutation {
        name: "ABA tag frozen",
        file: "src/shm/lockfree.rs",
        edits: &[("head_tag(head).wrapping_add(1)", "head_tag(head)")],
        check: Check::Loom,
    },
    Mutation {
        name: "reference count decrement Release -> Relaxed",
        file: "src/shm/lockfree.rs",
        edits: &[("word.fetch_sub(1, Ordering::Release)", "word.fetch_sub(1, Ordering::Relaxed)")],
        check: Check::Loom,
    },
    Mutation {
        name: "last release without its Acquire fence",
        file: "src/shm/lockfree.rs",
        edits: &[("    fence(Ordering::Acquire);\n", "")],
        check: Check::Loom,
    },
    Mutation {
        name: "ticket_take load and CAS Acquire -> Relaxed",
        file: "src/shm/lockfree.rs",
        edits: &[
            (
                "let mut cur = word.load(Ordering::Acquire);",
                "let mut cur = word.load(Ordering::Relaxed);",
            ),
            ("cur - TICKET_ONE,\n            Ordering::Acquire,\n            Ordering::Acquire,", "cur - TICKET_ONE,\n            Ordering::Relaxed,\n            Ordering::Relaxed,",
            ),
        ],
        check: Check::Loom,
    },
    Mutation {
        name: "ticket_issue Release -> Relaxed",
        file: "src/shm/lockfree.rs",
        edits: &[("fetch_add(TICKET_ONE | 1, Ordering::Release)", "fetch_add(TICKET_ONE | 1, Ordering::Relaxed)")],
        check: Check::Loom,
    },
    Mutation {
        name: "is_sole load Acquire -> Relaxed",
        file: "src/shm/lockfree.rs",
        edits: &[(
            "let w = word.load(Ordering::Acquire);\n    refs(w) == 1",
            "let w = word.load(Ordering::Relaxed);\n    refs(w) == 1",
        )],
        check: Check::Loom,
    },
    Mutation {
        name: "bump-pointer CAS -> load and store",
        file: "src/shm/space.rs",
        edits: &[("match bump.compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed) {", "match { bump.store(end, Ordering::Relaxed); Ok::<u64, u64>(cur) } {")],
        check: STRESS,
    },
    Mutation {
        name: "free_extent double-free CAS -> store",
        file: "src/shm/space.rs",
        edits: &[("info_w\n        .compare_exchange(old, new, Ordering::Relaxed, Ordering::Relaxed)\n", "Ok::<u64, u64>(info_w.swap(new, Ordering::Relaxed))\n")],
        check: Check::Race(&["--lib", "racing_double_frees"]),
    },
    Mutation {
        name: "thread-cache slot claim without its lock and CAS",
        file: "src/shm/slot.rs",
        edits: &[("if !locks.try_lock(i) {\n        return None;\n    }", "let _ = locks.try_lock(i);\n    slot.owner.store(token, Ordering::Release);\n    if true {\n        return Some(owner);\n    }")],
        // Was `STRESS`, which caught it by timing alone (every run on the code before the slot
        // protocol moved to `slot.rs`, no run after): the loom models catch it every time.
        check: Check::Loom,
    },
    Mutation {
        name: "thread-cache slot claim without its lock (CAS kept)",
        file: "src/shm/slot.rs",
        edits: &[("if !locks.try_lock(i) {\n        return None;\n    }", "let _ = locks.try_lock(i);")],
        check: Check::Loom,
    },
    Mutation {
        name: "slot release unlocks before clearing the owner",
        file: "src/shm/slot.rs",
        edits: &[("slot.owner.store(0, Ordering::Release);\n    locks.unlock(i);", "locks.unlock(i);\n    slot.owner.store(0, Ordering::Release);")],
        check: Check::Loom,
    },
    Mutation {
        name: "reclaim drains one block per dead list",
        file: "src/shm/slot.rs",
        edits: &[("counts.map_or(pool.list_cap(c), |k| k[c])", "counts.map_or(1, |k| k[c])")],
        check: Check::Loom,
    },
    Mutation {
        name: "freed extent listed before its trim",
        file: "src/shm/space.rs",
        edits: &[(
            "    if trim(pages) {\n        // Still ours (not yet pushed): record that it is clean now.\n        info_w.store(new | FLAG_CLEAN, Ordering::Relaxed);\n    }\n    push(s, s.bucket(bucket_of(pages)), off);",
            "    push(s, s.bucket(bucket_of(pages)), off);\n    if trim(pages) {\n        info_w.store(new | FLAG_CLEAN, Ordering::Relaxed);\n    }",
        )],
        check: Check::Loom,
    },
    Mutation {
        name: "span chain pushed before its headers are written",
        file: "src/shm/space.rs",
        edits: &[
            ("    let n = carve_span(s, span, c, pages, size, clean, |i| {", "    let n = pages * PAGE / size;\n    if n > 1 {\n        push_chain(s, s.class_head(c), span + size, span + (n - 1) * size);\n    }\n    carve_span(s, span, c, pages, size, clean, |i| {"),
            ("    if n > 1 {\n        push_chain(s, s.class_head(c), span + size, span + (n - 1) * size);\n    }\n    Ok(span)", "    Ok(span)"),
        ],
        check: Check::Loom,
    },
    Mutation {
        name: "recycled span restarts block 0's generation",
        file: "src/shm/space.rs",
        edits: &[("let generation = if i == 0 { gen0 } else { 0 };", "let generation = if i == 0 { 0 } else { 0 };")],
        check: Check::Loom,
    },
    Mutation {
        name: "message release: count checked, then decremented",
        file: "src/shm/protocols.rs",
        edits: &[("    if !rc_release(mem.word(off + LINK)) {\n        return Released::Held;", "    let w = mem.word(off + LINK);\n    let last = super::lockfree::refs(w.load(Ordering::Acquire)) == 1;\n    w.fetch_sub(1, Ordering::AcqRel);\n    if !last {\n        return Released::Held;")],
        check: Check::Loom,
    },
    Mutation {
        name: "dissolve_if_sole: count read Relaxed",
        file: "src/shm/protocols.rs",
        edits: &[("    if !is_sole(mem.word(off + LINK)) {\n        return false;\n    }\n    if solo {", "    if super::lockfree::refs(mem.word(off + LINK).load(Ordering::Relaxed)) != 1 {\n        return false;\n    }\n    if solo {")],
        check: Check::Loom,
    },
    Mutation {
        name: "republication in place keeps the generation",
        file: "src/shm/protocols.rs",
        edits: &[("let generation = info_generation(old).wrapping_add(1);", "let generation = info_generation(old);")],
        check: Check::Loom,
    },
    Mutation {
        name: "validated-start cache store Release -> Relaxed",
        file: "src/shm/protocols.rs",
        edits: &[("slot.store((off >> 4) | (class + 1) << 32, Ordering::Release);", "slot.store((off >> 4) | (class + 1) << 32, Ordering::Relaxed);")],
        check: Check::Loom,
    },
    Mutation {
        name: "span page-map publication Release -> Relaxed",
        file: "src/shm/space.rs",
        edits: &[("page_entry(i).store(pm_small(c as u64, i), Ordering::Release);", "page_entry(i).store(pm_small(c as u64, i), Ordering::Relaxed);")],
        check: Check::Loom,
    },
    Mutation {
        name: "adoption of the wrong type keeps the ticket",
        file: "src/shm/protocols.rs",
        edits: &[("            ticket_return(link);\n", "")],
        check: Check::Loom,
    },
    Mutation {
        name: "adoption reads the type tag before the ticket",
        file: "src/shm/protocols.rs",
        edits: &[
            ("    let link = mem.word(off + LINK);\n    if !ticket_take(link, generation) {", "    let link = mem.word(off + LINK);\n    let early = mem.word(off + BLOCK_HDR + TAG_AT).load(Ordering::Relaxed);\n    if !ticket_take(link, generation) {"),
            ("        let found = mem.word(off + BLOCK_HDR + TAG_AT).load(Ordering::Relaxed);\n", "        let found = early;\n"),
        ],
        check: Check::Loom,
    },
    Mutation {
        name: "pool slot publication CAS Release -> Relaxed",
        file: "src/shm/publish.rs",
        edits: &[("            ptr,\n            Ordering::Release,\n            Ordering::Relaxed,", "            ptr,\n            Ordering::Relaxed,\n            Ordering::Relaxed,")],
        check: Check::Loom,
    },
    Mutation {
        name: "pool counted and bounded after its slot (as before)",
        file: "src/shm/publish.rs",
        edits: &[
            ("        self.count.fetch_add(1, Ordering::AcqRel);\n        self.known.fetch_max(id + 1, Ordering::AcqRel);\n        let ptr", "        let ptr"),
            ("            Ok(_) => Ok(()),", "            Ok(_) => {\n                self.count.fetch_add(1, Ordering::AcqRel);\n                self.known.fetch_max(id + 1, Ordering::AcqRel);\n                Ok(())\n            }"),
            ("                self.count.fetch_sub(1, Ordering::AcqRel);\n", ""),
        ],
        check: Check::Loom,
    },
    Mutation {
        name: "ring push: tail store Release -> Relaxed",
        file: "src/shm/ring.rs",
        edits: &[("ctl.tail.store(at, Ordering::Release);", "ctl.tail.store(at, Ordering::Relaxed);")],
        check: Check::LoomModels(&["ring_spsc_publish_consume"]),
    },
    Mutation {
        name: "ring consumer: tail load Acquire -> Relaxed",
        file: "src/shm/ring.rs",
        edits: &[("let tail = ctl.tail.load(Ordering::Acquire);", "let tail = ctl.tail.load(Ordering::Relaxed);")],
        check: Check::LoomModels(&["ring_spsc_publish_consume"]),
    },
    Mutation {
        name: "ring pop: head store Release -> Relaxed",
        file: "src/shm/ring.rs",
        edits: &[("ctl.head.store(self.head, Ordering::Release);", "ctl.head.store(self.head, Ordering::Relaxed);")],
        check: Check::LoomModels(&["ring_spsc_publish_consume", "ring_space_bell_no_lost_wakeup"]),
    },
    Mutation {
        name: "ring producer: head load Acquire -> Relaxed",
        file: "src/shm/ring.rs",
        edits: &[("let head = ctl.head.load(Ordering::Acquire);", "let head = ctl.head.load(Ordering::Relaxed);")],
        check: Check::LoomModels(&["ring_spsc_publish_consume", "ring_space_bell_no_lost_wakeup"]),
    },
    Mutation {
        name: "ring waker without its fence",
        file: "src/shm/ring.rs",
        edits: &[("fn ring_if_asleep(bell: &AtomicU32) -> u32 {\n    fence(Ordering::SeqCst);\n", "fn ring_if_asleep(bell: &AtomicU32) -> u32 {\n")],
        check: Check::LoomModels(&["ring_data_bell_no_lost_wakeup", "ring_space_bell_no_lost_wakeup", "ring_disarm_accounts_for_wakes"]),
    },
    Mutation {
        name: "ring sleeper's arm without its fence",
        file: "src/shm/ring.rs",
        edits: &[("    bell.swap(mode, Ordering::Relaxed);\n    fence(Ordering::SeqCst);\n", "    bell.swap(mode, Ordering::Relaxed);\n")],
        check: Check::LoomModels(&["ring_data_bell_no_lost_wakeup", "ring_space_bell_no_lost_wakeup", "ring_disarm_accounts_for_wakes"]),
    },
    Mutation {
        name: "ring push: data bell looked at before the tail store",
        file: "src/shm/ring.rs",
        edits: &[("        ctl.tail.store(at, Ordering::Release);\n        Ok((taken, ring_if_asleep(ctl.data_bell)))", "        let mode = ring_if_asleep(ctl.data_bell);\n        ctl.tail.store(at, Ordering::Release);\n        Ok((taken, mode))")],
        check: Check::LoomModels(&["ring_data_bell_no_lost_wakeup", "ring_disarm_accounts_for_wakes"]),
    },
    Mutation {
        name: "ring pop: space bell looked at before the head store",
        file: "src/shm/ring.rs",
        edits: &[("        ctl.head.store(self.head, Ordering::Release);\n        Ok((n, ring_if_asleep(ctl.space_bell)))", "        let mode = ring_if_asleep(ctl.space_bell);\n        ctl.head.store(self.head, Ordering::Release);\n        Ok((n, mode))")],
        check: Check::LoomModels(&["ring_space_bell_no_lost_wakeup"]),
    },
    Mutation {
        name: "ring waker takes the bell with a load and a store",
        file: "src/shm/ring.rs",
        edits: &[("        return AWAKE;\n    }\n    bell.swap(AWAKE, Ordering::AcqRel)\n", "        return AWAKE;\n    }\n    let mode = bell.load(Ordering::Relaxed);\n    bell.store(AWAKE, Ordering::Relaxed);\n    mode\n")],
        check: Check::LoomModels(&["ring_disarm_accounts_for_wakes"]),
    },
    Mutation {
        name: "ring disarm with a load and a store",
        file: "src/shm/ring.rs",
        edits: &[("pub fn disarm(bell: &AtomicU32) -> u32 {\n    bell.swap(AWAKE, Ordering::AcqRel)\n", "pub fn disarm(bell: &AtomicU32) -> u32 {\n    let mode = bell.load(Ordering::Acquire);\n    bell.store(AWAKE, Ordering::Release);\n    mode\n")],
        check: Check::LoomModels(&["ring_disarm_accounts_for_wakes"]),
    },
    Mutation {
        name: "pool bytes claimed by load-then-store",
        file: "src/shm/publish.rs",
        edits: &[("match total.compare_exchange_weak(cur, cur + n, Ordering::Relaxed, Ordering::Relaxed) {", "match { total.store(cur + n, Ordering::Relaxed); Ok::<u64, u64>(cur) } {")],
        check: Check::LoomModels(&["concurrent_growth_stays_under_the_byte_limit"]),
    },
    Mutation {
        name: "settlement takes a lend by check-then-subtract",
        file: "src/shm/protocols.rs",
        edits: &[("    while taken < lent && ticket_take(link, generation) {\n        taken += 1;\n    }", "    while taken < lent && tickets(link.load(Ordering::Acquire)) > 0 {\n        link.fetch_sub(1 << 32, Ordering::AcqRel);\n        taken += 1;\n    }")],
        check: Check::Loom,
    },
];

/// Runs every mutation; `Ok(false)` if any survived.
/// The mutations `--ci` runs: one or two per protocol, the ones whose checks are fastest and
/// most telling. The others are only checked to apply (so the list keeps following the code).
const CI: &[&str] = &[
    "free-list push CAS Release -> Relaxed",
    "ABA tag frozen",
    "reference count decrement Release -> Relaxed",
    "ticket_issue Release -> Relaxed",
    "is_sole load Acquire -> Relaxed",
    "free_extent double-free CAS -> store",
    "thread-cache slot claim without its lock (CAS kept)",
    "reclaim drains one block per dead list",
    "span chain pushed before its headers are written",
    "message release: count checked, then decremented",
    "adoption reads the type tag before the ticket",
    "pool counted and bounded after its slot (as before)",
    "ring push: tail store Release -> Relaxed",
    "ring waker without its fence",
    "settlement takes a lend by check-then-subtract",
];

pub fn run(root: &Path, ci: bool) -> Result<bool> {
    if let Some(name) = CI.iter().find(|n| !MUTATIONS.iter().any(|m| m.name == **n)) {
        return Err(format!("the CI list names `{name}`, which is not a listed mutation").into());
    }
    let work = root.join("target/mutants/work");
    copy_workspace(root, &work)?;
    let mut survived = 0;
    let mut table = Vec::new();
    for m in MUTATIONS {
        let path = work.join(m.file);
        let original = fs::read_to_string(root.join(m.file))?;
        let mut mutated = original.clone();
        for (from, to) in m.edits {
            if mutated.matches(from).count() != 1 {
                return Err(format!(
                    "mutation `{}` does not apply: `{from}` is not in {} exactly once",
                    m.name, m.file
                )
                .into());
            }
            mutated = mutated.replacen(from, to, 1);
        }
        if ci && !CI.contains(&m.name) {
            table.push(format!("{:<50} applies (not run with --ci)", m.name));
            continue;
        }
        fs::write(&path, mutated)?;
        let started = Instant::now();
        let outcome = check(&work, m.check);
        fs::write(&path, &original)?;
        let caught = outcome?;
        let verdict = match &caught {
            Some(by) => format!("caught by {by}"),
            None => {
                survived += 1;
                "SURVIVED".to_string()
            }
        };
        let line = format!(
            "{:<50} {verdict} ({:.0} s)",
            m.name,
            started.elapsed().as_secs_f64()
        );
        println!("{line}");
        table.push(line);
    }
    println!("\nmutation -> what caught it");
    for line in &table {
        println!("  {line}");
    }
    Ok(survived == 0)
}

/// Runs `check` in the scratch copy: `Some(what failed)` if it failed, `None` if it passed.
fn check(work: &Path, check: Check) -> Result<Option<String>> {
    match check {
        Check::Loom => {
            let out = cargo(work, &["test", "--release", "--test", "loom"], LOOM_ENV)?;
            Ok(out.failed.then(|| {
                let models = failed_models(&out.stdout);
                if models.is_empty() {
                    "the loom build or run".to_string()
                } else {
                    format!("loom {}", models.join(", "))
                }
            }))
        }
        Check::LoomModels(models) => {
            let mut args = vec!["test", "--release", "--test", "loom", "--"];
            args.extend_from_slice(models);
            let out = cargo(work, &args, LOOM_ENV)?;
            let failed = failed_models(&out.stdout);
            let passed: Vec<&str> = models
                .iter()
                .copied()
                .filter(|m| !failed.iter().any(|f| f.rsplit("::").next() == Some(*m)))
                .collect();
            if !passed.is_empty() {
                println!("  (these models passed: {})", passed.join(", "));
                return Ok(None);
            }
            Ok(Some(format!("loom {}", failed.join(", "))))
        }
        Check::Race(args) => {
            let mut cmd = vec!["test", "--release"];
            cmd.extend_from_slice(args);
            for _ in 0..3 {
                let out = cargo(work, &cmd, &[("CARGO_TARGET_DIR", "../test-target")])?;
                if out.failed {
                    return Ok(Some(args.join(" ")));
                }
            }
            Ok(None)
        }
    }
}

/// The models a loom run reports as failed.
fn failed_models(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... FAILED"))
        .collect()
}

struct Outcome {
    failed: bool,
    stdout: String,
}

/// Runs cargo in `dir`; a run that takes over 10 minutes (a hang) is killed and counts as failed.
fn cargo(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Outcome> {
    let out_path = dir.join("../cargo.out");
    let out_file = fs::File::create(&out_path)?;
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out_file)
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let failed = loop {
        if let Some(status) = child.try_wait()? {
            break !status.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break true;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok(Outcome {
        failed,
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
    })
}

/// Copies what the crate builds from into `to` (replacing what was there).
fn copy_workspace(root: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        fs::remove_dir_all(to)?;
    }
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        if matches!(name.to_str(), Some("target" | ".git")) {
            continue;
        }
        copy_tree(&entry.path(), &to.join(&name))?;
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        fs::create_dir_all(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else {
        fs::copy(from, to)?;
    }
    Ok(())
}
