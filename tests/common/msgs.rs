//! Message-test support: a `cool_msg` channel over a socket, and a message of data chunks.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use flowipc::msg::{Backing, MsgChannel, MsgIn, MsgOut};
use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::struc;
use flowipc::transport::{Channel, ChannelConfig};

pub type Chan = MsgChannel<cool_msg::Owned>;
/// How long a test waits for a message before it calls it a hang.
pub const T: Option<Duration> = Some(Duration::from_secs(60));

/// A message channel over a connected socket (e.g. a spawned child's).
pub fn chan_over(sock: UnixStream, backing: Backing) -> Chan {
    MsgChannel::new(
        Channel::from_stream(sock, ChannelConfig::new()).unwrap(),
        backing,
    )
}

/// Makes `m` a blob of `n` data chunks of 20,000 bytes (more than the 8 KiB first segment, so
/// the message has several segments), chunk `c` filled with `tag + c`.
pub fn chunks(m: &mut MsgOut<cool_msg::Owned>, n: u32, tag: u8) {
    blob_into(m.init_root(), n, tag);
}

/// [`chunks`] for any builder's root.
pub fn blob_into(root: cool_msg::Builder<'_>, n: u32, tag: u8) {
    let mut blob = root.init_blob();
    blob.set_tag(tag as u64);
    let mut list = blob.init_chunks(n);
    for c in 0..n {
        list.reborrow()
            .get(c)
            .init_data(20_000)
            .fill(tag.wrapping_add(c as u8));
    }
}

/// What a blob message says: its tag and every chunk's bytes.
pub fn chunks_of(root: cool_msg::Reader<'_>) -> (u64, Vec<Vec<u8>>) {
    let Ok(cool_msg::Blob(Ok(b))) = root.which() else {
        panic!("not a blob");
    };
    let data = b
        .get_chunks()
        .unwrap()
        .iter()
        .map(|c| c.get_data().unwrap().to_vec())
        .collect();
    (b.get_tag(), data)
}

/// Answers a `sumRequest` with the sum of its terms (the page's example server); panics on any
/// other message. The send's result is the caller's (a peer may be gone).
pub fn answer_sum(
    chan: &mut struc::Channel<cool_msg::Owned>,
    req: MsgIn<cool_msg::Owned>,
) -> Result<(), struc::Error> {
    let cool_msg::SumRequest(Ok(r)) = req.root().unwrap().which().unwrap() else {
        panic!("not a sumRequest");
    };
    let sum: i64 = r.get_terms_to_add().unwrap().iter().sum();
    let mut rsp = chan.create_msg();
    rsp.init_root().init_sum_response().set_sum(sum);
    chan.send(&mut rsp, Some(&req))
}
