"""Requests and their answers (docs/protocol.md §1, §2): every error code a
request can provoke here, and the rows of conns."""

import functools
import json
import os
import select
import socket
import time

import sinc
from tests.agents import WAIT, AgentTest, read_raw, service, sock


@functools.lru_cache(maxsize=None)
def unreachable():
    """The error of a dial to node-e, a peer that never runs (it takes up to
    timers.open: asked once)."""
    try:
        sinc.dial(sock("node-a/web"), "node-e/far/x", timeout=WAIT).close()
    except sinc.Error as e:
        return e
    raise AssertionError("a dial to node-e succeeded")


def seconds(d):
    """The seconds of a duration as the agent's config writes it ("1s", "250ms")."""
    return float(d[:-2]) / 1000 if d.endswith("ms") else float(d[:-1])


class TestBadRequests(AgentTest):
    def answer(self, part, line):
        raw = self.request_raw(part, line)
        self.assertTrue(raw.endswith(b"\n"), raw)
        self.assertEqual(raw.count(b"\n"), 1, "one answer line, then the socket closes: %r" % raw)
        return json.loads(raw)

    def assertBad(self, line, message):
        ans = self.answer("node-a/web", line)
        self.assertEqual(ans["ok"], False)
        self.assertEqual(ans["error"]["code"], "bad_request", ans)
        self.assertIn(message, ans["error"]["message"])
        self.assertNotIn("by", ans["error"], "bad_request names no agent")

    def test_version(self):
        self.assertBad(b'{"v":1,"op":"conns"}\n', "protocol version 1; this agent speaks 2 to 3")
        self.assertBad(b'{"v":4,"op":"conns"}\n', "protocol version 4; this agent speaks 2 to 3")
        self.assertBad(b'{"op":"conns"}\n', "protocol version 0; this agent speaks 2 to 3")
        self.assertEqual(self.answer("node-a/web", b'{"v":2,"op":"conns"}\n')["ok"], True)

    def test_malformed(self):
        self.assertBad(b'{"v":2,"op":"conns","extra":1}\n', 'unknown field "extra"')
        self.assertBad(b'{"v":2,"op":"conns"}{"v":2}\n', "more than one JSON value")
        self.assertBad(b'{"v":2,"op":"frobnicate"}\n', "unknown op")
        self.assertBad(b"not json\n", "malformed request")
        self.assertBad(b'{"v":2,"op":"open","to":"node-b/db"}\n', "is not node/partition/service")
        self.assertBad(b'{"v":2,"op":"open","to":"node-b/d b/x"}\n', "partition")
        self.assertBad(b'{"v":2,"op":"open","to":"node-b/db/x","kind":"datagram"}\n', "is not stream or message")
        self.assertBad(b'{"v":2,"op":"listen"}\n', "listen needs a service name")
        self.assertBad(b'{"v":2,"op":"listen","service":"a/b"}\n', "is not valid")

    def test_oversized(self):
        # The answer comes first; the socket is then reset, as the agent
        # closes it with our bytes unread.
        line = b'{"v":2,"op":"conns","x":"' + b"a" * 5000 + b'"}\n'
        self.assertBad(line, "request longer than 4096 bytes")
        # The client refuses to send one.
        self.assertError("bad_request", sinc.listen, sock("node-a/web"), "x" * 5000)

    def test_no_newline(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        s.connect(sock("node-a/web"))
        s.sendall(b'{"v":2,"op":"conns"}')
        s.shutdown(socket.SHUT_WR)
        s.settimeout(WAIT)
        ans = json.loads(s.recv(4096))
        self.assertEqual(ans["error"]["code"], "bad_request")
        self.assertIn("one JSON line ending in a newline", ans["error"]["message"])

    def test_request_timeout(self):
        # timers.request: silence, or half a line.
        from tests.agents import CLUSTER

        bound = CLUSTER["timers"]["request"]
        t = time.monotonic()
        conns = []
        for line in (b"", b'{"v":2,'):  # both at once: one wait
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(s.close)
            s.connect(sock("node-a/web"))
            s.sendall(line)
            conns.append(s)
        for s in conns:
            ans = json.loads(read_raw(s))
            took = time.monotonic() - t
            self.assertEqual(ans["error"], {"code": "timeout", "message": "request not received within " + bound})
            self.assertGreater(took, seconds(bound) - 0.1)
            self.assertLess(took, seconds(bound) + 2)


class TestOpenErrors(AgentTest):
    def test_no_such_node(self):
        self.assertError("no_such_node", sinc.dial, sock("node-a/web"), "node-z/db/echo",
                         by="node-a", message='node "node-z" is not a peer of node-a')

    def test_node_unreachable(self):
        # node-e is a peer of node-a that never runs.
        e = unreachable()
        self.assertEqual((e.code, e.by), ("node_unreachable", "node-a"), str(e))

    def test_no_such_partition(self):
        self.assertError("no_such_partition", sinc.dial, sock("node-a/web"), "node-b/nope/x",
                         by="node-b", message='node-b has no partition "nope"')

    def test_no_such_service(self):
        self.assertError("no_such_service", sinc.dial, sock("node-a/web"), "node-b/db/nobody",
                         by="node-b", message="no process listens on node-b/db/nobody")
        # Within a node too: the agent is both ends.
        self.assertError("no_such_service", sinc.dial, sock("node-a/web"), "node-a/batch/nobody", by="node-a")

    def test_denied_by_the_dialing_agent(self):
        ln = self.listen()
        self.assertError("denied", sinc.dial, sock("node-a/batch"), ln.addr, by="node-a",
                         message="policy of node-a does not allow node-a/batch")

    def test_denied_by_the_accepting_agent(self):
        ln = self.listen("node-b/spare")
        self.assertError("denied", sinc.dial, sock("node-a/web"), ln.addr, by="node-b",
                         message="policy of node-b does not allow node-a/web")

    def test_policy_is_checked_before_peers(self):
        # The document: a process that may not reach an address learns
        # nothing of the node (no_such_node, node_unreachable) first.
        for addr in ("node-z/db/x", "node-e/far/x"):
            try:
                sinc.dial(sock("node-a/batch"), addr, timeout=WAIT)
                self.fail("dial %s from node-a/batch succeeded" % addr)
            except sinc.Error as e:
                self.assertEqual(e.code, "denied", str(e))

    def test_errors_carry_no_address(self):
        e = unreachable()
        self.assertEqual(e.code, "node_unreachable", str(e))
        self.assertNotIn("127.0.0.1", e.message)

    def test_exists(self):
        ln = self.listen()
        svc = ln.addr.split("/")[2]
        self.assertError("exists", sinc.listen, sock("node-b/db"), svc, by="node-b",
                         message="service %s already has a listener" % ln.addr)

    def test_listeners_per_partition(self):
        limit = self.limit("listeners_per_partition")
        for _ in range(limit):
            self.listen("node-a/web")
        self.assertError("limit", sinc.listen, sock("node-a/web"), service(), by="node-a",
                         message="partition web has %d listeners, its limit" % limit)

    def test_busy(self):
        # More connections than the partition socket reads at once and
        # queues: the agent answers the ones past them busy at once.
        n = self.limit("pending_requests") + self.limit("queued_requests") + 4
        conns = []
        try:
            for _ in range(n):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conns.append(s)
                s.connect(sock("node-a/batch"))
            ready, _, _ = select.select(conns, [], [], WAIT)  # at the first answer
            busy = []
            for s in ready:
                s.settimeout(WAIT)
                busy.append(json.loads(s.recv(4096)))
        finally:
            for s in conns:
                s.close()
        self.assertTrue(busy, "no connection of %d was answered busy" % n)
        for ans in busy:
            self.assertEqual(ans["error"]["code"], "busy", ans)
            self.assertEqual(ans["error"]["by"], "node-a")
            self.assertIn("partition batch", ans["error"]["message"])
        # The agent takes requests again once those connections are gone.
        deadline = time.monotonic() + WAIT
        while True:
            try:
                sinc.conns(sock("node-a/batch"))
                break
            except sinc.Error as e:
                if e.code != "busy" or time.monotonic() > deadline:
                    raise

    def test_busy_listener(self):
        # A listener that takes no notices: once its socket is full, the
        # agent waits 1s for it, then refuses the dialer busy.
        ln = self.listen()
        chans = []
        try:
            for i in range(2000):
                try:
                    chans.append(sinc.dial(sock("node-a/web"), ln.addr, timeout=WAIT))
                except sinc.Error as e:
                    self.assertEqual(e.code, "busy", str(e))
                    self.assertEqual(e.by, "node-b")
                    self.assertIn("the listener of %s is not taking channels" % ln.addr, e.message)
                    self.assertNotIn(".sock", e.message)  # no path of another node
                    break
            else:
                self.fail("2000 notices taken by a listener that reads none")
        finally:
            for ch in chans:
                ch.close()
        self.assertGreater(len(chans), 0)

    def test_no_agent(self):
        e = self.assertError("no_agent", sinc.conns, "/nonexistent/sinc.sock")
        self.assertIn("/nonexistent/sinc.sock", e.message)

    def limit(self, name):
        from tests.agents import CLUSTER

        return CLUSTER["limits"][name]


# The fields of a row (docs/protocol.md §2): each side's, and nothing else.
COMMON = {"id", "partition", "process", "remote_node", "remote_partition", "remote_process", "kind",
          "dialed", "state", "created", "bytes_out", "bytes_in", "records_out", "records_in"}


class TestConns(AgentTest):
    def test_empty(self):
        raw = self.request_raw("node-b/spare", b'{"v":2,"op":"conns"}\n')
        self.assertEqual(raw, b'{"ok":true,"conns":[]}\n')
        self.assertEqual(sinc.conns(sock("node-b/spare")), [])

    def test_listeners_do_not_appear(self):
        self.listen("node-b/spare")
        self.assertEqual(sinc.conns(sock("node-b/spare")), [])

    def test_rows(self):
        d, a = self.pair()
        me = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
        svc = a.row["service"]
        # The open's answer and the notice carry the rows.
        self.assertEqual(set(d.row), COMMON | {"remote_service"})
        self.assertEqual(set(a.row), COMMON | {"service"})
        self.assertEqual((d.row["partition"], d.row["remote_node"], d.row["remote_partition"], d.row["remote_service"],
                          d.row["kind"], d.row["dialed"], d.row["state"], d.row["process"], d.row["remote_process"]),
                         ("web", "node-b", "db", svc, "stream", True, "open", me, me))
        self.assertEqual((a.row["partition"], a.row["remote_node"], a.row["remote_partition"], a.row["dialed"],
                          a.row["process"], a.row["remote_process"]), ("db", "node-a", "web", False, me, me))
        d.send(b"12345")
        self.assertEqual(a.recv_exactly(5), b"12345")
        # conns: this partition's rows, the same ids, counters moving.
        deadline = time.monotonic() + WAIT
        while True:
            rows = [r for r in sinc.conns(sock("node-a/web")) if r["id"] == d.row["id"]]
            self.assertEqual(len(rows), 1)
            if rows[0]["bytes_out"] == 5 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        self.assertEqual(set(rows[0]), COMMON | {"remote_service"})
        self.assertEqual((rows[0]["bytes_out"], rows[0]["records_out"]), (5, 1))
        brows = [r for r in sinc.conns(sock("node-b/db")) if r["id"] == a.row["id"]]
        self.assertEqual(len(brows), 1)
        self.assertEqual(set(brows[0]), COMMON | {"service"})
        for r in rows + brows:
            for k in r:
                self.assertNotIn("key", k)
                self.assertNotIn("epoch", k)
                self.assertNotIn("index", k)
        # Sorted by id; only this partition's rows.
        all_rows = sinc.conns(sock("node-a/web"))
        self.assertEqual([r["id"] for r in all_rows], sorted(r["id"] for r in all_rows))
        self.assertEqual({r["partition"] for r in all_rows}, {"web"})
        self.assertNotIn(d.row["id"], [r["id"] for r in sinc.conns(sock("node-a/batch"))])
