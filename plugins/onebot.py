# -*- coding: utf-8 -*-
"""onebot: the upstream for a living QQ account, through a OneBot v11 implementation.

NapCatQQ and LLOneBot (go-cqhttp and Lagrange.OneBot too) keep a real account logged in and
speak OneBot v11: an HTTP API that we call, and an HTTP POST of every event to us. With this
upstream the Openqq API, post_api and check_event work on top of them, unchanged for a script:

    client = Client(upstream="onebot", upstream_options={
        "url": "http://127.0.0.1:3000", "access_token": "api-token",
        "listen": "127.0.0.1:8080", "secret": "post-secret"})
    client.load("openqq", listen=[{"host": "127.0.0.1", "port": 5000}])
    client.run()

or client.load("onebot", url=..., ...) before run(), or `upstream = onebot` and an [onebot]
section in webqq.ini. docs/onebot.md explains the settings on both sides.

 1. Constants     options and their defaults, segment placeholders
 2. Messages      CQ codes, received segments as Openqq text, Openqq text as segments
 3. API           OneBotApi: calls, and their answers judged alike for every implementation
 4. Receiver      EventReceiver (signed posts, answered at once), Mailbox, Dedup
 5. Upstream      OneBot: login, contacts, events, sends, group admin, liveness, rate limit
 6. Plugin        call(client, **options)
"""

import collections
import functools
import hashlib
import hmac
import json
import threading
import time

import webqq
from webqq import (AUTH_FAILED, BAD_REQUEST, FACES, NOT_RUNNING, OWN_AGENT, ApiError, ApiServer, Friend, Group,
                   GroupMember, Http, LoginFailed, NeedRelogin, Response, Stopped, TransportError, Upstream,
                   UpstreamError, User, bad_request, check_listen, check_url, encode_content, final_status,
                   is_loopback, json_dumps, listen_entries, non_negative, to_bool, to_int, whole)

###############################################################################
# 1. Constants
###############################################################################

# option: (default, one line of help[, check]); docs/onebot.md explains each one.
OPTIONS = collections.OrderedDict([
    ("url", ("http://127.0.0.1:3000", "the HTTP API of NapCat / LLOneBot (its HTTP server: host and port)",
             check_url)),
    ("access_token", (None, "the token of that HTTP API (sent as Authorization: Bearer)")),
    ("listen", ("127.0.0.1:8080", "host:port where NapCat / LLOneBot POSTs events (its HTTP client URL)",
                check_listen)),
    ("secret", (None, "the key of the X-Signature of those posts (NapCat/LLOneBot: the HTTP client's token)")),
    ("self_id", (None, "the QQ number expected; another account logged in there is refused")),
    ("allow_insecure", (False, "receive events on a non-loopback address without a secret (not recommended)", to_bool)),
    ("timeout", (None, "seconds to wait for one API call (default: http_timeout)", non_negative)),
    ("status_interval", (30.0, "seconds between two get_status checks when no heartbeat comes", non_negative)),
    ("status_failures_max", (3, "unanswered checks in a row before the bridge counts the implementation as gone",
                             whole(1))),
    ("poll_hold", (1.0, "seconds the poll loop waits for events before checking liveness again", non_negative)),
    ("send_rate", (1.0, "sends (and bans, kicks) per second at most, after a burst; 0 for no limit", non_negative)),
    ("send_burst", (5, "sends allowed at once before send_rate applies", whole(1))),
    ("dedup_size", (4096, "event keys remembered to drop duplicated posts", whole(1))),
    ("dedup_ttl", (300.0, "seconds an event key is remembered", non_negative)),
    ("queue_size", (10000, "events waiting to be processed at most (more are refused with HTTP 503)", whole(1))),
    ("max_body_size", (4194304, "largest event post, in bytes", whole(1))),
])

# What a received segment shows as in Openqq content (text, face and at are rendered apart).
PLACEHOLDERS = {"image": "[图片]", "record": "[语音]", "video": "[视频]", "file": "[文件]", "json": "[分享]",
                "xml": "[分享]", "share": "[分享]", "music": "[音乐]", "forward": "[合并转发]",
                "location": "[位置]", "contact": "[名片]", "poke": "[戳一戳]", "shake": "[窗口抖动]",
                "dice": "[骰子]", "rps": "[猜拳]", "mface": "[表情]", "reply": ""}
# Notices that change the contacts (OneBot._on_<name>); NapCat's notify/group_name is called group_name.
NOTICES = frozenset(("group_increase", "group_decrease", "group_admin", "group_card", "group_name", "friend_add"))
# The account's role in a group, in the original's words.
GROUP_ROLES = {"owner": "create", "admin": "manage", "member": "attend"}
# Event fields that are numbers, whatever type they arrive as.
NUMERIC = ("time", "self_id", "user_id", "group_id", "message_id", "operator_id", "target_id", "duration")

