"""Durable delivery: the store of plugins/openqq.py (the post_api outbox and the check_event history in
an SQLite file), tested the way people run webqq: `python webqq.py -c FILE` in a process of its own,
killed with SIGKILL and started again, against the simulator and a post_api receiver on 127.0.0.1.

    python -m pytest tests/test_store.py -k crash -s        # prints the crash test's counts
"""
import collections
import json
import logging
import os
import random
import re
import signal
import sqlite3
import sys
import threading
import time

import pytest
import requests

import webqq
from conftest import LogLines, Receiver, free_port, wait_until
from smartqq_sim import Simulator
from test_events import Sse
from webqq_plugins import openqq

WORLD = {"friends": 4, "groups": 3, "members": 5, "discusses": 1, "seed": 5}       # 8 conversations
MESSAGES = 1000
KILLS = 5
ID_HEADER = "X-Webqq-Report-Id"


def store_file(folder, account):
    return os.path.join(str(folder), "mojo_webqq_store_%s.sqlite3" % account)


def stored(folder, account, sql):
    """The rows of a query on the store file (closed at once: webqq takes the file for itself)."""
    db = sqlite3.connect(store_file(folder, account))
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def write_config(folder, sim, account, api_port, post_api=None, **openqq_options):
    """A webqq.ini for the simulator and the openqq plugin alone, in folder; its path."""
    options = dict(listen="127.0.0.1:%d" % api_port, check_event_timeout=1, post_retry_backoff=0.05,
                   post_timeout=2, stop_delay=0.2, **openqq_options)
    if post_api:
        options["post_api"] = post_api
    text = ("[webqq]\naccount = %s\ntmpdir = %s\nsmartqq_base = %s\nqrcode_display = none\n"
            "qr_check_interval = 0.1\nsend_interval = 0\nlog_level = info\n\n[openqq]\n" % (account, folder, sim.url))
    text += "".join("%s = %s\n" % item for item in sorted(options.items()))
    path = os.path.join(str(folder), "webqq.ini")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def api(port, route, **params):
    return requests.get("http://127.0.0.1:%d/openqq/%s" % (port, route), params=params, timeout=10)


def conversations(world):
    """(name, inject(text)) of every conversation of the world: friends, groups, the discussion."""
    found = []
    for friend in world.friends:
        found.append(("friend-%s" % friend.uin, lambda text, s=friend.uin: SIM[0].inject_friend_message(s, text)))
    for group in world.groups:
        member = world.others(group)[0].uin
        found.append(("group-%s" % group.gid,
                      lambda text, g=group.gid, m=member: SIM[0].inject_group_message(g, m, text)))
    for discuss in world.discusses:
        member = world.others(discuss)[0].uin
        found.append(("discuss-%s" % discuss.did,
                      lambda text, d=discuss.did, m=member: SIM[0].inject_discuss_message(d, m, text)))
    return found


SIM = [None]        # the simulator the conversations' inject functions use


@pytest.fixture
def sim():
    """A simulator that keeps each poll2 answer until the session polls again (poll_ack), QR scans
    confirmed by themselves."""
    SIM[0] = Simulator(world=WORLD, poll_hold=1.0, auto_scan=0.05, poll_ack=True).start()
    yield SIM[0]
    SIM[0].stop()


def in_order(pairs):
    """True when the numbers of each conversation come ascending: pairs of (conversation, number)."""
    last = {}
    for conversation, number in pairs:
        if number <= last.get(conversation, -1):
            return False
        last[conversation] = number
    return True


def crash_content(report):
    """(conversation, number) of a crash test message, else None."""
    parts = str(report.get("content", "")).split()
    return (parts[1], int(parts[2])) if len(parts) == 3 and parts[0] == "crash" else None


