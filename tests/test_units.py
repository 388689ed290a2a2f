"""Unit tests of webqq.py's sections: hashes, content, models, send status, PNG and QR drawing."""
import os
import struct
import zlib

import pytest

import webqq
from conftest import ROOT, png_chunk

PTWEBQQ = "551a0ec0f70f347e2ffc7931bcf7a13e4c774a2cb9f9085b8ac65a9505e412c9"


# -- 2. Helpers: the test vectors of smartqq-protocol.md section 2.5 ---------

@pytest.mark.parametrize("text, expected", [
    ("g3x2rsxBl5XERjRyBw1UMc2vgoXpjLyVXUa0qBUX5BEqHg2UWuF8rJtk-KB*jL1A", 1591611444),
    ("hJ9GvNx*oIvLjP5I5dQ19KPa3zwxNI62eALLO*g2JLbKPYsZIRsnbJIxNe74NzQQ", 1178303247),
    ("", 0),
])
def test_hash33(text, expected):
    assert webqq.hash33(text) == expected


@pytest.mark.parametrize("skey, expected", [("@beMESLu1X", 1412445979), ("@Z86pBPzDt", 559630849), ("", 5381)])
def test_bkn(skey, expected):
    assert webqq.bkn(skey) == expected


@pytest.mark.parametrize("text, expected", [("397467713", 3597827071), ("@beMESLu1X", 2659342294)])
def test_time33(text, expected):
    assert webqq.time33(text) == expected


@pytest.mark.parametrize("uin, ptwebqq, expected", [
    (1045541707, PTWEBQQ, "087B5A125FFC5300"),
    (1234567, PTWEBQQ, "08455A515F9953CC"),
    (3000000000, PTWEBQQ, "08F75A935F11534B"),
    (1045541707, "", "007B001200FC0000"),
])
def test_friend_hash(uin, ptwebqq, expected):
    assert webqq.friend_hash(uin, ptwebqq) == expected


def test_quoted_args_keeps_commas_inside_quotes():
    text = "ptuiCB('0','0','http://x/check_sig?a=1,2','0','登录成功！', 'nick, with comma');"
    assert webqq.quoted_args(text) == ["0", "0", "http://x/check_sig?a=1,2", "0", "登录成功！", "nick, with comma"]


def test_cut_utf8_never_splits_a_character():
    assert webqq.cut_utf8("群名片很长很长很长很长", 21) == "群名片很长很长"
    assert webqq.cut_utf8("abc", 21) == "abc"
    assert webqq.cut_utf8(None, 21) is None


def test_atomic_write_creates_mode_0600(tmp_path):
    path = tmp_path / "f.json"
    webqq.atomic_write(str(path), "数据")
    assert path.read_text(encoding="utf-8") == "数据"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_redact_url_hides_credentials():
    url = "http://d1.web2.qq.com/channel/get_online_buddies2?vfwebqq=SECRET&clientid=53999199&psessionid=S2"
    assert webqq.redact_url(url) == ("http://d1.web2.qq.com/channel/get_online_buddies2"
                                     "?vfwebqq=***&clientid=53999199&psessionid=***")


# -- 3. Transport ------------------------------------------------------------

def test_route_rewrites_only_qq_hosts():
    h = webqq.Http(base="http://127.0.0.1:8090/")
    assert h.route("https://ssl.ptlogin2.qq.com/ptqrshow?appid=1") == "http://127.0.0.1:8090/ptqrshow?appid=1"
    assert h.route("http://qq.com/") == "http://127.0.0.1:8090/"
    assert h.route("http://example.com/qq.com") == "http://example.com/qq.com"
    assert webqq.Http().route("https://w.qq.com/x") == "https://w.qq.com/x"


def test_cookies_survive_a_json_round_trip(tmp_path):
    a = webqq.Http(base="http://127.0.0.1:1")
    a.set_cookie("supertoken", "abc")
    a.set_cookie("supertoken", "def")
    path = str(tmp_path / "cookies.dat")
    a.save_cookies(path)
    b = webqq.Http(base="http://127.0.0.1:1")
    assert b.load_cookies(path)
    assert b.cookie("supertoken") == "def"
    assert len(list(b.jar)) == 1
    assert not b.load_cookies(str(tmp_path / "missing"))


# -- 4. Model ----------------------------------------------------------------

def make_contacts():
    c = webqq.Contacts()
    c.set_friends([webqq.Friend(id=1, name="alice", markname="小A", uid=1001),
                   webqq.Friend(id=2, name="alice", uid=None),
                   webqq.Friend(id=3, name="bob")], diff=False)
    g = webqq.Group(id=10, name="grp", code=110, uid=5010)
    c.set_groups([g], diff=False)
    c.set_group_members(g, {"memo": "m"}, [webqq.GroupMember(id=1, name="alice", card="卡片"),
                                           webqq.GroupMember(id=4, name="dave", card=None)])
    return c, g


