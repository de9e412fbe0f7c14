//! The rendezvous of `m31rd` and its clients: where the daemon's socket lives when nobody says,
//! and which user is on either end of it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The socket file's name inside its directory.
pub const SOCKET_FILE: &str = "m31rd.sock";

/// The default socket, the one rule every side uses: `$XDG_RUNTIME_DIR/m31r/m31rd.sock`, else
/// `run/m31rd.sock` in the per-user cache directory, else `$TMPDIR/m31r-<uid>/m31rd.sock`.
pub fn default_socket_path() -> PathBuf {
    let dirs = directories::ProjectDirs::from("", "", "m31r");
    socket_path_from(
        std::env::var_os("XDG_RUNTIME_DIR"),
        dirs.as_ref().map(|d| d.cache_dir()),
        &std::env::temp_dir(),
        current_uid(),
    )
}

/// [`default_socket_path`]'s rule on given values: `xdg_runtime_dir` is `$XDG_RUNTIME_DIR`,
/// `cache_dir` the per-user cache directory (none without a home directory), `temp_dir` and `uid`
/// the last resort's parts.
pub fn socket_path_from(
    xdg_runtime_dir: Option<OsString>,
    cache_dir: Option<&Path>,
    temp_dir: &Path,
    uid: u32,
) -> PathBuf {
    let dir = xdg_runtime_dir
        .map(|d| PathBuf::from(d).join("m31r"))
        .or_else(|| cache_dir.map(|d| d.join("run")))
        .unwrap_or_else(|| temp_dir.join(format!("m31r-{uid}")));
    dir.join(SOCKET_FILE)
}

/// The real user id of this process.
pub fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// The user id of the process on the other end of `stream` (`SO_PEERCRED`), which the daemon
/// compares with [`current_uid`] to refuse other users.
pub fn peer_uid(stream: &tokio::net::UnixStream) -> std::io::Result<u32> {
    stream.peer_cred().map(|cred| cred.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdg_runtime_dir_wins_over_every_fallback() {
        let path = socket_path_from(
            Some("/run/user/7".into()),
            Some(Path::new("/home/u/.cache/m31r")),
            Path::new("/tmp"),
            7,
        );
        assert_eq!(path, Path::new("/run/user/7/m31r/m31rd.sock"));
    }

    #[test]
    fn without_xdg_runtime_dir_the_cache_dir_then_the_temp_dir_per_uid() {
        let cache = Some(Path::new("/home/u/.cache/m31r"));
        let path = socket_path_from(None, cache, Path::new("/tmp"), 7);
        assert_eq!(path, Path::new("/home/u/.cache/m31r/run/m31rd.sock"));
        let path = socket_path_from(None, None, Path::new("/tmp"), 1000);
        assert_eq!(path, Path::new("/tmp/m31r-1000/m31rd.sock"));
    }

    #[tokio::test]
    async fn both_ends_of_a_socket_pair_are_this_user() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        assert_eq!(peer_uid(&a).unwrap(), current_uid());
    }
}
