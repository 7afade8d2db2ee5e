"""Durability: what a real sparkqd keeps across stops, crashes, damage, full disks and reloads.

Every test runs real daemon processes on a temporary socket and data directory,
stops or kills them, sometimes damages their files, and checks what the next
daemon holds. Nothing is mocked; waiting is done by polling.
"""

import itertools
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import msgspec
import pytest

import sparkqd
from conftest import Daemon, wait_until

V1 = Path(__file__).resolve().parent / "data" / "v1"
NO_SNAPSHOTS = "database: {snapshot_interval: 3600}\n"
QUICK_TOOLS = """\
stale: {factor: 1}
task_classes: {QUICK: {timeout: 0.3}}
tools: {quick: {task_class: QUICK}}
"""
TOOLS_ONE = "task_classes: {FAST: {timeout: 5}}\ntools: {one: {task_class: FAST}}\n"
TOOLS_ONE_TWO = TOOLS_ONE.replace("FAST}}", "FAST}, two: {task_class: FAST}}")
BAD_CONFIGS = {
    "yaml-error": ("tools: {one: {task_class: FAST}\n", ["not valid YAML"]),
    "unknown-key": (TOOLS_ONE_TWO + "database: {snapshot_intervall: 5}\n",
                    ["$.database", "snapshot_intervall"]),
    "unknown-class": (TOOLS_ONE.replace("FAST}}", "FAST}, x: {task_class: NOPE}}"),
                      ["$.tools.x.task_class"]),
}
MiB = 1 << 20


# -- helpers that make the tests read as specifications ---------------------------


def enqueue(d, n, tool="llm-haiku", stream="default", tag="p"):
    """Enqueue ``n`` tasks with distinct payloads; returns their ids."""
    return [d.ok(op="enqueue", tool=tool, stream=stream, payload=f"{tag}{i}")["id"]
            for i in range(n)]


def claim(d, stream="default", worker="w"):
    """Claim the next task of ``stream``; returns its id."""
    return d.ok(op="claim", stream=stream, worker=worker)["id"]


def core_workload(d):
    """Sessions and streams (some ended) and tasks in the first cut's states, with rich fields."""
    d.ok(op="session.create", name="build")
    for stream in ("ci", "docs"):
        d.ok(op="stream.create", name=stream, session="build")
    enqueue(d, 6, stream="ci", tag="ci-é✓-")  # tasks 1-6
    for worker in ("w1", "w2", "w3", "w4", "w5"):
        claim(d, "ci", worker)
    d.ok(op="complete", task=1, summary="built",
         result={"files": ["a.o", "b.o"], "ok": True, "score": 0.25, "none": None})
    d.ok(op="fail", task=2, reason="exit status 2")
    d.ok(op="requeue", task=3)
    d.ok(op="fail", task=4, reason="flaky")
    d.ok(op="requeue", task=4)
    claim(d, "ci", "w6")  # task 3 again
    d.ok(op="enqueue", stream="docs", tool="run-bash", payload={"argv": ["make", "html"]},
         timeout=12.5, priority=3)  # 7, left pending in an ended stream
    d.ok(op="stream.end", name="docs")
    d.ok(op="session.create", name="old")
    d.ok(op="stream.create", name="gone", session="old")
    d.ok(op="enqueue", stream="gone", tool="llm-sonnet", payload=None)  # 8
    d.ok(op="complete", task=claim(d, "gone"), summary="only a summary")
    d.ok(op="session.end", name="old")


def mixed_workload(d):
    """The core workload plus tasks waiting, retrying, cancelled or holding a lock; a pause."""
    core_workload(d)
    d.ok(op="enqueue", stream="ci", tool="llm-haiku", delay=3600)  # 9, waiting for its delay
    d.ok(op="enqueue", stream="ci", tool="llm-haiku", after=[5])  # 10, waiting for task 5
    d.ok(op="cancel", task=d.ok(op="enqueue", stream="ci", tool="llm-haiku")["id"])  # 11
    d.ok(op="stream.create", name="agents", session="build")
    d.ok(op="enqueue", stream="agents", tool="llm-haiku", max_attempts=3, key="unique-12")
    d.ok(op="fail", task=claim(d, "agents"), reason="try again")  # 12, waiting to retry
    d.ok(op="enqueue", stream="agents", tool="llm-haiku", lock="git@github.com:me/repo.git")
    claim(d, "agents", "w7")  # 13 holds the lock
    d.ok(op="stream.pause", name="ci")


