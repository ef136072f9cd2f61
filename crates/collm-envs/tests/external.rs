//! External tasks over the task protocol: the arithmetic example gives the rewards and
//! observations its Python code defines, and every way a worker can fail (exit, hang, garbage,
//! NaN, wrong shape, another protocol version, the task's own exception) is an error naming the
//! program, the item and the turn, after the restarts the config allows.

use collm_envs::external::{External, Spec};
use collm_envs::{Env, Split};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn spec(command: Vec<String>, restarts: usize) -> Spec {
    Spec { command, options: Default::default(), workers: 1, timeout: Duration::from_secs(5), restarts }
}

fn rows() -> Vec<serde_json::Map<String, serde_json::Value>> {
    vec![json!({"id": "q0", "question": "Ann has 2 pens and gets 3 more. How many pens does Ann have now?", "answer": 5})
        .as_object()
        .unwrap()
        .clone()]
}

/// A task program written in raw protocol (no helper), with `body` deciding each step's reply.
fn program(name: &str, body: &str) -> Vec<String> {
    let dir = std::env::temp_dir().join(format!("collm-external-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{name}.py"));
    let src = format!(
        "import json, sys, os, time\nfor line in sys.stdin:\n    msg = json.loads(line)\n    op = msg['op']\n    if op == 'hello':\n        reply = {{'protocol': 1, 'agents': 2, 'turns': 2, 'name': '{name}'}}\n    elif op == 'observe':\n        reply = {{'observations': ['a', 'b']}}\n    else:\n{body}\n    print(json.dumps(reply), flush=True)\n"
    );
    std::fs::write(&p, src).unwrap();
    vec!["python3".into(), p.display().to_string()]
}

fn joint() -> Vec<Vec<String>> {
    vec![vec!["3 plus 2".into(), "5".into()]]
}

#[test]
fn the_arithmetic_example_scores_as_its_python_says() {
    let task = repo().join("examples/tasks/arithmetic/task.py");
    let e = External::start(spec(vec!["python3".into(), task.display().to_string()], 0), rows(), vec![]).unwrap();
    assert_eq!((e.name(), e.num_agents(), e.hello().turns), ("arithmetic", 2, Some(2)));
    let obs = e.reset(Split::Train, 0).unwrap();
    assert!(obs[0].contains("Ann has 2 pens") && obs[1].ends_with("Answer:"), "{obs:?}");
    // Exact answer and both responses numeric: 1 + 0.2 + 0.2; the episode ends.
    let o = e.step(Split::Train, 0, 0, &joint()).unwrap();
    assert!((o.reward - 1.4).abs() < 1e-12 && o.done, "{o:?}");
    assert_eq!(o.metrics["exact"], 1.0);
    let wrong = vec![vec!["plus".to_string(), "7".to_string()]];
    let o = e.step(Split::Train, 0, 0, &wrong).unwrap();
    assert!((o.reward - 0.2).abs() < 1e-12 && !o.done, "{o:?}");
    assert!(o.next_observations[1].contains("not right"), "{:?}", o.next_observations);
}

#[test]
fn every_worker_failure_names_the_program_item_and_turn() {
    let cases: [(&str, &str, &str); 6] = [
        ("exits", "        sys.exit(3)", "exited"),
        ("hangs", "        time.sleep(60)", "no reply within"),
        ("garbage", "        print('hello there', flush=True)\n        continue", "not a protocol JSON object"),
        ("nan", "        reply = {'reward': float('nan'), 'observations': ['x', 'y']}", "the reward must be a finite number"),
        ("shape", "        reply = {'reward': 1.0, 'observations': ['only one']}", "1 observations for 2 agents"),
        ("raises", "        reply = {'error': 'ValueError: bad row'}", "the task reported an error: ValueError: bad row"),
    ];
    for (name, body, want) in cases {
        let cmd = program(name, &format!("        sys.stderr.write('{name} is about to fail\\n')\n{body}"));
        let mut s = spec(cmd, 1);
        s.timeout = Duration::from_millis(1500);
        let e = External::start(s, rows(), vec![]).unwrap();
        let err = format!("{:#}", e.step(Split::Train, 0, 0, &joint()).unwrap_err());
        assert!(
            err.contains(&format!("{name}.py")) && err.contains("item 0") && err.contains("turn 0") && err.contains(want),
            "{name}: {err}"
        );
        if ["exits", "hangs", "garbage"].contains(&name) {
            // Restarted once (task.restarts = 1), then given up, with the worker's stderr.
            assert!(err.contains("restarted 1 times") && err.contains(&format!("{name} is about to fail")), "{name}: {err}");
        }
    }
}

