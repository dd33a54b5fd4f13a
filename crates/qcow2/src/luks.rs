//! The LUKS1 partition header that a LUKS-encrypted qcow2 image keeps where
//! its full disk encryption header extension points.
//!
//! The header is modelled here (parsed for `info` and validation, encoded
//! for `create`), with [`LuksSpec`], the cipher, mode, IV generator and hash
//! it names, typed and limited to what qblk can encrypt. Key slot material
//! and data encryption belong to whoever holds the key (the engine's
//! `crypto.rs`).

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
/// Anti-forensic stripes per key slot (what QEMU and cryptsetup use).
pub const LUKS_STRIPES: u32 = 4000;
/// Bytes of a salt (key slots and the master key digest).
pub const LUKS_SALT_BYTES: usize = 32;
/// Bytes of the master key digest.
pub const LUKS_DIGEST_BYTES: usize = 20;
/// Where the first key slot's material starts, and the alignment of every
/// key slot's material, in bytes (QEMU follows cryptsetup here).
pub const LUKS_KEY_SLOT_ALIGN: u64 = 4096;

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

    /// A header for a new image as QEMU lays it out: every key slot
    /// disabled with 4000 stripes, slot `i`'s material at 4096 bytes plus
    /// `i` times the material's size rounded up to 4096, the payload after
    /// the last slot. The caller fills in the digest, salts, iterations and
    /// the slot it enables.
    pub fn new_qemu_layout(spec: &LuksSpec, uuid: String) -> Self {
        let key_bytes = spec.master_key_bytes();
        let material = luks_material_bytes(key_bytes, LUKS_STRIPES)
            .next_multiple_of(SECTOR)
            .next_multiple_of(LUKS_KEY_SLOT_ALIGN);
        let slots: Vec<LuksKeySlot> = (0..LUKS_KEY_SLOTS as u64)
            .map(|i| LuksKeySlot {
                active: false,
                iterations: 0,
                salt: [0; LUKS_SALT_BYTES],
                key_offset: LUKS_KEY_SLOT_ALIGN + material * i,
                stripes: LUKS_STRIPES,
            })
            .collect();
        let payload_offset = LUKS_KEY_SLOT_ALIGN + material * LUKS_KEY_SLOTS as u64;
        Self {
            version: 1,
            cipher_name: "aes".into(),
            cipher_mode: spec.cipher_mode_spec(),
            hash_spec: spec.hash.name().into(),
            payload_offset,
            key_bytes: key_bytes as u32,
            mk_digest: [0; LUKS_DIGEST_BYTES],
            mk_digest_salt: [0; LUKS_SALT_BYTES],
            master_key_iterations: 0,
            uuid,
            slots,
        }
    }

    /// The 592 header bytes. Fails (naming the field) when a text field
    /// does not fit, an offset is not a whole number of sectors or does
    /// not fit its 32-bit field, or there are not exactly 8 key slots.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut b = vec![0u8; LUKS_HEADER_BYTES];
        b[..6].copy_from_slice(&LUKS_MAGIC);
        b[6..8].copy_from_slice(&self.version.to_be_bytes());
        let text = |b: &mut [u8], at: usize, len: usize, s: &str, field: &'static str| {
            // Room for the terminating NUL that readers look for.
            if s.len() >= len {
                return err(
                    field,
                    at as u64,
                    Problem::OutOfRange {
                        value: s.len() as u64,
                        min: 0,
                        max: len as u64 - 1,
                    },
                );
            }
            b[at..at + s.len()].copy_from_slice(s.as_bytes());
            Ok(())
        };
        let sectors = |bytes: u64, at: usize, field: &'static str| -> Result<[u8; 4]> {
            if bytes % SECTOR != 0 {
                return err(
                    field,
                    at as u64,
                    Problem::Misaligned {
                        value: bytes,
                        alignment: SECTOR,
                    },
                );
            }
            u32::try_from(bytes / SECTOR)
                .map(u32::to_be_bytes)
                .or_else(|_| err(field, at as u64, Problem::Overflow))
        };
        text(&mut b, 8, 32, &self.cipher_name, "luks.cipher_name")?;
        text(&mut b, 40, 32, &self.cipher_mode, "luks.cipher_mode")?;
        text(&mut b, 72, 32, &self.hash_spec, "luks.hash_spec")?;
        b[104..108].copy_from_slice(&sectors(self.payload_offset, 104, "luks.payload_offset")?);
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.master_key_iterations.to_be_bytes());
        text(&mut b, 168, 40, &self.uuid, "luks.uuid")?;
        if self.slots.len() != LUKS_KEY_SLOTS {
            return err(
                "luks.key_slot",
                208,
                Problem::OutOfRange {
                    value: self.slots.len() as u64,
                    min: LUKS_KEY_SLOTS as u64,
                    max: LUKS_KEY_SLOTS as u64,
                },
            );
        }
        for (i, slot) in self.slots.iter().enumerate() {
            let at = 208 + i * 48;
            let state = if slot.active {
                LUKS_SLOT_ENABLED
            } else {
                LUKS_SLOT_DISABLED
            };
            b[at..at + 4].copy_from_slice(&state.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&slot.iterations.to_be_bytes());
            b[at + 8..at + 40].copy_from_slice(&slot.salt);
            b[at + 40..at + 44].copy_from_slice(&sectors(
                slot.key_offset,
                at + 40,
                "luks.key_slot.key_material_offset",
            )?);
            b[at + 44..at + 48].copy_from_slice(&slot.stripes.to_be_bytes());
        }
        Ok(b)
    }
}