def later_changes(d):
    """More changes after mixed_workload: a dependency completes, a lock frees, a session ends."""
    d.ok(op="complete", task=5, summary="after the snapshot")  # releases task 10
    d.ok(op="fail", task=13, reason="lost the lock")
    d.ok(op="cancel", task=6)
    d.ok(op="stream.resume", name="ci")
    enqueue(d, 2, stream="agents", tag="later-")
    d.ok(op="session.end", name="build")


def state_of(d):
    """What the daemon shows: task list, each task with history, sessions, streams, locks."""
    tasks = d.ok(op="tasks")
    return {"tasks": tasks, "task": [d.ok(op="task", task=t["id"]) for t in tasks],
            "sessions": d.ok(op="session.list"), "streams": d.ok(op="stream.list"),
            "locks": d.ok(op="locks")}


def state_of_queue(queue):
    """The views of state_of, built from a Queue in this process, as JSON shows them."""
    tasks, replies = list(queue.tasks.values()), sparkqd.Replies(queue)
    return msgspec.json.decode(msgspec.json.encode({
        "tasks": [replies.task(t) for t in tasks],
        "task": [replies.task(t, with_history=True) for t in tasks],
        "sessions": [replies.session(s) for s in queue.sessions.values()],
        "streams": [replies.stream(s) for s in queue.streams.values()],
        "locks": sparkqd.QueueReads(queue).locks(sparkqd.Locks(), 0.0)}))


def payloads(d, ids):
    """{id: payload} of the tasks among ``ids`` that the daemon holds."""
    held = {t["id"]: t["payload"] for t in d.ok(op="tasks")}
    return {i: held[i] for i in ids if i in held}


def statuses(d):
    return {t["id"]: t["status"] for t in d.ok(op="tasks")}


def epoch(stamp):
    return datetime.fromisoformat(stamp).timestamp()


def answers(d):
    try:
        return d.call(op="hello")["ok"]
    except (OSError, EOFError):
        return False


def start_refused(d):
    """Start a daemon expected to refuse: its exit status (None if it serves after all) and log."""
    d.start(wait=False)
    wait_until(lambda: d.proc.poll() is not None or answers(d), timeout=20,
               message="sparkqd to exit or answer")
    return d.proc.poll(), d.logs()


HEADER = sparkqd.RECORD_HEADER.size


def records(segment):
    """(offset, end) of each intact record in a journal segment."""
    return sparkqd.record_spans(Path(segment).read_bytes())


def flip_byte(segment, record, part):
    """Invert one byte in the length, CRC or body of a record; returns the record's offset."""
    offset, end = records(segment)[record]
    at = {"length": offset + 3, "crc": offset + 5, "body": (offset + HEADER + end) // 2}[part]
    with open(segment, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0xFF]))
    return offset


