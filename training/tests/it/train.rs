//! The training loop on the fixture shards: objectives, FIM transform, determinism, resume after
//! SIGKILL, checkpoint safety, bad input.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use m31r_model::fim::FimMode;
use m31r_model::rng::Rng;
use m31r_train::train::batch::{BatchSampler, FimSpan, Objective, fim_transform};
use m31r_train::train::{TrainConfig, TrainOptions, train};
use m31r_train::{Progress, ShardSet, Split};

use crate::common::pipeline;

fn small(steps: u64) -> TrainConfig {
    TrainConfig {
        seq_len: 64,
        batch_size: 4,
        steps,
        lr: 3e-3,
        warmup_steps: 5,
        cot_share: 0.3,
        log_every: 5,
        eval_every: 0,
        eval_batches: 1,
        checkpoint_every: 10,
        ..TrainConfig::default()
    }
}

fn options(data: &Path, run: &Path, train: TrainConfig) -> TrainOptions {
    TrainOptions {
        data: data.to_path_buf(),
        run_dir: run.to_path_buf(),
        model: "tiny".into(),
        shape: None,
        train,
        resume: false,
        force: false,
        progress: Progress::hidden(),
    }
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (step, loss, per-objective losses) of the training lines, without timings.
/// One logged training step: step, loss, and the next/FIM/CoT terms where present.
type Point = (u64, f64, Option<f64>, Option<f64>, Option<f64>);

fn curve(run: &Path) -> Vec<Point> {
    metrics(run)
        .iter()
        .filter(|m| m.get("loss").is_some())
        .map(|m| {
            (
                m["step"].as_u64().unwrap(),
                m["loss"].as_f64().unwrap(),
                m["loss_next"].as_f64(),
                m["loss_fim"].as_f64(),
                m["loss_cot"].as_f64(),
            )
        })
        .collect()
}

#[test]
fn every_objective_learns_and_the_total_honours_the_weights() {
    let p = pipeline();
    let run = p.tmp.path().join("run");
    let cfg = TrainConfig { batch_size: 8, lr: 5e-3, ..small(80) };
    train(&options(&p.data(), &run, cfg.clone())).unwrap();
    let lines = curve(&run);
    for (k, name) in [(2usize, "next"), (3, "fim"), (4, "cot")] {
        let values: Vec<f64> = lines
            .iter()
            .filter_map(|l| match k {
                2 => l.2,
                3 => l.3,
                _ => l.4,
            })
            .collect();
        assert!(values.len() >= 6, "{name}: too few logged values {values:?}");
        // Per-step values are noisy (few sequences per objective): compare thirds.
        let third = values.len() / 3;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (first, last) = (mean(&values[..third]), mean(&values[values.len() - third..]));
        assert!(last < first * 0.92, "{name} loss did not fall: {values:?}");
    }
    // loss = next + α·fim + β·cot over the objectives present in that step.
    for (_, loss, next, fim, cot) in &lines {
        let expected = next.unwrap_or(0.0)
            + cfg.fim_weight * fim.unwrap_or(0.0)
            + cfg.cot_weight * cot.unwrap_or(0.0);
        assert!((loss - expected).abs() < 1e-9, "{loss} vs {expected}");
    }
}

#[test]
fn batches_are_tagged_and_honour_the_shares() {
    let p = pipeline();
    let shards = ShardSet::open(&p.data(), Split::Train).unwrap();
    let tokenizer = m31r_model::Tokenizer::from_file(p.data().join("tokenizer.json")).unwrap();
    let special = *tokenizer.special_ids();
    let cfg = TrainConfig {
        seq_len: 64,
        batch_size: 8,
        cot_share: 0.3,
        fim_rate: 0.5,
        ..TrainConfig::default()
    };
    let sampler = BatchSampler::new(&shards, &tokenizer, &cfg);
    let mut counts = [0usize; 3];
    for step in 0..60 {
        let batch = sampler.micro_batch(step, 0);
        assert_eq!(batch, sampler.micro_batch(step, 0), "seed + step must give the same batch");
        for s in batch {
            assert_eq!(s.ids.len(), 65);
            assert_eq!(s.mask.len(), 64);
            match s.objective {
                Objective::Cot => {
                    counts[2] += 1;
                    assert_eq!(s.ids[0], special.cot);
                }
                Objective::Fim => {
                    counts[1] += 1;
                    assert!(s.ids.contains(&special.fim_prefix));
                }
                Objective::Next => {
                    counts[0] += 1;
                    assert!(!s.ids.iter().any(|&t| t == special.fim_prefix || t == special.cot));
                }
            }
        }
    }
    let total = (counts[0] + counts[1] + counts[2]) as f64;
    let cot = counts[2] as f64 / total;
    let fim = counts[1] as f64 / (counts[0] + counts[1]) as f64;
    assert!((cot - 0.3).abs() < 0.08, "CoT share {cot} ({counts:?})");
    assert!((fim - 0.5).abs() < 0.1, "FIM share {fim} ({counts:?})");
}

#[test]
fn a_line_share_of_one_gives_every_fim_sample_a_one_line_middle() {
    let p = pipeline();
    let shards = ShardSet::open(&p.data(), Split::Train).unwrap();
    let tokenizer = m31r_model::Tokenizer::from_file(p.data().join("tokenizer.json")).unwrap();
    let special = *tokenizer.special_ids();
    let cfg = TrainConfig {
        seq_len: 128,
        batch_size: 8,
        cot_share: 0.0,
        fim_rate: 1.0,
        spm_share: 0.0,
        fim_line_share: 1.0,
        ..TrainConfig::default()
    };
    let sampler = BatchSampler::new(&shards, &tokenizer, &cfg);
    let mut checked = 0;
    for step in 0..20 {
        for s in sampler.micro_batch(step, 0) {
            let Some(m) = s.ids.iter().position(|&t| t == special.fim_middle) else { continue };
            // PSM: the middle follows <|fim_middle|> up to the separator (or the window's end).
            let rest = &s.ids[m + 1..];
            let end = rest.iter().position(|&t| special.contains(t)).unwrap_or(rest.len());
            let middle = tokenizer.decode(&rest[..end]).unwrap();
            assert!(!middle.contains('\n'), "step {step}: middle {middle:?}");
            checked += 1;
        }
    }
    assert!(checked >= 100, "only {checked} FIM samples");
}

#[test]
fn the_fim_transform_reassembles_the_text_and_keeps_specials_whole() {
    let p = pipeline();
    let shards = ShardSet::open(&p.data(), Split::Train).unwrap();
    let tokenizer = m31r_model::Tokenizer::from_file(p.data().join("tokenizer.json")).unwrap();
    let sp = *tokenizer.special_ids();
    let eot = shards.end_of_text();
    let mut rng = Rng::new(5);
    let mut line_cases = 0;
    for case in 0..200 {
        let start = rng.below(shards.len() - 200);
        let window = shards.tokens(start..start + 200);
        let mode = if case % 2 == 0 { FimMode::Psm } else { FimMode::Spm };
        let span = if case % 4 < 2 { FimSpan::Chars } else { FimSpan::Line };
        let Some((out, text)) =
            fim_transform(&tokenizer, &window, eot, mode, span, rng.next_u64(), rng.next_u64())
        else {
            continue;
        };
        let pos = |id: u32| out.iter().position(|&t| t == id).unwrap();
        let (fp, fs, fm) = (pos(sp.fim_prefix), pos(sp.fim_suffix), pos(sp.fim_middle));
        let end = fm + 1 + out[fm + 1..].iter().position(|&t| t == eot).unwrap();
        let dec = |r: &[u32]| tokenizer.decode(r).unwrap();
        let rebuilt = match mode {
            FimMode::Psm => format!(
                "{}{}{}",
                dec(&out[fp + 1..fs]),
                dec(&out[fm + 1..end]),
                dec(&out[fs + 1..fm])
            ),
            // SPM: prefix and middle are one continuous text after <|fim_middle|>.
            FimMode::Spm => format!("{}{}", dec(&out[fm + 1..end]), dec(&out[fs + 1..fm])),
        };
        assert_eq!(rebuilt, text, "case {case}");
        if (mode, span) == (FimMode::Psm, FimSpan::Line) {
            // The rest of one line: no line break in the middle, and the suffix starts with one
            // (or the segment ends there).
            let (middle, suffix) = (dec(&out[fm + 1..end]), dec(&out[fs + 1..fm]));
            assert!(!middle.is_empty() && !middle.contains('\n'), "case {case}: {middle:?}");
            assert!(
                suffix.is_empty() || suffix.starts_with('\n') || suffix.starts_with("\r\n"),
                "case {case}: suffix {suffix:?}"
            );
            line_cases += 1;
        }
        // Every special id in the output is one the layout placed or an original separator.
        let specials = out.iter().filter(|&&t| sp.contains(t)).count();
        let separators = window.iter().filter(|&&t| t == eot).count();
        assert!(specials <= separators + 4, "case {case}: stray special ids");
    }
    assert!(line_cases >= 20, "only {line_cases} line-shaped PSM cases were checked");
}

#[test]
fn same_seed_same_curve_and_sigkill_resume_matches() {
    let p = pipeline();
    let a = p.tmp.path().join("a");
    let b = p.tmp.path().join("b");
    train(&options(&p.data(), &a, small(30))).unwrap();
    train(&options(&p.data(), &b, small(30))).unwrap();
    assert_eq!(curve(&a), curve(&b), "two runs with one seed differ");
    // Runs train with Muon unless told otherwise; a run.json from before the key is AdamW's.
    let spec = m31r_train::train::read_run_spec(&a.join("run.json")).unwrap();
    assert_eq!(spec.train.optimizer, m31r_train::train::OptimizerKind::Muon);
    let mut legacy: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(a.join("run.json")).unwrap()).unwrap();
    legacy["train"].as_object_mut().unwrap().remove("optimizer");
    legacy["train"].as_object_mut().unwrap().remove("fim_line_share");
    let legacy_file = p.tmp.path().join("legacy-run.json");
    fs::write(&legacy_file, legacy.to_string()).unwrap();
    let spec = m31r_train::train::read_run_spec(&legacy_file).unwrap();
    assert_eq!(spec.train.optimizer, m31r_train::train::OptimizerKind::Adamw);
    assert_eq!(spec.train.fim_line_share, 0.0, "old runs cut FIM middles at random characters");

    // The real binary, killed with SIGKILL after its first checkpoint, then resumed.
    let config = p.tmp.path().join("train.toml");
    fs::write(
        &config,
        "model = \"tiny\"\n[train]\nseq_len = 64\nbatch_size = 4\nsteps = 30\nlr = 3e-3\nwarmup_steps = 5\ncot_share = 0.3\nlog_every = 5\neval_every = 0\neval_batches = 1\ncheckpoint_every = 10\n",
    )
    .unwrap();
    let killed = p.tmp.path().join("killed");
    let bin = env!("CARGO_BIN_EXE_m31r-train");
    let args = |run: &Path| {
        let mut c = Command::new(bin);
        c.arg("train")
            .arg("--data")
            .arg(p.data())
            .arg("--config")
            .arg(&config)
            .arg("--run-dir")
            .arg(run);
        c
    };
    let mut child = args(&killed).stderr(std::process::Stdio::null()).spawn().unwrap();
    let until = Instant::now() + Duration::from_secs(120);
    while !killed.join("checkpoints/step-00000010/state.json").exists() {
        assert!(Instant::now() < until, "no checkpoint appeared");
        assert!(child.try_wait().unwrap().is_none(), "run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let resumed = args(&killed).arg("--resume").output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert_eq!(curve(&killed), curve(&a), "resumed curve differs from the uninterrupted one");
}

#[test]
fn a_failed_checkpoint_write_leaves_the_previous_one_valid() {
    use m31r_train::train::checkpoint::{self, LoopState};
    use m31r_train::train::optim::Optimizer;
    let p = pipeline();
    let run = p.tmp.path().join("run");
    train(&options(&p.data(), &run, small(10))).unwrap();
    let config = m31r_model::ModelConfig::preset("tiny").unwrap();
    let mut raw = config.to_raw();
    raw.vocab_size =
        m31r_model::Tokenizer::from_file(p.data().join("tokenizer.json")).unwrap().vocab_size();
    let config = m31r_model::ModelConfig::new(&raw).unwrap();
    let (_, mut vars) = m31r_model::Model::init(&config, 1, &candle_core::Device::Cpu).unwrap();
    let mut opt = Optimizer::for_config(&vars, &small(10)).unwrap();
    // Something in the way of the temporary directory makes the write fail.
    fs::write(run.join("checkpoints/.step-00000020.tmp"), b"in the way").unwrap();
    let state = LoopState { step: 20, tokens_seen: 0, clipped_steps: 0 };
    assert!(checkpoint::save(&run, &vars, &opt, &state, 1).is_err());
    let listed = checkpoint::list(&run).unwrap();
    assert_eq!(listed.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![10]);
    let restored = checkpoint::load(&listed[0].1, &mut vars, &mut opt).unwrap();
    assert_eq!(restored.step, 10);
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let p = pipeline();
    let run = p.tmp.path().join("run");
    // Unknown key in [train].
    let err = m31r_train::DataConfig::parse(
        "model = \"tiny\"\n[train]\nlearning_rate = 1\n",
        Path::new("x.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("learning_rate"), "{err}");
    // A run directory holding a different run.
    train(&options(&p.data(), &run, small(5))).unwrap();
    let err = train(&options(&p.data(), &run, TrainConfig { lr: 1e-3, ..small(5) }))
        .unwrap_err()
        .to_string();
    assert!(err.contains("different run") && err.contains("--force"), "{err}");
    let err = train(&options(&p.data(), &run, small(5))).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    train(&TrainOptions {
        force: true,
        ..options(&p.data(), &run, TrainConfig { lr: 1e-3, ..small(5) })
    })
    .unwrap();
    // Shards from another tokenizer.
    let index_path = p.data().join("shards/index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&index_path).unwrap()).unwrap();
    index["tokenizer_id"] = serde_json::json!("0".repeat(64));
    fs::write(&index_path, index.to_string()).unwrap();
    let err =
        train(&options(&p.data(), &p.tmp.path().join("other"), small(5))).unwrap_err().to_string();
    assert!(err.contains("tokenizer"), "{err}");
}

#[test]
fn train_minutes_sizes_the_run_and_trains_what_it_chose() {
    let p = pipeline();
    let run = p.tmp.path().join("run");
    let config = crate::common::fixtures().join("test.toml");
    let m31r_train = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_m31r-train"))
            .args(["train", "--data", p.data().to_str().unwrap(), "--run-dir"])
            .arg(&run)
            .args(["--config", config.to_str().unwrap(), "--batch-size", "4", "--seq-len", "64"])
            .args(extra)
            .output()
            .unwrap()
    };
    // 10k parameters cannot hold the embedding at any width: that target is skipped.
    let out = m31r_train(&["--minutes", "0.1", "--ladder", "10000,150000,300000"]);
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("sizing for 0.1 min") && stderr.contains("at 4×64 tokens"), "{stderr}");
    // It trained the steps and the shape it chose, and said so.
    let chose = stdout.lines().find(|l| l.starts_with("chose ")).expect("the choice is printed");
    let steps: u64 =
        chose.split(" for ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(steps >= m31r_train::budget::MIN_STEPS, "{chose}");
    assert!(stdout.starts_with(&format!("steps {steps} ·")), "{stdout}");
    let spec: serde_json::Value =
        serde_json::from_slice(&fs::read(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(spec["train"]["steps"], steps);
    assert_eq!(spec["model"]["vocab_size"], 512);
    let shape = format!("({}×{})", spec["model"]["d_model"], spec["model"]["n_layers"]);
    assert!(chose.contains(&shape), "{chose} vs {shape}");

    // A budget replaces the step count and cannot resize a run being resumed.
    for (extra, says) in [
        (&["--minutes", "1", "--steps", "10"][..], "cannot be used with"),
        (&["--minutes", "1", "--resume"][..], "cannot be used with"),
        (&["--ladder", "150000"][..], "--minutes"),
        (&["--minutes", "0"][..], "not a positive number of minutes"),
    ] {
        let out = m31r_train(extra);
        assert!(!out.status.success(), "{extra:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
    }
    // Sizing needs the tokenizer: the error names the data directory and the stage to run.
    let empty = p.tmp.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_m31r-train"))
        .args(["train", "--data", empty.to_str().unwrap(), "--minutes", "1", "--run-dir"])
        .arg(p.tmp.path().join("run2"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("empty") && stderr.contains("tokenizer"),
        "{stderr}"
    );
}

#[test]
fn bf16_mixed_precision_tracks_f32_and_resumes_from_f32_masters() {
    use candle_core::DType;
    use m31r_train::train::TrainPrecision;

    let p = pipeline();
    let (f32_run, bf16_run) = (p.tmp.path().join("f32"), p.tmp.path().join("bf16"));
    let bf16 = TrainConfig { precision: TrainPrecision::Bf16, ..small(30) };
    train(&options(&p.data(), &f32_run, small(30))).unwrap();
    train(&options(&p.data(), &bf16_run, bf16.clone())).unwrap();
    let (a, b) = (curve(&f32_run), curve(&bf16_run));
    assert_eq!(a.len(), b.len());
    // bf16 keeps 8 bits of mantissa: each logged loss within 1 % of the f32 run's, and the
    // run learns (its per-objective losses over the last two logged steps are well below
    // those of the first two: the total depends on which objectives a step drew).
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() <= 0.01 * x.1, "step {}: f32 {} vs bf16 {}", x.0, x.1, y.1);
    }
    let objective_mean = |points: &[Point]| {
        let v: Vec<f64> = points.iter().flat_map(|p| [p.2, p.3, p.4]).flatten().collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let (first, last) = (objective_mean(&b[..2]), objective_mean(&b[b.len() - 2..]));
    assert!(last < 0.9 * first, "bf16 run did not learn ({first} → {last}): {b:?}");
    assert_ne!(a, b, "the bf16 run computed in f32");

    // Checkpoints hold f32 master weights and f32 optimizer moments.
    let step10 = bf16_run.join("checkpoints/step-00000010");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let tensors =
            candle_core::safetensors::load(step10.join(file), &candle_core::Device::Cpu).unwrap();
        assert!(!tensors.is_empty());
        for (name, t) in tensors {
            assert_eq!(t.dtype(), DType::F32, "{file}: {name}");
        }
    }
    // Resuming from the step-10 masters retraces the uninterrupted bf16 run exactly.
    for later in ["step-00000020", "step-00000030"] {
        fs::remove_dir_all(bf16_run.join("checkpoints").join(later)).unwrap();
    }
    let resume = TrainOptions { resume: true, ..options(&p.data(), &bf16_run, bf16) };
    train(&resume).unwrap();
    assert_eq!(curve(&bf16_run), b, "the resumed bf16 run differs");
}
