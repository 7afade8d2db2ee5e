"""Shared fixtures: a real sparkqd process on a temporary socket, and helpers to talk to it.

Tests start the daemon exactly as a user would (``python sparkqd.py``), talk to
it over its Unix socket or through ``sparkqctl``, and poll with a timeout
instead of sleeping.
"""

import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import msgspec
import pytest
from hypothesis.configuration import set_hypothesis_home_dir

ROOT = Path(__file__).resolve().parent.parent
SPARKQD = [sys.executable, str(ROOT / "sparkqd.py")]
SPARKQCTL = [sys.executable, str(ROOT / "sparkqctl.py")]
sys.path.insert(0, str(ROOT))
# Hypothesis keeps what it learns (failing examples, caches) under tests/, not at the top.
set_hypothesis_home_dir(str(ROOT / "tests" / ".hypothesis"))


def wait_until(predicate, timeout=10.0, interval=0.01, message="condition"):
    """Poll ``predicate`` until it returns a true value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def core_call(queue, request, now):
    """Hand a request to the pure queue core as the daemon's dispatch does; returns its
    result in wire form (as a client would see it)."""
    import sparkqd
    tag = type(request).__struct_config__.tag
    method = {"task": "get_task", "tasks": "list_tasks"}.get(tag, tag.replace(".", "_"))
    handler = (getattr(queue, method, None) or getattr(queue.stream_book, method, None)
               or getattr(sparkqd.QueueReads(queue), method))
    return sparkqd.Replies(queue).wire(handler(request, now))


class Conn:
    """A raw connection in either framing: ``send(op=...)`` then ``recv()``."""

    def __init__(self, path, framing="json", timeout=10.0):
        self.framing = framing
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""

    def send_raw(self, data: bytes):
        self.sock.sendall(data)

    def frame(self, message) -> bytes:
        if self.framing == "json":
            return json.dumps(message).encode() + b"\n"
        body = msgspec.msgpack.encode(message)
        return struct.pack(">I", len(body)) + body

    def send(self, **message):
        self.send_raw(self.frame(message))

    def _read(self, n=65536):
        chunk = self.sock.recv(n)
        if not chunk:
            raise EOFError("daemon closed the connection")
        self.buf += chunk

    def recv(self):
        if self.framing == "json":
            searched = 0
            while (end := self.buf.find(b"\n", searched)) < 0:
                searched = len(self.buf)  # a long reply is scanned once, not once per chunk
                self._read()
            line, self.buf = self.buf[:end], self.buf[end + 1:]
            return json.loads(line)
        while len(self.buf) < 4:
            self._read()
        (length,) = struct.unpack(">I", self.buf[:4])
        while len(self.buf) < 4 + length:
            self._read()
        body, self.buf = self.buf[4:4 + length], self.buf[4 + length:]
        return msgspec.msgpack.decode(body)

    def call(self, **message):
        """One request, one reply; returns the whole reply."""
        self.send(**message)
        return self.recv()

    def ok(self, **message):
        """One request that must succeed; returns its result."""
        reply = self.call(**message)
        assert reply["ok"], reply
        return reply["result"]

    def closed_by_peer(self, timeout=5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


#: What a test daemon's config gets unless it sets `http:` itself: no HTTP listener.
NO_HTTP = "\nhttp:\n  listen: null\n"


class Daemon:
    """A sparkqd process with its own socket, data directory and optional config (which
    turns the HTTP listener off unless it has an `http:` section)."""

    def __init__(self, workdir: Path, config: str | None = None, env: dict | None = None,
                 loop: str = "uvloop"):
        self.workdir = Path(workdir)
        self.loop = loop
        self.socket = self.workdir / "sparkqd.sock"
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "sparkq.yml"
        self.log_path = self.workdir / "sparkqd.log"
        self.extra_env = env or {}
        self.proc = None
        self.log = None
        if "http:" not in (config or ""):  # many daemons run at once: none takes port 8420
            config = f"{config or ''}{NO_HTTP}"
        self.config_path.write_text(config)

    @property
    def env(self):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SPARKQ_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))}
        env.update(SPARKQ_SOCKET=str(self.socket), **self.extra_env)
        return env

    def args(self):
        args = [*SPARKQD, "--socket", str(self.socket), "--data-dir", str(self.data_dir),
                "--loop", self.loop]
        if self.config_path.exists():
            args += ["--config", str(self.config_path)]
        return args

    def start(self, wait=True):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args(), env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=self.workdir)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=20.0):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"sparkqd exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                conn = Conn(self.socket, timeout=2)
            except OSError:
                return False
            try:
                return conn.call(op="hello")["ok"]
            except (OSError, EOFError):
                return False
            finally:
                conn.close()
        wait_until(ready, timeout, message="sparkqd to answer")

    def connect(self, framing="json") -> Conn:
        return Conn(self.socket, framing)

    def ok(self, **message):
        conn = self.connect()
        try:
            return conn.ok(**message)
        finally:
            conn.close()

    def call(self, **message):
        conn = self.connect()
        try:
            return conn.call(**message)
        finally:
            conn.close()

    def ctl(self, *args, input=None, timeout=30) -> subprocess.CompletedProcess:
        """Run sparkqctl against this daemon."""
        return subprocess.run([*SPARKQCTL, "--socket", str(self.socket), *map(str, args)],
                              env=self.env, input=input, capture_output=True, text=True,
                              timeout=timeout)

    def ctl_ok(self, *args) -> str:
        """Run sparkqctl, which must succeed with nothing on stderr; return its stdout."""
        out = self.ctl(*args)
        assert (out.returncode, out.stderr) == (0, ""), (args, out.returncode, out.stderr)
        return out.stdout

    def ctl_json(self, *args):
        """Run sparkqctl with --json and parse what it prints."""
        return json.loads(self.ctl_ok(*args, "--json"))

    def stop(self, timeout=20.0):
        """SIGTERM and wait: the graceful stop."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self):
        """SIGKILL: a crash, with no chance to flush or snapshot."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self):
        self.stop()
        return self.start()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def journal_segments(self) -> list[Path]:
        return sorted((self.data_dir / "journal").glob("*.journal"))


#: A config section for a daemon that serves HTTP, on a free loopback port.
HTTP_ON = "\nhttp:\n  listen: 127.0.0.1:0\n"


class Http:
    """A client of a daemon's HTTP listener: ``api(op, **fields)`` with the Bearer token,
    ``request(method, path, ...)`` for anything else. Replies are (status, headers, body)."""

    def __init__(self, daemon: Daemon):
        url = wait_until(lambda: daemon.ok(op="status")["http"]["url"], message="the listener")
        self.host, _, rest = url.removeprefix("http://").partition("/")
        self.port = int(self.host.rpartition(":")[2])
        self.token = (daemon.data_dir / "http-token").read_text().strip()
        self.auth = {"Authorization": f"Bearer {self.token}"}

    def connect(self, timeout=10.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout=10.0):
        conn = self.connect(timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def api(self, op, method="POST", **fields):
        """One op with the token: (HTTP status, the reply object)."""
        if method == "GET":
            query = urllib.parse.urlencode(fields, doseq=True)
            status, _, body = self.request("GET", f"/api/v1/{op}?{query}", headers=self.auth)
        else:
            status, _, body = self.request("POST", f"/api/v1/{op}", json.dumps(fields),
                                           {**self.auth, "Content-Type": "application/json"})
        return status, json.loads(body)

    def ok(self, op, **fields):
        status, reply = self.api(op, **fields)
        assert (status, reply["ok"]) == (200, True), reply
        return reply["result"]


@pytest.fixture
def workdir():
    # Short paths: a Unix socket path must fit in 107 bytes.
    with tempfile.TemporaryDirectory(prefix="sq-", dir="/tmp") as d:
        yield Path(d)


#: Modules whose daemons run under both event loops: uvloop (the default) and asyncio's own.
#: They are where the loop shows: transports, framing, back-pressure, subprocesses (the
#: protocol tests hold replies for the fsync under both). The journal's crash and
#: durability tests run on uvloop alone: what they check happens below the loop, and
#: running them twice puts the suite past its 10 minutes on this machine (617 s measured).
BOTH_LOOPS = {"test_protocol", "test_runner"}


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__ in BOTH_LOOPS and "loop_kind" in metafunc.fixturenames:
        metafunc.parametrize("loop_kind", ["uvloop", "asyncio"], indirect=True)


@pytest.fixture
def loop_kind(request):
    """The event loop the test's daemons run on."""
    return getattr(request, "param", "uvloop")


