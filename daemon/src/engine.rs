//! The engine: one thread that owns the model, the tokenizer and the prefix cache, and runs jobs
//! from a bounded queue one at a time. Async code never runs the model; it submits jobs and reads
//! their events from a channel. A panic inside a job answers that job with an error, drops the
//! cache (its state is in doubt), and the engine carries on.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{DType, IndexOp};
use m31r_model::fim::{FimBudget, FimError, serving_prompt};
use m31r_model::recall::{Recall, RecallParams, SOURCE_CACHE_CHUNKS, SourceTokens};
use m31r_model::sampling::{Sampler, SamplingParams};
use m31r_model::tokenizer::TokenizerError;
use m31r_model::{Decode, Model, ModelError, Tokenizer};
use m31r_protocol::{ErrorCode, Event, FimInput, GenerationParams, StopReason, Timings, Usage};

use crate::cache::{CacheStats, PrefixCache};
use crate::stops::{CodeContext, StopScanner};

mod confidence;
mod greedy;
mod heal;
use confidence::{Scores, lossy_offset, token_logprob};
use greedy::GreedyPick;
use heal::{Healing, Step};

/// How long the kernels' pool waits awake for a job's first forward ([`Model::expect_forward`]):
/// more than building a keystroke's prompt takes.
const WARM_POOL: Duration = Duration::from_millis(5);

/// Tunables of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Jobs that may wait for the engine; more are refused as overloaded.
    pub queue_len: usize,
    /// Prompt tokens evaluated per forward call; cancellation is checked between chunks.
    pub prefill_chunk: usize,
    /// Memory budget of the prefix cache.
    pub cache_budget_bytes: usize,
    /// Most cached sequences.
    pub max_cache_entries: usize,
    /// The prompt is cut from its start in steps of this many tokens (keeps the cut stable).
    pub prompt_cut_step: usize,
    /// Token healing of `complete`, `fim` and `warm` prompts (docs/protocol.md, "Token
    /// healing"): a last token that is a fragment is removed and regenerated under a constraint.
    pub token_healing: bool,
    /// Recall mixed into every next-token distribution (`m31r_model::recall`): the repetitions
    /// of the prompt and of the request's file text around the cursor.
    pub recall: RecallParams,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_len: 64,
            prefill_chunk: 256,
            cache_budget_bytes: 512 << 20,
            max_cache_entries: 8,
            prompt_cut_step: 256,
            token_healing: true,
            recall: RecallParams::DEFAULT,
        }
    }
}

/// What a job asks for.
#[derive(Debug, Clone)]
pub enum JobKind {
    /// Raw continuation.
    Generate {
        /// Text to continue.
        prompt: String,
    },
    /// Code continuation with the Rust stop rules.
    Complete {
        /// Text before the cursor.
        prompt: String,
    },
    /// Fill-in-the-middle (SPM layout) with the Rust stop rules.
    Fim(FimInput),
    /// Prefill a FIM prompt only.
    Warm(FimInput),
    /// Panics inside the engine (tests of panic isolation only).
    #[cfg(test)]
    Panic,
}

/// One request for the engine.
#[derive(Debug)]
pub struct Job {
    /// The client's request id, echoed in every event.
    pub id: String,
    /// What to do.
    pub kind: JobKind,
    /// How to generate.
    pub params: GenerationParams,
    /// Set to stop the job between tokens and prefill chunks.
    pub cancel: Arc<AtomicBool>,
    /// Where its events go; a closed receiver cancels the job.
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
    /// When the request arrived.
    pub arrived: Instant,
}

/// Why a job could not be queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full.
    #[error("the engine queue is full ({0} jobs waiting); retry later")]
    Overloaded(usize),
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

impl SubmitError {
    /// The protocol error code a client sees for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            SubmitError::Overloaded(_) => ErrorCode::Overloaded,
            SubmitError::Stopped => ErrorCode::ShuttingDown,
        }
    }
}

