//! The paper's coding tasks (CoopHumanEval, HumanEval): two agents, two turns. Agent 1 writes a
//! helper `aux(...)`, agent 2 the problem's entry-point function, which may call `aux`. Their code
//! runs only in the [`Sandbox`](crate::sandbox::Sandbox), through `harness.py`, which reports
//! static facts (definitions, syntax, how main uses aux) and one result per assert of the
//! problem's `check(candidate)`.
//!
//! Reward (levels; max 4.5, then `reward_shift`, −4 in the paper):
//! - format gate: each response (fences removed) is one top-level function definition with a
//!   `return` (only imports, decorators and comments beside it), else 0;
//! - +0.4 `aux` defined with a return; +0.6 the entry point defined with a return, else stop;
//! - +0.5 the prompt's imports + aux + main parse, else stop;
//! - + the fraction of asserts passed (each under its own timer; 3 timeouts skip the rest);
//! - if some pass but main never calls aux: capped at 2.0; if some pass and it calls aux: +1,
//!   and +1 more when main is not a thin wrapper (`return aux(...)`, or `v = aux(...); return v`);
//! - −0.5 when main calls aux and drops its result (a bare statement, or a variable never read).
//!
//! Turn 2: each agent's next observation is its previous (extracted) function, the diagnostics —
//! aux and main found or missing, the syntax error with line and column, `Tests: p/t passed`,
//! failing cases with their errors, and (for main) how it uses aux — and a request to revise. Its
//! earlier prompt and response are already in its history.

use crate::dataset::{read_rows, string_field};
use crate::sandbox::{Limits, Sandbox, Status};
use crate::{check_step, Env, Outcome, Scored, Split};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const HARNESS: &str = include_str!("harness.py");

#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub task_id: String,
    pub prompt: String,
    pub test: String,
    pub entry_point: String,
}

/// Column names of a coding dataset file (Hugging Face exports may rename them).
#[derive(Clone, Debug)]
pub struct Columns {
    pub task_id: String,
    pub prompt: String,
    pub test: String,
    pub entry_point: String,
}

impl Default for Columns {
    fn default() -> Self {
        Self { task_id: "task_id".into(), prompt: "prompt".into(), test: "test".into(), entry_point: "entry_point".into() }
    }
}

impl Columns {
    /// From `task.columns` overrides (keys: task_id, prompt, test, entry_point).
    pub fn with_overrides(map: &BTreeMap<String, String>) -> Result<Self> {
        let mut c = Self::default();
        for (k, v) in map {
            match k.as_str() {
                "task_id" => c.task_id = v.clone(),
                "prompt" => c.prompt = v.clone(),
                "test" => c.test = v.clone(),
                "entry_point" => c.entry_point = v.clone(),
                other => bail!("task.columns.{other}: a coding task has the columns task_id, prompt, test, entry_point"),
            }
        }
        Ok(c)
    }
}

/// Reads coding problems from a dataset file (JSON, JSONL, `.jsonl.gz`, Parquet).
pub fn load_problems(path: &Path, cols: &Columns) -> Result<Vec<Problem>> {
    problems_from_rows(path, &read_rows(path)?, cols)
}

/// Problems from rows already read (`path` names them in errors).
pub fn problems_from_rows(path: &Path, rows: &[crate::dataset::Row], cols: &Columns) -> Result<Vec<Problem>> {
    let mut out = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let get = |c: &str, key: &str| string_field(path, i, r, c, &format!("task.columns.{key}")).map(String::from);
        let p = Problem {
            task_id: match r.get(&cols.task_id) {
                Some(v) => v.as_str().map(String::from).unwrap_or_else(|| v.to_string()),
                None => format!("row {i}"),
            },
            prompt: get(&cols.prompt, "prompt")?,
            test: get(&cols.test, "test")?,
            entry_point: get(&cols.entry_point, "entry_point")?,
        };
        if !p.entry_point.chars().all(|c| c.is_alphanumeric() || c == '_') || p.entry_point.is_empty() {
            bail!("{}: row {i}: entry point {:?} is not a Python name", path.display(), p.entry_point);
        }
        if !p.test.contains("def check") {
            bail!("{}: row {i} ({}): the test has no `def check(candidate)`", path.display(), p.task_id);
        }
        out.push(p);
    }
    if out.is_empty() {
        bail!("{}: no problems", path.display());
    }
    Ok(out)
}

