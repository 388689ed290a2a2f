"""Security checks, end to end: protected mode, the token on every route, a constant-time compare,
cross-site refusal (DNS rebinding included), private files, and no secret in any log line.

On files: the client creates a missing tmpdir with mode 0700 and writes the cookie, QR and state
files 0600 through a fresh temporary file and a rename, so a file or symlink planted under one of
those names is replaced, never written through. A tmpdir others may write to is used as given
(scripts read these paths), with a warning; a cookie or pid file there that belongs to another
user is ignored, and a file that cannot be replaced (another user's, in a sticky folder) is logged
and skipped rather than stopping the login.
"""
import ast
import glob
import hmac
import http.client
import logging
import os
import stat
import time
from urllib.parse import quote

import pytest
import requests

import webqq
from conftest import ROOT, LogLines, Recorder, admin_group
from webqq_plugins import openqq
from smartqq_sim import Simulator

TOKEN = "s3cret-Token_0123456789abcdef"
WORLD = {"friends": 4, "groups": 2, "members": 5, "discusses": 1, "seed": 9}
CLIENT = dict(qr_check_interval=0.05, send_interval=0, qrcode_display="none", http_timeout=5, poll_timeout=5)
OPENQQ = dict(listen=[{"host": "127.0.0.1", "port": 0}], check_event_timeout=0.3, stop_delay=0.3)
AUTH_FAILURE = {"code": -6, "status": "auth failure"}
CROSS_SITE = {"code": -6, "status": "cross-site request refused"}


class Env(object):
    """A simulator and a running client serving Openqq (and the console) on 127.0.0.1."""

    def __init__(self, tmpdir, level="info", **options):
        self.sim = Simulator(world=WORLD, poll_hold=0.5, auto_scan=0.1).start()
        self.client = webqq.Client(smartqq_base=self.sim.url, tmpdir=tmpdir, log_level=level, **CLIENT)
        self.recorder = Recorder(self.client)
        self.plugin = self.client.load("openqq", **dict(OPENQQ, **options))
        self.console = self.client.load("console")
        self.url = self.plugin.urls[0]
        self.host = self.url.split("//")[1]

    def start(self):
        self.client.start()
        assert self.client.wait_for_state("running", timeout=20)
        return self

    def close(self):
        self.client.stop()
        self.sim.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(str(tmp_path_factory.mktemp("security")), access_token=TOKEN).start()
    yield e
    e.close()


###############################################################################
# Protected mode
###############################################################################


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "10.1.2.3"])
def test_protected_mode_refuses_an_open_api_beyond_loopback(host, tmp_path, caplog):
    client = webqq.Client(tmpdir=str(tmp_path), qrcode_display="none")
    with caplog.at_level(logging.ERROR, logger="webqq"):
        assert client.load("openqq", listen=[{"host": host, "port": 0}]) is None
    assert "protected mode" in caplog.text and client.plugins == []


def test_protected_mode_lets_a_guarded_or_loopback_api_start():
    def entries(*hosts):
        return [{"host": h, "port": 5000} for h in hosts]
    for hosts in (("127.0.0.1",), ("localhost",), ("::1",), ("127.9.8.7", "[::1]")):
        openqq.check_protected(entries(*hosts), None, None, False)
    openqq.check_protected(entries("0.0.0.0", "::"), TOKEN, None, False)
    openqq.check_protected(entries("0.0.0.0"), None, lambda params, req: True, False)
    openqq.check_protected(entries("0.0.0.0"), None, None, True)
    with pytest.raises(ValueError, match="protected mode"):
        openqq.check_protected(entries("127.0.0.1", "0.0.0.0"), None, None, False)


###############################################################################
# The token
###############################################################################

ROUTE_PATHS = sorted(openqq.Api.ROUTES) + ["/console", "/console/", "/console/status", "/console/qrcode.png",
                                            "/", "/nope", "/openqq/nope"]
WRONG_TOKENS = ["", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), TOKEN[::-1], "x" * len(TOKEN), TOKEN + "\x00",
                "s3cret", TOKEN.replace("-", "%2D")]