###############################################################################
# 2. Messages
###############################################################################


def cq_unescape(text):
    """CQ-code escapes undone, &amp; last."""
    return text.replace("&#44;", ",").replace("&#91;", "[").replace("&#93;", "]").replace("&amp;", "&")


def parse_cq(text):
    """A message in the string format: text and [CQ:type,key=value,...] codes, as segments."""
    segments, pos = [], 0
    while True:
        start = text.find("[CQ:", pos)
        end = text.find("]", start) if start >= 0 else -1
        if end < 0:
            break
        if start > pos:
            segments.append({"type": "text", "data": {"text": cq_unescape(text[pos:start])}})
        name, _, params = text[start + 4:end].partition(",")
        data = {}
        for param in params.split(",") if params else ():
            key, _, value = param.partition("=")
            data[key] = cq_unescape(value)
        segments.append({"type": name, "data": data})
        pos = end + 1
    if pos < len(text):
        segments.append({"type": "text", "data": {"text": cq_unescape(text[pos:])}})
    return segments


def segments_of(message):
    """A received message in any format (CQ text, a list of segments, one segment) as segments."""
    if isinstance(message, str):
        return parse_cq(message)
    if isinstance(message, dict):
        message = [message]
    if not isinstance(message, list):
        return []
    return [s for s in message if isinstance(s, dict) and isinstance(s.get("type"), str)
            and isinstance(s.get("data") or {}, dict)]


def render(segments, name_of=lambda qq: None):
    """Segments as the Openqq content text: faces by name, [图片] for pictures, @name for mentions."""
    parts = []
    for seg in segments:
        kind, data = seg["type"], seg.get("data") or {}
        if kind == "text":
            parts.append(str(data.get("text", "")))
        elif kind == "face":
            parts.append("[%s]" % (FACES.get(to_int(data.get("id"))) or "表情"))
        elif kind == "at":
            qq = str(data.get("qq", ""))
            parts.append("@全体成员" if qq == "all" else "@%s" % (data.get("name") or name_of(qq) or qq))
        else:
            parts.append(PLACEHOLDERS.get(kind, "[未识别内容]"))
    return "".join(parts)


def outgoing(content):
    """Openqq content as array segments: the text stays literal text (so no CQ code or file:// read
    can get in), and [微笑]-style face names become face segments, as the original sent them."""
    segments = []
    for piece in encode_content(content)[:-1]:        # encode_content ends with the font
        if isinstance(piece, list):
            segments.append({"type": "face", "data": {"id": str(piece[1])}})
        else:
            segments.append({"type": "text", "data": {"text": piece}})
    return segments


def coerce(event):
    """The event with its numeric fields as ints (implementations may send "123" for 123)."""
    event = dict(event)
    for key in NUMERIC:
        if event.get(key) is not None:
            event[key] = to_int(event[key])
    return event


def event_key(event):
    """What makes an event the same event again (a retried post, Tencent's double notice); None: no dedup."""
    post_type = event.get("post_type")
    if post_type in ("message", "message_sent") and event.get("message_id") is not None:
        chat = event.get("group_id") if event.get("message_type") == "group" else event.get("user_id")
        return (event.get("self_id"), post_type, event.get("message_type"), chat, event["message_id"])
    if post_type == "notice":
        return (event.get("notice_type"), event.get("sub_type"), event.get("group_id"), event.get("user_id"),
                event.get("operator_id"), event.get("time"))
    return None


###############################################################################
# 3. API
###############################################################################


class ActionFailed(UpstreamError):
    """An action that did not succeed: `code` is its retcode, `http_status` how the answer came."""

    def __init__(self, action, retcode, text="", http_status=200):
        UpstreamError.__init__(self, retcode, "%s %s" % (action, text) if text else action)
        self.http_status = http_status


class Unsupported(ActionFailed):
    """The implementation has no such action (HTTP 404, retcode 404/1404, or NapCat's 不支持)."""


