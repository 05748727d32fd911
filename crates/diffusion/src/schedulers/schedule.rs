//! The numbers every scheduler starts from: the training noise schedule (β, ᾱ, σ tables) and
//! the inference timesteps, reproducing the torch and numpy arithmetic diffusers uses, rounding
//! included (numpy rounds half to even; torch's float32 `linspace` is fused multiply-adds).
use super::config::{unsupported, Common, SchedulerConfig, TimestepSpacing};
use crate::Result;

/// `torch.linspace(start, end, n, dtype=torch.float32)` on the CPU. torch evaluates
/// `start + step * i` for the first half and `end - step * (n - 1 - i)` for the second, in
/// float32, and the compiler fuses each into one multiply-add (x86-64 builds with FMA, as the
/// reference torch is): bit-identical β tables depend on it.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine ᾱ ("squaredcos_cap_v2"), in f64 then f32.
pub(crate) fn squaredcos_cap_v2(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// ᾱ = cumprod(1 − β). torch's CPU cumprod accumulates float32 in f64 and rounds each output.
pub(crate) fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0 - b) as f64;
            acc as f32
        })
        .collect()
}

/// σ_t = √((1 − ᾱ_t) / ᾱ_t), float32 as diffusers computes the table.
pub(crate) fn sigma_table(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `np.linspace(start, stop, num)` (float64): `i * step + start`, the last value `stop`.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

/// `np.arange(start, 0, -step)` for a float step, first `n` values. numpy fills
/// `start, start + (−step), start + i·δ` with `δ = (start − step) − start`. For some step
/// counts (61, 103, 121, …) the float length `ceil(start / step)` comes out one too many and
/// diffusers' "trailing" schedules get an extra timestep of −1; we keep the `n` requested.
fn np_arange_down(start: f64, step: f64, n: usize) -> Vec<f64> {
    let second = start + -step;
    let delta = second - start;
    (0..n)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// Round half to even, as numpy's `round`.
fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// The training timesteps DDIM, Euler and Euler ancestral use for `n` inference steps, as
/// floats (DDIM casts to integers, which these already are except for Euler's "linspace").
/// `linspace_f32` is Euler's variant: `np.linspace(0, T − 1, n, dtype=float32)`, unrounded.
pub(crate) fn single_step_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    n: usize,
    steps_offset: usize,
    linspace_f32: bool,
) -> Vec<f64> {
    let t_max = (num_train - 1) as f64;
    match spacing {
        TimestepSpacing::Linspace if linspace_f32 => {
            let mut ts: Vec<f64> = np_linspace(0.0, t_max, n)
                .into_iter()
                .map(|t| t as f32 as f64)
                .collect();
            ts.reverse();
            ts
        }
        TimestepSpacing::Linspace => {
            let mut ts: Vec<f64> = np_linspace(0.0, t_max, n)
                .into_iter()
                .map(np_round)
                .collect();
            ts.reverse();
            ts
        }
        TimestepSpacing::Leading => {
            let ratio = num_train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / n as f64;
            np_arange_down(num_train as f64, ratio, n)
                .into_iter()
                .map(|t| np_round(t) - 1.0)
                .collect()
        }
    }
}

/// The timesteps DPM-Solver and UniPC use: they space `n + 1` points and drop the last, so
/// their "linspace" and "leading" schedules differ from DDIM's. `last_timestep` is
/// `num_train_timesteps` unless DPM-Solver's `lambda_min_clipped` cuts the schedule short.
pub(crate) fn multistep_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    last_timestep: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut ts: Vec<f64> = np_linspace(0.0, (last_timestep - 1) as f64, n + 1)
                .into_iter()
                .map(np_round)
                .collect();
            ts.reverse();
            ts.truncate(n);
            ts
        }
        TimestepSpacing::Leading => {
            let ratio = last_timestep / (n + 1);
            (1..=n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / n as f64;
            np_arange_down(last_timestep as f64, ratio, n)
                .into_iter()
                .map(|t| np_round(t) - 1.0)
                .collect()
        }
    }
}

/// `np.interp(t, arange(len(table)), table)` in f64 for one timestep.
pub(crate) fn interp(t: f64, table: &[f32]) -> f64 {
    let last = table.len() - 1;
    if t <= 0.0 {
        return table[0] as f64;
    }
    if t >= last as f64 {
        return table[last] as f64;
    }
    let j = t.floor() as usize;
    if j as f64 == t {
        return table[j] as f64;
    }
    let slope = table[j + 1] as f64 - table[j] as f64;
    slope * (t - j as f64) + table[j] as f64
}