#[test]
fn a_crashed_worker_is_restarted_and_the_request_retried() {
    let marker = std::env::temp_dir().join(format!("collm-external-crashed-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    // Crashes on its first step only (the marker file remembers), then answers.
    let body = format!(
        "        if not os.path.exists({m:?}):\n            open({m:?}, 'w').write('x')\n            os._exit(1)\n        reply = {{'reward': 0.5, 'observations': ['x', 'y']}}",
        m = marker.display().to_string()
    );
    let e = External::start(spec(program("flaky", &body), 1), rows(), vec![]).unwrap();
    assert_eq!(e.step(Split::Train, 0, 0, &joint()).unwrap().reward, 0.5);
    let _ = std::fs::remove_file(&marker);
}

#[test]
fn another_protocol_version_is_refused_at_the_handshake() {
    let dir = std::env::temp_dir().join(format!("collm-external-v2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("v2.py");
    std::fs::write(&p, "import json, sys\nfor line in sys.stdin:\n    print(json.dumps({'protocol': 2, 'agents': 2}), flush=True)\n")
        .unwrap();
    let err = format!("{:#}", External::start(spec(vec!["python3".into(), p.display().to_string()], 3), rows(), vec![]).err().unwrap());
    assert!(err.contains("v2.py") && err.contains("speaks task protocol 2") && err.contains("version 1"), "{err}");
    let err = format!("{:#}", External::start(spec(vec!["/nonexistent/task".into()], 0), rows(), vec![]).err().unwrap());
    assert!(err.contains("starting the task program `/nonexistent/task`"), "{err}");
}

/// The built-in `tldr` task and the Python one in examples/tasks/tldr, both over that example's posts.
fn tldr_pair() -> (Box<dyn Env>, Box<dyn Env>) {
    use collm_envs::tasks::{build, TaskConfig};
    let dir = repo().join("examples/tasks/tldr");
    let fetch = &|_: &str| -> anyhow::Result<PathBuf> { anyhow::bail!("no dataset to fetch") };
    let builtin = TaskConfig { name: "tldr".into(), data: Some(dir.join("posts.jsonl")), ..Default::default() };
    let python = TaskConfig {
        name: "external".into(),
        command: vec!["python3".into(), dir.join("task.py").display().to_string()],
        data: Some(dir.join("posts.jsonl")),
        workers: 2,
        ..Default::default()
    };
    (build(&builtin, fetch).unwrap(), build(&python, fetch).unwrap())
}

/// Responses that reach every level and sit on its edges: the writing tests' shapes over the real
/// word lists, ratios and unique-word ratios exactly on the thresholds, transitions, stop words,
/// Unicode (accents, case folding, CJK, non-breaking and exotic spaces), and seeded random texts.
fn tldr_cases() -> Vec<(String, String)> {
    let w = |n: usize, p: &str| (0..n).map(|i| format!("{p}{i}")).collect::<Vec<_>>().join(" ");
    let c1 = "a b c d e f g hhhhhh".to_string(); // 8 tokens, 20 chars, 8 unique words
    let pad = |n: usize, words: usize| {
        // `words` distinct one-letter words, the last padded with 'x' to n characters.
        let mut s = ('a'..='z').filter(|&c| c != 'x').take(words).map(String::from).collect::<Vec<_>>().join(" ");
        assert!(s.len() <= n);
        while s.chars().count() < n {
            s.push('x');
        }
        s
    };
    let mut cases = vec![
        ("short one".into(), w(20, "x")),
        (w(10, "a"), w(25, "b")),
        (w(10, "a"), format!("however {} a0 a1", w(20, "b"))),
        (w(10, "a"), format!("however {} a0", w(24, "b"))),
        (w(10, "a"), w(10, "c")),
        (w(300, "a"), w(300, "b")),
        (String::new(), w(20, "b")),
        (c1.clone(), pad(32, 16)),
        (c1.clone(), pad(64, 16)),
        (c1.clone(), pad(100, 16)),
        (c1.clone(), pad(22, 10)),
        (c1.clone(), pad(40, 11)),
        (c1.clone(), pad(101, 16)),
        (c1.clone(), pad(40, 20)),
        ("a b c d e f g h i jjjjj".into(), pad(40, 13)), // unique-word ratio exactly 1.3
        (
            "The bees pick a new home by voting.".into(),
            "Scout bees inspect possible nest sites; furthermore, they dance for the best ones. However, \
             other scouts check for themselves, and as a result support grows until a quorum forms, \
             then the whole swarm moves in. In contrast to a single leader, the choice is shared."
                .into(),
        ),
        (
            "Café owners in Zürich ÉTÉ straße raised prices this year.".into(),
            "Les cafés de Zürich: prices ROSE because ΣΟΦΟΣ rents İstanbul 東京 climbed; meanwhile \u{a0}customers\u{2003}left, \
             so owners\u{1c}cut hours — consequently revenue fell 12% and 3½ staff quit 😀 for good."
                .into(),
        ),
        ("  padded   with\tspaces\nand lines  here ok  ".into(), "  detailed\u{3000}text  with\u{2028}breaks ".repeat(5)),
    ];
    let vocab = [
        "the",
        "a",
        "of",
        "and",
        "is",
        "however",
        "therefore",
        "as",
        "result",
        "furthermore",
        "bees",
        "swarm",
        "site",
        "dance",
        "library",
        "glacier",
        "ice",
        "moves",
        "slowly",
        "for",
        "example",
        "in",
        "addition",
        "meanwhile",
        "finally",
        "first",
        "because",
        "Ice,",
        "Bees.",
        "x_y",
        "42",
        "é",
        "naïve",
        "similarly",
        "on",
        "other",
        "hand",
        "in",
        "conclusion",
    ];
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = |m: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % m as u64) as usize
    };
    for _ in 0..300 {
        let n1 = 4 + next(20);
        let n2 = 4 + next(80);
        let a: Vec<&str> = (0..n1).map(|_| vocab[next(vocab.len())]).collect();
        let b: Vec<&str> = (0..n2).map(|_| vocab[next(vocab.len())]).collect();
        cases.push((a.join(" "), b.join(" ")));
    }
    cases
}

#[test]
fn the_python_tldr_task_gives_the_builtin_observations_rewards_levels_and_metrics() {
    let (builtin, python) = tldr_pair();
    assert_eq!(python.name(), "tldr");
    for split in [Split::Train, Split::Eval] {
        assert_eq!(builtin.len(split), python.len(split), "{split:?}");
        for item in 0..builtin.len(split) {
            assert_eq!(builtin.reset(split, item).unwrap(), python.reset(split, item).unwrap(), "{split:?} item {item}");
        }
    }
    let cases = tldr_cases();
    let mut levels_seen = std::collections::BTreeSet::new();
    let mut rewards = std::collections::BTreeSet::new();
    for (i, (c1, c2)) in cases.iter().enumerate() {
        let joint = vec![vec![c1.clone(), c2.clone()]];
        let (b, p) = (builtin.step(Split::Train, i % 8, 0, &joint).unwrap(), python.step(Split::Train, i % 8, 0, &joint).unwrap());
        // Bit for bit: the same arithmetic in the same order, carried through JSON exactly.
        assert_eq!(b.reward.to_bits(), p.reward.to_bits(), "case {i}: {c1:?} / {c2:?}: {} vs {}", b.reward, p.reward);
        assert_eq!(b, p, "case {i}: {c1:?} / {c2:?}");
        levels_seen.extend(b.metrics.keys().cloned());
        rewards.insert(b.reward.to_bits());
    }
    // The cases reach every level and many different rewards.
    assert_eq!(levels_seen.len(), 4, "{levels_seen:?}");
    assert!(rewards.len() > 50, "only {} distinct rewards", rewards.len());
    // A second turn: the revision prompts are the same too.
    let two = vec![vec![cases[1].0.clone(), cases[1].1.clone()], vec![cases[14].0.clone(), cases[14].1.clone()]];
    assert_eq!(builtin.step(Split::Eval, 1, 1, &two).unwrap(), python.step(Split::Eval, 1, 1, &two).unwrap());
}

fn pair_coding(sandbox_timeout: f64) -> Box<dyn Env> {
    use collm_envs::tasks::{build, TaskConfig};
    let dir = repo().join("examples/tasks/pair_coding");
    let mut options = serde_json::Map::new();
    options.insert("timeout".into(), json!(sandbox_timeout));
    let cfg = TaskConfig {
        name: "external".into(),
        command: vec!["python3".into(), dir.join("task.py").display().to_string()],
        data: Some(dir.join("problems.jsonl")),
        turns: 2,
        workers: 2,
        options,
        ..Default::default()
    };
    build(&cfg, &|_: &str| -> anyhow::Result<PathBuf> { anyhow::bail!("no dataset to fetch") }).unwrap()
}

/// The pair-programming example scores model code through collm's sandbox: right code earns the
/// full reward, wrong or lazy code less, code that loops past the sandbox's limit is stopped by
/// the sandbox (not by the task), and files the code writes land in the sandbox's directory.
#[test]
fn the_pair_coding_example_runs_model_code_in_collms_sandbox() {
    let e = pair_coding(3.0);
    assert_eq!((e.name(), e.num_agents(), e.len(Split::Train), e.len(Split::Eval)), ("pair_coding", 2, 10, 2));
    let obs = e.reset(Split::Train, 0).unwrap();
    assert!(obs[0].contains("count_vowels(word)") && obs[1].contains("vowel_words(text)"), "{obs:?}");
    let helper = "```python\ndef count_vowels(word):\n    return sum(c in 'aeiouAEIOU' for c in word)\n```";
    let main = "def vowel_words(text):\n    return sum(1 for w in text.split() if count_vowels(w) >= 2)\n";
    let step = |h: &str, m: &str| e.step(Split::Train, 0, 0, &[vec![h.to_string(), m.to_string()]]).unwrap();
    let o = step(helper, main);
    assert_eq!((o.reward, o.metrics["pass_rate"], o.done), (3.5, 1.0, true), "{o:?}");
    // Right without the helper: no teamwork bonus.
    let alone = "def vowel_words(text):\n    return sum(1 for w in text.split() if sum(c in 'aeiouAEIOU' for c in w) >= 2)";
    let o = step(helper, alone);
    assert_eq!((o.reward, o.metrics["uses_helper"]), (3.0, 0.0), "{o:?}");
    // A wrong helper fails the main function's tests that need it: 'tree sky idea' and 'AUDIO ...'.
    let o = step("def count_vowels(word):\n    return 1", main);
    assert_eq!((o.metrics["pass_rate"], o.done), (0.5, false), "{o:?}");
    assert!(o.next_observations[0].contains("assert vowel_words('tree sky idea') == 2"), "{:?}", o.next_observations);
    // Code that turns off the per-assert timer and loops is killed by the sandbox's own limit.
    let t = std::time::Instant::now();
    let o = step("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass", main);
    assert_eq!((o.reward, o.metrics["timeout"]), (0.0, 1.0), "{o:?}");
    assert!(t.elapsed().as_secs_f64() < 20.0, "{:?}", t.elapsed());
    // A file the model code writes is not written where the task runs.
    let marker = format!("collm-escape-{}.txt", std::process::id());
    let o = step(&format!("open('{marker}', 'w').write('x')\n{helper}"), main);
    assert_eq!(o.metrics["pass_rate"], 1.0, "{o:?}");
    assert!(!Path::new(&marker).exists() && !repo().join("examples/tasks/pair_coding").join(&marker).exists());
}

/// A sandbox request collm refuses reaches the task as an exception, and the task's error names
/// the problem; one it accepts returns the run's output.
#[test]
fn sandbox_requests_are_answered_or_refused_with_a_reason() {
    let dir = std::env::temp_dir().join(format!("collm-external-sb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("sb_task.py");
    let helper = repo().join("python");
    std::fs::write(
        &p,
        format!(
            "import sys\nsys.path.insert(0, {:?})\nfrom collm_task import Task\ntask = Task(agents=2, turns=1, name='sb')\n\
             @task.observe\ndef observe(item, options):\n    return ['a', 'b']\n\
             @task.reward\ndef reward(item, responses, options):\n    if responses[0] == 'bad':\n        task.sandbox(files={{'../x.py': 'print(1)'}}, main='../x.py')\n    \
             r = task.sandbox(code=responses[1], timeout=5)\n    return float(r['stdout'].strip()), {{'ok': float(r['status'] == 'ok')}}\n\
             task.run()\n",
            helper.display().to_string()
        ),
    )
    .unwrap();
    let e = External::start(spec(vec!["python3".into(), p.display().to_string()], 0), rows(), vec![]).unwrap();
    let o = e.step(Split::Train, 0, 0, &[vec!["good".into(), "print(6 * 7)".into()]]).unwrap();
    assert_eq!((o.reward, o.metrics["ok"]), (42.0, 1.0), "{o:?}");
    let err = format!("{:#}", e.step(Split::Train, 0, 0, &[vec!["bad".into(), "print(1)".into()]]).unwrap_err());
    assert!(err.contains("SandboxError") && err.contains("plain name") && err.contains("item 0"), "{err}");
}
