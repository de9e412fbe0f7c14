//! The model's side of `eval`: its code length on test documents (for bits per byte) and a greedy
//! predictor over the inference forward with a KV cache (for the completion benchmark), the same
//! forward and cache the daemon decodes with.

use std::time::Instant;

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
///
/// Windows go through the full-sequence forward (`forward_train`: matmul attention over the whole
/// window), which scores a window several times faster on CPU than the cached inference forward
/// that is built for prefill chunks and single tokens; the two agree within 1e-4 (a model test).
pub fn document_nats(model: &Model, eot: u32, doc: &[u32]) -> Result<f64, EvalError> {
    let seq: Vec<u32> = std::iter::once(eot).chain(doc.iter().copied()).collect();
    let context = model.config().context_length().max(2);
    let overlap = context / 4;
    let mut nats = 0.0;
    // Positions below `scored` already have their token's loss counted.
    let mut scored = 1;
    let mut start = 0;
    while scored < seq.len() {
        let end = (start + context).min(seq.len());
        let ids = Tensor::new(&seq[start..end], model.device())?.unsqueeze(0)?;
        let logits = model.forward_train(&ids)?.i(0)?.to_dtype(DType::F32)?;
        // Row r predicts the token at start + r + 1; keep the rows whose target is new.
        let first = scored - start - 1;
        let rows = end - start - 1 - first;
        let targets: Vec<u32> = seq[scored..end].to_vec();
        let targets = Tensor::new(targets, model.device())?.reshape((rows, 1))?;
        let log_probs = candle_nn::ops::log_softmax(&logits.narrow(0, first, rows)?, D::Minus1)?;
        nats -= f64::from(log_probs.gather(&targets, 1)?.sum_all()?.to_scalar::<f32>()?);
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
    /// Time spent in prompts and in single-token steps, each ending with the argmax on the host.
    pub speed: DecodeSpeed,
}

/// Where a predictor's time went: prompt processing (prefill) and one-token decode steps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecodeSpeed {
    /// Prompt tokens processed.
    pub prefill_tokens: u64,
    /// Seconds spent on them.
    pub prefill_s: f64,
    /// Tokens decoded one at a time.
    pub decode_tokens: u64,
    /// Seconds spent on them.
    pub decode_s: f64,
}

impl<'a> ModelPredictor<'a> {
    /// A predictor with a cache sized for `capacity` tokens (it grows on demand).
    pub fn new(model: &'a Model, capacity: usize) -> Result<Self, EvalError> {
        Ok(Self { model, cache: model.new_cache(capacity)?, speed: DecodeSpeed::default() })
    }

    fn argmax(logits: &Tensor) -> Result<u32, EvalError> {
        Ok(logits.to_dtype(DType::F32)?.argmax(D::Minus1)?.to_scalar::<u32>()?)
    }
}

impl Predictor for ModelPredictor<'_> {
    type Error = EvalError;

    fn start(&mut self, prompt: &[u32]) -> Result<u32, EvalError> {
        let t = Instant::now();
        self.cache.clear();
        let mut last = None;
        for chunk in prompt.chunks(CHUNK) {
            let ids = Tensor::new(chunk, self.model.device())?.unsqueeze(0)?;
            let logits = self.model.forward(&ids, &mut self.cache)?;
            last = Some(logits.i((0, chunk.len() - 1))?);
        }
        let last = last.ok_or_else(|| EvalError::Usage("empty prompt".into()))?;
        let next = Self::argmax(&last)?;
        self.speed.prefill_tokens += prompt.len() as u64;
        self.speed.prefill_s += t.elapsed().as_secs_f64();
        Ok(next)
    }

    fn push(&mut self, token: u32) -> Result<u32, EvalError> {
        let t = Instant::now();
        let ids = Tensor::new(&[token], self.model.device())?.unsqueeze(0)?;
        let logits = self.model.forward(&ids, &mut self.cache)?;
        let next = Self::argmax(&logits.i((0, 0))?)?;
        self.speed.decode_tokens += 1;
        self.speed.decode_s += t.elapsed().as_secs_f64();
        Ok(next)
    }
}
