//! Decentralized execution of a trained team (`collm run`): the paper's point after training.
//! Each agent acts on its own history with its own model; every turn the agents generate
//! concurrently (one thread per agent, as in training's rollouts), the task's transition turns
//! their joint action into each one's next observation, and nothing else passes between them.
//! The critic exists only in training: it is never built, and no critic or value-head file of
//! the checkpoint is read.

use crate::team::Team;
use crate::trainer::{checkpoint_dir, episode_count, episode_turns, eval_rollouts, make_env, trainer_state, EvalStats};
use crate::Config;
use anyhow::{Context, Result};
use collm_envs::{Env, Split};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A trained team's agents, loaded from a checkpoint, and the task they act in.
pub struct Deployed {
    pub cfg: Config,
    pub env: Box<dyn Env>,
    pub team: Team,
    /// The checkpoint's training step (it seeds the episodes' sampling, as `collm eval` does).
    pub step: usize,
    pub checkpoint: PathBuf,
}

impl Deployed {
    /// Loads the agents of the checkpoint at `path` (a checkpoint, or a run directory's latest),
    /// with `sets` overriding the run's config (e.g. `task.data=other.jsonl`).
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let dir = checkpoint_dir(path)?;
        let cfg = Config::load(&dir.join("config.toml"), sets)?;
        let env = make_env(&cfg)?;
        let (team, step) = load_agents(&dir, &cfg, Some(env.num_agents()))?;
        Ok(Self { cfg, env, team, step, checkpoint: dir })
    }

    /// Runs `items` episodes of a split (all when 0), greedy or sampled; writes one transcript
    /// per episode to `transcripts` (JSON lines) when given, and returns the task's metrics.
    pub fn run(&self, split: Split, items: usize, greedy: bool, transcripts: Option<&Path>) -> Result<EvalStats> {
        let bar = crate::progress::Progress::new(episode_count(self.env.as_ref(), split, items) as u64, 0, "episode");
        let rollouts = eval_rollouts(&self.team, self.env.as_ref(), &self.cfg, self.step, split, items, greedy, Some(&bar))?;
        bar.finish();
        if let Some(path) = transcripts {
            let mut f = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
            for (_, r) in &rollouts {
                for &root in &r.roots {
                    let turns = episode_turns(r, root);
                    let ret: f64 = turns.iter().filter_map(|t| t["reward"].as_f64()).sum();
                    let line = json!({"task": self.env.name(), "split": split, "item": r.nodes[root].item, "return": ret, "turns": turns});
                    writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))?;
                }
            }
            f.flush().with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(EvalStats::of(&rollouts))
    }
}

/// The trained agents of a checkpoint directory (no critic) and its step. `num_agents`, the
/// task's number, must be the number the checkpoint saved; None takes the checkpoint's.
pub fn load_agents(dir: &Path, cfg: &Config, num_agents: Option<usize>) -> Result<(Team, usize)> {
    let state = trainer_state(dir)?;
    let step = state["step"].as_u64().with_context(|| format!("{}/trainer.json: no 'step'", dir.display()))? as usize;
    let saved = state["agents"].as_array().map_or(0, |a| a.len());
    match num_agents {
        None if saved == 0 => anyhow::bail!("{}/trainer.json: no agents", dir.display()),
        Some(n) if n != saved => anyhow::bail!("{}: the checkpoint holds {saved} agents, the task has {n}", dir.display()),
        _ => {}
    }
    let mut team = Team::load_agents(cfg, saved)?;
    for (i, a) in team.agents.iter_mut().enumerate() {
        let d = dir.join(format!("agent_{i}"));
        collm_model::checkpoint::load_into(&mut a.model, &d).with_context(|| format!("agent {i}: loading {}", d.display()))?;
    }
    Ok((team, step))
}

/// The trained agents of a checkpoint (or a run directory's latest), without building its task:
/// what `collm serve` needs. Returns the run's config, the agents and the checkpoint directory.
pub fn load_team(path: &Path) -> Result<(Config, Team, PathBuf)> {
    let dir = checkpoint_dir(path)?;
    let cfg = Config::load(&dir.join("config.toml"), &[])?;
    let (team, _) = load_agents(&dir, &cfg, None)?;
    Ok((cfg, team, dir))
}
