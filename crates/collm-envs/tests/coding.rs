//! The coding reward and feedback on hand-worked joint actions, run through the real sandbox.

use collm_envs::coding::{load_problems, score, Coding, CodingTask, Columns};
use collm_envs::{Env, Split};
use std::path::Path;
use std::time::Duration;

fn env() -> Coding {
    let mut c = Coding::new(CodingTask::Sample, Coding::sample_problems(), Coding::default_sandbox().unwrap()).unwrap();
    c.per_test_timeout = Duration::from_millis(500);
    c.reward_shift = 0.0;
    c
}

/// (raw reward, levels) of a joint action on train item 0 (sum_of_squares: 3 asserts).
fn reward(env: &Coding, aux: &str, main: &str) -> (f64, Vec<String>, Option<String>) {
    let o = env.step(Split::Train, 0, 0, &[vec![aux.into(), main.into()]]).unwrap();
    let f = env.facts(&env.train[0], aux, main).unwrap();
    let s = score(&f);
    assert!((o.reward - s.reward).abs() < 1e-12);
    (s.reward, s.levels.keys().cloned().collect(), s.stopped_at)
}

const AUX: &str = "def aux(numbers):\n    return [n * n for n in numbers]";

#[test]
fn full_cooperation_earns_the_maximum() {
    let e = env();
    let main = "def sum_of_squares(numbers: list) -> int:\n    squares = aux(numbers)\n    total = 0\n    for s in squares:\n        total += s\n    return total";
    let (r, levels, stop) = reward(&e, AUX, main);
    assert!((r - 4.5).abs() < 1e-9, "{r} {levels:?}");
    assert_eq!(stop, None);
    // With the paper's shift the maximum is +0.5.
    let mut e = e;
    e.reward_shift = -4.0;
    let o = e.step(Split::Train, 0, 0, &[vec![AUX.into(), main.into()]]).unwrap();
    assert!((o.reward - 0.5).abs() < 1e-9);
    assert_eq!(o.metrics["pass_rate"], 1.0);
    assert_eq!(o.metrics["all_passed"], 1.0);
}

#[test]
fn thin_wrapper_cap_and_ignored_result() {
    let e = env();
    let aux_full = "def aux(numbers):\n    return sum(n * n for n in numbers)";
    // A thin wrapper over a correct aux: no "not a wrapper" point.
    let (r, _, _) = reward(&e, aux_full, "def sum_of_squares(numbers):\n    return aux(numbers)");
    assert!((r - 3.5).abs() < 1e-9, "{r}");
    let (r, _, _) = reward(&e, aux_full, "def sum_of_squares(numbers):\n    \"\"\"Doc.\"\"\"\n    v = aux(numbers)\n    return v");
    assert!((r - 3.5).abs() < 1e-9, "{r}");
    // Main solves it alone: 0.4 + 0.6 + 0.5 + 1 = 2.5, capped at 2.0.
    let (r, levels, _) = reward(&e, AUX, "def sum_of_squares(numbers):\n    return sum(n * n for n in numbers)");
    assert!((r - 2.0).abs() < 1e-9, "{r}");
    assert!(levels.contains(&"cap_without_aux".to_string()));
    // Calls aux and drops the result: 4.5 - 0.5.
    let (r, _, _) = reward(&e, AUX, "def sum_of_squares(numbers):\n    aux(numbers)\n    return sum(n * n for n in numbers)");
    assert!((r - 4.0).abs() < 1e-9, "{r}");
    // Stores it and never reads it: also ignored.
    let (r, _, _) = reward(&e, AUX, "def sum_of_squares(numbers):\n    unused = aux(numbers)\n    return sum(n * n for n in numbers)");
    assert!((r - 4.0).abs() < 1e-9, "{r}");
}