def call(env, method, path, params=None, headers=None, data=None, json_body=None):
    """The answer, read whole; a stream (/openqq/events) only as far as its head."""
    r = requests.request(method, env.url + path, params=params, headers=headers, data=data, json=json_body,
                         timeout=10, allow_redirects=False, stream=True)
    if not r.headers.get("Content-Type", "").startswith("text/event-stream"):
        r.content           # read before the connection closes
    r.close()
    return r


@pytest.mark.slow
def test_every_route_refuses_a_request_without_the_right_token(env):
    before = len(env.sim.sent)
    for path in ROUTE_PATHS:
        for method in ("GET", "POST", "HEAD", "OPTIONS", "PUT"):
            r = call(env, method, path, params={"id": env.sim.world.friends[0].uin, "content": "x"})
            assert r.status_code == 403, (method, path)
            if method != "HEAD":
                assert r.json() == AUTH_FAILURE, (method, path)
            assert "Access-Control-Allow-Origin" not in r.headers
        for method in ("GET", "POST"):
            for wrong in WRONG_TOKENS:
                for how in ({"params": {"access_token": wrong}},
                            {"headers": {"Authorization": "Bearer " + wrong}},
                            {"data": {"access_token": wrong}}):
                    r = call(env, method, path, **how)
                    assert r.status_code == 403, (method, path, wrong, how)
    # a repeated access_token never passes, whatever its values; nor does a JSON one that is not text
    assert call(env, "GET", "/openqq/get_user_info?access_token=x&access_token=" + TOKEN).status_code == 403
    assert call(env, "GET", "/openqq/get_user_info?access_token=%s&access_token=%s" % (TOKEN, TOKEN)).status_code == 403
    for value in (["x"], {"a": 1}, "\ud800", 12, True):
        r = call(env, "POST", "/openqq/get_client_info", json_body={"access_token": value})
        assert r.status_code in (400, 403), value
    assert len(env.sim.sent) == before


def test_stop_client_relogin_and_check_event_do_nothing_without_the_token(env, monkeypatch):
    monkeypatch.setitem(env.plugin.opts, "check_event_timeout", 5)
    for path in ("/openqq/stop_client", "/openqq/relogin", "/openqq/check_event"):
        started = time.time()
        r = call(env, "GET", path, params={"access_token": "wrong"})
        assert (r.status_code, r.json()) == (403, AUTH_FAILURE)
        assert time.time() - started < 2                      # check_event refused at once, not long-polled 5 s
    time.sleep(3 * env.plugin.opts["stop_delay"])
    assert env.client.state == "running" and not env.client.stopping
    assert env.recorder.named("relogin") == []


def test_the_right_token_opens_every_route_each_way_it_may_come(env):
    friend = env.sim.world.friends[0]
    ways = [{"params": {"access_token": TOKEN}}, {"headers": {"Authorization": "Bearer " + TOKEN}},
            {"headers": {"Authorization": "token " + TOKEN}}, {"data": {"access_token": TOKEN}, "method": "POST"},
            {"json_body": {"access_token": TOKEN}, "method": "POST"}]
    for way in ways:
        way = dict(way)
        r = call(env, way.pop("method", "GET"), "/openqq/get_client_info", **way)
        assert r.status_code == 200 and r.json()["pid"] == os.getpid(), way
    r = call(env, "GET", "/openqq/get_user_info?%61ccess_token=" + TOKEN)     # a name is percent-decoded too
    assert r.status_code == 200
    for path in ROUTE_PATHS:
        if path in ("/openqq/stop_client", "/openqq/relogin"):
            continue
        r = call(env, "GET", path, params={"access_token": TOKEN, "id": friend.uin, "content": "with token",
                                           "async": 1})
        assert r.status_code != 403 or r.json()["code"] == -8, path          # -8: api not found
        r = call(env, "OPTIONS", path, headers={"Authorization": "Bearer " + TOKEN})
        assert r.status_code == 200, path
    # the console keeps the token it was given, for the page to use, and nobody else's
    r = call(env, "GET", "/console", params={"access_token": TOKEN})
    assert (r.status_code, r.headers["Location"]) == (302, "/console/?access_token=" + TOKEN)


