//! Recall: a token n-gram model of the sequence being decoded, mixed into the network's
//! next-token distribution.
//!
//! Code repeats itself: a fifth of the lines an editor asks for already appear, verbatim, in the
//! prefix or suffix the prompt holds (`#[inline]`, `Ok(())`, a field list, a `match` arm shape).
//! A small network predicts the shape of such a line but often not its names. Recall counts, for
//! the longest run of the last tokens (up to [`RecallParams::max_order`]) that occurred before in
//! the sequence, which tokens followed it, and mixes those counts into the network's
//! probabilities with a weight that grows with the length of the match:
//!
//! `p(w) = (1 − λ) · softmax(logits)(w) + λ · count(w) / total`, `λ = weight · k / (k + half)`
//!
//! where `k` is the matched length. Without a match `p` is the network's. This is the cache
//! language model of speech recognition and of the code-naturalness studies, over the tokens the
//! model can see (its window), so the mixture is a function of the same context as the network:
//! the daemon and `m31r-train eval` compute exactly the same choice. The greedy pick of the
//! mixture is deterministic. The defaults were chosen on the validation split (docs/eval.md).

/// How recall is mixed in. In config files and on command lines: `off` or
/// `ORDER,WEIGHT,HALF`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RecallParams {
    /// Longest context (in tokens) matched against earlier text; 0 turns recall off.
    pub max_order: usize,
    /// The mixture weight approached by long matches, in `[0, 1)`.
    pub weight: f32,
    /// Matched length (tokens) at which λ is half of `weight`.
    pub half: f32,
}

impl RecallParams {
    /// Recall off: the network's distribution alone.
    pub const OFF: RecallParams = RecallParams { max_order: 0, weight: 0.0, half: 1.0 };

    /// The defaults, chosen on the validation split of the CPU recipe (docs/eval.md).
    pub const DEFAULT: RecallParams = RecallParams { max_order: 16, weight: 0.9, half: 4.0 };

    /// Whether recall changes anything.
    pub fn is_on(&self) -> bool {
        self.max_order > 0 && self.weight > 0.0
    }

    /// Checks the ranges; the error names the value at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_order > 64 {
            return Err(format!("recall order {} is above 64", self.max_order));
        }
        if !(self.weight.is_finite() && (0.0..1.0).contains(&self.weight)) {
            return Err(format!("recall weight {} is not in [0, 1)", self.weight));
        }
        if !(self.half.is_finite() && self.half > 0.0) {
            return Err(format!("recall half-length {} is not a positive number", self.half));
        }
        Ok(())
    }

    /// Parses `off` or `ORDER,WEIGHT,HALF` (e.g. `8,0.7,2`); the error names the value.
    pub fn parse(text: &str) -> Result<RecallParams, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") {
            return Ok(RecallParams::OFF);
        }
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        let [order, weight, half] = parts[..] else {
            return Err(format!(
                "recall {text:?}: expected `off` or ORDER,WEIGHT,HALF (e.g. 8,0.7,2)"
            ));
        };
        let bad = |what: &str, v: &str| format!("recall {text:?}: {what} {v:?} is not a number");
        let params = RecallParams {
            max_order: order.parse().map_err(|_| bad("order", order))?,
            weight: weight.parse().map_err(|_| bad("weight", weight))?,
            half: half.parse().map_err(|_| bad("half-length", half))?,
        };
        params.validate()?;
        Ok(params)
    }

    /// λ for a match of `order` tokens.
    pub fn lambda(&self, order: usize) -> f32 {
        if order == 0 {
            return 0.0;
        }
        let k = order as f32;
        self.weight * k / (k + self.half)
    }
}

impl std::fmt::Display for RecallParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_on() {
            write!(f, "{},{},{}", self.max_order, self.weight, self.half)
        } else {
            f.write_str("off")
        }
    }
}

impl TryFrom<String> for RecallParams {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        RecallParams::parse(&text)
    }
}

impl From<RecallParams> for String {
    fn from(params: RecallParams) -> String {
        params.to_string()
    }
}

impl std::str::FromStr for RecallParams {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        RecallParams::parse(text)
    }
}

