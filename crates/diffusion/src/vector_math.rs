//! Vectorised f32 kernels for the CPU fast paths: the exponential of a softmax row.
//!
//! candle's CPU softmax calls the C library's scalar `expf` once per score, which a profile of
//! a step put at about 5 % of its time. Here `exp` is Cephes' `expf` (range reduction by
//! `ln 2` in two parts, a degree-7 polynomial on `[-ln2/2, ln2/2]`, the power of two put in the
//! exponent bits): within 2 ulp of the exact value on `[-87.3, 88.7]`, 0 below that (where the
//! exact value is subnormal), +∞ above, NaN kept.
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

/// `row[i] = exp(row[i] - shift)`; returns the sum of the new values (summed in 16 lanes, then
/// across them, in a fixed order).
pub fn exp_shifted_sum(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the variant is compiled for.
            return unsafe { exp_shifted_sum_avx512(row, shift) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { exp_shifted_sum_avx2(row, shift) };
        }
    }
    exp_shifted_sum_body(row, shift)
}

/// The largest value of `row` (−∞ for an empty row; NaN when any value is NaN).
pub fn max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the variant is compiled for.
            return unsafe { max_avx512(row) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { max_avx2(row) };
        }
    }
    max_body(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_sum_avx512(row: &mut [f32], shift: f32) -> f32 {
    exp_shifted_sum_body(row, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_shifted_sum_avx2(row: &mut [f32], shift: f32) -> f32 {
    exp_shifted_sum_body(row, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_avx512(row: &[f32]) -> f32 {
    max_body(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn max_avx2(row: &[f32]) -> f32 {
    max_body(row)
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
    fn every_variant_gives_the_same_bits() {
        let row: Vec<f32> = (0..999).map(|i| (i as f32 * 0.731).sin() * 40.0).collect();
        let mut base = row.clone();
        let base_sum = exp_shifted_sum_body(&mut base, 3.0);
        let mut best = row.clone();
        let best_sum = exp_shifted_sum(&mut best, 3.0);
        assert_eq!(base_sum.to_bits(), best_sum.to_bits());
        assert_eq!(base, best);
        assert_eq!(max_body(&row).to_bits(), max(&row).to_bits());
    }
}
