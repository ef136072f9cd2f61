//! The training loop: roll out a buffer, update, log, evaluate, checkpoint — nanoGPT-plain.
//!
//! A run directory holds `config.toml` (the resolved config), `metrics.jsonl` (one line per
//! step, and one per evaluation), TensorBoard event files with the same scalars, `curves.png`, and `checkpoints/step-NNNNNN/` (written to a temporary name,
//! then renamed, so a kill never leaves half a checkpoint). Every random choice is a function of
//! (seed, step), so `resume` continues exactly as the uninterrupted run would have.

use crate::algos::{self, UpdateCtx, UpdateStats};
use crate::config::{Config, JointMode};
use crate::rollout::{rollout, Rollout, RolloutSpec};
use crate::team::{Agent, Critic, Team};
use anyhow::{bail, Context, Result};
use collm_envs::{Env, Split};
use collm_model::{checkpoint, loader, AdamW, SamplingParams};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Builds the task a config names (through the task registry, `collm_envs::tasks`); built-in
/// datasets are fetched with collm-model's pip fetcher.
pub fn make_env(cfg: &Config) -> Result<Box<dyn Env>> {
    collm_envs::tasks::build(&cfg.task, &|name| collm_model::fetch::fetch(name))
}

/// The signal (SIGINT, SIGTERM) that asked the run to stop, or 0. The binary's signal handler
/// sets it; [`Trainer::run`] finishes the step in progress, writes a checkpoint and returns
/// [`Interrupted`].
pub static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// A run stopped by a signal after a finished step, with its checkpoint written.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub step: usize,
    pub checkpoint: PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped by signal {} after step {}; checkpoint {}", self.signal, self.step, self.checkpoint.display())
    }
}

impl std::error::Error for Interrupted {}

fn stop_signal() -> Option<i32> {
    match STOP_SIGNAL.load(std::sync::atomic::Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

pub struct Trainer {
    pub cfg: Config,
    pub env: Box<dyn Env>,
    pub team: Team,
    pub out: PathBuf,
    /// Steps done so far.
    pub step: usize,
    /// TensorBoard event file of the run (None: metrics.jsonl only).
    pub tensorboard: Option<crate::tensorboard::EventWriter>,
    /// With `log_kl` or `kl_coef`: each agent's initial policy (the reference of the KL it logs
    /// and of the KL penalty).
    pub references: Vec<collm_model::Transformer>,
}

/// Whether a new run may start in `out`: yes if it holds no run, or a run that ended before its
/// first step (returns true: its files are to be replaced); an error naming what to do if it holds
/// a run with a checkpoint (resume it) or logged steps without one.
fn check_out_dir(out: &Path) -> Result<bool> {
    let metrics = out.join("metrics.jsonl");
    if !metrics.exists() {
        return Ok(false);
    }
    if latest_checkpoint(out)?.is_some() {
        bail!("{} already holds a run: resume it with --resume {}, or choose another --out", out.display(), out.display());
    }
    let text = std::fs::read_to_string(&metrics).with_context(|| format!("reading {}", metrics.display()))?;
    let steps = text.lines().filter(|l| l.contains("\"reward_mean\"")).count();
    if steps > 0 {
        bail!(
            "{} already holds a run with {steps} logged steps and no checkpoint to resume from: remove it, or choose another --out (checkpoint_every sets how often a run saves)",
            out.display()
        );
    }
    Ok(true)
}

/// The config keys `--resume` may change with `--set`.
pub const RESUMABLE_KEYS: [&str; 4] = ["steps", "eval_every", "eval_items", "checkpoint_every"];

/// The `--set`s that keep an older run's config meaning what it did: a run written before update
/// schedules existed took one step per buffer.
fn legacy_sets(saved: &toml::Table) -> Vec<String> {
    if saved.contains_key("schedule") {
        vec![]
    } else {
        vec!["schedule=\"buffer\"".to_string()]
    }
}

/// The TensorBoard prefix of a metrics line: eval lines and train lines.
fn tb_prefix(line: &Value) -> &'static str {
    if line.get("eval_reward_mean").is_some() {
        "eval"
    } else {
        "train"
    }
}

/// Every key of a TOML table, dotted, with its value.
fn flatten(prefix: &str, t: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
    for (k, v) in t {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            v => {
                out.insert(key, v.clone());
            }
        }
    }
}