@pytest.fixture
def make_daemon(workdir, loop_kind):
    """Factory for daemons in this test's temp dir; each is killed at the end.

    Unless a test asks for them, the daemon runs no worker pool, so tasks of the
    built-in run-bash tool stay for the test to claim.
    """
    daemons = []

    def make(config=None, env=None, start=True, subdir=None, workers=0):
        """``workers``: the daemon's own worker slots; 0 (no pool) unless a test runs tasks."""
        where = workdir / subdir if subdir else workdir
        where.mkdir(exist_ok=True)
        if workers is not None and "workers:" not in (config or ""):
            config = f"{config or ''}\nworkers:\n  count: {workers}\n"
        daemon = Daemon(where, config, env, loop_kind)
        daemons.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in daemons:
        daemon.kill()
        if daemon.log is not None:
            daemon.log.close()


@pytest.fixture(scope="module")
def shared():
    """One daemon for the tests of a module that change nothing (refusals, listings)."""
    with tempfile.TemporaryDirectory(prefix="sq-", dir="/tmp") as d:
        daemon = Daemon(Path(d)).start()
        yield daemon
        daemon.kill()
        daemon.log.close()


@pytest.fixture
def daemon(make_daemon):
    """A running daemon on built-in defaults."""
    return make_daemon()