def tear_last_record(segment, how):
    """Leave the last record as a crash mid-write would: cut short or its end still zeros."""
    offset, end = records(segment)[-1]
    if how == "cut":
        os.truncate(segment, (offset + HEADER + end) // 2)
    else:
        with open(segment, "r+b") as f:
            f.seek(end - 4)
            f.write(b"\0" * 4)


def read_only(d):
    return sqlite3.connect(f"file:{d.data_dir / 'sparkq.db'}?mode=ro", uri=True)


def enqueue_until_killed(d, tag, threads=4, seconds=1.0):
    """Enqueue from several connections as fast as they can, then kill -9; returns what got ok."""
    acked = {}

    def client(n):
        try:
            conn = d.connect()
            for i in itertools.count():
                reply = conn.call(op="enqueue", tool="llm-haiku", payload=f"{tag}-{n}-{i}")
                if reply["ok"]:
                    acked[reply["result"]["id"]] = reply["result"]["payload"]
        except (OSError, EOFError):
            return  # the daemon died under us: that is the point

    clients = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for thread in clients:
        thread.start()
    until = time.monotonic() + seconds
    wait_until(lambda: time.monotonic() > until and acked, timeout=seconds + 10)
    d.kill()
    for thread in clients:
        thread.join(10)
    return acked


def fill_disk(directory):
    """Write a file until the filesystem has no byte left."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for block in (b"\xa5" * MiB, b"\xa5" * 512):
            try:
                while os.write(fd, block):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


@pytest.fixture
def small_disk(workdir):
    """A 40 MiB tmpfs to fill up; skipped where mounting is not allowed."""
    where = workdir / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True)  # lazy: a killed daemon may linger


# -- graceful restart ---------------------------------------------------------------


def test_graceful_restart_keeps_every_field_of_everything(make_daemon):
    """After SIGTERM (exit 0) and a start, tasks, history, sessions and streams are as before."""
    d = make_daemon()
    mixed_workload(d)
    before = state_of(d)
    assert d.stop() == 0
    d.start()
    assert state_of(d) == before
    assert d.ok(op="enqueue", tool="llm-haiku")["id"] == before["tasks"][-1]["id"] + 1


def test_graceful_restarts_keep_changes_made_between_them(make_daemon):
    """Changes between two graceful restarts, saved by a second snapshot, read back exactly."""
    d = make_daemon()
    mixed_workload(d)
    d.restart()
    later_changes(d)
    before = state_of(d)
    assert d.stop() == 0
    d.start()
    assert state_of(d) == before


@pytest.mark.parametrize("stop", ["sigterm", "kill-9"])
def test_purged_tasks_stay_purged_and_ids_go_on_after_restart(make_daemon, stop):
    """Tasks purged after a snapshot stay gone after a restart; ids go on past the purged newest."""
    d = make_daemon()
    ids = enqueue(d, 3)
    for task in ids:
        d.ok(op="complete", task=claim(d))
    d.restart()  # the snapshot at stop holds the three tasks
    assert d.ok(op="purge", older_than_days=0) == {"purged": 3}
    d.stop() if stop == "sigterm" else d.kill()
    d.start()
    assert statuses(d) == {}
    assert d.ok(op="enqueue", tool="llm-haiku")["id"] == ids[-1] + 1


# -- crashes and a damaged journal --------------------------------------------------


def test_acknowledged_enqueues_survive_kill_9_mid_stream(make_daemon):
    """Every enqueue that got ok survives kill -9 amid a flood of enqueues, three times over."""
    d = make_daemon()
    acked = {}
    for crash in range(3):
        acked.update(enqueue_until_killed(d, tag=f"crash{crash}"))
        d.start()
        assert payloads(d, acked) == acked


@pytest.mark.parametrize("how", ["cut", "zeroed"])
def test_torn_journal_tail_is_cut_off_with_a_warning(make_daemon, how):
    """A last record torn by a crash is dropped with a warning; every earlier task loads."""
    d = make_daemon()
    ids = enqueue(d, 5)
    d.kill()
    tear_last_record(d.journal_segments()[-1], how)
    d.start()
    assert "torn record" in d.logs()
    assert list(statuses(d)) == ids[:-1]


@pytest.mark.parametrize("part", ["length", "crc", "body"])
def test_damaged_record_before_the_tail_refuses_to_start(make_daemon, part):
    """A damaged record followed by intact ones stops startup, naming the file and offset."""
    d = make_daemon()
    enqueue(d, 5)
    d.kill()
    segment = d.journal_segments()[-1]
    offset = flip_byte(segment, record=1, part=part)
    code, log = start_refused(d)
    assert code not in (None, 0), log
    assert str(segment) in log and f"offset {offset}" in log


def test_journal_replay_reproduces_the_live_state(make_daemon):
    """The journal's events applied to a fresh Queue give the live records field by field."""
    d = make_daemon(config=NO_SNAPSHOTS)
    mixed_workload(d)
    live = state_of(d)
    d.kill()
    queue = sparkqd.Queue(sparkqd.Config())
    for event in sparkqd.Journal(str(d.data_dir / "journal")).replay(0):
        queue.apply(event)
    assert state_of_queue(queue) == live


# -- the SQLite snapshot ------------------------------------------------------------


def test_snapshot_after_graceful_stop_is_plain_sqlite(make_daemon):
    """After SIGTERM sparkq.db opens read-only with plain task columns and its journal seq."""
    d = make_daemon()
    mixed_workload(d)
    seq = d.ok(op="status")["journal"]["seq"]
    assert d.stop() == 0
    db = read_only(d)
    assert db.execute("SELECT id, stream, session, tool, status, payload, summary, result, reason "
                      "FROM tasks WHERE id IN (1, 2, 7) ORDER BY id").fetchall() == [
        (1, "ci", "build", "llm-haiku", "completed", '"ci-é✓-0"', "built",
         '{"files":["a.o","b.o"],"ok":true,"score":0.25,"none":null}', None),
        (2, "ci", "build", "llm-haiku", "failed", '"ci-é✓-1"', None, None, "exit status 2"),
        (7, "docs", "build", "run-bash", "pending", '{"argv":["make","html"]}', None, None, None)]
    assert db.execute("SELECT value FROM meta WHERE key = 'journal_seq'").fetchone() == (str(seq),)
    assert [p.name for p in d.journal_segments() if int(p.stem) <= seq] == []


READER = """\
import json, sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
print(json.dumps(db.execute("SELECT id, payload, status FROM tasks ORDER BY id").fetchall()))
"""


def test_snapshot_is_taken_while_running_and_readable_by_another_process(make_daemon):
    """Snapshots run every snapshot_interval; another process reads them; old segments go."""
    d = make_daemon(config="database: {snapshot_interval: 0.5}\n")
    ids = enqueue(d, 3)
    seq = d.ok(op="status")["journal"]["seq"]
    wait_until(lambda: (d.ok(op="status")["snapshot"]["seq"] or 0) >= seq, message="a snapshot")
    reader = subprocess.run([sys.executable, "-c", READER, str(d.data_dir / "sparkq.db")],
                            capture_output=True, text=True, timeout=20)
    assert json.loads(reader.stdout) == [[i, f'"p{n}"', "pending"] for n, i in enumerate(ids)]
    assert d.proc.poll() is None
    assert [int(p.stem) for p in d.journal_segments()] == [seq + 1]


def test_restart_after_crash_loads_snapshot_and_journal_tail(make_daemon):
    """A kill -9 after a snapshot and more changes: the next daemon holds both."""
    d = make_daemon(config=NO_SNAPSHOTS)
    mixed_workload(d)
    d.restart()  # the snapshot at stop covers the workload
    later_changes(d)
    status, before = d.ok(op="status"), state_of(d)
    assert status["snapshot"]["seq"] < status["journal"]["seq"]
    d.kill()
    d.start()
    assert state_of(d) == before


# -- timers: stale tasks and purge --------------------------------------------------

# The rules of lease expiry are specified on the core with a fake clock (test_core.py,
# test_core_rules.py); the first test here is the one that waits for the daemon's own timer.


def test_stale_running_task_is_failed(make_daemon):
    """A task running past stale.factor x its timeout is failed with a reason saying stale."""
    d = make_daemon(config=QUICK_TOOLS)
    task = d.ok(op="enqueue", tool="quick")["id"]
    claim(d)
    failed = wait_until(lambda: statuses(d)[task] == "failed" and d.ok(op="task", task=task))
    assert "stale" in failed["reason"]
    assert epoch(failed["finished_at"]) - epoch(failed["started_at"]) >= 0.3 - 0.002


def test_stale_task_is_failed_on_start_after_its_deadline_passed(make_daemon):
    """A task left running at a stop is failed as stale by the next daemon after its deadline."""
    d = make_daemon(config=QUICK_TOOLS)
    task = d.ok(op="enqueue", tool="quick", timeout=1.0)["id"]
    started = epoch(d.ok(op="claim")["started_at"])
    assert d.stop() == 0
    assert read_only(d).execute("SELECT status FROM tasks").fetchall() == [("running",)]
    time.sleep(max(0.0, started + 1.0 - time.time()))  # the stale deadline is what is under test
    d.start()
    wait_until(lambda: statuses(d)[task] == "failed")
    assert "stale" in d.ok(op="task", task=task)["reason"]


def test_purge_removes_finished_tasks_and_keeps_open_ones(daemon):
    """purge older_than_days 0 removes and counts finished tasks; pending and running stay."""
    ids = enqueue(daemon, 4)
    daemon.ok(op="complete", task=claim(daemon))
    daemon.ok(op="fail", task=claim(daemon), reason="broken")
    claim(daemon)
    assert daemon.ok(op="purge") == {"purged": 0}  # the default: older than 3 days
    assert daemon.ok(op="purge", older_than_days=0) == {"purged": 2}
    assert statuses(daemon) == {ids[2]: "running", ids[3]: "pending"}
    assert daemon.call(op="task", task=ids[0])["error"]["code"] == "not_found"
    assert daemon.ok(op="enqueue", tool="llm-haiku")["id"] == ids[-1] + 1


# -- configuration: reload and startup ----------------------------------------------


def test_reload_op_makes_a_new_tool_usable(make_daemon):
    """`reload` with a valid changed config puts its new tool in force at once."""
    d = make_daemon(config=TOOLS_ONE)
    d.config_path.write_text(TOOLS_ONE_TWO)
    assert d.ok(op="reload")["tools"] == ["one", "two"]
    assert d.ok(op="enqueue", tool="two")["tool"] == "two"


@pytest.mark.parametrize("bad", BAD_CONFIGS)
def test_reload_op_refuses_a_bad_config_and_keeps_the_old(make_daemon, bad):
    """`reload` of a bad config answers bad_request naming the key path; the old config stays."""
    d = make_daemon(config=TOOLS_ONE)
    text, where = BAD_CONFIGS[bad]
    d.config_path.write_text(text)
    error = d.call(op="reload")["error"]
    assert error["code"] == "bad_request"
    assert all(fragment in error["message"] for fragment in where), error
    assert list(d.ok(op="tools")["tools"]) == ["one"]
    assert d.ok(op="enqueue", tool="one")["tool"] == "one"


def test_sighup_reloads_a_good_config(make_daemon):
    """SIGHUP with a valid changed config puts its new tool in force."""
    d = make_daemon(config=TOOLS_ONE)
    d.config_path.write_text(TOOLS_ONE_TWO)
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "two" in d.ok(op="tools")["tools"], message="tool two")
    assert d.ok(op="enqueue", tool="two")["tool"] == "two"


