"""Hardening: a real sparkqd refuses what it cannot keep and stays up under hostile clients.

Payloads and results are JSON values, refused at the door otherwise; durations and
times are bounded; a client that pipelines without reading, sends absurd nesting,
floods the listen backlog or exhausts file descriptors hurts no one else; requeue
keeps dependencies; script tasks retry by their class; a lagging subscriber hears
so without waiting for the next event. Every test drives real daemon processes,
most crash one with kill -9 and check what the next one holds. Nothing is mocked;
waiting is done by polling.
"""

import contextlib
import datetime
import itertools
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import msgspec
import pytest

from conftest import Conn, wait_until
from test_durability import MiB, answers, statuses
from test_observe import pipeline, watcher
from test_scheduling import CONFIG, add, epoch, expect, failed_task, show, started

FRAMINGS = ("json", "msgpack")
TEN_YEARS = 315_360_000  #: the longest duration, and the furthest ahead a time, accepted
DAY = 86400


def nested(depth: int):
    """``depth`` containers inside one another, lists and maps in turn: [{"k": [...]}]."""
    value = []
    for level in range(depth - 1):
        value = {"k": value} if level % 2 == 0 else [value]
    return value


def stamp(epoch_seconds: float) -> str:
    return datetime.datetime.fromtimestamp(epoch_seconds, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


#: What a msgpack client can send that is no JSON value.
NOT_JSON = {
    "bytes": b"\x00\xff",
    "ext": msgspec.msgpack.Ext(7, b"x"),
    "timestamp": datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),
    "nil-key": {None: 1},
    "bool-key": {True: 1},
    "int-key": {1: "a"},
    "float-key": {1.5: "a"},
    "array-key": {(1, 2): "a"},
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": float("-inf"),
    "101-deep": nested(101),
    "bytes-inside": {"files": [{"name": "a.o", "blob": b"\x7f"}]},
}
#: What a JSON-lines client can send that no 64-bit integer holds.
BEYOND_64_BITS = {"2**64": 1 << 64, "-2**63-1": -(1 << 63) - 1}
NOT_JSON_CASES = [pytest.param("msgpack", v, id=k) for k, v in NOT_JSON.items()] + [
    pytest.param("json", v, id=k) for k, v in BEYOND_64_BITS.items()]
#: One case of each kind for results, which pass the same check as payloads.
RESULT_CASES = [case for case in NOT_JSON_CASES
                if case.id in ("bytes", "ext", "nil-key", "nan", "101-deep", "2**64")]
#: JSON values at the edges of what must be kept exactly.
JSON_VALUES = {
    "100-deep": nested(100),
    "int64-min": -(1 << 63),
    "int64-max": (1 << 63) - 1,
    "uint64-low": 1 << 63,
    "uint64-max": (1 << 64) - 1,
    "floats": [0.1, -2.5e-308, 1.7976931348623157e308, 5e-324, -0.0, 1e22],
    "unicode": {"é✓": "日本語 \u0000 \U0001f600", "": "\u2028 \"\\"},
    "mixed": {"a": [1, 2.5, "three", None, True, False, {}], "b": {"c": []}},
}
#: Requests naming a duration, count or time out of bounds: (field, request given a task id).
OUT_OF_BOUNDS = {
    "delay-1e17": ("delay", lambda t: dict(op="enqueue", tool="agent", delay=1e17)),
    "delay-10y+1s": ("delay", lambda t: dict(op="enqueue", tool="agent", delay=TEN_YEARS + 1)),
    "timeout-1e17": ("timeout", lambda t: dict(op="enqueue", tool="agent", timeout=1e17)),
    "max_attempts-1001": ("max_attempts",
                          lambda t: dict(op="enqueue", tool="agent", max_attempts=1001)),
    "at-year-1": ("at", lambda t: dict(op="enqueue", tool="agent", at="0001-01-01T00:00:00Z")),
    "at-1969": ("at", lambda t: dict(op="enqueue", tool="agent", at="1969-12-31T23:59:59Z")),
    "claim-wait-1e17": ("wait", lambda t: dict(op="claim", wait=1e17)),
    "wait-timeout-1e17": ("timeout", lambda t: dict(op="wait", tasks=[t], timeout=1e17)),
}
#: Scripts under {folder}; the class their header names retries once after 1 s.
RETRYING_SCRIPTS = """\
script_dirs: [{folder}]
task_classes: {{retrying: {{timeout: 30, max_attempts: 2, retry_backoff: 1}}}}
tools: {{agent: {{task_class: retrying}}}}
"""
#: Tests of what the event loop itself does (listen backlog, accept, flow control) run on
#: both loops the daemon can use: conftest's ``loop_kind``, parametrized here directly.
EACH_LOOP = pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
GREEDY_REQUESTS = 10_000
RSS_BUDGET = 150 * MiB
BURST = 500  #: watch events of 20 KB: several MiB, past WATCH_MAX_BYTES and the socket buffers


