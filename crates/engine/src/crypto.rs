//! LUKS data encryption for qcow2 (crypt_method 2): unlocking the master
//! key from a key slot, creating a LUKS header with one key slot, and the
//! sector cipher of the data path.
//!
//! Supported is exactly what qemu-img creates with AES: AES-128/192/256,
//! XTS or CBC, plain64 or ESSIV IVs (ESSIV keyed with a SHA-256 digest, the
//! only supported hash whose digest is an AES key), and SHA-1/224/256/384/512
//! for PBKDF2 and the anti-forensic splitter. [`LuksSpec`] refuses the rest
//! by name.
//!
//! As QEMU does for qcow2, the IV (XTS tweak) of a 512-byte sector is its
//! host (physical) sector number; key material is encrypted the same way
//! with sector numbers from 0.
//!
//! The ciphers are RustCrypto's (aes, xts-mode, cbc); the hashes sha1 and
//! sha2; PBKDF2 is pbkdf2's. Nothing here implements a primitive. Keys,
//! key schedules and decrypted key material are zeroed when dropped
//! (zeroize, and aes's zeroize feature).

use aes::cipher::{
    Array, BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt,
    BlockSizeUser, InnerIvInit, KeyInit, consts::U16,
};
use aes::{Aes128, Aes192, Aes256};
use qblk_qcow2::luks::{
    LUKS_DIGEST_BYTES, LuksCipherAlg, LuksCipherMode, LuksHash, LuksHeader, LuksIvgen, LuksSpec,
    LuksSpecError, luks_material_bytes,
};
use sha2::Digest;
use xts_mode::Xts128;
use zeroize::Zeroizing;

/// Bytes per encrypted sector.
pub const SECTOR: u64 = 512;
const SECTOR_BYTES: usize = SECTOR as usize;
/// Most anti-forensic stripes a key slot may have (LUKS uses 4000).
const MAX_STRIPES: u32 = 64_000;
/// Most PBKDF2 iterations accepted from an image: a hostile header could
/// otherwise make unlocking run for hours (qemu-img's default iter-time of
/// 2 s gives a few million on current machines).
const MAX_ITERATIONS: u32 = 50_000_000;
/// Fewest PBKDF2 iterations QEMU writes, for the key slot and the master
/// key digest alike, however short the iteration time.
const MIN_ITERATIONS: u64 = 1000;
/// The longest iter-time accepted (QEMU takes any; a day is plenty).
pub const MAX_ITER_TIME_MS: u64 = 86_400_000;
/// qemu-img's default `encrypt.iter-time`.
pub const DEFAULT_ITER_TIME_MS: u64 = 2000;

/// What went wrong unlocking or creating a LUKS header.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    #[error("LUKS: {0}")]
    Spec(#[from] LuksSpecError),
    #[error("wrong passphrase: it opens none of the image's LUKS key slots")]
    WrongKey,
    #[error("the LUKS header has no active key slot")]
    NoActiveSlot,
    #[error("LUKS key slot {slot}: {what}")]
    Slot { slot: usize, what: String },
    #[error(
        "LUKS {what}: {iterations} PBKDF2 iterations are refused (more than {MAX_ITERATIONS}): unlocking would take too long"
    )]
    TooManyIterations { what: String, iterations: u32 },
    #[error("cannot get random bytes from the operating system: {0}")]
    Random(getrandom::Error),
    #[error(
        "encrypt.iter-time={0}: PBKDF2 iterations for that long do not fit the header's 32 bits"
    )]
    IterTime(u64),
    #[error("cannot measure PBKDF2's speed: {0}")]
    Clock(std::io::Error),
    #[error("internal error encoding the LUKS header: {0}")]
    Header(#[from] qblk_qcow2::FormatError),
}

