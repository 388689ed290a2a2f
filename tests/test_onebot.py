"""End-to-end tests of plugins/onebot.py: a OneBot v11 simulator in each quirk profile, a client
using it as its upstream with the Openqq plugin, and HTTP over real sockets, as a user's script
and NapCat / LLOneBot / go-cqhttp would talk to it."""
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

import webqq
from conftest import ROOT, Receiver, Recorder, free_port, wait_until
from onebot_sim import OneBotSimulator
from webqq_plugins import onebot

PROFILES = ("spec", "gocq", "napcat", "llonebot")
TOKEN, SECRET = "api-t0ken", "p0st-s3cret"
ME, ALICE, BOB, CAROL, DAVE, EVE = 10001, 20001, 20002, 40001, 40002, 50001
PERL, CHAT = 30001, 30002
JOINED, SPOKE = 1500000000, 1600000000
WORLD = {
    "self": {"user_id": ME, "nickname": "小灰", "sex": "male"},
    "friends": [{"user_id": ALICE, "nickname": "alice", "remark": "阿丽", "sex": "female"},
                {"user_id": BOB, "nickname": "bob", "remark": ""}],
    "strangers": [{"user_id": EVE, "nickname": "eve"}],
    "groups": [
        {"group_id": PERL, "group_name": "PERL学习交流", "max_member_count": 500,
         "members": [{"user_id": ME, "role": "admin", "join_time": JOINED, "last_sent_time": SPOKE},
                     {"user_id": ALICE, "role": "owner", "card": "Alice卡片", "join_time": JOINED,
                      "last_sent_time": SPOKE},
                     {"user_id": CAROL, "nickname": "carol", "card": "carol_card", "sex": "female",
                      "join_time": JOINED, "last_sent_time": SPOKE}]},
        {"group_id": CHAT, "group_name": "闲聊",
         "members": [{"user_id": ME, "join_time": JOINED, "last_sent_time": SPOKE},
                     {"user_id": DAVE, "nickname": "dave", "join_time": JOINED, "last_sent_time": SPOKE}]}]}


# -- helpers --------------------------------------------------------------------------------

def event(name):
    return lambda r: r.get("post_type") == "event" and r.get("event") == name


def received(content):
    return lambda r: r.get("post_type") == "receive_message" and r.get("content") == content


class Bridge(object):
    """A OneBot simulator, a client with the onebot upstream aimed at it, the Openqq API, a post_api."""

    def __init__(self, profile, tmpdir, knobs=None, client=None, openqq=None, **options):
        self.sim = OneBotSimulator(profile, WORLD, access_token=TOKEN, secret=SECRET, post_retry_interval=0.05,
                                   **(knobs or {})).start()
        self.post_api = Receiver()
        upstream = dict(url=self.sim.url, access_token=TOKEN, secret=SECRET, listen="127.0.0.1:0", send_rate=0)
        upstream.update(options)
        client_options = dict(tmpdir=tmpdir, send_interval=0, qrcode_display="none", log_level="info")
        client_options.update(client or {})
        self.client = webqq.Client(upstream="onebot", upstream_options=upstream, **client_options)
        self.recorder = Recorder(self.client)
        openqq_options = dict(listen=[{"host": "127.0.0.1", "port": 0}], post_api=self.post_api.url,
                              check_event_timeout=1, stop_delay=0.2, post_timeout=2)
        openqq_options.update(openqq or {})
        self.openqq = self.client.load("openqq", **openqq_options)
        self.base = self.openqq.urls[0] + "/openqq/"

    def start(self, running=True):
        self.client.start()
        if self.client.upstream is not None:
            self.sim.post_url = self.client.upstream.receiver.url
        if running:
            assert self.client.wait_for_state("running", timeout=10)
            assert wait_until(lambda: all(g.members_loaded for g in self.client.contacts.groups()))
        return self

    def get(self, route, **params):
        return requests.get(self.base + route, params=params, timeout=15)

    def calls(self, action):
        return [c for c in self.sim.calls if c["action"] == action]

    def flush(self):
        """What check_event holds once every event posted so far went through the bridge: a marker
        message is posted last, and the check_event queue is filled in dispatch order."""
        marker = "flush %s" % time.time()
        self.sim.post_private_message(ALICE, marker)
        self.post_api.wait(received(marker))
        items = self.get("check_event").json()
        assert items[-1]["content"] == marker
        return items[:-1]

    def close(self):
        self.client.stop()
        self.sim.stop()
        self.post_api.close()
        assert self.calls("set_restart") == [], "the bridge must never restart the implementation"


