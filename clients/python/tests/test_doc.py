"""The client in a page (docs/protocol.md §5) runs as printed, against real
agents: it dials an echo service and reads the echo and the fin, then
listens and takes one channel with its descriptor."""

import contextlib
import io
import os
import re
import threading
import time

import sinc
from tests.agents import WAIT, AgentTest, sock

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "..", "docs", "protocol.md")


def example():
    with open(DOC) as f:
        text = f.read()
    section = text[text.index("## 5. A client in a page"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


class TestDocExample(AgentTest):
    def test_client_in_a_page(self):
        code = example()
        for path, part in (("/run/sinc/node-a/web.sock", "node-a/web"), ("/run/sinc/node-b/db.sock", "node-b/db")):
            self.assertIn(path, code)
            code = code.replace(path, sock(part))
        echo = self.listen("node-b/db", "echo")
        errors = []

        def serve():  # the echo service the example dials
            try:
                ch = echo.accept()
                with ch:
                    for m in iter(ch.recv_message, None):
                        ch.send_message(m)
            except Exception as e:
                errors.append(e)

        def dial_pg():  # the channel the example's listener takes
            deadline = time.monotonic() + WAIT
            while True:
                try:
                    ch = sinc.dial(sock("node-a/web"), "node-b/db/pg", timeout=WAIT)
                    ch.send(b"to pg")
                    ch.close()
                    return
                except sinc.Error as e:
                    if e.code != "no_such_service" or time.monotonic() > deadline:
                        errors.append(e)
                        return
                    time.sleep(0.02)

        threads = [threading.Thread(target=f, daemon=True) for f in (serve, dial_pg)]
        for t in threads:
            t.start()
        out = io.StringIO()
        env = {}
        with contextlib.redirect_stdout(out):
            exec(compile(code, "docs/protocol.md §5", "exec"), env)
        for t in threads:
            t.join(WAIT)
        for name in ("s", "l", "ch"):
            self.addCleanup(env[name].close)
        self.assertEqual(errors, [])
        self.assertEqual(out.getvalue(), "(0, b'hello') (1, b'')\n")
        self.assertEqual(env["notice"]["event"], "accept")
        self.assertEqual(env["notice"]["conn"]["service"], "pg")
        # The descriptor the example took is that channel's socket.
        env["ch"].settimeout(WAIT)
        want, got = b"\x00\x00\x00\x05to pg\x01\x00\x00\x00", b""  # the data, then the fin
        while len(got) < len(want):
            b = env["ch"].recv(100)
            if not b:
                break
            got += b
        self.assertEqual(got, want)
