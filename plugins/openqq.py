# -*- coding: utf-8 -*-
"""openqq: the Openqq HTTP API of Mojo-Webqq, with check_event, post_api and poll_api.

    client.load("openqq", listen=[{"host": "127.0.0.1", "port": 5000}],
                post_api="http://127.0.0.1:8000/post", access_token="s3cret")

Every route of the original answers with the original's JSON (key sets, types, codes, status
strings); docs/openqq.md lists the options, the routes and where we deliberately differ.

 1. Constants     options and their defaults, which parameters are whose
 2. Event hub     check_event: bounded queue drained whole, long-poll, cursor mode
 3. Reporter      post_api: worker threads, bounded queue, retries, signature, reply/shutup
 4. Routes        Api: the Openqq routes against the Client contract
 5. Plugin        Openqq (the object call() returns) and call(client, **options)

The HTTP machinery (servers, requests, the guard, parked long-polls, poll_api) is webqq.py's
section "HTTP API", shared with the console, the controller and OneBot's event receiver.
"""

import base64
import collections
import hashlib
import hmac
import itertools
import json
import re
import sys
import threading
import time

import webqq
from webqq import (NOT_FOUND, NOT_RUNNING, OWN_AGENT, ApiError, ApiServer, Guard, Http, Poller, Response,
                   TransportError, bad_request, check_listen, check_protected, check_url, json_dumps, listen_entries,
                   points_into, serve, to_bool, to_int, to_list)

###############################################################################
# 1. Constants
###############################################################################

# The events the original reports by default (post_event_list).
DEFAULT_EVENTS = ("login", "stop", "state_change", "input_qrcode", "new_group", "new_friend",
                  "new_group_member", "lose_group", "lose_friend", "lose_group_member")

# option: (default, one line of help[, check]); docs/openqq.md explains each one. A help of None: an
# option no file can set.
OPTIONS = collections.OrderedDict([
    ("listen", (None, "addresses to serve on: JSON list of {host, port} or host:port text (default 127.0.0.1:5000)",
               check_listen)),
    ("access_token", (None, "require this token on every request (?access_token= or Authorization: Bearer)")),
    ("auth", (None, None)),
    ("allow_insecure", (False, "start on a non-loopback address without a token (not recommended)")),
    ("allow_origin", ((), "browser origins allowed to call the API cross-site (* for any)")),
    ("tls_cert", (None, "TLS certificate file for every listen entry")),
    ("tls_key", (None, "TLS private key file")),
    ("tls_ca", (None, "CA file: with it, client certificates are required")),
    ("tls_ciphers", (None, "OpenSSL cipher list for TLS")),
    ("request_timeout", (ApiServer.request_timeout,
                         "seconds a request may take to arrive whole, and an idle connection may stay open")),
    ("max_body_size", (ApiServer.max_body_size, "largest request body, in bytes")),
    ("max_connections", (ApiServer.max_connections, "open connections per listen address")),
    ("post_api", (None, "URL that every message and listed event is POSTed to as JSON", check_url)),
    ("post_event", (True, "false: report messages only, no events")),
    ("post_event_list", (DEFAULT_EVENTS, "events to report (comma-separated)")),
    ("post_stdout", (False, "also print every report as one JSON line on standard output")),
    ("post_secret", (None, "sign reports: X-Signature: sha1=<HMAC-SHA1 of the body with this key>")),
    ("post_timeout", (5, "seconds to wait for one post_api answer")),
    ("post_retries", (6, "retries of a report after a connection error or HTTP 502/503/504")),
    ("post_retry_backoff", (1.0, "first retry delay in seconds; it doubles each time")),
    ("post_queue_size", (1000, "reports waiting for delivery at most (the oldest is dropped beyond)")),
    ("post_workers", (4, "delivery threads")),
    ("post_media_data", (True, "accepted and ignored, as in the original")),
    ("check_event_list_max_size", (20, "events check_event keeps (the oldest is dropped beyond)")),
    ("check_event_timeout", (30, "seconds a check_event long poll waits before answering []")),
    ("check_event_history_size", (1000, "events kept for cursor readers")),
    ("poll_api", (None, "URL to GET forever while the client runs (reverse calls)", check_url)),
    ("poll_interval", (5, "seconds between two poll_api requests")),
    ("poll_timeout", (120, "seconds to wait for one poll_api answer")),
    ("stop_delay", (3, "seconds between the answer of stop_client / relogin and the action")),
])