class CursorReader(object):
    """A check_event reader in cursor mode that goes on through webqq's restarts: every event it got,
    in order, with its cursor."""

    def __init__(self, port):
        self.port, self.cursor, self.events = port, 0, []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="test-cursor-reader")
        self.thread.start()

    def run(self):
        while not self.stopping.is_set():
            try:
                answer = api(self.port, "check_event", cursor=self.cursor)
                events = answer.json()
            except (requests.RequestException, ValueError):
                self.stopping.wait(0.05)            # webqq is down: ask again
                continue
            for event in events:
                self.events.append(event)
                self.cursor = event["cursor"]

    def messages(self):
        return [(crash_content(e), e["cursor"]) for e in list(self.events) if crash_content(e)]

    def stop(self):
        self.stopping.set()
        self.thread.join(15)


@pytest.mark.timeout(120)
def test_crash_test_no_report_lost_across_kill_9(sim, tmp_path, launch):
    """The receiver is down; 1,000 messages arrive while webqq is killed with SIGKILL at 5 random moments
    and started again each time; then the receiver comes back. Every message reaches post_api (each
    report id at least once, one id per message, in order per conversation) and a cursor reader of
    check_event (each exactly once, in order)."""
    started = time.time()
    receiver = Receiver()
    receiver.close()                                            # down from the start
    port = free_port()
    config = write_config(tmp_path, sim, "crash", port, post_api=receiver.url)
    program = launch("-c", config)
    program.wait_log(r"\(running\)", 30)
    reader = CursorReader(port)
    chats = conversations(sim.world)
    numbers = collections.Counter()
    sent = []

    def pour():
        for n in range(MESSAGES):
            name, inject = chats[n % len(chats)]
            inject("crash %s %d" % (name, numbers[name]))
            sent.append((name, numbers[name]))
            numbers[name] += 1
            time.sleep(0.006)
    injector = threading.Thread(target=pour, name="test-injector")
    moments = sorted(random.sample(range(50, MESSAGES - 50), KILLS))     # in login, polling, dispatching...
    kills = []
    try:
        injector.start()
        for moment in moments:
            wait_until(lambda: len(sent) >= moment, 30, 0.001)
            kills.append(len(sent))
            program.proc.kill()                                 # SIGKILL (TerminateProcess on Windows)
            program.proc.wait(10)
            program = launch("-c", config)
        injector.join(60)
        program.wait_log(r"\(running\)", 30)
        assert wait_until(lambda: len(reader.messages()) >= MESSAGES, 30), "the cursor reader got %d of %d" % (
            len(reader.messages()), MESSAGES)
        receiver.start()                                        # the receiver comes back
        assert wait_until(lambda: len({crash_content(r) for r in receiver.reports() if crash_content(r)})
                          >= MESSAGES, 45), "post_api got %d of %d" % (
            len({crash_content(r) for r in receiver.reports() if crash_content(r)}), MESSAGES)
        time.sleep(0.3)                                         # a late duplicate would show now
    finally:
        reader.stop()
        receiver.close()
    assert program.stop() == 0

    # post_api: every message, each id at least once, one id per message, in order per conversation
    hits = [(crash_content(h.report), h.headers.get(ID_HEADER)) for h in receiver.hits if h.body]
    hits = [(message, report_id) for message, report_id in hits if message]
    ids = collections.defaultdict(set)
    for message, report_id in hits:
        ids[message].add(report_id)
    missing = set(sent) - set(ids)
    duplicates = len(hits) - len({report_id for _, report_id in hits})
    first = collections.OrderedDict((report_id, message) for message, report_id in reversed(hits))
    arrival = list(reversed(list(first.values())))
    # the cursor reader: every message exactly once, in order
    read = reader.messages()
    cursors = [cursor for _, cursor in read]
    print("\ncrash test: %d messages, %d SIGKILLs (after %s messages), %d restarts; post_api: %d report ids "
          "delivered, %d duplicate deliveries seen, %d missing; check_event cursor reader: %d read, %d duplicates, "
          "%d missing; messages the simulator gave again after a kill, recognised: %d; %.1f s" % (
              len(sent), len(kills), kills, len(kills), len(first), duplicates, len(missing), len(read),
              len(read) - len(set(m for m, _ in read)), len(set(sent) - set(m for m, _ in read)),
              program.log().count("came again from the upstream"), time.time() - started))
    assert len(sent) == MESSAGES and len(kills) == KILLS
    assert not missing
    assert all(len(found) == 1 and None not in found for found in ids.values()), "a message under two ids"
    assert len(first) == MESSAGES and in_order(arrival)
    assert sorted(m for m, _ in read) == sorted(sent) and cursors == sorted(set(cursors)) and in_order(
        [m for m, _ in read])


