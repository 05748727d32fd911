//! The A1111-compatible API end to end, against the real binary (embedded tiny model; adapters
//! canny, depth, openpose, scribble preloaded).
mod common;
use base64::Engine as _;
use common::{png_b64, Server};
use serde_json::{json, Value};

fn decode_png(b64: &str) -> image::RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    image::load_from_memory(&bytes).expect("decodes").to_rgb8()
}

async fn post(client: &reqwest::Client, server: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = client
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
    (status, v)
}

async fn get(client: &reqwest::Client, server: &Server, path: &str) -> Value {
    let r = client.get(server.url(path)).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    r.json().await.unwrap()
}

fn parse_info(body: &Value) -> Value {
    serde_json::from_str(body["info"].as_str().expect("info is a string")).expect("info is JSON")
}

/// Asserts a 4xx JSON error naming `field`.
fn assert_field_error((status, body): (u16, Value), field: &str) {
    assert!((400..500).contains(&status), "status {status}: {body}");
    assert_eq!(body["field"], json!(field), "{body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
}

#[tokio::test]
async fn txt2img_with_a_controlnet_unit() {
    let server = Server::start(&[], &[]);
    let client = reqwest::Client::new();
    let request = json!({
        "prompt": "a house", "negative_prompt": "blurry", "steps": 2, "cfg_scale": 6.5,
        "width": 64, "height": 72, "seed": 123, "sampler_name": "Euler", "batch_size": 1,
        "n_iter": 1, "restore_faces": false, "styles": [], "enable_hr": false,
        "alwayson_scripts": {"controlnet": {"args": [{
            "enabled": true, "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]",
            "weight": 0.8, "image": png_b64(80, 60), "resize_mode": "Crop and Resize",
            "processor_res": 64, "threshold_a": 50, "threshold_b": 150,
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": "Balanced",
            "pixel_perfect": false, "low_vram": false
        }]}}
    });
    let (status, body) = post(&client, &server, "/sdapi/v1/txt2img", request.clone()).await;
    assert_eq!(status, 200, "{body}");
    let images = body["images"].as_array().unwrap();
    // One generated image, then the canny map.
    assert_eq!(images.len(), 2, "{body}");
    let generated = decode_png(images[0].as_str().unwrap());
    assert_eq!(generated.dimensions(), (64, 72));
    let map = decode_png(images[1].as_str().unwrap());
    // A canny map is black and white.
    assert!(map
        .pixels()
        .all(|p| p.0.iter().all(|&c| c == 0 || c == 255)));
    assert_eq!(body["parameters"], request);
    let info = parse_info(&body);
    assert_eq!(info["seed"], json!(123));
    assert_eq!(info["all_seeds"], json!([123]));
    assert_eq!(info["prompt"], json!("a house"));
    assert_eq!(info["negative_prompt"], json!("blurry"));
    assert_eq!(info["sampler_name"], json!("Euler"));
    assert_eq!(info["scheduler"], json!("euler"));
    assert_eq!(
        (info["width"].clone(), info["height"].clone()),
        (json!(64), json!(72))
    );
    assert_eq!(info["cfg_scale"], json!(6.5));
    assert_eq!(info["steps"], json!(2));
    let infotext = info["infotexts"][0].as_str().unwrap();
    assert!(infotext.contains("Seed: 123"), "{infotext}");
    assert!(infotext.contains("Model: canny"), "{infotext}");

    // Same seed, same image; a disabled unit and module none add no map.
    let mut again = request.clone();
    again["alwayson_scripts"]["controlnet"]["args"][0]["module"] = json!("none");
    again["alwayson_scripts"]["controlnet"]["args"]
        .as_array_mut()
        .unwrap()
        .push(json!({"enabled": false, "module": "canny", "model": "depth"}));
    let (status, body) = post(&client, &server, "/sdapi/v1/txt2img", again).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["images"].as_array().unwrap().len(), 1, "{body}");
}