def test_sighup_with_a_bad_config_logs_why_and_keeps_the_old(make_daemon):
    """SIGHUP with a bad config logs the key path and reason; the daemon runs on the old config."""
    d = make_daemon(config=TOOLS_ONE)
    d.config_path.write_text(BAD_CONFIGS["unknown-class"][0])
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "$.tools.x.task_class" in d.logs(), message="the refusal in the log")
    assert "unknown task class 'NOPE'" in d.logs()
    assert list(d.ok(op="tools")["tools"]) == ["one"]


@pytest.mark.parametrize("text, where", [
    ("database: {fsink: always}\n", ["$.database", "fsink"]),
    ("database: {snapshot_interval: soon}\n", ["$.database.snapshot_interval"]),
    ("server: {port: 8080}\n", ["$.server.port", "server.socket"]),
], ids=["unknown-key", "wrong-type", "server-port"])
def test_bad_config_at_startup_exits_2_naming_the_key(make_daemon, text, where):
    """An invalid config file makes sparkqd exit with status 2 and a message naming the key path."""
    d = make_daemon(config=text, start=False)
    code, log = start_refused(d)
    assert code == 2, log
    assert all(fragment in log for fragment in where), log


def test_second_daemon_on_the_same_data_dir_names_the_lock_holder(make_daemon):
    """A second daemon on a data directory in use exits non-zero naming the pid holding the lock."""
    first = make_daemon()
    second = make_daemon(subdir="second", start=False)
    second.data_dir = first.data_dir
    code, log = start_refused(second)
    assert code not in (None, 0), log
    assert re.search(rf"\bpid {first.proc.pid}\b", log), log
    assert first.ok(op="hello")["protocol"] == 1


