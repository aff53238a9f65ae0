//! A weighted sequence: an endless, deterministic order of indices in which, over any
//! window of `Σweights` consecutive picks, index `i` appears exactly `weights[i]` times.
//!
//! Pick number `k` maps to the position `(k · stride) mod total` on the line of
//! cumulative weights. Because `stride` is coprime with `total`, the `total`
//! consecutive picks of any window visit every position exactly once: the shares are
//! exact, not approximate. With equal weights the stride is 1 and the order is a strict
//! rotation (A, B, A, B). With unequal weights the stride is the integer nearest
//! `total / φ` that is coprime with it; golden-ratio strides spread each index's
//! positions evenly over the window (three-gap theorem), which is what makes the
//! order smooth (3:1 gives A, B, A, A rather than A, A, A, B).
//!
//! A pick is O(1) for equal weights and a binary search over cumulative weights
//! otherwise; there is no per-pick state besides the caller's counter, so picks from
//! many threads need only one atomic increment.

/// Totals are kept below 2^32 so that `(k mod total) · stride` fits in a u64.
const MAX_TOTAL: u64 = 1 << 32;

#[derive(Debug, Clone)]
pub struct WeightedSequence {
    total: u64,
    stride: u64,
    shape: Shape,
}

#[derive(Debug, Clone)]
enum Shape {
    /// Every index has the same weight, which gcd reduction made 1: the position is the index.
    Uniform,
    /// `ends[i]` is the cumulative weight up to and including index `i`.
    Weighted { ends: Box<[u64]> },
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl WeightedSequence {
    /// `None` when there is nothing to pick (no weights, or all zero).
    pub fn new(weights: &[u64]) -> Option<Self> {
        let divisor = weights.iter().copied().filter(|w| *w > 0).reduce(gcd)?;
        let mut reduced: Vec<u64> = weights.iter().map(|w| w / divisor).collect();
        let mut total: u64 = reduced.iter().sum();
        if total >= MAX_TOTAL {
            // Absurd weight sums lose exactness rather than overflow; each positive
            // weight keeps at least 1.
            for w in reduced.iter_mut().filter(|w| **w > 0) {
                *w = ((*w as u128 * (MAX_TOTAL as u128 / 2)) / total as u128).max(1) as u64;
            }
            total = reduced.iter().sum();
        }
        let first_positive = reduced.iter().copied().find(|w| *w > 0)?;
        let uniform = reduced.iter().all(|w| *w == first_positive);
        let (shape, stride) = if uniform {
            (Shape::Uniform, 1)
        } else {
            let mut end = 0;
            let ends = reduced
                .iter()
                .map(|w| {
                    end += w;
                    end
                })
                .collect();
            (Shape::Weighted { ends }, golden_stride(total))
        };
        Some(Self {
            total,
            stride,
            shape,
        })
    }

    /// The sum of the (reduced) weights: the window over which shares are exact.
    pub fn period(&self) -> u64 {
        self.total
    }

    /// The index picked `k`-th.
    #[inline]
    pub fn index_at(&self, k: u64) -> usize {
        let position = (k % self.total) * self.stride % self.total;
        match &self.shape {
            Shape::Uniform => position as usize,
            Shape::Weighted { ends } => ends.partition_point(|end| *end <= position),
        }
    }
}

/// The integer nearest `total / φ` that is coprime with `total`.
fn golden_stride(total: u64) -> u64 {
    if total <= 2 {
        return 1;
    }
    let ideal = ((total as f64) * 0.618_033_988_749_894_9).round() as u64;
    (0..total)
        .flat_map(|d| [ideal.saturating_add(d), ideal.saturating_sub(d)])
        .find(|s| *s > 0 && *s < total && gcd(*s, total) == 1)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn picks(weights: &[u64], start: u64, n: u64) -> Vec<usize> {
        let seq = WeightedSequence::new(weights).unwrap();
        (start..start + n).map(|k| seq.index_at(k)).collect()
    }

    #[test]
    fn equal_weights_rotate() {
        assert_eq!(picks(&[1, 1], 0, 6), vec![0, 1, 0, 1, 0, 1]);
        assert_eq!(picks(&[5, 5, 5], 7, 6), vec![1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn three_to_one_is_smooth() {
        let p = picks(&[3, 1], 0, 8);
        assert_eq!(p.iter().filter(|i| **i == 1).count(), 2);
        // the single B never sits next to another B
        assert!(p.windows(2).all(|w| !(w[0] == 1 && w[1] == 1)), "{p:?}");
    }

    #[test]
    fn zero_weights_are_never_picked_and_empty_is_none() {
        assert!(WeightedSequence::new(&[]).is_none());
        assert!(WeightedSequence::new(&[0, 0]).is_none());
        assert!(
            picks(&[0, 2, 0, 2], 3, 20)
                .iter()
                .all(|i| *i == 1 || *i == 3)
        );
    }

    #[test]
    fn huge_totals_do_not_overflow() {
        let seq = WeightedSequence::new(&[u32::MAX as u64, 1, u32::MAX as u64 - 7]).unwrap();
        assert!(seq.period() < MAX_TOTAL);
        for k in [0, 1, u64::MAX / 2, u64::MAX] {
            assert!(seq.index_at(k) < 3);
        }
    }

    proptest! {
        /// Over any window of Σweights consecutive picks, each index gets exactly its weight.
        #[test]
        fn exact_shares_over_any_window(
            weights in proptest::collection::vec(0u64..20, 1..30),
            start in any::<u64>(),
        ) {
            prop_assume!(weights.iter().any(|w| *w > 0));
            let seq = WeightedSequence::new(&weights).unwrap();
            let divisor = weights.iter().copied().filter(|w| *w > 0).reduce(gcd).unwrap();
            let mut counts = vec![0u64; weights.len()];
            let start = start % (u64::MAX / 2);
            for k in start..start + seq.period() {
                counts[seq.index_at(k)] += 1;
            }
            let expected: Vec<u64> = weights.iter().map(|w| w / divisor).collect();
            prop_assert_eq!(counts, expected);
        }

        /// With equal weights, consecutive picks never repeat an index until all were picked.
        #[test]
        fn equal_weights_strictly_alternate(n in 2usize..50, w in 1u64..10, start in any::<u64>()) {
            let seq = WeightedSequence::new(&vec![w; n]).unwrap();
            let start = start % (u64::MAX / 2);
            let window: Vec<usize> = (start..start + n as u64).map(|k| seq.index_at(k)).collect();
            let mut sorted = window.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), n);
            for pair in window.windows(2) {
                prop_assert_eq!((pair[0] + 1) % n, pair[1]);
            }
        }
    }
}
