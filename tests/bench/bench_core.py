#!/usr/bin/env python3
"""SparkQ core benchmarks, measured side by side with beanstalkd as the anchor.

Run from the repository root::

    python3 tests/bench/bench_core.py            # full run, ~3-10 minutes
    python3 tests/bench/bench_core.py --quick    # scaled down, about 1 minute
    python3 tests/bench/bench_core.py --only 1,4 --rounds 9 --json out.json
    python3 tests/bench/bench_core.py --rev HEAD # the committed daemon, not the work tree

Progress and the per-round figures go to stderr; the table goes to stdout,
headed by what was measured (work tree or git commit) and the load average at
the start and end of the run (a high load means a noisy run: compare the
ratios, and prefer runs whose min..max spread is narrow).

The script starts its own sparkqd and beanstalkd processes in a temporary
directory under /tmp, talks to them over Unix sockets only, and stops them at
the end (also on Ctrl-C or an error). Every loop is bounded both by a count
and by a time limit. It needs /usr/bin/beanstalkd (``apt-get install
beanstalkd``) and msgspec; it is never collected by pytest (the suite runs
with ``--ignore=tests/bench``).

The machine this runs on is small and shared, so absolute numbers drift from
minute to minute. Each comparison therefore runs SparkQ (A) and beanstalkd
(B) in alternating rounds within one run (A,B then B,A, ...), computes the
ratio A/B of every round, and reports the median ratio with its spread
(min..max over the rounds). Absolute figures are the medians of the rounds.

Both clients are written the same way: one plain socket, one request, wait
for the whole reply, next request. SparkQ is spoken to in msgpack frames
(4-byte big-endian length + msgpack map), beanstalkd in its text protocol
(``put 0 0 60 <len>``, ``reserve-with-timeout 0``, ``delete <id>``). Every
task carries the same 32-byte payload; SparkQ's tasks use a tool ``bench``
without a command (set in the generated config), so the daemon's own runner
leaves them to the benchmark's claims. beanstalkd runs with ``-b DIR -f 0``
(fsync on every write, the counterpart of SparkQ's ``fsync: always``) or
``-F`` (never fsync, the counterpart of ``fsync: never``), listening on a
Unix socket just like sparkqd.

What each line of the table means (ratio > 1 means SparkQ is faster, except
where the target says "<="):

1 enqueue 1 client      durable enqueues per second, one client, request/reply;
                        ratio = SparkQ / beanstalkd -f 0 (both wait for one fsync
                        per request: what is left is CPU).            target >= 0.95
2 enqueue 8 clients     durable enqueues per second, total over 8 client
                        processes (multiprocessing, so the client GIL is not
                        the limit), each request/reply.               target >= 3
3 pipelined enqueue     one connection, durable: SparkQ through sparkqctl's Client
                        (send_many, two batches of 1,000 in flight, JSON lines),
                        beanstalkd with a writer and a reader thread. The target
                        is absolute (tasks/s); beanstalkd's pipelined puts are
                        shown for reference.                          target >= 100,000/s
4a claim+complete       pairs per second, one client, request/reply, both
                        durable; beanstalkd does reserve + delete.    target >= 0.6
4b worker loop          the same as one step: SparkQ's complete with claim_next
                        (one request, one fsync); beanstalkd's delete + reserve
                        in one write (two requests).                  target >= 1.2
5 enqueue 8 cl. nosync  like 2, SparkQ ``fsync: never`` vs beanstalkd -F.
                                                                      target >= 0.5
6 sparkqctl enqueue     wall time of ``python3 sparkqctl.py enqueue ...`` as a
                        fresh process (against a running durable daemon) over
                        the time of ``python3 -c pass``; same interpreter,
                        runs interleaved; ratio of medians.           target <= 2.5
7a restart, N pending   after loading N pending tasks (pipelined, fsync never)
                        and a graceful stop (SIGTERM, which writes a snapshot;
                        its time is shown as "stop"), seconds from starting the
                        daemon to its first ``hello`` reply.          target <= 5 s
7b memory per task      (VmRSS after that restart - VmRSS of an empty daemon)
                        / N, in bytes.                                target <= 1024
8 claim latency         median latency of a single ``claim`` (fsync never, so
                        only CPU is measured) with N pending over the same with
                        1,000 pending. Each claim is followed, untimed, by a
                        complete and an enqueue so the pending count stays put;
                        the two daemons alternate in rounds.          target <= 1.5

Full run: N = 1,000,000 for 7 and 8; --quick uses 100,000 and smaller counts.
"""

