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
    /// A constrained pick allowed no token.
    #[error("the constraint allows none of the tokens")]
    NoneAllowed,
}

/// A token picker holding its RNG, so a sequence of picks is deterministic for a seed.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    scratch: Vec<(u32, f64)>,
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
        candidates.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, f64::from(l))));
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            candidates.truncate(self.params.top_k);
        }
        let max = candidates[0].1;
        if !max.is_finite() {
            // An infinite or NaN top logit has no meaningful softmax; its argmax is the answer.
            return Ok(argmax(logits));
        }
        // In f64 with the top logit subtracted first, the top weight is exp(0) = 1 for every
        // accepted temperature: even the smallest f32 temperature only sends the others to
        // exp(-huge) = 0 (greedy), where 1/temperature in f32 overflowed to infinity and made
        // the top weight 0 × inf = NaN.
        let temperature = f64::from(self.params.temperature);
        let mut total = 0f64;
        for c in candidates.iter_mut() {
            let weight = ((c.1 - max) / temperature).exp();
            // A NaN logit gets no mass.
            c.1 = if weight.is_nan() { 0.0 } else { weight };
            total += c.1;
        }
        if self.params.top_p < 1.0 {
            let mut mass = 0f64;
            let keep = candidates
                .iter()
                .position(|c| {
                    mass += c.1 / total;
                    mass >= f64::from(self.params.top_p)
                })
                .map_or(candidates.len(), |i| i + 1);
            candidates.truncate(keep);
            total = candidates.iter().map(|c| c.1).sum();
        }
        let mut target = self.rng.next_f64() * total;
        for c in candidates.iter() {
            target -= c.1;
            if target < 0.0 {
                return Ok(c.0);
            }
        }
        // Rounding can leave a sliver of mass past the last candidate.
        Ok(candidates[candidates.len() - 1].0)
    }

    /// Picks a token id as [`Sampler::sample`] does, but only among the ids `allowed` accepts
    /// (a constrained pick: greedy takes the best allowed token). Errors when no id is allowed.
    pub fn sample_allowed(
        &mut self,
        logits: &[f32],
        allowed: impl Fn(u32) -> bool,
    ) -> Result<u32, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::Empty);
        }
        let mut first_allowed = None;
        let masked: Vec<f32> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                if allowed(i as u32) {
                    first_allowed.get_or_insert(i as u32);
                    l
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let first_allowed = first_allowed.ok_or(SamplingError::NoneAllowed)?;
        let pick = self.sample(&masked)?;
        // Allowed logits that are all -inf or NaN tie with the masked ones; the pick must still
        // obey the constraint.
        Ok(if allowed(pick) { pick } else { first_allowed })
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
    fn tiny_temperatures_are_greedy() {
        let mut l = logits();
        l[17] = 3.5;
        let extreme = [f32::MAX, 0.0, -f32::MAX, f32::NEG_INFINITY, 1e30];
        for temperature in [1e-40, 1e-30, f32::MIN_POSITIVE, f32::MIN_POSITIVE / 8.0] {
            for seed in 0..200 {
                let params = SamplingParams { temperature, seed, ..Default::default() };
                let mut s = Sampler::new(params).unwrap();
                assert_eq!(s.sample(&l).unwrap(), 17, "temperature {temperature:e}, seed {seed}");
                assert_eq!(s.sample(&extreme).unwrap(), 0, "temperature {temperature:e}");
                let top_p = SamplingParams { top_p: 0.5, ..params };
                assert_eq!(Sampler::new(top_p).unwrap().sample(&l).unwrap(), 17);
            }
        }
    }

    #[test]
    fn high_temperatures_keep_a_dominant_token() {
        // At temperature 10 a lead of 1000 is still a factor exp(100): a NaN weight would let
        // the pick fall through to the last candidate instead.
        let mut l = vec![0.0f32; 50];
        l[3] = 1000.0;
        l[49] = -1000.0;
        for seed in 0..200 {
            let params = SamplingParams { temperature: 10.0, seed, ..Default::default() };
            assert_eq!(Sampler::new(params).unwrap().sample(&l).unwrap(), 3, "seed {seed}");
        }
        let spread =
            draws(SamplingParams { temperature: 10.0, seed: 7, ..Default::default() }, 300);
        assert!(spread.iter().all(|&t| (t as usize) < logits().len()));
        assert!(spread.iter().collect::<std::collections::HashSet<_>>().len() > 10);
    }

    #[test]
    fn infinite_or_nan_logits_do_not_poison_the_pick() {
        let params = SamplingParams { temperature: 1.0, seed: 3, ..Default::default() };
        let mut s = Sampler::new(params).unwrap();
        assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0]).unwrap(), 1);
        assert_eq!(s.sample(&[f32::NAN, 0.0, 1e3]).unwrap(), 2);
        assert_eq!(s.sample(&[0.0, 1e3, -f32::NAN]).unwrap(), 1);
    }

    #[test]
    fn a_constrained_pick_takes_only_allowed_tokens() {
        let l = logits();
        let best = argmax(&l);
        let mut greedy = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(greedy.sample_allowed(&l, |_| true).unwrap(), best);
        // Greedy: the best of the allowed ones.
        let odd = |id: u32| id % 2 == 1 && id != best;
        let best_odd = (0..l.len() as u32)
            .filter(|&i| odd(i))
            .fold(1, |b, i| if l[i as usize] > l[b as usize] { i } else { b });
        assert_eq!(greedy.sample_allowed(&l, odd).unwrap(), best_odd);
        assert_eq!(greedy.sample_allowed(&[f32::NEG_INFINITY, 1.0], |i| i == 0).unwrap(), 0);
        assert_eq!(greedy.sample_allowed(&l, |_| false), Err(SamplingError::NoneAllowed));
        let params = SamplingParams { temperature: 2.0, top_k: 2, seed: 5, ..Default::default() };
        let mut s = Sampler::new(params).unwrap();
        for _ in 0..200 {
            assert!(odd(s.sample_allowed(&l, odd).unwrap()));
        }
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
