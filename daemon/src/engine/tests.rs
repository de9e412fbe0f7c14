//! Tests of the engine: panic isolation, cancellation, the prompt cut, a full queue and the
//! per-line confidence in `done`, on a tiny random-weight model.

use candle_core::Device;
use m31r_model::{ModelConfig, RawModelConfig};
use m31r_protocol::FimInput;
use tokio::sync::mpsc::unbounded_channel;

use super::*;
use crate::cache::PrefixCache;

fn engine(config: EngineConfig) -> Engine {
    let text = "fn main() { let x = 1; println!(\"{x}\"); }\n".repeat(20);
    let (model, tokenizer) = tiny(&text, 300);
    Engine::start(model, tokenizer, config)
}

/// The tiny seeded model with a `vocab_size` tokenizer trained on `text`; the same every call.
fn tiny(text: &str, vocab_size: usize) -> (Model, Tokenizer) {
    let tokenizer = Tokenizer::train([text].iter(), vocab_size).unwrap();
    let config_m = ModelConfig::new(&RawModelConfig {
        vocab_size: tokenizer.vocab_size(),
        d_model: 32,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: None,
        d_ff: 64,
        context_length: 256,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
    })
    .unwrap();
    let (model, _) = Model::init(&config_m, 1, &Device::Cpu).unwrap();
    (model, tokenizer)
}

fn submit(engine: &Engine, kind: JobKind, cancel: bool) -> Vec<Event> {
    submit_with(engine, kind, cancel, 8)
}

fn submit_with(engine: &Engine, kind: JobKind, cancel: bool, max_tokens: u32) -> Vec<Event> {
    submit_params(engine, kind, cancel, GenerationParams { max_tokens, ..Default::default() })
}

fn submit_params(
    engine: &Engine,
    kind: JobKind,
    cancel: bool,
    params: GenerationParams,
) -> Vec<Event> {
    let (tx, mut rx) = unbounded_channel();
    engine
        .submit(Job {
            id: "j".into(),
            kind,
            params,
            cancel: Arc::new(AtomicBool::new(cancel)),
            events: tx,
            arrived: Instant::now(),
        })
        .unwrap();
    let mut events = Vec::new();
    while let Some(e) = rx.blocking_recv() {
        let end = matches!(e, Event::Done { .. } | Event::Error { .. });
        events.push(e);
        if end {
            break;
        }
    }
    events
}

#[test]
fn a_panicking_job_is_answered_and_the_engine_carries_on() {
    let engine = engine(EngineConfig::default());
    let prompt = || JobKind::Generate { prompt: "fn main".into() };
    let before = submit(&engine, prompt(), false);
    let events = submit(&engine, JobKind::Panic, false);
    assert!(
        matches!(&events[..], [Event::Error { code: ErrorCode::Internal, message, .. }] if message.contains("panic requested")),
        "{events:?}"
    );
    let without_timings = |events: Vec<Event>| -> Vec<Event> {
        events
            .into_iter()
            .map(|e| match e {
                Event::Done { id, stop, usage, lines, .. } => {
                    Event::Done { id, stop, usage, timings: Timings::default(), lines }
                }
                other => other,
            })
            .collect()
    };
    let after = submit(&engine, prompt(), false);
    assert_eq!(without_timings(after), without_timings(before), "output changed after the panic");
    assert_eq!(engine.counters().errors.load(Ordering::Relaxed), 1);
}

