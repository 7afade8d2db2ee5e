"""Seeing what the queue does (issue 6): watch, top, metrics, history, hooks, completion.

Every test runs a real sparkqd and looks at it the way its users do: a raw
subscriber on the socket, `sparkqctl watch` in a shell pipe, `sparkqctl top` in
a real 80x24 terminal (tmux), the metrics text checked against the Prometheus
exposition rules by a parser written here, `history` through the command line,
finish hooks that write what they were told to files, and the completion
scripts loaded by bash. Tasks are driven by the test as an agent would
(enqueue, claim, touch, complete, fail) unless a test needs the daemon's own
workers. Tests poll with a timeout; none sleeps to wait for something.
"""

import collections
import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import SPARKQCTL, wait_until

#: Agent tasks get two attempts and a 0.1 s back-off; run-bash is there for the daemon's workers.
CONFIG = """
task_classes:
  quick: {timeout: 20, max_attempts: 2, retry_backoff: 0.1, retry_backoff_max: 0.2}
tools:
  agent: {task_class: quick, description: claimed by the test}
  run-bash: {task_class: quick, command: [bash, -c]}
"""

CTL = " ".join(map(shlex.quote, SPARKQCTL))
RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


# -- helpers: the queue ---------------------------------------------------------------------


def observed(make_daemon, extra="", **options):
    """A daemon on CONFIG plus ``extra`` config sections."""
    return make_daemon(config=CONFIG + extra, **options)


def two_sessions(daemon) -> None:
    """Session web holds stream frontend; session ml holds stream training."""
    for session, stream in (("web", "frontend"), ("ml", "training")):
        daemon.ok(op="session.create", name=session)
        daemon.ok(op="stream.create", name=stream, session=session)


def enqueue(daemon, stream="default", **fields) -> int:
    """Enqueue an agent task; return its id."""
    return daemon.ok(op="enqueue", tool="agent", stream=stream, **fields)["id"]


def claim(daemon, stream="default", worker="agent-1") -> dict:
    """Claim the next task of ``stream`` as ``worker``; it must exist."""
    task = daemon.ok(op="claim", stream=stream, worker=worker)
    assert task is not None, f"nothing to claim in {stream}"
    return task


def finish(daemon, stream="default", outcome="completed") -> int:
    """One agent task of ``stream`` taken to ``outcome``; return its id."""
    task_id = enqueue(daemon, stream, max_attempts=1)
    if outcome == "cancelled":
        daemon.ok(op="cancel", task=task_id)
        return task_id
    assert claim(daemon, stream)["id"] == task_id
    if outcome == "completed":
        daemon.ok(op="complete", task=task_id, summary="built fine")
    else:
        daemon.ok(op="fail", task=task_id, reason="tests broke")
    return task_id


def paused(daemon, stream) -> bool:
    return next(s for s in daemon.ok(op="stream.list") if s["name"] == stream)["paused"]


def pipeline(conn, requests: list[dict]) -> list[dict]:
    """Send every request from a thread while reading the replies (no deadlock on full buffers)."""
    writer = threading.Thread(target=conn.send_raw, args=(b"".join(map(conn.frame, requests)),))
    writer.start()
    replies = [conn.recv() for _ in requests]
    writer.join()
    assert all(reply["ok"] for reply in replies), next(r for r in replies if not r["ok"])
    return replies


BURST = 2000


def enqueue_rate(daemon, payload="x") -> float:
    """Enqueues per second: BURST pipelined agent enqueues on one fresh connection."""
    conn = daemon.connect()
    started = time.perf_counter()
    pipeline(conn, [{"op": "enqueue", "tool": "agent", "payload": payload}] * BURST)
    elapsed = time.perf_counter() - started
    conn.close()
    return BURST / elapsed


# -- helpers: watching ------------------------------------------------------------------------


def watcher(daemon, framing="json", **filters):
    """A connection subscribed with ``filters``, its ok reply already read."""
    conn = daemon.connect(framing)
    reply = conn.call(op="watch", **filters)
    assert reply["ok"], reply
    return conn


def drain(conn, quiet=0.5) -> list[dict]:
    """Every message that arrives until none has come for ``quiet`` seconds."""
    conn.sock.settimeout(quiet)
    messages = []
    with contextlib.suppress(TimeoutError):
        while True:
            messages.append(conn.recv())
    conn.sock.settimeout(10)
    return messages


def subscribers(daemon) -> float:
    return sample(parse_metrics(daemon.ok(op="metrics")), "sparkq_subscribers")


# -- helpers: the Prometheus text format --------------------------------------------------------

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
VALUE = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?Inf|NaN"
SAMPLE_LINE = re.compile(rf"(?P<name>{METRIC_NAME})(?:\{{(?P<labels>{LABEL}(?:,{LABEL})*)?\}})?"
                         rf" (?P<value>{VALUE})(?: -?\d+)?")
