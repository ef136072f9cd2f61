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

    /// Reads a JSON list of houses.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file = path.display().to_string();
        let v: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{file}: not JSON: {e}"))?;
        let items = v.as_array().ok_or_else(|| anyhow!("{file}: expected a list of houses"))?;
        let tasks = items.iter().enumerate().map(|(i, t)| HouseTask::from_json(t, &file, i)).collect::<Result<Vec<_>>>()?;
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
    pub fn feedback(&self, item: usize, agent: usize, turn: usize, reward: f64, response: &str) -> String {
        let task = &self.tasks[item];
        let prev = response.trim();
        format!(
            "\n\nScore feedback before turn {}:\n- Previous reward: {reward:.4}\n- Reply with commands only, no other text.\n\n{}\n\n\
             Your previous commands:\n{}\n",
            turn + 2,
            self.prompt(task, agent, &self.spider_attacks(item, turn + 1)),
            if prev.is_empty() { "(none)" } else { prev }
        )
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
        let next = responses.iter().enumerate().map(|(a, r)| self.feedback(item, a, turn, sc.reward, r)).collect();
        let mut out = Outcome::new(sc.reward + self.reward_shift, next)
            .with_metric("iou", sc.iou)
            .with_metric("match_fraction", sc.match_fraction)
            .with_metric("damage", sc.damage)
            .with_metric("spider_penalty", sc.spider_penalty)
            .with_metric("killed", f64::from(u8::from(sc.killed)));
        for (k, v) in sc.tally.metrics() {
            out = out.with_metric(k, v);
        }
        Ok(out)
    }
}
