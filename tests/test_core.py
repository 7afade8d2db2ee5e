"""The pure queue core, driven directly with a fake clock: no daemon, no files, no sleeping."""

import msgspec
import pytest

import sparkqd
from conftest import core_call
from sparkqd import (Claim, Complete, Conflict, Enqueue, Fail, GetTask, ListTasks, NotFound,
                     Peek, Purge, Requeue, SessionCreate, SessionEnd, StreamCreate, StreamEnd)

T0 = 1_800_000_000.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now=T0):
        self.now = now

    def advance(self, seconds):
        self.now += seconds
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def queue(clock):
    q = sparkqd.Queue(sparkqd.Config())
    q.bootstrap(clock.now)
    q.take_events()
    return q


def do(queue, clock, request):
    return core_call(queue, request, clock.now)


def enqueue(queue, clock, payload="x", **fields):
    return do(queue, clock, Enqueue(tool="run-bash", payload=payload, **fields))


def test_enqueue_assigns_increasing_ids_and_pending_status(queue, clock):
    """Ids start at 1, grow by one, and a new task is pending."""
    records = [enqueue(queue, clock, f"job {n}") for n in range(3)]
    assert [r["id"] for r in records] == [1, 2, 3]
    assert {r["status"] for r in records} == {"pending"}


def test_claim_is_fifo_within_a_stream(queue, clock):
    """Tasks of equal priority are claimed oldest first."""
    for n in range(5):
        enqueue(queue, clock, n)
    claimed = [do(queue, clock, Claim())["payload"] for _ in range(5)]
    assert claimed == [0, 1, 2, 3, 4]
    assert do(queue, clock, Claim()) is None


def test_claim_prefers_higher_priority(queue, clock):
    """A higher priority is claimed first; FIFO among equals."""
    enqueue(queue, clock, "low")
    enqueue(queue, clock, "high-1", priority=5)
    enqueue(queue, clock, "high-2", priority=5)
    assert [do(queue, clock, Claim())["payload"] for _ in range(3)] == ["high-1", "high-2", "low"]


def test_timeout_comes_from_request_then_tool_then_class(queue, clock):
    """The request's timeout wins; without one, the tool's class gives it."""
    assert enqueue(queue, clock, timeout=7)["timeout"] == 7
    assert enqueue(queue, clock)["timeout"] == 300  # run-bash is MEDIUM_SCRIPT


def test_lifecycle_records_history_with_times(queue, clock):
    """Each transition is in the history with the time it happened."""
    enqueue(queue, clock)
    clock.advance(1)
    do(queue, clock, Claim(worker="w1"))
    clock.advance(2)
    do(queue, clock, Complete(task=1, summary="done", result={"n": 1}))
    task = do(queue, clock, GetTask(task=1))
    assert [(h["status"], h["by"]) for h in task["history"]] == [
        ("pending", None), ("running", "w1"), ("completed", "w1")]
    assert task["finished_at"] == sparkqd.rfc3339(T0 + 3)
    assert task["result"] == {"n": 1} and task["summary"] == "done"


def test_illegal_transitions_are_conflicts(queue, clock):
    """Completing or failing a task that is not running, or requeueing a pending one, is refused."""
    enqueue(queue, clock)
    for request in (Complete(task=1), Fail(task=1, reason="r"), Requeue(task=1)):
        with pytest.raises(Conflict):
            do(queue, clock, request)
    assert queue.take_events() == [sparkqd.TaskEnqueued(
        at=T0, id=1, stream="default", tool="run-bash", task_class="MEDIUM_SCRIPT",
        payload="x", timeout=300.0)]


def test_unknown_names_are_not_found(queue, clock):
    """Unknown tasks, streams and sessions raise NotFound and emit nothing."""
    for request in (GetTask(task=9), Claim(stream="nope"), Peek(stream="nope"),
                    StreamCreate(name="s", session="nope"), ListTasks(session="nope")):
        with pytest.raises(NotFound):
            do(queue, clock, request)
    assert queue.take_events() == []


