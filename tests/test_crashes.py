"""Crashes: kill -9 at the worst moments, journals torn at every byte, full disks, fuzzed input.

Every test runs real daemon processes (or the daemon's own journal code on a
copy of files a real daemon wrote), kills or damages them, and checks that the
next daemon starts and holds everything that was acknowledged. Nothing is
mocked; waiting is done by polling. The tests that count things (kill cycles,
the fuzzer) print their counts: run with ``-s`` to see them.
"""

import itertools
import json
import logging
import math
import os
import random
import shutil
import struct
import threading
import time
import zlib
from collections import Counter
from datetime import datetime

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import sparkqd
from conftest import wait_until
from test_durability import (MiB, NO_SNAPSHOTS, QUICK_TOOLS, claim, enqueue, fill_disk,
                             payloads, state_of, state_of_queue, statuses, tear_last_record)
from test_durability import small_disk  # noqa: F401 (a fixture, used by name)

ROTATING = "database: {snapshot_interval: 0.05}\n"  # a snapshot, so a rotation, all the time
SNAPSHOT_SOON = "database: {snapshot_interval: 0.5}\n"
#: The first journal format: records of (body length, CRC32 of the body), no segment header.
LEGACY_RECORD = struct.Struct(">II")
SALT_AND_SEQ = struct.Struct(">QQ")
#: The contract's error codes, but `internal`: an internal error is the daemon's own bug.
ERROR_CODES = {"bad_request", "not_found", "conflict", "too_large", "forbidden", "unavailable"}


# -- kill -9 under load ----------------------------------------------------------


class Acked:
    """What clients got ok for: enqueued tasks and their payloads, claims, completions."""

    def __init__(self):
        self.enqueued, self.claimed, self.completed = {}, set(), set()

    def __len__(self):
        return len(self.enqueued) + len(self.claimed) + len(self.completed)

    def update(self, other):
        self.enqueued.update(other.enqueued)
        self.claimed |= other.claimed
        self.completed |= other.completed

    def lost(self, d):
        """What the daemon no longer shows: a task or its payload, a claim or a completion."""
        held = {t["id"]: t for t in d.ok(op="tasks")}
        payload = {i: t["payload"] for i, t in held.items()}
        status = {i: t["status"] for i, t in held.items()}
        return ({("enqueue", i) for i, p in self.enqueued.items() if payload.get(i) != p}
                | {("claim", i) for i in self.claimed if status.get(i) in (None, "pending")}
                | {("complete", i) for i in self.completed if status.get(i) != "completed"})


def work(d, acked, tag):
    """One client: enqueue payloads of mixed sizes, claim and complete every third, till cut off."""
    try:
        conn = d.connect()
        for i in itertools.count():
            payload = f"{tag}-{i}-" + "x" * (i % 5 * 700)
            reply = conn.call(op="enqueue", tool="llm-haiku", payload=payload)
            if reply["ok"]:
                acked.enqueued[reply["result"]["id"]] = payload
            if i % 3 == 2 and (task := conn.call(op="claim", worker=tag).get("result")):
                acked.claimed.add(task["id"])
                if conn.call(op="complete", task=task["id"])["ok"]:
                    acked.completed.add(task["id"])
    except (OSError, EOFError):
        return  # the daemon died under us: that is the point


def work_until_killed(d, tag, kill, clients=3):
    """Clients work on the daemon until ``kill(d, acked)`` has killed it; what they got ok for."""
    acked = Acked()
    threads = [threading.Thread(target=work, args=(d, acked, f"{tag}.{n}"))
               for n in range(clients)]
    for thread in threads:
        thread.start()
    kill(d, acked)
    d.proc.wait(10)
    for thread in threads:
        thread.join(10)
    return acked


def kill_when_a_segment_appears(d, acked, timeout=10.0):
    """Once the load is going, kill -9 the moment a new file shows in the journal directory."""
    wait_until(lambda: len(acked.enqueued) >= 30 or d.proc.poll() is not None, message="load")
    journal = d.data_dir / "journal"
    known = set(os.listdir(journal))
    deadline = time.monotonic() + timeout
    while known.issuperset(os.listdir(journal)) and time.monotonic() < deadline:
        pass  # a tight loop: the moment matters
    d.proc.kill()


