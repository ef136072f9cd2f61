//! Tokenizer and chat template, from a GGUF header or a Hugging Face directory.

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;

/// One chat message, as in transformers' `apply_chat_template`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A `tokenizers` tokenizer from its JSON. The JSON's syntax is checked first, and a panic inside
/// the library (its deserializer unwraps some errors, e.g. in `decoder`) becomes an error naming
/// `source`.
fn parse_tokenizer(bytes: &[u8], source: &str) -> Result<tokenizers::Tokenizer> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).with_context(|| format!("{source}: not valid JSON"))?;
    match std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes)) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => bail!("{source}: {e}"),
        Err(p) => {
            let why = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            bail!("{source}: not a tokenizer the tokenizers library can read (it failed inside: {why})")
        }
    }
}

/// Reads a `--messages` file: a JSON list of {role, content}; errors name the file.
pub fn read_messages(path: &Path) -> Result<Vec<Message>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let msgs: Vec<Message> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON list of {{\"role\": ..., \"content\": ...}} messages", path.display()))?;
    if msgs.is_empty() {
        bail!("{}: the message list is empty", path.display());
    }
    Ok(msgs)
}

/// The instructions a chat template may run per rendering: far more than any real template needs
/// for a long conversation, far fewer than a runaway loop takes.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos: Option<(u32, String)>,
    pub eos: Option<(u32, String)>,
    pub pad: Option<(u32, String)>,
    /// Ids that end a generation (the EOS token and the chat template's end-of-turn token).
    pub stop_ids: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// For character-level tokenizers: the characters text may hold.
    pub alphabet: Option<std::collections::HashSet<char>>,
}

