//! NDJSON framing: reading newline-terminated frames with a size limit enforced before parsing,
//! and writing one serialised value per line.

use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read. Except for `Io`, the stream stays usable: the next call reads
/// the next frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The frame exceeded the limit; it was skipped up to its newline.
    #[error("frame of more than {limit} bytes (limit {limit})")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The frame is not UTF-8.
    #[error("frame is not valid UTF-8 (byte {valid_up_to} starts an invalid sequence)")]
    InvalidUtf8 {
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// The connection failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads frames from a buffered byte stream, never holding more than `limit` bytes of one frame.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    limit: usize,
    buf: Vec<u8>,
}

impl<R: AsyncBufRead + Unpin> FrameReader<R> {
    /// A reader refusing frames longer than `limit` bytes.
    pub fn new(inner: R, limit: usize) -> Self {
        Self { inner, limit, buf: Vec::new() }
    }

    /// The next frame without its newline; `Ok(None)` at end of stream. Blank lines are skipped.
    /// A final frame without a newline is still returned.
    pub async fn next_frame(&mut self) -> Result<Option<String>, FrameError> {
        loop {
            self.buf.clear();
            let mut oversized = false;
            loop {
                let available = self.inner.fill_buf().await?;
                if available.is_empty() {
                    if oversized {
                        return Err(FrameError::TooLarge { limit: self.limit });
                    }
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    break;
                }
                let (chunk, newline) = match available.iter().position(|&b| b == b'\n') {
                    Some(i) => (&available[..i], Some(i)),
                    None => (available, None),
                };
                if !oversized && self.buf.len() + chunk.len() <= self.limit {
                    self.buf.extend_from_slice(chunk);
                } else {
                    // Keep draining to the newline without storing, so memory stays bounded.
                    oversized = true;
                    self.buf.clear();
                }
                let consumed = newline.map_or(chunk.len(), |i| i + 1);
                self.inner.consume(consumed);
                if newline.is_some() {
                    break;
                }
            }
            if oversized {
                return Err(FrameError::TooLarge { limit: self.limit });
            }
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let bytes = std::mem::take(&mut self.buf);
            return match String::from_utf8(bytes) {
                Ok(text) => Ok(Some(text)),
                Err(e) => {
                    Err(FrameError::InvalidUtf8 { valid_up_to: e.utf8_error().valid_up_to() })
                }
            };
        }
    }
}

/// Writes `value` as one JSON line and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    value: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use tokio::io::BufReader;

    use super::*;

    async fn frames(input: &[u8], limit: usize) -> Vec<Result<String, String>> {
        // A tiny buffer makes frames straddle reads.
        let mut reader = FrameReader::new(BufReader::with_capacity(3, input), limit);
        let mut out = Vec::new();
        loop {
            match reader.next_frame().await {
                Ok(Some(f)) => out.push(Ok(f)),
                Ok(None) => return out,
                Err(e) => out.push(Err(e.to_string())),
            }
        }
    }

    #[tokio::test]
    async fn splits_lines_and_enforces_the_limit() {
        let input = b"{\"a\":1}\n\n0123456789abcdef\n{\"b\":2}\n\xff\xfe\n{\"c\":3}";
        let got = frames(input, 10).await;
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(got[0], Ok("{\"a\":1}".into()));
        assert!(got[1].as_ref().unwrap_err().contains("limit 10"));
        assert_eq!(got[2], Ok("{\"b\":2}".into()));
        assert!(got[3].as_ref().unwrap_err().contains("UTF-8"));
        assert_eq!(got[4], Ok("{\"c\":3}".into()));
    }

    #[tokio::test]
    async fn oversized_final_frame_is_reported() {
        let got = frames(b"0123456789abcdef", 4).await;
        assert_eq!(got.len(), 1);
        assert!(got[0].is_err());
    }
}