def kill_at_random(moments):
    def kill(d, acked):
        time.sleep(moments.uniform(0.02, 0.4))
        d.proc.kill()
    return kill


def test_kill_9_the_moment_a_segment_appears_keeps_what_was_acknowledged(make_daemon):
    """Killed -9 the instant a rotation creates a segment, 16 times, it starts with all acked."""
    d = make_daemon(config=ROTATING)
    acked, lost, heads = Acked(), set(), []
    for cycle in range(16):
        acked.update(work_until_killed(d, f"c{cycle}", kill_when_a_segment_appears))
        heads.append(d.journal_segments()[-1].read_bytes()[:1 << 16])  # its first record, if any
        d.start()
        lost |= acked.lost(d)
    empty_newest = sum(not sparkqd.record_spans(head) for head in heads)
    print(f"\nkill -9 at rotation: 16 cycles, {len(acked)} acknowledged ({len(acked.enqueued)} "
          f"enqueues), {len(lost)} lost; {empty_newest} kills left a newest segment with no record")
    assert sorted(lost) == []


def test_kill_9_at_random_moments_keeps_what_was_acknowledged(make_daemon):
    """Killed -9 at random moments under load and constant snapshots, it starts with all acked."""
    d = make_daemon(config=ROTATING)
    acked, lost, moments = Acked(), set(), random.Random(1)
    for cycle in range(8):
        acked.update(work_until_killed(d, f"r{cycle}", kill_at_random(moments)))
        d.start()
        lost |= acked.lost(d)
    print(f"\nkill -9 at random: 8 cycles, {len(acked)} acknowledged ({len(acked.enqueued)} "
          f"enqueues), {len(lost)} lost")
    assert sorted(lost) == []


# -- torn tails -------------------------------------------------------------------


def fake_record(layout):
    """A string whose UTF-8 bytes pass for a journal record holding a real event.

    The body is the msgpack of ``["task.cancelled", at, id]``; ``at`` and ``id``
    are tried until header and body all read as UTF-8, so a JSON client can send
    it. The new layout's CRC covers a salt: a random one, as a payload cannot
    know the salt of the segment it will land in.
    """
    salt = random.Random(layout).getrandbits(64)
    for at, task in itertools.product(range(128), range(1, 128)):
        body = b"\x93\xaetask.cancelled" + bytes([at, task])
        if layout == "old":
            record = LEGACY_RECORD.pack(len(body), zlib.crc32(body)) + body
        else:
            seq = 0xE5  # a UTF-8 lead byte: with the body's first two bytes, one character
            crc = zlib.crc32(SALT_AND_SEQ.pack(salt, seq) + body)
            record = sparkqd.RECORD_HEADER.pack(len(body), crc, seq) + body
        try:
            return record.decode()
        except UnicodeDecodeError:
            continue
    raise AssertionError("no fake record that is valid UTF-8")


def cut_inside(segment, marker: bytes, how):
    """Cut the segment a few bytes after ``marker`` (inside its record): truncated or zeroed."""
    data = segment.read_bytes()
    at = data.index(marker) + len(marker) + 4
    if how == "cut":
        os.truncate(segment, at)
    else:
        with open(segment, "r+b") as f:
            f.seek(at)
            f.write(bytes(len(data.rstrip(b"\0")) - at))


@pytest.mark.parametrize("how", ["cut", "zeroed"])
@pytest.mark.parametrize("layout", ["old", "new"])
def test_torn_tail_whose_payload_holds_a_fake_record_is_cut_off(make_daemon, layout, how):
    """A torn last record whose payload looks like a record is a torn tail: cut, earlier kept."""
    d = make_daemon(config=NO_SNAPSHOTS)
    ids = enqueue(d, 3)
    fake = fake_record(layout)
    d.ok(op="enqueue", tool="llm-haiku", payload=f"before {fake} after, and then some more")
    d.kill()
    cut_inside(d.journal_segments()[-1], fake.encode() + b" after", how)
    d.start()
    assert payloads(d, ids + [ids[-1] + 1]) == {i: f"p{n}" for n, i in enumerate(ids)}


def empty_segment(d, first_seq, size):
    """A newest segment as a crash while creating it leaves one: ``size`` zero bytes."""
    path = d.data_dir / "journal" / f"{first_seq:020d}.journal"
    path.write_bytes(bytes(size))


