"""Recurring schedules (issue 12) on the pure queue core, with a fake clock.

Each rule of the issue is driven here without a daemon: requests are decoded
from their wire form with the protocol's own decoder and handed to the core at
a time the test chooses; ``tick(now)`` runs the one timer, either at a moment
(a daemon that was down until then) or at every deadline it returns (a daemon
that was up all along). Cron fire times are compared with cronsim's own
iteration; a restart is a fresh Queue that replays the events the first one
emitted, as the journal does. The daemon's side (its timer, restarts, kill -9,
sparkq.yml, the socket) is in test_schedules_daemon.py.
"""

import datetime
import itertools
import json
import zoneinfo

import cronsim
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparkqd
from conftest import core_call
from sparkqd import BadRequest, Conflict, NotFound, ScheduleFired, ScheduleSkipped, rfc3339

T0 = 1_800_000_000.0  #: 2027-01-15T08:00:00Z, a whole hour
H = 3600.0
DAY = 86400.0
DECODE = msgspec.json.Decoder(sparkqd.AnyRequest)
#: The ops the Schedules part of the core carries out; the reads go through QueueReads.
CHANGES = {"schedule.create": "create", "schedule.update": "update", "schedule.delete": "delete",
           "schedule.pause": "pause", "schedule.resume": "resume", "schedule.fire": "fire"}


def request(op, **fields):
    """A request as the daemon decodes it from a JSON line."""
    return DECODE.decode(json.dumps({"op": op, **fields}))


class Core:
    """The queue core on the built-in configuration, its clock moved by the test."""

    def __init__(self, now=T0, config=None):
        self.now = now
        self.queue = sparkqd.Queue(config or sparkqd.Config())
        self.queue.bootstrap(now)
        self.log = []  #: every event emitted, in order, as the journal would hold them
        self.take()

    def take(self) -> list:
        """The events emitted since the last call (kept in ``log`` for replay)."""
        events = self.queue.take_events()
        self.log += events
        return events

    def send(self, op, when=None, **fields):
        """One request at ``when`` (default: the clock); its result in wire form."""
        req = request(op, **fields)
        now = self.now if when is None else when
        if op in CHANGES:
            result = getattr(self.queue.schedules, CHANGES[op])(req, now)
            return sparkqd.Replies(self.queue).wire(result)
        return core_call(self.queue, req, now)

    def create(self, name="s", tool="llm-haiku", **fields) -> dict:
        record = self.send("schedule.create", name=name, tool=tool, **fields)
        self.take()
        return record

    def tick_at(self, now) -> list:
        """The timer runs once at ``now`` (after a downtime: nothing ran before); its events."""
        self.now = now
        self.queue.tick(now)
        return self.take()

    def run_until(self, end) -> list:
        """The timer runs at every deadline it names up to ``end``, as a daemon that is up."""
        events = []
        while (deadline := self.queue.next_deadline()) is not None and deadline <= end:
            events += self.tick_at(max(deadline, self.now))
        self.now = end
        return events

    def schedule(self, name="s") -> sparkqd.Schedule:
        return self.queue.schedules.by_name[name]

    def replayed(self) -> "Core":
        """A fresh core holding what replaying this one's events gives: a restart."""
        self.take()
        other = Core.__new__(Core)
        other.now, other.log = self.now, list(self.log)
        other.queue = sparkqd.Queue(self.queue.config)
        for event in self.log:
            other.queue.apply(event)
        other.queue.take_wakeups()
        return other


def fired(events) -> list[float]:
    """The slots of the clock's firings among ``events``, in order."""
    return [e.slot for e in events if type(e) is ScheduleFired and not e.manual]


def skips(events) -> list[tuple]:
    """Each skip run among ``events``: (why, first slot, last slot, count)."""
    return [(e.why.partition(":")[0], e.slot, e.last_slot if e.count > 1 else e.slot, e.count)
            for e in events if type(e) is ScheduleSkipped]


def hours(slots) -> list[float]:
    """Slots as hours after T0, for readable expected lists."""
    return [(slot - T0) / H for slot in slots]


def local(slot: float, zone: str) -> str:
    return datetime.datetime.fromtimestamp(slot, zoneinfo.ZoneInfo(zone)).isoformat()


# -- cron in a time zone, across both DST changes ---------------------------------------------

#: (zone, local date of the change, "spring" or "autumn"), 2026.
DST_CHANGES = [("America/New_York", (2026, 3, 8), "spring"),
               ("America/New_York", (2026, 11, 1), "autumn"),
               ("Europe/Berlin", (2026, 3, 29), "spring"),
               ("Europe/Berlin", (2026, 10, 25), "autumn")]
#: Local times of day that fall in the spring gap or the autumn repeat of each zone.
IN_THE_CHANGE = {"America/New_York": "30 1", "Europe/Berlin": "30 2"}
IN_THE_GAP = {"America/New_York": "30 2", "Europe/Berlin": "30 2"}
CRON_SAMPLE = ["30 1 * * *", "30 2 * * *", "0 3 * * *", "0 * * * *", "*/20 1-3 * * *",
               "15 2 * * 0", "@daily"]


def around(zone, day):
    """From local midnight a day before the change to local midnight a day after it."""
    z = zoneinfo.ZoneInfo(zone)
    midnight = datetime.datetime(*day, tzinfo=z)
    return (midnight - datetime.timedelta(days=1)).timestamp(), \
        (midnight + datetime.timedelta(days=2)).timestamp()


def cronsim_slots(expr, zone, start, end) -> list[float]:
    """cronsim's own fire times after ``start`` up to ``end``."""
    fields = sparkqd.CRON_MACROS.get(expr, expr)
    begin = datetime.datetime.fromtimestamp(start, zoneinfo.ZoneInfo(zone))
    moments = cronsim.CronSim(fields, begin)
    return [m.timestamp() for m in itertools.takewhile(lambda m: m.timestamp() <= end, moments)]