DESCRIPTOR_LINE = re.compile(rf"# (?P<keyword>HELP|TYPE) (?P<name>{METRIC_NAME})(?: (?P<rest>.*))?")
LABEL_PARTS = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"'
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_metrics(text: str) -> dict[str, dict]:
    """Metric families by name, each line checked against the exposition format as it is read."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families, current, seen = {}, None, set()
    for line in text.splitlines():
        if line.startswith("#"):
            if match := DESCRIPTOR_LINE.fullmatch(line):
                family = families.setdefault(match["name"], {"samples": []})
                keyword = match["keyword"].lower()
                assert keyword not in family and not family["samples"], f"misplaced: {line!r}"
                assert keyword == "help" or match["rest"] in TYPES, f"unknown type: {line!r}"
                family[keyword] = match["rest"]
                current = match["name"]
            continue
        match = SAMPLE_LINE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name = family_of(match["name"], families)
        assert name == current, f"{match['name']} is not grouped under its # HELP and # TYPE"
        assert {"help", "type"} <= families[name].keys(), f"{name} lacks # HELP or # TYPE"
        labels = dict(re.findall(LABEL_PARTS, match["labels"] or ""))
        assert (match["name"], tuple(sorted(labels.items()))) not in seen, f"duplicate: {line!r}"
        seen.add((match["name"], tuple(sorted(labels.items()))))
        families[name]["samples"].append((match["name"], labels, float(match["value"])))
    for name, family in families.items():
        if family.get("type") == "histogram":
            check_histogram(name, family["samples"])
    return families


def family_of(sample_name: str, families: dict) -> str:
    """The family a sample belongs to: itself, or a histogram's _bucket/_sum/_count."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample_name.removesuffix(suffix)
        if base != sample_name and families.get(base, {}).get("type") in ("histogram", "summary"):
            return base
    return sample_name


def check_histogram(name: str, samples: list) -> None:
    """Buckets cumulative with rising bounds, ending at +Inf equal to _count; a _sum present."""
    series = {}
    for sample_name, labels, value in samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        series.setdefault(key, {"buckets": []})
        if sample_name == name + "_bucket":
            series[key]["buckets"].append((float(labels["le"]), value, labels["le"]))
        else:
            series[key][sample_name.removeprefix(name)] = value
    for key, parts in series.items():
        bounds, counts, last = zip(*parts["buckets"])
        assert list(bounds) == sorted(set(bounds)) and last[-1] == "+Inf", f"{name} bounds {last}"
        assert list(counts) == sorted(counts), f"{name} buckets not cumulative: {counts}"
        assert counts[-1] == parts["_count"] and "_sum" in parts, f"{name}: {counts[-1]}, {parts}"


def sample(families: dict, name: str, **labels) -> float:
    """The value of one sample; a histogram's _count and _sum are found under the histogram."""
    for sample_name, sample_labels, value in families[family_of(name, families)]["samples"]:
        if sample_name == name and sample_labels == labels:
            return value
    raise AssertionError(f"no sample {name}{labels}")


# -- helpers: top in a terminal ---------------------------------------------------------------


class Terminal:
    """A command in a detached 80x24 tmux pane: what a person sees, and their keys."""

    def __init__(self, server: list[str], name: str):
        self.server, self.name = server, name

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J").stdout

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", *keys)

    def shows(self, predicate, timeout=10.0) -> str:
        """Wait until the screen satisfies ``predicate``; return it."""
        return wait_until(lambda: predicate(screen := self.screen()) and screen, timeout, 0.05,
                          message=f"the screen to change; it shows:\n{self.screen()}")

    def alive(self) -> bool:
        return self._tmux("has-session").returncode == 0

    def _tmux(self, command: str, *args: str):
        return subprocess.run([*self.server, command, "-t", self.name, *args],
                              capture_output=True, text=True, timeout=10)


@contextlib.contextmanager
def top_in_tmux(daemon):
    """`sparkqctl top` in a real 80x24 terminal, on a tmux server of its own."""
    server = ["tmux", "-S", str(daemon.workdir / "tmux.sock")]
    name = f"sparkq-top-{os.getpid()}"
    command = f"SPARKQ_SOCKET={shlex.quote(str(daemon.socket))} {CTL} top"
    subprocess.run([*server, "new-session", "-d", "-x", "80", "-y", "24", "-s", name, command],
                   check=True, env=daemon.env, timeout=10)
    try:
        yield Terminal(server, name)
    finally:
        subprocess.run([*server, "kill-session", "-t", name], capture_output=True, timeout=10)
        subprocess.run([*server, "kill-server"], capture_output=True, timeout=10)


COUNT_COLUMNS = ("pending", "waiting", "running", "completed", "failed", "per_minute")


def stream_row(screen: str, name: str) -> dict | None:
    """A stream's row on the top screen: its counts, whether it is selected or paused."""
    for line in screen.splitlines():
        words = line.lstrip("> ").split()
        if words[:1] == [name] and len(words) >= 8 and all(w.isdigit() for w in words[2:8]):
            return {"selected": line.startswith(">"), "paused": "paused" in words[8:],
                    **dict(zip(COUNT_COLUMNS, map(int, words[2:8])))}
    return None


def section(screen: str, title: str) -> list[str]:
    """The lines under a top heading such as "LOCKS (1)", up to the next heading."""
    lines = screen.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title + " ("))
    rows = []
    for line in lines[start + 1:]:
        if re.fullmatch(r"[A-Z][A-Z ]* \(\d+\)\s*", line) or line.startswith("q quit"):
            break
        rows.append(line)
    return rows


