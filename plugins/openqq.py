# -*- coding: utf-8 -*-
"""openqq: the Openqq HTTP API of Mojo-Webqq, with check_event, post_api and poll_api.

    client.load("openqq", listen=[{"host": "127.0.0.1", "port": 5000}],
                post_api="http://127.0.0.1:8000/post", access_token="s3cret")

Every route of the original answers with the original's JSON (key sets, types, codes, status
strings); docs/openqq.md lists the options, the routes and where we deliberately differ.

 1. Constants     options and their defaults, which parameters are whose
 2. Store         the post_api outbox and the check_event history in an SQLite file (or memory)
 3. Event hub     check_event: bounded queue drained whole, long-poll, cursor mode
 4. Reporter      post_api: worker threads, bounded queue, retries, signature, reply/shutup
 5. Routes        Api: the Openqq routes against the Client contract
 6. Plugin        Openqq (the object call() returns) and call(client, **options)

The HTTP machinery (servers, requests, the guard, parked long-polls, poll_api) is webqq.py's
section "HTTP API", shared with the console, the controller and OneBot's event receiver.
"""

import base64
import bisect
import collections
import hashlib
import hmac
import itertools
import json
import os
import re
import stat
import sys
import threading
import time
from urllib.request import pathname2url

try:
    import sqlite3
except ImportError:         # a Python built without it: memory only, said once
    sqlite3 = None

import webqq
from webqq import (NOT_FOUND, NOT_RUNNING, OWN_AGENT, ApiError, ApiServer, Guard, Http, Message, Poller, Response,
                   TransportError, bad_request, check_listen, check_protected, check_url, json_dumps, listen_entries,
                   non_negative, one_of, points_into, redact_url, serve, to_bool, to_int, to_list, whole)

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
    ("allow_insecure", (False, "start on a non-loopback address without a token (not recommended)", to_bool)),
    ("allow_origin", ((), "browser origins allowed to call the API cross-site (* for any)")),
    ("tls_cert", (None, "TLS certificate file for every listen entry")),
    ("tls_key", (None, "TLS private key file")),
    ("tls_ca", (None, "CA file: with it, client certificates are required")),
    ("tls_ciphers", (None, "OpenSSL cipher list for TLS")),
    ("request_timeout", (ApiServer.request_timeout,
                         "seconds a request may take to arrive whole, and an idle connection may stay open",
                         non_negative)),
    ("max_body_size", (ApiServer.max_body_size, "largest request body, in bytes", whole())),
    ("max_connections", (ApiServer.max_connections, "open connections per listen address", whole())),
    ("post_api", (None, "URL that every message and listed event is POSTed to as JSON", check_url)),
    ("post_event", (True, "false: report messages only, no events", to_bool)),
    ("post_event_list", (DEFAULT_EVENTS, "events to report (comma-separated)")),
    ("post_stdout", (False, "also print every report as one JSON line on standard output", to_bool)),
    ("post_secret", (None, "sign reports: X-Signature: sha1=<HMAC-SHA1 of the body with this key>")),
    ("post_timeout", (5, "seconds to wait for one post_api answer", non_negative)),
    ("post_retries", (None, "retries of a report after a connection error or HTTP 502/503/504 (default: until it "
                            "is delivered or older than post_max_age)", whole())),
    ("post_retry_backoff", (1.0, "first retry delay in seconds; it doubles each time, up to 30", non_negative)),
    ("post_queue_size", (10000, "reports waiting for delivery at most (the oldest is dropped beyond, logged and "
                                "counted)", whole())),
    ("post_max_age", (86400, "seconds a report may wait for delivery; older ones are dropped (logged and counted)",
                      non_negative)),
    ("post_workers", (4, "delivery threads", whole())),
    ("post_media_data", (True, "accepted and ignored, as in the original", to_bool)),
    ("check_event_list_max_size", (20, "events check_event keeps (the oldest is dropped beyond)", whole())),
    ("check_event_timeout", (30, "seconds a check_event long poll waits before answering []", non_negative)),
    ("check_event_history_size", (1000, "events kept for cursor readers", whole())),
    ("check_event_history_age", (86400, "seconds an event is kept for cursor readers across a restart",
                                 non_negative)),
    ("store", ("sqlite", "sqlite: keep undelivered reports and the cursor history in a file, across crashes and "
                         "restarts; memory: only in memory", one_of("sqlite", "memory"))),
    ("store_path", (None, "the store file (default: tmpdir/mojo_webqq_store_<account>.sqlite3)")),
    ("store_fsync", (False, "make each report reach the disk before it counts (survives a power cut; slower)",
                     to_bool)),
    ("poll_api", (None, "URL to GET forever while the client runs (reverse calls)", check_url)),
    ("poll_interval", (5, "seconds between two poll_api requests", non_negative)),
    ("poll_timeout", (120, "seconds to wait for one poll_api answer", non_negative)),
    ("stop_delay", (3, "seconds between the answer of stop_client / relogin and the action", non_negative)),
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
# 2. Store
###############################################################################

