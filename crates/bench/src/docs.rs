//! `bench docs`: E editors on one collaborative document, over y-websocket.
//!
//! **Wire.** Binary WebSocket frames, one y-websocket message each: a varuint type (0 sync,
//! 1 awareness, 2 auth, 3 query-awareness) and a body. A sync body is a varuint subtype (0 step1
//! with a state vector, 1 step2 with an update, 2 update with an update), then varbytes. On open
//! a client sends step1 and the server answers step2 (what the client lacks) and its own step1,
//! which the client answers with step2. Edits go out as sync updates, and the server relays
//! them, possibly merged, to every connection of the document, the sender included. Awareness,
//! auth and unknown messages are ignored. The codec is `parse_frame` and `sync_frame`.
//!
//! **Targets.** With `--base-url` (the default) the bench talks to Switchboard: it registers a
//! fresh account, creates each document over REST and connects to `ws://HOST/docs/{id}?token=`.
//! With `--ws-url ws://host:port/room` it connects straight to that URL with no REST and no
//! token, as the y-websocket reference server accepts, so peers can be measured the same way.
//!
//! **Editors.** Each editor is one connection with its own `yrs::Doc` and client id. It inserts
//! `--chars` characters into the Y.Text `content` `--rate` times per second, on its own clock,
//! spread evenly over one send interval so that editors do not fire together. Sends are open
//! loop. Keeping a full replica in every editor costs the bench O(E²) integrations: in a yrs
//! micro-benchmark, 1,000 editors at 2 edits/s took 3–4 CPU-s/s and 9 GB. So only the first
//! `--replicas` editors apply what they receive; they insert at a random position of their
//! replica. The others keep the document as it was when they joined (the seed text) plus their
//! own edits, and type at their own cursor from a random start. They stay valid Yjs clients:
//! every insert names neighbours that the editor has seen.
//!
//! **Latency.** An observer connection (not an editor) applies every update. Each editor
//! records `(its client, clock after the edit) -> send time` in `Sends` before it sends. After
//! integrating an update, the observer knows each client's new clock, and every edit that the
//! clock now covers has arrived. This works with merged updates, and with updates that arrive
//! out of order (yrs keeps them pending until their predecessors arrive; see
//! `Observer::apply`). Edits count when their send time falls in the measured window.
//!
//! **Convergence.** After the window the bench waits until the observer has every edit and
//! the connections are quiet. Then every replica's text, a late joiner's text and, against
//! Switchboard, `GET /v1/documents/{id}/content?format=text` must equal the observer's.
//!
//! **Other phases.** `--docs N` holds N documents of `--doc-bytes` of text open, one connection
//! each, and reports the server's RSS growth per document (connection included). `--load-ops N`
//! writes a document of N single-character inserts, lets the server unload it
//! (`--unload-wait`), and times a fresh connection until its text has N characters.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use yrs::updates::decoder::Decode;
use yrs::{Doc, GetString, ReadTxn, StateVector, Text, TextRef, Transact, Update};

use crate::client::{now_ns, open_all, Dialer, ErrorSample, Ws};
use crate::stats::{self, LatencySummary, Recorder, Window};
use crate::{procfs, round3};

/// Read chunk per connection (see `fanout`: tungstenite zero-fills it on every read).
const READ_BUFFER: usize = 4096;
/// The shared type every connection edits. Switchboard's `content` endpoint reads this one.
pub(crate) const TEXT: &str = "content";
/// From TCP connect until the server's step2 arrived.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a writer waits for the server to confirm that it has integrated its edits.
const ECHO_TIMEOUT: Duration = Duration::from_secs(60);
/// After the window: stop once the observer has every edit and no frame came for this long...
const DRAIN_QUIET: Duration = Duration::from_millis(500);
/// ...or once no frame came for this long, whatever is missing...
const DRAIN_IDLE: Duration = Duration::from_secs(3);
/// ...or after this long in total.
const DRAIN_MAX: Duration = Duration::from_secs(60);
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Time between handing out the plan and the first edit, so that every editor has it.
const START_DELAY: Duration = Duration::from_millis(200);
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);
/// Inserts per update when writing the `--load-ops` document: 100,000 ops are 250 updates.
const LOAD_BATCH: u32 = 400;
/// `--load-ops` inserts land at a random position among the first this many characters. Near
/// the start, finding the position is cheap (yrs walks the list from the start), and inserts
/// there rarely touch their predecessor, so nearly every op stays its own Yjs item.
const LOAD_WINDOW: u32 = 64;
/// Server RSS is read this long after the last `--docs` document was opened.
const DOCS_SETTLE: Duration = Duration::from_secs(2);

#[derive(clap::Args, Debug, Clone)]
pub struct DocsArgs {
    /// Base URL of Switchboard's REST API, used to create the account and the documents.
    /// WebSocket connections go to the same host at `/docs/{id}?token=...`.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// Raw y-websocket mode, for peer servers: connect straight to this URL (the path names
    /// the room), with no REST and no token. Extra documents are `<url>-<run>-<name>`.
    #[arg(long)]
    pub ws_url: Option<String>,
    /// Server process for /proc readings (CPU, RSS). If omitted, the bench looks for the process
    /// that listens on the WebSocket port.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Spread client sockets over source addresses 127.0.0.1..=127.0.0.N (loopback targets only).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub sources: u8,
    /// Editors on the document, each with its own connection. 0 skips the editing phase.
    #[arg(long, default_value_t = 50)]
    pub editors: usize,
    /// Edits per second per editor.
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// Characters inserted by each edit.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub chars: u32,
    /// Editors (the first N) that apply every update they receive and insert at random
    /// positions of their full replica. The others only type at their own cursor.
    #[arg(long, default_value_t = 50)]
    pub replicas: usize,
    /// Characters written into the document before the editors join, so that editors start
    /// typing at different places.
    #[arg(long, default_value_t = 1024)]
    pub seed_chars: u32,
    /// Length of the measured window.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Editing time before the measured window. Its edits are not counted.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// WebSocket connection setups in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// REST calls in flight at once (document creation for `--docs`).
    #[arg(long, default_value_t = 4)]
    pub setup_concurrency: usize,
    /// Memory phase: hold this many documents open, one connection each, and report the
    /// server's RSS growth per document. 0 skips it.
    #[arg(long, default_value_t = 0)]
    pub docs: usize,
    /// Text written into each `--docs` document, in bytes.
    #[arg(long, default_value_t = 1024)]
    pub doc_bytes: u32,
    /// Load phase: write a document of this many single-character inserts and time how long a
    /// fresh connection takes to get it after the server unloaded it. 0 skips it.
    #[arg(long, default_value_t = 0)]
    pub load_ops: u32,
    /// How long the load phase waits, with no connection on the document, before timing the
    /// load. Run Switchboard with `SWITCHBOARD_DOCS__UNLOAD_AFTER=1s` so that it unloads in time.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub unload_wait: Duration,
    /// The account is `<prefix>-<random hex>`, new on every run.
    #[arg(long, default_value = "bench-docs")]
    pub user_prefix: String,
    #[arg(long, default_value = "bench-password")]
    pub password: String,
}