/// Bytes of one key slot's anti-forensic material (before any rounding).
pub fn luks_material_bytes(key_bytes: usize, stripes: u32) -> u64 {
    key_bytes as u64 * u64::from(stripes)
}

/// What qblk says it can do, in every "not supported" message.
const SUPPORTED: &str = "qblk supports aes-128/192/256 in xts or cbc mode";

/// Why a LUKS cipher, mode, IV generator or hash is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LuksSpecError {
    #[error("cipher {0} is not supported; {SUPPORTED}")]
    Cipher(String),
    #[error("cipher mode {0} is not supported; {SUPPORTED}")]
    Mode(String),
    #[error("IV generator {0} is not supported; qblk supports plain64 and essiv")]
    Ivgen(String),
    #[error("hash {0} is not supported; qblk supports sha1, sha224, sha256, sha384 and sha512")]
    Hash(String),
    #[error(
        "essiv with {hash} is not possible: its {digest_bytes}-byte digest is not an AES key (QEMU refuses it too; use sha256)"
    )]
    EssivHash {
        hash: &'static str,
        digest_bytes: usize,
    },
    #[error("a {key_bytes}-byte key does not fit aes in {mode} mode")]
    KeyBytes { key_bytes: u32, mode: &'static str },
}

/// The AES key sizes (QEMU's `cipher-alg` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LuksCipherAlg {
    Aes128,
    Aes192,
    Aes256,
}

impl LuksCipherAlg {
    pub const ALL: [Self; 3] = [Self::Aes128, Self::Aes192, Self::Aes256];

    pub fn parse(s: &str) -> Result<Self, LuksSpecError> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| LuksSpecError::Cipher(s.to_owned()))
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Aes128 => "aes-128",
            Self::Aes192 => "aes-192",
            Self::Aes256 => "aes-256",
        }
    }

    /// Bytes of one AES key.
    pub fn key_bytes(self) -> usize {
        match self {
            Self::Aes128 => 16,
            Self::Aes192 => 24,
            Self::Aes256 => 32,
        }
    }

    fn from_key_bytes(n: usize) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.key_bytes() == n)
    }
}

/// The block cipher modes (QEMU's `cipher-mode` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LuksCipherMode {
    Xts,
    Cbc,
}

impl LuksCipherMode {
    pub const ALL: [Self; 2] = [Self::Xts, Self::Cbc];

    pub fn parse(s: &str) -> Result<Self, LuksSpecError> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| LuksSpecError::Mode(s.to_owned()))
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Xts => "xts",
            Self::Cbc => "cbc",
        }
    }
}

/// The IV generators (QEMU's `ivgen-alg` names). ESSIV encrypts the
/// sector number with AES keyed by a hash of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LuksIvgen {
    Plain64,
    Essiv(LuksHash),
}

impl LuksIvgen {
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain64 => "plain64",
            Self::Essiv(_) => "essiv",
        }
    }

    /// `plain64`, or `essiv` with the hash of its key.
    pub fn parse(alg: &str, hash: LuksHash) -> Result<Self, LuksSpecError> {
        match alg {
            "plain64" => Ok(Self::Plain64),
            "essiv" => {
                // QEMU keys ESSIV's AES with the whole digest: the digest
                // must be an AES key size.
                let digest_bytes = hash.digest_bytes();
                if LuksCipherAlg::from_key_bytes(digest_bytes).is_none() {
                    return Err(LuksSpecError::EssivHash {
                        hash: hash.name(),
                        digest_bytes,
                    });
                }
                Ok(Self::Essiv(hash))
            }
            other => Err(LuksSpecError::Ivgen(other.to_owned())),
        }
    }

    /// The AES key size of the ESSIV cipher (the digest's size).
    pub fn essiv_cipher(self) -> Option<LuksCipherAlg> {
        match self {
            Self::Plain64 => None,
            Self::Essiv(h) => LuksCipherAlg::from_key_bytes(h.digest_bytes()),
        }
    }
}