# -- a restart, in process: what was left goes first, cursors go on ---------------------------------------


def start_openqq(make_client, **options):
    """A client (logged in by itself) with the openqq plugin on 127.0.0.1:0: (client, plugin)."""
    client = make_client()
    plugin = client.load("openqq", **dict(dict(listen=[{"host": "127.0.0.1", "port": 0}], post_retry_backoff=0.05,
                                               post_timeout=2, check_event_timeout=0.5, stop_delay=0.2,
                                               post_event=0), **options))
    client.start()
    assert client.wait_for_state("running", timeout=20)
    return client, plugin


def test_a_restart_sends_what_was_left_first_and_cursors_go_on(sim, tmp_path, make_client):
    def respond(hit):
        return {"reply": "welcome back"} if hit.report and hit.report.get("content") == "before 0" else None
    receiver = Receiver(respond=respond)
    receiver.close()
    try:
        client, plugin = start_openqq(make_client, post_api=receiver.url)
        friend, group = sim.world.friends[0], sim.world.groups[0]
        member = sim.world.others(group)[0]
        for n in range(3):
            sim.inject_friend_message(friend.uin, "before %d" % n)
            sim.inject_group_message(group.gid, member.uin, "in group %d" % n)
        assert wait_until(lambda: len(plugin.hub.history) == 6)
        url = plugin.urls[0]
        first_run = requests.get(url + "/openqq/check_event", params={"cursor": 0}, timeout=10).json()
        client.stop()
        assert stored(tmp_path, "default", "SELECT count(*) FROM outbox") == [(6,)]

        receiver.start()
        client, plugin = start_openqq(make_client, post_api=receiver.url)
        url = plugin.urls[0]
        sim.inject_friend_message(friend.uin, "after")
        assert wait_until(lambda: len(receiver.reports(lambda r: r["post_type"] == "receive_message")) == 7)
        hits = [(h.report["content"], int(h.headers[ID_HEADER])) for h in receiver.hits
                if h.body and h.report["post_type"] == "receive_message"]
        mine = [content for content, _ in hits if not content.startswith("in group")]
        assert mine == ["before 0", "before 1", "before 2", "after"]
        assert [content for content, _ in hits if content.startswith("in group")] == ["in group %d" % n for n in range(3)]
        ids = dict(hits)
        assert sorted(ids.values()) == [ids[e["content"]] for e in first_run] + [ids["after"]]
        assert wait_until(lambda: [s["text"] for s in sim.sent] == ["welcome back"])      # replied after the restart
        assert sim.sent[0]["target"] == friend.uin
        # a cursor of the first run goes on where it was: no event lost, none twice, the same numbers
        resumed = requests.get(url + "/openqq/check_event", params={"cursor": first_run[2]["cursor"]}, timeout=10)
        assert [(e["content"], e["cursor"]) for e in resumed.json()[:3]] == [(e["content"], e["cursor"])
                                                                            for e in first_run[3:]]
        assert [e["content"] for e in resumed.json() if e["post_type"] == "receive_message"] == [
            e["content"] for e in first_run[3:]] + ["after"]
        assert resumed.json()[-1]["cursor"] > first_run[-1]["cursor"]
        # the event stream too: no reset where the second run's numbers begin
        stream = Sse(url, "/openqq/events?cursor=%d" % first_run[-1]["cursor"])
        try:
            assert stream.event()["event"] == "ready"
            following = stream.event()
            assert "event" not in following and following["id"] == str(resumed.json()[3]["cursor"])
        finally:
            stream.close()
        info = requests.get(url + "/openqq/get_client_info", timeout=10).json()
        assert (info["store"], info["store_failures"], info["post_api_queued"]) == ("sqlite", 0, 0)
    finally:
        receiver.close()


