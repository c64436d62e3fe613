"""Constants and encodings of the local protocol, version 2
(docs/protocol.md; the agent's are in internal/local/local.go).

A record on a channel socket:

    +--------+------------------------+-----------------+
    | type 8 | length 24 (big endian) | payload         |
    +--------+------------------------+-----------------+
"""

import json
import struct

from .errors import Error

VERSION = 2

MAX_REQUEST = 4096  # a request line, newline included
MAX_RECORD = 65536  # a data record's payload
MAX_MESSAGE = MAX_RECORD  # a message of a message channel
MAX_CLOSE = 4096  # a close record's payload
MAX_NOTICE = 8192  # a listener's notice line, newline included
MAX_ANSWER = 16 << 20  # this client's bound on an answer line (conns grows with rows)
HEADER_LEN = 4

DATA, FIN, CLOSE = 0, 1, 2

STREAM, MESSAGE = "stream", "message"

_header = struct.Struct(">I")


def record(typ, payload=b""):
    """A record of type typ carrying payload."""
    return _header.pack(typ << 24 | len(payload)) + payload


def parse_header(b):
    """The type and length of a record header, checked as the agent checks
    what a process sends; an agent that breaks them breaks the protocol."""
    v = _header.unpack(b)[0]
    typ, n = v >> 24, v & 0xFFFFFF
    if typ == DATA and n > MAX_RECORD:
        raise Error("protocol", "the agent sent a data record of %d bytes, max %d" % (n, MAX_RECORD))
    if typ == FIN and n != 0:
        raise Error("protocol", "the agent sent a fin record with %d bytes" % n)
    if typ == CLOSE and n > MAX_CLOSE:
        raise Error("protocol", "the agent sent a close record of %d bytes, max %d" % (n, MAX_CLOSE))
    if typ not in (DATA, FIN, CLOSE):
        raise Error("protocol", "the agent sent a record of unknown type %d" % typ)
    return typ, n


def request_line(op, **fields):
    """The request line for op: one JSON object, version 2, and a newline."""
    req = {"v": VERSION, "op": op}
    req.update({k: v for k, v in fields.items() if v is not None})
    line = json.dumps(req, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_REQUEST:
        raise Error("bad_request", "request of %d bytes, max %d" % (len(line), MAX_REQUEST))
    return line
