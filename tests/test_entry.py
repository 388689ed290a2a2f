"""webqq started as people start it: `python webqq.py -c FILE`, and the `webqq` command of a wheel
installed in a fresh virtualenv, each in a process of its own, against real simulators on 127.0.0.1,
talked to over HTTP like a user's script; every log is checked for tracebacks (the launch fixture).

The installed command runs without requests (the venv has none), so it also tests the urllib path;
`python webqq.py` runs with the test environment's requests."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile

import pytest
import requests

import webqq
from conftest import ROOT, Answer, Program, Simulator, free_port, wait_until
from onebot_sim import OneBotSimulator
from test_onebot import ALICE, BOB, CAROL, ME, PERL, SECRET, TOKEN, WORLD

http = requests.Session()
http.trust_env = False      # never through a proxy from the environment

SMARTQQ_WORLD = {"friends": 4, "groups": 1, "members": 4, "discusses": 1, "seed": 3}
# Client settings that make a login against a simulator quick and refreshes frequent.
QUICK = {"qr_check_interval": 0.1, "send_interval": 0, "poll_timeout": 5, "http_timeout": 5,
         "update_interval": 1, "qrcode_display": "none"}


# -- the entry points ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    """The `webqq` command of a wheel built from this checkout and installed, without its
    dependencies, in a fresh virtualenv: (command, the wheel's path, the venv's site-packages)."""
    folder = tmp_path_factory.mktemp("wheel")
    source, wheels, venv = folder / "source", folder / "dist", folder / "venv"
    shutil.copytree(ROOT, str(source), ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "tests", "docs", "*venv*"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels),
                    str(source)], check=True, stdin=subprocess.DEVNULL)
    wheel = str(next(wheels.glob("webqq-*.whl")))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / ("Scripts" if os.name == "nt" else "bin") / "python")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
                    "--no-index", wheel], check=True, stdin=subprocess.DEVNULL)
    where = subprocess.run([python, "-c", "import sysconfig, webqq; print(sysconfig.get_paths()['purelib']); "
                            "print(webqq.__file__)"], check=True, stdout=subprocess.PIPE, cwd=str(folder),
                           universal_newlines=True).stdout.split("\n")
    assert where[1].startswith(where[0]), "the venv's python imports webqq from %s" % where[1]
    command = str(venv / ("Scripts" if os.name == "nt" else "bin") / "webqq")
    return {"command": [command], "wheel": wheel, "site": where[0]}


@pytest.fixture(params=["script", pytest.param("installed", marks=pytest.mark.slow)])
def entry(request):
    """How webqq is started: None for `python webqq.py`, else the installed command."""
    return None if request.param == "script" else request.getfixturevalue("installed")["command"]


# -- helpers -------------------------------------------------------------------------------------

def write_ini(folder, sections):
    """webqq.ini in folder (made if missing) from {section: {key: value}}; its path."""
    os.makedirs(str(folder), exist_ok=True)
    lines = []
    for section, options in sections.items():
        lines.append("[%s]" % section)
        lines += ["%s = %s" % (key, value) for key, value in options.items()]
        lines.append("")
    path = os.path.join(str(folder), "webqq.ini")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def api(base, route, **params):
    """The JSON answer of one Openqq route (HTTP 200 required)."""
    res = http.get(base + "/openqq/" + route, params=params, timeout=15)
    assert res.status_code == 200, (route, res.status_code, res.text)
    return res.json()


def event(name, where=lambda params: True):
    return lambda r: r.get("post_type") == "event" and r.get("event") == name and where(r["params"])


def received(content):
    return lambda r: r.get("post_type") == "receive_message" and r.get("content") == content


def held_port():
    """A socket listening on 127.0.0.1: its port is in use while the test runs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def refused_url():
    """An http URL on 127.0.0.1 where nothing listens: every connection is refused."""
    return "http://127.0.0.1:%d" % free_port()


def interrupt(program):
    """Ctrl-C: SIGINT, then the exit status and the seconds until the program ended."""
    started = time.monotonic()
    program.proc.send_signal(signal.SIGINT)
    status = program.wait(20)
    return status, time.monotonic() - started


