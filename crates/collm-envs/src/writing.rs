//! The paper's writing tasks (one turn, two agents, no chat template): TLDR summarization (agent 1
//! a concise summary, agent 2 a detailed one) and arXiv abstract expansion (agent 1 background and
//! motivation, agent 2 method and implications). Their rewards are gated levels: the reward
//! stops at the first level that fails.
//!
//! Definitions: tokens = whitespace-split words; words = `\b\w+\b` over the lower-cased text;
//! unique-word counts include stop words; Jaccard is over the word sets without stop words (both
//! empty → 1); a transition category counts when any of its phrases is a substring of the
//! lower-cased text, and T = 0 with no category, else min(0.4 + min(0.05·(k − 1), 0.6), 1).

use crate::{check_step, Env, Outcome, Split, Texts};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// Stop words and transition-word categories (`../shared/data/writing/lexicons.json`).
#[derive(Clone, Debug)]
pub struct Lexicons {
    pub stopwords: HashSet<String>,
    pub transitions: Vec<(String, Vec<String>)>,
}

impl Lexicons {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        let stopwords = v["stopwords"]
            .as_array()
            .with_context(|| format!("{}: no 'stopwords' list", path.display()))?
            .iter()
            .map(|w| w.as_str().map(|s| s.to_lowercase()).with_context(|| format!("{}: a stop word is not a string", path.display())))
            .collect::<Result<_>>()?;
        let cats = v["transition_words"].as_object().with_context(|| format!("{}: no 'transition_words' object", path.display()))?;
        let mut transitions = vec![];
        for (k, list) in cats {
            let phrases = list
                .as_array()
                .with_context(|| format!("{}: transition_words.{k} is not a list", path.display()))?
                .iter()
                .map(|p| {
                    p.as_str()
                        .map(|s| s.to_lowercase())
                        .with_context(|| format!("{}: transition_words.{k} holds a non-string", path.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            transitions.push((k.clone(), phrases));
        }
        Ok(Self { stopwords, transitions })
    }
}

/// Whitespace-split token count.
pub fn tokens(text: &str) -> usize {
    text.split_whitespace().count()
}

/// `\b\w+\b` over the lower-cased text (`\w`: Unicode letters, digits, underscore).
pub fn words(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut out = vec![];
    let mut cur = String::new();
    for c in lower.chars() {
        if c.is_alphanumeric() || c == '_' {
            cur.push(c);
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

pub fn unique_words(text: &str) -> usize {
    words(text).into_iter().collect::<HashSet<_>>().len()
}

/// Jaccard similarity of the two texts' word sets without stop words (both empty → 1).
pub fn jaccard(a: &str, b: &str, lex: &Lexicons) -> f64 {
    let set = |t: &str| words(t).into_iter().filter(|w| !lex.stopwords.contains(w)).collect::<HashSet<_>>();
    let (x, y) = (set(a), set(b));
    let union = x.union(&y).count();
    if union == 0 {
        return 1.0;
    }
    x.intersection(&y).count() as f64 / union as f64
}

/// The transition score T of a text.
pub fn transition_score(text: &str, lex: &Lexicons) -> f64 {
    let lower = text.to_lowercase();
    let k = lex.transitions.iter().filter(|(_, ps)| ps.iter().any(|p| lower.contains(p.as_str()))).count();
    if k == 0 {
        0.0
    } else {
        (0.4 + (0.05 * (k as f64 - 1.0)).min(0.6)).min(1.0)
    }
}

pub use crate::Scored;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WritingTask {
    Tldr,
    Arxiv,
}

/// Scores a joint action (c1, c2) of a writing task.
pub fn score(task: WritingTask, c1: &str, c2: &str, lex: &Lexicons) -> Scored {
    let mut s = Scored { reward: 0.0, levels: BTreeMap::new(), stopped_at: None };
    let stop = |mut s: Scored, level: &str| {
        s.stopped_at = Some(level.to_string());
        s
    };
    let add = |s: &mut Scored, level: &str, v: f64| {
        s.reward += v;
        s.levels.insert(level.to_string(), v);
    };
    // L1: lengths in tokens.
    let (lo, hi) = match task {
        WritingTask::Tldr => (8, 256),
        WritingTask::Arxiv => (128, 256),
    };
    if !(lo..=hi).contains(&tokens(c1)) || !(lo..=hi).contains(&tokens(c2)) {
        return stop(s, "length");
    }
    add(&mut s, "length", 0.5);
    // L2: character ratio chars(c2) / chars(c1).
    let n1 = c1.chars().count();
    if n1 == 0 {
        return stop(s, "ratio");
    }
    let r = c2.chars().count() as f64 / n1 as f64;
    let l2 = match task {
        WritingTask::Tldr if (1.6..=3.2).contains(&r) => Some(1.0),
        WritingTask::Tldr if (1.1..1.6).contains(&r) => Some((r - 1.1) / 0.5),
        WritingTask::Tldr if r > 3.2 && r <= 5.0 => Some(1.0 - (r - 3.2) / 1.8),
        WritingTask::Arxiv if (1.3..=1.6).contains(&r) => Some(1.0),
        WritingTask::Arxiv if (0.8..1.3).contains(&r) => Some((r - 0.8) / 0.5),
        WritingTask::Arxiv if r > 1.6 && r <= 2.0 => Some(1.0 - (r - 1.6) / 0.4),
        _ => None,
    };
    let Some(l2) = l2 else { return stop(s, "ratio") };
    add(&mut s, "ratio", l2);
    // L3: unique-word ratio.
    let u1 = unique_words(c1);
    if u1 == 0 {
        return stop(s, "unique_words");
    }
    let u = unique_words(c2) as f64 / u1 as f64;
    let l3 = match task {
        WritingTask::Tldr if u >= 2.0 => Some(0.5),
        WritingTask::Tldr if (1.3..2.0).contains(&u) => Some(0.5 * (u - 1.3) / 0.7),
        WritingTask::Arxiv if (0.7..=1.3).contains(&u) => Some(0.5),
        WritingTask::Arxiv if (0.5..0.7).contains(&u) => Some(0.5 * (u - 0.5) / 0.2),
        WritingTask::Arxiv if u > 1.3 && u <= 1.7 => Some(0.5 * (1.0 - (u - 1.3) / 0.4)),
        _ => None,
    };
    let Some(l3) = l3 else { return stop(s, "unique_words") };
    add(&mut s, "unique_words", l3);
    // L4: transitions and overlap.
    let j = jaccard(c1, c2, lex);
    let l4 = match task {
        WritingTask::Tldr => 0.4 * transition_score(c2, lex) + 0.6 * j.min(0.03) / 0.03,
        WritingTask::Arxiv => 0.4 * transition_score(&format!("{c1}{c2}"), lex) + 0.6 * j.min(0.23) / 0.23,
    };
    add(&mut s, "style", l4);
    s
}

/// Built-in arXiv-style abstracts (written for collm), so the task runs offline.
pub const BUILTIN_ABSTRACTS: [&str; 4] = [
    "We study how a team of small language models can split a writing task between them. Each model sees only its own instructions and drafts, and a shared reward scores the pair of drafts. We show that a learned critic over the joint history gives steadier training than Monte Carlo returns when the reward arrives late.",
    "Sparse rewards make credit assignment hard in multi-turn dialogue. We propose to estimate values from the whole conversation with a separate model and to update each speaker with temporal-difference advantages. On three benchmarks the method needs fewer episodes than sampling-based baselines.",
    "Caching the keys and values of a conversation lets a language model extend it without reading it again. We measure the savings during reinforcement learning, where every turn adds a short feedback message, and find that the cost of a turn becomes proportional to its new tokens.",
    "We describe a grid-world benchmark in which two agents place blocks to draw letters. Agents cannot see each other's plans and must coordinate through feedback between turns. Rewards measure coverage and penalize extra blocks.",
];

pub const TLDR_PROMPTS: [&str; 2] = [
    "Write a concise summary (one or two sentences) of the following post.\n\n{text}\n\nSummary:",
    "Write a detailed summary of the following post, using varied vocabulary and transition words (for example, furthermore, however, as a result).\n\n{text}\n\nDetailed summary:",
];

pub const ARXIV_PROMPTS: [&str; 2] = [
    "Based on the following abstract, write the background and motivation of the paper in one paragraph.\n\nAbstract: {text}\n\nBackground and motivation:",
    "Based on the following abstract, write the method and its implications in one paragraph.\n\nAbstract: {text}\n\nMethod and implications:",
];

pub struct Writing {
    pub task: WritingTask,
    pub lexicons: Lexicons,
    texts: Texts,
}

impl Writing {
    pub fn new(task: WritingTask, lexicons: Lexicons, texts: Texts) -> Result<Self> {
        if texts.train.is_empty() {
            bail!("writing: the train split is empty");
        }
        Ok(Self { task, lexicons, texts })
    }

    /// The built-in texts of a task: TLDR uses the summary task's posts, arXiv the abstracts here.
    pub fn builtin_texts(task: WritingTask) -> &'static [&'static str] {
        match task {
            WritingTask::Tldr => &crate::summary::BUILTIN,
            WritingTask::Arxiv => &BUILTIN_ABSTRACTS,
        }
    }
}

impl Env for Writing {
    fn name(&self) -> &str {
        match self.task {
            WritingTask::Tldr => "tldr",
            WritingTask::Arxiv => "arxiv",
        }
    }
    fn num_agents(&self) -> usize {
        2
    }
    fn len(&self, split: Split) -> usize {
        self.texts.len(split)
    }
    fn reset(&self, split: Split, item: usize) -> Result<Vec<String>> {
        let text = self.texts.get(self.name(), split, item)?;
        let prompts = if self.task == WritingTask::Tldr { TLDR_PROMPTS } else { ARXIV_PROMPTS };
        Ok(prompts.iter().map(|p| p.replace("{text}", text)).collect())
    }
    fn step(&self, split: Split, item: usize, turn: usize, joint_actions: &[Vec<String>]) -> Result<Outcome> {
        check_step(self, split, item, turn, joint_actions)?;
        let a = &joint_actions[turn];
        let s = score(self.task, &a[0], &a[1], &self.lexicons);
        // The paper runs these tasks for one turn; with more turns each agent is asked to revise.
        let next_observations =
            a.iter().map(|r| format!("\n\nYour previous answer:\n{}\n\nIt scored {:.2}. Revise it.\n", r.trim(), s.reward)).collect();
        Ok(Outcome {
            reward: s.reward,
            next_observations,
            metrics: s.levels.iter().map(|(k, v)| (format!("level_{k}"), *v)).collect(),
            done: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex() -> Lexicons {
        Lexicons {
            stopwords: ["the", "a", "is", "of", "and"].iter().map(|s| s.to_string()).collect(),
            transitions: vec![
                ("contrast".into(), vec!["however".into(), "on the other hand".into()]),
                ("cause_effect".into(), vec!["as a result".into(), "therefore".into()]),
                ("time".into(), vec!["then".into()]),
            ],
        }
    }

    fn w(n: usize, prefix: &str) -> String {
        (0..n).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn words_tokens_jaccard_and_transitions() {
        assert_eq!(words("Hello, WORLD! It's é-x_y 42"), vec!["hello", "world", "it", "s", "é", "x_y", "42"]);
        assert_eq!(tokens("  a  b\tc\n"), 3);
        assert_eq!(unique_words("The the THE cat"), 2);
        let l = lex();
        assert_eq!(jaccard("the", "a is", &l), 1.0, "both empty without stop words");
        assert!((jaccard("cat dog", "dog bird", &l) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(transition_score("nothing here", &l), 0.0);
        assert_eq!(transition_score("However, it rained.", &l), 0.4);
        assert!((transition_score("however... as a result, then", &l) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn tldr_levels_hand_worked() {
        let l = lex();
        // Too short: stops at the length level with nothing.
        let s = score(WritingTask::Tldr, "short one", &w(20, "x"), &l);
        assert_eq!((s.reward, s.stopped_at.as_deref()), (0.0, Some("length")));
        // c1: 10 words "a0".."a9" (29 chars); c2: 25 distinct words, c2 chars / c1 chars = 2.41 → +1;
        // unique 25/10 = 2.5 → +0.5; no transitions, Jaccard 0 → +0.
        let c1 = w(10, "a");
        let c2 = w(25, "b");
        let r = c2.chars().count() as f64 / c1.chars().count() as f64;
        assert!((1.6..=3.2).contains(&r), "{r}");
        let s = score(WritingTask::Tldr, &c1, &c2, &l);
        assert_eq!(s.levels["length"], 0.5);
        assert_eq!(s.levels["ratio"], 1.0);
        assert_eq!(s.levels["unique_words"], 0.5);
        assert_eq!(s.levels["style"], 0.0);
        assert_eq!(s.reward, 2.0);
        // With one transition category (T = 0.4) and overlap 2/29 ≥ 0.03: style = 0.4·0.4 + 0.6.
        let c2t = format!("however {} a0 a1", w(20, "b"));
        let s = score(WritingTask::Tldr, &c1, &c2t, &l);
        assert_eq!((s.levels["ratio"], s.levels["unique_words"]), (1.0, 0.5), "{s:?}");
        assert!((s.levels["style"] - (0.16 + 0.6)).abs() < 1e-12, "{s:?}");
        // Overlap 1/35 is below 0.03: style = 0.16 + 0.6 · (1/35) / 0.03.
        let c2j = format!("however {} a0", w(24, "b"));
        let s = score(WritingTask::Tldr, &c1, &c2j, &l);
        assert!((s.levels["style"] - (0.16 + 0.6 * (1.0 / 35.0) / 0.03)).abs() < 1e-12, "{s:?}");
        // Ratio below 1.1 stops at the ratio level.
        let s = score(WritingTask::Tldr, &c1, &w(10, "c"), &l);
        assert_eq!((s.reward, s.stopped_at.as_deref()), (0.5, Some("ratio")));
    }

    #[test]
    fn arxiv_levels_hand_worked() {
        let l = lex();
        let c1 = w(130, "a");
        // ratio ≈ 1.45 → +1; unique 190/130 = 1.46 → 0.5·(1 − 0.16/0.4) = 0.3.
        let c2 = w(190, "a");
        let s = score(WritingTask::Arxiv, &c1, &c2, &l);
        assert_eq!(s.levels["ratio"], 1.0, "{s:?}");
        let u = 190.0 / 130.0;
        assert!((s.levels["unique_words"] - 0.5 * (1.0 - (u - 1.3) / 0.4)).abs() < 1e-12);
        // Jaccard 130/190 ≥ 0.23 → full 0.6; no transitions.
        assert!((s.levels["style"] - 0.6).abs() < 1e-12);
        // One agent silent: stops at length.
        assert_eq!(score(WritingTask::Arxiv, "", &c2, &l).reward, 0.0);
    }
}
