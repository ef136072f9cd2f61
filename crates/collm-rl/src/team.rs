//! The team: each agent's policy (model, tokenizer, prompt format, optimizer) and the critics.

use crate::config::{Algo, Config, DcCritic, ModelSpec, PromptFormat};
use anyhow::{bail, Context, Result};
use candle_core::Var;
use collm_model::{loader, AdamW, AdamWConfig, Arch, DeviceSpec, LoraConfig, Message, ModelConfig, Tokenizer, Transformer, ValueHead};
use std::sync::Arc;

/// The characters a `tiny` model's vocabulary holds: the synthetic tasks' alphabet plus what
/// the centralized critic's `[Agent i]` blocks need.
pub fn tiny_alphabet() -> String {
    let mut a = collm_envs::synthetic::ALPHABET.to_string();
    for c in "A[] \n".chars() {
        if !a.contains(c) {
            a.push(c);
        }
    }
    a
}

/// The chat template cut into the pieces a multi-turn history appends, found by rendering a
/// conversation with placeholder contents.
#[derive(Clone, Debug)]
pub struct ChatPieces {
    /// What follows a response that ended with a stop token, per stop token: the rest of the
    /// end-of-turn text when the token begins it (`<|im_end|>` → "\n"), else the whole
    /// end-of-turn text (`<|endoftext|>` → "<|im_end|>\n"), so every turn ends as the template ends it.
    pub after_stop: Vec<(u32, String)>,
    /// What follows a response cut at max_new_tokens (the whole end-of-turn text).
    pub after_truncation: String,
    /// The next user message around its content, with the generation prompt.
    pub before_obs: String,
    pub after_obs: String,
}

impl ChatPieces {
    pub fn new(tok: &Tokenizer) -> Result<Self> {
        let (x, y, o) = ("\u{E000}", "\u{E001}", "\u{E002}");
        let m = |role: &str, c: &str| Message { role: role.into(), content: c.into() };
        let base = tok.apply_chat_template(&[m("user", x), m("assistant", y)], false)?;
        let full = tok.apply_chat_template(&[m("user", x), m("assistant", y), m("user", o)], true)?;
        let cont = full.strip_prefix(base.as_str()).context("the chat template does not extend a conversation by appending to it")?;
        let (before_obs, after_obs) = cont.split_once(o).context("the chat template drops the user message")?;
        let after_y = &base[base.rfind(y).context("the chat template drops the assistant message")? + y.len()..];
        let after_stop = tok
            .stop_ids
            .iter()
            .map(|&id| {
                let text = tok.decode(&[id], false).unwrap_or_default();
                let rest = if text.is_empty() { None } else { after_y.strip_prefix(text.as_str()) };
                (id, rest.unwrap_or(after_y).to_string())
            })
            .collect();
        Ok(Self { after_stop, after_truncation: after_y.to_string(), before_obs: before_obs.into(), after_obs: after_obs.into() })
    }

    /// What follows a response whose last token is `last` (`stopped`: a stop token ended it).
    pub fn after(&self, last: Option<u32>, stopped: bool) -> &str {
        match (stopped, last) {
            (true, Some(t)) => self.after_stop.iter().find(|(id, _)| *id == t).map_or(self.after_truncation.as_str(), |(_, s)| s.as_str()),
            _ => &self.after_truncation,
        }
    }
}

/// One agent's acting and learning parts.
pub struct Agent {
    pub model: Transformer,
    pub tokenizer: Arc<Tokenizer>,
    pub format: PromptFormat,
    pub chat: Option<ChatPieces>,
    pub opt: AdamW,
    /// CoLLM-DC with value heads: the head on this actor's backbone.
    pub head: Option<ValueHead>,
}

impl Agent {
    /// The text that starts a history: the first observation, formatted.
    pub fn first_text(&self, obs: &str) -> Result<String> {
        Ok(match self.format {
            PromptFormat::Raw => obs.to_string(),
            PromptFormat::Chat => self.tokenizer.apply_chat_template(&[Message { role: "user".into(), content: obs.into() }], true)?,
        })
    }

    /// The first history's tokens. A rendered chat template is tokenized without added special
    /// tokens (as transformers does: a template that renders `{{ bos_token }}` gets one BOS, not
    /// two); raw text gets the tokenizer's BOS when it adds one.
    pub fn encode_first(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, self.format == PromptFormat::Raw)
    }

    /// The text appended after a response (its last token `last`; `stopped`: a stop token ended
    /// it) to bring in the next observation.
    pub fn continuation_text(&self, obs: &str, last: Option<u32>, stopped: bool) -> String {
        match &self.chat {
            None => obs.to_string(),
            Some(c) => format!("{}{}{obs}{}", c.after(last, stopped), c.before_obs, c.after_obs),
        }
    }

    /// Every trainable tensor (the model's and the value head's) by name.
    pub fn trainable(&self) -> Vec<(&String, &Var)> {
        let mut v: Vec<_> = self.model.trainable().collect();
        if let Some(h) = &self.head {
            v.extend(h.trainable());
        }
        v
    }
}

