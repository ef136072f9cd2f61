//! Rollouts: the team acts in the env for a buffer of episodes, turn by turn.
//!
//! Each turn, every agent samples in one batch (all episodes, all K samples of a node, sharing
//! the node's KV cache), and the agents run concurrently, each on its own observations
//! (decentralized execution). With `history_cache = "kv"` an agent keeps its batch's KV cache across
//! turns, so a turn encodes only its new tokens; with `"text"` it re-encodes the whole history.
//! With `agent_input = "observation"` an agent's input at a turn is that turn's observation alone
//! (formatted as a first message), encoded afresh.
//!
//! The result is a tree: a node is one turn of one episode (every agent's history h_i,t and its
//! K responses); a joint action at a node has a reward and, unless the episode ends, a child node.
//! Actor-critic methods use K = 1 (a chain per episode).

use crate::config::{AgentInput, HistoryCache, JointMode};
use crate::returns::terminates;
use crate::team::{Agent, Team};
use anyhow::{Context, Result};
use candle_core::Tensor;
use collm_envs::{Env, Split};
use collm_model::generate::{decode, extend, prefill};
use collm_model::{Generation, KvCache, SamplingParams};
use rand::{rngs::StdRng, SeedableRng};
use rayon::prelude::*;

/// One agent's response at a node.
#[derive(Clone, Debug)]
pub struct Response {
    pub tokens: Vec<u32>,
    /// The response as the env sees it (stop token removed).
    pub text: String,
    /// log π of each token under the sampling pass's raw distribution (the old policy).
    pub logprobs: Vec<f32>,
    pub stopped: bool,
    /// The seed of the random stream it was sampled with (one stream per response, so a
    /// response does not depend on what it was batched with).
    pub seed: u64,
}

/// A joint action at a node: which of each agent's responses it takes, its reward, its child.
#[derive(Clone, Debug)]
pub struct Joint {
    pub choice: Vec<usize>,
    pub reward: f64,
    pub child: Option<usize>,
    /// The env's task metrics of this joint action (pass rate, IoU, ...).
    pub metrics: std::collections::BTreeMap<String, f64>,
}

#[derive(Clone, Debug)]
pub struct Node {
    /// Index of the episode in the buffer, and its dataset item.
    pub episode: usize,
    pub item: usize,
    pub turn: usize,
    /// Each agent's observation at this turn, as the env gave it.
    pub observations: Vec<String>,
    /// Each agent's input at this turn: its history h_i,t, every token before this turn's
    /// response (`agent_input = "observation"`: the turn's formatted observation alone).
    pub histories: Vec<Vec<u32>>,
    /// The text each agent's history gained at this turn (formatted observation), and its token
    /// count (the tail of `histories[i]`).
    pub chunk_texts: Vec<String>,
    pub chunk_lens: Vec<usize>,
    /// responses[agent][k].
    pub responses: Vec<Vec<Response>>,
    pub joints: Vec<Joint>,
    /// The joint actions (texts) of the turns before this one on this branch.
    pub past: Vec<Vec<String>>,
}

/// One response of one agent: node and sample index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResponseId {
    pub node: usize,
    pub k: usize,
}

/// A token sequence of one agent to score in one teacher-forced pass, and the responses in it:
/// `spans[j]` = [start, end) of the response `ids[j]`.
#[derive(Clone, Debug)]
pub struct AgentSeq {
    pub tokens: Vec<u32>,
    pub spans: Vec<(usize, usize)>,
    pub ids: Vec<ResponseId>,
}

impl AgentSeq {
    /// A batch's token lists and span lists, as `score_spans` takes them.
    pub fn batch(seqs: &[AgentSeq]) -> (Vec<Vec<u32>>, Vec<Vec<(usize, usize)>>) {
        (seqs.iter().map(|s| s.tokens.clone()).collect(), seqs.iter().map(|s| s.spans.clone()).collect())
    }
}

pub struct Rollout {
    pub nodes: Vec<Node>,
    pub roots: Vec<usize>,
    pub num_agents: usize,
    pub generated_tokens: usize,
    pub gen_s: f64,
}

