"""The wire protocol against a real sparkqd: framing, replies, errors, claims and the socket.

Every test talks to a daemon on a temporary socket, exactly as a client program
would, and polls with a timeout instead of sleeping.
"""

import json
import os
import re
import shutil
import select
import signal
import socket
import stat
import struct
import subprocess
import threading
import time

import msgspec
import pytest

from conftest import SPARKQD, Daemon, wait_until
from sparkqd import PROTOCOL, VERSION

FRAMINGS = ["json", "msgpack"]
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
OPS = ("hello", "status", "session.create", "session.end", "session.list", "stream.create",
       "stream.end", "stream.list", "enqueue", "peek", "claim", "complete", "fail", "requeue",
       "task", "tasks", "purge", "tools", "reload", "shutdown", "schema")
SMALL_FRAMES = "server: {max_frame_bytes: 4096}\n"
NOBODY = 65534
HELLO = {"version": VERSION, "protocol": PROTOCOL}


# -- helpers ------------------------------------------------------------------


def connect(daemon, framing="json"):
    """A connection whose framing is already chosen by a first request."""
    conn = daemon.connect(framing)
    conn.ok(op="hello")
    return conn


def enqueue(conn, stream="default", payload=None):
    """Add an agent task (no command runs it) and return its record."""
    return conn.ok(op="enqueue", stream=stream, tool="llm-haiku", payload=payload)


def running(conn):
    """Enqueue a task into an empty default stream, claim it, return its id."""
    task_id = enqueue(conn)["id"]
    assert conn.ok(op="claim")["id"] == task_id
    return task_id


def refused(conn, bystander, request):
    """Send one bad request (a dict or raw bytes); return its error once both clients are served."""
    conn.send_raw(request if isinstance(request, bytes) else conn.frame(request))
    reply = conn.recv()
    assert reply["ok"] is False and set(reply) == {"id", "ok", "error"}, reply
    assert set(reply["error"]) == {"code", "message"} and reply["error"]["message"], reply
    assert conn.ok(op="hello") and bystander.ok(op="status")
    return reply["error"]


def start_refused(daemon) -> str:
    """Start a daemon that must refuse to run; return its log once it exited non-zero, cleanly."""
    daemon.start(wait=False)
    assert daemon.proc.wait(20) != 0
    logs = daemon.logs()
    assert "Traceback" not in logs, logs
    return logs


def claim_all(daemon, claimed):
    """Claim from the default stream until it is empty, appending each id to ``claimed``."""
    conn = daemon.connect()
    while (task := conn.ok(op="claim")) is not None:
        claimed.append(task["id"])


def connections(daemon):
    """How many clients the daemon counts, the asking one included."""
    return daemon.ok(op="status")["connections"]