@pytest.fixture
def make_bridge(tmp_path):
    """make_bridge(profile, running=True, knobs=..., client=..., openqq=..., **onebot options)."""
    bridges = []

    def make(profile, running=True, **kwargs):
        if profile == "gocq":
            kwargs.setdefault("knobs", {}).setdefault("allow_temp_session", True)
        bridge = Bridge(profile, str(tmp_path / str(len(bridges))), **kwargs)
        bridges.append(bridge)
        return bridge.start(running)

    yield make
    for bridge in bridges:
        bridge.close()


@pytest.fixture(params=PROFILES)
def bridge(request, make_bridge):
    return make_bridge(request.param)


def member_json(uid, name, card=None, role="member", sex="unknown"):
    return {"card": card, "city": None, "client_type": "unknown", "country": None, "id": uid,
            "join_time": JOINED, "last_speak_time": SPOKE, "name": name, "province": None, "role": role,
            "sex": sex, "state": "unknown", "uid": uid}


def friend_json(uid, name, markname):
    return {"category": "", "client_type": "unknown", "face": 0, "flag": 0, "id": uid, "is_vip": 0,
            "markname": markname, "name": name, "state": "unknown", "uid": uid, "vip_level": 0}


PERL_JSON = {"code": None, "createtime": None, "id": PERL, "level": None, "markname": None, "max_admin": None,
             "max_member": 500, "memo": None, "name": "PERL学习交流", "owner_id": ALICE, "owner_uid": ALICE,
             "remark": None, "role": "manage", "uid": PERL}
CHAT_JSON = {"code": None, "createtime": None, "id": CHAT, "level": None, "markname": None, "max_admin": None,
             "max_member": 200, "memo": None, "name": "闲聊", "owner_id": None, "owner_uid": None,
             "remark": None, "role": "attend", "uid": CHAT}
PERL_MEMBERS = [member_json(ME, "小灰", role="admin", sex="male"),
                member_json(ALICE, "alice", "Alice卡片", "owner", "female"),
                member_json(CAROL, "carol", "carol_card", sex="female")]
CHAT_MEMBERS = [member_json(ME, "小灰", sex="male"), member_json(DAVE, "dave")]


def signed(body, secret=SECRET):
    return "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


# -- the simulator's implementations -----------------------------------------------------------

@pytest.mark.parametrize("profile, missing, wrong, unknown, failed", [
    ("spec", (401, b""), (403, b""), (404, None), (200, 100)),
    ("gocq", (401, b""), (403, b""), (200, 404), (200, 100)),
    ("napcat", (403, {"message": "token verify failed!"}), (403, {"message": "token verify failed!"}), (200, 200),
     (200, 200)),
    ("llonebot", (403, {"message": "token verify failed!"}), (403, {"message": "token verify failed!"}),
     (404, 404), (200, 200)),
])
def test_simulator_answers_like_each_implementation(profile, missing, wrong, unknown, failed):
    with OneBotSimulator(profile, WORLD, access_token=TOKEN) as sim:
        def call(action, token=TOKEN, **params):
            headers = {"Authorization": "Bearer " + token} if token else {}
            return requests.post("%s/%s" % (sim.url, action), json=params, headers=headers, timeout=5)

        for answer, (status, body) in ((call("get_status", token=None), missing), (call("get_status", "x"), wrong)):
            assert answer.status_code == status
            assert (answer.json() if isinstance(body, dict) else answer.content) == body
        answer = call("get_guild_list")
        assert answer.status_code == unknown[0]
        assert (answer.json()["retcode"] if unknown[1] else answer.content) == (unknown[1] or b"")
        answer = call("send_private_msg", user_id=EVE, message="x")
        assert (answer.status_code, answer.json()["status"], answer.json()["retcode"]) == failed[:1] + (
            "failed", failed[1])
        answer = requests.get(sim.url + "/get_login_info", params={"access_token": TOKEN}, timeout=5).json()
        assert (answer["status"], answer["data"]) == ("ok", {"user_id": ME, "nickname": "小灰"})
        answer = call("send_group_msg", group_id=str(PERL), message="[CQ:face,id=14]&#91;")  # numbers as text
        assert answer.json()["status"] == "ok" and sim.sent[-1]["segments"] == [
            {"type": "face", "data": {"id": "14"}}, {"type": "text", "data": {"text": "["}}]
        assert (answer.json()["data"]["message_id"] < 0) == (profile == "gocq")
        assert "echo" in answer.json() if profile == "napcat" else "echo" not in answer.json()
        answer = call("send_group_msg_async", group_id=PERL, message="a").json()
        assert (answer["status"], answer["retcode"]) == (("async", 1) if profile == "spec" else ("ok", 0))
        answer = call("send_group_msg_rate_limited", group_id=PERL, message="b")
        if profile == "gocq":             # not a go-cqhttp action at all
            assert (answer.status_code, answer.json()["retcode"]) == (200, 404)
        else:
            assert answer.json()["status"] == ("async" if profile == "spec" else "ok")
        assert [s["raw"] for s in sim.sent][1:] == (["a"] if profile == "gocq" else ["a", "b"])


