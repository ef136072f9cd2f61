//! Exports of a model to the tools people already use: a PEFT adapter directory (for LoRA
//! models) and a GGUF file for llama.cpp (F32, F16 or Q8_0; the tokenizer and chat template in its
//! metadata). The Hugging Face directory export is [`crate::checkpoint::export_hf`].

use crate::config::Arch;
use crate::loader::{gguf_name, permute_rows, write_safetensors};
use crate::model::Transformer;
use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Writes a LoRA model's adapters as PEFT lays them out: `adapter_config.json` and
/// `adapter_model.safetensors` (keys `base_model.model.<module>.lora_A.weight` [r, in] and
/// `lora_B.weight` [out, r]; PEFT scales by lora_alpha / r, as collm does). `base` names the base
/// model for `base_model_name_or_path`.
pub fn export_peft(model: &Transformer, base: &str, dir: &Path) -> Result<()> {
    let Some(lora) = &model.lora else {
        bail!("a PEFT export needs a LoRA model: this agent was fully fine-tuned (export it with --format hf)");
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tensors: BTreeMap<String, Tensor> =
        model.tensors()?.into_iter().filter(|(n, _)| n.contains(".lora_")).map(|(n, t)| (format!("base_model.model.{n}"), t)).collect();
    write_safetensors(&tensors, &dir.join("adapter_model.safetensors"))?;
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": 0.0, "target_modules": lora.targets,
        "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
        "use_rslora": false, "use_dora": false, "modules_to_save": null, "layers_to_transform": null,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": null,
    });
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("writing {}/adapter_config.json", dir.display()))?;
    Ok(())
}

/// The tensor types a GGUF export may hold (norms and biases stay F32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Q8_0,
}

impl GgufType {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "q8_0" => Self::Q8_0,
            other => bail!("unknown GGUF type '{other}' (f32, f16 or q8_0)"),
        })
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` code.
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
        }
    }
}

/// Writes the model (LoRA merged) as a GGUF file llama.cpp loads: the architecture's metadata,
/// `tokenizer` (the `tokenizer.*` keys, e.g. from the base model's GGUF, chat template included)
/// and every weight under its GGUF name, Llama's Q/K rows permuted for interleaved RoPE as
/// llama.cpp's converter does. Matrices take `ty`; 1-D tensors stay F32.
pub fn export_gguf(model: &Transformer, tokenizer: &[(String, gguf_file::Value)], ty: GgufType, path: &Path) -> Result<()> {
    use gguf_file::Value as V;
    let merged = model.lora_merged()?;
    let m = merged.as_ref().unwrap_or(model);
    let c = &m.cfg;
    let arch = match c.arch {
        Arch::Llama => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
    };
    if !tokenizer.iter().any(|(k, _)| k == "tokenizer.ggml.model") {
        bail!("a GGUF export needs the tokenizer's GGUF metadata (tokenizer.ggml.model, tokens, merges)");
    }
    let u = |x: usize| V::U32(x as u32);
    let mut md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        ("general.name".into(), V::String("collm export".into())),
        ("general.file_type".into(), V::U32(ty.file_type())),
        ("general.quantization_version".into(), V::U32(2)),
        (format!("{arch}.context_length"), u(c.max_position_embeddings)),
        (format!("{arch}.embedding_length"), u(c.hidden_size)),
        (format!("{arch}.block_count"), u(c.num_layers)),
        (format!("{arch}.feed_forward_length"), u(c.intermediate_size)),
        (format!("{arch}.attention.head_count"), u(c.num_heads)),
        (format!("{arch}.attention.head_count_kv"), u(c.num_kv_heads)),
        (format!("{arch}.attention.key_length"), u(c.head_dim)),
        (format!("{arch}.attention.value_length"), u(c.head_dim)),
        (format!("{arch}.rope.freq_base"), V::F32(c.rope_theta as f32)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), V::F32(c.rms_norm_eps as f32)),
        (format!("{arch}.vocab_size"), u(c.vocab_size)),
    ];
    if c.arch == Arch::Llama {
        md.push((format!("{arch}.rope.dimension_count"), u(c.head_dim)));
    }
    md.extend(tokenizer.iter().cloned());
    let mut tensors: Vec<(String, QTensor)> = vec![];
    for (name, t) in m.tensors()? {
        let g = gguf_name(&name).with_context(|| format!("no GGUF name for tensor '{name}'"))?;
        let mut t = t.to_dtype(DType::F32)?;
        if c.arch == Arch::Llama && g.starts_with("blk.") {
            if g.contains(".attn_q.") {
                t = permute_rows(&t, c.num_heads)?;
            } else if g.contains(".attn_k.") {
                t = permute_rows(&t, c.num_kv_heads)?;
            }
        }
        let want = if t.rank() == 1 { GgmlDType::F32 } else { ty.ggml() };
        let want = if want == GgmlDType::Q8_0 && t.dims()[t.rank() - 1] % 32 != 0 { GgmlDType::F16 } else { want };
        let q = QTensor::quantize(&t, want).with_context(|| format!("converting '{name}' to {want:?}"))?;
        tensors.push((g, q));
    }
    let tmp = path.with_extension("gguf.tmp");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?);
        let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &md_refs, &t_refs).with_context(|| format!("writing {}", tmp.display()))?;
        std::io::Write::flush(&mut f).with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
