//! The `prepare` stage: shards decode to exactly the kept documents, in manifest order.

use m31r_model::tokenizer::Tokenizer;
use m31r_train::corpus::Corpus;
use m31r_train::shards::{INDEX_FILE, SHARDS_DIR};
use m31r_train::tok::TOKENIZER_FILE;
use m31r_train::{Dtype, ShardSet, Split};

use crate::common::pipeline;

#[test]
fn shards_decode_to_the_kept_documents_in_manifest_order() {
    let p = pipeline();
    let corpus = Corpus::open(&p.data()).unwrap();
    let tok = Tokenizer::from_file(p.data().join(TOKENIZER_FILE)).unwrap();
    for split in Split::ALL {
        let set = ShardSet::open(&p.data(), split).unwrap();
        let expected: Vec<&str> =
            corpus.documents(split).map(|e| corpus.text(e).unwrap()).collect();
        assert!(!expected.is_empty(), "{split}");
        assert_eq!(set.num_documents(), expected.len(), "{split}");
        let decoded: Vec<String> = set.documents().map(|ids| tok.decode(&ids).unwrap()).collect();
        assert_eq!(decoded, expected, "{split}");

        // The stream is the documents, each followed by <|endoftext|>, across shard boundaries.
        let eot = tok.special_ids().end_of_text;
        let stream = set.tokens(0..set.len());
        let mut rebuilt = Vec::new();
        for doc in set.documents() {
            assert!(!doc.contains(&eot));
            rebuilt.extend(doc);
            rebuilt.push(eot);
        }
        assert_eq!(stream, rebuilt, "{split}");
        assert_eq!(set.end_of_text(), eot);
        assert_eq!(set.dtype(), Dtype::U16);
        assert_eq!(set.dataset_id(), p.info.dataset_id);
        assert_eq!(set.tokenizer_id(), p.report.tokenizer_id);
    }
}

#[test]
fn the_index_describes_bounded_shards() {
    let p = pipeline();
    let index = &p.index;
    assert_eq!(index.dataset_id, p.info.dataset_id);
    assert_eq!(index.tokenizer_id, p.report.tokenizer_id);
    assert_eq!(index.dtype, Dtype::U16);
    let train = &index.splits[&Split::Train];
    assert!(train.shards.len() >= 2, "the fixture's train split spans several 512-token shards");
    for shard in &train.shards {
        // A shard exceeds the bound only when it holds one document longer than the bound.
        assert!(shard.tokens <= 512 || shard.documents == 1, "{shard:?}");
        let len = std::fs::metadata(p.data().join(SHARDS_DIR).join(&shard.file)).unwrap().len();
        assert_eq!(len, shard.tokens * 2);
    }
    assert_eq!(train.tokens, train.shards.iter().map(|s| s.tokens).sum::<u64>());
    assert_eq!(train.documents, p.info.splits[&Split::Train].files);
    assert_eq!(train.source_bytes, p.info.splits[&Split::Train].bytes);
    let written: m31r_train::ShardIndex = serde_json::from_str(
        &std::fs::read_to_string(p.data().join(SHARDS_DIR).join(INDEX_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(&written, index);
}

#[test]
fn ranges_cross_shard_boundaries() {
    let p = pipeline();
    let set = ShardSet::open(&p.data(), Split::Train).unwrap();
    let all = set.tokens(0..set.len());
    let first = p.index.splits[&Split::Train].shards[0].tokens;
    assert_eq!(set.tokens(first - 3..first + 3), all[first as usize - 3..first as usize + 3]);
    assert_eq!(set.tokens(set.len() - 2..set.len() + 10), all[all.len() - 2..]);
    assert!(set.tokens(set.len()..set.len() + 1).is_empty());
    assert_eq!(set.document(set.num_documents()), None);
}
