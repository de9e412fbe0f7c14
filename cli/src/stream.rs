//! What `generate` and `complete` share: the generation parameters, the output options, and
//! streaming a request's text to stdout with its usage and timings on stderr.

use std::io::{IsTerminal, Write};

use anyhow::{Context, bail};
use clap::Args;
use m31r_protocol::{Event, GenerationParams, Request};
use serde::Serialize;

use crate::target::Target;

/// Generation parameters; defaults are the protocol's.
#[derive(Debug, Args)]
pub struct ParamArgs {
    /// Most tokens to generate (1..=4096).
    #[arg(long, short = 'n', value_name = "N", default_value_t = GenerationParams::default().max_tokens)]
    max_tokens: u32,
    /// Sampling temperature; 0 is greedy and deterministic.
    #[arg(long, value_name = "T", default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the K likeliest tokens only (0 = no limit).
    #[arg(long, value_name = "K", default_value_t = 0)]
    top_k: u32,
    /// Sample among the likeliest tokens covering probability P (1 = no limit).
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop before this text (repeatable, at most 8, each 1..=64 bytes).
    #[arg(long = "stop", value_name = "TEXT")]
    stop: Vec<String>,
    /// Give up after this many milliseconds (0 = no deadline).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    deadline_ms: u64,
}

impl ParamArgs {
    /// The parameters as the protocol carries them.
    pub fn params(&self) -> GenerationParams {
        GenerationParams {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            stop: self.stop.clone(),
            deadline_ms: self.deadline_ms,
        }
    }
}

/// What goes to the terminal besides the completion.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print only the generated text: no usage and timings on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}
/// Runs `request`, writing its text to stdout as it arrives and a usage line to stderr.
pub fn stream(target: &mut Target, request: &Request, quiet: bool) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let mut failed: Option<std::io::Error> = None;
    let mut ends_line = true;
    let event = target.run(request, &mut |text| {
        if failed.is_none() {
            failed = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).err();
            ends_line = text.ends_with('\n');
        }
    })?;
    match failed {
        // A reader that stopped early (`| head`) is not an error of ours.
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        Some(e) => return Err(e).context("cannot write the completion to stdout"),
        None => {}
    }
    match event {
        Event::Done { stop, usage, timings, .. } => {
            if !ends_line && std::io::stdout().is_terminal() {
                println!();
            }
            if !quiet {
                let per_token = if usage.completion_tokens > 0 {
                    let ms = timings.decode_ms / f64::from(usage.completion_tokens);
                    format!(" ({ms:.1} ms/token, {:.0} tokens/s)", 1e3 / ms.max(1e-9))
                } else {
                    String::new()
                };
                eprintln!(
                    "m31r: stop {} · prompt {} tokens ({} cached) · {} generated · queue {:.1} ms \
                     · prefill {:.1} ms · decode {:.1} ms{per_token} · total {:.1} ms",
                    wire(&stop),
                    usage.prompt_tokens,
                    usage.cached_tokens,
                    usage.completion_tokens,
                    timings.queue_ms,
                    timings.prefill_ms,
                    timings.decode_ms,
                    timings.total_ms,
                );
            }
            Ok(())
        }
        Event::Error { code, message, .. } => {
            bail!("{} refused the request ({}): {message}", target.describe(), wire(&code))
        }
        other => bail!("{} answered with {}", target.describe(), wire(&other)),
    }
}

/// A value as it appears on the wire (`max_tokens`, `{"type":"hello",...}`).
pub fn wire<T: Serialize>(value: &T) -> String {
    let text = serde_json::to_string(value).unwrap_or_else(|e| format!("<{e}>"));
    text.trim_matches('"').to_owned()
}
