//! Vectorised f32 kernels for the CPU fast paths: the exponential of a softmax row, SiLU and
//! GEGLU (exact, erf-based GELU).
//!
//! candle's CPU softmax, SiLU and GELU call the C library's scalar `expf`/`erff` once per
//! element, which a profile of a step put at about 8 % of its time.
//! - `exp` is Cephes' `expf` (range reduction by `ln 2` in two parts, a degree-7 polynomial on
//!   `[-ln2/2, ln2/2]`, the power of two put in the exponent bits): within 2 ulp of the exact
//!   value on `[-87.3, 88.7]`, 0 below that (where the exact value is subnormal), +∞ above,
//!   NaN kept.
//! - `erf` is Norbert Juffa's minimax `erff` (`x·P(x²)` below 0.9277, `1 − exp(Q(|x|))`
//!   above), within 2 ulp.
//! - SiLU and GELU are then written as candle writes them: `x / (1 + exp(−x))` and
//!   `(erf(x/√2) + 1)·0.5·x`.
//!
//! The code is plain Rust on 16-lane arrays, which the compiler turns into SIMD; it is compiled
//! three times (AVX-512, AVX2, the baseline) and the best one the CPU has is chosen at run
//! time, so the binary stays portable. No fused multiply-adds are used, and sums run in 16
//! lanes in a fixed order, so every variant, and every machine, gives the same bits.

const LANES: usize = 16;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// `ln 2 = LN2_HI + LN2_LO`, `LN2_HI` with few enough bits that `n·LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2²³: adding it to `|y| < 2²²` rounds `y` to an integer held in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;
const ROUND_MAGIC_BITS: i32 = 0x4B40_0000;
/// The smallest f32 whose exponential is a normal f32; below it the result is flushed to 0.
const MIN_X: f32 = -87.336_54;
/// The largest f32 below `ln(f32::MAX)`: above it the result is +∞.
const MAX_X: f32 = 88.722_83;

