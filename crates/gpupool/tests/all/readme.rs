//! The workspace README's usage example is the crate README's, which is the crate's
//! documentation and runs as a doctest; this keeps the untested copy equal to the tested one.

use std::path::Path;

/// The first fenced Rust block of a Markdown text.
fn first_rust_block(markdown: &str) -> Option<String> {
    let start = markdown.find("```rust\n")? + "```rust\n".len();
    let length = markdown[start..].find("```")?;
    Some(markdown[start..start + length].to_owned())
}

#[test]
fn workspace_readme_usage_is_the_crate_readmes() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace_readme = crate_dir.join("../../README.md");
    // A packaged copy of the crate (crates.io) has no workspace around it.
    let Ok(workspace) = std::fs::read_to_string(&workspace_readme) else {
        println!(
            "skipped: no workspace README at {}",
            workspace_readme.display()
        );
        return;
    };
    let own = std::fs::read_to_string(crate_dir.join("README.md")).expect("crate README");
    let tested = first_rust_block(&own).expect("a Rust block in the crate README");
    assert_eq!(
        first_rust_block(&workspace).as_deref(),
        Some(tested.as_str()),
        "README.md's usage example differs from crates/gpupool/README.md's (the doctest)"
    );
}
