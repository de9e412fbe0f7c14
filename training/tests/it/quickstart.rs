//! `quickstart`: the whole pipeline into a bundle that loads, carries its eval, and replaces an
//! existing model only when asked; sized for a time budget, it trains the shape and steps it
//! chose; `export --eval-report` refuses a report of another checkpoint.

use std::path::Path;
use std::process::Command;

use m31r_model::{Bundle, Precision};
use m31r_train::Progress;
use m31r_train::budget::{MIN_STEPS, TimeBudget};
use m31r_train::export::{ExportOptions, export_with};
use m31r_train::quickstart::{QuickstartError, QuickstartOptions, STAGES, quickstart};
use m31r_train::train::TrainConfig;
use tempfile::TempDir;

use crate::common::{config, registry, workspace};

fn options(tmp: &Path) -> QuickstartOptions {
    let mut config = config();
    config.train = TrainConfig {
        seq_len: 64,
        batch_size: 4,
        steps: 8,
        warmup_steps: 2,
        log_every: 4,
        eval_every: 0,
        eval_batches: 1,
        checkpoint_every: 4,
        ..TrainConfig::default()
    };
    QuickstartOptions {
        inputs: vec![registry(), workspace()],
        work: tmp.join("work"),
        out: tmp.join("share").join("model"),
        force: false,
        config,
        budget: None,
        eval_items: 3,
        eval_max_bytes: 4096,
        progress: Progress::hidden(),
        log: false,
    }
}

#[test]
fn quickstart_writes_a_verified_bundle_with_its_eval_and_replaces_only_when_forced() {
    let tmp = TempDir::new().unwrap();
    let opts = options(tmp.path());
    let report = quickstart(&opts).expect("quickstart on the fixture");

    let names: Vec<&str> = report.stages.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, STAGES);
    assert_eq!(report.bundle, opts.out);
    assert_eq!(report.train.steps, 8);
    // The bundle opens (checksums verified) and its metadata carries the eval beside validation.
    let bundle = Bundle::open(&opts.out).expect("the quickstart bundle loads");
    let meta = bundle.metadata();
    assert_eq!(meta.steps, 8);
    for key in ["test_bits_per_byte", "fim_exact_match", "ngram_edit_similarity", "fim_items"] {
        assert!(meta.eval.contains_key(key), "metadata eval lacks {key}: {:?}", meta.eval);
    }
    assert_eq!(meta.eval["test_bits_per_byte"], report.eval.bits_per_byte.model);
    assert!(opts.work.join("eval.json").is_file());
    // Nothing but the bundle is left beside it, and the eval's staging bundle is gone.
    let siblings: Vec<_> = std::fs::read_dir(opts.out.parent().unwrap()).unwrap().collect();
    assert_eq!(siblings.len(), 1);
    assert!(!opts.work.join("bundle-eval").exists());

    // A second quickstart refuses to replace the model before doing any work...
    let weights = std::fs::read(opts.out.join("model.safetensors")).unwrap();
    let err = quickstart(&opts).unwrap_err();
    assert!(matches!(err, QuickstartError::Exists(_)), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(std::fs::read(opts.out.join("model.safetensors")).unwrap(), weights);
    // ...and with --force a run that fails keeps the old model whole.
    let failing = QuickstartOptions {
        force: true,
        inputs: vec![tmp.path().join("no-such-dir")],
        ..opts.clone()
    };
    let err = quickstart(&failing).unwrap_err();
    assert!(err.to_string().contains("`corpus`"), "{err}");
    Bundle::open(&opts.out).expect("the old bundle survives a failed quickstart");
}

