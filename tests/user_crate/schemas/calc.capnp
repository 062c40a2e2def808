@0xd5a1a1c3e2b4f601;

struct Msg {
  union {
    add @0 :Add;
    sum @1 :Sum;
    note @2 :Text;
    file @3 :Void;
  }
}

struct Add {
  a @0 :Int64;
  b @1 :Int64;
}

struct Sum {
  value @0 :Int64;
}