STORE_VERSION = 1
STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL,
                                   lane TEXT NOT NULL, post_type TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS history (seq INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL,
                                    key TEXT, body BLOB NOT NULL);
"""
STORE_TRIM_EVERY = 100          # history rows added between two trims of the file's history
OPEN_STORES = set()             # the store files this process holds, under OPEN_STORES_LOCK
OPEN_STORES_LOCK = threading.Lock()


def store_trouble(error):
    """What an SQLite or OS error means for a store file, in a user's words."""
    text = str(error)
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        return "locked by another program (%s), perhaps another webqq of this account" % text
    if "readonly" in lowered or "read-only" in lowered:
        return "read-only (%s)" % text
    if "full" in lowered or getattr(error, "errno", None) == 28:
        return "the disk is full (%s)" % text
    if "i/o error" in lowered:
        return "the disk refused a write (%s): it may be full or failing" % text
    if "not a database" in lowered or "malformed" in lowered or "damaged" in lowered:
        return "damaged (%s): move it away or delete it, and webqq starts a new one" % text
    return text


class Store(object):
    """What outlives the process: the post_api outbox and the check_event history, numbered, in an
    SQLite file (WAL), or in memory only (path None, or after a failure).

    One connection, made with check_same_thread=False and used only under self.lock by whichever
    thread calls: the thread that emits an event adds it (with the deletes of the reports answered
    meanwhile, in one transaction), a post_api worker with nothing left to do writes those deletes
    itself (flush). The connection holds the file's lock from open to close (locking_mode EXCLUSIVE, no
    shared memory: the same on Windows), so a second process of the account finds it locked. Any
    error: one message, then memory only (durable False, failures counted).

    Numbers (history seqs, report ids) go up across restarts: each run goes on from the larger of
    the file's last number and the time in milliseconds, so neither a cursor nor a report id of an
    earlier run, even one whose file is gone, is ever given to another event.
    """

    def __init__(self, path, log, fsync=False, key_limit=1000):
        self.path = os.path.abspath(path) if path else None
        self.log = log
        self.lock = threading.Lock()
        self.db = None
        self.failures = 0
        self.answered = []          # ids of reports answered but still in the file, under answered_lock
        self.answered_lock = threading.Lock()
        self.keys = collections.OrderedDict()     # keys of the latest received messages: see add()
        self.key_limit = max(1, key_limit)
        self.added = 0
        self.history_size = self.history_age = None
        last_seq = last_report = 0
        if self.path is not None:
            last_seq, last_report = self._open(fsync)
        base = int(time.time() * 1000)
        self.last_seq, self.last_report = max(last_seq, base), max(last_report, base)

    @property
    def durable(self):
        return self.db is not None

    def _open(self, fsync):
        """Open the file (created with mode 0600): its last history seq and report id; (0, 0) and memory
        only when it can't be used."""
        if sqlite3 is None:
            self._unusable("this Python has no sqlite3 module")
            return 0, 0
        with OPEN_STORES_LOCK:
            if self.path in OPEN_STORES:
                self._unusable("another openqq plugin of this process uses it")
                return 0, 0
            OPEN_STORES.add(self.path)
        try:
            db = self._connect()
        except (OSError, sqlite3.Error) as e:
            self._release()
            self._unusable(store_trouble(e))
            return 0, 0
        try:
            db.execute("PRAGMA synchronous=%s" % ("FULL" if fsync else "NORMAL"))
            db.execute("PRAGMA journal_size_limit=1048576")
            last = dict(db.execute("SELECT name, seq FROM sqlite_sequence"))
        except sqlite3.Error as e:
            db.close()
            self._release()
            self._unusable(store_trouble(e))
            return 0, 0
        self.db = db
        return last.get("history", 0), last.get("outbox", 0)

    def _connect(self):
        """A checked connection to the file: WAL, the schema, our version; raises what went wrong."""
        if not os.path.exists(self.path):
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        mode = os.stat(self.path).st_mode
        if os.name != "nt" and mode & 0o077:
            os.chmod(self.path, 0o600)
        # A file its owner made read-only is not written, even by root, who could.
        access = "rw" if mode & stat.S_IWUSR else "ro"
        db = sqlite3.connect("file:%s?mode=%s" % (pathname2url(self.path), access), uri=True, timeout=1.0,
                             isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            # Small pages for rows of half a kilobyte: a third of the bytes written per report of 4 kB pages.
            db.execute("PRAGMA page_size=1024")
            journal = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if access == "ro":
                raise sqlite3.OperationalError("attempt to write a readonly database")
            if str(journal).lower() != "wal":
                raise sqlite3.OperationalError("cannot use a write-ahead log (journal mode %s)" % journal)
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError("damaged: %s" % check)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > STORE_VERSION:
                raise sqlite3.DatabaseError("made by a newer webqq (version %d)" % version)
            db.executescript(STORE_SCHEMA)
            db.execute("PRAGMA user_version=%d" % STORE_VERSION)
        except BaseException:
            db.close()
            raise
        return db

    def _release(self):
        with OPEN_STORES_LOCK:
            OPEN_STORES.discard(self.path)

    def _unusable(self, why):
        self.failures += 1
        self.log.error("store %s cannot be used: %s. Reports and the check_event history are kept in memory "
                       "only: what is not delivered when webqq stops is lost", self.path, why)

    def _failed(self, error):
        """A write failed: say it once, close the file, go on in memory."""
        self.failures += 1
        self.log.error("store %s failed: %s. From now on reports and the check_event history are kept in memory "
                       "only: what is not delivered when webqq stops is lost", self.path, store_trouble(error))
        self._close_db()

    def _close_db(self):
        db, self.db = self.db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass
            self._release()

    def _run(self, statements):
        """Run [(sql, args)] in one transaction, unless memory only; a failure ends the file's use."""
        if self.db is None:
            return
        if not statements:
            return
        try:
            if len(statements) > 1:
                self.db.execute("BEGIN")
            for sql, args in statements:
                self.db.execute(sql, args)
            if len(statements) > 1:
                self.db.execute("COMMIT")
        except sqlite3.Error as e:
            if self.db.in_transaction:
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            self._failed(e)

    # -- what the plugin calls ---------------------------------------------------------

    def add(self, body, history=False, lane=None, post_type=None, key=None):
        """Number one accepted event and keep it: (history seq, report id), each None when not asked for
        (history: for check_event; lane: a post_api report of that conversation). None when key names a
        received message among the latest ones: an upstream delivering it again after a restart."""
        with self.lock:
            if key is not None:
                if key in self.keys:
                    return None
                self.keys[key] = True
                if len(self.keys) > self.key_limit:
                    self.keys.popitem(last=False)
            now = time.time()
            seq = report = None
            statements = self._deletes()
            if history:
                self.last_seq = seq = self.last_seq + 1
                statements.append(("INSERT INTO history (seq, created, key, body) VALUES (?, ?, ?, ?)",
                                   (seq, now, key, body)))
            if lane is not None:
                self.last_report = report = self.last_report + 1
                statements.append(("INSERT INTO outbox (id, created, lane, post_type, body) VALUES (?, ?, ?, ?, ?)",
                                   (report, now, lane, post_type, body)))
            self._run(statements)
            if history and self.history_size is not None:
                self.added += 1
                if self.added % STORE_TRIM_EVERY == 0:
                    self._trim_history()
            return seq, report

    def remove(self, *report_ids):
        """Forget reports now: dropped or expired."""
        with self.lock:
            self._run([("DELETE FROM outbox WHERE id = ?", (report_id,)) for report_id in report_ids])

    def answer(self, report_id):
        """Forget a report the receiver answered: with the next add() or flush(), so that a post_api worker
        never waits for the file (a crash before then sends it again, under the same id)."""
        with self.answered_lock:
            self.answered.append(report_id)

    def flush(self):
        """Write the deletes of the reports answered since the last add()."""
        with self.lock:
            self._run(self._deletes())

    def _deletes(self):
        with self.answered_lock:
            ids, self.answered = self.answered, []
        return [("DELETE FROM outbox WHERE id = ?", (report_id,)) for report_id in ids]

    def outbox(self):
        """Every report kept, oldest first: (id, created, lane, post_type, body)."""
        with self.lock:
            return self._rows("SELECT id, created, lane, post_type, body FROM outbox ORDER BY id")

    def history(self, size, age):
        """The newest `size` history events of the last `age` seconds, oldest first: (seq, created, key, body);
        they bound the file's history from now on."""
        with self.lock:
            self.history_size, self.history_age = size, age
            self._trim_history()
            rows = self._rows("SELECT seq, created, key, body FROM history ORDER BY seq DESC LIMIT ?", (size,))
            rows.reverse()
            for row in rows[-self.key_limit:]:
                if row[2] is not None:
                    self.keys[row[2]] = True
            return rows

    def _rows(self, sql, args=()):
        if self.db is None:
            return []
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            self._failed(e)
            return []

    def _trim_history(self):
        self._run([("DELETE FROM history WHERE created < ? OR seq <= "
                    "(SELECT seq FROM history ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                    (time.time() - self.history_age, self.history_size))])

    def close(self):
        with self.lock:
            self._run(self._deletes())
            self._close_db()


###############################################################################
# 3. Event hub
###############################################################################


class SeqView(object):
    """The numbers of a history of (seq, item) pairs, for bisect."""

    __slots__ = ("history",)

    def __init__(self, history):
        self.history = history

    def __len__(self):
        return len(self.history)

    def __getitem__(self, index):
        return self.history[index][0]


class EventHub(object):
    """check_event's queue, bounded and drained whole, plus a numbered history for cursor readers.

    The numbers go up and are unique across restarts (the Store gives them), with a gap where a run
    begins; seq is the newest one given."""

    def __init__(self, max_size, history_size):
        self.max_size = max_size
        self.cond = threading.Condition()
        self.queue = collections.deque()
        self.history = collections.deque(maxlen=max(history_size, max_size))
        self.seq = 0
        self.jump = None            # (the last number before this run's, its first): no event between
        self.dropped = 0
        self.closed = False
        self.listeners = []         # called after every change (the parkers' wake-ups)

    def restore(self, pairs):
        """Begin with the history an earlier run kept: (seq, item) pairs, oldest first."""
        with self.cond:
            self.history.extend(pairs)
            if self.history:
                self.seq = self.history[-1][0]

    def put(self, item, seq=None):
        """Queue item, numbered seq (default: the next number)."""
        with self.cond:
            seq = self.seq + 1 if seq is None else seq
            if seq != self.seq + 1:
                self.jump = (self.seq, seq)     # where this run's numbers begin
            self.seq = seq
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

    def successor(self, cursor):
        """The number of the event that follows cursor when none was lost in between: cursor + 1, or
        this run's first number for the last one before it (the restored history's last, or 0)."""
        with self.cond:
            return self.jump[1] if self.jump is not None and cursor == self.jump[0] else cursor + 1

    def _start(self, cursor):
        """Where a read from cursor begins. A cursor ahead of every number given (made up, or from a
        clock set back) starts over; one of an earlier run is below this run's numbers, so it gets
        every event kept after it."""
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
            start = bisect.bisect_right(SeqView(self.history), cursor)
            return list(itertools.islice(self.history, start, None))

    def close(self):
        """Wake every waiting poller; they answer at once from now on."""
        with self.cond:
            self.closed = True
            self._changed()


###############################################################################
# 4. Reporter
###############################################################################

REPORT_ID_HEADER = "X-Webqq-Report-Id"
RETRY_DELAY_MAX = 30            # seconds: the longest wait between two attempts of a report
SUMMARY_EVERY = 60.0            # seconds between two log lines of a post_api outage
NAMED_AT_MOST = 10              # reports a log line names one by one

Report = collections.namedtuple("Report", "id body post_type msg created lane")
Report.__doc__ = """One post_api report: its stable id, JSON body and post_type, its Message (None for an
event, or a report kept across a restart), when it was accepted (time.time()), its conversation."""


def lane_of(payload):
    """A report's conversation: the reports of one are delivered in order, by one worker."""
    if payload.get("post_type") not in ("receive_message", "send_message"):
        return "event"
    other = payload.get("sender_id") if payload.get("class") == "recv" else payload.get("receiver_id")
    return str(payload.get("group_id") or payload.get("discuss_id") or other)


def describe(report):
    """A report as log lines name it: its post_type and message id, or "event" and the event."""
    if report.msg is not None:
        return "%s %s" % (report.post_type, report.msg.id)
    data = json.loads(report.body.decode("utf-8"))
    if report.post_type in ("receive_message", "send_message"):
        return "%s %s" % (report.post_type, data.get("id"))
    return "event %s" % data.get("event")


def describe_all(reports):
    """The first NAMED_AT_MOST reports named, and how many more."""
    names = ", ".join(describe(r) for r in reports[:NAMED_AT_MOST])
    return names + (" and %d more" % (len(reports) - NAMED_AT_MOST) if len(reports) > NAMED_AT_MOST else "")


def restored_message(contacts, data):
    """The Message of a report kept across a restart, found again among the contacts by id, for a
    reply or a shutup; None when its conversation is gone."""
    kind, cls = data.get("type"), data.get("class")
    group, discuss = contacts.group(data.get("group_id")), contacts.discuss(data.get("discuss_id"))
    other_id = data.get("sender_id") if cls == "recv" else data.get("receiver_id")
    if kind == "friend_message":
        other = contacts.friend(other_id)
    elif group is not None or discuss is not None:
        search = contacts.search_group_member if group is not None else contacts.search_discuss_member
        other = next(iter(search(group or discuss, id=other_id)), None) if other_id is not None else None
    else:
        return None
    if other is None and kind in ("friend_message", "sess_message"):
        return None
    return Message(id=data.get("id"), type=kind, cls=cls, group=group, discuss=discuss,
                   sender=other if cls == "recv" else None, receiver=other if cls == "send" else None)


def seconds_text(seconds):
    """A duration as a log line says it: 45 s, 12 min, 3 h."""
    if seconds < 120:
        return "%d s" % seconds
    if seconds < 7200:
        return "%d min" % (seconds // 60)
    return "%d h" % (seconds // 3600)


class Outage(object):
    """post_api failures as the log tells them: the first one at once with the retry plan, then a
    summary at most once every `every` seconds, and the recovery."""

    def __init__(self, log, url, every=SUMMARY_EVERY):
        self.log, self.url, self.every = log, redact_url(url), every
        self.lock = threading.Lock()
        self.since = None           # time.monotonic() of the first failure, None while all is well
        self.said = 0.0             # when the last line was logged
        self.failures = self.given_up = 0       # since the last line
        self.total = 0                          # since the first failure

    def failed(self, error, plan, waiting, given_up=False):
        """One attempt failed with error; plan says what happens to its report."""
        with self.lock:
            now = time.monotonic()
            self.total += 1
            if self.since is None:
                self.since, self.said = now, now
                self.log.warning("post_api failed: %s; %s", error, plan)
                return
            self.failures += 1
            self.given_up += given_up
            if now - self.said >= self.every:
                self.log.warning("post_api still failing after %s: %d attempt(s) failed in the last %s (last: %s), "
                                 "%d report(s) given up; %d report(s) waiting", seconds_text(now - self.since),
                                 self.failures, seconds_text(now - self.said), error, self.given_up, waiting)
                self.said, self.failures, self.given_up = now, 0, 0

    def recovered(self, waiting):
        """An attempt was answered with 2xx."""
        if self.since is None:
            return
        with self.lock:
            if self.since is not None:
                self.log.info("post_api %s answers again after %s: %d attempt(s) had failed; %d report(s) waiting",
                              self.url, seconds_text(time.monotonic() - self.since), self.total, waiting)
                self.since, self.total, self.failures, self.given_up = None, 0, 0, 0


class Reporter(object):
    """post_api delivery: a queue per worker keyed by conversation, retries, signature, counters.

    Every queued report is in the store too (when it is durable) until the receiver answers it, it is
    dropped or it expires; whatever is queued at stop stays there for the next start."""

    def __init__(self, client, log, url, opts, store):
        self.client = client
        self.log = log
        self.url = url
        self.store = store
        self.secret = opts["post_secret"].encode("utf-8") if opts["post_secret"] else None
        self.timeout = opts["post_timeout"]
        self.retries = opts["post_retries"]
        self.backoff = opts["post_retry_backoff"]
        self.capacity = opts["post_queue_size"]
        self.max_age = opts["post_max_age"]
        self.http = Http(log=log, user_agent=OWN_AGENT)
        self.outage = Outage(log, url)
        self.lock = threading.Lock()
        self.queues = [collections.deque() for _ in range(opts["post_workers"])]
        self.conds = [threading.Condition(self.lock) for _ in self.queues]
        self.pending = 0
        self.stopping = threading.Event()
        self.deadline = None
        self.counts = {"sent": 0, "retried": 0, "dropped": 0, "failed": 0, "expired": 0}
        self.threads = [client.thread("openqq-post-%d" % i, self._work, i) for i in range(len(self.queues))]

    def restore(self, rows):
        """Queue the reports an earlier run left in the store, (id, created, lane, post_type, body) oldest
        first, before any new one (before start()); beyond post_queue_size the oldest are dropped."""
        reports = [Report(report_id, body, post_type, None, created, lane)
                   for report_id, created, lane, post_type, body in rows]
        excess, reports = reports[:-self.capacity], reports[-self.capacity:]
        if excess:
            self.store.remove(*(r.id for r in excess))
            with self.lock:
                self.counts["dropped"] += len(excess)
            self.log.warning("post_api: %d undelivered report(s) of an earlier run beyond post_queue_size (%d) "
                             "dropped: %s", len(excess), self.capacity, describe_all(excess))
        for report in reports:
            self.submit(report)
        if reports:
            self.log.info("post_api: %d undelivered report(s) of an earlier run go out first", len(reports))

    def start(self):
        for t in self.threads:
            t.start()

    def submit(self, report):
        """Queue one report; the oldest waiting report makes room when the queue is full."""
        index = hash(report.lane) % len(self.queues)
        with self.lock:
            if self.stopping.is_set():
                if not self.store.durable:
                    self.counts["dropped"] += 1
                return
            lost = None
            if self.pending >= self.capacity:
                lost = max(self.queues, key=len).popleft()
                self.pending -= 1
                self.counts["dropped"] += 1
            self.queues[index].append(report)
            self.pending += 1
            self.conds[index].notify()
        if lost is not None:
            self.store.remove(lost.id)
            self.log.warning("post_api queue full (%d): dropped report %s", self.capacity, describe(lost))

    def counters(self):
        with self.lock:
            return dict(self.counts, queued=self.pending)

    def _work(self, index):
        queue, cond = self.queues[index], self.conds[index]
        while True:
            if not queue:
                self.store.flush()      # nothing to send: what was answered leaves the file now
            with self.lock:
                while not queue and not self.stopping.is_set():
                    cond.wait()
                if not queue or (self.deadline and time.monotonic() > self.deadline):
                    return              # stop() tells what becomes of the rest
                report = queue.popleft()
                self.pending -= 1
                expired = []
                oldest = time.time() - self.max_age
                while report is not None and report.created < oldest:
                    expired.append(report)
                    report = queue.popleft() if queue else None
                    self.pending -= report is not None
            if expired:
                self._expire(expired)
            if report is None:
                continue
            try:
                done = self._deliver(report)
            except Exception:
                self.log.exception("post_api report failed")
                done = True
            if not done:
                with self.lock:
                    queue.appendleft(report)
                    self.pending += 1
                return

    def _deliver(self, report):
        """POST report until it is answered or given up: True; False when the plugin stops while the
        receiver can't be reached (the report stays queued)."""
        headers = {"Content-Type": "application/json", REPORT_ID_HEADER: str(report.id)}
        if self.secret is not None:
            headers["X-Signature"] = "sha1=" + hmac.new(self.secret, report.body, hashlib.sha1).hexdigest()
        attempt = 0
        while True:
            try:
                res = self.http.request("POST", self.url, data=report.body, headers=headers,
                                        timeout=self.timeout, follow=False)
                status, again = res.status, res.status in (502, 503, 504)
                error = "POST %s: HTTP %d" % (self.outage.url, status)
            except TransportError as e:
                status, error, again = None, str(e), not e.timed_out
            if status is not None and 200 <= status < 300:
                self.store.answer(report.id)
                with self.lock:
                    self.counts["sent"] += 1
                self.outage.recovered(self.pending)
                self._use_answer(report, res.headers.get("content-type", ""), res.body)
                return True
            if again and self.stopping.is_set():
                return False
            if again and time.time() - report.created > self.max_age:
                self._expire([report], error)
                return True
            if not again or (self.retries is not None and attempt >= self.retries):
                self.store.answer(report.id)
                with self.lock:
                    self.counts["failed"] += 1
                self.outage.failed(error, self._given_up(report, status, again, attempt), self.pending, given_up=True)
                return True
            delay = min(self.backoff * 2 ** min(attempt, 16), RETRY_DELAY_MAX)
            attempt += 1
            with self.lock:
                self.counts["retried"] += 1
            self.outage.failed(error, "report %s is retried in %g s, then after delays doubling up to %d s, %s" % (
                describe(report), delay, RETRY_DELAY_MAX,
                "until it is answered or older than post_max_age (%s)" % seconds_text(self.max_age)
                if self.retries is None else "%d time(s) at most" % self.retries), self.pending)
            self.log.debug("post_api %s, retry %d of report %s in %g s", error, attempt, report.id, delay)
            if self.stopping.wait(delay):
                return False

    def _expire(self, reports, error=None):
        """Forget reports older than post_max_age, undelivered: counted, and named in the log."""
        self.store.remove(*(r.id for r in reports))
        with self.lock:
            self.counts["expired"] += len(reports)
        self.log.warning("post_api: %d report(s) older than post_max_age (%s) dropped undelivered%s: %s",
                         len(reports), seconds_text(self.max_age), " (%s)" % error if error else "",
                         describe_all(reports))

    def _given_up(self, report, status, again, attempt):
        """Why a report is not tried again, for the log."""
        if again:
            return "report %s given up after %d retries (post_retries)" % (describe(report), attempt)
        if status is None:
            return "report %s given up: a timeout is not retried (the receiver may have acted on it)" % describe(report)
        return "report %s given up: HTTP %d is an answer, not retried" % (describe(report), status)

    def _use_answer(self, report, content_type, body):
        """A 2xx JSON answer to a message report: reply to it, shut the group sender up."""
        if report.post_type not in ("receive_message", "send_message") \
                or not re.search("text/json|application/json", content_type, re.I):
            return
        try:
            answer = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self.log.warning("post_api answered invalid JSON; ignored")
            return
        if not isinstance(answer, dict):
            return
        reply = answer.get("reply")
        if report.post_type == "send_message" and answer.get("format", "text") != "text":
            return
        if isinstance(reply, (int, float)) and not isinstance(reply, bool):
            reply = str(reply)
        shutup = report.post_type == "receive_message" and _number(answer.get("shutup")) == 1
        if reply is None and not shutup:
            return
        msg = report.msg or self._restored(report)
        if msg is None:
            if not self.stopping.is_set():
                self.log.warning("post_api answer to report %s ignored: its conversation is gone", describe(report))
            return
        if reply == "" or (reply is not None and not isinstance(reply, str)):
            self.log.warning("post_api reply must be non-empty text; ignored")
        elif reply is not None:
            self.client.reply_message(msg, reply)
        if shutup and msg.type == "group_message":
            seconds = int(_number(answer.get("shutup_time")) or 60)
            if not self.client.shutup_group_member(msg.group, [msg.sender], seconds):
                self.log.warning("post_api shutup of %s failed", getattr(msg.sender, "id", "?"))

    def _restored(self, report):
        """The Message of a report an earlier run kept, once the contacts are loaded; None when its
        conversation is gone, or the plugin stops first."""
        while not self.client.wait_for_state("running", "stop", timeout=0.5):
            if self.stopping.is_set():
                return None
        return restored_message(self.client.contacts, json.loads(report.body.decode("utf-8")))

    def stop(self, drain):
        """Deliver what is queued for up to drain seconds (no more retries), then end the workers; what
        is left stays in a durable store, or is dropped."""
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
        with self.lock:
            left = [report for queue in self.queues for report in queue]
            for queue in self.queues:
                queue.clear()
            self.pending = 0
            if not self.store.durable:
                self.counts["dropped"] += len(left)
        left.sort(key=lambda r: r.id)
        if left and self.store.durable:
            self.log.info("post_api stopped: %d undelivered report(s) stay in the store for the next start",
                          len(left))
        elif left:
            self.log.warning("post_api stopped: dropped %d undelivered report(s): %s", len(left), describe_all(left))


def _number(value):
    """A JSON value compared as a number, the way Perl's == does; None when it is no number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


###############################################################################
# 5. Routes
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
    fell out of the history, or a restart lost it: see EventHub.successor)."""

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
        reset = b"" if pairs[0][0] == self.hub.successor(self.cursor) else sse_block(
            "reset", begin, {"asked": self.cursor, "cursor": begin})
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
        history: a thousand readers at one cursor ask for the same bytes. The history only grows at its
        end and its numbers are unique, so the first and last seq read (with the filter) fix the events."""
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
# 6. Plugin
###############################################################################


class Server(ApiServer):
    """One listen address of the Openqq API (threads openqq-<port>, openqq-conn-<port>, openqq-park-<port>)."""

    name = "openqq"


class Openqq(object):
    """The plugin: owns the store, the servers, the check_event hub, the reporter, the poller; stop()
    ends them."""

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
        self.store = Store(self.store_path(), self.log, self.opts["store_fsync"],
                           max(self.opts["check_event_history_size"], 1000))
        self.reporter = Reporter(client, self.log, self.opts["post_api"], self.opts, self.store) \
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
        self.accept_lock = threading.Lock()

    def store_path(self):
        """The store file, or None for memory only."""
        if self.opts["store"] == "memory":
            return None
        return self.opts["store_path"] or os.path.join(self.client.tmpdir,
                                                       "mojo_webqq_store_%s.sqlite3" % self.client.account)

    def prepare_options(self, options):
        """The options (every one of OPTIONS: Client.load read and checked them) as the plugin uses them;
        ValueError for a mistake."""
        opts = dict(options)
        opts["post_retries"] = opts["post_retries"] if opts["post_retries"] != "" else None   # until delivered
        opts["check_event_list_max_size"] = opts["check_event_list_max_size"] or 20   # as the original
        opts["poll_interval"] = opts["poll_interval"] or 5
        opts["post_workers"] = max(1, opts["post_workers"])
        opts["post_queue_size"] = max(1, opts["post_queue_size"])
        opts["post_event_list"] = to_list(opts["post_event_list"])
        opts["allow_origin"] = to_list(opts["allow_origin"])
        for name in ("access_token", "post_secret", "post_api", "poll_api", "store_path"):
            opts[name] = str(opts[name]) if opts[name] not in (None, "") else None
        if opts["auth"] is not None and not callable(opts["auth"]):
            raise ValueError("openqq: option auth must be a function(params, request)")
        return opts

    def start(self):
        self.restore()
        try:
            self.servers = serve(Server, self.entries, self.api, self.log, self.opts, parking=True)
        except Exception:
            self.store.close()
            raise
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

    def restore(self):
        """Take up what an earlier run kept: the check_event history, then the undelivered reports."""
        rows = self.store.history(self.opts["check_event_history_size"], self.opts["check_event_history_age"])
        self.hub.restore([(seq, json.loads(body.decode("utf-8"))) for seq, _, _, body in rows])
        outbox = self.store.outbox()
        if self.reporter is not None:
            self.reporter.restore(outbox)
        elif outbox:
            self.store.remove(*(row[0] for row in outbox))
            self.log.warning("post_api is not set: %d undelivered report(s) of an earlier run dropped", len(outbox))

    def on_event(self, name, *args):
        """Every client event: messages always reported and queued, other events as listed."""
        if name in ("receive_message", "send_message"):
            msg = args[0]
            if msg.type not in MESSAGE_TYPES:
                return
            key = "%s %s %s" % (msg.type, msg.id, msg.time) if msg.cls == "recv" and msg.id is not None else None
            self.accept(dict(msg.to_json(), post_type=name), msg, history=True, key=key)
        elif name in self.events:
            if name == "input_qrcode":
                params = [args[0], base64.encodebytes(args[1]).decode("ascii")]
            else:
                params = jsonable(list(args))
            history = name.startswith(("new_", "lose_")) or name.endswith("_property_change")
            self.accept({"post_type": "event", "event": name, "params": params}, history=history)

    def accept(self, payload, msg=None, history=False, key=None):
        """Keep a report (and a check_event event) in the store, then hand it out; one at a time, so the
        numbers are handed out in order and a cursor never passes one that comes later. A received
        message the store has seen (key) is a repeat from the upstream: dropped."""
        if history or self.reporter is not None:
            body = json_dumps(payload).encode("utf-8")
            lane = lane_of(payload) if self.reporter is not None else None
            with self.accept_lock:
                numbers = self.store.add(body, history, lane, payload["post_type"], key)
                if numbers is None:
                    self.log.info("openqq: message %s came again from the upstream (read before a restart); "
                                  "not reported twice", key)
                    return
                seq, report_id = numbers
                if history:
                    self.hub.put(payload, seq)
                if lane is not None:
                    self.reporter.submit(Report(report_id, body, payload["post_type"], msg, time.time(), lane))
        if self.opts["post_stdout"]:
            with self.stdout_lock:
                try:
                    sys.stdout.write(json_dumps(payload) + "\n")
                    sys.stdout.flush()
                except (OSError, ValueError):
                    pass

    def counters(self):
        """The figures get_client_info adds: post_api_*, check_event_dropped, store and store_failures."""
        figures = {"check_event_dropped": self.hub.dropped, "store": "sqlite" if self.store.durable else "memory",
                   "store_failures": self.store.failures}
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
        self.store.close()
        for t in list(self.threads):
            if t is not threading.current_thread():
                t.join()
        self.log.debug("openqq stopped")


def call(client, **options):
    """The plugin entry point: start the Openqq API for client; returns the plugin (it has stop())."""
    return Openqq(client, options).start()
