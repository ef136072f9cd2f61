//! Continuous batching for serving: one thread owns a model and decodes every active request's
//! rows together, one token per row per step; a request that arrives joins the running batch at
//! the next step (its prompt is prefilled alone, then its cache rows are merged into the batch's),
//! and a row leaves the batch as soon as it stops. Each row samples with its own random stream
//! (the request's seed and the choice's index), so what it generates does not depend on what it
//! is batched with.

use crate::generate::{prefill, row_rngs, sample_row, SamplingParams};
use crate::model::{KvCache, Transformer};
use crate::ops::with_f32;
use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::rngs::StdRng;
use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

/// What a job's sink hears of its rows (`choice` is the row's index among the job's `n`).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A generated token and its log-prob under the model's raw distribution.
    Token { choice: usize, token: u32, logprob: f32 },
    /// The row ended: `stopped` when a stop token ended it (that token was the last `Token`),
    /// else it reached `max_new_tokens`.
    Done { choice: usize, stopped: bool },
    /// The model failed; the job's rows are dropped.
    Error(String),
}

/// Receives a job's events; returns false when the row (or the whole job, for `Error`) is no
/// longer wanted (a client that went away, or a stop string), and the engine drops the row.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// A generation request: `n` rows sampled from one prompt.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub n: usize,
    pub seed: u64,
    pub stop_ids: Vec<u32>,
    pub sink: Sink,
}

/// How many rows each decode step ran (a histogram), so batching can be seen.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BatchStats {
    /// Decode steps by batch size.
    pub steps_by_batch: BTreeMap<usize, u64>,
    pub jobs: u64,
    pub tokens: u64,
    pub max_batch: usize,
}

/// A running engine: submit jobs; it stops when the last handle is dropped.
#[derive(Clone)]
pub struct Batcher {
    tx: Sender<Job>,
    stats: Arc<Mutex<BatchStats>>,
}

struct Row {
    job: usize,
    choice: usize,
    rng: StdRng,
    last: u32,
    generated: usize,
}

struct Active {
    params: SamplingParams,
    stop_ids: Vec<u32>,
    sink: Sink,
    rows_left: usize,
}

impl Batcher {
    /// Starts the engine thread for `model` (`pad`: the padding token), at most `max_batch` rows
    /// per decode step; later requests wait for room.
    pub fn start(model: Arc<Transformer>, pad: u32, max_batch: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let stats = Arc::new(Mutex::new(BatchStats::default()));
        let s = stats.clone();
        std::thread::spawn(move || engine(&model, pad, max_batch.max(1), rx, &s));
        Self { tx, stats }
    }

    pub fn submit(&self, job: Job) -> Result<()> {
        if job.prompt.is_empty() || job.n == 0 || job.params.max_new_tokens == 0 {
            bail!("a job needs a prompt, at least one row and at least one new token");
        }
        self.tx.send(job).map_err(|_| anyhow::anyhow!("the model's engine has stopped"))
    }

    pub fn stats(&self) -> BatchStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl KvCache {
    /// The rows of several caches in one, each left-padded with invalid slots to the longest.
    pub fn concat(parts: &[KvCache]) -> Result<KvCache> {
        let slots = parts.iter().map(|c| c.slots()).max().unwrap_or(0);
        let layers = parts.first().map_or(0, |c| c.layers.len());
        let mut out = KvCache::new(0, layers);
        for l in 0..layers {
            let mut ks = vec![];
            let mut vs = vec![];
            for c in parts {
                let Some((k, v)) = &c.layers[l] else { bail!("concat: a cache without layer {l}") };
                let pad = slots - c.slots();
                if pad == 0 {
                    ks.push(k.clone());
                    vs.push(v.clone());
                } else {
                    let (b, h, _, d) = k.dims4()?;
                    let z = Tensor::zeros((b, h, pad, d), k.dtype(), k.device())?;
                    ks.push(Tensor::cat(&[&z, k], 2)?);
                    vs.push(Tensor::cat(&[&z, v], 2)?);
                }
            }
            out.layers[l] = Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?));
        }
        for c in parts {
            for (valid, &pos) in c.valid.iter().zip(&c.next_pos) {
                let mut v = vec![false; slots - valid.len()];
                v.extend_from_slice(valid);
                out.valid.push(v);
                out.next_pos.push(pos);
            }
        }
        Ok(out)
    }
}

