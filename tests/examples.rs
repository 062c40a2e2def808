//! The session tutorial's two programs (`examples/session_server.rs`, `session_client.rs`) run
//! as separate processes, as a user would run them.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>/examples/<name>` (cargo builds the examples before running tests).
fn example(name: &str) -> PathBuf {
    let me = std::env::current_exe().unwrap();
    let dir = me
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built (run the tests with plain `cargo test`)",
        p.display()
    );
    p
}

#[test]
fn the_session_tutorial_runs_as_two_programs() {
    let dir = PathBuf::from(format!("/tmp/fipc-ex{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    struct Gone(PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _gone = Gone(dir.clone());
    // The client first: it waits for the server (the page's retry loop).
    let client = Command::new(example("session_client"))
        .env("FLOWIPC_RUN_DIR", &dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut server = Command::new(example("session_server"))
        .arg("--once")
        .env("FLOWIPC_RUN_DIR", &dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "client: {text}");
    assert!(text.contains("server absent, retrying"), "{text}");
    // (A small answer is copied into its frame, which costs less than a handle.)
    assert!(text.contains("42 (zero-copy: false)"), "{text}");
    assert!(text.contains("sum = 12"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = server.kill();
            panic!("the server did not end with its session");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success());
    // The server's files went with it.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}
