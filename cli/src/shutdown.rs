//! `m31r shutdown`: ask the daemon to cancel in-flight work and exit.

use anyhow::bail;
use m31r_protocol::{Event, Request};

use crate::connection::{Connection, open};
use crate::stream::wire;

/// Sends `shutdown` to the daemon; refused with `--bundle`, where there is no daemon to stop.
pub fn run(conn: &Connection) -> anyhow::Result<()> {
    if conn.bundle.is_some() {
        bail!(
            "shutdown stops a daemon; with --bundle the engine runs inside this command \
             and stops with it"
        );
    }
    let mut target = open(conn, true)?;
    let event = target.run(&Request::Shutdown { id: "shutdown".into() }, &mut |_| {})?;
    match event {
        Event::ShuttingDown { .. } => {
            eprintln!("{} is shutting down", target.describe());
            Ok(())
        }
        other => bail!("{} answered shutdown with {}", target.describe(), wire(&other)),
    }
}
