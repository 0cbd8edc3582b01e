// SPDX-License-Identifier: GPL-2.0
// egressd's XDP program: decides per frame whether the kernel or egressd (AF_XDP) gets it.
//
// The same program is loaded once per interface (inside and outside); maps configure it:
//   - non-IPv4 (ARP, IPv6/ND, LLDP, ...)          -> XDP_PASS: the node keeps neighbour resolution.
//   - IPv4 multicast or limited broadcast          -> XDP_PASS.
//   - IPv4 to one of the node's own addresses      -> XDP_PASS (ssh, DNS replies, the admin port, ...).
//     `local_addrs` holds them, filled by egressd at start from the kernel's interface addresses EXCLUDING the
//     egress IPs: traffic to an egress IP is egressd's (NAT replies).
//   - everything else                              -> the AF_XDP socket of this rx queue (`xsks`), or
//     XDP_PASS when no socket is bound to that queue.
// Written without libbpf headers so only linux-libc-dev and clang are needed.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_redirect_map)(void *map, __u64 key, __u64 flags) = (void *)BPF_FUNC_redirect_map;

struct {
    __uint(type, BPF_MAP_TYPE_XSKMAP);
    __uint(max_entries, 64);
    __type(key, __u32);
    __type(value, __u32);
} xsks SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, __u32);   // IPv4 address, network byte order
    __type(value, __u8);
} local_addrs SEC(".maps");

#define ETH_P_8021Q_BE 0x0081   // htons(0x8100) on little-endian
#define ETH_P_8021AD_BE 0xa888  // htons(0x88a8)
#define ETH_P_IP_BE 0x0008      // htons(0x0800)

SEC("xdp")
int egressd_xdp(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return XDP_PASS;
    __u16 proto = eth->h_proto;
    void *l3 = eth + 1;
    if (proto == ETH_P_8021Q_BE || proto == ETH_P_8021AD_BE) {
        if (l3 + 4 > data_end)
            return XDP_PASS;
        proto = *(__u16 *)(l3 + 2);
        l3 += 4;
    }
    if (proto != ETH_P_IP_BE)
        return XDP_PASS;
    struct iphdr *ip = l3;
    if ((void *)(ip + 1) > data_end)
        // Truncated IPv4: egressd drops it under a counted reason.
        return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
    __u32 daddr = ip->daddr;
    __u8 first_octet = daddr & 0xff;
    if ((first_octet & 0xf0) == 0xe0 || daddr == 0xffffffff)
        return XDP_PASS;
    if (bpf_map_lookup_elem(&local_addrs, &daddr))
        return XDP_PASS;
    return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
}

char _license[] SEC("license") = "GPL";
