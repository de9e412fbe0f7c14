//! The language server: LSP lifecycle and text sync, `textDocument/inlineCompletion` (a custom
//! method: tower-lsp-server's trait has none), the `textDocument/completion` fallback, warm-ups,
//! per-document cancellation, typing along a shown suggestion, settings, and `m31r/status`.
//!
//! An inline completion runs its daemon generation in a background task: when the whole answer
//! is not there within `firstLineBudgetMs`, the editor is shown what is complete of it (its whole
//! lines, else its whole words) and the generation carries on; its full text then extends the
//! remembered suggestion, which serves the rest without another daemon request.
//! After a daemon completion is shown, the one after it (as if accepted) is asked for in the
//! background (speculative next), and answers the request that follows its acceptance.
//!
//! Handlers read the documents before their first `.await`: tower-lsp-server polls message
//! handlers in arrival order, so a request sees every `didChange` sent before it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use m31r_protocol::StopReason;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower_lsp_server::jsonrpc::Result as RpcResult;
use tower_lsp_server::ls_types::{
    CompletionItem, CompletionItemKind, CompletionList, CompletionOptions, CompletionParams,
    CompletionResponse, CompletionTextEdit, DidChangeConfigurationParams,
    DidChangeTextDocumentParams, DidCloseTextDocumentParams, DidOpenTextDocumentParams,
    DidSaveTextDocumentParams, InitializeParams, InitializeResult, InitializedParams,
    InlineCompletionOptions, InlineCompletionParams, MessageType, OneOf, Position,
    PositionEncodingKind, Range, SaveOptions, SelectedCompletionInfo, ServerCapabilities,
    ServerInfo, TextDocumentSyncCapability, TextDocumentSyncKind, TextDocumentSyncOptions,
    TextDocumentSyncSaveOptions, TextEdit, Uri,
};
use tower_lsp_server::{Client, LanguageServer, LspService, Server};

use crate::config::Config;
use crate::daemon::{Completion, Daemon, DaemonError, DaemonSettings, Progress};
use crate::document::{Document, Encoding};
use crate::gate::gate_text;
use crate::postprocess::{Edit, Reason, Site, postprocess};
use crate::request::{ContextDoc, Windows, build};
use crate::typeahead::Suggestion;

/// Options fixed for the server's lifetime (from the command line).
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Socket path that overrides the `socketPath` setting.
    pub socket: Option<PathBuf>,
}

/// Serves LSP on `input`/`output` (stdio in the binary, pipes in tests) until `exit`.
pub async fn serve<I, O>(input: I, output: O, options: Options)
where
    I: AsyncRead + Unpin,
    O: AsyncWrite,
{
    let (service, socket) = LspService::build(|client| Backend::new(client, options))
        .custom_method("textDocument/inlineCompletion", Backend::inline_completion)
        .custom_method("m31r/status", Backend::status)
        .finish();
    // Room for many waiting completions, so `$/cancelRequest` and edits are never stuck behind
    // them (the server handles at most this many messages at once).
    Server::new(input, output, socket).concurrency_level(64).serve(service).await;
}

/// `textDocument/inlineCompletion`'s result (LSP 3.18 `InlineCompletionList`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InlineCompletionList {
    /// The completions; empty when suppressed.
    pub items: Vec<InlineCompletionItem>,
}

/// One inline completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InlineCompletionItem {
    /// The text replacing `range`.
    pub insert_text: String,
    /// What it replaces: the cursor, plus any auto-closed punctuation it retypes.
    pub range: Range,
}

/// `m31r/status`'s result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// A daemon connection is open.
    pub connected: bool,
    /// The daemon socket.
    pub socket: String,
    /// The daemon's model version, once known.
    pub model: Option<String>,
    /// Latency of the last daemon completion, in milliseconds.
    pub last_latency_ms: Option<f64>,
    /// Fraction of prompt tokens the daemon served from its cache.
    pub cache_hit_rate: Option<f64>,
    /// Completion requests answered.
    pub requests: u64,
    /// Of which suppressed (answered empty).
    pub suppressed: u64,
    /// The suppressed ones by reason code.
    pub suppressed_by: BTreeMap<String, u64>,
    /// Of the answered ones (not suppressed), those answered from a shown suggestion the user
    /// typed along, without the daemon.
    pub served_locally: u64,
    /// Of the answered ones (not suppressed), those answered with the daemon's completion.
    pub served_by_daemon: u64,
    /// Generations that ended in the background after their first part was shown: finished
    /// (extending the suggestion they fed, if it is still there) or cancelled.
    pub finished_in_background: u64,
    /// Speculative next completions received (the completion after a shown one, as if accepted).
    pub speculations_ready: u64,
    /// Documents with a cache warm-up (on opening, saving, typing along) still running at the
    /// daemon; one at a time per document.
    pub warming: u64,
}