/// Refuses a resume whose config differs from the one its checkpoint was trained with, on any key
/// but [`RESUMABLE_KEYS`] (an edited `config.toml` in the run used to continue silently, mixing
/// methods or settings in one run).
fn check_unchanged(cfg: &Config, path: &Path, ckpt: &Path) -> Result<()> {
    let saved_path = ckpt.join("config.toml");
    let state: Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer.json")).unwrap_or_default()).unwrap_or(Value::Null);
    if let Some(algo) = state["algo"].as_str() {
        if algo != cfg.algo.name() {
            bail!(
                "{}: 'algo' is \"{}\" but {} was trained with \"{algo}\"; a resumed run keeps its method (restore the file, or start a new run with --config)",
                path.display(),
                cfg.algo.name(),
                ckpt.display()
            );
        }
    }
    let Ok(saved) = std::fs::read_to_string(&saved_path) else { return Ok(()) };
    // Through the config's own parser, so keys added since the checkpoint was written take their
    // defaults on both sides.
    let old: toml::Table = toml::from_str(&saved).with_context(|| format!("{}: not valid TOML", saved_path.display()))?;
    let keep = legacy_sets(&old);
    let saved_cfg = Config::from_toml(&saved, &saved_path.display().to_string(), &keep)?;
    let saved: toml::Table = toml::from_str(&toml::to_string(&saved_cfg)?)?;
    let now: toml::Table = toml::from_str(&toml::to_string(cfg)?)?;
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &saved, &mut a);
    flatten("", &now, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let changed: Vec<String> = keys
        .into_iter()
        .filter(|k| !RESUMABLE_KEYS.contains(&k.as_str()) && a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&toml::Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "unset".into());
            format!("'{k}' = {} (checkpoint: {})", show(b.get(k)), show(a.get(k)))
        })
        .collect();
    if !changed.is_empty() {
        bail!(
            "{}: differs from the config {} was trained with: {}; restore it, or start a new run with --config (only {} may change on resume)",
            path.display(),
            ckpt.display(),
            changed.join(", "),
            RESUMABLE_KEYS.join(", ")
        );
    }
    Ok(())
}

/// Keeps the lines of a JSON-lines log up to `step` (the file may be absent); returns them.
fn truncate_jsonl(path: &Path, step: usize) -> Result<Vec<Value>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(vec![]) };
    let kept: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["step"].as_u64().is_some_and(|s| s as usize <= step))
        .collect();
    let body: String = kept.iter().map(|v| format!("{v}\n")).collect();
    // Atomically: a run killed while it resumes must not find the log emptied (a plain write
    // truncates the file first; a kill -9 there lost samples.jsonl's first 20 steps).
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(kept)
}

/// Copies of the agents' initial policies when the config logs or penalizes the KL to them.
fn references(cfg: &Config, team: &Team) -> Result<Vec<collm_model::Transformer>> {
    if !cfg.log_kl && cfg.kl_coef == 0.0 {
        return Ok(vec![]);
    }
    team.agents.iter().map(|p| p.model.deep_clone()).collect()
}

/// KL(π_i,T || π_i,ref,T) per agent, estimated on the rollout's own responses (drawn from π_i at
/// the sampling temperature T) as the mean over their tokens of log π_i,T(token) −
/// log π_ref,T(token), both distributions tempered by T as the samples were (T = 1 when sampling
/// is greedy).
/// `micro`: sequences per forward pass (0: all).
pub fn kl_to_reference(
    team: &Team,
    references: &[collm_model::Transformer],
    r: &Rollout,
    temperature: f64,
    micro: usize,
) -> Result<Vec<f64>> {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let mut out = vec![];
    for (i, (p, reference)) in team.agents.iter().zip(references).enumerate() {
        let seqs = r.agent_sequences(i);
        let (toks, spans) = crate::rollout::AgentSeq::batch(&seqs);
        let pad = p.tokenizer.pad_id();
        let (mut cur, mut refs) = (vec![], vec![]);
        for r in algos::fitted_batches(&algos::agent_lens(&seqs), micro, &p.model.cfg, false)? {
            let none = vec![vec![]; r.len()];
            let (tk, sp) = (&toks[r.clone()], &spans[r]);
            cur.extend(collm_model::score::score_spans_at(&p.model, tk, sp, &none, pad, t)?.token_logprobs.to_vec1::<f32>()?);
            refs.extend(collm_model::score::score_spans_at(reference, tk, sp, &none, pad, t)?.token_logprobs.to_vec1::<f32>()?);
        }
        let n = cur.len().max(1) as f64;
        out.push(cur.iter().zip(&refs).map(|(a, b)| (*a - *b) as f64).sum::<f64>() / n);
    }
    Ok(out)
}

/// Mean eval numbers.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalStats {
    pub episodes: usize,
    pub reward_mean: f64,
    pub reward_per_turn: Vec<f64>,
    /// The task's metrics (pass rate, IoU, ...) at the episodes' last turns, averaged.
    pub metrics: std::collections::BTreeMap<String, f64>,
}

