//! The zero-convolution property of the paper (arXiv 2302.05543, §3.1): a ControlNet fresh from
//! its UNet adds exactly nothing, yet its zero convolutions still get gradients, so training
//! moves them off zero on the first step and the rest of the ControlNet from the second.
mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use common::{fixtures, identical, Cases};
use diffusion::{ControlNetConfig, ControlNetModel, UNet2DConditionModel};

struct Fresh {
    unet: UNet2DConditionModel,
    controlnet: ControlNetModel,
    varmap: VarMap,
}

/// diffusers' `ControlNetModel.from_unet`: the encoder copied from the UNet, the hint encoder
/// randomly initialised, the zero convs (and the hint encoder's last conv) zero.
fn fresh_controlnet() -> Fresh {
    let dev = Device::Cpu;
    let dir = fixtures().join("unet_sd15");
    let unet = UNet2DConditionModel::from_diffusers_dir(&dir, DType::F32, &dev).unwrap();
    let mut config = ControlNetConfig::from_unet(&unet.config);
    config.conditioning_embedding_out_channels = vec![8, 8, 16, 16];
    let varmap = VarMap::new();
    let controlnet =
        ControlNetModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &config).unwrap();
    let unet_weights =
        candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &dev)
            .unwrap();
    let mut copied = 0;
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.starts_with("controlnet_") {
            continue;
        }
        let w = unet_weights
            .get(name)
            .unwrap_or_else(|| panic!("UNet has no {name}"));
        var.set(&w.to_dtype(DType::F32).unwrap()).unwrap();
        copied += 1;
    }
    assert!(copied > 50, "copied only {copied} tensors");
    Fresh {
        unet,
        controlnet,
        varmap,
    }
}

fn var(f: &Fresh, name: &str) -> Var {
    f.varmap.data().lock().unwrap()[name].clone()
}

fn abs_sum(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn fresh_controlnet_leaves_the_unet_output_unchanged_for_any_hint() {
    let f = fresh_controlnet();
    assert_eq!(
        abs_sum(var(&f, "controlnet_mid_block.weight").as_tensor()),
        0.0
    );
    let cases = Cases::load();
    let sample = cases.get("sd15.sample");
    let t = cases.get("sd15.timesteps");
    let states = cases.get("sd15.encoder_hidden_states");
    let cond = cases.get("sd15.cond");
    let plain = f.unet.forward(&sample, &t, &states, None).unwrap();
    for hint in [
        cond.clone(),
        cond.zeros_like().unwrap(),
        cond.ones_like().unwrap(),
        (cond * 100.0).unwrap(),
    ] {
        let res = f
            .controlnet
            .forward(&sample, &t, &states, &hint, 1.0, false)
            .unwrap();
        let out = f.unet.forward(&sample, &t, &states, Some(&res)).unwrap();
        assert!(
            identical(&out, &plain),
            "a fresh ControlNet changed the UNet output"
        );
    }
}

#[test]
fn gradients_reach_the_zero_convs_then_the_rest() {
    let f = fresh_controlnet();
    let cases = Cases::load();
    let sample = cases.get("sd15.sample");
    let t = cases.get("sd15.timesteps");
    let states = cases.get("sd15.encoder_hidden_states");
    let cond = cases.get("sd15.cond");
    let target = sample.randn_like(0.0, 1.0).unwrap();
    let loss = || {
        let res = f
            .controlnet
            .forward(&sample, &t, &states, &cond, 1.0, false)
            .unwrap();
        let out = f.unet.forward(&sample, &t, &states, Some(&res)).unwrap();
        (out - &target).unwrap().sqr().unwrap().mean_all().unwrap()
    };
    let zero_conv = var(&f, "controlnet_down_blocks.0.weight");
    let mid_conv = var(&f, "controlnet_mid_block.weight");
    let hint_out = var(&f, "controlnet_cond_embedding.conv_out.weight");
    let encoder_conv = var(&f, "conv_in.weight");
    let grad_sum = |grads: &candle_core::backprop::GradStore, v: &Var| {
        grads.get(v.as_tensor()).map(abs_sum).unwrap_or(0.0)
    };

    // Step 1: only the zero convs get a gradient (their input features are not zero); behind
    // them everything is cut off by their zero weights.
    let l1 = loss();
    let grads = l1.backward().unwrap();
    assert!(
        grad_sum(&grads, &zero_conv) > 0.0,
        "no gradient at a zero conv"
    );
    assert!(
        grad_sum(&grads, &mid_conv) > 0.0,
        "no gradient at the mid zero conv"
    );
    assert_eq!(grad_sum(&grads, &hint_out), 0.0);
    assert_eq!(grad_sum(&grads, &encoder_conv), 0.0);
    let mut sgd = candle_nn::SGD::new(f.varmap.all_vars(), 1e-3).unwrap();
    sgd.step(&grads).unwrap();
    assert!(
        abs_sum(zero_conv.as_tensor()) > 0.0,
        "zero conv still zero after a step"
    );

    // Step 2: with non-zero zero convs the gradient flows into the copy and the hint encoder.
    let grads = loss().backward().unwrap();
    assert!(
        grad_sum(&grads, &hint_out) > 0.0,
        "no gradient at the hint encoder"
    );
    assert!(
        grad_sum(&grads, &encoder_conv) > 0.0,
        "no gradient in the encoder copy"
    );
}