/// An open document and what the server remembers about it.
#[derive(Debug)]
struct Open {
    doc: Document,
    /// Opening order: context documents are sent in this stable order.
    seq: u64,
    /// Byte offset of the last completion request, where `didSave` warms the cache.
    last_cursor: Option<usize>,
    /// The rest of the last completion shown, while the user types along it.
    suggestion: Option<Suggestion>,
    /// Edits applied so far: a daemon answer is remembered only if none came in while it was
    /// computed (it would describe a text the document no longer has).
    edits: u64,
    /// The in-flight generation (its `inflight` sequence number) whose first part is
    /// `suggestion`: typing along keeps it running, its end extends the suggestion.
    background: Option<u64>,
    /// The completion after the last one shown, asked for as if it were accepted.
    next: Option<Next>,
}

/// A speculative next completion: the document as it is once the shown completion is accepted,
/// the cursor after it, and the daemon's post-processed answer there (`None` while it runs).
#[derive(Debug)]
struct Next {
    /// Tells it from a later speculation of the same document.
    id: u64,
    text: String,
    cursor: usize,
    edit: Option<Edit>,
    token: CancellationToken,
}

/// The server state behind the LSP handlers.
#[derive(Debug)]
pub struct Backend {
    client: Client,
    options: Options,
    docs: Arc<Mutex<HashMap<Uri, Open>>>,
    config: Mutex<Config>,
    encoding: Mutex<Encoding>,
    root: Mutex<Option<PathBuf>>,
    daemon: Daemon,
    /// The in-flight completion of each document: a newer one cancels it.
    inflight: Arc<Mutex<HashMap<Uri, (u64, CancellationToken)>>>,
    seq: AtomicU64,
    requests: AtomicU64,
    suppressed: AtomicU64,
    suppressed_by: Mutex<BTreeMap<&'static str, u64>>,
    served_locally: AtomicU64,
    served_by_daemon: AtomicU64,
    finished_in_background: Arc<AtomicU64>,
    speculations_ready: Arc<AtomicU64>,
    /// Warm-ups in flight: at most one per document.
    warming: Arc<Mutex<HashSet<Uri>>>,
    /// When the user last edited or asked for a completion: speculation waits for a pause.
    activity: Arc<Mutex<tokio::time::Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A suppression and its detail, for the log.
type Suppressed = (Reason, String);

/// Which editor request a completion answers; each has its own timeout setting.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Inline,
    Fallback,
}

/// A completion ready for the editor: text and the range it replaces.
struct Shown {
    text: String,
    range: Range,
}

/// Where a shown completion came from, for `m31r/status`.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// The remainder of a suggestion the user typed along.
    Local,
    /// The daemon.
    Daemon,
}

impl Backend {
    fn new(client: Client, options: Options) -> Self {
        let config = Config::default();
        let daemon = Daemon::new(daemon_settings(&config, &options));
        Self {
            client,
            options,
            docs: Arc::default(),
            config: Mutex::new(config),
            encoding: Mutex::default(),
            root: Mutex::default(),
            daemon,
            inflight: Arc::default(),
            seq: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            suppressed_by: Mutex::default(),
            served_locally: AtomicU64::new(0),
            served_by_daemon: AtomicU64::new(0),
            finished_in_background: Arc::default(),
            speculations_ready: Arc::default(),
            warming: Arc::default(),
            activity: Arc::new(Mutex::new(tokio::time::Instant::now())),
        }
    }

    async fn inline_completion(
        &self,
        params: InlineCompletionParams,
    ) -> RpcResult<InlineCompletionList> {
        let position = params.text_document_position;
        let shown = self
            .complete(
                position.text_document.uri,
                position.position,
                params.context.selected_completion_info,
                Kind::Inline,
            )
            .await;
        Ok(InlineCompletionList {
            items: shown
                .into_iter()
                .map(|s| InlineCompletionItem { insert_text: s.text, range: s.range })
                .collect(),
        })
    }

    async fn status(&self) -> RpcResult<Status> {
        let snap = self.daemon.snapshot();
        Ok(Status {
            connected: snap.connected,
            socket: snap.socket.display().to_string(),
            model: snap.model.map(|m| m.version),
            last_latency_ms: snap.last_latency.map(|d| d.as_secs_f64() * 1000.0),
            cache_hit_rate: snap.cache_hit_rate,
            requests: self.requests.load(Ordering::Relaxed),
            suppressed: self.suppressed.load(Ordering::Relaxed),
            suppressed_by: lock(&self.suppressed_by)
                .iter()
                .map(|(code, n)| ((*code).to_string(), *n))
                .collect(),
            served_locally: self.served_locally.load(Ordering::Relaxed),
            served_by_daemon: self.served_by_daemon.load(Ordering::Relaxed),
            finished_in_background: self.finished_in_background.load(Ordering::Relaxed),
            speculations_ready: self.speculations_ready.load(Ordering::Relaxed),
            warming: lock(&self.warming).len() as u64,
        })
    }