# -- the Openqq API over each profile ---------------------------------------------------------

def test_info_routes_and_searches(bridge):
    assert bridge.get("get_user_info").json() == {
        "account": ME, "allow": 0, "birthday": "", "blood": "", "city": "", "client_type": "unknown",
        "college": "", "constel": 0, "country": "", "email": "", "face": 0, "homepage": "", "id": ME,
        "mobile": "", "name": "小灰", "occupation": "", "personal": "", "phone": "", "province": "",
        "sex": "male", "shengxiao": 0, "signature": "", "state": "online", "uid": ME, "vip_info": 0}
    assert bridge.get("get_friend_info").json() == [friend_json(ALICE, "alice", "阿丽"),
                                                    friend_json(BOB, "bob", None)]
    assert bridge.get("get_group_basic_info").json() == [PERL_JSON, CHAT_JSON]
    assert bridge.get("get_group_info").json() == [dict(PERL_JSON, member=PERL_MEMBERS),
                                                   dict(CHAT_JSON, member=CHAT_MEMBERS)]
    assert bridge.get("get_discuss_info").json() == []
    # one member list per group, loaded once
    assert sorted(c["params"]["group_id"] for c in bridge.calls("get_group_member_list")) == [PERL, CHAT]

    alice, bob = friend_json(ALICE, "alice", "阿丽"), friend_json(BOB, "bob", None)
    assert bridge.get("search_friend", markname="阿丽").json() == [alice]
    assert bridge.get("search_friend", displayname="bob").json() == [bob]
    assert bridge.get("search_friend", uid=BOB, name="bob").json() == [bob]
    assert bridge.get("search_friend", id=ALICE).json() == [alice]
    assert bridge.get("search_friend", name="nobody").json() == {"code": 100, "status": "object not found"}
    assert bridge.get("search_group", gnumber=PERL).json() == [dict(PERL_JSON, member=PERL_MEMBERS)]
    assert bridge.get("search_group", name="闲聊", role="attend").json() == [dict(CHAT_JSON, member=CHAT_MEMBERS)]
    assert bridge.get("search_group", name="nothing").json() == {"code": 100, "status": "object not found"}


def test_sends_arrive_as_segments_with_their_message_ids(bridge):
    sim, profile = bridge.sim, bridge.sim.profile.name
    answer = bridge.get("send_friend_message", uid=ALICE, content="你好[微笑]").json()
    sent = sim.sent[-1]
    assert answer == {"code": 0, "id": sent["message_id"], "info": "发送正常", "status": "发送成功"}
    assert (sent["action"], sent["message_type"], sent["user_id"]) == ("send_private_msg", "private", ALICE)
    assert sent["segments"] == [{"type": "text", "data": {"text": "你好"}}, {"type": "face", "data": {"id": "14"}}]
    if profile == "gocq":
        assert answer["id"] < 0        # go-cqhttp's hashed ids are signed
    report = bridge.post_api.wait(lambda r: r.get("post_type") == "send_message")
    assert (report["id"], report["receiver_uid"], report["content"], report["from"]) == (
        sent["message_id"], ALICE, "你好[微笑]", "api")

    answer = bridge.get("send_group_message", name="PERL学习交流", content="a<b> & c").json()
    sent = sim.sent[-1]
    assert answer["code"] == 0 and answer["id"] == sent["message_id"]
    assert (sent["action"], sent["group_id"], sent["segments"]) == (
        "send_group_msg", PERL, [{"type": "text", "data": {"text": "a＜b＞ & c"}}])

    assert bridge.get("send_group_message", uid=CHAT, content="later", **{"async": 1}).json() == {
        "code": 0, "status": "request already in execution"}
    assert wait_until(lambda: sim.sent[-1]["group_id"] == CHAT)
    assert sim.sent[-1]["segments"] == [{"type": "text", "data": {"text": "later"}}]

    before = len(sim.sent)
    answer = bridge.get("send_sess_message", group_uid=PERL, uid=CAROL, content="悄悄话").json()
    if profile == "spec":                 # temp sessions are not in the spec: the implementation refuses
        assert (answer["code"], answer["status"]) == (-5, "发送失败") and len(sim.sent) == before
    else:
        sent = sim.sent[-1]
        assert answer == {"code": 0, "id": sent["message_id"], "info": "发送正常", "status": "发送成功"}
        assert (sent["user_id"], sent["group_id"], sent["temp"], sent["segments"]) == (
            CAROL, PERL, True, [{"type": "text", "data": {"text": "悄悄话"}}])
    assert bridge.calls("get_group_member_info")[-1]["params"] == {
        "group_id": PERL, "user_id": CAROL, "no_cache": True}

    assert bridge.get("send_discuss_message", id=1, content="x").json() == {
        "code": 102, "id": None, "status": "discuss not found"}
    assert bridge.get("send_sess_message", discuss_id=1, id=2, content="x").json() == {
        "code": 104, "id": None, "status": "discuss member not found"}
    assert bridge.get("send_friend_message", uid=EVE, content="x").json() == {
        "code": 100, "id": None, "status": "friend not found"}