fn engine(model: &Transformer, pad: u32, max_batch: usize, rx: Receiver<Job>, stats: &Mutex<BatchStats>) {
    let mut jobs: BTreeMap<usize, Active> = BTreeMap::new();
    let mut rows: Vec<Row> = vec![];
    let mut cache: Option<KvCache> = None;
    let mut next_id = 0usize;
    // A job that did not fit in the batch yet.
    let mut waiting: Option<Job> = None;
    loop {
        // Admit waiting jobs while their rows fit (block when idle; a job larger than the whole
        // batch runs alone).
        let mut admitted: Vec<Job> = vec![];
        let mut room = max_batch.saturating_sub(rows.len());
        loop {
            let job = match waiting.take() {
                Some(j) => j,
                None if rows.is_empty() && admitted.is_empty() => match rx.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                },
                None => match rx.try_recv() {
                    Ok(j) => j,
                    Err(_) => break,
                },
            };
            if job.n <= room || (rows.is_empty() && admitted.is_empty()) {
                room = room.saturating_sub(job.n);
                admitted.push(job);
            } else {
                waiting = Some(job);
                break;
            }
        }
        for job in admitted {
            let id = next_id;
            next_id += 1;
            stats.lock().unwrap_or_else(|e| e.into_inner()).jobs += 1;
            if let Err(e) = crate::on_pool(|| admit(model, pad, id, job, &mut jobs, &mut rows, &mut cache)) {
                if let Some(mut a) = jobs.remove(&id) {
                    (a.sink)(Event::Error(format!("{e:#}")));
                }
                rows.retain(|r| r.job != id);
            }
        }
        if rows.is_empty() {
            cache = None;
            continue;
        }
        // Each prefill and decode step runs on a pool thread (`on_pool`), which takes its share
        // of every product, instead of this thread handing each op to the pool and sleeping.
        if let Err(e) = crate::on_pool(|| step(model, &mut jobs, &mut rows, &mut cache, stats)) {
            for (_, mut a) in std::mem::take(&mut jobs) {
                (a.sink)(Event::Error(format!("{e:#}")));
            }
            rows.clear();
            cache = None;
        }
    }
}

/// Emits a row's token; returns whether the row goes on.
fn emit(a: &mut Active, row: &mut Row, token: u32, logprob: f32) -> bool {
    row.generated += 1;
    row.last = token;
    if !(a.sink)(Event::Token { choice: row.choice, token, logprob }) {
        return false;
    }
    let stopped = a.stop_ids.contains(&token);
    if stopped || row.generated >= a.params.max_new_tokens {
        (a.sink)(Event::Done { choice: row.choice, stopped });
        return false;
    }
    true
}

fn admit(
    model: &Transformer,
    pad: u32,
    id: usize,
    job: Job,
    jobs: &mut BTreeMap<usize, Active>,
    rows: &mut Vec<Row>,
    cache: &mut Option<KvCache>,
) -> Result<()> {
    let Job { prompt, params, n, seed, stop_ids, sink } = job;
    jobs.insert(id, Active { params, stop_ids, sink, rows_left: n });
    let (c, logits) = prefill(model, &[prompt], pad)?;
    let first = with_f32(&logits, |l| l.to_vec())?;
    let a = jobs.get_mut(&id).expect("just inserted");
    let mut keep = vec![];
    for (choice, rng) in row_rngs(seed, n).into_iter().enumerate() {
        let mut row = Row { job: id, choice, rng, last: 0, generated: 0 };
        let (tok, lp) = sample_row(&first, &a.params, &mut row.rng);
        if emit(a, &mut row, tok, lp) {
            rows.push(row);
            keep.push(0);
        } else {
            a.rows_left -= 1;
        }
    }
    if a.rows_left == 0 {
        jobs.remove(&id);
    }
    if !keep.is_empty() {
        let mine = c.select_rows(&keep)?;
        *cache = Some(match cache.take() {
            Some(old) => KvCache::concat(&[old, mine])?,
            None => mine,
        });
    }
    Ok(())
}

