//! Exports `getrandom` from the test binaries' dynamic symbol tables, so that code
//! finding it with `dlsym` (std's HashMap keys, getrandom 0.3) reaches the definition in
//! `tests/layer2_bytes.rs` (its byte-determinism test); in the binaries that define no
//! `getrandom`, the flag exports nothing.

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo::rustc-link-arg-tests=-Wl,--export-dynamic-symbol=getrandom");
    }
}
