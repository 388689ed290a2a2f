"""The fault matrix and the post_api outage, end to end over real sockets.

Every fault the simulator can inject (spec retcodes, HTTP 500/502/503/504, an answer slower than the
client's timeout, a dropped connection, a body that is not JSON or is cut short) at every endpoint the
client uses: the client must end `running` again by itself (or stop with a clear fatal message where
the original does), the Openqq API must answer throughout, no thread may outlive its client, and every
send must be delivered or reported failed with the original's code.

The scenarios run concurrently (one simulator and one client each), so each one's threads are told
apart by a Scope: a thread started inside a scenario belongs to it, and so does every log record
it writes.

    WEBQQ_OUTAGE=30 python -m pytest tests/test_faults.py -k outage     # the issue's 30 s outage
"""
import collections
import http.client
import json
import logging
import os
import re
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import webqq
from conftest import LogLines, Recorder, wait_until
from smartqq_sim import Simulator

WORLD = {"friends": 4, "groups": 2, "members": 5, "discusses": 1, "seed": 7}
WORKERS = 12            # scenarios at once; most of their time is spent waiting
HTTP_TIMEOUT = 2.0      # the client's timeout for upstream calls ...
DELAY = 30.0            # ... which a delayed answer outlasts (the simulator cuts it short when it stops)
POLL_HOLD = 0.3         # the simulator holds an idle poll2 this long ...
POLL_TIMEOUT = 3.0      # ... and the client waits this long for one
CLIENT = dict(qr_check_interval=0.05, send_interval=0, qrcode_display="none", http_timeout=HTTP_TIMEOUT,
              poll_timeout=POLL_TIMEOUT, update_interval=600, log_level="info")
REFRESH = 1.0           # update_interval where only the periodic refresh brings contacts back
OPENQQ = dict(check_event_timeout=0.5, stop_delay=0.2, request_timeout=5)
API_TIMEOUT = 5.0       # every API request must be answered within this
SEND_TIMEOUT = 30.0     # a synchronous send answers once its final status is known

###############################################################################
# 1. Scenarios
###############################################################################

# phase: "login" (faults set before start), "running" (set once running) or "send" (an API send under
# the fault); faults: [(path, fault kwargs)], or the name of a Simulator method to call; expect:
# {"fatal": text}, or what must hold once the client has recovered (relogins, relinks, the send's answer).
Scenario = collections.namedtuple("Scenario", "id phase faults expect")

# Faults every JSON endpoint gets. A count of 3 outlasts the client's 3 attempts at one call.
HTTP_FAULTS = [
    ("http500", dict(status=500, count=3)),
    ("http502", dict(status=502, count=3)),
    ("http503", dict(status=503, count=3)),
    ("http504", dict(status=504, count=3)),
    ("delay", dict(delay=DELAY)),
    ("drop", dict(drop=True, count=3)),
    ("nonjson", dict(body="<html><body><h1>Bad Gateway</h1></body></html>")),
    ("truncated", dict(body='{"retcode":0,"result":{"vfwebqq":"8f2a')),
]
# Retcodes of spec section 4 / 11 for an expired session and for Tencent's outages.
SESSION_CODES = (103, 100001, 100012)
OUTAGE_CODES = (100003, 100100)
# ptqrlogin answers (spec 3.4): ptuiCB(code, '0', url, '0', message, nick).
PTUI = "ptuiCB('%s','0','','0','%s', '');\r\n"

LOGIN_ENDPOINTS = {                      # spec section 3: path -> retcodes it lists
    "ptqrshow": (),
    "ptqrlogin": (),
    "check_sig": (),
    "getvfwebqq": SESSION_CODES + OUTAGE_CODES,          # 3.6: retcode != 0 is a login failure
    "login2": SESSION_CODES + OUTAGE_CODES,              # 3.7
    "get_online_buddies2": SESSION_CODES + OUTAGE_CODES,  # 3.8 / 4.4
}
CONTACT_ENDPOINTS = {                    # spec section 4
    "get_self_info2": SESSION_CODES + OUTAGE_CODES,
    "get_user_friends2": SESSION_CODES + OUTAGE_CODES + (50,),
    "get_group_name_list_mask2": SESSION_CODES + OUTAGE_CODES + (50,),
    "get_group_info_ext2": SESSION_CODES + (6,),
    "get_discus_list": SESSION_CODES + OUTAGE_CODES,
    "get_discu_info": SESSION_CODES + OUTAGE_CODES,
}
QUN_ENDPOINTS = ("/cgi-bin/qun_mgr/get_friend_list", "/cgi-bin/qun_mgr/get_group_list",
                 "/cgi-bin/qun_info/get_group_members")
