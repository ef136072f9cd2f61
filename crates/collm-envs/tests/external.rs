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
