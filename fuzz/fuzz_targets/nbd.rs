//! The NBD wire parser (`qblk_serve::nbd::proto`) on arbitrary bytes: a
//! client's stream cut into what the server reads — client flags, option
//! headers and payloads, request headers. Nothing may panic, and what
//! the parsers accept must hold what the server relies on (option
//! payloads within their bound, strings within the protocol's limit).
#![no_main]

use qblk_serve::nbd::proto::{self, Opt};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    if let Some((f, r)) = rest.split_first_chunk::<4>() {
        let _ = proto::parse_client_flags(*f);
        rest = r;
    }
    while let Some((h, r)) = rest.split_first_chunk::<{ proto::OPTION_HEADER_LEN }>() {
        rest = r;
        let Ok((opt, len)) = proto::parse_option_header(h) else {
            break;
        };
        assert!(len <= proto::MAX_OPTION_LEN);
        let _ = proto::before_tls(opt);
        let n = (len as usize).min(rest.len());
        let (payload, r) = rest.split_at(n);
        rest = r;
        match proto::parse_option(opt, payload) {
            Ok(Opt::Info { name, .. }) | Ok(Opt::ExportName(name)) => {
                assert!(name.len() <= proto::MAX_STRING)
            }
            Ok(Opt::ListMeta(m)) | Ok(Opt::SetMeta(m)) => {
                assert!(m.export.len() <= proto::MAX_STRING);
                assert!(m.queries.iter().all(|q| q.len() <= proto::MAX_STRING));
                let available = vec![
                    proto::BASE_ALLOCATION.to_string(),
                    format!("{}b", proto::DIRTY_BITMAP_PREFIX),
                ];
                for q in &m.queries {
                    let _ = proto::matching(q, &available, true);
                }
            }
            _ => {}
        }
    }
    while let Some((h, r)) = rest.split_first_chunk::<{ proto::REQUEST_LEN }>() {
        rest = r;
        if let Ok(req) = proto::parse_request(h) {
            let _ = req.payload_len();
            let _ = proto::error_chunk(req.cookie, proto::EINVAL, "x");
        }
    }
});
