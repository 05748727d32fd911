//! The OpenAPI document: the committed file is what the code generates, the server serves it,
//! it lists exactly the routes the server answers, and real answers fit its schemas.
mod common;
use common::{png_b64, Server};
use reqwest::{Client, Method};
use serde_json::{json, Value};
use std::collections::BTreeSet;

const REGENERATE: &str = "regenerate with `cargo run -p server -- openapi > openapi.yaml`";

fn committed() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn document() -> Value {
    server::openapi::document()
}

const METHODS: [&str; 4] = ["get", "post", "put", "delete"];

/// (path, method) pairs of the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in METHODS {
            if item.get(m).is_some() {
                out.insert((path.clone(), m.to_string()));
            }
        }
    }
    out
}

/// (path, method) pairs registered in the server's source: every `.route("...", ...)` call and
/// the method routers in it.
fn registered() -> BTreeSet<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeSet::new();
    for f in sources(&dir) {
        let text = std::fs::read_to_string(f).unwrap();
        for piece in text.split(".route(").skip(1) {
            let Some(rest) = piece.trim_start().strip_prefix('"') else {
                continue;
            };
            let (path, rest) = rest.split_once('"').unwrap();
            // The call's arguments end at its closing parenthesis.
            let mut depth = 1;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(rest.len(), |(i, _)| i);
            let args = &rest[..end];
            for m in METHODS {
                let called = args
                    .match_indices(&format!("{m}("))
                    .any(|(i, _)| i == 0 || !args.as_bytes()[i - 1].is_ascii_alphanumeric());
                if called {
                    out.insert((path.to_string(), m.to_string()));
                }
            }
        }
    }
    out
}

/// The `.rs` files under `dir`, module folders included.
fn sources(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// A concrete path for a template (`x` for each parameter).
fn concrete(path: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => in_param = true,
            '}' => {
                in_param = false;
                out.push('x');
            }
            _ if !in_param => out.push(c),
            _ => {}
        }
    }
    out
}

/// A small validator for the JSON Schema subset utoipa emits (type, properties, required,
/// additionalProperties, items, enum, oneOf/anyOf/allOf, minimum, `$ref`s into the document).
fn validate(doc: &Value, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    if let Some(r) = schema["$ref"].as_str() {
        let target = doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {r}"));
        validate(doc, target, v, at, errors);
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().map(|x| x.as_str().unwrap()).collect(),
            _ => panic!("type {t}"),
        };
        let fits = types.iter().any(|t| match *t {
            "null" => v.is_null(),
            "boolean" => v.is_boolean(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "string" => v.is_string(),
            "array" => v.is_array(),
            "object" => v.is_object(),
            other => panic!("type {other}"),
        });
        if !fits {
            errors.push(format!("{at}: {v} is not {types:?}"));
            return;
        }
    }
    if let Some(e) = schema["enum"].as_array() {
        if !e.contains(v) {
            errors.push(format!("{at}: {v} not in {e:?}"));
        }
    }
    if let (Some(min), Some(n)) = (schema["minimum"].as_f64(), v.as_f64()) {
        if n < min {
            errors.push(format!("{at}: {n} < {min}"));
        }
    }
    for s in schema["allOf"].as_array().into_iter().flatten() {
        validate(doc, s, v, at, errors);
    }
    for (key, exactly_one) in [("oneOf", true), ("anyOf", false)] {
        if let Some(options) = schema[key].as_array() {
            let fitting = options
                .iter()
                .filter(|s| {
                    let mut e = Vec::new();
                    validate(doc, s, v, at, &mut e);
                    e.is_empty()
                })
                .count();
            if fitting == 0 || (exactly_one && fitting > 1) {
                errors.push(format!("{at}: {v} fits {fitting} of the {key} options"));
            }
        }
    }
    if let Some(o) = v.as_object() {
        let props = schema["properties"].as_object();
        for r in schema["required"].as_array().into_iter().flatten() {
            if !o.contains_key(r.as_str().unwrap()) {
                errors.push(format!("{at}: missing {r}"));
            }
        }
        for (k, x) in o {
            let at = format!("{at}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(doc, s, x, &at, errors),
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => errors.push(format!("{at}: not in the schema")),
                    Some(s @ Value::Object(_)) => validate(doc, s, x, &at, errors),
                    _ if props.is_some() => errors.push(format!("{at}: not in the schema")),
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(a)) = (schema.get("items"), v.as_array()) {
        for (i, x) in a.iter().enumerate() {
            validate(doc, items, x, &format!("{at}[{i}]"), errors);
        }
    }
}

/// The document's schema of `method path`'s `status` JSON answer.
fn response_schema<'a>(doc: &'a Value, path: &str, method: &str, status: u16) -> &'a Value {
    let s = &doc["paths"][path][method]["responses"][status.to_string()]["content"]
        ["application/json"]["schema"];
    assert!(!s.is_null(), "no JSON schema for {method} {path} {status}");
    s
}

