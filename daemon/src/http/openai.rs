//! The OpenAI-compatible endpoints: `/v1/completions` (with `suffix` for fill-in-the-middle),
//! `/v1/chat/completions` (messages flattened into a code prompt) and `/v1/models`. Requests are
//! translated into engine jobs; answers into OpenAI's `text_completion`, `chat.completion` and
//! `chat.completion.chunk` shapes. Fields OpenAI defines but M31R cannot honour are accepted only
//! at their neutral value and refused otherwise, naming the field; unknown fields are refused.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use m31r_protocol::{FimInput, GenerationParams, StopReason, Usage};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::errors::{ApiError, json_response};
use super::run::FinishedChoice;
use super::serving::ApiJson;
use super::sse::{Chunks, sse};
use super::{Api, MAX_CHOICES, unix_now};
use crate::engine::JobKind;
use stream::{ChatChunks, ChunkStream, CompletionChunks};

mod stream;

/// `max_tokens` of a completion that gives none (OpenAI's default).
const DEFAULT_COMPLETION_TOKENS: u32 = 16;
/// `max_tokens` of a chat completion that gives none, at most half the context.
const DEFAULT_CHAT_TOKENS: u32 = 256;

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Body of `POST /v1/completions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CompletionRequest {
    /// Ignored: the daemon serves one model, whatever it is called.
    #[allow(dead_code)]
    model: Option<String>,
    /// A string or a list of strings.
    prompt: Value,
    /// Present ⇒ fill-in-the-middle between `prompt` and `suffix`.
    suffix: Option<String>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// M31R extension: sample among the k likeliest tokens (0 = no limit).
    top_k: Option<u32>,
    stop: Option<Stop>,
    n: Option<u32>,
    seed: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    echo: Option<bool>,
    logprobs: Option<Value>,
    best_of: Option<u32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    /// Ignored (OpenAI uses it for abuse monitoring).
    #[allow(dead_code)]
    user: Option<String>,
}

/// Body of `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ChatRequest {
    /// Ignored: the daemon serves one model.
    #[allow(dead_code)]
    model: Option<String>,
    messages: Vec<Message>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// M31R extension, as for completions.
    top_k: Option<u32>,
    stop: Option<Stop>,
    n: Option<u32>,
    seed: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    /// Ignored.
    #[allow(dead_code)]
    user: Option<String>,
}

/// One chat message. Fields a client may echo back from an earlier answer are accepted when
/// empty.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    /// A string, a list of `{"type":"text","text":…}` parts, or null.
    #[serde(default)]
    content: Value,
    /// Ignored.
    #[allow(dead_code)]
    name: Option<String>,
    refusal: Option<Value>,
    tool_calls: Option<Value>,
    function_call: Option<Value>,
    audio: Option<Value>,
    annotations: Option<Value>,
}

/// What both endpoints share once parsed.
struct Sampling {
    /// Answered as a stream of chunks.
    stream: bool,
    /// A stream ends with a usage chunk.
    include_usage: bool,
    max_tokens: u32,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    stop: Option<Stop>,
    n: Option<u32>,
    seed: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<serde_json::Map<String, Value>>,
}

/// The [`Sampling`] of request `$request`, a completion or chat body: OpenAI names these fields
/// alike in both. A macro, as the bodies are two types, and `#[serde(flatten)]` cannot give them
/// one shared part: it does not combine with `deny_unknown_fields`.
macro_rules! sampling {
    ($request:ident, $max_tokens:expr) => {
        Sampling {
            stream: $request.stream.unwrap_or(false),
            include_usage: $request.stream_options.unwrap_or_default().include_usage,
            max_tokens: $max_tokens,
            temperature: $request.temperature,
            top_p: $request.top_p,
            top_k: $request.top_k,
            stop: $request.stop,
            n: $request.n,
            seed: $request.seed,
            presence_penalty: $request.presence_penalty,
            frequency_penalty: $request.frequency_penalty,
            logit_bias: $request.logit_bias,
        }
    };
}

