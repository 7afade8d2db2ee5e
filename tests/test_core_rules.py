"""The scheduling rules that take time (delays, retry back-offs, lease expiry) on the pure core.

These are the rules of test_scheduling.py whose daemon tests waited in real
time; here the same requests go to the queue core as the daemon's dispatch
hands them over, with the same configuration (tool ``t``: 1 s leases, 2
attempts, 0.2 s back-off capped at 1 s; ``agent``: 60 s leases), and time
passes on a fake clock: ``later(seconds)`` and ``until(moment)`` run the timer
(``tick``) as the daemon's one timer would. That the daemon's timer really
fires a delay, a back-off and a lease expiry is shown once each by the daemon
tests (test_scheduling.py, test_durability.py).
"""

from datetime import datetime, timezone

import pytest

import sparkqd
from conftest import core_call
from sparkqd import Claim, Complete, Conflict, Enqueue, Fail, GetTask, Touch
from test_core import T0, Clock
from test_scheduling import CONFIG, epoch


class Core:
    """The queue core on the scheduling configuration, with a fake clock."""

    def __init__(self):
        self.clock = Clock()
        self.queue = sparkqd.Queue(sparkqd.parse_config(CONFIG))
        self.queue.bootstrap(self.clock.now)

    def send(self, request):
        """One request, handled at the clock's time; returns the result in wire form."""
        return core_call(self.queue, request, self.clock.now)

    def add(self, tool="agent", **fields) -> int:
        """A new task; returns its id."""
        return self.send(Enqueue(tool=tool, **fields))["id"]

    def run(self, task_id) -> dict:
        """Claim the next task, which must be ``task_id``; returns its record."""
        record = self.send(Claim())
        assert record is not None and record["id"] == task_id, record
        return record

    def show(self, task_id) -> dict:
        """The task record with its history."""
        return self.send(GetTask(task=task_id))

    def expect(self, task_id, **fields) -> dict:
        """The task's record must have these field values; returns the record."""
        record = self.show(task_id)
        assert {k: record[k] for k in fields} == fields, record
        return record

    def later(self, seconds) -> None:
        """Let ``seconds`` pass, then run the timer."""
        self.queue.tick(self.clock.advance(seconds))

    def until(self, moment) -> None:
        """Let time pass to ``moment`` (epoch seconds), then run the timer."""
        self.clock.now = moment
        self.queue.tick(moment)

    def becomes_pending(self, task_id) -> dict:
        """Let a waiting task's delay or back-off run out; it must then be pending."""
        task = self.queue.tasks[task_id]
        if task.status == "waiting":
            self.until(task.ready_at)
        return self.expect(task_id, status="pending")


@pytest.fixture
def q():
    return Core()


# -- delays ----------------------------------------------------------------------------


def test_delay_waits_then_becomes_pending(q):
    """delay 1 s: the task waits (waiting_for delay, ready_at set), then turns pending at ready_at."""
    task_id = q.add(delay=1.0)
    record = q.expect(task_id, status="waiting", waiting_for="delay")
    assert abs(epoch(record["ready_at"]) - epoch(record["created_at"]) - 1.0) < 0.002
    assert q.send(Claim()) is None
    q.until(T0 + 0.999)
    q.expect(task_id, status="waiting")
    released = q.becomes_pending(task_id)
    assert epoch(released["history"][-1]["at"]) >= epoch(record["ready_at"])
    assert q.run(task_id)["status"] == "running"


def test_delay_at_rfc3339_waits_until_then(q):
    """at with an RFC 3339 time waits until that time, then the task is pending."""
    moment = T0 + 2
    stamp = datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    task_id = q.add(at=stamp)
    q.expect(task_id, status="waiting", waiting_for="delay", ready_at=stamp[:-1] + ".000Z")
    q.until(moment - 0.001)
    q.expect(task_id, status="waiting")
    q.until(moment)
    q.expect(task_id, status="pending", waiting_for=None)


# -- retries ---------------------------------------------------------------------------


def test_retry_history_has_every_attempt_and_reason(q):
    """Three failed attempts of three: the task ends failed and its history names each reason."""
    task_id = q.add(tool="t", max_attempts=3)
    for n in (1, 2, 3):
        q.becomes_pending(task_id)
        q.run(task_id)
        q.send(Fail(task=task_id, reason=f"reason-{n}"))
    record = q.expect(task_id, status="failed", attempts=3, reason="reason-3")
    notes = " | ".join(h["note"] or "" for h in record["history"])
    assert all(f"reason-{n}" in notes and f"attempt {n}" in notes for n in (1, 2, 3)), notes


def test_retry_backoff_grows_and_is_never_shorter_than_configured(q):
    """Back-off after attempt n is retry_backoff * 2**(n-1), capped at retry_backoff_max, +0-25%."""
    task_id = q.add(tool="t", max_attempts=5)
    for n, base in enumerate((0.2, 0.4, 0.8, 1.0), start=1):
        q.becomes_pending(task_id)
        q.run(task_id)
        q.send(Fail(task=task_id, reason=f"attempt {n}"))
        record = q.show(task_id)
        backoff = epoch(record["ready_at"]) - epoch(record["history"][-1]["at"])
        # Timestamps are shown truncated to milliseconds: allow 1 ms either way.
        assert base - 0.001 <= backoff <= base * 1.25 + 0.001, (n, backoff)


def test_retry_stale_lease_counts_as_failed_attempt(q):
    """A lease that expires is a failed attempt: the task is retried, and history says stale."""
    task_id = q.add(tool="t")
    q.run(task_id)
    q.later(1.0)  # the lease: stale.factor 1 x timeout 1 s
    record = q.expect(task_id, status="waiting", waiting_for="retry", attempts=1)
    assert "stale" in record["reason"]
    assert any("stale" in (h["note"] or "") and h["by"] == "sparkqd" for h in record["history"])
    q.becomes_pending(task_id)
    assert q.run(task_id)["attempts"] == 2


# -- leases ----------------------------------------------------------------------------


def test_lease_touch_keeps_task_running_past_first_expiry(q):
    """A touched task is still running after its first lease would have expired."""
    task_id = q.add(tool="t", timeout=2)
    first_expiry = epoch(q.run(task_id)["lease_expires_at"])
    q.until(first_expiry - 1)
    q.send(Touch(task=task_id))
    q.until(first_expiry + 0.3)
    q.expect(task_id, status="running", attempts=1)


def test_lease_old_lease_after_expiry_and_reclaim_refused(q):
    """After the lease expired and the task was claimed again, the old lease is refused."""
    task_id = q.add(tool="t", timeout=2)
    old = q.run(task_id)["lease"]
    q.later(2.0)  # the lease expires: a failed attempt, retried after its back-off
    q.becomes_pending(task_id)
    new = q.run(task_id)
    for late in (Complete(task=task_id, lease=old), Fail(task=task_id, lease=old, reason="late")):
        with pytest.raises(Conflict):
            q.send(late)
    q.expect(task_id, status="running", attempts=2, lease=new["lease"],
             lease_expires_at=new["lease_expires_at"])
    assert old != new["lease"]
