"""Tests of scripts/smartqq_sim.py, driven over real sockets the way a SmartQQ client drives it."""
import http.client
import http.cookiejar
import json
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

import pytest

from smartqq_sim import QRCode, Simulator, World, rs_remainder
from webqq import bkn, friend_hash, hash33, quoted_args, time33

S_REF = "https://s.web2.qq.com/proxy.html?v=20130916001&callback=1&id=1"
D_REF = "http://d1.web2.qq.com/proxy.html?v=20151105001&callback=1&id=2"
QUN_REF = "http://qun.qq.com/member.html"
FONT = ["font", {"name": "宋体", "size": 10, "style": [0, 0, 0], "color": "000000"}]
WORLD = {"friends": 8, "groups": 3, "members": 8, "discusses": 2, "seed": 11}


class Browser(object):
    """A cookie jar and an opener that sends every *.qq.com URL to the simulator, like the client."""

    def __init__(self, sim):
        self.sim = sim
        self.jar = http.cookiejar.CookieJar()
        browser = self

        class Rewrite(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, req, fp, code, msg, headers, newurl):
                return urllib.request.HTTPRedirectHandler.redirect_request(
                    self, req, fp, code, msg, headers, browser.local(newurl))

        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), Rewrite)

    def local(self, url):
        parts = urllib.parse.urlsplit(url)
        return self.sim.url + parts.path + ("?" + parts.query if parts.query else "")

    def call(self, path, query=None, form=None, referer=S_REF, timeout=10):
        """(status, body bytes) of a GET (form None) or a form POST."""
        url = path if path.startswith("http") else self.sim.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.local(url), data=data, headers={"Referer": referer} if referer else {})
        try:
            with self.opener.open(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def json(self, path, query=None, form=None, referer=S_REF, **r):
        """The decoded JSON answer; keyword arguments become the r-form JSON."""
        if r:
            form = dict(form or {}, r=json.dumps(r))
        return json.loads(self.call(path, query, form, referer)[1].decode("utf-8"))

    def cookie(self, name):
        return next((c.value for c in self.jar if c.name == name), None)

    def qrlogin(self):
        return quoted_args(self.call("/ptqrlogin", {"ptqrtoken": hash33(self.cookie("qrsig")), "aid": 501004106},
                                     referer=None)[1].decode("utf-8"))


def login(sim, browser, online=True):
    """A whole QR login: ptqrshow, scan, confirm, ptqrlogin 0, check_sig, getvfwebqq, login2, online buddies."""
    assert browser.call("/ptqrshow", {"appid": 501004106, "s": 3}, referer=None)[0] == 200
    sim.scan()
    sim.confirm()
    args = browser.qrlogin()
    assert args[0] == "0"
    status, _ = browser.call(args[2], referer=None)
    assert status == 200
    ptwebqq = browser.cookie("ptwebqq")
    vfwebqq = browser.json("/api/getvfwebqq", {"ptwebqq": ptwebqq, "clientid": 53999199, "psessionid": ""})
    result = browser.json("/channel/login2", referer=D_REF, ptwebqq=ptwebqq, clientid=53999199, psessionid="",
                          status="online")["result"]
    s = {"qq": result["uin"], "ptwebqq": ptwebqq, "vfwebqq": vfwebqq["result"]["vfwebqq"],
         "psessionid": result["psessionid"]}
    if online:
        query = {"vfwebqq": s["vfwebqq"], "clientid": 53999199, "psessionid": s["psessionid"]}
        assert browser.json("/channel/get_online_buddies2", query, referer=D_REF)["retcode"] == 0
    return s


def poll(browser, s):
    return browser.json("/channel/poll2", referer=D_REF, ptwebqq=s["ptwebqq"], clientid=53999199,
                        psessionid=s["psessionid"], key="")


def send(browser, s, endpoint, content=("hello",), font=True, **target):
    segments = list(content) + ([FONT] if font else [])
    return browser.json("/channel/" + endpoint, referer=D_REF, content=json.dumps(segments), face=522,
                        clientid=53999199, msg_id=1001, psessionid=s["psessionid"], **target)


@pytest.fixture
def server():
    sim = Simulator(world=dict(WORLD), poll_hold=1.0, qr_ttl=30.0)
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def browser(server):
    return Browser(server)


@pytest.fixture
def session(server, browser):
    return login(server, browser)


# -- login ----------------------------------------------------------------------------------


def test_qr_login_walks_66_67_0_and_issues_the_cookies(server, browser):
    assert server.qr_state == "none"
    status, _ = browser.call("/cgi-bin/xlogin", {"appid": 501004106}, referer=None)
    assert status == 200 and browser.cookie("pt_login_sig")
    status, png = browser.call("/ptqrshow", {"appid": 501004106, "s": 3}, referer=None)
    assert status == 200 and png.startswith(b"\x89PNG\r\n\x1a\n") and browser.cookie("qrsig")
    assert server.wait_qr("waiting", timeout=1)
    assert browser.qrlogin()[0] == "66"
    server.scan()
    assert browser.qrlogin()[0] == "67"
    server.confirm()
    code, _, url, _, message, nick = browser.qrlogin()
    assert (code, message, nick) == ("0", "登录成功！", server.world.user.nick)
    assert url.startswith("http://ptlogin4.web2.qq.com/check_sig?") and "ptsigx=" in url
    qq = server.world.user.qq
    assert int(browser.cookie("uin")[1:]) == qq and browser.cookie("uin").startswith("o")
    skey, ptwebqq = browser.cookie("skey"), browser.cookie("ptwebqq")
    assert skey.startswith("@") and len(skey) == 10
    assert len(ptwebqq) == 64 and int(ptwebqq, 16) >= 0
    for name in ("superuin", "superkey", "supertoken", "pt2gguin", "ptcz"):
        assert browser.cookie(name), name
    status, page = browser.call(url, referer=None)             # 302 to w.qq.com/proxy.html, followed
    assert status == 200 and b"<html" in page
    assert [r["path"] for r in server.requests][-2:] == ["/check_sig", "/proxy.html"]
    assert browser.cookie("p_skey") and browser.cookie("pt4_token") and browser.cookie("p_uin")
    vf = browser.json("/api/getvfwebqq", {"ptwebqq": ptwebqq, "clientid": 53999199, "psessionid": ""})
    assert vf["retcode"] == 0 and len(vf["result"]["vfwebqq"]) == 80
    assert browser.json("/api/getvfwebqq", {"ptwebqq": "0" * 64, "clientid": 53999199})["retcode"] == 103
    result = browser.json("/channel/login2", referer=D_REF, ptwebqq=ptwebqq, clientid=53999199, psessionid="",
                          status="online")["result"]
    assert result["uin"] == qq and result["vfwebqq"] == vf["result"]["vfwebqq"] and len(result["psessionid"]) > 200
    assert set(result) == {"cip", "f", "index", "port", "psessionid", "status", "uin", "user_state", "vfwebqq"}
    assert server.logins == 1 and server.session.psessionid == result["psessionid"]
    assert server.session.registered is False


def test_a_wrong_ptqrtoken_or_ptsigx_is_refused(server, browser):
    browser.call("/ptqrshow", referer=None)
    body = browser.call("/ptqrlogin", {"ptqrtoken": hash33(browser.cookie("qrsig")) + 1}, referer=None)[1]
    assert quoted_args(body.decode("utf-8"))[0] not in ("0", "65", "66", "67", "68")
    server.confirm()
    url = browser.qrlogin()[2]
    status, _ = browser.call(url.replace("ptsigx=", "ptsigx=00"), referer=None)
    assert status == 403


def test_an_old_qrsig_is_expired_and_each_ptqrshow_replaces_it(server, browser):
    browser.call("/ptqrshow", referer=None)
    first = browser.cookie("qrsig")
    browser.call("/ptqrshow", referer=None)
    assert browser.cookie("qrsig") != first
    req = urllib.request.Request("%s/ptqrlogin?ptqrtoken=%d" % (server.url, hash33(first)),
                                 headers={"Cookie": "qrsig=" + first})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert quoted_args(resp.read().decode("utf-8"))[0] == "65"
    assert browser.qrlogin()[0] == "66"


def test_qr_expires_after_its_ttl_or_on_demand_and_can_be_rejected():
    sim = Simulator(world=dict(WORLD), qr_ttl=0.3).start()
    try:
        browser = Browser(sim)
        browser.call("/ptqrshow", referer=None)
        assert sim.qr_state == "waiting"
        assert sim.wait_qr("expired", timeout=3)
        assert browser.qrlogin()[0] == "65"
        with pytest.raises(RuntimeError):
            sim.scan()
        browser.call("/ptqrshow", referer=None)
        sim.expire()
        assert browser.qrlogin()[0] == "65"
        browser.call("/ptqrshow", referer=None)
        sim.scan()
        sim.reject()
        assert browser.qrlogin()[0] == "68" and sim.qr_state == "rejected"
    finally:
        sim.stop()


def test_auto_scan_confirms_by_itself():
    sim = Simulator(world=dict(WORLD), auto_scan=0.6).start()
    try:
        browser = Browser(sim)
        browser.call("/ptqrshow", referer=None)
        assert sim.wait_qr("scanned", timeout=3)
        assert sim.wait_qr("confirmed", timeout=3)
        assert browser.qrlogin()[0] == "0"
    finally:
        sim.stop()


def test_pt4_auth_resumes_a_login_without_a_scan(server, browser, session):
    assert browser.call("/logout", {"pt4_hkey": time33(browser.cookie("skey"))}, referer=None)[0] == 200
    assert server.logouts == 1 and server.session.valid is False
    fresh = Browser(server)                 # only the remembered ptlogin2 cookies survive
    for cookie in browser.jar:
        if cookie.name in ("superuin", "supertoken", "superkey"):
            fresh.jar.set_cookie(cookie)
    bad = fresh.call("/pt4_auth", {"daid": 164, "appid": 501004106, "auth_token": 1}, referer=None)[1]
    assert quoted_args(bad.decode()) == ["1", ""]
    token = time33(fresh.cookie("supertoken"))
    code, url = quoted_args(fresh.call("/pt4_auth", {"daid": 164, "appid": 501004106, "auth_token": token},
                                       referer=None)[1].decode())
    assert code == "0" and url.startswith("http://ptlogin4.web2.qq.com/check_sig?")
    url += "&regmaster=&aid=501004106&s_url=http%3A%2F%2Fw.qq.com%2Fproxy.html"
    assert fresh.call(url, referer=None)[0] == 200
    ptwebqq = fresh.cookie("ptwebqq")
    assert fresh.json("/api/getvfwebqq", {"ptwebqq": ptwebqq, "clientid": 53999199})["retcode"] == 0
    result = fresh.json("/channel/login2", referer=D_REF, ptwebqq=ptwebqq, clientid=53999199, psessionid="",
                        status="online")
    assert result["retcode"] == 0 and server.logins == 2 and server.qr_state == "confirmed"


def test_logout_revokes_can_forbid_the_resume():
    sim = Simulator(world=dict(WORLD), logout_revokes=True).start()
    try:
        browser = Browser(sim)
        login(sim, browser)
        token = time33(browser.cookie("supertoken"))
        browser.call("/logout", referer=None)
        assert quoted_args(browser.call("/pt4_auth", {"auth_token": token}, referer=None)[1].decode())[0] == "1"
    finally:
        sim.stop()


def test_relink_replaces_the_psessionid(server, browser, session):
    result = browser.json("/channel/login2", referer=D_REF, ptwebqq=session["ptwebqq"], clientid=53999199,
                          psessionid=session["psessionid"], status="online", key="")
    assert result["retcode"] == 0 and result["result"]["psessionid"] != session["psessionid"]
    assert (server.relinks, server.logins) == (1, 1)
    assert poll(browser, session)["retcode"] == 103                 # the old psessionid is gone
    stale = browser.json("/channel/login2", referer=D_REF, ptwebqq=session["ptwebqq"], psessionid="x" * 20)
    assert stale["retcode"] == 103


# -- contacts -------------------------------------------------------------------------------


def test_contact_apis_serve_the_world(server, browser, session):
    world, vf, ps = server.world, session["vfwebqq"], session["psessionid"]
    me = browser.json("/api/get_self_info2", {"t": 1})["result"]
    assert (me["uin"], me["account"], me["nick"]) == (world.user.qq, world.user.qq, world.user.nick)
    assert me["birthday"].keys() == {"year", "month", "day"}
    good = friend_hash(session["qq"], session["ptwebqq"])
    friends = browser.json("/api/get_user_friends2", vfwebqq=vf, hash=good)["result"]
    assert [f["uin"] for f in friends["friends"]] == [f.uin for f in world.friends]
    assert {m["uin"]: m["markname"] for m in friends["marknames"]} == {
        f.uin: f.markname for f in world.friends if f.markname}
    assert all(c["index"] != 0 for c in friends["categories"])          # index 0 is implied
    assert [i["nick"] for i in friends["info"]] == [f.nick for f in world.friends]
    assert browser.json("/api/get_user_friends2", vfwebqq=vf, hash="0" * 16)["retcode"] == 50
    online = browser.json("/channel/get_online_buddies2", {"vfwebqq": vf, "psessionid": ps}, referer=D_REF)
    assert {o["uin"] for o in online["result"]} == {f.uin for f in world.friends if f.status != "offline"}
    by_get = browser.json("/api/get_group_name_list_mask2", {"r": json.dumps({"vfwebqq": vf, "hash": good})})
    by_post = browser.json("/api/get_group_name_list_mask2", vfwebqq=vf, hash=good)
    assert by_get == by_post and set(by_get["result"]) == {"gnamelist", "gmarklist", "gmasklist"}
    assert [(g["gid"], g["code"]) for g in by_get["result"]["gnamelist"]] == [(g.gid, g.code) for g in world.groups]
    assert browser.json("/api/get_group_name_list_mask2", vfwebqq=vf, hash=good.lower())["retcode"] == 50
    group = world.groups[0]
    info = browser.json("/api/get_group_info_ext2", {"gcode": str(group.code), "vfwebqq": vf, "t": 1})["result"]
    assert info["ginfo"]["gid"] == group.gid and info["ginfo"]["owner"] == group.owner.uin
    assert [m["muin"] for m in info["ginfo"]["members"]] == [m.uin for m in group.members]
    assert {m["uin"] for m in info["minfo"]} == {m.uin for m in group.members}
    assert {c["muin"]: c["card"] for c in info["cards"]} == {m.uin: m.card for m in group.members if m.card}
    assert browser.json("/api/get_group_info_ext2", {"gcode": group.gid, "vfwebqq": vf})["retcode"] == 6
    discuss = world.discusses[0]
    dlist = browser.json("/api/get_discus_list", {"clientid": 53999199, "psessionid": ps, "vfwebqq": vf})
    assert [d["did"] for d in dlist["result"]["dnamelist"]] == [d.did for d in world.discusses]
    dinfo = browser.json("/channel/get_discu_info", {"did": discuss.did, "vfwebqq": vf, "clientid": 53999199,
                                                      "psessionid": ps}, referer=D_REF)["result"]
    assert [(m["mem_uin"], m["ruin"]) for m in dinfo["info"]["mem_list"]] == [(m.uin, m.qq) for m in discuss.members]
    friend = world.friends[0]
    assert browser.json("/api/get_friend_uin2", {"tuin": friend.uin, "type": 1, "vfwebqq": vf})["result"][
        "account"] == friend.qq
    assert browser.json("/api/get_single_long_nick2", {"tuin": friend.uin, "vfwebqq": vf})["result"] == [
        {"uin": friend.uin, "lnick": friend.lnick}]
    profile = browser.json("/api/get_friend_info2", {"tuin": friend.uin, "vfwebqq": vf, "psessionid": ps})
    assert profile["result"]["nick"] == friend.nick and "stat" in profile["result"]
    assert browser.json("/api/get_friend_info2", {"tuin": friend.qq, "vfwebqq": vf, "psessionid": ps})[
        "retcode"] == 100006
    assert browser.json("/channel/change_status2", {"newstatus": "away", "psessionid": ps},
                        referer=D_REF)["retcode"] == 0
    assert server.session.status == "away"
    server.inject_group_message(group.qq, group.members[1].uin, "x")
    recent = browser.json("/channel/get_recent_list2", referer=D_REF, vfwebqq=vf, clientid=53999199, psessionid="")
    assert recent["result"][0] == {"type": 1, "uin": group.gid}


def test_credentials_referer_and_cookies_are_checked(server, browser, session):
    vf, ps = session["vfwebqq"], session["psessionid"]
    good = friend_hash(session["qq"], session["ptwebqq"])
    assert browser.json("/api/get_user_friends2", vfwebqq="f" * 80, hash=good)["retcode"] == 103
    assert browser.json("/channel/get_online_buddies2", {"vfwebqq": vf, "psessionid": "nope"})["retcode"] == 103
    status, body = browser.call("/api/get_user_friends2", form={"r": json.dumps({"vfwebqq": vf, "hash": good})},
                                referer=None)
    assert status == 403 and json.loads(body)["retcode"] != 0
    stranger = Browser(server)                          # right tokens, no cookies
    assert stranger.json("/api/get_user_friends2", vfwebqq=vf, hash=good)["retcode"] == 103
    server.configure(auth_retcode=100001)
    assert browser.json("/api/get_discus_list", {"vfwebqq": "bad", "psessionid": ps})["retcode"] == 100001
    with pytest.raises(TypeError):
        server.configure(no_such_knob=1)


@pytest.mark.slow
def test_generated_world_is_fast_and_served_fast():
    started = time.time()
    world = World.generate(friends=2000, groups=200, members=200, discusses=20, seed=1)
    assert time.time() - started < 2.0
    assert (len(world.friends), len(world.groups), len(world.discusses)) == (2000, 200, 20)
    assert all(len(g.members) == 200 for g in world.groups)
    people = [f for f in world.friends] + [m for g in world.groups for m in g.members if m.uin != world.user.qq]
    uins, qqs = {p.uin for p in people}, {p.qq for p in people}
    ids = uins | {g.gid for g in world.groups} | {g.code for g in world.groups} | {d.did for d in world.discusses}
    assert not ids & (qqs | {g.qq for g in world.groups} | {world.user.qq})
    assert max(ids) > 2 ** 32
    roles = [world.self_member(g).role for g in world.groups]
    assert roles[:2] == ["owner", "admin"] and "member" in roles
    assert all(sum(m.role == "owner" for m in g.members) == 1 for g in world.groups)
    sim = Simulator(world=world, poll_hold=0.5).start()
    try:
        browser = Browser(sim)
        s = login(sim, browser)
        good = friend_hash(s["qq"], s["ptwebqq"])
        started = time.time()
        for _ in range(3):
            friends = browser.json("/api/get_user_friends2", vfwebqq=s["vfwebqq"], hash=good)
            groups = browser.json("/api/get_group_name_list_mask2", vfwebqq=s["vfwebqq"], hash=good)
        for g in list(world.groups)[:20]:
            assert browser.json("/api/get_group_info_ext2", {"gcode": g.code, "vfwebqq": s["vfwebqq"]})["retcode"] == 0
        assert len(friends["result"]["friends"]) == 2000 and len(groups["result"]["gnamelist"]) == 200
        assert time.time() - started < 5.0
    finally:
        sim.stop()


def test_world_json_round_trip_and_lookups():
    world = World.generate(friends=5, groups=2, members=6, discusses=1, seed=3)
    assert World.generate(friends=5, groups=2, members=6, discusses=1, seed=3).to_json() == world.to_json()
    data = json.loads(json.dumps(world.to_json()))
    assert World.from_json(data).to_json() == data
    group, friend = world.groups[1], world.friends[0]
    assert world.group(group.gid) is world.group(str(group.code)) is world.group(group.qq) is group
    assert world.friend(friend.qq) is world.friend(str(friend.uin)) is friend and friend.name == friend.nick
    with pytest.raises(KeyError):
        world.friend(group.gid)
    small = World.from_json({"user": {"qq": 10001, "nick": "我"}, "friends": [{"name": "阿明", "qq": 20002}],
                             "groups": [{"name": "测试群", "members": [{"qq": 20002, "role": "owner"}, {"nick": "路人"}]}],
                             "discusses": [{"members": [{"uin": world.friends[0].uin}]}]})
    amin = small.friends[0]
    g = small.groups[0]
    assert (small.user.uin, amin.nick, amin.qq) == (10001, "阿明", 20002)
    owner = g.members.get(20002)
    assert owner.uin == amin.uin and owner.nick == "阿明" and g.owner is owner
    assert small.self_member(g).role == "member" and len(g.members) == 3
    assert small.discusses[0].members.get(10001) is not None


# -- poll2 ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_poll_answers_103_until_online_buddies_was_called(server, browser):
    s = login(server, browser, online=False)
    assert poll(browser, s)["retcode"] == 103
    browser.json("/channel/get_online_buddies2", {"vfwebqq": s["vfwebqq"], "psessionid": s["psessionid"]})
    started = time.time()
    answer = poll(browser, s)
    assert answer == {"retcode": 0, "retmsg": "ok", "errmsg": "error"}
    assert 0.9 <= time.time() - started < 3


def test_poll_delivers_every_queued_event_with_the_font_first(server, browser, session):
    world = server.world
    friend, group, discuss = world.friends[0], world.groups[0], world.discusses[0]
    member, dmember = group.members[2], discuss.members[1]
    ids = [server.inject_friend_message(friend.qq, ["hi ", ["face", "微笑"], ["face", 13]]),
           server.inject_group_message(group.code, member.uin, "群消息"),
           server.inject_discuss_message(discuss.did, dmember.qq, "讨论"),
           server.inject_sess_message("group", group.gid, member.qq, "临时"),
           server.inject_sess_message("discuss", discuss.did, dmember.uin, "讨论临时"),
           server.inject_group_file(group.gid, member.uin, "报告.pdf")]
    server.inject_status(friend.uin, "busy", 21)
    server.inject_poll({"poll_type": "input_notify", "value": {"from_uin": friend.uin}})
    started = time.time()
    answer = poll(browser, session)
    assert time.time() - started < 0.5 and answer["retcode"] == 0
    events = answer["result"]
    assert [e["poll_type"] for e in events] == ["message", "group_message", "discu_message", "sess_message",
                                                "sess_message", "group_web_message", "buddies_status_change",
                                                "input_notify"]
    assert [e["value"]["msg_id"] for e in events[:6]] == ids and len(set(ids)) == 6
    me = world.user.qq
    for e in events[:5]:
        assert e["value"]["content"][0][0] == "font" and e["value"]["to_uin"] == me
    assert events[0]["value"]["content"][1:] == ["hi ", ["face", 14], ["face", 13]]
    assert events[0]["value"]["from_uin"] == friend.uin
    g = events[1]["value"]
    assert (g["from_uin"], g["group_code"], g["send_uin"], g["content"][1:]) == (group.gid, group.gid, member.uin,
                                                                                 ["群消息"])
    d = events[2]["value"]
    assert (d["from_uin"], d["did"], d["send_uin"]) == (discuss.did, discuss.did, dmember.uin)
    s0, s1 = events[3]["value"], events[4]["value"]
    assert (s0["from_uin"], s0["id"], s0["service_type"], s0["ruin"]) == (member.uin, group.gid, 0, member.qq)
    assert (s1["id"], s1["service_type"]) == (discuss.did, 1)
    assert "报告.pdf" in events[5]["value"]["xml"] and events[5]["value"]["from_uin"] == group.gid
    assert events[6]["value"] == {"uin": friend.uin, "status": "busy", "client_type": 21}
    assert friend.status == "busy"
    with pytest.raises(KeyError):
        server.inject_friend_message(group.gid, "not a friend")


def poll_on_a_thread(browser, s, answers):
    """A started thread that polls once and appends the answer to answers (or the error, when the
    server cuts the held poll)."""
    def held():
        try:
            answers.append(poll(browser, s))
        except Exception as e:
            answers.append(e)
    worker = threading.Thread(target=held)
    worker.start()
    return worker


def test_a_held_poll_wakes_up_for_an_event_and_for_a_lost_session(server, browser, session):
    answers = []
    worker = poll_on_a_thread(browser, session, answers)
    time.sleep(0.2)
    server.inject_friend_message(server.world.friends[0].uin, "wake up")
    worker.join(2)
    assert answers[0]["result"][0]["value"]["content"][-1] == "wake up"
    worker = threading.Thread(target=lambda: answers.append(poll(browser, session)))
    started = time.time()
    worker.start()
    time.sleep(0.2)
    server.expire_session()
    worker.join(2)
    assert answers[1] == {"retcode": 103, "errmsg": ""} and time.time() - started < 0.9
    assert browser.json("/api/get_self_info2")["retcode"] == 103


def test_kick_ends_the_session_once_delivered(server, browser, session):
    server.kick("您的帐号在另一地点登录")
    kick = poll(browser, session)["result"][0]
    assert kick["poll_type"] == "kick_message" and kick["value"]["reason"] == "您的帐号在另一地点登录"
    assert poll(browser, session)["retcode"] == 103 and not server.session.valid


@pytest.mark.parametrize("idle, status, body", [
    ("error", 200, {"errmsg": "error!!!", "retcode": 0}),
    ("100012", 200, {"errmsg": "", "retcode": 100012}),
    ("504", 504, None)])
def test_idle_answer_knob(server, browser, session, idle, status, body):
    server.configure(idle=idle)
    server.poll_hold = 0.1
    got_status, got = browser.call("/channel/poll2", referer=D_REF, form={"r": json.dumps(
        {"ptwebqq": session["ptwebqq"], "clientid": 53999199, "psessionid": session["psessionid"], "key": ""})})
    assert got_status == status
    if body is not None:
        assert json.loads(got) == body


# -- sending --------------------------------------------------------------------------------


def test_each_send_endpoint_is_checked_and_recorded(server, browser, session):
    world = server.world
    friend, group, discuss = world.friends[1], world.groups[0], world.discusses[0]
    member = group.members[3]
    assert send(browser, session, "send_buddy_msg2", ["hi", ["face", 14]], to=friend.uin) == {
        "errCode": 0, "msg": "send ok"}
    assert send(browser, session, "send_qun_msg2", ["群"], group_uin=group.gid)["errCode"] == 0
    assert send(browser, session, "send_discu_msg2", ["组"], did=discuss.did)["errCode"] == 0
    sig = browser.json("/channel/get_c2cmsg_sig2", {"id": group.gid, "to_uin": member.uin, "service_type": 0,
                                                    "clientid": 53999199, "psessionid": session["psessionid"]},
                       referer=D_REF)["result"]["value"]
    assert sig
    assert send(browser, session, "send_sess_msg2", ["私"], to=member.uin, group_sig=sig,
                service_type=0)["errCode"] == 0
    sent = server.sent
    assert [s["endpoint"] for s in sent] == ["send_buddy_msg2", "send_qun_msg2", "send_discu_msg2", "send_sess_msg2"]
    assert [s["target"] for s in sent] == [friend.uin, group.gid, discuss.did, member.uin]
    assert sent[0]["content"] == ["hi", ["face", 14], FONT] and sent[0]["text"] == "hi"
    assert sent[0]["r"]["to"] == friend.uin and sent[0]["r"]["msg_id"] == 1001 and sent[0]["delivered"]
    assert (sent[3]["via"], sent[3]["source"], sent[3]["text"]) == ("group", group.gid, "私")
    # refusals: not recorded
    assert send(browser, session, "send_sess_msg2", ["x"], to=member.uin, group_sig="bad", service_type=0)[
        "retcode"] != 0
    assert send(browser, session, "send_buddy_msg2", ["x"], to=friend.qq)["retcode"] != 0     # a qq, not a uin
    assert send(browser, session, "send_qun_msg2", ["x"], group_uin=group.code)["retcode"] != 0
    assert send(browser, session, "send_buddy_msg2", ["no font"], font=False, to=friend.uin)["retcode"] != 0
    assert browser.json("/channel/get_c2cmsg_sig2", {"id": group.gid, "to_uin": friend.uin + 1, "service_type": 0,
                                                     "psessionid": session["psessionid"]})["result"]["value"] == ""
    assert len(server.sent) == 4
    server.configure(lenient_font=True)
    assert send(browser, session, "send_buddy_msg2", ["no font"], font=False, to=str(friend.uin))["errCode"] == 0
    assert server.sent[-1]["text"] == "no font"
    expired = dict(session, psessionid="stale")
    assert send(browser, expired, "send_buddy_msg2", ["x"], to=friend.uin)["retcode"] == 103


def test_send_answer_knobs_rate_limit_and_group_echo(server, browser, session):
    friend, group = server.world.friends[0], server.world.groups[1]
    server.configure(send_retcode=100100)
    assert send(browser, session, "send_buddy_msg2", to=friend.uin) == {"errmsg": "error!!!", "retcode": 100100}
    assert server.sent[-1]["delivered"]
    server.configure(send_retcode=None, rate_limit=[2, 60])
    codes = [send(browser, session, "send_buddy_msg2", to=friend.uin).get("retcode", 0) for _ in range(3)]
    assert codes == [0, 0, 1202] and not server.sent[-1]["delivered"]
    server.configure(rate_limit=None, echo_group=True)
    send(browser, session, "send_qun_msg2", ["echo me"], group_uin=group.gid)
    echo = poll(browser, session)["result"][0]
    assert echo["poll_type"] == "group_message" and echo["value"]["send_uin"] == server.world.user.uin
    assert echo["value"]["content"][0][0] == "font" and echo["value"]["content"][1:] == ["echo me"]


# -- qun.qq.com / qinfo.clt.qq.com ------------------------------------------------------------


def test_group_admin_needs_the_bkn_of_the_skey(server, browser, session):
    world = server.world
    owned = world.groups[0]
    target = [m for m in owned.members if m.role == "member"][0]
    token = bkn(browser.cookie("skey"))
    mute = {"gc": owned.qq, "shutup_list": json.dumps([{"uin": target.qq, "t": 120}])}
    assert browser.json("/cgi-bin/qun_info/set_group_shutup", form=dict(mute, bkn=token + 1))["ec"] == 1
    assert server.admin_actions == []
    assert browser.json("/cgi-bin/qun_info/set_group_shutup", form=dict(mute, bkn=token), referer=QUN_REF)["ec"] == 0
    action = server.admin_actions[-1]
    assert (action["action"], action["group"], action["members"], action["seconds"], action["ec"]) == (
        "set_group_shutup", owned.qq, [target.qq], 120, 0)
    assert target.shutup_until > time.time()
    admin_target = [m for m in owned.members if m.role == "admin"][0]
    denied = dict(mute, bkn=token, shutup_list=json.dumps([{"uin": admin_target.qq, "t": 60}]))
    assert browser.json("/cgi-bin/qun_info/set_group_shutup", form=denied)["ec"] == 3
    assert browser.json("/cgi-bin/qun_info/set_group_card", form={"gc": owned.qq, "u": target.qq, "name": "新名片",
                                                                  "bkn": token})["ec"] == 0
    assert target.card == "新名片"
    assert browser.json("/cgi-bin/qun_info/set_group_admin", form={"src": "qinfo_v2", "gc": owned.qq,
                                                                   "u": target.qq, "op": 1, "bkn": token})["ec"] == 0
    assert target.role == "admin"
    members = browser.json("/cgi-bin/qun_info/get_group_members_new", form={"gc": owned.qq, "u": world.user.qq,
                                                                            "bkn": token})
    assert target.qq in members["adm"] and members["cards"][str(target.qq)] == "新名片"
    assert {m["u"] for m in members["mems"]} == {m.qq for m in owned.members}
    assert browser.json("/cgi-bin/qun_mgr/delete_group_member", form={"gc": owned.qq, "ul": str(target.qq),
                                                                      "flag": 0, "bkn": token})["ec"] == 0
    assert owned.members.get(target.qq) is None
    outsider = [f for f in world.friends if owned.members.get(f.uin) is None][0]
    assert browser.json("/cgi-bin/qun_mgr/add_group_member", form={"gc": owned.qq, "ul": str(outsider.qq),
                                                                   "bkn": token})["ec"] == 0
    assert owned.members.get(outsider.qq).uin == outsider.uin
    joined = server.add_group(name="新群", members=[{"nick": "群主", "role": "owner"}, {"nick": "甲"}])
    victim = joined.members.get(joined.members[1].uin)
    assert (world.self_member(joined).role, victim.role) == ("member", "member")
    assert browser.json("/cgi-bin/qun_info/delete_group_member", form={"gc": joined.qq, "ul": victim.qq,
                                                                       "bkn": token})["ec"] == 3
    assert browser.json("/cgi-bin/sign", form={"gc": joined.qq, "is_sign": 0, "bkn": token}) == {
        "ec": 0, "em": "", "errcode": 0, "is_sign": 1, "conti_count": 1, "rank": 1}
    assert [a["action"] for a in server.admin_actions] == [
        "set_group_shutup", "set_group_shutup", "set_group_card", "set_group_admin", "delete_group_member",
        "add_group_member", "delete_group_member", "sign"]
    lists = browser.json("/cgi-bin/qun_mgr/get_group_list", form={"bkn": token})
    assert [g["gc"] for g in lists["create"]][0] == owned.qq and lists["ec"] == 0
    assert world.groups[1].qq in [g["gc"] for g in lists["manage"]]
    friends = browser.json("/cgi-bin/qun_mgr/get_friend_list", form={"bkn": token})["result"]
    assert sorted(m["uin"] for c in friends.values() for m in c["mems"]) == sorted(f.qq for f in world.friends)
    search = browser.json("/cgi-bin/qun_mgr/search_group_members", form={"gc": owned.qq, "st": 0, "end": 2000,
                                                                         "sort": 0, "bkn": token})
    assert search["count"] == len(owned.members) and {m["role"] for m in search["mems"]} <= {0, 1, 2}


# -- faults, control API, QR image ------------------------------------------------------------


def test_faults_answer_instead_of_the_route(server, browser, session):
    server.fault("/channel/poll2", retcode=121, count=2)
    assert poll(browser, session) == {"retcode": 121, "errmsg": ""}
    assert poll(browser, session)["retcode"] == 121
    server.fault("poll2", status=502)
    assert browser.call("/channel/poll2", form={"r": "{}"}, referer=D_REF)[0] == 502
    server.fault("/channel/poll2", drop=True)
    with pytest.raises((http.client.RemoteDisconnected, urllib.error.URLError, ConnectionError)):
        poll(browser, session)
    server.fault("/api/get_self_info2", body=b'{"retcode":0,"result":{"ni')
    assert browser.call("/api/get_self_info2")[1] == b'{"retcode":0,"result":{"ni'
    server.fault("/api/get_self_info2", delay=0.3)
    started = time.time()
    assert browser.json("/api/get_self_info2")["retcode"] == 0 and time.time() - started >= 0.3
    server.fault("/channel/poll2", retcode=116, extra={"p": "f" * 64})
    assert poll(browser, session) == {"retcode": 116, "errmsg": "", "p": "f" * 64}
    assert server.session.ptwebqq == "f" * 64
    vf = session["vfwebqq"]
    assert browser.json("/api/get_user_friends2", vfwebqq=vf, hash=friend_hash(session["qq"], session["ptwebqq"]))[
        "retcode"] == 50
    assert browser.json("/api/get_user_friends2", vfwebqq=vf, hash=friend_hash(session["qq"], "f" * 64))[
        "retcode"] == 0
    with pytest.raises(ValueError):
        server.fault("/no/such/path")


def test_http_control_api(server, browser):
    def control(name, **kwargs):
        req = urllib.request.Request(server.url + "/sim/" + name, data=json.dumps(kwargs).encode())
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def view(name):
        with urllib.request.urlopen(server.url + "/sim/" + name, timeout=5) as resp:
            return json.loads(resp.read())

    assert view("state")["qr_state"] == "none"
    assert control("scan") == (400, {"ok": False, "error": "RuntimeError: the QR is none; it cannot become scanned"})
    browser.call("/ptqrshow", referer=None)
    assert control("scan")[1]["ok"] and control("confirm")[1]["ok"]
    s = login(server, browser)
    status, answer = control("add_friend", nick="新朋友", category=1)
    assert status == 200 and answer["result"]["nick"] == "新朋友"
    uin = answer["result"]["uin"]
    assert server.world.friend(uin).category == 1
    assert control("inject_friend_message", sender=uin, content="来自 HTTP")[1]["ok"]
    assert poll(browser, s)["result"][0]["value"]["content"][1] == "来自 HTTP"
    assert control("fault", path="/api/get_self_info2", retcode=100003)[1]["ok"]
    assert browser.json("/api/get_self_info2")["retcode"] == 100003
    assert control("configure", idle="error")[1]["ok"] and server.knobs["idle"] == "error"
    assert control("nonsense")[0] == 404 and control("add_friend", bogus=1)[0] == 400
    state = view("state")
    assert (state["logins"], state["session"]["psessionid"], state["qr_state"]) == (1, s["psessionid"], "confirmed")
    assert any(r["path"] == "/api/get_self_info2" for r in view("requests"))
    assert not any(r["path"].startswith("/sim/") for r in view("requests"))
    assert len(view("world")["friends"]) == len(server.world.friends)
    assert view("sent") == [] and view("admin_actions") == []
    assert control("clear")[1]["ok"] and len(server.requests) == 0
    assert control("expire_session")[1]["ok"] and not server.session.valid


def test_qr_png_is_a_real_qr_code(server, browser):
    for scale in (3, 5):
        status, png = browser.call("/ptqrshow", {"s": scale}, referer=None)
        grid = decode_png_grid(png, scale, quiet=2)
        n = len(grid)
        assert (n - 17) % 4 == 0 and n >= 21
        for r0, c0 in ((0, 0), (0, n - 7), (n - 7, 0)):
            assert is_finder(grid, r0, c0), (r0, c0)
        assert not is_finder(grid, n - 7, n - 7)
        assert all(grid[6][c] == (c % 2 == 0) for c in range(8, n - 8))         # timing patterns
        assert all(grid[r][6] == (r % 2 == 0) for r in range(8, n - 8))
        bits = [grid[r][8] for r in (0, 1, 2, 3, 4, 5, 7, 8)] + [grid[8][c] for c in (7, 5, 4, 3, 2, 1, 0)]
        word = sum(b << i for i, b in enumerate(bits)) ^ 0x5412
        assert word >> 13 == 0                                            # error correction level M
        rem = word >> 10
        for _ in range(10):
            rem = (rem << 1) ^ ((rem >> 9) * 0x537)
        assert (word >> 10) << 10 | rem == word                           # BCH(15,5) intact


def test_reed_solomon_and_version_choice():
    data = [32, 91, 11, 120, 209, 114, 220, 77, 67, 64, 236, 17, 236, 17, 236, 17]
    assert rs_remainder(data, 10) == [196, 35, 39, 119, 235, 215, 231, 226, 93, 23]
    assert [QRCode("x" * n).version for n in (14, 15, 106, 107, 213)] == [1, 2, 6, 7, 10]


def test_a_failing_route_answers_500_and_the_server_goes_on(server, browser, session, caplog):
    server.inject_poll({"poll_type": "message", "value": object()})         # cannot be serialised
    status, body = browser.call("/channel/poll2", referer=D_REF, form={"r": json.dumps(
        {"ptwebqq": session["ptwebqq"], "clientid": 53999199, "psessionid": session["psessionid"], "key": ""})})
    assert status == 500 and json.loads(body)["retcode"] == 500
    assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)
    assert browser.json("/api/get_self_info2")["retcode"] == 0