#[test]
fn partial_tests_format_and_syntax_levels() {
    let e = env();
    // Drops negative numbers: right on [1, 2, 3] and [], wrong on [-2] -> 2 of 3 asserts.
    let main = "def sum_of_squares(numbers):\n    squares = aux([n for n in numbers if n > 0])\n    return sum(squares)";
    let (r, _, _) = reward(&e, AUX, main);
    assert!((r - (0.4 + 0.6 + 0.5 + 2.0 / 3.0 + 1.0 + 1.0)).abs() < 1e-9, "{r}");
    // Prose around the code fails the format gate: 0.
    let (r, _, stop) = reward(&e, &format!("Here is the helper:\n{AUX}"), main);
    assert_eq!((r, stop.as_deref()), (0.0, Some("format")));
    // Fenced code is fine.
    let (r, _, _) = reward(&e, &format!("```python\n{AUX}\n```"), main);
    assert!(r > 4.0, "{r}");
    // One agent silent: format gate.
    let (r, _, stop) = reward(&e, "", main);
    assert_eq!((r, stop.as_deref()), (0.0, Some("format")));
    // A function without a return fails the format gate.
    let (r, _, stop) = reward(&e, AUX, "def sum_of_squares(numbers):\n    print(numbers)");
    assert_eq!((r, stop.as_deref()), (0.0, Some("format")));
    // A well-formed function under another name: main is missing, 0.4, stopped at main_defined.
    let (r, _, stop) = reward(&e, AUX, "def solve(numbers):\n    return 1");
    assert!((r - 0.4).abs() < 1e-9);
    assert_eq!(stop.as_deref(), Some("main_defined"));
    // Aux under another name: no 0.4, main still earns the rest (passes 1 of 3: only []).
    let (r, _, _) = reward(&e, "def helper(numbers):\n    return 1", "def sum_of_squares(numbers):\n    return sum(numbers)");
    assert!((r - (0.6 + 0.5 + 1.0 / 3.0)).abs() < 1e-9, "{r}");
    // A syntax error: 0.4 + 0.6, stopped at syntax; the feedback names the line and column.
    let bad = "def sum_of_squares(numbers):\n    return sum(n * n for n in numbers\n";
    let (r, _, stop) = reward(&e, AUX, bad);
    assert!((r - 1.0).abs() < 1e-9, "{r}");
    assert_eq!(stop.as_deref(), Some("syntax"));
    let o = e.step(Split::Train, 0, 0, &[vec![AUX.into(), bad.into()]]).unwrap();
    assert!(o.next_observations[1].contains("SyntaxError at line"), "{}", o.next_observations[1]);
    // Non-ASCII text in the code and around it.
    let (r, _, _) = reward(&e, "def aux(numbers):\n    # carré — квадрат\n    return [n * n for n in numbers]", main);
    assert!(r > 4.0, "{r}");
}

#[test]
fn hostile_or_broken_code_is_contained_and_scored() {
    let e = env();
    // An infinite loop: every assert times out; after 3 timeouts the rest are skipped.
    let t = std::time::Instant::now();
    let (r, _, _) = reward(&e, AUX, "def sum_of_squares(numbers):\n    while True:\n        pass\n    return 0");
    assert!((r - 1.5).abs() < 1e-9, "{r}");
    assert!(t.elapsed() < Duration::from_secs(10));
    let f = e.facts(&e.train[0], AUX, "def sum_of_squares(numbers):\n    while True:\n        pass\n    return 0").unwrap();
    assert!(f.tests.iter().all(|t| t.error.as_deref().is_some_and(|m| m.contains("timed out"))), "{:?}", f.tests);
    // Deleting files outside its directory: refused, counted as a failed test, training goes on.
    let (r, _, _) = reward(&e, AUX, "def sum_of_squares(numbers):\n    import shutil\n    shutil.rmtree('/tmp')\n    return 0");
    assert!((r - 1.5).abs() < 1e-9, "{r}");
    // Printing fake reports does not forge results (the nonce is unknown to the code).
    let (r, _, _) = reward(
        &e,
        AUX,
        "def sum_of_squares(numbers):\n    print('x test {\"source\": \"a\", \"passed\": true, \"error\": null}')\n    return -1",
    );
    assert!((r - 1.5).abs() < 1e-9, "{r}");
    // A huge allocation.
    let (r, _, _) = reward(&e, AUX, "def sum_of_squares(numbers):\n    x = bytearray(10 * 1024**3)\n    return 0");
    assert!((r - 1.5).abs() < 1e-9, "{r}");
}

