//! The layering of `src/`, enforced by reading the source (no build, no
//! host): every top-level module sits on one row of [`LAYERS`], imports run
//! only to rows below, the leaves never reach up into the VMs, the API,
//! migration or the client, and no two top-level modules import each other
//! in a circle. The README's Layout section draws the same rows; this test
//! checks that too, so the picture a newcomer reads is the one enforced.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules of `src/`, top row first, as README's Layout
/// section lists them. `main` is `src/main.rs` (the `vmlet` binary, which
/// names the library `vmlet::`), `lib` is `src/lib.rs` (`error_chain`). A
/// module imports only modules on rows below its own: modules on one row
/// import nothing of each other (the leaves `qemu`, `net` and `storage`
/// share what they must through `spec` and `persist`).
const LAYERS: &[&[&str]] = &[
    &["main"],
    &["cli"],
    &["daemon"],
    &["api"],
    &["migration"],
    &["client"],
    &["vm"],
    &["node"],
    &["config"],
    &["qemu", "net", "storage"],
    &["confine", "console", "metrics"],
    &["spec", "persist", "lib"],
];

/// Modules that hold the host work and the vocabulary: none of them may
/// know the VMs, the API, migration flows or the HTTP client.
const LOWER: &[&str] = &["qemu", "net", "storage", "spec", "persist"];
const UPPER: &[&str] = &["vm", "api", "migration", "client"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The top-level modules: `src/NAME.rs` and `src/NAME/` (with `main` and
/// `lib` for the two crate roots).
fn top_level_modules() -> BTreeSet<String> {
    std::fs::read_dir(src())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            if p.is_dir() {
                Some(p.file_name()?.to_str()?.to_string())
            } else if p.extension().is_some_and(|e| e == "rs") {
                let stem = p.file_stem()?.to_str()?;
                // A sibling file of unit tests belongs to its module.
                (!stem.ends_with("_tests")).then(|| stem.to_string())
            } else {
                None
            }
        })
        .collect()
}

/// The module path of the file at `rel` (relative to `src/`): `qemu/qmp/mod.rs`
/// is `[qemu, qmp]`, `vm/error.rs` `[vm, error]`. A file `x_tests.rs` (put
/// in by `#[path]`) is `x`'s `tests` module.
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().expect("a file name");
    let stem = file.trim_end_matches(".rs");
    match stem {
        "mod" => {}
        // The crate roots: `crate::` from them is the crate itself.
        "lib" | "main" if parts.is_empty() => {}
        _ => match stem.strip_suffix("_tests") {
            Some(owner) => {
                parts.push(owner.to_string());
                parts.push("tests".into());
            }
            None => parts.push(stem.to_string()),
        },
    }
    parts
}

/// `text` without its plain `//` comments (doc comments stay: a doc link
/// names an item as much as a `use` does) and without string literals'
/// contents, so prose never counts as an import.
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut kept = String::new();
        let mut chars = line.chars().peekable();
        let mut in_string = false;
        while let Some(c) = chars.next() {
            if in_string {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => {
                        in_string = false;
                        kept.push('"');
                    }
                    _ => {}
                }
                continue;
            }
            if c == '"' {
                in_string = true;
                kept.push('"');
                continue;
            }
            if c == '/' && chars.peek() == Some(&'/') {
                let rest: String = chars.clone().collect();
                let doc = rest.starts_with("//") || rest.starts_with("/!");
                if doc {
                    kept.push(c);
                    kept.extend(chars.by_ref());
                }
                break;
            }
            kept.push(c);
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The first identifier of every path rooted at `root::` in `code`:
/// `crate::vm::X` gives `vm`; `crate::{a::b, c}` gives `a` and `c`.
fn rooted_names(code: &str, root: &str) -> Vec<String> {
    let mut names = Vec::new();
    let needle = format!("{root}::");
    let mut from = 0;
    while let Some(at) = code[from..].find(&needle) {
        let start = from + at;
        from = start + needle.len();
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| is_ident_char(c) || c == '$' || c == ':') {
            continue;
        }
        let rest = &code[from..];
        if let Some(group) = rest.strip_prefix('{') {
            // A group: the first name of each item at depth 0.
            let mut depth = 0;
            let mut item_start = true;
            let mut ident = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        item_start = true;
                        continue;
                    }
                    _ => {}
                }
                if item_start && depth == 0 {
                    if is_ident_char(c) {
                        ident.push(c);
                        continue;
                    }
                    if !ident.is_empty() {
                        names.push(std::mem::take(&mut ident));
                        item_start = false;
                    } else if !c.is_whitespace() {
                        item_start = false;
                    }
                }
            }
            if !ident.is_empty() {
                names.push(ident);
            }
        } else {
            let ident: String = rest.chars().take_while(|c| is_ident_char(*c)).collect();
            if !ident.is_empty() {
                names.push(ident);
            }
        }
    }
    names
}

