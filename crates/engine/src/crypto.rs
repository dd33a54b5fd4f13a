//! LUKS data encryption for qcow2 (crypt_method 2): unlocking the master
//! key from a key slot, and XTS encryption of data sectors.
//!
//! As QEMU does for qcow2, the XTS tweak of a 512-byte sector is its host
//! (physical) sector number, plain64. Supported: AES-128/256 in XTS with
//! plain64 IVs, and SHA-1 or SHA-256 for PBKDF2 and the anti-forensic
//! splitter, which covers what qemu-img creates by default.

use aes::cipher::KeyInit;
use aes::{Aes128, Aes256};
use qblk_qcow2::luks::LuksHeader;
use sha2::Digest;
use xts_mode::{Xts128, get_tweak_default};

/// Bytes per encrypted sector.
pub const SECTOR: u64 = 512;
/// Most anti-forensic stripes a key slot may have (LUKS uses 4000).
const MAX_STRIPES: usize = 64_000;
/// Most PBKDF2 iterations accepted from an image: a hostile header could
/// otherwise make unlocking run for hours (qemu-img's default iter-time of
/// 2 s gives a few million on current machines).
const MAX_ITERATIONS: u32 = 50_000_000;

/// An unlocked data cipher.
pub enum Crypto {
    Aes128(Box<Xts128<Aes128>>),
    Aes256(Box<Xts128<Aes256>>),
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Crypto::Aes128(_) => f.write_str("Crypto(aes-128-xts-plain64)"),
            Crypto::Aes256(_) => f.write_str("Crypto(aes-256-xts-plain64)"),
        }
    }
}

#[derive(Clone, Copy)]
enum Hash {
    Sha1,
    Sha256,
}

impl Hash {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "sha1" => Ok(Self::Sha1),
            "sha256" => Ok(Self::Sha256),
            other => Err(format!(
                "LUKS hash '{other}' is not supported (sha1, sha256)"
            )),
        }
    }

    fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        match self {
            Self::Sha1 => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, rounds, out),
            Self::Sha256 => pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, rounds, out),
        }
    }

    fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        match self {
            Self::Sha1 => {
                let mut h = sha1::Sha1::new();
                for p in parts {
                    h.update(p);
                }
                h.finalize().to_vec()
            }
            Self::Sha256 => {
                let mut h = sha2::Sha256::new();
                for p in parts {
                    h.update(p);
                }
                h.finalize().to_vec()
            }
        }
    }
}

impl Crypto {
    fn new(key: &[u8]) -> Result<Self, String> {
        let half = key.len() / 2;
        match key.len() {
            32 => Ok(Crypto::Aes128(Box::new(Xts128::new(
                Aes128::new_from_slice(&key[..half]).map_err(|e| e.to_string())?,
                Aes128::new_from_slice(&key[half..]).map_err(|e| e.to_string())?,
            )))),
            64 => Ok(Crypto::Aes256(Box::new(Xts128::new(
                Aes256::new_from_slice(&key[..half]).map_err(|e| e.to_string())?,
                Aes256::new_from_slice(&key[half..]).map_err(|e| e.to_string())?,
            )))),
            n => Err(format!(
                "an XTS key of {n} bytes is not supported (32 or 64)"
            )),
        }
    }

    /// Decrypts whole sectors in place; `first_sector` is the sector number
    /// (the tweak) of `buf[0]`.
    pub fn decrypt(&self, first_sector: u64, buf: &mut [u8]) {
        debug_assert_eq!(buf.len() as u64 % SECTOR, 0);
        match self {
            Crypto::Aes128(x) => {
                x.decrypt_area(buf, SECTOR as usize, first_sector.into(), get_tweak_default)
            }
            Crypto::Aes256(x) => {
                x.decrypt_area(buf, SECTOR as usize, first_sector.into(), get_tweak_default)
            }
        }
    }

    /// Encrypts whole sectors in place.
    pub fn encrypt(&self, first_sector: u64, buf: &mut [u8]) {
        debug_assert_eq!(buf.len() as u64 % SECTOR, 0);
        match self {
            Crypto::Aes128(x) => {
                x.encrypt_area(buf, SECTOR as usize, first_sector.into(), get_tweak_default)
            }
            Crypto::Aes256(x) => {
                x.encrypt_area(buf, SECTOR as usize, first_sector.into(), get_tweak_default)
            }
        }
    }