def fire_across(zone, day, expr) -> tuple[list[float], list, float, float]:
    """A cron schedule created the day before a change, the timer run to the day after it."""
    start, end = around(zone, day)
    core = Core(start)
    core.create(cron=expr, timezone=zone, overlap="allow")
    events = core.run_until(end)
    return fired(events), events, start, end


@pytest.mark.parametrize("expr", CRON_SAMPLE)
@pytest.mark.parametrize("zone,day,change", DST_CHANGES)
def test_cron_across_dst_fires_exactly_cronsims_times_each_on_time(zone, day, change, expr):
    """Every slot cronsim names fires once, at its own time (never early, never late)."""
    slots, events, start, end = fire_across(zone, day, expr)
    assert slots == cronsim_slots(expr, zone, start, end)
    assert [e.at for e in events if type(e) is ScheduleFired] == slots
    assert skips(events) == []


@pytest.mark.parametrize("zone,day", [(z, d) for z, d, c in DST_CHANGES if c == "spring"])
def test_cron_in_the_spring_gap_runs_once_right_after_the_jump(zone, day):
    """02:30 does not exist on the change day: it runs once, at 03:00 of the new offset."""
    slots, _, _, _ = fire_across(zone, day, IN_THE_GAP[zone] + " * * *")
    on_the_day = [local(s, zone) for s in slots if local(s, zone).startswith("{}-{:02}-{:02}".format(*day))]
    after_jump = datetime.datetime(*day, 3, 0, tzinfo=zoneinfo.ZoneInfo(zone))
    assert on_the_day == [after_jump.isoformat()]
    assert len(slots) == 3  # the days before and after run at 02:30 as usual


@pytest.mark.parametrize("zone,day", [(z, d) for z, d, c in DST_CHANGES if c == "autumn"])
def test_cron_in_the_autumn_repeat_runs_once_not_twice(zone, day):
    """The repeated hour's 01:30 (New York) or 02:30 (Berlin) runs once, at its first pass."""
    slots, _, _, _ = fire_across(zone, day, IN_THE_CHANGE[zone] + " * * *")
    date = "{}-{:02}-{:02}".format(*day)
    on_the_day = [s for s in slots if local(s, zone).startswith(date)]
    assert len(on_the_day) == 1
    first_pass = datetime.datetime(*day, *map(int, reversed(IN_THE_CHANGE[zone].split())),
                                   tzinfo=zoneinfo.ZoneInfo(zone), fold=0)
    assert on_the_day == [first_pass.timestamp()]
    assert len(slots) == 3


@pytest.mark.parametrize("zone,day,change", DST_CHANGES)
def test_hourly_cron_fires_every_real_hour_of_a_changing_day(zone, day, change):
    """A wildcard hour follows real time: 23 firings on the spring day, 25 on the autumn day."""
    slots, _, _, _ = fire_across(zone, day, "0 * * * *")
    date = "{}-{:02}-{:02}".format(*day)
    on_the_day = [s for s in slots if local(s, zone).startswith(date)]
    assert len(on_the_day) == (23 if change == "spring" else 25)
    assert all(b - a == H for a, b in itertools.pairwise(slots))


def test_cron_across_dst_survives_a_restart_inside_the_repeated_hour():
    """Replayed between the two passes of 01:xx, the queue fires 01:30 once and no more."""
    zone, day = "America/New_York", (2026, 11, 1)
    start, end = around(zone, day)
    core = Core(start)
    core.create(cron="30 1 * * *", timezone=zone, overlap="allow")
    second_pass = datetime.datetime(2026, 11, 1, 1, 10, tzinfo=zoneinfo.ZoneInfo(zone),
                                    fold=1).timestamp()
    before = fired(core.run_until(second_pass))
    after = fired(core.replayed().run_until(end))
    assert before + after == cronsim_slots("30 1 * * *", zone, start, end)


@pytest.mark.parametrize("zone,day", [(z, d) for z, d, c in DST_CHANGES if c == "autumn"])
def test_cron_created_in_the_second_pass_of_the_repeat_waits_for_the_next_day(zone, day):
    """Created in the repeat's second pass after its first 01:30, the next slot is tomorrow."""
    z = zoneinfo.ZoneInfo(zone)
    hour = int(IN_THE_CHANGE[zone].split()[1])
    now = datetime.datetime(*day, hour, 0, 7, tzinfo=z, fold=1).timestamp()
    core = Core(now)
    core.create(cron=IN_THE_CHANGE[zone] + " * * *", timezone=zone)
    assert core.schedule().next_slot > now
    assert fired(core.tick_at(now + 1)) == []


def test_resume_in_the_second_pass_of_the_repeat_does_not_fire_a_skipped_slot():
    """Paused over 01:30 EDT and resumed at 01:10 EST: 01:30 is skipped, not fired as well."""
    z = zoneinfo.ZoneInfo("America/New_York")
    at = lambda hour, minute, fold: datetime.datetime(2026, 11, 1, hour, minute, tzinfo=z,
                                                      fold=fold).timestamp()
    core = Core(at(0, 0, 0))
    core.create(cron="30 1 * * *", timezone="America/New_York", overlap="allow")
    core.send("schedule.pause", name="s", when=at(1, 20, 0))
    core.send("schedule.resume", name="s", when=at(1, 10, 1))
    assert [(why, n) for why, _, _, n in skips(core.take())] == [("paused", 1)]
    assert fired(core.run_until(at(1, 10, 1) + 3600)) == []
    assert core.schedule().next_slot == at(1, 30, 0) + DAY + 3600  # 2026-11-02 01:30 EST


def test_schedule_next_from_the_second_pass_of_the_repeat_lists_only_later_times():
    """schedule.next after 01:00:07 EST (the second 01:00) lists nothing before it."""
    core = Core()
    after = "2026-11-01T06:00:07Z"  # 01:00:07 EST, after 01:30 EDT has passed
    times = core.send("schedule.next", cron="30 1 * * *", timezone="America/New_York",
                      after=after, count=3)
    assert [t["at"] for t in times] == ["2026-11-02T06:30:00.000Z", "2026-11-03T06:30:00.000Z",
                                        "2026-11-04T06:30:00.000Z"]


