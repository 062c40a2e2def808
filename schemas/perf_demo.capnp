# The perf_demo schema, after Flow-IPC's perf_demo: a client asks for a file by name and the
# server answers with the file's contents split into parts, each carrying what the client needs
# to verify it (its size and a hash).
#
# The generated Rust is committed at src/schemas/perf_demo_capnp.rs; after editing this file run
# `cargo run -p xtask -- capnp` (and `cargo run -p xtask -- capnp --check` to verify).

@0xc0c58b1076e22dff;

# The root of every message: exactly one request or response.
struct Body {
  union {
    getCacheReq @0 :GetCacheReq;
    getCacheRsp @1 :GetCacheRsp;
  }
}

struct GetCacheReq {
  fileName @0 :Text;
}

struct GetCacheRsp {
  # A Data field holds at most 2^29-1 bytes, so a large file travels as a list of parts.
  fileParts @0 :List(FilePart);
}

struct FilePart {
  data @0 :Data;
  dataSizeToVerify @1 :UInt64;
  dataHashToVerify @2 :UInt64;
}
