//! Two-agent summarization with a length-ratio reward (the shape of the paper's TLDR task and of
//! the fixed timing workload): agent 1 writes a one-sentence summary, agent 2 a detailed one.
//!
//! Reward (range [0, 1.5]): +0.5 if both stripped responses are non-empty; then with
//! ratio = chars(c2) / chars(c1): 1.5 ≤ ratio ≤ 3 → +1; below → +ratio / 1.5; above →
//! +max(0, 1 − (ratio − 3) / 3). With more than one turn, each agent's next observation repeats its
//! instruction and the text with its previous answer and asks it to improve.

use crate::{check_step, Env, Outcome, Split, Texts};
use anyhow::{bail, Result};
use std::path::Path;

pub const INSTRUCTIONS: [&str; 2] = [
    "Summarize the following text in one short sentence.",
    "Write a detailed summary of the following text in three or four sentences, keeping all key facts.",
];

/// Built-in texts (written for collm), so the task runs offline. The last two are the eval split.
pub const BUILTIN: [&str; 10] = [
    "Honeybees decide where to build a new nest by debate. Scouts fly out, inspect hollow trees and rock cracks, and come back to dance for the sites they like. The better the site, the longer the dance, and other scouts go to look for themselves. Support grows for the best option until a quorum forms at one site, and then the whole swarm takes off together.",
    "The first public libraries in many towns were funded by a single industrialist who paid for buildings on the condition that the town pay for books and staff. Thousands of libraries opened this way within a few decades. Critics said the gifts polished a ruthless reputation, while supporters pointed out that the buildings gave millions of working people their first free access to books.",
    "Glaciers move because ice, under its own weight, slowly deforms like a very thick liquid. Meltwater at the base can also act as a lubricant, letting the whole glacier slide over the rock. As it moves, a glacier grinds stones into fine powder, which is why glacial rivers often look milky. Measuring this flow helps scientists estimate how fast ice sheets may add water to the sea.",
    "A sourdough starter is a mixture of flour and water colonized by wild yeasts and lactic acid bacteria. The yeasts produce the gas that makes bread rise, while the bacteria produce acids that give the bread its sour taste and help it keep longer. Bakers feed the starter regularly with fresh flour, and a healthy starter can be kept alive for many years.",
    "Lighthouses once depended on keepers who trimmed wicks, wound clockwork and polished lenses through the night. Special lenses made of many glass rings bent the light into a narrow beam that could be seen far out at sea. During the last century most lights were automated, and today many old lighthouses serve as museums while satellite navigation does much of their work.",
    "Octopuses have about five hundred million neurons, and most of them are in their arms rather than in their central brain. Each arm can taste and touch on its own and even keeps reaching for food after it has been cut off. Researchers study these animals to understand how intelligence can arise in a body so different from our own.",
    "Cities can be several degrees warmer than the countryside around them, an effect called the urban heat island. Asphalt and concrete absorb sunlight during the day and release the heat at night, while cars and air conditioners add even more. Planting trees, painting roofs white and building parks are among the cheapest ways to cool neighbourhoods down.",
    "The printing press did not spread evenly. Presses appeared first in trading cities, where merchants had money to invest and readers to sell to. Within fifty years, millions of books had been printed, prices fell sharply, and ideas that once traveled slowly through handwritten copies could reach distant readers within weeks.",
    "Tardigrades are tiny animals, less than a millimetre long, that live in moss, soil and the sea. When their surroundings dry out they curl up, replace much of their water with protective sugars and proteins, and almost stop their metabolism. In this state they can survive extreme cold, radiation and even a trip to open space, then revive when water returns.",
    "Early railways forced towns to agree on the time. Before trains, each town kept its own local time based on the sun, so clocks in neighbouring cities could differ by many minutes. Timetables became confusing and even dangerous, so railway companies adopted a single standard time, and governments later made standard time zones law.",
];

pub struct Summary {
    texts: Texts,
    pub turns: usize,
    /// The ratio band [lo, hi] that earns the full +1 (default [1.5, 3.0]).
    pub band: (f64, f64),
}

/// r(c1, c2) of the length-ratio reward with the default band [1.5, 3].
pub fn pair_reward(c1: &str, c2: &str) -> f64 {
    pair_reward_band(c1, c2, (1.5, 3.0))
}

/// r(c1, c2) with the ratio band (lo, hi): inside → +1; below → +ratio / lo; above →
/// +max(0, 1 − (ratio − hi) / hi).
pub fn pair_reward_band(c1: &str, c2: &str, (lo, hi): (f64, f64)) -> f64 {
    let (c1, c2) = (c1.trim(), c2.trim());
    let mut r = if !c1.is_empty() && !c2.is_empty() { 0.5 } else { 0.0 };
    let n1 = c1.chars().count();
    if n1 == 0 {
        return r;
    }
    let ratio = c2.chars().count() as f64 / n1 as f64;
    r += if (lo..=hi).contains(&ratio) {
        1.0
    } else if ratio < lo {
        ratio / lo
    } else {
        (1.0 - (ratio - hi) / hi).max(0.0)
    };
    r
}

