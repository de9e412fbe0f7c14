//! The greedy pick of the daemon as a decode run's [`Pick`]: recall's mixture, then the best
//! token, computed from the run's tokens alone so that any thread of the kernels' pool can make
//! it (and making it twice gives the same token). It is the engine's own pick for a greedy
//! request without token healing, so a run decodes exactly what one step at a time would.

use std::sync::{Mutex, TryLockError};

use m31r_model::Pick;
use m31r_model::recall::Recall;
use m31r_model::sampling::argmax;
use m31r_model::tokenizer::SpecialIds;

/// Recall as it stood when the run started, and the tokens that end a completion.
pub(crate) struct GreedyPick {
    /// `None` when recall is off (nothing to mix in).
    recall: Option<Recalls>,
    special: SpecialIds,
}

/// Recall at the run's start, and a copy that each pick extends with the run's tokens and then
/// rolls back, so that a pick does not copy the whole sequence.
struct Recalls {
    base: Recall,
    scratch: Mutex<Recall>,
}

impl GreedyPick {
    /// The pick after the tokens `recall` has seen; `special` ends the completion.
    pub(crate) fn new(recall: &Recall, special: SpecialIds) -> Self {
        let recall = recall
            .params()
            .is_on()
            .then(|| Recalls { base: recall.clone(), scratch: Mutex::new(recall.clone()) });
        Self { recall, special }
    }
}

impl Pick for GreedyPick {
    fn pick(&self, inputs: &[u32], logits: &mut [f32]) -> u32 {
        if let Some(Recalls { base, scratch }) = &self.recall {
            let mut mix = |recall: &mut Recall| {
                recall.truncate(base.len());
                for &id in inputs {
                    recall.push_generated(id);
                }
                recall.mix_into(logits);
            };
            match scratch.try_lock() {
                Ok(mut recall) => mix(&mut recall),
                // A thread redoing a pick whose first maker holds the scratch (or panicked
                // with it) works on its own copy rather than wait.
                Err(TryLockError::WouldBlock | TryLockError::Poisoned(_)) => mix(&mut base.clone()),
            }
        }
        argmax(logits)
    }

    fn stops(&self, token: u32) -> bool {
        self.special.contains(token)
    }
}

/// Whether greedy requests decode in runs (the default). `M31R_DECODE_RUNS=0` in the
/// environment makes the engine decode one step at a time instead, which gives the same tokens:
/// for side-by-side measurements of the two.
pub(crate) fn runs_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        !std::env::var("M31R_DECODE_RUNS")
            .is_ok_and(|v| v == "0" || v.eq_ignore_ascii_case("false"))
    })
}
