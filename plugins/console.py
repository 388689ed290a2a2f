# -*- coding: utf-8 -*-
"""console: a web QQ client in one page, served by the Openqq server under /console/.

    client.load("openqq", listen=[{"host": "127.0.0.1", "port": 5000}])
    client.load("console")          # then open http://127.0.0.1:5000/console/

Until the account is logged in, the page shows the login: the QR code while one waits for a scan,
the state as it changes, and what to do next. Then it is a QQ client: the contacts (friends by
category, groups, discusses, temporary sessions) with a filter and unread counts; a conversation
per contact with the history kept here and new messages live from /openqq/events (our own sends
from other API clients too); sending through the Openqq routes, each message showing sending, sent
or failed with the code and status the API answered. No external assets, no build step. The page
and its JSON follow the Openqq server's rules: with an access_token, open /console/?access_token=TOKEN
once (the page keeps the token for the tab and takes it out of the address bar).

Routes (docs/people.md "The web console", docs/openqq.md "The console's routes"):
  /console/                    the page
  /console/status              JSON: state, QR code, account, counts; ?since=VERSION waits up to
                               `hold` seconds for a change (without a thread: parked like check_event)
  /console/qrcode.png          the QR code waiting for a scan, else 404
  /console/conversations       JSON: every conversation kept here, the latest first, with its last message
  /console/history?conversation=KEY   JSON: the last `history` messages of a conversation, oldest first
"""

import base64
import collections
import hashlib
import re
import threading
import time
from urllib.parse import quote

from webqq import FACES, NOT_FOUND, ApiError, Response, bad_request, json_dumps, non_negative, whole

# option: (default, one line of help, check)
OPTIONS = collections.OrderedDict([
    ("history", (200, "messages kept per conversation for the page (received and sent)", whole())),
    ("conversations", (500, "conversations kept at most (the one quiet longest is forgotten first)", whole())),
    ("hold", (25.0, "seconds a page's status request waits for something to change", non_negative)),
])

# What the status tells a script in each state (the page has its own words, in Chinese and English).
STATE_TEXT = {
    "init": "starting", "loading": "connecting to QQ", "scaning": "scan the QR code with the QQ app",
    "confirming": "scanned: tap Allow on the phone", "updating": "logged in, loading the contacts",
    "running": "receiving messages", "stop": "stopped",
}
# Events that change what /console/status shows (messages come to the page through /openqq/events).
STATUS_EVENTS = frozenset(("state_change", "progress", "login", "user_property_change"))
CONVERSATION = re.compile(r"^(friend|group|discuss):[^:]{1,40}$|^sess:(group|discuss):[^:]{1,40}:[^:]{1,40}$")


def conversation_of(data):
    """The conversation a message (its JSON, as check_event gives it) belongs to: friend:ID, group:ID,
    discuss:ID, or sess:group:ID:MEMBER / sess:discuss:ID:MEMBER for a temporary session."""
    kind = data.get("type")
    if kind == "group_message":
        return "group:%s" % data.get("group_id")
    if kind == "discuss_message":
        return "discuss:%s" % data.get("discuss_id")
    other = data.get("sender_id") if data.get("class") == "recv" else data.get("receiver_id")
    if other is None:
        return None
    if kind == "sess_message":
        via = "group" if data.get("via") == "group" else "discuss"
        return "sess:%s:%s:%s" % (via, data.get(via + "_id"), other)
    return "friend:%s" % other


