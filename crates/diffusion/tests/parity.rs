//! Parity with diffusers: the fixtures are tiny random models and diffusers' outputs for them,
//! written by `tools/parity/make_fixtures.py` (versions in `tools/parity/requirements.txt`).
//! Every model is loaded through the real loaders.
mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{fixtures, identical, rel_err, residuals_rel_err, Cases};
use diffusion::{ControlNetModel, ControlResiduals, UNet2DConditionModel};

/// f32 against diffusers' f32 (max |Δ| / max |ref|).
const F32_BOUND: f64 = 1e-4;

fn unet(name: &str, dtype: DType) -> UNet2DConditionModel {
    UNet2DConditionModel::from_diffusers_dir(&fixtures().join(name), dtype, &Device::Cpu)
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

fn controlnet(name: &str, dtype: DType) -> ControlNetModel {
    ControlNetModel::load(&fixtures().join(name), None, dtype, &Device::Cpu)
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

struct Inputs {
    sample: Tensor,
    timesteps: Tensor,
    states: Tensor,
    cond: Tensor,
}

fn inputs(cases: &Cases, family: &str, dtype: DType) -> Inputs {
    Inputs {
        sample: cases.get_as(&format!("{family}.sample"), dtype),
        timesteps: cases.get(&format!("{family}.timesteps")),
        states: cases.get_as(&format!("{family}.encoder_hidden_states"), dtype),
        cond: cases.get_as(&format!("{family}.cond"), dtype),
    }
}

#[test]
fn unet_alone_matches_diffusers() {
    let cases = Cases::load();
    for family in ["sd15", "sd21"] {
        let model = unet(&format!("unet_{family}"), DType::F32);
        let x = inputs(&cases, family, DType::F32);
        let out = model
            .forward(&x.sample, &x.timesteps, &x.states, None)
            .unwrap();
        let err = rel_err(&out, &cases.get(&format!("{family}.unet.out")));
        eprintln!("{family} unet f32 rel err {err:.2e}");
        assert!(err <= F32_BOUND, "{family}: {err:.3e}");
    }
}

#[test]
fn unet_with_residuals_matches_diffusers() {
    let cases = Cases::load();
    let model = unet("unet_sd15", DType::F32);
    let x = inputs(&cases, "sd15", DType::F32);
    let res = cases.residuals("sd15.residuals");
    assert_eq!(res.down.len(), model.spec().n_skips());
    let out = model
        .forward(&x.sample, &x.timesteps, &x.states, Some(&res))
        .unwrap();
    let err = rel_err(&out, &cases.get("sd15.unet.out_with_residuals"));
    eprintln!("sd15 unet+residuals f32 rel err {err:.2e}");
    assert!(err <= F32_BOUND, "{err:.3e}");
    // And the residuals really change the output (the test can fail).
    let plain = cases.get("sd15.unet.out");
    assert!(rel_err(&out, &plain) > 1e-2);
}

#[test]
fn controlnet_scales_and_guess_mode_match_diffusers() {
    let cases = Cases::load();
    let model = controlnet("controlnet_sd15", DType::F32);
    let x = inputs(&cases, "sd15", DType::F32);
    for (case, scale, guess) in [
        ("scale_1", 1.0, false),
        ("scale_0.5", 0.5, false),
        ("guess_0.8", 0.8, true),
    ] {
        let ours = model
            .forward(&x.sample, &x.timesteps, &x.states, &x.cond, scale, guess)
            .unwrap();
        let reference = cases.residuals(&format!("sd15.controlnet.{case}"));
        assert_eq!(ours.len(), model.n_residuals());
        let err = residuals_rel_err(&ours, &reference);
        eprintln!("sd15 controlnet {case} f32 rel err {err:.2e}");
        assert!(err <= F32_BOUND, "{case}: {err:.3e}");
    }
}

#[test]
fn controlnet_global_pooling_matches_diffusers() {
    let cases = Cases::load();
    let model = controlnet("controlnet_sd21_pool", DType::F32);
    assert!(model.config.global_pool_conditions);
    let x = inputs(&cases, "sd21", DType::F32);
    let ours = model
        .forward(&x.sample, &x.timesteps, &x.states, &x.cond, 0.7, false)
        .unwrap();
    assert_eq!(ours.mid.dims()[2..], [1, 1]);
    let err = residuals_rel_err(&ours, &cases.residuals("sd21.controlnet_pool.scale_0.7"));
    eprintln!("sd21 pooled controlnet f32 rel err {err:.2e}");
    assert!(err <= F32_BOUND, "{err:.3e}");
}

#[test]
fn unet_driven_by_controlnet_matches_diffusers() {
    let cases = Cases::load();
    let x = inputs(&cases, "sd15", DType::F32);
    let res = controlnet("controlnet_sd15", DType::F32)
        .forward(&x.sample, &x.timesteps, &x.states, &x.cond, 1.0, false)
        .unwrap();
    let out = unet("unet_sd15", DType::F32)
        .forward(&x.sample, &x.timesteps, &x.states, Some(&res))
        .unwrap();
    let err = rel_err(&out, &cases.get("sd15.unet.out_with_controlnet"));
    eprintln!("sd15 unet+controlnet f32 rel err {err:.2e}");
    assert!(err <= F32_BOUND, "{err:.3e}");
}

/// Jobs at different steps share one batch: sample i of a batch with per-sample timesteps must
/// be the same as sample i run alone.
#[test]
fn batch_with_mixed_timesteps_equals_single_runs() {
    let cases = Cases::load();
    let x = inputs(&cases, "sd15", DType::F32);
    let cn = controlnet("controlnet_sd15", DType::F32);
    let model = unet("unet_sd15", DType::F32);
    let run = |s: &Tensor, t: &Tensor, e: &Tensor, c: &Tensor| {
        let res = cn.forward(s, t, e, c, 1.0, false).unwrap();
        let out = model.forward(s, t, e, Some(&res)).unwrap();
        (res, out)
    };
    let (batch_res, batch_out) = run(&x.sample, &x.timesteps, &x.states, &x.cond);
    let timesteps = x.timesteps.to_vec1::<f32>().unwrap();
    assert!(timesteps[0] != timesteps[1] && timesteps[1] != timesteps[2]);
    for i in 0..3 {
        let one = |t: &Tensor| t.i(i..i + 1).unwrap();
        let (res, out) = run(
            &one(&x.sample),
            &one(&x.timesteps),
            &one(&x.states),
            &one(&x.cond),
        );
        let err = rel_err(&out, &one(&batch_out));
        assert!(err <= 1e-6, "sample {i}: unet {err:.3e}");
        let batch_i = ControlResiduals {
            down: batch_res.down.iter().map(one).collect(),
            mid: one(&batch_res.mid),
        };
        let err = residuals_rel_err(&res, &batch_i);
        assert!(err <= 1e-6, "sample {i}: controlnet {err:.3e}");
    }
}

/// The diffusers folder, the original single file (safetensors) and the same as a torch pickle
/// load to the same model: identical residuals, value for value.
#[test]
fn both_controlnet_layouts_give_identical_residuals() {
    let cases = Cases::load();
    let x = inputs(&cases, "sd15", DType::F32);
    let folder = controlnet("controlnet_sd15", DType::F32);
    let run = |m: &ControlNetModel| {
        m.forward(&x.sample, &x.timesteps, &x.states, &x.cond, 1.0, false)
            .unwrap()
    };
    let reference = run(&folder);
    for file in [
        "control_sd15_original.safetensors",
        "control_sd15_original.pth",
    ] {
        let single = controlnet(file, DType::F32);
        // The config read off the shapes is the folder's config.
        assert_eq!(single.spec(), folder.spec(), "{file}: inferred config");
        assert_eq!(
            single.config.conditioning_embedding_out_channels,
            folder.config.conditioning_embedding_out_channels
        );
        let ours = run(&single);
        for (a, b) in ours.down.iter().zip(&reference.down) {
            assert!(identical(a, b), "{file}: down residual differs");
        }
        assert!(identical(&ours.mid, &reference.mid), "{file}: mid differs");
    }
}

/// Half precision against diffusers' f32 reference. The weights are f16-exact, so only
/// activation rounding differs. f16 keeps 11 significant bits (unit roundoff u = 2^-11 ≈ 4.9e-4)
/// and bf16 8 (u = 2^-8 ≈ 3.9e-3); through ~40 rounding stages of a UNet+ControlNet step the
/// errors add up like a random walk, √40·u ≈ 6u, and the worst element sits a few standard
/// deviations out. The bounds are 20u: 1e-2 for f16 and 8e-2 for bf16.
#[test]
fn half_precision_within_rounding_bounds() {
    let cases = Cases::load();
    for (dtype, bound) in [(DType::F16, 1e-2), (DType::BF16, 8e-2)] {
        let x = inputs(&cases, "sd15", dtype);
        let res = controlnet("controlnet_sd15", dtype)
            .forward(&x.sample, &x.timesteps, &x.states, &x.cond, 1.0, false)
            .unwrap();
        assert_eq!(res.mid.dtype(), dtype);
        let cn_err = residuals_rel_err(&res, &cases.residuals("sd15.controlnet.scale_1"));
        let out = unet("unet_sd15", dtype)
            .forward(&x.sample, &x.timesteps, &x.states, Some(&res))
            .unwrap();
        assert_eq!(out.dtype(), dtype);
        let err = rel_err(&out, &cases.get("sd15.unet.out_with_controlnet"));
        eprintln!("{dtype:?}: controlnet rel err {cn_err:.2e}, unet+controlnet rel err {err:.2e}");
        assert!(
            cn_err <= bound && err <= bound,
            "{dtype:?}: {cn_err:.3e} {err:.3e}"
        );
    }
}

fn load_err(config_edit: impl Fn(&mut serde_json::Value), weights_from: &str) -> String {
    let dir = tempdir();
    let src = fixtures().join(weights_from);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config_edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let weights = "diffusion_pytorch_model.safetensors";
    std::fs::copy(src.join(weights), dir.join(weights)).unwrap();
    let err = UNet2DConditionModel::from_diffusers_dir(&dir, DType::F32, &Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&dir).ok();
    err
}

fn tempdir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "diffusion-parity-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn mis_shaped_tensor_error_names_key_shapes_and_file() {
    let err = load_err(|c| c["cross_attention_dim"] = 48.into(), "unet_sd15");
    assert!(err.contains("attn2.to_k.weight"), "{err}");
    assert!(
        err.contains("[32, 32]") && err.contains("[32, 48]"),
        "{err}"
    );
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

#[test]
fn missing_tensor_error_names_key_and_file() {
    let err = load_err(|c| c["layers_per_block"] = 2.into(), "unet_sd15");
    assert!(
        err.contains("resnets.1") && err.contains("missing"),
        "{err}"
    );
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    // The original layout names the stored key as well as the model name.
    let dir = tempdir();
    let file = dir.join("control_broken.safetensors");
    let mut tensors = candle_core::safetensors::load(
        fixtures().join("control_sd15_original.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    tensors.remove("control_model.middle_block_out.0.weight");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = ControlNetModel::load(&file, None, DType::F32, &Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        err.contains("control_model.middle_block_out.0.weight"),
        "{err}"
    );
    assert!(err.contains("controlnet_mid_block.weight"), "{err}");
    assert!(err.contains("control_broken.safetensors"), "{err}");
}

#[test]
fn zero_residuals_leave_the_unet_unchanged() {
    let cases = Cases::load();
    let model = unet("unet_sd15", DType::F32);
    let x = inputs(&cases, "sd15", DType::F32);
    let (b, _, h, w) = x.sample.dims4().unwrap();
    let zeros =
        diffusion::controlnet::zero_residuals(model.spec(), b, h, w, DType::F32, &Device::Cpu)
            .unwrap();
    // Same shapes as a real ControlNet's residuals.
    let real = cases.residuals("sd15.controlnet.scale_1");
    for (z, r) in zeros.down.iter().zip(&real.down) {
        assert_eq!(z.dims(), r.dims());
    }
    let with = model
        .forward(&x.sample, &x.timesteps, &x.states, Some(&zeros))
        .unwrap();
    let without = model
        .forward(&x.sample, &x.timesteps, &x.states, None)
        .unwrap();
    assert!(identical(&with, &without));
}
