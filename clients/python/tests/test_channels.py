"""Channels that end well (docs/protocol.md §3): streams and messages
byte-exact, half-close each way, shutdown(SHUT_WR) as a fin, the graceful
end (the peer's fin, then end of file), a close after a fin."""

import os
import socket
import threading

import sinc
from tests.agents import AgentTest, parse_records, read_raw, record, sock


def echo(ch, errors):
    """Echoes ch until the other side's fin, then ends its own side."""
    try:
        if ch.kind == sinc.MESSAGE:
            while True:
                m = ch.recv_message()
                if m is None:
                    break
                ch.send_message(m)
        else:
            while True:
                b = ch.recv()
                if not b:
                    break
                ch.send(b)
        ch.close_write()
    except Exception as e:  # reported by the test
        errors.append(e)


def serve(test, ch):
    errors = []
    t = threading.Thread(target=echo, args=(ch, errors), daemon=True)
    t.start()

    def done():
        t.join(10)
        test.assertFalse(t.is_alive(), "echo did not end")
        test.assertEqual(errors, [])
    return done


class TestStreams(AgentTest):
    def roundtrip(self, d, a, size):
        done = serve(self, a)
        data = os.urandom(size)
        got = []
        reader = threading.Thread(target=lambda: got.append(d.recv_all()), daemon=True)
        reader.start()  # both directions at once
        # Odd chunks: record boundaries mean nothing on a stream.
        off, step = 0, 1
        while off < len(data):
            d.send(data[off : off + step])
            off += step
            step = step * 3 + 1 if step < 200000 else 1
        d.close_write()
        reader.join(30)
        done()
        self.assertEqual(len(got[0]), len(data))
        self.assertTrue(got[0] == data, "the stream came back changed")

    def test_one_mib_across_nodes(self):
        d, a = self.pair()
        self.roundtrip(d, a, 1 << 20)

    def test_across_partitions_of_a_node(self):
        d, a = self.pair(listen_at="node-a/batch")
        self.assertEqual((a.row["remote_node"], a.row["remote_partition"]), ("node-a", "web"))
        self.roundtrip(d, a, 256 << 10)

    def test_descriptor_is_a_unix_stream_socket_closed_on_exec(self):
        d, a = self.pair()
        self.assertEqual((a.sock.family, a.sock.type), (socket.AF_UNIX, socket.SOCK_STREAM))
        self.assertFalse(os.get_inheritable(a.sock.fileno()), "MSG_CMSG_CLOEXEC: not inherited by exec")

    def test_notices_pair_with_their_sockets(self):
        # Several notices waiting at once, from two nodes: each socket
        # carries the channel its notice names. (node-d is not used: a test
        # stops it; node-c allows this process few channels.)
        ln = self.listen()
        labels = []
        for i, part in enumerate(("node-a/web", "node-c/edge", "node-a/web", "node-a/web")):
            label = b"%s #%d" % (part.split("/")[0].encode(), i)
            self.dial(ln.addr, part=part).send(label)
            labels.append(label)
        got = []
        for _ in labels:
            a = self.accept(ln)
            label = a.recv_exactly(9)
            self.assertTrue(label.startswith(a.row["remote_node"].encode()),
                            "the notice of a channel from %s came with the socket of %r" % (a.row["remote_node"], label))
            got.append(label)
        self.assertEqual(sorted(got), sorted(labels))

    def test_writing_on_the_listening_socket_ends_the_listen(self):
        ln = self.listen()
        ln.sock.sendall(b"x")
        self.assertError("agent_gone", ln.accept)  # the agent closed it
        self.assertError("no_such_service", sinc.dial, sock("node-a/web"), ln.addr, by="node-b")

    def test_closing_the_listener_keeps_its_channels(self):
        ln = self.listen()
        d = self.dial(ln.addr)
        a = self.accept(ln)
        ln.close()
        d.send(b"still here")
        d.close_write()
        self.assertEqual(a.recv_all(), b"still here")

    def test_early_data(self):
        # Bytes sent with the request become the channel's first records.
        ln = self.listen()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        s.connect(sock("node-a/web"))
        s.sendall(b'{"v":2,"op":"open","to":"%s"}\n' % ln.addr.encode() + record(0, b"early") + record(1))
        a = self.accept(ln)
        self.assertEqual(a.recv_all(), b"early")


