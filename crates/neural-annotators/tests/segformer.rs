//! SegFormer (`seg_segformer`) against transformers 5.24 on formula weights; fixtures from
//! `tools/parity/neural/make_segformer.py` (see its header for what each file holds).
//!
//! * config.json parsing (b0, b5) and the exact set of hub keys and shapes the model reads;
//! * the processor's uint8 resize: byte-equal (stored images and FNV hashes of many sizes);
//! * `pixel_values`: bit-equal;
//! * b0 network logits in f32 within 1e-4 (max|Δ| / max|ref|);
//! * post-processing fed the reference's logits: byte-equal labels and hints;
//! * `detect` end to end (including the real 512×512 processor size): hints within a stated
//!   number of differing pixels;
//! * loading formula weights from the hub files (`model.safetensors`, `pytorch_model.bin`).
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use image::{GrayImage, RgbImage};
use neural_annotators::formula::{self, FormulaWeights};
use neural_annotators::segformer::{self, Config, Segformer};
use neural_annotators::Detector;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/segformer")
}

fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap()).unwrap()
}

fn rgb(name: &str) -> RgbImage {
    image::open(dir().join(name)).unwrap().to_rgb8()
}

fn grey(name: &str) -> GrayImage {
    image::open(dir().join(name)).unwrap().to_luma8()
}

fn tensors(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(format!("{case}.safetensors")), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// max|a - b| / max|b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    d / b.iter().map(|v| v.abs()).fold(0f32, f32::max)
}

fn differing(a: &[u8], b: &[u8], channels: usize) -> usize {
    assert_eq!(a.len(), b.len());
    a.chunks(channels)
        .zip(b.chunks(channels))
        .filter(|(x, y)| x != y)
        .count()
}

/// The small cases (processor size set below 512 to keep the fixtures small).
fn small_case_config(case: &serde_json::Value) -> Config {
    let ph = case["processor_height"].as_u64().unwrap() as usize;
    let pw = case["processor_width"].as_u64().unwrap() as usize;
    Config::b0().with_processor_size(ph, pw)
}

fn cases() -> Vec<serde_json::Value> {
    manifest()["cases"].as_array().unwrap().clone()
}

fn photo() -> RgbImage {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../annotators/tests/fixtures/in_photo_96x128.png");
    image::open(p).unwrap().to_rgb8()
}

/// The script's `synth`: a deterministic noise image.
fn synth(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let px = |c: u64| (formula::splitmix64(x as u64 * 0x10000 + y as u64 * 4 + c) >> 56) as u8;
        image::Rgb([px(0), px(1), px(2)])
    })
}