    /// Runs one completion; `None` when suppressed (already logged with its reason).
    async fn complete(
        &self,
        uri: Uri,
        position: Position,
        selected: Option<SelectedCompletionInfo>,
        kind: Kind,
    ) -> Option<Shown> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        *lock(&self.activity) = tokio::time::Instant::now();
        let result = self.try_complete(&uri, position, selected, kind).await;
        match result {
            Ok((shown, source)) => {
                let served = match source {
                    Source::Local => &self.served_locally,
                    Source::Daemon => &self.served_by_daemon,
                };
                served.fetch_add(1, Ordering::Relaxed);
                Some(shown)
            }
            Err((reason, detail)) => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                *lock(&self.suppressed_by).entry(reason.code()).or_default() += 1;
                let message = format!(
                    "m31r: suppressed {reason} at {}:{}:{}{}{detail}",
                    uri.as_str(),
                    position.line + 1,
                    position.character + 1,
                    if detail.is_empty() { "" } else { ": " },
                );
                // A daemon failure is worth a look in the log; the other reasons are routine.
                if matches!(reason, Reason::DaemonError) {
                    tracing::warn!("{message}");
                } else {
                    tracing::debug!("{message}");
                }
                self.client.log_message(MessageType::LOG, message).await;
                None
            }
        }
    }

    async fn try_complete(
        &self,
        uri: &Uri,
        position: Position,
        selected: Option<SelectedCompletionInfo>,
        kind: Kind,
    ) -> Result<(Shown, Source), Suppressed> {
        // Everything up to the daemon call runs before the first await (see the module doc).
        let encoding = *lock(&self.encoding);
        let config = lock(&self.config).clone();
        if !config.enabled {
            return Err((Reason::Disabled, String::new()));
        }
        let (doc, cursor, edits, prepared) = {
            let mut docs = lock(&self.docs);
            let Some(open) = docs.get_mut(uri) else {
                return Err((Reason::UnknownDocument, String::new()));
            };
            if !config.languages.contains(&open.doc.language_id) {
                return Err((Reason::Language, open.doc.language_id.clone()));
            }
            let mut cursor = open.doc.offset(position, encoding);
            open.last_cursor = Some(cursor);
            // A selected popup item changes what is completed; the remainder does not know it.
            let remainder = match &open.suggestion {
                Some(suggestion) if selected.is_none() => suggestion.answer(cursor),
                _ => None,
            };
            if let Some(remainder) = remainder {
                let shown = Shown {
                    text: remainder.text.to_string(),
                    range: open.doc.range(cursor..cursor + remainder.replace, encoding),
                };
                let background = open.background;
                drop(docs);
                self.answered_locally(uri, background);
                return Ok((shown, Source::Local));
            }
            // The shown completion was accepted: the speculative next one answers.
            let next = open.next.take_if(|n| {
                selected.is_none()
                    && n.edit.is_some()
                    && n.cursor == cursor
                    && n.text == open.doc.text()
            });
            if let Some(Next { edit: Some(edit), .. }) = next {
                let shown = Shown {
                    text: edit.text.clone(),
                    range: open.doc.range(cursor..cursor + edit.replace, encoding),
                };
                open.suggestion = Suggestion::new(cursor, edit.text, edit.replace);
                open.background = None;
                drop(docs);
                self.answered_locally(uri, None);
                return Ok((shown, Source::Local));
            }
            if let Some(next) = open.next.take() {
                next.token.cancel();
            }
            // The daemon's answer replaces it (or, suppressed, leaves nothing to type along).
            open.suggestion = None;
            open.background = None;
            let edits = open.edits;
            // With a completion item selected in the editor's popup, complete as if it were
            // accepted; the item then replaces the selection's range (LSP 3.18).
            let mut doc = open.doc.clone();
            if let Some(sel) = &selected {
                let start = doc.offset(sel.range.start, encoding);
                let end = doc.offset(sel.range.end, encoding).max(start);
                let mut text = doc.text().to_string();
                text.replace_range(start..end, &sel.text);
                doc = Document::new(text, doc.version, doc.language_id.clone());
                cursor = start + sel.text.len();
            }
            let prepared = {
                let context = self.context_docs(&docs, uri, &config);
                let context: Vec<ContextDoc<'_>> =
                    context.iter().map(|(p, t)| ContextDoc { path: p, text: t }).collect();
                build(&doc, cursor, &context, &config, &Windows::default())
            };
            (doc, cursor, edits, prepared)
        };
        let timeout_ms = match kind {
            Kind::Inline => config.inline_timeout_ms,
            Kind::Fallback => config.completion_timeout_ms,
        };
        let timeout = Duration::from_millis(u64::from(timeout_ms));
        let mut params = prepared.params;
        params.deadline_ms = deadline_ms(timeout_ms);
        let token = CancellationToken::new();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        if let Some((_, older)) = lock(&self.inflight).insert(uri.clone(), (seq, token.clone())) {
            older.cancel();
        }

        let background = Background {
            docs: self.docs.clone(),
            inflight: self.inflight.clone(),
            finished: self.finished_in_background.clone(),
            uri: uri.clone(),
            seq,
            cursor,
            site: prepared.site.clone(),
            min_confidence: config.min_confidence,
        };
        let (progress_tx, mut progress) = watch::channel(Progress::default());
        let daemon = self.daemon.clone();
        // Owns what it needs, so that it can move to a background task once its first part is
        // shown; until then it runs here, and `$/cancelRequest` drops it (a `cancel` at the daemon).
        let mut fim = Box::pin(async move {
            daemon.fim_streaming(prepared.input, params, timeout, Some(&progress_tx)).await
        });
        // Partial answers are for inline completions of the document's own text: the popup's
        // fallback list and a selected item's completion wait for the whole answer.
        let partial = matches!(kind, Kind::Inline) && selected.is_none();
        let budget =
            tokio::time::sleep(Duration::from_millis(u64::from(config.first_line_budget_ms)));
        tokio::pin!(budget);
        let (mut budget_passed, mut streaming) = (false, partial);
        let result = loop {
            tokio::select! {
                biased;
                () = token.cancelled() => break Err((Reason::Superseded, String::new())),
                r = &mut fim => break r.map_err(|e| (reason_for(&e), e.to_string())),
                () = &mut budget, if partial && !budget_passed => budget_passed = true,
                changed = progress.changed(), if streaming => streaming = changed.is_ok(),
            }
            // First line first: a complete first line worth showing is shown at once; else the
            // budget decides. Either way the generation finishes in the background for this
            // position, and the answer is what is worth showing so far (maybe nothing).
            let so_far = progress.borrow().clone();
            // A first line longer than any line worth showing is decided now as well.
            let decided = has_complete_line(&so_far.text) || overlong_line(&so_far.text);
            if !budget_passed && !decided {
                continue;
            }
            let edit = partial_edit(&so_far, &background.site, config.min_confidence);
            // A verdict on the first line alone (its confidence, the degenerate-output filters)
            // is final once that line is complete: the rest cannot help, so stop generating it.
            if let Err(reason) = edit
                && first_line_verdict(reason)
                && decided
            {
                background.clear_inflight();
                return Err((reason, format!("{:?}", so_far.text)));
            }
            if !budget_passed && edit.is_err() {
                continue;
            }
            let edit = edit.ok();
            if let Some(open) = lock(&self.docs).get_mut(uri)
                && open.edits == edits
            {
                open.suggestion =
                    edit.as_ref().and_then(|e| Suggestion::new(cursor, e.text.clone(), e.replace));
                open.background = Some(seq);
            }
            tokio::spawn(async move {
                let completion = tokio::select! {
                    biased;
                    () = token.cancelled() => None,
                    r = fim => r.ok(),
                };
                background.clear_inflight();
                background.finish(completion.as_ref());
            });
            let Some(edit) = edit else {
                let detail = format!(
                    "nothing worth showing after {} ms ({:?} so far)",
                    config.first_line_budget_ms, so_far.text
                );
                return Err((Reason::NotReady, detail));
            };
            let shown = Shown {
                text: edit.text,
                range: Range::new(
                    doc.position(cursor, encoding),
                    doc.position(cursor + edit.replace, encoding),
                ),
            };
            return Ok((shown, Source::Daemon));
        };
        background.clear_inflight();
        if let Err((Reason::DaemonUnavailable, detail)) = &result {
            self.notify_unreachable(detail).await;
        }
        let completion = result?;
        let edit = shown_edit(&completion, &prepared.site, config.min_confidence)
            .map_err(|reason| (reason, format!("{:?}", completion.text)))?;
        if selected.is_none() {
            self.remember(uri, edits, Suggestion::new(cursor, edit.text.clone(), edit.replace));
            if config.speculative_next {
                self.speculate(uri, &doc, cursor, &edit, &config, timeout_ms);
            }
        }

        // Map back to the editor's document: the selection (if any) is replaced too.
        let (text, start, end) = match &selected {
            Some(sel) => {
                let original = lock(&self.docs).get(uri).map(|o| o.doc.clone());
                let original = original.unwrap_or_else(|| doc.clone());
                let sel_end = original.offset(sel.range.end, encoding);
                (
                    format!("{}{}", sel.text, edit.text),
                    sel.range.start,
                    original.position(sel_end + edit.replace, encoding),
                )
            }
            None => (
                edit.text,
                doc.position(cursor, encoding),
                doc.position(cursor + edit.replace, encoding),
            ),
        };
        Ok((Shown { text, range: Range::new(start, end) }, Source::Daemon))
    }

    /// Remembers the suggestion just shown in `uri`, unless the document was edited (`edits`
    /// changed) while it was computed.
    fn remember(&self, uri: &Uri, edits: u64, suggestion: Option<Suggestion>) {
        if let Some(open) = lock(&self.docs).get_mut(uri)
            && open.edits == edits
        {
            open.suggestion = suggestion;
        }
    }

    /// Asks the daemon in the background for the completion after `edit`, shown at `cursor` of
    /// `doc`, as if it were accepted; its answer is kept in the document's `next`.
    fn speculate(
        &self,
        uri: &Uri,
        doc: &Document,
        cursor: usize,
        edit: &Edit,
        config: &Config,
        timeout_ms: u32,
    ) {
        let mut text = doc.text().to_string();
        text.replace_range(cursor..cursor + edit.replace, &edit.text);
        let next_cursor = cursor + edit.text.len();
        let accepted = Document::new(text.clone(), doc.version, doc.language_id.clone());
        let token = CancellationToken::new();
        let id = self.seq.fetch_add(1, Ordering::Relaxed);
        let prepared = {
            let mut docs = lock(&self.docs);
            let context = self.context_docs(&docs, uri, config);
            let context: Vec<ContextDoc<'_>> =
                context.iter().map(|(p, t)| ContextDoc { path: p, text: t }).collect();
            let prepared = build(&accepted, next_cursor, &context, config, &Windows::default());
            let Some(open) = docs.get_mut(uri) else { return };
            let next = Next { id, text, cursor: next_cursor, edit: None, token: token.clone() };
            if let Some(older) = open.next.replace(next) {
                older.token.cancel();
            }
            prepared
        };
        let mut params = prepared.params;
        params.deadline_ms = deadline_ms(timeout_ms);
        let timeout = Duration::from_millis(u64::from(timeout_ms));
        let (daemon, docs, ready, uri) =
            (self.daemon.clone(), self.docs.clone(), self.speculations_ready.clone(), uri.clone());
        let min_confidence = config.min_confidence;
        let activity = self.activity.clone();
        tokio::spawn(async move {
            // Low priority: sent only once the user has paused (no edit or request for
            // SPECULATION_DELAY), so that it never holds up the engine while they type, typing
            // along included.
            loop {
                let quiet_at = *lock(&activity) + SPECULATION_DELAY;
                if tokio::time::Instant::now() >= quiet_at {
                    break;
                }
                tokio::select! {
                    biased;
                    () = token.cancelled() => return,
                    () = tokio::time::sleep_until(quiet_at) => {}
                }
            }
            let result = tokio::select! {
                biased;
                () = token.cancelled() => return,
                r = daemon.fim(prepared.input, params, timeout) => r,
            };
            let Ok(completion) = result else { return };
            let edit = shown_edit(&completion, &prepared.site, min_confidence).ok();
            let mut docs = lock(&docs);
            if let Some(next) = docs.get_mut(&uri).and_then(|o| o.next.as_mut())
                && next.id == id
            {
                next.edit = edit;
            }
            ready.fetch_add(1, Ordering::Relaxed);
        });
    }

    /// After a local answer: the document's older daemon request is as stale as a superseded one,
    /// and the daemon's cache is warmed up to the cursor in the background, so the completion
    /// after the remainder runs out finds it there.
    /// The generation `background` feeds the suggestion and carries on.
    fn answered_locally(&self, uri: &Uri, background: Option<u64>) {
        {
            let mut inflight = lock(&self.inflight);
            if inflight.get(uri).is_some_and(|(s, _)| Some(*s) != background)
                && let Some((_, older)) = inflight.remove(uri)
            {
                older.cancel();
            }
        }
        self.warm(uri);
    }

    async fn notify_unreachable(&self, detail: &str) {
        if self.daemon.take_unreachable_notice() {
            self.client.show_message(MessageType::WARNING, unreachable_message(detail)).await;
        }
    }

    /// Other open documents in the served languages, in opening order (least relevant first),
    /// as (workspace-relative path, text).
    fn context_docs(
        &self,
        docs: &HashMap<Uri, Open>,
        current: &Uri,
        config: &Config,
    ) -> Vec<(String, String)> {
        if !config.context_files {
            return Vec::new();
        }
        let root = lock(&self.root).clone();
        let mut others: Vec<(&Uri, &Open)> = docs
            .iter()
            .filter(|(u, o)| *u != current && config.languages.contains(&o.doc.language_id))
            .collect();
        others.sort_by_key(|(_, o)| o.seq);
        others
            .into_iter()
            .map(|(uri, open)| (relative_path(uri, root.as_deref()), open.doc.text().to_string()))
            .collect()
    }

    /// Sends `warm` for `uri` at its last completion position (else its end), in the background,
    /// unless one is still running for it: warm-ups are not cancelled (what they evaluate stays
    /// useful), so sending one per keystroke typed along would pile them up at the daemon, and
    /// the next request prefills the few tokens a skipped one would have.
    fn warm(&self, uri: &Uri) {
        let config = lock(&self.config).clone();
        if !config.enabled {
            return;
        }
        let prepared = {
            let docs = lock(&self.docs);
            let Some(open) = docs.get(uri) else { return };
            if !config.languages.contains(&open.doc.language_id) {
                return;
            }
            let cursor = open.last_cursor.unwrap_or(open.doc.text().len());
            let context = self.context_docs(&docs, uri, &config);
            let context: Vec<ContextDoc<'_>> =
                context.iter().map(|(p, t)| ContextDoc { path: p, text: t }).collect();
            build(&open.doc, cursor, &context, &config, &Windows::default())
        };
        // The completion asked there next has this prompt budget: cut the warm-up to it.
        let (input, max_tokens) = (prepared.input, prepared.params.max_tokens);
        if !lock(&self.warming).insert(uri.clone()) {
            return;
        }
        let daemon = self.daemon.clone();
        let client = self.client.clone();
        let (warming, uri) = (self.warming.clone(), uri.clone());
        tokio::spawn(async move {
            let warmed = daemon.warm(input, max_tokens).await;
            lock(&warming).remove(&uri);
            match warmed {
                Ok(()) => {}
                Err(e @ DaemonError::Unavailable { .. }) => {
                    if daemon.take_unreachable_notice() {
                        let message = unreachable_message(&e.to_string());
                        client.show_message(MessageType::WARNING, message).await;
                    }
                }
                Err(e) => tracing::warn!("warm-up failed: {e}"),
            }
        });
    }

    /// Applies a settings object; reports bad keys to the editor's log.
    async fn apply_settings(&self, settings: &Value) {
        let problems = {
            let mut config = lock(&self.config);
            let problems = config.apply(settings);
            self.daemon.configure(daemon_settings(&config, &self.options));
            problems
        };
        // A remembered suggestion was shaped by the old settings (`maxLines`, …).
        for open in lock(&self.docs).values_mut() {
            open.suggestion = None;
            if let Some(next) = open.next.take() {
                next.token.cancel();
            }
        }
        for problem in problems {
            self.client.log_message(MessageType::WARNING, problem).await;
        }
    }
}

