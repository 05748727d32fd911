//! softmax(q·kᵀ·scale)·v on the CPU in f32, one block of queries at a time.
//!
//! The composed attention ([`crate::blocks::attention`] on other devices and dtypes) writes a
//! score tensor, scales it in another pass, soft-maxes it with the C library's scalar `expf`
//! into a third tensor, and needs `[B, H, N, D]` copies of q, k and v. Here each task takes
//! one block of one head's queries: `q_blk·kᵀ·scale` into a scratch buffer that stays in the
//! cache, the softmax in place ([`crate::vector_math`]), then `P·v` written straight into the
//! output, laid out `[B, N, H, D]` so that merging the heads is free. q, k and v are read
//! through their strides, so splitting the heads is free too.
//!
//! Numerics: the same operations as the composed path (products summed by gemm, the row
//! maximum subtracted, probabilities divided by their sum before `P·V`); only the exponential
//! differs (within 2 ulp, see `vector_math`). Batch invariance (README, "Seeds"): a block's
//! size depends on the sequence lengths only, and each block's matmuls run on one thread, so an
//! image's result does not depend on the rest of the batch.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

/// Scores per block (256 KiB of f32): the block's score rows stay in a core's L2 cache
/// between `q·kᵀ`, the softmax and `P·V`.
const BLOCK_SCORES: usize = 1 << 16;
const MIN_BLOCK_ROWS: usize = 16;
const MAX_BLOCK_ROWS: usize = 512;

/// `[B, H, Nq, D]`, `[B, H, Nk, D]`, `[B, H, Nk, Dv]` (any strides, f32, CPU) → `[B, H, Nq, Dv]`
/// (a transposed view of a contiguous `[B, Nq, H, Dv]`). Differentiable (the backward is
/// composed from candle's ops), so a model computes the same forward whether or not it is
/// being trained.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    q.apply_op3(
        k,
        v,
        FusedAttention {
            scale: scale as f32,
        },
    )?
    .transpose(1, 2)
}

/// Whether [`attention`] takes these tensors.
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    [q, k, v]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.rank() == 4)
}

struct FusedAttention {
    scale: f32,
}

/// A `[B, H, N, D]` operand: its data and element strides.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    offset: usize,
    stride: [usize; 4],
}

impl<'a> Operand<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("fused attention: f32 only, got {:?}", storage.dtype());
        };
        let s = layout.stride();
        Ok(Self {
            data,
            offset: layout.start_offset(),
            stride: [s[0], s[1], s[2], s[3]],
        })
    }

    /// The address of element `[b, h, n, 0]`.
    fn at(&self, b: usize, h: usize, n: usize) -> *const f32 {
        let index = self.offset + b * self.stride[0] + h * self.stride[1] + n * self.stride[2];
        self.data[index..].as_ptr()
    }
}

/// The output buffer, shared by the tasks, which write disjoint elements.
struct Output(*mut f32);
// SAFETY: every task writes its own rows of its own head (see `cpu_fwd`).
unsafe impl Sync for Output {}