@pytest.fixture
def q(make_daemon):
    """A daemon on test_scheduling's tools: ``agent`` (60 s lease, one attempt) and ``t``."""
    return make_daemon(config=CONFIG)


# -- helpers: talking in either framing ----------------------------------------------


def call_over(d, framing, **request) -> dict:
    """One request on a fresh connection of ``framing``; the whole reply."""
    with contextlib.closing(d.connect(framing)) as conn:
        return conn.call(**request)


def send_in_background(conn, requests) -> threading.Thread:
    """Send the requests pipelined from a thread, as the daemon may stop reading; the thread."""
    sender = threading.Thread(target=conn.send_raw, args=(b"".join(map(conn.frame, requests)),))
    sender.start()
    return sender


def receive(conn, n):
    """The next ``n`` replies, one at a time."""
    return (conn.recv() for _ in range(n))


def refuses(d, field, framing="json", **request) -> None:
    """The request gets bad_request with a message naming ``field``."""
    reply = call_over(d, framing, **request)
    assert not reply["ok"] and reply["error"]["code"] == "bad_request", reply
    assert field in reply["error"]["message"], reply["error"]


def seen(d, framing, field="payload") -> dict:
    """{id: field} of every task, as `tasks` shows them to a client of ``framing``."""
    with contextlib.closing(d.connect(framing)) as conn:
        return {t["id"]: t[field] for t in conn.ok(op="tasks")}


def exact(value):
    """A form of ``value`` equal only to the same value with the same types (NaN, -0.0 too)."""
    if isinstance(value, dict):
        return {(type(k).__name__, repr(k)): exact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [exact(v) for v in value]
    if isinstance(value, msgspec.msgpack.Ext):
        return ("Ext", value.code, value.data)
    return (type(value).__name__, repr(value))


def msgpack_enqueue(raw_payload: bytes) -> bytes:
    """A length-prefixed msgpack enqueue whose payload is the given msgpack bytes."""
    head = msgspec.msgpack.encode({"op": "enqueue", "tool": "agent"})
    body = bytes([head[0] + 1]) + head[1:] + msgspec.msgpack.encode("payload") + raw_payload
    return len(body).to_bytes(4, "big") + body


# -- helpers: crashes ---------------------------------------------------------------


def crash(d) -> None:
    """kill -9 and start again: the state comes back from the journal."""
    d.kill()
    d.start()


def crash_after_snapshot(d) -> None:
    """Let a snapshot cover the journal (or fail), then kill -9 and start: state from SQLite."""
    seq = d.ok(op="status")["journal"]["seq"]
    wait_until(lambda: (s := d.ok(op="status")["snapshot"])["error"] or (s["seq"] or 0) >= seq,
               message="a snapshot covering the journal")
    crash(d)


# -- helpers: the daemon process ------------------------------------------------------


def proc_fields(pid) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, ..., utime, stime, ..."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def rss(pid) -> int:
    """Resident memory in bytes, from /proc/PID/status."""
    line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines()
                if l.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@contextlib.contextmanager
def memory_growth(pid):
    """Sample VmRSS every 10 ms; yields a function giving the peak above the first sample."""
    start, peak, done = rss(pid), [0], threading.Event()

    def sample():
        with contextlib.suppress(OSError, StopIteration):
            while not done.wait(0.01):
                peak[0] = max(peak[0], rss(pid) - start)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield lambda: peak[0]
    finally:
        done.set()
        sampler.join()


def idle(pid, quiet=0.3, timeout=30) -> None:
    """Wait until the process has used no CPU for ``quiet`` seconds."""
    last = [None, 0.0]

    def still():
        ticks = proc_fields(pid)[11:13]
        if ticks != last[0]:
            last[:] = [ticks, time.monotonic()]
        return time.monotonic() - last[1] >= quiet

    wait_until(still, timeout, interval=0.05, message="the daemon to go idle")


@contextlib.contextmanager
def frozen(d):
    """The daemon stopped by SIGSTOP, so it accepts nothing, until the block ends."""
    d.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: proc_fields(d.proc.pid)[0] == "T", message="the daemon to stop")
        yield
    finally:
        d.proc.send_signal(signal.SIGCONT)