# -- a full disk --------------------------------------------------------------------


def test_full_disk_refuses_changes_but_loses_nothing(make_daemon, small_disk):
    """On a full disk a change gets ok or unavailable, reads go on, no acknowledged task is lost."""
    d = make_daemon(start=False)
    d.data_dir = small_disk / "data"
    d.start()
    fill_disk(small_disk)
    big = "x" * MiB
    replies = [d.call(op="enqueue", tool="llm-haiku", payload=f"{n}:{big}") for n in range(40)]
    assert {r["ok"] or r["error"]["code"] for r in replies} == {True, "unavailable"}
    assert d.ok(op="status")["tasks"] == sum(r["ok"] for r in replies)
    (small_disk / "filler").unlink()
    d.restart()
    acked = {r["result"]["id"]: r["result"]["payload"] for r in replies if r["ok"]}
    assert {i: d.ok(op="task", task=i)["payload"] for i in acked} == acked  # one MiB at a time


# -- an old data directory must keep loading ----------------------------------------


def test_v1_data_directory_still_loads(make_daemon):
    """The checked-in v1 snapshot plus journal tail loads every task recorded in expected.json."""
    d = make_daemon(start=False)
    shutil.copytree(V1, d.data_dir, ignore=shutil.ignore_patterns("*.json"))
    d.start()
    expected = json.loads((V1 / "expected.json").read_text())["tasks"]
    held = {t["id"]: t for t in d.ok(op="tasks")}
    assert [{key: held.get(t["id"], {}).get(key) for key in t} for t in expected] == expected