/// The top-level modules `code` (of the library module at `path`, or of
/// the binary) refers to: through `crate::` and through enough `super::`
/// to reach the crate root, or, from the binary (`main.rs` and its test
/// module), through `vmlet::`. A name that is no top-level module is an
/// item of `lib.rs`.
fn imports_of(
    code: &str,
    path: &[String],
    in_binary: bool,
    modules: &BTreeSet<String>,
) -> BTreeSet<String> {
    // The binary's own `crate::`/`super::` name its own items.
    let mut names = rooted_names(code, if in_binary { "vmlet" } else { "crate" });
    // `super::` repeated as often as the module is deep reaches the root.
    if !in_binary && !path.is_empty() {
        let to_root = "super::".repeat(path.len());
        let root = to_root.trim_end_matches("::");
        names.extend(
            rooted_names(code, root)
                .into_iter()
                .filter(|n| n != "super"),
        );
    }
    names
        .into_iter()
        .map(|n| {
            if modules.contains(&n) {
                n
            } else {
                "lib".to_string()
            }
        })
        .collect()
}

/// Every file (relative to `src/`) with its top-level module and the
/// top-level modules it imports (its own left out).
fn imports() -> Vec<(PathBuf, String, BTreeSet<String>)> {
    let modules = top_level_modules();
    rust_files(&src())
        .into_iter()
        .map(|file| {
            let rel = file.strip_prefix(src()).unwrap().to_path_buf();
            let path = module_path(&rel);
            let first = rel.iter().next().unwrap().to_string_lossy().into_owned();
            let first = first.trim_end_matches(".rs");
            let top = first.strip_suffix("_tests").unwrap_or(first).to_string();
            let text = std::fs::read_to_string(&file).unwrap();
            let mut used = imports_of(&code_of(&text), &path, top == "main", &modules);
            used.remove(&top);
            (rel, top, used)
        })
        .collect()
}

fn row_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|row| row.contains(&module))
}

#[test]
fn every_top_level_module_is_on_exactly_one_row() {
    let listed: Vec<&str> = LAYERS.iter().flat_map(|row| row.iter().copied()).collect();
    let unique: BTreeSet<&str> = listed.iter().copied().collect();
    assert_eq!(
        unique.len(),
        listed.len(),
        "a module is on two rows: {listed:?}"
    );
    let modules = top_level_modules();
    let listed: BTreeSet<String> = unique.iter().map(|m| m.to_string()).collect();
    assert_eq!(
        modules, listed,
        "the top-level modules of src/ and the rows of LAYERS differ: add the new module to a row (here and in README's Layout)"
    );
}