class OneBotApi(object):
    """The implementation's HTTP API: POST JSON to <url>/<action>; success is status "ok" and nothing else."""

    def __init__(self, url, token, timeout, log):
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = "Bearer " + token
        self.http = Http(timeout=timeout, log=log, user_agent=OWN_AGENT)

    def call(self, action, timeout=None, **params):
        """The action's data (None when it was only queued); ActionFailed, or TransportError if nothing answered."""
        body = json.dumps(params, ensure_ascii=False).encode("utf-8")
        res = self.http.request("POST", "%s/%s" % (self.url, action), data=body, headers=self.headers,
                                timeout=timeout, follow=False)
        if res.status == 404:
            raise Unsupported(action, 404, "HTTP 404", 404)
        if res.status in (401, 403):
            raise ActionFailed(action, res.status, "token refused (HTTP %d)" % res.status, res.status)
        try:
            answer = res.json()
        except ValueError:
            answer = None
        if res.status != 200 or not isinstance(answer, dict):
            raise ActionFailed(action, -1, "HTTP %d without a OneBot answer" % res.status, res.status)
        if answer.get("status") == "ok":
            return answer.get("data")
        if answer.get("status") == "async":
            return None
        retcode = to_int(answer.get("retcode"), -1)
        text = str(answer.get("message") or answer.get("wording") or answer.get("msg") or "")
        if retcode in (404, 1404) or "不支持" in text:
            raise Unsupported(action, retcode, text)
        raise ActionFailed(action, retcode, text)

    def items(self, action, **params):
        """The dicts of an action answering a list."""
        data = self.call(action, **params)
        if not isinstance(data, list):
            raise ActionFailed(action, -1, "answered no list")
        return [item for item in data if isinstance(item, dict)]


###############################################################################
# 4. Receiver
###############################################################################


class Mailbox(object):
    """A bounded FIFO between threads: put() refuses when full; take() waits for items, wake() or close()."""

    def __init__(self, size):
        self.size = size
        self.items = collections.deque()
        self.cond = threading.Condition()
        self.woken = self.closed = False
        self.dropped = 0

    def put(self, item):
        with self.cond:
            if self.closed or len(self.items) >= self.size:
                self.dropped += 1
                return False
            self.items.append(item)
            self.cond.notify_all()
            return True

    def take(self, timeout=None):
        """Every waiting item, after waiting up to timeout for one; [] on timeout, wake() or close()."""
        with self.cond:
            self.cond.wait_for(lambda: self.items or self.woken or self.closed, timeout)
            items = list(self.items)
            self.items.clear()
            self.woken = False
            return items

    def wake(self):
        with self.cond:
            self.woken = True
            self.cond.notify_all()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class Dedup(object):
    """Event keys seen recently: at most `size` of them, none older than `ttl` seconds."""

    def __init__(self, size, ttl):
        self.size, self.ttl = size, ttl
        self.keys = collections.OrderedDict()

    def seen(self, key):
        """True when key was seen recently; remembers it either way."""
        now = time.monotonic()
        while self.keys:
            oldest = next(iter(self.keys))
            if now - self.keys[oldest] <= self.ttl:
                break
            del self.keys[oldest]
        if key in self.keys:
            return True
        self.keys[key] = now
        if len(self.keys) > self.size:
            self.keys.popitem(last=False)
        return False


class EventServer(ApiServer):
    """The receiver's listen address (threads onebot-receiver-<port>, onebot-receiver-conn-<port>)."""

    name = "onebot-receiver"
    body_name = "event"
    length_required = True


