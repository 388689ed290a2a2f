"""The examples of README.md and docs/*.md, run as written: every program a page starts is started as a
process of its own (its ports rewritten to free ones, its files in the test's folder), every curl example is
sent over HTTP and its answer compared with the one the page shows (code, status, and the names, numbers and
states it shows), and every command of the pages is either run here or listed with the reason it isn't."""
import collections
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
import requests

from conftest import ROOT, Receiver, free_port, wait_until

PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))

# Commands of the pages this file does not run, and why.
SKIPPED = [
    (r"^python webqq\.py$", "logs in to a real QQ service (SmartQQ is closed; OneBot needs NapCat or LLOneBot)"),
    (r"^python3? -m (venv|pip|pytest)\b", "installs webqq, or runs this very test suite"),
    (r"^python scripts/bench\.py(?! --help$)", "the benchmark takes minutes (tests/test_bench.py runs it small)"),
    (r"^python scripts/soak\.py\b", "the soak takes ten minutes"),
    (r"^(sudo|journalctl|ssh) ", "administers a real server"),
    (r"^python webqq\.py -c <file>$", "a placeholder: the controller starts its clients so"),
    (r"^curl -N ", "an event stream, endless (tests/test_events.py reads one byte for byte)"),
]
# Commands run by the tests below, by a pattern of their text.
RUN = {
    "demo": r"^python webqq\.py --demo$|^curl (?!-N ).*127\.0\.0\.1:5000",
    "controller": r"^python webqq\.py controller --post-api |^curl .*127\.0\.0\.1:4000|^python scripts/smartqq_sim\.py "
                  r"--port 8090 --auto-scan 3$|^python webqq\.py --smartqq-base ",
    "simulator": r"^python scripts/smartqq_sim\.py|^curl .*localhost:8090",
    "onebot": r"^python scripts/onebot_sim\.py|^python webqq\.py -c docs/onebot-example\.ini$|^curl .*127\.0\.0\.1:3000",
    "cli": r"^python webqq\.py (--help|--init-config|--init-config - \| less|--check-config|controller --help)$|"
           r"^python scripts/bench\.py --help$",
}
# Keys of a shown answer that are compared (ids, pids, ports and times differ from run to run).
COMPARED = frozenset(("code", "status", "ok", "account", "client", "state", "class", "post_type", "content", "group",
                      "group_uid", "type", "name", "uid", "event", "sender", "category", "markname", "smartqq_base"))


# -- what the pages show ---------------------------------------------------------------------------------------

class Example(collections.namedtuple("Example", "page command output comment")):
    """A command of a page (continuation lines joined, the comment apart), and the answer shown after it."""

    def __str__(self):
        return "%s: %s" % (os.path.basename(self.page), self.command)


COMMAND = re.compile(r"^(\$ )?(python3? |curl |sudo |journalctl |ssh )")


