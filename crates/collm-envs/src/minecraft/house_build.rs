//! HouseBuild: a team builds a house (6×7×7 in the data) from its y-layers with `/fill`, under
//! per-agent resource limits, while spiders attack.
//!
//! The world is the task's box (by default (0, 0, 0)–(5, 6, 6)), all air at first; x and z are
//! horizontal, y is up. Layer y's row k is z = min z + k and character j of a row is
//! x = min x + j. Every agent may use every non-air block of the task's legend and air. The
//! agents' accepted commands are applied in agent order (agent 2's overwrite agent 1's).
//! Commands: `/fill x1 y1 z1 x2 y2 z2 block` (corners inclusive, in any order, both inside the
//! box) and `/kill`. The team may send [`HouseBuild::max_commands`] = 600 accepted commands, split
//! evenly (agent 1 takes any remainder).
//!
//! Resources: with n agents and `count` target cells of a block, each agent may fill at most
//! ⌈count/n⌉ + ⌊count/(2n)⌋ cells with it, summed over its commands (air is free); a fill that
//! would pass the limit is ignored whole and counted as `over_resource`.
//!
//! Spiders: at every turn [`HouseBuild::spiders`] = 3 spiders attack, each for an amount drawn
//! uniformly from [`HouseBuild::spider_attack`] = 1..=3 by a hash of (seed, item, turn, spider),
//! so a step is a pure function of its inputs; the damage of a turn is that turn's attacks (it
//! does not accumulate). The prompt states the attacks of the coming turn. If any agent's
//! accepted commands include `/kill`, the spiders die and the turn does no damage.
//!
//! Reward:
//!   r = match_fraction − 0.1·min(1, damage / player_hp) (+ reward_shift)
//! where match_fraction = cells (air included) whose block equals the target's / all cells of
//! the box, and damage = the turn's total attack, 0 if some agent sent `/kill`. IoU over non-air
//! cells (either block counts, as in the reference) is reported as a metric, with `match_fraction`,
//! `damage`, `spider_penalty`, `killed` and the command counts.
//!
//! Turns: after each turn every agent reads "Previous reward: r" (r without the shift), its
//! prompt again (with the next turn's spider attacks) and its previous commands. The data has no
//! held-out items: both splits are the whole file, as in the paper.

use super::commands::{normalize_block, read_commands, Command, Rules, Tally};
use super::grid::{is_air, Bbox, Grid, Pos};
use super::str_build::{order_note, split_cap};
use crate::{check_step, Env, Outcome, Split};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

/// One house to build.
#[derive(Clone, Debug, PartialEq)]
pub struct HouseTask {
    pub task_id: String,
    /// Letter → block (one letter is air).
    pub legend: BTreeMap<char, String>,
    /// Target cells per letter.
    pub counts: BTreeMap<char, usize>,
    pub bbox: Bbox,
    /// `layers[y − min y][z − min z]` is a row of letters; character j is x = min x + j.
    pub layers: Vec<Vec<String>>,
}

