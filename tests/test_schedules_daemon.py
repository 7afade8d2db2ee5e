"""Recurring schedules (issue 12) on a real sparkqd: its timer, restarts, sparkq.yml, the socket.

The rules themselves (cron across DST, every's anchor, catch_up, overlap, grace,
jitter, end_at, at, pause) are specified on the pure core with a fake clock in
test_schedules_core.py. Here the daemon shows that its timer fires a slot on
time, that a clean restart and a kill -9 neither lose a slot nor enqueue one
twice, that sparkq.yml's schedules follow the file through reloads, and that
what users see (watch, metrics, history, schedule.next, errors, the SQLite
snapshot) says what the core did. A one-second ``every`` keeps the waits short;
``start_at`` on a whole second makes every slot an exact, known time.
"""

import datetime
import itertools
import math
import signal
import sqlite3
import time
import zoneinfo

import cronsim
import pytest

from conftest import wait_until
from test_observe import drain

AGENT = "llm-haiku"  #: a built-in tool without a command: its tasks wait for a claim


def iso(t: float) -> str:
    """RFC 3339 UTC with milliseconds, as the daemon writes times."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def epoch(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


def next_whole_second(lead=1.0) -> float:
    """A whole second at least ``lead`` seconds from now."""
    return float(math.ceil(time.time() + lead))


def tasks_of(d, name) -> list[dict]:
    return [t for t in d.ok(op="tasks", limit=1000) if t.get("schedule") == name]


def read_only(d):
    return sqlite3.connect(f"file:{d.data_dir / 'sparkq.db'}?mode=ro", uri=True)


# -- the timer fires on time, and what users see of it ----------------------------------------


def test_one_second_every_fires_on_time_seen_by_watch_metrics_and_history(make_daemon):
    """every 1 s from a whole second: each slot fires within a fraction of a second of it."""
    d = make_daemon()
    watch = d.connect()
    assert watch.ok(op="watch", events=["schedule.fired"]) is not None
    start = next_whole_second()
    created = d.ok(op="schedule.create", name="tick", tool=AGENT, every="1s",
                   start_at=iso(start), end_at=iso(start + 2), overlap="allow")
    assert (created["source"], created["status"], created["next_at"]) == (
        "socket", "active", iso(start))
    ended = wait_until(lambda: d.ok(op="schedule.show", name="tick")["status"] == "ended",
                       timeout=8, message="the three slots to fire")
    assert ended
    events = [m for m in drain(watch) if m.get("event") == "schedule.fired"]
    assert [e["slot"] for e in events] == [iso(start + k) for k in range(3)]
    lateness = [epoch(e["at"]) - epoch(e["slot"]) for e in events]
    assert all(0 <= late < 0.5 for late in lateness), lateness
    assert [e["task"] for e in events] == [t["id"] for t in tasks_of(d, "tick")]
    records = tasks_of(d, "tick")
    assert [(t["slot"], t["key"]) for t in records] == [
        (iso(start + k), f"schedule:tick:{iso(start + k)}") for k in range(3)]

    metrics = d.ok(op="metrics")
    assert 'sparkq_schedule_firings_total{schedule="tick",outcome="fired"} 3' in metrics

    first = records[0]["id"]
    d.ok(op="claim", tool=AGENT)
    d.ok(op="complete", task=first)
    d.ok(op="enqueue", tool="llm-sonnet")  # another ended task that history must leave out
    d.ok(op="complete", task=d.ok(op="claim", tool="llm-sonnet")["id"])
    assert [t["id"] for t in d.ok(op="history", schedule="tick")] == [first]
    assert d.ok(op="history", schedule="other") == []
    shown = d.ok(op="schedule.show", name="tick")
    assert [(f["slot"], f["outcome"]) for f in shown["firings"]][-1] == (iso(start), "completed")


def test_next_fire_gauge_and_fire_now(make_daemon):
    """The gauge shows the next due time; schedule.fire enqueues now, then conflicts under skip."""
    d = make_daemon()
    start = next_whole_second(3600)
    d.ok(op="schedule.create", name="later", tool=AGENT, every="1h", start_at=iso(start))
    gauge = f'sparkq_schedule_next_fire_timestamp_seconds{{schedule="later"}} {start:.3f}'
    assert gauge in d.ok(op="metrics")
    task = d.ok(op="schedule.fire", name="later")
    assert (task["schedule"], task["status"]) == ("later", "pending")
    error = d.call(op="schedule.fire", name="later")["error"]
    assert error["code"] == "conflict" and "overlap: skip" in error["message"], error
    assert d.ok(op="schedule.show", name="later")["next_at"] == iso(start)


# -- restarts: no slot lost, none enqueued twice ----------------------------------------------


def test_clean_restart_and_kill_9_lose_no_slot_and_enqueue_none_twice(make_daemon):
    """Slots S..S+8 every second with a stop and a kill -9 between: each enqueued exactly once.

    catch_up all with a long grace means every slot that passed while the daemon
    was down is fired at start, so the tasks' slots must be exactly the expected
    consecutive list; each down period lasts over a second, so each misses a slot, which
    is enqueued late, at the start after it.
    """
    d = make_daemon()
    start = next_whole_second(1.5)
    last = start + 8
    d.ok(op="schedule.create", name="beat", tool=AGENT, every="1s", start_at=iso(start),
         end_at=iso(last), catch_up="all", grace=3600, overlap="allow")

    wait_until(lambda: len(tasks_of(d, "beat")) >= 2, timeout=6, message="two firings")
    assert d.stop() == 0
    time.sleep(1.1)  # down across at least one slot
    d.start()
    wait_until(lambda: len(tasks_of(d, "beat")) >= 5, timeout=8, message="five firings")
    d.kill()
    time.sleep(1.1)
    d.start()
    wait_until(lambda: d.ok(op="schedule.show", name="beat")["status"] == "ended",
               timeout=12, message="the last slot")

    records = tasks_of(d, "beat")
    expected = [iso(start + k) for k in range(9)]
    assert [t["slot"] for t in records] == expected
    assert len({t["key"] for t in records}) == 9
    caught_up = [t for t in records if epoch(t["created_at"]) - epoch(t["slot"]) > 0.1]
    assert len(caught_up) >= 2, "a down period missed no slot: the test proves nothing"
    shown = d.ok(op="schedule.show", name="beat")
    assert (shown["fired"], shown["skipped"]) == (9, 0)
    d.restart()  # and once more, after it ended: nothing new
    assert [t["slot"] for t in tasks_of(d, "beat")] == expected


def test_downtime_under_catch_up_latest_fires_only_the_most_recent_slot(make_daemon):
    """Down over several one-second slots, catch_up latest: one task, for the latest slot."""
    d = make_daemon()
    start = next_whole_second(1.0)  # the stop is over well before the first slot
    d.ok(op="schedule.create", name="latest", tool=AGENT, every="1s", start_at=iso(start),
         end_at=iso(start + 2), overlap="allow")
    d.stop()
    while time.time() < start + 2.2:
        time.sleep(0.05)
    d.start()
    wait_until(lambda: tasks_of(d, "latest"), timeout=5, message="the catch-up firing")
    assert [t["slot"] for t in tasks_of(d, "latest")] == [iso(start + 2)]
    shown = d.ok(op="schedule.show", name="latest")
    assert (shown["status"], shown["fired"], shown["skipped"]) == ("ended", 1, 2)
    assert 'sparkq_schedule_firings_total{schedule="latest",outcome="skipped_missed"} 2' in \
        d.ok(op="metrics")


# -- sparkq.yml: reload adds, changes and removes; the file's schedules refuse deletion -------

FILE_V1 = f"""
workers: {{count: 0}}
schedules:
  nightly: {{tool: {AGENT}, cron: "0 3 * * *", timezone: Europe/Berlin, payload: v1}}
  hourly: {{tool: {AGENT}, every: 1h}}
