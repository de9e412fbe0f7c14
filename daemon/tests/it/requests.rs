//! Requests against a live daemon: streaming, prefix reuse, determinism, cancellation, bad input,
//! and load.

use std::time::Duration;

use m31r_model::Bundle;
use m31r_model::fim::{FimBudget, serving_prompt};
use m31r_protocol::{
    Client, ErrorCode, Event, GenerationParams, PROTOCOL_VERSION, Request, StopReason,
};

use crate::common::{Daemon, bundle, fim, generate, long_prompt, run};

const PREFIX: &str = "use std::collections::HashMap;\n\npub fn count(words: &[&str]) -> HashMap<String, usize> {\n    let mut map = HashMap::new();\n    for w in words {\n        ";
const SUFFIX: &str = "\n    }\n    map\n}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_streams_tokens_then_exactly_one_done() {
    let daemon = Daemon::start(&[]);
    let mut client = daemon.client().await;
    for request in [generate("g1", "fn main() {", 12), fim("f1", PREFIX, SUFFIX, 12)] {
        let id = request.id().unwrap().to_string();
        client.send(&request).await.unwrap();
        let (mut tokens, mut dones) = (0, 0);
        // Events of one request arrive in order; a status reply after it proves nothing follows.
        loop {
            match client.next_event().await.unwrap().unwrap() {
                Event::Token { id: eid, .. } if eid == id => {
                    assert_eq!(dones, 0, "token after done");
                    tokens += 1;
                }
                Event::Done { id: eid, usage, timings, .. } if eid == id => {
                    dones += 1;
                    assert!(usage.prompt_tokens > 0 && timings.total_ms > 0.0);
                    client.send(&Request::Status { id: "s".into() }).await.unwrap();
                }
                Event::Status { .. } => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(tokens >= 1, "{id}: no token events");
        assert_eq!(dones, 1);
    }
}

/// The SPM prompt the daemon builds for this request, for computing shared prefixes.
fn prompt_ids(prefix: &str, suffix: &str, max_tokens: usize) -> Vec<u32> {
    let bundle = Bundle::open(bundle()).unwrap();
    let budget = FimBudget {
        max_prompt_tokens: bundle.config().context_length() - max_tokens,
        ..FimBudget::default()
    };
    serving_prompt(bundle.tokenizer(), &[], prefix, suffix, &budget).unwrap().ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reuses_the_cached_prefix_and_matches_a_cold_daemon() {
    let warm = Daemon::start(&[]);
    let cold = Daemon::start(&[]);
    let mut client = warm.client().await;
    let first = run(&mut client, fim("1", PREFIX, SUFFIX, 16)).await;
    assert_eq!(first.usage.cached_tokens, 0);
    let typed = format!("{PREFIX}*map");
    let second = run(&mut client, fim("2", &typed, SUFFIX, 16)).await;

    let (a, b) = (prompt_ids(PREFIX, SUFFIX, 16), prompt_ids(&typed, SUFFIX, 16));
    let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count().min(b.len() - 1);
    assert!(
        second.usage.cached_tokens as usize >= shared,
        "cached {} < shared prefix {shared}",
        second.usage.cached_tokens
    );
    // `typed` ends inside the identifier `map`: token healing (on by default) drops its last
    // token from the prompt; everything before it is the same prompt, so the cache still holds.
    let healed = b.len() - 1;
    assert_eq!(second.usage.prompt_tokens as usize, healed);

    let reference = run(&mut cold.client().await, fim("c", &typed, SUFFIX, 16)).await;
    assert_eq!(second.text, reference.text, "warm and cold outputs differ");
    assert_eq!(second.usage.completion_tokens, reference.usage.completion_tokens);

    // The exact same prompt again is served almost entirely from cache, with the same output.
    let again = run(&mut client, fim("3", &typed, SUFFIX, 16)).await;
    assert_eq!(again.usage.cached_tokens as usize, healed - 1);
    assert_eq!(again.text, reference.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_prefills_so_the_next_request_is_cached() {
    let daemon = Daemon::start(&[]);
    let mut client = daemon.client().await;
    let input = m31r_protocol::FimInput {
        prefix: PREFIX.into(),
        suffix: SUFFIX.into(),
        ..Default::default()
    };
    let warm = Request::Warm { id: "w".into(), input, max_tokens: Some(8) };
    let warmed = run(&mut client, warm).await;
    assert_eq!((warmed.stop, warmed.tokens), (StopReason::Warmed, 0));
    // Cut to the same budget as the fim it prepares: everything but the last prompt token (whose
    // logits the fim needs) comes from the cache.
    let next = run(&mut client, fim("n", PREFIX, SUFFIX, 8)).await;
    assert_eq!(next.usage.cached_tokens + 1, next.usage.prompt_tokens, "{next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_generation_and_leaves_the_cache_sound() {
    let daemon = Daemon::start(&[]);
    let cold = Daemon::start(&[]);
    let prompt = long_prompt();
    let mut client = daemon.client().await;
    let request = generate("long", &prompt, 400);
    client.send(&request).await.unwrap();
    let mut seen = 0u32;
    let done = loop {
        match client.next_event().await.unwrap().unwrap() {
            Event::Token { .. } => {
                seen += 1;
                if seen == 1 {
                    client.send(&Request::Cancel { id: "long".into() }).await.unwrap();
                }
            }
            done @ Event::Done { .. } => break done,
            other => panic!("unexpected {other:?}"),
        }
    };
    let Event::Done { stop, usage, .. } = done else { unreachable!() };
    assert_eq!(stop, StopReason::Cancelled);
    // Tokens already decoded while the cancel was in flight may still arrive; no more than that.
    assert!(
        usage.completion_tokens <= seen + 2,
        "{} tokens generated, {seen} seen",
        usage.completion_tokens
    );
    assert!(usage.completion_tokens < 400);

    // The cache holds the cancelled sequence; the next request (same prompt and budget, so the
    // same truncation) must reuse it and still equal a cold run.
    let after = run(&mut client, generate("after", &prompt, 400)).await;
    let reference = run(&mut cold.client().await, generate("ref", &prompt, 400)).await;
    assert!(after.usage.cached_tokens > 0);
    assert_eq!(after.text, reference.text);

    // Cancelling an unknown or finished request is ignored.
    client.send(&Request::Cancel { id: "nope".into() }).await.unwrap();
    let status = client.run(&Request::Status { id: "s".into() }, |_| {}).await.unwrap();
    assert!(matches!(status, Event::Status { .. }), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_cancels_its_requests() {
    let daemon = Daemon::start(&[]);
    let mut client = daemon.client().await;
    client.send(&generate("doomed", &long_prompt(), 400)).await.unwrap();
    assert!(matches!(client.next_event().await.unwrap(), Some(Event::Token { .. })));
    drop(client);

    let mut observer = daemon.client().await;
    let mut cancelled = 0;
    for _ in 0..200 {
        if let Event::Status { status, .. } =
            observer.run(&Request::Status { id: "s".into() }, |_| {}).await.unwrap()
        {
            cancelled = status.cancelled;
            if cancelled >= 1 {
                assert_eq!(status.requests, 1);
                assert!(status.generated_tokens < 400);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cancelled, 1, "the dropped request was not cancelled");
}

async fn expect_error(client: &mut Client, raw: &[u8], code: ErrorCode, mentions: &str) {
    client.send_raw(raw).await.unwrap();
    match client.next_event().await.unwrap().unwrap() {
        Event::Error { code: got, message, .. } => {
            assert_eq!(got, code, "{message}");
            assert!(message.contains(mentions), "{message:?} should mention {mentions:?}");
        }
        other => panic!("expected an error for {:?}, got {other:?}", String::from_utf8_lossy(raw)),
    }
    // The connection is still usable.
    let status = client.run(&Request::Status { id: "alive".into() }, |_| {}).await.unwrap();
    assert!(matches!(status, Event::Status { .. }), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_named_error_and_the_connection_survives() {
    let daemon = Daemon::start(&[("M31R_MAX_FRAME_BYTES", "4096")]);

    // Before hello, and with the wrong version.
    let mut raw = Client::connect_raw(&daemon.socket).await.unwrap();
    raw.send_raw(b"{\"type\":\"status\",\"id\":\"x\"}\n").await.unwrap();
    let first = raw.next_event().await.unwrap().unwrap();
    assert!(matches!(first, Event::Error { code: ErrorCode::VersionMismatch, .. }), "{first:?}");
    raw.send_raw(b"{\"type\":\"hello\",\"version\":99}\n").await.unwrap();
    let Event::Error { code, message, .. } = raw.next_event().await.unwrap().unwrap() else {
        panic!()
    };
    assert_eq!(code, ErrorCode::VersionMismatch);
    assert!(message.contains("99"), "{message}");
    // A client of the previous version (before `done` carried confidence) is refused by name,
    // not answered in a shape it cannot read.
    let old = PROTOCOL_VERSION - 1;
    raw.send_raw(format!("{{\"type\":\"hello\",\"version\":{old}}}\n").as_bytes()).await.unwrap();
    let Event::Error { id, code, message } = raw.next_event().await.unwrap().unwrap() else {
        panic!()
    };
    assert_eq!((id, code), (None, ErrorCode::VersionMismatch));
    assert!(
        message.contains(&format!("client speaks protocol {old}, daemon {PROTOCOL_VERSION}")),
        "{message}"
    );
    // The connection waits for a good hello.
    raw.send_raw(format!("{{\"type\":\"hello\",\"version\":{PROTOCOL_VERSION}}}\n").as_bytes())
        .await
        .unwrap();
    let hello = raw.next_event().await.unwrap().unwrap();
    assert!(
        matches!(hello, Event::Hello { version, .. } if version == PROTOCOL_VERSION),
        "{hello:?}"
    );

    let mut client = daemon.client().await;
    expect_error(&mut client, b"{not json\n", ErrorCode::BadRequest, "bad request").await;
    expect_error(
        &mut client,
        b"{\"type\":\"teleport\",\"id\":\"t\"}\n",
        ErrorCode::BadRequest,
        "teleport",
    )
    .await;
    expect_error(&mut client, b"\xff\xfe{}\n", ErrorCode::InvalidUtf8, "UTF-8").await;
    let mut huge =
        format!("{{\"type\":\"generate\",\"id\":\"h\",\"prompt\":\"{}\"}}", "x".repeat(10_000))
            .into_bytes();
    huge.push(b'\n');
    expect_error(&mut client, &huge, ErrorCode::FrameTooLarge, "4096").await;
    for (params, field) in [
        (r#"{"max_tokens":0}"#, "max_tokens"),
        (r#"{"max_tokens":100000}"#, "max_tokens"),
        (r#"{"temperature":-1}"#, "temperature"),
        (r#"{"top_p":2}"#, "top_p"),
        (r#"{"stop":["a","b","c","d","e","f","g","h","i"]}"#, "stop"),
        (r#"{"stop":[""]}"#, "stop"),
    ] {
        let frame = format!(
            "{{\"type\":\"generate\",\"id\":\"p\",\"prompt\":\"fn\",\"params\":{params}}}\n"
        );
        expect_error(&mut client, frame.as_bytes(), ErrorCode::InvalidParams, field).await;
    }
    let frame =
        b"{\"type\":\"generate\",\"id\":\"p\",\"prompt\":\"fn\",\"params\":{\"max_tokens\":600}}\n";
    expect_error(&mut client, frame, ErrorCode::ContextOverflow, "max_tokens").await;

    // The daemon keeps serving new connections.
    let outcome = run(&mut daemon.client().await, generate("ok", "fn main() {", 4)).await;
    assert!(outcome.usage.completion_tokens >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ids_in_flight_are_refused() {
    let daemon = Daemon::start(&[]);
    let mut client = daemon.client().await;
    client.send(&generate("same", &long_prompt(), 400)).await.unwrap();
    client.send(&generate("same", "fn", 4)).await.unwrap();
    let mut saw_duplicate = false;
    loop {
        match client.next_event().await.unwrap().unwrap() {
            Event::Error { code: ErrorCode::DuplicateId, .. } => {
                saw_duplicate = true;
                client.send(&Request::Cancel { id: "same".into() }).await.unwrap();
            }
            Event::Done { stop, .. } => {
                // The refusal must not have unregistered the running request: the cancel works.
                assert_eq!(stop, StopReason::Cancelled);
                break;
            }
            _ => {}
        }
    }
    assert!(saw_duplicate);
}

/// 32 clients × 50 requests with random cancels and disconnects: every request is answered or
/// cancelled, nothing panics, and resident memory returns to within 10% of where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_with_random_cancels_and_disconnects() {
    if std::env::var_os("M31R_SLOW_TESTS").is_none() {
        eprintln!("skipped: set M31R_SLOW_TESTS=1");
        return;
    }
    let daemon = Daemon::start(&[]);
    let mut observer = daemon.client().await;
    // Warm up allocator and caches with the same mix, then take the baseline.
    clients(&daemon, 32, 5, 1).await;
    let before = status(&mut observer).await;
    let (answered, cancelled, dropped) = clients(&daemon, 32, 50, 2).await;
    assert_eq!(answered + cancelled + dropped, 32 * 50);
    let mut after = status(&mut observer).await;
    for _ in 0..100 {
        if after.queued == 0 && after.connections == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = status(&mut observer).await;
    }
    assert_eq!(after.errors, 0, "requests failed: {}", daemon.log());
    assert!(
        cancelled > 0 && dropped > 0,
        "the mix must exercise cancels ({cancelled}) and drops ({dropped})"
    );
    let growth = after.resident_bytes as f64 / before.resident_bytes as f64;
    eprintln!(
        "load: {answered} answered, {cancelled} cancelled, {dropped} dropped; resident {} -> {} MiB ({growth:.3}×)",
        before.resident_bytes >> 20,
        after.resident_bytes >> 20
    );
    assert!(growth <= 1.10, "resident memory grew {growth:.3}×");
    assert!(daemon.log().find("panicked").is_none(), "{}", daemon.log());
}

async fn status(client: &mut Client) -> m31r_protocol::DaemonStatus {
    match client.run(&Request::Status { id: "s".into() }, |_| {}).await.unwrap() {
        Event::Status { status, .. } => status,
        other => panic!("{other:?}"),
    }
}

/// Runs `n` clients doing `per_client` requests each; returns (answered, cancelled, dropped).
async fn clients(daemon: &Daemon, n: usize, per_client: usize, seed: u64) -> (usize, usize, usize) {
    let mut tasks = Vec::new();
    for c in 0..n {
        let socket = daemon.socket.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = m31r_model::rng::Rng::new(seed * 1000 + c as u64);
            let mut counts = (0, 0, 0);
            let mut client = Client::connect(&socket, "load").await.unwrap().0;
            for r in 0..per_client {
                let id = format!("{c}-{r}");
                let prompt =
                    &crate::common::CORPUS[rng.below(3) as usize][..20 + rng.below(40) as usize];
                let params =
                    GenerationParams { max_tokens: 1 + rng.below(24) as u32, ..Default::default() };
                client
                    .send(&Request::Complete { id: id.clone(), prompt: prompt.into(), params })
                    .await
                    .unwrap();
                match rng.below(10) {
                    0 => {
                        // Disconnect mid-request; the daemon must cancel it and carry on.
                        drop(client);
                        client = Client::connect(&socket, "load").await.unwrap().0;
                        counts.2 += 1;
                        continue;
                    }
                    1 | 2 => client.send(&Request::Cancel { id: id.clone() }).await.unwrap(),
                    _ => {}
                }
                loop {
                    match client.next_event().await.unwrap().unwrap() {
                        Event::Done { id: eid, stop, .. } if eid == id => {
                            if stop == StopReason::Cancelled {
                                counts.1 += 1
                            } else {
                                counts.0 += 1
                            }
                            break;
                        }
                        Event::Error { id: Some(eid), code, message } if eid == id => {
                            panic!("request {id} failed: {code:?} {message}")
                        }
                        Event::Token { id: eid, .. } => assert_eq!(eid, id),
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            counts
        }));
    }
    let mut total = (0, 0, 0);
    for t in tasks {
        let (a, b, c) = t.await.unwrap();
        total = (total.0 + a, total.1 + b, total.2 + c);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn done_carries_the_confidence_of_each_line_sent() {
    let daemon = Daemon::start(&[]);
    let mut client = daemon.client().await;
    let outcome = run(&mut client, generate("g", "fn main() {\n", 48)).await;
    let again = run(&mut client, generate("g2", "fn main() {\n", 48)).await;
    for (name, o) in [("first", &outcome), ("again", &again)] {
        if o.text.is_empty() {
            assert!(o.lines.is_empty(), "{name}: {o:?}");
            continue;
        }
        assert_eq!(o.lines.len(), o.text.split('\n').count(), "{name}: {o:?}");
        let counted: u32 = o.lines.iter().map(|l| l.tokens).sum();
        // `generate` is not healed and has no code stop rules: every token counts.
        if matches!(o.stop, StopReason::MaxTokens | StopReason::EndOfText) {
            assert_eq!(counted, o.usage.completion_tokens, "{name}: {o:?}");
        }
        for line in &o.lines {
            assert!(line.logprob_sum <= 0.0 && line.logprob_sum.is_finite(), "{name}: {line:?}");
            assert!(line.logprob_min <= line.mean() + 1e-12, "{name}: {line:?}");
        }
    }
    assert_eq!(outcome.text, again.text);
    assert_eq!(outcome.lines.len(), again.lines.len());
    for (a, b) in outcome.lines.iter().zip(&again.lines) {
        assert_eq!(a.tokens, b.tokens);
        assert!((a.logprob_sum - b.logprob_sum).abs() <= 1e-6 * (1.0 + b.logprob_sum.abs()));
    }
}
