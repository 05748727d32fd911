//! numpy / scipy operations some references apply to their `float64` arrays, written to follow
//! numpy's and scipy's own C code in precision and summation order (so bit-exact, not merely
//! close). Each function states which call it stands for; `neural-annotators`' OpenPose tests
//! measure that against scipy 1.17's output.
//!
//! Arrays are row-major `f64` slices with their `width`×`height` passed alongside.

/// `np.sum` of a contiguous `float64` array: numpy's reduction starts from the identity `0.0`
/// and adds `pairwise_sum` of the whole array — under 8 values a plain loop; up to 128 eight
/// partial sums over blocks of 8 combined as `((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))`,
/// then the leftover values in order; longer arrays split in two at `n / 2` rounded down to a
/// multiple of 8, each half summed the same way.
pub fn numpy_sum(a: &[f64]) -> f64 {
    fn pairwise(a: &[f64]) -> f64 {
        let n = a.len();
        if n < 8 {
            let mut res = 0.0;
            for &v in a {
                res += v;
            }
            res
        } else if n <= 128 {
            let mut r = [0f64; 8];
            r.copy_from_slice(&a[..8]);
            let mut i = 8;
            while i < n - n % 8 {
                for j in 0..8 {
                    r[j] += a[i + j];
                }
                i += 8;
            }
            let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
            while i < n {
                res += a[i];
                i += 1;
            }
            res
        } else {
            let mut n2 = n / 2;
            n2 -= n2 % 8;
            pairwise(&a[..n2]) + pairwise(&a[n2..])
        }
    }
    0.0 + pairwise(a)
}

/// `scipy.ndimage._filters._gaussian_kernel1d(sigma, 0, radius)`: `phi = exp(-0.5 / sigma² · x²)`
/// over `x = -radius..=radius` (`sigma²` and `-0.5 / sigma²` in `float64`, `x²` exact), divided
/// by `phi.sum()` ([`numpy_sum`]). Any radius.
pub fn gaussian_kernel1d(sigma: f64, radius: usize) -> Vec<f64> {
    let c = -0.5 / (sigma * sigma);
    let r = radius as i64;
    let phi: Vec<f64> = (-r..=r).map(|x| (c * (x * x) as f64).exp()).collect();
    let sum = numpy_sum(&phi);
    phi.iter().map(|v| v / sum).collect()
}

/// `scipy.ndimage.gaussian_filter(x, sigma)` on a `float64` `width`×`height` array (row-major)
/// with scipy's defaults (`order=0`, `truncate=4.0`, `mode='reflect'`), bit-exact to scipy 1.17.
/// scipy there: radius `int(4 * sigma + 0.5)`, kernel [`gaussian_kernel1d`]; axis 0 (along each
/// column) then axis 1 (along each row), each line extended by `reflect` (`d c b a | a b c d |
/// d c b a`, repeating with period `2n` when the line is shorter than the radius) and
/// correlated in `float64` by `NI_Correlate1D`'s symmetric-kernel loop: `x[0] w[0]`, then
/// `+= (x[-j] + x[j]) w[j]` from the outermost `j = radius` in to `j = 1`. Like scipy, a
/// `sigma` that is not above `1e-15` leaves the array as it is, and an empty array stays empty.
pub fn gaussian_filter(src: &[f64], width: usize, height: usize, sigma: f64) -> Vec<f64> {
    assert_eq!(src.len(), width * height);
    if sigma.is_nan() || sigma <= 1e-15 || src.is_empty() {
        return src.to_vec();
    }
    let radius = (4.0 * sigma + 0.5) as usize;
    let w = gaussian_kernel1d(sigma, radius);
    let filter = |line: &[f64], out: &mut [f64], ext: &mut Vec<f64>| {
        let n = line.len();
        ext.clear();
        for i in -(radius as i64)..(n + radius) as i64 {
            let m = i.rem_euclid(2 * n as i64) as usize;
            ext.push(if m < n { line[m] } else { line[2 * n - 1 - m] });
        }
        for (l, o) in out.iter_mut().enumerate() {
            let c = l + radius;
            let mut v = ext[c] * w[radius];
            for j in (1..=radius).rev() {
                v += (ext[c - j] + ext[c + j]) * w[radius - j];
            }
            *o = v;
        }
    };
    let mut tmp = vec![0f64; width * height];
    let mut ext = Vec::new();
    let mut line = vec![0f64; height];
    let mut out = vec![0f64; height];
    for x in 0..width {
        for y in 0..height {
            line[y] = src[y * width + x];
        }
        filter(&line, &mut out, &mut ext);
        for y in 0..height {
            tmp[y * width + x] = out[y];
        }
    }
    let mut res = vec![0f64; width * height];
    for y in 0..height {
        filter(
            &tmp[y * width..(y + 1) * width],
            &mut res[y * width..(y + 1) * width],
            &mut ext,
        );
    }
    res
}
