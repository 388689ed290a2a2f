"""End-to-end tests of the core client against the simulator, over real sockets."""
import json
import os
import subprocess
import sys

import pytest

import webqq
from conftest import log_in, scan_and_confirm, wait_until


def read_state(client):
    with open(client.state_path, encoding="utf-8") as f:
        return json.load(f)


# -- login --------------------------------------------------------------------

def test_qr_login_walks_the_states_and_writes_the_files(sim, make_client):
    client = make_client()
    client.start()
    assert sim.wait_qr("waiting")
    assert client.wait_for_state("scaning", timeout=5)
    assert os.path.exists(client.qrcode_path)
    qr = client.recorder.wait("input_qrcode")
    assert qr[0] == client.qrcode_path and qr[1].startswith(b"\x89PNG")
    assert read_state(client)["state"] == "scaning"
    sim.scan()
    assert client.wait_for_state("confirming", timeout=5)
    sim.confirm()
    assert client.wait_for_state("running", timeout=10)
    changes = [args for args in client.recorder.named("state_change")]
    assert changes[:5] == [("init", "loading"), ("loading", "scaning"), ("scaning", "confirming"),
                           ("confirming", "updating"), ("updating", "running")]
    assert client.recorder.wait("login") == (1,)
    state = read_state(client)
    assert (state["state"], state["previous_state"], state["pid"]) == ("running", "updating", os.getpid())
    assert not os.path.exists(client.qrcode_path)
    assert os.stat(client.cookie_path).st_mode & 0o777 == 0o600
    assert os.stat(client.state_path).st_mode & 0o777 == 0o600
    with open(client.pid_path) as f:
        assert f.read() == str(os.getpid())
    world = sim.world
    assert client.user.uid == world.user.qq
    assert len(client.contacts.friends()) == len(world.friends)
    assert len(client.contacts.groups()) == len(world.groups)
    assert len(client.contacts.discusses()) == len(world.discusses)
    client.stop()
    assert read_state(client)["state"] == "stop"
    assert not os.path.exists(client.pid_path)


def test_expired_qr_brings_a_new_one(sim, make_client):
    client = make_client()
    client.start()
    assert sim.wait_qr("waiting")
    client.recorder.wait("input_qrcode")
    sim.expire()
    client.recorder.wait("qrcode_expire")
    client.recorder.wait("input_qrcode", count=2)
    scan_and_confirm(sim)
    assert client.wait_for_state("running", timeout=10)


def test_too_many_expired_qr_codes_stop_the_client(sim, make_client):
    client = make_client(qrcode_count_max=2)
    client.start()
    for n in (1, 2):
        client.recorder.wait("input_qrcode", count=n)
        assert sim.wait_qr("waiting")
        sim.expire()
    assert client.join(10)
    assert client.exit_status == 1 and client.state == "stop"
    assert not os.path.exists(client.qrcode_path)


def test_rejected_scan_stops_the_client(sim, make_client):
    client = make_client()
    client.start()
    assert sim.wait_qr("waiting")
    sim.scan()
    sim.reject()
    assert client.wait_for_state("stop", timeout=10)
    assert client.exit_status == 1


def test_cookie_resume_needs_no_scan(sim, make_client):
    first = log_in(sim, make_client())
    first.stop()
    shows = sum(1 for r in sim.requests if r["path"] == "/ptqrshow")
    second = make_client()
    second.start()
    assert second.wait_for_state("running", timeout=10)
    assert second.recorder.wait("login") == (0,)
    assert sum(1 for r in sim.requests if r["path"] == "/ptqrshow") == shows
    assert second.recorder.named("input_qrcode") == []


