"""One request on a partition socket and its answer (docs/protocol.md §1)."""

import json
import os
import socket

from .errors import Error
from .reader import Reader
from .wire import MAX_ANSWER, request_line

SOCKET_ENV = "SINC_SOCKET"


def socket_path(path):
    """path, or the partition socket named by $SINC_SOCKET."""
    if path:
        return os.fspath(path)
    env = os.environ.get(SOCKET_ENV)
    if not env:
        raise Error("no_agent", "no partition socket given, and $%s is not set" % SOCKET_ENV)
    return env


def connect(path, timeout=None):
    """A socket connected to the agent at path."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
        s.close()
        raise Error("no_agent", "no agent at %s: %s (check that the agent runs and that this is a "
                    "partition socket of it)" % (path, e.strerror)) from None
    except BaseException:
        s.close()
        raise
    return s


def request(path, op, timeout=None, **fields):
    """Sends one request to the agent at path and reads its answer.

    Returns the socket, the answer object, and the Reader that holds what
    came after the answer (records, or notices and their descriptors). An
    error answer is raised as Error, the socket closed.
    """
    line = request_line(op, **fields)
    s = connect(socket_path(path), timeout)
    r = Reader(s)
    try:
        try:
            s.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent answered early (busy) and closed: read why
        raw = r.line(MAX_ANSWER)
        if raw is None:
            raise Error("agent_gone", "the agent closed the socket without answering the %s request" % op)
        try:
            ans = json.loads(raw)
        except ValueError:
            raise Error("protocol", "the agent's answer is not JSON: %.200r" % raw) from None
        if not isinstance(ans, dict):
            raise Error("protocol", "the agent's answer is not a JSON object: %.200r" % raw)
        if ans.get("ok") is not True:
            raise Error.from_json(ans.get("error"))
        return s, ans, r
    except BaseException:
        r.close()
        s.close()
        raise
