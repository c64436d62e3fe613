"""The client's own reading of what an agent sends, against a scripted
fake agent (no real agent needed): what follows an answer in the same read
is kept, notices pair with their descriptors in order however the bytes
are cut, and whatever breaks the protocol is an error, not a hang."""

import json
import os
import socket
import struct
import tempfile
import threading
import time
import unittest

import sinc


def rec(typ, payload=b""):
    return struct.pack(">I", typ << 24 | len(payload)) + payload


class FakeAgent:
    """A Unix socket that takes one connection, reads the request line and
    runs script(conn) on it."""

    def __init__(self, test, script):
        d = tempfile.mkdtemp()
        self.path = os.path.join(d, "fake.sock")
        self.ln = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ln.bind(self.path)
        self.ln.listen(1)
        self.request = None
        self.errors = []
        self.t = threading.Thread(target=self.run, args=(script,), daemon=True)
        self.t.start()
        test.addCleanup(self.close, d)

    def run(self, script):
        try:
            conn, _ = self.ln.accept()
            with conn:
                f = conn.makefile("rb")
                self.request = json.loads(f.readline())
                script(conn)
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(2)
                try:
                    while conn.recv(65536):
                        pass
                except OSError:
                    pass
        except Exception as e:
            self.errors.append(e)

    def close(self, d):
        self.ln.close()
        self.t.join(5)
        os.unlink(self.path)
        os.rmdir(d)


ROW = {"id": 1, "kind": "stream"}
OPEN_OK = json.dumps({"ok": True, "conn": ROW}).encode() + b"\n"
LISTEN_OK = b'{"ok":true,"addr":"n/p/s"}\n'


def notice(i):
    row = {"id": i, "kind": "stream", "remote_node": "n%d" % i}
    return json.dumps({"event": "accept", "conn": row}).encode() + b"\n"


class TestAnswers(unittest.TestCase):
    def test_request_line(self):
        fake = FakeAgent(self, lambda c: c.sendall(OPEN_OK))
        sinc.dial(fake.path, "n/p/s", "message").close()
        fake.t.join(5)
        self.assertEqual(fake.request, {"v": 2, "op": "open", "to": "n/p/s", "kind": "message"})

    def test_records_behind_the_answer(self):
        # The answer, two records and the fin in one write: none is lost.
        fake = FakeAgent(self, lambda c: c.sendall(OPEN_OK + rec(0, b"hello ") + rec(0, b"world") + rec(1)))
        ch = sinc.dial(fake.path, "n/p/s")
        self.assertEqual(ch.row, ROW)
        self.assertEqual(ch.recv_all(), b"hello world")
        self.assertIsNone(ch.wait_end())
        ch.close()

    def test_error_answer(self):
        err = {"ok": False, "error": {"code": "denied", "message": "no", "by": "n"}}
        fake = FakeAgent(self, lambda c: c.sendall(json.dumps(err).encode() + b"\n"))
        with self.assertRaises(sinc.Error) as cm:
            sinc.dial(fake.path, "n/p/s")
        self.assertEqual((cm.exception.code, cm.exception.message, cm.exception.by), ("denied", "no", "n"))
        self.assertEqual(str(cm.exception), "denied (by n): no")

    def test_bad_answers(self):
        for answer, code in ((b"not json\n", "protocol"), (b"[1]\n", "protocol"), (b"", "agent_gone"),
                             (b'{"ok":true}', "agent_gone"), (b'{"ok":true}\n', "protocol")):
            fake = FakeAgent(self, lambda c: c.sendall(answer))
            with self.assertRaises(sinc.Error) as cm:
                sinc.dial(fake.path, "n/p/s")
            self.assertEqual(cm.exception.code, code, "answer %r: %s" % (answer, cm.exception))

    def test_conns_needs_its_list(self):
        fake = FakeAgent(self, lambda c: c.sendall(b'{"ok":true}\n'))
        with self.assertRaises(sinc.Error) as cm:
            sinc.conns(fake.path)
        self.assertEqual(cm.exception.code, "protocol")


