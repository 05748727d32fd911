//! A catalogue of bad inputs, each answered with our JSON error naming its type and field,
//! while a good request runs alongside.
mod common;
use base64::Engine as _;
use common::{png_b64, Server};
use reqwest::{Client, Method};
use serde_json::{json, Value};

const MAX_BODY: usize = 1_000_000;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A small valid request with `patch` merged in (a `null` in `patch` removes the key).
fn gen(patch: Value) -> Vec<u8> {
    let mut v = json!({"prompt": "x", "width": 64, "height": 64, "steps": 1, "seed": 1});
    for (k, x) in patch.as_object().unwrap() {
        if x.is_null() {
            v.as_object_mut().unwrap().remove(k);
        } else {
            v[k] = x.clone();
        }
    }
    serde_json::to_vec(&v).unwrap()
}

/// A request with one control: a valid canny one with `patch` merged in.
fn ctl(patch: Value) -> Vec<u8> {
    let mut c = json!({"adapter": "canny", "image": png_b64(64, 64)});
    for (k, x) in patch.as_object().unwrap() {
        c[k] = x.clone();
    }
    gen(json!({ "controls": [c] }))
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG that is only a signature and an IHDR claiming `w`×`h` (a valid chunk, right CRC).
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = b"IHDR".to_vec();
    chunk.extend(w.to_be_bytes());
    chunk.extend(h.to_be_bytes());
    chunk.extend([8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    out.extend(13u32.to_be_bytes());
    out.extend(&chunk);
    out.extend(crc32(&chunk).to_be_bytes());
    out
}

fn real_png() -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(png_b64(64, 64))
        .unwrap()
}

struct Case {
    name: &'static str,
    method: Method,
    path: String,
    body: Vec<u8>,
    content_type: Option<&'static str>,
    accept: Option<&'static str>,
    status: u16,
    kind: &'static str,
    field: Option<&'static str>,
}

fn case(
    name: &'static str,
    path: &str,
    body: Vec<u8>,
    status: u16,
    kind: &'static str,
    field: Option<&'static str>,
) -> Case {
    Case {
        name,
        method: Method::POST,
        path: path.to_string(),
        body,
        content_type: Some("application/json"),
        accept: None,
        status,
        kind,
        field,
    }
}

fn catalogue(needs_weights: &str) -> Vec<Case> {
    const G: &str = "/v1/generate";
    const D: &str = "/v1/detect";
    let inv = "invalid_request";
    let truncated = {
        let png = real_png();
        png[..png.len() / 2].to_vec()
    };
    let huge_png = b64(&png_header_only(100_000, 100_000));
    let five: Vec<Value> = (0..5)
        .map(|_| json!({"adapter": "canny", "image": png_b64(64, 64)}))
        .collect();
    let mut cases = vec![
        // The body as such.
        case(
            "bad JSON",
            G,
            b"{\"prompt\": ".to_vec(),
            400,
            "invalid_json",
            None,
        ),
        case("empty body", G, Vec::new(), 400, "invalid_json", None),
        case(
            "NaN literal",
            G,
            br#"{"prompt":"x","guidance_scale":NaN}"#.to_vec(),
            400,
            "invalid_json",
            None,
        ),
        case(
            "1e999",
            G,
            br#"{"prompt":"x","guidance_scale":1e999}"#.to_vec(),
            400,
            "invalid_json",
            None,
        ),
        case("array, not object", G, b"[1, 2]".to_vec(), 422, inv, None),
        case(
            "string, not object",
            G,
            b"\"a cat\"".to_vec(),
            422,
            inv,
            None,
        ),
        case(
            "unknown top-level field",
            G,
            gen(json!({"sampler": "euler"})),
            422,
            inv,
            Some("sampler"),
        ),
        case(
            "missing prompt",
            G,
            gen(json!({"prompt": null})),
            422,
            inv,
            Some("prompt"),
        ),
        case(
            "prompt wrong type",
            G,
            gen(json!({"prompt": 5})),
            422,
            inv,
            Some("prompt"),
        ),
        case(
            "prompt too long",
            G,
            gen(json!({"prompt": "a".repeat(4001)})),
            422,
            inv,
            Some("prompt"),
        ),
        case(
            "negative prompt too long",
            G,
            gen(json!({"negative_prompt": "a".repeat(4001)})),
            422,
            inv,
            Some("negative_prompt"),
        ),
        // Sizes.
        case(
            "width 0",
            G,
            gen(json!({"width": 0})),
            422,
            inv,
            Some("width"),
        ),
        case(
            "width 63",
            G,
            gen(json!({"width": 63})),
            422,
            inv,
            Some("width"),
        ),
        case(
            "odd height",
            G,
            gen(json!({"height": 65})),
            422,
            inv,
            Some("height"),
        ),
        case(
            "100000×100000",
            G,
            gen(json!({"width": 100000, "height": 100000})),
            422,
            inv,
            Some("width"),
        ),
        case(
            "pixels over max",
            G,
            gen(json!({"width": 2048, "height": 1024})),
            422,
            inv,
            Some("width"),
        ),
        case(
            "width negative",
            G,
            gen(json!({"width": -64})),
            422,
            inv,
            Some("width"),
        ),
        // Sampling.
        case(
            "steps 0",
            G,
            gen(json!({"steps": 0})),
            422,
            inv,
            Some("steps"),
        ),
        case(
            "steps 10000",
            G,
            gen(json!({"steps": 10000})),
            422,
            inv,
            Some("steps"),
        ),
        case(
            "steps negative",
            G,
            gen(json!({"steps": -3})),
            422,
            inv,
            Some("steps"),
        ),
        case(
            "steps as string",
            G,
            gen(json!({"steps": "3"})),
            422,
            inv,
            Some("steps"),
        ),
        case(
            "steps fractional",
            G,
            gen(json!({"steps": 2.5})),
            422,
            inv,
            Some("steps"),
        ),
        case(
            "guidance negative",
            G,
            gen(json!({"guidance_scale": -1.0})),
            422,
            inv,
            Some("guidance_scale"),
        ),
        case(
            "guidance huge",
            G,
            gen(json!({"guidance_scale": 1e300})),
            422,
            inv,
            Some("guidance_scale"),
        ),
        case(
            "num_images 0",
            G,
            gen(json!({"num_images": 0})),
            422,
            inv,
            Some("num_images"),
        ),
        case(
            "num_images 1000",
            G,
            gen(json!({"num_images": 1000})),
            422,
            inv,
            Some("num_images"),
        ),
        case(
            "unknown scheduler",
            G,
            gen(json!({"scheduler": "plms"})),
            422,
            inv,
            Some("scheduler"),
        ),
        case(
            "unknown model",
            G,
            gen(json!({"model": "sdxl"})),
            422,
            inv,
            Some("model"),
        ),
        case(
            "seed -5",
            G,
            gen(json!({"seed": -5})),
            422,
            inv,
            Some("seed"),
        ),
        case("eta 2", G, gen(json!({"eta": 2.0})), 422, inv, Some("eta")),
        case(
            "clip_skip 50",
            G,
            gen(json!({"clip_skip": 50})),
            422,
            inv,
            Some("clip_skip"),
        ),
        case(
            "unknown output_format",
            G,
            gen(json!({"output_format": "gif"})),
            422,
            inv,
            Some("output_format"),
        ),
        case(
            "unknown priority",
            G,
            gen(json!({"priority": "urgent"})),
            422,
            inv,
            Some("priority"),
        ),
        case(
            "unknown resize_mode",
            G,
            gen(json!({"resize_mode": "stretch"})),
            422,
            inv,
            Some("resize_mode"),
        ),
        // Images.
        case(
            "strength 0 with init_image",
            G,
            gen(json!({"init_image": png_b64(64, 64), "strength": 0.0})),
            422,
            inv,
            Some("strength"),
        ),
        case(
            "strength 1.5",
            G,
            gen(json!({"init_image": png_b64(64, 64), "strength": 1.5})),
            422,
            inv,
            Some("strength"),
        ),
        case(
            "mask without init_image",
            G,
            gen(json!({"mask": png_b64(64, 64)})),
            422,
            inv,
            Some("mask"),
        ),
        case(
            "bad base64",
            G,
            gen(json!({"init_image": "%%%not base64%%%"})),
            422,
            inv,
            Some("init_image"),
        ),
        case(
            "base64 of not an image",
            G,
            gen(json!({"init_image": b64(b"hello, world")})),
            422,
            inv,
            Some("init_image"),
        ),
        case(
            "truncated PNG",
            G,
            gen(json!({"init_image": b64(&truncated)})),
            422,
            inv,
            Some("init_image"),
        ),
        case(
            "PNG claiming 100000×100000",
            G,
            gen(json!({"init_image": huge_png})),
            422,
            inv,
            Some("init_image"),
        ),
        case(
            "empty image string",
            G,
            gen(json!({"init_image": ""})),
            422,
            inv,
            Some("init_image"),
        ),
        case(
            "data URL without comma",
            G,
            gen(json!({"init_image": "data:image/png;base64"})),
            422,
            inv,
            Some("init_image"),
        ),
        case(
            "bad mask",
            G,
            gen(json!({"init_image": png_b64(64, 64), "mask": "!!"})),
            422,
            inv,
            Some("mask"),
        ),
        // Controls.
        case(
            "unknown adapter",
            G,
            ctl(json!({"adapter": "tile"})),
            422,
            inv,
            Some("controls[0].adapter"),
        ),
        case(
            "adapter name with a slash",
            G,
            ctl(json!({"adapter": "../canny"})),
            422,
            inv,
            Some("controls[0].adapter"),
        ),
        case(
            "missing control image",
            G,
            gen(json!({"controls": [{"adapter": "canny"}]})),
            422,
            inv,
            Some("controls[0].image"),
        ),
        case(
            "control image PNG claiming 100000×100000",
            G,
            ctl(json!({"image": huge_png})),
            422,
            inv,
            Some("controls[0].image"),
        ),
        case(
            "unknown preprocessor",
            G,
            ctl(json!({"preprocessor": "sobel"})),
            422,
            inv,
            Some("controls[0].preprocessor"),
        ),
        case(
            "bad param name",
            G,
            ctl(json!({"preprocessor": "canny", "params": {"threshold": 3}})),
            422,
            inv,
            Some("controls[0].params.threshold"),
        ),
        case(
            "param out of range",
            G,
            ctl(json!({"preprocessor": "canny", "params": {"low_threshold": 1000}})),
            422,
            inv,
            Some("controls[0].params.low_threshold"),
        ),
        case(
            "param not a number",
            G,
            ctl(json!({"preprocessor": "canny", "params": {"low_threshold": "high"}})),
            422,
            inv,
            Some("controls[0].params.low_threshold"),
        ),
        case(
            "params without preprocessor",
            G,
            ctl(json!({"params": {"low_threshold": 10}})),
            422,
            inv,
            Some("controls[0].params"),
        ),
        case(
            "processor_res 10",
            G,
            ctl(json!({"preprocessor": "canny", "processor_res": 10})),
            422,
            inv,
            Some("controls[0].processor_res"),
        ),
        case(
            "scale 5",
            G,
            ctl(json!({"scale": 5.0})),
            422,
            inv,
            Some("controls[0].scale"),
        ),
        case(
            "start > end",
            G,
            ctl(json!({"start": 0.8, "end": 0.2})),
            422,
            inv,
            Some("controls[0].end"),
        ),
        case(
            "start negative",
            G,
            ctl(json!({"start": -0.5})),
            422,
            inv,
            Some("controls[0].start"),
        ),
        case(
            "unknown control field",
            G,
            ctl(json!({"weight": 1.0})),
            422,
            inv,
            Some("controls[0].weight"),
        ),
        case(
            "unknown control_mode",
            G,
            ctl(json!({"control_mode": "loud"})),
            422,
            inv,
            Some("controls[0].control_mode"),
        ),
        case(
            "too many controls",
            G,
            gen(json!({"controls": five})),
            422,
            inv,
            Some("controls"),
        ),
        case(
            "controls not a list",
            G,
            gen(json!({"controls": {"adapter": "canny"}})),
            422,
            inv,
            Some("controls"),
        ),
        // Detect.
        case(
            "detect: unknown preprocessor",
            D,
            serde_json::to_vec(&json!({"preprocessor": "sobel", "image": png_b64(64, 64)}))
                .unwrap(),
            422,
            inv,
            Some("preprocessor"),
        ),
        case(
            "detect: missing image",
            D,
            serde_json::to_vec(&json!({"preprocessor": "canny"})).unwrap(),
            422,
            inv,
            Some("image"),
        ),
        case(
            "detect: bad base64",
            D,
            serde_json::to_vec(&json!({"preprocessor": "canny", "image": "@@"})).unwrap(),
            422,
            inv,
            Some("image"),
        ),
        case(
            "detect: bad param",
            D,
            serde_json::to_vec(
                &json!({"preprocessor": "canny", "image": png_b64(64, 64), "params": {"nope": 1}}),
            )
            .unwrap(),
            422,
            inv,
            Some("params.nope"),
        ),
        case(
            "detect: bad JSON",
            D,
            b"{".to_vec(),
            400,
            "invalid_json",
            None,
        ),
    ];
    // Cases that need more than a body.
    cases.push(case(
        "needs-weights preprocessor",
        G,
        ctl(json!({ "preprocessor": needs_weights })),
        422,
        inv,
        Some("controls[0].preprocessor"),
    ));
    cases.push(case(
        "detect: needs-weights preprocessor",
        D,
        serde_json::to_vec(&json!({"preprocessor": needs_weights, "image": png_b64(64, 64)}))
            .unwrap(),
        422,
        inv,
        Some("preprocessor"),
    ));
    let mut c = case("wrong content-type", G, gen(json!({})), 415, inv, None);
    c.content_type = Some("text/plain");
    cases.push(c);
    let mut c = case("no content-type", G, gen(json!({})), 415, inv, None);
    c.content_type = None;
    cases.push(c);
    let mut c = case("form content-type", G, b"prompt=x".to_vec(), 415, inv, None);
    c.content_type = Some("application/x-www-form-urlencoded");
    cases.push(c);
    let big = json!({"prompt": "x", "init_image": "A".repeat(MAX_BODY + 10)});
    cases.push(case(
        "body over max_body_bytes",
        G,
        serde_json::to_vec(&big).unwrap(),
        413,
        "payload_too_large",
        None,
    ));
    let mut c = case(
        "Accept image/png with 2 images",
        G,
        gen(json!({"num_images": 2})),
        406,
        "not_acceptable",
        Some("num_images"),
    );
    c.accept = Some("image/png");
    cases.push(c);
    cases.push(case(
        "unknown route",
        "/v1/generat",
        gen(json!({})),
        404,
        "not_found",
        None,
    ));
    let mut c = case(
        "unknown route, GET",
        "/v2/models",
        Vec::new(),
        404,
        "not_found",
        None,
    );
    c.method = Method::GET;
    cases.push(c);
    let mut c = case(
        "wrong method: GET generate",
        G,
        Vec::new(),
        405,
        "method_not_allowed",
        None,
    );
    c.method = Method::GET;
    cases.push(c);
    let mut c = case(
        "wrong method: DELETE models",
        "/v1/models",
        Vec::new(),
        405,
        "method_not_allowed",
        None,
    );
    c.method = Method::DELETE;
    cases.push(c);
    let mut c = case(
        "wrong method: POST adapter",
        "/v1/adapters/canny",
        Vec::new(),
        405,
        "method_not_allowed",
        None,
    );
    c.method = Method::POST;
    cases.push(c);
    // Adapter management.
    for (name, path, body, status, kind, field) in [
        (
            "PUT adapter: bad name",
            "/v1/adapters/bad%20name",
            json!({"path": "embedded:1"}),
            422,
            inv,
            Some("name"),
        ),
        (
            "PUT adapter: hidden name",
            "/v1/adapters/.hidden",
            json!({"path": "embedded:1"}),
            422,
            inv,
            Some("name"),
        ),
        (
            "PUT adapter: path outside roots",
            "/v1/adapters/evil",
            json!({"path": "/etc/passwd"}),
            403,
            "forbidden",
            Some("path"),
        ),
        (
            "PUT adapter: missing file",
            "/v1/adapters/gone",
            json!({"path": "no/such.safetensors"}),
            404,
            "not_found",
            Some("path"),
        ),
        (
            "PUT adapter: embedded without number",
            "/v1/adapters/e",
            json!({"path": "embedded:x"}),
            422,
            inv,
            Some("path"),
        ),
        (
            "PUT adapter: missing path",
            "/v1/adapters/e",
            json!({}),
            422,
            inv,
            Some("path"),
        ),
        (
            "PUT adapter: unknown field",
            "/v1/adapters/e",
            json!({"path": "embedded:1", "force": true}),
            422,
            inv,
            Some("force"),
        ),
    ] {
        let mut c = case(
            name,
            path,
            serde_json::to_vec(&body).unwrap(),
            status,
            kind,
            field,
        );
        c.method = Method::PUT;
        cases.push(c);
    }
    let mut c = case(
        "DELETE unknown adapter",
        "/v1/adapters/never",
        Vec::new(),
        404,
        "not_found",
        None,
    );
    c.method = Method::DELETE;
    cases.push(c);
    cases
}

/// Sends `case`, returns a description of what differed from what it expects, if anything.
async fn check(c: &Client, server: &Server, case: &Case) -> Option<String> {
    let mut req = c.request(case.method.clone(), server.url(&case.path));
    if let Some(ct) = case.content_type {
        req = req.header("content-type", ct);
    }
    if let Some(a) = case.accept {
        req = req.header("accept", a);
    }
    if !case.body.is_empty() {
        req = req.body(case.body.clone());
    }
    let r = match req.send().await {
        Ok(r) => r,
        Err(e) => return Some(format!("{}: no answer: {e}", case.name)),
    };
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = r.text().await.unwrap_or_default();
    let body: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) => return Some(format!("{}: {status} {ct:?} not JSON: {text:?}", case.name)),
    };
    let shape_ok = body.as_object().is_some_and(|o| {
        o.len() == 3
            && o["error"].as_str().is_some_and(|e| !e.is_empty())
            && o["type"].is_string()
            && (o["field"].is_string() || o["field"].is_null())
    });
    let got = (status, body["type"].as_str(), body["field"].as_str());
    let want = (case.status, Some(case.kind), case.field);
    if got != want || !shape_ok || ct != "application/json" {
        return Some(format!(
            "{}: got {got:?} ({ct}), want {want:?}: {text}",
            case.name
        ));
    }
    None
}

