//! The experiment config: one TOML file per experiment, `--set key=value` overrides, validated
//! with errors that name the key.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::returns::AdvantageMode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    /// CoLLM-CC: one centralized critic over the joint history.
    Cc,
    /// CoLLM-DC: a critic per agent over its own history.
    Dc,
    /// MAGRPO: K samples per agent per node, group-relative advantages.
    Magrpo,
    /// GRPO: MAGRPO with one agent.
    Grpo,
    /// MA-REINFORCE: MAGRPO's tree with raw returns.
    Reinforce,
    /// MA-RLOO: leave-one-out baseline.
    Rloo,
    /// MA-ReMax: max baseline.
    Remax,
}

impl Algo {
    pub fn is_actor_critic(self) -> bool {
        matches!(self, Algo::Cc | Algo::Dc)
    }
    pub fn name(self) -> &'static str {
        match self {
            Algo::Cc => "cc",
            Algo::Dc => "dc",
            Algo::Magrpo => "magrpo",
            Algo::Grpo => "grpo",
            Algo::Reinforce => "reinforce",
            Algo::Rloo => "rloo",
            Algo::Remax => "remax",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HistoryCache {
    /// Each agent keeps its history's KV cache across turns (a turn encodes only its new tokens).
    Kv,
    /// Every turn re-encodes the whole history (as CoMLRL does).
    Text,
}

/// What an agent reads at a turn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentInput {
    /// Its whole history h_i,t: every observation and response so far, one conversation.
    #[default]
    History,
    /// The turn's observation alone, formatted as a first message (CoMLRL 1.3.6: the task's
    /// transition writes what the agent should know of earlier turns into the observation). The
    /// critics read the turn's observations too, not the episode so far.
    Observation,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptFormat {
    /// Observations are fed to the model as they are.
    Raw,
    /// Observations become user messages rendered with the model's chat template.
    Chat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CriticKind {
    /// V(h_t).
    V,
    /// Q(h_t, a_t).
    Q,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DcCritic {
    /// A separate critic model per agent.
    Separate,
    /// A value head on each actor's backbone, trained jointly with the clipped value loss.
    Head,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JointMode {
    /// The k-th samples of every agent form the k-th joint action (K joint actions).
    Aligned,
    /// Every combination of samples is a joint action (K^n at every node, over every turn), and a
    /// sample's return is the sum over the joint actions it takes part in (as CoMLRL).
    Cross,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TinyModel {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    /// The context in tokens (a model from random init has no trained limit; RoPE runs at any
    /// position): the longest history and response it takes.
    pub context: usize,
    /// `chars`: the synthetic tasks' small alphabet; `bytes`: one token per byte, so any task's
    /// text fits (end-to-end tests of the real tasks).
    pub vocab: TinyVocab,
}

/// The groups within which advantages are z-normalized, (A − mean) / max(std, 1e-6) with the
/// population std (always per agent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdvantageNorm {
    /// Within each node's group of K samples (CoMLRL's MAGRPO and its variants with
    /// `advantage_normalization = True`, their default).
    Group,
    /// One group per turn over the buffer: each turn's advantages get unit scale (CoMLRL's MAAC
    /// and IAC, their default).
    Turn,
    /// One group over all the agent's turns in the buffer: a turn whose advantages are small
    /// stays small.
    Agent,
    /// No normalization: the advantages as the method defines them (CoMLRL's
    /// `advantage_normalization = False`).
    None,
}

/// When the optimizers step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// CoMLRL's: each agent steps once per mini-batch of each turn group of the buffer (turns in
    /// order); a critic steps on the same mini-batch right after the agent it serves (CoLLM-CC's
    /// shared critic so steps once for every agent).
    Turn,
    /// One step per mini-batch of the whole buffer over all turns, the critics first; a multi-turn
    /// episode is one teacher-forced pass (cheaper: each history is encoded once).
    Buffer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TinyVocab {
    Chars,
    Bytes,
}

impl Default for TinyModel {
    fn default() -> Self {
        Self { hidden: 32, layers: 2, heads: 4, kv_heads: 2, intermediate: 64, context: 65_536, vocab: TinyVocab::Chars }
    }
}

/// One device for every model a spec makes, or one per model in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Placement {
    One(String),
    Each(Vec<String>),
}

impl Placement {
    /// The device of the i-th model this spec makes (`key` names the config key in errors).
    pub fn get(&self, i: usize, key: &str) -> Result<collm_model::DeviceSpec> {
        let name = match self {
            Placement::One(d) => d,
            Placement::Each(list) => list.get(i).with_context(|| {
                format!("'{key}' lists {} device(s), but model {i} (counting from 0) needs one: give one device per model", list.len())
            })?,
        };
        collm_model::DeviceSpec::parse(name).map_err(|e| anyhow::anyhow!("'{key}': {e}"))
    }

    /// Every device named, checked.
    fn check(&self, key: &str) -> Result<()> {
        let n = match self {
            Placement::One(_) => 1,
            Placement::Each(l) if l.is_empty() => bail!("'{key}' is an empty list: name at least one device"),
            Placement::Each(l) => l.len(),
        };
        (0..n).try_for_each(|i| self.get(i, key).map(|_| ()))
    }
}

impl From<&str> for Placement {
    fn from(s: &str) -> Self {
        Placement::One(s.to_string())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    /// `smollm2-135m`, a .gguf file, a Hugging Face directory, or `tiny` (random init with a
    /// character vocabulary; for synthetic tasks).
    pub model: String,
    pub tiny: TinyModel,
    pub format: PromptFormat,
    pub lr: f64,
    pub weight_decay: f64,
    /// LoRA rank (0: full fine-tuning).
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_targets: Vec<String>,
    /// Where the model lives: `cpu`, `cuda` or `cuda:N`; a list gives the i-th agent (or critic)
    /// that takes this spec the i-th device: `device = ["cuda:0", "cuda:1"]`.
    pub device: Placement,
    /// `f32`, or `bf16` (bf16 weights and activations, f32 master weights and moments).
    pub dtype: collm_model::Precision,
    /// The dtype a LoRA model's frozen base (its projections, embedding and output head) is
    /// held in: `f32`, or `bf16` (half the memory and half the bytes each decode step reads;
    /// the CPU kernels widen each block of rows to f32 inside the product). Needs `lora_rank`,
    /// `dtype = "f32"` and the CPU.
    pub frozen_dtype: collm_model::Precision,
}

impl ModelSpec {
    /// `frozen_dtype = "bf16"` needs a frozen base under LoRA, in an f32 model on the CPU.
    fn check_frozen_dtype(&self, key: &str) -> Result<()> {
        if self.frozen_dtype == collm_model::Precision::F32 {
            return Ok(());
        }
        if self.lora_rank == 0 {
            bail!("'{key}.frozen_dtype' = \"bf16\" holds a LoRA model's frozen base, but '{key}.lora_rank' is 0 (full fine-tuning freezes nothing): set a LoRA rank or drop the key");
        }
        if self.dtype != collm_model::Precision::F32 {
            bail!("'{key}.frozen_dtype' = \"bf16\" is for an f32 model; with '{key}.dtype' = \"bf16\" every weight is bf16 already: drop the key");
        }
        let cpu = |d: &String| matches!(collm_model::DeviceSpec::parse(d), Ok(collm_model::DeviceSpec::Cpu));
        let cpu_only = match &self.device {
            Placement::One(d) => cpu(d),
            Placement::Each(ds) => ds.iter().all(cpu),
        };
        if !cpu_only {
            bail!("'{key}.frozen_dtype' = \"bf16\" is read by the CPU kernels; on a GPU use '{key}.dtype' = \"bf16\" instead");
        }
        Ok(())
    }
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            model: "smollm2-135m".into(),
            tiny: TinyModel::default(),
            format: PromptFormat::Chat,
            lr: 5e-6,
            weight_decay: 0.01,
            lora_rank: 0,
            lora_alpha: 16.0,
            lora_targets: ["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec(),
            device: Placement::One("cpu".into()),
            dtype: collm_model::Precision::F32,
            frozen_dtype: collm_model::Precision::F32,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { max_new_tokens: 64, temperature: 0.7, top_p: 0.9, top_k: 0 }
    }
}

/// The `[task]` table lives with the task registry.
pub use collm_envs::tasks::TaskConfig;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriticConfig {
    /// The critic model (default: the agents' model).
    pub model: Option<ModelSpec>,
    pub kind: CriticKind,
    pub head: collm_model::ValueHeadKind,
    pub dc: DcCritic,
    pub lr: f64,
    pub value_coef: f64,
    /// ε of the clipped value loss (DC with value heads on the actors).
    pub value_clip: f64,
    /// Critic warm-up: for the first N updates only the critics learn (the actors keep their
    /// weights), so that a fresh critic's TD advantages do not steer a trained policy.
    pub warmup: usize,
    /// Where the critics live (default: the critic model's `device`, else the agents'); a list
    /// gives critic j the j-th device (CoLLM-DC with separate critics).
    pub device: Option<Placement>,
    /// The critics' precision (default: the critic model's `dtype`, else the agents').
    pub dtype: Option<collm_model::Precision>,
}

impl Default for CriticConfig {
    fn default() -> Self {
        Self {
            model: None,
            kind: CriticKind::V,
            head: collm_model::ValueHeadKind::Linear,
            dc: DcCritic::Separate,
            lr: 5e-6,
            value_coef: 0.6,
            value_clip: 0.2,
            warmup: 0,
            device: None,
            dtype: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub seed: u64,
    pub algo: Algo,
    /// Updates (each over one rollout buffer).
    pub steps: usize,
    /// How an agent holds its history between turns: its KV cache (`kv`) or re-encoded text
    /// (`text`). (Old configs' key `history` still reads.)
    #[serde(alias = "history")]
    pub history_cache: HistoryCache,
    /// What an agent reads at a turn: its whole `history` (default) or the turn's `observation`
    /// alone, as CoMLRL 1.3.6 does (see [`AgentInput`]).
    pub agent_input: AgentInput,
    /// Episodes per rollout buffer (per update).
    pub buffer: usize,
    pub gamma: f64,
    /// MAGRPO family: samples per agent per node.
    pub k: usize,
    pub joint_mode: JointMode,
    /// MAGRPO: advantage mode (set by the algo for reinforce / rloo / remax).
    pub advantage: AdvantageMode,
    /// How advantages are z-normalized: within each node's `group` of K (default of the Monte
    /// Carlo methods, as CoMLRL), per `turn` over the buffer (default of CC and DC, as CoMLRL),
    /// per `agent` over all its turns, or `none`.
    pub advantage_norm: Option<AdvantageNorm>,
    /// When the optimizers step: per turn group (`turn`, CoMLRL's) or once per `buffer`.
    pub schedule: Schedule,
    /// Optimization passes over each rollout buffer (1: each sample is used once, as in CoMLRL).
    pub epochs: usize,
    /// Samples per optimizer step within a turn group (`schedule = "turn"`: nodes; `"buffer"`:
    /// episodes); 0: the whole group in one step (CoMLRL's train_batch_size = buffer).
    pub mini_batch: usize,
    /// PPO-style clipped ratio ε of π/π_old per response (off: the plain −A·log π loss). Needed
    /// for `epochs` > 1, where later passes learn from samples of an older policy.
    pub clip_ratio: Option<f64>,
    /// End an episode after a turn whose mean reward exceeds this.
    pub early_termination: Option<f64>,
    /// Clip each step's global gradient norm to this (0: off, as in CoMLRL).
    pub max_grad_norm: f64,
    /// Sequences per forward/backward pass (gradients accumulate across passes; 0: all at once).
    pub micro_batch: usize,
    pub eval_every: usize,
    /// Eval episodes (0: the whole eval split).
    pub eval_items: usize,
    pub eval_greedy: bool,
    pub checkpoint_every: usize,
    /// Log each agent's KL to its initial policy (costs a copy of each agent and a forward pass).
    pub log_kl: bool,
    /// β of the reference-KL penalty: each response's reward (Monte Carlo methods: its own
    /// return) loses β·Σ_tokens k3 against the agent's initial policy (0: off, as CoMLRL 1.3.6;
    /// CoMLRL ≥ 1.3.8's `reference_kl_coef`).
    pub kl_coef: f64,
    pub task: TaskConfig,
    pub agents: ModelSpec,
    /// Per-agent overrides of `agents` (heterogeneous teams): `[[agent]]` tables.
    pub agent: Vec<ModelSpec>,
    pub sampling: SamplingConfig,
    pub critic: CriticConfig,
    /// Start from a trained team: a checkpoint directory (`RUN/checkpoints/step-N`). Agent i
    /// takes the weights of its `agent_i`; each critic's backbone starts from an agent's weights
    /// (CoLLM-DC's critic i from agent i, CoLLM-CC's from agent 0), as the paper starts its critics
    /// from the agents' pretrained model; value heads and optimizer state start fresh.
    pub init: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            seed: 0,
            algo: Algo::Cc,
            steps: 10,
            history_cache: HistoryCache::Kv,
            agent_input: AgentInput::History,
            buffer: 4,
            gamma: 0.9,
            k: 4,
            joint_mode: JointMode::Aligned,
            advantage: AdvantageMode::Mean,
            advantage_norm: None,
            schedule: Schedule::Turn,
            epochs: 1,
            mini_batch: 0,
            clip_ratio: None,
            early_termination: None,
            max_grad_norm: 0.0,
            micro_batch: 0,
            eval_every: 0,
            eval_items: 0,
            eval_greedy: true,
            checkpoint_every: 0,
            log_kl: false,
            kl_coef: 0.0,
            task: TaskConfig::default(),
            agents: ModelSpec::default(),
            agent: vec![],
            sampling: SamplingConfig::default(),
            critic: CriticConfig::default(),
            init: None,
        }
    }
}

/// The most samples per agent and node (`k`) a config may ask for.
pub const MAX_K: usize = 1024;

/// Sets `path` (dotted) in a TOML table to `value` (parsed as TOML, else taken as a string).
pub fn set_key(root: &mut toml::Table, path: &str, value: &str) -> Result<()> {
    let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t.remove("v").unwrap(),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let parts: Vec<&str> = path.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set {path}={value}: bad key '{path}'");
    }
    let mut t = root;
    for p in &parts[..parts.len() - 1] {
        let entry = t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
        t = entry.as_table_mut().with_context(|| format!("--set {path}: '{p}' is not a table"))?;
    }
    t.insert(parts[parts.len() - 1].to_string(), parsed);
    Ok(())
}

/// `'key': ` for the key at which `text` failed to deserialize (dotted for nested tables), from
/// the error's position; empty when it has none.
fn bad_key(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else { return String::new() };
    let before = &text[..span.start.min(text.len())];
    let line = text[before.rfind('\n').map_or(0, |i| i + 1)..].lines().next().unwrap_or("");
    let Some((key, _)) = line.split_once('=') else { return String::new() };
    let table = before.lines().rev().find_map(|l| l.trim().strip_prefix('[').and_then(|l| l.strip_suffix(']')));
    match table {
        Some(t) => format!("'{}.{}': ", t.trim_matches(['[', ']']), key.trim()),
        None => format!("'{}': ", key.trim()),
    }
}

impl Config {
    /// Parses TOML text (`source` names it in errors), applies `key=value` overrides, validates.
    pub fn from_toml(text: &str, source: &str, overrides: &[String]) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text).with_context(|| format!("{source}: not valid TOML"))?;
        for o in overrides {
            let (k, v) = o.split_once('=').with_context(|| format!("--set {o}: expected key=value"))?;
            set_key(&mut table, k.trim(), v.trim())?;
        }
        // Deserialized from the table's text, whose errors carry a position that names the key.
        let text = toml::to_string(&table).with_context(|| format!("{source}: invalid config"))?;
        let cfg: Config = toml::from_str(&text)
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{source}: {}{}", bad_key(&text, &e), e.message().trim()))
            .with_context(|| format!("{source}: invalid config"))?;
        cfg.validate().with_context(|| format!("{source}: invalid config"))?;
        Ok(cfg)
    }

    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let empty = toml::from_str::<toml::Table>(&text).is_ok_and(|t| t.is_empty());
        if empty && overrides.is_empty() {
            bail!("{}: the config is empty; name at least a task and a model (see configs/ for examples)", path.display());
        }
        let mut cfg = Self::from_toml(&text, &path.display().to_string(), overrides)?;
        // A relative path that is not there from the current directory but is next to the config
        // (an external task's program and data) is taken from next to the config.
        let dir = path.parent().unwrap_or(Path::new("."));
        let beside = |p: &Path| -> Option<PathBuf> { (p.is_relative() && !p.exists() && dir.join(p).exists()).then(|| dir.join(p)) };
        for a in cfg.task.command.iter_mut() {
            if let Some(p) = beside(Path::new(a.as_str())) {
                *a = p.display().to_string();
            }
        }
        for p in [&mut cfg.task.data, &mut cfg.task.eval_data].into_iter().flatten() {
            if let Some(q) = beside(p) {
                *p = q;
            }
        }
        Ok(cfg)
    }

    /// The advantage normalization in force: the configured one, or the method's default
    /// (`group` for the Monte Carlo methods, `turn` for CC and DC, as CoMLRL).
    pub fn advantage_norm(&self) -> AdvantageNorm {
        self.advantage_norm.unwrap_or_else(|| crate::algos::algorithm(self.algo).default_advantage_norm())
    }

    /// Samples per agent per node.
    pub fn samples_per_node(&self) -> usize {
        crate::algos::algorithm(self.algo).samples_per_node(self)
    }

    /// The spec of agent `i` (its `[[agent]]` entry, or the shared `[agents]` one).
    pub fn agent_spec(&self, i: usize) -> &ModelSpec {
        self.agent.get(i).unwrap_or(&self.agents)
    }

    /// The config key that places agent i.
    pub fn agent_device_key(&self, i: usize) -> String {
        if i < self.agent.len() {
            format!("agent[{i}].device")
        } else {
            "agents.device".into()
        }
    }

    /// The config key that places the critics.
    pub fn critic_device_key(&self) -> &'static str {
        match (&self.critic.device, &self.critic.model) {
            (Some(_), _) => "critic.device",
            (None, Some(_)) => "critic.model.device",
            (None, None) => "agents.device",
        }
    }