class TestRecords(unittest.TestCase):
    def channel(self, data, kind="stream"):
        ok = json.dumps({"ok": True, "conn": {"id": 1, "kind": kind}}).encode() + b"\n"
        fake = FakeAgent(self, lambda c: c.sendall(ok + data))
        ch = sinc.dial(fake.path, "n/p/s", kind)
        ch.settimeout(5)
        self.addCleanup(ch.close)
        return ch

    def assertCode(self, code, fn):
        with self.assertRaises(sinc.Error) as cm:
            fn()
        self.assertEqual(cm.exception.code, code, str(cm.exception))
        return cm.exception

    def test_close_record(self):
        ch = self.channel(rec(0, b"ab") + rec(2, b'{"code":"reset","message":"gone","by":"n"}'))
        self.assertEqual(ch.recv(), b"ab")
        e = self.assertCode("reset", ch.recv)
        self.assertEqual((e.message, e.by), ("gone", "n"))
        self.assertCode("reset", ch.recv)  # it stays

    def test_end_of_file_without_fin(self):
        ch = self.channel(rec(0, b"ab"))
        self.assertEqual(ch.recv(), b"ab")
        self.assertCode("agent_gone", ch.recv)

    def test_end_of_file_in_a_record(self):
        self.assertCode("agent_gone", self.channel(rec(0, b"abcdef")[:7]).recv)
        self.assertCode("agent_gone", self.channel(b"\x00\x00").recv)

    def test_agent_breaks_the_protocol(self):
        for data in (rec(5), rec(0, b"x" * 65537), rec(1, b"x"), rec(2, b"x" * 4097), rec(2, b"not json"),
                     rec(1) + rec(0, b"after the fin"), rec(1) + rec(1)):
            ch = self.channel(data)
            with self.assertRaises(sinc.Error) as cm:
                ch.recv_all()
                ch.wait_end()
            self.assertEqual(cm.exception.code, "protocol", "%r: %s" % (data[:12], cm.exception))

    def test_messages(self):
        ch = self.channel(rec(0, b"") + rec(0, b"one") + rec(0, b"x" * 65536) + rec(1), "message")
        self.assertEqual(ch.recv_message(), b"")
        self.assertEqual(ch.recv_message(), b"one")
        self.assertEqual(len(ch.recv_message()), 65536)
        self.assertIsNone(ch.recv_message())
        self.assertIsNone(ch.recv_message())

    def test_timeout_inside_a_record(self):
        # The agent stalls in the middle of a record: the read times out,
        # and the next read takes the record whole.
        def script(c):
            c.sendall(OPEN_OK + rec(0, b"0123456789")[:8])
            time.sleep(0.5)
            c.sendall(b"456789" + rec(1))

        fake = FakeAgent(self, script)
        ch = sinc.dial(fake.path, "n/p/s")
        self.addCleanup(ch.close)
        ch.settimeout(0.1)
        with self.assertRaises(TimeoutError):
            ch.recv()
        ch.settimeout(5)
        self.assertEqual(ch.recv_all(), b"0123456789")

    def test_close_wakes_a_blocked_reader(self):
        fake = FakeAgent(self, lambda c: (c.sendall(OPEN_OK), time.sleep(1)))
        ch = sinc.dial(fake.path, "n/p/s")
        ch.settimeout(5)
        got = []

        def read():
            try:
                got.append(ch.recv())
            except Exception as e:
                got.append(e)

        t = threading.Thread(target=read, daemon=True)
        t.start()
        time.sleep(0.1)
        ch.close()
        t.join(2)
        self.assertFalse(t.is_alive(), "a reader blocked in recv stayed blocked after close")
        self.assertIsInstance(got[0], ValueError)

    def test_write_after_close(self):
        ch = self.channel(rec(1))
        ch.close()
        with self.assertRaises(ValueError):
            ch.send(b"x")


class TestNotices(unittest.TestCase):
    def listener(self, script):
        fake = FakeAgent(self, script)
        ln = sinc.listen(fake.path, "s")
        ln.settimeout(5)
        self.addCleanup(ln.close)
        return ln

    def pairs(self, n):
        """n socket pairs: the ends to send, and the ends to check them by."""
        ps = [socket.socketpair() for _ in range(n)]
        for a, b in ps:
            self.addCleanup(a.close)
            self.addCleanup(b.close)
        return [a for a, _ in ps], [b for _, b in ps]

    def check(self, ch, mine, i):
        mine.sendall(b"%d" % i)
        ch.sock.settimeout(5)
        self.assertEqual(ch.sock.recv(10), b"%d" % i, "notice %d came with another's socket" % i)

    def test_cut_anywhere(self):
        # Three notices, their bytes cut across reads at odd places, each
        # descriptor on the first byte of its line; the first rides with the
        # answer's last bytes.
        send, mine = self.pairs(3)
        lines = [notice(i) for i in range(3)]

        def script(c):
            c.sendall(LISTEN_OK[:-3])
            time.sleep(0.05)
            socket.send_fds(c, [LISTEN_OK[-3:] + lines[0][:5]], [send[0].fileno()])
            time.sleep(0.05)
            c.sendall(lines[0][5:])
            socket.send_fds(c, [lines[1]], [send[1].fileno()])
            socket.send_fds(c, [lines[2][:1]], [send[2].fileno()])
            time.sleep(0.05)
            c.sendall(lines[2][1:])

        ln = self.listener(script)
        for i in range(3):
            ch = ln.accept()
            self.addCleanup(ch.close)
            self.assertEqual(ch.row["id"], i)
            self.check(ch, mine[i], i)
        self.assertCode("agent_gone", ln.accept)

    def test_notice_without_socket(self):
        ln = self.listener(lambda c: c.sendall(LISTEN_OK + notice(1)))
        self.assertCode("protocol", ln.accept)

    def test_notice_too_long(self):
        send, _ = self.pairs(1)
        big = b'{"event":"accept","conn":{"id":1,"x":"' + b"y" * 9000 + b'"}}\n'
        ln = self.listener(lambda c: socket.send_fds(c, [LISTEN_OK + big], [send[0].fileno()]))
        self.assertCode("protocol", ln.accept)

    def test_not_a_notice(self):
        send, _ = self.pairs(1)
        ln = self.listener(lambda c: socket.send_fds(c, [LISTEN_OK + b'{"event":"other"}\n'], [send[0].fileno()]))
        self.assertCode("protocol", ln.accept)

    def test_not_a_socket(self):
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        ln = self.listener(lambda c: socket.send_fds(c, [LISTEN_OK + notice(1)], [r]))
        self.assertCode("protocol", ln.accept)

    def assertCode(self, code, fn):
        with self.assertRaises(sinc.Error) as cm:
            fn()
        self.assertEqual(cm.exception.code, code, str(cm.exception))


if __name__ == "__main__":
    unittest.main()
