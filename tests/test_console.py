"""The web console (plugins/console.py): its routes over HTTP, and the page, a web QQ client, in
headless Chromium driven like a person would (clicks and keys), against the SmartQQ and OneBot
simulators.

Chromium is driven by Playwright with the machine's Chromium (never a downloaded one); the tests
that need it are skipped only when no Chromium binary exists.
"""
import base64
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

import webqq
from conftest import log_in, scan_and_confirm, wait_until
from onebot_sim import OneBotSimulator
from test_onebot import ALICE, BOB, SECRET, WORLD
from test_onebot import TOKEN as ONEBOT_TOKEN

TOKEN = "t0k-en"


# -- a headless Chromium driven by Playwright ---------------------------------------------------

def chromium_binary():
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "headless_shell"):
        path = name and shutil.which(name)
        if path:
            return path
    return None


class Chromium(object):
    """A headless Chromium; page() opens a fresh page (its own storage) at a viewport size."""

    def __init__(self, binary):
        from playwright.sync_api import sync_playwright
        self.playwright = sync_playwright().start()
        self.browser = self.playwright.chromium.launch(
            executable_path=binary, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                          "--disable-background-networking", "--disable-component-update"])
        self.contexts = []

    def page(self, url, width=1100, height=760):
        context = self.browser.new_context(viewport={"width": width, "height": height}, locale="en-US")
        self.contexts.append(context)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.goto(url)
        return page

    def close(self):
        for context in self.contexts:
            context.close()
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


def text(page, selector):
    return page.locator(selector).inner_text()


def wait_text(page, selector, expected, timeout=10.0):
    """Wait until the element's text equals expected (a str) or matches it (a compiled regex)."""
    def shown():
        found = page.locator(selector)
        value = found.inner_text() if found.count() else None
        return value if (value == expected if isinstance(expected, str) else
                         value is not None and expected.search(value)) else None
    value = wait_until(shown, timeout, 0.05)
    assert value, "%s never showed %r (it shows %r)" % (selector, expected, page.locator(selector).all_inner_texts())
    return value


def bubbles(page):
    """The conversation's messages as (in|out, text of the bubble, status or "")."""
    return page.evaluate("""[...document.querySelectorAll('#log .msg')].map(m => [
        m.classList.contains('out') ? 'out' : 'in', m.querySelector('.bubble').textContent,
        (m.querySelector('.status') || {textContent: ''}).textContent])""")


def contact(conversation):
    return '.contact[data-conversation="%s"]' % conversation


# -- a client with the Openqq server and the console ------------------------------------------

@pytest.fixture
def console(sim, make_client):
    """A client (not started) serving the console with a token; .url is the server's base URL."""
    client = make_client(qrcode_display="console")
    server = client.load("openqq", listen=[{"host": "127.0.0.1", "port": 0}], access_token=TOKEN)
    plugin = client.load("console", hold=2, history=3, conversations=2)
    assert server is not None and plugin is not None
    client.url, client.console, client.server = server.urls[0], plugin, server
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


def get_json(url):
    status, _, body = http(url)
    return status, json.loads(body)