@pytest.mark.parametrize("newest", [0, MiB], ids=["zero-length", "all-zeros"])
@pytest.mark.parametrize("how", ["cut", "zeroed"])
def test_torn_write_across_a_rotation_is_cut_off(make_daemon, how, newest):
    """A sealed segment's torn last record, then a newest segment with no record: both cut off."""
    d = make_daemon(config=NO_SNAPSHOTS)
    ids = enqueue(d, 5)
    last_seq = d.ok(op="status")["journal"]["seq"]
    d.kill()
    tear_last_record(d.journal_segments()[-1], how)
    empty_segment(d, last_seq + 1, newest)
    d.start()
    assert list(statuses(d)) == ids[:-1]
    assert d.ok(op="enqueue", tool="llm-haiku")["status"] == "pending"  # and changes go on


# -- a journal cut at every byte ---------------------------------------------------


def trimmed(segment):
    """A segment's bytes up to the end of its last record (without the preallocated zeros)."""
    data = segment.read_bytes()
    return data[:sparkqd.record_spans(data)[-1][1]]


def sealed_and_newest(make_daemon):
    """Two segments real daemons wrote: a workload's, then one holding one enqueue after it."""
    first = make_daemon(config=NO_SNAPSHOTS)
    enqueue(first, 3)
    first.ok(op="complete", task=claim(first))
    first.kill()
    second = make_daemon(config=NO_SNAPSHOTS, subdir="second", start=False)
    shutil.copytree(first.data_dir, second.data_dir)
    second.start()
    wait_until(lambda: (s := second.ok(op="status"))["snapshot"]["seq"] == s["journal"]["seq"],
               message="the snapshot after recovery")  # it removes the first segment there
    second.ok(op="enqueue", tool="llm-haiku", payload="after the rotation")
    second.kill()
    (sealed,), (newest,) = first.journal_segments(), second.journal_segments()
    return [(sealed.name, trimmed(sealed)), (newest.name, trimmed(newest))]


def record_ends(segments):
    """Where each record ends, as offsets into the segments laid end to end."""
    ends, offset = [], 0
    for _, data in segments:
        ends += [offset + end for _, end in sparkqd.record_spans(data)]
        offset += len(data)
    return ends


def write_cut(journal, segments, cut, zeroed):
    """Write the segments as a crash at offset ``cut`` leaves them: truncated, or zeros from there.

    A segment wholly after the cut is left empty: zero length, or all zeros.
    """
    shutil.rmtree(journal, ignore_errors=True)
    journal.mkdir(parents=True)
    offset = 0
    for name, data in segments:
        kept = data[:max(0, cut - offset)]
        (journal / name).write_bytes(kept + bytes(len(data) - len(kept) + 4096) if zeroed else kept)
        offset += len(data)


def replayed(journal):
    return list(sparkqd.Journal(str(journal)).replay(0))


def survives(whole, cut, end, zeroed):
    """Whether the record ending at ``end`` is intact after the cut: wholly before it, or
    zeroed only where its bytes were zeros already (a body may well end in a zero byte)."""
    return end <= cut or (zeroed and not whole[cut:end].strip(b"\0"))


def cuts_that_misreplay(segments, start, journal):
    """Each cut from offset ``start`` to the end, both ways: those that do not replay exactly."""
    ends, whole = record_ends(segments), b"".join(data for _, data in segments)
    write_cut(journal, segments, ends[-1], zeroed=False)
    events = replayed(journal)
    assert len(events) == len(ends)
    wrong = []
    for cut, zeroed in itertools.product(range(start, ends[-1] + 1), (False, True)):
        write_cut(journal, segments, cut, zeroed)
        try:
            got = replayed(journal)
        except sparkqd.StartupError as exc:
            got = exc
        if got != events[:sum(survives(whole, cut, end, zeroed) for end in ends)]:
            wrong.append((cut, "zeroed" if zeroed else "truncated", str(got)[:200]))
    return wrong