impl Sampling {
    /// The number of choices per prompt, after refusing what cannot be honoured.
    fn check(&self, prompts: usize) -> Result<usize, ApiError> {
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(unsupported(name, "only 0 is supported"));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(unsupported("logit_bias", "only an empty map is supported"));
        }
        let n = self.n.unwrap_or(1) as usize;
        if n == 0 || n * prompts > MAX_CHOICES {
            return Err(ApiError::bad_request(format!(
                "n = {n} with {prompts} prompt(s) asks for {} completions; 1..={MAX_CHOICES} are served",
                n * prompts
            ))
            .param("n"));
        }
        Ok(n)
    }

    /// The engine parameters of choice `choice` of a prompt: each choice samples with its own
    /// seed (`seed + choice`), so with a temperature they differ and stay reproducible.
    fn params(&self, choice: usize) -> GenerationParams {
        let defaults = GenerationParams::default();
        GenerationParams {
            max_tokens: self.max_tokens,
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            seed: self.seed.unwrap_or(defaults.seed).wrapping_add(choice as u64),
            stop: match &self.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.clone(),
            },
            deadline_ms: 0,
        }
    }
}

fn unsupported(param: &'static str, why: &str) -> ApiError {
    ApiError::bad_request(format!("{param} is not supported by m31rd: {why}")).param(param)
}

/// The job id of choice `index` of `total` in response `id`.
fn job_id(id: &str, index: usize, total: usize) -> String {
    if total == 1 { id.to_owned() } else { format!("{id}.{index}") }
}

/// OpenAI's `finish_reason` for a stop reason: `length` when a limit cut the text short.
fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens | StopReason::ContextFull | StopReason::Deadline => "length",
        _ => "stop",
    }
}

/// OpenAI's `usage`, with the prefix cache's share of the prompt.
#[derive(Debug, Default, Serialize)]
struct OpenAiUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    prompt_tokens_details: PromptDetails,
}

#[derive(Debug, Default, Serialize)]
struct PromptDetails {
    cached_tokens: u32,
}

impl OpenAiUsage {
    /// Adds choice `index`'s usage; each prompt counts once, for its first choice.
    fn add(&mut self, index: usize, n: usize, usage: &Usage) {
        if index.is_multiple_of(n) {
            self.prompt_tokens += usage.prompt_tokens;
            self.prompt_tokens_details.cached_tokens += usage.cached_tokens;
        }
        self.completion_tokens += usage.completion_tokens;
        self.total_tokens = self.prompt_tokens + self.completion_tokens;
    }
}

/// A `text_completion`, `chat.completion` or `chat.completion.chunk` object: they differ only in
/// their choices.
#[derive(Debug, Serialize)]
struct Completion<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<OpenAiUsage>,
}

/// What the two generating endpoints answer differently: their objects' names and choices.
struct Answer<K, C> {
    /// `object` of a whole answer.
    object: &'static str,
    /// `object` of a stream's chunks.
    chunk_object: &'static str,
    /// A stream's chunks for `n` choices, around what both streams share.
    chunks: fn(ChunkStream, usize) -> K,
    /// Choice `index` of a whole answer.
    choice: fn(usize, FinishedChoice) -> C,
}

impl<K: Chunks, C: Serialize> Answer<K, C> {
    /// Starts the `jobs` of request `id` and answers them: as a stream when the request asked
    /// for one, else as one document with every choice and the usage summed over them.
    async fn send(
        self,
        api: &Api,
        id: String,
        jobs: Vec<(String, JobKind, GenerationParams)>,
        sampling: &Sampling,
        n: usize,
    ) -> Result<Response, ApiError> {
        let run = api.start(jobs)?;
        let created = unix_now();
        if sampling.stream {
            let stream =
                ChunkStream::new(id, self.chunk_object, created, api, n, sampling.include_usage);
            return sse(run, (self.chunks)(stream, n)).await;
        }
        let mut usage = OpenAiUsage::default();
        let choices = run
            .finish()
            .await?
            .into_iter()
            .enumerate()
            .map(|(index, f)| {
                usage.add(index, n, &f.usage);
                (self.choice)(index, f)
            })
            .collect();
        let body = Completion {
            id: &id,
            object: self.object,
            created,
            model: &api.model_id,
            choices,
            usage: Some(usage),
        };
        Ok(json_response(StatusCode::OK, &body))
    }
}