/// Counters shared between the engine thread and the server.
#[derive(Debug, Default)]
pub struct EngineCounters {
    /// Jobs submitted but not yet started.
    pub queued: AtomicU64,
    /// Jobs finished, any outcome.
    pub requests: AtomicU64,
    /// Of which cancelled.
    pub cancelled: AtomicU64,
    /// Of which failed.
    pub errors: AtomicU64,
    /// Prompt tokens served from the cache.
    pub cached_tokens: AtomicU64,
    /// Prompt tokens evaluated.
    pub prefilled_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
}

/// Handle to the engine thread.
#[derive(Debug)]
pub struct Engine {
    jobs: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    queue_len: usize,
    counters: Arc<EngineCounters>,
    cache_stats: Arc<Mutex<CacheStats>>,
    cache_budget_bytes: usize,
    context_length: usize,
    stopping: Arc<AtomicBool>,
    /// The bytes of every token the last job generated, healed ones included (tests only).
    #[cfg(test)]
    generated: Arc<Mutex<Vec<u8>>>,
    /// How many tokens of the last job only retyped healed text (tests only).
    #[cfg(test)]
    healed_only: Arc<AtomicU64>,
}

impl Engine {
    /// Starts the engine thread, which owns `model` and `tokenizer` from now on.
    pub fn start(model: Model, tokenizer: Tokenizer, config: EngineConfig) -> Self {
        let (tx, rx) = sync_channel(config.queue_len.max(1));
        let counters = Arc::new(EngineCounters::default());
        let cache_stats = Arc::new(Mutex::new(CacheStats::default()));
        let stopping = Arc::new(AtomicBool::new(false));
        let context_length = model.config().context_length();
        #[cfg(test)]
        let generated = Arc::new(Mutex::new(Vec::new()));
        #[cfg(test)]
        let healed_only = Arc::new(AtomicU64::new(0));
        let worker = Worker {
            // Once per tokenizer, so that the healing constraint is a slice comparison per token.
            token_bytes: tokenizer.token_bytes(),
            #[cfg(test)]
            generated: generated.clone(),
            #[cfg(test)]
            healed_only: healed_only.clone(),
            cache: PrefixCache::new(config.cache_budget_bytes, config.max_cache_entries),
            source: SourceTokens::new(SOURCE_CACHE_CHUNKS),
            model,
            tokenizer,
            config: config.clone(),
            counters: counters.clone(),
            cache_stats: cache_stats.clone(),
            stopping: stopping.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("m31r-engine".into())
            .spawn(move || worker.run(rx))
            .ok();
        Self {
            jobs: Some(tx),
            thread,
            queue_len: config.queue_len,
            counters,
            cache_stats,
            cache_budget_bytes: config.cache_budget_bytes,
            context_length,
            stopping,
            #[cfg(test)]
            generated,
            #[cfg(test)]
            healed_only,
        }
    }

    /// Queues a job without blocking.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let jobs = self.jobs.as_ref().ok_or(SubmitError::Stopped)?;
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        match jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.counters.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::Overloaded(self.queue_len),
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }

    /// Counters.
    pub fn counters(&self) -> &EngineCounters {
        &self.counters
    }

    /// Prefix-cache size after the last job.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache_stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// A status report of this engine serving `model`, up for `uptime`, with `connections` open.
    pub fn status(
        &self,
        model: &m31r_protocol::ModelInfo,
        uptime: Duration,
        connections: u32,
    ) -> m31r_protocol::DaemonStatus {
        let c = &self.counters;
        let cache = self.cache_stats();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        m31r_protocol::DaemonStatus {
            model: model.clone(),
            uptime_s: uptime.as_secs_f64(),
            connections,
            queued: load(&c.queued) as u32,
            cache_entries: cache.entries as u32,
            cache_tokens: cache.tokens as u64,
            cache_bytes: cache.bytes as u64,
            cache_budget_bytes: self.cache_budget_bytes as u64,
            resident_bytes: crate::sys::resident_bytes(),
            requests: load(&c.requests),
            cancelled: load(&c.cancelled),
            errors: load(&c.errors),
            cached_tokens: load(&c.cached_tokens),
            prefilled_tokens: load(&c.prefilled_tokens),
            generated_tokens: load(&c.generated_tokens),
        }
    }