/// A critic: a causal LM with a value head.
pub struct Critic {
    pub model: Transformer,
    pub tokenizer: Arc<Tokenizer>,
    pub head: ValueHead,
    pub opt: AdamW,
}

impl Critic {
    pub fn trainable(&self) -> Vec<(&String, &Var)> {
        let mut v: Vec<_> = self.model.trainable().collect();
        v.extend(self.head.trainable());
        v
    }
}

pub struct Team {
    pub agents: Vec<Agent>,
    /// CoLLM-CC: one critic; CoLLM-DC with separate critics: one per agent; otherwise none.
    pub critics: Vec<Critic>,
}

/// Loads a model (and its tokenizer) as a spec says; `seed` initializes `tiny` models.
pub fn load_model(spec: &ModelSpec, seed: u64) -> Result<(Transformer, Tokenizer)> {
    let (mut model, tok) = if spec.model == "tiny" {
        let t = &spec.tiny;
        let tok = match t.vocab {
            crate::config::TinyVocab::Chars => Tokenizer::char_level(&["<eos>"], &tiny_alphabet())?,
            crate::config::TinyVocab::Bytes => Tokenizer::byte_level(&["<eos>"])?,
        };
        if [t.hidden, t.layers, t.heads, t.kv_heads, t.intermediate].contains(&0) {
            bail!("tiny model: hidden, layers, heads, kv_heads and intermediate must all be at least 1, got {t:?}");
        }
        if t.hidden % t.heads != 0 || t.heads % t.kv_heads != 0 {
            bail!("tiny model: hidden ({}) must divide by heads ({}), and heads by kv_heads ({})", t.hidden, t.heads, t.kv_heads);
        }
        let mut cfg = ModelConfig::tiny(Arch::Llama, tok.vocab_size());
        cfg.hidden_size = t.hidden;
        cfg.num_layers = t.layers;
        cfg.num_heads = t.heads;
        cfg.num_kv_heads = t.kv_heads;
        cfg.head_dim = t.hidden / t.heads;
        cfg.intermediate_size = t.intermediate;
        cfg.max_position_embeddings = t.context;
        let model = Transformer::random(cfg, seed).with_context(|| {
            format!("tiny model (hidden {}, layers {}, heads {}, intermediate {})", t.hidden, t.layers, t.heads, t.intermediate)
        })?;
        (model, tok)
    } else {
        let lm = loader::load(&spec.model).with_context(|| format!("loading model '{}'", spec.model))?;
        (lm.model, lm.tokenizer)
    };
    if spec.lora_rank > 0 {
        model.add_lora(LoraConfig { rank: spec.lora_rank, alpha: spec.lora_alpha, targets: spec.lora_targets.clone() }, seed ^ 0x10ba)?;
    }
    Ok((model, tok))
}

/// Puts the i-th model a spec makes on its device (`key` places it) in the spec's precision.
pub fn place(model: &mut Transformer, spec: &ModelSpec, i: usize, key: &str) -> Result<()> {
    let device: DeviceSpec = spec.device.get(i, key)?;
    let d = device.open().with_context(|| format!("'{key}'"))?;
    model.place(&d, spec.dtype.dtype()).with_context(|| format!("placing model '{}' on {device} in {:?}", spec.model, spec.dtype))?;
    // A frozen base in bf16 under an f32 model (the config refuses it elsewhere).
    if spec.frozen_dtype == collm_model::Precision::Bf16 {
        model
            .hold_frozen_in(spec.frozen_dtype.dtype())
            .with_context(|| format!("holding model '{}''s frozen base in {:?}", spec.model, spec.frozen_dtype))?;
    }
    Ok(())
}

fn adamw(spec: &ModelSpec) -> AdamW {
    AdamW::new(AdamWConfig { lr: spec.lr, weight_decay: spec.weight_decay, ..Default::default() })
}

impl Team {
    /// The team a config describes: its agents and, as the algorithm needs them, its critics.
    pub fn load(cfg: &Config, num_agents: usize) -> Result<Self> {
        Self::build(cfg, num_agents, true)
    }

    /// The agents alone, for decentralized execution: no critic and no value head is made.
    pub fn load_agents(cfg: &Config, num_agents: usize) -> Result<Self> {
        Self::build(cfg, num_agents, false)
    }

