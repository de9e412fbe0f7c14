//! Choosing the next token from logits: greedy by default, or temperature / top-k / top-p with a
//! seeded RNG, so every choice is reproducible.

use crate::rng::Rng;

/// How to pick tokens. The default is greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy; otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (1 = no limit).
    pub top_p: f32,
    /// Seed of the sampling RNG.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

/// Why sampling parameters were refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    /// A parameter is out of range.
    #[error("invalid sampling parameter {name} = {value}: {reason}")]
    Invalid {
        /// Parameter name.
        name: &'static str,
        /// Its value.
        value: String,
        /// Allowed range.
        reason: &'static str,
    },
    /// Logits were empty.
    #[error("cannot sample from empty logits")]
    Empty,
}

/// A token picker holding its RNG, so a sequence of picks is deterministic for a seed.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for `params`, rejecting NaN or out-of-range values.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        let invalid = |name, value: f32, reason| SamplingError::Invalid {
            name,
            value: value.to_string(),
            reason,
        };
        if !(params.temperature.is_finite() && params.temperature >= 0.0) {
            return Err(invalid("temperature", params.temperature, "must be finite and ≥ 0"));
        }
        if !(params.top_p > 0.0 && params.top_p <= 1.0) {
            return Err(invalid("top_p", params.top_p, "must be in (0, 1]"));
        }
        Ok(Self { params, rng: Rng::new(params.seed), scratch: Vec::new() })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token id from one position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::Empty);
        }
        if self.params.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        // Candidates by descending logit; ties keep the lower id first, so the order is total.
        let candidates = &mut self.scratch;
        candidates.clear();
        candidates.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            candidates.truncate(self.params.top_k);
        }
        let max = candidates[0].1;
        let inv_t = 1.0 / self.params.temperature;
        let mut total = 0f64;
        for c in candidates.iter_mut() {
            c.1 = ((c.1 - max) * inv_t).exp();
            total += f64::from(c.1);
        }
        if self.params.top_p < 1.0 {
            let mut mass = 0f64;
            let keep = candidates
                .iter()
                .position(|c| {
                    mass += f64::from(c.1) / total;
                    mass >= f64::from(self.params.top_p)
                })
                .map_or(candidates.len(), |i| i + 1);
            candidates.truncate(keep);
            total = candidates.iter().map(|c| f64::from(c.1)).sum();
        }
        let mut target = self.rng.next_f64() * total;
        for c in candidates.iter() {
            target -= f64::from(c.1);
            if target < 0.0 {
                return Ok(c.0);
            }
        }
        // Rounding can leave a sliver of mass past the last candidate.
        Ok(candidates[candidates.len() - 1].0)
    }
}

/// Index of the largest logit; the lowest index wins ties, NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect()
    }

    fn draws(params: SamplingParams, n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params).unwrap();
        (0..n).map(|_| s.sample(&logits()).unwrap()).collect()
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5]), 1);
        let picks = draws(SamplingParams::default(), 5);
        assert!(picks.iter().all(|&p| p == argmax(&logits())));
    }

    #[test]
    fn seeded_sampling_is_deterministic() {
        let p = SamplingParams { temperature: 1.0, seed: 42, ..Default::default() };
        assert_eq!(draws(p, 100), draws(p, 100));
        assert_ne!(draws(p, 100), draws(SamplingParams { seed: 43, ..p }, 100));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let l = logits();
        let mut order: Vec<u32> = (0..l.len() as u32).collect();
        order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        let top3 = &order[..3];
        let k = SamplingParams { temperature: 2.0, top_k: 3, seed: 1, ..Default::default() };
        assert!(draws(k, 300).iter().all(|t| top3.contains(t)));
        // A tiny p keeps only the single most likely token.
        let p = SamplingParams { temperature: 1.0, top_p: 1e-6, seed: 1, ..Default::default() };
        assert!(draws(p, 50).iter().all(|&t| t == order[0]));
    }

    #[test]
    fn rejects_bad_params() {
        for bad in [
            SamplingParams { temperature: -1.0, ..Default::default() },
            SamplingParams { temperature: f32::NAN, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
        ] {
            assert!(Sampler::new(bad).is_err());
        }
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[]), Err(SamplingError::Empty));
    }
}
