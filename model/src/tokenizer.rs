//! The byte-level BPE tokenizer: training, loading and validating `tokenizer.json`, and the
//! special-token contract every other module relies on.
//!
//! The pipeline is the one LLaMA-3 ships in its `tokenizer.json` (no normalizer, a regex split
//! followed by a byte-level mapping, a byte-level decoder, no post-processor), so the files this
//! module writes load unchanged in llama.cpp and Hugging Face `tokenizers`.
//!
//! Special tokens are control signals for the model, never text: [`Tokenizer::encode`] encodes a
//! source file that happens to contain `<|fim_prefix|>` as ordinary bytes, so user code can never
//! forge a FIM layout.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, OffsetReferential, OffsetType, PreTokenizedString,
    PreTokenizer, PreTokenizerWrapper, SplitDelimiterBehavior,
};

/// The pre-tokenizer split regex of LLaMA-3, which llama.cpp calls the `llama-bpe` pre-tokenizer.
///
/// Digits are grouped by at most three and whitespace before a word stays attached to it, which
/// keeps indentation runs and identifiers as separate, reusable pieces for code.
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Number of distinct byte tokens a byte-level BPE needs so that any UTF-8 text encodes.
pub const BYTE_ALPHABET_SIZE: usize = 256;

/// Smallest vocabulary [`Tokenizer::train`] accepts: every byte plus every special token.
pub const MIN_VOCAB_SIZE: usize = BYTE_ALPHABET_SIZE + SpecialToken::ALL.len();

/// Least number of bytes [`Tokenizer::cut_bytes`] gives: text this short costs little to encode,
/// and prompts of ordinary length are then never cut before encoding, whatever the budget.
pub const MIN_CUT_BYTES: usize = 64 << 10;

