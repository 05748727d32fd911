//! `controlnet-serve device-check` on the CPU, small: the report's shape, the parity bound, and
//! a failing check reported as such.
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../diffusion/tests/fixtures")
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("device-check-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_controlnet-serve"))
        .arg("device-check")
        .args(args)
        .output()
        .expect("the binary runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn report(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("the JSON report"))
        .expect("valid JSON")
}

#[test]
fn cpu_check_passes_and_reports_every_field() {
    let dir = tempdir("pass");
    let json = dir.join("report.json");
    let r = run(&[
        "--device",
        "cpu",
        "--fixtures",
        s(&fixtures()),
        "--parity-dtypes",
        "f32",
        "--bench-model",
        "tiny",
        "--size",
        "64",
        "--steps",
        "2",
        "--batches",
        "1,2",
        "--step-iters",
        "1",
        "--json",
        s(&json),
    ]);
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(stdout.contains("device check passed"), "{stdout}");
    let v = report(&json);
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["candle"], "0.11.1");
    assert_eq!(v["ok"], true);
    assert!(v.get("error").is_none());
    // No CUDA library on the CPU.
    assert_eq!(v["libraries"], Value::Array(vec![]));

    let parity = v["parity"].as_array().unwrap();
    assert_eq!(parity.len(), 2, "{parity:?}");
    for (row, scheduler) in parity.iter().zip(["ddim", "unipc"]) {
        assert_eq!(row["dtype"], "f32");
        assert_eq!(row["scheduler"], scheduler);
        assert_eq!(row["bound_db"], 45.0);
        assert!(row["psnr_db"].as_f64().unwrap() >= 45.0, "{row}");
        assert_eq!(row["ok"], true);
    }

    let bench = &v["bench"];
    assert_eq!(bench["impl"], "controlnet-serve");
    assert_eq!(bench["model"], "tiny");
    assert_eq!(bench["dtype"], "f16");
    assert_eq!(bench["size"], 64);
    assert_eq!(bench["steps"], 2);
    assert!(bench["step_seconds"].as_f64().unwrap() > 0.0);
    let rows = bench["pipeline"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, b) in rows.iter().zip([1u64, 2]) {
        assert_eq!(row["batch"], b);
        let seconds = row["seconds"].as_f64().unwrap();
        assert!(seconds > 0.0);
        let per_image = row["seconds_per_image"].as_f64().unwrap();
        assert!((per_image - seconds / b as f64).abs() < 1e-9);
        let ips = row["images_per_second"].as_f64().unwrap();
        assert!((ips - b as f64 / seconds).abs() < 1e-9);
        // Not measured on the CPU.
        assert!(row["peak_device_memory_bytes"].is_null());
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_altered_reference_fails_and_names_the_check() {
    let dir = tempdir("fail");
    let fx = dir.join("fixtures");
    let f = fixtures();
    for folder in ["pipeline_sd15", "controlnet_sd15", "controlnet_sd15_b"] {
        copy_dir(&f.join(folder), &fx.join(folder));
    }
    for file in ["pipeline_hint_a.png", "pipeline_hint_b.png"] {
        std::fs::copy(f.join(file), fx.join(file)).unwrap();
    }
    // DDIM's reference image inverted: UniPC's still matches.
    let mut cases = candle_core::safetensors::load(
        f.join("pipeline_cases.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let ddim = cases["ddim.image"].clone();
    cases.insert("ddim.image".into(), ddim.affine(-1.0, 1.0).unwrap());
    candle_core::safetensors::save(&cases, fx.join("pipeline_cases.safetensors")).unwrap();

    let json = dir.join("report.json");
    let r = run(&[
        "--fixtures",
        s(&fx),
        "--parity-dtypes",
        "f32",
        "--no-bench",
        "--json",
        s(&json),
    ]);
    let stdout = String::from_utf8_lossy(&r.stdout);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "{stdout}");
    assert!(stderr.contains("parity f32 ddim"), "{stderr}");
    assert!(stdout.contains("FAIL"), "{stdout}");
    let v = report(&json);
    assert_eq!(v["ok"], false);
    assert!(
        v["error"].as_str().unwrap().contains("parity f32 ddim"),
        "{v}"
    );
    assert!(v.get("bench").is_none());
    let parity = v["parity"].as_array().unwrap();
    assert_eq!(parity[0]["scheduler"], "ddim");
    assert_eq!(parity[0]["ok"], false);
    assert!(parity[0]["psnr_db"].as_f64().unwrap() < 45.0);
    assert_eq!(parity[1]["scheduler"], "unipc");
    assert_eq!(parity[1]["ok"], true);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_missing_fixture_folder_is_an_error_in_the_report() {
    let dir = tempdir("missing");
    let json = dir.join("report.json");
    let r = run(&[
        "--fixtures",
        s(&dir.join("nowhere")),
        "--parity-dtypes",
        "f32",
        "--no-bench",
        "--json",
        s(&json),
    ]);
    assert!(!r.status.success());
    let v = report(&json);
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("nowhere"), "{v}");
    std::fs::remove_dir_all(&dir).ok();
}