#[derive(Debug, Serialize)]
pub struct DocsReport {
    pub bench: &'static str,
    /// `switchboard` (REST + token) or `raw` (`--ws-url`).
    pub mode: &'static str,
    /// The edited document: its id (Switchboard) or room URL (raw).
    pub document: Option<String>,
    pub editors: usize,
    /// Editors that joined (got the server's step2).
    pub connected: usize,
    pub replicas: usize,
    pub rate_per_editor: f64,
    pub chars_per_edit: u32,
    pub offered_edits_per_s: f64,
    pub duration_s: f64,
    pub setup_s: f64,
    /// Opening every editor connection, up to its step2.
    pub connect_s: f64,
    /// Edits sent inside the window.
    pub sent: u64,
    /// Of those, edits that reached the observer.
    pub observed: u64,
    /// `sent - observed`.
    pub lost: u64,
    pub observed_per_s: f64,
    /// Send → integrated at the observer, for edits sent in the window.
    pub latency_ms: Option<LatencySummary>,
    pub drain_s: f64,
    /// Every compared text equals the observer's, and the observer has every edit of the run.
    pub converged: Option<bool>,
    /// Texts that differ from the observer's: replicas, the late joiner, the server's content.
    pub mismatched: usize,
    /// Texts compared with the observer's.
    pub compared: usize,
    /// Edits of the whole run (warm-up included) that never reached the observer.
    pub missing_edits: u64,
    /// Length of the observer's text at the end.
    pub final_chars: Option<usize>,
    /// Whether `GET /v1/documents/{id}/content?format=text` equals the observer's text.
    pub server_content_matches: Option<bool>,
    /// Frames and bytes received by the editors and the observer over the whole editing phase.
    pub frames_received: u64,
    pub bytes_received: u64,
    /// Editor connections that the server closed during the run.
    pub disconnected: usize,
    pub server_pid: Option<u32>,
    pub server_cpu_s: Option<f64>,
    /// Server RSS before the editors joined and at the end of the window.
    pub server_rss_before_kb: Option<u64>,
    pub server_rss_after_kb: Option<u64>,
    /// The bench's own CPU over the window. Close to the cores it may use means the bench, not
    /// the server, limited the run.
    pub bench_cpu_s: Option<f64>,
    /// The bench used more than 90% of the cores it may run on during the window: the figures
    /// describe the bench at least as much as the server. Give it more cores or fewer replicas.
    pub bench_bound: Option<bool>,
    /// Busy fraction of each core over the window (`/proc/stat`, all processes).
    pub cores_busy: Option<Vec<f64>>,
    /// Memory phase (`--docs`).
    pub docs: usize,
    pub docs_loaded: usize,
    pub docs_rss_before_kb: Option<u64>,
    pub docs_rss_after_kb: Option<u64>,
    pub rss_per_doc_bytes: Option<i64>,
    /// Load phase (`--load-ops`).
    pub load_ops: u32,
    pub load_updates: u32,
    pub load_update_bytes: u64,
    /// Open → step2 integrated with `load_ops` characters, after the unload wait.
    pub load_ms: Option<f64>,
    /// The same for a second connection while the first holds the document loaded.
    pub join_ms: Option<f64>,
    pub errors: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Codec

/// y-websocket message types.
const MSG_SYNC: u64 = 0;
/// Sync message subtypes.
const SYNC_STEP1: u8 = 0;
const SYNC_STEP2: u8 = 1;
pub(crate) const SYNC_UPDATE: u8 = 2;

/// One received frame, as far as the bench cares. Payloads borrow from the frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    /// The server's state vector (v1): answer with step2.
    Step1(&'a [u8]),
    /// A v1 update: the answer to our step1.
    Step2(&'a [u8]),
    /// A v1 update: relayed edits.
    Update(&'a [u8]),
    /// Awareness, auth, query-awareness, or a type this bench does not know.
    Other,
}

/// lib0 varuint: 7 bits per byte, least significant first, high bit set on all but the last.
fn read_varuint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn write_varuint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varbytes<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(read_varuint(buf)?).ok()?;
    if buf.len() < len {
        return None;
    }
    let (bytes, rest) = buf.split_at(len);
    *buf = rest;
    Some(bytes)
}

/// Parses one y-websocket message. `None` means a malformed sync message; anything that is not
/// a sync message is [`Frame::Other`] without looking further.
pub(crate) fn parse_frame(frame: &[u8]) -> Option<Frame<'_>> {
    let mut buf = frame;
    if read_varuint(&mut buf)? != MSG_SYNC {
        return Some(Frame::Other);
    }
    let subtype = read_varuint(&mut buf)?;
    let payload = read_varbytes(&mut buf)?;
    match subtype {
        0 => Some(Frame::Step1(payload)),
        1 => Some(Frame::Step2(payload)),
        2 => Some(Frame::Update(payload)),
        _ => None,
    }
}

/// A sync message of `subtype` (`SYNC_*`) carrying `payload`.
pub(crate) fn sync_frame(subtype: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    write_varuint(&mut out, MSG_SYNC);
    write_varuint(&mut out, u64::from(subtype));
    write_varuint(&mut out, payload.len() as u64);
    out.extend_from_slice(payload);
    out
}

fn step1_of(doc: &Doc) -> Message {
    let sv = doc.transact().state_vector();
    Message::binary(sync_frame(
        SYNC_STEP1,
        &yrs::updates::encoder::Encode::encode_v1(&sv),
    ))
}

/// Our step2: what the server lacks, given its state vector.
pub(crate) fn step2_for(doc: &Doc, server_sv: &[u8]) -> anyhow::Result<Message> {
    let sv = StateVector::decode_v1(server_sv).context("bad state vector in step1")?;
    let diff = doc.transact().encode_state_as_update_v1(&sv);
    Ok(Message::binary(sync_frame(SYNC_STEP2, &diff)))
}

pub(crate) fn apply(doc: &Doc, update: &[u8]) -> anyhow::Result<()> {
    let update = Update::decode_v1(update).context("bad update")?;
    doc.transact_mut()
        .apply_update(update)
        .context("update does not apply")
}

// ---------------------------------------------------------------------------------------------
// Latency bookkeeping

/// Edits sent and not yet seen by the observer, per editor, in send order: `(clock after the
/// edit, send time in ns)`. Editor `i` is client `base + i`. Each editor locks only its own
/// queue, and the observer locks the queues of the clients an update touched, so a
/// `std::sync::Mutex` (never held across an `.await`) is uncontended.
pub(crate) struct Sends {
    base: u64,
    editors: Box<[Unseen]>,
}

/// One editor's edits that the observer has not seen: `(clock after the edit, send ns)`.
type Unseen = Mutex<VecDeque<(u32, u64)>>;

impl Sends {
    pub(crate) fn new(base: u64, editors: usize) -> Self {
        Sends {
            base,
            editors: (0..editors).map(|_| Mutex::new(VecDeque::new())).collect(),
        }
    }

    pub(crate) fn client_id(&self, editor: usize) -> u64 {
        self.base + editor as u64
    }

    /// Editor `editor` sent an edit at `t_ns` that moved its clock to `clock`.
    pub(crate) fn sent(&self, editor: usize, clock: u32, t_ns: u64) {
        lock(&self.editors[editor]).push_back((clock, t_ns));
    }

    /// `client`'s edits up to `clock` have arrived. Calls `arrived(send ns)` for each that had
    /// not. Clients that are not editors of this run are ignored.
    pub(crate) fn arrived(&self, client: u64, clock: u32, mut arrived: impl FnMut(u64)) {
        let Some(queue) = client
            .checked_sub(self.base)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.editors.get(i))
        else {
            return;
        };
        let mut queue = lock(queue);
        while let Some(&(end, t)) = queue.front() {
            if end > clock {
                break;
            }
            queue.pop_front();
            arrived(t);
        }
    }

    /// Edits sent and not seen yet. Locks every queue in turn: poll it, don't spin on it.
    pub(crate) fn outstanding(&self) -> u64 {
        self.editors.iter().map(|q| lock(q).len() as u64).sum()
    }
}

/// The observer's replica. It learns when edits arrive from the clocks an update moves.
pub(crate) struct Observer {
    doc: Doc,
    text: TextRef,
}

