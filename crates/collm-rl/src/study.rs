//! Studies: several algorithms × seeds on several task settings, each trained for the same number
//! of environment steps (joint actions executed), compared by their final greedy eval reward.
//!
//! A study config is TOML: `algos`, `seeds`, `[base]` (a training config) and `[[setting]]`
//! entries (`name`, `turns`, `density`, `env_steps`, and optional `set = ["key=value", ...]`).

use crate::config::Config;
use crate::trainer::Trainer;
use anyhow::{bail, Context, Result};
use collm_envs::Split;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setting {
    pub name: String,
    pub turns: usize,
    pub density: collm_envs::synthetic::Density,
    /// The budget: joint actions executed in the environment, per run.
    pub env_steps: usize,
    /// Extra `key=value` overrides of the base config for this setting.
    #[serde(default)]
    pub set: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyConfig {
    pub algos: Vec<String>,
    pub seeds: Vec<u64>,
    /// Per-algorithm `key=value` overrides, e.g. `{ magrpo = ["buffer=4"] }`.
    #[serde(default)]
    pub algo_set: std::collections::BTreeMap<String, Vec<String>>,
    pub base: toml::Table,
    pub setting: Vec<Setting>,
}

/// One run's learning curve: (env steps so far, mean train reward of the step).
pub type Curve = Vec<(usize, f64)>;

pub struct RunResult {
    pub setting: String,
    pub algo: String,
    pub seed: u64,
    pub final_reward: f64,
    pub curve: Curve,
}

impl StudyConfig {
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading study config {}", path.display()))?;
        let mut table: toml::Table = toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
        // `--set seed=N` shifts every seed of the study; other keys go to the base config.
        let mut shift = 0u64;
        for o in overrides {
            let (k, v) = o.split_once('=').with_context(|| format!("--set {o}: expected key=value"))?;
            if k.trim() == "seed" {
                shift = v.trim().parse().with_context(|| format!("--set seed={v}: not a number"))?;
            } else {
                let base = table.entry("base").or_insert_with(|| toml::Value::Table(Default::default()));
                let base = base.as_table_mut().context("'base' must be a table")?;
                crate::config::set_key(base, k.trim(), v.trim())?;
            }
        }
        let mut s: StudyConfig =
            table.try_into().map_err(|e: toml::de::Error| anyhow::anyhow!("{}: {}", path.display(), e.message().trim()))?;
        if s.algos.is_empty() || s.seeds.is_empty() || s.setting.is_empty() {
            bail!("{}: 'algos', 'seeds' and 'setting' must not be empty", path.display());
        }
        for seed in s.seeds.iter_mut() {
            *seed += shift;
        }
        for st in &s.setting {
            s.run_config(st, &s.algos[0], s.seeds[0]).with_context(|| format!("{}: setting '{}'", path.display(), st.name))?;
        }
        Ok(s)
    }

    /// The training config of one run.
    pub fn run_config(&self, st: &Setting, algo: &str, seed: u64) -> Result<Config> {
        let d = match st.density {
            collm_envs::synthetic::Density::Dense => "dense",
            collm_envs::synthetic::Density::Sparse => "sparse",
        };
        let mut o =
            vec![format!("algo=\"{algo}\""), format!("seed={seed}"), format!("task.turns={}", st.turns), format!("task.density=\"{d}\"")];
        o.extend(st.set.iter().cloned());
        o.extend(self.algo_set.get(algo).cloned().unwrap_or_default());
        let mut c = Config::from_toml(&toml::to_string(&self.base)?, "study base", &o)?;
        c.steps = usize::MAX / 2; // the env-step budget ends a run
        Ok(c)
    }
}

/// Trains one run to its env-step budget; returns its curve and final greedy eval reward.
pub fn run_one(cfg: Config, budget: usize, dir: &Path) -> Result<(Curve, f64)> {
    let mut t = Trainer::new(cfg, dir)?;
    let mut used = 0;
    let mut curve = vec![];
    while used < budget {
        let line = t.train_step()?;
        t.log(&line)?;
        used += line["env_steps"].as_u64().unwrap_or(0) as usize;
        curve.push((used, line["reward_mean"].as_f64().unwrap_or(f64::NAN)));
    }
    let e = t.evaluate(Split::Eval, 0, true)?;
    Ok((curve, e.reward_mean))
}