impl Default for RecallParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What recall predicts at the end of the sequence: the matched length and the tokens that
/// followed earlier occurrences of that context, with their counts (ascending by id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recalled {
    /// Length of the longest context that occurred before (0: none).
    pub order: usize,
    /// `(token, count)` pairs.
    pub counts: Vec<(u32, u32)>,
    /// Sum of the counts.
    pub total: u32,
}

impl Recalled {
    /// The count of `token`.
    pub fn count(&self, token: u32) -> u32 {
        self.counts.binary_search_by_key(&token, |&(t, _)| t).map_or(0, |i| self.counts[i].1)
    }
}

/// One sequence's tokens, extended a token at a time, and what followed its contexts.
///
/// Finding the longest earlier match scans the sequence for the last token (a few thousand
/// comparisons at most, microseconds), so nothing is indexed and a prompt costs nothing to add.
#[derive(Debug, Clone)]
pub struct Recall {
    params: RecallParams,
    ids: Vec<u32>,
    /// Tokens `ids[..source]` are text that was given (a prompt, a document); only they are
    /// recalled as continuations. Generated tokens take part in matching the context but are
    /// never recalled, so a completion cannot feed on its own repetitions (`Copy, Copy, …`).
    source: usize,
    /// The segment of each token: a context never spans two segments, and the first token of a
    /// segment is never recalled as what followed the end of the one before.
    segment: Vec<u32>,
    /// The segment new tokens belong to.
    next_segment: u32,
}

impl Recall {
    /// An empty sequence.
    pub fn new(params: RecallParams) -> Self {
        Self { params, ids: Vec::new(), source: 0, segment: Vec::new(), next_segment: 0 }
    }

    /// The parameters.
    pub fn params(&self) -> &RecallParams {
        &self.params
    }

    /// Tokens seen.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no token was seen.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Forgets the sequence.
    pub fn clear(&mut self) {
        self.ids.clear();
        self.segment.clear();
        self.next_segment = 0;
        self.source = 0;
    }

    /// Forgets every token from position `n` on (`n` above [`Recall::len`] is a no-op): rolls
    /// back generated tokens, so that a sequence can be extended again from there.
    pub fn truncate(&mut self, n: usize) {
        self.ids.truncate(n);
        self.segment.truncate(n);
        self.source = self.source.min(n);
    }

    /// Starts a new segment: text that does not continue what came before (another file, the
    /// suffix after the prefix). Nothing is recalled across the seam.
    pub fn begin_segment(&mut self) {
        if !self.ids.is_empty() {
            self.next_segment += 1;
        }
    }

    /// Starts over on a request: each of `file_text` (the ids of the text around the cursor, as
    /// [`SourceTokens::around_cursor`] gives them) as its own segment, then `prompt` as one.
    /// The daemon and `eval` both begin a completion this way.
    pub fn start(&mut self, file_text: &[Vec<u32>], prompt: &[u32]) {
        self.clear();
        for segment in file_text {
            self.begin_segment();
            self.extend_source(segment);
        }
        self.begin_segment();
        self.extend_source(prompt);
    }

    /// Appends given text (a prompt, a document being scored): from now on everything up to
    /// here may be recalled.
    pub fn extend_source(&mut self, ids: &[u32]) {
        self.ids.extend_from_slice(ids);
        self.segment.resize(self.ids.len(), self.next_segment);
        self.source = self.ids.len();
    }

    /// Appends a generated token: it extends the context that is matched, and is never
    /// recalled itself.
    pub fn push_generated(&mut self, id: u32) {
        self.ids.push(id);
        self.segment.push(self.next_segment);
    }