impl EvalStats {
    /// The mean episode reward, the per-turn means and the task's metrics of eval rollouts.
    pub fn of(rollouts: &[(Vec<usize>, Rollout)]) -> Self {
        let count: usize = rollouts.iter().map(|(c, _)| c.len()).sum();
        let mut reward_sum = 0.0;
        // Per turn: the sum of the joint actions' rewards and their count, over every chunk.
        let mut per_turn: Vec<(f64, usize)> = vec![];
        let mut metrics: std::collections::BTreeMap<String, f64> = Default::default();
        for (chunk, r) in rollouts {
            reward_sum += r.mean_episode_reward() * chunk.len() as f64;
            for (t, (sum, n)) in r.reward_sums_per_turn().into_iter().enumerate() {
                if per_turn.len() <= t {
                    per_turn.resize(t + 1, (0.0, 0));
                }
                per_turn[t].0 += sum;
                per_turn[t].1 += n;
            }
            for (k, v) in r.final_metrics() {
                *metrics.entry(k).or_default() += v * chunk.len() as f64 / count as f64;
            }
        }
        // The mean over the joint actions executed at turn t (episodes that ended earlier do not count).
        let reward_per_turn = per_turn.iter().map(|&(s, n)| s / n.max(1) as f64).collect();
        EvalStats { episodes: count, reward_mean: reward_sum / count.max(1) as f64, reward_per_turn, metrics }
    }
}

/// The sampling parameters of a config, greedy or not.
pub fn sampling_params(cfg: &Config, greedy: bool) -> SamplingParams {
    let s = &cfg.sampling;
    SamplingParams { max_new_tokens: s.max_new_tokens, temperature: s.temperature, top_p: s.top_p, top_k: s.top_k, greedy }
}

/// How many episodes `items` asks of a split: all of them when 0, else at most the split's size.
pub fn episode_count(env: &dyn Env, split: Split, items: usize) -> usize {
    let n = env.len(split);
    if items == 0 {
        n
    } else {
        items.min(n)
    }
}

/// Eval episodes over `items` items of a split (all when 0), one sample per agent and turn,
/// greedy or sampled, in chunks of 4 buffers; each chunk samples with its own random streams,
/// seeded by the run's seed, the checkpoint's step and the chunk. `collm eval` (through
/// [`Trainer::evaluate`]) and `collm run` share it, so they give the same episodes. `progress`,
/// when given, ticks once per episode as each chunk finishes.
#[allow(clippy::too_many_arguments)]
pub fn eval_rollouts(
    team: &Team,
    env: &dyn Env,
    cfg: &Config,
    step: usize,
    split: Split,
    items: usize,
    greedy: bool,
    progress: Option<&crate::progress::Progress>,
) -> Result<Vec<(Vec<usize>, Rollout)>> {
    if env.len(split) == 0 {
        bail!("{}: the {split:?} split is empty", env.name());
    }
    let count = episode_count(env, split, items);
    let ids: Vec<usize> = (0..count).collect();
    let mut out = vec![];
    for chunk in ids.chunks(cfg.buffer.max(1) * 4) {
        let spec = RolloutSpec {
            split,
            items: chunk,
            turns: cfg.task.turns,
            k: 1,
            joint_mode: JointMode::Aligned,
            history_cache: cfg.history_cache,
            agent_input: cfg.agent_input,
            sampling: sampling_params(cfg, greedy),
            early_termination: cfg.early_termination,
            // A stream follows an episode's place in its chunk, so each chunk needs its own.
            seed: mix(mix(cfg.seed ^ 0xe7a1, step as u64), chunk[0] as u64),
        };
        let r = rollout(team, env, &spec)?;
        if let Some(p) = progress {
            let mean = r.mean_episode_reward();
            for (k, &item) in chunk.iter().enumerate() {
                let line = if k + 1 == chunk.len() {
                    format!("episodes {}/{count}: mean return {mean:.4} over the last {}", item + 1, chunk.len())
                } else {
                    String::new()
                };
                p.tick(&format!("mean return {mean:.4}"), &line);
            }
        }
        out.push((chunk.to_vec(), r));
    }
    Ok(out)
}

/// An episode of a rollout as each turn's observations, responses, reward and metrics (its
/// first joint action at each node: with K = 1, the episode).
pub fn episode_turns(r: &Rollout, root: usize) -> Vec<Value> {
    let mut turns = vec![];
    let mut x = Some(root);
    while let Some(n) = x {
        let nd = &r.nodes[n];
        let Some(j) = nd.joints.first() else { break };
        let responses: Vec<&str> = j.choice.iter().enumerate().map(|(i, &k)| nd.responses[i][k].text.as_str()).collect();
        turns.push(
            json!({"turn": nd.turn, "observations": nd.observations, "responses": responses, "reward": j.reward, "metrics": j.metrics}),
        );
        x = j.child;
    }
    turns
}

/// A checkpoint directory (holding trainer.json), or a run directory's latest checkpoint.
pub fn checkpoint_dir(path: &Path) -> Result<PathBuf> {
    if path.join("trainer.json").exists() {
        return Ok(path.to_path_buf());
    }
    latest_checkpoint(path)?
        .with_context(|| format!("{}: no checkpoint found (give a run directory or one of its checkpoints/step-N)", path.display()))
}