/// The hash of PBKDF2 and the splitter, as a type the RustCrypto traits
/// take.
fn with_hash<R>(hash: LuksHash, f: impl HashUser<R>) -> R {
    match hash {
        LuksHash::Sha1 => f.call::<sha1::Sha1>(),
        LuksHash::Sha224 => f.call::<sha2::Sha224>(),
        LuksHash::Sha256 => f.call::<sha2::Sha256>(),
        LuksHash::Sha384 => f.call::<sha2::Sha384>(),
        LuksHash::Sha512 => f.call::<sha2::Sha512>(),
    }
}

/// A computation generic over the hash (a closure cannot be).
trait HashUser<R> {
    fn call<D: Digest + pbkdf2::hmac::EagerHash + Clone>(self) -> R;
}

fn pbkdf2(hash: LuksHash, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
    struct P<'a>(&'a [u8], &'a [u8], u32, &'a mut [u8]);
    impl HashUser<()> for P<'_> {
        fn call<D: Digest + pbkdf2::hmac::EagerHash + Clone>(self) {
            pbkdf2::pbkdf2_hmac::<D>(self.0, self.1, self.2, self.3)
        }
    }
    with_hash(hash, P(password, salt, rounds, out))
}

/// The digest of `data` into `out` (at least the digest's size); returns
/// the digest's size.
fn digest_into(hash: LuksHash, parts: &[&[u8]], out: &mut [u8; 64]) -> usize {
    struct H<'a>(&'a [&'a [u8]], &'a mut [u8; 64]);
    impl HashUser<usize> for H<'_> {
        fn call<D: Digest + pbkdf2::hmac::EagerHash + Clone>(self) -> usize {
            let mut h = D::new();
            for p in self.0 {
                h.update(p);
            }
            let d = h.finalize();
            self.1[..d.len()].copy_from_slice(&d);
            d.len()
        }
    }
    with_hash(hash, H(parts, out))
}

/// An AES block cipher of any key size, for ESSIV.
#[derive(Clone)]
enum AnyAes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl AnyAes {
    fn new(alg: LuksCipherAlg, key: &[u8]) -> Self {
        // Callers pass keys of the size `alg` names; a mismatch is our bug.
        let bad = "AES key of the size its algorithm names";
        match alg {
            LuksCipherAlg::Aes128 => Self::A128(Aes128::new_from_slice(key).expect(bad)),
            LuksCipherAlg::Aes192 => Self::A192(Aes192::new_from_slice(key).expect(bad)),
            LuksCipherAlg::Aes256 => Self::A256(Aes256::new_from_slice(key).expect(bad)),
        }
    }

    fn encrypt_block(&self, block: &mut Array<u8, U16>) {
        match self {
            Self::A128(c) => c.encrypt_block(block),
            Self::A192(c) => c.encrypt_block(block),
            Self::A256(c) => c.encrypt_block(block),
        }
    }
}

/// The IV generator: the sector number, little-endian, in a 16-byte block;
/// ESSIV then encrypts that block with AES keyed by a hash of the key.
enum Ivgen {
    Plain64,
    Essiv(Box<AnyAes>),
}

impl Ivgen {
    fn new(ivgen: LuksIvgen, key: &[u8]) -> Self {
        match (ivgen, ivgen.essiv_cipher()) {
            (LuksIvgen::Essiv(hash), Some(alg)) => {
                let mut salt = Zeroizing::new([0u8; 64]);
                let n = digest_into(hash, &[key], &mut salt);
                Self::Essiv(Box::new(AnyAes::new(alg, &salt[..n])))
            }
            // LuksIvgen::parse admits only ESSIV hashes that key an AES.
            (LuksIvgen::Essiv(_), None) | (LuksIvgen::Plain64, _) => Self::Plain64,
        }
    }

    fn iv(&self, sector: u64) -> Array<u8, U16> {
        let mut iv = Array::<u8, U16>::default();
        iv[..8].copy_from_slice(&sector.to_le_bytes());
        if let Self::Essiv(c) = self {
            c.encrypt_block(&mut iv);
        }
        iv
    }
}

