//! Reading an agent's response as Minecraft commands.
//!
//! A response is read line by line. Blank lines and code-fence lines (a line starting with
//! "```", with or without a language tag) are skipped. Every other line must be one command,
//! surrounding whitespace allowed, the leading slash optional ("/setblock …" and "setblock …" are
//! the same), the command name in any case:
//! - `/setblock x y z block` (exactly 5 words),
//! - `/fill x1 y1 z1 x2 y2 z2 block` (exactly 8 words; the corners in any order),
//! - `/kill` (any arguments are ignored).
//!
//! Coordinates are absolute integers (`~` and `^` are refused); a block may carry the
//! `minecraft:` prefix. Anything else (prose, list markers, other commands, extra words, block
//! states, non-ASCII text), and a command the task does not use (`/fill` in StrBuild,
//! `/setblock` in HouseBuild), is malformed: counted and ignored. A block outside the agent's
//! palette (air is always allowed), a cell outside the build box, a fill past the agent's
//! resource limit, and every line after the agent's cap of accepted commands is reached are each
//! counted under their own name ([`Tally`]) and ignored. Nothing in a response fails a step.

use super::grid::{Bbox, Pos};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    SetBlock { at: Pos, block: String },
    Fill { from: Pos, to: Pos, block: String },
    Kill,
}

/// One line of a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    /// Blank or a code fence.
    Skip,
    Command(Command),
    Malformed,
}

/// Drops the `minecraft:` namespace.
pub fn normalize_block(block: &str) -> &str {
    block.strip_prefix("minecraft:").unwrap_or(block)
}

fn coord(tok: &str) -> Option<i32> {
    // `i32::from_str` takes an optional sign and ASCII digits only, so `~1`, `^`, `1.5` and
    // full-width digits all fail.
    tok.parse().ok()
}

fn coords(toks: &[&str]) -> Option<Pos> {
    Some([coord(toks[0])?, coord(toks[1])?, coord(toks[2])?])
}

pub fn parse_line(line: &str) -> Line {
    let t = line.trim();
    if t.is_empty() || t.starts_with("```") {
        return Line::Skip;
    }
    let t = t.strip_prefix('/').unwrap_or(t).trim_start();
    let words: Vec<&str> = t.split_whitespace().collect();
    let Some(name) = words.first() else { return Line::Malformed };
    let cmd = match (name.to_ascii_lowercase().as_str(), words.len()) {
        ("setblock", 5) => coords(&words[1..4]).map(|at| Command::SetBlock { at, block: normalize_block(words[4]).to_string() }),
        ("fill", 8) => coords(&words[1..4]).zip(coords(&words[4..7])).map(|(from, to)| Command::Fill {
            from,
            to,
            block: normalize_block(words[7]).to_string(),
        }),
        ("kill", _) => Some(Command::Kill),
        _ => None,
    };
    cmd.map_or(Line::Malformed, Line::Command)
}

/// Counts of how an agent's lines were handled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub accepted: usize,
    /// Not a command, or a command this task does not use.
    pub malformed: usize,
    /// A cell outside the build box.
    pub out_of_range: usize,
    /// A block outside the agent's palette.
    pub unknown_block: usize,
    /// A fill that would take the agent past its limit for the block.
    pub over_resource: usize,
    /// Lines after the agent's cap of accepted commands was reached.
    pub over_cap: usize,
}

impl Tally {
    pub fn add(&mut self, o: &Tally) {
        self.accepted += o.accepted;
        self.malformed += o.malformed;
        self.out_of_range += o.out_of_range;
        self.unknown_block += o.unknown_block;
        self.over_resource += o.over_resource;
        self.over_cap += o.over_cap;
    }

    /// The counts as (metric name, value) pairs.
    pub fn metrics(&self) -> [(&'static str, f64); 6] {
        [
            ("accepted", self.accepted as f64),
            ("malformed", self.malformed as f64),
            ("out_of_range", self.out_of_range as f64),
            ("unknown_block", self.unknown_block as f64),
            ("over_resource", self.over_resource as f64),
            ("over_cap", self.over_cap as f64),
        ]
    }
}

/// What one agent may do.
#[derive(Clone, Debug)]
pub struct Rules<'a> {
    pub bbox: Bbox,
    /// The agent's blocks besides air.
    pub blocks: &'a [String],
    /// Most accepted commands.
    pub cap: usize,
    pub setblock: bool,
    pub fill: bool,
    pub kill: bool,
    /// Per-block limits on the cells the agent's non-air fills and setblocks may cover in total
    /// (a block without an entry is unlimited).
    pub resources: Option<&'a BTreeMap<String, usize>>,
}