@pytest.mark.parametrize("where", ["newest-segment", "across-a-rotation"])
def test_journal_cut_at_every_byte_replays_the_records_before_the_cut(make_daemon, workdir, where,
                                                                      caplog):
    """Cut at any byte of its last two records, the journal replays exactly the records before."""
    caplog.set_level(logging.ERROR, logger="sparkqd")  # not a torn-tail warning per cut
    segments = sealed_and_newest(make_daemon)
    if where == "newest-segment":
        segments = segments[:1]
    start = sparkqd.record_spans(segments[0][1])[-2 if where == "newest-segment" else -1][0]
    wrong = cuts_that_misreplay(segments, start, workdir / "cut" / "journal")
    print(f"\ncut at every byte ({where}): {2 * (record_ends(segments)[-1] - start + 1)} cuts, "
          f"{len(wrong)} replayed wrongly")
    assert wrong == [], "\n".join(map(str, wrong[:12]))


def queue_of(events):
    """A fresh Queue in this process with ``events`` applied."""
    queue = sparkqd.Queue(sparkqd.Config())
    for event in events:
        queue.apply(event)
    return queue


def test_daemon_starts_from_a_journal_cut_anywhere_in_its_tail(make_daemon, workdir):
    """A daemon on a journal cut at ten points across a rotation holds what precedes each cut."""
    segments = sealed_and_newest(make_daemon)
    ends = record_ends(segments)
    write_cut(workdir / "whole", segments, ends[-1], zeroed=False)
    events = replayed(workdir / "whole")
    first = ends[-3]  # the start of the sealed segment's last record
    for n, cut in enumerate(range(first, ends[-1] + 1, (ends[-1] - first) // 9 or 1)):
        d = make_daemon(config=NO_SNAPSHOTS, subdir=f"cut{n}", start=False)
        write_cut(d.data_dir / "journal", segments, cut, zeroed=n % 2 == 1)
        d.start()
        assert state_of(d) == state_of_queue(queue_of(events[:sum(e <= cut for e in ends)])), cut
        d.kill()


# -- a full disk ---------------------------------------------------------------------


def epoch(stamp):
    return datetime.fromisoformat(stamp).timestamp()


def until(moment):
    """Sleep until the epoch second ``moment``: what happens to a timer then is under test."""
    time.sleep(max(0.0, moment - time.time()))


def on_disk(make_daemon, disk, config):
    d = make_daemon(config=config, start=False)
    d.data_dir = disk / "data"
    return d.start()


def leave_free(disk, nbytes):
    """Take all but ``nbytes`` of the disk with a ballast file."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "ballast", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free - nbytes)


def fill_segment(d, stream):
    """Enqueue 16 KiB payloads into ``stream`` until the journal refuses one; their ids."""
    ids = []
    for _ in range(200):
        reply = d.call(op="enqueue", stream=stream, tool="quick", payload="b" * (16 << 10))
        if not reply["ok"]:
            assert reply["error"]["code"] == "unavailable", reply
            return ids
        ids.append(reply["result"]["id"])
    raise AssertionError("the journal never filled up")


def test_leases_expiring_on_a_full_disk_do_not_wedge_the_journal(make_daemon, small_disk):
    """Leases that expire while the disk is full are failed once there is room; changes go on."""
    d = on_disk(make_daemon, small_disk, QUICK_TOOLS)
    ids = enqueue(d, 4, tool="quick")
    fill_disk(small_disk)
    leases = [epoch(d.ok(op="claim")["lease_expires_at"]) for _ in ids]
    until(max(leases) + 0.5)
    (small_disk / "filler").unlink()
    assert d.ok(op="status")["journal"]["failure"] is None
    later = d.ok(op="enqueue", tool="quick", payload="after")["id"]
    wait_until(lambda: set(statuses(d).values()) == {"failed", "pending"}, message="stale failures")
    d.kill()
    d.start()
    assert statuses(d) == {**{i: "failed" for i in ids}, later: "pending"}


LONGER_LEASE = QUICK_TOOLS.replace("timeout: 0.3", "timeout: 3")  # time to fill the journal


def test_lease_expiry_failing_more_than_the_journal_has_room_for_does_not_wedge_it(
        make_daemon, small_disk):
    """A lease expiring on a full disk and full segment fails 1500 dependents once there is room."""
    leave_free(small_disk, 3 * MiB // 2)  # so the daemon's journal segment is a small one
    d = on_disk(make_daemon, small_disk, LONGER_LEASE)
    first = d.ok(op="enqueue", tool="quick")["id"]
    dependents = [d.ok(op="enqueue", tool="quick", after=[first])["id"] for _ in range(1500)]
    d.ok(op="stream.create", name="ballast", session="default")
    lease = epoch(d.ok(op="claim")["lease_expires_at"])
    fill_disk(small_disk)
    ballast = fill_segment(d, "ballast")
    until(lease + 0.5)
    (small_disk / "filler").unlink()
    (small_disk / "ballast").unlink()
    assert d.ok(op="status")["journal"]["failure"] is None
    later = d.ok(op="enqueue", tool="quick", payload="after")["id"]
    wait_until(lambda: set(map(statuses(d).get, dependents)) == {"failed"}, interval=0.2,
               message="the dependents failed")
    d.kill()
    d.start()
    assert statuses(d) == {first: "failed", **{i: "failed" for i in dependents},
                           **{i: "pending" for i in ballast}, later: "pending"}


def test_daemon_started_on_a_full_disk_keeps_its_timer(make_daemon, small_disk):
    """Started on a full disk, the daemon releases delayed tasks and snapshots once there's room."""
    d = on_disk(make_daemon, small_disk, SNAPSHOT_SOON)
    ids = enqueue(d, 3)
    early = d.ok(op="enqueue", tool="llm-haiku", delay=1.0)
    d.kill()
    fill_disk(small_disk)
    d.start()
    until(epoch(early["ready_at"]) + 0.5)  # its delay ends while the disk is full
    (small_disk / "filler").unlink()
    task = d.ok(op="enqueue", tool="llm-haiku", delay=0.5)["id"]
    seq = d.ok(op="status")["journal"]["seq"]
    wait_until(lambda: statuses(d) == {**{i: "pending" for i in ids + [early["id"], task]}},
               message="the delayed tasks released")
    wait_until(lambda: (d.ok(op="status")["snapshot"]["seq"] or 0) >= seq, message="a snapshot")


# -- fuzzed requests ----------------------------------------------------------------

#: Tools whose timers fire at once or not for hours, so the fuzzed state settles quickly.
FUZZ_CONFIG = """\
database: {snapshot_interval: 1}
task_classes:
  NOW: {timeout: 3600, retry_backoff: 0}
  LATER: {timeout: 100000, retry_backoff: 100000}
tools:
  agent: {task_class: NOW}
  slow: {task_class: LATER, max_attempts: 3}
  run-bash: {task_class: NOW, command: [bash, -c]}
"""
SKIPPED_OPS = {"shutdown", "watch"}  # one stops the daemon, the other streams for ever
#: Ops drawn more often than the rest, so the queue fills with tasks in every state.
FAVOURED = ["enqueue"] * 8 + ["claim", "complete", "fail", "requeue", "cancel", "touch",
                              "stream.create", "session.create", "stream.pause"] * 2
CHANGING_OPS = {"session.create", "session.end", "stream.create", "stream.end", "stream.pause",
                "stream.resume", "enqueue", "claim", "complete", "fail", "touch", "cancel",
                "requeue", "purge"}
NAMES = ["default", "fz", "fz-2", "ci.build", "x" * 64, "bad name", ""]
TOOLS = ["agent", "slow", "run-bash", "llm-haiku", "nope"]
STATUSES = ["pending", "waiting", "running", "completed", "failed", "cancelled", "lost"]
TIMES = ["1970-01-01T00:00:00Z", "2000-01-01T00:00:00.000Z", "0001-01-01T00:00:00Z",
         "9999-12-31T23:59:59.999Z", "2999-01-01T00:00:00+02:00", "+275760-09-13T00:00:00Z",
         "2026-13-45T99:99:99Z", "yesterday", ""]
ODD_TEXT = st.one_of(st.text(max_size=12), st.sampled_from(
    ["\0", "\u2028", "\ufeff", "é✓", "𝕏\u200d", "\u202eevil", "a\nb", "\\", '"', "\x7f"]))
SURROGATES = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
BIG_INTS = st.integers(min_value=2**63 - 2, max_value=2**70) | st.integers(max_value=-2**63 + 2,
                                                                           min_value=-2**70)
EXT = st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=8))
FINITE = st.floats(allow_nan=False, allow_infinity=False)
TAME_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | FINITE | ODD_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_TEXT, inner, max_size=3),
    max_leaves=8)
