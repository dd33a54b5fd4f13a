//! The internal snapshot table.

use crate::be::{PutBe, Reader, align8};
use crate::error::{Problem, Result, check_range, err};
use crate::header::check_table;
use crate::types::MAX_L1_TABLE_BYTES;

/// Fixed part of a snapshot table entry (QEMU's QCowSnapshotHeader).
pub const SNAPSHOT_ENTRY_MIN_BYTES: u64 = 40;
/// QEMU's limit on extra data per entry (QCOW_MAX_SNAPSHOT_EXTRA_DATA).
pub const MAX_SNAPSHOT_EXTRA_DATA_BYTES: u32 = 1024;
/// QEMU's limit on the whole table (QCOW_MAX_SNAPSHOTS_SIZE).
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 1024 * crate::header::MAX_SNAPSHOTS as u64;
/// The first read of the snapshot table: room for hundreds of entries.
pub const SNAPSHOT_TABLE_FIRST_READ: u64 = 64 << 10;

/// After [`parse_snapshot_table`] found the `want` bytes read too short,
/// the next, larger read; `None` when more cannot help: the table limit is
/// reached, or the `available` bytes from the table's offset to the end of
/// the file are all read already.
pub fn next_snapshot_table_read(want: u64, available: u64) -> Option<u64> {
    (want < MAX_SNAPSHOT_TABLE_BYTES && want < available)
        .then(|| (want * 4).min(MAX_SNAPSHOT_TABLE_BYTES))
}

/// Extra data version 3 images must carry (vm_state_size_large + disk_size).
pub const V3_MIN_SNAPSHOT_EXTRA_DATA_BYTES: usize = 16;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotEntry {
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    pub date_sec: u32,
    pub date_nsec: u32,
    /// Guest run time when the snapshot was taken.
    pub vm_clock_nsec: u64,
    /// The 32-bit VM state size; superseded by the 64-bit one in extra data.
    pub vm_state_size_32: u32,
    /// Extra data, kept verbatim (known fields are read by the accessors).
    pub extra_data: Vec<u8>,
    /// Unique ID string (not NUL terminated).
    pub id: Vec<u8>,
    pub name: Vec<u8>,
}

impl SnapshotEntry {
    fn extra_u64(&self, at: usize) -> Option<u64> {
        let b = self.extra_data.get(at..at + 8)?;
        Some(u64::from_be_bytes(b.try_into().ok()?))
    }

    /// VM state size in bytes: the 64-bit extra field if present.
    pub fn vm_state_size(&self) -> u64 {
        self.extra_u64(0).unwrap_or(self.vm_state_size_32.into())
    }

    /// Virtual disk size when the snapshot was taken, if recorded.
    pub fn disk_size(&self) -> Option<u64> {
        self.extra_u64(8)
    }

    /// Instruction count of the replay engine, if recorded (-1 means none).
    pub fn icount(&self) -> Option<u64> {
        self.extra_u64(16).filter(|&v| v != u64::MAX)
    }

    /// Builds the extra data QEMU writes: vm_state_size, disk_size, icount.
    pub fn standard_extra_data(vm_state_size: u64, disk_size: u64, icount: Option<u64>) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        out.put_u64(vm_state_size);
        out.put_u64(disk_size);
        out.put_u64(icount.unwrap_or(u64::MAX));
        out
    }

    pub fn id_lossy(&self) -> String {
        String::from_utf8_lossy(&self.id).into_owned()
    }

    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    pub fn encoded_len(&self) -> usize {
        align8(
            SNAPSHOT_ENTRY_MIN_BYTES as usize
                + self.extra_data.len()
                + self.id.len()
                + self.name.len(),
        )
        .unwrap_or(usize::MAX)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(self.l1_table_offset);
        out.put_u32(self.l1_size);
        out.put_u16(u16::try_from(self.id.len()).unwrap_or(u16::MAX));
        out.put_u16(u16::try_from(self.name.len()).unwrap_or(u16::MAX));
        out.put_u32(self.date_sec);
        out.put_u32(self.date_nsec);
        out.put_u64(self.vm_clock_nsec);
        out.put_u32(self.vm_state_size_32);
        out.put_u32(u32::try_from(self.extra_data.len()).unwrap_or(u32::MAX));
        out.extend_from_slice(&self.extra_data);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.name);
        out.pad_to(8);
    }
}