MESSAGE_TYPES = frozenset(("friend_message", "group_message", "discuss_message", "sess_message"))
EVENT_NAME = re.compile(r"^[a-z_]{1,64}$")
RECONNECT_MS = 2000         # the stream's retry: how soon an EventSource comes back after a cut
# Parameters that steer a request and are never search attributes.
RESERVED = frozenset(("datatype", "callback", "async", "client", "access_token", "cursor"))
# Mojo-Webqq 1.x names, by route: the route a 1.x path became, and per handler each 1.x parameter's
# 2.x name (search_group's are also the original's Group AUTOLOAD). A 2.x name in the request wins.
# shutup_group_member has none: 1.x's `time` was seconds, 2.x's minutes.
OLD_ROUTES = {"/openqq/send_message": "/openqq/send_friend_message"}
OLD_PARAMS = {
    "send_friend_message": {"qq": "uid"},
    "search_friend": {"qq": "uid"},
    "send_group_message": {"gid": "id", "gnumber": "uid", "gname": "name"},
    "search_group": {"gid": "id", "gnumber": "uid", "gname": "name", "gtype": "role"},
    "send_discuss_message": {"did": "id"},
    "send_sess_message": {"gid": "group_id", "gnumber": "group_uid", "did": "discuss_id", "qq": "uid"},
    "kick_group_member": {"gid": "group_id", "gnumber": "group_uid", "member_qq": "member_uid"},
}


def perl_true(value):
    """A request parameter's truth as the original reads it: "" and "0" are false."""
    return value is not None and value not in ("", "0")


###############################################################################
# 2. Event hub
###############################################################################


