"""The HTTP API and the dashboard's server side (issue 13), against a real sparkqd.

Every request of the socket protocol is reachable over HTTP and answered with the
socket's reply; the OpenAPI document is generated from the same request Structs and
validated; each of the listener's defences (token, Host, Origin, POST with JSON, no
CORS, CSP) is tried the way an attacker's page or a rebinding DNS name would; the
listener's configuration and its failures (a port in use, a non-loopback address)
are checked from the outside. Clients are http.client, curl and the socket.
"""

import json
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import pytest

import sparkqd
from conftest import HTTP_ON, Daemon, Http, wait_until

CONFIG = """
tools:
  agent: {task_class: FAST_SCRIPT, description: claimed by the test}
  run-bash: {task_class: FAST_SCRIPT, command: [bash, -c]}
""" + HTTP_ON
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
#: Fields whose values differ between two daemons doing the same things.
VOLATILE = {"pid", "uptime", "socket", "data_dir", "database", "config", "url", "token_file",
            "seq", "connections", "seconds", "waited", "duration", "cwd"}


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web():
    """One daemon serving HTTP for the tests that only read or refuse."""
    with tempfile.TemporaryDirectory(prefix="sq-", dir="/tmp") as d:
        daemon = Daemon(Path(d), CONFIG + "workers: {count: 0}\n").start()
        yield daemon
        daemon.kill()
        daemon.log.close()


@pytest.fixture(scope="module")
def http(web):
    return Http(web)


@pytest.fixture(scope="module")
def cookie(http):
    """The cookie a browser gets from the token URL: ``name=value``."""
    _, headers, _ = http.request("GET", f"/?token={http.token}")
    return headers["Set-Cookie"].split(";")[0]


def served(make_daemon, extra=""):
    """A daemon of its own on CONFIG, and its HTTP client."""
    daemon = make_daemon(config=CONFIG + extra)
    return daemon, Http(daemon)


def same_origin(http, cookie, **extra):
    """What the dashboard's own fetch sends: the cookie, Origin, Sec-Fetch-Site, JSON."""
    return {"Cookie": cookie, "Origin": f"http://127.0.0.1:{http.port}",
            "Sec-Fetch-Site": "same-origin", "Content-Type": "application/json", **extra}


def error_of(body: bytes) -> dict:
    reply = json.loads(body)
    assert reply["ok"] is False and reply["id"] is None, reply
    return reply["error"]