def test_duplicate_instance_is_refused(sim, make_client, tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        client = make_client()
        with open(client.pid_path, "w") as f:
            f.write(str(other.pid))
        client.start()
        assert client.join(5)
        assert client.exit_status == 1
        with open(client.pid_path) as f:
            assert f.read() == str(other.pid)
    finally:
        other.kill()
        other.wait()


def test_stale_pid_file_is_taken_over(sim, make_client):
    client = make_client()
    with open(client.pid_path, "w") as f:
        f.write("999999999")
    log_in(sim, client)


# -- receiving ------------------------------------------------------------------

def test_each_message_type_reaches_receive_message(sim, running):
    world, c = sim.world, running.contacts
    friend, group, discuss = world.friends[0], world.groups[0], world.discusses[0]
    member = world.others(group)[0]
    dmember = world.others(discuss)[0]
    sim.inject_friend_message(friend.uin, "你好 [微笑]")
    msg = running.recorder.wait("receive_message")[0]
    data = msg.to_json()
    assert (data["type"], data["class"], data["sender_id"], data["receiver_id"]) == (
        "friend_message", "recv", friend.uin, world.user.uin)
    assert data["sender_uid"] == friend.qq and data["receiver_uid"] == world.user.qq
    assert data["content"] == "你好 [微笑]"
    assert set(data) == {"class", "id", "type", "time", "content", "sender", "sender_id", "sender_uid",
                         "receiver", "receiver_id", "receiver_uid"}

    sim.inject_group_message(group.gid, member.uin, "群里说话")
    msg = running.recorder.wait("receive_message", 2)[0]
    data = msg.to_json()
    assert (data["type"], data["group_id"], data["group_uid"], data["sender_id"], data["content"]) == (
        "group_message", group.gid, group.qq, member.uin, "群里说话")
    assert data["group"] == c.group(group.gid).displayname
    assert data["sender_uid"] == member.qq

    sim.inject_discuss_message(discuss.did, dmember.uin, "讨论")
    data = running.recorder.wait("receive_message", 3)[0].to_json()
    assert (data["type"], data["discuss_id"], data["sender_id"], data["content"]) == (
        "discuss_message", discuss.did, dmember.uin, "讨论")
    assert "discuss_uid" not in data

    sim.inject_sess_message("group", group.gid, member.uin, "临时")
    data = running.recorder.wait("receive_message", 4)[0].to_json()
    assert (data["type"], data["via"], data["group_id"], data["sender_id"]) == (
        "sess_message", "group", group.gid, member.uin)


def test_status_change_updates_the_friend_and_keeps_the_batch(sim, running):
    friend = sim.world.friends[1]
    sim.inject_status(friend.uin, "busy", 21)
    sim.inject_friend_message(friend.uin, "after status")
    assert running.recorder.wait("receive_message")[0].content == "after status"
    changed = running.recorder.wait("friend_state_change")[0]
    assert changed.id == friend.uin and changed.state == "busy" and changed.client_type == "mobile"


def test_kick_stops_the_client(sim, running):
    sim.kick("您的帐号在另一地点登录")
    assert running.wait_for_state("stop", timeout=10)
    assert running.exit_status == 1


@pytest.mark.slow
@pytest.mark.parametrize("fault", [dict(status=502, count=3), dict(status=504, count=3), dict(drop=True, count=2),
                                   dict(retcode=100012, count=2), dict(retcode=1202, count=1)])
def test_poll_faults_do_not_stall_receiving(sim, running, fault):
    sim.fault("/channel/poll2", **fault)
    friend = sim.world.friends[0]
    sim.inject_friend_message(friend.uin, "still here")
    assert running.recorder.wait("receive_message", timeout=15)[0].content == "still here"
    assert running.state == "running" and sim.logins == 1


def test_poll_116_refreshes_ptwebqq(sim, running):
    sim.fault("/channel/poll2", retcode=116, extra={"p": "f" * 64})
    assert wait_until(lambda: running.upstream.ptwebqq == "f" * 64)
    assert running.upstream.http.cookie("ptwebqq") == "f" * 64


def test_poll_121_relinks_without_relogin(sim, running):
    sim.fault("/channel/poll2", retcode=121)
    assert wait_until(lambda: sim.relinks == 1)
    friend = sim.world.friends[0]
    sim.inject_friend_message(friend.uin, "after relink")
    assert running.recorder.wait("receive_message")[0].content == "after relink"
    assert sim.logins == 1 and running.recorder.named("relogin") == []


def test_lost_session_leads_to_relogin(sim, running):
    sim.expire_session()
    assert wait_until(lambda: running.recorder.named("relogin") or sim.qr_state == "waiting", timeout=15)
    if sim.qr_state == "waiting":
        sim.scan()
        sim.confirm()
    running.recorder.wait("relogin", timeout=15)
    assert running.wait_for_state("running", timeout=10)
    assert sim.logins == 2
    friend = sim.world.friends[0]
    sim.inject_friend_message(friend.uin, "after relogin")
    assert running.recorder.wait("receive_message")[0].content == "after relogin"


@pytest.mark.slow
def test_unknown_poll_codes_relogin_after_the_limit(sim, running):
    sim.fault("/channel/poll2", retcode=99999, count=4)
    running.recorder.wait("relogin", timeout=15)
    assert sim.logins == 2


# -- sending ------------------------------------------------------------------

def test_each_send_type_reaches_the_simulator(sim, running):
    c = running.contacts
    friend, group, discuss = c.friends()[0], c.groups()[0], c.discusses()[0]
    running.ensure_members(group)
    member = [m for m in group.members if m.id != running.user.id][0]
    msgs = [running.send_friend_message(friend, "hi[微笑]<b>"),
            running.send_group_message(group, "群消息"),
            running.send_discuss_message(discuss, "讨论组消息"),
            running.send_sess_message(member, "临时消息")]
    for msg in msgs:
        assert msg.wait(10) and (msg.code, msg.msg) == (0, "发送成功"), msg.info
    sent = sim.sent
    assert [s["endpoint"] for s in sent] == ["send_buddy_msg2", "send_qun_msg2", "send_discu_msg2", "send_sess_msg2"]
    assert sent[0]["r"]["to"] == friend.id
    assert sent[0]["content"] == ["hi", ["face", 14], "＜b＞", ["font", webqq.FONT]]
    assert msgs[0].content == "hi[微笑]＜b＞"
    assert sent[1]["r"]["group_uin"] == group.id and sent[1]["text"] == "群消息"
    assert sent[2]["r"]["did"] == discuss.id
    assert sent[3]["r"]["to"] == member.id and sent[3]["r"]["service_type"] == 0 and sent[3]["r"]["group_sig"]
    assert [s["r"]["msg_id"] for s in sent] == [m.id for m in msgs]
    assert msgs[1].id == msgs[0].id + 1
    event = running.recorder.wait("send_message")[0]
    assert event.to_json()["code"] == 0 and event.to_json()["ttl"] == 2


def test_send_failures_are_retried_msg_ttl_times(sim, running):
    friend = running.contacts.friends()[0]
    sim.fault("/channel/send_buddy_msg2", retcode=100001, count=3)
    msg = running.send_friend_message(friend, "x")
    assert msg.wait(10)
    assert (msg.code, msg.msg, msg.info, msg.ttl) == (-5, "发送失败", "未识别返回值:100001", 0)
    assert sum(1 for r in sim.requests if r["path"] == "/channel/send_buddy_msg2") == 3


def test_a_send_that_fails_twice_then_works(sim, running):
    friend = running.contacts.friends()[0]
    sim.fault("/channel/send_buddy_msg2", status=500, count=2)
    msg = running.send_friend_message(friend, "third time")
    assert msg.wait(10) and msg.code == 0 and msg.ttl == 0
    assert sim.sent[-1]["text"] == "third time"


def test_send_interval_paces_sends(sim, make_client):
    client = log_in(sim, make_client(send_interval=0.3))
    friend = client.contacts.friends()[0]
    msgs = [client.send_friend_message(friend, "m%d" % i) for i in range(3)]
    assert all(m.wait(10) for m in msgs)
    times = [s["time"] for s in sim.sent]
    assert times[1] - times[0] >= 0.28 and times[2] - times[1] >= 0.28


def test_empty_content_is_refused(running):
    with pytest.raises(ValueError):
        running.send_friend_message(running.contacts.friends()[0], "")


def test_stop_fails_queued_sends(sim, make_client):
    client = log_in(sim, make_client(send_interval=30))
    friend = client.contacts.friends()[0]
    first, second = client.send_friend_message(friend, "a"), client.send_friend_message(friend, "b")
    assert first.wait(10) and first.code == 0
    client.stop()
    assert second.done and (second.code, second.info) == (-5, "客户端停止运行")


# -- contacts -------------------------------------------------------------------

def test_members_load_in_the_background_with_numbers(sim, running):
    for group in sim.world.groups:
        g = running.contacts.group(group.gid)
        assert wait_until(lambda: g.members_loaded)
        assert len(g.members) == len(group.members)
        assert {m.uid for m in g.members} == {m.qq for m in group.members}
        assert g.uid == group.qq


def test_refresh_diffs_into_events(sim, make_client):
    client = log_in(sim, make_client(update_interval=0.5))
    group = sim.world.groups[0]
    assert wait_until(lambda: client.contacts.group(group.gid).members_loaded)
    gone = sim.world.friends[-1]
    new_friend = sim.add_friend(nick="新朋友")
    sim.remove_friend(gone.uin)
    new_member = sim.add_member(group.gid, nick="新成员")
    assert client.recorder.wait("new_friend", where=lambda f: f.id == new_friend.uin)[0].name == "新朋友"
    assert client.recorder.wait("lose_friend", where=lambda f: f.id == gone.uin)
    member, g = client.recorder.wait("new_group_member", where=lambda m, g: m.id == new_member.uin)
    assert g.id == group.gid and member.name == "新成员"


def test_kick_and_shutup_use_the_qinfo_endpoints(sim, running):
    group = [g for g in running.contacts.groups() if g.role in ("create", "manage")][0]
    running.ensure_members(group)
    target = [m for m in group.members if m.role == "member"][0]
    assert running.shutup_group_member(group, [target], 120)
    action = sim.admin_actions[-1]
    assert action["action"] == "set_group_shutup" and action["members"] == [target.uid] and action["seconds"] == 120
    assert running.kick_group_member(group, [target])
    assert sim.admin_actions[-1]["action"] == "delete_group_member"
    lost = running.recorder.wait("lose_group_member")
    assert lost[0] is target and lost[1] is group
    assert target not in group.members
