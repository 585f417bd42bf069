#!/usr/bin/env python3
"""Checks one recorded capture against its applications' records and writes the fixture.

Used by scripts/record-fixtures. Reads the capture with tshark (an independent
dissector, not our code) and requires that:
  * it holds exactly one TCP connection, handshake included;
  * tshark's reassembly of each direction equals what the applications recorded;
  * the SYN/SYN-ACK options agree with the kernel's TCP_INFO on both ends;
  * the scenario's point really is in it (losses both ways, zero-window probes,
    a RST with data left behind, sequence numbers that wrap, ...).
Then writes DIR/NAME.{c2s,s2c,json} (the capture is copied by the caller).

Exit status 0: fixture written; 3: this recording missed the scenario's point
(worth another try, e.g. random loss hit nothing); anything else: a real error.

  fixture_check.py --name N --work PREFIX --capture FILE --out DIR --loss P
                   --state STATE --about TEXT [--expect K=V ...]
"""

import argparse
import json
import os
import platform
import subprocess
import sys

RETRY = 3


class Miss(Exception):
    """The recording is fine but lacks what the fixture is for."""


def tshark(*args):
    return subprocess.run(["tshark", *args], check=True, capture_output=True, text=True).stdout


def count(cap, flt):
    out = tshark("-r", cap, "-Y", flt, "-T", "fields", "-e", "frame.number")
    return len(out.split())


def load(prefix, side):
    with open(f"{prefix}.{side}.json") as f:
        info = json.load(f)
    with open(f"{prefix}.{side}.sent", "rb") as f:
        sent = f.read()
    with open(f"{prefix}.{side}.recv", "rb") as f:
        recv = f.read()
    return info, sent, recv


def segments(cap):
    fields = ["frame.number", "ip.src", "tcp.srcport", "ip.dst", "tcp.dstport", "tcp.flags",
              "tcp.seq_raw", "tcp.ack_raw", "tcp.len", "tcp.window_size_value",
              "tcp.option_kind", "tcp.options.mss_val", "tcp.options.wscale.shift"]
    args = ["-r", cap, "-Y", "tcp", "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=,"]
    for f in fields:
        args += ["-e", f]
    segs = []
    for line in tshark(*args).splitlines():
        v = line.split("\t")
        segs.append({
            "src": f"{v[1]}:{v[2]}", "dst": f"{v[3]}:{v[4]}", "flags": int(v[5], 16),
            "seq": int(v[6]), "ack": int(v[7]), "len": int(v[8]), "win": int(v[9]),
            "kinds": [int(k) for k in v[10].split(",") if k],
            "mss": int(v[11]) if v[11] else None,
            "wscale": int(v[12]) if v[12] else None,
        })
    return segs


def follow(cap):
    """tshark's reassembly of stream 0: (bytes from node 0, bytes from node 1, node0, node1)."""
    out = tshark("-r", cap, "-q", "-z", "follow,tcp,raw,0")
    a, b, nodes = [], [], {}
    for line in out.splitlines():
        if line.startswith("Node "):
            k, v = line.split(": ", 1)
            nodes[k] = v
        elif line.startswith("\t") and line.strip():
            b.append(line.strip())
        elif line and all(c in "0123456789abcdef" for c in line):
            a.append(line)
    return bytes.fromhex("".join(a)), bytes.fromhex("".join(b)), nodes.get("Node 0"), nodes.get("Node 1")


SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04


def zero_window_probes(segs, client, server):
    """Server segments that probe a closed client window. Linux probes with a bare
    ACK at snd_una - 1 (tshark calls those keep-alives; it only knows 1-byte probes)."""
    n, ack, win = 0, None, None
    for s in segs:
        if s["src"] == client and s["flags"] & ACK:
            ack, win = s["ack"], s["win"]
        elif (s["src"] == server and win == 0 and ack is not None and s["len"] <= 1
              and not s["flags"] & (SYN | FIN | RST) and s["seq"] == (ack - 1) % 2**32):
            n += 1
    return n


def side_options(syn):
    return {
        "mss": syn["mss"],
        "wscale": syn["wscale"],
        "sack_permitted": 4 in syn["kinds"],
        "timestamps": 8 in syn["kinds"],
    }