def test_search_is_exact_and_ordered():
    c, g = make_contacts()
    assert [f.id for f in c.search_friend(name="alice")] == [1, 2]
    assert [f.id for f in c.search_friend(name="alice", id="2")] == [2]
    assert c.search_friend(name="ali") == []
    assert [f.id for f in c.search_friend(displayname="小A")] == [1]
    assert [f.id for f in c.search_friend(uid="1001")] == [1]
    assert c.search_friend(uid="None") == []
    assert c.search_friend(foo="bar") == []
    assert c.search_friend() == []
    assert c.search_friend(__class__="x") == []


def test_member_displayname_prefers_friend_markname_then_card():
    c, g = make_contacts()
    assert [m.displayname for m in g.members] == ["小A", "dave"]
    assert c.search_group_member(g, displayname="小A")[0].id == 1


def test_friend_diff_yields_new_lose_and_property_events():
    c, _ = make_contacts()
    events = c.set_friends([webqq.Friend(id=1, name="alice2", markname="小A", uid=1001),
                            webqq.Friend(id=5, name="eve")])
    names = [(name, args[0].id) for name, args in events]
    assert ("friend_property_change", 1) in names
    assert ("new_friend", 5) in names
    assert ("lose_friend", 2) in names and ("lose_friend", 3) in names
    change = [args for name, args in events if name == "friend_property_change"][0]
    assert change[1:] == ("name", "alice", "alice2")


def test_member_diff_only_after_first_load():
    c, g = make_contacts()
    events = c.set_group_members(g, {"memo": "new"}, [webqq.GroupMember(id=4, name="dave"),
                                                      webqq.GroupMember(id=6, name="fay")])
    assert ("group_property_change", "memo") in [(n, a[1]) for n, a in events if n == "group_property_change"]
    assert [(n, a[0].id, a[1].id) for n, a in events if n.endswith("group_member")] == [
        ("new_group_member", 6, 10), ("lose_group_member", 1, 10)]


def test_versions_count_changes_per_kind():
    c, g = make_contacts()
    before = dict(c.versions)
    c.set_friend_state(1, "busy")
    assert c.versions["friend"] == before["friend"] + 1
    assert c.versions["group"] == before["group"] and c.versions["user"] == before["user"]
    c.add_group_member(g, webqq.GroupMember(id=9, name="new"))
    assert c.versions["group"] == before["group"] + 1
    version = c.version
    c.changed()
    assert c.version == version + 1 and all(c.versions[k] > before[k] for k in c.KINDS)


def test_sticky_fields_survive_a_refresh_without_them():
    c, _ = make_contacts()
    c.set_friends([webqq.Friend(id=1, name="alice", markname="小A", uid=None)])
    assert c.friend(1).uid == 1001


def test_to_json_key_sets():
    c, g = make_contacts()
    assert set(c.friend(1).to_json()) == {"category", "client_type", "face", "flag", "id", "is_vip",
                                          "markname", "name", "state", "uid", "vip_level"}
    assert "member" in g.to_json() and "member" not in g.to_json(members=False)
    assert webqq.DiscussMember(id="7").to_json()["id"] == "7"


# -- 5. Messages -------------------------------------------------------------

def test_flatten_content():
    font = ["font", {"size": 10, "color": "000000", "style": [0, 0, 0], "name": "微软雅黑"}]
    assert webqq.flatten_content([font, "a &amp; b&nbsp;c\r\nd", ["face", 14], ["face", 0], ["face", 999],
                                  ["cface", {}], ["offpic", {}], ["weird"]]) == \
        "a & b c\nd[微笑][表情][表情][图片][图片][未识别内容]"
    assert webqq.flatten_content([font]) == "[图片]"


def test_encode_content_puts_faces_and_the_font_last():
    assert webqq.encode_content("hi[微笑]x[nope]") == ["hi", ["face", 14], "x[nope]", ["font", webqq.FONT]]
    assert webqq.encode_content("[再见]") == [["face", 88], ["font", webqq.FONT]]


@pytest.mark.parametrize("body, expected", [
    ({"errCode": 0, "msg": "send ok"}, (0, "发送正常")),
    ({"retcode": 0}, (0, "发送正常")),
    ({"retcode": 100100, "errmsg": "error!!!"}, (0, "忽略返回值: 100100")),
    ({"retcode": 1202}, (0, "忽略返回值: 1202")),
    ({"errCode": 7, "errMsg": "ERROR"}, (-3, "发送异常")),
    ({"errCode": 7}, (-4, '响应未知: {"errCode":7}')),
    ({"retcode": 100012}, (-5, "未识别返回值:100012")),
    ({"foo": 1}, (-2, '响应未知: {"foo":1}')),
    (None, (-1, "数据格式错误")),
])
def test_send_status(body, expected):
    assert webqq.send_status(body) == expected


