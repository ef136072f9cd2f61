"""Write a collm task in Python: a few decorated functions, no dependencies.

    from collm_task import Task

    task = Task(agents=2, turns=2, name="my-task")

    @task.observe
    def observe(item, options):
        return ["first observation of agent 0", "... of agent 1"]

    @task.step
    def step(item, turn, joint_actions, options):
        a0, a1 = joint_actions[turn]
        return {"reward": 1.0, "metrics": {"ok": 1.0}, "done": False,
                "observations": ["next for agent 0", "next for agent 1"]}

    task.run()

A single-turn task may give `@task.reward` instead of `step`: `reward(item, responses, options)`
returns a number (or a (number, metrics) pair).

Model-written code must not run in the task's own process: `task.sandbox(code)` (or
`task.sandbox(files={"main.py": ..., "tests.py": ...}, main="main.py")`, with `timeout` seconds
and `memory_mb`) asks collm to run it in its sandbox and returns the result as a dict: `status`
("ok", "timeout", "memory", "signal" or "error"), `exit_code`, `signal`, `stdout`, `stderr`,
`wall_s`, `reason`, `output_truncated`. It may be called from `observe`, `step` or `reward`.

collm starts the file as a persistent worker (`task.command = ["python3", "my_task.py"]`) and
speaks its task protocol over stdin and stdout, one JSON object per line; print logs to stderr.
An exception in your function becomes an error naming the item and turn (training stops).
"""

import json
import sys
import traceback

PROTOCOL = 1


class SandboxError(RuntimeError):
    """collm refused or could not make a sandbox run (the request was malformed, or no sandbox)."""


class Task:
    def __init__(self, agents, turns=None, name="external"):
        self.agents = agents
        self.turns = turns
        self.name = name
        self._observe = None
        self._step = None
        self._reward = None
        self.options = {}
        self._in = None
        self._out = None

    def observe(self, fn):
        self._observe = fn
        return fn

    def step(self, fn):
        self._step = fn
        return fn

    def reward(self, fn):
        self._reward = fn
        return fn

    def sandbox(self, code=None, files=None, main="main.py", timeout=None, memory_mb=None):
        """Runs Python code in collm's sandbox and returns the run's result (a dict)."""
        if self._out is None:
            raise SandboxError("task.sandbox() works only inside a request from collm (after task.run())")
        if (code is None) == (files is None):
            raise SandboxError("give either code (Python source) or files (name -> text)")
        req = {"op": "sandbox"}
        if code is not None:
            req["code"] = code
        else:
            req["files"] = dict(files)
            req["main"] = main
        if timeout is not None:
            req["timeout"] = float(timeout)
        if memory_mb is not None:
            req["memory_mb"] = int(memory_mb)
        self._out.write(json.dumps(req) + "\n")
        self._out.flush()
        line = self._in.readline()
        if not line:
            raise SandboxError("collm closed the connection")
        reply = json.loads(line)
        if "error" in reply:
            raise SandboxError(reply["error"])
        return reply["sandbox"]

    def _handle(self, msg):
        op = msg.get("op")
        if op == "hello":
            if msg.get("protocol") != PROTOCOL:
                return {"protocol": PROTOCOL, "agents": self.agents}
            self.options = msg.get("options") or {}
            reply = {"protocol": PROTOCOL, "agents": self.agents, "name": self.name}
            if self.turns is not None:
                reply["turns"] = self.turns
            return reply
        if op == "observe":
            if self._observe is None:
                raise RuntimeError("the task has no @task.observe function")
            return {"observations": list(self._observe(msg["item"], self.options))}
        if op == "step":
            item, turn, joint = msg["item"], msg["turn"], msg["joint_actions"]
            if self._step is not None:
                out = self._step(item, turn, joint, self.options)
                return dict(out)
            if self._reward is not None:
                r = self._reward(item, joint[turn], self.options)
                metrics = {}
                if isinstance(r, tuple):
                    r, metrics = r
                return {"reward": float(r), "metrics": metrics, "done": True,
                        "observations": [""] * self.agents}
            raise RuntimeError("the task has neither @task.step nor @task.reward")
        raise RuntimeError("unknown request %r" % (op,))

    def run(self):
        out = sys.stdout
        self._in, self._out = sys.stdin, out
        # Anything the task prints goes to stderr, so stdout carries protocol lines only.
        sys.stdout = sys.stderr
        while True:
            line = self._in.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            try:
                reply = self._handle(json.loads(line))
            except Exception as e:  # the task's own error, reported to collm
                traceback.print_exc(file=sys.stderr)
                reply = {"error": "%s: %s" % (type(e).__name__, e)}
            try:
                text = json.dumps(reply, allow_nan=False)
            except ValueError:
                text = json.dumps({"error": "the reply holds NaN or Infinity (the reward must be a finite number): %r" % (reply,)})
            out.write(text + "\n")
            out.flush()
