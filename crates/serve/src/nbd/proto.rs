//! The NBD protocol's wire format (NetworkBlockDevice `doc/proto.md`):
//! constants, parsing of what a client sends, encoding of what the
//! server answers. Pure: no I/O, no panics on any input (fuzzed by
//! `fuzz/fuzz_targets/nbd.rs`).

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle greeting's second magic, and every option's.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information types (`NBD_OPT_INFO`/`NBD_OPT_GO`).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_RESIZE: u16 = 8;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// Error values.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME` flag.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The base allocation context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The prefix of QEMU's dirty bitmap contexts.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// The longest option payload accepted (a request and names).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// The longest string the protocol allows.
pub const MAX_STRING: usize = 4096;
/// The largest read (and payload) a client may ask for.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// The length of a request header.
pub const REQUEST_LEN: usize = 28;
/// The length of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// The server's first message: fixed newstyle, no zeroes.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// What is wrong with what a client sent; the connection cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    Magic(u64),
    #[error("client flags {0:#x} lack fixed newstyle or have unknown bits")]
    ClientFlags(u32),
    #[error("option payload of {0} bytes is too long")]
    TooLong(u32),
    #[error("short message")]
    Short,
}

/// The client's flags (after the greeting).
pub fn parse_client_flags(b: [u8; 4]) -> Result<u32, ProtoError> {
    let f = u32::from_be_bytes(b);
    if f & FLAG_C_FIXED_NEWSTYLE == 0 || f & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::ClientFlags(f));
    }
    Ok(f)
}

/// An option's header: which option and how many payload bytes follow.
pub fn parse_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<(u32, u32), ProtoError> {
    let magic = be64(b, 0).ok_or(ProtoError::Short)?;
    if magic != IHAVEOPT {
        return Err(ProtoError::Magic(magic));
    }
    let opt = be32(b, 8).ok_or(ProtoError::Short)?;
    let len = be32(b, 12).ok_or(ProtoError::Short)?;
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::TooLong(len));
    }
    Ok((opt, len))
}

/// A meta context request: the export and the queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// An option, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opt {
    ExportName(String),
    Abort,
    List,
    /// `NBD_OPT_INFO` (`go` false) or `NBD_OPT_GO`.
    Info {
        go: bool,
        name: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    ListMeta(MetaRequest),
    SetMeta(MetaRequest),
    StartTls,
    Unknown(u32),
}

/// What a server in TLS-required mode does with option `opt` before the
/// TLS handshake (proto.md "TLS support"; QEMU's only mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeforeTls {
    /// `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT`: handled as usual.
    Handle,
    /// Any other option: `NBD_REP_ERR_TLS_REQD`, its data unread.
    RefuseTlsRequired,
    /// `NBD_OPT_EXPORT_NAME`, which has no error reply: the server hangs up.
    HangUp,
}

pub fn before_tls(opt: u32) -> BeforeTls {
    match opt {
        OPT_STARTTLS | OPT_ABORT => BeforeTls::Handle,
        OPT_EXPORT_NAME => BeforeTls::HangUp,
        _ => BeforeTls::RefuseTlsRequired,
    }
}

/// Parses option `opt`'s payload; the error is the message of an
/// `NBD_REP_ERR_INVALID` reply (the connection goes on).
pub fn parse_option(opt: u32, data: &[u8]) -> Result<Opt, String> {
    let empty = |o: Opt| {
        if data.is_empty() {
            Ok(o)
        } else {
            Err("this option takes no data".to_string())
        }
    };
    match opt {
        OPT_EXPORT_NAME => Ok(Opt::ExportName(string(data)?)),
        OPT_ABORT => Ok(Opt::Abort),
        OPT_LIST => empty(Opt::List),
        OPT_STRUCTURED_REPLY => empty(Opt::StructuredReply),
        OPT_STARTTLS => empty(Opt::StartTls),
        OPT_INFO | OPT_GO => {
            let mut r = Reader(data);
            let name = r.string32()?;
            let n = r.u16()?;
            let mut requests = Vec::with_capacity(usize::from(n).min(data.len() / 2));
            for _ in 0..n {
                requests.push(r.u16()?);
            }
            r.end()?;
            Ok(Opt::Info {
                go: opt == OPT_GO,
                name,
                requests,
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let mut r = Reader(data);
            let export = r.string32()?;
            let n = r.u32()?;
            let mut queries = Vec::with_capacity((n as usize).min(data.len() / 4));
            for _ in 0..n {
                queries.push(r.string32()?);
            }
            r.end()?;
            let m = MetaRequest { export, queries };
            Ok(if opt == OPT_SET_META_CONTEXT {
                Opt::SetMeta(m)
            } else {
                Opt::ListMeta(m)
            })
        }
        other => Ok(Opt::Unknown(other)),
    }
}

/// A transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// How many payload bytes follow the header (writes only).
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// Parses a request header.
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    let magic = be32(b, 0).ok_or(ProtoError::Short)?;
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::Magic(u64::from(magic)));
    }
    Ok(Request {
        flags: be16(b, 4).ok_or(ProtoError::Short)?,
        kind: be16(b, 6).ok_or(ProtoError::Short)?,
        cookie: be64(b, 8).ok_or(ProtoError::Short)?,
        offset: be64(b, 16).ok_or(ProtoError::Short)?,
        length: be32(b, 24).ok_or(ProtoError::Short)?,
    })
}

