"""sparkqctl: the SparkQ client for shell scripts, editors and agents.

It speaks JSON lines to sparkqd over its Unix socket. It imports only the
standard library and builds its argument parser lazily, because every shell
command that calls it pays its start-up time. ``Client`` is the small Python
API; ``main()`` is the command line.

Exit status: 0 success; 1 the daemon refused the request; 2 usage error;
3 the daemon cannot be reached; 4 nothing to claim or peek, or `wait` timed
out; 5 a task waited for ended failed or cancelled.
"""

import json
import os
import re
import socket
import sys

VERSION = "0.1.0"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_EMPTY, EXIT_FAILED = 0, 1, 2, 3, 4, 5
STATUSES = ["pending", "waiting", "running", "completed", "failed", "cancelled"]


# ---------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------


class SparkQError(Exception):
    """The daemon refused a request; ``code`` is its error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Unreachable(Exception):
    """No daemon answers on the socket."""


def default_socket_path(env=os.environ) -> str:
    """The socket of DESIGN.md's precedence: $SPARKQ_SOCKET, then the defaults."""
    if env.get("SPARKQ_SOCKET"):
        return env["SPARKQ_SOCKET"]
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "sparkq", "sparkqd.sock")
    return f"/tmp/sparkq-{os.getuid()}/sparkqd.sock"


