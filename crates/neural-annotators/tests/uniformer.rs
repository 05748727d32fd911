//! UniFormer + UPerNet (`seg_ufade20k`) against the torch reference of
//! `tools/parity/neural/make_uniformer.py` on formula weights (see its header for the fixtures):
//!
//! * network outputs in f32 (max|Δ| / max|ref|) within 1e-5 (the issue asks 1e-4; measured
//!   ≤ 2.2e-6, and 1e-5 also catches a wrong LayerNorm ε, which 1e-4 lets through on formula
//!   weights): the real configuration (`Config::small`) fed a 48×72 input directly, and
//!   `Config::tiny`;
//! * pre-processing (the rescale rule, cv2's bilinear resize, the normalization) exact;
//! * post-processing fed the reference's own logits: byte-equal label maps and hints, and the
//!   palette colouring equal to the reference's `show_result` for every class;
//! * `detect` end to end on `Config::tiny` (img_scale (192, 48)): down-, up- and no rescale;
//! * the real file layout (mmcv checkpoint `{'meta', 'state_dict'}` with the auxiliary head and
//!   `num_batches_tracked`), written by torch and by our writer, loads through the weight loader
//!   and gives exactly the direct build's output.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use diffusion::torch_pickle::{save, Format, SaveOptions, StorageDtype, TensorData};
use diffusion::weights::{Counting, WeightFile};
use image::{GrayImage, RgbImage};
use neural_annotators::formula::{self, FormulaWeights};
use neural_annotators::uniformer::{self, Config, Uniformer};
use neural_annotators::{ade20k, Detector};

const CASES: [&str; 4] = ["photo_96x128", "shapes_30x38", "shapes_48x60", "wide_16x80"];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/uniformer")
}

fn rgb(name: &str) -> RgbImage {
    image::open(dir().join(name)).unwrap().to_rgb8()
}

fn grey(name: &str) -> GrayImage {
    image::open(dir().join(name)).unwrap().to_luma8()
}

fn tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(name), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// max|a - b| / max|b|, after checking the shapes agree.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (values(a), values(b));
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    d / b.iter().map(|v| v.abs()).fold(0f32, f32::max)
}

