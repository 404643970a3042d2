//! No import circles between modules (issue 21, item 4).
//!
//! Dependencies run one way: formats and policy below, the uploader and the daemon above. This
//! test reads `src/**/*.rs` (not `src/bin/`, which are crates of their own), drops comments,
//! string and char literals and every item under `#[cfg(test)]` (unit tests may reach
//! anywhere), and collects each module's references to other modules: `use` trees (groups,
//! `self`, aliases, globs), `crate::…`, `super::…` and `self::…` paths, and `pub use`
//! re-exports followed to the module that defines the name (`crate::nix::StorePath` is a use
//! of `nix::store_path`).
//!
//! A module is a file (`src/x.rs`, `src/x/mod.rs`, `src/x/y.rs`); an inline `mod m { … }`
//! belongs to its file. The graph is checked one level at a time: under each parent (the
//! crate, then each directory), its children are the nodes, each with everything below it,
//! and a reference from inside one child to inside another is an edge. So
//!
//! - a cycle between top-level rooms (`metrics -> upload -> metrics`, or `cache -> upload ->
//!   cache` through any of their files) is a circle, and so is one between the files of a
//!   room (`daemon::server -> daemon::workers -> daemon::server`);
//! - a parent and its own submodules are not: `mod.rs` wires up and re-exports its children,
//!   and a child may use what its parent's `mod.rs` holds.
//!
//! `cargo test --test it structure:: -- --nocapture` prints the edges of every level.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A module path: `["daemon", "server"]`; the crate root is `[]`.
type ModPath = Vec<String>;

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// The source with comments removed and string and char literals emptied (`"…"` becomes
/// `""`), so that neither a doc link nor a message that mentions `crate::x` counts.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(k).copied().unwrap_or('\0');
        if c[i] == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c[i] == 'r' && (at(i + 1) == '"' || at(i + 1) == '#') && (i == 0 || !ident(c[i - 1]) || (c[i - 1] == 'b' && (i < 2 || !ident(c[i - 2])))) {
            // A raw string: r"…", r#"…"#, br##"…"##.
            let mut j = i + 1;
            let mut hashes = 0;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            if at(j) != '"' {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= c.len() {
                    break;
                }
                if c[j] == '"' && (1..=hashes).all(|h| at(j + h) == '#') {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c[i] == '\'' {
            // A char literal ('x', '\n', '\u{1F600}') or a lifetime ('a, 'static).
            if at(i + 1) == '\\' {
                let mut j = i + 3;
                while j < c.len() && c[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
                out.push_str("' '");
            } else if at(i + 2) == '\'' {
                i += 3;
                out.push_str("' '");
            } else {
                out.push('\'');
                i += 1;
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    Path,
    Punct(char),
}

fn tokens(code: &str) -> Vec<Tok> {
    let c: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if c[i].is_alphanumeric() || c[i] == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(c[start..i].iter().collect()));
        } else if c[i] == ':' && c.get(i + 1) == Some(&':') {
            out.push(Tok::Path);
            i += 2;
        } else {
            if !c[i].is_whitespace() {
                out.push(Tok::Punct(c[i]));
            }
            i += 1;
        }
    }
    out
}

fn is(t: Option<&Tok>, s: &str) -> bool {
    matches!(t, Some(Tok::Ident(x)) if x == s)
}

fn punct(t: Option<&Tok>, p: char) -> bool {
    t == Some(&Tok::Punct(p))
}

/// Removes every item under `#[cfg(test)]`: the attribute, any attributes after it, and the
/// item up to its `;` or its closing brace, whichever comes first.
fn drop_cfg_test(toks: Vec<Tok>) -> Vec<Tok> {
    let cfg_test = |t: &[Tok], i: usize| {
        punct(t.get(i), '#')
            && punct(t.get(i + 1), '[')
            && is(t.get(i + 2), "cfg")
            && punct(t.get(i + 3), '(')
            && is(t.get(i + 4), "test")
            && punct(t.get(i + 5), ')')
            && punct(t.get(i + 6), ']')
    };
    let mut out = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        if !cfg_test(&toks, i) {
            out.push(toks[i].clone());
            i += 1;
            continue;
        }
        i += 7;
        // Further attributes on the same item.
        while punct(toks.get(i), '#') && punct(toks.get(i + 1), '[') {
            let mut depth = 0;
            i += 1;
            while i < toks.len() {
                match toks[i] {
                    Tok::Punct('[') => depth += 1,
                    Tok::Punct(']') => depth -= 1,
                    _ => {}
                }
                i += 1;
                if depth == 0 {
                    break;
                }
            }
        }
        let mut depth = 0;
        while i < toks.len() {
            match toks[i] {
                Tok::Punct('{') => depth += 1,
                Tok::Punct('}') => {
                    depth -= 1;
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                Tok::Punct(';') if depth == 0 => {
                    i += 1;
                    break;
                }
                _ => {}
            }
            i += 1;
        }
    }
    out
}

/// One `use` tree from `toks[*i]` on: every leaf path, with the name it binds (`None` for a
/// glob). `prefix` is the path of the enclosing group.
fn use_tree(toks: &[Tok], i: &mut usize, prefix: &[String], out: &mut Vec<(Vec<String>, Option<String>)>) {
    let mut path = prefix.to_vec();
    if toks.get(*i) == Some(&Tok::Path) {
        *i += 1; // `use ::std::…`
    }
    loop {
        match toks.get(*i) {
            Some(Tok::Ident(s)) => {
                path.push(s.clone());
                *i += 1;
            }
            Some(Tok::Punct('*')) => {
                *i += 1;
                out.push((path, None));
                return;
            }
            Some(Tok::Punct('{')) => {
                *i += 1;
                loop {
                    match toks.get(*i) {
                        Some(Tok::Punct('}')) => {
                            *i += 1;
                            return;
                        }
                        Some(Tok::Punct(',')) => *i += 1,
                        None => return,
                        _ => use_tree(toks, i, &path, out),
                    }
                }
            }
            _ => return,
        }
        if toks.get(*i) == Some(&Tok::Path) {
            *i += 1;
            continue;
        }
        // The end of this leaf: `self` stands for the group's own path.
        let mut bound = path.last().cloned();
        if path.last().map(String::as_str) == Some("self") {
            path.pop();
            bound = path.last().cloned();
        }
        if is(toks.get(*i), "as") {
            bound = match toks.get(*i + 1) {
                Some(Tok::Ident(a)) => Some(a.clone()),
                _ => bound,
            };
            *i += 2;
        }
        out.push((path, bound));
        return;
    }
}

/// What one file says: the paths it names and the names it re-exports.
#[derive(Default)]
struct FileRefs {
    /// Paths as written, each with the inline modules it was written in (`mod m { … }`).
    paths: Vec<(Vec<String>, Vec<String>)>,
    /// `pub use` leaves: the bound name, the path, the inline modules around it.
    reexports: Vec<(String, Vec<String>, Vec<String>)>,
}

fn file_refs(src: &str) -> FileRefs {
    let toks = drop_cfg_test(tokens(&strip(src)));
    let mut refs = FileRefs::default();
    // Inline modules: (name, brace depth inside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let here = || inline.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        match &toks[i] {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                if inline.last().map(|(_, d)| *d) == Some(depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Ident(k) if k == "mod" => {
                if let (Some(Tok::Ident(m)), true) = (toks.get(i + 1), punct(toks.get(i + 2), '{')) {
                    depth += 1;
                    inline.push((m.clone(), depth));
                    i += 3;
                    continue;
                }
            }
            Tok::Ident(k) if k == "use" => {
                // `pub use`, `pub(crate) use`, `pub(super) use` re-export.
                let public = is(toks.get(i.wrapping_sub(1)), "pub") || (punct(toks.get(i.wrapping_sub(1)), ')') && is(toks.get(i.wrapping_sub(4)), "pub"));
                let mut j = i + 1;
                let mut leaves = Vec::new();
                use_tree(&toks, &mut j, &[], &mut leaves);
                for (path, bound) in leaves {
                    if let (true, Some(b)) = (public, &bound) {
                        refs.reexports.push((b.clone(), path.clone(), here()));
                    }
                    refs.paths.push((path, here()));
                }
                i = j;
                continue;
            }
            Tok::Ident(k) if (k == "crate" || k == "super" || k == "self") && toks.get(i + 1) == Some(&Tok::Path) => {
                // `pub(in crate::x)` is a visibility, not a use.
                if !is(toks.get(i.wrapping_sub(1)), "in") {
                    let mut path = vec![k.clone()];
                    let mut j = i + 1;
                    while toks.get(j) == Some(&Tok::Path) {
                        match toks.get(j + 1) {
                            Some(Tok::Ident(s)) => path.push(s.clone()),
                            _ => break,
                        }
                        j += 2;
                    }
                    refs.paths.push((path, here()));
                    i = j;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    refs
}

/// One file's edge: the module named, and the path that named it (for the message).
struct Edge {
    to: ModPath,
    via: String,
}

struct Graph {
    /// Every module, with the file that holds it.
    modules: BTreeMap<ModPath, String>,
    /// Each module's references to the modules it names, other than itself.
    edges: BTreeMap<ModPath, Vec<Edge>>,
}

/// The module of a file under `src/`: `daemon/server.rs` is `daemon::server`, `daemon/mod.rs`
/// and `daemon.rs` are `daemon`, `lib.rs` is the crate.
fn module_of(rel: &str) -> ModPath {
    let rel = rel.strip_suffix(".rs").unwrap_or(rel);
    let mut parts: Vec<String> = rel.split('/').map(String::from).collect();
    if parts.last().map(String::as_str) == Some("mod") || parts == ["lib"] {
        parts.pop();
    }
    parts
}

/// `files`: paths relative to `src/` with their text.
fn graph(files: &[(String, String)]) -> Graph {
    let modules: BTreeMap<ModPath, String> = files.iter().map(|(rel, _)| (module_of(rel), format!("src/{rel}"))).collect();
    let refs: BTreeMap<ModPath, FileRefs> = files.iter().map(|(rel, src)| (module_of(rel), file_refs(src))).collect();

    // A path as written in module `at` (inside inline modules `inline`), made absolute:
    // `crate::`, `super::`, `self::`, or a child module's name; `None` for anything else (an
    // external crate, a name in scope).
    let absolute = |at: &ModPath, inline: &[String], path: &[String]| -> Option<Vec<String>> {
        let mut base: Vec<String> = at.iter().chain(inline).cloned().collect();
        let mut rest = path;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                base.clear();
                rest = &rest[1..];
            }
            Some("super") | Some("self") => {
                while let Some(s) = rest.first().map(String::as_str) {
                    match s {
                        "super" => {
                            base.pop()?;
                        }
                        "self" => {}
                        _ => break,
                    }
                    rest = &rest[1..];
                }
            }
            Some(first) => {
                let mut child = at.clone();
                child.push(first.to_string());
                if !inline.is_empty() || !modules.contains_key(&child) {
                    return None;
                }
            }
            None => return None,
        }
        base.extend(rest.iter().cloned());
        Some(base)
    };
    // Re-exports: (module, name) → the absolute path it stands for.
    let mut reexports: BTreeMap<(ModPath, String), Vec<String>> = BTreeMap::new();
    for (m, r) in &refs {
        for (bound, path, inline) in &r.reexports {
            if let (true, Some(abs)) = (inline.is_empty(), absolute(m, inline, path)) {
                reexports.insert((m.clone(), bound.clone()), abs);
            }
        }
    }
    // The module an absolute path lands in: its longest prefix that is a module, following
    // re-exports of the next name.
    let resolve = |mut abs: Vec<String>| -> ModPath {
        for _ in 0..16 {
            let mut m: ModPath = Vec::new();
            while m.len() < abs.len() {
                let mut next = m.clone();
                next.push(abs[m.len()].clone());
                if !modules.contains_key(&next) {
                    break;
                }
                m = next;
            }
            match abs.get(m.len()).and_then(|name| reexports.get(&(m.clone(), name.clone()))) {
                Some(target) => abs = target.iter().chain(&abs[m.len() + 1..]).cloned().collect(),
                None => return m,
            }
        }
        panic!("a cycle of re-exports at {}", abs.join("::"))
    };

    let mut edges: BTreeMap<ModPath, Vec<Edge>> = BTreeMap::new();
    for (m, r) in &refs {
        for (path, inline) in &r.paths {
            let Some(abs) = absolute(m, inline, path) else { continue };
            let to = resolve(abs);
            if &to != m {
                edges.entry(m.clone()).or_default().push(Edge { to, via: path.join("::") });
            }
        }
    }
    Graph { modules, edges }
}

/// The edges between siblings, per parent: `parent → (child → (child → why))`. A reference
/// between a module and one of its own ancestors or descendants is no edge.
fn levels(g: &Graph) -> BTreeMap<ModPath, BTreeMap<String, BTreeMap<String, Vec<String>>>> {
    let mut out: BTreeMap<ModPath, BTreeMap<String, BTreeMap<String, Vec<String>>>> = BTreeMap::new();
    for (from, es) in &g.edges {
        for e in es {
            let k = from.iter().zip(&e.to).take_while(|(a, b)| a == b).count();
            if k == from.len() || k == e.to.len() {
                continue;
            }
            let parent = from[..k].to_vec();
            let why = format!("{} names {}", g.modules[from], e.via);
            out.entry(parent)
                .or_default()
                .entry(name(&from[..=k]))
                .or_default()
                .entry(name(&e.to[..=k]))
                .or_default()
                .push(why);
        }
    }
    out
}

/// Every circle, one per strongly connected set of siblings: "metrics -> upload -> metrics",
/// each step with the file and path that make it.
fn circles(g: &Graph) -> Vec<String> {
    let mut found = Vec::new();
    for (parent, adj) in levels(g) {
        let nodes: BTreeSet<&String> = adj.keys().chain(adj.values().flat_map(|m| m.keys())).collect();
        let reach = |from: &String| -> BTreeSet<String> {
            let mut seen = BTreeSet::new();
            let mut todo = vec![from.clone()];
            while let Some(n) = todo.pop() {
                for next in adj.get(&n).into_iter().flat_map(|m| m.keys()) {
                    if seen.insert(next.clone()) {
                        todo.push(next.clone());
                    }
                }
            }
            seen
        };
        let mut reported: BTreeSet<String> = BTreeSet::new();
        for n in nodes {
            if reported.contains(n) || !reach(n).contains(n) {
                continue;
            }
            // The shortest way back to `n` (breadth first), then the set it belongs to.
            let mut prev: BTreeMap<String, String> = BTreeMap::new();
            let mut last = None;
            let mut queue = std::collections::VecDeque::from([n.clone()]);
            'bfs: while let Some(x) = queue.pop_front() {
                for y in adj.get(&x).into_iter().flat_map(|m| m.keys()) {
                    if y == n {
                        last = Some(x.clone());
                        break 'bfs;
                    }
                    if !prev.contains_key(y) {
                        prev.insert(y.clone(), x.clone());
                        queue.push_back(y.clone());
                    }
                }
            }
            let mut cycle = vec![n.clone()];
            let mut x = last.expect("n reaches itself");
            while &x != n {
                cycle.push(x.clone());
                x = prev[&x].clone();
            }
            cycle.push(n.clone());
            cycle.reverse();
            let mut text = format!("{} (under {})", cycle.join(" -> "), name(&parent));
            for w in cycle.windows(2) {
                for why in &adj[&w[0]][&w[1]] {
                    text.push_str(&format!("\n    {} -> {}: {why}", w[0], w[1]));
                }
            }
            found.push(text);
            let set: BTreeSet<String> = reach(n).into_iter().filter(|m| reach(m).contains(n)).collect();
            reported.extend(set);
        }
    }
    found
}

