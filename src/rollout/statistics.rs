//! The statistics behind trigger verdicts: one-sided z-tests for proportions, and the normal
//! quantile that turns `[rollout] confidence` into a critical value.
//!
//! Comparisons are deliberately conservative: a trigger fires only when the data show, at the
//! configured confidence, that green is past its threshold — so a few unlucky errors at 5 %
//! traffic do not roll a healthy rollout back.

/// The standard normal quantile (inverse CDF) for `p` in (0, 1): Acklam's rational
/// approximation, relative error below 1.2e-9.
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const LOW: f64 = 0.024_25;
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    if p < LOW {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -normal_quantile(1.0 - p)
    }
}

/// Is `successes / trials` significantly above `threshold` (one-sided, at `confidence`)?
/// A normal approximation with the variance taken at the threshold; with no trials, no.
pub fn proportion_exceeds(successes: u64, trials: u64, threshold: f64, confidence: f64) -> bool {
    if trials == 0 {
        return false;
    }
    let observed = successes as f64 / trials as f64;
    if observed <= threshold {
        return false;
    }
    let variance = threshold * (1.0 - threshold) / trials as f64;
    if variance <= 0.0 {
        // Threshold 0 or 1: any excess is certain.
        return true;
    }
    (observed - threshold) / variance.sqrt() > normal_quantile(confidence)
}

/// Is green's error rate higher than blue's by more than `margin`, at `confidence`?
/// A one-sided two-proportion z-test of H0: p_green − p_blue ≤ margin (unpooled variance,
/// since the hypothesis is a non-zero difference).
pub fn difference_exceeds(
    green_errors: u64,
    green_requests: u64,
    blue_errors: u64,
    blue_requests: u64,
    margin: f64,
    confidence: f64,
) -> bool {
    if green_requests == 0 || blue_requests == 0 {
        return false;
    }
    let green = green_errors as f64 / green_requests as f64;
    let blue = blue_errors as f64 / blue_requests as f64;
    let difference = green - blue;
    if difference <= margin {
        return false;
    }
    let variance =
        green * (1.0 - green) / green_requests as f64 + blue * (1.0 - blue) / blue_requests as f64;
    if variance <= 0.0 {
        return true;
    }
    (difference - margin) / variance.sqrt() > normal_quantile(confidence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_match_tables() {
        for (p, z) in [
            (0.5, 0.0),
            (0.95, 1.644_853_6),
            (0.99, 2.326_347_9),
            (0.999, 3.090_232_3),
            (0.01, -2.326_347_9),
        ] {
            assert!(
                (normal_quantile(p) - z).abs() < 1e-6,
                "{p}: {}",
                normal_quantile(p)
            );
        }
    }

    #[test]
    fn small_samples_do_not_convict() {
        // 2 errors in 20 requests is 10 %, but not significantly above 5 % at 99 %.
        assert!(!proportion_exceeds(2, 20, 0.05, 0.99));
        // 100 in 1000 is.
        assert!(proportion_exceeds(100, 1000, 0.05, 0.99));
        assert!(!proportion_exceeds(0, 0, 0.05, 0.99));
        assert!(proportion_exceeds(1, 10, 0.0, 0.99));
    }

    #[test]
    fn green_at_three_percent_is_not_worse_than_blue_at_two_and_a_half() {
        // The example: with a 1-point margin, 3 % vs 2.5 % never fires.
        assert!(!difference_exceeds(300, 10_000, 2_500, 100_000, 0.01, 0.99));
        // Even with no margin, 3 % on 1,000 requests against 2.5 % is not significant.
        assert!(!difference_exceeds(30, 1_000, 2_500, 100_000, 0.0, 0.99));
        // 10 % against 2.5 % is.
        assert!(difference_exceeds(100, 1_000, 2_500, 100_000, 0.01, 0.99));
        // A quiet blue gives no verdict.
        assert!(!difference_exceeds(100, 1_000, 0, 0, 0.0, 0.99));
    }
}
