"""Two agents solve arithmetic word problems that collm does not have built in.

Agent 0 (the planner) reads the problem and names the numbers and the operation; agent 1 (the
solver) reads the problem and gives the answer. The shared reward per turn: 1 when the solver's
first number is the exact answer, plus small credit for answering with a number at all (0.2 each,
so that untrained agents get a signal). After the first turn each agent sees its teammate's
response and whether the answer was right, and may revise.
"""

import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "python"))
from collm_task import Task  # noqa: E402

task = Task(agents=2, turns=2, name="arithmetic")


def first_int(text):
    m = re.search(r"-?\d+", text)
    return int(m.group()) if m else None


@task.observe
def observe(item, options):
    q = item["question"]
    return [
        f"Problem: {q}\nName the numbers and the operation.\nPlan:",
        f"Problem: {q}\nGive the answer as one number.\nAnswer:",
    ]


def score(item, plan, answer):
    got = first_int(answer)
    exact = 1.0 if got == item["answer"] else 0.0
    formed = 0.2 * (first_int(plan) is not None) + 0.2 * (got is not None)
    return exact + formed, {"exact": exact, "numeric": float(got is not None)}


@task.step
def step(item, turn, joint_actions, options):
    plan, answer = joint_actions[turn]
    reward, metrics = score(item, plan, answer)
    verdict = "right" if metrics["exact"] else "not right"
    return {
        "reward": reward,
        "metrics": metrics,
        "done": bool(metrics["exact"]),
        "observations": [
            f"\nThe solver answered: {answer.strip()} ({verdict}). Revise your plan.\nPlan:",
            f"\nThe planner said: {plan.strip()}. Your answer was {verdict}. Answer again.\nAnswer:",
        ],
    }


if __name__ == "__main__":
    task.run()
