//! Examples of using qblk's crates from other programs; see the
//! `[[example]]` targets (`cargo run -p qblk-examples --example NAME`).