"""
FILE_V2 = f"""
workers: {{count: 0}}
schedules:
  nightly: {{tool: {AGENT}, cron: "0 3 * * *", timezone: Europe/Berlin, payload: v2}}
  fresh: {{tool: {AGENT}, every: 90s, overlap: allow}}
"""
FILE_V3 = f"""
workers: {{count: 0}}
schedules:
  nightly: {{tool: {AGENT}, cron: "0 4 * * *", timezone: Europe/Berlin, payload: v2}}
"""


def listed(d) -> dict:
    return {s["name"]: s for s in d.ok(op="schedule.list")}


def test_reload_adds_changes_and_removes_file_schedules_which_refuse_deletion(make_daemon):
    """sparkq.yml's schedules follow the file on reload and SIGHUP; socket ones are left alone."""
    d = make_daemon(config=FILE_V1, workers=None)
    d.ok(op="schedule.create", name="mine", tool=AGENT, every="1h")
    schedules = listed(d)
    assert {n: s["source"] for n, s in schedules.items()} == {
        "nightly": "config", "hourly": "config", "mine": "socket"}
    nightly_next = schedules["nightly"]["next_slot"]
    for op, fields in (("schedule.delete", {}), ("schedule.update", {"payload": "x"})):
        error = d.call(op=op, name="nightly", **fields)["error"]
        assert error["code"] == "conflict" and "sparkq.yml" in error["message"], error
    d.ok(op="schedule.pause", name="nightly")

    watch = d.connect()
    watch.ok(op="watch", events=["schedule.created", "schedule.changed", "schedule.removed"])
    d.config_path.write_text(FILE_V2)
    d.ok(op="reload")
    schedules = listed(d)
    assert sorted(schedules) == ["fresh", "mine", "nightly"]
    assert (schedules["nightly"]["payload"], schedules["nightly"]["paused"]) == ("v2", True)
    assert schedules["nightly"]["next_slot"] == nightly_next  # only the payload changed
    assert schedules["fresh"]["source"] == "config"
    seen = [(m["event"], m["schedule"]["name"]) for m in drain(watch)]
    assert sorted(seen) == [("schedule.changed", "nightly"), ("schedule.created", "fresh"),
                            ("schedule.removed", "hourly")]

    d.config_path.write_text(FILE_V3)
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: sorted(listed(d)) == ["mine", "nightly"], message="SIGHUP's reload")
    assert listed(d)["nightly"]["cron"] == "0 4 * * *" and listed(d)["nightly"]["paused"]

    assert d.stop() == 0
    rows = read_only(d).execute(
        "SELECT name, source, stream, tool, cron, timezone, every, paused, fired "
        "FROM schedules ORDER BY name").fetchall()
    assert rows == [("mine", "socket", "default", AGENT, None, None, "1h", 0, 0),
                    ("nightly", "config", "default", AGENT, "0 4 * * *", "Europe/Berlin", None,
                     1, 0)]
    d.start()
    assert sorted(listed(d)) == ["mine", "nightly"] and listed(d)["nightly"]["paused"]


