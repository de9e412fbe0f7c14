//! Where a command's requests go: `m31rd` over its socket, found as the daemon itself finds it, or
//! with `--bundle` an engine loaded in this process.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use crate::target::Target;

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
    /// Device of the in-process engine: cpu, cuda or cuda:N (a binary built with the `cuda`
    /// feature, see docs/gpu.md).
    #[arg(long, global = true, value_name = "DEVICE", default_value = "cpu")]
    pub device: m31r_model::DeviceSpec,
    /// Recall of the in-process engine: `off`, or ORDER,WEIGHT,HALF (docs/eval.md, "Recall")
    /// [default: the daemon's, 16,0.9,4].
    #[arg(long, global = true, value_name = "SPEC")]
    pub recall: Option<m31r_model::recall::RecallParams>,
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
pub fn open(conn: &Connection, quiet: bool) -> anyhow::Result<Target> {
    let Some(bundle) = &conn.bundle else {
        return Target::connect(&socket_path(conn));
    };
    let target = Target::load(bundle, conn.device, conn.recall.unwrap_or_default())?;
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
