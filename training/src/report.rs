//! `m31r-train report`: reads a run directory's `metrics.jsonl`, draws the training and validation
//! curves as an SVG (written by hand: a few polylines and axes need no plotting crate) and
//! summarises the run (steps, tokens, best validation bits per byte, throughput).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::Error;
use crate::train::{METRICS_FILE, RUN_FILE, RunSpec, read_run_spec};

/// Where `report` writes the picture unless told otherwise, inside the run directory.
pub const DEFAULT_SVG: &str = "loss.svg";

/// One logged training step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainPoint {
    /// Step (1-based count of optimiser steps done).
    pub step: u64,
    /// Weighted total loss.
    pub loss: f64,
    /// Next-token objective loss, when that objective was in the step.
    pub loss_next: Option<f64>,
    /// FIM objective loss.
    pub loss_fim: Option<f64>,
    /// CoT objective loss.
    pub loss_cot: Option<f64>,
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// Throughput of the invocation that logged it.
    pub tokens_per_s: f64,
}

/// One validation pass.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValPoint {
    /// Step after which it ran.
    pub step: u64,
    /// Loss, nats per token.
    pub loss: f64,
    /// Bits per byte.
    pub bits_per_byte: f64,
}

/// The curves of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunMetrics {
    /// Training lines, in file order.
    pub train: Vec<TrainPoint>,
    /// Validation lines, in file order.
    pub val: Vec<ValPoint>,
}

/// Reads `metrics.jsonl` of `run_dir`.
pub fn read_metrics(run_dir: &Path) -> Result<RunMetrics, Error> {
    let path = run_dir.join(METRICS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NoMetrics { run_dir: run_dir.to_path_buf() });
        }
        Err(source) => return Err(Error::Io { path, source }),
    };
    let mut metrics = RunMetrics::default();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |reason: String| Error::Invalid {
            path: path.clone(),
            reason: format!("line {}: {reason}", i + 1),
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let step = v["step"].as_u64().ok_or_else(|| bad("no integer \"step\"".into()))?;
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        if let Some(loss) = num("loss") {
            metrics.train.push(TrainPoint {
                step,
                loss,
                loss_next: num("loss_next"),
                loss_fim: num("loss_fim"),
                loss_cot: num("loss_cot"),
                tokens_seen: v["tokens_seen"].as_u64().unwrap_or(0),
                tokens_per_s: num("tokens_per_s").unwrap_or(0.0),
            });
        } else if let (Some(loss), Some(bits_per_byte)) =
            (num("val_loss"), num("val_bits_per_byte"))
        {
            metrics.val.push(ValPoint { step, loss, bits_per_byte });
        } else {
            return Err(bad("neither a training line (\"loss\") nor a validation line \
                            (\"val_loss\", \"val_bits_per_byte\")"
                .into()));
        }
    }
    if metrics.train.is_empty() && metrics.val.is_empty() {
        return Err(Error::NoMetrics { run_dir: run_dir.to_path_buf() });
    }
    Ok(metrics)
}

/// The printed summary of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// Last logged step.
    pub steps: u64,
    /// Training tokens seen by then.
    pub tokens_seen: u64,
    /// Loss at the last logged step.
    pub final_loss: Option<f64>,
    /// Best validation bits per byte and its step.
    pub best_val_bits_per_byte: Option<(u64, f64)>,
    /// Last validation pass (step, loss, bits per byte).
    pub last_val: Option<(u64, f64, f64)>,
    /// Throughput logged last (the mean of the invocation that logged it).
    pub tokens_per_s: Option<f64>,
    /// Model shape from `run.json`, when readable.
    pub model: Option<String>,
}

impl RunSummary {
    /// Summarises `metrics`; `spec` is the run's `run.json`, if any.
    pub fn new(metrics: &RunMetrics, spec: Option<&RunSpec>) -> Self {
        let last = metrics.train.last();
        let best = metrics
            .val
            .iter()
            .min_by(|a, b| a.bits_per_byte.total_cmp(&b.bits_per_byte))
            .map(|v| (v.step, v.bits_per_byte));
        let steps = metrics
            .train
            .iter()
            .map(|p| p.step)
            .chain(metrics.val.iter().map(|v| v.step))
            .max()
            .unwrap_or(0);
        Self {
            steps,
            tokens_seen: last.map_or(0, |p| p.tokens_seen),
            final_loss: last.map(|p| p.loss),
            best_val_bits_per_byte: best,
            last_val: metrics.val.last().map(|v| (v.step, v.loss, v.bits_per_byte)),
            tokens_per_s: last.map(|p| p.tokens_per_s),
            model: spec.map(|s| {
                let m = &s.model;
                format!(
                    "d_model {} · {} layers · {} heads · d_ff {} · vocab {} · context {}",
                    m.d_model, m.n_layers, m.n_heads, m.d_ff, m.vocab_size, m.context_length
                )
            }),
        }
    }

