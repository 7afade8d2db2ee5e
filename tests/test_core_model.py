"""A model-based test of the pure queue core (``sparkqd.Queue``), driven by Hypothesis.

The state machine below owns one ``Queue`` and a fake clock. Each rule is one thing
a person, an agent or the daemon's timer does: enqueue a task (into one of three
streams, for one of three tools, with a priority, maybe a delay, ``after``
dependencies, a unique key, a lock written as any spelling of a repository URL),
claim with stream and tool filters, complete / fail / touch with the current lease,
an older one, a forged one or none, cancel, requeue one task or in bulk, pause and
resume a stream, purge, look at the read-only views, and let time pass (then,
usually, run the timer: ``tick``).

The model is deliberately small. The queue's own ``tasks`` are the state under
test, and what the rules say is computed from them by brute force (which task a
claim must take, which tasks a purge must remove, what an enqueue must become).
Beside them the machine keeps only what the queue cannot be trusted to tell about
itself:

* ``lock_group``: the lock each task asked for, as a person means it, so "no two
  running tasks share a lock" does not rest on the queue's own URL normalisation;
* ``leases``: every lease a claim handed out (current, older, or none to offer);
* ``requeued_by_hand``: tasks a person requeued, which may run though a
  dependency failed;
* ``purged_as``: the last status of purged tasks, for their dependents;
* ``blocked_claims``: claims that found nothing and now wait to be woken;
* ``journal``: every event emitted, msgpack-encoded as list[AnyEvent] as the
  daemon's journal holds them, and ``snapshot``: the snapshot form at the last
  checkpoint.

Rules check their own outcome; a refused request (a SparkQError) must change
nothing, and any other exception is a bug. Every step's status changes must be
allowed ones, and must wake what waits on them. Invariants run after every step;
every ``CHECKPOINT_EVERY`` steps and at the end, replaying the journal into a fresh
queue, restarting from the last snapshot plus the journal after it, and loading the
current snapshot form must all give the same records, and they and a copy of the
live queue must claim in the brute-force order and purge every finished task.
"""

import copy
import datetime

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize, invariant,
                                 multiple, rule)

import sparkqd
from conftest import core_call
from sparkqd import (BadRequest, Cancel, Claim, Complete, Conflict, Enqueue, Fail, Locks, NotFound,
                     Peek, Purge, Requeue, SessionCreate, StreamCreate, StreamPause, StreamResume,
                     Touch)

T0 = 1_800_000_000.0

CONFIG = sparkqd.parse_config("""
stale:
  factor: 0.5            # a lease lasts half the timeout: 5 s for build, 20 s for the others
purge:
  older_than_days: 0.000231481   # about 20 s, so the timer purges within a run
task_classes:
  QUICK: {timeout: 10, max_attempts: 3, retry_backoff: 1, retry_backoff_max: 3}
  SLOW: {timeout: 40}
tools:
  build: {task_class: QUICK}
  review: {task_class: SLOW, max_attempts: 2, retry_backoff: 0}
  lint: {task_class: SLOW}
""")
PURGE_AGE = CONFIG.purge.older_than_days * sparkqd.DAY

STREAMS = ("default", "alpha", "beta")
TOOLS = ("build", "review", "lint")
KEYS = ("nightly", "docs")
#: Lock spellings -> the lock they mean. The first four are one repository.
LOCKS = {
    "https://github.com/u/r.git": "repo u/r",
    "git@github.com:u/r": "repo u/r",
    "https://github.com/u/r/": "repo u/r",
    "ssh://git@GitHub.com/u/r.git": "repo u/r",
    "https://github.com/u/other": "repo u/other",
    "deploy": "deploy",
}
TERMINAL = sparkqd.TERMINAL
#: Status changes any single step may make (purging removes a task instead).
ALLOWED_TRANSITIONS = {
    ("pending", "running"), ("pending", "cancelled"),
    ("waiting", "pending"), ("waiting", "waiting"), ("waiting", "cancelled"),
    ("waiting", "failed"),
    ("running", "completed"), ("running", "failed"), ("running", "waiting"),
    ("running", "cancelled"), ("running", "pending"),
    ("failed", "pending"), ("cancelled", "pending"),
    ("failed", "waiting"), ("cancelled", "waiting"),  # requeued, dependencies not all completed
}
CHECKPOINT_EVERY = 8
EVENTS = msgspec.msgpack.Decoder(list[sparkqd.AnyEvent])

stream_filters = st.one_of(st.sampled_from(STREAMS),
                           st.lists(st.sampled_from(STREAMS), min_size=1, max_size=3, unique=True))
