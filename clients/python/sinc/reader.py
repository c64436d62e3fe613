"""Reading a socket of the agent: bytes, and the descriptors that ride
with them (SCM_RIGHTS), in order.

Every read is a recvmsg with room for descriptors and MSG_CMSG_CLOEXEC, so
that a descriptor riding in a read is never lost, whichever socket it is:
the answer to listen and the first notice can come in one read
(docs/protocol.md §1, §4). Received descriptors wait in a queue until a
caller takes them; bytes wait in a buffer. A timeout (the socket's) leaves
both as they were, so a read can be tried again where it stopped.

Not safe for concurrent use.
"""

import array
import os
import socket

from .errors import Error

_CHUNK = 65536 + 4
_ANCILLARY = socket.CMSG_SPACE(16 * array.array("i").itemsize)


class Reader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.fds = []  # received, not yet taken, in order
        self.eof = False

    def fill(self):
        """Reads once more; returns False at end of file. A reset
        (ECONNRESET: the agent closed with our bytes unread) is an end of
        file too: what the agent wrote before it was read already."""
        if self.eof:
            return False
        try:
            data, anc, flags, _ = self.sock.recvmsg(_CHUNK, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
        except ConnectionResetError:
            data, anc, flags = b"", [], 0
        for level, typ, d in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(d[: len(d) - len(d) % a.itemsize])
                self.fds.extend(a)
        if flags & socket.MSG_CTRUNC:
            raise Error("protocol", "the agent sent more descriptors than one read holds")
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def line(self, limit):
        """The next line, without its newline; None at end of file before
        its first byte. A line longer than limit (newline included), or
        cut by end of file, is an error."""
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                if i + 1 > limit:
                    break
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                return line
            if len(self.buf) >= limit:
                break
            start = len(self.buf)
            if not self.fill():
                if not self.buf:
                    return None
                raise Error("agent_gone", "the agent closed the socket in the middle of a line")
        raise Error("protocol", "the agent sent a line longer than %d bytes" % limit)

    def peek(self, n):
        """The next n bytes, left in the buffer; None at end of file before
        any of them, an error at end of file among them."""
        while len(self.buf) < n:
            if not self.fill():
                if not self.buf:
                    return None
                raise Error("agent_gone", "the agent closed the socket in the middle of a record")
        return bytes(self.buf[:n])

    def exact(self, n):
        """The next n bytes, as peek, taken from the buffer."""
        b = self.peek(n)
        if b is not None:
            del self.buf[:n]
        return b

    def take_fd(self):
        """The next received descriptor, or None."""
        return self.fds.pop(0) if self.fds else None

    def close(self):
        """Closes the descriptors received and not taken."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)