/// Karras et al.'s σ schedule (ρ = 7) from `sigma_max` down to `sigma_min`, in f64.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Karras σs from `sigma_max` down to `sigma_min` for `n` steps, and their timesteps: each σ's
/// fractional training timestep in the σ `table`, made a timestep by `to_timestep`. Returns
/// (timesteps, σs).
pub(crate) fn karras_schedule(
    sigma_min: f64,
    sigma_max: f64,
    n: usize,
    table: &[f32],
    to_timestep: impl Fn(f64) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let sigmas = karras_sigmas(sigma_min, sigma_max, n);
    let log_sigmas = log_table(table);
    let timesteps = sigmas
        .iter()
        .map(|&s| to_timestep(sigma_to_t(s, &log_sigmas)))
        .collect();
    (timesteps, sigmas)
}

/// The σs (float32) of a schedule with the final σ of 0 appended.
pub(crate) fn with_final_zero(sigmas: Vec<f64>) -> Vec<f32> {
    let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
    sigmas.push(0.0);
    sigmas
}

/// The schedule of DPM-Solver and UniPC for `n` steps: (timesteps, σs with the final 0).
/// Without `karras`, [`multistep_timesteps`] up to `last_timestep` and the σ table interpolated
/// there; with it, Karras σs between `sigma_min` and `sigma_max` (by default the table's ends)
/// and their timesteps, rounded by `karras`.
pub(crate) fn multistep_schedule(
    name: &str,
    config: &SchedulerConfig,
    common: &Common,
    last_timestep: usize,
    n: usize,
    karras: Option<fn(f64) -> f64>,
) -> Result<(Vec<f64>, Vec<f32>)> {
    let num_train = common.num_train_timesteps;
    let table = sigma_table(&common.alphas_cumprod);
    let timesteps = multistep_timesteps(
        common.spacing,
        num_train,
        last_timestep,
        n,
        common.steps_offset,
    );
    let (timesteps, sigmas) = match karras {
        Some(to_timestep) => {
            let sigma_min = config.sigma_min.unwrap_or(table[0] as f64);
            let sigma_max = config.sigma_max.unwrap_or(table[num_train - 1] as f64);
            karras_schedule(sigma_min, sigma_max, n, &table, to_timestep)
        }
        None => {
            let sigmas = timesteps.iter().map(|&t| interp(t, &table)).collect();
            (timesteps, sigmas)
        }
    };
    if let Some(&t) = timesteps.iter().find(|&&t| t >= num_train as f64) {
        return Err(unsupported(
            name,
            format!("steps_offset pushes timestep {t} past the training range"),
        ));
    }
    Ok((timesteps, with_final_zero(sigmas)))
}

/// `np.log` of the σ table (float32). numpy's float32 log is a SIMD approximation whose last
/// bit depends on the CPU it dispatches to (it differs from the correctly rounded value for a
/// fifth of this table on an AVX-512 machine); we round the f64 log. The fractional timesteps
/// derived from it (Euler with Karras σs) can differ from diffusers' by ~1e-4; the rounded ones
/// (DPM-Solver, UniPC) do not in practice.
pub(crate) fn log_table(table: &[f32]) -> Vec<f32> {
    table.iter().map(|&s| (s as f64).ln() as f32).collect()
}

/// diffusers' `_sigma_to_t`: the (fractional) training timestep of σ, interpolating log σ in
/// the table `log_sigmas` (float32, increasing with t). numpy mixes precisions here: the
/// distances are f64, the denominator `low − high` is a float32 difference.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // The last index whose log σ is ≤ log_sigma (0 if none), at most n − 2.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The noise level's α_t = 1/√(σ² + 1) and σ_t = σ·α_t (variance-preserving form), float32.
pub(crate) fn alpha_sigma_t(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log α_t − log σ_t (half the log-SNR), float32; +∞ at σ = 0.
pub(crate) fn lambda(sigma: f32) -> f32 {
    let (alpha, sigma_t) = alpha_sigma_t(sigma);
    alpha.ln() - sigma_t.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_rounding_is_half_to_even() {
        // np.linspace(0, 999, 7).round(): 166.5 → 166, 499.5 → 500, 832.5 → 832.
        let ts = single_step_timesteps(TimestepSpacing::Linspace, 1000, 7, 0, false);
        assert_eq!(ts, vec![999.0, 832.0, 666.0, 500.0, 333.0, 166.0, 0.0]);
    }

    #[test]
    fn trailing_keeps_the_requested_count() {
        // numpy's arange gives 62 values for 61 steps (diffusers then ends on timestep −1).
        let ts = single_step_timesteps(TimestepSpacing::Trailing, 1000, 61, 0, false);
        assert_eq!(ts.len(), 61);
        assert_eq!(ts[0], 999.0);
        assert!(ts.iter().all(|&t| t >= 0.0), "{ts:?}");
    }

    #[test]
    fn interp_hits_table_values_at_integers() {
        let table = [1.0f32, 2.0, 4.0];
        assert_eq!(interp(0.0, &table), 1.0);
        assert_eq!(interp(1.5, &table), 3.0);
        assert_eq!(interp(2.0, &table), 4.0);
    }
}
