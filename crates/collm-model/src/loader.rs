//! Loading weights and tokenizer: GGUF files (dequantized to f32) and Hugging Face directories.

use crate::config::{Arch, ModelConfig};
use crate::fetch;
use crate::model::Transformer;
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A model with its tokenizer.
pub struct LoadedModel {
    pub model: Transformer,
    pub tokenizer: Tokenizer,
    pub source: String,
}

/// Resolves a model argument: a built-in name (fetched on first use), a `.gguf` file, or a
/// Hugging Face directory.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    if fetch::known(spec).is_some() {
        return fetch::fetch(spec);
    }
    let p = PathBuf::from(spec);
    if !p.exists() {
        let names: Vec<_> = fetch::KNOWN.iter().map(|k| k.name).collect();
        bail!("model '{spec}' not found: not a file, a directory or a built-in name ({})", names.join(", "));
    }
    Ok(p)
}

pub fn load(spec: &str) -> Result<LoadedModel> {
    let path = resolve(spec)?;
    if path.is_dir() {
        load_hf_dir(&path)
    } else {
        load_gguf(&path)
    }
}

fn md_usize(md: &std::collections::HashMap<String, gguf_file::Value>, key: &str, source: &str) -> Result<usize> {
    let v = md.get(key).with_context(|| format!("{source}: GGUF metadata has no '{key}'"))?;
    Ok(v.to_u64().or_else(|_| v.to_u32().map(|x| x as u64)).or_else(|_| v.to_i32().map(|x| x as u64))? as usize)
}

fn md_f64(md: &std::collections::HashMap<String, gguf_file::Value>, key: &str) -> Option<f64> {
    // GGUF stores these as f32; going through the shortest decimal form keeps 1e-5 as 1e-5 (as in
    // the model's config.json) instead of 9.9999997e-6.
    md.get(key).and_then(|v| v.to_f32().map(|x| x.to_string().parse::<f64>().unwrap_or(x as f64)).or_else(|_| v.to_f64()).ok())
}

/// Reads the GGUF header's model config.
pub fn gguf_config(content: &gguf_file::Content, source: &str) -> Result<ModelConfig> {
    let md = &content.metadata;
    let arch_name = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .with_context(|| format!("{source}: GGUF metadata has no 'general.architecture'"))?;
    let arch = ModelConfig::parse_arch(&arch_name).with_context(|| format!("{source}: general.architecture"))?;
    let a = arch_name.as_str();
    let hidden = md_usize(md, &format!("{a}.embedding_length"), source)?;
    let heads = md_usize(md, &format!("{a}.attention.head_count"), source)?;
    let kv = md_usize(md, &format!("{a}.attention.head_count_kv"), source).unwrap_or(heads);
    let head_dim = match md_usize(md, &format!("{a}.attention.key_length"), source) {
        Ok(d) => d,
        Err(_) if heads == 0 || hidden % heads != 0 => {
            bail!("{source}: '{a}.attention.head_count' = {heads} does not divide '{a}.embedding_length' = {hidden}")
        }
        Err(_) => hidden / heads,
    };
    let emb = content.tensor_infos.get("token_embd.weight").with_context(|| format!("{source}: missing tensor 'token_embd.weight'"))?;
    let vocab = emb.shape.dims()[0];
    if md.contains_key(&format!("{a}.rope.scaling.type")) || content.tensor_infos.contains_key("rope_freqs.weight") {
        bail!("{source}: RoPE scaling is not supported");
    }
    let cfg = ModelConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: md_usize(md, &format!("{a}.feed_forward_length"), source)?,
        num_layers: md_usize(md, &format!("{a}.block_count"), source)?,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        rope_theta: md_f64(md, &format!("{a}.rope.freq_base")).unwrap_or(10000.0),
        rms_norm_eps: md_f64(md, &format!("{a}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        qk_norm: content.tensor_infos.contains_key("blk.0.attn_q_norm.weight"),
        max_position_embeddings: md_usize(md, &format!("{a}.context_length"), source).unwrap_or(4096),
    };
    cfg.validate().with_context(|| format!("{source}: GGUF metadata"))?;
    Ok(cfg)
}

/// GGUF module names and their Hugging Face names, per layer (`blk.N.X` ↔ `model.layers.N.Y`).
const LAYER_MODULES: [(&str, &str); 11] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Tensors outside the layers: GGUF name, Hugging Face name.
const TOP_TENSORS: [(&str, &str); 3] =
    [("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"), ("output.weight", "lm_head.weight")];

/// GGUF tensor name → Hugging Face name.
fn hf_name(gguf: &str) -> Option<String> {
    map_name(gguf, false)
}

/// Hugging Face tensor name → GGUF name (the inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    map_name(hf, true)
}

/// Renames a tensor through [`TOP_TENSORS`] and [`LAYER_MODULES`], to GGUF names or from them.
fn map_name(name: &str, to_gguf: bool) -> Option<String> {
    let pick = |&(g, h): &(&'static str, &'static str)| if to_gguf { (h, g) } else { (g, h) };
    if let Some((_, to)) = TOP_TENSORS.iter().map(pick).find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (from_prefix, to_prefix) = if to_gguf { ("model.layers.", "blk.") } else { ("blk.", "model.layers.") };
    let (layer, rest) = name.strip_prefix(from_prefix)?.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (_, to) = LAYER_MODULES.iter().map(pick).find(|(from, _)| *from == module)?;
    Some(format!("{to_prefix}{layer}.{to}.{kind}"))
}