def check_one_session(program, base, posts, sends, incoming, refresh_fault, contact_changes):
    """What every entry point x upstream must do once logged in: each send answered as sent (the
    upstream got it), an incoming message on post_api and check_event, a contact refresh that fails
    once and refreshes that go on (new_ and lose_ events later)."""
    for route, params, check in sends:
        answer = api(base, route, content="%s via webqq" % route, **params)
        assert check(answer), (route, answer)
    incoming()
    report = posts.wait(received("hello webqq"))
    assert report["type"] in ("friend_message", "group_message")
    found = wait_until(lambda: [e for e in api(base, "check_event") if received("hello webqq")(e)], 10, 0.2)
    assert found, "the incoming message never reached check_event"
    refresh_fault()
    program.wait_log(r"更新friend信息失败")
    new_friend, lost_friend = contact_changes()
    posts.wait(event("new_friend", lambda p: p[0]["name"] == new_friend))
    posts.wait(event("lose_friend", lambda p: p[0]["name"] == lost_friend))


# -- a whole session, each entry point x each upstream ----------------------------------------------

@pytest.mark.slow
def test_smartqq_session(entry, tmp_path, launch, make_receiver):
    sim = Simulator(world=SMARTQQ_WORLD, auto_scan=0.2, poll_hold=1.0).start()
    try:
        posts, port = make_receiver(), free_port()
        config = write_ini(tmp_path, {
            "webqq": dict(QUICK, account="sq", tmpdir=tmp_path, smartqq_base=sim.url),
            "openqq": {"listen": "127.0.0.1:%d" % port, "post_api": posts.url, "check_event_timeout": 1}})
        program = launch("-c", config, command=entry)
        program.wait_log(r"\(running\)")
        base = "http://127.0.0.1:%d" % port
        world = sim.world
        friend, group, discuss = world.friends[0], world.groups[0], world.discusses[0]
        member = [m for m in group.members if m.qq != world.user.qq][0]
        delivered = lambda a: a["code"] == 0 and a["status"] == "发送成功"
        sends = [("send_friend_message", {"uid": friend.qq}, delivered),
                 ("send_group_message", {"uid": group.qq}, delivered),
                 ("send_discuss_message", {"id": discuss.did}, delivered),
                 ("send_sess_message", {"group_uid": group.qq, "uid": member.qq}, delivered)]
        gone = world.friends[1]

        def contact_changes():
            zed = sim.add_friend(nick="新朋友zed")
            sim.remove_friend(gone)
            return zed.nick, gone.nick

        check_one_session(program, base, posts, sends,
                          lambda: sim.inject_friend_message(friend.uin, "hello webqq"),
                          lambda: sim.fault("get_user_friends2", retcode=100), contact_changes)
        assert [(s["endpoint"], s["target"], s["text"]) for s in sim.sent] == [
            ("send_buddy_msg2", friend.uin, "send_friend_message via webqq"),
            ("send_qun_msg2", group.gid, "send_group_message via webqq"),
            ("send_discu_msg2", discuss.did, "send_discuss_message via webqq"),
            ("send_sess_msg2", member.uin, "send_sess_message via webqq")]
        assert program.stop() == 0
    finally:
        sim.stop()


@pytest.mark.slow
def test_onebot_session(entry, tmp_path, launch, make_receiver):
    sim = OneBotSimulator("napcat", WORLD, access_token=TOKEN, secret=SECRET, post_retry_interval=0.05).start()
    try:
        posts, port, events = make_receiver(), free_port(), free_port()
        sim.post_url = "http://127.0.0.1:%d/" % events
        config = write_ini(tmp_path, {
            "webqq": dict(QUICK, account="ob", tmpdir=tmp_path, upstream="onebot"),
            "onebot": {"url": sim.url, "access_token": TOKEN, "secret": SECRET, "listen": "127.0.0.1:%d" % events,
                       "status_interval": 0.5, "send_rate": 0},
            "openqq": {"listen": "127.0.0.1:%d" % port, "post_api": posts.url, "check_event_timeout": 1}})
        program = launch("-c", config, command=entry)
        program.wait_log(r"\(running\)")
        base = "http://127.0.0.1:%d" % port

        def sent(user_id=None, group_id=None, temp=False):
            return lambda a: a["code"] == 0 and sim.sent and (sim.sent[-1]["user_id"], sim.sent[-1]["group_id"],
                                                              bool(sim.sent[-1]["temp"])) == (user_id, group_id, temp)
        sends = [("send_friend_message", {"id": ALICE}, sent(user_id=ALICE)),
                 ("send_group_message", {"id": PERL}, sent(group_id=PERL)),
                 # a sess message passes Client's isinstance check: a second copy of webqq.py answered HTTP 500
                 ("send_sess_message", {"group_id": PERL, "id": CAROL}, sent(CAROL, PERL, True)),
                 ("send_discuss_message", {"id": 1}, lambda a: a["code"] == 102)]   # OneBot has none

        def contact_changes():
            sim.add_friend(20009, "新朋友zed")
            sim.remove_friend(BOB)
            return "新朋友zed", "bob"

        check_one_session(program, base, posts, sends, lambda: sim.post_private_message(ALICE, "hello webqq"),
                          lambda: sim.fault("get_friend_list", retcode=100), contact_changes)
        assert len(sim.sent) == 3

        # the account goes offline: webqq logs in again once it is back, and works on
        sim.set_online(False)
        program.wait_log(r"正在重新登录")
        sim.set_online(True)
        program.wait_log(r"\(running\)[\s\S]*\(running\)")
        assert program.log().count("正在加载联系人 (logged in, loading the contacts)") == 1    # not for a relogin
        assert api(base, "send_friend_message", id=ALICE, content="back again")["code"] == 0
        assert sim.sent[-1]["segments"] == [{"type": "text", "data": {"text": "back again"}}]
        assert api(base, "get_user_info")["uid"] == ME
        assert program.stop() == 0
    finally:
        sim.stop()