impl HouseTask {
    /// Reads item `index` of a data file (`file` names it in errors).
    pub fn from_json(v: &Value, file: &str, index: usize) -> Result<Self> {
        let id = v.get("task_id").and_then(Value::as_str).unwrap_or("?").to_string();
        let err = |msg: String| anyhow!("{file}: item {index} (task_id {id:?}): {msg}");
        let obj = v.as_object().ok_or_else(|| err("not an object".into()))?;
        let field = |name: &str| obj.get(name).ok_or_else(|| err(format!("missing field '{name}'")));
        field("task_id")?.as_str().ok_or_else(|| err("'task_id' is not a string".into()))?;

        let mut legend = BTreeMap::new();
        let inv = field("inventory")?.as_object().ok_or_else(|| err("'inventory' is not an object".into()))?;
        for (k, b) in inv {
            let mut chars = k.chars();
            let (Some(letter), None) = (chars.next(), chars.next()) else {
                return Err(err(format!("inventory key {k:?} is not a single letter")));
            };
            let block = b.as_str().map(|s| normalize_block(s.trim())).filter(|s| !s.is_empty() && !s.contains(char::is_whitespace));
            let block = block.ok_or_else(|| err(format!("inventory.{k} is not a block name: {b}")))?;
            legend.insert(letter, block.to_string());
        }
        if legend.is_empty() {
            return Err(err("'inventory' is empty".into()));
        }

        let spec = field("target_spec")?;
        let sfield = |name: &str| spec.get(name).ok_or_else(|| err(format!("missing field 'target_spec.{name}'")));
        if sfield("type")?.as_str() != Some("y_layers") {
            return Err(err(format!("target_spec.type is {}, expected \"y_layers\"", sfield("type")?)));
        }
        let size: Vec<usize> = sfield("size")?
            .as_array()
            .filter(|a| a.len() == 3)
            .and_then(|a| a.iter().map(|x| x.as_u64().filter(|&x| x > 0).map(|x| x as usize)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| err(format!("target_spec.size is {}, expected 3 positive integers [x, y, z]", spec["size"])))?;
        let (sx, sy, sz) = (size[0], size[1], size[2]);
        let layer_list = sfield("layers")?.as_array().ok_or_else(|| err("target_spec.layers is not a list".into()))?;
        if layer_list.len() != sy {
            return Err(err(format!("target_spec.layers has {} layers, size says {sy}", layer_list.len())));
        }
        let mut by_y: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        let mut counted: BTreeMap<char, usize> = BTreeMap::new();
        for (li, layer) in layer_list.iter().enumerate() {
            let y = layer.get("y").and_then(Value::as_i64).ok_or_else(|| err(format!("target_spec.layers[{li}]: missing integer 'y'")))?;
            let rows = layer
                .get("rows")
                .and_then(Value::as_array)
                .ok_or_else(|| err(format!("target_spec.layers[{li}] (y={y}): missing list 'rows'")))?;
            if rows.len() != sz {
                return Err(err(format!("target_spec.layers[{li}] (y={y}): {} rows, size says {sz} (z)", rows.len())));
            }
            let mut out = vec![];
            for (ri, row) in rows.iter().enumerate() {
                let row = row.as_str().ok_or_else(|| err(format!("target_spec.layers[{li}] (y={y}) row {ri} is not a string")))?;
                if row.chars().count() != sx {
                    return Err(err(format!(
                        "target_spec.layers[{li}] (y={y}) row {ri} {row:?} has {} letters, size says {sx} (x)",
                        row.chars().count()
                    )));
                }
                for c in row.chars() {
                    if !legend.contains_key(&c) {
                        return Err(err(format!(
                            "target_spec.layers[{li}] (y={y}) row {ri} {row:?}: letter {c:?} is not in the inventory"
                        )));
                    }
                    *counted.entry(c).or_default() += 1;
                }
                out.push(row.to_string());
            }
            if by_y.insert(y, out).is_some() {
                return Err(err(format!("target_spec.layers: y={y} appears twice")));
            }
        }

        let from = match obj.get("bbox") {
            None | Some(Value::Null) => [0, *by_y.keys().next().unwrap() as i32, 0],
            Some(b) => {
                let corner = |name: &str| {
                    b.get(name)
                        .and_then(Value::as_array)
                        .filter(|a| a.len() == 3)
                        .and_then(|a| a.iter().map(|x| x.as_i64().map(|x| x as i32)).collect::<Option<Vec<_>>>())
                        .map(|v| [v[0], v[1], v[2]])
                        .ok_or_else(|| err(format!("bbox.{name} is not 3 integers")))
                };
                let (f, t) = (corner("from")?, corner("to")?);
                if t != [f[0] + sx as i32 - 1, f[1] + sy as i32 - 1, f[2] + sz as i32 - 1] {
                    return Err(err(format!("bbox {f:?}..{t:?} does not span target_spec.size {size:?}")));
                }
                f
            }
        };
        let bbox = Bbox::new(from, [from[0] + sx as i32 - 1, from[1] + sy as i32 - 1, from[2] + sz as i32 - 1]);
        let mut layers = vec![];
        for y in bbox.min[1]..=bbox.max[1] {
            layers.push(by_y.remove(&(y as i64)).ok_or_else(|| err(format!("target_spec.layers has no layer y={y}")))?);
        }

        let count_obj = field("count")?.as_object().ok_or_else(|| err("'count' is not an object".into()))?;
        let mut counts = BTreeMap::new();
        for (k, n) in count_obj {
            let letter = k.chars().next().filter(|c| k.chars().count() == 1 && legend.contains_key(c));
            let letter = letter.ok_or_else(|| err(format!("count key {k:?} is not an inventory letter")))?;
            let n = n.as_u64().ok_or_else(|| err(format!("count.{k} is not a whole number: {n}")))? as usize;
            counts.insert(letter, n);
        }
        for &c in legend.keys() {
            let (given, seen) = (counts.get(&c).copied().unwrap_or(0), counted.get(&c).copied().unwrap_or(0));
            if given != seen {
                return Err(err(format!("count.{c} is {given} but the layers hold {seen} cells of {c:?}")));
            }
        }
        Ok(Self { task_id: id.clone(), legend, counts, bbox, layers })
    }

    /// The target block at `p` ("air" outside the box).
    pub fn expected(&self, p: Pos) -> &str {
        if !self.bbox.contains(p) {
            return "air";
        }
        let [x, y, z] = [0, 1, 2].map(|i| (p[i] - self.bbox.min[i]) as usize);
        let c = self.layers[y][z].chars().nth(x).unwrap();
        &self.legend[&c]
    }

    /// Target cells per non-air block.
    pub fn block_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (c, b) in &self.legend {
            if !is_air(b) {
                *m.entry(b.clone()).or_default() += self.counts.get(c).copied().unwrap_or(0);
            }
        }
        m
    }