#[test]
fn a_job_cancelled_before_it_runs_does_no_work() {
    let engine = engine(EngineConfig { prefill_chunk: 4, ..EngineConfig::default() });
    let events = submit(&engine, JobKind::Generate { prompt: "fn main() { let".into() }, true);
    match &events[..] {
        [Event::Done { stop: StopReason::Cancelled, usage, .. }] => {
            assert_eq!(usage.completion_tokens, 0)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(engine.counters().prefilled_tokens.load(Ordering::Relaxed), 0);
}

/// The uncut path: the whole prompt encoded, then the token-level cut.
fn uncut_prompt(tokenizer: &Tokenizer, prompt: &str, budget: usize, step: usize) -> Vec<u32> {
    let mut ids = tokenizer.encode(prompt).unwrap();
    if ids.len() > budget {
        let drop = (ids.len() - budget).div_ceil(step) * step;
        ids.drain(..drop.min(ids.len() - 1));
    }
    ids
}

fn test_tokenizer() -> Tokenizer {
    let text = "fn main() { let x = 1; println!(\"{x}\"); }\n".repeat(20);
    Tokenizer::train([text].iter(), 300).unwrap()
}

/// Varied lines of code, `n` of them.
fn code_lines(n: usize) -> String {
    (0..n).map(|i| format!("fn f{i}() {{ let x = {}; println!(\"{{x}}\"); }}\n", i * 7)).collect()
}

#[test]
fn a_prompt_cut_before_encoding_keeps_the_tokens_of_the_uncut_path() {
    let tok = test_tokenizer();
    let budget = 248;
    let prompt = format!("{}fn main() {{ let y", code_lines(6000));
    let start = tok.tail_start(&prompt, budget);
    assert!(start > 0, "a {}-byte prompt was not cut", prompt.len());
    assert!(tok.encode(&prompt[start..]).unwrap().len() >= budget);
    // Cut by single tokens the result is the uncut one exactly.
    assert_eq!(
        plain_prompt(&tok, &prompt, budget, 1).unwrap(),
        uncut_prompt(&tok, &prompt, budget, 1)
    );
    // In whole steps, the kept tokens are still the last ones of the whole prompt.
    let uncut = tok.encode(&prompt).unwrap();
    let cut = plain_prompt(&tok, &prompt, budget, 64).unwrap();
    assert!(uncut.ends_with(&cut) && cut.len() <= budget && cut.len() > budget - 64);
    // A prompt short enough is not cut before encoding: results are exactly as before.
    let short = code_lines(100);
    assert_eq!(tok.tail_start(&short, budget), 0);
    assert_eq!(
        plain_prompt(&tok, &short, budget, 64).unwrap(),
        uncut_prompt(&tok, &short, budget, 64)
    );
    assert_eq!(plain_prompt(&tok, "", budget, 64).unwrap(), vec![tok.special_ids().end_of_text]);
}

#[test]
fn a_prompt_at_the_frame_limit_is_encoded_only_near_its_end() {
    let tok = test_tokenizer();
    let budget = 248;
    let bound = 3 * tok.cut_bytes(budget);
    let lines = code_lines(120_000);
    let one_line = "x".repeat(4 << 20);
    for prompt in [&lines[..4 << 20], &one_line] {
        let encoded = prompt.len() - tok.tail_start(prompt, budget);
        assert!(encoded < bound, "{encoded} bytes encoded of {}", prompt.len());
        let ids = plain_prompt(&tok, prompt, budget, 256).unwrap();
        assert!(!ids.is_empty() && ids.len() <= budget);
    }
    // Through the engine: the job runs and reports a prompt within the budget.
    let engine = engine(EngineConfig::default());
    let events = submit(&engine, JobKind::Generate { prompt: lines[..4 << 20].into() }, false);
    match events.last() {
        Some(Event::Done { usage, .. }) => assert!(usage.prompt_tokens as usize <= 248),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_full_queue_is_reported_not_blocked_on() {
    let engine = engine(EngineConfig { queue_len: 1, ..EngineConfig::default() });
    let (tx, _rx) = unbounded_channel();
    let job = |id: &str| Job {
        id: id.into(),
        kind: JobKind::Generate { prompt: "fn".into() },
        params: GenerationParams { max_tokens: 200, ..Default::default() },
        cancel: Arc::new(AtomicBool::new(false)),
        events: tx.clone(),
        arrived: Instant::now(),
    };
    let results: Vec<_> = (0..20).map(|i| engine.submit(job(&i.to_string()))).collect();
    assert!(results.contains(&Err(SubmitError::Overloaded(1))), "{results:?}");
}

/// Enough merges for `coll` to become a token.
const HEALING_VOCAB: usize = 400;

/// Training text in which `coll` is a common word, so that it is a token of its own.
fn healing_corpus() -> String {
    "use std::collections::HashMap;\nfn main() { let n = crate::coll::len(); }\n".repeat(20)
}

fn healing_engine(token_healing: bool) -> (Engine, Tokenizer) {
    let (model, tokenizer) = tiny(&healing_corpus(), HEALING_VOCAB);
    let config = EngineConfig { token_healing, ..EngineConfig::default() };
    (Engine::start(model, tokenizer.clone(), config), tokenizer)
}

/// The text the client received, and the `done` event's usage.
fn client_text(events: &[Event]) -> (String, Usage) {
    let text = events
        .iter()
        .filter_map(|e| match e {
            Event::Token { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    match events.last() {
        Some(Event::Done { usage, .. }) => (text, *usage),
        other => panic!("no done event: {other:?}"),
    }
}

fn generated(engine: &Engine) -> Vec<u8> {
    engine.generated.lock().unwrap().clone()
}

fn without_timings(events: Vec<Event>) -> Vec<Event> {
    events
        .into_iter()
        .map(|e| match e {
            Event::Done { id, stop, usage, lines, .. } => {
                Event::Done { id, stop, usage, timings: Timings::default(), lines }
            }
            other => other,
        })
        .collect()
}

fn fim(prefix: &str, suffix: &str) -> FimInput {
    FimInput { prefix: prefix.into(), suffix: suffix.into(), ..Default::default() }
}

#[test]
fn a_healed_completion_reproduces_the_removed_bytes_and_sends_only_what_follows() {
    let (engine, tok) = healing_engine(true);
    let prefix = "fn main() { let x = 1; }\nuse std::coll";
    let ids = tok.encode(prefix).unwrap();
    let removed = tok.decode(&ids[ids.len() - 1..]).unwrap();
    assert_eq!(removed, "coll", "the fixture tokenizer should spell `coll` as one token");
    let kinds = [JobKind::Complete { prompt: prefix.into() }, JobKind::Fim(fim(prefix, "\n}\n"))];
    for kind in kinds {
        let events = submit_with(&engine, kind.clone(), false, 24);
        let (text, usage) = client_text(&events);
        let internal = generated(&engine);
        // The constraint: the generated tokens start by retyping what was removed.
        assert!(internal.starts_with(removed.as_bytes()), "{kind:?}: {internal:?}");
        // The client gets what follows it (up to where a stop rule cut it).
        let rest = String::from_utf8_lossy(&internal[removed.len()..]).into_owned();
        assert!(rest.starts_with(&text), "{kind:?}: sent {text:?}, generated {rest:?}");
        assert!(usage.completion_tokens >= 1);
        if let JobKind::Complete { .. } = kind {
            assert_eq!(usage.prompt_tokens as usize, ids.len() - 1, "the last token is removed");
        }
    }
}

#[test]
fn healing_off_is_the_plain_greedy_decode() {
    let (engine, tok) = healing_engine(false);
    let prompt = "fn main() { let x = 1; }\nuse std::coll";
    let max_tokens = 12;
    // The reference: the whole prompt, greedy, decoded with the tokenizer.
    let (model, _) = tiny(&healing_corpus(), HEALING_VOCAB);
    let ids = plain_prompt(&tok, prompt, 256 - max_tokens, 256).unwrap();
    // `generate` recalls the prompt; `complete` also the text before the cursor.
    let decode = |file_text: Option<&str>| {
        let mut cache = PrefixCache::new(1 << 24, 1);
        let (index, _) = cache.acquire(&model, &ids, 256).unwrap();
        let mut logits = cache.get_mut(index).extend(&model, &ids).unwrap().i((0, 0)).unwrap();
        let mut recall = Recall::new(RecallParams::DEFAULT);
        let around = match file_text {
            Some(text) => SourceTokens::new(64).around_cursor(&tok, text, None).unwrap(),
            None => Vec::new(),
        };
        recall.start(&around, &ids);
        let mut out = Vec::new();
        for _ in 0..max_tokens {
            let mut row: Vec<f32> = logits.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
            recall.mix_into(&mut row);
            let next = m31r_model::sampling::argmax(&row);
            if tok.special_ids().contains(next) {
                break;
            }
            out.push(next);
            recall.push_generated(next);
            logits = cache.get_mut(index).extend(&model, &[next]).unwrap().i((0, 0)).unwrap();
        }
        tok.decode(&out).unwrap()
    };
    let reference = decode(None);
    let reference_complete = decode(Some(prompt));

    let events = submit_with(&engine, JobKind::Generate { prompt: prompt.into() }, false, 12);
    assert_eq!(client_text(&events).0, reference);
    let events = submit_with(&engine, JobKind::Complete { prompt: prompt.into() }, false, 12);
    let (text, usage) = client_text(&events);
    assert_eq!(usage.prompt_tokens as usize, ids.len(), "nothing is removed");
    assert_eq!(String::from_utf8_lossy(&generated(&engine)), reference_complete);
    assert!(reference_complete.starts_with(&text), "sent {text:?}, {reference_complete:?}");
}

#[test]
fn recall_continues_the_prompts_own_repetition_and_off_is_the_network_alone() {
    let (model, tok) = tiny(&healing_corpus(), HEALING_VOCAB);
    let (model_off, _) = tiny(&healing_corpus(), HEALING_VOCAB);
    let on = Engine::start(model, tok.clone(), EngineConfig::default());
    let off = Engine::start(
        model_off,
        tok.clone(),
        EngineConfig { recall: RecallParams::OFF, ..EngineConfig::default() },
    );
    let line = "let total = values.iter().map(|v| v.len()).sum::<usize>();\n";
    // The prompt ends where the line began the first time: an untrained network has no idea,
    // recall has a long match.
    let prompt = format!("fn a() {{\n    {line}}}\nfn b() {{\n    let total");
    let generate = |engine: &Engine| {
        let events = submit_with(engine, JobKind::Generate { prompt: prompt.clone() }, false, 64);
        client_text(&events).0
    };
    let (with, without) = (generate(&on), generate(&off));
    assert!(
        with.starts_with(" = values.iter().map(|v| v.len()).sum::<usize>();"),
        "recall on: {with:?}"
    );
    assert_ne!(with, without);
    // Off, the engine is the network's greedy decode.
    let ids = plain_prompt(&tok, &prompt, 256 - 64, 256).unwrap();
    let mut cache = PrefixCache::new(1 << 24, 1);
    let (model_ref, _) = tiny(&healing_corpus(), HEALING_VOCAB);
    let (index, _) = cache.acquire(&model_ref, &ids, 256).unwrap();
    let mut logits = cache.get_mut(index).extend(&model_ref, &ids).unwrap().i((0, 0)).unwrap();
    let mut reference = Vec::new();
    for _ in 0..64 {
        let row: Vec<f32> = logits.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        let next = m31r_model::sampling::argmax(&row);
        if tok.special_ids().contains(next) {
            break;
        }
        reference.push(next);
        logits = cache.get_mut(index).extend(&model_ref, &[next]).unwrap().i((0, 0)).unwrap();
    }
    assert_eq!(without, tok.decode(&reference).unwrap());
}

#[test]
fn recall_reads_the_file_beyond_the_prompts_window() {
    let (model, tok) = tiny(&healing_corpus(), HEALING_VOCAB);
    let engine = Engine::start(model, tok.clone(), EngineConfig::default());
    let line = "let total = values.iter().map(|v| v.len()).sum::<usize>();";
    // The line is far above the cursor, outside the 256-token context the prompt can hold.
    let filler: String = (0..120).map(|i| format!("    step_{i}(&mut state);\n")).collect();
    let prefix = format!("fn a() {{\n    {line}\n{filler}    let total");
    let max_tokens = 40;
    let kind = JobKind::Fim(fim(&prefix, "\n}\n"));
    let events = submit_with(&engine, kind, false, max_tokens);
    let budget = 256 - max_tokens as usize;
    let prompt = serving_prompt(
        &tok,
        &[],
        &prefix,
        "\n}\n",
        &FimBudget { max_prompt_tokens: budget, prefix_cut_step: 256, ..FimBudget::default() },
    )
    .unwrap();
    assert!(!tok.decode(&prompt.ids).unwrap().contains("values"), "the window holds the line");
    let (text, _) = client_text(&events);
    assert!(text.starts_with(" = values.iter().map(|v| v.len())"), "{text:?}");
}

#[test]
fn a_prefix_ending_in_whitespace_or_a_bracket_is_not_healed() {
    let (on, _) = healing_engine(true);
    let (off, _) = healing_engine(false);
    for prefix in ["use std::collections::HashMap;\nfn main(", "fn main() { let x = 1;\n    ", ""] {
        for kind in [JobKind::Complete { prompt: prefix.into() }, JobKind::Fim(fim(prefix, "}"))] {
            let a = without_timings(submit_with(&on, kind.clone(), false, 12));
            let b = without_timings(submit_with(&off, kind.clone(), false, 12));
            assert_eq!(a, b, "{kind:?}");
            assert_eq!(generated(&on), generated(&off), "{kind:?}");
        }
    }
}

#[test]
fn a_warmed_healed_prompt_is_reused_whole() {
    let (engine, _) = healing_engine(true);
    let input = fim("fn main() { let x = 1; }\nuse std::coll", "\n");
    let warmed = submit(&engine, JobKind::Warm(input.clone()), false);
    let (_, warm_usage) = client_text(&warmed);
    let (_, usage) = client_text(&submit(&engine, JobKind::Fim(input), false));
    assert_eq!(usage.prompt_tokens, warm_usage.prompt_tokens);
    // All but the last prompt token, whose logits the request needs, come from the cache.
    assert_eq!(usage.cached_tokens + 1, usage.prompt_tokens);
}

/// The `done` event's stop reason and confidence lines.
fn done_lines(events: &[Event]) -> (StopReason, Vec<m31r_protocol::LineConfidence>) {
    match events.last() {
        Some(Event::Done { stop, lines, .. }) => (*stop, lines.clone()),
        other => panic!("no done event: {other:?}"),
    }
}

/// The confidence invariants, for the text `text` the client received.
fn check_lines(what: &str, text: &str, lines: &[m31r_protocol::LineConfidence]) {
    if text.is_empty() {
        assert!(lines.is_empty(), "{what}: {lines:?}");
        return;
    }
    assert_eq!(lines.len(), text.split('\n').count(), "{what}: one entry per line of {text:?}");
    assert!(lines[0].tokens >= 1, "{what}: the first line has no token: {lines:?}");
    for line in lines {
        assert!(line.logprob_sum.is_finite() && line.logprob_min.is_finite(), "{what}: {line:?}");
        assert!(line.logprob_sum <= 0.0 && line.logprob_min <= 0.0, "{what}: {line:?}");
        if line.tokens == 0 {
            assert_eq!((line.logprob_sum, line.logprob_min), (0.0, 0.0), "{what}");
        } else {
            // The smallest is at most the mean.
            assert!(line.logprob_min <= line.mean() + 1e-12, "{what}: {line:?}");
            assert!(line.logprob_sum <= line.logprob_min + 1e-12, "{what}: {line:?}");
        }
    }
}

#[test]
fn done_reports_the_confidence_of_every_line_sent() {
    let engine = engine(EngineConfig::default());
    let (healing, _) = healing_engine(true);
    let cases = [
        (&engine, JobKind::Generate { prompt: "fn main() {".into() }, 48),
        (&engine, JobKind::Generate { prompt: "".into() }, 64),
        (&engine, JobKind::Generate { prompt: "}\n".into() }, 24),
        (&engine, JobKind::Generate { prompt: "fn main() { let x = 1; }\n".into() }, 24),
        (&engine, JobKind::Complete { prompt: "fn main() {\n    let".into() }, 32),
        (&engine, JobKind::Fim(fim("fn main() {\n    let x", "\n}\n")), 32),
        (
            &healing,
            JobKind::Complete { prompt: "fn main() { let x = 1; }\nuse std::coll".into() },
            24,
        ),
        (&healing, JobKind::Fim(fim("use std::coll", "")), 24),
    ];
    let mut multi_line = false;
    for (engine, kind, max_tokens) in cases {
        let what = format!("{kind:?}");
        let first = submit_with(engine, kind.clone(), false, max_tokens);
        let healed_only = engine.healed_only.load(Ordering::Relaxed) as u32;
        let (text, usage) = client_text(&first);
        let (stop, lines) = done_lines(&first);
        check_lines(&what, &text, &lines);
        multi_line |= lines.len() > 1;
        // Nothing withheld: every token that added text counts toward exactly one line.
        if matches!(stop, StopReason::MaxTokens | StopReason::EndOfText) {
            let counted: u32 = lines.iter().map(|l| l.tokens).sum();
            assert_eq!(counted, usage.completion_tokens - healed_only, "{what}: {lines:?}");
        }
        // Greedy is deterministic, confidence included. The second run is served from the
        // prefix cache, whose keys and values were computed in other chunks: equal up to float
        // rounding.
        let second = submit_with(engine, kind, false, max_tokens);
        assert_eq!(client_text(&second).0, text, "{what}");
        let (again_stop, again) = done_lines(&second);
        assert_eq!(again_stop, stop, "{what}");
        assert_close(&again, &lines, &what);
    }
    assert!(multi_line, "no case produced a multi-line completion");
}

#[test]
fn confidence_does_not_depend_on_sampling_parameters() {
    let engine = engine(EngineConfig::default());
    let run = |temperature: f32, top_k: u32| {
        let (tx, mut rx) = unbounded_channel();
        let params =
            GenerationParams { max_tokens: 1, temperature, top_k, seed: 3, ..Default::default() };
        let job = Job {
            id: "t".into(),
            kind: JobKind::Generate { prompt: "fn main() { let x".into() },
            params,
            cancel: Arc::new(AtomicBool::new(false)),
            events: tx,
            arrived: Instant::now(),
        };
        engine.submit(job).unwrap();
        let mut events = Vec::new();
        while let Some(e) = rx.blocking_recv() {
            let end = matches!(e, Event::Done { .. } | Event::Error { .. });
            events.push(e);
            if end {
                break;
            }
        }
        events
    };
    // top_k = 1 at any temperature picks the greedy token: its log-prob must not move with the
    // sampler's temperature.
    let greedy = run(0.0, 0);
    assert!(done_lines(&greedy).1[0].logprob_sum < 0.0, "{greedy:?}");
    for (temperature, top_k) in [(5.0, 1), (0.1, 1)] {
        let sampled = run(temperature, top_k);
        assert_eq!(client_text(&sampled).0, client_text(&greedy).0);
        assert_close(&done_lines(&sampled).1, &done_lines(&greedy).1, "sampled");
    }
}

/// Equal token counts, log-probs equal within float rounding.
fn assert_close(
    a: &[m31r_protocol::LineConfidence],
    b: &[m31r_protocol::LineConfidence],
    what: &str,
) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.tokens, y.tokens, "{what}: {a:?} vs {b:?}");
        for (p, q) in [(x.logprob_sum, y.logprob_sum), (x.logprob_min, y.logprob_min)] {
            assert!((p - q).abs() <= 1e-6 * (1.0 + q.abs()), "{what}: {a:?} vs {b:?}");
        }
    }
}

#[test]
fn the_same_request_on_the_same_state_gives_the_same_numbers() {
    let (a, b) = (engine(EngineConfig::default()), engine(EngineConfig::default()));
    let kind = JobKind::Fim(fim("fn main() {\n    let x", "\n}\n"));
    let first = without_timings(submit_with(&a, kind.clone(), false, 24));
    assert_eq!(without_timings(submit_with(&b, kind, false, 24)), first);
    assert!(!done_lines(&first).1.is_empty(), "{first:?}");
}

#[test]
fn greedy_decode_runs_send_what_one_pick_at_a_time_sends_and_cache_what_it_caches() {
    // Greedy requests decode in runs on the kernels' pool; `top_k = 1` at a temperature picks
    // the same tokens one step at a time on the engine's thread.
    let params = |top_k| GenerationParams {
        max_tokens: 60,
        temperature: if top_k == 0 { 0.0 } else { 0.7 },
        top_k,
        stop: vec!["\n\n\n".into()],
        ..Default::default()
    };
    let (runs, steps) = (engine(EngineConfig::default()), engine(EngineConfig::default()));
    let prompt = "fn main() { let x = 1; println!(\"{x}\"); }\nfn main() {";
    let kind = JobKind::Generate { prompt: prompt.into() };
    let greedy = without_timings(submit_params(&runs, kind.clone(), false, params(0)));
    let (text, usage) = client_text(&greedy);
    // Several runs of at most `MAX_DECODE_STEPS`, the last one cut short.
    assert!(
        usage.completion_tokens > 2 * m31r_model::transformer::MAX_DECODE_STEPS as u32,
        "{greedy:?}"
    );
    assert_eq!(without_timings(submit_params(&steps, kind, false, params(1))), greedy);

    // The runs cached what they forwarded: a request continuing the text reuses it and
    // decodes what a fresh engine decodes from the whole prompt (whose prefill sums in another
    // order: the log-probs agree to rounding).
    let kind = JobKind::Generate { prompt: format!("{prompt}{text}") };
    let fresh = engine(EngineConfig::default());
    let reference = submit_params(&fresh, kind.clone(), false, params(1));
    let continued = submit_params(&runs, kind, false, params(0));
    let ((text, usage), (reference_text, reference_usage)) =
        (client_text(&continued), client_text(&reference));
    assert!(usage.cached_tokens > usage.prompt_tokens / 2, "{usage:?} reused");
    assert_eq!(text, reference_text);
    assert_eq!(usage.completion_tokens, reference_usage.completion_tokens);
    assert_close(&done_lines(&continued).1, &done_lines(&reference).1, "continued");
}