    /// The prefix cache's budget.
    pub fn cache_budget_bytes(&self) -> usize {
        self.cache_budget_bytes
    }

    /// The model's context window.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Makes every running and queued job stop at its next check (used at shutdown).
    pub fn cancel_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Cancels everything, stops the thread and waits for it.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.cancel_all();
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The state the engine thread owns.
struct Worker {
    model: Model,
    tokenizer: Tokenizer,
    /// [`Tokenizer::token_bytes`] of `tokenizer`.
    token_bytes: Vec<Vec<u8>>,
    #[cfg(test)]
    generated: Arc<Mutex<Vec<u8>>>,
    #[cfg(test)]
    healed_only: Arc<AtomicU64>,
    cache: PrefixCache,
    /// Token ids of the file text that recall reads beyond the prompt, cached by chunk.
    source: SourceTokens,
    config: EngineConfig,
    counters: Arc<EngineCounters>,
    cache_stats: Arc<Mutex<CacheStats>>,
    stopping: Arc<AtomicBool>,
}

/// A job's prompt, ready to run.
struct Prompt {
    /// Its token ids.
    ids: Vec<u32>,
    /// The code context for the Rust stop rules (none for raw generation).
    code: Option<CodeContext>,
    /// The constraint on the first tokens when the last token was healed away.
    healing: Option<Healing>,
}

/// How a job failed.
struct JobError {
    code: ErrorCode,
    message: String,
}

impl From<ModelError> for JobError {
    fn from(e: ModelError) -> Self {
        let code = match e {
            ModelError::ContextOverflow { .. } => ErrorCode::ContextOverflow,
            _ => ErrorCode::Internal,
        };
        Self { code, message: e.to_string() }
    }
}

impl From<candle_core::Error> for JobError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::from(e).into()
    }
}

fn bad_params(message: String) -> JobError {
    JobError { code: ErrorCode::InvalidParams, message }
}

