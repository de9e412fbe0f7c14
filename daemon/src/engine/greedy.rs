//! The greedy pick of the daemon as a decode run's [`Pick`]: recall's mixture, then the best
//! token, computed from the run's tokens alone so that any thread of the kernels' pool can make
//! it (and making it twice gives the same token). It is the engine's own pick for a greedy
//! request without token healing, so a run decodes exactly what one step at a time would.

use m31r_model::Pick;
use m31r_model::recall::Recall;
use m31r_model::sampling::argmax;
use m31r_model::tokenizer::SpecialIds;

/// Recall as it stood when the run started, and the tokens that end a completion.
pub(crate) struct GreedyPick {
    /// `None` when recall is off (nothing to mix in).
    recall: Option<Recall>,
    special: SpecialIds,
}

impl GreedyPick {
    /// The pick after the tokens `recall` has seen; `special` ends the completion.
    pub(crate) fn new(recall: &Recall, special: SpecialIds) -> Self {
        Self { recall: recall.params().is_on().then(|| recall.clone()), special }
    }
}

impl Pick for GreedyPick {
    fn pick(&self, inputs: &[u32], logits: &mut [f32]) -> u32 {
        if let Some(recall) = &self.recall {
            let mut recall = recall.clone();
            for &id in inputs {
                recall.push_generated(id);
            }
            recall.mix_into(logits);
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