def test_cq_code_injection_arrives_as_literal_text(bridge):
    attack = "[CQ:image,file=file:///etc/passwd]"
    answer = bridge.get("send_group_message", uid=PERL, content=attack).json()
    sent = bridge.sim.sent[-1]
    assert answer["code"] == 0
    assert sent["segments"] == [{"type": "text", "data": {"text": attack}}]
    assert sent["raw"] == "&#91;CQ:image,file=file:///etc/passwd&#93;"
    assert bridge.sim.files_read == []
    bridge.get("send_friend_message", uid=ALICE, content="[CQ:at,qq=all]&#91;")
    assert bridge.sim.sent[-1]["segments"] == [{"type": "text", "data": {"text": "[CQ:at,qq=all]&#91;"}}]


def test_send_failures_answer_and_are_not_retried(make_bridge):
    bridge = make_bridge("napcat")
    bridge.sim.fault("send_group_msg", retcode=1200, message="Timeout: NTEvent")
    answer = bridge.get("send_group_message", uid=PERL, content="risky").json()
    assert (answer["code"], answer["status"]) == (-5, "发送失败")
    assert "retcode 1200" in answer["info"] and "Timeout: NTEvent" in answer["info"]
    assert len(bridge.calls("send_group_msg")) == 1           # a failed answer is final: no resend


def test_shutup_and_kick(bridge):
    assert bridge.get("shutup_group_member", group_uid=PERL, member_uid=CAROL, time=2).json() == {
        "code": 0, "status": "success"}
    assert bridge.calls("set_group_ban")[-1]["params"] == {"group_id": PERL, "user_id": CAROL, "duration": 120}
    # the owner cannot be muted by an admin: the implementation refuses, Openqq answers failure
    assert bridge.get("shutup_group_member", group_id=PERL, member_id=ALICE, time=1).json() == {
        "code": 201, "status": "failure"}
    assert bridge.get("shutup_group_member", group_uid=PERL, member_uid=CAROL).json() == {
        "code": 400, "status": "shutup time missing or error"}
    assert bridge.get("kick_group_member", group_uid=CHAT, member_uid=DAVE).json() == {
        "code": 201, "status": "failure"}          # not an admin there
    assert bridge.get("kick_group_member", group_uid=PERL, member_uid=CAROL).json() == {
        "code": 0, "status": "success"}
    assert bridge.calls("set_group_kick")[-1]["params"] == {"group_id": PERL, "user_id": CAROL,
                                                             "reject_add_request": False}
    report = bridge.post_api.wait(event("lose_group_member"))
    assert report["params"][0] == member_json(CAROL, "carol", "carol_card", sex="female")
    # the implementation's own group_decrease notice for our kick adds no second report
    assert wait_until(lambda: any(p["event"].get("notice_type") == "group_decrease" for p in bridge.sim.posts))
    assert len([e for e in bridge.flush() if e.get("event") == "lose_group_member"]) == 1
    assert bridge.get("search_group", uid=PERL).json()[0]["member"] == PERL_MEMBERS[:2]


# -- events in ----------------------------------------------------------------------------------