WILD = {
    "json": st.recursive(
        st.none() | st.booleans() | st.integers() | BIG_INTS | FINITE | ODD_TEXT | SURROGATES,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4),
        max_leaves=12),
    "msgpack": st.recursive(
        st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | ODD_TEXT
        | st.binary(max_size=12) | EXT,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
            ODD_TEXT | st.integers(-2**63, 2**64 - 1) | st.none() | st.booleans() | st.floats()
            | st.binary(max_size=4), inner, max_size=4),
        max_leaves=12),
}
#: Durations that either fire at once or lie hours away, valid or not.
DURATIONS = st.one_of(
    st.sampled_from([0, 1e-9, 0.001, 3600.0, 1e6, 1e9, 1e17, 1e300, 1.7976931348623157e308,
                     -0.0, -1, -1e17, 2**63, 2**64 - 1, math.inf, -math.inf, math.nan]),
    st.floats(min_value=1e5), st.floats(max_value=0))
#: What a claim may wait or a `wait` may block: never long.
SHORT_WAITS = st.sampled_from([0, 0.01, 0.05, -1, -1e17, math.nan, "soon", [], {}])
SOME_NAMES = st.sampled_from(NAMES[:4])
SOME_TOOLS = st.sampled_from(TOOLS[:3])
TASK_IDS = st.integers(1, 60)
SOME_TEXT = st.text(min_size=1, max_size=10)
#: Values a request may well be carried out with.
VALID = {
    "name": SOME_NAMES, "session": SOME_NAMES,
    "stream": SOME_NAMES, "tool": SOME_TOOLS,
    "task": TASK_IDS, "tasks": st.lists(TASK_IDS, min_size=1, max_size=3),
    "after": st.lists(st.integers(1, 8), max_size=1), "payload": TAME_JSON, "result": TAME_JSON,
    "summary": SOME_TEXT, "reason": SOME_TEXT, "worker": SOME_TEXT, "key": SOME_TEXT,
    "lock": SOME_TEXT, "timeout": st.sampled_from([1e-9, 0.001, 3600.0, 1e6]),
    "delay": st.sampled_from([0, 1e-9, 3600.0, 1e6]),
    "older_than_days": st.sampled_from([0, 1e-9, 1.0, 1000.0]),
    "priority": st.integers(-5, 5), "max_attempts": st.integers(1, 4),
    "limit": st.integers(0, 5), "tail": st.integers(0, 5), "pid": st.integers(1, 2**31 - 1),
    "at": st.sampled_from(TIMES[:2]), "since": st.sampled_from(TIMES[:2]),
    "status": st.sampled_from(STATUSES[:6]), "final": st.booleans(),
}
#: Values at and past the edges of what a field takes.
EDGE = {
    "name": st.sampled_from(NAMES), "session": st.sampled_from(NAMES),
    "stream": st.sampled_from(NAMES) | st.lists(st.sampled_from(NAMES), max_size=3),
    "tool": st.sampled_from(TOOLS) | st.lists(st.sampled_from(TOOLS), max_size=3),
    "task": st.sampled_from([0, -1, 2**63 - 1, 2**63, 2**64 - 1]),
    "summary": ODD_TEXT, "reason": ODD_TEXT, "worker": ODD_TEXT, "key": ODD_TEXT, "lock": ODD_TEXT,
    "lease": ODD_TEXT, "script": ODD_TEXT, "args": st.lists(ODD_TEXT, max_size=3),
    "timeout": DURATIONS, "delay": DURATIONS, "older_than_days": DURATIONS,
    "priority": st.sampled_from([2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**64 - 1]),
    "max_attempts": st.sampled_from([0, -1, 2**31, 2**63 - 1]),
    "limit": st.sampled_from([-1, 2**63 - 1, 2**64 - 1]), "tail": st.sampled_from([-1, 2**63 - 1]),
    "pid": st.sampled_from([0, -1, 2**31, 2**63 - 1]),
    "at": st.sampled_from(TIMES), "since": st.sampled_from(TIMES),
    "status": st.sampled_from(STATUSES),
}
ENDABLE = st.sampled_from(NAMES[2:])  # default and fz stay open, so tasks keep coming
#: Fields whose every value must keep the connection answering (no long waits, no follow)
#: or the queue open (the streams most tasks go to are never ended).
SAFE = {("claim", "wait"): SHORT_WAITS, ("wait", "timeout"): SHORT_WAITS,
        ("logs", "follow"): st.sampled_from([False, None, [], "no"]),
        ("session.end", "name"): ENDABLE, ("stream.end", "name"): ENDABLE}