@pytest.mark.parametrize("expr", ["*/7 * * * *", "0 9 * * 1-5", "30 2 * * *", "@hourly",
                                  "0 0 29 2 *", "5 4 * * SUN"])
@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Europe/Berlin", "Asia/Kolkata",
                                  "Australia/Lord_Howe"])
def test_schedule_next_lists_cronsims_times(expr, zone):
    """schedule.next gives cronsim's next times after `after`, in UTC and in the zone."""
    core = Core()
    after = "2026-03-07T12:00:00Z"
    start = sparkqd.parse_time(after)
    times = core.send("schedule.next", cron=expr, timezone=zone, after=after, count=8)
    expected = list(itertools.islice(cronsim.CronSim(
        sparkqd.CRON_MACROS.get(expr, expr),
        datetime.datetime.fromtimestamp(start, zoneinfo.ZoneInfo(zone))), 8))
    assert [t["at"] for t in times] == [rfc3339(m.timestamp()) for m in expected]
    assert [t["local"] for t in times] == [m.isoformat() for m in expected]


def test_cron_without_a_zone_records_the_local_zone_by_name():
    """A cron given no zone takes the daemon's local zone, recorded by its name."""
    core = Core()
    core.queue.schedules.local_zone = "Europe/Berlin"
    record = core.create(cron="0 9 * * *")
    assert record["timezone"] == "Europe/Berlin"
    assert record["next_slot"] == "2027-01-16T08:00:00.000Z"  # 09:00 CET


# -- every: anchored at creation or start_at --------------------------------------------------


def test_every_first_slot_is_creation_plus_the_interval():
    """Created at T0+0.25, every 90 s: slots at T0+0.25+90k, each fired at its time."""
    core = Core(T0 + 0.25)
    record = core.create(every="90s", overlap="allow")
    assert record["next_slot"] == rfc3339(T0 + 90.25)
    assert fired(core.run_until(T0 + 400)) == [T0 + 0.25 + 90 * k for k in range(1, 5)]


def test_every_with_start_at_has_its_first_slot_at_start_at():
    """start_at is the first slot, and the anchor of the ones after it."""
    core = Core()
    core.create(every="1h", start_at=rfc3339(T0 + 2 * H + 30), overlap="allow")
    assert core.schedule().next_slot == T0 + 2 * H + 30
    assert fired(core.run_until(T0 + 5 * H)) == [T0 + 2 * H + 30, T0 + 3 * H + 30, T0 + 4 * H + 30]


def test_every_start_at_in_the_past_keeps_its_anchor():
    """A start_at already passed anchors the slots; the first is the next one after now."""
    core = Core()
    core.create(every="10m", start_at=rfc3339(T0 - 3 * H - 7))
    assert core.schedule().next_slot == T0 - 3 * H - 7 + 19 * 600


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("5m", 300), ("2h", 7200), ("1d", DAY),
                                          ("1h30m", 5400), ("45", 45), (120, 120)])
def test_every_intervals_in_units(text, seconds):
    """An interval in units (or plain seconds) is the time from creation to the first slot."""
    core = Core()
    core.create(every=text)
    assert core.schedule().next_slot == T0 + seconds


def test_every_anchor_is_unchanged_by_a_restart():
    """Replayed (a restart), the next slot is the same and the slots go on from the anchor."""
    core = Core(T0 + 0.125)
    core.create(every="7m", overlap="allow")
    first = fired(core.run_until(T0 + 30 * 60))
    restarted = core.replayed()
    assert restarted.queue.schedules.by_name == core.queue.schedules.by_name
    assert restarted.queue.next_deadline() == core.queue.next_deadline()
    later = fired(restarted.run_until(T0 + 60 * 60))
    assert first + later == [T0 + 0.125 + 420 * k for k in range(1, 9)]


def test_every_anchor_is_unchanged_by_a_restart_after_downtime():
    """Down for 5 h then replayed: the slots fired are still anchor + k x interval."""
    core = Core(T0 + 0.5)
    core.create(every="25m", overlap="allow", catch_up="all")
    core.run_until(T0 + H)
    restarted = core.replayed()
    events = restarted.tick_at(T0 + 6 * H)
    assert fired(events) == [T0 + 0.5 + 1500 * k for k in range(3, 15)]
    assert restarted.schedule().next_slot == T0 + 0.5 + 1500 * 15


def test_every_with_a_fractional_interval_has_strictly_later_slots():
    """every 1.1 s: the next ten slots (schedule.show) are 1.1 s apart, each after the last."""
    core = Core()
    core.create(every="1.1s")
    shown = core.send("schedule.show", name="s")["next"]
    moments = [sparkqd.parse_time(t) for t in shown]
    assert all(b > a for a, b in itertools.pairwise(moments)), shown


# -- catch_up x overlap across a three-day downtime -------------------------------------------

#: What the first tick after a downtime does to an hourly schedule whose slot 1 fired on time
#: (its task still pending) and whose slots 2..73 passed while the daemon was down.
#: (catch_up, overlap) -> (hours fired after the downtime, skip runs as (why, first, last, count)).
DOWNTIME_CASES = {
    ("all", "allow"): (list(range(2, 74)), []),
    ("all", "replace"): (list(range(2, 74)), []),
    ("all", "skip"): ([], [("overlap", k, k, 1) for k in range(2, 74)]),
    ("latest", "allow"): ([73], [("missed", 2, 72, 71)]),
    ("latest", "replace"): ([73], [("missed", 2, 72, 71)]),
    ("latest", "skip"): ([], [("missed", 2, 72, 71), ("overlap", 73, 73, 1)]),
    ("none", "allow"): ([], [("missed", 2, 73, 72)]),
    ("none", "replace"): ([], [("missed", 2, 73, 72)]),
    ("none", "skip"): ([], [("missed", 2, 73, 72)]),
}


def in_hours(runs):
    return [(why, (a - T0) / H, (b - T0) / H, n) for why, a, b, n in runs]