def test_messages_and_member_changes_are_reported_and_queued(bridge):
    private = bridge.sim.post_private_message(ALICE, "你好 [CQ:face,id=14] &#91;x&#93;")
    report = bridge.post_api.wait(lambda r: r.get("type") == "friend_message")
    assert report == {"class": "recv", "content": "你好 [微笑] [x]", "id": private["message_id"],
                      "post_type": "receive_message", "receiver": "小灰", "receiver_id": ME, "receiver_uid": ME,
                      "sender": "阿丽", "sender_id": ALICE, "sender_uid": ALICE, "time": private["time"],
                      "type": "friend_message"}
    group = bridge.sim.post_group_message(PERL, CAROL, [
        {"type": "reply", "data": {"id": "1"}}, {"type": "at", "data": {"qq": str(ME)}},
        {"type": "text", "data": {"text": " 看图 "}}, {"type": "image", "data": {"file": "a.jpg"}},
        {"type": "at", "data": {"qq": "all"}}])
    report = bridge.post_api.wait(lambda r: r.get("type") == "group_message")
    assert report == {"class": "recv", "content": "@小灰 看图 [图片]@全体成员", "group": "PERL学习交流",
                      "group_id": PERL, "group_uid": PERL, "id": group["message_id"],
                      "post_type": "receive_message", "receiver": "小灰", "receiver_id": ME, "receiver_uid": ME,
                      "sender": "carol_card", "sender_id": CAROL, "sender_uid": CAROL, "time": group["time"],
                      "type": "group_message"}
    temp = bridge.sim.post_private_message(CAROL, "临时", sub_type="group", group_id=PERL)
    report = bridge.post_api.wait(lambda r: r.get("type") == "sess_message")
    assert report == {"class": "recv", "content": "临时", "group": "PERL学习交流", "group_id": PERL,
                      "group_uid": PERL, "id": temp["message_id"], "post_type": "receive_message",
                      "receiver": "小灰", "receiver_id": ME, "receiver_uid": ME, "sender": "carol_card",
                      "sender_id": CAROL, "sender_uid": CAROL, "time": temp["time"], "type": "sess_message",
                      "via": "group"}
    queued = bridge.get("check_event").json()
    assert [(q["post_type"], q["type"], q["id"]) for q in queued] == [
        ("receive_message", "friend_message", private["message_id"]),
        ("receive_message", "group_message", group["message_id"]),
        ("receive_message", "sess_message", temp["message_id"])]

    bridge.sim.join_group(PERL, EVE, nickname="eve")
    report = bridge.post_api.wait(event("new_group_member"))
    eve = dict(member_json(EVE, "eve"), join_time=report["params"][0]["join_time"],
               last_speak_time=report["params"][0]["last_speak_time"])
    assert report["params"][0] == eve
    assert report["params"][1]["uid"] == PERL and eve in report["params"][1]["member"]
    bridge.sim.leave_group(CHAT, DAVE)
    report = bridge.post_api.wait(event("lose_group_member"))
    assert report["params"] == [member_json(DAVE, "dave"), dict(CHAT_JSON, member=CHAT_MEMBERS[:1])]
    queued = bridge.get("check_event").json()
    assert [(q["event"], q["params"][0]["id"]) for q in queued] == [("new_group_member", EVE),
                                                                     ("lose_group_member", DAVE)]
    assert [m["id"] for m in bridge.get("search_group", uid=PERL).json()[0]["member"]] == [ME, ALICE, CAROL, EVE]


def test_quick_reply_and_shutup(bridge):
    def answer(hit):
        report = hit.report
        if report.get("class") != "recv":
            return None
        if report["type"] == "group_message":
            return {"reply": "收到", "shutup": 1, "shutup_time": 120}
        return {"reply": "你好"}

    bridge.post_api.respond = answer
    bridge.sim.post_group_message(PERL, CAROL, "广告")
    assert wait_until(lambda: bridge.calls("set_group_ban"))
    assert bridge.calls("set_group_ban")[0]["params"] == {"group_id": PERL, "user_id": CAROL, "duration": 120}
    assert wait_until(lambda: bridge.sim.sent)
    assert (bridge.sim.sent[0]["group_id"], bridge.sim.sent[0]["segments"]) == (
        PERL, [{"type": "text", "data": {"text": "收到"}}])
    bridge.sim.post_private_message(ALICE, "hi")
    assert wait_until(lambda: len(bridge.sim.sent) == 2)
    assert (bridge.sim.sent[1]["user_id"], bridge.sim.sent[1]["segments"]) == (
        ALICE, [{"type": "text", "data": {"text": "你好"}}])
    report = bridge.post_api.wait(lambda r: r.get("post_type") == "send_message" and r["content"] == "你好")
    assert report["from"] == "code" and report["id"] == bridge.sim.sent[1]["message_id"]


def test_duplicated_events_are_reported_once(bridge):
    sim = bridge.sim
    sim.post_fault(1)            # the answer is lost: go-cqhttp posts the same event again
    first = sim.post_private_message(ALICE, "once")
    assert sim.posts[-1]["attempts"] == (2 if sim.profile.name == "gocq" else 1)
    sim.post_event(first)        # Tencent's double delivery: same message_id
    twice = dict(post_type="notice", notice_type="group_increase", sub_type="approve", group_id=PERL,
                 user_id=EVE, operator_id=EVE, time=int(time.time()))
    sim.post_event(twice)
    sim.post_event(twice)
    assert [(e["post_type"], e.get("content") or e.get("event")) for e in bridge.flush()] == [
        ("receive_message", "once"), ("event", "new_group_member")]