def split_comment(line):
    """(command, comment) of a shell line: a '#' after a space and outside quotes starts the comment."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip(), line[i + 1:].strip()
    return line.strip(), ""


def code_lines(text):
    """(offset, line) of every line in a fenced or indented code block, and the (start, end) of each block."""
    lines, blocks, offset, fenced, previous_blank, in_indented, start = [], [], 0, False, True, False, 0
    for raw in text.splitlines(True):
        line = raw.rstrip("\n")
        if line.startswith("```"):
            if fenced:
                blocks.append((start, offset + len(raw)))
            fenced, start = not fenced, offset
        elif fenced:
            lines.append((offset, line))
        elif line.startswith("    ") and (previous_blank or in_indented):
            if not in_indented:
                start = offset
            in_indented = True
            lines.append((offset, line[4:]))
        elif line.strip():
            if in_indented:
                blocks.append((start, offset))
            in_indented = False
        previous_blank = not line.strip()
        offset += len(raw)
    return lines, blocks


def read_examples(page):
    """Every command of a Markdown page, in order: in code blocks, a line starting with python or curl (a
    trailing backslash continues it) or with "$ " (the lines after it, up to a blank line or the next
    command, are the answer shown); in the text, `python ...` and `curl ...` spans."""
    with open(page, encoding="utf-8") as f:
        text = f.read()
    lines, blocks = code_lines(text)
    found = []
    index = 0
    while index < len(lines):
        offset, line = lines[index]
        index += 1
        if not COMMAND.match(line.strip()):
            continue
        command = line.strip()
        while command.endswith("\\") and index < len(lines):
            command = command[:-1].rstrip() + " " + lines[index][1].strip()
            index += 1
        output = []
        while command.startswith("$ ") and index < len(lines) and lines[index][1].strip() \
                and not COMMAND.match(lines[index][1].strip()):
            output.append(lines[index][1].strip())
            index += 1
        command, comment = split_comment(command[2:] if command.startswith("$ ") else command)
        found.append((offset, Example(page, command.rstrip("& ").strip(), " ".join(output), comment)))
    for match in re.finditer(r"`((?:python3?|curl) [^`]+)`", text):
        if not any(start <= match.start() < end for start, end in blocks):
            command = " ".join(match.group(1).split())
            found.append((match.start(), Example(page, command, "", "")))
    return [example for _, example in sorted(found, key=lambda item: item[0])]


def examples(scenario, pages=PAGES):
    """The examples of the pages that the test of scenario runs, in page order."""
    return [example for page in pages for example in read_examples(page)
            if re.search(RUN[scenario], example.command)]


def page(name):
    return os.path.join(ROOT, "docs", name) if name != "README.md" else os.path.join(ROOT, name)


def test_every_command_of_the_pages_is_run_or_skipped():
    seen = [example for page_path in PAGES for example in read_examples(page_path)]
    assert len(seen) > 60
    unaccounted = [str(example) for example in seen
                   if not any(re.search(pattern, example.command) for pattern in RUN.values())
                   and not any(re.search(pattern, example.command) for pattern, _ in SKIPPED)]
    assert unaccounted == []


# -- running them ------------------------------------------------------------------------------------------

def rewrite(text, ports):
    """text with each host:port of the pages' examples replaced by the test's own port."""
    return re.sub(r"\b(127\.0\.0\.1|localhost):(\d+)",
                  lambda m: "%s:%d" % (m.group(1), ports.get(int(m.group(2)), int(m.group(2)))), text)


def argv_of(example, ports):
    """The arguments of a documented python command: the script in the checkout, ports rewritten (host:port
    and --port N)."""
    args = shlex.split(rewrite(example.command, ports).split(" | ")[0])
    assert args[0] in ("python", "python3") and args[1].endswith(".py"), example
    for i in range(2, len(args)):
        if args[i - 1] == "--port":
            args[i] = str(ports.get(int(args[i]), args[i]))
    return [os.path.join(ROOT, args[1])] + args[2:]


def start(launch, example, ports, cwd, env=None, extra=()):
    """A documented python command started as a process of its own, in cwd."""
    return launch(*(argv_of(example, ports) + list(extra)), command=[sys.executable], cwd=cwd, env=env)


def curl(example, ports, cwd):
    """A documented curl command sent with requests (the options the pages use: -s -d -H -X -o, > FILE)."""
    args = shlex.split(rewrite(example.command, ports))
    assert args[0] == "curl", example
    method, headers, data, out, url = None, {}, None, None, None
    items = iter(args[1:])
    for arg in items:
        if arg == "-d":
            data = next(items).encode("utf-8")
        elif arg == "-H":
            name, _, value = next(items).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-X":
            method = next(items)
        elif arg in ("-o", ">"):
            out = os.path.join(str(cwd), next(items))
        elif arg != "-s":
            assert not arg.startswith("-"), "a curl option the test doesn't know: %s" % example
            url = arg if "://" in arg else "http://" + arg
    if data is not None:
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    answer = requests.request(method or ("POST" if data is not None else "GET"), url, data=data, headers=headers,
                              timeout=45)
    if out:
        with open(out, "wb") as f:
            f.write(answer.content)
    return answer


TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?|true|false|null|[\[\]{}:,]|\.\.\.|…')


def shown_objects(text):
    """The objects of an answer shown on a page, abbreviated or not: ("object", [its scalar keys]) or
    ("list", [the scalar keys of each element]); empty lists and objects count as scalars."""
    level = 1 if text.startswith("{") else 2
    tokens, objects, depth, key = TOKEN.findall(text), [], 0, None
    for i, token in enumerate(tokens):
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if token in "[{":
            depth += 1
            if token == "{" and depth == level:
                objects.append({})
            elif depth == level + 1 and key is not None and following in ("]", "}"):
                objects[-1][key] = [] if token == "[" else {}
            key = None
        elif token in "]}":
            depth -= 1
            key = None
        elif token in (",", "...", "…"):
            key = None
        elif token != ":" and depth == level:
            if key is None and following == ":":
                key = json.loads(token)
            elif key is not None:
                objects[-1][key] = json.loads(token)
                key = None
    return ("object" if level == 1 else "list"), objects


def same(shown, actual):
    """A shown value and an actual one agree (in text, any number stands for any number: pids, ports)."""
    if isinstance(shown, str) and isinstance(actual, str):
        return re.sub(r"\d+", "#", shown) == re.sub(r"\d+", "#", actual)
    return shown == actual


def mismatch(example, answer):
    """Why answer is not the one the page shows (None when it is)."""
    if not example.output:
        wanted = "image/png" if "image/png" in example.comment else None
        if answer.status_code != 200 or (wanted and wanted not in answer.headers.get("Content-Type", "")):
            return "HTTP %d %s" % (answer.status_code, answer.headers.get("Content-Type"))
        return None
    try:
        data = answer.json()
    except ValueError:
        return "not JSON: HTTP %d %r" % (answer.status_code, answer.content[:200])
    kind, objects = shown_objects(example.output)
    if kind == "object":
        shown = {key: value for key, value in objects[0].items() if key in COMPARED}
        if not isinstance(data, dict) or not all(same(v, data.get(k, "<missing>")) for k, v in shown.items()):
            return "answer %s, the page shows %s" % (json.dumps(data, ensure_ascii=False)[:600], shown)
        return None
    if not isinstance(data, list) or (objects and not data):
        return "answer %s, the page shows a list of %d" % (json.dumps(data, ensure_ascii=False)[:300], len(objects))
    for obj in objects:
        shown = {key: value for key, value in obj.items() if key in COMPARED}
        if not any(isinstance(item, dict) and all(same(v, item.get(k)) for k, v in shown.items()) for item in data):
            return "no element like %s in %s" % (shown, json.dumps(data, ensure_ascii=False)[:600])
    return None


def run_curl(example, ports, cwd, timeout=30.0):
    """Send a curl example until its answer is the one shown (a person types it once the program is ready);
    fails the test with the last answer when that does not come."""
    deadline, why = time.monotonic() + timeout, None
    while True:
        answer = curl(example, ports, cwd)
        why = mismatch(example, answer)
        if why is None:
            return answer
        assert time.monotonic() < deadline, "%s\n  %s" % (example, why)
        time.sleep(0.5)


def check_urls(pages_, port):
    """Every http://127.0.0.1:5000/... URL the text of the pages names (not their examples, nor a URL with a
    placeholder) answers 200."""
    checked = []
    for path in pages_:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        blocks = code_lines(text)[1]
        for match in re.finditer(r"http://127\.0\.0\.1:5000/[^\s)`'\"<>*,]*", text):
            url = match.group(0).rstrip(".:;")               # the end of the sentence
            if "..." in url or "…" in url or any(start <= match.start() < end for start, end in blocks):
                continue
            answer = requests.get(url.replace(":5000/", ":%d/" % port), timeout=15)
            assert answer.status_code == 200, "%s: HTTP %d" % (url, answer.status_code)
            checked.append(url)
    return checked


# -- the demo -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_demo_answers_every_example_as_shown(tmp_path, launch):
    """python webqq.py --demo, and every curl example aimed at it: the README's, openqq.md's (stop_client
    last: it ends the demo), newcomers.md's; every URL of the API and console the pages name."""
    api = free_port()
    runs = examples("demo", [p for p in PAGES if not p.endswith("onebot.md")])
    assert [example.command for example in runs[:1]] == ["python webqq.py --demo"]
    demo = start(launch, runs[0], {}, tmp_path, {"TMPDIR": str(tmp_path)}, ["--listen", "127.0.0.1:%d" % api])
    demo.wait_log(r"\(running\)", timeout=30)
    curls = [example for example in runs if example.command.startswith("curl")]
    assert len(curls) >= 15 and "stop_client" in curls[-1].command
    checked = check_urls([p for p in PAGES if not p.endswith("onebot.md")], api)
    assert "http://127.0.0.1:5000/console/" in checked
    for example in curls:
        run_curl(example, {5000: api}, tmp_path)
        if "/relogin" in example.command:                           # as a person would, see it done first
            demo.wait_log(r"已重新登录 \(logged in again\)")
    assert demo.wait(20) == 0                                   # stop_client stopped it
    log = demo.log()
    assert "二维码显示方式 (QR display): console, the web page http://127.0.0.1:%d/console/" % api in log
    assert "二维码显示方式 (QR display): terminal (drawn in this window)" in log


