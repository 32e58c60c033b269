"""A loopback HTTP proxy that injects transient faults in front of another HTTP server (the GCS
emulator in the tests). Pure stdlib, one thread per connection, one request per connection (the
emulator answers HTTP/1.0 and closes after each response; so does the proxy).

Faults, injected on a fixed fraction `rate` of requests (the first one included), evenly spread
and cycling through `kinds` (deterministic, so a test can count on every kind happening); `only`
narrows them to requests whose head contains it, `max_faults` caps them:
  "503"            answer 503 Service Unavailable without forwarding the request;
  "drop_request"   read the request head and part of its body, then close the socket;
  "drop_response"  forward the request (the server acts on it), send the client only the first
                   half of the response, then close the socket.
"""

from __future__ import annotations

import collections
import fractions
import json
import math
import socket
import threading

KINDS = ("503", "drop_request", "drop_response")


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head through the blank line, whatever body bytes arrived with it); head is b"" on EOF."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return b"", b""
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _read_body(sock: socket.socket, head: bytes, rest: bytes) -> bytes:
    """The request body, by Content-Length or chunked transfer encoding, as sent (still encoded)."""
    length = _header(head, b"content-length")
    if length is not None:
        while len(rest) < int(length):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return rest
    if (_header(head, b"transfer-encoding") or b"").lower() == b"chunked":
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return rest


class FaultProxy:
    """Forwards http://127.0.0.1:<port> to `upstream` (host, port), injecting faults.

    `counts` tallies what happened to each request: "forwarded" and one key per fault kind.
    """

    def __init__(self, upstream: tuple[str, int], rate: float = 0.25, kinds: tuple[str, ...] = KINDS,
                 only: bytes = b"", max_faults: int | None = None):
        if not 0 <= rate < 1:
            raise ValueError(f"rate={rate}; expected 0 <= rate < 1 (every request failing never completes)")
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; expected some of {KINDS}")
        self.upstream, self.kinds, self.only, self.max_faults = upstream, tuple(kinds), only, max_faults
        self.rate = fractions.Fraction(rate).limit_denominator(10_000)  # exact steps, no float drift
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._requests = 0  # eligible requests seen
        self._injected = 0  # faults decided (counts tallies them once carried out)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone may not)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(timeout=5)

    @property
    def faults(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind in KINDS)

    def _next_fault(self, head: bytes = b"") -> str | None:
        """Eligible request n faults when ceil((n + 1) * rate) steps up: `rate` of them, spread out."""
        with self._lock:
            if self.only not in head or (self.max_faults is not None and self._injected >= self.max_faults):
                return None
            n = self._requests
            self._requests += 1
            step = math.ceil((n + 1) * self.rate)
            if step == math.ceil(n * self.rate):
                return None
            self._injected += 1
            return self.kinds[(step - 1) % len(self.kinds)]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed by __exit__
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            head, rest = _read_head(client)
            if not head:
                return
            fault = self._next_fault(head)
            if fault == "drop_request":
                self._count(fault)
                return  # mid-request: the head (and maybe part of the body) was read, nothing answered
            body = _read_body(client, head, rest)
            if fault == "503":
                self._count(fault)
                client.sendall(_status_503())
                return
            response = self._forward(head + body)
            if fault == "drop_response":
                self._count(fault)
                client.sendall(response[: max(1, len(response) // 2)])
                return
            self._count("forwarded")
            client.sendall(response)

    def _forward(self, request: bytes) -> bytes:
        with socket.create_connection(self.upstream, timeout=60) as up:
            up.sendall(request)
            chunks = []
            while chunk := up.recv(65536):  # the emulator closes after each response
                chunks.append(chunk)
        return b"".join(chunks)

    def _count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1


def _status_503() -> bytes:
    body = json.dumps({"error": {"code": 503, "message": "fault injected by the test proxy: backend unavailable"}})
    return (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}").encode()
