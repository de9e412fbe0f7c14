//! The HTTP API's error answer, in OpenAI's shape on every endpoint
//! (`{"error":{"message":…,"type":…,"param":…,"code":…}}`), and whole JSON answers.

use axum::body::Body;
use axum::http::header::{self, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use m31r_protocol::ErrorCode;
use serde::Serialize;

/// Paths this API serves, and the method each takes (for the `405` message).
const ROUTES: &[(&str, Method)] = &[
    ("/generate", Method::POST),
    ("/completion", Method::POST),
    ("/fim", Method::POST),
    ("/v1/completions", Method::POST),
    ("/v1/chat/completions", Method::POST),
    ("/v1/models", Method::GET),
];

/// An error answered in OpenAI's shape.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
    /// The request field at fault, when one is.
    pub(super) param: Option<&'static str>,
    /// Close the connection after answering (the body was not read).
    close: bool,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: &'static str,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: String) -> Self {
        Self { status, code, message, param: None, close: false }
    }

    pub(super) fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message.into())
    }

    pub(super) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message.into())
    }

    pub(super) fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// A refusal or failure from the admission checks or the engine, with its protocol code.
    pub(super) fn engine(code: ErrorCode, message: String) -> Self {
        let (status, name) = match code {
            ErrorCode::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorCode::FrameTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "frame_too_large"),
            ErrorCode::InvalidUtf8 => (StatusCode::BAD_REQUEST, "invalid_utf8"),
            ErrorCode::VersionMismatch => (StatusCode::BAD_REQUEST, "version_mismatch"),
            ErrorCode::InvalidParams => (StatusCode::BAD_REQUEST, "invalid_params"),
            ErrorCode::DuplicateId => (StatusCode::BAD_REQUEST, "duplicate_id"),
            ErrorCode::ContextOverflow => (StatusCode::BAD_REQUEST, "context_overflow"),
            ErrorCode::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ErrorCode::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            ErrorCode::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self::new(status, name, message)
    }

    /// The engine stopped before a run finished.
    pub(super) fn engine_stopped() -> Self {
        Self::engine(ErrorCode::ShuttingDown, "the engine stopped".into())
    }

    /// OpenAI's error `type` for this status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::INTERNAL_SERVER_ERROR => "server_error",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            _ => "invalid_request_error",
        }
    }

    /// The error object as JSON text (also a stream's last `data:` payload).
    pub(super) fn json(&self) -> String {
        let body = ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind(),
                param: self.param,
                code: self.code,
            },
        };
        serde_json::to_string(&body).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json_bytes(self.status, self.json().into_bytes());
        if self.close {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// A JSON answer.
pub(super) fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => json_bytes(status, bytes),
        Err(e) => ApiError::internal(format!("cannot serialise the response: {e}")).into_response(),
    }
}

fn json_bytes(status: StatusCode, bytes: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The answer to a request no route serves: `405` naming the method to use on a served path,
/// `404` anywhere else.
pub(super) fn unrouted(method: &Method, path: &str) -> ApiError {
    match ROUTES.iter().find(|(route, _)| *route == path) {
        Some((_, allowed)) => ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} {path} is not served; use {allowed}"),
        ),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no endpoint {path}; see docs/http.md"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_keep_their_protocol_code() {
        let e = ApiError::engine(ErrorCode::ContextOverflow, "too long".into());
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let v: serde_json::Value = serde_json::from_str(&e.json()).unwrap();
        assert_eq!(v["error"]["code"], "context_overflow");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], "too long");
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn unrouted_requests_name_the_method_or_the_path() {
        let e = unrouted(&Method::GET, "/v1/completions");
        assert_eq!((e.status, e.code), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"));
        assert!(e.message.contains("use POST"), "{}", e.message);
        let e = unrouted(&Method::POST, "/v1/models/x");
        assert_eq!((e.status, e.code), (StatusCode::NOT_FOUND, "not_found"));
    }
}