enum Mode<C> {
    Xts(Xts128<C>),
    Cbc(C),
}

/// One cipher, mode and IV generator with its keys: no allocation and no
/// key schedule per sector.
struct SectorCipher<C> {
    mode: Mode<C>,
    ivgen: Ivgen,
}

impl<C> SectorCipher<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + KeyInit,
{
    /// `key` is the master key (two AES keys for XTS); its size is the
    /// spec's, checked by the caller.
    fn new(spec: &LuksSpec, key: &[u8]) -> Self {
        let bad = "AES key of the size its algorithm names";
        let mode = match spec.mode {
            LuksCipherMode::Xts => {
                let (k1, k2) = key.split_at(key.len() / 2);
                Mode::Xts(Xts128::new(
                    C::new_from_slice(k1).expect(bad),
                    C::new_from_slice(k2).expect(bad),
                ))
            }
            LuksCipherMode::Cbc => Mode::Cbc(C::new_from_slice(key).expect(bad)),
        };
        Self {
            mode,
            ivgen: Ivgen::new(spec.ivgen, key),
        }
    }

    /// Each 512-byte sector (a shorter last one too, if it is a whole
    /// number of 16-byte blocks) with the IV of its sector number.
    fn encrypt(&self, first_sector: u64, buf: &mut [u8]) {
        for (i, sector) in buf.chunks_mut(SECTOR_BYTES).enumerate() {
            let iv = self.ivgen.iv(first_sector.wrapping_add(i as u64));
            match &self.mode {
                Mode::Xts(x) => x.encrypt_sector(sector, iv),
                Mode::Cbc(c) => {
                    let (blocks, rest) = Array::<u8, U16>::slice_as_chunks_mut(sector);
                    debug_assert!(rest.is_empty(), "CBC needs whole blocks");
                    cbc::Encryptor::<&C>::inner_iv_init(c, &iv).encrypt_blocks(blocks);
                }
            }
        }
    }

    fn decrypt(&self, first_sector: u64, buf: &mut [u8]) {
        for (i, sector) in buf.chunks_mut(SECTOR_BYTES).enumerate() {
            let iv = self.ivgen.iv(first_sector.wrapping_add(i as u64));
            match &self.mode {
                Mode::Xts(x) => x.decrypt_sector(sector, iv),
                Mode::Cbc(c) => {
                    let (blocks, rest) = Array::<u8, U16>::slice_as_chunks_mut(sector);
                    debug_assert!(rest.is_empty(), "CBC needs whole blocks");
                    cbc::Decryptor::<&C>::inner_iv_init(c, &iv).decrypt_blocks(blocks);
                }
            }
        }
    }
}

enum Keyed {
    Aes128(Box<SectorCipher<Aes128>>),
    Aes192(Box<SectorCipher<Aes192>>),
    Aes256(Box<SectorCipher<Aes256>>),
}

/// An image's data cipher with its key, made once when the image is
/// unlocked and shared by every request.
pub struct Crypto {
    spec: LuksSpec,
    keyed: Keyed,
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Crypto({}-{})",
            self.spec.cipher.name(),
            self.spec.cipher_mode_spec()
        )
    }
}

impl Crypto {
    /// The cipher of `spec` keyed with `key` (the master key, or a slot
    /// key for key material). `key` has the spec's master key size.
    fn new(spec: &LuksSpec, key: &[u8]) -> Self {
        debug_assert_eq!(key.len(), spec.master_key_bytes());
        let keyed = match spec.cipher {
            LuksCipherAlg::Aes128 => Keyed::Aes128(Box::new(SectorCipher::new(spec, key))),
            LuksCipherAlg::Aes192 => Keyed::Aes192(Box::new(SectorCipher::new(spec, key))),
            LuksCipherAlg::Aes256 => Keyed::Aes256(Box::new(SectorCipher::new(spec, key))),
        };
        Self { spec: *spec, keyed }
    }