def connect_now(path) -> socket.socket | None:
    """A connection made without waiting, or None when the listen backlog is full."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(str(path))
    except BlockingIOError:
        sock.close()
        return None
    sock.settimeout(10)
    return sock


def says_hello(sock) -> bool:
    sock.sendall(b'{"op": "hello"}\n')
    with sock.makefile("rb") as reader:
        return json.loads(reader.readline())["ok"]


def listen_backlog(path) -> int | None:
    """The backlog of the socket listening on ``path``: its Send-Q column in `ss -xln`."""
    out = subprocess.run(["ss", "-xlnH"], capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines()]
    return next((int(row[3]) for row in rows if len(row) > 4 and row[4] == str(path)), None)


def fd_limited(d, limit: int):
    """Start ``d`` with its argv prefixed by prlimit --nofile=limit:limit."""
    plain = d.args
    d.args = lambda: ["prlimit", f"--nofile={limit}:{limit}", *plain()]
    return d.start()


def held_until_refused(d, most=300) -> list[Conn]:
    """Open connections, each answering hello, until one is not answered (or ``most``)."""
    held = []
    for _ in range(most):
        conn = None
        try:
            conn = Conn(d.socket, timeout=2)
            if conn.call(op="hello")["ok"]:
                held.append(conn)
                continue
        except (OSError, EOFError):
            pass
        if conn is not None:
            conn.close()
        break
    return held


def complaints(log: str) -> list[str]:
    """The WARNING, ERROR and CRITICAL lines of a daemon log."""
    return [line for line in log.splitlines()
            if re.search(r"\] (WARNING|ERROR|CRITICAL) ", line)]


# -- helpers: dependencies and watching --------------------------------------------------


def failed_chain(q, length) -> list[int]:
    """Tasks each after the one before; the first claimed and failed, the rest fail by cascade."""
    ids = [add(q)]
    for _ in range(length - 1):
        ids.append(add(q, after=[ids[-1]]))
    started(q, ids[0])
    q.ok(op="fail", task=ids[0], reason="tests red", final=True)
    for dependency, task in zip(ids, ids[1:]):
        expect(q, task, status="failed", reason=f"dependency {dependency} failed")
    return ids


def claims_in_order(q, ids) -> None:
    """Claims hand out exactly ``ids`` in turn, each only once the one before completed."""
    for task in ids:
        claimed = q.ok(op="claim")
        assert claimed is not None and claimed["id"] == task, (task, claimed)
        assert q.ok(op="claim") is None, f"more than {task} claimable"
        q.ok(op="complete", task=task)


def read_until_lagged(conn, timeout=5.0) -> list[dict]:
    """Messages up to the first that is not task.created, or until none came for ``timeout``."""
    conn.sock.settimeout(timeout)
    messages = []
    with contextlib.suppress(TimeoutError):
        while not messages or messages[-1]["event"] == "task.created":
            messages.append(conn.recv())
    return messages


# -- 1. payload and result are JSON values -------------------------------------------------


@pytest.mark.parametrize("framing, value", NOT_JSON_CASES)
def test_payload_not_json_refused_and_nothing_applied(q, framing, value):
    """An enqueue with a payload JSON cannot hold: bad_request naming payload, no task, no id."""
    first = add(q, payload="first")
    refuses(q, "payload", framing, op="enqueue", tool="agent", payload=value)
    last = add(q, payload="last")
    kept = {first: "first", last: "last"}
    assert (last, seen(q, "json"), seen(q, "msgpack")) == (first + 1, kept, kept)
    crash(q)
    assert seen(q, "json") == seen(q, "msgpack") == kept
    assert "Traceback" not in q.logs()


@pytest.mark.parametrize("framing, value", RESULT_CASES)
def test_result_not_json_refused_and_task_stays_running(q, framing, value):
    """A complete with a result JSON cannot hold: bad_request naming result; the task runs on."""
    task = add(q)
    started(q, task)
    refuses(q, "result", framing, op="complete", task=task, result=value)
    assert seen(q, "json", "status") == seen(q, "msgpack", "status") == {task: "running"}
    q.ok(op="complete", task=task, result={"ok": True})
    crash(q)
    expect(q, task, status="completed", result={"ok": True})


@pytest.mark.parametrize("framing", FRAMINGS)
def test_json_values_at_the_limits_come_back_identical_after_kill_9(q, framing):
    """Payloads and results 100 deep, at the 64-bit bounds, floats, unicode: kept exactly."""
    conn = q.connect(framing)
    sent = {conn.ok(op="enqueue", tool="agent", payload=v)["id"]: v for v in JSON_VALUES.values()}
    for task, value in sent.items():
        started(q, task)
        conn.ok(op="complete", task=task, result=value)
    for recover in (crash, crash_after_snapshot):
        recover(q)
        for view, field in itertools.product(FRAMINGS, ("payload", "result")):
            assert exact(seen(q, view, field)) == exact(sent), (recover.__name__, view, field)


# -- 2. bounded durations, counts and times --------------------------------------------------


@pytest.mark.parametrize("case", OUT_OF_BOUNDS)
def test_bounds_beyond_ten_years_refused_and_nothing_applied(q, case):
    """delay, timeout, wait, at beyond 10 years or max_attempts over 1000: bad_request naming it."""
    field, request = OUT_OF_BOUNDS[case]
    first = add(q)
    refuses(q, field, **request(first))
    last = add(q)
    assert (last, statuses(q)) == (first + 1, {first: "pending", last: "pending"})
    expect(q, first, status="pending", attempts=0)


def test_bounds_at_ten_years_accepted_and_kept_across_kill_9(q):
    """delay and timeout of 10 years, max_attempts 1000, at in 2099 and in 9999: kept as given."""
    ids = [add(q, delay=TEN_YEARS), add(q, timeout=TEN_YEARS), add(q, max_attempts=1000),
           add(q, at="2099-01-01T12:00:00Z"), add(q, at="9999-12-31T23:59:59Z")]
    before = [show(q, task) for task in ids]
    crash(q)
    assert [show(q, task) for task in ids] == before


# -- 3. a client that pipelines and never reads ----------------------------------------------


@EACH_LOOP
def test_pipelined_requests_never_read_keep_memory_bounded_and_others_served(q):
    """10,000 unread pipelined `tasks`: RSS grows < 150 MiB, others served, all come in order."""
    pipeline(q.connect(), [{"op": "enqueue", "tool": "agent", "payload": "x" * 5000}] * 200)
    with memory_growth(q.proc.pid) as growth:
        greedy = q.connect("msgpack")
        sender = send_in_background(greedy, [{"op": "tasks", "limit": 20, "id": i}
                                             for i in range(GREEDY_REQUESTS)])
        assert q.ok(op="hello")["protocol"] == 1
        idle(q.proc.pid)
        assert growth() < RSS_BUDGET, f"{growth() / MiB:.0f} MiB more while the client did not read"
        replies = [(r["id"], r["ok"], len(r["result"])) for r in receive(greedy, GREEDY_REQUESTS)]
        sender.join()
    assert replies == [(i, True, 20) for i in range(GREEDY_REQUESTS)]
    assert growth() < RSS_BUDGET, f"{growth() / MiB:.0f} MiB more while the client read"


# -- 4. absurd nesting on the wire ---------------------------------------------------------


def test_json_line_nested_100000_deep_gets_bad_request_and_connection_stays(daemon):
    """A JSON line of 100,000 `[` gets bad_request; the connection answers on; no Traceback."""
    conn = daemon.connect()
    conn.ok(op="hello")  # the connection speaks JSON lines
    conn.send_raw(b"[" * 100_000 + b"\n")
    assert conn.recv()["error"]["code"] == "bad_request"
    assert conn.ok(op="hello")["protocol"] == 1
    assert "Traceback" not in daemon.logs()


@pytest.mark.parametrize("framing", FRAMINGS)
def test_enqueue_payload_nested_100000_deep_refused_and_connection_stays(q, framing):
    """An enqueue with a payload 100,000 deep gets bad_request, no task; the connection goes on."""
    conn = q.connect(framing)
    conn.ok(op="hello")
    deep = (b'{"op": "enqueue", "tool": "agent", "payload": ' + b"[" * 100_000 + b"]" * 100_000
            + b"}\n") if framing == "json" else msgpack_enqueue(b"\x91" * 100_000 + b"\x90")
    conn.send_raw(deep)
    assert conn.recv()["error"]["code"] == "bad_request"
    assert (conn.ok(op="tasks"), add(q)) == ([], 1)
    assert "Traceback" not in q.logs()


# -- 5. the listen backlog -------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
@EACH_LOOP
def test_listen_backlog_is_1024(daemon):
    """`ss -xln` shows 1024 as the listening socket's backlog (Send-Q)."""
    assert listen_backlog(daemon.socket) == 1024


