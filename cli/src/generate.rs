//! `m31r generate`: continue a prompt, as raw text or, with `--code`, as Rust code before the
//! cursor under the Rust-aware stop rules.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use m31r_protocol::Request;

use crate::connection::{Connection, open};
use crate::stream::{OutputArgs, ParamArgs, stream};

/// `m31r generate`'s arguments.
#[derive(Debug, Args)]
pub struct GenerateArgs {
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

/// Reads the prompt, sends it where `conn` says and streams the continuation to stdout.
pub fn run(conn: &Connection, args: &GenerateArgs) -> anyhow::Result<()> {
    let prompt = read_prompt(args)?;
    let mut target = open(conn, args.output.quiet)?;
    let params = args.params.params();
    let id = "1".to_owned();
    let request = if args.code {
        Request::Complete { id, prompt, params }
    } else {
        Request::Generate { id, prompt, params }
    };
    stream(&mut target, &request, args.output.quiet)
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
