//! Keeps `docs/protocol.md` true: every JSON example in it must be what serde reads (and, for
//! plain `json` blocks, byte for byte what it writes), and every message type, stop reason and
//! error code must appear in it.

use m31r_protocol::{ErrorCode, Event, Request, StopReason};

const DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"));

/// Lines of fenced blocks whose info string is exactly `info`.
fn block_lines(info: &str) -> Vec<&'static str> {
    let mut lines = Vec::new();
    let mut inside: Option<&str> = None;
    for line in DOC.lines() {
        match (inside, line.strip_prefix("```")) {
            (None, Some(tag)) => inside = Some(tag.trim()),
            (Some(_), Some(_)) => inside = None,
            (Some(tag), None) if tag == info && !line.trim().is_empty() => lines.push(line),
            _ => {}
        }
    }
    lines
}

enum Message {
    Request(Request),
    Event(Event),
}

fn parse(line: &str) -> Option<Message> {
    serde_json::from_str(line)
        .map(Message::Request)
        .or_else(|_| serde_json::from_str(line).map(Message::Event))
        .ok()
}

fn wire<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap().trim_matches('"').to_owned()
}

#[test]
fn canonical_examples_are_exactly_what_serde_writes() {
    let lines = block_lines("json");
    assert!(lines.len() >= 15, "only {} canonical examples found", lines.len());
    let mut types = Vec::new();
    for line in lines {
        let written = match parse(line) {
            Some(Message::Request(r)) => serde_json::to_string(&r).unwrap(),
            Some(Message::Event(e)) => serde_json::to_string(&e).unwrap(),
            None => panic!("not a request or event: {line}"),
        };
        assert_eq!(written, line, "serde writes this example differently");
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        types.push(value["type"].as_str().unwrap().to_owned());
    }
    for ty in [
        "hello",
        "generate",
        "complete",
        "fim",
        "warm",
        "cancel",
        "status",
        "shutdown",
        "token",
        "done",
        "error",
        "shutting_down",
    ] {
        assert!(types.iter().any(|t| t == ty), "no canonical example of {ty}");
    }
}

#[test]
fn accepted_examples_parse_and_rejected_ones_do_not() {
    let accepted = block_lines("json accepted");
    assert!(accepted.len() >= 3);
    for line in accepted {
        assert!(serde_json::from_str::<Request>(line).is_ok(), "should parse: {line}");
    }
    let rejected = block_lines("json rejected");
    assert!(rejected.len() >= 3);
    for line in rejected {
        assert!(parse(line).is_none(), "should be refused: {line}");
    }
}

#[test]
fn every_stop_reason_and_error_code_is_documented() {
    use ErrorCode as E;
    use StopReason as S;
    let codes = [
        E::BadRequest,
        E::FrameTooLarge,
        E::InvalidUtf8,
        E::VersionMismatch,
        E::InvalidParams,
        E::DuplicateId,
        E::ContextOverflow,
        E::Overloaded,
        E::ShuttingDown,
        E::Internal,
    ];
    // Exhaustive, so a new variant fails to compile here until it is documented.
    for code in codes {
        match code {
            E::BadRequest
            | E::FrameTooLarge
            | E::InvalidUtf8
            | E::VersionMismatch
            | E::InvalidParams
            | E::DuplicateId
            | E::ContextOverflow
            | E::Overloaded
            | E::ShuttingDown
            | E::Internal => {}
        }
        assert!(DOC.contains(&format!("| `{}` |", wire(&code))), "{code:?} undocumented");
    }
    let stops = [
        S::EndOfText,
        S::MaxTokens,
        S::Deadline,
        S::StopString,
        S::Dedent,
        S::ClosingBrace,
        S::BlankLine,
        S::ContextFull,
        S::Cancelled,
        S::Warmed,
    ];
    for stop in stops {
        match stop {
            S::EndOfText
            | S::MaxTokens
            | S::Deadline
            | S::StopString
            | S::Dedent
            | S::ClosingBrace
            | S::BlankLine
            | S::ContextFull
            | S::Cancelled
            | S::Warmed => {}
        }
        assert!(DOC.contains(&format!("| `{}` |", wire(&stop))), "{stop:?} undocumented");
    }
    assert!(DOC.contains(&format!("version {}", m31r_protocol::PROTOCOL_VERSION)));
    assert!(DOC.contains(&format!("{} bytes", group(m31r_protocol::MAX_FRAME_BYTES))));
}

/// 4194304 → "4 194 304", as the document writes large numbers.
fn group(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}