class EventHub(object):
    """check_event's queue, bounded and drained whole, plus a numbered history for cursor readers."""

    def __init__(self, max_size, history_size):
        self.max_size = max_size
        self.cond = threading.Condition()
        self.queue = collections.deque()
        self.history = collections.deque(maxlen=max(history_size, max_size))
        self.seq = 0
        self.dropped = 0
        self.closed = False
        self.listeners = []         # called after every change (the parkers' wake-ups)

    def put(self, item):
        with self.cond:
            self.seq += 1
            self.history.append((self.seq, item))
            self.queue.append(item)
            self._trim()
            self._changed()

    def _changed(self):
        self.cond.notify_all()
        for listener in self.listeners:
            listener()

    def ready(self, cursor=None):
        """True when take() (cursor None) or read(cursor) would answer at once."""
        with self.cond:
            if self.closed:
                return True
            if cursor is None:
                return bool(self.queue)
            return self.seq > self._start(cursor)

    def _start(self, cursor):
        """Where a read from cursor begins: a cursor ahead of us (a restarted client) starts over."""
        return cursor if cursor <= self.seq else 0

    def _trim(self):
        while len(self.queue) > self.max_size:
            self.queue.popleft()
            self.dropped += 1

    def take(self, timeout, alive):
        """Every queued item, waiting up to timeout for one; [] on timeout, None if the caller left."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.queue:
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    return []
                self.cond.wait(left)
                if not alive():
                    return None
            if not alive():
                return None
            items = list(self.queue)
            self.queue.clear()
            return items

    def give_back(self, items):
        """Return items whose answer could not be delivered to the front of the queue."""
        with self.cond:
            self.queue.extendleft(reversed(items))
            self._trim()
            self._changed()

    def read(self, cursor, timeout, alive):
        """(seq, item) pairs after cursor, waiting up to timeout; a cursor ahead of us starts over."""
        deadline = time.monotonic() + timeout
        with self.cond:
            cursor = self._start(cursor)
            while self.seq <= cursor:
                left = deadline - time.monotonic()
                if self.closed or left <= 0 or not alive():
                    return []
                self.cond.wait(left)
            fresh = min(self.seq - cursor, len(self.history))     # the history's seqs are consecutive
            return list(itertools.islice(self.history, len(self.history) - fresh, None))

    def close(self):
        """Wake every waiting poller; they answer at once from now on."""
        with self.cond:
            self.closed = True
            self._changed()


###############################################################################
# 3. Reporter
###############################################################################

Report = collections.namedtuple("Report", "body post_type msg")


def describe(report):
    """A report as log lines name it: its post_type and message id, or "event" and the event."""
    if report.msg is not None:
        return "%s %s" % (report.post_type, report.msg.id)
    return "event %s" % json.loads(report.body.decode("utf-8")).get("event")


class Reporter(object):
    """post_api delivery: a queue per worker keyed by conversation, retries, signature, counters."""

    def __init__(self, client, log, url, opts):
        self.client = client
        self.log = log
        self.url = url
        self.secret = opts["post_secret"].encode("utf-8") if opts["post_secret"] else None
        self.timeout = opts["post_timeout"]
        self.retries = opts["post_retries"]
        self.backoff = opts["post_retry_backoff"]
        self.capacity = opts["post_queue_size"]
        self.http = Http(log=log, user_agent=OWN_AGENT)
        self.lock = threading.Lock()
        self.queues = [collections.deque() for _ in range(opts["post_workers"])]
        self.conds = [threading.Condition(self.lock) for _ in self.queues]
        self.pending = 0
        self.stopping = threading.Event()
        self.deadline = None
        self.counts = {"sent": 0, "retried": 0, "dropped": 0, "failed": 0}
        self.threads = [client.thread("openqq-post-%d" % i, self._work, i) for i in range(len(self.queues))]

    def start(self):
        for t in self.threads:
            t.start()

    def submit(self, payload, msg=None):
        """Queue one report; the oldest waiting report makes room when the queue is full."""
        key = payload.get("group_id") or payload.get("discuss_id") or (
            payload.get("sender_id") if payload.get("class") == "recv" else payload.get("receiver_id"))
        index = hash(str(key if msg is not None else "event")) % len(self.queues)
        report = Report(json_dumps(payload).encode("utf-8"), payload["post_type"], msg)
        with self.lock:
            if self.stopping.is_set():
                self.counts["dropped"] += 1
                return
            if self.pending >= self.capacity:
                longest = max(self.queues, key=len)
                lost = longest.popleft()
                self.pending -= 1
                self.counts["dropped"] += 1
                self.log.warning("post_api queue full (%d): dropped report %s", self.capacity, describe(lost))
            self.queues[index].append(report)
            self.pending += 1
            self.conds[index].notify()

    def counters(self):
        with self.lock:
            return dict(self.counts, queued=self.pending)

    def _work(self, index):
        queue, cond = self.queues[index], self.conds[index]
        while True:
            with self.lock:
                while not queue and not self.stopping.is_set():
                    cond.wait()
                if not queue or (self.deadline and time.monotonic() > self.deadline):
                    if queue:
                        self.log.warning("post_api stopped: dropped %d queued report(s): %s", len(queue),
                                         ", ".join(describe(r) for r in queue))
                    self.counts["dropped"] += len(queue)
                    self.pending -= len(queue)
                    queue.clear()
                    return
                report = queue.popleft()
                self.pending -= 1
            try:
                self._deliver(report)
            except Exception:
                self.log.exception("post_api report failed")

    def _deliver(self, report):
        headers = {"Content-Type": "application/json"}
        if self.secret is not None:
            headers["X-Signature"] = "sha1=" + hmac.new(self.secret, report.body, hashlib.sha1).hexdigest()
        attempt = 0
        while True:
            try:
                res = self.http.request("POST", self.url, data=report.body, headers=headers,
                                        timeout=self.timeout, follow=False)
                status, error, again = res.status, "HTTP %d" % res.status, res.status in (502, 503, 504)
            except TransportError as e:
                status, error, again = None, str(e), not e.timed_out
            if status is not None and 200 <= status < 300:
                with self.lock:
                    self.counts["sent"] += 1
                self._use_answer(report, res.headers.get("content-type", ""), res.body)
                return
            if not again or attempt >= self.retries or self.stopping.is_set():
                with self.lock:
                    self.counts["failed"] += 1
                self.log.warning("post_api report %s failed: %s", report.post_type, error)
                return
            delay = min(self.backoff * 2 ** attempt, 30)
            attempt += 1
            with self.lock:
                self.counts["retried"] += 1
            self.log.debug("post_api %s, retry %d in %.1fs", error, attempt, delay)
            if self.stopping.wait(delay):
                with self.lock:
                    self.counts["failed"] += 1
                return

    def _use_answer(self, report, content_type, body):
        """A 2xx JSON answer to a message report: reply to it, shut the group sender up."""
        if report.msg is None or not re.search("text/json|application/json", content_type, re.I):
            return
        try:
            answer = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self.log.warning("post_api answered invalid JSON; ignored")
            return
        if not isinstance(answer, dict):
            return
        msg, reply = report.msg, answer.get("reply")
        if report.post_type == "send_message" and answer.get("format", "text") != "text":
            return
        if isinstance(reply, (int, float)) and not isinstance(reply, bool):
            reply = str(reply)
        if reply == "" or (reply is not None and not isinstance(reply, str)):
            self.log.warning("post_api reply must be non-empty text; ignored")
        elif reply is not None:
            self.client.reply_message(msg, reply)
        if report.post_type == "receive_message" and msg.type == "group_message" \
                and _number(answer.get("shutup")) == 1:
            seconds = int(_number(answer.get("shutup_time")) or 60)
            if not self.client.shutup_group_member(msg.group, [msg.sender], seconds):
                self.log.warning("post_api shutup of %s failed", getattr(msg.sender, "id", "?"))

    def stop(self, drain):
        """Deliver what is queued for up to drain seconds (no more retries), then end the workers."""
        with self.lock:
            self.deadline = time.monotonic() + drain
            self.stopping.set()
            for cond in self.conds:
                cond.notify_all()
        others = [t for t in self.threads if t is not threading.current_thread()]
        for t in others:
            t.join(drain)
        self.http.abort()      # past the drain time: break the requests still in flight
        for t in others:
            t.join()


def _number(value):
    """A JSON value compared as a number, the way Perl's == does; None when it is no number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


###############################################################################
# 4. Routes
###############################################################################


