//! Fill-in-the-middle prompt layout: the one definition of where prefix, suffix and middle go,
//! shared by training (which builds sequences) and serving (which builds budgeted prompts).
//!
//! # Layouts
//!
//! With `P`, `S`, `M` the encoded prefix, suffix and middle:
//!
//! - PSM: `<|fim_prefix|> P <|fim_suffix|> S <|fim_middle|> M <|endoftext|>`
//! - SPM: `<|fim_prefix|> <|fim_suffix|> S <|fim_middle|> P M <|endoftext|>`
//!
//! In SPM the prefix and the middle are one continuous text. Training uses both layouts;
//! serving uses SPM, because typing at the cursor then only appends to the prompt and the
//! daemon's KV cache of everything before the cursor stays valid.
//!
//! # Serving prompt
//!
//! [`serving_prompt`] lays out
//! `[<|file_sep|> path "\n" text]* <|fim_prefix|> <|fim_suffix|> S <|fim_middle|> P`
//! and fits it into [`FimBudget::max_prompt_tokens`] with these rules, applied in order:
//!
//! 0. Text the budget cannot reach is never encoded, so a huge prompt costs memory in proportion
//!    to the budget, not to its length: the prefix is cut to its tail and the suffix to its head
//!    by [`Tokenizer::tail_start`] and [`Tokenizer::head_end`] (at a line start, keeping at least
//!    the room in the longest tokens and at least 64 KiB; text within twice that is never cut),
//!    and a context file too long to fit in any tokenization is dropped unencoded. Cutting at a
//!    line start keeps every kept token as it is in the whole text; only the prefix's step
//!    alignment (rule 4) then counts from the cut rather than from the start of the text.
//! 1. The 3 FIM special tokens are always present; a budget below 3 + 1 tokens is
//!    [`FimError::BudgetTooSmall`].
//! 2. The suffix gets at most `suffix_share` of the budget and is cut from its far end: the
//!    text nearest the cursor is kept.
//! 3. Context files get what the suffix left. When they do not all fit, whole files are
//!    dropped from the first one onward until the rest fits, so callers should pass them
//!    ordered by relevance ascending (least relevant first, most relevant next to the cursor).
//!    This decision does not depend on the prefix, so typing never evicts a context file.
//! 4. The prefix gets the rest, including whatever the suffix did not use, and is cut from its
//!    far start by a multiple of `prefix_cut_step` tokens (the step is clamped to the prefix's
//!    room so a small budget is not wasted), moved forward by at most three tokens so the kept
//!    text starts on a character boundary. Since the cut only moves when the prefix grows past
//!    another whole step, it stays put across keystrokes and the cache stays valid.
//!
//! Cuts never split a UTF-8 character: the kept prefix is a suffix of the prefix text and the
//! kept suffix is a prefix of the suffix text, byte for byte.
//!
//! # Cache stability
//!
//! The prefix is encoded as `encode(head) + encode(last chunk)`, split at
//! [`Tokenizer::last_chunk_start`]. Typing at the cursor re-chunks only that last pre-token
//! chunk, so [`FimPrompt::stable_len`] (everything but the last chunk's tokens) is exactly the
//! part of the prompt that more typing leaves unchanged, as long as
//! [`FimPrompt::prefix_tokens_dropped`] stays the same.

use crate::tokenizer::{SpecialIds, Tokenizer, TokenizerError};

/// Number of special tokens every FIM prompt carries (prefix, suffix and middle markers).
pub const FIM_SPECIAL_TOKENS: usize = 3;

/// Order of the FIM pieces in a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FimMode {
    /// Prefix, suffix, middle.
    Psm,
    /// Suffix, then prefix and middle as one continuous text.
    Spm,
}

