//! The network preprocessors end to end: the real binary with `--annotator-root` pointing at a
//! folder of weight files in the containers users have (zip torch pickles in f16 and f32, a
//! state dict nested under `state_dict` with `module.` prefixes, `module.` on every key, a
//! legacy non-zip pickle), filled with formula weights. Every preprocessor answers on
//! `/v1/detect` and `/controlnet/detect` with exactly the hint its detector gives in-process on
//! the same file; a generate request's `controls[].preprocessor` takes the same path; without
//! the files the answer is a 422 naming the preprocessor, the file and the folder.
mod common;

use base64::Engine as _;
use candle_core::{DType, Device};
use common::Server;
use diffusion::torch_pickle::{save, Format, SaveOptions, StorageDtype, TensorData};
use neural_annotators::Network;
use reqwest::Client;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// How each file is stored, as the real files are (the legacy one stands for the OpenPose
/// files, which part 3 reads). SegFormer is a Hugging Face folder (safetensors + config.json).
fn container(network: Network) -> SaveOptions {
    let opts = |format, dtype, nest: &[&str], prefix: &str| SaveOptions {
        format,
        dtype,
        nest: nest.iter().map(|s| s.to_string()).collect(),
        prefix: prefix.into(),
    };
    match network {
        Network::Hed => opts(Format::Zip, StorageDtype::F16, &[], ""),
        Network::Pidinet => opts(Format::Zip, StorageDtype::F32, &["state_dict"], "module."),
        Network::LineartCoarse => opts(Format::Legacy, StorageDtype::F32, &[], ""),
        Network::LineartAnime => opts(Format::Zip, StorageDtype::F32, &[], "module."),
        Network::NormalBae => opts(Format::Zip, StorageDtype::F32, &["model"], "module."),
        Network::Uniformer => opts(Format::Zip, StorageDtype::F32, &["state_dict"], ""),
        Network::Mlsd
        | Network::LineartRealistic
        | Network::Midas
        | Network::DepthAnythingV2
        | Network::Segformer
        | Network::Openpose => opts(Format::Zip, StorageDtype::F32, &[], ""),
    }
}

/// Not written: UniFormer always rescales to a 512-pixel short side (mmseg's `img_scale`), a
/// minute of debug-build CPU here; its own tests load its real layout
/// (`crates/neural-annotators/tests/uniformer.rs`). Here it stands for a missing file.
/// OpenPose has its own test below (its files are legacy pickles, one per part).
const NOT_WRITTEN: [Network; 2] = [Network::Uniformer, Network::Openpose];

/// Removes a test's weight folder when the test ends, passing or not (formula weight files
/// take hundreds of MB).
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn weights_folder() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cns-e2e-annotators-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for network in Network::ALL {
        match network {
            n if NOT_WRITTEN.contains(&n) => continue,
            Network::Segformer => {
                neural_annotators::formula::write_into_folder(network, &dir).unwrap();
                continue;
            }
            _ => {}
        }
        let tensors: Vec<(String, TensorData)> = neural_annotators::formula::state_dict(network)
            .unwrap()
            .into_iter()
            .map(|(name, shape, values)| (name, TensorData::new(shape, values)))
            .collect();
        let name = match network {
            // The size the default architecture (ViT-S) has, told by the name.
            Network::DepthAnythingV2 => "depth_anything_v2_vits.pth",
            n => n.file_name(),
        };
        save(&dir.join(name), &tensors, container(network)).unwrap();
    }
    dir
}

fn photo() -> image::RgbImage {
    image::RgbImage::from_fn(96, 72, |x, y| {
        let inside = (x as i32 - 40).pow(2) + (y as i32 - 36).pow(2) < 400;
        let stripe = (x + 2 * y) % 24 < 3;
        image::Rgb(if inside {
            [30, 160, 220]
        } else if stripe {
            [250, 250, 240]
        } else {
            [(x * 2) as u8, (y * 3) as u8, 90]
        })
    })
}

fn png_b64(img: &image::RgbImage) -> String {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}

fn decode(b64: &str) -> image::RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8()
}

