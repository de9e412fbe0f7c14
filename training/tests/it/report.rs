//! `report` (curves to SVG, run summary) on a fixture metrics file, its refusals, and `params`.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use m31r_train::Error;
use m31r_train::report::{DEFAULT_SVG, read_metrics, report};
use tempfile::TempDir;

/// Metrics as `train` writes them: training lines every 10 steps, validation every 20.
fn write_fixture_metrics(run: &Path) {
    fs::create_dir_all(run).unwrap();
    let mut text = String::new();
    for step in (10..=60).step_by(10) {
        let loss = 7.0 - step as f64 / 20.0;
        text += &format!(
            "{{\"step\":{step},\"lr\":0.001,\"loss\":{loss},\"grad_norm\":1.0,\"clipped\":false,\
             \"clipped_steps\":0,\"tokens_seen\":{},\"tokens_per_s\":1500.0,\
             \"loss_next\":{},\"loss_fim\":{},\"loss_cot\":{}}}\n",
            step * 1024,
            loss - 0.1,
            loss + 0.2,
            loss + 0.5
        );
        if step % 20 == 0 {
            // The best validation pass is the middle one.
            let bpb = if step == 40 { 1.8 } else { 2.5 - step as f64 / 100.0 };
            text += &format!(
                "{{\"step\":{step},\"val_loss\":{},\"val_bits_per_byte\":{bpb}}}\n",
                bpb * 1.5
            );
        }
    }
    fs::write(run.join("metrics.jsonl"), text).unwrap();
}

fn m31r_train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_m31r-train")).args(args).output().unwrap()
}

#[test]
fn report_draws_every_curve_and_summarises_the_run() {
    let tmp = TempDir::new().unwrap();
    let run = tmp.path().join("run");
    write_fixture_metrics(&run);
    let (summary, path) = report(&run, None).unwrap();
    assert_eq!(path, run.join(DEFAULT_SVG));
    expect_test::expect![[r#"
        steps                  60
        tokens seen            61440
        final train loss       4.0000
        last validation        2.8500 nats/token · 1.9000 bits/byte (step 60)
        best val bits/byte     1.8000 (step 40)
        tokens/s               1500
    "#]]
    .assert_eq(&summary.table());

    let svg = fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"));
    // Two panels: losses (train total, three objectives, validation) and validation bits/byte.
    assert_eq!(svg.matches("class=\"panel\"").count(), 2);
    assert_eq!(svg.matches("<polyline").count(), 6);
    for label in
        ["train loss", "next-token", "FIM", "CoT", "validation loss", "validation bits/byte"]
    {
        assert!(svg.contains(&format!("class=\"legend\">{label}<")), "{label}");
    }
    let points: Vec<usize> = svg
        .lines()
        .filter(|l| l.starts_with("<polyline"))
        .map(|l| l.split("points=\"").nth(1).unwrap().split(' ').count())
        .collect();
    assert_eq!(points, vec![6, 6, 6, 6, 3, 3]);
    for axis in ["loss (nats/token)", ">step<"] {
        assert!(svg.contains(axis), "{axis}");
    }

    // Elsewhere when asked; the CLI prints the same summary and where the picture is.
    let elsewhere = tmp.path().join("curves.svg");
    let out = m31r_train(&["report", run.to_str().unwrap(), "--out", elsewhere.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("best val bits/byte     1.8000 (step 40)"), "{stdout}");
    assert!(stdout.contains("curves.svg"), "{stdout}");
    assert_eq!(fs::read_to_string(&elsewhere).unwrap(), svg);
}

#[test]
fn a_run_without_validation_gets_one_panel() {
    let tmp = TempDir::new().unwrap();
    let run = tmp.path().join("run");
    fs::create_dir_all(&run).unwrap();
    fs::write(
        run.join("metrics.jsonl"),
        "{\"step\":1,\"loss\":7.5,\"tokens_seen\":100,\"tokens_per_s\":10.0}\n",
    )
    .unwrap();
    let (summary, path) = report(&run, None).unwrap();
    assert_eq!(summary.best_val_bits_per_byte, None);
    let svg = fs::read_to_string(path).unwrap();
    assert_eq!(svg.matches("class=\"panel\"").count(), 1);
    assert_eq!(svg.matches("<circle").count(), 1, "a single point is drawn as a dot");
}

#[test]
fn a_run_dir_without_metrics_is_a_clear_error() {
    let tmp = TempDir::new().unwrap();
    let err = read_metrics(tmp.path()).unwrap_err();
    assert!(matches!(err, Error::NoMetrics { .. }), "{err}");
    assert!(err.to_string().contains("no training metrics"), "{err}");
    fs::write(tmp.path().join("metrics.jsonl"), "").unwrap();
    assert!(matches!(read_metrics(tmp.path()).unwrap_err(), Error::NoMetrics { .. }));
    fs::write(tmp.path().join("metrics.jsonl"), "{\"step\":1,\"loss\":2.0}\nnot json\n").unwrap();
    let err = read_metrics(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("metrics.jsonl: line 2"), "{err}");

    let out = m31r_train(&["report", tmp.path().join("missing").to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing") && stderr.contains("no training metrics"), "{stderr}");
}

/// stdout without the closing wall-time line.
fn table(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.starts_with("wall time")).fold(
        String::new(),
        |mut acc, l| {
            acc.push_str(l);
            acc.push('\n');
            acc
        },
    )
}

#[test]
fn params_prints_the_table_of_a_preset_or_a_target() {
    expect_test::expect![[r#"
        preset tiny
        d_model 160 · 6 layers · 5 heads (5 kv) · head size 32 · d_ff 368 · vocab 2048 · context 512 · tied head
        component                   per layer          total   share
        token embedding                               327680  16.35%
        attention                      102400         614400  30.66%
        feed-forward (SwiGLU)          176640        1059840  52.89%
        RMSNorm weights                   320           2080   0.10%
        LM head (untied)                                   0   0.00%
        total                                        2004000 100.00%
    "#]].assert_eq(&table(&m31r_train(&["params", "--preset", "tiny"])));
    expect_test::expect![[r#"
        target 30000000 parameters (-0.38%; embedding ratio 0.15, GLU expansion 2.667, head size 64)
        d_model 576 · 7 layers · 9 heads (9 kv) · head size 64 · d_ff 1312 · vocab 8192 · context 2048 · tied head
        component                   per layer          total   share
        token embedding                              4718592  15.79%
        attention                     1327104        9289728  31.08%
        feed-forward (SwiGLU)         2267136       15869952  53.10%
        RMSNorm weights                  1152           8640   0.03%
        LM head (untied)                                   0   0.00%
        total                                       29886912 100.00%
    "#]].assert_eq(&table(&m31r_train(&[
        "params",
        "--target-params",
        "30000000",
        "--vocab",
        "8192",
    ])));
    let out = m31r_train(&["params"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--preset"));
    let out = m31r_train(&["params", "--preset", "huge"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown model preset \"huge\""));
}