fn mismatches(a: &[u8], b: &[u8]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

fn net(cfg: &Config) -> Uniformer {
    Uniformer::new(FormulaWeights::var_builder(DType::F32, &Device::Cpu), cfg).unwrap()
}

fn check_net(net: &Uniformer, fixture: &str) -> Tensor {
    let t = tensors(fixture);
    let x = &t["x"];
    let feats = net.features(x).unwrap();
    for (i, f) in feats.iter().enumerate() {
        if let Some(r) = t.get(&format!("feat{i}")) {
            let e = rel_err(f, r);
            println!("{fixture} feat{i}: rel err {e:.2e}");
            assert!(e < 1e-5, "{fixture} feat{i}: {e}");
        }
    }
    let logits = net.forward(x).unwrap();
    let e = rel_err(&logits, &t["logits"]);
    println!("{fixture} logits {:?}: rel err {e:.2e}", logits.dims());
    assert!(e < 1e-5, "{fixture} logits: {e}");
    logits
}

/// (name, shape) of each tensor asked for.
type Seen = Arc<Mutex<Vec<(String, Vec<usize>)>>>;

/// A weight source that hands out formula values and records every tensor it was asked for.
#[derive(Clone, Default)]
struct Recording {
    seen: Seen,
}

impl SimpleBackend for Recording {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .unwrap()
            .push((name.to_string(), shape.dims().to_vec()));
        FormulaWeights.get(shape, name, init, dtype, device)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("formula weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// The real configuration, fed directly; then the same formula weights written as the real
/// file (`upernet_global_small.pth`: zip, f32, `{'state_dict': …}` with the auxiliary FCN head's
/// tensors too) and loaded through the weight loader give the same logits, reading every
/// backbone and decode-head tensor and nothing of the auxiliary head.
#[test]
fn small_matches_reference_and_loads_from_the_real_layout() {
    let cfg = Config::small();
    let rec = Recording::default();
    let direct = Uniformer::new(
        VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu),
        &cfg,
    )
    .unwrap();
    let logits = check_net(&direct, "net_small.safetensors");

    let mut names: Vec<(String, Vec<usize>)> = Vec::new();
    for (n, s) in rec.seen.lock().unwrap().iter() {
        if !names.iter().any(|(m, _)| m == n) {
            names.push((n.clone(), s.clone()));
        }
    }
    let read: usize = names.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    // 51.5 M parameters in the real file, of which the auxiliary head holds 0.78 M.
    assert!(
        (50_000_000..51_000_000).contains(&read),
        "{read} parameters"
    );
    assert!(names
        .iter()
        .all(|(n, _)| n.starts_with("backbone.") || n.starts_with("decode_head.")));
    let aux = [
        ("auxiliary_head.convs.0.conv.weight", vec![256, 320, 3, 3]),
        ("auxiliary_head.convs.0.bn.weight", vec![256]),
        ("auxiliary_head.convs.0.bn.bias", vec![256]),
        ("auxiliary_head.convs.0.bn.running_mean", vec![256]),
        ("auxiliary_head.convs.0.bn.running_var", vec![256]),
        ("auxiliary_head.conv_seg.weight", vec![150, 256, 1, 1]),
        ("auxiliary_head.conv_seg.bias", vec![150]),
    ];
    let mut state: Vec<(String, TensorData)> = names
        .iter()
        .map(|(n, s)| (n.clone(), TensorData::new(s.clone(), formula::values(n, s))))
        .collect();
    for (n, s) in aux {
        state.push((
            n.to_string(),
            TensorData::new(s.clone(), formula::values(n, &s)),
        ));
    }
    let tmp = std::env::temp_dir().join(format!("cns-uniformer-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let path = tmp.join("upernet_global_small.pth");
    let opts = SaveOptions {
        format: Format::Zip,
        dtype: StorageDtype::F32,
        nest: vec!["state_dict".into()],
        prefix: String::new(),
    };
    save(&path, &state, opts).unwrap();
    drop(state);
    let file = WeightFile::open(&path).unwrap();
    let (vb, bytes) = Counting::var_builder(file, DType::F32, &Device::Cpu);
    let loaded = Uniformer::new(vb, &cfg).unwrap();
    let _ = std::fs::remove_dir_all(&tmp);
    assert_eq!(bytes.load(std::sync::atomic::Ordering::Relaxed), read * 4);
    let x = &tensors("net_small.safetensors")["x"];
    let again = loaded.forward(x).unwrap();
    assert_eq!(values(&again), values(&logits));
}

#[test]
fn tiny_matches_reference() {
    check_net(&net(&Config::tiny()), "net_tiny.safetensors");
}

/// `tiny_layout.pth`, written by torch.save as mmcv's `save_checkpoint` writes the real file
/// (`meta` with strings, tuples, lists and a numpy scalar; `state_dict` with the auxiliary head
/// and int64 `num_batches_tracked`), loads through the weight loader into what the formula
/// gives directly, reading exactly the backbone's and decode head's float tensors.
#[test]
fn torch_written_checkpoint_layout_loads() {
    let cfg = Config::tiny();
    let rec = Recording::default();
    let direct = Uniformer::new(
        VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu),
        &cfg,
    )
    .unwrap();
    let file = WeightFile::open(&dir().join("tiny_layout.pth")).unwrap();
    let keys = file.keys();
    assert!(keys.iter().any(|k| k.starts_with("auxiliary_head.")));
    assert!(keys.iter().any(|k| k.ends_with("num_batches_tracked")));
    let (vb, bytes) = Counting::var_builder(file, DType::F32, &Device::Cpu);
    let loaded = Uniformer::new(vb, &cfg).unwrap();
    let mut seen = rec.seen.lock().unwrap().clone();
    seen.sort();
    seen.dedup();
    let read: usize = seen.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(bytes.load(std::sync::atomic::Ordering::Relaxed), read * 4);
    let x = &tensors("net_tiny.safetensors")["x"];
    assert_eq!(
        values(&loaded.forward(x).unwrap()),
        values(&direct.forward(x).unwrap())
    );
}

/// The rescale rule at the real img_scale, against the sizes the reference computed.
#[test]
fn rescale_sizes_match_reference() {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap())
            .unwrap();
    let resizes = m["resizes"].as_array().unwrap();
    assert!(resizes.len() >= 9);
    for r in resizes {
        let f = |k: &str, i: usize| r[k][i].as_u64().unwrap() as usize;
        let got = uniformer::rescale_size(f("from", 0), f("from", 1), (2048, 512));
        assert_eq!(got, (f("to", 0), f("to", 1)), "{r}");
    }
}

/// `cv2.resize(INTER_LINEAR)` bit for bit: up, down, non-integer factors, both axes.
#[test]
fn bilinear_resize_matches_cv2() {
    let src = image::open(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../annotators/tests/fixtures/in_photo_96x128.png"),
    )
    .unwrap()
    .to_rgb8();
    for (w, h) in [(48, 64), (130, 100), (37, 200), (96, 128)] {
        let ours = uniformer::resize_bilinear_cv(&src, w, h);
        let theirs = rgb(&format!("resize_{w}x{h}.png"));
        let n = mismatches(ours.as_raw(), theirs.as_raw());
        assert_eq!(n, 0, "{w}x{h}: {n} bytes differ");
    }
}

/// Steps 1–2 (rescale, resize, normalize) give the reference's network input bit for bit.
#[test]
fn preprocessing_is_exact() {
    let cfg = Config::tiny();
    for case in ["photo_96x128", "shapes_30x38"] {
        let img = rgb(&format!("{case}_input.png"));
        let (w, h) = (img.width() as usize, img.height() as usize);
        let (nw, nh) = uniformer::rescale_size(w, h, cfg.img_scale);
        let resized = uniformer::resize_bilinear_cv(&img, nw, nh);
        let x = uniformer::input_tensor(&resized, &Device::Cpu, DType::F32).unwrap();
        let r = &tensors(&format!("{case}.safetensors"))["x"];
        assert_eq!(x.dims(), r.dims(), "{case}");
        assert_eq!(values(&x), values(r), "{case}");
    }
}

/// Steps 4–5 fed the reference's logits: its label maps and hints, byte for byte.
#[test]
fn post_processing_is_exact_on_reference_logits() {
    let cfg = Config::tiny();
    for case in CASES {
        let img = rgb(&format!("{case}_input.png"));
        let (w, h) = (img.width() as usize, img.height() as usize);
        let (nw, nh) = uniformer::rescale_size(w, h, cfg.img_scale);
        let logits = &tensors(&format!("{case}.safetensors"))["logits"];
        let labels = uniformer::labels_from_logits(logits, (nh, nw), (h, w)).unwrap();
        let theirs = grey(&format!("{case}_labels.png"));
        assert_eq!(mismatches(&labels, theirs.as_raw()), 0, "{case} labels");
        let hint = ade20k::colorize(&labels, w, h);
        assert_eq!(hint, rgb(&format!("{case}_hint.png")), "{case} hint");
    }
}

/// The reference's colouring (palette, BGR flip, opacity-1 blend, flip back) of every class id
/// equals `ade20k::colorize`: the hint is `PALETTE[label]` in RGB, no channel swap.
#[test]
fn palette_colouring_matches_reference() {
    let labels = grey("palette_labels.png");
    let distinct: std::collections::BTreeSet<u8> = labels.as_raw().iter().copied().collect();
    assert_eq!(distinct.len(), 150);
    let (w, h) = labels.dimensions();
    let ours = ade20k::colorize(labels.as_raw(), w as usize, h as usize);
    assert_eq!(ours, rgb("palette_hint.png"));
}

/// `detect` end to end on `Config::tiny`: the network's logits within 1e-5 of the reference's,
/// then the labels and the hint. A label can differ only where the reference's two best classes
/// are within the logits' error of each other (none do on these cases; bound: 0.5 % of pixels).
#[test]
fn detect_matches_reference() {
    let net = net(&Config::tiny());
    for case in CASES {
        let img = rgb(&format!("{case}_input.png"));
        let (w, h) = (img.width() as usize, img.height() as usize);
        let (nw, nh) = uniformer::rescale_size(w, h, net.config().img_scale);
        let resized = uniformer::resize_bilinear_cv(&img, nw, nh);
        let x = uniformer::input_tensor(&resized, &Device::Cpu, DType::F32).unwrap();
        let logits = net.forward(&x).unwrap();
        let e = rel_err(&logits, &tensors(&format!("{case}.safetensors"))["logits"]);
        println!("{case} logits: rel err {e:.2e}");
        assert!(e < 1e-5, "{case} logits: {e}");
        let labels = net.labels(&img).unwrap();
        let n = mismatches(&labels, grey(&format!("{case}_labels.png")).as_raw());
        println!("{case}: {n} of {} labels differ", w * h);
        assert!(n * 200 <= w * h, "{case}: {n} labels differ");
        let hint = net.detect("seg_ufade20k", &img, &[]).unwrap();
        assert_eq!(hint, ade20k::colorize(&labels, w, h));
        assert_eq!(hint.dimensions(), img.dimensions());
    }
    assert!(net
        .detect("seg_ofade20k", &rgb("photo_96x128_input.png"), &[])
        .is_err());
}

/// f16 on the CPU: the tiny network's logits against the f32 reference.
#[test]
fn f16_network_within_bound() {
    let net = Uniformer::new(
        FormulaWeights::var_builder(DType::F16, &Device::Cpu),
        &Config::tiny(),
    )
    .unwrap();
    let t = tensors("net_tiny.safetensors");
    let x = t["x"].to_dtype(DType::F16).unwrap();
    let e = rel_err(&net.forward(&x).unwrap(), &t["logits"]);
    println!("f16 tiny logits: rel err {e:.2e}");
    assert!(e < 2e-2, "f16 tiny logits: {e}");
}