fn reason_for(e: &DaemonError) -> Reason {
    match e {
        DaemonError::Unavailable { .. } => Reason::DaemonUnavailable,
        DaemonError::Disconnected(_) | DaemonError::Failed { .. } => Reason::DaemonError,
        DaemonError::Timeout { .. } => Reason::DaemonTimeout,
    }
}

/// What a completion's background generation needs once its handler has answered.
#[derive(Debug, Clone)]
struct Background {
    docs: Arc<Mutex<HashMap<Uri, Open>>>,
    inflight: Arc<Mutex<HashMap<Uri, (u64, CancellationToken)>>>,
    finished: Arc<AtomicU64>,
    uri: Uri,
    seq: u64,
    cursor: usize,
    site: Site,
    min_confidence: f64,
}

impl Background {
    /// Ends the generation's registration as the document's in-flight one.
    fn clear_inflight(&self) {
        let mut inflight = lock(&self.inflight);
        if inflight.get(&self.uri).is_some_and(|(s, _)| *s == self.seq) {
            inflight.remove(&self.uri);
        }
    }

    /// The generation whose first part was shown, or which had nothing worth showing when its
    /// budget ran out, ended (`None`: failed or cancelled): its full text extends the document's
    /// suggestion if that is still the one it fed, or becomes it when nothing was shown.
    fn finish(&self, completion: Option<&Completion>) {
        self.finished.fetch_add(1, Ordering::Relaxed);
        let mut docs = lock(&self.docs);
        let Some(open) = docs.get_mut(&self.uri) else { return };
        if open.background != Some(self.seq) {
            return;
        }
        open.background = None;
        let Some(completion) = completion else { return };
        let Ok(edit) = shown_edit(completion, &self.site, self.min_confidence) else { return };
        open.suggestion = match &open.suggestion {
            // Nothing was shown in time: the finished answer is served if the same position is
            // asked again, or typed along.
            None => Suggestion::unshown(self.cursor, edit.text, edit.replace),
            Some(shown) => match shown.extended(self.cursor, &edit.text, edit.replace) {
                Some(extended) => Some(extended),
                None => return,
            },
        };
    }
}