/// Reads the string column `field` of a dataset file (JSON, JSONL, gzipped, Parquet).
pub fn read_texts(path: &Path, field: &str) -> Result<Vec<String>> {
    let rows = crate::dataset::read_rows(path)?;
    rows.iter().enumerate().map(|(i, r)| crate::dataset::string_field(path, i, r, field, "task.text_field").map(String::from)).collect()
}

impl Summary {
    /// The built-in texts: the first eight train, the last two eval.
    pub fn builtin(turns: usize) -> Result<Self> {
        Self::new(Texts::load(None, None, "", &BUILTIN, 2)?, turns)
    }

    pub fn new(texts: Texts, turns: usize) -> Result<Self> {
        if texts.train.is_empty() {
            bail!("summary: the train split is empty");
        }
        if turns == 0 {
            bail!("summary: turns must be at least 1");
        }
        Ok(Self { texts, turns, band: (1.5, 3.0) })
    }
}

impl Env for Summary {
    fn name(&self) -> &str {
        "summary"
    }

    fn num_agents(&self) -> usize {
        2
    }

    fn len(&self, split: Split) -> usize {
        self.texts.len(split)
    }

    fn reset(&self, split: Split, item: usize) -> Result<Vec<String>> {
        let text = self.texts.get("summary", split, item)?;
        Ok(INSTRUCTIONS.iter().map(|i| format!("{i}\n\n{text}")).collect())
    }

    fn step(&self, split: Split, item: usize, turn: usize, joint_actions: &[Vec<String>]) -> Result<Outcome> {
        check_step(self, split, item, turn, joint_actions)?;
        let text = self.texts.get("summary", split, item)?;
        let a = &joint_actions[turn];
        let reward = pair_reward_band(&a[0], &a[1], self.band);
        let next_observations =
            INSTRUCTIONS.iter().zip(a).map(|(i, prev)| format!("{i}\n\n{text}\n\nPrevious answer: {}. Improve it.", prev.trim())).collect();
        Ok(Outcome::new(reward, next_observations))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_reward_matches_hand_values() {
        assert_eq!(pair_reward("", "abc"), 0.0);
        assert_eq!(pair_reward("abc", ""), 0.0); // one empty: no +0.5, ratio 0 → +0
        assert_eq!(pair_reward("abcd", "abcdefgh"), 1.5); // ratio 2
        assert!((pair_reward("abcd", "abcd") - (0.5 + 1.0 / 1.5)).abs() < 1e-12); // ratio 1
        assert!((pair_reward("ab", "abcdefghij") - (0.5 + 1.0 - 2.0 / 3.0)).abs() < 1e-12); // ratio 5
        assert_eq!(pair_reward("a", &"x".repeat(7)), 0.5); // ratio 7 → max(0, ·)
        assert_eq!(pair_reward("  é ", "ééé"), 1.5, "characters, not bytes, and stripped");
        assert_eq!(pair_reward_band("ab", "abcdefgh", (3.0, 6.0)), 1.5); // ratio 4
        assert!((pair_reward_band("ab", "abcd", (3.0, 6.0)) - (0.5 + 2.0 / 3.0)).abs() < 1e-12);
    }

    #[test]
    fn observations_and_feedback() {
        let e = Summary::builtin(2).unwrap();
        let o = e.reset(Split::Eval, 1).unwrap();
        assert!(o[0].starts_with(INSTRUCTIONS[0]) && o[0].ends_with("standard time zones law."));
        let out = e.step(Split::Eval, 1, 0, &[vec!["Short.".into(), "Longer text here.".into()]]).unwrap();
        assert!(out.next_observations[0].ends_with("Previous answer: Short.. Improve it."));
        assert!(e.reset(Split::Eval, 2).is_err());
    }

    #[test]
    fn dataset_rows_without_the_field_are_named() {
        let dir = std::env::temp_dir().join(format!("collm-summary-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.jsonl");
        std::fs::write(&p, "{\"prompt\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
        let err = format!("{:#}", read_texts(&p, "prompt").unwrap_err());
        assert!(err.contains("row 1") && err.contains("'prompt'"), "{err}");
        std::fs::write(&p, "[{\"prompt\": \"a\"}]").unwrap();
        assert_eq!(read_texts(&p, "prompt").unwrap(), vec!["a".to_string()]);
    }
}