def busy_queue(daemon) -> dict:
    """Stream build with a running task holding a lock, a failure and a pending task;
    an empty stream; an ended one. Returns the running task."""
    daemon.ok(op="session.create", name="proj")
    for stream in ("build", "empty", "gone"):
        daemon.ok(op="stream.create", name=stream, session="proj")
    daemon.ok(op="stream.end", name="gone")
    enqueue(daemon, "build", lock="repo")
    running = claim(daemon, "build")
    broken = enqueue(daemon, "build", max_attempts=1)
    claim(daemon, "build", worker="agent-2")
    daemon.ok(op="fail", task=broken, reason="compiler exploded")
    enqueue(daemon, "build")
    return running


# -- helpers: processes and shells ----------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def hook_config(argv: list[str]) -> str:
    return f"hooks: {{on_finish: {json.dumps(argv)}, timeout: 1}}\n"


def hook_env(path: Path) -> dict[str, str]:
    """The SPARKQ_ variables a hook saved to ``path``, once it is there."""
    wait_until(path.exists, message=f"the hook to write {path.name}")
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def path_with_sparkqctl(workdir: Path) -> str:
    """A PATH whose first `sparkqctl` runs this checkout (completion scripts call it by name)."""
    bindir = workdir / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "sparkqctl"
    wrapper.write_text(f'#!/bin/sh\nexec {CTL} "$@"\n')
    wrapper.chmod(0o755)
    return f"{bindir}:{os.environ['PATH']}"


def bash_offers(daemon, workdir, *command_lines: str) -> list[str]:
    """What bash's _sparkqctl offers for each command line, whose last word is being completed."""
    script = (f"source <({CTL} completion bash)\n"
              "offer() { COMP_WORDS=(\"$@\"); COMP_CWORD=$(($# - 1)); _sparkqctl; "
              'echo "${COMPREPLY[*]}"; }\n' + "".join(f"offer {line}\n" for line in command_lines))
    env = {**daemon.env, "PATH": path_with_sparkqctl(workdir)}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def history(daemon, *args) -> list[int]:
    """Task ids of `sparkqctl history --json ARGS`, in the order printed."""
    out = daemon.ctl("history", "--json", *args)
    assert out.returncode == 0, out.stderr
    return [record["id"] for record in json.loads(out.stdout)]


# -- watch: what a subscriber sees ------------------------------------------------------------

#: (event, task status) of a task that fails once, waits out its back-off and then completes.
LIFE_WITH_A_RETRY = [
    ("task.created", "pending"), ("task.claimed", "running"), ("task.touched", "running"),
    ("task.retrying", "waiting"), ("task.pending", "pending"), ("task.claimed", "running"),
    ("task.completed", "completed")]


def shaped(message: dict, body: str) -> bool:
    """Whether an event message is exactly {event, at (RFC 3339 UTC, ms), seq, ``body``}."""
    return (message.keys() == {"event", "at", "seq", body} and isinstance(message["seq"], int)
            and bool(RFC3339_MS.fullmatch(message["at"])))


def test_watch_full_task_life_with_a_retry_in_order(make_daemon):
    """A subscriber sees every step of a task retried once, in order, each with the full record."""
    daemon = observed(make_daemon)
    conn = watcher(daemon)
    task_id = enqueue(daemon)
    claim(daemon)
    daemon.ok(op="touch", task=task_id)
    daemon.ok(op="fail", task=task_id, reason="flaky network")
    seen = [conn.recv() for _ in range(5)]  # the fifth, task.pending, follows the 0.1 s back-off
    claim(daemon)
    daemon.ok(op="complete", task=task_id, summary="done")
    seen += [conn.recv(), conn.recv()]
    assert [(m["event"], m["task"]["status"]) for m in seen] == LIFE_WITH_A_RETRY
    record_fields = daemon.ok(op="task", task=task_id).keys() - {"history"}
    assert all(shaped(m, "task") and m["task"].keys() == record_fields for m in seen)
    assert {m["task"]["id"] for m in seen} == {task_id}
    assert seen[3]["task"]["reason"] == "flaky network" and seen[6]["task"]["attempts"] == 2


def test_watch_reports_cancel_and_final_failure_with_attempts_and_reason(make_daemon):
    """A cancel arrives as task.cancelled; a last failed attempt as task.failed with its reason."""
    daemon = observed(make_daemon)
    doomed, broken = enqueue(daemon), enqueue(daemon, max_attempts=1)
    conn = watcher(daemon, events=["task.cancelled", "task.failed"])
    daemon.ok(op="cancel", task=doomed)
    assert claim(daemon)["id"] == broken
    daemon.ok(op="fail", task=broken, reason="disk full")
    cancelled, failed = conn.recv(), conn.recv()
    assert (cancelled["event"], cancelled["task"]["id"], cancelled["task"]["status"]) == (
        "task.cancelled", doomed, "cancelled")
    assert (failed["event"], failed["task"]["id"], failed["task"]["status"]) == (
        "task.failed", broken, "failed")
    assert (failed["task"]["attempts"], failed["task"]["reason"]) == (1, "disk full")


def test_watch_reports_stream_paused_and_resumed(make_daemon):
    """Pausing and resuming a stream send stream.paused and stream.resumed with its record."""
    daemon = observed(make_daemon)
    conn = watcher(daemon)
    daemon.ok(op="stream.pause", name="default")
    daemon.ok(op="stream.resume", name="default")
    paused_event, resumed_event = conn.recv(), conn.recv()
    assert shaped(paused_event, "stream") and shaped(resumed_event, "stream")
    assert [(e["event"], e["stream"]["name"], e["stream"]["paused"])
            for e in (paused_event, resumed_event)] == [
        ("stream.paused", "default", True), ("stream.resumed", "default", False)]