class Console(object):
    """The page and its JSON: the client's state, and the history of each conversation; stop() releases waiting pages."""

    def __init__(self, client, server, options):
        self.client, self.server = client, server
        self.hold = options["hold"]
        self.history = max(1, options["history"])
        self.most = max(1, options["conversations"])
        self.histories = collections.OrderedDict()      # conversation -> deque of message JSON bytes, latest last
        self.progress = {}
        self.qrcodes = 0
        self.version = 1
        self.stopped = False
        self.cond = threading.Condition()
        client.on("all_event", self.on_event)
        server.mount("/console", self.handle)
        urls = ", ".join(url + "/console/" for url in server.urls)
        urls += " (add ?access_token=...)" if server.opts["access_token"] else ""
        self.qr_display = "console, the web page " + urls
        client.log.info("网页控制台 (web console): %s", urls)

    # -- what the page shows -------------------------------------------------

    def on_event(self, name, *args):
        if name in ("receive_message", "send_message"):
            self.keep(dict(args[0].to_json(), post_type=name))
            return
        if name not in STATUS_EVENTS and not name.startswith(("new_", "lose_")):
            return
        with self.cond:
            if name == "progress":
                self.progress[args[0]] = [args[1], args[2]]
            elif name == "state_change" and args[1] == "updating":
                self.progress = {}
            self.changed()

    def show_qrcode(self, path, png):
        """A QR code to scan: the page shows it (the client calls this when the console is a QR display)."""
        with self.cond:
            self.qrcodes += 1
            self.changed()

    def changed(self):
        """A new version of the status (self.cond held): wake the pages waiting for one."""
        self.version += 1
        self.cond.notify_all()
        for server in self.server.servers:      # parked status requests wait for this
            server.notice()

    def shows(self, png):
        """Whether the page shows the QR code png: one is waiting, and the console is a QR display."""
        return bool(png) and self.qrcodes > 0

    def keep(self, data):
        """Add a message to its conversation's history."""
        key = conversation_of(data)
        if key is None:
            return
        raw = json_dumps(data).encode("utf-8")
        with self.cond:
            kept = self.histories.get(key)
            if kept is None:
                kept = self.histories[key] = collections.deque(maxlen=self.history)
                if len(self.histories) > self.most:
                    self.histories.popitem(last=False)
            else:
                self.histories.move_to_end(key)
            kept.append(raw)

    def status(self):
        """The page's view of the client, as JSON."""
        client, contacts = self.client, self.client.contacts
        state, png = client.state, client.qrcode
        user = contacts.user
        return {
            "code": 0, "state": state, "state_text": STATE_TEXT.get(state, state),
            "account": client.account,
            "upstream": client.upstream.name if client.upstream is not None else client.options["upstream"],
            "user": {"name": user.displayname, "uid": user.uid, "id": user.id} if user.id is not None else None,
            "counts": {"friends": len(contacts.friends()), "groups": len(contacts.groups()),
                       "discusses": len(contacts.discusses())},
            "contacts": {kind: contacts.versions[kind] for kind in ("friend", "group", "discuss")},
            "qrcode": base64.b64encode(png).decode("ascii") if self.shows(png) and state in ("loading", "scaning")
            else None,
            "qrcode_number": self.qrcodes, "progress": dict(self.progress),
        }

    # -- routes ---------------------------------------------------------------

    def handle(self, req):
        if req.path == "/console":
            token = req.param("access_token")
            location = "/console/" + ("?access_token=" + quote(token, safe="") if token else "")
            return Response(b"", 302, [("Location", location)])
        if req.path in ("/console/", "/console/index.html"):
            return Response(PAGE, 200, PAGE_HEADERS, "text/html; charset=utf-8")
        if req.path == "/console/status":
            return self.wait(req)
        if req.path == "/console/qrcode.png":
            png = self.client.qrcode
            if not self.shows(png):
                raise ApiError(404, NOT_FOUND, "no QR code is waiting for a scan")
            return Response(png, 200, [("Cache-Control", "no-store")], "image/png")
        if req.path == "/console/conversations":
            return self.conversations()
        if req.path == "/console/history":
            return self.history_of(req.param("conversation"))
        raise ApiError(403, NOT_FOUND, "api not found")

    def wait(self, req):
        """The status, once its version differs from ?since= (or after hold seconds)."""
        since = req.param("since")
        changed = lambda: self.stopped or since != str(self.version)
        if req.parkable and req.wait is None and not changed():
            resp = Response(b"")
            resp.wait_for = (changed, self.hold)
            return resp
        deadline = time.monotonic() + (self.hold if req.wait is None else req.wait)
        with self.cond:
            while not changed() and time.monotonic() < deadline and req.alive():
                self.cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            version = self.version
        result = self.status()
        result["version"] = version
        return Response(json_dumps(result).encode("utf-8"), 200, [("Cache-Control", "no-store")])

    def conversations(self):
        """Every conversation kept, the latest first: {conversation, count, last (message)}."""
        with self.cond:
            kept = [(key, len(items), items[-1]) for key, items in self.histories.items()]
        rows = [b'{"conversation":%s,"count":%d,"last":%s}' % (json_dumps(key).encode("utf-8"), count, last)
                for key, count, last in reversed(kept)]
        return Response(b'{"code":0,"conversations":[%s]}' % b",".join(rows), 200, [("Cache-Control", "no-store")])

    def history_of(self, key):
        """The messages kept of one conversation, oldest first."""
        if key is None or not CONVERSATION.match(key):
            raise bad_request("conversation must be friend:ID, group:ID, discuss:ID, sess:group:ID:MEMBER "
                              "or sess:discuss:ID:MEMBER")
        with self.cond:
            items = list(self.histories.get(key, ()))
        return Response(b'{"code":0,"conversation":%s,"messages":[%s]}' % (json_dumps(key).encode("utf-8"),
                                                                          b",".join(items)),
                        200, [("Cache-Control", "no-store")])

    def stop(self):
        """Release the pages waiting for a change."""
        self.client.off("all_event", self.on_event)
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