    /// What followed the longest earlier occurrence (at most `max_order` tokens) of the
    /// sequence's last tokens.
    pub fn recalled(&self) -> Recalled {
        let ids = &self.ids;
        let n = ids.len();
        let max = self.params.max_order.min(n.saturating_sub(1));
        if !self.params.is_on() || max == 0 {
            return Recalled::default();
        }
        let last = ids[n - 1];
        let seg = &self.segment;
        let mut best = Recalled::default();
        // `p` is the position of a given token that followed an earlier occurrence of `last`
        // in its own segment.
        for p in 1..self.source.min(n) {
            if ids[p - 1] != last || seg[p - 1] != seg[p] {
                continue;
            }
            let mut order = 1;
            while order < max
                && order < p
                && seg[p - 1 - order] == seg[p]
                && seg[n - 1 - order] == seg[n - 1]
                && ids[p - 1 - order] == ids[n - 1 - order]
            {
                order += 1;
            }
            if order < best.order {
                continue;
            }
            if order > best.order {
                best.order = order;
                best.counts.clear();
                best.total = 0;
            }
            let token = ids[p];
            match best.counts.binary_search_by_key(&token, |&(t, _)| t) {
                Ok(i) => best.counts[i].1 += 1,
                Err(i) => best.counts.insert(i, (token, 1)),
            }
            best.total += 1;
        }
        best
    }

    /// Rewrites `logits` (the network's, at the end of the sequence) so that their softmax is
    /// the mixture: only the recalled tokens change. Greedy picks, temperature sampling and
    /// constrained picks then all see the mixture. Returns what was recalled.
    pub fn mix_into(&self, logits: &mut [f32]) -> Recalled {
        let recalled = self.recalled();
        if recalled.total == 0 || logits.is_empty() {
            return recalled;
        }
        let lambda = f64::from(self.params.lambda(recalled.order));
        let (max, sum) = softmax_parts(logits);
        if !max.is_finite() {
            // No finite logit: nothing to mix with; leave the row to the sampler's rules.
            return recalled;
        }
        // Every other logit keeps its value: with the normaliser Z = e^max · sum / (1 − λ), its
        // softmax share is (1 − λ)·softmax, the mixture's. A recalled token's logit becomes
        // ln(p · Z) for its mixture probability p.
        let ln_z = f64::from(max) + sum.ln() - (1.0 - lambda).ln();
        let total = f64::from(recalled.total);
        for &(token, count) in &recalled.counts {
            let Some(l) = logits.get_mut(token as usize) else { continue };
            let net = if l.is_finite() { f64::from(*l - max).exp() / sum } else { 0.0 };
            let p = (1.0 - lambda) * net + lambda * f64::from(count) / total;
            *l = (p.ln() + ln_z) as f32;
        }
        recalled
    }
}

/// Most bytes of the text before the cursor that recall reads beyond the prompt (the language
/// server sends at most 64 KiB of it), taken from the end.
pub const SOURCE_PREFIX_BYTES: usize = 64 * 1024;
/// Most bytes of the text after the cursor that recall reads, taken from the start.
pub const SOURCE_SUFFIX_BYTES: usize = 64 * 1024;
/// Chunks a [`SourceTokens`] cache holds by default: at most 2 KiB of text each, about 1.5 MB
/// of ids in all, room for several files' worth of both sides of the cursor.
pub const SOURCE_CACHE_CHUNKS: usize = 512;

/// The part of `text` recall reads: its last `max` bytes (`from_end`) or its first, cut at a
/// character boundary.
pub fn source_window(text: &str, max: usize, from_end: bool) -> &str {
    if text.len() <= max {
        return text;
    }
    if from_end {
        let mut start = text.len() - max;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        &text[start..]
    } else {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[..end]
    }
}

/// Token ids of the file text recall reads beyond the prompt, encoded in chunks that end at
/// line ends where the content says so (a line whose hash is 0 mod 8, once a chunk has 256
/// bytes; every 2 KiB at the latest). A chunk is cached by its content, so a keystroke
/// re-encodes only the chunk it changed, about a millisecond, where the whole 64 KiB would take
/// about 15. The cache holds at most `max_chunks` chunks (least recently used go first).
#[derive(Debug)]
pub struct SourceTokens {
    chunks: std::collections::HashMap<u64, (Vec<u32>, u64)>,
    clock: u64,
    max_chunks: usize,
}

/// Chunks of at least this many bytes may end at a line whose hash says so.
const CHUNK_MIN: usize = 256;
/// Chunks end at the first line end past this many bytes.
const CHUNK_MAX: usize = 2048;

impl SourceTokens {
    /// An empty cache of at most `max_chunks` chunks.
    pub fn new(max_chunks: usize) -> Self {
        Self { chunks: std::collections::HashMap::new(), clock: 0, max_chunks: max_chunks.max(1) }
    }

