//! `m31r complete`: fill in the middle at `FILE:LINE:COL`, with other files as context.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use m31r_protocol::{ContextFile, FimInput, Request};

use crate::connection::{Connection, open};
use crate::position::Position;
use crate::stream::{OutputArgs, ParamArgs, stream};

/// `m31r complete`'s arguments.
#[derive(Debug, Args)]
pub struct CompleteArgs {
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

/// Splits the file at the cursor, reads the context files and streams the completion to stdout.
pub fn run(conn: &Connection, args: &CompleteArgs) -> anyhow::Result<()> {
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
    let mut target = open(conn, args.output.quiet)?;
    let request = Request::Fim {
        id: "1".into(),
        input: FimInput { prefix, suffix, context_files },
        params: args.params.params(),
    };
    stream(&mut target, &request, args.output.quiet)
}
