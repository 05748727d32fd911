//! `neural_annotators::tensor_ops` against torch: every case of
//! `tools/parity/neural/make_tensor_ops.py` (bilinear and bicubic resizes by size and by scale
//! factor, both `align_corners`; adaptive average pooling; reflect and replicate padding) within
//! 1e-5 of torch's float32 output, relative to its largest value; also in f16 within 2e-3 (the
//! networks may run in half precision).
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use neural_annotators::tensor_ops as ops;
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensor_ops")
}

fn pair(v: &Value) -> (usize, usize) {
    (
        v[0].as_u64().unwrap() as usize,
        v[1].as_u64().unwrap() as usize,
    )
}

fn run(case: &Value, x: &Tensor) -> Tensor {
    let ac = case["align_corners"].as_bool().unwrap_or(false);
    let scale = || {
        let s = &case["scale"];
        (s[0].as_f64().unwrap(), s[1].as_f64().unwrap())
    };
    match case["op"].as_str().unwrap() {
        "bilinear" => ops::interpolate_bilinear(x, pair(&case["size"]), ac),
        "bicubic" => ops::interpolate_bicubic(x, pair(&case["size"]), ac),
        "bilinear_scale" => ops::interpolate_bilinear_scale(x, scale(), ac),
        "bicubic_scale" => ops::interpolate_bicubic_scale(x, scale(), ac),
        "adaptive_avg_pool2d" => ops::adaptive_avg_pool2d(x, pair(&case["size"])),
        op @ ("reflect" | "replicate") => {
            let p: Vec<usize> = case["pad"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            let pad = (p[0], p[1], p[2], p[3]);
            if op == "reflect" {
                ops::reflection_pad2d(x, pad)
            } else {
                ops::replication_pad2d(x, pad)
            }
        }
        other => panic!("unknown op {other}"),
    }
    .unwrap()
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims());
    let ours = ours.to_dtype(DType::F32).unwrap();
    let d = (ours - reference)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    let m = reference.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap()
}

#[test]
fn tensor_ops_match_torch() {
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir().join("cases.safetensors"), &Device::Cpu).unwrap();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let x = &tensors[&format!("{name}.in")];
        let want = &tensors[&format!("{name}.out")];
        let e32 = rel_err(&run(case, x), want);
        let e16 = rel_err(&run(case, &x.to_dtype(DType::F16).unwrap()), want);
        if !(e32 <= 1e-5 && e16 <= 2e-3) {
            failures.push(format!("{name}: f32 {e32:.2e}, f16 {e16:.2e}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