    /// Chunks held now.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The ids of the file text recall reads around a cursor: the last [`SOURCE_PREFIX_BYTES`]
    /// of `before` and, when given (a FIM request), the first [`SOURCE_SUFFIX_BYTES`] of
    /// `after`, each a segment of [`Recall::start`].
    pub fn around_cursor(
        &mut self,
        tokenizer: &crate::Tokenizer,
        before: &str,
        after: Option<&str>,
    ) -> Result<Vec<Vec<u32>>, crate::tokenizer::TokenizerError> {
        let mut segments =
            vec![self.encode(tokenizer, source_window(before, SOURCE_PREFIX_BYTES, true))?];
        if let Some(after) = after {
            segments
                .push(self.encode(tokenizer, source_window(after, SOURCE_SUFFIX_BYTES, false))?);
        }
        Ok(segments)
    }

    /// The ids of `text`, chunk by chunk (each chunk encoded on its own).
    pub fn encode(
        &mut self,
        tokenizer: &crate::Tokenizer,
        text: &str,
    ) -> Result<Vec<u32>, crate::tokenizer::TokenizerError> {
        use std::hash::{Hash, Hasher};
        let mut ids = Vec::with_capacity(text.len() / 3);
        for chunk in chunks(text) {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            chunk.hash(&mut hasher);
            let key = hasher.finish();
            self.clock += 1;
            let clock = self.clock;
            if let Some((cached, used)) = self.chunks.get_mut(&key) {
                *used = clock;
                ids.extend_from_slice(cached);
                continue;
            }
            let encoded = tokenizer.encode(chunk)?;
            ids.extend_from_slice(&encoded);
            if self.chunks.len() >= self.max_chunks {
                // Evict the least recently used eighth in one pass.
                let mut uses: Vec<u64> = self.chunks.values().map(|(_, u)| *u).collect();
                let cut = uses.len() / 8;
                uses.select_nth_unstable(cut);
                let below = uses[cut];
                self.chunks.retain(|_, (_, u)| *u > below);
            }
            self.chunks.insert(key, (encoded, clock));
        }
        Ok(ids)
    }
}

/// `text` cut into the chunks [`SourceTokens`] encodes: each ends at a line end (or the text's).
fn chunks(text: &str) -> impl Iterator<Item = &str> {
    use std::hash::{Hash, Hasher};
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = 0;
        for line in rest.split_inclusive('\n') {
            end += line.len();
            if !line.ends_with('\n') {
                break;
            }
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            line.hash(&mut hasher);
            if end >= CHUNK_MAX || (end >= CHUNK_MIN && hasher.finish().is_multiple_of(8)) {
                break;
            }
        }
        let (chunk, tail) = rest.split_at(end);
        rest = tail;
        Some(chunk)
    })
}

/// The row's largest finite logit and `Σ exp(l − max)` over its finite logits (f64); a
/// non-finite logit has no mass.
fn softmax_parts(logits: &[f32]) -> (f32, f64) {
    let finite = || logits.iter().copied().filter(|l| l.is_finite());
    let max = finite().fold(f32::NEG_INFINITY, f32::max);
    let sum = finite().map(|l| f64::from(l - max).exp()).sum();
    (max, sum)
}