@EACH_LOOP
def test_backlog_holds_300_connections_made_while_the_daemon_is_stopped(daemon):
    """300 connections made while the daemon is SIGSTOPped all succeed and get hello answered."""
    if int(Path("/proc/sys/net/core/somaxconn").read_text()) < 1024:
        pytest.skip("net.core.somaxconn caps every backlog below 1024 here")
    with frozen(daemon):
        socks = [connect_now(daemon.socket) for _ in range(300)]
    assert sum(s is not None for s in socks) == 300
    assert all(says_hello(s) for s in socks)


# -- 6. the file-descriptor limit --------------------------------------------------------------


@EACH_LOOP
def test_fd_limit_logs_one_warning_and_keeps_serving(make_daemon):
    """At a 64-fd limit: a warning (two at most), no Traceback, connections served, then new ones."""
    d = fd_limited(make_daemon(start=False), 64)
    mark = len(d.logs())
    held = held_until_refused(d)
    assert len(held) >= 30, f"refused after {len(held)} connections: not the fd limit"
    time.sleep(2)  # the daemon sits at its limit: this is what is under test
    assert held[0].ok(op="hello")["protocol"] == 1
    for conn in held:
        conn.close()
    wait_until(lambda: answers(d), message="hello once the connections closed")
    log = d.logs()[mark:]
    assert "Traceback" not in log
    assert 1 <= len(complaints(log)) <= 2, complaints(log)[:5] or "no warning logged"


