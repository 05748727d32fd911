//! `x·Wᵀ + b` on the CPU in f32 as one gemm call: the output starts as the bias rows and gemm
//! adds the product into it, where candle's linear layer runs the matmul and then a broadcast
//! add (one more pass over the output, and candle's broadcast binary map is slow: about as
//! long as the matmul itself for the feed-forward's 2560-wide output).
//!
//! Numerics: the same products and sums as candle's matmul; the bias joins the sum before
//! the last depth block instead of after it. Batch invariance: as candle's matmul, an output
//! row's sums do not depend on the number of rows once gemm takes its blocked kernels, which
//! [`crate::blocks::Linear`] ensures by padding small calls. Differentiable (the backward is
//! composed from candle's ops).
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Whether [`linear_with_bias`] takes these operands.
pub fn applies(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    [x, weight, bias]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

/// `x [m, k] · weight [n, k]ᵀ + bias [n]` → `[m, n]`.
pub fn linear_with_bias(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.apply_op3(weight, bias, LinearWithBias)
}

struct LinearWithBias;

impl CustomOp3 for LinearWithBias {
    fn name(&self) -> &'static str {
        "linear-with-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (n, wk) = w_layout.shape().dims2()?;
        if wk != k || b_layout.shape().dims1()? != n {
            candle_core::bail!(
                "linear: x {:?}, weight {:?}, bias {:?} do not fit",
                x_layout.dims(),
                w_layout.dims(),
                b_layout.dims()
            );
        }
        let (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) = (x, w, b) else {
            candle_core::bail!("linear: f32 only, got {:?}", x.dtype());
        };
        let Some((b_start, b_end)) = b_layout.contiguous_offsets() else {
            candle_core::bail!("linear: the bias must be contiguous");
        };
        let bias = &b[b_start..b_end];
        let mut out = vec![0f32; m * n];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), Shape::from((m, n))));
        }
        out.par_chunks_mut(n * 64).for_each(|rows| {
            rows.chunks_exact_mut(n)
                .for_each(|row| row.copy_from_slice(bias))
        });
        let (xs, ws) = (x_layout.stride(), w_layout.stride());
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the pointers and strides address x's and the weight's own elements (the
        // shapes were checked above) and the output's `m × n`.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                true,
                x[x_layout.start_offset()..].as_ptr(),
                xs[1] as isize,
                xs[0] as isize,
                w[w_layout.start_offset()..].as_ptr(),
                ws[0] as isize,
                ws[1] as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_x = grad.matmul(weight)?;
        let grad_w = grad.t()?.matmul(x)?;
        let grad_b = grad.sum(0)?;
        Ok((Some(grad_x), Some(grad_w), Some(grad_b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{formula, max_rel};
    use candle_core::{Module, Var};

    #[test]
    fn matches_candle_s_linear_and_its_gradients() {
        // One depth block and several (gemm blocks the depth by a few hundred).
        for (m, k, n) in [(70, 40, 33), (300, 1300, 20)] {
            let x = Var::from_tensor(&formula((m, k), 1)).unwrap();
            let w = Var::from_tensor(&formula((n, k), 2)).unwrap();
            let b = Var::from_tensor(&formula(n, 3)).unwrap();
            let ours = linear_with_bias(&x, &w, &b).unwrap();
            let reference =
                candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
            let theirs = reference.forward(&x).unwrap();
            assert!(
                max_rel(&ours, &theirs) < 1e-6,
                "{}",
                max_rel(&ours, &theirs)
            );
            let weights = formula((m, n), 4);
            let grads = |y: Tensor| {
                let g = (y * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                [&x, &w, &b].map(|v| g.get(v.as_tensor()).unwrap().clone())
            };
            for (got, want) in grads(ours).iter().zip(&grads(theirs)) {
                assert!(max_rel(got, want) < 1e-5, "{}", max_rel(got, want));
            }
        }
    }

    #[test]
    fn reads_a_transposed_weight() {
        let x = formula((90, 16), 5);
        let w = formula((16, 24), 6).t().unwrap();
        let b = formula(24, 7);
        let ours = linear_with_bias(&x, &w, &b).unwrap();
        let theirs = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_rel(&ours, &theirs) < 1e-6);
    }
}