pub struct RolloutSpec<'a> {
    pub split: Split,
    pub items: &'a [usize],
    pub turns: usize,
    pub k: usize,
    pub joint_mode: JointMode,
    pub history_cache: HistoryCache,
    pub agent_input: AgentInput,
    pub sampling: SamplingParams,
    pub early_termination: Option<f64>,
    pub seed: u64,
}

fn mix(a: u64, b: u64) -> u64 {
    let mut x = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
}

/// One agent's sampling for a turn: K responses for each frontier row.
fn agent_turn(
    policy: &Agent,
    cache: Option<KvCache>,
    chunks: &[Vec<u32>],
    histories: &[Vec<u32>],
    spec: &RolloutSpec,
    seeds: &[u64],
) -> Result<(KvCache, Vec<Generation>)> {
    let model = &policy.model;
    let pad = policy.tokenizer.pad_id();
    let (cache, logits) = match (spec.history_cache, cache) {
        (HistoryCache::Kv, Some(mut c)) => {
            let l = extend(model, &mut c, chunks, pad)?;
            (c, l)
        }
        (HistoryCache::Kv, None) => prefill(model, chunks, pad)?,
        (HistoryCache::Text, _) => prefill(model, histories, pad)?,
    };
    let k = spec.k;
    let (cache, logits) = if k > 1 {
        let rows: Vec<usize> = (0..chunks.len()).flat_map(|r| std::iter::repeat_n(r, k)).collect();
        let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), logits.device())?;
        (cache.select_rows(&rows)?, logits.index_select(&idx, 0)?)
    } else {
        (cache, logits)
    };
    let mut rngs: Vec<StdRng> = seeds.iter().map(|&s| StdRng::seed_from_u64(s)).collect();
    let mut cache = cache;
    let gens = decode(model, &mut cache, logits, &spec.sampling, &policy.tokenizer.stop_ids, &mut rngs, pad)?;
    Ok((cache, gens))
}

fn to_response(policy: &Agent, g: Generation, seed: u64) -> Result<Response> {
    let body = if g.stopped { &g.tokens[..g.tokens.len() - 1] } else { &g.tokens[..] };
    let text = policy.tokenizer.decode(body, false)?;
    Ok(Response { tokens: g.tokens, text, logprobs: g.logprobs, stopped: g.stopped, seed })
}