impl Tokenizer {
    /// Tokenizes `text`; special-token strings in it become their ids. A BOS token is prepended
    /// only when the model asks for one and `add_special` is set.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        if let Some(a) = &self.alphabet {
            if let Some(c) = text.chars().find(|c| !a.contains(c)) {
                bail!("tokenizer: character {c:?} is not in this character-level vocabulary");
            }
        }
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizer: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            if let Some((b, _)) = &self.bos {
                ids.push(*b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow!("tokenizer: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id used to pad batches (never attended to, so its value does not matter).
    pub fn pad_id(&self) -> u32 {
        self.pad.as_ref().or(self.eos.as_ref()).map(|p| p.0).unwrap_or(0)
    }

    /// Renders `messages` with the model's Jinja chat template, as transformers does
    /// (trim_blocks, lstrip_blocks, no trailing-newline keeping).
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tpl = self.chat_template.as_deref().context("this model has no chat template; pass a plain prompt instead")?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // A template that loops without end (or for billions of steps) runs out of fuel instead.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", tpl).map_err(|e| anyhow!("chat template does not parse: {e}"))?;
        let ctx = json!({
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos.as_ref().map(|b| b.1.clone()).unwrap_or_default(),
            "eos_token": self.eos.as_ref().map(|b| b.1.clone()).unwrap_or_default(),
            "pad_token": self.pad.as_ref().map(|b| b.1.clone()).unwrap_or_default(),
        });
        env.get_template("chat")?.render(ctx).map_err(|e| anyhow!("chat template failed to render: {e}"))
    }

    /// Builds the tokenizer a GGUF header describes (`tokenizer.ggml.*`).
    pub fn from_gguf_metadata(
        md: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
        source: &str,
    ) -> Result<Self> {
        use candle_core::quantized::gguf_file::Value as V;
        let get = |k: &str| md.get(k).with_context(|| format!("{source}: GGUF metadata has no '{k}'"));
        let model = get("tokenizer.ggml.model")?.to_string().map_err(|e| anyhow!("{source}: {e}"))?.clone();
        if model != "gpt2" {
            bail!("{source}: tokenizer model '{model}' is not supported (collm reads byte-level BPE, 'gpt2')");
        }
        let tokens: Vec<String> = match get("tokenizer.ggml.tokens")? {
            V::Array(a) => a.iter().map(|v| v.to_string().cloned()).collect::<candle_core::Result<_>>()?,
            _ => bail!("{source}: 'tokenizer.ggml.tokens' is not an array"),
        };
        let merges: Vec<String> = match get("tokenizer.ggml.merges")? {
            V::Array(a) => a.iter().map(|v| v.to_string().cloned()).collect::<candle_core::Result<_>>()?,
            _ => bail!("{source}: 'tokenizer.ggml.merges' is not an array"),
        };
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(V::Array(a)) => a.iter().map(|v| v.to_i32().map(|x| x as i64)).collect::<candle_core::Result<_>>()?,
            _ => vec![1; tokens.len()],
        };
        let id_of = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let pre = md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok().cloned()).unwrap_or_else(|| "default".into());
        let vocab: serde_json::Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        let added: Vec<Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer(&pre).with_context(|| format!("{source}: tokenizer.ggml.pre"))?,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        });
        let inner = parse_tokenizer(&serde_json::to_vec(&spec)?, &format!("{source}: tokenizer"))?;
        let named = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).map(|t| (i, t.clone())));
        let bos = named(id_of("tokenizer.ggml.bos_token_id"));
        let eos = named(id_of("tokenizer.ggml.eos_token_id"));
        let pad = named(id_of("tokenizer.ggml.padding_token_id"));
        let add_bos = md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        let chat_template = md.get("tokenizer.chat_template").and_then(|v| v.to_string().ok().cloned());
        let mut tok = Self { inner, bos, eos, pad, stop_ids: vec![], add_bos, chat_template, alphabet: None };
        tok.stop_ids = tok.default_stop_ids(&[]);
        Ok(tok)
    }

    /// A byte-level tokenizer with no merges: ids 0..n_specials are the special tokens given
    /// (the first is EOS and padding), then one id per byte. For tiny models and synthetic tasks.
    pub fn byte_level(specials: &[&str]) -> Result<Self> {
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        let mut vocab = serde_json::Map::new();
        let mut added = vec![];
        for (i, s) in specials.iter().enumerate() {
            vocab.insert(s.to_string(), json!(i));
            added.push(json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
        }
        for (j, c) in alphabet.iter().enumerate() {
            vocab.insert(c.to_string(), json!(specials.len() + j));
        }
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": []}
        });
        let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&spec)?).map_err(|e| anyhow!("byte tokenizer: {e}"))?;
        let eos = specials.first().map(|s| (0u32, s.to_string()));
        let mut tok =
            Self { inner, bos: None, eos: eos.clone(), pad: eos, stop_ids: vec![], add_bos: false, chat_template: None, alphabet: None };
        tok.stop_ids = tok.default_stop_ids(&[]);
        Ok(tok)
    }

    /// A character-level tokenizer over a small alphabet: ids 0..n_specials are the special tokens
    /// (the first is EOS and padding), then one id per character of `alphabet`, in order. Text
    /// with a character outside the alphabet is an error. For tiny models on synthetic tasks.
    pub fn char_level(specials: &[&str], alphabet: &str) -> Result<Self> {
        let mut vocab = serde_json::Map::new();
        let mut added = vec![];
        for (i, s) in specials.iter().enumerate() {
            vocab.insert(s.to_string(), json!(i));
            added.push(json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
        }
        for c in alphabet.chars() {
            if vocab.contains_key(&c.to_string()) {
                bail!("char_level: '{c}' appears twice in the alphabet");
            }
            let id = vocab.len();
            vocab.insert(c.to_string(), json!(id));
        }
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": null, "post_processor": null, "decoder": {"type": "Fuse"},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": []}
        });
        let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&spec)?).map_err(|e| anyhow!("char tokenizer: {e}"))?;
        let eos = specials.first().map(|s| (0u32, s.to_string()));
        let alphabet: std::collections::HashSet<char> = alphabet.chars().collect();
        let mut tok =
            Self { inner, bos: None, eos: eos.clone(), pad: eos, stop_ids: vec![], add_bos: false, chat_template: None, alphabet: None };
        tok.stop_ids = tok.default_stop_ids(&[]);
        tok.alphabet = Some(alphabet);
        Ok(tok)
    }

    /// Reads `tokenizer.json`, `tokenizer_config.json` (and `generation_config.json` if present).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tj).with_context(|| format!("reading {}", tj.display()))?;
        let inner = parse_tokenizer(&bytes, &tj.display().to_string())?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc: Value = if tc_path.exists() {
            let s = std::fs::read_to_string(&tc_path).with_context(|| format!("reading {}", tc_path.display()))?;
            serde_json::from_str(&s).with_context(|| format!("{}: invalid JSON", tc_path.display()))?
        } else {
            json!({})
        };
        let token_str = |k: &str| -> Option<String> {
            match tc.get(k)? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
                _ => None,
            }
        };
        let named = |k: &str| token_str(k).and_then(|s| inner.token_to_id(&s).map(|i| (i, s)));
        let bos = named("bos_token");
        let eos = named("eos_token");
        let pad = named("pad_token");
        let add_bos = tc.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
        let mut chat_template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from)),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template = Some(std::fs::read_to_string(&jinja)?);
        }
        let mut extra = vec![];
        let gc = dir.join("generation_config.json");
        if gc.exists() {
            let v: Value =
                serde_json::from_str(&std::fs::read_to_string(&gc)?).with_context(|| format!("{}: invalid JSON", gc.display()))?;
            match v.get("eos_token_id") {
                Some(Value::Number(n)) => extra.extend(n.as_u64().map(|x| x as u32)),
                Some(Value::Array(a)) => extra.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32)),
                _ => {}
            }
        }
        let mut tok = Self { inner, bos, eos, pad, stop_ids: vec![], add_bos, chat_template, alphabet: None };
        tok.stop_ids = tok.default_stop_ids(&extra);
        Ok(tok)
    }

    fn default_stop_ids(&self, extra: &[u32]) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos.iter().map(|e| e.0).collect();
        // End-of-turn and end-of-text tokens end a response too (as Qwen's and SmolLM2's
        // generation configs list them), whichever of them the model has as EOS.
        for t in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
            if let Some(i) = self.inner.token_to_id(t) {
                ids.push(i);
            }
        }
        ids.extend_from_slice(extra);
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` for transformers.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        self.inner.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow!("saving tokenizer.json: {e}"))?;
        let mut tc = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "model_max_length": 8192,
        });
        if let Some(b) = &self.bos {
            tc["bos_token"] = json!(b.1);
        }
        if let Some(e) = &self.eos {
            tc["eos_token"] = json!(e.1);
        }
        if let Some(p) = &self.pad {
            tc["pad_token"] = json!(p.1);
        }
        if let Some(t) = &self.chat_template {
            tc["chat_template"] = json!(t);
        }
        std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&tc)?)?;
        Ok(())
    }
}

const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer llama.cpp's `tokenizer.ggml.pre` names, in tokenizer.json form.
fn pre_tokenizer(pre: &str) -> Result<Value> {
    let byte_level =
        |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "gpt-2" | "gpt2" | "default" => byte_level(true),
        "qwen2" | "deepseek-r1-qwen" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
        other => bail!("pre-tokenizer '{other}' is not supported (known: smollm, gpt-2, qwen2, llama-bpe)"),
    })
}
