//! Depth Anything V2 (ViT-S) against transformers' `DepthAnythingForDepthEstimation` (with the
//! original DINOv2 position-embedding interpolation) and A1111's pre/post-processing, on formula
//! weights; fixtures from `tools/parity/neural/make_depth_anything_v2.py` (see its header).
//!
//! * pre-processing: the 518 size rule, and the network input (cubic resize in f64, BGR,
//!   ImageNet normalisation) bit for bit at small lower bounds;
//! * position embeddings: the resampled grid within 1e-5 relative, the 37×37 one unchanged;
//! * network outputs in f32 within 1e-4 relative, at 70×98 and 42×56 inputs;
//! * post-processing on the reference's own maps: byte-equal hints;
//! * `detect` end to end at the real 518 input size (ViT-S);
//! * the real file layout (`depth_anything_v2_vits.pth`, zip; and `.safetensors`) through the
//!   loader gives the same network.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use diffusion::torch_pickle::{save, Format, SaveOptions, StorageDtype, TensorData};
use image::{GrayImage, RgbImage};
use neural_annotators::depth_anything_v2::{self as da, Config, DepthAnythingV2};
use neural_annotators::formula::{self, FormulaWeights};
use neural_annotators::Detector;

/// (case, input image, lower bound, hint sizes (w, h)).
type Case = (&'static str, &'static str, usize, &'static [(usize, usize)]);
const CASES: [Case; 2] = [
    (
        "photo_70",
        "in_photo_96x128.png",
        70,
        &[(128, 96), (98, 70), (37, 50)],
    ),
    (
        "shapes_42",
        "in_shapes_64x80.png",
        42,
        &[(80, 64), (31, 23)],
    ),
];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/depth_anything_v2")
}

fn original(file: &str) -> RgbImage {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../annotators/tests/fixtures")
        .join(file);
    image::open(p).unwrap().to_rgb8()
}

fn grey(file: &str) -> GrayImage {
    image::open(dir().join(file)).unwrap().to_luma8()
}

fn tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(format!("{name}.safetensors")), &Device::Cpu).unwrap()
}

fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap()).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
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

fn mismatches(a: &GrayImage, b: &GrayImage) -> usize {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .filter(|(x, y)| x != y)
        .count()
}

fn vits(dtype: DType) -> DepthAnythingV2 {
    DepthAnythingV2::new(
        FormulaWeights::var_builder(dtype, &Device::Cpu),
        &Config::vits(),
    )
    .unwrap()
}

/// ViT-S on formula weights in f32, built once for the tests that share it.
fn vits_f32() -> &'static DepthAnythingV2 {
    static NET: OnceLock<DepthAnythingV2> = OnceLock::new();
    NET.get_or_init(|| vits(DType::F32))
}

#[test]
fn configs_by_file_name() {
    assert_eq!(
        Config::from_file_name("depth_anything_v2_vits.pth"),
        Some(Config::vits())
    );
    assert_eq!(
        Config::from_file_name("depth_anything_v2_vitb.safetensors"),
        Some(Config::vitb())
    );
    assert_eq!(
        Config::from_file_name("depth_anything_v2_vitl.pth"),
        Some(Config::vitl())
    );
    assert_eq!(Config::from_file_name("depth_anything_v2_vitg.pth"), None);
    assert_eq!(Config::from_file_name("depth_anything_vitl14.pth"), None);
    assert_eq!(Config::default(), Config::vitl());
}

/// The 518 size rule on a spread of sizes (the reference's `Resize.get_size`).
#[test]
fn target_size_matches_reference() {
    for row in manifest()["sizes_518"].as_array().unwrap() {
        let v: Vec<usize> = row
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(
            da::target_size(v[0], v[1], 518),
            (v[2], v[3]),
            "{}x{}",
            v[0],
            v[1]
        );
    }
}

/// The network input (BGR, cubic resize in f64, ImageNet normalisation, f32) bit for bit.
#[test]
fn network_input_is_exact() {
    for (case, file, lb, _) in CASES {
        let (ours, w, h) = da::network_input(&original(file), lb);
        let theirs = &tensors(case)["input"];
        assert_eq!(theirs.dims4().unwrap(), (1, 3, h, w), "{case}");
        let theirs = flat(theirs);
        let n = ours
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        println!("{case}: {n} of {} input values differ", ours.len());
        assert_eq!(n, 0, "{case}");
    }
}