/// Why a tokenizer could not be trained, loaded, saved or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The requested vocabulary cannot hold the byte alphabet and the special tokens.
    #[error(
        "vocab_size {requested} is too small: a byte-level BPE needs at least {minimum} \
         ({BYTE_ALPHABET_SIZE} byte tokens + {} special tokens)",
        SpecialToken::ALL.len()
    )]
    VocabTooSmall {
        /// The vocabulary size asked for.
        requested: usize,
        /// The smallest size that works.
        minimum: usize,
    },
    /// The fixed pipeline (regex, model) could not be constructed.
    #[error("cannot build the byte-level BPE pipeline: {reason}")]
    Build {
        /// What the `tokenizers` crate reported.
        reason: String,
    },
    /// BPE training failed.
    #[error("BPE training failed: {reason}")]
    Train {
        /// What the `tokenizers` crate reported.
        reason: String,
    },
    /// The tokenizer file could not be read.
    #[error("cannot read tokenizer file {}: {source}", path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// The I/O failure.
        source: std::io::Error,
    },
    /// The tokenizer JSON is not a valid `tokenizers` file.
    #[error("cannot parse tokenizer {origin}: {reason}")]
    Parse {
        /// The file (or buffer) being loaded.
        origin: String,
        /// What the parser reported.
        reason: String,
    },
    /// A required special token is absent from the vocabulary.
    #[error("tokenizer {origin} has no special token {token}")]
    MissingSpecial {
        /// The file (or buffer) being loaded.
        origin: String,
        /// The missing token.
        token: &'static str,
    },
    /// A special token is in the vocabulary but not registered as a special added token, so it
    /// would be neither protected from user text nor skipped when decoding.
    #[error("token {token} in tokenizer {origin} is not registered as a special added token")]
    NotSpecial {
        /// The file (or buffer) being loaded.
        origin: String,
        /// The offending token.
        token: &'static str,
    },
    /// A special token does not map to exactly one id.
    #[error("special token {token} in tokenizer {origin} encodes to {ids:?}, not a single id")]
    SpecialNotSingleId {
        /// The file (or buffer) being loaded.
        origin: String,
        /// The offending token.
        token: &'static str,
        /// What it encoded to.
        ids: Vec<u32>,
    },
    /// Two special tokens share one id, so the model could not tell them apart.
    #[error("special tokens {first} and {second} in tokenizer {origin} share id {id}")]
    DuplicateSpecialId {
        /// The file (or buffer) being loaded.
        origin: String,
        /// The first token with that id.
        first: &'static str,
        /// The second token with that id.
        second: &'static str,
        /// The shared id.
        id: u32,
    },
    /// The decoder is not byte-level, so ids would not round-trip to the exact source bytes.
    #[error("tokenizer {origin} does not use a ByteLevel decoder; M31R needs a byte-level BPE")]
    NotByteLevel {
        /// The file (or buffer) being loaded.
        origin: String,
    },
    /// Encoding failed inside the `tokenizers` crate.
    #[error("cannot encode a {len}-byte text: {reason}")]
    Encode {
        /// Length of the text in bytes.
        len: usize,
        /// What the `tokenizers` crate reported.
        reason: String,
    },
    /// Encoding ordinary text produced a control token; only a foreign `tokenizer.json` whose
    /// pre-tokenizer keeps `<|...|>` whole can cause this.
    #[error(
        "encoding text produced special token {token} (id {id}); the pre-tokenizer must split it"
    )]
    SpecialInEncoding {
        /// The special token produced.
        token: &'static str,
        /// Its id.
        id: u32,
    },
    /// An id passed to decoding is not in the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    UnknownId {
        /// The offending id.
        id: u32,
        /// The vocabulary size, added tokens included.
        vocab_size: usize,
    },
    /// Decoding failed inside the `tokenizers` crate.
    #[error("cannot decode {count} ids: {reason}")]
    Decode {
        /// Number of ids being decoded.
        count: usize,
        /// What the `tokenizers` crate reported.
        reason: String,
    },
    /// The tokenizer could not be serialised to JSON.
    #[error("cannot serialise the tokenizer to JSON: {reason}")]
    Serialize {
        /// What the serialiser reported.
        reason: String,
    },
    /// The tokenizer file could not be written.
    #[error("cannot write tokenizer file {}: {source}", path.display())]
    Write {
        /// The destination file.
        path: PathBuf,
        /// The I/O failure.
        source: std::io::Error,
    },
}

/// The control tokens of M31R's vocabulary, in id order: a trained tokenizer gives them ids
/// `0..8` in exactly this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpecialToken {
    /// `<|endoftext|>`: ends a document or a completion.
    EndOfText,
    /// `<|fim_prefix|>`: opens a fill-in-the-middle block.
    FimPrefix,
    /// `<|fim_suffix|>`: precedes the text after the cursor.
    FimSuffix,
    /// `<|fim_middle|>`: precedes the text the model fills in.
    FimMiddle,
    /// `<|fim_pad|>`: padding for FIM batches.
    FimPad,
    /// `<|file_sep|>`: separates repository files given as context.
    FileSep,
    /// `<|repo_name|>`: precedes a repository name.
    RepoName,
    /// `<|cot|>`: reserved for reasoning traces.
    Cot,
}

impl SpecialToken {
    /// Every special token, in id order.
    pub const ALL: [SpecialToken; 8] = [
        SpecialToken::EndOfText,
        SpecialToken::FimPrefix,
        SpecialToken::FimSuffix,
        SpecialToken::FimMiddle,
        SpecialToken::FimPad,
        SpecialToken::FileSep,
        SpecialToken::RepoName,
        SpecialToken::Cot,
    ];

    /// The token's text as it appears in `tokenizer.json`.
    pub const fn as_str(self) -> &'static str {
        match self {
            SpecialToken::EndOfText => "<|endoftext|>",
            SpecialToken::FimPrefix => "<|fim_prefix|>",
            SpecialToken::FimSuffix => "<|fim_suffix|>",
            SpecialToken::FimMiddle => "<|fim_middle|>",
            SpecialToken::FimPad => "<|fim_pad|>",
            SpecialToken::FileSep => "<|file_sep|>",
            SpecialToken::RepoName => "<|repo_name|>",
            SpecialToken::Cot => "<|cot|>",
        }
    }
}

