// SPDX-License-Identifier: Apache-2.0
// xdpbench: the traffic tools of scripts/bench-compare, one small binary over libbpf.
//
//   xdpbench gen DEV DST_MAC SRC_IP DST_IP DPORT NPORTS SECONDS
//       Offers 64-byte IPv4/UDP frames out of DEV as fast as one core can, with the kernel's XDP "live frames"
//       test-run mode (BPF_PROG_TEST_RUN + BPF_F_TEST_XDP_LIVE_FRAMES): gen.bpf.o rewrites the header per frame,
//       varies the UDP source port over NPORTS values (power of two) and returns XDP_TX, which the kernel turns
//       into a transmit on DEV. Runs in chunks until SECONDS have passed; prints "sent N seconds S pps R".
//   xdpbench redirect IN OUT DST_MAC        attach redirect.bpf.o to IN: IPv4 frames leave by OUT to DST_MAC
//   xdpbench drop DEV                       attach drop.bpf.o to DEV (IPv4 dropped, the rest passed)
//   xdpbench echo ADDR PORT                 UDP echo server (one socket, no fork: the lab's socat forks)
//   xdpbench ping ADDR PORT COUNT HZ        UDP ping-pong, prints "sent N lost L p50_us P p99_us Q max_us M"
//
// Programs are attached with bpf_xdp_attach (netlink, native mode) and outlive this process; detach them with
// `ip link set dev DEV xdp off`. The .bpf.o objects are looked up next to this binary.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <errno.h>
#include <libgen.h>
#include <linux/bpf.h>
#include <linux/if_link.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HDR_LEN 42
#define FRAME_LEN 64

struct gen_cfg {
    uint8_t hdr[HDR_LEN];
    uint16_t sport_base;
    uint32_t sport_mask;
    uint32_t pad;
    uint64_t seq;
};

static char obj_dir[4096];

static void die(const char *what)
{
    fprintf(stderr, "xdpbench: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void usage(void)
{
    fprintf(stderr, "usage: xdpbench gen|redirect|drop|echo|ping ... (see the header of xdpbench.c)\n");
    exit(2);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void parse_mac(const char *s, uint8_t mac[6])
{
    if (sscanf(s, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4], &mac[5]) != 6) {
        fprintf(stderr, "xdpbench: bad MAC %s\n", s);
        exit(2);
    }
}

static void dev_mac(const char *dev, uint8_t mac[6])
{
    struct ifreq ifr = {0};
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0)
        die("socket");
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", dev);
    if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0)
        die(dev);
    memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
    close(fd);
}

static unsigned ifindex_of(const char *dev)
{
    unsigned i = if_nametoindex(dev);
    if (!i)
        die(dev);
    return i;
}

static struct bpf_object *open_obj(const char *name)
{
    char path[8192];
    snprintf(path, sizeof(path), "%s/%s", obj_dir, name);
    struct bpf_object *obj = bpf_object__open_file(path, NULL);
    if (!obj)
        die(path);
    if (bpf_object__load(obj))
        die("loading BPF object");
    return obj;
}

static int first_prog_fd(struct bpf_object *obj)
{
    struct bpf_program *prog = bpf_object__next_program(obj, NULL);
    if (!prog)
        die("no program in object");
    return bpf_program__fd(prog);
}

static void attach(const char *dev, int prog_fd)
{
    int err = bpf_xdp_attach(ifindex_of(dev), prog_fd, XDP_FLAGS_DRV_MODE, NULL);
    if (err) {
        errno = -err;
        die("attaching XDP (native mode)");
    }
}

static uint16_t ip_checksum(const uint8_t *hdr)
{
    uint32_t sum = 0;
    for (int i = 0; i < 20; i += 2)
        sum += (hdr[i] << 8) | hdr[i + 1];
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return ~sum & 0xffff;
}

static int cmd_gen(int argc, char **argv)
{
    if (argc != 9)
        usage();
    const char *dev = argv[2];
    uint8_t src_mac[6], dst_mac[6];
    parse_mac(argv[3], dst_mac);
    dev_mac(dev, src_mac);
    struct in_addr saddr, daddr;
    if (!inet_aton(argv[4], &saddr) || !inet_aton(argv[5], &daddr))
        usage();
    uint16_t dport = atoi(argv[6]);
    uint32_t nports = atoi(argv[7]);
    double seconds = atof(argv[8]);
    if (nports == 0 || (nports & (nports - 1)) || nports > 32768) {
        fprintf(stderr, "xdpbench: NPORTS must be a power of two <= 32768\n");
        return 2;
    }

    struct gen_cfg cfg = {0};
    uint8_t *h = cfg.hdr;
    memcpy(h, dst_mac, 6);
    memcpy(h + 6, src_mac, 6);
    h[12] = 0x08, h[13] = 0x00;
    uint8_t *ip = h + 14;
    ip[0] = 0x45;
    ip[2] = 0, ip[3] = FRAME_LEN - 14;  // total length: the frame carries no padding
    ip[6] = 0x40;                        // DF
    ip[8] = 64, ip[9] = IPPROTO_UDP;
    memcpy(ip + 12, &saddr, 4);
    memcpy(ip + 16, &daddr, 4);
    uint16_t c = ip_checksum(ip);
    ip[10] = c >> 8, ip[11] = c & 0xff;
    uint8_t *udp = ip + 20;
    udp[2] = dport >> 8, udp[3] = dport & 0xff;
    udp[4] = 0, udp[5] = FRAME_LEN - 34;  // UDP length; checksum 0
    cfg.sport_base = 1024;
    cfg.sport_mask = nports - 1;

    struct bpf_object *obj = open_obj("gen.bpf.o");
    int prog_fd = first_prog_fd(obj);
    int map_fd = bpf_object__find_map_fd_by_name(obj, "cfg");
    uint32_t key = 0;
    if (map_fd < 0 || bpf_map_update_elem(map_fd, &key, &cfg, 0))
        die("configuring the generator");

    uint8_t frame[FRAME_LEN] = {0};
    memcpy(frame, cfg.hdr, HDR_LEN);
    memset(frame + HDR_LEN, 0x5a, FRAME_LEN - HDR_LEN);
    struct xdp_md ctx = {.data_end = FRAME_LEN, .ingress_ifindex = ifindex_of(dev), .rx_queue_index = 0};
    LIBBPF_OPTS(bpf_test_run_opts, opts, .data_in = frame, .data_size_in = FRAME_LEN, .ctx_in = &ctx,
                .ctx_size_in = sizeof(ctx), .flags = BPF_F_TEST_XDP_LIVE_FRAMES, .repeat = 1 << 20,
                .batch_size = 64);
    uint64_t sent = 0;
    double start = now_s(), elapsed;
    do {
        if (bpf_prog_test_run_opts(prog_fd, &opts))
            die("BPF_PROG_TEST_RUN (live frames)");
        sent += opts.repeat;
        elapsed = now_s() - start;
    } while (elapsed < seconds);
    printf("sent %llu seconds %.3f pps %.0f\n", (unsigned long long)sent, elapsed, sent / elapsed);
    bpf_object__close(obj);
    return 0;
}