def as_nobody(path, line: bytes) -> bytes:
    """Send ``line`` to the socket at ``path`` from a forked child running as uid 65534."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(line)
            os.write(write_end, sock.recv(65536))
        except BaseException as exc:
            os.write(write_end, f"child failed: {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read()
    os.waitpid(pid, 0)
    return out


class DefaultSocketDaemon(Daemon):
    """A sparkqd given no --socket and no $SPARKQ_SOCKET, with $XDG_RUNTIME_DIR set."""

    def __init__(self, workdir):
        super().__init__(workdir, env={"XDG_RUNTIME_DIR": str(workdir / "run")})
        self.socket = workdir / "run" / "sparkq" / "sparkqd.sock"

    @property
    def env(self):
        env = super().env
        del env["SPARKQ_SOCKET"]
        return env

    def args(self):
        return [*SPARKQD, "--data-dir", str(self.data_dir)]



@pytest.fixture
def clients(daemon):
    """Two JSON clients: one sends bad input, the other must keep being served meanwhile."""
    return connect(daemon), connect(daemon)


@pytest.fixture
def shared_clients(shared):
    """Two JSON clients of the shared daemon, as ``clients``."""
    pair = connect(shared), connect(shared)
    yield pair
    for conn in pair:
        conn.close()


@pytest.fixture
def small(make_daemon):
    """A daemon that refuses frames over 4096 bytes."""
    return make_daemon(config=SMALL_FRAMES)


@pytest.fixture
def default_socket_daemon(workdir):
    """A not yet started daemon that must find its socket path by the defaults."""
    (workdir / "run").mkdir(mode=0o700)
    daemon = DefaultSocketDaemon(workdir)
    yield daemon
    daemon.kill()
    if daemon.log is not None:
        daemon.log.close()


# -- framing ------------------------------------------------------------------


def test_framing_json_lines_chosen_by_brace(shared):
    """A connection opening with `{` is answered in JSON lines: one object, one newline."""
    sock = shared.connect().sock
    sock.sendall(b'{"op": "hello", "id": 1}\n')
    raw = sock.recv(65536)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert json.loads(raw) == {"id": 1, "ok": True, "result": HELLO}


def test_framing_msgpack_chosen_by_other_first_byte(shared):
    """A connection opening with a length header is answered in length-prefixed msgpack."""
    sock = shared.connect().sock
    body = msgspec.msgpack.encode({"op": "hello", "id": 1})
    sock.sendall(struct.pack(">I", len(body)) + body)
    raw = sock.recv(65536)
    (length,) = struct.unpack(">I", raw[:4])
    assert length == len(raw) - 4
    assert msgspec.msgpack.decode(raw[4:]) == {"id": 1, "ok": True, "result": HELLO}


@pytest.mark.parametrize("framing", FRAMINGS)
def test_reply_echoes_id_of_any_type(shared, framing):
    """The `id` of a request comes back unchanged, whatever its type."""
    conn = shared.connect(framing)
    for request_id in (7, "req-7", [1, "two", None], None, {"nested": [1]}, 2.5, True):
        reply = conn.call(op="hello", id=request_id)
        assert reply["id"] == request_id and reply["ok"] is True, reply


@pytest.mark.parametrize("framing", FRAMINGS)
def test_reply_shapes_success_and_error(shared, framing):
    """Success is {id, ok: true, result}; refusal is {id, ok: false, error: {code, message}}."""
    conn = shared.connect(framing)
    assert set(conn.call(op="peek", id=1)) == {"id", "ok", "result"}
    error = conn.call(op="task", task=999, id=[2])
    assert error["id"] == [2] and error["ok"] is False and set(error) == {"id", "ok", "error"}
    assert error["error"]["code"] == "not_found" and "999" in error["error"]["message"]


#: ids whose bytes a decode and re-encode would change: a msgpack timestamp with
#: nanoseconds (a datetime holds microseconds), JSON numbers in another spelling.
EXACT_IDS = [
    ("msgpack", b"\xd7\xff\xed\x40\x03\xa0\x4e\xc6\x42\x5e"),
    ("json", b"1.50e2"), ("json", b'{"b": 1, "a": [1.0, -0]}'),
]


@pytest.mark.parametrize("framing, raw_id", EXACT_IDS)
def test_reply_echoes_id_byte_for_byte(shared, framing, raw_id):
    """The `id` comes back exactly as the client encoded it, valid request or not."""
    conn = shared.connect(framing)
    for op in (b"hello", b"frobnicate"):
        if framing == "json":
            conn.send_raw(b'{"op": "' + op + b'", "id": ' + raw_id + b"}\n")
            line = conn.sock.makefile("rb").readline()
            assert line.startswith(b'{"id":' + raw_id + b',"ok":'), line
        else:
            body = b"\x82\xa2op" + bytes([0xa0 | len(op)]) + op + b"\xa2id" + raw_id
            conn.send_raw(struct.pack(">I", len(body)) + body)
            reply = conn.sock.recv(65536)
            assert reply[4:].startswith(b"\x83\xa2id" + raw_id), reply


def test_reply_echoes_id_of_invalid_request(shared):
    """A request refused by validation still gets its own id back."""
    reply = shared.call(op="task", task="5", id="mine")
    assert reply["id"] == "mine" and reply["error"]["code"] == "bad_request"
    assert shared.call(op="frobnicate", id=["x"])["id"] == ["x"]


def test_msgpack_values_encoding_to_newline_round_trip(daemon):
    """msgpack values holding the byte 0x0A (the int 10, ten-byte frames, task id 10) survive."""
    conn = daemon.connect("msgpack")
    assert len(msgspec.msgpack.encode({"op": "hello"})) == 10  # its header is 00 00 00 0A
    assert conn.ok(op="hello")["protocol"] == 1
    for _ in range(10):
        last = conn.call(op="enqueue", id=10, tool="llm-haiku", payload=10)
    assert last["id"] == 10 and last["result"]["id"] == 10
    task = conn.ok(op="task", task=10, id="0123456789")
    assert task["payload"] == 10 and task["id"] == 10
    odd = ["\n" * 10, 10, [10] * 10, {"k" * 10: "\n"}]
    assert conn.ok(op="enqueue", tool="llm-haiku", payload=odd)["payload"] == odd


@pytest.mark.parametrize("framing", FRAMINGS)
def test_pipelined_requests_answered_in_order(daemon, framing):
    """200 requests sent in one write get 200 replies, in request order, with their ids."""
    conn = daemon.connect(framing)
    conn.send_raw(b"".join(conn.frame({"op": "enqueue", "id": f"r{i}", "tool": "llm-haiku",
                                       "payload": i}) for i in range(200)))
    replies = [conn.recv() for _ in range(200)]
    assert [r["id"] for r in replies] == [f"r{i}" for i in range(200)]
    assert [r["result"]["payload"] for r in replies] == list(range(200))
    assert [r["result"]["id"] for r in replies] == list(range(1, 201))


# -- bad input ----------------------------------------------------------------

BAD_REQUESTS = {
    "malformed JSON": b'{"op": "status"\n',
    "JSON array": b'[{"op": "status"}]\n',
    "JSON number": b"42\n",
    "task as string": {"op": "task", "task": "5"},
    "stream as number": {"op": "enqueue", "tool": "llm-haiku", "stream": 7},
    "negative timeout": {"op": "enqueue", "tool": "llm-haiku", "timeout": -1},
    "negative wait": {"op": "claim", "wait": -1},
    "unknown field": {"op": "status", "colour": "blue"},
    "unknown tool": {"op": "enqueue", "tool": "no-such-tool"},
    "bad session name": {"op": "session.create", "name": "no spaces allowed"},
}

NOT_FOUND = {
    "task": {"op": "task", "task": 999},
    "complete task": {"op": "complete", "task": 999},
    "enqueue stream": {"op": "enqueue", "tool": "llm-haiku", "stream": "nope"},
    "claim stream": {"op": "claim", "stream": "nope"},
    "stream session": {"op": "stream.create", "name": "s1", "session": "nope"},
    "end session": {"op": "session.end", "name": "nope"},
    "end stream": {"op": "stream.end", "name": "nope"},
}


@pytest.mark.parametrize("request_", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_input_gets_bad_request(shared_clients, request_):
    """Malformed or mistyped input gets bad_request; this client and another keep being served."""
    assert refused(*shared_clients, request_)["code"] == "bad_request"


@pytest.mark.parametrize("request_", NOT_FOUND.values(), ids=NOT_FOUND.keys())
def test_unknown_name_gets_not_found(shared_clients, request_):
    """A task, stream or session that does not exist gets not_found."""
    assert refused(*shared_clients, request_)["code"] == "not_found"


def test_unknown_op_named_in_error(shared_clients):
    """An unknown op gets bad_request with a message naming the op."""
    error = refused(*shared_clients, {"op": "frobnicate"})
    assert error["code"] == "bad_request" and "frobnicate" in error["message"]


def test_missing_op_said_in_error(shared_clients):
    """A request without an op gets bad_request saying the op is missing."""
    error = refused(*shared_clients, {"stream": "default"})
    assert error["code"] == "bad_request" and "op" in error["message"]


def test_msgpack_garbage_body_gets_bad_request(shared):
    """A msgpack frame whose body is not msgpack gets bad_request; the connection goes on."""
    conn, bystander = connect(shared, "msgpack"), connect(shared)
    garbage = struct.pack(">I", 4) + b"\xc1\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    assert refused(conn, bystander, garbage)["code"] == "bad_request"


def test_msgpack_non_map_gets_bad_request(shared):
    """A msgpack frame holding a list instead of a map gets bad_request."""
    conn, bystander = connect(shared, "msgpack"), connect(shared)
    body = msgspec.msgpack.encode(["op", "status"])
    assert refused(conn, bystander, struct.pack(">I", len(body)) + body)["code"] == "bad_request"


def test_complete_pending_task_conflict(clients):
    """Completing a task nobody claimed is a conflict."""
    task = enqueue(clients[0])
    assert refused(*clients, {"op": "complete", "task": task["id"]})["code"] == "conflict"


def test_complete_twice_conflict(clients):
    """Completing a task a second time is a conflict."""
    task_id = running(clients[0])
    clients[0].ok(op="complete", task=task_id)
    assert refused(*clients, {"op": "complete", "task": task_id})["code"] == "conflict"


def test_fail_completed_task_conflict(clients):
    """Failing a completed task is a conflict."""
    task_id = running(clients[0])
    clients[0].ok(op="complete", task=task_id)
    request = {"op": "fail", "task": task_id, "reason": "late"}
    assert refused(*clients, request)["code"] == "conflict"


def test_requeue_pending_task_conflict(clients):
    """Requeueing a task that is already pending is a conflict."""
    task = enqueue(clients[0])
    assert refused(*clients, {"op": "requeue", "task": task["id"]})["code"] == "conflict"


def test_create_existing_session_conflict(clients):
    """Creating a session that exists is a conflict."""
    error = refused(*clients, {"op": "session.create", "name": "default"})
    assert error["code"] == "conflict" and "default" in error["message"]


def test_create_existing_stream_conflict(clients):
    """Creating a stream that exists is a conflict."""
    request = {"op": "stream.create", "name": "default", "session": "default"}
    assert refused(*clients, request)["code"] == "conflict"


def test_enqueue_into_ended_stream_conflict(clients):
    """An ended stream refuses new tasks with conflict."""
    clients[0].ok(op="stream.end", name="default")
    request = {"op": "enqueue", "tool": "llm-haiku"}
    assert refused(*clients, request)["code"] == "conflict"


@pytest.mark.parametrize("framing", FRAMINGS)
def test_oversized_frame_too_large_and_closed(small, framing):
    """A complete frame over max_frame_bytes gets too_large, then the connection closes."""
    conn, bystander = connect(small, framing), connect(small)
    conn.send(op="enqueue", tool="llm-haiku", payload="x" * 5000)
    assert conn.recv()["error"]["code"] == "too_large"
    assert conn.closed_by_peer()
    assert bystander.ok(op="status") and connect(small, framing).ok(op="peek") is None


def test_msgpack_oversized_header_too_large_before_body(small):
    """A msgpack length header over the limit is refused without waiting for the body."""
    conn, bystander = connect(small, "msgpack"), connect(small)
    conn.send_raw(struct.pack(">I", 1 << 30))
    assert conn.recv()["error"]["code"] == "too_large"
    assert conn.closed_by_peer() and bystander.ok(op="status")


def test_json_line_without_newline_too_large(small):
    """A JSON line growing past the limit without a newline gets too_large and is closed."""
    conn, bystander = connect(small), connect(small)
    conn.send_raw(b'{"op": "enqueue", "tool": "llm-haiku", "payload": "' + b"x" * 5000)
    assert conn.recv()["error"]["code"] == "too_large"
    assert conn.closed_by_peer() and bystander.ok(op="status")


def test_frame_under_limit_accepted(small):
    """A frame just under max_frame_bytes is served normally."""
    task = enqueue(connect(small), payload="x" * 3900)
    assert len(task["payload"]) == 3900


# -- claims that wait ---------------------------------------------------------


def test_claim_wait_gets_task_once_enqueued(daemon):
    """A claim waiting 5 s gets a task as soon as another client enqueues it; others are served."""
    waiter, producer, bystander = connect(daemon), connect(daemon), connect(daemon)
    waiter.send(op="claim", wait=5, worker="w1")
    started = time.monotonic()
    assert bystander.ok(op="status") and time.monotonic() - started < 1
    task = enqueue(producer, payload="job")
    enqueued = time.monotonic()
    assert waiter.recv()["result"]["id"] == task["id"]
    assert time.monotonic() - enqueued < 1


def test_claim_wait_times_out_with_null(daemon):
    """A claim waiting 0.3 s on an empty stream answers null after about 0.3 s."""
    conn = connect(daemon)
    started = time.monotonic()
    assert conn.call(op="claim", wait=0.3) == {"id": None, "ok": True, "result": None}
    assert 0.28 <= time.monotonic() - started < 2


def test_claim_wait_of_gone_client_leaves_task(daemon):
    """A waiting claim whose client disconnected does not swallow the next task."""
    waiter, other = connect(daemon), connect(daemon)
    waiter.send(op="claim", wait=5)
    wait_until(lambda: connections(daemon) == 3, message="both clients to be counted")
    waiter.close()
    wait_until(lambda: connections(daemon) == 2, message="the daemon to see the client go")
    task = enqueue(other)
    assert other.ok(op="claim")["id"] == task["id"]


def parked(daemon, *workers):
    """Wait until the daemon has taken these workers' claims (they are parked)."""
    wait_until(lambda: set(workers) <= {w["name"] for w in daemon.ok(op="workers")},
               message=f"the claims of {workers} to be parked")