/// What the harness found for one joint action.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Facts {
    pub format_ok: [bool; 2],
    pub aux_func: String,
    pub main_func: String,
    pub aux_defined: bool,
    pub main_defined: bool,
    pub syntax_error: Option<SyntaxErr>,
    pub aux_called: bool,
    pub thin_wrapper: bool,
    /// Why aux's result counts as ignored (empty: it is used).
    pub aux_ignored: Vec<String>,
    pub tests_total: usize,
    pub setup_error: Option<String>,
    #[serde(skip)]
    pub tests: Vec<TestResult>,
    /// The sandbox's verdict on the whole run when it was not `ok` (a timeout, a memory error...).
    #[serde(skip)]
    pub run_problem: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct SyntaxErr {
    pub line: Option<i64>,
    pub column: Option<i64>,
    pub message: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct TestResult {
    pub source: String,
    pub passed: bool,
    pub error: Option<String>,
}

impl Facts {
    pub fn passed(&self) -> usize {
        self.tests.iter().filter(|t| t.passed).count()
    }

    /// Passed asserts over all asserts (those never reported, after a kill, count as failed).
    pub fn pass_rate(&self) -> f64 {
        if self.tests_total == 0 {
            0.0
        } else {
            self.passed() as f64 / self.tests_total as f64
        }
    }
}

/// The reward levels of a joint action (before the shift).
pub fn score(f: &Facts) -> Scored {
    let mut s = Scored { reward: 0.0, levels: BTreeMap::new(), stopped_at: None };
    let add = |s: &mut Scored, level: &str, v: f64| {
        s.reward += v;
        s.levels.insert(level.to_string(), v);
    };
    if !(f.format_ok[0] && f.format_ok[1]) {
        s.stopped_at = Some("format".into());
        return s;
    }
    if f.aux_defined {
        add(&mut s, "aux_defined", 0.4);
    }
    if !f.main_defined {
        s.stopped_at = Some("main_defined".into());
        return s;
    }
    add(&mut s, "main_defined", 0.6);
    if f.syntax_error.is_some() {
        s.stopped_at = Some("syntax".into());
        return s;
    }
    add(&mut s, "syntax", 0.5);
    add(&mut s, "tests", f.pass_rate());
    let passed = f.passed() > 0;
    if passed && !f.aux_called && s.reward > 2.0 {
        let cut = 2.0 - s.reward;
        add(&mut s, "cap_without_aux", cut);
    }
    if passed && f.aux_called {
        add(&mut s, "aux_called", 1.0);
        if !f.thin_wrapper {
            add(&mut s, "not_a_wrapper", 1.0);
        }
    }
    if f.aux_called && !f.aux_ignored.is_empty() {
        add(&mut s, "aux_result_ignored", -0.5);
    }
    s
}

/// Which dataset a coding env holds (its name in configs and its default split).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodingTask {
    /// CoopHumanEval (82 problems): eval = the first 16, train = the rest.
    CoopHumanEval,
    /// HumanEval (164 problems): eval = the first 32, train = the rest.
    HumanEval,
    /// The built-in sample written for collm: eval = the last 2.
    Sample,
}

pub struct Coding {
    pub task: CodingTask,
    pub train: Vec<Problem>,
    pub eval: Vec<Problem>,
    pub sandbox: Arc<Sandbox>,
    /// Added to every reward (the paper: −4).
    pub reward_shift: f64,
    pub per_test_timeout: Duration,
}

impl Coding {
    /// Splits the problems as the paper does for `task`.
    pub fn new(task: CodingTask, mut problems: Vec<Problem>, sandbox: Arc<Sandbox>) -> Result<Self> {
        let n_eval = match task {
            CodingTask::CoopHumanEval => 16,
            CodingTask::HumanEval => 32,
            CodingTask::Sample => 2,
        };
        if problems.len() <= n_eval {
            bail!("{task:?}: {} problems leave none to train on ({n_eval} are held out for eval)", problems.len());
        }
        let (eval, train) = match task {
            CodingTask::Sample => {
                let e = problems.split_off(problems.len() - n_eval);
                (e, problems)
            }
            _ => {
                let t = problems.split_off(n_eval);
                (problems, t)
            }
        };
        Self::with_splits(task, train, eval, sandbox)
    }

