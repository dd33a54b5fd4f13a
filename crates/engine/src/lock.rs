//! Image locks that QEMU's tools and qblk both honour.
//!
//! QEMU's file driver (`block/file-posix.c`) describes what an opener of an
//! image does with it as permissions — consistent read, write, write
//! unchanged, resize — and which of them it lets others have. Both are
//! written into the file as one-byte OFD read locks: byte 100 + i for each
//! permission bit i the opener holds, byte 200 + i for each bit it does not
//! share. A newcomer first takes its own bytes, then tests (with a probing
//! write lock, `F_OFD_GETLK`) byte 200 + i for every permission it wants
//! (does anyone refuse to share it?) and byte 100 + i for every permission
//! it refuses to share (does anyone hold it?). OFD locks belong to the open
//! file description, so they go away with the descriptor, also when the
//! process is killed; and two openers in one process conflict as two
//! processes do.
//!
//! The sets are QEMU's (7.2 and 10 alike: four permission bits since 7.0):
//! a writable qcow2 image holds consistent read, write and resize and
//! shares only consistent read and write unchanged ([`Access::WRITER`]);
//! a reader holds consistent read and shares the same ([`Access::READER`]),
//! so readers coexist and no reader and writer ever do. `qemu-img info`
//! reads metadata only ([`Access::METADATA`]). `-U` (force share) shares
//! everything, so it conflicts with nobody and can only be asked for
//! read-only.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Permission bits, QEMU's `BLK_PERM_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms(u8);

impl Perms {
    pub const NONE: Perms = Perms(0);
    pub const CONSISTENT_READ: Perms = Perms(0x01);
    pub const WRITE: Perms = Perms(0x02);
    pub const WRITE_UNCHANGED: Perms = Perms(0x04);
    pub const RESIZE: Perms = Perms(0x08);
    pub const ALL: Perms = Perms(0x0f);

    pub const fn or(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    fn has(self, bit: u32) -> bool {
        self.0 & (1 << bit) != 0
    }
}

/// The names QEMU prints for the permission bits, by bit index.
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// What an opener holds and what it lets others hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub perm: Perms,
    pub shared: Perms,
}

impl Access {
    /// A qcow2 image opened for writing (qemu-img's writers, qemu-io,
    /// qemu-storage-daemon with a read-write node).
    pub const WRITER: Access = Access {
        perm: Perms::CONSISTENT_READ.or(Perms::WRITE).or(Perms::RESIZE),
        shared: Perms::CONSISTENT_READ.or(Perms::WRITE_UNCHANGED),
    };
    /// An image opened for reading (a backing file, qemu-img map/check,
    /// a read-only export).
    pub const READER: Access = Access {
        perm: Perms::CONSISTENT_READ,
        shared: Perms::CONSISTENT_READ.or(Perms::WRITE_UNCHANGED),
    };
    /// The header and tables only (qemu-img info).
    pub const METADATA: Access = Access {
        perm: Perms::NONE,
        shared: Perms::CONSISTENT_READ.or(Perms::WRITE_UNCHANGED),
    };
    /// An external data file written through its image: no metadata of its
    /// own to protect, so others may write (only not resize).
    pub const DATA_WRITER: Access = Access {
        perm: Perms::CONSISTENT_READ.or(Perms::WRITE).or(Perms::RESIZE),
        shared: Perms::CONSISTENT_READ
            .or(Perms::WRITE)
            .or(Perms::WRITE_UNCHANGED),
    };
    /// An external data file read through its image.
    pub const DATA_READER: Access = Access {
        perm: Perms::CONSISTENT_READ,
        shared: Perms::CONSISTENT_READ
            .or(Perms::WRITE)
            .or(Perms::WRITE_UNCHANGED),
    };

    /// The same, sharing everything when `force` (`-U`, `--force-share`).
    pub const fn force_share(self, force: bool) -> Access {
        if !force {
            return self;
        }
        Access {
            perm: self.perm,
            shared: Perms::ALL,
        }
    }

    /// Whether this opener writes (force share is refused for those).
    pub fn writes(self) -> bool {
        self.perm.has(1)
    }
}

/// Another opener holds what this one needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Failed to get {}\"{perm}\" lock; is another process using the image?", if *.shared { "shared " } else { "" })]
pub struct Conflict {
    /// The permission in question, in QEMU's words ("write", "resize"…).
    pub perm: &'static str,
    /// Someone holds a permission this opener refuses to share (QEMU's
    /// "shared" lock), rather than refusing one this opener wants.
    pub shared: bool,
}

/// Why locking failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error("cannot lock byte {byte}")]
    Io {
        byte: i64,
        #[source]
        source: io::Error,
    },
}