def normalised(value, key=None):
    """A reply with what differs between two daemons (times, pids, paths) blanked."""
    if key in VOLATILE:
        return "<volatile>"
    if isinstance(value, dict):
        return {k: normalised(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [normalised(v) for v in value]
    if isinstance(value, str) and key == "result" and value.startswith("# HELP"):
        return sorted(line for line in value.splitlines() if line.startswith("# TYPE"))
    return RFC3339.sub("<time>", value) if isinstance(value, str) else value


def first_line_over_http(http, op, fields) -> dict:
    """The reply of a request that opens a stream (POST: one JSON line per message)."""
    conn = http.connect()
    try:
        conn.request("POST", f"/api/v1/{op}", json.dumps(fields),
                     {**http.auth, "Content-Type": "application/json"})
        return json.loads(conn.getresponse().readline())
    finally:
        conn.close()


def first_line_over_socket(daemon, op, fields) -> dict:
    conn = daemon.connect()
    try:
        return conn.call(op=op, **fields)
    finally:
        conn.close()


# -- the API against the socket -----------------------------------------------------------------

#: One request of every op, in an order that gives each something to do.
EVERY_OP = [
    ("hello", {}), ("session.create", {"name": "s1"}), ("session.list", {}),
    ("stream.create", {"name": "w1", "session": "s1"}), ("stream.list", {}),
    ("stream.pause", {"name": "w1"}), ("stream.resume", {"name": "w1"}),
    ("enqueue", {"tool": "agent", "payload": {"files": ["a.py"]}, "id": "mine"}),
    ("enqueue", {"tool": "agent", "stream": "w1", "payload": "two", "key": "k"}),
    ("enqueue", {"tool": "agent", "stream": "w1", "payload": "again", "key": "k"}),
    ("peek", {}), ("claim", {"worker": "a1"}), ("touch", {"task": 1}),
    ("complete", {"task": 1, "summary": "ok", "result": {"n": 1}}),
    ("enqueue", {"tool": "agent", "payload": "three"}), ("claim", {"worker": "a1", "wait": 1}),
    ("fail", {"task": 3, "reason": "boom"}), ("cancel", {"task": 2}), ("requeue", {"task": 3}),
    ("task", {"task": 1}), ("tasks", {}), ("tasks", {"newest": True, "text": "THREE"}),
    ("wait", {"tasks": [1]}), ("locks", {}), ("logs", {"task": 1}), ("scripts", {}),
    ("workers", {}), ("watch", {"streams": ["w1"]}), ("history", {}), ("metrics", {}),
    ("tools", {}), ("reload", {}), ("schema", {}), ("ui", {}), ("status", {}),
    ("schedule.create", {"name": "hourly", "every": "1h", "tool": "agent", "payload": "p"}),
    ("schedule.update", {"name": "hourly", "cron": "@daily", "timezone": "UTC"}),
    ("schedule.list", {}), ("schedule.show", {"name": "hourly"}),
    ("schedule.next", {"cron": "0 3 * * *", "timezone": "Europe/Berlin", "count": 3,
                       "after": "2026-03-28T00:00:00Z"}),
    ("schedule.pause", {"name": "hourly"}), ("schedule.resume", {"name": "hourly"}),
    ("schedule.fire", {"name": "hourly"}), ("schedule.delete", {"name": "hourly"}),
    ("workspace.list", {}), ("workspace.show", {"workspace": "github.com/u/r"}),
    ("workspace.remove", {"workspace": "9"}), ("workspace.gc", {"dry_run": True}),
    ("purge", {"older_than_days": 0}), ("stream.end", {"name": "w1"}),
    ("session.end", {"name": "s1"}), ("shutdown", {}),
]
STREAMING = {"watch"}


def test_every_op_over_http_gets_the_socket_reply(make_daemon):
    """The same requests, to one daemon over the socket and to another over HTTP, get the
    same replies (times, pids and paths aside), for every op there is."""
    assert {op for op, _ in EVERY_OP} == sparkqd.OPS
    by_socket = make_daemon(config=CONFIG, subdir="socket")
    by_http = Http(make_daemon(config=CONFIG, subdir="http"))
    conn = by_socket.connect()
    for op, fields in EVERY_OP:
        if op in STREAMING:
            expected = first_line_over_socket(by_socket, op, fields)
            got = first_line_over_http(by_http, op, fields)
        else:
            expected, (status, got) = conn.call(op=op, **fields), by_http.api(op, **fields)
            refused = not expected["ok"] and sparkqd.HTTP_STATUS[expected["error"]["code"]]
            assert status == (refused or 200), (op, got)
        assert normalised(got) == normalised(expected), op


def test_safe_ops_answer_get_with_query_parameters(web, http):
    """A GET of a read takes its fields as query parameters, typed by the request Struct."""
    task = web.ok(op="enqueue", tool="agent", payload="by get")["id"]
    assert http.api("task", "GET", task=task)[1]["result"]["payload"] == "by get"
    status, reply = http.api("wait", "GET", tasks=[task, task], timeout=0)
    assert status == 200 and reply["result"]["done"] is False
    status, reply = http.api("peek", "GET", stream="default", tool=["agent", "other"])
    assert status == 200 and reply["result"]["id"] <= task


@pytest.mark.parametrize("body, message", [
    (b'{"tool":', "malformed JSON"),
    (b'{"tool": 5}', "$.tool: Expected `str | null`, got `int`"),
    (b'{"tool": "agent", "colour": "red"}', "unknown field `colour`"),
    (b'[1, 2]', "the body must be a JSON object"),
    (b'{"op": "cancel"}', "the op is named by the URL"),
])
def test_bad_bodies_get_400_bad_request(http, body, message):
    """Malformed JSON, wrong types, unknown fields: 400 with the socket's code and message."""
    status, _, reply = http.request("POST", "/api/v1/enqueue", body,
                                    {**http.auth, "Content-Type": "application/json"})
    assert status == 400 and error_of(reply)["code"] == "bad_request"
    assert message in error_of(reply)["message"]


@pytest.mark.parametrize("op, body", [
    ("enqueue", {"tool": 5}), ("nope", {}), ("cancel", {}), ("tasks", {"status": "lost"})])
def test_errors_over_http_are_the_socket_errors(web, http, op, body):
    """A refused request gets over HTTP exactly the error the socket gives it."""
    expected = web.call(op=op, **body)["error"]
    status, reply = http.api(op, **body)
    assert (status, reply["error"]) == (400, expected)


def test_wrong_query_types_get_400(http):
    status, reply = http.api("tasks", "GET", limit="many")
    assert status == 400 and reply["error"]["message"] == "$.limit: Expected `int | null`, got `str`"


def test_refusals_carry_the_protocol_codes_as_http_statuses(web, http):
    """not_found 404, conflict 409, with the socket's reply as the body."""
    assert http.api("task", task=999_999)[0] == 404
    task = web.ok(op="enqueue", tool="agent")["id"]
    web.ok(op="cancel", task=task)
    status, reply = http.api("cancel", task=task)
    assert (status, reply["error"]["code"]) == (409, "conflict")


def test_openapi_document_validates_and_lists_every_request(http):
    """openapi.json is valid OpenAPI 3.1 with a component and a path for every request Struct."""
    from openapi_spec_validator import validate

    status, _, body = http.request("GET", "/api/v1/openapi.json", headers=http.auth)
    document = json.loads(body)
    validate(document)
    assert document["openapi"].startswith("3.1")
    for cls in sparkqd.AnyRequest.__args__:
        op = cls.__struct_config__.tag
        assert cls.__name__ in document["components"]["schemas"], cls
        assert ("get" in document["paths"][f"/api/v1/{op}"]) == cls.safe, op
        assert "op" not in document["components"]["schemas"][cls.__name__]["properties"]
    held = {op for op, path in document["paths"].items() if path.get("post", {}).get("x-sparkq-may-wait")}
    assert held == {f"/api/v1/{op}" for op in ("claim", "complete", "fail", "wait", "logs", "watch",
                                                "workspace.remove", "workspace.gc")}


# -- held requests and streams --------------------------------------------------------------------


def in_thread(work):
    """Run ``work()`` in a thread; returns a function that joins it and gives its result."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(value=work()))
    thread.start()
    return lambda: (thread.join(10), out["value"])[1]


def test_wait_over_http_is_held_until_the_task_ends(make_daemon):
    """`wait` over HTTP answers when the task completes, not before."""
    daemon, http = served(make_daemon)
    task = daemon.ok(op="enqueue", tool="agent")["id"]
    result = in_thread(lambda: http.api("wait", tasks=[task], timeout=10))
    daemon.ok(op="claim", tool="agent")
    time.sleep(0.1)  # the wait is parked, and still waits while the task runs
    daemon.ok(op="complete", task=task)
    status, reply = result()
    assert status == 200 and reply["result"]["done"] and reply["result"]["tasks"][0]["status"] == "completed"


def test_claim_with_wait_over_http_gets_a_task_enqueued_later(make_daemon):
    """A held claim over HTTP takes the task enqueued while it waits."""
    daemon, http = served(make_daemon)
    result = in_thread(lambda: http.api("claim", tool="agent", wait=10, worker="h"))
    time.sleep(0.2)  # the claim is parked
    task = daemon.ok(op="enqueue", tool="agent")["id"]
    status, reply = result()
    assert status == 200 and reply["result"]["id"] == task and reply["result"]["worker"] == "h"


def test_a_held_claim_whose_client_left_takes_nothing(make_daemon):
    """A client that closes while its claim waits leaves the next task for others."""
    daemon, http = served(make_daemon)
    conn = http.connect()
    conn.request("POST", "/api/v1/claim", json.dumps({"tool": "agent", "wait": 30}),
                 {**http.auth, "Content-Type": "application/json"})
    time.sleep(0.2)  # the claim is parked
    conn.close()
    time.sleep(0.2)  # the daemon sees the close
    task = daemon.ok(op="enqueue", tool="agent")["id"]
    assert daemon.ok(op="claim", tool="agent")["id"] == task


def sse_messages(response, count: int) -> list[tuple[str | None, dict]]:
    """(id, data) of the next ``count`` Server-Sent Events of a response."""
    out, event_id = [], None
    while len(out) < count:
        line = response.readline().decode().rstrip("\n")
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            out.append((event_id, json.loads(line[6:])))
            event_id = None
    return out


def open_watch(http, path="/api/v1/watch", headers=None):
    conn = http.connect()
    conn.request("GET", path, headers={**http.auth, "Accept": "text/event-stream", **(headers or {})})
    response = conn.getresponse()
    assert response.headers["Content-Type"] == "text/event-stream"
    return conn, response


def test_watch_over_sse_numbers_events_and_resumes_from_last_event_id(web, http):
    """Events come as SSE with their seq as id; reconnecting with Last-Event-ID replays
    what was missed, in order."""
    conn, response = open_watch(http, "/api/v1/watch?events=task.created")
    [(_, reply)] = sse_messages(response, 1)
    first = web.ok(op="enqueue", tool="agent", payload="one")["id"]
    [(cursor, event)] = sse_messages(response, 1)
    conn.close()
    missed = [web.ok(op="enqueue", tool="agent", payload=p)["id"] for p in ("two", "three")]
    conn, response = open_watch(http, "/api/v1/watch?events=task.created", {"Last-Event-ID": cursor})
    replayed = sse_messages(response, 3)[1:]
    conn.close()
    assert reply["ok"] and event["task"]["id"] == first and int(cursor) == event["seq"]
    assert [m["task"]["id"] for _, m in replayed] == missed
    assert [int(i) for i, _ in replayed] == [m["seq"] for _, m in replayed]


def test_watch_resumed_from_a_cursor_no_longer_kept_says_lagged(http):
    """A cursor from before the kept events (another run of the daemon) gets `lagged`."""
    conn, response = open_watch(http, headers={"Last-Event-ID": "5"})
    _, (_, lagged) = sse_messages(response, 2)
    conn.close()
    assert lagged["event"] == "lagged" and lagged["missed"] is None and lagged["seq"] > 5


def test_log_follow_over_sse_streams_a_running_tasks_output(make_daemon):
    """`logs` with follow over GET streams the chunks of a running task, then its end."""
    daemon, http = served(make_daemon, "workers: {count: 1}\n")
    task = daemon.ok(op="enqueue", tool="run-bash", payload="echo one; sleep 0.5; echo two")["id"]
    wait_until(lambda: daemon.ok(op="task", task=task)["status"] == "running")
    conn, response = open_watch(http, f"/api/v1/logs?task={task}&follow=true")
    messages = [m for _, m in sse_messages(response, 2)]
    while not messages[-1].get("end"):
        messages += [m for _, m in sse_messages(response, 1)]
    conn.close()
    text = messages[0]["result"]["log"] + "".join(m.get("chunk", "") for m in messages[1:])
    assert text == "one\ntwo\n" and messages[-1]["status"] == "completed"


def test_shutdown_answers_a_held_http_wait_unavailable(make_daemon):
    """Stopping the daemon answers a waiting HTTP request `unavailable`, then exits 0."""
    daemon, http = served(make_daemon)
    task = daemon.ok(op="enqueue", tool="agent")["id"]
    result = in_thread(lambda: http.api("wait", tasks=[task], timeout=30))
    time.sleep(0.2)
    assert daemon.stop() == 0
    status, reply = result()
    assert (status, reply["error"]["code"]) == (503, "unavailable")


# -- security -------------------------------------------------------------------------------------


def test_health_needs_no_token_and_tells_nothing(http):
    status, _, body = http.request("GET", "/health")
    assert (status, json.loads(body)) == (200, {"ok": True})


def test_ready_says_ready_with_the_token(http):
    assert http.request("GET", "/ready", headers=http.auth)[:3:2] == (200, b'{"ready":true,"reason":"ready"}')


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic dXNlcjpwYXNz"},
                                     {"Cookie": "sparkq-1=forged"}], ids=["none", "wrong", "basic", "cookie"])
@pytest.mark.parametrize("path", ["/api/v1/status", "/metrics", "/ready", "/ui/", "/ui/app.js",
                                  "/api/v1/openapi.json"])
def test_without_the_token_everything_but_health_is_401(http, path, headers):
    status, _, body = http.request("GET", path, headers=headers)
    assert status == 401 and error_of(body)["code"] == "unauthorized"


@pytest.mark.parametrize("host", ["evil.example:PORT", "127.0.0.1:1", "10.0.0.1:PORT", "localhost.evil:PORT",
                                  "[::2]:PORT", "127.0.0.1"])
def test_a_foreign_host_header_is_403_against_dns_rebinding(http, host):
    """A Host that is not a loopback name with the listener's port is refused, token or not."""
    status, _, body = http.request("GET", "/api/v1/hello",
                                   headers={**http.auth, "Host": host.replace("PORT", str(http.port))})
    assert status == 403 and "DNS rebinding" in error_of(body)["message"]


@pytest.mark.parametrize("host", ["127.0.0.1:PORT", "localhost:PORT", "127.7.7.7:PORT", "LOCALHOST:PORT"])
def test_loopback_hosts_with_the_port_are_served(http, host):
    status, _, _ = http.request("GET", "/api/v1/hello",
                                headers={**http.auth, "Host": host.replace("PORT", str(http.port))})
    assert status == 200


def test_token_url_sets_a_strict_httponly_cookie_and_drops_the_token(http):
    """`/?token=` answers 303 to /ui/ with an HttpOnly, SameSite=Strict cookie not holding the token."""
    status, headers, _ = http.request("GET", f"/?token={http.token}")
    cookie = headers["Set-Cookie"]
    assert status == 303 and headers["Location"] == "/ui/"
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and http.token not in cookie
    status, headers, _ = http.request("GET", f"/ui/tasks?status=failed&token={http.token}")
    assert status == 303 and headers["Location"] == "/ui/tasks?status=failed"


def test_a_wrong_token_url_is_401(http):
    assert http.request("GET", "/?token=" + "x" * 43)[0] == 401


def test_the_cookie_serves_pages_and_same_origin_changes(web, http, cookie):
    assert http.request("GET", "/ui/", headers={"Cookie": cookie})[0] == 200
    status, _, body = http.request("POST", "/api/v1/enqueue", json.dumps({"tool": "agent"}),
                                   same_origin(http, cookie))
    assert status == 200 and json.loads(body)["result"]["tool"] == "agent"


@pytest.mark.parametrize("proof", [
    {"Origin": "http://127.0.0.1:1"}, {"Origin": "http://evil.example"}, {"Origin": "null"},
    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}, {}],
    ids=["other-port", "other-site", "null", "cross-site", "same-site", "no-proof"])
def test_a_cookie_post_not_from_the_dashboard_is_403(http, cookie, proof):
    """A POST with a valid cookie but another origin (or none shown) is refused."""
    headers = {"Cookie": cookie, "Content-Type": "application/json", **proof}
    status, _, body = http.request("POST", "/api/v1/enqueue", json.dumps({"tool": "agent"}), headers)
    assert status == 403 and error_of(body)["code"] == "forbidden"


@pytest.mark.parametrize("proof", [{"Sec-Fetch-Site": "same-site"}, {"Sec-Fetch-Site": "cross-site"},
                                   {"Origin": "http://127.0.0.1:1"}], ids=["same-site", "cross-site", "origin"])
def test_a_cross_site_get_with_the_cookie_is_403(http, cookie, proof):
    """Another site's page using our API with the cookie (script, img, EventSource) is refused."""
    status, _, _ = http.request("GET", "/api/v1/watch", headers={"Cookie": cookie, **proof})
    assert status == 403


@pytest.mark.parametrize("op", ["enqueue", "cancel", "shutdown", "reload", "ui", "stream.pause"])
def test_a_get_that_would_change_state_is_405(web, http, op):
    status, headers, body = http.request("GET", f"/api/v1/{op}?tool=agent&task=1&name=default",
                                         headers=http.auth)
    assert status == 405 and headers["Allow"] == "POST"
    assert error_of(body)["code"] == "method_not_allowed"
    assert web.ok(op="hello")  # still running: the GET of shutdown did nothing


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_post_without_a_json_content_type_is_415(http, content_type):
    headers = {**http.auth, **({"Content-Type": content_type} if content_type else {})}
    status, _, body = http.request("POST", "/api/v1/hello", b"{}", headers)
    assert status == 415 and error_of(body)["code"] == "unsupported_media_type"


def test_no_cors_headers_even_for_a_preflight(http):
    headers = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    for method in ("OPTIONS", "GET"):
        _, response_headers, _ = http.request(method, "/api/v1/hello", headers={**http.auth, **headers})
        assert not [h for h in response_headers if h.lower().startswith("access-control-")]


def test_pages_carry_a_strict_csp_whose_nonce_is_on_the_one_script(http, cookie):
    status, headers, body = http.request("GET", "/ui/", headers={"Cookie": cookie})
    csp = headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp)[1]
    scripts = re.findall(rb"<script[^>]*>", body)
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert scripts == [f'<script nonce="{nonce}" src="/ui/app.js" defer>'.encode()]
    assert headers["X-Frame-Options"] == "DENY" and headers["Referrer-Policy"] == "no-referrer"