from __future__ import annotations

import argparse
import atexit
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent.parent
SPARKQD = [sys.executable, str(ROOT / "sparkqd.py")]
SPARKQCTL = [sys.executable, str(ROOT / "sparkqctl.py")]
BEANSTALKD = shutil.which("beanstalkd") or "/usr/bin/beanstalkd"
PAYLOAD = "make test -k bench_enqueue_case1"  # 32 bytes, the same for both queues
#: A tool without a command, so the daemon's own runner leaves its tasks to claimers.
TOOL = "bench"
PAYLOAD_BYTES = PAYLOAD.encode()
HEADER = struct.Struct(">I")
_encode = msgspec.msgpack.encode
_decode = msgspec.msgpack.decode

#: Processes this script started; killed at exit whatever happens.
_children: list[subprocess.Popen] = []


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SPARKQ_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _kill_children() -> None:
    for proc in _children:
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


atexit.register(_kill_children)


# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------


class SparkQ:
    """A sparkqd process in its own directory with an optional config."""

    name = "sparkq"

    def __init__(self, workdir: Path, fsync: str = "always", snapshot_interval: float = 60):
        self.dir = workdir
        self.dir.mkdir(parents=True)
        self.socket = str(workdir / "s.sock")
        self.config = workdir / "sparkq.yml"
        self.config.write_text(
            f"database: {{fsync: {fsync}, snapshot_interval: {snapshot_interval}}}\n"
            f"task_classes: {{bench: {{timeout: 300}}}}\n"
            f"tools: {{{TOOL}: {{task_class: bench}}}}\n")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> float:
        """Start and wait for ``hello``; returns the seconds that took."""
        logf = open(self.dir / "sparkqd.log", "ab")
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [*SPARKQD, "--socket", self.socket, "--data-dir", str(self.dir / "data"),
             "--config", str(self.config), "--log-level", "warning"],
            stdout=logf, stderr=subprocess.STDOUT, env=clean_env(), cwd=self.dir)
        logf.close()
        _children.append(self.proc)
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sparkqd exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                client = SqClient(self.socket, timeout=5)
                try:
                    if client.call({"op": "hello"})["ok"]:
                        return time.perf_counter() - started
                finally:
                    client.close()
            except OSError:
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError(f"sparkqd did not answer within {timeout} s")
            time.sleep(0.005)

    def stop(self, timeout: float = 600) -> float:
        """SIGTERM (answer, flush, snapshot, exit) and wait; returns the seconds."""
        started = time.perf_counter()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise RuntimeError(f"sparkqd did not stop within {timeout} s")
        if self.proc and self.proc.returncode != 0:
            raise RuntimeError(f"sparkqd exited with {self.proc.returncode}:\n{self.logs()}")
        return time.perf_counter() - started

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def logs(self) -> str:
        path = self.dir / "sparkqd.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def client(self) -> "SqClient":
        return SqClient(self.socket)


class Beanstalkd:
    """A beanstalkd process with a binlog directory, on a Unix socket."""

    name = "beanstalkd"

    def __init__(self, workdir: Path, fsync: bool = True):
        self.dir = workdir
        self.dir.mkdir(parents=True)
        (workdir / "binlog").mkdir()
        self.socket = str(workdir / "b.sock")
        self.args = [BEANSTALKD, "-l", f"unix:{self.socket}", "-b", str(workdir / "binlog")]
        self.args += ["-f", "0"] if fsync else ["-F"]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20) -> None:
        logf = open(self.dir / "beanstalkd.log", "ab")
        self.proc = subprocess.Popen(self.args, stdout=logf, stderr=subprocess.STDOUT,
                                     cwd=self.dir)
        logf.close()
        _children.append(self.proc)
        deadline = time.perf_counter() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"beanstalkd exited with {self.proc.returncode}")
            try:
                BsClient(self.socket, timeout=5).close()
                return
            except OSError:
                if time.perf_counter() > deadline:
                    raise RuntimeError("beanstalkd did not listen in time") from None
                time.sleep(0.005)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def client(self) -> "BsClient":
        return BsClient(self.socket)


# ---------------------------------------------------------------------------
# Clients: one plain socket, request then whole reply
# ---------------------------------------------------------------------------


