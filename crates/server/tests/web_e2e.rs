//! End-to-end tests of the web app in a real browser: `web/e2e/*.test.js` (Node's test
//! runner, `playwright-core` driving Debian's headless `chromium`) against an in-process
//! server that serves the embedded app.
//!
//! The suites write screenshots to `target/web-e2e/screenshots`; with
//! `SWITCHBOARD_UPDATE_SCREENSHOTS=1` they replace the README's in `docs/screenshots`.
//!
//! Without node, chromium or the built app (npm missing when `build.rs` ran, or
//! `SWITCHBOARD_SKIP_WEB=1`) this prints a loud SKIP and passes, except under CI (env `CI`
//! set), where each of those is a failure.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use switchboard::testing::TestServer;
use tokio::process::Command;

/// Upper bound for the whole browser run; it takes about a minute.
const SUITE_TIMEOUT: Duration = Duration::from_secs(240);
/// Upper bound for `npm ci` when `web/node_modules` is missing.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Cheap password hashing (many sign-ups), and a moderation word the chat suite uses to
/// see a removal.
const CONFIG: &str = "[accounts]\npassword_hash_cost = \"test\"\n\
                      [moderation]\nwords = [\"bananaphone\"]\nwords_action = \"remove\"\n";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

async fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Fails under CI, otherwise prints a loud skip notice. Returns normally only when skipping.
fn missing(need: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{need} is required to run the web end-to-end tests (CI is set)");
    }
    eprintln!("\n======================================================================");
    eprintln!("SKIPPED: no {need}; the web app's browser tests did not run.");
    eprintln!("======================================================================\n");
}

async fn run(what: &str, cmd: &mut Command, limit: Duration) {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let started = Instant::now();
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {limit:?}"))
        .unwrap_or_else(|e| panic!("{what} could not start: {e}"));
    println!(
        "----- {what} ({:.1} s): stdout -----\n{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout)
    );
    println!(
        "----- {what}: stderr -----\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed with {}", out.status);
}

fn chromium() -> Option<PathBuf> {
    let configured = std::env::var_os("SB_CHROMIUM").map(PathBuf::from);
    configured
        .into_iter()
        .chain(["/usr/bin/chromium", "/usr/bin/chromium-browser"].map(PathBuf::from))
        .find(|p| p.exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_app_in_a_real_browser() {
    if !switchboard::web::built() {
        return missing(
            "the web app was not built into this binary (npm missing, or SWITCHBOARD_SKIP_WEB set)",
        );
    }
    if !have("node").await {
        return missing("node (Node 20+)");
    }
    let Some(chromium) = chromium() else {
        return missing("chromium (apt-get install chromium)");
    };
    let web = repo_root().join("web");
    if !web
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        if !have("npm").await {
            return missing("npm (to install playwright-core)");
        }
        run(
            "npm ci",
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&web),
            INSTALL_TIMEOUT,
        )
        .await;
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(web.join("e2e"))
        .expect("web/e2e")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".test.js"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no web/e2e/*.test.js");

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../web-e2e/screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let server = TestServer::start_with(CONFIG).await;
    // One suite at a time: each drives its own browser, and the machine is small.
    let mut cmd = Command::new("node");
    cmd.arg("--test")
        .arg("--test-concurrency=1")
        .args(&files)
        .current_dir(&web)
        .env("SB_HTTP_URL", server.http_url())
        .env("SB_CHROMIUM", &chromium)
        .env("SB_SCREENSHOTS", &shots)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    run("node --test web/e2e", &mut cmd, SUITE_TIMEOUT).await;
    server.shutdown().await;

    if std::env::var_os("SWITCHBOARD_UPDATE_SCREENSHOTS").is_some_and(|v| v != "0") {
        let docs = repo_root().join("docs/screenshots");
        std::fs::create_dir_all(&docs).expect("docs/screenshots");
        for name in ["chat", "chat-mobile", "editor", "dashboard"] {
            let from = shots.join(format!("{name}.png"));
            std::fs::copy(&from, docs.join(format!("{name}.png")))
                .unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        }
        println!("screenshots copied to {}", docs.display());
    }
}