@pytest.mark.parametrize("catch_up,overlap", list(DOWNTIME_CASES))
def test_catch_up_and_overlap_after_three_days_down(catch_up, overlap):
    """Exact slots fired and skipped by the first tick after three days down, for each policy."""
    core = Core()
    core.create(every="1h", catch_up=catch_up, overlap=overlap)
    assert hours(fired(core.run_until(T0 + H))) == [1]
    events = core.tick_at(T0 + H + 3 * DAY + 1800)  # down from just after slot 1 for 3 days
    want_fired, want_skips = DOWNTIME_CASES[catch_up, overlap]
    assert hours(fired(events)) == want_fired
    assert in_hours(skips(events)) == want_skips
    assert core.schedule().next_slot == T0 + 74 * H
    tasks = sorted(core.queue.tasks.values(), key=lambda t: t.id)
    assert [(t.slot - T0) / H for t in tasks] == [1, *want_fired]
    statuses = [t.status for t in tasks]
    if overlap == "replace" and want_fired:
        assert statuses == ["cancelled"] * (len(tasks) - 1) + ["pending"]
    else:
        assert set(statuses) == {"pending"}


def test_overlap_skip_fires_again_once_the_last_task_ended():
    """Under overlap skip a slot is skipped while the last task is pending, fired once it ended."""
    core = Core()
    core.create(every="1h")
    core.run_until(T0 + 2 * H)
    assert [e.why for e in core.log if type(e) is ScheduleSkipped] == [
        "overlap: task 1 of the last firing is pending"]
    core.send("claim", tool="llm-haiku")
    core.send("complete", task=1)
    assert hours(fired(core.run_until(T0 + 3 * H))) == [3]


def test_catch_up_all_fires_at_most_the_latest_hundred_slots_and_says_so():
    """Every 30 min over three days down is 144 slots: the latest 100 fire, 44 are skipped."""
    core = Core()
    core.create(every="30m", catch_up="all", overlap="allow")
    events = core.tick_at(T0 + 3 * DAY + 60)
    assert fired(events) == [T0 + 1800 * k for k in range(45, 145)]
    (skip,) = [e for e in events if type(e) is ScheduleSkipped]
    assert (skip.slot, skip.last_slot, skip.count) == (T0 + 1800, T0 + 1800 * 44, 44)
    assert "at most the latest 100" in skip.why


def test_catch_up_all_of_a_cron_schedule_fires_every_missed_slot_in_order():
    """A cron every 6 h, down for three days under catch_up all: each of the 12 slots fires."""
    core = Core()
    core.create(cron="0 */6 * * *", timezone="UTC", catch_up="all", overlap="allow")
    events = core.tick_at(T0 + 3 * DAY + 5)
    assert fired(events) == cronsim_slots("0 */6 * * *", "UTC", T0, T0 + 3 * DAY + 5)
    assert len(fired(events)) == 12


def test_tasks_of_firings_carry_schedule_slot_and_key():
    """A firing's task names its schedule and slot and has the key schedule:<name>:<slot>."""
    core = Core()
    core.create(name="nightly", every="1h", payload={"n": 1}, priority=5, catch_up="all",
                overlap="allow")
    core.tick_at(T0 + 2 * H + 1)
    records = [core.send("task", task=i) for i in (1, 2)]
    assert [(r["schedule"], r["slot"], r["key"], r["payload"], r["priority"]) for r in records] == [
        ("nightly", rfc3339(T0 + H), f"schedule:nightly:{rfc3339(T0 + H)}", {"n": 1}, 5),
        ("nightly", rfc3339(T0 + 2 * H), f"schedule:nightly:{rfc3339(T0 + 2 * H)}", {"n": 1}, 5)]


def test_key_prefix_replaces_the_default_key_prefix():
    """key_prefix replaces schedule:<name>: before the slot in each task's key."""
    core = Core()
    core.create(every="1h", key_prefix="hourly-")
    core.tick_at(T0 + H)
    assert core.queue.tasks[1].key == "hourly-" + rfc3339(T0 + H)


def test_replayed_catch_up_fires_no_slot_twice():
    """A restart after the catch-up fired (the events journaled) fires none of them again."""
    core = Core()
    core.create(every="1h", catch_up="all", overlap="allow")
    core.tick_at(T0 + 3 * DAY)
    restarted = core.replayed()
    assert fired(restarted.tick_at(T0 + 3 * DAY + 10)) == []
    assert fired(restarted.tick_at(T0 + 3 * DAY + H)) == [T0 + 73 * H]
    slots = [t.slot for t in restarted.queue.tasks.values()]
    assert len(slots) == len(set(slots)) == 73


# -- grace ------------------------------------------------------------------------------------


@pytest.mark.parametrize("late,fires", [(0, True), (59.9, True), (60, True), (60.1, False),
                                        (600, False)])
def test_grace_decides_whether_a_late_slot_fires_under_catch_up_none(late, fires):
    """catch_up none: a slot first seen up to `grace` (60 s) after its time fires; later, missed."""
    core = Core()
    core.create(every="1h", catch_up="none")
    events = core.tick_at(T0 + H + late)
    assert fired(events) == ([T0 + H] if fires else [])
    assert skips(events) == ([] if fires else [("missed", T0 + H, T0 + H, 1)])
    assert core.schedule().next_slot == T0 + 2 * H


def test_a_longer_grace_fires_the_latest_of_a_downtime_under_catch_up_none():
    """grace 1 h: after three days down the latest slot, 30 min old, fires; older are missed."""
    core = Core()
    core.create(every="1h", catch_up="none", grace=3600)
    events = core.tick_at(T0 + 72 * H + 1800)
    assert hours(fired(events)) == [72]
    assert in_hours(skips(events)) == [("missed", 1, 71, 71)]


def test_grace_zero_fires_only_a_slot_ticked_on_time():
    """grace 0 under catch_up none: a slot fires only if the timer runs at its very time."""
    core = Core()
    core.create(every="1h", catch_up="none", grace=0, overlap="allow")
    assert hours(fired(core.run_until(T0 + 2 * H))) == [1, 2]
    assert fired(core.tick_at(T0 + 3 * H + 0.001)) == []


