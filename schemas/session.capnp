# The session protocol: what a client and a server say on a session's master channel (a
# structured channel over the Unix socket the client connected to the server's run dir with).
#
# The generated Rust is committed at src/schemas/session_capnp.rs; after editing this file run
# `cargo run -p xtask -- capnp` (and `cargo run -p xtask -- capnp --check` to verify).
@0xd4a6c1f0e3b27a51;

struct Master {
  union {
    # Client -> server, the first message: who the client is and what it wants.
    logIn @0 :LogIn;
    # Server -> client, the response to logIn.
    logInRsp @1 :LogInRsp;
    # Server -> client, before logInRsp: one resource, its fd riding on the message. Either
    # way, once the session is open: a pool of a session arena (kind 0 or 1, index: the pool
    # id), one the peer may not know yet (the arenas grow by pools).
    resource @2 :Resource;
    # Either way, once the session is open: "here is the other end of a new channel" (its fd
    # rides on the message).
    openChannel @3 :OpenChannel;
    # The response to openChannel.
    openChannelRsp @4 :OpenChannelRsp;
  }
}

# Settings both sides must agree on.
struct Config {
  # 0: heap (vanilla session), 1: SHM-classic.
  shmKind @0 :UInt8;
  # 0: Unix stream socket.
  channelKind @1 :UInt8;
  # Whether channels carry fds.
  nativeHandles @2 :Bool;
}

struct LogIn {
  protocolVersion @0 :UInt32;
  # The client app's name, and the name of the server app it means to reach.
  clientApp @1 :Text;
  serverApp @2 :Text;
  # Who the client says it is (checked against SO_PEERCRED and the universe description).
  pid @3 :Int32;
  uid @4 :UInt32;
  gid @5 :UInt32;
  config @6 :Config;
  # Init channels the client requests.
  initChannels @7 :UInt32;
  # The client's metadata: a capnp message of the user's type, flat (empty: none).
  metadata @8 :Data;
}

struct LogInRsp {
  union {
    accepted :group {
      # The session token (16 bytes) every structured channel of the session carries.
      token @0 :Data;
      # Init channels: those the client asked for, then those the server decided on; each
      # one's fd came in a resource message before this response.
      initByClient @1 :UInt32;
      initByServer @2 :UInt32;
      # The server's metadata (empty: none).
      metadata @3 :Data;
      # Whether the session-scope and app-scope arenas' fds came (SHM-classic).
      arenas @4 :Bool;
    }
    rejected :group {
      # A `Rejection` code (see session::Rejection) and a human-readable detail.
      reason @5 :UInt16;
      detail @6 :Text;
    }
  }
}

struct Resource {
  # 0: session-scope arena pool, 1: app-scope arena pool, 2: init channel by client, 3: init
  # channel by server. For an arena pool, `index` is the pool id (0 at log-in).
  kind @0 :UInt8;
  index @1 :UInt32;
}

struct OpenChannel {
  metadata @0 :Data;
}

struct OpenChannelRsp {
  accepted @0 :Bool;
}
