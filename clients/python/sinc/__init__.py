"""sinc: a client of the sinc agent's local protocol, version 2
(docs/protocol.md), in Python with the standard library only.

A process reaches its node's agent through the Unix socket of its
partition (given, or in $SINC_SOCKET) and asks it for channels to services
addressed node/partition/service:

    import sinc

    ch = sinc.dial("/run/sinc/node-a/web.sock", "node-b/db/pg")
    ch.send(b"hello")
    ch.close_write()                 # a fin: this side is done
    reply = ch.recv_all()            # until the other side's fin
    ch.close()

    with sinc.listen("/run/sinc/node-b/db.sock", "pg") as ln:
        ch = ln.accept()             # ch.row: who is on the other end
        ...

    rows = sinc.conns("/run/sinc/node-a/web.sock")

A stream channel carries bytes (send, recv); a message channel keeps
boundaries (send_message, recv_message), each message at most MAX_MESSAGE
bytes. A channel ends cleanly only by a fin each way (close_write, or close,
which sends it); abort(message) ends it at once, and the other side reads
Error "aborted". Every failure is an Error with the protocol's code, a
message and the agent that reported it (by).
"""

from .channel import Channel
from .errors import Error
from .listener import Listener
from .request import SOCKET_ENV, request
from .wire import MAX_CLOSE, MAX_MESSAGE, MAX_NOTICE, MAX_RECORD, MAX_REQUEST, MESSAGE, STREAM, VERSION

__all__ = [
    "Channel", "Error", "Listener", "dial", "listen", "conns",
    "VERSION", "MAX_REQUEST", "MAX_RECORD", "MAX_MESSAGE", "MAX_CLOSE", "MAX_NOTICE",
    "STREAM", "MESSAGE", "SOCKET_ENV",
]


def dial(socket_path, address, kind=STREAM, timeout=None):
    """Opens a channel to address (node/partition/service) through the
    partition socket socket_path (None: $SINC_SOCKET). kind is "stream" or
    "message"; timeout, if given, bounds each wait for the answer (the
    agent answers within timers.open); the channel has none."""
    s, ans, r = request(socket_path, "open", timeout=timeout, to=address, kind=kind)
    s.settimeout(None)
    row = ans.get("conn")
    if not isinstance(row, dict):
        r.close()
        s.close()
        raise Error("protocol", "the agent's open answer has no connection row")
    return Channel(s, row, r)


def listen(socket_path, service, timeout=None):
    """Listens on service of the partition of socket_path."""
    s, ans, r = request(socket_path, "listen", timeout=timeout, service=service)
    s.settimeout(None)
    return Listener(s, ans.get("addr", service), r)


def conns(socket_path=None, timeout=None):
    """The connection rows of the partition of socket_path: its channels,
    dialed and accepted (never its listeners), sorted by id."""
    s, ans, r = request(socket_path, "conns", timeout=timeout)
    r.close()
    s.close()
    rows = ans.get("conns")
    if not isinstance(rows, list):
        raise Error("protocol", "the agent's conns answer has no \"conns\" list")
    return rows