def test_bad_file_schedule_refuses_start_and_reload_naming_the_key(make_daemon):
    """A bad schedule in sparkq.yml: start exits 2, reload is refused; both name the key path."""
    bad = f"schedules:\n  broken: {{tool: {AGENT}, cron: '99 * * * *'}}\n"
    d = make_daemon(config=bad, start=False)
    d.start(wait=False)
    assert d.proc.wait(20) == 2
    assert "$.schedules.broken.cron" in d.logs(), d.logs()

    good = make_daemon(config=FILE_V1, subdir="good", workers=None)
    good.config_path.write_text(FILE_V1 + f"  other: {{tool: {AGENT}, every: 1h, timezone: UTC}}\n")
    error = good.call(op="reload")["error"]
    assert error["code"] == "bad_request" and "$.schedules.other.timezone" in error["message"]
    assert sorted(listed(good)) == ["hourly", "nightly"]


# -- schedule.next and bad input over the socket ----------------------------------------------

NEXT_SAMPLE = [("*/7 * * * *", "UTC"), ("0 9 * * 1-5", "America/New_York"),
               ("30 2 * * *", "Europe/Berlin"), ("@hourly", "Asia/Kolkata"),
               ("0 0 29 2 *", "Australia/Lord_Howe"), ("15 1 * * SUN", "America/New_York")]