tool_filters = st.one_of(st.none(), st.sampled_from(TOOLS),
                         st.lists(st.sampled_from(TOOLS + ("unknown-tool",)), max_size=3,
                                  unique=True))
priorities = st.integers(-1, 2)
delays = st.sampled_from([None, None, 0.0, 0.5, 3.0, 12.0])
unique_keys = st.one_of(st.none(), st.sampled_from(KEYS))
lock_spellings = st.one_of(st.none(), st.sampled_from(sorted(LOCKS)))
attempt_limits = st.sampled_from([None, None, 1, 2])
lease_choices = st.sampled_from(["current", "current", "current", "none", "previous", "forged"])
clock_steps = st.sampled_from([0.0, 0.5, 1.0, 2.5, 2.5, 5.0, 5.0, 15.0, 40.0])


# -- brute force: what the rules say, computed from queue.tasks --------------------


def as_list(names):
    return None if names is None else [names] if isinstance(names, str) else list(names)


def held_lock_groups(tasks, lock_group):
    """The locks (as the model names them) held by running tasks."""
    return {lock_group[t.id] for t in tasks.values()
            if t.status == "running" and lock_group.get(t.id) is not None}


def claim_order_key(task):
    """Higher priority first, then older (lower id) first."""
    return (-task.priority, task.id)


def best_claimable(tasks, paused, lock_group, streams, tools, held=None):
    """The id a claim must take: pending, in an unpaused stream of the filter, of a tool
    of the filter, whose lock (if any) no running task holds; best by claim order."""
    held = held_lock_groups(tasks, lock_group) if held is None else held
    candidates = [t for t in tasks.values()
                  if t.status == "pending" and t.stream in streams and t.stream not in paused
                  and (tools is None or t.tool in tools)
                  and (lock_group.get(t.id) is None or lock_group[t.id] not in held)]
    return min(candidates, key=claim_order_key).id if candidates else None


def claim_order_by_brute_force(tasks, paused, lock_group):
    """Every id that claims on all streams would take, in order, if nothing finished."""
    tasks, held, order = dict(tasks), held_lock_groups(tasks, lock_group), []
    while (task_id := best_claimable(tasks, paused, lock_group, STREAMS, None, held)) is not None:
        order.append(task_id)
        tasks[task_id] = msgspec.structs.replace(tasks[task_id], status="running")
        if lock_group.get(task_id) is not None:
            held.add(lock_group[task_id])
    return order


def claim_order_of(queue, now):
    """Claim from ``queue`` on all streams until nothing is claimable (mutates it)."""
    order = []
    while (record := core_call(queue, Claim(stream=list(STREAMS)), now)) is not None:
        order.append(record["id"])
    return order


def retry_backoff(task):
    """The back-off before the attempt after ``task.attempts``, without jitter."""
    tool = CONFIG.tools[task.tool]
    klass = CONFIG.task_classes[tool.task_class]
    base = tool.retry_backoff if tool.retry_backoff is not None else klass.retry_backoff
    cap = tool.retry_backoff_max if tool.retry_backoff_max is not None else klass.retry_backoff_max
    return min(cap, base * 2 ** (task.attempts - 1))


def lease_span(task):
    return CONFIG.stale.factor * task.timeout


# -- the journal and the snapshot form ------------------------------------------------


def replay(events):
    """A fresh queue with every event applied, as the daemon does at startup."""
    queue = sparkqd.Queue(CONFIG)
    for event in events:
        queue.apply(event)
    return queue


def snapshot_of(queue):
    """What the snapshot file holds: sessions, streams, tasks by id, next id."""
    return (list(queue.sessions.values()),
            sorted(queue.streams.values(), key=lambda s: s.created_at),
            sorted(queue.tasks.values(), key=lambda t: t.id), queue.next_id)


def load_snapshot(snapshot):
    queue = sparkqd.Queue(CONFIG)
    if snapshot is not None:
        sessions, streams, tasks, next_id = snapshot
        queue.load(list(sessions), list(streams), list(tasks), next_id)
    return queue


def copy_of(queue):
    """A deep copy of the live queue and its indexes; tasks are immutable, so shared."""
    shared = {id(t): t for t in queue.tasks.values()}
    shared[id(queue.config)] = queue.config
    return copy.deepcopy(queue, shared)