def connect_unix(path: str, timeout: float) -> socket.socket:
    """A connected Unix stream socket (closed again if the connect fails)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


class SqClient:
    """sparkqd over msgpack frames."""

    def __init__(self, path: str, timeout: float = 30):
        self.sock = connect_unix(path, timeout)
        self.buf = bytearray()

    def send(self, message: dict) -> None:
        body = _encode(message)
        self.sock.sendall(HEADER.pack(len(body)) + body)

    def recv(self) -> dict:
        buf = self.buf
        while len(buf) < 4:
            self._fill()
        (length,) = HEADER.unpack_from(buf, 0)
        while len(buf) < 4 + length:
            self._fill()
        body = bytes(buf[4:4 + length])
        del buf[:4 + length]
        return _decode(body)

    def _fill(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise EOFError("sparkqd closed the connection")
        self.buf += chunk

    def call(self, message: dict) -> dict:
        self.send(message)
        return self.recv()

    @staticmethod
    def result(reply: dict):
        if not reply.get("ok"):
            raise RuntimeError(f"sparkqd refused: {reply}")
        return reply["result"]

    def enqueue(self) -> int:
        return self.result(self.call({"op": "enqueue", "tool": TOOL, "payload": PAYLOAD}))["id"]

    def claim(self) -> int | None:
        task = self.result(self.call({"op": "claim"}))
        return None if task is None else task["id"]

    def complete(self, task_id: int) -> None:
        self.result(self.call({"op": "complete", "task": task_id}))

    def complete_and_claim(self, task_id: int) -> int | None:
        """The worker loop: complete N and claim N+1 in one request (claim_next)."""
        task = self.result(self.call({"op": "complete", "task": task_id, "claim_next": {}}))["next"]
        return None if task is None else task["id"]

    def close(self) -> None:
        self.sock.close()


class BsClient:
    """beanstalkd over its text protocol."""

    def __init__(self, path: str, timeout: float = 30):
        self.sock = connect_unix(path, timeout)
        self.buf = bytearray()

    def _fill(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise EOFError("beanstalkd closed the connection")
        self.buf += chunk

    def line(self) -> bytes:
        buf = self.buf
        while (end := buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(buf[:end])
        del buf[:end + 2]
        return line

    def body(self, length: int) -> bytes:
        buf = self.buf
        while len(buf) < length + 2:
            self._fill()
        body = bytes(buf[:length])
        del buf[:length + 2]
        return body

    def enqueue(self) -> int:
        self.sock.sendall(b"put 0 0 60 %d\r\n%s\r\n" % (len(PAYLOAD_BYTES), PAYLOAD_BYTES))
        reply = self.line()
        if not reply.startswith(b"INSERTED "):
            raise RuntimeError(f"beanstalkd refused put: {reply!r}")
        return int(reply[9:])

    def _reserved(self) -> int | None:
        reply = self.line()
        if reply == b"TIMED_OUT":
            return None
        if not reply.startswith(b"RESERVED "):
            raise RuntimeError(f"beanstalkd refused reserve: {reply!r}")
        _, job, length = reply.split()
        self.body(int(length))
        return int(job)

    def claim(self) -> int | None:
        self.sock.sendall(b"reserve-with-timeout 0\r\n")
        return self._reserved()

    def complete(self, job: int) -> None:
        self.sock.sendall(b"delete %d\r\n" % job)
        reply = self.line()
        if reply != b"DELETED":
            raise RuntimeError(f"beanstalkd refused delete: {reply!r}")

    def complete_and_claim(self, job: int) -> int | None:
        """The worker loop: delete N and reserve N+1 in one write."""
        self.sock.sendall(b"delete %d\r\nreserve-with-timeout 0\r\n" % job)
        reply = self.line()
        if reply != b"DELETED":
            raise RuntimeError(f"beanstalkd refused delete: {reply!r}")
        return self._reserved()

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------
# Pipelining: a writer thread sends, the calling thread counts replies
# ---------------------------------------------------------------------------

SQ_ENQUEUE_FRAME = (lambda b: HEADER.pack(len(b)) + b)(
    _encode({"op": "enqueue", "tool": TOOL, "payload": PAYLOAD}))
BS_PUT = b"put 0 0 60 %d\r\n%s\r\n" % (len(PAYLOAD_BYTES), PAYLOAD_BYTES)


class _SqReplyCounter:
    """Counts msgpack reply frames without decoding most of them."""

    def __init__(self):
        self.buf = bytearray()
        self.seen = 0

    def feed(self, chunk: bytes) -> int:
        buf = self.buf
        buf += chunk
        pos, size, n = 0, len(buf), 0
        while size - pos >= 4:
            (length,) = HEADER.unpack_from(buf, pos)
            if size - pos - 4 < length:
                break
            if (self.seen + n) % 997 == 0:  # spot-check a reply now and then
                reply = _decode(bytes(buf[pos + 4:pos + 4 + length]))
                if not reply.get("ok"):
                    raise RuntimeError(f"sparkqd refused a pipelined request: {reply}")
            pos += 4 + length
            n += 1
        del buf[:pos]
        if b"\xa5error" in chunk:
            raise RuntimeError("sparkqd refused a pipelined request")
        self.seen += n
        return n


class _BsReplyCounter:
    """Counts beanstalkd reply lines; every one must be INSERTED."""

    def __init__(self):
        self.tail = b""

    def feed(self, chunk: bytes) -> int:
        data = self.tail + chunk
        end = data.rfind(b"\n") + 1
        done, self.tail = data[:end], data[end:]
        n = done.count(b"\n")
        if done.count(b"INSERTED ") != n:
            raise RuntimeError(f"beanstalkd refused a pipelined put: {done[:200]!r}")
        return n


def pipelined_enqueue(path: str, kind: str, count: int, batch: int = 200,
                      window: int = 20000, time_limit: float = 600) -> tuple[int, float]:
    """Send ``count`` enqueues on one connection while reading replies.

    At most ``window`` requests are outstanding. Returns (replies, seconds).
    """
    frame = SQ_ENQUEUE_FRAME if kind == "sparkq" else BS_PUT
    counter = _SqReplyCounter() if kind == "sparkq" else _BsReplyCounter()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    credits = threading.Semaphore(max(1, window // batch))
    stop = threading.Event()
    error: list[BaseException] = []
    blob = frame * batch

    def writer():
        try:
            sent = 0
            while sent < count and not stop.is_set():
                while not credits.acquire(timeout=0.5):
                    if stop.is_set():
                        return
                n = min(batch, count - sent)
                sock.sendall(blob if n == batch else frame * n)
                sent += n
        except BaseException as exc:  # reported by the reader
            error.append(exc)
            stop.set()

    received, released = 0, 0
    started = time.perf_counter()
    deadline = started + time_limit
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        while received < count:
            if error:
                raise error[0]
            if time.perf_counter() > deadline:
                raise RuntimeError(f"pipelined enqueue: {received}/{count} after {time_limit} s")
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise EOFError(f"{kind} closed the connection after {received} replies")
            received += counter.feed(chunk)
            while received - released >= batch:
                released += batch
                credits.release()
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        thread.join(5)
        sock.close()
    return received, elapsed


def client_pipelined_enqueue(path: str, count: int, batch: int = 1000) -> tuple[int, float]:
    """Pipelined durable enqueues through sparkqctl's own ``Client`` (``send_many`` and
    ``receive``), two batches in flight. Returns (replies, seconds)."""
    sys.path.insert(0, str(ROOT))
    from sparkqctl import Client

    request = {"op": "enqueue", "tool": TOOL, "payload": PAYLOAD}
    with Client(path, timeout=60) as client:
        started, sent, received = time.perf_counter(), 0, 0
        while received < count:
            while sent < count and sent - received < 2 * batch:
                n = min(batch, count - sent)
                client.send_many([request] * n)
                sent += n
            for _ in range(min(batch, sent - received)):
                Client.result(client.receive())
                received += 1
        return received, time.perf_counter() - started


# ---------------------------------------------------------------------------
# Measurements of one round
# ---------------------------------------------------------------------------


def serial_enqueue(server, count: int, time_limit: float) -> float:
    """Enqueues per second, one client, request/reply."""
    client = server.client()
    try:
        client.enqueue()  # warm the connection
        done, started = 0, time.perf_counter()
        deadline = started + time_limit
        while done < count:
            client.enqueue()
            done += 1
            if done % 64 == 0 and time.perf_counter() > deadline:
                break
        return done / (time.perf_counter() - started)
    finally:
        client.close()


def _enqueue_worker(kind: str, path: str, count: int, time_limit: float, barrier, results):
    try:
        client = SqClient(path) if kind == "sparkq" else BsClient(path)
        client.enqueue()
        barrier.wait(30)
        started = time.monotonic()
        deadline = started + time_limit
        done = 0
        while done < count:
            client.enqueue()
            done += 1
            if done % 64 == 0 and time.monotonic() > deadline:
                break
        results.put((started, time.monotonic(), done, None))
        client.close()
    except BaseException as exc:
        results.put((0.0, 0.0, 0, repr(exc)))


def concurrent_enqueue(server, clients: int, count: int, time_limit: float) -> float:
    """Enqueues per second in total, ``clients`` processes each doing request/reply."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(clients)
    results = ctx.Queue()
    procs = [ctx.Process(target=_enqueue_worker, daemon=True,
                         args=(server.name, server.socket, count, time_limit, barrier, results))
             for _ in range(clients)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=time_limit + 60) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = [e for *_, e in got if e]
    if errors:
        raise RuntimeError(f"{server.name} client failed: {errors[0]}")
    start = min(s for s, *_ in got)
    end = max(e for _, e, *_ in got)
    return sum(n for _, _, n, _ in got) / (end - start)


