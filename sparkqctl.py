"""sparkqctl: the SparkQ client for shell scripts, editors and agents.

It speaks JSON lines to sparkqd over its Unix socket. It imports only the
standard library, because every shell command that calls it pays its start-up
time. ``Client`` is the small Python API; ``main()`` is the command line.

The command line is one table, ``TABLE``: a ``Command`` record per command with
its arguments (``Arg``), the request fields they fill and how the reply is
shown. The argument parser, the request, the output and the bash, zsh and fish
completion scripts are all derived from it, and only the parser of the command
given is built.

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
ENDED = ("completed", "failed", "cancelled")


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


class SocketPathTooLong(Unreachable):
    """The socket path cannot be a Unix socket's: no daemon can listen there."""


#: The longest Unix socket path: sun_path is 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107


def starting(exc: SparkQError) -> bool:
    """Whether a refusal says the daemon is starting: recovering, answering nothing yet."""
    return exc.code == "unavailable" and str(exc).startswith("starting")


def default_socket_path(env=os.environ) -> str:
    """The socket of DESIGN.md's precedence: $SPARKQ_SOCKET, then the defaults."""
    if env.get("SPARKQ_SOCKET"):
        return env["SPARKQ_SOCKET"]
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "sparkq", "sparkqd.sock")
    return f"/tmp/sparkq-{os.getuid()}/sparkqd.sock"


def request_line(request: dict) -> bytes:
    """A request as the JSON line sent for it; its fields that are None are left out."""
    request = {k: v for k, v in request.items() if v is not None}
    return json.dumps(request, separators=(",", ":")).encode() + b"\n"


class Client:
    """A connection to sparkqd: ``Client().call("enqueue", tool="run-bash", payload="ls")``.

    ``call`` sends one request and returns its result. The worker loop is one call a
    task: ``call("complete", task=7, lease=L, claim_next={"stream": "ci", "wait": 30})``
    finishes task 7 and claims the next, returning the finished task with the claimed
    one (or None) under ``"next"``; ``fail`` takes ``claim_next`` too. Requests can be
    pipelined: ``send`` and ``send_many`` write without waiting, and ``receive`` reads
    the replies, one per request, in the order the requests were sent.
    """

    def __init__(self, path: str | None = None, timeout: float | None = None):
        self.path = path or default_socket_path()
        size = len(os.fsencode(self.path))
        if size > MAX_SOCKET_PATH:
            raise SocketPathTooLong(
                f"socket path is {size} bytes, more than the {MAX_SOCKET_PATH} a Unix socket "
                f"allows: {self.path}; choose a shorter one with --socket or SPARKQ_SOCKET")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as exc:
            self.sock.close()
            raise Unreachable(f"cannot reach sparkqd at {self.path}: "
                              f"{exc.strerror or exc}") from None
        self.buffer = bytearray()  #: bytes received and not yet read as messages
        self._scanned = 0  #: how much of ``buffer`` holds no newline
        self._next_id = 0

    def call(self, op: str, **fields):
        """Send one request and return its result, raising SparkQError on refusal."""
        return self.result(self.request(op, **fields))

    def request(self, op: str, **fields) -> dict:
        """Send one request and return the whole reply."""
        self.send(op, **fields)
        return self.receive()

    def send(self, op: str, **fields) -> None:
        """Send a request without waiting for its reply (read it with ``receive``)."""
        self.send_many([{"op": op, **fields}])

    def send_many(self, requests: list[dict]) -> None:
        """Send many requests in one write, without waiting; ``receive`` then reads their
        replies, one per request, in this order.

        Each request is a dict of ``"op"`` and that op's fields, like
        ``{"op": "enqueue", "tool": "run-bash", "payload": "make"}``, and gets the next
        ``id``. While the socket takes no more, the replies that arrive are read into
        memory, so a batch of any size goes through: the daemon answers a client that
        reads none of its replies only up to about 1 MiB of them.
        """
        lines = []
        for request in requests:
            self._next_id += 1
            lines.append(request_line({"op": request["op"], "id": self._next_id, **request}))
        self._write(b"".join(lines))

    def receive(self) -> dict:
        """The next reply, whole (``ok``, ``result`` or ``error``, ``id``), waiting for it;
        on a stream (watch, logs with follow), its next message."""
        while (end := self.buffer.find(b"\n", self._scanned)) < 0:
            self._scanned = len(self.buffer)  # a long reply is scanned once, not per chunk
            self._fill()
        line = self.buffer[:end]
        del self.buffer[:end + 1]
        self._scanned = 0
        return json.loads(line)

    def receive_ready(self) -> list[dict]:
        """The messages that have arrived, without waiting for more."""
        import select

        if self._poll(select.POLLIN, 0):
            self._fill()
        messages = []
        while b"\n" in self.buffer:
            messages.append(self.receive())
        return messages

    @staticmethod
    def result(reply: dict):
        """The result of a reply, raising SparkQError if it is a refusal."""
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise SparkQError(error.get("code", "internal"), error.get("message", "refused"))
        return reply.get("result")

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise Unreachable("sparkqd closed the connection")
        self.buffer += chunk

    def _write(self, data: bytes) -> None:
        """Write all of ``data``, reading what the daemon answers while it takes no more."""
        import select

        view = memoryview(data)
        while view:
            ready = self._poll(select.POLLIN | select.POLLOUT, self.sock.gettimeout())
            if not ready:
                raise TimeoutError(f"sparkqd at {self.path} took no request and sent no reply")
            if ready & ~select.POLLOUT:  # a reply came, or the daemon went
                self._fill()
            if ready & select.POLLOUT:
                try:
                    view = view[self.sock.send(view, socket.MSG_DONTWAIT):]
                except BlockingIOError:
                    pass

    def _poll(self, events: int, timeout: float | None) -> int:
        """Which of ``events`` the socket has (or POLLHUP, POLLERR), waiting up to
        ``timeout`` seconds for one. poll(), not select(): any descriptor number will do."""
        import select

        poller = select.poll()
        poller.register(self.sock, events)
        ready = poller.poll(None if timeout is None else timeout * 1000)
        return ready[0][1] if ready else 0

    def fileno(self) -> int:
        """The socket's descriptor, for select()."""
        return self.sock.fileno()

    def close(self) -> None:
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


def plain(value) -> str:
    """A value as people read it: lists as comma-separated text, maps as `key=value`
    pairs, nothing as `-`; never a Python repr."""
    if value is None or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(plain(item) for item in value)
    if isinstance(value, dict):
        return "  ".join(f"{key}={plain_inner(item)}" for key, item in value.items())
    return str(value)


def plain_inner(value) -> str:
    """A value inside a `key=value` pair: a map there is JSON, which cannot be misread."""
    return json.dumps(value) if isinstance(value, dict) and value else plain(value)


