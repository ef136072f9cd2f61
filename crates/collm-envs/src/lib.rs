//! collm-envs: the tasks a team of agents acts in. An [`Env`] gives each agent its first
//! observation for a dataset item, and turns a joint action (one response per agent) into one
//! shared reward and each agent's next observation (the external transition between turns).
//!
//! Envs are stateless: everything a step needs (the item, the turn, the joint actions so far) is
//! passed in, so a rollout can branch a node into K children (MAGRPO's tree) without copying state.

pub mod coding;
pub mod dataset;
pub mod external;
pub mod minecraft;
pub mod sandbox;
pub mod summary;
pub mod synthetic;
pub mod tasks;
pub mod writing;

use anyhow::{bail, Result};

/// A reward with the points each level added (levels after a failed one are absent).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Scored {
    pub reward: f64,
    pub levels: std::collections::BTreeMap<String, f64>,
    /// The level that failed, if one did.
    pub stopped_at: Option<String>,
}

/// The reward shift the paper uses for a task (coding −4, StrBuild −2, HouseBuild −1, else 0),
/// from the task registry: the default of `task.reward_shift` and of `collm reward --reward-shift`.
pub fn paper_reward_shift(task: &str) -> f64 {
    tasks::find(task).map(|t| t.reward_shift).unwrap_or(0.0)
}

/// A default data path such as `../shared/data/...` is relative to the repository root; when it
/// does not exist from the current directory, the directories above are tried (so tests and
/// tools run from a crate directory find it too). Other paths are returned as they are.
pub fn resolve_data_path(path: &std::path::Path) -> std::path::PathBuf {
    if path.exists() || path.is_absolute() {
        return path.to_path_buf();
    }
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors().skip(1) {
            let p = dir.join(path);
            if p.exists() {
                return p;
            }
        }
    }
    path.to_path_buf()
}

/// Which part of the task's data an episode draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Eval,
}

/// What a joint action at one turn leads to.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The shared reward r_t.
    pub reward: f64,
    /// Each agent's next observation (the text appended to its history before the next turn).
    pub next_observations: Vec<String>,
    /// Task metrics of this joint action beyond the reward (pass rate, IoU, ...), averaged over
    /// episodes' last turns by `collm eval`.
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// The episode ends after this joint action, before `task.turns` (external tasks say so).
    pub done: bool,
}

impl Outcome {
    pub fn new(reward: f64, next_observations: Vec<String>) -> Self {
        Self { reward, next_observations, metrics: Default::default(), done: false }
    }

    pub fn with_metric(mut self, name: &str, value: f64) -> Self {
        self.metrics.insert(name.to_string(), value);
        self
    }

    pub fn with_metrics<K: Into<String>>(mut self, metrics: impl IntoIterator<Item = (K, f64)>) -> Self {
        self.metrics.extend(metrics.into_iter().map(|(k, v)| (k.into(), v)));
        self
    }
}

pub trait Env: Send + Sync {
    fn name(&self) -> &str;
    fn num_agents(&self) -> usize;
    /// Number of items in a split.
    fn len(&self, split: Split) -> usize;
    /// Each agent's first observation for `item`.
    fn reset(&self, split: Split, item: usize) -> Result<Vec<String>>;
    /// The outcome of the joint action `joint_actions.last()` at `turn` (0-based); earlier entries
    /// are the joint actions of the turns before it on this branch of the episode.
    fn step(&self, split: Split, item: usize, turn: usize, joint_actions: &[Vec<String>]) -> Result<Outcome>;
}

/// Checks the shape of a step's input, so every env reports the same clear error.
pub fn check_step(env: &dyn Env, split: Split, item: usize, turn: usize, joint_actions: &[Vec<String>]) -> Result<()> {
    if item >= env.len(split) {
        bail!("{}: item {item} is outside the {split:?} split ({} items)", env.name(), env.len(split));
    }
    if joint_actions.len() != turn + 1 {
        bail!("{}: turn {turn} needs {} joint actions, got {}", env.name(), turn + 1, joint_actions.len());
    }
    if let Some(a) = joint_actions.iter().find(|a| a.len() != env.num_agents()) {
        bail!("{}: a joint action has {} responses for {} agents", env.name(), a.len(), env.num_agents());
    }
    Ok(())
}

/// A task's texts (prompts, posts, abstracts), split into train and eval.
#[derive(Clone, Debug, Default)]
pub struct Texts {
    pub train: Vec<String>,
    pub eval: Vec<String>,
}

impl Texts {
    /// From a data file (JSON list or JSONL, the text in `field`) with its eval split from
    /// `eval_data` or, without one, the file's last two rows; with no file, the built-in texts,
    /// the last `builtin_eval` of them held out.
    pub fn load(
        data: Option<&std::path::Path>,
        eval_data: Option<&std::path::Path>,
        field: &str,
        builtin: &[&str],
        builtin_eval: usize,
    ) -> Result<Self> {
        let Some(p) = data else {
            let all: Vec<String> = builtin.iter().map(|s| s.to_string()).collect();
            let cut = all.len().saturating_sub(builtin_eval);
            return Ok(Self { train: all[..cut].to_vec(), eval: all[cut..].to_vec() });
        };
        let mut train = summary::read_texts(p, field)?;
        let eval = match eval_data {
            Some(e) => summary::read_texts(e, field)?,
            None if train.len() > 2 => train.split_off(train.len() - 2),
            None => vec![],
        };
        Ok(Self { train, eval })
    }

    pub fn len(&self, split: Split) -> usize {
        self.split(split).len()
    }

    fn split(&self, split: Split) -> &Vec<String> {
        match split {
            Split::Train => &self.train,
            Split::Eval => &self.eval,
        }
    }

    /// Item `item` of a split; `task` names the task in the error.
    pub fn get(&self, task: &str, split: Split, item: usize) -> Result<&str> {
        let v = self.split(split);
        match v.get(item) {
            Some(t) => Ok(t),
            None => bail!("{task}: item {item} is outside the {split:?} split ({} items)", v.len()),
        }
    }
}