def test_what_falls_out_of_the_outbox_is_counted_and_named(sim, tmp_path, make_client):
    receiver = Receiver()
    receiver.close()
    lines = LogLines(logging.WARNING)
    try:
        client, plugin = start_openqq(make_client, post_api=receiver.url, post_queue_size=3, post_max_age=1,
                                      post_workers=1)
        friend = sim.world.friends[1]
        ids = [sim.inject_friend_message(friend.uin, "doomed %d" % n) for n in range(5)]
        assert wait_until(lambda: sum(plugin.reporter.counters()[k] for k in ("dropped", "expired")) == 5, 10)
        counters = plugin.reporter.counters()       # how many are dropped depends on how the polls bring them
        assert counters["dropped"] >= 1 and counters["expired"] >= 1 and (counters["queued"], counters["sent"]) == (0, 0)
        dropped = [line for line in lines.lines if line.startswith("post_api queue full (3): dropped report ")]
        expired = [line for line in lines.lines if "older than post_max_age (1 s) dropped undelivered" in line]
        assert len(dropped) == counters["dropped"]
        named = [int(n) for line in dropped + expired for n in re.findall(r"receive_message (\d+)", line)]
        assert sorted(named) == ids                                             # each one, once
        client.stop()
        assert stored(tmp_path, "default", "SELECT count(*) FROM outbox") == [(0,)]
    finally:
        lines.close()
        receiver.close()


def test_reports_left_beyond_a_smaller_queue_are_dropped_in_one_line(sim, tmp_path, make_client):
    store = openqq.Store(store_file(tmp_path, "default"), logging.getLogger("webqq.test-store"))
    for n in range(5):
        store.add(json.dumps({"post_type": "event", "event": "left %d" % n}).encode(), lane="event", post_type="event")
    store.close()
    receiver = Receiver()
    lines = LogLines(logging.WARNING)
    try:
        client, plugin = start_openqq(make_client, post_api=receiver.url, post_queue_size=2)
        assert wait_until(lambda: len(receiver.reports()) >= 2)
        assert [r["event"] for r in receiver.reports()[:2]] == ["left 3", "left 4"]
        assert [line for line in lines.lines if "beyond post_queue_size" in line] == [
            "post_api: 3 undelivered report(s) of an earlier run beyond post_queue_size (2) dropped: event left 0, "
            "event left 1, event left 2"]
        assert plugin.reporter.counters()["dropped"] == 3
    finally:
        lines.close()
        receiver.close()


def test_store_numbers_grow_and_repeats_are_known_across_a_reopen(tmp_path):
    log = logging.getLogger("webqq.test-store")
    path = str(tmp_path / "store.sqlite3")
    store = openqq.Store(path, log, key_limit=10)
    assert store.durable and oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert store.history(5, 3600) == [] and store.outbox() == []
    numbers = [store.add(b'{"n":%d}' % n, history=True, lane="a", post_type="receive_message", key="k%d" % n)
               for n in range(8)]
    assert store.add(b"{}", history=True, key="k7") is None                 # seen: an upstream's repeat
    seqs, report_ids = [n[0] for n in numbers], [n[1] for n in numbers]
    assert seqs == list(range(seqs[0], seqs[0] + 8)) and seqs[0] >= int(time.time() * 1000) - 60000
    store.remove(*report_ids[:6])
    other = openqq.Store(path, log)
    assert not other.durable and other.failures == 1                        # one plugin of a process has it
    store.close()

    again = openqq.Store(path, log, key_limit=10)
    assert [row[0] for row in again.outbox()] == report_ids[6:]
    assert [(row[0], row[3]) for row in again.history(5, 3600)] == [(seq, b'{"n":%d}' % n)
                                                                     for n, seq in enumerate(seqs)][3:]
    assert again.add(b"{}", history=True, key="k7") is None                 # known from the kept history
    assert again.add(b"{}", key="k0") == (None, None)                       # beyond it: not known
    seq, report_id = again.add(b'{"n":8}', history=True, lane="b", post_type="event")
    assert seq > seqs[-1] and report_id > report_ids[-1]
    again.close()


