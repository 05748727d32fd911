//! The device worker: owns the base models, admits jobs between steps, steps every group of
//! jobs that can share a UNet call, and decodes finished jobs together.
use candle_core::Tensor;
use diffusion::denoise::{self, DenoiseJob};
use diffusion::pipeline::StableDiffusion;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::queue::{Queue, Queued, Take};
use crate::{EngineConfig, EngineError, Event, Stats, Ticket};

struct Running {
    job: DenoiseJob,
    model: usize,
    seeds: Vec<u64>,
    ticket: Ticket,
    /// Set when the job failed; it leaves at the end of the step.
    failed: bool,
}

impl Running {
    /// Jobs share a UNet call when they are on the same base model and their latents and
    /// prompt embeddings have the same shape.
    fn batch_key(&self) -> (usize, Vec<usize>, usize) {
        let latent = self.job.latents.dims()[1..].to_vec();
        let tokens = self.job.embeddings.dims()[1];
        (self.model, latent, tokens)
    }

    fn fail(&mut self, e: EngineError) {
        self.ticket.send(Event::Failed(e));
        self.failed = true;
    }
}

/// Prompt embeddings by (model, prompt, negative prompt, clip skip, guided), least recently
/// used out first.
struct PromptCache {
    capacity: usize,
    tick: u64,
    entries: HashMap<(usize, String, String, usize, bool), (Tensor, u64)>,
}

impl PromptCache {
    fn get_or_insert(
        &mut self,
        key: (usize, String, String, usize, bool),
        stats: &Stats,
        make: impl FnOnce() -> diffusion::Result<Tensor>,
    ) -> diffusion::Result<Tensor> {
        self.tick += 1;
        if let Some((t, used)) = self.entries.get_mut(&key) {
            *used = self.tick;
            stats.prompt_cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(t.clone());
        }
        stats.prompt_cache_misses.fetch_add(1, Ordering::Relaxed);
        let t = make()?;
        if self.capacity == 0 {
            return Ok(t);
        }
        if self.entries.len() >= self.capacity {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.entries.remove(&k);
            }
        }
        self.entries.insert(key, (t.clone(), self.tick));
        Ok(t)
    }
}

pub(crate) struct Worker {
    models: Vec<StableDiffusion>,
    queue: Arc<Queue>,
    stats: Arc<Stats>,
    config: EngineConfig,
    running: Vec<Running>,
    prompts: PromptCache,
}

/// A panic's message, for the job's error.
pub(crate) fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

impl Worker {
    pub fn new(
        models: Vec<StableDiffusion>,
        queue: Arc<Queue>,
        stats: Arc<Stats>,
        config: EngineConfig,
    ) -> Self {
        Self {
            models,
            queue,
            stats,
            config,
            running: Vec::new(),
            prompts: PromptCache {
                capacity: config.prompt_cache,
                tick: 0,
                entries: HashMap::new(),
            },
        }
    }

    pub fn run(mut self) {
        loop {
            self.queue.sweep();
            let images: usize = self.running.iter().map(|r| r.job.n_images()).sum();
            let room = self.config.max_batch.saturating_sub(images);
            let idle = self.running.is_empty();
            let delay = if idle {
                self.config.max_queue_delay
            } else {
                std::time::Duration::ZERO
            };
            match self.queue.take(room, idle, delay) {
                Take::Closed => return,
                Take::Work(jobs, annotation) => {
                    for j in jobs {
                        self.admit(j);
                    }
                    if let Some(task) = annotation {
                        task.run();
                    }
                }
            }
            self.drop_stopped();
            self.publish();
            if self.running.is_empty() {
                continue;
            }
            self.step_groups();
            self.finish();
            self.publish();
        }
    }

    fn publish(&self) {
        let images: usize = self.running.iter().map(|r| r.job.n_images()).sum();
        self.stats
            .running_jobs
            .store(self.running.len(), Ordering::SeqCst);
        self.stats.running_images.store(images, Ordering::SeqCst);
    }

    /// Turns a queued job into a running one (prompt embeddings, initial latents).
    fn admit(&mut self, q: Queued) {
        if let Some(reason) = q.ticket.stop_reason(Instant::now()) {
            q.ticket.send(Event::Failed(reason));
            return;
        }
        metrics::histogram!("engine_queue_seconds").record(q.enqueued.elapsed().as_secs_f64());
        let model = &self.models[q.model];
        let req = &q.request;
        let guided = req.guidance_scale > 1.0;
        let key = (
            q.model,
            req.prompt.clone(),
            req.negative_prompt.clone(),
            req.clip_skip,
            guided,
        );
        let prompts = &mut self.prompts;
        let stats = &self.stats;
        let made = catch_unwind(AssertUnwindSafe(|| {
            let embeddings = prompts.get_or_insert(key, stats, || {
                model.prompt_embeddings(&req.prompt, &req.negative_prompt, req.clip_skip, guided)
            })?;
            model.new_job_with_embeddings(req, &embeddings)
        }));
        match made {
            Ok(Ok(job)) => {
                q.ticket.send(Event::Started);
                let seeds = (0..req.num_images as u64)
                    .map(|k| req.seed.wrapping_add(k))
                    .collect();
                self.running.push(Running {
                    job,
                    model: q.model,
                    seeds,
                    ticket: q.ticket,
                    failed: false,
                });
            }
            Ok(Err(e)) => q
                .ticket
                .send(Event::Failed(EngineError::Invalid(e.to_string()))),
            Err(p) => q.ticket.send(Event::Failed(EngineError::Failed(format!(
                "internal error: {}",
                panic_message(p)
            )))),
        }
    }

