//! StrBuild: a team writes a string in 5×5 block letters on a wall with `/setblock` commands.
//!
//! The world is the box (0, 0, 0)–(W − 1, 4, 0): x grows to the right, y grows upward and z is
//! 0. The string's glyphs ([`super::font`]) stand side by side with [`SPACING`] air columns
//! between them (W = 5·len + 2·(len − 1)); glyph row 0 is the top, y = 4. Agent i may place the
//! blocks of its palette (by default agent 1 `oak_planks`, `stone`; agent 2 `white_concrete`,
//! `obsidian`) and air, which clears a cell. The agents' commands are applied in agent order, so
//! agent 2's overwrite agent 1's. The team may send [`StrBuild::max_commands`] = 300 accepted
//! commands, split evenly (agent 1 takes any remainder), 150 each by default.
//!
//! Reward (of the final world, whoever placed what):
//!   r = 2·coverage − 1.5·extra_ratio − 1·same_texture_ratio − 0.25·missing_palettes (+ reward_shift)
//! - coverage = target cells holding a block / target cells;
//! - extra_ratio = blocks on non-target cells / non-target cells of the box;
//! - same_texture_ratio = pairs of 4-adjacent blocks with the same texture / pairs of 4-adjacent
//!   blocks (0 with no pair); textures: `*_planks`, `*_wood` → wood; `stone`, `cobblestone`,
//!   `*_stone`, `*stone_bricks` → stone; `*_concrete` → concrete; any other block is its own;
//! - missing_palettes = agents some block of whose palette appears nowhere in the world.
//!
//! So r ∈ [−3, 2] and a perfect build (every target cell, nothing else, no same-texture
//! neighbours, every palette block used) scores 2. IoU = covered / (targets + extra) is reported
//! as a metric, as are the parts above and the command counts of [`super::commands::Tally`].
//!
//! Turns: after each turn every agent gets position feedback: all letter cells, a request to
//! take about half of them with no two 4-adjacent, its palette and its previous commands (its
//! first prompt is already in its history). The data has no held-out items: both splits are the
//! whole file, as in the paper.

use super::commands::{read_commands, Command, Rules, Tally};
use super::font::{self, GLYPH_SIZE};
use super::grid::{Bbox, Grid, Pos};
use crate::{check_step, Env, Outcome, Split};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::fmt::Write;
use std::path::Path;

/// Air columns between two glyphs.
pub const SPACING: usize = 2;

/// One string to build.
#[derive(Clone, Debug, PartialEq)]
pub struct StrTask {
    /// The string, upper-cased.
    pub text: String,
    pub difficulty: u32,
    /// The target, top row (y = 4) first; '#' a block, '.' air; character k of a row is x = k.
    pub rows: Vec<String>,
    pub bbox: Bbox,
}

impl StrTask {
    pub fn new(text: &str, difficulty: u32) -> Result<Self> {
        let text = text.trim().to_ascii_uppercase();
        let rows = font::render(&text, SPACING)?;
        let width = rows[0].len() as i32;
        Ok(Self { text, difficulty, rows, bbox: Bbox::new([0, 0, 0], [width - 1, GLYPH_SIZE as i32 - 1, 0]) })
    }

    pub fn is_target(&self, p: Pos) -> bool {
        self.bbox.contains(p) && self.rows[(self.bbox.max[1] - p[1]) as usize].as_bytes()[p[0] as usize] == b'#'
    }

    /// The target cells, top row first, left to right.
    pub fn targets(&self) -> Vec<Pos> {
        let mut v: Vec<Pos> = self.bbox.cells().filter(|p| self.is_target(*p)).collect();
        v.sort_by_key(|p| (-p[1], p[0], p[2]));
        v
    }
}

/// A block's texture, for the same-texture penalty.
pub fn texture(block: &str) -> &str {
    if block == "planks" || block.ends_with("_planks") || block.ends_with("_wood") {
        "wood"
    } else if block == "stone" || block == "cobblestone" || block.ends_with("_stone") || block.ends_with("stone_bricks") {
        "stone"
    } else if block.ends_with("_concrete") {
        "concrete"
    } else {
        block
    }
}