    /// Explicit splits (an eval file of the user's).
    pub fn with_splits(task: CodingTask, train: Vec<Problem>, eval: Vec<Problem>, sandbox: Arc<Sandbox>) -> Result<Self> {
        if train.is_empty() {
            bail!("{task:?}: no problems to train on");
        }
        Ok(Self { task, train, eval, sandbox, reward_shift: crate::paper_reward_shift("coding"), per_test_timeout: Duration::from_secs(2) })
    }

    /// A sandbox with the limits coding rewards use.
    pub fn default_sandbox() -> Result<Arc<Sandbox>> {
        let sb = Sandbox::new(Limits { timeout: Duration::from_secs(30), memory_mb: 1024, ..Limits::default() }, None)?;
        for w in &sb.isolation.warnings {
            eprintln!("warning: sandbox: {w}");
        }
        Ok(Arc::new(sb))
    }

    /// The built-in problems (written for collm, HumanEval-shaped).
    pub fn sample_problems() -> Vec<Problem> {
        SAMPLE
            .iter()
            .enumerate()
            .map(|(i, (prompt, test, entry))| Problem {
                task_id: format!("collm/{i}"),
                prompt: prompt.to_string(),
                test: test.to_string(),
                entry_point: entry.to_string(),
            })
            .collect()
    }

    fn problem(&self, split: Split, item: usize) -> Result<&Problem> {
        let v = if split == Split::Train { &self.train } else { &self.eval };
        v.get(item).with_context(|| format!("{}: item {item} is outside the {split:?} split ({} items)", self.name(), v.len()))
    }

    /// Runs the harness on one joint action.
    pub fn facts(&self, p: &Problem, aux: &str, main: &str) -> Result<Facts> {
        let nonce = format!("@collm-{:016x}", nonce_seed(aux, main));
        let spec = serde_json::json!({
            "nonce": nonce, "aux": aux, "main": main, "prompt": p.prompt, "test": p.test,
            "entry_point": p.entry_point, "per_test_timeout": self.per_test_timeout.as_secs_f64(),
        });
        let spec = serde_json::to_vec(&spec)?;
        let r = self.sandbox.run(&[("harness.py", HARNESS.as_bytes()), ("spec.json", &spec)], "harness.py")?;
        let mut facts: Option<Facts> = None;
        let mut tests = vec![];
        let mut done = false;
        for line in r.stdout.lines() {
            let Some(rest) = line.strip_prefix(&nonce).and_then(|l| l.strip_prefix(' ')) else { continue };
            let (kind, json) = rest.split_once(' ').unwrap_or((rest, "{}"));
            match kind {
                "static" => facts = Some(serde_json::from_str(json).context("coding harness: bad static report")?),
                "test" => tests.push(serde_json::from_str::<TestResult>(json).context("coding harness: bad test report")?),
                "done" => done = true,
                _ => {}
            }
        }
        let Some(mut f) = facts else {
            bail!("coding harness failed before reporting ({:?}: {}): {}", r.status, r.reason.unwrap_or_default(), r.stderr.trim());
        };
        f.tests = tests;
        if !done || r.status != Status::Ok {
            f.run_problem = Some(format!("{}: {}", serde_json::to_value(r.status)?.as_str().unwrap_or("?"), r.reason.unwrap_or_default()));
        }
        Ok(f)
    }