class Client:
    """A connection to sparkqd: ``Client().call("enqueue", tool="run-bash", payload="ls")``."""

    def __init__(self, path: str | None = None, timeout: float | None = None):
        self.path = path or default_socket_path()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as exc:
            self.sock.close()
            raise Unreachable(f"cannot reach sparkqd at {self.path}: "
                              f"{exc.strerror or exc}") from None
        self.reader = self.sock.makefile("rb")
        self._next_id = 0

    def call(self, op: str, **fields):
        """Send one request and return its result, raising SparkQError on refusal."""
        return self._result(self.request(op, **fields))

    def request(self, op: str, **fields) -> dict:
        """Send one request and return the whole reply."""
        self.send(op, **fields)
        return self.receive()

    def send(self, op: str, **fields) -> None:
        """Send a request without waiting, for pipelining; replies come in order."""
        self._next_id += 1
        fields = {k: v for k, v in fields.items() if v is not None}
        line = json.dumps({"op": op, "id": self._next_id, **fields}, separators=(",", ":"))
        self.sock.sendall(line.encode() + b"\n")

    def receive(self) -> dict:
        """Read the next reply."""
        line = self.reader.readline()
        if not line:
            raise Unreachable("sparkqd closed the connection")
        return json.loads(line)

    @staticmethod
    def _result(reply: dict):
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise SparkQError(error.get("code", "internal"), error.get("message", "refused"))
        return reply.get("result")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def short(value, width: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


TASK_FIELDS = ("id", "status", "waiting_for", "stream", "session", "tool", "task_class",
               "priority", "timeout", "attempts", "max_attempts", "worker", "created_at",
               "ready_at", "started_at", "finished_at", "after", "key", "lock", "lease",
               "lease_expires_at", "summary", "reason", "result")


def show_task(task: dict) -> str:
    lines = [f"{k + ':':17}{task[k] if isinstance(task[k], (str, int, float)) else json.dumps(task[k])}"
             for k in TASK_FIELDS if task.get(k) not in (None, [])]
    payload = task.get("payload")
    if payload is not None:
        text = payload if isinstance(payload, str) else json.dumps(payload, indent=2)
        lines.append("payload:         " + text.replace("\n", "\n" + " " * 17))
    for h in task.get("history") or ():
        by = f" by {h['by']}" if h.get("by") else ""
        note = f": {h['note']}" if h.get("note") else ""
        lines.append(f"  {h['at']}  {h['status']}{by}{note}")
    return "\n".join(lines)


def show_tasks(tasks: list) -> str:
    return table([[t["id"], t["stream"], t["tool"], t["status"], t["attempts"], t["created_at"],
                   short(t["payload"])] for t in tasks],
                 ["ID", "STREAM", "TOOL", "STATUS", "ATTEMPTS", "CREATED", "PAYLOAD"])


def show_streams(streams: list) -> str:
    return table([[s["name"], s["session"], s["status"], *s["counts"].values()] for s in streams],
                 ["NAME", "SESSION", "STATUS", *(k.upper() for k in (streams[0]["counts"]
                                                                     if streams else []))])


def show_sessions(sessions: list) -> str:
    return table([[s["name"], s["status"], s["created_at"], ",".join(s["streams"])]
                  for s in sessions], ["NAME", "STATUS", "CREATED", "STREAMS"])


def show_status(status: dict) -> str:
    lines = []
    for key, value in status.items():
        if isinstance(value, dict):
            value = "  ".join(f"{k}={v}" for k, v in value.items())
        lines.append(f"{key + ':':12}{value}")
    return "\n".join(lines)


def show_tools(result: dict) -> str:
    tools = table([[n, t["task_class"], t["timeout"], t["max_attempts"],
                    " ".join(t["command"]) if t["command"] else "(claimed by agents)",
                    t["description"]] for n, t in result["tools"].items()],
                  ["TOOL", "CLASS", "TIMEOUT", "ATTEMPTS", "COMMAND", "DESCRIPTION"])
    classes = table([[n, c["timeout"], c["max_attempts"], c["retry_backoff"]]
                     for n, c in result["task_classes"].items()],
                    ["CLASS", "TIMEOUT", "ATTEMPTS", "BACKOFF"])
    return tools + "\n\n" + classes


# ---------------------------------------------------------------------------
# sparkqctl service: the systemd user units
# ---------------------------------------------------------------------------

#: The one source of the unit files: `service install` writes these, and the files
#: in the repository's systemd/ are `sparkqctl service show` of them (a test checks).
SERVICE_UNIT = """\
[Unit]
Description=SparkQ task queue daemon
Requires=sparkqd.socket
After=sparkqd.socket

[Service]
Type=notify
NotifyAccess=main
ExecStart={sparkqd}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2
# sparkqd pings from its event loop every WatchdogSec/2: a hung loop is restarted.
WatchdogSec=30
# SIGTERM reaches sparkqd alone; it ends its task processes within workers.kill_grace
# (default 10 s), flushes and snapshots. Anything left after TimeoutStopSec is killed.
KillMode=mixed
TimeoutStopSec=60
UMask=0077
# Only hardening that leaves the tasks it runs unsandboxed: NoNewPrivileges, Protect*,
# Private* and system-call filters would bind every task (sudo, writes to the repo).
KeyringMode=private

[Install]
WantedBy=default.target
Also=sparkqd.socket
"""

SOCKET_UNIT = """\
[Unit]
Description=SparkQ task queue socket

[Socket]
# Not RuntimeDirectory=: systemd removes that on stop, and the socket with it.
ListenStream=%t/sparkq/sparkqd.sock
SocketMode=0600
DirectoryMode=0700

[Install]
WantedBy=sockets.target
"""

UNITS = ("sparkqd.socket", "sparkqd.service")


def sparkqd_beside_me() -> str:
    """The ExecStart: the sparkqd installed beside this sparkqctl, as an absolute path."""
    here = os.path.dirname(os.path.realpath(sys.argv[0]))
    installed = os.path.join(here, "sparkqd")
    if os.access(installed, os.X_OK):
        return exec_line([installed])
    source = os.path.join(here, "sparkqd.py")
    if os.path.exists(source):  # run from a checkout: python3 sparkqctl.py
        return exec_line([sys.executable, source])
    raise FileNotFoundError(f"no sparkqd beside {sys.argv[0]} (looked for {installed})")


def exec_line(argv: list[str]) -> str:
    """An ExecStart= value: each word quoted where systemd would split or expand it."""
    def word(arg: str) -> str:
        arg = arg.replace("%", "%%")  # systemd's specifier character
        if re.search(r'[\s"\'\\$;]', arg):
            arg = '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$") + '"'
        return arg
    return " ".join(word(arg) for arg in argv)


def unit_texts(sparkqd: str) -> dict[str, str]:
    return {"sparkqd.service": SERVICE_UNIT.format(sparkqd=sparkqd),
            "sparkqd.socket": SOCKET_UNIT}


def user_unit_dir() -> str:
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(config, "systemd", "user")


def user_manager_reachable() -> bool:
    import shutil
    import subprocess

    return bool(shutil.which("systemctl")) and subprocess.run(
        ["systemctl", "--user", "show-environment"], capture_output=True).returncode == 0


def print_steps(steps: list[list[str]]) -> int:
    print("systemctl cannot reach your user manager here; run these in your login session:")
    for step in steps:
        print("  " + " ".join(shlex_quote(arg) for arg in step))
    return EXIT_OK


def shlex_quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def systemctl_steps(steps: list[list[str]]) -> int:
    """Run each `systemctl --user` step, printing it; or print them where it cannot."""
    import subprocess

    if not user_manager_reachable():
        return print_steps(steps)
    for step in steps:
        print("$ " + " ".join(step), flush=True)
        if subprocess.run(step).returncode != 0:
            return EXIT_REFUSED
    return EXIT_OK


def service(args) -> int:
    """`sparkqctl service install|uninstall|show`."""
    if args.action == "show":
        for name, text in unit_texts(args.exec or sparkqd_beside_me()).items():
            print(f"# {name}\n{text}")
        return EXIT_OK
    directory = user_unit_dir()
    if args.action == "install":
        try:
            units = unit_texts(sparkqd_beside_me())
        except FileNotFoundError as exc:
            print(f"sparkqctl: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        os.makedirs(directory, exist_ok=True)
        for name, text in units.items():
            path = os.path.join(directory, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {path}")
        enable = ["systemctl", "--user", "enable", *(["--now"] if args.now else []), *UNITS]
        status = systemctl_steps([["systemctl", "--user", "daemon-reload"], enable])
        print("Tasks stop when you log out unless you run: loginctl enable-linger $USER")
        return status
    import shutil
    import subprocess

    reachable = user_manager_reachable()
    disable = ["systemctl", "--user", "disable", *(["--now"] if reachable else []), *UNITS]
    status = EXIT_OK
    if reachable or shutil.which("systemctl"):  # disabling is a file operation: works offline
        print("$ " + " ".join(disable), flush=True)
        status = EXIT_OK if subprocess.run(disable).returncode == 0 else EXIT_REFUSED
    for name in UNITS:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.unlink(path)
            print(f"removed {path}")
    reload_units = ["systemctl", "--user", "daemon-reload"]
    if not reachable:
        return print_steps([["systemctl", "--user", "stop", *UNITS], reload_units])
    return systemctl_steps([reload_units]) or status


# ---------------------------------------------------------------------------
# sparkqctl work
# ---------------------------------------------------------------------------


def seconds_until(rfc3339_time: str) -> float:
    import datetime

    moment = datetime.datetime.fromisoformat(rfc3339_time.replace("Z", "+00:00"))
    return moment.timestamp() - __import__("time").time()


class Worker:
    """Claim tasks and run COMMAND for each, ``--concurrency`` at a time.

    The first SIGINT or SIGTERM stops claiming and lets running commands finish
    (exit 0); a second kills them, records their attempts failed and exits 1.
    """

    #: The reason of an attempt a second signal ended (or kept from starting).
    STOPPED = "interrupted: worker stopped"

    def __init__(self, parser, args):
        import threading

        command = args.run[1:] if args.run[:1] == ["--"] else args.run
        if not command:
            parser.error("work needs a command: sparkqctl work [options] -- COMMAND [ARGS...]")
        if args.concurrency < 1:
            parser.error("--concurrency must be at least 1")
        self.command = command
        self.args = args
        self.path = args.socket or default_socket_path()
        self.prefix = args.worker or f"{socket.gethostname()}:{os.getpid()}"
        self.stopping = threading.Event()
        self.killed = False  #: a second signal came: running commands die, no more start
        self.failed = False  #: a slot lost the daemon or was refused
        # Reentrant: a signal that comes while the handler holds it runs the handler again.
        self.lock = threading.RLock()
        self.procs: dict[int, object] = {}  # task id -> Popen
        self.clients: list[Client] = []

    def run(self) -> int:
        import signal
        import threading

        try:
            Client(self.path).close()
        except Unreachable as exc:
            print(f"sparkqctl: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        slots = [threading.Thread(target=self._slot, args=(n,), daemon=True)
                 for n in range(1, self.args.concurrency + 1)]
        for slot in slots:
            slot.start()
        for slot in slots:
            while slot.is_alive():
                slot.join(0.2)  # wakes up to let the main thread take signals
        return EXIT_REFUSED if self.killed or self.failed else EXIT_OK

    def _on_signal(self, signum, frame) -> None:
        import signal

        if not self.stopping.is_set():
            self.stopping.set()
            print(f"sparkqctl work: stopping; waiting for {len(self.procs)} running task(s) "
                  f"(signal again to kill them)", file=sys.stderr, flush=True)
            for client in list(self.clients):  # wake claims that wait: nothing is taken
                try:
                    client.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return
        self.killed = True
        with self.lock:  # waits out a spawn in progress, whose child is then in procs
            for proc in self.procs.values():
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _slot(self, number: int) -> None:
        name = f"{self.prefix}/{number}"
        streams = self.args.stream or [os.environ.get("SPARKQ_STREAM") or "default"]
        try:
            with Client(self.path) as claimer, Client(self.path) as reporter:
                self.clients.append(claimer)
                while not self.stopping.is_set():
                    task = claimer.call("claim", stream=streams, tool=self.args.tool,
                                        worker=name, pid=os.getpid(), wait=30)
                    if task is not None:
                        self._execute(reporter, task)
        except Unreachable:
            if not self.stopping.is_set():
                print("sparkqctl work: lost the daemon", file=sys.stderr)
                self.failed = True
        except SparkQError as exc:
            print(f"sparkqctl work: {exc.code}: {exc}", file=sys.stderr)
            self.failed = True

    def _execute(self, client: Client, task: dict) -> None:
        import subprocess
        import time

        payload = task["payload"]
        env = dict(os.environ, SPARKQ_TASK_ID=str(task["id"]), SPARKQ_STREAM=task["stream"],
                   SPARKQ_SESSION=task["session"], SPARKQ_TOOL=task["tool"],
                   SPARKQ_ATTEMPT=str(task["attempts"]), SPARKQ_SOCKET=self.path,
                   SPARKQ_PAYLOAD=payload if isinstance(payload, str) else json.dumps(payload))
        argv = [*self.command, *([payload] if isinstance(payload, str) else [])]
        started = time.monotonic()
        try:
            proc = self._start(task["id"], argv, env)
        except OSError as exc:
            return self._report(client, "fail", task, reason=f"cannot start: {exc.strerror}")
        if proc is None:
            return self._report(client, "fail", task, reason=self.STOPPED)
        heartbeat = max(0.5, seconds_until(task["lease_expires_at"]) / 3)
        while True:
            try:
                code = proc.wait(timeout=heartbeat)
                break
            except subprocess.TimeoutExpired:
                self._report(client, "touch", task)
        with self.lock:
            del self.procs[task["id"]]
        if self.killed:
            self._report(client, "fail", task, reason=self.STOPPED)
        elif code == 0:
            self._report(client, "complete", task,
                         result={"exit_code": 0, "duration": round(time.monotonic() - started, 3)})
        else:
            why = f"exit code {code}" if code > 0 else f"killed by signal {-code}"
            self._report(client, "fail", task, reason=why)

    def _start(self, task_id: int, argv: list[str], env: dict):
        """Start a command in its own process group and register it; None once killed.

        Spawn and registration hold the lock the kill sweep takes, so a sweep sees
        every child started before it and none starts after it. Blocking signals
        around the spawn would not do: Python runs handlers in the main thread,
        whatever this thread's mask, and the child would inherit the mask.
        """
        import subprocess

        with self.lock:
            if self.killed:
                return None
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
            self.procs[task_id] = proc
            return proc

    @staticmethod
    def _report(client: Client, op: str, task: dict, **fields) -> None:
        try:
            client.call(op, task=task["id"], lease=task["lease"], **fields)
        except SparkQError as exc:
            print(f"sparkqctl work: task {task['id']}: {op} refused: {exc}", file=sys.stderr)


# ---------------------------------------------------------------------------
# sparkqctl watch, top, completion
# ---------------------------------------------------------------------------


def watch(path: str, fields: dict) -> int:
    """Print each event as one JSON line, flushed, until the daemon or the reader goes."""
    with Client(path) as client:
        client.call("watch", **fields)
        try:
            while True:
                message = client.receive()
                if message.get("ok") is False:  # the daemon ends the stream: shutting down
                    error = message["error"]
                    print(f"sparkqctl: {error['code']}: {error['message']}", file=sys.stderr)
                    return EXIT_UNREACHABLE if error["code"] == "unavailable" else EXIT_REFUSED
                print(json.dumps(message), flush=True)
        except (BrokenPipeError, KeyboardInterrupt):
            return EXIT_OK
        except Unreachable:
            return EXIT_UNREACHABLE


class EventReader:
    """Events of a `watch` connection, read without blocking (for `top`)."""

    def __init__(self, path: str):
        self.client = Client(path)
        self.client.call("watch")
        self.client.sock.setblocking(False)
        self.buf = b""

    def fileno(self) -> int:
        return self.client.sock.fileno()

    def read(self) -> list[dict]:
        try:
            chunk = self.client.sock.recv(1 << 20)
        except BlockingIOError:
            return []
        if not chunk:
            raise Unreachable("sparkqd closed the connection")
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


class Top:
    """`sparkqctl top`: the queue on one screen, redrawn when events arrive."""

    def __init__(self, path: str):
        import collections

        self.path = path
        self.client = Client(path)
        self.events = EventReader(path)
        self.finished = collections.deque(maxlen=100_000)  # (epoch seconds, stream)
        self.selected = 0
        self.message = ""
        self.refresh()

    def refresh(self) -> None:
        """Fetch what the screen shows, in one pipelined round trip."""
        ops = [("stream.list", {}), ("tasks", {"status": "running"}), ("locks", {}),
               ("workers", {}), ("history", {"status": "failed", "limit": 5})]
        for op, fields in ops:
            self.client.send(op, **fields)
        results = [Client._result(self.client.receive()) for _ in ops]
        streams, self.running, self.locks, self.workers, self.failures = results
        self.streams = [s for s in streams if s["status"] != "ended"]
        self.selected = min(self.selected, max(0, len(self.streams) - 1))
        if not self.finished:
            for task in self.client.call("history", since=iso_ago(60), limit=100_000):
                self.finished.append((parse_iso(task["finished_at"]), task["stream"]))

    def take_events(self) -> bool:
        events = self.events.read()
        for event in events:
            if event.get("event") in ("task.completed", "task.failed", "task.cancelled"):
                self.finished.append((parse_iso(event["at"]), event["task"]["stream"]))
        return bool(events)

    def per_minute(self, stream: str) -> int:
        import time

        since = time.time() - 60
        return sum(1 for at, name in self.finished if at >= since and name == stream)

    def lines(self, width: int, height: int) -> list[tuple[str, bool]]:
        """The screen as (text, highlighted) lines, cut to fit width x height."""
        import time

        now = time.time()
        busy = sum(1 for w in self.workers if w["state"] == "busy")
        counts = ("pending", "waiting", "running", "completed", "failed")
        head = [(f"sparkq top  {time.strftime('%H:%M:%S')}  workers {busy}/{len(self.workers)} "
                 f"busy  locks {len(self.locks)}  {self.message}", False),
                (f"  {'STREAM':16} {'SESSION':12} {'PEND':>5} {'WAIT':>5} {'RUN':>4} "
                 f"{'DONE':>6} {'FAIL':>5} {'/MIN':>5}", True)]
        streams = [(f"{'>' if i == self.selected else ' '} {s['name'][:16]:16} "
                    f"{s['session'][:12]:12} " + " ".join(
                        f"{s['counts'].get(k, 0):>{w}}" for k, w in zip(counts, (5, 5, 4, 6, 5)))
                    + f" {self.per_minute(s['name']):>5}" + ("  paused" if s.get("paused") else ""),
                    i == self.selected) for i, s in enumerate(self.streams)]
        running = [(f"  {t['id']:>6} {t['stream'][:12]:12} {t['tool'][:12]:12} "
                    f"{(t['worker'] or '-')[:14]:14} {age(now - parse_iso(t['started_at'])):>6} "
                    f"lease {age(parse_iso(t['lease_expires_at']) - now) if t['lease_expires_at'] else '-':>6}",
                    False) for t in self.running]
        locks = [(f"  {lk['lock'][:50]:50} task {lk['task']}", False) for lk in self.locks]
        workers = [(f"  {w['name'][:24]:24} {w['kind']:8} {w['state']:6} "
                    f"task {w['task'] or '-':<7} done {w['done']}", False) for w in self.workers]
        failures = [(f"  {t['id']:>6} {t['stream'][:12]:12} {(t['reason'] or '').splitlines()[0][:55] if t['reason'] else ''}",
                     False) for t in self.failures]
        sections = [("RUNNING", running), ("LOCKS", locks), ("WORKERS", workers),
                    ("RECENT FAILURES", failures)]
        out = head + streams
        room = height - len(out) - 1 - len(sections)
        for title, rows in sections:
            share = max(1, room // len(sections))
            out.append((f"{title} ({len(rows)})", True))
            out.extend(rows[:share])
        out = out[: height - 1] + [("q quit  p pause/resume  up/down select", True)]
        return [(text[:width - 1], hl) for text, hl in out]

    def toggle_pause(self) -> None:
        if self.streams:
            stream = self.streams[self.selected]
            op = "stream.resume" if stream.get("paused") else "stream.pause"
            try:
                self.client.call(op, name=stream["name"])
                self.message = f"{op.split('.')[1]}d {stream['name']}"
            except SparkQError as exc:
                self.message = str(exc)

    def run_terminal(self, screen) -> int:
        import curses
        import select
        import time

        curses.curs_set(0)
        screen.nodelay(True)
        screen.keypad(True)
        dirty, last_fetch = False, 0.0
        while True:
            height, width = screen.getmaxyx()
            screen.erase()
            for row, (text, highlighted) in enumerate(self.lines(width, height)):
                screen.addstr(row, 0, text, curses.A_REVERSE if highlighted else curses.A_NORMAL)
            screen.refresh()
            ready, _, _ = select.select([self.events, sys.stdin], [], [], 1.0)  # 1 s: ages tick
            if self.events in ready:
                dirty = self.take_events() or dirty
            key = screen.getch()
            if key in (ord("q"), ord("Q")):
                return EXIT_OK
            if key == ord("p"):
                self.toggle_pause()
                dirty = True
            elif key in (curses.KEY_UP, curses.KEY_DOWN):
                step = -1 if key == curses.KEY_UP else 1
                self.selected = max(0, min(len(self.streams) - 1, self.selected + step))
            if dirty and time.monotonic() - last_fetch > 0.25:  # redraw on events, at most 4/s
                self.refresh()
                dirty, last_fetch = False, time.monotonic()

    def run_plain(self, interval: float = 2.0) -> int:
        import select

        try:
            while True:
                for text, _ in self.lines(200, 1000):
                    print(text)
                print(flush=True)
                select.select([self.events], [], [], interval)
                self.take_events()
                self.refresh()
        except (KeyboardInterrupt, BrokenPipeError):
            return EXIT_OK


def top(path: str) -> int:
    view = Top(path)
    if not sys.stdout.isatty():
        return view.run_plain()
    import curses

    return curses.wrapper(view.run_terminal)


def parse_iso(text: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def iso_ago(seconds: float) -> str:
    import datetime

    moment = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)
    return moment.isoformat()


def age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


COMPLETION_BASH = r"""# sparkqctl completion for bash: source <(sparkqctl completion bash)
_sparkqctl() {
    local cur prev words
    cur="${COMP_WORDS[COMP_CWORD]}"; prev="${COMP_WORDS[COMP_CWORD-1]}"
    case "$prev" in
        --stream) COMPREPLY=($(compgen -W "$(sparkqctl __complete streams 2>/dev/null)" -- "$cur")); return;;
        --session) COMPREPLY=($(compgen -W "$(sparkqctl __complete sessions 2>/dev/null)" -- "$cur")); return;;
        --tool) COMPREPLY=($(compgen -W "$(sparkqctl __complete tools 2>/dev/null)" -- "$cur")); return;;
        --script) COMPREPLY=($(compgen -W "$(sparkqctl __complete scripts 2>/dev/null)" -- "$cur")); return;;
        --status) COMPREPLY=($(compgen -W "pending waiting running completed failed cancelled" -- "$cur")); return;;
        complete|fail|requeue|task|touch|cancel|logs|wait|--task-id|--task)
            COMPREPLY=($(compgen -W "$(sparkqctl __complete tasks 2>/dev/null)" -- "$cur")); return;;
        session|stream) COMPREPLY=($(compgen -W "create list end pause resume" -- "$cur")); return;;
        service) COMPREPLY=($(compgen -W "install uninstall show" -- "$cur")); return;;
        completion) COMPREPLY=($(compgen -W "bash zsh fish" -- "$cur")); return;;
    esac
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "@COMMANDS@" -- "$cur"))
    elif [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "--json -q --socket --stream --session --tool --status --limit --wait --worker" -- "$cur"))
    fi
}
complete -F _sparkqctl sparkqctl
"""

COMPLETION_ZSH = r"""#compdef sparkqctl
# sparkqctl completion for zsh: source <(sparkqctl completion zsh)
_sparkqctl() {
    local prev=${words[CURRENT-1]}
    case $prev in
        --stream) compadd -- ${(f)"$(sparkqctl __complete streams 2>/dev/null)"}; return;;
        --session) compadd -- ${(f)"$(sparkqctl __complete sessions 2>/dev/null)"}; return;;
        --tool) compadd -- ${(f)"$(sparkqctl __complete tools 2>/dev/null)"}; return;;
        --script) compadd -- ${(f)"$(sparkqctl __complete scripts 2>/dev/null)"}; return;;
        complete|fail|requeue|task|touch|cancel|logs|wait|--task-id)
            compadd -- ${(f)"$(sparkqctl __complete tasks 2>/dev/null)"}; return;;
    esac
    if (( CURRENT == 2 )); then compadd -- @COMMANDS@; fi
}
compdef _sparkqctl sparkqctl
"""

COMPLETION_FISH = r"""# sparkqctl completion for fish: sparkqctl completion fish | source
complete -c sparkqctl -f
complete -c sparkqctl -n "__fish_use_subcommand" -a "@COMMANDS@"
complete -c sparkqctl -l stream -xa "(sparkqctl __complete streams 2>/dev/null)"
complete -c sparkqctl -l session -xa "(sparkqctl __complete sessions 2>/dev/null)"
complete -c sparkqctl -l tool -xa "(sparkqctl __complete tools 2>/dev/null)"
complete -c sparkqctl -l script -xa "(sparkqctl __complete scripts 2>/dev/null)"
complete -c sparkqctl -n "__fish_seen_subcommand_from complete fail requeue task touch cancel logs wait" -xa "(sparkqctl __complete tasks 2>/dev/null)"
"""


def completion_names(path: str, kind: str) -> list[str]:
    """Names to complete, from the running daemon; nothing if it is not there."""
    op, fields, key = {"streams": ("stream.list", {}, "name"),
                       "sessions": ("session.list", {}, "name"),
                       "tasks": ("tasks", {}, "id"), "scripts": ("scripts", {}, "name")}.get(
        kind, ("tools", {}, None))
    try:
        with Client(path, timeout=2) as client:
            result = client.call(op, **fields)
    except (Unreachable, SparkQError, OSError):
        return []
    if kind == "tools":
        return list(result["tools"])
    if kind == "tasks":
        return [str(t["id"]) for t in result if t["status"] not in ("completed", "failed", "cancelled")]
    return [str(item[key]) for item in result]


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


#: Every command; `main` builds the parser of the one given only (a test checks this list).
COMMANDS = ("status", "stop", "reload", "tools", "schema", "session", "stream", "enqueue", "peek",
            "claim", "complete", "fail", "touch", "cancel", "requeue", "task", "wait", "locks",
            "logs", "scripts", "workers", "watch", "top", "metrics", "history", "completion",
            "__complete", "service", "work", "tasks", "purge")


class Unbuilt:
    """Stands in for the parser of a command not on this command line: nothing is built."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: self


UNBUILT = Unbuilt()


def command_given(argv: list[str]) -> str | None:
    """The command on a command line, if it is one we know and no global help is asked."""
    args = iter(argv)
    for arg in args:
        if arg == "--socket":
            next(args, None)
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
        elif arg in ("-h", "--help", "--version"):
            return None
    return None


def build_parser(only: str | None = None):
    """The command-line parser; with ``only``, the parser of that one command alone."""
    import argparse

    def global_options(p, default):
        p.add_argument("--socket", default=default, help="daemon socket (default: "
                       "$SPARKQ_SOCKET, then $XDG_RUNTIME_DIR/sparkq/sparkqd.sock)")
        p.add_argument("--json", action="store_true", default=default,
                       help="print the result as JSON")
        p.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="print ids only")

    parser = argparse.ArgumentParser(prog="sparkqctl", description="Talk to the SparkQ daemon.")
    global_options(parser, None)
    parser.add_argument("--version", action="version", version=f"sparkqctl {VERSION}")
    # The global options work after the command too: `sparkqctl claim --json`.
    anywhere = argparse.ArgumentParser(add_help=False)
    global_options(anywhere, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    stream_default = os.environ.get("SPARKQ_STREAM") or "default"

    def command(name, help_text, parser=commands):
        if parser is UNBUILT or (parser is commands and only is not None and name != only):
            return UNBUILT  # every shell call pays for the parser: build only what it needs
        return parser.add_parser(name, help=help_text, description=help_text, parents=[anywhere])

    def task_id(p):
        p.add_argument("task", nargs="?", type=int, metavar="ID")
        p.add_argument("--task-id", type=int, dest="task_opt", metavar="ID")

    command("status", "show the daemon's state")
    command("stop", "stop the daemon cleanly")
    command("reload", "re-read the configuration")
    command("tools", "list tools and task classes in force")
    command("schema", "print the JSON Schema of every request")

    session = command("session", "create, list or end sessions")
    sub = session.add_subparsers(dest="action", metavar="ACTION", required=True)
    command("create", "create a session", sub).add_argument("name")
    command("list", "list sessions", sub)
    command("end", "end a session and its streams", sub).add_argument("name")

    stream = command("stream", "create, list or end streams")
    sub = stream.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = command("create", "create a stream in a session", sub)
    p.add_argument("name")
    p.add_argument("--session", required=True)
    command("list", "list streams", sub).add_argument("--session")
    command("end", "stop a stream taking new tasks", sub).add_argument("name")
    command("pause", "stop claims from a stream; enqueue still works", sub).add_argument("name")
    command("resume", "let claims take from a paused stream again", sub).add_argument("name")

    p = command("enqueue", "add a task; prints its id")
    p.add_argument("--stream", default=stream_default)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--tool")
    what.add_argument("--script", metavar="NAME", help="run a script from script_dirs; "
                      "its arguments follow --")
    p.add_argument("script_args", nargs="*", metavar="ARGS", help=argparse.SUPPRESS)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--payload", help="payload text")
    group.add_argument("--payload-json", metavar="JSON", help="payload as a JSON value")
    group.add_argument("--payload-file", metavar="PATH", help="payload read from a file, - for stdin")
    p.add_argument("--timeout", type=float, metavar="SECS")
    p.add_argument("--priority", type=int, default=0, help="higher first (default 0)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--delay", type=duration, metavar="DURATION",
                      help="wait first: 90s, 5m, 2h, 1d or plain seconds")
    when.add_argument("--at", type=moment, metavar="TIME",
                      help="wait until TIME: RFC 3339, or local 'YYYY-MM-DD HH:MM'")
    p.add_argument("--after", type=id_list, metavar="ID[,ID...]",
                   help="wait until these tasks have completed")
    p.add_argument("--key", help="unique key: an existing task with it is returned instead")
    p.add_argument("--lock", help="at most one running task per lock (a repository URL is normalised)")
    p.add_argument("--max-attempts", type=int, metavar="N", help="attempts before it fails")

    def filters(p):
        p.add_argument("--stream", action="append", metavar="S",
                       help=f"stream to take from, repeatable (default {stream_default})")
        p.add_argument("--tool", action="append", metavar="T", help="only these tools, repeatable")

    filters(command("peek", "show the next task without claiming it"))
    p = command("claim", "claim the next task")
    filters(p)
    p.add_argument("--worker", default=os.environ.get("SPARKQ_WORKER"))
    p.add_argument("--wait", type=float, default=0, metavar="SECS",
                   help="wait up to SECS for a task")

    p = command("complete", "mark a running task completed")
    task_id(p)
    p.add_argument("--summary")
    p.add_argument("--result-json", metavar="JSON")
    p.add_argument("--lease", help="refuse if the task was claimed again since")
    p = command("fail", "record a failed attempt (retried while attempts remain)")
    task_id(p)
    p.add_argument("--reason", required=True)
    p.add_argument("--final", action="store_true", help="fail for good, no retry")
    p.add_argument("--lease", help="refuse if the task was claimed again since")
    p = command("touch", "extend a running task's lease (a heartbeat)")
    task_id(p)
    p.add_argument("--lease", help="refuse if the task was claimed again since")
    task_id(command("cancel", "cancel a task that has not ended"))
    p = command("requeue", "put a task back to pending, or every match of --stream/--status")
    task_id(p)
    p.add_argument("--stream")
    p.add_argument("--status", choices=["running", "failed", "cancelled"])
    task_id(command("task", "show one task with its history"))
    p = command("wait", "block until every task has ended; exit 0 all completed, 5 not")
    p.add_argument("tasks", nargs="+", type=int, metavar="ID")
    p.add_argument("--timeout", type=float, metavar="SECS")
    command("locks", "list held locks and their tasks")
    p = command("logs", "show a task's output (from runs by the daemon)")
    task_id(p)
    p.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until it ends")
    command("scripts", "list the scripts found under script_dirs")
    command("workers", "list the daemon's worker slots and external workers")
    p = command("watch", "print events as JSON lines as they happen")
    p.add_argument("--stream", action="append", dest="streams", metavar="S")
    p.add_argument("--session", action="append", dest="sessions", metavar="S")
    p.add_argument("--task", action="append", dest="tasks", type=int, metavar="ID")
    p.add_argument("--event", action="append", dest="events", metavar="TYPE",
                   help="task.created, task.pending, task.claimed, task.completed, ...")
    command("top", "a live view of streams, running tasks, locks, workers and failures")
    command("metrics", "print metrics in the Prometheus text format")
    p = command("history", "ended tasks, newest first, with how long they waited and ran")
    p.add_argument("--stream")
    p.add_argument("--session")
    p.add_argument("--status", choices=["completed", "failed", "cancelled"])
    p.add_argument("--since", type=since, metavar="TIME",
                   help="RFC 3339, local 'YYYY-MM-DD HH:MM', or a duration ago: 30m, 2h, 1d")
    p.add_argument("--limit", type=int)
    command("completion", "print a shell completion script").add_argument(
        "shell", choices=["bash", "zsh", "fish"])
    if only in (None, "__complete"):
        commands.add_parser("__complete").add_argument("kind")
    p = command("service", "install the systemd user units (socket-activated sparkqd)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    command("install", "write the units, enable them (--now: start too)", sub).add_argument(
        "--now", action="store_true")
    command("uninstall", "disable and remove the units", sub)
    command("show", "print the unit files", sub).add_argument(
        "--exec", metavar="PATH", help="ExecStart to show (default: the sparkqd beside this one)")
    p = command("work", "claim tasks and run COMMAND for each: turn this shell into a worker")
    filters(p)
    p.add_argument("--concurrency", type=int, default=1, metavar="N")
    p.add_argument("--worker", default=os.environ.get("SPARKQ_WORKER"), help="worker name prefix")
    p.add_argument("run", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")

    p = command("tasks", "list tasks, oldest first")
    p.add_argument("--stream")
    p.add_argument("--session")
    p.add_argument("--status", choices=STATUSES)
    p.add_argument("--limit", type=int)
    command("purge", "remove finished tasks older than N days").add_argument(
        "--older-than", type=float, metavar="DAYS")
    return parser


def duration(text: str) -> float:
    """Seconds from 90s, 5m, 2h, 1d or a plain number."""
    import argparse

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 5m, 2h, 1d") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError("a duration cannot be negative")
    return seconds


def moment(text: str) -> str:
    """An RFC 3339 time, from RFC 3339 or local 'YYYY-MM-DD HH:MM'."""
    import argparse
    import datetime

    try:
        parsed = datetime.datetime.fromisoformat(text.replace(" ", "T", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not RFC 3339 or 'YYYY-MM-DD HH:MM'") from None
    return (parsed if parsed.tzinfo else parsed.astimezone()).isoformat()


def since(text: str) -> str:
    """A start time: RFC 3339, local 'YYYY-MM-DD HH:MM', or a duration ago."""
    try:
        return iso_ago(duration(text))
    except Exception:
        return moment(text)


def id_list(text: str) -> list[int]:
    import argparse

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of task ids") from None


def commands_of(parser) -> list[str]:
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(action.choices)


def json_arg(parser, text: str, flag: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        parser.error(f"{flag}: not valid JSON: {exc}")


def the_task_id(parser, args, required: bool = True) -> int | None:
    if args.task is not None and args.task_opt is not None:
        parser.error("give the task id once, as ID or --task-id ID")
    task = args.task if args.task is not None else args.task_opt
    if task is None and required:
        parser.error("give the task id, as ID or --task-id ID")
    return task


def to_request(parser, args) -> tuple[str, dict]:
    """Turn parsed arguments into (op, fields)."""
    cmd = args.command
    if cmd in ("session", "stream"):
        fields = {k: getattr(args, k, None) for k in ("name", "session")}
        if cmd == "session":
            fields.pop("session")
        return f"{cmd}.{args.action}", fields
    if cmd == "enqueue" and args.script is not None:
        if args.payload is not None or args.payload_json is not None or args.payload_file:
            parser.error("a script takes its arguments after --, not a payload")
        return "enqueue", {"stream": args.stream, "script": args.script, "args": args.script_args,
                           "timeout": args.timeout, "priority": args.priority or None,
                           "delay": args.delay, "at": args.at, "after": args.after,
                           "key": args.key, "lock": args.lock, "max_attempts": args.max_attempts}
    if cmd == "enqueue":
        if args.script_args:
            parser.error(f"unexpected arguments: {' '.join(args.script_args)}")
        payload = args.payload
        if args.payload_json is not None:
            payload = json_arg(parser, args.payload_json, "--payload-json")
        elif args.payload_file is not None:
            try:
                if args.payload_file == "-":
                    payload = sys.stdin.read()
                else:
                    with open(args.payload_file, encoding="utf-8") as f:
                        payload = f.read()
            except OSError as exc:
                parser.error(f"--payload-file: {exc.strerror}: {args.payload_file}")
        return "enqueue", {"stream": args.stream, "tool": args.tool, "payload": payload,
                           "timeout": args.timeout, "priority": args.priority or None,
                           "delay": args.delay, "at": args.at, "after": args.after,
                           "key": args.key, "lock": args.lock, "max_attempts": args.max_attempts}
    if cmd in ("peek", "claim"):
        fields = {"stream": args.stream or os.environ.get("SPARKQ_STREAM") or "default",
                  "tool": args.tool}
        if cmd == "claim":
            fields.update(worker=args.worker, wait=args.wait or None)
        return cmd, fields
    if cmd == "complete":
        result = None if args.result_json is None else json_arg(parser, args.result_json,
                                                                 "--result-json")
        return "complete", {"task": the_task_id(parser, args), "summary": args.summary,
                            "result": result, "lease": args.lease}
    if cmd == "fail":
        return "fail", {"task": the_task_id(parser, args), "reason": args.reason,
                        "final": args.final or None, "lease": args.lease}
    if cmd == "touch":
        return "touch", {"task": the_task_id(parser, args), "lease": args.lease}
    if cmd == "requeue":
        task = the_task_id(parser, args, required=False)
        if (task is None) == (args.status is None) or (task is not None and args.stream):
            parser.error("requeue takes ID, or --status (with --stream to narrow it)")
        return "requeue", {"task": task, "stream": args.stream, "status": args.status}
    if cmd in ("task", "cancel"):
        return cmd, {"task": the_task_id(parser, args)}
    if cmd == "logs":
        return "logs", {"task": the_task_id(parser, args), "tail": args.tail,
                        "follow": args.follow or None}
    if cmd == "wait":
        return "wait", {"tasks": args.tasks, "timeout": args.timeout}
    if cmd == "history":
        return "history", {"stream": args.stream, "session": args.session,
                           "status": args.status, "since": args.since, "limit": args.limit}
    if cmd == "watch":
        return "watch", {"streams": args.streams, "sessions": args.sessions,
                         "tasks": args.tasks, "events": args.events}
    if cmd == "tasks":
        return "tasks", {"stream": args.stream, "session": args.session, "status": args.status,
                         "limit": args.limit}
    if cmd == "purge":
        return "purge", {"older_than_days": args.older_than}
    return {"stop": "shutdown"}.get(cmd, cmd), {}


def render(args, op: str, result) -> str | None:
    """The human (or -q) form of a result; None prints nothing."""
    if args.quiet:
        if isinstance(result, list):
            return "\n".join(str(r.get("id", r.get("name"))) for r in result) or None
        if isinstance(result, dict) and "id" in result:
            return str(result["id"])
        return None
    if op == "enqueue":
        return str(result["id"])
    if op == "requeue" and "requeued" in result:
        return f"requeued {result['requeued']} tasks"
    if op == "wait":
        return show_tasks(result["tasks"])
    if op == "logs":
        return result["log"].rstrip("\n") or None
    if op == "metrics":
        return result.rstrip("\n")
    if op == "history":
        return table([[t["id"], t["stream"], t["tool"], t["status"], t["waited"], t["duration"],
                       t["finished_at"], short(t["summary"] or t["reason"] or "", 36)]
                      for t in result],
                     ["ID", "STREAM", "TOOL", "STATUS", "WAITED", "RAN", "FINISHED", "SUMMARY"])
    if op == "scripts":
        return table([[s["name"], s["task_class"], s["timeout"], s["args"], s["description"]]
                      for s in result], ["NAME", "CLASS", "TIMEOUT", "ARGS", "DESCRIPTION"])
    if op == "workers":
        return table([[w["name"], w["kind"], w["pid"], w["state"], w["task"], w["done"],
                       w["restarts"], w["last_seen"]] for w in result],
                     ["NAME", "KIND", "PID", "STATE", "TASK", "DONE", "RESTARTS", "LAST SEEN"])
    if op == "locks":
        return table([[lk["lock"], lk["task"], lk["stream"], lk["worker"], lk["since"]]
                      for lk in result], ["LOCK", "TASK", "STREAM", "WORKER", "SINCE"])
    if op in ("peek", "claim", "task"):
        return show_task(result)
    if op in ("complete", "fail", "requeue", "cancel", "touch"):
        extra = f" (retry at {result['ready_at']})" if result["waiting_for"] == "retry" else ""
        return f"task {result['id']} {result['status']}{extra}"
    if op == "tasks":
        return show_tasks(result)
    if op == "stream.list":
        return show_streams(result)
    if op == "session.list":
        return show_sessions(result)
    if op.startswith(("session.", "stream.")):
        paused = " (paused)" if result.get("paused") else ""
        return f"{op.split('.')[0]} {result['name']} {result['status']}{paused}"
    if op == "purge":
        return f"purged {result['purged']} tasks"
    if op == "tools":
        return show_tools(result)
    if op == "shutdown":
        return "sparkqd is stopping"
    return show_status(result) if isinstance(result, dict) else json.dumps(result)


def follow_logs(client: Client, fields: dict, as_json: bool) -> int:
    """Print a task's output as it comes, until the task ends."""
    first = client.call("logs", **fields)
    print(json.dumps(first) if as_json else first["log"], end="" if not as_json else "\n",
          flush=True)
    if first["status"] in ("completed", "failed", "cancelled") and not first["running"]:
        return EXIT_OK
    while True:
        message = client.receive()
        if as_json:
            print(json.dumps(message), flush=True)
        elif "chunk" in message:
            print(message["chunk"], end="", flush=True)
        if message.get("end") or "error" in message:
            return EXIT_OK if message.get("end") else EXIT_REFUSED


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except BrokenPipeError:  # `sparkqctl tasks | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def run(argv: list[str] | None) -> int:
    parser = build_parser(only=command_given(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    if args.command == "work":
        return Worker(parser, args).run()
    if args.command == "service":
        return service(args)
    path = args.socket or default_socket_path()
    if args.command == "completion":
        names = " ".join(sorted(n for n in COMMANDS if not n.startswith("_")))
        print({"bash": COMPLETION_BASH, "zsh": COMPLETION_ZSH, "fish": COMPLETION_FISH}[
            args.shell].replace("@COMMANDS@", names), end="")
        return EXIT_OK
    if args.command == "__complete":
        print("\n".join(completion_names(path, args.kind)))
        return EXIT_OK
    if args.command == "top":
        try:
            return top(path)
        except Unreachable as exc:
            print(f"sparkqctl: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
    op, fields = to_request(parser, args)
    path = args.socket or default_socket_path()
    try:
        if op == "watch":
            return watch(path, fields)
        with Client(path) as client:
            if op == "logs" and fields.get("follow"):
                return follow_logs(client, fields, args.json)
            result = client.call(op, **fields)
    except Unreachable as exc:
        print(f"sparkqctl: {exc}\nIs the daemon running? Start it with `sparkqd` or "
              f"`systemctl --user start sparkqd`.", file=sys.stderr)
        return EXIT_UNREACHABLE
    except SparkQError as exc:
        print(f"sparkqctl: {exc.code}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if result is None and op in ("peek", "claim"):
        if args.json:
            print("null")
        return EXIT_EMPTY
    status = EXIT_OK
    if op == "wait":
        ended = [t["status"] for t in result["tasks"]]
        status = (EXIT_EMPTY if not result["done"] else
                  EXIT_OK if all(s == "completed" for s in ended) else EXIT_FAILED)
    if args.json:
        print(json.dumps(result["tasks"] if op == "wait" else result, indent=2))
    else:
        text = render(args, op, result)
        if text:
            print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