/// A joint action's reward and its parts.
#[derive(Clone, Debug, PartialEq)]
pub struct StrScore {
    /// 2·coverage − 1.5·extra_ratio − same_texture_ratio − 0.25·missing_palettes (no shift).
    pub reward: f64,
    pub coverage: f64,
    pub extra_ratio: f64,
    pub same_texture_ratio: f64,
    pub missing_palettes: usize,
    pub iou: f64,
    pub covered: usize,
    pub targets: usize,
    pub extra: usize,
    pub adjacent_pairs: usize,
    pub same_texture_pairs: usize,
    /// The agents' command counts, summed.
    pub tally: Tally,
}

pub struct StrBuild {
    tasks: Vec<StrTask>,
    palettes: Vec<Vec<String>>,
    /// Accepted commands of the whole team per turn (300), split evenly between the agents.
    pub max_commands: usize,
    /// Added to every reward (the paper trains with −2).
    pub reward_shift: f64,
}

impl StrBuild {
    /// Two agents with the paper's palettes.
    pub fn new(tasks: Vec<StrTask>) -> Result<Self> {
        if tasks.is_empty() {
            bail!("str_build: no tasks");
        }
        let pal = |a: [&str; 2]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Ok(Self {
            tasks,
            palettes: vec![pal(["oak_planks", "stone"]), pal(["white_concrete", "obsidian"])],
            max_commands: 300,
            reward_shift: 0.0,
        })
    }