def test_forged_events_are_refused(make_bridge):
    bridge = make_bridge("napcat", max_body_size=4096)
    url = bridge.client.upstream.receiver.url
    forged = {"post_type": "message", "message_type": "private", "sub_type": "friend", "message_id": 666,
              "user_id": ALICE, "message": [{"type": "text", "data": {"text": "forged"}}], "time": int(time.time()),
              "self_id": ME}
    body = json.dumps(forged).encode()

    def post(data, **headers):
        headers.setdefault("X-Self-ID", str(ME))
        return requests.post(url, data=data, headers=dict(headers, **{"Content-Type": "application/json"}),
                             timeout=5)

    answer = post(body)
    assert (answer.status_code, answer.json()) == (401, {"code": -6, "status": "signature missing"})
    answer = post(body, **{"X-Signature": signed(body, "guessed")})
    assert (answer.status_code, answer.json()) == (403, {"code": -6, "status": "signature mismatch"})
    answer = post(body + b" ", **{"X-Signature": signed(body)})
    assert answer.status_code == 403
    answer = post(body, **{"X-Signature": signed(body), "X-Self-ID": "99999"})
    assert (answer.status_code, answer.json()) == (403, {"code": -6, "status": "wrong self id"})
    other = json.dumps(dict(forged, self_id=99999)).encode()
    answer = post(other, **{"X-Signature": signed(other), "X-Self-ID": "99999"})
    assert (answer.status_code, answer.json()) == (403, {"code": -6, "status": "wrong self id"})
    answer = post(b"not json", **{"X-Signature": signed(b"not json")})
    assert (answer.status_code, answer.json()) == (400, {"code": -9, "status": "the body is not JSON"})
    answer = requests.get(url, timeout=5)
    assert (answer.status_code, answer.json()) == (405, {"code": -9, "status": "POST OneBot events here"})
    genuine = json.dumps(dict(forged, message=[{"type": "text", "data": {"text": "genuine"}}])).encode()
    answer = post(genuine, **{"X-Signature": signed(genuine)})
    assert (answer.status_code, answer.content) == (204, b"")
    assert [(e["id"], e["content"]) for e in bridge.flush()] == [(666, "genuine")]
    assert bridge.client.upstream.receiver.refused == 5
    answer = requests.post(url, data=iter([body]), timeout=5)           # chunked: no Content-Length
    assert (answer.status_code, answer.json()) == (411, {"code": -9, "status": "Content-Length required"})
    big = b"{" + b" " * 5000 + b"}"
    answer = post(big, **{"X-Signature": signed(big)})
    assert (answer.status_code, answer.json()) == (413, {"code": -9, "status": "event over 4096 bytes"})


def test_string_format_and_numeric_strings(make_bridge):
    bridge = make_bridge("napcat", knobs={"post_format": "string", "numeric_strings": True})
    posted = bridge.sim.post_group_message(PERL, ALICE, "[CQ:face,id=179]a&amp;b[CQ:record,file=x.amr]"
                                                        "[CQ:at,qq=%d]" % CAROL)
    assert isinstance(posted["group_id"], str) and isinstance(posted["message"], str)
    report = bridge.post_api.wait(lambda r: r.get("type") == "group_message")
    assert (report["content"], report["id"], report["sender_uid"], report["group_uid"]) == (
        "[doge]a&b[语音]@carol_card", int(posted["message_id"]), ALICE, PERL)


def test_unsupported_actions_are_told_apart_from_failures(make_bridge):
    for profile in PROFILES:
        bridge = make_bridge(profile, knobs={"unsupported": ("get_stranger_info", "get_status")})
        api = bridge.client.upstream.api
        with pytest.raises(onebot.Unsupported):
            api.call("get_guild_list")
        with pytest.raises(onebot.Unsupported):
            api.call("get_status")
        with pytest.raises(onebot.ActionFailed) as failure:
            api.call("send_private_msg", user_id=EVE, message=[{"type": "text", "data": {"text": "x"}}])
        assert not isinstance(failure.value, onebot.Unsupported)
        # without get_status and get_stranger_info the login still works: the profile is just poorer
        assert bridge.get("get_user_info").json()["sex"] == "unknown"


@pytest.mark.parametrize("option", [{"access_token": "wrong"}, {"self_id": 99999}])
def test_wrong_token_or_account_stops_the_client(make_bridge, option):
    bridge = make_bridge("llonebot", running=False, **option)
    assert bridge.client.join(10)
    assert bridge.client.exit_status == 1
    assert bridge.recorder.named("login") == []


# -- liveness --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("profile", ["spec", "napcat"])
def test_offline_account_changes_state_and_comes_back(make_bridge, profile):
    bridge = make_bridge(profile, status_interval=0.2)
    changes = lambda: [r["params"] for r in bridge.post_api.reports(event("state_change"))]  # noqa: E731
    assert wait_until(lambda: changes()[-1:] == [["updating", "running"]])
    logins = len(bridge.post_api.reports(event("login")))
    bridge.sim.set_online(False)           # napcat also posts bot_offline; spec is noticed by get_status
    assert wait_until(lambda: changes()[-1:] == [["running", "updating"]], timeout=5)
    assert bridge.get("get_user_info").json()["code"] == -7
    bridge.sim.set_online(True)
    assert wait_until(lambda: changes()[-1:] == [["updating", "running"]], timeout=5)
    assert bridge.post_api.wait(event("login"), count=logins + 1)["params"] == [0]
    assert bridge.get("get_user_info").json()["uid"] == ME