def test_watch_reload_sends_config_reloaded_then_worker_started(make_daemon):
    """A reload raising workers.count to 2 sends config.reloaded, then worker.started for slot 2."""
    daemon = observed(make_daemon, workers=1)
    conn = watcher(daemon)
    daemon.config_path.write_text(CONFIG + "workers: {count: 2}\n")
    daemon.ok(op="reload")
    reloaded, started = conn.recv(), conn.recv()
    assert shaped(reloaded, "config") and shaped(started, "worker")
    assert reloaded["event"] == "config.reloaded" and "agent" in reloaded["config"]["tools"]
    assert (started["event"], started["worker"]["name"]) == ("worker.started", "sparkqd/2")


def test_watch_reports_worker_restarted_when_a_worker_loop_dies(make_daemon):
    """A worker that cannot open a task's log (logs/ is a file) dies: worker.restarted arrives."""
    daemon = observed(make_daemon, workers=1)
    logs = daemon.data_dir / "logs"
    shutil.rmtree(logs)
    logs.write_text("not a directory")
    conn = watcher(daemon, events=["worker.restarted"])
    daemon.ok(op="enqueue", tool="run-bash", payload="true")
    restarted = conn.recv()
    assert shaped(restarted, "worker") and restarted["event"] == "worker.restarted"
    assert restarted["worker"]["name"] == "sparkqd/1" and restarted["worker"]["restarts"] >= 1


@pytest.mark.parametrize("filters", [{"streams": ["training"]}, {"sessions": ["ml"]}],
                         ids=["streams", "sessions"])
def test_watch_stream_and_session_filters_leave_out_other_streams(make_daemon, filters):
    """Watching stream training (or session ml), a task.created in frontend does not arrive."""
    daemon = observed(make_daemon)
    two_sessions(daemon)
    conn = watcher(daemon, **filters)
    enqueue(daemon, "frontend")
    wanted = enqueue(daemon, "training")
    first = conn.recv()
    assert (first["event"], first["task"]["id"]) == ("task.created", wanted)


def test_watch_task_filter_leaves_out_other_tasks(make_daemon):
    """Watching one task, the cancel of another task does not arrive."""
    daemon = observed(make_daemon)
    other, wanted = enqueue(daemon), enqueue(daemon)
    conn = watcher(daemon, tasks=[wanted])
    daemon.ok(op="cancel", task=other)
    daemon.ok(op="cancel", task=wanted)
    first = conn.recv()
    assert (first["event"], first["task"]["id"]) == ("task.cancelled", wanted)


def test_watch_event_filter_leaves_out_other_event_types(make_daemon):
    """Watching task.completed only, the task.created and task.claimed before it do not arrive."""
    daemon = observed(make_daemon)
    conn = watcher(daemon, events=["task.completed"])
    done = finish(daemon)
    first = conn.recv()
    assert (first["event"], first["task"]["id"]) == ("task.completed", done)


def test_watch_stuck_subscriber_gets_lagged_and_other_clients_keep_their_pace(make_daemon):
    """A stuck subscriber gets one lagged counting exactly what it lost as soon as it reads
    again, before any new event; others keep pace meanwhile."""
    daemon = observed(make_daemon)
    unstuck_rate = enqueue_rate(daemon)
    stuck = watcher(daemon)
    enqueue_rate(daemon, payload="x" * 20_000)  # 2,000 events of 20 KB it never reads
    stuck_rate = enqueue_rate(daemon)
    # A generous bound, as the machine is noisy: at least 30% of the pace with no subscriber.
    assert stuck_rate >= 0.3 * unstuck_rate, f"{stuck_rate:.0f}/s stuck, {unstuck_rate:.0f}/s not"
    *delivered, lagged = drain(stuck)
    assert {m["event"] for m in delivered} == {"task.created"} and len(delivered) < 2 * BURST
    assert lagged == {"event": "lagged", "missed": 2 * BURST - len(delivered)}
    marker = enqueue(daemon)
    resumed = stuck.recv()
    assert (resumed["event"], resumed["task"]["id"]) == ("task.created", marker)


def test_watch_subscriber_that_keeps_reading_misses_nothing_in_a_burst(make_daemon):
    """A subscriber reading all along gets every event of 1,500 pipelined enqueues, no lagged."""
    daemon = observed(make_daemon)
    conn = watcher(daemon)
    received = []
    reader = threading.Thread(target=lambda: received.extend(drain(conn, quiet=2.0)))
    reader.start()
    pipeline(daemon.connect(), [{"op": "enqueue", "tool": "agent"}] * 1500)
    reader.join()
    assert collections.Counter(m["event"] for m in received) == {"task.created": 1500}


def test_watch_on_a_msgpack_connection_sends_msgpack_events(make_daemon):
    """A subscriber speaking length-prefixed msgpack gets its events as msgpack maps too."""
    daemon = observed(make_daemon)
    conn = watcher(daemon, framing="msgpack")
    task_id = enqueue(daemon)
    event = conn.recv()
    assert shaped(event, "task")
    assert (event["event"], event["task"]["id"]) == ("task.created", task_id)


READ_TWO = 'while read -r ev; do echo "got:$ev"; n=$((n + 1)); [ $n = 2 ] && break; done'