impl Observer {
    pub(crate) fn new(client_id: u64) -> Self {
        let doc = Doc::with_client_id(client_id);
        let text = doc.get_or_insert_text(TEXT);
        Observer { doc, text }
    }

    /// Integrates one v1 update and reports, through `arrived(send ns)`, every edit it made
    /// visible. Usually the update's own ranges give each client's new clock. When yrs holds
    /// blocks back because a predecessor is missing (before or after this update), the
    /// document's state vector is the truth instead: a clock there means every earlier block of
    /// that client is integrated.
    pub(crate) fn apply(
        &self,
        update: &[u8],
        sends: &Sends,
        mut arrived: impl FnMut(u64),
    ) -> anyhow::Result<()> {
        let update = Update::decode_v1(update).context("bad update")?;
        let ends: Vec<(u64, u32)> = update
            .insertions(true)
            .iter()
            .filter_map(|(client, ranges)| ranges.iter().next_back().map(|r| (client.get(), r.end)))
            .collect();
        let mut txn = self.doc.transact_mut();
        let was_pending = txn.has_missing_updates();
        txn.apply_update(update).context("update does not apply")?;
        if was_pending || txn.has_missing_updates() {
            for (client, &clock) in txn.state_vector().iter() {
                sends.arrived(client.get(), clock, &mut arrived);
            }
        } else {
            for (client, clock) in ends {
                sends.arrived(client, clock, &mut arrived);
            }
        }
        Ok(())
    }

    pub(crate) fn text(&self) -> String {
        self.text.get_string(&self.doc.transact())
    }
}

// ---------------------------------------------------------------------------------------------
// Where documents live

/// How to reach the server's documents.
enum Server {
    Switchboard {
        http: reqwest::Client,
        base: String,
        /// `ws://host:port`, from the base URL.
        ws_origin: String,
        token: String,
    },
    Raw {
        url: reqwest::Url,
        run_tag: String,
    },
}

/// One document: where to connect, and its REST id if it has one.
#[derive(Debug, Clone)]
struct DocTarget {
    url: String,
    id: Option<i64>,
}

impl DocTarget {
    fn name(&self) -> String {
        match self.id {
            Some(id) => id.to_string(),
            None => self.url.clone(),
        }
    }
}

#[derive(Deserialize)]
struct LoginReply {
    access_token: String,
}

#[derive(Deserialize)]
struct CreatedDocument {
    document: DocumentReply,
}

#[derive(Deserialize)]
struct DocumentReply {
    id: i64,
}

impl Server {
    async fn new(args: &DocsArgs, run_tag: &str) -> anyhow::Result<Self> {
        if let Some(url) = &args.ws_url {
            let url = reqwest::Url::parse(url).with_context(|| format!("bad --ws-url {url}"))?;
            return Ok(Server::Raw {
                url,
                run_tag: run_tag.to_owned(),
            });
        }
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .build()
            .context("HTTP client")?;
        let base = args.base_url.trim_end_matches('/').to_owned();
        let ws_origin = ws_origin(&base)?;
        let username = format!("{}-{run_tag}", args.user_prefix);
        let register = http
            .post(format!("{base}/v1/auth/register"))
            .json(&serde_json::json!({
                "username": username,
                "password": args.password,
                "display_name": username,
            }))
            .send()
            .await
            .context("register")?;
        let status = register.status();
        if !status.is_success() {
            let body = register.text().await.unwrap_or_default();
            bail!("register {username}: {status} {body}");
        }
        let login = http
            .post(format!("{base}/v1/auth/login"))
            .json(&serde_json::json!({"username": username, "password": args.password}))
            .send()
            .await
            .context("login")?;
        let status = login.status();
        if !status.is_success() {
            let body = login.text().await.unwrap_or_default();
            bail!("login {username}: {status} {body}");
        }
        let token = login
            .json::<LoginReply>()
            .await
            .context("login reply")?
            .access_token;
        Ok(Server::Switchboard {
            http,
            base,
            ws_origin,
            token,
        })
    }

    fn mode(&self) -> &'static str {
        match self {
            Server::Switchboard { .. } => "switchboard",
            Server::Raw { .. } => "raw",
        }
    }

    /// Any URL on the server, for the dialer (which only uses its host and port).
    fn any_url(&self) -> String {
        match self {
            Server::Switchboard { ws_origin, .. } => format!("{ws_origin}/docs/0"),
            Server::Raw { url, .. } => url.to_string(),
        }
    }

    /// The edited document. In raw mode that is `--ws-url` itself.
    async fn main_doc(&self, title: &str) -> anyhow::Result<DocTarget> {
        match self {
            Server::Switchboard { .. } => self.new_doc(title).await,
            Server::Raw { url, .. } => Ok(DocTarget {
                url: url.to_string(),
                id: None,
            }),
        }
    }

    /// A new document. In raw mode, a new room `<url>-<run>-<name>` (rooms exist on first use).
    async fn new_doc(&self, name: &str) -> anyhow::Result<DocTarget> {
        match self {
            Server::Switchboard {
                http,
                base,
                ws_origin,
                token,
            } => {
                let reply = http
                    .post(format!("{base}/v1/documents"))
                    .bearer_auth(token)
                    .json(&serde_json::json!({"title": format!("bench {name}")}))
                    .send()
                    .await
                    .context("create document")?;
                let status = reply.status();
                if !status.is_success() {
                    let body = reply.text().await.unwrap_or_default();
                    bail!("create document: {status} {body}");
                }
                let id = reply
                    .json::<CreatedDocument>()
                    .await
                    .context("document reply")?
                    .document
                    .id;
                Ok(DocTarget {
                    url: format!("{ws_origin}/docs/{id}?token={token}"),
                    id: Some(id),
                })
            }
            Server::Raw { url, run_tag } => {
                let mut url = url.clone();
                let path = format!("{}-{run_tag}-{name}", url.path().trim_end_matches('/'));
                url.set_path(&path);
                Ok(DocTarget {
                    url: url.to_string(),
                    id: None,
                })
            }
        }
    }

    /// The server's own text of `doc` (Switchboard only).
    async fn content(&self, doc: &DocTarget) -> Option<anyhow::Result<String>> {
        let Server::Switchboard {
            http, base, token, ..
        } = self
        else {
            return None;
        };
        let id = doc.id?;
        let get = async {
            let reply = http
                .get(format!("{base}/v1/documents/{id}/content?format=text"))
                .bearer_auth(token)
                .send()
                .await
                .context("GET content")?;
            let status = reply.status();
            let body = reply.text().await.context("content body")?;
            if !status.is_success() {
                bail!("GET content: {status} {body}");
            }
            Ok(body)
        };
        Some(get.await)
    }
}

/// `http://host:port/...` → `ws://host:port`.
fn ws_origin(base_url: &str) -> anyhow::Result<String> {
    let url =
        reqwest::Url::parse(base_url).with_context(|| format!("bad --base-url {base_url}"))?;
    let scheme = match url.scheme() {
        "http" => "ws",
        other => bail!("--base-url scheme {other} is not supported (http:// only)"),
    };
    let host = url
        .host_str()
        .ok_or_else(|| anyhow!("--base-url has no host"))?;
    Ok(match url.port() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    })
}

// ---------------------------------------------------------------------------------------------
// Connections

/// Why the server closed, with the meaning of Switchboard's document close codes.
fn closed_by_server(
    frame: Option<&tokio_tungstenite::tungstenite::protocol::CloseFrame>,
) -> anyhow::Error {
    let Some(c) = frame else {
        return anyhow!("server closed the connection");
    };
    let code = u16::from(c.code);
    let meaning = match code {
        4401 => " (bad token)",
        4403 => " (no access to the document)",
        4404 => " (unknown document)",
        _ => "",
    };
    anyhow!("server closed with {code}{meaning} {:?}", c.reason.as_str())
}

