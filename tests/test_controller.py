"""End-to-end tests of plugins/controller.py: a controller (a `python webqq.py controller` process, or
in-process), real client processes, one simulator per QQ account, HTTP over real sockets."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

import webqq
from conftest import ROOT, Answer, free_port, wait_until
from webqq_plugins import controller
from webqq_plugins.controller import Controller
from smartqq_sim import Simulator

WEBQQ = os.path.join(ROOT, "webqq.py")
KILL = getattr(signal, "SIGKILL", signal.SIGTERM)
# Client options that make a login against the simulator quick.
QUICK = {"qr_check_interval": "0.1", "send_interval": "0", "poll_timeout": "5", "http_timeout": "5"}
FAST = dict(check_interval=0.1, restart_delay=0.2, stop_timeout=5, client_grace=3)

http = requests.Session()
http.trust_env = False      # never through a proxy from the environment


def call(base, path, method="GET", **kwargs):
    """(HTTP status, JSON body) of one request."""
    res = http.request(method, base + path, timeout=15, **kwargs)
    return res.status_code, res.json()


def answer(base, path, **params):
    status, body = call(base, path, params=params)
    assert status == 200, body
    return body


def entry(base, name):
    """check_client's entry for one client, or None."""
    body = answer(base, "/openqq/check_client", client=name)
    return body["client"][0] if body["code"] == 0 else None


def wait_state(base, name, state, timeout=20.0):
    found = wait_until(lambda: (entry(base, name) or {}).get("state") == state, timeout, 0.1)
    assert found, "client %s not %s: %s" % (name, state, entry(base, name))
    return entry(base, name)


def gone(pid):
    return not webqq.pid_alive(pid)


class ControllerProcess(object):
    """`python webqq.py controller` on 127.0.0.1:0, its URL read from its log file."""

    def __init__(self, tmpdir, *flags):
        self.log_path = os.path.join(tmpdir, "controller.log")
        self.proc = subprocess.Popen(
            [sys.executable, WEBQQ, "controller", "--listen", "127.0.0.1:0", "--tmpdir", tmpdir,
             "--log-path", self.log_path] + [str(flag) for flag in flags],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=ROOT)
        pattern = re.compile(r"controller listening on (http://\S+) \(pid %d\)" % self.proc.pid)
        self.url = wait_until(lambda: self.proc.poll() is None and self.find(pattern), 20)
        assert self.url, "controller did not start: %s" % self.log()

    def log(self):
        try:
            with open(self.log_path, encoding="utf-8") as f:
                return f.read()
        except OSError:
            return ""

    def find(self, pattern):
        match = pattern.search(self.log())
        return match.group(1) if match else None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(KILL)
        self.proc.wait(10)


@pytest.fixture
def reaper(tmp_path):
    """Kills every process these tests started (controllers, and the clients in tmp_path) at the end."""
    controllers = []
    yield controllers
    for ctl in controllers:
        if isinstance(ctl, Controller):
            ctl.stop(stop_clients=True)
        else:
            ctl.kill()
    pids = set()
    registry = tmp_path / "mojo_webqq_controller_backend.json"
    if registry.exists():
        pids.update(record["pid"] for record in json.loads(registry.read_text())["clients"])
    if os.path.isdir("/proc"):     # also any client a lost registry would not name
        for name in os.listdir("/proc"):
            try:
                with open("/proc/%s/cmdline" % name, "rb") as f:
                    if str(tmp_path).encode() in f.read() and int(name) != os.getpid():
                        pids.add(int(name))
            except (OSError, ValueError):
                pass
    for pid in pids:
        try:
            os.kill(pid, KILL)
        except OSError:
            pass
    assert wait_until(lambda: all(gone(pid) for pid in pids), 10)


@pytest.fixture
def sims():
    """Three simulated QQ worlds, one per account, each scanning its QR codes by itself."""
    started = []
    for seed in (1, 2, 3):
        sim = Simulator(world={"friends": 3, "groups": 1, "members": 4, "discusses": 1, "seed": seed},
                        auto_scan=0.2, poll_hold=1.0)
        sim.start()
        started.append(sim)
    yield started
    for sim in started:
        sim.stop()


def in_process(tmp_path, reaper, **options):
    ctl = Controller(listen=[{"host": "127.0.0.1", "port": 0}], tmpdir=str(tmp_path), **dict(FAST, **options))
    reaper.append(ctl)
    return ctl.start()