/// Whether suppression for `reason` judged the first line alone, so that no later text can
/// change it (the filters cut later lines instead of suppressing).
fn first_line_verdict(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::LowConfidence
            | Reason::Repetitive
            | Reason::Unbalanced
            | Reason::RepeatsPreviousLine
    )
}

/// How long a speculative next request waits for a pause (no edit, no completion request) before
/// it is sent: longer than the gap between keystrokes of someone typing on, shorter
/// than the time it takes to see a suggestion and accept it.
const SPECULATION_DELAY: Duration = Duration::from_millis(100);

/// Characters of a first line past which it is judged before its end: beyond `rustfmt`'s 100
/// columns with room for indentation, no line worth showing is still growing.
const OVERLONG_LINE_CHARS: usize = 160;

/// Whether the first line of `so_far` has no end yet and more than [`OVERLONG_LINE_CHARS`]
/// characters.
fn overlong_line(so_far: &str) -> bool {
    !so_far.contains('\n') && so_far.chars().count() > OVERLONG_LINE_CHARS
}

/// Whether `so_far` holds a whole line with something on it (a leading newline alone is not one).
fn has_complete_line(so_far: &str) -> bool {
    so_far.rfind('\n').is_some_and(|end| !so_far[..end].trim().is_empty())
}

/// What to show of a finished completion: whole lines of one cut short by its deadline, the lines
/// the confidence gate keeps, post-processed.
fn shown_edit(completion: &Completion, site: &Site, min_confidence: f64) -> Result<Edit, Reason> {
    let text = match completion.stop {
        StopReason::Deadline => complete_lines(&completion.text),
        _ => &completion.text,
    };
    postprocess(gate_text(text, &completion.lines, min_confidence)?, site)
}