def test_stop_ends_held_polls_and_threads(server, browser, session):
    server.poll_hold = 30
    answers = []
    worker = poll_on_a_thread(browser, session, answers)
    time.sleep(0.2)
    started = time.time()
    server.stop()
    worker.join(5)
    assert time.time() - started < 3 and not worker.is_alive()
    assert not [t for t in threading.enumerate() if t.name.startswith("smartqq-sim")]


def decode_png_grid(png, scale, quiet):
    """The module grid of an 8-bit grayscale PNG (True = dark), decoded with zlib/struct."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", None
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        body = png[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", png[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert (width, depth, color) == (height, 8, 0)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    rows = [raw[y * (width + 1):(y + 1) * (width + 1)] for y in range(width)]
    assert all(row[0] == 0 for row in rows)
    pixels = [row[1:] for row in rows]
    n = width // scale - 2 * quiet
    assert (n + 2 * quiet) * scale == width
    assert all(v == 255 for v in pixels[0]) and all(row[0] == 255 for row in pixels)       # quiet zone
    return [[pixels[(quiet + r) * scale + scale // 2][(quiet + c) * scale + scale // 2] == 0 for c in range(n)]
            for r in range(n)]


def is_finder(grid, r0, c0):
    return all(grid[r0 + dr][c0 + dc] == (max(abs(dr - 3), abs(dc - 3)) != 2)
               for dr in range(7) for dc in range(7))
