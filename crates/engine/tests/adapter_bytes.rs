//! The adapter memory budget counts the bytes the weights take on the device: for each tensor,
//! its elements times its dtype's size in the dtype the adapters are loaded as (f16/bf16 2,
//! f32 4), whatever the file stores; and it evicts by those bytes.
use candle_core::{DType, Device};
use engine::{AdapterRegistry, AdapterSettings};
use std::path::Path;

fn registry(dtype: DType, budget: Option<u64>, roots: Vec<std::path::PathBuf>) -> AdapterRegistry {
    AdapterRegistry::new(AdapterSettings {
        roots,
        budget_bytes: budget,
        dtype,
        device: Device::Cpu,
    })
    .unwrap()
}

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../diffusion/tests/fixtures/controlnet_sd15")
}

#[test]
fn an_adapters_bytes_are_its_tensors_elements_times_the_dtype_size() {
    // A diffusers ControlNet stored in f16: its elements, counted from the file.
    let dir = fixture();
    let tensors = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(tensors.values().all(|t| t.dtype() == DType::F16));
    let elements: usize = tensors.values().map(|t| t.elem_count()).sum();
    let root = dir.parent().unwrap().to_path_buf();
    for (dtype, size) in [(DType::F32, 4), (DType::F16, 2), (DType::BF16, 2)] {
        let reg = registry(dtype, None, vec![root.clone()]);
        let info = reg.put("canny", "controlnet_sd15").unwrap();
        // Loaded as f32, the f16 file takes twice its size on the device.
        assert_eq!(info.bytes, Some(elements * size), "{dtype:?}");
        assert_eq!(reg.counters().bytes_held, (elements * size) as u64);
    }
}

#[test]
fn the_same_adapter_as_f32_counts_twice_its_f16_size() {
    let bytes = |dtype| {
        let reg = registry(dtype, None, vec![]);
        reg.put("a", "embedded:1").unwrap().bytes.unwrap()
    };
    let (f32_bytes, f16_bytes, bf16_bytes) =
        (bytes(DType::F32), bytes(DType::F16), bytes(DType::BF16));
    assert!(f16_bytes > 0);
    assert_eq!(f32_bytes, 2 * f16_bytes);
    assert_eq!(bf16_bytes, f16_bytes);
}

#[test]
fn the_budget_evicts_by_the_loaded_dtypes_bytes() {
    let f16_bytes = registry(DType::F16, None, vec![])
        .put("a", "embedded:1")
        .unwrap()
        .bytes
        .unwrap() as u64;
    // Room for two f16 adapters, or one f32 adapter.
    let budget = Some(2 * f16_bytes + f16_bytes / 2);
    let half = registry(DType::F16, budget, vec![]);
    half.put("a", "embedded:1").unwrap();
    half.put("b", "embedded:2").unwrap();
    assert!(half.get("a").unwrap().resident && half.get("b").unwrap().resident);
    assert_eq!(half.counters().evictions, 0);
    assert_eq!(half.counters().bytes_held, 2 * f16_bytes);

    let full = registry(DType::F32, budget, vec![]);
    full.put("a", "embedded:1").unwrap();
    full.put("b", "embedded:2").unwrap();
    assert!(!full.get("a").unwrap().resident && full.get("b").unwrap().resident);
    assert_eq!(full.counters().evictions, 1);
    assert_eq!(full.counters().bytes_held, 2 * f16_bytes);
    // An evicted adapter keeps its size, in the loaded dtype, for the next admission check.
    assert_eq!(full.get("a").unwrap().bytes, Some(2 * f16_bytes as usize));
}