def silent(conn, seconds=0.3) -> bool:
    """Whether nothing arrives on ``conn`` for ``seconds``: its request still waits."""
    return not select.select([conn.sock], [], [], seconds)[0]


def test_an_enqueue_goes_to_the_longest_waiting_claim_and_the_others_keep_waiting(daemon):
    """Three claims wait; one task goes to the first of them, and the other two keep waiting
    (and their places) until two more tasks arrive together."""
    waiters = [connect(daemon) for _ in range(3)]
    for n, waiter in enumerate(waiters):
        waiter.send(op="claim", wait=20, worker=f"w{n}")
        parked(daemon, f"w{n}")
    producer = connect(daemon)
    first = enqueue(producer, payload="one")
    assert waiters[0].recv()["result"]["id"] == first["id"]
    assert silent(waiters[1]) and silent(waiters[2], 0)
    producer.send_raw(b"".join(producer.frame({"op": "enqueue", "tool": "llm-haiku", "payload": p})
                               for p in ("two", "three")))
    ids = [producer.recv()["result"]["id"] for _ in range(2)]
    assert [w.recv()["result"]["id"] for w in waiters[1:]] == ids


def test_a_waiting_claim_for_other_tools_keeps_its_place_while_a_later_one_is_served(daemon):
    """A task only the second waiting claim's tool filter takes goes to it; the first claim
    still gets the next task of its own tool."""
    sonnet, haiku, producer = connect(daemon), connect(daemon), connect(daemon)
    sonnet.send(op="claim", tool="llm-sonnet", wait=20, worker="s")
    parked(daemon, "s")
    haiku.send(op="claim", tool="llm-haiku", wait=20, worker="h")
    parked(daemon, "h")
    task = enqueue(producer, payload="for haiku")
    assert haiku.recv()["result"]["id"] == task["id"]
    assert silent(sonnet)
    later = producer.ok(op="enqueue", tool="llm-sonnet", payload="for sonnet")
    assert sonnet.recv()["result"]["id"] == later["id"]


