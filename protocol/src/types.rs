//! Message types: requests from clients, events from the daemon. These are boundary types: they
//! derive serde and are converted to engine types at the daemon's edge.

use serde::{Deserialize, Serialize};

/// A client-chosen request id, unique among the connection's in-flight requests.
pub type RequestId = String;

/// Everything a client can send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Version handshake; must be the first message on a connection.
    Hello {
        /// The client's [`crate::PROTOCOL_VERSION`].
        version: u32,
        /// Free-form client name, for logs.
        #[serde(default)]
        client: String,
    },
    /// Raw continuation of `prompt`: stops only at end-of-text, stop strings, limits.
    Generate {
        /// Request id.
        id: RequestId,
        /// Text to continue.
        prompt: String,
        /// Generation parameters.
        #[serde(default)]
        params: GenerationParams,
    },
    /// Code completion after `prompt` (a Rust prefix), with the Rust-aware stop rules.
    Complete {
        /// Request id.
        id: RequestId,
        /// Text before the cursor.
        prompt: String,
        /// Generation parameters.
        #[serde(default)]
        params: GenerationParams,
    },
    /// Fill-in-the-middle at the cursor between `prefix` and `suffix`, with Rust-aware stops.
    Fim {
        /// Request id.
        id: RequestId,
        /// The FIM input.
        #[serde(flatten)]
        input: FimInput,
        /// Generation parameters.
        #[serde(default)]
        params: GenerationParams,
    },
    /// Prefills a FIM prompt into the cache without generating (sent when a file opens).
    Warm {
        /// Request id.
        id: RequestId,
        /// The FIM input to prefill.
        #[serde(flatten)]
        input: FimInput,
        /// The `max_tokens` of the `fim` expected to follow: the prompt is cut to the budget
        /// that request will have, so it finds exactly this prompt cached (default: the
        /// generation parameters' default).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_tokens: Option<u32>,
    },
    /// Stops request `id` between tokens or prefill chunks; it ends with `done` (`cancelled`).
    Cancel {
        /// Id of the request to stop.
        id: RequestId,
    },
    /// Asks for an [`Event::Status`].
    Status {
        /// Request id.
        id: RequestId,
    },
    /// Asks the daemon to finish in-flight work and exit.
    Shutdown {
        /// Request id.
        id: RequestId,
    },
}

impl Request {
    /// The request's id (`None` for `hello`).
    pub fn id(&self) -> Option<&str> {
        match self {
            Request::Hello { .. } => None,
            Request::Generate { id, .. }
            | Request::Complete { id, .. }
            | Request::Fim { id, .. }
            | Request::Warm { id, .. }
            | Request::Cancel { id }
            | Request::Status { id }
            | Request::Shutdown { id } => Some(id),
        }
    }
}

/// Text around the cursor, plus other files for context.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FimInput {
    /// Text before the cursor.
    pub prefix: String,
    /// Text after the cursor.
    #[serde(default)]
    pub suffix: String,
    /// Other files, least relevant first; they go before the FIM block.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context_files: Vec<ContextFile>,
}

/// One context file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextFile {
    /// Workspace-relative path.
    pub path: String,
    /// Its text.
    pub text: String,
}

/// How to generate. Every field has a default; greedy decoding is deterministic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationParams {
    /// Most tokens to generate (1..=4096).
    pub max_tokens: u32,
    /// 0 = greedy (default).
    pub temperature: f32,
    /// 0 = no limit.
    pub top_k: u32,
    /// 1 = no limit.
    pub top_p: f32,
    /// Sampling seed.
    pub seed: u64,
    /// Stop before any of these strings (at most 8, each 1..=64 bytes).
    pub stop: Vec<String>,
    /// Give up generating after this many milliseconds from arrival (0 = no deadline).
    pub deadline_ms: u64,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            deadline_ms: 0,
        }
    }
}