    /// The text printed by `report`.
    pub fn table(&self) -> String {
        let opt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |x| format!("{x:.digits$}"));
        let mut out = String::new();
        if let Some(model) = &self.model {
            let _ = writeln!(out, "model                  {model}");
        }
        let _ = writeln!(out, "steps                  {}", self.steps);
        let _ = writeln!(out, "tokens seen            {}", self.tokens_seen);
        let _ = writeln!(out, "final train loss       {}", opt(self.final_loss, 4));
        let _ = writeln!(
            out,
            "last validation        {}",
            self.last_val.map_or("-".into(), |(s, l, b)| format!(
                "{l:.4} nats/token · {b:.4} bits/byte (step {s})"
            ))
        );
        let _ = writeln!(
            out,
            "best val bits/byte     {}",
            self.best_val_bits_per_byte.map_or("-".into(), |(s, b)| format!("{b:.4} (step {s})"))
        );
        let _ = writeln!(out, "tokens/s               {}", opt(self.tokens_per_s, 0));
        out
    }
}

/// Writes the curves of `run_dir` to `out` (default `run_dir/loss.svg`) and returns the summary
/// and the picture's path.
pub fn report(run_dir: &Path, out: Option<&Path>) -> Result<(RunSummary, PathBuf), Error> {
    let metrics = read_metrics(run_dir)?;
    let spec = read_run_spec(&run_dir.join(RUN_FILE)).ok();
    let summary = RunSummary::new(&metrics, spec.as_ref());
    let title = format!("{} — {}", run_dir.display(), summary.model.as_deref().unwrap_or("run"));
    let svg = render_svg(&metrics, &title);
    let path = out.map_or_else(|| run_dir.join(DEFAULT_SVG), Path::to_path_buf);
    crate::fsutil::write_atomic(&path, svg.as_bytes())?;
    Ok((summary, path))
}

/// One curve of a panel.
struct Series<'a> {
    label: &'a str,
    color: &'a str,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

const WIDTH: f64 = 900.0;
const PANEL_HEIGHT: f64 = 300.0;
const MARGIN: (f64, f64, f64, f64) = (70.0, 30.0, 40.0, 50.0); // left, right, top, bottom

/// The picture: losses (train total, per objective, validation) on top, validation bits per
/// byte below when there is any validation pass.
pub fn render_svg(metrics: &RunMetrics, title: &str) -> String {
    let train = |f: fn(&TrainPoint) -> Option<f64>| -> Vec<(f64, f64)> {
        metrics.train.iter().filter_map(|p| f(p).map(|y| (p.step as f64, y))).collect()
    };
    let losses: Vec<Series> = [
        Series {
            label: "train loss",
            color: "#1f77b4",
            dashed: false,
            points: train(|p| Some(p.loss)),
        },
        Series {
            label: "next-token",
            color: "#2ca02c",
            dashed: true,
            points: train(|p| p.loss_next),
        },
        Series { label: "FIM", color: "#9467bd", dashed: true, points: train(|p| p.loss_fim) },
        Series { label: "CoT", color: "#8c564b", dashed: true, points: train(|p| p.loss_cot) },
        Series {
            label: "validation loss",
            color: "#d62728",
            dashed: false,
            points: metrics.val.iter().map(|v| (v.step as f64, v.loss)).collect(),
        },
    ]
    .into_iter()
    .filter(|s| !s.points.is_empty())
    .collect();
    let bpb = Series {
        label: "validation bits/byte",
        color: "#d62728",
        dashed: false,
        points: metrics.val.iter().map(|v| (v.step as f64, v.bits_per_byte)).collect(),
    };
    let panels = if bpb.points.is_empty() { 1.0 } else { 2.0 };
    let height = MARGIN.2 + panels * PANEL_HEIGHT;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" font-size=\"14\" text-anchor=\"middle\">{}</text>\n",
        WIDTH / 2.0,
        escape(title)
    );
    let x_range = range(
        metrics
            .train
            .iter()
            .map(|p| p.step as f64)
            .chain(metrics.val.iter().map(|v| v.step as f64)),
    );
    panel(&mut svg, MARGIN.2, "loss (nats/token)", x_range, &losses);
    if !bpb.points.is_empty() {
        panel(&mut svg, MARGIN.2 + PANEL_HEIGHT, "validation bits/byte", x_range, &[bpb]);
    }
    svg.push_str("</svg>\n");
    svg
}

