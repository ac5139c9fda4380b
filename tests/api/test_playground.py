"""The playground end to end in Debian's headless chromium (no browser download), driven over the DevTools
protocol: start a 2-page story from the page, see progress, the latest preview, and both pages' images in the
storyboard."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import threading
import time
import urllib.request

import pytest
from testkit import free_port

from mgmflow.workers.steps import StepContext

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/dev.sh setup installs it)"),
]


class Page:
    """A minimal DevTools client: evaluate JavaScript in one page."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.socket = connect(ws_url, max_size=None, open_timeout=20)
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.socket.recv(timeout=30))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                return reply["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        log = self.evaluate('document.getElementById("events").innerText')
        raise TimeoutError(f"{expression} stayed false; page log: {log}")


@pytest.fixture
def browser(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
         f"--remote-debugging-port={port}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as response:
                    pages = [t for t in json.load(response) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.2)
        page = Page(pages[0]["webSocketDebuggerUrl"])
        yield page
        page.socket.close()
    finally:
        process.kill()
        process.wait(10)


def test_story_from_the_playground(live_server, browser, monkeypatch):
    # The last page's critique starts once the first page shows: a machine fast enough to finish both pages (and the
    # run) in one batch of events would otherwise show them together, after the run's end.
    first_page_shown, check = threading.Event(), StepContext.check

    def held_until_the_first_page_shows(ctx):
        if ":page-02:" in ctx.header.task_id and ctx.header.task_id.endswith(":critique"):
            first_page_shown.wait(240)
        check(ctx)

    monkeypatch.setattr(StepContext, "check", held_until_the_first_page_shows)
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{live_server.url}/")
    browser.wait_for('document.querySelector("#workflow option[value=story]") !== null', 30)
    browser.wait_for('document.getElementById("field-premise") !== null', 30)
    browser.evaluate("""
        // The run's status when the first page shows in the storyboard: pages arrive as they finish, not at the end.
        new MutationObserver((changes, observer) => {
            window.firstPageWhile = document.getElementById("status").textContent;
            observer.disconnect();
        }).observe(document.getElementById("storyboard"), { childList: true, subtree: true });
        document.getElementById("field-premise").value = "A lighthouse keeper befriends a whale.";
        document.getElementById("field-pages").value = "2";
        document.getElementById("field-seed").value = "7";
        document.getElementById("field-rounds").value = "1";
        document.getElementById("field-width").value = "96";   // optional fields (int | None) are in the form
        document.getElementById("field-height").value = "80";
        document.getElementById("field-steps").value = "2";
        document.getElementById("start").click();
        true
    """)
    # Progress shows while it runs; then both pages appear in the storyboard.
    browser.wait_for('/progress|task/.test(document.getElementById("events").innerText)', 120)
    browser.wait_for('document.querySelectorAll("#storyboard img").length === 1', 240)
    first_page_shown.set()
    browser.wait_for('document.querySelectorAll("#storyboard img").length === 2', 240)
    assert browser.evaluate('document.getElementById("status").textContent') == "success"
    assert browser.evaluate("window.firstPageWhile").startswith("running")
    sizes = browser.evaluate("""Promise.all([...document.querySelectorAll("#storyboard img")].map(
        (img) => img.decode().then(() => [img.naturalWidth, img.naturalHeight])))""")
    assert sizes == [[96, 80], [96, 80]]  # the custom page size reached the drawings
    assert browser.evaluate('document.getElementById("position").textContent') == ""
    assert browser.evaluate('!document.getElementById("output-link").hidden')  # the storyboard's zip
    captions = browser.evaluate('[...document.querySelectorAll("#storyboard figcaption")].map((c) => c.textContent)')
    assert len(captions) == 2 and all(caption for caption in captions)
    assert browser.evaluate('document.querySelectorAll("#images img").length') >= 2  # images arrived while it ran
    # The page asks for previews (every 2 steps by default) and shows the latest one it was sent.
    browser.wait_for('!document.getElementById("preview-panel").hidden'
                     ' && document.getElementById("preview").naturalWidth > 0', 10)
    assert browser.evaluate('document.getElementById("preview-caption").textContent').startswith("preview, step ")


def test_two_turn_chat_from_the_playground(live_server, browser):
    """A chat continues on its thread: the second turn sees the first; the status never stays "queued"; long
    answers wrap inside their box."""
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{live_server.url}/")
    browser.wait_for('document.querySelector("#workflow option[value=chat]") !== null', 30)
    browser.evaluate("""
        const select = document.getElementById("workflow");
        select.value = "chat";
        select.dispatchEvent(new Event("change"));
        true
    """)
    browser.wait_for('document.getElementById("field-message") !== null', 30)
    assert browser.evaluate('document.getElementById("same-thread").checked')  # chat: one thread by default
    threads = []
    for turn, text in enumerate(["Hello there, who are you?", "And what did I just ask you?"], start=1):
        browser.evaluate(f"""
            document.getElementById("field-message").value = {text!r};
            document.getElementById("start").click();
            true
        """)
        browser.wait_for(f'document.querySelectorAll("#conversation li").length === {2 * turn}'
                         ' && !document.getElementById("start").disabled', 120)
        assert browser.evaluate('document.getElementById("status").textContent') == "success"
        assert browser.evaluate('document.getElementById("position").textContent') == ""
        threads.append(browser.evaluate('document.getElementById("thread").textContent'))
    assert threads[0] == threads[1] and threads[0].startswith("thread ")
    turns = browser.evaluate('[...document.querySelectorAll("#conversation li")].map((li) => li.className)')
    assert turns == ["user", "assistant", "user", "assistant"]
    # A long line wraps: nothing in the conversation is wider than its box.
    assert browser.evaluate("""[...document.querySelectorAll("#conversation li")].every(
        (li) => li.scrollWidth <= li.clientWidth + 1)""")


def test_docs_and_playground_render_offline_under_a_content_security_policy(live_server, browser):
    import re

    import httpx

    for path in ("/docs", "/playground/index.html", "/openapi.json"):
        headers = httpx.get(f"{live_server.url}{path}").headers
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "frame-ancestors 'none'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    page = httpx.get(f"{live_server.url}/docs").text
    # Every file of the page comes from this server (it rendered blank offline: Swagger UI came from a CDN).
    assert all(url.startswith("/") for url in re.findall(r'(?:src|href)="([^"]+)"', page)), page
    browser.call("Page.enable")
    browser.call("Page.addScriptToEvaluateOnNewDocument", source="""
        window.violations = [];
        document.addEventListener("securitypolicyviolation",
            (e) => window.violations.push(e.violatedDirective + " " + e.blockedURI));""")
    browser.call("Page.navigate", url=f"{live_server.url}/docs")
    browser.wait_for('document.querySelectorAll(".opblock").length > 30', 30)  # every operation is listed
    assert browser.evaluate("window.violations") == []
    browser.call("Page.navigate", url=f"{live_server.url}/")
    browser.wait_for('document.querySelector("#workflow option[value=story]") !== null', 30)
    assert browser.evaluate("window.violations") == []
