//! The native API end to end, against the real binary.
mod common;
use base64::Engine as _;
use common::{png_b64, Server};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

fn decode_png(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .expect("a PNG")
        .to_rgb8()
}

fn small(extra: Value) -> Value {
    let mut v = json!({"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 7});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// Asserts an error answer: status, our JSON body, its type and field.
async fn assert_error(r: reqwest::Response, status: u16, kind: &str, field: Option<&str>) -> Value {
    let got = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "body: {text}");
    assert_eq!(ct.as_deref(), Some("application/json"), "body: {text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert!(body["error"].is_string(), "{body}");
    assert_eq!(body["type"], kind, "{body}");
    assert_eq!(body["field"].as_str(), field, "{body}");
    body
}

async fn metrics_text(c: &Client, s: &Server) -> String {
    let r = c.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// The value of an unlabelled sample `name`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn gauge(c: &Client, s: &Server, name: &str) -> f64 {
    sample(&metrics_text(c, s).await, name).unwrap_or_else(|| panic!("no {name}"))
}

/// Polls until `name` equals `want`, up to `limit`.
async fn wait_gauge(c: &Client, s: &Server, name: &str, want: f64, limit: Duration) {
    let started = Instant::now();
    loop {
        let v = gauge(c, s, name).await;
        if v == want {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{name} is {v}, not {want}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// After a job was abandoned: nothing runs or waits within a few seconds, and the UNet stops.
async fn assert_engine_idle(c: &Client, s: &Server) {
    wait_gauge(c, s, "engine_running_jobs", 0.0, Duration::from_secs(5)).await;
    wait_gauge(c, s, "engine_queue_depth", 0.0, Duration::from_secs(5)).await;
    let calls = gauge(c, s, "engine_unet_calls").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        gauge(c, s, "engine_unet_calls").await,
        calls,
        "the UNet still runs"
    );
}

/// Parses a server-sent event stream into (event, data) pairs.
fn parse_sse(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut event = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = Some(e.trim().to_string());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            Some((event?, serde_json::from_str(&data).expect("JSON data")))
        })
        .collect()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("cns-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test]
async fn native_routes() {
    // An adapter root with a real (diffusers) ControlNet that does not fit the embedded UNet,
    // and a file outside it.
    let root = temp_dir("root");
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../diffusion/tests/fixtures");
    std::fs::create_dir_all(root.join("cn15")).unwrap();
    for f in std::fs::read_dir(fixture.join("controlnet_sd15")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), root.join("cn15").join(f.file_name())).unwrap();
    }
    let outside = temp_dir("outside");
    std::fs::write(outside.join("x.safetensors"), b"not weights").unwrap();

    let server = Server::start(&["--adapter-root", root.to_str().unwrap()], &[]);
    let c = Client::new();

    // Operations.
    let r = c.get(server.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ok");
    let r = c.get(server.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ready");
    let r = c.get(server.url("/openapi.yaml")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("/v1/generate/stream:"));

    // x-request-id: echoed when sent, made up when not.
    let r = c
        .get(server.url("/health"))
        .header("x-request-id", "my-id-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "my-id-42");
    let r = c.get(server.url("/v1/models")).send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(id.len() >= 16, "{id}");
    let r = c.get(server.url("/v1/models")).send().await.unwrap();
    assert_ne!(r.headers()["x-request-id"].to_str().unwrap(), id);

    // Lists.
    let models: Value = c
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models, json!([{"name": "embedded", "default": true}]));
    let adapters: Value = c
        .get(server.url("/v1/adapters"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = adapters
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    for n in ["canny", "depth", "openpose", "scribble"] {
        assert!(names.contains(&n), "{names:?}");
    }
    let pre: Value = c
        .get(server.url("/v1/preprocessors"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pre = pre.as_array().unwrap();
    let canny = pre.iter().find(|p| p["name"] == "canny").expect("canny");
    assert_eq!(canny["available"], true);
    assert!(!canny["params"].as_array().unwrap().is_empty());
    let needs_weights = pre
        .iter()
        .find(|p| p["available"] == false)
        .expect("a preprocessor that needs weights")["name"]
        .as_str()
        .unwrap()
        .to_string();

    // Generate, JSON.
    let r = c
        .post(server.url("/v1/generate"))
        .json(&small(json!({
            "controls": [{"adapter": "canny", "image": png_b64(80, 60), "preprocessor": "canny"}],
            "return_hints": true
        })))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["seeds"], json!([7]));
    assert_eq!(body["format"], "png");
    let img = decode_png(&b64(body["images"][0].as_str().unwrap()));
    assert_eq!(img.dimensions(), (64, 64));
    assert_eq!(body["hints"].as_array().unwrap().len(), 1);
    let hint = decode_png(&b64(body["hints"][0].as_str().unwrap()));
    assert!(hint.width() > 0 && hint.height() > 0);
    for k in ["prepare_ms", "queue_ms", "inference_ms", "total_ms"] {
        assert!(body["timings"][k].is_u64(), "{k}");
    }
    // Without return_hints, no hints.
    let body: Value = c
        .post(server.url("/v1/generate"))
        .json(&small(json!({})))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(body.get("hints").is_none(), "{body}");

    // Two images: seeds s, s+1, both decoded at size, and different.
    let body: Value = c
        .post(server.url("/v1/generate"))
        .json(&small(
            json!({"num_images": 2, "seed": 100, "width": 64, "height": 72}),
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["seeds"], json!([100, 101]));
    let imgs: Vec<_> = body["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| decode_png(&b64(i.as_str().unwrap())))
        .collect();
    assert_eq!(imgs.len(), 2);
    assert!(imgs.iter().all(|i| i.dimensions() == (64, 72)));
    assert_ne!(imgs[0], imgs[1]);

    // Output formats.
    for (format, magic) in [("jpeg", &b"\xff\xd8\xff"[..]), ("webp", &b"RIFF"[..])] {
        let body: Value = c
            .post(server.url("/v1/generate"))
            .json(&small(json!({"output_format": format})))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["format"], format);
        let bytes = b64(body["images"][0].as_str().unwrap());
        assert!(bytes.starts_with(magic), "{format}");
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
    }

    // Accept: image/png gives the bytes; the same seed gives the same image as JSON did.
    let r = c
        .post(server.url("/v1/generate"))
        .header("accept", "image/png")
        .json(&small(json!({"seed": 100, "height": 72})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.headers()["x-seed"], "100");
    let raw = decode_png(&r.bytes().await.unwrap());
    // The same image to the bit, on the CPU, whatever shares its batch (the README's "Seeds").
    assert_eq!(raw.dimensions(), imgs[0].dimensions());
    let differing = raw
        .as_raw()
        .iter()
        .zip(imgs[0].as_raw())
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        differing == 0,
        "seed 100 alone differs from image 0 of the batch in {differing} values"
    );
    let r = c
        .post(server.url("/v1/generate"))
        .header("accept", "image/jpeg")
        .json(&small(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    assert!(r.bytes().await.unwrap().starts_with(b"\xff\xd8"));

    // The stream: queued, started, steps 1..N in order, done.
    let r = c
        .post(server.url("/v1/generate/stream"))
        .json(&small(json!({"steps": 3, "seed": 5})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = parse_sse(&r.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        names,
        ["queued", "started", "step", "step", "step", "done"],
        "{events:?}"
    );
    assert!(events[0].1["position"].is_u64());
    for (k, (_, data)) in events[2..5].iter().enumerate() {
        assert_eq!(data, &json!({"step": k + 1, "total": 3}));
    }
    let done = &events[5].1;
    assert_eq!(done["seeds"], json!([5]));
    assert_eq!(
        decode_png(&b64(done["images"][0].as_str().unwrap())).dimensions(),
        (64, 64)
    );
    // Bad input to the stream is a plain 4xx before any event.
    let r = c
        .post(server.url("/v1/generate/stream"))
        .json(&small(json!({"steps": 0})))
        .send()
        .await
        .unwrap();
    assert_error(r, 422, "invalid_request", Some("steps")).await;

    // Detect.
    let r = c
        .post(server.url("/v1/detect"))
        .json(&json!({"preprocessor": "canny", "image": png_b64(64, 48), "processor_res": 64}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let d: Value = r.json().await.unwrap();
    let hint = decode_png(&b64(d["image"].as_str().unwrap()));
    assert_eq!(
        (hint.width() as u64, hint.height() as u64),
        (d["width"].as_u64().unwrap(), d["height"].as_u64().unwrap())
    );
    let r = c
        .post(server.url("/v1/detect"))
        .json(&json!({"preprocessor": needs_weights, "image": png_b64(64, 64)}))
        .send()
        .await
        .unwrap();
    assert_error(r, 422, "invalid_request", Some("preprocessor")).await;

    // Adapters: load an embedded one, use it, delete it, then it is unknown.
    let r = c
        .put(server.url("/v1/adapters/extra"))
        .json(&json!({"path": "embedded:7"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let info: Value = r.json().await.unwrap();
    assert_eq!(
        (info["name"].as_str(), info["source"].as_str()),
        (Some("extra"), Some("embedded:7"))
    );
    let with_extra = small(json!({"controls": [{"adapter": "extra", "image": png_b64(64, 64)}]}));
    let r = c
        .post(server.url("/v1/generate"))
        .json(&with_extra)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .delete(server.url("/v1/adapters/extra"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = c
        .post(server.url("/v1/generate"))
        .json(&with_extra)
        .send()
        .await
        .unwrap();
    assert_error(r, 422, "invalid_request", Some("controls[0].adapter")).await;
    let r = c
        .delete(server.url("/v1/adapters/extra"))
        .send()
        .await
        .unwrap();
    assert_error(r, 404, "not_found", None).await;

    // Adapter roots: outside is forbidden, inside loads.
    let r = c
        .put(server.url("/v1/adapters/evil"))
        .json(&json!({"path": outside.join("x.safetensors")}))
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "forbidden", Some("path")).await;
    let r = c
        .put(server.url("/v1/adapters/evil"))
        .json(&json!({"path": format!(
            "../{}/x.safetensors",
            outside.file_name().unwrap().to_str().unwrap()
        )}))
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "forbidden", Some("path")).await;
    let r = c
        .put(server.url("/v1/adapters/evil"))
        .json(&json!({"path": "missing.safetensors"}))
        .send()
        .await
        .unwrap();
    assert_error(r, 404, "not_found", Some("path")).await;
    let r = c
        .put(server.url("/v1/adapters/real"))
        .json(&json!({"path": "cn15"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // It does not fit the embedded UNet: that job fails alone, cleanly.
    let with_real = small(json!({"controls": [{"adapter": "real", "image": png_b64(64, 64)}]}));
    let r = c
        .post(server.url("/v1/generate"))
        .json(&with_real)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert!((400..600).contains(&status), "{status}");
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].is_string() && body["type"].is_string(),
        "{body}"
    );
    // The same failure on the stream is an `error` event.
    let r = c
        .post(server.url("/v1/generate/stream"))
        .json(&with_real)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let events = parse_sse(&r.text().await.unwrap());
    let (last, data) = events.last().expect("events");
    assert_eq!(last, "error", "{events:?}");
    assert_eq!(data["type"], body["type"]);
    // The service carries on.
    let r = c
        .post(server.url("/v1/generate"))
        .json(&small(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A client that goes away cancels its job (a 256×256, 150-step job takes many seconds).
    let slow = small(json!({"width": 256, "height": 256, "steps": 150}));
    let calls_before = gauge(&c, &server, "engine_unet_calls").await;
    let quick = Client::builder()
        .timeout(Duration::from_millis(3000))
        .build()
        .unwrap();
    let e = quick
        .post(server.url("/v1/generate"))
        .json(&slow)
        .send()
        .await
        .unwrap_err();
    assert!(e.is_timeout(), "{e}");
    assert!(gauge(&c, &server, "engine_unet_calls").await > calls_before);
    assert_engine_idle(&c, &server).await;
    // The same for the stream: read until the job steps, then drop the response.
    let calls_before = gauge(&c, &server, "engine_unet_calls").await;
    let mut r = c
        .post(server.url("/v1/generate/stream"))
        .json(&slow)
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    while !seen.contains("event: step") {
        let chunk = r.chunk().await.unwrap().expect("the stream ended early");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(r);
    assert!(gauge(&c, &server, "engine_unet_calls").await > calls_before);
    assert_engine_idle(&c, &server).await;

    // Metrics, after all of the above.
    let m = metrics_text(&c, &server).await;
    for name in [
        "engine_queue_depth",
        "engine_running_jobs",
        "engine_oom_retries",
        "engine_oom_failures",
        "engine_batch_cap",
        "engine_step_seconds_bucket",
        "generation_requests_total{",
        "adapter_loads_total",
        "device_memory_in_use_bytes{",
        "http_requests_total{",
    ] {
        assert!(m.contains(name), "{name} missing from:\n{m}");
    }
    assert!(
        m.lines().any(|l| l.starts_with("http_requests_total{")
            && l.contains("route=\"/v1/generate\"")
            && l.contains("status=\"200\"")),
        "{m}"
    );
    assert!(
        m.lines().any(|l| l.starts_with("http_requests_total{")
            && l.contains("route=\"/v1/adapters/{name}\"")),
        "{m}"
    );
    assert!(
        m.lines()
            .any(|l| l.starts_with("generation_requests_total{") && l.contains("outcome=\"ok\"")),
        "{m}"
    );
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&outside);
}

#[tokio::test]
async fn auth_keys() {
    let (api, admin) = ("api-key-123456", "admin-key-123456");
    let server = Server::start(&["--api-key", api, "--admin-key", admin], &[]);
    let c = Client::new();
    let models = server.url("/v1/models");

    let r = c.get(&models).send().await.unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_error(r, 401, "unauthorized", None).await;
    let r = c
        .get(&models)
        .bearer_auth("wrong-key-123456")
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "unauthorized", None).await;
    let r = c
        .post(server.url("/v1/generate"))
        .json(&small(json!({})))
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "unauthorized", None).await;
    for key in [api, admin] {
        let r = c.get(&models).bearer_auth(key).send().await.unwrap();
        assert_eq!(r.status(), 200, "{key}");
        let r = c
            .post(server.url("/v1/generate"))
            .bearer_auth(key)
            .json(&small(json!({"steps": 1})))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{key}");
    }

    let adapter = server.url("/v1/adapters/mine");
    let put = json!({"path": "embedded:9"});
    let r = c.put(&adapter).json(&put).send().await.unwrap();
    assert_error(r, 401, "unauthorized", None).await;
    let r = c
        .put(&adapter)
        .bearer_auth(api)
        .json(&put)
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "forbidden", None).await;
    let r = c.delete(&adapter).bearer_auth(api).send().await.unwrap();
    assert_error(r, 403, "forbidden", None).await;
    let r = c
        .put(&adapter)
        .bearer_auth(admin)
        .json(&put)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c.delete(&adapter).bearer_auth(admin).send().await.unwrap();
    assert_eq!(r.status(), 204);

    for open in ["/health", "/ready", "/metrics", "/openapi.yaml"] {
        let r = c.get(server.url(open)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{open}");
    }
}

#[tokio::test]
async fn overload_and_timeout() {
    let mut server = Server::start(
        &["--max-queue", "1", "--max-batch", "1"],
        &[("CNS_SERVER__REQUEST_TIMEOUT_SECS", "1")],
    );
    let c = Client::new();

    // One runs, one waits, the rest are turned away at once.
    let slow = small(json!({"width": 256, "height": 256, "steps": 150}));
    let requests = (0..5).map(|_| {
        let (c, url, body) = (c.clone(), server.url("/v1/generate"), slow.clone());
        tokio::spawn(async move { c.post(url).json(&body).send().await.unwrap() })
    });
    let mut overloaded = 0;
    for r in futures_util::future::join_all(requests).await {
        let r = r.unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(r.headers()["retry-after"], "1");
            assert_error(r, 429, "overloaded", None).await;
            overloaded += 1;
        } else {
            // The admitted ones run out of time.
            assert_error(r, 504, "timeout", None).await;
        }
    }
    assert!(overloaded >= 1, "no request was turned away");
    assert_engine_idle(&c, &server).await;

    // A long job is answered 504 after the timeout, and cancelled.
    let started = Instant::now();
    let r = c
        .post(server.url("/v1/generate"))
        .json(&small(json!({"width": 512, "height": 512, "steps": 150})))
        .send()
        .await
        .unwrap();
    assert_error(r, 504, "timeout", None).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_engine_idle(&c, &server).await;

    // And the service still works.
    let r = c
        .post(server.url("/v1/generate"))
        .json(&small(json!({"steps": 1})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let status = server.terminate(Duration::from_secs(20)).expect("exited");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn graceful_shutdown() {
    let mut server = Server::start(&[], &[]);
    let c = Client::new();
    let body = small(json!({"width": 256, "height": 256, "steps": 30}));
    let in_flight = {
        let (c, url) = (c.clone(), server.url("/v1/generate"));
        tokio::spawn(async move { c.post(url).json(&body).send().await })
    };
    wait_gauge(
        &c,
        &server,
        "engine_running_jobs",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let pid = server.child.as_ref().unwrap().id();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    // New requests are refused (a fresh client: no pooled connection).
    let started = Instant::now();
    loop {
        let fresh = Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        match fresh.get(server.url("/ready")).send().await {
            // Refused, or reset before any answer: not served.
            Err(e) => {
                assert!(!e.is_timeout(), "{e:?}");
                eprintln!("after SIGTERM: {e:?}");
                break;
            }
            Ok(r) if r.status() == 503 => break,
            Ok(r) => assert!(
                started.elapsed() < Duration::from_secs(2),
                "still answering {} after SIGTERM",
                r.status()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!in_flight.is_finished(), "the job ended before the check");
    let r = in_flight.await.unwrap().expect("the in-flight request");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["images"].as_array().unwrap().len(), 1);
    let status = server.terminate(Duration::from_secs(20)).expect("exited");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_stream_client_leaving_while_queued_cancels_its_job() {
    let server = Server::start(&["--max-batch", "1"], &[]);
    let c = Client::new();
    // One slow job holds the only batch slot.
    let slow = small(json!({"width": 256, "height": 256, "steps": 150}));
    let blocker = {
        let (c, url, body) = (c.clone(), server.url("/v1/generate"), slow.clone());
        tokio::spawn(async move { c.post(url).json(&body).send().await })
    };
    wait_gauge(
        &c,
        &server,
        "engine_running_jobs",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    // A stream client queues behind it, hears `queued`, and leaves.
    let mut r = c
        .post(server.url("/v1/generate/stream"))
        .json(&slow)
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    while !seen.contains("event: queued") {
        let chunk = r.chunk().await.unwrap().expect("the stream ended early");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(gauge(&c, &server, "engine_queue_depth").await, 1.0);
    drop(r);
    // It leaves the queue while the blocker still runs (no event was due to reveal it).
    wait_gauge(
        &c,
        &server,
        "engine_queue_depth",
        0.0,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(gauge(&c, &server, "engine_running_jobs").await, 1.0);
    blocker.abort();
    assert_engine_idle(&c, &server).await;
}
