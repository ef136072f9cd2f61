//! A synthetic task family that tiny models learn in seconds, with knobs for the horizon (turns),
//! the reward density and partial observability.
//!
//! Each item is a secret tuple (s_1, …, s_n) of symbols; agent i observes only s_i. At turn 0
//! each agent's target is its own symbol (announce it). At every later turn agent i's target is
//! its partner's secret s_{i+1 mod n}, which it cannot see: between turns each agent observes
//! only the first character of the other agents' previous responses. So the team must announce
//! at turn 0, and from turn 2 on an agent must look back in its history to the turn-1
//! observation (the last one shows what the others said at the previous turn, not their secrets).
//!
//! With `rule = "echo"` the task keeps the horizon and the reward density but drops the
//! communication: at every turn each agent observes a fresh private symbol and its target is
//! that symbol (`0:c`, then `|1:a`, …). Each turn's decision is the same lookup, and each agent
//! sees only its own symbols, so what is hard is credit assignment: with sparse rewards the
//! return mixes all turns of all agents, and a critic that reads only one agent's history cannot
//! see the other agents' part of it.
//!
//! With `rule = "cipher"` the private symbols are the same, but at turn t the target is the symbol
//! t places after the one observed (mod m; `|2:a` asks for `c`): each turn needs its own mapping,
//! read off the turn number in the observation. A policy must then learn every turn's decision,
//! not one lookup shared by all turns.
//!
//! A turn's score is the fraction of agents whose response starts with their target. With
//! `dense` rewards r_t = score_t / T; with `sparse` ones r_t = 0 before the last turn and
//! r_{T-1} = mean_t score_t. Either way the return lies in [0, 1] (without `noise`).
//!
//! With `noise` σ > 0 every reward-bearing turn of the train split adds σ·z, z a standard normal
//! drawn from a hash of the item, the turn and the joint actions so far: the same episode always
//! gets the same noise (the env stays a function, so trees branch and runs reproduce), but the
//! agents cannot predict it, since it depends on the item's index, which they never see. Monte
//! Carlo returns then carry that variance; a critic averages it away over items. The eval split
//! is noiseless, so evaluation measures the task itself.
//!
//! Observations are plain text: `0:b` at the start, then `|1:c` (the turn, then what the
//! others said, `-` for an empty response). The symbol comes last, so at turns 0 and 1 the
//! right answer is the observation's last character: a lookup that a tiny model learns from
//! the reward alone. (With a closing `>` after it, answering needs attention to the token
//! before; in the study of 2026-11-25 every method then collapsed to one constant symbol,
//! which scores 1/m per turn, on the short dense task too.)

use crate::{check_step, Env, Outcome, Split};
use anyhow::{bail, Result};

/// The characters observations and useful responses are made of (for a character tokenizer).
pub const ALPHABET: &str = "abcdefghijklmnopqrstuvwxyz0123456789:>|-";

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Density {
    /// A reward every turn.
    Dense,
    /// The whole reward at the last turn.
    Sparse,
}

/// Which targets the agents have (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// Announce your secret, then answer your partner's (communication and memory).
    #[default]
    Relay,
    /// Answer the fresh private symbol of each turn (credit assignment only).
    Echo,
    /// Answer the fresh private symbol shifted by the turn number (a different mapping per turn).
    Cipher,
}

/// Items of the echo rule (their symbols are drawn from the item index).
const ECHO_ITEMS: usize = 4096;

#[derive(Clone, Debug)]
pub struct Synthetic {
    name: String,
    /// Number of distinct symbols m (≤ 26).
    pub symbols: usize,
    pub agents: usize,
    pub turns: usize,
    pub density: Density,
    pub rule: Rule,
    /// σ of the train split's reward noise (0: none).
    pub noise: f64,
}

impl Synthetic {
    pub fn new(symbols: usize, agents: usize, turns: usize, density: Density) -> Result<Self> {
        if !(2..=26).contains(&symbols) {
            bail!("synthetic: symbols must be between 2 and 26, got {symbols}");
        }
        if !(1..=4).contains(&agents) {
            bail!("synthetic: agents must be between 1 and 4, got {agents}");
        }
        if !(1..=9).contains(&turns) {
            bail!("synthetic: turns must be between 1 and 9, got {turns}");
        }
        let d = match density {
            Density::Dense => "dense",
            Density::Sparse => "sparse",
        };
        Ok(Self {
            name: format!("synthetic-m{symbols}-n{agents}-t{turns}-{d}"),
            symbols,
            agents,
            turns,
            density,
            rule: Rule::Relay,
            noise: 0.0,
        })
    }