#[derive(Debug, Serialize)]
struct TextChoice {
    text: String,
    index: usize,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

/// `POST /v1/completions`.
pub(super) async fn completions(
    State(api): State<Arc<Api>>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let prompts = prompts(request.prompt)?;
    if request.echo == Some(true) {
        return Err(unsupported("echo", "the prompt is not repeated"));
    }
    if request.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(unsupported("logprobs", "log-probabilities are not returned"));
    }
    let sampling = sampling!(request, request.max_tokens.unwrap_or(DEFAULT_COMPLETION_TOKENS));
    let n = sampling.check(prompts.len())?;
    if request.best_of.is_some_and(|b| b as usize != n) {
        return Err(unsupported("best_of", "only best_of = n is supported"));
    }
    let id = api.fresh_id("cmpl");
    let total = prompts.len() * n;
    let mut jobs = Vec::with_capacity(total);
    for (p, prompt) in prompts.into_iter().enumerate() {
        for choice in 0..n {
            let kind = match &request.suffix {
                Some(suffix) => JobKind::Fim(FimInput {
                    prefix: prompt.clone(),
                    suffix: suffix.clone(),
                    context_files: Vec::new(),
                }),
                None => JobKind::Generate { prompt: prompt.clone() },
            };
            jobs.push((job_id(&id, p * n + choice, total), kind, sampling.params(choice)));
        }
    }
    let answer = Answer {
        object: "text_completion",
        chunk_object: "text_completion",
        chunks: |stream, _| CompletionChunks(stream),
        choice: |index, f| TextChoice {
            text: f.text,
            index,
            logprobs: None,
            finish_reason: Some(finish_reason(f.stop)),
        },
    };
    answer.send(&api, id, jobs, &sampling, n).await
}

/// The prompts of a completion request: a string or a list of strings.
fn prompts(prompt: Value) -> Result<Vec<String>, ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("prompt {why}")).param("prompt");
    match prompt {
        Value::String(s) => Ok(vec![s]),
        Value::Array(items) if items.is_empty() => Err(bad("is an empty list")),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                Value::Number(_) | Value::Array(_) => {
                    Err(bad("as token ids is not supported; send text"))
                }
                _ => Err(bad("must be a string or a list of strings")),
            })
            .collect(),
        _ => Err(bad("must be a string or a list of strings")),
    }
}

#[derive(Debug, Serialize)]
struct ChatChoice {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<AssistantMessage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<Delta>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize)]
struct AssistantMessage {
    role: &'static str,
    content: String,
}

#[derive(Debug, Default, Serialize)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
}

/// `POST /v1/chat/completions`.
pub(super) async fn chat(
    State(api): State<Arc<Api>>,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let prompt = flatten(&request.messages)?;
    if request.logprobs == Some(true) || request.top_logprobs.is_some_and(|t| t > 0) {
        return Err(unsupported("logprobs", "log-probabilities are not returned"));
    }
    let context = api.server.engine().context_length() as u32;
    let max_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .unwrap_or(DEFAULT_CHAT_TOKENS.min(context / 2).max(1));
    let sampling = sampling!(request, max_tokens);
    let n = sampling.check(1)?;
    let id = api.fresh_id("chatcmpl");
    let jobs = (0..n)
        .map(|i| {
            (job_id(&id, i, n), JobKind::Generate { prompt: prompt.clone() }, sampling.params(i))
        })
        .collect();
    let answer = Answer {
        object: "chat.completion",
        chunk_object: "chat.completion.chunk",
        chunks: |stream, n| ChatChunks { stream, started: vec![false; n] },
        choice: |index, f| ChatChoice {
            index,
            message: Some(AssistantMessage { role: "assistant", content: f.text }),
            delta: None,
            logprobs: None,
            finish_reason: Some(finish_reason(f.stop)),
        },
    };
    answer.send(&api, id, jobs, &sampling, n).await
}