def test_watch_through_a_shell_pipe_prints_one_flushed_json_line_per_event(make_daemon):
    """`sparkqctl watch --stream training | while read -r ev` gets each event as a JSON line."""
    daemon = observed(make_daemon)
    two_sessions(daemon)
    shell = subprocess.Popen(["bash", "-c", f"{CTL} watch --stream training | {READ_TWO}"],
                             env=daemon.env, stdout=subprocess.PIPE, text=True)
    wait_until(lambda: subscribers(daemon) == 1, message="the watcher to subscribe")
    enqueue(daemon, "frontend")
    wanted = [enqueue(daemon, "training"), enqueue(daemon, "training")]
    lines = [shell.stdout.readline(), shell.stdout.readline()]  # the watcher runs on: flushed
    assert [(line[:4], json.loads(line[4:])["task"]["id"]) for line in lines] == [
        ("got:", task_id) for task_id in wanted]
    assert shell.poll() is None


def test_watch_exits_at_its_next_event_once_its_reader_has_gone(make_daemon):
    """Once its pipe's reader has gone, `sparkqctl watch` exits 0 and its subscription ends."""
    daemon = observed(make_daemon)
    shell = subprocess.Popen(["bash", "-c", f"{CTL} watch | {READ_TWO}"], env=daemon.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: subscribers(daemon) == 1, message="the watcher to subscribe")
    wait_until(lambda: enqueue(daemon) and shell.poll() is not None, interval=0.2,
               message="the watcher to exit")
    assert (shell.returncode, shell.stderr.read()) == (0, "")
    wait_until(lambda: subscribers(daemon) == 0, message="the subscription to end")


# -- top --------------------------------------------------------------------------------------


def test_top_in_a_terminal_shows_streams_running_locks_workers_and_failures(make_daemon):
    """In 80x24, top shows open streams with counts, running tasks, locks, workers, failures."""
    daemon = observed(make_daemon, workers=1)
    running = busy_queue(daemon)
    with top_in_tmux(daemon) as term:
        screen = term.shows(lambda s: stream_row(s, "build") and "RECENT FAILURES" in s)
    assert {k: stream_row(screen, "build")[k] for k in COUNT_COLUMNS} == {
        "pending": 1, "waiting": 0, "running": 1, "completed": 0, "failed": 1, "per_minute": 1}
    assert stream_row(screen, "empty")["pending"] == 0 and stream_row(screen, "default")
    assert "gone" not in screen  # an ended stream
    assert any(re.search(rf"\b{running['id']} +build +agent +agent-1 .*lease +(39|40)s", row)
               for row in section(screen, "RUNNING"))  # lease: stale.factor 2 x timeout 20 s
    assert any(f"repo{' ' * 10}" in row and f"task {running['id']}" in row
               for row in section(screen, "LOCKS"))
    workers = "\n".join(section(screen, "WORKERS"))
    assert re.search(r"sparkqd/1 .* idle", workers) and re.search(r"agent-1 .* busy", workers)
    assert any("compiler exploded" in row for row in section(screen, "RECENT FAILURES"))
    assert max(len(line) for line in screen.splitlines()) <= 80


def test_top_redraws_when_a_task_is_enqueued_and_completed(make_daemon):
    """top holds a subscription, and its counts change on screen as a task is enqueued and done."""
    daemon = observed(make_daemon)
    busy_queue(daemon)
    with top_in_tmux(daemon) as term:
        term.shows(lambda s: (stream_row(s, "empty") or {}).get("pending") == 0)
        assert subscribers(daemon) == 1
        task_id = enqueue(daemon, "empty")
        term.shows(lambda s: stream_row(s, "empty")["pending"] == 1, timeout=5)
        claim(daemon, "empty")
        daemon.ok(op="complete", task=task_id)
        term.shows(lambda s: stream_row(s, "empty")["completed"] == 1, timeout=5)
        assert stream_row(term.screen(), "empty")["per_minute"] == 1


def test_top_keys_select_pause_resume_and_quit(make_daemon):
    """Down selects the next stream, p pauses it and p again resumes it, q quits top."""
    daemon = observed(make_daemon)
    busy_queue(daemon)
    with top_in_tmux(daemon) as term:
        term.shows(lambda s: (stream_row(s, "default") or {}).get("selected"))
        term.keys("Down")
        term.shows(lambda s: stream_row(s, "build")["selected"]
                   and not stream_row(s, "default")["selected"])
        term.keys("p")
        wait_until(lambda: paused(daemon, "build"), message="build to pause")
        term.shows(lambda s: stream_row(s, "build")["paused"])
        term.keys("p")
        wait_until(lambda: not paused(daemon, "build"), message="build to resume")
        term.keys("q")
        wait_until(lambda: not term.alive(), message="top to quit")


def test_top_without_a_terminal_prints_one_plain_snapshot(make_daemon):
    """`sparkqctl top | cat` prints the screen once as plain lines naming each open stream,
    with no escape codes, no `>` cursor and no key help, and exits 0."""
    daemon = observed(make_daemon)
    busy_queue(daemon)
    out = subprocess.run(["bash", "-c", f"{CTL} top | cat"], env=daemon.env,
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stderr) == (0, "") and "\x1b" not in out.stdout
    assert "STREAM" in out.stdout and "RECENT FAILURES (1)" in out.stdout
    assert all(stream_row(out.stdout, name) for name in ("default", "build", "empty"))
    assert not any(line.startswith(">") for line in out.stdout.splitlines())
    assert "q quit" not in out.stdout