/// The position embeddings: resampled with the original's `(g + 0.1)/37` scale factors (first
/// 8 channels stored), unchanged for a 518×518 input.
#[test]
fn position_embeddings_match_reference() {
    let net = vits_f32();
    let grids = tensors("pos_embed");
    let raw = flat(
        &FormulaWeights::var_builder(DType::F32, &Device::Cpu)
            .get((1, 37 * 37 + 1, 384), "pretrained.pos_embed")
            .unwrap(),
    );
    for row in manifest()["pos_grids"].as_array().unwrap() {
        let (h, w) = (
            row[0].as_u64().unwrap() as usize,
            row[1].as_u64().unwrap() as usize,
        );
        let ours = net.position_embeddings(h, w).unwrap();
        let n = (h / 14) * (w / 14);
        assert_eq!(ours.dims3().unwrap(), (1, 1 + n, 384));
        let patch = flat(&ours.narrow(1, 1, n).unwrap().narrow(2, 0, 8).unwrap());
        let theirs = flat(&grids[&format!("pos_{h}x{w}")]);
        let e = rel_err(&patch, &theirs);
        println!("pos {h}x{w}: rel err {e:.2e}");
        if h == 518 && w == 518 {
            assert_eq!(flat(&ours), raw, "518x518 keeps the trained grid");
        } else {
            assert!(e < 1e-5, "pos {h}x{w}: {e}");
        }
        // The class token's embedding is never resampled.
        assert_eq!(flat(&ours.narrow(1, 0, 1).unwrap()), raw[..384].to_vec());
    }
}

/// Network outputs in f32 within 1e-4 relative: the four token maps, the head's pre-ReLU map
/// (`logits`; on formula weights the final ReLU zeroes most of `depth`) and the depth.
#[test]
fn network_matches_reference() {
    let net = vits_f32();
    for (case, _, _, _) in CASES {
        let t = tensors(case);
        let x = &t["input"];
        let features = net.features(x).unwrap();
        for (i, f) in features.iter().enumerate() {
            let e = rel_err(&flat(f), &flat(&t[&format!("feature.{i}")]));
            println!("{case} feature.{i}: rel err {e:.2e}");
            assert!(e < 1e-4, "{case} feature.{i}: {e}");
        }
        let logits = net.forward_logits(x).unwrap();
        assert_eq!(logits.dims(), t["logits"].dims());
        let e = rel_err(&flat(&logits), &flat(&t["logits"]));
        println!("{case} logits: rel err {e:.2e}");
        assert!(e < 1e-4, "{case} logits: {e}");
        let depth = net.forward(x).unwrap();
        let e = rel_err(&flat(&depth), &flat(&t["depth"]));
        println!("{case} depth: rel err {e:.2e}");
        assert!(e < 1e-4, "{case} depth: {e}");
    }
}

/// Post-processing on the reference's own float maps (its depth, and its pre-ReLU map, whose
/// full range gives hints with every grey level) reproduces its hints byte for byte.
#[test]
fn post_processing_is_exact_on_reference_maps() {
    for (case, _, _, sizes) in CASES {
        let t = tensors(case);
        for map in ["depth", "logits"] {
            let (_, dh, dw) = t[map].dims3().unwrap();
            let data = flat(&t[map]);
            for &(w, h) in sizes {
                let ours = da::hint_from_depth(&data, dw, dh, w, h);
                let theirs = grey(&format!("{case}_{map}_{w}x{h}.png"));
                assert_eq!(mismatches(&ours, &theirs), 0, "{case} {map} {w}x{h}");
            }
        }
    }
    // A constant map: 0/0, which numpy casts to 0.
    let flat_map = da::hint_from_depth(&[2.0; 12], 4, 3, 5, 7);
    assert!(flat_map.as_raw().iter().all(|&v| v == 0));
}

