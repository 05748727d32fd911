//! `controlnet-serve generate`, run as a user would.
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../diffusion/tests/fixtures")
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cli-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_controlnet-serve"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn generates_a_png_from_the_embedded_default() {
    let dir = tempdir("embedded");
    let out = dir.join("x.png");
    let hint = fixtures().join("pipeline_hint_a.png");
    let r = run(&[
        "generate",
        "--prompt",
        "a cat",
        "--width",
        "64",
        "--height",
        "48",
        "--steps",
        "2",
        "--controlnet",
        "embedded:1",
        "--hint",
        s(&hint),
        "--num-images",
        "2",
        "--seed",
        "5",
        "--out",
        s(&out),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("built-in tiny model"));
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        stdout.contains("seed 5") && stdout.contains("seed 6"),
        "{stdout}"
    );
    for k in 0..2 {
        let img = image::open(dir.join(format!("x-{k}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (64, 48));
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The same run as the end-to-end parity test, through the command line: every per-ControlNet
/// flag and the initial latents must reach the pipeline for the PNG to match diffusers.
#[test]
fn tiny_diffusers_folder_matches_diffusers_through_the_flags() {
    let dir = tempdir("folder");
    let f = fixtures();
    let cases = candle_core::safetensors::load(
        f.join("pipeline_cases.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let latents = dir.join("latents.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents".to_string(), cases["latents"].clone())]),
        &latents,
    )
    .unwrap();
    let out = dir.join("ddim.png");
    let r = run(&[
        "generate",
        "--model",
        s(&f.join("pipeline_sd15")),
        "--controlnet",
        s(&f.join("controlnet_sd15")),
        "--hint",
        s(&f.join("pipeline_hint_a.png")),
        "--controlnet",
        s(&f.join("controlnet_sd15_b")),
        "--hint",
        s(&f.join("pipeline_hint_b.png")),
        "--control-scale",
        "1.0",
        "--control-scale",
        "0.6",
        "--control-start",
        "0",
        "--control-start",
        "0.25",
        "--control-end",
        "1",
        "--control-end",
        "0.75",
        "--prompt",
        "a red cube on a wooden table, studio light",
        "--negative-prompt",
        "blurry, low quality",
        "--width",
        "96",
        "--height",
        "64",
        "--steps",
        "8",
        "--guidance",
        "7.5",
        "--scheduler",
        "ddim",
        "--latents",
        s(&latents),
        "--out",
        s(&out),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let ours = image::open(&out).unwrap().to_rgb8();
    let reference = cases["ddim.image"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mse = ours
        .as_raw()
        .iter()
        .zip(&reference)
        .map(|(&a, &b)| (a as f64 / 255.0 - b as f64).powi(2))
        .sum::<f64>()
        / reference.len() as f64;
    let psnr = 10.0 * (1.0 / mse).log10();
    assert!(psnr >= 45.0, "{psnr:.1} dB");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn unpaired_controlnet_flags_are_refused() {
    let r = run(&["generate", "--controlnet", "embedded:1", "--steps", "1"]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("in pairs"));
    let r = run(&["generate", "--scheduler", "heun", "--steps", "1"]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("unknown scheduler"));
}
