//! Printing one model's bench report: each measurement beside this machine's bound and, for models
//! of its size, the fastest peer's number.

use super::{Machine, Report};

/// The fastest peer on this machine (DESIGN §8): llama.cpp, 2 threads, a 55M LLaMA shape in f16.
const PEER: &str = "llama.cpp, 55M f16";
const PEER_PREFILL_1000_MS: f64 = 850.0;
const PEER_KEYSTROKE_MS: f64 = 6.0;
const PEER_DECODE_MS: f64 = 4.7;
/// Start-up goal of issue 4.
const STARTUP_GOAL_MS: f64 = 500.0;

/// Prints `r`, the report of the bundle called `name`, against the bounds of machine `m`.
pub(super) fn print_report(name: &str, r: &Report, m: &Machine, random: bool) {
    let bw = m.bandwidth_gbs * 1e9;
    let weights = r.weight_bytes as f64;
    let file = r.weight_file_bytes as f64;
    let startup_bound = (file / (m.sha256_gbs * 1e9) + file / bw) * 1e3;
    let prefill_bound =
        2.0 * r.params as f64 * f64::from(r.prefill.prompt_tokens) / (m.gflops * 1e9) * 1e3;
    let pass_ms = |context: f64| (weights + r.kv_bytes_per_token as f64 * context) / bw * 1e3;
    let keystroke_bound = pass_ms(f64::from(r.keystroke.prompt_tokens));
    let decode_bound = pass_ms(r.decode_context);
    let memory_bound = weights + r.cache_bytes as f64;
    // The peer's numbers are for a model of about small's size; beside tiny they would mislead.
    let peer = r.params > 20_000_000;
    let reference =
        |value: f64| if peer { format!("{PEER} ≈ {value} ms") } else { String::new() };

    println!();
    println!(
        "── {name}: {:.1}M parameters · vocab {} · {} layers × d_model {} · context {}{} · \
         {} threads ──",
        r.params as f64 / 1e6,
        r.vocab,
        r.n_layers,
        r.d_model,
        r.context,
        if random { " · random weights" } else { "" },
        r.threads,
    );
    println!("{:<40} {:>12} {:>12} {:>8}   reference", "", "measured", "bound", "× bound");
    let row = |what: String, measured: f64, bound: f64, unit: &str, reference: String| {
        println!(
            "{what:<40} {:>12} {:>12} {:>8.2}   {reference}",
            format!("{measured:.1} {unit}"),
            format!("{bound:.1} {unit}"),
            measured / bound
        );
    };
    row(
        "start-up (open + verify + build)".into(),
        r.startup_ms,
        startup_bound,
        "ms",
        format!("goal ≤ {STARTUP_GOAL_MS} ms"),
    );
    let tokens = r.prefill.prompt_tokens;
    row(
        format!(
            "cold prefill, {tokens} tokens ({:.0} tok/s)",
            f64::from(tokens) * 1e3 / r.prefill.prefill_ms
        ),
        r.prefill.prefill_ms,
        prefill_bound,
        "ms",
        if peer {
            format!("{PEER} ≈ {:.0} ms", PEER_PREFILL_1000_MS * f64::from(tokens) / 1000.0)
        } else {
            String::new()
        },
    );
    row(
        format!("keystroke → first token ({:.1} new tok)", r.keystroke_new_tokens),
        r.keystroke.first_ms,
        keystroke_bound,
        "ms",
        reference(PEER_KEYSTROKE_MS),
    );
    row(
        format!("decode per token ({:.0} tok/s)", 1e3 / r.decode_ms_per_token),
        r.decode_ms_per_token,
        decode_bound,
        "ms",
        reference(PEER_DECODE_MS),
    );
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    row(
        "resident memory".into(),
        mib(r.resident_after),
        mib(memory_bound as u64),
        "MiB",
        String::new(),
    );
    let k = &r.keystroke;
    println!(
        "  prefill    best of {} prompts sharing nothing with the cache ({} cached tokens)",
        r.prefill_reps, r.prefill.cached_tokens
    );
    println!(
        "  keystroke  {} typed characters on a {}-token FIM prompt warmed once; the median one: \
         {} tokens cached, engine {:.1} ms of which forward {:.1} ms (the rest: encoding the \
         prompt, cache lookup, sampling); p90 {:.1} ms",
        r.keystrokes,
        k.prompt_tokens,
        k.cached_tokens,
        k.total_ms,
        k.prefill_ms,
        r.keystroke_p90_ms,
    );
    println!(
        "  decode     {} tokens, ~{:.0} tokens of context on average",
        r.decode_tokens, r.decode_context
    );
    println!(
        "  memory     {:.1} MiB before loading, {:.1} MiB loaded, {:.1} MiB after the runs \
         (KV cache {:.1} MiB)",
        mib(r.resident_before),
        mib(r.resident_loaded),
        mib(r.resident_after),
        mib(r.cache_bytes),
    );
}

/// One figure of a report, in ms.
type Metric = fn(&Report) -> f64;

/// The figures compared quiet and under load, by name.
const LOAD_METRICS: [(&str, Metric); 4] = [
    ("keystroke → first token", |r| r.keystroke.first_ms),
    ("keystroke p90", |r| r.keystroke_p90_ms),
    ("decode per token", |r| r.decode_ms_per_token),
    ("cold prefill", |r| r.prefill.prefill_ms),
];

/// The median of `values` (the mean of the middle two for an even count).
pub(super) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The largest of `values`.
pub(super) fn worst(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

/// Prints the spread of repeated quiet runs of one model.
pub(super) fn print_repeats(quiet: &[Report]) {
    println!("  {} quiet runs (median, worst, each run):", quiet.len());
    for (what, metric) in LOAD_METRICS {
        let values: Vec<f64> = quiet.iter().map(metric).collect();
        println!(
            "    {what:<26} {:>9.1} ms {:>9.1} ms   [{}]",
            median(&values),
            worst(&values),
            list(&values)
        );
    }
}

/// Prints one model's figures quiet and under `load` competitor processes: the quiet median,
/// the loaded median and worst, and the worst over the quiet median.
pub(super) fn print_load(load: usize, quiet: &[Report], loaded: &[Report]) {
    println!(
        "  under load ({load} CPU-bound competitor processes), {} quiet and {} loaded runs:",
        quiet.len(),
        loaded.len()
    );
    println!(
        "    {:<26} {:>12} {:>14} {:>13} {:>13}   loaded runs",
        "", "quiet median", "loaded median", "loaded WORST", "worst/quiet"
    );
    for (what, metric) in LOAD_METRICS {
        let q: Vec<f64> = quiet.iter().map(metric).collect();
        let l: Vec<f64> = loaded.iter().map(metric).collect();
        let quiet_median = median(&q);
        let loaded_worst = worst(&l);
        println!(
            "    {what:<26} {:>9.1} ms {:>11.1} ms {:>10.1} ms {:>12.1}×   [{}]",
            quiet_median,
            median(&l),
            loaded_worst,
            loaded_worst / quiet_median,
            list(&l)
        );
    }
}

/// Values as `1.0 / 2.3 / …` ms.
fn list(values: &[f64]) -> String {
    values.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_worst() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(worst(&[3.0, 9.0, 2.0]), 9.0);
    }
}