QUN_CODES = (1, 3, 4, 11)                # section 9's "ec"; the simulator's meanings: bkn, denied, bad, unknown

POLL_IGNORED = (0, 102, 109, 110, 1202, 100012, 100003, 100100)   # spec 5.3: poll again
POLL_PROBED = (100, 103, 100000, 100001)                          # probe; the session still answers
POLL_RELINKED = (120, 121)
POLL_COUNTED = (100006, 99999)                                    # unknown: counted, relogin after 3

SEND_ENDPOINTS = ("send_buddy_msg2", "send_qun_msg2", "send_discu_msg2", "send_sess_msg2")
SEND_OK = (0, "发送正常", 1)


def send_faults(endpoint):
    """(name, fault, (code, info, deliveries)) for one send endpoint (spec section 8)."""
    attempts = 1 if endpoint == "send_discu_msg2" else 3     # a discuss -3 is not retried
    return [
        ("retcode100100", dict(retcode=100100), (0, "忽略返回值: 100100", 0)),
        ("retcode1202", dict(retcode=1202), (0, "忽略返回值: 1202", 0)),
        ("retcode100012", dict(retcode=100012, count=3), (-5, "未识别返回值:100012", 0)),
        ("retcode103", dict(retcode=103, count=3), (-5, "未识别返回值:103", 0)),
        ("errmsg_error", dict(body='{"errCode":1,"errMsg":"ERROR"}', count=attempts), (-3, "发送异常", 0)),
        ("errcode_unknown", dict(body='{"errCode":7,"msg":"busy"}', count=3),
         (-4, '响应未知: {"errCode":7,"msg":"busy"}', 0)),
        ("http500", dict(status=500), SEND_OK),
        ("http502", dict(status=502), SEND_OK),
        ("http503", dict(status=503), SEND_OK),
        ("http504", dict(status=504), SEND_OK),
        ("http502x3", dict(status=502, count=3), (-1, "数据格式错误", 0)),
        # a send that got no answer in time may have gone out: it is reported, never sent twice
        ("delay", dict(delay=DELAY), (-1, "发送超时，消息可能已发出 (no answer in time; it may have been sent)", 0)),
        ("drop", dict(drop=True), SEND_OK),
        ("nonjson", dict(body="<html><body>busy</body></html>"), SEND_OK),
        ("truncated", dict(body='{"errCode":0,"ms'), SEND_OK),
    ]