def observable_state(queue):
    """Everything a client or the snapshot could see, for comparing two queues."""
    return {
        "sessions": [sparkqd.Replies(queue).session(s) for s in queue.sessions.values()],
        "streams": sorted((sparkqd.Replies(queue).stream(s) for s in queue.streams.values()),
                          key=lambda r: r["name"]),
        "tasks": {t.id: sparkqd.Replies(queue).task(t, True) for t in queue.tasks.values()},
        "task objects": dict(queue.tasks),
        "next_id": queue.next_id,
        "counts": queue.index.counts,
        "lock_holder": queue.index.lock_holder,
        "keys": queue.index.keys,
    }


class QueueMachine(RuleBasedStateMachine):
    """One queue, a fake clock, and the little the model must remember itself."""

    task_ids = Bundle("task_ids")  #: every task enqueued
    claimed_ids = Bundle("claimed_ids")  #: tasks claimed and not yet finished by a worker
    ended_ids = Bundle("ended_ids")  #: tasks a rule ended (or sent to retry): to requeue

    def __init__(self):
        super().__init__()
        self.now = T0
        self.queue = sparkqd.Queue(CONFIG)
        self.journal: list[bytes] = []  # one msgpack batch of events per step
        self.snapshot = None  # (snapshot form, number of events it covers)
        self.lock_group: dict[int, str | None] = {}
        self.lock_names: dict[str, str] = {}  # lock group -> the queue's lock string
        self.leases: dict[int, list[str]] = {}
        self.requeued_by_hand: set[int] = set()
        self.purged_as: dict[int, str] = {}
        self.paused: set[str] = set()
        #: (streams, tools) of claims that found nothing and block until woken
        self.blocked_claims: set[tuple[frozenset, frozenset | None]] = set()
        self.steps = 0
        self.settled = True  # the last step passed the invariants
        self.queue.bootstrap(self.now)
        self.send(SessionCreate(name="agents"))
        self.send(StreamCreate(name="alpha", session="default"))
        self.send(StreamCreate(name="beta", session="agents"))
        self.queue.take_wakeups()

    # -- driving the queue --------------------------------------------------

    def send(self, request):
        """Hand one request to the queue now; returns (result, refusal).

        A refusal (a SparkQError) must emit nothing and change nothing; any other
        exception is a bug and propagates. Every step's status changes are checked
        against the transitions the rules allow.
        """
        self.settled = False
        before = dict(self.queue.tasks)
        streams_before = dict(self.queue.streams)
        try:
            result = core_call(self.queue, request, self.now)
        except sparkqd.SparkQError as refusal:
            assert self.queue.take_events() == [], f"{request} refused but emitted events"
            assert self.queue.take_wakeups() == (set(), []), f"{request} refused but woke"
            assert self.queue.tasks == before, f"{request} refused but changed tasks"
            assert self.queue.streams == streams_before
            return None, refusal
        self.record_step(before)
        return result, None

    def tick(self):
        self.settled = False
        before = dict(self.queue.tasks)
        deadline = self.queue.tick(self.now)
        self.record_step(before)
        return deadline

    def record_step(self, before):
        """Journal the step's events and check what changed."""
        events = self.queue.take_events()
        if events:
            self.journal.append(msgspec.msgpack.encode(events))
        for task_id in before.keys() - self.queue.tasks.keys():
            old = before[task_id]
            assert old.status in TERMINAL, f"task {task_id} purged while {old.status}"
            self.purged_as[task_id] = old.status
        for task_id, old in before.items():
            new = self.queue.tasks.get(task_id)
            if new is not None and (new.status != old.status or new.waiting_for != old.waiting_for):
                assert (old.status, new.status) in ALLOWED_TRANSITIONS, \
                    f"task {task_id}: {old.status} -> {new.status}"
                self.check_dependency_outcome(old, new)
        self.check_wakeups(before)

    def check_wakeups(self, before):
        """A blocked ``wait`` hears of every task that ended; a blocked claim is woken
        when work it could take appears (and, woken for nothing, walks again).

        ``take_wakeups`` names (stream, tool) pairs that gained claimable tasks, tool
        None for the whole stream: the daemon wakes claims by stream, workers by tool.
        """
        woken, ended = self.queue.take_wakeups()
        newly_ended = {t.id for t in self.queue.tasks.values() if t.status in TERMINAL
                       and (t.id not in before or before[t.id].status not in TERMINAL)}
        assert newly_ended <= set(ended), f"tasks {newly_ended - set(ended)} ended unheard"
        for streams, tools in list(self.blocked_claims):
            claimable = best_claimable(self.queue.tasks, self.paused_now(), self.lock_group,
                                       streams, tools)
            if not any(stream in streams and (tool is None or tools is None or tool in tools)
                       for stream, tool in woken):
                assert claimable is None, \
                    f"a claim blocked on {sorted(streams)} {tools} missed task {claimable}"
            elif claimable is not None:
                self.blocked_claims.discard((streams, tools))  # it claims: no longer blocked
            else:
                core_call(self.queue, Peek(stream=sorted(streams),
                                       tool=None if tools is None else sorted(tools)),
                                  self.now)  # as the woken claim does, finding nothing

    def paused_now(self):
        return {name for name, stream in self.queue.streams.items() if stream.paused}

    def check_dependency_outcome(self, old, new):
        """A task leaves waiting-for-dependencies only when they settle, the right way."""
        if old.waiting_for != "after" or new.status == "cancelled":
            return
        if new.status == "failed":
            assert any(self.status_of(d) in ("failed", "cancelled") for d in new.after), \
                f"task {new.id} failed as a dependent, but no dependency of {new.after} failed"
        else:
            assert all(self.status_of(d) == "completed" for d in new.after), \
                f"task {new.id} released before all of {new.after} completed"

    def status_of(self, task_id):
        task = self.queue.tasks.get(task_id)
        return task.status if task else self.purged_as[task_id]

    def events(self):
        return [event for batch in self.journal for event in EVENTS.decode(batch)]

    def task(self, task_id):
        return self.queue.tasks.get(task_id)

    def lease_for(self, task_id, choice):
        """The lease a worker would send: the current one, an older one, a forged one, none."""
        granted = self.leases.get(task_id, [])
        if choice == "current":
            return granted[-1] if granted else None
        if choice == "previous":
            return granted[-2] if len(granted) >= 2 else f"{task_id}.0"
        if choice == "forged":
            return f"{task_id}.999"
        return None

    def expect_running_refusal(self, task_id, lease):
        """The refusal complete/fail/touch must give, or None if it must succeed."""
        task = self.task(task_id)
        if task is None:
            return NotFound
        if task.status != "running":
            return Conflict
        if lease is not None and lease != self.leases[task_id][-1]:
            return Conflict
        return None

    # -- rules: enqueue ---------------------------------------------------------

    def enqueue_task(self, stream, tool, priority, delay, key, lock, max_attempts, after,
                     at=None):
        """Enqueue; ``at`` is an offset from now, sent as an RFC 3339 time."""
        existing = next((t for t in self.queue.tasks.values()
                         if key is not None and t.stream == stream and t.key == key), None)
        unknown = [d for d in after or () if d not in self.queue.tasks]
        deps = [self.queue.tasks[d] for d in after or () if d in self.queue.tasks]
        new_id = self.queue.next_id
        when = None if at is None else datetime.datetime.fromtimestamp(
            self.now + at, datetime.timezone.utc).isoformat()
        result, refusal = self.send(Enqueue(
            stream=stream, tool=tool, payload=f"job {new_id}", priority=priority, delay=delay,
            at=when, key=key, lock=lock, max_attempts=max_attempts, after=after))
        if delay is not None and at is not None:  # refused even when the key exists
            assert isinstance(refusal, BadRequest), refusal
            return multiple()
        if unknown:
            assert isinstance(refusal, NotFound), (unknown, refusal)
            return multiple()
        if existing is not None:
            assert refusal is None and result["existing"] and result["id"] == existing.id
            return multiple()
        assert refusal is None, refusal
        assert result["id"] == new_id and result["existing"] is False
        if any(d.status in ("failed", "cancelled") for d in deps):
            expected = ("failed", None)
        elif any(d.status != "completed" for d in deps):
            expected = ("waiting", "after")
        elif delay or (at or 0) > 0:
            expected = ("waiting", "delay")
        else:
            expected = ("pending", None)
        task = self.queue.tasks[new_id]
        assert (task.status, task.waiting_for) == expected, (task, expected)
        if at is not None:
            assert task.ready_at == self.now + at
        tool_config = CONFIG.tools[tool]
        klass = CONFIG.task_classes[tool_config.task_class]
        assert task.max_attempts == (max_attempts or tool_config.max_attempts
                                     or klass.max_attempts)
        self.remember_lock(task, lock)
        return new_id

    def remember_lock(self, task, spelling):
        """Every spelling of one repository must become the same lock, others differ."""
        group = LOCKS[spelling] if spelling else None
        self.lock_group[task.id] = group
        if group is None:
            assert task.lock is None
        elif group in self.lock_names:
            assert task.lock == self.lock_names[group], (spelling, task.lock, self.lock_names)
        else:
            assert task.lock not in self.lock_names.values(), (spelling, task.lock)
            self.lock_names[group] = task.lock

    @initialize(target=task_ids, jobs=st.lists(st.fixed_dictionaries({
        "stream": st.sampled_from(STREAMS), "tool": st.sampled_from(TOOLS),
        "priority": priorities, "lock": lock_spellings, "delay": delays,
        "after_previous": st.booleans()}), min_size=1, max_size=8))
    def fill_the_queue(self, jobs):
        """Start every run with some work, some of it chained after the job before."""
        ids = []
        for job in jobs:
            after = ids[-1:] if job["after_previous"] else None
            ids.append(self.enqueue_task(
                stream=job["stream"], tool=job["tool"], priority=job["priority"],
                delay=job["delay"], key=None, lock=job["lock"], max_attempts=None, after=after))
        return multiple(*ids)

    @rule(target=task_ids, stream=st.sampled_from(STREAMS), tool=st.sampled_from(TOOLS),
          priority=priorities, delay=delays, key=unique_keys, lock=lock_spellings,
          max_attempts=attempt_limits, after=st.lists(task_ids, max_size=3),
          unknown_dependency=st.sampled_from([None, None, None, 10_000]),
          at=st.sampled_from([None, None, None, -5.0, 4.0]))
    def enqueue(self, after, unknown_dependency, **fields):
        """Enqueue, maybe after other tasks, now and then one that never existed."""
        if unknown_dependency is not None:
            after = [*after, unknown_dependency]
        return self.enqueue_task(after=after or None, **fields)

    # -- rules: claim and finish --------------------------------------------------

    @rule(target=claimed_ids)
    def agent_claims_anything(self):
        """An agent that takes any tool from any stream."""
        return self.claim(list(STREAMS), None, "agent-0")

    @rule(target=ended_ids)
    def agent_does_the_next_task(self):
        """An agent that claims the best task anywhere and completes it at once."""
        task_id = self.claim(list(STREAMS), None, "agent-9")
        if isinstance(task_id, int):
            return self.worker_finishes(task_id, "current", "complete")
        return multiple()

    @rule(target=claimed_ids, streams=stream_filters, tools=tool_filters,
          worker=st.sampled_from([None, "agent-1", "agent-2"]))
    def agent_claims(self, streams, tools, worker):
        """An agent that claims from some streams, maybe only some tools."""
        return self.claim(streams, tools, worker)

    def claim(self, streams, tools, worker):
        """Claim takes exactly the best claimable task; peek first names the same one."""
        def expected():
            return best_claimable(self.queue.tasks, self.paused, self.lock_group,
                                  as_list(streams), as_list(tools))
        want = expected()
        peeked, refusal = self.send(Peek(stream=streams, tool=tools))
        assert refusal is None and (peeked or {}).get("id") == want, (peeked, want)
        assert expected() == want  # peeking changed nothing that matters
        claimed, refusal = self.send(Claim(stream=streams, tool=tools, worker=worker))
        assert refusal is None and (claimed or {}).get("id") == want, (claimed, want)
        if claimed is None:  # a claim with wait > 0 now blocks until woken
            tools = as_list(tools)
            self.blocked_claims.add((frozenset(as_list(streams)),
                                     None if tools is None else frozenset(tools)))
            return multiple()
        task = self.queue.tasks[want]
        assert task.status == "running" and task.worker == worker
        assert task.lease == claimed["lease"] and task.lease not in self.leases.get(want, [])
        assert task.lease_expires_at == self.now + lease_span(task)
        self.leases.setdefault(want, []).append(task.lease)
        return want

    @rule(target=ended_ids, task_id=consumes(claimed_ids), lease=lease_choices)
    def worker_completes(self, task_id, lease):
        """A worker (or a person, without a lease) completes a claimed task."""
        return self.worker_finishes(task_id, lease, "complete")

    @rule(target=ended_ids, task_id=consumes(claimed_ids), lease=lease_choices,
          final=st.booleans())
    def worker_fails(self, task_id, lease, final):
        """A worker fails a claimed task: retried while attempts remain, unless final."""
        return self.worker_finishes(task_id, lease, "fail --final" if final else "fail")

    def worker_finishes(self, task_id, lease, outcome):
        lease = self.lease_for(task_id, lease)
        refusal_expected = self.expect_running_refusal(task_id, lease)
        before = self.task(task_id)
        if outcome == "complete":
            request = Complete(task=task_id, lease=lease, summary="done", result={"ok": task_id})
        else:
            request = Fail(task=task_id, reason="boom", final=outcome == "fail --final",
                           lease=lease)
        result, refusal = self.send(request)
        if refusal_expected:
            assert isinstance(refusal, refusal_expected), (refusal_expected, refusal)
            return multiple()
        assert refusal is None, refusal
        task = self.queue.tasks[task_id]
        assert result["status"] == task.status
        if outcome == "complete":
            assert (task.status, task.finished_at, task.result) == ("completed", self.now,
                                                                    {"ok": task_id})
        else:
            self.check_failed_attempt(before, task, final=outcome == "fail --final")
        return task_id

    def check_failed_attempt(self, before, task, final, by_timer=False):
        """A failed attempt (by a worker or a stale lease) is retried after its back-off
        while attempts remain, unless final; otherwise the task fails."""
        if final or before.attempts >= before.max_attempts:
            assert (task.status, task.finished_at) == ("failed", self.now), task
            return
        backoff = retry_backoff(before)  # jitter may lengthen it by under 25 %
        assert self.now + backoff <= task.ready_at <= self.now + backoff * 1.25, task
        if by_timer and task.ready_at <= self.now:  # no back-off: the same tick released it
            assert (task.status, task.waiting_for) == ("pending", None), task
        else:
            assert (task.status, task.waiting_for) == ("waiting", "retry"), task

    @rule(task_id=claimed_ids, lease=lease_choices)
    def worker_touches(self, task_id, lease):
        """The heartbeat: extends the lease of a running task, refused with a stale lease."""
        lease = self.lease_for(task_id, lease)
        refusal_expected = self.expect_running_refusal(task_id, lease)
        before = self.task(task_id)
        _, refusal = self.send(Touch(task=task_id, lease=lease))
        if refusal_expected:
            assert isinstance(refusal, refusal_expected), (refusal_expected, refusal)
            return
        assert refusal is None, refusal
        task = self.queue.tasks[task_id]
        assert task.status == "running" and task.lease == before.lease
        assert task.lease_expires_at == self.now + lease_span(task)

    @rule(target=ended_ids, task_id=task_ids)
    def cancel(self, task_id):
        before = self.task(task_id)
        _, refusal = self.send(Cancel(task=task_id))
        if before is None:
            assert isinstance(refusal, NotFound)
        elif before.status in TERMINAL:
            assert isinstance(refusal, Conflict)
        else:
            assert refusal is None, refusal
            assert self.queue.tasks[task_id].status == "cancelled"
            return task_id
        return multiple()

    @rule(target=task_ids, task_id=ended_ids)
    def requeue(self, task_id):
        """A person requeues a task that ended (it goes back into task_ids, to be picked
        again: cancelled, requeued and cancelled within one instant, say)."""
        before = self.task(task_id)
        _, refusal = self.send(Requeue(task=task_id))
        if before is None:
            assert isinstance(refusal, NotFound)
        elif before.status in ("pending", "waiting", "completed"):
            assert isinstance(refusal, Conflict)
        else:
            assert refusal is None, refusal
            task = self.queue.tasks[task_id]
            assert (task.status, task.attempts, task.lease) == self.requeued_as(task)
            self.requeued_by_hand.add(task_id)
            return task_id
        return multiple()

    def requeued_as(self, task):
        """(status, attempts, lease) of a requeued task: it waits for unfinished dependencies."""
        unfinished = any(d in self.queue.tasks and self.status_of(d) != "completed"
                         for d in task.after)
        return ("waiting" if unfinished else "pending"), 0, None

    @rule(stream=st.one_of(st.none(), st.sampled_from(STREAMS)),
          status=st.sampled_from(["running", "failed", "cancelled"]))
    def requeue_matching(self, stream, status):
        matching = {t.id for t in self.queue.tasks.values()
                    if t.status == status and stream in (None, t.stream)}
        result, refusal = self.send(Requeue(stream=stream, status=status))
        assert refusal is None, refusal
        assert result["requeued"] == len(result["tasks"]) and set(result["tasks"]) >= matching
        assert all((self.queue.tasks[i].status, 0, None) == self.requeued_as(self.queue.tasks[i])
                   for i in result["tasks"])
        self.requeued_by_hand |= set(result["tasks"])

    @rule()
    def look_at_the_queue(self):
        """Read-only views agree with the tasks: held locks, what a claim would take, and
        the history of ended tasks (each once, newest first).

        (Hypothesis favours rules with fewest arguments; this harmless one is first.)
        """
        held, _ = self.send(Locks())
        running = {t.id for t in self.queue.tasks.values()
                   if t.status == "running" and t.lock is not None}
        assert {entry["task"] for entry in held} == running, (held, running)
        assert len(held) == len({self.lock_group[entry["task"]] for entry in held})
        peeked, _ = self.send(Peek(stream=list(STREAMS)))
        assert (peeked or {}).get("id") == best_claimable(
            self.queue.tasks, self.paused, self.lock_group, STREAMS, None)
        ended, _ = self.send(sparkqd.History())
        finished = [t.id for t in self.queue.tasks.values() if t.status in TERMINAL]
        assert sorted(r["id"] for r in ended) == sorted(finished), \
            f"history lists {[r['id'] for r in ended]}, but the ended tasks are {finished}"
        times = [self.queue.tasks[r["id"]].finished_at for r in ended]
        assert times == sorted(times, reverse=True), "history is not newest first"

    # -- rules: streams, purge, time --------------------------------------------

    @rule(stream=st.sampled_from(STREAMS), pause=st.booleans())
    def pause_or_resume(self, stream, pause):
        _, refusal = self.send(StreamPause(name=stream) if pause else StreamResume(name=stream))
        if pause == (stream in self.paused):
            assert isinstance(refusal, Conflict), refusal
        else:
            assert refusal is None, refusal
            (self.paused.add if pause else self.paused.discard)(stream)

    @rule(days=st.sampled_from([None, None, None, 0.0, 5 / sparkqd.DAY]))
    def purge(self, days):
        cutoff = self.now - (PURGE_AGE if days is None else days * sparkqd.DAY)
        old = {t.id for t in self.queue.tasks.values()
               if t.status in TERMINAL and t.finished_at <= cutoff}
        result, refusal = self.send(Purge(older_than_days=days))
        assert refusal is None, refusal
        assert result["purged"] == len(old), (result, old)
        assert not old & self.queue.tasks.keys()

    @rule(seconds=clock_steps, then_tick=st.booleans())
    def time_passes(self, seconds, then_tick):
        """The clock moves on; usually the daemon's timer then fires."""
        self.now += seconds
        if not then_tick:
            return
        before = dict(self.queue.tasks)
        deadline = self.tick()
        for task_id, old in before.items():
            new = self.queue.tasks.get(task_id)
            if old.status == "running" and old.lease_expires_at <= self.now:
                self.check_failed_attempt(old, new, final=False, by_timer=True)
        for t in self.queue.tasks.values():
            assert not (t.status == "running" and t.lease_expires_at <= self.now), \
                f"task {t.id}: lease expired at {t.lease_expires_at}, still running"
            assert not (t.status == "waiting" and t.waiting_for in ("delay", "retry")
                        and t.ready_at <= self.now), \
                f"task {t.id}: {t.waiting_for} over at {t.ready_at}, still waiting"
            assert not (t.status in TERMINAL and t.finished_at <= self.now - PURGE_AGE), \
                f"task {t.id}: finished at {t.finished_at}, not purged"
        assert deadline is None or deadline > self.now, "the timer would fire again at once"

    # -- invariants ---------------------------------------------------------------

    @invariant()
    def the_queue_is_consistent(self):
        """Every cheap invariant after every step; the journal and snapshot now and then."""
        self.check_each_task_is_in_exactly_one_state()
        self.check_no_two_running_tasks_share_a_lock()
        self.check_leases_belong_to_running_tasks()
        self.check_waiting_says_what_for()
        self.check_pending_and_running_tasks_had_their_dependencies_complete()
        self.check_the_timer_is_never_late()
        assert self.paused_now() == self.paused
        self.steps += 1
        if self.steps % CHECKPOINT_EVERY == 0:
            self.check_journal_and_snapshot()
        self.settled = True

    def check_each_task_is_in_exactly_one_state(self):
        """One known status, counted once, the last in its history, in its status's index."""
        q, index = self.queue, self.queue.index
        recount = {name: dict.fromkeys(sparkqd.STATUSES, 0) for name in q.streams}
        for t in q.tasks.values():
            assert t.status in sparkqd.STATUSES
            recount[t.stream][t.status] += 1
            assert sparkqd.full_history(t)[-1][1] == t.status, f"task {t.id}: history disagrees"
            if t.status == "pending":
                key = sparkqd.ready_key(t)
                parked = index.parked.get(t.lock, {}).get((t.stream, t.tool), [])
                assert key in index.ready[t.stream].get(t.tool, []) or key in parked, \
                    f"pending task {t.id} is in no ready heap"
            elif t.status == "running":
                assert (t.lease_expires_at, t.id, t.lease) in index.stale_heap
            elif t.status == "waiting" and t.waiting_for in ("delay", "retry"):
                assert (t.ready_at, t.id) in index.delay_heap
            elif t.status in TERMINAL:
                assert (t.finished_at, t.id) in index.purge_heap
        assert index.counts == recount, (index.counts, recount)

    def check_no_two_running_tasks_share_a_lock(self):
        running = [t for t in self.queue.tasks.values() if t.status == "running"]
        groups = [self.lock_group[t.id] for t in running if self.lock_group.get(t.id)]
        assert len(groups) == len(set(groups)), f"two running tasks hold one lock: {groups}"
        assert self.queue.index.lock_holder == {t.lock: t.id for t in running if t.lock is not None}

    def check_leases_belong_to_running_tasks(self):
        for t in self.queue.tasks.values():
            if t.status == "running":
                assert t.lease == self.leases[t.id][-1] and t.lease_expires_at is not None
            else:
                assert t.lease is None and t.lease_expires_at is None, t

    def check_waiting_says_what_for(self):
        """Waiting says what for, and waits only while that is so; pending is not early."""
        for t in self.queue.tasks.values():
            if t.status == "pending":
                assert t.ready_at is None or t.ready_at <= self.now, \
                    f"task {t.id} is pending before its time {t.ready_at}"
            if t.status != "waiting":
                assert t.waiting_for is None, t
                continue
            assert t.waiting_for in ("delay", "retry", "after"), t
            if t.waiting_for in ("delay", "retry"):
                assert t.ready_at is not None
            else:
                deps = [self.status_of(d) for d in t.after]
                # A task requeued by hand waits even for a dependency that failed: until
                # that one is requeued too and completes.
                if t.history[-1][3] != "requeued, waits for after":
                    assert not {"failed", "cancelled"} & set(deps), \
                        f"task {t.id} still waits though a dependency ended badly: {deps}"
                    assert any(s not in TERMINAL for s in deps), \
                        f"task {t.id} still waits though every dependency ended: {deps}"
                for d in t.after:
                    if self.status_of(d) not in TERMINAL:
                        assert t.id in self.queue.index.dependents.get(d, ()), \
                            f"task {t.id} would never hear that {d} ended"

    def check_pending_and_running_tasks_had_their_dependencies_complete(self):
        for t in self.queue.tasks.values():
            if t.status in ("pending", "running") and t.id not in self.requeued_by_hand:
                deps = {d: self.status_of(d) for d in t.after}
                assert all(s == "completed" for s in deps.values()), \
                    f"task {t.id} is {t.status} though its dependencies are {deps}"

    def check_the_timer_is_never_late(self):
        deadlines = [t.lease_expires_at for t in self.queue.tasks.values() if t.status == "running"]
        deadlines += [t.ready_at for t in self.queue.tasks.values()
                      if t.status == "waiting" and t.waiting_for in ("delay", "retry")]
        deadlines += [t.finished_at + PURGE_AGE for t in self.queue.tasks.values()
                      if t.status in TERMINAL]
        if deadlines:
            assert self.queue.next_deadline() <= min(deadlines)

    def teardown(self):
        if self.settled:  # not after a failed step: its error is the one to report
            self.check_journal_and_snapshot()

    def check_journal_and_snapshot(self):
        """Replay, restart and load all rebuild the live state; each of them, and a copy
        of the live queue, then claims in the order the rules give and purges every
        finished task when asked to."""
        events = self.events()
        snapshot, covered = self.snapshot or (None, 0)
        restarted = load_snapshot(snapshot)
        for event in events[covered:]:
            restarted.apply(event)
        rebuilt = {
            "replayed journal": replay(events),
            "snapshot + journal tail": restarted,
            "loaded snapshot": load_snapshot(snapshot_of(self.queue)),
        }
        live = observable_state(self.queue)
        for how, queue in rebuilt.items():
            state = observable_state(queue)
            for part in live:
                assert state[part] == live[part], f"{how}: {part} differs"
        order = claim_order_by_brute_force(self.queue.tasks, self.paused, self.lock_group)
        finished = {t.id for t in self.queue.tasks.values() if t.status in TERMINAL}
        for how, queue in {"live queue (a copy)": copy_of(self.queue), **rebuilt}.items():
            assert claim_order_of(queue, self.now) == order, f"{how}: claim order differs"
            ended = [r["id"] for r in core_call(queue, sparkqd.History(), self.now)]
            assert sorted(ended) == sorted(finished), f"{how}: history differs"
            purged = core_call(queue, Purge(older_than_days=0), self.now)["purged"]
            assert purged == len(finished) and not finished & queue.tasks.keys(), \
                f"{how}: purging every finished task left some"
        self.snapshot = (snapshot_of(self.queue), len(events))


QueueMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
# A pass takes well under the suite's 60 s; shrinking a failure to its shortest
# sequence can take a few minutes, and the sequence is the useful part of the report.
test_queue_core_model = pytest.mark.timeout(600)(QueueMachine.TestCase)
