//! Tasks written outside Rust: any program that speaks collm's task protocol (version
//! [`PROTOCOL`]) as a persistent worker over its stdin and stdout, one JSON object per line.
//!
//! collm sends a request and reads one reply line:
//! - `{"op": "hello", "protocol": 1, "options": {...}}` → `{"protocol": 1, "agents": 2, "turns": 2}`
//!   (`turns`: how many the task expects; `name` optional);
//! - `{"op": "observe", "item": {...}}` → `{"observations": ["...", "..."]}`, each agent's first
//!   observation of a dataset row;
//! - `{"op": "step", "item": {...}, "turn": 0, "joint_actions": [["a0", "a1"]]}` →
//!   `{"reward": 0.5, "metrics": {"exact": 1.0}, "done": false, "observations": ["...", "..."]}`:
//!   the joint action `joint_actions[turn]` (earlier entries are the turns before it on this branch),
//!   the shared reward, task metrics, whether the episode ends, each agent's next observation.
//!
//! While collm waits for a reply the worker may ask collm for something: a line
//! `{"op": "sandbox", "code": "print(1)", "timeout": 5}` (or `"files": {"main.py": ...}, "main":
//! "main.py"`; `memory_mb` optional) runs model-written code in collm's sandbox and collm answers
//! on the worker's stdin with `{"sandbox": {"status": "ok", "exit_code": 0, "stdout": "1\n", ...}}`
//! or `{"error": "..."}`; then the worker goes on to its reply. So a task never runs model code itself.
//!
//! Like a Rust `Env` a worker is stateless, so tree rollouts can branch. A reply
//! `{"error": "..."}` is the task's own error (training stops, naming it). A worker that exits,
//! hangs past `task.timeout`, or prints a line that is not a protocol object is killed and
//! restarted (the request retried) up to `task.restarts` times over the run; then the error names
//! the program, the item and the turn, with the worker's last stderr lines. Datasets load in
//! collm (`task.data`, `task.eval_data`: JSON, JSONL, `.gz`, Parquet) and rows pass through as JSON.

use crate::dataset::{read_rows, Row};
use crate::sandbox::Sandbox;
use crate::{check_step, Env, Outcome, Split};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// The protocol version this collm speaks.
pub const PROTOCOL: u64 = 1;

/// Fresh workers one request is retried on before it fails, whatever the restart budget.
const MAX_RETRIES: usize = 2;

/// Lines of a worker's stderr kept for error messages.
const STDERR_LINES: usize = 20;

/// How an external task is run (the `task.command`, `task.options`, `task.workers`,
/// `task.timeout` and `task.restarts` keys).
#[derive(Clone, Debug)]
pub struct Spec {
    pub command: Vec<String>,
    pub options: serde_json::Map<String, Value>,
    pub workers: usize,
    pub timeout: Duration,
    pub restarts: usize,
}