/// Why a serving prompt could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FimError {
    /// The budget cannot hold the FIM special tokens plus one token of text.
    #[error(
        "FIM budget of {max_prompt_tokens} tokens is too small: the layout needs {required} \
         ({FIM_SPECIAL_TOKENS} special tokens + 1)"
    )]
    BudgetTooSmall {
        /// The budget given.
        max_prompt_tokens: usize,
        /// The smallest budget that works.
        required: usize,
    },
    /// `suffix_share` is not a fraction in `[0, 1]`.
    #[error("FIM suffix_share = {value} is not a fraction in [0, 1]")]
    InvalidSuffixShare {
        /// The value given.
        value: f32,
    },
    /// `prefix_cut_step` is zero, which would make the prefix cut point move on every keystroke.
    #[error("FIM prefix_cut_step = 0: the prefix must be cut in steps of at least one token")]
    ZeroCutStep,
    /// Encoding the prompt text failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// How a serving prompt is fitted into the model's context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FimBudget {
    /// Most tokens the prompt may have; leave room in the context for the completion.
    pub max_prompt_tokens: usize,
    /// Largest fraction of `max_prompt_tokens` the suffix may take.
    pub suffix_share: f32,
    /// The prefix is cut from its start in multiples of this many tokens.
    pub prefix_cut_step: usize,
}

impl Default for FimBudget {
    fn default() -> Self {
        Self { max_prompt_tokens: 2048, suffix_share: 0.25, prefix_cut_step: 256 }
    }
}

/// A serving prompt and what was cut to fit it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FimPrompt {
    /// The prompt; the model continues it with the middle.
    pub ids: Vec<u32>,
    /// Number of leading ids that typing more text at the cursor cannot change, while
    /// `prefix_tokens_dropped` stays the same.
    pub stable_len: usize,
    /// Tokens cut from the start of the prefix (of the part that was encoded: see rule 0).
    pub prefix_tokens_dropped: usize,
    /// Tokens cut from the end of the suffix (of the part that was encoded: see rule 0).
    pub suffix_tokens_dropped: usize,
    /// Context files dropped, counted from the first one given.
    pub context_files_dropped: usize,
}

/// Lays out one training sequence; `prefix`, `middle` and `suffix` are encoded separately by
/// the caller.
pub fn training_sequence(
    special: &SpecialIds,
    mode: FimMode,
    prefix: &[u32],
    middle: &[u32],
    suffix: &[u32],
) -> Vec<u32> {
    let mut ids = Vec::with_capacity(prefix.len() + middle.len() + suffix.len() + 4);
    match mode {
        FimMode::Psm => {
            ids.push(special.fim_prefix);
            ids.extend_from_slice(prefix);
            ids.push(special.fim_suffix);
            ids.extend_from_slice(suffix);
            ids.push(special.fim_middle);
        }
        FimMode::Spm => {
            ids.push(special.fim_prefix);
            ids.push(special.fim_suffix);
            ids.extend_from_slice(suffix);
            ids.push(special.fim_middle);
            ids.extend_from_slice(prefix);
        }
    }
    ids.extend_from_slice(middle);
    ids.push(special.end_of_text);
    ids
}