# -- jitter -----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
       jitter=st.floats(min_value=0.001, max_value=1800, allow_nan=False),
       start=st.integers(min_value=0, max_value=10**6))
def test_jitter_delays_each_slot_within_its_bound_and_never_early(name, jitter, start):
    """Each slot fires at slot + d, 0 <= d < jitter, not a moment before; the key keeps the slot."""
    core = Core(T0 + start)
    core.create(name=name, every="1h", jitter=jitter, overlap="allow")
    for k in range(1, 4):
        slot = T0 + start + k * H
        due = core.queue.next_deadline()
        assert 0 <= sparkqd.jitter_of(name, slot, jitter) < jitter
        assert slot <= due <= slot + jitter
        assert fired(core.tick_at(due - 1e-3)) == []
        (event,) = [e for e in core.tick_at(due) if type(e) is ScheduleFired]
        assert (event.slot, event.at) == (slot, due)
        assert core.queue.tasks[event.task].key == f"schedule:{name}:{rfc3339(slot)}"


def test_jitter_is_the_same_after_a_restart():
    """The delay is derived from name and slot: a replayed queue waits for the same moment."""
    core = Core()
    core.create(every="1h", jitter=900)
    due = core.queue.next_deadline()
    assert T0 + H < due < T0 + H + 900
    assert core.replayed().queue.next_deadline() == due


def test_jitter_differs_between_schedules_and_slots():
    """The delay depends on name and slot: schedules and slots spread out."""
    core = Core()
    for name in ("a", "b", "c"):
        core.create(name=name, every="1h", jitter=3600, overlap="allow")
    book = core.queue.schedules
    dues = {book.due_at(s, s.next_slot) for s in book.by_name.values()}
    assert len(dues) == 3
    a = core.schedule("a")
    assert core.queue.schedules.due_at(a, T0 + H) - T0 - H != \
        core.queue.schedules.due_at(a, T0 + 2 * H) - T0 - 2 * H


# -- end_at and one-shot at -------------------------------------------------------------------


def test_end_at_stops_the_slots_and_ends_the_schedule():
    """every 1 h until T0+3h: slots 1, 2 and 3 (end_at itself) fire, then it has ended."""
    core = Core()
    core.create(every="1h", end_at=rfc3339(T0 + 3 * H), overlap="allow")
    assert hours(fired(core.run_until(T0 + 10 * H))) == [1, 2, 3]
    record = core.send("schedule.show", name="s")
    assert (record["status"], record["next_slot"], record["next"]) == ("ended", None, [])
    assert core.queue.next_deadline() is None


def test_end_at_of_a_cron_schedule():
    """A cron schedule fires no slot after end_at and then has ended."""
    core = Core()
    core.create(cron="0 * * * *", timezone="UTC", end_at=rfc3339(T0 + 2 * H + 59),
                overlap="allow")
    assert hours(fired(core.run_until(T0 + DAY))) == [1, 2]
    assert core.schedule().next_slot is None


def test_end_at_passed_during_a_downtime_catches_up_to_it_only():
    """A downtime past end_at catches up the slots up to end_at, and no later one."""
    core = Core()
    core.create(every="1h", end_at=rfc3339(T0 + 5 * H), catch_up="all", overlap="allow")
    assert hours(fired(core.tick_at(T0 + 3 * DAY))) == [1, 2, 3, 4, 5]
    assert core.schedule().next_slot is None


def test_start_and_end_window():
    """start_at and end_at together: the slots from one to the other, both included."""
    core = Core()
    core.create(every="1h", start_at=rfc3339(T0 + 5 * H), end_at=rfc3339(T0 + 7 * H),
                overlap="allow")
    assert hours(fired(core.run_until(T0 + DAY))) == [5, 6, 7]


def test_at_fires_once_then_the_schedule_has_ended():
    """A one-shot `at` fires at its time, once; the schedule then shows status ended."""
    core = Core()
    record = core.create(at=rfc3339(T0 + 90))
    assert (record["status"], record["next_at"]) == ("active", rfc3339(T0 + 90))
    assert fired(core.tick_at(T0 + 89.999)) == []
    events = core.run_until(T0 + 10 * DAY)
    assert fired(events) == [T0 + 90]
    assert [e.at for e in events if type(e) is ScheduleFired] == [T0 + 90]
    record = core.send("schedule.show", name="s")
    assert (record["status"], record["next_at"], record["fired"]) == ("ended", None, 1)
    assert core.queue.next_deadline() is None
    assert fired(core.replayed().run_until(T0 + 20 * DAY)) == []


def test_at_missed_in_a_downtime_follows_catch_up():
    """A one-shot missed in a downtime fires late (latest) or is skipped as missed (none)."""
    core = Core()
    core.create(name="late", at=rfc3339(T0 + 90))
    core.create(name="dropped", at=rfc3339(T0 + 90), catch_up="none")
    events = core.tick_at(T0 + DAY)
    assert [(e.name, e.slot) for e in events if type(e) is ScheduleFired] == [("late", T0 + 90)]
    skipped = [(e.name, e.why) for e in events if type(e) is ScheduleSkipped]
    assert skipped == [("dropped", "missed")]
    assert {s.next_slot for s in core.queue.schedules.by_name.values()} == {None}


# -- pause and resume -------------------------------------------------------------------------


def test_paused_schedule_fires_nothing_and_resume_skips_the_slots_that_passed():
    """Paused for 5 h: nothing fires; resume skips slots 1..5 as one "paused" run, then 6 fires."""
    core = Core()
    core.create(every="1h", overlap="allow", catch_up="all")
    paused = core.send("schedule.pause", name="s", when=T0 + 10)
    assert (paused["status"], paused["paused"], paused["next_at"]) == ("paused", True, None)
    assert core.run_until(T0 + 5.5 * H) == []
    core.send("schedule.resume", name="s", when=T0 + 5.5 * H)
    events = core.take()
    assert in_hours(skips(events)) == [("paused", 1, 5, 5)]
    assert core.schedule().next_slot == T0 + 6 * H
    assert hours(fired(core.run_until(T0 + 7 * H))) == [6, 7]