@pytest.mark.slow
def test_console_routes_follow_the_openqq_rules(sim, console):
    url = console.url
    for path in ("/console/", "/console/history?conversation=friend:1", "/console/conversations", "/console/status"):
        status, headers, body = http(url + path, token=None)
        assert (status, json.loads(body)) == (403, {"code": -6, "status": "auth failure"}), path
    status, headers, body = http(url + "/console/", headers={"Origin": "http://evil.example"})
    assert (status, json.loads(body)) == (403, {"code": -6, "status": "cross-site request refused"})
    status, headers, body = http(url + "/console/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"<title>webqq</title>" in body
    assert not re.search(rb"https?:|//[a-z]|<(link|iframe|object)|\b(src|href)=", body)   # no external asset
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "script-src 'sha256-" in headers["Content-Security-Policy"]
    status, headers, body = http(url + "/console?access_token=" + TOKEN, token=None, follow=False)
    assert (status, headers["Location"]) == (302, "/console/?access_token=" + TOKEN)
    status, _, body = http(url + "/console/qrcode.png")
    assert (status, json.loads(body)) == (404, {"code": -8, "status": "no QR code is waiting for a scan"})
    status, _, body = http(url + "/console/nope")
    assert (status, json.loads(body)) == (403, {"code": -8, "status": "api not found"})
    assert get_json(url + "/console/history?conversation=nobody") == (400, {
        "code": -9, "status": "conversation must be friend:ID, group:ID, discuss:ID, sess:group:ID:MEMBER "
                              "or sess:discuss:ID:MEMBER"})
    assert get_json(url + "/console/history?conversation=friend:1") == (
        200, {"code": 0, "conversation": "friend:1", "messages": []})

    _, first = get_json(url + "/console/status")
    assert (first["state"], first["qrcode"], first["user"], first["upstream"]) == ("init", None, None, "smartqq")
    console.start()
    assert sim.wait_qr("waiting") and console.wait_for_state("scaning", timeout=5)
    status, headers, body = http(url + "/console/qrcode.png")
    assert status == 200 and headers["Content-Type"] == "image/png" and body == console.qrcode
    _, now = get_json(url + "/console/status")
    assert now["qrcode"] == base64.b64encode(console.qrcode).decode("ascii") and now["qrcode_number"] == 1

    # nothing changes: answered after `hold`, the request parked without a thread meanwhile
    server = console.server.servers[0]
    waiting = {}
    thread = threading.Thread(target=lambda: waiting.update(answer=get_json(url + "/console/status?since=%d"
                                                                            % now["version"])))
    started = time.time()
    thread.start()
    assert wait_until(lambda: len(server.parker) == 1)
    assert not [t for t in threading.enumerate() if t.name.startswith("openqq-conn-")]
    thread.join(10)
    assert 1.5 < time.time() - started < 4 and waiting["answer"][1]["version"] == now["version"]
    threading.Timer(0.3, sim.expire).start()                 # a change answers at once
    started = time.time()
    _, changed = get_json(url + "/console/status?since=%d" % now["version"])
    assert time.time() - started < 1.5 and changed["version"] > now["version"]

    # the history of each conversation: the messages as check_event gives them, the last `history` kept
    scan_and_confirm(sim)
    assert console.wait_for_state("running", timeout=10)
    friend, group = sim.world.friends[0], sim.world.groups[0]
    for n in range(4):
        sim.inject_friend_message(friend.uin, "msg %d" % n)
    console.recorder.wait("receive_message", count=4)
    status, _, body = http(url + "/openqq/send_friend_message?id=%d&content=mine" % friend.uin)
    sent = json.loads(body)
    member = [m for m in group.members if m.uin != sim.world.user.uin][0]
    sim.inject_group_message(group.gid, member.uin, "in the group")
    console.recorder.wait("receive_message", count=5)
    console.recorder.wait("send_message")
    events = json.loads(http(url + "/openqq/check_event?cursor=0")[2])
    as_kept = [{k: v for k, v in e.items() if k != "cursor"} for e in events]
    _, history = get_json(url + "/console/history?conversation=friend:%d" % friend.uin)
    assert history["messages"] == [e for e in as_kept if e.get("sender_id") == friend.uin or
                                   e.get("receiver_id") == friend.uin][-3:]
    assert [m["content"] for m in history["messages"]] == ["msg 2", "msg 3", "mine"]
    assert history["messages"][-1]["id"] == sent["id"] and history["messages"][-1]["code"] == 0
    _, listed = get_json(url + "/console/conversations")
    assert [(c["conversation"], c["count"], c["last"]["content"]) for c in listed["conversations"]] == [
        ("group:%d" % group.gid, 1, "in the group"), ("friend:%d" % friend.uin, 3, "mine")]
    other = sim.world.friends[1]
    sim.inject_friend_message(other.uin, "a third conversation")        # conversations=2: the quietest goes
    console.recorder.wait("receive_message", count=6)
    _, listed = get_json(url + "/console/conversations")
    assert [c["conversation"] for c in listed["conversations"]] == ["friend:%d" % other.uin, "group:%d" % group.gid]


# -- the page in headless Chromium --------------------------------------------------------------

@pytest.mark.slow
def test_the_login_view_shows_the_qr_code_the_state_and_what_to_do(sim, console, browser, tmp_path):
    console.start()
    assert sim.wait_qr("waiting")
    page = browser.page(console.url + "/console/?access_token=" + TOKEN)
    wait_text(page, "#headline", "Scan the QR code")
    assert page.evaluate("location.search") == ""                     # the token left the address bar
    assert page.locator("#qr").is_visible() and page.locator("#app").is_hidden()
    shown = page.get_attribute("#qr", "src")
    assert shown == "data:image/png;base64," + base64.b64encode(console.qrcode).decode("ascii")
    assert text(page, "#next").startswith("Open the QQ app on your phone, tap + and then Scan")
    page.screenshot(path=str(tmp_path / "login.png"))

    sim.expire()                                                      # a new QR code replaces the old one
    console.recorder.wait("input_qrcode", count=2)
    wait_until(lambda: page.get_attribute("#qr", "src") == "data:image/png;base64," +
               base64.b64encode(console.qrcode).decode("ascii"))
    assert page.get_attribute("#qr", "src") != shown

    page.click("#lang")                                               # 中文
    wait_text(page, "#headline", "请扫描二维码")
    assert text(page, "#next").startswith("在手机上打开QQ")
    page.click("#lang")
    sim.scan()
    wait_text(page, "#headline", "Confirm on your phone")
    assert text(page, "#next") == "Scanned. Now tap Log in (Allow) on your phone." and page.locator("#qr").is_hidden()
    sim.confirm()
    wait_until(lambda: page.locator("#app").is_visible())
    assert page.locator("#login").is_hidden()
    assert text(page, "#me") == "%s (%s)" % (console.user.displayname, sim.world.user.qq)
    wait_text(page, "#link", "live")
    assert page.errors == []


@pytest.mark.slow
def test_chat_with_a_friend_send_and_see_the_reply_and_unread_counts(sim, console, browser):
    log_in(sim, console)
    friend, other = sim.world.friends[0], sim.world.friends[1]
    friend_name = console.contacts.friend(friend.uin).displayname
    sim.inject_friend_message(friend.uin, "kept before the page opened")
    console.recorder.wait("receive_message")
    page = browser.page(console.url + "/console/?access_token=" + TOKEN)
    wait_text(page, "#link", "live")
    expected = ["%s (%d)" % (category, len([f for f in console.contacts.friends() if f.category == category]))
                for category in dict.fromkeys(f.category for f in console.contacts.friends())]
    expected += ["Groups (%d)" % len(sim.world.groups), "Discusses (%d)" % len(sim.world.discusses)]
    assert wait_until(lambda: page.locator("#contacts summary .name").all_text_contents() == expected), (
        expected, page.locator("#contacts summary .name").all_text_contents())

    page.click(contact("friend:%d" % friend.uin))
    wait_text(page, "#title", friend_name)
    wait_until(lambda: bubbles(page) == [["in", "kept before the page opened", ""]])
    page.click("#text")
    page.keyboard.type("你好 webqq")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    page.keyboard.press("Enter")
    assert wait_until(lambda: [s for s in sim.sent if s["text"] == "你好 webqq\nsecond line"])
    wait_until(lambda: bubbles(page)[-1] == ["out", "你好 webqq\nsecond line", "sent · code 0 · 发送成功"])
    assert page.input_value("#text") == ""

    sim.inject_friend_message(friend.uin, "the friend's reply [微笑]")
    wait_until(lambda: bubbles(page)[-1] == ["in", "the friend's reply [微笑]", ""])
    assert page.locator("#log .msg").last.locator(".face").inner_text() == "[微笑]"

    page.click("#faces")                                              # a face from the picker
    page.locator("#picker button", has_text=re.compile("^微笑$")).click()
    assert page.input_value("#text") == "[微笑]"
    page.keyboard.press("Enter")
    assert wait_until(lambda: [s for s in sim.sent if ["face", 14] in s["content"]])

    # a message to another conversation raises its unread count; opening it clears the count
    sim.inject_friend_message(other.uin, "to the other conversation")
    wait_text(page, contact("friend:%d" % other.uin) + " .unread", "1")
    sim.inject_friend_message(other.uin, "and again")
    wait_text(page, contact("friend:%d" % other.uin) + " .unread", "2")
    assert text(page, contact("friend:%d" % friend.uin) + " .unread") == ""
    page.click(contact("friend:%d" % other.uin))
    wait_until(lambda: [b[1] for b in bubbles(page)] == ["to the other conversation", "and again"])
    assert text(page, contact("friend:%d" % other.uin) + " .unread") == ""

    # our own send from another API client shows up live, with its status
    http(console.url + "/openqq/send_friend_message?id=%d&content=%s" % (other.uin, "from%20a%20script"))
    wait_until(lambda: bubbles(page)[-1] == ["out", "from a script", "sent · code 0 · 发送成功"])

    # a send that fails shows the code and status the API answered
    sim.configure(send_retcode=103)
    page.click("#text")
    page.keyboard.type("this one fails")
    page.keyboard.press("Enter")
    failed = console.recorder.wait("send_message", where=lambda m: m.content == "this one fails")[0]
    wait_until(lambda: bubbles(page)[-1][2].startswith("failed"))
    assert bubbles(page)[-1] == ["out", "this one fails", "failed · code %d · %s (%s)" % (failed.code, failed.msg,
                                                                                       failed.info)]
    assert [b[1] for b in bubbles(page)].count("this one fails") == 1
    assert page.errors == []


@pytest.mark.slow
def test_a_group_a_temporary_session_and_a_stream_cut_by_the_server_that_misses_nothing(sim, console, browser):
    log_in(sim, console)
    group = sim.world.groups[0]
    member = [m for m in group.members if m.uin != sim.world.user.uin][0]
    page = browser.page(console.url + "/console/?access_token=" + TOKEN)
    wait_text(page, "#link", "live")
    page.click(contact("group:%d" % group.gid))
    wait_text(page, "#kind", "group")
    sim.inject_group_message(group.gid, member.uin, "before the cut")
    wait_until(lambda: [b[1] for b in bubbles(page)] == ["before the cut"])
    sender = [m for m in console.contacts.group(group.gid).members if m.id == member.uin][0]
    assert page.locator("#log .who").all_inner_texts() == [sender.displayname]

    server = console.server.servers[0]

    def streams():
        return [entry.sock for entry in list(server.parker.parked.values()) if entry.stream is not None]
    assert wait_until(lambda: len(streams()) == 1)
    for sock in streams():                                    # the server side cuts the connection
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    for n in range(3):
        sim.inject_group_message(group.gid, member.uin, "during the cut %d" % n)
    wait_text(page, "#link", "reconnecting…")
    wait_text(page, "#link", "live")
    wait_until(lambda: len(bubbles(page)) == 4)
    sim.inject_group_message(group.gid, member.uin, "after the cut")
    wait_until(lambda: len(bubbles(page)) == 5)
    assert [b[1] for b in bubbles(page)] == ["before the cut", "during the cut 0", "during the cut 1",
                                             "during the cut 2", "after the cut"]

    # a member writes privately: a temporary session, answered from its own view
    sim.inject_sess_message("group", group.gid, member.uin, "just between us")
    session = "sess:group:%d:%d" % (group.gid, member.uin)
    wait_text(page, contact(session) + " .unread", "1")
    assert text(page, contact(session) + " .name") == "%s (%s)" % (sender.displayname,
                                                                  console.contacts.group(group.gid).displayname)
    page.click(contact(session))
    wait_text(page, "#kind", "temporary session")
    wait_until(lambda: bubbles(page) == [["in", "just between us", ""]])
    page.click("#text")
    page.keyboard.type("a private answer")
    page.keyboard.press("Enter")
    assert wait_until(lambda: [s for s in sim.sent if s["text"] == "a private answer"
                               and s["endpoint"] == "send_sess_msg2"])
    wait_until(lambda: bubbles(page)[-1] == ["out", "a private answer", "sent · code 0 · 发送成功"])
    assert page.errors == []


@pytest.mark.slow
def test_the_page_at_a_phones_width_with_the_filter(sim, console, browser):
    log_in(sim, console)
    friends = console.contacts.friends()
    page = browser.page(console.url + "/console/?access_token=" + TOKEN, width=390, height=760)
    wait_text(page, "#link", "live")
    assert page.locator("#side").is_visible() and page.locator("#chat").is_hidden()
    page.click("#filter")
    page.keyboard.type(str(friends[1].uid))
    wait_until(lambda: page.locator(".contact").count() == 1)
    assert page.locator(".contact").inner_text().strip() == friends[1].displayname
    page.locator(".contact").click()
    wait_until(lambda: page.locator("#chat").is_visible() and page.locator("#side").is_hidden())
    assert page.evaluate("document.documentElement.scrollWidth") <= 390          # nothing wider than the phone
    page.click("#text")
    page.keyboard.type("from a phone")
    page.click("#send")
    assert wait_until(lambda: [s for s in sim.sent if s["text"] == "from a phone"])
    page.click("#back")
    wait_until(lambda: page.locator("#side").is_visible() and page.locator("#chat").is_hidden())
    assert page.errors == []


@pytest.mark.slow
def test_the_page_with_the_onebot_upstream(tmp_path, browser):
    sim = OneBotSimulator("spec", WORLD, access_token=ONEBOT_TOKEN, secret=SECRET).start()
    sim.set_online(False)
    client = webqq.Client(upstream="onebot", tmpdir=str(tmp_path), send_interval=0, qrcode_display="none",
                          upstream_options=dict(url=sim.url, access_token=ONEBOT_TOKEN, secret=SECRET,
                                                listen="127.0.0.1:0", send_rate=0, status_interval=0.2))
    try:
        server = client.load("openqq", listen=[{"host": "127.0.0.1", "port": 0}])
        client.load("console")
        client.start()
        sim.post_url = client.upstream.receiver.url
        page = browser.page(server.urls[0] + "/console/")
        wait_text(page, "#next", re.compile("^Waiting for the OneBot implementation"))
        assert page.locator("#qr").is_hidden()
        sim.set_online(True)
        assert client.wait_for_state("running", timeout=10)
        wait_text(page, "#link", "live")
        page.click(contact("friend:%d" % ALICE))
        wait_text(page, "#title", "阿丽")
        page.click("#text")
        page.keyboard.type("hello alice")
        page.keyboard.press("Enter")
        assert wait_until(lambda: [s for s in sim.sent if s["user_id"] == ALICE])
        wait_until(lambda: bubbles(page) and bubbles(page)[-1][2] == "sent · code 0 · 发送成功")
        sim.post_private_message(ALICE, "hi from alice")
        wait_until(lambda: bubbles(page)[-1][:2] == ["in", "hi from alice"])
        sim.post_private_message(BOB, "bob writes")
        wait_text(page, contact("friend:%d" % BOB) + " .unread", "1")
        assert page.errors == []
    finally:
        client.stop()
        sim.stop()
