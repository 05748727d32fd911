//! A1111's prompt syntax through the engine: the prompt cache keeps the two readings of the
//! same text apart, and each gives what the pipeline gives alone.
use candle_core::{DType, Device, Tensor};
use diffusion::pipeline::{Request, StableDiffusion};
use diffusion::prompt_syntax::PromptSyntax;
use engine::{AdapterRegistry, AdapterSettings, Engine, EngineConfig, Event, Job};
use std::sync::Arc;

fn model() -> StableDiffusion {
    StableDiffusion::embedded(DType::F32, &Device::Cpu).unwrap()
}

fn engine() -> Engine {
    let registry = AdapterRegistry::new(AdapterSettings {
        roots: vec![],
        budget_bytes: None,
        dtype: DType::F32,
        device: Device::Cpu,
    })
    .unwrap();
    Engine::start(
        vec![("tiny".into(), model())],
        Arc::new(registry),
        EngineConfig::default(),
    )
}

fn request(syntax: PromptSyntax) -> Request {
    let mut req = Request::txt2img("a (red:1.4) cube, [blurry]", 64, 48);
    req.negative_prompt = "(low quality)".into();
    req.steps = 2;
    req.seed = 7;
    req.prompt_syntax = syntax;
    req
}

async fn latents(engine: &Engine, req: Request) -> Tensor {
    let mut handle = engine.submit(Job::new(req)).unwrap();
    while let Some(event) = handle.events.recv().await {
        match event {
            Event::Done { latents, .. } => return latents,
            Event::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    panic!("no result")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn the_prompt_cache_keeps_the_syntaxes_apart() {
    let engine = engine();
    let plain = latents(&engine, request(PromptSyntax::Plain)).await;
    let a1111 = latents(&engine, request(PromptSyntax::A1111)).await;
    let status = engine.status();
    assert_eq!(
        (status.prompt_cache_hits, status.prompt_cache_misses),
        (0, 2)
    );
    let again = latents(&engine, request(PromptSyntax::A1111)).await;
    assert_eq!(engine.status().prompt_cache_hits, 1);
    assert_eq!(max_abs_diff(&a1111, &again), 0.0);
    assert!(max_abs_diff(&plain, &a1111) > 0.0);

    // Each is what the pipeline makes alone.
    let sd = model();
    for (syntax, got) in [(PromptSyntax::Plain, &plain), (PromptSyntax::A1111, &a1111)] {
        let req = request(syntax);
        let mut job = sd.new_job(&req).unwrap();
        while !job.is_done() {
            diffusion::denoise::step_batch(&sd.unet, &mut [&mut job]).unwrap();
        }
        let d = max_abs_diff(&job.latents, got);
        assert!(d <= 1e-5, "{syntax:?}: {d}");
    }
}
