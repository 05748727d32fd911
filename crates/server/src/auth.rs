//! Bearer keys: one set for generation, another for adapter management. Keys are compared in
//! constant time, so response timing tells nothing about a key's prefix.
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::{ApiError, ErrorKind};
use crate::AppState;

fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Whether `given` is one of `keys` (each compared in constant time, none skipped).
pub fn matches(given: &str, keys: &[String]) -> bool {
    keys.iter().fold(false, |found, k| {
        found | bool::from(given.as_bytes().ct_eq(k.as_bytes()))
    })
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let kind = if status == StatusCode::UNAUTHORIZED {
        ErrorKind::Unauthorized
    } else {
        ErrorKind::Forbidden
    };
    let mut r = ApiError::new(kind, message).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

/// Generation routes: open when no api keys are configured; admin keys are accepted too.
pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let auth = &state.config.auth;
    if auth.api_keys.is_empty() {
        return next.run(req).await;
    }
    match bearer(&req) {
        Some(k) if matches(k, &auth.api_keys) || matches(k, &auth.admin_keys) => {
            next.run(req).await
        }
        Some(_) => refuse(StatusCode::UNAUTHORIZED, "unknown API key"),
        None => refuse(
            StatusCode::UNAUTHORIZED,
            "this route needs an API key: Authorization: Bearer <key>",
        ),
    }
}

/// Adapter management: needs an admin key; with none configured it is open only while the
/// service has no API keys either (a local, unauthenticated setup).
pub async fn require_admin_key(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let auth = &state.config.auth;
    if auth.admin_keys.is_empty() {
        if auth.api_keys.is_empty() {
            return next.run(req).await;
        }
        return refuse(
            StatusCode::FORBIDDEN,
            "adapter management is off: no admin key is configured",
        );
    }
    match bearer(&req) {
        Some(k) if matches(k, &auth.admin_keys) => next.run(req).await,
        Some(k) if matches(k, &auth.api_keys) => {
            refuse(StatusCode::FORBIDDEN, "this route needs an admin key")
        }
        Some(_) => refuse(StatusCode::UNAUTHORIZED, "unknown key"),
        None => refuse(
            StatusCode::UNAUTHORIZED,
            "this route needs an admin key: Authorization: Bearer <key>",
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_match_exactly() {
        let keys = vec!["secret-one".to_string(), "secret-two".to_string()];
        assert!(super::matches("secret-two", &keys));
        for bad in ["secret-thre", "secret-one ", "", "SECRET-ONE"] {
            assert!(!super::matches(bad, &keys), "{bad}");
        }
    }
}
