//! Unit tests of the tokenizer: training, specials, round trips and the LLaMA-3 split.

use std::sync::LazyLock;

use proptest::prelude::*;

use super::*;
use crate::testing::{RUST_FIXTURE, TOK_1024, hermetic_config};

static TOK_512: LazyLock<Tokenizer> = LazyLock::new(|| {
    Tokenizer::train(RUST_FIXTURE.iter(), 512).expect("training on the fixture succeeds")
});

#[test]
fn too_small_vocab_is_refused() {
    let err = Tokenizer::train(RUST_FIXTURE.iter(), MIN_VOCAB_SIZE - 1).unwrap_err();
    assert!(matches!(err, TokenizerError::VocabTooSmall { requested: 263, minimum: 264 }));
    assert!(err.to_string().contains("263"), "{err}");
}

#[test]
fn specials_are_single_ids_in_order() {
    for tok in [&*TOK_512, &*TOK_1024] {
        for (i, special) in SpecialToken::ALL.into_iter().enumerate() {
            let id = tok.special_ids().get(special);
            assert_eq!(id as usize, i, "{special}");
            assert_eq!(tok.token_to_id(special.as_str()), Some(id));
            assert_eq!(tok.id_to_token(id).as_deref(), Some(special.as_str()));
            assert!(tok.special_ids().contains(id));
        }
        assert!(!tok.special_ids().contains(8));
        assert!(tok.vocab_size() <= 1024);
        assert!(tok.vocab_size() > MIN_VOCAB_SIZE);
    }
    assert_eq!(TOK_512.vocab_size(), 512);
}

#[test]
fn fixture_round_trips_exactly() {
    for tok in [&*TOK_512, &*TOK_1024] {
        for src in RUST_FIXTURE {
            let ids = tok.encode(src).unwrap();
            assert!(ids.iter().all(|&id| !tok.special_ids().contains(id)));
            assert_eq!(tok.decode(&ids).unwrap(), *src);
        }
    }
}

#[test]
fn unseen_bytes_encode() {
    let text = "\u{0}\u{7f}ŧ\u{10FFFF}\r\n\t 𝔘";
    let ids = TOK_512.encode(text).unwrap();
    assert_eq!(TOK_512.decode(&ids).unwrap(), text);
}

#[test]
fn special_lookalikes_are_plain_text() {
    let text = "fn f() { let s = \"<|fim_prefix|>\"; }";
    for tok in [&*TOK_512, &*TOK_1024] {
        let ids = tok.encode(text).unwrap();
        assert!(ids.iter().all(|&id| !tok.special_ids().contains(id)), "{ids:?}");
        assert_eq!(tok.decode(&ids).unwrap(), text);
        for special in SpecialToken::ALL {
            let ids = tok.encode(special.as_str()).unwrap();
            assert!(ids.len() > 1, "{special} encoded as {ids:?}");
            assert_eq!(tok.decode(&ids).unwrap(), special.as_str());
        }
    }
}

#[test]
fn decode_skips_specials_and_rejects_unknown_ids() {
    let tok = &*TOK_1024;
    let mut ids = vec![tok.special_ids().fim_prefix];
    ids.extend(tok.encode("let x = 1;").unwrap());
    ids.push(tok.special_ids().end_of_text);
    assert_eq!(tok.decode(&ids).unwrap(), "let x = 1;");
    let bad = u32::try_from(tok.vocab_size()).unwrap();
    let err = tok.decode(&[bad]).unwrap_err();
    assert!(err.to_string().contains(&bad.to_string()), "{err}");
}

#[test]
fn training_is_deterministic() {
    let again = Tokenizer::train(RUST_FIXTURE.iter(), 1024).unwrap();
    assert_eq!(again.to_json().unwrap(), TOK_1024.to_json().unwrap());
    let small = Tokenizer::train(RUST_FIXTURE.iter().map(|s| s.to_string()), 512).unwrap();
    assert_eq!(small.to_json().unwrap(), TOK_512.to_json().unwrap());
}

#[test]
fn merges_compress_the_fixture() {
    let bytes: usize = RUST_FIXTURE.iter().map(|s| s.len()).sum();
    let tokens: usize = RUST_FIXTURE.iter().map(|s| TOK_1024.encode(s).unwrap().len()).sum();
    let ratio = bytes as f64 / tokens as f64;
    eprintln!("bytes/token with vocab {}: {ratio:.2}", TOK_1024.vocab_size());
    assert!(ratio > 1.5, "bytes/token {ratio}");
}