#[tokio::test]
async fn bad_inputs_are_refused_naming_the_field() {
    let server = Server::start(
        &[],
        &[("CNS_SERVER__MAX_BODY_BYTES", &MAX_BODY.to_string())],
    );
    let c = Client::new();
    let pre: Value = c
        .get(server.url("/v1/preprocessors"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let needs_weights = pre
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["available"] == false)
        .expect("a preprocessor that needs weights")["name"]
        .as_str()
        .unwrap()
        .to_string();
    let cases = catalogue(&needs_weights);
    assert!(cases.len() >= 40, "{} cases", cases.len());

    // A good request runs the whole time.
    let good = {
        let (c, url) = (c.clone(), server.url("/v1/generate"));
        let body = json!({"prompt": "a cat", "width": 128, "height": 128, "steps": 20, "seed": 3,
            "controls": [{"adapter": "canny", "image": png_b64(96, 96), "preprocessor": "canny"}]});
        tokio::spawn(async move { c.post(url).json(&body).send().await.unwrap() })
    };
    let mut failures = Vec::new();
    for case in &cases {
        if let Some(f) = check(&c, &server, case).await {
            failures.push(f);
        }
    }
    let r = good.await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["seeds"], json!([3]));
    assert!(
        failures.is_empty(),
        "{} of {} cases answered otherwise:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Still healthy, still generating.
    assert_eq!(
        c.get(server.url("/ready")).send().await.unwrap().status(),
        200
    );
    let r = c
        .post(server.url("/v1/generate"))
        .header("content-type", "application/json")
        .body(gen(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    println!("{} bad inputs checked", cases.len());
}
