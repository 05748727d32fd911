//! The denoising loop, one step at a time, for a batch of jobs that share one UNet call.
//!
//! A job is one request's images: its latents, its own scheduler (with its own step index and
//! history), its prompt embeddings, guidance and ControlNets. [`step_batch`] advances every job
//! it is given by one step: it stacks their UNet inputs (two rows per image with classifier-free
//! guidance: unconditional first, as diffusers orders them), runs each distinct ControlNet once
//! on the rows that use it, sums the residuals per row on the device, makes one UNet call, and
//! hands each job its rows back for guidance and its scheduler's step. The single-request
//! pipeline is this with a batch of one; the engine's batcher is this with many.
//!
//! On the CPU a job's results are bit-for-bit what it gets alone, whatever shares its batch
//! (the README's "Seeds"): the models compute each batch element on its own
//! ([`crate::blocks`]), and a row's ControlNet residuals are summed in its job's own order of
//! controls, with nothing added for controls that are not its own.
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

use crate::control::{self, ControlMode};
use crate::controlnet::{ControlNetModel, ControlResiduals};
use crate::schedulers::{NoiseSource, Scheduler};
use crate::transfer;
use crate::unet::UNet2DConditionModel;

/// One ControlNet as one job uses it.
#[derive(Clone)]
pub struct JobControl {
    pub net: Arc<ControlNetModel>,
    /// `[1, 3, H, W]` on the device: 0..1, or −1 where masked (the 1.1 inpaint convention).
    pub hint: Tensor,
    pub scale: f64,
    pub start: f64,
    pub end: f64,
    pub mode: ControlMode,
}

/// What inpainting with a plain (4-channel) UNet keeps: outside the mask, each step's latents
/// are replaced by the original image's latents noised to the next step (diffusers'
/// ControlNet inpaint pipeline).
pub struct InpaintBlend {
    /// `[n, 4, h, w]`, already × the VAE's scaling factor.
    pub image_latents: Tensor,
    /// `[n, 1, h, w]`: 1 where the image is repainted.
    pub mask: Tensor,
    /// The noise the initial latents were made with.
    pub noise: Tensor,
}

/// Noise for a job of several images: each image draws from its own source, so image k of a
/// job is the same whether it is generated alone or with others, and wherever it sits in a batch.
pub struct PerImageNoise<S> {
    pub sources: Vec<S>,
}

impl<S: NoiseSource> NoiseSource for PerImageNoise<S> {
    /// One upload for all the images.
    fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> crate::Result<Tensor> {
        let values = self.randn_host(shape)?;
        Ok(transfer::upload(values, shape, device)?.to_dtype(dtype)?)
    }

    fn randn_host(&mut self, shape: &[usize]) -> crate::Result<Vec<f32>> {
        let n = self.sources.len();
        if shape.first() != Some(&n) {
            return Err(crate::Error::Scheduler(format!(
                "noise of shape {shape:?} asked of {n} per-image sources"
            )));
        }
        let mut one = shape.to_vec();
        one[0] = 1;
        let mut values = Vec::with_capacity(shape.iter().product());
        for s in &mut self.sources {
            values.extend(s.randn_host(&one)?);
        }
        Ok(values)
    }
}

/// The noise a stochastic scheduler will draw during a job, drawn up front and uploaded in one
/// copy, so that its steps copy nothing (an f32 latent per step: 64 KiB per 512² image).
/// `count` draws of `shape` are taken from `source` in order, which is the order the steps
/// would have taken them in; later draws, or draws of another shape or device, go to `source`
/// (continuing its stream, each an upload of its own).
pub struct PrefetchedNoise<S> {
    source: S,
    shape: Vec<usize>,
    /// `[count, shape...]`, f32, on the device.
    draws: Option<Tensor>,
    count: usize,
    next: usize,
}

impl<S: NoiseSource> PrefetchedNoise<S> {
    pub fn new(
        mut source: S,
        shape: &[usize],
        count: usize,
        device: &Device,
    ) -> crate::Result<Self> {
        let mut values = Vec::with_capacity(count * shape.iter().product::<usize>());
        for _ in 0..count {
            values.extend(source.randn_host(shape)?);
        }
        let draws = if count == 0 {
            None
        } else {
            let dims: Vec<usize> = std::iter::once(count)
                .chain(shape.iter().copied())
                .collect();
            Some(transfer::upload(values, dims, device)?)
        };
        Ok(Self {
            source,
            shape: shape.to_vec(),
            draws,
            count,
            next: 0,
        })
    }
}

