//! Arbitrary bytes as the start of an image file: header, extensions, and
//! the L1, refcount, snapshot and bitmap tables that lie inside the input.
//! The body lives in `qblk_qcow2::fuzz` so unit tests replay the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qblk_qcow2::fuzz::parse_image_prefix(data);
});
