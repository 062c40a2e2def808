//! Build-script helper for flowipc users: compiles your Cap'n Proto
//! schemas, generates their Rust code with `capnpc` for the `capnp` runtime flowipc re-exports
//! (`flowipc::capnp`: your crate needs no `capnp` dependency of its own), and adds, for every
//! struct with an anonymous union, a `<Struct>Kind` enum naming the union's arms, which
//! flowipc's structured channels take and the compiler checks:
//! `chan.expect_msgs(CoolMsgKind::SumRequest, ..)` (a typo does not compile), `req.which()?`.
//!
//! ```no_run
//! // build.rs
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     flowipc_build::Schemas::new()
//!         .src_prefix("schemas")
//!         .file("schemas/my_msgs.capnp")
//!         .run()?; // the embedded compiler: no `capnp` tool needed
//!     Ok(())
//! }
//! ```
//!
//! and, in the crate, `mod my_msgs_capnp { include!(concat!(env!("OUT_DIR"), "/my_msgs_capnp.rs")); }`.
//!
//! Two compilers ([`Compiler`]): the embedded one (capnp 1.4.0 built to WebAssembly and run
//! in-process; feature `embedded`, on by default, adds about a minute to a cold build), or the
//! `capnp` tool on the `PATH` (0.9.2 and later; [`tool_version`] says whether there is one).
//! Both give the same code.
//!
//! What is added after capnpc's code, for `struct CoolMsg { union { helloThere @0 :Hello; .. } }`
//! (a nested struct's enum is named by its path: `OuterInnerKind`):
//!
//! * `pub enum CoolMsgKind { HelloThere = 0, .. }` (`#[repr(u16)]`, the schema's
//!   discriminants; variants named as capnp's `Which` names the arms);
//! * `impl flowipc::struc::Root for cool_msg::Owned` (the kind enum and the `which()` arm);
//! * `impl flowipc::struc::KindOf<cool_msg::Owned> for CoolMsgKind` and
//!   `From<CoolMsgKind> for flowipc::struc::MsgType`.
//!
//! Generic structs get none (their `Which` has type parameters).

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use capnp::schema_capnp::{field, node};
use capnpc::codegen::{CodeGenerationCommand, GeneratorContext};

/// What went wrong (the text says what: the compiler's or the generator's message).
#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<capnp::Error> for Error {
    fn from(e: capnp::Error) -> Self {
        Error(format!("capnp: {e}"))
    }
}

impl From<std::str::Utf8Error> for Error {
    fn from(e: std::str::Utf8Error) -> Self {
        Error(format!("a schema name is not UTF-8: {e}"))
    }
}

impl From<capnp::NotInSchema> for Error {
    fn from(e: capnp::NotInSchema) -> Self {
        Error(format!("capnp: {e}"))
    }
}

/// Which schema compiler turns the `.capnp` files into a code generator request.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compiler {
    /// capnp 1.4.0 built to WebAssembly, run in-process (`capnpc-embedded`): no tool needed.
    #[cfg(feature = "embedded")]
    Embedded,
    /// The `capnp` executable (this path, or `capnp` on the `PATH` if `None`).
    Tool(Option<PathBuf>),
}

impl Default for Compiler {
    /// The embedded compiler with the `embedded` feature, else the tool on the `PATH`.
    fn default() -> Self {
        #[cfg(feature = "embedded")]
        return Compiler::Embedded;
        #[cfg(not(feature = "embedded"))]
        return Compiler::Tool(None);
    }
}