/// Opens connection `i` to `url` and syncs `doc` with the server: sends step1, answers the
/// server's step1, and returns once the server's step2 is integrated.
pub(crate) async fn join(dialer: &Dialer, i: usize, url: &str, doc: &Doc) -> anyhow::Result<Ws> {
    join_until(dialer, i, url, doc, |_| true)
        .await
        .map(|(ws, _)| ws)
}

/// Like [`join`], but after step2 keeps integrating updates until `done(doc)`. Returns the
/// time at which the frame that completed it arrived, before the bench integrated it.
async fn join_until(
    dialer: &Dialer,
    i: usize,
    url: &str,
    doc: &Doc,
    done: impl Fn(&Doc) -> bool,
) -> anyhow::Result<(Ws, Instant)> {
    tokio::time::timeout(JOIN_TIMEOUT, async {
        let mut ws = dialer.open_ws(i, url).await?;
        ws.send(step1_of(doc)).await.context("sending step1")?;
        let mut synced = false;
        loop {
            let msg = match ws.next().await {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => bail!("waiting for step2: {e}"),
                None => bail!("connection ended before step2"),
            };
            let arrived = Instant::now();
            let frame = match &msg {
                Message::Binary(b) => &b[..],
                Message::Close(c) => return Err(closed_by_server(c.as_ref())),
                _ => continue,
            };
            match parse_frame(frame) {
                Some(Frame::Step1(sv)) => ws.send(step2_for(doc, sv)?).await?,
                Some(Frame::Step2(update)) => {
                    apply(doc, update)?;
                    synced = true;
                }
                // An update relayed before or after our step2: it is part of the document too.
                Some(Frame::Update(update)) => apply(doc, update)?,
                Some(Frame::Other) => continue,
                None => bail!("malformed sync message from server"),
            }
            if synced && done(doc) {
                return Ok((ws, arrived));
            }
        }
    })
    .await
    .map_err(|_| anyhow!("not synced within {JOIN_TIMEOUT:?}"))?
}