@pytest.mark.slow
def test_unanswered_status_checks_count_as_offline(make_bridge):
    bridge = make_bridge("gocq", status_interval=0.1, status_failures_max=1)
    bridge.sim.fault("get_status", http_status=502)
    assert bridge.recorder.wait("state_change", where=lambda old, new: old == "running", timeout=5) == (
        "running", "updating")
    assert bridge.recorder.wait("login", count=2, timeout=5) == (0,)
    assert bridge.client.wait_for_state("running", timeout=5)


@pytest.mark.slow
def test_heartbeats_spare_status_calls(make_bridge):
    bridge = make_bridge("gocq", status_interval=1.0)
    calls = len(bridge.calls("get_status"))
    for _ in range(6):
        bridge.sim.heartbeat()
        time.sleep(0.25)
    assert len(bridge.calls("get_status")) == calls
    assert bridge.client.state == "running"


# -- contacts, hazards, limits ----------------------------------------------------------------------

def test_notices_change_the_contacts(make_bridge):
    bridge = make_bridge("napcat", client={"update_interval": 0.5}, openqq={
        "post_event_list": "new_friend lose_friend new_group lose_group new_group_member lose_group_member "
                           "group_property_change group_member_property_change"})
    # the world changes with each notice, so the periodic refresh (every 0.5 s here) agrees with it:
    # whichever sees a change first reports it, once
    sim, reports = bridge.sim, bridge.post_api
    sim.update_member(PERL, CAROL, role="admin")
    sim.post_notice("group_admin", sub_type="set", group_id=PERL, user_id=CAROL)
    assert reports.wait(event("group_member_property_change"))["params"][1:] == ["role", "member", "admin"]
    sim.update_member(PERL, CAROL, card="新名片")
    sim.post_notice("group_card", group_id=PERL, user_id=CAROL, card_new="新名片", card_old="carol_card")
    assert reports.wait(event("group_member_property_change"), 2)["params"][1:] == ["card", "carol_card", "新名片"]
    sim.update_group(CHAT, group_name="闲聊2")
    sim.post_notice("notify", sub_type="group_name", group_id=CHAT, user_id=DAVE, name_new="闲聊2")
    assert reports.wait(event("group_property_change"))["params"][1:] == ["name", "闲聊", "闲聊2"]
    sim.update_member(PERL, ME, role="member")
    sim.post_notice("group_admin", sub_type="unset", group_id=PERL, user_id=ME)
    assert reports.wait(event("group_property_change"), 2)["params"][1:] == ["role", "manage", "attend"]
    sim.add_friend(EVE, "eve")
    sim.post_notice("friend_add", user_id=EVE)
    assert reports.wait(event("new_friend"))["params"] == [friend_json(EVE, "eve", None)]
    sim.remove_group(CHAT)
    sim.post_notice("group_decrease", sub_type="kick_me", group_id=CHAT, user_id=ME, operator_id=DAVE)
    assert reports.wait(event("lose_group"))["params"][0]["uid"] == CHAT
    sim.remove_friend(BOB)                 # no event exists for it: the periodic friend list diff finds it
    assert reports.wait(event("lose_friend"), timeout=5)["params"] == [friend_json(BOB, "bob", None)]
    assert [g["uid"] for g in bridge.get("get_group_basic_info").json()] == [PERL]
    sim.add_group(30003, "新群", members=[{"user_id": DAVE, "nickname": "dave", "role": "owner"}])
    sim.join_group(30003, ME)              # we joined: the report lists the new group's members, as after a refresh
    joined = reports.wait(event("new_group"))["params"][0]
    assert (joined["name"], [m["id"] for m in joined["member"]]) == ("新群", [DAVE, ME])
    assert [e["event"] for e in bridge.flush()] == [
        "group_member_property_change", "group_member_property_change", "group_property_change",
        "group_property_change", "group_member_property_change", "new_friend", "lose_group", "lose_friend",
        "new_group"]


def test_napcat_temp_session_goes_nowhere_unverified(make_bridge):
    bridge = make_bridge("napcat")
    bridge.sim.remove_member(PERL, CAROL)  # gone upstream; our member list has not heard of it
    answer = bridge.get("send_sess_message", group_uid=PERL, uid=CAROL, content="private words").json()
    assert (answer["code"], answer["status"]) == (-5, "发送失败")
    assert bridge.sim.sent == [] and bridge.calls("send_private_msg") == []
    # what NapCat does unverified: the private words land in the group chat
    bridge.client.upstream.api.call("send_private_msg", user_id=CAROL, group_id=PERL,
                                    message=[{"type": "text", "data": {"text": "leak"}}])
    assert bridge.sim.sent[-1]["message_type"] == "group"


