//! CORS (`[server] cors_origins`) and the web page at `/`, against the real binary. The page's
//! behaviour in a browser is tested by `tools/browser-test/` (headless Chromium, in .ci/run).
mod common;
use common::Server;
use reqwest::{Client, Method, Response};
use serde_json::{json, Value};

const ALLOWED: &str = "http://app.example:5173";
const REFUSED: &str = "http://evil.example";
const KEY: &str = "generation-key-1";

fn header(r: &Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_ascii_lowercase())
}

/// A GET as a page on `origin` sends it, with the API key when given.
async fn get_from(c: &Client, url: &str, origin: &str, key: Option<&str>) -> Response {
    let request = c.get(url).header("origin", origin);
    match key {
        Some(key) => request.bearer_auth(key),
        None => request,
    }
    .send()
    .await
    .unwrap()
}

/// A GET's JSON body.
async fn get_json(c: &Client, url: &str) -> Value {
    c.get(url).send().await.unwrap().json().await.unwrap()
}

/// A browser's preflight for a keyed JSON POST.
async fn preflight(c: &Client, url: &str, origin: &str) -> Response {
    c.request(Method::OPTIONS, url)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn cors_allows_the_configured_origins_only() {
    let server = Server::start(&["--cors-origin", ALLOWED, "--api-key", KEY], &[]);
    let c = Client::new();
    let stream_url = server.url("/v1/generate/stream");

    // Preflight from an allowed origin: answered (no key needed), with what the page may send.
    let r = preflight(&c, &stream_url, ALLOWED).await;
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some(ALLOWED)
    );
    let methods = header(&r, "access-control-allow-methods").unwrap();
    for m in ["get", "post", "put", "delete"] {
        assert!(methods.contains(m), "{methods}");
    }
    let headers = header(&r, "access-control-allow-headers").unwrap();
    for h in ["authorization", "content-type"] {
        assert!(headers.contains(h), "{headers}");
    }
    assert_eq!(header(&r, "access-control-max-age").as_deref(), Some("600"));
    assert_eq!(header(&r, "access-control-allow-credentials"), None);

    // Preflight from another origin: no allow header, so the browser refuses the call.
    let r = preflight(&c, &stream_url, REFUSED).await;
    assert_eq!(header(&r, "access-control-allow-origin"), None);

    // Actual requests: the allowed origin gets the headers and may read ours.
    let r = get_from(&c, &server.url("/v1/models"), ALLOWED, Some(KEY)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some(ALLOWED)
    );
    let exposed = header(&r, "access-control-expose-headers").unwrap();
    for h in ["x-request-id", "x-seed", "retry-after"] {
        assert!(exposed.contains(h), "{exposed}");
    }
    assert!(header(&r, "vary").unwrap().contains("origin"));
    let r = get_from(&c, &server.url("/v1/models"), REFUSED, Some(KEY)).await;
    // (tower-http still lists the exposed headers; without an allow-origin they mean nothing.)
    assert_eq!(header(&r, "access-control-allow-origin"), None);

    // A refusal carries the headers too, so the page can show the JSON error.
    let r = get_from(&c, &server.url("/v1/models"), ALLOWED, None).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some(ALLOWED)
    );

    // Server-sent events cross-origin: the stream carries the headers and runs to `done`.
    let r = c
        .post(&stream_url)
        .header("origin", ALLOWED)
        .bearer_auth(KEY)
        .json(&json!({"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some(ALLOWED)
    );
    assert!(header(&r, "content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let body = r.text().await.unwrap();
    assert!(
        body.contains("event: step") && body.contains("event: done"),
        "{body}"
    );
}

#[tokio::test]
async fn cors_any_origin_and_off_by_default() {
    let any = Server::start(&["--cors-origin", "*"], &[]);
    let off = Server::start(&[], &[]);
    let c = Client::new();

    let r = preflight(&c, &any.url("/v1/generate"), REFUSED).await;
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("*")
    );
    let r = get_from(&c, &any.url("/v1/limits"), REFUSED, None).await;
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("*")
    );

    // No origins configured: no CORS headers at all, and no preflight answer.
    let r = preflight(&c, &off.url("/v1/generate"), ALLOWED).await;
    assert!(!r.status().is_success(), "{}", r.status());
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    let r = get_from(&c, &off.url("/v1/models"), ALLOWED, None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    let limits: Value = get_json(&c, &off.url("/v1/limits")).await;
    assert_eq!(limits["api_key_required"], false);
}

#[tokio::test]
async fn the_page_and_the_limits_are_served() {
    let server = Server::start(&["--api-key", KEY], &[]);
    let c = Client::new();
    // The page needs no key: it holds none (the user types one, kept in the browser).
    let r = c.get(server.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    let csp = header(&r, "content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let html = r.text().await.unwrap();
    for asset in ["/ui/app.js", "/ui/style.css"] {
        assert!(html.contains(asset), "the page links {asset}");
        let r = c.get(server.url(asset)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{asset}");
        assert!(r.text().await.unwrap().len() > 100, "{asset} has content");
    }
    assert_eq!(
        c.get(server.url("/ui/nothing.js"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // The limits the page sizes its form with: those of config/default.toml.
    // Needs no key (it says whether generation does).
    let limits: Value = get_json(&c, &server.url("/v1/limits")).await;
    assert_eq!(limits["max_controls"], 4);
    assert_eq!(limits["max_steps"], 150);
    assert_eq!(limits["default_side"], 512);
    assert_eq!(limits["max_side"], 8192);
    assert_eq!(limits["min_side"], 64);
    assert_eq!(limits["default_scheduler"], "unipc");
    assert_eq!(limits["api_key_required"], true);
    assert_eq!(
        limits["schedulers"],
        json!([
            "ddim",
            "euler",
            "euler-a",
            "dpmpp-2m",
            "dpmpp-2m-karras",
            "unipc"
        ])
    );
}