def test_values_are_escaped_on_every_page(web, http, cookie):
    """A payload, reason and stream name full of markup show as text, never as markup."""
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    web.ok(op="stream.create", name="markup", session="default")
    task = web.ok(op="enqueue", tool="agent", payload=evil, stream="markup")["id"]
    web.ok(op="claim", tool="agent", stream="markup")
    web.ok(op="fail", task=task, reason=evil)
    for path in ("/ui/", "/ui/tasks", f"/ui/tasks/{task}", f"/ui/tasks?text={evil[:8]}"):
        body = http.request("GET", path.replace("<", "%3C").replace(">", "%3E"),
                            headers={"Cookie": cookie})[2]
        assert b"<script>alert" not in body and b"<img src=x" not in body, path
    assert b"&lt;script&gt;alert" in http.request("GET", f"/ui/tasks/{task}", headers={"Cookie": cookie})[2]


def test_token_file_is_0600_and_at_least_128_bits(web):
    path = web.data_dir / "http-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().strip()) >= 22  # base64url: 6 bits a character


def test_new_token_locks_out_the_old_one(make_daemon):
    """`sparkqctl ui --new-token` rotates the token: the old one, and its cookie, get 401."""
    daemon, http = served(make_daemon)
    old = dict(http.auth)
    url = daemon.ctl_ok("ui", "--print", "--new-token").strip()
    new_token = url.rpartition("token=")[2]
    assert new_token != http.token and new_token == (daemon.data_dir / "http-token").read_text().strip()
    assert http.request("GET", "/api/v1/hello", headers=old)[0] == 401
    assert http.request("GET", "/api/v1/hello", headers={"Authorization": f"Bearer {new_token}"})[0] == 200