    /// Reads a CSV file with a header naming a `string` column (and optionally `difficulty`).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file = path.display();
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let Some((_, header)) = lines.next() else { bail!("{file}: empty; expected a header 'string,difficulty' and rows") };
        let header = split_csv(header).with_context(|| format!("{file}: line 1 (header)"))?;
        let col = |name: &str| header.iter().position(|h| h.trim() == name);
        let Some(si) = col("string") else { bail!("{file}: line 1: the header {header:?} has no 'string' column") };
        let di = col("difficulty");
        let mut tasks = vec![];
        for (i, line) in lines {
            let n = i + 1;
            let fields = split_csv(line).with_context(|| format!("{file}: line {n}"))?;
            let Some(s) = fields.get(si) else { bail!("{file}: line {n}: no 'string' field (column {})", si + 1) };
            let difficulty = match di.map(|d| fields.get(d).map(|v| v.trim())) {
                None => 0,
                Some(None) => bail!("{file}: line {n}: no 'difficulty' field"),
                Some(Some(v)) => v.parse().map_err(|_| anyhow::anyhow!("{file}: line {n}: difficulty {v:?} is not a whole number"))?,
            };
            let task = StrTask::new(s, difficulty).map_err(|e| anyhow::anyhow!("{file}: line {n}: string {s:?}: {e}"))?;
            tasks.push(task);
        }
        if tasks.is_empty() {
            bail!("{file}: no rows");
        }
        Self::new(tasks)
    }

    /// Replaces the palettes (one per agent, so this sets the number of agents): non-empty lists
    /// of block names other than air (`minecraft:` prefixes are dropped).
    pub fn with_palettes(mut self, palettes: Vec<Vec<String>>) -> Result<Self> {
        if palettes.is_empty() {
            bail!("str_build: no palettes (one per agent)");
        }
        let palettes: Vec<Vec<String>> = palettes
            .into_iter()
            .map(|p| p.iter().map(|b| super::commands::normalize_block(b.trim()).to_string()).collect::<Vec<_>>())
            .collect();
        for (i, p) in palettes.iter().enumerate() {
            if p.is_empty() || p.iter().any(|b| b.is_empty() || super::grid::is_air(b) || b.contains(char::is_whitespace)) {
                bail!("str_build: agent {}'s palette {p:?} must list one or more blocks other than air", i + 1);
            }
        }
        self.palettes = palettes;
        Ok(self)
    }

    pub fn palettes(&self) -> &[Vec<String>] {
        &self.palettes
    }

    pub fn tasks(&self) -> &[StrTask] {
        &self.tasks
    }

    /// Each agent's cap on accepted commands.
    pub fn caps(&self) -> Vec<usize> {
        split_cap(self.max_commands, self.palettes.len())
    }

    /// The world after the agents' responses (in agent order), and how their lines were handled.
    pub fn build(&self, task: &StrTask, responses: &[&str]) -> (Grid, Tally) {
        let mut grid = Grid::new(task.bbox);
        let mut tally = Tally::default();
        for ((response, palette), cap) in responses.iter().zip(&self.palettes).zip(self.caps()) {
            let rules = Rules { bbox: task.bbox, blocks: palette, cap, setblock: true, fill: false, kill: false, resources: None };
            let (cmds, t) = read_commands(response, &rules);
            tally.add(&t);
            for c in cmds {
                if let Command::SetBlock { at, block } = c {
                    grid.set(at, &block);
                }
            }
        }
        (grid, tally)
    }

    /// Scores one joint action (a response per agent, in agent order).
    pub fn score(&self, task: &StrTask, responses: &[&str]) -> StrScore {
        let (grid, tally) = self.build(task, responses);
        let targets = task.targets().len();
        let covered = grid.blocks().filter(|(p, _)| task.is_target(*p)).count();
        let extra = grid.blocks().count() - covered;
        let background = task.bbox.volume() - targets;
        let (mut adjacent_pairs, mut same_texture_pairs) = (0, 0);
        for (p, b) in grid.blocks() {
            for q in [[p[0] + 1, p[1], p[2]], [p[0], p[1] + 1, p[2]]] {
                if !grid.is_air_at(q) {
                    adjacent_pairs += 1;
                    same_texture_pairs += usize::from(texture(grid.get(q)) == texture(b));
                }
            }
        }
        let present: BTreeSet<&str> = grid.blocks().map(|(_, b)| b).collect();
        let missing_palettes = self.palettes.iter().filter(|p| !p.iter().all(|b| present.contains(b.as_str()))).count();
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let coverage = ratio(covered, targets);
        let extra_ratio = ratio(extra, background);
        let same_texture_ratio = ratio(same_texture_pairs, adjacent_pairs);
        StrScore {
            reward: 2.0 * coverage - 1.5 * extra_ratio - same_texture_ratio - 0.25 * missing_palettes as f64,
            coverage,
            extra_ratio,
            same_texture_ratio,
            missing_palettes,
            iou: ratio(covered, targets + extra),
            covered,
            targets,
            extra,
            adjacent_pairs,
            same_texture_pairs,
            tally,
        }
    }

    /// Agent `agent`'s (0-based) first prompt.
    pub fn prompt(&self, task: &StrTask, agent: usize) -> String {
        let n = self.palettes.len();
        let [x1, y1, _] = task.bbox.max;
        let mut s = String::new();
        let _ = write!(
            s,
            "You are Agent {} of a team of {n} agents building in Minecraft. Together you write the text \"{}\" in block letters \
             on a flat vertical wall. You place some of the blocks and the other agents place the rest; no agent sees the others' \
             commands.",
            agent + 1,
            task.text
        );
        s.push_str(&order_note(agent, n));
        let _ = write!(
            s,
            "\n\nCoordinates are absolute integers: x grows to the right, y grows upward, and z is 0 everywhere. The wall is the box \
             from (0, 0, 0) to ({x1}, {y1}, 0), corners included. Each character is {GLYPH_SIZE} by {GLYPH_SIZE} cells, with {SPACING} \
             empty columns between characters.\n\nTarget ('#' = a block, '.' = air). Each line is one y, from the top (y = {y1}) down \
             to y = 0; character k of a line (counting from 0) is x = k:\n"
        );
        for (r, row) in task.rows.iter().enumerate() {
            let _ = writeln!(s, "y={}: {row}", y1 - r as i32);
        }
        let _ = writeln!(s, "\nYour blocks: {} (air may also be used, to clear a cell).", self.palettes[agent].join(", "));
        for (j, p) in self.palettes.iter().enumerate().filter(|(j, _)| *j != agent) {
            let _ = writeln!(s, "Agent {}'s blocks: {}.", j + 1, p.join(", "));
        }
        let _ = write!(
            s,
            "\nScoring: the more '#' cells hold a block, the better; a block on a '.' cell costs points; two blocks that share a side \
             and have the same texture cost points; and each agent should use every one of its blocks at least once.\nYou may send \
             at most {} commands; commands beyond that are ignored.\n\nReply with commands only, one per line, nothing else:\n\
             /setblock <x> <y> <z> <block>",
            self.caps()[agent]
        );
        s
    }

    /// What agent `agent` reads after `turn`, having sent `response`.
    pub fn feedback(&self, task: &StrTask, agent: usize, turn: usize, response: &str) -> String {
        let targets = task.targets();
        let mut s = String::new();
        let _ = writeln!(s, "\n\nPosition feedback before turn {}:", turn + 2);
        let _ = writeln!(s, "- Coordinates are absolute (x, y, z).");
        let _ = writeln!(
            s,
            "- Take about half of the letter cells (about {}) and place a block on each; the other agents cover the rest.",
            (targets.len() / 2).max(1)
        );
        let _ = writeln!(s, "- Do not take two cells that share a side (4-adjacent).");
        let _ = writeln!(s, "- You may send at most {} commands.", self.caps()[agent]);
        let _ = writeln!(s, "\nAll {} letter cells, top row first:", targets.len());
        for row in targets.chunk_by(|a, b| a[1] == b[1]) {
            let cells: Vec<String> = row.iter().map(|p| format!("({}, {}, {})", p[0], p[1], p[2])).collect();
            let _ = writeln!(s, "{}", cells.join(" "));
        }
        let _ = writeln!(s, "\nYour blocks: {} (and air).", self.palettes[agent].join(", "));
        let _ = writeln!(s, "Reply with commands only, one per line: /setblock <x> <y> <z> <block>");
        let prev = response.trim();
        let _ = write!(s, "\nYour previous commands:\n{}\n", if prev.is_empty() { "(none)" } else { prev });
        s
    }

    fn task(&self, split: Split, item: usize) -> Result<&StrTask> {
        let _ = split; // both splits are the whole data set
        self.tasks.get(item).with_context(|| format!("str_build: item {item} is outside the data ({} items)", self.tasks.len()))
    }
}

