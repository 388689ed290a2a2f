# -*- coding: utf-8 -*-
"""console: a web page to watch and use the client, served by the Openqq server under /console/.

    client.load("openqq", listen=[{"host": "127.0.0.1", "port": 5000}])
    client.load("console")          # then open http://127.0.0.1:5000/console/

One page, no external assets: the state as it changes (scanning, confirming, running...), the QR
code while one is waiting for a scan, the account, the counts of friends, groups and discusses,
the last messages in and out, and a form that sends a message to a friend or a group through
the Openqq routes. The page and its JSON follow the Openqq server's rules: with an access_token,
open /console/?access_token=TOKEN (the page then keeps the token out of the address bar).

Routes: /console/ (the page), /console/status (JSON; ?since=VERSION waits up to `hold` seconds
for a change), /console/qrcode.png (the QR code waiting for a scan, else 404).
"""

import base64
import collections
import hashlib
import threading
import time
from urllib.parse import quote

from webqq import NOT_FOUND, ApiError, Response, json_dumps

# option: (default, one line of help)
OPTIONS = collections.OrderedDict([
    ("history", (50, "messages (received and sent) the page shows at most")),
    ("hold", (25.0, "seconds a page's status request waits for something to change")),
])

# What the page tells a person in each state.
STATE_TEXT = {
    "init": "starting", "loading": "connecting to QQ", "scaning": "scan the QR code with the QQ app",
    "confirming": "scanned: tap Allow on the phone", "updating": "logged in, loading the contacts",
    "running": "receiving messages", "stop": "stopped",
}