async fn assert_fits(
    c: &Client,
    doc: &Value,
    server: &Server,
    method: &str,
    path: &str,
    body: Option<Value>,
) {
    let mut req = c.request(
        Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
        server.url(&concrete(path)),
    );
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    let mut errors = Vec::new();
    validate(
        doc,
        response_schema(doc, path, method, status),
        &v,
        "$",
        &mut errors,
    );
    assert!(
        errors.is_empty(),
        "{method} {path} {status}: {errors:#?}\n{v}"
    );
}

#[test]
fn the_committed_file_is_generated() {
    assert!(
        committed() == server::openapi::yaml(),
        "openapi.yaml differs from the code: {REGENERATE}"
    );
}

#[test]
fn the_code_and_the_document_list_the_same_routes() {
    let doc = documented(&document());
    let code = registered();
    assert!(code.len() >= 10, "found only {code:?} in the source");
    assert_eq!(
        code, doc,
        "routes in the code vs the document: {REGENERATE}"
    );
}

#[test]
fn the_validator_can_fail() {
    let doc = document();
    let schema = json!({"$ref": "#/components/schemas/ErrorBody"});
    let mut e = Vec::new();
    validate(
        &doc,
        &schema,
        &json!({"error": "x", "type": "invalid_request", "field": null}),
        "$",
        &mut e,
    );
    assert!(e.is_empty(), "{e:?}");
    for bad in [
        json!({"error": "x", "type": "invalid_request", "field": 3}),
        json!({"error": "x", "type": "no_such_kind", "field": null}),
        json!({"error": "x", "field": null}),
        json!(["x"]),
    ] {
        let mut e = Vec::new();
        validate(&doc, &schema, &bad, "$", &mut e);
        assert!(!e.is_empty(), "{bad} passed");
    }
}

#[tokio::test]
async fn the_server_answers_what_the_document_says() {
    let server = Server::start(&[], &[]);
    let c = Client::new();
    let doc = document();

    let served = c
        .get(server.url("/openapi.yaml"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        served == committed(),
        "GET /openapi.yaml differs from openapi.yaml: {REGENERATE}"
    );

    // Every documented path and method is routed; other methods on those paths are not.
    let listed = documented(&doc);
    let paths: BTreeSet<&String> = listed.iter().map(|(p, _)| p).collect();
    for path in paths {
        for m in METHODS {
            let r = c
                .request(
                    Method::from_bytes(m.to_uppercase().as_bytes()).unwrap(),
                    server.url(&concrete(path)),
                )
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            let unrouted = status == 405 || (status == 404 && body["error"] == "no such route");
            let is_listed = listed.contains(&(path.clone(), m.to_string()));
            assert_eq!(!unrouted, is_listed, "{m} {path}: {status} {body}");
            if is_listed && status != 200 && status != 204 {
                // Every answer given is documented.
                let documented = &doc["paths"][path.as_str()][m]["responses"][status.to_string()];
                assert!(
                    !documented.is_null(),
                    "{m} {path}: {status} is undocumented: {body}"
                );
            }
        }
    }

    // Real answers fit the schemas.
    let generate = json!({"prompt": "a", "width": 64, "height": 64, "steps": 1, "seed": 1,
        "controls": [{"adapter": "canny", "image": png_b64(64, 64), "preprocessor": "canny"}],
        "return_hints": true});
    assert_fits(&c, &doc, &server, "post", "/v1/generate", Some(generate)).await;
    assert_fits(
        &c,
        &doc,
        &server,
        "post",
        "/v1/generate",
        Some(json!({"prompt": "a", "steps": 0})),
    )
    .await;
    assert_fits(
        &c,
        &doc,
        &server,
        "post",
        "/v1/detect",
        Some(json!({"preprocessor": "canny", "image": png_b64(64, 64)})),
    )
    .await;
    assert_fits(&c, &doc, &server, "get", "/v1/models", None).await;
    assert_fits(&c, &doc, &server, "get", "/v1/adapters", None).await;
    assert_fits(&c, &doc, &server, "get", "/v1/preprocessors", None).await;
    assert_fits(&c, &doc, &server, "get", "/health", None).await;
    assert_fits(&c, &doc, &server, "get", "/ready", None).await;
    assert_fits(
        &c,
        &doc,
        &server,
        "put",
        "/v1/adapters/{name}",
        Some(json!({"path": "embedded:5"})),
    )
    .await;
    assert_fits(
        &c,
        &doc,
        &server,
        "put",
        "/v1/adapters/{name}",
        Some(json!({"path": "/etc/passwd"})),
    )
    .await;
}
