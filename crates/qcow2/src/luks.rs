//! The LUKS1 partition header that a LUKS-encrypted qcow2 image keeps where
//! its full disk encryption header extension points.
//!
//! Only the header is modelled here (for `info` and validation); key slot
//! material and data decryption belong to whoever holds the key.

use crate::be::Reader;
use crate::error::{Problem, Result, err};

/// Size of the LUKS1 partition header.
pub const LUKS_HEADER_BYTES: usize = 592;
/// "LUKS\xba\xbe"
pub const LUKS_MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Key slots in a LUKS1 header.
pub const LUKS_KEY_SLOTS: usize = 8;
/// Value of `active` for an enabled key slot.
pub const LUKS_SLOT_ENABLED: u32 = 0x00ac_71f3;
/// Value of `active` for a disabled key slot.
pub const LUKS_SLOT_DISABLED: u32 = 0x0000_dead;
const SECTOR: u64 = 512;

/// One LUKS key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksKeySlot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; 32],
    /// Key material offset in bytes, relative to the LUKS header.
    pub key_offset: u64,
    pub stripes: u32,
}

/// A parsed LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    pub version: u16,
    pub cipher_name: String,
    pub cipher_mode: String,
    pub hash_spec: String,
    /// Payload offset in bytes (not used by qcow2, but must be valid).
    pub payload_offset: u64,
    pub key_bytes: u32,
    /// PBKDF2 digest of the master key, and its salt and iterations.
    pub mk_digest: [u8; 20],
    pub mk_digest_salt: [u8; 32],
    pub master_key_iterations: u32,
    pub uuid: String,
    pub slots: Vec<LuksKeySlot>,
}