def make_v1_data(target=V1):
    """How tests/data/v1 was made, once, by hand; the files are checked in, never regenerated.

    It was made with sparkqd as of commit f9e1256, the first snapshot and journal
    format (before scheduling added task columns and event fields), so it is a
    truly old data directory:

        mkdir /tmp/sq-v1src && git archive f9e1256 | tar -x -C /tmp/sq-v1src
        cp tests/test_durability.py /tmp/sq-v1src/tests/
        cd /tmp/sq-v1src/tests && python3 -c \
            'import test_durability as t; t.make_v1_data(t.Path("/work/main/tests/data/v1"))'

    A daemon runs the core workload and stops (SIGTERM), so sparkq.db holds it;
    a second daemon completes a task, fails one and enqueues two, then is killed -9,
    so the journal segment holds those events after the snapshot. The segment is
    cut right after its last record (the preallocated zeros are not needed) and
    the second daemon's `tasks` reply is saved as expected.json.
    """
    import tempfile
    with tempfile.TemporaryDirectory(prefix="sq-", dir="/tmp") as tmp:
        d = Daemon(tmp, config=NO_SNAPSHOTS).start()
        core_workload(d)
        d.restart()
        d.ok(op="complete", task=5, summary="after the snapshot", result=[1, 2.5, "three"])
        d.ok(op="fail", task=3, reason="given up")
        enqueue(d, 2, stream="ci", tag="journal-only-")
        expected = {"tasks": d.ok(op="tasks")}
        d.kill()
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(d.data_dir / "sparkq.db", target / "sparkq.db")
        (target / "journal").mkdir(exist_ok=True)
        for segment in d.journal_segments():
            _, end = records(segment)[-1]
            shutil.copyfile(segment, target / "journal" / segment.name)
            os.truncate(target / "journal" / segment.name, end)
        (target / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
