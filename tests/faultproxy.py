"""A small HTTP fault proxy for storage tests: sits in front of moto's S3 server on 127.0.0.1.

Each request is matched against the rules in order; the first rule that matches (method, path
regex) and fires (seeded probability, at most `times` firings) injects its fault:

- `error`: answer `status` (500) with an S3 error body, never reaching the server;
- `slow`: wait `delay_s`, then forward (a read timeout on the client if it is longer);
- `drop`: read the request, then close the connection without an answer;
- `cut`: forward, then send the headers and only half of the body before closing (no answer at
  all when there is no body: the server acted, the client never hears of it).

`injected` counts what fired, by kind, so a test can report and assert how many faults it survived.
"""
from __future__ import annotations

import http.client
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("error", "slow", "drop", "cut")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


@dataclass
class Rule:
    kind: str
    p: float = 1.0  # chance that a matching request gets the fault
    method: str | None = None  # GET, PUT, HEAD, ... (None: any)
    path: str = ""  # regex searched in the request path, e.g. r"/clean/shards/shard-000001\.tar"
    times: int | None = None  # fire at most this many times (None: no limit)
    status: int = 500
    delay_s: float = 0.5

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"fault kind must be one of {KINDS}, not {self.kind!r}")
        self._re = re.compile(self.path)
        self.fired = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and bool(self._re.search(path)) and (
            self.times is None or self.fired < self.times)


class FaultProxy:
    """`with FaultProxy(upstream, rules, seed) as proxy:` then point the S3 client at `proxy.url`."""

    def __init__(self, upstream: str, rules: list[Rule] | None = None, seed: int = 0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rules = list(rules or [])
        self.rng = random.Random(seed)
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def decide(self, method: str, path: str) -> Rule | None:
        """The rule that fires for this request, if any (one seeded draw per matching rule)."""
        with self.lock:
            self.requests += 1
            for rule in self.rules:
                if rule.matches(method, path) and self.rng.random() < rule.p:
                    rule.fired += 1
                    self.injected[rule.kind] += 1
                    return rule
        return None


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline().strip():  # trailers
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _handle(self) -> None:
            body = self._body()
            rule = proxy.decide(self.command, self.path)
            kind = rule.kind if rule else None
            if kind == "drop":
                self.close_connection = True
                return
            if kind == "error":
                xml = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
                       b"<Message>injected fault</Message></Error>")
                self.send_response(rule.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)
                return
            if kind == "slow":
                time.sleep(rule.delay_s)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            if kind == "cut" and (self.command == "HEAD" or len(data) < 2):
                self.close_connection = True  # the server did it; the answer is lost
                return
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                    self.send_header(k, v)  # HEAD keeps the object's length
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if kind == "cut":
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data)

        def _quiet(self) -> None:
            try:
                self._handle()
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a read timeout): fine
                self.close_connection = True

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _quiet

    return Handler
