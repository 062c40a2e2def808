//! Runs the user's program (`src/bin/calc.rs`): two processes, a session, a structured channel,
//! request/response, a notification, an fd, and the graceful end.

#[test]
fn the_users_program_runs_end_to_end() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_calc"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    // (A small answer is copied into its frame, in place or not is the channel's call: see
    // `MsgChannel::with_inline_max`.)
    assert!(
        text.lines()
            .any(|l| l.starts_with("client: 40 + 2 = 42 (zero-copy: ")),
        "no answer in:\n{text}"
    );
    for line in [
        "server: note: hello from the client",
        "server: file says \"behind the fd\"",
        "server: the client ended; done",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("error"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