/// What is worth showing of a generation still running: its whole lines when it has any, else
/// its whole words (a last identifier may still grow), that the confidence gate keeps (with the
/// confidence so far of a line still growing), post-processed; the reason when nothing is.
fn partial_edit(progress: &Progress, site: &Site, min_confidence: f64) -> Result<Edit, Reason> {
    let so_far = progress.text.as_str();
    let complete = match so_far.rfind('\n') {
        Some(end) => &so_far[..end],
        None => {
            let word_end = so_far
                .char_indices()
                .rev()
                .find(|(_, c)| !(c.is_alphanumeric() || *c == '_'))
                .map_or(0, |(i, c)| i + c.len_utf8());
            &so_far[..word_end]
        }
    };
    postprocess(gate_text(complete, &progress.lines, min_confidence)?, site)
}

/// The one `window/showMessage` of an outage.
fn unreachable_message(detail: &str) -> String {
    format!(
        "M31R: the completion daemon cannot be reached ({detail}). Start it with \
         `m31rd --bundle DIR`, or set m31r.autoStart and m31r.daemonArgs. Completions resume \
         once it answers."
    )
}

fn daemon_settings(config: &Config, options: &Options) -> DaemonSettings {
    DaemonSettings {
        socket: options.socket.clone().unwrap_or_else(|| config.socket()),
        auto_start: config.auto_start,
        program: config.daemon_path.clone(),
        args: config.daemon_args.clone(),
        connect_timeout: Duration::from_millis(u64::from(config.connect_timeout_ms)),
    }
}