def test_the_token_is_compared_in_constant_time(env, monkeypatch):
    calls, compare = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return compare(a, b)
    monkeypatch.setattr(openqq.hmac, "compare_digest", spy)
    for given in WRONG_TOKENS[1:] + [TOKEN]:
        call(env, "GET", "/openqq/get_client_info", headers={"Authorization": "Bearer " + given})
    assert calls == [(given.encode("utf-8").strip(), TOKEN.encode("utf-8")) for given in WRONG_TOKENS[1:] + [TOKEN]]


def token_comparisons(path):
    """Places in a source file where something named like a token is compared with == != in or not in."""
    names = ("token", "given", "secret")
    found = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if not isinstance(node, ast.Compare) or not any(
                isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
            continue
        for operand in [node.left] + node.comparators:
            for sub in ast.walk(operand):
                ident = sub.id if isinstance(sub, ast.Name) else sub.attr if isinstance(sub, ast.Attribute) else ""
                if any(n in ident.lower() for n in names) and not ident.isupper():      # not a constant
                    found.append("%s:%d" % (os.path.relpath(path, ROOT), node.lineno))
    return found


def test_no_token_is_compared_but_with_compare_digest():
    files = [os.path.join(ROOT, "webqq.py")] + glob.glob(os.path.join(ROOT, "plugins", "*.py"))
    assert [place for path in files for place in token_comparisons(path)] == []
    source = open(os.path.join(ROOT, "webqq.py"), encoding="utf-8").read()     # the Guard
    assert "hmac.compare_digest(" in source


###############################################################################
# Cross-site requests
###############################################################################


def test_cross_site_requests_are_refused_even_with_the_token(env):
    friend = env.sim.world.friends[0]
    before = len(env.sim.sent)
    evil = [{"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://127.0.0.1:1"},
            {"Origin": "https://" + env.host}, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
            {"Sec-Fetch-Site": "cross-site", "Referer": "http://evil.example/page"}]
    for headers in evil:
        for method, path in (("GET", "/openqq/get_friend_info"), ("POST", "/openqq/send_friend_message"),
                             ("OPTIONS", "/openqq/send_friend_message"), ("GET", "/console/status")):
            r = call(env, method, path, headers=dict(headers, Authorization="Bearer " + TOKEN),
                     data={"id": friend.uin, "content": "csrf"} if method == "POST" else None)
            assert (r.status_code, r.json()) == (403, CROSS_SITE), (headers, path)
            assert "Access-Control-Allow-Origin" not in r.headers
    assert len(env.sim.sent) == before
    for headers in ({"Origin": "http://" + env.host}, {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}):
        r = call(env, "GET", "/openqq/get_user_info", headers=dict(headers, Authorization="Bearer " + TOKEN))
        assert r.status_code == 200, headers


def test_an_allowed_origin_gets_in_with_cors_headers(tmp_path):
    e = Env(str(tmp_path), access_token=TOKEN, allow_origin=["https://ok.example"]).start()
    try:
        r = call(e, "OPTIONS", "/openqq/get_user_info", headers={"Origin": "https://ok.example"},
                 params={"access_token": TOKEN})
        assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "https://ok.example"
        r = call(e, "GET", "/openqq/get_user_info", headers={"Origin": "https://ok.example"},
                 params={"access_token": TOKEN})
        assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "https://ok.example"
        r = call(e, "GET", "/openqq/get_user_info", headers={"Origin": "https://ok.example.evil"},
                 params={"access_token": TOKEN})
        assert r.status_code == 403
    finally:
        e.close()


def test_dns_rebinding_is_refused_when_there_is_no_token(tmp_path):
    """A page of http://evil.example:5000 whose name now resolves to 127.0.0.1 is same-origin to the
    browser: no Origin on its GETs. Without a token only the Host header tells it from a local script."""
    e = Env(str(tmp_path), allow_origin=["http://webqq.lan:8000"]).start()
    port = e.host.split(":")[1]
    browsers = [{"Sec-Fetch-Site": "same-origin"}, {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/60.0"}]
    try:
        for browser in browsers:
            for host in ("evil.example:" + port, "evil.example", "127.0.0.1.evil.example:" + port,
                         "localhost.evil:" + port, "webqq.lan:" + port):
                r = call(e, "GET", "/openqq/get_friend_info", headers=dict(browser, Host=host))
                assert (r.status_code, r.json()) == (403, CROSS_SITE), host
            for host in ("127.0.0.1:" + port, "localhost:" + port, "[::1]:" + port, "127.0.0.1",
                         "app.localhost:" + port, "webqq.lan:8000"):
                r = call(e, "GET", "/openqq/get_friend_info", headers=dict(browser, Host=host))
                assert r.status_code == 200, host
        # a script names any host it likes: no browser, no page of somebody else's behind it
        assert call(e, "GET", "/openqq/get_friend_info", headers={"Host": "evil.example"}).status_code == 200
    finally:
        e.close()


###############################################################################
# Files
###############################################################################


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask():
    old = os.umask(0)
    yield
    os.umask(old)


def test_files_are_private_in_a_private_tmpdir(tmp_path, open_umask):
    tmpdir = str(tmp_path / "new" / "webqq")
    sim = Simulator(world=WORLD, poll_hold=0.5).start()
    client = webqq.Client(smartqq_base=sim.url, tmpdir=tmpdir, **CLIENT)
    try:
        assert mode(tmpdir) == 0o700
        client.start()
        assert client.wait_for_state("scaning", timeout=10)
        assert mode(client.qrcode_path) == 0o600 and mode(client.state_path) == 0o600
        sim.scan()
        sim.confirm()
        assert client.wait_for_state("running", timeout=10)
        assert mode(client.cookie_path) == 0o600 and mode(client.state_path) == 0o600
        assert mode(client.pid_path) == 0o644           # other processes (a controller) read it
        assert not os.path.exists(client.qrcode_path)
        assert not [name for name in os.listdir(tmpdir) if name.startswith(".tmp-")]
    finally:
        client.stop()
        sim.stop()


def test_a_tmpdir_others_may_write_to_is_used_with_a_warning(tmp_path, open_umask, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(str(shared), 0o777)
    planted = shared / "mojo_webqq_qrcode_default.png"
    os.symlink(str(tmp_path / "victim"), str(planted))         # a planted symlink is replaced, never followed
    sim = Simulator(world=WORLD, poll_hold=0.5, auto_scan=0.1).start()
    with caplog.at_level(logging.WARNING, logger="webqq"):
        client = webqq.Client(smartqq_base=sim.url, tmpdir=str(shared), **CLIENT)
    try:
        assert "writable by other users" in caplog.text
        client.start()
        assert client.wait_for_state("running", timeout=10)
        assert not os.path.exists(str(tmp_path / "victim"))
        assert mode(client.cookie_path) == 0o600 and mode(client.state_path) == 0o600
    finally:
        client.stop()
        sim.stop()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to plant another user's file")
def test_a_cookie_file_another_user_planted_is_not_trusted(tmp_path, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(str(shared), 0o1777)
    sim = Simulator(world=WORLD, poll_hold=0.5, auto_scan=0.1).start()
    first = webqq.Client(smartqq_base=sim.url, tmpdir=str(shared), **CLIENT)
    first.start()
    assert first.wait_for_state("running", timeout=10)
    first.stop()
    os.chown(first.cookie_path, 65534, 65534)                   # a session someone else left for us to drive
    shows = sum(1 for r in sim.requests if r["path"] == "/ptqrshow")
    with caplog.at_level(logging.WARNING, logger="webqq"):
        second = webqq.Client(smartqq_base=sim.url, tmpdir=str(shared), **CLIENT)
        second.start()
        try:
            assert second.wait_for_state("running", timeout=10)
            assert sum(1 for r in sim.requests if r["path"] == "/ptqrshow") == shows + 1     # scanned, not resumed
        finally:
            second.stop()
            sim.stop()
    assert "belongs to another user" in caplog.text


###############################################################################
# Logs
###############################################################################


@pytest.mark.slow
def test_no_token_or_cookie_value_reaches_the_log_at_any_level(tmp_path, make_receiver):
    receiver, lines = make_receiver(), LogLines(formatter=webqq.LogFormatter())
    log = logging.getLogger("webqq")
    level = log.level
    secrets = {TOKEN, "post-Secret-42", "post-Token-4242", "poll-Token-4343"}
    e = Env(str(tmp_path), level="debug", access_token=TOKEN, post_secret="post-Secret-42",
            post_api=receiver.base + "/post?token=post-Token-4242",
            poll_api=receiver.base + "/poll?access_token=poll-Token-4343", poll_interval=0.2,
            post_event_list="login,stop,state_change,input_qrcode,relogin,new_group_member,lose_group_member")
    log.setLevel(logging.DEBUG)
    try:
        e.start()
        client, sim = e.client, e.sim

        def remember():
            secrets.update(c.value for c in client.upstream.http.jar)
            secrets.update((sim.session.psessionid, sim.session.vfwebqq, sim.session.ptwebqq, sim.session.skey))
            secrets.update(r["query"].get("ptsigx") for r in sim.requests if r["path"] == "/check_sig")
        remember()
        group = admin_group(client)
        client.ensure_members(group)
        member = [m for m in group.members if m.role == "member"][0]
        friend = sim.world.friends[0]
        asks = [("get_user_info", {"access_token": TOKEN}),
                ("send_friend_message", {"access_token": TOKEN, "id": friend.uin, "content": "hi"}),
                ("send_sess_message", {"access_token": TOKEN, "group_id": group.id, "id": member.id, "content": "hi"}),
                ("shutup_group_member", {"access_token": TOKEN, "group_id": group.id, "member_id": member.id,
                                         "time": 2}),
                ("search_friend", {"%61ccess_token": TOKEN, "id": friend.uin}),
                ("search_friend", {"access%5Ftoken": TOKEN, "id": friend.uin}),
                ("search_friend", {"ACCESS_TOKEN": TOKEN, "id": friend.uin}),
                ("get_client_info", {"access_token": TOKEN, "datatype": "jsonp", "callback": "cb"}),
                ("get_user_info", {"access_token": TOKEN[:-1] + "!"})]
        conn = http.client.HTTPConnection(e.host, timeout=20)        # sends the target as written
        for route, params in asks:
            query = "&".join("%s=%s" % (k, quote(str(v))) for k, v in params.items())
            conn.request("GET", "/openqq/" + route + "?" + query)
            assert conn.getresponse().read()
        conn.close()
        requests.post(e.url + "/openqq/get_user_info", json={"access_token": TOKEN}, timeout=10)
        requests.get(e.url + "/openqq/get_user_info", headers={"Authorization": "Bearer " + TOKEN}, timeout=10)
        sim.inject_friend_message(friend.uin, "report me")
        e.recorder.wait("receive_message")
        assert requests.get(e.url + "/openqq/kick_group_member", params={"access_token": TOKEN, "group_id": group.id,
                                                                         "member_id": member.id}, timeout=10).ok
        assert requests.get(e.url + "/openqq/relogin", params={"access_token": TOKEN}, timeout=10).ok
        e.recorder.wait("relogin", timeout=20)
        assert client.wait_for_state("running", timeout=20)
        remember()
        time.sleep(0.5)
    finally:
        e.close()
        lines.close()
        log.setLevel(level)
    secrets = {s for s in secrets if s and len(str(s)) >= 6}
    assert len(secrets) > 20 and len(lines.lines) > 80
    assert any("\u767b\u5f55\u6210\u529f" in line for line in lines.lines)      # 登录成功: the log is the real one
    leaks = [(secret, line) for line in lines.lines for secret in secrets if str(secret) in line]
    assert leaks == [], leaks[:5]
