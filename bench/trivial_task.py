"""A trivial external task for `collm bench env`: the reward is the length ratio of the two
responses, so the time measured is collm's task protocol (JSON, pipes, the helper), not a reward."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from collm_task import Task  # noqa: E402

task = Task(agents=2, turns=1, name="trivial")


@task.observe
def observe(item, options):
    return [item["text"], item["text"]]


@task.reward
def reward(item, responses, options):
    return len(responses[1]) / (1 + len(responses[0]))


if __name__ == "__main__":
    task.run()
