//! Honest spreads: min, median and max of a figure over the measured
//! rounds, rows ranked by median, and a mark where a row's [min, max]
//! overlaps the next row's (on a noisy machine their order may flip from
//! one run to the next).

use super::sys;

/// Min, median and max of one figure over the rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(v: &[f64]) -> Option<Spread> {
        let median = sys::median(v)?;
        Some(Spread {
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            median,
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }

    pub fn overlaps(&self, other: &Spread) -> bool {
        self.min <= other.max && other.min <= self.max
    }

    /// `median (min-max)` with `prec` decimals.
    pub fn show(&self, prec: usize) -> String {
        format!(
            "{:.p$} ({:.p$}-{:.p$})",
            self.median,
            self.min,
            self.max,
            p = prec
        )
    }
}

/// The mark of a row whose spread overlaps the next row's.
pub const OVERLAP: &str = "~";

/// Indices of `rows` ordered by median (lowest first; ties keep their
/// order), and for each of them whether its spread overlaps the next one's.
pub fn ranked(rows: &[Spread]) -> Vec<(usize, bool)> {
    let mut idx: Vec<usize> = (0..rows.len()).collect();
    idx.sort_by(|&a, &b| rows[a].median.total_cmp(&rows[b].median));
    (0..idx.len())
        .map(|k| {
            let next = idx.get(k + 1).map(|&n| &rows[n]);
            (idx[k], next.is_some_and(|n| rows[idx[k]].overlaps(n)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(min: f64, median: f64, max: f64) -> Spread {
        Spread { min, median, max }
    }

    #[test]
    fn spread_of_rounds() {
        assert_eq!(Spread::of(&[3.0, 1.0, 2.0]), Some(s(1.0, 2.0, 3.0)));
        assert_eq!(Spread::of(&[5.0]), Some(s(5.0, 5.0, 5.0)));
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(s(0.4, 0.63, 1.45).show(2), "0.63 (0.40-1.45)");
    }

    #[test]
    fn overlap_is_symmetric_and_includes_touching() {
        let a = s(1.0, 1.5, 2.0);
        assert!(a.overlaps(&s(2.0, 3.0, 4.0)));
        assert!(s(2.0, 3.0, 4.0).overlaps(&a));
        assert!(a.overlaps(&s(1.2, 1.3, 1.4)), "inside");
        assert!(!a.overlaps(&s(2.1, 3.0, 4.0)));
    }

    #[test]
    fn rows_ranked_by_median_with_marks() {
        // Given out of order: plain 0.6 (0.4-1.4), qemu-tls 2.7 (2.5-3.0),
        // miggate 1.0 (0.9-1.2), stunnel 2.8 (2.6-3.1).
        let rows = [
            s(0.4, 0.6, 1.4),
            s(2.5, 2.7, 3.0),
            s(0.9, 1.0, 1.2),
            s(2.6, 2.8, 3.1),
        ];
        assert_eq!(
            ranked(&rows),
            // plain overlaps miggate; miggate does not reach qemu-tls;
            // qemu-tls overlaps stunnel; the last row has no next one.
            vec![(0, true), (2, false), (1, true), (3, false)]
        );
        assert!(ranked(&[]).is_empty());
    }
}