#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    let xc = x.clamp(MIN_X, MAX_X);
    let t = xc * LOG2_E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let n_int = t.to_bits() as i32 - ROUND_MAGIC_BITS;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * (r * r) + r + 1.0;
    // 2ⁿ as two halves: n reaches 128, whose single power of two is not a finite f32.
    let half = n_int >> 1;
    let two_half = f32::from_bits(((half + 127) << 23) as u32);
    let two_rest = f32::from_bits(((n_int - half + 127) << 23) as u32);
    let y = e_r * two_half * two_rest;
    if x < MIN_X {
        0.0
    } else if x > MAX_X {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

#[inline(always)]
fn erf_lane(x: f32) -> f32 {
    let t = x.abs();
    let s = x * x;
    // Both branches, then a select: what the vectoriser wants.
    let mut r = -1.728_534_7e-5_f32 * t + 3.831_971_3e-4;
    let u = -3.883_964_4e-3_f32 * t + 2.425_462_2e-2;
    r = r * s + u;
    r = r * t - 1.067_778_8e-1;
    r = r * t - 6.348_467e-1;
    r = r * t - 1.287_175_1e-1;
    r = r * t - t;
    let large = (1.0 - exp_lane(r)).copysign(x);
    let mut q = -5.967_617e-4_f32;
    q = q * s + 4.991_194_2e-3;
    q = q * s - 2.676_813_5e-2;
    q = q * s + 1.128_199_3e-1;
    q = q * s - 3.761_253_4e-1;
    q = q * s + 1.283_791_7e-1;
    let small = q * x + x;
    if x.is_nan() {
        x
    } else if t > 0.927_734_4 {
        large
    } else {
        small
    }
}

#[inline(always)]
fn gelu_lane(x: f32) -> f32 {
    (erf_lane(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x
}

#[inline(always)]
fn silu_lane(x: f32) -> f32 {
    x / (1.0 + exp_lane(-x))
}

/// Compiles `$body` (an `#[inline(always)]` function) for AVX-512, AVX2 and the baseline and
/// calls the best variant the CPU has.
macro_rules! dispatch {
    ($body:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) -> $ret {
                $body($($arg),*)
            }
            #[target_feature(enable = "avx2")]
            unsafe fn avx2($($arg: $ty),*) -> $ret {
                $body($($arg),*)
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has the features the variant is compiled for.
                return unsafe { avx512($($arg),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: as above.
                return unsafe { avx2($($arg),*) };
            }
        }
        $body($($arg),*)
    }};
}

/// `out[i] = silu(x[i])`.
pub fn silu(x: &[f32], out: &mut [f32]) {
    dispatch!(silu_body(x: &[f32], out: &mut [f32]) -> ())
}

#[inline(always)]
fn silu_body(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    for (o, &v) in out.iter_mut().zip(x) {
        *o = silu_lane(v);
    }
}

/// `out[i] = hidden[i] · gelu(gate[i])` (diffusers' GEGLU, exact GELU).
pub fn geglu(hidden: &[f32], gate: &[f32], out: &mut [f32]) {
    dispatch!(geglu_body(hidden: &[f32], gate: &[f32], out: &mut [f32]) -> ())
}

#[inline(always)]
fn geglu_body(hidden: &[f32], gate: &[f32], out: &mut [f32]) {
    assert!(hidden.len() == out.len() && gate.len() == out.len());
    for ((o, &h), &g) in out.iter_mut().zip(hidden).zip(gate) {
        *o = h * gelu_lane(g);
    }
}

/// `row[i] = exp(row[i] - shift)`; returns the sum of the new values (summed in 16 lanes, then
/// across them, in a fixed order).
pub fn exp_shifted_sum(row: &mut [f32], shift: f32) -> f32 {
    dispatch!(exp_shifted_sum_body(row: &mut [f32], shift: f32) -> f32)
}

/// The largest value of `row` (−∞ for an empty row; NaN when any value is NaN).
pub fn max(row: &[f32]) -> f32 {
    dispatch!(max_body(row: &[f32]) -> f32)
}

#[inline(always)]
fn exp_shifted_sum_body(row: &mut [f32], shift: f32) -> f32 {
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (lane, value) in chunk.iter_mut().enumerate() {
            let e = exp_lane(*value - shift);
            *value = e;
            sums[lane] += e;
        }
    }
    for (lane, value) in chunks.into_remainder().iter_mut().enumerate() {
        let e = exp_lane(*value - shift);
        *value = e;
        sums[lane] += e;
    }
    reduce(sums, |a, b| a + b)
}

#[inline(always)]
fn max_body(row: &[f32]) -> f32 {
    let mut maxima = [f32::NEG_INFINITY; LANES];
    let mut nan = false;
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &value) in chunk.iter().enumerate() {
            nan |= value.is_nan();
            maxima[lane] = if value > maxima[lane] {
                value
            } else {
                maxima[lane]
            };
        }
    }
    for (lane, &value) in chunks.remainder().iter().enumerate() {
        nan |= value.is_nan();
        maxima[lane] = maxima[lane].max(value);
    }
    if nan {
        return f32::NAN;
    }
    reduce(maxima, f32::max)
}