# -- metrics ----------------------------------------------------------------------------------

#: Every family the issue asks for, with its Prometheus type.
METRIC_FAMILIES = {
    "sparkq_tasks": "gauge", "sparkq_tasks_finished_total": "counter",
    "sparkq_enqueued_total": "counter", "sparkq_claimed_total": "counter",
    "sparkq_queue_wait_seconds": "histogram", "sparkq_run_seconds": "histogram",
    "sparkq_journal_fsync_seconds": "histogram", "sparkq_snapshot_duration_seconds": "gauge",
    "sparkq_snapshot_age_seconds": "gauge", "sparkq_workers": "gauge",
    "sparkq_worker_restarts_total": "counter", "sparkq_subscribers": "gauge",
    "sparkq_uptime_seconds": "gauge",
}

#: What 3 enqueues, 2 claims, a completion and a failure add to these counters.
WORK_DONE = {"sparkq_enqueued_total": 3, "sparkq_claimed_total": 2,
             "sparkq_queue_wait_seconds_count": 2, "sparkq_run_seconds_count": 2}


def test_metrics_command_prints_valid_prometheus_text_with_every_family(make_daemon):
    """`sparkqctl metrics` follows the exposition format and has every family the issue names."""
    daemon = observed(make_daemon, workers=1)
    two_sessions(daemon)
    finish(daemon, "frontend", "completed")
    finish(daemon, "training", "failed")
    out = daemon.ctl("metrics")
    families = parse_metrics(out.stdout)
    assert out.returncode == 0
    assert {name: families[name]["type"] for name in METRIC_FAMILIES} == METRIC_FAMILIES
    assert sample(families, "sparkq_tasks", stream="frontend", status="completed") == 1
    assert sample(families, "sparkq_workers", state="idle") == 1


def test_metrics_count_the_work_done(make_daemon):
    """3 enqueues, 2 claims, a completion and a failure move each metric by exactly that."""
    daemon = observed(make_daemon)
    before = parse_metrics(daemon.ok(op="metrics"))
    finish(daemon), finish(daemon, outcome="failed"), enqueue(daemon)
    conn = watcher(daemon)
    after = parse_metrics(daemon.ok(op="metrics"))
    assert {name: sample(after, name) - sample(before, name) for name in WORK_DONE} == WORK_DONE
    assert [sample(after, "sparkq_tasks_finished_total", stream="default", outcome=outcome)
            for outcome in ("completed", "failed")] == [1, 1]
    assert sample(after, "sparkq_tasks", stream="default", status="pending") == 1
    fsyncs = "sparkq_journal_fsync_seconds_count"
    assert sample(after, fsyncs) > sample(before, fsyncs)
    assert sample(after, "sparkq_subscribers") == 1 and sample(after, "sparkq_uptime_seconds") > 0
    conn.close()


def test_metrics_snapshot_gauges_follow_the_snapshots(make_daemon):
    """With a snapshot every 0.3 s, the snapshot duration turns positive and its age stays < 1 s."""
    daemon = observed(make_daemon, extra="database: {snapshot_interval: 0.3}\n")
    enqueue(daemon)
    families = wait_until(lambda: (f := parse_metrics(daemon.ok(op="metrics")))
                          and sample(f, "sparkq_snapshot_duration_seconds") > 0 and f,
                          message="a snapshot to be measured")
    assert 0 <= sample(families, "sparkq_snapshot_age_seconds") < 1.0


def test_metrics_textfile_is_refreshed_and_replaced_atomically(make_daemon, workdir):
    """metrics.textfile follows the queue, never reads as half a file, and leaves no temp file."""
    target = workdir / "textfile" / "sparkq.prom"
    target.parent.mkdir()
    daemon = observed(make_daemon, extra=f"metrics: {{textfile: {target}, interval: 0.2}}\n")
    wait_until(target.exists, message="the textfile to appear")
    enqueue(daemon)
    wait_until(lambda: sample(parse_metrics(target.read_text()), "sparkq_enqueued_total") == 1,
               message="the textfile to count the enqueue")
    reads, deadline = [], time.monotonic() + 1.0
    while time.monotonic() < deadline:  # about 200 reads while it is rewritten every 0.2 s
        reads.append(target.read_text())
        time.sleep(0.005)
    assert len(set(reads)) >= 2 and all("sparkq_uptime_seconds" in parse_metrics(r) for r in reads)
    assert daemon.stop() == 0 and os.listdir(target.parent) == ["sparkq.prom"]


# -- history ----------------------------------------------------------------------------------


def test_history_lists_ended_tasks_newest_first_with_wait_and_run_times(make_daemon):
    """history lists ended tasks newest first, with waited and duration for those that ran."""
    daemon = observed(make_daemon)
    done, broken = finish(daemon), finish(daemon, outcome="failed")
    dropped = finish(daemon, outcome="cancelled")
    enqueue(daemon)
    records = daemon.ok(op="history")
    assert [(r["id"], r["status"]) for r in records] == [
        (dropped, "cancelled"), (broken, "failed"), (done, "completed")]
    assert all(r["waited"] >= 0 and r["duration"] >= 0 for r in records[1:])
    assert (records[0]["waited"], records[0]["duration"]) == (None, None)
    table = daemon.ctl("history").stdout.splitlines()
    assert table[0].split()[:6] == ["ID", "STREAM", "TOOL", "STATUS", "WAITED", "RAN"]
    assert [int(row.split()[0]) for row in table[1:]] == [dropped, broken, done]