#[test]
fn json_round_trip_preserves_the_tokenizer() {
    let json = TOK_1024.to_json().unwrap();
    let loaded = Tokenizer::from_bytes(json.as_bytes()).unwrap();
    assert_eq!(loaded.special_ids(), TOK_1024.special_ids());
    assert_eq!(loaded.to_json().unwrap(), json);
    for src in RUST_FIXTURE {
        assert_eq!(loaded.encode(src).unwrap(), TOK_1024.encode(src).unwrap());
    }
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(value["normalizer"].is_null());
    assert!(value["post_processor"].is_null());
    assert_eq!(value["decoder"]["type"], "ByteLevel");
    assert_eq!(value["model"]["type"], "BPE");
    let pre = &value["pre_tokenizer"]["pretokenizers"];
    assert_eq!(pre[0]["pattern"]["Regex"], LLAMA3_PATTERN);
    assert_eq!(pre[0]["behavior"], "Isolated");
    assert_eq!(pre[1]["type"], "ByteLevel");
    assert_eq!(pre[1]["add_prefix_space"], false);
    assert_eq!(pre[1]["use_regex"], false);
}

#[test]
fn save_and_from_file_round_trip() {
    let dir = std::env::temp_dir().join(format!("m31r-tok-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    TOK_512.save(&path).unwrap();
    let loaded = Tokenizer::from_file(&path).unwrap();
    assert_eq!(loaded.to_json().unwrap(), TOK_512.to_json().unwrap());
    std::fs::remove_dir_all(&dir).unwrap();

    let missing = dir.join("absent.json");
    let err = Tokenizer::from_file(&missing).unwrap_err();
    assert!(err.to_string().contains("absent.json"), "{err}");
}

/// Writes `json` to a scratch file and loads it, so errors carry a real file name.
fn load_edited(json: &serde_json::Value, name: &str) -> Result<Tokenizer, TokenizerError> {
    let dir = std::env::temp_dir().join(format!("m31r-tok-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string(json).unwrap()).unwrap();
    let result = Tokenizer::from_file(&path);
    std::fs::remove_dir_all(&dir).unwrap();
    result
}

#[test]
fn removed_special_is_refused_by_name() {
    let json: serde_json::Value = serde_json::from_str(&TOK_512.to_json().unwrap()).unwrap();

    // Dropped from the added tokens only: the id still exists but is no longer protected.
    let mut edited = json.clone();
    edited["added_tokens"].as_array_mut().unwrap().retain(|t| t["content"] != "<|fim_pad|>");
    let err = load_edited(&edited, "unprotected").unwrap_err();
    assert!(matches!(err, TokenizerError::NotSpecial { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("<|fim_pad|>") && msg.contains("tokenizer.json"), "{msg}");

    // Dropped everywhere.
    let mut edited = json;
    edited["added_tokens"].as_array_mut().unwrap().retain(|t| t["content"] != "<|cot|>");
    edited["model"]["vocab"].as_object_mut().unwrap().remove("<|cot|>");
    let err = load_edited(&edited, "missing").unwrap_err();
    assert!(matches!(err, TokenizerError::MissingSpecial { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("<|cot|>") && msg.contains("tokenizer.json"), "{msg}");
}

#[test]
fn non_byte_level_decoder_is_refused() {
    let mut json: serde_json::Value = serde_json::from_str(&TOK_512.to_json().unwrap()).unwrap();
    json["decoder"] = serde_json::Value::Null;
    let err = Tokenizer::from_bytes(serde_json::to_string(&json).unwrap().as_bytes()).unwrap_err();
    assert!(matches!(err, TokenizerError::NotByteLevel { .. }), "{err}");
}

#[test]
fn last_chunk_start_finds_the_final_pre_token() {
    let tok = &*TOK_512;
    assert_eq!(tok.last_chunk_start(""), 0);
    assert_eq!(tok.last_chunk_start("let x"), 3);
    // Punctuation before a word joins the word.
    assert_eq!(tok.last_chunk_start("foo(bar"), 3);
    assert_eq!(tok.last_chunk_start("a  "), 1);
    assert_eq!(tok.last_chunk_start("x = 12345"), 7);
    assert_eq!(tok.last_chunk_start("größe"), 0);
}

#[test]
fn huge_texts_are_cut_to_a_bound_before_encoding() {
    let tok = &*TOK_1024;
    let lines = RUST_FIXTURE.concat();
    let huge = lines.repeat((4 << 20) / lines.len() + 1);
    // No line start to cut at: the cut falls back to a character boundary.
    let one_line = "é".repeat(2 << 20);
    for max_tokens in [0, 1, 100, 2048] {
        let need = tok.cut_bytes(max_tokens);
        for text in [&huge, &one_line] {
            let start = tok.tail_start(text, max_tokens);
            let kept = text[start..].len();
            assert!(kept >= need && kept < 3 * need, "{max_tokens}: kept {kept} of {need}");
            let end = tok.head_end(text, max_tokens);
            assert!(end >= need && end <= 2 * need + 3, "{max_tokens}: head {end} of {need}");
            assert!(text.is_char_boundary(end));
        }
    }
    // Text within twice the bound is never cut, so normal prompts encode as before.
    assert_eq!(tok.tail_start(&lines, 2048), 0);
    assert_eq!(tok.head_end(&lines, 2048), lines.len());

    // While text is appended the cut stays put, moving only once per step.
    let step = tok.cut_bytes(100);
    let starts: HashSet<usize> = (400_000..400_000 + step / 2)
        .filter(|&n| huge.is_char_boundary(n))
        .map(|n| tok.tail_start(&huge[..n], 100))
        .collect();
    assert!(starts.len() <= 2, "{starts:?}");
}

#[test]
fn encoding_after_a_cut_gives_the_tokens_of_the_whole_text() {
    let tok = &*TOK_1024;
    let text = RUST_FIXTURE.concat().repeat(60);
    let whole = tok.encode(&text).unwrap();
    let start = tok.tail_start(&text, 100);
    assert!(start > 0 && Tokenizer::is_encode_boundary(&text, start));
    let tail = tok.encode(&text[start..]).unwrap();
    assert!(tail.len() >= 100 && whole.ends_with(&tail));
    let end = tok.head_end(&text, 100);
    assert!(end < text.len() && Tokenizer::is_encode_boundary(&text, end));
    let head = tok.encode(&text[..end]).unwrap();
    assert!(head.len() >= 100 && whole.starts_with(&head));
}

fn arbitrary_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9_ \t\r\n{}()<>|:;.,'\"!?#&*+=/\\\\-]{0,80}",
        "[ \t\n\r\u{b}\u{c}\u{85}\u{a0}\u{2028}\u{3000}]{0,40}",
        "[🦀🚀✨日本語ßé\u{0}-\u{1f}\u{7f}\u{200d}\u{fe0f} a]{0,40}",
    ]
}

proptest! {
    #![proptest_config(hermetic_config(512))]

    #[test]
    fn arbitrary_text_round_trips(text in arbitrary_text()) {
        for tok in [&*TOK_512, &*TOK_1024] {
            let ids = tok.encode(&text).unwrap();
            prop_assert!(ids.iter().all(|&id| !tok.special_ids().contains(id)));
            prop_assert_eq!(tok.decode(&ids).unwrap(), text.clone());
            let bytes: usize = ids.iter().map(|&id| tok.token_byte_len(id).unwrap()).sum();
            prop_assert_eq!(bytes, text.len());
        }
    }

    #[test]
    fn encoding_splits_exactly_at_encode_boundaries(
        parts in prop::collection::vec(arbitrary_text(), 1..6)
    ) {
        let text = parts.join("\n");
        let tok = &*TOK_1024;
        let whole = tok.encode(&text).unwrap();
        for at in (0..=text.len()).filter(|&at| Tokenizer::is_encode_boundary(&text, at)) {
            let mut split = tok.encode(&text[..at]).unwrap();
            split.extend(tok.encode(&text[at..]).unwrap());
            prop_assert_eq!(&split, &whole, "split at byte {}", at);
        }
    }
}

#[test]
fn token_bytes_decode_like_decode() {
    for tok in [&*TOK_512, &*TOK_1024] {
        let table = tok.token_bytes();
        assert_eq!(table.len(), tok.vocab_size());
        for (id, bytes) in table.iter().enumerate() {
            let id = id as u32;
            assert_eq!(bytes.is_empty(), tok.special_ids().contains(id), "id {id}");
            assert_eq!(String::from_utf8_lossy(bytes), tok.decode(&[id]).unwrap(), "id {id}");
        }
        let text = format!("{}é→🦀 \t\r\n\u{0}", RUST_FIXTURE.concat());
        let ids = tok.encode(&text).unwrap();
        let joined: Vec<u8> = ids.iter().flat_map(|&id| table[id as usize].clone()).collect();
        assert_eq!(joined, text.as_bytes());
    }
}