/// Draws one panel whose top edge is at `top`: frame, ticks, curves, legend.
fn panel(svg: &mut String, top: f64, y_label: &str, x: (f64, f64), series: &[Series]) {
    let (left, right) = (MARGIN.0, WIDTH - MARGIN.1);
    let (y0, y1) = (top + 10.0, top + PANEL_HEIGHT - MARGIN.3);
    let y = range(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    let (xt, yt) = (ticks(x.0, x.1), ticks(y.0, y.1));
    let (x_lo, x_hi) = (xt[0].min(x.0), xt[xt.len() - 1].max(x.1));
    let (y_lo, y_hi) = (yt[0].min(y.0), yt[yt.len() - 1].max(y.1));
    let px = |v: f64| left + (v - x_lo) / (x_hi - x_lo).max(f64::EPSILON) * (right - left);
    let py = |v: f64| y1 - (v - y_lo) / (y_hi - y_lo).max(f64::EPSILON) * (y1 - y0);
    let _ = writeln!(
        svg,
        "<g class=\"panel\"><rect x=\"{left}\" y=\"{y0}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>",
        right - left,
        y1 - y0
    );
    for &t in &xt {
        let _ = writeln!(
            svg,
            "<line x1=\"{0:.1}\" y1=\"{y0}\" x2=\"{0:.1}\" y2=\"{y1}\" stroke=\"#eee\"/>\
             <text x=\"{0:.1}\" y=\"{1:.1}\" text-anchor=\"middle\">{2}</text>",
            px(t),
            y1 + 16.0,
            label(t)
        );
    }
    for &t in &yt {
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{right}\" y2=\"{0:.1}\" stroke=\"#eee\"/>\
             <text x=\"{1:.1}\" y=\"{2:.1}\" text-anchor=\"end\">{3}</text>",
            py(t),
            left - 6.0,
            py(t) + 4.0,
            label(t)
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">step</text>\
         <text transform=\"translate(18 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        (left + right) / 2.0,
        y1 + 34.0,
        (y0 + y1) / 2.0,
        escape(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let points: Vec<String> =
            s.points.iter().map(|&(a, b)| format!("{:.1},{:.1}", px(a), py(b))).collect();
        let dash = if s.dashed { " stroke-dasharray=\"5 3\"" } else { "" };
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"{dash} points=\"{}\"/>",
            s.color,
            points.join(" ")
        );
        if s.points.len() == 1 {
            let (a, b) = s.points[0];
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>",
                px(a),
                py(b),
                s.color
            );
        }
        let ly = y0 + 16.0 + 16.0 * i as f64;
        let _ = writeln!(
            svg,
            "<line x1=\"{0:.1}\" y1=\"{ly:.1}\" x2=\"{1:.1}\" y2=\"{ly:.1}\" stroke=\"{2}\" stroke-width=\"2\"{dash}/>\
             <text x=\"{3:.1}\" y=\"{4:.1}\" class=\"legend\">{5}</text>",
            right - 170.0,
            right - 145.0,
            s.color,
            right - 140.0,
            ly + 4.0,
            escape(s.label)
        );
    }
    svg.push_str("</g>\n");
}

/// Smallest and largest value (0..1 when there is none).
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi { (0.0, 1.0) } else { (lo, hi) }
}

/// About five round tick values (1, 2 or 5 times a power of ten apart) from at or below `lo` to
/// at or above `hi`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) };
    let raw = span / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).floor() * step;
    let mut out = Vec::new();
    let mut t = first;
    // Up to the first tick at or above `hi`, so the axis ends on a labelled value.
    while out.last().is_none_or(|&last| last < hi - step * 1e-9) || out.len() < 2 {
        out.push(t);
        t = first + step * out.len() as f64;
    }
    out
}

/// A tick label without float noise.
fn label(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.to_owned() }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 100.0), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let t = ticks(2.31, 7.9);
        assert!(t[0] <= 2.31 && *t.last().unwrap() >= 7.9, "{t:?}");
        assert_eq!(ticks(3.0, 3.0).len(), 2);
        assert_eq!(label(0.30000000000000004), "0.3");
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
