//! A count, per model, of the arithmetic its passes do, so benchmarks can give a phase's FLOP
//! rate as a fraction of the machine's GEMM peak (`collm bench peak`). Each model keeps its own
//! count (`Transformer::flops`): concurrent models, or tests, do not mix.
//!
//! Counted per real token (padding is work, not progress, so it is left out), from the weights
//! the pass multiplies: 2 FLOPs per weight forward; with a graph (a training pass) 4 more for a
//! trainable weight (its input's and its own gradient) and 2 more for a frozen one (its input's
//! only). Attention adds 4·heads·head_dim FLOPs per query for every key it sees (QKᵀ and PV),
//! three times that with a graph. Norms, activations and the embedding lookup are left out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// FLOPs counted so far; clones share the count.
#[derive(Clone, Default, Debug)]
pub struct FlopCounter(Arc<AtomicU64>);

impl FlopCounter {
    /// Adds `n` FLOPs to the count.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The FLOPs counted since the counter was made (take differences around a phase).
    pub fn total(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Bytes counted so far (a model's weight reads): the same shared count.
pub type ByteCounter = FlopCounter;

/// The FLOPs of a linear map with `weights` weights over `tokens` real tokens: forward, plus
/// the backward's when `grad` (the weight's own gradient only when `trainable`).
pub fn linear(weights: u64, tokens: u64, grad: bool, trainable: bool) -> u64 {
    let per = 2 + if grad { 2 + if trainable { 2 } else { 0 } } else { 0 };
    per * weights * tokens
}

/// The FLOPs of attention where the queries see `keys_seen` keys in all (summed over queries),
/// with `heads` query heads of `head_dim`, forward and, when `grad`, backward.
pub fn attention(keys_seen: u64, heads: u64, head_dim: u64, grad: bool) -> u64 {
    4 * heads * head_dim * keys_seen * if grad { 3 } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-worked: a 10×20 weight over 3 tokens is 1200 FLOPs forward, 2400 more in a training
    /// pass when trainable and 1200 more when frozen; 2 heads of 4 seeing 6 keys in all are 192.
    #[test]
    fn counts_match_hand_worked_numbers() {
        assert_eq!(linear(200, 3, false, true), 1200);
        assert_eq!(linear(200, 3, true, true), 3600);
        assert_eq!(linear(200, 3, true, false), 2400);
        assert_eq!(attention(6, 2, 4, false), 192);
        assert_eq!(attention(6, 2, 4, true), 576);
        let c = FlopCounter::default();
        c.clone().add(5);
        c.add(7);
        assert_eq!(c.total(), 12);
    }
}
