"""Raw Ethernet frames for the lab tests (AF_PACKET): send crafted frames, capture what arrives.

  frames.py send IFACE HEX [HEX ...]      send each frame (hex) out of IFACE, in order
  frames.py capture IFACE SECONDS         print "ready", then every frame IFACE receives (not the ones it sends)
                                          for SECONDS, one hex line each, then "done"
"""
import errno
import socket
import sys
import time

PACKET_OUTGOING = 4


def send(iface, frames):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    for f in frames:
        data = bytes.fromhex(f)
        while True:
            try:
                s.send(data)
                break
            except OSError as e:
                # A burst can fill the device queue: wait for it to drain, never drop a frame of the test.
                if e.errno != errno.ENOBUFS:
                    raise
                time.sleep(0.001)


def capture(iface, seconds):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    s.bind((iface, 0))
    s.settimeout(0.05)
    print("ready", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data, addr = s.recvfrom(65535)
        except socket.timeout:
            continue
        if addr[2] != PACKET_OUTGOING:
            print(data.hex(), flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "capture":
        capture(sys.argv[2], float(sys.argv[3]))
    else:
        sys.exit("usage: frames.py send IFACE HEX... | capture IFACE SECONDS")
