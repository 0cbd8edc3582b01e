//! The bare AF_XDP forwarder `scripts/bench-compare` measures egressd against: the same [`Port`] and
//! [`XdpProgram`] as egressd, one worker thread pinned to one core, busy-polling both directions, and per frame
//! only the MAC rewrite: no parsing, no policy, no NAT, no TTL. What egressd does beyond this is its cost.
//!
//! ```text
//! bare_forwarder INSIDE OUTSIDE INSIDE_PEER_MAC OUTSIDE_PEER_MAC [--core N] [--batch N] [--seconds S]
//! ```
//! Frames from INSIDE leave by OUTSIDE to OUTSIDE_PEER_MAC (source: OUTSIDE's MAC), and the reverse. Runs for
//! `--seconds` and prints its counters, or until killed: the sockets close and the XDP programs (attached through
//! bpf_links) go away with the process.

use std::time::{Duration, Instant};

use dataplane::stats::WorkerStats;
use dataplane::xsk::xdp::{XdpModeChoice, XdpProgram};
use dataplane::xsk::{Port, PortConfig};
use dataplane::Side;

fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(|| format!("bad MAC {text:?}"))?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| format!("bad MAC {text:?}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("bad MAC {text:?}"));
    }
    Ok(mac)
}

fn own_mac(interface: &str) -> Result<[u8; 6], String> {
    let path = format!("/sys/class/net/{interface}/address");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    parse_mac(&text)
}

/// Source and destination MAC written into every frame leaving by one port.
#[derive(Clone, Copy)]
struct Rewrite {
    src: [u8; 6],
    dst: [u8; 6],
}

/// One burst from `from` to `to` with the MAC rewrite only. Returns how many frames were received.
fn forward_burst(
    from: &mut Port,
    to: &mut Port,
    rewrite: Rewrite,
    out_side: Side,
    stats: &WorkerStats,
) -> usize {
    let n = from.receive(stats);
    for i in 0..n {
        let frame = from.received_frame(i);
        if frame.len() < 12 {
            continue;
        }
        frame[0..6].copy_from_slice(&rewrite.dst);
        frame[6..12].copy_from_slice(&rewrite.src);
        if let Err(e) = to.stage_tx(frame) {
            stats.count_drop(e.drop_reason());
        }
    }
    from.release_received();
    to.flush_tx(stats, out_side);
    n
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        "usage: bare_forwarder INSIDE OUTSIDE INSIDE_PEER_MAC OUTSIDE_PEER_MAC [--core N] [--batch N] \
                 [--seconds S]";
    if args.len() < 4 {
        return Err(usage.into());
    }
    let (inside, outside) = (args[0].as_str(), args[1].as_str());
    let to_inside = Rewrite { src: own_mac(inside)?, dst: parse_mac(&args[2])? };
    let to_outside = Rewrite { src: own_mac(outside)?, dst: parse_mac(&args[3])? };
    let (mut core, mut batch, mut seconds) = (None, 64usize, None);
    let mut rest = args[4..].iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or(usage)?;
        let number = || value.parse::<u64>().map_err(|_| format!("{flag}: not a number: {value}"));
        match flag.as_str() {
            "--core" => core = Some(number()? as usize),
            "--batch" => batch = number()? as usize,
            "--seconds" => seconds = Some(Duration::from_secs(number()?)),
            _ => return Err(usage.into()),
        }
    }

    let config = PortConfig { batch_size: batch, ..PortConfig::default() };
    let mut in_port = Port::open(inside, 0, config).map_err(|e| e.to_string())?;
    let mut out_port = Port::open(outside, 0, config).map_err(|e| e.to_string())?;
    // No node addresses: this forwarder is only ever pointed at the bench's traffic; ARP still goes to the kernel.
    let mut in_prog = XdpProgram::attach(inside, XdpModeChoice::Auto, &[], &[]).map_err(|e| e.to_string())?;
    let mut out_prog =
        XdpProgram::attach(outside, XdpModeChoice::Auto, &[], &[]).map_err(|e| e.to_string())?;
    in_prog.register(&in_port).map_err(|e| e.to_string())?;
    out_prog.register(&out_port).map_err(|e| e.to_string())?;
    eprintln!(
        "bare_forwarder: {inside} ({}, XDP {}) <-> {outside} ({}, XDP {}), batch {batch}, core {core:?}",
        in_port.bind_mode().as_str(),
        in_prog.mode().as_str(),
        out_port.bind_mode().as_str(),
        out_prog.mode().as_str()
    );

    if let Some(core) = core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            return Err(format!("cannot pin to core {core}"));
        }
    }
    let stats = WorkerStats::default();
    let started = Instant::now();
    while seconds.is_none_or(|s| started.elapsed() < s) {
        forward_burst(&mut in_port, &mut out_port, to_outside, Side::Outside, &stats);
        forward_burst(&mut out_port, &mut in_port, to_inside, Side::Inside, &stats);
        for port in [&mut in_port, &mut out_port] {
            port.reap_completions();
            port.refill();
        }
    }
    eprintln!(
        "bare_forwarder: rx inside {} outside {}, tx inside {} outside {}, tx ring full {}",
        stats.rx(Side::Inside).packets.get(),
        stats.rx(Side::Outside).packets.get(),
        stats.tx(Side::Inside).packets.get(),
        stats.tx(Side::Outside).packets.get(),
        stats.drops(dataplane::drop::DropReason::TxRingFull),
    );
    Ok(())
}