/// The hint the detector gives in-process, on the same file.
fn expected(dir: &Path, preprocessor: &str, params: &[f64], resolution: u32) -> image::RgbImage {
    let network = Network::for_preprocessor(preprocessor).unwrap();
    let (detector, _) = neural_annotators::load(
        network,
        &network.find_file(dir).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let input = annotators::ops::resize_image(&photo(), resolution);
    detector.detect(preprocessor, &input, params).unwrap()
}

async fn post(c: &Client, url: String, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_network_preprocessor_is_served_from_the_users_files() {
    let dir = weights_folder();
    let _cleanup = Cleanup(dir.clone());
    let server = Server::start(&["--annotator-root", dir.to_str().unwrap()], &[]);
    let c = Client::new();

    let list: Value = c
        .get(server.url("/v1/preprocessors"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let served: Vec<&str> = neural_annotators::PREPROCESSORS
        .into_iter()
        .filter(|p| !NOT_WRITTEN.contains(&Network::for_preprocessor(p).unwrap()))
        .collect();
    for name in neural_annotators::PREPROCESSORS {
        let p = list
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap();
        if served.contains(&name) {
            assert_eq!(p["available"], true, "{p}");
            assert_eq!(p["missing_weights"], json!([]), "{p}");
        } else {
            assert_eq!(p["available"], false, "{p}");
            let network = Network::for_preprocessor(name).unwrap();
            assert_eq!(
                p["missing_weights"],
                json!(network.missing_files(name, None)),
                "{p}"
            );
        }
    }
    let entry = |name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()
            .clone()
    };
    let denoise = entry("lineart_anime_denoise");
    assert_eq!(denoise["available"], false);
    assert_eq!(denoise["not_implemented"], true);
    assert!(denoise.get("unsupported").is_none(), "{denoise}");
    let leres = entry("depth_leres");
    assert_eq!(leres["available"], false);
    assert_eq!(leres["not_implemented"], true);
    assert!(
        leres["unsupported"]
            .as_str()
            .unwrap()
            .contains("depth_anything_v2"),
        "{leres}"
    );

    let image = png_b64(&photo());
    for &name in &served {
        let (status, body) = post(
            &c,
            server.url("/v1/detect"),
            json!({"image": image, "preprocessor": name, "processor_res": 64}),
        )
        .await;
        assert_eq!(status, 200, "{name}: {body}");
        let hint = decode(body["image"].as_str().unwrap());
        let pre = annotators::find(name).unwrap();
        let defaults: Vec<f64> = pre.params.iter().map(|p| p.default).collect();
        let (w, h, _) = annotators::ops::detect_size(96, 72, 64);
        assert_eq!((hint.width(), hint.height()), (w, h), "{name}");
        assert!(
            hint == expected(&dir, name, &defaults, 64),
            "{name}: the served hint differs from the detector's"
        );
    }

    // A1111: the module's thresholds are M-LSD's value and distance thresholds.
    let (status, body) = post(
        &c,
        server.url("/controlnet/detect"),
        json!({"controlnet_module": "mlsd", "controlnet_input_images": [image],
               "controlnet_processor_res": 64, "controlnet_threshold_a": 0.05,
               "controlnet_threshold_b": 2.0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let hint = decode(body["images"][0].as_str().unwrap());
    assert!(hint == expected(&dir, "mlsd", &[0.05, 2.0], 64));
    let (status, body) = post(
        &c,
        server.url("/controlnet/detect"),
        json!({"controlnet_module": "lineart_anime", "controlnet_input_images": [image],
               "controlnet_processor_res": 64}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        decode(body["images"][0].as_str().unwrap()) == expected(&dir, "lineart_anime", &[], 64)
    );

    // A generate request's control takes the same path.
    let (status, body) = post(
        &c,
        server.url("/v1/generate"),
        json!({"prompt": "a house", "width": 64, "height": 64, "steps": 2, "seed": 1,
               "return_hints": true,
               "controls": [{"adapter": "scribble", "image": image,
                             "preprocessor": "scribble_hed", "processor_res": 64}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(decode(body["hints"][0].as_str().unwrap()) == expected(&dir, "scribble_hed", &[], 64));

    // Each network was loaded once, whatever number of preprocessors and routes used it.
    let metrics = c
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let loads: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("engine_annotator_loads_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(
        loads,
        (Network::ALL.len() - NOT_WRITTEN.len()) as f64,
        "{metrics}"
    );
    assert!(metrics.contains("engine_annotate_seconds_count{preprocessor=\"softedge_hed\"}"));
    assert!(metrics.contains("device_memory_in_use_bytes{kind=\"annotators\"}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_files_the_answer_names_the_file_and_the_folder() {
    let empty = std::env::temp_dir().join(format!("cns-e2e-no-annotators-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let _cleanup = Cleanup(empty.clone());
    let image = png_b64(&photo());
    let c = Client::new();
    for (flags, folder) in [
        (
            vec!["--annotator-root", empty.to_str().unwrap()],
            empty.display().to_string(),
        ),
        (vec![], "no annotator folder configured".to_string()),
    ] {
        let server = Server::start(&flags, &[]);
        for (name, file) in [
            ("softedge_hed", "ControlNetHED.pth"),
            ("mlsd", "mlsd_large_512_fp32.pth"),
            ("lineart_anime", "netG.pth"),
        ] {
            let (status, body) = post(
                &c,
                server.url("/v1/detect"),
                json!({"image": image, "preprocessor": name}),
            )
            .await;
            assert_eq!(status, 422, "{body}");
            assert_eq!(body["field"], "preprocessor");
            let msg = body["error"].as_str().unwrap();
            for part in [name, file, &folder] {
                assert!(msg.contains(part), "{msg} lacks {part}");
            }
            // The A1111 route names its own field.
            let (status, body) = post(
                &c,
                server.url("/controlnet/detect"),
                json!({"controlnet_module": name, "controlnet_input_images": [image]}),
            )
            .await;
            assert_eq!(status, 422, "{body}");
            assert_eq!(body["field"], "controlnet_module");
            // And a generate request's control.
            let (status, body) = post(
                &c,
                server.url("/v1/generate"),
                json!({"prompt": "x", "width": 64, "height": 64, "steps": 1,
                       "controls": [{"adapter": "canny", "image": image, "preprocessor": name}]}),
            )
            .await;
            assert_eq!(status, 422, "{body}");
            assert_eq!(body["field"], "controls[0].preprocessor");
        }
        let list: Value = c
            .get(server.url("/v1/preprocessors"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let hed = list
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "scribble_hed")
            .unwrap();
        assert_eq!(hed["available"], false);
        assert_eq!(hed["missing_weights"], json!(["ControlNetHED.pth"]));
        let modules: Value = c
            .get(server.url("/controlnet/module_list"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let pidi = &modules["module_detail"]["softedge_pidinet"];
        assert_eq!(pidi["available"], false);
        assert_eq!(pidi["missing_weights"], json!(["table5_pidinet.pth"]));
        assert_eq!(modules["module_detail"]["canny"]["available"], true);
    }
}

/// OpenPose from its legacy pickle (the body file only): `/v1/detect` answers the hint and the
/// people as OpenPose JSON (A1111's `/controlnet/detect` as `poses`); the modules that need the
/// hand or face file name it; that JSON passed back as a control's `pose` is drawn into the
/// very same hint; bad poses are 422s naming the field inside the JSON.
#[tokio::test(flavor = "multi_thread")]
async fn openpose_answers_keypoints_and_draws_them_back() {
    let dir = std::env::temp_dir().join(format!("cns-e2e-openpose-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = Cleanup(dir.clone());
    let [body, _, _] = neural_annotators::formula::openpose_shapes().unwrap();
    let tensors: Vec<(String, TensorData)> = body
        .into_iter()
        .map(|(name, shape)| {
            let v = neural_annotators::formula::values(&name, &shape);
            (name, TensorData::new(shape, v))
        })
        .collect();
    // The real file: a legacy (torch < 1.6) pickle; f16 storage keeps the test's file small
    // (formula values are f16-exact).
    let legacy = SaveOptions {
        format: Format::Legacy,
        dtype: StorageDtype::F16,
        nest: Vec::new(),
        prefix: String::new(),
    };
    save(&dir.join("body_pose_model.pth"), &tensors, legacy).unwrap();
    let server = Server::start(&["--annotator-root", dir.to_str().unwrap()], &[]);
    let c = Client::new();
    let image = png_b64(&photo());

    let (status, body) = post(
        &c,
        server.url("/v1/detect"),
        json!({"image": image, "preprocessor": "openpose", "processor_res": 64}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let hint = decode(body["image"].as_str().unwrap());
    let pose = body["pose"].clone();
    let (w, h) = (hint.width(), hint.height());
    assert_eq!(pose["canvas_width"], w);
    assert_eq!(pose["canvas_height"], h);
    assert!(pose["people"].is_array(), "{pose}");
    // In-process, on the same file.
    let (detector, _) = neural_annotators::load(
        Network::Openpose,
        &dir.join("body_pose_model.pth"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let want = detector
        .detect_keypoints(
            "openpose",
            &annotators::ops::resize_image(&photo(), 64),
            &[],
        )
        .unwrap();
    assert!(hint == want.hint);
    assert_eq!(Some(&pose), want.keypoints.as_ref());

    // A1111's route answers the poses too.
    let (status, a1111) = post(
        &c,
        server.url("/controlnet/detect"),
        json!({"controlnet_module": "openpose", "controlnet_input_images": [image],
               "controlnet_processor_res": 64}),
    )
    .await;
    assert_eq!(status, 200, "{a1111}");
    assert_eq!(a1111["poses"], json!([pose]));

    // The hand and face networks' files are missing.
    for (module, files) in [
        ("openpose_hand", vec!["hand_pose_model.pth"]),
        ("openpose_faceonly", vec!["facenet.pth"]),
        ("openpose_full", vec!["hand_pose_model.pth", "facenet.pth"]),
    ] {
        let (status, body) = post(
            &c,
            server.url("/v1/detect"),
            json!({"image": image, "preprocessor": module, "processor_res": 64}),
        )
        .await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["field"], "preprocessor");
        let msg = body["error"].as_str().unwrap();
        for f in &files {
            assert!(msg.contains(f), "{msg} lacks {f}");
        }
        assert!(!msg.contains("body_pose_model"), "{msg}");
    }

    // The JSON drawn back as a control's hint is the detector's hint.
    let (status, body) = post(
        &c,
        server.url("/v1/generate"),
        json!({"prompt": "a dancer", "width": 64, "height": 64, "steps": 1, "seed": 1,
               "return_hints": true,
               "controls": [{"adapter": "openpose", "pose": pose, "preprocessor": "openpose"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(decode(body["hints"][0].as_str().unwrap()) == hint);

    // A hand-made pose: one body with two points, drawn as controlnet_aux draws it.
    let mut keypoints = vec![0.0; 18 * 3];
    keypoints[..3].copy_from_slice(&[20.0, 10.0, 1.0]); // nose
    keypoints[3..6].copy_from_slice(&[20.0, 30.0, 1.0]); // neck
    let made = json!({"people": [{"pose_keypoints_2d": keypoints}],
                      "canvas_width": 48, "canvas_height": 40});
    let (status, body) = post(
        &c,
        server.url("/v1/generate"),
        json!({"prompt": "a dancer", "width": 64, "height": 64, "steps": 1, "seed": 1,
               "return_hints": true, "controls": [{"adapter": "openpose", "pose": made}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let drawn = decode(body["hints"][0].as_str().unwrap());
    assert_eq!(drawn, engine::draw_pose(&made, None, u64::MAX).unwrap());
    assert_eq!(drawn.dimensions(), (48, 40));
    assert!(drawn.pixels().any(|p| p.0 != [0, 0, 0]), "nothing drawn");

    // Bad poses name the field inside the JSON.
    let mut short = made.clone();
    short["people"][0]["pose_keypoints_2d"] = json!([1.0, 2.0]);
    let mut nan_canvas = made.clone();
    nan_canvas["canvas_width"] = json!(-3);
    for (control, field) in [
        (
            json!({"adapter": "openpose", "pose": short}),
            "controls[0].pose.people[0].pose_keypoints_2d",
        ),
        (
            json!({"adapter": "openpose", "pose": nan_canvas}),
            "controls[0].pose.canvas_width",
        ),
        (
            json!({"adapter": "openpose", "pose": "not a pose"}),
            "controls[0].pose",
        ),
        (
            json!({"adapter": "openpose", "pose": made, "image": image}),
            "controls[0].pose",
        ),
        (json!({"adapter": "openpose"}), "controls[0].image"),
        (
            json!({"adapter": "openpose", "pose": made, "preprocessor": "canny"}),
            "controls[0].preprocessor",
        ),
        (
            json!({"adapter": "openpose", "pose": made, "params": {"x": 1.0}}),
            "controls[0].pose",
        ),
    ] {
        let (status, body) = post(
            &c,
            server.url("/v1/generate"),
            json!({"prompt": "x", "width": 64, "height": 64, "steps": 1, "controls": [control]}),
        )
        .await;
        assert_eq!(status, 422, "{control}: {body}");
        assert_eq!(body["field"], field, "{control}: {body}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