def test_a_claim_waiting_on_two_streams_takes_one_task_and_leaves_the_other(daemon):
    """A claim waiting on two streams takes one of two tasks that arrive together; the claim
    waiting on one of those streams behind it gets the other."""
    producer = connect(daemon)
    producer.ok(op="stream.create", name="second", session="default")
    both, one = connect(daemon), connect(daemon)
    both.send(op="claim", stream=["default", "second"], wait=20, worker="both")
    parked(daemon, "both")
    one.send(op="claim", stream="default", wait=20, worker="one")
    parked(daemon, "one")
    producer.send_raw(b"".join(producer.frame(
        {"op": "enqueue", "stream": stream, "tool": "llm-haiku"}) for stream in ("second", "default")))
    second, default = (producer.recv()["result"]["id"] for _ in range(2))
    assert both.recv()["result"]["id"] == second  # the oldest task of the two it could take
    assert one.recv()["result"]["id"] == default


def test_a_task_enqueued_while_claims_are_handed_out_reaches_the_claim_that_waits_for_it(daemon):
    """The claim served from a stream's waiting claims answers its client's next requests at
    once (an enqueue of another tool, then a read): the task that enqueue added still goes to
    the claim that waits for its tool, not at its deadline."""
    sonnet, haiku, producer = connect(daemon), connect(daemon), connect(daemon)
    sonnet.send(op="claim", tool="llm-sonnet", wait=20, worker="s")
    parked(daemon, "s")
    haiku.send_raw(b"".join(haiku.frame(m) for m in (
        {"op": "claim", "tool": "llm-haiku", "wait": 20, "worker": "h"},
        {"op": "enqueue", "tool": "llm-sonnet", "payload": "for sonnet"}, {"op": "status"})))
    parked(daemon, "h")
    enqueue(producer, payload="for haiku")
    assert haiku.recv()["result"]["tool"] == "llm-haiku"
    for_sonnet = haiku.recv()["result"]["id"]
    assert haiku.recv()["ok"]
    assert not silent(sonnet, 3), "the sonnet task waits while its claim stays parked"
    assert sonnet.recv()["result"]["id"] == for_sonnet