/// Everything the daemon sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// Answer to `hello`.
    Hello {
        /// The daemon's protocol version.
        version: u32,
        /// Daemon name and version.
        daemon: String,
        /// The loaded model.
        model: ModelInfo,
    },
    /// A piece of generated text (always whole UTF-8 characters).
    Token {
        /// Request id.
        id: RequestId,
        /// The new text.
        text: String,
        /// The confidence so far of the lines this piece adds to: the line it starts in, then
        /// one more for each newline in it (docs/protocol.md, "Confidence"). An entry is final
        /// once its line has ended; `done` repeats every line's final value.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        lines: Vec<LineConfidence>,
    },
    /// The request finished; exactly one per request unless it ended with `error`.
    Done {
        /// Request id.
        id: RequestId,
        /// Why generation ended.
        stop: StopReason,
        /// Token counts.
        usage: Usage,
        /// Where the time went.
        timings: Timings,
        /// The model's confidence in each line of the text sent, first line first (see
        /// [`LineConfidence`]); empty when no text was sent.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        lines: Vec<LineConfidence>,
    },
    /// The request (or, with no id, the frame) failed; the connection stays usable.
    Error {
        /// Request id, when the failing frame had one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        /// Machine-readable cause.
        code: ErrorCode,
        /// Human-readable cause naming the problem.
        message: String,
    },
    /// Answer to `status`.
    Status {
        /// Request id.
        id: RequestId,
        /// The report.
        #[serde(flatten)]
        status: DaemonStatus,
    },
    /// Answer to `shutdown`, sent before the daemon stops.
    ShuttingDown {
        /// Request id.
        id: RequestId,
    },
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced end-of-text or a FIM control token.
    EndOfText,
    /// `max_tokens` reached.
    MaxTokens,
    /// `deadline_ms` passed.
    Deadline,
    /// A stop string was produced (it is not included).
    StopString,
    /// A line dedented below the cursor's block.
    Dedent,
    /// A closing brace the suffix already provides.
    ClosingBrace,
    /// A blank line at item level.
    BlankLine,
    /// The context window is full.
    ContextFull,
    /// The client cancelled it.
    Cancelled,
    /// A `warm` request finished prefilling.
    Warmed,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// Tokens in the (possibly truncated) prompt.
    pub prompt_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// The model's confidence in one line of a completion: the natural-log probabilities, under the
/// model's plain softmax (temperature 1, whatever the sampling parameters), of the generated
/// tokens that count toward the line.
///
/// A token counts toward the line holding the first byte it adds to the text sent; a line's own
/// `\n` belongs to it. Tokens that add no sent byte — those that only retype the client's healed
/// text, and those whose text a stop rule withheld — count toward no line. A line made entirely
/// of bytes of tokens that started on an earlier line has `tokens: 0` and both log-probs 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineConfidence {
    /// Tokens counting toward this line.
    pub tokens: u32,
    /// Sum of their log-probabilities (≤ 0; 0 when `tokens` is 0).
    pub logprob_sum: f64,
    /// The smallest of them (≤ 0; 0 when `tokens` is 0).
    pub logprob_min: f64,
}

impl LineConfidence {
    /// Mean log-probability per token (0 for a line without tokens): the geometric mean of the
    /// tokens' probabilities is its exponential.
    pub fn mean(&self) -> f64 {
        if self.tokens == 0 { 0.0 } else { self.logprob_sum / f64::from(self.tokens) }
    }

    /// Adds one token's log-probability.
    pub fn add(&mut self, logprob: f64) {
        self.logprob_min = if self.tokens == 0 { logprob } else { self.logprob_min.min(logprob) };
        self.logprob_sum += logprob;
        self.tokens += 1;
    }
}

/// Where one request's time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timings {
    /// Waiting for the engine.
    pub queue_ms: f64,
    /// Evaluating the uncached prompt tokens.
    pub prefill_ms: f64,
    /// Generating.
    pub decode_ms: f64,
    /// Arrival to done.
    pub total_ms: f64,
}

/// Machine-readable error causes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not valid JSON, or not a known message shape.
    BadRequest,
    /// The frame exceeded [`crate::MAX_FRAME_BYTES`].
    FrameTooLarge,
    /// The frame is not valid UTF-8.
    InvalidUtf8,
    /// The first message was not `hello`, or the version differs.
    VersionMismatch,
    /// A parameter is out of range.
    InvalidParams,
    /// The id is already in flight on this connection.
    DuplicateId,
    /// The prompt cannot fit the context window.
    ContextOverflow,
    /// The engine's queue is full; retry later.
    Overloaded,
    /// The daemon is shutting down.
    ShuttingDown,
    /// A bug; the daemon keeps serving.
    Internal,
}

/// The loaded model, as told in `hello`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// `metadata.json`'s model version.
    pub version: String,
    /// Trainable parameters.
    pub parameters: u64,
    /// Context window in tokens.
    pub context_length: u32,
    /// Weight precision (`f32`, `f16`).
    pub precision: String,
}