# -- 7. requeue keeps dependencies -------------------------------------------------------------


def test_requeue_dependent_alone_waits_for_its_failed_dependency(q):
    """requeue B, failed because A failed: B waits for A and is not claimable while A is failed."""
    a, b = failed_chain(q, 2)
    q.ok(op="requeue", task=b)
    expect(q, b, status="waiting", waiting_for="after", after=[a], reason=None)
    assert q.ok(op="claim") is None
    expect(q, a, status="failed")


def test_requeue_dependency_requeues_what_failed_only_because_of_it(q):
    """requeue A: B waits for A, C for B; D, after X and A but failed because of X, stays failed."""
    a, b, c = failed_chain(q, 3)
    x = failed_task(q)  # claimed and failed by its worker
    d = add(q, after=[x, a])
    expect(q, d, status="failed", reason=f"dependency {x} failed")
    q.ok(op="requeue", task=a)
    expect(q, a, status="pending")
    for task in (b, c):
        expect(q, task, status="waiting", waiting_for="after", reason=None)
    expect(q, d, status="failed", reason=f"dependency {x} failed")
    expect(q, x, status="failed", reason="broken")


def test_requeue_dependency_then_completing_releases_the_chain_in_order(q):
    """After requeue A and a kill -9: A is claimable, then B once A completed, then C after B."""
    chain = failed_chain(q, 3)
    q.ok(op="requeue", task=chain[0])
    crash(q)
    claims_in_order(q, chain)


