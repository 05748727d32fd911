//! Benchmark (not a test): what batch invariance costs on the CPU (the README's "Seeds").
//!
//! The ops `diffusion::blocks` changed for it — every linear layer (rows padded for gemm), the
//! attention (sliced per image) and the time embedding of one ControlNet + UNet step at SD 1.5
//! size (32×32 latent, f32, the shapes of `bench-denoiser-step`) — timed as before (candle_nn's
//! `Linear`, attention sliced for the whole batch) and as now, in turns in the same run, at 1,
//! 2 and 4 batch rows (`--rows`; 8 needs more than 24 GB with `keep_freed_memory`); and the
//! whole step, to put the difference in proportion. Prints one JSON line per batch size.
//!
//! Usage: bench-batch-invariance [--iters N (steps)] [--op-iters N] [--rows 1,2,4]
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use diffusion::weights::with_random_weights;
use diffusion::{ControlNetConfig, ControlNetModel, UNet2DConditionModel, UNetConfig};
use std::time::Instant;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The fastest of `iters` runs of `f`, in seconds.
fn time(iters: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..iters {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// The fastest of `iters` runs of `f(false)` and of `f(true)`, taken in turns (the order
/// swapping every round) so that both see the same load on a shared machine.
fn time_pair(
    iters: usize,
    mut f: impl FnMut(bool) -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64)> {
    f(false)?;
    f(true)?;
    let mut best = [f64::INFINITY; 2];
    for round in 0..iters {
        for which in [round % 2 == 1, round % 2 == 0] {
            let start = Instant::now();
            f(which)?;
            let t = start.elapsed().as_secs_f64();
            best[usize::from(which)] = best[usize::from(which)].min(t);
        }
    }
    Ok((best[0], best[1]))
}

/// `blocks::attention` before batch invariance: slices of queries sized for the whole batch.
fn attention_batched(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, h, nq, _) = q.dims4()?;
    let nk = k.dim(2)?;
    let kt = k.t()?;
    let chunk = ((1usize << 22) / (b * h * nk).max(1)).clamp(1, nq);
    let mut outs = Vec::new();
    for start in (0..nq).step_by(chunk) {
        let q_part = q.narrow(2, start, chunk.min(nq - start))?;
        let scores = (q_part.matmul(&kt)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outs.push(probs.matmul(v)?);
    }
    Tensor::cat(&outs, 2)
}

/// One linear layer of the step: `[rows, tokens, in]` → `out`, `count` times per step.
struct LinearOp {
    tokens: Option<usize>,
    dims: (usize, usize),
    count: usize,
}

fn main() -> anyhow::Result<()> {
    diffusion::runtime::keep_freed_memory();
    let iters: usize = arg("--iters").map_or(2, |v| v.parse().expect("a number"));
    let op_iters: usize = arg("--op-iters").map_or(10, |v| v.parse().expect("a number"));
    let rows_list: Vec<usize> = arg("--rows").map_or(vec![1, 2, 4], |v| {
        v.split(',').map(|r| r.parse().expect("1,2,4")).collect()
    });
    let device = Device::Cpu;
    let dtype = DType::F32;
    let unet_config = UNetConfig::sd15();
    let cn_config = ControlNetConfig::from_unet(&unet_config);
    let unet = with_random_weights(dtype, &device, |vb| {
        UNet2DConditionModel::new(vb, &unet_config)
    })?;
    let controlnet =
        with_random_weights(dtype, &device, |vb| ControlNetModel::new(vb, &cn_config))?;

    // Transformer2D blocks of the step at a 32×32 latent, (channels, tokens, how many): the
    // UNet's 5 per level and its mid block, the ControlNet's 2 per level and its mid block.
    let transformers = [(320, 1024, 7), (640, 256, 7), (1280, 64, 7), (1280, 16, 2)];
    let mut linears = Vec::new();
    for &(c, n, count) in &transformers {
        let op = |dims, tokens, k| LinearOp {
            tokens: Some(tokens),
            dims,
            count: count * k,
        };
        // q, k, v, out of self-attention; q, out of cross-attention; the feed-forward.
        linears.push(op((c, c), n, 6));
        linears.push(op((c, 8 * c), n, 1));
        linears.push(op((4 * c, c), n, 1));
        // Cross-attention's k and v on the 77 text tokens.
        linears.push(op((768, c), 77, 2));
    }
    // Time embeddings (UNet and ControlNet) and every resnet's time projection (22 + 10).
    let temb = |dims, count| LinearOp {
        tokens: None,
        dims,
        count,
    };
    linears.push(temb((320, 1280), 2));
    linears.push(temb((1280, 1280), 2));
    linears.push(temb((1280, 320), 2 + 2));
    linears.push(temb((1280, 640), 3 + 2));
    linears.push(temb((1280, 1280), 17 + 6));

    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, dtype, &device);
    let layers: Vec<(candle_nn::Linear, diffusion::blocks::Linear)> = linears
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let (i_dim, o_dim) = op.dims;
            let vb = vb.pp(i.to_string());
            Ok((
                candle_nn::linear(i_dim, o_dim, vb.clone())?,
                diffusion::blocks::linear(i_dim, o_dim, vb)?,
            ))
        })
        .collect::<candle_core::Result<_>>()?;

    for &b in &rows_list {
        let inputs: Vec<Tensor> = linears
            .iter()
            .map(|op| match op.tokens {
                Some(n) => Tensor::randn(0f32, 1., (b, n, op.dims.0), &device),
                None => Tensor::randn(0f32, 1., (b, op.dims.0), &device),
            })
            .collect::<candle_core::Result<_>>()?;
        let run_linears = |invariant: bool| -> anyhow::Result<()> {
            for ((op, (old, new)), x) in linears.iter().zip(&layers).zip(&inputs) {
                for _ in 0..op.count {
                    if invariant {
                        new.forward(x)?;
                    } else {
                        old.forward(x)?;
                    }
                }
            }
            Ok(())
        };
        // Self- and cross-attention of every transformer: 8 heads.
        let attn_inputs: Vec<(Tensor, Tensor, Tensor, usize)> = transformers
            .iter()
            .flat_map(|&(c, n, count)| [(c, n, n, count), (c, n, 77, count)])
            .map(|(c, n, nk, count)| {
                let d = c / 8;
                Ok((
                    Tensor::randn(0f32, 1., (b, 8, n, d), &device)?,
                    Tensor::randn(0f32, 1., (b, 8, nk, d), &device)?,
                    Tensor::randn(0f32, 1., (b, 8, nk, d), &device)?,
                    count,
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        let run_attention = |invariant: bool| -> anyhow::Result<()> {
            for (q, k, v, count) in &attn_inputs {
                let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
                for _ in 0..*count {
                    if invariant {
                        diffusion::blocks::attention(q, k, v, scale, false)?;
                    } else {
                        attention_batched(q, k, v, scale)?;
                    }
                }
            }
            Ok(())
        };

        let sample = Tensor::randn(0f32, 1., (b, 4, 32, 32), &device)?;
        let timesteps = Tensor::full(981f32, b, &device)?;
        let states = Tensor::randn(0f32, 1., (b, 77, 768), &device)?;
        let hint = Tensor::rand(0f32, 1., (b, 3, 256, 256), &device)?;
        let step = time(iters, || {
            let res = controlnet.forward(&sample, &timesteps, &states, &hint, 1.0, false)?;
            unet.forward(&sample, &timesteps, &states, Some(&res))?;
            Ok(())
        })?;
        let (linear_batched, linear_invariant) = time_pair(op_iters, run_linears)?;
        let (attention_batched, attention_invariant) = time_pair(op_iters, run_attention)?;
        let extra = (linear_invariant - linear_batched) + (attention_invariant - attention_batched);
        println!(
            "{}",
            serde_json::json!({
                "rows": b,
                "step_seconds": step,
                "linear_batched_seconds": linear_batched,
                "linear_invariant_seconds": linear_invariant,
                "attention_batched_seconds": attention_batched,
                "attention_invariant_seconds": attention_invariant,
                "cost_of_step": extra / step,
            })
        );
    }
    Ok(())
}