/// Flattens chat messages into one code prompt for a model that only continues code (see
/// docs/http.md): system and developer messages become `// ` comment lines, user and assistant
/// messages are code, verbatim; each message starts on a new line, and the model continues
/// right after the last one (nothing is appended, so a last line like `fn add(` is completed).
fn flatten(messages: &[Message]) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").param("messages"));
    }
    let mut prompt = String::new();
    for (i, message) in messages.iter().enumerate() {
        let bad =
            |why: String| ApiError::bad_request(format!("messages[{i}]: {why}")).param("messages");
        for (field, value) in [
            ("refusal", &message.refusal),
            ("tool_calls", &message.tool_calls),
            ("function_call", &message.function_call),
            ("audio", &message.audio),
            ("annotations", &message.annotations),
        ] {
            let empty = match value {
                None | Some(Value::Null) => true,
                Some(Value::Array(a)) => a.is_empty(),
                Some(_) => false,
            };
            if !empty {
                return Err(bad(format!("{field} is not supported")));
            }
        }
        let text = match &message.content {
            Value::Null => String::new(),
            Value::String(s) => s.clone(),
            Value::Array(parts) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        _ => {
                            return Err(bad(format!(
                                "content[{j}] is not a text part; only {{\"type\":\"text\",\"text\":…}} is supported"
                            )));
                        }
                    }
                }
                text
            }
            _ => return Err(bad("content must be a string or a list of text parts".into())),
        };
        let piece = match message.role.as_str() {
            "system" | "developer" => text
                .lines()
                .map(|line| if line.is_empty() { "//".to_owned() } else { format!("// {line}") })
                .collect::<Vec<_>>()
                .join("\n"),
            "user" | "assistant" => text,
            other => {
                return Err(bad(format!(
                    "role {other:?} is not supported; use system, developer, user or assistant"
                )));
            }
        };
        if !prompt.is_empty() && !prompt.ends_with('\n') {
            prompt.push('\n');
        }
        prompt.push_str(&piece);
    }
    Ok(prompt)
}

/// One entry of `/v1/models`.
#[derive(Debug, Serialize)]
struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

/// The `/v1/models` list.
#[derive(Debug, Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelObject<'a>>,
}

fn model_object(api: &Api) -> ModelObject<'_> {
    ModelObject { id: &api.model_id, object: "model", created: api.started, owned_by: "m31r" }
}

/// `GET /v1/models`: the one loaded model.
pub(super) async fn models(State(api): State<Arc<Api>>) -> Response {
    json_response(StatusCode::OK, &ModelList { object: "list", data: vec![model_object(&api)] })
}

/// `GET /v1/models/{id}`. The id is taken from the path as sent, not percent-decoded.
pub(super) async fn model(State(api): State<Arc<Api>>, uri: Uri) -> Result<Response, ApiError> {
    let id = uri.path().strip_prefix("/v1/models/").unwrap_or_default();
    if id != api.model_id {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("model {id:?} is not served here; the loaded model is {:?}", api.model_id),
        ));
    }
    Ok(json_response(StatusCode::OK, &model_object(&api)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(json: &str) -> Vec<Message> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn chat_messages_flatten_into_a_code_prompt() {
        let m = messages(
            r#"[{"role":"system","content":"Complete the Rust code.\n\nBe brief."},
                {"role":"user","content":"fn add(a: i32, b: i32) -> i32 {"},
                {"role":"assistant","content":[{"type":"text","text":"    a + b\n"}],"refusal":null},
                {"role":"user","content":"}\n\nfn sub("}]"#,
        );
        let expected = "// Complete the Rust code.\n//\n// Be brief.\nfn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\nfn sub(";
        assert_eq!(flatten(&m).unwrap(), expected);
        for bad in [
            r#"[{"role":"tool","content":"x"}]"#,
            r#"[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]"#,
            r#"[{"role":"assistant","content":"x","tool_calls":[{"id":"1"}]}]"#,
            r#"[]"#,
        ] {
            let e = flatten(&messages(bad)).unwrap_err();
            assert_eq!((e.status, e.param), (StatusCode::BAD_REQUEST, Some("messages")), "{bad}");
        }
    }

    #[test]
    fn usage_counts_each_prompt_once() {
        let mut usage = OpenAiUsage::default();
        let u = Usage { prompt_tokens: 10, cached_tokens: 4, completion_tokens: 3 };
        for index in 0..4 {
            usage.add(index, 2, &u); // two prompts, two choices each
        }
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
            (20, 12, 32)
        );
        assert_eq!(usage.prompt_tokens_details.cached_tokens, 8);
    }

    #[test]
    fn prompts_accept_text_only() {
        assert_eq!(prompts(Value::from("fn")).unwrap(), ["fn"]);
        assert_eq!(prompts(serde_json::json!(["a", "b"])).unwrap(), ["a", "b"]);
        for bad in [serde_json::json!([1, 2]), serde_json::json!([]), serde_json::json!(3)] {
            assert_eq!(prompts(bad).unwrap_err().param, Some("prompt"));
        }
    }
}
