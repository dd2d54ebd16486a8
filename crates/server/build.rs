//! Builds the browser app in `web/` and embeds it (see `src/web.rs`).
//!
//! `npm ci` runs when `web/node_modules` is missing or was installed from another lockfile,
//! then `npm run build` writes the bundle into `OUT_DIR/web`. The generated
//! `OUT_DIR/web_assets.rs` lists every file with `include_bytes!`, so the binary never reads
//! the file system for it. Cargo re-runs this only when the app's sources, package files or
//! build script change, so ordinary builds do not touch npm.
//!
//! Without npm, when the build fails, or with `SWITCHBOARD_SKIP_WEB=1`, a `cargo:warning`
//! says so and a placeholder page (how to build the app) is embedded instead: the server
//! always builds.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Inputs of the web build; a change to any of them re-runs this script.
const INPUTS: &[&str] = &[
    "src",
    "index.html",
    "favicon.svg",
    "package.json",
    "package-lock.json",
    "build.mjs",
];

/// Where `npm ci` leaves a copy of the lockfile it installed from.
const STAMP: &str = "node_modules/.switchboard-lockfile";

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    let web = manifest.join("../../web");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SWITCHBOARD_SKIP_WEB");
    for input in INPUTS {
        println!("cargo:rerun-if-changed={}", web.join(input).display());
    }

    let dist = out.join("web");
    let skip = std::env::var_os("SWITCHBOARD_SKIP_WEB").is_some_and(|v| v != "0");
    let built = if skip {
        Err("SWITCHBOARD_SKIP_WEB is set".to_string())
    } else if !web.join("package.json").exists() {
        Err(format!("{} has no package.json", web.display()))
    } else {
        build(&web, &out.join("web-build")).map(|()| sync(&out.join("web-build"), &dist))
    };
    let (root, ok) = match built {
        Ok(()) => (dist, true),
        Err(why) => {
            if !skip {
                // Try again once npm or node_modules appear (npm writes this file on every
                // install, also a `npm ci` by hand); a missing file re-runs every build,
                // which costs one failed `npm --version` while npm is absent.
                println!(
                    "cargo:rerun-if-changed={}",
                    web.join("node_modules/.package-lock.json").display()
                );
                println!("cargo:rerun-if-env-changed=PATH");
            }
            println!("cargo:warning=the web app was NOT built ({why}); the server will serve a placeholder page at /.");
            if skip {
                println!("cargo:warning=Unset SWITCHBOARD_SKIP_WEB to build it.");
            } else {
                println!("cargo:warning=To build it: install Node.js 20+ with npm, then `touch web/package.json && cargo build` (`npm --prefix web ci && npm --prefix web run build` shows npm's own errors).");
            }
            let placeholder = out.join("web-placeholder");
            write_if_changed(
                &placeholder.join("index.html"),
                placeholder_page(&why).as_bytes(),
            );
            (placeholder, false)
        }
    };
    write_manifest(&root, ok, &out.join("web_assets.rs"));
}

/// `npm ci` if needed, then `npm run build` into `dist`.
fn build(web: &Path, dist: &Path) -> Result<(), String> {
    match Command::new("npm").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => return Err("npm was not found on PATH".into()),
    }
    let lock = std::fs::read(web.join("package-lock.json"))
        .map_err(|e| format!("cannot read web/package-lock.json: {e}"))?;
    let installed = std::fs::read(web.join(STAMP)).ok();
    if installed.as_deref() != Some(&lock[..]) {
        run(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(web),
            "npm ci",
        )?;
        std::fs::write(web.join(STAMP), &lock).map_err(|e| format!("cannot write {STAMP}: {e}"))?;
    }
    run(
        Command::new("npm")
            .args(["run", "build"])
            .env("WEB_OUT_DIR", dist)
            .current_dir(web),
        "npm run build",
    )?;
    if !dist.join("index.html").exists() {
        return Err("npm run build produced no index.html".into());
    }
    Ok(())
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what} could not start: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    // The last lines of npm's output say what went wrong; show them as warnings.
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    for line in &lines[lines.len().saturating_sub(15)..] {
        println!("cargo:warning={what}: {line}");
    }
    Err(format!("{what} failed with {}", out.status))
}

/// Makes `dest` hold exactly the files of `src`, rewriting only those whose bytes changed:
/// an unchanged file keeps its mtime, so rustc does not rebuild the crate that embeds it.
fn sync(src: &Path, dest: &Path) {
    let wanted = files(src);
    if dest.exists() {
        for stale in files(dest).iter().filter(|f| !wanted.contains(f)) {
            std::fs::remove_file(dest.join(stale)).expect("remove stale web file");
        }
    }
    for rel in &wanted {
        let bytes = std::fs::read(src.join(rel)).expect("read built web file");
        write_if_changed(&dest.join(rel), &bytes);
    }
}

fn write_if_changed(path: &Path, bytes: &[u8]) {
    if std::fs::read(path).ok().as_deref() == Some(bytes) {
        return;
    }
    std::fs::create_dir_all(path.parent().expect("has a parent")).expect("create web dir");
    std::fs::write(path, bytes).expect("write web file");
}

/// Every file under `root`, relative, with `/` separators, sorted.
fn files(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, acc: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read web output dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, root, acc);
            } else {
                let rel = path.strip_prefix(root).expect("under root");
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                acc.push(parts.join("/"));
            }
        }
    }
    let mut acc = Vec::new();
    walk(root, root, &mut acc);
    acc.sort();
    acc
}

fn write_manifest(root: &Path, built: bool, dest: &Path) {
    let mut src = String::from("// Generated by build.rs: the embedded web app.\n");
    src.push_str(&format!("pub const BUILT: bool = {built};\n"));
    src.push_str("pub static FILES: &[(&str, &[u8])] = &[\n");
    for rel in files(root) {
        let abs = root.join(&rel);
        src.push_str(&format!(
            "    ({rel:?}, include_bytes!({:?})),\n",
            abs.display().to_string()
        ));
    }
    src.push_str("];\n");
    write_if_changed(dest, src.as_bytes());
}

fn placeholder_page(why: &str) -> String {
    let why = why.replace('&', "&amp;").replace('<', "&lt;");
    format!(
        r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Switchboard: web app not built</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;color:#1f2937}}code,pre{{background:#f3f4f6;padding:.1rem .3rem;border-radius:4px}}pre{{padding:.75rem;overflow:auto}}</style>
</head>
<body>
<h1>The web app was not built</h1>
<p>This Switchboard binary was compiled without its browser app ({why}). The server itself works:
the WebSocket endpoint, <code>/api</code>, <code>/v1</code> and <code>/docs</code> are all served.</p>
<p>To get the app, install Node.js 20 or newer (with npm) and build again:</p>
<pre>cargo build --release      # build.rs runs npm ci and npm run build in web/</pre>
<p>Unset <code>SWITCHBOARD_SKIP_WEB</code> if it is set. See the README's "Web app" section.</p>
</body>
</html>
"#
    )
}
