//! SNAT to fixed egress IPs: egress pools per group, paired pooling, endpoint-independent port allocation split per worker, in-place translation both ways including ICMP errors. (Issue 5.)