DEPTHS = st.sampled_from([64, 100, 101, 1000, 20000])


class Deep:
    """A value nested ``depth`` lists deep, spliced into the frame after encoding."""

    def __init__(self, depth):
        self.depth = depth

    def token(self):
        return f"@@deep{self.depth}@@"


def encode(encoding, message):
    """The frame of ``message`` in ``encoding``, deep values spliced in as raw bytes."""
    deep = [v for v in message.values() if isinstance(v, Deep)] if isinstance(message, dict) else []
    if deep:
        message = {k: v.token() if isinstance(v, Deep) else v for k, v in message.items()}
    if encoding == "json":
        frame = json.dumps(message).encode()
        for value in deep:
            frame = frame.replace(json.dumps(value.token()).encode(),
                                  b"[" * value.depth + b"]" * value.depth)
        return frame + b"\n"
    frame = msgspec.msgpack.encode(message)
    for value in deep:
        frame = frame.replace(msgspec.msgpack.encode(value.token()),
                              b"\x91" * (value.depth - 1) + b"\x90")
    return struct.pack(">I", len(frame)) + frame


def field_value(draw, encoding, op, field, mood):
    """A value for one field: one it may be carried out with, an edge case, or anything at all."""
    if (op, field) in SAFE:
        return draw(SAFE[op, field])
    valid, edge, wild = VALID.get(field), EDGE.get(field), WILD[encoding]
    choices = {"valid": [valid], "edge": [valid, edge], "wild": [valid, edge, wild, wild,
                                                                 st.builds(Deep, DEPTHS)]}[mood]
    return draw(st.one_of([c for c in choices if c is not None] or [wild]))