class EventReceiver(webqq.Api):
    """Where the implementation POSTs events: signature and self id checked, 204 at once, queued in order."""

    name = "onebot-receiver"

    def __init__(self, entry, secret, max_body_size, accept, log):
        webqq.Api.__init__(self, None, log)       # no token or browser rules: every post is signed
        self.secret = secret.encode("utf-8") if secret else None
        self.accept = accept
        self.self_id = None        # the account events must come from; None until login
        self.refused = 0
        self.server = EventServer(entry, self, log, {"max_body_size": max_body_size})

    @property
    def url(self):
        host, port = self.server.server_address[:2]
        return "http://%s:%d/" % ("[%s]" % host if ":" in host else host, port)

    def start(self):
        self.server.start()

    def close(self):
        self.server.close()

    def route(self, req):
        if req.method != "POST":
            raise ApiError(405, BAD_REQUEST, "POST OneBot events here")
        return self.receive

    def receive(self, req):
        """204 for an event post that is queued (before it is answered), else the refusal."""
        self.check_signature(req)
        try:
            event = json.loads(req.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise bad_request("the body is not JSON")
        if not isinstance(event, dict):
            raise bad_request("an event is a JSON object")
        if self.self_id is None:
            raise ApiError(503, NOT_RUNNING, "not logged in yet")
        header = req.headers.get("x-self-id")
        if to_int(event.get("self_id")) != self.self_id or (header is not None and to_int(header) != self.self_id):
            self.refused += 1
            self.log.warning("onebot: refused an event of account %s (X-Self-ID %s)", event.get("self_id"), header)
            raise ApiError(403, AUTH_FAILED, "wrong self id")
        if not self.accept(event):
            raise ApiError(503, NOT_RUNNING, "event queue full")
        return Response(b"", 204)

    def check_signature(self, req):
        """ApiError when a secret is set and X-Signature is not the HMAC-SHA1 of the body."""
        if self.secret is None:
            return
        given = req.headers.get("x-signature")
        if not given:
            refusal = ApiError(401, AUTH_FAILED, "signature missing")
        else:
            expected = "sha1=" + hmac.new(self.secret, req.body, hashlib.sha1).hexdigest()
            if hmac.compare_digest(given.strip().lower().encode("latin-1", "replace"), expected.encode("ascii")):
                return
            refusal = ApiError(403, AUTH_FAILED, "signature mismatch")
        self.refused += 1
        self.log.warning("onebot: refused an event post: %s", refusal)
        raise refusal


###############################################################################
# 5. Upstream
###############################################################################


class RateLimiter(object):
    """A token bucket: `burst` calls at once, then `rate` a second; acquire() waits (False once stopping)."""

    def __init__(self, rate, burst, sleep):
        self.rate, self.burst, self.sleep = rate, burst, sleep
        self.tokens, self.stamp = float(burst), time.monotonic()
        self.lock = threading.Lock()

    def acquire(self):
        if self.rate <= 0:
            return True
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - 1
            self.stamp = now
            wait = -self.tokens / self.rate
        return wait <= 0 or self.sleep(wait)


class Liveness(object):
    """Whether the account is online: heartbeats, bot_offline notices and get_status answers."""

    def __init__(self, interval, failures_max):
        self.interval, self.failures_max = interval, failures_max
        self.lock = threading.Lock()
        self.last_ok, self.failures, self.down = time.monotonic(), 0, None

    def ok(self):
        """The account was seen online: the latest report wins over an earlier offline one."""
        with self.lock:
            self.last_ok, self.failures, self.down = time.monotonic(), 0, None

    def offline(self, reason):
        with self.lock:
            self.down = reason

    def due(self):
        """True when it is time to ask get_status."""
        return time.monotonic() - self.last_ok >= self.interval

    def failed(self):
        """Count an unanswered check; True when there were too many in a row."""
        with self.lock:
            self.failures += 1
            return self.failures >= self.failures_max

    def take_down(self):
        """The reason the account was reported offline (once), or None."""
        with self.lock:
            reason, self.down = self.down, None
            return reason


class OneBot(Upstream):
    """A OneBot v11 implementation as the client's upstream: API calls out, event posts in."""

    name = "onebot"
    stable_ids = True      # QQ numbers: a relogin compares the contacts
    qr_login = False     # the implementation logs the account in: webqq never shows a QR code

    def __init__(self, client, options):
        Upstream.__init__(self, client)
        self.log = client.log.getChild("onebot")
        self.opts = opts = prepare_options(options, client)
        self.api = OneBotApi(opts["url"], opts["access_token"], opts["timeout"], self.log)
        self.nickname = None
        self.events = Mailbox(opts["queue_size"])      # raw posts, receiver -> worker
        self.inbox = Mailbox(opts["queue_size"])       # Incoming items, worker -> poll()
        self.dedup = Dedup(opts["dedup_size"], opts["dedup_ttl"])
        self.liveness = Liveness(opts["status_interval"], opts["status_failures_max"])
        self.limiter = RateLimiter(opts["send_rate"], opts["send_burst"], client.sleep)
        self.sent_ids = collections.deque(maxlen=1000)
        self.send_lock = threading.Lock()              # a send records its message_id before its echo is seen
        self.unlisted = set()                          # groups get_group_list left out, fetched on their own
        self.unlisted_lock = threading.Lock()
        self.receiver = EventReceiver(opts["listen"], opts["secret"], opts["max_body_size"], self.events.put,
                                      self.log)
        self.receiver.self_id = opts["self_id"]
        self.worker = client.thread("onebot-events", self._work)

    def start(self):
        self.receiver.start()
        self.worker.start()
        self.log.info("onebot: API %s, events received on %s%s", self.api.url, self.receiver.url,
                      "" if self.opts["secret"] else " (unsigned)")
        return self

    def stop(self):
        """Stop receiving: the server and its connections, then the worker; returns when they have ended."""
        self.receiver.close()
        self.events.close()
        if self.worker.is_alive() and self.worker is not threading.current_thread():
            self.worker.join()
        self.inbox.close()
        self.api.http.close()

    # -- login and liveness ---------------------------------------------------

    def login(self):
        """Wait until the implementation answers with an online account; never a QR code here."""
        retry, announced = min(self.opts["status_interval"], 5.0), None
        while True:
            try:
                info = self.api.call("get_login_info") or {}
                uid = to_int(info.get("user_id"))
                if not uid:
                    raise ActionFailed("get_login_info", -1, "answered no user_id")
                online = self._online()
            except Unsupported as e:
                raise LoginFailed("%s 不是OneBot v11接口 (not a OneBot v11 API: %s)" % (self.api.url, e))
            except ActionFailed as e:
                if e.http_status in (401, 403):
                    raise LoginFailed("OneBot拒绝了access_token (the API refused our token: %s)" % e)
                reason = str(e)
            except TransportError as e:
                reason = "OneBot实现无法连接 (%s)" % e
            else:
                expected = self.opts["self_id"]
                if expected and uid != expected:
                    raise LoginFailed("OneBot登录的帐号(%s)不是self_id(%s) (another account)" % (uid, expected))
                if online:
                    self.uid, self.nickname = uid, info.get("nickname")
                    self.receiver.self_id = uid
                    self.liveness.ok()
                    return False
                reason = "QQ帐号(%s)不在线 (get_status: offline)" % uid
            if reason != announced:
                self.log.warning("%s; 每%g秒重试 (waiting for the OneBot account)", reason, retry)
                announced = reason
            if not self.client.sleep(retry):
                raise Stopped()

    def _online(self, timeout=None):
        """get_status's online flag; an implementation without get_status counts as online when it answers."""
        try:
            status = self.api.call("get_status", timeout=timeout)
        except Unsupported:
            self.api.call("get_login_info", timeout=timeout)
            return True
        return not (isinstance(status, dict) and status.get("online") is False)

    def _check_liveness(self):
        """Raise NeedRelogin when the account went offline or the implementation stopped answering."""
        reason = self.liveness.take_down()
        if reason is None and self.liveness.due():
            try:
                if self._online(timeout=min(5.0, self.opts["timeout"])):
                    self.liveness.ok()
                else:
                    reason = "QQ帐号已离线 (get_status: offline)"
            except (ActionFailed, TransportError) as e:
                if self.liveness.failed():
                    reason = "OneBot实现无响应 (%s)" % e
        if reason is not None:
            raise NeedRelogin(reason)

    # -- contacts -------------------------------------------------------------

    def fetch_user(self):
        sex = None
        try:
            sex = (self.api.call("get_stranger_info", user_id=self.uid) or {}).get("sex")
        except (ActionFailed, TransportError) as e:
            self.log.debug("onebot: no profile of the account: %s", e)
        blank = dict.fromkeys(("birthday", "blood", "city", "college", "country", "email", "homepage", "mobile",
                               "occupation", "personal", "phone", "province", "signature"), "")
        return User(id=self.uid, uid=self.uid, account=self.uid, name=self.nickname, sex=sex or "unknown",
                    state="online", client_type="unknown", allow=0, constel=0, face=0, shengxiao=0, vip_info=0,
                    **blank)

    def fetch_friends(self):
        return [f for f in (make_friend(item) for item in self.api.items("get_friend_list")) if f is not None]

    def fetch_groups(self):
        groups = [g for g in (make_group(item) for item in self.api.items("get_group_list")) if g is not None]
        with self.unlisted_lock:
            self.unlisted -= {g.id for g in groups}
            missing = sorted(self.unlisted)
        for group_id in missing:           # still left out: kept as long as the implementation knows it
            try:
                groups.append(self.fetch_group(group_id))
            except ActionFailed as e:
                self.log.info("onebot: group %s is gone: %s", group_id, e)
                with self.unlisted_lock:
                    self.unlisted.discard(group_id)
        for group in groups:
            known = self.client.contacts.group(group.id)
            group.owner_id = known.owner_id if known is not None else None   # only member lists know it
        return groups

    def fetch_group(self, id):
        """The group, asked for on its own (get_group_list may leave out a group, e.g. from a stale cache);
        ActionFailed when the implementation doesn't know it."""
        group = make_group(self.api.call("get_group_info", group_id=id, no_cache=True) or {})
        if group is None:
            raise ActionFailed("get_group_info", -1, "answered no group_id")
        with self.unlisted_lock:
            self.unlisted.add(group.id)
        return group

    def fetch_group_detail(self, group):
        members = [m for m in (make_member(item) for item in self.api.items("get_group_member_list",
                                                                            group_id=group.id)) if m is not None]
        owner = next((m.id for m in members if m.role == "owner"), None)
        me = next((m for m in members if m.id == self.uid), None)
        return {"owner_id": owner, "owner_uid": owner, "role": GROUP_ROLES.get(me.role) if me else None}, members

    def fetch_discusses(self):
        return []          # Tencent abandoned discussion groups; no OneBot implementation has them

    # -- receiving ------------------------------------------------------------

    def poll(self):
        self._check_liveness()
        return self.inbox.take(self.opts["poll_hold"])

    def interrupt(self):
        self.inbox.wake()

    def close(self):
        self.inbox.close()
        self.api.http.abort()

    def _work(self):
        """The worker: raw event posts, in arrival order, to Incoming items for poll()."""
        while True:
            events = self.events.take()
            if not events and self.events.closed:
                return
            for event in events:
                try:
                    self._take(coerce(event))
                except Exception:
                    self.log.exception("onebot: event %s failed", json_dumps(event)[:300])

    def _take(self, event):
        key = event_key(event)
        if key is not None and self.dedup.seen(key):
            self.log.debug("onebot: duplicate event dropped: %s", key)
            return
        post_type = event.get("post_type")
        if post_type in ("message", "message_sent"):
            item = self._message(event)
        elif post_type == "notice":
            item = self._notice(event)
        elif post_type == "meta_event":
            item = self._meta(event)
        else:
            self.log.debug("onebot: %s %s left to the implementation", post_type, event.get("request_type"))
            item = None
        if item is not None and not self.inbox.put(item) and not self.inbox.closed:
            self.log.warning("onebot: inbox full (%d): an event was dropped (%d so far)", self.inbox.size,
                             self.inbox.dropped)

    def _message(self, e):
        mid, uid, gid = e.get("message_id"), e.get("user_id"), e.get("group_id")
        kind, sub = e.get("message_type"), e.get("sub_type")
        mine = e.get("post_type") == "message_sent" or (uid is not None and uid == self.uid)
        if mine:
            with self.send_lock:
                if mid in self.sent_ids:
                    return None       # the echo of our own send: the client reported it already
        segments = segments_of(e["message"] if e.get("message") is not None else e.get("raw_message", ""))
        item = {"kind": "message", "id": mid, "time": e.get("time") or int(time.time()), "sender_id": uid,
                "receiver_id": self.uid, "raw_content": segments}
        if mine:
            item["sender_id"] = self.uid
        if kind == "group":
            if sub == "notice":
                self.log.debug("onebot: notice group message dropped")
                return None
            item.update(type="group_message", group_id=gid)
            if sub == "anonymous":
                item.update(anonymous_sender(e.get("anonymous")))
        elif kind == "private":
            if gid is None and sub == "group":
                gid = to_int((e.get("sender") or {}).get("group_id"))
            if sub == "group" and gid is not None:
                item.update(type="sess_message", via="group", group_id=gid, sender_uid=uid)
            else:
                item["type"] = "friend_message"
            if mine:
                item["receiver_id"] = e.get("target_id") or (uid if uid != self.uid else None)
        else:
            return None
        item["content"] = render(segments, functools.partial(self._name_of, gid))
        return item

    def _name_of(self, group_id, qq):
        """The name to show for an @qq: its card in the group, a friend's markname, or None."""
        qq, contacts = to_int(qq), self.client.contacts
        group = contacts.group(group_id) if group_id is not None else None
        member = self._member_of(group, qq) if group is not None else None
        if member is not None:
            return member.displayname
        friend = contacts.friend(qq)
        return friend.displayname if friend is not None else None

    def _meta(self, e):
        if e.get("meta_event_type") == "heartbeat":
            status = e.get("status")
            if isinstance(status, dict) and status.get("online") is False:
                self._went_offline("QQ帐号已离线 (heartbeat)")
            else:
                self.liveness.ok()
        return None

    def _went_offline(self, reason):
        self.liveness.offline(reason)
        self.inbox.wake()

    # -- notices: applied on webqq-dispatch, in order with the messages ----------

    def _notice(self, e):
        kind = e.get("notice_type")
        if kind == "bot_offline":
            self._went_offline("QQ帐号已下线 (bot_offline: %s)" % (e.get("message") or ""))
            return None
        if kind == "notify" and e.get("sub_type") == "group_name":
            kind = "group_name"
        handler = getattr(self, "_on_" + str(kind), None) if kind in NOTICES else None
        if handler is None:
            self.log.debug("onebot: notice %s/%s has no Openqq event", kind, e.get("sub_type"))
            return None
        return {"kind": "apply", "fn": functools.partial(handler, e)}

    def _on_group_increase(self, e):
        contacts, group_id = self.client.contacts, e.get("group_id")
        if e.get("user_id") == self.uid:
            try:
                group = self.fetch_group(group_id)
            except (ActionFailed, TransportError) as error:
                self.log.warning("onebot: no info on the new group %s: %s", group_id, error)
                group = Group(id=group_id, uid=group_id)
            return contacts.add_group(group)
        group = contacts.group(group_id)
        if group is None:
            return []
        return contacts.add_group_member(group, self._member_info(group, e.get("user_id")))

    def _on_group_decrease(self, e):
        contacts, uid = self.client.contacts, e.get("user_id")
        group = contacts.group(e.get("group_id"))
        if group is None:
            return []
        if uid == self.uid or e.get("sub_type") in ("kick_me", "disband"):
            return contacts.remove_group(group.id)
        events = contacts.remove_group_member(group, uid)
        if events or group.members_loaded:
            return events
        gone = GroupMember(id=uid, uid=uid, name=self._nickname(uid), role="member")
        gone.group = group
        return [("lose_group_member", (gone, group))]

    def _on_group_admin(self, e):
        group = self.client.contacts.group(e.get("group_id"))
        if group is None:
            return []
        promoted, uid = e.get("sub_type") == "set", e.get("user_id")
        events = []
        if uid == self.uid:
            events = self._change(group, "role", "manage" if promoted else "attend", "group_property_change")
        member = self._member_of(group, uid)
        if member is not None:
            events += self._change(member, "role", "admin" if promoted else "member", "group_member_property_change")
        return events

    def _on_group_card(self, e):
        group = self.client.contacts.group(e.get("group_id"))
        member = self._member_of(group, e.get("user_id")) if group is not None else None
        if member is None:
            return []
        return self._change(member, "card", e.get("card_new") or None, "group_member_property_change")

    def _on_group_name(self, e):
        group = self.client.contacts.group(e.get("group_id"))
        if group is None or not e.get("name_new"):
            return []
        return self._change(group, "name", e.get("name_new"), "group_property_change")

    def _on_friend_add(self, e):
        uid = e.get("user_id")
        friend = make_friend({"user_id": uid, "nickname": self._nickname(uid)})
        return self.client.contacts.add_friend(friend) if friend is not None else []

    def _change(self, obj, field, new, event):
        contacts = self.client.contacts
        with contacts.lock:
            old = getattr(obj, field)
            if old == new:
                return []
            setattr(obj, field, new)
            contacts.changed()
        return [(event, (obj, field, old, new))]

    @staticmethod
    def _member_of(group, uid):
        return next((m for m in group.members if m.id == uid), None)

    def _member_info(self, group, uid):
        try:
            member = make_member(self.api.call("get_group_member_info", group_id=group.id, user_id=uid,
                                               no_cache=True) or {})
        except (ActionFailed, TransportError) as e:
            self.log.warning("onebot: no info on the new member %s of %s: %s", uid, group.id, e)
            member = None
        return member or GroupMember(id=uid, uid=uid, role="member")

    def _nickname(self, uid):
        try:
            return (self.api.call("get_stranger_info", user_id=uid) or {}).get("nickname")
        except (ActionFailed, TransportError) as e:
            self.log.debug("onebot: no nickname for %s: %s", uid, e)
            return None

    # -- sending and group admin ----------------------------------------------

    def send(self, msg):
        if msg.type == "friend_message":
            action, params = "send_private_msg", {"user_id": msg.receiver.id}
        elif msg.type == "group_message":
            action, params = "send_group_msg", {"group_id": msg.group.id}
        elif msg.type == "sess_message" and msg.via == "group":
            params = {"user_id": to_int(msg.receiver.id), "group_id": msg.group.id}
            if not self._is_member(**params):
                return final_status(msg, -5, "临时会话对象不是该群成员，未发送 (membership not verified: not sent)")
            action = "send_private_msg"
        else:
            return final_status(msg, -5, "OneBot没有讨论组 (no discussion groups on OneBot)")
        if not self.limiter.acquire():
            return -5, "客户端停止运行"
        with self.send_lock:
            try:
                data = self.api.call(action, message=outgoing(msg.content), **params)
            except ActionFailed as e:
                return final_status(msg, -5, "发送失败: %s" % e)
            except TransportError as e:
                if e.timed_out:
                    return final_status(msg, -1, "OneBot未应答，可能已发送，不再重试 (no answer: %s)" % e)
                return -1, "OneBot无法连接 (%s)" % e
            message_id = to_int(data.get("message_id")) if isinstance(data, dict) else None
            if message_id is not None:
                msg.id = message_id
                self.sent_ids.append(message_id)
        return 0, "发送正常"

    def _is_member(self, group_id, user_id):
        """Whether user_id is in the group now, asked without cache: NapCat sends a temp message
        to the group chat instead when it cannot find the user there."""
        try:
            data = self.api.call("get_group_member_info", group_id=group_id, user_id=user_id, no_cache=True)
        except (ActionFailed, TransportError) as e:
            self.log.warning("onebot: member %s of %s not verified: %s", user_id, group_id, e)
            return False
        return isinstance(data, dict) and to_int(data.get("user_id")) == user_id

    def shutup(self, group, members, seconds):
        if seconds < 60:
            self.log.warning("onebot: shutup of %d s refused: at least 60 s, as in the original", seconds)
            return False
        return self._moderate("set_group_ban", group, members, duration=int(seconds))

    def kick(self, group, members):
        return self._moderate("set_group_kick", group, members, reject_add_request=False)

    def _moderate(self, action, group, members, **params):
        if any(to_int(member.id, 0) <= 0 for member in members):
            self.log.warning("onebot: %s refused: an anonymous sender has no QQ number", action)
            return False
        ok = True
        for member in members:
            if not self.limiter.acquire():
                return False
            try:
                self.api.call(action, group_id=group.id, user_id=to_int(member.id), **params)
            except (ActionFailed, TransportError) as e:
                self.log.warning("onebot: %s of %s in %s failed: %s", action, member.id, group.id, e)
                ok = False
        return ok


def anonymous_sender(anonymous):
    """The message item's fields for an anonymous group message: a name that says so, and a negative id,
    which no QQ number is (OneBot's user_id for them, 80000000, is shared by every anonymous sender)."""
    anonymous = anonymous if isinstance(anonymous, dict) else {}
    name, number = anonymous.get("name"), to_int(anonymous.get("id"))
    return {"anonymous": "匿名(%s)" % name if name else "匿名",
            "sender_id": -number if number and number > 0 else -1}


def make_friend(data):
    uid = to_int(data.get("user_id"))
    if uid is None:
        return None
    return Friend(id=uid, uid=uid, name=data.get("nickname"), markname=data.get("remark") or None, category="",
                  state="unknown", client_type="unknown", face=0, flag=0, is_vip=0, vip_level=0)


def make_group(data):
    gid = to_int(data.get("group_id"))
    if gid is None:
        return None
    return Group(id=gid, uid=gid, name=data.get("group_name"), max_member=to_int(data.get("max_member_count")))


def make_member(data):
    uid = to_int(data.get("user_id"))
    if uid is None:
        return None
    return GroupMember(id=uid, uid=uid, name=data.get("nickname"), card=data.get("card") or None,
                       sex=data.get("sex"), role=data.get("role") or "member", join_time=to_int(data.get("join_time")),
                       last_speak_time=to_int(data.get("last_sent_time")), state="unknown", client_type="unknown")


###############################################################################
# 6. Plugin
###############################################################################


def listen_entry(value):
    """The listen option ("host:port", {"host", "port"}, or a list of one of those) as a listen entry."""
    try:
        entries = listen_entries(value, default_port=8080)
    except ValueError as e:
        raise ValueError("onebot: %s" % e)
    if len(entries) != 1:
        raise ValueError("onebot: listen must be host:port (one address)")
    return entries[0]


def prepare_options(options, client):
    """The options (every one of OPTIONS: Client.load read and checked them) as the bridge uses them;
    ValueError for a mistake."""
    opts = dict(options)
    if opts["timeout"] in (None, ""):
        opts["timeout"] = float(client.options["http_timeout"])
    for name in ("url", "access_token", "secret"):
        opts[name] = str(opts[name]) if opts[name] not in (None, "") else None
    if not opts["url"]:
        raise ValueError("onebot: url (the OneBot HTTP API) is required")
    opts["self_id"] = to_int(opts["self_id"]) if opts["self_id"] not in (None, "") else None
    opts["listen"] = listen_entry(opts["listen"])
    if not (is_loopback(opts["listen"]["host"], resolve=True) or opts["secret"] or opts["allow_insecure"]):
        raise ValueError("onebot refuses to receive events on %s without a secret: anyone who reaches it "
                         "could forge messages. Set secret (and the same token in the implementation), "
                         "listen on 127.0.0.1, or allow_insecure=1" % opts["listen"]["host"])
    return opts


def call(client, **options):
    """The plugin entry point: client's upstream becomes the OneBot implementation; returns it (it has stop())."""
    client.options.update(upstream="onebot", upstream_options=options)   # a failed load fails start() too
    upstream = OneBot(client, options).start()
    client.set_upstream(upstream)
    return upstream