def check(a):
    cap = a.capture
    expect = dict(kv.split("=", 1) for kv in a.expect)
    cinfo, csent, crecv = load(a.work, "client")
    sinfo, ssent, srecv = load(a.work, "server")
    client, server = cinfo["local"], sinfo["local"]
    if cinfo["peer"] != server or sinfo["peer"] != client:
        raise SystemExit(f"apps disagree on the connection: {cinfo} / {sinfo}")

    segs = segments(cap)
    tuples = {frozenset((s["src"], s["dst"])) for s in segs}
    if tuples != {frozenset((client, server))}:
        raise SystemExit(f"capture holds other TCP traffic: {tuples}")
    c2s = [s for s in segs if s["src"] == client]
    s2c = [s for s in segs if s["src"] == server]
    syns = [s for s in c2s if s["flags"] & (SYN | ACK) == SYN]
    synacks = [s for s in s2c if s["flags"] & (SYN | ACK) == SYN | ACK]
    if not syns or not synacks:
        raise SystemExit("handshake missing from the capture")
    if len({s["seq"] for s in syns}) != 1 or len({s["seq"] for s in synacks}) != 1:
        raise SystemExit("SYNs with different ISNs")
    syn, synack = syns[0], synacks[0]
    copt, sopt = side_options(syn), side_options(synack)

    # The kernel's own view must agree with the options on the wire.
    for info, mine, peer in ((cinfo, copt, sopt), (sinfo, sopt, copt)):
        ti = info["tcp_info"]
        both_ws = mine["wscale"] is not None and peer["wscale"] is not None
        if ti["timestamps"] != (mine["timestamps"] and peer["timestamps"]):
            raise SystemExit(f"{info['side']}: TCP_INFO timestamps {ti['timestamps']} vs capture")
        if ti["sack"] != (mine["sack_permitted"] and peer["sack_permitted"]):
            raise SystemExit(f"{info['side']}: TCP_INFO sack {ti['sack']} vs capture")
        if ti["wscale"] != both_ws:
            raise SystemExit(f"{info['side']}: TCP_INFO wscale {ti['wscale']} vs capture")
        if both_ws and (ti["rcv_wscale"], ti["snd_wscale"]) != (mine["wscale"], peer["wscale"]):
            raise SystemExit(f"{info['side']}: TCP_INFO wscales {ti} vs capture")
        ts_len = 12 if ti["timestamps"] else 0
        if ti["advmss"] + ts_len != mine["mss"]:
            raise SystemExit(f"{info['side']}: advmss {ti['advmss']} vs MSS option {mine['mss']}")

    # What the applications sent and received.
    if srecv != csent:
        raise SystemExit("server received something else than the client sent")
    if a.name_scenario == "reset":
        if not ssent.startswith(crecv) or len(crecv) >= len(ssent):
            raise SystemExit("reset: the client should get a strict prefix of what the server wrote")
    elif crecv != ssent:
        raise SystemExit("client received something else than the server sent")

    # An independent reassembly of the capture must give the same bytes.
    f0, f1, n0, n1 = follow(cap)
    got = {n0: f0, n1: f1}
    if got.get(client) != srecv or got.get(server) != crecv:
        raise SystemExit(
            f"tshark's reassembly differs from the apps' records: c2s {len(got.get(client, b''))} "
            f"vs {len(srecv)}, s2c {len(got.get(server, b''))} vs {len(crecv)}")

    rst_from = [n for n, d in (("client", c2s), ("server", s2c)) if any(s["flags"] & RST for s in d)]
    fin_from = [n for n, d in (("client", c2s), ("server", s2c)) if any(s["flags"] & FIN for s in d)]
    obs = {
        "packets": len(tshark("-r", cap, "-T", "fields", "-e", "frame.number").split()),
        "tcp_segments": len(segs),
        "retransmissions_c2s": count(cap, f"tcp.analysis.retransmission && ip.src=={client.split(':')[0]}"),
        "retransmissions_s2c": count(cap, f"tcp.analysis.retransmission && ip.src=={server.split(':')[0]}"),
        "sack_blocks_seen": count(cap, "tcp.options.sack_le"),
        "zero_window_adverts": count(cap, "tcp.analysis.zero_window"),
        "zero_window_probes": zero_window_probes(segs, client, server),
        "client_total_retrans": cinfo["tcp_info"]["total_retrans"],
        "server_total_retrans": sinfo["tcp_info"]["total_retrans"],
    }

    # The scenario's point.
    if a.loss > 0 and (obs["retransmissions_c2s"] == 0 or obs["retransmissions_s2c"] == 0):
        raise Miss(f"loss hit too little: {obs}")
    if expect.get("zero_window_probes") == "yes" and obs["zero_window_probes"] == 0:
        raise Miss(f"no zero-window probe: {obs}")
    if "rst_from" in expect and rst_from != [expect["rst_from"]]:
        raise SystemExit(f"RST from {rst_from}, expected {expect['rst_from']}")
    if "rst_from" not in expect and rst_from:
        raise SystemExit(f"unexpected RST from {rst_from}")
    if a.name_scenario == "reset":
        obs["server_app_wrote"] = len(ssent)
        obs["server_pending_at_close"] = sinfo["pending_at_close"]
        if sinfo["pending_at_close"] <= 0:
            raise Miss("nothing was pending when the server reset")
    if "client_isn" in expect and syn["seq"] != int(expect["client_isn"], 0):
        raise SystemExit(f"client ISN {syn['seq']:#x}, expected {expect['client_isn']}")
    if "server_isn_below_wrap_max" in expect:
        lo, hi = 1000, int(expect["server_isn_below_wrap_max"])
        if not lo <= 2**32 - synack["seq"] <= hi:
            raise Miss(f"server ISN {synack['seq']:#x} is not within {hi} below 2^32")
    if expect.get("client_wraps") == "yes" and syn["seq"] + 1 + len(csent) < 2**32:
        raise SystemExit("client sequence numbers do not wrap")
    if not fin_from and not rst_from:
        raise SystemExit("connection did not end in the capture")
    # The last FIN must be acknowledged in the capture, or the capture was cut short.
    if not rst_from:
        for who, d, other in (("client", c2s, s2c), ("server", s2c, c2s)):
            fin = max((s for s in d if s["flags"] & FIN), key=lambda s: s["seq"], default=None)
            if fin is None:
                continue
            end = (fin["seq"] + fin["len"] + 1) % 2**32
            if not any(s["flags"] & ACK and s["ack"] == end for s in other):
                raise SystemExit(f"the {who}'s FIN is not acknowledged in the capture")

    fixture = {
        "name": a.name,
        "about": a.about,
        "capture": {
            "file": os.path.basename(a.capture_name),
            "format": a.format,
            "linktype": a.linktype,
            "where": a.where,
            "tool": a.tool,
        },
        "kernel": platform.release(),
        "loss": a.loss,
        "client": {"addr": client, "isn": syn["seq"], **copt},
        "server": {"addr": server, "isn": synack["seq"], **sopt},
        "handshake_seen": True,
        "state": a.state,
        "reset": bool(rst_from),
        "rst_from": rst_from[0] if rst_from else None,
        "fin_from": fin_from,
        "bytes_c2s": len(srecv),
        "bytes_s2c": len(crecv),
        "c2s": f"{a.name}.c2s",
        "s2c": f"{a.name}.s2c",
        "observed": obs,
    }
    with open(os.path.join(a.out, f"{a.name}.c2s"), "wb") as f:
        f.write(srecv)
    with open(os.path.join(a.out, f"{a.name}.s2c"), "wb") as f:
        f.write(crecv)
    with open(os.path.join(a.out, f"{a.name}.json"), "w") as f:
        json.dump(fixture, f, indent=2)
        f.write("\n")
    return fixture


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--scenario", dest="name_scenario", required=True)
    p.add_argument("--about", required=True)
    p.add_argument("--work", required=True, help="prefix of the apps' records")
    p.add_argument("--capture", required=True)
    p.add_argument("--capture-name", required=True, help="the capture's file name in the fixture")
    p.add_argument("--format", required=True)
    p.add_argument("--linktype", required=True)
    p.add_argument("--where", required=True)
    p.add_argument("--tool", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("--state", required=True)
    p.add_argument("--expect", action="append", default=[])
    a = p.parse_args()
    try:
        fx = check(a)
    except Miss as e:
        print(f"fixture_check: {a.name}: {e}", file=sys.stderr)
        sys.exit(RETRY)
    o = fx["observed"]
    print(f"{a.name}: client {fx['client']['addr']} isn {fx['client']['isn']:#010x}, "
          f"server {fx['server']['addr']} isn {fx['server']['isn']:#010x}, state {fx['state']}, "
          f"c2s {fx['bytes_c2s']} B, s2c {fx['bytes_s2c']} B, {o['packets']} packets, "
          f"retrans c2s/s2c {o['retransmissions_c2s']}/{o['retransmissions_s2c']}, "
          f"zero-window probes {o['zero_window_probes']}, rst {fx['rst_from']}")


if __name__ == "__main__":
    main()