/// The agent's accepted commands, in order, and how every line was handled.
pub fn read_commands(response: &str, rules: &Rules) -> (Vec<Command>, Tally) {
    let mut out = vec![];
    let mut tally = Tally::default();
    let mut used: BTreeMap<String, usize> = BTreeMap::new();
    for line in response.lines() {
        let cmd = match parse_line(line) {
            Line::Skip => continue,
            _ if out.len() >= rules.cap => {
                tally.over_cap += 1;
                continue;
            }
            Line::Malformed => {
                tally.malformed += 1;
                continue;
            }
            Line::Command(c) => c,
        };
        let used_here = match &cmd {
            Command::SetBlock { .. } => rules.setblock,
            Command::Fill { .. } => rules.fill,
            Command::Kill => rules.kill,
        };
        if !used_here {
            tally.malformed += 1;
            continue;
        }
        let (block, region) = match &cmd {
            Command::SetBlock { at, block } => (block, Bbox::new(*at, *at)),
            Command::Fill { from, to, block } => (block, Bbox::new(*from, *to)),
            Command::Kill => {
                tally.accepted += 1;
                out.push(cmd);
                continue;
            }
        };
        if block != "air" && !rules.blocks.iter().any(|b| b == block) {
            tally.unknown_block += 1;
            continue;
        }
        if !rules.bbox.contains(region.min) || !rules.bbox.contains(region.max) {
            tally.out_of_range += 1;
            continue;
        }
        if let Some(&limit) = rules.resources.and_then(|r| r.get(block.as_str())) {
            let u = used.entry(block.clone()).or_insert(0);
            if *u + region.volume() > limit {
                tally.over_resource += 1;
                continue;
            }
            *u += region.volume();
        }
        tally.accepted += 1;
        out.push(cmd);
    }
    (out, tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(x: i32, y: i32, z: i32, b: &str) -> Line {
        Line::Command(Command::SetBlock { at: [x, y, z], block: b.into() })
    }

    #[test]
    fn lines() {
        assert_eq!(parse_line("/setblock 1 2 3 stone"), set(1, 2, 3, "stone"));
        assert_eq!(parse_line("   setblock -1 +2 3 minecraft:stone  \r"), set(-1, 2, 3, "stone"));
        assert_eq!(parse_line("/ SetBlock 0 0 0 oak_planks"), set(0, 0, 0, "oak_planks"));
        assert_eq!(
            parse_line("/fill 5 0 0 0 1 2 minecraft:air"),
            Line::Command(Command::Fill { from: [5, 0, 0], to: [0, 1, 2], block: "air".into() })
        );
        assert_eq!(parse_line("/kill @e[type=spider]"), Line::Command(Command::Kill));
        assert_eq!(parse_line("KILL"), Line::Command(Command::Kill));
        for skip in ["", "   ", "```", "```mcfunction", "  ``` "] {
            assert_eq!(parse_line(skip), Line::Skip, "{skip:?}");
        }
        for bad in [
            "/setblock 1 2 stone",
            "/setblock 1 2 3 stone replace",
            "/setblock ~ 2 3 stone",
            "/setblock ^1 2 3 stone",
            "/setblock 1.5 2 3 stone",
            "/setblock １ 2 3 stone",
            "- /setblock 1 2 3 stone",
            "1. /setblock 1 2 3 stone",
            "/fill 0 0 0 1 1 1 stone replace",
            "/fill 0 0 0 1 1 stone",
            "/killall",
            "/give @p stone",
            "Here are my commands:",
            "héllo wörld 🚀",
            "/",
        ] {
            assert_eq!(parse_line(bad), Line::Malformed, "{bad:?}");
        }
    }

    #[test]
    fn rules_caps_and_resources() {
        let blocks = vec!["stone".to_string(), "planks".to_string()];
        let limits: BTreeMap<String, usize> = [("stone".to_string(), 5), ("planks".to_string(), 1)].into_iter().collect();
        let rules = Rules {
            bbox: Bbox::new([0, 0, 0], [3, 3, 3]),
            blocks: &blocks,
            cap: 4,
            setblock: false,
            fill: true,
            kill: true,
            resources: Some(&limits),
        };
        let text = "/fill 0 0 0 1 1 0 stone\n/setblock 0 0 0 stone\n/fill 0 0 0 1 0 0 stone\n/fill 0 0 0 0 0 0 minecraft:stone\n\
                    /fill 0 0 0 9 0 0 planks\n/fill 0 0 0 0 0 0 glass\n/fill 3 3 3 3 3 3 air\n/kill\n/fill 0 0 0 0 0 0 planks\n\nnonsense";
        let (cmds, t) = read_commands(text, &rules);
        // 4 stone (ok), setblock (not used here), 2 more stone (over 5), 1 stone (5 in all), planks
        // out of range, glass unknown, air (free), /kill: the cap of 4 is reached, so the last two
        // lines are over the cap.
        assert_eq!(t, Tally { accepted: 4, malformed: 1, out_of_range: 1, unknown_block: 1, over_resource: 1, over_cap: 2 }, "{cmds:?}");
        assert_eq!(cmds[3], Command::Kill);
    }
}