    fn build(cfg: &Config, num_agents: usize, with_critics: bool) -> Result<Self> {
        if cfg.agent.len() > num_agents {
            bail!("the config lists {} [[agent]] entries but the task has {num_agents} agents", cfg.agent.len());
        }
        let mut agents = Vec::new();
        let mut shared: Option<(Transformer, Arc<Tokenizer>)> = None;
        for i in 0..num_agents {
            let spec = cfg.agent_spec(i);
            let seed = cfg.seed.wrapping_mul(1000).wrapping_add(i as u64 + 1);
            // Agents that use the shared spec start from one loaded copy (a deep clone each).
            let (model, tokenizer) = if i >= cfg.agent.len() && spec.model != "tiny" {
                if shared.is_none() {
                    let (m, t) = load_model(spec, seed)?;
                    shared = Some((m, Arc::new(t)));
                }
                let (m, t) = shared.as_ref().unwrap();
                (m.deep_clone()?, t.clone())
            } else {
                let (m, t) = load_model(spec, seed)?;
                (m, Arc::new(t))
            };
            let mut model = model;
            place(&mut model, spec, i, &cfg.agent_device_key(i)).with_context(|| format!("agent {i}"))?;
            let ctx = model.cfg.max_position_embeddings;
            if cfg.sampling.max_new_tokens >= ctx {
                bail!(
                    "'sampling.max_new_tokens' = {}: agent {i}'s model has a context of {ctx} tokens, which must hold the history as well as the response",
                    cfg.sampling.max_new_tokens
                );
            }
            let chat = match spec.format {
                PromptFormat::Chat => Some(
                    ChatPieces::new(&tokenizer)
                        .with_context(|| format!("agent {i}: format = \"chat\" needs a chat template; use format = \"raw\""))?,
                ),
                PromptFormat::Raw => None,
            };
            let head = if with_critics && cfg.algo == Algo::Dc && cfg.critic.dc == DcCritic::Head {
                Some(ValueHead::new(cfg.critic.head, model.cfg.hidden_size, seed ^ 0x5eed, &model.device)?)
            } else {
                None
            };
            agents.push(Agent { model, tokenizer, format: spec.format, chat, opt: adamw(spec), head });
        }
        let n_critics = if with_critics { crate::algos::algorithm(cfg.algo).critics(cfg, num_agents) } else { 0 };
        let mut critics = Vec::new();
        let cspec = cfg.critic_spec();
        for j in 0..n_critics {
            let seed = cfg.seed.wrapping_mul(1000).wrapping_add(500 + j as u64);
            let (model, tok) = match (&shared, cfg.critic.model.is_none() && cspec.model != "tiny") {
                (Some((m, t)), true) => (m.deep_clone()?, t.clone()),
                _ => {
                    let (m, t) = load_model(&cspec, seed)?;
                    (m, Arc::new(t))
                }
            };
            let mut model = model;
            place(&mut model, &cspec, j, cfg.critic_device_key()).with_context(|| format!("critic {j}"))?;
            let head = ValueHead::new(cfg.critic.head, model.cfg.hidden_size, seed ^ 0x5eed, &model.device)?;
            critics.push(Critic { model, tokenizer: tok, head, opt: adamw(&cspec) });
        }
        Ok(Self { agents, critics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_pieces_of_an_im_start_template() {
        let mut tok = Tokenizer::char_level(&["<|endoftext|>", "<|im_end|>", "<|im_start|>"], &tiny_alphabet()).unwrap();
        tok.chat_template = Some("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into());
        tok.stop_ids = vec![0, 1];
        let c = ChatPieces::new(&tok).unwrap();
        assert_eq!(c.after(Some(1), true), "\n", "after <|im_end|>: the rest of the end of turn");
        assert_eq!(c.after_truncation, "<|im_end|>\n");
        assert_eq!(c.before_obs, "<|im_start|>user\n");
        assert_eq!(c.after_obs, "<|im_end|>\n<|im_start|>assistant\n");
        // A response that <|endoftext|> ended still gets the template's end of turn: before, the
        // next history went on with "\n<|im_start|>user" and no <|im_end|>.
        assert_eq!(c.after(Some(0), true), "<|im_end|>\n");
        assert_eq!(c.after(Some(1), false), "<|im_end|>\n", "cut at max_new_tokens");
    }

    #[test]
    fn a_template_that_renders_bos_gets_one_bos() {
        let mut tok = Tokenizer::byte_level(&["<eos>", "<s>"]).unwrap();
        tok.bos = Some((1, "<s>".into()));
        tok.add_bos = true;
        tok.chat_template = Some("{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}".into());
        let (model, _) = load_model(&ModelSpec { model: "tiny".into(), ..Default::default() }, 1).unwrap();
        let p = Agent {
            model,
            tokenizer: Arc::new(tok),
            format: PromptFormat::Chat,
            chat: None,
            opt: adamw(&ModelSpec::default()),
            head: None,
        };
        let text = p.first_text("ab").unwrap();
        assert_eq!(text, "<s>[ab]");
        let ids = p.encode_first(&text).unwrap();
        assert_eq!(ids.iter().filter(|&&t| t == 1).count(), 1, "{ids:?}");
        assert_eq!(ids[0], 1);
    }
}