# -- a store that can't be used: one message, then memory only -------------------------------------------


def lock_store(path):
    """A connection holding the write lock of a valid store file at path (a second program's)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE IF NOT EXISTS x (a)")
    db.execute("BEGIN EXCLUSIVE")
    return db


@pytest.mark.parametrize("trouble, said", [
    ("corrupt", r"damaged \(file is not a database\): move it away or delete it"),
    ("locked", r"locked by another program \(database is locked\)"),
    ("read-only", r"read-only \(attempt to write a readonly database\)"),
])
def test_an_unusable_store_is_said_once_and_the_client_goes_on_in_memory(sim, tmp_path, launch, trouble, said):
    receiver = Receiver()
    port = free_port()
    config = write_config(tmp_path, sim, "broken", port, post_api=receiver.url)
    path = store_file(tmp_path, "broken")
    if trouble == "corrupt":
        with open(path, "wb") as f:
            f.write(b"this is no database, but it holds the reports of yesterday\n" * 100)
    else:
        sqlite3.connect(path).close()
    with open(path, "rb") as f:
        before = f.read()
    holder = lock_store(path) if trouble == "locked" else None      # after the read: a close() ends POSIX locks
    if trouble == "read-only":
        os.chmod(path, 0o400)
    try:
        program = launch("-c", config)
        program.wait_log(r"\(running\)", 30)
        log = program.log()
        assert len(re.findall(r"store .*mojo_webqq_store_broken\.sqlite3 cannot be used: " + said, log)) == 1, log
        assert "kept in memory only" in log
        friend = sim.world.friends[0]
        sim.inject_friend_message(friend.uin, "still here")
        report = receiver.wait(lambda r: r.get("content") == "still here")
        assert report["post_type"] == "receive_message"
        assert [e["content"] for e in api(port, "check_event", cursor=0).json()] == ["still here"]
        info = api(port, "get_client_info").json()
        assert (info["store"], info["store_failures"], info["post_api_sent"] > 0) == ("memory", 1, True)
        assert program.stop() == 0
    finally:
        receiver.close()
        if holder is not None:
            holder.close()
    assert program.log().count("cannot be used") == 1
    if holder is None:
        with open(path, "rb") as f:
            assert f.read() == before                   # what the user may want back is untouched


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="file size limits are POSIX")
def test_a_full_disk_midway_is_said_once_and_the_client_goes_on_in_memory(sim, tmp_path, launch):
    """The store's files may not grow beyond 512 kB (RLIMIT_FSIZE, as a full disk): writing fails midway;
    one message, and the messages after it still reach post_api and check_event."""
    receiver = Receiver()
    port = free_port()
    config = write_config(tmp_path, sim, "full", port, post_api=receiver.url)
    limit = 512 * 1024
    command = [sys.executable, "-c", "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (%d, %d)); os.execv(sys.executable, [sys.executable] + "
               "sys.argv[1:])" % (limit, limit), webqq.__file__]
    try:
        program = launch("-c", config, command=command)
        program.wait_log(r"\(running\)", 30)
        friend = sim.world.friends[1]
        texts = ["full %d %s" % (n, "x" * 500) for n in range(120)]
        for text in texts:
            sim.inject_friend_message(friend.uin, text)
        receiver.wait(lambda r: r.get("content") == texts[-1], timeout=30)
        program.wait_log(r"store .* failed: the disk refused a write \(disk I/O error\): it may be full or failing\. "
                         r"From now on reports and the check_event history are kept in memory only")
        assert program.log().index("(running)") < program.log().index("failed: the disk")
        got = [r["content"] for r in receiver.reports(lambda r: str(r.get("content")).startswith("full "))]
        assert got == texts
        read = [e["content"] for e in api(port, "check_event", cursor=0).json()]
        assert read[-len(texts):] == texts
        info = api(port, "get_client_info").json()
        assert (info["store"], info["store_failures"]) == ("memory", 1)
        assert program.stop() == 0
    finally:
        receiver.close()
    log = program.log()
    assert log.count(" failed: ") - log.count("post_api failed") == 1, log
    kept = [json.loads(body)["content"] for body, in stored(tmp_path, "full", "SELECT body FROM history")]
    assert 0 < len(kept) < len(texts) and kept == texts[:len(kept)]


# -- issue 12: post_api failures in the log while webqq runs ---------------------------------------------


def test_post_api_failures_are_logged_when_they_begin_and_when_they_end(sim, tmp_path, launch):
    """Not one line per attempt, nor a burst at exit: the first failure at once (URL, error, retry plan),
    nothing more for the rest of the minute, and the recovery."""
    receiver = Receiver()
    receiver.close()
    port = free_port()
    config = write_config(tmp_path, sim, "logs", port, post_api=receiver.url, post_event=0)
    program = launch("-c", config)
    try:
        program.wait_log(r"\(running\)", 30)
        friend = sim.world.friends[2]
        for n in range(10):
            sim.inject_friend_message(friend.uin, "lost? %d" % n)
        began = program.wait_log(r"\[warn\] post_api failed: POST %s: ConnectionError \(Connection refused\); "
                                 r"report receive_message \d+ is retried in 0.05 s, then after delays doubling up to "
                                 r"30 s, until it is answered or older than post_max_age \(24 h\)" % re.escape(receiver.url))
        assert began
        # attempts go on failing, unsaid (the delays: 0.05 0.1 0.2 0.4 0.8 s)
        assert wait_until(lambda: api(port, "get_client_info").json()["post_api_retried"] >= 5)
        assert len(re.findall(r"\] post_api", program.log())) == 1
        receiver.start()
        program.wait_log(r"\[info\] post_api %s answers again after \d+ s: \d+ attempt\(s\) had failed; \d+ "
                         r"report\(s\) waiting" % re.escape(receiver.url))
        assert wait_until(lambda: len(receiver.reports()) == 10)
        assert [r["content"] for r in receiver.reports()] == ["lost? %d" % n for n in range(10)]
        assert program.stop() == 0
    finally:
        receiver.close()
    assert len(re.findall(r"\[(warn|error)\]", program.log())) == 1, program.log()


def test_a_long_outage_is_summed_up_at_most_once_per_interval():
    """Outage: after the first line, one summary per interval with the counts, then the recovery."""
    lines, log = LogLines(logging.INFO), logging.getLogger("webqq.test-outage")
    log.setLevel(logging.INFO)
    try:
        outage = openqq.Outage(log, "http://127.0.0.1:9/post?access_token=s3cret", 0.3)
        for n in range(5):
            outage.failed("POST http://127.0.0.1:9/post: ConnectionError (Connection refused)", "retried", 7)
        assert len(lines.lines) == 1 and "s3cret" not in lines.lines[0]
        time.sleep(0.35)
        outage.failed("POST http://127.0.0.1:9/post: HTTP 503", "report given up", 6, given_up=True)
        outage.failed("POST http://127.0.0.1:9/post: HTTP 503", "retried", 6)
        assert lines.lines[1:] == ["post_api still failing after 0 s: 5 attempt(s) failed in the last 0 s (last: POST "
                                   "http://127.0.0.1:9/post: HTTP 503), 1 report(s) given up; 6 report(s) waiting"]
        outage.recovered(0)
        outage.recovered(0)
        assert lines.lines[2:] == ["post_api http://127.0.0.1:9/post?access_token=*** answers again after 0 s: "
                                   "7 attempt(s) had failed; 0 report(s) waiting"]
    finally:
        lines.close()