def call(client, **options):
    """The plugin entry point: serve the console on the Openqq server loaded before; returns it (it has stop())."""
    server = client.plugin("openqq")
    if server is None or not hasattr(server, "mount"):
        raise ValueError("console: the openqq plugin must be loaded first (its server serves the console)")
    return Console(client, server, options)


###############################################################################
# The page: HTML, CSS and JavaScript in one, no external assets.
###############################################################################

STYLE = r"""
*{box-sizing:border-box}
html,body{height:100%;margin:0}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI","PingFang SC","Microsoft YaHei",sans-serif;
background:#eef0f3;color:#1d2129;display:flex;flex-direction:column}
button,input,textarea{font:inherit;color:inherit}
header{background:#1d2129;color:#fff;padding:8px 14px;display:flex;align-items:center;gap:10px;flex:none}
header h1{font-size:17px;margin:0;font-weight:600}
#me{opacity:.85;font-size:14px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.spacer{flex:1}
.pill{padding:2px 9px;border-radius:11px;background:#6b7280;font-size:12px;white-space:nowrap}
#state.running{background:#16a34a}#state.scaning,#state.confirming{background:#d97706}
#state.stop{background:#dc2626}
#link.live{background:#16a34a}#link.reconnecting{background:#d97706}#link.offline{background:#dc2626}
#lang{background:transparent;border:1px solid #6b7280;color:#fff;border-radius:6px;padding:2px 8px;cursor:pointer}
#login{flex:1;display:flex;align-items:flex-start;justify-content:center;padding:28px 16px;overflow:auto}
.card{background:#fff;border-radius:10px;padding:22px 26px;box-shadow:0 1px 3px rgba(0,0,0,.1);max-width:460px;width:100%}
.card h2{margin:0 0 8px;font-size:20px}
#qr{display:block;width:222px;height:222px;image-rendering:pixelated;margin:14px auto}
#next{margin:8px 0;white-space:pre-line}#progress{color:#6b7280;font-size:13px}
#app{flex:1;display:flex;min-height:0}
#side{width:300px;flex:none;background:#fff;border-right:1px solid #dfe3e8;display:flex;flex-direction:column;min-height:0}
#filter{margin:10px;padding:7px 10px;border:1px solid #d1d5db;border-radius:6px}
#contacts{overflow:auto;flex:1;padding-bottom:10px}
details>summary{list-style:none;cursor:pointer;padding:6px 12px;font-size:12px;color:#6b7280;
text-transform:uppercase;letter-spacing:.03em;display:flex;gap:6px;user-select:none}
details>summary::before{content:"\25B8"}details[open]>summary::before{content:"\25BE"}
.contact{display:flex;align-items:center;gap:8px;width:100%;border:0;background:none;text-align:left;
padding:7px 12px 7px 24px;cursor:pointer}
.contact:hover{background:#f3f4f6}.contact.open{background:#e0ecff}
.contact .name{flex:1;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.unread{background:#ef4444;color:#fff;border-radius:10px;font-size:12px;padding:0 7px;min-width:20px;text-align:center}
.unread:empty{display:none}
#chat{flex:1;display:flex;flex-direction:column;min-width:0;min-height:0}
#chathead{background:#fff;border-bottom:1px solid #dfe3e8;padding:9px 14px;display:flex;align-items:center;gap:10px}
#chathead h2{margin:0;font-size:16px;flex:1;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
#back{display:none;border:0;background:none;font-size:20px;cursor:pointer;padding:0 4px}
#kind{color:#6b7280;font-size:12px}
#log{flex:1;overflow:auto;padding:12px 16px;display:flex;flex-direction:column;gap:8px}
#empty{margin:auto;color:#6b7280}
.msg{max-width:78%;display:flex;flex-direction:column;align-items:flex-start}
.msg.out{align-self:flex-end;align-items:flex-end}
.msg .who{font-size:12px;color:#6b7280;margin:0 4px 2px}
.bubble{background:#fff;border-radius:10px;padding:7px 11px;white-space:pre-wrap;word-break:break-word;
box-shadow:0 1px 1px rgba(0,0,0,.06)}
.msg.out .bubble{background:#2563eb;color:#fff}
.face{background:#fde68a;color:#92400e;border-radius:4px;padding:0 2px}
.msg.out .face{background:#93c5fd;color:#1e3a8a}
.meta{font-size:11px;color:#9ca3af;margin:2px 4px 0}
.status.failed{color:#dc2626}.status.sent{color:#16a34a}
#composer{background:#fff;border-top:1px solid #dfe3e8;padding:8px 10px;display:flex;gap:8px;align-items:flex-end;position:relative}
#text{flex:1;resize:none;border:1px solid #d1d5db;border-radius:6px;padding:7px 9px;max-height:140px}
#composer button{border:0;border-radius:6px;padding:7px 12px;cursor:pointer}
#send{background:#2563eb;color:#fff}#send:disabled{background:#9ca3af}
#faces{background:#f3f4f6;font-size:18px;line-height:1.2}
#picker{position:absolute;bottom:100%;left:8px;right:8px;max-height:220px;overflow:auto;background:#fff;
border:1px solid #d1d5db;border-radius:8px;padding:6px;display:flex;flex-wrap:wrap;gap:4px;box-shadow:0 4px 12px rgba(0,0,0,.12)}
#picker button{background:#f9fafb;border:1px solid #e5e7eb;border-radius:5px;padding:2px 6px;font-size:13px;cursor:pointer}
#picker button:hover{background:#fde68a}
#error{background:#fee2e2;color:#991b1b;padding:6px 14px;font-size:13px}
[hidden]{display:none!important}
@media (max-width:700px){
#side{width:100%;border-right:0}
body.chatting #side{display:none}body:not(.chatting) #chat{display:none}
#back{display:block}#me{display:none}.msg{max-width:90%}
}
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const FACES = __FACES__;
const FACE_TOKEN = /\[([^\[\]\s]{1,8})\]/g;
const FACE_NAMES = new Set(FACES);

// -- words: [English, Chinese] ----------------------------------------------------------------
const WORDS = {
  "filter": ["Filter contacts", "搜索联系人"],
  "friends": ["Friends", "好友"], "groups": ["Groups", "群"], "discusses": ["Discusses", "讨论组"],
  "sessions": ["Temporary sessions", "临时会话"], "strangers": ["Strangers", "陌生人"],
  "pick": ["Pick a contact to start chatting.", "选择一个联系人开始聊天。"],
  "empty": ["No messages yet.", "还没有消息。"],
  "placeholder": ["Message (Enter sends, Shift+Enter for a new line)", "消息（Enter 发送，Shift+Enter 换行）"],
  "send": ["Send", "发送"], "faces": ["Faces", "表情"], "back": ["Back", "返回"],
  "sending": ["sending\u2026", "发送中\u2026"], "sent": ["sent", "已发送"], "failed": ["failed", "发送失败"],
  "code": ["code", "代码"],
  "live": ["live", "已连接"], "reconnecting": ["reconnecting\u2026", "重新连接中\u2026"],
  "offline": ["webqq is not answering", "webqq 没有响应"],
  "token": ["access token needed: open /console/?access_token=\u2026", "需要 access token：请打开 /console/?access_token=\u2026"],
  "loaded": ["loaded", "已加载"], "members": ["members of groups", "群成员"],
  "kind.friend": ["friend", "好友"], "kind.group": ["group", "群"], "kind.discuss": ["discuss", "讨论组"],
  "kind.sess": ["temporary session", "临时会话"],
  "state.init": ["Starting", "正在启动"], "state.loading": ["Connecting", "正在连接"],
  "state.scaning": ["Scan the QR code", "请扫描二维码"], "state.confirming": ["Confirm on your phone", "请在手机上确认"],
  "state.updating": ["Loading your contacts", "正在加载联系人"], "state.running": ["Logged in", "已登录"],
  "state.stop": ["Stopped", "已停止"],
  "smartqq.init": ["webqq is starting.", "webqq 正在启动。"],
  "smartqq.loading": ["Connecting to QQ to get a QR code\u2026", "正在连接QQ获取二维码\u2026"],
  "smartqq.scaning": ["Open the QQ app on your phone, tap + and then Scan, and point it at this code.\nA new code replaces this one when it expires.",
                      "在手机上打开QQ，点 + 再点“扫一扫”，扫描这个二维码。\n二维码过期后会自动换新。"],
  "smartqq.confirming": ["Scanned. Now tap Log in (Allow) on your phone.", "已扫描，请在手机上点“登录”。"],
  "smartqq.updating": ["Logged in. Loading your friends, groups and discusses\u2026", "登录成功，正在加载好友、群和讨论组\u2026"],
  "smartqq.stop": ["webqq has stopped. Start it again to log in.", "webqq 已停止，请重新启动再登录。"],
  "onebot.init": ["webqq is starting.", "webqq 正在启动。"],
  "onebot.loading": ["Waiting for the OneBot implementation (NapCat, LLOneBot) to answer with a logged-in account.\nStart it, log the account in there, and check url and access_token in the [onebot] section.",
                     "正在等待 OneBot 实现（NapCat、LLOneBot）返回已登录的帐号。\n请启动它并在那里登录帐号，再检查 [onebot] 中的 url 和 access_token。"],
  "onebot.updating": ["Connected. Loading your friends and groups\u2026", "已连接，正在加载好友和群\u2026"],
  "onebot.stop": ["webqq has stopped. Start it again.", "webqq 已停止，请重新启动。"],
};
let lang = localStorage.getItem("webqq-lang") || (/^zh/i.test(navigator.language) ? "zh" : "en");
const t = (key, otherwise) => key in WORDS ? WORDS[key][lang === "zh" ? 1 : 0] : otherwise;

// -- the token: ?access_token= once, then kept for this tab ----------------------------------------
const params = new URLSearchParams(location.search);
const token = params.get("access_token") || sessionStorage.getItem("webqq-token") || "";
if (params.has("access_token")) {
  sessionStorage.setItem("webqq-token", token);
  history.replaceState(null, "", location.pathname);
}

function api(path, body) {
  const init = {headers: token ? {"Authorization": "Bearer " + token} : {}, cache: "no-store"};
  if (body) { init.method = "POST"; init.body = new URLSearchParams(body); }
  return fetch(path, init);
}

async function json(path, body) {
  const r = await api(path, body);
  const data = await r.json();
  if (!r.ok && r.status === 403 && data.code === -6) throw new Error(t("token"));
  return data;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// -- state ------------------------------------------------------------------------------------------
let status = null, version = "", cursor = null, source = null, retry = null;
const loaded = {friend: -1, group: -1, discuss: -1};
const conversations = new Map();        // key -> {key, kind, id, place, name, section, unread, messages, seen, fetched}
let current = null;

const SECTIONS = {group: "groups", discuss: "discusses"};

function conversationOf(m) {
  if (m.type === "group_message") return "group:" + m.group_id;
  if (m.type === "discuss_message") return "discuss:" + m.discuss_id;
  const other = m["class"] === "recv" ? m.sender_id : m.receiver_id;
  if (other === undefined || other === null) return null;
  if (m.type === "sess_message") {
    const via = m.via === "group" ? "group" : "discuss";
    return "sess:" + via + ":" + m[via + "_id"] + ":" + other;
  }
  return "friend:" + other;
}

function conversation(key, name, section) {
  let c = conversations.get(key);
  if (!c) {
    const parts = key.split(":");
    c = {key: key, kind: parts[0], id: parts[parts.length - 1], place: parts[0] === "sess" ? parts[1] + ":" + parts[2] : null,
         name: name || key, section: section, unread: 0, messages: [], seen: new Set(), fetched: false};
    conversations.set(key, c);
  } else {
    if (name) c.name = name;
    if (section) c.section = section;
  }
  return c;
}

function named(m, key) {
  // A conversation's name and list section from one of its messages, for those not in the contacts.
  const other = m["class"] === "recv" ? m.sender : m.receiver;
  if (key.startsWith("sess:")) return [other + " (" + (m.group || m.discuss || "") + ")", "sessions"];
  if (key.startsWith("friend:")) return [other, "strangers"];
  return [m.group || m.discuss, SECTIONS[key.split(":")[0]]];
}

// -- contacts -----------------------------------------------------------------------------------
async function loadContacts(kind) {
  const path = {friend: "/openqq/get_friend_info", group: "/openqq/get_group_basic_info",
                discuss: "/openqq/get_discuss_info"}[kind];
  const items = await json(path);
  if (!Array.isArray(items)) return;
  for (const c of conversations.values()) if (c.kind === kind && c.fromContacts) c.gone = true;
  for (const item of items) {
    const name = item.markname || item.name || String(item.id);
    const section = kind === "friend" ? "friend:" + (item.category || "") : SECTIONS[kind];
    const c = conversation(kind + ":" + item.id, name, section);
    c.fromContacts = true; c.gone = false; c.uid = item.uid;
  }
  for (const [key, c] of conversations) if (c.gone && !c.messages.length) conversations.delete(key);
  renderContacts();
}

async function loadConversations() {
  // The conversations kept on the server that are no contact's (temporary sessions, strangers) join the list.
  const answer = await json("/console/conversations");
  for (const row of answer.conversations || []) {
    if (!conversations.has(row.conversation)) conversation(row.conversation, ...named(row.last, row.conversation));
  }
  renderContacts();
}

function sectionTitle(section) {
  if (section.startsWith("friend:")) return section.slice(7) || t("friends");
  return t(section);
}

function renderContacts() {
  const box = $("contacts");
  const filter = $("filter").value.trim().toLowerCase();
  const sections = new Map();
  for (const c of conversations.values()) {
    if (!c.section) continue;
    if (filter && !(c.name.toLowerCase().includes(filter) || String(c.uid || "").includes(filter) || c.id.includes(filter))) continue;
    if (!sections.has(c.section)) sections.set(c.section, []);
    sections.get(c.section).push(c);
  }
  const order = (s) => s.startsWith("friend:") ? 0 : {strangers: 1, groups: 2, discusses: 3, sessions: 4}[s];
  const wasOpen = new Map([...box.querySelectorAll("details")].map((d) => [d.dataset.section, d.open]));
  box.replaceChildren();
  for (const section of [...sections.keys()].sort((a, b) => order(a) - order(b))) {
    const list = sections.get(section);
    const details = el("details");
    details.dataset.section = section;
    details.open = filter ? true : (wasOpen.has(section) ? wasOpen.get(section) : true);
    const unread = list.reduce((n, c) => n + c.unread, 0);
    const summary = el("summary");
    summary.append(el("span", "name", sectionTitle(section) + " (" + list.length + ")"), el("span", "unread", unread ? String(unread) : ""));
    details.append(summary);
    for (const c of list) {
      const b = el("button", "contact" + (c === current ? " open" : ""));
      b.dataset.conversation = c.key;
      b.append(el("span", "name", c.name), el("span", "unread", c.unread ? String(c.unread) : ""));
      b.addEventListener("click", () => openConversation(c));
      details.append(b);
    }
    box.append(details);
  }
}

// -- messages ---------------------------------------------------------------------------------------
function messageKey(m) { return m["class"] + ":" + m.type + ":" + m.id; }

function withFaces(bubble, text) {
  let at = 0;
  for (const match of text.matchAll(FACE_TOKEN)) {
    if (!FACE_NAMES.has(match[1])) continue;
    bubble.append(text.slice(at, match.index), el("span", "face", match[0]));
    at = match.index + match[0].length;
  }
  bubble.append(text.slice(at));
}

function showStatus(span, m) {
  span.className = "status";
  if (m.pending) { span.textContent = t("sending"); return; }
  if (m.error) { span.classList.add("failed"); span.textContent = t("failed") + " \u00b7 " + m.error; return; }
  if (m.code === undefined || m.code === null) { span.textContent = ""; return; }
  const ok = m.code === 0;
  span.classList.add(ok ? "sent" : "failed");
  span.textContent = (ok ? t("sent") : t("failed")) + " \u00b7 " + t("code") + " " + m.code + " \u00b7 " +
                     (m.msg || m.status || "") + (!ok && m.info ? " (" + m.info + ")" : "");
}

function bubbleOf(c, m) {
  const mine = m["class"] === "send";
  const box = el("div", "msg " + (mine ? "out" : "in"));
  box.dataset.key = m.pending ? "" : messageKey(m);
  if (!mine && c.kind !== "friend" && c.kind !== "sess") box.append(el("div", "who", m.sender));
  const bubble = el("div", "bubble");
  withFaces(bubble, m.content || "");
  const meta = el("div", "meta", new Date((m.time || Date.now() / 1000) * 1000).toLocaleTimeString() + (mine ? "  " : ""));
  if (mine) { const s = el("span"); showStatus(s, m); meta.append(s); }
  box.append(bubble, meta);
  m.node = box;
  return box;
}

function renderConversation() {
  const log = $("log");
  log.replaceChildren();
  if (!current) { log.append(el("div", "", t("pick"))); log.firstChild.id = "empty"; return; }
  if (!current.messages.length) { const e = el("div", "", t("empty")); e.id = "empty"; log.append(e); }
  for (const m of current.messages) log.append(bubbleOf(current, m));
  log.scrollTop = log.scrollHeight;
}

function addMessage(c, m) {
  // A message of conversation c, from the history, the stream or a send; false when it was there already.
  const key = messageKey(m);
  if (c.seen.has(key)) {
    const known = c.messages.find((x) => messageKey(x) === key);
    if (known && m.code !== undefined && known.code !== m.code) { Object.assign(known, {code: m.code, msg: m.msg, info: m.info}); if (known.node) showStatus(known.node.querySelector(".meta span"), known); }
    return false;
  }
  c.seen.add(key);
  c.messages.push(m);
  if (c === current) {
    const log = $("log"), near = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
    const empty = $("empty"); if (empty) empty.remove();
    log.append(bubbleOf(c, m));
    if (near || m["class"] === "send") log.scrollTop = log.scrollHeight;
  }
  return true;
}

async function openConversation(c) {
  current = c;
  c.unread = 0;
  document.body.classList.add("chatting");
  $("title").textContent = c.name;
  $("kind").textContent = t("kind." + c.kind, "");
  $("composer").hidden = false;
  renderContacts();
  renderConversation();
  $("text").focus();
  if (c.fetched) return;
  const answer = await json("/console/history?conversation=" + encodeURIComponent(c.key));
  const live = c.messages;                  // what the stream and the sends brought meanwhile goes after the history
  c.messages = []; c.seen = new Set();
  for (const m of (answer.messages || []).concat(live)) {
    if (m.id === undefined) { c.messages.push(m); continue; }         // a send not answered yet
    if (c.seen.has(messageKey(m))) continue;
    c.seen.add(messageKey(m));
    c.messages.push(m);
  }
  c.fetched = true;
  if (c === current) renderConversation();
}

function onMessage(m) {
  if (m.post_type === "event") {
    const kind = (m.event || "").replace(/^(new|lose)_/, "").replace(/_property_change$/, "");
    if (kind in loaded) loadContacts(kind).catch(() => {});
    return;
  }
  const key = conversationOf(m);
  if (!key) return;
  let c = conversations.get(key);
  if (!c) { const [name, section] = named(m, key); c = conversation(key, name, section); }
  if (addMessage(c, m) && c !== current && m["class"] === "recv") c.unread += 1;
  showUnread(c);
}

function showUnread(c) {
  // The badges of c and of its section, or the whole list when c is not in it yet.
  const item = $("contacts").querySelector('[data-conversation="' + CSS.escape(c.key) + '"]');
  if (!item) { renderContacts(); return; }
  item.querySelector(".unread").textContent = c.unread ? String(c.unread) : "";
  const section = item.parentNode;
  let sum = 0;
  for (const x of conversations.values()) if (x.section === section.dataset.section) sum += x.unread;
  section.querySelector("summary .unread").textContent = sum ? String(sum) : "";
}

// -- sending ----------------------------------------------------------------------------------------
const ROUTES = {friend: "send_friend_message", group: "send_group_message", discuss: "send_discuss_message",
                sess: "send_sess_message"};

async function send() {
  const c = current, box = $("text"), content = box.value;
  if (!c || !content.trim()) return;
  box.value = "";
  $("picker").hidden = true;
  const body = {id: c.id, content: content};
  if (c.kind === "sess") body[c.place.split(":")[0] + "_id"] = c.place.split(":")[1];
  const m = {"class": "send", type: c.kind + "_message", content: content, time: Date.now() / 1000, pending: true};
  c.messages.push(m);
  if (c === current) { const e = $("empty"); if (e) e.remove(); $("log").append(bubbleOf(c, m)); $("log").scrollTop = $("log").scrollHeight; }
  let answer;
  try {
    const r = await api("/openqq/" + ROUTES[c.kind], body);
    answer = await r.json();
    Object.assign(m, {code: answer.code, msg: answer.status, info: answer.info});
  } catch (e) {
    answer = {};
    m.error = String(e.message || e);
  }
  m.pending = false;
  if (answer.id !== undefined && answer.id !== null) {
    m.id = answer.id;
    const key = messageKey(m);
    if (c.seen.has(key)) {                     // the stream brought it first: keep that one
      c.messages.splice(c.messages.indexOf(m), 1);
      if (m.node) m.node.remove();
      addMessage(c, Object.assign({}, m, {node: undefined}));
      return;
    }
    c.seen.add(key);
    if (m.node) m.node.dataset.key = key;
  }
  if (m.node) showStatus(m.node.querySelector(".meta span"), m);
}

// -- the login, the header, the stream --------------------------------------------------------------
function renderStatus(s) {
  status = s;
  const running = s.state === "running";
  $("state").textContent = t("state." + s.state, s.state);
  $("state").className = "pill " + s.state;
  $("me").textContent = s.user ? s.user.name + (s.user.uid ? " (" + s.user.uid + ")" : "") : s.account;
  document.title = "webqq " + (s.user ? s.user.name : s.account) + " - " + s.state;
  $("login").hidden = running;
  $("app").hidden = !running;
  $("headline").textContent = t("state." + s.state, s.state);
  $("next").textContent = t((s.upstream === "onebot" ? "onebot." : "smartqq.") + s.state, s.state_text);
  const steps = Object.keys(s.progress || {}).map((k) => ({friend: t("friends"), group: t("groups"), discuss: t("discusses"),
    member: t("members")}[k] || k) + " " + s.progress[k][0] + "/" + s.progress[k][1]);
  $("progress").textContent = steps.length ? t("loaded") + ": " + steps.join(", ") : "";
  if (s.qrcode) {
    $("qr").src = "data:image/png;base64," + s.qrcode;
    $("qr").alt = "QR code #" + s.qrcode_number;
    $("qr").hidden = false;
  } else {
    $("qr").hidden = true;
    $("qr").removeAttribute("src");
  }
  if (!running) return;
  for (const kind of Object.keys(loaded)) {
    if (loaded[kind] !== s.contacts[kind]) { loaded[kind] = s.contacts[kind]; loadContacts(kind).catch(showError); }
  }
  if (!source) openStream();
}

function link(state) {
  $("link").textContent = t(state);
  $("link").className = "pill " + state;
  $("link").hidden = false;
}

function openStream() {
  clearTimeout(retry);
  const query = new URLSearchParams();
  if (token) query.set("access_token", token);
  if (cursor !== null) query.set("cursor", cursor);
  const first = cursor === null;
  source = new EventSource("/openqq/events" + (query.toString() ? "?" + query : ""));
  source.addEventListener("ready", (e) => {
    cursor = Number(e.lastEventId);
    link("live");
    if (first) loadConversations().catch(showError);
  });
  source.addEventListener("reset", (e) => {
    cursor = Number(e.lastEventId);
    for (const c of conversations.values()) c.fetched = false;
    for (const kind of Object.keys(loaded)) loadContacts(kind).catch(showError);
    loadConversations().catch(showError);
    if (current) openConversation(current).catch(showError);
  });
  source.onmessage = (e) => { cursor = Number(e.lastEventId); onMessage(JSON.parse(e.data)); };
  source.onerror = () => {
    link("reconnecting");
    if (source.readyState === EventSource.CLOSED) {       // refused (503 while logging in again): try again later
      source = null;
      retry = setTimeout(() => { if (status && status.state === "running") openStream(); }, 2000);
    }
  };
}

function showError(e) { $("error").textContent = e.message || String(e); $("error").hidden = false; }

async function poll() {
  for (;;) {
    try {
      const s = await json("/console/status?since=" + version);
      if (s.code !== 0) throw new Error(s.status);
      $("error").hidden = true;
      version = String(s.version);
      renderStatus(s);
    } catch (e) {
      showError(e.message === t("token") ? e : new Error(t("offline")));
      if (source) link("reconnecting");
      await new Promise((done) => setTimeout(done, 2000));
    }
  }
}

// -- the page's words and controls ------------------------------------------------------------------
function words() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  $("lang").textContent = lang === "zh" ? "EN" : "\u4e2d\u6587";
  $("filter").placeholder = t("filter");
  $("text").placeholder = t("placeholder");
  $("send").textContent = t("send");
  $("faces").title = t("faces");
  $("back").title = t("back");
  if (current) $("kind").textContent = t("kind." + current.kind, "");
  if (status) renderStatus(status);
  if (source) link(source.readyState === EventSource.OPEN ? "live" : "reconnecting");
  renderContacts();
  renderConversation();
}

$("lang").addEventListener("click", () => { lang = lang === "zh" ? "en" : "zh"; localStorage.setItem("webqq-lang", lang); words(); });
$("filter").addEventListener("input", renderContacts);
$("back").addEventListener("click", () => { current = null; document.body.classList.remove("chatting"); $("composer").hidden = true; renderContacts(); renderConversation(); });
$("text").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$("send").addEventListener("click", send);
$("faces").addEventListener("click", () => { $("picker").hidden = !$("picker").hidden; });
for (const name of FACES) {
  const b = el("button", "", name);
  b.type = "button";
  b.title = "[" + name + "]";
  b.addEventListener("click", () => {
    const box = $("text"), at = box.selectionStart, end = box.selectionEnd;
    box.value = box.value.slice(0, at) + "[" + name + "]" + box.value.slice(end);
    box.selectionStart = box.selectionEnd = at + name.length + 2;
    box.focus();
  });
  $("picker").append(b);
}
words();
poll();
"""