    /// Each agent's limit per non-air block with `n` agents: ⌈count/n⌉ + ⌊count/(2n)⌋.
    pub fn limits(&self, n: usize) -> BTreeMap<String, usize> {
        let n = n.max(1);
        self.block_counts().into_iter().map(|(b, c)| (b, c.div_ceil(n) + c / (2 * n))).collect()
    }

    /// The non-air blocks, in legend order.
    pub fn blocks(&self) -> Vec<String> {
        let mut v: Vec<String> = vec![];
        for b in self.legend.values() {
            if !is_air(b) && !v.contains(b) {
                v.push(b.clone());
            }
        }
        v
    }

    /// Layer `y` as boxes of one block, greedily: from each uncovered cell (z then x order), the
    /// longest run along x, then extended along z while the rows below repeat it.
    pub fn rects(&self, y: i32) -> Vec<(Pos, Pos, &str)> {
        let rows: Vec<Vec<char>> = self.layers[(y - self.bbox.min[1]) as usize].iter().map(|r| r.chars().collect()).collect();
        let (sz, sx) = (rows.len(), rows[0].len());
        let mut done = vec![vec![false; sx]; sz];
        let mut out = vec![];
        for z in 0..sz {
            for x in 0..sx {
                let c = rows[z][x];
                if done[z][x] || is_air(&self.legend[&c]) {
                    continue;
                }
                let mut x2 = x;
                while x2 + 1 < sx && rows[z][x2 + 1] == c && !done[z][x2 + 1] {
                    x2 += 1;
                }
                let mut z2 = z;
                while z2 + 1 < sz && (x..=x2).all(|k| rows[z2 + 1][k] == c && !done[z2 + 1][k]) {
                    z2 += 1;
                }
                for row in &mut done[z..=z2] {
                    row[x..=x2].iter_mut().for_each(|d| *d = true);
                }
                let [mx, _, mz] = self.bbox.min;
                out.push(([mx + x as i32, y, mz + z as i32], [mx + x2 as i32, y, mz + z2 as i32], self.legend[&c].as_str()));
            }
        }
        out
    }
}

/// A joint action's reward and its parts.
#[derive(Clone, Debug, PartialEq)]
pub struct HouseScore {
    /// match_fraction − spider_penalty (no shift).
    pub reward: f64,
    pub match_fraction: f64,
    pub matched: usize,
    pub cells: usize,
    pub iou: f64,
    /// Some agent sent an accepted `/kill`.
    pub killed: bool,
    /// The turn's spider attacks.
    pub attacks: Vec<u32>,
    /// Damage taken: the attacks' total, 0 if killed.
    pub damage: f64,
    pub spider_penalty: f64,
    /// The agents' command counts, summed.
    pub tally: Tally,
}

pub struct HouseBuild {
    tasks: Vec<HouseTask>,
    /// Team size n (2); it sets the resource limits and the command split.
    pub num_agents: usize,
    /// Accepted commands of the whole team per turn (600), split evenly between the agents.
    pub max_commands: usize,
    pub player_hp: f64,
    pub spiders: usize,
    /// Inclusive range of one spider's attack.
    pub spider_attack: (u32, u32),
    /// Weight of the spider penalty (0.1).
    pub damage_weight: f64,
    /// Seeds the spider attacks.
    pub seed: u64,
    /// Added to every reward (the paper trains with −1).
    pub reward_shift: f64,
}

