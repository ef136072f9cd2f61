//! Fuzz targets for every file the model core reads from users: GGUF weights (every header field,
//! tensor infos, offsets, dims, types), safetensors headers, `config.json`, `tokenizer.json`,
//! chat templates and `--messages` lists. Each starts from a real file written here (a tiny model
//! laid out as llama.cpp's converter and `save_pretrained` do) and mutates it; every case must
//! load or fail with an error naming the file. See `fuzz/mutate.rs` for budgets
//! (`COLLM_FUZZ_CASES=N` runs longer).

mod common;
#[path = "../../../fuzz/mutate.rs"]
mod mutate;

use candle_core::quantized::GgmlDType;
use collm_model::tokenizer::{read_messages, Message};
use collm_model::*;
use common::*;
use mutate::{cases, mutate_bytes, mutate_json, Rng};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

fn regressions() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions")
}

fn setup() {
    static CAP: Once = Once::new();
    // 6 GiB of address space: far more than any of these tiny files can justify.
    CAP.call_once(|| mutate::cap_address_space(6 << 30));
}

/// A fresh directory for one target's cases.
fn case_dir(target: &str) -> PathBuf {
    tmpdir(&format!("fuzz-{target}"))
}

fn good_gguf(dir: &Path, dtype: GgmlDType) -> Vec<u8> {
    let p = dir.join("seed.gguf");
    write_gguf(&tiny(Arch::Llama, 264, 1), &p, dtype, None);
    std::fs::read(&p).unwrap()
}

/// The error names the file (its full path or just its name).
fn names(e: &anyhow::Error, path: &Path) -> Result<bool, String> {
    let msg = format!("{e:#}");
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    if msg.contains(&name) || msg.contains(&path.display().to_string()) {
        Ok(false)
    } else {
        Err(format!("the error does not name {}: {msg}", path.display()))
    }
}

/// A model that loaded must also run: one forward pass over a few tokens.
fn runs(lm: &LoadedModel) -> Result<bool, String> {
    let ids: Vec<u32> = (0..4).map(|i| i % lm.model.cfg.vocab_size as u32).collect();
    let mut cache = KvCache::new(1, lm.model.cfg.num_layers);
    match lm.model.forward(&[ids], &[vec![true; 4]], &mut cache, false) {
        Ok(_) => Ok(true),
        // A (damaged) context length of under 4 tokens is refused clearly.
        Err(e) if format!("{e}").contains("context of") => Ok(true),
        Err(e) => Err(format!("loaded but cannot run: {e:#}")),
    }
}

#[test]
fn fuzz_gguf() {
    setup();
    let dir = case_dir("gguf");
    let seeds = [good_gguf(&dir, GgmlDType::F32), good_gguf(&dir, GgmlDType::Q8_0)];
    let fields: Vec<Vec<(usize, usize)>> = seeds.iter().map(|s| gguf::header_fields(s, "seed").unwrap()).collect();
    let path = dir.join("case.gguf");
    let p = path.clone();
    mutate::run(
        "gguf",
        &regressions(),
        cases(300),
        DEADLINE,
        move |rng: &mut Rng| {
            let i = rng.below(seeds.len());
            // Mostly the header's own fields (counts, lengths, types, dims, offsets).
            let f = if rng.chance(0.8) { &fields[i][..] } else { &[] };
            mutate_bytes(rng, &seeds[i], f)
        },
        move |bytes: &[u8]| {
            std::fs::write(&p, bytes).unwrap();
            match loader::load_gguf(&p) {
                Ok(lm) => runs(&lm),
                Err(e) => names(&e, &p),
            }
        },
    );
}

/// A Hugging Face directory of the tiny model: config.json, model.safetensors, tokenizer files.
fn hf_dir(dir: &Path) -> PathBuf {
    let gguf = dir.join("seed.gguf");
    write_gguf(&tiny(Arch::Llama, 264, 1), &gguf, GgmlDType::F32, None);
    let lm = loader::load_gguf(&gguf).unwrap();
    let hf = dir.join("hf");
    checkpoint::export_hf(&lm.model, &lm.tokenizer, &hf).unwrap();
    hf
}

/// Runs a target that mutates one file of a Hugging Face directory (`file`), loading the
/// directory each case.
fn fuzz_hf_file(target: &str, file: &str, n: usize, gen: impl Fn(&mut Rng, &[u8]) -> Vec<u8> + Send + 'static) {
    setup();
    let dir = case_dir(target);
    let hf = hf_dir(&dir);
    let path = hf.join(file);
    let seed = std::fs::read(&path).unwrap();
    let (p, d) = (path.clone(), hf.clone());
    mutate::run(
        target,
        &regressions(),
        cases(n),
        DEADLINE,
        move |rng: &mut Rng| gen(rng, &seed),
        move |bytes: &[u8]| {
            std::fs::write(&p, bytes).unwrap();
            match loader::load_hf_dir(&d) {
                Ok(lm) => {
                    runs(&lm)?;
                    // The tokenizer and its template must work too, or fail with a clear error.
                    let ids = lm.tokenizer.encode("hello <|im_end|> world", true).map_err(|e| format!("{e:#}"))?;
                    lm.tokenizer.decode(&ids, false).map_err(|e| format!("{e:#}"))?;
                    let msgs = [Message { role: "user".into(), content: "hi".into() }];
                    let _ = lm.tokenizer.apply_chat_template(&msgs, true);
                    Ok(true)
                }
                Err(e) => names(&e, &p).or_else(|_| names(&e, &d)),
            }
        },
    );
}

