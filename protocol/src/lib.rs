//! `m31r-protocol`: the wire contract between `m31rd` and its clients (the language server, the
//! `m31r` CLI, local tools). It depends on no model code, so clients never pull candle in.
//!
//! Only the version handshake constants exist so far; the message types, NDJSON framing and the
//! async client arrive with the daemon (DESIGN §5).

/// Protocol version exchanged in the `hello` handshake; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest NDJSON frame (one JSON object plus its newline) either side accepts, checked before any
/// parsing so a hostile or broken peer cannot make the other side allocate without bound.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
