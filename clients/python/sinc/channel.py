"""A channel: records on a connected socket (docs/protocol.md §3).

Reading: recv (stream) and recv_message (message) read records through a
Reader. A fin from the agent is the end of the other side's direction:
recv returns b"" and recv_message None, then and ever after; wait_end then
tells how the channel ended. A close record is raised as Error, then and
ever after; so is end of file with neither before it (agent_gone).

Writing: send and send_message write whole records; close_write sends
the fin; abort sends a close record. A write the agent refuses (it closed
the socket) raises the reason the agent wrote before closing, if it did.

A timeout (settimeout) during a read leaves the channel as it was: read
again. A timeout during a write may leave a record half written: the
channel is then closed (the other side reads reset) and TimeoutError
raised. Using a channel after close, or writing after close_write, raises
ValueError.

One thread may read while another writes; two readers or two writers at
once are not safe.
"""

import json
import socket
import threading

from .errors import Error
from .reader import Reader
from .wire import CLOSE, DATA, FIN, HEADER_LEN, MAX_CLOSE, MAX_MESSAGE, MAX_RECORD, MESSAGE, STREAM, parse_header, record


class Channel:
    """One end of a channel. row is its connection row (docs/protocol.md §2):
    the open's answer on the dialing side, the notice's on the accepting
    side; kind is "stream" or "message"."""

    def __init__(self, sock, row, reader=None):
        self.sock = sock
        self.row = row
        self.kind = row.get("kind", STREAM)
        self._r = reader or Reader(sock)
        self._pending = memoryview(b"")  # rest of the current stream data record
        self._fin_in = False  # the agent sent the other side's fin
        self._err = None  # the close record or failure that ended reading
        self._fin_out = False
        self._closed = False
        self._wmu = threading.Lock()
        self._reading = False  # a read is in progress: the buffer may be mid-record

    # Reading.

    def _next(self):
        """The next record: (DATA, payload) or (FIN, b""); raises at a close
        record or an end of file that is not after a fin."""
        if self._err is not None:
            raise self._err
        if self._closed:
            raise ValueError("I/O on a closed channel")
        self._reading = True
        try:
            return self._read_record()
        except (Error, OSError):
            if self._closed:  # closed by another thread while this one read
                raise ValueError("I/O on a closed channel") from None
            raise
        finally:
            self._reading = False

    def _read_record(self):
        # A record is taken from the buffer only once whole: a timeout
        # anywhere in it leaves the next read at its start.
        try:
            hdr = self._r.peek(HEADER_LEN)
            if hdr is None:
                if self._fin_in:
                    return FIN, b""  # the graceful end: fin, then end of file
                raise Error("agent_gone", "the agent closed the channel without a fin or a close record")
            typ, n = parse_header(hdr)
            rec = self._r.exact(HEADER_LEN + n)
            payload = rec[HEADER_LEN:]
            if typ == CLOSE:
                try:
                    obj = json.loads(payload)
                except ValueError:
                    raise Error("protocol", "the agent sent a close record that is not JSON: %.200r" % payload) from None
                raise Error.from_json(obj)
            if self._fin_in:
                raise Error("protocol", "the agent sent a record after the fin")
        except Error as e:
            self._err = e
            raise
        if typ == FIN:
            self._fin_in = True
        return typ, payload

    def recv(self, bufsize=MAX_RECORD):
        """Up to bufsize bytes of a stream; b"" once the other side ended
        its direction (its fin)."""
        self._want(STREAM)
        while not self._pending:
            if self._fin_in and self._err is None:
                return b""
            typ, payload = self._next()
            if typ == FIN:
                return b""
            self._pending = memoryview(payload)
        b, self._pending = self._pending[:bufsize], self._pending[bufsize:]
        return bytes(b)

    def recv_exactly(self, n):
        """n bytes of a stream; fewer only if the other side ended first."""
        parts, got = [], 0
        while got < n:
            b = self.recv(n - got)
            if not b:
                break
            parts.append(b)
            got += len(b)
        return b"".join(parts)

    def recv_all(self):
        """Everything until the other side's fin."""
        parts = []
        while True:
            b = self.recv()
            if not b:
                return b"".join(parts)
            parts.append(b)

    def recv_message(self):
        """The next message (bytes, maybe empty); None once the other side
        ended its direction."""
        self._want(MESSAGE)
        if self._fin_in and self._err is None:
            return None
        typ, payload = self._next()
        return None if typ == FIN else payload

    def wait_end(self):
        """Once the other side's fin has been read: waits until the agent
        ends the channel. Returns None if it ended cleanly (a fin each way:
        call close_write first), raises Error if it ended abnormally (the
        other side closed before reading all this side sent: reset)."""
        if not self._fin_in:
            raise ValueError("wait_end before the other side's fin: read to the end first")
        while True:
            typ, _ = self._next()
            if typ == FIN:
                return None

    # Writing.

    def send(self, data):
        """Writes all of data to a stream."""
        self._want(STREAM)
        data = memoryview(data).cast("B")
        for off in range(0, len(data), MAX_RECORD):
            self._write(record(DATA, bytes(data[off : off + MAX_RECORD])))

    sendall = send

    def send_message(self, msg):
        """Sends msg (at most MAX_MESSAGE bytes) as one message."""
        self._want(MESSAGE)
        msg = bytes(msg)
        if len(msg) > MAX_MESSAGE:
            raise Error("message_too_long", "message of %d bytes, max %d" % (len(msg), MAX_MESSAGE))
        self._write(record(DATA, msg))

    def close_write(self):
        """Ends this side's direction (a fin); the other may go on. Once."""
        with self._wmu:
            if self._fin_out or self._closed:
                return
            self._fin_out = True
        self._write(record(FIN), check=False)

    def close(self):
        """Ends this side's direction, if not yet, and closes the socket.
        What was written is still delivered; whatever the other side sends
        from now on cannot be, and ends the channel as reset there. The fin
        may wait for room in the socket, at most the socket's timeout: if it
        cannot go, the socket is closed without it (the other side reads
        reset)."""
        if self._closed:
            return
        try:
            self.close_write()
        except (Error, OSError):
            pass  # the channel had ended: nothing to tell
        self._shut()

    def abort(self, message=""):
        """Aborts the channel: the other side reads Error "aborted" with
        message (printable characters, at most 200 bytes of it). Closes the
        socket."""
        if self._closed:
            return
        payload = json.dumps({"message": message}).encode() if message else b""
        if len(payload) > MAX_CLOSE:
            payload = json.dumps({"message": message[:200]}).encode()
        try:
            self._write(record(CLOSE, payload), check=False)
        except (Error, OSError):
            pass
        self._shut()

    def _write(self, rec, check=True):
        with self._wmu:
            if self._closed:
                raise ValueError("I/O on a closed channel")
            if check and self._fin_out:
                raise ValueError("write after close_write: this side's direction has ended")
            try:
                self.sock.sendall(rec)
            except (BrokenPipeError, ConnectionResetError):
                raise self._why_ended() from None
            except socket.timeout:
                # Part of the record may have gone: the framing is lost.
                self._shut_locked()
                raise TimeoutError("a write timed out in the middle of a record: the channel is closed") from None

    def _why_ended(self):
        """Why the agent closed the channel: its close record, found by
        peeking behind what this side has not read yet (nothing is taken
        from the socket: recv still reads it all, then the reason)."""
        if self._err is not None:
            return self._err
        try:
            ahead = self.sock.recv(8 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            ahead = b""
        buf, off = bytes(self._r.buf) + ahead, 0
        while not self._reading and off + HEADER_LEN <= len(buf):
            try:
                typ, n = parse_header(buf[off : off + HEADER_LEN])
            except Error:
                break
            end = off + HEADER_LEN + n
            if typ == CLOSE and end <= len(buf):
                try:
                    return Error.from_json(json.loads(buf[off + HEADER_LEN : end]))
                except ValueError:
                    break
            off = end
        return Error("reset", "the agent closed the channel (recv reads why)")

    def _shut(self):
        with self._wmu:
            self._shut_locked()

    def _shut_locked(self):
        if not self._closed:
            self._closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
            except OSError:
                pass
            self._r.close()
            self.sock.close()

    # The socket.

    def settimeout(self, t):
        self.sock.settimeout(t)

    def fileno(self):
        return self.sock.fileno()

    def _want(self, kind):
        if self.kind != kind:
            raise ValueError("%s channel: use %s" % (self.kind, "recv/send" if self.kind == STREAM else "recv_message/send_message"))

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None:
            self.close()
        else:
            self.abort()

    def __repr__(self):
        r = self.row
        return "<sinc.Channel %s %s %s/%s>" % (r.get("id"), self.kind, r.get("remote_node"), r.get("remote_partition"))
