"""The error a sinc call raises: a code of docs/protocol.md, a message, and
the agent that refused, where one did."""


class Error(Exception):
    """A failure of a request or a channel.

    code is one of the protocol's codes (docs/protocol.md §1 and §3:
    "denied", "reset", "aborted", ...) or one this client adds:

    - "agent_gone": the agent closed the socket without a fin or a close
      record before it (it stopped or died), or stopped listening;
    - "protocol": also when the agent sent something the protocol does not
      allow (an unknown record type, an oversized line or record);
    - "message_too_long": a message over MAX_MESSAGE, refused before sending;
    - "no_agent": nothing listens on the socket path.

    by names the agent that refused or reported it ("" when none did).
    """

    def __init__(self, code, message="", by=""):
        super().__init__(code, message, by)
        self.code = code
        self.message = message
        self.by = by

    def __str__(self):
        s = self.code
        if self.by:
            s += " (by %s)" % self.by
        if self.message:
            s += ": " + self.message
        return s

    @classmethod
    def from_json(cls, obj):
        """The Error of a JSON error object {"code","message","by"?}."""
        if not isinstance(obj, dict) or not isinstance(obj.get("code"), str) or not obj["code"]:
            return cls("protocol", "the agent sent an error without a code: %.200r" % (obj,))
        msg, by = obj.get("message", ""), obj.get("by", "")
        return cls(obj["code"], msg if isinstance(msg, str) else str(msg), by if isinstance(by, str) else "")