def jsonable(value):
    """An event argument as JSON: model objects through to_json(), bytes as base64."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, bytes):
        return base64.encodebytes(value).decode("ascii")
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float)):
        return value
    return str(value)


def json_list(objects, to_json):
    """json_dumps([to_json(o) for o in objects]) as bytes, one object at a time: never every dict at once."""
    return b"[%s]" % b",".join(json_dumps(to_json(o)).encode("utf-8") for o in objects)


def not_found(code, what):
    return {"code": code, "id": None, "status": "%s not found" % what}


def renamed(params, old_names):
    """params with each 1.x name of old_names under its 2.x name, unless the 2.x name is there already."""
    if not any(name in params for name in old_names):
        return params
    params = dict(params)
    for old, new in old_names.items():
        if old in params:
            value = params.pop(old)
            params.setdefault(new, value)
    return params


def cursor_param(text, name):
    """A cursor given as text (None: not given) as a number >= 0; ApiError 400 when it is none."""
    if text is None:
        return None
    cursor = to_int(text)
    if cursor is None or cursor < 0:
        raise bad_request("%s must be a number >= 0" % name)
    return cursor


def event_types(req):
    """The ?type= filter of check_event and events: a frozenset of names, or None for every event."""
    value = req.params.get("type")
    if value is None:
        return None
    names = frozenset(name.strip() for text in (value if isinstance(value, tuple) else (value,))
                      for name in text.split(",") if name.strip())
    if not names or not all(EVENT_NAME.match(name) for name in names):
        raise bad_request("type must be event names separated by commas, e.g. group_message,new_friend")
    return names


def matches(item, types):
    """True when an event passes the filter: its post_type, message type or event name is one of types."""
    return types is None or item.get("post_type") in types or item.get("type") in types or \
        item.get("event") in types


def as_json_list(pairs):
    """Events with their cursors as check_event's cursor mode answers them."""
    return json_dumps([dict(item, cursor=seq) for seq, item in pairs]).encode("utf-8")


def sse_block(event, cursor, data, retry=None):
    """One Server-Sent Event: its name (None: a plain message), id (a cursor) and JSON data."""
    head = b"retry: %d\n" % retry if retry is not None else b""
    if event is not None:
        head += b"event: %s\n" % event.encode("ascii")
    return head + b"id: %d\ndata: %s\n\n" % (cursor, json_dumps(data).encode("utf-8"))


def as_sse(pairs):
    """Events as the stream writes them: id = the cursor, data = what check_event's cursor mode gives."""
    return b"".join(sse_block(None, seq, dict(item, cursor=seq)) for seq, item in pairs)


class Scan(object):
    """A cursor read of the hub with a filter: the matching events after cursor; the cursor moves past
    the others, so a wait for a matching event does not read them again."""

    def __init__(self, hub, cursor, types):
        self.hub, self.cursor, self.types = hub, cursor, types
        self.pairs = []         # everything read, matching or not: it fixes the answer's span

    def found(self, timeout, alive):
        """True once a matching event was read, waiting up to timeout for one."""
        deadline = time.monotonic() + timeout
        while True:
            pairs = self.hub.read(self.cursor, max(0.0, deadline - time.monotonic()), alive)
            if pairs:
                self.pairs += pairs
                self.cursor = pairs[-1][0]
            if not pairs or any(matches(item, self.types) for _, item in pairs) or time.monotonic() >= deadline:
                return any(matches(item, self.types) for _, item in self.pairs)


class EventStream(webqq.Stream):
    """/openqq/events for one client: the hub's events after its cursor (those of its types), as
    Server-Sent Events; an `event: reset` when the next event is not the cursor's successor (events
    fell out of the history, or the client restarted and counts from 1 again)."""

    def __init__(self, api, cursor, types):
        self.api, self.hub, self.cursor, self.types = api, api.plugin.hub, cursor, types

    def pull(self, timeout=0.0, alive=None):
        if self.hub.closed:
            return None
        asked, seq = (self.cursor, self.types), self.hub.seq
        last = self.api.stream_pull
        if timeout == 0 and last[:2] == (asked, seq):      # a thousand streams at one cursor read the hub once
            self.cursor = last[2]
            return last[3]
        pairs = self.hub.read(self.cursor, timeout, alive or (lambda: True))
        if not pairs:
            return None if self.hub.closed else b""
        begin = pairs[0][0] - 1
        reset = b"" if begin == self.cursor else sse_block("reset", begin, {"asked": self.cursor, "cursor": begin})
        self.cursor = pairs[-1][0]
        data = reset + self.api.encoded(pairs, self.types, as_sse)
        if timeout == 0:
            self.api.stream_pull = (asked, seq, self.cursor, data)
        return data