impl Worker {
    fn run(mut self, jobs: Receiver<Job>) {
        while let Ok(job) = jobs.recv() {
            // The pool's threads wake while the prompt is built: on busy cores a woken thread
            // can wait milliseconds for one, and the forward should not wait with it.
            self.model.expect_forward(WARM_POOL);
            self.counters.queued.fetch_sub(1, Ordering::Relaxed);
            let (id, events) = (job.id.clone(), job.events.clone());
            let outcome = catch_unwind(AssertUnwindSafe(|| self.run_job(&job)));
            let event = match outcome {
                Ok(Ok(done)) => {
                    if let Event::Done { stop: StopReason::Cancelled, .. } = done {
                        self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                    done
                }
                Ok(Err(e)) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    Event::Error { id: Some(id.clone()), code: e.code, message: e.message }
                }
                Err(panic) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    // The job may have died mid-update: nothing cached can be trusted.
                    self.cache.clear();
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    tracing::error!(request = %id, panic = %what, "job panicked; cache dropped");
                    Event::Error {
                        id: Some(id.clone()),
                        code: ErrorCode::Internal,
                        message: format!("internal error while running request {id}: {what}"),
                    }
                }
            };
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let cache = self.cache.stats();
            if let Ok(mut stats) = self.cache_stats.lock() {
                *stats = cache;
            }
            log_outcome(&id, &event, cache);
            let _ = events.send(event);
        }
    }

    fn cancelled(&self, job: &Job) -> bool {
        job.cancel.load(Ordering::Relaxed)
            || self.stopping.load(Ordering::Relaxed)
            || job.events.is_closed()
    }

    fn run_job(&mut self, job: &Job) -> Result<Event, JobError> {
        let started = Instant::now();
        let queue_ms = ms(started - job.arrived);
        let params = &job.params;
        let sampling = SamplingParams {
            temperature: params.temperature,
            top_k: params.top_k as usize,
            top_p: params.top_p,
            seed: params.seed,
        };
        let mut sampler = Sampler::new(sampling).map_err(|e| bad_params(e.to_string()))?;
        let context = self.model.config().context_length();
        let max_new = params.max_tokens as usize;
        let warm = matches!(job.kind, JobKind::Warm(_));
        // A warm-up is cut to the budget of the request it prepares (its `max_tokens`), so that
        // request finds exactly this prompt cached.
        let budget = context.checked_sub(max_new).filter(|b| *b >= 4);
        let budget = budget.ok_or_else(|| JobError {
            code: ErrorCode::ContextOverflow,
            message: format!(
                "max_tokens = {max_new} leaves no room for a prompt in the {context}-token context"
            ),
        })?;
        let Prompt { ids: prompt, code, mut healing } = self.build_prompt(&job.kind, budget)?;
        if let Some(h) = &healing {
            tracing::debug!(removed = %String::from_utf8_lossy(h.removed()), "token healing");
        }
        let deadline = (params.deadline_ms > 0)
            .then(|| job.arrived + Duration::from_millis(params.deadline_ms));

        let capacity = (prompt.len() + max_new).min(context);
        let (index, cached) = self.cache.acquire(&self.model, &prompt, capacity)?;
        let mut usage = Usage {
            prompt_tokens: prompt.len() as u32,
            cached_tokens: cached as u32,
            completion_tokens: 0,
        };
        self.counters.cached_tokens.fetch_add(cached as u64, Ordering::Relaxed);
        let done = |stop, usage, prefill_ms, decode_ms, lines| Event::Done {
            id: job.id.clone(),
            stop,
            usage,
            timings: Timings {
                queue_ms,
                prefill_ms,
                decode_ms,
                total_ms: ms(job.arrived.elapsed()),
            },
            lines,
        };

        // Prefill in chunks, checking for cancellation between them.
        let prefill_start = Instant::now();
        let mut logits = None;
        for chunk in prompt[cached..].chunks(self.config.prefill_chunk.max(1)) {
            if self.cancelled(job) {
                let prefill_ms = ms(prefill_start.elapsed());
                return Ok(done(StopReason::Cancelled, usage, prefill_ms, 0.0, Vec::new()));
            }
            let out = self.cache.get_mut(index).extend(&self.model, chunk)?;
            self.counters.prefilled_tokens.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            logits = Some(out.i((0, 0))?);
        }
        let prefill_ms = ms(prefill_start.elapsed());
        let index = self.cache.enforce_budget(index);
        if warm {
            // Encode the file text recall will read, so the first keystroke finds it cached.
            self.recall_for(&job.kind, &prompt)?;
            return Ok(done(StopReason::Warmed, usage, prefill_ms, 0.0, Vec::new()));
        }

        // Decode, checking cancellation and deadline between tokens.
        let decode_start = Instant::now();
        let special = *self.tokenizer.special_ids();
        let mut scanner = StopScanner::new(code, params.stop.clone());
        // Bytes of generated tokens not yet sent, and how many tokens they came from.
        let mut pending: Vec<u8> = Vec::new();
        let mut pending_tokens = 0;
        // Log-probabilities of the tokens that added bytes to `pending`, at their first byte.
        let mut pending_scores: Vec<(usize, f64)> = Vec::new();
        let mut scores = Scores::default();
        // The text sent so far: the confidence lines describe exactly this.
        let mut sent = String::new();
        #[cfg(test)]
        let mut generated = Vec::new();
        #[cfg(test)]
        let mut healed_only = 0;
        let mut stop = StopReason::MaxTokens;
        let mut logits = logits.ok_or_else(|| JobError {
            code: ErrorCode::Internal,
            message: "no logits after prefill".into(),
        })?;
        let mut recall = self.recall_for(&job.kind, &prompt)?;
        // Greedy picks without a healing constraint are made by a decode run on the kernels'
        // pool (`Model::decode`): its threads go on to the next token while this one streams
        // the last, and none waits for this thread to get a core. The picks are the ones made
        // here, one step at a time, otherwise.
        let runs = sampler.params().temperature == 0.0 && greedy::runs_enabled();
        let mut run: Option<Decode> = None;
        for step in 0..max_new {
            if self.cancelled(job) {
                stop = StopReason::Cancelled;
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                stop = StopReason::Deadline;
                break;
            }
            // From here on `row` is the mixture's: the pick, the healing constraint and the
            // confidence all see the same distribution.
            let (next, row) = match run.as_mut() {
                Some(run) => {
                    let (next, row) = run.next_pick().ok_or_else(|| JobError {
                        code: ErrorCode::Internal,
                        message: "a decode run ended before the step it was to pick".into(),
                    })?;
                    (next, row.to_vec())
                }
                None => {
                    let mut row: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
                    recall.mix_into(&mut row);
                    let next = match &healing {
                        Some(h) => sampler.sample_allowed(&row, |id| {
                            self.token_bytes.get(id as usize).is_some_and(|b| h.allows(b))
                        }),
                        None => sampler.sample(&row),
                    }
                    .map_err(|e| bad_params(e.to_string()))?;
                    (next, row)
                }
            };
            if special.contains(next) {
                stop = StopReason::EndOfText;
                break;
            }
            usage.completion_tokens += 1;
            let token = self.token_bytes.get(next as usize).ok_or_else(|| JobError {
                code: ErrorCode::Internal,
                message: format!("the model produced id {next} outside the vocabulary"),
            })?;
            #[cfg(test)]
            generated.extend_from_slice(token);
            // While healing, the token's bytes up to the end of the removed ones are the
            // client's own text: only what follows them is new.
            let fresh = match healing.as_mut().map(|h| h.accept(token)) {
                None => Some(&token[..]),
                Some(Step::Inside) => None,
                Some(Step::Done(rest)) => {
                    healing = None;
                    Some(rest)
                }
            };
            if let Some(fresh) = fresh {
                if !fresh.is_empty() {
                    // Of the mixture's softmax, not the sampler's distribution: the same number
                    // for every request, and greedy stays deterministic.
                    pending_scores.push((pending.len(), token_logprob(&row, next)));
                }
                pending.extend_from_slice(fresh);
                pending_tokens += 1;
            }
            #[cfg(test)]
            if fresh.is_none_or(<[u8]>::is_empty) {
                healed_only += 1;
            }
            // This is exactly `Tokenizer::decode` of the pending tokens (see `token_bytes`).
            let text = String::from_utf8_lossy(&pending).into_owned();
            // A token can end inside a multi-byte character; wait for the rest of it.
            if fresh.is_some() && (!text.ends_with('\u{FFFD}') || pending_tokens >= 4) {
                let base = scanner.text().len();
                for (at, logprob) in pending_scores.drain(..) {
                    scores.record(base + lossy_offset(&pending, at), logprob);
                }
                pending.clear();
                pending_tokens = 0;
                let (emit, hit) = scanner.push(&text);
                if !emit.is_empty() {
                    let lines = scores.lines_touched(&mut sent, &emit);
                    let _ = job.events.send(Event::Token { id: job.id.clone(), text: emit, lines });
                }
                if let Some(reason) = hit {
                    stop = reason;
                    break;
                }
            }
            if step + 1 == max_new {
                break;
            }
            let seq = self.cache.get_mut(index);
            let in_run = run.as_ref().map_or(0, Decode::taken);
            if seq.tokens().len() + in_run + 1 > context {
                stop = StopReason::ContextFull;
                break;
            }
            match run.take() {
                // The run's next step forwards `next`; it is under way.
                Some(r) if r.taken() < r.steps() => {
                    run = Some(r);
                    continue;
                }
                Some(r) => seq.finish_decode(r)?.iter().for_each(|&id| recall.push_generated(id)),
                None => {}
            }
            if runs && healing.is_none() {
                let steps = (max_new - step - 1).min(context - seq.tokens().len());
                let pick = Arc::new(GreedyPick::new(&recall, special));
                run = seq.decode(&self.model, next, steps, pick)?;
                if run.is_some() {
                    continue;
                }
            }
            let out = seq.extend(&self.model, &[next])?;
            recall.push_generated(next);
            logits = out.i((0, 0))?;
        }
        if let Some(run) = run.take() {
            // What the run forwarded for the tokens taken stays cached for the next request.
            self.cache.get_mut(index).finish_decode(run)?;
        }
        if stop != StopReason::Cancelled {
            // Held-back text (a trailing whitespace line, a partial stop string) is part of the
            // answer once nothing more can follow it; after a stop hit nothing is held.
            let rest = scanner.finish();
            if !rest.is_empty() {
                let lines = scores.lines_touched(&mut sent, &rest);
                let _ = job.events.send(Event::Token { id: job.id.clone(), text: rest, lines });
            }
        }
        self.counters
            .generated_tokens
            .fetch_add(u64::from(usage.completion_tokens), Ordering::Relaxed);
        #[cfg(test)]
        if let Ok(mut last) = self.generated.lock() {
            *last = generated;
        }
        #[cfg(test)]
        self.healed_only.store(healed_only, Ordering::Relaxed);
        let lines = scores.lines(&sent);
        Ok(done(stop, usage, prefill_ms, ms(decode_start.elapsed()), lines))
    }

    /// Recall over the request's file text (each side of the cursor its own segment: the text
    /// before it, and for `fim` the text after it; at most 64 KiB each) and then the prompt.
    fn recall_for(&mut self, kind: &JobKind, prompt_ids: &[u32]) -> Result<Recall, JobError> {
        let mut recall = Recall::new(self.config.recall);
        let around = match kind {
            _ if !self.config.recall.is_on() => None,
            JobKind::Complete { prompt } => Some((prompt.as_str(), None)),
            JobKind::Fim(input) | JobKind::Warm(input) => {
                Some((input.prefix.as_str(), Some(input.suffix.as_str())))
            }
            _ => None,
        };
        let file_text = match around {
            Some((before, after)) => {
                self.source.around_cursor(&self.tokenizer, before, after).map_err(|e| JobError {
                    code: ErrorCode::Internal,
                    message: format!("cannot encode the file text for recall: {e}"),
                })?
            }
            None => Vec::new(),
        };
        recall.start(&file_text, prompt_ids);
        Ok(recall)
    }

    /// Token ids of the prompt, cut to `budget` by the documented rules, the code context for
    /// the Rust stop rules (none for raw generation), and the healing constraint when the
    /// prompt's last token was removed (only code prompts are healed, when healing is on).
    fn build_prompt(&self, kind: &JobKind, budget: usize) -> Result<Prompt, JobError> {
        let heal = |ids: &mut Vec<u32>, before_cursor: &str| {
            self.config
                .token_healing
                .then(|| Healing::start(ids, before_cursor, &self.token_bytes))
                .flatten()
        };
        match kind {
            #[cfg(test)]
            JobKind::Panic => panic!("panic requested by a test"),
            JobKind::Generate { prompt } | JobKind::Complete { prompt } => {
                let mut ids =
                    plain_prompt(&self.tokenizer, prompt, budget, self.config.prompt_cut_step)
                        .map_err(|e| bad_params(e.to_string()))?;
                let complete = matches!(kind, JobKind::Complete { .. });
                let code = complete.then(|| CodeContext::new(prompt, ""));
                let healing = if complete { heal(&mut ids, prompt) } else { None };
                Ok(Prompt { ids, code, healing })
            }
            JobKind::Fim(input) | JobKind::Warm(input) => {
                let files: Vec<(&str, &str)> = input
                    .context_files
                    .iter()
                    .map(|f| (f.path.as_str(), f.text.as_str()))
                    .collect();
                let fim_budget = FimBudget {
                    max_prompt_tokens: budget,
                    prefix_cut_step: self.config.prompt_cut_step,
                    ..FimBudget::default()
                };
                let prompt = serving_prompt(
                    &self.tokenizer,
                    &files,
                    &input.prefix,
                    &input.suffix,
                    &fim_budget,
                )
                .map_err(|e| match e {
                    FimError::BudgetTooSmall { .. } => {
                        JobError { code: ErrorCode::ContextOverflow, message: e.to_string() }
                    }
                    other => bad_params(other.to_string()),
                })?;
                // `warm` heals too, so that it caches exactly what the `fim` after it reuses.
                let mut ids = prompt.ids;
                let healing = heal(&mut ids, &input.prefix);
                let code = Some(CodeContext::new(&input.prefix, &input.suffix));
                Ok(Prompt { ids, code, healing })
            }
        }
    }
}

