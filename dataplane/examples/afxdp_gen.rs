//! A traffic generator for `scripts/bench-compare` on machines where the XDP live-frames test-run mode is refused
//! (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES` gives EPERM on some kernels): an AF_XDP socket on queue
//! 0 of `DEV` that only transmits, sending prebuilt 64-byte IPv4/UDP frames, one per source port of `NPORTS` (so
//! the gateway sees that many flows), as fast as the kernel takes them, for `SECONDS`.
//!
//! `afxdp_gen DEV DST_MAC SRC_IP DST_IP DPORT NPORTS SECONDS [QUEUE]` prints `sent N seconds S pps R`, as
//! `xdpbench gen` does. It needs no XDP program (it receives nothing); the kernel's neighbour tables are bypassed
//! (`DST_MAC`). On a veth, frames sent on queue q arrive on the peer's queue q.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use dataplane::stats::WorkerStats;
use dataplane::xsk::{Port, PortConfig};
use dataplane::Side;

fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(|| format!("bad MAC {text}"))?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| format!("bad MAC {text}"))?;
    }
    Ok(mac)
}

fn own_mac(dev: &str) -> Result<[u8; 6], String> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{dev}/address")).map_err(|e| e.to_string())?;
    parse_mac(text.trim())
}

/// A 64-byte Ethernet/IPv4/UDP frame (UDP checksum 0: none, so the gateway's checksum update is the cheap one).
fn frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
) -> [u8; 64] {
    let mut built = Vec::with_capacity(64);
    etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut built, &[0; 22])
        .expect("a 64-byte UDP frame");
    let mut f = [0u8; 64];
    f.copy_from_slice(&built);
    f[40..42].copy_from_slice(&[0, 0]);
    f
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (fixed, queue) = match args.len() {
        7 => (&args[..], "0"),
        8 => (&args[..7], args[7].as_str()),
        _ => return Err("usage: afxdp_gen DEV DST_MAC SRC_IP DST_IP DPORT NPORTS SECONDS [QUEUE]".into()),
    };
    let [dev, dst_mac, src, dst, dport, nports, seconds] = fixed else { unreachable!() };
    let num = |s: &str| s.parse::<u64>().map_err(|_| format!("not a number: {s}"));
    let ip = |s: &str| s.parse::<Ipv4Addr>().map_err(|_| format!("not an IPv4 address: {s}"));
    let frames: Vec<[u8; 64]> = (0..num(nports)?.max(1))
        .map(|i| {
            let sport = 1024 + (i % 64_000) as u16;
            Ok(frame(parse_mac(dst_mac)?, own_mac(dev)?, ip(src)?, ip(dst)?, sport, num(dport)? as u16))
        })
        .collect::<Result<_, String>>()?;
    let duration =
        Duration::from_secs_f64(seconds.parse::<f64>().map_err(|_| format!("not seconds: {seconds}"))?);

    let config = PortConfig { batch_size: 256, ..PortConfig::default() };
    let mut port = Port::open(dev, num(queue)? as u32, config).map_err(|e| e.to_string())?;
    let stats = WorkerStats::default();
    let started = Instant::now();
    let mut next = 0;
    while started.elapsed() < duration {
        for _ in 0..256 {
            if port.stage_tx(&frames[next]).is_err() {
                break;
            }
            next = (next + 1) % frames.len();
        }
        port.flush_tx(&stats, Side::Outside);
        port.reap_completions();
    }
    let secs = started.elapsed().as_secs_f64();
    let sent = stats.tx(Side::Outside).packets.get();
    println!("sent {sent} seconds {secs:.3} pps {:.0}", sent as f64 / secs);
    Ok(())
}