    /// Unlocks the master key with `password`. `area` holds the LUKS
    /// header area (header and key material) as stored in the image.
    pub fn unlock(luks: &LuksHeader, area: &[u8], password: &[u8]) -> Result<Crypto, String> {
        if luks.cipher_name != "aes" || luks.cipher_mode != "xts-plain64" {
            return Err(format!(
                "LUKS cipher {}-{} is not supported (aes-xts-plain64)",
                luks.cipher_name, luks.cipher_mode
            ));
        }
        let hash = Hash::parse(&luks.hash_spec)?;
        let key_len = luks.key_bytes as usize;
        for slot in luks.slots.iter().filter(|s| s.active) {
            let stripes = slot.stripes as usize;
            if stripes == 0 || stripes > MAX_STRIPES || slot.iterations == 0 {
                continue;
            }
            if slot.iterations > MAX_ITERATIONS || luks.master_key_iterations > MAX_ITERATIONS {
                return Err(format!(
                    "LUKS iteration counts above {MAX_ITERATIONS} are refused (the image asks for {}): unlocking would take too long",
                    slot.iterations.max(luks.master_key_iterations)
                ));
            }
            let material_len = (key_len * stripes).next_multiple_of(SECTOR as usize);
            let start = usize::try_from(slot.key_offset).map_err(|e| e.to_string())?;
            let Some(material) = area.get(start..start + material_len) else {
                return Err("LUKS key material lies outside the encryption header".into());
            };
            let mut slot_key = vec![0u8; key_len];
            hash.pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
            let mut split = material.to_vec();
            Crypto::new(&slot_key)?.decrypt(0, &mut split);
            let master = af_merge(hash, &split[..key_len * stripes], key_len, stripes);
            let mut digest = [0u8; 20];
            hash.pbkdf2(
                &master,
                &luks.mk_digest_salt,
                luks.master_key_iterations,
                &mut digest,
            );
            if digest == luks.mk_digest {
                return Crypto::new(&master);
            }
        }
        Err("no LUKS key slot accepts this key".into())
    }
}

/// The anti-forensic merge of LUKS1: XOR the stripes together, diffusing
/// the running value with the hash after every stripe but the last.
fn af_merge(hash: Hash, split: &[u8], key_len: usize, stripes: usize) -> Vec<u8> {
    let mut acc = vec![0u8; key_len];
    for i in 0..stripes - 1 {
        for (a, b) in acc.iter_mut().zip(&split[i * key_len..(i + 1) * key_len]) {
            *a ^= b;
        }
        acc = diffuse(hash, &acc);
    }
    for (a, b) in acc.iter_mut().zip(&split[(stripes - 1) * key_len..]) {
        *a ^= b;
    }
    acc
}

/// Hashes the buffer block by block, each block prefixed with its
/// big-endian index; a short last block keeps only its length of digest.
fn diffuse(hash: Hash, buf: &[u8]) -> Vec<u8> {
    let digest_len = hash.digest(&[]).len();
    let mut out = Vec::with_capacity(buf.len());
    for (i, block) in buf.chunks(digest_len).enumerate() {
        let d = hash.digest(&[&(i as u32).to_be_bytes(), block]);
        out.extend_from_slice(&d[..block.len()]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xts_round_trip_and_tweak() {
        let c = Crypto::new(&[7u8; 64]).unwrap();
        let plain = vec![0x42u8; 2048];
        let mut a = plain.clone();
        c.encrypt(10, &mut a);
        assert_ne!(a, plain);
        // Sector 11 alone encrypts like the second sector of a run at 10.
        let mut b = plain[512..1024].to_vec();
        c.encrypt(11, &mut b);
        assert_eq!(&a[512..1024], &b[..]);
        c.decrypt(10, &mut a);
        assert_eq!(a, plain);
    }

    #[test]
    fn af_merge_inverts_a_split() {
        // Split by hand: stripes 0..n-1 random, last chosen to give the key.
        let hash = Hash::Sha256;
        let key: Vec<u8> = (0..32u8).collect();
        let stripes = 4;
        let mut split: Vec<u8> = (0..32 * stripes).map(|i| (i * 7 % 251) as u8).collect();
        let mut acc = vec![0u8; 32];
        for i in 0..stripes - 1 {
            for (a, b) in acc.iter_mut().zip(&split[i * 32..(i + 1) * 32]) {
                *a ^= b;
            }
            acc = diffuse(hash, &acc);
        }
        for (j, s) in split[(stripes - 1) * 32..].iter_mut().enumerate() {
            *s = acc[j] ^ key[j];
        }
        assert_eq!(af_merge(hash, &split, 32, stripes), key);
    }
}