fn sources(dir: &Path, rel: &str, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        if e.file_type().unwrap().is_dir() {
            if path != "bin" {
                sources(&e.path(), &path, out);
            }
        } else if name.ends_with(".rs") {
            out.push((path, std::fs::read_to_string(e.path()).unwrap()));
        }
    }
}

fn edges_text(g: &Graph) -> String {
    let mut text = String::new();
    for (parent, adj) in levels(g) {
        text.push_str(&format!("under {}:\n", name(&parent)));
        for (from, tos) in adj {
            text.push_str(&format!("  {from} -> {}\n", tos.keys().cloned().collect::<Vec<_>>().join(", ")));
        }
    }
    text
}

#[test]
fn no_import_circles_between_modules() {
    let mut files = Vec::new();
    sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), "", &mut files);
    let g = graph(&files);
    println!("{}", edges_text(&g));
    // The reader sees the crate: without these edges it would pass on anything.
    let edge = |from: &str, to: &str| levels(&g).get(&Vec::new()).and_then(|a| a.get(from)).is_some_and(|t| t.contains_key(to));
    for (from, to) in [("upload", "storage"), ("daemon", "queue"), ("hook", "nix"), ("upload", "metrics")] {
        assert!(edge(from, to), "the reader lost the edge {from} -> {to}:\n{}", edges_text(&g));
    }
    let found = circles(&g);
    assert!(
        found.is_empty(),
        "import circles between modules (dependencies must run one way: move what both sides need \
         into a module below both):\n{}",
        found.join("\n")
    );
}