/// What went wrong with a worker: the ones it can be restarted for, and the task's own errors.
enum Failure {
    Restart(String),
    Task(String),
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Worker {
    fn start(spec: &Spec) -> Result<Self> {
        let (prog, args) =
            spec.command.split_first().context("'task.command' is empty: name the task program, e.g. [\"python3\", \"task.py\"]")?;
        let mut child = Command::new(prog)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the task program `{}`", spec.command.join(" ")))?;
        let stdin = child.stdin.take().context("the worker's stdin")?;
        let stdout = child.stdout.take().context("the worker's stdout")?;
        let stderr_pipe = child.stderr.take().context("the worker's stderr")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines() {
                let Ok(line) = line else { break };
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() == STDERR_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        Ok(Self { child, stdin, lines, stderr })
    }

    fn stderr_tail(&self) -> String {
        // Give the stderr reader a moment to catch up with a worker that just died.
        std::thread::sleep(Duration::from_millis(50));
        let t = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        if t.is_empty() {
            "(its stderr was empty)".into()
        } else {
            format!("its last stderr lines:\n  {}", t.iter().cloned().collect::<Vec<_>>().join("\n  "))
        }
    }

    fn send(&mut self, msg: &Value, what: &str) -> std::result::Result<(), Failure> {
        let line = format!("{msg}\n");
        if self.stdin.write_all(line.as_bytes()).and_then(|_| self.stdin.flush()).is_err() {
            return Err(Failure::Restart(self.exit_reason(&format!("exited before {what} could be sent"))));
        }
        Ok(())
    }

    /// Sends one request and reads its reply object. Lines the worker sends before its reply that
    /// are requests of its own (`{"op": "sandbox", ...}`) are answered through `callback`; the
    /// timeout counts from the last line collm wrote.
    fn request(
        &mut self,
        msg: &Value,
        timeout: Duration,
        callback: &dyn Fn(&serde_json::Map<String, Value>) -> Value,
    ) -> std::result::Result<serde_json::Map<String, Value>, Failure> {
        self.send(msg, "the request")?;
        loop {
            let reply = match self.lines.recv_timeout(timeout) {
                Ok(l) => l,
                Err(RecvTimeoutError::Timeout) => return Err(Failure::Restart(format!("gave no reply within {timeout:?} (task.timeout)"))),
                Err(RecvTimeoutError::Disconnected) => return Err(Failure::Restart(self.exit_reason("exited"))),
            };
            match Self::parse(&reply)? {
                m if m.contains_key("op") => {
                    let answer = callback(&m);
                    self.send(&answer, "the answer to its request")?;
                }
                m => return Ok(m),
            }
        }
    }

    /// A line of the worker's as a protocol object, or why it is not one.
    fn parse(reply: &str) -> std::result::Result<serde_json::Map<String, Value>, Failure> {
        match serde_json::from_str::<Value>(reply) {
            Ok(Value::Object(m)) => match m.get("error") {
                Some(e) => Err(Failure::Task(format!(
                    "the task reported an error: {}",
                    e.as_str().map(String::from).unwrap_or_else(|| e.to_string())
                ))),
                None => Ok(m),
            },
            Err(_) if reply.contains("NaN") || reply.contains("Infinity") => Err(Failure::Task(format!(
                "replied with NaN or Infinity, which JSON cannot carry (the reward must be a finite number): {:?}",
                reply.chars().take(200).collect::<String>()
            ))),
            _ => {
                let shown: String = reply.chars().take(200).collect();
                Err(Failure::Restart(format!("printed a line that is not a protocol JSON object: {shown:?} (print logs to stderr)")))
            }
        }
    }

    fn exit_reason(&mut self, what: &str) -> String {
        std::thread::sleep(Duration::from_millis(20));
        match self.child.try_wait() {
            Ok(Some(s)) => format!("{what} ({s})"),
            _ => what.to_string(),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a worker says of the task at the handshake.
#[derive(Clone, Debug)]
pub struct Hello {
    pub agents: usize,
    pub turns: Option<usize>,
    pub name: String,
}

/// A pool of workers of one task program; each request takes an idle worker.
struct Pool {
    spec: Spec,
    idle: Mutex<Vec<Worker>>,
    freed: Condvar,
    restarts_used: AtomicUsize,
    /// The sandbox model-written code runs in, made at the first `sandbox` request.
    sandbox: OnceLock<std::result::Result<Arc<Sandbox>, String>>,
}

/// The longest a `sandbox` request may ask its code to run, in seconds.
pub const SANDBOX_MAX_TIMEOUT: f64 = 300.0;

impl Pool {
    /// Answers a request a worker makes while collm waits for its reply: `sandbox` runs code in
    /// collm's sandbox (`code`, or `files` and `main`; `timeout` seconds, `memory_mb`) and returns
    /// the run's result; anything else is an error the worker sees.
    fn answer(&self, m: &serde_json::Map<String, Value>) -> Value {
        match m.get("op").and_then(|v| v.as_str()) {
            Some("sandbox") => match self.run_sandbox(m) {
                Ok(r) => json!({ "sandbox": r }),
                Err(e) => json!({ "error": format!("sandbox: {e:#}") }),
            },
            other => json!({ "error": format!("unknown request {other:?} (collm answers \"sandbox\")") }),
        }
    }

    fn run_sandbox(&self, m: &serde_json::Map<String, Value>) -> Result<crate::sandbox::RunResult> {
        let sandbox = self
            .sandbox
            .get_or_init(|| crate::coding::Coding::default_sandbox().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut limits = sandbox.limits.clone();
        if let Some(t) = m.get("timeout") {
            let t = t.as_f64().filter(|t| *t > 0.0 && *t <= SANDBOX_MAX_TIMEOUT);
            let t = t.with_context(|| format!("'timeout' must be a number of seconds in (0, {SANDBOX_MAX_TIMEOUT}]"))?;
            limits.timeout = Duration::from_secs_f64(t);
        }
        if let Some(mb) = m.get("memory_mb") {
            let mb = mb.as_u64().filter(|mb| (16..=65536).contains(mb)).context("'memory_mb' must be a whole number from 16 to 65536")?;
            limits.memory_mb = mb;
        }
        let sb = Sandbox { limits, isolation: sandbox.isolation.clone() };
        match (m.get("code"), m.get("files")) {
            (Some(code), None) => sb.run_code(code.as_str().context("'code' must be a string of Python source")?),
            (None, Some(files)) => {
                let files = files.as_object().context("'files' must be an object of file name to text")?;
                let mut list = vec![];
                for (name, text) in files {
                    let text = text.as_str().with_context(|| format!("file '{name}' must be a string"))?;
                    list.push((name.as_str(), text.as_bytes()));
                }
                let main = m.get("main").and_then(|v| v.as_str()).unwrap_or("main.py");
                if !files.contains_key(main) {
                    bail!("'main' = {main:?} is not one of the files");
                }
                sb.run(&list, main)
            }
            _ => bail!("give either 'code' (Python source) or 'files' (name to text) and 'main'"),
        }
    }

    fn program(&self) -> String {
        format!("task program `{}`", self.spec.command.join(" "))
    }

    /// Starts a worker and checks its handshake.
    fn start(&self) -> Result<(Worker, Hello)> {
        let mut w = Worker::start(&self.spec)?;
        let hello = json!({"op": "hello", "protocol": PROTOCOL, "options": self.spec.options});
        let no_requests = |_: &serde_json::Map<String, Value>| json!({"error": "requests to collm are not allowed during the handshake"});
        let reply = match w.request(&hello, self.spec.timeout, &no_requests) {
            Ok(r) => r,
            Err(Failure::Restart(why) | Failure::Task(why)) => {
                bail!("{}: the handshake failed: it {why}; {}", self.program(), w.stderr_tail())
            }
        };
        let version = reply.get("protocol").and_then(|v| v.as_u64());
        if version != Some(PROTOCOL) {
            bail!(
                "{}: speaks task protocol {}, this collm speaks version {PROTOCOL} (update the task's helper, python/collm_task.py)",
                self.program(),
                version.map(|v| v.to_string()).unwrap_or_else(|| "(none given)".into())
            );
        }
        let agents = reply.get("agents").and_then(|v| v.as_u64()).filter(|&n| (1..=64).contains(&n));
        let Some(agents) = agents else {
            bail!("{}: the handshake must give 'agents', a number from 1 to 64: {}", self.program(), Value::Object(reply))
        };
        let turns = reply.get("turns").and_then(|v| v.as_u64()).map(|t| t as usize);
        let name = reply.get("name").and_then(|v| v.as_str()).unwrap_or("external").to_string();
        Ok((w, Hello { agents: agents as usize, turns, name }))
    }

    /// Sends a request through an idle worker, restarting crashed or hung ones (the request
    /// retried) while the run's restart budget lasts. `what` names the item and turn.
    fn call(&self, msg: &Value, what: &str) -> Result<serde_json::Map<String, Value>> {
        let mut w = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(w) = idle.pop() {
                    break w;
                }
                idle = self.freed.wait(idle).unwrap_or_else(|e| e.into_inner());
            }
        };
        let mut tries = 0;
        let result = loop {
            match w.request(msg, self.spec.timeout, &|m| self.answer(m)) {
                Ok(r) => break Ok(r),
                Err(Failure::Task(why)) => break Err(anyhow::anyhow!("{}: {what}: {why}", self.program())),
                Err(Failure::Restart(why)) => {
                    let tail = w.stderr_tail();
                    w.kill();
                    tries += 1;
                    if tries > MAX_RETRIES {
                        break Err(anyhow::anyhow!(
                            "{}: {what}: the worker {why}; {tail}\n(the same request failed on {tries} workers: giving up)",
                            self.program()
                        ));
                    }
                    let used = self.restarts_used.fetch_add(1, Ordering::SeqCst);
                    if used >= self.spec.restarts {
                        break Err(anyhow::anyhow!(
                            "{}: {what}: the worker {why}; {tail}\n(restarted {} times, task.restarts = {}: giving up)",
                            self.program(),
                            used,
                            self.spec.restarts
                        ));
                    }
                    eprintln!(
                        "warning: {}: {what}: the worker {why}; restarting it ({} of {})",
                        self.program(),
                        used + 1,
                        self.spec.restarts
                    );
                    match self.start() {
                        Ok((nw, _)) => w = nw,
                        // The dead worker goes back, so the pool keeps its size and other
                        // requests fail (or restart it) instead of waiting for ever.
                        Err(e) => break Err(e.context(format!("{what}: restarting the worker"))),
                    }
                }
            }
        };
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(w);
        self.freed.notify_one();
        result
    }
}

/// An external task over a dataset's rows.
pub struct External {
    pool: Pool,
    hello: Hello,
    train: Vec<Row>,
    eval: Vec<Row>,
}

impl External {
    /// Starts `spec.workers` workers (each checked at the handshake) over the given rows.
    pub fn start(spec: Spec, train: Vec<Row>, eval: Vec<Row>) -> Result<Self> {
        if spec.workers == 0 || spec.workers > 256 {
            bail!("'task.workers' = {}: must be between 1 and 256", spec.workers);
        }
        let pool =
            Pool { spec, idle: Mutex::new(vec![]), freed: Condvar::new(), restarts_used: AtomicUsize::new(0), sandbox: OnceLock::new() };
        let mut hello = None;
        for _ in 0..pool.spec.workers {
            let (w, h) = pool.start()?;
            pool.idle.lock().unwrap_or_else(|e| e.into_inner()).push(w);
            hello = Some(h);
        }
        let hello = hello.context("no worker")?;
        if train.is_empty() {
            bail!("{}: the train split is empty", pool.program());
        }
        Ok(Self { pool, hello, train, eval })
    }

    /// Loads `data` (its last `held_out` rows the eval split unless `eval_data` is given) and
    /// starts the workers.
    pub fn load(spec: Spec, data: &std::path::Path, eval_data: Option<&std::path::Path>, held_out: usize) -> Result<Self> {
        let mut train = read_rows(data)?;
        let eval = match eval_data {
            Some(e) => read_rows(e)?,
            None if train.len() > held_out => train.split_off(train.len() - held_out),
            None => vec![],
        };
        Self::start(spec, train, eval)
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    fn row(&self, split: Split, item: usize) -> Result<&Row> {
        let rows = if split == Split::Train { &self.train } else { &self.eval };
        rows.get(item).with_context(|| format!("{}: item {item} is outside the {split:?} split ({} items)", self.hello.name, rows.len()))
    }

    fn observations(&self, reply: &serde_json::Map<String, Value>, what: &str) -> Result<Vec<String>> {
        let obs = reply.get("observations").and_then(|v| v.as_array()).with_context(|| {
            format!("{}: {what}: the reply has no 'observations' list: {}", self.pool.program(), Value::Object(reply.clone()))
        })?;
        if obs.len() != self.hello.agents {
            bail!("{}: {what}: {} observations for {} agents", self.pool.program(), obs.len(), self.hello.agents);
        }
        obs.iter()
            .enumerate()
            .map(|(i, o)| {
                o.as_str()
                    .map(String::from)
                    .with_context(|| format!("{}: {what}: observation {i} is not a string: {o}", self.pool.program()))
            })
            .collect()
    }
}

impl Env for External {
    fn name(&self) -> &str {
        &self.hello.name
    }
    fn num_agents(&self) -> usize {
        self.hello.agents
    }
    fn len(&self, split: Split) -> usize {
        if split == Split::Train {
            self.train.len()
        } else {
            self.eval.len()
        }
    }
    fn reset(&self, split: Split, item: usize) -> Result<Vec<String>> {
        let what = format!("item {item} ({split:?}), observe");
        let reply = self.pool.call(&json!({"op": "observe", "item": self.row(split, item)?}), &what)?;
        self.observations(&reply, &what)
    }
    fn step(&self, split: Split, item: usize, turn: usize, joint_actions: &[Vec<String>]) -> Result<Outcome> {
        check_step(self, split, item, turn, joint_actions)?;
        let what = format!("item {item} ({split:?}), turn {turn}");
        let msg = json!({"op": "step", "item": self.row(split, item)?, "turn": turn, "joint_actions": joint_actions});
        let reply = self.pool.call(&msg, &what)?;
        let reward = reply.get("reward").and_then(|v| v.as_f64()).filter(|r| r.is_finite());
        let Some(reward) = reward else {
            bail!(
                "{}: {what}: the reward must be a finite number, got {}",
                self.pool.program(),
                reply.get("reward").cloned().unwrap_or(Value::Null)
            )
        };
        let mut metrics = std::collections::BTreeMap::new();
        if let Some(m) = reply.get("metrics") {
            let m = m.as_object().with_context(|| format!("{}: {what}: 'metrics' must be an object of numbers", self.pool.program()))?;
            for (k, v) in m {
                match v.as_f64().filter(|x| x.is_finite()) {
                    Some(x) => {
                        metrics.insert(k.clone(), x);
                    }
                    None => bail!("{}: {what}: metric '{k}' must be a finite number, got {v}", self.pool.program()),
                }
            }
        }
        let done = reply.get("done").and_then(|v| v.as_bool()).unwrap_or(false);
        let next_observations = match reply.get("observations") {
            Some(_) => self.observations(&reply, &what)?,
            None if done => vec![String::new(); self.hello.agents],
            None => {
                bail!("{}: {what}: the reply has no 'observations' (each agent's next observation; or \"done\": true)", self.pool.program())
            }
        };
        Ok(Outcome { reward, next_observations, metrics, done })
    }
}
