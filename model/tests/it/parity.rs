//! Our weights, saved as safetensors and loaded into candle-transformers' LLaMA, give the same
//! logits: tensor names and the rotate-half RoPE are LLaMA-exact.

use candle_core::{DType, Device, IndexOp};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Config, Llama};
use m31r_model::Model;

use m31r_model::testing::{ids, max_abs_diff, row, tiny_config};

#[test]
fn candle_transformers_llama_gives_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    for (kv_heads, tied) in [(4, true), (2, true), (4, false)] {
        let config = tiny_config(kv_heads, tied);
        let (model, _) = Model::init(&config, 21, &Device::Cpu).unwrap();
        let path = dir.path().join(format!("model-{kv_heads}-{tied}.safetensors"));
        let tensors: std::collections::HashMap<_, _> = model.named_tensors().into_iter().collect();
        candle_core::safetensors::save(&tensors, &path).unwrap();

        let llama_config = Config {
            hidden_size: config.d_model(),
            intermediate_size: config.d_ff(),
            vocab_size: config.vocab_size(),
            num_hidden_layers: config.n_layers(),
            num_attention_heads: config.n_heads(),
            num_key_value_heads: config.n_kv_heads(),
            use_flash_attn: false,
            rms_norm_eps: config.norm_eps(),
            rope_theta: config.rope_theta() as f32,
            bos_token_id: None,
            eos_token_id: None,
            rope_scaling: None,
            max_position_embeddings: config.context_length(),
            tie_word_embeddings: tied,
        };
        // SAFETY: the file was just written by this test and is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu) }
            .unwrap();
        let llama = Llama::load(vb, &llama_config).unwrap();
        let mut llama_cache = Cache::new(false, DType::F32, &llama_config, &Device::Cpu).unwrap();

        let tokens = row(&ids(45, 300, 21));
        let theirs = llama.forward(&tokens, 0, &mut llama_cache).unwrap();
        let ours = model.forward(&tokens, &mut model.new_cache(45).unwrap()).unwrap();
        let ours_last = ours.i((.., 44, ..)).unwrap();
        let diff = max_abs_diff(&theirs, &ours_last);
        assert!(diff <= 1e-4, "kv_heads {kv_heads} tied {tied}: llama parity diff {diff}");
    }
}
