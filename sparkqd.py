"""sparkqd: the SparkQ daemon, a local task queue for one developer's machine.

The queue lives in memory. Every change is an *event* (``TaskEnqueued``,
``TaskClaimed``, ...) produced by the pure queue core and applied to the
in-memory state by one ``apply`` function, the same one that replays the
journal at startup. Each event is encoded and given its room in the
append-only journal *before* it is applied, so an event that cannot be
journaled never changes anything. A reply that could have observed a change
leaves only once the journal holds that change durably (``database.fsync:
always``); requests that arrive together share one write and one fsync
(group commit).

A request's path: ``Connection`` splits and decodes frames into request
Structs and hands each to ``Daemon.handle``, the one dispatch (a ``match``
with one short arm per request). A request that changes the queue runs inside
``Daemon.change``, the one change pipeline (reserve journal room, run the core,
commit), which the timer's ``tick`` and the runner use too. ``commit`` runs once
per loop turn, after every ready connection has been answered, and hands that
turn's events to the observers (stats, watchers, waiters, the pool, task logs,
hooks), each an ``on_commit(events, queue)``; a read sees them first. The core
returns Structs; ``Replies`` renders them to wire form at the edge. Requests
that wait (a claim with ``wait``, ``wait``, a ``claim_next`` that waits) are
parked in ``Waiters`` and timed out by the one timer; a task that becomes
claimable goes to the claim that has waited longest for it, and only that
one is retried.

A task may name a repository and ask for a workspace: the repository's shared clone
(one task at a time, under its lock) or a git worktree of its own. The ``Workspaces``
edge clones, fetches and adds worktrees with git subprocesses, and reports what it made
to the core as events, so the journal knows which directory belongs to which task; a
claim is answered once its task's workspace is ready. The ``WorkspaceCollector``, a duty
of the one timer, removes a workspace only when nothing in it would be lost, or after
saving it.

Every ``snapshot_interval`` seconds the rows that changed since the last
snapshot are written to a SQLite file in a worker thread, in one transaction
that also records the journal sequence it covers; journal segments wholly
covered by it are then deleted. Startup refuses what needs no data first
(a socket path too long, a live daemon on the socket, the data directory's
lock), then loads the snapshot and replays the journal after its sequence in
a thread, while clients of its own socket are told "starting"; a socket the
service manager passed is accepted from only once recovery is done.

Clients speak one of two framings on a Unix stream socket, chosen by the
first byte: ``{`` starts JSON lines, anything else 4-byte big-endian
length-prefixed msgpack maps. Requests are msgspec Structs tagged by ``op``,
so validation and the ``schema`` op come from the same definitions.

An optional HTTP listener on loopback (``http.listen``) serves the same
requests as JSON over HTTP, through the same dispatch, and a dashboard kept
live by the `watch` stream over Server-Sent Events; it is token-protected the
way Jupyter is, and tornado is imported only when it starts.

Sections, in the order the data flows:

1. Errors and constants
2. Configuration
3. Model: records, results and events
4. Protocol: requests and framing
5. Queue core (pure: no I/O, the time is an argument): TaskIndex, Queue, QueueReads,
   StreamBook, Runnables
6. Replies: the core's results in wire form
7. Journal
8. Snapshot
9. Runner (the daemon's own workers)
10. Workspaces (git): shared clones, task worktrees, their collector
11. Observers: stats, metrics, watchers, task logs, workers, hooks
12. Server: waiters and connections
13. Web: HTTP API and dashboard (optional, on loopback; tornado is imported only for it)
14. Daemon: service manager, recovery, snapshots, Reloader (re-reading the configuration),
    Timer (the one timer), Daemon (lifecycle, dispatch, change pipeline, wiring)
15. main()
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import codecs
import collections
import contextlib
import datetime
import difflib
import errno
import fcntl
import functools
import gc
import heapq
import hmac
import ipaddress
import itertools
import logging
import math
import os
import re
import resource
import secrets
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
import zoneinfo
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import cronsim
import msgspec
import yaml
from msgspec import Meta, Struct, field

VERSION = "0.1.0"
PROTOCOL = 1
log = logging.getLogger("sparkqd")


# ============================================================================
# 1. Errors and constants
# ============================================================================


class SparkQError(Exception):
    """A request the daemon refuses; ``code`` is the protocol error code."""

    code = "internal"


class BadRequest(SparkQError):
    """Malformed request, wrong types, unknown op or field values."""

    code = "bad_request"


class NotFound(SparkQError):
    """A named session, stream or task does not exist."""

    code = "not_found"


class Conflict(SparkQError):
    """Exists already, wrong state for the transition, or a stale lease."""

    code = "conflict"


class TooLarge(SparkQError):
    """A frame larger than ``server.max_frame_bytes``."""

    code = "too_large"


class Forbidden(SparkQError):
    """The peer is another user."""

    code = "forbidden"


class Unavailable(SparkQError):
    """Shutting down, or storage is failing."""

    code = "unavailable"


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the key path."""


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class JournalDamaged(StartupError):
    """The journal is damaged before its tail; the message names file and offset."""


STATUSES = ("pending", "waiting", "running", "completed", "failed", "cancelled")
TERMINAL = frozenset(("completed", "failed", "cancelled"))
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
DEFAULT = "default"
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the terminating NUL
SEGMENT_BYTES = 32 << 20  # preallocated journal segment size
DAY = 86400.0
#: The longest duration, and the furthest ahead a time, that anything may name: 10 years.
MAX_SECONDS = 3650 * DAY
MAX_ATTEMPTS = 1000
MAX_COUNT = (1 << 63) - 1
#: How deep a payload or result may nest: every encoding of it must stay far from any limit.
MAX_NESTING = 100
INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1
FIRST_TIME, LAST_TIME = -62135596800.0, 253402300800.0  #: 0001-01-01, 10000-01-01 (UTC)

Name = Annotated[str, Meta(pattern=NAME_PATTERN)]
Seconds = Annotated[float, Meta(gt=0, le=MAX_SECONDS)]
Duration = Annotated[float, Meta(ge=0, le=MAX_SECONDS)]
Days = Annotated[float, Meta(ge=0, le=MAX_SECONDS / DAY)]
TaskId = Annotated[int, Meta(ge=1, le=MAX_COUNT)]
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
Attempts = Annotated[int, Meta(ge=1, le=MAX_ATTEMPTS)]
Pid = Annotated[int, Meta(ge=1, le=(1 << 31) - 1)]


def rfc3339(t: float | None) -> str | None:
    """Format epoch seconds as an RFC 3339 UTC string with milliseconds.

    Total: a time outside years 1..9999 (only a journal from before times were
    bounded can hold one) is shown as the nearest one RFC 3339 can say.
    """
    if t is None:
        return None
    if not FIRST_TIME <= t < LAST_TIME:  # NaN too
        return "0001-01-01T00:00:00.000Z" if t < 0 else "9999-12-31T23:59:59.999Z"
    second, milli = divmod(int(t * 1000), 1000)
    return f"{_utc_second(second)}.{milli:03d}Z"


@functools.lru_cache(maxsize=4096)
def _utc_second(second: int) -> str:
    """The seconds part of rfc3339(): every reply formats the same few seconds often."""
    moment = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=second)
    return f"{moment.year:04d}-{moment:%m-%dT%H:%M:%S}"


def json_value_problem(value: Any, depth: int = 0) -> str | None:
    """Why ``value`` is not a JSON value every encoding keeps exactly, or None.

    Payloads and results go to JSON-lines clients, the SQLite snapshot and the
    msgpack journal alike, so each must be plain JSON: no bytes, extension
    types, non-string keys, NaN or infinities, integers beyond 64 bits.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return None
    if kind is int:
        return None if INT64_MIN <= value <= UINT64_MAX else f"integer {value} does not fit 64 bits"
    if kind is float:
        return None if math.isfinite(value) else f"{value} is not a JSON number"
    if kind is not list and kind is not dict:
        return f"a {kind.__name__} is not a JSON value"
    if depth >= MAX_NESTING:
        return f"nested deeper than {MAX_NESTING} levels"
    if kind is list:
        items = value
    else:
        if any(type(key) is not str for key in value):
            key = next(key for key in value if type(key) is not str)
            return f"map key {key!r} is not a string"
        items = value.values()
    return next((p for item in items if (p := json_value_problem(item, depth + 1))), None)


def check_json_value(value: Any, name: str) -> None:
    """Refuse a request whose ``name`` field is not plain JSON (a __post_init__ check)."""
    problem = json_value_problem(value)
    if problem is not None:
        raise ValueError(f"must be a JSON value: {problem} - at `$.{name}`")


def fsync_directory(path: str) -> None:
    """Make a new or removed directory entry durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new one, whole.

    Each failure is an OSError naming the step that failed; the temporary file goes with it.
    """
    temp = f"{path}.{os.getpid()}.tmp"
    step = f"create {temp}"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            step, rest = f"write {temp}", memoryview(data)
            while rest:  # a write may take only part of a large patch
                rest = rest[os.write(fd, rest):]
            step = f"fsync {temp}"
            os.fsync(fd)
        finally:
            os.close(fd)
        step = f"rename {temp} to {path}"
        os.replace(temp, path)
        step = f"fsync the directory of {path}"
        fsync_directory(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise OSError(exc.errno, f"{step}: {exc.strerror}") from None


# ============================================================================
# 2. Configuration
# ============================================================================


class ConfigStruct(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every configuration section: unknown keys are errors."""


class ProjectConfig(ConfigStruct):
    name: str = ""
    repo_path: str | None = None


class ServerConfig(ConfigStruct):
    socket: str | None = None
    max_frame_bytes: Annotated[int, Meta(ge=1024)] = 16 << 20


class DatabaseConfig(ConfigStruct):
    path: str | None = None
    fsync: Literal["always", "batch", "never"] = "always"
    fsync_interval_ms: Annotated[int, Meta(ge=1)] = 10
    snapshot_interval: Seconds = 60.0


class PurgeConfig(ConfigStruct):
    older_than_days: Annotated[float, Meta(gt=0, le=MAX_SECONDS / DAY)] = 3.0


class StaleConfig(ConfigStruct):
    factor: Annotated[float, Meta(gt=0)] = 2.0


class WorkersConfig(ConfigStruct):
    count: Annotated[int, Meta(ge=0)] = field(default_factory=lambda: os.cpu_count() or 1)
    streams: list[str] | None = None
    max_restarts: Annotated[int, Meta(ge=0)] = 5
    restart_window: Seconds = 60.0
    kill_grace: Duration = 10.0


class LogsConfig(ConfigStruct):
    max_bytes: Annotated[int, Meta(ge=1024)] = 1 << 20


class MetricsConfig(ConfigStruct):
    textfile: str | None = None
    interval: Seconds = 15.0


class HooksConfig(ConfigStruct):
    on_finish: list[str] | None = None
    timeout: Seconds = 30.0
    concurrency: Annotated[int, Meta(ge=1)] = 4


# -- the HTTP listener (dashboard and HTTP API) ----------------------------------

#: The dashboard's port is the original SparkQ's.
DEFAULT_HTTP_LISTEN = "127.0.0.1:8420"


class HttpConfig(ConfigStruct):
    #: host:port on loopback; null turns the listener off; port 0 picks a free one.
    listen: str | None = DEFAULT_HTTP_LISTEN


def listen_address(text: str) -> tuple[str, int]:
    """The (host, port) of an ``http.listen`` value; ValueError unless it is on loopback."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not host:port (like {DEFAULT_HTTP_LISTEN})")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"  # named, not looked up: /etc/hosts could point it elsewhere
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{host or 'every address'} is not a loopback address: the dashboard "
                         f"listens on 127.0.0.0/8 or ::1 only; to reach it from another "
                         f"machine use an SSH tunnel (ssh -L 8420:127.0.0.1:8420 HOST)")
    return host, int(port)


class TaskClass(ConfigStruct):
    timeout: Seconds
    max_attempts: Attempts = 1
    retry_backoff: Duration = 10.0
    retry_backoff_max: Duration = 3600.0


class Tool(ConfigStruct):
    task_class: str
    description: str = ""
    timeout: Seconds | None = None
    max_attempts: Attempts | None = None
    retry_backoff: Duration | None = None
    retry_backoff_max: Duration | None = None
    command: list[str] | None = None
    cwd: str | None = None
    env: dict[str, str] | None = None
    concurrency: Annotated[int, Meta(ge=1)] | None = None
    # repository workspaces: the defaults of the tool's tasks
    workspace: Literal["shared", "worktree", "none"] | None = None
    repo: str | None = None
    ref: str | None = None
    setup: list[str] | None = None


# -- schedules --

Priority = Annotated[int, Meta(ge=-(1 << 31), le=(1 << 31) - 1)]
NonEmpty = Annotated[str, Meta(min_length=1)]


class ScheduleSpec(ConfigStruct):
    """What a schedule enqueues and when: the same fields in sparkq.yml and in requests.

    Exactly one of ``cron`` (with ``timezone``), ``every`` or ``at`` says when.
    """

    stream: str = DEFAULT
    tool: str | None = None
    script: str | None = None
    args: list[str] | None = None
    payload: Any = None
    priority: Priority = 0
    timeout: Seconds | None = None
    max_attempts: Attempts | None = None
    lock: NonEmpty | None = None
    key_prefix: NonEmpty | None = None
    repo: NonEmpty | None = None
    ref: NonEmpty | None = None
    workspace: Literal["shared", "worktree", "none"] | None = None
    cron: NonEmpty | None = None
    timezone: NonEmpty | None = None
    every: NonEmpty | Seconds | None = None
    at: str | None = None
    start_at: str | None = None
    end_at: str | None = None
    jitter: Duration = 0.0
    overlap: Literal["allow", "skip", "replace"] = "skip"
    catch_up: Literal["none", "latest", "all"] = "latest"
    grace: Duration = 60.0

    def __post_init__(self):
        check_json_value(self.payload, "payload")


class Settings(Struct, frozen=True):
    """A tool's or script's settings with its task class's filled in."""

    task_class: str
    timeout: float
    max_attempts: int
    retry_backoff: float
    retry_backoff_max: float


def resolve_settings(tool: Tool, klass: TaskClass) -> Settings:
    """The tool's own value of each setting where it has one, else its class's."""
    def pick(own, inherited):
        return inherited if own is None else own
    return Settings(tool.task_class, tool.timeout or klass.timeout,
                    tool.max_attempts or klass.max_attempts,
                    pick(tool.retry_backoff, klass.retry_backoff),
                    pick(tool.retry_backoff_max, klass.retry_backoff_max))


def builtin_task_classes() -> dict[str, TaskClass]:
    """The task classes of the original SparkQ."""
    return {
        "FAST_SCRIPT": TaskClass(timeout=30),
        "MEDIUM_SCRIPT": TaskClass(timeout=300),
        "LLM_LITE": TaskClass(timeout=300),
        "LLM_HEAVY": TaskClass(timeout=900),
    }


def builtin_tools() -> dict[str, Tool]:
    """The tools of the original SparkQ: two with commands, two left for agents."""
    return {
        "run-bash": Tool(task_class="MEDIUM_SCRIPT", description="Run a bash command",
                         command=["bash", "-c"]),
        "run-python": Tool(task_class="MEDIUM_SCRIPT", description="Run Python code",
                           command=["python3", "-c"]),
        "llm-haiku": Tool(task_class="LLM_LITE", description="A light LLM task, claimed by an agent"),
        "llm-sonnet": Tool(task_class="LLM_HEAVY", description="A heavy LLM task, claimed by an agent"),
    }


class RepoSettings(ConfigStruct):
    """``workspaces.repos.REPO``: what a repository's new workspaces run before their task."""

    setup: list[str] | None = None


class WorkspacesConfig(ConfigStruct):
    keep_days: Days = 7.0
    prune_days: Days = 30.0
    max_bytes: Annotated[int, Meta(ge=0)] | None = None
    git_timeout: Seconds = 600.0
    setup_timeout: Seconds = 600.0
    repos: dict[str, RepoSettings] = field(default_factory=dict)


class Config(ConfigStruct):
    project: ProjectConfig = field(default_factory=ProjectConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    purge: PurgeConfig = field(default_factory=PurgeConfig)
    stale: StaleConfig = field(default_factory=StaleConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    script_dirs: list[str] = field(default_factory=list)
    task_classes: dict[str, TaskClass] = field(default_factory=builtin_task_classes)
    tools: dict[str, Tool] = field(default_factory=builtin_tools)
    schedules: dict[str, ScheduleSpec] = field(default_factory=dict)
    workspaces: WorkspacesConfig = field(default_factory=WorkspacesConfig)


#: Keys of the original SparkQ file format that no longer apply, and what replaced them.
REPLACED_KEYS = {
    ("server", "port"): "sparkqd listens on a Unix socket; use server.socket "
                        "(the dashboard's port is http.listen)",
    ("server", "host"): "sparkqd listens on a Unix socket; use server.socket "
                        "(the dashboard's address is http.listen)",
}


def parse_config(text: str, source: str = "<config>") -> Config:
    """Validate YAML text into a Config, naming the key path of any error."""
    try:
        raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: $: expected a mapping of sections, got {type(raw).__name__}")
    for (section, key), message in REPLACED_KEYS.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise ConfigError(f"{source}: $.{section}.{key}: {message}")
    named = {}  # validated one entry at a time, so an error names the entry, not `[...]`
    for section, kind in (("task_classes", TaskClass), ("tools", Tool),
                          ("schedules", ScheduleSpec)):
        if isinstance(raw.get(section), dict):
            named[section] = {str(name): _convert(entry, kind, f"$.{section}.{name}", source)
                              for name, entry in raw[section].items()}
    config = _convert({**raw, **dict.fromkeys(named, {})}, Config, "$", source)
    config = msgspec.structs.replace(config, **named)
    for name, tool in config.tools.items():
        if tool.task_class not in config.task_classes:
            known = ", ".join(sorted(config.task_classes)) or "none"
            raise ConfigError(f"{source}: $.tools.{name}.task_class: unknown task class "
                              f"{tool.task_class!r} (known: {known})")
        if tool.command is not None and not tool.command:
            raise ConfigError(f"{source}: $.tools.{name}.command: must name a program")
        for key, check in (("repo", repo_problem), ("ref", ref_problem)):
            problem = getattr(tool, key) is not None and check(getattr(tool, key))
            if problem:
                raise ConfigError(f"{source}: $.tools.{name}.{key}: {problem}")
    for name, spec in config.schedules.items():
        problem = schedule_config_problem(name, spec, config)
        if problem:
            raise ConfigError(f"{source}: $.schedules.{name}{problem}")
    if config.http.listen is not None:
        try:
            listen_address(config.http.listen)
        except ValueError as exc:
            raise ConfigError(f"{source}: $.http.listen: {exc}") from None
    return config


def _convert(value: Any, kind: type, path: str, source: str) -> Any:
    try:
        return msgspec.convert(value, kind, str_keys=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_config_problem(str(exc), kind, path)}") from None


def _config_problem(message: str, kind: type, root: str) -> str:
    """msgspec's reason, '$.path: reason', with what a person needs to fix it: the values
    an enum allows, or the key an unknown one probably meant."""
    reason, sep, where = message.rpartition(" - at `")
    if not sep:
        reason, where = message, "$`"
    where = where.rstrip("`")
    path, target = root + where[1:], _type_at(kind, where)
    enum = re.fullmatch(r"Invalid enum value (.+)", reason)
    if enum and get_origin(target) is Literal:
        allowed = ", ".join(map(str, get_args(target)))
        return f"{path}: invalid value {enum[1]}; expected one of {allowed}"
    unknown = re.fullmatch(r"Object contains unknown field `(.+)`", reason)
    if unknown and isinstance(target, type) and issubclass(target, Struct):
        known = [f.name for f in msgspec.structs.fields(target)]
        close = difflib.get_close_matches(unknown[1], known, n=1, cutoff=0.75)
        hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"
        return f"{path}.{unknown[1]}: unknown key; {hint}"
    return f"{path}: {reason}"


def _type_at(kind: Any, path: str) -> Any:
    """The type that a key path like `$.database.fsync` or `$.streams[0]` names in ``kind``."""
    for key in re.findall(r"\.([^.\[]+)|\[[^\]]*\]", path):
        kind = _bare(kind)
        if isinstance(kind, type) and issubclass(kind, Struct):
            kind = {f.name: f.type for f in msgspec.structs.fields(kind)}.get(key)
        else:  # a list's item or a mapping's value
            kind = get_args(kind)[-1] if get_args(kind) else None
    return _bare(kind)


def _bare(kind: Any) -> Any:
    """A type without its Annotated constraints and without `| None`."""
    while get_origin(kind) in (Annotated, Union) or type(kind).__name__ == "UnionType":
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    return kind


def _path_first(message: str, root: str = "$") -> str:
    """Turn msgspec's 'reason - at `$.path`' into '$.path: reason'."""
    reason, sep, path = message.rpartition(" - at `")
    path = root + path.rstrip("`")[1:] if sep else root
    return f"{path}: {reason if sep else message}"


def load_config(path: str | None) -> Config:
    """Read the config file at ``path``, or the built-in defaults when None."""
    if path is None:
        return Config()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(text, path)


def find_config_path(explicit: str | None, env=os.environ) -> str | None:
    """The config file by DESIGN.md's precedence, or None for built-in defaults."""
    if explicit:
        return explicit
    if env.get("SPARKQ_CONFIG"):
        return env["SPARKQ_CONFIG"]
    if os.path.exists("sparkq.yml"):
        return os.path.abspath("sparkq.yml")
    xdg = env.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    candidate = os.path.join(xdg, "sparkq", "sparkq.yml")
    return candidate if os.path.exists(candidate) else None


def default_socket_path(env=os.environ) -> tuple[str, bool]:
    """The default socket path and whether it is the /tmp fallback."""
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "sparkq", "sparkqd.sock"), False
    return f"/tmp/sparkq-{os.getuid()}/sparkqd.sock", True


class Paths(Struct, frozen=True):
    """Where this daemon keeps its files, resolved once at startup."""

    config: str | None
    socket: str
    socket_explicit: bool
    data_dir: str
    database: str
    journal: str


def resolve_paths(args, config: Config, config_path: str | None, env=os.environ,
                  activated: bool = False) -> Paths:
    """Apply the precedence rules of DESIGN.md to flags, environment and config."""
    def expand(p: str) -> str:
        return os.path.abspath(os.path.expanduser(p))

    sock = args.socket or env.get("SPARKQ_SOCKET") or config.server.socket
    explicit = bool(sock)
    if not sock:
        sock, fallback = default_socket_path(env)
        if fallback and not activated:
            log.warning("XDG_RUNTIME_DIR is not set; using %s", sock)
    db_path = config.database.path and expand(config.database.path)
    data_dir = args.data_dir or env.get("SPARKQ_DATA_DIR")
    if not data_dir:
        if db_path:
            data_dir = os.path.dirname(db_path)
        else:
            state = env.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
            data_dir = os.path.join(state, "sparkq")
    data_dir = expand(data_dir)
    return Paths(config=config_path, socket=expand(sock), socket_explicit=explicit,
                 data_dir=data_dir, database=db_path or os.path.join(data_dir, "sparkq.db"),
                 journal=os.path.join(data_dir, "journal"))


# ============================================================================
# 3. Model: records, results and events
# ============================================================================


class Session(Struct, frozen=True, gc=False):
    name: str
    created_at: float
    status: str = "active"
    ended_at: float | None = None


class Stream(Struct, frozen=True, gc=False):
    name: str
    session: str
    created_at: float
    status: str = "active"
    ended_at: float | None = None
    paused: bool = False


class Task(Struct, frozen=True, gc=False):
    """One task; replaced, never mutated, so a snapshot can hold it safely."""

    id: int
    stream: str
    tool: str
    task_class: str
    payload: Any
    status: str
    priority: int
    timeout: float
    created_at: float
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    summary: str | None = None
    result: Any = None
    reason: str | None = None
    #: Transitions after creation, as (at, status, by, note); creation is implied.
    history: tuple = ()
    max_attempts: int = 1
    waiting_for: str | None = None  #: "delay", "retry" or "after" while waiting
    ready_at: float | None = None  #: when a delay or retry back-off ends
    after: tuple = ()  #: ids that must complete first
    key: str | None = None  #: unique key within the stream
    lock: str | None = None  #: at most one running task per lock key
    lease: str | None = None
    lease_expires_at: float | None = None
    run_pid: int | None = None  #: process group of the daemon's own run of it
    run_start: int | None = None  #: that process's start time, in clock ticks after boot
    schedule: str | None = None  #: the schedule whose firing enqueued it
    slot: float | None = None  #: the slot time of that firing
    repo: str | None = None  #: the repository of its workspace, as given
    ref: str | None = None  #: the branch, tag or commit asked for; None: the default branch
    workspace: str | None = None  #: "shared" or "worktree"; None: no workspace


class Schedule(Struct, frozen=True, gc=False):
    """A recurring (or one-shot) schedule: its spec and where its firings stand."""

    name: str
    spec: ScheduleSpec  #: as given, with the time zone a cron means resolved to its name
    source: str  #: "config" (sparkq.yml) or "socket"
    created_at: float
    next_slot: float | None  #: the earliest slot not yet fired or skipped; None once ended
    paused: bool = False
    last_task: int | None = None  #: the task of the latest firing
    #: The latest firings and skips, newest last: (slot, at, task id or None, what).
    firings: tuple = ()
    fired: int = 0
    skipped: int = 0


class Script(Struct, frozen=True):
    """A script found under ``script_dirs``, run as a task by its name."""

    name: str
    path: str
    argv: list[str]
    description: str = ""
    task_class: str = "MEDIUM_SCRIPT"
    timeout: float | None = None
    args: str = ""
    # repository workspaces: header lines `# workspace:`, `# repo:`, `# ref:`, `# setup:`
    workspace: str | None = None
    repo: str | None = None
    ref: str | None = None
    setup: str | None = None


class TaskResult(Struct, frozen=True):
    """A task as a reply shows it, with what the request adds (``existing``, ``next``)."""

    task: Task
    extra: dict


class TaskDetail(Struct, frozen=True):
    """A task with its history: the `task` view."""

    task: Task


class ScheduleDetail(Struct, frozen=True):
    """A schedule with its next fire times and latest firings: the `schedule.show` view."""

    schedule: Schedule
    count: int = 10


class Ended(Struct, frozen=True):
    """An ended task as `history` shows it, with how long it waited and ran."""

    task: Task


class Event(Struct, frozen=True, gc=False, array_like=True, tag=True):
    """A change of state; ``at`` is when it happened. New fields need defaults."""

    at: float


class SessionCreated(Event, tag="session.created"):
    name: str


class SessionEnded(Event, tag="session.ended"):
    name: str


class StreamCreated(Event, tag="stream.created"):
    name: str
    session: str


class StreamEnded(Event, tag="stream.ended"):
    name: str


class StreamPaused(Event, tag="stream.paused"):
    name: str


class StreamResumed(Event, tag="stream.resumed"):
    name: str


class TaskEnqueued(Event, tag="task.enqueued"):
    id: int
    stream: str
    tool: str
    task_class: str
    payload: Any
    timeout: float
    priority: int = 0
    max_attempts: int = 1
    waiting_for: str | None = None
    ready_at: float | None = None
    after: tuple = ()
    key: str | None = None
    lock: str | None = None
    schedule: str | None = None
    slot: float | None = None
    repo: str | None = None
    ref: str | None = None
    workspace: str | None = None


class TaskReleased(Event, tag="task.released"):
    """A waiting task's condition changed: pending if ``waiting_for`` is None."""

    id: int
    waiting_for: str | None = None


class TaskClaimed(Event, tag="task.claimed"):
    id: int
    worker: str | None = None
    lease: str | None = None
    lease_expires_at: float | None = None


class TaskRunStarted(Event, tag="task.run_started"):
    """The daemon started a process for the task: its group, to kill if orphaned."""

    id: int
    pid: int
    start: int | None = None


class TaskTouched(Event, tag="task.touched"):
    id: int
    lease_expires_at: float


class TaskCompleted(Event, tag="task.completed"):
    id: int
    summary: str | None = None
    result: Any = None


class TaskFailed(Event, tag="task.failed"):
    id: int
    reason: str
    by: str | None = None


class TaskRetrying(Event, tag="task.retrying"):
    """A failed attempt with attempts left: waits for its back-off, then runs again."""

    id: int
    reason: str
    ready_at: float
    by: str | None = None


class TaskCancelled(Event, tag="task.cancelled"):
    id: int
    by: str | None = None


class TaskRequeued(Event, tag="task.requeued"):
    """Back to pending, or waiting (``waiting_for: after``) for dependencies not completed."""

    id: int
    by: str | None = None
    waiting_for: str | None = None


class TasksPurged(Event, tag="tasks.purged"):
    ids: list[int]


# -- schedules --

class ScheduleCreated(Event, tag="schedule.created"):
    name: str
    spec: ScheduleSpec
    source: str = "socket"
    next_slot: float | None = None


class ScheduleChanged(Event, tag="schedule.changed"):
    name: str
    spec: ScheduleSpec
    source: str = "socket"
    next_slot: float | None = None


class ScheduleRemoved(Event, tag="schedule.removed"):
    name: str


class SchedulePaused(Event, tag="schedule.paused"):
    name: str


class ScheduleResumed(Event, tag="schedule.resumed"):
    name: str
    next_slot: float | None = None


class ScheduleFired(Event, tag="schedule.fired"):
    """A slot enqueued its task (``manual``: fired on request, outside the clock)."""

    name: str
    slot: float
    task: int
    next_slot: float | None = None
    existing: bool = False
    manual: bool = False


class ScheduleSkipped(Event, tag="schedule.skipped"):
    """Slots that enqueued nothing: ``why`` is overlap, missed, paused or an error."""

    name: str
    slot: float
    why: str
    next_slot: float | None = None
    last_slot: float | None = None  #: the last of a run of ``count`` skipped slots
    count: int = 1

# -- repository workspaces: a workspace's id is its task's id (a worktree) or its repository
# (the shared clone); see the core's WorkspaceBook


class WorkspaceCreated(Event, tag="workspace.created"):
    """A directory now exists for a repository: its shared clone, or a task's worktree."""

    workspace: str
    repo: str
    kind: str
    path: str
    url: str
    task: int | None = None
    branch: str | None = None
    ref: str | None = None
    commit: str | None = None


class WorkspaceUpdated(Event, tag="workspace.updated"):
    """Ready for a task's attempt (fetched, reset, set up); with no task: only fetched."""

    workspace: str
    task: int | None = None
    ref: str | None = None
    commit: str | None = None
    branch: str | None = None
    stash: str | None = None  #: what it kept of what the last task left: a stash, commits


class WorkspaceReleased(Event, tag="workspace.released"):
    """The attempt of the task it was ready for ended."""

    workspace: str
    task: int


class WorkspaceRemoved(Event, tag="workspace.removed"):
    workspace: str
    reason: str = ""
    patch: str | None = None  #: where its changes were saved first
    task: int | None = None  #: a worktree's task, so those watching that task hear of it


AnyEvent = Union[SessionCreated, SessionEnded, StreamCreated, StreamEnded, StreamPaused,
                 StreamResumed, TaskEnqueued, TaskReleased, TaskClaimed, TaskRunStarted,
                 TaskTouched,
                 TaskCompleted, TaskFailed, TaskRetrying, TaskCancelled, TaskRequeued,
                 TasksPurged, ScheduleCreated, ScheduleChanged, ScheduleRemoved,
                 SchedulePaused, ScheduleResumed, ScheduleFired, ScheduleSkipped,
                 WorkspaceCreated, WorkspaceUpdated, WorkspaceReleased, WorkspaceRemoved]


# ============================================================================
# 4. Protocol: requests and framing
# ============================================================================


class Request(Struct, tag_field="op", forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every request; ``id`` is echoed back in the reply."""

    #: Kept as the client encoded it and echoed byte for byte: a value of any type comes
    #: back exactly (a msgpack timestamp with nanoseconds too, which a datetime would round).
    id: msgspec.Raw = None
    #: Changes nothing in the queue: no journal room is reserved for it.
    read_only: ClassVar[bool] = False
    #: Journal bytes reserved before it runs (each event also reserves its own).
    journal_room: ClassVar[int] = 65536
    #: Has no effect at all, only reads: it may come as an HTTP GET.
    safe: ClassVar[bool] = False
    #: May be answered later rather than at once: it waits (for a task, a task's end, its
    #: workspace, git) or turns the connection into a stream (watch, log follow).
    may_wait: ClassVar[bool] = False


class ReadRequest(Request):
    """A request that only reads, or acts outside the queue (reload, shutdown)."""

    read_only: ClassVar[bool] = True
    safe: ClassVar[bool] = True


class Hello(ReadRequest, tag="hello"):
    pass


class Status(ReadRequest, tag="status"):
    pass


class SessionCreate(Request, tag="session.create"):
    name: Name


class SessionEnd(Request, tag="session.end"):
    name: str


class SessionList(ReadRequest, tag="session.list"):
    pass


class StreamCreate(Request, tag="stream.create"):
    name: Name
    session: str


class StreamEnd(Request, tag="stream.end"):
    name: str


class StreamList(ReadRequest, tag="stream.list"):
    session: str | None = None


Names = str | list[str]


class Enqueue(Request, tag="enqueue"):
    tool: str | None = None
    script: str | None = None
    args: list[str] | None = None
    stream: str = DEFAULT
    payload: Any = None
    timeout: Seconds | None = None
    priority: Priority = 0
    delay: Duration | None = None
    at: str | None = None
    after: list[TaskId] | None = None
    key: Annotated[str, Meta(min_length=1)] | None = None
    lock: Annotated[str, Meta(min_length=1)] | None = None
    max_attempts: Attempts | None = None
    # repository workspaces
    repo: Annotated[str, Meta(min_length=1)] | None = None
    ref: Annotated[str, Meta(min_length=1)] | None = None
    workspace: Literal["shared", "worktree", "none"] | None = None

    def __post_init__(self):
        check_json_value(self.payload, "payload")


class Peek(ReadRequest, tag="peek"):
    stream: Names = DEFAULT
    tool: Names | None = None


class Claim(Request, tag="claim"):
    may_wait: ClassVar[bool] = True
    stream: Names = DEFAULT
    tool: Names | None = None
    worker: str | None = None
    pid: Pid | None = None
    wait: Duration = 0.0


class ClaimNext(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The claim a `complete` or `fail` makes in the same step: the worker loop's next task."""

    stream: Names = DEFAULT
    tool: Names | None = None
    worker: str | None = None
    pid: Pid | None = None
    wait: Duration = 0.0


class Complete(Request, tag="complete"):
    may_wait: ClassVar[bool] = True
    task: TaskId
    summary: str | None = None
    result: Any = None
    lease: str | None = None
    claim_next: ClaimNext | None = None

    def __post_init__(self):
        check_json_value(self.result, "result")


class Fail(Request, tag="fail"):
    may_wait: ClassVar[bool] = True
    task: TaskId
    reason: Annotated[str, Meta(min_length=1)]
    final: bool = False
    lease: str | None = None
    claim_next: ClaimNext | None = None


class Touch(Request, tag="touch"):
    task: TaskId
    lease: str | None = None
    pid: Pid | None = None


class Cancel(Request, tag="cancel"):
    task: TaskId


class Requeue(Request, tag="requeue"):
    """One task by ``task``, or every match of ``stream`` and ``status``."""

    task: TaskId | None = None
    stream: str | None = None
    status: Literal["running", "failed", "cancelled"] | None = None


class StreamPause(Request, tag="stream.pause"):
    name: str


class StreamResume(Request, tag="stream.resume"):
    name: str


class Locks(ReadRequest, tag="locks"):
    pass


class Logs(ReadRequest, tag="logs"):
    may_wait: ClassVar[bool] = True
    task: TaskId
    tail: Count | None = None
    follow: bool = False


class Watch(ReadRequest, tag="watch"):
    may_wait: ClassVar[bool] = True
    streams: list[str] | None = None
    sessions: list[str] | None = None
    tasks: list[TaskId] | None = None
    events: list[str] | None = None
    #: Resume after a reconnect: first the events kept since the one of this ``seq``.
    after_seq: Count | None = None
    #: The events of one moment as one `changed` message (for a view that refetches).
    coalesce: bool = False


class History(ReadRequest, tag="history"):
    stream: str | None = None
    session: str | None = None
    status: Literal["completed", "failed", "cancelled"] | None = None
    since: str | None = None
    limit: Count | None = None
    schedule: str | None = None


class Metrics(ReadRequest, tag="metrics"):
    pass


class Scripts(ReadRequest, tag="scripts"):
    pass


class Workers(ReadRequest, tag="workers"):
    pass


class Wait(ReadRequest, tag="wait"):
    may_wait: ClassVar[bool] = True
    tasks: Annotated[list[TaskId], Meta(min_length=1)]
    timeout: Duration | None = None


class GetTask(ReadRequest, tag="task"):
    task: TaskId


class ListTasks(ReadRequest, tag="tasks"):
    stream: str | None = None
    session: str | None = None
    status: Literal[STATUSES] | None = None
    limit: Count | None = None
    tool: str | None = None
    #: Case-insensitive text in the payload, summary or reason.
    text: Annotated[str, Meta(min_length=1)] | None = None
    #: Only ids in [min_id, max_id]: a page of a million tasks looks at its window alone.
    min_id: TaskId | None = None
    max_id: TaskId | None = None
    newest: bool = False  #: newest first


class Purge(Request, tag="purge"):
    older_than_days: Days | None = None


class Tools(ReadRequest, tag="tools"):
    pass


class Reload(ReadRequest, tag="reload"):
    safe: ClassVar[bool] = False


class Shutdown(ReadRequest, tag="shutdown"):
    safe: ClassVar[bool] = False


class Schema(ReadRequest, tag="schema"):
    pass


# -- schedules --

def _check_schedule_payload(self) -> None:
    if self.payload is not msgspec.UNSET:
        check_json_value(self.payload, "payload")


def schedule_request(name: str, tag: str, changes: bool) -> type:
    """A request with ScheduleSpec's own fields, so they are defined once: a create takes
    the spec's defaults, a change (``changes``) only the fields it names."""
    spec_fields = [(f.name, f.type | msgspec.UnsetType, msgspec.UNSET) if changes else
                   (f.name, f.type, f.default) for f in msgspec.structs.fields(ScheduleSpec)]
    return msgspec.defstruct(name, [("name", Name if not changes else str), *spec_fields],
                             bases=(Request,), tag=tag, module=__name__,
                             namespace={"__post_init__": _check_schedule_payload,
                                        "__doc__": f"The `{tag}` request."})


ScheduleCreate = schedule_request("ScheduleCreate", "schedule.create", changes=False)
ScheduleUpdate = schedule_request("ScheduleUpdate", "schedule.update", changes=True)


class ScheduleDelete(Request, tag="schedule.delete"):
    name: str


class SchedulePause(Request, tag="schedule.pause"):
    name: str


class ScheduleResume(Request, tag="schedule.resume"):
    name: str


class ScheduleFire(Request, tag="schedule.fire"):
    name: str


class ScheduleList(ReadRequest, tag="schedule.list"):
    stream: str | None = None


class ScheduleShow(ReadRequest, tag="schedule.show"):
    name: str
    count: Annotated[int, Meta(ge=1, le=1000)] = 10


class ScheduleNext(ReadRequest, tag="schedule.next"):
    """The next fire times of a cron expression, without creating a schedule."""

    cron: NonEmpty
    timezone: NonEmpty | None = None
    count: Annotated[int, Meta(ge=1, le=1000)] = 10
    after: str | None = None

# -- repository workspaces: remove and gc change state later, through the change pipeline
# once their git work is done, so they reserve no journal room up front


class WorkspaceList(ReadRequest, tag="workspace.list"):
    repo: str | None = None


class WorkspaceShow(ReadRequest, tag="workspace.show"):
    workspace: Annotated[str, Meta(min_length=1)]


class WorkspaceRemove(ReadRequest, tag="workspace.remove"):
    may_wait: ClassVar[bool] = True
    safe: ClassVar[bool] = False  # it removes a directory: never by an HTTP GET
    workspace: Annotated[str, Meta(min_length=1)]
    force: bool = False


class WorkspaceGc(ReadRequest, tag="workspace.gc"):
    may_wait: ClassVar[bool] = True
    safe: ClassVar[bool] = False
    dry_run: bool = False


# -- the dashboard ------------------------------------------------------------------


class Ui(ReadRequest, tag="ui"):
    """The dashboard's URL with its token (``new_token``: a new token first)."""

    safe: ClassVar[bool] = False
    new_token: bool = False


AnyRequest = Union[Hello, Status, SessionCreate, SessionEnd, SessionList, StreamCreate,
                   StreamEnd, StreamList, StreamPause, StreamResume, Enqueue, Peek, Claim,
                   Complete, Fail, Touch, Cancel, Requeue, GetTask, ListTasks, Wait, Locks,
                   Logs, Scripts, Workers, Watch, History, Metrics, Purge, Tools, Reload,
                   Shutdown, Schema, ScheduleCreate, ScheduleUpdate, ScheduleDelete,
                   SchedulePause, ScheduleResume, ScheduleFire, ScheduleList, ScheduleShow,
                   ScheduleNext, WorkspaceList, WorkspaceShow, WorkspaceRemove, WorkspaceGc,
                   Ui]
OPS = frozenset(cls.__struct_config__.tag for cls in AnyRequest.__args__)


def request_schema() -> dict:
    """The JSON Schema of every request, generated from the request Structs."""
    return msgspec.json.schema(AnyRequest)


class FrameId(Struct):
    """The ``id`` of a frame that is no valid request: all of it that is read."""

    id: msgspec.Raw = None


class Codec:
    """One connection's framing: JSON lines or length-prefixed msgpack."""

    def __init__(self, max_frame: int):
        self.max_frame = max_frame

    def decode(self, frame: bytes) -> Request:
        """Decode and validate one frame, raising BadRequest with the reason."""
        try:
            return self.decoder.decode(frame)
        except msgspec.ValidationError as exc:
            raise BadRequest(self._explain(frame, str(exc))) from None
        except msgspec.DecodeError as exc:
            raise BadRequest(f"malformed {self.name}: {exc}") from None
        except RecursionError:
            raise BadRequest(f"malformed {self.name}: nested too deeply") from None

    def request_id(self, frame: bytes) -> msgspec.Raw | None:
        """The ``id`` of a frame that failed validation, if it has one."""
        try:
            return self.ids.decode(frame).id
        except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
            return None

    def _loose(self, frame: bytes) -> Any:
        try:
            return self.loose.decode(frame)
        except (msgspec.DecodeError, RecursionError):
            return None

    def _explain(self, frame: bytes, message: str) -> str:
        value = self._loose(frame)
        if isinstance(value, dict) and isinstance(value.get("op"), str) and value["op"] not in OPS:
            return f"unknown op {value['op']!r}"
        if message.startswith("Object missing required field `op`"):
            return "missing field 'op'"
        return _path_first(message)


class JsonLines(Codec):
    name = "JSON"
    decoder = msgspec.json.Decoder(AnyRequest)
    ids = msgspec.json.Decoder(FrameId)
    loose = msgspec.json.Decoder()
    _encode = msgspec.json.Encoder().encode

    def split(self, buf: bytearray) -> list[bytes]:
        """Remove and return the complete lines at the front of ``buf``."""
        end = buf.rfind(b"\n")
        if end < 0:
            if len(buf) > self.max_frame:
                raise TooLarge(f"line longer than {self.max_frame} bytes")
            return []
        lines = bytes(buf[:end]).split(b"\n")
        del buf[: end + 1]
        if len(buf) > self.max_frame:
            raise TooLarge(f"line longer than {self.max_frame} bytes")
        for line in lines:
            if len(line) > self.max_frame:
                raise TooLarge(f"line longer than {self.max_frame} bytes")
        return [line for line in lines if line.strip()]

    def encode(self, reply: dict) -> bytes:
        return self._encode(reply) + b"\n"


class MsgpackFrames(Codec):
    name = "msgpack"
    decoder = msgspec.msgpack.Decoder(AnyRequest)
    ids = msgspec.msgpack.Decoder(FrameId)
    loose = msgspec.msgpack.Decoder()
    _encode = msgspec.msgpack.Encoder().encode
    _header = struct.Struct(">I")

    def split(self, buf: bytearray) -> list[bytes]:
        """Remove and return the complete frames at the front of ``buf``."""
        frames, pos, size = [], 0, len(buf)
        while size - pos >= 4:
            (length,) = self._header.unpack_from(buf, pos)
            if length > self.max_frame:
                raise TooLarge(f"frame of {length} bytes exceeds {self.max_frame}")
            if size - pos - 4 < length:
                break
            frames.append(bytes(buf[pos + 4: pos + 4 + length]))
            pos += 4 + length
        del buf[:pos]
        return frames

    def encode(self, reply: dict) -> bytes:
        body = self._encode(reply)
        return self._header.pack(len(body)) + body


def ok_reply(request_id: Any, result: Any) -> dict:
    return {"id": request_id, "ok": True, "result": result}


def error_reply(request_id: Any, exc: SparkQError) -> dict:
    return {"id": request_id, "ok": False, "error": {"code": exc.code, "message": str(exc)}}


# ============================================================================
# 5. Queue core
# ============================================================================

PRIORITY_BIAS = 1 << 62  # ready-heap keys: (BIAS - priority) << 64 | id, smallest first
ID_MASK = (1 << 64) - 1
WAIT_NOTES = {"delay": "delay over", "retry": "back-off over", "after": "dependencies completed"}


def ready_key(task: Task) -> int:
    """Heap key ordering higher priority first, then lower id (older) first."""
    return ((PRIORITY_BIAS - task.priority) << 64) | task.id


def normalise_lock(key: str) -> str:
    """One lock per repository however its URL is written; other keys stay as given. A
    file:// URL names the local path it is, ``.git`` and all: /srv/app.git is not /srv/app."""
    text = key.strip()
    if "://" in text:
        scheme, _, rest = text.partition("://")
        host, _, path = rest.partition("/")
        if scheme.lower() == "file":  # (its host can only be this one: empty or localhost)
            return os.path.normpath("/" + path.lstrip("/"))
    elif re.match(r"^[\w.-]+@[\w.-]+:", text):  # scp-like: git@github.com:user/repo
        host, _, path = text.partition(":")
    else:
        return key
    host = host.rpartition("@")[2].lower()
    path = path.strip("/")
    path = path[:-4] if path.endswith(".git") else path
    return f"{host}/{path}".rstrip("/")


def check_payload_given(name: str, tool: Tool, payload: Any) -> None:
    """A tool whose command ends in an option taking the payload (``bash -c``) needs one."""
    command = tool.command
    if command and command[-1].startswith("-") and payload is None:
        raise BadRequest(f"tool {name!r} runs `{' '.join(command)} PAYLOAD`: it needs a "
                         f"payload, the text to run")


def parse_time(text: str, field: str = "at") -> float:
    """Epoch seconds of an RFC 3339 time; it must say its offset."""
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{field}: {text!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise BadRequest(f"{field}: {text!r} has no UTC offset (add Z or +01:00)")
    return moment.timestamp()


SCRIPT_TOOL_PREFIX = "script:"


def names(value: str | list[str] | None) -> list[str] | None:
    return [value] if isinstance(value, str) else value


@contextlib.contextmanager
def restored_on_error(heap: list, entries: list):
    """Put timer entries back on their heap if the change they cause is refused."""
    try:
        yield
    except BaseException:
        for entry in entries:
            heapq.heappush(heap, entry)
        raise


class Changes:
    """What changed since the last snapshot: the latest objects, by key."""

    def __init__(self):
        self.sessions: dict[str, Session] = {}
        self.streams: dict[str, Stream] = {}
        self.tasks: dict[int, Task] = {}
        self.purged: set[int] = set()
        self.schedules: dict[str, Schedule | None] = {}  #: None: removed
        self.workspaces: dict[str, Workspace] = {}
        self.workspaces_removed: set[str] = set()

    def __bool__(self):
        return bool(self.sessions or self.streams or self.tasks or self.purged or self.schedules
                    or self.workspaces or self.workspaces_removed)


class TaskIndex:
    """Every task, and the indexes that make claims and timers cheap, kept in step by ``put``.

    Pending tasks sit in one heap per (stream, tool), so a claim looks at the
    top of a few heaps: O(log n). A task whose lock is held is moved, when it
    reaches a heap's top, to a heap of its lock; when the lock frees, the best
    task of each of that lock's heaps goes back. Waiting tasks are in no ready
    heap: the timer releases delays and back-offs, and a task's completion
    releases (or fails) its dependents.
    """

    def __init__(self):
        self.tasks: dict[int, Task] = {}
        #: stream -> tool -> heap of ready_key() of pending tasks (stale keys skipped)
        self.ready: dict[str, dict[str, list[int]]] = {}
        #: lock -> (stream, tool) -> heap of pending tasks set aside while the lock is held
        self.parked: dict[str, dict[tuple[str, str], list[int]]] = {}
        self.lock_holder: dict[str, int] = {}
        self.keys: dict[tuple[str, str], int] = {}  #: (stream, key) -> task id
        self.dependents: dict[int, list[int]] = {}  #: id -> waiting tasks naming it in after
        #: id -> tasks failed only because it ended unsuccessfully (stale entries skipped)
        self.cascaded: dict[int, list[int]] = {}
        self.counts: dict[str, dict[str, int]] = {}  #: stream -> status -> n
        self.stale_heap: list[tuple[float, int, str]] = []  #: (lease_expires_at, id, lease)
        self.delay_heap: list[tuple[float, int]] = []  #: (ready_at, id)
        self.purge_heap: list[tuple[float, int]] = []  #: (finished_at, id)
        #: (finished_at, id) in the order tasks ended, newest last; stale entries skipped
        self.finish_log: list[tuple[float, int]] = []
        #: (stream, tool) that gained claimable tasks (tool None: any), and tasks that
        #: ended, since last taken.
        self.became_ready: set[tuple[str, str | None]] = set()
        self.finished: list[int] = []
        self.changes = Changes()  #: what the next snapshot writes

    def add_stream(self, name: str) -> None:
        self.ready[name] = {}
        self.counts[name] = dict.fromkeys(STATUSES, 0)

    def take_wakeups(self) -> tuple[set[tuple[str, str | None]], list[int]]:
        ready, finished = self.became_ready, self.finished
        self.became_ready, self.finished = set(), []
        return ready, finished

    def put(self, task: Task, old: Task | None, loading: bool = False) -> None:
        """Store a new version of a task and keep every index in step.

        ``loading``: a task of the snapshot being loaded; its heaps are built by
        ``loaded()`` once all are in, and it is no change for the next snapshot.
        """
        self.tasks[task.id] = task
        if not loading:
            self.changes.tasks[task.id] = task
        push = list.append if loading else heapq.heappush
        status, old_status = task.status, old and old.status
        if old_status != status:
            counts = self.counts[task.stream]
            if old_status:
                counts[old_status] -= 1
            counts[status] += 1
        if status == "pending":
            push(self.ready[task.stream].setdefault(task.tool, []), ready_key(task))
            self.became_ready.add((task.stream, task.tool))
        elif status == "running":
            push(self.stale_heap, (task.lease_expires_at, task.id, task.lease))
            if task.lock is not None:
                self.lock_holder[task.lock] = task.id
        elif status == "waiting":
            if task.waiting_for in ("delay", "retry"):
                push(self.delay_heap, (task.ready_at, task.id))
        elif old_status != status:  # it just ended
            push(self.purge_heap, (task.finished_at, task.id))
            self.finish_log.append((task.finished_at, task.id))
            self.finished.append(task.id)
            self.index_cascade(task)
        if loading:
            if task.key is not None or task.waiting_for == "after":
                self.index_new(task)
            return
        if old_status == "running" and status != "running" and task.lock is not None:
            if self.lock_holder.get(task.lock) == task.id:
                del self.lock_holder[task.lock]
        if task.lock is not None and task.lock not in self.lock_holder:
            self.unpark(task.lock)

    def loaded(self) -> None:
        """Build the heaps and the finish log once a snapshot's tasks are all in."""
        for by_tool in self.ready.values():
            for heap in by_tool.values():
                heapq.heapify(heap)
        for heap in (self.stale_heap, self.delay_heap, self.purge_heap):
            heapq.heapify(heap)
        self.finish_log = self.live_finish_log()
        self.take_wakeups()

    def remove(self, task_id: int) -> None:
        """Forget a purged task (stale heap entries are skipped where they are met)."""
        task = self.tasks.pop(task_id, None)
        if task is None:
            return
        self.counts[task.stream][task.status] -= 1
        if task.key is not None and self.keys.get((task.stream, task.key)) == task_id:
            del self.keys[task.stream, task.key]
        self.changes.tasks.pop(task_id, None)
        self.changes.purged.add(task_id)

    def top(self, stream: str, tool: str) -> Task | None:
        """The best claimable task of one heap, setting aside those whose lock is held."""
        heap = self.ready[stream].get(tool)
        while heap:
            task = self.tasks.get(heap[0] & ID_MASK)
            if task is None or task.status != "pending" or ready_key(task) != heap[0]:
                heapq.heappop(heap)  # a stale key: the task moved on since it was pushed
            elif task.lock is not None and task.lock in self.lock_holder:
                heapq.heappop(heap)
                groups = self.parked.setdefault(task.lock, {})
                heapq.heappush(groups.setdefault((stream, tool), []), ready_key(task))
            else:
                return task
        return None

    def unpark(self, lock: str) -> None:
        """The lock is free: the best parked task of each heap may be claimed again."""
        groups = self.parked.get(lock)
        if not groups:
            return
        for (stream, tool), heap in list(groups.items()):
            while heap:
                task = self.tasks.get(heapq.heappop(heap) & ID_MASK)
                if task is not None and task.status == "pending":
                    heapq.heappush(self.ready[stream].setdefault(tool, []), ready_key(task))
                    self.became_ready.add((stream, tool))
                    break
            if not heap:
                del groups[(stream, tool)]
        if not groups:
            del self.parked[lock]

    def index_cascade(self, task: Task) -> None:
        """Remember a task failed only because a dependency did, for requeue's cascade."""
        cause = cascade_cause(task)
        if cause is not None:
            self.cascaded.setdefault(cause, []).append(task.id)

    def index_new(self, task: Task) -> None:
        """Index a task's unique key and the dependencies it waits for."""
        if task.key is not None:
            self.keys[task.stream, task.key] = task.id
        if task.waiting_for == "after":
            for dep in task.after:
                if dep in self.tasks and self.tasks[dep].status != "completed":
                    self.dependents.setdefault(dep, []).append(task.id)

    def live_finish_log(self) -> list[tuple[float, int]]:
        return sorted((t.finished_at, t.id) for t in self.tasks.values() if t.status in TERMINAL)

    def totals(self) -> dict[str, int]:
        totals = dict.fromkeys(STATUSES, 0)
        for counts in self.counts.values():
            for status, n in counts.items():
                totals[status] += n
        return totals


#: Events of a stream (the state they leave is the stream's).
STREAM_EVENTS = frozenset((StreamCreated, StreamEnded, StreamPaused, StreamResumed))


class Queue:
    """Tasks, with the rules that change them; sessions and streams are its StreamBook.

    Each handler (``enqueue(request, now)``, ``claim``...) validates a request,
    emits the events that carry it out (each handed to ``record`` and then
    applied) and returns its result as Structs. ``tick(now)`` does what time
    makes due. The caller takes the emitted events with ``take_events()``.
    Nothing here does I/O or reads the clock; the indexes are a TaskIndex.
    """

    def __init__(self, config: Config, scripts: dict | None = None):
        self.config = config
        self.scripts: dict[str, Script] = scripts or {}  #: indexed from script_dirs by the daemon
        self.runnables = Runnables(config, self.scripts)
        self.stream_book = StreamBook(self)
        self.next_id = 1
        self.index = TaskIndex()
        #: Called with each event before it is applied; the daemon's journal encodes it and
        #: reserves its room there, and may refuse it (BadRequest, Unavailable).
        self.record = None
        self._events: list[Event] = []
        self._left: list = []  #: the task or stream each event of ``_events`` left
        #: The task or stream each of the events last taken left, in their order: the
        #: observers of a loop turn's events see each as its own change left it.
        self.event_states: list = []
        self.workspaces = WorkspaceBook(self)
        self._apply = {
            **self.stream_book.appliers(),
            TaskEnqueued: self._apply_enqueued, TaskReleased: self._apply_released,
            TaskClaimed: self._apply_claimed, TaskRunStarted: self._apply_run_started,
            TaskTouched: self._apply_touched,
            TaskCompleted: self._apply_completed, TaskFailed: self._apply_failed,
            TaskRetrying: self._apply_retrying, TaskCancelled: self._apply_cancelled,
            TaskRequeued: self._apply_requeued, TasksPurged: self._apply_purged,
            **self.workspaces.appliers(),
        }
        self.schedules = Schedules(self)
        self._apply.update(self.schedules.appliers())

    # -- entry points -------------------------------------------------------

    def take_events(self) -> list[Event]:
        """The events emitted since the last call, in order."""
        events, self._events = self._events, []
        self.event_states, self._left = self._left, []
        return events

    def take_changes(self) -> Changes:
        """What changed since the last call, for the snapshot."""
        changes, self.index.changes = self.index.changes, Changes()
        return changes

    def keep_changes(self, changes: Changes) -> None:
        """Put back the changes a failed snapshot took, under those made since."""
        self.index.changes = merge_changes(changes, self.index.changes)

    def take_wakeups(self) -> tuple[set[tuple[str, str | None]], list[int]]:
        """(stream, tool) that gained claimable tasks and tasks that ended, since the last call."""
        return self.index.take_wakeups()

    # What the daemon's parts read most (the rest they read of ``index`` and ``stream_book``).
    tasks = property(lambda self: self.index.tasks)
    sessions = property(lambda self: self.stream_book.sessions)
    streams = property(lambda self: self.stream_book.streams)

    def apply(self, event: Event) -> None:
        """Change state by one event: the same path live and on replay."""
        self._apply[type(event)](event)

    def _emit(self, event: Event) -> None:
        if self.record is not None:
            self.record(event)  # an event that cannot be journaled is never applied
        self.apply(event)
        self._events.append(event)
        self._left.append(self._left_by(event))
        if type(event) in ATTEMPT_ENDS:
            self.workspaces.attempt_ended(event)  # its workspace is released with it

    def _left_by(self, event: Event) -> Task | Stream | None:
        """The task or stream as ``event`` left it (a later change in the same commit
        replaces it in the queue, not here)."""
        task_id = getattr(event, "id", None)
        if task_id is not None:
            return self.index.tasks.get(task_id)
        if type(event) in STREAM_EVENTS:
            return self.stream_book.streams.get(event.name)
        return None

    def bootstrap(self, now: float) -> None:
        """Give a fresh queue its ``default`` session and stream."""
        if not self.sessions:
            self._emit(SessionCreated(at=now, name=DEFAULT))
            self._emit(StreamCreated(at=now, name=DEFAULT, session=DEFAULT))

    def reconfigure(self, config: Config, scripts: dict) -> None:
        """Take a reloaded configuration; leases already granted keep their expiry."""
        self.config = config
        self.scripts = scripts
        self.runnables.reconfigure(config, scripts)

    # -- lookups ------------------------------------------------------------

    def task(self, task_id: int) -> Task:
        try:
            return self.index.tasks[task_id]
        except KeyError:
            raise NotFound(f"no task {task_id}") from None

    def _running(self, task_id: int, verb: str, lease: str | None) -> Task:
        """The task, if it is running and ``lease`` (when given) still holds it."""
        task = self.task(task_id)
        if task.status != "running":
            raise Conflict(f"cannot {verb} task {task_id}: it is {task.status}, not running")
        if lease is not None and lease != task.lease:
            issued = {f"{task.id}.{n + 1}" for n, entry in enumerate(task.history)
                      if entry[1] == "running"}
            why = ("it expired and the task was claimed again" if lease in issued else
                   f"it is not a lease of this task; the current one is {task.lease}")
            raise Conflict(f"cannot {verb} task {task_id}: lease {lease} does not hold it ({why})")
        return task

    # -- enqueue ------------------------------------------------------------

    def enqueue(self, req: Enqueue, now: float, origin: tuple | None = None) -> TaskResult:
        """A new task (``origin``: the schedule and slot whose firing enqueues it)."""
        stream = self.stream_book.stream(req.stream)
        if stream.status == "ended":
            raise Conflict(f"stream {stream.name!r} has ended and takes no new tasks")
        tool_name, payload = self.runnables.what_to_run(req)
        settings = self.runnables.settings(tool_name)
        if req.delay is not None and req.at is not None:
            raise BadRequest("give delay or at, not both")
        ready_at = parse_time(req.at) if req.at is not None else (
            now + req.delay if req.delay else None)
        if req.at is not None and not 0 <= ready_at < LAST_TIME:
            raise BadRequest(f"at: {req.at!r} is before 1970 or after 9999")
        after = tuple(dict.fromkeys(req.after or ()))
        for dep in after:
            if dep not in self.index.tasks:
                raise NotFound(f"no task {dep} (named in after)")
        self.runnables.check_something_to_run(req)
        placed = self.workspaces.task_fields(req, tool_name)  # repo, ref, workspace and lock
        if req.key is not None and (stream.name, req.key) in self.index.keys:  # valid, and known
            return TaskResult(self.index.tasks[self.index.keys[stream.name, req.key]], {"existing": True})
        unfinished = [dep for dep in after if self.index.tasks[dep].status != "completed"]
        waiting_for = "after" if unfinished else (
            "delay" if ready_at is not None and ready_at > now else None)
        task_id = self.next_id
        self._emit(TaskEnqueued(
            at=now, id=task_id, stream=stream.name, tool=tool_name, task_class=settings.task_class,
            payload=payload, timeout=float(req.timeout or settings.timeout),
            priority=req.priority, max_attempts=req.max_attempts or settings.max_attempts,
            waiting_for=waiting_for, ready_at=ready_at, after=after, key=req.key, **placed,
            schedule=origin and origin[0], slot=origin and origin[1]))
        for dep in unfinished:
            if self.index.tasks[dep].status in TERMINAL:
                self._settle_dependents(dep, now)  # a dependency that failed already
        return TaskResult(self.index.tasks[task_id], {"existing": False})

    # -- claim and peek -------------------------------------------------------

    def _best_ready(self, stream_names: list[str], tools: list[str] | None) -> Task | None:
        """The task a claim would take: highest priority, then oldest, across the filters."""
        best = None
        self.stream_book.streams_named(stream_names)
        for name in stream_names:
            if self.stream_book.streams[name].paused:
                continue
            by_tool = self.index.ready[name]
            for tool in (tools if tools is not None else list(by_tool)):
                task = self.index.top(name, tool)
                if task is not None and (best is None or ready_key(task) < ready_key(best)):
                    best = task
        return best

    def peek(self, req: Peek, now: float) -> dict | None:
        task = self._best_ready(names(req.stream), names(req.tool))
        return task

    def claim(self, req: Claim, now: float) -> dict | None:
        task = self._best_ready(names(req.stream), names(req.tool))
        if task is None:
            return None
        self._emit(TaskClaimed(at=now, id=task.id, worker=req.worker,
                               lease=f"{task.id}.{len(task.history) + 1}",
                               lease_expires_at=now + self.config.stale.factor * task.timeout))
        return self.index.tasks[task.id]

    # -- finishing ------------------------------------------------------------

    def complete(self, req: Complete, now: float) -> dict:
        self._running(req.task, "complete", req.lease)
        self._emit(TaskCompleted(at=now, id=req.task, summary=req.summary, result=req.result))
        self._settle_dependents(req.task, now)
        return self.index.tasks[req.task]

    def fail(self, req: Fail, now: float) -> dict:
        task = self._running(req.task, "fail", req.lease)
        self._fail_attempt(task, req.reason, now, final=req.final)
        return self.index.tasks[req.task]

    def _fail_attempt(self, task: Task, reason: str, now: float, final: bool = False,
                      by: str | None = None) -> None:
        """A failed attempt: retried after a back-off while attempts remain, else failed."""
        if not final and task.attempts < task.max_attempts:
            self._emit(TaskRetrying(at=now, id=task.id, reason=reason, by=by,
                                    ready_at=now + self.runnables.backoff(task)))
        else:
            self._emit(TaskFailed(at=now, id=task.id, reason=reason, by=by))
            self._settle_dependents(task.id, now)

    def _settle_dependents(self, task_id: int, now: float) -> None:
        """A task ended: release dependents whose every dependency completed, fail the rest."""
        settled = [task_id]
        while settled:
            done = self.index.tasks[settled.pop()]
            for dep_id in self.index.dependents.pop(done.id, ()):
                dependent = self.index.tasks.get(dep_id)
                if dependent is None or dependent.waiting_for != "after":
                    continue
                if done.status != "completed":
                    self._emit(TaskFailed(at=now, id=dep_id, by="sparkqd",
                                          reason=f"dependency {done.id} {done.status}"))
                    settled.append(dep_id)
                elif all(self.index.tasks[d].status == "completed" for d in dependent.after
                         if d in self.index.tasks):
                    delayed = dependent.ready_at is not None and dependent.ready_at > now
                    self._emit(TaskReleased(at=now, id=dep_id,
                                            waiting_for="delay" if delayed else None))

    def run_started(self, task_id: int, pid: int, start: int | None, now: float) -> None:
        """Record the process group the daemon started for a running task."""
        self._emit(TaskRunStarted(at=now, id=task_id, pid=pid, start=start))

    def interrupt(self, task_id: int, reason: str, now: float, lease: str | None = None) -> None:
        """A run the daemon could not finish: a failed attempt, retried if attempts remain."""
        task = self.index.tasks.get(task_id)
        if task is not None and task.status == "running" and lease in (None, task.lease):
            self._fail_attempt(task, reason, now, by="sparkqd")

    def touch(self, req: Touch, now: float) -> dict:
        task = self._running(req.task, "touch", req.lease)
        self._emit(TaskTouched(at=now, id=req.task,
                               lease_expires_at=now + self.config.stale.factor * task.timeout))
        return self.index.tasks[req.task]

    def cancel(self, req: Cancel, now: float) -> dict:
        task = self.task(req.task)
        if task.status in TERMINAL:
            raise Conflict(f"cannot cancel task {req.task}: it is {task.status} already")
        self._emit(TaskCancelled(at=now, id=req.task))
        self._settle_dependents(req.task, now)
        return self.index.tasks[req.task]

    def requeue(self, req: Requeue, now: float) -> dict:
        if req.task is None:
            return self._requeue_matching(req, now)
        if req.stream is not None or req.status is not None:
            raise BadRequest("give task, or stream and status, not both")
        task = self.task(req.task)
        if task.status in ("pending", "waiting", "completed"):
            raise Conflict(f"cannot requeue task {req.task}: it is {task.status}"
                           + (" (enqueue it again instead)" if task.status == "completed" else ""))
        requeued = self._requeue(req.task, now)
        return TaskResult(self.index.tasks[req.task], {"requeued_dependents": requeued[1:]})

    def _requeue(self, task_id: int, now: float) -> list[int]:
        """Requeue a task and, after it, the dependents that failed only because it did.

        A task whose dependencies have not all completed waits for them again.
        Returns the ids requeued, the task first.
        """
        done, todo = [], [task_id]
        while todo:
            task = self.index.tasks[todo.pop(0)]
            unfinished = any(d in self.index.tasks and self.index.tasks[d].status != "completed"
                             for d in task.after)
            self._emit(TaskRequeued(at=now, id=task.id, waiting_for="after" if unfinished else None))
            done.append(task.id)
            todo += [i for i in dict.fromkeys(self.index.cascaded.pop(task.id, ()))
                     if cascade_cause(self.index.tasks.get(i)) == task.id]
        return done

    def _requeue_matching(self, req: Requeue, now: float) -> dict:
        if req.status is None:
            raise BadRequest("requeue needs task, or status (and optionally stream)")
        if req.stream is not None:
            self.stream_book.stream(req.stream)
        ids = [t.id for t in self.index.tasks.values()
               if t.status == req.status and (req.stream is None or t.stream == req.stream)]
        requeued = []
        for task_id in ids:  # in id order: a chain's dependencies before their dependents
            if self.index.tasks[task_id].status == req.status:  # not requeued by a cascade already
                requeued += self._requeue(task_id, now)
        return {"requeued": len(requeued), "tasks": requeued}

    def purge(self, req: Purge, now: float) -> dict:
        days = self.config.purge.older_than_days if req.older_than_days is None else req.older_than_days
        return {"purged": self._purge_before(now - days * DAY, now)}

    def _purge_before(self, cutoff: float, now: float) -> int:
        ids, entries = [], []
        heap = self.index.purge_heap
        while heap and heap[0][0] <= cutoff:
            finished_at, task_id = entry = heapq.heappop(heap)
            task = self.index.tasks.get(task_id)
            if task is not None and task.status in TERMINAL and task.finished_at == finished_at:
                ids.append(task_id)
                entries.append(entry)
        ids = list(dict.fromkeys(ids))  # ended twice at the same instant: two heap entries
        if ids:
            with restored_on_error(heap, entries):
                for task_id in ids:  # a dependent requeued by hand waits no more for one gone
                    self._settle_dependents(task_id, now)
                self._emit(TasksPurged(at=now, ids=ids))
        return len(ids)

    # -- timers -------------------------------------------------------------

    def tick(self, now: float) -> float | None:
        """Expire leases, end delays and back-offs, purge; returns the next deadline."""
        heap = self.index.stale_heap
        while heap and heap[0][0] <= now:
            expires, task_id, lease = entry = heapq.heappop(heap)
            task = self.index.tasks.get(task_id)
            if (task is not None and task.status == "running" and task.lease == lease
                    and task.lease_expires_at == expires):
                with restored_on_error(heap, [entry]):
                    self._fail_attempt(task, (
                        f"stale: lease expired, no complete, fail or touch for "
                        f"{self.config.stale.factor:g} x timeout {task.timeout:g} s"), now,
                        by="sparkqd")
        heap = self.index.delay_heap
        while heap and heap[0][0] <= now:
            ready_at, task_id = entry = heapq.heappop(heap)
            task = self.index.tasks.get(task_id)
            if (task is not None and task.status == "waiting" and task.ready_at == ready_at
                    and task.waiting_for in ("delay", "retry")):
                with restored_on_error(heap, [entry]):
                    self._emit(TaskReleased(at=now, id=task_id))
        self._purge_before(now - self.config.purge.older_than_days * DAY, now)
        self.schedules.tick(now)
        return self.next_deadline()

    def next_deadline(self) -> float | None:
        """The earliest time tick() may have work to do (after every commit: kept short)."""
        index, best = self.index, self.schedules.next_deadline()
        for heap in (index.stale_heap, index.delay_heap):
            if heap and (best is None or heap[0][0] < best):
                best = heap[0][0]
        if index.purge_heap:
            purge = index.purge_heap[0][0] + self.config.purge.older_than_days * DAY
            best = purge if best is None or purge < best else best
        return best

    # -- apply: one method per event; these must never fail --------------------

    def _transition(self, event: Event, status: str, by: str | None, note: str | None,
                    **fields) -> None:
        task = self.index.tasks[event.id]
        history = task.history + ((event.at, status, by, note),)
        if task.run_pid is not None:
            fields.update(run_pid=None, run_start=None)  # the run is over once it leaves running
        self.index.put(msgspec.structs.replace(task, status=status, history=history, **fields), task)

    def _apply_enqueued(self, e: TaskEnqueued) -> None:
        status = "waiting" if e.waiting_for else "pending"
        history = ((e.at, status, None, f"enqueued, waits for {e.waiting_for}"),) if e.waiting_for else ()
        task = Task(id=e.id, stream=self.stream_book.streams[e.stream].name, tool=sys.intern(e.tool),
                    task_class=sys.intern(e.task_class), payload=e.payload, status=status,
                    priority=e.priority, timeout=e.timeout, created_at=e.at, history=history,
                    max_attempts=e.max_attempts, waiting_for=e.waiting_for,
                    ready_at=e.ready_at, after=tuple(e.after), key=e.key, lock=e.lock,
                    schedule=e.schedule, slot=e.slot, repo=e.repo, ref=e.ref,
                    workspace=e.workspace)
        self.index.put(task, None)
        self.index.index_new(task)
        self.next_id = max(self.next_id, e.id + 1)

    def _apply_released(self, e: TaskReleased) -> None:
        task = self.index.tasks[e.id]
        status = "waiting" if e.waiting_for else "pending"
        self._transition(e, status, "sparkqd", WAIT_NOTES[task.waiting_for],
                         waiting_for=e.waiting_for)

    def _apply_claimed(self, e: TaskClaimed) -> None:
        task = self.index.tasks[e.id]
        heap = self.index.ready[task.stream].get(task.tool)
        if heap and heap[0] == ready_key(task):
            heapq.heappop(heap)
        self._transition(e, "running", e.worker, f"attempt {task.attempts + 1}",
                         started_at=e.at, worker=e.worker, attempts=task.attempts + 1,
                         finished_at=None, lease=e.lease, lease_expires_at=e.lease_expires_at,
                         waiting_for=None, ready_at=None)

    def _apply_run_started(self, e: TaskRunStarted) -> None:
        task = msgspec.structs.replace(self.index.tasks[e.id], run_pid=e.pid, run_start=e.start)
        self.index.put(task, self.index.tasks[e.id])

    def _apply_touched(self, e: TaskTouched) -> None:
        task = msgspec.structs.replace(self.index.tasks[e.id], lease_expires_at=e.lease_expires_at)
        self.index.put(task, self.index.tasks[e.id])

    def _apply_completed(self, e: TaskCompleted) -> None:
        task = self.index.tasks[e.id]
        self._transition(e, "completed", task.worker, None, finished_at=e.at,
                         summary=e.summary, result=e.result, lease=None, lease_expires_at=None)

    def _apply_failed(self, e: TaskFailed) -> None:
        task = self.index.tasks[e.id]
        self._transition(e, "failed", e.by or task.worker, e.reason, finished_at=e.at,
                         reason=e.reason, lease=None, lease_expires_at=None, waiting_for=None)

    def _apply_retrying(self, e: TaskRetrying) -> None:
        task = self.index.tasks[e.id]
        note = f"attempt {task.attempts} of {task.max_attempts} failed: {e.reason}"
        self._transition(e, "waiting", e.by or task.worker, note, reason=e.reason,
                         waiting_for="retry", ready_at=e.ready_at, lease=None,
                         lease_expires_at=None)

    def _apply_cancelled(self, e: TaskCancelled) -> None:
        self._transition(e, "cancelled", e.by, None, finished_at=e.at, lease=None,
                         lease_expires_at=None, waiting_for=None)

    def _apply_requeued(self, e: TaskRequeued) -> None:
        status = "waiting" if e.waiting_for else "pending"
        note = "requeued, waits for after" if e.waiting_for else "requeued"
        self._transition(e, status, e.by, note, finished_at=None, attempts=0,
                         reason=None, summary=None, result=None, lease=None,
                         lease_expires_at=None, waiting_for=e.waiting_for, ready_at=None)
        if e.waiting_for:
            self.index.index_new(self.index.tasks[e.id])

    def _apply_purged(self, e: TasksPurged) -> None:
        for task_id in e.ids:
            self.index.remove(task_id)

    # -- loading from a snapshot -------------------------------------------

    def load(self, sessions: list[Session], streams: list[Stream], tasks: list[Task],
             next_id: int, schedules: list[Schedule] = (),
             workspaces: list[Workspace] = ()) -> None:
        """Take the state of a snapshot and rebuild every index from it, in one pass."""
        self.workspaces.load(workspaces)
        self.stream_book.load(sessions, streams)
        for task in tasks:  # in id order: a task's dependencies are loaded before it
            self.index.put(task, None, loading=True)
        self.index.loaded()
        self.next_id = next_id
        self.schedules.load(schedules)


class QueueReads:
    """The requests that only read the queue: listings, a task's view, waits, history, locks.

    Pure like the core; they change nothing, so they emit no event.
    """

    def __init__(self, queue: Queue):
        self.queue = queue

    def session_list(self, req: SessionList, now: float) -> list:
        return list(self.queue.sessions.values())

    def stream_list(self, req: StreamList, now: float) -> list:
        if req.session is not None:
            self.queue.stream_book.session(req.session)
        return [s for s in self.queue.streams.values()
                if req.session is None or s.session == req.session]

    def get_task(self, req: GetTask, now: float) -> dict:
        return TaskDetail(self.queue.task(req.task))

    def list_tasks(self, req: ListTasks, now: float) -> list:
        """The tasks that pass every filter, oldest first (or newest), ``limit`` at most."""
        if req.stream is not None:
            self.queue.stream_book.stream(req.stream)
        if req.session is not None:
            self.queue.stream_book.session(req.session)
        limit = req.limit if req.limit is not None else len(self.queue.index.tasks)
        matches, out = self.task_filter(req), []
        for task in self.tasks_in_order(req):
            if len(out) >= limit:
                break
            if matches is None or matches(task):
                out.append(task)
        return out

    def tasks_in_order(self, req: ListTasks):
        """The tasks a listing looks at: all by id, or those of ids within its bounds (ids
        are dense, so a bounded window costs its size whatever the number of tasks)."""
        tasks = self.queue.index.tasks
        if req.min_id is None and req.max_id is None and not req.newest:
            return tasks.values()
        newest_id = self.queue.next_id - 1
        low = max(req.min_id or 1, next(iter(tasks), newest_id + 1))
        high = min(req.max_id or newest_id, newest_id)
        ids = range(high, low - 1, -1) if req.newest else range(low, high + 1)
        return (task for i in ids if (task := tasks.get(i)) is not None)

    def task_filter(self, req: ListTasks):
        """A test of one task for the listing's filters, or None when it has none."""
        tests = []
        if req.status is not None:
            tests.append(lambda task, status=req.status: task.status == status)
        if req.stream is not None:
            tests.append(lambda task, stream=req.stream: task.stream == stream)
        if req.session is not None:
            streams = {s.name for s in self.queue.streams.values() if s.session == req.session}
            tests.append(lambda task: task.stream in streams)
        if req.tool is not None:
            tests.append(lambda task, tool=req.tool: task.tool == tool)
        if req.text is not None:
            tests.append(functools.partial(text_in_task, req.text.casefold()))
        if len(tests) <= 1:
            return tests[0] if tests else None
        return lambda task: all(test(task) for test in tests)

    def first_unfinished(self, task_ids: list[int]) -> int | None:
        """The first of these tasks that has not ended (purged ones have), or None."""
        tasks = self.queue.index.tasks
        return next((i for i in task_ids if i in tasks and tasks[i].status not in TERMINAL), None)

    def wait(self, req: Wait, now: float) -> dict:
        """Whether every task named has ended, with their records."""
        tasks = [self.queue.task(task_id) for task_id in req.tasks]
        return {"done": all(t.status in TERMINAL for t in tasks),
                "tasks": tasks}

    def history(self, req: History, now: float) -> list:
        """Ended tasks, newest first, with how long they waited and ran."""
        if req.stream is not None:
            self.queue.stream_book.stream(req.stream)
        if req.session is not None:
            self.queue.stream_book.session(req.session)
        since = parse_time(req.since) if req.since is not None else None
        limit = req.limit if req.limit is not None else len(self.queue.index.finish_log)
        out, stale, seen = [], 0, set()
        for finished_at, task_id in reversed(self.queue.index.finish_log):
            if len(out) >= limit or (since is not None and finished_at < since):
                break
            task = self.queue.index.tasks.get(task_id)
            if (task is None or task.finished_at != finished_at or task.status not in TERMINAL
                    or task_id in seen):
                stale += 1  # purged or requeued since it ended, or ended twice in one instant
                continue
            seen.add(task_id)
            if ((req.status is None or task.status == req.status)
                    and (req.stream is None or task.stream == req.stream)
                    and (req.session is None or self.queue.streams[task.stream].session == req.session)
                    and (req.schedule is None or task.schedule == req.schedule)):
                out.append(Ended(task))
        if stale > len(self.queue.index.finish_log) // 2 + 1000:
            self.queue.index.finish_log = self.queue.index.live_finish_log()
        return out

    def schedule_list(self, req: ScheduleList, now: float) -> list:
        return [s for s in self.queue.schedules.by_name.values()
                if req.stream is None or s.spec.stream == req.stream]

    def schedule_show(self, req: ScheduleShow, now: float) -> ScheduleDetail:
        return ScheduleDetail(self.queue.schedules.get(req.name), req.count)

    def schedule_next(self, req: ScheduleNext, now: float) -> list:
        """A cron expression's next fire times, as `systemd-analyze calendar` previews them."""
        zone = req.timezone or self.queue.schedules.local_zone
        timing = Timing(ScheduleSpec(cron=req.cron, timezone=zone), now)
        after = parse_time(req.after, "after") if req.after is not None else now
        slots = itertools.islice(timing.slots_from(timing.after(after)), req.count)
        return [{"at": rfc3339(slot),
                 "local": datetime.datetime.fromtimestamp(slot, timing.zone).isoformat()}
                for slot in slots]

    def locks(self, req: Locks, now: float) -> list:
        return [{"lock": lock, "task": task_id, "stream": self.queue.index.tasks[task_id].stream,
                 "worker": self.queue.index.tasks[task_id].worker,
                 "since": rfc3339(self.queue.index.tasks[task_id].started_at)}
                for lock, task_id in sorted(self.queue.index.lock_holder.items())]


def text_in_task(needle: str, task: Task) -> bool:
    """Whether casefolded ``needle`` is in the task's payload (as JSON), summary or reason."""
    payload = task.payload
    if type(payload) is not str:
        payload = "" if payload is None else msgspec.json.encode(payload).decode()
    summary, reason = task.summary, task.reason
    return (needle in payload.casefold() or (summary is not None and needle in summary.casefold())
            or (reason is not None and needle in reason.casefold()))


CASCADE_REASON = re.compile(r"dependency (\d+) (failed|cancelled)")


def cascade_cause(task: Task | None) -> int | None:
    """The dependency whose end failed this task (the daemon failed it for that), or None."""
    if task is None or task.status != "failed" or not task.history or task.history[-1][2] != "sparkqd":
        return None
    match = CASCADE_REASON.fullmatch(task.reason or "")
    return int(match[1]) if match else None


def full_history(task: Task) -> tuple:
    """Every transition of a task, its creation included."""
    if task.history and (task.history[0][3] or "").startswith("enqueued"):
        return task.history  # created waiting: the creation entry is stored
    return ((task.created_at, "pending", None, "enqueued"),) + task.history


# -- sessions and streams ------------------------------------------------------------

class StreamBook:
    """The sessions and streams, and the rules that change them; pure, like the Queue it is part of.

    A session's streams end with it; a paused stream keeps its tasks from claims.
    """

    def __init__(self, queue: Queue):
        self.queue = queue
        self.sessions: dict[str, Session] = {}
        self.streams: dict[str, Stream] = {}

    def appliers(self) -> dict:
        return {SessionCreated: self._apply_session_created, SessionEnded: self._apply_session_ended,
                StreamCreated: self._apply_stream_created, StreamEnded: self._apply_stream_ended,
                StreamPaused: self._apply_stream_paused, StreamResumed: self._apply_stream_resumed}

    def load(self, sessions: list[Session], streams: list[Stream]) -> None:
        self.sessions = {s.name: s for s in sessions}
        for s in streams:
            self.streams[s.name] = s
            self.queue.index.add_stream(s.name)

    # -- lookups and requests ---------------------------------------------------------

    def session(self, name: str) -> Session:
        try:
            return self.sessions[name]
        except KeyError:
            raise NotFound(f"no session {name!r}") from None

    def stream(self, name: str) -> Stream:
        try:
            return self.streams[name]
        except KeyError:
            raise NotFound(f"no stream {name!r}") from None

    def streams_named(self, stream_names: list[str]) -> list[Stream]:
        """The streams of these names; NotFound for one that does not exist."""
        return [self.stream(name) for name in stream_names]

    def session_create(self, req: SessionCreate, now: float) -> dict:
        if req.name in self.sessions:
            raise Conflict(f"session {req.name!r} exists already")
        self.queue._emit(SessionCreated(at=now, name=req.name))
        return self.sessions[req.name]

    def session_end(self, req: SessionEnd, now: float) -> dict:
        if self.session(req.name).status == "ended":
            raise Conflict(f"session {req.name!r} has ended already")
        self.queue._emit(SessionEnded(at=now, name=req.name))
        return self.sessions[req.name]

    def stream_create(self, req: StreamCreate, now: float) -> dict:
        if self.session(req.session).status == "ended":
            raise Conflict(f"session {req.session!r} has ended")
        if req.name in self.streams:
            raise Conflict(f"stream {req.name!r} exists already")
        self.queue._emit(StreamCreated(at=now, name=req.name, session=req.session))
        return self.streams[req.name]

    def stream_end(self, req: StreamEnd, now: float) -> dict:
        if self.stream(req.name).status == "ended":
            raise Conflict(f"stream {req.name!r} has ended already")
        self.queue._emit(StreamEnded(at=now, name=req.name))
        return self.streams[req.name]

    def stream_pause(self, req: StreamPause, now: float) -> dict:
        if self.stream(req.name).paused:
            raise Conflict(f"stream {req.name!r} is paused already")
        self.queue._emit(StreamPaused(at=now, name=req.name))
        return self.streams[req.name]

    def stream_resume(self, req: StreamResume, now: float) -> dict:
        if not self.stream(req.name).paused:
            raise Conflict(f"stream {req.name!r} is not paused")
        self.queue._emit(StreamResumed(at=now, name=req.name))
        return self.streams[req.name]

    # -- apply: one method per event; these must never fail ------------------------

    def _apply_session_created(self, e: SessionCreated) -> None:
        self.sessions[e.name] = self.queue.index.changes.sessions[e.name] = Session(e.name, e.at)

    def _apply_session_ended(self, e: SessionEnded) -> None:
        session = msgspec.structs.replace(self.sessions[e.name], status="ended", ended_at=e.at)
        self.sessions[e.name] = self.queue.index.changes.sessions[e.name] = session
        for stream in list(self.streams.values()):
            if stream.session == e.name and stream.status != "ended":
                self._apply_stream_ended(StreamEnded(at=e.at, name=stream.name))

    def _apply_stream_created(self, e: StreamCreated) -> None:
        stream = Stream(e.name, e.session, e.at)
        self.streams[e.name] = self.queue.index.changes.streams[e.name] = stream
        self.queue.index.add_stream(e.name)

    def _replace_stream(self, name: str, **fields) -> None:
        stream = msgspec.structs.replace(self.streams[name], **fields)
        self.streams[name] = self.queue.index.changes.streams[name] = stream

    def _apply_stream_ended(self, e: StreamEnded) -> None:
        self._replace_stream(e.name, status="ended", ended_at=e.at)

    def _apply_stream_paused(self, e: StreamPaused) -> None:
        self._replace_stream(e.name, paused=True)

    def _apply_stream_resumed(self, e: StreamResumed) -> None:
        self._replace_stream(e.name, paused=False)
        self.queue.index.became_ready.add((e.name, None))


# -- what a task runs with ------------------------------------------------------------

class Runnables:
    """The tools and scripts a task may run, and the settings each gives it; pure.

    The Queue's configuration and scripts, kept in step by ``Queue.reconfigure``.
    """

    def __init__(self, config: Config, scripts: dict[str, Script]):
        self.reconfigure(config, scripts)

    def reconfigure(self, config: Config, scripts: dict[str, Script]) -> None:
        self.config = config
        self.scripts = scripts
        self._settings: dict[tuple[str, str | None], Settings] = {}  #: resolved, per tool

    def settings(self, tool_name: str, task_class: str | None = None) -> Settings:
        """What a task of this tool (or ``script:NAME``) runs with: the one place that
        resolves tool or script, then task class. (A request's own values come first.)"""
        known = self._settings.get((tool_name, task_class))
        if known is None:
            if len(self._settings) > 4096:  # tasks of many since-removed scripts
                self._settings.clear()
            known = self._settings[tool_name, task_class] = self._resolve(tool_name, task_class)
        return known

    def _resolve(self, tool_name: str, task_class: str | None) -> Settings:
        if tool_name.startswith(SCRIPT_TOOL_PREFIX):
            script = self.scripts.get(tool_name[len(SCRIPT_TOOL_PREFIX):])
            tool = script and Tool(task_class=script.task_class, timeout=script.timeout)
        else:
            tool = self.config.tools.get(tool_name)
        classes = self.config.task_classes
        if tool is None or tool.task_class not in classes:
            name = task_class if task_class in classes else "MEDIUM_SCRIPT"
            tool = Tool(task_class=name, timeout=tool and tool.timeout)
        return resolve_settings(tool, classes.get(tool.task_class) or TaskClass(timeout=300))

    def what_to_run(self, req: Enqueue) -> tuple[str, Any]:
        """The tool settings of an enqueue (a script's come from its header), and the payload."""
        if (req.tool is None) == (req.script is None):
            raise BadRequest("enqueue needs tool or script, and not both")
        if req.script is not None:
            script = self.scripts.get(req.script)
            if script is None:
                known = ", ".join(sorted(self.scripts)) or "none: set script_dirs"
                raise NotFound(f"no script {req.script!r} (known: {known})")
            if req.payload is not None:
                raise BadRequest("a script takes args, not a payload")
            return SCRIPT_TOOL_PREFIX + req.script, list(req.args or ())
        if req.args is not None:
            raise BadRequest("args go with script; give a tool a payload")
        if req.tool not in self.config.tools:
            known = ", ".join(sorted(self.config.tools)) or "none"
            raise BadRequest(f"unknown tool {req.tool!r} (known: {known})")
        return req.tool, req.payload

    def check_something_to_run(self, req: Enqueue) -> None:
        if req.tool is not None:
            check_payload_given(req.tool, self.config.tools[req.tool], req.payload)

    def backoff(self, task: Task) -> float:
        """Exponential back-off for the attempt just failed; jitter only lengthens it."""
        settings = self.settings(task.tool, task.task_class)
        delay = min(settings.retry_backoff_max, settings.retry_backoff * 2 ** (task.attempts - 1))
        jitter = (zlib.crc32(f"{task.id}:{task.attempts}".encode()) % 1024) / 4096  # [0, 0.25)
        return delay * (1 + jitter)


# -- schedules ------------------------------------------------------------------

#: The cron macros cronsim does not read, as the five fields each stands for.
CRON_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
               "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
               "@hourly": "0 * * * *"}
EVERY_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY}
#: At most this many missed slots are fired after a downtime (``catch_up: all``).
MAX_CATCH_UP = 100
#: The firings and skips each schedule keeps for `schedule.show`.
KEPT_FIRINGS = 20


def parse_every(value: str | float) -> float:
    """Seconds of an interval: a number, or units as in ``90s``, ``5m``, ``1h30m``, ``1d``."""
    if isinstance(value, (int, float)):
        return float(value)
    text = value.replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    elif re.fullmatch(r"(\d+(\.\d+)?[smhd])+", text):
        seconds = sum(float(n) * EVERY_UNITS[unit]
                      for n, _, unit in re.findall(r"(\d+(\.\d+)?)([smhd])", text))
    else:
        raise BadRequest(f"every: {value!r} is not an interval (like 90s, 5m, 2h, 1d or seconds)")
    if not 1 <= seconds <= MAX_SECONDS:
        raise BadRequest(f"every: {value!r} must be between 1 second and 10 years")
    return seconds


def time_zone(name: str):
    """The zone of an IANA name."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise BadRequest(f"timezone: unknown time zone {name!r} (an IANA name such as "
                         f"Europe/Berlin or America/New_York)") from None


def cron_fields(expression: str) -> str:
    """A cron expression as its five fields, checked by cronsim."""
    fields = CRON_MACROS.get(expression.strip().lower(), expression)
    if len(fields.split()) != 5:
        raise BadRequest(f"cron: {expression!r} needs 5 fields (minute hour day month weekday) "
                         f"or one of {', '.join(CRON_MACROS)}")
    try:
        cronsim.CronSim(fields, datetime.datetime(2000, 1, 1))
    except cronsim.CronSimError as exc:
        raise BadRequest(f"cron: {expression!r}: {exc}") from None
    return fields


class Timing:
    """When a schedule's slots fall: cron in its zone, every from its anchor, or one at."""

    def __init__(self, spec: ScheduleSpec, created_at: float):
        given = [key for key in ("cron", "every", "at") if getattr(spec, key) is not None]
        if len(given) != 1:
            raise BadRequest("give exactly one of cron, every or at" + (
                f" (got {', '.join(given)})" if given else ""))
        if spec.timezone is not None and spec.cron is None:
            raise BadRequest("timezone: only a cron schedule takes a time zone")
        self.cron = cron_fields(spec.cron) if spec.cron is not None else None
        self.zone = time_zone(spec.timezone or "UTC") if self.cron else None
        self.every = parse_every(spec.every) if spec.every is not None else None
        self.at = self._time(spec.at, "at")
        self.start = self._time(spec.start_at, "start_at")
        self.end = self._time(spec.end_at, "end_at")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise BadRequest("end_at: must be later than start_at")
        self.anchor = created_at if self.start is None else self.start

    @staticmethod
    def _time(text: str | None, field: str) -> float | None:
        if text is None:
            return None
        moment = parse_time(text, field)
        if not 0 <= moment < LAST_TIME:
            raise BadRequest(f"{field}: {text!r} is before 1970 or after 9999")
        return moment

    def after(self, t: float) -> float | None:
        """The first slot later than ``t``, or None when no slot is left."""
        if self.start is not None and t < self.start:
            t = self.start - 0.5  # the start is a slot of every, and cron may match it
        if self.at is not None:
            slot = self.at if self.at > t else None
        elif self.every is not None:
            k = max(math.floor((t - self.anchor) / self.every) + 1,
                    0 if self.start is not None else 1)
            slot = self.anchor + k * self.every
            if slot <= t:  # the product fell a hair short of the slot after t
                slot = self.anchor + (k + 1) * self.every
        else:
            slot = self._cron_after(t)
        if slot is None or slot >= LAST_TIME or (self.end is not None and slot > self.end):
            return None  # no slot left, or none before year 10000
        return slot

    def _cron_after(self, t: float) -> float:
        # From the second pass of an hour the clocks repeat, cronsim starts at the first
        # pass's match: earlier than t, so such matches are passed over.
        moments = self._cron_from(t)
        return next((slot for slot in moments if slot > t), None)

    def _cron_from(self, t: float):
        """The cron matches from ``t`` on, as epoch seconds, ending before year 10000."""
        moments = cronsim.CronSim(self.cron, datetime.datetime.fromtimestamp(max(t, 0.0), self.zone))
        try:
            for moment in moments:
                yield moment.timestamp()
        except (OverflowError, ValueError):  # cronsim stepping past year 9999
            return

    def passed_surely(self, first: float, before: float, keep: int) -> tuple[int, float]:
        """How many slots from ``first`` on are earlier than ``before`` by more than ``keep``
        intervals, and the slot after them: an `every` that missed a long downtime is
        counted, not walked. (Cron is walked: at most one slot a minute.)"""
        if self.every is None or before - first <= (keep + 1) * self.every:
            return 0, first
        if self.end is not None:
            before = min(before, self.end)
        k = round((first - self.anchor) / self.every)
        passed = max(0, math.floor((before - first) / self.every) - keep)
        return passed, self.anchor + (k + passed) * self.every

    def slots_from(self, first: float | None):
        """Slots from ``first`` (a slot) on, in order."""
        if self.cron is None:
            slot = first
            while slot is not None:
                yield slot
                slot = self.after(slot)
            return
        if first is None:
            return
        yield first
        last = first
        for slot in self._cron_from(first):
            if slot >= LAST_TIME or (self.end is not None and slot > self.end):
                return
            if slot > last:  # see _cron_after: a repeated hour may give an earlier match
                yield slot
                last = slot


def schedule_config_problem(name: str, spec: ScheduleSpec, config: Config) -> str | None:
    """What is wrong with a schedule of sparkq.yml, as a path suffix and reason, or None."""
    try:
        if not re.match(NAME_PATTERN, name):
            raise BadRequest(f"a schedule name must match {NAME_PATTERN}")
        Timing(spec, 0.0)
        if (spec.tool is None) == (spec.script is None):
            raise BadRequest("give tool or script, and not both")
        if spec.tool is not None and spec.tool not in config.tools:
            known = ", ".join(sorted(config.tools)) or "none"
            raise BadRequest(f"tool: unknown tool {spec.tool!r} (known: {known})")
        if spec.tool is not None:
            check_payload_given(spec.tool, config.tools[spec.tool], spec.payload)
    except BadRequest as exc:
        message = str(exc)
        return f".{message}" if re.match(r"^\w+: ", message) else f": {message}"
    return None


def jitter_of(name: str, slot: float, jitter: float) -> float:
    """A schedule's delay for one slot, up to ``jitter``: derived, so replay and restarts agree."""
    return jitter * zlib.crc32(f"{name}@{slot!r}".encode()) / 2**32 if jitter else 0.0


def spec_of(req) -> ScheduleSpec:
    """The ScheduleSpec a create or change request names."""
    return ScheduleSpec(**{key: getattr(req, key) for key in ScheduleSpec.__struct_fields__})


class Schedules:
    """The schedules and the rules that fire them; part of the pure core, driven by tick.

    Each schedule's ``next_slot`` is moved on only by a journaled firing or skip, so
    replay, a crash between firing and reply, or a restart never fire a slot twice,
    and a slot missed in a downtime is fired or skipped by ``catch_up`` at start.
    """

    def __init__(self, queue: Queue):
        self.queue = queue
        self.by_name: dict[str, Schedule] = {}
        self.heap: list[tuple[float, str, float]] = []  #: (due, name, slot)
        self.timings: dict[str, Timing] = {}
        self.local_zone = "UTC"  #: the zone a cron means without one: the daemon sets the machine's

    def appliers(self) -> dict:
        return {ScheduleCreated: self._apply_created, ScheduleChanged: self._apply_created,
                ScheduleRemoved: self._apply_removed, SchedulePaused: self._apply_paused,
                ScheduleResumed: self._apply_resumed, ScheduleFired: self._apply_fired,
                ScheduleSkipped: self._apply_skipped}

    # -- lookups ----------------------------------------------------------------

    def get(self, name: str) -> Schedule:
        try:
            return self.by_name[name]
        except KeyError:
            raise NotFound(f"no schedule {name!r}") from None

    def timing(self, schedule: Schedule) -> Timing:
        timing = self.timings.get(schedule.name)
        if timing is None:
            timing = self.timings[schedule.name] = Timing(schedule.spec, schedule.created_at)
        return timing

    def due_at(self, schedule: Schedule, slot: float) -> float:
        return slot + jitter_of(schedule.name, slot, schedule.spec.jitter)

    def _mine(self, schedule: Schedule, verb: str) -> Schedule:
        if schedule.source == "config":
            raise Conflict(f"cannot {verb} schedule {schedule.name!r}: it is defined in "
                           f"sparkq.yml; change it there and reload")
        return schedule

    def _checked(self, name: str, spec: ScheduleSpec, created_at: float) -> ScheduleSpec:
        """The spec with its time zone named, once it is known to be valid here."""
        if spec.cron is not None and spec.timezone is None:
            spec = msgspec.structs.replace(spec, timezone=self.local_zone)
        Timing(spec, created_at)
        self._enqueueable(name, spec, created_at)
        return spec

    def _enqueue_request(self, name: str, spec: ScheduleSpec, slot: float) -> Enqueue:
        prefix = spec.key_prefix or f"schedule:{name}:"
        return Enqueue(tool=spec.tool, script=spec.script, args=spec.args, stream=spec.stream,
                       payload=spec.payload, timeout=spec.timeout, priority=spec.priority,
                       lock=spec.lock, max_attempts=spec.max_attempts, key=prefix + rfc3339(slot),
                       repo=spec.repo, ref=spec.ref, workspace=spec.workspace)

    def _enqueueable(self, name: str, spec: ScheduleSpec, slot: float) -> Enqueue:
        """The enqueue of a firing, once every rule the core applies to it has let it pass:
        a firing refused for it changes nothing (no cancel under overlap: replace)."""
        request = self._enqueue_request(name, spec, slot)
        if self.queue.stream_book.stream(spec.stream).status == "ended":
            raise Conflict(f"stream {spec.stream!r} has ended and takes no new tasks")
        tool_name, _ = self.queue.runnables.what_to_run(request)
        self.queue.runnables.check_something_to_run(request)
        self.queue.workspaces.task_fields(request, tool_name)
        return request

    # -- handlers -------------------------------------------------------------

    def create(self, req, now: float) -> Schedule:
        if req.name in self.by_name:
            raise Conflict(f"schedule {req.name!r} exists already")
        spec = self._checked(req.name, spec_of(req), now)
        self.queue._emit(ScheduleCreated(at=now, name=req.name, spec=spec,
                                         next_slot=self._first_slot(spec, now, now)))
        return self.by_name[req.name]

    @staticmethod
    def _first_slot(spec: ScheduleSpec, created_at: float, now: float) -> float:
        """The next slot of a schedule made or changed over the socket: there must be one."""
        slot = Timing(spec, created_at).after(now)
        if slot is None:
            raise BadRequest(f"at: {spec.at!r} has passed" if spec.at is not None else
                             f"end_at: {spec.end_at!r} has passed: no slot is left")
        return slot

    def update(self, req, now: float) -> Schedule:
        schedule = self._mine(self.get(req.name), "change")
        given = {key: value for key in ScheduleSpec.__struct_fields__
                 if (value := getattr(req, key)) is not msgspec.UNSET}
        if given.keys() & {"cron", "every", "at"}:  # naming one way of timing drops the others
            given = {"cron": None, "every": None, "at": None, "timezone": None, **given}
        spec = self._checked(req.name, msgspec.structs.replace(schedule.spec, **given),
                             schedule.created_at)
        next_slot = self._next_after_change(schedule, spec, now)
        if next_slot is None:
            next_slot = self._first_slot(spec, schedule.created_at, now)
        self.queue._emit(ScheduleChanged(at=now, name=req.name, spec=spec, next_slot=next_slot))
        return self.by_name[req.name]

    def _next_after_change(self, schedule: Schedule, spec: ScheduleSpec, now: float):
        """A change of timing starts from now; any other change keeps the slot due next."""
        timing_keys = ("cron", "timezone", "every", "at", "start_at", "end_at")
        if schedule.next_slot is not None and all(
                getattr(spec, k) == getattr(schedule.spec, k) for k in timing_keys):
            return schedule.next_slot
        return Timing(spec, schedule.created_at).after(now)

    def delete(self, req: ScheduleDelete, now: float) -> dict:
        self._mine(self.get(req.name), "delete")
        self.queue._emit(ScheduleRemoved(at=now, name=req.name))
        return {"deleted": req.name}

    def pause(self, req: SchedulePause, now: float) -> Schedule:
        if self.get(req.name).paused:
            raise Conflict(f"schedule {req.name!r} is paused already")
        self.queue._emit(SchedulePaused(at=now, name=req.name))
        return self.by_name[req.name]

    def resume(self, req: ScheduleResume, now: float) -> Schedule:
        schedule = self.get(req.name)
        if not schedule.paused:
            raise Conflict(f"schedule {req.name!r} is not paused")
        timing = self.timing(schedule)
        passed, last = schedule.next_slot, None
        count, start = timing.passed_surely(schedule.next_slot, now, keep=2)
        for slot in timing.slots_from(start):
            if slot > now:
                break
            count, last = count + 1, slot
        if count:
            self.queue._emit(ScheduleSkipped(at=now, name=req.name, slot=passed, why="paused",
                                             next_slot=schedule.next_slot, last_slot=last,
                                             count=count))
        self.queue._emit(ScheduleResumed(at=now, name=req.name, next_slot=timing.after(now)))
        return self.by_name[req.name]

    def fire(self, req: ScheduleFire, now: float) -> TaskResult:
        """Fire once now, outside the clock; the slots to come stay as they were."""
        schedule = self.get(req.name)
        self._enqueueable(req.name, schedule.spec, now)
        busy = self._busy_task(schedule)
        if busy is not None and schedule.spec.overlap == "skip":
            raise Conflict(f"schedule {req.name!r}: task {busy.id} of its last firing is "
                           f"{busy.status} (overlap: skip)")
        self._fire(schedule, now, schedule.next_slot, now, manual=True)
        fired = self.by_name[req.name]
        if fired.firings[-1][3] != "fired":
            raise Conflict(f"schedule {req.name!r} could not fire: {fired.firings[-1][3]}")
        return TaskResult(self.queue.index.tasks[fired.last_task], {"schedule": req.name})

    def sync(self, specs: dict[str, ScheduleSpec], now: float) -> list[str]:
        """Make the schedules of sparkq.yml those in force; returns the problems, per name."""
        problems = []
        for name, spec in specs.items():
            old = self.by_name.get(name)
            try:
                spec = self._checked(name, spec, old.created_at if old else now)
            except SparkQError as exc:
                problems.append(f"schedule {name!r} of sparkq.yml not applied: {exc}")
                continue
            if old is None:
                self.queue._emit(ScheduleCreated(at=now, name=name, spec=spec, source="config",
                                                 next_slot=Timing(spec, now).after(now)))
            elif old.spec != spec or old.source != "config":
                self.queue._emit(ScheduleChanged(
                    at=now, name=name, spec=spec, source="config",
                    next_slot=self._next_after_change(old, spec, now)))
        for name in [n for n, s in self.by_name.items() if s.source == "config" and n not in specs]:
            self.queue._emit(ScheduleRemoved(at=now, name=name))
        return problems

    # -- firing ---------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Fire or skip every slot whose time has come."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            schedule = self.by_name.get(entry[1])
            if schedule is not None and not schedule.paused and schedule.next_slot == entry[2]:
                with restored_on_error(heap, [entry]):
                    self._run_due(schedule, now)

    def next_deadline(self) -> float | None:
        heap = self.heap
        while heap and not self._current(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _current(self, entry: tuple) -> bool:
        schedule = self.by_name.get(entry[1])
        return schedule is not None and not schedule.paused and schedule.next_slot == entry[2]

    def _run_due(self, schedule: Schedule, now: float) -> None:
        """The slots due by ``now``: missed ones by ``catch_up``, each firing by ``overlap``."""
        recent = collections.deque(maxlen=MAX_CATCH_UP + 1)  # the last due slots, and one before
        timing = self.timing(schedule)
        count, start = timing.passed_surely(schedule.next_slot, now - schedule.spec.jitter,
                                            keep=MAX_CATCH_UP + 1)
        first, next_slot = schedule.next_slot if count else None, None
        for slot in timing.slots_from(start):
            if self.due_at(schedule, slot) > now:
                next_slot = slot
                break
            first = slot if first is None else first
            count += 1
            recent.append(slot)
        if not count:
            return
        fire = self._to_fire(schedule, list(recent), now)
        skipped = count - len(fire)
        if skipped:
            why = "missed" if count <= MAX_CATCH_UP or schedule.spec.catch_up != "all" else (
                f"missed: catch-up fires at most the latest {MAX_CATCH_UP} slots")
            before = recent[-len(fire) - 1] if len(recent) > len(fire) else first
            self.queue._emit(ScheduleSkipped(
                at=now, name=schedule.name, slot=first, why=why, last_slot=before, count=skipped,
                next_slot=fire[0] if fire else next_slot))
        for slot, following in zip(fire, [*fire[1:], next_slot]):
            self._fire(self.by_name[schedule.name], slot, following, now)

    def _to_fire(self, schedule: Schedule, due: list[float], now: float) -> list[float]:
        policy = schedule.spec.catch_up
        if policy == "all":
            return due[-MAX_CATCH_UP:]
        latest = due[-1]
        on_time = now - self.due_at(schedule, latest) <= schedule.spec.grace
        return [latest] if policy == "latest" or on_time else []

    def _busy_task(self, schedule: Schedule) -> Task | None:
        task = self.queue.index.tasks.get(schedule.last_task) if schedule.last_task else None
        return task if task is not None and task.status not in TERMINAL else None

    def _fire(self, schedule: Schedule, slot: float, next_slot: float | None, now: float,
              manual: bool = False) -> None:
        name, emit = schedule.name, self.queue._emit
        busy = self._busy_task(schedule)
        if busy is not None and schedule.spec.overlap == "skip" and not manual:
            emit(ScheduleSkipped(at=now, name=name, slot=slot, next_slot=next_slot,
                                 why=f"overlap: task {busy.id} of the last firing is {busy.status}"))
            return
        try:
            request = self._enqueueable(name, schedule.spec, slot)
        except (BadRequest, NotFound, Conflict) as exc:
            emit(ScheduleSkipped(at=now, name=name, slot=slot, next_slot=next_slot,
                                 why=f"error: {exc}"))
            return
        if busy is not None and schedule.spec.overlap == "replace":
            emit(TaskCancelled(at=now, id=busy.id, by=f"schedule:{name}"))
            self.queue._settle_dependents(busy.id, now)
        result = self.queue.enqueue(request, now, origin=(name, slot))
        emit(ScheduleFired(at=now, name=name, slot=slot, task=result.task.id,
                           next_slot=next_slot, existing=result.extra["existing"], manual=manual))

    # -- apply ------------------------------------------------------------------

    def _put(self, schedule: Schedule) -> None:
        self.by_name[schedule.name] = self.queue.index.changes.schedules[schedule.name] = schedule
        if schedule.next_slot is not None and not schedule.paused:
            due = self.due_at(schedule, schedule.next_slot)
            heapq.heappush(self.heap, (due, schedule.name, schedule.next_slot))

    def _apply_created(self, e: ScheduleCreated | ScheduleChanged) -> None:
        old = self.by_name.get(e.name)
        self.timings.pop(e.name, None)
        schedule = Schedule(e.name, e.spec, e.source, e.at, e.next_slot) if old is None else (
            msgspec.structs.replace(old, spec=e.spec, source=e.source, next_slot=e.next_slot))
        self._put(schedule)

    def _apply_removed(self, e: ScheduleRemoved) -> None:
        del self.by_name[e.name]
        self.timings.pop(e.name, None)
        self.queue.index.changes.schedules[e.name] = None

    def _apply_paused(self, e: SchedulePaused) -> None:
        self._put(msgspec.structs.replace(self.by_name[e.name], paused=True))

    def _apply_resumed(self, e: ScheduleResumed) -> None:
        self._put(msgspec.structs.replace(self.by_name[e.name], paused=False,
                                          next_slot=e.next_slot))

    def _apply_fired(self, e: ScheduleFired) -> None:
        old = self.by_name[e.name]
        self._put(msgspec.structs.replace(
            old, next_slot=e.next_slot, last_task=e.task, fired=old.fired + 1,
            firings=(*old.firings, (e.slot, e.at, e.task, "fired"))[-KEPT_FIRINGS:]))

    def _apply_skipped(self, e: ScheduleSkipped) -> None:
        old = self.by_name[e.name]
        what = f"skipped: {e.why}" + (f" ({e.count} slots to {rfc3339(e.last_slot)})"
                                      if e.count > 1 else "")
        self._put(msgspec.structs.replace(
            old, next_slot=e.next_slot, skipped=old.skipped + e.count,
            firings=(*old.firings, (e.slot, e.at, None, what))[-KEPT_FIRINGS:]))

    def load(self, schedules: list[Schedule]) -> None:
        for schedule in schedules:
            self._put(schedule)
        self.queue.index.changes.schedules.clear()  # as the snapshot has them


# -- repository workspaces: the core's part -------------------------------------------------
#
# Which directory belongs to which task. The git work is done at the edge (section 10,
# Workspaces); what it made comes back here through the change pipeline as events, so a
# restart knows every worktree's task and nothing on disk goes unaccounted for.

#: Events that end a task's attempt: the workspace it was ready for is released with it.
ATTEMPT_ENDS = (TaskCompleted, TaskFailed, TaskRetrying, TaskCancelled, TaskRequeued)
WORKSPACE_KINDS = ("shared", "worktree", "none")
#: A branch, tag or commit name git accepts, and no option: git-check-ref-format's rules.
REF_NAME = re.compile(r"^(?![-/.])(?!.*\.\.)(?!.*@\{)(?!.*//)(?!.*/\.)"
                      r"[^\x00-\x20~^:?*\[\\\x7f]+(?<![/.])(?<!\.lock)$")


def is_url(repo: str) -> bool:
    """A URL or scp-like address (git@host:path), not a local path."""
    return "://" in repo or re.match(r"^[\w.-]+@[\w.-]+:", repo) is not None


def repo_key(repo: str) -> str:
    """A repository's one name however it is written: the lock key of its URL, a local
    path taken as the file:// URL it is (``github.com/u/r``, ``/srv/git/app.git``).

    A host's URLs drop ``.git`` (github.com serves both); a local path keeps it, since
    /srv/app and /srv/app.git are two directories, two repositories."""
    return normalise_lock(repo if is_url(repo) else "file://" + os.path.normpath(repo))


def repo_problem(repo: str) -> str | None:
    """Why ``repo`` is no repository URL or path git can be given, or None."""
    if repo.startswith("-") or any(c < " " or c == "\x7f" for c in repo):
        return f"{repo!r} is not a repository URL or path"
    if not is_url(repo) and not os.path.isabs(repo):
        return f"{repo!r} is a relative path: give an absolute path or a URL"
    key = repo_key(repo)
    if not key.strip("/") or (is_url(repo) and "/" not in key.lstrip("/")):
        return f"{repo!r} names no repository (no path)"
    return None


def ref_problem(ref: str) -> str | None:
    """Why ``ref`` is no branch, tag or commit name, or None."""
    return None if REF_NAME.match(ref) else f"{ref!r} is not a branch, tag or commit name"


class Workspace(Struct, frozen=True):
    """A directory the daemon made of a repository: its shared clone, or a task's worktree."""

    id: str  #: the task's id (a worktree), or the repository's key (the shared clone)
    repo: str  #: the repository's key, github.com/u/r
    kind: str  #: "shared" or "worktree"
    path: str
    url: str  #: the repository as the task gave it: what git fetches from
    created_at: float
    task: int | None = None  #: a worktree's task; the shared clone's current or last task
    branch: str | None = None
    ref: str | None = None
    commit: str | None = None  #: a worktree's base; the commit the shared tree was reset to
    state: str = "idle"  #: "preparing", "active" (an attempt of its task runs) or "idle"
    ready: bool = False  #: set up and made ready for an attempt at least once
    updated_at: float | None = None
    released_at: float | None = None
    stash: str | None = None  #: what it last kept of what a task left: a stash, commits


NO_PLACE = (None, None, None)  #: (workspace, repo, ref) of a task without a repository
NO_PLACE_FIELDS = MappingProxyType({"repo": None, "ref": None, "workspace": None, "lock": None})


class WorkspaceBook:
    """The workspace records and the rules that change them; pure, like the Queue it is part of.

    ``created``, ``ready``, ``fetched`` and ``removed`` are what the edge reports once
    git has done its part; ``attempt_ended`` releases a workspace when its task's
    attempt ends, in the same change.
    """

    def __init__(self, queue: Queue):
        self.queue = queue
        self.records: dict[str, Workspace] = {}

    def appliers(self) -> dict:
        return {WorkspaceCreated: self._apply_created, WorkspaceUpdated: self._apply_updated,
                WorkspaceReleased: self._apply_released, WorkspaceRemoved: self._apply_removed}

    def load(self, records: list[Workspace]) -> None:
        self.records = {ws.id: ws for ws in records}

    # -- a new task's repository --------------------------------------------------------

    def defaults(self, tool_name: str) -> tuple[str | None, str | None, str | None]:
        """(workspace, repo, ref) a tool or script gives its tasks."""
        if tool_name.startswith(SCRIPT_TOOL_PREFIX):
            owner = self.queue.scripts.get(tool_name[len(SCRIPT_TOOL_PREFIX):])
        else:
            owner = self.queue.config.tools.get(tool_name)
        return (owner.workspace, owner.repo, owner.ref) if owner else NO_PLACE

    def task_fields(self, req: Enqueue, tool_name: str) -> Mapping[str, Any]:
        """The repo, ref and workspace of a new task (the request's, else its tool's or
        script's), and its lock: a shared workspace takes its repository's."""
        defaults = self.defaults(tool_name)
        if defaults == NO_PLACE and not (req.workspace or req.repo or req.ref or req.lock):
            return NO_PLACE_FIELDS  # the common task: no repository, no lock
        kind, repo, ref = (mine or theirs for mine, theirs in zip(
            (req.workspace, req.repo, req.ref), defaults))
        if kind not in (None, *WORKSPACE_KINDS):
            raise BadRequest(f"{tool_name}: workspace {kind!r} is not shared, worktree or none")
        kind = None if kind in (None, "none") else kind
        project = self.queue.config.project.repo_path
        repo = repo or (kind and project and os.path.expanduser(project)) or None
        for name, value, check in (("repo", repo, repo_problem), ("ref", ref, ref_problem)):
            if value is not None and (problem := check(value)):
                raise BadRequest(f"{name}: {problem}")
        lock = normalise_lock(req.lock) if req.lock else None
        if kind is not None and repo is None:
            raise BadRequest(f"workspace {kind} needs a repo (the request's, tool "
                             f"{tool_name!r}'s or project.repo_path)")
        if kind == "shared":
            if req.lock and repo_key(req.lock) != repo_key(repo):
                raise BadRequest(f"a shared workspace takes its repository's lock "
                                 f"{repo_key(repo)!r}: give no other lock")
            lock = repo_key(repo)
        return {"repo": repo, "ref": ref, "workspace": kind, "lock": lock}

    # -- lookups ------------------------------------------------------------------------

    def of_task(self, task: Task) -> Workspace | None:
        """The workspace bound to a task (a shared clone: while it is the task's)."""
        if task.workspace == "worktree":
            return self.records.get(str(task.id))
        if task.workspace == "shared":
            ws = self.records.get(repo_key(task.repo))
            return ws if ws is not None and ws.task == task.id else None
        return None

    def named(self, name: str) -> Workspace:
        """The workspace a person names: a task id (its worktree) or a repository."""
        ws = self.records.get(name if name.isdigit() else repo_key(name))
        if ws is None:
            what = f"task {name}" if name.isdigit() else f"repository {repo_key(name)}"
            raise NotFound(f"no workspace of {what}")
        return ws

    def of_repo(self, key: str) -> list[Workspace]:
        return [ws for ws in self.records.values() if ws.repo == key]

    def holder(self, ws: Workspace) -> Task | None:
        """The task that keeps a workspace from being removed: one not yet ended that works
        in it, or (a worktree) will work in it again. An ended task holds nothing, whatever
        state the record was left in."""
        task = self.queue.index.tasks.get(ws.task) if ws.task is not None else None
        if task is None or task.status in TERMINAL:
            return None
        return task if ws.state != "idle" or ws.kind == "worktree" else None

    # -- what the edge reports ------------------------------------------------------------

    def created(self, ws_id: str, repo: str, kind: str, path: str, url: str, now: float,
                **fields) -> None:
        """A new directory exists (fields: task, branch, ref, commit)."""
        self.queue._emit(WorkspaceCreated(at=now, workspace=ws_id, repo=repo, kind=kind,
                                          path=path, url=url, **fields))

    def ready(self, ws_id: str, task_id: int, lease: str | None, now: float, **fields) -> bool:
        """Bind a prepared workspace to the attempt it was made ready for (fields: ref,
        commit, branch, stash); False if that attempt is over already."""
        task = self.queue.index.tasks.get(task_id)
        if task is None or task.status != "running" or task.lease != lease:
            return False
        self.queue._emit(WorkspaceUpdated(at=now, workspace=ws_id, task=task_id, **fields))
        # The lease counts from when the workspace is ready: a long clone eats none of it.
        self.queue._emit(TaskTouched(at=now, id=task_id, lease_expires_at=now
                                     + self.queue.config.stale.factor * task.timeout))
        return True

    def fetched(self, ws_id: str, now: float) -> None:
        """The shared clone was fetched for a worktree: it counts as used."""
        if ws_id in self.records:
            self.queue._emit(WorkspaceUpdated(at=now, workspace=ws_id))

    def removed(self, ws_id: str, reason: str, patch: str | None, now: float) -> None:
        """The directory is gone (the edge decided it could go, or found it gone)."""
        ws = self.records.get(ws_id)
        if ws is not None:
            self.queue._emit(WorkspaceRemoved(at=now, workspace=ws_id, reason=reason, patch=patch,
                                              task=ws.task if ws.kind == "worktree" else None))

    def abandoned(self, ws_id: str, task_id: int, now: float) -> None:
        """Release a workspace left preparing or active for ``task_id`` once that task is no
        longer running: its attempt ended before the record existed (so ``attempt_ended``
        found none), or a crash came between them."""
        ws, task = self.records.get(ws_id), self.queue.index.tasks.get(task_id)
        if (ws is not None and ws.state != "idle" and ws.task == task_id
                and (task is None or task.status != "running")):
            self.queue._emit(WorkspaceReleased(at=now, workspace=ws_id, task=task_id))

    def attempt_ended(self, event: Event) -> None:
        """An attempt ended: release the workspace it was (being) made ready for."""
        task = self.queue.index.tasks.get(event.id)
        ws = task is not None and task.workspace is not None and self.of_task(task)
        if ws and ws.state != "idle":
            self.queue._emit(WorkspaceReleased(at=event.at, workspace=ws.id, task=task.id))

    # -- apply: these must never fail ---------------------------------------------------------

    def _put(self, ws: Workspace) -> None:
        self.records[ws.id] = self.queue.index.changes.workspaces[ws.id] = ws

    def _apply_created(self, e: WorkspaceCreated) -> None:
        self.queue.index.changes.workspaces_removed.discard(e.workspace)
        self._put(Workspace(e.workspace, e.repo, e.kind, e.path, e.url, e.at, task=e.task,
                            branch=e.branch, ref=e.ref, commit=e.commit, updated_at=e.at,
                            state="idle" if e.task is None else "preparing"))

    def _apply_updated(self, e: WorkspaceUpdated) -> None:
        ws = self.records.get(e.workspace)
        if ws is not None and e.task is None:
            self._put(msgspec.structs.replace(ws, updated_at=e.at))
        elif ws is not None:
            self._put(msgspec.structs.replace(
                ws, task=e.task, ref=e.ref, commit=e.commit, branch=e.branch, state="active",
                ready=True, updated_at=e.at, stash=e.stash or ws.stash))

    def _apply_released(self, e: WorkspaceReleased) -> None:
        ws = self.records.get(e.workspace)
        if ws is not None:
            self._put(msgspec.structs.replace(ws, state="idle", released_at=e.at))

    def _apply_removed(self, e: WorkspaceRemoved) -> None:
        self.records.pop(e.workspace, None)
        self.queue.index.changes.workspaces.pop(e.workspace, None)
        self.queue.index.changes.workspaces_removed.add(e.workspace)


# ============================================================================
# 6. Replies: the core's results in wire form
# ============================================================================


PLAIN = frozenset((bool, int, float, str, type(None)))  #: values already in wire form


class Replies:
    """Results of the core (Structs) turned into what clients see: the one place records
    are built. Nothing inside the daemon reads a wire record back, nor changes one."""

    def __init__(self, queue: Queue):
        self.queue = queue
        self.sizes: dict[str, int] = {}  #: workspace path -> bytes, as last measured (section 10)
        #: The last task rendered and its record: a change's watch event and its reply show
        #: the same (immutable) task, so it is rendered once for both.
        self._last: tuple[Task | None, dict] = (None, {})

    def wire(self, value: Any) -> Any:
        kind = type(value)
        if kind is Task:
            return self.task(value)
        if kind is list:
            return [self.wire(v) for v in value]
        if kind is dict:
            return {k: self.wire(v) for k, v in value.items()}
        if kind is TaskResult:  # its extra fields are plain values ("existing", "next")
            record = self.task(value.task).copy()
            for key, extra in value.extra.items():
                record[key] = extra if type(extra) in PLAIN else self.wire(extra)
            return record
        if kind is TaskDetail:
            return self.task(value.task, with_history=True)
        if kind is Ended:
            return self.ended(value.task)
        if kind is Session:
            return self.session(value)
        if kind is Stream:
            return self.stream(value)
        if kind is Schedule:
            return self.schedule(value)
        if kind is ScheduleDetail:
            return self.schedule_detail(value)
        if kind is Workspace:
            return self.workspace(value)
        return value

    def session(self, s: Session) -> dict:
        return {"name": s.name, "status": s.status, "created_at": rfc3339(s.created_at),
                "ended_at": rfc3339(s.ended_at),
                "streams": [t.name for t in self.queue.streams.values() if t.session == s.name]}

    def stream(self, s: Stream) -> dict:
        return {"name": s.name, "session": s.session, "status": s.status, "paused": s.paused,
                "created_at": rfc3339(s.created_at), "ended_at": rfc3339(s.ended_at),
                "counts": dict(self.queue.index.counts[s.name])}

    def task(self, t: Task, with_history: bool = False) -> dict:
        if t is self._last[0] and not with_history:
            return self._last[1]
        record = {
            "id": t.id, "stream": t.stream, "session": self.queue.streams[t.stream].session,
            "tool": t.tool, "task_class": t.task_class, "payload": t.payload,
            "status": t.status, "priority": t.priority, "timeout": t.timeout,
            "attempts": t.attempts, "max_attempts": t.max_attempts,
            "created_at": rfc3339(t.created_at), "started_at": rfc3339(t.started_at),
            "finished_at": rfc3339(t.finished_at), "worker": t.worker, "summary": t.summary,
            "result": t.result, "reason": t.reason, "waiting_for": t.waiting_for,
            "ready_at": rfc3339(t.ready_at), "after": list(t.after), "key": t.key,
            "lock": t.lock, "lease": t.lease, "lease_expires_at": rfc3339(t.lease_expires_at),
            "repo": t.repo, "ref": t.ref, "workspace": self.task_workspace(t),
        }
        if t.schedule is not None:
            record["schedule"], record["slot"] = t.schedule, rfc3339(t.slot)
        if with_history:
            record["history"] = [{"at": rfc3339(at), "status": status, "by": by, "note": note}
                                 for at, status, by, note in full_history(t)]
        else:
            self._last = (t, record)
        return record

    def schedule(self, s: Schedule) -> dict:
        book, last = self.queue.schedules, s.firings[-1] if s.firings else None
        status = "ended" if s.next_slot is None else "paused" if s.paused else "active"
        due = None if s.next_slot is None or s.paused else book.due_at(s, s.next_slot)
        return {"name": s.name, **msgspec.structs.asdict(s.spec), "source": s.source,
                "status": status, "paused": s.paused, "created_at": rfc3339(s.created_at),
                "next_at": rfc3339(due), "next_slot": rfc3339(s.next_slot),
                "last_slot": rfc3339(last and last[0]), "last_task": s.last_task,
                "last_outcome": last and self.firing_outcome(last), "fired": s.fired,
                "skipped": s.skipped}

    def schedule_detail(self, detail: ScheduleDetail) -> dict:
        s, book = detail.schedule, self.queue.schedules
        slots = [] if s.paused else itertools.islice(book.timing(s).slots_from(s.next_slot),
                                                     detail.count)
        return {**self.schedule(s), "next": [rfc3339(book.due_at(s, slot)) for slot in slots],
                "firings": [{"slot": rfc3339(slot), "at": rfc3339(at), "task": task,
                             "outcome": self.firing_outcome((slot, at, task, what))}
                            for slot, at, task, what in reversed(s.firings)]}

    def firing_outcome(self, firing: tuple) -> str:
        """A firing's outcome now: its task's status (``purged`` once gone), or why it skipped."""
        task_id, what = firing[2], firing[3]
        if task_id is None:
            return what
        task = self.queue.index.tasks.get(task_id)
        return task.status if task is not None else "purged"

    # -- repository workspaces

    def task_workspace(self, t: Task) -> dict | None:
        """A task's workspace as its record shows it: where, once it is prepared."""
        if t.workspace is None:
            return None
        ws = self.queue.workspaces.of_task(t)
        if ws is None:
            return {"kind": t.workspace, "path": None, "branch": None, "ref": None,
                    "commit": None, "state": None}
        return {"kind": ws.kind, "path": ws.path, "branch": ws.branch, "ref": ws.ref,
                "commit": ws.commit, "state": ws.state}

    def workspace(self, ws: Workspace) -> dict:
        task = self.queue.tasks.get(ws.task) if ws.task is not None else None
        idle = ws.state == "idle" and max(ws.created_at, ws.updated_at or 0, ws.released_at or 0)
        return {"id": ws.id, "repo": ws.repo, "kind": ws.kind, "task": ws.task,
                "task_status": task.status if task else None, "branch": ws.branch,
                "ref": ws.ref, "commit": ws.commit, "path": ws.path, "url": ws.url,
                "state": ws.state, "ready": ws.ready, "bytes": self.sizes.get(ws.path),
                "idle": round(time.time() - idle, 3) if idle else None, "stash": ws.stash,
                "created_at": rfc3339(ws.created_at), "updated_at": rfc3339(ws.updated_at),
                "released_at": rfc3339(ws.released_at)}

    def ended(self, task: Task) -> dict:
        started = task.started_at
        return {**self.task(task),
                "waited": None if started is None else round(started - task.created_at, 3),
                "duration": None if started is None else round(task.finished_at - started, 3)}


# ============================================================================
# 7. Journal
# ============================================================================

#: A segment begins with (magic, format version, first record's seq, random salt).
SEGMENT_HEADER = struct.Struct(">4sIQQ")
SEGMENT_MAGIC = b"SPQJ"
SEGMENT_VERSION = 2
#: A record: body length, CRC32 of (salt, seq, body), seq. The salt is random per segment,
#: so bytes inside a payload can never pass for a record of the segment that holds them.
RECORD_HEADER = struct.Struct(">IIQ")
LEGACY_RECORD_HEADER = struct.Struct(">II")  #: format 1 (no segment header): length, CRC32
SEQ_BYTES = struct.Struct(">Q")
SEGMENT_SUFFIX = ".journal"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class Segment:
    """One journal file, named by the sequence number of its first record."""

    def __init__(self, path: str, first_seq: int, fd: int | None = None, allocated: int = 0,
                 salt: int = 0):
        self.path = path
        self.first_seq = first_seq
        self.fd = fd
        self.allocated = allocated  #: bytes preallocated on disk
        self.reserved = SEGMENT_HEADER.size  #: bytes handed out to the header and records
        self.salt_crc = zlib.crc32(SEQ_BYTES.pack(salt))
        self.sealed = False  #: no more records go here; close once flushed

    def record(self, seq: int, body: bytes) -> bytes:
        seq_bytes = SEQ_BYTES.pack(seq)
        crc = zlib.crc32(body, zlib.crc32(seq_bytes, self.salt_crc))
        return RECORD_HEADER.pack(len(body), crc, seq) + body


def segment_layout(data: bytes) -> tuple[int, int | None, int | None]:
    """(offset of the first record, CRC seed of the salt or None for format 1, first seq)."""
    if data[:4] != SEGMENT_MAGIC or len(data) < SEGMENT_HEADER.size:
        return 0, None, None
    _, version, first_seq, salt = SEGMENT_HEADER.unpack_from(data)
    if version != SEGMENT_VERSION:
        raise JournalDamaged(f"journal segment format {version} is not one this sparkqd reads "
                             f"(it reads {SEGMENT_VERSION} and 1)")
    return SEGMENT_HEADER.size, zlib.crc32(SEQ_BYTES.pack(salt)), first_seq


def record_at(data: bytes, pos: int, salt_crc: int | None) -> tuple[int, int | None, bytes] | None:
    """The intact record starting at ``pos`` as (end, seq, body), else None."""
    header = LEGACY_RECORD_HEADER if salt_crc is None else RECORD_HEADER
    if len(data) - pos < header.size:
        return None
    length, crc = LEGACY_RECORD_HEADER.unpack_from(data, pos)
    end = pos + header.size + length
    if length == 0 or end > len(data):
        return None
    body = data[pos + header.size: end]
    if salt_crc is None:
        return (end, None, body) if zlib.crc32(body) == crc else None
    seq_bytes = data[pos + 8: pos + 16]
    if zlib.crc32(body, zlib.crc32(seq_bytes, salt_crc)) != crc:
        return None
    return end, SEQ_BYTES.unpack(seq_bytes)[0], body


def record_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each intact record of a segment's bytes, up to the first that is not."""
    pos, salt_crc, _ = segment_layout(data)
    spans = []
    while (found := record_at(data, pos, salt_crc)) is not None:
        spans.append((pos, found[0]))
        pos = found[0]
    return spans


def intact_record_after(data: bytes, pos: int, salt_crc: int | None, seq: int) -> bool:
    """Whether an intact record starts anywhere after ``pos`` (where record ``seq`` was due).

    A write cut short by a crash leaves nothing intact behind it; an intact
    record after a bad one means the damage is in the middle: not a torn tail.
    A later record of a salted segment carries one of the next sequence numbers,
    so those 8 bytes are searched for (in C) instead of trying every offset.
    """
    trimmed = data[: len(data.rstrip(b"\0"))]
    if salt_crc is None:
        return any(record_at(trimmed, offset, salt_crc) is not None
                   for offset in range(pos + 1, len(trimmed) - LEGACY_RECORD_HEADER.size))
    for later in range(seq, seq + 16):
        needle, at = SEQ_BYTES.pack(later), pos
        while (at := trimmed.find(needle, at + 1)) >= 0:
            if at - 8 > pos and record_at(trimmed, at - 8, salt_crc) is not None:
                return True
    return False


def cut_tail(path: str, size: int) -> None:
    """Cut a segment's torn tail off durably, before any later segment exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Append-only segments of CRC-checked msgpack events, with group commit.

    ``record(event)`` encodes an event and reserves its room before the queue
    applies it, so an event that cannot be journaled is never applied. One
    flusher writes everything buffered with one write per segment and one
    fsync (policy ``always``), so requests that arrive together share the
    cost. ``when_durable(seq, callback)`` tells when the policy's promise holds
    for every record up to ``seq``. Segments are preallocated, so a full disk
    is refused up front instead of failing half-way through a write.

    Crash safety of rotation: a new segment is created only once everything
    buffered for the old one is written and fsynced, and it is named by the
    first record it will hold; a newest segment that holds no record is what a
    crash during creation leaves, and replay removes it.
    """

    def __init__(self, directory: str, policy: str = "always", interval_ms: int = 10,
                 segment_bytes: int = SEGMENT_BYTES, clock=time.time):
        self.directory = directory
        self.clock = clock  #: the daemon's clock: its deadlines are the timer's
        self.policy = policy
        self.interval = interval_ms / 1000
        self.segment_bytes = segment_bytes
        self.sealed: list[Segment] = []
        self.current: Segment | None = None
        self.last_seq = 0  #: last record appended
        self.written_seq = 0  #: last record handed to the OS
        self.synced_seq = 0  #: last record fsynced
        self.last_sync = 0.0
        self.failure: str | None = None  #: why the journal stopped for good (an I/O error)
        self.stalled: str | None = None  #: why writing waits for space, retried by the timer
        self.retry_at = 0.0  #: when a stalled write is next tried
        self._chunks: list[tuple[Segment, bytes]] = []
        self._waiters: collections.deque = collections.deque()
        self._flush_scheduled = False
        self._unsynced: set[Segment] = set()  #: segments written since their last fsync
        self._encode = msgspec.msgpack.Encoder().encode
        self.fsync_seconds = Histogram(FSYNC_BUCKETS)
        #: called with the time an fsync no reply waited for is owed (the timer's wake-up)
        self.on_owed = None
        #: the daemon's loop, held: Python 3.11's get_running_loop() costs a getpid() call
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- recovery -----------------------------------------------------------

    def _segment_files(self) -> list[tuple[int, str]]:
        found = []
        for name in os.listdir(self.directory):
            stem = name[: -len(SEGMENT_SUFFIX)]
            if name.endswith(SEGMENT_SUFFIX) and stem.isdigit():
                found.append((int(stem), os.path.join(self.directory, name)))
        return sorted(found)

    def replay(self, after_seq: int):
        """Yield every event after ``after_seq``, checking each record.

        Newest segments holding no record, and a record cut short or failing
        its CRC at the very end of the newest segment that holds any, are a
        torn tail: cut off with a warning. Any other damage raises
        JournalDamaged naming the file and offset.
        """
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        files = self._drop_empty_newest(self._segment_files())
        decode = msgspec.msgpack.Decoder(AnyEvent).decode
        seq = after_seq
        for index, (first_seq, path) in enumerate(files):
            if first_seq > seq + 1:
                raise JournalDamaged(
                    f"{path}: starts at record {first_seq} but the snapshot and earlier "
                    f"segments end at {seq}: records {seq + 1}..{first_seq - 1} are missing")
            with open(path, "rb") as f:
                data = f.read()
            seq = first_seq - 1
            for offset, body in self._records(path, data, first_seq, index == len(files) - 1):
                seq += 1
                if seq > after_seq:
                    try:
                        yield decode(body)
                    except msgspec.DecodeError as exc:
                        raise JournalDamaged(f"{path}: offset {offset}: record {seq} passes its "
                                             f"CRC but cannot be decoded: {exc}") from None
            self.sealed.append(Segment(path, first_seq))
        self.last_seq = self.written_seq = self.synced_seq = max(seq, after_seq)

    def _drop_empty_newest(self, files: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Remove the newest segments that hold no record: created just before a crash."""
        while files:
            path = files[-1][1]
            with open(path, "rb") as f:
                data = f.read()
            try:
                start, salt_crc, _ = segment_layout(data)
            except JournalDamaged:  # a header torn in its creation holds nothing after it
                if data[SEGMENT_HEADER.size:].strip(b"\0"):
                    raise
            else:
                if record_at(data, start, salt_crc) is not None or intact_record_after(
                        data, start, salt_crc, files[-1][0]):
                    break
            log.warning("journal %s: newest segment holds no record (a crash while it was "
                        "created); removed", path)
            os.unlink(path)
            files.pop()
        return files

    def _records(self, path: str, data: bytes, first_seq: int, newest: bool):
        """Yield (offset, body) of each valid record in one segment's bytes."""
        pos, salt_crc, header_seq = segment_layout(data)
        if header_seq is not None and header_seq != first_seq:
            raise JournalDamaged(f"{path}: its header says it starts at record {header_seq}")
        seq = first_seq
        while pos < len(data):
            found = record_at(data, pos, salt_crc)
            if found is not None:
                end, record_seq, body = found
                if record_seq is not None and record_seq != seq:
                    raise JournalDamaged(f"{path}: offset {pos}: record {seq} carries sequence "
                                         f"number {record_seq}; refusing to start")
                yield pos, body
                pos, seq = end, seq + 1
                continue
            if not data[pos:].strip(b"\0"):
                return  # the unused, preallocated rest of the segment
            if not newest or intact_record_after(data, pos, salt_crc, seq):
                raise JournalDamaged(f"{path}: damaged record at offset {pos}; refusing to start "
                                     f"rather than skip data (move the file aside to start "
                                     f"without it)")
            log.warning("journal %s: torn record at offset %d (%d bytes cut off): the last "
                        "write before a crash, never acknowledged", path, pos, len(data) - pos)
            cut_tail(path, pos)
            return

    # -- appending ----------------------------------------------------------

    def open(self) -> None:
        """Start a fresh segment after recovery; on a full disk, start without one."""
        try:
            self.current = self._new_segment(0)
        except Unavailable as exc:
            log.error("%s; changes are refused until there is room", exc)

    def _new_segment(self, min_bytes: int) -> Segment:
        """A new segment, preallocated so that a full disk says so now, not mid-write.

        On a nearly full disk a smaller one is taken, so the queue keeps working
        until the space is truly gone.
        """
        first = self.last_seq + 1
        path = os.path.join(self.directory, f"{first:020d}{SEGMENT_SUFFIX}")
        needed = min_bytes + SEGMENT_HEADER.size + RECORD_HEADER.size
        salt = int.from_bytes(os.urandom(8), "big")
        step = "create"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                step = "preallocate"
                for size in (max(self.segment_bytes, needed), max(1 << 20, needed)):
                    try:
                        os.posix_fallocate(fd, 0, size)
                        break
                    except OSError as exc:
                        if exc.errno not in NO_SPACE or size <= max(1 << 20, needed):
                            raise
                step = "write the header of"
                os.write(fd, SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, first, salt))
                step = "fsync directory of"
                fsync_directory(self.directory)
            except OSError:
                os.close(fd)
                os.unlink(path)
                raise
        except OSError as exc:
            raise Unavailable(f"journal: cannot {step} segment {path}: {exc.strerror}") from None
        return Segment(path, first, fd, size, salt)

    def ensure_room(self, nbytes: int) -> None:
        """Refuse a change up front when the journal cannot take ``nbytes`` more."""
        if self.failure:
            raise Unavailable(f"storage failing, changes refused: {self.failure}")
        if self.stalled:
            raise Unavailable(f"journal cannot write, changes refused: {self.stalled}")
        if self.current is None:
            self.current = self._new_segment(nbytes)
        elif self.current.reserved + nbytes > self.current.allocated:
            if self.current.reserved > SEGMENT_HEADER.size:
                self.rotate(nbytes)
            else:  # no record yet: a new segment would take this one's name
                self._grow(self.current, SEGMENT_HEADER.size + nbytes)

    def _grow(self, segment: Segment, size: int) -> None:
        """Preallocate more of a segment that holds no record yet."""
        try:
            os.posix_fallocate(segment.fd, 0, size)
        except OSError as exc:
            raise Unavailable(f"journal: cannot preallocate segment {segment.path}: "
                              f"{exc.strerror}") from None
        segment.allocated = max(segment.allocated, size)

    def rotate(self, min_bytes: int = 0) -> None:
        """Seal the current segment and continue in a new one.

        What is buffered for the old segment is written and fsynced first, so
        at no moment does a segment exist whose name claims records that are
        not on disk before it.
        """
        if self.current is not None:
            self.sync_now(release=False)
        segment = self._new_segment(min_bytes)
        if self.current is not None:
            self.current.sealed = True
            self.sealed.append(self.current)
        self.current = segment

    def record(self, event: Event) -> int:
        """Encode one event and buffer it as the next record; returns its seq.

        Raises BadRequest if it cannot be encoded and Unavailable if there is
        no room: the caller applies the event only once this has returned.
        """
        try:
            body = self._encode(event)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise BadRequest(f"cannot be journaled: {exc}") from None
        size = RECORD_HEADER.size + len(body)
        self.ensure_room(size)
        segment = self.current
        segment.reserved += size
        self.last_seq += 1
        self._chunks.append((segment, segment.record(self.last_seq, body)))
        return self.last_seq

    def schedule_flush(self) -> None:
        """Flush once the loop has read what every client sent this round: group commit."""
        if self._chunks:
            self._flush_soon()

    def _flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            (self.loop or asyncio.get_running_loop()).call_soon(self.flush)

    def flush(self, release: bool = True) -> None:
        """Write what is buffered; under ``always``, fsync too if a reply waits for it.

        (Scheduled with call_soon by ``schedule_flush``; a no-op once ``close`` has run.)

        The fsync runs on the event loop, as Redis does for ``appendfsync always``:
        requests that arrive meanwhile wait in the socket buffers and share the
        next write, and no thread hand-off is paid on every acknowledgement.
        Changes nobody waits for (the daemon's own: its workers' claims and runs)
        are written now and fsynced within ``fsync_interval_ms`` by the timer, or
        sooner with the next acknowledgement.
        """
        self._flush_scheduled = False
        if self.failure or self.current is None and not self.sealed:
            return
        if self._chunks:
            chunks, self._chunks = self._chunks, []
            seq = self.last_seq
            self._unsynced.update(self._write(chunks))
            if self.failure or self.stalled:
                return self._tell_owed()
            self.written_seq = seq
        if self.policy == "always" and self._waiters and self.synced_seq < self.written_seq:
            self._sync_unsynced()
        if self.sealed:
            self._close_synced()
        if release:
            self._release()
        self._tell_owed()

    def _tell_owed(self) -> None:
        """Tell the timer when the next fsync (or a stalled write's retry) is owed."""
        if self.on_owed is not None and (deadline := self.sync_deadline()) is not None:
            self.on_owed(deadline)

    def _sync_unsynced(self) -> None:
        segments, self._unsynced = [s for s in self._unsynced if s.fd is not None], set()
        self._sync(segments, self.written_seq)

    def sync_now(self, release: bool = True) -> None:
        """Write and fsync everything appended so far, whatever the policy.

        ``release=False`` (a rotation, in the middle of a change) leaves the replies
        waiting for this to the next flush: none may run inside a change.
        """
        self.flush(release)
        if self.failure:
            raise Unavailable(f"storage failing: {self.failure}")
        if self.stalled:
            raise Unavailable(f"journal cannot write: {self.stalled}")
        if self.synced_seq < self.written_seq:
            self._sync_unsynced()
        self._close_synced()
        if release:
            self._release()
        elif self._waiters:
            self._flush_soon()

    def _write(self, chunks: list[tuple[Segment, bytes]]) -> list[Segment]:
        """Write chunks in order; on a full disk keep the unwritten rest for a retry."""
        by_segment: dict[Segment, list[bytes]] = {}
        for segment, chunk in chunks:
            by_segment.setdefault(segment, []).append(chunk)
        written_to = []
        for index, (segment, parts) in enumerate(by_segment.items()):
            data = memoryview(b"".join(parts))
            written_to.append(segment)
            try:
                while data:
                    data = data[os.write(segment.fd, data):]
            except OSError as exc:
                if exc.errno not in NO_SPACE:
                    self._fail(f"write journal segment {segment.path}: {exc.strerror}")
                    return written_to
                rest = [(segment, bytes(data))] + [
                    (s, b"".join(p)) for s, p in list(by_segment.items())[index + 1:]]
                self._chunks = rest + self._chunks
                self._stall(f"write journal segment {segment.path}: {exc.strerror}")
                return written_to
        if self.stalled:
            log.warning("journal: writing again after %s", self.stalled)
            self.stalled = None
        return written_to

    def _stall(self, reason: str) -> None:
        self.retry_at = self.clock() + 1.0
        if self.stalled is None:
            log.error("journal: %s; changes are refused and replies wait until there is room",
                      reason)
        self.stalled = reason

    def _sync(self, segments: list[Segment], seq: int) -> None:
        started = time.perf_counter()
        for segment in segments:
            try:
                os.fdatasync(segment.fd)
            except OSError as exc:
                self._fail(f"fsync journal segment {segment.path}: {exc.strerror}")
                return
        self.fsync_seconds.observe(time.perf_counter() - started)
        self.synced_seq = max(self.synced_seq, seq)
        self.last_sync = self.clock()

    def _fail(self, reason: str) -> None:
        log.error("journal: %s; refusing further changes", reason)
        self.failure = reason
        self._release()

    def _close_synced(self) -> None:
        """Close sealed segments whose every record is fsynced."""
        for index, segment in enumerate(self.sealed):
            following = self.sealed[index + 1] if index + 1 < len(self.sealed) else self.current
            if (segment.fd is not None and following is not None
                    and self.synced_seq >= following.first_seq - 1):
                os.close(segment.fd)
                segment.fd = None

    @property
    def durable_seq(self) -> int:
        """The last record that the policy counts as safe to acknowledge."""
        return self.synced_seq if self.policy == "always" else self.written_seq

    def when_durable(self, seq: int, callback) -> bool:
        """True if ``seq`` is durable now; else call ``callback()`` once it is (or fails)."""
        if self.durable_seq >= seq and not self.failure:
            return True
        self._waiters.append((seq, callback))
        self._flush_soon()  # someone waits: the fsync is due now
        return False

    def _release(self) -> None:
        durable = self.durable_seq
        while self._waiters and (self.failure or self._waiters[0][0] <= durable):
            self._waiters.popleft()[1]()

    def sync_deadline(self) -> float | None:
        """When an fsync (or, stalled, a write) is next owed (epoch seconds), or None:
        under ``batch`` for everything, under ``always`` for changes no reply waited for."""
        if self.stalled:
            return self.retry_at
        if self.policy != "never" and self.last_seq > self.synced_seq:
            return self.last_sync + self.interval
        return None

    def remove_through(self, seq: int) -> int:
        """Delete sealed segments whose records are all covered by a snapshot at ``seq``."""
        removed = 0
        while self.sealed:
            following = self.sealed[1] if len(self.sealed) > 1 else self.current
            if following is None or following.first_seq - 1 > seq or self.sealed[0].fd is not None:
                break
            os.unlink(self.sealed.pop(0).path)
            removed += 1
        if removed:
            fsync_directory(self.directory)
        return removed

    def drop_empty_current(self) -> None:
        """Remove the current segment at shutdown when it holds no record."""
        if self.current is not None and self.current.reserved <= SEGMENT_HEADER.size:
            os.close(self.current.fd)
            os.unlink(self.current.path)
            self.current = None

    def close(self) -> None:
        """Write what is still buffered, then close every segment."""
        if self._chunks and not self.failure:
            self.flush()
        for segment in (*self.sealed, self.current):
            if segment is not None and segment.fd is not None:
                os.close(segment.fd)
                segment.fd = None


# ============================================================================
# 8. Snapshot
# ============================================================================

SNAPSHOT_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS sessions (
    name TEXT PRIMARY KEY, status TEXT NOT NULL, created_at REAL NOT NULL, ended_at REAL);
CREATE TABLE IF NOT EXISTS streams (
    name TEXT PRIMARY KEY, session TEXT NOT NULL, status TEXT NOT NULL,
    created_at REAL NOT NULL, ended_at REAL, paused INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY, stream TEXT NOT NULL, session TEXT NOT NULL, tool TEXT NOT NULL,
    task_class TEXT NOT NULL, payload TEXT, status TEXT NOT NULL, priority INTEGER NOT NULL,
    timeout REAL NOT NULL, attempts INTEGER NOT NULL, created_at REAL NOT NULL,
    started_at REAL, finished_at REAL, worker TEXT, summary TEXT, result TEXT, reason TEXT,
    max_attempts INTEGER NOT NULL DEFAULT 1, waiting_for TEXT, ready_at REAL,
    after_ids TEXT, key TEXT, lock TEXT, lease TEXT, lease_expires_at REAL,
    run_pid INTEGER, run_start INTEGER, schedule TEXT, slot REAL, repo TEXT, ref TEXT,
    workspace TEXT);
CREATE TABLE IF NOT EXISTS task_history (
    task_id INTEGER NOT NULL, n INTEGER NOT NULL, at REAL NOT NULL, status TEXT NOT NULL,
    by TEXT, note TEXT, PRIMARY KEY (task_id, n)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY, source TEXT NOT NULL, stream TEXT NOT NULL, tool TEXT,
    cron TEXT, timezone TEXT, every TEXT, at TEXT, paused INTEGER NOT NULL,
    next_slot REAL, last_task INTEGER, fired INTEGER NOT NULL, skipped INTEGER NOT NULL,
    created_at REAL NOT NULL, spec TEXT NOT NULL, firings TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workspaces (
    id TEXT PRIMARY KEY, repo TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL,
    url TEXT NOT NULL, created_at REAL NOT NULL, task INTEGER, branch TEXT, ref TEXT,
    base_commit TEXT, state TEXT NOT NULL, ready INTEGER NOT NULL, updated_at REAL,
    released_at REAL, stash TEXT);
"""
TASK_COLUMNS = ("id, stream, tool, task_class, payload, status, priority, timeout, created_at, "
                "attempts, started_at, finished_at, worker, summary, result, reason, "
                "max_attempts, waiting_for, ready_at, after_ids, key, lock, lease, "
                "lease_expires_at, run_pid, run_start, schedule, slot, repo, ref, workspace")
#: Columns added since the first snapshot format, added in place to older files.
ADDED_COLUMNS = {
    "streams": ["paused INTEGER NOT NULL DEFAULT 0"],
    "tasks": ["max_attempts INTEGER NOT NULL DEFAULT 1", "waiting_for TEXT", "ready_at REAL",
              "after_ids TEXT", "key TEXT", "lock TEXT", "lease TEXT", "lease_expires_at REAL",
              "run_pid INTEGER", "run_start INTEGER", "schedule TEXT", "slot REAL", "repo TEXT",
              "ref TEXT", "workspace TEXT"],
}
WORKSPACE_COLUMNS = ("id, repo, kind, path, url, created_at, task, branch, ref, base_commit, "
                     "state, ready, updated_at, released_at, stash")


def to_json(value: Any) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()


class SnapshotState(Struct):
    """What a snapshot holds, as loaded at startup."""

    sessions: list[Session]
    streams: list[Stream]
    tasks: list[Task]
    next_id: int
    seq: int
    written_at: str | None = None  #: when it was written (RFC 3339), None for an empty one
    schedules: list[Schedule] = []
    workspaces: list = []  #: the workspace records


class Snapshot:
    """The SQLite file people query: loaded at startup, written in a worker thread."""

    def __init__(self, path: str):
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        os.chmod(self.path, 0o600)  # people's tasks and payloads: for the owner only
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")  # people may read while we write
        db.execute("PRAGMA synchronous=FULL")  # journal segments are deleted after commit
        db.executescript(SNAPSHOT_SCHEMA)
        for table, columns in ADDED_COLUMNS.items():
            have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for column in columns:
                if column.split()[0] not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        return db

    def load(self) -> SnapshotState:
        """Read the whole snapshot; an absent file is an empty one."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        try:
            self._db = self._connect()
            return self._read(self._db)
        except sqlite3.Error as exc:
            raise StartupError(f"snapshot {self.path}: cannot read: {exc}") from None

    @staticmethod
    def _read(db: sqlite3.Connection) -> SnapshotState:
        meta = dict(db.execute("SELECT key, value FROM meta"))
        sessions = [Session(*row) for row in
                    db.execute("SELECT name, created_at, status, ended_at FROM sessions "
                               "ORDER BY created_at")]
        streams = [Stream(*row[:5], bool(row[5])) for row in db.execute(
            "SELECT name, session, created_at, status, ended_at, paused FROM streams "
            "ORDER BY created_at")]
        history: dict[int, list] = {}
        for task_id, *entry in db.execute(
                "SELECT task_id, at, status, by, note FROM task_history "
                "WHERE n > 0 OR status != 'pending' ORDER BY task_id, n"):  # see full_history
            history.setdefault(task_id, []).append(tuple(entry))
        decode, intern = msgspec.json.decode, sys.intern
        stream_names = {s.name: s.name for s in streams}  # one string object per stream
        tasks = [Task(i, stream_names[stream], intern(tool), intern(cls),
                      None if payload is None else decode(payload), intern(status), prio,
                      timeout, created, attempts, started, finished, worker, summary,
                      None if result is None else decode(result), reason,
                      tuple(history.get(i, ())), max_attempts, waiting_for, ready_at,
                      tuple(decode(after)) if after else (), key, lock, lease, expires,
                      run_pid, run_start, schedule, slot, repo, ref, workspace)
                 for (i, stream, tool, cls, payload, status, prio, timeout, created, attempts,
                      started, finished, worker, summary, result, reason, max_attempts,
                      waiting_for, ready_at, after, key, lock, lease, expires, run_pid, run_start,
                      schedule, slot, repo, ref, workspace)
                 in db.execute(f"SELECT {TASK_COLUMNS} FROM tasks ORDER BY id")]
        schedules = [Schedule(name, decode(spec, type=ScheduleSpec), source, created, next_slot,
                              bool(paused), last_task, tuple(map(tuple, decode(firings))),
                              fired, skipped)
                     for name, source, created, next_slot, paused, last_task, firings, fired,
                     skipped, spec in db.execute(
                         "SELECT name, source, created_at, next_slot, paused, last_task, "
                         "firings, fired, skipped, spec FROM schedules")]
        workspaces = [Workspace(*row[:11], bool(row[11]), *row[12:]) for row in db.execute(
            f"SELECT {WORKSPACE_COLUMNS} FROM workspaces ORDER BY created_at")]
        return SnapshotState(sessions, streams, tasks, int(meta.get("next_id", 1)),
                             int(meta.get("journal_seq", 0)), meta.get("written_at"), schedules,
                             workspaces)

    def write(self, changes: Changes, seq: int, next_id: int, session_of: dict[str, str]) -> None:
        """Write what changed, and the journal sequence it covers, in one transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)",
                           [(s.name, s.status, s.created_at, s.ended_at)
                            for s in changes.sessions.values()])
            db.executemany("INSERT OR REPLACE INTO streams (name, session, status, created_at, "
                           "ended_at, paused) VALUES (?, ?, ?, ?, ?, ?)",
                           [(s.name, s.session, s.status, s.created_at, s.ended_at, s.paused)
                            for s in changes.streams.values()])
            db.executemany(
                f"INSERT OR REPLACE INTO tasks (session, {TASK_COLUMNS}) VALUES "
                f"({', '.join('?' * 32)})",
                [(session_of[t.stream], t.id, t.stream, t.tool, t.task_class, to_json(t.payload),
                  t.status, t.priority, t.timeout, t.created_at, t.attempts, t.started_at,
                  t.finished_at, t.worker, t.summary, to_json(t.result), t.reason,
                  t.max_attempts, t.waiting_for, t.ready_at, to_json(list(t.after)) if t.after
                  else None, t.key, t.lock, t.lease, t.lease_expires_at, t.run_pid, t.run_start,
                  t.schedule, t.slot, t.repo, t.ref, t.workspace)
                 for t in changes.tasks.values()])
            self._write_schedules(db, changes.schedules)
            db.executemany("INSERT OR REPLACE INTO task_history VALUES (?, ?, ?, ?, ?, ?)",
                           [(t.id, n, *entry) for t in changes.tasks.values()
                            for n, entry in enumerate(full_history(t))])
            purged = [(i,) for i in changes.purged]
            db.executemany("DELETE FROM tasks WHERE id = ?", purged)
            db.executemany("DELETE FROM task_history WHERE task_id = ?", purged)
            self._write_workspaces(db, changes)
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           [("journal_seq", str(seq)), ("next_id", str(next_id)),
                            ("written_at", rfc3339(time.time())), ("version", VERSION)])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already (a full disk)
                db.execute("ROLLBACK")
            raise

    @staticmethod
    def _write_schedules(db: sqlite3.Connection, schedules: dict[str, Schedule | None]) -> None:
        db.executemany("DELETE FROM schedules WHERE name = ?",
                       [(name,) for name, s in schedules.items() if s is None])
        db.executemany(
            "INSERT OR REPLACE INTO schedules VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "?, ?)",
            [(s.name, s.source, s.spec.stream, s.spec.tool or SCRIPT_TOOL_PREFIX + s.spec.script,
              s.spec.cron, s.spec.timezone, None if s.spec.every is None else str(s.spec.every),
              s.spec.at, s.paused, s.next_slot, s.last_task, s.fired, s.skipped, s.created_at,
              to_json(s.spec), to_json(s.firings)) for s in schedules.values() if s is not None])

    @staticmethod
    def _write_workspaces(db: sqlite3.Connection, changes: Changes) -> None:
        """Removed workspace records go, then changed ones are written (one may be both)."""
        db.executemany("DELETE FROM workspaces WHERE id = ?",
                       [(ws_id,) for ws_id in changes.workspaces_removed])
        db.executemany(f"INSERT OR REPLACE INTO workspaces ({WORKSPACE_COLUMNS}) VALUES "
                       f"({', '.join('?' * 15)})",
                       [(w.id, w.repo, w.kind, w.path, w.url, w.created_at, w.task, w.branch,
                         w.ref, w.commit, w.state, w.ready, w.updated_at, w.released_at, w.stash)
                        for w in changes.workspaces.values()])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def merge_changes(older: Changes, newer: Changes) -> Changes:
    """Put back the changes of a failed snapshot under those made since."""
    older.sessions.update(newer.sessions)
    older.streams.update(newer.streams)
    older.tasks.update(newer.tasks)
    older.schedules.update(newer.schedules)
    for task_id in newer.purged:
        older.tasks.pop(task_id, None)
    older.purged |= newer.purged
    older.workspaces.update(newer.workspaces)
    for ws_id in newer.workspaces_removed:
        older.workspaces.pop(ws_id, None)
    older.workspaces_removed |= newer.workspaces_removed
    return older


# ============================================================================
# 9. Runner
# ============================================================================

#: Variables of the daemon's own service manager that must not reach a task.
PRIVATE_ENV_PREFIXES = ("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "SPARKQ_")


def child_environment(**variables: str) -> dict[str, str]:
    """The environment of a process the daemon starts: its own, less its private variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PRIVATE_ENV_PREFIXES)}
    env.update(variables)
    return env
SCRIPT_HEADER_KEYS = ("description", "task_class", "timeout", "args",
                      "workspace", "repo", "ref", "setup")


def scan_scripts(dirs: list[str]) -> dict[str, Script]:
    """Index every executable, .sh or .py file under ``dirs`` by name, with its header."""
    found: dict[str, Script] = {}
    for top in dirs:
        top = os.path.expanduser(top)
        for folder, subdirs, files in sorted(os.walk(top)):
            subdirs.sort()
            for file_name in sorted(files):
                path = os.path.join(folder, file_name)
                executable = os.access(path, os.X_OK)
                if not (executable or file_name.endswith((".sh", ".py"))):
                    continue
                name = re.sub(r"\.(sh|py)$", "", file_name)
                if name in found:
                    log.warning("script %s: name %r is taken by %s", path, name, found[name].path)
                    continue
                found[name] = read_script(name, path, executable)
    return found


def read_script(name: str, path: str, executable: bool) -> Script:
    """A script's metadata from its leading comment lines."""
    header: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.startswith("#"):
                    if line.strip():
                        break
                    continue
                key, sep, value = line[1:].partition(":")
                if sep and key.strip() in SCRIPT_HEADER_KEYS:
                    header[key.strip()] = value.strip()
    except OSError as exc:
        log.warning("script %s: cannot read: %s", path, exc.strerror)
    try:
        timeout = float(header["timeout"]) if "timeout" in header else None
    except ValueError:
        log.warning("script %s: timeout %r is not a number; ignored", path, header["timeout"])
        timeout = None
    interpreter = [] if executable else (["bash"] if path.endswith(".sh") else [sys.executable])
    return Script(name=name, path=path, argv=[*interpreter, path],
                  description=header.get("description", ""),
                  task_class=header.get("task_class", "MEDIUM_SCRIPT"), timeout=timeout,
                  args=header.get("args", ""), workspace=header.get("workspace"),
                  repo=header.get("repo"), ref=header.get("ref"), setup=header.get("setup"))


def process_start_time(pid: int) -> int | None:
    """A process's start time in clock ticks after boot, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    return int(stat_line.rpartition(b")")[2].split()[19])


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def start_time_now() -> int:
    """Now, in the clock ticks after boot that /proc/PID/stat gives a process's start in.

    Read at spawn instead of /proc itself, which waits for the child's exec to finish.
    """
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLOCK_TICKS)


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False if no process of it is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def kill_orphan(pid: int, start: int | None) -> bool:
    """Kill the process group a crashed daemon left running, never a reused pid's.

    A process group id is not reused while any member lives, so a group whose
    leader is gone is still ours; a live leader must have the recorded start time.
    """
    now_start = process_start_time(pid)
    if now_start is not None and start is not None and abs(now_start - start) > CLOCK_TICKS // 10:
        return False  # the pid was reused: not our process, and our group is gone
    if not signal_group(pid, signal.SIGKILL):
        return False
    deadline = time.monotonic() + 5
    while signal_group(pid, 0) and time.monotonic() < deadline:
        time.sleep(0.01)  # a retried attempt must not start beside its predecessor
    return True


class TaskLog:
    """A run's output file, capped at ``max_bytes`` by keeping its head and its tail."""

    def __init__(self, path: str, max_bytes: int, attempt: int):
        self.path = path
        self.head_room = max_bytes // 2
        self.tail_limit = max_bytes - self.head_room
        self.tail = bytearray()
        self.cut = 0
        self.last = bytearray()  #: the last few KiB, for the summary and a failure's reason
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        if attempt > 1:  # a header in the file only: not part of this run's output tail
            self.write(f"\n--- sparkqd: attempt {attempt} ---\n".encode())
            self.last.clear()

    def write(self, chunk: bytes) -> None:
        self.last += chunk
        del self.last[:-4096]
        if self.head_room > 0:
            head, chunk = chunk[: self.head_room], chunk[self.head_room:]
            os.write(self.fd, head)
            self.head_room -= len(head)
        self.tail += chunk
        if len(self.tail) > self.tail_limit:
            self.cut += len(self.tail) - self.tail_limit
            del self.tail[: len(self.tail) - self.tail_limit]

    def pending_tail(self) -> bytes:
        """What the file does not hold yet: the tail kept in memory while it runs."""
        marker = f"\n[sparkqd: {self.cut} bytes of output cut here]\n".encode() if self.cut else b""
        return marker + bytes(self.tail)

    def close(self) -> None:
        os.write(self.fd, self.pending_tail())
        os.close(self.fd)

    def lines(self, count: int) -> list[str]:
        text = self.last.decode(errors="replace")
        return [line for line in text.splitlines() if line.strip()][-count:]


class Run:
    """One process the daemon started for a task."""

    def __init__(self, task: Task, slot: Slot, log_file: TaskLog):
        self.task = task
        self.task_id = task.id
        self.lease = task.lease
        self.slot = slot
        self.log = log_file
        self.proc: asyncio.subprocess.Process | None = None
        self.started = time.monotonic()
        self.stop_reason: str | None = None  #: set when the daemon ends the run itself
        self.start_ticks: int | None = None  #: when it was spawned, as /proc counts
        self.finished = False
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.workspace: Workspace | None = None  #: prepared for it, when its task asks for one


class Slot:
    """One of the daemon's own workers."""

    def __init__(self, index: int):
        self.name = f"sparkqd/{index}"
        self.run: Run | None = None
        self.done = 0
        self.restarts: collections.deque = collections.deque()
        self.restart_count = 0
        self.failed: str | None = None  #: why it was given up after too many restarts
        self.last_seen = time.time()


def interrupt_attempt(change, queue: Queue, task: Task, reason: str, clock=time.time) -> None:
    """Fail an attempt the daemon could not carry through (a worker that crashed, a workspace
    not delivered), if that attempt still holds the task; ``change`` is the daemon's."""
    try:
        change(lambda: queue.interrupt(task.id, reason, clock(), task.lease), 4096)
    except Unavailable as exc:
        log.error("task %d: cannot record its failed attempt: %s", task.id, exc)


class Pool:
    """The daemon's worker slots: claim runnable tasks through the core and run them.

    Each slot is a loop under a supervisor that restarts it when it dies, up to
    ``workers.max_restarts`` within ``workers.restart_window``, then reports it.
    Each run has its own process group, so a timeout or cancel ends its whole tree.
    Its collaborators: the queue (read only), ``handle`` and ``change`` (the daemon's
    request and change pipelines), the task logs, the watchers (worker events) and the
    daemon's clock.
    """

    def __init__(self, config: Config, queue: Queue, handle, change, logs: TaskLogs,
                 watchers: Watchers, socket_path: str, workspaces: Workspaces, clock=time.time):
        self.config = config
        self.clock = clock  #: the time of the changes it makes
        self.workspaces = workspaces  #: prepares a run's workspace (section 10)
        self.queue = queue
        self.handle = handle
        self.change = change
        self.logs = logs
        self.watchers = watchers
        self.socket_path = socket_path
        self.slots: list[Slot] = []
        self.loops: list[asyncio.Task] = []
        self.runs: dict[int, Run] = logs.runs
        self.wake = asyncio.Event()
        self.stopping = False
        #: tools the pool can run: only their tasks wake it
        self.runnable: frozenset[str] = frozenset()

    def reconfigure(self, config: Config) -> None:
        """Match the slots to ``workers.count`` and the tools it runs (start and reload)."""
        self.config = config
        self.runnable = frozenset(
            [name for name, tool in config.tools.items() if tool.command]
            + [SCRIPT_TOOL_PREFIX + name for name in self.queue.scripts])
        while len(self.slots) < config.workers.count:
            slot = Slot(len(self.slots) + 1)
            self.slots.append(slot)
            self.loops.append(asyncio.get_running_loop().create_task(self._supervise(slot)))
        self.wake.set()

    def active(self, slot: Slot) -> bool:
        return not self.stopping and self.slots.index(slot) < self.config.workers.count

    def on_commit(self, events: list[Event], queue: Queue) -> None:
        """Wake the slots for tasks they can run; end runs whose task moved on under them."""
        if self.slots and any(tool is None or tool in self.runnable
                              for _, tool in queue.index.became_ready):
            self.wake.set()
        for run in self.runs.values():
            task = queue.tasks.get(run.task_id)
            if run.stop_reason is None and (task is None or task.status != "running"
                                            or task.lease != run.lease):
                run.stop_reason = f"task {task.status if task else 'purged'} while it ran"
                asyncio.get_running_loop().create_task(self.stop_run(run, run.stop_reason))

    async def end_orphans(self) -> None:
        """Kill the runs a crashed daemon left behind, then record their attempts failed.

        Each kill waits (up to 5 s) for its group to be gone, in a thread of its own, so
        orphans are waited for together and the event loop is never put to sleep.
        """
        orphans = [t for t in self.queue.tasks.values() if t.status == "running" and t.run_pid]
        if not orphans:
            return
        loop = asyncio.get_running_loop()
        killed = await asyncio.gather(*(loop.run_in_executor(None, kill_orphan, t.run_pid,
                                                             t.run_start) for t in orphans))
        for task in (t for t, was_killed in zip(orphans, killed) if was_killed):
            log.warning("task %d: killed process group %d left by the previous daemon",
                        task.id, task.run_pid)

        def interrupt_all() -> None:
            for task in orphans:
                self.queue.interrupt(task.id, "interrupted: daemon stopped", self.clock())
        try:
            self.change(interrupt_all, 4096 * len(orphans))
        except Unavailable as exc:
            log.error("cannot record the attempts the previous daemon left running: %s; their "
                      "leases expire as usual", exc)

    async def _supervise(self, slot: Slot) -> None:
        while self.active(slot):
            try:
                await self._work(slot)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._gave_up(slot, exc):
                    return
                await asyncio.sleep(min(1.0, 0.05 * 2 ** len(slot.restarts)))

    def _gave_up(self, slot: Slot, exc: Exception) -> bool:
        """Count a worker loop's death; True once it died too often to restart again."""
        workers, now = self.config.workers, time.monotonic()
        slot.restarts.append(now)
        slot.restart_count += 1
        while slot.restarts and slot.restarts[0] < now - workers.restart_window:
            slot.restarts.popleft()
        log.exception("worker %s died; restart %d", slot.name, slot.restart_count)
        self.watchers.worker_event("worker.restarted", self.slot_record(slot))
        if len(slot.restarts) <= workers.max_restarts:
            return False
        slot.failed = (f"gave up after {len(slot.restarts)} restarts in "
                       f"{workers.restart_window:g} s; last error: {exc!r}")
        log.error("worker %s: %s", slot.name, slot.failed)
        return True

    async def _work(self, slot: Slot) -> None:
        self.watchers.worker_event("worker.started", self.slot_record(slot))
        while self.active(slot):
            task = self._claim(slot)
            if task is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            await self._run(slot, task)

    def runnable_tools(self) -> list[str]:
        """Tools with a command and room under their concurrency, and every script."""
        busy = collections.Counter(r.task.tool for r in self.runs.values())
        tools = [name for name, tool in self.config.tools.items()
                 if tool.command and (tool.concurrency is None or busy[name] < tool.concurrency)]
        return tools + [SCRIPT_TOOL_PREFIX + name for name in self.queue.scripts]

    def _claim(self, slot: Slot) -> Task | None:
        queue, wanted = self.queue, self.config.workers.streams
        streams = [s for s in (wanted if wanted is not None else queue.streams) if s in queue.streams]
        tools = self.runnable_tools()
        if not streams or not tools:
            return None
        slot.last_seen = time.time()
        try:
            return self.handle(Claim(stream=streams, tool=tools, worker=slot.name))
        except Unavailable:
            return None

    def command(self, task: Task) -> tuple[list[str], str | None, dict[str, str]]:
        """The argv, working directory and extra environment of a task's run."""
        if task.tool.startswith(SCRIPT_TOOL_PREFIX):
            name = task.tool[len(SCRIPT_TOOL_PREFIX):]
            script = self.queue.scripts.get(name)
            if script is None:
                raise LookupError(f"script {name!r} is no longer indexed")
            return [*script.argv, *(task.payload or [])], os.path.dirname(script.path), {}
        tool = self.config.tools.get(task.tool)
        if tool is None or not tool.command:
            raise LookupError(f"tool {task.tool!r} has no command any more")
        argv = [*tool.command, *([task.payload] if isinstance(task.payload, str) else [])]
        cwd = tool.cwd or self.config.project.repo_path
        return argv, cwd and os.path.expanduser(cwd), tool.env or {}

    def environment(self, task: Task, extra: dict[str, str]) -> dict[str, str]:
        """What every run sees: the daemon's environment less its private variables."""
        payload = task.payload
        return child_environment(**extra | {  # ours win over a tool's env of the same name
            "SPARKQ_TASK_ID": str(task.id), "SPARKQ_STREAM": task.stream,
            "SPARKQ_SESSION": self.queue.streams[task.stream].session, "SPARKQ_TOOL": task.tool,
            "SPARKQ_ATTEMPT": str(task.attempts), "SPARKQ_SOCKET": self.socket_path,
            "SPARKQ_PAYLOAD": payload if isinstance(payload, str) else
            msgspec.json.encode(payload).decode()})

    async def _run(self, slot: Slot, task: Task) -> None:
        """Run one claimed task; if the worker itself fails, the attempt fails with it."""
        try:
            await self._run_claimed(slot, task)
        except Exception as exc:
            interrupt_attempt(self.change, self.queue, task,
                              f"worker {slot.name} crashed: {exc!r}", self.clock)
            raise  # the supervisor counts it and restarts the loop

    async def _run_claimed(self, slot: Slot, task: Task) -> None:
        """Run one claimed task to its outcome; the core records what became of it."""
        log_file = TaskLog(self.logs.path(task.id), self.config.logs.max_bytes, task.attempts)
        run = slot.run = self.runs[task.id] = Run(task, slot, log_file)
        try:
            if await self._prepare(run) and await self._spawn(run):
                await self._watch(run, task.timeout)
                self._record(run, run.proc.returncode, run.stop_reason)
        finally:
            run.finished = True
            log_file.close()
            del self.runs[task.id]
            slot.run = None
            slot.done += 1
            slot.last_seen = time.time()
            self.logs.run_finished(task.id)
            self.wake.set()  # a concurrency slot may have freed

    async def _prepare(self, run: Run) -> bool:
        """Prepare the workspace a task asks for; a failure fails the attempt with git's reason."""
        if run.task.workspace is None:
            return True
        try:
            run.workspace = await self.workspaces.prepare(run.task, run.log.write)
            return True
        except Unavailable as exc:
            run.log.last.clear()  # the reason says what failed, with the output that matters
            self._record(run, None, f"workspace not prepared: {exc}")
            run.log.write(f"sparkqd: workspace not prepared: {exc}\n".encode())
        except asyncio.CancelledError:
            interrupt_attempt(self.change, self.queue, run.task, "interrupted by shutdown",
                              self.clock)
            raise
        return False

    async def _spawn(self, run: Run) -> bool:
        """Start the run's process in a group of its own and journal that group."""
        try:
            argv, cwd, extra = self.command(run.task)
            if run.workspace is not None:
                cwd = run.workspace.path
                extra = extra | workspace_environment(run.workspace, run.task)
            run.start_ticks = start_time_now()
            run.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, cwd=cwd, env=self.environment(run.task, extra),
                start_new_session=True)  # its own process group: a timeout ends the tree
        except (OSError, LookupError) as exc:
            message = exc.strerror if isinstance(exc, OSError) else str(exc)
            run.log.write(f"sparkqd: cannot start the run: {message}\n".encode())
            self._record(run, None, f"cannot start: {message}")
            return False
        # Journal the process group, so a crash cannot orphan it unseen.
        try:
            self.change(lambda: self.queue.run_started(run.task_id, run.proc.pid,
                                                       run.start_ticks, self.clock()), 4096)
        except Unavailable as exc:  # never a run the journal does not know of: end it now
            signal_group(run.proc.pid, signal.SIGKILL)
            await run.proc.wait()
            log.error("task %d: run killed, its process group cannot be journaled: %s; the "
                      "attempt ends when its lease expires", run.task_id, exc)
            return False
        return True

    async def _watch(self, run: Run, timeout: float) -> None:
        pump = asyncio.get_running_loop().create_task(self._pump(run))
        try:
            await asyncio.wait_for(asyncio.shield(run.proc.wait()), timeout)
        except TimeoutError:
            await self.stop_run(run, f"timed out after {timeout:g} s")
        # Members of the group left behind (a backgrounded child) do not outlive the run.
        signal_group(run.proc.pid, signal.SIGKILL)
        try:
            await asyncio.wait_for(pump, 5)
        except TimeoutError:
            log.warning("task %d: output still open 5 s after the run ended", run.task_id)

    async def _pump(self, run: Run) -> None:
        while chunk := await run.proc.stdout.read(65536):
            run.log.write(chunk)
            text = run.decoder.decode(chunk)
            if text:
                self.logs.chunk(run.task_id, text)

    async def stop_run(self, run: Run, reason: str) -> None:
        """SIGTERM the run's group, then SIGKILL after ``workers.kill_grace``."""
        if run.finished or run.proc is None:
            return
        run.stop_reason = run.stop_reason or reason
        signal_group(run.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(run.proc.wait()), self.config.workers.kill_grace)
        except TimeoutError:
            signal_group(run.proc.pid, signal.SIGKILL)
            await run.proc.wait()

    def _record(self, run: Run, code: int | None, stop_reason: str | None) -> None:
        """Complete or fail the attempt; refused quietly if the task moved on (cancelled)."""
        duration = round(time.monotonic() - run.started, 3)
        tail = "\n".join(run.log.lines(20))
        if stop_reason is None and code == 0:
            last = run.log.lines(1)
            request = Complete(task=run.task_id, summary=last[0] if last else None,
                               result={"exit_code": 0, "duration": duration}, lease=run.lease)
        else:
            why = stop_reason or (f"exit code {code}" if code >= 0 else f"killed by signal {-code}")
            request = Fail(task=run.task_id, reason=f"{why}: {tail}" if tail else why,
                           lease=run.lease)
        try:
            self.handle(request)
        except Conflict:
            pass  # cancelled, requeued or expired meanwhile: that decision stands
        except SparkQError as exc:
            log.error("task %d: cannot record its outcome: %s", run.task_id, exc)

    async def stop(self) -> None:
        """Stop claiming; end every run as "interrupted by shutdown" within the grace."""
        self.stopping = True
        self.wake.set()
        runs = list(self.runs.values())
        for run in runs:
            run.stop_reason = "interrupted by shutdown"
        await asyncio.gather(*(self.stop_run(run, "interrupted by shutdown") for run in runs))
        if self.loops:
            await asyncio.wait(self.loops, timeout=5)
        for loop_task in self.loops:
            loop_task.cancel()

    def slot_records(self) -> list[dict]:
        return [self.slot_record(slot) for slot in self.slots]

    def slot_record(self, s: Slot) -> dict:
        return {"name": s.name, "kind": "builtin", "pid": s.run.proc.pid if s.run and s.run.proc
                else None, "task": s.run.task_id if s.run else None,
                "state": "failed" if s.failed else "busy" if s.run else "idle",
                "done": s.done, "restarts": s.restart_count, "error": s.failed,
                "last_seen": rfc3339(s.last_seen)}

    def summary(self) -> dict:
        """The slots in numbers, for `status` and metrics."""
        return {"slots": len(self.slots), "busy": sum(1 for s in self.slots if s.run),
                "restarts": sum(s.restart_count for s in self.slots),
                "failed": {s.name: s.failed for s in self.slots if s.failed}}


# ============================================================================
# 10. Workspaces (git)
# ============================================================================
#
# A repository is cloned once, into <data dir>/workspaces/<repo>/main: an ordinary clone
# whose working tree is the shared workspace and whose objects and refs every task
# worktree (<repo>/tasks/<id>, made by `git worktree add`) shares. git runs as a
# subprocess of the event loop with a timeout, no shell and no prompt; what it made is
# reported to the core (WorkspaceBook) through the change pipeline, so the journal knows
# every directory. The collector, a duty of the daemon's one timer, removes a workspace
# only when nothing would be lost, or after saving what would be.

#: git's environment: never a prompt, plain messages, no lock taken by a mere `status`.
GIT_ENVIRONMENT = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "GIT_OPTIONAL_LOCKS": "0"}
TRASH_PREFIX = ".removing-"  #: a removed workspace's tree, until deleted in the background
COLLECT_EVERY = 3600.0  #: the collector looks at every workspace at least this often
RECHECK_IN_USE = 60.0  #: and this soon again while one is kept only because a process is in it


class WorkspaceFailed(Unavailable):
    """A workspace that cannot be prepared or removed: git's own words, or the disk budget."""


def workspace_environment(ws: Workspace, task: Task) -> dict[str, str]:
    """What a run, and its setup, learn of their workspace."""
    return {"SPARKQ_WORKSPACE": ws.path, "SPARKQ_REPO": task.repo or ws.url,
            "SPARKQ_REF": ws.ref or "", "SPARKQ_BRANCH": ws.branch or ""}


def workspace_id(task: Task) -> str:
    """The id of the workspace a task asks for: its own worktree's, or its repository's clone."""
    return str(task.id) if task.workspace == "worktree" else repo_key(task.repo)


def repo_dir(key: str) -> str:
    """A repository's directory under workspaces/, made of its key: safe as a path."""
    parts = [re.sub(r"[^\w.@+-]", "_", part) for part in key.split("/")
             if part not in ("", ".", "..")]
    return os.path.join(*parts) if parts else "_"  # a key of no usable part (a name like "/")


async def git(args: list[str], cwd: str, timeout: float, check: bool = True,
              raw: bool = False) -> tuple[int, Any]:
    """Run git in ``cwd``: (exit code, its output as text, or bytes if ``raw``). With
    ``check`` a failure raises WorkspaceFailed in git's own last words."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "git", *args, cwd=cwd, env=child_environment(**GIT_ENVIRONMENT),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
    except OSError as exc:
        raise WorkspaceFailed(f"git {args[0]} cannot start in {cwd}: {exc.strerror}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise WorkspaceFailed(f"git {args[0]}: no answer in {timeout:g} s (killed)") from None
    if check and proc.returncode:
        words = " ".join(err.decode(errors="replace").split()[-60:])
        raise WorkspaceFailed(f"git {args[0]}: {words or f'exit code {proc.returncode}'}")
    return proc.returncode, out if raw else out.decode(errors="replace")


def disk_usage(path: str) -> int:
    """Bytes a directory tree takes on disk, each file counted once (in a worker thread)."""
    total, seen, folders = 0, set(), [path]
    while folders:
        try:
            entries = list(os.scandir(folders.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry.path)
            elif st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def working_directories() -> dict[int, str]:
    """The working directory of every process this user may look at (in a worker thread)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found[int(entry)] = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                pass  # gone, or another user's
    return found


def processes_inside(path: str, cwds: dict[int, str]) -> list[int]:
    real = os.path.realpath(path)
    return sorted(pid for pid, cwd in cwds.items() if cwd == real or cwd.startswith(real + "/"))


def scan_workspaces(root: str, known: set[str]) -> tuple[list[str], list[str]]:
    """(checkouts under ``root`` no record names, trees of removed workspaces a crash left
    before they were deleted), never looking inside a checkout (in a worker thread)."""
    unrecorded, trash = [], []
    for folder, dirs, files in os.walk(root):
        if folder != root and (".git" in dirs or ".git" in files):
            if folder not in known:
                unrecorded.append(folder)
            dirs[:] = []
            continue
        trash += [os.path.join(folder, d) for d in dirs if d.startswith(TRASH_PREFIX)]
        repo_level = "main" in dirs or "tasks" in dirs
        dirs[:] = sorted(d for d in dirs if not (repo_level and d == "saved")
                         and not d.startswith(TRASH_PREFIX))
    return unrecorded, trash


def remove_empty_up_to(path: str, root: str) -> None:
    """Remove ``path`` and its parents while they are empty, up to ``root`` (in a thread)."""
    while path.startswith(root + "/"):
        try:
            os.rmdir(path)
        except OSError:
            return
        path = os.path.dirname(path)


def workspace_metrics(queue: Queue, sizes: dict[str, int]) -> list[str]:
    """The workspaces' lines of `metrics`: how many, by kind and state, and their bytes."""
    counts = collections.Counter((ws.kind, ws.state) for ws in queue.workspaces.records.values())
    used = collections.Counter()
    for ws in queue.workspaces.records.values():
        used[ws.kind] += sizes.get(ws.path, 0)
    return [*metric("sparkq_workspaces", "gauge", "Repository workspaces by kind and state.",
                    [f'sparkq_workspaces{{kind="{kind}",state="{state}"}} {n}'
                     for (kind, state), n in sorted(counts.items())]),
            *metric("sparkq_workspace_bytes", "gauge", "Disk used by workspaces, by kind.",
                    [f'sparkq_workspace_bytes{{kind="{kind}"}} {used[kind]}'
                     for kind in ("shared", "worktree")])]


def setup_command(config: Config, queue: Queue, task: Task) -> list[str] | None:
    """The setup of a new workspace: its tool's or script's, else its repository's."""
    if task.tool.startswith(SCRIPT_TOOL_PREFIX):
        script = queue.scripts.get(task.tool[len(SCRIPT_TOOL_PREFIX):])
        own = script and script.setup and shlex.split(script.setup)
    else:
        tool = config.tools.get(task.tool)
        own = tool and tool.setup
    if own:
        return own
    repos = {repo_key(name): repo for name, repo in config.workspaces.repos.items()}
    settings = repos.get(repo_key(task.repo))
    return settings and settings.setup

async def run_setup(config: Config, queue: Queue, task: Task, ws: Workspace,
                log_write) -> None:
    """Run the setup in a new workspace, its output in a section of the task's log."""
    argv = setup_command(config, queue, task)
    if not argv:
        return
    shown, limit = shlex.join(argv), config.workspaces.setup_timeout
    log_write(f"--- sparkqd: setup: {shown} (in {ws.path}) ---\n".encode())
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=ws.path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, env=child_environment(
                **workspace_environment(ws, task), SPARKQ_TASK_ID=str(task.id)))
    except OSError as exc:
        log_write(f"--- sparkqd: setup cannot start: {exc.strerror} ---\n".encode())
        raise WorkspaceFailed(f"setup `{shown}` cannot start: {exc.strerror}") from None
    tail = await setup_output(proc, log_write, limit)
    code = proc.returncode
    outcome = f"exited {code}" if code >= 0 else f"killed by signal {-code}"
    if tail is None:
        outcome, tail = f"timed out after {limit:g} s", ""
    log_write(f"--- sparkqd: setup {outcome} after {time.monotonic() - started:.1f} s ---\n"
              .encode())
    if code:
        raise WorkspaceFailed(f"setup `{shown}` {outcome}" + (f": {tail}" if tail else ""))

async def setup_output(proc, log_write, limit: float) -> str | None:
    """Copy a setup's output to the log until it exits; its last lines, None at a timeout."""
    last = bytearray()

    async def pump():
        while chunk := await proc.stdout.read(65536):
            log_write(chunk)
            last.extend(chunk)
            del last[:-2048]
        await proc.wait()
    try:
        await asyncio.wait_for(pump(), limit)
    except (TimeoutError, asyncio.CancelledError) as exc:
        signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        return None
    signal_group(proc.pid, signal.SIGKILL)  # what it left behind does not outlive it
    lines = [line for line in last.decode(errors="replace").splitlines() if line.strip()]
    return " | ".join(lines[-3:])


class WorkspaceDisk:
    """Where the workspaces live, and what their git work shares: a lock per repository, one
    thread, the background jobs shutdown cancels, and the sizes last measured."""

    def __init__(self, config: Config, book: WorkspaceBook, data_dir: str):
        self.config = config
        self.book = book
        self.root = os.path.join(data_dir, "workspaces")
        self.locks: dict[str, asyncio.Lock] = {}
        self.sizes: dict[str, int] = {}  #: path -> bytes, as last measured
        self.jobs: set[asyncio.Task] = set()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="workspaces")

    def home(self, key: str) -> str:
        return os.path.join(self.root, repo_dir(key))

    def main_path(self, key: str) -> str:
        return os.path.join(self.home(key), "main")

    @property
    def timeout(self) -> float:
        return self.config.workspaces.git_timeout

    def lock(self, key: str) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    async def thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def spawn(self, work) -> asyncio.Task:
        """Run a coroutine in the background; shutdown cancels what is left of it."""
        job = asyncio.get_running_loop().create_task(work)
        self.jobs.add(job)
        job.add_done_callback(self.jobs.discard)
        return job

    async def stop(self) -> None:
        """Cancel what is under way: a preparation cut short fails its attempt."""
        for job in list(self.jobs):
            job.cancel()
        if self.jobs:
            await asyncio.wait(list(self.jobs), timeout=5)
        self.executor.shutdown(wait=False)

    async def measure(self, paths: list[str]) -> None:
        for path in paths:
            if os.path.isdir(path):
                self.sizes[path] = await self.thread(disk_usage, path)
        live = {ws.path for ws in self.book.records.values()}
        for path in [p for p in self.sizes if p not in live]:
            del self.sizes[path]

    async def check_budget(self) -> None:
        """Refuse a new clone or worktree while the workspaces use ``max_bytes`` or more."""
        limit = self.config.workspaces.max_bytes
        if limit is None:
            return
        await self.measure([ws.path for ws in self.book.records.values()])
        used = sum(self.sizes.values())
        if used >= limit:
            raise WorkspaceFailed(f"workspaces use {used} bytes of workspaces.max_bytes {limit}: "
                                  f"no new workspace until some are collected or removed")


class WorkspaceCollector:
    """What nobody needs any more: saved if it holds work, then removed, hourly and on demand.

    Sizes are measured after a workspace is released and by each collection.
    """

    def __init__(self, config: Config, queue: Queue, change, disk: WorkspaceDisk, rearm,
                 clock=time.time):
        self.config = config
        self.clock = clock  #: the daemon's clock: collections are deadlines of its timer
        self.book = queue.workspaces
        self.change = change
        self.disk = disk
        self.rearm = rearm  #: tells the one timer of an earlier deadline
        self.collecting: asyncio.Task | None = None
        self.next_collect = 0.0

    # -- what is left behind ------------------------------------------------------------------

    async def unsaved(self, ws: Workspace) -> tuple[bool, int]:
        """(uncommitted changes?, commits and stashes no remote and not its ref holds)."""
        index = os.path.join(ws.path, ".git", "index")
        dirty = False
        if ws.kind == "worktree" or os.path.exists(index):
            _, changes = await git(["status", "--porcelain", "--untracked-files=normal"],
                                   ws.path, self.disk.timeout)
            dirty = bool(changes.strip())
        if ws.kind == "worktree":
            _, tip = await git(["for-each-ref", "--format=%(objectname)",
                                f"refs/heads/{ws.branch}"], ws.path, self.disk.timeout)
            base = await self._commit_of(ws)
            revs = ["HEAD", *tip.split(), "--not", *([base] if base else []), "--remotes"]
            stashes = 0
        else:
            revs = ["HEAD", "--branches", "--not", "--remotes", "--tags"]
            _, listed = await git(["stash", "list"], ws.path, self.disk.timeout)
            stashes = len(listed.splitlines())
        _, count = await git(["rev-list", "--count", *revs], ws.path, self.disk.timeout)
        return dirty, int(count or 0) + stashes

    async def _commit_of(self, ws: Workspace) -> str | None:
        """The commit a worktree's ref names now (after the collector's fetch), or None."""
        main = self.disk.main_path(ws.repo)
        for name in (f"refs/remotes/origin/{ws.ref}", f"refs/tags/{ws.ref}", ws.commit):
            code, out = await git(["rev-parse", "--verify", "--quiet", "--end-of-options",
                                   f"{name}^{{commit}}"], main, self.disk.timeout, check=False)
            if code == 0:
                return out.strip()
        return None

    async def _save(self, ws: Workspace) -> str | None:
        """Save what removing a workspace would lose under saved/: a patch of its changes (a
        worktree: all since its base commit, committed or not) and, for a shared clone, a
        bundle of its stashes and the commits no remote has. Where, or None if nothing."""
        saved = os.path.join(self.disk.home(ws.repo), "saved")
        name = ws.id if ws.kind == "worktree" else "main-" + time.strftime("%Y%m%dT%H%M%S")
        try:
            os.makedirs(saved, mode=0o700, exist_ok=True)
            paths = [await self._save_patch(ws, os.path.join(saved, f"{name}.patch"))]
            if ws.kind == "shared":
                paths.append(await self._save_bundle(ws, os.path.join(saved, f"{name}.bundle")))
        except OSError as exc:  # kept, then: nothing is removed that was not saved
            where = f" ({exc.filename})" if exc.filename else ""
            raise WorkspaceFailed(f"its changes cannot be saved: {exc.strerror}{where}") from None
        return ", ".join(p for p in paths if p) or None

    async def _save_patch(self, ws: Workspace, path: str) -> str | None:
        if ws.kind == "shared" and not os.path.exists(os.path.join(ws.path, ".git", "index")):
            return None  # never checked out: nothing uncommitted
        base = ws.commit if ws.kind == "worktree" else "HEAD"
        # Intent to add: new files show in the diff too.
        await git(["add", "--all", "--intent-to-add", "--", "."], ws.path, self.disk.timeout)
        _, diff = await git(["diff", "--binary", base, "--"], ws.path, self.disk.timeout, raw=True)
        if not diff.strip():
            return None
        _, commits = await git(["log", "--format=# commit %H %s", f"{base}..HEAD"], ws.path,
                               self.disk.timeout)
        header = (f"# sparkqd saved workspace {ws.id} ({ws.repo}, {ws.kind}, branch {ws.branch}, "
                  f"ref {ws.ref}) at {rfc3339(time.time())}\n# every change since {base}, "
                  f"committed or not; apply onto it with: git apply {os.path.basename(path)}\n"
                  + commits)
        await self.disk.thread(durable_write, path, header.encode() + diff)
        return path

    async def _save_bundle(self, ws: Workspace, path: str) -> str | None:
        _, stashes = await git(["stash", "list", "--format=%H"], ws.path, self.disk.timeout)
        for n, sha in enumerate(stashes.split()):  # each stash a ref, so the bundle holds it
            await git(["update-ref", f"refs/sparkq-saved/stash-{n}", sha], ws.path,
                      self.disk.timeout)
        await git(["bundle", "create", path, "HEAD", "--branches", "--glob=refs/sparkq-saved/*",
                   "--not", "--remotes", "--tags"], ws.path, self.disk.timeout, check=False)
        return path if os.path.exists(path) else None  # nothing to bundle: git made none

    async def remove(self, ws: Workspace, save: bool, reason: str) -> str | None:
        """Save (if asked) and remove a workspace and a worktree's branch; then record it."""
        main = self.disk.main_path(ws.repo)
        patch = await self._save(ws) if save and os.path.isdir(ws.path) else None
        holder = self.book.holder(self.book.records.get(ws.id, ws))
        if holder is not None:  # claimed again while its changes were saved
            raise WorkspaceFailed(f"its task {holder.id} is {holder.status} again")
        # Moved aside at once and deleted in the background: the repository's other work
        # waits for no tree of 10,000 files to be deleted.
        trash = os.path.join(self.disk.home(ws.repo), f"{TRASH_PREFIX}{ws.id.replace('/', '_')}-"
                                                 f"{time.monotonic_ns()}")
        if os.path.isdir(ws.path):
            os.rename(ws.path, trash)
        if ws.kind == "worktree" and os.path.isdir(main):
            await git(["worktree", "prune"], main, self.disk.timeout)
            await git(["branch", "-D", ws.branch], main, self.disk.timeout, check=False)
        await self.disk.thread(remove_empty_up_to, os.path.dirname(ws.path), self.disk.root)
        self.disk.sizes.pop(ws.path, None)
        self.change(lambda: self.book.removed(ws.id, reason, patch, time.time()), 8192)
        if os.path.isdir(trash):
            self.disk.spawn(self.disk.thread(shutil.rmtree, trash, True))
        log.info("workspace %s removed: %s%s", ws.id, reason, f"; saved {patch}" if patch else "")
        return patch

    # -- the collector -----------------------------------------------------------------------

    def due(self, now: float) -> float:
        """The collector's turn on the daemon's one timer: started when due; its next time."""
        if now >= self.next_collect and self.collecting is None:
            self.next_collect = now + COLLECT_EVERY
            self.collecting = self.disk.spawn(self._collect_on_timer())
        return self.next_collect

    async def _collect_on_timer(self) -> None:
        report = None
        try:
            report = await self.collect()
        except Exception:
            log.exception("workspace collection failed; retried within the hour")
        finally:
            self.collecting = None
        # (min: a release during the collection asked for another soon)
        self.next_collect = min(self.next_collect, self._next_collection(report))
        self.rearm(self.next_collect)

    def _next_collection(self, report: dict | None) -> float:
        """An hour from now, sooner while a workspace is kept only for a process in it, and
        when an idle one's keep_days (a worktree) or prune_days (a clone) run out."""
        now, days = time.time(), self.config.workspaces
        times = [now + COLLECT_EVERY]
        if report and any(kept["why"].startswith("in use") for kept in report["kept"]):
            times.append(now + RECHECK_IN_USE)
        for ws in self.book.records.values():
            keep = days.keep_days if ws.kind == "worktree" else days.prune_days
            if ws.state == "idle" and self._last_use(ws) + keep * DAY > now:  # (past: kept for
                times.append(self._last_use(ws) + keep * DAY)  # another reason, seen hourly)
        return min(times)

    @staticmethod
    def _last_use(ws: Workspace) -> float:
        return max(ws.created_at, ws.updated_at or 0, ws.released_at or 0)  # as Replies says

    async def collect(self, dry_run: bool = False) -> dict:
        """Remove every workspace nobody needs, saving first what it would lose; says what it
        removed (or would) and what it kept, and why."""
        cwds = await self.disk.thread(working_directories)
        report = {"dry_run": dry_run, "removed": [], "kept": []}
        fetched: set[str] = set()
        # Worktrees first: a shared clone goes only once the worktrees made from it have.
        for ws_id in sorted(self.book.records, key=lambda i: self.book.records[i].kind == "shared"):
            ws = self.book.records.get(ws_id)
            if ws is None:
                continue
            async with self.disk.lock(ws.repo):
                ws = self.book.records.get(ws_id)
                if ws is not None:
                    await self._collect_one(ws, cwds, fetched, report)
        await self.disk.measure([ws.path for ws in self.book.records.values()])
        return report

    async def _collect_one(self, ws: Workspace, cwds: dict, fetched: set, report: dict) -> None:
        try:
            kept, reason, save = await self._verdict(ws, cwds, fetched)
            entry = {"id": ws.id, "repo": ws.repo, "kind": ws.kind, "path": ws.path}
            if kept is not None:
                report["kept"].append({**entry, "why": kept})
                return
            patch = None if report["dry_run"] else await self.remove(ws, save, reason)
            report["removed"].append({**entry, "reason": reason, "patch": patch})
        except WorkspaceFailed as exc:
            log.warning("workspace %s kept: %s", ws.id, exc)
            report["kept"].append({"id": ws.id, "repo": ws.repo, "kind": ws.kind,
                                   "path": ws.path, "why": f"cannot look at it: {exc}"})

    async def _verdict(self, ws: Workspace, cwds: dict, fetched: set) -> tuple:
        """(why it is kept, or None; why it goes; whether to save its changes first)."""
        holder = self.book.holder(ws)
        if holder is not None:
            return f"its task {holder.id} is {holder.status}", None, False
        if not os.path.isdir(ws.path):
            return None, "its directory was gone", False
        pids = processes_inside(ws.path, cwds)
        if pids:
            return f"in use: process {pids[0]} works inside it", None, False
        idle = time.time() - self._last_use(ws)
        if ws.kind == "shared":
            return self._shared_verdict(ws, idle)
        if ws.repo not in fetched:  # merged upstream counts: look once per repository
            fetched.add(ws.repo)
            await git(["fetch", "--prune", "--quiet", "origin"], self.disk.main_path(ws.repo),
                      self.disk.timeout, check=False)
        dirty, unmerged = await self.unsaved(ws)
        if not dirty and not unmerged:
            return None, "its task ended, its tree is clean and its branch merged or pushed", False
        if idle > self.config.workspaces.keep_days * DAY:
            return None, f"idle for {idle / DAY:.2f} days", True
        why = "uncommitted changes" if dirty else (
            f"{unmerged} commits on {ws.branch} not in {ws.ref} nor pushed")
        return why, None, False

    def _shared_verdict(self, ws: Workspace, idle: float) -> tuple:
        worktrees = len(self.book.of_repo(ws.repo)) - 1
        if worktrees:
            return f"{worktrees} worktrees of it remain", None, False
        if idle <= self.config.workspaces.prune_days * DAY:
            return f"used {idle / DAY:.2f} days ago", None, False
        return None, f"unused for {idle / DAY:.2f} days", True

    def on_commit(self, events: list[Event], queue: Queue) -> None:
        """A released workspace is measured; one whose task ended is collected soon."""
        for event in events:
            if type(event) is WorkspaceReleased and event.workspace in self.book.records:
                self.disk.spawn(self.disk.measure([self.book.records[event.workspace].path]))
                task = queue.tasks.get(event.task)
                if task is None or task.status in TERMINAL:
                    self.next_collect = min(self.next_collect, self.clock() + 1.0)
                    self.rearm(self.next_collect)


class Workspaces:
    """The repositories' clones and worktrees, prepared for claimed tasks; requests about them.

    Git work on one repository is serialised (an asyncio lock per repository), so a
    fetch never races a worktree being added or removed; repositories never wait for
    each other. Sizes are measured after a workspace is prepared, and before a new one is
    made under a budget.
    """

    def __init__(self, config: Config, queue: Queue, change, logs: TaskLogs,
                 disk: WorkspaceDisk, collector: WorkspaceCollector):
        self.config = config
        self.queue = queue
        self.book = queue.workspaces
        self.change = change
        self.logs = logs
        self.disk = disk
        self.collector = collector
        self.unrecorded: list[str] = []  #: checkouts no record names, found at start

    def _report(self, fn, room: int = 8192):
        """Hand what git made to the core, through the change pipeline."""
        return self.change(fn, room)

    def _release_abandoned(self, bindings: list[tuple[str, int]]) -> None:
        """Release each (workspace, task) whose task no longer runs (see ``abandoned``)."""
        def release() -> None:
            for ws_id, task_id in bindings:
                self.book.abandoned(ws_id, task_id, time.time())
        try:
            self._report(release, 1024 * len(bindings))
        except Unavailable as exc:
            log.error("cannot record workspaces released: %s; the next start does", exc)

    # -- preparing a claimed task's workspace ----------------------------------------------

    async def prepare(self, task: Task, log_write) -> Workspace:
        """Make the workspace a claimed task asks for ready, and bind it to that attempt.

        Raises WorkspaceFailed with the reason (git's words, the budget, a setup that
        failed): the caller fails the attempt with it. A workspace made for an attempt that
        ended meanwhile is released here: that attempt's end came before its record.
        """
        bound = False
        try:
            async with self.disk.lock(repo_key(task.repo)):
                ws, fields = await self._make_ready(task, log_write)
                bound = self._report(lambda: self.book.ready(ws.id, task.id, task.lease,
                                                             time.time(), **fields))
        except OSError as exc:
            raise WorkspaceFailed(f"{exc.filename or 'workspace'}: {exc.strerror}") from None
        except SparkQError as exc:
            raise exc if isinstance(exc, Unavailable) else WorkspaceFailed(str(exc)) from None
        finally:
            if not bound:
                self._release_abandoned([(workspace_id(task), task.id)])
        if not bound:
            raise WorkspaceFailed(f"task {task.id} moved on while its workspace was prepared")
        self.disk.spawn(self.disk.measure([ws.path, self.disk.main_path(ws.repo)]))
        return self.book.records[ws.id]

    async def _make_ready(self, task: Task, log_write) -> tuple[Workspace, dict]:
        """Clone or fetch, resolve the ref, reset the shared tree or add the worktree, set up."""
        key = repo_key(task.repo)
        fresh = await self._clone_or_fetch(task, key)
        ref, commit, branch = await self._resolve(task, key)
        if task.workspace == "shared":
            fields = await self._reset_shared(task, key, ref, commit, branch)
            ws = self.book.records[key]
        else:
            ws = await self._worktree(task, key, ref, commit)
            fields = {"ref": ws.ref, "commit": ws.commit, "branch": ws.branch}
            if not fresh:
                self._report(lambda: self.book.fetched(key, time.time()))
        if not ws.ready:
            await run_setup(self.config, self.queue, task, msgspec.structs.replace(ws, **fields),
                            log_write)
        return ws, fields

    async def _clone_or_fetch(self, task: Task, key: str) -> bool:
        """Make sure the shared clone exists and is fetched; True if it was just cloned."""
        main, ws = self.disk.main_path(key), self.book.records.get(key)
        if ws is not None and not os.path.isdir(main):
            log.warning("workspace %s: %s is gone; cloning again", key, main)
            self._report(lambda: self.book.removed(key, "its directory was gone", None,
                                                   time.time()))
            ws = None
        if ws is None and os.path.isdir(os.path.join(main, ".git")):
            log.warning("workspace %s: %s has no record (a crash after its clone); using it",
                        key, main)
            self._record_clone(task, key)
            ws = self.book.records[key]
        if ws is not None:
            await git(["fetch", "--prune", "--quiet", "origin"], main, self.disk.timeout)
            return False
        await self.disk.check_budget()
        await self._clone(task, key)
        return True

    async def _clone(self, task: Task, key: str) -> None:
        """Clone into a temporary name, renamed into place whole."""
        home, main = self.disk.home(key), self.disk.main_path(key)
        partial = os.path.join(home, ".main.cloning")
        os.makedirs(home, mode=0o700, exist_ok=True)
        if os.path.exists(partial):
            log.warning("workspace %s: removing %s, a clone cut short", key, partial)
            await self.disk.thread(shutil.rmtree, partial)
        # Without a checkout: a worktree task never needs the shared tree, a shared one
        # checks its ref out next.
        await git(["clone", "--no-checkout", "--quiet", "--", task.repo, partial], home,
                  self.disk.timeout)
        os.rename(partial, main)
        self._record_clone(task, key)

    def _record_clone(self, task: Task, key: str) -> None:
        shared = task.workspace == "shared"
        self._report(lambda: self.book.created(key, key, "shared", self.disk.main_path(key),
                                               task.repo, time.time(),
                                               task=task.id if shared else None))

    async def _resolve(self, task: Task, key: str) -> tuple[str, str, str | None]:
        """(ref, its commit, the branch it is or None) in the freshly fetched clone."""
        main, ref = self.disk.main_path(key), task.ref
        if ref is None:
            code, out = await git(["symbolic-ref", "--quiet", "refs/remotes/origin/HEAD"], main,
                                  self.disk.timeout, check=False)
            if code:
                raise WorkspaceFailed(f"{task.repo} has no default branch: give the task a ref")
            ref = out.strip().removeprefix("refs/remotes/origin/")
        for name, branch in ((f"refs/remotes/origin/{ref}", ref), (f"refs/tags/{ref}", None),
                             (ref, None)):
            code, out = await git(["rev-parse", "--verify", "--quiet", "--end-of-options",
                                   f"{name}^{{commit}}"], main, self.disk.timeout, check=False)
            if code == 0:
                return ref, out.strip(), branch
        raise WorkspaceFailed(f"ref {ref!r} is not a branch, tag or commit of {task.repo}")

    async def _reset_shared(self, task: Task, key: str, ref: str, commit: str,
                            branch: str | None) -> dict:
        """Put the shared tree at ``ref``; what the last task left there is kept first."""
        main = self.disk.main_path(key)
        kept = await self._keep_leftovers(task, key) if os.path.exists(
            os.path.join(main, ".git", "index")) else None  # a fresh clone has no checkout yet
        target = ["-B", branch, f"refs/remotes/origin/{branch}"] if branch else ["--detach", commit]
        await git(["checkout", "--force", "--quiet", *target], main, self.disk.timeout)
        await self._submodules(main)
        return {"ref": ref, "commit": commit, "branch": branch, "stash": kept}

    async def _keep_leftovers(self, task: Task, key: str) -> str | None:
        """Stash the changes the previous task left in the shared tree, and keep its commits
        no remote has on a branch: never discarded. Says what it kept, or None."""
        main, last = self.disk.main_path(key), self.book.records[key].task
        by = f"task {last}" if last is not None else "someone"
        kept = []
        _, changes = await git(["status", "--porcelain", "--untracked-files=normal"], main,
                               self.disk.timeout)
        if changes.strip():
            message = f"sparkq: left by {by} before task {task.id}"
            await git(["stash", "push", "--include-untracked", "--quiet", "--message", message],
                      main, self.disk.timeout)
            kept.append(f"stashed {message!r}")
        _, ahead = await git(["rev-list", "--count", "HEAD", "--not", "--remotes", "--tags"],
                             main, self.disk.timeout)
        if int(ahead or 0):
            name = f"sparkq/kept-{last if last is not None else 'x'}-before-{task.id}"
            await git(["branch", "--force", name, "HEAD"], main, self.disk.timeout)
            kept.append(f"{int(ahead)} commits kept on branch {name}")
        if kept:
            log.info("workspace %s: before task %d: %s", key, task.id, "; ".join(kept))
        return "; ".join(kept) or None

    async def _worktree(self, task: Task, key: str, ref: str, commit: str) -> Workspace:
        """The task's own worktree, on branch sparkq/<id>: an earlier attempt's, or a new one."""
        ws_id, branch = str(task.id), f"sparkq/{task.id}"
        path = os.path.join(self.disk.home(key), "tasks", ws_id)
        ws = self.book.records.get(ws_id)
        if ws is not None and os.path.isdir(path):
            return ws  # as the earlier attempt left it
        if ws is not None:
            self._report(lambda: self.book.removed(ws_id, "its directory was gone", None,
                                                   time.time()))
        main = self.disk.main_path(key)
        if os.path.lexists(path):
            _, head = await git(["rev-parse", "--abbrev-ref", "HEAD"], path, self.disk.timeout,
                                check=False)
            if head.strip() != branch:
                raise WorkspaceFailed(f"{path} exists and is not task {task.id}'s worktree: "
                                      f"move it away")
            log.warning("workspace %s: %s has no record (a crash after it was made); using it",
                        ws_id, path)
        else:
            await self.disk.check_budget()
            await self._add_worktree(main, path, branch, commit)
        self._report(lambda: self.book.created(ws_id, key, "worktree", path, task.repo,
                                               time.time(), task=task.id, branch=branch,
                                               ref=ref, commit=commit))
        await self._submodules(path)
        return self.book.records[ws_id]

    async def _add_worktree(self, main: str, path: str, branch: str, commit: str) -> None:
        """`git worktree add`: a new branch at ``commit``, or the task's branch if it is left."""
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        code, _ = await git(["rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"], main,
                            self.disk.timeout, check=False)
        if code == 0:  # its commits outlived its worktree: check them out again, lose nothing
            await git(["worktree", "prune"], main, self.disk.timeout)
            await git(["worktree", "add", "--quiet", path, branch], main, self.disk.timeout)
        else:
            await git(["worktree", "add", "--quiet", "-b", branch, path, commit], main,
                      self.disk.timeout)

    async def _submodules(self, path: str) -> None:
        if os.path.exists(os.path.join(path, ".gitmodules")):
            await git(["submodule", "update", "--init", "--recursive", "--quiet"], path,
                      self.disk.timeout)

    # -- a claim over the socket: answered once its workspace is ready ----------------------

    def answer_claim(self, conn: Connection, request: Request, task: Task, result) -> object:
        """Hold a claim's reply until the claimed task's workspace is prepared; WAITING."""
        if isinstance(conn.blocked, Waiter):
            conn.blocked.end()  # a claim that waited: its deadline must not answer now
        waiter = Waiter(conn, request, None, lambda: result(None))
        conn.block(waiter)
        self.disk.spawn(self._prepare_claimed(waiter, task, result))
        return WAITING

    async def _prepare_claimed(self, waiter: Waiter, task: Task, result) -> None:
        log_file = TaskLog(self.logs.path(task.id), self.config.logs.max_bytes, 1)
        error = None
        try:
            await self.prepare(task, log_file.write)
        except Unavailable as exc:  # (the journal's too: the attempt cannot be bound)
            error = exc
        except asyncio.CancelledError:
            interrupt_attempt(self.change, self.queue, task,
                              "interrupted by shutdown while its workspace was prepared")
            raise
        finally:
            log_file.close()
        if error is not None:
            interrupt_attempt(self.change, self.queue, task, f"workspace not prepared: {error}")
        elif not waiter.active:
            interrupt_attempt(self.change, self.queue, task,
                              "its claimer went away while its workspace was prepared")
        if not waiter.active:
            return
        if error is None:
            waiter.conn.finish(waiter.request.id, result(self.queue.tasks.get(task.id)))
        elif waiter.changed_already:  # a claim_next: the finish stands, with no next task
            waiter.conn.finish(waiter.request.id, waiter.expire())
        else:
            waiter.conn.finish_error(waiter.request.id, WorkspaceFailed(
                f"task {task.id} claimed, but its workspace cannot be prepared: {error}; the "
                f"attempt failed (retried if attempts remain): claim again"))

    def later(self, conn: Connection | None, request: Request, work) -> object:
        """Answer ``request`` with what ``work`` (a coroutine) returns; its connection waits."""
        if conn is None or not conn.can_wait():
            work.close()
            raise Unavailable(f"{request.__struct_config__.tag} needs a connection that waits")
        waiter = Waiter(conn, request, None, None)
        conn.block(waiter)
        self.disk.spawn(self._answer_later(waiter, work))
        return WAITING

    async def _answer_later(self, waiter: Waiter, work) -> None:
        try:
            result = await work
        except SparkQError as exc:
            if waiter.active:
                waiter.conn.finish_error(waiter.request.id, exc)
            return
        except Exception as exc:
            log.exception("workspace request failed")
            if waiter.active:
                waiter.conn.finish_error(waiter.request.id, SparkQError(f"internal error: {exc!r}"))
            return
        if waiter.active:
            waiter.conn.finish(waiter.request.id, result)

    # -- requests -------------------------------------------------------------------------------

    def answer(self, request: Request, conn: Connection | None) -> Any:
        """A ``workspace.*`` request: the daemon's dispatch hands each of them here."""
        match request:
            case WorkspaceList(): return self.listing(request)
            case WorkspaceShow(): return self.show(request)
            case WorkspaceRemove(): return self.remove(request, conn)
            case WorkspaceGc(): return self.gc(request, conn)

    def listing(self, req: WorkspaceList) -> list:
        key = req.repo and repo_key(req.repo)
        found = [ws for ws in self.book.records.values() if key is None or ws.repo == key]
        return sorted(found, key=lambda ws: (ws.repo, ws.kind != "shared", ws.created_at))

    def show(self, req: WorkspaceShow) -> dict:
        """One task's worktree, or a repository's clone and worktrees; with the saved files."""
        if req.workspace.isdigit():
            ws = self.book.named(req.workspace)
            key, found = ws.repo, [ws]
        else:
            key = repo_key(req.workspace)
            found = sorted(self.book.of_repo(key), key=lambda ws: ws.kind != "shared")
        saved = os.path.join(self.disk.home(key), "saved")
        names = sorted(os.listdir(saved)) if os.path.isdir(saved) else []
        if req.workspace.isdigit():
            names = [n for n in names if n.startswith(f"{req.workspace}.")]
        elif not found and not names:
            raise NotFound(f"no workspace of repository {key}")
        return {"repo": key, "path": self.disk.home(key), "workspaces": found,
                "saved": [os.path.join(saved, n) for n in names]}

    def remove(self, req: WorkspaceRemove, conn: Connection | None) -> object:
        """`workspace rm`: refused while its task runs; what it would lose refuses it too,
        unless ``force``, which saves that first."""
        ws = self.book.named(req.workspace)
        self._check_removable(ws)
        return self.later(conn, req, self._remove_by_hand(ws.id, req.force))

    def _check_removable(self, ws: Workspace) -> None:
        holder = self.book.holder(ws)
        if holder is not None:
            raise Conflict(f"workspace {ws.id} belongs to task {holder.id}, which is "
                           f"{holder.status}: remove it once the task has ended")
        if ws.kind == "shared" and len(self.book.of_repo(ws.repo)) > 1:
            raise Conflict(f"worktrees of {ws.repo} remain: remove them first")

    async def _remove_by_hand(self, ws_id: str, force: bool) -> dict:
        async with self.disk.lock(self.book.named(ws_id).repo):
            ws = self.book.named(ws_id)
            self._check_removable(ws)
            problems = []
            if os.path.isdir(ws.path):
                pids = processes_inside(ws.path, await self.disk.thread(working_directories))
                dirty, unmerged = await self.collector.unsaved(ws)
                problems = [why for why, found in (
                    (f"process {pids[0] if pids else 0} works inside it", pids),
                    ("it has uncommitted changes", dirty),
                    (f"{unmerged} commits or stashes no remote holds", unmerged)) if found]
            if problems and not force:
                raise Conflict(f"workspace {ws.id} kept: {'; '.join(problems)} (--force saves "
                               f"its changes under saved/, then removes it)")
            reason = "removed by hand" + (f", forced: {'; '.join(problems)}" if problems else "")
            patch = await self.collector.remove(ws, bool(problems), reason)
        return {"removed": ws.id, "path": ws.path, "patch": patch}

    def gc(self, req: WorkspaceGc, conn: Connection | None) -> object:
        return self.later(conn, req, self.collector.collect(req.dry_run))

    def summary(self) -> dict:
        """The workspaces in numbers, for `status`."""
        records = self.book.records.values()
        return {"count": len(records), "bytes": sum(self.disk.sizes.values()),
                "worktrees": sum(1 for ws in records if ws.kind == "worktree"),
                "unrecorded": self.unrecorded}

    # -- start and stop ---------------------------------------------------------------------------

    async def start(self) -> None:
        """At startup: report checkouts that no record names (never removed), and end the
        attempts whose workspace a crash left half prepared (their claimer never heard)."""
        if os.path.isdir(self.disk.root):
            known = {ws.path for ws in self.book.records.values()}
            self.unrecorded, trash_found = await self.disk.thread(scan_workspaces, self.disk.root,
                                                                  known)
            for trash in trash_found:
                log.info("deleting %s: a removed workspace's tree, moved aside before a crash",
                         trash)
                self.disk.spawn(self.disk.thread(shutil.rmtree, trash, True))
        for path in self.unrecorded:
            log.warning("workspace directory %s has no record (a crash while it was made, or "
                        "made by hand): left as it is; remove it yourself if nothing in it is "
                        "needed", path)
        for ws in self.book.records.values():
            if not os.path.isdir(ws.path):
                log.warning("workspace %s: its directory %s is gone; the collector forgets it",
                            ws.id, ws.path)
        stuck = [t for t in self.queue.tasks.values() if t.status == "running" and t.workspace
                 and getattr(self.book.of_task(t), "state", None) != "active"]
        for task in stuck:
            interrupt_attempt(self.change, self.queue, task,
                              "interrupted: daemon stopped while its workspace was prepared")
        left = [(ws.id, ws.task) for ws in self.book.records.values() if ws.state != "idle"]
        if left:  # (only those whose task no longer runs are released)
            self._release_abandoned(left)
        self.disk.spawn(self.disk.measure([ws.path for ws in self.book.records.values()]))



# ============================================================================
# 11. Observers: stats, metrics, watchers, task logs, workers, hooks
# ============================================================================

FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
DURATION_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86400.0)
WATCH_MAX_EVENTS = 1000
WATCH_MAX_BYTES = 4 << 20
WATCH_KEPT = 10_000  #: the latest events kept for subscribers that resume
#: Bytes of replies one connection may have waiting (ours and the transport's) before the
#: daemon stops answering its further requests until it reads: one client's fixed budget.
REPLY_BUDGET = 1 << 20
EVENT = object()  #: the request id of a queued subscription event, which has none
#: The event a subscriber sees for each journaled event.
WATCH_EVENTS = {
    TaskEnqueued: "task.created", TaskReleased: "task.pending", TaskRequeued: "task.pending",
    TaskClaimed: "task.claimed", TaskTouched: "task.touched", TaskCompleted: "task.completed",
    TaskFailed: "task.failed", TaskRetrying: "task.retrying", TaskCancelled: "task.cancelled",
    StreamPaused: "stream.paused", StreamResumed: "stream.resumed",
    ScheduleCreated: "schedule.created", ScheduleChanged: "schedule.changed",
    ScheduleRemoved: "schedule.removed", SchedulePaused: "schedule.paused",
    ScheduleResumed: "schedule.resumed", ScheduleFired: "schedule.fired",
    ScheduleSkipped: "schedule.skipped",
}
TASK_WATCH_EVENTS = {kind: name for kind, name in WATCH_EVENTS.items() if name.startswith("task.")}
#: Workspace lifecycle events, as subscribers see them.
WORKSPACE_WATCH_EVENTS = {
    WorkspaceCreated: "workspace.created", WorkspaceUpdated: "workspace.updated",
    WorkspaceReleased: "workspace.released", WorkspaceRemoved: "workspace.removed",
}
EVENT_TYPES = {*WATCH_EVENTS.values(), "worker.started", "worker.restarted", "config.reloaded",
               *WORKSPACE_WATCH_EVENTS.values()}
OUTCOMES = {TaskCompleted: "completed", TaskFailed: "failed", TaskCancelled: "cancelled"}


class Histogram:
    """A Prometheus histogram: counts per upper bound, a sum and a count."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {running}"]


class Stats:
    """Counters and histograms fed by every event the daemon commits."""

    def __init__(self):
        self.enqueued = 0
        self.claimed = 0
        self.finished: collections.Counter = collections.Counter()  #: (stream, outcome)
        self.firings: collections.Counter = collections.Counter()  #: (schedule, outcome)
        self.wait = Histogram(DURATION_BUCKETS)
        self.run = Histogram(DURATION_BUCKETS)

    def on_commit(self, events: list[Event], queue: Queue) -> None:
        for event, task in zip(events, queue.event_states):  # each task as its event left it
            kind = type(event)
            if kind is TaskEnqueued:
                self.enqueued += 1
            elif kind is TaskClaimed:
                self.claimed += 1
                if task is not None:
                    self.wait.observe(max(0.0, event.at - task.created_at))
            elif kind in OUTCOMES:
                if task is not None:
                    self.finished[task.stream, OUTCOMES[kind]] += 1
                    if task.started_at is not None and kind is not TaskCancelled:
                        self.run.observe(max(0.0, event.at - task.started_at))
            elif kind is ScheduleFired:
                self.firings[event.name, "fired"] += 1
            elif kind is ScheduleSkipped:
                why = event.why.partition(":")[0]
                self.firings[event.name, f"skipped_{why}"] += event.count
                if event.count > 1 or why == "error":
                    log.warning("schedule %s: %d slot(s) from %s skipped: %s", event.name,
                                event.count, rfc3339(event.slot), event.why)


def metric(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(queue: Queue, stats: Stats, journal: Journal, pool: Pool,
                   snapshots: Snapshots, watchers: Watchers, started: float) -> str:
    """The daemon's state in the Prometheus text exposition format."""
    lines = [*task_metrics(queue, stats), *upkeep_metrics(journal, pool, snapshots),
             *schedule_and_server_metrics(queue, stats, watchers, started)]
    return "\n".join(lines) + "\n"


def task_metrics(queue: Queue, stats: Stats) -> list[str]:
    """Tasks by status, how they ended, and how long they waited and ran."""
    return [
        *metric("sparkq_tasks", "gauge", "Tasks by stream and status.",
                [f'sparkq_tasks{{stream="{label(stream)}",status="{status}"}} {n}'
                 for stream, counts in queue.index.counts.items() for status, n in counts.items()]),
        *metric("sparkq_tasks_finished_total", "counter", "Tasks that ended, by outcome.",
                [f'sparkq_tasks_finished_total{{stream="{label(stream)}",outcome="{outcome}"}} {n}'
                 for (stream, outcome), n in sorted(stats.finished.items())]),
        *metric("sparkq_enqueued_total", "counter", "Tasks enqueued.",
                [f"sparkq_enqueued_total {stats.enqueued}"]),
        *metric("sparkq_claimed_total", "counter", "Tasks claimed.",
                [f"sparkq_claimed_total {stats.claimed}"]),
        *metric("sparkq_queue_wait_seconds", "histogram", "From enqueue to claim.",
                stats.wait.lines("sparkq_queue_wait_seconds")),
        *metric("sparkq_run_seconds", "histogram", "From claim to completed or failed.",
                stats.run.lines("sparkq_run_seconds")),
    ]


def upkeep_metrics(journal: Journal, pool: Pool, snapshots: Snapshots) -> list[str]:
    """The journal's fsyncs, the last snapshot, and the daemon's worker slots."""
    workers = pool.summary()
    failed = len(workers["failed"])
    return [
        *metric("sparkq_journal_fsync_seconds", "histogram", "Journal fsync latency.",
                journal.fsync_seconds.lines("sparkq_journal_fsync_seconds")),
        *metric("sparkq_snapshot_duration_seconds", "gauge", "Duration of the last snapshot.",
                [f"sparkq_snapshot_duration_seconds {snapshots.last['seconds'] or 0}"]),
        *metric("sparkq_snapshot_age_seconds", "gauge", "Seconds since the last snapshot.",
                [f"sparkq_snapshot_age_seconds {time.time() - snapshots.taken_at:.3f}"]),
        *metric("sparkq_workers", "gauge", "The daemon's worker slots by state.",
                [f'sparkq_workers{{state="busy"}} {workers["busy"]}',
                 f'sparkq_workers{{state="idle"}} {workers["slots"] - workers["busy"] - failed}',
                 f'sparkq_workers{{state="failed"}} {failed}']),
        *metric("sparkq_worker_restarts_total", "counter", "Worker loops restarted.",
                [f"sparkq_worker_restarts_total {workers['restarts']}"]),
    ]


def schedule_and_server_metrics(queue: Queue, stats: Stats, watchers: Watchers,
                                started: float) -> list[str]:
    """Schedules' firings and next fires, locks held, subscribers and uptime."""
    return [
        *metric("sparkq_schedule_firings_total", "counter",
                "Schedule slots since start, by outcome (fired, skipped_overlap, skipped_missed, "
                "skipped_paused, skipped_error).",
                [f'sparkq_schedule_firings_total{{schedule="{label(name)}",outcome="{outcome}"}} {n}'
                 for (name, outcome), n in sorted(stats.firings.items())]),
        *metric("sparkq_schedule_next_fire_timestamp_seconds", "gauge",
                "When each active schedule fires next (Unix time).",
                [f'sparkq_schedule_next_fire_timestamp_seconds{{schedule="{label(s.name)}"}} '
                 f'{queue.schedules.due_at(s, s.next_slot):.3f}'
                 for s in queue.schedules.by_name.values()
                 if s.next_slot is not None and not s.paused]),
        *metric("sparkq_locks_held", "gauge", "Locks held by running tasks.",
                [f"sparkq_locks_held {len(queue.index.lock_holder)}"]),
        *metric("sparkq_subscribers", "gauge", "Connections watching events.",
                [f"sparkq_subscribers {len(watchers.subscriptions)}"]),
        *metric("sparkq_uptime_seconds", "gauge", "Seconds since the daemon started.",
                [f"sparkq_uptime_seconds {time.time() - started:.3f}"]),
    ]


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` so that a reader sees the old or the new file, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(temp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temp, path)


class Subscription:
    """What one `watch` asked to see."""

    def __init__(self, req: Watch):
        self.streams = set(req.streams) if req.streams else None
        self.sessions = set(req.sessions) if req.sessions else None
        self.tasks = set(req.tasks) if req.tasks else None
        self.events = set(req.events) if req.events else None
        self.narrowed = bool(self.streams or self.sessions or self.tasks)
        self.coalesce = req.coalesce

    def wants(self, kind: str, stream: str | None = None, session: str | None = None,
              task_id: int | None = None) -> bool:
        if self.events is not None and kind not in self.events:
            return False
        if stream is None:  # worker and config events: unless narrowed to some tasks
            return not self.narrowed or self.events is not None
        return ((self.streams is None or stream in self.streams)
                and (self.sessions is None or session in self.sessions)
                and (self.tasks is None or task_id in self.tasks))


class Watchers:
    """`watch` subscribers: each event they asked for, rendered once for all of them.

    Every event is numbered (``seq``) and the latest are kept, so a subscriber that
    reconnects with ``after_seq`` gets what it missed. Numbers start at the daemon's
    start time in microseconds: a cursor from an earlier run is older than everything
    kept, so it reads as lagged (refetch), never as a resume at the wrong place.
    """

    def __init__(self, replies: Replies):
        self.replies = replies
        self.subscriptions: dict[Connection, Subscription] = {}
        self.seq = self.first_seq = int(time.time() * 1e6)  #: the number of the last event
        #: (seq, kind, at, body, stream, session, task id) of the latest events
        self.recent: collections.deque = collections.deque(maxlen=WATCH_KEPT)
        #: coalescing subscribers with events this loop turn: [last seq, how many]
        self.changed: dict[Connection, list[int]] = {}

    def subscribe(self, conn: Connection, req: Watch) -> dict:
        unknown = set(req.events or ()) - EVENT_TYPES
        if unknown:
            raise BadRequest(f"unknown event type {sorted(unknown)[0]!r} "
                             f"(known: {', '.join(sorted(EVENT_TYPES))})")
        conn.stream(req)  # a stream of events from now on
        if req.after_seq is None:
            self.subscriptions[conn] = Subscription(req)
        else:  # after the reply: what it missed, then what comes
            asyncio.get_running_loop().call_soon(self._resume, conn, req)
        return {"watching": {k: v for k, v in msgspec.structs.asdict(req).items()
                             if k != "id" and v is not None},
                "seq": self.seq if req.after_seq is None else req.after_seq}

    def _resume(self, conn: Connection, req: Watch) -> None:
        """Send a resuming subscriber the kept events after its cursor, or `lagged` (with
        the cursor of now: what it shows must be fetched again) when they are not kept."""
        if conn.lost:
            return
        subscription = self.subscriptions[conn] = Subscription(req)
        oldest = self.recent[0][0] if self.recent else self.seq + 1
        if not oldest - 1 <= req.after_seq <= self.seq:
            missed = oldest - 1 - req.after_seq if req.after_seq >= self.first_seq else None
            conn.publish({"event": "lagged", "missed": missed, "seq": self.seq})
            return
        for entry in itertools.islice(self.recent, len(self.recent) - (self.seq - req.after_seq),
                                      None):
            self._deliver(entry, ((conn, subscription),))

    def drop(self, conn: Connection) -> None:
        self.subscriptions.pop(conn, None)

    def on_commit(self, events: list[Event], queue: Queue) -> None:
        """One message per event, with the task or stream as that event left it."""
        streams = queue.stream_book.streams
        for event, left in zip(events, queue.event_states):
            kind = TASK_WATCH_EVENTS.get(type(event))
            if kind is not None:  # most events: kept as the task, rendered only if wanted
                if left is not None and not (type(event) is TaskReleased and event.waiting_for):
                    self.send(kind, left, event.at, left.stream, streams[left.stream].session,
                              left.id)
                continue
            if type(event) in WORKSPACE_WATCH_EVENTS:
                self.workspace_event(event, queue)
                continue
            kind = WATCH_EVENTS.get(type(event))
            if kind is None:
                continue
            if kind.startswith("stream."):
                stream = left or streams[event.name]
                self.send(kind, {"stream": self.replies.stream(stream)}, event.at, stream.name,
                          stream.session)
            else:
                self.schedule_event(kind, event, queue)

    def schedule_event(self, kind: str, event: Event, queue: Queue) -> None:
        """A schedule's change or firing; one that was removed is named only."""
        schedule = queue.schedules.by_name.get(event.name)
        body = {"schedule": self.replies.schedule(schedule) if schedule else {"name": event.name}}
        if kind in ("schedule.fired", "schedule.skipped"):
            body.update(slot=rfc3339(event.slot), task=getattr(event, "task", None),
                        why=getattr(event, "why", None), count=getattr(event, "count", 1))
        stream = schedule.spec.stream if schedule else None
        session = queue.streams[stream].session if stream in queue.streams else None
        self.send(kind, body, event.at, stream, session)

    def workspace_event(self, event: Event, queue: Queue) -> None:
        """A workspace's lifecycle event, for those watching everything or its task."""
        ws = queue.workspaces.records.get(event.workspace)
        task = queue.tasks.get(getattr(event, "task", None) or (ws and ws.task) or 0)
        body = {"workspace": self.replies.workspace(ws) if ws else {
            "id": event.workspace, "task": event.task, "state": "removed",
            "reason": event.reason, "patch": event.patch}}
        self.send(WORKSPACE_WATCH_EVENTS[type(event)], body, event.at, task and task.stream,
                  task and queue.streams[task.stream].session, task and task.id)

    def worker_event(self, kind: str, record: dict) -> None:
        self.send(kind, {"worker": record})

    def send(self, kind: str, body, at: float | None = None, stream: str | None = None,
             session: str | None = None, task_id: int | None = None) -> None:
        """Number and keep one event, and queue it for every subscriber that wants it."""
        self.seq += 1
        entry = (self.seq, kind, time.time() if at is None else at, body, stream, session,
                 task_id)
        self.recent.append(entry)
        if self.subscriptions:
            self._deliver(entry, self.subscriptions.items())

    def _deliver(self, entry: tuple, subscribers) -> None:
        """Queue one kept event for those of ``subscribers`` that want it, built only if one does."""
        seq, kind, at, body, stream, session, task_id = entry
        message = None
        for conn, subscription in subscribers:
            if not subscription.wants(kind, stream, session, task_id):
                continue
            if subscription.coalesce:
                self._note_change(conn, seq)
                continue
            if message is None:
                message = {"event": kind, "at": rfc3339(at), "seq": seq,
                           **({"task": self.replies.task(body)} if type(body) is Task else
                              body() if callable(body) else body)}
            conn.publish(message)

    def _note_change(self, conn: Connection, seq: int) -> None:
        """Count an event for a coalescing subscriber, told once this loop turn ends."""
        pending = self.changed.get(conn)
        if pending is not None:
            pending[0], pending[1] = seq, pending[1] + 1
            return
        if not self.changed:
            asyncio.get_running_loop().call_soon(self._send_changes)
        self.changed[conn] = [seq, 1]

    def _send_changes(self) -> None:
        changed, self.changed = self.changed, {}
        for conn, (seq, count) in changed.items():
            if conn in self.subscriptions:
                conn.publish({"event": "changed", "seq": seq, "count": count})


class TaskLogs:
    """Task output: the log files, and the connections following a running task's log."""

    def __init__(self, directory: str, queue: Queue, executor: ThreadPoolExecutor):
        self.directory = directory
        self.queue = queue
        self.executor = executor
        self.runs: dict[int, Run] = {}  #: the pool's runs, by task id (shared with the pool)
        self.followers: dict[int, set[Connection]] = {}

    def path(self, task_id: int) -> str:
        return os.path.join(self.directory, f"{task_id}.log")

    def answer(self, conn: Connection | None, req: Logs) -> dict:
        """The `logs` reply; with ``follow`` on a running task, the connection then streams."""
        task = self.queue.tasks.get(req.task)
        if task is None:
            raise NotFound(f"no task {req.task}")
        if req.follow and conn is not None and (task.status not in TERMINAL
                                                or req.task in self.runs):
            self.followers.setdefault(req.task, set()).add(conn)
            conn.stream(req)  # later frames wait until the stream ends
        return {"task": req.task, "status": task.status, "running": req.task in self.runs,
                "log": self.read(req.task, req.tail)}

    def read(self, task_id: int, tail: int | None) -> str:
        try:
            with open(self.path(task_id), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        run = self.runs.get(task_id)
        if run is not None:
            data += run.log.pending_tail()
        text = data.decode(errors="replace")
        if tail is not None:
            text = "".join(text.splitlines(keepends=True)[-tail:]) if tail else ""
        return text

    def chunk(self, task_id: int, text: str) -> None:
        for conn in self.followers.get(task_id, ()):
            conn.push({"task": task_id, "chunk": text})

    def run_finished(self, task_id: int) -> None:
        task = self.queue.tasks.get(task_id)
        if task is None or task.status in TERMINAL:
            self.end(task_id)

    def end(self, task_id: int) -> None:
        task = self.queue.tasks.get(task_id)
        for conn in self.followers.pop(task_id, ()):
            conn.end_stream({"task": task_id, "end": True,
                             "status": task.status if task else "purged"})

    def drop(self, conn: Connection) -> None:
        for task_id in [i for i, conns in self.followers.items() if conn in conns]:
            self.followers[task_id].discard(conn)

    def on_commit(self, events: list[Event], queue: Queue) -> None:
        """End the streams of tasks that ended with no run; remove purged tasks' logs."""
        for task_id in queue.index.finished:
            if task_id not in self.runs:
                self.end(task_id)
        purged = [i for event in events if type(event) is TasksPurged for i in event.ids]
        if purged:
            asyncio.get_running_loop().run_in_executor(
                self.executor, remove_files, [self.path(i) for i in purged])


class WorkerRegistry:
    """The external workers seen (agents, `sparkqctl work`), for the `workers` op."""

    def __init__(self):
        self.seen: dict[str, dict] = {}

    def note(self, request: Request, task: Task | None, now: float) -> None:
        """A claim, touch, complete or fail: who made it and what it holds now."""
        name = request.worker if type(request) is Claim else task and task.worker
        if not name or name.startswith("sparkqd/"):
            return
        seen = self.seen.setdefault(name, {"pid": None, "task": None, "done": 0})
        seen["last_seen"] = now
        if getattr(request, "pid", None):
            seen["pid"] = request.pid
        if type(request) is Claim and task is not None:
            seen["task"] = task.id
        elif type(request) in (Complete, Fail) and seen["task"] == request.task:
            seen["task"] = None
            seen["done"] += 1

    def records(self, now: float) -> list[dict]:
        """The workers seen within the last hour."""
        return [{"name": name, "kind": "external", "pid": w["pid"], "task": w["task"],
                 "state": "busy" if w["task"] else "idle", "done": w["done"], "restarts": 0,
                 "error": None, "last_seen": rfc3339(w["last_seen"])}
                for name, w in self.seen.items() if w["last_seen"] >= now - 3600]


class Hooks:
    """`hooks.on_finish`: a command per ended task, in the background, with a timeout."""

    def __init__(self, config: Config, queue: Queue, socket_path: str):
        self.config = config
        self.queue = queue
        self.socket_path = socket_path
        self.waiting: collections.deque = collections.deque(maxlen=10_000)
        self.running = 0

    def on_commit(self, events: list[Event], queue: Queue) -> None:
        if self.config.hooks.on_finish and queue.index.finished:
            # Each task as it ended: a later change of the same commit (a requeue) is not it.
            self.waiting.extend(task for event, task in zip(events, queue.event_states)
                                if type(event) in OUTCOMES and task is not None
                                and task.status in TERMINAL)
            self._start_more()

    def _start_more(self) -> None:
        while self.waiting and self.running < self.config.hooks.concurrency:
            self.running += 1
            asyncio.get_running_loop().create_task(self._run(self.waiting.popleft()))

    def _environment(self, task: Task) -> dict[str, str]:
        duration = (task.finished_at - task.started_at) if task.started_at and task.finished_at else 0
        return child_environment(
            SPARKQ_TASK_ID=str(task.id), SPARKQ_STATUS=task.status, SPARKQ_STREAM=task.stream,
            SPARKQ_SESSION=self.queue.streams[task.stream].session, SPARKQ_TOOL=task.tool,
            SPARKQ_SUMMARY=task.summary or "", SPARKQ_REASON=task.reason or "",
            SPARKQ_DURATION=f"{duration:.3f}", SPARKQ_SOCKET=self.socket_path)

    async def _run(self, task: Task) -> None:
        hooks = self.config.hooks
        try:
            proc = await asyncio.create_subprocess_exec(
                *hooks.on_finish, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, env=self._environment(task), start_new_session=True)
            try:
                _, stderr = await asyncio.wait_for(proc.communicate(), hooks.timeout)
                if proc.returncode:
                    log.warning("on_finish hook for task %d exited %d: %s", task.id,
                                proc.returncode, stderr.decode(errors="replace").strip()[-500:])
            except TimeoutError:
                signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
                log.warning("on_finish hook for task %d killed after %g s", task.id, hooks.timeout)
        except OSError as exc:
            log.warning("on_finish hook %s cannot start: %s", hooks.on_finish[0], exc.strerror)
        finally:
            self.running -= 1
            self._start_more()


# ============================================================================
# 12. Server: waiters and connections
# ============================================================================


def check_private_dir(path: str) -> None:
    """Create a default socket directory 0700, or refuse one others could use."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StartupError(f"cannot create socket directory {path}: {exc.strerror}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"socket directory {path} is not a directory (or is a symlink)")
    if st.st_uid != os.getuid():
        raise StartupError(f"socket directory {path} belongs to uid {st.st_uid}, not to you")
    if st.st_mode & 0o077:
        raise StartupError(f"socket directory {path} is open to other users "
                           f"(mode {stat.S_IMODE(st.st_mode):o}); run: chmod 700 {path}")


def bind_socket(path: str, explicit: bool) -> socket.socket:
    """Listen on ``path`` with mode 0600, replacing a stale socket but never a live one."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise StartupError(f"socket path is {len(os.fsencode(path))} bytes, more than the "
                           f"{MAX_SOCKET_PATH} a Unix socket allows: {path}; choose a shorter "
                           f"one with --socket or SPARKQ_SOCKET")
    directory = os.path.dirname(path)
    if explicit:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    else:
        check_private_dir(directory)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise StartupError(f"{path} exists and is not a socket; remove it or choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            log.info("replacing stale socket %s", path)
            os.unlink(path)
        else:
            raise StartupError(f"another daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


WAITING = object()  #: what a request that now waits returns instead of a result


class Waiter:
    """A request parked until a change lets it be answered, or its deadline passes.

    ``retry()`` returns (result, None) once it can be answered, or (None, keys)
    to wait on; ``expire()`` is its result when the deadline passes.
    """

    __slots__ = ("conn", "request", "retry", "expire", "active", "keys")

    def __init__(self, conn: Connection, request: Request, retry, expire):
        self.conn, self.request, self.retry, self.expire = conn, request, retry, expire
        self.active = True
        self.keys: set[tuple] = set()  #: the keys it is registered under now

    @property
    def changed_already(self) -> bool:
        """A complete or fail whose claim_next waits: the finish is done and durable."""
        return type(self.request) in (Complete, Fail)

    def end(self) -> None:
        """Answered, timed out or gone: keep nothing alive (its entries go stale)."""
        self.active = False
        self.conn = self.retry = self.expire = None


class Waiters:
    """Requests that wait for a change: `claim` with `wait`, `wait`, and a `complete` or
    `fail` whose ``claim_next`` waits.

    A waiter is parked under keys (``("stream", name)`` gaining claimable tasks,
    ``("task", id)`` ending); the commit that concerns a key retries its waiters on
    the next loop turn, and their deadlines are deadlines of the daemon's one timer.
    """

    def __init__(self, queue: Queue, change, workers: WorkerRegistry, rearm,
                 workspaces: Workspaces, clock=time.time):
        self.queue, self.reads = queue, QueueReads(queue)
        self.clock = clock  #: the daemon's clock: deadlines and retried claims read it
        self.workspaces = workspaces  #: prepares a claimed task's workspace before the reply
        self.change = change  #: the daemon's change pipeline: a retried claim changes state
        self.workers = workers
        self.rearm = rearm  #: tells the one timer of an earlier deadline
        self.parked: dict[tuple, list[Waiter]] = {}
        self.deadlines: list[tuple[float, int, Waiter]] = []
        self._order = itertools.count()
        self._parks = 0  #: counts parks, to sweep answered waiters out of the heap now and then
        self._draining: set[str] = set()  #: streams whose parked claims are retried next turn
        #: the stream whose claims are being retried now (popped from ``parked`` meanwhile)
        self._drained: str | None = None

    def park(self, conn: Connection, request: Request, keys: list[tuple], wait: float | None,
             retry, expire) -> object:
        """Park a request on ``keys`` for at most ``wait`` seconds; returns WAITING (or, on a
        connection where nothing may wait, the result it would get at the deadline)."""
        if not conn.can_wait():
            return expire()
        waiter = Waiter(conn, request, retry, expire)
        conn.block(waiter)
        self._register(waiter, keys)
        self._parks += 1
        if self._parks % 1024 == 0:  # answered waiters must not pile up under a later deadline
            self.deadlines = [entry for entry in self.deadlines if entry[2].active]
            heapq.heapify(self.deadlines)
        if wait is not None:
            deadline = self.clock() + wait
            heapq.heappush(self.deadlines, (deadline, next(self._order), waiter))
            self.rearm(deadline)
        return WAITING

    def noted(self, request: Request, task: Task | None, now: float) -> Task | None:
        """Remember who claimed, touched or finished a task, for `workers`."""
        self.workers.note(request, task, now)
        return task

    def claim(self, request: Claim, conn: Connection | None, now: float,
               finished: Task | None = None, answering: Request | None = None) -> Any:
        """A claim; with ``wait``, parked until a task arrives or the time runs out. As a
        ``claim_next``, its result is the finished task's record with the claimed one."""
        def result(task: Task | None) -> Any:
            return task if answering is None else TaskResult(finished, {"next": task})

        task = self.noted(request, self.queue.claim(request, now), now)
        if task is not None or request.wait <= 0 or conn is None:
            return self.prepared(conn, answering or request, task, result)
        keys = [("stream", s) for s in names(request.stream)]

        def again():
            task = self.change(lambda: self.queue.claim(request, self.clock()))
            self.noted(request, task, self.clock())
            if task is None:
                return None, keys
            return self.prepared(conn, answering or request, task, result), None
        return self.park(conn, answering or request, keys, request.wait, again,
                                 lambda: result(None))

    def prepared(self, conn: Connection | None, request: Request, task: Task | None,
                 result) -> Any:
        """A claim's result; for a task that asks for a workspace, WAITING until it is ready."""
        if task is None or task.workspace is None or conn is None:
            return result(task)
        return self.workspaces.answer_claim(conn, request, task, result)

    def finish(self, request: Complete | Fail, conn: Connection | None, now: float) -> Any:
        """Complete or fail a task; with ``claim_next``, claim the next one in the same step
        (one request, one fsync: the worker loop)."""
        then = request.claim_next
        if then is not None:
            self.queue.stream_book.streams_named(names(then.stream))  # refused before anything finishes
        finished = self.queue.complete(request, now) if type(request) is Complete else \
            self.queue.fail(request, now)
        self.noted(request, finished, now)
        if then is None:
            return finished
        claim = Claim(stream=then.stream, tool=then.tool, worker=then.worker or finished.worker,
                      pid=then.pid, wait=then.wait)
        return self.claim(claim, conn, now, finished, request)

    def wait(self, request: Wait, conn: Connection | None, now: float) -> Any:
        """Whether the tasks ended; parked until they all have, or the timeout."""
        result = self.reads.wait(request, now)
        if result["done"] or request.timeout == 0 or conn is None:
            return result

        def again():
            task_id = self.reads.first_unfinished(request.tasks)
            if task_id is not None:
                return None, [("task", task_id)]
            return self.reads.wait(request, self.clock()), None
        first = self.reads.first_unfinished(request.tasks)
        return self.park(conn, request, [("task", first)], request.timeout, again,
                                 lambda: self.reads.wait(request, self.clock()))

    def _register(self, waiter: Waiter, keys: list[tuple]) -> None:
        for key in keys:
            if key in waiter.keys:
                continue  # still registered there since the last wake
            waiter.keys.add(key)
            waiting = self.parked.setdefault(key, [])
            if len(waiting) >= 64:  # forget waiters answered or gone since
                waiting[:] = [w for w in waiting if w.active]
            waiting.append(waiter)

    def on_commit(self, events: list[Event], queue: Queue) -> None:
        """On the next loop turn: hand the tasks that became claimable to the claims parked
        on their streams, and retry what waits on tasks that ended."""
        for stream in {stream for stream, _ in queue.index.became_ready}:
            # (a commit inside a drain, a read its answered client sent, counts it too)
            if stream not in self._draining and (
                    ("stream", stream) in self.parked or stream == self._drained):
                self._draining.add(stream)
                asyncio.get_running_loop().call_soon(self._drain, stream)
        for task_id in queue.index.finished:
            self._wake(("task", task_id))

    def _drain(self, stream: str) -> None:
        """Retry the claims parked on a stream, oldest first, only while it holds a task
        one could take: an enqueue wakes one claim, not every claim that waits (a claim
        that finds nothing for its tools keeps its place and the next one is tried)."""
        self._draining.discard(stream)
        key = ("stream", stream)
        waiting, again, tried = self.parked.pop(key, []), [], 0
        self._drained = stream
        try:
            while tried < len(waiting) and self._claimable(stream):
                waiter = waiting[tried]
                tried += 1
                if waiter.active:
                    waiter.keys.discard(key)
                    if keys := self._retry(waiter):
                        again.append((waiter, keys))
        finally:
            self._drained = None
        front = []
        for waiter, keys in again:
            if key in keys:
                front.append(waiter)
                waiter.keys.add(key)
            self._register(waiter, [k for k in keys if k != key])
        rest = front + [w for w in waiting[tried:] if w.active]
        if rest:
            self.parked[key] = rest + self.parked.pop(key, [])

    def _claimable(self, stream: str) -> bool:
        """Whether a claim on ``stream`` could take a task now (for some tool)."""
        index = self.queue.index
        found = self.queue.streams.get(stream)
        return found is not None and not found.paused and any(
            index.top(stream, tool) is not None for tool in index.ready[stream])

    def _wake(self, key: tuple) -> None:
        waiting = self.parked.pop(key, None)
        if waiting:
            loop = asyncio.get_running_loop()
            for waiter in waiting:
                if waiter.active:
                    waiter.keys.discard(key)
                    loop.call_soon(self._retry_parked, waiter)

    def _retry_parked(self, waiter: Waiter) -> None:
        if keys := self._retry(waiter):
            self._register(waiter, keys)

    def _retry(self, waiter: Waiter) -> list[tuple] | None:
        """Try a woken waiter again: the keys it waits on still, or None once answered
        (or gone)."""
        if not waiter.active:
            return None  # answered, timed out or gone since
        if waiter.conn.peer_gone():
            waiter.conn.close()
            return None
        try:
            result, keys = waiter.retry()
        except SparkQError as exc:
            if waiter.changed_already:  # the finish stands: say so, with no next task
                waiter.conn.finish(waiter.request.id, waiter.expire())
            else:
                waiter.conn.finish_error(waiter.request.id, exc)
            return None
        except Exception as exc:  # a bug: this request says so, the others still wait
            log.exception("internal error retrying %s", type(waiter.request).__name__)
            waiter.conn.finish_error(waiter.request.id, SparkQError(f"internal error: {exc!r}"))
            return None
        if keys:  # someone else was quicker, or not everything waited for has ended
            return keys
        if result is not WAITING:  # (WAITING: answered once the task's workspace is ready)
            waiter.conn.finish(waiter.request.id, result)
        return None

    def tick(self, now: float) -> float | None:
        """Answer the waiters whose time ran out; returns the next deadline."""
        heap = self.deadlines
        while heap and heap[0][0] <= now:
            waiter = heapq.heappop(heap)[2]
            if waiter.active:
                try:
                    waiter.conn.finish(waiter.request.id, waiter.expire())
                except SparkQError as exc:
                    waiter.conn.finish_error(waiter.request.id, exc)
        while heap and not heap[0][2].active:
            heapq.heappop(heap)
        return heap[0][0] if heap else None


class Connections:
    """The open connections, and the parts that must forget one when it closes."""

    def __init__(self, max_frame: int):
        self.open: set[Connection] = set()
        self.max_frame = max_frame
        self.stopping = False
        self.forgetters: list = []  #: called with each connection that closed
        self.shortage = DescriptorShortage()
        self.all_closed = asyncio.Event()

    def added(self, conn: Connection, fd: int) -> None:
        """A new connection; one whose descriptor is near the limit says the limit is near
        (descriptors are handed out lowest first), whatever loop accepts them."""
        self.open.add(conn)
        if fd >= resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 4:
            self.shortage.warn("nearly every file descriptor is in use")

    def closed(self, conn: Connection) -> None:
        self.open.discard(conn)
        for forget in self.forgetters:
            forget(conn)
        if self.stopping and not self.open:
            self.all_closed.set()


class Connection(asyncio.Protocol):
    """One client: frames in, replies out in request order.

    Frames are answered as they arrive; each reply is held until the journal
    holds everything it could have observed, then written. A request that waits
    blocks only its own connection: later frames queue behind it. Its
    collaborators: ``handle`` (the daemon's one dispatch), ``render`` (results to
    wire form), the journal (what is durable) and the connection registry.
    """

    def __init__(self, handle, render, journal: Journal, registry: Connections):
        self.handle = handle
        self.render = render
        self.journal = journal
        self.registry = registry
        self.transport: asyncio.Transport | None = None
        self.codec: Codec | None = None
        self.buf = bytearray()
        self.frames: collections.deque = collections.deque()
        self.frame_bytes = 0  #: bytes of the frames waiting in ``frames``
        #: (journal seq the reply may have seen, encoded reply, request id or EVENT), oldest first
        self.replies: collections.deque = collections.deque()
        self.reply_bytes = 0  #: bytes held in ``replies``
        self.awaiting_journal = False
        self.blocked: Waiter | Request | None = None  #: a waiting request, or a stream's
        self.write_paused = False
        self.queued_bytes = self.queued_events = 0  #: events waiting for a slow subscriber
        self.missed = 0  #: events dropped since the subscriber fell behind
        self.subscriber = False
        self.eof = False
        self.closing = False  #: close once every reply is out
        self.lost = False
        self.peer_uid = -1

    # -- transport events -----------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.peer_uid = struct.unpack("3i", creds)[1]
        self.registry.added(self, sock.fileno())

    def connection_lost(self, exc) -> None:
        self.lost = True
        if self.blocked is not None:
            self._unblock()
        self.registry.closed(self)

    def eof_received(self) -> bool:
        self.eof = True
        if self.blocked is not None and self.peer_gone():
            self.transport.close()
        self._close_when_done()
        return True  # a half-closed client still gets its replies

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.missed:  # a lagging subscriber hears of it as soon as it can be told
            self._queue_event({"event": "lagged", "missed": self.missed})
            self.missed = 0
        self._send_durable()
        self._resume()

    def data_received(self, data: bytes) -> None:
        if self.codec is None:
            self.codec = (JsonLines if data[:1] == b"{" else MsgpackFrames)(self.registry.max_frame)
            if self.peer_uid != os.getuid():
                self._add_reply(error_reply(None, Forbidden(
                    f"uid {self.peer_uid} may not use the queue of uid {os.getuid()}")))
                return self.stop()
        if self.closing:
            return
        self.buf += data
        try:
            while frames := self.codec.split(self.buf):
                self.frames.extend(frames)
                self.frame_bytes += sum(map(len, frames))
        except TooLarge as exc:
            self.frames.append(exc)  # answered in turn, then the connection closes
        self._process()

    # -- answering --------------------------------------------------------------

    def _process(self) -> None:
        while True:
            while self.frames and self.blocked is None and not self._over_budget():
                frame = self.frames.popleft()
                if isinstance(frame, TooLarge):
                    self._add_reply(error_reply(None, frame))
                    self.frames.clear()
                    self.frame_bytes = 0
                    self.closing = True
                    break
                self.frame_bytes -= len(frame)
                reply = self._answer(frame)
                if reply is not None:
                    self._add_reply(reply)
            self._update_reading()
            self._send_durable()
            # The socket may have taken every reply without filling: go on while it does.
            if not (self.frames and self.blocked is None and not self.lost
                    and not self.closing and not self._over_budget()):
                return

    def _answer(self, frame: bytes) -> dict | None:
        """The reply to one frame, or None when the request now waits."""
        try:
            request = self.codec.decode(frame)
        except BadRequest as exc:
            return error_reply(self.codec.request_id(frame), exc)
        try:
            result = self.handle(request, self)
            if request.may_wait and result is WAITING:
                return None
            return ok_reply(request.id, self.render(result))
        except SparkQError as exc:
            return error_reply(request.id, exc)
        except Exception as exc:
            log.exception("internal error answering %s", type(request).__name__)
            return error_reply(request.id, SparkQError(f"internal error: {exc!r}"))

    def can_wait(self) -> bool:
        """Whether a request may wait here: not while stopping, nor for a client gone."""
        return not self.registry.stopping and not (self.eof and self.peer_gone())

    def _over_budget(self) -> bool:
        """Whether replies the client has not read yet fill its budget: answer no more now."""
        return self.reply_bytes + self.transport.get_write_buffer_size() > REPLY_BUDGET

    def _resume(self) -> None:
        """Answer frames held back by the budget, once replies have drained."""
        if self.frames and not self._over_budget() and not self.lost:
            self._process()
        elif not self.lost:
            self._update_reading()

    def _encode(self, message: dict) -> bytes:
        """The wire form of a message; a reply that cannot be encoded becomes an error."""
        try:
            return self.codec.encode(message)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            log.error("cannot encode a reply: %r", exc)
            return self.codec.encode(error_reply(None, SparkQError(
                f"internal error: the reply cannot be encoded: {exc}")))

    def _add_reply(self, reply: dict) -> None:
        data = self._encode(reply)
        self.reply_bytes += len(data)
        self.replies.append((self.journal.last_seq, data, reply.get("id")))

    def _send_durable(self) -> None:
        """Write every reply whose observations are durable; wait for the rest."""
        if self.awaiting_journal or self.lost or not self.replies:
            return self._close_when_done()
        if self.write_paused and self.subscriber:
            return  # a slow subscriber: events wait here, within publish()'s limits
        journal = self.journal
        durable, failure = journal.durable_seq, journal.failure
        out = []
        while self.replies and (self.replies[0][0] <= durable or failure):
            seq, data, request_id = self.replies.popleft()
            self.reply_bytes -= len(data)
            if request_id is EVENT:
                self.queued_bytes -= len(data)
                self.queued_events -= 1
                if seq > durable:
                    continue  # an event the journal failed to keep: it did not happen
            elif seq > durable:
                data = self._encode(error_reply(request_id, Unavailable(
                    f"storage failing: {failure}")))
            out.append(data)
        if out:
            self.transport.write(b"".join(out))
        if self.replies:
            self.awaiting_journal = True
            journal.when_durable(self.replies[-1][0], self._on_durable)
        self._close_when_done()

    def _on_durable(self) -> None:
        self.awaiting_journal = False
        self._send_durable()
        self._resume()

    def _close_when_done(self) -> None:
        done = self.closing or (self.eof and not self.frames and self.blocked is None)
        if done and not self.replies and not self.lost:
            self.transport.close()

    def _update_reading(self) -> None:
        held = len(self.buf) + self.frame_bytes
        full = held > self.codec.max_frame + REPLY_BUDGET or len(self.frames) > 100_000
        if self.lost or self.transport.is_closing():
            return
        held = self.blocked is not None or self._over_budget()
        if self.write_paused or self.closing or (held and full):
            self.transport.pause_reading()
        elif not self.transport.is_reading():
            self.transport.resume_reading()

    def peer_gone(self) -> bool:
        """Whether the client closed both directions (not merely its sending side)."""
        poller = select.poll()
        poller.register(self.transport.get_extra_info("socket").fileno(), select.POLLIN)
        return any(events & select.POLLHUP for _, events in poller.poll(0))

    def close(self) -> None:
        self.transport.close()

    # -- requests that wait, and streams ------------------------------------------

    def block(self, waiter: Waiter) -> None:
        self.blocked = waiter

    def stream(self, request: Request) -> None:
        """After this reply, the connection carries a stream (watch, log follow)."""
        self.blocked = request
        self.subscriber = type(request) is Watch

    def finish(self, request_id: Any, result: Any) -> None:
        """A waiting request's result is in: reply, then go on with later frames."""
        self._finish_blocked(ok_reply(request_id, self.render(result)))

    def finish_error(self, request_id: Any, exc: SparkQError) -> None:
        self._finish_blocked(error_reply(request_id, exc))

    def _finish_blocked(self, reply: dict) -> None:
        self._unblock()
        self._add_reply(reply)
        self._process()

    def _unblock(self) -> None:
        if isinstance(self.blocked, Waiter):
            self.blocked.end()
        self.blocked = None

    def publish(self, message: dict) -> None:
        """Queue an event for this subscriber; drop the backlog if it cannot keep up."""
        if self.lost:
            return
        if self.missed:
            if self.write_paused:
                self.missed += 1
                return
            self._queue_event({"event": "lagged", "missed": self.missed})
            self.missed = 0
        # Only a subscriber whose socket is full is slow; events waiting for the journal's
        # fsync (a burst of one group commit) are not its fault.
        if self.write_paused and (self.queued_events >= WATCH_MAX_EVENTS
                                  or self.queued_bytes >= WATCH_MAX_BYTES):
            self.missed = self.queued_events + 1
            self.replies = collections.deque(e for e in self.replies if e[2] is not EVENT)
            self.reply_bytes -= self.queued_bytes
            self.queued_bytes = self.queued_events = 0
            return
        self._queue_event(message)
        self._send_durable()

    def _queue_event(self, message: dict) -> None:
        data = self._encode(message)
        self.queued_bytes += len(data)
        self.reply_bytes += len(data)
        self.queued_events += 1
        self.replies.append((self.journal.last_seq, data, EVENT))

    def push(self, message: dict) -> None:
        """Send a message of a stream this connection asked for (after its reply)."""
        if not self.lost:
            self._add_reply(message)
            self._send_durable()

    def end_stream(self, message: dict) -> None:
        """The end of a stream (a log follow): later frames are answered on the next loop
        turn, not inside the commit that ended it."""
        if self.blocked is not None and not self.lost:
            self._unblock()
            self._add_reply(message)
            asyncio.get_running_loop().call_soon(self._process)

    def stop(self) -> None:
        """Answer what has arrived, refuse a waiting request, then close."""
        waiter = self.blocked
        if isinstance(waiter, Waiter) and waiter.changed_already:
            self.finish(waiter.request.id, waiter.expire())  # finished; no next while stopping
        elif isinstance(waiter, Waiter):
            self.finish_error(waiter.request.id, Unavailable("shutting down"))
        elif self.blocked is not None:
            self._finish_blocked(error_reply(self.blocked.id, Unavailable("shutting down")))
        self.closing = True
        self._process()


# -- while recovery runs ----------------------------------------------------------


class StartingConnection(asyncio.Protocol):
    """A client that connects while startup recovers the queue: each request it sent is
    answered `unavailable` ("starting (recovering N records)"), then the connection
    closes. Such a reply observed nothing, so it waits for no journal write."""

    def __init__(self, message, max_frame: int):
        self.message = message  #: the refusal's text now: it counts the records recovered
        self.max_frame = max_frame
        self.transport: asyncio.Transport | None = None
        self.codec: Codec | None = None
        self.buf = bytearray()
        self.refusal: SparkQError | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        uid = struct.unpack("3i", creds)[1]
        if uid != os.getuid():
            self.refusal = Forbidden(f"uid {uid} may not use the queue of uid {os.getuid()}")

    def data_received(self, data: bytes) -> None:
        if self.codec is None:
            self.codec = (JsonLines if data[:1] == b"{" else MsgpackFrames)(self.max_frame)
        self.buf += data
        try:
            frames = self.codec.split(self.buf)
        except TooLarge as exc:
            frames, self.refusal = [b""], exc
        if frames:
            refusal = self.refusal or Unavailable(self.message())
            self.transport.write(b"".join(self.codec.encode(error_reply(
                self.codec.request_id(frame), refusal)) for frame in frames))
            self.transport.close()


# ============================================================================
# 13. Web: HTTP API and dashboard
# ============================================================================
#
# An optional listener on loopback (``http.listen``) serving the same requests as the
# socket, as JSON over HTTP, and a dashboard of server-rendered pages kept live by the
# `watch` stream over Server-Sent Events. tornado is imported only when the listener
# starts. Its defences are Jupyter's: a token (Bearer header, or an HttpOnly SameSite
# cookie set from ``/?token=``), a Host check against DNS rebinding, changes only by POST
# with a JSON body, same-origin proof for cookie requests, no CORS, a strict CSP.
# A request reaches the daemon through the one dispatch; ``HttpExchange`` stands where a
# socket Connection would, so waits, streams and durable replies work as they do there.

API_PREFIX = "/api/v1/"
#: The HTTP status of each protocol error code; the body is the socket's error reply.
HTTP_STATUS = {"bad_request": 400, "forbidden": 403, "not_found": 404, "conflict": 409,
               "too_large": 413, "unavailable": 503, "internal": 500}
#: Error codes of refusals made before a request reaches the daemon.
HTTP_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 415: "unsupported_media_type", 413: "too_large"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Resource-Policy": "same-origin",
}
COOKIE_DAYS = 30
#: Bytes of a request body tornado reads at most; past ``server.max_frame_bytes`` (which a
#: reload may change) they are counted, not kept, and the request gets `too_large`.
MAX_HTTP_BODY = 1 << 30
#: Bytes written to a client and not yet flushed past which its stream holds events back.
HTTP_HIGH_WATER = 256 << 10
PAGE_SIZE = 50
#: Task ids one page of a filtered listing looks at: its cost, whatever the queue holds.
PAGE_WINDOW = 100_000
REPLY, MESSAGE, STREAM_EVENT = "reply", "message", "event"  #: kinds of what an exchange sends


class HttpRefusal(Exception):
    """A request refused before it reaches the daemon: an HTTP status and a JSON error."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, HTTP_CODES[status], headers or {}

    def reply(self) -> dict:
        return {"id": None, "ok": False, "error": {"code": self.code, "message": str(self)}}


# -- the token ------------------------------------------------------------------------


class TokenFile:
    """The dashboard's secret, ``<data dir>/http-token`` (0600), made at the first start."""

    def __init__(self, path: str):
        self.path = path
        self.token = ""

    def load(self) -> None:
        """Read the token, or make one if there is none (or none worth the name)."""
        try:
            with open(self.path, encoding="ascii", errors="replace") as f:
                token = f.read().strip()
            if os.stat(self.path).st_mode & 0o077:
                os.chmod(self.path, 0o600)
                log.warning("%s was readable by others: made it 0600 (rotate it: "
                            "sparkqctl ui --new-token)", self.path)
        except FileNotFoundError:
            token = ""
        if len(token) < 22:  # fewer than 128 bits of URL-safe base64
            return self.renew()
        self.token = token

    def renew(self) -> None:
        """A new random token of 256 bits, replacing the file durably."""
        token = secrets.token_urlsafe(32)
        durable_write(self.path, f"{token}\n".encode(), 0o600)
        self.token = token

    def matches(self, given: str) -> bool:
        """Whether ``given`` is the token, compared in constant time."""
        return bool(self.token) and hmac.compare_digest(given.encode(), self.token.encode())

    @property
    def cookie(self) -> str:
        """The cookie's value: derived from the token, so the cookie never holds the token."""
        return hmac.new(self.token.encode(), b"sparkq dashboard cookie", "sha256").hexdigest()


# -- who may use the listener -------------------------------------------------------------


def split_host(host: str) -> tuple[str, int | None]:
    """The name and port of a Host header value (``[::1]:8420``, ``localhost``)."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None if not rest else "x"
    else:
        name, sep, port = host.rpartition(":")
        if not sep:
            name, port = host, None
    if port is not None and not port.isdigit():
        raise ValueError(host)
    return name.lower(), None if port is None else int(port)


def is_loopback_name(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class RefusalLog:
    """Refused HTTP requests, logged once a minute at most: a scanner cannot flood the log."""

    def __init__(self):
        self.logged_at = -math.inf
        self.quiet = 0  #: refusals since the last one logged

    def note(self, refusal: HttpRefusal, what: str) -> None:
        now = time.monotonic()
        if now - self.logged_at < 60:
            self.quiet += 1
            return
        more = f" ({self.quiet} more refused since the last report)" if self.quiet else ""
        log.warning("HTTP %d for %s: %s%s", refusal.status, what, refusal, more)
        self.logged_at, self.quiet = now, 0


class Guard:
    """The checks before any HTTP request is served, Jupyter's way: the Host header, the
    token (Bearer header or cookie), and for cookie requests proof they come from the
    dashboard's own pages (Origin, Sec-Fetch-Site); changes need POST with JSON."""

    def __init__(self, tokens: TokenFile, port: int):
        self.tokens, self.port = tokens, port
        self.cookie_name = f"sparkq-{port}"  # cookies ignore ports: one name per listener

    def check_host(self, host: str) -> None:
        """Refuse a Host that is not a loopback name with our port: DNS rebinding."""
        try:
            name, port = split_host(host)
        except ValueError:
            name, port = "", -1
        ports = (self.port, None) if self.port == 80 else (self.port,)  # 80 may go unsaid
        if not is_loopback_name(name) or port not in ports:
            raise HttpRefusal(403, f"Host {host!r} is not this dashboard's address "
                                   f"(127.0.0.1:{self.port}, localhost:{self.port}): refused "
                                   f"against DNS rebinding")

    def authenticate(self, authorization: str | None, cookie: str | None) -> str:
        """How the request proves it has the token: "bearer" or "cookie"."""
        if authorization is not None:
            scheme, _, given = authorization.partition(" ")
            if scheme.lower() != "bearer" or not self.tokens.matches(given.strip()):
                raise HttpRefusal(401, "wrong token in the Authorization header (send "
                                       "Authorization: Bearer TOKEN; TOKEN is in "
                                       "<data dir>/http-token)")
            return "bearer"
        if cookie and hmac.compare_digest(cookie.encode(), self.tokens.cookie.encode()):
            return "cookie"
        raise HttpRefusal(401, "no valid token: open the URL `sparkqctl ui` prints, or send "
                               "Authorization: Bearer TOKEN (TOKEN is in <data dir>/http-token)")

    def check_origin(self, host: str, origin: str | None, site: str | None,
                     changes: bool) -> None:
        """A cookie request must come from our own pages; a change must show it does."""
        if origin is not None and origin.lower() != f"http://{host}".lower():
            raise HttpRefusal(403, f"cross-origin request from {origin} refused")
        if site is not None and site not in ("same-origin", "none"):
            raise HttpRefusal(403, f"{site} request refused (Sec-Fetch-Site)")
        if changes and origin is None and site is None:
            raise HttpRefusal(403, "a POST with the cookie must carry Origin or Sec-Fetch-Site")

    @staticmethod
    def check_json(content_type: str | None) -> None:
        if (content_type or "").partition(";")[0].strip().lower() != "application/json":
            raise HttpRefusal(415, "a POST takes a JSON body: send Content-Type: application/json")


# -- requests from HTTP ---------------------------------------------------------------------

REQUEST_TYPES = {cls.__struct_config__.tag: cls for cls in AnyRequest.__args__}


def takes(annotation, kind: type) -> bool:
    """Whether a field's msgspec type accepts values of ``kind`` (list or str)."""
    wanted = msgspec.inspect.ListType if kind is list else msgspec.inspect.StrType
    options = annotation.types if isinstance(annotation, msgspec.inspect.UnionType) else (annotation,)
    return any(isinstance(option, wanted) for option in options)


@functools.lru_cache(maxsize=None)
def query_shapes(kind: type) -> dict[str, tuple[bool, bool]]:
    """For each field of a request: whether it takes a list, and whether it takes a string."""
    return {f.name: (takes(f.type, list), takes(f.type, str))
            for f in msgspec.inspect.type_info(kind).fields}


def query_request(op: str, query: dict[str, list[bytes]]) -> Request:
    """A GET's request from its query parameters, through the same request Structs: a
    parameter given twice, or for a field that takes only a list, is a list."""
    kind = request_type(op)
    if not kind.safe:
        raise HttpRefusal(405, f"{op} changes state: POST it with Content-Type: application/json",
                          {"Allow": "POST"})
    fields = {}
    for name, raw in query.items():
        values = [value.decode(errors="replace") for value in raw]
        listed, text = query_shapes(kind).get(name, (False, True))
        fields[name] = values if listed and (len(values) > 1 or not text) else values[-1]
    try:
        return msgspec.convert({**fields, "op": op}, AnyRequest, strict=False)
    except msgspec.ValidationError as exc:
        raise BadRequest(_path_first(str(exc))) from None


def body_request(op: str, body: bytes, codec: Codec) -> Request:
    """A POST's request: its JSON body with the op of the URL, decoded by the socket's decoder."""
    request_type(op)
    fields = codec._loose(body) if body.strip() else {}
    if fields is None:
        codec.decode(body)  # raises the socket's own "malformed JSON" error
    if not isinstance(fields, dict):
        raise BadRequest("the body must be a JSON object of the request's fields")
    if "op" in fields:
        raise BadRequest("the op is named by the URL, not the body")
    rest = body.strip()[1:] if fields or body.strip() else b"}"
    return codec.decode(b'{"op":%s%s%s' % (msgspec.json.encode(op), b"," if fields else b"", rest))


def request_type(op: str) -> type:
    try:
        return REQUEST_TYPES[op]
    except KeyError:
        raise BadRequest(f"unknown op {op!r}") from None


def http_status(reply: dict) -> int:
    return 200 if reply.get("ok") else HTTP_STATUS.get(reply["error"]["code"], 500)


# -- an HTTP request as the daemon's parts see a connection -----------------------------------


class HttpExchange:
    """One HTTP request standing where a socket Connection would: its reply waits until the
    journal holds what it observed, a request that waits is parked in the same Waiters
    (and answered by ``finish``), and a stream (watch, logs with follow) gets the same
    messages, held back for a slow reader and dropped with a `lagged` past the limit.

    ``sink`` writes: ``send([(message, kind), ...])`` writes messages in one go and
    returns the bytes written, whose flush it reports with ``flushed``.
    """

    def __init__(self, daemon: Daemon, sink):
        self.daemon, self.journal, self.sink = daemon, daemon.journal, sink
        self.blocked: Waiter | Request | None = None  #: a waiting request, or a stream's
        self.streaming = self.subscriber = False
        self.lost = False  #: the client went away
        self.ending = False  #: end once everything queued is sent
        self.done = False
        self.outbox: collections.deque = collections.deque()  #: (journal seq, message, kind)
        self.awaiting_journal = False
        self.held_events = self.missed = self.unflushed = 0
        self.delivery_due = False  #: a delivery is scheduled for the next loop turn
        self.finished = asyncio.get_running_loop().create_future()

    # -- the handler's side ---------------------------------------------------------

    def begin(self, request: Request) -> None:
        """Hand the request to the daemon's dispatch; its reply is sent when durable."""
        try:
            result = self.daemon.handle(request, self)
        except SparkQError as exc:
            return self._reply(error_reply(request.id, exc))
        except Exception as exc:
            log.exception("internal error answering %s over HTTP", type(request).__name__)
            return self._reply(error_reply(request.id, SparkQError(f"internal error: {exc!r}")))
        if not (request.may_wait and result is WAITING):
            self._reply(ok_reply(request.id, self.daemon.replies.wire(result)))

    def gone(self) -> None:
        """The client closed the connection."""
        self.lost = True
        self._end()

    def flushed(self, nbytes: int) -> None:
        """Bytes written reached the socket: a stream held back goes on."""
        self.unflushed -= nbytes
        if not self.paused and not self.done:
            if self.missed:
                self._queue({"event": "lagged", "missed": self.missed}, STREAM_EVENT)
                self.missed = 0
            self._deliver()

    @property
    def paused(self) -> bool:
        return self.unflushed > HTTP_HIGH_WATER

    # -- the daemon's side: what Waiters, Watchers and TaskLogs call on a connection ---------

    def can_wait(self) -> bool:
        return not self.daemon.connections.stopping and not self.lost

    def block(self, waiter: Waiter) -> None:
        self.blocked = waiter

    def stream(self, request: Request) -> None:
        self.blocked = request
        self.streaming, self.subscriber = True, type(request) is Watch

    def finish(self, request_id: Any, result: Any) -> None:
        self._unblock()
        self._reply(ok_reply(request_id, self.daemon.replies.wire(result)))

    def finish_error(self, request_id: Any, exc: SparkQError) -> None:
        self._unblock()
        self._reply(error_reply(request_id, exc))

    def peer_gone(self) -> bool:
        return self.lost

    def close(self) -> None:
        self._end()

    def publish(self, message: dict) -> None:
        """Queue an event; drop the backlog of a reader that cannot keep up (as a socket's)."""
        if self.done:
            return
        if self.missed:
            if self.paused:
                self.missed += 1
                return
            self._queue({"event": "lagged", "missed": self.missed}, STREAM_EVENT)
            self.missed = 0
        if self.paused and self.held_events >= WATCH_MAX_EVENTS:
            self.missed = self.held_events + 1
            self.outbox = collections.deque(e for e in self.outbox if e[2] != STREAM_EVENT)
            self.held_events = 0
            return
        self._queue(message, STREAM_EVENT)

    def push(self, message: dict) -> None:
        self._queue(message, MESSAGE)

    def end_stream(self, message: dict) -> None:
        if self.blocked is not None and not self.done:
            self._unblock()
            self.ending = True
            self._queue(message, MESSAGE)

    def stop(self) -> None:
        """Shutting down: a finish that waits for its next task is answered without one;
        another waiting request or a stream gets `unavailable`."""
        waiter = self.blocked
        if isinstance(waiter, Waiter) and waiter.changed_already:
            self.finish(waiter.request.id, waiter.expire())
        elif isinstance(waiter, Waiter):
            self.finish_error(waiter.request.id, Unavailable("shutting down"))
        elif waiter is not None:
            self._unblock()
            self._reply(error_reply(waiter.id, Unavailable("shutting down")))

    # -- sending ----------------------------------------------------------------------

    def _reply(self, reply: dict) -> None:
        self.ending = self.blocked is None  # else a stream follows its reply
        self._queue(reply, REPLY)

    def _queue(self, message: dict, kind: str) -> None:
        if self.done:
            return
        self.outbox.append((self.journal.last_seq, message, kind))
        self.held_events += kind == STREAM_EVENT
        if kind != STREAM_EVENT:
            return self._deliver()
        if not self.delivery_due:  # the events of many requests answered together: one write
            self.delivery_due = True
            asyncio.get_running_loop().call_soon(self._deliver_due)

    def _deliver_due(self) -> None:
        self.delivery_due = False
        self._deliver()

    def _deliver(self) -> None:
        """Send what the journal holds durably; an event it failed to keep never happened."""
        if self.done or self.awaiting_journal or (self.subscriber and self.paused):
            return
        durable, failure = self.journal.durable_seq, self.journal.failure
        out = []
        while self.outbox and (self.outbox[0][0] <= durable or failure):
            seq, message, kind = self.outbox.popleft()
            self.held_events -= kind == STREAM_EVENT
            if seq > durable and kind == STREAM_EVENT:
                continue
            if seq > durable and kind == REPLY:
                message = error_reply(message["id"], Unavailable(f"storage failing: {failure}"))
            out.append((message, kind))
        if out:
            self.unflushed += self.sink.send(out)
        if self.outbox:
            self.awaiting_journal = True
            self.journal.when_durable(self.outbox[-1][0], self._on_durable)
        elif self.ending:
            self._end()

    def _on_durable(self) -> None:
        self.awaiting_journal = False
        self._deliver()

    def _unblock(self) -> None:
        if isinstance(self.blocked, Waiter):
            self.blocked.end()
        self.blocked = None

    def _end(self) -> None:
        if self.done:
            return
        self.done = True
        self._unblock()
        for forget in self.daemon.connections.forgetters:
            forget(self)
        if not self.finished.done():
            self.finished.set_result(None)


# -- what the overview counts ----------------------------------------------------------------


class DashboardStats:
    """Tasks finished per stream and minute over the last half hour, and the latest
    failures: an observer, so the overview costs the same at a million tasks."""

    MINUTES = 30

    def __init__(self):
        self.finished: dict[str, dict[int, int]] = {}  #: stream -> minute -> tasks
        self.failures: collections.deque = collections.deque(maxlen=8)  #: task ids, newest last

    def seed(self, queue: Queue, now: float) -> None:
        """Count what ended in the last half hour, and find the latest failures."""
        since = now - self.MINUTES * 60
        for finished_at, task_id in itertools.islice(reversed(queue.index.finish_log), 200_000):
            task = queue.tasks.get(task_id)
            if task is None or task.finished_at != finished_at:
                continue
            if finished_at >= since and task.status != "cancelled":
                self._count(task.stream, finished_at)
            if task.status == "failed" and len(self.failures) < self.failures.maxlen:
                self.failures.appendleft(task_id)
            if finished_at < since and len(self.failures) == self.failures.maxlen:
                break

    def on_commit(self, events: list[Event], queue: Queue) -> None:
        for event in events:
            kind = type(event)
            if kind is TaskCompleted or kind is TaskFailed:
                task = queue.tasks.get(event.id)
                if task is not None:
                    self._count(task.stream, event.at)
                if kind is TaskFailed:
                    self.failures.append(event.id)

    def _count(self, stream: str, at: float) -> None:
        minutes = self.finished.setdefault(stream, {})
        minute = int(at // 60)
        minutes[minute] = minutes.get(minute, 0) + 1
        if len(minutes) > 2 * self.MINUTES:
            for old in [m for m in minutes if m <= minute - self.MINUTES]:
                del minutes[old]

    def per_minute(self, stream: str, now: float) -> list[int]:
        """Tasks finished in each of the last MINUTES minutes, oldest first."""
        minutes, last = self.finished.get(stream, {}), int(now // 60)
        return [minutes.get(m, 0) for m in range(last - self.MINUTES + 1, last + 1)]


# -- the OpenAPI document ----------------------------------------------------------------------


def openapi_document(port: int) -> dict:
    """OpenAPI 3.1 of the HTTP API, generated from the request Structs: a path per op, its
    body the request without ``op`` (the URL names it), GET parameters for the safe ones."""
    _, schemas = msgspec.json.schema_components(AnyRequest.__args__,
                                                ref_template="#/components/schemas/{name}")
    schemas.update(OPENAPI_REPLIES)
    paths = {path: operations for path, operations in OPENAPI_FIXED_PATHS.items()}
    for cls in AnyRequest.__args__:
        op, schema = cls.__struct_config__.tag, schemas[cls.__name__]
        del schema["properties"]["op"]
        schema["required"] = [name for name in schema.get("required", ()) if name != "op"]
        paths[API_PREFIX + op] = openapi_operations(cls, schema)
    return {
        "openapi": "3.1.0",
        "info": {"title": "SparkQ", "version": VERSION,
                 "description": "The requests of the SparkQ socket protocol over HTTP."},
        "servers": [{"url": f"http://127.0.0.1:{port}"}],
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "cookie": {"type": "apiKey", "in": "cookie", "name": f"sparkq-{port}"}}},
        "security": [{"bearer": []}, {"cookie": []}],
    }


def openapi_operations(cls: type, schema: dict) -> dict:
    """The POST (and for a safe op the GET) of one request type."""
    op, name = cls.__struct_config__.tag, cls.__name__
    summary = (cls.__doc__ or f"The {op} request.").strip().splitlines()[0]
    replies = {"200": {"description": "the reply: ok with its result, or an error",
                       "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Reply"}}}},
               "default": {"description": "refused", "content": {
                   "application/json": {"schema": {"$ref": "#/components/schemas/Reply"}}}}}
    operations = {"post": {"operationId": op, "summary": summary, "responses": replies,
                           "requestBody": {"required": False, "content": {"application/json": {
                               "schema": {"$ref": f"#/components/schemas/{name}"}}}}}}
    if cls.may_wait:  # held until answered: a client should allow for it
        operations["post"]["x-sparkq-may-wait"] = True
    if cls.safe:
        required = set(schema["required"])
        operations["get"] = {"operationId": f"{op}.get", "summary": summary, "responses": replies,
                             "parameters": [{"name": field, "in": "query", "schema": prop,
                                             "required": field in required}
                                            for field, prop in schema["properties"].items()]}
    return operations


OPENAPI_REPLIES = {
    "Reply": {"title": "Reply", "type": "object", "required": ["id", "ok"], "properties": {
        "id": {"description": "the request's id, echoed"}, "ok": {"type": "boolean"},
        "result": {"description": "the op's result, as over the socket"},
        "error": {"$ref": "#/components/schemas/Error"}}},
    "Error": {"title": "Error", "type": "object", "required": ["code", "message"], "properties": {
        "code": {"enum": sorted({*HTTP_STATUS, *HTTP_CODES.values()})},
        "message": {"type": "string"}}},
}
OPENAPI_FIXED_PATHS = {
    "/health": {"get": {"operationId": "health", "summary": "Liveness: no token, no data.",
                        "security": [], "responses": {"200": {"description": "alive"}}}},
    "/ready": {"get": {"operationId": "ready", "summary": "Recovered, and the journal writable.",
                       "responses": {"200": {"description": "ready"},
                                     "503": {"description": "not ready, with the reason"}}}},
    "/metrics": {"get": {"operationId": "metrics.text", "summary": "Prometheus text format.",
                         "responses": {"200": {"description": "the metrics", "content": {
                             "text/plain": {"schema": {"type": "string"}}}}}}},
    "/api/v1/openapi.json": {"get": {"operationId": "openapi", "summary": "This document.",
                                     "responses": {"200": {"description": "OpenAPI 3.1"}}}},
}


# -- the listener ---------------------------------------------------------------------------


class Web:
    """The HTTP listener, started after recovery when ``http.listen`` is set. The queue
    never fails to start because of it: a missing tornado or a port in use is a warning,
    and `status` says why there is no URL."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.tokens = TokenFile(os.path.join(daemon.paths.data_dir, "http-token"))
        self.refusals = RefusalLog()
        self.stats = DashboardStats()
        self.exchanges: set[HttpExchange] = set()
        self.server = self.guard = self.pages = None
        self.url: str | None = None  #: where it listens, once it does
        self.reason = "not started yet"  #: why it does not listen
        self.codec = JsonLines(daemon.config.server.max_frame_bytes)  #: decodes POST bodies
        self._openapi: bytes | None = None

    def start(self) -> None:
        """Listen on ``http.listen``, or say why not."""
        listen = self.daemon.config.http.listen
        if listen is None:
            self.reason = "the dashboard is off (http.listen: null)"
            return
        try:
            import tornado.httpserver
            import tornado.netutil
            import tornado.template
            import tornado.web
        except ImportError:
            return self._not_listening("tornado is not installed (pip install tornado)")
        host, port = listen_address(listen)
        try:
            sockets = tornado.netutil.bind_sockets(port, host)
            self.tokens.load()
        except OSError as exc:
            return self._not_listening(f"cannot listen on {listen}: {exc.strerror or exc}")
        port = sockets[0].getsockname()[1]
        self.guard = Guard(self.tokens, port)
        self.pages = Pages(self, tornado.template)
        self.server = tornado.httpserver.HTTPServer(
            web_application(self, tornado.web), max_body_size=MAX_HTTP_BODY)
        self.server.add_sockets(sockets)
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        self.stats.seed(self.daemon.queue, time.time())
        self.daemon.observers += (self.stats,)
        log.info("dashboard on %sui/ (`sparkqctl ui` opens it with its token)", self.url)

    def _not_listening(self, reason: str) -> None:
        self.reason = reason
        log.warning("no dashboard or HTTP API: %s; the queue runs without them", reason)

    def status(self) -> dict:
        """What `status` shows: the URL, or why there is none."""
        return {"url": self.url and self.url + "ui/", "reason": None if self.url else self.reason}

    def ui(self, request: Ui) -> dict:
        """The `ui` op: the URL that signs the browser in, after a new token if asked."""
        if self.url is None:
            return {"url": None, "reason": self.reason, "token_file": None}
        if request.new_token:
            self.tokens.renew()
            log.info("new dashboard token: browsers signed in must open `sparkqctl ui` again")
        return {"url": f"{self.url}?token={self.tokens.token}", "reason": None,
                "token_file": self.tokens.path}

    def ready(self) -> tuple[bool, str]:
        """`/ready`: recovery is done (it listens only after) and the journal takes writes."""
        journal = self.daemon.journal
        problem = journal.failure or journal.stalled or (
            "shutting down" if self.daemon.stopping else None)
        return problem is None, problem or "ready"

    def openapi(self) -> bytes:
        if self._openapi is None:
            self._openapi = msgspec.json.encode(openapi_document(self.guard.port))
        return self._openapi

    def metrics(self) -> str:
        return self.daemon.handle(Metrics())

    def call(self, op: str, **fields) -> Any:
        """A read for a page, through the one dispatch: its result in wire form."""
        request = self.decode(op, fields)
        return self.daemon.replies.wire(self.daemon.handle(request))

    @staticmethod
    def decode(op: str, fields: dict) -> Request:
        try:
            return msgspec.convert({**fields, "op": op}, AnyRequest)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"unknown op {op!r}" if op not in OPS else _path_first(str(exc))) from None

    # -- stopping -----------------------------------------------------------------------

    def stop_listening(self) -> None:
        if self.server is not None:
            self.server.stop()

    def stop_exchanges(self) -> None:
        for exchange in list(self.exchanges):
            exchange.stop()

    async def close(self) -> None:
        """Close every HTTP connection, those that still wait included, within 5 s."""
        if self.server is None:
            return
        try:
            await asyncio.wait_for(self.server.close_all_connections(), timeout=5)
        except TimeoutError:
            log.warning("HTTP clients did not take their replies; closing them")


# -- tornado's handlers: thin, over Guard, the requests from HTTP and Pages ----------------------
#
# Each is a mixin here and becomes a tornado RequestHandler when the listener starts (tornado
# is imported only then): ``web_application`` makes the classes, each with ``web`` set.

encode_json = msgspec.json.Encoder().encode


class BaseHandler:
    """Every response: the security headers, JSON errors, and the checks before anything runs;
    bodies are streamed in (``stream_request_body``), so none is parsed as a form."""

    web: Web
    public = False  #: served without the token (`/health`)
    signs_in = False  #: a page: ``?token=`` sets the cookie
    via = None  #: how the request proved it has the token

    def initialize(self) -> None:
        self.body = bytearray()

    def data_received(self, chunk: bytes) -> None:
        if not self._finished and len(self.body) <= self.web.daemon.connections.max_frame:
            self.body += chunk  # past the limit only its size matters: it is refused

    def set_default_headers(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.set_header(name, value)
        self.clear_header("Server")

    def prepare(self) -> None:
        try:
            self.admit()
        except HttpRefusal as refusal:
            self.refuse(refusal)

    def admit(self) -> None:
        """Host first, then the token (a page takes it from ``?token=``), then for a cookie
        the origin, then for a change its JSON body."""
        headers, guard = self.request.headers, self.web.guard
        guard.check_host(self.request.host)
        if self.public:
            return
        token = self.signs_in and self.get_query_argument("token", None)
        if token and self.request.method == "GET" and guard.tokens.matches(token):
            self.via = "token"
            return
        self.via = guard.authenticate(headers.get("Authorization"),
                                      self.get_cookie(guard.cookie_name))
        changes = self.request.method not in ("GET", "HEAD")
        if self.via == "cookie":
            guard.check_origin(self.request.host, headers.get("Origin"),
                               headers.get("Sec-Fetch-Site"), changes)
        if changes:
            guard.check_json(headers.get("Content-Type"))

    def refuse(self, refusal: HttpRefusal) -> None:
        if refusal.status in (401, 403):
            self.web.refusals.note(refusal, f"{self.request.method} {self.request.path} from "
                                            f"{self.request.remote_ip}")
        self.reply(refusal.status, refusal.reply(), refusal.headers)

    def reply(self, status: int, body: dict, headers: dict | None = None) -> None:
        self.set_status(status)
        for name, value in (headers or {}).items():
            self.set_header(name, value)
        self.set_header("Content-Type", "application/json")
        self.finish(encode_json(body))

    def write_error(self, status_code: int, **kwargs) -> None:
        code = HTTP_CODES.get(status_code, "internal" if status_code >= 500 else "bad_request")
        self.set_header("Content-Type", "application/json")
        self.finish(encode_json({"id": None, "ok": False, "error": {
            "code": code, "message": self._reason}}))

    def sign_in(self) -> None:
        """``?token=``: the cookie, then the same page without the token in its URL."""
        self.set_cookie(self.web.guard.cookie_name, self.web.guard.tokens.cookie, httponly=True,
                        samesite="Strict", max_age=COOKIE_DAYS * 86400)
        query = [(k, v) for k, vs in self.request.query_arguments.items() if k != "token"
                 for v in vs]
        path = "/ui/" if self.request.path == "/" else self.request.path
        self.redirect(path + (f"?{urllib.parse.urlencode(query, doseq=True)}" if query else ""),
                      status=303)


class HealthHandler(BaseHandler):
    public = True

    def get(self) -> None:
        self.reply(200, {"ok": True})


class ReadyHandler(BaseHandler):
    def get(self) -> None:
        ready, why = self.web.ready()
        self.reply(200 if ready else 503, {"ready": ready, "reason": why})


class MetricsHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.web.metrics())


class OpenApiHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(self.web.openapi())


class ApiHandler(BaseHandler):
    """``/api/v1/<op>``: the op's request from the body (POST) or the query (GET), carried
    out by an HttpExchange; this handler is its sink, writing what it sends."""

    exchange: HttpExchange | None = None

    async def get(self, op: str) -> None:
        query = dict(self.request.query_arguments)
        last_event = self.request.headers.get("Last-Event-ID", "")
        if op == "watch" and "after_seq" not in query and last_event.isdigit():
            query["after_seq"] = [last_event.encode()]  # an EventSource reconnecting
        await self.answer(lambda: query_request(op, query))

    async def post(self, op: str) -> None:
        body, limit = bytes(self.body), self.web.daemon.connections.max_frame
        if len(body) > limit:
            return self.reply(413, error_reply(None, TooLarge(
                f"body of more than {limit} bytes")))
        await self.answer(lambda: body_request(op, body, self.web.codec))

    async def answer(self, decode) -> None:
        #: An EventSource gets events even for a reply that opens no stream.
        self.events = (self.request.method == "GET" and "text/event-stream"
                       in self.request.headers.get("Accept", ""))
        try:
            request = decode()
        except HttpRefusal as refusal:
            return self.refuse(refusal)
        except BadRequest as exc:
            return self.reply(400, error_reply(None, exc))
        self.exchange = HttpExchange(self.web.daemon, self)
        self.web.exchanges.add(self.exchange)
        self.exchange.begin(request)
        await self.exchange.finished
        self.web.exchanges.discard(self.exchange)
        if not self.exchange.lost:
            self.finish()

    def send(self, messages: list[tuple[dict, str]]) -> int:
        """Write messages: the whole response, or the next messages of a stream."""
        if not (self.exchange.streaming or self.events):
            [(message, _)] = messages
            self.set_status(http_status(message))
            self.set_header("Content-Type", "application/json")
            self.write(self.encoded(message))
            return 0
        if messages[0][1] == REPLY:
            self.start_stream()
        data = b"".join(self.frame(message, self.encoded(message)) for message, _ in messages)
        self.write(data)
        self.flush().add_done_callback(lambda done: self.flushed(done, len(data)))
        return len(data)

    @staticmethod
    def encoded(message: dict) -> bytes:
        try:
            return encode_json(message)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            log.error("cannot encode an HTTP reply: %r", exc)
            return encode_json(error_reply(None, SparkQError(f"internal error: {exc}")))

    def start_stream(self) -> None:
        if self.request.method == "GET":  # EventSource
            self.set_header("Content-Type", "text/event-stream")
            self.write(b"retry: 2000\n\n")
        else:
            self.set_header("Content-Type", "application/x-ndjson")

    def frame(self, message: dict, data: bytes) -> bytes:
        """A stream's message: an SSE event (the watch cursor as its id), or a line."""
        if self.request.method != "GET":
            return data + b"\n"
        seq = message.get("seq") or (isinstance(message.get("result"), dict)
                                     and message["result"].get("seq"))
        return (b"id: %d\n" % seq if seq else b"") + b"data: " + data + b"\n\n"

    def flushed(self, done, nbytes: int) -> None:
        done.exception()  # a client gone: on_connection_close says so
        self.exchange.flushed(nbytes)

    def on_connection_close(self) -> None:
        if self.exchange is not None:
            self.exchange.gone()


class PageHandler(BaseHandler):
    """A dashboard page: server-rendered, with a nonce for its one script."""

    signs_in = True

    def get(self, *args) -> None:
        if self.via == "token":
            return self.sign_in()
        nonce = secrets.token_urlsafe(16)
        self.set_header("Content-Security-Policy", CSP.format(nonce=nonce))
        self.set_header("Content-Type", "text/html; charset=utf-8")
        try:
            page = self.render_page(nonce, *args)
        except SparkQError as exc:
            self.set_status(HTTP_STATUS.get(exc.code, 500))
            page = self.web.pages.error(nonce, exc)
        self.finish(page)


class OverviewHandler(PageHandler):
    def render_page(self, nonce: str) -> bytes:
        return self.web.pages.overview(nonce)


class TasksHandler(PageHandler):
    def render_page(self, nonce: str) -> bytes:
        query = {k: self.get_query_argument(k) for k in self.request.query_arguments}
        return self.web.pages.tasks(nonce, query)


class TaskHandler(PageHandler):
    def render_page(self, nonce: str, task_id: str) -> bytes:
        return self.web.pages.task(nonce, int(task_id))


class SchedulesHandler(PageHandler):
    def render_page(self, nonce: str) -> bytes:
        return self.web.pages.schedules(nonce)


class AssetHandler(BaseHandler):
    signs_in = True

    def get(self, name: str) -> None:
        if self.via == "token":
            return self.sign_in()
        kind, text = ASSETS[name]
        self.set_header("Content-Type", kind)
        self.set_header("Cache-Control", "no-cache")
        self.finish(text)


class RootHandler(BaseHandler):
    signs_in = True

    def get(self) -> None:
        if self.via == "token":
            return self.sign_in()
        self.redirect("/ui/", status=303)


class UnknownHandler(BaseHandler):
    def prepare(self) -> None:
        super().prepare()
        if not self._finished:
            self.refuse(HttpRefusal(404, f"no page or API at {self.request.path}"))


ROUTES = (
    (r"/", RootHandler), (r"/health", HealthHandler), (r"/ready", ReadyHandler),
    (r"/metrics", MetricsHandler), (r"/api/v1/openapi\.json", OpenApiHandler),
    (r"/api/v1/([a-z][a-z0-9._-]*)", ApiHandler), (r"/ui/", OverviewHandler),
    (r"/ui/tasks", TasksHandler), (r"/ui/tasks/([0-9]{1,18})", TaskHandler),
    (r"/ui/schedules", SchedulesHandler), (r"/ui/(app\.js|app\.css)", AssetHandler),
)
CSP = ("default-src 'none'; script-src 'nonce-{nonce}'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def web_application(web: Web, tornado_web):
    """The tornado application: each handler mixin made a RequestHandler that knows ``web``."""
    def handler(mixin: type) -> type:
        made = type(mixin.__name__, (mixin, tornado_web.RequestHandler), {"web": web})
        return tornado_web.stream_request_body(made)

    return tornado_web.Application(
        [(path, handler(mixin)) for path, mixin in ROUTES],
        default_handler_class=handler(UnknownHandler), compress_response=False,
        xsrf_cookies=False,  # Guard's checks instead: token, Origin, POST with JSON
        log_function=lambda h: log.debug("HTTP %d %s %s", h.get_status(), h.request.method,
                                         h.request.uri))


# -- the pages ---------------------------------------------------------------------------------

NAV = (("/ui/", "Overview"), ("/ui/tasks", "Tasks"), ("/ui/schedules", "Schedules"))
#: Fields the task page shows in their own places, not in its table of fields.
TASK_OWN_PLACES = ("payload", "result", "history", "workspace")
#: A task's workspace as its page shows it, field by field.
TASK_WORKSPACE_FIELDS = ("kind", "path", "branch", "ref", "commit", "state")


def shown_time(value: str | None) -> str:
    """An RFC 3339 time as a page shows it: ``2026-11-22 09:15:02Z``."""
    return f"{value[:10]} {value[11:19]}Z" if value else "–"


def shown_value(value: Any, width: int | None = None) -> str:
    """A field's value as text: strings as they are, anything else as JSON."""
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    if width is not None:
        text = text.splitlines()[0] if text.strip() else text
        text = text if len(text) <= width else text[:width - 1] + "…"
    return text


def shown_size(nbytes: int | None) -> str:
    """Bytes as people read them: 912K, 40M, 1.2G (as `sparkqctl workspaces` shows them)."""
    if nbytes is None:
        return "–"
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= 10 * scale:
            return f"{nbytes // scale}{unit}"
        if nbytes >= scale:
            return f"{nbytes / scale:.1f}{unit}"
    return f"{nbytes}B"


def shown_age(seconds: float | None) -> str:
    """A duration at a glance: 45s, 12m, 30h."""
    if seconds is None:
        return "–"
    seconds = max(0, int(seconds))
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" if seconds < 7200 else \
        f"{seconds // 3600}h"


def pretty_json(value: Any) -> str:
    """A payload or result for a page: a string as it is, anything else as indented JSON."""
    if isinstance(value, str):
        return value
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


def sparkline_bars(counts: list[int], height: int = 24) -> list[tuple[int, int, int]]:
    """(x, y, height) of the bars of a sparkline, the highest count filling the height."""
    top = max(counts, default=0) or 1
    return [(3 * i, height - h, h) for i, n in enumerate(counts)
            if (h := max(1, round(n * height / top)) if n else 0)]


class Pages:
    """The dashboard's pages, each composed of small parts rendered by tornado templates
    that escape every value (``{% raw %}`` only ever takes another template's output).
    Pages read through ``Web.call``: the same dispatch as every request."""

    def __init__(self, web: Web, template_module):
        self.web = web
        self.templates = {name: template_module.Template(text, name=name, whitespace="single")
                          for name, text in PAGE_TEMPLATES.items()}

    def part(self, name: str, **values) -> bytes:
        return self.templates[name].generate(
            when=shown_time, short=shown_value, pretty=pretty_json, quote=urllib.parse.quote,
            size=shown_size, age=shown_age, action=self.action, **values)

    def layout(self, nonce: str, title: str, here: str, watch: str, *parts: bytes) -> bytes:
        return self.part("layout", nonce=nonce, title=title, here=here, nav=NAV, watch=watch,
                         body=b"".join(parts))

    def action(self, op: str, fields: dict, label: str, confirm: str, ident: str) -> bytes:
        """A button that carries out ``op`` after the user confirms it."""
        return self.part("action", op=op, fields=fields, label=label, confirm=confirm,
                         ident=ident)

    def error(self, nonce: str, exc: SparkQError) -> bytes:
        return self.layout(nonce, "Not found" if isinstance(exc, NotFound) else "Refused",
                           "", "", self.part("problem", message=str(exc)))

    # -- overview --------------------------------------------------------------------------

    def overview(self, nonce: str) -> bytes:
        call, now = self.web.call, time.time()
        return self.layout(
            nonce, "Overview", "/ui/", API_PREFIX + "watch?coalesce=true",
            self.streams_part(call("stream.list"), now), self.workers_part(call("workers")),
            self.part("locks", locks=call("locks")),
            self.part("workspaces", workspaces=call("workspace.list")), self.failures_part(),
            self.part("next_firings", schedules=self.schedule_list()),
            self.part("health", status=call("status")))

    def streams_part(self, streams: list[dict], now: float) -> bytes:
        lines = {s["name"]: self.sparkline(self.web.stats.per_minute(s["name"], now))
                 for s in streams}
        return self.part("streams", streams=streams, statuses=STATUSES, sparklines=lines)

    def sparkline(self, counts: list[int]) -> bytes:
        return self.part("sparkline", bars=sparkline_bars(counts), width=3 * len(counts),
                         total=sum(counts), minutes=len(counts))

    def workers_part(self, workers: list[dict]) -> bytes:
        busy = sum(w["state"] == "busy" for w in workers)
        return self.part("workers", workers=workers, busy=busy,
                         restarts=sum(w["restarts"] for w in workers))

    def failures_part(self) -> bytes:
        tasks = []
        for task_id in reversed(self.web.stats.failures):
            with contextlib.suppress(NotFound):
                task = self.web.call("task", task=task_id)
                if task["status"] == "failed":
                    tasks.append(task)
        return self.part("failures", tasks=tasks)

    def schedule_list(self) -> list[dict]:
        return self.web.call("schedule.list")

    # -- tasks -------------------------------------------------------------------------------

    def tasks(self, nonce: str, query: dict[str, str]) -> bytes:
        filters = {k: v for k in ("stream", "session", "status", "tool", "text")
                   if (v := query.get(k, "").strip())}
        watch = API_PREFIX + "watch?coalesce=true" + (
            f"&streams={urllib.parse.quote(filters['stream'])}" if "stream" in filters else "")
        return self.layout(nonce, "Tasks", "/ui/tasks", watch,
                           self.enqueue_part(filters.get("stream")), self.filters_part(filters),
                           self.task_list_part(filters, query.get("before", "")))

    def enqueue_part(self, stream: str | None) -> bytes:
        tools = self.web.call("tools")["tools"]
        streams = [s["name"] for s in self.web.call("stream.list") if s["status"] != "ended"]
        return self.part("enqueue", tools=tools, streams=streams, chosen=stream or DEFAULT)

    def filters_part(self, filters: dict) -> bytes:
        return self.part("filters", filters=filters, statuses=STATUSES,
                         streams=[s["name"] for s in self.web.call("stream.list")],
                         sessions=[s["name"] for s in self.web.call("session.list")],
                         tools=sorted(self.web.call("tools")["tools"]))

    def task_list_part(self, filters: dict, before: str) -> bytes:
        """One page of tasks, newest first, looking at PAGE_WINDOW ids at most."""
        queue = self.web.daemon.queue
        high = int(before) - 1 if before.isdigit() and int(before) > 0 else queue.next_id - 1
        low = max(1, high - PAGE_WINDOW + 1)
        try:
            tasks = self.web.call("tasks", newest=True, min_id=low, max_id=max(high, 1),
                                  limit=PAGE_SIZE + 1, **filters)
        except SparkQError as exc:
            return self.part("task_list", tasks=[], problem=str(exc), older=None,
                             searched=None, total=None, filters=filters, before=before)
        older = searched = None
        if len(tasks) > PAGE_SIZE:
            tasks, older = tasks[:PAGE_SIZE], tasks[PAGE_SIZE - 1]["id"]
        elif low > next(iter(queue.tasks), low):
            older, searched = low, (low, high)  # the window ran out: offer the next one
        return self.part("task_list", tasks=tasks, problem=None, older=older, searched=searched,
                         total=self.matching_count(filters), filters=filters, before=before)

    def matching_count(self, filters: dict) -> int | None:
        """How many tasks match, where the counts kept per stream say (not for tool or text)."""
        if filters.keys() - {"stream", "session", "status"}:
            return None
        streams = [s for s in self.web.call("stream.list")
                   if filters.get("stream", s["name"]) == s["name"]
                   and filters.get("session", s["session"]) == s["session"]]
        status = filters.get("status")
        return sum(n for s in streams for k, n in s["counts"].items() if status in (None, k))

    # -- one task ------------------------------------------------------------------------------

    def task(self, nonce: str, task_id: int) -> bytes:
        task = self.web.call("task", task=task_id)
        log_text = self.web.call("logs", task=task_id, tail=500)["log"]
        fields = {k: v for k, v in task.items() if k not in TASK_OWN_PLACES}
        return self.layout(
            nonce, f"Task {task_id}", "/ui/tasks", f"{API_PREFIX}watch?coalesce=true&tasks={task_id}",
            self.part("task_head", task=task),
            self.part("task_fields", fields=fields, task=task,
                      workspace_fields=TASK_WORKSPACE_FIELDS),
            self.part("task_history", history=task.get("history", [])),
            self.part("task_log", task=task, log=log_text))

    # -- schedules -----------------------------------------------------------------------------

    def schedules(self, nonce: str) -> bytes:
        listed = self.schedule_list()
        shown = [self.web.call("schedule.show", name=s["name"]) for s in listed]
        return self.layout(nonce, "Schedules", "/ui/schedules", API_PREFIX + "watch?coalesce=true",
                           self.part("schedules", schedules=shown))


#: The page parts, tornado templates: ``{{ }}`` escapes, ``{% raw %}`` takes another part.
PAGE_TEMPLATES = {
    "layout": """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>{{ title }} · SparkQ</title>
<link rel="stylesheet" href="/ui/app.css">
<script nonce="{{ nonce }}" src="/ui/app.js" defer></script>
</head>
<body data-watch="{{ watch }}">
<a class="skip" href="#main">Skip to the content</a>
<header class="top">
<nav aria-label="Dashboard">
<a class="brand" href="/ui/">SparkQ</a>
{% for href, label in nav %}<a href="{{ href }}"{% if href == here %} aria-current="page"{% end %}>{{ label }}</a>{% end %}
</nav>
<p id="live" class="live" role="status">not live</p>
</header>
<main id="main" tabindex="-1">
<h1>{{ title }}</h1>
<p id="notice" class="notice" role="status" aria-live="polite"></p>
{% raw body %}
</main>
</body>
</html>
""",
    "problem": """<p class="problem">{{ message }}</p>""",
    "action": """<form class="action" data-op="{{ op }}" data-confirm="{{ confirm }}">
{% for name, value in fields.items() %}<input type="hidden" name="{{ name }}" value="{{ value }}"{% if type(value) is int %} data-type="int"{% end %}>{% end %}
<button type="submit" id="{{ ident }}">{{ label }}</button>
</form>""",
    "sparkline": """<svg class="spark" viewBox="0 0 {{ width }} 24" width="{{ width }}" height="24" role="img" aria-label="{{ total }} finished in the last {{ minutes }} minutes">
<title>{{ total }} finished in the last {{ minutes }} minutes</title>
<rect class="axis" x="0" y="23" width="{{ width }}" height="1"></rect>
{% for x, y, h in bars %}<rect x="{{ x }}" y="{{ y }}" width="2" height="{{ h }}"></rect>{% end %}
</svg>""",
    "streams": """<section id="streams" class="panel wide" data-live aria-labelledby="streams-h">
<h2 id="streams-h">Streams</h2>
<div class="scroll"><table>
<thead><tr><th scope="col">Stream</th><th scope="col">Session</th><th scope="col">State</th>
{% for status in statuses %}<th scope="col" class="num">{{ status }}</th>{% end %}
<th scope="col">Finished per minute</th><th scope="col"><span class="sr">Actions</span></th></tr></thead>
<tbody>
{% for s in streams %}{% set state = "ended" if s["status"] == "ended" else "paused" if s["paused"] else "active" %}
<tr><th scope="row"><a href="/ui/tasks?stream={{ quote(s['name']) }}">{{ s["name"] }}</a></th>
<td>{{ s["session"] }}</td><td><span class="badge {{ state }}">{{ state }}</span></td>
{% for status in statuses %}<td class="num">{% if s["counts"].get(status) %}<a href="/ui/tasks?stream={{ quote(s['name']) }}&amp;status={{ status }}">{{ s["counts"][status] }}</a>{% else %}<span class="zero">0</span>{% end %}</td>{% end %}
<td>{% raw sparklines[s["name"]] %}</td>
<td>{% if state == "paused" %}{% raw action("stream.resume", {"name": s["name"]}, "Resume", "Resume stream " + s["name"] + "?", "resume-" + s["name"]) %}{% elif state == "active" %}{% raw action("stream.pause", {"name": s["name"]}, "Pause", "Pause stream " + s["name"] + "? Claims skip it; enqueue still works.", "pause-" + s["name"]) %}{% end %}</td></tr>
{% end %}
</tbody></table></div>
</section>
""",
    "workers": """<section id="workers" class="panel" data-live aria-labelledby="workers-h">
<h2 id="workers-h">Workers</h2>
{% if workers %}<p>{{ busy }} busy, {{ len(workers) - busy }} idle or failed, {{ restarts }} restarts</p>
<div class="scroll"><table><thead><tr><th scope="col">Worker</th><th scope="col">Kind</th><th scope="col">State</th><th scope="col">Task</th><th scope="col" class="num">Done</th><th scope="col" class="num">Restarts</th></tr></thead><tbody>
{% for w in workers %}<tr><th scope="row">{{ w["name"] }}</th><td>{{ w["kind"] }}</td>
<td><span class="badge {{ w['state'] }}">{{ w["state"] }}</span>{% if w.get("error") %} <span class="reason">{{ w["error"] }}</span>{% end %}</td>
<td>{% if w["task"] %}<a href="/ui/tasks/{{ w['task'] }}">#{{ w["task"] }}</a>{% else %}–{% end %}</td>
<td class="num">{{ w["done"] }}</td><td class="num">{{ w["restarts"] }}</td></tr>{% end %}
</tbody></table></div>
{% else %}<p class="empty">No workers: the daemon runs none (workers.count: 0) and no agent claimed in the last hour.</p>{% end %}
</section>
""",
    "locks": """<section id="locks" class="panel" data-live aria-labelledby="locks-h">
<h2 id="locks-h">Held locks</h2>
{% if locks %}<div class="scroll"><table><thead><tr><th scope="col">Lock</th><th scope="col">Task</th><th scope="col">Stream</th><th scope="col">Since</th></tr></thead><tbody>
{% for lock in locks %}<tr><th scope="row">{{ lock["lock"] }}</th><td><a href="/ui/tasks/{{ lock['task'] }}">#{{ lock["task"] }}</a></td><td>{{ lock["stream"] }}</td><td><time datetime="{{ lock['since'] }}">{{ when(lock["since"]) }}</time></td></tr>{% end %}
</tbody></table></div>
{% else %}<p class="empty">No lock is held.</p>{% end %}
</section>
""",
    "workspaces": """<section id="workspaces" class="panel wide" data-live aria-labelledby="workspaces-h">
<h2 id="workspaces-h">Repository workspaces</h2>
{% if workspaces %}<div class="scroll"><table><thead><tr><th scope="col">Repository</th><th scope="col">Kind</th><th scope="col">Task</th><th scope="col">Branch</th><th scope="col" class="num">Size</th><th scope="col">State</th><th scope="col" class="num">Idle</th></tr></thead><tbody>
{% for w in workspaces %}<tr><th scope="row" title="{{ w['path'] }}">{{ w["repo"] }}</th><td>{{ w["kind"] }}</td>
<td>{% if w["task"] %}<a href="/ui/tasks/{{ w['task'] }}">#{{ w["task"] }}</a>{% if w["task_status"] %} <span class="badge {{ w['task_status'] }}">{{ w["task_status"] }}</span>{% end %}{% else %}–{% end %}</td>
<td>{{ w["branch"] or "–" }}</td><td class="num">{{ size(w["bytes"]) }}</td>
<td><span class="badge {{ w['state'] }}">{{ w["state"] }}</span></td><td class="num">{{ age(w["idle"]) }}</td></tr>{% end %}
</tbody></table></div>
{% else %}<p class="empty">No repository workspaces: a task asks for one with <code>--workspace shared</code> or <code>worktree</code>.</p>{% end %}
</section>
""",
    "failures": """<section id="failures" class="panel" data-live aria-labelledby="failures-h">
<h2 id="failures-h">Latest failures</h2>
{% if tasks %}<ul class="failures">
{% for t in tasks %}<li><a href="/ui/tasks/{{ t['id'] }}">#{{ t["id"] }}</a> {{ t["tool"] }} in {{ t["stream"] }}, <time datetime="{{ t['finished_at'] }}">{{ when(t["finished_at"]) }}</time>: <span class="reason">{{ short(t["reason"] or "", 160) }}</span></li>{% end %}
</ul>{% else %}<p class="empty">No task failed lately.</p>{% end %}
</section>
""",
    "next_firings": """<section id="next-firings" class="panel" data-live aria-labelledby="next-h">
<h2 id="next-h">Next schedule firings</h2>
{% set coming = sorted([s for s in schedules if s.get("next_at") and not s.get("paused")], key=lambda s: s["next_at"])[:5] %}
{% if coming %}<ul>{% for s in coming %}<li><a href="/ui/schedules#schedule-{{ s['name'] }}">{{ s["name"] }}</a> at <time datetime="{{ s['next_at'] }}">{{ when(s["next_at"]) }}</time></li>{% end %}</ul>
{% elif not schedules %}<p class="empty">No schedules yet (<code>sparkqctl schedule add</code>).</p>
{% else %}<p class="empty">No schedule is due to fire.</p>{% end %}
</section>
""",
    "health": """<section id="health" class="panel" data-live aria-labelledby="health-h">
<h2 id="health-h">Journal and snapshot</h2>
{% set journal, snapshot = status["journal"], status["snapshot"] %}
<dl class="fields">
<dt>Journal</dt><dd>{% if journal["failure"] %}<span class="badge failed">failing</span> {{ journal["failure"] }}{% else %}<span class="badge completed">ok</span> record {{ journal["seq"] }}, durable to {{ journal["durable_seq"] }}, fsync {{ journal["fsync"] }}, {{ journal["segments"] }} segment{{ "" if journal["segments"] == 1 else "s" }}{% end %}</dd>
<dt>Snapshot</dt><dd>{% if snapshot.get("error") %}<span class="badge failed">failing</span> {{ snapshot["error"] }}{% elif snapshot.get("at") %}<span class="badge completed">ok</span> at record {{ snapshot["seq"] }}, <time datetime="{{ snapshot['at'] }}">{{ when(snapshot["at"]) }}</time>{% if snapshot.get("seconds") is not None %} in {{ snapshot["seconds"] }} s{% end %}{% else %}none yet{% end %}</dd>
<dt>Daemon</dt><dd>sparkqd {{ status["version"] }}, pid {{ status["pid"] }}, up {{ int(status["uptime"]) }} s, {{ status["tasks"] }} tasks, {{ status["connections"] }} connections</dd>
</dl>
</section>
""",
    "enqueue": """<section id="enqueue" class="panel" aria-labelledby="enqueue-h">
<details><summary><h2 id="enqueue-h">Enqueue a task</h2></summary>
<form class="action grid" data-op="enqueue" data-confirm="Enqueue this task?">
<label>Tool <select name="tool" id="enqueue-tool">{% for name, tool in tools.items() %}<option value="{{ name }}">{{ name }}{% if tool["description"] %} – {{ tool["description"] }}{% end %}</option>{% end %}</select></label>
<label>Stream <select name="stream" id="enqueue-stream">{% for name in streams %}<option{% if name == chosen %} selected{% end %}>{{ name }}</option>{% end %}</select></label>
<label class="full">Payload <textarea name="payload" id="enqueue-payload" rows="3" data-type="payload"></textarea></label>
<label class="check"><input type="checkbox" name="payload_is_json" data-type="skip"> the payload is JSON</label>
<label>Priority <input name="priority" type="number" step="1" data-type="int" placeholder="0"></label>
<label>Delay (s) <input name="delay" type="number" min="0" step="any" data-type="float"></label>
<label>Timeout (s) <input name="timeout" type="number" min="0" step="any" data-type="float"></label>
<label>Max attempts <input name="max_attempts" type="number" min="1" step="1" data-type="int"></label>
<label>After (ids) <input name="after" data-type="ids" placeholder="3, 4"></label>
<label>Unique key <input name="key"></label>
<label>Lock <input name="lock"></label>
<p class="full"><button type="submit" id="enqueue-submit">Enqueue</button></p>
</form></details>
</section>
""",
    "filters": """<section id="filters" class="panel" aria-labelledby="filters-h">
<h2 id="filters-h" class="sr">Filter tasks</h2>
<form class="grid" method="get" action="/ui/tasks" role="search">
{% for name, label, options in (("stream", "Stream", streams), ("session", "Session", sessions), ("status", "Status", statuses), ("tool", "Tool", tools)) %}
<label>{{ label }} <select name="{{ name }}"><option value="">any</option>{% for option in options %}<option{% if filters.get(name) == option %} selected{% end %}>{{ option }}</option>{% end %}</select></label>{% end %}
<label>Text <input type="search" name="text" value="{{ filters.get('text', '') }}" placeholder="in payload, summary or reason"></label>
<p><button type="submit">Filter</button> <a href="/ui/tasks">Clear</a></p>
</form>
</section>
""",
    "task_list": """<section id="task-list" class="panel wide" data-live aria-labelledby="list-h">
<h2 id="list-h">{% if total is not None %}{{ total }} task{{ "" if total == 1 else "s" }}{% else %}Tasks{% end %}{% if filters %} matching{% end %}, newest first</h2>
{% if problem %}<p class="problem">{{ problem }}</p>{% end %}
<div class="scroll"><table class="tasks"><thead><tr><th scope="col">Task</th><th scope="col">Status</th><th scope="col">Stream</th><th scope="col">Tool</th><th scope="col">Payload</th><th scope="col" class="num">Attempts</th><th scope="col">Created</th><th scope="col">Summary or reason</th></tr></thead>
<tbody>{% for t in tasks %}<tr id="task-{{ t['id'] }}"><th scope="row"><a href="/ui/tasks/{{ t['id'] }}">#{{ t["id"] }}</a></th><td><span class="badge {{ t['status'] }}">{{ t["status"] }}</span></td><td>{{ t["stream"] }}</td><td>{{ t["tool"] }}</td><td class="payload">{{ short(t["payload"], 60) }}</td><td class="num">{{ t["attempts"] }}/{{ t["max_attempts"] }}</td><td><time datetime="{{ t['created_at'] }}">{{ when(t["created_at"]) }}</time></td><td>{{ short(t["summary"] or t["reason"] or "", 80) }}</td></tr>{% end %}
</tbody></table></div>
{% if not tasks and not problem %}<p class="empty">No task{% if searched %} among tasks #{{ searched[0] }} to #{{ searched[1] }}{% end %} matches.</p>{% end %}
<nav class="pager" aria-label="Pages of tasks">{% if before %}<a href="/ui/tasks?{{ "&".join(quote(k) + "=" + quote(v) for k, v in filters.items()) }}">Newest</a>{% end %}
{% if older %}<a href="/ui/tasks?{{ "&".join(quote(k) + "=" + quote(v) for k, v in filters.items()) }}&amp;before={{ older }}">{% if searched %}Search older tasks{% else %}Older{% end %}</a>{% end %}</nav>
</section>
""",
    "task_head": """<section id="task-head" class="panel wide" data-live aria-label="State and actions">
<p class="state"><span class="badge {{ task['status'] }}">{{ task["status"] }}</span> {{ task["tool"] }} in stream <a href="/ui/tasks?stream={{ quote(task['stream']) }}">{{ task["stream"] }}</a>, attempt {{ task["attempts"] }} of {{ task["max_attempts"] }}</p>
<div class="actions">
{% if task["status"] not in ("completed", "failed", "cancelled") %}{% raw action("cancel", {"task": task["id"]}, "Cancel", "Cancel task " + str(task["id"]) + "?", "cancel-task") %}{% end %}
{% if task["status"] in ("running", "failed", "cancelled") %}{% raw action("requeue", {"task": task["id"]}, "Requeue", "Requeue task " + str(task["id"]) + " with a fresh attempt budget?", "requeue-task") %}{% end %}
{% if task["status"] == "running" %}<form class="action inline" data-op="fail" data-confirm="Fail this attempt of task {{ task['id'] }}?"><input type="hidden" name="task" value="{{ task['id'] }}" data-type="int"><label>Reason <input name="reason" required></label> <button type="submit" id="fail-task">Fail</button></form>{% end %}
</div>
</section>
""",
    "task_fields": """<section id="task-fields" class="panel" data-live aria-labelledby="fields-h">
<h2 id="fields-h">Fields</h2>
<dl class="fields">{% for name, value in fields.items() %}<dt>{{ name }}</dt><dd>{% if value is None %}–{% elif name.endswith("_at") and isinstance(value, str) %}<time datetime="{{ value }}">{{ when(value) }}</time>{% else %}{{ short(value) }}{% end %}</dd>{% end %}</dl>
{% if task.get("workspace") %}<h2 id="workspace-h">Workspace</h2>
<dl class="fields" id="task-workspace" aria-labelledby="workspace-h">{% for name in workspace_fields %}<dt>{{ name }}</dt><dd>{% if task["workspace"].get(name) is None %}–{% else %}{{ short(task["workspace"][name]) }}{% end %}</dd>{% end %}</dl>{% end %}
<h2>Payload</h2><pre class="json" tabindex="0">{{ pretty(task["payload"]) }}</pre>
<h2>Result</h2>{% if task["result"] is None %}<p class="empty">No result.</p>{% else %}<pre class="json" tabindex="0">{{ pretty(task["result"]) }}</pre>{% end %}
</section>
""",
    "task_history": """<section id="task-history" class="panel" data-live aria-labelledby="history-h">
<h2 id="history-h">History</h2>
<ol class="timeline">{% for entry in history %}<li><time datetime="{{ entry['at'] }}">{{ when(entry["at"]) }}</time> <span class="badge {{ entry['status'] }}">{{ entry["status"] }}</span>{% if entry["by"] %} by {{ entry["by"] }}{% end %}{% if entry["note"] %}: {{ entry["note"] }}{% end %}</li>{% end %}</ol>
</section>
""",
    "task_log": """<section id="task-log" class="panel wide" aria-labelledby="log-h">
<h2 id="log-h">Log <span id="log-state" class="live"></span></h2>
<pre id="log" class="log" tabindex="0" data-follow="/api/v1/logs?task={{ task['id'] }}&amp;tail=500&amp;follow=true">{{ log }}</pre>
</section>
""",
    "schedules": """<section id="schedule-list" class="wide" data-live aria-label="Schedules">
{% if not schedules %}<p class="empty">No schedules yet (<code>sparkqctl schedule add</code>).</p>{% end %}
{% for s in schedules %}<article class="panel" id="schedule-{{ s['name'] }}" aria-labelledby="schedule-{{ s['name'] }}-h">
<h2 id="schedule-{{ s['name'] }}-h">{{ s["name"] }} {% if s.get("paused") %}<span class="badge paused">paused</span>{% else %}<span class="badge active">active</span>{% end %}</h2>
<div class="actions">{% if s.get("paused") %}{% raw action("schedule.resume", {"name": s["name"]}, "Resume", "Resume schedule " + s["name"] + "?", "resume-schedule-" + s["name"]) %}{% else %}{% raw action("schedule.pause", {"name": s["name"]}, "Pause", "Pause schedule " + s["name"] + "?", "pause-schedule-" + s["name"]) %}{% end %}
{% raw action("schedule.fire", {"name": s["name"]}, "Fire now", "Fire schedule " + s["name"] + " now?", "fire-schedule-" + s["name"]) %}</div>
<dl class="fields">{% for key in ("stream", "tool", "script", "cron", "every", "at", "timezone", "overlap", "catch_up", "source", "last_outcome") %}{% if s.get(key) is not None %}<dt>{{ key }}</dt><dd>{{ short(s[key]) }}</dd>{% end %}{% end %}</dl>
<h3>Next fire times</h3>{% if s.get("next") %}<ol>{% for at in s["next"] %}<li><time datetime="{{ at }}">{{ when(at) }}</time></li>{% end %}</ol>{% else %}<p class="empty">None coming.</p>{% end %}
<h3>Last firings</h3>{% if s.get("firings") %}<div class="scroll"><table><thead><tr><th scope="col">Slot</th><th scope="col">Fired</th><th scope="col">Task</th><th scope="col">Outcome</th></tr></thead><tbody>
{% for f in s["firings"] %}<tr><td>{{ short(f.get("slot")) }}</td><td><time datetime="{{ f.get('at') or '' }}">{{ when(f.get("at")) }}</time></td><td>{% if f.get("task") %}<a href="/ui/tasks/{{ f['task'] }}">#{{ f["task"] }}</a>{% else %}–{% end %}</td><td>{{ short(f.get("outcome")) }}</td></tr>{% end %}
</tbody></table></div>{% else %}<p class="empty">Not fired yet.</p>{% end %}
</article>{% end %}
</section>
""",
}


#: The dashboard's one script: live parts, actions, the log. No timer polls: a part is
#: refetched when an event says it changed, at most one fetch at a time.
APP_JS = r"""'use strict';
(() => {
  const live = document.getElementById('live');
  const notice = document.getElementById('notice');
  //: Changes that keep coming refresh the page at most this often; the first one at once.
  const GAP = 1000;
  let fetching = false, again = false, timer = null, lastFetch = -GAP;

  function say(text, link) {
    notice.textContent = text;
    if (link) {
      const a = document.createElement('a');
      a.href = link.href; a.textContent = link.text;
      notice.append(' ', a);
    }
  }

  function changed() {
    if (fetching) { again = true; return; }
    if (timer !== null) return;
    const wait = lastFetch + GAP - performance.now();
    if (wait <= 0) refresh();
    else timer = setTimeout(() => { timer = null; refresh(); }, wait);
  }

  // Swap in the page's live parts as the server renders them now; focus stays put.
  async function refresh() {
    fetching = true; lastFetch = performance.now();
    try {
      const response = await fetch(location.href, {credentials: 'same-origin'});
      if (response.ok) {
        const fresh = new DOMParser().parseFromString(await response.text(), 'text/html');
        const focused = document.activeElement && document.activeElement.id;
        for (const part of document.querySelectorAll('[data-live]')) {
          const next = fresh.getElementById(part.id);
          if (next) part.replaceWith(document.importNode(next, true));
        }
        if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
        document.dispatchEvent(new CustomEvent('sparkq:refreshed'));
      }
    } finally {
      fetching = false;
      if (again) { again = false; changed(); }
    }
  }

  // The page's events: any of them may change what it shows.
  function watch(url) {
    if (!url) return;
    const events = new EventSource(url);
    events.onopen = () => { live.textContent = 'live'; live.className = 'live on'; };
    events.onerror = () => { live.textContent = 'reconnecting…'; live.className = 'live off'; };
    events.onmessage = (message) => {
      const data = JSON.parse(message.data);
      if (data.ok === false) { say(data.error.message); events.close(); return; }
      changed();  // an event, or the reply: the page may be older than the subscription
    };
  }

  // A task's log: the tail, then each chunk as the task writes it.
  function followLog(pre) {
    const state = document.getElementById('log-state');
    const stream = new EventSource(pre.dataset.follow);
    stream.onmessage = (message) => {
      const data = JSON.parse(message.data);
      if (data.ok !== undefined) {
        if (data.ok) pre.textContent = data.result.log;
        const over = !data.ok || (!data.result.running && ['completed', 'failed', 'cancelled'].includes(data.result.status));
        state.textContent = over ? '' : '(live)';
        if (over) stream.close();
      } else if (data.chunk !== undefined) {
        const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.append(data.chunk);
        if (atEnd) pre.scrollTop = pre.scrollHeight;
      } else if (data.end) {
        state.textContent = ''; stream.close();
      }
    };
  }

  function value(element, form) {
    const text = element.value.trim();
    switch (element.dataset.type) {
      case 'skip': return undefined;
      case 'int': return text === '' ? undefined : parseInt(text, 10);
      case 'float': return text === '' ? undefined : Number(text);
      case 'ids': return text === '' ? undefined : text.split(/[\s,]+/).filter(Boolean).map(Number);
      case 'payload':
        if (element.value === '') return undefined;
        return form.elements.payload_is_json && form.elements.payload_is_json.checked ? JSON.parse(element.value) : element.value;
      default: return text === '' ? undefined : text;
    }
  }

  // An action: confirmed, then POSTed as JSON to the API; the reply is said in #notice.
  async function act(form) {
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
    const op = form.dataset.op, fields = {};
    try {
      for (const element of form.elements) {
        if (!element.name) continue;
        const v = value(element, form);
        if (v !== undefined) fields[element.name] = v;
      }
    } catch (error) { say(`Not sent: ${error.message}`); return; }
    const response = await fetch(`/api/v1/${op}`, {
      method: 'POST', credentials: 'same-origin',
      headers: {'Content-Type': 'application/json'}, body: JSON.stringify(fields)});
    const reply = await response.json();
    if (!reply.ok) { say(`${op} refused: ${reply.error.message}`); return; }
    const task = reply.result && reply.result.id !== undefined && reply.result.status ? reply.result : null;
    if (op === 'enqueue' && task) say(`Enqueued task ${task.id}.`, {href: `/ui/tasks/${task.id}`, text: `Open task ${task.id}`});
    else say(task ? `Task ${task.id}: ${task.status}.` : `${op}: done.`);
    changed();
  }

  document.addEventListener('submit', (event) => {
    const form = event.target.closest('form[data-op]');
    if (!form) return;
    event.preventDefault();
    act(form).catch((error) => say(`Failed: ${error.message}`));
  });
  watch(document.body.dataset.watch);
  const log = document.getElementById('log');
  if (log && log.dataset.follow) followLog(log);
})();
"""

APP_CSS = """:root {
  --bg: #f7f7f5; --panel: #ffffff; --text: #1d1f21; --muted: #5c6166; --line: #d9dbde;
  --link: #0b57d0; --focus: #b35c00;
  --ok: #1a7f37; --ok-bg: #dcf3e3; --bad: #b42318; --bad-bg: #fde2df;
  --run: #0b57d0; --run-bg: #dde8fb; --wait: #8a5a00; --wait-bg: #fbefd5; --idle-bg: #ececec;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; line-height: 1.45;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #15171a; --panel: #1e2126; --text: #e6e7e9; --muted: #a4a9b0; --line: #363b42;
    --link: #8ab4f8; --focus: #ffb866;
    --ok: #7ee2a0; --ok-bg: #173a24; --bad: #ffaba3; --bad-bg: #4a1d1a;
    --run: #a8c7fa; --run-bg: #1d3357; --wait: #f3cd7a; --wait-bg: #46361a; --idle-bg: #30343a;
  }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--text); }
a { color: var(--link); }
:focus-visible { outline: 3px solid var(--focus); outline-offset: 2px; }
.skip { position: absolute; left: -100vw; }
.skip:focus { left: 1rem; top: 1rem; background: var(--panel); padding: .5rem; z-index: 2; }
.sr { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
header.top { display: flex; flex-wrap: wrap; align-items: center; justify-content: space-between;
  gap: .5rem 1rem; padding: .6rem 1rem; background: var(--panel); border-bottom: 1px solid var(--line); }
header nav { display: flex; flex-wrap: wrap; gap: .25rem 1rem; align-items: center; }
header nav a { text-decoration: none; padding: .2rem .1rem; }
header nav a[aria-current="page"] { font-weight: 600; border-bottom: 2px solid var(--link); }
.brand { font-weight: 700; color: var(--text) !important; }
.live { margin: 0; font-size: .85rem; color: var(--muted); }
.live.on::before { content: "● "; color: var(--ok); }
.live.off::before { content: "● "; color: var(--bad); }
main { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 26rem), 1fr));
  gap: 1rem; padding: 1rem; max-width: 90rem; margin: 0 auto; }
main > h1, main > .notice, .wide { grid-column: 1 / -1; }
h1 { margin: .2rem 0 0; font-size: 1.5rem; }
h2 { font-size: 1.1rem; margin: 0 0 .6rem; }
h3 { font-size: 1rem; margin: .8rem 0 .4rem; }
.notice:empty { display: none; }
.notice { margin: 0; padding: .5rem .8rem; background: var(--run-bg); border-radius: 6px; }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: .9rem 1rem;
  min-width: 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: .92rem; }
th, td { text-align: left; padding: .35rem .5rem; border-bottom: 1px solid var(--line); vertical-align: top; }
thead th { color: var(--muted); font-weight: 600; white-space: nowrap; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.zero, .empty { color: var(--muted); }
.payload { font-family: ui-monospace, monospace; font-size: .85rem; max-width: 28rem; overflow-wrap: anywhere; }
.badge { display: inline-block; padding: 0 .45rem; border-radius: 99px; font-size: .8rem;
  background: var(--idle-bg); white-space: nowrap; }
.badge.completed, .badge.active, .badge.idle { background: var(--ok-bg); color: var(--ok); }
.badge.failed, .badge.cancelled, .badge.ended { background: var(--bad-bg); color: var(--bad); }
.badge.running, .badge.busy { background: var(--run-bg); color: var(--run); }
.badge.pending, .badge.waiting, .badge.paused, .badge.preparing { background: var(--wait-bg); color: var(--wait); }
.reason { color: var(--bad); }
.problem { color: var(--bad); font-weight: 600; }
.spark rect { fill: var(--run); }
.spark rect.axis { fill: var(--line); }
form.action { display: inline; margin: 0; }
form.inline label { margin-left: .5rem; }
.actions { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; }
form.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(12rem, 1fr)); gap: .6rem 1rem; align-items: end; }
form.grid .full { grid-column: 1 / -1; margin: 0; }
label { display: flex; flex-direction: column; gap: .2rem; font-size: .9rem; }
label.check { flex-direction: row; align-items: center; gap: .4rem; }
input, select, textarea, button { font: inherit; color: inherit; background: var(--bg);
  border: 1px solid var(--line); border-radius: 6px; padding: .35rem .5rem; }
textarea { font-family: ui-monospace, monospace; width: 100%; }
button { background: var(--link); color: var(--panel); border-color: var(--link); cursor: pointer; padding: .3rem .8rem; }
button:hover { filter: brightness(1.1); }
details > summary { cursor: pointer; }
details > summary h2 { display: inline; }
dl.fields { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; margin: 0; }
dl.fields dt { color: var(--muted); }
dl.fields dd { margin: 0; overflow-wrap: anywhere; }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: .6rem;
  overflow: auto; max-height: 30rem; font-size: .85rem; white-space: pre-wrap; overflow-wrap: anywhere; }
ol.timeline { list-style: none; padding: 0; margin: 0; border-left: 2px solid var(--line); }
ol.timeline li { padding: .2rem 0 .5rem .8rem; position: relative; }
ol.timeline li::before { content: ""; position: absolute; left: -6px; top: .55rem; width: 10px; height: 10px;
  border-radius: 50%; background: var(--link); }
ul.failures { padding-left: 1.1rem; margin: 0; }
.pager { display: flex; gap: 1rem; margin-top: .6rem; }
.state { font-size: 1.05rem; }
"""

ASSETS = {"app.js": ("text/javascript; charset=utf-8", APP_JS),
          "app.css": ("text/css; charset=utf-8", APP_CSS)}


# ============================================================================
# 14. Daemon: service manager, snapshots, reload, the timer; lifecycle, dispatch, change
# ============================================================================


class Notifier:
    """The service manager's notify protocol (sd_notify) with no dependency.

    Datagrams of ``KEY=value`` lines to ``$NOTIFY_SOCKET`` (``@`` is the abstract
    namespace). Without that variable every call does nothing.
    """

    def __init__(self, env: dict[str, str]):
        path = env.get("NOTIFY_SOCKET")
        self.address = "\0" + path[1:] if path and path.startswith("@") else path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if path else None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        ours = not pid or pid == str(os.getpid())
        #: seconds between WATCHDOG=1 pings: half the manager's timeout, or None
        self.watchdog_interval = int(usec) / 2e6 if usec and usec.isdigit() and ours else None
        self.warned = False

    def send(self, *lines: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self.warned:
                log.warning("cannot notify the service manager at %s: %s", self.address,
                            exc.strerror)
                self.warned = True


def inherited_socket(env: dict[str, str]) -> socket.socket | None:
    """The listening socket passed by socket activation, when LISTEN_PID is us."""
    if env.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(env.get("LISTEN_FDS") or 0)
    names = (env.get("LISTEN_FDNAMES") or "").split(":")
    fds = list(range(3, 3 + count))
    if len(fds) > 1 and "sparkqd" in names:
        fds = [fds[names.index("sparkqd")]]
    for fd in fds:
        sock = socket.socket(fileno=fd)
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
            os.set_inheritable(fd, False)  # tasks must not hold our listening socket
            sock.setblocking(False)
            return sock
        sock.detach()
    raise StartupError(f"socket activation passed {count} fds but no Unix stream socket")


#: What the service manager hands the daemon: read once at startup, then removed
#: from the environment so that no task inherits it.
SERVICE_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID",
                     "LISTEN_FDS", "LISTEN_FDNAMES")


def take_service_environment() -> dict[str, str]:
    return {name: os.environ.pop(name) for name in SERVICE_VARIABLES if name in os.environ}


#: How long a new daemon waits for one that holds its data directory and is stopping
#: (`sparkqctl stop; sparkqctl start`) to finish its last snapshot and let go.
STOPPING_PATIENCE = 60.0


async def lock_data_dir(data_dir: str) -> int:
    """Take the data directory for this process, waiting for a daemon that holds it while
    it stops; or say who holds it."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    path = os.path.join(data_dir, "sparkqd.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline, told = time.monotonic() + STOPPING_PATIENCE, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").split() or ["unknown"]
            stopping = holder[1:] == ["stopping"]
            if not stopping or time.monotonic() > deadline:
                os.close(fd)
                raise StartupError(f"data directory {data_dir} is in use by sparkqd "
                                   f"pid {holder[0]} (lock {path}); stop it first"
                                   + ("; it has been stopping for too long" if stopping
                                      else "")) from None
            if not told:
                log.info("data directory %s: sparkqd pid %s is stopping; waiting for it",
                         data_dir, holder[0])
                told = True
            await asyncio.sleep(0.02)  # startup only: nothing else runs yet but "starting"
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def mark_stopping(lock_fd: int | None) -> None:
    """Say in the lock file that this daemon is stopping: a new one then waits for it."""
    if lock_fd is not None:
        with contextlib.suppress(OSError):
            os.pwrite(lock_fd, f"{os.getpid()} stopping\n".encode(), 0)


class DescriptorShortage:
    """The loop's exception handler: running out of file descriptors is said once a
    minute, without a traceback (the loop retries accepting by itself)."""

    def __init__(self):
        self.warned_at = -60.0

    def handle(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            return self.warn(exc.strerror)
        loop.default_exception_handler(context)

    def warn(self, why: str) -> None:
        if time.monotonic() - self.warned_at >= 60:
            log.warning("out of file descriptors (%s): new connections wait until others "
                        "close; raise the limit (LimitNOFILE=, ulimit -n)", why)
            self.warned_at = time.monotonic()


def scripts_view(scripts: dict[str, Script]) -> list[dict]:
    """The `scripts` reply: each script indexed from ``script_dirs``."""
    return [{"name": s.name, "path": s.path, "description": s.description,
             "task_class": s.task_class, "timeout": s.timeout, "args": s.args}
            for s in scripts.values()]


def tools_view(config: Config, settings) -> dict:
    """The `tools` reply: each tool with its resolved settings, and the task classes."""
    settings = settings
    return {
        "tools": {name: {"task_class": t.task_class, "description": t.description,
                         "timeout": settings(name).timeout,
                         "max_attempts": settings(name).max_attempts, "command": t.command,
                         "workspace": t.workspace, "repo": t.repo}
                  for name, t in config.tools.items()},
        "task_classes": {name: msgspec.structs.asdict(c)
                         for name, c in config.task_classes.items()},
    }



class MetricsFile:
    """``metrics.textfile``: the metrics written every ``metrics.interval``, for node_exporter."""

    def __init__(self, executor: ThreadPoolExecutor):
        self.executor = executor
        self.next_at = 0.0

    def due(self, now: float, config: Config, render) -> float | None:
        """Write metrics.textfile every metrics.interval, for node_exporter."""
        path = config.metrics.textfile
        if not path:
            return None
        if now >= self.next_at:
            self.next_at = now + config.metrics.interval
            future = asyncio.get_running_loop().run_in_executor(
                self.executor, write_atomically, os.path.expanduser(path), render())
            future.add_done_callback(self._written)
        return self.next_at

    @staticmethod
    def _written(future) -> None:
        if future.exception() is not None:
            log.warning("cannot write metrics.textfile: %s", future.exception())



def listening_socket(paths: Paths, service_env: dict[str, str]):
    """The socket the service manager passed, else one we bind (refusing a path that is
    too long, or a live daemon's socket).

    Returns the socket, the paths (with the socket actually used) and the inode of the
    socket file we created (ours to remove at the end), or None.
    """
    sock = inherited_socket(service_env)
    if sock is not None:
        paths = msgspec.structs.replace(paths, socket=sock.getsockname())
        log.info("listening on the socket the service manager passed: %s", paths.socket)
        return sock, paths, None
    sock = bind_socket(paths.socket, paths.socket_explicit)
    return sock, paths, os.stat(paths.socket).st_ino


async def serve(sock: socket.socket, make_connection, connections: Connections):
    """Accept connections on a listening socket; returns the server."""
    loop = asyncio.get_running_loop()
    # We remove the socket file ourselves, and only one we created.
    keep = {"cleanup_socket": False} if sys.version_info >= (3, 13) else {}
    server = await loop.create_unix_server(make_connection, sock=sock, backlog=1024, **keep)
    loop.set_exception_handler(connections.shortage.handle)
    return server


def status_view(paths: Paths, queue: Queue, journal: Journal, snapshots: Snapshots, pool: Pool,
                connections: int, started: float, http: dict) -> dict:
    """The `status` reply."""
    repo = queue.config.project.repo_path
    return {
        "version": VERSION, "protocol": PROTOCOL, "pid": os.getpid(),
        "uptime": round(time.time() - started, 3), "socket": paths.socket,
        "data_dir": paths.data_dir, "database": paths.database, "config": paths.config,
        # where a run starts when its tool names no cwd
        "cwd": os.path.abspath(os.path.expanduser(repo)) if repo else os.getcwd(),
        "counts": queue.index.totals(), "tasks": len(queue.tasks), "sessions": len(queue.sessions),
        "streams": len(queue.streams), "locks": len(queue.index.lock_holder),
        "connections": connections, "workers": pool.summary(),
        "journal": {"seq": journal.last_seq, "durable_seq": journal.durable_seq,
                    "fsync": journal.policy, "segments": len(journal.sealed) + 1,
                    "failure": journal.failure or journal.stalled},
        "snapshot": dict(snapshots.last),
        "http": http,
    }


class Recovery:
    """Loading the snapshot and replaying the journal after it, counted as it goes for the
    clients that ask meanwhile (see StartingConnection)."""

    def __init__(self):
        self.records = 0  #: records recovered so far: snapshot tasks, then journal records
        self.done = False

    def message(self) -> str:
        return f"starting (recovering {self.records} records)"

    def load(self, queue: Queue, journal: Journal, snapshots: Snapshots) -> int:
        """The snapshot, then the journal after it, into ``queue`` (in a thread: the event
        loop meanwhile answers "starting"); returns the journal records replayed."""
        gc.disable()  # millions of new objects, none of them garbage: no collections meanwhile
        state = snapshots.snapshot.load()
        queue.load(state.sessions, state.streams, state.tasks, state.next_id, state.schedules,
                   state.workspaces)
        snapshot_seq = snapshots.last["seq"] = state.seq
        snapshots.loaded(state.written_at)
        del state
        base = self.records = len(queue.tasks)
        replayed = 0
        for replayed, event in enumerate(journal.replay(snapshot_seq), 1):
            queue.apply(event)
            if not replayed & 1023:
                self.records = base + replayed
        self.records = base + replayed
        queue.take_wakeups()
        return replayed


async def recover(queue: Queue, journal: Journal, snapshots: Snapshots, pool: Pool,
                  change, logs_dir: str, recovery: Recovery, clock=time.time) -> int:
    """Load the snapshot, replay the journal after it; returns events replayed."""
    started = time.perf_counter()
    replayed = await asyncio.get_running_loop().run_in_executor(
        snapshots.executor, recovery.load, queue, journal, snapshots)
    journal.open()
    if not queue.sessions:
        change(lambda: queue.bootstrap(clock()), 4096)
    os.makedirs(logs_dir, mode=0o700, exist_ok=True)
    await pool.end_orphans()
    journal.sync_now()  # what recovery decided is durable before anyone is answered
    gc_freeze()
    log.info("recovered %d tasks from snapshot seq %s and %d journal records in %.2f s",
             len(queue.tasks), snapshots.last["seq"], replayed, time.perf_counter() - started)
    return replayed


def local_zone_name(env=os.environ) -> str:
    """The machine's time zone by its IANA name: $TZ, /etc/timezone, /etc/localtime's link."""
    candidates = [env.get("TZ", "").lstrip(":")]
    with contextlib.suppress(OSError):
        with open("/etc/timezone", encoding="utf-8") as f:
            candidates.append(f.read().strip())
    with contextlib.suppress(OSError):
        candidates.append(os.readlink("/etc/localtime").partition("zoneinfo/")[2])
    for name in candidates:
        with contextlib.suppress(BadRequest):
            if name:
                time_zone(name)
                return name
    return "UTC"


def status_line(queue: Queue, pool: Pool) -> str:
    """The queue in one line, for the service manager's STATUS=."""
    counts, workers = queue.index.totals(), pool.summary()
    return (f"STATUS={counts['pending']} pending, {counts['waiting']} waiting, "
            f"{counts['running']} running, {counts['failed']} failed; "
            f"workers {workers['busy']}/{workers['slots']} busy")


def reload_summary(config: Config, path: str | None, restart: list[str]) -> dict:
    """The `reload` reply: what is in force now, and what waits for a restart."""
    return {"config": path, "tools": sorted(config.tools),
            "task_classes": sorted(config.task_classes), "fsync": config.database.fsync,
            "snapshot_interval": config.database.snapshot_interval,
            "purge_older_than_days": config.purge.older_than_days,
            "stale_factor": config.stale.factor, "restart_needed": restart}


class ServiceDuties:
    """What the service manager hears from the timer: watchdog pings and a STATUS= line."""

    def __init__(self, notifier: Notifier):
        self.notifier = notifier
        self.next_watchdog = self.next_status = 0.0
        self.last_status = ""

    def run(self, now: float, status_line) -> list[float]:
        """Ping the watchdog from the timer (a hung loop stops the pings); keep STATUS fresh."""
        if self.notifier.sock is None:
            return []
        interval = self.notifier.watchdog_interval
        if interval is not None and now >= self.next_watchdog:
            self.notifier.send("WATCHDOG=1")
            self.next_watchdog = now + interval
        if now >= self.next_status:
            line = status_line()
            if line != self.last_status:
                self.notifier.send(line)
                self.last_status = line
            self.next_status = now + 2
        return [self.next_status] + ([self.next_watchdog] if interval is not None else [])


class Snapshots:
    """Taking snapshots: what changed goes to SQLite in a thread, then covered segments go."""

    def __init__(self, snapshot: Snapshot, journal: Journal, queue: Queue,
                 executor: ThreadPoolExecutor):
        self.snapshot = snapshot
        self.journal = journal
        self.queue = queue
        self.executor = executor
        self.task: asyncio.Task | None = None  #: the snapshot being taken
        self.next_at = 0.0
        self.taken_at = time.time()
        self.last: dict = {"seq": None, "at": None, "seconds": None, "error": None}

    def loaded(self, written_at: str | None) -> None:
        """The snapshot startup loaded is the last one taken: its age counts from then."""
        if written_at is not None:
            self.last["at"] = written_at
            self.taken_at = datetime.datetime.fromisoformat(written_at).timestamp()

    def due(self, now: float, interval: float) -> float:
        """Start a snapshot if one is due; returns when the next is."""
        if now >= self.next_at:
            self.next_at = now + interval
            if self.task is None:
                self.task = asyncio.get_running_loop().create_task(self._job(interval))
        return self.next_at

    async def _job(self, interval: float) -> None:
        try:
            await self.take(interval)
        finally:
            self.task = None

    async def take(self, interval: float) -> None:
        """Write what changed since the last snapshot, then drop covered journal segments."""
        changes = self.queue.take_changes()
        if not changes:
            return
        seq, next_id = self.journal.last_seq, self.queue.next_id
        session_of = {s.name: s.session for s in self.queue.streams.values()}
        started = time.perf_counter()
        try:
            current = self.journal.current
            if current is None or current.reserved > SEGMENT_HEADER.size:
                self.journal.rotate()  # later records go to a segment this snapshot does not cover
            self.journal.sync_now()
            await asyncio.get_running_loop().run_in_executor(
                self.executor, self.snapshot.write, changes, seq, next_id, session_of)
            removed = self.journal.remove_through(seq)
        except Exception as exc:  # whatever the cause, the changes wait for the next snapshot
            self.queue.keep_changes(changes)
            self.last["error"] = f"{type(exc).__name__}: {exc}"
            log.error("snapshot to %s failed, the journal keeps everything; retried in %g s: "
                      "%s", self.snapshot.path, interval, self.last["error"],
                      exc_info=not isinstance(exc, (OSError, sqlite3.Error, SparkQError)))
            return
        seconds = time.perf_counter() - started
        self.taken_at = time.time()
        self.last = {"seq": seq, "at": rfc3339(self.taken_at), "seconds": round(seconds, 4),
                     "error": None}
        log.debug("snapshot at record %d: %d tasks written in %.3f s, %d segments removed",
                  seq, len(changes.tasks), seconds, removed)

    async def last_one(self, interval: float) -> None:
        """At shutdown: the journal synced, then (after one in progress) the last snapshot;
        a current segment it leaves empty is dropped."""
        try:
            self.journal.sync_now()
        except Unavailable as exc:
            log.error("final journal sync failed: %s", exc)
        if self.task is not None:
            await self.task
        await self.take(interval)
        self.executor.shutdown()
        if self.last["seq"] == self.journal.last_seq:
            self.journal.drop_empty_current()
        log.info("stopped: journal at record %d, snapshot at %s", self.journal.last_seq,
                 self.last["seq"])


async def close_connections(connections: Connections, patience: float = 5) -> None:
    """Stop every connection, give clients ``patience`` seconds to take their replies, then
    close the rest."""
    for conn in list(connections.open):
        conn.stop()
    if connections.open:
        try:
            await asyncio.wait_for(connections.all_closed.wait(), timeout=patience)
        except TimeoutError:
            log.warning("%d clients did not take their replies; closing them",
                        len(connections.open))
    for conn in list(connections.open):
        conn.transport.abort()


def take_signals(loop: asyncio.AbstractEventLoop, stop, reload) -> None:
    """SIGTERM and SIGINT stop the daemon, SIGHUP reloads it; only a daemon on the main
    thread takes signals (one a test runs on a thread of its own leaves them alone)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, reload)


def remove_socket(path: str, inode: int | None) -> None:
    """Remove the socket file this daemon created (the same inode), never one made since."""
    try:
        if inode and os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


class Reloader:
    """Re-reading the configuration (the `reload` op, SIGHUP): a bad file is refused and
    the old configuration stays; a good one goes to the parts through ``apply``, and the
    schedules it declares become those in force.

    Its collaborators: ``apply`` (hands a configuration to every part that reads one), the
    queue's schedules, the change pipeline, the clock, the notifier and the watchers."""

    def __init__(self, config: Config, path: str | None, config_arg: str | None, apply,
                 schedules: Schedules, change, clock, notifier: Notifier, status_line,
                 watchers: Watchers):
        self.config, self.path, self.config_arg = config, path, config_arg
        self.apply, self.schedules, self.change, self.clock = apply, schedules, change, clock
        self.notifier, self.status_line, self.watchers = notifier, status_line, watchers

    def reload(self) -> dict:
        """Re-read the configuration, telling the service manager around it."""
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            return self._reload()
        finally:
            self.notifier.send("READY=1", self.status_line())

    def _reload(self) -> dict:
        """Re-read the configuration; a bad one is refused and the old one stays."""
        path = self.path or find_config_path(self.config_arg)
        try:
            config = load_config(path)
        except ConfigError as exc:
            log.error("reload refused, the old configuration stays in force: %s", exc)
            raise BadRequest(f"configuration refused, the old one stays in force: {exc}") from None
        restart = [key for key, old, new in (
            ("server.socket", self.config.server.socket, config.server.socket),
            ("database.path", self.config.database.path, config.database.path),
            ("http.listen", self.config.http.listen, config.http.listen)) if old != new]
        if restart:
            log.warning("reload: %s take effect at the next restart", ", ".join(restart))
        self.config = config
        self.apply(config)
        self.sync_schedules()
        log.info("configuration reloaded from %s", path or "built-in defaults")
        summary = reload_summary(config, path, restart)
        self.watchers.send("config.reloaded", {"config": summary})
        return summary

    def sync_schedules(self) -> None:
        """Make the schedules of sparkq.yml those in force (start and reload)."""
        specs, book = self.config.schedules, self.schedules
        if not specs and not any(s.source == "config" for s in book.by_name.values()):
            return  # nothing to apply: a start on a full disk must not need journal room
        try:
            problems = self.change(lambda: book.sync(specs, self.clock()),
                                   4096 + 1024 * len(specs))
        except Unavailable as exc:
            log.error("schedules of sparkq.yml not applied (reload to retry): %s", exc)
            return
        for problem in problems:
            log.error("%s", problem)

    def on_signal(self) -> None:
        """SIGHUP: reload; a refusal is logged with its reason already."""
        with contextlib.suppress(BadRequest):
            self.reload()


class Timer:
    """The one timer: leases, delays, purge and schedules (``Queue.tick``), waits, the
    journal's owed fsync, snapshots, metrics and workspace collection, each asked for its
    next deadline; it sleeps until the earliest, or until woken for an earlier one.

    A turn that fails is logged and retried a second later: the loop never ends. The
    watchdog is pinged first, so only a loop that truly hangs stops the pings.
    ``duties`` are callables given the time that return their next deadline (or None),
    run after the tick and the journal's sync."""

    def __init__(self, clock, queue: Queue, change, journal: Journal, service: ServiceDuties,
                 status_line, duties: list):
        self.clock, self.queue, self.change, self.journal = clock, queue, change, journal
        self.service, self.status_line, self.duties = service, status_line, duties
        self.wake = asyncio.Event()
        self.deadline = 0.0  #: when the timer next wakes by itself
        self.trouble: str | None = None  #: why the last turn failed, logged once
        self.stopped = False

    async def run(self) -> None:
        """Turn until stopped: each turn's duties, then sleep to the earliest deadline."""
        while not self.stopped:
            now = self.clock()
            deadlines = self.service.run(now, self.status_line)
            try:
                deadlines += self.turn(now)
            except Exception as exc:
                self.failed(exc, traceback=True)
                deadlines.append(now + 1.0)
            self.deadline = min(d for d in deadlines if d is not None)
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), max(0.0, self.deadline - self.clock()))
            except TimeoutError:
                pass

    def turn(self, now: float) -> list[float | None]:
        """One turn of the timer's duties; returns their next deadlines."""
        next_tick = self.queue.next_deadline()
        if next_tick is not None and next_tick <= now:
            try:
                next_tick = self.change(lambda: self.queue.tick(now))
                self.trouble = None
            except Unavailable as exc:  # a full disk: the due work waits, the rest goes on
                self.failed(exc)
                next_tick = now + 1.0
        sync_at = self.journal.sync_deadline()
        if sync_at is not None and sync_at <= now:
            try:
                self.journal.sync_now()
            except Unavailable:
                pass  # logged by the journal; retried or refused from now on
            sync_at = self.journal.sync_deadline()
        return [next_tick, sync_at] + [duty(now) for duty in self.duties]

    def failed(self, exc: Exception, traceback: bool = False) -> None:
        """Log why a timer turn failed, once until it changes; the turn is retried."""
        reason = f"{type(exc).__name__}: {exc}"
        if reason != self.trouble:
            log.error("timer: %s; retrying every second", reason, exc_info=traceback)
            self.trouble = reason


class Daemon:
    """The edges around the queue core: lifecycle, the one dispatch and the change
    pipeline. Everything else (the Timer and the Reloader among them) is a part it wires
    together."""

    def __init__(self, paths: Paths, config: Config, config_arg: str | None = None,
                 service_env: dict[str, str] | None = None, clock=time.time):
        self.paths, self.config = paths, config
        self.clock = clock  #: every "now" of the daemon's edges (a test's may be fake)
        self.service_env = service_env or {}
        self.notifier = Notifier(self.service_env)
        self.duties = ServiceDuties(self.notifier)
        self.queue = Queue(config, scan_scripts(config.script_dirs))
        self.queue.schedules.local_zone = local_zone_name()
        self.replies = Replies(self.queue)
        self.journal = Journal(paths.journal, config.database.fsync,
                               config.database.fsync_interval_ms, clock=clock)
        self.queue.record = self.journal.record
        self.journal.on_owed = self._rearm
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="snapshot")
        self.snapshots = Snapshots(Snapshot(paths.database), self.journal, self.queue,
                                   self.executor)
        self.connections = Connections(config.server.max_frame_bytes)
        self.stats, self.workers = Stats(), WorkerRegistry()
        self.watchers = Watchers(self.replies)
        self.logs = TaskLogs(os.path.join(paths.data_dir, "logs"), self.queue, self.executor)
        self.disk = WorkspaceDisk(config, self.queue.workspaces, paths.data_dir)
        self.collector = WorkspaceCollector(config, self.queue, self.change, self.disk,
                                            self._rearm, clock)
        self.workspaces = Workspaces(config, self.queue, self.change, self.logs, self.disk,
                                     self.collector)
        self.replies.sizes = self.disk.sizes
        self.waiters = Waiters(self.queue, self.change, self.workers, self._rearm,
                               self.workspaces, clock)
        self.pool = Pool(config, self.queue, self.handle, self.change, self.logs,
                         self.watchers, paths.socket, self.workspaces, clock)
        self.hooks = Hooks(config, self.queue, paths.socket)
        self.observers = (self.stats, self.watchers, self.waiters, self.pool, self.logs,
                          self.hooks, self.collector)
        self.connections.forgetters += [self.watchers.drop, self.logs.drop]
        self.started = time.time()
        self.stopping = False
        self.commit_due = False  #: a commit is scheduled for the end of this loop turn
        self.loop: asyncio.AbstractEventLoop | None = None  #: set by run()
        self.metrics_file = MetricsFile(self.executor)
        self.reloader = Reloader(config, paths.config, config_arg, self._configure,
                                 self.queue.schedules, self.change, clock, self.notifier,
                                 self.status_line, self.watchers)
        self.timer = self._make_timer()
        self.web = Web(self)
        self._lock_fd: int | None = None  #: the data directory's lock, once taken
        self._socket_inode: int | None = None  #: the socket file we created, ours to remove
        self.recovery = Recovery()

    # -- startup and shutdown ----------------------------------------------

    async def run(self) -> None:
        """Take the socket and the data directory, recover, serve until told to stop, then
        stop cleanly."""
        self._stopped = asyncio.Event()
        self.loop = self.journal.loop = asyncio.get_running_loop()
        try:
            # Refusals that need no data come first: the socket (too long a path, a live
            # daemon on it), then the data directory's lock; only then is anything read.
            sock = self._take_socket()
            activated = self._socket_inode is None
            if not activated:  # clients hear "starting" rather than "connection refused"
                await self._serve(sock)
            self._lock_fd = await lock_data_dir(self.paths.data_dir)
            replayed = await recover(self.queue, self.journal, self.snapshots, self.pool,
                                     self.change, self.logs.directory, self.recovery, self.clock)
            await self.workspaces.start()
            self.recovery.done = True
            self.reloader.sync_schedules()
            if activated:  # clients wait in the backlog, as a service manager's socket promises
                await self._serve(sock)
            self.web.start()
            loop = asyncio.get_running_loop()
            take_signals(loop, self.request_stop, self.reloader.on_signal)
            use_pidfd_child_watcher(loop)
            self.pool.reconfigure(self.config)
            interval = self.config.database.snapshot_interval
            self.snapshots.next_at = self.clock() + (0 if replayed else interval)
            log.info("sparkqd %s ready: socket %s, data %s, %d tasks", VERSION,
                     self.paths.socket, self.paths.data_dir, len(self.queue.tasks))
            self.duties.last_status = self.status_line()
            self.notifier.send("READY=1", self.duties.last_status)
            timers = loop.create_task(self.timer.run())
            await self._stopped.wait()
            timers.cancel()
            await self._shutdown()
        finally:
            self.release()

    def _take_socket(self) -> socket.socket:
        sock, self.paths, self._socket_inode = listening_socket(self.paths, self.service_env)
        self.pool.socket_path = self.hooks.socket_path = self.paths.socket
        return sock

    async def _serve(self, sock: socket.socket) -> None:
        self.server = await serve(sock, self._connection, self.connections)

    def _connection(self) -> asyncio.Protocol:
        """A new client's connection: refused as "starting" until recovery is done."""
        if not self.recovery.done:
            return StartingConnection(self.recovery.message, self.connections.max_frame)
        return Connection(self.handle, self.replies.wire, self.journal, self.connections)

    def stop_soon(self) -> dict:
        """The `shutdown` op: stop once its reply is out."""
        asyncio.get_running_loop().call_soon(self.request_stop)
        return {}

    def request_stop(self) -> None:
        if not self.stopping:
            self.notifier.send("STOPPING=1")
            mark_stopping(self._lock_fd)
            log.info("stopping: finishing requests in flight, then a last snapshot")
            self.stopping = self.connections.stopping = self.timer.stopped = True
            self._stopped.set()

    async def _shutdown(self) -> None:
        """Stop listening and running, answer what is in flight, then the last snapshot."""
        self.server.close()
        self.web.stop_listening()
        await self.pool.stop()
        await self.disk.stop()
        self.web.stop_exchanges()
        await close_connections(self.connections)
        await self.web.close()
        await self.snapshots.last_one(self.config.database.snapshot_interval)

    def release(self) -> None:
        """Close files and remove the socket we created; the lock goes last."""
        self.journal.close()
        self.snapshots.snapshot.close()
        remove_socket(self.paths.socket, self._socket_inode)
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    # -- requests: the one dispatch --------------------------------------------

    def handle(self, request: Request, conn: Connection | None = None) -> Any:
        """Carry out one request: its result (Structs), or WAITING when the reply comes
        later. A request that changes the queue goes through ``change``."""
        if request.read_only:
            if self.commit_due:
                self.commit()  # a read sees every observer (stats, workers) up to date
            return self._dispatch(request, conn, self.clock())
        return self.change(lambda: self._dispatch(request, conn, self.clock()),
                           request.journal_room)

    def _dispatch(self, request: Request, conn: Connection | None, now: float) -> Any:
        """One arm per request type."""
        queue, reads, waiters = self.queue, self.waiters.reads, self.waiters
        match request:
            case Hello(): return {"version": VERSION, "protocol": PROTOCOL}
            case Status(): return self.status()
            case SessionCreate(): return queue.stream_book.session_create(request, now)
            case SessionEnd(): return queue.stream_book.session_end(request, now)
            case SessionList(): return reads.session_list(request, now)
            case StreamCreate(): return queue.stream_book.stream_create(request, now)
            case StreamEnd(): return queue.stream_book.stream_end(request, now)
            case StreamList(): return reads.stream_list(request, now)
            case StreamPause(): return queue.stream_book.stream_pause(request, now)
            case StreamResume(): return queue.stream_book.stream_resume(request, now)
            case Enqueue(): return queue.enqueue(request, now)
            case Peek(): return queue.peek(request, now)
            case Claim(): return waiters.claim(request, conn, now)
            case Complete() | Fail(): return waiters.finish(request, conn, now)
            case Touch(): return waiters.noted(request, queue.touch(request, now), now)
            case Cancel(): return queue.cancel(request, now)
            case Requeue(): return queue.requeue(request, now)
            case GetTask(): return reads.get_task(request, now)
            case ListTasks(): return reads.list_tasks(request, now)
            case Wait(): return waiters.wait(request, conn, now)
            case Locks(): return reads.locks(request, now)
            case Logs(): return self.logs.answer(conn, request)
            case Scripts(): return scripts_view(queue.scripts)
            case Workers(): return self.pool.slot_records() + self.workers.records(now)
            case Watch(): return self.watchers.subscribe(conn, request)
            case History(): return reads.history(request, now)
            case Metrics(): return self.metrics()
            case Purge(): return queue.purge(request, now)
            case Tools(): return tools_view(self.config, queue.runnables.settings)
            case Reload(): return self.reloader.reload()
            case Shutdown(): return self.stop_soon()
            case Schema(): return request_schema()
            case ScheduleCreate(): return queue.schedules.create(request, now)
            case ScheduleUpdate(): return queue.schedules.update(request, now)
            case ScheduleDelete(): return queue.schedules.delete(request, now)
            case SchedulePause(): return queue.schedules.pause(request, now)
            case ScheduleResume(): return queue.schedules.resume(request, now)
            case ScheduleFire(): return queue.schedules.fire(request, now)
            case ScheduleList(): return reads.schedule_list(request, now)
            case ScheduleShow(): return reads.schedule_show(request, now)
            case ScheduleNext(): return reads.schedule_next(request, now)
            case WorkspaceList() | WorkspaceShow() | WorkspaceRemove() | WorkspaceGc():
                return self.workspaces.answer(request, conn)
            case Ui(): return self.web.ui(request)
        raise BadRequest(f"no handler for {type(request).__name__}")  # a request without an arm

    def change(self, carry_out, room: int = 65536) -> Any:
        """Change the queue: room for ``room`` bytes reserved up front, each event
        journaled as it is emitted (see Queue.record), then committed; the one way
        requests, the timer and the runner change state.

        The commit runs once per loop turn, after every connection that was ready has
        been answered: the changes of one turn reach the observers together, and the
        journal writes and fsyncs them together (group commit)."""
        self.journal.ensure_room(room)
        try:
            return carry_out()
        finally:
            if not self.commit_due:
                self.commit_due = True
                self.loop.call_soon(self.commit)

    def commit(self) -> None:
        """Tell every observer what the queue emitted, then re-arm the timer."""
        self.commit_due = False
        events = self.queue.take_events()
        if not events:
            return
        self.journal.schedule_flush()
        for observer in self.observers:
            observer.on_commit(events, self.queue)
        self.queue.take_wakeups()
        self._rearm(self.queue.next_deadline())

    def _rearm(self, deadline: float | None) -> None:
        """Wake the timer early for a deadline before the one it sleeps towards."""
        if deadline is not None and deadline < self.timer.deadline:
            self.timer.wake.set()

    def clock_moved(self) -> None:
        """Say that the injected clock jumped (a test's fake one): the timer looks again at
        what is due. Safe from any thread."""
        self.loop.call_soon_threadsafe(self.timer.wake.set)

    # -- views and wiring -------------------------------------------------------

    def status(self) -> dict:
        """The `status` reply."""
        return {**status_view(self.paths, self.queue, self.journal, self.snapshots, self.pool,
                              len(self.connections.open), self.started, self.web.status()),
                "workspaces": self.workspaces.summary()}

    def metrics(self) -> str:
        """The `metrics` reply, in Prometheus text format."""
        return render_metrics(self.queue, self.stats, self.journal, self.pool, self.snapshots,
                              self.watchers, self.started) + "\n".join(
            workspace_metrics(self.queue, self.disk.sizes)) + "\n"

    def status_line(self) -> str:
        return status_line(self.queue, self.pool)

    def _make_timer(self) -> Timer:
        """The one timer, with the duties it runs after the tick and the journal's sync."""
        return Timer(self.clock, self.queue, self.change, self.journal, self.duties,
                     self.status_line, [
            self.waiters.tick,
            lambda now: self.snapshots.due(now, self.config.database.snapshot_interval),
            lambda now: self.metrics_file.due(now, self.config, self.metrics),
            self.collector.due])

    def _configure(self, config: Config) -> None:
        """Hand a reloaded configuration to every part that reads one."""
        self.config = self.hooks.config = config
        self.workspaces.config = self.collector.config = self.disk.config = config
        self.queue.reconfigure(config, scan_scripts(config.script_dirs))
        self.pool.reconfigure(config)
        self.connections.max_frame = config.server.max_frame_bytes
        self.journal.policy = config.database.fsync
        self.journal.interval = config.database.fsync_interval_ms / 1000
        self.timer.wake.set()


def remove_files(paths: list[str]) -> None:
    """Remove files that may not exist (a purged task's log); in a worker thread."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc.strerror)


def use_pidfd_child_watcher(loop: asyncio.AbstractEventLoop) -> None:
    """Wait for task processes through pidfds, not a thread per process (Python < 3.12)."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open") or not isinstance(
            loop, asyncio.BaseEventLoop):
        return  # 3.12 picks the pidfd watcher itself; uvloop watches children its own way
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return  # a kernel before 5.3: keep the default watcher
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(loop)
    asyncio.set_child_watcher(watcher)


def gc_freeze() -> None:
    """Keep the loaded state out of every later garbage collection."""
    gc.collect()
    gc.freeze()
    gc.enable()


# ============================================================================
# 15. main()
# ============================================================================


class JournalFormatter(logging.Formatter):
    """Lines for journald: a <N> priority prefix on every line, no timestamp."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                  logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal(env=os.environ) -> bool:
    """Whether stderr is the journal: JOURNAL_STREAM names its device and inode."""
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return dev.isdigit() and ino.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s sparkqd[%(process)d] %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sparkqd", description="The SparkQ task queue daemon.")
    parser.add_argument("--config", help="configuration file (default: see README)")
    parser.add_argument("--socket", help="Unix socket to listen on")
    parser.add_argument("--data-dir", help="directory of the journal and snapshot")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"],
                        help="event loop (default: uvloop where it loads, else asyncio's own)")
    parser.add_argument("--version", action="version", version=f"sparkqd {VERSION}")
    return parser.parse_args(argv)


def run_loop(main_task, kind: str) -> None:
    """Run on uvloop (less overhead per request) where it loads, else on asyncio's own loop."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed: running on asyncio's own event loop")
        else:
            return uvloop.run(main_task)
    asyncio.run(main_task)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    service_env = take_service_environment()
    setup_logging(args.log_level)
    try:
        config_path = find_config_path(args.config)
        config = load_config(config_path)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    activated = service_env.get("LISTEN_PID") == str(os.getpid())
    paths = resolve_paths(args, config, config_path, activated=activated)
    daemon = Daemon(paths, config, args.config, service_env)
    try:
        run_loop(daemon.run(), args.loop)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except Unavailable as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
