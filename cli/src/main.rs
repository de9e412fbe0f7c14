//! `m31r`: the command line of M31R. Generates, completes at a file position, shows status, stops
//! the daemon, and benchmarks the engine, talking to `m31rd` over its socket or running the
//! engine in this process from a bundle.
//!
//! `main` parses the command line and hands each command to its module.

mod bench;
mod complete;
mod connection;
mod generate;
mod position;
mod shutdown;
mod status;
mod stream;
mod target;

use clap::{Parser, Subcommand};

use crate::connection::Connection;

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

#[derive(Debug, Subcommand)]
enum Command {
    /// Continue a prompt; the text streams to stdout, usage and timings go to stderr.
    ///
    /// Examples: `m31r generate 'fn main() {'`, `echo 'use std::' | m31r generate -`,
    /// `m31r generate --file prompt.rs --code`.
    Generate(generate::GenerateArgs),
    /// Fill in the middle at FILE:LINE:COL; the completion streams to stdout.
    ///
    /// The file's text before the cursor is the prefix and the text after it the suffix, so the
    /// Rust-aware stop rules see the code that follows. Example: `m31r complete src/lib.rs:42:9`.
    Complete(complete::CompleteArgs),
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

fn main() {
    // SAFETY: the first statement of main: no other thread exists yet.
    unsafe { m31r_model::machine::park_idle_candle_threads() };
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
        Command::Generate(args) => generate::run(&cli.conn, &args),
        Command::Complete(args) => complete::run(&cli.conn, &args),
        Command::Status { json } => status::run(&cli.conn, json),
        Command::Shutdown => shutdown::run(&cli.conn),
        Command::Bench(args) => match &args.command {
            Some(bench::BenchCommand::Replay(replay)) => bench::replay::run(&cli.conn, replay),
            None => bench::run(&cli.conn, &args),
        },
        Command::BenchWorker(args) => bench::worker(&cli.conn, &args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