    /// What the image is encrypted with.
    pub fn spec(&self) -> &LuksSpec {
        &self.spec
    }

    /// Decrypts whole sectors in place; `first_sector` is the sector number
    /// (the IV) of `buf[0]`.
    pub fn decrypt(&self, first_sector: u64, buf: &mut [u8]) {
        debug_assert_eq!(buf.len() % SECTOR_BYTES, 0);
        match &self.keyed {
            Keyed::Aes128(c) => c.decrypt(first_sector, buf),
            Keyed::Aes192(c) => c.decrypt(first_sector, buf),
            Keyed::Aes256(c) => c.decrypt(first_sector, buf),
        }
    }

    /// Encrypts whole sectors in place.
    pub fn encrypt(&self, first_sector: u64, buf: &mut [u8]) {
        debug_assert_eq!(buf.len() % SECTOR_BYTES, 0);
        match &self.keyed {
            Keyed::Aes128(c) => c.encrypt(first_sector, buf),
            Keyed::Aes192(c) => c.encrypt(first_sector, buf),
            Keyed::Aes256(c) => c.encrypt(first_sector, buf),
        }
    }

    /// Key material (not a whole number of sectors for aes-192-cbc): the
    /// last, short sector is encrypted on its own, as QEMU would.
    fn encrypt_material(&self, buf: &mut [u8]) {
        match &self.keyed {
            Keyed::Aes128(c) => c.encrypt(0, buf),
            Keyed::Aes192(c) => c.encrypt(0, buf),
            Keyed::Aes256(c) => c.encrypt(0, buf),
        }
    }

    fn decrypt_material(&self, buf: &mut [u8]) {
        match &self.keyed {
            Keyed::Aes128(c) => c.decrypt(0, buf),
            Keyed::Aes192(c) => c.decrypt(0, buf),
            Keyed::Aes256(c) => c.decrypt(0, buf),
        }
    }

    /// Unlocks the master key with `password`. `area` holds the LUKS
    /// header area (header and key material) as stored in the image.
    pub fn unlock(luks: &LuksHeader, area: &[u8], password: &[u8]) -> Result<Crypto, CryptoError> {
        let spec = LuksSpec::from_header(luks)?;
        let key_len = spec.master_key_bytes();
        if luks.master_key_iterations > MAX_ITERATIONS {
            return Err(CryptoError::TooManyIterations {
                what: "master key digest".into(),
                iterations: luks.master_key_iterations,
            });
        }
        let mut tried = false;
        for (i, slot) in luks.slots.iter().enumerate().filter(|(_, s)| s.active) {
            let bad = |what: String| CryptoError::Slot { slot: i, what };
            if slot.stripes == 0 || slot.stripes > MAX_STRIPES {
                return Err(bad(format!(
                    "{} stripes (1 to {MAX_STRIPES} accepted)",
                    slot.stripes
                )));
            }
            if slot.iterations == 0 {
                return Err(bad("0 PBKDF2 iterations".into()));
            }
            if slot.iterations > MAX_ITERATIONS {
                return Err(CryptoError::TooManyIterations {
                    what: format!("key slot {i}"),
                    iterations: slot.iterations,
                });
            }
            let material_len = luks_material_bytes(key_len, slot.stripes) as usize;
            let material = usize::try_from(slot.key_offset)
                .ok()
                .and_then(|start| area.get(start..start.checked_add(material_len)?))
                .ok_or_else(|| {
                    bad(format!(
                        "key material at {:#x} (+{material_len:#x}) lies outside the {:#x}-byte encryption header",
                        slot.key_offset,
                        area.len()
                    ))
                })?;
            tried = true;
            let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
            pbkdf2(
                spec.hash,
                password,
                &slot.salt,
                slot.iterations,
                &mut slot_key,
            );
            let mut split = Zeroizing::new(material.to_vec());
            Crypto::new(&spec, &slot_key).decrypt_material(&mut split);
            let master = af_merge(spec.hash, &split, key_len, slot.stripes as usize);
            let mut digest = [0u8; LUKS_DIGEST_BYTES];
            pbkdf2(
                spec.hash,
                &master,
                &luks.mk_digest_salt,
                luks.master_key_iterations,
                &mut digest,
            );
            if digest == luks.mk_digest {
                return Ok(Crypto::new(&spec, &master));
            }
        }
        Err(if tried {
            CryptoError::WrongKey
        } else {
            CryptoError::NoActiveSlot
        })
    }
}

