"""End-to-end tests of plugins/openqq.py: the simulator, a Client with the plugin, and HTTP over
real sockets, as a user's script would talk to it."""
import collections
import hashlib
import hmac
import json
import socket
import ssl
import threading
import time

import pytest
import requests

import webqq
from conftest import Answer, LogLines, Receiver, Recorder, admin_group, free_port, log_in, scan_and_confirm, wait_until
from webqq_plugins import openqq
from smartqq_sim import Simulator, World

USER_KEYS = set(webqq.User.FIELDS)
FRIEND_KEYS = set(webqq.Friend.FIELDS)
GROUP_KEYS = set(webqq.Group.FIELDS)
MEMBER_KEYS = set(webqq.GroupMember.FIELDS)
DISCUSS_MEMBER_KEYS = set(webqq.DiscussMember.FIELDS)
CLIENT_INFO_KEYS = {"account", "code", "http_debug", "log_encoding", "log_level", "log_path", "os", "pid",
                    "runtime", "starttime", "status", "version"}
FAST = dict(check_event_timeout=1, stop_delay=0.2, post_retry_backoff=0.05, post_timeout=2, poll_interval=0.1)


# -- helpers --------------------------------------------------------------------------------

def load_openqq(client, **options):
    """Load the plugin on 127.0.0.1:0 and return it."""
    options.setdefault("listen", [{"host": "127.0.0.1", "port": 0}])
    for name, value in FAST.items():
        options.setdefault(name, value)
    plugin = client.load("openqq", **options)
    assert isinstance(plugin, openqq.Openqq)
    return plugin


def get(base, path, **kwargs):
    kwargs.setdefault("timeout", 15)
    return requests.get(base + "/openqq/" + path, **kwargs)


def post(base, path, **kwargs):
    kwargs.setdefault("timeout", 15)
    return requests.post(base + "/openqq/" + path, **kwargs)


def raw_request(base, text, read=True):
    """Send raw request bytes; the raw answer (status line, headers, body) as bytes."""
    host, port = base.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(text if isinstance(text, bytes) else text.encode("latin-1"))
        if not read:
            return b""
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if text[:4] in ("HEAD", b"HEAD") or (length and len(body) >= length[0]):
                    return data


def types(obj):
    return {k: type(v).__name__ for k, v in obj.items()}


