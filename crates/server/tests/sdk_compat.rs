//! Runs the official client SDKs against an in-process server: the npm `centrifuge` SDK
//! (tests/compat/js, Node's built-in test runner) and the PyPI `centrifuge-python` and `cent`
//! clients (tests/compat/py, unittest). Dependencies are installed on first use: `npm ci` into
//! tests/compat/js/node_modules, and a venv at target/compat-venv.
//!
//! Without node/npm or python3 these tests print a loud SKIP and pass, except under CI (env `CI`
//! set), where a missing toolchain is a failure.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use switchboard::testing::TestServer;
use tokio::process::Command;

/// Upper bound for one SDK suite; the suites themselves take a few seconds.
const SUITE_TIMEOUT: Duration = Duration::from_secs(120);
/// Upper bound for installing a suite's dependencies from the registry.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Server settings for the SDK suites: the defaults a quick start gets, except a 1 s grace after
/// a connection token expires (25 s by default), so that refresh.test.js proves the refresh kept
/// the connection up and expiry.test.js sees an unrefreshed one closed, both within seconds.
const CONFIG: &str = "[client]\nexpired_close_delay = \"1s\"\n";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// Whether `tool --version` runs.
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
fn missing(what: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{what} is required to run the SDK compatibility tests (CI is set)");
    }
    eprintln!("\n======================================================================");
    eprintln!("SKIPPED: {what} not found; the SDK compatibility test did not run.");
    eprintln!("======================================================================\n");
}

/// Runs a command to completion, printing its output; panics unless it succeeds.
async fn run(what: &str, cmd: &mut Command, limit: Duration) {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {limit:?}"))
        .unwrap_or_else(|e| panic!("{what} could not start: {e}"));
    println!(
        "----- {what}: stdout -----\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    println!(
        "----- {what}: stderr -----\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed with {}", out.status);
}

/// The environment the suites read the server from.
fn server_env(cmd: &mut Command, server: &TestServer) {
    cmd.env("SB_WS_URL", server.ws_url())
        .env("SB_HTTP_URL", server.http_url())
        .env("SB_API_KEY", &server.api_key)
        .env("SB_SECRET", &server.secret)
        .env("SB_BIN", env!("CARGO_BIN_EXE_switchboard"))
        // `switchboard token` must not touch the repository's ./data.
        .env(
            "SWITCHBOARD_DATA_DIR",
            std::env::temp_dir().join("switchboard-compat-token"),
        )
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
}

/// Whether the JS suite file `name` (e.g. `crash.test.js`) is selected: all of them, unless
/// `SB_JS_SUITES` lists some by stem (`SB_JS_SUITES=crash,docs_crash`, as scripts/faults.sh
/// does).
fn selected(name: &Path) -> bool {
    let Ok(only) = std::env::var("SB_JS_SUITES") else {
        return true;
    };
    let file = name
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    only.split(',')
        .map(str::trim)
        .any(|stem| !stem.is_empty() && file == format!("{stem}.test.js"))
}

/// Installs the JS suite's packages once per test binary; false when node/npm are missing.
async fn js_deps() -> Option<PathBuf> {
    static INSTALLED: tokio::sync::OnceCell<bool> = tokio::sync::OnceCell::const_new();
    let dir = repo_root().join("tests/compat/js");
    let ok = *INSTALLED
        .get_or_init(|| async {
            if !have("node").await || !have("npm").await {
                return false;
            }
            // Every package the suites require: a node_modules from before one was added
            // gets `npm ci` too.
            let incomplete = ["centrifuge", "ws", "yjs", "y-websocket", "y-protocols"]
                .iter()
                .any(|p| !dir.join(format!("node_modules/{p}/package.json")).exists());
            if incomplete {
                run(
                    "npm ci",
                    Command::new("npm")
                        .args(["ci", "--no-audit", "--no-fund"])
                        .current_dir(&dir),
                    INSTALL_TIMEOUT,
                )
                .await;
            }
            true
        })
        .await;
    if !ok {
        missing("node and npm (Node 20+)");
        return None;
    }
    Some(dir)
}

async fn run_js(server: &TestServer, dir: &Path, files: &[PathBuf], what: &str) {
    let mut cmd = Command::new("node");
    cmd.arg("--test")
        .arg("--test-concurrency=4")
        .args(files)
        .current_dir(dir);
    server_env(&mut cmd, server);
    run(what, &mut cmd, SUITE_TIMEOUT).await;
}

/// Every JS suite, on the default store (SQLite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_sdk() {
    let Some(dir) = js_deps().await else { return };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/compat/js")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".test.js"))
        .filter(|p| selected(p))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.test.js files in {}", dir.display());

    let server = TestServer::start_with(CONFIG).await;
    run_js(&server, &dir, &files, "node --test tests/compat/js").await;
    server.shutdown().await;
}

/// The chat and crash suites again, on PostgreSQL (required under CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_chat_on_postgres() {
    let Some(dir) = js_deps().await else { return };
    let Some(db) = switchboard_store::testing::TestDatabase::postgres().await else {
        missing("PostgreSQL at 127.0.0.1:5432 (database test)");
        return;
    };
    let server = TestServer::start_on(db.url(), CONFIG).await;
    let files: Vec<PathBuf> = [dir.join("chat.test.js"), dir.join("crash.test.js")]
        .into_iter()
        .filter(|p| selected(p))
        .collect();
    if files.is_empty() {
        return;
    }
    let mut cmd = Command::new("node");
    cmd.arg("--test").args(&files).current_dir(&dir);
    server_env(&mut cmd, &server);
    // crash.test.js runs and kills its own server process: on this database too.
    cmd.env("SB_DATABASE_URL", db.url());
    let what = "node --test chat.test.js crash.test.js (PostgreSQL)";
    run(what, &mut cmd, SUITE_TIMEOUT).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients() {
    if !have("python3").await {
        missing("python3");
        return;
    }
    let root = repo_root();
    let dir = root.join("tests/compat/py");
    let venv = root.join("target/compat-venv");
    let python = venv.join("bin/python");
    let requirements =
        std::fs::read_to_string(dir.join("requirements.txt")).expect("requirements.txt");
    // The venv records which requirements it was built from, so an edit reinstalls.
    let stamp = venv.join("installed-requirements.txt");
    if !python.exists() {
        run(
            "python3 -m venv target/compat-venv",
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            INSTALL_TIMEOUT,
        )
        .await;
    }
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(requirements.as_str()) {
        run(
            "pip install -r tests/compat/py/requirements.txt",
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "-q",
                    "-r",
                ])
                .arg(dir.join("requirements.txt")),
            INSTALL_TIMEOUT,
        )
        .await;
        std::fs::write(&stamp, &requirements).expect("write venv stamp");
    }

    let server = TestServer::start_with(CONFIG).await;
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "unittest", "-v", "test_sdk"])
        .current_dir(&dir)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    server_env(&mut cmd, &server);
    run(
        "python -m unittest tests/compat/py/test_sdk.py",
        &mut cmd,
        SUITE_TIMEOUT,
    )
    .await;
    server.shutdown().await;
}
