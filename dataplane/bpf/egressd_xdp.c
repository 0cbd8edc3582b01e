// SPDX-License-Identifier: GPL-2.0
// egressd's XDP program: decides per frame whether the kernel or egressd (AF_XDP) gets it.
//
// The same program is loaded once per interface (inside and outside); maps configure it:
//   - neither IPv4 nor IPv6 (ARP, LLDP, ...)       -> XDP_PASS: the node keeps neighbour resolution.
//   - IPv6 to a multicast or link-local address, to one of the node's own addresses (`local_addrs6`), or
//     neighbour discovery / router advertisement  -> XDP_PASS: the node's own IPv6 keeps working.
//   - any other IPv6 (transit)                     -> XDP_DROP, counted in `xdp_drops[DROP_IPV6_UNSUPPORTED]`:
//     egressd forwards IPv4 only, and transit IPv6 must not leave unfiltered through the kernel when the node
//     forwards IPv6 (default deny, failing closed).
//   - IPv4 multicast or limited broadcast          -> XDP_PASS.
//   - IPv4 to one of the node's own addresses      -> XDP_PASS (ssh, DNS replies, the admin port, ...).
//     `local_addrs` holds them, filled by egressd at start from the kernel's interface addresses EXCLUDING the
//     egress IPs: traffic to an egress IP is egressd's (NAT replies).
//   - TCP to an egress IP whose destination port is in that IP's `l7_upstream` range -> XDP_PASS: replies to
//     the L7 path's upstream connections, which are kernel sockets bound to the egress IP (the NAT never
//     allocates those ports).
//   - everything else                              -> the AF_XDP socket of this rx queue (`xsks`), or
//     XDP_PASS when no socket is bound to that queue.
// Written without libbpf headers so only linux-libc-dev and clang are needed.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmpv6.h>

#define SEC(name) __attribute__((section(name), used))
#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif
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

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, struct in6_addr);
    __type(value, __u8);
} local_addrs6 SEC(".maps");

// Egress IP (network byte order) -> the TCP ports (host order, inclusive) the L7 path's kernel sockets use on it.
struct port_range {
    __u16 first;
    __u16 last;
};
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, __u32);
    __type(value, struct port_range);
} l7_upstream SEC(".maps");

// Frames the program itself drops, by reason (per CPU; egressd sums them into egressd_drops_total).
#define DROP_IPV6_UNSUPPORTED 0
#define DROP_REASONS 1
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, DROP_REASONS);
    __type(key, __u32);
    __type(value, __u64);
} xdp_drops SEC(".maps");

static __always_inline int drop_counted(__u32 reason)
{
    __u64 *count = bpf_map_lookup_elem(&xdp_drops, &reason);
    if (count)
        *count += 1;
    return XDP_DROP;
}

// IPv6 frames: the node's own, link-scoped and neighbour-discovery traffic goes to the kernel; transit is dropped.
static __always_inline int ipv6_verdict(void *l3, void *data_end)
{
    struct ipv6hdr *ip6 = l3;
    if ((void *)(ip6 + 1) > data_end)
        return drop_counted(DROP_IPV6_UNSUPPORTED);
    __u8 first = ip6->daddr.in6_u.u6_addr8[0];
    __u8 second = ip6->daddr.in6_u.u6_addr8[1];
    if (first == 0xff)  // multicast (solicited-node, all-nodes, MLD, ...)
        return XDP_PASS;
    if (first == 0xfe && (second & 0xc0) == 0x80)  // fe80::/10 link-local
        return XDP_PASS;
    struct in6_addr daddr = ip6->daddr;
    if (bpf_map_lookup_elem(&local_addrs6, &daddr))
        return XDP_PASS;
    if (ip6->nexthdr == IPPROTO_ICMPV6) {
        struct icmp6hdr *icmp6 = (void *)(ip6 + 1);
        if ((void *)(icmp6 + 1) > data_end)
            return drop_counted(DROP_IPV6_UNSUPPORTED);
        __u8 type = icmp6->icmp6_type;
        // Router solicitation/advertisement, neighbour solicitation/advertisement, redirect (RFC 4861).
        if (type >= 133 && type <= 137)
            return XDP_PASS;
    }
    return drop_counted(DROP_IPV6_UNSUPPORTED);
}

#define ETH_P_8021Q_BE 0x0081   // htons(0x8100) on little-endian
#define ETH_P_8021AD_BE 0xa888  // htons(0x88a8)
#define ETH_P_IP_BE 0x0008      // htons(0x0800)
#define ETH_P_IPV6_BE 0xdd86    // htons(0x86dd)

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
    if (proto == ETH_P_IPV6_BE)
        return ipv6_verdict(l3, data_end);
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
    struct port_range *l7 = bpf_map_lookup_elem(&l7_upstream, &daddr);
    // TCP (6), not a later fragment (offset bits of frag_off, network order).
    if (l7 && ip->protocol == 6 && (ip->frag_off & 0xff1f) == 0) {
        __u32 ihl = (ip->ihl & 0xf) * 4;
        __u8 *tcp = (__u8 *)l3 + ihl;
        if (ihl >= 20 && (void *)(tcp + 4) <= data_end) {
            __u16 dport = ((__u16)tcp[2] << 8) | tcp[3];
            if (dport >= l7->first && dport <= l7->last)
                return XDP_PASS;
        }
    }
    return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
}

char _license[] SEC("license") = "GPL";
