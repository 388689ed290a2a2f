"""The web console (plugins/console.py): its routes over HTTP, and the page in headless Chromium.

Chromium is driven over the DevTools protocol with the small websocket client below; the tests
that need it are skipped only when no Chromium binary exists.
"""
import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import scan_and_confirm

TOKEN = "t0k-en"


# -- a headless Chromium driven over the DevTools protocol ---------------------------------

def chromium_binary():
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "headless_shell"):
        path = name and shutil.which(name)
        if path:
            return path
    return None


class WebSocket(object):
    """A minimal websocket client (RFC 6455): text frames out, whole messages in."""

    def __init__(self, url, timeout=10.0):
        rest = url.split("://", 1)[1]
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        self.sock.sendall(("GET /%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path, hostport, key))
                          .encode("ascii"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError("websocket handshake refused: %r" % head[:80])

    def _read(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("websocket closed")
            data += chunk
        return data

    def _frame(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        head = struct.pack("!B", 0x80 | opcode)
        if n < 126:
            head += struct.pack("!B", 0x80 | n)
        elif n < 65536:
            head += struct.pack("!BH", 0x80 | 126, n)
        else:
            head += struct.pack("!BQ", 0x80 | 127, n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send(self, text):
        self._frame(0x1, text.encode("utf-8"))

    def recv(self):
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 0x9:
                self._frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the browser")
            message += payload
            if b0 & 0x80:
                return message.decode("utf-8")

    def close(self):
        self.sock.close()


class Chromium(object):
    """A headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, binary):
        self.profile = tempfile.mkdtemp(prefix="webqq-chromium-")
        self.log = open(os.path.join(self.profile, "stderr.log"), "wb")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
             "--remote-debugging-port=0", "--user-data-dir=" + self.profile, "--window-size=1180,860",
             "about:blank"], stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.time() + 30
        while not os.path.exists(port_file) or not open(port_file).read().strip():
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not start")
            time.sleep(0.05)
        port = int(open(port_file).read().split()[0])
        with urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port, timeout=10) as answer:
            pages = [t for t in json.load(answer) if t["type"] == "page"]
        self.ws = WebSocket(pages[0]["webSocketDebuggerUrl"])
        self.ids = 0
        self.call("Page.enable")
        self.call("Runtime.enable")

    def call(self, method, **params):
        self.ids += 1
        self.ws.send(json.dumps({"id": self.ids, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.ids:
                if "error" in message:
                    raise RuntimeError("%s: %s" % (method, message["error"]))
                return message["result"]

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError("%s: %s" % (expression, result["exceptionDetails"]))
        return result["result"].get("value")

    def open(self, url):
        self.call("Page.navigate", url=url)
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
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        try:
            self.ws.close()
        except AttributeError:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


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
    client = make_client()
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