fn step(
    model: &Transformer,
    jobs: &mut BTreeMap<usize, Active>,
    rows: &mut Vec<Row>,
    cache: &mut Option<KvCache>,
    stats: &Mutex<BatchStats>,
) -> Result<()> {
    let Some(c) = cache.as_mut() else { bail!("rows without a cache") };
    let tokens: Vec<Vec<u32>> = rows.iter().map(|r| vec![r.last]).collect();
    let valid = vec![vec![true]; rows.len()];
    let h = model.forward(&tokens, &valid, c, false)?;
    let logits = model.logits(&h.squeeze(1)?, false)?;
    {
        let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
        *s.steps_by_batch.entry(rows.len()).or_default() += 1;
        s.tokens += rows.len() as u64;
        s.max_batch = s.max_batch.max(rows.len());
    }
    let vocab = model.cfg.vocab_size;
    let mut keep = vec![];
    with_f32(&logits, |l| {
        for (i, row) in rows.iter_mut().enumerate() {
            let Some(a) = jobs.get_mut(&row.job) else { continue };
            let (tok, lp) = sample_row(&l[i * vocab..(i + 1) * vocab], &a.params, &mut row.rng);
            if emit(a, row, tok, lp) {
                keep.push(i);
            } else {
                a.rows_left -= 1;
                if a.rows_left == 0 {
                    jobs.remove(&row.job);
                }
            }
        }
    })?;
    if keep.len() < rows.len() {
        let mut i = 0;
        rows.retain(|_| {
            let k = keep.contains(&i);
            i += 1;
            k
        });
        *cache = if keep.is_empty() { None } else { Some(c.select_rows(&keep)?) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    fn tiny() -> Arc<Transformer> {
        let cfg = ModelConfig::tiny(crate::config::Arch::Llama, 64);
        Arc::new(Transformer::random(cfg, 7).unwrap())
    }

    fn collect(b: &Batcher, prompt: Vec<u32>, params: SamplingParams, n: usize, seed: u64) -> std::sync::mpsc::Receiver<Event> {
        let (tx, rx) = std::sync::mpsc::channel();
        let sink: Sink = Box::new(move |e| tx.send(e).is_ok());
        b.submit(Job { prompt, params, n, seed, stop_ids: vec![0], sink }).unwrap();
        rx
    }

    fn tokens(rx: &std::sync::mpsc::Receiver<Event>, n: usize) -> Vec<Vec<u32>> {
        let mut out = vec![vec![]; n];
        let mut done = 0;
        while done < n {
            match rx.recv().unwrap() {
                Event::Token { choice, token, .. } => out[choice].push(token),
                Event::Done { .. } => done += 1,
                Event::Error(e) => panic!("{e}"),
            }
        }
        out
    }

    /// Rows batched with other requests (joining mid-way, of other lengths) generate what they
    /// generate alone, and the steps ran with more than one row.
    #[test]
    fn a_request_generates_the_same_alone_and_batched() {
        let model = tiny();
        let params = SamplingParams { max_new_tokens: 12, temperature: 0.9, top_p: 0.95, ..Default::default() };
        let prompts: Vec<Vec<u32>> = (0..6).map(|i| (1..4 + 3 * i as u32).map(|t| 1 + (t * 7 + i as u32) % 60).collect()).collect();
        let alone: Vec<Vec<Vec<u32>>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let b = Batcher::start(model.clone(), 0, 8);
                tokens(&collect(&b, p.clone(), params.clone(), 2, i as u64), 2)
            })
            .collect();
        let b = Batcher::start(model.clone(), 0, 8);
        let rxs: Vec<_> = prompts.iter().enumerate().map(|(i, p)| collect(&b, p.clone(), params.clone(), 2, i as u64)).collect();
        for (i, rx) in rxs.iter().enumerate() {
            assert_eq!(tokens(rx, 2), alone[i], "request {i}");
        }
        let s = b.stats();
        assert!(s.max_batch > 2 && s.max_batch <= 8, "{s:?}");
        assert_eq!(s.jobs, 6);
        // The batch's generate() equivalent: a lone request equals generate() with the same seed.
        let g = crate::generate::generate(&model, &[prompts[0].clone()], &params, &[0], 0, 0).unwrap();
        assert_eq!(alone[0][0], g[0].tokens);
    }
}