class TestMessages(AgentTest):
    def test_boundaries_and_sizes(self):
        d, a = self.pair(sinc.MESSAGE)
        self.assertEqual((d.row["kind"], a.row["kind"]), ("message", "message"))
        done = serve(self, a)
        sizes = [0, 1, 65535, 65536, 0, 7] + [int.from_bytes(os.urandom(2), "big") for _ in range(60)]
        msgs = [os.urandom(n) for n in sizes]
        got = []
        reader = threading.Thread(target=lambda: got.extend(iter(d.recv_message, None)), daemon=True)
        reader.start()
        for m in msgs:
            d.send_message(m)
        d.close_write()
        reader.join(30)
        done()
        self.assertEqual([len(m) for m in got], sizes)
        self.assertTrue(got == msgs, "messages came back changed")

    def test_too_long(self):
        d, a = self.pair(sinc.MESSAGE)
        self.assertError("message_too_long", d.send_message, b"x" * 65537)
        d.send_message(b"still open")  # nothing was sent
        self.assertEqual(a.recv_message(), b"still open")

    def test_kind_is_kept(self):
        d, _ = self.pair(sinc.MESSAGE)
        with self.assertRaises(ValueError):
            d.send(b"stream bytes on a message channel")


class TestHalfClose(AgentTest):
    def test_dialer_ends_first(self):
        d, a = self.pair()
        d.send(b"request")
        d.close_write()
        self.assertEqual(a.recv_all(), b"request")  # then the fin
        a.send(b"response after the fin")  # the other direction goes on
        a.close_write()
        self.assertEqual(d.recv_all(), b"response after the fin")

    def test_acceptor_ends_first(self):
        d, a = self.pair()
        a.send(b"banner")
        a.close_write()
        self.assertEqual(d.recv_all(), b"banner")
        self.assertEqual(d.recv(), b"", "recv after the fin stays at the end")
        d.send(b"still talking")
        d.close_write()
        self.assertEqual(a.recv_all(), b"still talking")

    def test_shutdown_is_a_fin(self):
        d, a = self.pair()
        d.send(b"then shutdown")
        d.sock.shutdown(socket.SHUT_WR)
        self.assertEqual(a.recv_all(), b"then shutdown", "a fin, not a reset")
        a.send(b"the read side stays open")
        a.sock.shutdown(socket.SHUT_WR)
        self.assertEqual(d.recv_all(), b"the read side stays open")

    def test_graceful_end_is_fin_then_end_of_file(self):
        d, a = self.pair()
        d.send(b"x")
        d.close_write()
        self.assertEqual(a.recv_all(), b"x")
        a.close_write()
        # Raw: the dialer reads the data, the acceptor's fin, then the
        # agent closes the socket (a fin has gone each way).
        self.assertEqual(parse_records(read_raw(d.sock)), [(1, b"")])
        self.assertEqual(parse_records(read_raw(a.sock)), [])

    def test_close_after_fin_is_clean(self):
        d, a = self.pair()
        d.send(b"all of it")
        d.close()  # fin, then close: nothing is lost
        self.assertEqual(a.recv_all(), b"all of it")
        a.close_write()
        self.assertIsNone(a.wait_end(), "the channel ended cleanly")

    def test_data_after_the_other_closed_is_reset(self):
        d, a = self.pair()
        d.close()
        self.assertEqual(a.recv_all(), b"")
        a.send(b"nobody reads this")
        self.assertError("reset", a.wait_end, by="node-a", message="closed the channel before reading all of it")

    def test_wait_end(self):
        d, a = self.pair()
        with self.assertRaises(ValueError):
            d.wait_end()  # before the fin
        d.close_write()
        self.assertEqual(a.recv_all(), b"")
        a.close_write()
        self.assertEqual(d.recv_all(), b"")
        self.assertIsNone(d.wait_end())
        self.assertIsNone(a.wait_end())
