//! The README's build script (the embedded compiler: no tool needed), then the same schema
//! compiled with the `capnp` tool when there is one, into `OUT_DIR/tool` (module `tool`), so
//! that the tests can check that both ways give the same kinds and interoperate.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // --- the README's build.rs ---
    flowipc_build::Schemas::new()
        .src_prefix("schemas")
        .file("schemas/calc.capnp")
        .run()?;
    // --- end ---

    println!("cargo:rerun-if-env-changed=PATH");
    match flowipc_build::tool_version() {
        Some(version) => {
            let out = std::path::Path::new(&std::env::var("OUT_DIR")?).join("tool");
            std::fs::create_dir_all(&out)?;
            flowipc_build::Schemas::new()
                .compiler(flowipc_build::Compiler::Tool(None))
                .src_prefix("schemas")
                .file("schemas/calc.capnp")
                .output_directory(&out)
                .default_parent_module(vec!["tool".into()])
                .run()?;
            println!("cargo:rustc-cfg=capnp_tool");
            println!("cargo:rustc-env=CAPNP_TOOL_VERSION={version}");
        }
        None => println!("cargo:rustc-env=CAPNP_TOOL_VERSION="),
    }
    Ok(())
}