#[test]
fn imports_run_only_down_the_layers() {
    let mut wrong = Vec::new();
    for (file, top, used) in imports() {
        let from = row_of(&top).unwrap_or_else(|| panic!("{top} is on no row"));
        for module in used {
            let to = row_of(&module).unwrap_or_else(|| panic!("{module} is on no row"));
            if to <= from {
                wrong.push(format!(
                    "src/{} ({top}, row {from}) imports {module} (row {to})",
                    file.display()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_leaves_and_the_vocabulary_never_reach_up() {
    let mut wrong = Vec::new();
    for (file, top, used) in imports() {
        if !LOWER.contains(&top.as_str()) {
            continue;
        }
        for module in used.iter().filter(|m| UPPER.contains(&m.as_str())) {
            wrong.push(format!("src/{} imports crate::{module}", file.display()));
        }
        for module in used
            .iter()
            .filter(|m| ["qemu", "net", "storage"].contains(&m.as_str()))
        {
            wrong.push(format!(
                "src/{} ({top}) imports the leaf {module}",
                file.display()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (_, top, used) in imports() {
        graph.entry(top).or_default().extend(used);
    }
    // Depth-first search; a module met again on the current path closes
    // a cycle, which is reported whole.
    fn visit(
        module: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| m == module) {
            let mut cycle = path[at..].to_vec();
            cycle.push(module.to_string());
            return Some(cycle);
        }
        if !done.insert(module.to_string()) {
            return None;
        }
        path.push(module.to_string());
        for next in graph.get(module).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        if let Some(cycle) = visit(module, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" → "));
        }
    }
}

/// The rows of the first block under README's `## Layout`: each line's
/// leading `name/` and `name.rs` entries.
fn readme_rows() -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## Layout\n")
        .nth(1)
        .expect("README has a ## Layout section");
    let block = section
        .split("```")
        .nth(1)
        .expect("the Layout section starts with a block of rows");
    block
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            line.split_whitespace()
                .map(|w| w.trim_end_matches(','))
                .take_while(|w| w.ends_with('/') || w.ends_with(".rs"))
                .map(|w| w.trim_end_matches('/').trim_end_matches(".rs").to_string())
                .collect()
        })
        .collect()
}

#[test]
fn the_readme_draws_the_same_rows() {
    let rows: Vec<Vec<String>> = LAYERS
        .iter()
        .map(|row| row.iter().map(|m| m.to_string()).collect())
        .collect();
    assert_eq!(
        readme_rows(),
        rows,
        "README's Layout rows differ from the layers enforced here"
    );
}

#[test]
fn the_reader_finds_every_form_of_import() {
    let modules: BTreeSet<String> = ["vm", "api", "qemu", "spec"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let code = code_of(
        r#"
use crate::vm::Vm;
use crate::{api::{error, x}, spec};
let s = "crate::qemu is only words";
// crate::qemu in a plain comment is prose
/// [`crate::error_chain`] in a doc link is a reference
fn f() { super::super::qemu::argv(); $crate::nothing(); my_crate::vm2(); }
"#,
    );
    let path = vec!["net".to_string(), "tap".to_string()];
    let found = imports_of(&code, &path, false, &modules);
    let expected: BTreeSet<String> = ["vm", "api", "spec", "lib", "qemu"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, expected);
    // One `super::` from a file of a top-level module stays inside it.
    let found = imports_of(
        "use super::qemu::x;",
        &["net".into(), "tap".into()],
        false,
        &modules,
    );
    assert!(found.is_empty(), "{found:?}");
    // The binary names the library `vmlet::`; its `crate::` is its own.
    let found = imports_of(
        "use vmlet::qemu::x; use crate::helper; super::run();",
        &["main".into(), "tests".into()],
        true,
        &modules,
    );
    assert_eq!(found, BTreeSet::from(["qemu".to_string()]));
    assert_eq!(
        module_path(Path::new("qemu/argv_tests.rs")),
        vec!["qemu", "argv", "tests"]
    );
    assert_eq!(
        module_path(Path::new("qemu/qmp/mod.rs")),
        vec!["qemu", "qmp"]
    );
    assert!(module_path(Path::new("main.rs")).is_empty());
}