#[test]
fn hub_configs_parse() {
    let b0 = Config::from_hf_json(&std::fs::read_to_string(dir().join("config_b0.json")).unwrap())
        .unwrap();
    assert_eq!(b0, Config::b0());
    let b5 = Config::from_hf_json(&std::fs::read_to_string(dir().join("config_b5.json")).unwrap())
        .unwrap();
    assert_eq!(b5, Config::b5());
    assert_eq!(b5.num_labels, 150);
    assert_eq!(Config::default(), Config::ade_b5());
    assert_eq!(Config::ade_b5().processor_size, (640, 640));
    // preprocessor_config.json: the hub files' integer `size`, or transformers 5's dict.
    let c = Config::b5().with_preprocessor_json(r#"{"size": 640, "resample": 2}"#);
    assert_eq!(c.unwrap(), Config::ade_b5());
    let c = Config::b0().with_preprocessor_json(r#"{"size": {"height": 96, "width": 64}}"#);
    assert_eq!(c.unwrap().processor_size, (96, 64));
    // transformers' defaults for absent fields (SegformerConfig() is b0; 2 labels).
    let c = Config::from_hf_json(r#"{"model_type": "segformer"}"#).unwrap();
    assert_eq!(c.num_labels, 2);
    assert_eq!(c.hidden_sizes, Config::b0().hidden_sizes);
    // What the network cannot run is refused.
    assert!(Config::from_hf_json(r#"{"hidden_act": "relu"}"#).is_err());
    assert!(Config::from_hf_json(r#"{"depths": [2, 2]}"#).is_err());
    assert!(Config::from_hf_json(r#"{"model_type": "beit"}"#).is_err());
    assert!(Config::from_hf_json("{").is_err());
    // The labels are mmseg's ADE20K classes, in the palette's order.
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("config_b5.json")).unwrap())
            .unwrap();
    assert_eq!(raw["id2label"]["0"], "wall");
    assert_eq!(raw["id2label"]["2"], "sky");
    assert_eq!(raw["id2label"]["149"], "flag");
}

/// A `VarBuilder` backend answering zeros and recording every (name, shape) asked for.
type Seen = Arc<Mutex<Vec<(String, Vec<usize>)>>>;

struct Recording(Seen);

impl SimpleBackend for Recording {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .unwrap()
            .push((name.to_string(), shape.dims().to_vec()));
        Tensor::zeros(shape, dtype, device)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The network reads exactly the tensors transformers loads from a hub checkpoint, with the
/// same shapes (keys_*.txt: checked in the script by loading them with `from_pretrained`).
#[test]
fn reads_exactly_the_hub_keys() {
    for (variant, cfg) in [("b0", Config::b0()), ("b5", Config::b5())] {
        let seen: Seen = Arc::new(Mutex::new(Vec::new()));
        let vb =
            VarBuilder::from_backend(Box::new(Recording(seen.clone())), DType::F32, Device::Cpu);
        Segformer::new(vb, &cfg).unwrap();
        let mut ours: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(n, s)| {
                let dims: Vec<String> = s.iter().map(|d| d.to_string()).collect();
                format!("{n} {}", dims.join("x"))
            })
            .collect();
        ours.sort();
        ours.dedup();
        let theirs: Vec<String> =
            std::fs::read_to_string(dir().join(format!("keys_{variant}.txt")))
                .unwrap()
                .lines()
                .map(String::from)
                .collect();
        assert_eq!(ours.len(), theirs.len(), "{variant}");
        assert_eq!(ours, theirs, "{variant}");
    }
}

/// torch's uint8 antialiased bilinear resize, byte for byte: the stored resizes, and hashes of
/// noise images over up- and downscales of many ratios.
#[test]
fn processor_resize_is_torchs() {
    for case in cases() {
        let name = case["case"].as_str().unwrap();
        let ph = case["processor_height"].as_u64().unwrap() as usize;
        let pw = case["processor_width"].as_u64().unwrap() as usize;
        let input = if name == "photo_512_full" {
            annotators::ops::resize_image(&photo(), 512)
        } else {
            rgb(&format!("{name}_input.png"))
        };
        assert_eq!(
            formula::fnv1a64(input.as_raw()),
            case["input_fnv"].as_u64().unwrap(),
            "{name} input"
        );
        let ours = segformer::processor_resize(&input, ph, pw);
        assert_eq!(
            formula::fnv1a64(ours.as_raw()),
            case["resized_fnv"].as_u64().unwrap(),
            "{name} resized"
        );
        if name != "photo_512_full" {
            assert_eq!(ours, rgb(&format!("{name}_resized.png")), "{name}");
        }
    }
    for r in manifest()["resize"].as_array().unwrap() {
        let g = |k: &str| r[k].as_u64().unwrap() as u32;
        let img = synth(g("in_width"), g("in_height"));
        let ours =
            segformer::processor_resize(&img, g("out_height") as usize, g("out_width") as usize);
        assert_eq!(
            formula::fnv1a64(ours.as_raw()),
            r["fnv"].as_u64().unwrap(),
            "{r}"
        );
    }
}

#[test]
fn pixel_values_are_bit_equal() {
    for case in cases().iter().filter(|c| c["case"] != "photo_512_full") {
        let name = case["case"].as_str().unwrap();
        let ours =
            segformer::pixel_values(&rgb(&format!("{name}_resized.png")), &Device::Cpu).unwrap();
        let theirs = &tensors(name)["pixel_values"];
        assert_eq!(ours.dims(), theirs.dims());
        let (a, b) = (values(&ours), values(theirs));
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name}"
        );
    }
}

/// Post-processing on the reference's own logits reproduces its labels and hint exactly.
#[test]
fn post_processing_is_exact_on_reference_logits() {
    for case in cases().iter().filter(|c| c["case"] != "photo_512_full") {
        let name = case["case"].as_str().unwrap();
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let labels = segformer::labels_from_logits(&tensors(name)["logits"], h, w).unwrap();
        assert_eq!(
            &labels,
            grey(&format!("{name}_labels.png")).as_raw(),
            "{name}"
        );
        let hint = segformer::hint_from_labels(&labels, w, h);
        assert_eq!(hint, rgb(&format!("{name}_hint.png")), "{name}");
    }
}

/// b0 at its real dimensions, formula weights: logits within 1e-4 relative; `detect` end to
/// end within a bound. A hint pixel can differ only where two classes' upsampled logits are
/// within the logits' error (~1e-4 of their range) of each other: a handful of pixels on class
/// boundaries at most (bound 0.5 %).
#[test]
fn b0_matches_reference() {
    let vb = FormulaWeights::var_builder(DType::F32, &Device::Cpu);
    for case in cases() {
        let name = case["case"].as_str().unwrap();
        let full = name == "photo_512_full";
        let cfg = if full {
            Config::b0()
        } else {
            small_case_config(&case)
        };
        let net = Segformer::new(vb.clone(), &cfg).unwrap();
        let img = if full {
            annotators::ops::resize_image(&photo(), 512)
        } else {
            rgb(&format!("{name}_input.png"))
        };
        let (w, h) = (img.width() as usize, img.height() as usize);
        let logits = net.logits(&img).unwrap();
        let shape: Vec<usize> = case["logits_shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(logits.dims(), shape.as_slice(), "{name}");
        if !full {
            let t = tensors(name);
            let e = rel_err(&values(&logits), &values(&t["logits"]));
            println!("{name} logits: rel err {e:.2e}");
            assert!(e < 1e-4, "{name} logits: {e}");
            // forward on the reference's own pixel_values gives the same.
            let e2 = rel_err(
                &values(&net.forward(&t["pixel_values"]).unwrap()),
                &values(&t["logits"]),
            );
            assert!(e2 < 1e-4, "{name} forward: {e2}");
        }
        let labels = segformer::labels_from_logits(&logits, h, w).unwrap();
        let n = differing(&labels, grey(&format!("{name}_labels.png")).as_raw(), 1);
        println!("{name}: {n} of {} labels differ", w * h);
        assert!(n * 200 <= w * h, "{name}: {n} labels differ");
        let hint = net.detect(segformer::PREPROCESSOR, &img, &[]).unwrap();
        assert_eq!(hint, segformer::hint_from_labels(&labels, w, h));
        let n = differing(hint.as_raw(), rgb(&format!("{name}_hint.png")).as_raw(), 3);
        assert!(n * 200 <= w * h, "{name}: {n} hint pixels differ");
    }
    let net = Segformer::new(vb, &Config::b0()).unwrap();
    assert!(net.detect("seg_ofade20k", &photo(), &[]).is_err());
}

/// The hub files: `model.safetensors` (f32, hub key names, with the batch norm's
/// `num_batches_tracked` as i64) and the older `pytorch_model.bin` (a torch zip pickle),
/// loaded through the loader users' files go through, give exactly the direct build's hint.
#[test]
fn loads_from_hub_files() {
    let cfg = Config::b0().with_processor_size(64, 64);
    let direct =
        Segformer::new(FormulaWeights::var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    let img = rgb("shapes_64_p88x60_input.png");
    let expected = direct.detect(segformer::PREPROCESSOR, &img, &[]).unwrap();
    let keys: Vec<(String, Vec<usize>)> = std::fs::read_to_string(dir().join("keys_b0.txt"))
        .unwrap()
        .lines()
        .map(|l| {
            let (k, s) = l.split_once(' ').unwrap();
            (
                k.to_string(),
                s.split('x').map(|d| d.parse().unwrap()).collect(),
            )
        })
        .collect();
    let weights: usize = keys.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let tmp = std::env::temp_dir().join(format!("cns-segformer-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    // model.safetensors
    let mut st = HashMap::new();
    for (k, s) in &keys {
        st.insert(
            k.clone(),
            Tensor::from_vec(formula::values(k, s), s.as_slice(), &Device::Cpu).unwrap(),
        );
    }
    st.insert(
        "decode_head.batch_norm.num_batches_tracked".to_string(),
        Tensor::new(0i64, &Device::Cpu).unwrap(),
    );
    let st_path = tmp.join("model.safetensors");
    candle_core::safetensors::save(&st, &st_path).unwrap();
    // pytorch_model.bin
    let bin_path = tmp.join("pytorch_model.bin");
    let data: Vec<(String, diffusion::torch_pickle::TensorData)> = keys
        .iter()
        .map(|(k, s)| {
            (
                k.clone(),
                diffusion::torch_pickle::TensorData::new(s.clone(), formula::values(k, s)),
            )
        })
        .collect();
    diffusion::torch_pickle::save(&bin_path, &data, Default::default()).unwrap();
    for path in [st_path, bin_path] {
        let file = diffusion::weights::WeightFile::open(&path).unwrap();
        let (vb, bytes) = diffusion::weights::Counting::var_builder(file, DType::F32, &Device::Cpu);
        let net = Segformer::new(vb, &cfg).unwrap();
        assert_eq!(
            bytes.load(std::sync::atomic::Ordering::Relaxed),
            weights * 4,
            "{}",
            path.display()
        );
        let hint = net.detect(segformer::PREPROCESSOR, &img, &[]).unwrap();
        assert!(
            hint == expected,
            "{} differs from the formula weights",
            path.display()
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// f16 on the CPU: logits against the f32 reference within a stated bound.
#[test]
fn f16_logits_within_bound() {
    let case = &cases()[0];
    let name = case["case"].as_str().unwrap();
    let vb = FormulaWeights::var_builder(DType::F16, &Device::Cpu);
    let net = Segformer::new(vb, &small_case_config(case)).unwrap();
    let logits = net
        .logits(&rgb(&format!("{name}_input.png")))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let e = rel_err(&values(&logits), &values(&tensors(name)["logits"]));
    println!("{name} f16 logits: rel err {e:.2e}");
    assert!(e < 2e-2, "{name} f16 logits: {e}");
}