#[test]
fn fuzz_safetensors_header() {
    fuzz_hf_file("safetensors", "model.safetensors", 300, |rng, seed| {
        let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
        if rng.chance(0.7) {
            // Structure-aware: mutate the header's JSON (dtypes, shapes, data offsets).
            let header: serde_json::Value = serde_json::from_slice(&seed[8..8 + n]).unwrap();
            let text = mutate_json(rng, &header).to_string().into_bytes();
            let mut out = (text.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&text);
            out.extend_from_slice(&seed[8 + n..]);
            out
        } else {
            mutate_bytes(rng, seed, &[(0, 8)])
        }
    });
}

#[test]
fn fuzz_config_json() {
    fuzz_hf_file("config_json", "config.json", 300, |rng, seed| {
        let v: serde_json::Value = serde_json::from_slice(seed).unwrap();
        if rng.chance(0.85) {
            mutate_json(rng, &v).to_string().into_bytes()
        } else {
            mutate_bytes(rng, seed, &[])
        }
    });
}

#[test]
fn fuzz_tokenizer_json() {
    fuzz_hf_file("tokenizer_json", "tokenizer.json", 200, |rng, seed| {
        let v: serde_json::Value = serde_json::from_slice(seed).unwrap();
        if rng.chance(0.85) {
            mutate_json(rng, &v).to_string().into_bytes()
        } else {
            mutate_bytes(rng, seed, &[])
        }
    });
}

/// Pieces of template syntax spliced into a real chat template: loops (long, nested, endless
/// through recursion), errors, unbalanced blocks, undefined names and filters.
const SNIPPETS: [&str; 14] = [
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ raise_exception('bad template') }}",
    "{% for m in messages %}",
    "{% endfor %}",
    "{% if %}",
    "{{ messages[999]['content'] }}",
    "{{ undefined_thing.attr.more }}",
    "{{ messages | tojson }}",
    "{{ 'x' * 100000000 }}",
    "{% set ns = namespace(a=1) %}{{ ns.a / 0 }}",
    "{{ (messages[0]['content'] ~ 'y') | upper | replace('H', 'h') }}",
    "{% while true %}",
    "{{ range(10**12) | length }}",
];

#[test]
fn fuzz_chat_templates() {
    setup();
    let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let tok = std::sync::Arc::new(std::sync::Mutex::new(Tokenizer::byte_level(&SPECIALS).unwrap()));
    let t2 = tok.clone();
    mutate::run(
        "chat_template",
        &regressions(),
        cases(300),
        DEADLINE,
        move |rng: &mut Rng| {
            let mut s = template.to_string();
            for _ in 0..1 + rng.below(2) {
                if rng.chance(0.6) {
                    let at = (0..=rng.below(s.len() + 1).min(s.len())).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                    let snippet: &str = SNIPPETS[rng.below(SNIPPETS.len())];
                    s.insert_str(at, snippet);
                } else {
                    s = String::from_utf8_lossy(&mutate_bytes(rng, s.as_bytes(), &[])).into_owned();
                }
            }
            s.into_bytes()
        },
        move |bytes: &[u8]| {
            let mut t = t2.lock().unwrap();
            t.chat_template = Some(String::from_utf8_lossy(bytes).into_owned());
            let msgs =
                [Message { role: "user".into(), content: "Hi".into() }, Message { role: "assistant".into(), content: "Hello".into() }];
            match t.apply_chat_template(&msgs, true) {
                Ok(_) => Ok(true),
                Err(e) if format!("{e:#}").contains("chat template") => Ok(false),
                Err(e) => Err(format!("the error does not say it is the chat template: {e:#}")),
            }
        },
    );
    drop(tok);
}

#[test]
fn fuzz_messages() {
    setup();
    let dir = case_dir("messages");
    let path = dir.join("messages.json");
    let seed = serde_json::json!([
        {"role": "system", "content": "You write short summaries."},
        {"role": "user", "content": "Summarize: the cat sat on the mat."},
        {"role": "assistant", "content": "A cat sat."}
    ]);
    let tok = Tokenizer::byte_level(&SPECIALS).unwrap();
    let mut tok = tok;
    tok.chat_template = Some("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}".into());
    let p = path.clone();
    mutate::run(
        "messages",
        &regressions(),
        cases(300),
        DEADLINE,
        move |rng: &mut Rng| {
            if rng.chance(0.85) {
                mutate_json(rng, &seed).to_string().into_bytes()
            } else {
                mutate_bytes(rng, seed.to_string().as_bytes(), &[])
            }
        },
        move |bytes: &[u8]| {
            std::fs::write(&p, bytes).unwrap();
            match read_messages(&p) {
                Ok(m) => {
                    let text = tok.apply_chat_template(&m, true).map_err(|e| format!("{e:#}"))?;
                    tok.encode(&text, false).map(|_| true).map_err(|e| format!("{e:#}"))
                }
                Err(e) => names(&e, &p),
            }
        },
    );
}