# -- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One simulator and one logged-in client carrying the plugin and a post_api receiver,
    shared by the tests that only read or add their own uniquely-marked messages."""
    world = World.generate(friends=8, groups=2, members=6, discusses=1, seed=11).to_json()
    world["friends"][2]["nick"] = world["friends"][0]["nick"]      # two friends of one name
    for member in world["groups"][0]["members"][2:5]:               # where we are the owner
        member["role"] = "member"
    sim = Simulator(world=world, poll_hold=1.0)
    sim.start()
    receiver = Receiver()
    client = webqq.Client(smartqq_base=sim.url, tmpdir=str(tmp_path_factory.mktemp("openqq")),
                          qr_check_interval=0.05, send_interval=0, qrcode_display="none", poll_timeout=10,
                          http_timeout=5, log_level="debug")
    client.recorder = Recorder(client)
    plugin = load_openqq(client, post_api=receiver.url)
    log_in(sim, client)
    for group in client.contacts.groups():
        assert client.ensure_members(group)
    env = collections.namedtuple("Env", "sim client plugin url receiver")(sim, client, plugin, plugin.urls[0], receiver)
    yield env
    client.stop()
    receiver.close()
    sim.stop()


def other_members(client, group):
    return [m for m in group.members if m.id != client.user.id]


# -- info routes --------------------------------------------------------------------------

def test_info_routes_give_the_original_key_sets_and_types(env):
    c = env.client.contacts
    user = get(env.url, "get_user_info")
    assert user.status_code == 200 and user.headers["Content-Type"] == "application/json; charset=utf-8"
    data = user.json()
    assert set(data) == USER_KEYS and data == c.user.to_json()
    assert isinstance(data["id"], int) and isinstance(data["uid"], int) and data["uid"] == env.sim.world.user.qq

    friends = get(env.url, "get_friend_info").json()
    assert [f["id"] for f in friends] == [f.id for f in c.friends()]
    assert all(set(f) == FRIEND_KEYS for f in friends)
    assert all(isinstance(f["id"], int) and isinstance(f["name"], str) for f in friends)
    assert {f["uid"] for f in friends} == {f.qq for f in env.sim.world.friends}

    groups = get(env.url, "get_group_info").json()
    assert [g["id"] for g in groups] == [g.id for g in c.groups()]
    for g in groups:
        assert set(g) == GROUP_KEYS | {"member"} and g["member"]
        assert all(set(m) == MEMBER_KEYS and isinstance(m["id"], int) for m in g["member"])
    basic = get(env.url, "get_group_basic_info").json()
    assert basic == [{k: v for k, v in g.items() if k != "member"} for g in groups]

    discusses = get(env.url, "get_discuss_info").json()
    assert discusses == [d.to_json() for d in c.discusses()]
    assert set(discusses[0]) == {"id", "name", "owner_id", "member"}
    assert all(set(m) == DISCUSS_MEMBER_KEYS and isinstance(m["id"], str) for m in discusses[0]["member"])
    # the raw text: compact, UTF-8, non-ASCII kept
    assert "\\u" not in get(env.url, "get_friend_info").text


def test_head_and_keep_alive(env):
    host = env.url.split("//")[1]
    head = raw_request(env.url, "HEAD /openqq/get_friend_info HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
    length = len(get(env.url, "get_friend_info").content)
    assert head.startswith(b"HTTP/1.1 200 ") and (b"Content-Length: %d" % length) in head
    assert head.endswith(b"\r\n\r\n")
    with requests.Session() as s:
        for _ in range(3):
            assert s.get(env.url + "/openqq/get_user_info", timeout=5).status_code == 200
    # two requests on one connection, both answered
    two = ("GET /openqq/get_client_info HTTP/1.1\r\nHost: %s\r\n\r\n" % host) * 2
    port = int(host.split(":")[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(two.encode())
        data = b""
        while data.count(b"HTTP/1.1 200 OK") < 2:
            chunk = sock.recv(65536)
            assert chunk
            data += chunk


# -- search ---------------------------------------------------------------------------------

def test_search_friend_and_group(env):
    c = env.client.contacts
    friend = c.friends()[2]
    found = get(env.url, "search_friend", params={"uid": friend.uid}).json()
    assert found == [friend.to_json()]
    by_state = get(env.url, "search_friend", params={"state": friend.state, "id": friend.id}).json()
    assert by_state == [friend.to_json()]
    # reserved parameters are not attributes; JSONP works with search
    text = get(env.url, "search_friend", params={"id": friend.id, "datatype": "jsonp", "callback": "cb"}).text
    assert text == "cb(%s)" % webqq.json_dumps([friend.to_json()])
    assert get(env.url, "search_friend", params={"foo": "bar"}).json() == {"code": 100, "status": "object not found"}
    assert get(env.url, "search_friend").json() == {"code": 100, "status": "object not found"}
    assert get(env.url, "search_friend?id=%d&id=%d" % (friend.id, friend.id)).json()["code"] == 100
    assert get(env.url, "search_friend", params={"__class__": "x"}).json()["code"] == 100
    # POST form and JSON bodies
    assert post(env.url, "search_friend", data={"id": str(friend.id)}).json() == [friend.to_json()]
    assert post(env.url, "search_friend", json={"id": friend.id}).json() == [friend.to_json()]

    group = c.groups()[0]
    groups = get(env.url, "search_group", params={"uid": group.uid}).json()
    assert len(groups) == 1 and groups[0]["id"] == group.id and groups[0]["member"]
    assert get(env.url, "search_group", params={"gnumber": group.uid}).json()[0]["id"] == group.id
    assert get(env.url, "search_group", params={"name": "no such group"}).json() == {
        "code": 100, "status": "object not found"}


# -- sends --------------------------------------------------------------------------------------

def sent_texts(sim):
    return [s["text"] for s in sim.sent]


def test_send_friend_message_by_each_selector(env):
    c, sim = env.client.contacts, env.sim
    friend = [f for f in c.friends() if f.markname][0]
    for params in ({"id": friend.id}, {"uid": friend.uid}, {"name": friend.name},
                   {"displayname": friend.displayname}, {"id": friend.id, "name": friend.name}):
        text = "sel %s" % sorted(params)
        answer = get(env.url, "send_friend_message", params=dict(params, content=text)).json()
        assert set(answer) == {"code", "id", "info", "status"}
        assert (answer["code"], answer["info"], answer["status"]) == (0, "发送正常", "发送成功")
        assert isinstance(answer["id"], int)
        last = sim.sent[-1]
        assert (last["endpoint"], last["r"]["to"], last["text"], last["r"]["msg_id"]) == (
            "send_buddy_msg2", friend.id, text, answer["id"])
    # a markname is not a name
    assert get(env.url, "send_friend_message", params={"name": friend.markname, "content": "x"}).json() == {
        "code": 100, "id": None, "status": "friend not found"}


def test_ambiguous_name_uses_the_first_friend(env):
    c = env.client.contacts
    names = collections.Counter(f.name for f in c.friends())
    name = [n for n, k in names.items() if k > 1][0]
    first = [f for f in c.friends() if f.name == name][0]
    answer = get(env.url, "send_friend_message", params={"name": name, "content": "to the first"}).json()
    assert answer["code"] == 0 and env.sim.sent[-1]["r"]["to"] == first.id


def test_group_discuss_and_sess_sends(env):
    c, sim = env.client.contacts, env.sim
    group, discuss = c.groups()[0], c.discusses()[0]
    for params in ({"id": group.id}, {"uid": group.uid}, {"name": group.name}, {"displayname": group.displayname}):
        answer = post(env.url, "send_group_message", data=dict(params, content="群 %s" % sorted(params))).json()
        assert answer["code"] == 0 and sim.sent[-1]["r"]["group_uin"] == group.id
        assert sim.sent[-1]["text"] == "群 %s" % sorted(params)
    answer = post(env.url, "send_discuss_message", json={"id": discuss.id, "content": "讨论"}).json()
    assert answer["code"] == 0 and sim.sent[-1]["r"]["did"] == discuss.id
    member = other_members(env.client, group)[0]
    for params in ({"group_id": group.id, "id": member.id}, {"group_uid": group.uid, "uid": member.uid}):
        answer = get(env.url, "send_sess_message", params=dict(params, content="临时")).json()
        assert answer["code"] == 0
        last = sim.sent[-1]
        assert last["endpoint"] == "send_sess_msg2" and last["r"]["to"] == member.id
        assert last["r"]["service_type"] == 0
    dmember = [m for m in discuss.members if str(m.id) != str(env.client.user.id)][0]
    answer = get(env.url, "send_sess_message",
                 params={"discuss_id": discuss.id, "uid": dmember.uid, "content": "讨论临时"}).json()
    assert answer["code"] == 0 and sim.sent[-1]["r"]["service_type"] == 1
    assert str(sim.sent[-1]["r"]["to"]) == str(dmember.id)


def test_async_sends_answer_at_once_and_still_send(env):
    c, sim = env.client.contacts, env.sim
    friend, group, discuss = c.friends()[0], c.groups()[1], c.discusses()[0]
    for path, target in (("send_friend_message", friend), ("send_group_message", group),
                         ("send_discuss_message", discuss)):
        text = "async %s" % path
        answer = get(env.url, path, params={"id": target.id, "content": text, "async": "1"})
        assert answer.json() == {"code": 0, "status": "request already in execution"}
        assert wait_until(lambda: text in sent_texts(sim))
    before = len(sim.sent)
    assert get(env.url, "send_friend_message", params={"id": friend.id, "content": "a0", "async": "0"}).json()["id"]
    assert len(sim.sent) == before + 1


def test_percent_encoded_chinese_plus_and_newline(env):
    friend = env.client.contacts.friends()[1]
    answer = get(env.url, "send_friend_message?id=%d&content=%%E4%%BD%%A0%%E5%%A5%%BD+world%%0aline%%2B2" % friend.id)
    assert answer.json()["code"] == 0
    assert env.sim.sent[-1]["text"] == "你好 world\nline+2"
    # unencoded UTF-8 in the query, and a form body with + and %0A
    host = env.url.split("//")[1]
    raw = raw_request(env.url, ("GET /openqq/send_friend_message?id=%d&content=直接 HTTP/1.1\r\nHost: %s\r\n\r\n"
                                % (friend.id, host)).encode("utf-8"))
    assert raw.startswith(b"HTTP/1.1 200") and env.sim.sent[-1]["text"] == "直接"
    body = "id=%d&content=%%E8%%A1%%A8%%E5%%8D%%95+a%%0Ab" % friend.id
    answer = post(env.url, "send_friend_message", data=body,
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.json()["code"] == 0 and env.sim.sent[-1]["text"] == "表单 a\nb"
    # multipart, as curl -F sends it
    answer = post(env.url, "send_friend_message", files={"id": (None, str(friend.id)), "content": (None, "多部分")})
    assert answer.json()["code"] == 0 and env.sim.sent[-1]["text"] == "多部分"


def test_not_found_and_missing_parameter_codes(env):
    c = env.client.contacts
    group, discuss = c.groups()[0], c.discusses()[0]
    member = other_members(env.client, group)[0]
    cases = [
        ("send_friend_message", {"id": 1, "content": "x"}, {"code": 100, "id": None, "status": "friend not found"}),
        ("send_friend_message", {"content": "x"}, {"code": 100, "id": None, "status": "friend not found"}),
        ("send_group_message", {"id": 1, "content": "x"}, {"code": 101, "id": None, "status": "group not found"}),
        ("send_discuss_message", {"id": 1, "content": "x"}, {"code": 102, "id": None, "status": "discuss not found"}),
        ("send_discuss_message", {"id": 1, "content": "x", "async": 1},
         {"code": 102, "id": None, "status": "discuss not found"}),
        ("send_sess_message", {"group_id": group.id, "id": 1, "content": "x"},
         {"code": 103, "id": None, "status": "group member not found"}),
        ("send_sess_message", {"group_id": 1, "id": member.id, "content": "x"},
         {"code": 103, "id": None, "status": "group member not found"}),
        ("send_sess_message", {"discuss_id": discuss.id, "id": 1, "content": "x"},
         {"code": 104, "id": None, "status": "discuss member not found"}),
        ("send_sess_message", {"id": member.id, "content": "x"},
         {"code": 105, "id": None, "status": "discuss member or group member  not found"}),
        ("send_friend_message", {"id": c.friends()[0].id}, {"code": 106, "id": None, "status": "content missing"}),
        ("send_group_message", {"id": group.id, "content": "", "async": 1},
         {"code": 106, "id": None, "status": "content missing"}),
        ("send_sess_message", {"group_id": group.id, "id": member.id},
         {"code": 106, "id": None, "status": "content missing"}),
        ("shutup_group_member", {"group_id": 1, "member_id": member.id, "time": 1},
         {"code": 100, "status": "object not found"}),
        ("shutup_group_member", {"group_id": group.id, "member_id": member.id},
         {"code": 400, "status": "shutup time missing or error"}),
        ("shutup_group_member", {"group_id": group.id, "member_id": member.id, "time": "0"},
         {"code": 400, "status": "shutup time missing or error"}),
        ("shutup_group_member", {"group_id": group.id, "member_id": member.id, "time": "1.5"},
         {"code": 400, "status": "shutup time missing or error"}),
        ("kick_group_member", {"group_id": group.id}, {"code": 200, "status": "member id empty"}),
        ("kick_group_member", {"group_uid": group.uid, "member_uid": "1,2"}, {"code": 100, "status": "member 1 not found"}),
    ]
    before = len(env.sim.sent), len(env.sim.admin_actions)
    for path, params, expected in cases:
        answer = get(env.url, path, params=params)
        assert (answer.status_code, answer.json()) == (200, expected), (path, params)
    assert (len(env.sim.sent), len(env.sim.admin_actions)) == before


def test_sync_send_failure_gives_the_final_code(env):
    friend = env.client.contacts.friends()[3]
    env.sim.fault("/channel/send_buddy_msg2", retcode=100001, count=3)
    answer = get(env.url, "send_friend_message", params={"id": friend.id, "content": "doomed"}).json()
    assert (answer["code"], answer["info"], answer["status"]) == (-5, "未识别返回值:100001", "发送失败")


# -- group admin ----------------------------------------------------------------------------

def test_shutup_and_kick(env):
    client, sim = env.client, env.sim
    group = admin_group(client)
    targets = [m for m in group.members if m.role == "member"][:3]
    answer = get(env.url, "shutup_group_member",
                 params={"group_uid": group.uid, "member_uid": "%s,%s" % (targets[0].uid, targets[1].uid), "time": 2})
    assert answer.json() == {"code": 0, "status": "success"}
    action = sim.admin_actions[-1]
    assert (action["action"], action["members"], action["seconds"]) == (
        "set_group_shutup", [targets[0].uid, targets[1].uid], 120)
    answer = post(env.url, "shutup_group_member", json={"group_id": group.id, "member_id": [targets[0].id], "time": 1})
    assert answer.json() == {"code": 0, "status": "success"} and sim.admin_actions[-1]["seconds"] == 60
    answer = get(env.url, "kick_group_member", params={"group_id": group.id, "member_id": targets[2].id})
    assert answer.json() == {"code": 0, "status": "success"}
    assert sim.admin_actions[-1]["action"] == "delete_group_member"
    assert targets[2] not in group.members
    lost = env.receiver.wait(lambda r: r.get("event") == "lose_group_member")
    assert lost["params"][0]["id"] == targets[2].id and lost["params"][1]["id"] == group.id
    # QQ refuses to mute an admin or the owner: 201
    boss = [m for m in group.members if m.role in ("owner", "admin")][0]
    answer = get(env.url, "shutup_group_member", params={"group_id": group.id, "member_id": boss.id, "time": 5})
    assert answer.json() == {"code": 201, "status": "failure"}


# -- malformed requests, unknown paths, client info ----------------------------------------------

def test_malformed_requests_get_json_errors(env):
    bad_utf8 = get(env.url, "send_friend_message?name=%a5%bd&content=hello")
    assert bad_utf8.status_code == 400
    assert bad_utf8.json() == {"code": -9, "status": "parameters must be UTF-8 (percent-encoded or not)"}
    bad_json = post(env.url, "send_friend_message", data=b"{nope", headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["code"] == -9
    not_object = post(env.url, "search_friend", json=[1, 2])
    assert not_object.status_code == 400 and not_object.json()["status"] == "a JSON body must be an object"
    for method, path in (("GET", "nope"), ("POST", "get_user_info"), ("POST", "relogin"), ("PUT", "check_event")):
        answer = requests.request(method, env.url + "/openqq/" + path, timeout=5)
        assert (answer.status_code, answer.json()) == (403, {"code": -8, "status": "api not found"})
    assert requests.get(env.url + "/", timeout=5).json()["code"] == -8
    host = env.url.split("//")[1]
    odd = raw_request(env.url, "BREW /openqq/get_user_info HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
    assert odd.startswith(b"HTTP/1.1 405 ") and b'"code":-9' in odd and b"Allow: OPTIONS, HEAD, GET, POST" in odd
    garbage = raw_request(env.url, b"\x16\x03\x01 hello\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 ") and b'"code":-9' in garbage
    chunked = raw_request(env.url, "POST /openqq/search_friend HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n"
                          "Content-Type: application/x-www-form-urlencoded\r\n\r\n4\r\nid=1\r\n0\r\n\r\n" % host)
    assert chunked.startswith(b"HTTP/1.1 200 ") and b'"object not found"' in chunked
    form = "POST /openqq/search_friend HTTP/1.1\r\nHost: %s\r\nContent-Type: application/x-www-form-urlencoded\r\n" % host
    twice = raw_request(env.url, form + "Content-Length: 4\r\nContent-Length: 4\r\n\r\nid=1")
    assert twice.startswith(b"HTTP/1.1 200 ") and b'"object not found"' in twice
    smuggled = raw_request(env.url, form + "Content-Length: 4\r\nContent-Length: 40\r\n\r\nid=1")
    assert smuggled.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in smuggled
    assert smuggled.endswith(b'{"code":-9,"status":"conflicting Content-Length headers"}')


def test_size_time_and_connection_limits(env):
    plugin = load_openqq(env.client, max_body_size=100, request_timeout=0.5)
    url, port = plugin.urls[0], plugin.servers[0].port
    big = post(url, "search_friend", data={"name": "x" * 200})
    assert big.status_code == 413 and big.json() == {"code": -9, "status": "request body over 100 bytes"}
    assert big.headers["Connection"] == "close"
    silent = socket.create_connection(("127.0.0.1", port), timeout=5)
    started = time.time()
    assert silent.recv(100) == b"" and time.time() - started < 2      # closed after request_timeout
    silent.close()
    plugin.stop()
    plugin = load_openqq(env.client, max_connections=2)     # held connections stay for request_timeout (60 s)
    url, port = plugin.urls[0], plugin.servers[0].port
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    time.sleep(0.1)
    third = raw_request(url, "GET /openqq/get_user_info HTTP/1.1\r\nHost: x\r\n\r\n")
    assert third.startswith(b"HTTP/1.1 503 ") and b"too many connections" in third
    for sock in held:
        sock.close()
    assert wait_until(lambda: get(url, "get_client_info").status_code == 200)
    plugin.stop()


def test_get_client_info(env):
    info = get(env.url, "get_client_info").json()
    assert CLIENT_INFO_KEYS <= set(info)
    assert (info["code"], info["status"], info["state"], info["account"]) == (0, "success", "running", "default")
    assert types({k: info[k] for k in ("pid", "runtime", "starttime")}) == {"pid": "int", "runtime": "int",
                                                                          "starttime": "int"}
    assert {"post_api_sent", "post_api_retried", "post_api_dropped", "post_api_failed",
            "check_event_dropped"} <= set(info)
    assert post(env.url, "get_client_info").json()["code"] == 0


# -- JSONP and CORS ---------------------------------------------------------------------------------

def test_jsonp(env):
    plain = get(env.url, "get_user_info").text
    wrapped = get(env.url, "get_user_info", params={"datatype": "jsonp", "callback": "jQuery.cb_1$"})
    assert wrapped.text == "jQuery.cb_1$(%s)" % plain
    assert wrapped.headers["Content-Type"].startswith("application/javascript")
    default = get(env.url, "get_user_info", params={"datatype": "jsonp"}).text
    assert default.startswith("jsoncallback") and default.endswith("(%s)" % plain)
    evil = get(env.url, "get_user_info", params={"datatype": "jsonp", "callback": "alert(1);x"})
    assert evil.status_code == 400 and evil.json()["code"] == -9 and "alert" not in evil.text


def test_cross_site_requests_are_refused(env):
    refused = {"code": -6, "status": "cross-site request refused"}
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "cross-site", "Referer": "http://evil.example/page"},
                    {"Sec-Fetch-Site": "same-site"}):
        answer = get(env.url, "send_friend_message", params={"id": 1, "content": "x"}, headers=headers)
        assert (answer.status_code, answer.json()) == (403, refused), headers
        assert "Access-Control-Allow-Origin" not in answer.headers
    same = get(env.url, "get_user_info", headers={"Origin": env.url, "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 200 and same.headers["Access-Control-Allow-Origin"] == env.url
    typed = get(env.url, "get_user_info", headers={"Sec-Fetch-Site": "none"})
    assert typed.status_code == 200


def test_allowed_origin_gets_cors_headers(env):
    plugin = load_openqq(env.client, allow_origin="https://app.example, http://other.example")
    url = plugin.urls[0]
    answer = get(url, "get_user_info", headers={"Origin": "https://app.example"})
    assert answer.status_code == 200
    assert (answer.headers["Access-Control-Allow-Origin"], answer.headers["Vary"]) == ("https://app.example", "Origin")
    pre = requests.options(url + "/openqq/send_friend_message", headers={"Origin": "https://app.example"}, timeout=5)
    assert pre.status_code == 200 and pre.content == b""
    assert pre.headers["Access-Control-Allow-Methods"] == "OPTIONS, HEAD, GET, POST"
    assert pre.headers["Access-Control-Allow-Headers"] == (
        "X-Requested-With, X-Auth-Token, Content-Type, Content-Length, Authorization")
    assert get(url, "get_user_info", headers={"Origin": "https://evil.example"}).status_code == 403
    star = load_openqq(env.client, allow_origin="*")
    answer = get(star.urls[0], "get_user_info", headers={"Origin": "https://anywhere.example"})
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == "*"


# -- TLS -----------------------------------------------------------------------------------------

def test_tls_listen_and_a_tls_poller_that_hangs_up(env, self_signed):
    cert = self_signed
    plugin = load_openqq(env.client, listen=[{"host": "127.0.0.1", "port": 0, "tls_cert": cert, "tls_key": cert}],
                         check_event_timeout=3)
    url = plugin.urls[0]
    assert url.startswith("https://")
    assert get(url, "get_user_info", verify=cert).json() == env.client.contacts.user.to_json()
    with pytest.raises(requests.ConnectionError):
        get(url.replace("https", "http"), "get_user_info", timeout=3)
    ctx = ssl.create_default_context(cafile=cert)
    port = plugin.servers[0].port
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1") as sock:
        sock.sendall(b"GET /openqq/check_event HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(0.2)
    time.sleep(0.1)
    friend = env.client.contacts.friends()[0]
    get(env.url, "send_friend_message", params={"id": friend.id, "content": "over tls"})
    assert [e["content"] for e in get(url, "check_event", verify=cert).json()] == ["over tls"]
    plugin.stop()


# -- tokens and protected mode ------------------------------------------------------------------

def test_access_token(env):
    token = "s3cret-Tok"
    plugin = load_openqq(env.client, access_token=token)
    url = plugin.urls[0]
    failure = {"code": -6, "status": "auth failure"}
    lines = LogLines()
    for kwargs in ({}, {"params": {"access_token": "wrong"}}, {"headers": {"Authorization": "Bearer wrong"}},
                   {"headers": {"Authorization": "Basic %s" % token}}):
        answer = get(url, "get_user_info", **kwargs)
        assert (answer.status_code, answer.json()) == (403, failure), kwargs
    for path in ("check_event", "stop_client", "relogin", "get_client_info", "nope"):
        assert get(url, path).status_code == 403
    assert requests.options(url + "/openqq/get_user_info", timeout=5).status_code == 403
    assert get(url, "get_user_info", params={"access_token": token}).status_code == 200
    assert get(url, "get_user_info", headers={"Authorization": "Bearer " + token}).status_code == 200
    assert post(url, "search_friend", data={"access_token": token, "id": "1"}).json()["code"] == 100
    assert post(url, "search_friend", json={"access_token": token, "id": 1}).json()["code"] == 100
    assert requests.options(url + "/openqq/get_user_info?access_token=" + token, timeout=5).status_code == 200
    lines.close()
    assert any("access_token=***" in line for line in lines.lines)
    assert not any(token in line for line in lines.lines)


def test_auth_callback(env):
    seen = []

    def auth(params, request):
        seen.append((params.get("who"), request.path))
        if params.get("who") == "boom":
            raise RuntimeError("boom")
        return params.get("who") == "me"

    url = load_openqq(env.client, auth=auth).urls[0]
    assert get(url, "get_user_info", params={"who": "me"}).status_code == 200
    assert get(url, "get_user_info", params={"who": "you"}).json() == {"code": -6, "status": "auth failure"}
    assert get(url, "get_user_info", params={"who": "boom"}).status_code == 403
    assert seen[0] == ("me", "/openqq/get_user_info")


def test_protected_mode(tmp_path):
    client = webqq.Client(tmpdir=str(tmp_path), qrcode_display="none")
    assert client.load("openqq", listen=[{"host": "0.0.0.0", "port": 0}]) is None
    assert client.load("openqq", listen="127.0.0.1:0, 0.0.0.0:0") is None
    assert client.plugins == []
    guarded = load_openqq(client, listen=[{"host": "0.0.0.0", "port": 0}], access_token="t")
    insecure = load_openqq(client, listen=[{"host": "0.0.0.0", "port": 0}], allow_insecure="1")
    local = load_openqq(client, listen="localhost:0")
    assert len(client.plugins) == 3
    for plugin in (guarded, insecure, local):
        plugin.stop()


# -- requests while the client is not running ----------------------------------------------------

def test_requests_while_scanning_answer_503_at_once(tmp_path):
    sim = Simulator(world={"friends": 2, "groups": 1, "members": 3, "discusses": 0, "seed": 3}, poll_hold=1.0)
    sim.start()
    client = webqq.Client(smartqq_base=sim.url, tmpdir=str(tmp_path), qr_check_interval=0.05,
                          qrcode_display="none", log_level="debug")
    try:
        plugin = load_openqq(client, check_event_timeout=0.3)
        url = plugin.urls[0]
        answer = get(url, "get_friend_info")
        assert (answer.status_code, answer.json()["state"]) == (503, "init")
        client.start()
        assert sim.wait_qr("waiting", timeout=10) and client.wait_for_state("scaning", timeout=5)
        for path in ("get_user_info", "send_friend_message?id=1&content=x", "search_friend?id=1",
                     "kick_group_member?group_id=1&member_id=2"):
            started = time.time()
            answer = get(url, path, timeout=5)
            assert time.time() - started < 1
            assert answer.status_code == 503 and answer.headers["Retry-After"] == "3"
            assert answer.json() == {"code": -7, "status": "client not running", "state": "scaning"}
        assert get(url, "check_event").json() == []
        assert get(url, "get_client_info").json()["state"] == "scaning"
    finally:
        client.stop()
        sim.stop()


# -- check_event --------------------------------------------------------------------------------

@pytest.fixture
def hub_env(env):
    """A plugin of its own on the shared client (its own check_event queue), with a 1 s long poll
    and room for 5 events; inject(n) makes n friend messages arrive."""
    plugin = load_openqq(env.client, check_event_list_max_size=5, check_event_timeout=1)
    counter = [0]

    def inject(n=1, tag="m"):
        friend = env.sim.world.friends[0]
        texts = []
        for _ in range(n):
            counter[0] += 1
            texts.append("%s-%d-%s" % (tag, counter[0], time.time()))
            env.sim.inject_friend_message(friend.uin, texts[-1])
        assert wait_until(lambda: all(t in [i.get("content") for _, i in plugin.hub.history] for t in texts))
        return texts

    yield collections.namedtuple("HubEnv", "plugin url inject")(plugin, plugin.urls[0], inject)
    plugin.stop()


@pytest.mark.slow
def test_check_event_drains_everything_at_once(env, hub_env):
    texts = hub_env.inject(3)
    started = time.time()
    events = get(hub_env.url, "check_event").json()
    assert time.time() - started < 0.5
    assert [e["content"] for e in events] == texts
    friend = env.sim.world.friends[0]
    assert events[0] == dict(events[0], **{"post_type": "receive_message", "class": "recv", "type": "friend_message",
                                           "sender_id": friend.uin, "sender_uid": friend.qq})
    assert set(events[0]) == {"class", "id", "type", "time", "content", "sender", "sender_id", "sender_uid",
                              "receiver", "receiver_id", "receiver_uid", "post_type"}
    assert get(hub_env.url, "check_event").json() == []


@pytest.mark.slow
def test_check_event_long_poll_and_timeout(hub_env):
    started = time.time()
    assert get(hub_env.url, "check_event").json() == []
    assert 0.9 <= time.time() - started < 1.8
    result = {}

    def poll():
        result["events"] = get(hub_env.url, "check_event").json()
        result["at"] = time.time()

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.3)
    texts = hub_env.inject(1)
    injected = time.time()
    t.join(5)
    assert [e["content"] for e in result["events"]] == texts
    assert result["at"] - injected < 0.5


def test_check_event_overflow_drops_the_oldest(hub_env):
    before = hub_env.plugin.hub.dropped
    texts = hub_env.inject(7)
    events = get(hub_env.url, "check_event").json()
    assert [e["content"] for e in events] == texts[-5:]
    assert hub_env.plugin.hub.dropped - before == 2
    assert get(hub_env.url, "get_client_info").json()["check_event_dropped"] == hub_env.plugin.hub.dropped


def test_two_concurrent_pollers_never_get_null(hub_env):
    results = []

    def poll():
        results.append(get(hub_env.url, "check_event").json())

    threads = [threading.Thread(target=poll) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    texts = hub_env.inject(1)
    for t in threads:
        t.join(5)
    empty, full = sorted(results, key=len)
    assert empty == [] and [e["content"] for e in full] == texts


def test_a_poller_that_hangs_up_takes_nothing(hub_env):
    host = hub_env.url.split("//")[1]
    port = int(host.split(":")[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(("GET /openqq/check_event HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode())
    time.sleep(0.2)
    sock.close()
    time.sleep(0.1)
    texts = hub_env.inject(1)
    time.sleep(0.1)
    assert [e["content"] for e in get(hub_env.url, "check_event").json()] == texts


@pytest.mark.slow
def test_cursor_mode_lets_every_consumer_see_every_event(hub_env):
    hub_env.inject(1)               # a run's first number is the time in ms; the next ones follow it
    get(hub_env.url, "check_event")
    start = hub_env.plugin.hub.seq
    texts = hub_env.inject(3)
    first = get(hub_env.url, "check_event", params={"cursor": start})
    second = get(hub_env.url, "check_event", params={"cursor": start})
    for answer in (first, second):
        events = answer.json()
        assert [e["content"] for e in events] == texts
        assert [e["cursor"] for e in events] == [start + 1, start + 2, start + 3]
        assert answer.headers["X-Cursor"] == str(start + 3)
    # the plain queue is untouched by cursor readers
    assert [e["content"] for e in get(hub_env.url, "check_event").json()] == texts
    # waiting with a cursor: [] on timeout, then the next event
    started = time.time()
    empty = get(hub_env.url, "check_event", params={"cursor": start + 3})
    assert empty.json() == [] and empty.headers["X-Cursor"] == str(start + 3) and time.time() - started >= 0.9
    more = hub_env.inject(1)
    assert [e["content"] for e in get(hub_env.url, "check_event", params={"cursor": start + 3}).json()] == more
    # a cursor ahead of every number starts over, one below them (an earlier run's) gets every event kept;
    # a bad one is refused
    kept = [seq for seq, _ in hub_env.plugin.hub.history]
    for cursor in (10 ** 15, 1):
        assert [e["cursor"] for e in get(hub_env.url, "check_event", params={"cursor": cursor}).json()] == kept
    assert get(hub_env.url, "check_event", params={"cursor": "x"}).json()["code"] == -9


# -- post_api ----------------------------------------------------------------------------------------

def test_post_api_message_reports(env):
    sim, receiver = env.sim, env.receiver
    world = sim.world
    friend, group, discuss = world.friends[4], world.groups[0], world.discusses[0]
    member = world.others(group)[0]
    dmember = world.others(discuss)[0]
    base = {"class", "id", "type", "time", "content", "sender", "sender_id", "sender_uid", "post_type"}
    receiver_keys = {"receiver", "receiver_id", "receiver_uid"}

    sim.inject_friend_message(friend.uin, "pa-friend")
    r = receiver.wait(lambda r: r.get("content") == "pa-friend")
    assert set(r) == base | receiver_keys
    assert (r["post_type"], r["type"], r["class"], r["sender_id"], r["sender_uid"], r["receiver_uid"]) == (
        "receive_message", "friend_message", "recv", friend.uin, friend.qq, world.user.qq)

    sim.inject_group_message(group.gid, member.uin, "pa-group")
    r = receiver.wait(lambda r: r.get("content") == "pa-group")
    assert set(r) == base | receiver_keys | {"group", "group_id", "group_uid"}
    assert (r["type"], r["group_id"], r["group_uid"], r["sender_uid"]) == ("group_message", group.gid, group.qq,
                                                                          member.qq)

    sim.inject_discuss_message(discuss.did, dmember.uin, "pa-discuss")
    r = receiver.wait(lambda r: r.get("content") == "pa-discuss")
    assert set(r) == base | receiver_keys | {"discuss", "discuss_id"}
    assert r["sender_id"] == dmember.uin      # a number, as the poll gave it (members' ids are strings)

    sim.inject_sess_message("group", group.gid, member.uin, "pa-sess")
    r = receiver.wait(lambda r: r.get("content") == "pa-sess")
    assert (r["type"], r["via"], r["group_id"]) == ("sess_message", "group", group.gid)

    answer = get(env.url, "send_group_message", params={"id": group.gid, "content": "pa-sent"}).json()
    r = receiver.wait(lambda r: r.get("content") == "pa-sent")
    assert set(r) == base | {"group", "group_id", "group_uid", "from", "ttl", "source", "code", "msg", "info"}
    assert (r["post_type"], r["class"], r["from"], r["code"], r["msg"], r["id"], r["source"]) == (
        "send_message", "send", "api", 0, "发送成功", answer["id"], "local")
    hit = [h for h in receiver.hits if b"pa-sent" in h.body][0]
    assert hit.method == "POST" and hit.headers["Content-Type"] == "application/json"
    assert "X-Signature" not in hit.headers


def test_post_api_reply_and_shutup(env):
    sim, client, receiver = env.sim, env.client, env.receiver
    world = sim.world
    friend = world.friends[5]
    receiver.script.append(Answer(200, json.dumps({"reply": "你好", "code": 0}).encode(),
                                  "application/json; charset=utf-8"))
    sim.inject_friend_message(friend.uin, "reply to me")
    assert wait_until(lambda: any(s["text"] == "你好" and s["r"]["to"] == friend.uin for s in sim.sent))
    reply = receiver.wait(lambda r: r.get("content") == "你好" and r["post_type"] == "send_message")
    assert reply["from"] == "code"

    group = admin_group(client)
    member = [m for m in group.members if m.role == "member" and m.id != client.user.id][0]
    receiver.script.append(Answer(200, b'{"reply":"shh","shutup":1,"shutup_time":300}', "text/json"))
    sim.inject_group_message(group.id, member.id, "spam spam")
    assert wait_until(lambda: any(s["text"] == "shh" for s in sim.sent))
    assert wait_until(lambda: sim.admin_actions and sim.admin_actions[-1]["members"] == [member.uid])
    assert (sim.admin_actions[-1]["action"], sim.admin_actions[-1]["seconds"]) == ("set_group_shutup", 300)

    # a non-JSON answer, invalid JSON, an array, or an empty reply: nothing happens
    before = len(sim.sent)
    receiver.script.append(Answer(200, b'{"reply":"no"}'))
    receiver.script.extend(Answer(status, body, "application/json") for status, body in (
        (200, b"{oops"), (200, b'["no"]'), (200, b'{"reply":""}'), (500, b'{"reply":"no"}')))
    for n in range(5):
        sim.inject_friend_message(friend.uin, "ignored %d" % n)
        receiver.wait(lambda r, n=n: r.get("content") == "ignored %d" % n)
    time.sleep(0.2)
    assert len(sim.sent) == before


def test_post_api_signature_and_retries(env, make_receiver):
    receiver = make_receiver()
    plugin = load_openqq(env.client, post_api=receiver.url, post_secret="k3y", post_event_list="")
    receiver.script.extend(Answer(status, b"busy") for status in (503, 502, 504))
    friend = env.client.contacts.friends()[6]
    get(env.url, "send_friend_message", params={"id": friend.id, "content": "signed", "async": 1})
    report = receiver.wait(lambda r: r.get("content") == "signed", count=4)
    hits = [h for h in receiver.hits if b"signed" in h.body]
    assert len(hits) == 4
    body = hits[-1].body
    assert hits[-1].headers["X-Signature"] == "sha1=" + hmac.new(b"k3y", body, hashlib.sha1).hexdigest()
    assert report["post_type"] == "send_message"
    assert wait_until(lambda: plugin.reporter.counters()["sent"] == 1)
    counts = plugin.reporter.counters()
    assert (counts["retried"], counts["failed"], counts["queued"]) == (3, 0, 0)
    # a 500 is not retried
    receiver.script.append(Answer(500, b"bug"))
    get(env.url, "send_friend_message", params={"id": friend.id, "content": "once", "async": 1})
    receiver.wait(lambda r: r.get("content") == "once")
    assert wait_until(lambda: plugin.reporter.counters()["failed"] == 1)
    time.sleep(0.2)
    assert len([h for h in receiver.hits if b'"once"' in h.body]) == 1
    plugin.stop()


@pytest.mark.slow
def test_post_api_down_or_slow_never_blocks(env, make_receiver):
    dead_url = "http://127.0.0.1:%d/post" % free_port()
    slow = make_receiver(respond=lambda hit: Answer(200, b"late", delay=3))
    down = load_openqq(env.client, post_api=dead_url, post_retries=2)
    late = load_openqq(env.client, post_api=slow.url, post_timeout=0.3, post_workers=2)
    hub = load_openqq(env.client)
    friend = env.sim.world.friends[7]
    started = time.time()
    for n in range(6):
        env.sim.inject_friend_message(friend.uin, "through %d" % n)
    assert wait_until(lambda: len([1 for _, i in hub.hub.history if str(i.get("content")).startswith("through")]) == 6,
                      timeout=5)
    assert time.time() - started < 3
    assert wait_until(lambda: down.reporter.counters()["failed"] == 6)
    counts = down.reporter.counters()
    assert (counts["sent"], counts["retried"]) == (0, 12)
    assert wait_until(lambda: late.reporter.counters()["failed"] >= 2)
    assert late.reporter.counters()["retried"] == 0
    stop_started = time.time()
    for plugin in (down, late, hub):
        plugin.stop()
    assert time.time() - stop_started < 6


def test_post_api_queue_bound(env, make_receiver):
    hold = threading.Event()

    def respond(hit):
        hold.wait(10)        # then 200 "ok"
    receiver = make_receiver(respond=respond)
    try:
        plugin = load_openqq(env.client, post_api=receiver.url, post_queue_size=3, post_workers=1,
                             post_event_list="")
        friend = env.client.contacts.friends()[0]
        get(env.url, "send_friend_message", params={"id": friend.id, "content": "q0", "async": 1})
        assert wait_until(lambda: len(receiver.hits) == 1)    # the worker holds q0, waiting for the answer
        for n in range(1, 6):
            get(env.url, "send_friend_message", params={"id": friend.id, "content": "q%d" % n, "async": 1})
        assert wait_until(lambda: plugin.reporter.counters()["dropped"] == 2)
        hold.set()
        assert wait_until(lambda: plugin.reporter.counters()["sent"] == 4)
        got = [r["content"] for r in receiver.reports()]
        assert got == ["q0", "q3", "q4", "q5"]
        plugin.stop()
    finally:
        hold.set()


@pytest.mark.slow
def test_post_api_events_and_stdout(sim, make_client, make_receiver, capfd):
    receiver, extra = make_receiver(), make_receiver()
    client = make_client(update_interval=0.5)
    main = load_openqq(client, post_api=receiver.url, post_stdout=1)
    load_openqq(client, post_api=extra.url, post_event_list="new_discuss_member lose_discuss_member")
    quiet = load_openqq(client, post_event=0)
    client.start()
    qr = receiver.wait(lambda r: r.get("event") == "input_qrcode")
    assert qr["post_type"] == "event" and qr["params"][0] == client.qrcode_path
    assert qr["params"][1].endswith("\n") and qr["params"][1].replace("\n", "")
    scan_and_confirm(sim)
    assert receiver.wait(lambda r: r.get("event") == "login")["params"] == [1]
    receiver.wait(lambda r: r.get("params") == ["updating", "running"])
    changes = [r["params"] for r in receiver.reports(lambda r: r.get("event") == "state_change")]
    assert changes[0] == ["init", "loading"] and changes[-1] == ["updating", "running"]
    group = sim.world.groups[0]
    assert wait_until(lambda: client.contacts.group(group.gid).members_loaded)
    new_friend = sim.add_friend(nick="新朋友")
    gone = sim.world.friends[-2]
    sim.remove_friend(gone.uin)
    new_member = sim.add_member(group.gid, nick="新成员")
    r = receiver.wait(lambda r: r.get("event") == "new_friend")
    assert r["params"][0]["id"] == new_friend.uin and set(r["params"][0]) == FRIEND_KEYS
    assert receiver.wait(lambda r: r.get("event") == "lose_friend")["params"][0]["id"] == gone.uin
    r = receiver.wait(lambda r: r.get("event") == "new_group_member")
    assert r["params"][0]["id"] == new_member.uin and r["params"][1]["id"] == group.gid
    assert r["params"][1]["member"]
    new_group = sim.add_group(name="新群")
    r = receiver.wait(lambda r: r.get("event") == "new_group")
    assert r["params"][0]["id"] == new_group.gid and set(r["params"][0]) == GROUP_KEYS | {"member"}
    sim.remove_group(new_group.gid)
    assert receiver.wait(lambda r: r.get("event") == "lose_group")["params"][0]["id"] == new_group.gid
    discuss = sim.world.discusses[0]
    newcomer = sim.add_discuss_member(discuss.did, nick="讨论新人")
    r = extra.wait(lambda r: r.get("event") == "new_discuss_member")
    assert r["params"][0]["id"] == str(newcomer.uin) and r["params"][1]["id"] == discuss.did
    assert not extra.reports(lambda r: r.get("event") != "new_discuss_member")
    # property changes are not in the default list; check_event queues contact events only
    assert not receiver.reports(lambda r: str(r.get("event")).endswith("_property_change"))
    queued = {item.get("event") for _, item in main.hub.history}
    assert {"new_friend", "lose_friend", "new_group_member", "new_group", "lose_group"} <= queued
    assert not queued & {"login", "state_change", "input_qrcode", "stop"}
    assert list(quiet.hub.history) == []
    client.stop()
    assert receiver.reports(lambda r: r.get("event") == "stop")[0]["params"] == []
    lines = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    assert {"event": "login", "params": [1], "post_type": "event"} in lines


# -- poll_api -------------------------------------------------------------------------------------

def test_poll_api_follows_redirects_into_its_own_api_only(env, make_receiver):
    foreign = make_receiver()
    poll = make_receiver(respond=lambda hit: Answer(204, b""))
    friend = env.client.contacts.friends()[2]
    plugin = load_openqq(env.client, poll_api=poll.url, poll_interval=0.05)
    own = "%s/openqq/send_friend_message?id=%d&content=%%E6%%9D%%A5%%E8%%87%%AA+poll" % (plugin.urls[0], friend.id)
    outside = foreign.base + "/openqq/send_friend_message?id=%d&content=no" % friend.id
    other_port = "%s/openqq/send_friend_message?id=%d&content=no" % (env.url, friend.id)
    poll.script.extend([Answer(302, b"", location=own), Answer(302, b"", location=outside),
                        Answer(301, b"", location=other_port), Answer(500, b"x")])
    assert wait_until(lambda: "来自 poll" in sent_texts(env.sim))
    assert wait_until(lambda: not poll.script and len(poll.hits) >= 6)
    assert foreign.hits == [] and "no" not in sent_texts(env.sim)
    assert plugin.owns(own) and not plugin.owns(outside) and not plugin.owns(other_port)
    assert plugin.owns(own.replace("127.0.0.1", "localhost"))
    assert not plugin.owns(env.url + "/elsewhere") and not plugin.owns("ftp://127.0.0.1/openqq/x")
    plugin.stop()
    count = len(poll.hits)
    time.sleep(0.2)
    assert len(poll.hits) == count


# -- control routes and stopping ------------------------------------------------------------------

def test_stop_client_stops_everything(sim, make_client, make_receiver):
    receiver = make_receiver()
    client = make_client()
    plugin = load_openqq(client, post_api=receiver.url, stop_delay=0.3, check_event_timeout=10)
    log_in(sim, client)
    url = plugin.urls[0]
    waiting = {}

    def poll():
        waiting["answer"] = get(url, "check_event").json()

    poller = threading.Thread(target=poll)
    poller.start()
    answer = get(url, "stop_client").json()
    assert set(answer) == {"account", "code", "pid", "runtime", "starttime", "status"}
    assert answer["status"] == "success, client(%d) will stop in 0.3 seconds" % client.pid
    assert client.wait_for_state("stop", timeout=10)
    poller.join(10)
    assert waiting["answer"] == []
    port = plugin.servers[0].port
    threads = plugin.reporter.threads + [s.thread for s in plugin.servers] + list(plugin.threads)
    assert wait_until(lambda: not any(t.is_alive() for t in threads), timeout=5)
    assert not [t for t in threading.enumerate() if t.name == "openqq-conn-%d" % port]
    assert receiver.wait(lambda r: r.get("event") == "stop")
    with pytest.raises(requests.ConnectionError):
        get(url, "get_client_info", timeout=2)


@pytest.mark.slow
def test_relogin_route(sim, make_client):
    client = make_client()
    plugin = load_openqq(client, stop_delay=0.1)
    log_in(sim, client)
    answer = get(plugin.urls[0], "relogin").json()
    assert answer == {"account": "default", "code": 0,
                      "status": "success, client(%d) will relogin in 0.1 seconds" % client.pid}
    if sim.wait_qr("waiting", timeout=3):
        sim.scan()
        sim.confirm()
    client.recorder.wait("relogin", timeout=15)
    assert client.wait_for_state("running", timeout=10)