BODY = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>webqq</title><style>%s</style></head>
<body>
<header><h1>webqq</h1><span id="me"></span><span class="spacer"></span>
<span id="state" class="pill">&hellip;</span><span id="link" class="pill" hidden></span><button id="lang" type="button"></button></header>
<div id="error" hidden></div>
<section id="login"><div class="card"><h2 id="headline">&hellip;</h2>
<img id="qr" alt="QR code" hidden><p id="next"></p><p id="progress"></p></div></section>
<div id="app" hidden>
<nav id="side"><input id="filter" type="search" autocomplete="off"><div id="contacts"></div></nav>
<main id="chat"><div id="chathead"><button id="back" type="button">&#8592;</button><h2 id="title"></h2><span id="kind"></span></div>
<div id="log"></div>
<div id="composer" hidden><div id="picker" hidden></div>
<button id="faces" type="button">&#9786;</button><textarea id="text" rows="2"></textarea><button id="send" type="button"></button></div>
</main></div>
<script>%s</script>
</body></html>
"""

SCRIPT = SCRIPT.replace("__FACES__", json_dumps([FACES[face] for face in sorted(FACES)]))
PAGE = (BODY % (STYLE, SCRIPT)).encode("utf-8")


def _csp_hash(text):
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


# Only this page's own script and style run; no frames, no other origins.
PAGE_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; script-src %s; style-src %s; img-src data:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
     % (_csp_hash(SCRIPT), _csp_hash(STYLE))),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
]