def build_matrix():
    """Every scenario, in a stable order."""
    out = [Scenario("baseline", "login", [], {})]
    for path, codes in LOGIN_ENDPOINTS.items():
        faults = list(HTTP_FAULTS)
        if path == "ptqrshow":
            faults[-2:] = [("nonpng", dict(body="<html>no QR</html>")),
                           ("truncated", dict(body=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHD"))]
        elif path in ("ptqrlogin", "check_sig"):
            faults[-2:] = [("garbage", dict(body="<html>error</html>")), ("truncated", dict(body="ptuiCB('6"))]
        faults += [("retcode%d" % code, dict(retcode=code)) for code in codes]
        out += [Scenario("login-%s-%s" % (path, name), "login", [(path, fault)], {}) for name, fault in faults]
    out += [
        Scenario("login-ptqrlogin-66", "login", [("ptqrlogin", dict(body=PTUI % (66, "二维码未失效。")))], {}),
        Scenario("login-ptqrlogin-67", "login", [("ptqrlogin", dict(body=PTUI % (67, "二维码认证中。")))], {}),
        Scenario("login-ptqrlogin-65", "login", [("ptqrlogin", dict(body=PTUI % (65, "二维码已失效。")))], {}),
        Scenario("login-ptqrlogin-65x10", "login",
                 [("ptqrlogin", dict(body=PTUI % (65, "二维码已失效。"), count=10))],
                 {"fatal": "二维码已失效10次"}),
        Scenario("login-ptqrlogin-68", "login", [("ptqrlogin", dict(body=PTUI % (68, "本次登录已被拒绝。")))],
                 {"fatal": "本次登录已被拒绝"}),
        Scenario("login-ptqrlogin-10006", "login",
                 [("ptqrlogin", dict(body=PTUI % (10006, "二维码校验失败，请刷新后重试。")))],
                 {"fatal": "二维码校验失败"}),
    ]
    for path, codes in CONTACT_ENDPOINTS.items():
        faults = HTTP_FAULTS + [("retcode%d" % code, dict(retcode=code)) for code in codes]
        out += [Scenario("contacts-%s-%s" % (path, name), "login", [(path, fault)], {}) for name, fault in faults]
    for path in QUN_ENDPOINTS:
        faults = HTTP_FAULTS + [("ec%d" % code, dict(body='{"ec":%d}' % code)) for code in QUN_CODES]
        out += [Scenario("contacts-%s-%s" % (path.rsplit("/", 1)[1], name), "login", [(path, fault)], {})
                for name, fault in faults]
    both = [("get_user_friends2", dict(retcode=100003)), ("get_group_name_list_mask2", dict(retcode=100003))]
    out += [Scenario("contacts-friends-and-groups-at-login", "login", both, {}),
            Scenario("contacts-friends-and-groups-at-refresh", "running", both, {"relogins": 1})]

    for code in POLL_IGNORED + POLL_PROBED + POLL_COUNTED:
        out.append(Scenario("poll-retcode%d" % code, "running", [("poll2", dict(retcode=code))], {"relogins": 0}))
    for code in POLL_RELINKED:
        out.append(Scenario("poll-retcode%d" % code, "running", [("poll2", dict(retcode=code))],
                            {"relogins": 0, "relinks": 1}))
    out += [
        Scenario("poll-retcode116", "running", [("poll2", dict(retcode=116, extra={"p": "e" * 64}))],
                 {"relogins": 0, "ptwebqq": "e" * 64}),
        Scenario("poll-retcode99999x4", "running", [("poll2", dict(retcode=99999, count=4))], {"relogins": 1}),
        Scenario("poll-http500x4", "running", [("poll2", dict(status=500, count=4))], {"relogins": 1}),
        Scenario("poll-drop", "running", [("poll2", dict(drop=True, count=2))], {"relogins": 0}),
        Scenario("poll-delay", "running", [("poll2", dict(delay=DELAY))], {"relogins": 0}),
        Scenario("poll-nonjson", "running", [("poll2", dict(body="<html>busy</html>"))], {"relogins": 0}),
        Scenario("poll-truncated", "running", [("poll2", dict(body='{"retcode":0,"result":[{"poll_type":"mes'))],
                 {"relogins": 0}),
        Scenario("poll-kick", "running", "kick", {"fatal": "您的帐号在另一地点登录"}),
        Scenario("poll-expired-session", "running", "expire_session", {"relogins": 1}),
    ]
    for status in (500, 502, 503, 504):
        out.append(Scenario("poll-http%d" % status, "running", [("poll2", dict(status=status, count=3))],
                            {"relogins": 0}))

    for endpoint in SEND_ENDPOINTS:
        for name, fault, answer in send_faults(endpoint):
            out.append(Scenario("send-%s-%s" % (endpoint, name), "send", [(endpoint, fault)], {"send": answer}))
    sig = "get_c2cmsg_sig2"
    out += [
        Scenario("send-sig-retcode103", "send", [(sig, dict(retcode=103))], {"send": SEND_OK, "target": "sess"}),
        Scenario("send-sig-http502", "send", [(sig, dict(status=502))], {"send": SEND_OK, "target": "sess"}),
        Scenario("send-sig-empty", "send", [(sig, dict(body='{"retcode":0,"result":{"value":""}}'))],
                 {"send": SEND_OK, "target": "sess"}),
        Scenario("send-errmsg-five-times-relogins", "send",
                 [("send_buddy_msg2", dict(body='{"errCode":1,"errMsg":"ERROR"}', count=5))],
                 {"send": (-3, "发送异常", 0), "then": SEND_OK, "relogins": 1}),
        Scenario("send-queued-over-expired-session", "send", [("send_buddy_msg2", dict(delay=1.0))],
                 {"queued": 3, "relogins": 1}),
    ]
    return out


MATRIX = build_matrix()
TARGETS = {"send_buddy_msg2": "friend", "send_qun_msg2": "group", "send_discu_msg2": "discuss",
           "send_sess_msg2": "sess"}

###############################################################################
# 2. Scopes: which scenario a thread and a log record belong to
###############################################################################


class Scope(object):
    """One scenario's threads (with the threads they start) and the log records they write."""

    local = threading.local()

    def __init__(self, name):
        self.name = name
        self.threads = []
        self.records = []

    @classmethod
    def current(cls):
        return getattr(cls.local, "scope", None)

    def leaked(self, grace=3.0):
        """Names of this scope's threads still alive after grace seconds."""
        deadline = time.time() + grace
        for t in self.threads:
            t.join(max(0.0, deadline - time.time()))
        return sorted(t.name for t in self.threads if t.is_alive())

    def errors(self):
        """The records at ERROR and above, and every record carrying a traceback."""
        return [r for r in self.records if r.levelno >= logging.ERROR or r.exc_info]


def scoped_start(original):
    """Thread.start that makes a new thread part of its starter's scope."""
    def start(thread):
        scope = Scope.current()
        if scope is not None:
            scope.threads.append(thread)
            run = thread.run

            def run_in_scope():
                Scope.local.scope = scope
                run()
            thread.run = run_in_scope
        original(thread)
    return start


class ScopeLog(logging.Handler):
    """Hands each record of the webqq logger to the scope of the thread that wrote it."""

    def emit(self, record):
        scope = Scope.current()
        if scope is not None:
            scope.records.append(record)


###############################################################################
# 3. One scenario
###############################################################################


class Prober(object):
    """Calls the Openqq API every 100 ms the whole time (and long-polls check_event), recording every
    answer: each must come within API_TIMEOUT (the socket's) and be normal, or 503 -7 while not running."""

    def __init__(self, base, client):
        self.address, self.client = base.split("//")[1], client
        self.stopped = threading.Event()
        self.answers = collections.Counter()
        self.answered = threading.Event()      # the first answer came
        self.problems = []
        self.threads = [threading.Thread(target=self.run, args=(route,), name="test-prober-" + route)
                        for route in ("get_user_info", "check_event")]

    def start(self):
        for t in self.threads:
            t.start()

    def run(self, route):
        conn = http.client.HTTPConnection(self.address, timeout=API_TIMEOUT)
        while not self.stopped.wait(0.1):
            stopping = self.client.stopping
            try:
                conn.request("GET", "/openqq/" + route)
                r = conn.getresponse()
                body = r.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                if not (stopping or self.client.stopping):
                    self.problems.append("%s: no answer (%s) in state %s" % (route, e.__class__.__name__,
                                                                                self.client.state))
                continue
            self.check(route, r, body)
            self.answered.set()
        conn.close()

    def check(self, route, r, raw):
        try:
            body = json.loads(raw.decode("utf-8"))
        except ValueError:
            body = None
        if r.status == 200 and (isinstance(body, list) if route == "check_event" else "id" in (body or {})):
            self.answers["ok"] += 1
        elif (r.status == 503 and isinstance(body, dict) and body.get("code") == -7
              and body.get("status") == "client not running" and body.get("state") != "running"
              and r.getheader("Retry-After")):
            self.answers["not running"] += 1
        else:
            self.problems.append("%s: HTTP %s %r" % (route, r.status, raw[:200]))

    def stop(self):
        self.stopped.set()
        for t in self.threads:
            t.join()


class Harness(object):
    """A simulator, a client with the Openqq plugin aimed at it, and a prober of the API."""

    def __init__(self, scenario, scope):
        self.scenario, self.scope = scenario, scope
        self.sim = Simulator(world=WORLD, poll_hold=POLL_HOLD, auto_scan=0.1)
        self.sim.start()
        self.tmpdir = tempfile.mkdtemp(prefix="webqq-fault-")
        options = dict(CLIENT, update_interval=REFRESH if scenario.id.startswith("contacts-") else 600)
        self.client = webqq.Client(smartqq_base=self.sim.url, tmpdir=self.tmpdir, **options)
        self.recorder = Recorder(self.client)
        self.plugin = self.client.load("openqq", listen=[{"host": "127.0.0.1", "port": 0}], **OPENQQ)
        self.base = self.plugin.urls[0]
        self.prober = Prober(self.base, self.client)
        self.session = requests.Session()

    def close(self):
        self.prober.stop()
        self.session.close()
        self.client.stop()
        self.sim.stop()
        for name in os.listdir(self.tmpdir):
            os.unlink(os.path.join(self.tmpdir, name))
        os.rmdir(self.tmpdir)

    def inject(self, faults):
        if isinstance(faults, str):
            getattr(self.sim, faults)(*(("您的帐号在另一地点登录",) if faults == "kick" else ()))
            return
        for path, fault in faults:
            self.sim.fault(path, **fault)

    def api(self, route, timeout=API_TIMEOUT, **params):
        r = self.session.get(self.base + "/openqq/" + route, params=params, timeout=timeout)
        assert r.headers["Content-Type"].startswith("application/json"), r.text
        return r.json()

    def relogins(self):
        return len(self.recorder.named("relogin"))

    # -- what a recovered client does ----------------------------------------------------------

    def receives(self, kind, tag):
        """A message of kind injected at the simulator reaches receive_message, its sender resolved."""
        world, text = self.sim.world, "%s-%s" % (kind, tag)
        if kind == "friend":
            self.sim.inject_friend_message(world.friends[0].uin, text)
        elif kind == "group":
            group = world.groups[0]
            member = world.others(group)[0]
            self.sim.inject_group_message(group.gid, member.uin, text)
        else:
            discuss = world.discusses[0]
            member = world.others(discuss)[0]
            self.sim.inject_discuss_message(discuss.did, member.uin, text)
        msg = self.recorder.wait("receive_message", where=lambda m: m.content == text, timeout=20)[0]
        assert not msg.sender.placeholder, "%s message from an unresolved sender" % kind

    def send(self, target, text, timeout=SEND_TIMEOUT, **extra):
        """A send through the API to a friend, group, discuss or group member (sess): its answer."""
        world = self.sim.world
        if target == "friend":
            params = dict(route="send_friend_message", id=world.friends[0].uin)
        elif target == "group":
            params = dict(route="send_group_message", id=world.groups[0].gid)
        elif target == "discuss":
            params = dict(route="send_discuss_message", id=world.discusses[0].did)
        else:
            group = world.groups[0]
            member = world.others(group)[0]
            params = dict(route="send_sess_message", group_id=group.gid, id=member.uin)
        params.update(extra, content=text)
        return self.api(params.pop("route"), timeout=timeout, **params)

    def deliveries(self, text):
        return sum(1 for s in self.sim.sent if s["text"] == text and s["delivered"])

    def complete(self):
        """What is still missing from the client's contacts compared with the world ("" when nothing)."""
        c, world = self.client.contacts, self.sim.world
        if c.user.name != world.user.nick:
            return "user info"
        friends = c.friends()
        if sorted(f.id for f in friends) != sorted(f.uin for f in world.friends) or any(f.uid is None for f in friends):
            return "friends"
        for wg in world.groups:
            g = c.group(wg.gid)
            if g is None or g.uid is None or not g.members_loaded or len(g.members) != len(wg.members):
                return "group %s" % wg.gid
            if any(m.uid is None for m in g.members):
                return "member numbers of group %s" % wg.gid
        for wd in world.discusses:
            d = c.discuss(wd.did)
            if d is None or len(d.members) != len(wd.members):
                return "discuss %s" % wd.did
        return ""


def drive(h):
    """Run h's scenario to its end; AssertionError when the client did not behave."""
    sc, client, sim = h.scenario, h.client, h.sim
    h.prober.start()
    assert h.prober.answered.wait(10), "the API did not answer before the client started"
    if sc.phase == "login":
        h.inject(sc.faults)
    client.start()
    if sc.phase == "login" and "fatal" in sc.expect:
        return expect_fatal(h)
    assert client.wait_for_state("running", timeout=40), "not running but %s" % client.state
    if sc.phase == "running":
        h.inject(sc.faults)
        if "fatal" in sc.expect:
            return expect_fatal(h)
    elif sc.phase == "send":
        drive_send(h)
    h.receives("friend", sc.id)
    if "relogins" in sc.expect:
        assert wait_until(lambda: h.relogins() >= sc.expect["relogins"], 20)
    assert client.wait_for_state("running", timeout=40), "not running but %s" % client.state
    h.receives("group", sc.id)
    h.receives("discuss", sc.id)
    answer = h.send("friend", "alive-" + sc.id)
    assert (answer["code"], answer["status"]) == (0, "发送成功"), answer
    assert h.deliveries("alive-" + sc.id) == 1
    if "ptwebqq" in sc.expect:
        assert client.upstream.ptwebqq == sc.expect["ptwebqq"]
    assert sim.relinks == sc.expect.get("relinks", 0)
    assert h.relogins() == sc.expect.get("relogins", 0)
    assert wait_until(lambda: not h.complete(), 15), "contacts never complete again: %s" % h.complete()
    assert client.state == "running"


def drive_send(h):
    """An API send under the scenario's fault: the answer and the deliveries it expects."""
    sc = h.scenario
    if "queued" in sc.expect:
        return drive_queued_sends(h)
    endpoint = sc.faults[0][0]
    target = sc.expect.get("target", TARGETS.get(endpoint))
    h.inject(sc.faults)
    code, info, delivered = sc.expect["send"]
    text = "under-fault-" + sc.id
    answer = h.send(target, text)
    assert answer == {"code": code, "id": answer["id"], "info": info,
                      "status": "发送成功" if code == 0 else "发送失败"}, answer
    assert isinstance(answer["id"], int)
    assert h.deliveries(text) == delivered
    if "then" in sc.expect:          # the next send works (after the relogin the failures caused)
        answer = h.send(target, text + "-then")
        assert (answer["code"], answer["info"]) == sc.expect["then"][:2], answer
        assert h.deliveries(text + "-then") == 1


def drive_queued_sends(h):
    """Sends queued while the session dies (the first held up at the simulator meanwhile): each is
    delivered once, or reported failed with a session code; none is lost."""
    texts = ["queued-%d-%s" % (i, h.scenario.id) for i in range(h.scenario.expect["queued"])]
    finals = {}
    h.client.on("send_message", lambda msg: finals.__setitem__(msg.content, (msg.code, msg.info)))
    h.inject(h.scenario.faults)
    for text in texts:
        assert h.send("friend", text, **{"async": 1}) == {"code": 0, "status": "request already in execution"}
    h.sim.expire_session()
    assert wait_until(lambda: all(t in finals for t in texts), SEND_TIMEOUT), finals
    for text in texts:
        code, info = finals[text]
        if code == 0:
            assert h.deliveries(text) == 1, text
        else:
            assert (code, h.deliveries(text)) == (-5, 0) and re.match(r"未识别返回值:(103|100012)$", info), info


def expect_fatal(h):
    assert h.client.join(40), "still %s" % h.client.state
    assert h.client.exit_status == 1 and h.client.state == "stop"
    text = h.scenario.expect["fatal"]
    fatal = [r for r in h.scope.records if r.levelno >= logging.ERROR and text in r.getMessage()]
    assert fatal, "no fatal message with %r" % text
    assert not os.path.exists(h.client.qrcode_path)


class Outcome(object):
    """What running one scenario showed."""

    def __init__(self, scenario):
        self.scenario = scenario
        self.failure = None
        self.leaked = []
        self.tracebacks = []
        self.errors = []
        self.prober = None
        self.seconds = 0.0


def expected_seconds(scenario):
    """A sort key putting the slow scenarios first, so that they don't finish the run alone."""
    slow = "delay" in scenario.id or "drop" in scenario.id or scenario.id.startswith("login-")
    return -(2 if slow else 1)


def run_scenario(scenario):
    """Run one scenario in a scope of its own: its Outcome."""
    outcome, scope = Outcome(scenario), Scope(scenario.id)
    started = time.time()
    Scope.local.scope = scope
    try:
        h = Harness(scenario, scope)
        try:
            drive(h)
        finally:
            h.close()
        outcome.prober = h.prober
    except Exception:
        outcome.failure = traceback.format_exc()
    finally:
        Scope.local.scope = None
    outcome.leaked = scope.leaked()
    outcome.tracebacks = [logging.Formatter().format(r) for r in scope.records if r.exc_info]
    outcome.errors = [r.getMessage() for r in scope.errors()]
    outcome.seconds = time.time() - started
    return outcome


###############################################################################
# 4. The tests
###############################################################################


@pytest.fixture(scope="module")
def matrix(request):
    """Run the selected scenarios WORKERS at a time: their Outcomes by id, and the names of the threads
    alive afterwards that were not before."""
    wanted = {item.callspec.id for item in request.session.items
              if getattr(item, "originalname", None) == "test_fault_matrix"}
    scenarios = [sc for sc in MATRIX if sc.id in wanted]
    log = logging.getLogger("webqq")
    handler, level = ScopeLog(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    before = set(threading.enumerate())
    started = time.time()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(threading.Thread, "start", scoped_start(threading.Thread.start))
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="test-matrix") as pool:
            outcomes = {o.scenario.id: o for o in pool.map(run_scenario, sorted(scenarios, key=expected_seconds))}
    log.removeHandler(handler)
    log.setLevel(level)
    def left_behind():
        return sorted(t.name for t in threading.enumerate() if t not in before)
    wait_until(lambda: not left_behind(), 5)
    left = left_behind()
    slowest = sorted(outcomes.values(), key=lambda o: -o.seconds)[:5]
    print("\nfault matrix: %d scenarios in %.1f s; slowest: %s" % (
        len(outcomes), time.time() - started, ", ".join("%s %.1fs" % (o.scenario.id, o.seconds) for o in slowest)))
    return collections.namedtuple("Matrix", "outcomes left")(outcomes, left)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", MATRIX, ids=[sc.id for sc in MATRIX])
def test_fault_matrix(matrix, scenario):
    outcome = matrix.outcomes[scenario.id]
    if outcome.failure is not None:
        pytest.fail(outcome.failure, pytrace=False)
    assert outcome.leaked == [], "threads outlived the client: %s" % outcome.leaked
    assert outcome.tracebacks == [], "\n".join(outcome.tracebacks)
    if "fatal" not in scenario.expect:
        assert outcome.errors == [], outcome.errors
    assert outcome.prober.problems == [], outcome.prober.problems[:10]
    if "fatal" in scenario.expect and scenario.phase == "login":   # it may stop before check_event answers
        assert outcome.prober.answers["ok"] + outcome.prober.answers["not running"] > 0
    else:
        assert outcome.prober.answers["ok"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_matrix_leaves_no_thread_behind(matrix):
    assert matrix.left == []


###############################################################################
# 5. The post_api outage
###############################################################################

OUTAGE = float(os.environ.get("WEBQQ_OUTAGE", "5"))     # seconds the receiver is down (the issue: 30)
MESSAGES = 1000
OUTAGE_WORLD = {"friends": 4, "groups": 3, "members": 5, "discusses": 1, "seed": 5}
DROPPED = re.compile(r"^post_api queue full \(\d+\): dropped report receive_message (\d+)$")


def outage_messages(receiver):
    """(conversation, number, id) of each message report, in arrival order."""
    found = receiver.reports(lambda r: str(r.get("content", "")).startswith("outage "))
    return [tuple(r["content"].split()[1:3]) + (r["id"],) for r in found]


@pytest.fixture
def outage(tmp_path, make_receiver):
    """(make, receiver, warnings) for a post_api outage; make(**openqq options) starts (sim, client)."""
    receiver, warnings, parts = make_receiver(), LogLines(logging.WARNING), {}

    def make(**options):
        sim = parts["sim"] = Simulator(world=OUTAGE_WORLD, poll_hold=POLL_HOLD, auto_scan=0.1).start()
        client = parts["client"] = webqq.Client(smartqq_base=sim.url, tmpdir=str(tmp_path), **CLIENT)
        client.recorder = Recorder(client)
        client.load("openqq", listen=[{"host": "127.0.0.1", "port": 0}], post_api=receiver.url, post_timeout=2,
                    post_retries=6, post_retry_backoff=OUTAGE / 25, **dict(OPENQQ, **options))
        client.start()
        assert client.wait_for_state("running", timeout=20)
        # the login's last report: none of them may be left queued when the outage begins
        receiver.wait(lambda r: r.get("event") == "state_change" and r["params"][1:] == ["running"])
        return sim, client

    yield make, receiver, warnings
    warnings.close()
    if "client" in parts:
        parts["client"].stop()
        parts["sim"].stop()


def pour(sim, client):
    """MESSAGES messages over 8 conversations, round robin: {conversation: count}; waits until received."""
    world = sim.world
    senders = [("friend", f.uin, None) for f in world.friends]
    senders += [("group", g.gid, world.others(g)[0].uin) for g in world.groups]
    senders += [("discuss", d.did, world.others(d)[0].uin) for d in world.discusses]
    counts = collections.Counter()
    for n in range(MESSAGES):
        kind, target, member = senders[n % len(senders)]
        conversation = "%s-%s" % (kind, target)
        text = "outage %s %d" % (conversation, counts[conversation])
        counts[conversation] += 1
        if kind == "friend":
            sim.inject_friend_message(target, text)
        elif kind == "group":
            sim.inject_group_message(target, member, text)
        else:
            sim.inject_discuss_message(target, member, text)
    assert wait_until(lambda: len([m for m in client.recorder.named("receive_message")
                                   if m[0].content.startswith("outage ")]) == MESSAGES, 30)
    return counts


def in_order(messages):
    """True when each conversation's numbers arrive ascending."""
    last = {}
    for conversation, number, _ in messages:
        if int(number) <= last.get(conversation, -1):
            return False
        last[conversation] = int(number)
    return True


@pytest.mark.slow
@pytest.mark.timeout(120 + 3 * OUTAGE)
def test_post_api_outage_delivers_every_report_once_in_order(outage):
    make, receiver, warnings = outage
    sim, client = make(post_queue_size=MESSAGES + 100)
    plugin = client.plugin("openqq")
    receiver.close()
    back = time.time() + OUTAGE
    counts = pour(sim, client)
    assert time.time() < back, "the messages took longer to arrive than the outage lasts"
    time.sleep(back - time.time())
    assert plugin.reporter.counters()["sent"] < MESSAGES
    receiver.start()
    assert wait_until(lambda: len(outage_messages(receiver)) >= MESSAGES
                      and plugin.reporter.counters()["queued"] == 0, 60 + OUTAGE)
    messages = outage_messages(receiver)
    assert len(messages) == MESSAGES and len({m[2] for m in messages}) == MESSAGES      # each exactly once
    assert collections.Counter(m[0] for m in messages) == counts
    assert in_order(messages)
    counters = plugin.reporter.counters()
    print("\npost_api outage of %g s: %d reports arrived once each, in order; counters %s" % (
        OUTAGE, len(messages), counters))
    assert (counters["dropped"], counters["failed"]) == (0, 0) and counters["retried"] > 0
    info = requests.get(plugin.urls[0] + "/openqq/get_client_info", timeout=API_TIMEOUT).json()
    assert (info["post_api_dropped"], info["post_api_failed"], info["post_api_queued"]) == (0, 0, 0)
    said = [line for line in warnings.lines if "post_api" in line]      # once when it began, not per attempt
    assert len(said) == 1 and receiver.url in said[0] and "ConnectionError (" in said[0] and "retried in" in said[0]


@pytest.mark.slow
@pytest.mark.timeout(120 + 3 * OUTAGE)
def test_post_api_outage_beyond_the_queue_bound_counts_and_names_each_drop(outage):
    make, receiver, warnings = outage
    sim, client = make(post_queue_size=100)
    plugin = client.plugin("openqq")
    receiver.close()
    back = time.time() + OUTAGE
    pour(sim, client)
    time.sleep(max(0.0, back - time.time()))
    receiver.start()

    def named():
        return [int(DROPPED.match(line).group(1)) for line in warnings.lines if DROPPED.match(line)]
    assert wait_until(lambda: len(outage_messages(receiver)) + len(named()) >= MESSAGES, 60 + OUTAGE)
    time.sleep(0.5)
    messages, named = outage_messages(receiver), named()
    arrived = {m[2] for m in messages}
    counters = plugin.reporter.counters()
    print("\npost_api outage of %g s, queue of 100: %d arrived, %d dropped and named; counters %s" % (
        OUTAGE, len(messages), len(named), counters))
    assert len(messages) == len(arrived) and in_order(messages)
    assert counters["failed"] == 0
    assert counters["dropped"] == len(named) == MESSAGES - len(messages) > 0
    sent_ids = {m[0].id for m in client.recorder.named("receive_message") if m[0].content.startswith("outage ")}
    assert set(named) | arrived == sent_ids and not set(named) & arrived
