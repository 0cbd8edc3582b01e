// SPDX-License-Identifier: GPL-2.0
// The ceiling: XDP redirect from the inside veth (gw-in) to the outside veth (gw-out) through a devmap, rewriting
// the MACs (the only per-packet work a forwarder cannot avoid). IPv4 only; everything else goes to the kernel, so
// ARP keeps working. Configured by bench-compare with bpftool: `tx_port[0]` = gw-out's ifindex, `macs[0]` = the
// new source (gw-out) and destination (ext0) MACs.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct macs {
    __u8 dst[6];
    __u8 src[6];
};

struct {
    __uint(type, BPF_MAP_TYPE_DEVMAP);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u32);
} tx_port SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct macs);
} macs SEC(".maps");

SEC("xdp")
int xdp_redirect_ceiling(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    __u32 key = 0;
    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return XDP_PASS;
    struct macs *m = bpf_map_lookup_elem(&macs, &key);
    if (!m)
        return XDP_PASS;
    __builtin_memcpy(eth->h_dest, m->dst, 6);
    __builtin_memcpy(eth->h_source, m->src, 6);
    return bpf_redirect_map(&tx_port, 0, 0);
}

char _license[] SEC("license") = "GPL";