/// A new LUKS header area (header, key slot 0 and zeros up to the payload
/// offset, which is the area's length) as qemu-img creates it: a random
/// master key and salts from the operating system, 4000 stripes, and
/// PBKDF2 iterations calibrated so that unlocking slot 0 takes about
/// `iter_time_ms` of CPU time here and checking the master key an eighth
/// of it (at least 1000 iterations each).
pub fn create_luks_area(
    spec: &LuksSpec,
    password: &[u8],
    iter_time_ms: u64,
) -> Result<Vec<u8>, CryptoError> {
    let key_len = spec.master_key_bytes();
    let random = |buf: &mut [u8]| getrandom::fill(buf).map_err(CryptoError::Random);
    let mut master = Zeroizing::new(vec![0u8; key_len]);
    random(&mut master)?;
    let mut uuid = [0u8; 16];
    random(&mut uuid)?;
    let mut h = LuksHeader::new_qemu_layout(spec, uuid_v4(uuid));
    random(&mut h.mk_digest_salt)?;

    let per_second = pbkdf2_per_second(
        spec.hash,
        &master,
        &h.mk_digest_salt,
        LUKS_DIGEST_BYTES,
        iter_time_ms,
    )?;
    // Like cryptsetup and QEMU: an eighth of the time for the digest.
    h.master_key_iterations = scaled_iterations(per_second, iter_time_ms, 8)?;
    pbkdf2(
        spec.hash,
        &master,
        &h.mk_digest_salt,
        h.master_key_iterations,
        &mut h.mk_digest,
    );

    let mut slot = h.slots[0].clone();
    random(&mut slot.salt)?;
    let per_second = pbkdf2_per_second(spec.hash, password, &slot.salt, key_len, iter_time_ms)?;
    slot.iterations = scaled_iterations(per_second, iter_time_ms, 1)?;
    slot.active = true;
    let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
    pbkdf2(
        spec.hash,
        password,
        &slot.salt,
        slot.iterations,
        &mut slot_key,
    );
    // Plain stripes give the key: zeroed on drop too.
    let mut split = Zeroizing::new(vec![
        0u8;
        luks_material_bytes(key_len, slot.stripes) as usize
    ]);
    random(&mut split[..key_len * (slot.stripes as usize - 1)])?;
    af_split_last(spec.hash, &master, &mut split, slot.stripes as usize);
    Crypto::new(spec, &slot_key).encrypt_material(&mut split);

    let mut area = vec![0u8; h.payload_offset as usize];
    let at = slot.key_offset as usize;
    area[at..at + split.len()].copy_from_slice(&split);
    h.slots[0] = slot;
    let header = h.encode()?;
    area[..header.len()].copy_from_slice(&header);
    Ok(area)
}

/// `iterations_per_second * iter_time_ms / 1000 / divisor`, at least
/// 1000, and fitting 32 bits.
fn scaled_iterations(per_second: u64, iter_time_ms: u64, divisor: u64) -> Result<u32, CryptoError> {
    let n = u128::from(per_second) * u128::from(iter_time_ms) / 1000 / u128::from(divisor);
    u32::try_from(n.max(u128::from(MIN_ITERATIONS)))
        .map_err(|_| CryptoError::IterTime(iter_time_ms))
}

