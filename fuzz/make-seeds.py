#!/usr/bin/env python3
"""Writes the committed seed corpora (fuzz/seeds/TARGET/): example configurations, real ClientHellos made by
Python's TLS stack, HTTP request heads, and deterministic pseudo-random bytes for the structured targets
(whose inputs `arbitrary` reads as operations). Run from anywhere; rerunning rewrites the same files."""
import glob
import os
import random
import shutil
import ssl

here = os.path.dirname(os.path.abspath(__file__))
seeds = os.path.join(here, "seeds")


def put(target, name, data):
    d = os.path.join(seeds, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


for path in sorted(glob.glob(os.path.join(here, "..", "conf", "*.toml"))):
    with open(path, "rb") as f:
        put("config", os.path.basename(path), f.read())


def client_hello(name, alpn):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


for i, (name, alpn) in enumerate(
    [("api.stripe.com", ["h2", "http/1.1"]), ("a.b.paypal.com", []), ("httpbin.test", ["http/1.1"])]
):
    hello = client_hello(name, alpn)
    put("tls_client_hello", f"hello-{i}", hello)
    # The same handshake message cut into records of 100 bytes (split hellos are normal traffic).
    message, out = hello[5:], b""
    for at in range(0, len(message), 100):
        chunk = message[at : at + 100]
        out += bytes([22, 3, 1]) + len(chunk).to_bytes(2, "big") + chunk
    put("tls_client_hello", f"hello-{i}-split", out)

heads = [
    b"GET /status/200 HTTP/1.1\r\nHost: httpbin.test\r\n\r\n",
    b"POST /anything HTTP/1.1\r\nHost: httpbin.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET http://httpbin.test/admin HTTP/1.1\r\nHost: httpbin.test\r\nContent-Length: 0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
    b"GET / HTTP/1.0\r\nHost: a\r\n folded: header\r\n\r\n",
]
for i, head in enumerate(heads):
    put("http_head", f"head-{i}", bytes([7]) + head)

# http_response: byte 0 = split point, byte 1 = requests (bit i set: the i-th of 4 is HEAD), then responses.
responses = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 503 x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nHTTP/1.1 200 OK\r\n\r\nuntil the close",
]
for i, response in enumerate(responses):
    put("http_response", f"response-{i}", bytes([20, 0b0100 if i == 2 else 0]) + response)

rng = random.Random(20261206)
for target in ["pipeline", "nat_icmp_errors"]:
    for i in range(8):
        put(target, f"random-{i}", bytes(rng.randrange(256) for _ in range(rng.choice([64, 256, 1024, 4096]))))
print("seeds written to", seeds)