/// An option reply.
pub fn option_reply(opt: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// `NBD_INFO_EXPORT`'s data.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE`'s data.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    for v in [min, preferred, max] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b
}

/// `NBD_INFO_NAME`'s data.
pub fn info_name(name: &str) -> Vec<u8> {
    let mut b = INFO_NAME.to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

/// `NBD_REP_SERVER`'s data: an export's name.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

/// `NBD_REP_META_CONTEXT`'s data.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

/// A simple reply's header.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk's header, for `len` bytes of payload.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// A whole `NBD_REPLY_TYPE_ERROR` chunk (the last one).
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    let mut b = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        (6 + msg.len()) as u32,
    )
    .to_vec();
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// A whole `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: `extents` are (length,
/// flags).
pub fn block_status_chunk(
    cookie: u64,
    done: bool,
    context: u32,
    extents: &[(u32, u32)],
) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut b = chunk_header(flags, REPLY_TYPE_BLOCK_STATUS, cookie, len as u32).to_vec();
    b.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        b.extend_from_slice(&l.to_be_bytes());
        b.extend_from_slice(&f.to_be_bytes());
    }
    b
}

/// Which meta contexts a query names among `available` (QEMU's rules:
/// an exact name, or with LIST a namespace prefix: `base:`, `qemu:`,
/// `qemu:dirty-bitmap:`; an empty query list lists everything).
pub fn matching<'a>(query: &str, available: &'a [String], list: bool) -> Vec<&'a String> {
    available
        .iter()
        .filter(|c| {
            c.as_str() == query
                || (list
                    && (query == "base:" && c.starts_with("base:")
                        || query == "qemu:" && c.starts_with("qemu:")
                        || query == DIRTY_BITMAP_PREFIX && c.starts_with(DIRTY_BITMAP_PREFIX)))
        })
        .collect()
}

fn string(b: &[u8]) -> Result<String, String> {
    if b.len() > MAX_STRING {
        return Err(format!("a string of {} bytes is too long", b.len()));
    }
    let s = std::str::from_utf8(b).map_err(|_| "a string is not UTF-8".to_string())?;
    if s.contains('\0') {
        return Err("a string contains NUL".into());
    }
    Ok(s.to_owned())
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Reads an option's payload front to back.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err("the option's data is shorter than its fields say".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, String> {
        be16(self.take(2)?, 0).ok_or_else(|| "short".to_string())
    }

    fn u32(&mut self) -> Result<u32, String> {
        be32(self.take(4)?, 0).ok_or_else(|| "short".to_string())
    }

    fn string32(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        string(self.take(n)?)
    }

    fn end(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err("the option's data is longer than its fields say".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_parses_and_refuses_truncation() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_option(OPT_GO, &d),
            Ok(Opt::Info {
                go: true,
                name: "abc".into(),
                requests: vec![INFO_BLOCK_SIZE]
            })
        );
        for cut in 0..d.len() {
            assert!(parse_option(OPT_GO, &d[..cut]).is_err());
        }
        d.push(0);
        assert!(parse_option(OPT_GO, &d).is_err());
    }

    #[test]
    fn before_tls_only_starttls_and_abort_pass_and_export_name_hangs_up() {
        for opt in 0..=16 {
            let want = match opt {
                OPT_STARTTLS | OPT_ABORT => BeforeTls::Handle,
                OPT_EXPORT_NAME => BeforeTls::HangUp,
                _ => BeforeTls::RefuseTlsRequired,
            };
            assert_eq!(before_tls(opt), want, "option {opt}");
        }
        assert_eq!(parse_option(OPT_STARTTLS, &[]), Ok(Opt::StartTls));
        assert!(parse_option(OPT_STARTTLS, &[0]).is_err());
    }

    #[test]
    fn meta_request_with_huge_count_is_refused() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option(OPT_SET_META_CONTEXT, &d).is_err());
    }

    #[test]
    fn request_header() {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_READ.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[24..].copy_from_slice(&512u32.to_be_bytes());
        let r = parse_request(&b).unwrap();
        assert_eq!((r.kind, r.cookie, r.length), (CMD_READ, 7, 512));
        b[0] = 0;
        assert!(parse_request(&b).is_err());
    }

    #[test]
    fn list_prefixes() {
        let avail = vec![
            BASE_ALLOCATION.to_string(),
            "qemu:dirty-bitmap:b".to_string(),
        ];
        assert_eq!(matching("qemu:", &avail, true).len(), 1);
        assert_eq!(matching("qemu:", &avail, false).len(), 0);
        assert_eq!(matching("base:allocation", &avail, false).len(), 1);
    }
}
