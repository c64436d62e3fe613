"""Errors that need an agent stopped or a limit reached: an open not
answered in time (the destination agent stopped a moment), channels per
process, and agents shutting down (agent_gone at both ends)."""

import os
import signal
import time

import sinc
from tests.agents import CLUSTER, WAIT, AgentTest, service, sock


def wait_stopped(pid):
    """Waits until every thread of pid is stopped: kill returns before."""
    deadline = time.monotonic() + WAIT
    while True:
        states = []
        for tid in os.listdir("/proc/%d/task" % pid):
            try:
                with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                pass
        if all(s in ("T", "t") for s in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError("agent %d not stopped after %ss: %s" % (pid, WAIT, states))
        time.sleep(0.01)


class TestAgents(AgentTest):
    def test_open_timeout(self):
        # node-c stopped: node-a sends the open over a link that is still up
        # and hears nothing within timers.open.
        pid = CLUSTER["pids"]["node-c"]
        bound = CLUSTER["timers"]["open"]
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_stopped(pid)
            t = time.monotonic()
            e = self.assertError("timeout", sinc.dial, sock("node-a/web"), "node-c/edge/" + service(), by="",
                                 message="node-c did not answer within " + bound)
            self.assertLess(time.monotonic() - t, float(bound.rstrip("s")) + 2, str(e))
        finally:
            os.kill(pid, signal.SIGCONT)

    def test_channels_per_process(self):
        limit = CLUSTER["limits"]["channels_per_process"]
        ln = self.listen()
        for _ in range(limit):
            self.dial(ln.addr, part="node-c/edge")
        self.assertError("limit", sinc.dial, sock("node-c/edge"), ln.addr, by="node-c",
                         message="process %d has %d channels open, the limit per process" % (os.getpid(), limit))

    def test_agent_gone(self):
        # node-d shuts down (SIGTERM): its process and the other end are
        # told, its listener's socket ends, its partition socket is gone.
        ln = self.listen()
        d = self.dial(ln.addr, part="node-d/gone")
        a = self.accept(ln)
        dl = self.listen("node-d/gone")
        os.kill(CLUSTER["pids"]["node-d"], signal.SIGTERM)
        # Its own process reads the agent's close record, or (if the agent
        # closed the socket with the connections it was still serving) end
        # of file without a fin: agent_gone either way.
        e = self.assertError("agent_gone", d.recv, by="")
        self.assertIn(e.message, ("agent node-d is shutting down",
                                  "the agent closed the channel without a fin or a close record"))
        self.assertError("agent_gone", a.recv, by="node-d", message="agent node-d is shutting down")
        self.assertError("agent_gone", dl.accept)
        deadline = time.monotonic() + WAIT
        while os.path.exists(sock("node-d/gone")) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertError("no_agent", sinc.conns, sock("node-d/gone"))
