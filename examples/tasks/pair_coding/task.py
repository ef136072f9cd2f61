"""Pair programming in Python: a helper writer and a main writer, scored in collm's sandbox.

Agent 0 writes a helper function, agent 1 writes the main function, which may call the helper.
The task never runs model-written code itself: it sends the two responses and its test script to
collm's sandbox (`task.sandbox`, see python/collm_task.py) and reads the verdict back.

Shared reward per turn (at most 3.5): +0.5 when the helper is defined, +0.5 when the main
function is defined, +2 x the fraction of the problem's asserts that pass, +0.5 when the main
function calls the helper. Metrics: pass_rate, helper_defined, main_defined, uses_helper,
timeout (the sandbox stopped the run). With two turns, each agent then sees the failing asserts
and its teammate's code, and the episode ends once every assert passes.

Options: `timeout`, seconds the sandbox gives one joint action (default 10).
"""

import hashlib
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "python"))
from collm_task import Task  # noqa: E402

task = Task(agents=2, turns=2, name="pair_coding")

FENCE = re.compile(r"^\s*```")

# Runs inside the sandbox: loads both responses, reports what they define, then runs each assert
# under a timer. The report line starts with a nonce the model code cannot know, so printing
# cannot forge a result.
CHECK = r'''
import ast, json, signal, sys
spec = json.load(open("spec.json", encoding="utf-8"))
nonce, write = spec["nonce"], sys.__stdout__.write
report = {"helper_defined": 0.0, "main_defined": 0.0, "uses_helper": 0.0, "passed": 0, "failed": []}

def defines(code, name):
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    return None

h = defines(spec["helper_code"], spec["helper"])
m = defines(spec["main_code"], spec["entry_point"])
report["helper_defined"] = float(h is not None)
report["main_defined"] = float(m is not None)
if m is not None:
    report["uses_helper"] = float(any(isinstance(n, ast.Name) and n.id == spec["helper"] for n in ast.walk(m)))

def alarm(signum, frame):
    raise TimeoutError("the assert ran past its time")

signal.signal(signal.SIGALRM, alarm)
env = {"__name__": "solution"}
try:
    signal.setitimer(signal.ITIMER_REAL, spec["per_test"])
    exec(compile(spec["helper_code"] + "\n\n" + spec["main_code"], "solution.py", "exec"), env)
    loaded = True
except BaseException as e:
    loaded = False
    report["failed"] = ["the code does not load: %s: %s" % (type(e).__name__, e)]
finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
if loaded:
    for t in spec["tests"]:
        try:
            signal.setitimer(signal.ITIMER_REAL, spec["per_test"])
            exec(t, dict(env))
            report["passed"] += 1
        except BaseException as e:
            report["failed"].append("%s  (%s)" % (t, type(e).__name__))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
write(nonce + " " + json.dumps(report) + "\n")
sys.__stdout__.flush()
'''


def code_of(response):
    """The response without markdown fence lines."""
    return "\n".join(line for line in response.splitlines() if not FENCE.match(line))


@task.observe
def observe(item, options):
    return [
        "Write the Python helper function `%s`: %s\nWrite only the function.\n\n" % (item["helper_signature"], item["helper_doc"]),
        "Write the Python function `%s`: %s\nA teammate writes `%s` (%s); call it.\nWrite only the function.\n\n"
        % (item["signature"], item["doc"], item["helper_signature"], item["helper_doc"]),
    ]


def check(item, helper_code, main_code, options):
    """Runs the joint action's code in collm's sandbox; returns the report and the run's status."""
    nonce = hashlib.sha256((helper_code + "\0" + main_code).encode()).hexdigest()[:32]
    spec = {
        "nonce": nonce,
        "helper": item["helper"],
        "entry_point": item["entry_point"],
        "helper_code": helper_code,
        "main_code": main_code,
        "tests": item["tests"],
        "per_test": 2.0,
    }
    run = task.sandbox(files={"check.py": CHECK, "spec.json": json.dumps(spec)}, main="check.py",
                       timeout=float(options.get("timeout", 10)))
    for line in run["stdout"].splitlines():
        if line.startswith(nonce + " "):
            return json.loads(line[len(nonce) + 1:]), run["status"]
    why = run.get("reason") or run["stderr"].strip().splitlines()[-1:] or ["no report"]
    return {"helper_defined": 0.0, "main_defined": 0.0, "uses_helper": 0.0, "passed": 0,
            "failed": ["the sandbox run ended without a report: %s" % (why,)]}, run["status"]


@task.step
def step(item, turn, joint_actions, options):
    helper, main = (code_of(r) for r in joint_actions[turn])
    report, status = check(item, helper, main, options)
    rate = report["passed"] / len(item["tests"])
    reward = 0.5 * report["helper_defined"] + 0.5 * report["main_defined"] + 2.0 * rate + 0.5 * report["uses_helper"]
    failing = "\n".join(report["failed"][:3]) or "(none)"
    return {
        "reward": reward,
        "metrics": {
            "pass_rate": rate,
            "helper_defined": report["helper_defined"],
            "main_defined": report["main_defined"],
            "uses_helper": report["uses_helper"],
            "timeout": float(status == "timeout"),
        },
        "done": rate == 1.0,
        "observations": [
            "\nThe tests that failed:\n%s\nYour teammate's main function:\n%s\nFix your helper.\n\n" % (failing, main.strip()),
            "\nThe tests that failed:\n%s\nYour teammate's helper:\n%s\nFix your function.\n\n" % (failing, helper.strip()),
        ],
    }


if __name__ == "__main__":
    task.run()