/// The hashes for PBKDF2, the anti-forensic splitter and ESSIV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LuksHash {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl LuksHash {
    pub const ALL: [Self; 5] = [
        Self::Sha1,
        Self::Sha224,
        Self::Sha256,
        Self::Sha384,
        Self::Sha512,
    ];

    pub fn parse(s: &str) -> Result<Self, LuksSpecError> {
        Self::ALL
            .into_iter()
            .find(|h| h.name() == s)
            .ok_or_else(|| LuksSpecError::Hash(s.to_owned()))
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Sha1 => "sha1",
            Self::Sha224 => "sha224",
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
            Self::Sha512 => "sha512",
        }
    }

    pub fn digest_bytes(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha224 => 28,
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }
}

/// Cipher, mode, IV generator and hash of a LUKS image, limited to what
/// qblk encrypts: AES-128/192/256, XTS or CBC, plain64 or ESSIV IVs,
/// SHA-1/224/256/384/512. Defaults are qemu-img's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LuksSpec {
    pub cipher: LuksCipherAlg,
    pub mode: LuksCipherMode,
    pub ivgen: LuksIvgen,
    pub hash: LuksHash,
}

impl Default for LuksSpec {
    fn default() -> Self {
        Self {
            cipher: LuksCipherAlg::Aes256,
            mode: LuksCipherMode::Xts,
            ivgen: LuksIvgen::Plain64,
            hash: LuksHash::Sha256,
        }
    }
}

impl LuksSpec {
    /// What a header names, or why qblk cannot use it (by name).
    pub fn from_header(h: &LuksHeader) -> Result<Self, LuksSpecError> {
        if h.cipher_name != "aes" {
            return Err(LuksSpecError::Cipher(h.cipher_alg()));
        }
        let mode = LuksCipherMode::parse(h.mode())?;
        let key_bytes = h.key_bytes as usize;
        let one_key = match mode {
            LuksCipherMode::Xts if key_bytes % 2 == 0 => key_bytes / 2,
            LuksCipherMode::Xts => 0,
            LuksCipherMode::Cbc => key_bytes,
        };
        let cipher = LuksCipherAlg::from_key_bytes(one_key).ok_or(LuksSpecError::KeyBytes {
            key_bytes: h.key_bytes,
            mode: mode.name(),
        })?;
        let ivgen = match (h.ivgen(), h.ivgen_hash()) {
            (Some("plain64"), None) => LuksIvgen::Plain64,
            (Some("essiv"), Some(hash)) => LuksIvgen::parse("essiv", LuksHash::parse(hash)?)?,
            (Some("essiv"), None) => {
                return Err(LuksSpecError::Ivgen("essiv without a hash".into()));
            }
            (Some(other), _) => return Err(LuksSpecError::Ivgen(other.to_owned())),
            (None, _) => return Err(LuksSpecError::Ivgen("(none)".into())),
        };
        Ok(Self {
            cipher,
            mode,
            ivgen,
            hash: LuksHash::parse(&h.hash_spec)?,
        })
    }

    /// Bytes of the master key: one AES key, two for XTS.
    pub fn master_key_bytes(&self) -> usize {
        match self.mode {
            LuksCipherMode::Xts => 2 * self.cipher.key_bytes(),
            LuksCipherMode::Cbc => self.cipher.key_bytes(),
        }
    }

