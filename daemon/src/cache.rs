//! The prefix cache: several cached sequences (tokens + KV), so that a request evaluates only the
//! tokens after its longest common prefix with one of them. Least-recently-used sequences are
//! evicted to stay under a memory budget; the cache never grows without bound.

use m31r_model::{KvCache, Model, ModelError};

/// One cached sequence. Invariant: `kv.len() == tokens.len()`: the KV holds exactly `tokens`.
#[derive(Debug)]
pub struct Sequence {
    tokens: Vec<u32>,
    kv: KvCache,
    last_used: u64,
}

impl Sequence {
    /// The tokens whose keys and values are cached.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Rolls back to the first `n` tokens.
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
        self.kv.truncate(n);
    }

    /// Evaluates `ids` after the cached tokens and caches them; returns the logits of the last
    /// one, `(1, 1, vocab)`.
    /// On error the sequence is rolled back, so the invariant survives failures.
    pub fn extend(
        &mut self,
        model: &Model,
        ids: &[u32],
    ) -> Result<candle_core::Tensor, ModelError> {
        let before = self.tokens.len();
        let input = candle_core::Tensor::new(ids, model.device())?.unsqueeze(0)?;
        match model.forward_last(&input, &mut self.kv) {
            Ok(logits) => {
                self.tokens.extend_from_slice(ids);
                Ok(logits)
            }
            Err(e) => {
                self.kv.truncate(before);
                Err(e)
            }
        }
    }
}

impl Sequence {
    /// Starts a greedy decode run from `first`, the token after the cached ones
    /// ([`Model::decode`]); `None` where the model decodes one step at a time. The sequence must
    /// be left alone until the run is handed to [`Sequence::finish_decode`].
    pub fn decode(
        &mut self,
        model: &Model,
        first: u32,
        steps: usize,
        pick: std::sync::Arc<dyn m31r_model::Pick>,
    ) -> Result<Option<m31r_model::Decode>, ModelError> {
        model.decode(first, &mut self.kv, steps, pick)
    }

    /// Ends `run`, caching the inputs of the steps whose picks were taken; returns those tokens.
    /// On error nothing is cached, so the invariant survives failures.
    pub fn finish_decode(&mut self, run: m31r_model::Decode) -> Result<Vec<u32>, ModelError> {
        let tokens = run.finish(&mut self.kv)?;
        self.tokens.extend_from_slice(&tokens);
        Ok(tokens)
    }
}

/// Counters describing the cache, for `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Cached sequences.
    pub entries: usize,
    /// Tokens over all sequences.
    pub tokens: usize,
    /// Bytes allocated for keys and values.
    pub bytes: usize,
}

/// Several cached sequences under a byte budget.
#[derive(Debug)]
pub struct PrefixCache {
    sequences: Vec<Sequence>,
    budget_bytes: usize,
    max_entries: usize,
    clock: u64,
}

/// Reuse an existing sequence only if the prompt shares at least this share of its tokens;
/// otherwise the prompt is probably another document and gets a sequence of its own.
const MIN_SHARED_FRACTION: f64 = 0.5;

impl PrefixCache {
    /// An empty cache holding at most `max_entries` sequences and about `budget_bytes` of KV.
    pub fn new(budget_bytes: usize, max_entries: usize) -> Self {
        Self { sequences: Vec::new(), budget_bytes, max_entries: max_entries.max(1), clock: 0 }
    }

    /// Picks the sequence for `prompt` and rolls it back to the reusable prefix; returns its index
    /// and the number of prompt tokens already cached. At least the last prompt token is always left
    /// to evaluate, because its logits are needed to generate.
    pub fn acquire(
        &mut self,
        model: &Model,
        prompt: &[u32],
        capacity_hint: usize,
    ) -> Result<(usize, usize), ModelError> {
        self.clock += 1;
        let best = self
            .sequences
            .iter()
            .enumerate()
            .map(|(i, s)| (i, common_prefix(&s.tokens, prompt), s.last_used))
            .max_by_key(|&(_, shared, used)| (shared, used));
        let reusable = |seq: &Sequence, shared: usize| {
            shared > 0
                && (shared == seq.tokens.len()
                    || shared as f64 >= MIN_SHARED_FRACTION * seq.tokens.len() as f64)
        };
        let index = match best {
            Some((i, shared, _)) if reusable(&self.sequences[i], shared) => i,
            _ if self.sequences.len() < self.max_entries => {
                let kv = model.new_cache(capacity_hint)?;
                self.sequences.push(Sequence { tokens: Vec::new(), kv, last_used: 0 });
                self.sequences.len() - 1
            }
            _ => self.lru_index(None).unwrap_or(0),
        };
        let seq = &mut self.sequences[index];
        seq.last_used = self.clock;
        let shared = common_prefix(&seq.tokens, prompt).min(prompt.len().saturating_sub(1));
        seq.truncate(shared);
        Ok((index, shared))
    }

    /// The sequence at `index` (from [`PrefixCache::acquire`]).
    pub fn get_mut(&mut self, index: usize) -> &mut Sequence {
        &mut self.sequences[index]
    }

    /// Evicts least-recently-used sequences (never `keep`) until the budget holds; returns the
    /// index `keep` has afterwards.
    pub fn enforce_budget(&mut self, mut keep: usize) -> usize {
        while self.stats().bytes > self.budget_bytes {
            let Some(victim) = self.lru_index(Some(keep)) else { break };
            self.sequences.swap_remove(victim);
            if keep == self.sequences.len() {
                keep = victim; // swap_remove moved the last sequence into the hole
            }
        }
        keep
    }

    /// Drops every sequence (after a failure left their state in doubt).
    pub fn clear(&mut self) {
        self.sequences.clear();
    }

    /// Current size.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.sequences.len(),
            tokens: self.sequences.iter().map(|s| s.tokens.len()).sum(),
            bytes: self.sequences.iter().map(|s| s.kv.allocated_bytes()).sum(),
        }
    }

    fn lru_index(&self, except: Option<usize>) -> Option<usize> {
        self.sequences
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != except)
            .min_by_key(|(_, s)| s.last_used)
            .map(|(i, _)| i)
    }
}

/// Length of the longest common prefix of two token sequences.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
