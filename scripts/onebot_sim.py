#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""onebot_sim: a OneBot v11 implementation on one loopback port, for tests and demos.

It serves the HTTP API (``/<action>`` by GET query, form or JSON body, ``Authorization:
Bearer`` or ``?access_token=``) over an in-memory account, and POSTs events to a receiver
(``X-Self-ID``, ``X-Signature: sha1=<HMAC-SHA1 of the body>``), the way the live
implementations do, quirks included (docs/onebot.md, "the simulator", lists them).

Command line
------------
    python scripts/onebot_sim.py [--profile spec|gocq|napcat|llonebot] [--host 127.0.0.1]
        [--port 3000] [--token T] [--secret S] [--post-url URL] [--heartbeat SECONDS]
        [--world FILE] [--verbose]
    python scripts/onebot_sim.py [--host 127.0.0.1] [--port 3000] --say TEXT --from USER_ID [--group GROUP_ID]

The second form asks the simulator running on that port to post a message (a friend's, or a
group member's with --group) to webqq, prints the event and exits.

Python API (names are a contract; tests of the bridge use them)
---------------------------------------------------------------
    sim = OneBotSimulator(profile="spec", world=None, host="127.0.0.1", port=0,
                          access_token=None, secret=None, post_url=None, **knobs)
    sim.start(); sim.url; sim.stop()              # also a context manager
    sim.post_url = "http://127.0.0.1:8080/"       # where events go (settable any time)
    sim.world                                     # the World (below)
    sim.post_private_message(user_id, message, sub_type="friend", message_id=None, **fields) -> event
    sim.post_group_message(group_id, user_id, message, sub_type="normal", message_id=None, **fields) -> event
    sim.post_notice(notice_type, **fields) -> event
    sim.post_event(event) -> event                # any event; time and self_id are filled in
    sim.heartbeat() -> event                      # meta_event heartbeat with the get_status answer
    sim.set_online(online)                        # get_status.online; napcat also posts bot_offline
    sim.join_group(group_id, user_id, nickname=None, sub_type="approve", operator_id=None) -> event
    sim.leave_group(group_id, user_id, sub_type="leave", operator_id=None) -> event
    sim.add_friend(user_id, nickname, remark="") / sim.remove_friend(user_id)   # no event
    sim.remove_member(group_id, user_id)          # silently, no event (a stale cache elsewhere)
    sim.update_member(group_id, user_id, **fields) / sim.update_group(group_id, **fields)
    sim.add_group(group_id, group_name, members=())   # the world only (members: dicts as in World)
    sim.remove_group(group_id)                    # the world only: post the notice yourself
    sim.fault(action, count=1, retcode=None, message=None, http_status=None, delay=None)
    sim.post_fault(count=1)                       # the next posts' answers are lost (a timeout)
    sim.configure(**knobs); sim.knobs
    sim.calls     [{"action", "params", "method", "http_status", "retcode", "time"}]
    sim.sent      [{"action", "message_type" (private|group), "user_id", "group_id", "temp",
                    "segments", "raw" (CQ text), "message_id", "auto_escape", "time"}]
    sim.posts     [{"event", "status" (final HTTP status or None), "attempts"}]
    sim.files_read                                # file:// paths a sent image made us read

A ``message`` given to post_* is CQ-code text (``"[CQ:face,id=14]hi"``) or a list of
segments; it is posted in the profile's format (``post_format`` knob). Posts made by the
test's own calls are synchronous; notices caused by actions (a kick, a ban, a self
message) are posted from the ``onebot-sim-poster`` thread, in order.

HTTP control API on the same port (no token): ``GET /sim/state|calls|sent|posts|world``;
``POST /sim/<method>`` with a JSON object of keyword arguments for the methods above that post
events or change the world (post_private_message, post_group_message, post_notice, post_event,
heartbeat, set_online, join_group, leave_group, add_friend, remove_friend, remove_member,
update_member, update_group, remove_group, fault, post_fault, configure); answers
``{"ok": true, "result": ...}`` or HTTP 400 ``{"ok": false, "error": ...}``.

Profiles
--------
    spec      unknown action: HTTP 404, empty body; token missing 401, wrong 403; failures
              retcode 100; ``_async``/``_rate_limited`` answer status "async"; other
              Content-Types 406; events in string (CQ) format; no temp sessions
    gocq      unknown action (and ``_rate_limited``): HTTP 200 retcode 404 msg API_NOT_FOUND;
              failures retcode 100 with msg/wording; ``_async`` stripped and run synchronously;
              message ids are hashed signed int32 (here always negative); string format;
              event posts retried on timeout (``post_retries`` 3, ``post_retry_interval``
              1.5 s); temp sessions only with ``allow_temp_session``; ban >= 30 days refused
    napcat    unknown action: HTTP 200 retcode 200 "不支持的Api ..."; validation retcode 400;
              failures retcode 200; every answer has message, wording, stream and a random
              echo; token problems 403 {"message": "token verify failed!"}; any body read as
              JSON; array format; a temp-session send whose user it cannot resolve in that
              group goes to the group chat instead (docs/onebot.md, temporary sessions); going
              offline posts a bot_offline notice
    llonebot  unknown action: HTTP 404 with retcode 404; validation 400; failures retcode 200;
              token problems 403; any body read as JSON; array format