def test_pause_survives_a_restart():
    """A paused schedule is still paused after a replay and fires nothing."""
    core = Core()
    core.create(every="1h")
    core.send("schedule.pause", name="s")
    restarted = core.replayed()
    assert restarted.schedule().paused
    assert restarted.run_until(T0 + DAY) == []


def test_resume_before_any_slot_passed_skips_nothing():
    """Resumed before its next slot came, a schedule skips nothing and fires that slot."""
    core = Core()
    core.create(every="1h")
    core.send("schedule.pause", name="s", when=T0 + 10)
    core.send("schedule.resume", name="s", when=T0 + 20)
    assert skips(core.take()) == []
    assert hours(fired(core.run_until(T0 + H))) == [1]


def test_pause_and_resume_refuse_the_wrong_state():
    """Resuming a running schedule or pausing a paused one is a conflict."""
    core = Core()
    core.create(every="1h")
    with pytest.raises(Conflict, match="is not paused"):
        core.send("schedule.resume", name="s")
    core.send("schedule.pause", name="s")
    with pytest.raises(Conflict, match="paused already"):
        core.send("schedule.pause", name="s")


# -- fire now ---------------------------------------------------------------------------------


def test_fire_enqueues_once_now_and_leaves_the_clock_alone():
    """schedule.fire: a task for slot now, key schedule:s:<now>; the next slot is unchanged."""
    core = Core()
    core.create(every="1h")
    record = core.send("schedule.fire", name="s", when=T0 + 100)
    assert (record["schedule"], record["slot"], record["key"]) == (
        "s", rfc3339(T0 + 100), f"schedule:s:{rfc3339(T0 + 100)}")
    (event,) = [e for e in core.take() if type(e) is ScheduleFired]
    assert event.manual and event.next_slot == T0 + H
    assert core.schedule().next_slot == T0 + H


def test_fire_is_refused_under_overlap_skip_while_the_last_task_is_not_ended():
    """Under overlap skip, fire while the last firing's task is pending is a conflict."""
    core = Core()
    core.create(every="1h")
    core.send("schedule.fire", name="s", when=T0 + 100)
    core.take()
    with pytest.raises(Conflict, match="task 1 of its last firing is pending"):
        core.send("schedule.fire", name="s", when=T0 + 200)
    assert core.take() == []


def test_fire_under_replace_cancels_the_last_task_and_under_allow_adds_one():
    """fire under replace cancels the last firing's task; under allow both stay."""
    core = Core()
    core.create(name="r", every="1h", overlap="replace")
    core.create(name="a", every="1h", overlap="allow")
    for name in ("r", "a"):
        core.send("schedule.fire", name=name, when=T0 + 100)
        core.send("schedule.fire", name=name, when=T0 + 200)
    statuses = {(t.schedule, t.slot): t.status for t in core.queue.tasks.values()}
    assert statuses == {("r", T0 + 100): "cancelled", ("r", T0 + 200): "pending",
                        ("a", T0 + 100): "pending", ("a", T0 + 200): "pending"}


# -- update, delete and the schedules of sparkq.yml -------------------------------------------


def test_update_of_other_fields_keeps_the_slot_due_next():
    """A change that leaves the timing alone keeps the slot due next."""
    core = Core()
    core.create(every="1h")
    record = core.send("schedule.update", name="s", payload="new", priority=3, when=T0 + 600)
    assert (record["payload"], record["priority"]) == ("new", 3)
    assert record["next_slot"] == rfc3339(T0 + H)


def test_update_of_timing_starts_from_now_and_drops_the_other_timing():
    """Naming every drops cron and its zone; the next slot is the next one after now."""
    core = Core()
    core.create(cron="0 9 * * *", timezone="UTC")
    record = core.send("schedule.update", name="s", every="10m", when=T0 + 601)
    assert (record["cron"], record["timezone"], record["every"]) == (None, None, "10m")
    assert record["next_slot"] == rfc3339(T0 + 1200)  # still anchored at creation


def test_delete_removes_the_schedule_and_its_slots():
    """A deleted schedule fires nothing more and is not found."""
    core = Core()
    core.create(every="1h")
    assert core.send("schedule.delete", name="s") == {"deleted": "s"}
    assert core.run_until(T0 + DAY) == []
    with pytest.raises(NotFound, match="no schedule 's'"):
        core.send("schedule.show", name="s")


def file_specs(**named) -> dict:
    return {name: msgspec.convert(fields, sparkqd.ScheduleSpec) for name, fields in named.items()}


def test_sync_adds_changes_and_removes_the_schedules_of_sparkq_yml():
    """sync: new names are created (source config), changed ones changed, missing ones removed."""
    core = Core()
    core.create(name="mine", every="1h")
    schedules = core.queue.schedules
    assert schedules.sync(file_specs(a={"tool": "llm-haiku", "every": "1h"},
                                     b={"tool": "llm-haiku", "cron": "0 * * * *"}), T0) == []
    kinds = [type(e).__name__ for e in core.take()]
    assert kinds == ["ScheduleCreated", "ScheduleCreated"]
    assert {s.name: s.source for s in schedules.by_name.values()} == {
        "mine": "socket", "a": "config", "b": "config"}
    assert schedules.sync(file_specs(a={"tool": "llm-haiku", "every": "1h"},
                                     b={"tool": "llm-haiku", "cron": "0 * * * *"}), T0 + 5) == []
    assert core.take() == []  # a reload of the same file changes nothing
    schedules.sync(file_specs(a={"tool": "llm-haiku", "every": "1h", "payload": 2}), T0 + 10)
    assert [type(e).__name__ for e in core.take()] == ["ScheduleChanged", "ScheduleRemoved"]
    assert sorted(schedules.by_name) == ["a", "mine"]
    assert (schedules.by_name["a"].spec.payload, schedules.by_name["a"].next_slot) == (2, T0 + H)