fn mix(a: u64, b: u64) -> u64 {
    let mut x = a.wrapping_add(b.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x.wrapping_mul(0x94D0_49BB_1331_11EB) ^ (x >> 31)
}

impl Trainer {
    /// A new run in `out` (created; an existing run there is an error unless it is empty).
    pub fn new(cfg: Config, out: &Path) -> Result<Self> {
        let fresh_start = check_out_dir(out)?;
        // Everything that can fail on the config comes before the run directory is written, so a
        // bad config leaves nothing behind.
        let env = make_env(&cfg)?;
        let mut team = Team::load(&cfg, env.num_agents())?;
        if let Some(dir) = &cfg.init {
            init_from(&mut team, dir).with_context(|| format!("'init': starting from {}", dir.display()))?;
        }
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        if fresh_start {
            // A run that ended before its first step: its files go, the new run takes the place.
            for e in std::fs::read_dir(out)?.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("events.out.tfevents") || name == "samples.jsonl" {
                    std::fs::remove_file(e.path())?;
                }
            }
        }
        std::fs::write(out.join("config.toml"), toml::to_string(&cfg)?)?;
        std::fs::write(out.join("metrics.jsonl"), "")?;
        let tensorboard = Some(crate::tensorboard::EventWriter::create(out)?);
        let references = references(&cfg, &team)?;
        Ok(Self { cfg, env, team, out: out.to_path_buf(), step: 0, tensorboard, references })
    }

    /// Continues the run in `out` from its latest checkpoint (metrics after it are dropped).
    pub fn resume(out: &Path) -> Result<Self> {
        Self::resume_with(out, &[])
    }

    /// [`Trainer::resume`] with `--set` overrides, which may change only [`RESUMABLE_KEYS`]
    /// (how long the run goes on, how often it evaluates and saves): anything else would make the
    /// rest of the run a different experiment from the one its checkpoint continues. The run's
    /// `config.toml` must agree with the one saved in the checkpoint on every other key.
    pub fn resume_with(out: &Path, overrides: &[String]) -> Result<Self> {
        let path = out.join("config.toml");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading config {}", path.display()))?;
        let ckpt = latest_checkpoint(out)?.with_context(|| format!("{}: no checkpoint to resume from", out.display()))?;
        for o in overrides {
            let key = o.split_once('=').map(|(k, _)| k.trim()).unwrap_or(o.as_str());
            if !RESUMABLE_KEYS.contains(&key) {
                bail!(
                    "--set {o}: '{key}' cannot change when a run resumes (the rest of the run would be another experiment); only {} can — start a new run with --config for anything else",
                    RESUMABLE_KEYS.join(", ")
                );
            }
        }
        let old: toml::Table = toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
        let mut sets = legacy_sets(&old);
        sets.extend(overrides.iter().cloned());
        let cfg = Config::from_toml(&text, &path.display().to_string(), &sets)?;
        check_unchanged(&cfg, &path, &ckpt)?;
        let env = make_env(&cfg)?;
        let mut team = Team::load(&cfg, env.num_agents())?;
        // The KL references are the policies the run started from: with `init`, the trained team.
        if let Some(dir) = &cfg.init {
            init_from(&mut team, dir).with_context(|| format!("'init': starting from {}", dir.display()))?;
        }
        let references = references(&cfg, &team)?;
        let step = load_checkpoint(&mut team, &ckpt)?;
        if step > cfg.steps {
            bail!("{}: 'steps' = {} is before the checkpoint's step {step}", path.display(), cfg.steps);
        }
        if !overrides.is_empty() {
            std::fs::write(&path, toml::to_string(&cfg)?).with_context(|| format!("writing {}", path.display()))?;
        }
        // Keep the metrics and samples up to the checkpoint's step, and one TensorBoard file
        // holding exactly those metrics (a resume used to add a file whose steps overlapped).
        let kept = truncate_jsonl(&out.join("metrics.jsonl"), step)?;
        truncate_jsonl(&out.join("samples.jsonl"), step)?;
        for e in std::fs::read_dir(out)?.flatten() {
            if e.file_name().to_string_lossy().starts_with("events.out.tfevents") {
                std::fs::remove_file(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
            }
        }
        let tensorboard = crate::tensorboard::EventWriter::create(out)?;
        for line in &kept {
            tensorboard.scalars(line["step"].as_u64().unwrap_or(0), tb_prefix(line), line)?;
        }
        Ok(Self { cfg, env, team, out: out.to_path_buf(), step, tensorboard: Some(tensorboard), references })
    }

    fn sampling(&self, greedy: bool) -> SamplingParams {
        sampling_params(&self.cfg, greedy)
    }

    /// The train items of step `step`: a seeded permutation per epoch, read in order.
    pub fn items_for_step(&self, step: usize) -> Vec<usize> {
        let n = self.env.len(Split::Train);
        let b = self.cfg.buffer;
        (step * b..(step + 1) * b)
            .map(|g| {
                let (epoch, pos) = (g / n, g % n);
                let mut perm: Vec<usize> = (0..n).collect();
                let mut rng = StdRng::seed_from_u64(mix(self.cfg.seed, epoch as u64));
                for i in (1..n).rev() {
                    perm.swap(i, rng.random_range(0..=i));
                }
                perm[pos]
            })
            .collect()
    }

    /// The rollout of step `step` (no update).
    pub fn rollout_for_step(&self, step: usize) -> Result<Rollout> {
        let items = self.items_for_step(step);
        let spec = RolloutSpec {
            split: Split::Train,
            items: &items,
            turns: self.cfg.task.turns,
            k: self.cfg.samples_per_node(),
            joint_mode: self.cfg.joint_mode,
            history_cache: self.cfg.history_cache,
            agent_input: self.cfg.agent_input,
            sampling: self.sampling(false),
            early_termination: self.cfg.early_termination,
            seed: mix(self.cfg.seed, 1 + step as u64),
        };
        rollout(&self.team, self.env.as_ref(), &spec)
    }

    pub fn update(&mut self, r: &Rollout) -> Result<UpdateStats> {
        let penalty = self.kl_penalties(r)?;
        // During the critic warm-up the actors keep their weights.
        let ctx = UpdateCtx {
            actors: self.step >= self.cfg.critic.warmup,
            seed: mix(self.cfg.seed ^ 0x5ced, self.step as u64),
            penalty: &penalty,
        };
        let mut stats = algos::algorithm(self.cfg.algo).update(&mut self.team, r, &self.cfg, ctx)?;
        if !penalty.is_empty() {
            let all: Vec<f64> = penalty.iter().flat_map(|m| m.values().copied()).collect();
            stats.kl_penalty = Some(all.iter().sum::<f64>() / all.len().max(1) as f64);
        }
        Ok(stats)
    }

    /// With `kl_coef`: each agent's reference-KL penalty of every response (before any step, so
    /// the policy is the one that sampled them).
    fn kl_penalties(&self, r: &Rollout) -> Result<Vec<BTreeMap<crate::rollout::ResponseId, f64>>> {
        if self.cfg.kl_coef == 0.0 {
            return Ok(vec![]);
        }
        (0..self.team.agents.len())
            .map(|i| {
                let pad = self.team.agents[i].tokenizer.pad_id();
                let Some(reference) = self.references.get(i) else {
                    bail!("'kl_coef' = {}: agent {i} has no reference policy (the trainer was built without one)", self.cfg.kl_coef)
                };
                algos::kl_penalties(r, i, reference, pad, self.cfg.kl_coef, self.cfg.micro_batch)
            })
            .collect()
    }

    /// The team's models: agents, critics and reference policies.
    fn models(&self) -> impl Iterator<Item = &collm_model::Transformer> {
        let team = self.team.agents.iter().map(|a| &a.model).chain(self.team.critics.iter().map(|c| &c.model));
        team.chain(self.references.iter())
    }

    /// The FLOPs the team's models have done so far.
    fn model_flops(&self) -> u64 {
        self.models().map(|m| m.flops.total()).sum()
    }

    /// The weight bytes the team's models' passes without a graph have read so far
    /// (`Transformer::weight_reads`).
    fn model_weight_reads(&self) -> u64 {
        self.models().map(|m| m.weight_reads.total()).sum()
    }

    /// The FLOPs and weight bytes of the team's models' small passes so far
    /// (`Transformer::small_passes`).
    fn model_small_passes(&self) -> (u64, u64) {
        self.models().fold((0, 0), |(f, b), m| (f + m.small_passes.flops.total(), b + m.small_passes.weight_reads.total()))
    }

    /// One training step; returns its metrics line.
    pub fn train_step(&mut self) -> Result<Value> {
        let t0 = Instant::now();
        let step = self.step;
        let (f0, b0, s0) = (self.model_flops(), self.model_weight_reads(), self.model_small_passes());
        let r = self.rollout_for_step(step)?;
        let (gen_flops, gen_reads) = (self.model_flops() - f0, self.model_weight_reads() - b0);
        let s1 = self.model_small_passes();
        let (gen_small_flops, gen_small_reads) = (s1.0 - s0.0, s1.1 - s0.1);
        self.log_sample(step + 1, &r)?;
        let kl = if !self.cfg.log_kl {
            None
        } else {
            Some(kl_to_reference(&self.team, &self.references, &r, self.cfg.sampling.temperature, self.cfg.micro_batch)?)
        };
        let (t1, f1) = (Instant::now(), self.model_flops());
        let stats = collm_model::on_pool(|| self.update(&r)).with_context(|| format!("update at step {}", step + 1))?;
        let update_s = t1.elapsed().as_secs_f64();
        let update_flops = self.model_flops() - f1;
        self.step += 1;
        let step_s = t0.elapsed().as_secs_f64();
        Ok(json!({
            "step": self.step,
            "reward_mean": r.mean_episode_reward(),
            "reward_per_turn": r.mean_reward_per_turn(),
            "metrics": r.final_metrics(),
            "return_mean": mean_root_return(&r, self.cfg.gamma),
            "policy_loss": stats.policy_loss,
            "grad_norm": stats.grad_norm,
            "value_loss": stats.value_loss,
            "value_mean": stats.value_mean,
            "target_mean": stats.target_mean,
            "advantage_mean": stats.advantage_mean,
            "kl_penalty": stats.kl_penalty,
            "agent_steps": stats.agent_steps,
            "critic_steps": stats.critic_steps,
            "kl": kl,
            "env_steps": r.nodes.iter().map(|n| n.joints.len()).sum::<usize>(),
            "generated_tokens": r.generated_tokens,
            "tokens_per_s": r.generated_tokens as f64 / r.gen_s.max(1e-9),
            "gen_s": r.gen_s,
            "update_s": update_s,
            "step_s": step_s,
            // The model arithmetic of each phase (collm_model::flops: real tokens, no padding).
            "gen_gflop": gen_flops as f64 / 1e9,
            "update_gflop": update_flops as f64 / 1e9,
            // The weight bytes generation's passes read at the least (decode is bound by them).
            "gen_weight_gb": gen_reads as f64 / 1e9,
            // Their part from small passes (decode steps: bound by the weight reads), the rest
            // from larger ones (prefill: bound by the arithmetic).
            "gen_small_pass_gflop": gen_small_flops as f64 / 1e9,
            "gen_small_pass_weight_gb": gen_small_reads as f64 / 1e9,
        }))
    }

    /// The eval rollouts over `items` episodes of a split (all when 0), greedy or sampled (see
    /// [`eval_rollouts`]).
    pub fn eval_rollouts(&self, split: Split, items: usize, greedy: bool) -> Result<Vec<(Vec<usize>, Rollout)>> {
        eval_rollouts(&self.team, self.env.as_ref(), &self.cfg, self.step, split, items, greedy, None)
    }

    /// Mean reward on `items` episodes of a split (all when 0), greedy or sampled.
    pub fn evaluate(&self, split: Split, items: usize, greedy: bool) -> Result<EvalStats> {
        Ok(EvalStats::of(&self.eval_rollouts(split, items, greedy)?))
    }

    /// Appends the rollout's first episode (each turn's observations, responses and reward) to
    /// samples.jsonl, so what the agents actually say can be read as training goes.
    fn log_sample(&self, step: usize, r: &Rollout) -> Result<()> {
        let Some(&root) = r.roots.first() else { return Ok(()) };
        let turns = episode_turns(r, root);
        let path = self.out.join("samples.jsonl");
        let mut f =
            std::fs::OpenOptions::new().append(true).create(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{}", json!({"step": step, "item": r.nodes[root].item, "turns": turns}))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Appends a metrics line to metrics.jsonl (and the TensorBoard events).
    pub fn log(&self, line: &Value) -> Result<()> {
        let path = self.out.join("metrics.jsonl");
        let mut f =
            std::fs::OpenOptions::new().append(true).create(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))?;
        if let Some(tb) = &self.tensorboard {
            tb.scalars(line["step"].as_u64().unwrap_or(0), tb_prefix(line), line)?;
        }
        Ok(())
    }

    /// Trains to `cfg.steps`, with evaluation and checkpoints as configured. `progress` prints a
    /// line per step with the ETA on stderr.
    pub fn run(&mut self, progress: bool) -> Result<Vec<Value>> {
        let mut lines = vec![];
        let t0 = Instant::now();
        let start = self.step;
        let bar = progress.then(|| crate::progress::Progress::new(self.cfg.steps as u64, start as u64, "step"));
        if self.step == 0 && self.cfg.eval_every > 0 {
            self.eval_and_log(bar.as_ref())?;
        }
        while self.step < self.cfg.steps {
            let line = self.train_step()?;
            self.log(&line)?;
            if let Some(bar) = &bar {
                let done = self.step - start;
                let per = t0.elapsed().as_secs_f64() / done as f64;
                let eta = per * (self.cfg.steps - self.step) as f64;
                let reward = line["reward_mean"].as_f64().unwrap_or(f64::NAN);
                let value_loss = line["value_loss"].as_f64().map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
                bar.tick(
                    &format!("reward {reward:.4}, value loss {value_loss}"),
                    &format!(
                        "step {:>4}/{} reward {reward:.4} policy loss {:?} value loss {value_loss} | {per:.1} s/step, {:.0} tok/s, ETA {eta:.0} s",
                        self.step,
                        self.cfg.steps,
                        line["policy_loss"]
                            .as_array()
                            .map(|a| a.iter().map(|x| (x.as_f64().unwrap_or(0.0) * 1e4).round() / 1e4).collect::<Vec<_>>())
                            .unwrap_or_default(),
                        line["tokens_per_s"].as_f64().unwrap_or(0.0),
                    ),
                );
            }
            lines.push(line);
            if self.cfg.eval_every > 0 && self.step % self.cfg.eval_every == 0 {
                self.eval_and_log(bar.as_ref())?;
            }
            let mut saved = None;
            if self.cfg.checkpoint_every > 0 && (self.step % self.cfg.checkpoint_every == 0 || self.step == self.cfg.steps) {
                saved = Some(save_checkpoint(&self.team, &self.cfg, self.step, &self.out)?);
            }
            if let Some(signal) = stop_signal() {
                let checkpoint = match saved {
                    Some(p) => p,
                    None => save_checkpoint(&self.team, &self.cfg, self.step, &self.out)?,
                };
                self.plot()?;
                return Err(Interrupted { signal, step: self.step, checkpoint }.into());
            }
        }
        self.plot()?;
        if let Some(b) = &bar {
            b.finish();
        }
        Ok(lines)
    }

    /// Writes `curves.png`: the train reward per step (raw and smoothed) and the eval reward.
    pub fn plot(&self) -> Result<()> {
        let text = std::fs::read_to_string(self.out.join("metrics.jsonl")).unwrap_or_default();
        let lines: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let pick = |key: &str| -> Vec<(f64, f64)> { lines.iter().filter_map(|l| Some((l["step"].as_f64()?, l[key].as_f64()?))).collect() };
        let train = pick("reward_mean");
        let mut series =
            vec![("train reward".to_string(), train.clone()), ("train reward (mean of 10)".to_string(), crate::plot::smooth(&train, 10))];
        let eval = pick("eval_reward_mean");
        if !eval.is_empty() {
            series.push(("eval reward".to_string(), eval));
        }
        let mut panels =
            vec![crate::plot::Panel { title: format!("{} on {}", self.cfg.algo.name(), self.env.name()), x_label: "step".into(), series }];
        let vl = pick("value_loss");
        if !vl.is_empty() {
            panels.push(crate::plot::Panel { title: "value loss".into(), x_label: "step".into(), series: vec![("value loss".into(), vl)] });
        }
        crate::plot::panels(&panels, &self.out.join("curves.png"))
    }

    fn eval_and_log(&self, progress: Option<&crate::progress::Progress>) -> Result<()> {
        let e = self.evaluate(Split::Eval, self.cfg.eval_items, self.cfg.eval_greedy)?;
        if let Some(p) = progress {
            p.println(&format!("eval at step {}: reward {:.4} over {} episodes", self.step, e.reward_mean, e.episodes));
        }
        self.log(&json!({"step": self.step, "eval_reward_mean": e.reward_mean, "eval_reward_per_turn": e.reward_per_turn, "eval_episodes": e.episodes, "eval_metrics": e.metrics}))
    }
}

fn mean_root_return(r: &Rollout, gamma: f64) -> f64 {
    let rets = algos::magrpo::joint_returns(r, gamma);
    let v: Vec<f64> = r.roots.iter().flat_map(|&x| rets[x].clone()).collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

// ---------------------------------------------------------------------------------------------
// Checkpoints.

fn save_opt(opt: &AdamW, path: &Path) -> Result<()> {
    loader::write_safetensors(&opt.state_tensors()?, path)
}

/// Restores an optimizer from its file and its entry in trainer.json (`adam_t`, and `adam_steps`:
/// each parameter's step count; checkpoints without it give every parameter `adam_t`). A missing
/// or unreadable file is an error, and so is one without moments when trainer.json says the
/// optimizer has stepped (a truncated file used to restart AdamW silently).
fn load_opt(opt: &mut AdamW, path: &Path, entry: &Value) -> Result<()> {
    if !path.exists() {
        bail!("{}: missing (a checkpoint holds every optimizer's state)", path.display());
    }
    let tensors = loader::read_safetensors(path)?;
    let t = entry["adam_t"].as_u64().unwrap_or(0);
    if t > 0 && tensors.is_empty() {
        bail!("{}: holds no optimizer moments, but trainer.json says the optimizer took {t} steps (a damaged checkpoint?)", path.display());
    }
    let steps: BTreeMap<String, u64> = match entry.get("adam_steps") {
        Some(v) => serde_json::from_value(v.clone()).with_context(|| format!("{}: bad 'adam_steps' in trainer.json", path.display()))?,
        None => BTreeMap::new(),
    };
    opt.load_state_tensors(t, &steps, &tensors).with_context(|| format!("{}", path.display()))
}

fn save_agent(p: &Agent, dir: &Path) -> Result<Value> {
    checkpoint::save(&p.model, dir, p.model.lora.is_some())?;
    save_opt(&p.opt, &dir.join("optimizer.safetensors"))?;
    if let Some(h) = &p.head {
        loader::write_safetensors(&h.tensors(), &dir.join("value_head.safetensors"))?;
    }
    Ok(json!({"adam_t": p.opt.t, "adam_steps": p.opt.param_steps()}))
}

fn save_critic(c: &Critic, dir: &Path) -> Result<Value> {
    checkpoint::save(&c.model, dir, c.model.lora.is_some())?;
    save_opt(&c.opt, &dir.join("optimizer.safetensors"))?;
    loader::write_safetensors(&c.head.tensors(), &dir.join("value_head.safetensors"))?;
    Ok(json!({"adam_t": c.opt.t, "adam_steps": c.opt.param_steps()}))
}

/// Loads a value head's saved weights into its parameters.
pub fn load_head(params: &BTreeMap<String, collm_model::model::Param>, path: &Path) -> Result<()> {
    let t = loader::read_safetensors(path)?;
    for (n, p) in params {
        let v = t.get(n).with_context(|| format!("{}: missing tensor '{n}'", path.display()))?;
        p.var.set(v)?;
    }
    Ok(())
}

/// Writes `out/checkpoints/step-NNNNNN` atomically (a temporary directory, then a rename). A
/// failed write (a full disk) removes the temporary directory and leaves earlier checkpoints as
/// they were.
pub fn save_checkpoint(team: &Team, cfg: &Config, step: usize, out: &Path) -> Result<PathBuf> {
    let root = out.join("checkpoints");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let fin = root.join(format!("step-{step:06}"));
    let tmp = root.join(format!(".tmp-step-{step:06}"));
    let _ = std::fs::remove_dir_all(&tmp);
    let write = || -> Result<()> {
        let mut agents = vec![];
        for (i, p) in team.agents.iter().enumerate() {
            agents.push(save_agent(p, &tmp.join(format!("agent_{i}")))?);
        }
        let mut critics = vec![];
        for (j, c) in team.critics.iter().enumerate() {
            critics.push(save_critic(c, &tmp.join(format!("critic_{j}")))?);
        }
        let state = json!({"step": step, "algo": cfg.algo.name(), "agents": agents, "critics": critics});
        std::fs::write(tmp.join("trainer.json"), serde_json::to_string_pretty(&state)?)?;
        std::fs::write(tmp.join("config.toml"), toml::to_string(cfg)?)?;
        let _ = std::fs::remove_dir_all(&fin);
        std::fs::rename(&tmp, &fin).with_context(|| format!("renaming {} to {}", tmp.display(), fin.display()))?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        let kept = latest_checkpoint(out).ok().flatten().map(|p| format!("; the latest complete checkpoint is {}", p.display()));
        return Err(e.context(format!("writing checkpoint {}{}", fin.display(), kept.unwrap_or_default())));
    }
    Ok(fin)
}

/// The newest complete checkpoint of a run.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    let root = out.join("checkpoints");
    if !root.exists() {
        return Ok(None);
    }
    let mut best: Option<(usize, PathBuf)> = None;
    for e in std::fs::read_dir(&root)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(s) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) {
            if p.join("trainer.json").exists() && best.as_ref().is_none_or(|b| s > b.0) {
                best = Some((s, p));
            }
        }
    }
    Ok(best.map(|b| b.1))
}