    /// Adds reward noise of standard deviation σ to the train split (see the module docs).
    pub fn with_noise(mut self, sigma: f64) -> Result<Self> {
        if !(sigma >= 0.0 && sigma.is_finite()) {
            bail!("synthetic: noise must be a finite σ ≥ 0, got {sigma}");
        }
        if sigma > 0.0 {
            self.name.push_str(&format!("-noise{sigma}"));
        }
        self.noise = sigma;
        Ok(self)
    }

    /// A standard normal drawn from (item, turn, joint actions so far): Box-Muller on two hashes.
    fn noise_draw(item: usize, turn: usize, joint_actions: &[Vec<String>]) -> f64 {
        // FNV-1a over the episode (fixed across toolchains, unlike std's DefaultHasher).
        let mut x: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                x = (x ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(&(item as u64).to_le_bytes());
        eat(&(turn as u64).to_le_bytes());
        for joint in joint_actions {
            for a in joint {
                eat(&(a.len() as u64).to_le_bytes());
                eat(a.as_bytes());
            }
        }
        let mut uniform = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        let (u1, u2) = (uniform().max(f64::MIN_POSITIVE), uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub fn with_rule(mut self, rule: Rule) -> Self {
        match rule {
            Rule::Relay => {}
            Rule::Echo => self.name = self.name.replacen("synthetic-", "synthetic-echo-", 1),
            Rule::Cipher => self.name = self.name.replacen("synthetic-", "synthetic-cipher-", 1),
        }
        self.rule = rule;
        self
    }

    /// Echo rule: agent `agent`'s private symbol at `turn` of `item`.
    fn echo_symbol(&self, item: usize, turn: usize, agent: usize) -> usize {
        let mut x = (item as u64) << 16 | (turn as u64) << 8 | agent as u64;
        // splitmix64's finalizer: a fixed, well-mixed function of (item, turn, agent).
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((x ^ (x >> 31)) % self.symbols as u64) as usize
    }

    fn symbol(&self, i: usize) -> char {
        (b'a' + (i % self.symbols) as u8) as char
    }

    /// The secret symbol indices of an item (items enumerate every tuple).
    pub fn secrets(&self, item: usize) -> Vec<usize> {
        let mut x = item;
        (0..self.agents)
            .map(|_| {
                let s = x % self.symbols;
                x /= self.symbols;
                s
            })
            .collect()
    }

    /// Agent `agent`'s target symbol at `turn` (relay rule).
    pub fn target(&self, secrets: &[usize], agent: usize, turn: usize) -> char {
        if turn == 0 {
            self.symbol(secrets[agent])
        } else {
            self.symbol(secrets[(agent + 1) % self.agents])
        }
    }

    /// The private symbol agent `agent` observes at `turn` (echo and cipher rules; at turn 0 also
    /// the relay rule's secret).
    fn shown_symbol(&self, item: usize, agent: usize, turn: usize) -> char {
        match self.rule {
            Rule::Relay => self.target_of(item, agent, 0),
            Rule::Echo | Rule::Cipher => self.symbol(self.echo_symbol(item, turn, agent)),
        }
    }

    /// Agent `agent`'s target symbol at `turn` of `item`, under the task's rule.
    pub fn target_of(&self, item: usize, agent: usize, turn: usize) -> char {
        match self.rule {
            Rule::Relay => self.target(&self.secrets(item), agent, turn),
            Rule::Echo => self.shown_symbol(item, agent, turn),
            Rule::Cipher => self.symbol(self.echo_symbol(item, turn, agent) + turn),
        }
    }

    /// Fraction of agents whose response starts with their target.
    pub fn score(&self, item: usize, turn: usize, responses: &[String]) -> f64 {
        let hits = responses.iter().enumerate().filter(|(i, r)| r.trim_start().starts_with(self.target_of(item, *i, turn))).count();
        hits as f64 / self.agents as f64
    }
}

fn first_char(r: &str) -> char {
    r.trim_start().chars().next().filter(|c| ALPHABET.contains(*c)).unwrap_or('-')
}

impl Env for Synthetic {
    fn name(&self) -> &str {
        &self.name
    }

    fn num_agents(&self) -> usize {
        self.agents
    }

    fn len(&self, _split: Split) -> usize {
        match self.rule {
            Rule::Relay => self.symbols.pow(self.agents as u32),
            Rule::Echo | Rule::Cipher => ECHO_ITEMS,
        }
    }

    fn reset(&self, split: Split, item: usize) -> Result<Vec<String>> {
        if item >= self.len(split) {
            bail!("{}: item {item} is outside the {split:?} split ({} items)", self.name, self.len(split));
        }
        Ok((0..self.agents).map(|i| format!("0:{}", self.shown_symbol(item, i, 0))).collect())
    }

    fn step(&self, split: Split, item: usize, turn: usize, joint_actions: &[Vec<String>]) -> Result<Outcome> {
        check_step(self, split, item, turn, joint_actions)?;
        let t = self.turns as f64;
        let reward = match self.density {
            Density::Dense => self.score(item, turn, &joint_actions[turn]) / t,
            Density::Sparse if turn + 1 == self.turns => {
                joint_actions.iter().enumerate().map(|(k, a)| self.score(item, k, a)).sum::<f64>() / t
            }
            Density::Sparse => 0.0,
        };
        let bears_reward = self.density == Density::Dense || turn + 1 == self.turns;
        let reward = if self.noise > 0.0 && split == Split::Train && bears_reward {
            reward + self.noise * Self::noise_draw(item, turn, joint_actions)
        } else {
            reward
        };
        let now = &joint_actions[turn];
        let next_observations = (0..self.agents)
            .map(|i| {
                let shown: String = match self.rule {
                    Rule::Relay => (0..self.agents).filter(|&j| j != i).map(|j| first_char(&now[j])).collect(),
                    Rule::Echo | Rule::Cipher => self.shown_symbol(item, i, turn + 1).to_string(),
                };
                format!("|{}:{shown}", turn + 1)
            })
            .collect();
        Ok(Outcome::new(reward, next_observations))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reward_noise_is_a_fixed_function_of_the_episode_with_the_given_spread() {
        let clean = Synthetic::new(4, 2, 2, Density::Sparse).unwrap().with_rule(Rule::Echo);
        let noisy = clean.clone().with_noise(0.5).unwrap();
        let j = vec![s(&["a", "b"]), s(&["c", "d"])];
        let at = |e: &Synthetic, sp, item| e.step(sp, item, 1, &j).unwrap().reward;
        assert_eq!(at(&noisy, Split::Train, 3), at(&noisy, Split::Train, 3), "the same episode, the same noise");
        assert_eq!(at(&noisy, Split::Eval, 3), at(&clean, Split::Eval, 3), "the eval split is noiseless");
        assert_eq!(noisy.step(Split::Train, 3, 0, &j[..1]).unwrap().reward, 0.0, "no noise where no reward is due");
        let d: Vec<f64> = (0..4000).map(|i| at(&noisy, Split::Train, i) - at(&clean, Split::Train, i)).collect();
        let m = d.iter().sum::<f64>() / d.len() as f64;
        let sd = (d.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / d.len() as f64).sqrt();
        assert!(m.abs() < 0.03 && (sd - 0.5).abs() < 0.03, "mean {m}, std {sd}");
        assert!(Synthetic::new(4, 2, 2, Density::Sparse).unwrap().with_noise(f64::NAN).is_err());
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn items_enumerate_secrets_and_observations_show_only_ones_own() {
        let e = Synthetic::new(4, 2, 2, Density::Dense).unwrap();
        assert_eq!(e.len(Split::Train), 16);
        assert_eq!(e.secrets(6), vec![2, 1]);
        assert_eq!(e.reset(Split::Train, 6).unwrap(), s(&["0:c", "0:b"]));
        assert!(e.reset(Split::Train, 16).is_err());
    }

    #[test]
    fn dense_rewards_score_every_turn() {
        let e = Synthetic::new(4, 2, 2, Density::Dense).unwrap();
        // secrets (c, b): turn 0 targets c and b; turn 1 targets the partner's: b and c.
        let t0 = s(&["c", "X"]);
        let o = e.step(Split::Train, 6, 0, &[t0.clone()]).unwrap();
        assert_eq!(o.reward, 0.5 / 2.0);
        assert_eq!(o.next_observations, s(&["|1:-", "|1:c"]));
        let o = e.step(Split::Train, 6, 1, &[t0, s(&["b", " c!"])]).unwrap();
        assert_eq!(o.reward, 1.0 / 2.0);
        let o = e.step(Split::Train, 6, 1, &[s(&["c", "b"]), s(&["c", "c"])]).unwrap();
        assert_eq!(o.reward, 0.5 / 2.0);
    }

    #[test]
    fn sparse_rewards_arrive_at_the_last_turn_only() {
        let e = Synthetic::new(4, 2, 3, Density::Sparse).unwrap();
        // secrets (c, b): targets (c, b), then (b, c) at turns 1 and 2.
        let j = vec![s(&["c", "b"]), s(&["b", ""]), s(&["b", "c"])];
        assert_eq!(e.step(Split::Train, 6, 0, &j[..1]).unwrap().reward, 0.0);
        assert_eq!(e.step(Split::Train, 6, 1, &j[..2]).unwrap().reward, 0.0);
        // scores 1, 0.5, 1 → mean 2.5 / 3.
        assert!((e.step(Split::Train, 6, 2, &j).unwrap().reward - 2.5 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn echo_asks_for_each_turns_private_symbol() {
        let e = Synthetic::new(4, 2, 3, Density::Sparse).unwrap().with_rule(Rule::Echo);
        assert_eq!(e.len(Split::Train), ECHO_ITEMS);
        let item = 77;
        let t: Vec<Vec<char>> = (0..3).map(|turn| (0..2).map(|i| e.target_of(item, i, turn)).collect()).collect();
        let obs = e.reset(Split::Train, item).unwrap();
        assert_eq!(obs, vec![format!("0:{}", t[0][0]), format!("0:{}", t[0][1])]);
        // Right at turn 0 (both), wrong at turn 1 (agent 0 only), right at turn 2.
        let wrong = if t[1][0] == 'a' { "b" } else { "a" };
        let j = vec![
            vec![t[0][0].to_string(), t[0][1].to_string()],
            vec![wrong.to_string(), t[1][1].to_string()],
            vec![t[2][0].to_string(), t[2][1].to_string()],
        ];
        let o = e.step(Split::Train, item, 0, &j[..1]).unwrap();
        assert_eq!(o.reward, 0.0);
        // Each agent's next observation is its own next symbol, whatever the partner said.
        assert_eq!(o.next_observations, vec![format!("|1:{}", t[1][0]), format!("|1:{}", t[1][1])]);
        assert!((e.step(Split::Train, item, 2, &j).unwrap().reward - 2.5 / 3.0).abs() < 1e-12);
        // The symbols are a fixed function of the item, and they vary across items and turns.
        let other = Synthetic::new(4, 2, 3, Density::Sparse).unwrap().with_rule(Rule::Echo);
        assert_eq!(other.target_of(item, 1, 2), t[2][1]);
        let distinct: std::collections::HashSet<char> = (0..64).map(|it| e.target_of(it, 0, 1)).collect();
        assert_eq!(distinct.len(), 4);
    }

    #[test]
    fn cipher_shifts_each_turns_symbol_by_the_turn() {
        let e = Synthetic::new(4, 2, 4, Density::Sparse).unwrap().with_rule(Rule::Cipher);
        let echo = Synthetic::new(4, 2, 4, Density::Sparse).unwrap().with_rule(Rule::Echo);
        let item = 5;
        let shift = |c: char, t: usize| (b'a' + ((c as u8 - b'a') as usize + t) as u8 % 4) as char;
        // Same observations as echo; the target at turn t is the observed symbol shifted by t.
        assert_eq!(e.reset(Split::Train, item).unwrap(), echo.reset(Split::Train, item).unwrap());
        for t in 0..4 {
            for i in 0..2 {
                assert_eq!(e.target_of(item, i, t), shift(echo.target_of(item, i, t), t), "turn {t}, agent {i}");
            }
        }
        // Answering the observed symbol is right at turn 0 only.
        let j: Vec<Vec<String>> = (0..4).map(|t| (0..2).map(|i| echo.target_of(item, i, t).to_string()).collect()).collect();
        let o = e.step(Split::Train, item, 0, &j[..1]).unwrap();
        assert_eq!(o.next_observations, echo.step(Split::Train, item, 0, &j[..1]).unwrap().next_observations);
        assert!((e.step(Split::Train, item, 3, &j).unwrap().reward - 0.25).abs() < 1e-12);
        assert!(e.name().contains("cipher"));
    }

    #[test]
    fn bad_steps_are_errors() {
        let e = Synthetic::new(4, 2, 2, Density::Dense).unwrap();
        assert!(e.step(Split::Train, 0, 1, &[s(&["a", "b"])]).is_err());
        assert!(e.step(Split::Train, 0, 0, &[s(&["a"])]).is_err());
        assert!(Synthetic::new(1, 2, 2, Density::Dense).is_err());
    }
}
