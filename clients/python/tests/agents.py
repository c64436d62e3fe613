"""What the tests that need real agents share.

go test ./cmd/sinc -run TestPythonClient starts the agents and names them
in $SINC_PY_CLUSTER (see cmd/sinc/python_test.go for the layout: which
partitions, policies, limits and stopped agents):

    {"sockets": {"node-a/web": path, ...}, "pids": {"node-c": pid, ...},
     "limits": {"pending_requests": 4, ...}}

Without it these tests skip.
"""

import itertools
import json
import os
import socket
import struct
import unittest

import sinc

CLUSTER = json.loads(os.environ["SINC_PY_CLUSTER"]) if os.environ.get("SINC_PY_CLUSTER") else None

WAIT = 5  # seconds any single wait of a test may take

_ids = itertools.count(1)


def sock(name):
    """The socket of partition name ("node-a/web")."""
    return CLUSTER["sockets"][name]


def service(prefix="svc"):
    """A service name no other test uses."""
    return "%s-%d" % (prefix, next(_ids))


def record(typ, payload=b""):
    return struct.pack(">I", typ << 24 | len(payload)) + payload


def read_raw(s, timeout=WAIT):
    """Everything the agent writes on s until it closes it (b"" then)."""
    s.settimeout(timeout)
    out = b""
    while True:
        try:
            b = s.recv(1 << 16)
        except ConnectionResetError:
            return out
        if not b:
            return out
        out += b


def parse_records(b):
    """The records in b: [(type, payload)]; a cut record is an error."""
    out = []
    while b:
        if len(b) < 4:
            raise AssertionError("a cut record header: %r" % b)
        v = struct.unpack(">I", b[:4])[0]
        typ, n = v >> 24, v & 0xFFFFFF
        if len(b) < 4 + n:
            raise AssertionError("a cut record: %r" % b[:100])
        out.append((typ, b[4 : 4 + n]))
        b = b[4 + n :]
    return out


class AgentTest(unittest.TestCase):
    def setUp(self):
        if CLUSTER is None:
            self.skipTest("no agents: run `go test ./cmd/sinc -run TestPythonClient`, which starts them")

    def listen(self, part="node-b/db", svc=None):
        ln = sinc.listen(sock(part), svc or service(), timeout=WAIT)
        ln.settimeout(WAIT)
        self.addCleanup(ln.close)
        return ln

    def dial(self, addr, kind=sinc.STREAM, part="node-a/web"):
        ch = sinc.dial(sock(part), addr, kind, timeout=WAIT)
        ch.settimeout(WAIT)
        self.addCleanup(ch.close)
        return ch

    def accept(self, ln):
        ch = ln.accept()
        ch.settimeout(WAIT)
        self.addCleanup(ch.close)
        return ch

    def pair(self, kind=sinc.STREAM, dial_from="node-a/web", listen_at="node-b/db"):
        """A channel: its dialing end and its accepting end."""
        ln = self.listen(listen_at)
        d = self.dial(ln.addr, kind, dial_from)
        return d, self.accept(ln)

    def assertError(self, code, fn, *args, by=None, message=None, **kw):
        """fn(*args) raises Error code (by by, with message in its message);
        returns it."""
        with self.assertRaises(sinc.Error) as cm:
            fn(*args, **kw)
        e = cm.exception
        self.assertEqual(e.code, code, str(e))
        if by is not None:
            self.assertEqual(e.by, by, str(e))
        if message is not None:
            self.assertIn(message, e.message)
        return e

    def request_raw(self, part, line, timeout=WAIT):
        """Sends line on a new connection to part and returns what the agent
        writes until it closes the socket."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        s.connect(sock(part))
        if line:
            s.sendall(line)
        return read_raw(s, timeout)
