"""The dashboard in a real browser (issue 13): Debian's chromium, headless, driven by selenium.

One browser and one daemon serve the whole module, in the order a user goes: open the
URL `sparkqctl ui` prints, look at the overview, enqueue from the form and watch the
task appear without a reload, open it and watch its log grow while it runs, cancel a
task, pause a stream. Every page is saved as a screenshot and must not be blank.
Nothing polls in the page; the test waits for what the page shows, with a timeout.
"""

import base64
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import HTTP_ON, Daemon, wait_until

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
CONFIG = """
tools:
  agent: {task_class: FAST_SCRIPT, description: claimed by an agent}
  run-bash: {task_class: FAST_SCRIPT, description: Run a bash command, command: [bash, -c]}
workers: {count: 1}
schedules:
  nightly: {cron: "0 3 * * *", timezone: Europe/Berlin, tool: agent, payload: report}
""" + HTTP_ON
#: Distinct colours a screenshot of a page must have: a blank one has one or two.
MIN_COLOURS = 16


@pytest.fixture(scope="module")
def daemon():
    with tempfile.TemporaryDirectory(prefix="sq-", dir="/tmp") as d:
        daemon = Daemon(Path(d), CONFIG).start()
        yield daemon
        daemon.kill()
        daemon.log.close()


@pytest.fixture(scope="module")
def browser():
    """One headless chromium for the module, with a blank tab to count screenshot colours."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(10)
    driver.counting_tab = driver.current_window_handle  # stays at about:blank
    driver.switch_to.new_window("tab")
    yield driver
    driver.quit()


def until(driver, predicate, message, timeout=10.0):
    """Wait for what the page shows; fail with ``message``."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda _: predicate(), message)


def text_of(driver, selector: str) -> str:
    """The text an element shows now (read in one step: live parts are swapped whole)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", selector)


def confirm(driver, selector: str) -> None:
    """Click an action's button and accept the confirmation it asks for."""
    from selenium.webdriver.support import expected_conditions

    driver.find_element("css selector", selector).click()
    until(driver, lambda: expected_conditions.alert_is_present()(driver), "the confirmation")
    driver.switch_to.alert.accept()


def mark_page(driver) -> None:
    """Mark the loaded document: a reload would lose the mark."""
    driver.execute_script("window.sparkqMark = 'not reloaded'")


def not_reloaded(driver) -> bool:
    return driver.execute_script("return window.sparkqMark") == "not reloaded"


def distinct_colours(driver, png: bytes) -> int:
    """The colours of a PNG, counted by the browser itself in its blank tab."""
    page = driver.current_window_handle
    driver.switch_to.window(driver.counting_tab)
    try:
        return driver.execute_async_script("""
            const done = arguments[arguments.length - 1], image = new Image();
            image.onload = () => {
              const canvas = document.createElement('canvas');
              canvas.width = image.width; canvas.height = image.height;
              const context = canvas.getContext('2d');
              context.drawImage(image, 0, 0);
              const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
              const seen = new Set();
              for (let i = 0; i < data.length; i += 4) seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
              done(seen.size);
            };
            image.onerror = () => done(-1);
            image.src = 'data:image/png;base64,' + arguments[0];""", base64.b64encode(png).decode())
    finally:
        driver.switch_to.window(page)


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Save the page as ``name``.png under the test's temp dir; it must not be blank."""
    path = tmp_path / f"{name}.png"
    png = driver.get_screenshot_as_png()
    path.write_bytes(png)
    assert distinct_colours(driver, png) >= MIN_COLOURS, f"{path} looks blank"
    return path


def open_page(driver, daemon, path: str) -> None:
    driver.get(daemon.base_url + path)
    until(driver, lambda: text_of(driver, "#live") == "live", f"{path} to go live")


# -- the tests, in the order a user goes --------------------------------------------------------


def test_the_token_url_signs_in_and_shows_the_overview(browser, daemon, tmp_path):
    """The URL `sparkqctl ui --print` gives lands on the overview, token gone from the URL."""
    url = daemon.ctl_ok("ui", "--print").strip()
    daemon.base_url = url.partition("/?")[0]
    browser.get(url)
    until(browser, lambda: browser.current_url == daemon.base_url + "/ui/", "the redirect to /ui/")
    until(browser, lambda: text_of(browser, "#live") == "live", "the live stream")
    assert text_of(browser, "h1") == "Overview" and "token" not in browser.current_url
    assert "default" in text_of(browser, "#streams") and "ok" in text_of(browser, "#health")
    screenshot(browser, tmp_path, "overview")


def test_enqueue_from_the_form_shows_the_task_without_a_reload(browser, daemon, tmp_path):
    """The enqueue form adds a task (after a confirmation); the list shows it, live."""
    open_page(browser, daemon, "/ui/tasks")
    mark_page(browser)
    gate = Path(daemon.workdir) / "go"
    browser.find_element("css selector", "#enqueue summary").click()
    browser.find_element("css selector", "#enqueue-tool option[value='run-bash']").click()
    browser.find_element("id", "enqueue-payload").send_keys(
        f"echo line 1; while [ ! -e {gate} ]; do sleep 0.05; done; echo line 2; echo all done")
    confirm(browser, "#enqueue-submit")
    until(browser, lambda: "Enqueued task" in text_of(browser, "#notice"), "the enqueue reply")
    task = int(text_of(browser, "#notice").split("task ")[1].split(".")[0])
    until(browser, lambda: browser.find_elements("id", f"task-{task}"), "the new row")
    assert not_reloaded(browser)
    daemon.task_id = task
    screenshot(browser, tmp_path, "tasks")


