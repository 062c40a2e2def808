//! The schema's generated code, as the README includes it, and (when the `capnp` tool was
//! found at build time) the same schema compiled by the tool, in module `tool`.

/// As the README says: at the crate root, named `<stem>_capnp`.
#[allow(missing_docs, clippy::all)]
pub mod calc_capnp {
    include!(concat!(env!("OUT_DIR"), "/calc_capnp.rs"));
}

/// The same schema compiled with the `capnp` tool.
#[cfg(capnp_tool)]
pub mod tool {
    #[allow(missing_docs, clippy::all)]
    pub mod calc_capnp {
        include!(concat!(env!("OUT_DIR"), "/tool/calc_capnp.rs"));
    }
}

/// The `capnp` tool's version line if the tool half was built (empty if not).
pub const CAPNP_TOOL: &str = env!("CAPNP_TOOL_VERSION");
