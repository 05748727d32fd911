//! M-LSD parity with controlnet_aux 0.0.10 on formula weights. Fixtures:
//! `tools/parity/neural/make_mlsd.py` → `tests/fixtures/mlsd/` (see that script's header).
use std::collections::HashMap;
use std::path::PathBuf;

use annotators::lines::draw_line;
use candle_core::{DType, Device, Tensor};
use image::{GrayImage, Luma, RgbImage};
use neural_annotators::formula::FormulaWeights;
use neural_annotators::mlsd::{self, Mlsd};
use neural_annotators::Detector;
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mlsd")
}

fn fixtures() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("mlsd.safetensors"), &Device::Cpu).unwrap()
}

fn meta() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("meta.json")).unwrap()).unwrap()
}

fn rgb(name: &str) -> RgbImage {
    image::open(dir().join(name)).unwrap().to_rgb8()
}

fn gray(name: &str) -> GrayImage {
    image::open(dir().join(name)).unwrap().to_luma8()
}

fn net(dtype: DType) -> Mlsd {
    Mlsd::new(FormulaWeights::var_builder(dtype, &Device::Cpu)).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max|a − b| / max|b|.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (flat(a), flat(b));
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    d / b.iter().map(|y| y.abs()).fold(0f32, f32::max)
}

fn channel0(img: &RgbImage) -> GrayImage {
    let g = GrayImage::from_fn(img.width(), img.height(), |x, y| {
        Luma([img.get_pixel(x, y)[0]])
    });
    for p in img.pixels() {
        assert!(p[0] == p[1] && p[1] == p[2], "hint not gray");
    }
    g
}

fn diff_pixels(a: &GrayImage, b: &GrayImage) -> usize {
    assert_eq!(a.dimensions(), b.dimensions());
    a.pixels().zip(b.pixels()).filter(|(x, y)| x != y).count()
}

fn lines_of(fx: &HashMap<String, Tensor>, case: &str) -> Option<Vec<[f64; 4]>> {
    let t = fx.get(&format!("lines_{case}"))?;
    let v: Vec<Vec<f64>> = t.to_vec2().unwrap();
    Some(v.into_iter().map(|r| [r[0], r[1], r[2], r[3]]).collect())
}

#[test]
fn input_tensor_is_exact() {
    let fx = fixtures();
    for name in ["photo", "shapes"] {
        let x = mlsd::input_tensor(&rgb(&format!("{name}.png")), &Device::Cpu).unwrap();
        let r = &fx[&format!("input_{name}")];
        assert_eq!(x.dims(), r.dims());
        assert_eq!(flat(&x), flat(r), "{name}");
    }
}

/// (1) The network in f32 against the reference map: max|Δ| / max|ref| ≤ 1e-4.
#[test]
fn network_f32_matches_reference() {
    let fx = fixtures();
    let m = net(DType::F32);
    for name in ["photo", "shapes"] {
        let y = m.forward(&fx[&format!("input_{name}")]).unwrap();
        let r = rel(&y, &fx[&format!("map_{name}")]);
        println!("mlsd f32 {name}: max|Δ|/max|ref| = {r:.3e}");
        assert!(r <= 1e-4, "{name}: {r}");
    }
}

/// (5) f16 on the CPU: the same weights and input rounded to f16; every activation is rounded
/// to f16 (~5e-4 relative) through 30 layers, so the bound is 1e-2 of the map's range.
#[test]
fn network_f16_cpu_bound() {
    let fx = fixtures();
    let m = net(DType::F16);
    for name in ["photo", "shapes"] {
        let x = fx[&format!("input_{name}")].to_dtype(DType::F16).unwrap();
        let y = m.forward(&x).unwrap();
        assert_eq!(y.dtype(), DType::F16);
        let r = rel(&y, &fx[&format!("map_{name}")]);
        println!("mlsd f16 {name}: max|Δ|/max|ref| = {r:.3e}");
        assert!(r <= 1e-2, "{name}: {r}");
    }
}

