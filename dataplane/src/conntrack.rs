//! Per-worker flow table: TCP/UDP/ICMP state, timers with RFC defaults, expiry without a stop-the-world sweep. (Issue 5.)