def claim_complete(server, count: int, time_limit: float, worker_loop: bool) -> float:
    """Claim+complete pairs per second, one client; needs ``count`` + 1 pending tasks."""
    client = server.client()
    try:
        done, started = 0, time.perf_counter()
        deadline = started + time_limit
        if worker_loop:
            task = client.claim()
            while task is not None and done < count:
                task = client.complete_and_claim(task)
                done += 1
                if done % 64 == 0 and time.perf_counter() > deadline:
                    break
            elapsed = time.perf_counter() - started
            if task is not None:
                client.complete(task)
        else:
            while done < count:
                task = client.claim()
                if task is None:
                    break
                client.complete(task)
                done += 1
                if done % 64 == 0 and time.perf_counter() > deadline:
                    break
            elapsed = time.perf_counter() - started
        if done < min(count, 64):
            raise RuntimeError(f"{server.name}: ran out of tasks after {done} claims")
        return done / elapsed
    finally:
        client.close()


def claim_latencies(client: SqClient, count: int, time_limit: float) -> list[float]:
    """Seconds of each ``claim``; an untimed complete and enqueue keep the count steady."""
    out = []
    deadline = time.perf_counter() + time_limit
    for _ in range(count):
        t0 = time.perf_counter()
        task = client.claim()
        out.append(time.perf_counter() - t0)
        if task is None:
            raise RuntimeError("claim latency: the queue ran dry")
        client.complete(task)
        client.enqueue()
        if time.perf_counter() > deadline:
            break
    return out


