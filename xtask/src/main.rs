//! flowipc's development tasks (`cargo run -p xtask -- <task>`).
//!
//! * `capnp`: compiles every `schemas/*.capnp` with the pinned, embedded capnp compiler
//!   (`capnpc-embedded`, capnp 1.4.0 as WebAssembly: no system `capnp` needed) and the `capnpc`
//!   code generator, and writes `src/schemas/<stem>_capnp.rs`.
//! * `capnp --check`: generates into a temporary directory and compares byte for byte with the
//!   committed files. Exits 0 when they are current and 1 (listing the stale files) when not.
//!
//! * `mutants`: applies each listed mutation of a lock-free protocol (an ordering weakened, a
//!   tag frozen, a check removed) to a scratch copy and runs the check that must catch it (the
//!   loom models, or a race test). Exits 0 when every mutation is caught, 1 (with the table)
//!   when one survives. See `mutants.rs` for the list.
//!
//! * `fuzz build | seeds | run <target> | ci`: the fuzz targets of `fuzz/` (see `fuzz.rs`).
//!
//! All fail (exit 2) on errors, such as a schema that does not compile or a schema with no
//! `pub mod <stem>_capnp;` line in `src/schemas/mod.rs` (that file is never rewritten).

use std::collections::BTreeSet;
use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod fuzz;
mod mutants;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const USAGE: &str = "\
usage: cargo run -p xtask -- <task>

