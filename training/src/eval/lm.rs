//! The model's side of `eval`: its code length on test documents (for bits per byte) and a greedy
//! predictor over the inference forward with a KV cache (for the completion benchmark), the same
//! forward and cache the daemon decodes with.

use std::time::Instant;

use candle_core::{DType, IndexOp, Tensor};
use m31r_model::recall::{Recall, RecallParams, softmax_at};
use m31r_model::transformer::{KvCache, Model};

use super::EvalError;
use super::fim::Predictor;

/// Tokens per forward call: bounds the logits held at once (`chunk × vocab` floats).
const CHUNK: usize = 256;

/// Total negative log-likelihood, in nats, of `doc` after a leading `eot` (how documents follow
/// one another in the training stream), under the network alone. See [`document_scores`].
pub fn document_nats(model: &Model, eot: u32, doc: &[u32]) -> Result<f64, EvalError> {
    Ok(document_scores(model, eot, doc, 0)?.iter().map(|s| s.nats(&RecallParams::OFF)).sum())
}

/// What one token's prediction was made of: the network's probability of the token, and what
/// recall found at that point (its matched order, the token's count, the total count), so that
/// the code length under any [`RecallParams`] of at most the scored order is a sum over tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenScore {
    /// The network's probability of the token.
    pub net: f64,
    /// Recall's matched length (0: no match).
    pub order: usize,
    /// How often the token followed that context before.
    pub count: u32,
    /// How often anything did.
    pub total: u32,
}

impl TokenScore {
    /// The token's code length in nats under the mixture `recall` (its order must not exceed the
    /// one the scores were taken with).
    pub fn nats(&self, recall: &RecallParams) -> f64 {
        let order = self.order.min(recall.max_order);
        if order == 0 || self.total == 0 || !recall.is_on() {
            return -self.net.ln();
        }
        let lambda = f64::from(recall.lambda(order));
        let p = (1.0 - lambda) * self.net + lambda * f64::from(self.count) / f64::from(self.total);
        -p.ln()
    }
}

/// Per-token scores of `doc` after a leading `eot`, with recall up to `max_order` tokens
/// indexed over the same window the network sees. Documents longer than the context are scored
/// in windows that overlap by a quarter of the context, so every token after the first window is
/// predicted from at least that much text.
///
/// Windows go through the full-sequence forward (`forward_train`: matmul attention over the whole
/// window), which scores a window several times faster on CPU than the cached inference forward
/// that is built for prefill chunks and single tokens; the two agree within 1e-4 (a model test).
pub fn document_scores(
    model: &Model,
    eot: u32,
    doc: &[u32],
    max_order: usize,
) -> Result<Vec<TokenScore>, EvalError> {
    let seq: Vec<u32> = std::iter::once(eot).chain(doc.iter().copied()).collect();
    let context = model.config().context_length().max(2);
    let overlap = context / 4;
    let mut scores = Vec::with_capacity(doc.len());
    // Recall's mixture weights do not matter for the index; only its order does.
    let mut recall = Recall::new(RecallParams { max_order, weight: 0.5, half: 1.0 });
    // Positions below `scored` already have their token's score.
    let mut scored = 1;
    let mut start = 0;
    while scored < seq.len() {
        let end = (start + context).min(seq.len());
        let ids = Tensor::new(&seq[start..end], model.device())?.unsqueeze(0)?;
        let logits = model.forward_train(&ids)?.i(0)?.to_dtype(DType::F32)?;
        // Row r predicts the token at start + r + 1; keep the rows whose target is new.
        let first = scored - start - 1;
        let rows = end - start - 1 - first;
        let logits: Vec<Vec<f32>> = logits.narrow(0, first, rows)?.to_vec2()?;
        recall.clear();
        recall.extend_source(&seq[start..scored]);
        for (row, target) in logits.iter().zip(&seq[scored..end]) {
            let recalled = recall.recalled();
            scores.push(TokenScore {
                net: softmax_at(row, *target as usize),
                order: recalled.order,
                count: recalled.count(*target),
                total: recalled.total,
            });
            recall.extend_source(&[*target]);
        }
        scored = end;
        if end == seq.len() {
            break;
        }
        start = end - overlap;
    }
    Ok(scores)
}

/// Greedy next-token prediction with the model's inference forward and one KV cache.
pub struct ModelPredictor<'a> {
    model: &'a Model,
    cache: KvCache,
    /// Recall over the prompt and the tokens generated so far (off: the network's argmax).
    recall: Recall,
    /// Token ids of the file text around the cursor (the text before it, then the text after
    /// it for FIM), recalled as the daemon recalls a request's: each its own segment, before the
    /// prompt. Taken by the next [`Predictor::start`].
    pub file_text: Vec<Vec<u32>>,
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
    pub fn new(model: &'a Model, capacity: usize, recall: RecallParams) -> Result<Self, EvalError> {
        Ok(Self {
            model,
            cache: model.new_cache(capacity)?,
            recall: Recall::new(recall),
            file_text: Vec::new(),
            speed: DecodeSpeed::default(),
        })
    }

    /// The greedy pick of the mixture (the network's argmax when recall is off).
    fn pick(&self, logits: &Tensor) -> Result<u32, EvalError> {
        let mut row: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        self.recall.mix_into(&mut row);
        Ok(m31r_model::sampling::argmax(&row))
    }
}

impl Predictor for ModelPredictor<'_> {
    type Error = EvalError;

    fn start(&mut self, prompt: &[u32]) -> Result<u32, EvalError> {
        let t = Instant::now();
        self.cache.clear();
        self.recall.start(&std::mem::take(&mut self.file_text), prompt);
        let mut last = None;
        for chunk in prompt.chunks(CHUNK) {
            let ids = Tensor::new(chunk, self.model.device())?.unsqueeze(0)?;
            let logits = self.model.forward(&ids, &mut self.cache)?;
            last = Some(logits.i((0, chunk.len() - 1))?);
        }
        let last = last.ok_or_else(|| EvalError::Usage("empty prompt".into()))?;
        let next = self.pick(&last)?;
        self.speed.prefill_tokens += prompt.len() as u64;
        self.speed.prefill_s += t.elapsed().as_secs_f64();
        Ok(next)
    }

    fn push(&mut self, token: u32) -> Result<u32, EvalError> {
        let t = Instant::now();
        let ids = Tensor::new(&[token], self.model.device())?.unsqueeze(0)?;
        let logits = self.model.forward(&ids, &mut self.cache)?;
        self.recall.push_generated(token);
        let next = self.pick(&logits.i((0, 0))?)?;
        self.speed.decode_tokens += 1;
        self.speed.decode_s += t.elapsed().as_secs_f64();
        Ok(next)
    }
}