/// Token ids of a `generate` / `complete` prompt, cut to `budget` tokens by dropping its distant
/// start in whole steps of `cut_step` tokens, so that the cut point, and with it the cache, stays
/// put while the user types.
///
/// Text the budget cannot reach is cut before encoding ([`Tokenizer::tail_start`]): a prompt at
/// the frame limit then costs memory in proportion to the context, not to its length. The text
/// is cut at a line start, where the kept tokens are exactly those of the whole text; only the
/// step alignment then counts from there.
fn plain_prompt(
    tokenizer: &Tokenizer,
    prompt: &str,
    budget: usize,
    cut_step: usize,
) -> Result<Vec<u32>, TokenizerError> {
    let mut ids = tokenizer.encode(&prompt[tokenizer.tail_start(prompt, budget)..])?;
    if ids.is_empty() {
        // Nothing to condition on: start as a document starts.
        ids.push(tokenizer.special_ids().end_of_text);
    }
    if ids.len() > budget {
        let step = cut_step.clamp(1, budget.max(1));
        let drop = (ids.len() - budget).div_ceil(step) * step;
        ids.drain(..drop.min(ids.len() - 1));
    }
    Ok(ids)
}

/// One structured log line per request, inside a span carrying its id.
fn log_outcome(id: &str, event: &Event, cache: CacheStats) {
    let span = tracing::info_span!("request", id = %id);
    let _guard = span.enter();
    match event {
        Event::Done { stop, usage, timings, .. } => {
            let tokens_per_s = if timings.decode_ms > 0.0 {
                f64::from(usage.completion_tokens) * 1e3 / timings.decode_ms
            } else {
                0.0
            };
            tracing::info!(
                prompt_tokens = usage.prompt_tokens,
                cached_tokens = usage.cached_tokens,
                new_tokens = usage.completion_tokens,
                queue_ms = format!("{:.1}", timings.queue_ms),
                prefill_ms = format!("{:.1}", timings.prefill_ms),
                decode_ms = format!("{:.1}", timings.decode_ms),
                tokens_per_s = format!("{tokens_per_s:.1}"),
                stop = ?stop,
                cache_entries = cache.entries,
                cache_mb = cache.bytes >> 20,
                resident_mb = crate::sys::resident_bytes() >> 20,
                "done"
            );
        }
        Event::Error { code, message, .. } => tracing::warn!(code = ?code, %message, "failed"),
        _ => {}
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests;