class Api(webqq.Api):
    """The Openqq routes: parameters in, the original's JSON out, against the Client contract."""

    name = "openqq"
    jsonp = True
    # path: (methods, needs a running client, handler)
    ROUTES = {
        "/openqq/get_user_info": ("GET", True, "get_user_info"),
        "/openqq/get_friend_info": ("GET", True, "get_friend_info"),
        "/openqq/get_group_info": ("GET", True, "get_group_info"),
        "/openqq/get_group_basic_info": ("GET", True, "get_group_basic_info"),
        "/openqq/get_discuss_info": ("GET", True, "get_discuss_info"),
        "/openqq/search_friend": ("GET POST", True, "search_friend"),
        "/openqq/search_group": ("GET POST", True, "search_group"),
        "/openqq/send_friend_message": ("GET POST", True, "send_friend_message"),
        "/openqq/send_group_message": ("GET POST", True, "send_group_message"),
        "/openqq/send_discuss_message": ("GET POST", True, "send_discuss_message"),
        "/openqq/send_sess_message": ("GET POST", True, "send_sess_message"),
        "/openqq/shutup_group_member": ("GET POST", True, "shutup_group_member"),
        "/openqq/kick_group_member": ("GET POST", True, "kick_group_member"),
        "/openqq/check_event": ("GET POST", False, "check_event"),
        "/openqq/events": ("GET", True, "events"),
        "/openqq/get_client_info": ("GET POST", False, "get_client_info"),
        "/openqq/stop_client": ("GET POST", False, "stop_client"),
        "/openqq/relogin": ("GET", False, "relogin"),
    }

    def __init__(self, plugin):
        webqq.Api.__init__(self, plugin.guard, plugin.log)
        self.plugin = plugin
        self.client = plugin.client
        self.contacts = plugin.client.contacts
        self.cache = {}
        self.cache_lock = threading.Lock()
        self.events_answer = (None, b"[]")     # the last cursor-mode answer or stream chunk: many readers ask the same
        self.stream_pull = (None, None, None, None)     # the last EventStream.pull: (asked, hub seq, cursor, bytes)

    def route(self, req):
        """A route's handler, or a handler another plugin mounted on a prefix of the path (Openqq.mount)."""
        method = "GET" if req.method == "HEAD" else req.method
        route = self.ROUTES.get(OLD_ROUTES.get(req.path, req.path))
        if route is None:
            route = next((("GET POST", False, handler) for prefix, handler in self.plugin.mounts
                          if req.path.startswith(prefix)), None)
        if route is None or method not in route[0].split():
            raise ApiError(403, NOT_FOUND, "api not found")
        _, needs_running, handler = route
        if handler in OLD_PARAMS:
            req.params = renamed(req.params, OLD_PARAMS[handler])
        handler = handler if callable(handler) else getattr(self, handler)
        if not needs_running:
            return handler
        return lambda req: self.when_running(handler, req)

    def when_running(self, handler, req):
        if self.client.state != "running":
            raise self.not_running()
        return handler(req)

    def not_running(self):
        state = self.client.state
        return ApiError(503, NOT_RUNNING, "client not running", [("Retry-After", "3")], state=state)

    # -- info ------------------------------------------------------------------

    def cached(self, key, kind, build):
        """The JSON bytes build() makes, reused until contacts of that kind change; one thread builds,
        the others wait for its bytes (40,000 group members make 9 MB of JSON and take half a second)."""
        version = self.contacts.versions[kind]
        hit = self.cache.get(key)
        if hit is None or hit[0] != version:
            with self.cache_lock:
                hit = self.cache.get(key)
                if hit is None or hit[0] != version:
                    hit = self.cache[key] = (version, build())
        return hit[1]

    def get_user_info(self, req):
        return self.cached("user", "user", lambda: json_dumps(self.contacts.user.to_json()).encode("utf-8"))

    def get_friend_info(self, req):
        return self.cached("friends", "friend", lambda: json_list(self.contacts.friends(), lambda f: f.to_json()))

    def get_group_info(self, req):
        return self.cached("groups", "group", lambda: json_list(self.contacts.groups(), lambda g: g.to_json()))

    def get_group_basic_info(self, req):
        return self.cached("groups_basic", "group",
                           lambda: json_list(self.contacts.groups(), lambda g: g.to_json(members=False)))

    def get_discuss_info(self, req):
        return self.cached("discusses", "discuss", lambda: json_list(self.contacts.discusses(), lambda d: d.to_json()))

    # -- search ------------------------------------------------------------------

    def search(self, req, find):
        attrs = {}
        for name, value in req.params.items():
            if name in RESERVED:
                continue
            if isinstance(value, tuple) or not re.match(r"^[A-Za-z][A-Za-z0-9_]*$", name):
                return {"code": 100, "status": "object not found"}
            attrs[name] = value
        found = find(**attrs) if attrs else []
        if not found:
            return {"code": 100, "status": "object not found"}
        return [obj.to_json() for obj in found]

    def search_friend(self, req):
        return self.search(req, self.contacts.search_friend)

    def search_group(self, req):
        def find(**attrs):
            groups = self.contacts.search_group(**attrs)
            for group in groups:
                self.client.ensure_members(group)
            return groups
        return self.search(req, find)

    # -- sends -------------------------------------------------------------------

    def selectors(self, req, names, **renames):
        """The lookup attributes present in req: {attr: value}; None if one was repeated."""
        attrs = {}
        for name in names:
            value = req.params.get(name)
            if isinstance(value, tuple):
                return None
            if value is not None:
                attrs[renames.get(name, name)] = value
        return attrs

    def first(self, find, attrs, *args):
        """The original's lookup: the first object matching every attribute, or None."""
        if not attrs:
            return None
        found = find(*args, **attrs)
        return found[0] if found else None

    # route: (the search, its lookup parameters, the not-found code and name, the client's send)
    SENDS = {"send_friend_message": ("search_friend", ("id", "uid", "name", "displayname"), 100, "friend"),
             "send_group_message": ("search_group", ("id", "uid", "name", "displayname"), 101, "group"),
             "send_discuss_message": ("search_discuss", ("id",), 102, "discuss")}

    def send_friend_message(self, req):
        return self.send_to(req, "send_friend_message")

    def send_group_message(self, req):
        return self.send_to(req, "send_group_message")

    def send_discuss_message(self, req):
        return self.send_to(req, "send_discuss_message")

    def send_to(self, req, route):
        """A friend, group or discussion message: the first one the parameters find gets it."""
        search, names, code, what = self.SENDS[route]
        target = self.first(getattr(self.contacts, search), self.selectors(req, names))
        if target is None:
            return not_found(code, what)
        return self.send(req, getattr(self.client, route), target)

    def send_sess_message(self, req):
        params = req.params
        if "group_id" in params or "group_uid" in params:
            group = self.first(self.contacts.search_group,
                               self.selectors(req, ("group_id", "group_uid"), group_id="id", group_uid="uid"))
            member = group and self.client.ensure_members(group) and self.first(
                self.contacts.search_group_member, self.selectors(req, ("id", "uid")), group)
            if member is None:
                return not_found(103, "group member")
        elif "discuss_id" in params:
            discuss = self.first(self.contacts.search_discuss,
                                 self.selectors(req, ("discuss_id",), discuss_id="id"))
            member = discuss and self.first(self.contacts.search_discuss_member,
                                            self.selectors(req, ("id", "uid")), discuss)
            if member is None:
                return not_found(104, "discuss member")
        else:
            return {"code": 105, "id": None, "status": "discuss member or group member  not found"}
        return self.send(req, self.client.send_sess_message, member)

    def send(self, req, send, target):
        """Enqueue content for target; answer at once (async) or with the final status."""
        content = req.param("content")
        if not content:
            return {"code": 106, "id": None, "status": "content missing"}
        if perl_true(req.param("async")):
            send(target, content, source="api")
            return {"code": 0, "status": "request already in execution"}
        done = self.plugin.waiter()
        try:
            msg = send(target, content, source="api", callback=lambda m: done.set())
            done.wait()
        finally:
            self.plugin.waiters.discard(done)
        if not msg.wait(0):
            raise self.not_running()
        return {"code": msg.code, "id": msg.id, "info": msg.info, "status": msg.msg}

    # -- group admin ---------------------------------------------------------------

    def admin_targets(self, req):
        """(group, members) of a shutup/kick request, or the original's error answer."""
        group = self.first(self.contacts.search_group,
                           self.selectors(req, ("group_id", "group_uid"), group_id="id", group_uid="uid"))
        if group is None:
            return {"code": 100, "status": "object not found"}, None
        self.client.ensure_members(group)
        kind = "id" if req.params.get("member_id") is not None else "uid"
        value = req.params.get("member_" + kind) or ""
        values = value if isinstance(value, tuple) else (value,)
        ids = [part.strip() for v in values for part in v.split(",") if part.strip()]
        if not ids:
            return {"code": 200, "status": "member id empty"}, None
        members = []
        for one in ids:
            member = self.first(self.contacts.search_group_member, {kind: one}, group)
            if member is None:
                return {"code": 100, "status": "member %s not found" % one}, None
            members.append(member)
        return group, members

    def shutup_group_member(self, req):
        minutes = req.param("time")
        group, members = self.admin_targets(req)
        if members is None:
            return group
        if not re.match(r"^\d+$", minutes or "") or int(minutes) < 1:
            return {"code": 400, "status": "shutup time missing or error"}
        ok = self.client.shutup_group_member(group, members, int(minutes) * 60)
        return {"code": 0, "status": "success"} if ok else {"code": 201, "status": "failure"}

    def kick_group_member(self, req):
        group, members = self.admin_targets(req)
        if members is None:
            return group
        ok = self.client.kick_group_member(group, members)
        return {"code": 0, "status": "success"} if ok else {"code": 201, "status": "failure"}

    # -- events and control -----------------------------------------------------------

    def check_event(self, req):
        hub, timeout = self.plugin.hub, self.plugin.opts["check_event_timeout"]
        start = cursor_param(req.param("cursor"), "cursor")
        types = event_types(req)
        if types is not None and start is None:
            raise bad_request("type filters the cursor mode only: add cursor=0 (or the cursor you have)")
        if req.wait is not None:
            timeout = req.wait
        elif req.parkable:
            ready = Scan(hub, start, types).found if types is not None else lambda *_: hub.ready(start)
            if not ready(0, req.alive):
                resp = Response(b"")
                resp.wait_for = (lambda: ready(0, req.alive), timeout)
                return resp
        if start is None:
            items = hub.take(timeout, req.alive) or []
            resp = Response(json_dumps(items).encode("utf-8"))
            if items:
                resp.undelivered = lambda: hub.give_back(items)
            return resp
        scan = Scan(hub, start, types)
        scan.found(timeout, req.alive)
        following = scan.cursor if scan.pairs else min(start, hub.seq)
        return Response(self.encoded(scan.pairs, types, as_json_list), headers=[("X-Cursor", str(following))])

    def encoded(self, pairs, types, encode):
        """encode(pairs) (events with their cursors), reused while readers ask for the same span of the
        history: a thousand readers at one cursor ask for the same bytes. The seqs are consecutive, so
        the first and last seq read (with the filter) fix the events."""
        key = (pairs[0][0], pairs[-1][0], types, encode) if pairs else None
        cached = self.events_answer
        if key is None or cached[0] != key:
            cached = self.events_answer = (key, encode([(seq, item) for seq, item in pairs if matches(item, types)]))
        return cached[1]

    def events(self, req):
        """The events as Server-Sent Events, from Last-Event-ID, ?cursor= or now on (docs/openqq.md)."""
        hub = self.plugin.hub
        types = event_types(req)
        last = (req.headers.get("last-event-id") or "").strip() or None
        cursor = cursor_param(last, "Last-Event-ID") if last is not None else cursor_param(req.param("cursor"), "cursor")
        stream = EventStream(self, hub.seq if cursor is None else cursor, types)
        first = sse_block("ready", stream.cursor, {"cursor": stream.cursor}, retry=RECONNECT_MS)
        return stream.response(first + stream.pull())

    def get_client_info(self, req):
        info = dict(self.client.client_info(), code=0, status="success", state=self.client.state)
        info.update(self.plugin.counters())
        return info

    def control(self, what, action):
        info = self.client.client_info()
        delay = self.plugin.opts["stop_delay"]
        self.plugin.later("openqq-" + what, delay, action)
        return info, "success, client(%s) will %s in %g seconds" % (info["pid"], what, delay)

    def stop_client(self, req):
        info, status = self.control("stop", self.client.stop)
        return {"account": info["account"], "code": 0, "pid": info["pid"], "runtime": info["runtime"],
                "starttime": info["starttime"], "status": status}

    def relogin(self, req):
        info, status = self.control("relogin", self.client.relogin)
        return {"account": info["account"], "code": 0, "status": status}


