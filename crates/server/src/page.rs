//! The web page at `/`: plain HTML, CSS and JavaScript from `crates/server/ui/`, embedded at
//! compile time (no build chain, nothing read from disk at run time). The page calls the same
//! public API as any client (same origin, so no CORS needed); an API key typed into it stays in
//! the browser's local storage. The Content-Security-Policy allows only the page's own files
//! and images held in data/blob URLs, so a prompt or an error text can never run as script.
use axum::http::header;
use axum::response::IntoResponse;

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const STYLE_CSS: &str = include_str!("../ui/style.css");

const CSP: &str = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; \
                   script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
                   frame-ancestors 'none'; form-action 'self'";

/// `no-cache`: the browser revalidates, so a new binary's page is used at once.
fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// The web page: try models, ControlNets and preprocessors from a browser.
#[utoipa::path(get, path = "/", tag = "page",
    responses((status = 200, description = "The page (HTML)", content_type = "text/html", body = String)))]
pub async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        asset("text/html; charset=utf-8", INDEX_HTML),
    )
}

/// The page's script.
#[utoipa::path(get, path = "/ui/app.js", tag = "page",
    responses((status = 200, description = "JavaScript", content_type = "text/javascript", body = String)))]
pub async fn app_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// The page's style sheet.
#[utoipa::path(get, path = "/ui/style.css", tag = "page",
    responses((status = 200, description = "CSS", content_type = "text/css", body = String)))]
pub async fn style_css() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE_CSS)
}
