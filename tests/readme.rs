//! The README's snippets that doc tests cannot compile (a `Cargo.toml`, a build script, an
//! `include!` of generated code) are the very text of `tests/user_crate`, which CI builds and
//! runs (`cargo test -p flowipc-user-crate`): this checks they have not drifted apart. (The
//! README's Rust examples are doc tests: `ReadmeDoctests` in `src/lib.rs`.)

use std::path::Path;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// The README's fenced blocks under the heading `section`, with their info strings.
fn blocks(section: &str) -> Vec<(String, String)> {
    let readme = read("README.md");
    let start = readme.find(&format!("## {section}")).expect("the section");
    let rest = &readme[start + 3..];
    let text = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if let Some(info) = l.strip_prefix("```") {
            let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            out.push((info.to_string(), body.join("\n")));
        }
    }
    out
}

/// `text` with each line trimmed and comments after `//` or `#` cut (for Cargo.toml lines).
fn code_lines(text: &str, comment: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split(comment).next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn the_schema_snippets_are_the_user_crates_text() {
    let b = blocks("Your own schemas");
    let toml = &b.iter().find(|(i, _)| i == "toml").expect("a toml block").1;
    let build = &b
        .iter()
        .find(|(i, t)| i.starts_with("rust") && t.contains("// build.rs"))
        .expect("a build.rs block")
        .1;
    let include = &b
        .iter()
        .find(|(i, t)| i.starts_with("rust") && t.contains("include!"))
        .expect("an include block")
        .1;

    // Cargo.toml: the same sections and dependency names (the crate uses path dependencies).
    let manifest = read("tests/user_crate/Cargo.toml");
    for line in code_lines(toml, "#") {
        let name = line.split('=').next().unwrap().trim();
        let found = manifest
            .lines()
            .any(|m| m.trim() == line || m.split('=').next().map(str::trim) == Some(name));
        assert!(
            found,
            "README's `{line}` is not in tests/user_crate/Cargo.toml"
        );
    }
    assert!(
        !manifest
            .lines()
            .any(|l| l.trim_start().starts_with("capnp")),
        "the user crate needs no capnp dependency"
    );

    // build.rs: the README's lines, in order, between the crate's markers.
    let script = read("tests/user_crate/build.rs");
    let marked = &script[script.find("// --- the README's build.rs ---").unwrap()
        ..script.find("// --- end ---").unwrap()];
    let want: Vec<String> = code_lines(build, "//")
        .into_iter()
        .filter(|l| !l.starts_with("fn main") && l != "Ok(())" && l != "}")
        .collect();
    assert_eq!(code_lines(marked, "//"), want);

    // The include, as the crate's lib.rs has it.
    let lib = read("tests/user_crate/src/lib.rs");
    for line in code_lines(include, "//")
        .iter()
        .filter(|l| l.starts_with("mod") || l.starts_with("include!"))
    {
        let line = line.trim_start_matches("mod ");
        assert!(
            lib.contains(line),
            "README's `{line}` is not in the crate's lib.rs"
        );
    }
}