###############################################################################
# 5. Plugin
###############################################################################


class Server(ApiServer):
    """One listen address of the Openqq API (threads openqq-<port>, openqq-conn-<port>, openqq-park-<port>)."""

    name = "openqq"


class Openqq(object):
    """The plugin: owns the servers, the check_event hub, the reporter, the poller; stop() ends them."""

    def __init__(self, client, options):
        self.client = client
        self.log = client.log.getChild("openqq")
        self.opts = self.prepare_options(options)
        try:
            self.entries = listen_entries(self.opts["listen"], self.opts)
        except ValueError as e:
            raise ValueError("openqq: %s" % e)
        check_protected(self.entries, self.opts["access_token"], self.opts["auth"],
                        self.opts["allow_insecure"])
        self.guard = Guard(self.opts["access_token"], self.opts["auth"], self.opts["allow_origin"], self.log)
        self.hub = EventHub(self.opts["check_event_list_max_size"], self.opts["check_event_history_size"])
        self.events = frozenset(self.opts["post_event_list"]) if self.opts["post_event"] else frozenset()
        self.reporter = Reporter(client, self.log, self.opts["post_api"], self.opts) \
            if self.opts["post_api"] else None
        self.poller = Poller(self, self.opts["poll_api"], "openqq-poll") if self.opts["poll_api"] else None
        self.api = Api(self)
        self.servers = []
        self.mounts = []  # (path prefix, handler) pairs of other plugins: mount()
        self.threads = set()
        self.waiters = set()
        self.stopped = threading.Event()
        self.stop_lock = threading.Lock()
        self.stdout_lock = threading.Lock()

    def prepare_options(self, options):
        """The options (every one of OPTIONS: Client.load read them) as the plugin uses them; ValueError
        for a mistake."""
        opts = dict(options)
        for name in ("allow_insecure", "post_event", "post_stdout"):
            opts[name] = to_bool(opts[name])
        for name in ("request_timeout", "post_timeout", "post_retry_backoff", "check_event_timeout",
                     "poll_interval", "poll_timeout", "stop_delay"):
            try:
                opts[name] = float(opts[name])
            except (TypeError, ValueError):
                raise ValueError("openqq: option %s must be a number of seconds" % name)
        for name in ("max_body_size", "max_connections", "post_retries", "post_queue_size",
                     "post_workers", "check_event_list_max_size", "check_event_history_size"):
            value = to_int(opts[name])
            if value is None or value < 0:
                raise ValueError("openqq: option %s must be a whole number" % name)
            opts[name] = value
        opts["check_event_list_max_size"] = opts["check_event_list_max_size"] or 20   # as the original
        opts["poll_interval"] = opts["poll_interval"] or 5
        opts["post_workers"] = max(1, opts["post_workers"])
        opts["post_queue_size"] = max(1, opts["post_queue_size"])
        opts["post_event_list"] = to_list(opts["post_event_list"])
        opts["allow_origin"] = to_list(opts["allow_origin"])
        for name in ("access_token", "post_secret", "post_api", "poll_api"):
            opts[name] = str(opts[name]) if opts[name] not in (None, "") else None
        if opts["auth"] is not None and not callable(opts["auth"]):
            raise ValueError("openqq: option auth must be a function(params, request)")
        return opts

    def start(self):
        self.servers = serve(Server, self.entries, self.api, self.log, self.opts, parking=True)
        self.hub.listeners.extend(server.notice for server in self.servers)
        if self.reporter is not None:
            self.reporter.start()
        if self.poller is not None:
            self.poller.start()
        self.client.on("all_event", self.on_event)
        self.log.info("openqq listening on %s", ", ".join(s.url for s in self.servers))
        return self

    def mount(self, prefix, handler):
        """Serve the paths under prefix with handler(req), behind the same token and cross-site rules.

        handler returns a Response or JSON-able data, or raises ApiError; it runs on the connection's thread.
        """
        self.mounts.append((prefix, handler))

    @property
    def urls(self):
        return [server.url for server in self.servers]

    # -- reports -------------------------------------------------------------------

    def on_event(self, name, *args):
        """Every client event: messages always reported and queued, other events as listed."""
        if name in ("receive_message", "send_message"):
            msg = args[0]
            if msg.type not in MESSAGE_TYPES:
                return
            payload = dict(msg.to_json(), post_type=name)
            self.hub.put(payload)
            self.report(payload, msg)
        elif name in self.events:
            if name == "input_qrcode":
                params = [args[0], base64.encodebytes(args[1]).decode("ascii")]
            else:
                params = jsonable(list(args))
            payload = {"post_type": "event", "event": name, "params": params}
            if name.startswith(("new_", "lose_")) or name.endswith("_property_change"):
                self.hub.put(payload)
            self.report(payload)

    def report(self, payload, msg=None):
        if self.opts["post_stdout"]:
            with self.stdout_lock:
                try:
                    sys.stdout.write(json_dumps(payload) + "\n")
                    sys.stdout.flush()
                except (OSError, ValueError):
                    pass
        if self.reporter is not None:
            self.reporter.submit(payload, msg)

    def counters(self):
        """The figures get_client_info adds: post_api_* and check_event_dropped."""
        figures = {"check_event_dropped": self.hub.dropped}
        if self.reporter is not None:
            counts = self.reporter.counters()
            figures.update(("post_api_" + k, v) for k, v in counts.items())
        return figures

    # -- helpers for the routes and the poller --------------------------------------------

    def waiter(self):
        """An Event a sync send waits on; stop() sets them all."""
        done = threading.Event()
        self.waiters.add(done)
        if self.stopped.is_set():
            done.set()
        return done

    def later(self, name, delay, action):
        """Run action on its own thread after delay seconds, unless the plugin stops first."""
        def run():
            try:
                if not self.stopped.wait(delay):
                    action()
            finally:
                self.threads.discard(threading.current_thread())
        t = self.client.thread(name, run)
        self.threads.add(t)
        t.start()

    def owns(self, url):
        """True when url points into this plugin's /openqq/ API."""
        return points_into(url, self.servers)

    def polling(self):
        """poll_api is polled while the client is logged in."""
        return self.client.state == "running"

    def stop(self):
        """End every thread of the plugin; returns when they have ended."""
        with self.stop_lock:
            if self.stopped.is_set():
                return
            self.stopped.set()
        self.client.off("all_event", self.on_event)
        self.hub.close()
        for done in list(self.waiters):
            done.set()
        for server in self.servers:
            server.close()
        if self.poller is not None:
            self.poller.stop()
        if self.reporter is not None:
            self.reporter.stop(self.opts["post_timeout"])
        for t in list(self.threads):
            if t is not threading.current_thread():
                t.join()
        self.log.debug("openqq stopped")


def call(client, **options):
    """The plugin entry point: start the Openqq API for client; returns the plugin (it has stop())."""
    return Openqq(client, options).start()
