//! Every host↔device copy this crate makes, in one place, counted.
//!
//! On CUDA a tensor made from host data (`Tensor::new` / `from_vec` / `from_slice`, or
//! `to_device` from the CPU) is a host→device copy, and reading a tensor back (`to_vec*`,
//! `to_scalar`, `to_device(&Cpu)`) a device→host copy that also waits for the device. A
//! generation may copy only before its denoising loop (prompt tokens, hints, the init image and
//! its mask, the initial noise — all the noise a stochastic scheduler will draw included) and
//! after it (the images); nothing per step. The crate makes its copies through the functions
//! here, which count them in process-wide counters ([`counts`]), so tests (and the engine) can
//! check that a generation's copies do not grow with its step count; a test scans the per-step
//! sources for raw copies outside this module.
//!
//! Counting is by call, whatever the device: on the CPU nothing is copied, but the calls are the
//! ones that would copy on CUDA, so CPU tests check the property. Weights are not counted: they
//! are loaded (by candle's var builders) before any generation.
//!
//! Also here: candle's ops that copy behind one's back. `Tensor::clamp` / `maximum` / `minimum`
//! with a scalar make a CPU tensor of it and upload it; [`clamp`] fills its bounds on the device
//! instead ([`Tensor::full`] is a fill kernel, not a copy).
use candle_core::{DType, Device, Result, Shape, Tensor, WithDType};
use std::sync::atomic::{AtomicU64, Ordering};

static HOST_TO_DEVICE: AtomicU64 = AtomicU64::new(0);
static DEVICE_TO_HOST: AtomicU64 = AtomicU64::new(0);

/// Copies made so far by this process (through this module), by direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub host_to_device: u64,
    pub device_to_host: u64,
}

impl Counts {
    /// The copies made since `earlier`.
    pub fn since(self, earlier: Counts) -> Counts {
        Counts {
            host_to_device: self.host_to_device - earlier.host_to_device,
            device_to_host: self.device_to_host - earlier.device_to_host,
        }
    }
}

/// The counters now. They only grow; take differences ([`Counts::since`]). They are
/// process-wide, so a measurement is exact only while no other thread generates.
pub fn counts() -> Counts {
    Counts {
        host_to_device: HOST_TO_DEVICE.load(Ordering::Relaxed),
        device_to_host: DEVICE_TO_HOST.load(Ordering::Relaxed),
    }
}

fn uploaded() {
    HOST_TO_DEVICE.fetch_add(1, Ordering::Relaxed);
}

fn downloaded() {
    DEVICE_TO_HOST.fetch_add(1, Ordering::Relaxed);
}

/// Host values → a tensor of `shape` on `device` (one host→device copy).
pub fn upload<T: WithDType>(
    values: Vec<T>,
    shape: impl Into<Shape>,
    device: &Device,
) -> Result<Tensor> {
    uploaded();
    Tensor::from_vec(values, shape, device)
}

/// A host (CPU) tensor moved to `device` (one host→device copy; none made when `device` is the
/// CPU, but counted the same).
pub fn to_device(t: &Tensor, device: &Device) -> Result<Tensor> {
    uploaded();
    t.to_device(device)
}

/// A tensor's values on the host, row-major (one device→host copy).
pub fn download<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    downloaded();
    t.flatten_all()?.to_vec1::<T>()
}

/// `t` limited to `lo..=hi` (in `t`'s dtype), with the bounds filled on the device: candle's
/// `clamp` with scalars uploads them.
pub fn clamp(t: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let bound = |v: f64| full(v, (), t.dtype(), t.device())?.broadcast_as(t.shape());
    t.maximum(&bound(lo)?)?.minimum(&bound(hi)?)
}

/// A `shape` tensor of `value` in `dtype`, filled on the device (no copy).
pub fn full(value: f64, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    match dtype {
        DType::F64 => Tensor::full(value, shape, device),
        // Exactly the f32 value, as `Tensor::new(value as f32)` would have uploaded (and no f64
        // on devices that lack it); narrower dtypes are cast from it on the device.
        DType::F32 => Tensor::full(value as f32, shape, device),
        _ => Tensor::full(value as f32, shape, device)?.to_dtype(dtype),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_matches_candles_and_counts_nothing() {
        let x = Tensor::new(&[-3.0f32, -0.5, 0.0, 1e-8, 0.7, 2.0], &Device::Cpu).unwrap();
        let ours: Vec<f32> = clamp(&x, -1.0, 1.0).unwrap().to_vec1().unwrap();
        let candle: Vec<f32> = x.clamp(-1f32, 1f32).unwrap().to_vec1().unwrap();
        assert_eq!(ours, candle);
        let h = x.to_dtype(DType::F16).unwrap();
        let ours = clamp(&h, 0.0, 0.5).unwrap();
        assert_eq!(ours.dtype(), DType::F16);
        let back: Vec<f32> = ours.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        // f16 rounds 1e-8 to 0 (below its smallest subnormal, ~6e-8).
        assert_eq!(back, [0.0, 0.0, 0.0, 0.0, 0.5, 0.5]);
    }

    #[test]
    fn full_f32_is_the_f32_value() {
        let t = full(0.1, 3, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap(), [0.1f32; 3]);
    }
}
