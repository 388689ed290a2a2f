"""The e-mail QR display (plugins/qrmail.py) against a real SMTP server on 127.0.0.1, stdlib only."""
import base64
import email
import email.policy
import logging
import socket
import ssl
import threading
import time

import pytest

from conftest import LogLines, scan_and_confirm, wait_until


class SMTPServer(object):
    """A minimal SMTP server: EHLO, STARTTLS or TLS from the start, AUTH PLAIN/LOGIN, one mail per DATA."""

    def __init__(self, cert, tls="starttls"):
        self.tls = tls
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.port = self.sock.getsockname()[1]
        self.mails, self.logins, self.sessions = [], [], 0
        self.cond = threading.Condition()
        self.threads = []
        self.accepter = threading.Thread(target=self.accept, name="test-smtp", daemon=True)
        self.accepter.start()

    def accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self.session, args=(conn,), name="test-smtp-session", daemon=True)
            self.threads.append(t)
            t.start()

    def session(self, conn):
        with self.cond:
            self.sessions += 1
        secure = False
        if self.tls == "ssl":
            conn, secure = self.context.wrap_socket(conn, server_side=True), True
        f = conn.makefile("rb")

        def say(line):
            conn.sendall(line.encode("ascii") + b"\r\n")

        say("220 test ESMTP")
        mail = None
        try:
            while True:
                line = f.readline().decode("ascii").rstrip("\r\n")
                if not line:
                    return
                verb = line.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    say("250-test")
                    if self.tls == "starttls" and not secure:
                        say("250-STARTTLS")
                    say("250 AUTH PLAIN LOGIN")
                elif verb == "STARTTLS":
                    say("220 go ahead")
                    conn = self.context.wrap_socket(conn, server_side=True)
                    f, secure = conn.makefile("rb"), True
                elif verb == "AUTH":
                    parts = line.split()
                    if parts[1].upper() == "PLAIN":
                        _, user, password = base64.b64decode(parts[2]).decode().split("\0")
                    else:
                        say("334 VXNlcm5hbWU6")
                        user = base64.b64decode(f.readline().strip()).decode()
                        say("334 UGFzc3dvcmQ6")
                        password = base64.b64decode(f.readline().strip()).decode()
                    self.logins.append((user, password, secure))
                    say("235 ok")
                elif verb == "MAIL":
                    mail = {"from": line[10:].strip("<> "), "to": [], "secure": secure}
                    say("250 ok")
                elif verb == "RCPT":
                    mail["to"].append(line[8:].strip("<> "))
                    say("250 ok")
                elif verb == "DATA":
                    say("354 end with .")
                    data = []
                    while True:
                        chunk = f.readline()
                        if chunk in (b".\r\n", b""):
                            break
                        data.append(chunk[1:] if chunk.startswith(b"..") else chunk)
                    mail["message"] = email.message_from_bytes(b"".join(data), policy=email.policy.default)
                    with self.cond:
                        self.mails.append(mail)
                        self.cond.notify_all()
                    say("250 queued")
                elif verb == "QUIT":
                    say("221 bye")
                    return
                else:
                    say("250 ok")
        except (OSError, ValueError):
            return
        finally:
            conn.close()

    def wait_mails(self, count, timeout=10.0):
        with self.cond:
            self.cond.wait_for(lambda: len(self.mails) >= count, timeout)
            return list(self.mails)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)     # close() alone does not wake a blocked accept()
        except OSError:
            pass
        self.sock.close()
        for t in self.threads + [self.accepter]:
            t.join(5)


@pytest.fixture
def smtp(request, self_signed):
    server = SMTPServer(self_signed, getattr(request, "param", "starttls"))
    yield server
    server.close()


def qr_of(mail):
    """The PNG attached to a mail."""
    parts = [part for part in mail["message"].iter_attachments() if part.get_content_type() == "image/png"]
    assert len(parts) == 1
    return parts[0].get_content()