    /// Drops cancelled jobs, jobs whose caller has gone, and jobs past their deadline.
    fn drop_stopped(&mut self) {
        let now = Instant::now();
        self.running.retain(|r| match r.ticket.stop_reason(now) {
            None => true,
            Some(reason) => {
                r.ticket.send(Event::Failed(reason));
                false
            }
        });
    }

    /// One step for every group of jobs that can share a UNet call, in order of arrival.
    fn step_groups(&mut self) {
        let mut keys: Vec<(usize, Vec<usize>, usize)> = Vec::new();
        for r in &self.running {
            let k = r.batch_key();
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        for key in keys {
            let model = &self.models[key.0];
            let mut group: Vec<&mut Running> = self
                .running
                .iter_mut()
                .filter(|r| r.batch_key() == key)
                .collect();
            let started = Instant::now();
            let rows: usize = group.iter().map(|r| r.job.n_rows()).sum();
            let shared = {
                let mut jobs: Vec<&mut DenoiseJob> = group.iter_mut().map(|r| &mut r.job).collect();
                catch_unwind(AssertUnwindSafe(|| {
                    denoise::step_batch_each(&model.unet, &mut jobs)
                }))
            };
            self.stats.steps_run.fetch_add(1, Ordering::SeqCst);
            self.stats.last_batch_rows.store(rows, Ordering::SeqCst);
            metrics::histogram!("engine_step_seconds").record(started.elapsed().as_secs_f64());
            metrics::histogram!("engine_batch_rows").record(rows as f64);
            match shared {
                Ok(Ok(outcomes)) => {
                    for (r, outcome) in group.into_iter().zip(outcomes) {
                        report_step(r, outcome);
                    }
                }
                // The shared part failed before any job changed: find the culprit by running
                // each job alone, so one bad job does not take the others down.
                failure => {
                    let reason = match failure {
                        Ok(Err(e)) => e.to_string(),
                        Err(p) => format!("internal error: {}", panic_message(p)),
                        Ok(Ok(_)) => unreachable!(),
                    };
                    if group.len() == 1 {
                        group[0].fail(EngineError::Failed(reason));
                        continue;
                    }
                    for r in group {
                        let alone = catch_unwind(AssertUnwindSafe(|| {
                            denoise::step_batch_each(&model.unet, &mut [&mut r.job])
                        }));
                        self.stats.steps_run.fetch_add(1, Ordering::SeqCst);
                        match alone {
                            Ok(Ok(mut outcome)) => report_step(r, outcome.remove(0)),
                            Ok(Err(e)) => r.fail(EngineError::Failed(e.to_string())),
                            Err(p) => r.fail(EngineError::Failed(format!(
                                "internal error: {}",
                                panic_message(p)
                            ))),
                        }
                    }
                }
            }
        }
    }

    /// Removes failed and finished jobs; decodes the finished ones, a batch per model and size.
    fn finish(&mut self) {
        let (done, running): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.running)
            .into_iter()
            .filter(|r| !r.failed)
            .partition(|r| r.job.is_done());
        self.running = running;
        let mut groups: Vec<Vec<Running>> = Vec::new();
        for r in done {
            match groups.iter_mut().find(|g| {
                g[0].model == r.model && g[0].job.latents.dims()[1..] == r.job.latents.dims()[1..]
            }) {
                Some(g) => g.push(r),
                None => groups.push(vec![r]),
            }
        }
        for group in groups {
            let model = &self.models[group[0].model];
            let started = Instant::now();
            let decoded = catch_unwind(AssertUnwindSafe(|| {
                let latents: Vec<&Tensor> = group.iter().map(|r| &r.job.latents).collect();
                model.decode(&Tensor::cat(&latents, 0)?)
            }));
            metrics::histogram!("engine_decode_seconds").record(started.elapsed().as_secs_f64());
            match decoded {
                Ok(Ok(mut images)) => {
                    for r in group {
                        let rest = images.split_off(r.job.n_images());
                        let mine = std::mem::replace(&mut images, rest);
                        done_event(r, Ok(mine));
                    }
                }
                // Decode each alone so only the job that fails, fails.
                _ => {
                    for r in group {
                        let alone = catch_unwind(AssertUnwindSafe(|| model.decode(&r.job.latents)));
                        let result = match alone {
                            Ok(Ok(images)) => Ok(images),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(p) => Err(format!("internal error: {}", panic_message(p))),
                        };
                        done_event(r, result);
                    }
                }
            }
        }
    }
}

fn report_step(r: &mut Running, outcome: diffusion::Result<()>) {
    match outcome {
        Ok(()) => {
            let total = r.job.n_steps() - r.job.start_step;
            let step = r.job.step - r.job.start_step;
            r.ticket.send(Event::Step { step, total });
        }
        Err(e) => r.fail(EngineError::Failed(e.to_string())),
    }
}

fn done_event(r: Running, images: Result<Vec<image::RgbImage>, String>) {
    let event = match images {
        Ok(images) => Event::Done {
            images,
            seeds: r.seeds,
            latents: r.job.latents,
        },
        Err(e) => Event::Failed(EngineError::Failed(e)),
    };
    r.ticket.send(event);
}