/// (2) Decoding and drawing fed the reference's own maps: the same segments (bit for bit, in
/// the same order) and the same hint, byte for byte.
#[test]
fn decode_and_draw_exact_on_reference_maps() {
    let fx = fixtures();
    let meta = meta();
    let mut checked = 0;
    for case in meta["cases"].as_array().unwrap() {
        let name = case["case"].as_str().unwrap();
        let map = if let Some(img) = case.get("image") {
            fx[&format!("map_{}", img.as_str().unwrap())].clone()
        } else {
            fx[&format!("craft_{}", case["map"].as_str().unwrap())].clone()
        };
        let (thr_v, thr_d) = (
            case["thr_v"].as_f64().unwrap(),
            case["thr_d"].as_f64().unwrap(),
        );
        let got = mlsd::decode_lines(&map, thr_v, thr_d)
            .unwrap()
            .expect("map ≥ 200 px");
        match lines_of(&fx, name) {
            Some(want) => assert_eq!(got, want, "{name}: segments"),
            // pred_lines raised on the empty segment list
            None => assert!(got.is_empty(), "{name}: expected no segments"),
        }
        let want = gray(&format!("hint_{name}.png"));
        let (_, _, h, w) = map.dims4().unwrap();
        let hint = mlsd::draw_hint(2 * w as u32, 2 * h as u32, &got);
        assert_eq!(diff_pixels(&channel0(&hint), &want), 0, "{name}: hint");
        checked += 1;
        println!("{name}: {} segments, exact", got.len());
    }
    assert_eq!(checked, 11);
}

/// torch.topk's order of equal values, for both of its algorithms.
#[test]
fn topk_tie_order_matches_torch() {
    let fx = fixtures();
    for n in [3000usize, 20000] {
        let v: Vec<f32> = (0..n as u64)
            .map(|i| (i.wrapping_mul(0x9E3779B97F4A7C15) >> 60) as f32)
            .collect();
        let want: Vec<i64> = fx[&format!("topk_{n}")].to_vec1().unwrap();
        let got: Vec<i64> = mlsd::topk_indices(&v, 200)
            .unwrap()
            .into_iter()
            .map(|i| i as i64)
            .collect();
        assert_eq!(got, want, "n = {n}");
    }
}

/// (3) `cv2.line(img, p0, p1, 255, 1)` on a table of segments: steep, shallow, reversed,
/// off-image, zero-length, int32 extremes, random.
#[test]
fn cv2_line_exact() {
    let fx = fixtures();
    for s in ["a", "b"] {
        let imgs = &fx[&format!("cvline_{s}")];
        let (n, h, w) = imgs.dims3().unwrap();
        let imgs: Vec<u8> = imgs.flatten_all().unwrap().to_vec1().unwrap();
        let pts: Vec<Vec<i64>> = fx[&format!("cvline_{s}_pts")].to_vec2().unwrap();
        for (k, p) in pts.iter().enumerate() {
            let mut img = GrayImage::new(w as u32, h as u32);
            draw_line(
                &mut img,
                (p[0] as i32, p[1] as i32),
                (p[2] as i32, p[3] as i32),
                Luma([255]),
            );
            let want = &imgs[k * h * w..(k + 1) * h * w];
            assert_eq!(img.as_raw().as_slice(), want, "table {s} row {k}: {p:?}");
        }
        println!("cv2.line table {s}: {n} segments exact on {w}x{h}");
    }
}