/// Builds the SPM prompt for completing at the cursor between `prefix` and `suffix`, with
/// `context_files` (`(path, text)`, least relevant first) before it, fitted to `budget` by the
/// rules in the module docs.
pub fn serving_prompt(
    tok: &Tokenizer,
    context_files: &[(&str, &str)],
    prefix: &str,
    suffix: &str,
    budget: &FimBudget,
) -> Result<FimPrompt, FimError> {
    let required = FIM_SPECIAL_TOKENS + 1;
    if budget.max_prompt_tokens < required {
        return Err(FimError::BudgetTooSmall {
            max_prompt_tokens: budget.max_prompt_tokens,
            required,
        });
    }
    if !(0.0..=1.0).contains(&budget.suffix_share) {
        return Err(FimError::InvalidSuffixShare { value: budget.suffix_share });
    }
    if budget.prefix_cut_step == 0 {
        return Err(FimError::ZeroCutStep);
    }
    let special = tok.special_ids();
    let available = budget.max_prompt_tokens - FIM_SPECIAL_TOKENS;

    // Truncation toward zero keeps the suffix within its share.
    let suffix_cap = ((budget.max_prompt_tokens as f64 * f64::from(budget.suffix_share)) as usize)
        .min(available);
    // Text the budget cannot reach is cut before encoding (rule 0).
    let suffix = &suffix[..tok.head_end(suffix, suffix_cap)];
    let suffix_ids = tok.encode(suffix)?;
    let suffix_offsets = byte_offsets(tok, &suffix_ids)?;
    let mut suffix_kept = suffix_ids.len().min(suffix_cap);
    while suffix_kept > 0 && !suffix.is_char_boundary(suffix_offsets[suffix_kept]) {
        suffix_kept -= 1;
    }

    let context_room = available - suffix_kept;
    let (context, context_len) = fit_context_files(tok, context_files, context_room)?;
    let context_dropped = context_files.len() - context.len();

    let prefix_room = context_room - context_len;
    let prefix = &prefix[tok.tail_start(prefix, prefix_room)..];
    // Encoding the head and the last chunk separately makes the head's tokens independent of
    // what is typed next, which is what `stable_len` promises.
    let split = tok.last_chunk_start(prefix);
    let mut prefix_ids = tok.encode(&prefix[..split])?;
    let head_len = prefix_ids.len();
    prefix_ids.extend(tok.encode(&prefix[split..])?);
    let mut prefix_dropped = 0;
    if prefix_ids.len() > prefix_room {
        let step = budget.prefix_cut_step.min(prefix_room.max(1));
        prefix_dropped = (prefix_ids.len() - prefix_room)
            .div_ceil(step)
            .saturating_mul(step)
            .min(prefix_ids.len());
        let prefix_offsets = byte_offsets(tok, &prefix_ids)?;
        while prefix_dropped < prefix_ids.len()
            && !prefix.is_char_boundary(prefix_offsets[prefix_dropped])
        {
            prefix_dropped += 1;
        }
    }

    let mut ids = Vec::with_capacity(budget.max_prompt_tokens);
    for file in &context {
        ids.extend_from_slice(file);
    }
    ids.push(special.fim_prefix);
    ids.push(special.fim_suffix);
    ids.extend_from_slice(&suffix_ids[..suffix_kept]);
    ids.push(special.fim_middle);
    let stable_len = ids.len() + head_len.saturating_sub(prefix_dropped);
    ids.extend_from_slice(&prefix_ids[prefix_dropped..]);

    Ok(FimPrompt {
        ids,
        stable_len,
        prefix_tokens_dropped: prefix_dropped,
        suffix_tokens_dropped: suffix_ids.len() - suffix_kept,
        context_files_dropped: context_dropped,
    })
}

/// The context files that fit in `room` tokens (rule 3), each `<|file_sep|> path "\n" text`, and
/// their total length. Kept from the last file back while they fit, which keeps the same files
/// as dropping from the first one on until the rest fits, but never encodes a file before the
/// first one that does not fit, nor one too long in bytes to fit in any tokenization.
fn fit_context_files(
    tok: &Tokenizer,
    files: &[(&str, &str)],
    room: usize,
) -> Result<(Vec<Vec<u32>>, usize), TokenizerError> {
    let mut kept = Vec::new();
    let mut len = 0;
    for (path, text) in files.iter().rev() {
        let left = room - len;
        // A token holds at most `max_token_bytes`, so longer text has more tokens than `left`.
        if path.len() + 1 + text.len() > left.saturating_mul(tok.max_token_bytes()) {
            break;
        }
        let mut ids = vec![tok.special_ids().file_sep];
        ids.extend(tok.encode(&format!("{path}\n{text}"))?);
        if ids.len() > left {
            break;
        }
        len += ids.len();
        kept.push(ids);
    }
    kept.reverse();
    Ok((kept, len))
}