def test_own_messages_echoed_by_the_implementation_are_reported_once(make_bridge):
    bridge = make_bridge("napcat", knobs={"report_self_message": True}, client={"allow_message_sync": True})
    answer = bridge.get("send_group_message", uid=PERL, content="mine").json()
    assert wait_until(lambda: any(p["event"]["post_type"] == "message_sent" for p in bridge.sim.posts))
    bridge.sim.post_event({"post_type": "message_sent", "message_type": "group", "sub_type": "normal",
                           "message_id": 777, "group_id": PERL, "user_id": ME, "message": "from my phone",
                           "raw_message": "from my phone"})
    assert [(e["id"], e["content"], e["source"]) for e in bridge.flush()] == [
        (answer["id"], "mine", "local"), (777, "from my phone", "outer")]


def test_send_rate_limit(make_bridge):
    bridge = make_bridge("spec", send_rate=5, send_burst=2)
    alice = bridge.client.contacts.friend(ALICE)
    sent = [bridge.client.send_friend_message(alice, "n%d" % n) for n in range(5)]
    assert all(msg.wait(5) and msg.code == 0 for msg in sent)
    times = [s["time"] for s in bridge.sim.sent]
    assert times[1] - times[0] < 0.15                     # the burst goes at once
    assert times[4] - times[1] >= 3 * 0.2 - 0.03          # then 5 a second


def test_events_need_a_secret_beyond_loopback(tmp_path):
    client = webqq.Client(tmpdir=str(tmp_path), qrcode_display="none")
    try:
        assert client.load("onebot", url="http://127.0.0.1:1", listen="0.0.0.0:0") is None
        assert client.load("onebot", url="http://127.0.0.1:1", listen="127.0.0.1:0", secert="typo") is None
        plugin = client.load("onebot", url="http://127.0.0.1:1", listen="0.0.0.0:0", secret=SECRET)
        assert plugin is client.upstream and client.options["upstream"] == "onebot"
    finally:
        client.stop()


# -- the documented configuration ---------------------------------------------------------------------

def test_example_config_runs_webqq_in_front_of_napcat(tmp_path):
    path = os.path.join(ROOT, "docs", "onebot-example.ini")
    options, plugins = webqq.read_config(path)
    assert options["upstream"] == "onebot"
    assert [name for name, _ in plugins] == ["onebot", "showmsg", "openqq", "console"]
    ob = dict(plugins)["onebot"]
    sim = OneBotSimulator("napcat", WORLD, access_token=ob["access_token"], secret=ob["secret"]).start()
    receiver, api = free_port(), free_port()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = (text.replace(ob["url"], sim.url).replace(ob["listen"], "127.0.0.1:%d" % receiver)
            .replace("listen = 127.0.0.1:5000", "listen = 127.0.0.1:%d" % api)
            .replace("[webqq]\n", "[webqq]\ntmpdir = %s\nlog_level = debug\n" % tmp_path))
    config = tmp_path / "webqq.ini"
    config.write_text(text, encoding="utf-8")
    sim.post_url = "http://127.0.0.1:%d/" % receiver
    log = open(str(tmp_path / "log"), "w+b")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "webqq.py"), "-c", str(config)],
                            stdout=subprocess.DEVNULL, stderr=log, cwd=str(tmp_path))
    base = "http://127.0.0.1:%d/openqq/" % api
    try:
        def user():
            try:
                return requests.get(base + "get_user_info", timeout=2).json()
            except (requests.RequestException, ValueError):
                return None
        assert wait_until(lambda: (user() or {}).get("uid") == ME, timeout=15)
        posted = sim.post_group_message(PERL, CAROL, "hello bridge")
        assert sim.posts[-1]["status"] == 204
        events = requests.get(base + "check_event", timeout=40).json()
        assert [(e["id"], e["content"], e["sender"]) for e in events] == [
            (posted["message_id"], "hello bridge", "carol_card")]
        answer = requests.get(base + "send_friend_message", params={"uid": ALICE, "content": "hi"}, timeout=15)
        assert answer.json()["id"] == sim.sent[-1]["message_id"]
        assert sim.calls[0]["action"] == "get_login_info"
        page = requests.get("http://127.0.0.1:%d/console/" % api, timeout=10)       # the file loads the console
        assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        sim.stop()
        log.seek(0)
        output = log.read().decode("utf-8", "replace")
        log.close()
    assert proc.returncode == 0, output[-3000:]