fn flock(kind: i32, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

/// Takes a one-byte OFD read lock.
fn set(fd: i32, byte: i64, kind: i32) -> io::Result<()> {
    let fl = flock(kind, byte);
    // SAFETY: fcntl with F_OFD_SETLK reads a valid flock structure.
    let rc = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether any other open file description holds a lock on `byte`.
fn taken(fd: i32, byte: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: fcntl with F_OFD_GETLK reads and writes a valid flock.
    let rc = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

/// Locks `file` for `access` as QEMU does: take this opener's bytes, then
/// test for conflicts (see the module documentation). The locks last as
/// long as the file's descriptor. On a conflict, this opener's bytes are
/// let go again.
pub fn lock(file: &impl AsRawFd, access: Access) -> Result<(), LockError> {
    let fd = file.as_raw_fd();
    let bytes = (0..4u32).flat_map(|i| {
        let perm = access.perm.has(i).then_some(PERM_BASE + i64::from(i));
        let unshared = (!access.shared.has(i)).then_some(SHARED_BASE + i64::from(i));
        perm.into_iter().chain(unshared)
    });
    for byte in bytes.clone() {
        set(fd, byte, libc::F_RDLCK).map_err(|source| LockError::Io { byte, source })?;
    }
    let check = || -> Result<(), LockError> {
        let test = |byte: i64| taken(fd, byte).map_err(|source| LockError::Io { byte, source });
        for i in 0..4u32 {
            if access.perm.has(i) && test(SHARED_BASE + i64::from(i))? {
                return Err(Conflict {
                    perm: NAMES[i as usize],
                    shared: false,
                }
                .into());
            }
        }
        for i in 0..4u32 {
            if !access.shared.has(i) && test(PERM_BASE + i64::from(i))? {
                return Err(Conflict {
                    perm: NAMES[i as usize],
                    shared: true,
                }
                .into());
            }
        }
        Ok(())
    };
    // A conflict is looked at again for a moment before it is reported:
    // a descriptor this process has just closed can hold its locks a
    // little longer, while an io_uring worker that finished an fdatasync
    // on it has not yet let go of the file (the completion is posted
    // first). A holder that stays is reported as before.
    let mut r = check();
    for _ in 0..CONFLICT_RECHECKS {
        if !matches!(r, Err(LockError::Conflict(_))) {
            break;
        }
        std::thread::sleep(CONFLICT_RECHECK_EVERY);
        r = check();
    }
    if r.is_err() {
        for byte in bytes {
            let _ = set(fd, byte, libc::F_UNLCK);
        }
    }
    r
}

/// Lets go of every lock byte this opener holds on `file`, at once rather
/// than when its descriptor closes: a daemon handing its image over to
/// another (`blockdev-set-active`) must not depend on when the last
/// reference to the descriptor goes.
pub fn unlock(file: &impl AsRawFd) -> io::Result<()> {
    let fl = libc::flock {
        l_type: libc::F_UNLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: PERM_BASE,
        l_len: SHARED_BASE + 8 - PERM_BASE,
        l_pid: 0,
    };
    // SAFETY: fcntl with F_OFD_SETLK reads a valid flock structure.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How long (in steps) a conflict is re-checked before it is reported.
const CONFLICT_RECHECKS: u32 = 25;
const CONFLICT_RECHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// Locks `file` (named `path` in errors) for `access`, as an engine error.
pub(crate) fn lock_image(
    file: &impl AsRawFd,
    path: &Path,
    access: Access,
) -> crate::error::Result<()> {
    lock(file, access).map_err(|e| match e {
        LockError::Conflict(conflict) => crate::error::Error::Locked {
            path: path.to_owned(),
            conflict,
        },
        LockError::Io { byte, source } => crate::error::Error::Io {
            path: path.to_owned(),
            op: "lock",
            offset: Some(byte as u64),
            source,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn readers_share_and_a_writer_excludes_everyone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let (r1, r2, w, m) = (open(&p), open(&p), open(&p), open(&p));
        lock(&r1, Access::READER).unwrap();
        lock(&r2, Access::READER).unwrap();
        assert_eq!(
            lock(&w, Access::WRITER).unwrap_err().to_string(),
            "Failed to get \"write\" lock; is another process using the image?"
        );
        // Metadata readers coexist with readers.
        lock(&m, Access::METADATA).unwrap();
        drop((r1, r2, m));
        // The failed writer let its bytes go: a reader fits in meanwhile.
        let r3 = open(&p);
        lock(&r3, Access::READER).unwrap();
        drop(r3);
        lock(&w, Access::WRITER).unwrap();
        let r = open(&p);
        match lock(&r, Access::READER) {
            Err(LockError::Conflict(c)) => assert_eq!(
                c,
                Conflict {
                    perm: "write",
                    shared: true
                }
            ),
            other => panic!("{other:?}"),
        }
        let w2 = open(&p);
        assert!(matches!(
            lock(&w2, Access::WRITER),
            Err(LockError::Conflict(_))
        ));
        // Force share conflicts with nobody.
        lock(&r, Access::READER.force_share(true)).unwrap();
        let nothing = open(&p);
        lock(&nothing, Access::METADATA.force_share(true)).unwrap();
    }

    #[test]
    fn data_files_may_be_written_by_others_but_resized_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let (a, b) = (open(&p), open(&p));
        lock(&a, Access::DATA_WRITER).unwrap();
        match lock(&b, Access::DATA_WRITER) {
            Err(LockError::Conflict(c)) => assert_eq!(c.perm, "resize"),
            other => panic!("{other:?}"),
        }
        // A reader does not share resizing either.
        assert!(matches!(
            lock(&b, Access::DATA_READER),
            Err(LockError::Conflict(Conflict {
                perm: "resize",
                shared: true
            }))
        ));
        // Someone writing the raw file as it is (qemu-io -f raw) may.
        let raw_writer = Access {
            perm: Perms::CONSISTENT_READ.or(Perms::WRITE),
            shared: Perms::ALL,
        };
        lock(&b, raw_writer).unwrap();
    }
}