Knobs
-----
    post_format          "string" or "array" (default: the profile's)
    post_timeout=5.0     seconds per event post
    post_retries         re-posts after a transport error (gocq 3, others 0)
    post_retry_interval  seconds between them (gocq 1.5)
    report_self_message=False   post a message_sent event for every send
    notify_actions=True  post group_decrease / group_ban notices for kicks and bans we perform
    allow_temp_session=False    gocq: accept send_private_msg with group_id
    numeric_strings=False       post ids as strings ("10001"), as some bridges do
    unsupported=()       actions answered as unknown
    heartbeat_interval=None     seconds between automatic heartbeats (a thread)
    unlisted_groups=()   group ids get_group_list leaves out (a stale cache); get_group_info knows them

World schema (``OneBotSimulator(world=dict)``, ``--world FILE``)
-----------------------------------------------------------------
    {"self": {"user_id", "nickname", "sex", "age"},
     "friends": [{"user_id", "nickname", "remark", "sex", "age"}],
     "strangers": [{"user_id", "nickname", "sex", "age"}],
     "groups": [{"group_id", "group_name", "max_member_count",
                 "members": [{"user_id", "nickname", "card", "role": "owner"|"admin"|"member",
                              "sex", "age", "area", "level", "title", "join_time",
                              "last_sent_time"}]}]}
Missing fields get defaults; the self account is a member of every group (role member unless
listed). Instead of a world dict, ``{"friends": N, "groups": M, "members": K, "seed": S}``
generates one.
"""

import argparse
import collections
import copy
import hashlib
import hmac
import itertools
import json
import logging
import os
import random
import re
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qsl, urlsplit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from webqq import Http, TrackedHTTPServer, TransportError, json_dumps, to_int  # noqa: E402

log = logging.getLogger("webqq.onebot_sim")

###############################################################################
# 1. Constants
###############################################################################

KNOBS = {
    "post_format": None,
    "post_timeout": 5.0,
    "post_retries": None,
    "post_retry_interval": None,
    "report_self_message": False,
    "notify_actions": True,
    "allow_temp_session": False,
    "numeric_strings": False,
    "unsupported": (),
    "heartbeat_interval": None,
    "unlisted_groups": (),
}
# What POST /sim/<method> may call.
CONTROL_METHODS = ("post_private_message", "post_group_message", "post_notice", "post_event", "heartbeat",
                   "set_online", "join_group", "leave_group", "add_friend", "remove_friend", "remove_member",
                   "update_member", "update_group", "remove_group", "fault", "post_fault", "configure")
MAX_BAN = 30 * 24 * 3600          # go-cqhttp refuses bans this long or longer
ROLE_RANK = {"member": 0, "admin": 1, "owner": 2}

###############################################################################
# 2. Profiles
###############################################################################


class ActionError(Exception):
    """An action that fails: kind is "invalid" (bad parameters) or "error" (it could not be done)."""

    def __init__(self, kind, text):
        Exception.__init__(self, text)
        self.kind = kind


class Profile(object):
    """The OneBot spec's answers; subclasses are the implementations' deviations."""

    name = "spec"
    app_name = "onebot-sim"
    user_agent = "OneBot/11"
    post_format = "string"
    post_retries = 0
    post_retry_interval = 0.0
    json_any_body = False          # read any non-form body as JSON, whatever its Content-Type

    def ok(self, data):
        return 200, {"status": "ok", "retcode": 0, "data": data}

    def queued(self):
        return 200, {"status": "async", "retcode": 1, "data": None}

    def failed(self, error):
        return 200, {"status": "failed", "retcode": 100, "data": None}

    def unknown(self, action):
        return 404, None

    def refused(self, missing):
        return (401 if missing else 403), None

    def suffix(self, action):
        """(action to run, answer it as queued) for the _async / _rate_limited suffixes."""
        for tail in ("_async", "_rate_limited"):
            if action.endswith(tail):
                return action[:-len(tail)], True
        return action, False

    def message_ids(self):
        return itertools.count(1000 + secrets.randbelow(9000))


class GoCqhttp(Profile):
    """go-cqhttp: failures in the 200 envelope with msg/wording, hashed message ids, post retries."""

    name = "gocq"
    app_name = "go-cqhttp"
    user_agent = "CQHttp/4.15.0"
    post_retries = 3
    post_retry_interval = 1.5

    def failed(self, error):
        return 200, {"status": "failed", "retcode": 100, "msg": str(error), "wording": str(error), "data": None}

    def unknown(self, action):
        return 200, {"status": "failed", "retcode": 404, "msg": "API_NOT_FOUND", "wording": "API不存在",
                     "data": None}

    def suffix(self, action):
        if action.endswith("_async"):
            return action[:-len("_async")], False
        return action, False        # _rate_limited is not recognised: an unknown action

    def message_ids(self):
        return (-1 - (int(hashlib.md5(str(n).encode()).hexdigest(), 16) & 0x7FFFFFFE) for n in itertools.count())


class NapCat(Profile):
    """NapCatQQ: retcode 200 for unknown actions and failures, 400 for bad parameters, extra fields."""

    name = "napcat"
    app_name = "NapCat.Onebot"
    user_agent = "NapCat"
    post_format = "array"
    json_any_body = True

    def _envelope(self, status, retcode, data, text=""):
        return {"status": status, "retcode": retcode, "data": data, "message": text, "wording": text,
                "stream": "normal-action", "echo": secrets.token_hex(4)}

    def ok(self, data):
        return 200, self._envelope("ok", 0, data)

    def queued(self):
        return 200, self._envelope("async", 1, None)

    def failed(self, error):
        return 200, self._envelope("failed", 400 if error.kind == "invalid" else 200, None, str(error))

    def unknown(self, action):
        return 200, self._envelope("failed", 200, None, "不支持的Api %s" % action)

    def refused(self, missing):
        return 403, {"message": "token verify failed!"}

    def suffix(self, action):
        return Profile.suffix(self, action)[0], False


class LLOneBot(NapCat):
    """LLOneBot: HTTP 404 with retcode 404 for unknown actions, otherwise much like NapCat."""

    name = "llonebot"
    app_name = "LLOneBot"
    user_agent = "LLOneBot"

    def _envelope(self, status, retcode, data, text=""):
        return {"status": status, "retcode": retcode, "data": data, "message": text}

    def unknown(self, action):
        return 404, self._envelope("failed", 404, None, "不支持的api %s" % action)


PROFILES = {cls.name: cls for cls in (Profile, GoCqhttp, NapCat, LLOneBot)}

###############################################################################
# 3. Messages: CQ codes and segments
###############################################################################

CQ_CODE = re.compile(r"\[CQ:([^,\]]+)((?:,[^\]]*)?)\]")


def cq_escape(text, in_param=False):
    text = text.replace("&", "&amp;").replace("[", "&#91;").replace("]", "&#93;")
    return text.replace(",", "&#44;") if in_param else text


def cq_unescape(text):
    return text.replace("&#44;", ",").replace("&#91;", "[").replace("&#93;", "]").replace("&amp;", "&")


def parse_cq(text):
    """CQ-code text as a list of segments."""
    segments, pos = [], 0
    for m in CQ_CODE.finditer(text):
        if m.start() > pos:
            segments.append({"type": "text", "data": {"text": cq_unescape(text[pos:m.start()])}})
        data = {}
        for param in m.group(2).split(",")[1:]:
            key, _, value = param.partition("=")
            data[key] = cq_unescape(value)
        segments.append({"type": m.group(1), "data": data})
        pos = m.end()
    if pos < len(text):
        segments.append({"type": "text", "data": {"text": cq_unescape(text[pos:])}})
    return segments


def to_cq(segments):
    """Segments as CQ-code text."""
    parts = []
    for seg in segments:
        data = seg.get("data") or {}
        if seg.get("type") == "text":
            parts.append(cq_escape(str(data.get("text", ""))))
        else:
            parts.append("[CQ:%s%s]" % (seg.get("type"), "".join(
                ",%s=%s" % (k, cq_escape(str(v), True)) for k, v in data.items())))
    return "".join(parts)


def as_segments(message, auto_escape=False):
    """A sent or injected message (CQ text, a segment list or one segment) as segments."""
    if isinstance(message, str):
        return [{"type": "text", "data": {"text": message}}] if auto_escape else parse_cq(message)
    if isinstance(message, dict):
        message = [message]
    if not isinstance(message, list) or not all(isinstance(s, dict) and isinstance(s.get("type"), str)
                                                for s in message):
        raise ActionError("invalid", "message must be CQ text or a list of segments")
    return [{"type": s["type"], "data": {k: str(v) for k, v in (s.get("data") or {}).items()}}
            for s in message]


###############################################################################
# 4. World
###############################################################################


class World(object):
    """The account: self, friends, strangers, groups with members; plain dicts in OneBot's shapes."""

    def __init__(self, data=None):
        data = copy.deepcopy(data) if data is not None else self.demo()
        if "self" not in data:
            data = self.generate(**data)
        me = data["self"]
        self.self_id = int(me["user_id"])
        self.me = self._person(me)
        self.friends = collections.OrderedDict(
            (int(f["user_id"]), dict(self._person(f), remark=f.get("remark", ""))) for f in data.get("friends", ()))
        self.strangers = {int(p["user_id"]): self._person(p) for p in data.get("strangers", ())}
        self.groups = collections.OrderedDict()
        for g in data.get("groups", ()):
            self.add_group(g)

    @staticmethod
    def demo():
        return {"self": {"user_id": 10001, "nickname": "小灰"},
                "friends": [{"user_id": 20001, "nickname": "alice", "remark": "阿丽"},
                            {"user_id": 20002, "nickname": "bob"}],
                "groups": [{"group_id": 30001, "group_name": "PERL学习交流",
                            "members": [{"user_id": 10001, "role": "admin"}, {"user_id": 20001, "role": "owner"},
                                        {"user_id": 40001, "nickname": "carol", "card": "carol_card"}]}]}

    @staticmethod
    def generate(friends=20, groups=3, members=30, seed=None):
        rnd = random.Random(seed)
        numbers = iter(rnd.sample(range(100000, 999999999), friends + groups * (members + 1) + 1))
        me = next(numbers)
        people = [{"user_id": next(numbers), "nickname": "friend%d" % i, "remark": rnd.choice(("", "备注%d" % i))}
                  for i in range(friends)]
        data = {"self": {"user_id": me, "nickname": "me"}, "friends": people, "groups": []}
        for i in range(groups):
            mems = [{"user_id": me, "role": "admin" if i % 2 == 0 else "member"}]
            mems += [{"user_id": next(numbers), "nickname": "member%d_%d" % (i, j),
                      "role": "owner" if j == 0 else "member"} for j in range(members)]
            data["groups"].append({"group_id": next(numbers), "group_name": "group%d" % i, "members": mems})
        return data

    @staticmethod
    def _person(p):
        return {"user_id": int(p["user_id"]), "nickname": p.get("nickname", "qq%s" % p["user_id"]),
                "sex": p.get("sex", "unknown"), "age": int(p.get("age", 0))}

    def person(self, user_id):
        """Whoever has this QQ number (self, friend, stranger or group member), or None."""
        if user_id == self.self_id:
            return self.me
        found = self.friends.get(user_id) or self.strangers.get(user_id)
        if found is None:
            for group in self.groups.values():
                member = group["members"].get(user_id)
                if member is not None:
                    return {k: member[k] for k in ("user_id", "nickname", "sex", "age")}
        return found

    def add_group(self, g):
        """A group of the schema (group_id, group_name, max_member_count, members); self joins if missing."""
        gid = int(g["group_id"])
        group = {"group_id": gid, "group_name": g.get("group_name", "group %d" % gid),
                 "max_member_count": int(g.get("max_member_count", 200)), "members": collections.OrderedDict()}
        self.groups[gid] = group
        for m in g.get("members", ()):
            self.add_member(gid, **m)
        if self.self_id not in group["members"]:
            self.add_member(gid, user_id=self.self_id)

    def add_member(self, group_id, **fields):
        uid = int(fields["user_id"])
        known = self.person(uid) or {}
        now = int(time.time())
        member = {"group_id": group_id, "user_id": uid,
                  "nickname": fields.get("nickname", known.get("nickname", "qq%d" % uid)),
                  "card": fields.get("card", ""), "sex": fields.get("sex", known.get("sex", "unknown")),
                  "age": int(fields.get("age", known.get("age", 0))), "area": fields.get("area", ""),
                  "join_time": int(fields.get("join_time", now - 86400)),
                  "last_sent_time": int(fields.get("last_sent_time", now - 3600)),
                  "level": str(fields.get("level", "1")), "role": fields.get("role", "member"),
                  "unfriendly": False, "title": fields.get("title", ""), "title_expire_time": 0,
                  "card_changeable": False, "shut_up_timestamp": 0}
        self.groups[group_id]["members"][uid] = member
        return member

    def to_json(self):
        """The world in the schema of the module docstring (GET /sim/world)."""
        return {"self": self.me, "friends": list(self.friends.values()), "strangers": list(self.strangers.values()),
                "groups": [dict(self.group_info(g), members=list(g["members"].values())) for g in self.groups.values()]}

    def group_info(self, group):
        return {"group_id": group["group_id"], "group_name": group["group_name"],
                "member_count": len(group["members"]), "max_member_count": group["max_member_count"]}


###############################################################################
# 5. HTTP plumbing
###############################################################################


def typed(name, value):
    """A parameter given as text, read as OneBot reads it: numbers and booleans parsed (not messages)."""
    if not isinstance(value, str) or name == "message":
        return value
    if re.match(r"^-?\d+$", value):
        return int(value)
    return {"true": True, "false": False}.get(value, value)


class Handler(BaseHTTPRequestHandler):
    """One connection: hands each request to the simulator and writes its answer."""

    protocol_version = "HTTP/1.1"
    server_version = "onebot-sim"
    sys_version = ""
    disable_nagle_algorithm = True

    def do_GET(self):
        length = to_int(self.headers.get("Content-Length"), 0)
        body = self.rfile.read(length) if length > 0 else b""
        try:
            status, payload = self.server.sim.handle(self.command, self.path, self.headers, body)
        except Exception as exc:  # a simulator bug answers 500 instead of killing the connection
            log.exception("onebot_sim: %s %s failed", self.command, self.path)
            status, payload = 500, {"status": "failed", "retcode": 500, "message": str(exc)}
        data = b"" if payload is None else json_dumps(payload).encode("utf-8")
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_GET

    def log_message(self, fmt, *args):
        log.debug("onebot_sim %s", fmt % args)


class Server(TrackedHTTPServer):
    """The listening socket, with a thread per connection that stop() can end."""

    name = "onebot-sim"
    allow_reuse_address = True

    def __init__(self, address, sim):
        self.sim = sim
        TrackedHTTPServer.__init__(self, address, Handler)

    def handle_error(self, request, client_address):
        log.debug("onebot_sim: connection from %s failed", client_address, exc_info=True)


###############################################################################
# 6. Simulator
###############################################################################


class OneBotSimulator(object):
    """A OneBot v11 implementation: the HTTP API over a World, and event posts to a receiver."""

    def __init__(self, profile="spec", world=None, host="127.0.0.1", port=0, access_token=None,
                 secret=None, post_url=None, **knobs):
        if profile not in PROFILES:
            raise ValueError("unknown profile %r (one of %s)" % (profile, ", ".join(sorted(PROFILES))))
        self.profile = PROFILES[profile]()
        self.knobs = dict(KNOBS)
        self.configure(**knobs)
        self.world = world if isinstance(world, World) else World(world)
        self.host, self.port, self.url = host, port, None
        self.access_token, self.secret, self.post_url = access_token, secret, post_url
        self.online = True
        self.calls, self.sent, self.posts, self.files_read = [], [], [], []
        self._lock = threading.RLock()
        self._post_lock = threading.Lock()
        self._faults = {}
        self._post_faults = 0
        self._message_ids = self.profile.message_ids()
        self._outbox = collections.deque()
        self._outbox_cond = threading.Condition()
        self._stopping = threading.Event()
        self._http = Http(log=log, user_agent=self.profile.user_agent)
        self._server = None
        self._threads = []

    # -- lifecycle --

    def start(self):
        """Listen and serve (thread onebot-sim-<port>), start the poster; returns self."""
        self._server = Server((self.host, self.port), self).start()
        self.port = self._server.port
        self.url = "http://%s:%d" % (self.host, self.port)
        self._spawn("onebot-sim-poster", self._post_outbox)
        if self.knobs["heartbeat_interval"]:
            self._spawn("onebot-sim-heartbeat", self._beat)
        log.debug("onebot_sim (%s) serving on %s", self.profile.name, self.url)
        return self

    def stop(self):
        """Close the socket and connections, drop unposted notices, join every thread."""
        if self._server is None:
            return
        self._stopping.set()
        with self._outbox_cond:
            self._outbox.clear()
            self._outbox_cond.notify_all()
        self._http.abort()
        self._server.close()
        for thread in self._threads:
            thread.join(10)
        self._http.close()
        self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _spawn(self, name, target, *args):
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def configure(self, **knobs):
        unknown = set(knobs) - set(KNOBS)
        if unknown:
            raise TypeError("unknown knob(s): %s" % ", ".join(sorted(unknown)))
        self.knobs.update(knobs)

    def knob(self, name):
        """A knob's value, or the profile's default for it."""
        value = self.knobs.get(name)
        return getattr(self.profile, name) if value is None else value

    def fault(self, action, count=1, retcode=None, message=None, http_status=None, delay=None):
        """Make the next count calls of action fail (or answer late, with delay)."""
        with self._lock:
            self._faults[action] = {"count": count, "retcode": retcode, "message": message,
                                    "http_status": http_status, "delay": delay}

    def post_fault(self, count=1):
        """The answers to the next count event posts are lost, as if they timed out."""
        with self._lock:
            self._post_faults += count

    # -- the HTTP API --

    def handle(self, method, target, headers, body):
        """(HTTP status, JSON body or None) for one API request (or one of the control API under /sim/)."""
        url = urlsplit(target)
        if url.path.startswith("/sim/"):
            return self._control(method, url.path[len("/sim/"):], body)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        refusal = self._check_token(headers, query)
        if refusal is not None:
            return refusal
        try:
            params = self._params(query, headers.get("Content-Type") or "", body)
        except ValueError as e:
            status = getattr(e, "status", 400)
            return status, {"status": "failed", "retcode": 1400, "message": str(e)}
        action, queued = self.profile.suffix(url.path.strip("/"))
        handler = getattr(self, "act_" + action, None)
        if handler is None or action in self.knobs["unsupported"]:
            status, payload = self.profile.unknown(url.path.strip("/"))
            return self._record(url.path.strip("/"), params, method, status, payload)
        with self._lock:
            fault = self._faults.get(action)
            if fault is not None:
                fault["count"] -= 1
                if fault["count"] <= 0:
                    del self._faults[action]
        if fault is not None and fault["delay"]:
            time.sleep(fault["delay"])
        if fault is not None and (fault["retcode"] is not None or fault["http_status"] is not None):
            status, payload = fault["http_status"] or 200, {
                "status": "failed", "retcode": fault["retcode"] if fault["retcode"] is not None else 100,
                "message": fault["message"] or "", "data": None}
            return self._record(action, params, method, status, payload)
        try:
            with self._lock:
                data = handler(params)
            status, payload = self.profile.queued() if queued else self.profile.ok(data)
        except ActionError as e:
            status, payload = self.profile.failed(e)
        return self._record(action, params, method, status, payload)

    def state(self):
        """The profile, addresses and counters, as GET /sim/state answers."""
        with self._lock:
            return {"profile": self.profile.name, "url": self.url, "post_url": self.post_url,
                    "self_id": self.world.self_id, "online": self.online, "calls": len(self.calls),
                    "sent": len(self.sent), "posts": len(self.posts), "knobs": self.knobs}

    def _control(self, method, name, body):
        views = {"state": self.state, "calls": lambda: self.calls, "sent": lambda: self.sent,
                 "posts": lambda: self.posts, "world": self.world.to_json}
        if method == "GET" and name in views:
            with self._lock:
                return 200, views[name]()
        if method != "POST" or name not in CONTROL_METHODS:
            return 404, {"ok": False, "error": "no control %s /sim/%s" % (method, name)}
        try:
            kwargs = json.loads(body.decode("utf-8") or "{}")
            if not isinstance(kwargs, dict):
                raise ValueError("the body must be a JSON object of keyword arguments")
            result = getattr(self, name)(**kwargs)
        except (TypeError, ValueError, KeyError, ActionError) as exc:
            return 400, {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}
        return 200, {"ok": True, "result": result}

    def _check_token(self, headers, query):
        if not self.access_token:
            return None
        given = None
        auth = headers.get("Authorization") or ""
        if auth.startswith("Bearer "):
            given = auth[len("Bearer "):]
        if self.profile.name == "napcat" and "access_token" in query:    # NapCat prefers the query token
            given = query["access_token"]
        given = given if given is not None else query.get("access_token")
        if given is None:
            return self.profile.refused(missing=True)
        if not hmac.compare_digest(given.encode("utf-8"), self.access_token.encode("utf-8")):
            return self.profile.refused(missing=False)
        return None

    def _params(self, query, ctype, body):
        params = {k: typed(k, v) for k, v in query.items() if k != "access_token"}
        mime = ctype.split(";")[0].strip().lower()
        if not body:
            return params
        if mime == "application/x-www-form-urlencoded":
            params.update((k, typed(k, v)) for k, v in parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        elif mime == "application/json" or self.profile.json_any_body:
            try:
                data = json.loads(body.decode("utf-8"))
            except ValueError:
                raise ValueError("Invalid JSON")
            if not isinstance(data, dict):
                raise ValueError("Invalid JSON")
            params.update((k, typed(k, v)) for k, v in data.items())
        elif self.profile.name == "spec":
            error = ValueError("unsupported Content-Type %s" % mime)
            error.status = 406
            raise error
        return params

    def _record(self, action, params, method, status, payload):
        with self._lock:
            self.calls.append({"action": action, "params": params, "method": method, "http_status": status,
                               "retcode": (payload or {}).get("retcode"), "time": time.time()})
        return status, payload

    # -- actions --

    @staticmethod
    def _need(params, *names):
        values = []
        for name in names:
            value = params.get(name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ActionError("invalid", "%s must be a number" % name)
            values.append(value)
        return values

    def _group(self, group_id):
        group = self.world.groups.get(group_id)
        if group is None:
            raise ActionError("error", "群%s不存在" % group_id)
        return group

    def _member(self, group, user_id):
        member = group["members"].get(user_id)
        if member is None:
            raise ActionError("error", "群成员%s不存在" % user_id)
        return member

    def act_get_login_info(self, params):
        return {"user_id": self.world.self_id, "nickname": self.world.me["nickname"]}

    def act_get_status(self, params):
        return {"online": self.online, "good": self.online, "stat": {}}

    def act_get_version_info(self, params):
        return {"app_name": self.profile.app_name, "app_version": "1.0.0", "protocol_version": "v11"}

    def act_get_stranger_info(self, params):
        person = self.world.person(self._need(params, "user_id")[0])
        if person is None:
            raise ActionError("error", "用户不存在")
        return dict(person)

    def act_get_friend_list(self, params):
        return [{"user_id": f["user_id"], "nickname": f["nickname"], "remark": f["remark"]}
                for f in self.world.friends.values()]

    def act_get_group_list(self, params):
        return [self.world.group_info(g) for g in self.world.groups.values()
                if g["group_id"] not in self.knobs["unlisted_groups"]]

    def act_get_group_info(self, params):
        return self.world.group_info(self._group(self._need(params, "group_id")[0]))

    def act_get_group_member_list(self, params):
        return [dict(m) for m in self._group(self._need(params, "group_id")[0])["members"].values()]

    def act_get_group_member_info(self, params):
        group_id, user_id = self._need(params, "group_id", "user_id")
        return dict(self._member(self._group(group_id), user_id))

    def act_send_private_msg(self, params):
        user_id = self._need(params, "user_id")[0]
        group_id = params.get("group_id")
        if not self.online:
            raise ActionError("error", "账号已离线")
        if group_id is not None and user_id not in self.world.friends:
            return self._temp_send(user_id, group_id, params)
        if user_id not in self.world.friends:
            raise ActionError("error", "%s不是好友" % user_id)
        return self._deliver("send_private_msg", "private", params, user_id=user_id)

    def _temp_send(self, user_id, group_id, params):
        profile = self.profile.name
        if profile == "spec" or (profile == "gocq" and not self.knobs["allow_temp_session"]):
            raise ActionError("error", "temp session disabled" if profile == "gocq" else "%s不是好友" % user_id)
        group = self._group(group_id)
        if user_id not in group["members"]:
            if profile == "napcat":      # it cannot resolve the user, so it sends to the group chat
                return self._deliver("send_private_msg", "group", params, group_id=group_id)
            raise ActionError("error", "群成员%s不存在" % user_id)
        return self._deliver("send_private_msg", "private", params, user_id=user_id, group_id=group_id, temp=True)

    def act_send_group_msg(self, params):
        group_id = self._need(params, "group_id")[0]
        self._group(group_id)
        if not self.online:
            raise ActionError("error", "账号已离线")
        return self._deliver("send_group_msg", "group", params, group_id=group_id)

    def act_send_msg(self, params):
        kind = params.get("message_type") or ("group" if params.get("group_id") is not None else "private")
        return self.act_send_group_msg(params) if kind == "group" else self.act_send_private_msg(params)

    def _deliver(self, action, message_type, params, user_id=None, group_id=None, temp=False):
        if "message" not in params or params["message"] in ("", []):
            raise ActionError("invalid", "message is empty")
        auto_escape = params.get("auto_escape") in (True, 1, "true")
        segments = as_segments(params["message"], auto_escape)
        for seg in segments:
            path = seg["data"].get("file", "")
            if seg["type"] in ("image", "record", "video") and path.startswith("file://"):
                self.files_read.append(path[len("file://"):])
        message_id = next(self._message_ids)
        self.sent.append({"action": action, "message_type": message_type, "user_id": user_id,
                          "group_id": group_id, "temp": temp, "segments": segments, "raw": to_cq(segments),
                          "message_id": message_id, "auto_escape": auto_escape, "time": time.time()})
        if self.knobs["report_self_message"]:
            event = {"post_type": "message_sent", "message_type": message_type, "message_id": message_id,
                     "user_id": self.world.self_id, "sub_type": "normal" if group_id and not temp else "friend",
                     "sender": {"user_id": self.world.self_id, "nickname": self.world.me["nickname"]}}
            if message_type == "group":
                event["group_id"] = group_id
            else:
                event["target_id"] = user_id
            self._queue_post(self._with_message(event, segments))
        return {"message_id": message_id}

    def act_delete_msg(self, params):
        self._need(params, "message_id")
        return None

    def _moderate(self, params):
        group_id, user_id = self._need(params, "group_id", "user_id")
        group = self._group(group_id)
        me, target = self._member(group, self.world.self_id), self._member(group, user_id)
        if me["role"] == "member" or ROLE_RANK[target["role"]] >= ROLE_RANK[me["role"]]:
            raise ActionError("error", "权限不足")
        return group, target

    def act_set_group_ban(self, params):
        group, target = self._moderate(params)
        duration = params.get("duration", 1800)
        if not isinstance(duration, int) or duration < 0:
            raise ActionError("invalid", "duration must be a number of seconds")
        if self.profile.name == "gocq" and duration >= MAX_BAN:
            raise ActionError("error", "duration too long")
        target["shut_up_timestamp"] = int(time.time()) + duration if duration else 0
        if self.knobs["notify_actions"]:
            self._queue_post({"post_type": "notice", "notice_type": "group_ban",
                              "sub_type": "ban" if duration else "lift_ban", "group_id": group["group_id"],
                              "operator_id": self.world.self_id, "user_id": target["user_id"],
                              "duration": duration})
        return None

    def act_set_group_kick(self, params):
        group, target = self._moderate(params)
        del group["members"][target["user_id"]]
        if self.knobs["notify_actions"]:
            self._queue_post({"post_type": "notice", "notice_type": "group_decrease", "sub_type": "kick",
                              "group_id": group["group_id"], "operator_id": self.world.self_id,
                              "user_id": target["user_id"]})
        return None

    def act_set_group_whole_ban(self, params):
        self._group(self._need(params, "group_id")[0])
        return None

    def act_set_restart(self, params):
        return None

    # -- changing the world --

    def set_online(self, online):
        """The account goes on or off line (get_status.online); NapCat posts bot_offline."""
        self.online = bool(online)
        if not online and self.profile.name == "napcat":
            self.post_notice("bot_offline", user_id=self.world.self_id, tag="BotOfflineEvent",
                             message="账号已下线")

    def add_friend(self, user_id, nickname, remark=""):
        with self._lock:
            self.world.friends[int(user_id)] = {"user_id": int(user_id), "nickname": nickname, "sex": "unknown",
                                                "age": 0, "remark": remark}

    def remove_friend(self, user_id):
        with self._lock:
            self.world.friends.pop(int(user_id), None)

    def remove_member(self, group_id, user_id):
        with self._lock:
            self.world.groups[int(group_id)]["members"].pop(int(user_id), None)

    def update_member(self, group_id, user_id, **fields):
        with self._lock:
            self.world.groups[int(group_id)]["members"][int(user_id)].update(fields)

    def update_group(self, group_id, **fields):
        with self._lock:
            self.world.groups[int(group_id)].update(fields)

    def add_group(self, group_id, group_name, members=()):
        with self._lock:
            self.world.add_group({"group_id": group_id, "group_name": group_name, "members": members})

    def remove_group(self, group_id):
        with self._lock:
            self.world.groups.pop(int(group_id), None)

    def join_group(self, group_id, user_id, nickname=None, sub_type="approve", operator_id=None):
        """user_id joins the group (added to the world), and the group_increase notice is posted."""
        with self._lock:
            fields = {"user_id": user_id}
            if nickname is not None:
                fields["nickname"] = nickname
            self.world.add_member(int(group_id), **fields)
        return self.post_notice("group_increase", sub_type=sub_type, group_id=group_id, user_id=user_id,
                                operator_id=operator_id if operator_id is not None else user_id)

    def leave_group(self, group_id, user_id, sub_type="leave", operator_id=None):
        """user_id leaves (or is kicked from) the group, and the group_decrease notice is posted."""
        self.remove_member(group_id, user_id)
        return self.post_notice("group_decrease", sub_type=sub_type, group_id=group_id, user_id=user_id,
                                operator_id=operator_id if operator_id is not None else user_id)

    # -- events --

    def post_private_message(self, user_id, message, sub_type="friend", message_id=None, **fields):
        person = self.world.person(int(user_id)) or {"user_id": int(user_id), "nickname": "qq%s" % user_id}
        event = {"post_type": "message", "message_type": "private", "sub_type": sub_type,
                 "message_id": message_id if message_id is not None else next(self._message_ids),
                 "user_id": int(user_id), "font": 0,
                 "sender": {k: person.get(k) for k in ("user_id", "nickname", "sex", "age")}}
        event.update(fields)
        return self.post_event(self._with_message(event, as_segments(message)))

    def post_group_message(self, group_id, user_id, message, sub_type="normal", message_id=None, **fields):
        member = self.world.groups.get(int(group_id), {}).get("members", {}).get(int(user_id)) or {}
        sender = {k: member.get(k) for k in ("user_id", "nickname", "card", "sex", "age", "area", "level",
                                              "role", "title")}
        sender["user_id"] = int(user_id)
        event = {"post_type": "message", "message_type": "group", "sub_type": sub_type,
                 "message_id": message_id if message_id is not None else next(self._message_ids),
                 "group_id": int(group_id), "user_id": int(user_id), "anonymous": None, "font": 0,
                 "sender": sender}
        event.update(fields)
        return self.post_event(self._with_message(event, as_segments(message)))

    def post_notice(self, notice_type, **fields):
        return self.post_event(dict(fields, post_type="notice", notice_type=notice_type))

    def heartbeat(self):
        return self.post_event({"post_type": "meta_event", "meta_event_type": "heartbeat",
                                "status": self.act_get_status({}), "interval": 5000})

    def _with_message(self, event, segments):
        raw = to_cq(segments)
        string = self.knob("post_format") == "string"
        event.update(message=raw if string else segments, raw_message=raw)
        return event

    def post_event(self, event):
        """POST one event to post_url now (retrying as the profile does); the event as posted."""
        event = dict(event)
        event.setdefault("time", int(time.time()))
        event.setdefault("self_id", self.world.self_id)
        if self.knobs["numeric_strings"]:
            for key in ("self_id", "user_id", "group_id", "message_id", "operator_id", "target_id"):
                if isinstance(event.get(key), int):
                    event[key] = str(event[key])
        self._post(event)
        return event

    def _post(self, event):
        if not self.post_url:
            raise RuntimeError("onebot_sim: no post_url to send events to")
        body = json.dumps(event, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "X-Self-ID": str(self.world.self_id)}
        if self.secret:
            headers["X-Signature"] = "sha1=" + hmac.new(self.secret.encode("utf-8"), body, hashlib.sha1).hexdigest()
        retries, interval = self.knob("post_retries"), self.knob("post_retry_interval")
        status, attempts = None, 0
        with self._post_lock:
            while attempts <= retries and not self._stopping.is_set():
                attempts += 1
                try:
                    res = self._http.request("POST", self.post_url, data=body, headers=headers,
                                             timeout=self.knobs["post_timeout"], follow=False)
                    with self._lock:
                        lost, self._post_faults = self._post_faults > 0, max(0, self._post_faults - 1)
                    if lost:
                        raise TransportError("POST %s: ReadTimeout" % self.post_url)
                    status = res.status
                    break
                except TransportError as e:
                    status = None
                    log.debug("onebot_sim: post attempt %d failed: %s", attempts, e)
                    if attempts <= retries:
                        self._stopping.wait(interval)
        with self._lock:
            self.posts.append({"event": event, "status": status, "attempts": attempts})

    def _queue_post(self, event):
        if not self.post_url:
            return             # an implementation without an HTTP client configured posts nothing
        with self._outbox_cond:
            self._outbox.append(event)
            self._outbox_cond.notify()

    def _post_outbox(self):
        while True:
            with self._outbox_cond:
                self._outbox_cond.wait_for(lambda: self._outbox or self._stopping.is_set())
                if self._stopping.is_set():
                    return
                event = self._outbox.popleft()
            try:
                self.post_event(event)
            except Exception:
                log.exception("onebot_sim: posting a notice failed")

    def _beat(self):
        while not self._stopping.wait(self.knobs["heartbeat_interval"]):
            if self.post_url:
                self.heartbeat()


###############################################################################
# 7. Command line
###############################################################################


def say(args):
    """--say: ask the simulator running on --host/--port to post a message; the exit status."""
    if args.sender is None:
        sys.stderr.write("onebot_sim: --say needs --from USER_ID (a friend, or with --group a member)\n")
        return 2
    method, fields = "post_private_message", {"user_id": args.sender, "message": args.say}
    if args.group is not None:
        method, fields = "post_group_message", dict(fields, group_id=args.group)
    url = "http://%s:%d/sim/%s" % (args.host, args.port, method)
    try:
        answer = Http(timeout=15).post(url, json.dumps(fields).encode("utf-8"),
                                       headers={"Content-Type": "application/json"})
        result = answer.json()
    except (TransportError, ValueError) as e:
        sys.stderr.write("onebot_sim: no simulator answers on %s:%d (%s)\n" % (args.host, args.port, e))
        return 1
    if not result.get("ok"):
        sys.stderr.write("onebot_sim: %s\n" % result.get("error"))
        return 1
    print(json_dumps(result["result"]), flush=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="onebot_sim", description="A OneBot v11 implementation for tests.")
    parser.add_argument("--profile", default="napcat", choices=sorted(PROFILES))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--token", help="access token of the HTTP API")
    parser.add_argument("--secret", help="HMAC secret of the event posts")
    parser.add_argument("--post-url", help="where to POST events (webqq's onebot listen address)")
    parser.add_argument("--heartbeat", type=float, help="seconds between heartbeat events")
    parser.add_argument("--world", help="a JSON file with the account (see the module docstring)")
    parser.add_argument("--verbose", action="store_true")
    inject = parser.add_argument_group("post a message through a running simulator, then exit")
    inject.add_argument("--say", metavar="TEXT", help="the message (CQ codes allowed)")
    inject.add_argument("--from", dest="sender", type=int, metavar="USER_ID", help="who says it")
    inject.add_argument("--group", type=int, metavar="GROUP_ID", help="in this group (else a private message)")
    args = parser.parse_args(argv)
    if args.say is not None:
        return say(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    world = None
    if args.world:
        with open(args.world, encoding="utf-8") as f:
            world = json.load(f)
    sim = OneBotSimulator(args.profile, world, args.host, args.port, args.token, args.secret, args.post_url,
                          heartbeat_interval=args.heartbeat)
    sim.start()
    print("onebot_sim (%s) on %s, account %s; control API at %s/sim/" % (
        args.profile, sim.url, sim.world.self_id, sim.url), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