    /// The second-turn feedback of agent `i` (0: aux, 1: main).
    pub fn feedback(&self, p: &Problem, f: &Facts, i: usize, reward: f64) -> String {
        let mut s = String::new();
        let (name, func) = if i == 0 { ("aux(...)".to_string(), &f.aux_func) } else { (format!("{}(...)", p.entry_point), &f.main_func) };
        s += &format!("\n\nYour previous {name} implementation:\n");
        s += if func.is_empty() { "<no implementation found>" } else { func };
        s += "\n\nStatic and execution diagnostics:\n";
        let aux_line = format!(
            "- Aux definition: {}\n",
            if f.aux_defined {
                "FOUND (aux is defined with a return statement)"
            } else if f.aux_func.is_empty() {
                "MISSING (aux is not defined)"
            } else {
                "MISSING (aux has no return statement)"
            }
        );
        let main_line = format!(
            "- Main definition: {}\n",
            if f.main_defined {
                format!("FOUND ({} is defined with a return statement)", p.entry_point)
            } else if f.main_func.is_empty() {
                format!("MISSING ({} is not defined)", p.entry_point)
            } else {
                format!("MISSING ({} has no return statement)", p.entry_point)
            }
        );
        if i == 0 {
            s += &aux_line;
            s += &main_line;
        } else {
            s += &main_line;
            s += &aux_line;
        }
        if !(f.format_ok[0] && f.format_ok[1]) {
            let who: Vec<&str> = [(0, "aux"), (1, "main")].iter().filter(|(k, _)| !f.format_ok[*k]).map(|(_, n)| *n).collect();
            s += &format!("- Format: the {} response is not exactly one function definition with a return\n", who.join(" and "));
        }
        match &f.syntax_error {
            None => s += "- Syntax: OK\n",
            Some(e) => {
                s += &format!(
                    "- Syntax: ERROR\n  SyntaxError at line {}, col {}: {}\n",
                    e.line.map(|x| x.to_string()).unwrap_or("?".into()),
                    e.column.map(|x| x.to_string()).unwrap_or("?".into()),
                    e.message
                );
            }
        }
        if f.syntax_error.is_none() && f.main_defined {
            if f.tests_total == 0 {
                s += "- Tests: no test cases found\n";
            } else {
                s += &format!("- Tests: {}/{} passed\n", f.passed(), f.tests_total);
                for t in f.tests.iter().filter(|t| !t.passed).take(3) {
                    s += &format!("  Failed case: {} -> {}\n", t.source, t.error.as_deref().unwrap_or("AssertionError"));
                }
            }
            if let Some(pr) = &f.run_problem {
                s += &format!("  The run stopped early ({pr})\n");
            }
        }
        if i == 1 && f.main_defined {
            if !f.aux_called {
                s += &format!("- Aux usage: {} does NOT call aux\n", p.entry_point);
            } else if !f.aux_ignored.is_empty() {
                s += &format!(
                    "- Aux usage: called but misused ({})\n",
                    f.aux_ignored.iter().take(2).cloned().collect::<Vec<_>>().join(", ")
                );
            } else {
                s += &format!("- Aux usage: {} calls aux and uses its result\n", p.entry_point);
            }
            if f.aux_called && f.thin_wrapper {
                s += &format!("- Warning: {} appears to be a thin wrapper over aux\n", p.entry_point);
            }
        }
        s += &format!("- Reward: {reward:.2}\n");
        s += &format!("\nRevise your {name} accordingly. Output ONLY the function code with no extra text.\n");
        s
    }
}

fn nonce_seed(a: &str, b: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // A per-process random key: the code under test cannot predict the nonce.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(a.as_bytes());
    h.write(b.as_bytes());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

/// The parameter list of the entry point's `def` line in the prompt (`...` if none is found).
pub fn entry_params(prompt: &str, entry: &str) -> String {
    let needle = format!("def {entry}(");
    let Some(start) = prompt.find(&needle).map(|s| s + needle.len()) else { return "...".into() };
    let mut depth = 1;
    for (k, c) in prompt[start..].char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => {
                depth -= 1;
                if depth == 0 {
                    let params = prompt[start..start + k].split_whitespace().collect::<Vec<_>>().join(" ");
                    return if params.is_empty() { "".into() } else { params };
                }
            }
            _ => {}
        }
    }
    "...".into()
}