/// This thread's CPU time.
fn thread_cpu_time() -> Result<std::time::Duration, CryptoError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Err(CryptoError::Clock(std::io::Error::last_os_error()));
    }
    Ok(std::time::Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    ))
}

/// PBKDF2 iterations per second of this thread's CPU time for these
/// inputs, measured over runs of a quarter of `iter_time_ms` (5 to 500 ms).
/// QEMU measures until a run takes over 500 ms on a millisecond clock
/// (and fails when a run reads 0 ms); qblk measures on the nanosecond
/// clock over a window scaled to the time asked for, so a short iter-time
/// gives a fast create.
fn pbkdf2_per_second(
    hash: LuksHash,
    password: &[u8],
    salt: &[u8],
    out_len: usize,
    iter_time_ms: u64,
) -> Result<u64, CryptoError> {
    let window = std::time::Duration::from_millis((iter_time_ms / 4).clamp(5, 500));
    let mut out = vec![0u8; out_len];
    let mut iterations: u64 = 1 << 8;
    loop {
        let start = thread_cpu_time()?;
        pbkdf2(hash, password, salt, iterations as u32, &mut out);
        let spent = thread_cpu_time()?.saturating_sub(start);
        let per_second = (u128::from(iterations) * 1_000_000_000 / spent.as_nanos().max(1)) as u64;
        if spent >= window || iterations >= u64::from(u32::MAX / 16) {
            return Ok(per_second);
        }
        // Aim a little past the window, growing at most 16 times a round.
        let aim = u128::from(per_second) * window.as_nanos() * 5 / 4 / 1_000_000_000;
        let next = u64::try_from(aim).unwrap_or(u64::MAX).max(iterations * 2);
        iterations = next.min(iterations * 16).min(u64::from(u32::MAX / 16));
    }
}

/// A random (version 4) UUID in its lowercase text form.
fn uuid_v4(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The anti-forensic split of LUKS1, given stripes 0..n-1 (random) in
/// `split`: fills the last stripe so that [`af_merge`] gives `key`.
fn af_split_last(hash: LuksHash, key: &[u8], split: &mut [u8], stripes: usize) {
    let key_len = key.len();
    let acc = af_fold(hash, &split[..(stripes - 1) * key_len], key_len);
    for ((s, a), k) in split[(stripes - 1) * key_len..]
        .iter_mut()
        .zip(acc.iter())
        .zip(key)
    {
        *s = a ^ k;
    }
}

/// XORs the stripes of `split` together, diffusing the running value
/// after each.
fn af_fold(hash: LuksHash, split: &[u8], key_len: usize) -> Zeroizing<Vec<u8>> {
    let mut acc = Zeroizing::new(vec![0u8; key_len]);
    for stripe in split.chunks_exact(key_len) {
        for (a, b) in acc.iter_mut().zip(stripe) {
            *a ^= b;
        }
        diffuse(hash, &mut acc);
    }
    acc
}

/// The anti-forensic merge of LUKS1: XOR the stripes together, diffusing
/// the running value with the hash after every stripe but the last.
fn af_merge(hash: LuksHash, split: &[u8], key_len: usize, stripes: usize) -> Zeroizing<Vec<u8>> {
    let mut acc = af_fold(hash, &split[..(stripes - 1) * key_len], key_len);
    for (a, b) in acc.iter_mut().zip(&split[(stripes - 1) * key_len..]) {
        *a ^= b;
    }
    acc
}

/// Hashes the buffer block by block, each block prefixed with its
/// big-endian index; a short last block keeps only its length of digest.
fn diffuse(hash: LuksHash, buf: &mut [u8]) {
    let mut d = Zeroizing::new([0u8; 64]);
    for (i, block) in buf.chunks_mut(hash.digest_bytes()).enumerate() {
        digest_into(hash, &[&(i as u32).to_be_bytes(), block], &mut d);
        let n = block.len();
        block.copy_from_slice(&d[..n]);
    }
}

#[cfg(test)]
mod tests;
