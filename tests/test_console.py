"""The web console (plugins/console.py): its routes over HTTP, and the page in headless Chromium.

Chromium is driven by Playwright (with the machine's Chromium, never a downloaded one); the tests
that need it are skipped only when no Chromium binary exists.
"""
import base64
import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import scan_and_confirm

TOKEN = "t0k-en"


# -- a headless Chromium driven by Playwright ---------------------------------------------------

def chromium_binary():
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "headless_shell"):
        path = name and shutil.which(name)
        if path:
            return path
    return None


class Chromium(object):
    """A headless Chromium with one page: open a URL, evaluate JavaScript in it, wait for a condition."""

    def __init__(self, binary):
        from playwright.sync_api import sync_playwright
        self.playwright = sync_playwright().start()
        self.browser = self.playwright.chromium.launch(
            executable_path=binary, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                          "--disable-background-networking", "--disable-component-update"])
        self.page = self.browser.new_page(viewport={"width": 1180, "height": 860})

    def evaluate(self, expression):
        return self.page.evaluate(expression)

    def open(self, url):
        self.page.goto(url)
        self.wait("document.readyState === 'complete' && location.href !== 'about:blank'")

    def wait(self, expression, timeout=10.0):
        """The value of expression once it is truthy, polling the page."""
        deadline = time.time() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.time() > deadline:
                assert value, "the page never showed: %s" % expression
                return value
            time.sleep(0.05)

    def screenshot(self, path):
        self.page.screenshot(path=path)

    def close(self):
        self.browser.close()
        self.playwright.stop()


@pytest.fixture(scope="module")
def browser():
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium binary (chromium, chromium-browser, google-chrome): apt-get install chromium")
    b = Chromium(binary)
    yield b
    b.close()


# -- a client with the Openqq server and the console ------------------------------------------

@pytest.fixture
def console(sim, make_client):
    """A client (not started) serving the console with a token; .url is the server's base URL."""
    client = make_client(qrcode_display="console")
    server = client.load("openqq", listen=[{"host": "127.0.0.1", "port": 0}], access_token=TOKEN)
    plugin = client.load("console", hold=2)
    assert server is not None and plugin is not None
    client.url, client.console = server.urls[0], plugin
    return client