# -- starts that go wrong: each says why, on one line, without a traceback --------------------------

def test_an_address_in_use_or_not_ours_is_named_in_one_line_with_exit_status_2(entry, tmp_path, launch):
    held = held_port()
    try:
        taken = held.getsockname()[1]
        where = "127.0.0.1:%d" % taken
        openqq = launch("-c", write_ini(tmp_path / "openqq", {
            "webqq": dict(QUICK, account="a1", tmpdir=tmp_path / "openqq", smartqq_base=refused_url()),
            "openqq": {"listen": where}}), command=entry, cwd=tmp_path / "openqq")
        onebot = launch("-c", write_ini(tmp_path / "onebot", {
            "webqq": dict(QUICK, account="a2", tmpdir=tmp_path / "onebot", upstream="onebot"),
            "onebot": {"url": refused_url(), "listen": where}}), command=entry, cwd=tmp_path / "onebot")
        os.makedirs(str(tmp_path / "controller"))
        controller = launch("controller", "--listen", where, "--tmpdir", tmp_path / "controller", command=entry,
                            cwd=tmp_path / "controller")
        elsewhere = "192.0.2.1:%d" % taken     # TEST-NET-1: no address of this machine (a bind sends nothing)
        os.makedirs(str(tmp_path / "foreign"))
        foreign = launch("--listen", elsewhere, "--access-token", "s3cret", "--tmpdir", tmp_path / "foreign",
                         "--smartqq-base", refused_url(), command=entry, cwd=tmp_path / "foreign")
        for program, server in ((openqq, "openqq"), (onebot, "onebot-receiver"), (controller, "controller")):
            assert program.wait() == 2, program.log()
            lines = [line for line in program.log().splitlines() if where in line]
            assert lines and all("%s cannot listen on %s: the address is in use" % (server, where) in line
                                 for line in lines), program.log()
        assert foreign.wait() == 2, foreign.log()
        assert re.search(r"\[error\] openqq无法监听%s \(openqq cannot listen on %s: [^\n]+\)\n" % (
            re.escape(elsewhere), re.escape(elsewhere)), foreign.log()), foreign.log()
        assert "提示 (hint): listen on an address of this machine" in foreign.log()
    finally:
        held.close()


def test_ctrl_c_during_login_or_a_held_poll_ends_webqq_within_2_s(entry, tmp_path, launch):
    sim = Simulator(world=SMARTQQ_WORLD).start()        # nobody scans its QR code
    holding = Simulator(world=SMARTQQ_WORLD, auto_scan=0.2, poll_hold=20.0).start()
    try:
        running = launch("-c", write_ini(tmp_path / "running", {
            "webqq": dict(QUICK, account="c0", tmpdir=tmp_path / "running", smartqq_base=holding.url, poll_timeout=30),
            "openqq": {"listen": "127.0.0.1:%d" % free_port()}}), command=entry, cwd=tmp_path / "running")
        waiting = launch("-c", write_ini(tmp_path / "smartqq", {
            "webqq": dict(QUICK, account="c1", tmpdir=tmp_path / "smartqq", smartqq_base=sim.url),
            "openqq": {"listen": "127.0.0.1:%d" % free_port()}}), command=entry, cwd=tmp_path / "smartqq")
        down = launch("-c", write_ini(tmp_path / "onebot", {     # NapCat is not running
            "webqq": dict(QUICK, account="c2", tmpdir=tmp_path / "onebot", upstream="onebot"),
            "onebot": {"url": refused_url(), "listen": "127.0.0.1:%d" % free_port()},
            "openqq": {"listen": "127.0.0.1:%d" % free_port()}}), command=entry, cwd=tmp_path / "onebot")
        waiting.wait_log(r"请使用手机QQ扫描二维码")
        down.wait_log(r"OneBot实现无法连接")
        running.wait_log(r"\(running\)")
        time.sleep(0.3)     # well into the wait, and into a held poll
        for program in (waiting, down, running):
            status, seconds = interrupt(program)
            assert status == 0 and seconds < 2.0, (status, seconds, program.log())
            assert "did not stop" not in program.log()
    finally:
        sim.stop()
        holding.stop()


