//! The transformer's hyper-parameters, read from a GGUF header or a Hugging Face `config.json`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The families collm implements. They share one decoder; the flags below tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama, SmolLM2, Mistral-style decoders.
    Llama,
    /// Qwen2 / Qwen2.5: bias on the q, k and v projections.
    Qwen2,
    /// Qwen3: RMSNorm on each head of q and k.
    Qwen3,
}

impl Arch {
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
        }
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v projections.
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k (Qwen3).
    pub qk_norm: bool,
    pub max_position_embeddings: usize,
}

impl ModelConfig {
    /// The shapes of real models, from their Hugging Face `config.json`, for random-init
    /// benchmarks where no weights can be brought: `smollm2-135m`, `qwen3-1.7b`, `qwen3-4b`.
    pub fn shape_of(name: &str) -> Result<Self> {
        let llama = |vocab, hidden, inter, layers, heads, kv, ctx, theta| Self {
            arch: Arch::Llama,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hidden / heads,
            rope_theta: theta,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            qkv_bias: false,
            qk_norm: false,
            max_position_embeddings: ctx,
        };
        let qwen3 = |hidden, inter, layers, heads, kv| Self {
            arch: Arch::Qwen3,
            vocab_size: 151_936,
            hidden_size: hidden,
            intermediate_size: inter,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: 128,
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: true,
            qkv_bias: false,
            qk_norm: true,
            max_position_embeddings: 40_960,
        };
        Ok(match name {
            "smollm2-135m" => llama(49_152, 576, 1536, 30, 9, 3, 8192, 100_000.0),
            "qwen3-1.7b" => qwen3(2048, 6144, 28, 16, 8),
            "qwen3-4b" => Self { tie_word_embeddings: true, ..qwen3(2560, 9728, 36, 32, 8) },
            other => bail!("no known shape '{other}' (smollm2-135m, qwen3-1.7b, qwen3-4b)"),
        })
    }

    /// A small random-initialised model for tests and synthetic tasks.
    pub fn tiny(arch: Arch, vocab_size: usize) -> Self {
        Self {
            arch,
            vocab_size,
            hidden_size: 32,
            intermediate_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: arch == Arch::Llama,
            qkv_bias: arch == Arch::Qwen2,
            qk_norm: arch == Arch::Qwen3,
            max_position_embeddings: 2048,
        }
    }

    pub fn parse_arch(name: &str) -> Result<Arch> {
        Ok(match name {
            "llama" | "LlamaForCausalLM" | "mistral" | "MistralForCausalLM" => Arch::Llama,
            "qwen2" | "Qwen2ForCausalLM" => Arch::Qwen2,
            "qwen3" | "Qwen3ForCausalLM" => Arch::Qwen3,
            other => bail!("unsupported model architecture '{other}' (collm supports Llama/SmolLM2, Qwen2/Qwen2.5 and Qwen3)"),
        })
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(v: &Value, path: &str) -> Result<Self> {
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .or_else(|| v.get("model_type").and_then(|m| m.as_str()))
            .with_context(|| format!("{path}: neither 'architectures' nor 'model_type' is set"))?;
        let arch = Self::parse_arch(arch_name).with_context(|| format!("{path}: field 'architectures'"))?;
        let get = |k: &str| -> Result<usize> {
            v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize).with_context(|| format!("{path}: missing or non-integer field '{k}'"))
        };
        let getf = |k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
        if let Some(rs) = v.get("rope_scaling") {
            if !rs.is_null() {
                bail!("{path}: field 'rope_scaling' is set ({rs}); collm supports plain RoPE only");
            }
        }
        let hidden_size = get("hidden_size")?;
        let num_heads = get("num_attention_heads")?;
        let head_dim = match v.get("head_dim").and_then(|x| x.as_u64()) {
            Some(d) => d as usize,
            None if num_heads == 0 || hidden_size % num_heads != 0 => {
                bail!("{path}: field 'num_attention_heads' = {num_heads} does not divide 'hidden_size' = {hidden_size}")
            }
            None => hidden_size / num_heads,
        };
        let cfg = Self {
            arch,
            vocab_size: get("vocab_size")?,
            hidden_size,
            intermediate_size: get("intermediate_size")?,
            num_layers: get("num_hidden_layers")?,
            num_heads,
            num_kv_heads: v.get("num_key_value_heads").and_then(|x| x.as_u64()).map(|x| x as usize).unwrap_or(num_heads),
            head_dim,
            rope_theta: getf("rope_theta", 10000.0),
            rms_norm_eps: getf("rms_norm_eps", 1e-6),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(false),
            qkv_bias: match arch {
                Arch::Qwen2 => true,
                _ => v.get("attention_bias").and_then(|x| x.as_bool()).unwrap_or(false),
            },
            qk_norm: arch == Arch::Qwen3,
            max_position_embeddings: v.get("max_position_embeddings").and_then(|x| x.as_u64()).unwrap_or(4096) as usize,
        };
        cfg.validate().with_context(|| format!("{path}: invalid model config"))?;
        Ok(cfg)
    }

    /// Writes the `config.json` transformers expects for this model.
    pub fn to_hf_json(&self, bos: Option<u32>, eos: Option<u32>) -> Value {
        let mut v = serde_json::json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "rope_scaling": null,
        });
        if self.arch == Arch::Llama {
            v["attention_bias"] = Value::Bool(self.qkv_bias);
            v["mlp_bias"] = Value::Bool(false);
        }
        if let Some(b) = bos {
            v["bos_token_id"] = b.into();
        }
        if let Some(e) = eos {
            v["eos_token_id"] = e.into();
        }
        v
    }

    /// The number of weights a model of this config has.
    pub fn param_count(&self) -> u64 {
        crate::model::expected_tensors(self).iter().map(|(_, s)| s.iter().map(|&d| d as u64).product::<u64>()).sum()
    }

    /// Checks the sizes before anything is allocated: each within what any real model has.
    pub fn validate(&self) -> Result<()> {
        for (name, v, max) in [
            ("layers", self.num_layers, 1024),
            ("hidden size", self.hidden_size, 65_536),
            ("intermediate size", self.intermediate_size, 1 << 20),
            ("vocabulary size", self.vocab_size, 10_000_000),
            ("attention heads", self.num_heads, 1024),
            ("head_dim", self.head_dim, 4096),
        ] {
            if v == 0 || v > max {
                bail!("{name} = {v}: must be between 1 and {max}");
            }
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0 {
            bail!("invalid head counts: {} heads, {} key/value heads", self.num_heads, self.num_kv_heads);
        }
        if self.head_dim % 2 != 0 {
            bail!("head_dim {} must be even for RoPE", self.head_dim);
        }
        Ok(())
    }
}
