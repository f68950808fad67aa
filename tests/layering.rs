//! The floor rule of docs/architecture.md that a grep can check: every
//! syscall lives in `src/io/`, behind a small safe wrapper, so no code above
//! it (in `src/` or `tools/`) names libc. Tests may.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_code_above_src_io_calls_libc() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let io = root.join("src/io");
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("tools"), &mut files);
    let checked = files.iter().filter(|f| !f.starts_with(&io)).count();
    assert!(checked > 20, "found only {checked} files to check");
    let mut found = Vec::new();
    for f in files.iter().filter(|f| !f.starts_with(&io)) {
        let text = std::fs::read_to_string(f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.contains("libc::") && !code.starts_with("//") {
                found.push(format!(
                    "{}:{}: {}",
                    f.strip_prefix(root).unwrap().display(),
                    i + 1,
                    code
                ));
            }
        }
    }
    assert!(
        found.is_empty(),
        "libc named above src/io/ (give it a safe wrapper in src/io/):\n{}",
        found.join("\n")
    );
}