def test_sixteen_claimers_take_each_task_once(daemon):
    """16 clients claiming 1,000 tasks together take every task exactly once."""
    conn = daemon.connect("msgpack")
    conn.send_raw(b"".join(conn.frame({"op": "enqueue", "tool": "llm-haiku"}) for _ in range(1000)))
    enqueued = [conn.recv()["result"]["id"] for _ in range(1000)]
    claimed = [[] for _ in range(16)]
    threads = [threading.Thread(target=claim_all, args=(daemon, ids)) for ids in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(sum(claimed, [])) == enqueued
    assert conn.ok(op="status")["counts"]["running"] == 1000


# -- queue rules --------------------------------------------------------------


def test_claim_order_fifo(daemon):
    """Tasks are claimed in the order they were enqueued."""
    conn = connect(daemon)
    ids = [enqueue(conn, payload=n)["id"] for n in range(5)]
    assert [conn.ok(op="claim")["id"] for _ in ids] == ids
    assert conn.ok(op="claim") is None


def test_streams_independent(daemon):
    """Each stream has its own queue: claiming from one leaves the other untouched."""
    conn = connect(daemon)
    conn.ok(op="stream.create", name="other", session="default")
    first, second = enqueue(conn)["id"], enqueue(conn, stream="other")["id"]
    assert conn.ok(op="claim", stream="other")["id"] == second
    assert conn.ok(op="claim", stream="other") is None
    assert conn.ok(op="peek")["id"] == first


def test_stream_end_keeps_existing_tasks(daemon):
    """An ended stream refuses new tasks but its tasks can still be claimed and completed."""
    conn = connect(daemon)
    task = enqueue(conn)
    assert conn.ok(op="stream.end", name="default")["status"] == "ended"
    assert conn.call(op="enqueue", tool="llm-haiku")["error"]["code"] == "conflict"
    assert conn.ok(op="claim")["id"] == task["id"]
    assert conn.ok(op="complete", task=task["id"])["status"] == "completed"


def test_session_end_ends_its_streams(daemon):
    """Ending a session ends all its streams, which then refuse new tasks."""
    conn = connect(daemon)
    conn.ok(op="session.create", name="work")
    for name in ("a", "b"):
        conn.ok(op="stream.create", name=name, session="work")
    assert conn.ok(op="session.end", name="work")["status"] == "ended"
    streams = {s["name"]: s["status"] for s in conn.ok(op="stream.list", session="work")}
    assert streams == {"a": "ended", "b": "ended"}
    assert conn.call(op="enqueue", tool="llm-haiku", stream="a")["error"]["code"] == "conflict"
    assert enqueue(conn)["stream"] == "default"


# -- introspection ------------------------------------------------------------


def test_schema_mentions_every_op(shared):
    """`schema` returns a JSON Schema naming every op."""
    schema = shared.ok(op="schema")
    text = json.dumps(schema)
    assert "$defs" in schema or "anyOf" in schema or "oneOf" in schema
    assert [op for op in OPS if f'"{op}"' not in text] == []


def test_status_describes_daemon(daemon):
    """`status` has version, pid, uptime, socket, data_dir and counts by status."""
    status = daemon.ok(op="status")
    assert status["version"] == VERSION and status["pid"] == daemon.proc.pid
    assert isinstance(status["uptime"], (int, float)) and status["uptime"] >= 0
    assert status["socket"] == str(daemon.socket) and status["data_dir"] == str(daemon.data_dir)
    assert {"pending", "running", "completed", "failed"} <= set(status["counts"])
    assert set(status["counts"].values()) == {0}


def test_tools_lists_builtin_tools(shared):
    """`tools` lists the four built-in tools; only the run-* ones have commands."""
    tools = shared.ok(op="tools")["tools"]
    assert {"run-bash", "run-python", "llm-haiku", "llm-sonnet"} <= set(tools)
    assert tools["run-bash"]["command"] == ["bash", "-c"] and tools["llm-haiku"]["command"] is None


def test_timestamps_rfc3339_utc_milliseconds(daemon):
    """Every timestamp in replies is RFC 3339 UTC with milliseconds."""
    conn = connect(daemon)
    task_id = running(conn)
    conn.ok(op="complete", task=task_id)
    task = conn.ok(op="task", task=task_id)
    stamps = [task["created_at"], task["started_at"], task["finished_at"],
              *(h["at"] for h in task["history"]), conn.ok(op="session.list")[0]["created_at"]]
    assert [s for s in stamps if not RFC3339_MS.match(s)] == []


# -- the socket ---------------------------------------------------------------


def test_socket_mode_0600(daemon):
    """The socket file is readable and writable by its owner only."""
    st = os.lstat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid()
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_default_socket_dir_created_0700(default_socket_daemon):
    """Without --socket, the socket goes in $XDG_RUNTIME_DIR/sparkq, created 0700."""
    default_socket_daemon.start()
    socket_dir = default_socket_daemon.socket.parent
    assert stat.S_IMODE(os.lstat(socket_dir).st_mode) == 0o700
    assert default_socket_daemon.ok(op="status")["socket"] == str(default_socket_daemon.socket)


def test_default_socket_dir_open_to_others_refused(default_socket_daemon):
    """A default socket directory others can enter makes the daemon refuse to start, saying so."""
    default_socket_daemon.socket.parent.mkdir(mode=0o755)
    os.chmod(default_socket_daemon.socket.parent, 0o755)
    assert "open to other users" in start_refused(default_socket_daemon)


def test_socket_path_too_long_refused(make_daemon, workdir):
    """A socket path over 107 bytes is refused with a message naming the limit."""
    daemon = make_daemon(start=False)
    daemon.socket = workdir / ("d" * 100) / "sparkqd.sock"
    logs = start_refused(daemon)
    assert "107" in logs and str(daemon.socket) in logs


def test_stale_socket_replaced_on_restart(daemon):
    """A socket file left by a killed daemon is replaced when a new one starts."""
    daemon.kill()
    assert stat.S_ISSOCK(os.lstat(daemon.socket).st_mode)
    daemon.start()
    assert daemon.ok(op="status")["pid"] == daemon.proc.pid


def test_second_daemon_on_same_data_dir_refused(make_daemon):
    """A second daemon on a data directory in use exits non-zero, naming the holder's pid."""
    first = make_daemon()
    second = make_daemon(start=False, subdir="second")
    second.data_dir = first.data_dir
    assert re.search(rf"\bpid {first.proc.pid}\b", start_refused(second))
    assert first.ok(op="status")["pid"] == first.proc.pid


def test_live_socket_not_replaced(make_daemon):
    """A daemon whose socket is taken by a live daemon refuses to start; the first serves on."""
    first = make_daemon()
    second = make_daemon(start=False, subdir="second")
    second.socket = first.socket
    assert "another daemon is listening" in start_refused(second)
    assert first.ok(op="status")["pid"] == first.proc.pid


def test_peer_of_other_uid_forbidden(daemon, workdir):
    """A client running as another user is refused with forbidden even if the socket lets it in."""
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    os.chmod(workdir, 0o711)
    os.chmod(daemon.socket, 0o666)
    reply = json.loads(as_nobody(daemon.socket, b'{"op": "status"}\n'))
    assert reply["ok"] is False and reply["error"]["code"] == "forbidden"
    assert daemon.ok(op="status")["pid"] == daemon.proc.pid


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")
def test_socat_gets_json_reply(daemon):
    """`echo '{"op":"status"}' | socat - UNIX-CONNECT:$SOCK` prints an ok reply."""
    out = subprocess.run(f"echo '{{\"op\":\"status\"}}' | socat - UNIX-CONNECT:{daemon.socket}",
                         shell=True, capture_output=True, text=True, timeout=10)
    reply = json.loads(out.stdout)
    assert reply["ok"] is True and reply["result"]["pid"] == daemon.proc.pid


@pytest.mark.parametrize("request_, code", [
    ({"op": "enqueue", "tool": "run-bash", "script": "x"}, "bad_request"),
    ({"op": "enqueue"}, "bad_request"),
    ({"op": "enqueue", "tool": "run-bash", "args": ["a"]}, "bad_request"),
    ({"op": "enqueue", "tool": "run-bash", "delay": 5, "at": "2030-01-01T00:00:00Z"}, "bad_request"),
    ({"op": "enqueue", "tool": "run-bash", "at": "tomorrow"}, "bad_request"),
    ({"op": "enqueue", "tool": "run-bash", "at": "2030-01-01 10:00"}, "bad_request"),
    ({"op": "enqueue", "tool": "run-bash", "after": [999]}, "not_found"),
    ({"op": "enqueue", "script": "nope"}, "not_found"),
    ({"op": "requeue", "task": 1, "status": "failed"}, "bad_request"),
    ({"op": "requeue"}, "bad_request"),
    ({"op": "wait", "tasks": []}, "bad_request"),
    ({"op": "wait", "tasks": [999]}, "not_found"),
    ({"op": "logs", "task": 999}, "not_found"),
    ({"op": "history", "since": "last week"}, "bad_request"),
    ({"op": "history", "stream": "nope"}, "not_found"),
    ({"op": "stream.pause", "name": "nope"}, "not_found"),
    ({"op": "touch", "task": 999}, "not_found"),
    ({"op": "cancel", "task": 999}, "not_found"),
    ({"op": "claim", "stream": ["default", 5]}, "bad_request"),
])
def test_bad_fields_of_scheduling_runner_and_watch_ops(shared, request_, code):
    """The ops added for scheduling, running and watching refuse bad input with its code."""
    reply = shared.call(**request_)
    assert reply["ok"] is False and reply["error"]["code"] == code, reply
    assert shared.ok(op="hello")["protocol"] == 1


# -- complete and claim in one step (claim_next) ------------------------------------


def test_complete_with_claim_next_returns_the_finished_and_the_next_task(daemon):
    """`complete` with claim_next finishes one task and claims the next in the same reply."""
    first, second = (daemon.ok(op="enqueue", tool="llm-haiku", payload=n)["id"] for n in (1, 2))
    daemon.ok(op="claim", worker="w")
    reply = daemon.ok(op="complete", task=first, claim_next={"worker": "w"})
    assert (reply["id"], reply["status"]) == (first, "completed")
    assert (reply["next"]["id"], reply["next"]["status"], reply["next"]["worker"]) == \
        (second, "running", "w")


def test_fail_with_claim_next_and_nothing_left_has_next_null(daemon):
    """`fail` with claim_next on an empty stream fails the task and says next is null."""
    task = daemon.ok(op="enqueue", tool="llm-haiku")["id"]
    daemon.ok(op="claim")
    reply = daemon.ok(op="fail", task=task, reason="broken", claim_next={})
    assert (reply["status"], reply["next"]) == ("failed", None)


@pytest.mark.parametrize("framing", ["json", "msgpack"])
def test_claim_next_with_wait_gets_the_task_enqueued_meanwhile(daemon, framing):
    """A claim_next that waits replies once a task arrives, with the finished task too."""
    task = daemon.ok(op="enqueue", tool="llm-haiku")["id"]
    daemon.ok(op="claim")
    worker = daemon.connect(framing)
    worker.send(op="complete", task=task, id="done", claim_next={"wait": 20})
    later = daemon.ok(op="enqueue", tool="llm-haiku")["id"]
    reply = worker.recv()
    assert (reply["id"], reply["result"]["status"], reply["result"]["next"]["id"]) == \
        ("done", "completed", later)


def test_claim_next_survives_kill_9_as_one_durable_step(make_daemon):
    """What a complete with claim_next acknowledged (both tasks) is there after kill -9."""
    d = make_daemon()
    first, second = (d.ok(op="enqueue", tool="llm-haiku")["id"] for _ in range(2))
    d.ok(op="claim", worker="w")
    d.ok(op="complete", task=first, claim_next={"worker": "w"})
    d.kill()
    d.start()
    assert [(t["id"], t["status"]) for t in d.ok(op="tasks")] == \
        [(first, "completed"), (second, "running")]


def test_claim_next_with_a_bad_field_is_refused_and_nothing_finishes(daemon):
    """A claim_next naming an unknown field is bad_request, and the task stays running."""
    task = daemon.ok(op="enqueue", tool="llm-haiku")["id"]
    daemon.ok(op="claim")
    error = daemon.call(op="complete", task=task, claim_next={"streams": "x"})["error"]
    assert error["code"] == "bad_request" and "streams" in error["message"]
    assert daemon.ok(op="task", task=task)["status"] == "running"


def test_claim_next_on_an_unknown_stream_is_refused_and_nothing_finishes(daemon):
    """A claim_next on a stream that does not exist is not_found; the task stays running."""
    task = daemon.ok(op="enqueue", tool="llm-haiku")["id"]
    daemon.ok(op="claim")
    error = daemon.call(op="complete", task=task, claim_next={"stream": "nope"})["error"]
    assert error["code"] == "not_found"
    assert daemon.ok(op="task", task=task)["status"] == "running"


def test_enqueue_of_a_command_tool_with_nothing_to_run_is_refused(daemon):
    """run-bash with no payload is bad_request saying it needs one, not a run that fails."""
    error = daemon.call(op="enqueue", tool="run-bash")["error"]
    assert error["code"] == "bad_request" and "needs a payload" in error["message"]
    assert daemon.ok(op="tasks") == []


def test_touch_with_a_lease_never_issued_says_it_does_not_match(daemon):
    """A touch with a made-up lease is a conflict naming the current lease, not 'expired'."""
    task = daemon.ok(op="enqueue", tool="llm-haiku")["id"]
    lease = daemon.ok(op="claim")["lease"]
    error = daemon.call(op="touch", task=task, lease="made-up")["error"]
    assert error["code"] == "conflict" and "not a lease of this task" in error["message"]
    assert lease in error["message"] and "expired" not in error["message"]


def test_status_after_a_restart_shows_the_loaded_snapshot(make_daemon):
    """After a graceful restart `status` says when the loaded snapshot was written."""
    d = make_daemon()
    d.ok(op="enqueue", tool="llm-haiku")
    d.restart()
    snapshot = d.ok(op="status")["snapshot"]
    assert snapshot["seq"] is not None and snapshot["at"] is not None and snapshot["at"].endswith("Z")


def test_claim_next_waiting_at_shutdown_is_answered_with_the_finished_task(make_daemon):
    """SIGTERM while a claim_next waits: the reply is the durable finish with next null."""
    d = make_daemon()
    task = d.ok(op="enqueue", tool="llm-haiku")["id"]
    d.ok(op="claim")
    worker = d.connect()
    worker.send(op="complete", task=task, claim_next={"wait": 30})
    wait_until(lambda: d.ok(op="task", task=task)["status"] == "completed")
    d.proc.send_signal(signal.SIGTERM)
    reply = worker.recv()
    assert reply["ok"] and (reply["result"]["status"], reply["result"]["next"]) == ("completed", None)


def test_event_larger_than_a_fresh_segment_grows_it_and_survives_a_restart(make_daemon):
    """A 33 MiB payload (more than a 32 MiB segment) is kept, and the daemon restarts with it."""
    d = make_daemon(config="server: {max_frame_bytes: 67108864}\n")
    d.ok(op="enqueue", tool="llm-haiku", payload="small")
    big = "x" * (33 << 20)
    first = d.ok(op="enqueue", tool="llm-haiku", payload=big)["id"]
    second = d.ok(op="enqueue", tool="llm-haiku", payload=big)["id"]
    d.kill()
    d.start()
    assert [len(d.ok(op="task", task=i)["payload"]) for i in (first, second)] == [len(big)] * 2