/// Byte offset in the encoded text where each token starts, plus the text's length at the end.
fn byte_offsets(tok: &Tokenizer, ids: &[u32]) -> Result<Vec<usize>, TokenizerError> {
    let mut offsets = Vec::with_capacity(ids.len() + 1);
    let mut at = 0;
    offsets.push(at);
    for &id in ids {
        at += tok.token_byte_len(id)?;
        offsets.push(at);
    }
    Ok(offsets)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::testing::{RUST_FIXTURE, TOK_1024, hermetic_config};

    /// One fixture file, long enough to exercise truncation.
    fn fixture() -> String {
        RUST_FIXTURE.concat()
    }

    fn position(ids: &[u32], id: u32) -> usize {
        ids.iter().position(|&x| x == id).unwrap()
    }

    /// Splits `text` into prefix, middle and suffix at two char boundaries picked from `a`, `b`.
    fn split3(text: &str, a: usize, b: usize) -> (&str, &str, &str) {
        let snap = |mut i: usize| {
            i %= text.len() + 1;
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            i
        };
        let (i, j) = (snap(a), snap(b));
        let (i, j) = (i.min(j), i.max(j));
        (&text[..i], &text[i..j], &text[j..])
    }

    proptest! {
        #![proptest_config(hermetic_config(256))]

        #[test]
        fn training_sequences_reassemble(a in any::<usize>(), b in any::<usize>()) {
            let tok = &*TOK_1024;
            let sp = tok.special_ids();
            let text = fixture();
            let (p, m, s) = split3(&text, a, b);
            let (pi, mi, si) = (tok.encode(p).unwrap(), tok.encode(m).unwrap(), tok.encode(s).unwrap());

            let psm = training_sequence(sp, FimMode::Psm, &pi, &mi, &si);
            prop_assert_eq!(psm.len(), pi.len() + mi.len() + si.len() + 4);
            prop_assert_eq!(psm[0], sp.fim_prefix);
            prop_assert_eq!(*psm.last().unwrap(), sp.end_of_text);
            let (fs, fm) = (position(&psm, sp.fim_suffix), position(&psm, sp.fim_middle));
            let dp = tok.decode(&psm[1..fs]).unwrap();
            let ds = tok.decode(&psm[fs + 1..fm]).unwrap();
            let dm = tok.decode(&psm[fm + 1..psm.len() - 1]).unwrap();
            prop_assert_eq!(format!("{dp}{dm}{ds}"), text.clone());

            let spm = training_sequence(sp, FimMode::Spm, &pi, &mi, &si);
            prop_assert_eq!(spm.len(), psm.len());
            prop_assert_eq!(&spm[..2], &[sp.fim_prefix, sp.fim_suffix]);
            prop_assert_eq!(*spm.last().unwrap(), sp.end_of_text);
            let fm = position(&spm, sp.fim_middle);
            let ds = tok.decode(&spm[2..fm]).unwrap();
            let dp = tok.decode(&spm[fm + 1..fm + 1 + pi.len()]).unwrap();
            let dm = tok.decode(&spm[fm + 1 + pi.len()..spm.len() - 1]).unwrap();
            prop_assert_eq!(format!("{dp}{dm}{ds}"), text);
        }
    }

    const TYPED: [char; 12] = ['a', 'Z', '_', '7', ' ', '\n', '{', '(', '.', ':', '"', 'ß'];

    /// Every `stride`-th char boundary of `text`, ends included.
    fn cut_points(text: &str, stride: usize) -> Vec<usize> {
        let mut cuts: Vec<usize> = text.char_indices().map(|(i, _)| i).step_by(stride).collect();
        cuts.push(text.len());
        cuts
    }

    #[test]
    fn spm_prompt_grows_by_appending() {
        let tok = &*TOK_1024;
        let text = fixture();
        let budget = FimBudget { max_prompt_tokens: 100_000, ..FimBudget::default() };
        let context = [("src/lib.rs", RUST_FIXTURE[0]), ("src/util.rs", "pub fn f() {}\n")];
        let (mut cases, mut strong) = (0usize, 0usize);
        for cut in cut_points(&text, 13) {
            let (prefix, suffix) = text.split_at(cut);
            let old = serving_prompt(tok, &context, prefix, suffix, &budget).unwrap();
            assert_eq!(old.prefix_tokens_dropped, 0);
            assert!(old.stable_len <= old.ids.len());
            for c in TYPED {
                let typed = format!("{prefix}{c}");
                let new = serving_prompt(tok, &context, &typed, suffix, &budget).unwrap();
                assert!(
                    new.ids.starts_with(&old.ids[..old.stable_len]),
                    "typing {c:?} at byte {cut} changed the stable part"
                );
                cases += 1;
                if new.ids.starts_with(&old.ids[..old.ids.len() - 1]) {
                    strong += 1;
                }
            }
        }
        eprintln!(
            "new prompt starts with all but the last old token in {strong}/{cases} cases ({:.4})",
            strong as f64 / cases as f64
        );
    }

    #[test]
    fn prompt_layout_without_truncation() {
        let tok = &*TOK_1024;
        let sp = tok.special_ids();
        let context = [("a.rs", "fn a() {}"), ("b.rs", "fn b() {}")];
        let p =
            serving_prompt(tok, &context, "fn main() { let x", " = 1; }", &FimBudget::default())
                .unwrap();
        let mut expected = vec![sp.file_sep];
        expected.extend(tok.encode("a.rs\nfn a() {}").unwrap());
        expected.push(sp.file_sep);
        expected.extend(tok.encode("b.rs\nfn b() {}").unwrap());
        expected.extend([sp.fim_prefix, sp.fim_suffix]);
        expected.extend(tok.encode(" = 1; }").unwrap());
        expected.push(sp.fim_middle);
        let stable = expected.len() + tok.encode("fn main() { let").unwrap().len();
        expected.extend(tok.encode("fn main() { let x").unwrap());
        assert_eq!(p.ids, expected);
        assert_eq!(p.stable_len, stable);
        assert_eq!(
            (p.prefix_tokens_dropped, p.suffix_tokens_dropped, p.context_files_dropped),
            (0, 0, 0)
        );
    }

    #[test]
    fn bad_budgets_are_refused() {
        let tok = &*TOK_1024;
        let small = FimBudget { max_prompt_tokens: 3, ..FimBudget::default() };
        let err = serving_prompt(tok, &[], "a", "b", &small).unwrap_err();
        assert!(matches!(err, FimError::BudgetTooSmall { max_prompt_tokens: 3, required: 4 }));
        assert!(err.to_string().contains('3') && err.to_string().contains('4'), "{err}");
        let tiny = FimBudget { max_prompt_tokens: 4, ..FimBudget::default() };
        let p = serving_prompt(tok, &[], "let x", "", &tiny).unwrap();
        assert!(p.ids.len() <= 4);
        for share in [-0.1, 1.5, f32::NAN] {
            let b = FimBudget { suffix_share: share, ..FimBudget::default() };
            assert!(matches!(
                serving_prompt(tok, &[], "a", "b", &b),
                Err(FimError::InvalidSuffixShare { .. })
            ));
        }
        let b = FimBudget { prefix_cut_step: 0, ..FimBudget::default() };
        assert!(matches!(serving_prompt(tok, &[], "a", "b", &b), Err(FimError::ZeroCutStep)));
    }

    #[test]
    fn context_files_are_dropped_least_relevant_first() {
        let tok = &*TOK_1024;
        let files = [
            ("old.rs", RUST_FIXTURE[0]),
            ("mid.rs", RUST_FIXTURE[2]),
            ("near.rs", "fn near() {}\n"),
        ];
        let sizes: Vec<usize> = files
            .iter()
            .map(|(p, t)| 1 + tok.encode(&format!("{p}\n{t}")).unwrap().len())
            .collect();
        // Room for the last two files and a short prefix, not for all three.
        let budget = FimBudget {
            max_prompt_tokens: FIM_SPECIAL_TOKENS + sizes[1] + sizes[2] + 8,
            suffix_share: 0.0,
            prefix_cut_step: 4,
        };
        let p = serving_prompt(tok, &files, "let y = ", "", &budget).unwrap();
        assert_eq!(p.context_files_dropped, 1);
        assert!(p.ids.len() <= budget.max_prompt_tokens);
        let sp = tok.special_ids();
        assert_eq!(p.ids.iter().filter(|&&id| id == sp.file_sep).count(), 2);
        let first_file = tok.decode(&p.ids[1..sizes[1]]).unwrap();
        assert!(first_file.starts_with("mid.rs\n"), "{first_file}");
    }

    #[test]
    fn huge_prompts_are_cut_before_encoding_with_the_same_result() {
        let tok = &*TOK_1024;
        let sp = tok.special_ids();
        let text = fixture();
        let line_start = |from: usize| {
            (from..text.len()).find(|&i| Tokenizer::is_encode_boundary(&text, i)).unwrap()
        };
        // Each longer than its room in tokens, yet short enough never to be cut before encoding.
        let prefix = &text[line_start(text.len() - 1500)..];
        let suffix = &text[..line_start(600)];
        let junk = text.repeat(300);
        let (big_prefix, big_suffix) = (format!("{junk}{prefix}"), format!("{suffix}{junk}"));
        let budget = FimBudget { max_prompt_tokens: 160, suffix_share: 0.25, prefix_cut_step: 1 };
        let near = ("near.rs", "fn near() {}\n");

        let small = serving_prompt(tok, &[("far.rs", &text), near], prefix, suffix, &budget);
        let small = small.unwrap();
        let big =
            serving_prompt(tok, &[("far.rs", &junk), near], &big_prefix, &big_suffix, &budget);
        let big = big.unwrap();
        let fm = position(&small.ids, sp.fim_middle);
        let kept_prefix = small.ids.len() - fm - 1;
        assert!(small.prefix_tokens_dropped > 0 && small.suffix_tokens_dropped > 0);
        assert_eq!(tok.tail_start(prefix, kept_prefix), 0, "the small prefix was cut");
        assert_eq!(tok.head_end(suffix, budget.max_prompt_tokens / 4), suffix.len());
        assert!(tok.tail_start(&big_prefix, kept_prefix) > 0);
        assert_eq!(big.ids, small.ids);
        assert_eq!(big.stable_len, small.stable_len);
        assert_eq!((big.context_files_dropped, small.context_files_dropped), (1, 1));

        // With whole steps the cut counts steps from the text kept, not the whole text; what is
        // kept is still the text nearest the cursor.
        let budget = FimBudget { prefix_cut_step: 32, ..budget };
        let big = serving_prompt(tok, &[], &big_prefix, &big_suffix, &budget).unwrap();
        assert!(big.ids.len() <= budget.max_prompt_tokens);
        let fm = position(&big.ids, sp.fim_middle);
        assert!(big_prefix.ends_with(&tok.decode(&big.ids[fm + 1..]).unwrap()));
        assert!(big_suffix.starts_with(&tok.decode(&big.ids[2..fm]).unwrap()));
    }

    #[test]
    fn truncation_keeps_text_near_the_cursor() {
        let tok = &*TOK_1024;
        let sp = tok.special_ids();
        let text = fixture();
        let budget = FimBudget { max_prompt_tokens: 160, suffix_share: 0.25, prefix_cut_step: 32 };
        let (mut cases, mut same_cut) = (0usize, 0usize);
        for cut in cut_points(&text, 23) {
            let (prefix, suffix) = text.split_at(cut);
            let old = serving_prompt(tok, &[], prefix, suffix, &budget).unwrap();
            assert!(old.ids.len() <= budget.max_prompt_tokens);
            assert!(old.prefix_tokens_dropped % budget.prefix_cut_step <= 3);
            let fm = position(&old.ids, sp.fim_middle);
            let kept_suffix = tok.decode(&old.ids[2..fm]).unwrap();
            let kept_prefix = tok.decode(&old.ids[fm + 1..]).unwrap();
            assert!(suffix.starts_with(&kept_suffix), "suffix cut at byte {cut}");
            assert!(prefix.ends_with(&kept_prefix), "prefix cut at byte {cut}");
            assert!(fm - 2 <= 40, "suffix took {} tokens", fm - 2);
            if old.prefix_tokens_dropped > 0 {
                // Unused suffix room went to the prefix: only a partial step is left over.
                assert!(old.ids.len() + budget.prefix_cut_step + 3 > budget.max_prompt_tokens);
            }
            assert_eq!(
                old.ids.len() - fm - 1 + old.prefix_tokens_dropped,
                tok.encode(prefix).unwrap().len()
            );
            assert_eq!(fm - 2 + old.suffix_tokens_dropped, tok.encode(suffix).unwrap().len());

            // Which whole step of overflow a prefix of `n` tokens is in; the cut may move only
            // when this changes.
            let room = budget.max_prompt_tokens - FIM_SPECIAL_TOKENS - (fm - 2);
            let step = budget.prefix_cut_step.min(room);
            let steps = |n: usize| n.saturating_sub(room).div_ceil(step);
            let old_steps = steps(tok.encode(prefix).unwrap().len());

            for c in TYPED {
                let typed = format!("{prefix}{c}");
                let new = serving_prompt(tok, &[], &typed, suffix, &budget).unwrap();
                assert!(new.ids.len() <= budget.max_prompt_tokens);
                cases += 1;
                if steps(tok.encode(&typed).unwrap().len()) == old_steps {
                    assert_eq!(
                        new.prefix_tokens_dropped, old.prefix_tokens_dropped,
                        "typing {c:?} at byte {cut} moved the cut within one step"
                    );
                }
                if new.prefix_tokens_dropped == old.prefix_tokens_dropped {
                    same_cut += 1;
                    assert!(new.ids.starts_with(&old.ids[..old.stable_len]));
                }
            }
        }
        let fraction = same_cut as f64 / cases as f64;
        eprintln!("prefix cut unchanged by one typed char in {same_cut}/{cases} cases");
        assert!(fraction > 0.85, "cut moved in too many cases: {fraction}");
    }
}
