//! Saving and loading weights (full or LoRA-only) and exporting a Hugging Face directory.

use crate::config::ModelConfig;
use crate::loader::{read_safetensors, write_safetensors};
use crate::model::{LoraConfig, Transformer};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What `collm_model.json` beside a checkpoint's weights says.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CheckpointMeta {
    pub config: ModelConfig,
    pub lora: Option<LoraConfig>,
    /// True when only the LoRA tensors were written (the base weights come from the base model).
    pub lora_only: bool,
}

/// Writes `dir/model.safetensors` and `dir/collm_model.json`. With `lora_only`, only the adapter
/// tensors are written.
pub fn save(model: &Transformer, dir: &Path, lora_only: bool) -> Result<()> {
    if lora_only && model.lora.is_none() {
        bail!("a LoRA-only checkpoint needs a model with LoRA adapters");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tensors = model.tensors()?.into_iter().filter(|(n, _)| !lora_only || n.contains(".lora_")).collect();
    write_safetensors(&tensors, &dir.join("model.safetensors"))?;
    let meta = CheckpointMeta { config: model.cfg.clone(), lora: model.lora.clone(), lora_only };
    let tmp = dir.join("collm_model.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&meta)?)?;
    std::fs::rename(&tmp, dir.join("collm_model.json"))?;
    Ok(())
}

/// Loads a checkpoint written by [`save`] into `model` (which must have the same config; for a
/// LoRA checkpoint the adapters are added first if missing).
pub fn load_into(model: &mut Transformer, dir: &Path) -> Result<()> {
    let meta_path = dir.join("collm_model.json");
    let meta: CheckpointMeta =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).with_context(|| format!("reading {}", meta_path.display()))?)
            .with_context(|| format!("{}: invalid checkpoint metadata", meta_path.display()))?;
    if meta.config != model.cfg {
        bail!("{}: checkpoint is for a different model config", meta_path.display());
    }
    if let Some(l) = &meta.lora {
        if model.lora.is_none() {
            model.add_lora(l.clone(), 0)?;
        } else if model.lora.as_ref() != Some(l) {
            bail!("{}: checkpoint LoRA settings differ from the model's", meta_path.display());
        }
    }
    let path = dir.join("model.safetensors");
    let tensors = read_safetensors(&path)?;
    let src = path.display().to_string();
    for (name, p) in &model.params {
        let needed = !meta.lora_only || name.contains(".lora_");
        match tensors.get(name) {
            Some(t) => {
                if t.dims() != p.var.dims() {
                    bail!("{src}: tensor '{name}' has shape {:?}, the model {:?}", t.dims(), p.var.dims());
                }
                p.var.set(&t.to_dtype(p.var.dtype())?.to_device(p.var.device())?)?;
            }
            None if needed => bail!("{src}: missing tensor '{name}'"),
            None => {}
        }
    }
    Ok(())
}

/// Exports the model (LoRA merged) as a Hugging Face directory transformers can load:
/// `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
/// `generation_config.json`.
pub fn export_hf(model: &Transformer, tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let merged = model.lora_merged()?;
    let m = merged.as_ref().unwrap_or(model);
    let bos = tokenizer.bos.as_ref().map(|b| b.0);
    let eos = tokenizer.eos.as_ref().map(|b| b.0);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&m.cfg.to_hf_json(bos, eos))?)?;
    write_safetensors(&m.tensors()?, &dir.join("model.safetensors"))?;
    tokenizer.save_hf(dir)?;
    let mut gc = serde_json::json!({ "eos_token_id": tokenizer.stop_ids });
    if let Some(b) = bos {
        gc["bos_token_id"] = b.into();
    }
    if let Some(p) = &tokenizer.pad {
        gc["pad_token_id"] = p.0.into();
    }
    std::fs::write(dir.join("generation_config.json"), serde_json::to_string_pretty(&gc)?)?;
    Ok(())
}
