"""A listener: notices of accepted channels, each with its socket
(docs/protocol.md §4).

Each notice line comes with exactly one descriptor (SCM_RIGHTS), attached
to its first byte. A read may end inside a line or hold the end of one and
the start of the next, so lines and descriptors are kept apart — the bytes
in a buffer, the descriptors in a queue, both in order — and each complete
line takes the next descriptor of the queue.
"""

import json
import os
import socket

from .channel import Channel
from .errors import Error
from .wire import MAX_NOTICE


class Listener:
    """Listens on a service of a partition. addr is node/partition/service."""

    def __init__(self, sock, addr, reader):
        self.sock = sock
        self.addr = addr
        self._r = reader
        self._closed = False

    def accept(self):
        """The next accepted channel, its row the notice's."""
        if self._closed:
            raise ValueError("accept on a closed listener")
        try:
            line = self._r.line(MAX_NOTICE)
        except (Error, OSError):
            if self._closed:
                raise ValueError("accept on a closed listener") from None
            raise
        if line is None and self._closed:
            raise ValueError("accept on a closed listener")
        if line is None:
            raise Error("agent_gone", "the agent closed the listening socket of %s" % self.addr)
        fd = self._r.take_fd()
        if fd is None:
            raise Error("protocol", "the agent sent a notice without its socket")
        try:
            notice = json.loads(line)
            if not isinstance(notice, dict) or notice.get("event") != "accept" or not isinstance(notice.get("conn"), dict):
                raise ValueError("not an accept notice")
        except ValueError as e:
            os.close(fd)
            raise Error("protocol", "bad notice from the agent (%s): %.200r" % (e, line)) from None
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            os.close(fd)
            raise Error("protocol", "the agent sent a notice whose descriptor is not a socket: %s" % e.strerror) from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise Error("protocol", "the agent sent a notice whose socket is not a Unix stream socket")
        return Channel(sock, notice["conn"])

    def settimeout(self, t):
        self.sock.settimeout(t)

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        """Stops listening; channels already accepted go on."""
        if not self._closed:
            self._closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept
            except OSError:
                pass
            self._r.close()
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<sinc.Listener %s>" % self.addr