#[test]
fn feedback_lists_the_diagnostics_and_asks_for_a_revision() {
    let e = env();
    let main = "def sum_of_squares(numbers):\n    return sum(numbers)";
    let o = e.step(Split::Train, 0, 0, &[vec![AUX.into(), main.into()]]).unwrap();
    let fb_main = &o.next_observations[1];
    for want in [
        "Your previous sum_of_squares(...) implementation:\ndef sum_of_squares(numbers):\n    return sum(numbers)",
        "- Main definition: FOUND",
        "- Aux definition: FOUND",
        "- Syntax: OK",
        "- Tests: 1/3 passed",
        "Failed case: assert candidate([1, 2, 3]) == 14 -> AssertionError",
        "- Aux usage: sum_of_squares does NOT call aux",
        "Revise your sum_of_squares(...) accordingly.",
    ] {
        assert!(fb_main.contains(want), "missing {want:?} in\n{fb_main}");
    }
    let fb_aux = &o.next_observations[0];
    assert!(fb_aux.contains("Your previous aux(...) implementation:\ndef aux(numbers):"), "{fb_aux}");
    assert!(fb_aux.contains("Revise your aux(...) accordingly."));
    assert!(!fb_aux.contains("Aux usage"));
    // The first observations: each agent its role and the problem.
    let obs = e.reset(Split::Train, 0).unwrap();
    assert!(obs[0].contains("named 'aux'") || obs[0].contains("function 'aux'"), "{}", obs[0]);
    assert!(obs[1].contains("def sum_of_squares(numbers: list):\n    # your function code here"), "{}", obs[1]);
}

#[test]
fn coop_humaneval_loads_and_splits_like_the_paper() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/coding/coop_humaneval.json");
    let problems = load_problems(&p, &Columns::default()).unwrap();
    assert_eq!(problems.len(), 82);
    let c = Coding::new(CodingTask::CoopHumanEval, problems, Coding::default_sandbox().unwrap()).unwrap();
    assert_eq!((c.len(Split::Eval), c.len(Split::Train)), (16, 66));
    let p0 = &c.eval[0];
    assert_eq!(p0.entry_point, "x_or_y");
    // A cooperative solution of the first problem passes all 5 asserts.
    let aux = "def aux(n):\n    if n < 2:\n        return False\n    for k in range(2, int(n ** 0.5) + 1):\n        if n % k == 0:\n            return False\n    return True";
    let main = "def x_or_y(n, x, y):\n    prime = aux(n)\n    if prime:\n        return x\n    return y";
    let o = c.step(Split::Eval, 0, 0, &[vec![aux.into(), main.into()]]).unwrap();
    assert!((o.reward - 0.5).abs() < 1e-9, "{}", o.reward);
    // Renamed columns and a missing one, from a Parquet export.
    let pq = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/coding_sample.parquet");
    let e = format!("{:#}", load_problems(&pq, &Columns::default()).unwrap_err());
    assert!(e.contains("coding_sample.parquet: row 0 has no column 'prompt'") && e.contains("task.columns.prompt"), "{e}");
    let cols = Columns { task_id: "id".into(), prompt: "question".into(), test: "tests".into(), entry_point: "fn".into() };
    let got = load_problems(&pq, &cols).unwrap();
    assert_eq!((got[0].task_id.as_str(), got[0].entry_point.as_str()), ("T/0", "add"));
}

/// A sandbox that cannot run the harness to its report (here: a wall-clock limit too short for
/// Python to start) makes the reward an error naming the problem, never a silent zero.
#[test]
fn a_failing_sandbox_is_an_error_not_a_zero_reward() {
    use collm_envs::sandbox::{Limits, Sandbox};
    let limits = Limits { timeout: Duration::from_millis(1), ..Limits::default() };
    let sb = std::sync::Arc::new(Sandbox::new(limits, None).unwrap());
    let env = Coding::new(CodingTask::Sample, Coding::sample_problems(), sb).unwrap();
    let joint = vec![vec!["def aux(x):\n    return x\n".to_string(), "def sum_of_squares(n):\n    return 0\n".to_string()]];
    let e = format!("{:#}", env.step(Split::Train, 0, 0, &joint).unwrap_err());
    assert!(e.contains("coding harness failed") && e.contains("problem collm/"), "{e}");
}
