"""The daemon's injected clock: leases, delays and waits follow it, not the wall clock.

Each test runs a real ``sparkqd.Daemon`` in this process, on uvloop in a thread of its
own, listening on a real Unix socket in a temporary directory, with a clock the test
moves by hand; requests go over the socket through ``sparkqctl.Client``. The fake clock
starts years before the wall clock, so a part that read the wall clock instead would
find every deadline long past (or never reached).
"""

import argparse
import threading
import time

import pytest
import uvloop

import sparkqd
from sparkqctl import Client, Unreachable
from tests.conftest import wait_until

CONFIG = """
task_classes:
  quick: {timeout: 10}
tools:
  job: {task_class: quick}
stale: {factor: 3}
workers: {count: 0}
http: {listen: null}
"""

#: How long (real seconds) a task must stay as it is after the timer was woken, to count
#: as "not yet": the timer turns in well under a millisecond.
SETTLE = 0.2


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float = 1_600_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class InProcessDaemon:
    """A ``sparkqd.Daemon`` with a fake clock, run on uvloop in a background thread."""

    def __init__(self, workdir):
        self.clock = FakeClock()
        config = sparkqd.parse_config(CONFIG)
        args = argparse.Namespace(socket=str(workdir / "sparkqd.sock"),
                                  data_dir=str(workdir / "data"))
        self.paths = sparkqd.resolve_paths(args, config, None, env={})
        self.daemon = sparkqd.Daemon(self.paths, config, clock=self.clock)
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sparkqd", daemon=True)

    def _run(self) -> None:
        try:
            uvloop.run(self.daemon.run())
        except Exception as exc:  # noqa: BLE001 (the test reports it rather than hanging)
            self.failure = exc

    def start(self) -> "InProcessDaemon":
        self.thread.start()

        def ready():
            if self.failure is not None:
                raise AssertionError(f"the daemon failed: {self.failure!r}")
            try:
                client = Client(self.paths.socket, timeout=2)
            except Unreachable:
                return False
            try:
                return client.request("hello").get("ok")  # "starting" until recovered
            finally:
                client.sock.close()
        wait_until(ready, timeout=5, message="the in-process daemon to answer")
        return self

    def client(self) -> Client:
        return Client(self.paths.socket, timeout=5)

    def advance_to(self, at: float) -> None:
        """Move the fake clock and wake the daemon's timer, as a jump of a real clock would."""
        self.clock.now = at
        self.daemon.clock_moved()

    def stop(self) -> None:
        if self.thread.is_alive():
            client = self.client()
            client.call("shutdown")
            client.sock.close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the daemon did not stop"
        assert self.failure is None, self.failure


@pytest.fixture
def daemon(tmp_path):
    running = InProcessDaemon(tmp_path).start()
    yield running
    running.stop()


def stays(predicate, seconds: float = SETTLE) -> bool:
    """Whether ``predicate`` holds throughout ``seconds`` of real time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.01)
    return True


def test_clock_expires_a_lease_when_the_fake_clock_passes_it(daemon):
    """A claimed task is failed as stale once the clock passes timeout x stale factor."""
    c = daemon.client()
    start = daemon.clock.now
    task = c.call("enqueue", tool="job")
    claimed = c.call("claim", worker="w1")
    assert claimed["id"] == task["id"]
    expires = start + 10 * 3

    def status():
        return c.call("task", task=task["id"])["status"]
    daemon.advance_to(expires - 0.5)
    assert stays(lambda: status() == "running"), "released before its lease ran out"
    daemon.advance_to(expires + 0.5)
    wait_until(lambda: status() == "failed", timeout=2, message="the stale task to fail")
    assert "stale" in c.call("task", task=task["id"])["reason"]


def test_clock_releases_a_delayed_task_only_when_the_fake_clock_passes_its_delay(daemon):
    """An `enqueue` with `delay` becomes claimable once the clock passes the delay."""
    c = daemon.client()
    start = daemon.clock.now
    task = c.call("enqueue", tool="job", delay=60)
    assert c.call("claim", worker="w1") is None
    daemon.advance_to(start + 59.5)
    assert stays(lambda: c.call("claim", worker="w1") is None), "claimable before its delay"
    daemon.advance_to(start + 60.5)
    claimed = wait_until(lambda: c.call("claim", worker="w1"), timeout=2,
                         message="the delayed task to be claimable")
    assert claimed["id"] == task["id"]


def test_clock_times_out_a_waiting_claim_at_the_fake_deadline(daemon):
    """A `claim` with `wait` is answered with no task once the clock passes its wait."""
    waiting, other = daemon.client(), daemon.client()
    start = daemon.clock.now
    waiting.send("claim", worker="patient", wait=30)
    # The daemon noted the claim's worker, so the claim is parked with its deadline.
    wait_until(lambda: any(w["name"] == "patient" for w in other.call("workers")), timeout=2,
               message="the claim to be parked")
    daemon.advance_to(start + 29.5)
    assert stays(lambda: waiting.receive_ready() == []), "answered before its wait ran out"
    daemon.advance_to(start + 30.5)
    replies = wait_until(waiting.receive_ready, timeout=2, message="the claim to time out")
    assert replies[0]["ok"] and replies[0]["result"] is None