#[tokio::test]
async fn batches_seeds_samplers_and_send_images() {
    let server = Server::start(&[], &[]);
    let client = reqwest::Client::new();
    let (status, body) = post(
        &client,
        &server,
        "/sdapi/v1/txt2img",
        json!({"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 40,
               "batch_size": 2, "n_iter": 2, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["images"].as_array().unwrap().len(), 4);
    for i in body["images"].as_array().unwrap() {
        assert_eq!(decode_png(i.as_str().unwrap()).dimensions(), (64, 64));
    }
    let info = parse_info(&body);
    assert_eq!(info["all_seeds"], json!([40, 41, 42, 43]));
    assert_eq!(info["seed"], json!(40));
    assert_eq!(info["scheduler"], json!("dpmpp-2m-karras"));
    assert_eq!(info["infotexts"].as_array().unwrap().len(), 4);

    // Random seed: -1 gives a real seed; send_images false gives none.
    let (status, body) = post(
        &client,
        &server,
        "/sdapi/v1/txt2img",
        json!({"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": -1,
               "sampler_name": "UniPC", "send_images": false}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["images"], json!([]));
    let info = parse_info(&body);
    assert!(info["seed"].as_u64().is_some(), "{info}");
    assert_eq!(info["scheduler"], json!("unipc"));

    for (sampler, ours) in [
        ("Euler a", "euler-a"),
        ("DDIM", "ddim"),
        ("DPM++ 2M Karras", "dpmpp-2m-karras"),
    ] {
        let (status, body) = post(
            &client,
            &server,
            "/sdapi/v1/txt2img",
            json!({"prompt": "x", "steps": 2, "width": 64, "height": 64, "sampler_name": sampler}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(parse_info(&body)["scheduler"], json!(ours));
        assert_eq!(parse_info(&body)["sampler_name"], json!(sampler));
    }
}

#[tokio::test]
async fn img2img_with_init_image_and_mask() {
    let server = Server::start(&[], &[]);
    let client = reqwest::Client::new();
    let request = json!({
        "prompt": "a cat", "steps": 3, "width": 64, "height": 64, "seed": 9,
        "init_images": [format!("data:image/png;base64,{}", png_b64(64, 64))],
        "mask": png_b64(64, 64), "denoising_strength": 0.6, "resize_mode": 1,
        "inpainting_fill": 1, "mask_blur": 4, "inpaint_full_res": true,
        "alwayson_scripts": {"ControlNet": {"args": [{
            "module": "scribble_xdog", "model": "scribble", "image": {"image": png_b64(64, 64), "mask": null}
        }]}}
    });
    let (status, body) = post(&client, &server, "/sdapi/v1/img2img", request.clone()).await;
    assert_eq!(status, 200, "{body}");
    // The generated image, then the scribble map.
    assert_eq!(body["images"].as_array().unwrap().len(), 2, "{body}");
    // Without the unit: one image of the requested size, seed echoed.
    let mut plain = request.clone();
    plain["alwayson_scripts"] = json!({});
    plain["width"] = json!(72);
    let (status, body) = post(&client, &server, "/sdapi/v1/img2img", plain.clone()).await;
    assert_eq!(status, 200, "{body}");
    let images = body["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(
        decode_png(images[0].as_str().unwrap()).dimensions(),
        (72, 64)
    );
    assert_eq!(parse_info(&body)["all_seeds"], json!([9]));
    assert_eq!(parse_info(&body)["denoising_strength"], json!(0.6));
    assert_eq!(body["parameters"], plain);

    // A unit without an image uses the init image.
    let mut no_image = plain.clone();
    no_image["alwayson_scripts"] =
        json!({"controlnet": {"args": [{"module": "canny", "model": "canny"}]}});
    let (status, body) = post(&client, &server, "/sdapi/v1/img2img", no_image).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["images"].as_array().unwrap().len(), 2);

    let mut none = plain.clone();
    none["init_images"] = json!([]);
    assert_field_error(
        post(&client, &server, "/sdapi/v1/img2img", none).await,
        "init_images",
    );
    let mut bad = plain.clone();
    bad["denoising_strength"] = json!(1.5);
    assert_field_error(
        post(&client, &server, "/sdapi/v1/img2img", bad).await,
        "denoising_strength",
    );
    let mut bad = plain.clone();
    bad["init_images"] = json!(["not base64!"]);
    assert_field_error(
        post(&client, &server, "/sdapi/v1/img2img", bad).await,
        "init_images[0]",
    );
}

#[tokio::test]
async fn bad_fields_are_named() {
    let server = Server::start(&[], &[]);
    let client = reqwest::Client::new();
    let base = json!({"prompt": "x", "steps": 2, "width": 64, "height": 64});
    let with = |k: &str, v: Value| {
        let mut r = base.clone();
        r[k] = v;
        r
    };
    let unit = |u: Value| {
        let mut r = base.clone();
        let mut full = json!({"module": "canny", "model": "canny", "image": png_b64(64, 64)});
        for (k, v) in u.as_object().unwrap() {
            full[k] = v.clone();
        }
        r["alwayson_scripts"] = json!({"controlnet": {"args": [full]}});
        r
    };
    let cases = [
        (with("sampler_name", json!("LMS Karras")), "sampler_name"),
        (with("scheduler", json!("Exponential")), "scheduler"),
        (with("cfg_scale", json!(99)), "cfg_scale"),
        (with("steps", json!(0)), "steps"),
        (with("width", json!(65)), "width"),
        (with("batch_size", json!(0)), "batch_size"),
        (with("n_iter", json!(1000)), "batch_size"),
        (with("seed", json!(-5)), "seed"),
        (with("steps", json!("many")), "steps"),
        (
            with(
                "override_settings",
                json!({"sd_model_checkpoint": "nope [abc]"}),
            ),
            "override_settings.sd_model_checkpoint",
        ),
        (
            unit(json!({"model": "control_v11p_sd15_lineart [5c23b17d]"})),
            "alwayson_scripts.controlnet.args[0].model",
        ),
        (
            unit(json!({"module": "no_such_module"})),
            "alwayson_scripts.controlnet.args[0].module",
        ),
        (
            unit(json!({"weight": 5})),
            "alwayson_scripts.controlnet.args[0].weight",
        ),
        (
            unit(json!({"threshold_a": 1000})),
            "alwayson_scripts.controlnet.args[0].threshold_a",
        ),
        (
            unit(json!({"image": "@@@"})),
            "alwayson_scripts.controlnet.args[0].image",
        ),
        (
            unit(json!({"image": ""})),
            "alwayson_scripts.controlnet.args[0].image",
        ),
        (
            unit(json!({"resize_mode": "Stretch"})),
            "alwayson_scripts.controlnet.args[0].resize_mode",
        ),
        (
            unit(json!({"control_mode": 7})),
            "alwayson_scripts.controlnet.args[0].control_mode",
        ),
        (
            unit(json!({"guidance_end": "late"})),
            "alwayson_scripts.controlnet.args[0].guidance_end",
        ),
    ];
    for (request, field) in cases {
        let got = post(&client, &server, "/sdapi/v1/txt2img", request.clone()).await;
        assert!(
            (400..500).contains(&got.0) && got.1["field"] == json!(field),
            "{request}: wanted {field}, got {} {}",
            got.0,
            got.1
        );
    }
    // Not an object: 422 without a field.
    let (status, body) = post(&client, &server, "/sdapi/v1/txt2img", json!([1])).await;
    assert_eq!(
        (status, body["field"].clone()),
        (422, Value::Null),
        "{body}"
    );
    // clip_skip is A1111's (1 = none): 11 is over our 10 skipped layers.
    assert_field_error(
        post(
            &client,
            &server,
            "/sdapi/v1/txt2img",
            with("clip_skip", json!(12)),
        )
        .await,
        "clip_skip",
    );
    let (status, body) = post(
        &client,
        &server,
        "/sdapi/v1/txt2img",
        with(
            "override_settings",
            json!({"sd_model_checkpoint": "embedded [0123abcd]", "CLIP_stop_at_last_layers": 2}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let info = parse_info(&body);
    assert_eq!(info["sd_model_name"], json!("embedded"));
    assert_eq!(info["clip_skip"], json!(2));
    assert!(info["infotexts"][0]
        .as_str()
        .unwrap()
        .contains("Clip skip: 2"));
    // Unknown extra fields are fine.
    let (status, body) = post(
        &client,
        &server,
        "/sdapi/v1/txt2img",
        with("hr_checkpoint_name", Value::Null),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn listings_and_detect() {
    let server = Server::start(&[], &[]);
    let client = reqwest::Client::new();
    assert_eq!(
        get(&client, &server, "/controlnet/version").await,
        json!({"version": 3})
    );

    let models = get(&client, &server, "/controlnet/model_list").await;
    let mut list: Vec<String> = serde_json::from_value(models["model_list"].clone()).unwrap();
    list.sort();
    assert_eq!(list, ["canny", "depth", "openpose", "scribble"]);

    let modules = get(&client, &server, "/controlnet/module_list").await;
    let names: Vec<String> = serde_json::from_value(modules["module_list"].clone()).unwrap();
    assert!(names.iter().any(|n| n == "canny") && names.iter().any(|n| n == "none"));
    let canny = &modules["module_detail"]["canny"];
    assert_eq!(canny["model_free"], json!(false));
    let sliders = canny["sliders"].as_array().unwrap();
    assert_eq!(sliders.len(), 3, "{canny}");
    for s in sliders {
        let (v, lo, hi) = (
            s["value"].as_f64().unwrap(),
            s["min"].as_f64().unwrap(),
            s["max"].as_f64().unwrap(),
        );
        assert!(lo <= v && v <= hi && s["name"].is_string(), "{s}");
    }
    assert_eq!(
        names.len(),
        modules["module_detail"].as_object().unwrap().len()
    );

    let sd = get(&client, &server, "/sdapi/v1/sd-models").await;
    assert_eq!(sd[0]["title"], json!("embedded"));
    assert_eq!(sd[0]["model_name"], json!("embedded"));
    for k in ["hash", "sha256", "filename", "config"] {
        assert!(sd[0].get(k).is_some(), "{sd}");
    }
    let samplers = get(&client, &server, "/sdapi/v1/samplers").await;
    let names: Vec<&str> = samplers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for n in [
        "Euler",
        "Euler a",
        "DDIM",
        "DPM++ 2M",
        "DPM++ 2M Karras",
        "UniPC",
    ] {
        assert!(names.contains(&n), "{samplers}");
    }
    assert!(samplers[0]["aliases"].is_array() && samplers[0]["options"].is_object());
    let options = get(&client, &server, "/sdapi/v1/options").await;
    assert_eq!(options["sd_model_checkpoint"], json!("embedded"));
    let progress = get(&client, &server, "/sdapi/v1/progress").await;
    assert_eq!(progress["progress"], json!(0.0));
    assert_eq!(progress["state"]["job_count"], json!(0));
    assert!(progress.get("current_image").is_some());

    // Detect: one map per image, its short side at the processor resolution.
    let (status, body) = post(
        &client,
        &server,
        "/controlnet/detect",
        json!({"controlnet_module": "canny",
               "controlnet_input_images": [png_b64(64, 64), format!("data:image/png;base64,{}", png_b64(128, 64))],
               "controlnet_processor_res": 128, "controlnet_threshold_a": 100,
               "controlnet_threshold_b": 200}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["info"], json!("Success"));
    let maps = body["images"].as_array().unwrap();
    assert_eq!(maps.len(), 2);
    assert_eq!(
        decode_png(maps[0].as_str().unwrap()).dimensions(),
        (128, 128)
    );
    assert_eq!(
        decode_png(maps[1].as_str().unwrap()).dimensions(),
        (256, 128)
    );
    // webuiapi's field name.
    let (status, body) = post(
        &client,
        &server,
        "/controlnet/detect",
        json!({"controlnet_module": "canny", "controlnet_images": [png_b64(64, 64)]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_field_error(
        post(
            &client,
            &server,
            "/controlnet/detect",
            json!({"controlnet_module": "nope", "controlnet_input_images": [png_b64(64, 64)]}),
        )
        .await,
        "controlnet_module",
    );
    assert_field_error(
        post(
            &client,
            &server,
            "/controlnet/detect",
            json!({"controlnet_module": "canny", "controlnet_input_images": [png_b64(64, 64)],
                    "controlnet_threshold_b": 9999}),
        )
        .await,
        "controlnet_threshold_b",
    );
    assert_field_error(
        post(
            &client,
            &server,
            "/controlnet/detect",
            json!({"controlnet_module": "canny", "controlnet_input_images": ["zzz"]}),
        )
        .await,
        "controlnet_input_images[0]",
    );
}

#[tokio::test]
async fn a1111_routes_need_the_api_key() {
    let server = Server::start(&["--api-key", "a1111-test-key"], &[]);
    let client = reqwest::Client::new();
    let r = client
        .get(server.url("/controlnet/model_list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .get(server.url("/controlnet/model_list"))
        .bearer_auth("a1111-test-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A1111 clients write A1111's prompt syntax: emphasis is applied (the image differs from the
/// same text read plainly), the result equals the native route with `prompt_syntax: a1111`, and
/// `<lora:…>` tags are dropped and named in `info`.
#[tokio::test]
async fn prompts_are_read_in_a1111_syntax() {
    let server = Server::start(&[], &[]);
    let client = reqwest::Client::new();
    let prompt = "a (red:1.6) house, [[sky]] <lora:detail:0.7>";
    let (status, body) = post(
        &client,
        &server,
        "/sdapi/v1/txt2img",
        json!({"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": 9,
               "sampler_name": "Euler", "cfg_scale": 5.0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let a1111_image = decode_png(body["images"][0].as_str().unwrap());
    assert_eq!(
        parse_info(&body)["ignored_extra_networks"],
        json!(["<lora:detail:0.7>"])
    );

    let native = |syntax: &str| {
        json!({"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": 9,
               "scheduler": "euler", "guidance_scale": 5.0, "prompt_syntax": syntax})
    };
    let (status, body) = post(&client, &server, "/v1/generate", native("a1111")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(decode_png(body["images"][0].as_str().unwrap()), a1111_image);
    let (status, body) = post(&client, &server, "/v1/generate", native("plain")).await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(
        decode_png(body["images"][0].as_str().unwrap()),
        a1111_image,
        "emphasis changed nothing"
    );
    let (status, body) = post(&client, &server, "/v1/generate", native("markdown")).await;
    assert_eq!(status, 422, "{body}");
}