/// The `tokenizer.*` metadata of a GGUF file (what a GGUF export carries over from its base).
pub fn gguf_tokenizer_metadata(path: &Path) -> Result<Vec<(String, gguf_file::Value)>> {
    let source = path.display().to_string();
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {source}"))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| anyhow!("{source}: not a readable GGUF file: {e}"))?;
    let mut md: Vec<(String, gguf_file::Value)> = content.metadata.into_iter().filter(|(k, _)| k.starts_with("tokenizer.")).collect();
    md.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(md)
}

/// llama.cpp's Q/K row permutation for interleaved RoPE (the inverse of [`unpermute_rows`]).
pub fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    regroup_rows(t, heads, true)
}

/// Each head's rows as (2, head_dim / 2) → (head_dim / 2, 2) for GGUF (`to_gguf`), or back.
fn regroup_rows(t: &Tensor, heads: usize, to_gguf: bool) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    if heads == 0 || rows % heads != 0 || (rows / heads) % 2 != 0 {
        bail!("{rows} rows cannot be split into {heads} heads of an even size");
    }
    let hd = rows / heads;
    let grouped = if to_gguf { t.reshape((heads, 2, hd / 2, rest))? } else { t.reshape((heads, hd / 2, 2, rest))? };
    Ok(grouped.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// Undoes llama.cpp's Q/K row permutation (made for interleaved RoPE) so the rows are in the
/// Hugging Face "rotate half" order.
fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    regroup_rows(t, heads, false)
}

pub fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let source = path.display().to_string();
    let file = std::fs::File::open(path).with_context(|| format!("opening {source}"))?;
    // SAFETY: the file is opened read-only and not modified while mapped.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {source}"))?;
    crate::gguf::check(&mmap, &source)?;
    let mut reader = std::io::Cursor::new(&mmap[..]);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| anyhow!("{source}: not a readable GGUF file: {e}"))?;
    let cfg = gguf_config(&content, &source)?;
    let tokenizer = Tokenizer::from_gguf_metadata(&content.metadata, &source)?;
    let mut tensors = BTreeMap::new();
    for name in content.tensor_infos.keys() {
        let Some(hf) = hf_name(name) else { continue };
        let read = || -> Result<Tensor> {
            let q = content.tensor(&mut reader.clone(), name, &Device::Cpu)?;
            let mut t = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
            if cfg.arch == Arch::Llama && name.starts_with("blk.") {
                if name.contains(".attn_q.") {
                    t = unpermute_rows(&t, cfg.num_heads)?;
                } else if name.contains(".attn_k.") {
                    t = unpermute_rows(&t, cfg.num_kv_heads)?;
                }
            }
            Ok(t)
        };
        tensors.insert(hf, read().with_context(|| format!("{source}: tensor '{name}'"))?);
    }
    if tokenizer.vocab_size() > cfg.vocab_size {
        bail!("{source}: tokenizer has {} tokens but the embedding only {}", tokenizer.vocab_size(), cfg.vocab_size);
    }
    let model = Transformer::from_tensors(cfg, tensors, &source)?;
    Ok(LoadedModel { model, tokenizer, source })
}

pub fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    let source = dir.display().to_string();
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
    let cfg = ModelConfig::from_hf_json(&v, &cfg_path.display().to_string())?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{source}: no *.safetensors file");
    }
    let mut tensors = BTreeMap::new();
    for f in &files {
        for (name, t) in read_safetensors(f)? {
            tensors.insert(name, t);
        }
    }
    if cfg.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let model = Transformer::from_tensors(cfg, tensors, &source)?;
    Ok(LoadedModel { model, tokenizer, source })
}

/// Reads every tensor of a safetensors file (memory-mapped) as f32 on the CPU.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let source = path.display().to_string();
    let file = std::fs::File::open(path).with_context(|| format!("opening {source}"))?;
    // SAFETY: read-only mapping of a file we do not modify.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {source}"))?;
    let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| anyhow!("{source}: not a readable safetensors file: {e}"))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape: Vec<usize> = view.shape().to_vec();
        let data = view.data();
        let t = match view.dtype() {
            safetensors::Dtype::F32 => Tensor::from_raw_buffer(data, DType::F32, &shape, &Device::Cpu)?,
            safetensors::Dtype::F16 => Tensor::from_raw_buffer(data, DType::F16, &shape, &Device::Cpu)?.to_dtype(DType::F32)?,
            safetensors::Dtype::BF16 => Tensor::from_raw_buffer(data, DType::BF16, &shape, &Device::Cpu)?.to_dtype(DType::F32)?,
            d => bail!("{source}: tensor '{name}' has unsupported dtype {d:?}"),
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Writes named tensors to a safetensors file, atomically (temporary file, then rename).
pub fn write_safetensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    let map = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<Result<std::collections::HashMap<String, Tensor>>>()?;
    candle_core::safetensors::save(&map, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