def test_a_wrong_onebot_token_is_told_and_ends_webqq(entry, tmp_path, launch):
    sim = OneBotSimulator("napcat", WORLD, access_token=TOKEN, secret=SECRET).start()
    try:
        program = launch("-c", write_ini(tmp_path, {
            "webqq": dict(QUICK, account="t1", tmpdir=tmp_path, upstream="onebot"),
            "onebot": {"url": sim.url, "access_token": "not-" + TOKEN, "secret": SECRET,
                       "listen": "127.0.0.1:%d" % free_port()},
            "openqq": {"listen": "127.0.0.1:%d" % free_port()}}), command=entry)
        assert program.wait() == 1
        log = program.log()
        assert re.search(r"\[error\] 登录失败，客户端退出: OneBot拒绝了access_token \(the API refused our token", log)
        assert "提示 (hint): set access_token in [onebot]" in log
    finally:
        sim.stop()


@pytest.mark.slow
def test_a_dead_smartqq_is_explained_once_then_retried_in_one_line(entry, tmp_path, launch, make_receiver):
    """What answers at w.qq.com (smartqq_base here) is nothing at all, or a site that is not SmartQQ."""
    dead_site = make_receiver(respond=lambda hit: Answer(404, b"<html><body>Not Found</body></html>",
                                                         "text/html"))
    programs = [launch("-c", write_ini(tmp_path / name, {
        "webqq": dict(QUICK, account=name, tmpdir=tmp_path / name, smartqq_base=base),
        "openqq": {"listen": "127.0.0.1:%d" % free_port()}}), command=entry, cwd=tmp_path / name)
        for name, base in (("refused", refused_url()), ("html", dead_site.base))]
    for program in programs:
        program.wait_log(r"retrying in 4 s")
        log = program.log()
        assert log.count("Tencent closed SmartQQ (w.qq.com) on 2019-01-01") == 1
        assert "python webqq.py --demo" in log and "upstream = onebot" in log and "Living QQ accounts: OneBot" in log
        retries = [line for line in log.splitlines() if "retrying in" in line]
        assert len(retries) == 2 and all(line.startswith("[") and "SmartQQ cannot be reached" in line
                                         for line in retries)
        assert program.stop() == 0
    assert dead_site.hits and dead_site.hits[0].path == "/"


def test_a_thread_that_dies_stops_webqq_and_says_so(tmp_path, launch):
    """No thread dies silently: one of a plugin's threads fails, and the client stops, telling why."""
    package = tmp_path / "brittle"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text(
        "def call(client):\n"
        "    client.on('login', lambda *_: client.thread('brittle-worker', fail).start())\n\n\n"
        "def fail():\n"
        "    raise RuntimeError('a bug in a plugin thread')\n")
    sim = Simulator(world=SMARTQQ_WORLD, auto_scan=0.2).start()
    try:
        program = Program(["-c", write_ini(tmp_path, {
            "webqq": dict(QUICK, account="b1", tmpdir=tmp_path, smartqq_base=sim.url), "brittle.plugin": {}})],
            tmp_path, env={"PYTHONPATH": str(tmp_path)})
        try:
            assert program.wait() == 1
        finally:
            program.kill()
        log = program.log()
        assert "[error] 线程brittle-worker意外终止 (thread brittle-worker died)" in log
        assert "RuntimeError: a bug in a plugin thread" in log
        assert "错误 (error): 线程brittle-worker意外终止，客户端停止运行 (thread brittle-worker died" in log
    finally:
        sim.stop()


