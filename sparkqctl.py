"""sparkqctl: the SparkQ client for shell scripts, editors and agents.

It speaks JSON lines to sparkqd over its Unix socket. It imports only the
standard library and builds its argument parser lazily, because every shell
command that calls it pays its start-up time. ``Client`` is the small Python
API; ``main()`` is the command line.

Exit status: 0 success; 1 the daemon refused the request; 2 usage error;
3 the daemon cannot be reached; 4 nothing to claim or peek.
"""

import json
import os
import socket
import sys

VERSION = "0.1.0"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_EMPTY = 0, 1, 2, 3, 4


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


TASK_FIELDS = ("id", "status", "stream", "session", "tool", "task_class", "priority", "timeout",
               "attempts", "worker", "created_at", "started_at", "finished_at", "summary",
               "reason", "result")


def show_task(task: dict) -> str:
    lines = [f"{k + ':':13}{task[k] if isinstance(task[k], (str, int, float)) else json.dumps(task[k])}"
             for k in TASK_FIELDS if task.get(k) is not None]
    payload = task.get("payload")
    if payload is not None:
        text = payload if isinstance(payload, str) else json.dumps(payload, indent=2)
        lines.append("payload:     " + text.replace("\n", "\n             "))
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
# Command line
# ---------------------------------------------------------------------------


def build_parser():
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

    p = command("enqueue", "add a task; prints its id")
    p.add_argument("--stream", default=stream_default)
    p.add_argument("--tool", required=True)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--payload", help="payload text")
    group.add_argument("--payload-json", metavar="JSON", help="payload as a JSON value")
    group.add_argument("--payload-file", metavar="PATH", help="payload read from a file, - for stdin")
    p.add_argument("--timeout", type=float, metavar="SECS")
    p.add_argument("--priority", type=int, default=0, help="higher first (default 0)")

    command("peek", "show the next task without claiming it").add_argument(
        "--stream", default=stream_default)
    p = command("claim", "claim the next task")
    p.add_argument("--stream", default=stream_default)
    p.add_argument("--worker", default=os.environ.get("SPARKQ_WORKER"))
    p.add_argument("--wait", type=float, default=0, metavar="SECS",
                   help="wait up to SECS for a task")

    p = command("complete", "mark a running task completed")
    task_id(p)
    p.add_argument("--summary")
    p.add_argument("--result-json", metavar="JSON")
    p = command("fail", "mark a running task failed")
    task_id(p)
    p.add_argument("--reason", required=True)
    task_id(command("requeue", "put a task back to pending"))
    task_id(command("task", "show one task with its history"))

    p = command("tasks", "list tasks, oldest first")
    p.add_argument("--stream")
    p.add_argument("--session")
    p.add_argument("--status", choices=["pending", "running", "completed", "failed"])
    p.add_argument("--limit", type=int)
    command("purge", "remove finished tasks older than N days").add_argument(
        "--older-than", type=float, metavar="DAYS")
    return parser


def json_arg(parser, text: str, flag: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        parser.error(f"{flag}: not valid JSON: {exc}")


def the_task_id(parser, args) -> int:
    if (args.task is None) == (args.task_opt is None):
        parser.error("give the task id once, as ID or --task-id ID")
    return args.task if args.task is not None else args.task_opt


def to_request(parser, args) -> tuple[str, dict]:
    """Turn parsed arguments into (op, fields)."""
    cmd = args.command
    if cmd in ("session", "stream"):
        fields = {k: getattr(args, k, None) for k in ("name", "session")}
        if cmd == "session":
            fields.pop("session")
        return f"{cmd}.{args.action}", fields
    if cmd == "enqueue":
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
                           "timeout": args.timeout, "priority": args.priority or None}
    if cmd == "peek":
        return "peek", {"stream": args.stream}
    if cmd == "claim":
        return "claim", {"stream": args.stream, "worker": args.worker, "wait": args.wait or None}
    if cmd == "complete":
        result = None if args.result_json is None else json_arg(parser, args.result_json,
                                                                 "--result-json")
        return "complete", {"task": the_task_id(parser, args), "summary": args.summary,
                            "result": result}
    if cmd == "fail":
        return "fail", {"task": the_task_id(parser, args), "reason": args.reason}
    if cmd in ("requeue", "task"):
        return cmd, {"task": the_task_id(parser, args)}
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
    if op in ("peek", "claim", "task"):
        return show_task(result)
    if op in ("complete", "fail", "requeue"):
        return f"task {result['id']} {result['status']}"
    if op == "tasks":
        return show_tasks(result)
    if op == "stream.list":
        return show_streams(result)
    if op == "session.list":
        return show_sessions(result)
    if op in ("session.create", "session.end", "stream.create", "stream.end"):
        return f"{op.split('.')[0]} {result['name']} {result['status']}"
    if op == "purge":
        return f"purged {result['purged']} tasks"
    if op == "tools":
        return show_tools(result)
    if op == "shutdown":
        return "sparkqd is stopping"
    return show_status(result) if isinstance(result, dict) else json.dumps(result)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    op, fields = to_request(parser, args)
    path = args.socket or default_socket_path()
    try:
        with Client(path) as client:
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
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        text = render(args, op, result)
        if text:
            print(text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