/// (4) End to end on the formula network in f32: detect() against the reference's hint.
/// The map differs from torch's by ≤ 1e-4 of its range, so a segment can differ only where a
/// coordinate sits within that of an integer (int() truncation) or a score/distance within it
/// of a threshold; the fixtures have none, and the hints are expected equal.
#[test]
fn detect_end_to_end() {
    let meta = meta();
    let m = net(DType::F32);
    for case in meta["cases"].as_array().unwrap() {
        let Some(img) = case.get("image") else {
            continue;
        };
        let name = case["case"].as_str().unwrap();
        let params = [
            case["thr_v"].as_f64().unwrap(),
            case["thr_d"].as_f64().unwrap(),
        ];
        let hint = m
            .detect(
                "mlsd",
                &rgb(&format!("{}.png", img.as_str().unwrap())),
                &params,
            )
            .unwrap();
        let want = gray(&format!("hint_{name}.png"));
        let d = diff_pixels(&channel0(&hint), &want);
        println!(
            "detect {name}: {d} of {} pixels differ ({} lit in the reference)",
            want.len(),
            case["lit_pixels"]
        );
        assert_eq!(d, 0, "{name}");
    }
    // Sizes the reference cannot run: black, as controlnet_aux's try/except returns.
    let photo = rgb("photo.png");
    for s in meta["black_sizes"].as_array().unwrap() {
        let (h, w) = (s[0].as_u64().unwrap() as u32, s[1].as_u64().unwrap() as u32);
        let img = image::imageops::resize(&photo, w, h, image::imageops::FilterType::Triangle);
        let hint = m.detect("mlsd", &img, &[1e-30, 0.0]).unwrap();
        assert_eq!(hint.dimensions(), (w, h));
        assert!(hint.pixels().all(|p| p.0 == [0, 0, 0]), "{w}x{h} not black");
    }
}

/// The decoder's sigmoid is torch's CPU kernel bit for bit.
#[test]
fn sigmoid_bit_exact() {
    let fx = fixtures();
    let x: Vec<f32> = fx["sigmoid_x"].to_vec1().unwrap();
    let y: Vec<f32> = fx["sigmoid_y"].to_vec1().unwrap();
    let bad = x
        .iter()
        .zip(&y)
        .filter(|(x, y)| mlsd::sigmoid_f32(**x).to_bits() != y.to_bits())
        .count();
    assert_eq!(bad, 0, "{bad} of {} differ", x.len());
    assert_eq!(mlsd::sigmoid_f32(0.0), 0.5);
    assert_eq!(mlsd::sigmoid_f32(30.0), 1.0);
    assert_eq!(mlsd::sigmoid_f32(-200.0), 0.0);
    assert!(mlsd::sigmoid_f32(f32::NAN).is_nan());
}

#[test]
fn compatible_sizes_and_small_maps() {
    assert!(mlsd::input_compatible(64, 80));
    assert!(mlsd::input_compatible(96, 128));
    assert!(mlsd::input_compatible(33, 64));
    assert!(mlsd::input_compatible(512, 768));
    assert!(!mlsd::input_compatible(72, 80));
    assert!(!mlsd::input_compatible(16, 16)); // 8×8 map < 200 pixels
    assert!(!mlsd::input_compatible(8, 512));
    // topk on fewer than 200 pixels raises in torch: decode gives None
    let map = Tensor::zeros((1, 9, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(mlsd::decode_lines(&map, 0.1, 0.1).unwrap(), None);
    assert!(mlsd::topk_indices(&[1.0; 10], 200).is_none());
    let v: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32).collect();
    let top: Vec<f32> = mlsd::topk_indices(&v, 5)
        .unwrap()
        .iter()
        .map(|&i| v[i])
        .collect();
    assert_eq!(top, vec![999.0, 998.0, 997.0, 996.0, 995.0]);
    // a segment OpenCV rejects stops the drawing; earlier ones stay
    let hint = mlsd::draw_hint(
        8,
        8,
        &[
            [0.0, 0.0, 7.9, 0.0],
            [3e9, 1.0, 2.0, 2.0],
            [0.0, 5.0, 7.0, 5.0],
        ],
    );
    let lit = hint.pixels().filter(|p| p.0 == [255, 255, 255]).count();
    assert_eq!(lit, 8);
    // any other preprocessor name is an error
    let m = net(DType::F32);
    assert!(m.detect("hed", &RgbImage::new(64, 64), &[]).is_err());
}
