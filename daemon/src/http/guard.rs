//! The Host/Origin guard, run before any route: DNS-rebinding and cross-site protection, CORS
//! headers for configured origins only, preflight answers, and the per-request log line.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Api;
use super::conn::{ConnActivity, Tracked};
use super::errors::{ApiError, unrouted};

/// Middleware around every route: refuses foreign `Host`s and `Origin`s, answers preflights,
/// and adds CORS headers for an allowed origin.
pub(super) async fn guard(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let busy = request.extensions().get::<ConnectInfo<ConnActivity>>().map(|c| c.0.0.begin());
    let response = checked(&api, request, next).await;
    match busy {
        Some(busy) => response.map(|body| Body::new(Tracked::new(body, busy))),
        None => response,
    }
}

async fn checked(api: &Api, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let origin = match api.check_origin_and_host(&request) {
        Ok(origin) => origin,
        Err(e) => {
            tracing::warn!(%method, %path, status = e.status.as_u16(), message = %e.message, "HTTP request refused");
            return e.into_response();
        }
    };
    let mut response = if method == Method::OPTIONS {
        preflight(&request)
    } else if method == Method::HEAD {
        // axum would answer HEAD from a GET route; this API serves no HEAD.
        unrouted(&method, &path).into_response()
    } else {
        next.run(request).await
    };
    if let Some(origin) = origin {
        // Only origins the user listed get CORS headers; everything else gets none.
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    tracing::debug!(
        %method,
        %path,
        status = response.status().as_u16(),
        ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
        "HTTP request"
    );
    response
}

impl Api {
    /// DNS-rebinding and cross-site protection. A page on `evil.example` that makes its name
    /// resolve to 127.0.0.1 still sends `Host: evil.example`, so only loopback names, the bound
    /// address and configured names are served. Browsers send `Origin` with every cross-origin
    /// POST; any request carrying one not configured is refused. Returns the allowed origin, for
    /// CORS headers.
    fn check_origin_and_host(&self, request: &Request) -> Result<Option<HeaderValue>, ApiError> {
        let refused = |what: &str, value: &str, key: &str| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                if what == "Origin" { "origin_not_allowed" } else { "host_not_allowed" },
                format!(
                    "{what} {value:?} is not allowed: this API answers to localhost only \
                     (add it to http.{key} to allow it)"
                ),
            )
        };
        let mut hosts = Vec::new();
        if let Some(authority) = request.uri().authority() {
            hosts.push(authority.as_str().to_owned());
        }
        // RFC 9110 §7.2: a request with more than one Host field is malformed (and the two can
        // disagree about who is being asked, e.g. `localhost` and then a rebinding name).
        if request.headers().get_all(header::HOST).iter().nth(1).is_some() {
            return Err(ApiError::bad_request("more than one Host header"));
        }
        match request.headers().get(header::HOST).map(|h| h.to_str()) {
            Some(Ok(host)) => hosts.push(host.to_owned()),
            Some(Err(_)) => return Err(refused("Host", "<not text>", "allowed_hosts")),
            None if hosts.is_empty() => {
                return Err(ApiError::bad_request("the Host header is required"));
            }
            None => {}
        }
        for host in &hosts {
            if !self.host_allowed(host) {
                return Err(refused("Host", host, "allowed_hosts"));
            }
        }
        let Some(origin) = request.headers().get(header::ORIGIN) else {
            return Ok(None);
        };
        let text = origin.to_str().unwrap_or("<not text>");
        if self.config.allowed_origins.iter().any(|o| o.eq_ignore_ascii_case(text)) {
            Ok(Some(origin.clone()))
        } else {
            Err(refused("Origin", text, "allowed_origins"))
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let name = strip_port(host).to_ascii_lowercase();
        let bound = match self.addr {
            std::net::SocketAddr::V4(a) => a.ip().to_string(),
            std::net::SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        ["localhost", "127.0.0.1", "[::1]"].contains(&name.as_str())
            || name == bound
            || self.config.allowed_hosts.iter().any(|h| strip_port(h).eq_ignore_ascii_case(&name))
    }
}

/// Answers a CORS preflight. It only gets here when its `Origin` is allowed (or it has none).
fn preflight(request: &Request) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(header::ALLOW, HeaderValue::from_static("GET, POST, OPTIONS"));
    if request.headers().contains_key(header::ORIGIN) {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        let asked = request.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            asked.unwrap_or(HeaderValue::from_static("authorization, content-type")),
        );
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    }
    response
}

/// `host` without its `:port` (IPv6 literals keep their brackets).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("localhost:8731"), "localhost");
        assert_eq!(strip_port("localhost"), "localhost");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("127.0.0.1:1"), "127.0.0.1");
    }
}