    pub fn critic_spec(&self) -> ModelSpec {
        let mut s = self.critic.model.clone().unwrap_or_else(|| self.agents.clone());
        s.lr = self.critic.lr;
        if let Some(d) = &self.critic.device {
            s.device = d.clone();
        }
        if let Some(d) = self.critic.dtype {
            s.dtype = d;
        }
        // A critic that takes the agents' spec but is placed or held apart from their bf16 base
        // (critic.device, critic.dtype) keeps its own base in f32; a critic.model of its own is
        // checked as it is (validate names its key).
        if self.critic.model.is_none() && s.check_frozen_dtype("critic").is_err() {
            s.frozen_dtype = collm_model::Precision::F32;
        }
        s
    }

    pub fn validate(&self) -> Result<()> {
        let pos = |v: usize, k: &str| if v == 0 { bail!("'{k}' must be at least 1") } else { Ok(()) };
        pos(self.steps, "steps")?;
        pos(self.buffer, "buffer")?;
        pos(self.task.turns, "task.turns")?;
        collm_envs::tasks::find(&self.task.name).map_err(|e| anyhow::anyhow!("'task.name': {e}"))?;
        pos(self.sampling.max_new_tokens, "sampling.max_new_tokens")?;
        let mut devices = vec![("agents.device".to_string(), &self.agents.device)];
        devices.extend(self.agent.iter().enumerate().map(|(i, a)| (format!("agent[{i}].device"), &a.device)));
        devices.extend(self.critic.model.iter().map(|m| ("critic.model.device".to_string(), &m.device)));
        devices.extend(self.critic.device.iter().map(|d| ("critic.device".to_string(), d)));
        for (key, d) in devices {
            d.check(&key)?;
        }
        if let Some(d) = &self.init {
            if !d.join("trainer.json").exists() {
                bail!("'init': {} is not a checkpoint directory (it has no trainer.json)", d.display());
            }
        }
        if !(0.0..=1.0).contains(&self.gamma) {
            bail!("'gamma' must be in [0, 1], got {}", self.gamma);
        }
        if !self.algo.is_actor_critic() && self.k < 2 {
            bail!("'k' must be at least 2 for {} (group-relative advantages need a group)", self.algo.name());
        }
        pos(self.epochs, "epochs")?;
        if !(self.kl_coef >= 0.0 && self.kl_coef.is_finite()) {
            bail!("'kl_coef' must be ≥ 0, got {}", self.kl_coef);
        }
        if self.algo.is_actor_critic() && self.advantage_norm == Some(AdvantageNorm::Group) {
            bail!("'advantage_norm' = \"group\" needs K samples per node; {} samples one (use turn, agent or none)", self.algo.name());
        }
        if let Some(e) = self.clip_ratio {
            if !(e > 0.0 && e.is_finite()) {
                bail!("'clip_ratio' must be a positive number, got {e}");
            }
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            bail!("'max_grad_norm' must be ≥ 0 (0: no clipping), got {}", self.max_grad_norm);
        }
        if self.joint_mode == JointMode::Cross && !self.algo.is_actor_critic() {
            let n = self.task.agents.max(1) as u32;
            let per_node = (self.k as u64).checked_pow(n).unwrap_or(u64::MAX);
            let nodes = per_node.checked_pow(self.task.turns.saturating_sub(1) as u32).unwrap_or(u64::MAX);
            if nodes.saturating_mul(self.buffer as u64) > 1_000_000 {
                bail!(
                    "'joint_mode' = \"cross\" expands k^agents = {per_node} joint actions at every node: over {} turns a buffer of {} episodes would open more than a million nodes; lower k, task.turns or buffer",
                    self.task.turns,
                    self.buffer
                );
            }
        }
        if !(self.sampling.temperature >= 0.0 && self.sampling.temperature.is_finite())
            || !(0.0..=1.0).contains(&self.sampling.top_p)
            || self.sampling.top_p == 0.0
        {
            bail!("'sampling.temperature' must be ≥ 0 and 'sampling.top_p' in (0, 1]");
        }
        if self.algo == Algo::Grpo && self.task.agents != 1 && self.task.name == "synthetic" {
            bail!("'algo' = \"grpo\" trains one agent: set task.agents = 1 (or use magrpo)");
        }
        for (k, spec) in std::iter::once(("agents".to_string(), &self.agents))
            .chain(self.agent.iter().enumerate().map(|(i, s)| (format!("agent[{i}]"), s)))
        {
            if !(spec.lr > 0.0 && spec.lr.is_finite()) {
                bail!("'{k}.lr' must be positive, got {}", spec.lr);
            }
        }
        for (k, spec) in std::iter::once(("agents".to_string(), &self.agents))
            .chain(self.agent.iter().enumerate().map(|(i, s)| (format!("agent[{i}]"), s)))
            .chain(self.critic.model.iter().map(|s| ("critic.model".to_string(), s)))
        {
            spec.check_frozen_dtype(&k)?;
        }
        if self.critic.model.is_some() {
            // critic.device and critic.dtype apply on top of critic.model.
            self.critic_spec().check_frozen_dtype("critic.model")?;
        }
        if self.algo.is_actor_critic() && !(self.critic.lr > 0.0 && self.critic.lr.is_finite()) {
            bail!("'critic.lr' must be positive, got {}", self.critic.lr);
        }
        if !(self.task.ratio_band[0] > 0.0 && self.task.ratio_band[0] <= self.task.ratio_band[1]) {
            bail!("'task.ratio_band' must be [lo, hi] with 0 < lo ≤ hi, got {:?}", self.task.ratio_band);
        }
        if !(self.task.per_test_timeout > 0.0 && self.task.per_test_timeout <= 86_400.0) {
            bail!(
                "'task.per_test_timeout' must be a positive number of seconds, at most 86400 (a day), got {}",
                self.task.per_test_timeout
            );
        }
        if let Some(x) = self.task.reward_shift {
            if !x.is_finite() {
                bail!("'task.reward_shift' must be a finite number, got {x}");
            }
        }
        if self.k > MAX_K {
            bail!("'k' = {}: at most {MAX_K} samples per agent and node", self.k);
        }
        for (key, v, max) in [("buffer", self.buffer, 1 << 16), ("task.turns", self.task.turns, 64), ("epochs", self.epochs, 1000)] {
            if v > max {
                bail!("'{key}' = {v}: at most {max}");
            }
        }
        let t = &self.agents.tiny;
        for (name, v) in [
            ("hidden", t.hidden),
            ("layers", t.layers),
            ("heads", t.heads),
            ("kv_heads", t.kv_heads),
            ("intermediate", t.intermediate),
            ("context", t.context),
        ] {
            if v == 0 || v > if name == "context" { 1 << 24 } else { 65_536 } {
                bail!("'agents.tiny.{name}' must be between 1 and 65536, got {v}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_overrides_and_errors_that_name_the_key() {
        let c = Config::from_toml("algo = \"dc\"\n[task]\nturns = 2\n", "x.toml", &["critic.lr=1e-4".into(), "seed=7".into()]).unwrap();
        assert_eq!((c.algo, c.task.turns, c.critic.lr, c.seed), (Algo::Dc, 2, 1e-4, 7));
        let e = format!("{:#}", Config::from_toml("stepz = 3", "x.toml", &[]).unwrap_err());
        assert!(e.contains("x.toml") && e.contains("stepz"), "{e}");
        let e = format!("{:#}", Config::from_toml("gamma = 2.0", "x.toml", &[]).unwrap_err());
        assert!(e.contains("'gamma'"), "{e}");
        let e = format!("{:#}", Config::from_toml("[task]\nname = \"chess\"", "x.toml", &[]).unwrap_err());
        assert!(e.contains("task.name") && e.contains("chess"), "{e}");
        // Cross joint actions over several turns, as CoMLRL; a tree that cannot fit is refused.
        assert!(Config::from_toml("algo = \"magrpo\"\njoint_mode = \"cross\"\n[task]\nturns = 2", "x.toml", &[]).is_ok());
        let e = format!(
            "{:#}",
            Config::from_toml("algo = \"magrpo\"\nk = 40\njoint_mode = \"cross\"\n[task]\nturns = 3", "x.toml", &[]).unwrap_err()
        );
        assert!(e.contains("joint_mode") && e.contains("million"), "{e}");
        let e = format!("{:#}", Config::from_toml("advantage_norm = \"group\"", "x.toml", &[]).unwrap_err());
        assert!(e.contains("'advantage_norm'"), "{e}");
        let e = format!("{:#}", Config::from_toml("max_grad_norm = -1.0", "x.toml", &[]).unwrap_err());
        assert!(e.contains("'max_grad_norm'"), "{e}");
        // Sizes that used to panic or abort, and numbers that were silently taken, are errors that
        // name the key.
        for (o, key) in [
            ("sampling.temperature=nan", "sampling.temperature"),
            ("agents.lr=inf", "agents.lr"),
            ("task.reward_shift=nan", "task.reward_shift"),
            ("agents.tiny.heads=0", "agents.tiny.heads"),
            ("agents.tiny.hidden=0", "agents.tiny.hidden"),
            ("k=100000", "'k'"),
            ("task.per_test_timeout=1e300", "task.per_test_timeout"),
        ] {
            let e = format!("{:#}", Config::from_toml("", "x.toml", &[o.into()]).unwrap_err());
            assert!(e.contains(key), "{o}: {e}");
        }
        // An empty config file is refused (it used to train SmolLM2 with every default).
        let empty = std::env::temp_dir().join(format!("collm-empty-{}.toml", std::process::id()));
        std::fs::write(&empty, "\n# nothing\n").unwrap();
        let e = format!("{:#}", Config::load(&empty, &[]).unwrap_err());
        assert!(e.contains("empty"), "{e}");
        // The defaults follow CoMLRL where the paper is silent.
        let c = Config::default();
        assert_eq!((c.max_grad_norm, c.agents.weight_decay, c.schedule, c.epochs), (0.0, 0.01, Schedule::Turn, 1));
        assert_eq!(c.advantage_norm(), AdvantageNorm::Turn);
        let m = Config::from_toml("algo = \"rloo\"", "x.toml", &[]).unwrap();
        assert_eq!(m.advantage_norm(), AdvantageNorm::Group);
        let e = format!("{:#}", Config::from_toml("algo = \"ppo\"", "x.toml", &[]).unwrap_err());
        assert!(e.contains("ppo"), "{e}");
        assert!(Config::from_toml("steps = [", "x.toml", &[]).is_err());
        // A partial table keeps the other fields' defaults.
        let c = Config::from_toml("", "x.toml", &["agents.tiny.hidden=64".into()]).unwrap();
        assert_eq!((c.agents.tiny.hidden, c.agents.tiny.layers), (64, TinyModel::default().layers));
    }
}
