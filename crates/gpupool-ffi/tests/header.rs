//! `include/gpupool.h` is what cbindgen makes of the crate now: the test regenerates it with the
//! cbindgen library and fails if the committed file differs. `GPUPOOL_BLESS=1` writes it instead.

use std::path::Path;

#[test]
fn the_committed_header_is_current() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen generates the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let header = crate_dir.join("include/gpupool.h");
    if std::env::var_os("GPUPOOL_BLESS").is_some() {
        std::fs::write(&header, &generated).expect("include/gpupool.h is writable");
        println!("wrote {}", header.display());
        return;
    }
    let committed = std::fs::read(&header).unwrap_or_default();
    assert!(
        committed == generated,
        "include/gpupool.h is out of date; regenerate it with\n    \
         GPUPOOL_BLESS=1 cargo test -p gpupool-ffi --test header\n\
         generated:\n{}",
        String::from_utf8_lossy(&generated)
    );
}
