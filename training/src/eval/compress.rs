//! The general-purpose compressors `eval` compares the model with: `xz -9` and `zstd -19`, run as
//! the system's command-line tools on the exact bytes the model is scored on. Their bits per byte
//! is the bar any language model of code must beat. A missing tool is reported, never guessed.

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

/// A compressor's result on the test bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressorResult {
    /// The command line run (input on stdin, output on stdout).
    pub command: String,
    /// Size of its output, container headers included.
    pub compressed_bytes: Option<u64>,
    /// `8 · compressed_bytes / input bytes`; null when the tool could not run.
    pub bits_per_byte: Option<f64>,
    /// Why there is no result (tool not installed, failed); null on success.
    pub error: Option<String>,
}

/// `xz -9`, single-threaded (`-T1`): newer xz versions default to a multi-threaded mode that
/// splits the input into blocks and compresses worse.
pub fn xz(bytes: &[u8]) -> CompressorResult {
    run("xz", &["-9", "-T1", "-c", "-q"], bytes)
}

/// `zstd -19`.
pub fn zstd(bytes: &[u8]) -> CompressorResult {
    run("zstd", &["-19", "-c", "-q"], bytes)
}

fn run(program: &str, args: &[&str], bytes: &[u8]) -> CompressorResult {
    let command = format!("{program} {}", args.join(" "));
    match compressed_len(program, args, bytes) {
        Ok(len) => CompressorResult {
            command,
            compressed_bytes: Some(len),
            bits_per_byte: (!bytes.is_empty()).then(|| 8.0 * len as f64 / bytes.len() as f64),
            error: None,
        },
        Err(error) => CompressorResult {
            command,
            compressed_bytes: None,
            bits_per_byte: None,
            error: Some(error),
        },
    }
}

/// Runs the tool with `bytes` on stdin and counts its stdout. Stdin is fed from a thread so a
/// tool that writes before it has read everything cannot deadlock us.
fn compressed_len(program: &str, args: &[&str], bytes: &[u8]) -> Result<u64, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                format!("`{program}` is not installed (install the {program} package)")
            }
            _ => format!("cannot run `{program}`: {e}"),
        })?;
    let mut stdin = child.stdin.take().ok_or("no stdin pipe")?;
    let input = bytes.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .ok_or("no stdout pipe")?
        .read_to_end(&mut out)
        .map_err(|e| format!("reading `{program}`'s output: {e}"))?;
    let fed = feeder.join().map_err(|_| format!("feeding `{program}` panicked"))?;
    let output = child.wait_with_output().map_err(|e| format!("waiting for `{program}`: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`{program}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    fed.map_err(|e| format!("writing to `{program}`: {e}"))?;
    Ok(out.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_is_reported_not_guessed() {
        let r = run("m31r-no-such-compressor", &["-9"], b"abc");
        assert_eq!(r.bits_per_byte, None);
        assert!(r.error.unwrap().contains("not installed"));
    }
}