/// `softmax(logits)[i]` in f64 (0 for a non-finite logit, or when none is finite).
pub fn softmax_at(logits: &[f32], i: usize) -> f64 {
    let (max, sum) = softmax_parts(logits);
    match logits.get(i) {
        Some(&l) if l.is_finite() && max.is_finite() => f64::from(l - max).exp() / sum,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recall(ids: &[u32]) -> Recall {
        let mut r = Recall::new(RecallParams { max_order: 4, weight: 0.8, half: 1.0 });
        r.extend_source(ids);
        r
    }

    #[test]
    fn generated_tokens_match_contexts_but_are_never_recalled() {
        let mut r = recall(&[1, 2, 3, 5]);
        r.push_generated(1);
        r.push_generated(2);
        // "1 2" was followed by 3 in the given text.
        assert_eq!(r.recalled().counts, vec![(3, 1)]);
        // A generated loop "7 7 7" recalls nothing of itself.
        let mut r = recall(&[1]);
        for _ in 0..4 {
            r.push_generated(7);
        }
        assert_eq!(r.recalled(), Recalled::default());
        r.clear();
        assert!(r.is_empty());
    }

    #[test]
    fn truncating_generated_tokens_gives_back_the_sequence_before_them() {
        let base = recall(&[1, 2, 3, 5, 1, 2]);
        let mut r = base.clone();
        r.push_generated(3);
        r.push_generated(9);
        r.truncate(base.len());
        assert_eq!((r.len(), r.recalled()), (base.len(), base.recalled()));
        r.push_generated(3);
        let mut fresh = base.clone();
        fresh.push_generated(3);
        assert_eq!(r.recalled(), fresh.recalled());
    }

    #[test]
    fn the_longest_earlier_context_wins_and_counts_what_followed() {
        // "1 2 3" was followed by 4 once; "3" alone by 4 and by 9.
        let r = recall(&[1, 2, 3, 4, 7, 3, 9, 1, 2, 3]);
        let got = r.recalled();
        assert_eq!((got.order, got.counts.clone(), got.total), (3, vec![(4, 1)], 1));
        assert_eq!(got.count(4), 1);
        assert_eq!(got.count(9), 0);
        let r = recall(&[5, 3, 4, 6, 3, 9, 8, 3]);
        let got = r.recalled();
        assert_eq!((got.order, got.counts, got.total), (1, vec![(4, 1), (9, 1)], 2));
    }

    #[test]
    fn nothing_is_recalled_across_a_seam() {
        // "1 2" then, in a new segment, "3": 3 never followed "1 2" in one text.
        let mut r = recall(&[1, 2]);
        r.begin_segment();
        r.extend_source(&[3, 1, 2]);
        assert_eq!(r.recalled(), Recalled::default());
        // Within a segment it is: "9 1 2 | 5 … 1 2" recalls 5 at order 2.
        let mut r = recall(&[9]);
        r.begin_segment();
        r.extend_source(&[1, 2, 5, 1, 2]);
        assert_eq!((r.recalled().order, r.recalled().counts), (2, vec![(5, 1)]));
        // The matched context stops at the seam: "9 | 1 2 5 … 9 1 2" matches "1 2" only.
        r.extend_source(&[9, 1, 2]);
        assert_eq!(r.recalled().order, 2);
    }

    #[test]
    fn the_order_is_capped_and_nothing_is_recalled_without_a_match_or_when_off() {
        let r = recall(&[1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5]);
        assert_eq!(r.recalled().order, 4);
        assert_eq!(recall(&[1, 2, 3]).recalled(), Recalled::default());
        assert_eq!(recall(&[]).recalled(), Recalled::default());
        let mut off = Recall::new(RecallParams::OFF);
        off.extend_source(&[1, 2, 1]);
        assert_eq!(off.recalled(), Recalled::default());
    }

    #[test]
    fn mixed_logits_have_the_mixture_as_their_softmax() {
        let r = recall(&[1, 2, 3, 1, 2]);
        let net = vec![0.5f32, 1.0, -0.3, 2.0, 0.1];
        let mut mixed = net.clone();
        let got = r.mix_into(&mut mixed);
        assert_eq!((got.order, got.total), (2, 1));
        let lambda = f64::from(r.params().lambda(2));
        for t in 0..net.len() {
            let want = (1.0 - lambda) * softmax_at(&net, t) + if t == 3 { lambda } else { 0.0 };
            assert!((softmax_at(&mixed, t) - want).abs() < 1e-6, "token {t}");
        }
        // Token 3 followed "1 2" and now beats the network's favourite.
        assert_eq!(crate::sampling::argmax(&mixed), 3);
        // Nothing recalled: the logits are untouched.
        let mut same = net.clone();
        recall(&[7, 8]).mix_into(&mut same);
        assert_eq!(same, net);
    }

    #[test]
    fn a_strong_network_keeps_its_pick_against_a_weak_match() {
        let r = recall(&[4, 0, 4]);
        let mut logits = vec![-5.0f32, 0.0, 9.0, 0.0, 0.0];
        r.mix_into(&mut logits);
        // λ(1) = 0.4: token 0 gets 0.4, token 2 keeps about 0.6 of its ≈1.
        assert_eq!(crate::sampling::argmax(&logits), 2);
    }

    #[test]
    fn non_finite_logits_get_no_mass_and_break_nothing() {
        let r = recall(&[1, 2, 1]);
        let mut row = vec![0.0f32, f32::NEG_INFINITY, 1.0, f32::NAN];
        r.mix_into(&mut row);
        assert!(row[2].is_finite() && row[0].is_finite());
        // Token 2 followed "1": its mixed logit is finite and now the best.
        assert_eq!(crate::sampling::argmax(&row), 2);
        assert_eq!(softmax_at(&row, 3), 0.0);
        let mut none = vec![f32::NAN; 3];
        recall(&[1, 2, 1]).mix_into(&mut none);
        assert!(none.iter().all(|l| l.is_nan()));
    }

    #[test]
    fn source_chunks_cover_the_text_end_at_lines_and_survive_edits_elsewhere() {
        let text: String =
            (0..400).map(|i| format!("    let value_{i} = compute({i}, &mut state);\n")).collect();
        let parts: Vec<&str> = chunks(&text).collect();
        assert_eq!(parts.concat(), text);
        assert!(parts.len() > 4, "{}", parts.len());
        for part in &parts {
            assert!(part.ends_with('\n') && part.len() <= CHUNK_MAX + 64, "{}", part.len());
        }
        // Typing at the end changes the last chunk only (it grows, or a new one follows it).
        let typed = format!("{text}    let x");
        let again: Vec<&str> = chunks(&typed).collect();
        let kept = parts.len() - 1;
        assert_eq!(again[..kept], parts[..kept]);
        assert_eq!(again[kept..].concat(), format!("{}    let x", parts[kept]));
        assert!(chunks("").next().is_none());
        assert_eq!(chunks("no newline").collect::<Vec<_>>(), ["no newline"]);
    }

    #[test]
    fn source_tokens_are_the_chunks_encodings_cached_and_bounded() {
        let text: String =
            (0..300).map(|i| format!("fn f{i}(x: u32) -> u32 {{ x + {i} }}\n")).collect();
        let tok = crate::Tokenizer::train([text.as_str()].iter(), 300).unwrap();
        let mut cache = SourceTokens::new(1000);
        let ids = cache.encode(&tok, &text).unwrap();
        let want: Vec<u32> = chunks(&text).flat_map(|c| tok.encode(c).unwrap()).collect();
        assert_eq!(ids, want);
        let held = cache.len();
        assert_eq!(held, chunks(&text).count());
        assert_eq!(cache.encode(&tok, &text).unwrap(), ids);
        assert_eq!(cache.len(), held, "a second pass hits the cache");
        let mut small = SourceTokens::new(4);
        assert_eq!(small.encode(&tok, &text).unwrap(), ids);
        assert!(small.len() <= 4, "{}", small.len());
    }

    #[test]
    fn source_windows_cut_at_character_boundaries() {
        assert_eq!(source_window("abc", 10, true), "abc");
        assert_eq!(source_window("abcdef", 2, true), "ef");
        assert_eq!(source_window("abcdef", 2, false), "ab");
        // "é" is two bytes: a cut inside it moves to its edge.
        assert_eq!(source_window("xé", 1, true), "");
        assert_eq!(source_window("éx", 1, false), "");
    }

    #[test]
    fn params_parse_validate_and_print() {
        assert_eq!(RecallParams::parse("off").unwrap(), RecallParams::OFF);
        let p = RecallParams::parse("16, 0.9, 4").unwrap();
        assert_eq!(p, RecallParams { max_order: 16, weight: 0.9, half: 4.0 });
        assert_eq!(p.to_string(), "16,0.9,4");
        assert_eq!(RecallParams::OFF.to_string(), "off");
        for bad in ["", "8,0.5", "x,0.5,1", "8,1.0,1", "8,-0.1,1", "8,0.5,0", "99,0.5,1"] {
            let err = RecallParams::parse(bad).unwrap_err();
            assert!(err.contains("recall"), "{bad}: {err}");
        }
        assert!((p.lambda(4) - 0.45).abs() < 1e-6);
        assert_eq!(p.lambda(0), 0.0);
    }
}