/// Waits until the server has integrated `client`'s edits up to `clock`, answering step1 from
/// `doc`. It asks for the server's whole state (step1 with an empty state vector), so it
/// works with servers that do not relay edits back to their sender; a relayed update that
/// covers the clock ends the wait too.
async fn await_echo(ws: &mut Ws, doc: &Doc, client: u64, clock: u32) -> anyhow::Result<()> {
    let empty = yrs::updates::encoder::Encode::encode_v1(&StateVector::default());
    ws.send(Message::binary(sync_frame(SYNC_STEP1, &empty)))
        .await
        .context("asking for the server's state")?;
    let mut seen = 0u32;
    tokio::time::timeout(ECHO_TIMEOUT, async {
        while seen < clock {
            let msg = match ws.next().await {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => bail!("waiting for the server to have our edits: {e}"),
                None => bail!("connection ended before the server had our edits"),
            };
            let frame = match &msg {
                Message::Binary(b) => &b[..],
                Message::Close(c) => return Err(closed_by_server(c.as_ref())),
                _ => continue,
            };
            match parse_frame(frame) {
                Some(Frame::Step1(sv)) => ws.send(step2_for(doc, sv)?).await?,
                Some(Frame::Step2(u) | Frame::Update(u)) => {
                    let update = Update::decode_v1(u).context("bad update")?;
                    let ranges = update.insertions(true);
                    if let Some(end) = ranges
                        .iter()
                        .find(|(c, _)| c.get() == client)
                        .and_then(|(_, r)| r.iter().next_back().map(|r| r.end))
                    {
                        seen = seen.max(end);
                    }
                }
                Some(Frame::Other) => {}
                None => bail!("malformed sync message from server"),
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| anyhow!("the server did not have our edits within {ECHO_TIMEOUT:?}"))?
}

/// Inserts `chars` ASCII characters at the end of `doc`'s text in one transaction and returns
/// the update.
pub(crate) fn append_text(doc: &Doc, chars: u32) -> Vec<u8> {
    let text = doc.get_or_insert_text(TEXT);
    let mut txn = doc.transact_mut();
    let len = text.len(&txn);
    let chunk: String = (0..chars)
        .map(|k| (b'a' + (k % 26) as u8) as char)
        .collect();
    text.insert(&mut txn, len, &chunk);
    txn.encode_update_v1()
}

/// Holds a connection open until told to stop, answering step1. Returns false if the server
/// ended it first.
async fn hold(mut ws: Ws, doc: Doc, mut stop: watch::Receiver<bool>) -> bool {
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if let Some(Frame::Step1(sv)) = parse_frame(&b) {
                        let Ok(reply) = step2_for(&doc, sv) else { continue };
                        if ws.send(reply).await.is_err() {
                            return false;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return false,
                Some(Ok(_)) => {}
            },
            _ = stop.changed() => {
                let _ = ws.close(None).await;
                return true;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run

/// State shared by the editors and the observer.
struct Shared {
    window: Window,
    recorder: Recorder,
    sends: Sends,
    sent: AtomicU64,
    sent_in_window: AtomicU64,
    frames: AtomicU64,
    bytes: AtomicU64,
    /// Editors that sent their last edit (or ended).
    done_sending: AtomicUsize,
    disconnected: AtomicUsize,
    /// Each replica's text when it stopped.
    texts: Mutex<Vec<Option<String>>>,
    errors: Mutex<ErrorSample>,
}

impl Shared {
    fn error(&self, e: anyhow::Error) {
        lock(&self.errors).add(&e);
    }

    fn received(&self, frame: &[u8]) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
    }
}

/// When the editors edit. Handed to every editor at once.
struct Plan {
    /// Editor 0's first edit; editor i starts `i / editors` of an interval later.
    begin: Instant,
    /// No edit is due at or after this.
    until: Instant,
    rate: f64,
    editors: usize,
    chars: u32,
}

impl Plan {
    /// When editor `i`'s edit number `seq` is due.
    fn due(&self, i: usize, seq: u64) -> Instant {
        let phase = i as f64 / self.editors as f64;
        self.begin + Duration::from_secs_f64((phase + seq as f64) / self.rate)
    }
}

pub async fn run(args: DocsArgs) -> anyhow::Result<DocsReport> {
    if !(args.rate.is_finite() && args.rate > 0.0) || args.duration.is_zero() {
        bail!("--rate and --duration must be positive");
    }
    if args.editors == 0 && args.docs == 0 && args.load_ops == 0 {
        bail!("nothing to do: --editors, --docs and --load-ops are all 0");
    }
    procfs::warn_if_fd_limit_low(args.editors.max(args.docs) + 4);
    let run_tag = format!("{:012x}", fastrand::u64(..) >> 16);
    // Client ids of this run: editors are base..base+E, other connections follow. Kept below
    // 2^32, like Yjs's own, so that yrs built with `small-client` keeps them distinct too.
    let base = fastrand::u64(1 << 20..1 << 31);

    let setup_started = Instant::now();
    let server = Server::new(&args, &run_tag).await?;
    let dialer =
        Arc::new(Dialer::for_url(&server.any_url(), args.sources, None, READ_BUFFER).await?);
    let pid = procfs::server_pid(args.server_pid, dialer.port());
    let mut errors = ErrorSample::default();
    let mut report = DocsReport {
        bench: "docs",
        mode: server.mode(),
        document: None,
        editors: args.editors,
        connected: 0,
        replicas: args.replicas.min(args.editors),
        rate_per_editor: args.rate,
        chars_per_edit: args.chars,
        offered_edits_per_s: round3(args.rate * args.editors as f64),
        duration_s: round3(args.duration.as_secs_f64()),
        setup_s: 0.0,
        connect_s: 0.0,
        sent: 0,
        observed: 0,
        lost: 0,
        observed_per_s: 0.0,
        latency_ms: None,
        drain_s: 0.0,
        converged: None,
        mismatched: 0,
        compared: 0,
        missing_edits: 0,
        final_chars: None,
        server_content_matches: None,
        frames_received: 0,
        bytes_received: 0,
        disconnected: 0,
        server_pid: pid,
        server_cpu_s: None,
        server_rss_before_kb: None,
        server_rss_after_kb: None,
        bench_cpu_s: None,
        bench_bound: None,
        cores_busy: None,
        docs: args.docs,
        docs_loaded: 0,
        docs_rss_before_kb: None,
        docs_rss_after_kb: None,
        rss_per_doc_bytes: None,
        load_ops: args.load_ops,
        load_updates: 0,
        load_update_bytes: 0,
        load_ms: None,
        join_ms: None,
        errors: Vec::new(),
    };
    report.setup_s = round3(setup_started.elapsed().as_secs_f64());

    let ctx = Ctx {
        args: &args,
        server: &server,
        dialer: &dialer,
        pid,
        base,
    };
    // The memory phase runs first, on a server with nothing else loaded.
    if args.docs > 0 {
        if let Err(e) = docs_phase(&ctx, &mut report, &mut errors).await {
            errors.add(&e.context("docs phase"));
        }
    }
    if args.editors > 0 {
        editing_phase(&ctx, &mut report, &mut errors).await?;
    }
    if args.load_ops > 0 {
        if let Err(e) = load_phase(&ctx, &mut report).await {
            errors.add(&e.context("load phase"));
        }
    }
    report.errors = errors.snapshot();
    Ok(report)
}

/// What every phase needs.
struct Ctx<'a> {
    args: &'a DocsArgs,
    server: &'a Server,
    dialer: &'a Arc<Dialer>,
    pid: Option<u32>,
    /// First client id of the run. Editors use `base..base+E`.
    base: u64,
}

impl Ctx<'_> {
    /// Client ids for connections that are not editors: `base + E + k`.
    fn other_client(&self, k: usize) -> u64 {
        self.base + (self.args.editors + k) as u64
    }
}

/// Client-id offsets (after the editors) of the connections that are not editors.
const OBSERVER: usize = 0;
const LATE_JOINER: usize = 1;
const LOAD_WRITER: usize = 2;
const LOAD_READER: usize = 3;
const LOAD_SECOND_READER: usize = 4;
const FIRST_HOLDER: usize = 5;

async fn editing_phase(
    ctx: &Ctx<'_>,
    report: &mut DocsReport,
    errors: &mut ErrorSample,
) -> anyhow::Result<()> {
    let args = ctx.args;
    let n = args.editors;
    let replicas = args.replicas.min(n);
    let target = ctx.server.main_doc("edited").await?;
    report.document = Some(target.name());
    report.server_rss_before_kb = ctx.pid.and_then(|p| procfs::rss_kb(Some(p)));

    // The observer joins first and writes the seed text, so that editors start in it.
    let observer = Arc::new(Observer::new(ctx.other_client(OBSERVER)));
    let mut observer_ws = join(ctx.dialer, n, &target.url, &observer.doc)
        .await
        .context("observer")?;
    if args.seed_chars > 0 {
        let seed = append_text(&observer.doc, args.seed_chars);
        observer_ws
            .send(Message::binary(sync_frame(SYNC_UPDATE, &seed)))
            .await?;
        // The observer's client is new, so its clock is the seed's length.
        let clock = args.seed_chars;
        await_echo(
            &mut observer_ws,
            &observer.doc,
            ctx.other_client(OBSERVER),
            clock,
        )
        .await
        .context("seeding the document")?;
    }

    let shared = Arc::new(Shared {
        window: Window::new(),
        recorder: Recorder::new(),
        sends: Sends::new(ctx.base, n),
        sent: AtomicU64::new(0),
        sent_in_window: AtomicU64::new(0),
        frames: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        done_sending: AtomicUsize::new(0),
        disconnected: AtomicUsize::new(0),
        texts: Mutex::new(vec![None; replicas]),
        errors: Mutex::new(ErrorSample::default()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let observer_task = {
        let (observer, shared, stop) = (observer.clone(), shared.clone(), stop_rx.clone());
        tokio::spawn(async move { observe(observer_ws, &observer, &shared, stop).await })
    };

    // Editors: join with bounded concurrency, then wait for the plan.
    let connect_started = Instant::now();
    let (go_tx, go_rx) = watch::channel::<Option<Arc<Plan>>>(None);
    let opened = {
        let dialer = ctx.dialer.clone();
        let url = Arc::new(target.url.clone());
        let shared_setup = shared.clone();
        let shared_run = shared.clone();
        open_all(
            n,
            args.concurrency,
            move |i| {
                let (dialer, url, shared) = (dialer.clone(), url.clone(), shared_setup.clone());
                async move {
                    let doc = Doc::with_client_id(shared.sends.client_id(i));
                    let ws = join(&dialer, i, &url, &doc).await?;
                    Ok((ws, doc))
                }
            },
            move |i, (ws, doc)| {
                let (shared, go, stop) = (shared_run.clone(), go_rx.clone(), stop_rx.clone());
                let me = EditorSpec {
                    i,
                    replica: i < replicas,
                };
                async move { editor_loop(ws, doc, me, &shared, go, stop).await }
            },
        )
        .await
    };
    let connected = opened.connected;
    let mut tasks = opened.tasks;
    errors.extend(opened.errors);
    report.connected = connected;
    report.connect_s = round3(connect_started.elapsed().as_secs_f64());
    if connected == 0 {
        let _ = stop_tx.send(true);
        bail!("no editor could join: {:?}", errors.snapshot());
    }
    eprintln!(
        "bench docs: {connected} of {n} editors joined document {} in {} s",
        target.name(),
        report.connect_s
    );

    // Load: hand out the plan, measure the window.
    let begin = Instant::now() + START_DELAY;
    let window_start = begin + args.warmup;
    let until = window_start + args.duration;
    let start_ns = now_ns() + (window_start - Instant::now()).as_nanos() as u64;
    shared
        .window
        .set(start_ns, start_ns + args.duration.as_nanos() as u64);
    let _ = go_tx.send(Some(Arc::new(Plan {
        begin,
        until,
        rate: args.rate,
        editors: n,
        chars: args.chars,
    })));
    tokio::time::sleep_until(window_start.into()).await;
    let server_cpu_start = ctx.pid.and_then(|p| procfs::cpu_seconds(Some(p)));
    let bench_cpu_start = procfs::cpu_seconds(None);
    let cores_start = procfs::core_ticks();
    let measured_from = Instant::now();
    tokio::time::sleep_until(until.into()).await;
    let server_cpu_end = ctx.pid.and_then(|p| procfs::cpu_seconds(Some(p)));
    let bench_cpu_end = procfs::cpu_seconds(None);
    let cores_end = procfs::core_ticks();
    report.server_rss_after_kb = ctx.pid.and_then(|p| procfs::rss_kb(Some(p)));
    let window_s = measured_from.elapsed().as_secs_f64();

    let drain_started = Instant::now();
    drain(&shared, connected).await;
    report.drain_s = round3(drain_started.elapsed().as_secs_f64());
    let _ = stop_tx.send(true);
    let observer_ok = match observer_task.await {
        Ok(ok) => ok,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();

    // Verdicts.
    let (latency, observed, _) = shared.recorder.merge();
    let sent = shared.sent_in_window.load(Ordering::Relaxed);
    report.sent = sent;
    report.observed = observed;
    report.lost = sent.saturating_sub(observed);
    report.observed_per_s = round3(observed as f64 / args.duration.as_secs_f64());
    report.latency_ms = stats::summarize(&latency);
    report.missing_edits = shared.sends.outstanding();
    report.frames_received = shared.frames.load(Ordering::Relaxed);
    report.bytes_received = shared.bytes.load(Ordering::Relaxed);
    report.disconnected = shared.disconnected.load(Ordering::Relaxed);

    let reference = observer.text();
    report.final_chars = Some(reference.len());
    let mut compared = 0;
    let mut mismatched = 0;
    // Replicas that never joined left no text; one that was disconnected left a stale one.
    for text in lock(&shared.texts).iter().flatten() {
        compared += 1;
        if *text != reference {
            mismatched += 1;
            shared.error(anyhow!(
                "a replica's text differs from the observer's ({} vs {} chars)",
                text.len(),
                reference.len()
            ));
        }
    }
    // A late joiner gets the document from the server alone.
    let late = Doc::with_client_id(ctx.other_client(LATE_JOINER));
    compared += 1;
    match join(ctx.dialer, n + 1, &target.url, &late).await {
        Ok(mut ws) => {
            let text = late.get_or_insert_text(TEXT).get_string(&late.transact());
            if text != reference {
                mismatched += 1;
                shared.error(anyhow!(
                    "late joiner's text differs from the observer's ({} vs {} chars)",
                    text.len(),
                    reference.len()
                ));
            }
            let _ = ws.close(None).await;
        }
        Err(e) => {
            mismatched += 1;
            shared.error(e.context("late joiner"));
        }
    }
    if let Some(content) = ctx.server.content(&target).await {
        compared += 1;
        let matches = match content {
            Ok(text) => {
                if text != reference {
                    shared.error(anyhow!(
                        "server content differs from the observer's ({} vs {} bytes)",
                        text.len(),
                        reference.len()
                    ));
                }
                text == reference
            }
            Err(e) => {
                shared.error(e);
                false
            }
        };
        mismatched += usize::from(!matches);
        report.server_content_matches = Some(matches);
    }
    report.compared = compared;
    report.mismatched = mismatched;
    report.converged = Some(observer_ok && mismatched == 0 && report.missing_edits == 0);

    let server_cpu = server_cpu_start.zip(server_cpu_end).map(|(a, b)| b - a);
    let bench_cpu = bench_cpu_start.zip(bench_cpu_end).map(|(a, b)| b - a);
    crate::fanout::warn_if_bench_bound(bench_cpu, window_s);
    report.server_cpu_s = server_cpu.map(round3);
    report.bench_cpu_s = bench_cpu.map(round3);
    report.bench_bound = crate::fanout::bench_bound(bench_cpu, window_s);
    report.cores_busy = cores_start.zip(cores_end).map(|(a, b)| {
        procfs::busy_fractions(&a, &b)
            .into_iter()
            .map(round3)
            .collect()
    });
    errors.extend(std::mem::take(&mut *lock(&shared.errors)));
    Ok(())
}

/// After the window: waits until every editor sent its last edit, the observer has them all
/// and nothing arrived for [`DRAIN_QUIET`] (replicas may trail the observer a little). Gives
/// up once nothing arrived for [`DRAIN_IDLE`], or after [`DRAIN_MAX`].
async fn drain(shared: &Shared, editors: usize) {
    let started = Instant::now();
    let mut last_change = Instant::now();
    let mut frames = shared.frames.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = shared.frames.load(Ordering::Relaxed);
        if now != frames {
            frames = now;
            last_change = Instant::now();
        }
        let quiet = last_change.elapsed();
        let complete = shared.done_sending.load(Ordering::Relaxed) >= editors
            && shared.sends.outstanding() == 0;
        if (complete && quiet >= DRAIN_QUIET)
            || quiet >= DRAIN_IDLE
            || started.elapsed() >= DRAIN_MAX
        {
            return;
        }
    }
}

/// The observer: integrates everything and records when each edit became visible. Returns
/// false if the connection failed before the stop.
async fn observe(
    mut ws: Ws,
    observer: &Observer,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) -> bool {
    let shard = shared.recorder.shard(0);
    loop {
        let msg = tokio::select! {
            biased;
            msg = ws.next() => msg,
            _ = stop.changed() => {
                let _ = ws.close(None).await;
                return true;
            }
        };
        let frame = match &msg {
            Some(Ok(Message::Binary(b))) => &b[..],
            Some(Ok(Message::Close(c))) => {
                shared.error(closed_by_server(c.as_ref()).context("observer"));
                return false;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                shared.error(anyhow!("observer connection failed: {e}"));
                return false;
            }
            None => return false,
        };
        let now = now_ns();
        shared.received(frame);
        match parse_frame(frame) {
            Some(Frame::Step2(u) | Frame::Update(u)) => {
                let window = shared.window.get();
                let mut shard = stats::lock(shard);
                if let Err(e) =
                    observer.apply(u, &shared.sends, |t| shard.record(window, Some(t), now))
                {
                    shared.error(e.context("observer"));
                }
            }
            Some(Frame::Step1(sv)) => match step2_for(&observer.doc, sv) {
                Ok(reply) => {
                    if ws.send(reply).await.is_err() {
                        return false;
                    }
                }
                Err(e) => shared.error(e),
            },
            Some(Frame::Other) => {}
            None => shared.error(anyhow!("malformed sync message from server")),
        }
    }
}

struct EditorSpec {
    /// Editor number: picks the client id, the source address and the send phase.
    i: usize,
    /// Applies what it receives and inserts at random positions of its replica.
    replica: bool,
}

/// One editor: edits on the plan's schedule and reads until told to stop. A replica stores
/// its text in `shared.texts` when it stops.
async fn editor_loop(
    mut ws: Ws,
    doc: Doc,
    me: EditorSpec,
    shared: &Shared,
    mut go: watch::Receiver<Option<Arc<Plan>>>,
    mut stop: watch::Receiver<bool>,
) {
    let text = doc.get_or_insert_text(TEXT);
    // Our clock: ASCII characters take one clock each, and this client is new.
    let mut clock = 0u32;
    // Where a non-replica types next; chosen at its first edit.
    let mut cursor: Option<u32> = None;
    let mut plan: Option<Arc<Plan>> = None;
    let mut go_open = true;
    let mut seq = 0u64;
    let sleep = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(sleep);
    let mut sending = false;
    let mut counted_done = false;
    let done_sending = |counted: &mut bool| {
        if !*counted {
            *counted = true;
            shared.done_sending.fetch_add(1, Ordering::Relaxed);
        }
    };

    let ended_by_server = loop {
        tokio::select! {
            biased;
            msg = ws.next() => {
                let frame = match &msg {
                    Some(Ok(Message::Binary(b))) => &b[..],
                    Some(Ok(Message::Close(c))) => {
                        shared.error(closed_by_server(c.as_ref()).context("editor"));
                        break true;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        shared.error(anyhow!("editor connection failed: {e}"));
                        break true;
                    }
                    None => break true,
                };
                shared.received(frame);
                match parse_frame(frame) {
                    Some(Frame::Step2(u) | Frame::Update(u)) if me.replica => {
                        if let Err(e) = apply(&doc, u) {
                            shared.error(e.context("replica"));
                        }
                    }
                    Some(Frame::Step1(sv)) => match step2_for(&doc, sv) {
                        Ok(reply) => {
                            if ws.send(reply).await.is_err() {
                                break true;
                            }
                        }
                        Err(e) => shared.error(e),
                    },
                    None => shared.error(anyhow!("malformed sync message from server")),
                    _ => {}
                }
            }
            _ = &mut sleep, if sending => {
                let Some(p) = plan.as_deref() else { continue };
                let now = Instant::now();
                let mut failed = false;
                while p.due(me.i, seq) <= now && p.due(me.i, seq) < p.until {
                    let chunk: String = (0..p.chars)
                        .map(|k| (b'a' + ((me.i as u64 + seq + u64::from(k)) % 26) as u8) as char)
                        .collect();
                    let update = {
                        let mut txn = doc.transact_mut();
                        let len = text.len(&txn);
                        let pos = if me.replica {
                            fastrand::u32(0..=len)
                        } else {
                            let at = cursor.unwrap_or_else(|| fastrand::u32(0..=len)).min(len);
                            cursor = Some(at + p.chars);
                            at
                        };
                        text.insert(&mut txn, pos, &chunk);
                        txn.encode_update_v1()
                    };
                    clock += p.chars;
                    seq += 1;
                    let frame = Message::binary(sync_frame(SYNC_UPDATE, &update));
                    let t = now_ns();
                    shared.sends.sent(me.i, clock, t);
                    shared.sent.fetch_add(1, Ordering::Relaxed);
                    if shared.window.contains(t) {
                        shared.sent_in_window.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Err(e) = ws.send(frame).await {
                        shared.error(anyhow!("editor send failed: {e}"));
                        failed = true;
                        break;
                    }
                }
                if failed {
                    break true;
                }
                let next = p.due(me.i, seq);
                sending = next < p.until;
                sleep.as_mut().reset(next.into());
                if !sending {
                    done_sending(&mut counted_done);
                }
            }
            changed = go.changed(), if plan.is_none() && go_open => {
                if changed.is_err() {
                    go_open = false;
                    continue;
                }
                plan = go.borrow_and_update().clone();
                if let Some(p) = &plan {
                    let first = p.due(me.i, 0);
                    sending = first < p.until;
                    sleep.as_mut().reset(first.into());
                    if !sending {
                        done_sending(&mut counted_done);
                    }
                }
            }
            _ = stop.changed() => break false,
        }
    };
    done_sending(&mut counted_done);
    if ended_by_server {
        shared.disconnected.fetch_add(1, Ordering::Relaxed);
    } else {
        let _ = ws.close(None).await;
    }
    if me.replica {
        lock(&shared.texts)[me.i] = Some(text.get_string(&doc.transact()));
    }
}

/// `--docs`: N documents with `--doc-bytes` of text, one connection holding each open.
async fn docs_phase(
    ctx: &Ctx<'_>,
    report: &mut DocsReport,
    errors: &mut ErrorSample,
) -> anyhow::Result<()> {
    let args = ctx.args;
    let n = args.docs;
    let before = ctx.pid.and_then(|p| procfs::rss_kb(Some(p)));
    // Create the documents first: REST calls are not what the memory is about.
    let mut targets: Vec<Option<DocTarget>> = vec![None; n];
    let mut created = futures_util::stream::iter(0..n)
        .map(|k| async move { (k, ctx.server.new_doc(&format!("mem{k}")).await) })
        .buffer_unordered(args.setup_concurrency.max(1));
    while let Some((k, target)) = created.next().await {
        targets[k] = Some(target.with_context(|| format!("document {k}"))?);
    }
    drop(created);
    let targets: Arc<Vec<String>> =
        Arc::new(targets.into_iter().flatten().map(|t| t.url).collect());

    let (stop_tx, stop_rx) = watch::channel(false);
    let dropped = Arc::new(AtomicUsize::new(0));
    let opened = {
        let dialer = ctx.dialer.clone();
        let dropped = dropped.clone();
        let first_client = ctx.other_client(FIRST_HOLDER);
        let bytes = args.doc_bytes;
        open_all(
            n,
            args.concurrency,
            move |k| {
                let (dialer, targets) = (dialer.clone(), targets.clone());
                async move {
                    let client = first_client + k as u64;
                    let doc = Doc::with_client_id(client);
                    let mut ws = join(&dialer, k, &targets[k], &doc).await?;
                    if bytes > 0 {
                        let update = append_text(&doc, bytes);
                        ws.send(Message::binary(sync_frame(SYNC_UPDATE, &update)))
                            .await?;
                        await_echo(&mut ws, &doc, client, bytes).await?;
                    }
                    Ok((ws, doc))
                }
            },
            move |_, (ws, doc)| {
                let (stop, dropped) = (stop_rx.clone(), dropped.clone());
                async move {
                    if !hold(ws, doc, stop).await {
                        dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            },
        )
        .await
    };
    let mut tasks = opened.tasks;
    errors.extend(opened.errors);
    tokio::time::sleep(DOCS_SETTLE).await;
    let after = ctx.pid.and_then(|p| procfs::rss_kb(Some(p)));
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let loaded = opened.connected;
    report.docs_loaded = loaded;
    report.docs_rss_before_kb = before;
    report.docs_rss_after_kb = after;
    report.rss_per_doc_bytes = match (before, after) {
        (Some(b), Some(a)) if loaded > 0 => Some((a as i64 - b as i64) * 1024 / loaded as i64),
        _ => None,
    };
    let dropped = dropped.load(Ordering::Relaxed);
    if dropped > 0 {
        errors.add(&anyhow!(
            "{dropped} document connections closed by the server while held"
        ));
    }
    eprintln!("bench docs: held {loaded} of {n} documents");
    Ok(())
}

/// `--load-ops`: writes a document of N single-character inserts, waits for the server to
/// unload it, then times a fresh connection until the whole text is there.
async fn load_phase(ctx: &Ctx<'_>, report: &mut DocsReport) -> anyhow::Result<()> {
    let args = ctx.args;
    let n = args.load_ops;
    let target = ctx.server.new_doc("load").await?;
    let writer_client = ctx.other_client(LOAD_WRITER);
    let writer = Doc::with_client_id(writer_client);
    let text = writer.get_or_insert_text(TEXT);
    let mut ws = join(ctx.dialer, 0, &target.url, &writer)
        .await
        .context("load writer")?;
    let mut done = 0u32;
    while done < n {
        let update = {
            let mut txn = writer.transact_mut();
            for _ in 0..LOAD_BATCH.min(n - done) {
                let len = text.len(&txn);
                let pos = fastrand::u32(0..=len.min(LOAD_WINDOW));
                text.insert(
                    &mut txn,
                    pos,
                    &((b'a' + (done % 26) as u8) as char).to_string(),
                );
                done += 1;
            }
            txn.encode_update_v1()
        };
        report.load_updates += 1;
        report.load_update_bytes += update.len() as u64;
        ws.send(Message::binary(sync_frame(SYNC_UPDATE, &update)))
            .await
            .context("sending the load document")?;
    }
    // The relay of the last update back to us means the server has integrated them all.
    await_echo(&mut ws, &writer, writer_client, n)
        .await
        .context("load writer")?;
    let _ = ws.close(None).await;
    drop(ws);
    eprintln!(
        "bench docs: wrote {n} ops in {} updates ({} bytes); waiting {:?} for the server to unload it",
        report.load_updates,
        report.load_update_bytes,
        args.unload_wait
    );
    tokio::time::sleep(args.unload_wait).await;

    let (load_ms, first) = timed_join(ctx, &target, LOAD_READER, n).await?;
    report.load_ms = Some(load_ms);
    // While `first` keeps it loaded, a second join shows what the load itself cost.
    let (join_ms, mut second) = timed_join(ctx, &target, LOAD_SECOND_READER, n).await?;
    report.join_ms = Some(join_ms);
    let _ = second.close(None).await;
    let mut first = first;
    let _ = first.close(None).await;
    Ok(())
}

/// Opens a fresh connection and measures, in ms, from the TCP connect until the frame that
/// completes the text (`chars` characters) arrived. The bench's own integration of that frame
/// is not counted.
async fn timed_join(
    ctx: &Ctx<'_>,
    target: &DocTarget,
    who: usize,
    chars: u32,
) -> anyhow::Result<(f64, Ws)> {
    let doc = Doc::with_client_id(ctx.other_client(who));
    let text = doc.get_or_insert_text(TEXT);
    let started = Instant::now();
    let (ws, arrived) = join_until(ctx.dialer, who, &target.url, &doc, |doc| {
        text.len(&doc.transact()) >= chars
    })
    .await
    .with_context(|| {
        format!(
            "waiting for {chars} characters, got {} (does the server persist the document?)",
            text.len(&doc.transact())
        )
    })?;
    Ok((round3((arrived - started).as_secs_f64() * 1000.0), ws))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::sync::{Message as YMessage, SyncMessage};
    use yrs::updates::encoder::Encode;

    #[test]
    fn varuints_round_trip() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u32::MAX as u64,
            1 << 52,
        ] {
            let mut out = Vec::new();
            write_varuint(&mut out, v);
            let mut buf = &out[..];
            assert_eq!(read_varuint(&mut buf), Some(v));
            assert!(buf.is_empty());
        }
        assert_eq!(read_varuint(&mut &[0x80u8][..]), None, "truncated");
    }

    #[test]
    fn frames_match_the_yrs_codec() {
        let update = vec![1, 2, 3, 4];
        for (subtype, msg) in [
            (SYNC_STEP2, SyncMessage::SyncStep2(update.clone())),
            (SYNC_UPDATE, SyncMessage::Update(update.clone())),
        ] {
            let theirs = YMessage::Sync(msg).encode_v1();
            assert_eq!(sync_frame(subtype, &update), theirs);
        }
        let sv = Doc::with_client_id(9).transact().state_vector();
        let theirs = YMessage::Sync(SyncMessage::SyncStep1(sv.clone())).encode_v1();
        assert_eq!(
            parse_frame(&theirs),
            Some(Frame::Step1(&sv.encode_v1()[..]))
        );
        assert_eq!(
            parse_frame(&sync_frame(SYNC_UPDATE, &update)),
            Some(Frame::Update(&update[..]))
        );
        assert_eq!(
            parse_frame(&sync_frame(SYNC_STEP2, &update)),
            Some(Frame::Step2(&update[..]))
        );
        // The server's heartbeat: an empty awareness update. Auth and unknown types too.
        assert_eq!(parse_frame(&[1, 1, 0]), Some(Frame::Other));
        assert_eq!(parse_frame(&[2, 1]), Some(Frame::Other));
        assert_eq!(parse_frame(&[9]), Some(Frame::Other));
        // Truncated or unknown sync messages are malformed.
        assert_eq!(parse_frame(&[0, 2, 5, 1]), None);
        assert_eq!(parse_frame(&[0, 7, 0]), None);
        assert_eq!(parse_frame(&[]), None);
    }

    /// An editor with its own doc that records each edit in `sends` like `editor_loop` does.
    struct TestEditor {
        i: usize,
        doc: Doc,
        clock: u32,
    }

    impl TestEditor {
        fn new(sends: &Sends, i: usize) -> Self {
            TestEditor {
                i,
                doc: Doc::with_client_id(sends.client_id(i)),
                clock: 0,
            }
        }

        fn edit(&mut self, sends: &Sends, s: &str, t: u64) -> Vec<u8> {
            let text = self.doc.get_or_insert_text(TEXT);
            let mut txn = self.doc.transact_mut();
            let len = text.len(&txn);
            text.insert(&mut txn, len / 2, s);
            self.clock += s.len() as u32;
            sends.sent(self.i, self.clock, t);
            txn.encode_update_v1()
        }
    }

    #[test]
    fn observer_times_merged_and_reordered_edits() {
        let sends = Sends::new(1000, 3);
        let mut a = TestEditor::new(&sends, 0);
        let mut b = TestEditor::new(&sends, 1);
        let a1 = a.edit(&sends, "x", 10);
        let a2 = a.edit(&sends, "yz", 20);
        let b1 = b.edit(&sends, "q", 30);
        let b2 = b.edit(&sends, "r", 40);
        let b3 = b.edit(&sends, "s", 50);
        let obs = Observer::new(1);
        let mut got = Vec::new();

        // Three edits of two clients merged into one update, as a server tick would send them.
        let merged = yrs::merge_updates_v1([&a1, &a2, &b1]).unwrap();
        obs.apply(&merged, &sends, |t| got.push(t)).unwrap();
        got.sort();
        assert_eq!(got, [10, 20, 30]);

        // b3 before b2: yrs holds b3 back, so only b2's arrival makes both visible.
        got.clear();
        obs.apply(&b3, &sends, |t| got.push(t)).unwrap();
        assert!(got.is_empty(), "{got:?}");
        obs.apply(&b2, &sends, |t| got.push(t)).unwrap();
        assert_eq!(got, [40, 50]);

        // Duplicates (a repeated step2, say) find nothing new.
        got.clear();
        obs.apply(&merged, &sends, |t| got.push(t)).unwrap();
        assert!(got.is_empty());
        assert_eq!(sends.outstanding(), 0);

        // Foreign clients (the seed, other runs) are ignored; the text has everything.
        let stranger = Doc::with_client_id(7);
        let st = stranger.get_or_insert_text(TEXT);
        let foreign = {
            let mut txn = stranger.transact_mut();
            st.insert(&mut txn, 0, "!");
            txn.encode_update_v1()
        };
        obs.apply(&foreign, &sends, |t| got.push(t)).unwrap();
        assert!(got.is_empty());
        let mut text: Vec<char> = obs.text().chars().collect();
        text.sort();
        assert_eq!(text.into_iter().collect::<String>(), "!qrsxyz");
    }

    #[test]
    fn observer_reports_only_what_arrived() {
        let sends = Sends::new(50, 1);
        let mut a = TestEditor::new(&sends, 0);
        let u1 = a.edit(&sends, "ab", 1);
        let _lost = a.edit(&sends, "c", 2);
        let obs = Observer::new(2);
        let mut got = Vec::new();
        obs.apply(&u1, &sends, |t| got.push(t)).unwrap();
        assert_eq!(got, [1]);
        assert_eq!(sends.outstanding(), 1);
        assert!(obs.apply(b"\xff\xff", &sends, |_| {}).is_err());
    }

    #[test]
    fn plan_spreads_editors_over_one_interval() {
        let begin = Instant::now();
        let p = Plan {
            begin,
            until: begin + Duration::from_secs(1),
            rate: 2.0,
            editors: 4,
            chars: 1,
        };
        assert_eq!(p.due(0, 0), begin);
        assert_eq!(p.due(1, 0), begin + Duration::from_millis(125));
        assert_eq!(p.due(2, 3), begin + Duration::from_millis(1750));
    }

    #[test]
    fn websocket_origin_from_base_url() {
        assert_eq!(
            ws_origin("http://127.0.0.1:8000").unwrap(),
            "ws://127.0.0.1:8000"
        );
        assert_eq!(ws_origin("http://h/api/").unwrap(), "ws://h");
        assert!(ws_origin("https://h").is_err());
        assert!(ws_origin("nope").is_err());
    }
}