tasks:
  capnp            regenerate src/schemas/<stem>_capnp.rs from every schemas/*.capnp
  capnp --check    check that the committed generated code is current
                   (exit 0: current, 1: stale files listed, 2: error)
  mutants          check that every listed mutation of a lock-free protocol is caught
                   (exit 0: all caught, 1: one survived, 2: error)
  mutants --ci     the same for the dozen most important (the others are only checked to
                   still apply): what .ci/run runs
{FUZZ}";

fn usage() -> String {
    USAGE.replace("{FUZZ}", fuzz::USAGE)
}

/// Where the schemas live, relative to the workspace root.
const SCHEMA_DIR: &str = "schemas";
/// Where the generated code lives, relative to the workspace root.
const GENERATED_DIR: &str = "src/schemas";
/// The Rust module the generated code lives in (the generated code refers to itself through
/// `crate::schemas::<stem>_capnp`).
const PARENT_MODULE: &str = "schemas";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Write,
    Check,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mode = match args.as_slice() {
        ["capnp"] => Mode::Write,
        ["capnp", "--check"] => Mode::Check,
        ["mutants"] | ["mutants", "--ci"] => {
            let ci = args.len() == 2;
            return match workspace_root().and_then(|root| mutants::run(&root, ci)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("xtask mutants: error: {e}");
                    ExitCode::from(2)
                }
            };
        }
        ["fuzz", rest @ ..] => {
            return match workspace_root().and_then(|root| fuzz::run(&root, rest)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("xtask fuzz: error: {e}");
                    ExitCode::from(2)
                }
            };
        }
        ["help" | "-h" | "--help"] => {
            println!("{}", usage());
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{}", usage());
            return ExitCode::from(2);
        }
    };
    match capnp(mode) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("xtask capnp: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// One schema and the generated file it maps to.
struct Schema {
    /// `schemas/<stem>.capnp`, absolute.
    path: PathBuf,
    /// `<stem>_capnp` (capnpc's naming: `-` becomes `_`).
    module: String,
}

impl Schema {
    fn file_name(&self) -> String {
        format!("{}.rs", self.module)
    }
}

/// Runs the task; `Ok(false)` means `--check` found stale files.
fn capnp(mode: Mode) -> Result<bool> {
    let root = workspace_root()?;
    let schema_dir = root.join(SCHEMA_DIR);
    let generated_dir = root.join(GENERATED_DIR);

    let schemas = find_schemas(&schema_dir)?;
    check_mod_rs(&generated_dir.join("mod.rs"), &schemas)?;

    let scratch = tempfile::Builder::new()
        .prefix("flowipc-xtask-capnp")
        .tempdir()?;
    generate(&schema_dir, &schemas, scratch.path())?;

    let mut stale = Vec::new();
    for schema in &schemas {
        let name = schema.file_name();
        let fresh = fs::read(scratch.path().join(&name))?;
        let target = generated_dir.join(&name);
        let shown = format!("{GENERATED_DIR}/{name}");
        let current = match fs::read(&target) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("cannot read {shown}: {e}").into()),
        };
        match (mode, current) {
            (_, Some(bytes)) if bytes == fresh => println!("current  {shown}"),
            (Mode::Check, Some(_)) => stale.push(format!("{shown} (differs from fresh output)")),
            (Mode::Check, None) => stale.push(format!("{shown} (missing)")),
            (Mode::Write, _) => {
                fs::write(&target, &fresh).map_err(|e| format!("cannot write {shown}: {e}"))?;
                println!("wrote    {shown}");
            }
        }
    }

    // Generated files whose schema is gone.
    let expected: BTreeSet<String> = schemas.iter().map(Schema::file_name).collect();
    for name in generated_files(&generated_dir)? {
        if !expected.contains(&name) {
            let shown = format!("{GENERATED_DIR}/{name}");
            match mode {
                Mode::Check => stale.push(format!("{shown} (no schema generates it)")),
                Mode::Write => eprintln!("warning: {shown}: no schema generates it; delete it"),
            }
        }
    }

    if stale.is_empty() {
        if mode == Mode::Check {
            println!("generated Cap'n Proto code is current");
        }
        return Ok(true);
    }
    eprintln!("stale generated Cap'n Proto code:");
    for s in &stale {
        eprintln!("  {s}");
    }
    eprintln!("run `cargo run -p xtask -- capnp` and commit the result");
    Ok(false)
}

/// The workspace root: the xtask crate sits directly under it.
fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .ok_or("xtask's manifest directory has no parent")?;
    Ok(root.to_path_buf())
}

/// Every `*.capnp` in the schema directory, sorted by name.
fn find_schemas(schema_dir: &Path) -> Result<Vec<Schema>> {
    let entries =
        fs::read_dir(schema_dir).map_err(|e| format!("cannot list {SCHEMA_DIR}/: {e}"))?;
    let mut schemas = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("capnp") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("schema file name is not UTF-8: {}", path.display()))?;
        let module = format!("{}_capnp", stem.replace('-', "_"));
        if !is_identifier(&module) {
            return Err(format!(
                "{SCHEMA_DIR}/{stem}.capnp: `{module}` is not a Rust identifier; rename the schema"
            )
            .into());
        }
        schemas.push(Schema { path, module });
    }
    if schemas.is_empty() {
        return Err(format!("no *.capnp files in {SCHEMA_DIR}/").into());
    }
    schemas.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(schemas)
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Fails unless `mod.rs` declares exactly one `pub mod <stem>_capnp;` per schema. The file is
/// hand-written (module docs, lint allowances, `#[rustfmt::skip]`), so it is checked, never
/// rewritten.
fn check_mod_rs(mod_rs: &Path, schemas: &[Schema]) -> Result<()> {
    let shown = format!("{GENERATED_DIR}/mod.rs");
    let text = fs::read_to_string(mod_rs).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let declared: BTreeSet<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with("//"))
        .filter_map(|line| {
            let rest = &line[line.find("pub mod ")? + "pub mod ".len()..];
            rest.strip_suffix(';').map(str::trim)
        })
        .filter(|name| name.ends_with("_capnp"))
        .collect();

    let mut problems = Vec::new();
    for schema in schemas {
        if !declared.contains(schema.module.as_str()) {
            problems.push(format!(
                "{SCHEMA_DIR}/{} has no `pub mod {};` line in {shown}; add, next to the others:\n\
                 \n    #[rustfmt::skip]\n    #[allow(...)] // the same allowances as the others\n    pub mod {};\n",
                file_name(&schema.path),
                schema.module,
                schema.module,
            ));
        }
    }
    for name in &declared {
        if !schemas.iter().any(|s| s.module == *name) {
            problems.push(format!(
                "{shown} declares `pub mod {name};` but there is no matching schema in \
                 {SCHEMA_DIR}/; remove the declaration (and {GENERATED_DIR}/{name}.rs)"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Names of the `*_capnp.rs` files in the generated directory.
fn generated_files(generated_dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(generated_dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with("_capnp.rs") {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Compiles the schemas and generates their Rust code into `out_dir` (capnpc's, and the message
/// kinds flowipc-build adds, naming flowipc as `crate`).
fn generate(schema_dir: &Path, schemas: &[Schema], out_dir: &Path) -> Result<()> {
    let mut build = flowipc_build::Schemas::new();
    // The embedded compiler (`capnpc-embedded`, pinned here); the prefix makes the file names
    // recorded in the output (`// source:` and the schema nodes' display names) relative, so
    // the output does not depend on where the checkout is.
    build
        .compiler(flowipc_build::Compiler::Embedded)
        .src_prefix(schema_dir)
        // Our schemas import none of the standard `/capnp/*.capnp` files (some distributions'
        // `capnp` packages do not ship them, and users may compile these schemas with such a
        // tool): keep it that way by not offering them.
        .no_standard_import()
        .output_directory(out_dir)
        .default_parent_module(vec![PARENT_MODULE.into()])
        .capnp_root("::capnp")
        .flowipc_root("crate");
    for schema in schemas {
        build.file(&schema.path);
    }
    build
        .run()
        .map_err(|e| format!("code generation failed: {e}"))?;

    for schema in schemas {
        if !out_dir.join(schema.file_name()).is_file() {
            return Err(format!(
                "code generation did not produce {} for {}",
                schema.file_name(),
                file_name(&schema.path)
            )
            .into());
        }
    }
    Ok(())
}
