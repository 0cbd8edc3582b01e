// SPDX-License-Identifier: GPL-2.0
// Traffic generator program for the kernel's XDP "live frames" test-run mode (see udpgen.c).
//
// Each run rewrites the whole 42-byte Ethernet/IPv4/UDP header from a template (a forwarder downstream may have
// edited the recycled frame in place: TTL, MACs), sets the UDP source port to base + (seq & mask), and returns
// XDP_TX: in live mode the kernel turns that into a redirect out of ctx->ingress_ifindex (cl0), whose veth peer
// receives it. UDP checksum is 0 (allowed for IPv4), the IPv4 header checksum is part of the template.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define HDR_LEN 42

struct gen_cfg {
    __u8 hdr[HDR_LEN];
    __u16 sport_base;
    __u32 sport_mask;
    __u32 pad;
    __u64 seq;
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct gen_cfg);
} cfg SEC(".maps");

SEC("xdp")
int udpgen(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 key = 0;
    if (data + HDR_LEN > data_end)
        return XDP_ABORTED;
    struct gen_cfg *c = bpf_map_lookup_elem(&cfg, &key);
    if (!c)
        return XDP_ABORTED;
    __u64 seq = c->seq++;
    __builtin_memcpy(data, c->hdr, HDR_LEN);
    __u16 sport = c->sport_base + (__u16)(seq & c->sport_mask);
    *(__u16 *)(data + 34) = bpf_htons(sport);
    return XDP_TX;
}

char _license[] SEC("license") = "GPL";
