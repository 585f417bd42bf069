#!/usr/bin/env python3
"""Client and server programs that make the traffic of scripts/record-fixtures.

Each side writes what its application sent and received (OUT.SIDE.sent,
OUT.SIDE.recv) and what its kernel said about the connection (OUT.SIDE.json,
from TCP_INFO). Those are the expected streams and options of a fixture; the
capture only has to agree with them.

  fixture_app.py server --scenario S --listen IP:PORT --out PREFIX
  fixture_app.py client --scenario S --connect IP:PORT --bind IP:PORT --out PREFIX
                        [--isn N] [--at NS] [--rcvbuf N]
  fixture_app.py listen --listen IP:PORT          (holds a listener for `probe` until SIGTERM)
  fixture_app.py probe --connect IP:PORT --bind-ip IP --ports A-B --target-isn N
                       --lead-ms MS               (plans a connect time, see probe())

The server prints "ready" on stdout once it listens.
"""

import argparse
import fcntl
import json
import select
import socket
import struct
import termios
import threading
import time

TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2
TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}

# Bytes each side's application writes, per scenario.
SCENARIOS = {
    # Both directions at once; the server finishes first, so it closes first.
    "bulk": {"c2s": 120_000, "s2c": 120_000},
    "small": {"c2s": 40_000, "s2c": 40_000},
    # Client sends and shuts down writing; the server sends before and after.
    "halfclose": {"c2s": 20_000, "s2c": 60_000, "s2c_before_eof": 20_000},
    # The server fills its send buffer towards a client that does not read, then
    # closes with SO_LINGER 0: RST while data is pending.
    "reset": {"c2s": 3_000, "s2c": 400_000, "server_sndbuf": 32_768, "client_rcvbuf": 16_384},
    # A client with a tiny receive buffer that stops reading for a while.
    "tinywin": {"c2s": 100, "s2c": 30_000, "client_rcvbuf": 2_048, "pause_s": 1.2,
                "read_chunk": 1_000, "read_every_s": 0.03},
    # Like bulk, with more bytes so that sequence numbers near 2^32 wrap.
    "wrap": {"c2s": 100_000, "s2c": 150_000},
}