def test_file_schedules_refuse_update_and_delete_but_may_be_paused_through_reloads():
    """A sparkq.yml schedule refuses update and delete; its pause survives a sync."""
    core = Core()
    core.queue.schedules.sync(file_specs(f={"tool": "llm-haiku", "every": "1h"}), T0)
    with pytest.raises(Conflict, match="sparkq.yml"):
        core.send("schedule.delete", name="f")
    with pytest.raises(Conflict, match="sparkq.yml"):
        core.send("schedule.update", name="f", payload=1)
    core.send("schedule.pause", name="f")
    core.queue.schedules.sync(file_specs(f={"tool": "llm-haiku", "every": "1h", "payload": 1}), T0)
    assert core.schedule("f").paused and core.schedule("f").spec.payload == 1


def test_sync_reports_a_file_schedule_it_cannot_apply():
    """A file schedule on an unknown stream is reported by name and not applied."""
    core = Core()
    problems = core.queue.schedules.sync(file_specs(x={"tool": "llm-haiku", "every": "1h",
                                                       "stream": "nowhere"}), T0)
    assert len(problems) == 1 and "'x'" in problems[0] and "nowhere" in problems[0]
    assert core.queue.schedules.by_name == {}


# -- bad input --------------------------------------------------------------------------------

BAD_SCHEDULES = {
    "bad-cron-field": ({"cron": "61 * * * *"}, BadRequest, "cron:"),
    "cron-fields-missing": ({"cron": "* * *"}, BadRequest, "cron:"),
    "cron-six-fields": ({"cron": "0 0 * * * *"}, BadRequest, "cron:"),
    "cron-impossible-date": ({"cron": "0 0 30 2 *"}, BadRequest, "cron:"),
    "unknown-macro": ({"cron": "@reboot"}, BadRequest, "cron:"),
    "unknown-timezone": ({"cron": "0 * * * *", "timezone": "Mars/Olympus"}, BadRequest,
                         "timezone:"),
    "timezone-path": ({"cron": "0 * * * *", "timezone": "../../etc/passwd"}, BadRequest,
                      "timezone:"),
    "timezone-without-cron": ({"every": "1h", "timezone": "UTC"}, BadRequest, "timezone:"),
    "cron-and-every": ({"cron": "0 * * * *", "every": "1h"}, BadRequest, "cron, every"),
    "every-and-at": ({"every": "1h", "at": "2030-01-01T00:00:00Z"}, BadRequest, "every, at"),
    "no-timing": ({}, BadRequest, "exactly one of cron, every or at"),
    "bad-every": ({"every": "5 parsecs"}, BadRequest, "every:"),
    "every-unit": ({"every": "5x"}, BadRequest, "every:"),
    "every-zero": ({"every": "0s"}, BadRequest, "every:"),
    "every-too-long": ({"every": "4000d"}, BadRequest, "every:"),
    "bad-at": ({"at": "tomorrow"}, BadRequest, "at:"),
    "at-without-offset": ({"at": "2030-01-01T00:00:00"}, BadRequest, "at:"),
    "bad-start_at": ({"every": "1h", "start_at": "soon"}, BadRequest, "start_at:"),
    "end-before-start": ({"every": "1h", "start_at": "2030-01-02T00:00:00Z",
                          "end_at": "2030-01-01T00:00:00Z"}, BadRequest, "end_at:"),
    "unknown-tool": ({"every": "1h", "tool": "nope"}, BadRequest, "unknown tool 'nope'"),
    "unknown-script": ({"every": "1h", "tool": None, "script": "nope"}, NotFound, "script 'nope'"),
    "tool-and-script": ({"every": "1h", "script": "x"}, BadRequest, "tool or script"),
    "bash-without-payload": ({"every": "1h", "tool": "run-bash"}, BadRequest, "payload"),
    "unknown-stream": ({"every": "1h", "stream": "nowhere"}, NotFound, "stream 'nowhere'"),
}


@pytest.mark.parametrize("case", list(BAD_SCHEDULES))
def test_bad_schedule_is_refused_naming_the_field_and_changes_nothing(case):
    """Each bad schedule is refused with an error naming the field; nothing is emitted."""
    fields, error, fragment = BAD_SCHEDULES[case]
    core = Core()
    with pytest.raises(error) as caught:
        core.send("schedule.create", **{"name": "s", "tool": "llm-haiku", **fields})
    assert fragment in str(caught.value)
    assert core.take() == [] and core.queue.schedules.by_name == {}


@pytest.mark.parametrize("fields,path", [
    ({"name": "has space"}, "$.name"), ({"name": ""}, "$.name"),
    ({"overlap": "sometimes"}, "$.overlap"), ({"catch_up": "most"}, "$.catch_up"),
    ({"jitter": -1}, "$.jitter"), ({"grace": "long"}, "$.grace"),
    ({"priority": 1 << 40}, "$.priority"), ({"max_attempts": 0}, "$.max_attempts"),
    ({"every": 0}, "$.every"), ({"cron": ""}, "$.cron"), ({"colour": "red"}, "colour")])
def test_bad_field_types_are_refused_by_the_decoder_naming_the_path(fields, path):
    """Values of the wrong type or range are refused at decoding, naming their path."""
    with pytest.raises(msgspec.ValidationError, match=path.replace("$", r"\$")):
        request("schedule.create", **{"name": "s", "tool": "llm-haiku", "every": "1h", **fields})


def test_update_refusals_change_nothing():
    """A refused update leaves the schedule as it was and emits nothing."""
    core = Core()
    core.create(every="1h")
    before = core.schedule()
    with pytest.raises(BadRequest, match="cron:"):
        core.send("schedule.update", name="s", cron="bad")
    with pytest.raises(NotFound, match="no schedule 'x'"):
        core.send("schedule.update", name="x", payload=1)
    assert core.take() == [] and core.schedule() == before


def test_names_are_unique_and_unknown_names_not_found():
    """A second schedule of one name is a conflict; an unknown name is not found."""
    core = Core()
    core.create(every="1h")
    with pytest.raises(Conflict, match="exists already"):
        core.send("schedule.create", name="s", tool="llm-haiku", every="2h")
    for op in ("schedule.delete", "schedule.pause", "schedule.resume", "schedule.fire",
               "schedule.show"):
        with pytest.raises(NotFound, match="no schedule 'x'"):
            core.send(op, name="x")