impl<S: NoiseSource> NoiseSource for PrefetchedNoise<S> {
    fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> crate::Result<Tensor> {
        match &self.draws {
            Some(draws)
                if self.next < self.count
                    && shape == self.shape.as_slice()
                    && draws.device().same_device(device) =>
            {
                let z = draws.get(self.next)?.to_dtype(dtype)?;
                self.next += 1;
                Ok(z)
            }
            _ => self.source.randn(shape, dtype, device),
        }
    }
}

pub struct DenoiseJob {
    /// `[n, 4, h, w]`.
    pub latents: Tensor,
    pub scheduler: Box<dyn Scheduler>,
    /// The next step index into the scheduler's timesteps.
    pub step: usize,
    /// The first step index (img2img starts late); control windows count from here.
    pub start_step: usize,
    /// `[2n, T, D]` with guidance (unconditional rows first), `[n, T, D]` without.
    pub embeddings: Tensor,
    pub guidance_scale: f64,
    pub controls: Vec<JobControl>,
    pub noise: Box<dyn NoiseSource + Send>,
    pub inpaint: Option<InpaintBlend>,
}

impl DenoiseJob {
    /// diffusers' rule: guidance runs when the scale is above 1.
    pub fn uses_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }

    pub fn n_images(&self) -> usize {
        self.latents.dims()[0]
    }

    pub fn n_steps(&self) -> usize {
        self.scheduler.num_steps()
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.n_steps()
    }

    /// UNet rows this job takes in a batch.
    pub fn n_rows(&self) -> usize {
        self.n_images() * if self.uses_guidance() { 2 } else { 1 }
    }
}

/// One ControlNet's sub-batch: runs of consecutive batch rows (a job's conditional rows, and its
/// unconditional ones when the control applies to them), in the order they are stacked for the
/// net, each with the per-residual weights of the control that asked for it.
struct NetRows {
    net: Arc<ControlNetModel>,
    /// `(first batch row, rows, hint, weights)`.
    runs: Vec<(usize, usize, Tensor, Vec<f64>)>,
}

/// Consecutive batch rows of one job that take the same controls (its unconditional or its
/// conditional rows), and where their residuals are: `(net entry, first row of its output)`
/// per control, in the job's order of controls.
struct RowResiduals {
    len: usize,
    from: Vec<(usize, usize)>,
}

impl NetRows {
    /// Whether batch rows `first..first + len` are already in this sub-batch (a job using the
    /// same net twice): such a run goes to another call, with rows of its own.
    fn overlaps(&self, first: usize, len: usize) -> bool {
        self.runs
            .iter()
            .any(|&(f, l, _, _)| first < f + l && f < first + len)
    }
}

/// Advances every job by one step with one UNet call. All jobs must share the latent size and
/// the prompt length (a long prompt's embeddings are longer); finished jobs are an error.
/// Any job's failure is the batch's error (see [`step_batch_each`] to tell them apart).
pub fn step_batch(unet: &UNet2DConditionModel, jobs: &mut [&mut DenoiseJob]) -> crate::Result<()> {
    step_batch_each(unet, jobs)?.into_iter().collect()
}