def test_ended_stream_refuses_new_tasks_but_finishes_old_ones(queue, clock):
    """After stream.end, enqueue is a conflict while existing tasks can still be claimed."""
    enqueue(queue, clock)
    do(queue, clock, StreamEnd(name="default"))
    with pytest.raises(Conflict):
        enqueue(queue, clock)
    assert do(queue, clock, Claim())["id"] == 1


def test_session_end_ends_its_streams(queue, clock):
    """Ending a session ends every stream in it."""
    do(queue, clock, SessionCreate(name="s"))
    do(queue, clock, StreamCreate(name="a", session="s"))
    do(queue, clock, SessionEnd(name="s"))
    assert queue.streams["a"].status == "ended"
    with pytest.raises(Conflict):
        do(queue, clock, StreamCreate(name="b", session="s"))


def test_stale_running_task_fails_after_factor_times_timeout(queue, clock):
    """A task running past stale.factor x timeout is failed by tick, with the reason."""
    enqueue(queue, clock, timeout=10)
    do(queue, clock, Claim())
    assert queue.tick(clock.advance(19.9)) == pytest.approx(T0 + 20)
    assert queue.tasks[1].status == "running"
    queue.tick(clock.advance(0.2))
    assert queue.tasks[1].status == "failed"
    assert "stale" in queue.tasks[1].reason


def test_purge_removes_only_old_terminal_tasks(queue, clock):
    """Finished tasks older than the cut-off go; pending and running ones stay."""
    for _ in range(3):
        enqueue(queue, clock)
    do(queue, clock, Claim())
    do(queue, clock, Complete(task=1))
    do(queue, clock, Claim())
    clock.advance(2 * sparkqd.DAY)
    assert do(queue, clock, Purge(older_than_days=1)) == {"purged": 1}
    assert sorted(queue.tasks) == [2, 3]
    assert enqueue(queue, clock)["id"] == 4


def test_tick_purges_by_configured_age(queue, clock):
    """The timer purges finished tasks older than purge.older_than_days (3)."""
    enqueue(queue, clock)
    do(queue, clock, Claim())
    do(queue, clock, Complete(task=1))
    queue.tick(clock.advance(2.9 * sparkqd.DAY))
    assert 1 in queue.tasks
    queue.tick(clock.advance(0.2 * sparkqd.DAY))
    assert 1 not in queue.tasks


def test_replaying_events_rebuilds_the_same_state(queue, clock):
    """Applying the emitted events to a fresh queue gives identical records."""
    queue.bootstrap(clock.now)
    events = []
    for n in range(4):
        enqueue(queue, clock, n)
    do(queue, clock, Claim())
    do(queue, clock, Fail(task=1, reason="boom"))
    do(queue, clock, Requeue(task=1))
    do(queue, clock, Claim())
    events = queue.take_events()
    fresh = sparkqd.Queue(sparkqd.Config())
    fresh.bootstrap(T0)
    for event in msgspec.msgpack.decode(msgspec.msgpack.encode(events),
                                        type=list[sparkqd.AnyEvent]):
        fresh.apply(event)
    assert [sparkqd.Replies(fresh).task(t, True) for t in fresh.tasks.values()] == \
        [sparkqd.Replies(queue).task(t, True) for t in queue.tasks.values()]


def test_load_rebuilds_indexes_from_snapshot_rows(queue, clock):
    """A queue loaded from task objects claims in the same order as the original."""
    for n in range(3):
        enqueue(queue, clock, n, priority=n % 2)
    loaded = sparkqd.Queue(sparkqd.Config())
    loaded.load(list(queue.sessions.values()), list(queue.streams.values()),
                list(queue.tasks.values()), queue.next_id)
    assert [core_call(loaded, Claim(), T0)["payload"] for _ in range(3)] == [1, 0, 2]


def test_snapshot_changes_track_latest_versions(queue, clock):
    """take_changes hands over the latest version of each changed task, once."""
    enqueue(queue, clock)
    do(queue, clock, Claim())
    changes = queue.take_changes()
    assert changes.tasks[1].status == "running"
    assert not queue.take_changes()