/// The sampled policy's reward at the end of a run: the mean train reward (the rollouts' mean
/// episode reward, on-policy, at the sampling temperature) over the last tenth of its steps.
pub fn sampled_reward(curve: &Curve) -> f64 {
    let n = (curve.len() / 10).max(1).min(curve.len());
    curve[curve.len() - n..].iter().map(|c| c.1).sum::<f64>() / n.max(1) as f64
}

fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let m = x.iter().sum::<f64>() / n;
    (m, (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n).sqrt())
}

/// Runs the whole study into `out`: `summary.json`, `table.md`, `curves.png`, one run dir each.
pub fn run(study: &StudyConfig, out: &Path, progress: bool) -> Result<Value> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut results: Vec<RunResult> = vec![];
    let total = study.setting.len() * study.algos.len() * study.seeds.len();
    let bar = progress.then(|| crate::progress::Progress::new(total as u64, 0, "run"));
    for st in &study.setting {
        for algo in &study.algos {
            for &seed in &study.seeds {
                let cfg = study.run_config(st, algo, seed)?;
                let dir = out.join("runs").join(format!("{}-{algo}-seed{seed}", st.name));
                let _ = std::fs::remove_dir_all(&dir);
                let t0 = std::time::Instant::now();
                let (curve, final_reward) =
                    run_one(cfg, st.env_steps, &dir).with_context(|| format!("{} / {algo} / seed {seed}", st.name))?;
                if let Some(b) = &bar {
                    let line = format!(
                        "{} {algo} seed {seed}: final eval reward {final_reward:.3} ({:.0} s)",
                        st.name,
                        t0.elapsed().as_secs_f64()
                    );
                    b.println(&line);
                    b.tick(&format!("{} {algo} seed {seed}", st.name), "");
                }
                results.push(RunResult { setting: st.name.clone(), algo: algo.clone(), seed, final_reward, curve });
            }
        }
    }
    let mut settings = vec![];
    let mut table = String::from("| setting | turns | reward | env steps |");
    for a in &study.algos {
        table.push_str(&format!(" {a} |"));
    }
    table.push_str("\n|---|---|---|---|");
    for _ in &study.algos {
        table.push_str("---|");
    }
    table.push('\n');
    for st in &study.setting {
        let mut res = serde_json::Map::new();
        let d = if st.density == collm_envs::synthetic::Density::Dense { "dense" } else { "sparse" };
        table.push_str(&format!("| {} | {} | {d} | {} |", st.name, st.turns, st.env_steps));
        for a in &study.algos {
            let runs: Vec<&RunResult> = results.iter().filter(|r| r.setting == st.name && &r.algo == a).collect();
            let f: Vec<f64> = runs.iter().map(|r| r.final_reward).collect();
            let g: Vec<f64> = runs.iter().map(|r| sampled_reward(&r.curve)).collect();
            let (m, s) = mean_std(&f);
            let (gm, gs) = mean_std(&g);
            res.insert(
                a.clone(),
                json!({"final_reward_mean": m, "final_reward_std": s, "seeds": f.len(), "final_rewards": f,
                       "final_sampled_reward_mean": gm, "final_sampled_reward_std": gs}),
            );
            table.push_str(&format!(" {m:.3} ± {s:.3} ({gm:.2} ± {gs:.2}) |"));
        }
        table.push('\n');
        settings.push(json!({"name": st.name, "turns": st.turns, "density": d, "env_steps": st.env_steps, "results": res}));
    }
    let summary = json!({"settings": settings, "seeds": study.seeds, "algos": study.algos,
        "metric": "greedy eval reward (mean episode return, in [0, 1]) after the env-step budget; in brackets the sampled policy's: the mean train reward over the last tenth of the steps"});
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    std::fs::write(out.join("table.md"), &table)?;
    crate::plot::study_curves(
        &results,
        &study.setting.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
        &study.algos,
        &out.join("curves.png"),
    )?;
    Ok(summary)
}
