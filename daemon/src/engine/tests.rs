//! Tests of the engine: panic isolation, cancellation, the prompt cut and a full queue, on a
//! tiny random-weight model.

use candle_core::Device;
use m31r_model::{ModelConfig, RawModelConfig};
use tokio::sync::mpsc::unbounded_channel;

use super::*;

fn engine(config: EngineConfig) -> Engine {
    let text = "fn main() { let x = 1; println!(\"{x}\"); }\n".repeat(20);
    let tokenizer = Tokenizer::train([text].iter(), 300).unwrap();
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
    Engine::start(model, tokenizer, config)
}

fn submit(engine: &Engine, kind: JobKind, cancel: bool) -> Vec<Event> {
    let (tx, mut rx) = unbounded_channel();
    engine
        .submit(Job {
            id: "j".into(),
            kind,
            params: GenerationParams { max_tokens: 8, ..Default::default() },
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
                Event::Done { id, stop, usage, .. } => {
                    Event::Done { id, stop, usage, timings: Timings::default() }
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
