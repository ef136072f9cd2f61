//! collm-model: causal language models on candle that can both act (fast batched sampling with a
//! KV cache) and learn (teacher-forced log-probs whose gradients reach every trainable weight).

pub mod amx;
pub mod batcher;
pub mod checkpoint;
pub mod config;
pub mod cuda;
pub mod decode_cpu;
pub mod devcheck;
pub mod device;
pub mod export;
pub mod fetch;
pub mod flops;
pub mod generate;
pub mod gguf;
pub mod hugepages;
pub mod loader;
pub mod model;
pub mod ops;
pub mod optim;
pub mod score;
pub mod sgemm;
pub mod tokenizer;
pub mod value_head;

pub use config::{Arch, ModelConfig};
pub use device::{DeviceSpec, Precision};
pub use generate::{generate, Generation, SamplingParams};
pub use loader::{load, LoadedModel};
pub use model::{on_pool, KvCache, LoraConfig, Transformer};
pub use optim::{AdamW, AdamWConfig, Grads};
pub use score::{score, score_spans, Scores, SpanScores};
pub use tokenizer::{Message, Tokenizer};
pub use value_head::{ValueHead, ValueHeadKind};
