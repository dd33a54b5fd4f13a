//! Preallocating unallocated space (`qblk resize --preallocation
//! metadata|falloc`): host clusters are taken in runs past everything the
//! file ever held, so they read as zeros without being written, and mapped
//! as standard clusters.
//!
//! Per run (at most one L2 table's worth): the clusters are allocated
//! (refcounts, in memory); the file is made to cover them (`falloc`:
//! fallocate; `metadata`: a longer, sparse file) before any entry maps
//! them; then the L2 entries are set. The writeback that follows syncs the
//! file before it writes the tables (invariant 2 holds: the zeros the
//! entries map are the file's own). A crash before the tables are durable
//! leaks the run at worst.

use qblk_qcow2::header::CryptMethod;
use qblk_qcow2::mapping::{ClusterDescriptor, L2Entry, SubclusterBitmap};
use qblk_qcow2::{ClusterCount, HostCluster, HostOffset};

use crate::error::{Error, Result};
use crate::image::Image;

/// How preallocated clusters get their space in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preallocation {
    /// The file is only made long enough (sparse).
    Metadata,
    /// The file's blocks are allocated (fallocate).
    Falloc,
}

impl Image {
    pub(super) async fn preallocate_inner(
        &self,
        offset: u64,
        len: u64,
        mode: Preallocation,
    ) -> Result<()> {
        let w = self.check_writable(offset, len)?;
        let h = self.header();
        if h.has_external_data_file() || h.crypt_method != CryptMethod::None {
            return Err(Error::Unsupported {
                path: self.path().to_owned(),
                what: "preallocation with an external data file or encryption".into(),
            });
        }
        let g = self.geometry();
        let cs = g.cluster_size();
        if offset % cs != 0 {
            return Err(Error::Unsupported {
                path: self.path().to_owned(),
                what: format!("preallocation must start at a cluster boundary, not {offset}"),
            });
        }
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            // Up to the end of this L2 table's range: one table per run.
            let table_end = (pos / g.l2_coverage_bytes() + 1) * g.l2_coverage_bytes();
            let run_end = table_end.min(end);
            let guests: Vec<u64> = (pos..run_end).step_by(cs as usize).collect();
            // Only clusters nothing maps yet (checked before anything
            // changes; the table read, if any, is staged).
            let mut free = Vec::with_capacity(guests.len());
            w.with_alloc(self, |_, staged| {
                free.clear();
                for &gp in &guests {
                    if self.lookup(gp, staged)?.0 == ClusterDescriptor::Unallocated {
                        free.push(gp);
                    }
                }
                Ok(())
            })
            .await?;
            pos = run_end;
            if free.is_empty() {
                continue;
            }
            let n = ClusterCount(free.len() as u64);
            let start: HostCluster = w
                .with_alloc(self, |a, _| a.rc.alloc_run(&mut a.header, n))
                .await?;
            let host_start = start.0 * cs;
            let host_end = host_start + n.0 * cs;
            let io = Error::io(self.path(), "preallocate", host_start);
            {
                let mut x = w.extend.lock().await;
                match mode {
                    Preallocation::Falloc => {
                        self.file()
                            .fallocate(0, host_start, host_end - host_start)
                            .await
                            .map_err(io)?;
                    }
                    Preallocation::Metadata => {
                        // The writer knows the file's length (no stat
                        // outside open).
                        if x.file_len < host_end {
                            self.file().set_len(host_end).await.map_err(io)?;
                        }
                    }
                }
                x.file_len = x.file_len.max(host_end);
            }
            let mut done = 0;
            w.with_alloc(self, |a, staged| {
                while done < free.len() {
                    let host = HostOffset(host_start + done as u64 * cs);
                    let bitmap = if g.extended_l2() {
                        SubclusterBitmap::ALL_ALLOCATED
                    } else {
                        SubclusterBitmap(0)
                    };
                    self.set_l2_entry(
                        a,
                        staged,
                        free[done],
                        L2Entry::standard(host, true, bitmap),
                    )?;
                    done += 1;
                }
                Ok(())
            })
            .await?;
            w.bump_write_gen();
            w.settle(self).await?;
        }
        Ok(())
    }
}
