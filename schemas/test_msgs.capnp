# Messages for the tests and examples of structured channels, modelled on Flow-IPC's CoolMsg
# example.
#
# The generated Rust is committed at src/schemas/test_msgs_capnp.rs; after editing this file run
# `cargo run -p xtask -- capnp` (and `cargo run -p xtask -- capnp --check` to verify).

@0xb06bf714422086c4;

# The root of structured-channel messages: its anonymous union says which kind a message is.
struct CoolMsg {
  union {
    helloThere @0 :HelloThere;
    sumRequest @1 :SumRequest;
    sumResponse @2 :SumResponse;
    hitMeWithYourBestShot @3 :HitMe;
    myBestShot @4 :MyBestShot;
    blob @5 :Blob;
    ping @6 :Void;
  }
}

struct HelloThere {
  greeting @0 :Text;
  num @1 :Int64;
}

struct SumRequest {
  termsToAdd @0 :List(Int64);
  constantFactor @1 :Int64;
}

struct SumResponse {
  sum @0 :Int64;
}

struct HitMe {
  dummy @0 :Void;
}

struct MyBestShot {
  text @0 :Text;
  num @1 :UInt32;
}

# A large payload: a Data field holds at most 2^29-1 bytes, so it is split into chunks.
struct Blob {
  chunks @0 :List(Chunk);
  tag @1 :UInt64;
}

struct Chunk {
  data @0 :Data;
}

# A root WITHOUT an anonymous union: structured channels must reject it as a message root.
struct NoUnion {
  x @0 :UInt32;
}

# Channel-open metadata of the session tests and examples (a session's metadata is any user
# struct; this one says what the channel is for).
struct ChannelMdt {
  purpose @0 :Text;
  n @1 :UInt32;
}