# -- the controller, as people start it --------------------------------------------------------------

@pytest.mark.slow
def test_the_controller_restarts_a_client_at_once_on_the_port_it_answered(tmp_path, launch):
    sims = [Simulator(world=dict(SMARTQQ_WORLD, seed=seed), auto_scan=0.2, poll_hold=1.0).start() for seed in (1, 2, 3)]
    try:
        controller = launch("controller", "--listen", "127.0.0.1:0", "--tmpdir", tmp_path, "--check-interval", 0.1,
                            "--client-grace", 2, "--backend-start-port", free_port())
        base = controller.wait_log(r"controller listening on (http://\S+)").group(1)
        quick = {key: QUICK[key] for key in ("qr_check_interval", "send_interval", "poll_timeout", "http_timeout")}
        answers = {}
        for name, sim in zip(("c1", "c2", "c3"), sims):
            answers[name] = api(base, "start_client", client=name, smartqq_base=sim.url, **quick)
            assert (answers[name]["code"], answers[name]["status"]) == (0, "success")

        def running(name, pid):
            entry = api(base, "check_client", client=name)
            return entry["code"] == 0 and (entry["client"][0]["state"], entry["client"][0]["pid"]) == ("running", pid)
        for name, body in answers.items():
            assert wait_until(lambda: running(name, body["pid"]), 20, 0.1), api(base, "check_client")

        # stop_client, then start_client of the same name at once: it works the first time
        old = answers["c1"]
        stopped = api(base, "stop_client", client="c1")
        assert (stopped["code"], stopped["pid"]) == (0, old["pid"])
        answers["c1"] = again = api(base, "start_client", client="c1", smartqq_base=sims[0].url, **quick)
        assert (again["code"], again["status"]) == (0, "success") and again["pid"] != old["pid"]
        assert wait_until(lambda: running("c1", again["pid"]), 20, 0.1), api(base, "check_client")
        friend = sims[0].world.friends[0]
        sent = api(base, "send_friend_message", client="c1", uid=friend.qq, content="after the restart")
        assert sent["code"] == 0 and sims[0].sent[-1]["text"] == "after the restart"

        # every port start_client answered is served by that very process
        with open(str(tmp_path / "mojo_webqq_controller_backend.json"), encoding="utf-8") as f:
            tokens = {record["client"]: record["token"] for record in json.load(f)["clients"]}
        for name, body in answers.items():
            info = http.get("http://127.0.0.1:%d/openqq/get_client_info" % body["port"], timeout=10,
                            headers={"Authorization": "Bearer " + tokens[name]}).json()
            assert (info["account"], info["pid"]) == (name, body["pid"])

        # the clients' lines in the shared log say which client wrote them
        log = controller.log()
        for name in answers:
            assert re.search(r"\[info\] \[%s\] 开始接收消息\.\.\. \(running\)" % name, log), log[-3000:]
        assert "another client of account" not in log

        for name, body in answers.items():
            assert api(base, "stop_client", client=name)["code"] == 0
        assert wait_until(lambda: not any(webqq.pid_alive(body["pid"]) for body in answers.values()), 15)
        assert controller.stop() == 0
    finally:
        for sim in sims:
            sim.stop()


# -- the installed package -------------------------------------------------------------------------

@pytest.mark.slow
def test_the_wheel_owns_only_webqq_names_and_its_demo_runs(installed, tmp_path, launch):
    wheel = zipfile.ZipFile(installed["wheel"])
    names = wheel.namelist()
    info = "webqq-%s.dist-info" % webqq.__version__
    assert {name.split("/")[0] for name in names} == {"webqq.py", "webqq_plugins", "webqq_scripts", info}
    assert wheel.read(info + "/top_level.txt").decode().split() == ["webqq", "webqq_plugins", "webqq_scripts"]
    assert {"webqq_plugins/openqq.py", "webqq_plugins/onebot.py", "webqq_scripts/smartqq_sim.py"} <= set(names)
    assert not {"plugins", "scripts"} & set(os.listdir(installed["site"]))

    port = free_port()
    program = launch("--demo", "--listen", "127.0.0.1:%d" % port, "--tmpdir", tmp_path, command=installed["command"])
    program.wait_log(r"\(running\)")
    user = api("http://127.0.0.1:%d" % port, "get_user_info")
    assert user["id"] and user["name"] and user["account"] == user["id"]
    assert "requests is not installed: webqq uses urllib" in program.log()
    assert program.stop() == 0