class Console(object):
    """The page and its JSON: state, QR code, account, counts, last messages; stop() releases waiting pages."""

    def __init__(self, client, server, options):
        self.client, self.server = client, server
        self.hold = float(options["hold"])
        self.messages = collections.deque(maxlen=max(1, int(options["history"])))
        self.progress = {}
        self.qrcodes = 0
        self.seq = 0
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
        with self.cond:
            if name in ("receive_message", "send_message"):
                self.seq += 1
                self.messages.append(self.summary(self.seq, args[0]))
            elif name == "progress":
                self.progress[args[0]] = [args[1], args[2]]
            elif name == "state_change" and args[1] == "updating":
                self.progress = {}
            self.version += 1
            self.cond.notify_all()

    def show_qrcode(self, path, png):
        """A QR code to scan: the page shows it (the client calls this when the console is a QR display)."""
        with self.cond:
            self.qrcodes += 1
            self.version += 1
            self.cond.notify_all()

    @staticmethod
    def summary(seq, msg):
        """A message as the page lists it."""
        place = msg.place
        who = msg.sender if msg.cls == "recv" else msg.addressee
        who = who.displayname if who is not None else "?"
        status = None
        if msg.cls == "send":
            status = msg.msg if msg.code in (0, None) else "%s: %s" % (msg.msg, msg.info)
        return {"seq": seq, "class": msg.cls, "type": msg.type, "time": msg.time or int(time.time()),
                "who": who, "where": place.displayname if place is not None else None,
                "content": msg.content, "status": status}

    def shows(self, png):
        """Whether the page shows the QR code png: one is waiting, and the console is a QR display."""
        return bool(png) and self.qrcodes > 0

    def status(self):
        """The page's view of the client, as JSON."""
        client, contacts = self.client, self.client.contacts
        state, png = client.state, client.qrcode
        user = contacts.user
        return {
            "code": 0, "state": state, "state_text": STATE_TEXT.get(state, state),
            "account": client.account,
            "user": {"name": user.displayname, "uid": user.uid} if user.id is not None else None,
            "counts": {"friends": len(contacts.friends()), "groups": len(contacts.groups()),
                       "discusses": len(contacts.discusses())},
            "qrcode": base64.b64encode(png).decode("ascii") if self.shows(png) and state in ("loading", "scaning")
            else None,
            "qrcode_number": self.qrcodes, "progress": dict(self.progress),
            "messages": list(self.messages),
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
        raise ApiError(403, NOT_FOUND, "api not found")

    def wait(self, req):
        """The status, once its version differs from ?since= (or after hold seconds)."""
        since = req.param("since")
        deadline = time.time() + self.hold
        with self.cond:
            while (since == str(self.version) and not self.stopped and time.time() < deadline
                   and req.alive()):
                self.cond.wait(min(1.0, max(0.0, deadline - time.time())))
            version = self.version
        result = self.status()
        result["version"] = version
        return Response(json_dumps(result).encode("utf-8"), 200, [("Cache-Control", "no-store")])

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

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI","Microsoft YaHei",sans-serif;margin:0;
background:#f4f5f7;color:#1d2129}
header{background:#1d2129;color:#fff;padding:12px 20px;display:flex;align-items:center;gap:14px}
header h1{font-size:18px;margin:0;font-weight:600}
#state{padding:3px 10px;border-radius:12px;background:#6b7280;font-size:13px}
#state.running{background:#16a34a}#state.scaning,#state.confirming{background:#d97706}
#state.stop{background:#dc2626}
main{display:grid;grid-template-columns:minmax(250px,320px) 1fr;gap:16px;padding:16px 20px;max-width:1100px}
.column{display:grid;gap:16px;align-content:start}
section{background:#fff;border-radius:8px;padding:14px 16px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
h2{font-size:14px;margin:0 0 10px;color:#4b5563;text-transform:uppercase;letter-spacing:.04em}
#qr{display:block;width:222px;height:222px;image-rendering:pixelated;margin:8px auto}
#hint{font-weight:600}
dl{display:grid;grid-template-columns:auto 1fr;gap:4px 12px;margin:0}dt{color:#6b7280}dd{margin:0}
#messages{list-style:none;margin:0;padding:0;max-height:420px;overflow:auto}
#messages li{padding:6px 0;border-bottom:1px solid #eef0f3}
#messages .meta{color:#6b7280;font-size:12px}#messages .send .meta{color:#2563eb}
#messages .content{white-space:pre-wrap;word-break:break-word}
form{display:grid;gap:8px}select,textarea,button{font:inherit;padding:6px 8px}
button{background:#2563eb;color:#fff;border:0;border-radius:6px;cursor:pointer}
button:disabled{background:#9ca3af}#result{font-size:13px;color:#4b5563;min-height:1em}
#error{color:#dc2626;padding:0 20px}
"""

SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let token = params.get("access_token") || sessionStorage.getItem("webqq-token") || "";
if (params.has("access_token")) {
  sessionStorage.setItem("webqq-token", token);
  history.replaceState(null, "", location.pathname);
}
let version = "", state = "", loadedFor = "";

function api(path, body) {
  const headers = {};
  if (token) headers["Authorization"] = "Bearer " + token;
  const init = {headers: headers, cache: "no-store"};
  if (body) { init.method = "POST"; init.body = new URLSearchParams(body); }
  return fetch(path, init);
}

function text(id, value) { $(id).textContent = value; }

function render(s) {
  state = s.state;
  text("state", s.state); $("state").className = s.state;
  text("hint", s.state_text);
  document.title = "webqq " + s.account + " - " + s.state;
  text("account", s.account);
  text("user", s.user ? s.user.name + (s.user.uid ? " (" + s.user.uid + ")" : "") : "-");
  text("friends", s.counts.friends); text("groups", s.counts.groups); text("discusses", s.counts.discusses);
  const labels = {friend: "friends", group: "groups", discuss: "discusses", member: "members of groups"};
  const steps = Object.keys(labels).filter((k) => s.progress[k])
    .map((k) => labels[k] + " " + s.progress[k][0] + "/" + s.progress[k][1]);
  text("progress", steps.join(", ") || "-");
  if (s.qrcode) {
    $("qr").src = "data:image/png;base64," + s.qrcode;
    $("qr").alt = "QR code #" + s.qrcode_number;
    $("qrbox").hidden = false;
  } else {
    $("qrbox").hidden = true;
    $("qr").removeAttribute("src");
  }
  const list = $("messages");
  list.replaceChildren();
  for (const m of s.messages.slice().reverse()) {
    const li = document.createElement("li");
    li.className = m["class"];
    li.dataset.seq = m.seq;
    const meta = document.createElement("div");
    meta.className = "meta";
    const when = new Date(m.time * 1000).toLocaleTimeString();
    const arrow = m["class"] === "send" ? "me \\u2192 " + m.who : m.who + (m.where ? " @ " + m.where : "");
    meta.textContent = when + "  " + arrow + (m.status ? "  [" + m.status + "]" : "");
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = m.content;
    li.append(meta, content);
    list.append(li);
  }
  $("send").disabled = s.state !== "running";
  const counts = JSON.stringify(s.counts);
  if (s.state === "running" && loadedFor !== counts) { loadedFor = counts; loadTargets(); }
}

async function loadTargets() {
  const kind = $("kind").value;
  const path = kind === "group" ? "/openqq/get_group_basic_info" : "/openqq/get_friend_info";
  try {
    const r = await api(path);
    const items = r.ok ? await r.json() : [];
    const select = $("target");
    select.replaceChildren();
    for (const item of items) {
      const option = document.createElement("option");
      option.value = item.id;
      option.textContent = (item.markname || item.name) + (item.uid ? " (" + item.uid + ")" : "");
      select.append(option);
    }
  } catch (e) { text("result", "could not load the contacts: " + e); }
}

async function send(event) {
  event.preventDefault();
  const kind = $("kind").value;
  const body = {id: $("target").value, content: $("content").value};
  $("send").disabled = true;
  text("result", "sending...");
  try {
    const r = await api("/openqq/send_" + kind + "_message", body);
    const answer = await r.json();
    text("result", answer.status + (answer.code !== 0 && answer.info ? " (" + answer.info + ")" : ""));
    if (answer.code === 0) $("content").value = "";
  } catch (e) {
    text("result", "not sent: " + e);
  }
  $("send").disabled = state !== "running";
}

async function poll() {
  for (;;) {
    try {
      const r = await api("/console/status?since=" + version);
      const s = await r.json();
      if (!r.ok) throw new Error(r.status === 403 ? "access token needed: open /console/?access_token=..." : s.status);
      text("error", "");
      version = String(s.version);
      render(s);
    } catch (e) {
      text("error", "webqq is not answering: " + e.message);
      await new Promise((done) => setTimeout(done, 2000));
    }
  }
}

$("kind").addEventListener("change", loadTargets);
$("form").addEventListener("submit", send);
poll();
"""

BODY = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>webqq</title><style>%s</style></head>
<body>
<header><h1>webqq</h1><span id="state">...</span><span id="hint"></span></header>
<div id="error"></div>
<main>
<div class="column">
<section id="qrbox" hidden><h2>QR code</h2><img id="qr" alt="QR code">
<p>Open the QQ app, tap <b>Scan</b>, and scan this code. A new one replaces it when it expires.</p></section>
<section><h2>Account</h2><dl>
<dt>account</dt><dd id="account">-</dd><dt>user</dt><dd id="user">-</dd>
<dt>friends</dt><dd id="friends">-</dd><dt>groups</dt><dd id="groups">-</dd>
<dt>discusses</dt><dd id="discusses">-</dd><dt>loaded</dt><dd id="progress">-</dd></dl></section>
<section><h2>Send a message</h2><form id="form">
<select id="kind"><option value="friend">to a friend</option><option value="group">to a group</option></select>
<select id="target" aria-label="recipient"></select>
<textarea id="content" rows="3" placeholder="message" required></textarea>
<button id="send" disabled>Send</button><div id="result"></div></form></section>
</div>
<section><h2>Last messages</h2><ul id="messages"></ul></section>
</main>
<script>%s</script>
</body></html>
"""

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