fn tree(files: &[(&str, &str)]) -> Vec<String> {
    circles(&graph(&files.iter().map(|(p, s)| (p.to_string(), s.to_string())).collect::<Vec<_>>()))
}

/// The circle this test was written for (metrics took `upload::UploadError`, upload takes
/// `metrics::InFlight`), found through a grouped `use`, a path in an expression and a
/// re-export, and named with the lines that make it.
#[test]
fn a_circle_between_rooms_is_found_and_named() {
    let found = tree(&[
        ("lib.rs", "pub mod metrics; pub mod upload; pub mod queue;"),
        ("metrics.rs", "use crate::{queue::Outcome, upload::UploadError};"),
        ("upload/mod.rs", "mod error; pub use error::UploadError; fn f() { crate::metrics::InFlight::new(); }"),
        ("upload/error.rs", "pub struct UploadError;"),
        ("queue.rs", "pub enum Outcome {}"),
    ]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("metrics -> upload -> metrics (under crate)"), "{}", found[0]);
    assert!(found[0].contains("src/metrics.rs names crate::upload::UploadError"), "{}", found[0]);
    assert!(found[0].contains("src/upload/mod.rs names crate::metrics::InFlight"), "{}", found[0]);

    // The same through a file of each room, and inside a room through `super::`.
    let found = tree(&[
        ("cache/gc.rs", "use crate::upload::Item;"),
        ("cache/mod.rs", ""),
        ("upload.rs", "use crate::cache::collection::Gate;"),
        ("cache/collection.rs", "use super::gc::Plan;"),
        ("cache/index.rs", "use super::collection;"),
    ]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("cache -> upload -> cache"), "{}", found[0]);
    let found = tree(&[
        ("daemon/mod.rs", "mod server; mod workers;"),
        ("daemon/server.rs", "use super::workers::Done;"),
        ("daemon/workers.rs", "fn f() { super::server::reply(); }"),
    ]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("daemon::server -> daemon::workers -> daemon::server (under daemon)"), "{}", found[0]);
}

/// What is not a circle: a parent and its children, unit tests, comments, strings, a
/// visibility, and a one-way chain.
#[test]
fn what_is_not_a_circle() {
    let found = tree(&[
        ("lib.rs", "pub mod a; pub mod b; pub mod c;"),
        ("a/mod.rs", "pub mod x; pub use x::X; use crate::b::B;"),
        ("a/x.rs", "use super::Shared; pub(in crate::a) struct X;"),
        ("b.rs", "use crate::c::C; /// [`crate::a::X`]\n pub fn f() { let s = \"crate::a::X\"; let r = r#\"crate::a\"#; let c = '\"'; }"),
        ("c.rs", "// use crate::a;\n /* crate::b::B */ #[cfg(test)]\n#[allow(unused)]\nmod tests { use crate::a::X; use crate::b; }\n #[cfg(test)] use crate::a::x; pub struct C;"),
    ]);
    assert!(found.is_empty(), "{found:?}");
}