/// Pairwise across the lanes, always in the same order.
#[inline(always)]
fn reduce(mut lanes: [f32; LANES], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] = op(lanes[i], lanes[i + width]);
        }
        width /= 2;
    }
    lanes[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_over_its_range() {
        // Every 997th f32 between the bounds, and the neighbourhood of each bound.
        let mut worst = 0;
        let mut x = MIN_X;
        let mut row = Vec::new();
        while x < MAX_X {
            row.push(x);
            x = f32::from_bits(x.to_bits().wrapping_add(if x < 0.0 {
                -997i32 as u32
            } else {
                997
            }));
            if x == 0.0 || (x < 0.0 && x > -1e-30) {
                x = 1e-30;
            }
        }
        let expected: Vec<f32> = row.iter().map(|&x| (x as f64).exp() as f32).collect();
        exp_shifted_sum(&mut row, 0.0);
        for (got, want) in row.iter().zip(&expected) {
            worst = worst.max(ulps(*got, *want));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn exp_edges() {
        let mut row = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            MAX_X,
            MIN_X,
            89.0,
            -88.0,
            -1000.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
        ];
        exp_shifted_sum(&mut row, 0.0);
        assert_eq!(row[0], 1.0);
        assert_eq!(row[1], 1.0);
        assert!(ulps(row[2], std::f32::consts::E) <= 1);
        assert!(ulps(row[3], 1.0 / std::f32::consts::E) <= 1);
        let exact = |x: f32| (x as f64).exp() as f32;
        assert!(
            row[4].is_finite() && ulps(row[4], exact(MAX_X)) <= 2,
            "{}",
            row[4]
        );
        assert!(
            row[5] >= f32::MIN_POSITIVE && ulps(row[5], exact(MIN_X)) <= 2,
            "{}",
            row[5]
        );
        assert_eq!(row[6], f32::INFINITY);
        assert_eq!(&row[7..10], &[0.0, 0.0, 0.0]);
        assert_eq!(row[10], f32::INFINITY);
        assert!(row[11].is_nan());
    }

    #[test]
    fn shifted_sum_and_max_match_scalar_code() {
        let row: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37)
            .collect();
        let m = max(&row);
        assert_eq!(m, row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let mut exps = row.clone();
        let sum = exp_shifted_sum(&mut exps, m);
        let want: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
        assert!(((sum as f64 - want) / want).abs() < 1e-6, "{sum} vs {want}");
        for (e, x) in exps.iter().zip(&row) {
            assert!(ulps(*e, ((x - m) as f64).exp() as f32) <= 2);
        }
        assert!(max(&[1.0, f32::NAN, 2.0]).is_nan());
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn erf_gelu_and_silu_are_within_a_few_ulp() {
        let xs: Vec<f32> = (-600_000..=600_000)
            .map(|i| i as f32 * 1e-5)
            .chain((-300..=100).map(|e| 10f32.powf(e as f32 / 10.0)))
            .chain([
                0.0,
                -0.0,
                20.0,
                -20.0,
                100.0,
                -100.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
            ])
            .collect();
        let erf = |x: f32| candle_core::cpu::erf::erf_f64(x as f64);
        let worst = xs
            .iter()
            .map(|&x| ulps(erf_lane(x), erf(x) as f32))
            .max()
            .unwrap();
        assert!(worst <= 2, "erf: {worst} ulp");
        // GELU, against the formula in f64 from the same rounded argument, as candle computes
        // it. `1 + erf` cancels for negative x, so the bound is relative to x: within 2 ulp of
        // x (as any f32 erf, libm's too, gives).
        for &x in xs.iter().filter(|x| x.is_finite()) {
            let arg = x * std::f32::consts::FRAC_1_SQRT_2;
            let want = (erf(arg) + 1.0) * 0.5 * x as f64;
            let got = gelu_lane(x) as f64;
            let bound = 2.0 * f32::EPSILON as f64 * x.abs() as f64;
            assert!((got - want).abs() <= bound, "gelu({x}) = {got}, not {want}");
        }
        let mut out = vec![0.0; xs.len()];
        silu(&xs, &mut out);
        for (&x, &got) in xs.iter().zip(&out) {
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            if x.is_finite() && x > -80.0 {
                assert!(ulps(got, want as f32) <= 3, "silu({x}) = {got}, not {want}");
            }
        }
        assert_eq!(out[xs.len() - 2], f32::INFINITY);
        assert!(erf_lane(f32::NAN).is_nan() && silu_lane(f32::NAN).is_nan());
        assert_eq!(erf_lane(f32::INFINITY), 1.0);
        assert_eq!(erf_lane(f32::NEG_INFINITY), -1.0);
    }

    #[test]
    fn every_variant_gives_the_same_bits() {
        let row: Vec<f32> = (0..999).map(|i| (i as f32 * 0.731).sin() * 40.0).collect();
        let mut base = row.clone();
        let base_sum = exp_shifted_sum_body(&mut base, 3.0);
        let mut best = row.clone();
        let best_sum = exp_shifted_sum(&mut best, 3.0);
        assert_eq!(base_sum.to_bits(), best_sum.to_bits());
        assert_eq!(base, best);
        assert_eq!(max_body(&row).to_bits(), max(&row).to_bits());
        let gate: Vec<f32> = row.iter().map(|x| x * 0.1).collect();
        let (mut base, mut best) = (vec![0.0; row.len()], vec![0.0; row.len()]);
        geglu_body(&row, &gate, &mut base);
        geglu(&row, &gate, &mut best);
        assert_eq!(base, best);
        silu_body(&gate, &mut base);
        silu(&gate, &mut best);
        assert_eq!(base, best);
    }
}
