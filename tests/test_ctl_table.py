"""sparkqctl's command table against sparkqd's request types: the two files cannot drift apart.

Every command of the table turns representative arguments into a request that
sparkqd's own ``AnyRequest`` decodes, field for field; every op sparkqctl.py sends
is one in ``sparkqd.OPS``. Then the ``Client`` pipelines against a real daemon, and
a `sparkqctl work` slot reports each task and claims the next in one request.
"""

import ast
import shlex
import signal
import threading

import msgspec
import pytest

import sparkqctl
import sparkqd
from conftest import ROOT, wait_until

#: Representative arguments of every command that sends a request (a test checks that).
EXAMPLES = [
    "status", "stop", "reload", "tools", "schema",
    "session create web", "session list", "session end web",
    "stream create w1 --session web", "stream list --session web", "stream end w1",
    "stream pause w1", "stream resume w1",
    "enqueue --tool run-bash",
    "enqueue --stream w1 --tool run-bash --payload 'make test' --timeout 5 --priority 3 "
    "--delay 5m --after 1,2 --key k --lock git@host:repo --max-attempts 3",
    "enqueue --tool llm-haiku --payload-json '{\"files\": [1]}' --at 2030-01-01T00:00:00+00:00",
    "enqueue --script deploy -- --fast prod",
    "peek --stream a --stream b --tool run-bash",
    "claim --stream a --tool t --worker agent-1 --wait 2.5",
    "complete 3 --summary green --result-json '{\"tests\": 412}' --lease L",
    "fail --task-id 3 --reason flaky --final --lease L",
    "touch 3 --lease L", "cancel 3", "requeue 3", "requeue --status failed --stream w1",
    "task 3", "wait 1 2 --timeout 1.5", "locks", "logs 3 --tail 5 --follow", "scripts",
    "workers", "watch --stream a --session b --task 3 --event task.created", "metrics",
    "history --stream a --session b --status failed --since 30m --limit 5",
    "tasks --stream a --session b --status waiting --limit 5", "purge --older-than 7",
    "history --schedule nightly",
    "schedule add nightly --cron '0 3 * * *' --timezone Europe/Berlin --tool run-bash "
    "--payload 'make backup' --stream w1 --timeout 60 --priority 2 --max-attempts 3 --lock L "
    "--key-prefix nb- --start-at 2030-01-01T00:00:00+00:00 --end-at 2031-01-01T00:00:00+00:00 "
    "--jitter 30 --overlap replace --catch-up all --grace 5m",
    "schedule add hourly --every 1h --script deploy -- --fast",
    "schedule add fixes --every 1d --tool agent --repo git@github.com:u/r --ref main "
    "--workspace worktree",
    "schedule add once --at 2030-01-01T00:00:00+00:00 --tool llm-haiku --payload-json '[1]'",
    "schedule change nightly --every 2h --overlap allow", "schedule list --stream w1",
    "schedule show nightly", "schedule pause nightly", "schedule resume nightly",
    "schedule rm nightly", "schedule fire nightly",
    "schedule next '*/15 9-17 * * 1-5' --timezone America/New_York -n 5",
    # repository workspaces
    "enqueue --tool run-bash --payload make --repo git@github.com:u/r --ref v1.2 "
    "--workspace worktree",
    "workspaces --repo https://github.com/u/r", "workspace show 3", "workspace rm 3 --force",
    "workspace gc --dry-run",
    "ui --print --new-token",
]


def request_of(line: str):
    """(the command record, op, fields) that sparkqctl makes of a command line."""
    parser, command, args = sparkqctl.parse(shlex.split(line))
    return command, command.op, sparkqctl.to_request(command, parser, args)


def decoded(request: dict):
    """The request as sparkqd decodes the line sparkqctl sends for it."""
    return msgspec.json.decode(sparkqctl.request_line(request), type=sparkqd.AnyRequest)


def leaves() -> list:
    """Every command record that runs: the table's commands, and the actions under them."""
    return [leaf for command in sparkqctl.TABLE for leaf in (command.actions or (command,))]