def pattern(tag, n):
    """n bytes of 32-byte records that name their own offset ("c2s 0000001234 ...\\n"),
    so a reassembly error shows where it happened."""
    out = bytearray()
    off = 0
    letters = b"abcdefghijklmnopqrstuvwxyz"
    while len(out) < n:
        k = (off // 32) % 26
        fill = (letters[k:] + letters[:k])[:16]
        out += b"%s %010d %s\n" % (tag, off, fill)
        off += 32
    return bytes(out[:n])


def addr(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


def tcp_info(sock):
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    u32 = lambda off: struct.unpack_from("I", raw, off)[0] if len(raw) >= off + 4 else None
    opts = raw[5]
    return {
        "state": TCP_STATES.get(raw[0], str(raw[0])),
        "timestamps": bool(opts & TCPI_OPT_TIMESTAMPS),
        "sack": bool(opts & TCPI_OPT_SACK),
        "wscale": bool(opts & TCPI_OPT_WSCALE),
        "snd_wscale": raw[6] & 0x0F,
        "rcv_wscale": raw[6] >> 4,
        "snd_mss": u32(16),
        "rcv_mss": u32(20),
        "advmss": u32(84),
        "total_retrans": u32(100),
        "notsent_bytes": u32(144),
        "snd_wnd": u32(228),
        "rcv_wnd": u32(232),
    }


def outq(sock):
    """Bytes in the send queue (unacknowledged + not yet sent)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def poll_until(cond, what, timeout=10.0, every=0.002):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(every)


def recv_all(sock, sink, limit=None, chunk=65536):
    """Reads until EOF (or `limit` bytes). Returns the error name that ended it, if any."""
    while limit is None or len(sink) < limit:
        want = chunk if limit is None else min(chunk, limit - len(sink))
        try:
            b = sock.recv(want)
        except ConnectionResetError:
            return "ECONNRESET"
        if not b:
            return None
        sink += b
    return None


class Side:
    def __init__(self, name, out):
        self.name, self.out = name, out
        self.sent = bytearray()
        self.recv = bytearray()
        self.info = {"side": name}

    def send(self, sock, data):
        sock.sendall(data)
        self.sent += data

    def finish(self):
        with open(f"{self.out}.{self.name}.sent", "wb") as f:
            f.write(self.sent)
        with open(f"{self.out}.{self.name}.recv", "wb") as f:
            f.write(self.recv)
        self.info["sent"] = len(self.sent)
        self.info["recv"] = len(self.recv)
        with open(f"{self.out}.{self.name}.json", "w") as f:
            json.dump(self.info, f, indent=1)


def run_server(a):
    sc = SCENARIOS[a.scenario]
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(addr(a.listen))
    lst.listen(1)
    print("ready", flush=True)
    sock, peer = lst.accept()
    lst.close()
    me = Side("server", a.out)
    me.info.update(local="%s:%d" % sock.getsockname(), peer="%s:%d" % peer)
    c2s_len, s2c = sc["c2s"], pattern(b"s2c", sc["s2c"])

    if a.scenario in ("bulk", "small", "wrap"):
        def sender():
            me.send(sock, s2c)
            sock.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=sender)
        t.start()
        me.info["recv_end"] = recv_all(sock, me.recv)
        t.join()
        me.info["tcp_info"] = tcp_info(sock)
        sock.close()
    elif a.scenario == "halfclose":
        before = sc["s2c_before_eof"]
        me.send(sock, s2c[:before])
        me.info["recv_end"] = recv_all(sock, me.recv)
        me.info["state_after_eof"] = tcp_info(sock)["state"]
        me.send(sock, s2c[before:])
        me.info["tcp_info"] = tcp_info(sock)
        sock.close()
    elif a.scenario == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sc["server_sndbuf"])
        me.info["recv_end"] = recv_all(sock, me.recv, limit=c2s_len)
        sock.setblocking(False)
        off = 0
        while off < len(s2c):
            try:
                n = sock.send(s2c[off:])
            except BlockingIOError:
                break
            me.sent += s2c[off:off + n]
            off += n
        # Wait until the client's window is closed, so the RST leaves data behind.
        poll_until(lambda: tcp_info(sock)["snd_wnd"] == 0, "client window to close")
        me.info["tcp_info"] = tcp_info(sock)
        me.info["pending_at_close"] = outq(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    elif a.scenario == "tinywin":
        me.info["recv_end"] = recv_all(sock, me.recv, limit=c2s_len)
        me.send(sock, s2c)
        sock.shutdown(socket.SHUT_WR)
        me.info["recv_end"] = recv_all(sock, me.recv)
        me.info["tcp_info"] = tcp_info(sock)
        sock.close()
    else:
        raise SystemExit(f"unknown scenario {a.scenario}")
    me.finish()


def client_socket(a, sc):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if a.rcvbuf or sc.get("client_rcvbuf"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, a.rcvbuf or sc["client_rcvbuf"])
    if a.isn is not None:
        # Linux keeps a nonzero write_seq at connect(): the SYN carries it as ISN.
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, struct.pack("I", a.isn))
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
    sock.bind(addr(a.bind))
    return sock


def run_client(a):
    sc = SCENARIOS[a.scenario]
    sock = client_socket(a, sc)
    me = Side("client", a.out)
    if a.at is not None:
        # Connect at a planned instant (see probe); a busy wait keeps it precise.
        if time.time_ns() > a.at - 100_000_000:
            raise SystemExit("client started too late for its planned connect time")
        while time.time_ns() < a.at - 2_000_000:
            time.sleep(0.001)
        while time.time_ns() < a.at:
            pass
    me.info["connect_at_ns"] = time.time_ns()
    sock.connect(addr(a.connect))
    me.info.update(local="%s:%d" % sock.getsockname(), peer="%s:%d" % sock.getpeername())
    c2s = pattern(b"c2s", sc["c2s"])

    if a.scenario in ("bulk", "small", "wrap"):
        t = threading.Thread(target=lambda: me.send(sock, c2s))
        t.start()
        me.info["recv_end"] = recv_all(sock, me.recv)
        t.join()
        me.info["tcp_info"] = tcp_info(sock)
        sock.close()
    elif a.scenario == "halfclose":
        me.send(sock, c2s)
        sock.shutdown(socket.SHUT_WR)
        me.info["recv_end"] = recv_all(sock, me.recv)
        me.info["tcp_info"] = tcp_info(sock)
        sock.close()
    elif a.scenario == "reset":
        me.send(sock, c2s)
        # Read nothing until the server's RST has arrived, then what was queued.
        poll_until(lambda: tcp_info(sock)["state"] == "CLOSE", "server RST", timeout=30)
        me.info["tcp_info"] = tcp_info(sock)
        me.info["recv_end"] = recv_all(sock, me.recv)
        sock.close()
    elif a.scenario == "tinywin":
        me.send(sock, c2s)
        poll_until(lambda: tcp_info(sock)["rcv_wnd"] == 0, "own window to close")
        # The slow reader: long enough for the server's zero-window probes.
        time.sleep(sc["pause_s"])
        while True:
            r, _, _ = select.select([sock], [], [], 10)
            if not r:
                raise SystemExit("no data for 10 s")
            b = sock.recv(sc["read_chunk"])
            if not b:
                break
            me.recv += b
            time.sleep(sc["read_every_s"])
        me.info["tcp_info"] = tcp_info(sock)
        sock.close()
    else:
        raise SystemExit(f"unknown scenario {a.scenario}")
    me.finish()


def run_listen(a):
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(addr(a.listen))
    lst.listen(128)
    print("ready", flush=True)
    # Accept (and hold) every probe, or the accept queue fills up with reset
    # connections and later SYNs go unanswered. Runs until the recorder ends us.
    held = []
    while True:
        held.append(lst.accept()[0])


def probe(a):
    """Plans a connect time at which the server will choose an ISN near a.target_isn.

    Linux's ISN is siphash(4-tuple) + (CLOCK_REALTIME ns >> 6) mod 2^32. One connection
    per source port measures the hash part (the server ISN, read back through TCP_REPAIR
    as rcv_nxt - 1), after which the connection is reset so no state stays behind. The
    port whose target instant comes soonest after lead_ms wins. Prints "PORT AT_NS".
    """
    lo, hi = (int(x) for x in a.ports.split("-"))
    best = None
    for port in range(lo, hi + 1):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((a.bind_ip, port))
        t0 = time.time_ns()
        s.connect(addr(a.connect))
        t1 = time.time_ns()
        if t1 - t0 > 2_000_000:  # a slow handshake blurs when the server chose its ISN
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            continue
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        rcv_nxt = struct.unpack("I", s.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0]
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        isn = (rcv_nxt - 1) % 2**32
        base = (isn - (((t0 + t1) // 2) >> 6)) % 2**32
        now = time.time_ns()
        ticks = (a.target_isn - base - (now >> 6)) % 2**32
        at = now + ticks * 64
        if at - now < a.lead_ms * 1_000_000:
            at += 2**32 * 64  # next lap; about 275 s later
        if best is None or at < best[1]:
            best = (port, at)
    if best is None:
        raise SystemExit("probe: every handshake was too slow to time")
    print(best[0], best[1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--scenario", required=True, choices=SCENARIOS)
    s.add_argument("--listen", required=True)
    s.add_argument("--out", required=True)
    c = sub.add_parser("client")
    c.add_argument("--scenario", required=True, choices=SCENARIOS)
    c.add_argument("--connect", required=True)
    c.add_argument("--bind", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--isn", type=lambda x: int(x, 0))
    c.add_argument("--at", type=int, help="CLOCK_REALTIME ns to connect at")
    c.add_argument("--rcvbuf", type=int)
    l = sub.add_parser("listen")
    l.add_argument("--listen", required=True)
    q = sub.add_parser("probe")
    q.add_argument("--connect", required=True)
    q.add_argument("--bind-ip", required=True)
    q.add_argument("--ports", required=True)
    q.add_argument("--target-isn", type=lambda x: int(x, 0), required=True)
    q.add_argument("--lead-ms", type=int, default=3000)
    a = p.parse_args()
    {"server": run_server, "client": run_client, "listen": run_listen, "probe": probe}[a.cmd](a)


if __name__ == "__main__":
    main()