def http(url, token=TOKEN, headers=None, follow=True):
    """(status, headers, body) of a GET, whatever the status."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    if token:
        request.add_header("Authorization", "Bearer " + token)
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None


def test_console_routes_follow_the_openqq_rules(sim, console):
    url = console.url
    status, headers, body = http(url + "/console/", token=None)
    assert (status, json.loads(body)) == (403, {"code": -6, "status": "auth failure"})
    status, headers, body = http(url + "/console/", headers={"Origin": "http://evil.example"})
    assert (status, json.loads(body)) == (403, {"code": -6, "status": "cross-site request refused"})
    status, headers, body = http(url + "/console/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"<title>webqq</title>" in body
    assert not re.search(rb"https?:|//[a-z]|<(link|iframe|object)|\b(src|href)=", body)   # no external asset
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    status, headers, body = http(url + "/console?access_token=" + TOKEN, token=None, follow=False)
    assert (status, headers["Location"]) == (302, "/console/?access_token=" + TOKEN)
    status, _, body = http(url + "/console/qrcode.png")
    assert (status, json.loads(body)) == (404, {"code": -8, "status": "no QR code is waiting for a scan"})
    status, _, body = http(url + "/console/nope")
    assert (status, json.loads(body)) == (403, {"code": -8, "status": "api not found"})

    status, _, body = http(url + "/console/status")
    first = json.loads(body)
    assert first["state"] == "init" and first["qrcode"] is None and first["messages"] == []
    console.start()
    assert sim.wait_qr("waiting") and console.wait_for_state("scaning", timeout=5)
    status, headers, body = http(url + "/console/qrcode.png")
    assert status == 200 and headers["Content-Type"] == "image/png" and body == console.qrcode
    status, _, body = http(url + "/console/status")
    now = json.loads(body)
    assert now["qrcode"] == base64.b64encode(console.qrcode).decode("ascii") and now["qrcode_number"] == 1

    started = time.time()                                    # nothing changes: answered after `hold`
    _, _, body = http(url + "/console/status?since=%d" % now["version"])
    assert 1.5 < time.time() - started < 4 and json.loads(body)["version"] == now["version"]
    threading.Timer(0.3, sim.expire).start()                 # a change answers at once
    started = time.time()
    _, _, body = http(url + "/console/status?since=%d" % now["version"])
    assert time.time() - started < 1.5 and json.loads(body)["version"] > now["version"]


def test_the_page_in_headless_chromium(sim, console, browser, tmp_path):
    console.start()
    assert sim.wait_qr("waiting")
    browser.open(console.url + "/console/?access_token=" + TOKEN)
    assert browser.evaluate("location.search") == ""                 # the token left the address bar
    browser.wait("!document.getElementById('qrbox').hidden && document.getElementById('qr').naturalWidth > 0")
    shown = browser.evaluate("document.getElementById('qr').src")
    assert shown == "data:image/png;base64," + base64.b64encode(console.qrcode).decode("ascii")
    assert browser.evaluate("document.getElementById('state').textContent") == "scaning"
    assert browser.evaluate("document.getElementById('hint').textContent") == "scan the QR code with the QQ app"

    sim.expire()                                                     # a new QR code replaces the old one
    browser.wait("document.getElementById('qr').src !== %s" % json.dumps(shown))
    console.recorder.wait("input_qrcode", count=2)
    browser.wait("document.getElementById('qr').src === %s" % json.dumps(
        "data:image/png;base64," + base64.b64encode(console.qrcode).decode("ascii")))

    scan_and_confirm(sim)
    browser.wait("document.getElementById('state').textContent === 'running'")
    assert browser.evaluate("document.getElementById('qrbox').hidden") is True
    assert browser.evaluate("document.getElementById('qr').hasAttribute('src')") is False
    counts = browser.evaluate("['friends', 'groups', 'discusses'].map(id => document.getElementById(id).textContent)")
    assert counts == [str(len(sim.world.friends)), str(len(sim.world.groups)), str(len(sim.world.discusses))]
    assert browser.evaluate("document.getElementById('user').textContent") == "%s (%s)" % (
        console.user.displayname, sim.world.user.qq)

    friend = sim.world.friends[0]
    sim.inject_friend_message(friend.uin, "来自模拟器 <b>not bold</b>")
    text = browser.wait("[...document.querySelectorAll('#messages li.recv')].map(li => li.textContent).join('|')")
    assert "来自模拟器 <b>not bold</b>" in text and console.contacts.friend(friend.uin).displayname in text
    assert browser.evaluate("document.querySelectorAll('#messages b').length") == 0

    group = sim.world.groups[1]
    browser.evaluate("document.getElementById('kind').value = 'group';"
                     "document.getElementById('kind').dispatchEvent(new Event('change'))")
    browser.wait("document.getElementById('target').options.length === %d" % len(sim.world.groups))
    group_id = [g.id for g in console.contacts.groups() if g.uid == group.qq][0]
    browser.evaluate("document.getElementById('target').value = '%s';"
                     "document.getElementById('content').value = '网页发送 from the form';"
                     "document.getElementById('send').click()" % group_id)
    assert browser.wait("document.getElementById('result').textContent") in ("sending...", "发送成功")
    browser.wait("document.getElementById('result').textContent === '发送成功'")
    sent = [s for s in sim.sent if s["text"] == "网页发送 from the form"]
    assert len(sent) == 1 and sent[0]["endpoint"].endswith("send_qun_msg2") and sent[0]["target"] == group.gid
    listed = browser.wait("[...document.querySelectorAll('#messages li.send')].map(li => li.textContent).join('|')")
    assert "网页发送 from the form" in listed and "[发送成功]" in listed
    assert browser.evaluate("document.getElementById('content').value") == ""
