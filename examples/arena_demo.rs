//! Two processes, one shared-memory arena.
//!
//! The parent creates an arena, starts a copy of itself as the child and sends it the arena over
//! a Unix socket (`Arena::send_to`: the pool's fd goes by `SCM_RIGHTS`). Then:
//! 1. the parent builds a 64 MiB object in the arena and lends it: only 32 bytes cross the socket,
//!    and the child reads the parent's bytes in place (no copy);
//! 2. the child bumps a shared atomic counter the parent watches;
//! 3. the child allocates an object, lends it back and drops its own reference; the parent frees
//!    it with its last drop.
//!
//! Run: `cargo run --release --example arena_demo`

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use flowipc::shm::{Arena, ArenaConfig, LendBlob, ShmHandle};

const BIG: usize = 64 << 20;
type Big = [u8; BIG];
type Counter = AtomicU64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    match std::env::args().nth(1).as_deref() {
        Some("child") => child(&std::env::args().nth(2).ok_or("socket name")?),
        _ => parent(),
    }
}

fn send_blob(sock: &mut UnixStream, blob: &LendBlob) -> std::io::Result<()> {
    sock.write_all(blob.as_bytes())
}

fn recv_blob(sock: &mut UnixStream) -> Result<LendBlob, Box<dyn std::error::Error>> {
    let mut b = [0u8; LendBlob::LEN];
    sock.read_exact(&mut b)?;
    Ok(LendBlob::from_bytes(&b)?)
}

fn parent() -> Result<(), Box<dyn std::error::Error>> {
    let arena = Arena::create(ArenaConfig::new().pool_size(256 << 20))?;
    let name = format!("flowipc-arena-demo-{}", std::process::id());
    let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(&name)?)?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["child", &name])
        .spawn()?;
    let (mut sock, _) = listener.accept()?;
    arena.send_to(&sock)?;

    // 1. A 64 MiB object, filled here, lent to the child.
    let t = Instant::now();
    let mut big = arena.construct_zeroed::<Big>()?;
    let data = big.get_mut().ok_or("unique")?;
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    println!(
        "parent: built a 64 MiB object at {:?} in {:.1} ms",
        big.block_ref(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let counter = arena.construct(Counter::new(0))?;
    send_blob(&mut sock, &big.lend())?;
    send_blob(&mut sock, &counter.lend())?;

    // 3. The child's object comes back; the child has dropped its own reference already.
    let theirs: ShmHandle<[u64; 8]> = arena.borrow(&recv_blob(&mut sock)?)?;
    let status = child.wait()?;
    println!(
        "parent: child exited ({status}); counter = {} (the child added 1000)",
        counter.load(Ordering::Acquire)
    );
    println!(
        "parent: child's object {:?} = {:?}, references left: {} (ours)",
        theirs.block_ref(),
        *theirs,
        theirs.ref_count()
    );
    println!("parent: arena before our drops: {:?}", arena.stats());
    drop((big, counter, theirs));
    let s = arena.stats();
    println!("parent: arena after our drops:  {s:?}");
    assert_eq!(s.blocks_in_use, 0, "everything freed, whoever allocated it");
    Ok(())
}

fn child(name: &str) -> Result<(), Box<dyn std::error::Error>> {
    let sock_addr = SocketAddr::from_abstract_name(name)?;
    let mut sock = UnixStream::connect_addr(&sock_addr)?;
    let arena = Arena::join_from(&sock, ArenaConfig::new())?;

    let t = Instant::now();
    let big: ShmHandle<Big> = arena.borrow(&recv_blob(&mut sock)?)?;
    let counter: ShmHandle<Counter> = arena.borrow(&recv_blob(&mut sock)?)?;
    let ok = big.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8);
    println!(
        "child:  borrowed the 64 MiB object at {:?}, verified every byte in place ({ok}) in {:.1} ms",
        big.block_ref(),
        t.elapsed().as_secs_f64() * 1e3
    );
    for _ in 0..1000 {
        counter.fetch_add(1, Ordering::Release);
    }
    let mine = arena.construct([7u64; 8])?;
    send_blob(&mut sock, &mine.lend())?;
    drop(mine); // the lent reference keeps it alive for the parent
    println!("child:  arena as seen from here: {:?}", arena.stats());
    Ok(())
}
