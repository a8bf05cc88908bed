"""Small apps run inside test network namespaces (``python netapps.py MODE ...``).

- ``echo HOST PORT [TAG]``: echoes every connection; with PROXY protocol on the wire it
  first answers with one line ``TAG proxy=<the header line or v2 source>`` (servers behind
  enforcer see the real client this way), then echoes the rest.
- ``client HOST PORT SIZE [SEED]``: sends SIZE seeded random bytes, half-closes, reads to
  EOF; prints one JSON line {sent, received, bytes, error}: sha256 of both directions.
- ``banner HOST PORT``: a server-first app: says ``220 ready``, then echoes.
- ``slowclient HOST PORT SIZE SEED GATE``: as ``client``, but prints ``{"port": N}`` once
  half the payload is sent, and sends the rest only once the file GATE exists.
- ``tlsclient HOST PORT SIZE SEED SNI CA`` / ``tlsslowclient HOST PORT SIZE SEED GATE SNI
  CA``: the same over TLS (server name SNI, verified against CA). The echo is read as its
  first line plus SIZE bytes, then TLS is closed with close_notify (a TLS socket cannot
  half-close and keep reading).
- ``forge HOST PORT SRC CERT KEY CA``: a PROXY v2 header claiming client SRC (SRC ``-``:
  no header), then TLS with that certificate (CERT ``-``: plaintext), then a line; prints
  {bytes, error}.
Exit status 0 always: the test reads the JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import socket
import ssl
import sys
import threading
import time

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def _proxy_prefix(conn: socket.socket) -> tuple[str | None, bytes]:
    """A PROXY v1/v2 header at the start of the stream, described in one word, and the
    bytes after it."""
    buf = b""
    while len(buf) < 16:
        chunk = conn.recv(65536)
        if not chunk:
            return None, buf
        buf += chunk
        if not (V2_SIG.startswith(buf[:12]) or b"PROXY ".startswith(buf[:6])):
            return None, buf
    if buf.startswith(b"PROXY "):
        while b"\r\n" not in buf:
            buf += conn.recv(65536)
        line, _, rest = buf.partition(b"\r\n")
        return line.decode().split(" ")[2], rest
    if buf.startswith(V2_SIG):
        length = int.from_bytes(buf[14:16], "big")
        while len(buf) < 16 + length:
            buf += conn.recv(65536)
        fam = buf[13] >> 4
        src = socket.inet_ntop(socket.AF_INET, buf[16:20]) if fam == 1 else \
            socket.inet_ntop(socket.AF_INET6, buf[16:32]) if fam == 2 else "local"
        return src, buf[16 + length:]
    return None, buf


def _echo(conn: socket.socket, tag: str, banner: bytes) -> None:
    with conn:
        try:
            if banner:
                conn.sendall(banner)
            src, rest = _proxy_prefix(conn) if not banner else (None, b"")
            if src is not None:
                conn.sendall(f"{tag} proxy={src}\n".encode())
            if rest:
                conn.sendall(rest)
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve(host: str, port: int, tag: str, banner: bytes = b"") -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(128)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_echo, args=(conn, tag, banner), daemon=True).start()


Tls = tuple[str, str] | None  # (server name, CA file) for the TLS clients


def _connect(host: str, port: int, timeout: float, tls: Tls) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    if tls is None:
        return sock
    ctx = ssl.create_default_context(cafile=tls[1])
    return ctx.wrap_socket(sock, server_hostname=tls[0])


def _finish(s: socket.socket, got: bytearray, size: int) -> None:
    """Read the echo to its end: EOF (plaintext), or its first line plus ``size`` bytes,
    then close_notify both ways (TLS)."""
    if not isinstance(s, ssl.SSLSocket):
        while data := s.recv(65536):
            got += data
        return
    while b"\n" not in got and (data := s.recv(65536)):
        got += data
    want = got.index(b"\n") + 1 + size if b"\n" in got else 0
    while len(got) < want and (data := s.recv(65536)):
        got += data
    s.unwrap()


def _tls_exchange(s: ssl.SSLSocket, payload: bytes, got: bytearray, size: int,
                  idle: float) -> None:
    """Send ``payload`` while reading the echo (its first line plus ``size`` bytes), then
    close_notify both ways, all in this one thread: OpenSSL forbids using one SSL object
    from two threads at once (a sender thread beside the reader made SSL_write and
    SSL_read race, e.g. over the server's session tickets, and failed with SSLError now
    and then on a loaded host). ``idle``: seconds without progress before giving up."""
    s.setblocking(False)
    sent, want = 0, None
    deadline = time.monotonic() + idle
    while want is None or len(got) < want:
        progress = False
        if sent < len(payload):
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                sent += s.send(payload[sent:sent + 65536])
                progress = True
        try:
            data: bytes | None = s.recv(65536)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            data = None
        if data == b"":
            break  # the echo ended early: unwrap() below says how
        if data:
            got += data
            progress = True
            if want is None and b"\n" in got:
                want = got.index(b"\n") + 1 + size
        if progress:
            deadline = time.monotonic() + idle
        elif time.monotonic() > deadline:
            raise TimeoutError(f"no progress for {idle} s")
        else:
            select.select([s], [s] if sent < len(payload) else [], [], 0.2)
    s.settimeout(idle)
    s.unwrap()


def client(host: str, port: int, size: int, seed: int, tls: Tls = None) -> dict[str, object]:
    payload = random.Random(seed).randbytes(size)
    out: dict[str, object] = {"sent": hashlib.sha256(payload).hexdigest(), "received": None,
                              "bytes": 0, "error": None}
    got = bytearray()
    try:
        with _connect(host, port, 20, tls) as s:
            if isinstance(s, ssl.SSLSocket):
                _tls_exchange(s, payload, got, size, 20)
                return _result(out, got)

            def send() -> None:
                try:  # a plain socket may be sent on and read from by two threads
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            t = threading.Thread(target=send, daemon=True)
            t.start()
            _finish(s, got, size)
            t.join(20)
    except OSError as exc:
        _error(out, exc)
    return _result(out, got)


def _error(out: dict[str, object], exc: OSError) -> None:
    out["error"] = type(exc).__name__
    out["detail"] = str(exc)  # e.g. which TLS alert or OpenSSL reason


def _result(out: dict[str, object], got: bytearray) -> dict[str, object]:
    out["received"] = hashlib.sha256(bytes(got)).hexdigest()
    out["bytes"] = len(got)
    out["head"] = bytes(got[:80]).decode("latin-1")
    return out


def slow_client(host: str, port: int, size: int, seed: int, gate: str,
                tls: Tls = None) -> dict[str, object]:
    payload = random.Random(seed).randbytes(size)
    out: dict[str, object] = {"sent": hashlib.sha256(payload).hexdigest(), "received": None,
                              "bytes": 0, "error": None}
    got = bytearray()
    try:
        with _connect(host, port, 60, tls) as s:
            half = size // 2
            s.sendall(payload[:half])
            print(json.dumps({"port": s.getsockname()[1]}), flush=True)
            while not os.path.exists(gate):
                time.sleep(0.02)
            s.sendall(payload[half:])
            if tls is None:
                s.shutdown(socket.SHUT_WR)
            _finish(s, got, size)
    except OSError as exc:
        _error(out, exc)
    return _result(out, got)


def forge(host: str, port: int, src: str, cert: str, key: str, ca: str) -> dict[str, object]:
    header = V2_SIG + bytes([0x21, 0x11]) + (12).to_bytes(2, "big") + \
        socket.inet_aton(src if src != "-" else "0.0.0.0") \
        + socket.inet_aton(host) + (40000).to_bytes(2, "big") + port.to_bytes(2, "big")
    out: dict[str, object] = {"bytes": 0, "error": None}
    try:
        with socket.create_connection((host, port), timeout=20) as raw:
            if src != "-":
                raw.sendall(header)
            conn: socket.socket = raw
            if cert != "-":
                ctx = ssl.create_default_context(cafile=ca)
                ctx.check_hostname = False
                ctx.load_cert_chain(cert, key)
                conn = ctx.wrap_socket(raw, server_hostname="localhost")
            conn.sendall(b"hello from a forger\n")
            got = b""
            while data := conn.recv(65536):
                got += data
            out["bytes"] = len(got)
    except (OSError, ssl.SSLError) as exc:
        _error(out, exc)
    return out


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "echo":
        serve(argv[1], int(argv[2]), argv[3] if len(argv) > 3 else "app")
    elif mode == "banner":
        serve(argv[1], int(argv[2]), "app", banner=b"220 ready\r\n")
    elif mode == "client":
        seed = int(argv[4]) if len(argv) > 4 else 1
        print(json.dumps(client(argv[1], int(argv[2]), int(argv[3]), seed)), flush=True)
    elif mode == "slowclient":
        print(json.dumps(slow_client(argv[1], int(argv[2]), int(argv[3]), int(argv[4]),
                                     argv[5])), flush=True)
    elif mode == "tlsclient":
        print(json.dumps(client(argv[1], int(argv[2]), int(argv[3]), int(argv[4]),
                                (argv[5], argv[6]))), flush=True)
    elif mode == "tlsslowclient":
        print(json.dumps(slow_client(argv[1], int(argv[2]), int(argv[3]), int(argv[4]),
                                     argv[5], (argv[6], argv[7]))), flush=True)
    elif mode == "forge":
        print(json.dumps(forge(argv[1], int(argv[2]), *argv[3:7])), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