def literal_ops(node) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return literal_ops(node.body) | literal_ops(node.orelse)
    return set()


def ops_named_in_source() -> set[str]:
    """The ops sparkqctl.py names where it sends: the first argument of call, send and
    request, an ``op=`` keyword, an "op" key of a dict literal, a value assigned to op."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / "sparkqctl.py").read_text())):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "call", "send", "request") and node.args:
                found |= literal_ops(node.args[0])
            for keyword in node.keywords:
                found |= literal_ops(keyword.value) if keyword.arg == "op" else set()
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "op":
                    found |= literal_ops(value)
        elif isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "op" for target in node.targets):
            found |= literal_ops(node.value)
    return found


# -- the table against sparkqd's requests -----------------------------------------------


@pytest.mark.parametrize("line", EXAMPLES)
def test_command_request_decodes_as_a_sparkqd_request(line):
    """The request a command line makes decodes as sparkqd's request of that op, every field kept."""
    _, op, fields = request_of(line)
    request = decoded({"op": op, **fields})
    assert type(request).__struct_config__.tag == op
    as_sent = msgspec.to_builtins(request)
    assert {name: as_sent[name] for name in fields} == fields


def test_every_command_that_sends_a_request_has_an_example():
    """EXAMPLES covers every command of the table that sends a request, so none goes unchecked."""
    covered = {id(request_of(line)[0]) for line in EXAMPLES}
    assert covered == {id(leaf) for leaf in leaves() if leaf.op}


def test_every_op_sparkqctl_sends_is_a_sparkqd_op():
    """The table's ops, and every op sparkqctl.py names where it sends one, are sparkqd's ops."""
    assert {leaf.op for leaf in leaves() if leaf.op} <= sparkqd.OPS
    named = ops_named_in_source()
    assert {"claim", "complete", "fail", "touch", "watch", "stream.pause", "history"} <= named
    assert named <= sparkqd.OPS, named - sparkqd.OPS


def test_work_claims_and_reports_decode_as_sparkqd_requests():
    """A `work` slot's claim, and the complete and fail that claim its next task, decode."""
    _, command, args = sparkqctl.parse(["work", "--stream", "a", "--tool", "t", "--", "true"])
    claim = sparkqctl.Worker(args).claims[0]
    assert decoded({"op": "claim", **claim, "pid": 42, "wait": 30}).worker.endswith("/1")
    done = decoded({"op": "complete", "task": 7, "lease": "L", "claim_next": claim,
                    "result": {"exit_code": 0, "duration": 0.1}})
    failed = decoded({"op": "fail", "task": 7, "lease": "L", "claim_next": claim,
                      "reason": "exit code 1"})
    assert done.claim_next == failed.claim_next == sparkqd.ClaimNext(**claim)


def test_completed_kinds_are_kinds_of_hidden_complete():
    """Every argument the shells complete from the daemon names a kind `__complete` knows."""
    kinds = {arg.complete for leaf in leaves() for arg in sparkqctl.flatten(leaf.args)}
    kinds |= {option.complete for option in sparkqctl.GLOBAL_OPTIONS}
    assert kinds - {None, "files"} <= set(sparkqctl.NAME_SOURCES)


# -- the Client against a daemon ---------------------------------------------------------


def test_send_many_pipelines_1000_enqueues_and_replies_come_in_order(daemon):
    """1,000 enqueues sent in one write get 1,000 replies, read in the order sent."""
    with sparkqctl.Client(str(daemon.socket), timeout=30) as client:
        client.send_many([{"op": "enqueue", "tool": "llm-haiku", "payload": f"job {n}"}
                          for n in range(1000)])
        replies = [client.receive() for _ in range(1000)]
    assert [reply["id"] for reply in replies] == list(range(1, 1001))
    assert [reply["result"]["payload"] for reply in replies] == [f"job {n}" for n in range(1000)]
    assert [t["payload"] for t in daemon.ok(op="tasks")] == [f"job {n}" for n in range(1000)]


