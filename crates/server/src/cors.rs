//! CORS for browser apps on other origins (`[server] cors_origins`). Empty list: no layer, so
//! browsers keep the same-origin rule (the page at `/` is same-origin and needs none). The layer
//! sits outside every other one, so refusals (401, 413, 429, …) carry the headers too and a
//! browser app can read their JSON; preflights are answered before auth, as they carry no key.
use axum::http::{header, HeaderName, HeaderValue, Method};
use std::time::Duration;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::ServerConfig;

/// Response headers a cross-origin page may read beyond the CORS-safelisted ones.
pub const EXPOSED: [&str; 3] = ["x-request-id", "x-seed", "retry-after"];

/// How long a browser may cache a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// Checks one configured origin: `scheme://host[:port]`, nothing after it.
pub fn parse_origin(origin: &str) -> Result<HeaderValue, String> {
    let bad = || format!("`{origin}` is not an origin like https://app.example.com[:port]");
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(bad)?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) || origin.ends_with(':') {
        return Err(bad());
    }
    HeaderValue::from_str(origin).map_err(|_| bad())
}

/// The layer for `config`, or `None` when no origin is configured.
pub fn layer(config: &ServerConfig) -> Option<CorsLayer> {
    if config.cors_origins.is_empty() {
        return None;
    }
    let origins = if config.cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            config
                .cors_origins
                .iter()
                .map(|o| parse_origin(o).expect("checked when the config loaded")),
        )
    };
    let layer = CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::CACHE_CONTROL,
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("last-event-id"),
        ])
        .expose_headers(EXPOSED.map(HeaderName::from_static))
        .max_age(PREFLIGHT_MAX_AGE);
    Some(if config.cors_allow_credentials {
        layer.allow_credentials(true)
    } else {
        layer
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked() {
        for good in ["https://a.example.com", "http://127.0.0.1:5173", "http://x"] {
            assert!(parse_origin(good).is_ok(), "{good}");
        }
        for bad in [
            "a.example.com",
            "https://",
            "https://a.example.com/",
            "https://a.example.com/app",
            "ftp://a.example.com",
            "https://a.example.com:",
            "https://a b",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
    }
}
