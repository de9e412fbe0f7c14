//! The model's side of `eval`: its code length on test documents (for bits per byte) and a greedy
//! predictor over the inference forward with a KV cache (for the completion benchmark), the same
//! forward and cache the daemon decodes with.

use candle_core::{D, DType, IndexOp, Tensor};
use m31r_model::transformer::{KvCache, Model};

use super::EvalError;
use super::fim::Predictor;

/// Tokens per forward call: bounds the logits held at once (`chunk × vocab` floats).
const CHUNK: usize = 256;

/// Total negative log-likelihood, in nats, of `doc` after a leading `eot` (how documents follow
/// one another in the training stream). Documents longer than the context are scored in windows
/// that overlap by a quarter of the context, so every token after the first window is predicted
/// from at least that much text.
pub fn document_nats(
    model: &Model,
    cache: &mut KvCache,
    eot: u32,
    doc: &[u32],
) -> Result<f64, EvalError> {
    let seq: Vec<u32> = std::iter::once(eot).chain(doc.iter().copied()).collect();
    let context = model.config().context_length().max(2);
    let overlap = context / 4;
    let mut nats = 0.0;
    // Positions below `scored` already have their token's loss counted.
    let mut scored = 1;
    let mut start = 0;
    while scored < seq.len() {
        let end = (start + context).min(seq.len());
        cache.clear();
        let mut pos = start;
        for chunk in seq[start..end].chunks(CHUNK) {
            let ids = Tensor::new(chunk, model.device())?.unsqueeze(0)?;
            let logits = model.forward(&ids, cache)?.i(0)?.to_dtype(DType::F32)?;
            // Row r predicts the token at pos + r + 1; keep rows whose target is new and inside.
            let rows: Vec<u32> = (0..chunk.len() as u32)
                .filter(|&r| {
                    let target = pos + r as usize + 1;
                    target >= scored && target < end
                })
                .collect();
            if !rows.is_empty() {
                let targets: Vec<u32> = rows.iter().map(|&r| seq[pos + r as usize + 1]).collect();
                let n = rows.len();
                let rows = Tensor::new(rows, model.device())?;
                let targets = Tensor::new(targets, model.device())?.reshape((n, 1))?;
                let log_probs =
                    candle_nn::ops::log_softmax(&logits.index_select(&rows, 0)?, D::Minus1)?;
                let picked = log_probs.gather(&targets, 1)?.sum_all()?.to_scalar::<f32>()?;
                nats -= f64::from(picked);
            }
            pos += chunk.len();
        }
        scored = end;
        if end == seq.len() {
            break;
        }
        start = end - overlap;
    }
    Ok(nats)
}

/// Greedy next-token prediction with the model's inference forward and one KV cache.
pub struct ModelPredictor<'a> {
    model: &'a Model,
    cache: KvCache,
}

impl<'a> ModelPredictor<'a> {
    /// A predictor with a cache sized for `capacity` tokens (it grows on demand).
    pub fn new(model: &'a Model, capacity: usize) -> Result<Self, EvalError> {
        Ok(Self { model, cache: model.new_cache(capacity)? })
    }

    fn argmax(logits: &Tensor) -> Result<u32, EvalError> {
        Ok(logits.to_dtype(DType::F32)?.argmax(D::Minus1)?.to_scalar::<u32>()?)
    }
}

impl Predictor for ModelPredictor<'_> {
    type Error = EvalError;

    fn start(&mut self, prompt: &[u32]) -> Result<u32, EvalError> {
        self.cache.clear();
        let mut last = None;
        for chunk in prompt.chunks(CHUNK) {
            let ids = Tensor::new(chunk, self.model.device())?.unsqueeze(0)?;
            let logits = self.model.forward(&ids, &mut self.cache)?;
            last = Some(logits.i((0, chunk.len() - 1))?);
        }
        let last = last.ok_or_else(|| EvalError::Usage("empty prompt".into()))?;
        Self::argmax(&last)
    }

    fn push(&mut self, token: u32) -> Result<u32, EvalError> {
        let ids = Tensor::new(&[token], self.model.device())?.unsqueeze(0)?;
        let logits = self.model.forward(&ids, &mut self.cache)?;
        Self::argmax(&logits.i((0, 0))?)
    }
}