def test_ui_prints_the_signed_in_url(web, http):
    url = web.ctl_ok("ui", "--print").strip()
    assert url == f"http://127.0.0.1:{http.port}/?token={http.token}"


def test_refused_requests_are_logged_once_a_minute(make_daemon):
    """Many refusals make one log line, not one per request."""
    daemon, http = served(make_daemon)
    for _ in range(20):
        http.request("GET", "/api/v1/status", headers={"Authorization": "Bearer nope"})
    assert daemon.logs().count("HTTP 401") == 1


# -- the listener's configuration --------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:8420", "192.168.1.5:8420", "example.com:80", ":8420", "[::]:1"])
def test_a_non_loopback_listen_address_is_a_config_error_naming_ssh(make_daemon, listen):
    daemon = make_daemon(config=f"http:\n  listen: '{listen}'\n", start=False)
    proc = subprocess.run(daemon.args(), env=daemon.env, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2
    assert "$.http.listen" in proc.stderr and "SSH tunnel" in proc.stderr and "loopback" in proc.stderr


def test_listen_null_turns_http_off_and_ui_says_so(daemon):
    assert daemon.ok(op="status")["http"] == {"url": None, "reason": "the dashboard is off (http.listen: null)"}
    out = daemon.ctl("ui", "--print")
    assert out.returncode == 1 and "http.listen: null" in out.stderr


def test_a_port_in_use_leaves_the_queue_running_without_http(make_daemon):
    """When the port is taken the daemon warns, runs without HTTP, and `status` says why."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = make_daemon(config=f"http:\n  listen: 127.0.0.1:{port}\n")
        http = daemon.ok(op="status")["http"]
        assert http["url"] is None and f"127.0.0.1:{port}" in http["reason"]
        assert "in use" in http["reason"] and "WARNING no dashboard" in daemon.logs()
        assert daemon.ok(op="enqueue", tool="run-bash", payload="true")["id"] == 1


def test_ipv6_loopback_listens_and_checks_its_host(make_daemon):
    daemon = make_daemon(config="http:\n  listen: '[::1]:0'\n")
    url = daemon.ok(op="status")["http"]["url"]
    assert url.startswith("http://[::1]:") and url.endswith("/ui/")


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
def test_curl_reads_health_and_metrics_with_the_token(web, http):
    """The way a shell or Prometheus reads them: curl, the token from the file."""
    base = f"http://127.0.0.1:{http.port}"
    token_file = web.data_dir / "http-token"
    health = subprocess.run(["curl", "-sf", f"{base}/health"], capture_output=True, text=True)
    metrics = subprocess.run(["bash", "-c", f'curl -sf -H "Authorization: Bearer $(cat {token_file})" '
                                            f'{base}/metrics'], capture_output=True, text=True)
    refused = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/metrics"],
                             capture_output=True, text=True)
    assert health.stdout == '{"ok":true}' and refused.stdout == "401"
    assert "# TYPE sparkq_tasks gauge" in metrics.stdout and metrics.returncode == 0


# -- pages ---------------------------------------------------------------------------------------------


def test_tasks_page_filters_and_pages_newest_first(web, http, cookie):
    """The tasks page shows 50 tasks newest first with a link to older ones; text finds one."""
    ids = [t["id"] for t in web.ok(op="tasks")]
    for n in range(60 - len(ids)):
        web.ok(op="enqueue", tool="agent", payload=f"filler {n}")
    needle = web.ok(op="enqueue", tool="agent", payload={"needle": "haystack-7"})["id"]
    page = http.request("GET", "/ui/tasks", headers={"Cookie": cookie})[2].decode()
    rows = re.findall(r'<tr id="task-(\d+)"', page)
    assert len(rows) == 50 and int(rows[0]) == needle and rows == sorted(rows, key=int, reverse=True)
    older = re.search(r'href="(/ui/tasks\?[^"]*before=\d+)"', page)[1].replace("&amp;", "&")
    rest = re.findall(r'<tr id="task-(\d+)"', http.request("GET", older, headers={"Cookie": cookie})[2].decode())
    assert int(rest[0]) == int(rows[-1]) - 1
    found = http.request("GET", "/ui/tasks?text=HAYSTACK-7", headers={"Cookie": cookie})[2].decode()
    assert re.findall(r'<tr id="task-(\d+)"', found) == [str(needle)]


def test_task_page_shows_fields_history_and_unknown_fields(web, http, cookie):
    task = web.ok(op="enqueue", tool="agent", payload="see me")["id"]
    body = http.request("GET", f"/ui/tasks/{task}", headers={"Cookie": cookie})[2].decode()
    assert "see me" in body and 'class="timeline"' in body and "<dt>task_class</dt>" in body
    assert http.request("GET", "/ui/tasks/99999999", headers={"Cookie": cookie})[0] == 404


def test_schedules_page_without_schedules_says_there_are_none(http, cookie):
    """With no schedule yet, the page and the overview say so and how to add one."""
    body = http.request("GET", "/ui/schedules", headers={"Cookie": cookie})[2].decode()
    assert "No schedules" in body
    assert "No schedules" in http.request("GET", "/ui/", headers={"Cookie": cookie})[2].decode()


def test_listing_window_bounds_the_ids_looked_at():
    """`tasks` with min_id/max_id looks only at that window; newest reverses the order."""
    queue = sparkqd.Queue(sparkqd.Config())
    queue.bootstrap(0.0)
    for n in range(10):
        queue.enqueue(sparkqd.Enqueue(tool="llm-haiku", payload=f"p{n}"), 1.0)
    reads = sparkqd.QueueReads(queue)
    listed = reads.list_tasks(sparkqd.ListTasks(min_id=3, max_id=6, newest=True), 2.0)
    assert [t.id for t in listed] == [6, 5, 4, 3]
    assert [t.id for t in reads.list_tasks(sparkqd.ListTasks(text="P7"), 2.0)] == [8]
    assert [t.id for t in reads.list_tasks(sparkqd.ListTasks(max_id=2), 2.0)] == [1, 2]


def test_the_daemon_module_does_not_import_tornado():
    """tornado is imported when the listener starts, not with the daemon's code."""
    code = "import sys, sparkqd; print('tornado' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(sparkqd.__file__).parent)
    assert out.stdout.strip() == "False", out.stderr


def test_request_struct_for_http_is_the_sockets():
    """The HTTP body decoder is the socket's: the same Struct comes out of both."""
    codec = sparkqd.JsonLines(1 << 20)
    via_http = sparkqd.body_request("enqueue", b'{"tool": "agent", "payload": [1]}', codec)
    via_socket = codec.decode(b'{"op": "enqueue", "tool": "agent", "payload": [1]}')
    assert via_http == via_socket and msgspec.structs.asdict(via_http)["payload"] == [1]


def test_a_body_larger_than_a_frame_is_413_too_large(make_daemon):
    daemon, http = served(make_daemon, "server: {max_frame_bytes: 1024}\n")
    status, reply = http.api("enqueue", tool="agent", payload="x" * 2000)
    assert (status, reply["error"]["code"]) == (413, "too_large")


def test_a_coalescing_watch_gets_one_changed_for_requests_answered_together(daemon):
    """`watch` with coalesce: events of requests answered in one go come as one `changed`."""
    watcher = daemon.connect()
    assert watcher.call(op="watch", coalesce=True)["ok"]
    sender = daemon.connect()
    sender.send_raw(b"".join(sender.frame({"op": "enqueue", "tool": "llm-haiku"}) for _ in range(3)))
    replies = [sender.recv() for _ in range(3)]
    changed = watcher.recv()
    assert changed == {"event": "changed", "seq": changed["seq"], "count": 3}
    assert all(reply["ok"] for reply in replies)


def test_without_tornado_the_queue_runs_and_status_says_why(make_daemon, workdir):
    """A daemon that cannot import tornado warns and runs without HTTP."""
    fake = workdir / "no-tornado" / "tornado"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('tornado is missing here')\n")
    daemon = make_daemon(config=HTTP_ON, env={"PYTHONPATH": str(fake.parent)})
    assert daemon.ok(op="status")["http"] == {
        "url": None, "reason": "tornado is not installed (pip install tornado)"}
    assert "no dashboard or HTTP API" in daemon.logs() and daemon.ok(op="hello")
