//! Reference counting from first principles: the refcount every host
//! cluster should have, given every structure that points at it.
//!
//! `qblk check` compares this tally with the stored refcounts; a refcount
//! rebuild (repair, or opening a dirty lazy-refcounts image) writes it.

use crate::types::Geometry;

/// Counted references per host cluster of the image file.
///
/// Sparse: memory follows the number of referenced clusters, not the size
/// of the file (a hostile image can make its file sparse and huge).
#[derive(Debug, Clone)]
pub struct RefcountTally {
    cluster_bits: u32,
    counts: std::collections::BTreeMap<u64, u64>,
    /// Clusters the tally refuses to grow to (references far past the end of
    /// the file, which only corrupt metadata produces).
    limit_clusters: u64,
    /// References that fell past `limit_clusters`.
    pub out_of_range: Vec<u64>,
}

impl RefcountTally {
    /// A tally for an image file of `file_len` bytes. References up to
    /// `slack_clusters` past the end of the file are still counted (they
    /// show up as corruption against a stored refcount of 0); further ones
    /// are recorded in `out_of_range` rather than allocated for.
    pub fn new(geometry: &Geometry, file_len: u64, slack_clusters: u64) -> Self {
        let file_clusters = geometry.clusters_for(file_len);
        Self {
            cluster_bits: geometry.cluster_bits(),
            counts: std::collections::BTreeMap::new(),
            limit_clusters: file_clusters.saturating_add(slack_clusters),
            out_of_range: Vec::new(),
        }
    }

    /// Counts one reference to every cluster overlapping `[offset, offset + len)`.
    pub fn reference(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(len - 1) >> self.cluster_bits;
        for c in first..=last {
            if c >= self.limit_clusters {
                self.out_of_range.push(c);
                return;
            }
            let n = self.counts.entry(c).or_insert(0);
            *n = n.saturating_add(1);
        }
    }

    /// References counted for `cluster`.
    pub fn get(&self, cluster: u64) -> u64 {
        self.counts.get(&cluster).copied().unwrap_or(0)
    }

    /// One past the highest cluster with a reference.
    pub fn end(&self) -> u64 {
        self.counts.last_key_value().map_or(0, |(c, _)| c + 1)
    }

    /// The referenced clusters in `range`, in order, with their counts.
    pub fn range(&self, range: std::ops::Range<u64>) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.counts.range(range).map(|(c, n)| (*c, *n))
    }

    /// Number of distinct referenced clusters.
    pub fn len(&self) -> u64 {
        self.counts.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

/// How a stored refcount compares with the tally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefcountMismatch {
    /// Stored below referenced: the cluster may be handed out while in use.
    Corruption {
        cluster: u64,
        stored: u64,
        referenced: u64,
    },
    /// Stored above referenced: space is wasted, nothing is at risk.
    Leak {
        cluster: u64,
        stored: u64,
        referenced: u64,
    },
}

/// Compares one cluster.
pub fn compare(cluster: u64, stored: u64, referenced: u64) -> Option<RefcountMismatch> {
    match stored.cmp(&referenced) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Less => Some(RefcountMismatch::Corruption {
            cluster,
            stored,
            referenced,
        }),
        std::cmp::Ordering::Greater => Some(RefcountMismatch::Leak {
            cluster,
            stored,
            referenced,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_span_clusters() {
        let g = Geometry::new(16, false, 4).unwrap();
        let mut t = RefcountTally::new(&g, 10 * 65536, 4);
        t.reference(0, 65536);
        t.reference(65536 * 2 + 100, 65536); // spans clusters 2 and 3
        t.reference(65536 * 2, 1);
        assert_eq!((t.get(0), t.get(1), t.get(2), t.get(3)), (1, 0, 2, 1));
        assert_eq!(t.end(), 4);
        t.reference(65536 * 12, 1); // past the file, within the slack
        assert_eq!(t.get(12), 1);
        t.reference(1 << 50, 1); // absurd: recorded, not allocated
        assert_eq!(t.out_of_range.len(), 1);
        assert_eq!(t.len(), 4);
        assert_eq!(t.range(2..4).collect::<Vec<_>>(), vec![(2, 2), (3, 1)]);
    }

    #[test]
    fn mismatches() {
        assert_eq!(compare(1, 1, 1), None);
        assert!(matches!(
            compare(1, 0, 1),
            Some(RefcountMismatch::Corruption { .. })
        ));
        assert!(matches!(
            compare(1, 2, 1),
            Some(RefcountMismatch::Leak { .. })
        ));
    }
}