def test_each_new_qr_code_is_mailed_once_over_starttls(sim, make_client, smtp, self_signed):
    client = make_client(account="mailer", qrcode_display="email")
    plugin = client.load("qrmail", host="127.0.0.1", port=smtp.port, tls="starttls", cafile=self_signed,
                         user="me@example.com", password="授权码 code", to="a@example.com, b@example.com",
                         timeout=5)
    assert plugin is not None
    client.start()
    assert sim.wait_qr("waiting")
    first = client.recorder.wait("input_qrcode")[1]
    mails = smtp.wait_mails(1)
    assert qr_of(mails[0]) == first
    assert mails[0]["from"] == "me@example.com" and mails[0]["to"] == ["a@example.com", "b@example.com"]
    assert mails[0]["secure"] and smtp.logins == [("me@example.com", "授权码 code", True)]
    message = mails[0]["message"]
    assert message["Subject"] == "webqq: scan this QR code to log in (mailer)"
    assert message["To"] == "a@example.com, b@example.com"
    assert "QR code #1 for account mailer" in message.get_body(("plain",)).get_content()

    sim.expire()
    second = client.recorder.wait("input_qrcode", count=2)[1]
    mails = smtp.wait_mails(2)
    assert second != first and qr_of(mails[1]) == second
    scan_and_confirm(sim)
    assert client.wait_for_state("running", timeout=10)
    time.sleep(0.3)
    assert len(smtp.mails) == 2 and smtp.sessions == 2
    assert plugin.sent == 2


@pytest.mark.parametrize("smtp", ["ssl"], indirect=True)
def test_tls_from_the_start(sim, make_client, smtp, self_signed):
    client = make_client(qrcode_display="email")
    client.load("qrmail", host="127.0.0.1", port=smtp.port, tls="ssl", cafile=self_signed, to="a@example.com",
                user="bot", password="s3cret", **{"from": "webqq@example.com", "subject": "QR #{number} for {account}"})
    client.start()
    assert sim.wait_qr("waiting")
    mails = smtp.wait_mails(1)
    assert mails[0]["secure"] and smtp.logins == [("bot", "s3cret", True)]
    assert mails[0]["message"]["Subject"] == "QR #1 for default"
    assert mails[0]["from"] == "webqq@example.com"


def test_untrusted_certificate_is_refused_not_ignored(sim, make_client, smtp):
    client = make_client(qrcode_display="email")
    warnings = LogLines(logging.WARNING)
    try:
        plugin = client.load("qrmail", host="127.0.0.1", port=smtp.port, tls="starttls", to="a@example.com",
                             timeout=5)
        client.start()
        assert sim.wait_qr("waiting")
        wait_until(lambda: warnings.lines)
        assert "mailing QR code #1 failed, attempt 1 of 3" in warnings.lines[0]
        assert "CERTIFICATE_VERIFY_FAILED" in warnings.lines[0]
        assert smtp.mails == [] and plugin.sent == 0
        started = time.time()
        client.stop()                                         # stop() ends the retry wait at once
        assert time.time() - started < 3 and not plugin.thread.is_alive()
    finally:
        warnings.close()


@pytest.mark.parametrize("options, error", [
    ({"to": "a@example.com"}, "qrmail: option host is required"),
    ({"host": "smtp.example.com"}, "qrmail: option to is required"),
    ({"host": "smtp.example.com", "to": "a@b", "tls": "maybe"}, "qrmail: tls must be ssl, starttls or none"),
    ({"host": "smtp.example.com", "to": "a@b", "port": 99999}, "qrmail: port must be a port from 1 to 65535"),
    ({"host": "smtp.example.com", "to": "a@b", "passwd": "x"},
     "qrmail: unknown option 'passwd' (did you mean 'password'?)"),
])
def test_bad_options_are_refused_at_load(options, error, make_client):
    client = make_client()
    errors = LogLines(logging.ERROR)
    try:
        assert client.load("qrmail", **options) is None
    finally:
        errors.close()
    assert len(errors.lines) == 1 and errors.lines[0].startswith("插件[qrmail]加载失败 (plugin failed to load): " + error)
    assert client.plugins == []