/// Splits a team's command budget between `n` agents, agent 1 taking the remainder.
pub(crate) fn split_cap(total: usize, n: usize) -> Vec<usize> {
    let n = n.max(1);
    let mut caps = vec![(total / n).max(1); n];
    caps[0] += total % n;
    caps
}

/// How agent `agent`'s commands are ordered against the others'.
pub(crate) fn order_note(agent: usize, n: usize) -> String {
    if n == 1 {
        String::new()
    } else if agent == 0 {
        " Your commands are applied first; where a later agent sets the same cell, its block replaces yours.".to_string()
    } else {
        format!(" Your commands are applied after Agent {agent}'s, so where you set a cell an earlier agent also set, your block replaces theirs.")
    }
}

/// The fields of one CSV line (double quotes group, `""` inside quotes is a quote).
fn split_csv(line: &str) -> Result<Vec<String>> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.trim_end_matches('\r').chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                fields.last_mut().unwrap().push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(String::new()),
            _ => fields.last_mut().unwrap().push(c),
        }
    }
    if quoted {
        bail!("unterminated quote");
    }
    Ok(fields)
}

impl Env for StrBuild {
    fn name(&self) -> &str {
        "str_build"
    }
    fn num_agents(&self) -> usize {
        self.palettes.len()
    }
    fn len(&self, _split: Split) -> usize {
        self.tasks.len()
    }
    fn reset(&self, split: Split, item: usize) -> Result<Vec<String>> {
        let task = self.task(split, item)?;
        Ok((0..self.num_agents()).map(|a| self.prompt(task, a)).collect())
    }
    fn step(&self, split: Split, item: usize, turn: usize, joint_actions: &[Vec<String>]) -> Result<Outcome> {
        check_step(self, split, item, turn, joint_actions)?;
        let task = self.task(split, item)?;
        let responses: Vec<&str> = joint_actions[turn].iter().map(|s| s.as_str()).collect();
        let sc = self.score(task, &responses);
        let next = responses.iter().enumerate().map(|(a, r)| self.feedback(task, a, turn, r)).collect();
        Ok(Outcome::new(sc.reward + self.reward_shift, next)
            .with_metric("iou", sc.iou)
            .with_metric("coverage", sc.coverage)
            .with_metric("extra_ratio", sc.extra_ratio)
            .with_metric("same_texture_ratio", sc.same_texture_ratio)
            .with_metric("missing_palettes", sc.missing_palettes as f64)
            .with_metrics(sc.tally.metrics()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    fn li() -> (StrBuild, StrTask) {
        let t = StrTask::new("LI", 3).unwrap();
        (StrBuild::new(vec![t.clone()]).unwrap(), t)
    }

    /// Agent 1 takes the target cells with x + y even, agent 2 the odd ones (never 4-adjacent
    /// within an agent), each alternating its two blocks.
    fn perfect(task: &StrTask) -> [String; 2] {
        let pal = [["oak_planks", "stone"], ["white_concrete", "obsidian"]];
        let mut out = [String::new(), String::new()];
        let mut k = [0; 2];
        for p in task.targets() {
            let a = ((p[0] + p[1]) % 2) as usize;
            let _ = writeln!(out[a], "/setblock {} {} {} {}", p[0], p[1], p[2], pal[a][k[a] % 2]);
            k[a] += 1;
        }
        out
    }

    fn score(env: &StrBuild, task: &StrTask, a: &str, b: &str) -> StrScore {
        env.score(task, &[a, b])
    }

    #[test]
    fn two_letter_glyphs_cells_and_box() {
        let (_, t) = li();
        assert_eq!(t.rows, vec!["#......#####", "#........#..", "#........#..", "#........#..", "#####..#####"]);
        assert_eq!(t.bbox, Bbox::new([0, 0, 0], [11, 4, 0]));
        let cells = t.targets();
        assert_eq!(cells.len(), 22);
        assert_eq!(&cells[..7], &[[0, 4, 0], [7, 4, 0], [8, 4, 0], [9, 4, 0], [10, 4, 0], [11, 4, 0], [0, 3, 0]]);
        assert_eq!(cells[cells.len() - 1], [11, 0, 0]);
        assert!(t.is_target([9, 2, 0]) && t.is_target([4, 0, 0]) && !t.is_target([5, 0, 0]) && !t.is_target([1, 4, 0]));
        assert!(!t.is_target([0, 4, 1]) && !t.is_target([12, 0, 0]));
        assert_eq!(t.text, "LI");
        assert_eq!(StrTask::new(" mc ", 2).unwrap().text, "MC");
    }

    #[test]
    fn perfect_build_scores_the_maximum_two() {
        let (env, t) = li();
        let [a, b] = perfect(&t);
        let s = score(&env, &t, &a, &b);
        // 2·1 − 1.5·0 − 1·0 − 0.25·0; the 20 adjacent pairs (L 8, I 12) all differ.
        assert_eq!((s.reward, s.coverage, s.iou, s.extra, s.missing_palettes), (2.0, 1.0, 1.0, 0, 0));
        assert_eq!((s.adjacent_pairs, s.same_texture_pairs, s.covered, s.targets), (20, 0, 22, 22));
        assert_eq!(s.tally.accepted, 22);
    }

    #[test]
    fn empty_outputs_score_minus_half() {
        let (env, t) = li();
        let s = score(&env, &t, "", "  \n");
        // Nothing covered, no extras, no pairs; both palettes unused: −0.25·2.
        assert_eq!((s.reward, s.coverage, s.iou, s.same_texture_ratio, s.missing_palettes), (-0.5, 0.0, 0.0, 0.0, 2));
    }

    #[test]
    fn one_agent_silent_costs_its_palette() {
        let (env, t) = li();
        let [a, _] = perfect(&t);
        let s = score(&env, &t, &a, "");
        // Agent 1's 11 even cells of 22 (L 5, I 6), no two adjacent: 2·0.5 − 0.25.
        assert_eq!((s.covered, s.adjacent_pairs, s.missing_palettes), (11, 0, 1));
        assert_eq!((s.reward, s.coverage, s.iou), (0.75, 0.5, 0.5));
    }

    #[test]
    fn extra_blocks_are_penalized_per_background_cell() {
        let (env, t) = li();
        let [a, b] = perfect(&t);
        // Two isolated background cells (no neighbours): 60 cells − 22 targets = 38 background.
        let a = format!("{a}/setblock 5 4 0 stone\n/setblock 5 2 0 oak_planks\n");
        let s = score(&env, &t, &a, &b);
        assert_eq!((s.extra, s.adjacent_pairs), (2, 20));
        assert!(close(s.extra_ratio, 2.0 / 38.0));
        assert!(close(s.reward, 2.0 - 1.5 * 2.0 / 38.0), "{s:?}");
        assert!(close(s.iou, 22.0 / 24.0));
    }

    #[test]
    fn same_texture_neighbours_are_penalized() {
        let (env, t) = li();
        // Agent 1: the whole L in oak_planks (8 same pairs, stone unused); agent 2: the I
        // checkered white_concrete / obsidian (12 differing pairs).
        let mut a = String::new();
        let mut b = String::new();
        for p in t.targets() {
            if p[0] < 5 {
                let _ = writeln!(a, "/setblock {} {} 0 oak_planks", p[0], p[1]);
            } else {
                let blk = if (p[0] + p[1]) % 2 == 0 { "white_concrete" } else { "obsidian" };
                let _ = writeln!(b, "/setblock {} {} 0 {blk}", p[0], p[1]);
            }
        }
        let s = score(&env, &t, &a, &b);
        assert_eq!((s.adjacent_pairs, s.same_texture_pairs, s.missing_palettes), (20, 8, 1));
        // 2·1 − 0 − 8/20 − 0.25.
        assert!(close(s.reward, 1.35), "{s:?}");
        assert_eq!(texture("oak_planks"), "wood");
        assert_eq!(texture("stone_bricks"), "stone");
        assert_eq!(texture("red_concrete"), texture("white_concrete"));
        assert_eq!(texture("obsidian"), "obsidian");
    }

    #[test]
    fn out_of_range_coordinates_are_ignored_and_counted() {
        let (env, t) = li();
        let [a, b] = perfect(&t);
        let a = format!("{a}/setblock 12 0 0 stone\n/setblock 0 5 0 stone\n/setblock 0 0 1 stone\n/setblock -1 0 0 stone\n");
        let s = score(&env, &t, &a, &b);
        assert_eq!(s.reward, 2.0);
        assert_eq!((s.tally.out_of_range, s.tally.accepted, s.tally.malformed), (4, 22, 0));
    }

    #[test]
    fn unknown_and_foreign_blocks_are_ignored_and_counted() {
        let (env, t) = li();
        // diamond_block is nobody's, white_concrete is agent 2's, "Stone" is not "stone".
        let a = "/setblock 0 0 0 diamond_block\n/setblock 0 1 0 white_concrete\n/setblock 0 2 0 minecraft:stone\n/setblock 0 3 0 Stone";
        let s = score(&env, &t, a, "");
        assert_eq!((s.tally.unknown_block, s.tally.accepted, s.covered, s.missing_palettes), (3, 1, 1, 2));
        assert!(close(s.reward, 2.0 / 22.0 - 0.5), "{s:?}");
    }

    #[test]
    fn garbage_lines_are_malformed_not_errors() {
        let (env, t) = li();
        let a = "Sure! Here are my commands:\n```mcfunction\n/setblock 0 4 0 oak_planks\n  setblock 0 3 0 minecraft:stone\n\
                 héllo wörld 🚀\n/setblock ０ 0 0 stone\n/sétblock 0 0 0 stone\n/setblock ~ 0 0 stone\n/setblock 0 0 0\n\
                 /fill 0 0 0 1 0 0 stone\n\u{0}\u{7f}\u{fffd}\n```\n";
        let s = score(&env, &t, a, "\u{1F600}\u{1F600}");
        assert_eq!((s.tally.malformed, s.tally.accepted), (9, 2));
        // (0,4) wood over (0,3) stone: one differing pair; agent 2's palette unused.
        assert_eq!((s.covered, s.adjacent_pairs, s.same_texture_pairs, s.missing_palettes), (2, 1, 0, 1));
        assert!(close(s.reward, 4.0 / 22.0 - 0.25), "{s:?}");
    }

    #[test]
    fn commands_past_150_per_agent_are_ignored() {
        let (env, t) = li();
        assert_eq!(env.caps(), vec![150, 150]);
        // Malformed lines do not use the cap; the 151st accepted command and after are ignored.
        let a = format!("junk\n{}/setblock 0 3 0 stone\njunk\n", "/setblock 0 4 0 oak_planks\n".repeat(150));
        let s = score(&env, &t, &a, "");
        assert_eq!((s.tally.accepted, s.tally.over_cap, s.tally.malformed), (150, 2, 1));
        // Only (0,4) is covered and stone never lands: 2/22 − 0.25·2.
        assert_eq!(s.covered, 1);
        assert!(close(s.reward, 2.0 / 22.0 - 0.5), "{s:?}");
    }

    #[test]
    fn agent_two_applies_last() {
        let (env, t) = li();
        let a = "/setblock 0 4 0 oak_planks\n/setblock 0 3 0 oak_planks\n/setblock 0 2 0 stone";
        let b = "/setblock 0 4 0 obsidian\n/setblock 0 2 0 air";
        let (g, _) = env.build(&t, &[a, b]);
        assert_eq!((g.get([0, 4, 0]), g.get([0, 3, 0]), g.get([0, 2, 0])), ("obsidian", "oak_planks", "air"));
        let s = score(&env, &t, a, b);
        // Two covered cells, their pair differs (wood / obsidian); stone and white_concrete absent.
        assert_eq!((s.covered, s.adjacent_pairs, s.same_texture_pairs, s.missing_palettes), (2, 1, 0, 2));
        assert!(close(s.reward, 4.0 / 22.0 - 0.5), "{s:?}");
    }

    #[test]
    fn env_step_shift_metrics_and_feedback() {
        let (mut env, t) = li();
        env.reward_shift = -2.0;
        let [a, b] = perfect(&t);
        let out = env.step(Split::Train, 0, 0, &[vec![a.clone(), b.clone()]]).unwrap();
        assert_eq!(out.reward, 0.0);
        assert_eq!((out.metrics["iou"], out.metrics["coverage"], out.metrics["malformed"]), (1.0, 1.0, 0.0));
        let fb = &out.next_observations[0];
        assert!(fb.contains("before turn 2") && fb.contains("about 11") && fb.contains("at most 150 commands"), "{fb}");
        assert!(fb.contains("All 22 letter cells") && fb.contains("(0, 4, 0) (7, 4, 0) (8, 4, 0)") && fb.contains("(9, 2, 0)"), "{fb}");
        assert!(fb.contains(&format!("Your previous commands:\n{}\n", a.trim())), "{fb}");
        assert!(fb.contains("Your blocks: oak_planks, stone"));
        assert!(out.next_observations[1].contains("Your blocks: white_concrete, obsidian"));
        assert!(env.step(Split::Train, 0, 1, &[vec!["".into(), "".into()], vec!["".into(), "".into()]]).unwrap().next_observations[0]
            .contains("before turn 3:\n"));
        assert!(env.step(Split::Train, 0, 0, &[vec!["".into()]]).is_err());
        assert!(env.step(Split::Eval, 1, 0, &[vec!["".into(), "".into()]]).is_err());
    }

    #[test]
    fn prompts_state_role_palette_box_and_target() {
        let (env, _) = li();
        let p = env.reset(Split::Eval, 0).unwrap();
        assert_eq!(p.len(), 2);
        assert_ne!(p[0], p[1]);
        assert!(p[0].contains("You are Agent 1 of a team of 2") && p[1].contains("You are Agent 2 of a team of 2"));
        assert!(p[0].contains("\"LI\"") && p[0].contains("from (0, 0, 0) to (11, 4, 0)"));
        assert!(p[0].contains("y=4: #......#####\n") && p[0].contains("y=0: #####..#####\n"));
        assert!(p[0].contains("Your blocks: oak_planks, stone") && p[0].contains("Agent 2's blocks: white_concrete, obsidian."));
        assert!(p[1].contains("Your blocks: white_concrete, obsidian") && p[1].contains("after Agent 1's"));
        assert!(p[0].contains("at most 150 commands") && p[0].contains("/setblock <x> <y> <z> <block>"));
        assert!(p[0].contains("others' commands. Your commands are applied first;"), "{}", p[0]);
    }

    #[test]
    fn palettes_set_the_team() {
        let (env, t) = li();
        let env = env.with_palettes(vec![vec!["minecraft:stone".into(), "oak_planks".into()]]).unwrap();
        assert_eq!((env.num_agents(), env.caps()), (1, vec![300]));
        assert_eq!(env.palettes()[0], vec!["stone", "oak_planks"]);
        let s = env.score(&t, &["/setblock 0 4 0 stone\n/setblock 0 3 0 oak_planks"]);
        assert!(close(s.reward, 4.0 / 22.0), "{s:?}");
        assert!(li().0.with_palettes(vec![vec!["air".into()]]).is_err());
        assert!(li().0.with_palettes(vec![]).is_err());
        assert_eq!(split_cap(301, 2), vec![151, 150]);
    }

    fn shared() -> std::path::PathBuf {
        std::env::var_os("COLLM_SHARED")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
    }

    #[test]
    fn loads_the_data_file() {
        let env = StrBuild::load(&shared().join("data/minecraft/str_build.csv")).unwrap();
        assert_eq!((env.len(Split::Train), env.len(Split::Eval)), (10, 10));
        let texts: Vec<&str> = env.tasks().iter().map(|t| t.text.as_str()).collect();
        assert_eq!(texts, ["I", "C", "M", "L", "MC", "CM", "LI", "LLM", "ICML", "CLIM"]);
        let first = &env.tasks()[0];
        assert_eq!((first.bbox, first.difficulty, first.targets().len()), (Bbox::new([0, 0, 0], [4, 4, 0]), 1, 13));
        let last = &env.tasks()[9];
        assert_eq!((last.bbox.max, last.difficulty, last.targets().len()), ([25, 4, 0], 3, 11 + 9 + 13 + 13));
        assert_eq!(env.reset(Split::Train, 9).unwrap(), env.reset(Split::Eval, 9).unwrap());
    }

    #[test]
    fn load_errors_name_the_file_and_line() {
        let dir = std::env::temp_dir().join(format!("collm-str-build-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let try_load = |name: &str, body: &str| {
            let p = dir.join(name);
            std::fs::write(&p, body).unwrap();
            format!("{:#}", StrBuild::load(&p).err().expect("an error"))
        };
        let e = try_load("glyph.csv", "string,difficulty\n\"MC\",2\n\"I!\",1\n");
        assert!(e.contains("glyph.csv: line 3") && e.contains("'!'"), "{e}");
        let e = try_load("diff.csv", "string,difficulty\nMC,hard\n");
        assert!(e.contains("diff.csv: line 2") && e.contains("\"hard\""), "{e}");
        let e = try_load("header.csv", "text,difficulty\nMC,2\n");
        assert!(e.contains("header.csv: line 1") && e.contains("'string'"), "{e}");
        let e = try_load("quote.csv", "string,difficulty\n\"MC,2\n");
        assert!(e.contains("quote.csv: line 2") && e.contains("unterminated"), "{e}");
        let e = try_load("empty.csv", "string,difficulty\n");
        assert!(e.contains("empty.csv: no rows"), "{e}");
        assert!(format!("{:#}", StrBuild::load(&dir.join("missing.csv")).err().unwrap()).contains("missing.csv"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