impl fmt::Display for SpecialToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The ids of the special tokens in one particular vocabulary, resolved and validated at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    /// Id of `<|endoftext|>`.
    pub end_of_text: u32,
    /// Id of `<|fim_prefix|>`.
    pub fim_prefix: u32,
    /// Id of `<|fim_suffix|>`.
    pub fim_suffix: u32,
    /// Id of `<|fim_middle|>`.
    pub fim_middle: u32,
    /// Id of `<|fim_pad|>`.
    pub fim_pad: u32,
    /// Id of `<|file_sep|>`.
    pub file_sep: u32,
    /// Id of `<|repo_name|>`.
    pub repo_name: u32,
    /// Id of `<|cot|>`.
    pub cot: u32,
}

impl SpecialIds {
    /// The id of `token`.
    pub const fn get(&self, token: SpecialToken) -> u32 {
        match token {
            SpecialToken::EndOfText => self.end_of_text,
            SpecialToken::FimPrefix => self.fim_prefix,
            SpecialToken::FimSuffix => self.fim_suffix,
            SpecialToken::FimMiddle => self.fim_middle,
            SpecialToken::FimPad => self.fim_pad,
            SpecialToken::FileSep => self.file_sep,
            SpecialToken::RepoName => self.repo_name,
            SpecialToken::Cot => self.cot,
        }
    }

    /// Whether `id` is one of the special tokens.
    pub fn contains(&self, id: u32) -> bool {
        self.find(id).is_some()
    }

    /// Which special token `id` is, if any.
    fn find(&self, id: u32) -> Option<SpecialToken> {
        SpecialToken::ALL.into_iter().find(|&t| self.get(t) == id)
    }
}

/// A validated byte-level BPE tokenizer with M31R's special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialIds,
    /// Longest spelling in the vocabulary, in bytes (at least 1).
    max_token_bytes: usize,
}