/// The daemon's `deadline_ms` for a request the server waits `timeout` for: four fifths of it,
/// so a slow daemon stops and answers with what it has before the server gives up on it.
fn deadline_ms(timeout_ms: u32) -> u64 {
    (u64::from(timeout_ms) * 4 / 5).max(1)
}

/// What to show of a completion cut short by its deadline: its whole lines when it has any, as a
/// half-written last line of a block is worse than none; a first line is kept as it is.
fn complete_lines(text: &str) -> &str {
    match text.rfind('\n') {
        Some(end) => &text[..end],
        None => text,
    }
}

/// The path the model sees for a context document: relative to the workspace root when inside
/// it, else the file name.
fn relative_path(uri: &Uri, root: Option<&std::path::Path>) -> String {
    let Some(path) = uri.to_file_path() else { return uri.as_str().to_string() };
    if let Some(rel) = root.and_then(|r| path.strip_prefix(r).ok()) {
        return rel.display().to_string();
    }
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into())
}

impl LanguageServer for Backend {
    async fn initialize(&self, params: InitializeParams) -> RpcResult<InitializeResult> {
        let utf8 = params
            .capabilities
            .general
            .as_ref()
            .and_then(|g| g.position_encodings.as_ref())
            .is_some_and(|encodings| encodings.contains(&PositionEncodingKind::UTF8));
        let encoding = if utf8 { Encoding::Utf8 } else { Encoding::Utf16 };
        *lock(&self.encoding) = encoding;
        #[allow(deprecated)] // root_uri is the fallback for clients without workspace folders.
        let root = params
            .workspace_folders
            .as_ref()
            .and_then(|f| f.first())
            .map(|f| f.uri.clone())
            .or(params.root_uri.clone())
            .and_then(|u| u.to_file_path().map(|p| p.into_owned()));
        *lock(&self.root) = root;
        if let Some(options) = &params.initialization_options {
            self.apply_settings(options).await;
        }
        let encoding_kind = match encoding {
            Encoding::Utf8 => PositionEncodingKind::UTF8,
            Encoding::Utf16 => PositionEncodingKind::UTF16,
        };
        Ok(InitializeResult {
            capabilities: ServerCapabilities {
                position_encoding: Some(encoding_kind),
                text_document_sync: Some(TextDocumentSyncCapability::Options(
                    TextDocumentSyncOptions {
                        open_close: Some(true),
                        change: Some(TextDocumentSyncKind::INCREMENTAL),
                        save: Some(TextDocumentSyncSaveOptions::SaveOptions(SaveOptions {
                            include_text: Some(false),
                        })),
                        ..TextDocumentSyncOptions::default()
                    },
                )),
                completion_provider: Some(CompletionOptions::default()),
                inline_completion_provider: Some(OneOf::Right(InlineCompletionOptions::default())),
                ..ServerCapabilities::default()
            },
            server_info: Some(ServerInfo {
                name: "m31r-lsp".into(),
                version: Some(env!("CARGO_PKG_VERSION").into()),
            }),
            offset_encoding: None,
        })
    }