def test_message_json_of_a_received_group_message():
    c, g = make_contacts()
    msg = webqq.Message(id=7001, type="group_message", cls="recv", time=1500000200, content="hi",
                        sender=g.members[1], receiver=c.user, group=g)
    c.user.id, c.user.uid, c.user.name = 111, 999, "me"
    assert msg.to_json() == {"class": "recv", "content": "hi", "group": "grp", "group_id": 10, "group_uid": 5010,
                             "id": 7001, "receiver": "me", "receiver_id": 111, "receiver_uid": 999,
                             "sender": "dave", "sender_id": 4, "sender_uid": None, "time": 1500000200,
                             "type": "group_message"}


def test_emitter_survives_a_failing_handler():
    em, seen = webqq.EventEmitter(), []
    em.on("x", lambda: 1 / 0)
    em.on("x", lambda: seen.append("x"))
    em.on("all_event", lambda name, *args: seen.append((name,) + args))
    em.emit("x")
    assert seen == ["x", ("x",)]


# -- 9. QR display -----------------------------------------------------------

def png(width, height, pixels, color=0):
    """A grey (or RGB) 8-bit PNG, filter 0 on each row."""
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    return (webqq.PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def finder_matrix(size=21):
    """A QR-shaped matrix: the three finder patterns and a diagonal."""
    m = [[False] * size for _ in range(size)]
    for ox, oy in ((0, 0), (size - 7, 0), (0, size - 7)):
        for y in range(7):
            for x in range(7):
                ring = max(abs(x - 3), abs(y - 3))
                m[oy + y][ox + x] = ring != 2
    for i in range(8, size - 8):
        m[i][i] = True
    m[size - 1][size - 1] = True
    return m


def test_decode_png_and_find_the_modules():
    matrix, scale, margin = finder_matrix(), 3, 2
    size = (21 + 2 * margin) * scale
    pixels = [[0 if (margin * scale <= x < size - margin * scale and margin * scale <= y < size - margin * scale
                     and matrix[y // scale - margin][x // scale - margin]) else 255 for x in range(size)]
              for y in range(size)]
    assert webqq.decode_png(png(size, size, pixels))[2] == pixels
    assert webqq.qr_matrix(png(size, size, pixels)) == matrix


def test_decode_png_rgb_and_filters():
    data = png(2, 1, [[255, 0, 0, 0, 0, 0]], color=2)
    assert webqq.decode_png(data) == (2, 1, [[76, 0]])
    with pytest.raises(ValueError):
        webqq.decode_png(b"GIF89a")


def test_draw_qrcode_half_blocks_and_ascii():
    matrix = [[True, False], [False, True], [True, True]]
    assert webqq.draw_qrcode(matrix, quiet=0) == "\u2584\u2580\n  \n"
    assert webqq.draw_qrcode(matrix, ascii=True, quiet=1) == (
        "@@@@@@@@\n@@  @@@@\n@@@@  @@\n@@    @@\n@@@@@@@@\n")


def test_the_readme_lists_every_client_option():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    missing = [name for name in list(webqq.Client.OPTIONS) + list(webqq.MAIN_OPTIONS) if "`%s`" % name not in readme]
    assert missing == []


def test_showmsg_lines_name_where_a_message_went():
    from webqq_plugins.showmsg import describe
    c, g = make_contacts()
    friend, member = c.friend(3), g.members[1]
    sent = webqq.Message(type="friend_message", cls="send", content="hi", sender=c.user, receiver=friend)
    assert describe(sent) == "[好友消息] 我->bob : hi"
    sent.finish(-5, "TTL失效")
    assert describe(sent) == "[好友消息] 我->bob : hi (发送失败: TTL失效)"
    got = webqq.Message(type="group_message", cls="recv", content="yo", sender=member, group=g)
    assert describe(got) == "[群消息] dave|grp : yo"


def test_an_upstream_missing_a_method_is_refused_when_made(tmp_path):
    class Half(webqq.Upstream):
        def login(self):
            return False

    client = webqq.Client(tmpdir=str(tmp_path), qrcode_display="none")
    with pytest.raises(TypeError) as refused:
        Half(client)
    assert str(refused.value) == ("upstream Half lacks fetch_user, fetch_friends, fetch_groups, fetch_group_detail, "
                                  "fetch_discusses, poll, send, shutup, kick")
    assert webqq.SmartQQ(client).uid is None


def test_a_bound_method_unsubscribes(tmp_path):
    class Plugin(object):
        def __init__(self):
            self.heard = []

        def on_event(self, name, *args):
            self.heard.append(name)

    emitter, plugin = webqq.EventEmitter(), Plugin()
    emitter.on("all_event", plugin.on_event)
    emitter.emit("login", 1)
    emitter.off("all_event", plugin.on_event)       # a new bound method object, equal to the first
    emitter.emit("stop")
    assert plugin.heard == ["login"]