/// Starts a team from a trained one's checkpoint (the config key `init`): agent i takes `agent_i`'s
/// weights, each critic's backbone an agent's (DC: its own agent's, CC: agent 0's). Value heads
/// and optimizer state stay fresh.
pub fn init_from(team: &mut Team, dir: &Path) -> Result<()> {
    for (i, p) in team.agents.iter_mut().enumerate() {
        checkpoint::load_into(&mut p.model, &dir.join(format!("agent_{i}")))?;
    }
    let n = team.agents.len();
    for (j, c) in team.critics.iter_mut().enumerate() {
        checkpoint::load_into(&mut c.model, &dir.join(format!("agent_{}", j.min(n - 1))))?;
    }
    Ok(())
}

/// Loads a checkpoint into a team built from the same config; returns its step.
/// A checkpoint's trainer.json.
pub fn trainer_state(dir: &Path) -> Result<Value> {
    serde_json::from_str(
        &std::fs::read_to_string(dir.join("trainer.json")).with_context(|| format!("reading {}/trainer.json", dir.display()))?,
    )
    .with_context(|| format!("{}/trainer.json: not JSON", dir.display()))
}

pub fn load_checkpoint(team: &mut Team, dir: &Path) -> Result<usize> {
    let state = trainer_state(dir)?;
    let step = state["step"].as_u64().with_context(|| format!("{}/trainer.json: no 'step'", dir.display()))? as usize;
    for (i, p) in team.agents.iter_mut().enumerate() {
        let d = dir.join(format!("agent_{i}"));
        checkpoint::load_into(&mut p.model, &d)?;
        load_opt(&mut p.opt, &d.join("optimizer.safetensors"), &state["agents"][i])?;
        if let Some(h) = &p.head {
            load_head(&h.params, &d.join("value_head.safetensors"))?;
        }
    }
    for (j, c) in team.critics.iter_mut().enumerate() {
        let d = dir.join(format!("critic_{j}"));
        checkpoint::load_into(&mut c.model, &d)?;
        load_opt(&mut c.opt, &d.join("optimizer.safetensors"), &state["critics"][j])?;
        load_head(&c.head.params, &d.join("value_head.safetensors"))?;
    }
    Ok(step)
}
