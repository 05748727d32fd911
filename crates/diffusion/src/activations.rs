//! SiLU and GEGLU with a vectorised CPU kernel for f32 ([`crate::vector_math`]); candle's ops
//! on other devices and dtypes.
//!
//! candle's CPU SiLU and GELU call the C library's scalar `expf`/`erff` per element, and a
//! GEGLU composed from candle's ops takes three passes (the GELU of the gate half, a copy of
//! each strided half, the product). Here GEGLU is one pass over the projection's output.
//! Both are element-wise, so batching changes no bit, and both are differentiable (backward
//! composed from candle's ops), so a model computes the same forward whether or not it is
//! being trained.
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Elements per parallel task: enough to amortise the task, few enough to share the cores.
const CHUNK: usize = 1 << 14;

fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// `x / (1 + exp(−x))`, as `candle_nn::ops::silu`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if fast_path(x) {
        x.contiguous()?.apply_op1(Silu)
    } else {
        candle_nn::ops::silu(x)
    }
}

/// diffusers' GEGLU on the projection's output `[…, 2·I]`: `hidden · gelu(gate)` with
/// `hidden, gate` its halves and the exact (erf) GELU, torch's default. `[…, I]`.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let width = h.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("geglu: the last dimension ({width}) is not even")
    }
    if fast_path(h) {
        h.contiguous()?.apply_op1(Geglu)
    } else {
        let (hidden, gate) = halves(h)?;
        hidden * gate.gelu_erf()?
    }
}

fn halves(h: &Tensor) -> Result<(Tensor, Tensor)> {
    let half = h.dim(D::Minus1)? / 2;
    Ok((
        h.narrow(D::Minus1, 0, half)?,
        h.narrow(D::Minus1, half, half)?,
    ))
}

fn contiguous_f32<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the input must be contiguous");
    };
    Ok(&data[start..end])
}

struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "silu-vectorised"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), storage, layout)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(out, x)| crate::vector_math::silu(x, out));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// `silu'(x) = σ(x)·(1 + x·(1 − σ(x)))`.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let sigmoid = (x.neg()?.exp()? + 1.0)?.recip()?;
        let slope = (&sigmoid * ((x * (1.0 - &sigmoid)?)? + 1.0)?)?;
        Ok(Some((grad * slope)?))
    }
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu-vectorised"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = contiguous_f32(self.name(), storage, layout)?;
        let mut dims = layout.dims().to_vec();
        let width = dims.pop().unwrap_or(0);
        let half = width / 2;
        dims.push(half);
        let mut out = vec![0f32; h.len() / 2];
        if let Some(rows_per_task) = CHUNK.checked_div(half) {
            let rows_per_task = rows_per_task.max(1);
            out.par_chunks_mut(rows_per_task * half)
                .zip(h.par_chunks(rows_per_task * width))
                .for_each(|(out, h)| {
                    for (out, row) in out.chunks_exact_mut(half).zip(h.chunks_exact(width)) {
                        crate::vector_math::geglu(&row[..half], &row[half..], out);
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    /// With `Φ` the normal CDF and `φ` its density, `gelu'(g) = Φ(g) + g·φ(g)`:
    /// `d hidden = grad·gelu(gate)`, `d gate = grad·hidden·gelu'(gate)`.
    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (hidden, gate) = halves(h)?;
        let cdf = (((&gate * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
        let density = ((gate.sqr()? * -0.5)?.exp()?
            * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
        let gelu_slope = (cdf + (&gate * density)?)?;
        let grad_hidden = (grad * gate.gelu_erf()?)?;
        let grad_gate = ((grad * hidden)? * gelu_slope)?;
        Ok(Some(Tensor::cat(&[grad_hidden, grad_gate], D::Minus1)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{formula, max_abs_diff};
    use candle_core::Var;

    /// Over ±6: both branches of the erf, and SiLU's tails.
    fn values(shape: (usize, usize, usize)) -> Tensor {
        (formula(shape, 1) * 6.0).unwrap()
    }

    #[test]
    fn match_candle_s_ops() {
        let x = values((3, 50, 40));
        let silu_err = max_abs_diff(&silu(&x).unwrap(), &candle_nn::ops::silu(&x).unwrap());
        assert!(silu_err < 1e-6, "{silu_err}");
        let (hidden, gate) = halves(&x).unwrap();
        let want = (hidden * gate.gelu_erf().unwrap()).unwrap();
        let got = geglu(&x).unwrap();
        assert_eq!(got.dims(), &[3, 50, 20]);
        let geglu_err = max_abs_diff(&got, &want);
        assert!(geglu_err < 1e-5, "{geglu_err}");
        // Strided input is made contiguous first.
        let t = x.transpose(0, 1).unwrap();
        assert!(max_abs_diff(&silu(&t).unwrap(), &candle_nn::ops::silu(&t).unwrap()) < 1e-6);
        assert!(
            geglu(&values((1, 2, 3))).is_err(),
            "an odd width has no halves"
        );
    }

    #[test]
    fn gradients_match_candle_s_ops() {
        let x = Var::from_tensor(&values((2, 5, 8))).unwrap();
        let weights = values((2, 5, 8)).cos().unwrap();
        let grad_of = |y: Tensor| {
            let w = weights.narrow(2, 0, y.dim(2).unwrap()).unwrap();
            let loss = (y * w).unwrap().sum_all().unwrap();
            loss.backward().unwrap().get(x.as_tensor()).unwrap().clone()
        };
        let ours = grad_of(silu(&x).unwrap());
        let theirs = grad_of(candle_nn::ops::silu(&x).unwrap());
        assert!(max_abs_diff(&ours, &theirs) < 1e-5);
        let ours = grad_of(geglu(&x).unwrap());
        let (hidden, gate) = halves(&x).unwrap();
        let theirs = grad_of((hidden * gate.gelu_erf().unwrap()).unwrap());
        assert!(
            max_abs_diff(&ours, &theirs) < 1e-4,
            "{}",
            max_abs_diff(&ours, &theirs)
        );
    }
}
