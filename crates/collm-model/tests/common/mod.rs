//! Helpers shared by the model crate's tests: tiny random models and a GGUF writer that lays
//! a model out as llama.cpp's converter does.
#![allow(dead_code)]

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Tensor;
use collm_model::*;

pub const SPECIALS: [&str; 4] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"];
pub fn tiny(arch: Arch, vocab: usize, seed: u64) -> Transformer {
    Transformer::random(ModelConfig::tiny(arch, vocab), seed).unwrap()
}
pub fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("collm-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
pub fn permute(t: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    t.reshape((heads, 2, rows / heads / 2, cols)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((rows, cols)).unwrap()
}

pub fn gguf_name(hf: &str) -> String {
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = map.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (l, rest) = rest.split_once('.').unwrap();
    let rest = rest
        .replace("input_layernorm", "attn_norm")
        .replace("post_attention_layernorm", "ffn_norm")
        .replace("self_attn.q_proj", "attn_q")
        .replace("self_attn.k_proj", "attn_k")
        .replace("self_attn.v_proj", "attn_v")
        .replace("self_attn.o_proj", "attn_output")
        .replace("self_attn.q_norm", "attn_q_norm")
        .replace("self_attn.k_norm", "attn_k_norm")
        .replace("mlp.gate_proj", "ffn_gate")
        .replace("mlp.up_proj", "ffn_up")
        .replace("mlp.down_proj", "ffn_down");
    format!("blk.{l}.{rest}")
}

/// Writes `m` as a GGUF file the way llama.cpp's converter would (matrices in `dtype`).
pub fn write_gguf(m: &Transformer, path: &std::path::Path, dtype: GgmlDType, skip: Option<&str>) {
    write_gguf_with(m, path, dtype, skip, &[]);
}

/// `write_gguf` with some integer metadata (`{arch}.KEY`) replaced.
pub fn write_gguf_with(m: &Transformer, path: &std::path::Path, dtype: GgmlDType, skip: Option<&str>, set: &[(&str, u32)]) {
    use gguf_file::Value as V;
    let a = m.cfg.arch.model_type();
    let tok = Tokenizer::byte_level(&SPECIALS).unwrap();
    let mut vocab: Vec<(String, u32)> = tok.inner.get_vocab(true).into_iter().collect();
    vocab.sort_by_key(|x| x.1);
    vocab.push(("he".into(), vocab.len() as u32)); // the one merge's result
    let tokens: Vec<V> = vocab.iter().map(|(s, _)| V::String(s.clone())).collect();
    let types: Vec<V> = vocab.iter().map(|(_, i)| V::I32(if (*i as usize) < SPECIALS.len() { 3 } else { 1 })).collect();
    let md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(a.into())),
        (format!("{a}.embedding_length"), V::U32(m.cfg.hidden_size as u32)),
        (format!("{a}.feed_forward_length"), V::U32(m.cfg.intermediate_size as u32)),
        (format!("{a}.block_count"), V::U32(m.cfg.num_layers as u32)),
        (format!("{a}.attention.head_count"), V::U32(m.cfg.num_heads as u32)),
        (format!("{a}.attention.head_count_kv"), V::U32(m.cfg.num_kv_heads as u32)),
        (format!("{a}.attention.key_length"), V::U32(m.cfg.head_dim as u32)),
        (format!("{a}.rope.freq_base"), V::F32(m.cfg.rope_theta as f32)),
        (format!("{a}.attention.layer_norm_rms_epsilon"), V::F32(m.cfg.rms_norm_eps as f32)),
        (format!("{a}.context_length"), V::U32(2048)),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), V::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), V::Array(types)),
        ("tokenizer.ggml.merges".into(), V::Array(vec![V::String("h e".into())])),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
        ("tokenizer.chat_template".into(), V::String("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into())),
    ];
    let md: Vec<(String, V)> = md
        .into_iter()
        .map(|(k, v)| match set.iter().find(|(key, _)| k == format!("{a}.{key}")) {
            Some((_, x)) => (k, V::U32(*x)),
            None => (k, v),
        })
        .collect();
    let mut qts = vec![];
    for (name, t) in m.tensors().unwrap() {
        if Some(name.as_str()) == skip {
            continue;
        }
        let mut t = t;
        if m.cfg.arch == Arch::Llama && name.ends_with("q_proj.weight") {
            t = permute(&t, m.cfg.num_heads);
        } else if m.cfg.arch == Arch::Llama && name.ends_with("k_proj.weight") {
            t = permute(&t, m.cfg.num_kv_heads);
        }
        let dt = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
        qts.push((gguf_name(&name), QTensor::quantize(&t, dt).unwrap()));
    }
    let mut f = std::fs::File::create(path).unwrap();
    let mdr: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tr: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &mdr, &tr).unwrap();
}