def test_send_many_of_a_batch_beyond_the_reply_budget_does_not_deadlock(daemon):
    """150,000 pipelined requests go through: send_many reads replies while the daemon waits."""
    with sparkqctl.Client(str(daemon.socket), timeout=60) as client:
        client.send_many([{"op": "hello"}] * 150_000)
        replies = [client.receive() for _ in range(150_000)]
    assert all(reply["ok"] for reply in replies) and replies[-1]["id"] == 150_000


def test_fields_given_as_none_are_left_out(daemon):
    """A field given as None is left out of the request, so the daemon's default applies."""
    with sparkqctl.Client(str(daemon.socket)) as client:
        task = client.call("enqueue", tool="llm-haiku", stream=None, payload=None)
        assert (task["stream"], task["payload"]) == ("default", None)


def test_complete_with_claim_next_returns_the_next_task(daemon):
    """`complete` with claim_next, through Client.call, finishes a task and claims the next."""
    first, second = (daemon.ok(op="enqueue", tool="llm-haiku")["id"] for _ in range(2))
    with sparkqctl.Client(str(daemon.socket)) as client:
        claimed = client.call("claim", worker="agent")
        done = client.call("complete", task=claimed["id"], lease=claimed["lease"],
                           claim_next={"wait": 1})
    assert (done["id"], done["status"]) == (first, "completed")
    assert (done["next"]["id"], done["next"]["worker"]) == (second, "agent")


# -- sparkqctl work's slot loop ------------------------------------------------------------


def run_worker(daemon, monkeypatch, command: list[str], stop_when) -> list[tuple[str, bool]]:
    """Run `sparkqctl work --tool llm-sonnet -- COMMAND` in this process until ``stop_when()``
    holds, then stop it as a first signal does; the (op, with claim_next) it sent, but the
    `hello` that first waits for the daemon to be ready."""
    sent, real_call = [], sparkqctl.Client.call

    def call(client, op, **fields):
        if op != "hello":
            sent.append((op, fields.get("claim_next") is not None))
        return real_call(client, op, **fields)

    monkeypatch.setattr(sparkqctl.Client, "call", call)
    _, _, args = sparkqctl.parse(["--socket", str(daemon.socket), "work", "--tool", "llm-sonnet",
                                  "--", *command])
    worker = sparkqctl.Worker(args)

    def stop():
        try:
            wait_until(stop_when, timeout=20, message="the worker to get that far")
        finally:
            worker._on_signal(signal.SIGINT, None)

    stopper = threading.Thread(target=stop, daemon=True)
    stopper.start()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert worker.run() == 0
    finally:
        for signum, handler in handlers.items():  # run() took them over
            signal.signal(signum, handler)
    stopper.join(5)
    return sent


def statuses(daemon) -> list[str]:
    return [t["status"] for t in daemon.ok(op="tasks")]


def test_work_slot_reports_a_task_and_claims_the_next_in_one_request(daemon, monkeypatch):
    """A slot that finishes a task asks for its next one in the same request: one call a task."""
    for n in range(3):
        daemon.ok(op="enqueue", tool="llm-sonnet", payload=f"job {n}")
    sent = run_worker(daemon, monkeypatch, ["true"],
                      lambda: statuses(daemon) == ["completed"] * 3)
    assert sent[:4] == [("claim", False), ("complete", True), ("complete", True),
                        ("complete", True)]


def test_work_slot_that_is_stopping_reports_without_claiming(daemon, monkeypatch):
    """A slot stopping while its command runs completes the task and claims nothing more."""
    for n in range(2):
        daemon.ok(op="enqueue", tool="llm-sonnet", payload=f"job {n}")
    sent = run_worker(daemon, monkeypatch, ["bash", "-c", "sleep 0.5"],
                      lambda: statuses(daemon)[0] == "running")
    assert sent == [("claim", False), ("complete", False)]
    assert statuses(daemon) == ["completed", "pending"]