impl Output {
    fn at(&self, index: usize) -> *mut f32 {
        // SAFETY: callers pass an index inside the buffer.
        unsafe { self.0.add(index) }
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q_storage: &CpuStorage,
        q_layout: &Layout,
        k_storage: &CpuStorage,
        k_layout: &Layout,
        v_storage: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, nq, d) = q_layout.shape().dims4()?;
        let (kb, kh, nk, kd) = k_layout.shape().dims4()?;
        let (vb, vh, vn, dv) = v_layout.shape().dims4()?;
        if (kb, kh, kd) != (b, h, d) || (vb, vh, vn) != (b, h, nk) {
            candle_core::bail!(
                "fused attention: q {:?}, k {:?}, v {:?} do not fit",
                q_layout.dims(),
                k_layout.dims(),
                v_layout.dims()
            );
        }
        let (q, k, v) = (
            Operand::new(q_storage, q_layout)?,
            Operand::new(k_storage, k_layout)?,
            Operand::new(v_storage, v_layout)?,
        );
        let mut out = vec![0f32; b * nq * h * dv];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), Shape::from((b, nq, h, dv))));
        }
        let rows = (BLOCK_SCORES / nk.max(1))
            .clamp(MIN_BLOCK_ROWS, MAX_BLOCK_ROWS)
            .min(nq);
        let blocks = nq.div_ceil(rows);
        let output = Output(out.as_mut_ptr());
        let output = &output;
        let out_row_stride = h * dv;
        (0..b * h * blocks).into_par_iter().for_each(|task| {
            let (image, head, block) = (task / (h * blocks), task / blocks % h, task % blocks);
            let first = block * rows;
            let m = rows.min(nq - first);
            SCRATCH.with_borrow_mut(|scores| {
                scores.resize(rows * nk, 0.0);
                let scores = &mut scores[..m * nk];
                // SAFETY: the pointers and strides address q's, k's and v's own elements (the
                // layouts' shapes were checked above) and this task's rows of the output.
                unsafe {
                    gemm::gemm(
                        m,
                        nk,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        nk as isize,
                        false,
                        q.at(image, head, first),
                        q.stride[3] as isize,
                        q.stride[2] as isize,
                        k.at(image, head, 0),
                        k.stride[2] as isize,
                        k.stride[3] as isize,
                        0.0,
                        self.scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for row in scores.chunks_exact_mut(nk) {
                    let max = crate::vector_math::max(row);
                    let sum = crate::vector_math::exp_shifted_sum(row, max);
                    row.iter_mut().for_each(|p| *p /= sum);
                }
                // SAFETY: as above; the output rows `first..first + m` of this image and head
                // are written by this task only.
                unsafe {
                    gemm::gemm(
                        m,
                        dv,
                        nk,
                        output.at((image * nq + first) * out_row_stride + head * dv),
                        1,
                        out_row_stride as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        nk as isize,
                        v.at(image, head, 0),
                        v.stride[3] as isize,
                        v.stride[2] as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((b, nq, h, dv))))
    }

    /// With `S = q·kᵀ·scale`, `P = softmax(S)` recomputed and `dO` the output's gradient:
    /// `dv = Pᵀ·dO`, `dS = P ⊙ (dO·vᵀ − rowsum(dO ⊙ O))`, `dq = dS·k·scale`, `dk = dSᵀ·q·scale`.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let scale = self.scale as f64;
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        // The op's own result is `[B, Nq, H, Dv]`.
        let out = out.transpose(1, 2)?.contiguous()?;
        let grad_out = grad_out.transpose(1, 2)?.contiguous()?;
        let probs = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
        let grad_v = probs.t()?.matmul(&grad_out)?;
        let grad_probs = grad_out.matmul(&v.t()?)?;
        let row_dot = (&grad_out * &out)?.sum_keepdim(candle_core::D::Minus1)?;
        let grad_scores = (probs * grad_probs.broadcast_sub(&row_dot)?)?;
        let grad_q = (grad_scores.matmul(&k)? * scale)?;
        let grad_k = (grad_scores.t()?.matmul(&q)? * scale)?;
        Ok((Some(grad_q), Some(grad_k), Some(grad_v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{formula, max_rel};
    use candle_core::{DType, Device, D};

    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let scores = (q.contiguous()?.matmul(&k.contiguous()?.t()?)? * scale)?;
        candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v.contiguous()?)
    }

    #[test]
    fn matches_the_composed_attention() {
        // Self-attention with several blocks and a ragged last one; cross-attention with a
        // short context; a value width unlike the key width.
        for (b, h, nq, nk, d, dv) in [
            (2, 3, 300, 300, 8, 8),
            (1, 2, 70, 77, 16, 16),
            (2, 1, 40, 5, 4, 6),
        ] {
            let q = (formula((b, h, nq, d), 1) * 3.0).unwrap();
            let k = (formula((b, h, nk, d), 2) * 3.0).unwrap();
            let v = formula((b, h, nk, dv), 3);
            let scale = 1.0 / (d as f64).sqrt();
            let got = attention(&q, &k, &v, scale).unwrap();
            assert_eq!(got.dims(), &[b, h, nq, dv]);
            let want = composed(&q, &k, &v, scale).unwrap();
            let err = max_rel(&got, &want);
            assert!(err < 1e-5, "{:?}: {err}", (b, h, nq, nk, d, dv));
        }
    }

    #[test]
    fn reads_strided_heads() {
        // Heads split from `[B, N, H·D]` by a transposed view, as the UNet's attention does.
        let (b, n, h, d) = (2, 50, 4, 8);
        let x = formula((b, n, h, d), 4);
        let q = x.transpose(1, 2).unwrap();
        let k = (x.transpose(1, 2).unwrap() * 0.5).unwrap();
        let v = formula((b, n, h, d), 5).transpose(1, 2).unwrap();
        assert!(!q.is_contiguous());
        let got = attention(&q, &k, &v, 0.3).unwrap();
        let want = composed(&q, &k, &v, 0.3).unwrap();
        assert!(max_rel(&got, &want) < 1e-5);
        // The output is a view of `[B, N, H, D]`: merging the heads back needs no copy.
        assert!(got.transpose(1, 2).unwrap().is_contiguous());
    }

    #[test]
    fn an_image_alone_and_in_a_batch_give_the_same_bits() {
        let (q, k, v) = (
            formula((3, 2, 200, 8), 6),
            formula((3, 2, 200, 8), 7),
            formula((3, 2, 200, 8), 8),
        );
        let batched = attention(&q, &k, &v, 0.35).unwrap();
        for i in 0..3 {
            let one = |t: &Tensor| t.narrow(0, i, 1).unwrap();
            let alone = attention(&one(&q), &one(&k), &one(&v), 0.35).unwrap();
            let diff = (alone - one(&batched)).unwrap().abs().unwrap();
            assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    #[test]
    fn gradients_match_the_composed_attention() {
        let (b, h, nq, nk, d) = (2, 2, 12, 9, 4);
        let q = candle_core::Var::from_tensor(&formula((b, h, nq, d), 11)).unwrap();
        let k = candle_core::Var::from_tensor(&formula((b, h, nk, d), 12)).unwrap();
        let v = candle_core::Var::from_tensor(&formula((b, h, nk, d), 13)).unwrap();
        // A loss that weighs every output element differently.
        let weights = formula((b, h, nq, d), 14);
        let grads = |out: Tensor| {
            let loss = (out * &weights).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            [&q, &k, &v].map(|t| grads.get(t.as_tensor()).unwrap().clone())
        };
        let fused = grads(attention(&q, &k, &v, 0.5).unwrap());
        let composed_grads = {
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * 0.5).unwrap();
            let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
            grads(probs.matmul(&v).unwrap())
        };
        for (got, want) in fused.iter().zip(&composed_grads) {
            assert!(max_rel(got, want) < 1e-5, "{}", max_rel(got, want));
        }
    }

    #[test]
    fn probabilities_sum_to_one_for_large_scores() {
        // Scores in the thousands: the row maximum keeps the exponentials finite.
        let q = (formula((1, 1, 20, 4), 9) * 100.0).unwrap();
        let k = (formula((1, 1, 30, 4), 10) * 100.0).unwrap();
        let v = Tensor::ones((1, 1, 30, 3), DType::F32, &Device::Cpu).unwrap();
        let got = attention(&q, &k, &v, 1.0).unwrap();
        let ones = got
            .sum(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(ones.iter().all(|s| (s - 3.0).abs() < 1e-5), "{ones:?}");
    }
}
