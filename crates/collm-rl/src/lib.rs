//! collm-rl: multi-agent RL for teams of LLM agents — rollouts with KV-cache histories, returns
//! and advantages, CoLLM-CC, CoLLM-DC and the MAGRPO family, the trainer loop and checkpoints, and
//! the trained team's decentralized execution.

pub mod algos;
pub mod config;
pub mod plot;
pub mod progress;
pub mod returns;
pub mod rollout;
pub mod run;
pub mod study;
pub mod team;
pub mod tensorboard;
pub mod trainer;

pub use config::{Algo, Config};
pub use trainer::Trainer;