fn mix(mut z: u64) -> u64 {
    // splitmix64's finalizer.
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl HouseBuild {
    pub fn new(tasks: Vec<HouseTask>) -> Result<Self> {
        if tasks.is_empty() {
            bail!("house_build: no tasks");
        }
        Ok(Self {
            tasks,
            num_agents: 2,
            max_commands: 600,
            player_hp: 5.0,
            spiders: 3,
            spider_attack: (1, 3),
            damage_weight: 0.1,
            seed: 42,
            reward_shift: 0.0,
        })
    }

    /// Reads the houses of a dataset file (a JSON list, JSONL, `.gz` or Parquet; one house a row).
    pub fn load(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let rows = crate::dataset::read_rows(path)?;
        let tasks =
            rows.into_iter().enumerate().map(|(i, r)| HouseTask::from_json(&Value::Object(r), &file, i)).collect::<Result<Vec<_>>>()?;
        if tasks.is_empty() {
            bail!("{file}: no houses");
        }
        Self::new(tasks)
    }

    pub fn tasks(&self) -> &[HouseTask] {
        &self.tasks
    }

    fn check(&self) -> Result<()> {
        if self.num_agents == 0 {
            bail!("house_build: num_agents must be at least 1");
        }
        if self.spider_attack.0 > self.spider_attack.1 {
            bail!("house_build: spider_attack {:?} is not a range low..=high", self.spider_attack);
        }
        Ok(())
    }

    pub fn caps(&self) -> Vec<usize> {
        split_cap(self.max_commands, self.num_agents)
    }

    /// Each spider's attack at `turn` of `item`.
    pub fn spider_attacks(&self, item: usize, turn: usize) -> Vec<u32> {
        let (lo, hi) = self.spider_attack;
        let span = u64::from(hi.saturating_sub(lo)) + 1;
        (0..self.spiders).map(|k| lo + (mix(mix(mix(self.seed) ^ item as u64) ^ ((turn as u64) << 20 | k as u64)) % span) as u32).collect()
    }

    /// The world after the agents' responses (in agent order), whether one sent `/kill`, and how
    /// their lines were handled.
    pub fn build(&self, task: &HouseTask, responses: &[&str]) -> (Grid, bool, Tally) {
        let mut grid = Grid::new(task.bbox);
        let (blocks, limits) = (task.blocks(), task.limits(self.num_agents));
        let mut tally = Tally::default();
        let mut killed = false;
        for (response, cap) in responses.iter().zip(self.caps()) {
            let rules = Rules { bbox: task.bbox, blocks: &blocks, cap, setblock: false, fill: true, kill: true, resources: Some(&limits) };
            let (cmds, t) = read_commands(response, &rules);
            tally.add(&t);
            for c in cmds {
                match c {
                    Command::Fill { from, to, block } => grid.fill(from, to, &block),
                    Command::Kill => killed = true,
                    Command::SetBlock { at, block } => {
                        grid.set(at, &block);
                    }
                }
            }
        }
        (grid, killed, tally)
    }

    /// Scores one joint action under the given spider attacks.
    pub fn score(&self, task: &HouseTask, attacks: &[u32], responses: &[&str]) -> HouseScore {
        let (grid, killed, tally) = self.build(task, responses);
        let cells = task.bbox.volume();
        let (mut matched, mut both, mut expected, mut observed) = (0, 0, 0, 0);
        for p in task.bbox.cells() {
            let (want, got) = (task.expected(p), grid.get(p));
            matched += usize::from(want == got);
            expected += usize::from(!is_air(want));
            observed += usize::from(!is_air(got));
            both += usize::from(!is_air(want) && !is_air(got));
        }
        let union = expected + observed - both;
        let damage = if killed { 0.0 } else { attacks.iter().map(|&a| f64::from(a)).sum() };
        let spider_penalty =
            if self.player_hp > 0.0 && damage > 0.0 { self.damage_weight * (damage / self.player_hp).min(1.0) } else { 0.0 };
        let match_fraction = matched as f64 / cells as f64;
        HouseScore {
            reward: match_fraction - spider_penalty,
            match_fraction,
            matched,
            cells,
            iou: if union == 0 { 0.0 } else { both as f64 / union as f64 },
            killed,
            attacks: attacks.to_vec(),
            damage,
            spider_penalty,
            tally,
        }
    }

    /// Agent `agent`'s (0-based) prompt for a turn with these spider attacks.
    pub fn prompt(&self, task: &HouseTask, agent: usize, attacks: &[u32]) -> String {
        let n = self.num_agents;
        let [sx, sy, sz] = task.bbox.size();
        let (lo, hi) = (task.bbox.min, task.bbox.max);
        let mut s = String::new();
        let _ = write!(
            s,
            "You are Agent {} of a team of {n} agents building in Minecraft. Together you build a house of {sx} x {sy} x {sz} blocks \
             (x by y by z). You place some of its blocks and the other agents place the rest; no agent sees the others' commands.",
            agent + 1
        );
        s.push_str(&order_note(agent, n));
        let _ = write!(
            s,
            "\n\nCoordinates are absolute integers: x and z are horizontal and y grows upward. The build area is the box from \
             ({}, {}, {}) to ({}, {}, {}), corners included; it starts as air.\n\nTarget, one layer per y from the bottom up. Each \
             line is a box \"x1 y1 z1 x2 y2 z2 block\" (corners included) made of that block; cells not listed are air.\n",
            lo[0], lo[1], lo[2], hi[0], hi[1], hi[2]
        );
        for y in lo[1]..=hi[1] {
            let _ = writeln!(s, "y={y}:");
            for (a, b, block) in task.rects(y) {
                let _ = writeln!(s, "  {} {} {} {} {} {} {block}", a[0], a[1], a[2], b[0], b[1], b[2]);
            }
        }
        let _ = writeln!(s, "\nBlocks you may use: {} (air may also be used, to clear cells).", task.blocks().join(", "));
        let _ = writeln!(s, "Your resource limits (cells you may fill with each block, summed over your commands; air is free):");
        for (b, l) in task.limits(n) {
            let _ = writeln!(s, "  {b}: {l}");
        }
        let _ = writeln!(
            s,
            "A /fill uses one block per cell of its box; a /fill that would go over your limit for its block is ignored entirely."
        );
        let total: u32 = attacks.iter().sum();
        let list: Vec<String> = attacks.iter().map(|a| a.to_string()).collect();
        let _ = write!(
            s,
            "\nThreat: {} spiders attack this turn, with attacks [{}] (total {total} damage); the player has {} HP. If any agent sends \
             /kill, the spiders die and nobody is hurt; otherwise the team loses {} x min(1, damage / HP) of its reward.\n\nYou may \
             send at most {} commands; commands beyond that are ignored.\nReply with commands only, one per line, nothing else:\n\
             /fill <x1> <y1> <z1> <x2> <y2> <z2> <block>\n/kill",
            attacks.len(),
            list.join(", "),
            self.player_hp,
            self.damage_weight,
            self.caps()[agent]
        );
        s
    }

    /// What agent `agent` reads after `turn` of `item`, the joint action having scored `reward`
    /// (without the shift) and the agent having sent `response`.
    pub fn feedback(&self, item: usize, agent: usize, turn: usize, reward: f64, response: &str) -> Result<String> {
        let task = self.task(Split::Train, item)?;
        let prev = response.trim();
        Ok(format!(
            "\n\nScore feedback before turn {}:\n- Previous reward: {reward:.4}\n- Reply with commands only, no other text.\n\n{}\n\n\
             Your previous commands:\n{}\n",
            turn + 2,
            self.prompt(task, agent, &self.spider_attacks(item, turn + 1)),
            if prev.is_empty() { "(none)" } else { prev }
        ))
    }

    fn task(&self, split: Split, item: usize) -> Result<&HouseTask> {
        let _ = split; // both splits are the whole data set
        self.tasks.get(item).with_context(|| format!("house_build: item {item} is outside the data ({} items)", self.tasks.len()))
    }
}

impl Env for HouseBuild {
    fn name(&self) -> &str {
        "house_build"
    }
    fn num_agents(&self) -> usize {
        self.num_agents
    }
    fn len(&self, _split: Split) -> usize {
        self.tasks.len()
    }
    fn reset(&self, split: Split, item: usize) -> Result<Vec<String>> {
        self.check()?;
        let task = self.task(split, item)?;
        let attacks = self.spider_attacks(item, 0);
        Ok((0..self.num_agents).map(|a| self.prompt(task, a, &attacks)).collect())
    }
    fn step(&self, split: Split, item: usize, turn: usize, joint_actions: &[Vec<String>]) -> Result<Outcome> {
        self.check()?;
        check_step(self, split, item, turn, joint_actions)?;
        let task = self.task(split, item)?;
        let responses: Vec<&str> = joint_actions[turn].iter().map(|s| s.as_str()).collect();
        let sc = self.score(task, &self.spider_attacks(item, turn), &responses);
        let next = responses.iter().enumerate().map(|(a, r)| self.feedback(item, a, turn, sc.reward, r)).collect::<Result<_>>()?;
        Ok(Outcome::new(sc.reward + self.reward_shift, next)
            .with_metric("iou", sc.iou)
            .with_metric("match_fraction", sc.match_fraction)
            .with_metric("damage", sc.damage)
            .with_metric("spider_penalty", sc.spider_penalty)
            .with_metric("killed", f64::from(u8::from(sc.killed)))
            .with_metrics(sc.tally.metrics()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// A 2×2×2 house: y=0 rows "SS", "SP"; y=1 rows "PA", "AA" (stone 3, planks 2, air 3), so
    /// with 2 agents each may place 2 stone (⌈3/2⌉ + ⌊3/4⌋) and 1 planks (⌈2/2⌉ + ⌊2/4⌋).
    const TINY: &str = r#"{"task_id": "tiny", "inventory": {"A": "air", "S": "minecraft:stone", "P": "planks"},
        "count": {"A": 3, "S": 3, "P": 2},
        "target_spec": {"type": "y_layers", "size": [2, 2, 2],
            "layers": [{"y": 0, "rows": ["SS", "SP"]}, {"y": 1, "rows": ["PA", "AA"]}]}}"#;

    const PERFECT: [&str; 2] = ["/fill 0 0 0 1 0 0 stone\n/fill 1 0 1 1 0 1 planks", "/fill 0 0 1 0 0 1 stone\n/fill 0 1 0 0 1 0 planks"];

    fn tiny() -> (HouseBuild, HouseTask) {
        let t = HouseTask::from_json(&serde_json::from_str(TINY).unwrap(), "tiny.json", 0).unwrap();
        (HouseBuild::new(vec![t.clone()]).unwrap(), t)
    }

    fn shared() -> std::path::PathBuf {
        std::env::var_os("COLLM_SHARED")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
    }

    #[test]
    fn tiny_task_cells_limits_and_rects() {
        let (_, t) = tiny();
        assert_eq!(t.bbox, Bbox::new([0, 0, 0], [1, 1, 1]));
        let cells: Vec<&str> = t.bbox.cells().map(|p| t.expected(p)).collect();
        // y=0: z=0 (x=0, 1), z=1; then y=1.
        assert_eq!(cells, ["stone", "stone", "stone", "planks", "planks", "air", "air", "air"]);
        assert_eq!(t.limits(2), [("planks".to_string(), 1), ("stone".to_string(), 2)].into_iter().collect());
        assert_eq!(t.limits(1), [("planks".to_string(), 3), ("stone".to_string(), 4)].into_iter().collect());
        assert_eq!(t.rects(0), vec![([0, 0, 0], [1, 0, 0], "stone"), ([0, 0, 1], [0, 0, 1], "stone"), ([1, 0, 1], [1, 0, 1], "planks")]);
        assert_eq!(t.rects(1), vec![([0, 1, 0], [0, 1, 0], "planks")]);
        assert_eq!(t.blocks(), vec!["planks", "stone"]);
    }

    #[test]
    fn perfect_build_without_kill_pays_the_spider_penalty() {
        let (mut env, t) = tiny();
        env.spider_attack = (2, 2);
        let s = env.score(&t, &env.spider_attacks(0, 0), &PERFECT);
        // Match 8/8; damage 2+2+2 = 6 ≥ 5 HP: penalty 0.1·min(1, 6/5) = 0.1.
        assert_eq!((s.matched, s.cells, s.match_fraction, s.iou, s.killed), (8, 8, 1.0, 1.0, false));
        assert_eq!((s.attacks.clone(), s.damage), (vec![2, 2, 2], 6.0));
        assert!(close(s.spider_penalty, 0.1) && close(s.reward, 0.9), "{s:?}");
        assert_eq!((s.tally.accepted, s.tally.over_resource), (4, 0));
        env.spider_attack = (1, 1);
        let s = env.score(&t, &env.spider_attacks(0, 0), &PERFECT);
        // Damage 3: 0.1·3/5.
        assert!(close(s.reward, 1.0 - 0.06), "{s:?}");
    }

    #[test]
    fn kill_removes_the_penalty() {
        let (env, t) = tiny();
        let b = format!("/kill\n{}", PERFECT[1]);
        let s = env.score(&t, &[3, 3, 3], &[PERFECT[0], &b]);
        assert_eq!((s.reward, s.damage, s.spider_penalty, s.killed), (1.0, 0.0, 0.0, true));
        // A /kill past the agent's command cap does not count.
        let mut env = env;
        env.max_commands = 4;
        let a = format!("{}\n/kill", PERFECT[0]);
        let s = env.score(&t, &[3, 3, 3], &[&a, PERFECT[1]]);
        assert_eq!((s.killed, s.tally.over_cap), (false, 1));
        assert!(close(s.reward, 0.9));
    }

    #[test]
    fn fills_past_the_resource_limit_are_not_placed() {
        let (env, t) = tiny();
        // Agent 1 may place 2 stone: the 4-cell fill is refused whole, two 1-cell fills land, the
        // third stone is refused. Agent 2 has its own 2.
        let a = "/fill 0 0 0 1 0 1 stone\n/fill 0 0 0 0 0 0 stone\n/fill 1 0 0 1 0 0 stone\n/fill 0 0 1 0 0 1 stone";
        let b = "/fill 0 0 1 0 0 1 stone\n/kill";
        let (g, _, tally) = env.build(&t, &[a, b]);
        assert_eq!((tally.accepted, tally.over_resource), (4, 2));
        assert_eq!(g.blocks().collect::<Vec<_>>(), vec![([0, 0, 0], "stone"), ([1, 0, 0], "stone"), ([0, 0, 1], "stone")]);
        assert_eq!(g.get([1, 0, 1]), "air");
        let s = env.score(&t, &[1, 1, 1], &[a, b]);
        // 3 stone cells + 3 air cells of 8 match; IoU 3 / (5 + 3 − 3).
        assert_eq!((s.matched, s.match_fraction, s.iou, s.reward), (6, 0.75, 0.6, 0.75));
    }

    #[test]
    fn fill_corners_in_any_order() {
        let (env, t) = tiny();
        let (g1, _, _) = env.build(&t, &["/fill 0 0 0 1 0 0 stone", ""]);
        let (g2, _, t2) = env.build(&t, &["/fill 1 0 0 0 0 0 stone", ""]);
        assert_eq!(g1.blocks().collect::<Vec<_>>(), g2.blocks().collect::<Vec<_>>());
        assert_eq!((g2.get([0, 0, 0]), g2.get([1, 0, 0]), t2.accepted), ("stone", "stone", 1));
        // A box over both y layers, corners reversed, fills (and counts) 2 cells of planks: over agent 1's 1.
        let (_, _, t3) = env.build(&t, &["/fill 0 1 0 0 0 0 planks", "/fill 0 1 0 0 1 0 planks"]);
        assert_eq!((t3.over_resource, t3.accepted), (1, 1));
    }

    #[test]
    fn bad_commands_are_counted_in_metrics() {
        let (env, _) = tiny();
        let a = "```\n/setblock 0 0 0 stone\n/fill 0 0 0 2 0 0 stone\n/fill 0 0 0 0 0 0 glass\n/fill 0 0 0 0 0 0 stone replace\n\
                 build the walls first\n/fill ~ 0 0 0 0 0 stone\n```";
        let out = env.step(Split::Train, 0, 0, &[vec![a.into(), "ñ".into()]]).unwrap();
        let m = &out.metrics;
        assert_eq!((m["malformed"], m["out_of_range"], m["unknown_block"], m["accepted"]), (5.0, 1.0, 1.0, 0.0));
        // Nothing built: the 3 air cells match.
        assert_eq!((m["match_fraction"], m["iou"]), (3.0 / 8.0, 0.0));
    }

    #[test]
    fn feedback_has_the_reward_the_prompt_and_the_previous_commands() {
        let (mut env, _) = tiny();
        env.spider_attack = (2, 2);
        env.reward_shift = -1.0;
        let out = env.step(Split::Train, 0, 0, &[vec![PERFECT[0].into(), PERFECT[1].into()]]).unwrap();
        assert!(close(out.reward, -0.1));
        assert_eq!((out.metrics["damage"], out.metrics["killed"], out.metrics["match_fraction"]), (6.0, 0.0, 1.0));
        for (a, fb) in out.next_observations.iter().enumerate() {
            assert!(fb.contains("Score feedback before turn 2:\n- Previous reward: 0.9000\n"), "{fb}");
            assert!(fb.contains(&format!("You are Agent {} of a team of 2", a + 1)), "{fb}");
            assert!(fb.contains("with attacks [2, 2, 2] (total 6 damage)"), "{fb}");
            assert!(fb.ends_with(&format!("Your previous commands:\n{}\n", PERFECT[a])), "{fb}");
        }
        let out = env.step(Split::Train, 0, 0, &[vec!["".into(), "  ".into()]]).unwrap();
        assert!(out.next_observations[1].ends_with("Your previous commands:\n(none)\n"));
    }

    #[test]
    fn damage_is_a_deterministic_function_of_item_and_turn() {
        let (env, _) = tiny();
        let joint = vec![vec![PERFECT[0].to_string(), PERFECT[1].to_string()]; 3];
        let a = env.step(Split::Train, 0, 2, &joint).unwrap();
        let b = env.step(Split::Eval, 0, 2, &joint).unwrap();
        assert_eq!(a, b);
        let attacks = env.spider_attacks(0, 2);
        let d: u32 = attacks.iter().sum();
        assert_eq!(a.metrics["damage"], f64::from(d));
        assert!(close(a.reward, 1.0 - 0.1 * (f64::from(d) / 5.0).min(1.0)));
        // Three spiders, 1..=3 each; the draws change with the item, the turn and the seed.
        let mut seen = std::collections::BTreeSet::new();
        for item in 0..10 {
            for turn in 0..4 {
                let v = env.spider_attacks(item, turn);
                assert!(v.len() == 3 && v.iter().all(|a| (1..=3).contains(a)), "{v:?}");
                assert_eq!(v, env.spider_attacks(item, turn));
                seen.insert(v);
            }
        }
        assert!(seen.len() > 5, "{seen:?}");
        let other = HouseBuild { seed: 7, ..HouseBuild::new(env.tasks().to_vec()).unwrap() };
        assert!((0..10).any(|i| other.spider_attacks(i, 0) != env.spider_attacks(i, 0)));
        // The first prompt states turn 0's attacks; the feedback after turn t states turn t+1's.
        let list = |v: Vec<u32>| format!("[{}]", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "));
        assert!(env.reset(Split::Train, 0).unwrap()[0].contains(&list(env.spider_attacks(0, 0))));
        assert!(a.next_observations[0].contains(&list(env.spider_attacks(0, 3))));
    }

    #[test]
    fn prompts_state_role_box_layers_and_limits() {
        let (env, _) = tiny();
        let p = env.reset(Split::Train, 0).unwrap();
        assert_ne!(p[0], p[1]);
        assert!(p[0].contains("You are Agent 1 of a team of 2") && p[1].contains("after Agent 1's"));
        assert!(p[0].contains("house of 2 x 2 x 2 blocks") && p[0].contains("from (0, 0, 0) to (1, 1, 1)"));
        assert!(
            p[0].contains("y=0:\n  0 0 0 1 0 0 stone\n  0 0 1 0 0 1 stone\n  1 0 1 1 0 1 planks\ny=1:\n  0 1 0 0 1 0 planks\n"),
            "{}",
            p[0]
        );
        assert!(p[0].contains("Blocks you may use: planks, stone") && p[0].contains("  planks: 1\n  stone: 2\n"));
        assert!(p[0].contains("5 HP") && p[0].contains("/kill") && p[0].contains("at most 300 commands"));
    }

    #[test]
    fn loads_the_data_file_and_its_first_house() {
        let env = HouseBuild::load(&shared().join("data/minecraft/house_build.json")).unwrap();
        assert_eq!((env.len(Split::Train), env.len(Split::Eval)), (10, 10));
        let t = &env.tasks()[0];
        assert_eq!(t.task_id, "house_build_0002");
        assert_eq!(
            (t.bbox, t.bbox.size(), t.layers.len(), t.layers[0].len(), t.layers[0][0].len()),
            (Bbox::new([0, 0, 0], [5, 6, 6]), [6, 7, 7], 7, 7, 6)
        );
        assert_eq!(env.tasks()[1].bbox, t.bbox, "no bbox in the file: (0, min y, 0) and the size");
        let limits: Vec<(String, usize)> = t.limits(2).into_iter().collect();
        let want = [("obsidian", 9), ("planks", 1), ("stone_bricks", 40), ("stone_stairs", 27), ("white_concrete", 51)];
        assert_eq!(limits, want.map(|(b, n)| (b.to_string(), n)));
        assert_eq!(t.rects(0), vec![([0, 0, 1], [5, 0, 5], "white_concrete")]);
        for (i, t) in env.tasks().iter().enumerate() {
            // The prompt's boxes rebuild the target exactly.
            let mut g = Grid::new(t.bbox);
            for y in 0..7 {
                for (a, b, block) in t.rects(y) {
                    g.fill(a, b, block);
                }
            }
            assert!(t.bbox.cells().all(|p| g.get(p) == t.expected(p)), "item {i}");
            // Single-cell fills, each block's cells dealt to the agents in turn, keep within the
            // limits and build the house exactly; with a /kill the reward is 1.
            let mut cmds = [String::from("/kill\n"), String::new()];
            let mut k = BTreeMap::new();
            for p in t.bbox.cells().filter(|p| !is_air(t.expected(*p))) {
                let n = k.entry(t.expected(p)).or_insert(0);
                let _ = writeln!(cmds[*n % 2], "/fill {0} {1} {2} {0} {1} {2} {3}", p[0], p[1], p[2], t.expected(p));
                *n += 1;
            }
            let s = env.score(t, &[3, 3, 3], &[&cmds[0], &cmds[1]]);
            assert_eq!((s.match_fraction, s.iou, s.reward, s.tally.over_resource), (1.0, 1.0, 1.0, 0), "item {i}");
        }
    }

    #[test]
    fn load_errors_name_the_file_item_and_field() {
        let dir = std::env::temp_dir().join(format!("collm-house-build-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let try_load = |name: &str, edit: &dyn Fn(&mut Value)| {
            let mut v: Value = serde_json::from_str(TINY).unwrap();
            edit(&mut v);
            let p = dir.join(name);
            std::fs::write(&p, serde_json::to_string(&vec![serde_json::from_str::<Value>(TINY).unwrap(), v]).unwrap()).unwrap();
            format!("{:#}", HouseBuild::load(&p).err().expect("an error"))
        };
        let e = try_load("inv.json", &|v| {
            v.as_object_mut().unwrap().remove("inventory");
        });
        assert!(e.contains("inv.json: item 1 (task_id \"tiny\"): missing field 'inventory'"), "{e}");
        let e = try_load("letter.json", &|v| v["target_spec"]["layers"][1]["rows"][0] = "PX".into());
        assert!(e.contains("letter.json: item 1") && e.contains("y=1") && e.contains("letter 'X'"), "{e}");
        let e = try_load("rows.json", &|v| v["target_spec"]["layers"][0]["rows"] = serde_json::json!(["SS"]));
        assert!(e.contains("rows.json: item 1") && e.contains("(y=0): 1 rows, size says 2"), "{e}");
        let e = try_load("width.json", &|v| v["target_spec"]["layers"][0]["rows"][1] = "SPA".into());
        assert!(e.contains("row 1 \"SPA\" has 3 letters"), "{e}");
        let e = try_load("count.json", &|v| v["count"]["S"] = 4.into());
        assert!(e.contains("count.S is 4 but the layers hold 3"), "{e}");
        let e = try_load("bbox.json", &|v| v["bbox"] = serde_json::json!({"from": [0, 0, 0], "to": [2, 1, 1]}));
        assert!(e.contains("bbox") && e.contains("size"), "{e}");
        let e = try_load("layer.json", &|v| v["target_spec"]["layers"][1]["y"] = 5.into());
        assert!(e.contains("no layer y=1"), "{e}");
        let p = dir.join("bad.json");
        std::fs::write(&p, "{").unwrap();
        assert!(format!("{:#}", HouseBuild::load(&p).err().unwrap()).contains("bad.json: line 1: not JSON"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