    async fn initialized(&self, _: InitializedParams) {
        tracing::info!("initialized ({} positions)", lock(&self.encoding).name());
    }

    async fn shutdown(&self) -> RpcResult<()> {
        // In-flight completions end with their handlers; the daemon is shared and keeps running.
        for (_, (_, token)) in lock(&self.inflight).drain() {
            token.cancel();
        }
        Ok(())
    }

    async fn did_open(&self, params: DidOpenTextDocumentParams) {
        let item = params.text_document;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let doc = Document::new(item.text, item.version, item.language_id);
        let open = Open {
            doc,
            seq,
            last_cursor: None,
            suggestion: None,
            edits: 0,
            background: None,
            next: None,
        };
        lock(&self.docs).insert(item.uri.clone(), open);
        self.warm(&item.uri);
    }

    async fn did_change(&self, params: DidChangeTextDocumentParams) {
        *lock(&self.activity) = tokio::time::Instant::now();
        let encoding = *lock(&self.encoding);
        let mut docs = lock(&self.docs);
        let Some(open) = docs.get_mut(&params.text_document.uri) else {
            tracing::warn!("didChange for {} which is not open", params.text_document.uri.as_str());
            return;
        };
        for change in &params.content_changes {
            open.suggestion = open.suggestion.take().and_then(|suggestion| {
                // A full-text change may well retype the document; it is no typing along.
                let range = change.range?;
                let start = open.doc.offset(range.start, encoding);
                let end = open.doc.offset(range.end, encoding).max(start);
                suggestion.edited(start, end, &change.text)
            });
            open.doc.apply(change, encoding);
            open.edits += 1;
        }
        // An edit that dropped the suggestion makes the rest of its generation useless.
        if open.suggestion.is_none()
            && let Some(seq) = open.background.take()
        {
            let mut inflight = lock(&self.inflight);
            if inflight.get(&params.text_document.uri).is_some_and(|(s, _)| *s == seq)
                && let Some((_, token)) = inflight.remove(&params.text_document.uri)
            {
                token.cancel();
            }
        }
        open.doc.version = params.text_document.version;
    }

    async fn did_save(&self, params: DidSaveTextDocumentParams) {
        self.warm(&params.text_document.uri);
    }

    async fn did_close(&self, params: DidCloseTextDocumentParams) {
        let uri = params.text_document.uri;
        if let Some(next) = lock(&self.docs).remove(&uri).and_then(|o| o.next) {
            next.token.cancel();
        }
        if let Some((_, token)) = lock(&self.inflight).remove(&uri) {
            token.cancel();
        }
    }

    async fn did_change_configuration(&self, params: DidChangeConfigurationParams) {
        if let Some(settings) = params.settings.get("m31r") {
            self.apply_settings(settings).await;
        }
    }

    async fn completion(&self, params: CompletionParams) -> RpcResult<Option<CompletionResponse>> {
        let position = params.text_document_position;
        let shown = self
            .complete(position.text_document.uri, position.position, None, Kind::Fallback)
            .await;
        let items = shown
            .into_iter()
            .map(|s| CompletionItem {
                label: s.text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().into(),
                kind: Some(CompletionItemKind::TEXT),
                detail: Some("m31r".into()),
                text_edit: Some(CompletionTextEdit::Edit(TextEdit::new(s.range, s.text))),
                ..CompletionItem::default()
            })
            .collect();
        // Incomplete: the client asks again as the user types, instead of filtering this one.
        Ok(Some(CompletionResponse::List(CompletionList { is_incomplete: true, items })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_cut_keeps_whole_lines_and_leaves_the_daemon_a_margin() {
        assert_eq!(complete_lines("let a = 1;\nlet b = 2;\nlet c"), "let a = 1;\nlet b = 2;");
        assert_eq!(complete_lines("let a = 1;\n"), "let a = 1;");
        assert_eq!(complete_lines("foo(ba"), "foo(ba");
        assert_eq!((deadline_ms(500), deadline_ms(1)), (400, 1));
    }
}