impl fmt::Debug for Tokenizer {
    // The inner tokenizer's Debug prints the whole vocabulary; a summary is what logs need.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

/// Label used in error messages for tokenizers that do not come from a file.
const TRAINED_ORIGIN: &str = "<freshly trained>";
/// Label used in error messages for [`Tokenizer::from_bytes`].
const BYTES_ORIGIN: &str = "<tokenizer.json bytes>";

impl Tokenizer {
    /// Trains a byte-level BPE on `texts` with `vocab_size` tokens in total (specials included).
    ///
    /// The 8 special tokens get ids `0..8` in [`SpecialToken::ALL`] order and all 256 bytes are
    /// in the vocabulary whether or not the texts contain them, so any UTF-8 text encodes.
    /// Pairs seen fewer than twice are not merged, so the result can be smaller than asked for
    /// on a small corpus. The same texts always give a byte-identical [`Tokenizer::to_json`].
    pub fn train<I, S>(texts: I, vocab_size: usize) -> Result<Self, TokenizerError>
    where
        // The `tokenizers` trainer counts words on a thread pool.
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if vocab_size < MIN_VOCAB_SIZE {
            return Err(TokenizerError::VocabTooSmall {
                requested: vocab_size,
                minimum: MIN_VOCAB_SIZE,
            });
        }
        let build_err = |e: tokenizers::Error| TokenizerError::Build { reason: e.to_string() };
        // LLaMA-3 sets ignore_merges: a pre-token already in the vocabulary is taken whole.
        let bpe = BPE::builder().ignore_merges(true).build().map_err(build_err)?;
        let mut inner = tokenizers::Tokenizer::new(ModelWrapper::BPE(bpe));
        inner.with_pre_tokenizer(Some(llama3_pre_tokenizer().map_err(build_err)?));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));

        let specials =
            SpecialToken::ALL.iter().map(|t| AddedToken::from(t.as_str(), true)).collect();
        let trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
            .build();
        let mut trainer = TrainerWrapper::BpeTrainer(trainer);
        inner
            .train(&mut trainer, texts)
            .map_err(|e| TokenizerError::Train { reason: e.to_string() })?;
        Self::from_inner(inner, TRAINED_ORIGIN)
    }

    /// Loads and validates a `tokenizer.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|source| TokenizerError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&bytes, &path.display().to_string())
    }

    /// Loads and validates a `tokenizer.json` held in memory.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TokenizerError> {
        Self::parse(bytes, BYTES_ORIGIN)
    }

    fn parse(bytes: &[u8], origin: &str) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| {
            TokenizerError::Parse { origin: origin.to_owned(), reason: e.to_string() }
        })?;
        Self::from_inner(inner, origin)
    }

    /// Validates the special tokens and the decoder, then switches off special-token matching
    /// in text.
    fn from_inner(mut inner: tokenizers::Tokenizer, origin: &str) -> Result<Self, TokenizerError> {
        if !matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_))) {
            return Err(TokenizerError::NotByteLevel { origin: origin.to_owned() });
        }
        // Matching must still be on here so that a special token's own text can be checked to
        // encode as exactly its id.
        inner.set_encode_special_tokens(false);
        let added = inner.get_added_tokens_decoder();
        let mut ids = [0u32; 8];
        for (slot, token) in ids.iter_mut().zip(SpecialToken::ALL) {
            let text = token.as_str();
            let id = inner.token_to_id(text).ok_or_else(|| TokenizerError::MissingSpecial {
                origin: origin.to_owned(),
                token: text,
            })?;
            if !added.get(&id).is_some_and(|a| a.special && a.content == text) {
                return Err(TokenizerError::NotSpecial { origin: origin.to_owned(), token: text });
            }
            let encoded = inner
                .encode_fast(text, false)
                .map_err(|e| TokenizerError::Encode { len: text.len(), reason: e.to_string() })?;
            if encoded.get_ids() != [id] {
                return Err(TokenizerError::SpecialNotSingleId {
                    origin: origin.to_owned(),
                    token: text,
                    ids: encoded.get_ids().to_vec(),
                });
            }
            *slot = id;
        }
        for (i, a) in SpecialToken::ALL.iter().enumerate() {
            for (j, b) in SpecialToken::ALL.iter().enumerate().skip(i + 1) {
                if ids[i] == ids[j] {
                    return Err(TokenizerError::DuplicateSpecialId {
                        origin: origin.to_owned(),
                        first: a.as_str(),
                        second: b.as_str(),
                        id: ids[i],
                    });
                }
            }
        }
        // From here on `<|fim_prefix|>` in user text is ordinary bytes, never the control token.
        inner.set_encode_special_tokens(true);
        // Byte-level spellings have one character per byte; specials are counted too, which
        // only makes the bound looser.
        let max_token_bytes =
            inner.get_vocab(true).keys().map(|t| t.chars().count()).max().unwrap_or(1).max(1);
        let [end_of_text, fim_prefix, fim_suffix, fim_middle, fim_pad, file_sep, repo_name, cot] =
            ids;
        Ok(Self {
            inner,
            special: SpecialIds {
                end_of_text,
                fim_prefix,
                fim_suffix,
                fim_middle,
                fim_pad,
                file_sep,
                repo_name,
                cot,
            },
            max_token_bytes,
        })
    }

    /// The tokenizer as `tokenizer.json` text (pretty-printed, deterministic).
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner.to_string(true).map_err(|e| TokenizerError::Serialize { reason: e.to_string() })
    }

    /// Writes the tokenizer to `path` as `tokenizer.json` text.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), TokenizerError> {
        let path = path.as_ref();
        let json = self.to_json()?;
        std::fs::write(path, json)
            .map_err(|source| TokenizerError::Write { path: path.to_path_buf(), source })
    }

    /// Encodes `text` as ordinary text: the result never contains a special id, even where the
    /// text spells one out.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode { len: text.len(), reason: e.to_string() })?;
        let ids = encoding.get_ids();
        if let Some((token, id)) = ids.iter().find_map(|&id| self.special.find(id).map(|t| (t, id)))
        {
            return Err(TokenizerError::SpecialInEncoding { token: token.as_str(), id });
        }
        Ok(ids.to_vec())
    }

    /// Decodes `ids` back to text. Ordinary ids decode to exactly the bytes they encode;
    /// special ids are skipped, because they are control signals with no text. A byte sequence
    /// that is not valid UTF-8 (a multi-byte character cut between tokens) decodes lossily.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(TokenizerError::UnknownId { id, vocab_size: self.vocab_size() });
        }
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Decode { count: ids.len(), reason: e.to_string() })
    }

    /// Number of ids in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The ids of the special tokens.
    pub fn special_ids(&self) -> &SpecialIds {
        &self.special
    }

    /// The id of a token given in its vocabulary spelling (byte-level characters for ordinary
    /// tokens, e.g. `Ġfn` for ` fn`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary spelling of `id`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Byte offset in `text` where its last pre-token chunk starts (0 for empty text).
    ///
    /// Appending to `text` re-chunks only this last chunk; everything before it is split, and
    /// so encoded, the same way however the text continues. Falls back to 0 (the whole text is
    /// one chunk), which is always safe, if pre-tokenization fails.
    pub fn last_chunk_start(&self, text: &str) -> usize {
        let Some(pre) = self.inner.get_pre_tokenizer() else {
            return 0;
        };
        let mut pre_tokenized = PreTokenizedString::from(text);
        if pre.pre_tokenize(&mut pre_tokenized).is_err() {
            return 0;
        }
        pre_tokenized
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .last()
            .map_or(0, |(_, (start, _), _)| *start)
    }

    /// Most bytes of text one token can stand for: the longest spelling in the vocabulary.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// The byte step `need` by which [`Tokenizer::tail_start`] and [`Tokenizer::head_end`] cut
    /// text for `max_tokens` tokens: `max_tokens` of the longest tokens, so that `need` bytes
    /// always hold at least `max_tokens` tokens, and never below [`MIN_CUT_BYTES`].
    pub fn cut_bytes(&self, max_tokens: usize) -> usize {
        max_tokens.saturating_mul(self.max_token_bytes).max(MIN_CUT_BYTES)
    }

    /// Byte offset of `text` from which to encode it when only its last `max_tokens` tokens
    /// can be used, so that a huge text costs memory in proportion to `max_tokens`, not to its
    /// length.
    ///
    /// 0 (encode everything) unless the text is at least twice as long as
    /// [`Tokenizer::cut_bytes`] (`need`). Otherwise at least `need` bytes are kept, so at least
    /// `max_tokens` tokens, and less than `3 × need`. The cut is a line start (see
    /// [`Tokenizer::is_encode_boundary`]), where encoding the rest gives exactly the last tokens
    /// of encoding the whole text; only a text without one in the searched step falls back to a
    /// character boundary, where the first few kept tokens may differ. The cut moves in whole
    /// steps of `need` bytes counted from the start, so it stays put while text is appended.
    pub fn tail_start(&self, text: &str, max_tokens: usize) -> usize {
        let need = self.cut_bytes(max_tokens);
        let anchor = text.len().saturating_sub(need) / need * need;
        if anchor == 0 {
            return 0;
        }
        // Searching back keeps more text, never less than `need` bytes.
        (anchor - need + 1..=anchor)
            .rev()
            .find(|&at| Self::is_encode_boundary(text, at))
            .unwrap_or_else(|| floor_char_boundary(text, anchor))
    }

    /// Byte length of the start of `text` to encode when only its first `max_tokens` tokens
    /// can be used; the counterpart of [`Tokenizer::tail_start`] for text cut from its end.
    ///
    /// The whole text unless it is longer than twice `need` bytes ([`Tokenizer::cut_bytes`]);
    /// otherwise the first line start at or after `need` bytes, where encoding the
    /// start gives exactly the first tokens of encoding the whole text, or, without one in the
    /// next `need` bytes, a character boundary.
    pub fn head_end(&self, text: &str, max_tokens: usize) -> usize {
        let need = self.cut_bytes(max_tokens);
        let limit = need.saturating_mul(2);
        if text.len() <= limit {
            return text.len();
        }
        (need..=limit)
            .find(|&at| Self::is_encode_boundary(text, at))
            .unwrap_or_else(|| ceil_char_boundary(text, limit))
    }

    /// Whether encoding can be split at byte `at` of `text` without changing a token: a line
    /// start whose first character is not whitespace. No pre-token of the LLaMA-3 split runs
    /// from a newline into such a character, and none looks past one, so the pre-tokens (and
    /// with them the tokens) on each side are the same as in the whole text. (A foreign
    /// `tokenizer.json` with another split could differ, but only in the tokens at the cut.)
    pub fn is_encode_boundary(text: &str, at: usize) -> bool {
        at > 0
            && at < text.len()
            && text.as_bytes()[at - 1] == b'\n'
            // After an ASCII newline `at` is always a character boundary.
            && text[at..].chars().next().is_some_and(|c| !c.is_whitespace())
    }

    /// The bytes each id decodes to, indexed by id: what [`Tokenizer::decode`] turns that id
    /// into before its lossy UTF-8 conversion, so that decoding a sequence of ids is
    /// `String::from_utf8_lossy` of their concatenated entries. Special ids have no bytes (decode
    /// skips them). Built once per tokenizer by whoever needs cheap per-token byte checks
    /// (token healing), because going through `decode` per token and step would cost a string
    /// each time and lose the bytes of a token that ends inside a character.
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        let to_byte = byte_level_decoding();
        (0..self.vocab_size() as u32)
            .map(|id| {
                if self.special.contains(id) {
                    return Vec::new();
                }
                let Some(spelling) = self.inner.id_to_token(id) else {
                    return Vec::new();
                };
                // The byte-level decoder's own rule: a spelling with a character outside the
                // mapping (an added token's plain text) stands for its UTF-8 bytes.
                spelling
                    .chars()
                    .map(|c| to_byte.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| spelling.into_bytes())
            })
            .collect()
    }

    /// Number of source bytes an ordinary token stands for. The decoder is validated to be
    /// byte-level at load, where every character of a token's spelling is one byte.
    pub(crate) fn token_byte_len(&self, id: u32) -> Result<usize, TokenizerError> {
        self.inner
            .id_to_token(id)
            .map(|t| t.chars().count())
            .ok_or(TokenizerError::UnknownId { id, vocab_size: self.vocab_size() })
    }
}

/// The byte-level (GPT-2) mapping from the character that spells a byte back to the byte:
/// printable Latin-1 bytes spell themselves, the other 68 bytes take the characters from U+0100 on
/// in byte order.
fn byte_level_decoding() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut next = 0u32;
    for byte in 0..=255u8 {
        let spelled = if matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            char::from(byte)
        } else {
            next += 1;
            // 256 + next - 1 stays below U+0200, always a valid character.
            char::from_u32(255 + next).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        map.insert(spelled, byte);
    }
    map
}

/// The largest character boundary of `text` at or before `at` (`at <= text.len()`).
fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The smallest character boundary of `text` at or after `at` (`at <= text.len()`).
fn ceil_char_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at += 1;
    }
    at
}

/// LLaMA-3's pre-tokenizer: the `llama-bpe` regex split, then the byte-to-character mapping.
fn llama3_pre_tokenizer() -> Result<PreTokenizerWrapper, tokenizers::Error> {
    let split = Split::new(
        SplitPattern::Regex(LLAMA3_PATTERN.to_owned()),
        SplitDelimiterBehavior::Isolated,
        false,
    )?;
    Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ])))
}

#[cfg(test)]
mod tests;