/// [`step_batch`] with failures attributed. The outer error means the shared part (inputs,
/// ControlNets, UNet) failed and no job was changed, so each job may be retried alone to find
/// the culprit. Otherwise each job gets its own outcome from its guidance and scheduler step;
/// a job that failed there is in an unspecified state and must be dropped.
///
/// No host↔device copy happens here (see [`crate::transfer`]): the per-row timesteps and
/// ControlNet weights are filled on the device ([`Tensor::full`]), rows are gathered and
/// scattered with `narrow`/`cat`, and the schedulers apply their coefficients as scalars.
pub fn step_batch_each(
    unet: &UNet2DConditionModel,
    jobs: &mut [&mut DenoiseJob],
) -> crate::Result<Vec<crate::Result<()>>> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let device = unet.device().clone();
    let dtype = unet.dtype();
    let mut inputs = Vec::with_capacity(jobs.len());
    let mut timesteps = Vec::with_capacity(jobs.len());
    let mut embeddings = Vec::with_capacity(jobs.len());
    let mut nets: Vec<NetRows> = Vec::new();
    // Every batch row, in order, in exactly one segment.
    let mut segments: Vec<RowResiduals> = Vec::new();
    let mut row = 0usize;
    for job in jobs.iter() {
        if job.is_done() {
            return Err(crate::Error::Scheduler("a finished job was stepped".into()));
        }
        let n = job.n_images();
        let scaled = job
            .scheduler
            .scale_model_input(&job.latents, job.step)?
            .to_dtype(dtype)?;
        let guided = job.uses_guidance();
        let rows = if guided {
            Tensor::cat(&[&scaled, &scaled], 0)?
        } else {
            scaled
        };
        // The f32 timestep, filled on the device (the UNet embeds it in f32).
        let t = job.scheduler.timesteps()[job.step];
        timesteps.push(transfer::full(t, job.n_rows(), DType::F32, &device)?);
        inputs.push(rows);
        embeddings.push(job.embeddings.to_dtype(dtype)?);

        // The window counts steps from where the job started (img2img starts late).
        let (i, total) = (job.step - job.start_step, job.n_steps() - job.start_step);
        // The job's segments: unconditional rows (when guided), then conditional ones.
        let first_segment = segments.len();
        for _ in 0..if guided { 2 } else { 1 } {
            segments.push(RowResiduals {
                len: n,
                from: Vec::new(),
            });
        }
        for c in &job.controls {
            if !control::is_active(i, total, c.start, c.end) {
                continue;
            }
            let app = control::application(
                c.mode,
                c.scale,
                c.net.n_residuals(),
                c.net.config.global_pool_conditions,
            );
            // Conditional rows follow the unconditional ones when guided.
            let cond_first = row + if guided { n } else { 0 };
            let mut job_runs = vec![cond_first];
            if guided && app.on_uncond {
                job_runs.push(row);
            }
            for first in job_runs {
                let e = match nets
                    .iter()
                    .position(|e| Arc::ptr_eq(&e.net, &c.net) && !e.overlaps(first, n))
                {
                    Some(k) => k,
                    None => {
                        nets.push(NetRows {
                            net: c.net.clone(),
                            runs: Vec::new(),
                        });
                        nets.len() - 1
                    }
                };
                let hint = if n == 1 {
                    c.hint.clone()
                } else {
                    c.hint.repeat((n, 1, 1, 1))?
                };
                let at = nets[e].runs.iter().map(|r| r.1).sum();
                nets[e].runs.push((first, n, hint, app.weights.clone()));
                let segment = first_segment + usize::from(guided && first == cond_first);
                segments[segment].from.push((e, at));
            }
        }
        row += job.n_rows();
    }
    debug_assert_eq!(segments.iter().map(|s| s.len).sum::<usize>(), row);
    let sample = Tensor::cat(&inputs, 0)?;
    let timesteps = Tensor::cat(&timesteps, 0)?;
    let embeddings = Tensor::cat(&embeddings, 0)?;

    let mut outs: Vec<ControlResiduals> = Vec::with_capacity(nets.len());
    for entry in &nets {
        let gather = |t: &Tensor| -> Result<Tensor> {
            let parts = entry
                .runs
                .iter()
                .map(|&(first, len, _, _)| t.narrow(0, first, len))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)
        };
        let n_res = entry.net.n_residuals();
        // `[rows, n_res]`: each run's weights, column by column, filled on the device.
        let weights = entry
            .runs
            .iter()
            .map(|(_, len, _, w)| {
                let cols = w
                    .iter()
                    .map(|&wk| transfer::full(wk as f32 as f64, (*len, 1), DType::F32, &device))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&cols, 1)
            })
            .collect::<Result<Vec<_>>>()?;
        let weights = Tensor::cat(&weights, 0)?;
        debug_assert_eq!(weights.dim(1)?, n_res);
        let hints = entry
            .runs
            .iter()
            .map(|(_, _, h, _)| h.clone())
            .collect::<Vec<_>>();
        outs.push(entry.net.forward_weighted(
            &gather(&sample)?,
            &gather(&timesteps)?,
            &gather(&embeddings)?,
            &Tensor::cat(&hints, 0)?,
            &weights,
        )?);
    }
    let residuals = if outs.is_empty() {
        None
    } else {
        Some(assemble_residuals(&outs, &segments)?)
    };

    let noise_pred = unet.forward(&sample, &timesteps, &embeddings, residuals.as_ref())?;

    let mut offset = 0;
    let mut outcomes = Vec::with_capacity(jobs.len());
    for job in jobs.iter_mut() {
        let rows = noise_pred.narrow(0, offset, job.n_rows())?;
        offset += job.n_rows();
        // A panic in one job's scheduler step fails that job, not the others after it.
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| finish_step(job, rows)))
                .unwrap_or_else(|_| Err(crate::Error::Scheduler("panicked in the step".into())));
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// The batch's residuals from the nets' outputs: each segment's rows get the sum of their own
/// controls' residuals in their job's order (alone, a job sums the same terms in the same
/// order), rows without a control get −0 (which leaves the UNet's `skip + residual` exactly
/// `skip`, as no residual at all does; +0 would turn a −0 skip into +0). Pooled residuals
/// (`[n, C, 1, 1]`, global pooling) are broadcast to the spatial size when another net has it.
fn assemble_residuals(
    outs: &[ControlResiduals],
    segments: &[RowResiduals],
) -> Result<ControlResiduals> {
    let assemble = |pick: &dyn Fn(&ControlResiduals) -> &Tensor| -> Result<Tensor> {
        let first = pick(&outs[0]);
        let mut dims = first.dims().to_vec();
        for o in &outs[1..] {
            for (d, &od) in dims.iter_mut().zip(pick(o).dims()).skip(1) {
                *d = (*d).max(od);
            }
        }
        let mut parts = Vec::with_capacity(segments.len());
        for seg in segments {
            dims[0] = seg.len;
            let mut sum: Option<Tensor> = None;
            for &(e, at) in &seg.from {
                let r = pick(&outs[e]).narrow(0, at, seg.len)?;
                sum = Some(match sum {
                    None => r,
                    Some(acc) => acc.broadcast_add(&r)?,
                });
            }
            parts.push(match sum {
                Some(sum) => sum.broadcast_as(dims.as_slice())?,
                None => transfer::full(-0.0, dims.as_slice(), first.dtype(), first.device())?,
            });
        }
        Tensor::cat(&parts, 0)
    };
    let n_down = outs[0].down.len();
    Ok(ControlResiduals {
        down: (0..n_down)
            .map(|k| assemble(&|o: &ControlResiduals| &o.down[k]))
            .collect::<Result<_>>()?,
        mid: assemble(&|o: &ControlResiduals| &o.mid)?,
    })
}

/// Guidance and the scheduler step for one job, from its rows of the UNet's output.
fn finish_step(job: &mut DenoiseJob, rows: Tensor) -> crate::Result<()> {
    let n = job.n_images();
    let pred = if job.uses_guidance() {
        let uncond = rows.narrow(0, 0, n)?;
        let cond = rows.narrow(0, n, n)?;
        (&uncond + ((cond - &uncond)? * job.guidance_scale)?)?
    } else {
        rows
    };
    let pred = pred.to_dtype(job.latents.dtype())?;
    let step = job.step;
    let mut latents = job
        .scheduler
        .step(&pred, step, &job.latents, job.noise.as_mut())?;
    if let Some(blend) = &job.inpaint {
        let proper = if step + 1 < job.n_steps() {
            job.scheduler
                .add_noise(&blend.image_latents, &blend.noise, step + 1)?
        } else {
            blend.image_latents.clone()
        };
        let keep = (1.0 - &blend.mask)?;
        latents = (proper.broadcast_mul(&keep)? + latents.broadcast_mul(&blend.mask)?)?;
    }
    job.latents = latents;
    job.step += 1;
    Ok(())
}