@st.composite
def frames(draw, encoding, fields):
    """One frame: a request of a known op (mostly), an unknown op, a non-map, or garbage.

    Returns (frame bytes, the op or None, the id sent).
    """
    kind = draw(st.sampled_from(["request"] * 12 + ["unknown-op", "not-a-map", "garbage"]))
    if kind == "garbage":
        junk = draw(st.binary(min_size=1, max_size=40))
        if encoding == "json":
            return (junk.replace(b"\n", b"").strip() or b"?") + b"\n", None, None
        return struct.pack(">I", len(junk)) + junk, None, None
    if kind == "not-a-map":
        value = draw(st.lists(WILD[encoding], max_size=3) | WILD[encoding])
        return encode(encoding, value), None, None
    mood = draw(st.sampled_from(["valid", "valid", "valid", "edge", "wild"]))
    if kind == "request":
        op = draw(st.sampled_from(sorted(fields) + [op for op in FAVOURED if op in fields]))
        required, optional = fields[op]
    else:
        op = draw(ODD_TEXT.filter(lambda name: name not in fields) | WILD[encoding])
        required, optional = [], []
    if mood == "valid":
        optional = [field for field in optional if field in VALID]
        required = required + (["tool"] if op == "enqueue" else [])  # or a script: there is none
        optional = [field for field in optional if field not in required]
    chosen = required + draw(st.lists(st.sampled_from(optional), unique=True, max_size=3)
                             if optional else st.just([]))
    if op == "wait":
        chosen = sorted(set(chosen) | {"timeout"})  # without one, a wait may block for ever
    message = {"op": op} if mood == "valid" or draw(st.integers(0, 20)) else {}
    for field in chosen:
        message[field] = field_value(draw, encoding, op, field, mood)
    if mood != "valid" and draw(st.integers(0, 4)) == 0:
        message[draw(ODD_TEXT.filter(lambda name: name not in message))] = draw(WILD[encoding])
    if draw(st.booleans()):
        message["id"] = draw(WILD[encoding])
    return encode(encoding, message), op if "op" in message else None, message.get("id")


def request_fields(d):
    """For each op the fuzzer sends: (required fields, optional fields), from the `schema` reply."""
    schema = d.ok(op="schema")
    fields = {}
    for op, ref in schema["discriminator"]["mapping"].items():
        if op not in SKIPPED_OPS:
            definition = schema["$defs"][ref.rpartition("/")[2]]
            required = [f for f in definition.get("required", []) if f != "op"]
            optional = sorted(set(definition["properties"]) - set(required) - {"op", "id"})
            fields[op] = (required, optional)
    return fields