# -- the controller -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_controller_sessions_run_as_shown(tmp_path, launch):
    """The simulator and the controller as the README and controller.md start them, and each page's curl
    session in order (a client started, its QR code, sends, stopped), a reader of each page in a folder of
    their own; then webqq --smartqq-base on that simulator, as the README shows."""
    receiver = Receiver()
    ports = {8090: free_port(), 8000: receiver.port}
    runs = examples("controller")
    sessions = collections.OrderedDict()
    for example in runs:
        if example.command.startswith("curl"):
            sessions.setdefault(example.page, []).append(example)
    assert [os.path.basename(p) for p in sessions] == ["README.md", "controller.md"]
    try:
        sim = start(launch, next(e for e in runs if "smartqq_sim" in e.command), ports, tmp_path)
        sim.wait_log("SmartQQ simulator on http://127.0.0.1:%d" % ports[8090])
        controller_example = next(e for e in runs if "controller --post-api" in e.command)
        for path, session in sessions.items():
            folder, ports[4000] = tmp_path / os.path.basename(path), free_port()
            folder.mkdir()
            controller = start(launch, controller_example, ports, folder, extra=[
                "--listen", "127.0.0.1:%d" % ports[4000], "--tmpdir", str(folder)])
            controller.wait_log("controller listening")
            for example in session:
                answer = run_curl(example, ports, folder)
            assert "stop_client" in session[-1].command or "check_client" in session[-1].command
            assert (folder / "alice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert controller.stop() == 0 and answer.json()["code"] == 0
        sent = receiver.wait(lambda r: r.get("post_type") == "send_message", count=3)
        assert sent["receiver_uid"] == 271027252 and sent["content"] == "hi"
        assert all(hit.path == "/post?client=alice" for hit in receiver.hits)
        client_example = next(e for e in runs if "--smartqq-base" in e.command)
        client = start(launch, client_example, ports, tmp_path, {"TMPDIR": str(tmp_path)},
                       ["--listen", "127.0.0.1:%d" % free_port()])
        client.wait_log(r"\(running\)", timeout=30)
        assert client.stop() == 0
    finally:
        receiver.close()


# -- the simulators ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_simulator_commands_and_its_http_api(tmp_path, launch):
    """Each smartqq_sim command of the pages starts and serves; the /sim/ examples answer (the world they
    save is the file the --world example loads)."""
    runs = examples("simulator")
    commands = collections.OrderedDict((e.command, e) for e in runs if e.command.startswith("python")
                                       and not re.search(RUN["controller"], e.command))   # the controller's test runs it
    curls = [e for e in runs if e.command.startswith("curl")]
    assert len(commands) >= 6 and len(curls) >= 6
    ports = {8090: free_port()}
    first = start(launch, commands.pop("python scripts/smartqq_sim.py"), ports, tmp_path,
                  extra=["--port", str(ports[8090])])               # its default port is 8090
    first.wait_log("SmartQQ simulator on http://127.0.0.1:%d" % ports[8090])
    for example in curls:
        assert run_curl(example, ports, tmp_path, timeout=5).status_code == 200
    sent = requests.get("http://127.0.0.1:%d/sim/state" % ports[8090], timeout=5).json()
    assert sent["pending_events"] == 1 and sent["knobs"]["idle"] == "504"
    assert json.loads((tmp_path / "my_world.json").read_text(encoding="utf-8"))["user"]["qq"] == 123456
    first.stop()
    for example in commands.values():
        ports[8090] = free_port()
        program = start(launch, example, ports, tmp_path, extra=["--port", str(ports[8090])])
        program.wait_log("SmartQQ simulator on http://127.0.0.1:%d" % ports[8090], timeout=60)
        program.stop()


@pytest.mark.slow
def test_onebot_without_an_account_as_onebot_md_shows(tmp_path, launch):
    """onebot.md's way to try OneBot without an account: the simulator and webqq with docs/onebot-example.ini,
    a message said from the simulator's command line and one posted over its control API, both in
    check_event; the web console answers; no QR display line (OneBot shows no QR code)."""
    ports = {3000: free_port(), 8080: free_port(), 5000: free_port()}
    runs = read_examples(page("onebot.md"))
    sim_example = next(e for e in runs if e.command.startswith("python scripts/onebot_sim.py --profile"))
    client_example = next(e for e in runs if e.command == "python webqq.py -c docs/onebot-example.ini")
    said = [e for e in runs[runs.index(sim_example):] if "--say" in e.command or e.command.startswith("curl")]
    assert len(said) == 3 and all(re.search(RUN["onebot"] + "|" + RUN["demo"], e.command) for e in said)
    (tmp_path / "docs").mkdir()
    with open(page("onebot-example.ini"), encoding="utf-8") as f:
        (tmp_path / "docs" / "onebot-example.ini").write_text(rewrite(f.read(), ports), encoding="utf-8")
    sim = start(launch, sim_example, ports, tmp_path)
    assert wait_until(lambda: "onebot_sim (napcat) on" in sim.output())
    client = start(launch, client_example, ports, tmp_path, {"TMPDIR": str(tmp_path)})
    client.wait_log(r"\(running\)", timeout=30)
    for example in said:
        if example.command.startswith("python"):
            done = subprocess.run([sys.executable] + argv_of(example, ports), cwd=str(tmp_path), timeout=30,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert done.returncode == 0 and b'"message_type":"private"' in done.stdout, done.stderr
            continue
        if "check_event" in example.command:          # both messages are in, as a person sees on the console
            kept = "http://127.0.0.1:%d/console/conversations" % ports[5000]
            assert wait_until(lambda: sum(c["count"] for c in requests.get(kept, timeout=10).json()["conversations"])
                              == 2)
        run_curl(example, ports, tmp_path)
    assert set(check_urls([page("onebot.md")], ports[5000])) == {"http://127.0.0.1:5000/console/"}
    control = "http://127.0.0.1:%d/sim/" % ports[3000]
    wrong = requests.post(control + "post_group_message", json={"group_id": 30001}, timeout=5)   # who? what?
    assert wrong.status_code == 400 and wrong.json()["ok"] is False and "user_id" in wrong.json()["error"]
    assert requests.get(control + "nothing", timeout=5).status_code == 404
    assert [s["segments"] for s in requests.get(control + "sent", timeout=5).json()] == []
    log = client.log()
    assert "网页控制台 (web console): http://127.0.0.1:%d/console/" % ports[5000] in log
    assert "二维码显示方式" not in log
    assert client.stop() == 0


# -- the command line --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_short_commands_exit_0(tmp_path):
    """--help, --init-config (to the folder and to standard output), --check-config, the controller's and the
    benchmark's --help, as the pages write them."""
    runs = examples("cli")
    assert len({e.command for e in runs}) == 6
    for example in runs:
        done = subprocess.run([sys.executable] + argv_of(example, {}), cwd=str(tmp_path), timeout=60,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, TMPDIR=str(tmp_path)))
        assert done.returncode == 0, (str(example), done.stderr.decode("utf-8", "replace"))
        if example.command == "python webqq.py --init-config":
            assert (tmp_path / "webqq.ini").exists()
            (tmp_path / "webqq.ini").unlink()
        assert b"Traceback" not in done.stderr