@pytest.mark.parametrize("after", ["2026-03-07T12:00:00Z", "2026-10-24T23:59:59Z"])
def test_schedule_next_matches_cronsim(shared, after):
    """schedule.next lists cronsim's next times for a sample of expressions and zones."""
    macros = {"@hourly": "0 * * * *"}
    for expr, zone in NEXT_SAMPLE:
        got = shared.ok(op="schedule.next", cron=expr, timezone=zone, after=after, count=12)
        start = datetime.datetime.fromtimestamp(epoch(after), zoneinfo.ZoneInfo(zone))
        want = list(itertools.islice(cronsim.CronSim(macros.get(expr, expr), start), 12))
        assert [t["at"] for t in got] == [iso(m.timestamp()) for m in want], (expr, zone)
        assert [t["local"] for t in got] == [m.isoformat() for m in want], (expr, zone)


BAD_REQUESTS = {
    "bad-cron": ({"cron": "61 * * * *"}, "bad_request", "cron:"),
    "cron-fields": ({"cron": "* * *"}, "bad_request", "cron:"),
    "unknown-timezone": ({"cron": "0 * * * *", "timezone": "Mars/Olympus"}, "bad_request",
                         "timezone:"),
    "timezone-without-cron": ({"every": "1h", "timezone": "UTC"}, "bad_request", "timezone:"),
    "two-timings": ({"cron": "0 * * * *", "every": "1h"}, "bad_request", "cron, every"),
    "no-timing": ({}, "bad_request", "exactly one of cron, every or at"),
    "bad-every": ({"every": "soon"}, "bad_request", "every:"),
    "end-before-start": ({"every": "1h", "start_at": "2030-01-02T00:00:00Z",
                          "end_at": "2030-01-01T00:00:00Z"}, "bad_request", "end_at:"),
    "bad-at": ({"at": "noon"}, "bad_request", "at:"),
    "unknown-tool": ({"every": "1h", "tool": "nope"}, "bad_request", "unknown tool 'nope'"),
    "unknown-stream": ({"every": "1h", "stream": "nowhere"}, "not_found", "nowhere"),
    "bad-overlap": ({"every": "1h", "overlap": "sometimes"}, "bad_request", "$.overlap"),
    "bad-catch-up": ({"every": "1h", "catch_up": "most"}, "bad_request", "$.catch_up"),
    "negative-jitter": ({"every": "1h", "jitter": -1}, "bad_request", "$.jitter"),
    "bad-name": ({"every": "1h", "name": "no spaces"}, "bad_request", "$.name"),
    "unknown-field": ({"every": "1h", "colour": "red"}, "bad_request", "colour"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_schedule_requests_are_refused_naming_the_field(shared, case):
    """Each bad schedule.create gets bad_request (not_found) naming the field; none is created."""
    fields, code, fragment = BAD_REQUESTS[case]
    reply = shared.call(op="schedule.create", **{"name": "bad", "tool": AGENT, **fields})
    assert not reply["ok"], reply
    assert reply["error"]["code"] == code and fragment in reply["error"]["message"], reply
    assert all(s["name"] != "bad" for s in shared.ok(op="schedule.list"))


@pytest.mark.parametrize("fields,code,fragment", [
    ({"cron": "0 0 30 2 *"}, "bad_request", "cron:"),
    ({"cron": "0 * * * *", "timezone": "Nowhere/City"}, "bad_request", "timezone:"),
    ({"cron": "0 * * * *", "after": "yesterday"}, "bad_request", "after:"),
    ({"cron": "0 * * * *", "count": 0}, "bad_request", "$.count"),
])
def test_bad_schedule_next_requests_are_refused_naming_the_field(shared, fields, code, fragment):
    """A bad schedule.next gets bad_request naming the field."""
    reply = shared.call(op="schedule.next", **fields)
    assert reply["error"]["code"] == code and fragment in reply["error"]["message"], reply


def test_unknown_schedule_names_are_not_found(shared):
    """Each op on an unknown schedule is not_found; the daemon serves on."""
    for op in ("schedule.show", "schedule.delete", "schedule.pause", "schedule.resume",
               "schedule.fire"):
        reply = shared.call(op=op, name="absent")
        assert reply["error"]["code"] == "not_found" and "absent" in reply["error"]["message"]
    assert shared.ok(op="hello")["protocol"] == 1
