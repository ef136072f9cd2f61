"""The paper's TLDR writing task, written in Python against collm's task protocol.

It gives the same observations, rewards, levels and metrics as collm's built-in `tldr` task
(crates/collm-envs/src/writing.rs), which the tests check on a set of responses and on a short
training run. Agent 0 writes a concise summary of a post, agent 1 a detailed one; the reward is a
sum of gated levels that stops at the first level that fails:

  length        both responses 8..256 whitespace-separated tokens        +0.5
  ratio         chars(detailed) / chars(concise) in [1.6, 3.2]           +1 (ramps on 1.1..1.6 and 3.2..5)
  unique_words  unique words ratio >= 2                                  +0.5 (ramps on 1.3..2)
  style         0.4 * transition score of the detailed one + 0.6 * min(Jaccard, 0.03) / 0.03

Options (`task.options` in the config): `lexicons`, the word-list file (relative paths are taken
from this file's directory), and `text_field`, the dataset column holding the post.
"""

import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "python"))
from collm_task import Task  # noqa: E402

task = Task(agents=2, name="tldr")

PROMPTS = [
    "Write a concise summary (one or two sentences) of the following post.\n\n{text}\n\nSummary:",
    "Write a detailed summary of the following post, using varied vocabulary and transition words "
    "(for example, furthermore, however, as a result).\n\n{text}\n\nDetailed summary:",
]

# Unicode's White_Space property, which Rust's split_whitespace and trim use (Python's str.split
# also splits at U+001C..U+001F, which are not white space there).
WHITE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
SPLIT = re.compile("[" + re.escape(WHITE) + "]+")

_lexicons = {}


def lexicons(options):
    path = options.get("lexicons", "../../../../shared/data/writing/lexicons.json")
    if not os.path.isabs(path):
        path = os.path.normpath(os.path.join(HERE, path))
    if path not in _lexicons:
        with open(path, encoding="utf-8") as f:
            v = json.load(f)
        stop = {w.lower() for w in v["stopwords"]}
        transitions = [[p.lower() for p in phrases] for phrases in v["transition_words"].values()]
        _lexicons[path] = (stop, transitions)
    return _lexicons[path]


def tokens(text):
    return len([t for t in SPLIT.split(text) if t])


def words(text):
    """\\b\\w+\\b over the lower-cased text: runs of letters, digits and underscores."""
    out, cur = [], []
    for c in text.lower():
        if c.isalpha() or c.isnumeric() or c == "_":
            cur.append(c)
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


def unique_words(text):
    return len(set(words(text)))


def jaccard(a, b, stop):
    x = {w for w in words(a) if w not in stop}
    y = {w for w in words(b) if w not in stop}
    union = len(x | y)
    if union == 0:
        return 1.0
    return len(x & y) / union


def transition_score(text, transitions):
    lower = text.lower()
    k = sum(1 for phrases in transitions if any(p in lower for p in phrases))
    if k == 0:
        return 0.0
    return min(0.4 + min(0.05 * (k - 1.0), 0.6), 1.0)


def score(c1, c2, stop, transitions):
    """The levels reached, in order, as (name, points) pairs."""
    levels = []
    if not (8 <= tokens(c1) <= 256 and 8 <= tokens(c2) <= 256):
        return levels
    levels.append(("length", 0.5))
    n1 = len(c1)
    if n1 == 0:
        return levels
    r = len(c2) / n1
    if 1.6 <= r <= 3.2:
        l2 = 1.0
    elif 1.1 <= r < 1.6:
        l2 = (r - 1.1) / 0.5
    elif 3.2 < r <= 5.0:
        l2 = 1.0 - (r - 3.2) / 1.8
    else:
        return levels
    levels.append(("ratio", l2))
    u1 = unique_words(c1)
    if u1 == 0:
        return levels
    u = unique_words(c2) / u1
    if u >= 2.0:
        l3 = 0.5
    elif 1.3 <= u < 2.0:
        l3 = 0.5 * (u - 1.3) / 0.7
    else:
        return levels
    levels.append(("unique_words", l3))
    j = jaccard(c1, c2, stop)
    levels.append(("style", 0.4 * transition_score(c2, transitions) + 0.6 * min(j, 0.03) / 0.03))
    return levels


@task.observe
def observe(item, options):
    text = item[options.get("text_field", "prompt")]
    return [p.replace("{text}", text) for p in PROMPTS]


@task.step
def step(item, turn, joint_actions, options):
    stop, transitions = lexicons(options)
    c1, c2 = joint_actions[turn]
    levels = score(c1, c2, stop, transitions)
    reward = 0.0
    for _, v in levels:
        reward += v
    # The paper runs the task for one turn; with more, each agent is asked to revise.
    feedback = [
        "\n\nYour previous answer:\n%s\n\nIt scored %.2f. Revise it.\n" % (r.strip(WHITE), reward) for r in (c1, c2)
    ]
    return {
        "reward": reward,
        "metrics": {"level_" + k: v for k, v in levels},
        "done": False,
        "observations": feedback,
    }


if __name__ == "__main__":
    task.run()