/// Runs one buffer of episodes.
pub fn rollout(team: &Team, env: &dyn Env, spec: &RolloutSpec) -> Result<Rollout> {
    let t0 = std::time::Instant::now();
    let n = env.num_agents();
    let k = spec.k;
    let mut nodes: Vec<Node> = Vec::new();
    let mut roots = Vec::new();
    for (e, &item) in spec.items.iter().enumerate() {
        let obs = env.reset(spec.split, item).with_context(|| format!("{}: item {item}", env.name()))?;
        let mut histories = Vec::with_capacity(n);
        let mut chunk_texts = Vec::with_capacity(n);
        for (i, p) in team.agents.iter().enumerate() {
            let text = p.first_text(&obs[i])?;
            histories.push(p.encode_first(&text).with_context(|| format!("agent {i}: encoding its first observation"))?);
            chunk_texts.push(text);
        }
        roots.push(nodes.len());
        let chunk_lens = histories.iter().map(|h| h.len()).collect();
        nodes.push(Node {
            episode: e,
            item,
            turn: 0,
            observations: obs,
            histories,
            chunk_texts,
            chunk_lens,
            responses: vec![],
            joints: vec![],
            past: vec![],
        });
    }
    let mut frontier: Vec<usize> = roots.clone();
    // The new tokens each frontier node brings to each agent's cache.
    let mut chunks: Vec<Vec<Vec<u32>>> = (0..n).map(|i| frontier.iter().map(|&x| nodes[x].histories[i].clone()).collect()).collect();
    let mut caches: Vec<Option<KvCache>> = vec![None; n];
    let mut generated = 0usize;
    for turn in 0..spec.turns {
        if frontier.is_empty() {
            break;
        }
        // One random stream per response, seeded by who samples it and where in the tree.
        let seeds: Vec<Vec<u64>> = (0..n)
            .map(|i| {
                frontier
                    .iter()
                    .flat_map(|&x| {
                        let nd = &nodes[x];
                        (0..k).map(move |kk| {
                            mix(mix(mix(spec.seed, i as u64), (turn * 1_000_003 + nd.episode) as u64), (x * 131 + kk) as u64)
                        })
                    })
                    .collect()
            })
            .collect();
        // Every agent samples K responses per frontier node, concurrently.
        // Where the agents fill the cores, each samples on one pool thread of its own: its
        // products stream its own weights on one core, with no fork-join per op. Sharing the
        // global pool, every product of every decode step handed its work to the pool's threads
        // and put the agent's thread to sleep until they were done, two context switches per op.
        // On the Xeon (2 cores, SmolLM2-135M, `collm bench train`), cc's generation took 10.7 s
        // against 13.9 and MAGRPO's (K = 4) 18.0 s against 23.6, with the same tokens.
        let own_thread = n >= rayon::current_num_threads();
        let results: Vec<Result<(KvCache, Vec<Generation>)>> = std::thread::scope(|s| {
            let handles: Vec<_> = team
                .agents
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let cache = caches[i].take();
                    let chunks = &chunks[i];
                    let hist: Vec<Vec<u32>> = frontier.iter().map(|&x| nodes[x].histories[i].clone()).collect();
                    let seeds = &seeds[i];
                    s.spawn(move || {
                        let run = || agent_turn(p, cache, chunks, &hist, spec, seeds);
                        let r = if own_thread {
                            rayon::ThreadPoolBuilder::new().num_threads(1).build().context("a thread for the agent")?.install(run)
                        } else {
                            collm_model::on_pool(run)
                        };
                        r.with_context(|| format!("agent {i}: sampling at turn {turn}"))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("agent thread panicked")).collect()
        });
        let mut expanded: Vec<KvCache> = Vec::with_capacity(n);
        for (i, r) in results.into_iter().enumerate() {
            let (cache, gens) = r?;
            generated += gens.iter().map(|g| g.tokens.len()).sum::<usize>();
            let mut it = gens.into_iter().zip(seeds[i].iter().copied());
            for &x in &frontier {
                let rs = (0..k)
                    .map(|_| {
                        let (g, seed) = it.next().unwrap();
                        to_response(&team.agents[i], g, seed)
                    })
                    .collect::<Result<Vec<_>>>()?;
                nodes[x].responses.push(rs);
            }
            expanded.push(cache);
        }
        // The env scores each joint action; continuing joint actions open child nodes.
        let mut next_frontier = Vec::new();
        // Per agent, the cache row each child continues from (its parent's row of the response
        // the child's joint action took).
        let mut keep_rows: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (fpos, &x) in frontier.iter().enumerate() {
            let choices: Vec<Vec<usize>> = match spec.joint_mode {
                JointMode::Aligned => (0..k).map(|kk| vec![kk; n]).collect(),
                JointMode::Cross => (0..k.pow(n as u32)).map(|c| (0..n).map(|i| (c / k.pow(i as u32)) % k).collect()).collect(),
            };
            // Scoring may run model-written code (the coding sandbox), so joint actions are scored in parallel.
            let outcomes = choices
                .par_iter()
                .map(|ch| {
                    let mut path = nodes[x].past.clone();
                    path.push((0..n).map(|i| nodes[x].responses[i][ch[i]].text.clone()).collect());
                    let o = env
                        .step(spec.split, nodes[x].item, turn, &path)
                        .with_context(|| format!("{}: item {}, turn {turn}", env.name(), nodes[x].item))?;
                    if !o.reward.is_finite() {
                        anyhow::bail!("{}: item {}, turn {turn}: the reward is {}", env.name(), nodes[x].item, o.reward);
                    }
                    Ok((path, o))
                })
                .collect::<Result<Vec<_>>>()?;
            let mean = outcomes.iter().map(|(_, o)| o.reward).sum::<f64>() / outcomes.len() as f64;
            let go_on = turn + 1 < spec.turns && !terminates(mean, spec.early_termination);
            for (ch, (path, o)) in choices.into_iter().zip(outcomes) {
                let mut child = None;
                if go_on && !o.done {
                    let mut histories = Vec::with_capacity(n);
                    let mut chunk_texts = Vec::with_capacity(n);
                    let mut chunk_lens = Vec::with_capacity(n);
                    for (i, p) in team.agents.iter().enumerate() {
                        let obs = &o.next_observations[i];
                        let context = || format!("agent {i}: encoding its observation at turn {}", turn + 1);
                        let (text, h, new_tokens) = match spec.agent_input {
                            // The history so far, the response, then the new observation.
                            AgentInput::History => {
                                let r = &nodes[x].responses[i][ch[i]];
                                let text = p.continuation_text(obs, r.tokens.last().copied(), r.stopped);
                                let chunk = p.tokenizer.encode(&text, false).with_context(context)?;
                                let n = chunk.len();
                                let mut h = nodes[x].histories[i].clone();
                                h.extend_from_slice(&r.tokens);
                                h.extend(chunk);
                                (text, h, n)
                            }
                            // The observation alone, as a first message: the whole input is new.
                            AgentInput::Observation => {
                                let text = p.first_text(obs).with_context(context)?;
                                let h = p.encode_first(&text).with_context(context)?;
                                let n = h.len();
                                (text, h, n)
                            }
                        };
                        chunk_lens.push(new_tokens);
                        histories.push(h);
                        chunk_texts.push(text);
                    }
                    let id = nodes.len();
                    let nd = &nodes[x];
                    nodes.push(Node {
                        episode: nd.episode,
                        item: nd.item,
                        turn: turn + 1,
                        observations: o.next_observations.clone(),
                        histories,
                        chunk_texts,
                        chunk_lens,
                        responses: vec![],
                        joints: vec![],
                        past: path,
                    });
                    child = Some(id);
                    next_frontier.push(id);
                    for (i, rows) in keep_rows.iter_mut().enumerate() {
                        rows.push(fpos * k + ch[i]);
                    }
                }
                nodes[x].joints.push(Joint { choice: ch, reward: o.reward, child, metrics: o.metrics });
            }
        }
        // Carry the caches of the continuing rows into the next turn: they hold each history and
        // response, so the next turn brings only the new observation's tokens. An agent that reads
        // the observation alone starts each turn from an empty cache.
        chunks = (0..n)
            .map(|i| {
                next_frontier
                    .iter()
                    .map(|&c| {
                        let h = &nodes[c].histories[i];
                        h[h.len() - nodes[c].chunk_lens[i]..].to_vec()
                    })
                    .collect()
            })
            .collect();
        caches = expanded
            .into_iter()
            .zip(&keep_rows)
            .map(|(c, rows)| {
                if spec.history_cache == HistoryCache::Kv && spec.agent_input == AgentInput::History && !rows.is_empty() {
                    c.select_rows(rows).map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect::<Result<_>>()?;
        frontier = next_frontier;
    }
    Ok(Rollout { nodes, roots, num_agents: n, generated_tokens: generated, gen_s: t0.elapsed().as_secs_f64() })
}

impl Rollout {
    /// The sum of rewards along every root-to-leaf path, averaged (the mean episode reward).
    pub fn mean_episode_reward(&self) -> f64 {
        let mut sums = Vec::new();
        for &r in &self.roots {
            self.path_sums(r, 0.0, &mut sums);
        }
        sums.iter().sum::<f64>() / sums.len().max(1) as f64
    }

    fn path_sums(&self, x: usize, acc: f64, out: &mut Vec<f64>) {
        for j in &self.nodes[x].joints {
            match j.child {
                Some(c) => self.path_sums(c, acc + j.reward, out),
                None => out.push(acc + j.reward),
            }
        }
    }

    /// Each task metric averaged over the episodes' last joint actions (the leaves of the tree).
    pub fn final_metrics(&self) -> std::collections::BTreeMap<String, f64> {
        let mut acc: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
        for j in self.nodes.iter().flat_map(|nd| &nd.joints).filter(|j| j.child.is_none()) {
            for (k, v) in &j.metrics {
                let e = acc.entry(k.clone()).or_default();
                e.0 += v;
                e.1 += 1;
            }
        }
        acc.into_iter().map(|(k, (s, c))| (k, s / c as f64)).collect()
    }

    /// Mean reward of the joint actions at each turn.
    pub fn mean_reward_per_turn(&self) -> Vec<f64> {
        self.reward_sums_per_turn().into_iter().map(|(a, c)| a / c.max(1) as f64).collect()
    }

    /// The sum of the joint actions' rewards at each turn, and their count.
    pub fn reward_sums_per_turn(&self) -> Vec<(f64, usize)> {
        let mut s: Vec<(f64, usize)> = Vec::new();
        for nd in &self.nodes {
            if s.len() <= nd.turn {
                s.resize(nd.turn + 1, (0.0, 0));
            }
            for j in &nd.joints {
                s[nd.turn].0 += j.reward;
                s[nd.turn].1 += 1;
            }
        }
        s
    }

    /// For agent `i`: sequences to score in one teacher-forced pass each, with the response spans
    /// they cover. Every response is covered exactly once: a response's span rides along its
    /// first descendant path, so a chain is one sequence wherever each turn's input extends the
    /// last (`agent_input = "history"`); where it does not (`"observation"`), a response ends its
    /// own sequence.
    pub fn agent_sequences(&self, i: usize) -> Vec<AgentSeq> {
        let mut out = Vec::new();
        for &r in &self.roots {
            self.collect(i, r, vec![], &mut out);
        }
        out
    }

    fn collect(&self, i: usize, x: usize, pending: Vec<(ResponseId, (usize, usize))>, out: &mut Vec<AgentSeq>) {
        let nd = &self.nodes[x];
        let h = nd.histories[i].len();
        for (kk, resp) in nd.responses[i].iter().enumerate() {
            let mut p = if kk == 0 { pending.clone() } else { vec![] };
            p.push((ResponseId { node: x, k: kk }, (h, h + resp.tokens.len())));
            // Every child that continues this response (one when aligned, K^(n−1) when cross):
            // the first carries the pending spans, the others start their own sequences.
            let children: Vec<usize> = nd.joints.iter().filter(|j| j.choice[i] == kk).filter_map(|j| j.child).collect();
            // A child's history continues this one's (the agent reads its whole history), or
            // starts anew (it reads the turn's observation alone): then this response ends its
            // own sequence.
            let continued = |c: usize| {
                let ch = &self.nodes[c].histories[i];
                ch.len() >= h + resp.tokens.len() && ch[..h] == nd.histories[i][..] && ch[h..h + resp.tokens.len()] == resp.tokens[..]
            };
            if children.is_empty() || !children.iter().all(|&c| continued(c)) {
                let mut tokens = nd.histories[i].clone();
                tokens.extend_from_slice(&resp.tokens);
                let kept: Vec<_> = p.into_iter().filter(|(_, s)| s.1 > s.0).collect();
                out.push(AgentSeq { tokens, spans: kept.iter().map(|p| p.1).collect(), ids: kept.iter().map(|p| p.0).collect() });
                for c in children {
                    self.collect(i, c, vec![], out);
                }
                continue;
            }
            let mut p = Some(p);
            for c in children {
                self.collect(i, c, p.take().unwrap_or_default(), out);
            }
        }
    }

    /// log π_old of agent i's response `id`: the sum of its token log-probs from the sampling pass.
    pub fn old_logprob(&self, i: usize, id: ResponseId) -> f64 {
        self.nodes[id.node].responses[i][id.k].logprobs.iter().map(|&l| l as f64).sum()
    }

    /// Agent `i`'s response k at node x as its own sequence: the history h_i,t, then the response.
    pub fn response_sequence(&self, i: usize, id: ResponseId) -> AgentSeq {
        let nd = &self.nodes[id.node];
        let r = &nd.responses[i][id.k];
        let h = nd.histories[i].len();
        let mut tokens = nd.histories[i].clone();
        tokens.extend_from_slice(&r.tokens);
        AgentSeq { tokens, spans: vec![(h, h + r.tokens.len())], ids: vec![id] }
    }

    /// The nodes at each turn: by_turn[t].
    pub fn nodes_by_turn(&self) -> Vec<Vec<usize>> {
        let mut out: Vec<Vec<usize>> = vec![];
        for (x, nd) in self.nodes.iter().enumerate() {
            if out.len() <= nd.turn {
                out.resize(nd.turn + 1, vec![]);
            }
            out[nd.turn].push(x);
        }
        out
    }

    /// Each episode's chain of nodes (actor-critic rollouts, K = 1).
    pub fn chains(&self) -> Vec<Vec<usize>> {
        self.roots
            .iter()
            .map(|&r| {
                let mut c = vec![r];
                while let Some(next) = self.nodes[*c.last().unwrap()].joints.first().and_then(|j| j.child) {
                    c.push(next);
                }
                c
            })
            .collect()
    }
}