def reply_problem(encoding, reply, sent_id):
    """What is wrong with a reply by the contract, or None."""
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        return "not a reply"
    if reply["ok"]:
        echoed = "result" in reply and same(encoding, reply.get("id"), sent_id)
        return None if echoed else "ok without a result or the id echoed"
    error = reply.get("error")
    if not isinstance(error, dict) or error.get("code") not in ERROR_CODES:
        return "an error code outside the contract"
    if not isinstance(error.get("message"), str) or not error["message"]:
        return "an error without a message"
    if error["code"] != "bad_request" and not same(encoding, reply.get("id"), sent_id):
        return "the id not echoed"
    return None


def same(encoding, got, sent):
    """Whether ``got`` is ``sent`` as the encoding carries it (NaN included); both pass
    through the same decoder, which reads a msgpack timestamp only to microseconds (that
    the bytes come back exactly, test_protocol checks)."""
    if encoding == "json":
        return got == json.loads(json.dumps(sent))
    packed = msgspec.msgpack.encode
    return packed(got) == packed(msgspec.msgpack.decode(packed(sent)))


def quick_view(conn):
    return [conn.ok(op=op) for op in ("tasks", "session.list", "stream.list", "locks")]


def settled_views(d, conns):
    """state_of in each encoding, once timers due at once have fired (two reads agree)."""
    seen = []

    def stable():
        seen.append(msgspec.msgpack.encode(quick_view(conns["msgpack"])))
        return len(seen) > 1 and seen[-1] == seen[-2]
    wait_until(stable, timeout=30, interval=0.3, message="the fuzzed state to settle")
    return {encoding: state_of(conn) for encoding, conn in conns.items()}


def differences(before, after):
    """Entries (tasks by id, sessions, streams, locks) that differ between two views."""
    def entries(view):
        found = {("task", t["id"]): t for t in view["task"]}
        found.update({("session", s["name"]): s for s in view["sessions"]})
        found.update({("stream", s["name"]): s for s in view["streams"]})
        found["locks"] = view["locks"]
        found["order"] = [t["id"] for t in view["tasks"]]
        return found
    a, b = entries(before), entries(after)
    return sorted((key for key in a.keys() | b.keys() if key not in a or key not in b
                   or msgspec.msgpack.encode(a[key]) != msgspec.msgpack.encode(b[key])), key=str)


def connections(d):
    conns = {"json": d.connect(), "msgpack": d.connect("msgpack")}
    for conn in conns.values():
        conn.ok(op="hello")  # the first frame picks the connection's encoding
    return conns


@pytest.mark.timeout(150)
def test_fuzzed_requests_get_well_formed_replies_and_survive_kill_9(make_daemon):
    """Fuzzed requests in both encodings get contract replies; kill -9 keeps the whole view."""
    d = make_daemon(config=FUZZ_CONFIG)
    fields, conns, tally = request_fields(d), connections(d), Counter()

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: state moves on
    @given(st.data())
    def requests_get_contract_replies(data):
        tally["examples"] += 1
        for _ in range(data.draw(st.integers(1, 4))):
            encoding = data.draw(st.sampled_from(sorted(conns)))
            frame, op, sent_id = data.draw(frames(encoding, fields))
            try:
                conns[encoding].send_raw(frame)
                reply = conns[encoding].recv()
            except (OSError, EOFError) as exc:
                conns.update(connections(d))
                raise AssertionError(f"{encoding} connection lost ({exc!r}) on {frame[:300]!r}")
            problem = reply_problem(encoding, reply, sent_id)
            assert problem is None, (problem, frame[:300], reply)
            tally["requests"] += 1
            tally["ok" if reply["ok"] else reply["error"]["code"]] += 1
            tally["acknowledged changes"] += reply["ok"] and op in CHANGING_OPS and (
                op != "claim" or reply["result"] is not None)

    requests_get_contract_replies()
    before = settled_views(d, conns)
    d.kill()
    d.start()
    after = {encoding: state_of(conn) for encoding, conn in connections(d).items()}
    lost = {encoding: differences(before[encoding], after[encoding]) for encoding in before}
    print(f"\nfuzzer: {dict(tally)}, {len(before['json']['tasks'])} tasks at the end, lost "
          f"{ {encoding: len(keys) for encoding, keys in lost.items()} }")
    assert lost == {"json": [], "msgpack": []}