def test_requeue_bulk_failed_chain_leaves_dependents_waiting(q):
    """requeue stream default, status failed, on a failed chain: A pending, B and C waiting."""
    a, b, c = failed_chain(q, 3)
    assert q.ok(op="requeue", stream="default", status="failed")["requeued"] == 3
    expect(q, a, status="pending")
    for task in (b, c):
        expect(q, task, status="waiting", waiting_for="after")
    claims_in_order(q, [a, b, c])


# -- 8. script tasks retry by their class ---------------------------------------------------------


def test_script_task_retries_after_its_class_backoff(make_daemon, workdir):
    """A script whose class has retry_backoff 1 waits 1-1.25 s after a failed attempt, not 10 s."""
    (workdir / "scripts").mkdir()
    (workdir / "scripts" / "flaky.sh").write_text("#!/bin/bash\n# task_class: retrying\nexit 1\n")
    d = make_daemon(config=RETRYING_SCRIPTS.format(folder=workdir / "scripts"))
    task = d.ok(op="enqueue", script="flaky")["id"]
    started(d, task)
    d.ok(op="fail", task=task, reason="flaky")
    record = expect(d, task, status="waiting", waiting_for="retry", max_attempts=2)
    backoff = epoch(record["ready_at"]) - epoch(record["history"][-1]["at"])
    assert 1 - 0.001 <= backoff <= 1.25 + 0.001, backoff  # shown to the millisecond


# -- 9. a lagging subscriber ---------------------------------------------------------------------


@EACH_LOOP
def test_watch_lagged_subscriber_told_as_soon_as_it_reads_again(q):
    """A subscriber overflowed while not reading gets lagged, with the count, once it reads."""
    stuck = watcher(q)
    pipeline(q.connect(), [{"op": "enqueue", "tool": "agent", "payload": "x" * 20_000}] * BURST)
    messages = read_until_lagged(stuck)
    created = [m for m in messages if m["event"] == "task.created"]
    assert len(created) < BURST, "the burst did not overflow the subscriber"
    assert messages == [*created, {"event": "lagged", "missed": BURST - len(created)}]


# -- 10. what a msgpack client got accepted comes back exactly -----------------------------------


def test_payload_msgpack_got_accepted_comes_back_exactly_after_kill_9(q):
    """Any payload of NOT_JSON the daemon accepted (none, once refused) reads back exactly."""
    conn = q.connect("msgpack")
    replies = [(conn.call(op="enqueue", tool="agent", payload=v), v) for v in NOT_JSON.values()]
    accepted = {reply["result"]["id"]: value for reply, value in replies if reply["ok"]}
    for recover in (crash, crash_after_snapshot):
        recover(q)
        for view in ("msgpack", "json"):
            assert exact(seen(q, view)) == exact(accepted), (recover.__name__, view)
