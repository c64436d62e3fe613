"""Channels that end badly (docs/protocol.md §3): an abort each way, a
socket closed without a fin, a process that dies, a broken-off record, and
each bad record a process can send; what each end reads."""

import json
import os
import subprocess
import sys

import sinc
from tests.agents import WAIT, AgentTest, parse_records, read_raw, record


class TestAbort(AgentTest):
    def test_dialer_aborts(self):
        d, a = self.pair()
        d.send(b"before")
        d.abort("giving up")
        # An abort ends the channel at once: what was sent before it may be
        # delivered first, or dropped.
        e = self.assertError("aborted", lambda: a.recv_exactly(6) == b"before" and a.recv(), by="node-a")
        self.assertEqual(e.message, "the remote process aborted the channel: giving up")
        self.assertError("aborted", a.recv, by="node-a")  # and stays so

    def test_acceptor_aborts(self):
        d, a = self.pair(sinc.MESSAGE)
        a.abort()
        e = self.assertError("aborted", d.recv_message, by="node-b")
        self.assertEqual(e.message, "the remote process aborted the channel")

    def test_the_aborting_process_is_told(self):
        d, a = self.pair()
        d.sock.sendall(record(2, b'{"message":"bye"}'))
        recs = parse_records(read_raw(d.sock))
        self.assertEqual(len(recs), 1, recs)
        self.assertEqual(recs[0][0], 2)
        self.assertEqual(json.loads(recs[0][1]), {"code": "aborted", "message": "this process aborted the channel"})
        self.assertError("aborted", a.recv, message="the remote process aborted the channel: bye")

    def test_message_is_printable_and_cut(self):
        d, a = self.pair()
        d.abort("bell\x07 tab\t nl\n" + "z" * 300)
        e = self.assertError("aborted", a.recv)
        prefix = "the remote process aborted the channel: "
        self.assertTrue(e.message.startswith(prefix), e.message)
        rest = e.message[len(prefix):]
        self.assertEqual(rest, ("bell tab nl" + "z" * 300)[:200])

    def test_after_a_fin(self):
        d, a = self.pair()
        d.close_write()
        d.sock.sendall(record(2))  # a close may follow the fin
        # The fin may or may not reach the other end before the abort.
        with self.assertRaises(sinc.Error) as cm:
            if a.recv() == b"":
                a.wait_end()
        self.assertEqual((cm.exception.code, cm.exception.by), ("aborted", "node-a"), str(cm.exception))

    def test_not_json(self):
        d, a = self.pair()
        d.sock.sendall(record(2, b"\xff not json"))
        e = self.assertError("aborted", a.recv)
        self.assertEqual(e.message, "the remote process aborted the channel")


class TestReset(AgentTest):
    def test_closed_without_fin(self):
        d, a = self.pair()
        d.send(b"partial")
        d.sock.close()  # no fin: a crash, for all the agent knows
        # What was sent may arrive before the reset, or be dropped with it.
        self.assertError("reset", lambda: a.recv_exactly(7) == b"partial" and a.recv(), by="node-a",
                         message="closed its socket without a fin")

    def test_process_killed(self):
        ln = self.listen()
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        child = (
            "import os, signal, sinc\n"
            "ch = sinc.dial(%r, %r)\n"
            "ch.send(b'half a story')\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n" % (self.sock_of("node-a/web"), ln.addr)
        )
        p = subprocess.run([sys.executable, "-c", child], cwd=here, timeout=WAIT * 2)
        self.assertEqual(p.returncode, -9)
        a = self.accept(ln)
        self.assertError("reset", lambda: a.recv_exactly(12) == b"half a story" and a.recv(), by="node-a",
                         message="it may have crashed")

    def test_broken_off_record(self):
        d, a = self.pair()
        d.sock.sendall(record(0, b"0123456789")[:9])
        d.sock.close()
        self.assertError("reset", a.recv, by="node-a", message="in the middle of a record")

    def sock_of(self, part):
        from tests.agents import sock

        return sock(part)


class TestProtocol(AgentTest):
    def broken(self, raw, told, other):
        d, a = self.pair()
        d.sock.sendall(raw)
        recs = parse_records(read_raw(d.sock))
        self.assertEqual([t for t, _ in recs], [2], recs)
        mine = json.loads(recs[0][1])
        self.assertEqual(mine["code"], "protocol")
        self.assertIn(told, mine["message"])
        # A fin sent before may or may not reach the other end first.
        e = self.assertError("protocol", lambda: a.recv_all() == b"" and a.wait_end(), by="node-a")
        self.assertIn(other, e.message)

    def test_unknown_type(self):
        self.broken(record(7), "unknown record type 7", "a bad record")

    def test_data_too_long(self):
        self.broken(record(0, b"x" * 65537), "data record of 65537 bytes, max 65536", "a bad record")

    def test_fin_with_payload(self):
        self.broken(record(1, b"x"), "fin record with 1 bytes", "a bad record")

    def test_close_too_long(self):
        self.broken(record(2, b"x" * 4097), "close record of 4097 bytes", "a bad record")

    def test_data_after_fin(self):
        self.broken(record(1) + record(0, b"late"), "this process sent after its fin", "it sent after its fin")

    def test_client_refuses_to_write_after_fin(self):
        d, _ = self.pair()
        d.close_write()
        with self.assertRaises(ValueError):
            d.send(b"late")
