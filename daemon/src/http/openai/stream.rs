//! The OpenAI streams' chunks: `text_completion` objects for completions and
//! `chat.completion.chunk` objects for chat, each ended by an optional usage chunk and `[DONE]`.

use m31r_protocol::Event;
use serde::Serialize;

use super::{Api, ChatChoice, Completion, Delta, OpenAiUsage, TextChoice, finish_reason};
use crate::http::errors::ApiError;
use crate::http::sse::Chunks;

/// What both OpenAI streams share: the chunks' common fields, the usage summed as choices
/// finish, and the stream's end.
pub(super) struct ChunkStream {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    n: usize,
    include_usage: bool,
    usage: OpenAiUsage,
}

impl ChunkStream {
    pub(super) fn new(
        id: String,
        object: &'static str,
        created: u64,
        api: &Api,
        n: usize,
        include_usage: bool,
    ) -> Self {
        let model = api.model_id.clone();
        Self { id, object, created, model, n, include_usage, usage: OpenAiUsage::default() }
    }

    fn chunk<C: Serialize>(&self, choices: Vec<C>, usage: Option<OpenAiUsage>) -> String {
        let chunk = Completion {
            id: &self.id,
            object: self.object,
            created: self.created,
            model: &self.model,
            choices,
            usage,
        };
        serde_json::to_string(&chunk).unwrap_or_default()
    }

    /// After every choice finished: the usage chunk if asked for, then `[DONE]`.
    fn finish(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if self.include_usage {
            let usage = std::mem::take(&mut self.usage);
            out.push(self.chunk(Vec::<TextChoice>::new(), Some(usage)));
        }
        out.push("[DONE]".into());
        out
    }
}

/// `text_completion` stream chunks.
pub(super) struct CompletionChunks(pub(super) ChunkStream);

impl Chunks for CompletionChunks {
    fn event(&mut self, index: usize, event: &Event) -> Vec<String> {
        let choice = |text: String, finish| TextChoice {
            text,
            index,
            logprobs: None,
            finish_reason: finish,
        };
        let stream = &mut self.0;
        match event {
            Event::Token { text, .. } => vec![stream.chunk(vec![choice(text.clone(), None)], None)],
            Event::Done { stop, usage, .. } => {
                stream.usage.add(index, stream.n, usage);
                vec![stream.chunk(vec![choice(String::new(), Some(finish_reason(*stop)))], None)]
            }
            Event::Error { code, message, .. } => {
                vec![ApiError::engine(*code, message.clone()).json()]
            }
            _ => Vec::new(),
        }
    }

    fn finish(&mut self) -> Vec<String> {
        self.0.finish()
    }
}

/// `chat.completion.chunk` stream chunks: a first chunk with the role, content deltas, a last
/// chunk with the finish reason for each choice.
pub(super) struct ChatChunks {
    pub(super) stream: ChunkStream,
    /// Choices whose role chunk was sent.
    pub(super) started: Vec<bool>,
}

impl ChatChunks {
    fn delta(&self, index: usize, delta: Delta, finish: Option<&'static str>) -> String {
        let choice = ChatChoice {
            index,
            message: None,
            delta: Some(delta),
            logprobs: None,
            finish_reason: finish,
        };
        self.stream.chunk(vec![choice], None)
    }
}

impl Chunks for ChatChunks {
    fn event(&mut self, index: usize, event: &Event) -> Vec<String> {
        if let Event::Error { code, message, .. } = event {
            return vec![ApiError::engine(*code, message.clone()).json()];
        }
        let mut out = Vec::new();
        if !self.started.get(index).copied().unwrap_or(true) {
            self.started[index] = true;
            let role = Delta { role: Some("assistant"), content: Some(String::new()) };
            out.push(self.delta(index, role, None));
        }
        match event {
            Event::Token { text, .. } => {
                out.push(self.delta(
                    index,
                    Delta { role: None, content: Some(text.clone()) },
                    None,
                ));
            }
            Event::Done { stop, usage, .. } => {
                self.stream.usage.add(index, self.stream.n, usage);
                out.push(self.delta(index, Delta::default(), Some(finish_reason(*stop))));
            }
            _ => {}
        }
        out
    }

    fn finish(&mut self) -> Vec<String> {
        self.stream.finish()
    }
}

#[cfg(test)]
mod tests {
    use m31r_protocol::{StopReason, Timings, Usage};
    use serde_json::json;

    use super::*;

    fn stream(object: &'static str) -> ChunkStream {
        let (id, model) = ("x-1".to_owned(), "m".to_owned());
        let usage = OpenAiUsage::default();
        ChunkStream { id, object, created: 7, model, n: 1, include_usage: true, usage }
    }

    #[test]
    fn both_streams_end_with_the_usage_then_done() {
        let done = Event::Done {
            id: "x-1".into(),
            stop: StopReason::MaxTokens,
            usage: Usage { prompt_tokens: 3, cached_tokens: 1, completion_tokens: 2 },
            timings: Timings::default(),
            lines: Vec::new(),
        };
        let mut text = CompletionChunks(stream("text_completion"));
        let mut chat = ChatChunks { stream: stream("chat.completion.chunk"), started: vec![true] };
        for (chunks, object) in [
            (&mut text as &mut dyn Chunks, "text_completion"),
            (&mut chat, "chat.completion.chunk"),
        ] {
            let finish: serde_json::Value =
                serde_json::from_str(&chunks.event(0, &done)[0]).unwrap();
            assert_eq!(finish["choices"][0]["finish_reason"], "length");
            let end = chunks.finish();
            assert_eq!(end.len(), 2, "{end:?}");
            let usage: serde_json::Value = serde_json::from_str(&end[0]).unwrap();
            assert_eq!((usage["object"].as_str(), &usage["choices"]), (Some(object), &json!([])));
            assert_eq!(usage["usage"]["total_tokens"], 5);
            assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
            assert_eq!(end[1], "[DONE]");
        }
    }
}
