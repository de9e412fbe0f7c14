//! `m31r`: the command line of M31R. Generates, completes at a file position, shows status, stops
//! the daemon, and benchmarks the engine, talking to `m31rd` over its socket or running the
//! engine in this process from a bundle.

mod bench;
mod corpus;
mod position;
#[cfg(test)]
mod protocol_doc;
mod target;

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use m31r_protocol::{ContextFile, DaemonStatus, Event, FimInput, GenerationParams, Request};
use serde::Serialize;

use crate::position::Position;
use crate::target::Target;

/// Offline Rust code completion: ask the M31R daemon (m31rd) for completions, or run the model
/// in this process with --bundle.
///
/// Every command talks to m31rd over its Unix socket (start it with `m31rd --bundle DIR`),
/// unless --bundle DIR is given: then the bundle is loaded here and the engine runs in-process,
/// with the same requests, events and stop rules.
#[derive(Debug, Parser)]
#[command(name = "m31r", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: Command,
}

/// Where requests go.
#[derive(Debug, Args)]
pub struct Connection {
    /// Daemon socket [default: where m31rd listens: $M31R_SOCKET, else `socket` in its config
    /// file, else $XDG_RUNTIME_DIR/m31r/m31rd.sock].
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Load this release bundle and run the engine in this process instead of using the daemon.
    #[arg(long, global = true, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// Compute threads for the in-process engine (0 = all cores).
    #[arg(long, global = true, value_name = "N", default_value_t = 0)]
    pub threads: usize,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Continue a prompt; the text streams to stdout, usage and timings go to stderr.
    ///
    /// Examples: `m31r generate 'fn main() {'`, `echo 'use std::' | m31r generate -`,
    /// `m31r generate --file prompt.rs --code`.
    Generate(GenerateArgs),
    /// Fill in the middle at FILE:LINE:COL; the completion streams to stdout.
    ///
    /// The file's text before the cursor is the prefix and the text after it the suffix, so the
    /// Rust-aware stop rules see the code that follows. Example: `m31r complete src/lib.rs:42:9`.
    Complete(CompleteArgs),
    /// Show the daemon's model, cache, queue, memory and counters.
    Status {
        /// Print the status event as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Ask the daemon to cancel in-flight work and exit (it removes its socket).
    Shutdown,
    /// Measure startup, cold prefill, keystroke latency, decode speed and memory, each beside
    /// this machine's physical bound measured in the same run.
    ///
    /// Without --bundle, builds temporary bundles of the given presets with random seeded
    /// weights (speed does not depend on weight values) and a tokenizer trained here on local
    /// Rust sources. The engine runs in a child process per model, so start-up and memory are
    /// those of a fresh process. Prints numbers; asserts nothing.
    Bench(bench::BenchArgs),
    /// One model's measurements for `bench`, as JSON (internal).
    #[command(hide = true)]
    BenchWorker(bench::WorkerArgs),
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// The prompt; `-` reads it from stdin.
    #[arg(value_name = "PROMPT", required_unless_present = "file", conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(long, short, value_name = "PATH")]
    file: Option<PathBuf>,
    /// The prompt is Rust code before the cursor: apply the Rust-aware stop rules (a `complete`
    /// request) instead of continuing raw text.
    #[arg(long)]
    code: bool,
    #[command(flatten)]
    params: ParamArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
struct CompleteArgs {
    /// Cursor position FILE:LINE:COL, 1-based; COL counts characters and may be one past the end
    /// of the line.
    #[arg(value_name = "FILE:LINE:COL")]
    position: Position,
    /// Another file to show the model before the cursor's file (repeatable; least relevant
    /// first, as the daemon drops context files from the first when they do not fit).
    #[arg(long = "context", value_name = "PATH")]
    context: Vec<PathBuf>,
    #[command(flatten)]
    params: ParamArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Generation parameters; defaults are the protocol's.
#[derive(Debug, Args)]
struct ParamArgs {
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
    fn params(&self) -> GenerationParams {
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

#[derive(Debug, Args)]
struct OutputArgs {
    /// Print only the generated text: no usage and timings on stderr.
    #[arg(long, short)]
    quiet: bool,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("m31r: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.conn.threads > 0 {
        // SAFETY: no other thread exists yet; candle's thread pool reads this on first use, and
        // the bench's child processes inherit it.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", cli.conn.threads.to_string()) };
    }
    match cli.command {
        Command::Generate(args) => {
            let prompt = read_prompt(&args)?;
            let mut target = open(&cli.conn, args.output.quiet)?;
            let params = args.params.params();
            let id = "1".to_owned();
            let request = if args.code {
                Request::Complete { id, prompt, params }
            } else {
                Request::Generate { id, prompt, params }
            };
            stream(&mut target, &request, args.output.quiet)
        }
        Command::Complete(args) => {
            let (prefix, suffix) = args.position.split_file()?;
            let context_files = args
                .context
                .iter()
                .map(|path| {
                    let text = std::fs::read_to_string(path).with_context(|| {
                        format!("cannot read context file {} as UTF-8 text", path.display())
                    })?;
                    Ok(ContextFile { path: path.display().to_string(), text })
                })
                .collect::<anyhow::Result<_>>()?;
            let mut target = open(&cli.conn, args.output.quiet)?;
            let request = Request::Fim {
                id: "1".into(),
                input: FimInput { prefix, suffix, context_files },
                params: args.params.params(),
            };
            stream(&mut target, &request, args.output.quiet)
        }
        Command::Status { json } => {
            let mut target = open(&cli.conn, true)?;
            let event = target.run(&Request::Status { id: "status".into() }, &mut |_| {})?;
            let Event::Status { status, .. } = event else {
                bail!("{} answered status with {}", target.describe(), wire(&event));
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", format_status(&target.describe(), &status));
            }
            Ok(())
        }
        Command::Shutdown => {
            if cli.conn.bundle.is_some() {
                bail!(
                    "shutdown stops a daemon; with --bundle the engine runs inside this command \
                     and stops with it"
                );
            }
            let mut target = open(&cli.conn, true)?;
            let event = target.run(&Request::Shutdown { id: "shutdown".into() }, &mut |_| {})?;
            match event {
                Event::ShuttingDown { .. } => {
                    eprintln!("{} is shutting down", target.describe());
                    Ok(())
                }
                other => bail!("{} answered shutdown with {}", target.describe(), wire(&other)),
            }
        }
        Command::Bench(args) => bench::run(&cli.conn, &args),
        Command::BenchWorker(args) => bench::worker(&cli.conn, &args),
    }
}

/// The socket `m31rd` would listen on: `--socket`, else the daemon's own resolution
/// (`$M31R_SOCKET` over its config file's `socket` over the default path).
pub fn socket_path(conn: &Connection) -> PathBuf {
    #[derive(Serialize)]
    struct NoFlags {}
    if let Some(socket) = &conn.socket {
        return socket.clone();
    }
    match m31r_daemon::config::DaemonConfig::resolve(None, NoFlags {}) {
        Ok(config) => config.socket_path(),
        Err(e) => {
            let fallback = m31r_protocol::socket::default_socket_path();
            eprintln!(
                "m31r: ignoring the daemon configuration ({e}); trying {}",
                fallback.display()
            );
            fallback
        }
    }
}

/// The daemon, or with `--bundle` an in-process engine (telling the load time unless `quiet`).
fn open(conn: &Connection, quiet: bool) -> anyhow::Result<Target> {
    let Some(bundle) = &conn.bundle else {
        return Target::connect(&socket_path(conn));
    };
    let target = Target::load(bundle)?;
    if let (Target::Local(local), false) = (&target, quiet) {
        eprintln!(
            "m31r: loaded {} ({} parameters) in {:.0} ms",
            bundle.display(),
            target.model().parameters,
            local.load_time().as_secs_f64() * 1e3
        );
    }
    Ok(target)
}

fn read_prompt(args: &GenerateArgs) -> anyhow::Result<String> {
    match (&args.prompt, &args.file) {
        (_, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("cannot read prompt file {} as UTF-8 text", file.display())),
        (Some(dash), None) if dash == "-" => {
            let mut prompt = String::new();
            std::io::stdin()
                .read_to_string(&mut prompt)
                .context("cannot read the prompt from stdin as UTF-8 text")?;
            Ok(prompt)
        }
        (Some(prompt), None) => Ok(prompt.clone()),
        (None, None) => bail!("no prompt: give one as an argument, `-` for stdin, or --file PATH"),
    }
}

/// Runs `request`, writing its text to stdout as it arrives and a usage line to stderr.
fn stream(target: &mut Target, request: &Request, quiet: bool) -> anyhow::Result<()> {
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
fn wire<T: Serialize>(value: &T) -> String {
    let text = serde_json::to_string(value).unwrap_or_else(|e| format!("<{e}>"));
    text.trim_matches('"').to_owned()
}

fn format_status(source: &str, s: &DaemonStatus) -> String {
    let m = &s.model;
    let hit = if s.cached_tokens + s.prefilled_tokens > 0 {
        format!(
            " ({:.0}% of prompt tokens from cache)",
            100.0 * s.cached_tokens as f64 / (s.cached_tokens + s.prefilled_tokens) as f64
        )
    } else {
        String::new()
    };
    let uptime = s.uptime_s as u64;
    format!(
        "{source}\n\
         model     {} · {} parameters · context {} tokens · {}\n\
         uptime    {}h {:02}m {:02}s · {} connections · {} queued\n\
         cache     {} sequences · {} tokens · {} of {} budget\n\
         memory    {} resident\n\
         requests  {} finished · {} cancelled · {} failed\n\
         tokens    {} from cache · {} prefilled · {} generated{hit}\n",
        if m.version.is_empty() { "(unversioned)" } else { &m.version },
        m.parameters,
        m.context_length,
        m.precision,
        uptime / 3600,
        uptime / 60 % 60,
        uptime % 60,
        s.connections,
        s.queued,
        s.cache_entries,
        s.cache_tokens,
        mib(s.cache_bytes),
        mib(s.cache_budget_bytes),
        mib(s.resident_bytes),
        s.requests,
        s.cancelled,
        s.errors,
        s.cached_tokens,
        s.prefilled_tokens,
        s.generated_tokens,
    )
}

/// Bytes in MiB, for people.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn example_config_documents_every_key_with_its_default() {
        use m31r_daemon::config::DaemonConfig;
        #[derive(serde::Deserialize)]
        struct File {
            daemon: DaemonConfig,
        }
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/daemon/m31r.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let file: File = toml::from_str(&text).unwrap();
        assert_eq!(file.daemon, DaemonConfig::default(), "{path} must show the defaults");
        let every_key = DaemonConfig {
            bundle: Some("b".into()),
            socket: Some("s".into()),
            log_file: Some("l".into()),
            ..DaemonConfig::default()
        };
        let keys = toml::Table::try_from(&every_key).unwrap();
        for key in keys.keys() {
            let set = format!("\n{key} = ");
            let unset = format!("\n# {key} = ");
            assert!(text.contains(&set) || text.contains(&unset), "{path} lacks `{key}`");
        }
    }

    #[test]
    fn status_is_readable() {
        let status = DaemonStatus {
            uptime_s: 3725.0,
            cached_tokens: 300,
            prefilled_tokens: 100,
            cache_budget_bytes: 512 << 20,
            ..DaemonStatus::default()
        };
        let text = format_status("m31rd at /s", &status);
        assert!(text.contains("1h 02m 05s"), "{text}");
        assert!(text.contains("75% of prompt tokens from cache"), "{text}");
        assert!(text.contains("of 512.0 MiB budget"), "{text}");
    }
}