#[test]
fn export_refuses_an_eval_report_of_another_checkpoint() {
    let tmp = TempDir::new().unwrap();
    let mut opts = options(tmp.path());
    opts.config.train.steps = 4;
    let report = quickstart(&opts).expect("quickstart on the fixture");
    let mut stale = report.eval.clone();
    stale.bundle.steps += 100;
    let err = export_with(
        &opts.work.join("run"),
        &opts.work.join("data"),
        &tmp.path().join("other"),
        &ExportOptions { eval: Some(("old-eval.json".into(), stale)), ..Default::default() },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("old-eval.json") && err.contains("step 104"), "{err}");
    assert!(!tmp.path().join("other").exists());

    // The same checkpoint quantized, with its GGUF twin: the bundle loads at its precision.
    let q8 = tmp.path().join("q8");
    let gguf = tmp.path().join("m31r-q8_0.gguf");
    let quantized = ExportOptions {
        precision: Precision::Q8_0,
        gguf: Some(gguf.clone()),
        ..Default::default()
    };
    export_with(&opts.work.join("run"), &opts.work.join("data"), &q8, &quantized).unwrap();
    let bundle = Bundle::open(&q8).expect("the q8_0 bundle loads");
    assert_eq!(bundle.precision(), Precision::Q8_0);
    assert!(std::fs::metadata(&gguf).unwrap().len() > 0);

    // A run directory without a checkpoint, and a directory that holds no run, are named.
    let run = opts.work.join("run");
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let export = |run: &Path| {
        export_with(run, &opts.work.join("data"), &tmp.path().join("b"), &ExportOptions::default())
            .unwrap_err()
            .to_string()
    };
    let err = export(&run);
    assert!(err.contains("has no complete checkpoint") && err.contains("run"), "{err}");
    let err = export(&tmp.path().join("nothing"));
    assert!(err.contains("nothing") && err.contains("run.json"), "{err}");
    assert!(!tmp.path().join("b").exists());
}

#[test]
fn a_time_budget_trains_the_shape_and_steps_it_chose() {
    let tmp = TempDir::new().unwrap();
    // 10k parameters cannot hold the embedding at any width: that target is skipped. Six seconds
    // give the 150k shape (≈ 10k tok/s in a debug build) several times the minimum steps.
    let budget = TimeBudget { minutes: 0.1, ladder: vec![10_000, 150_000, 300_000] };
    let opts = QuickstartOptions { budget: Some(budget), ..options(tmp.path()) };
    let report = quickstart(&opts).expect("sized quickstart on the fixture");

    let plan = report.plan.expect("a budget gives a plan");
    assert_eq!(plan.rows.iter().map(|r| r.target_params).collect::<Vec<_>>(), [150_000, 300_000]);
    assert!(plan.steps >= MIN_STEPS, "{}", plan.table());
    assert!((plan.measure_s + plan.train_s - 6.0).abs() < 1e-9, "{}", plan.table());
    assert!(plan.chosen_row().feasible());
    // Trained exactly what was chosen: the steps, and the shape with the tokenizer's vocabulary.
    assert_eq!(report.train.steps, plan.steps);
    let bundle = Bundle::open(&opts.out).expect("the sized bundle loads");
    assert_eq!(bundle.metadata().steps, plan.steps);
    assert_eq!(bundle.config().to_raw(), plan.model);
    assert_eq!(plan.model.vocab_size, 512);
    assert!(plan.summary().starts_with(&format!("chose {} params", plan.chosen_row().params)));
}

#[test]
fn a_bad_budget_is_refused_before_any_work() {
    let tmp = TempDir::new().unwrap();
    for minutes in [0.0, -2.0, f64::NAN] {
        let budget = TimeBudget::minutes(minutes);
        let opts = QuickstartOptions { budget: Some(budget), ..options(tmp.path()) };
        let err = quickstart(&opts).unwrap_err().to_string();
        assert!(err.contains(&format!("budget {minutes} min")) && err.contains("`train`"), "{err}");
        assert!(!opts.work.exists());
    }
}

#[test]
fn the_cli_takes_minutes_or_steps_but_not_both() {
    let tmp = TempDir::new().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_m31r-train"))
            .arg("quickstart")
            .args(args)
            .current_dir(tmp.path())
            .output()
            .unwrap()
    };
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--minutes <M>") && help.contains("default: 10"), "{help}");
    assert!(help.contains("--steps <N>") && !help.contains("1000"), "{help}");

    for (args, says) in [
        (&["--minutes", "5", "--steps", "10"][..], "cannot be used with"),
        (&["--minutes", "0"][..], "not a positive number of minutes"),
        (&["--minutes", "soon"][..], "not a positive number of minutes"),
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says) && stderr.contains("--minutes"), "{args:?}: {stderr}");
    }
}
