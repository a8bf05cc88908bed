"""A userspace impairment bridge: delay, jitter (hence reordering) and duplication.

This kernel has no ``tc netem`` (sch_netem is not built), so the fault battery emulates
it: a middle host (network namespace) holds one end of each of two veth pairs, and this
program, run inside it, moves every Ethernet frame from one end to the other after a
delay of ``delay`` ± ``jitter`` seconds (uniform), sending a share of them twice
(``dup`` percent) and holding a share back longer (``reorder`` percent, an extra
``delay / 2``) so that later frames overtake them. Loss is not done here: nftables drops
packets on the end hosts (``Host.lossy``).

How: an ``AF_PACKET`` socket per device, with ``PACKET_VNET_HDR`` so each frame comes
with its virtio-net header (checksum offload state) and goes out with the same header;
the end hosts set ``gso_max_segs 1`` on their veths, so every frame is one MTU-sized
segment (nftables then drops real segments, and nothing needs segmenting here). Frames
the socket sees leaving its own device (``PACKET_OUTGOING``: what this program sent) are
ignored. Due frames wait in a heap, bounded to ``MAX_QUEUED`` (beyond that they are
dropped and counted). SIGTERM prints the counts as one JSON line and exits.

Run: ``ip netns exec MIDDLE python -m tests.faults.impair DEV_A DEV_B [options]``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import select
import signal
import socket
import sys
import time
from typing import Any

SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
ETH_P_ALL = 0x0003
MAX_QUEUED = 50_000
FRAME = 65536 + 64


def open_device(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.bind((name, ETH_P_ALL))
    sock.setblocking(False)
    return sock


class Bridge:
    def __init__(self, a: str, b: str, args: argparse.Namespace) -> None:
        self.socks = [open_device(a), open_device(b)]
        self.delay, self.jitter = args.delay, args.jitter
        self.dup, self.reorder = args.dup / 100.0, args.reorder / 100.0
        self.rng = random.Random(args.seed)
        self.queue: list[tuple[float, int, int, bytes]] = []
        self.seq = 0
        self.sent_seq = [-1, -1]  # per direction: the last arrival number sent
        self.stats = {"frames": 0, "sent": 0, "duplicated": 0, "held_back": 0,
                      "reordered": 0, "overflow": 0, "send_errors": 0}
        self.stop = False

    def _schedule(self, out: int, frame: bytes, extra: float = 0.0) -> None:
        if len(self.queue) >= MAX_QUEUED:
            self.stats["overflow"] += 1
            return
        wait = self.delay + self.rng.uniform(-self.jitter, self.jitter) + extra
        heapq.heappush(self.queue, (time.monotonic() + max(0.0, wait), self.seq, out, frame))

    def _receive(self, index: int) -> None:
        sock = self.socks[index]
        for _ in range(256):
            try:
                frame, addr = sock.recvfrom(FRAME)
            except BlockingIOError:
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            self.stats["frames"] += 1
            self.seq += 1
            out = 1 - index
            extra = 0.0
            if self.rng.random() < self.reorder:
                extra = self.delay / 2
                self.stats["held_back"] += 1
            self._schedule(out, frame, extra)
            if self.rng.random() < self.dup:
                self.stats["duplicated"] += 1
                self._schedule(out, frame, extra)

    def _send_due(self) -> float | None:
        now = time.monotonic()
        while self.queue and self.queue[0][0] <= now:
            _, seq, out, frame = heapq.heappop(self.queue)
            if seq < self.sent_seq[out]:
                self.stats["reordered"] += 1
            self.sent_seq[out] = max(self.sent_seq[out], seq)
            try:
                self.socks[out].send(frame)
                self.stats["sent"] += 1
            except OSError:
                self.stats["send_errors"] += 1
        return max(0.0, self.queue[0][0] - now) if self.queue else None

    def run(self) -> None:
        while not self.stop:
            timeout = self._send_due()
            try:
                ready, _, _ = select.select(self.socks, [], [],
                                            0.2 if timeout is None else timeout)
            except InterruptedError:
                continue
            for sock in ready:
                self._receive(self.socks.index(sock))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dev_a")
    p.add_argument("dev_b")
    p.add_argument("--delay", type=float, default=0.1, help="seconds (default 0.1)")
    p.add_argument("--jitter", type=float, default=0.02, help="± seconds (default 0.02)")
    p.add_argument("--dup", type=float, default=1.0, help="percent duplicated (default 1)")
    p.add_argument("--reorder", type=float, default=2.0,
                   help="percent held back by delay/2 (default 2)")
    p.add_argument("--seed", type=int, default=23)
    args = p.parse_args(argv)
    bridge = Bridge(args.dev_a, args.dev_b, args)

    def stop(signum: int, frame: Any) -> None:
        bridge.stop = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(json.dumps({"ready": True}), flush=True)
    bridge.run()
    print(json.dumps(bridge.stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