/// The version line of the `capnp` tool on the `PATH` (`"Cap'n Proto version 1.0.1"`), or
/// `None` if there is none that runs.
pub fn tool_version() -> Option<String> {
    let out = Command::new("capnp").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Schemas to compile and generate code for: a builder (see the [crate docs](crate)).
#[derive(Clone, Debug)]
pub struct Schemas {
    files: Vec<PathBuf>,
    src_prefixes: Vec<PathBuf>,
    import_paths: Vec<PathBuf>,
    no_standard_import: bool,
    compiler: Compiler,
    output_directory: Option<PathBuf>,
    parent_module: Vec<String>,
    capnp_root: String,
    flowipc_root: String,
}

impl Default for Schemas {
    fn default() -> Self {
        Schemas {
            files: Vec::new(),
            src_prefixes: Vec::new(),
            import_paths: Vec::new(),
            no_standard_import: false,
            compiler: Compiler::default(),
            output_directory: None,
            parent_module: Vec::new(),
            capnp_root: "::flowipc::capnp".into(),
            flowipc_root: "::flowipc".into(),
        }
    }
}

impl Schemas {
    /// No files yet; the default compiler; output in `OUT_DIR`; the generated code at the crate
    /// root, naming the capnp runtime `::flowipc::capnp`.
    pub fn new() -> Self {
        Self::default()
    }

    /// A schema file to compile (its imports are found through the import paths).
    pub fn file(&mut self, path: impl AsRef<Path>) -> &mut Self {
        self.files.push(path.as_ref().to_path_buf());
        self
    }

    /// A prefix to strip from the files' paths: `src_prefix("schemas")` makes
    /// `schemas/my_msgs.capnp` generate `my_msgs_capnp.rs` at the top of the output directory.
    pub fn src_prefix(&mut self, prefix: impl AsRef<Path>) -> &mut Self {
        self.src_prefixes.push(prefix.as_ref().to_path_buf());
        self
    }

    /// A directory where imports are searched.
    pub fn import_path(&mut self, dir: impl AsRef<Path>) -> &mut Self {
        self.import_paths.push(dir.as_ref().to_path_buf());
        self
    }

    /// Does not offer the standard `/capnp/*.capnp` imports.
    pub fn no_standard_import(&mut self) -> &mut Self {
        self.no_standard_import = true;
        self
    }

    /// The compiler (default: [`Compiler::default`]).
    pub fn compiler(&mut self, compiler: Compiler) -> &mut Self {
        self.compiler = compiler;
        self
    }

    /// Where the generated files go (default: `OUT_DIR`).
    pub fn output_directory(&mut self, dir: impl AsRef<Path>) -> &mut Self {
        self.output_directory = Some(dir.as_ref().to_path_buf());
        self
    }

    /// The module of your crate the generated `<stem>_capnp` modules are in (default: the crate
    /// root), as capnpc's option of the same name: `vec!["schemas".into()]` for
    /// `mod schemas { pub mod my_msgs_capnp { include!(..); } }`.
    pub fn default_parent_module(&mut self, path: Vec<String>) -> &mut Self {
        self.parent_module = path;
        self
    }

    /// How the generated code names the capnp runtime (default `::flowipc::capnp`, the
    /// runtime flowipc re-exports: no `capnp` dependency of your own needed; `::capnp` to use
    /// one, which must then be the very version flowipc uses).
    pub fn capnp_root(&mut self, path: &str) -> &mut Self {
        self.capnp_root = path.into();
        self
    }

    /// How the generated code names flowipc (default `::flowipc`; flowipc's own schemas use
    /// `crate`).
    pub fn flowipc_root(&mut self, path: &str) -> &mut Self {
        self.flowipc_root = path.into();
        self
    }

    /// Compiles the schemas, writes their code into the output directory and returns the
    /// files written. Under cargo (in a build script) it also prints `cargo:rerun-if-changed`
    /// for each schema.
    pub fn run(&self) -> Result<Vec<PathBuf>, Error> {
        let request = self.compile()?;
        if std::env::var_os("OUT_DIR").is_some() {
            for f in &self.files {
                println!("cargo:rerun-if-changed={}", f.display());
            }
        }
        self.generate(&request)
    }

    /// Compiles the schemas into a code generator request (`schema.capnp`'s
    /// `CodeGeneratorRequest`, serialized), as `capnp compile -o-` writes it.
    pub fn compile(&self) -> Result<Vec<u8>, Error> {
        if self.files.is_empty() {
            return Err(Error("no schema files given".into()));
        }
        match &self.compiler {
            #[cfg(feature = "embedded")]
            Compiler::Embedded => {
                let mut c = capnpc_embedded::CompileCommand::new();
                for p in &self.src_prefixes {
                    c.src_prefix(p);
                }
                for p in &self.import_paths {
                    c.import_path(p);
                }
                if self.no_standard_import {
                    c.no_standard_import();
                }
                for f in &self.files {
                    c.file(f);
                }
                c.compile()
                    .map_err(|e| Error(format!("capnp compile (embedded) failed: {e}")))
            }
            Compiler::Tool(exe) => {
                let exe = exe.clone().unwrap_or_else(|| "capnp".into());
                let mut c = Command::new(&exe);
                c.env_remove("PWD").arg("compile").arg("-o-");
                for p in &self.src_prefixes {
                    c.arg(format!("--src-prefix={}", p.display()));
                }
                for p in &self.import_paths {
                    c.arg(format!("--import-path={}", p.display()));
                }
                if self.no_standard_import {
                    c.arg("--no-standard-import");
                }
                c.args(&self.files);
                let out = c.output().map_err(|e| {
                    Error(format!(
                        "cannot run {} ({e}): install capnproto, or use Compiler::Embedded",
                        exe.display()
                    ))
                })?;
                if !out.status.success() {
                    return Err(Error(format!(
                        "{} compile failed ({}): {}",
                        exe.display(),
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                Ok(out.stdout)
            }
        }
    }

    /// Writes the code of a code generator request ([`compile`](Schemas::compile)'s) into the
    /// output directory: capnpc's, then the kinds (see the [crate docs](crate)). Returns the
    /// files written.
    pub fn generate(&self, request: &[u8]) -> Result<Vec<PathBuf>, Error> {
        let out_dir = match &self.output_directory {
            Some(d) => d.clone(),
            None => std::env::var_os("OUT_DIR")
                .map(PathBuf::from)
                .ok_or_else(|| Error("OUT_DIR is not set: give an output directory".into()))?,
        };
        CodeGenerationCommand::new()
            .output_directory(&out_dir)
            .default_parent_module(self.parent_module.clone())
            .capnp_root(&self.capnp_root)
            .run(request)
            .map_err(|e| Error(format!("capnpc code generation failed: {e}")))?;
        let message = capnp::serialize::read_message(
            &mut &request[..],
            capnp::message::ReaderOptions::new(),
        )?;
        let ctx = GeneratorContext::new(&message)?;
        let mut written = Vec::new();
        for file in ctx.request.get_requested_files()? {
            let name = file.get_filename()?.to_str()?;
            let stem = Path::new(name)
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| Error(format!("schema file without a stem: {name}")))?;
            let module = format!("{}_capnp", stem.replace('-', "_"));
            let mut path = out_dir.join(name);
            path.set_file_name(format!("{module}.rs"));
            let kinds = kinds(&ctx, file.get_id(), &module, &self.flowipc_root)?;
            if !kinds.is_empty() {
                let mut text = std::fs::read_to_string(&path)
                    .map_err(|e| Error(format!("cannot read {}: {e}", path.display())))?;
                text.push_str(&kinds);
                std::fs::write(&path, text)
                    .map_err(|e| Error(format!("cannot write {}: {e}", path.display())))?;
            }
            written.push(path);
        }
        Ok(written)
    }
}

/// The id of rust.capnp's `name` annotation (capnpc honours it for fields).
const NAME_ANNOTATION_ID: u64 = 0xc2fe_4c6d_1001_66d0;

/// A field's Rust name, as capnpc takes it: the `$Rust.name` annotation, or the schema's.
fn field_name(f: field::Reader<'_>) -> Result<String, Error> {
    for a in f.get_annotations()? {
        if a.get_id() == NAME_ANNOTATION_ID {
            if let capnp::schema_capnp::value::Text(t) = a.get_value()?.which()? {
                return Ok(t?.to_string()?);
            }
        }
    }
    Ok(f.get_name()?.to_string()?)
}

/// capnpc's name of a union arm in `Which`: the field's name, first letter capitalized.
fn variant(name: &str) -> String {
    let mut c = name.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

/// The kinds code of one requested file (empty if it has no struct with an anonymous union).
fn kinds(ctx: &GeneratorContext<'_>, file: u64, module: &str, fl: &str) -> Result<String, Error> {
    let mut nodes: Vec<_> = ctx
        .node_map
        .values()
        .filter(|n| file_of(ctx, n.get_id()) == Some(file))
        .copied()
        .collect();
    // A stable order: by display name (the schema's own order is not recorded), then id.
    nodes.sort_by_key(|n| {
        let name = n.get_display_name().ok().and_then(|t| t.to_string().ok());
        (name, n.get_id())
    });
    let mut out = String::new();
    for n in nodes {
        let node::Struct(st) = n.which()? else {
            continue;
        };
        if st.get_is_group() || n.get_is_generic() || st.get_discriminant_count() == 0 {
            continue;
        }
        let Some(scope) = ctx.scope_map.get(&n.get_id()) else {
            continue;
        };
        // Relative to the file's module when the struct is in it (no `parentModule`
        // annotation moved it), else from the crate root.
        let path = if scope.get(1).map(String::as_str) == Some(module) {
            scope[2..].join("::")
        } else {
            scope.join("::")
        };
        let display = n.get_display_name()?.to_str()?;
        let local = &display[n.get_display_name_prefix_length() as usize..];
        let full = display
            .split_once(':')
            .map(|(_, path)| path)
            .unwrap_or(local);
        let kind: String = full.split('.').map(variant).collect::<String>() + "Kind";
        let mut arms = Vec::new();
        for f in st.get_fields()? {
            let d = f.get_discriminant_value();
            if d != field::NO_DISCRIMINANT {
                arms.push((d, variant(&field_name(f)?), f.get_name()?.to_string()?));
            }
        }
        arms.sort();
        write_kind(&mut out, fl, &path, &kind, full, &arms).map_err(|e| Error(e.to_string()))?;
    }
    if out.is_empty() {
        return Ok(out);
    }
    Ok(format!(
        "\n// Added by flowipc-build: the message kinds of each struct with an anonymous union.\n{out}"
    ))
}

/// The file node a node is in (following the scopes up).
fn file_of(ctx: &GeneratorContext<'_>, mut id: u64) -> Option<u64> {
    for _ in 0..64 {
        let n = ctx.node_map.get(&id)?;
        if let Ok(node::File(())) = n.which() {
            return Some(id);
        }
        id = *ctx.node_parents.get(&id)?;
    }
    None
}

fn write_kind(
    out: &mut String,
    fl: &str,
    path: &str,
    kind: &str,
    schema_name: &str,
    arms: &[(u16, String, String)],
) -> fmt::Result {
    let ty = format!("{fl}::struc::MsgType");
    writeln!(out)?;
    writeln!(
        out,
        "/// The kinds of `{schema_name}` message: the arms of its anonymous union (flowipc's"
    )?;
    writeln!(out, "/// structured channels dispatch on them).")?;
    writeln!(
        out,
        "#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]"
    )?;
    writeln!(out, "#[repr(u16)]")?;
    writeln!(out, "pub enum {kind} {{")?;
    for (d, v, name) in arms {
        writeln!(out, "    /// `{name}`")?;
        writeln!(out, "    {v} = {d},")?;
    }
    writeln!(out, "}}")?;
    writeln!(out)?;
    writeln!(out, "impl {fl}::struc::KindOf<{path}::Owned> for {kind} {{")?;
    writeln!(out, "    fn msg_type(self) -> {ty} {{")?;
    writeln!(out, "        {ty}(self as u16)")?;
    writeln!(out, "    }}")?;
    writeln!(out, "}}")?;
    writeln!(out)?;
    writeln!(out, "impl ::core::convert::From<{kind}> for {ty} {{")?;
    writeln!(out, "    fn from(k: {kind}) -> {ty} {{")?;
    writeln!(out, "        {ty}(k as u16)")?;
    writeln!(out, "    }}")?;
    writeln!(out, "}}")?;
    writeln!(out)?;
    writeln!(out, "impl {fl}::struc::Root for {path}::Owned {{")?;
    writeln!(out, "    type Kind = {kind};")?;
    writeln!(out, "    type Which<'a> = {path}::WhichReader<'a>;")?;
    writeln!(
        out,
        "    fn which<'a>(root: <Self as {fl}::capnp::traits::Owned>::Reader<'a>) -> ::core::result::Result<<Self as {fl}::struc::Root>::Which<'a>, {fl}::capnp::NotInSchema> {{"
    )?;
    writeln!(out, "        root.which()")?;
    writeln!(out, "    }}")?;
    writeln!(
        out,
        "    fn kind(t: {ty}) -> ::core::option::Option<{kind}> {{"
    )?;
    writeln!(out, "        match t.0 {{")?;
    for (d, v, _) in arms {
        writeln!(
            out,
            "            {d} => ::core::option::Option::Some({kind}::{v}),"
        )?;
    }
    writeln!(out, "            _ => ::core::option::Option::None,")?;
    writeln!(out, "        }}")?;
    writeln!(out, "    }}")?;
    writeln!(out, "}}")?;
    Ok(())
}
