//! `m31r-protocol`: the wire contract between `m31rd` and its clients (the language server, the
//! `m31r` CLI, local tools). It depends on no model code, so clients never pull candle in.
//!
//! One JSON object per line (NDJSON), UTF-8, at most [`MAX_FRAME_BYTES`] per frame, checked before
//! parsing. A client opens with [`Request::Hello`]; every completion-like request then streams
//! [`Event::Token`]s and ends with exactly one [`Event::Done`] or [`Event::Error`] carrying its id.
//! The full description with examples is `docs/protocol.md`.

pub mod client;
pub mod frame;
pub mod socket;
pub mod types;

pub use client::{Client, ClientError, ClientReader, ClientWriter};
pub use frame::{FrameError, FrameReader, write_frame};
pub use types::*;

/// Protocol version exchanged in the `hello` handshake; bumped on any incompatible change.
///
/// History: 1, the first; 2, `done` carries the per-line confidence [`LineConfidence`].
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest frame (one JSON object, without its newline) either side accepts. Checked while reading,
/// before any parsing, so a hostile or broken peer cannot make the other side allocate without bound.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