impl LuksHeader {
    /// Parses the header from the bytes at `base` in the image file.
    pub fn parse(buf: &[u8], base: u64) -> Result<Self> {
        let r = Reader::new(buf, base);
        let magic = r.bytes(0, 6, "luks.magic")?;
        if magic != LUKS_MAGIC {
            return err(
                "luks.magic",
                base,
                Problem::Inconsistent("not a LUKS header"),
            );
        }
        let version = r.u16(6, "luks.version")?;
        if version != 1 {
            return err(
                "luks.version",
                base + 6,
                Problem::OutOfRange {
                    value: version.into(),
                    min: 1,
                    max: 1,
                },
            );
        }
        let text = |at: usize, len: usize, field: &'static str| -> Result<String> {
            let b = r.bytes(at, len, field)?;
            let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            std::str::from_utf8(&b[..n])
                .map(str::to_owned)
                .map_err(|_| crate::FormatError::new(field, r.file_offset(at), Problem::NotUtf8))
        };
        let cipher_name = text(8, 32, "luks.cipher_name")?;
        let cipher_mode = text(40, 32, "luks.cipher_mode")?;
        let hash_spec = text(72, 32, "luks.hash_spec")?;
        let payload_offset = u64::from(r.u32(104, "luks.payload_offset")?) * SECTOR;
        let key_bytes = r.u32(108, "luks.key_bytes")?;
        let mut mk_digest = [0u8; 20];
        mk_digest.copy_from_slice(r.bytes(112, 20, "luks.mk_digest")?);
        let mut mk_digest_salt = [0u8; 32];
        mk_digest_salt.copy_from_slice(r.bytes(132, 32, "luks.mk_digest_salt")?);
        let master_key_iterations = r.u32(164, "luks.mk_digest_iter")?;
        let uuid = text(168, 40, "luks.uuid")?;
        let mut slots = Vec::with_capacity(LUKS_KEY_SLOTS);
        for i in 0..LUKS_KEY_SLOTS {
            let at = 208 + i * 48;
            let state = r.u32(at, "luks.key_slot.active")?;
            let active = match state {
                LUKS_SLOT_ENABLED => true,
                LUKS_SLOT_DISABLED => false,
                _ => {
                    return err(
                        "luks.key_slot.active",
                        r.file_offset(at),
                        Problem::Inconsistent("key slot state is neither enabled nor disabled"),
                    );
                }
            };
            let mut salt = [0u8; 32];
            salt.copy_from_slice(r.bytes(at + 8, 32, "luks.key_slot.salt")?);
            slots.push(LuksKeySlot {
                active,
                iterations: r.u32(at + 4, "luks.key_slot.iterations")?,
                salt,
                key_offset: u64::from(r.u32(at + 40, "luks.key_slot.key_material_offset")?)
                    * SECTOR,
                stripes: r.u32(at + 44, "luks.key_slot.stripes")?,
            });
        }
        Ok(Self {
            version,
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            master_key_iterations,
            uuid,
            slots,
        })
    }

    /// The cipher mode without its IV generator: `xts` of `xts-plain64`.
    pub fn mode(&self) -> &str {
        self.cipher_mode.split('-').next().unwrap_or("")
    }

    /// The IV generator: `plain64` of `xts-plain64`, `essiv` of
    /// `cbc-essiv:sha256`.
    pub fn ivgen(&self) -> Option<&str> {
        let iv = self.cipher_mode.split_once('-')?.1;
        Some(iv.split(':').next().unwrap_or(iv))
    }

    /// The hash of the IV generator, if it has one (`sha256` of
    /// `cbc-essiv:sha256`).
    pub fn ivgen_hash(&self) -> Option<&str> {
        self.cipher_mode.split_once(':').map(|(_, h)| h)
    }

    /// QEMU's cipher algorithm name, e.g. `aes-256` (XTS keys are two cipher
    /// keys, so their size is halved first).
    pub fn cipher_alg(&self) -> String {
        let bits = if self.mode() == "xts" {
            self.key_bytes * 4
        } else {
            self.key_bytes * 8
        };
        match self.cipher_name.as_str() {
            "sm4" => "sm4".to_owned(),
            name => format!("{name}-{bits}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut b = vec![0u8; LUKS_HEADER_BYTES];
        b[..6].copy_from_slice(&LUKS_MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        b[8..11].copy_from_slice(b"aes");
        b[40..51].copy_from_slice(b"xts-plain64");
        b[72..78].copy_from_slice(b"sha256");
        b[104..108].copy_from_slice(&4040u32.to_be_bytes());
        b[108..112].copy_from_slice(&64u32.to_be_bytes());
        b[164..168].copy_from_slice(&12998u32.to_be_bytes());
        b[168..172].copy_from_slice(b"uuid");
        for i in 0..8 {
            let at = 208 + i * 48;
            let state = if i == 0 {
                LUKS_SLOT_ENABLED
            } else {
                LUKS_SLOT_DISABLED
            };
            b[at..at + 4].copy_from_slice(&state.to_be_bytes());
            b[at + 40..at + 44].copy_from_slice(&(8 + 504 * i as u32).to_be_bytes());
            b[at + 44..at + 48].copy_from_slice(&4000u32.to_be_bytes());
        }
        b
    }

    #[test]
    fn parses_qemu_defaults() {
        let h = LuksHeader::parse(&header(), 0x40000).unwrap();
        assert_eq!(h.cipher_alg(), "aes-256");
        assert_eq!(h.mode(), "xts");
        assert_eq!(h.ivgen(), Some("plain64"));
        assert_eq!(h.ivgen_hash(), None);
        assert_eq!(h.payload_offset, 4040 * 512);
        assert_eq!(h.slots[0].key_offset, 4096);
        assert!(h.slots[0].active && !h.slots[1].active);
    }

    #[test]
    fn bad_fields_named() {
        let mut b = header();
        b[0] = b'X';
        assert_eq!(
            LuksHeader::parse(&b, 0x40000).unwrap_err().field,
            "luks.magic"
        );
        let mut b = header();
        b[208 + 48] = 1;
        let e = LuksHeader::parse(&b, 0x40000).unwrap_err();
        assert_eq!((e.field, e.offset), ("luks.key_slot.active", 0x40000 + 256));
        assert!(LuksHeader::parse(&header()[..100], 0).is_err());
    }

    #[test]
    fn essiv_modes() {
        let mut b = header();
        b[40..72].fill(0);
        b[40..56].copy_from_slice(b"cbc-essiv:sha256");
        b[108..112].copy_from_slice(&32u32.to_be_bytes());
        let h = LuksHeader::parse(&b, 0).unwrap();
        assert_eq!(h.cipher_alg(), "aes-256");
        assert_eq!(h.ivgen(), Some("essiv"));
        assert_eq!(h.ivgen_hash(), Some("sha256"));
    }
}