static int cmd_redirect(int argc, char **argv)
{
    if (argc != 5)
        usage();
    struct {
        uint8_t dst[6];
        uint8_t src[6];
    } macs;
    parse_mac(argv[4], macs.dst);
    dev_mac(argv[3], macs.src);
    struct bpf_object *obj = open_obj("redirect.bpf.o");
    uint32_t key = 0, out = ifindex_of(argv[3]);
    if (bpf_map_update_elem(bpf_object__find_map_fd_by_name(obj, "tx_port"), &key, &out, 0))
        die("tx_port");
    if (bpf_map_update_elem(bpf_object__find_map_fd_by_name(obj, "macs"), &key, &macs, 0))
        die("macs");
    attach(argv[2], first_prog_fd(obj));
    return 0;
}

static int cmd_drop(int argc, char **argv)
{
    if (argc != 3)
        usage();
    attach(argv[2], first_prog_fd(open_obj("drop.bpf.o")));
    return 0;
}

static int udp_socket(const char *addr, int port, int bind_it, struct sockaddr_in *sa)
{
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0)
        die("socket");
    memset(sa, 0, sizeof(*sa));
    sa->sin_family = AF_INET;
    sa->sin_port = htons(port);
    if (!inet_aton(addr, &sa->sin_addr))
        usage();
    if (bind_it && bind(fd, (struct sockaddr *)sa, sizeof(*sa)))
        die("bind");
    return fd;
}

static int cmd_echo(int argc, char **argv)
{
    if (argc != 4)
        usage();
    struct sockaddr_in sa, peer;
    int fd = udp_socket(argv[2], atoi(argv[3]), 1, &sa);
    char buf[2048];
    for (;;) {
        socklen_t len = sizeof(peer);
        ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &len);
        if (n >= 0)
            sendto(fd, buf, n, 0, (struct sockaddr *)&peer, len);
    }
    return 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int cmd_ping(int argc, char **argv)
{
    if (argc != 6)
        usage();
    struct sockaddr_in sa;
    int fd = udp_socket(argv[2], atoi(argv[3]), 0, &sa);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
        die("connect");
    int count = atoi(argv[4]);
    double interval = 1.0 / atof(argv[5]);
    double *rtt = calloc(count, sizeof(double));
    int got = 0;
    for (int i = 0; i < count; i++) {
        uint64_t seq = i;
        double t0 = now_s();
        send(fd, &seq, sizeof(seq), 0);
        double deadline = t0 + 0.1;
        for (;;) {
            double left = deadline - now_s();
            if (left <= 0)
                break;
            struct pollfd p = {.fd = fd, .events = POLLIN};
            if (poll(&p, 1, (int)(left * 1000) + 1) <= 0)
                continue;
            uint64_t back;
            if (recv(fd, &back, sizeof(back), 0) == sizeof(back) && back == seq) {
                rtt[got++] = (now_s() - t0) * 1e6;
                break;
            }
        }
        double left = t0 + interval - now_s();
        if (left > 0) {
            struct timespec ts = {.tv_sec = (time_t)left, .tv_nsec = (long)((left - (time_t)left) * 1e9)};
            nanosleep(&ts, NULL);
        }
    }
    if (got == 0) {
        printf("sent %d lost %d p50_us nan p99_us nan max_us nan\n", count, count);
        return 1;
    }
    qsort(rtt, got, sizeof(double), cmp_double);
    printf("sent %d lost %d p50_us %.1f p99_us %.1f max_us %.1f\n", count, count - got, rtt[got / 2],
           rtt[(int)(got * 0.99) < got ? (int)(got * 0.99) : got - 1], rtt[got - 1]);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n < 0)
        die("readlink /proc/self/exe");
    self[n] = 0;
    snprintf(obj_dir, sizeof(obj_dir), "%s", dirname(self));
    libbpf_set_strict_mode(LIBBPF_STRICT_ALL);
    if (!strcmp(argv[1], "gen"))
        return cmd_gen(argc, argv);
    if (!strcmp(argv[1], "redirect"))
        return cmd_redirect(argc, argv);
    if (!strcmp(argv[1], "drop"))
        return cmd_drop(argc, argv);
    if (!strcmp(argv[1], "echo"))
        return cmd_echo(argc, argv);
    if (!strcmp(argv[1], "ping"))
        return cmd_ping(argc, argv);
    usage();
    return 2;
}