    /// The header's cipher_mode: `xts-plain64`, `cbc-essiv:sha256`.
    pub fn cipher_mode_spec(&self) -> String {
        match self.ivgen {
            LuksIvgen::Plain64 => format!("{}-plain64", self.mode.name()),
            LuksIvgen::Essiv(h) => format!("{}-essiv:{}", self.mode.name(), h.name()),
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
    fn encode_round_trips_and_matches_qemu_layout() {
        // What qemu-img 7.2 wrote for aes-256-xts-plain64: payload at
        // sector 4040, slot i's material at 8 + 504 i.
        let b = header();
        let h = LuksHeader::parse(&b, 0).unwrap();
        assert_eq!(h.encode().unwrap(), b);
        let spec = LuksSpec::from_header(&h).unwrap();
        assert_eq!(spec, LuksSpec::default());
        let mut fresh = LuksHeader::new_qemu_layout(&spec, "uuid".into());
        assert_eq!(fresh.payload_offset, h.payload_offset);
        for (a, b) in fresh.slots.iter().zip(&h.slots) {
            assert_eq!((a.key_offset, a.stripes), (b.key_offset, b.stripes));
        }
        fresh.slots[0].active = true;
        fresh.master_key_iterations = 12998;
        assert_eq!(fresh.encode().unwrap(), b);
        // aes-128-cbc: 16-byte keys, 64000 bytes of material (125 sectors,
        // rounded to 128).
        let small = LuksSpec {
            cipher: LuksCipherAlg::Aes128,
            mode: LuksCipherMode::Cbc,
            ..LuksSpec::default()
        };
        let h = LuksHeader::new_qemu_layout(&small, String::new());
        assert_eq!(h.slots[1].key_offset, 4096 + 128 * 512);
        assert_eq!(h.payload_offset, 4096 + 8 * 128 * 512);
        let mut long = h.clone();
        long.cipher_mode = "x".repeat(32);
        assert_eq!(long.encode().unwrap_err().field, "luks.cipher_mode");
    }

    #[test]
    fn specs_refused_by_name() {
        let with = |cipher: &str, mode: &str, hash: &str, key_bytes: u32| {
            let mut b = header();
            b[8..104].fill(0);
            b[8..8 + cipher.len()].copy_from_slice(cipher.as_bytes());
            b[40..40 + mode.len()].copy_from_slice(mode.as_bytes());
            b[72..72 + hash.len()].copy_from_slice(hash.as_bytes());
            b[108..112].copy_from_slice(&key_bytes.to_be_bytes());
            LuksSpec::from_header(&LuksHeader::parse(&b, 0).unwrap())
        };
        let msg = |r: Result<LuksSpec, LuksSpecError>| r.unwrap_err().to_string();
        assert_eq!(
            msg(with("twofish", "xts-plain64", "sha256", 64)),
            "cipher twofish-256 is not supported; qblk supports aes-128/192/256 in xts or cbc mode"
        );
        assert!(msg(with("serpent", "cbc-plain64", "sha256", 16)).contains("serpent-128"));
        assert!(msg(with("aes", "ecb", "sha256", 32)).contains("cipher mode ecb"));
        assert!(msg(with("aes", "xts-plain", "sha256", 64)).contains("IV generator plain "));
        assert!(msg(with("aes", "xts-plain64", "md5", 64)).contains("hash md5"));
        assert!(msg(with("aes", "cbc-essiv:sha1", "sha256", 32)).contains("essiv with sha1"));
        assert!(msg(with("aes", "xts-plain64", "sha256", 40)).contains("40-byte key"));
        assert!(msg(with("aes", "xts-plain64", "sha256", 33)).contains("33-byte key"));
        for cipher in LuksCipherAlg::ALL {
            for mode in LuksCipherMode::ALL {
                for ivgen in [LuksIvgen::Plain64, LuksIvgen::Essiv(LuksHash::Sha256)] {
                    for hash in LuksHash::ALL {
                        let spec = LuksSpec {
                            cipher,
                            mode,
                            ivgen,
                            hash,
                        };
                        let h = LuksHeader::new_qemu_layout(&spec, String::new());
                        let b = h.encode().unwrap();
                        let back = LuksHeader::parse(&b, 0).unwrap();
                        assert_eq!(LuksSpec::from_header(&back).unwrap(), spec);
                    }
                }
            }
        }
    }

    proptest::proptest! {
        /// Any header parse accepts encodes to the same bytes, up to the
        /// NUL that ends each text field.
        #[test]
        fn parse_encode_round_trip(
            mut b in proptest::collection::vec(proptest::prelude::any::<u8>(), LUKS_HEADER_BYTES),
            states in proptest::collection::vec(proptest::prelude::any::<bool>(), LUKS_KEY_SLOTS),
        ) {
            b[..8].copy_from_slice(&header()[..8]);
            for (i, on) in states.iter().enumerate() {
                let state = if *on { LUKS_SLOT_ENABLED } else { LUKS_SLOT_DISABLED };
                b[208 + i * 48..212 + i * 48].copy_from_slice(&state.to_be_bytes());
            }
            // Text fields: ASCII up to a NUL, zeros after it.
            for (at, len) in [(8, 32), (40, 32), (72, 32), (168, 40)] {
                let field = &mut b[at..at + len];
                let n = field[0] as usize % len;
                for (j, c) in field.iter_mut().enumerate() {
                    *c = if j < n { b'a' + *c % 26 } else { 0 };
                }
            }
            let h = LuksHeader::parse(&b, 0).unwrap();
            proptest::prop_assert_eq!(h.encode().unwrap(), b);
        }
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