def test_the_task_page_shows_its_log_growing_while_it_runs(browser, daemon, tmp_path):
    """Opened from the list, the task's log shows its first line, then the rest as it runs."""
    browser.find_element("css selector", f"#task-{daemon.task_id} a").click()
    until(browser, lambda: text_of(browser, "h1") == f"Task {daemon.task_id}", "the task page")
    until(browser, lambda: text_of(browser, "#live") == "live", "the live stream")
    mark_page(browser)
    until(browser, lambda: "line 1" in text_of(browser, "#log"), "the first line")
    assert "line 2" not in text_of(browser, "#log")
    (Path(daemon.workdir) / "go").touch()
    until(browser, lambda: "all done" in text_of(browser, "#log"), "the rest of the log")
    until(browser, lambda: "completed" in text_of(browser, "#task-head"), "the status, live")
    assert not_reloaded(browser) and "completed" in text_of(browser, "#task-history")
    screenshot(browser, tmp_path, "task")


def test_cancel_asks_then_cancels_the_task(browser, daemon, tmp_path):
    task = daemon.ok(op="enqueue", tool="agent", payload="left for an agent")["id"]
    open_page(browser, daemon, f"/ui/tasks/{task}")
    confirm(browser, "#cancel-task")
    until(browser, lambda: "cancelled" in text_of(browser, "#task-head"), "the cancelled state")
    assert daemon.ok(op="task", task=task)["status"] == "cancelled"
    screenshot(browser, tmp_path, "cancelled")


def test_pause_and_resume_a_stream_from_the_overview(browser, daemon, tmp_path):
    open_page(browser, daemon, "/ui/")
    confirm(browser, "#pause-default")
    until(browser, lambda: browser.find_elements("css selector", "#streams .badge.paused"),
          "the paused badge")
    assert daemon.ok(op="stream.list")[0]["paused"] is True
    screenshot(browser, tmp_path, "paused")
    confirm(browser, "#resume-default")
    until(browser, lambda: browser.find_elements("css selector", "#streams .badge.active"),
          "the active badge")


def test_overview_follows_events_it_did_not_cause(browser, daemon):
    """A task finished by someone else shows on the open overview without a reload."""
    open_page(browser, daemon, "/ui/")
    mark_page(browser)
    task = daemon.ok(op="enqueue", tool="agent", payload="failing")["id"]
    daemon.ok(op="claim", tool="agent")
    daemon.ok(op="fail", task=task, reason="agent gave up")
    until(browser, lambda: "agent gave up" in text_of(browser, "#failures"), "the failure")
    assert not_reloaded(browser)


def make_repository(path: Path) -> str:
    """A git repository with one commit on main, made with the user's git; its path."""
    for args in (["init", "--quiet", "-b", "main", str(path)],
                 ["-C", str(path), "-c", "user.name=Tess", "-c", "user.email=tess@example.org",
                  "commit", "--quiet", "--allow-empty", "-m", "first"]):
        subprocess.run(["git", *args], check=True, capture_output=True, timeout=30)
    return str(path)


def test_the_overview_lists_a_workspace_as_it_is_made(browser, daemon, tmp_path):
    """A worktree prepared for a claimed task appears in the workspaces panel without a reload."""
    repo = make_repository(Path(daemon.workdir) / "app")
    daemon.ok(op="stream.create", name="repos", session="default")
    open_page(browser, daemon, "/ui/")
    mark_page(browser)
    assert "No repository workspaces" in text_of(browser, "#workspaces")
    task = daemon.ok(op="enqueue", tool="agent", payload="x", stream="repos", repo=repo,
                     workspace="worktree")["id"]
    assert daemon.ok(op="claim", tool="agent", stream="repos")["id"] == task
    until(browser, lambda: f"sparkq/{task}" in text_of(browser, "#workspaces"), "the worktree")
    row = text_of(browser, "#workspaces")
    assert "worktree" in row and f"#{task}" in row and "active" in row and not_reloaded(browser)
    screenshot(browser, tmp_path, "workspaces")


def test_every_control_has_a_label_and_the_skip_link_comes_first(browser, daemon):
    from selenium.webdriver.common.keys import Keys

    for path in ("/ui/", "/ui/tasks", f"/ui/tasks/{daemon.task_id}"):
        open_page(browser, daemon, path)
        unlabelled = browser.execute_script("""
            return [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
              .filter((e) => e.labels.length === 0).map((e) => e.name);""")
        assert unlabelled == [], path
    browser.find_element("tag name", "body").send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("class") == "skip"


def test_dark_mode_follows_the_system_setting(browser, daemon, tmp_path):
    open_page(browser, daemon, "/ui/")
    light = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    try:
        dark = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
        screenshot(browser, tmp_path, "overview-dark")
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    assert light != dark


def test_the_schedules_page_renders(browser, daemon, tmp_path):
    open_page(browser, daemon, "/ui/schedules")
    assert text_of(browser, "h1") == "Schedules"
    assert "nightly" in text_of(browser, "#schedule-list")
    screenshot(browser, tmp_path, "schedules")


def test_schedule_actions(browser, daemon):
    """Pause, resume and fire a schedule from its page (where the daemon has schedules)."""
    name = daemon.call(op="schedule.list")["result"][0]["name"]
    open_page(browser, daemon, "/ui/schedules")
    confirm(browser, f"#pause-schedule-{name}")
    until(browser, lambda: browser.find_elements("css selector", f"#schedule-{name} .badge.paused"),
          "the paused schedule")
    confirm(browser, f"#resume-schedule-{name}")
    until(browser, lambda: browser.find_elements("css selector", f"#schedule-{name} .badge.active"),
          "the resumed schedule")
    confirm(browser, f"#fire-schedule-{name}")
    fired = wait_until(lambda: [t for t in daemon.call(op="tasks")["result"]
                                if t.get("schedule") == name], message="the fired task")
    assert fired[0]["payload"] == "report"

