//! The paper's Minecraft tasks, simulated on a grid (no game server): StrBuild (two agents write
//! a string in block letters with `/setblock`) and HouseBuild (two agents build a house from its
//! layers with `/fill`, under resource limits, while spiders attack). Each file's top comment
//! states its rules and reward; [`commands`] states how responses are read.
//!
//! Data: `str_build.csv` (`string,difficulty`) and `house_build.json` (a list of houses with
//! `task_id`, `inventory`, `count`, `target_spec` and an optional `bbox`), loaded by
//! [`StrBuild::load`] and [`HouseBuild::load`]. Both splits hold every item: the paper trains and
//! evaluates on the same set.
//!
//! The paper's setup for these tasks: chat template, 4 turns, 512 new tokens, γ = 0.9, reward
//! shift −2 (StrBuild) and −1 (HouseBuild). The envs add `reward_shift` (default 0) to every
//! reward; a config sets it.

pub mod commands;
pub mod font;
pub mod grid;
pub mod house_build;
pub mod str_build;

pub use commands::Tally;
pub use house_build::{HouseBuild, HouseScore, HouseTask};
pub use str_build::{StrBuild, StrScore, StrTask};