def test_history_filters_by_stream_session_status_and_limit(make_daemon):
    """--stream, --session, --status and --limit each narrow the history, newest first."""
    daemon = observed(make_daemon)
    two_sessions(daemon)
    front_done = finish(daemon, "frontend", "completed")
    front_broken = finish(daemon, "frontend", "failed")
    training_done = finish(daemon, "training", "completed")
    assert history(daemon, "--stream", "frontend") == [front_broken, front_done]
    assert history(daemon, "--session", "ml") == [training_done]
    assert history(daemon, "--status", "completed") == [training_done, front_done]
    assert history(daemon, "--limit", "2") == [training_done, front_broken]


def test_history_since_takes_an_rfc3339_time_or_a_duration(make_daemon):
    """--since keeps tasks ended at or after an RFC 3339 time, or within a duration like 1h."""
    daemon = observed(make_daemon)
    old = finish(daemon)
    cutoff = datetime.datetime.now(datetime.timezone.utc)  # after old ended, before new does
    new = finish(daemon)
    assert history(daemon, "--since", cutoff.isoformat()) == [new]
    assert history(daemon, "--since", cutoff.isoformat().replace("+00:00", "Z")) == [new]
    assert history(daemon, "--since", "1h") == history(daemon, "--since", "30m") == [new, old]
    assert history(daemon, "--since", (cutoff + datetime.timedelta(hours=1)).isoformat()) == []


def test_history_survives_a_restart(make_daemon):
    """After a restart, history lists the same tasks with the same times."""
    daemon = observed(make_daemon)
    finish(daemon)
    finish(daemon, outcome="failed")
    before = daemon.ok(op="history")
    daemon.restart()
    assert daemon.ok(op="history") == before


def test_history_answers_1000_records_fast(make_daemon):
    """1,000 records come back in < 1 s (generous for a noisy machine; the target is < 100 ms)."""
    daemon = observed(make_daemon)
    conn = daemon.connect()
    ids = [r["result"]["id"] for r in pipeline(conn, [{"op": "enqueue", "tool": "agent"}] * 1000)]
    pipeline(conn, [r for i in ids for r in ({"op": "claim"}, {"op": "complete", "task": i})])
    started = time.perf_counter()
    records = conn.ok(op="history", limit=1000)
    elapsed = time.perf_counter() - started
    assert [r["id"] for r in records] == ids[::-1] and elapsed < 1.0, f"{elapsed:.3f} s"


# -- finish hooks -----------------------------------------------------------------------------

#: The variables of an ended task a hook sees, in the order the tests list them.
HOOK_VARIABLES = ("SPARKQ_TASK_ID", "SPARKQ_STATUS", "SPARKQ_STREAM", "SPARKQ_SESSION",
                  "SPARKQ_TOOL", "SPARKQ_SUMMARY", "SPARKQ_REASON")


def test_on_finish_hook_gets_the_ended_task_in_its_environment(make_daemon, workdir):
    """hooks.on_finish runs for a completed and a failed task with that task's SPARKQ_ variables."""
    out = workdir / "hooks"
    out.mkdir()
    save = f"cd {out}; env | grep ^SPARKQ_ > $SPARKQ_TASK_ID.tmp && mv $SPARKQ_TASK_ID.{{tmp,env}}"
    daemon = observed(make_daemon, extra=hook_config(["bash", "-c", save]))
    two_sessions(daemon)
    done, broken = finish(daemon, "frontend", "completed"), finish(daemon, "training", "failed")
    seen = {task_id: hook_env(out / f"{task_id}.env") for task_id in (done, broken)}
    assert [seen[done][name] for name in HOOK_VARIABLES] == [
        str(done), "completed", "frontend", "web", "agent", "built fine", ""]
    assert [seen[broken][name] for name in HOOK_VARIABLES] == [
        str(broken), "failed", "training", "ml", "agent", "", "tests broke"]
    ran = {r["id"]: r["duration"] for r in daemon.ok(op="history")}
    assert all(abs(float(seen[t]["SPARKQ_DURATION"]) - ran[t]) <= 0.001 for t in (done, broken))


def test_on_finish_hook_that_hangs_is_killed_at_its_timeout(make_daemon, workdir):
    """A hook still running at hooks.timeout (1 s) is killed; the queue answers all the while."""
    pid_file = workdir / "hook.pid"
    hang = ["bash", "-c", f"echo $$ > {pid_file}; exec sleep 60"]
    daemon = observed(make_daemon, extra=hook_config(hang))
    finish(daemon)
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(),
                         message="the hook to start"))
    hook_started = time.monotonic()
    enqueue(daemon)
    claim(daemon, worker="agent-2")
    assert time.monotonic() - hook_started < 0.5 and alive(pid), "the queue waited for the hook"
    wait_until(lambda: not alive(pid), timeout=5, message=f"hook {pid} to be killed")
    assert time.monotonic() - hook_started < 3


# -- shell completion -------------------------------------------------------------------------


