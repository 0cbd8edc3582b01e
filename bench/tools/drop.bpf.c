// SPDX-License-Identifier: GPL-2.0
// The server-side sink: XDP_DROP every IPv4 frame, pass the rest (ARP keeps resolving). bench-compare counts
// what arrives with the interface's rx_packets; a veth peer needs an XDP program to receive XDP_REDIRECTed
// frames anyway, and dropping here keeps the server namespace from spending the shared CPUs on the flood.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

SEC("xdp")
int xdp_drop_ipv4(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return XDP_PASS;
    return XDP_DROP;
}

char _license[] SEC("license") = "GPL";
