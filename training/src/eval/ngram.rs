//! The n-gram baseline of `eval`: a token-level n-gram model with backoff, trained on the start of
//! the train split's token stream, that predicts greedily (the most frequent continuation of the
//! longest context seen in training).
//!
//! Greedy decoding only needs the argmax continuation of each context, so each order keeps one
//! `(context hash, best next token)` table sorted by hash, built by sorting `(hash, next)` pairs
//! rather than with nested hash maps: a few million training tokens then cost tens of MB, not GBs.
//! Hashes are 64-bit, so a collision among a few million contexts is practically impossible.

use super::EvalError;
use super::fim::Predictor;

/// A greedy n-gram predictor with backoff to shorter contexts, then to the most frequent token.
#[derive(Debug, Clone)]
pub struct NgramModel {
    order: usize,
    /// `tables[c - 1]`: contexts of `c` tokens → most frequent next token, sorted by hash.
    tables: Vec<Vec<(u64, u32)>>,
    unigram: u32,
    train_tokens: u64,
}

impl NgramModel {
    /// Counts the n-grams of `tokens` up to `order` (2 = bigram, 4 = three tokens of context);
    /// `order` is clamped to at least 1.
    pub fn train(tokens: &[u32], order: usize) -> Self {
        let order = order.max(1);
        let tables = (1..order).map(|c| best_continuations(tokens, c)).collect();
        let unigram = best_continuations(tokens, 0).first().map_or(0, |e| e.1);
        Self { order, tables, unigram, train_tokens: tokens.len() as u64 }
    }

    /// The n-gram order.
    pub fn order(&self) -> usize {
        self.order
    }

    /// Tokens it was trained on.
    pub fn train_tokens(&self) -> u64 {
        self.train_tokens
    }

    /// Distinct contexts stored per context length (1, 2, ... tokens).
    pub fn contexts(&self) -> Vec<u64> {
        self.tables.iter().map(|t| t.len() as u64).collect()
    }

    /// The greedy next token after `context`: the best continuation of its longest suffix seen in
    /// training.
    pub fn predict(&self, context: &[u32]) -> u32 {
        for c in (1..self.order).rev() {
            if context.len() < c {
                continue;
            }
            let key = hash(&context[context.len() - c..]);
            let table = &self.tables[c - 1];
            if let Ok(i) = table.binary_search_by_key(&key, |e| e.0) {
                return table[i].1;
            }
        }
        self.unigram
    }
}

/// [`NgramModel`] as a [`Predictor`]: the context is the prompt plus what was generated.
#[derive(Debug)]
pub struct NgramPredictor<'a> {
    model: &'a NgramModel,
    context: Vec<u32>,
}

impl<'a> NgramPredictor<'a> {
    /// A predictor over `model`.
    pub fn new(model: &'a NgramModel) -> Self {
        Self { model, context: Vec::new() }
    }
}

impl Predictor for NgramPredictor<'_> {
    type Error = EvalError;

    fn start(&mut self, prompt: &[u32]) -> Result<u32, EvalError> {
        self.context.clear();
        self.context.extend_from_slice(prompt);
        Ok(self.model.predict(&self.context))
    }

    fn push(&mut self, token: u32) -> Result<u32, EvalError> {
        self.context.push(token);
        Ok(self.model.predict(&self.context))
    }
}

/// For every context of `c` tokens in `tokens`, its most frequent next token (ties: lowest id),
/// sorted by context hash. With `c = 0` the one entry is the most frequent token.
fn best_continuations(tokens: &[u32], c: usize) -> Vec<(u64, u32)> {
    if tokens.len() <= c {
        return Vec::new();
    }
    let mut pairs: Vec<(u64, u32)> =
        (c..tokens.len()).map(|i| (hash(&tokens[i - c..i]), tokens[i])).collect();
    pairs.sort_unstable();
    let mut table = Vec::new();
    let mut i = 0;
    while i < pairs.len() {
        let key = pairs[i].0;
        let (mut best, mut best_count) = (pairs[i].1, 0usize);
        while i < pairs.len() && pairs[i].0 == key {
            let next = pairs[i].1;
            let run = pairs[i..].iter().take_while(|p| *p == &(key, next)).count();
            // Runs come in ascending id order, so `>` keeps the lowest id on ties.
            if run > best_count {
                (best, best_count) = (next, run);
            }
            i += run;
        }
        table.push((key, best));
    }
    table
}

/// FNV-1a over the ids' bytes, finished with a splitmix64 mix so nearby contexts spread out.
fn hash(ids: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &id in ids {
        for b in id.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicts_the_most_frequent_continuation_and_backs_off() {
        // 1 2 3 is followed by 4 twice and 5 once; 9 was never seen as a context.
        let tokens = [1, 2, 3, 4, 7, 1, 2, 3, 5, 7, 1, 2, 3, 4, 7, 7];
        let m = NgramModel::train(&tokens, 4);
        assert_eq!(m.predict(&[1, 2, 3]), 4);
        assert_eq!(m.predict(&[8, 2, 3]), 4, "backs off to the 2-token context");
        assert_eq!(m.predict(&[3, 5]), 7);
        assert_eq!(m.predict(&[9]), 7, "unseen: the most frequent token");
        assert_eq!(m.predict(&[]), 7);
        assert_eq!(m.contexts().len(), 3);
        // Ties go to the lowest id.
        let tie = NgramModel::train(&[1, 6, 1, 5], 2);
        assert_eq!(tie.predict(&[1]), 5);
    }
}
