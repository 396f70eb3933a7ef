//! The library's layers, checked from its source: a module imports only from its own layer and
//! the layers below it (docs/design.md), so the bottom never depends on the top and no import
//! circle can form between layers. (`devscripts/module_graph.py` prints the whole graph.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top-level modules of `crates/gpupool/src` by layer, bottom first.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "vocabulary",
        &[
            "kind",
            "error",
            "size_class",
            "config",
            "stats",
            "latency",
            "sync",
        ],
    ),
    ("backends", &["backend"]),
    ("pools", &["pools"]),
    ("routing", &["pool_manager"]),
    ("front door", &["front"]),
    ("observation", &["observe"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source folder") {
        let path = entry.expect("a folder entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a source text names through `crate::` paths (comments skipped).
fn imported_modules(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c}`: every first segment inside the braces.
                let inside = group.split('}').next().unwrap_or("");
                for item in inside.split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        found.insert(name);
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
    }
    found
}

#[test]
#[cfg_attr(
    miri,
    ignore = "reads the crate's sources from disk, which Miri's isolation forbids; no unsafe code to check"
)]
fn no_module_imports_from_a_layer_above_its_own() {
    let source_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&source_root, &mut files);
    assert!(files.len() > 20, "found the library's source");
    let mut violations = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&source_root).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
        if module == "lib" {
            continue; // the crate root declares and re-exports every layer
        }
        let own = layer_of(&module)
            .unwrap_or_else(|| panic!("module `{module}` is in no layer: add it to LAYERS"));
        let source = std::fs::read_to_string(file).unwrap();
        for imported in imported_modules(&source) {
            if imported == module {
                continue;
            }
            let Some(layer) = layer_of(&imported) else {
                continue; // a re-export of the crate root, e.g. `crate::PoolError`
            };
            if layer > own {
                violations.push(format!(
                    "{} ({}) imports `{imported}` ({})",
                    relative.display(),
                    LAYERS[own].0,
                    LAYERS[layer].0
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports from a higher layer:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_import_scanner_sees_plain_and_grouped_paths() {
    let found = imported_modules(
        "use crate::pools::record::X;\nuse crate::{kind::StreamId, error};\n// crate::front\n",
    );
    let expected: BTreeSet<String> = ["pools", "kind", "error"].map(String::from).into();
    assert_eq!(found, expected);
}