def pairs(rows) -> str:
    """(key, text) rows as two aligned columns, `key:` padded to the longest key; the
    later lines of a text of many lines are indented to its column."""
    rows = list(rows)
    width = max((len(key) for key, _ in rows), default=0) + 2
    return "\n".join(f"{key + ':':{width}}{text}".rstrip().replace("\n", "\n" + " " * width)
                     for key, text in rows)


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [["-" if c is None else plain(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


TASK_FIELDS = ("id", "status", "waiting_for", "stream", "session", "tool", "task_class",
               "priority", "timeout", "attempts", "max_attempts", "worker", "created_at",
               "ready_at", "started_at", "finished_at", "after", "key", "lock", "lease",
               "lease_expires_at", "summary", "reason", "result")


def show_task(task: dict) -> str:
    rows = [(k, json.dumps(task[k]) if k == "result" else plain(task[k]))
            for k in TASK_FIELDS if task.get(k) not in (None, [])]
    payload = task.get("payload")
    if payload is not None:
        rows.append(("payload", payload if isinstance(payload, str)
                     else json.dumps(payload, indent=2)))
    lines = [pairs(rows)]
    for h in task.get("history") or ():
        by = f" by {h['by']}" if h.get("by") else ""
        note = f": {h['note']}" if h.get("note") else ""
        lines.append(f"  {h['at']}  {h['status']}{by}{note}")
    return "\n".join(lines)


def show_tasks(tasks: list) -> str:
    return table([[t["id"], t["stream"], t["tool"], t["status"], t["attempts"], t["created_at"],
                   short(t["payload"])] for t in tasks],
                 ["ID", "STREAM", "TOOL", "STATUS", "ATTEMPTS", "CREATED", "PAYLOAD"])


def show_outcome(task: dict) -> str:
    """A task after a change of state: `task 7 waiting (retry at ...)`."""
    extra = f" (retry at {task['ready_at']})" if task["waiting_for"] == "retry" else ""
    return f"task {task['id']} {task['status']}{extra}"


def show_enqueued(task: dict) -> str:
    """`enqueue`: the id alone on stdout; a task that was there already says so on stderr."""
    if task.get("existing"):
        print(f"sparkqctl: existing task {task['id']} has key {task['key']}: "
              f"returned instead of a new one", file=sys.stderr)
    return str(task["id"])


def show_requeued(result: dict) -> str:
    if "requeued" in result:
        return f"requeued {result['requeued']} tasks"
    return show_outcome(result)


def show_history(tasks: list) -> str:
    return table([[t["id"], t["stream"], t["tool"], t["status"], t["waited"], t["duration"],
                   t["finished_at"], short(t["summary"] or t["reason"] or "", 36)] for t in tasks],
                 ["ID", "STREAM", "TOOL", "STATUS", "WAITED", "RAN", "FINISHED", "SUMMARY"])


def show_streams(streams: list) -> str:
    return table([[s["name"], s["session"], s["status"], bool(s.get("paused")),
                   *s["counts"].values()] for s in streams],
                 ["NAME", "SESSION", "STATUS", "PAUSED",
                  *(k.upper() for k in (streams[0]["counts"] if streams else []))])


def show_sessions(sessions: list) -> str:
    return table([[s["name"], s["status"], s["created_at"], s["streams"]]
                  for s in sessions], ["NAME", "STATUS", "CREATED", "STREAMS"])


def shown_as(kind: str):
    """The human form of a session or stream after a change: `stream w1 active (paused)`."""
    return lambda record: (f"{kind} {record['name']} {record['status']}"
                           + (" (paused)" if record.get("paused") else ""))


def show_scripts(scripts: list) -> str:
    return table([[s["name"], s["task_class"], s["timeout"], s["args"], s["description"]]
                  for s in scripts], ["NAME", "CLASS", "TIMEOUT", "ARGS", "DESCRIPTION"])


def show_workers(workers: list) -> str:
    return table([[w["name"], w["kind"], w["pid"], w["state"], w["task"], w["done"],
                   w["restarts"], w["last_seen"]] for w in workers],
                 ["NAME", "KIND", "PID", "STATE", "TASK", "DONE", "RESTARTS", "LAST SEEN"])


def show_locks(locks: list) -> str:
    return table([[lk["lock"], lk["task"], lk["stream"], lk["worker"], lk["since"]]
                  for lk in locks], ["LOCK", "TASK", "STREAM", "WORKER", "SINCE"])


# repository workspaces

def size(nbytes) -> str:
    """Bytes as people read them: 912K, 40M, 1.2G."""
    if nbytes is None:
        return "-"
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale:
            whole = nbytes >= 10 * scale
            return f"{nbytes // scale}{unit}" if whole else f"{nbytes / scale:.1f}{unit}"
    return f"{nbytes}B"


def show_workspaces(workspaces: list) -> str:
    return table([[w["repo"], w["kind"], w["task"], w["branch"], size(w["bytes"]), w["state"],
                   "-" if w["idle"] is None else age(w["idle"])] for w in workspaces],
                 ["REPO", "KIND", "TASK", "BRANCH", "SIZE", "STATE", "IDLE"])


def show_workspace(result: dict) -> str:
    lines = [f"repo:      {result['repo']}", f"directory: {result['path']}"]
    for w in result["workspaces"]:
        lines.append(f"\n{w['kind']} {w['id']}: {w['state']}, {size(w['bytes'])}")
        lines += [f"  {key + ':':13}{w[key]}" for key in (
            "path", "task", "task_status", "branch", "ref", "commit", "url", "created_at",
            "released_at", "stash") if w.get(key) is not None]
    lines += ["\nsaved:"] + [f"  {path}" for path in result["saved"]] if result["saved"] else []
    return "\n".join(lines)


def show_removed(result: dict) -> str:
    saved = f"; its changes are saved in {result['patch']}" if result["patch"] else ""
    return f"removed workspace {result['removed']} ({result['path']}){saved}"


def show_collected(report: dict) -> str:
    verb = "would remove" if report["dry_run"] else "removed"
    lines = [f"{verb} {w['kind']} {w['id']}: {w['reason']}"
             + (f"; saved {w['patch']}" if w.get("patch") else "") for w in report["removed"]]
    lines += [f"kept {w['kind']} {w['id']}: {w['why']}" for w in report["kept"]]
    return "\n".join(lines) or "no workspaces"


def show_status(status: dict) -> str:
    lines = []
    for key, value in status.items():
        if isinstance(value, dict):
            value = "  ".join(f"{k}={v}" for k, v in value.items())
        lines.append(f"{key + ':':12}{value}")
    return "\n".join(lines)


def show_plain(result) -> str:
    """A result no command shows its own way: aligned `key: value` lines, else plain text."""
    if isinstance(result, dict):
        return pairs((key, plain(value)) for key, value in result.items())
    return plain(result)


def show_tools(result: dict) -> str:
    tools = table([[n, t["task_class"], t["timeout"], t["max_attempts"],
                    " ".join(t["command"]) if t["command"] else "(claimed by agents)",
                    t["description"]] for n, t in result["tools"].items()],
                  ["TOOL", "CLASS", "TIMEOUT", "ATTEMPTS", "COMMAND", "DESCRIPTION"])
    classes = table([[n, c["timeout"], c["max_attempts"], c["retry_backoff"]]
                     for n, c in result["task_classes"].items()],
                    ["CLASS", "TIMEOUT", "ATTEMPTS", "BACKOFF"])
    return tools + "\n\n" + classes


def ids_of(result) -> str | None:
    """The -q form of a result: the ids (or names) it holds, one a line."""
    if isinstance(result, list):
        return "\n".join(str(r.get("id", r.get("name"))) for r in result) or None
    if isinstance(result, dict) and "id" in result:
        return str(result["id"])
    return None


# ---------------------------------------------------------------------------
# sparkqctl start: sparkqd in the background
# ---------------------------------------------------------------------------

#: What a service manager hands its own child only: a daemon started by hand takes none.
SERVICE_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID",
                     "LISTEN_FDS", "LISTEN_FDNAMES")
#: How long `start` waits for a first answer, "starting" included.
START_TIMEOUT = 30.0


def state_dir(args) -> str:
    """Where `start` keeps sparkqd's log: the data directory the daemon will use, unless its
    configuration moves that (the client reads no configuration)."""
    if args.data_dir or os.environ.get("SPARKQ_DATA_DIR"):
        return os.path.abspath(args.data_dir or os.environ["SPARKQ_DATA_DIR"])
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "sparkq")


def sparkqd_command(args) -> list[str]:
    """The sparkqd to start: the sparkqd.py beside this file (a checkout, or where pip put
    both modules), else the installed module; with the paths given to `start`."""
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sparkqd.py")
    argv = [sys.executable, beside] if os.path.exists(beside) else [sys.executable, "-m",
                                                                     "sparkqd"]
    for flag, value in (("--socket", args.socket), ("--config", args.config),
                        ("--data-dir", args.data_dir)):
        argv += [flag, value] if value else []
    return argv


def launch(args, log_path: str):
    """Start sparkqd detached: a session of its own, stdin /dev/null, its output appended to
    ``log_path``; the process and where in the log its output begins."""
    import subprocess

    os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        offset = os.lseek(log, 0, os.SEEK_END)
        env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
        proc = subprocess.Popen(sparkqd_command(args), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finally:
        os.close(log)
    return proc, offset


def log_since(log_path: str, offset: int) -> str:
    with open(log_path, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        return f.read()


def probe(path: str) -> str | None:
    """"ready" if sparkqd answers on ``path``, its "starting (...)" refusal while it
    recovers, None if nothing answers there."""
    try:
        with Client(path, timeout=5) as client:
            client.call("hello")
        return "ready"
    except SocketPathTooLong:
        raise
    except (Unreachable, OSError):
        return None
    except SparkQError as exc:
        if starting(exc):
            return str(exc)
        raise


def await_daemon(proc, path: str, log_path: str, offset: int) -> str | None:
    """Wait until the started sparkqd answers on ``path``, for as long as it says it is
    starting: None then, else why not."""
    import time

    launched = time.monotonic()
    deadline, told = launched + START_TIMEOUT, False
    while (state := probe(path)) != "ready":
        if proc.poll() is not None:
            tail = "".join(log_since(log_path, offset).splitlines(True)[-20:])
            return (f"sparkqd exited with status {proc.returncode} before it answered; "
                    f"its output ({log_path}):\n{tail.rstrip()}")
        # Ready on another socket (its config's server.socket) is a mistake to name; ready
        # on this one is a race with the probe above: the next probe sees it.
        elsewhere = re.search(r" ready: socket (.+), data ", log_since(log_path, offset))
        if elsewhere and os.path.realpath(elsewhere[1]) != os.path.realpath(path):
            return (f"sparkqd is ready on {elsewhere[1]} (its configuration's server.socket), "
                    f"not on {path} where sparkqctl looks: export SPARKQ_SOCKET={elsewhere[1]}")
        now = time.monotonic()
        if state is not None:  # recovering: a long journal takes its time
            deadline = now + START_TIMEOUT
            if now - launched > 1 and not told:
                print(f"sparkqctl: sparkqd is {state}; waiting for it", file=sys.stderr,
                      flush=True)
                told = True
        elif now > deadline:
            return (f"sparkqd (pid {proc.pid}) has not answered on {path} within "
                    f"{START_TIMEOUT:g} s; see {log_path}")
        time.sleep(0.02)
    return None


def describe(path: str, log_path: str | None, args) -> None:
    """Print where the daemon on ``path`` listens and keeps its files."""
    with Client(path, timeout=5) as client:
        status = client.call("status")
    if args.json:
        print(json.dumps({**status, "log": log_path}, indent=2))
    elif not args.quiet:
        rows = [("pid", status["pid"]), ("socket", status["socket"]),
                ("config", status["config"] or "built-in defaults"),
                ("data_dir", status["data_dir"]), ("cwd", status.get("cwd")), ("log", log_path)]
        print(pairs((key, plain(value)) for key, value in rows if value is not None))


def start(args) -> int:
    """`sparkqctl start`: 0 once the daemon it started answers (or one answered already),
    1 with the daemon's own words if it exits first."""
    path = args.socket or default_socket_path()
    try:
        state = probe(path)
        if state is not None:
            if state != "ready":
                wait_while_starting(path)
            say(args, "sparkqd is already running")
            describe(path, None, args)
            return EXIT_OK
        log_path = os.path.join(state_dir(args), "sparkqd.log")
        proc, offset = launch(args, log_path)
        problem = await_daemon(proc, path, log_path, offset)
        if problem is None:
            say(args, f"started sparkqd {VERSION}")
            describe(path, log_path, args)
            return EXIT_OK
    except Unreachable as exc:  # the socket path is too long, or the daemon died at once
        problem = str(exc)
    except SparkQError as exc:
        problem = f"{exc.code}: {exc}"
    print(f"sparkqctl: {problem}", file=sys.stderr)
    return EXIT_REFUSED


def say(args, line: str) -> None:
    """A line for people: not with --json or -q."""
    if not args.json and not args.quiet:
        print(line)


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


#: What a run learns of its repository workspace; never inherited from the worker's own task.
WORKSPACE_VARIABLES = ("SPARKQ_WORKSPACE", "SPARKQ_REPO", "SPARKQ_REF", "SPARKQ_BRANCH")


class Worker:
    """Claim tasks and run COMMAND for each, ``--concurrency`` at a time.

    A slot that finishes a task reports it and claims its next one in the same request
    (``claim_next``, which does not wait); only when that finds nothing does it wait in a
    plain `claim`. The first SIGINT or SIGTERM stops claiming and lets running commands
    finish (exit 0); a second kills them, records their attempts failed and exits 1.
    """

    #: The reason of an attempt a second signal ended (or kept from starting).
    STOPPED = "interrupted: worker stopped"

    def __init__(self, args):
        import threading

        self.command = args.run
        self.path = args.socket or default_socket_path()
        prefix = args.worker or f"{socket.gethostname()}:{os.getpid()}"
        #: Each slot's claim: the command line's filters and the slot's worker name.
        self.claims = [{"stream": args.stream, "tool": args.tool, "worker": f"{prefix}/{n}"}
                       for n in range(1, args.concurrency + 1)]
        self.stopping = threading.Event()
        self.killed = False  #: a second signal came: running commands die, no more start
        self.failed = False  #: a slot lost the daemon or was refused
        # Reentrant: a signal that comes while the handler holds it runs the handler again.
        self.lock = threading.RLock()
        self.procs: dict[int, object] = {}  # task id -> Popen
        self.clients: list[Client] = []  #: the connections slots wait on in `claim`

    def run(self) -> int:
        import signal
        import threading

        try:
            wait_while_starting(self.path)
        except Unreachable as exc:
            return unreachable(exc)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        slots = [threading.Thread(target=self._slot, args=(claim,), daemon=True)
                 for claim in self.claims]
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

    def _slot(self, claim: dict) -> None:
        """Claim and run tasks until stopped. Reports go over a connection of their own,
        which the first signal leaves open: a task claimed with a report still runs."""
        try:
            with Client(self.path) as claimer, Client(self.path) as reporter:
                self.clients.append(claimer)
                task = None
                while task is not None or not self.stopping.is_set():
                    if task is None:
                        task = claimer.call("claim", **claim, pid=os.getpid(), wait=30)
                    else:
                        task = self._execute(reporter, task, claim)
        except Unreachable:
            if not self.stopping.is_set():
                print("sparkqctl work: lost the daemon", file=sys.stderr)
                self.failed = True
        except SparkQError as exc:
            print(f"sparkqctl work: {exc.code}: {exc}", file=sys.stderr)
            self.failed = True

    def _execute(self, client: Client, task: dict, claim: dict) -> dict | None:
        """Run COMMAND for a task and report how it ended; the next task, if the report
        claimed one."""
        import time

        payload = task["payload"]
        argv = [*self.command, *([payload] if isinstance(payload, str) else [])]
        started = time.monotonic()
        try:
            proc = self._start(task["id"], argv, self._environment(task))
        except OSError as exc:
            return self._finish(client, task, claim, op="fail",
                                reason=f"cannot start: {exc.strerror}")
        if proc is None:
            return self._finish(client, task, claim, op="fail", reason=self.STOPPED)
        code = self._wait(client, task, proc)
        if self.killed:
            return self._finish(client, task, claim, op="fail", reason=self.STOPPED)
        if code == 0:
            return self._finish(client, task, claim, op="complete", result={
                "exit_code": 0, "duration": round(time.monotonic() - started, 3)})
        why = f"exit code {code}" if code > 0 else f"killed by signal {-code}"
        return self._finish(client, task, claim, op="fail", reason=why)

    def _environment(self, task: dict) -> dict:
        payload = task["payload"]
        workspace = task.get("workspace") or {}
        where = {"SPARKQ_WORKSPACE": workspace["path"], "SPARKQ_REPO": task["repo"],
                 "SPARKQ_REF": workspace["ref"] or "",
                 "SPARKQ_BRANCH": workspace["branch"] or ""} if workspace.get("path") else {}
        inherited = {k: v for k, v in os.environ.items() if k not in WORKSPACE_VARIABLES}
        return dict(inherited, SPARKQ_TASK_ID=str(task["id"]), SPARKQ_STREAM=task["stream"],
                    SPARKQ_SESSION=task["session"], SPARKQ_TOOL=task["tool"],
                    SPARKQ_ATTEMPT=str(task["attempts"]), SPARKQ_SOCKET=self.path,
                    SPARKQ_PAYLOAD=payload if isinstance(payload, str) else json.dumps(payload),
                    **where)

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
                                    cwd=env.get("SPARKQ_WORKSPACE"), start_new_session=True)
            self.procs[task_id] = proc
            return proc

    def _wait(self, client: Client, task: dict, proc) -> int:
        """Wait for a command to end, touching the task's lease meanwhile; its exit code."""
        import subprocess

        heartbeat = max(0.5, seconds_until(task["lease_expires_at"]) / 3)
        while True:
            try:
                code = proc.wait(timeout=heartbeat)
                break
            except subprocess.TimeoutExpired:
                try:
                    client.call("touch", task=task["id"], lease=task["lease"])
                except SparkQError as exc:
                    print(f"sparkqctl work: task {task['id']}: touch refused: {exc}",
                          file=sys.stderr)
        with self.lock:
            del self.procs[task["id"]]
        return code

    def _finish(self, client: Client, task: dict, claim: dict, op: str, **fields) -> dict | None:
        """Complete or fail a task and, unless stopping, claim the next in the same request;
        the task claimed, or None."""
        claim_next = None if self.stopping.is_set() else claim
        try:
            finished = client.call(op, task=task["id"], lease=task["lease"],
                                   claim_next=claim_next, **fields)
        except SparkQError as exc:
            print(f"sparkqctl work: task {task['id']}: {op} refused: {exc}", file=sys.stderr)
            return None
        return finished.get("next")


# ---------------------------------------------------------------------------
# sparkqctl watch, top, completion
# ---------------------------------------------------------------------------


def watch(command, client: Client, fields: dict, args) -> int:
    """Print each event as one JSON line, flushed, until the daemon or the reader goes."""
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


class Top:
    """`sparkqctl top`: the queue on one screen, redrawn when events arrive."""

    def __init__(self, path: str | None):
        import collections

        self.client = Client(path)
        self.events = Client(path)  #: a `watch` connection, read without blocking
        self.events.call("watch")
        self.finished = collections.deque(maxlen=100_000)  # (epoch seconds, stream)
        self.selected = 0
        self.message = ""
        self.refresh()

    def refresh(self) -> None:
        """Fetch what the screen shows, in one pipelined round trip."""
        requests = [{"op": "stream.list"}, {"op": "tasks", "status": "running"}, {"op": "locks"},
                    {"op": "workers"}, {"op": "history", "status": "failed", "limit": 5},
                    {"op": "schedule.list"}, {"op": "workspace.list"}]
        self.client.send_many(requests)
        results = [Client.result(self.client.receive()) for _ in requests]
        (streams, self.running, self.locks, self.workers, self.failures, schedules,
         self.workspaces) = results
        self.schedules = sorted((s for s in schedules if s["next_at"]), key=lambda s: s["next_at"])
        self.streams = [s for s in streams if s["status"] != "ended"]
        self.selected = min(self.selected, max(0, len(self.streams) - 1))
        if not self.finished:
            for task in self.client.call("history", since=iso_ago(60), limit=100_000):
                self.finished.append((parse_iso(task["finished_at"]), task["stream"]))

    def take_events(self) -> bool:
        events = self.events.receive_ready()
        for event in events:
            if event.get("event") in ("task.completed", "task.failed", "task.cancelled"):
                self.finished.append((parse_iso(event["at"]), event["task"]["stream"]))
        return bool(events)

    def per_minute(self, stream: str) -> int:
        import time

        since = time.time() - 60
        return sum(1 for at, name in self.finished if at >= since and name == stream)

    def lines(self, width: int, height: int, interactive: bool = True) -> list[tuple[str, bool]]:
        """The screen as (text, highlighted) lines, cut to fit width x height; with the
        cursor and the key help only where keys work (``interactive``)."""
        import time

        now = time.time()
        busy = sum(1 for w in self.workers if w["state"] == "busy")
        counts = ("pending", "waiting", "running", "completed", "failed")
        head = [(f"sparkq top  {time.strftime('%H:%M:%S')}  workers {busy}/{len(self.workers)} "
                 f"busy  locks {len(self.locks)}  {self.message}", False),
                (f"  {'STREAM':16} {'SESSION':12} {'PEND':>5} {'WAIT':>5} {'RUN':>4} "
                 f"{'DONE':>6} {'FAIL':>5} {'/MIN':>5}", True)]
        cursor = self.selected if interactive else -1
        streams = [(f"{'>' if i == cursor else ' '} {s['name'][:16]:16} "
                    f"{s['session'][:12]:12} " + " ".join(
                        f"{s['counts'].get(k, 0):>{w}}" for k, w in zip(counts, (5, 5, 4, 6, 5)))
                    + f" {self.per_minute(s['name']):>5}" + ("  paused" if s.get("paused") else ""),
                    i == cursor) for i, s in enumerate(self.streams)]
        running = [(f"  {t['id']:>6} {t['stream'][:12]:12} {t['tool'][:12]:12} "
                    f"{(t['worker'] or '-')[:14]:14} {age(now - parse_iso(t['started_at'])):>6} "
                    f"lease {age(parse_iso(t['lease_expires_at']) - now) if t['lease_expires_at'] else '-':>6}",
                    False) for t in self.running]
        locks = [(f"  {lk['lock'][:50]:50} task {lk['task']}", False) for lk in self.locks]
        workers = [(f"  {w['name'][:24]:24} {w['kind']:8} {w['state']:6} "
                    f"task {w['task'] or '-':<7} done {w['done']}", False) for w in self.workers]
        failures = [(f"  {t['id']:>6} {t['stream'][:12]:12} {(t['reason'] or '').splitlines()[0][:55] if t['reason'] else ''}",
                     False) for t in self.failures]
        firings = [(f"  {s['next_at'][:19].replace('T', ' ')} UTC  {s['name'][:24]:24} "
                    f"{s['stream'][:12]:12} last {s['last_outcome'] or '-'}", False)
                   for s in self.schedules]
        workspaces = [(f"  {w['repo'][:32]:32} {w['kind']:8} task {w['task'] or '-':<7} "
                       f"{w['state']:9} {size(w['bytes']):>6}", False) for w in self.workspaces]
        sections = [("RUNNING", running), ("LOCKS", locks), ("WORKERS", workers),
                    ("RECENT FAILURES", failures), ("NEXT FIRINGS", firings),
                    ("WORKSPACES", workspaces)]
        out = head + streams
        room = height - len(out) - 1 - len(sections)
        for title, rows in sections:
            share = max(1, room // len(sections))
            out.append((f"{title} ({len(rows)})", True))
            out.extend(rows[:share])
        if interactive:
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

    def print_plain(self) -> int:
        """The screen once, as plain lines: no cursor, no key help (for a pipe or a file)."""
        for text, _ in self.lines(200, 1000, interactive=False):
            print(text)
        return EXIT_OK


def top(args) -> int:
    """`sparkqctl top`: curses in a terminal; piped, one plain snapshot."""
    try:
        wait_while_starting(args.socket)
        view = Top(args.socket)
        if not sys.stdout.isatty():
            return view.print_plain()
        import curses

        return curses.wrapper(view.run_terminal)
    except Unreachable as exc:
        return unreachable(exc)
    except SparkQError as exc:
        print(f"sparkqctl: {exc.code}: {exc}", file=sys.stderr)
        return EXIT_REFUSED


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


#: What `sparkqctl __complete KIND` lists: the request for it, and the names in its result.
NAME_SOURCES = {
    "streams": ({"op": "stream.list"}, lambda streams: [s["name"] for s in streams]),
    "sessions": ({"op": "session.list"}, lambda sessions: [s["name"] for s in sessions]),
    "tasks": ({"op": "tasks"}, lambda tasks: [str(i) for i in sorted(t["id"] for t in tasks)]),
    "scripts": ({"op": "scripts"}, lambda scripts: [s["name"] for s in scripts]),
    "tools": ({"op": "tools"}, lambda result: list(result["tools"])),
    "schedules": ({"op": "schedule.list"}, lambda schedules: [s["name"] for s in schedules]),
}


def print_names(args) -> int:
    """`sparkqctl __complete KIND`: names from the running daemon; none if it is not there."""
    request, names = NAME_SOURCES.get(args.kind, NAME_SOURCES["tools"])
    try:
        with Client(args.socket, timeout=2) as client:
            found = names(client.call(**request))
    except (Unreachable, SparkQError, OSError):
        found = []
    print("\n".join(found))
    return EXIT_OK


#: Where bash and zsh differ in the completion function: the words of the line, the
#: index of the first after "sparkqctl", how files and the words found are offered.
SHELLS = {
    "bash": {"head": "# sparkqctl completion for bash: source <(sparkqctl completion bash)",
             "words": "COMP_WORDS", "current": "COMP_CWORD", "first": "1",
             "files": 'COMPREPLY=($(compgen -f -- "$cur")); return',
             "offer": 'COMPREPLY=($(compgen -W "$offer" -- "$cur"))',
             "register": "complete -o nosort -F _sparkqctl sparkqctl"},  # ids in order
    "zsh": {"head": "#compdef sparkqctl\n"
                    "# sparkqctl completion for zsh: source <(sparkqctl completion zsh)",
            "words": "words", "current": "CURRENT", "first": "2", "files": "_files; return",
            "offer": "compadd -V sparkqctl -- ${=offer}",  # -V: unsorted, ids in order
            "register": "compdef _sparkqctl sparkqctl"},
}

#: The bash and zsh completion function; @case@ is what the table says to offer.
SHELL_SCRIPT = r"""@head@
_sparkqctl() {
    local cur="${@words@[@current@]}" prev="${@words@[@current@-1]}" cmd="" offer="" i
    for ((i = @first@; i < @current@; i++)); do
        case "${@words@[i]}" in
            @valued@) ((i++));;
            -*) ;;
            *) cmd="${@words@[i]}"; break;;
        esac
    done
@case@
    @offer@
}
@register@
"""

FISH_SCRIPT = """# sparkqctl completion for fish: sparkqctl completion fish | source
function __fish_sparkqctl_after --description 'the command is $argv[1] and the last word $argv[2]'
    set -l words (commandline -opc)
    contains -- $argv[1] $words; and test "$words[-1]" = "$argv[2]"
end
complete -c sparkqctl -f
"""


def completed_commands() -> list:
    """The commands the shells complete: all but the hidden."""
    return [command for command in TABLE if not command.hidden]


def completed_arguments():
    """(command, the command or action it is of, argument) for every argument completed."""
    for command in completed_commands():
        for leaf in (command, *command.actions):
            for arg in flatten(leaf.args):
                yield command, leaf, arg


def completion_rules() -> tuple[dict, dict]:
    """What completes a word, from the table: ``values`` maps (command, word before it) to
    what is offered (a kind of `__complete`, "files", or a list of words; command "*" is
    any), ``options`` each command ("" before any) to its option flags."""
    anywhere = [flag for option in GLOBAL_OPTIONS for flag in option.flags]
    values = {("*", flag): option.words for option in GLOBAL_OPTIONS if option.words
              for flag in option.flags}
    options = {"": anywhere + ["--version"]}
    for command in completed_commands():
        options[command.name] = list(anywhere)
        if command.actions:
            values[(command.name, command.name)] = [action.name for action in command.actions]
    for command, leaf, arg in completed_arguments():
        flags = options[command.name]
        flags += [flag for flag in arg.flags if arg.is_option and flag not in flags]
        for before in arg.flags if arg.is_option else (leaf.name,):
            if arg.words:
                values[(command.name, before)] = arg.words
    return values, options


def shell_case(shell: str) -> str:
    """The bash or zsh code that sets what to offer: after a dash, the command's options;
    else what the word before calls for; else, before any command, the commands."""
    values, options = completion_rules()
    offered: dict[object, list[str]] = {}
    for (command, before), words in values.items():
        offered.setdefault(words if isinstance(words, str) else tuple(words), []).append(
            f"{command}:{before}")
    lines = ['    if [[ "$cur" == -* ]]; then', '        case "$cmd" in']
    for name, flags in options.items():
        pattern = name or '""'  # no command yet
        lines.append(f'            {pattern}) offer="{" ".join(flags)}";;')
    lines += ["        esac", "    else", '        case "$cmd:$prev" in']
    for words, keys in offered.items():
        if words == "files":
            action = SHELLS[shell]["files"]
        elif isinstance(words, str):
            action = f'offer="$(sparkqctl __complete {words} 2>/dev/null)"'
        else:
            action = f'offer="{" ".join(words)}"'
        lines.append(f"            {'|'.join(keys)}) {action};;")
    commands = " ".join(command.name for command in TABLE if not command.hidden)
    lines += [f'            :*) offer="{commands}";;', "        esac", "    fi"]
    return "\n".join(lines)


def fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def fish_words(words) -> str:
    if isinstance(words, str):
        return fish_quote(f"(sparkqctl __complete {words} 2>/dev/null)")
    return fish_quote(" ".join(words))


def fish_option(arg, command: str | None) -> str:
    """The fish `complete` line of an option (of one command, or of any)."""
    line = "complete -c sparkqctl"
    if command:
        line += f" -n '__fish_seen_subcommand_from {command}'"
    for flag in arg.flags:
        line += f" -l {flag[2:]}" if flag.startswith("--") else f" -s {flag[1:]}"
    if arg.takes_value:
        line += " -rF" if arg.words == "files" else " -x"
    if arg.words and arg.words != "files":
        line += f" -ka {fish_words(arg.words)}"  # -k: in the daemon's order, ids by number
    if arg.help:
        line += f" -d {fish_quote(arg.help)}"
    return line


def fish_script() -> str:
    commands = completed_commands()
    names = " ".join(command.name for command in commands)
    lines = [f"complete -c sparkqctl -n __fish_use_subcommand -a {fish_quote(names)}"]
    lines += [fish_option(option, None) for option in GLOBAL_OPTIONS]
    after = "complete -c sparkqctl -n '__fish_sparkqctl_after {} {}' -fka {}"
    lines += [after.format(command.name, command.name, fish_words([a.name for a in command.actions]))
              for command in commands if command.actions]
    for command, leaf, arg in completed_arguments():
        if arg.is_option:
            lines.append(fish_option(arg, command.name))
        elif arg.words:
            lines.append(after.format(command.name, leaf.name, fish_words(arg.words)))
    return FISH_SCRIPT + "\n".join(dict.fromkeys(lines)) + "\n"


def print_completion(args) -> int:
    """`sparkqctl completion bash|zsh|fish`: the shell's completion script, from the table."""
    if args.shell == "fish":
        print(fish_script(), end="")
        return EXIT_OK
    valued = "|".join(f for option in GLOBAL_OPTIONS if option.takes_value for f in option.flags)
    script = SHELL_SCRIPT.replace("@case@", shell_case(args.shell)).replace("@valued@", valued)
    for key, text in SHELLS[args.shell].items():
        script = script.replace(f"@{key}@", text)
    print(script, end="")
    return EXIT_OK


# ---------------------------------------------------------------------------
# Command line: the table of commands, and what is derived from it
# ---------------------------------------------------------------------------


#: Stands for argparse.SUPPRESS, which argparse tests by identity: ``Arg.add_to`` swaps it in.
SUPPRESS = "==SUPPRESS=="


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
    import argparse

    for parse in (lambda: iso_ago(duration(text)), lambda: moment(text)):
        try:
            return parse()
        except (argparse.ArgumentTypeError, OverflowError):
            pass
    raise argparse.ArgumentTypeError(
        f"{text!r} is not RFC 3339, 'YYYY-MM-DD HH:MM' or a duration ago like 30m, 2h, 1d")


def id_list(text: str) -> list[int]:
    import argparse

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of task ids") from None


def json_value(text: str):
    """A JSON value given on the command line."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None


def file_text(path: str) -> str:
    """The text of a file, or of standard input for -."""
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"{exc.strerror}: {path}") from None


def repo_arg(text: str) -> str:
    """A repository as given: a URL stays as it is, a local path is made absolute."""
    if "://" in text or re.match(r"^[\w.-]+@[\w.-]+:", text):
        return text
    return os.path.abspath(os.path.expanduser(text))


def default_stream() -> str:
    return os.environ.get("SPARKQ_STREAM") or "default"


def default_worker() -> str | None:
    return os.environ.get("SPARKQ_WORKER")


class Arg:
    """One argument: what argparse is told of it, and the request field its value fills.

    ``flags`` and ``options`` go to argparse's ``add_argument`` as they are. ``field`` is
    the request field (default: argparse's dest); a value None or False is not sent.
    ``load`` turns the text given into the value sent; its ValueError is a usage error
    that names the flag. ``default_from`` gives, after parsing, the value of an argument
    not given (an environment default; ``{default}`` in the help shows it). ``complete``
    is what the shells offer for the value: a kind of `__complete` (streams, sessions,
    tasks, tools, scripts) or "files"; ``choices`` are offered without it. ``sent=False``:
    an option of the client's own, read from the parsed arguments, never sent.
    """

    def __init__(self, *flags, field=None, load=None, default_from=None, complete=None,
                 sent=True, **options):
        self.flags, self.options = flags, options
        self.is_option = flags[0].startswith("-")
        long = next((f[2:] for f in flags if f.startswith("--")), flags[0])
        self.dest = options.get("dest") or long.replace("-", "_")
        self.field = field or self.dest
        self.load, self.default_from, self.complete = load, default_from, complete
        self.sent = sent

    @property
    def words(self):
        return self.complete or self.options.get("choices")

    @property
    def takes_value(self) -> bool:
        return self.is_option and self.options.get("action") != "store_true"

    @property
    def help(self) -> str | None:
        text = self.options.get("help")
        if text is None or text == SUPPRESS:
            return text
        return text.format(default=self.default_from()) if self.default_from else text

    def add_to(self, parser, **overrides) -> None:
        import argparse

        options = {**self.options, "help": self.help, **overrides}
        parser.add_argument(*self.flags, **{key: argparse.SUPPRESS if value is SUPPRESS else value
                                            for key, value in options.items()})

    def settle(self, args) -> None:
        if self.default_from and getattr(args, self.dest) is None:
            setattr(args, self.dest, self.default_from())

    def fill(self, parser, args, fields: dict) -> None:
        value = getattr(args, self.dest)
        if value is None or value is False or not self.sent:
            return
        if self.load:
            try:
                value = self.load(value)
            except ValueError as exc:
                parser.error(f"{self.flags[0]}: {exc}")
        fields[self.field] = value


class Group:
    """Arguments of which one at most may be given (``required``: exactly one)."""

    def __init__(self, *args: Arg, required: bool = False):
        self.args, self.required = args, required

    def add_to(self, parser) -> None:
        group = parser.add_mutually_exclusive_group(required=self.required)
        for arg in self.args:
            arg.add_to(group)

    def settle(self, args) -> None:
        for arg in self.args:
            arg.settle(args)

    def fill(self, parser, args, fields: dict) -> None:
        for arg in self.args:
            arg.fill(parser, args, fields)


def given_task(parser, args, required: bool = True) -> int | None:
    """The task id given as ID or as --task-id ID (giving both is a usage error)."""
    if args.task is not None and args.task_opt is not None:
        parser.error("give the task id once, as ID or --task-id ID")
    task = args.task if args.task is not None else args.task_opt
    if task is None and required:
        parser.error("give the task id, as ID or --task-id ID")
    return task


class TaskId(Group):
    """The task a command names, as ID or --task-id ID: request field ``task``."""

    def __init__(self, required: bool = True):
        super().__init__(Arg("task", nargs="?", type=int, metavar="ID", complete="tasks"),
                         Arg("--task-id", type=int, dest="task_opt", metavar="ID",
                             complete="tasks"), required=required)

    def add_to(self, parser) -> None:
        for arg in self.args:
            arg.add_to(parser)

    def fill(self, parser, args, fields: dict) -> None:
        task = given_task(parser, args, self.required)
        if task is not None:
            fields["task"] = task


def flatten(args) -> list[Arg]:
    return [part for arg in args for part in (arg.args if isinstance(arg, Group) else (arg,))]


class Command:
    """A sparkqctl command: its arguments, the request they make, how the reply shows.

    ``args`` (Arg, Group, TaskId) come in the order of the usage line. The request is
    ``op`` (default: the name) with the fields the args fill, once ``check(parser, args)``
    has refused what no single argument can. The reply: ``show(result)`` is its human
    form (None prints nothing; -q prints ids instead, --json ``json_of(result)``, default
    the result) and ``exit_status(result, fields)`` the exit status (default 0); ``talk``
    stands in for the whole exchange where the reply streams (watch, logs --follow).
    ``actions`` are the commands under it (`session create`); ``run(args)`` is a command
    that sends no single request (work, top); ``hidden`` keeps it out of -h and the
    completions.
    """

    def __init__(self, name: str, help: str, *args, op=None, actions=(), check=None,
                 show=show_plain, json_of=None, exit_status=None, talk=None, run=None,
                 hidden=False):
        self.name, self.help, self.args, self.actions = name, help, args, actions
        self.op = None if run or actions else op or name
        self.check, self.show, self.json_of, self.exit_status = check, show, json_of, exit_status
        self.talk, self.run, self.hidden = talk, run, hidden

    def add_to(self, commands, whole: bool = True) -> None:
        """Add this command's parser to ``commands``; not ``whole``: its name and help alone."""
        described = {} if self.hidden else {"help": self.help}
        parser = commands.add_parser(self.name, description=self.help, add_help=whole,
                                     **described)
        if not whole:
            return
        for option in GLOBAL_OPTIONS:  # they work after the command too: `claim --json`
            option.add_to(parser, default=SUPPRESS)
        for arg in self.args:
            arg.add_to(parser)
        if self.actions:
            actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
            for action in self.actions:
                action.add_to(actions)


def enqueue_rules(parser, args) -> None:
    """A script takes its arguments after --; a tool takes a payload."""
    if args.script is None:
        if args.script_args:
            parser.error(f"unexpected arguments: {' '.join(args.script_args)}")
        args.script_args = None  # a tool's task sends no script arguments
    elif args.payload is not None or args.payload_json is not None or args.payload_file:
        parser.error("a script takes its arguments after --, not a payload")


def requeue_rules(parser, args) -> None:
    task = given_task(parser, args, required=False)
    if (task is None) == (args.status is None) or (task is not None and args.stream):
        parser.error("requeue takes ID, or --status (with --stream to narrow it)")


def work_rules(parser, args) -> None:
    if args.run[:1] == ["--"]:
        args.run = args.run[1:]
    if not args.run:
        parser.error("work needs a command: sparkqctl work [options] -- COMMAND [ARGS...]")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")


def wait_status(result: dict, fields: dict) -> int:
    """`wait`: 0 every task completed, 5 one did not, 4 the timeout came first."""
    if not result["done"]:
        return EXIT_EMPTY
    return EXIT_OK if all(t["status"] == "completed" for t in result["tasks"]) else EXIT_FAILED


def nothing_to(verb: str):
    """The exit status of `claim` or `peek`: 4 when no task came, which a person at a
    terminal is told on stderr (stdout stays empty for scripts)."""
    def exit_status(task, fields: dict) -> int:
        if task is not None:
            return EXIT_OK
        if sys.stderr.isatty():
            where = ", ".join(names_given(fields.get("stream")))
            tools = ", ".join(names_given(fields.get("tool")))
            print(f"nothing to {verb} in {where}" + (f" for {tools}" if tools else ""),
                  file=sys.stderr)
        return EXIT_EMPTY
    return exit_status


def names_given(value) -> list[str]:
    """The names of a --stream or --tool given once, many times or not at all."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def reply(command: Command, client: Client, fields: dict, args) -> int:
    """Send a command's request and print its result: -q, --json or the human form."""
    result = client.call(command.op, **fields)
    if args.json:
        print(json.dumps(command.json_of(result) if command.json_of else result, indent=2))
    else:
        text = ids_of(result) if args.quiet else None if result is None else command.show(result)
        if text:
            print(text)
    return command.exit_status(result, fields) if command.exit_status else EXIT_OK


def logs(command: Command, client: Client, fields: dict, args) -> int:
    """`logs`: a task's output so far; with --follow, as it comes until the task ends."""
    if not fields.get("follow"):
        return reply(command, client, fields, args)
    first = client.call("logs", **fields)
    print(json.dumps(first) if args.json else first["log"], end="\n" if args.json else "",
          flush=True)
    if first["status"] in ENDED and not first["running"]:
        return EXIT_OK
    while True:
        message = client.receive()
        if args.json:
            print(json.dumps(message), flush=True)
        elif "chunk" in message:
            print(message["chunk"], end="", flush=True)
        if message.get("end") or "error" in message:
            return EXIT_OK if message.get("end") else EXIT_REFUSED


def can_open_browser(env=os.environ) -> bool:
    """Whether a graphical browser can open here: not over SSH, not without a display."""
    if sys.platform == "darwin":
        return "SSH_CONNECTION" not in env
    return bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


def ui(command: Command, client: Client, fields: dict, args) -> int:
    """`ui`: open the dashboard signed in (its URL carries the token), or print that URL."""
    result = client.call("ui", **fields)
    if not result["url"]:
        print(f"sparkqctl: no dashboard: {result['reason']}", file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.print or not can_open_browser():
        print(result["url"])
    else:
        import webbrowser

        if not webbrowser.open(result["url"]):
            print(result["url"])
    return EXIT_OK


#: The global options; each command takes them too, after its name.
GLOBAL_OPTIONS = (
    Arg("--socket", complete="files",
        help="daemon socket (default: $SPARKQ_SOCKET, then $XDG_RUNTIME_DIR/sparkq/sparkqd.sock)"),
    Arg("--json", action="store_true", help="print the result as JSON"),
    Arg("-q", "--quiet", action="store_true", help="print ids only"),
)

FILTERS = (Arg("--stream", action="append", metavar="S", default_from=default_stream,
               complete="streams", help="stream to take from, repeatable (default {default})"),
           Arg("--tool", action="append", metavar="T", complete="tools",
               help="only these tools, repeatable"))
STREAM, SESSION = Arg("--stream", complete="streams"), Arg("--session", complete="sessions")
STREAM_NAME = Arg("name", complete="streams")
LEASE = Arg("--lease", help="refuse if the task was claimed again since")
LIMIT = Arg("--limit", type=int)
PAYLOAD = Group(
    Arg("--payload", help="payload text"),
    Arg("--payload-json", metavar="JSON", field="payload", load=json_value,
        help="payload as a JSON value"),
    Arg("--payload-file", metavar="PATH", field="payload", load=file_text, complete="files",
        help="payload read from a file, - for stdin"))
WHEN = Group(Arg("--delay", type=duration, metavar="DURATION",
                 help="wait first: 90s, 5m, 2h, 1d or plain seconds"),
             Arg("--at", type=moment, metavar="TIME",
                 help="wait until TIME: RFC 3339, or local 'YYYY-MM-DD HH:MM'"))
#: A task's repository workspace: enqueue's options, and a schedule's for its tasks.
WORKSPACE_OPTIONS = (
    Arg("--repo", load=repo_arg, metavar="URL|PATH",
        help="the repository of its workspace (a local path is made absolute)"),
    Arg("--ref", metavar="REF", help="branch, tag or commit (default: the default branch)"),
    Arg("--workspace", choices=["shared", "worktree", "none"],
        help="run in the repository's shared clone, a worktree of its own, or as it is"))
ENQUEUE = (
    Arg("--stream", default_from=default_stream, complete="streams"),
    Group(Arg("--tool", complete="tools"),
          Arg("--script", metavar="NAME", complete="scripts",
              help="run a script from script_dirs; its arguments follow --"), required=True),
    Arg("script_args", nargs="*", metavar="ARGS", field="args", help=SUPPRESS),
    PAYLOAD, Arg("--timeout", type=float, metavar="SECS"),
    Arg("--priority", type=int, help="higher first (default 0)"), WHEN,
    Arg("--after", type=id_list, metavar="ID[,ID...]",
        help="wait until these tasks have completed"),
    Arg("--key", help="unique key: an existing task with it is returned instead"),
    Arg("--lock", help="at most one running task per lock (a repository URL is normalised)"),
    Arg("--max-attempts", type=int, metavar="N", help="attempts before it fails"),
    *WORKSPACE_OPTIONS)

# -- schedules --

def schedule_when(schedule: dict) -> str:
    if schedule["cron"]:
        return f"cron {schedule['cron']} ({schedule['timezone']})"
    return f"every {schedule['every']}" if schedule["every"] is not None else f"at {schedule['at']}"


def show_schedules(schedules: list) -> str:
    return table([[s["name"], schedule_when(s), s["stream"], s["status"], s["next_at"],
                   s["last_slot"], s["last_outcome"]] for s in schedules],
                 ["NAME", "WHEN", "STREAM", "STATUS", "NEXT", "LAST", "OUTCOME"])


def show_schedule(schedule: dict) -> str:
    fields = {k: v for k, v in schedule.items()
              if k not in ("next", "firings") and v not in (None, [], {})}
    width = max(map(len, fields)) + 2
    lines = [f"{key + ':':{width}}{value if isinstance(value, str) else json.dumps(value)}"
             for key, value in fields.items()]
    if schedule.get("next"):
        lines += ["", "next fire times:", *(f"  {at}" for at in schedule["next"])]
    if schedule.get("firings"):
        lines += ["", "latest firings:", table(
            [[f["slot"], f["at"], f["task"], f["outcome"]] for f in schedule["firings"]],
            ["SLOT", "AT", "TASK", "OUTCOME"])]
    return "\n".join(lines)


SCHEDULE_OPTIONS = (
    Arg("--stream", complete="streams", help="stream to enqueue into (default: default)"),
    Group(Arg("--tool", complete="tools"),
          Arg("--script", metavar="NAME", complete="scripts",
              help="run a script from script_dirs; its arguments follow --")),
    Arg("script_args", nargs="*", metavar="ARGS", field="args", help=SUPPRESS),
    PAYLOAD, Arg("--timeout", type=float, metavar="SECS"),
    Arg("--priority", type=int, help="higher first (default 0)"),
    Arg("--max-attempts", type=int, metavar="N", help="attempts before a task fails"),
    Arg("--lock", help="at most one running task per lock"),
    Arg("--key-prefix", metavar="PREFIX", help="task key before the slot (default schedule:NAME:)"),
    *WORKSPACE_OPTIONS,
    Arg("--timezone", metavar="TZ", help="IANA zone of --cron (default: this machine's)"),
    Arg("--start-at", type=moment, metavar="TIME", help="no slot before TIME (anchors --every)"),
    Arg("--end-at", type=moment, metavar="TIME", help="no slot after TIME"),
    Arg("--jitter", type=duration, metavar="SECS", help="delay each firing by up to SECS"),
    Arg("--overlap", choices=["skip", "allow", "replace"],
        help="while the last firing's task runs: skip (default), allow, or replace it"),
    Arg("--catch-up", choices=["none", "latest", "all"],
        help="slots missed in a downtime: latest (default) fires one, all, or none"),
    Arg("--grace", type=duration, metavar="SECS",
        help="a slot this late counts as missed (default 60)"))


def schedule_timing(required: bool) -> Group:
    return Group(Arg("--cron", metavar="EXPR", help="5-field cron expression, or @hourly, @daily..."),
                 Arg("--every", metavar="INTERVAL", help="90s, 5m, 2h, 1d"),
                 Arg("--at", type=moment, metavar="TIME", help="once, at TIME"),
                 required=required)


SCHEDULE_NAME = Arg("name", complete="schedules")
SCHEDULE = Command("schedule", "recurring tasks: cron, every or at", actions=(
    Command("add", "create a schedule", Arg("name"), schedule_timing(True), *SCHEDULE_OPTIONS,
            op="schedule.create", check=enqueue_rules, show=show_schedule),
    Command("change", "change a schedule's fields", SCHEDULE_NAME, schedule_timing(False),
            *SCHEDULE_OPTIONS, op="schedule.update", check=enqueue_rules, show=show_schedule),
    Command("list", "list schedules with their next and last firings", STREAM,
            op="schedule.list", show=show_schedules),
    Command("show", "a schedule, its next fire times and latest firings", SCHEDULE_NAME,
            op="schedule.show", show=show_schedule),
    Command("pause", "stop a schedule firing (its missed slots are skipped)", SCHEDULE_NAME,
            op="schedule.pause", show=show_schedule),
    Command("resume", "let a paused schedule fire again", SCHEDULE_NAME, op="schedule.resume",
            show=show_schedule),
    Command("rm", "delete a schedule (its tasks stay)", SCHEDULE_NAME, op="schedule.delete",
            show=lambda result: f"deleted schedule {result['deleted']}"),
    Command("fire", "fire a schedule once now; prints the task id", SCHEDULE_NAME,
            op="schedule.fire", show=lambda task: str(task["id"])),
    Command("next", "preview a cron expression's next fire times", Arg("cron", metavar="EXPR"),
            Arg("--timezone", metavar="TZ"), Arg("-n", type=int, dest="count", metavar="N",
                                                 help="how many (default 10)"),
            op="schedule.next",
            show=lambda times: "\n".join(f"{t['local']}  ({t['at']})" for t in times))))

TABLE = (
    Command("start", "start sparkqd in the background; wait until it answers",
            Arg("--config", metavar="PATH", complete="files",
                help="configuration file (default: $SPARKQ_CONFIG, ./sparkq.yml, ...)"),
            Arg("--data-dir", metavar="PATH", complete="files",
                help="data directory, where the log sparkqd.log goes too"), run=start),
    Command("status", "show the daemon's state"),
    Command("stop", "stop the daemon cleanly", op="shutdown", show=lambda _: "sparkqd is stopping"),
    Command("reload", "re-read the configuration"),
    Command("tools", "list tools and task classes in force", show=show_tools),
    Command("schema", "print the JSON Schema of every request",
            show=lambda schema: json.dumps(schema, indent=2)),
    Command("session", "create, list or end sessions", actions=(
        Command("create", "create a session", Arg("name"), op="session.create",
                show=shown_as("session")),
        Command("list", "list sessions", op="session.list", show=show_sessions),
        Command("end", "end a session and its streams", Arg("name", complete="sessions"),
                op="session.end", show=shown_as("session")))),
    Command("stream", "create, list or end streams", actions=(
        Command("create", "create a stream in a session", Arg("name"),
                Arg("--session", required=True, complete="sessions"), op="stream.create",
                show=shown_as("stream")),
        Command("list", "list streams", SESSION, op="stream.list", show=show_streams),
        Command("end", "stop a stream taking new tasks", STREAM_NAME, op="stream.end",
                show=shown_as("stream")),
        Command("pause", "stop claims from a stream; enqueue still works", STREAM_NAME,
                op="stream.pause", show=shown_as("stream")),
        Command("resume", "let claims take from a paused stream again", STREAM_NAME,
                op="stream.resume", show=shown_as("stream")))),
    Command("enqueue", "add a task; prints its id", *ENQUEUE, check=enqueue_rules,
            show=show_enqueued),
    Command("peek", "show the next task without claiming it", *FILTERS, show=show_task,
            exit_status=nothing_to("peek")),
    Command("claim", "claim the next task", *FILTERS, Arg("--worker", default_from=default_worker),
            Arg("--wait", type=float, metavar="SECS", help="wait up to SECS for a task"),
            show=show_task, exit_status=nothing_to("claim")),
    Command("complete", "mark a running task completed", TaskId(), Arg("--summary"),
            Arg("--result-json", metavar="JSON", field="result", load=json_value), LEASE,
            show=show_outcome),
    Command("fail", "record a failed attempt (retried while attempts remain)", TaskId(),
            Arg("--reason", required=True),
            Arg("--final", action="store_true", help="fail for good, no retry"), LEASE,
            show=show_outcome),
    Command("touch", "extend a running task's lease (a heartbeat)", TaskId(), LEASE,
            show=show_outcome),
    Command("cancel", "cancel a task that has not ended", TaskId(), show=show_outcome),
    Command("requeue", "put a task back to pending, or every match of --stream/--status",
            TaskId(required=False), STREAM, Arg("--status", choices=["running", "failed",
                                                                     "cancelled"]),
            check=requeue_rules, show=show_requeued),
    Command("task", "show one task with its history", TaskId(), show=show_task),
    Command("wait", "block until every task has ended; exit 0 all completed, 5 not",
            Arg("tasks", nargs="+", type=int, metavar="ID", complete="tasks"),
            Arg("--timeout", type=float, metavar="SECS"), show=lambda r: show_tasks(r["tasks"]),
            json_of=lambda result: result["tasks"], exit_status=wait_status),
    Command("locks", "list held locks and their tasks", show=show_locks),
    Command("logs", "show a task's output (from runs by the daemon)", TaskId(),
            Arg("--tail", type=int, metavar="N", help="only the last N lines"),
            Arg("--follow", "-f", action="store_true", help="keep printing until it ends"),
            show=lambda result: result["log"].rstrip("\n") or None, talk=logs),
    Command("scripts", "list the scripts found under script_dirs", show=show_scripts),
    Command("workers", "list the daemon's worker slots and external workers", show=show_workers),
    Command("watch", "print events as JSON lines as they happen",
            Arg("--stream", action="append", dest="streams", metavar="S", complete="streams"),
            Arg("--session", action="append", dest="sessions", metavar="S", complete="sessions"),
            Arg("--task", action="append", dest="tasks", type=int, metavar="ID", complete="tasks"),
            Arg("--event", action="append", dest="events", metavar="TYPE",
                help="task.created, task.pending, task.claimed, task.completed, ..."), talk=watch),
    Command("ui", "open the web dashboard in a browser, signed in with its token",
            Arg("--print", action="store_true", sent=False,
                help="print the URL instead (it holds the token)"),
            Arg("--new-token", action="store_true",
                help="make a new token first: browsers signed in must sign in again"),
            talk=ui),
    Command("top", "a live view of streams, running tasks, locks, workers and failures", run=top),
    Command("metrics", "print metrics in the Prometheus text format",
            show=lambda text: text.rstrip("\n")),
    Command("history", "ended tasks, newest first, with how long they waited and ran", STREAM,
            SESSION, Arg("--status", choices=["completed", "failed", "cancelled"]),
            Arg("--schedule", complete="schedules", help="only tasks of this schedule"),
            Arg("--since", type=since, metavar="TIME",
                help="RFC 3339, local 'YYYY-MM-DD HH:MM', or a duration ago: 30m, 2h, 1d"),
            LIMIT, show=show_history),
    Command("completion", "print a shell completion script",
            Arg("shell", choices=["bash", "zsh", "fish"]), run=print_completion),
    Command("__complete", "print names to complete, from the daemon", Arg("kind"),
            run=print_names, hidden=True),
    Command("service", "install the systemd user units (socket-activated sparkqd)", actions=(
        Command("install", "write the units, enable them (--now: start too)",
                Arg("--now", action="store_true"), run=service),
        Command("uninstall", "disable and remove the units", run=service),
        Command("show", "print the unit files", Arg("--exec", metavar="PATH", complete="files",
                help="ExecStart to show (default: the sparkqd beside this one)"), run=service))),
    Command("work", "claim tasks and run COMMAND for each: turn this shell into a worker",
            *FILTERS, Arg("--concurrency", type=int, default=1, metavar="N"),
            Arg("--worker", default_from=default_worker, help="worker name prefix"),
            Arg("run", nargs="...", metavar="-- COMMAND [ARGS...]"), check=work_rules,
            run=lambda args: Worker(args).run()),
    Command("tasks", "list tasks, oldest first", STREAM, SESSION, Arg("--status", choices=STATUSES),
            LIMIT, show=show_tasks),
    Command("purge", "remove finished tasks older than N days",
            Arg("--older-than", type=float, metavar="DAYS", field="older_than_days"),
            show=lambda result: f"purged {result['purged']} tasks"),
    SCHEDULE,
    # repository workspaces
    Command("workspaces", "list repository workspaces: shared clones and task worktrees",
            Arg("--repo", metavar="URL|PATH", load=repo_arg), op="workspace.list",
            show=show_workspaces),
    Command("workspace", "show, remove or collect repository workspaces", actions=(
        Command("show", "a task's worktree, or a repository's clone and worktrees",
                Arg("workspace", metavar="ID|REPO"), op="workspace.show", show=show_workspace),
        Command("rm", "remove a task's worktree (or a clone): refused while its task runs",
                Arg("workspace", metavar="ID|REPO"),
                Arg("--force", action="store_true",
                    help="also with unsaved work: saved as a patch first"),
                op="workspace.remove", show=show_removed),
        Command("gc", "run the workspace collector now",
                Arg("--dry-run", action="store_true", help="only say what it would remove"),
                op="workspace.gc", show=show_collected))),
)

BY_NAME = {command.name: command for command in TABLE}


def starts(word: str, option: str) -> bool:
    """Whether ``word`` is ``option`` or an abbreviation argparse takes for it."""
    return len(word) > 2 and option.startswith(word)


def command_given(argv: list[str]) -> str | None:
    """The command a command line names, so that only its parser is built: "" if the line
    asks for --version first (no command's parser is needed), None if it names no command
    or asks for help first (every command's name is needed, and nothing more)."""
    words = iter(argv)
    for word in words:
        if word == "--":
            word = next(words, None)
            return word if word in BY_NAME else None
        if starts(word, "--version"):
            return ""
        if starts(word, "--help") or (word[:1] == "-" and word[1:2] != "-" and "h" in word):
            return None
        if starts(word, "--socket"):
            next(words, None)
        elif not word.startswith("-"):
            return word if word in BY_NAME else None
    return None


def build_parser(only: str | None = None):
    """The parser of command ``only`` alone; with None, of every command by name and help
    alone (for -h, and for a line that names no command)."""
    import argparse

    parser = argparse.ArgumentParser(prog="sparkqctl", description="Talk to the SparkQ daemon.")
    for option in GLOBAL_OPTIONS:
        option.add_to(parser, default=None)
    parser.add_argument("--version", action="version", version=f"sparkqctl {VERSION}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in TABLE:  # a hidden command is not among those a usage error lists
        if command.name == only or (only is None and not command.hidden):
            command.add_to(commands, whole=only is not None)
    return parser


def parse(argv: list[str]):
    """Parse a command line: (its parser, the command it runs, the arguments)."""
    name, script_args = command_given(argv), None
    if name == "schedule" and "--" in argv:  # argparse would give them to NAME's chunk
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1:]
    parser = build_parser(name)
    args = parser.parse_args(argv)
    if script_args is not None:
        args.script_args = script_args
    command = BY_NAME[args.command]
    if command.actions:
        command = next(action for action in command.actions if action.name == args.action)
    for arg in command.args:
        arg.settle(args)
    if command.check:
        command.check(parser, args)
    return parser, command, args


def to_request(command: Command, parser, args) -> dict:
    """The fields of the request a command sends, from its parsed arguments."""
    fields = {}
    for arg in command.args:
        arg.fill(parser, args, fields)
    return fields


def ask(command: Command, fields: dict, args) -> int:
    """Send a command's request to the daemon and show the reply; the exit status. While
    the daemon is starting it refuses every request unseen, so the request is sent again
    once it is ready."""
    try:
        while True:
            try:
                with Client(args.socket) as client:
                    return (command.talk or reply)(command, client, fields, args)
            except SparkQError as exc:
                if not starting(exc):
                    raise
                wait_while_starting(args.socket)
    except Unreachable as exc:
        return unreachable(exc)
    except SparkQError as exc:
        print(f"sparkqctl: {exc.code}: {exc}", file=sys.stderr)
        return EXIT_REFUSED


def unreachable(exc: Unreachable) -> int:
    """Say why the daemon cannot be reached, and how to start it where that would help."""
    hint = "" if isinstance(exc, SocketPathTooLong) else (
        "\nIs the daemon running? Start it with `sparkqctl start` or "
        "`systemctl --user start sparkqd`.")
    print(f"sparkqctl: {exc}{hint}", file=sys.stderr)
    return EXIT_UNREACHABLE


def wait_while_starting(path: str | None, quiet: bool = False) -> dict:
    """Wait while the daemon says it is starting (saying so once on stderr, unless
    ``quiet``); its `hello` once it answers."""
    import time

    told = quiet
    while True:
        with Client(path) as client:
            try:
                return client.call("hello")
            except SparkQError as exc:
                if not starting(exc):
                    raise
                if not told:
                    print(f"sparkqctl: sparkqd is {exc}; waiting for it", file=sys.stderr,
                          flush=True)
                    told = True
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    try:
        parser, command, args = parse(sys.argv[1:] if argv is None else argv)
        if command.run:
            return command.run(args)
        return ask(command, to_request(command, parser, args), args)
    except BrokenPipeError:  # `sparkqctl tasks | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