/// `detect` end to end at the real input size (the 128×128 photo → a 518×518 network input, the
/// cheapest real one; it keeps the trained position grid), against A1111's whole call. A pixel can differ only where our map and the reference's
/// straddle a `u8` truncation step (the maps agree within ~1e-5 of their range).
#[test]
fn detect_matches_reference_end_to_end() {
    let net = vits_f32();
    let img = original("in_photo_128x128.png");
    let hint = net.detect(da::PREPROCESSOR, &img, &[]).unwrap();
    assert_eq!(hint.dimensions(), img.dimensions());
    assert!(hint.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
    let ours = GrayImage::from_fn(hint.width(), hint.height(), |x, y| {
        image::Luma([hint.get_pixel(x, y).0[0]])
    });
    let theirs = grey("e2e_photo.png");
    let n = mismatches(&ours, &theirs);
    let max = ours
        .as_raw()
        .iter()
        .zip(theirs.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(max <= 1, "a hint pixel is {max} grey levels off");
    let total = (img.width() * img.height()) as usize;
    println!("detect end to end: {n} of {total} pixels differ");
    assert!(n * 1000 <= total, "{n} pixels differ");
    assert!(net.detect("depth_midas", &img, &[]).is_err());
}

/// Records the name and shape of every tensor the network reads.
type Seen = Arc<Mutex<Vec<(String, Vec<usize>)>>>;
struct Recording(Seen);

impl SimpleBackend for Recording {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .unwrap()
            .push((name.to_string(), shape.dims().to_vec()));
        FormulaWeights.get(shape, name, init, dtype, device)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The formula weights as the released file holds them: every tensor the network reads plus
/// the ones it does not (`pretrained.mask_token`, refinenet4's `resConfUnit1`).
fn file_state(cfg: &Config) -> Vec<(String, TensorData)> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let vb = VarBuilder::from_backend(Box::new(Recording(seen.clone())), DType::F32, Device::Cpu);
    DepthAnythingV2::new(vb, cfg).unwrap();
    let mut names = seen.lock().unwrap().clone();
    let f = cfg.features;
    names.push(("pretrained.mask_token".into(), vec![1, cfg.embed_dim]));
    for k in ["conv1", "conv2"] {
        let p = format!("depth_head.scratch.refinenet4.resConfUnit1.{k}");
        names.push((format!("{p}.weight"), vec![f, f, 3, 3]));
        names.push((format!("{p}.bias"), vec![f]));
    }
    names
        .into_iter()
        .map(|(n, s)| {
            let v = formula::values(&n, &s);
            (n, TensorData::new(s, v))
        })
        .collect()
}

/// The released layout (`depth_anything_v2_vits.pth`: a torch zip of the plain state dict, f32,
/// no prefix) and its safetensors conversion load through the users' loader and give what the
/// formula weights give when built directly.
#[test]
fn loads_from_the_real_file_layouts() {
    let cfg = Config::vits();
    let dir = std::env::temp_dir().join(format!("cns-depth-anything-v2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let state = file_state(&cfg);
    let pth = dir.join("depth_anything_v2_vits.pth");
    let opts = SaveOptions {
        format: Format::Zip,
        dtype: StorageDtype::F32,
        nest: vec![],
        prefix: String::new(),
    };
    save(&pth, &state, opts).unwrap();
    let st = dir.join("depth_anything_v2_vits.safetensors");
    let map: HashMap<String, Tensor> = state
        .iter()
        .map(|(n, d)| {
            let t = Tensor::from_vec(d.values.clone(), d.shape.clone(), &Device::Cpu).unwrap();
            (n.clone(), t)
        })
        .collect();
    candle_core::safetensors::save(&map, &st).unwrap();

    let x = &tensors("shapes_42")["input"];
    let expected = flat(&vits_f32().forward_logits(x).unwrap());
    let read: usize = state
        .iter()
        .filter(|(n, _)| !n.contains("mask_token") && !n.contains("refinenet4.resConfUnit1"))
        .map(|(_, d)| d.values.len())
        .sum();
    for path in [&pth, &st] {
        let name = path.file_name().unwrap().to_str().unwrap();
        let cfg = Config::from_file_name(name).unwrap();
        let file = diffusion::weights::WeightFile::open(path).unwrap();
        let (vb, bytes) = diffusion::weights::Counting::var_builder(file, DType::F32, &Device::Cpu);
        let net = DepthAnythingV2::new(vb, &cfg).unwrap();
        assert_eq!(
            bytes.load(std::sync::atomic::Ordering::Relaxed),
            read * 4,
            "{name}: bytes loaded"
        );
        let got = flat(&net.forward_logits(x).unwrap());
        assert!(got == expected, "{name} differs from the formula weights");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// f16 on the CPU: the network's pre-ReLU map against the f32 reference.
#[test]
fn f16_network_within_bound() {
    let net = vits(DType::F16);
    let t = tensors("shapes_42");
    let x = t["input"].to_dtype(DType::F16).unwrap();
    let e = rel_err(&flat(&net.forward_logits(&x).unwrap()), &flat(&t["logits"]));
    println!("f16 logits: rel err {e:.2e}");
    assert!(e < 2e-2, "f16 logits: {e}");
}