/// Daemon state, as told in `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonStatus {
    /// The loaded model.
    pub model: ModelInfo,
    /// Seconds since start.
    pub uptime_s: f64,
    /// Open connections.
    pub connections: u32,
    /// Jobs waiting for the engine.
    pub queued: u32,
    /// Sequences in the prefix cache.
    pub cache_entries: u32,
    /// Tokens held by the prefix cache.
    pub cache_tokens: u64,
    /// Bytes allocated by the prefix cache.
    pub cache_bytes: u64,
    /// The cache's memory budget.
    pub cache_budget_bytes: u64,
    /// Resident memory of the daemon.
    pub resident_bytes: u64,
    /// Requests completed (any outcome).
    pub requests: u64,
    /// Of which cancelled.
    pub cancelled: u64,
    /// Of which failed.
    pub errors: u64,
    /// Prompt tokens served from cache, over all requests.
    pub cached_tokens: u64,
    /// Prompt tokens evaluated, over all requests.
    pub prefilled_tokens: u64,
    /// Tokens generated, over all requests.
    pub generated_tokens: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_unknown_keys() {
        let fim: Request = serde_json::from_str(
            r#"{"type":"fim","id":"7","prefix":"fn a() {","suffix":"}","params":{"max_tokens":8}}"#,
        )
        .unwrap();
        let Request::Fim { id, input, params } = &fim else { panic!("{fim:?}") };
        assert_eq!((id.as_str(), input.suffix.as_str(), params.max_tokens), ("7", "}", 8));
        assert_eq!(params.temperature, 0.0);
        let text = serde_json::to_string(&fim).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), fim);
        for bad in [
            r#"{"type":"generate","id":"1","prompt":"x","bogus":1}"#,
            r#"{"type":"generate","id":"1","prompt":"x","params":{"max_token":3}}"#,
            r#"{"type":"teleport","id":"1"}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn done_without_lines_parses_and_omits_them() {
        let text = r#"{"type":"done","id":"1","stop":"warmed","usage":{"prompt_tokens":1,"cached_tokens":0,"completion_tokens":0},"timings":{"queue_ms":0.0,"prefill_ms":0.0,"decode_ms":0.0,"total_ms":0.0}}"#;
        let done: Event = serde_json::from_str(text).unwrap();
        assert!(matches!(&done, Event::Done { lines, .. } if lines.is_empty()), "{done:?}");
        assert_eq!(serde_json::to_string(&done).unwrap(), text);
        let bad = text.replace(
            "}}",
            r#"},"lines":[{"tokens":1,"logprob_sum":0.0,"logprob_min":0.0,"x":1}]}"#,
        );
        assert!(serde_json::from_str::<Event>(&bad).is_err(), "{bad}");
    }

    #[test]
    fn line_confidence_accumulates() {
        let mut line = LineConfidence::default();
        assert_eq!(line.mean(), 0.0);
        for lp in [-0.5, -2.0, -0.1] {
            line.add(lp);
        }
        assert_eq!(line.tokens, 3);
        assert_eq!(line.logprob_min, -2.0);
        assert!((line.mean() - (-2.6 / 3.0)).abs() < 1e-12);
    }

    #[test]
    fn events_round_trip() {
        let events = [
            Event::Token { id: "1".into(), text: "let".into(), lines: Vec::new() },
            Event::Token {
                id: "1".into(),
                text: " x\n".into(),
                lines: vec![
                    LineConfidence { tokens: 2, logprob_sum: -0.5, logprob_min: -0.375 },
                    LineConfidence::default(),
                ],
            },
            Event::Done {
                id: "1".into(),
                stop: StopReason::MaxTokens,
                usage: Usage { prompt_tokens: 3, cached_tokens: 2, completion_tokens: 1 },
                timings: Timings::default(),
                lines: vec![LineConfidence { tokens: 1, logprob_sum: -0.25, logprob_min: -0.25 }],
            },
            Event::Done {
                id: "2".into(),
                stop: StopReason::Cancelled,
                usage: Usage::default(),
                timings: Timings::default(),
                lines: Vec::new(),
            },
            Event::Error { id: None, code: ErrorCode::FrameTooLarge, message: "big".into() },
            Event::Status { id: "s".into(), status: DaemonStatus::default() },
        ];
        for e in events {
            let text = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), e, "{text}");
        }
    }
}