def test_completion_bash_script_loads_and_registers_sparkqctl():
    """`source <(sparkqctl completion bash)` succeeds and `complete -p sparkqctl` shows it,
    offering words in the order given (task ids by number)."""
    script = f"source <({CTL} completion bash) && complete -p sparkqctl"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.strip() == "complete -o nosort -F _sparkqctl sparkqctl"


@pytest.mark.parametrize("shell, registers", [("zsh", "compdef _sparkqctl sparkqctl"),
                                              ("fish", "complete -c sparkqctl")])
def test_completion_zsh_and_fish_scripts_print(shell, registers, workdir):
    """`sparkqctl completion zsh|fish` prints a script registering sparkqctl (run if installed)."""
    out = subprocess.run([*SPARKQCTL, "completion", shell], capture_output=True, text=True,
                         timeout=30)
    assert (out.returncode, out.stderr) == (0, "")
    assert registers in out.stdout and "enqueue" in out.stdout and "@COMMANDS@" not in out.stdout
    if shutil.which(shell):
        script = workdir / f"sparkqctl.{shell}"
        script.write_text(out.stdout)
        assert subprocess.run([shell, "-n", str(script)], timeout=30).returncode == 0


def test_hidden_complete_lists_streams_and_tasks_from_the_daemon(make_daemon):
    """`sparkqctl __complete streams` prints stream names; `__complete tasks` every task id."""
    daemon = observed(make_daemon)
    two_sessions(daemon)
    finished = finish(daemon)
    pending = enqueue(daemon)
    streams = daemon.ctl("__complete", "streams").stdout.split()
    assert sorted(streams) == ["default", "frontend", "training"]
    assert daemon.ctl("__complete", "tasks").stdout.split() == [str(finished), str(pending)]


def test_hidden_complete_prints_no_names_without_a_daemon(workdir):
    """With no daemon on the socket, `sparkqctl __complete streams` prints no names and exits 0."""
    out = subprocess.run([*SPARKQCTL, "--socket", str(workdir / "absent.sock"), "__complete",
                          "streams"], capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout.split(), out.stderr) == (0, [], "")


def test_bash_completion_offers_the_daemons_streams_after_stream(make_daemon, workdir):
    """In bash, `enqueue --stream <TAB>` offers every stream; `--stream fr<TAB>` only frontend."""
    daemon = observed(make_daemon)
    two_sessions(daemon)
    everything, narrowed = bash_offers(daemon, workdir, 'sparkqctl enqueue --stream ""',
                                       "sparkqctl enqueue --stream fr")
    assert sorted(everything.split()) == ["default", "frontend", "training"]
    assert narrowed == "frontend"


def test_bash_completion_offers_sessions_and_task_ids(make_daemon, workdir):
    """In bash, `--session <TAB>` offers the sessions and `task <TAB>` every task id."""
    daemon = observed(make_daemon)
    two_sessions(daemon)
    finished = finish(daemon)
    pending = enqueue(daemon)
    sessions, tasks = bash_offers(daemon, workdir, 'sparkqctl tasks --session ""',
                                  'sparkqctl task ""')
    assert sorted(sessions.split()) == ["default", "ml", "web"]
    assert tasks.split() == [str(finished), str(pending)]


def test_watch_with_unknown_event_type_is_refused(daemon):
    """A typo in an event filter is a bad_request naming it, not a silent empty stream."""
    reply = daemon.call(op="watch", events=["task.finishd"])
    assert reply["error"]["code"] == "bad_request" and "task.finishd" in reply["error"]["message"]


def test_watch_events_of_requests_answered_together_show_each_change_s_own_record(make_daemon):
    """Pipelined requests answered in one loop turn still get one event each with the task as
    that change left it: the enqueue's event shows a pending task, not the claim after it."""
    daemon = observed(make_daemon)
    conn = watcher(daemon)
    producer = daemon.connect()
    replies = pipeline(producer, [{"op": "enqueue", "tool": "agent", "payload": "x"},
                                  {"op": "claim", "worker": "agent-1"},
                                  {"op": "complete", "task": 1, "summary": "done"}])
    assert replies[1]["result"]["id"] == 1
    seen = [conn.recv() for _ in range(3)]
    assert [(m["event"], m["task"]["status"]) for m in seen] == [
        ("task.created", "pending"), ("task.claimed", "running"), ("task.completed", "completed")]
    assert seen[0]["task"]["worker"] is None and seen[1]["task"]["summary"] is None


def test_on_finish_hook_of_a_task_requeued_in_the_same_turn_sees_it_failed(make_daemon, workdir):
    """A fail and a requeue of the same task answered together: the hook of the failure
    still gets SPARKQ_STATUS=failed, the state that change left."""
    out = workdir / "hooks"
    out.mkdir()
    save = f"cd {out}; env | grep ^SPARKQ_ > $SPARKQ_TASK_ID.tmp && mv $SPARKQ_TASK_ID.{{tmp,env}}"
    daemon = observed(make_daemon, extra=hook_config(["bash", "-c", save]))
    task_id = enqueue(daemon, max_attempts=1)
    claim(daemon)
    pipeline(daemon.connect(), [{"op": "fail", "task": task_id, "reason": "tests broke"},
                                {"op": "requeue", "task": task_id}])
    seen = hook_env(out / f"{task_id}.env")
    assert (seen["SPARKQ_STATUS"], seen["SPARKQ_REASON"]) == ("failed", "tests broke")