# -- the whole life of three accounts -----------------------------------------------------------

@pytest.mark.slow
def test_three_accounts_proxy_restart_stop_and_adoption(tmp_path, sims, reaper, make_receiver):
    posts = make_receiver()
    flags = ["--check-interval", 0.1, "--restart-delay", 0.2, "--client-grace", 3,
             "--backend-start-port", free_port(), "--post-api", posts.base + "/post?from=ctl"]
    ctl = ControllerProcess(str(tmp_path), *flags)
    reaper.append(ctl)
    base = ctl.url

    # a second controller on the same files refuses to start
    second = subprocess.run([sys.executable, WEBQQ, "controller", "--listen", "127.0.0.1:0",
                             "--tmpdir", str(tmp_path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, timeout=20, cwd=ROOT)
    assert second.returncode == 1 and b"another controller" in second.stderr

    started = {}
    for i, name in enumerate(("c1", "c2", "c3")):
        params = dict(QUICK, client=name, smartqq_base=sims[i].url)
        if name == "c1":
            params["log_level"] = "debug"          # honoured (the original overrode it)
        if name == "c3":
            params["post_api"] = posts.base + "/post3"
        body = answer(base, "/openqq/start_client", **params)
        assert body == dict(params, account=name, code=0, status="success", pid=body["pid"], port=body["port"])
        assert isinstance(body["pid"], int) and isinstance(body["port"], int)
        started[name] = body
    assert len({body["port"] for body in started.values()}) == 3
    again = answer(base, "/openqq/start_client", client="c1", smartqq_base=sims[0].url)
    assert (again["code"], again["status"], again["pid"]) == (0, "client already exists", started["c1"]["pid"])

    for name, body in started.items():
        state = wait_state(base, name, "running")
        assert (state["account"], state["pid"], state["port"], state["client"]) == (name, body["pid"],
                                                                                   body["port"], name)
    everyone = answer(base, "/openqq/check_client")        # full state files, not only ports
    assert everyone["code"] == 0
    assert [(e["client"], e["state"], e["pid"], e["port"]) for e in everyone["client"]] == \
        [(n, "running", started[n]["pid"], started[n]["port"]) for n in ("c1", "c2", "c3")]

    # sends through the controller, each to its own account's QQ world
    friend = sims[0].world.friends[0]
    body = answer(base, "/openqq/send_friend_message", client="c1", uid=friend.qq, content="hello c1")
    assert (body["code"], body["status"]) == (0, "发送成功")
    assert sims[0].sent[-1]["text"] == "hello c1" and sims[0].sent[-1]["target"] == friend.uin
    group = sims[1].world.groups[0]
    status, body = call(base, "/openqq/send_group_message", "POST",
                        json={"client": "c2", "uid": group.qq, "content": "hello c2"})
    assert (status, body["code"]) == (200, 0) and sims[1].sent[-1]["text"] == "hello c2"
    discuss = sims[2].world.discusses[0]
    status, body = call(base, "/openqq/send_discuss_message", "POST",
                        data={"client": "c3", "id": discuss.did, "content": "hello c3"})
    assert (status, body["code"]) == (200, 0) and sims[2].sent[-1]["text"] == "hello c3"
    assert [len(sim.sent) for sim in sims] == [1, 1, 1]
    info = {name: answer(base, "/openqq/get_client_info", client=name) for name in ("c1", "c2")}
    assert (info["c1"]["log_level"], info["c1"]["pid"]) == ("debug", started["c1"]["pid"])
    assert (info["c2"]["log_level"], info["c2"]["pid"]) == ("info", started["c2"]["pid"])
    log = ctl.log()      # c1 logs the requests it got at debug level: the client parameter is gone
    assert '"GET /openqq/send_friend_message?uid=%d&content=hello+c1 HTTP/1.1" 200' % friend.qq in log
    assert not re.search(r'"\w+ /openqq/\S*client=', log)

    # a check_event poller that hangs up leaves the next event to the next poller
    queued = answer(base, "/openqq/check_event", client="c1")
    assert [e["content"] for e in queued if e["post_type"] == "send_message"] == ["hello c1"]
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=5) as sock:
        sock.sendall(b"GET /openqq/check_event?client=c1 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
    time.sleep(1.0)
    sims[0].inject_friend_message(friend.uin, "are you there")
    events = answer(base, "/openqq/check_event", client="c1")
    assert [(e["post_type"], e["content"]) for e in events] == [("receive_message", "are you there")]

    # post_api inherited with client=NAME added, or the client's own
    assert wait_until(lambda: {"/post?from=ctl&client=c1", "/post?from=ctl&client=c2", "/post3?client=c3"}
                      <= {hit.path for hit in posts.hits}, 10)

    # no QR while logged in: 404, empty
    res = http.get(base + "/openqq/get_qrcode", params={"client": "c1"}, timeout=5)
    assert (res.status_code, res.content) == (404, b"")

    # a client that crashes is started again, on its port
    os.kill(started["c2"]["pid"], KILL)
    restarted = wait_until(lambda: (entry(base, "c2") or {}).get("pid") not in (None, started["c2"]["pid"]), 10)
    assert restarted, entry(base, "c2")
    state = wait_state(base, "c2", "running")
    assert state["port"] == started["c2"]["port"]
    c2_pid = state["pid"]
    body = answer(base, "/openqq/send_group_message", client="c2", uid=group.qq, content="after restart")
    assert body["code"] == 0 and sims[1].sent[-1]["text"] == "after restart"

    # a client stopped on purpose is not
    body = answer(base, "/openqq/stop_client", client="c3")
    assert (body["code"], body["status"], body["pid"], body["port"]) == (0, "success", started["c3"]["pid"],
                                                                         started["c3"]["port"])
    assert wait_until(lambda: gone(started["c3"]["pid"]), 10)
    assert answer(base, "/openqq/check_client", client="c3") == {"code": 1, "status": "client not exists"}
    time.sleep(0.5)
    assert [e["client"] for e in answer(base, "/openqq/check_client")["client"]] == ["c1", "c2"]
    with open(os.path.join(str(tmp_path), "mojo_webqq_state_c3.json")) as f:
        assert json.load(f)["state"] == "stop"

    # a new controller adopts the clients of the one that died
    ctl.kill()
    first_died = time.monotonic()
    ctl = ControllerProcess(str(tmp_path), *flags)
    reaper.append(ctl)
    base = ctl.url
    listed = answer(base, "/openqq/check_client")["client"]
    assert [(e["client"], e["state"], e["pid"]) for e in listed] == [
        ("c1", "running", started["c1"]["pid"]), ("c2", "running", c2_pid)]
    body = answer(base, "/openqq/send_friend_message", client="c1", uid=friend.qq, content="adopted c1")
    assert body["code"] == 0 and sims[0].sent[-1]["text"] == "adopted c1"
    body = answer(base, "/openqq/send_group_message", client="c2", uid=group.qq, content="adopted c2")
    assert body["code"] == 0 and sims[1].sent[-1]["text"] == "adopted c2"
    time.sleep(max(0, first_died + 4.0 - time.monotonic()))    # past client_grace: they stay
    assert not gone(started["c1"]["pid"]) and not gone(c2_pid)

    # clients whose controller is gone for good stop by themselves after client_grace (3 s)
    ctl.kill()
    died = time.monotonic()
    assert wait_until(lambda: gone(started["c1"]["pid"]) and gone(c2_pid), 10)
    assert 2.5 < time.monotonic() - died < 8


# -- ports and limits ---------------------------------------------------------------------------

@pytest.mark.slow
def test_ten_concurrent_starts_get_ten_ports_and_max_clients_holds(tmp_path, reaper):
    worlds = [Simulator(world={"friends": 1, "groups": 0, "discusses": 0, "seed": i}, poll_hold=1.0)
              for i in range(10)]     # one QR code at a time per world: one world per account
    for sim in worlds:
        sim.start()
    held = socket.socket()             # a port someone else listens on is never handed out
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    try:
        first = held.getsockname()[1]
        ctl = in_process(tmp_path, reaper, max_clients=10, backend_start_port=first)
        answers = {}

        def start(i):
            answers["n%d" % i] = answer(ctl.url, "/openqq/start_client", client="n%d" % i,
                                        smartqq_base=worlds[i].url, **QUICK)

        threads = [threading.Thread(target=start, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(answers) == ["n%d" % i for i in range(10)]
        assert {(a["code"], a["status"]) for a in answers.values()} == {(0, "success")}
        ports = [a["port"] for a in answers.values()]
        assert len(set(ports)) == 10 and first not in ports
        assert len({a["pid"] for a in answers.values()}) == 10

        # exists is checked before max, and max means max (the original allowed max+1)
        body = answer(ctl.url, "/openqq/start_client", client="n3")
        assert (body["code"], body["status"], body["port"]) == (0, "client already exists", answers["n3"]["port"])
        assert answer(ctl.url, "/openqq/start_client", client="n10") == {"code": 5, "status": "max clients exceed"}

        # each one is its own process on its own port, waiting for a scan: its QR is served
        states = {name: wait_state(ctl.url, name, "scaning") for name in answers}
        assert len({state["port"] for state in states.values()}) == 10
        for name, state in states.items():
            info = answer(ctl.url, "/openqq/get_client_info", client=name)
            assert (info["pid"], info["account"]) == (state["pid"], name)
        res = http.get(ctl.url + "/openqq/get_qrcode", params={"client": "n0"}, timeout=5)
        assert res.status_code == 200 and res.headers["Content-Type"] == "image/png"
        assert res.headers["Cache-Control"] == "no-cache"
        with open(os.path.join(str(tmp_path), "mojo_webqq_qrcode_n0.png"), "rb") as f:
            assert res.content == f.read() and res.content.startswith(b"\x89PNG")

        ctl.stop(stop_clients=True)
        assert all(gone(state["pid"]) for state in states.values())
        with open(os.path.join(str(tmp_path), "mojo_webqq_controller_backend.json")) as f:
            assert json.load(f) == {"clients": []}
    finally:
        held.close()
        for sim in worlds:
            sim.stop()


@pytest.mark.slow
def test_a_client_whose_port_was_taken_moves_to_another(tmp_path, reaper, monkeypatch):
    sim = Simulator(world={"friends": 1, "groups": 0, "discusses": 0, "seed": 6}, poll_hold=1.0)
    sim.start()
    thief = socket.socket()
    thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    thief.bind(("127.0.0.1", 0))
    thief.listen(1)
    taken = thief.getsockname()[1]
    real_port_free, lied = controller.port_free, []

    def port_free(port):      # the race of the original: free when the controller looks, taken at the bind
        if port == taken and not lied:
            lied.append(port)
            return True
        return real_port_free(port)

    monkeypatch.setattr(controller, "port_free", port_free)
    try:
        ctl = in_process(tmp_path, reaper, backend_start_port=taken)
        first = answer(ctl.url, "/openqq/start_client", client="t1", smartqq_base=sim.url, **QUICK)
        assert first["port"] == taken
        state = wait_state(ctl.url, "t1", "scaning")
        assert state["port"] != taken and state["pid"] != first["pid"]
        assert gone(first["pid"])

        # a crashed client whose port someone took meanwhile is restarted on another one
        os.kill(state["pid"], KILL)
        assert wait_until(lambda: entry(ctl.url, "t1")["state"] == "stop", 5)
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", state["port"]))
        squatter.listen(1)
        try:
            moved = wait_until(lambda: (entry(ctl.url, "t1") or {}).get("state") == "scaning" and entry(ctl.url, "t1"),
                               15)
            assert moved and moved["port"] not in (taken, state["port"]) and moved["pid"] != state["pid"]
        finally:
            squatter.close()
    finally:
        thief.close()
        sim.stop()


# -- what the controller refuses -----------------------------------------------------------------

def test_refusals_are_json_with_a_code(tmp_path, reaper):
    ctl = in_process(tmp_path, reaper, access_token="s3cret")
    base, auth = ctl.url, {"Authorization": "Bearer s3cret"}
    assert call(base, "/openqq/check_client") == (403, {"code": -6, "status": "auth failure"})
    assert call(base, "/openqq/check_client", params={"access_token": "wrong"})[0] == 403
    assert call(base, "/openqq/check_client", headers=dict(auth, Origin="http://evil.example")) == \
        (403, {"code": -6, "status": "cross-site request refused"})
    assert call(base, "/openqq/check_client", params={"access_token": "s3cret"}) == (200, {"code": 0, "client": []})

    def get(path, **params):
        return call(base, path, headers=auth, params=params)

    not_found = (200, {"code": 1, "status": "client not found"})
    not_exists = (200, {"code": 1, "status": "client not exists"})
    for path in ("/openqq/start_client", "/openqq/stop_client", "/openqq/get_qrcode", "/openqq/send_friend_message"):
        assert get(path) == not_found
    for path in ("/openqq/stop_client", "/openqq/check_client", "/openqq/get_qrcode", "/openqq/get_user_info"):
        assert get(path, client="nobody") == not_exists
    assert get("/index.html") == (403, {"code": -1, "status": "api not found"})

    status, body = get("/openqq/start_client", client="../etc")
    assert (status, body["code"]) == (400, -9) and "client must be" in body["status"]
    status, body = call(base, "/openqq/start_client?client=a&client=b", headers=auth)
    assert (status, body["code"]) == (400, -9) and "more than once" in body["status"]
    status, body = get("/openqq/start_client", client="a", send_interval="soon")
    assert (status, body["code"]) == (400, -9) and "send_interval" in body["status"]
    status, body = get("/openqq/start_client", client="a", smartqq_base="http://x\n[openqq]")
    assert (status, body["code"]) == (400, -9) and "control characters" in body["status"]
    assert get("/openqq/check_client") == (200, {"code": 0, "client": []})
    assert not [n for n in os.listdir(str(tmp_path)) if n.endswith(".ini")]

    with socket.create_connection(("127.0.0.1", ctl.servers[0].port), timeout=5) as sock:
        sock.sendall(b"POST /openqq/send_friend_message?client=a HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer s3cret\r\nContent-Length: -4\r\n\r\n")
        raw = sock.recv(4096)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(body.decode()) == {
        "code": -9, "status": "invalid Content-Length"}

    with pytest.raises(ValueError, match="protected mode"):
        Controller(listen=[{"host": "0.0.0.0", "port": 0}], tmpdir=str(tmp_path))


@pytest.mark.slow
def test_unreachable_client_self_stop_and_poll_api_redirect(tmp_path, reaper, make_receiver):
    sim = Simulator(world={"friends": 1, "groups": 0, "discusses": 0, "seed": 5}, poll_hold=1.0)
    sim.start()
    poll = make_receiver(respond=lambda hit: Answer(204, b""))      # nothing to do ...
    try:
        ctl = in_process(tmp_path, reaper, restart_delay=30, poll_api=poll.base + "/poll", poll_interval=0.1)
        poll.script.append(Answer(302, b"", location=ctl.url + "/openqq/start_client?" + "&".join(
            "%s=%s" % pair for pair in dict(QUICK, client="p1", smartqq_base=sim.url).items())))   # ... but once
        assert wait_until(lambda: entry(ctl.url, "p1"), 10), "the poll_api redirect was not followed"
        p1 = wait_state(ctl.url, "p1", "scaning")
        assert len([hit for hit in poll.hits if hit.path == "/poll"]) >= 2

        # a client process that is gone: the proxy says so in JSON, check_client says "stop"
        os.kill(p1["pid"], KILL)
        assert wait_until(lambda: entry(ctl.url, "p1")["state"] == "stop", 5)
        status, body = call(ctl.url, "/openqq/get_client_info", params={"client": "p1"})
        assert (status, body) == (502, {"code": 6, "status": "client not reachable", "client": "p1",
                                        "state": "stop"})
        assert answer(ctl.url, "/openqq/stop_client", client="p1")["status"] == "success"
        assert answer(ctl.url, "/openqq/check_client") == {"code": 0, "client": []}

        # a client told to stop through its own API (POST is proxied) is not restarted
        p2 = answer(ctl.url, "/openqq/start_client", client="p2", smartqq_base=sim.url, **QUICK)
        wait_state(ctl.url, "p2", "scaning")
        status, body = call(ctl.url, "/openqq/stop_client?client=p2", "POST")
        assert (status, body["code"], body["pid"]) == (200, 0, p2["pid"])
        assert wait_until(lambda: answer(ctl.url, "/openqq/check_client") == {"code": 0, "client": []}, 10)
        assert gone(p2["pid"])
    finally:
        sim.stop()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="zombies are told by /proc")
def test_a_dead_unreaped_process_is_not_alive():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        def zombie():
            with open("/proc/%d/stat" % proc.pid) as f:
                return f.read().rpartition(")")[2].split()[0] == "Z"
        assert wait_until(zombie, 10)
        assert not webqq.pid_alive(proc.pid)      # a controller orphaned in a container looks like this
        assert webqq.pid_alive(os.getpid())
    finally:
        proc.wait()