def process_seconds(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    out = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         timeout=30)
    elapsed = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"{argv} exited {out.returncode}: {out.stderr.decode()[-500:]}")
    return elapsed


# ---------------------------------------------------------------------------
# Rounds, ratios and the table
# ---------------------------------------------------------------------------


def interleave(rounds: int, a, b) -> tuple[list, list]:
    """Run ``a()`` and ``b()`` alternately: A,B then B,A, and so on."""
    xs, ys = [], []
    for r in range(rounds):
        if r % 2 == 0:
            xs.append(a())
            ys.append(b())
        else:
            ys.append(b())
            xs.append(a())
    return xs, ys


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


class Results:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, key, label, sparkq, anchor, ratio, target, met, unit="", note=""):
        row = dict(key=key, label=label, sparkq=sparkq, anchor=anchor, ratio=ratio,
                   target=target, met=met, unit=unit, note=note)
        self.rows.append(row)
        log("  -> " + " | ".join(format_row(row)))

    def table(self) -> str:
        head = ["#", "benchmark", "SparkQ", "anchor", "ratio median [min..max]", "target",
                "result"]
        cells = [head] + [format_row(r) for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        notes = [f"  {r['key']}: {r['note']}" for r in self.rows if r["note"]]
        return "\n".join(lines + ([""] + ["notes:"] + notes if notes else []))


def fmt(value, unit="") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "ms":
        return f"{value * 1e3:.3f} ms"
    if unit == "us":
        return f"{value * 1e6:.1f} us"
    if unit == "B":
        return f"{value:,.0f} B"
    return f"{value:,.0f}/s"


def format_row(r: dict) -> list[str]:
    ratio = r["ratio"]
    if isinstance(ratio, tuple):
        ratio_text = f"{ratio[0]:.2f}x [{ratio[1]:.2f}..{ratio[2]:.2f}]"
    elif ratio is None:
        ratio_text = "-"
    else:
        ratio_text = f"{ratio:.2f}x"
    met = {True: "met", False: "MISSED", None: "(info)"}[r["met"]]
    return [str(r["key"]), r["label"], fmt(r["sparkq"], r["unit"]), fmt(r["anchor"], r["unit"]),
            ratio_text, r["target"], met]


# ---------------------------------------------------------------------------
# The benchmarks
# ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args, tmp: Path):
        self.args = args
        self.tmp = tmp
        self.quick = args.quick
        self.rounds = args.rounds or (5 if args.quick else 7)
        self.results = Results()
        self._n = 0

    def workdir(self, name: str) -> Path:
        self._n += 1
        return self.tmp / f"{self._n:02d}{name}"

    def pair(self, fsync_always: bool):
        """A fresh sparkqd and beanstalkd pair with matching durability."""
        sq = SparkQ(self.workdir("sq"), fsync="always" if fsync_always else "never")
        bs = Beanstalkd(self.workdir("bs"), fsync=fsync_always)
        sq.start()
        bs.start()
        return sq, bs

    def ratio_row(self, key, label, xs, ys, target_text, check, unit=""):
        ratios = [x / y for x, y in zip(xs, ys)]
        r = spread(ratios)
        self.results.add(key, label, statistics.median(xs), statistics.median(ys), r,
                         target_text, check(r[0]), unit)
        log(f"     rounds sparkq: {', '.join(f'{x:,.0f}' for x in xs)}")
        log(f"     rounds anchor: {', '.join(f'{y:,.0f}' for y in ys)}")

    # 1 ---------------------------------------------------------------------
    def b1(self):
        log("[1] durable enqueue, one client, request/reply (sparkq fsync always vs beanstalkd -f 0)")
        n = 800 if self.quick else 3000
        sq, bs = self.pair(True)
        try:
            xs, ys = interleave(self.rounds, lambda: serial_enqueue(sq, n, 20),
                                lambda: serial_enqueue(bs, n, 20))
        finally:
            sq.stop()
            bs.stop()
        self.ratio_row(1, "durable enqueue, 1 client", xs, ys, ">= 0.95x", lambda r: r >= 0.95)

    # 2 and 5 ------------------------------------------------------------------
    def _concurrent(self, key, label, fsync_always, target, ok):
        n = 300 if self.quick else 1500
        sq, bs = self.pair(fsync_always)
        try:
            xs, ys = interleave(self.rounds, lambda: concurrent_enqueue(sq, 8, n, 20),
                                lambda: concurrent_enqueue(bs, 8, n, 20))
        finally:
            sq.stop()
            bs.stop()
        self.ratio_row(key, label, xs, ys, target, ok)

    def b2(self):
        log("[2] durable enqueue, 8 client processes (sparkq fsync always vs beanstalkd -f 0)")
        self._concurrent(2, "durable enqueue, 8 clients", True, ">= 3x", lambda r: r >= 3)

    def b5(self):
        log("[5] enqueue, 8 client processes, no fsync (sparkq fsync never vs beanstalkd -F)")
        self._concurrent(5, "enqueue 8 clients, no fsync", False, ">= 0.5x",
                         lambda r: r >= 0.5)

    # 3 ---------------------------------------------------------------------
    def b3(self):
        log("[3] pipelined durable enqueue on one connection")
        n = 10_000 if self.quick else 20_000
        sq, bs = self.pair(True)
        try:
            def run(server):
                if server.name == "sparkq":  # through the Client's pipelining API
                    got, secs = client_pipelined_enqueue(server.socket, n)
                else:
                    got, secs = pipelined_enqueue(server.socket, server.name, n, time_limit=60)
                return got / secs
            xs, ys = interleave(self.rounds, lambda: run(sq), lambda: run(bs))
        finally:
            sq.stop()
            bs.stop()
        ratios = spread([x / y for x, y in zip(xs, ys)])
        med = spread(xs)
        self.results.add(3, f"pipelined durable enqueue ({n:,})", med[0], statistics.median(ys),
                         ratios, ">= 100,000/s", med[0] >= 100_000,
                         note=f"SparkQ rounds min..max {med[1]:,.0f}..{med[2]:,.0f}/s; "
                              f"the target is absolute, the ratio is for reference")
        log(f"     rounds sparkq: {', '.join(f'{x:,.0f}' for x in xs)}")
        log(f"     rounds anchor: {', '.join(f'{y:,.0f}' for y in ys)}")

    # 4 ---------------------------------------------------------------------
    def b4(self):
        log("[4] claim + complete, one client (sparkq fsync always vs beanstalkd -f 0 reserve+delete)")
        n = 600 if self.quick else 2000
        sq, bs = self.pair(True)
        try:
            total = 2 * self.rounds * n + 10
            for server in (sq, bs):
                got, secs = pipelined_enqueue(server.socket, server.name, total, time_limit=300)
                log(f"     loaded {got:,} tasks into {server.name} in {secs:.1f} s")
            xs, ys = interleave(self.rounds, lambda: claim_complete(sq, n, 20, False),
                                lambda: claim_complete(bs, n, 20, False))
            self.ratio_row("4a", "claim+complete, 1 client", xs, ys, ">= 0.6x",
                           lambda r: r >= 0.6)
            xs, ys = interleave(self.rounds, lambda: claim_complete(sq, n, 20, True),
                                lambda: claim_complete(bs, n, 20, True))
            self.ratio_row("4b", "worker loop (complete with claim_next)", xs, ys, ">= 1.2x",
                           lambda r: r >= 1.2)
        finally:
            sq.stop()
            bs.stop()

    # 6 ---------------------------------------------------------------------
    def b6(self):
        log("[6] sparkqctl enqueue as a fresh process vs python3 -c pass")
        runs = 15 if self.quick else 30
        sq = SparkQ(self.workdir("sq"), fsync="always")
        sq.start()
        env = clean_env()
        ctl = [*SPARKQCTL, "--socket", sq.socket, "enqueue", "--tool", TOOL,
               "--payload", PAYLOAD]
        bare = [sys.executable, "-c", "pass"]
        try:
            for _ in range(3):  # warm the page cache for both
                process_seconds(ctl, env)
                process_seconds(bare, env)
            xs, ys = interleave(runs, lambda: process_seconds(ctl, env),
                                lambda: process_seconds(bare, env))
        finally:
            sq.stop()
        mx, my = statistics.median(xs), statistics.median(ys)
        pair_ratios = sorted(x / y for x, y in zip(xs, ys))
        q1, q3 = statistics.quantiles(pair_ratios, n=4)[0], statistics.quantiles(pair_ratios, n=4)[2]
        self.results.add(6, f"sparkqctl enqueue vs python -c pass ({runs} runs)", mx, my,
                         (mx / my, min(pair_ratios), max(pair_ratios)), "<= 2.5x",
                         mx / my <= 2.5, unit="ms",
                         note=f"ratio = median/median; per-run ratios IQR {q1:.2f}..{q3:.2f}; "
                              f"the anchor here is `python3 -c pass`")

    # 7 and 8 ----------------------------------------------------------------
    def b78(self):
        big = 100_000 if self.quick else 1_000_000
        small = 1_000
        log(f"[7] restart with {big:,} pending tasks; [8] claim latency at {big:,} vs {small:,}")
        empty = SparkQ(self.workdir("sq-empty"), fsync="never", snapshot_interval=3600)
        empty.start()
        time.sleep(0.5)
        rss_empty = empty.rss()
        empty.stop()
        log(f"     empty daemon VmRSS {rss_empty / 2**20:.1f} MiB")

        sq = SparkQ(self.workdir("sq-big"), fsync="never", snapshot_interval=3600)
        sq.start()
        got, secs = pipelined_enqueue(sq.socket, "sparkq", big, batch=500, window=50_000,
                                      time_limit=600)
        log(f"     loaded {got:,} tasks in {secs:.1f} s ({got / secs:,.0f}/s), "
            f"VmRSS {sq.rss() / 2**20:.1f} MiB")
        stop_seconds = sq.stop()
        log(f"     graceful stop with snapshot: {stop_seconds:.2f} s")
        start_seconds = sq.start()
        time.sleep(0.5)
        rss_big = sq.rss()
        log(f"     restart to hello: {start_seconds:.2f} s, VmRSS {rss_big / 2**20:.1f} MiB")
        per_task = (rss_big - rss_empty) / big
        self.results.add("7a", f"restart to hello, {big:,} pending", start_seconds, None, None,
                         "<= 5 s", start_seconds <= 5, unit="s",
                         note=f"graceful stop (SIGTERM, snapshot of {big:,} tasks) took "
                              f"{stop_seconds:.2f} s; loading them pipelined took {secs:.1f} s")
        self.results.add("7b", f"RSS per pending task, {big:,}", per_task, None, None,
                         "<= 1024 B", per_task <= 1024, unit="B",
                         note=f"VmRSS {rss_big / 2**20:.1f} MiB after restart, "
                              f"{rss_empty / 2**20:.1f} MiB empty")

        small_sq = SparkQ(self.workdir("sq-small"), fsync="never", snapshot_interval=3600)
        small_sq.start()
        try:
            pipelined_enqueue(small_sq.socket, "sparkq", small, time_limit=60)
            per_round = 100 if self.quick else 200
            rounds = max(self.rounds, 2000 // per_round if not self.quick else 5)
            big_client, small_client = sq.client(), small_sq.client()
            claim_latencies(big_client, 50, 10)  # warm up both
            claim_latencies(small_client, 50, 10)
            xs, ys = interleave(rounds, lambda: claim_latencies(big_client, per_round, 30),
                                lambda: claim_latencies(small_client, per_round, 30))
            big_client.close()
            small_client.close()
        finally:
            small_sq.stop()
            sq.stop()
        all_x = [v for r in xs for v in r]
        all_y = [v for r in ys for v in r]
        mx, my = statistics.median(all_x), statistics.median(all_y)
        round_ratios = [statistics.median(x) / statistics.median(y) for x, y in zip(xs, ys)]
        self.results.add(8, f"claim latency {big // 1000:,}k vs {small:,} pending", mx, my,
                         (mx / my, min(round_ratios), max(round_ratios)), "<= 1.5x",
                         mx / my <= 1.5, unit="us",
                         note=f"{len(all_x):,} claims each, fsync never; ratio = median of all "
                              f"claims, spread = per-round median ratios over {rounds} rounds; "
                              f"p90 {statistics.quantiles(all_x, n=10)[8] * 1e6:.0f} us vs "
                              f"{statistics.quantiles(all_y, n=10)[8] * 1e6:.0f} us")


def use_revision(rev: str, where: Path) -> str:
    """Point SPARKQD and SPARKQCTL at copies of both files as of git revision ``rev``."""
    global SPARKQD, SPARKQCTL
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                            capture_output=True, text=True).stdout.strip()
    where.mkdir()
    for name in ("sparkqd.py", "sparkqctl.py"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{name}"], check=True,
                              capture_output=True).stdout
        (where / name).write_bytes(text)
    SPARKQD = [sys.executable, str(where / "sparkqd.py")]
    SPARKQCTL = [sys.executable, str(where / "sparkqctl.py")]
    return f"git {commit}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="scaled-down counts (< 2 min)")
    parser.add_argument("--rounds", type=int, help="rounds per comparison (default 7, quick 5)")
    parser.add_argument("--only", help="comma-separated benchmarks to run: 1,2,3,4,5,6,7 "
                                       "(7 also runs 8)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--rev", help="benchmark sparkqd.py and sparkqctl.py as of this git "
                                      "revision (e.g. HEAD) instead of the working tree")
    args = parser.parse_args(argv)
    if not os.path.exists(BEANSTALKD):
        print("beanstalkd not found: apt-get install beanstalkd", file=sys.stderr)
        return 2
    selected = set((args.only or "1,2,3,4,5,6,7").replace("8", "7").split(","))
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    # Short paths: a Unix socket path must fit in 107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="sqb-", dir="/tmp"))
    bench = Bench(args, tmp)
    source = "working tree"
    if args.rev:
        source = use_revision(args.rev, tmp / "src")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for key, run in (("1", bench.b1), ("2", bench.b2), ("3", bench.b3), ("4", bench.b4),
                         ("5", bench.b5), ("6", bench.b6), ("7", bench.b78)):
            if key in selected:
                run()
    finally:
        _kill_children()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - started
    print(f"SparkQ core benchmarks of {source} ({'quick' if args.quick else 'full'}, "
          f"{bench.rounds} interleaved rounds per comparison, {elapsed:.0f} s; "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end)")
    print(bench.results.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quick": args.quick, "rounds": bench.rounds, "seconds": elapsed,
                       "rows": bench.results.rows}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
