"""Scheduling through sparkqctl against a real sparkqd (issue 3), each rule also across a restart.

Priorities, delays, dependencies, unique keys, locks, retries, leases, cancel,
pause, claim filters, wait and bulk requeue. Every behaviour under test is
driven by a sparkqctl command. Steps that only set the scene (a task finished
elsewhere, a stream created) and the checks of task records go over the
socket, because each sparkqctl run costs a Python start. The tool ``t`` has
1 s leases and 2 attempts with a 0.2 s back-off, so expiry and retries happen
within a test; ``agent`` and ``other`` have 60 s leases and no retries.

How long delays, back-offs and leases last is specified on the pure core with a
fake clock, on this same configuration (test_core_rules.py). Here one test each
shows that the daemon's timer really fires them: a delay
(test_delay_end_wakes_blocked_claim) and a back-off
(test_retry_fail_waits_for_backoff_then_pending); test_durability.py's
test_stale_running_task_is_failed does it for a lease expiry. The restart tests
still wait for a delay, back-off or lease to end around a real restart.
"""

import subprocess
import time
from datetime import datetime, timedelta

import pytest

from conftest import SPARKQCTL, wait_until

CONFIG = """
stale: {factor: 1}
task_classes:
  quick: {timeout: 1, max_attempts: 2, retry_backoff: 0.2, retry_backoff_max: 1}
  agent: {timeout: 60}
tools:
  t: {task_class: quick}
  agent: {task_class: agent}
  other: {task_class: agent}
"""

#: Restart after a graceful stop (SIGTERM), and after a crash (SIGKILL).
RESTARTS = pytest.mark.parametrize("how", ["graceful", "kill-9"])


@pytest.fixture
def q(make_daemon):
    """A daemon with the short-lease tool ``t`` and the agent tools ``agent`` and ``other``."""
    return make_daemon(config=CONFIG)


# -- sparkqctl: the commands under test ------------------------------------------------




def refused(daemon, *args, code: str) -> str:
    """sparkqctl must exit 1 with the daemon's error ``code`` on stderr; returns stderr."""
    out = daemon.ctl(*args)
    assert out.returncode == 1 and f"{code}:" in out.stderr, (args, out.returncode, out.stderr)
    return out.stderr


def enqueue(daemon, *args, tool="agent") -> int:
    """Enqueue through the CLI; return the id it printed."""
    return int(daemon.ctl_ok("enqueue", "--tool", tool, *args))


def enqueue_existing(daemon, *args, tool="agent") -> int:
    """Enqueue a key that exists: the CLI prints that task's id, and says so on stderr."""
    out = daemon.ctl("enqueue", "--tool", tool, *args)
    assert out.returncode == 0 and "returned instead of a new one" in out.stderr, out
    return int(out.stdout)


def claim(daemon, *args) -> dict:
    """Claim through the CLI; return the claimed record."""
    return daemon.ctl_json("claim", *args)


def claims(daemon, n, *args) -> list[int]:
    """Claim ``n`` times; the ids in the order they were handed out."""
    return [claim(daemon, *args)["id"] for _ in range(n)]


def nothing_to_claim(daemon, *args) -> bool:
    """A claim finds nothing: exit 4."""
    return daemon.ctl("claim", *args).returncode == 4


def run(daemon, task_id, *args) -> dict:
    """Claim the next task through the CLI, which must be ``task_id``; return its record."""
    record = claim(daemon, *args)
    assert record["id"] == task_id, record
    return record