impl Env for Coding {
    fn name(&self) -> &str {
        match self.task {
            CodingTask::CoopHumanEval => "coophumaneval",
            CodingTask::HumanEval => "humaneval",
            CodingTask::Sample => "coding",
        }
    }
    fn num_agents(&self) -> usize {
        2
    }
    fn len(&self, split: Split) -> usize {
        if split == Split::Train {
            self.train.len()
        } else {
            self.eval.len()
        }
    }
    fn reset(&self, split: Split, item: usize) -> Result<Vec<String>> {
        let p = self.problem(split, item)?;
        let params = entry_params(&p.prompt, &p.entry_point);
        let rules = "IMPORTANT INSTRUCTIONS:\n- Output ONLY the function code, no explanations or examples\n- Do NOT include markdown code blocks (```python)\n- Do NOT include any text before or after the function\n- Do NOT include test cases or example usage\n";
        let aux = format!(
            "Write a helper function for this coding problem.\n\nProblem:\n{}\n\n{rules}- Name the helper function 'aux'; another agent writes '{}' and may call it\n- aux should return data that helps solve the problem\n\nYour output should follow this format:\n\ndef aux(...):\n    # your function code here\n    return result\n",
            p.prompt.trim_end(),
            p.entry_point
        );
        let main = format!(
            "Solve this coding problem by implementing the required function.\n\nProblem:\n{}\n\nYou can call a helper function aux(...) written by another agent.\n\n{rules}- Do NOT define aux() yourself\n- Implement ONLY the '{}' function as specified\n- You may call aux() and use its result inside your function\n\nYour output should follow this format:\n\ndef {}({params}):\n    # your function code here\n    return result\n",
            p.prompt.trim_end(),
            p.entry_point,
            p.entry_point
        );
        Ok(vec![aux, main])
    }
    fn step(&self, split: Split, item: usize, turn: usize, joint_actions: &[Vec<String>]) -> Result<Outcome> {
        check_step(self, split, item, turn, joint_actions)?;
        let p = self.problem(split, item)?;
        let a = &joint_actions[turn];
        let f = self.facts(p, &a[0], &a[1]).with_context(|| format!("{}: problem {}", self.name(), p.task_id))?;
        let s = score(&f);
        let reward = s.reward + self.reward_shift;
        let next_observations = (0..2).map(|i| self.feedback(p, &f, i, reward)).collect();
        Ok(Outcome::new(reward, next_observations)
            .with_metric("pass_rate", f.pass_rate())
            .with_metric("all_passed", if f.tests_total > 0 && f.passed() == f.tests_total { 1.0 } else { 0.0 })
            .with_metric("format_ok", if f.format_ok[0] && f.format_ok[1] { 1.0 } else { 0.0 })
            .with_metric("syntax_ok", if f.syntax_error.is_none() && f.main_defined { 1.0 } else { 0.0 })
            .with_metric("aux_called", if f.aux_called { 1.0 } else { 0.0 })
            .with_metric("raw_reward", s.reward)
            .with_metrics(s.levels.iter().map(|(k, v)| (format!("level_{k}"), *v))))
    }
}

/// Built-in problems (written for collm): prompt, test, entry point.
const SAMPLE: [(&str, &str, &str); 6] = [
    (
        "def sum_of_squares(numbers: list) -> int:\n    \"\"\"Return the sum of the squares of the numbers.\n    >>> sum_of_squares([1, 2, 3])\n    14\n    \"\"\"\n",
        "def check(candidate):\n    assert candidate([1, 2, 3]) == 14\n    assert candidate([]) == 0\n    assert candidate([-2]) == 4\n",
        "sum_of_squares",
    ),
    (
        "def count_vowels(text: str) -> int:\n    \"\"\"Count the vowels (a, e, i, o, u, either case) in the text.\n    >>> count_vowels('Hello')\n    2\n    \"\"\"\n",
        "def check(candidate):\n    assert candidate('Hello') == 2\n    assert candidate('xyz') == 0\n    assert candidate('AEIOU aeiou') == 10\n",
        "count_vowels",
    ),
    (
        "def second_largest(values: list) -> int:\n    \"\"\"Return the second largest distinct value, or None if there is none.\n    >>> second_largest([4, 1, 4, 3])\n    3\n    \"\"\"\n",
        "def check(candidate):\n    assert candidate([4, 1, 4, 3]) == 3\n    assert candidate([7]) is None\n    assert candidate([5, 5]) is None\n    assert candidate([-1, -2]) == -2\n",
        "second_largest",
    ),
    (
        "def is_palindrome_sentence(text: str) -> bool:\n    \"\"\"True if the letters of the text, ignoring case and non-letters, read the same both ways.\n    >>> is_palindrome_sentence('Never odd or even')\n    True\n    \"\"\"\n",
        "def check(candidate):\n    assert candidate('Never odd or even') is True\n    assert candidate('abc') is False\n    assert candidate('') is True\n",
        "is_palindrome_sentence",
    ),
    (
        "def running_max(values: list) -> list:\n    \"\"\"Return the list of the largest value seen so far at each position.\n    >>> running_max([1, 3, 2, 5])\n    [1, 3, 3, 5]\n    \"\"\"\n",
        "def check(candidate):\n    assert candidate([1, 3, 2, 5]) == [1, 3, 3, 5]\n    assert candidate([]) == []\n    assert candidate([2, 1]) == [2, 2]\n",
        "running_max",
    ),
    (
        "def word_lengths(sentence: str) -> dict:\n    \"\"\"Map each word of the sentence (split on whitespace) to its length.\n    >>> word_lengths('a bb')\n    {'a': 1, 'bb': 2}\n    \"\"\"\n",
        "def check(candidate):\n    assert candidate('a bb') == {'a': 1, 'bb': 2}\n    assert candidate('') == {}\n",
        "word_lengths",
    ),
];