/// Parses `nb_snapshots` entries from `buf`, which holds the file from
/// `snapshots_offset` on. Returns the entries and the table's length.
///
/// A [`Problem::Truncated`] error means `buf` was too short: read more of the
/// file (up to [`MAX_SNAPSHOT_TABLE_BYTES`]) and call again.
pub fn parse_snapshot_table(
    buf: &[u8],
    snapshots_offset: u64,
    nb_snapshots: u32,
    cluster_size: u64,
) -> Result<(Vec<SnapshotEntry>, u64)> {
    let r = Reader::new(buf, snapshots_offset);
    let mut out = Vec::with_capacity(nb_snapshots.min(1024) as usize);
    let mut pos = 0usize;
    for _ in 0..nb_snapshots {
        let l1_table_offset = r.u64(pos, "snapshot.l1_table_offset")?;
        let l1_size = r.u32(pos + 8, "snapshot.l1_size")?;
        let id_size = r.u16(pos + 12, "snapshot.id_str_size")?;
        let name_size = r.u16(pos + 14, "snapshot.name_size")?;
        let date_sec = r.u32(pos + 16, "snapshot.date_sec")?;
        let date_nsec = r.u32(pos + 20, "snapshot.date_nsec")?;
        let vm_clock_nsec = r.u64(pos + 24, "snapshot.vm_clock_nsec")?;
        let vm_state_size_32 = r.u32(pos + 32, "snapshot.vm_state_size")?;
        let extra_size = r.u32(pos + 36, "snapshot.extra_data_size")?;
        check_range(
            "snapshot.extra_data_size",
            r.file_offset(pos + 36),
            extra_size.into(),
            0,
            MAX_SNAPSHOT_EXTRA_DATA_BYTES.into(),
        )?;
        check_range(
            "snapshot.l1_size",
            r.file_offset(pos + 8),
            l1_size.into(),
            0,
            MAX_L1_TABLE_BYTES / 8,
        )?;
        check_table(
            "snapshot.l1_table_offset",
            r.file_offset(pos),
            l1_table_offset,
            u64::from(l1_size) * 8,
            cluster_size,
        )?;
        let var = pos + SNAPSHOT_ENTRY_MIN_BYTES as usize;
        let extra_size = extra_size as usize;
        let extra_data = r.bytes(var, extra_size, "snapshot.extra_data")?.to_vec();
        let id = r
            .bytes(var + extra_size, id_size.into(), "snapshot.id_str")?
            .to_vec();
        let name_at = var + extra_size + usize::from(id_size);
        let name = r
            .bytes(name_at, name_size.into(), "snapshot.name")?
            .to_vec();
        let end = name_at + usize::from(name_size);
        pos = align8(end).unwrap_or(usize::MAX);
        if pos as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return err(
                "header.nb_snapshots",
                snapshots_offset,
                Problem::Inconsistent("snapshot table exceeds 64 MiB"),
            );
        }
        out.push(SnapshotEntry {
            l1_table_offset,
            l1_size,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size_32,
            extra_data,
            id,
            name,
        });
    }
    Ok((out, pos as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_table_reads_grow_to_the_limit_or_the_end_of_the_file() {
        let first = SNAPSHOT_TABLE_FIRST_READ;
        assert_eq!(next_snapshot_table_read(first, u64::MAX), Some(4 * first));
        assert_eq!(next_snapshot_table_read(first, first + 1), Some(4 * first));
        assert_eq!(
            next_snapshot_table_read(first, first),
            None,
            "whole file read"
        );
        assert_eq!(next_snapshot_table_read(first, 0), None);
        let last = MAX_SNAPSHOT_TABLE_BYTES / 2;
        assert_eq!(
            next_snapshot_table_read(last, u64::MAX),
            Some(MAX_SNAPSHOT_TABLE_BYTES)
        );
        assert_eq!(
            next_snapshot_table_read(MAX_SNAPSHOT_TABLE_BYTES, u64::MAX),
            None
        );
    }

    fn snap(id: &str, name: &str) -> SnapshotEntry {
        SnapshotEntry {
            l1_table_offset: 0x70000,
            l1_size: 1,
            date_sec: 1_795_547_588,
            date_nsec: 231_113_000,
            vm_clock_nsec: 1_500_000_000,
            vm_state_size_32: 0,
            extra_data: SnapshotEntry::standard_extra_data(0, 64 << 20, Some(0)),
            id: id.as_bytes().to_vec(),
            name: name.as_bytes().to_vec(),
        }
    }

    #[test]
    fn table_round_trip() {
        let entries = vec![snap("1", "snap1"), snap("2", "s2")];
        let mut buf = Vec::new();
        for e in &entries {
            e.encode(&mut buf);
        }
        let (parsed, len) = parse_snapshot_table(&buf, 0x80000, 2, 65536).unwrap();
        assert_eq!(parsed, entries);
        assert_eq!(len as usize, buf.len());
        assert_eq!(parsed[0].disk_size(), Some(64 << 20));
        assert_eq!(parsed[0].icount(), Some(0));
    }

    #[test]
    fn short_buffer_reports_truncation() {
        let mut buf = Vec::new();
        snap("1", "a").encode(&mut buf);
        let e = parse_snapshot_table(&buf[..50], 0, 1, 65536).unwrap_err();
        assert!(matches!(e.problem, Problem::Truncated { .. }));
    }

    #[test]
    fn old_entries_without_extra_data() {
        let mut s = snap("1", "old");
        s.extra_data.clear();
        s.vm_state_size_32 = 4096;
        assert_eq!(s.vm_state_size(), 4096);
        assert_eq!(s.disk_size(), None);
        assert_eq!(s.icount(), None);
    }

    #[test]
    fn bad_fields_named() {
        let mut buf = Vec::new();
        snap("1", "a").encode(&mut buf);
        let mut b = buf.clone();
        b[7] = 1; // misaligned L1 table
        let e = parse_snapshot_table(&b, 0x1000, 1, 65536).unwrap_err();
        assert_eq!((e.field, e.offset), ("snapshot.l1_table_offset", 0x1000));
        let mut b = buf.clone();
        b[36..40].copy_from_slice(&5000u32.to_be_bytes());
        let e = parse_snapshot_table(&b, 0, 1, 65536).unwrap_err();
        assert_eq!(e.field, "snapshot.extra_data_size");
    }
}