def background(daemon, *args) -> subprocess.Popen:
    """Start a blocking sparkqctl command and return once the daemon holds its connection."""
    def connections():
        return daemon.ok(op="status")["connections"]

    before = connections()
    proc = subprocess.Popen([*SPARKQCTL, "--socket", str(daemon.socket), *map(str, args)],
                            env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_until(lambda: connections() > before, message="the blocking request to arrive")
    return proc


# -- the socket: setting the scene, reading records ------------------------------------


def add(daemon, tool="agent", **fields) -> int:
    """A new task, enqueued over the socket."""
    return daemon.ok(op="enqueue", tool=tool, **fields)["id"]


def started(daemon, task_id, stream="default") -> dict:
    """Claim over the socket; the task claimed must be ``task_id``."""
    record = daemon.ok(op="claim", stream=stream)
    assert record["id"] == task_id, record
    return record


def finish(daemon, task_id, stream="default") -> None:
    """Claim ``task_id`` and complete it, over the socket."""
    started(daemon, task_id, stream)
    daemon.ok(op="complete", task=task_id)


def failed_task(daemon, stream="default") -> int:
    """A task of ``stream`` enqueued, claimed and failed for good, over the socket."""
    task_id = add(daemon, stream=stream)
    started(daemon, task_id, stream)
    daemon.ok(op="fail", task=task_id, reason="broken", final=True)
    return task_id


def streams(daemon, *names) -> None:
    """Create streams in the default session."""
    for name in names:
        daemon.ok(op="stream.create", name=name, session="default")


def show(daemon, task_id) -> dict:
    """The task record with its history, read over the socket."""
    return daemon.ok(op="task", task=task_id)


def expect(daemon, task_id, **fields) -> dict:
    """The task's record must have these field values; returns the record."""
    record = show(daemon, task_id)
    assert {k: record[k] for k in fields} == fields, record
    return record


def becomes(daemon, task_id, status, timeout=3.0) -> dict:
    """Poll until the task has ``status``; returns its record."""
    return wait_until(lambda: (r := show(daemon, task_id))["status"] == status and r,
                      timeout, message=f"task {task_id} to become {status}")


# -- time and restarts -----------------------------------------------------------------


def epoch(stamp: str) -> float:
    """Epoch seconds of an RFC 3339 timestamp from a reply."""
    return datetime.fromisoformat(stamp).timestamp()


def down(daemon, how: str) -> None:
    """Stop the daemon gracefully (SIGTERM), or kill -9 it."""
    if how == "graceful":
        daemon.stop()
    else:
        daemon.kill()


def restart(daemon, how: str) -> None:
    """Take the daemon down, then start it again on the same data."""
    down(daemon, how)
    daemon.start()


# -- priority --------------------------------------------------------------------------


def test_priority_higher_first(q):
    """Claim takes the task with the highest --priority first; negative ones come last."""
    low, high, default = (enqueue(q, "--priority", p) for p in ("-1", "5", "0"))
    assert claims(q, 3) == [high, default, low]
    assert show(q, high)["priority"] == 5


def test_priority_fifo_among_equals(q):
    """Tasks of equal priority are claimed oldest first."""
    lower = add(q)
    ids = [enqueue(q, "--priority", "2") for _ in range(3)]
    assert claims(q, 4) == [*ids, lower]


def test_priority_across_streams(q):
    """A claim naming several streams takes the highest priority across them, then the oldest."""
    streams(q, "s2")
    a = enqueue(q, "--priority", "1")
    b = enqueue(q, "--stream", "s2", "--priority", "3")
    c = enqueue(q, "--stream", "s2", "--priority", "1")
    assert claims(q, 3, "--stream", "default", "--stream", "s2") == [b, a, c]


@RESTARTS
def test_priority_survives_restart(q, how):
    """Priorities and FIFO order are the same after a restart."""
    first, urgent, second = (enqueue(q, "--priority", p) for p in ("0", "9", "0"))
    restart(q, how)
    assert claims(q, 3) == [urgent, first, second]


# -- delays ----------------------------------------------------------------------------


def test_delay_at_in_the_past_is_pending_at_once(q):
    """--at a past time (RFC 3339 or local 'YYYY-MM-DD HH:MM') makes a task pending at once."""
    past_local = (datetime.now() - timedelta(minutes=2)).strftime("%Y-%m-%d %H:%M")
    for when in ("2020-01-01T00:00:00Z", past_local):
        task_id = enqueue(q, "--at", when)
        expect(q, task_id, status="pending", waiting_for=None)
        assert run(q, task_id)["id"] == task_id


def test_delay_at_local_time_is_read_in_the_local_zone(make_daemon):
    """--at 'YYYY-MM-DD HH:MM' is local time: at UTC+05:30, 12:00 is 06:30Z."""
    q = make_daemon(config=CONFIG, env={"TZ": "IST-5:30"})
    task_id = enqueue(q, "--at", "2099-01-01 12:00")
    expect(q, task_id, status="waiting", waiting_for="delay", ready_at="2099-01-01T06:30:00.000Z")


def test_delay_end_wakes_blocked_claim(q):
    """A `claim --wait` with nothing to claim gets a delayed task as soon as its delay ends."""
    task_id = enqueue(q, "--delay", "1")
    ready_at = epoch(show(q, task_id)["ready_at"])
    out = q.ctl("claim", "--wait", "20", "--json")
    assert (out.returncode, f'"id": {task_id}' in out.stdout) == (0, True), out
    assert ready_at <= time.time() < ready_at + 1.0


@RESTARTS
def test_delay_survives_restart(q, how):
    """A delayed task is still waiting, with the same ready_at, after a restart."""
    task_id = enqueue(q, "--delay", "1h")
    ready_at = show(q, task_id)["ready_at"]
    restart(q, how)
    expect(q, task_id, status="waiting", waiting_for="delay", ready_at=ready_at)
    assert nothing_to_claim(q)


@RESTARTS
def test_delay_ending_while_stopped_is_pending_after_start(q, how):
    """A delay that ends while the daemon is down leaves the task pending right after start."""
    task_id = enqueue(q, "--delay", "0.5")
    ready_at = epoch(show(q, task_id)["ready_at"])
    down(q, how)
    wait_until(lambda: time.time() > ready_at + 0.1, message="the delay to end")
    q.start()
    expect(q, task_id, status="pending", waiting_for=None)
    assert run(q, task_id)["id"] == task_id


# -- dependencies ----------------------------------------------------------------------


def test_after_waits_until_every_dependency_completed(q):
    """--after A,B: the task waits until both A and B have completed, then is pending."""
    a, b = add(q), add(q)
    c = enqueue(q, "--after", f"{a},{b}")
    expect(q, c, status="waiting", waiting_for="after", after=[a, b])
    finish(q, a)
    expect(q, c, status="waiting", waiting_for="after")
    finish(q, b)
    expect(q, c, status="pending", waiting_for=None)
    assert run(q, c)["id"] == c


def test_after_failed_dependency_fails_the_chain(q):
    """A dependency failed for good fails its dependent, naming it, and the chain below."""
    a = add(q)
    b = enqueue(q, "--after", str(a))
    c = enqueue(q, "--after", str(b))
    started(q, a)
    q.ctl_ok("fail", a, "--reason", "tests red", "--final")
    assert f"dependency {a}" in expect(q, b, status="failed")["reason"]
    assert f"dependency {b}" in expect(q, c, status="failed")["reason"]


def test_after_cancelled_dependency_fails_dependent(q):
    """A cancelled dependency fails the dependent with a reason naming it and saying cancelled."""
    a = add(q)
    b = enqueue(q, "--after", str(a))
    q.ctl_ok("cancel", a)
    reason = expect(q, b, status="failed")["reason"]
    assert str(a) in reason and "cancelled" in reason


def test_after_dependency_failed_already_fails_at_enqueue(q):
    """Naming a dependency that has already failed fails the new task at once."""
    a = failed_task(q)
    b = enqueue(q, "--after", str(a))
    assert f"dependency {a}" in expect(q, b, status="failed")["reason"]


def test_after_dependency_completed_already_is_pending_at_once(q):
    """Naming only dependencies that have completed already leaves the new task pending."""
    a = add(q)
    finish(q, a)
    b = enqueue(q, "--after", str(a))
    expect(q, b, status="pending", waiting_for=None, after=[a])


def test_after_unknown_id_refused(q):
    """--after naming a task that does not exist is refused with not_found; nothing is enqueued."""
    a = add(q)
    assert "99" in refused(q, "enqueue", "--tool", "agent", "--after", f"{a},99", code="not_found")
    assert [t["id"] for t in q.ok(op="tasks")] == [a]


@RESTARTS
def test_after_survives_restart(q, how):
    """After a restart a dependent still waits, and is released when its dependency completes."""
    a = add(q)
    b = enqueue(q, "--after", str(a))
    restart(q, how)
    expect(q, b, status="waiting", waiting_for="after", after=[a])
    finish(q, a)
    expect(q, b, status="pending")


# -- unique keys -----------------------------------------------------------------------


def test_key_same_stream_returns_existing_task(q):
    """Enqueueing a key that exists in the stream returns that task (existing: true) instead."""
    first = q.ctl_json("enqueue", "--tool", "agent", "--key", "build-42")
    again = q.ctl_json("enqueue", "--tool", "agent", "--key", "build-42")
    assert (first["existing"], again["existing"], again["id"]) == (False, True, first["id"])
    assert enqueue_existing(q, "--key", "build-42") == first["id"]
    assert len(q.ok(op="tasks")) == 1


def test_key_other_stream_makes_new_task(q):
    """The same key in another stream is a different task."""
    streams(q, "s2")
    first = enqueue(q, "--key", "build-42")
    other = q.ctl_json("enqueue", "--tool", "agent", "--stream", "s2", "--key", "build-42")
    assert other["id"] != first and (other["existing"], other["stream"]) == (False, "s2")


def test_key_held_until_purged(q):
    """A finished task keeps its key until it is purged; then the key makes a new task."""
    first = enqueue(q, "--key", "nightly")
    finish(q, first)
    assert enqueue_existing(q, "--key", "nightly") == first
    assert q.ctl_ok("purge", "--older-than", "0") == "purged 1 tasks\n"
    second = q.ctl_json("enqueue", "--tool", "agent", "--key", "nightly")
    assert second["id"] != first and second["existing"] is False


@RESTARTS
def test_key_survives_restart(q, how):
    """After a restart the key still returns the existing task."""
    first = enqueue(q, "--key", "build-42")
    restart(q, how)
    again = q.ctl_json("enqueue", "--tool", "agent", "--key", "build-42")
    assert (again["id"], again["existing"], again["key"]) == (first, True, "build-42")


# -- locks -----------------------------------------------------------------------------


def test_lock_second_task_skipped_while_first_runs(q):
    """While a task holding a lock runs, claim skips the next task with that lock."""
    first, second = enqueue(q, "--lock", "repo-a"), enqueue(q, "--lock", "repo-a")
    free = add(q)
    assert claims(q, 2) == [first, free]
    assert nothing_to_claim(q)
    expect(q, second, status="pending")


def test_lock_holds_across_streams(q):
    """A lock held by a task in one stream keeps tasks of other streams with that lock waiting."""
    streams(q, "s2")
    first, second = enqueue(q, "--lock", "repo-a"), enqueue(q, "--stream", "s2", "--lock", "repo-a")
    started(q, first)
    assert nothing_to_claim(q, "--stream", "s2")
    expect(q, second, status="pending")


def test_lock_release_wakes_blocked_claim(q):
    """A `claim --wait` blocked behind a held lock gets the task once the holder completes."""
    first, second = enqueue(q, "--lock", "repo-a"), enqueue(q, "--lock", "repo-a")
    started(q, first)
    waiter = background(q, "claim", "--wait", "20", "--json")
    q.ctl_ok("complete", first)
    out, err = waiter.communicate(timeout=10)
    assert (waiter.returncode, f'"id": {second}' in out) == (0, True), (out, err)


@pytest.mark.parametrize("ending", [("complete",), ("fail", "--reason", "broke"), ("cancel",)])
def test_lock_claimable_once_holder_ends(q, ending):
    """The next task with a lock is claimable once the holder completes, fails or is cancelled."""
    first, second = enqueue(q, "--lock", "repo-a"), enqueue(q, "--lock", "repo-a")
    started(q, first)
    assert nothing_to_claim(q)
    q.ctl_ok(ending[0], first, *ending[1:])
    assert run(q, second)["lock"] == "repo-a"


def test_lock_repository_urls_are_one_lock(q):
    """https://github.com/u/r.git, git@github.com:u/r and https://github.com/u/r/ are one lock."""
    urls = ("https://github.com/u/r.git", "git@github.com:u/r", "https://github.com/u/r/")
    ids = [enqueue(q, "--lock", url) for url in urls]
    assert len({show(q, i)["lock"] for i in ids}) == 1
    started(q, ids[0])
    assert nothing_to_claim(q)
    assert [lk["task"] for lk in q.ctl_json("locks")] == [ids[0]]


def test_lock_locks_lists_holder_and_status_counts(q):
    """`locks` lists each held lock with its task, stream and worker; `status` counts them."""
    task_id = enqueue(q, "--lock", "repo-a")
    add(q, lock="repo-b")
    run(q, task_id, "--worker", "agent-1")
    [held] = q.ctl_json("locks")
    assert (held["lock"], held["task"], held["stream"], held["worker"]) == (
        "repo-a", task_id, "default", "agent-1")
    row = q.ctl_ok("locks").splitlines()[1].split()
    assert row[:4] == ["repo-a", str(task_id), "default", "agent-1"]
    assert q.ctl_json("status")["locks"] == 1
    assert ["locks:", "1"] in [line.split() for line in q.ctl_ok("status").splitlines()]


@RESTARTS
def test_lock_still_held_after_restart(q, how):
    """A lock held by a running task is still held after a restart, and frees when it ends."""
    first, second = enqueue(q, "--lock", "repo-a"), enqueue(q, "--lock", "repo-a")
    started(q, first)
    restart(q, how)
    assert [lk["task"] for lk in q.ctl_json("locks")] == [first]
    assert nothing_to_claim(q)
    q.ctl_ok("complete", first)
    assert run(q, second)["id"] == second


# -- retries ---------------------------------------------------------------------------


def test_retry_fail_waits_for_backoff_then_pending(q):
    """`fail` with attempts left puts the task to waiting (retry, ready_at set), then pending."""
    task_id = enqueue(q, "--max-attempts", "3", tool="t")
    started(q, task_id)
    failed = q.ctl_json("fail", task_id, "--reason", "flaky network")
    assert (failed["status"], failed["waiting_for"], failed["attempts"], failed["max_attempts"]) == (
        "waiting", "retry", 1, 3)
    assert failed["ready_at"] is not None and failed["reason"] == "flaky network"
    becomes(q, task_id, "pending")
    assert run(q, task_id)["attempts"] == 2



def test_retry_final_fails_at_once(q):
    """`fail --final` fails the task for good although attempts remain."""
    task_id = enqueue(q, "--max-attempts", "3", tool="t")
    started(q, task_id)
    out = q.ctl_ok("fail", task_id, "--reason", "bad input", "--final")
    assert out == f"task {task_id} failed\n"
    expect(q, task_id, status="failed", attempts=1, waiting_for=None)


def test_retry_builtin_default_is_one_attempt(daemon):
    """With built-in defaults a task has one attempt: `fail` fails it."""
    task_id = int(daemon.ctl_ok("enqueue", "--tool", "llm-haiku"))
    started(daemon, task_id)
    daemon.ctl_ok("fail", task_id, "--reason", "no")
    expect(daemon, task_id, status="failed", attempts=1, max_attempts=1)


@RESTARTS
def test_retry_survives_restart(q, how):
    """A task in retry back-off keeps its attempts and history across a restart, then runs again."""
    task_id = enqueue(q, "--max-attempts", "3", tool="t")
    started(q, task_id)
    q.ctl_ok("fail", task_id, "--reason", "flaky network")
    restart(q, how)
    record = becomes(q, task_id, "pending")
    assert record["attempts"] == 1 and "flaky network" in record["history"][-2]["note"]
    assert run(q, task_id)["attempts"] == 2


@RESTARTS
def test_retry_lease_expiring_while_down_is_a_failed_attempt(q, how):
    """A lease that expires while the daemon is down is a failed attempt, retried after start."""
    task_id = add(q, tool="t")
    expires = epoch(started(q, task_id)["lease_expires_at"])
    down(q, how)
    wait_until(lambda: time.time() > expires + 0.1, message="the lease to expire")
    q.start()
    record = wait_until(lambda: (r := show(q, task_id))["status"] != "running" and r, timeout=3)
    assert record["attempts"] == 1 and "stale" in record["reason"]
    becomes(q, task_id, "pending")


# -- leases ----------------------------------------------------------------------------


def test_lease_claim_returns_lease_and_expiry(q):
    """Claim returns a lease and lease_expires_at = claim time + stale.factor x timeout."""
    add(q)
    record = claim(q)
    assert isinstance(record["lease"], str) and record["lease"]
    assert abs(epoch(record["lease_expires_at"]) - epoch(record["started_at"]) - 60) < 0.002


def test_lease_touch_extends_expiry(q):
    """`touch ID --lease L` moves lease_expires_at later."""
    task_id = add(q)
    record = run(q, task_id)
    touched = q.ctl_json("touch", task_id, "--lease", record["lease"])
    assert epoch(touched["lease_expires_at"]) > epoch(record["lease_expires_at"])
    expect(q, task_id, status="running", lease=record["lease"],
           lease_expires_at=touched["lease_expires_at"])



def test_lease_wrong_lease_refused_and_changes_nothing(q):
    """complete, fail and touch with a lease that is not the task's are refused with conflict."""
    task_id = add(q)
    before = run(q, task_id)
    for command in (("complete",), ("fail", "--reason", "x"), ("touch",)):
        refused(q, *command, task_id, "--lease", "bogus", code="conflict")
    after = show(q, task_id)
    assert {k: after[k] for k in before} == before



def test_lease_not_needed_to_complete_by_hand(q):
    """Without --lease, a person may complete a running task."""
    task_id = add(q)
    started(q, task_id)
    assert q.ctl_ok("complete", task_id) == f"task {task_id} completed\n"
    expect(q, task_id, status="completed", lease=None, lease_expires_at=None)


@RESTARTS
def test_lease_survives_restart(q, how):
    """After a restart the lease and its expiry are unchanged, and the lease still completes it."""
    task_id = add(q)
    record = run(q, task_id)
    restart(q, how)
    expect(q, task_id, status="running", lease=record["lease"],
           lease_expires_at=record["lease_expires_at"])
    refused(q, "complete", task_id, "--lease", "bogus", code="conflict")
    q.ctl_ok("complete", task_id, "--lease", record["lease"])


# -- cancel ----------------------------------------------------------------------------


def test_cancel_pending_and_waiting(q):
    """`cancel` turns a pending or a waiting task into cancelled."""
    pending, waiting = add(q), add(q, delay=3600)
    assert q.ctl_ok("cancel", pending) == f"task {pending} cancelled\n"
    assert q.ctl_ok("cancel", waiting) == f"task {waiting} cancelled\n"
    expect(q, waiting, status="cancelled", waiting_for=None)
    assert nothing_to_claim(q)


def test_cancel_running_refuses_later_complete(q):
    """A running task cancelled: its worker's later complete or fail is refused, lease or not."""
    task_id = add(q)
    lease = run(q, task_id)["lease"]
    q.ctl_ok("cancel", task_id)
    refused(q, "complete", task_id, "--lease", lease, code="conflict")
    refused(q, "fail", task_id, "--lease", lease, "--reason", "late", code="conflict")
    expect(q, task_id, status="cancelled")


def test_cancel_completed_refused(q):
    """A completed task cannot be cancelled."""
    task_id = add(q)
    finish(q, task_id)
    refused(q, "cancel", task_id, code="conflict")
    expect(q, task_id, status="completed")


@RESTARTS
def test_cancel_survives_restart(q, how):
    """A cancelled task is still cancelled after a restart and is never claimed."""
    task_id = add(q)
    q.ctl_ok("cancel", task_id)
    restart(q, how)
    expect(q, task_id, status="cancelled")
    assert nothing_to_claim(q)


# -- pause -----------------------------------------------------------------------------


def test_pause_claim_skips_paused_stream_but_enqueue_works(q):
    """Claims skip a paused stream (exit 4) while enqueue still works; resume makes it claimable."""
    assert "paused" in q.ctl_ok("stream", "pause", "default")
    task_id = enqueue(q)
    assert nothing_to_claim(q)
    assert [s["paused"] for s in q.ctl_json("stream", "list")] == [True]
    q.ctl_ok("stream", "resume", "default")
    assert run(q, task_id)["id"] == task_id


def test_pause_other_streams_still_claimable(q):
    """A claim naming a paused and an active stream takes from the active one."""
    streams(q, "s2")
    add(q, priority=9)
    other = add(q, stream="s2")
    q.ctl_ok("stream", "pause", "default")
    assert claims(q, 1, "--stream", "default", "--stream", "s2") == [other]


def test_pause_resume_wakes_blocked_claim(q):
    """A `claim --wait` blocked on a paused stream gets its task as soon as the stream resumes."""
    q.ctl_ok("stream", "pause", "default")
    task_id = add(q)
    waiter = background(q, "claim", "--wait", "20", "--json")
    q.ctl_ok("stream", "resume", "default")
    resumed = time.monotonic()
    out, err = waiter.communicate(timeout=10)
    assert (waiter.returncode, f'"id": {task_id}' in out) == (0, True), (out, err)
    assert time.monotonic() - resumed < 1.0


@RESTARTS
def test_pause_survives_restart(q, how):
    """A paused stream is still paused after a restart."""
    q.ctl_ok("stream", "pause", "default")
    task_id = enqueue(q)
    restart(q, how)
    assert nothing_to_claim(q)
    q.ctl_ok("stream", "resume", "default")
    assert run(q, task_id)["id"] == task_id


# -- claim filters ---------------------------------------------------------------------


def test_claim_tool_filter_takes_only_those_tools(q):
    """`claim --tool T` (repeatable) takes only tasks of those tools."""
    agent = add(q, priority=9)
    other, quick = add(q, tool="other"), add(q, tool="t")
    assert run(q, other, "--tool", "other")["tool"] == "other"
    assert nothing_to_claim(q, "--tool", "other")
    assert run(q, quick, "--tool", "t", "--tool", "other")["tool"] == "t"
    expect(q, agent, status="pending")


def test_claim_several_streams_oldest_first_among_equals(q):
    """Across the streams named, equal priorities go oldest first; unnamed streams are untouched."""
    streams(q, "s2", "s3")
    x, y, z = (add(q, stream=s) for s in ("s2", "s3", "s2"))
    untouched = add(q, priority=9)
    assert claims(q, 3, "--stream", "s3", "--stream", "s2") == [x, y, z]
    assert nothing_to_claim(q, "--stream", "s3", "--stream", "s2")
    expect(q, untouched, status="pending")


@RESTARTS
def test_claim_filters_after_restart(q, how):
    """After a restart, claims by stream and tool still take highest priority, then oldest."""
    streams(q, "s2")
    old = add(q, tool="other")
    urgent = add(q, tool="other", stream="s2", priority=5)
    newer = add(q, tool="other", stream="s2")
    add(q, priority=9)
    restart(q, how)
    both = ("--stream", "default", "--stream", "s2")
    assert claims(q, 3, *both, "--tool", "other") == [urgent, old, newer]


# -- wait ------------------------------------------------------------------------------


def test_wait_exits_0_when_all_completed_and_json_prints_records(q):
    """`wait A B` exits 0 when both completed; --json prints their records."""
    a, b = add(q), add(q)
    finish(q, a)
    finish(q, b)
    records = q.ctl_json("wait", a, b)
    assert [(r["id"], r["status"]) for r in records] == [(a, "completed"), (b, "completed")]


def test_wait_exits_5_when_any_failed_or_cancelled(q):
    """`wait` exits 5 when a task it waited for failed or was cancelled."""
    done, cancelled = add(q), add(q)
    finish(q, done)
    q.ctl_ok("cancel", cancelled)
    failed = failed_task(q)
    assert q.ctl("wait", done, failed).returncode == 5
    assert q.ctl("wait", done, cancelled).returncode == 5


def test_wait_exits_4_on_timeout(q):
    """`wait --timeout` exits 4 when the tasks have not ended in time."""
    task_id = add(q)
    begun = time.monotonic()
    assert q.ctl("wait", task_id, "--timeout", "0.3").returncode == 4
    assert 0.3 <= time.monotonic() - begun < 3


def test_wait_unknown_id_exits_1(q):
    """`wait` naming a task that does not exist exits 1 with not_found at once, without waiting."""
    task_id = add(q)
    begun = time.monotonic()
    assert "99" in refused(q, "wait", task_id, 99, "--timeout", "20", code="not_found")
    assert time.monotonic() - begun < 5


def test_wait_woken_promptly_by_complete(q):
    """A blocked `wait` returns within a second of the task completing in another process."""
    task_id = add(q)
    started(q, task_id)
    waiter = background(q, "wait", task_id, "--timeout", "20")
    q.ctl_ok("complete", task_id)
    completed = time.monotonic()
    waiter.communicate(timeout=10)
    assert (waiter.returncode, time.monotonic() - completed < 1.0) == (0, True)


def test_wait_returns_when_the_last_task_ends(q):
    """`wait A B` keeps waiting after A completed while B has not ended; B cancelled: exit 5."""
    a, b = add(q), add(q)
    waiter = background(q, "wait", a, b, "--timeout", "20")
    finish(q, a)
    with pytest.raises(subprocess.TimeoutExpired):
        waiter.wait(timeout=0.5)  # still waiting for b
    q.ctl_ok("cancel", b)
    waiter.communicate(timeout=10)
    assert waiter.returncode == 5


@RESTARTS
def test_wait_after_restart(q, how):
    """Outcomes survive a restart: `wait` then exits 0 for completed and 5 for failed tasks."""
    done = add(q)
    finish(q, done)
    failed = failed_task(q)
    restart(q, how)
    assert q.ctl("wait", done).returncode == 0
    assert q.ctl("wait", done, failed).returncode == 5


# -- bulk requeue ----------------------------------------------------------------------


def test_requeue_bulk_by_stream_and_status(q):
    """`requeue --stream S --status failed` requeues every failed task of S and says how many."""
    streams(q, "s2")
    failed = [failed_task(q), failed_task(q)]
    elsewhere = failed_task(q, "s2")
    assert q.ctl_ok("requeue", "--stream", "default", "--status", "failed") == "requeued 2 tasks\n"
    for task_id in failed:
        expect(q, task_id, status="pending", attempts=0, reason=None)
    expect(q, elsewhere, status="failed")


@RESTARTS
def test_requeue_bulk_survives_restart(q, how):
    """Failed tasks are found by a bulk requeue after a restart, and stay requeued after another."""
    failed = [failed_task(q), failed_task(q)]
    restart(q, how)
    assert q.ctl_json("requeue", "--stream", "default", "--status", "failed")["requeued"] == 2
    restart(q, how)
    assert claims(q, 2) == failed