# -- what the replies show --------------------------------------------------------------------


def test_list_and_show_report_next_times_and_latest_firings_with_outcomes():
    """list and show give the next times and the latest firings with their tasks' outcomes."""
    core = Core()
    core.create(every="1h", overlap="allow", catch_up="all")
    core.tick_at(T0 + 2 * H)
    core.send("claim", tool="llm-haiku")
    core.send("complete", task=1)
    (listed,) = core.send("schedule.list")
    assert (listed["status"], listed["next_at"], listed["last_slot"], listed["last_task"],
            listed["last_outcome"], listed["fired"]) == (
        "active", rfc3339(T0 + 3 * H), rfc3339(T0 + 2 * H), 2, "pending", 2)
    shown = core.send("schedule.show", name="s", count=3)
    assert shown["next"] == [rfc3339(T0 + k * H) for k in (3, 4, 5)]
    assert [(f["slot"], f["task"], f["outcome"]) for f in shown["firings"]] == [
        (rfc3339(T0 + 2 * H), 2, "pending"), (rfc3339(T0 + H), 1, "completed")]


def test_replay_reproduces_every_schedule_and_task_field():
    """A mixed history replayed into a fresh queue gives the same schedules and tasks."""
    core = Core()
    core.create(name="a", every="1h", catch_up="all", overlap="replace", jitter=30)
    core.create(name="b", cron="*/20 * * * *", timezone="Europe/Berlin", catch_up="none")
    core.create(name="c", at=rfc3339(T0 + 1000))
    core.run_until(T0 + 2 * H)
    core.send("schedule.pause", name="b")
    core.send("schedule.fire", name="a")
    core.tick_at(T0 + DAY)
    core.send("schedule.resume", name="b")
    restarted = core.replayed()
    assert restarted.queue.schedules.by_name == core.queue.schedules.by_name
    assert restarted.queue.tasks == core.queue.tasks
    assert restarted.queue.next_deadline() == core.queue.next_deadline()


# -- what a firing would be refused for, refused before anything changes --------------------

WORKTREE_TOOL = sparkqd.parse_config("""
tools:
  agent: {task_class: FAST_SCRIPT, workspace: worktree}
  fixer: {task_class: FAST_SCRIPT}
""")


def test_a_schedule_whose_firings_would_be_refused_is_refused_at_create():
    """A tool that needs a repo it does not get, or an ended stream: bad_request at create."""
    core = Core(config=WORKTREE_TOOL)
    with pytest.raises(BadRequest, match="workspace worktree needs a repo"):
        core.send("schedule.create", name="s", tool="agent", every="1h")
    core.send("stream.create", name="gone", session="default")
    core.queue.stream_book.stream_end(request("stream.end", name="gone"), T0)
    with pytest.raises(Conflict, match="has ended"):
        core.send("schedule.create", name="t", tool="fixer", every="1h", stream="gone")
    assert not core.queue.schedules.by_name


def test_a_schedule_takes_a_repository_workspace_for_its_tasks():
    """repo and workspace of a schedule go to every task it fires."""
    core = Core(config=WORKTREE_TOOL)
    core.create(tool="agent", every="1h", repo="https://github.com/u/r.git", ref="main")
    core.tick_at(T0 + H)
    task = core.queue.tasks[core.schedule().last_task]
    assert (task.repo, task.ref, task.workspace) == ("https://github.com/u/r.git", "main",
                                                     "worktree")


def test_manual_fire_refused_for_an_ended_stream_changes_nothing():
    """schedule.fire that cannot enqueue is refused, and records no skip and cancels nothing."""
    core = Core()
    core.send("stream.create", name="w", session="default")
    core.create(every="1h", stream="w", overlap="replace")
    core.send("schedule.fire", name="s")
    first = core.schedule().last_task
    core.take()
    core.queue.stream_book.stream_end(request("stream.end", name="w"), T0)
    core.take()
    with pytest.raises(Conflict, match="has ended"):
        core.send("schedule.fire", name="s")
    assert core.take() == [] and core.queue.tasks[first].status == "pending"


def test_replace_keeps_the_running_task_when_the_new_one_cannot_be_enqueued():
    """Under overlap: replace, a firing whose enqueue is refused skips and cancels nothing."""
    core = Core()
    core.send("stream.create", name="w", session="default")
    core.create(every="1h", stream="w", overlap="replace")
    core.tick_at(T0 + H)
    first = core.schedule().last_task
    core.queue.stream_book.stream_end(request("stream.end", name="w"), T0 + H)
    events = core.tick_at(T0 + 2 * H)
    assert [(e.why.partition(":")[0]) for e in events if type(e) is ScheduleSkipped] == ["error"]
    assert core.queue.tasks[first].status == "pending"


def test_slots_end_before_year_10000():
    """A schedule whose slots run past year 9999 ends there: show and next answer, no error."""
    core = Core()
    core.create(cron="59 23 31 12 *", timezone="UTC", start_at="9999-12-31T00:00:00Z")
    shown = core.send("schedule.show", name="s")
    assert shown["next"] == ["9999-12-31T23:59:00.000Z"]
    assert core.send("schedule.next", cron="* * * * *", timezone="UTC", count=1000,
                     after="9999-12-31T23:58:00Z") == [
        {"at": "9999-12-31T23:59:00.000Z", "local": "9999-12-31T23:59:00+00:00"}]
    core.tick_at(sparkqd.LAST_TIME - 1)
    assert core.schedule().next_slot is None


def test_resume_after_a_long_pause_counts_the_slots_it_skips():
    """Resumed after 30 days paused, an every-second schedule skips them in one counted run."""
    core = Core()
    core.create(every="1s")
    core.send("schedule.pause", name="s")
    core.send("schedule.resume", name="s", when=T0 + 30 * DAY)
    (skip,) = [e for e in core.take() if type(e) is ScheduleSkipped]
    assert (skip.why, skip.slot, skip.last_slot, skip.count) == (
        "paused", T0 + 1, T0 + 30 * DAY, 30 * DAY)
