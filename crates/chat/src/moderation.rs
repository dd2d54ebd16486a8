//! The moderation pipeline: every committed message is checked off the hot path, and
//! violations are flagged for review or removed. Also the moderator actions (remove,
//! restore, mute, ban, flags), each written to the audit log.
//!
//! ## Where it hooks in
//! The chat writer ([`crate::writer`]) commits a batch, broadcasts it, and then offers each
//! new message (and each edit) to a `Queue`: a non-blocking `try_reserve` on a bounded
//! channel of [`ModerationConfig::queue`] items. One task (`Pipeline::run`) takes what is
//! waiting (up to [`BATCH`] at a time), runs the checks on the blocking pool (the filter is
//! CPU work that must not stall the runtime's workers), then:
//! - **remove**: submits a `removed` event to the writer, like any other event, so it takes
//!   the room's next offset and is broadcast in offset order; members receive it as a
//!   publication with data `{"type": "removed", ...}`, and history shows the message removed
//!   with its text withheld. The actor is [`SYSTEM_USER`]; the audit entry has no actor.
//! - **flag**: stores one flag per check that fired (one transaction per batch), for
//!   moderators to list and settle.
//!
//! ## Overflow policy
//! Moderation never delays delivery. The writer never waits for moderation: when the queue
//! is full the check is dropped (the message stays up, unchecked) and counted in
//! [`ModerationMetrics::dropped`] (`switchboard_moderation_dropped_total`), with a warning at
//! each power of two. Moderation waits for the writer like any sender, so a removal is never
//! lost to a busy writer. Removals are submitted one at a time, each waiting for its commit,
//! so at most one is queued in the writer: message batches keep flowing between them, and a
//! flood of violations backs up into the moderation queue (and its drop counter), not into
//! sends. Likewise the checks of one batch run on one blocking thread: the filter costs about
//! 10-40 µs of CPU per message in a release build, so past roughly 25-100k messages per
//! second per core the surplus is dropped rather than queued. Latency from commit to
//! decision (to the removal's broadcast, for a removal) goes to
//! [`ModerationMetrics::seconds`].
//!
//! ## Checks
//! | check | fires when | default |
//! |---|---|---|
//! | `profanity` | the `rustrict` filter rates the text at `profanity_level` or worse | remove |
//! | `words` | the text contains a configured word or phrase (whole words, any case) | remove |
//! | `repeat` | a user sends the same text (case and spacing ignored) more than `repeat_max` times within `repeat_window` | flag |
//! | `links` | a message has more than `links_max` links | flag |
//! | `burst` | a user sends more than `burst_max` messages within `burst_window` | flag |
//!
//! Each check's action is `off`, `flag` or `remove`; when several fire, the strongest wins.
//! With `flag`, `repeat` and `burst` flag at most once per user and window (a burst is one
//! flag, not hundreds); with `remove`, every message over the limit goes. Edits are checked
//! for content (`profanity`, `words`, `links`), not for rate. The spam state (recent send
//! times and text hashes per user) is per node, in memory and bounded; it is keyed on the
//! messages' `created_at`, so the checks are deterministic.
//!
//! Why `rustrict`: a maintained, pure-Rust filter (no regex, one O(n) trie pass) that
//! resists the usual evasions (spacing, repeated and look-alike characters, self-censoring)
//! and knows two-word false positives ("push it", "assassin"); only its `censor` feature is
//! built. The `censor` crate is a plain word list without those defences. One change to its
//! defaults (`replacements()`): digits are read as digits, not as leetspeak letters, which
//! in chat turned room numbers, ids and years into slurs or innuendo ("n34", "1994 s"); the
//! common digit spellings ("sh1t", "f4ck") are in its word list and are still caught.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus::{HistogramOpts, HistogramVec, IntCounter};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use switchboard_store::{
    Ban, EventKind, Flag, FlagQuery, FlagResolution, Member, MemberRole, Message, NewAudit, NewBan,
    NewEvent, NewFlag, Store, StoreError,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::writer::Job;
use crate::{Chat, ChatError};

/// The actor of automatic removals in the room's stream (no user has id 0).
pub const SYSTEM_USER: i64 = 0;
/// Messages the pipeline takes from its queue at a time.
pub const BATCH: usize = 256;
/// Recent texts remembered per user for `repeat` (older ones fall out first).
const TEXTS_PER_USER: usize = 64;
/// Users whose spam state is kept before idle ones are swept.
const USERS_MAX: usize = 100_000;

/// What a check does when it fires. Ordered: the strongest action wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Off,
    /// Store a flag for moderators to review; the message stays up.
    Flag,
    /// Remove the message (a `removed` event in the room's stream).
    Remove,
}

/// The least severe profanity the filter acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Also mild words ("crap", "damn").
    Mild,
    Moderate,
    Severe,
}

/// A check of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Check {
    Profanity,
    Words,
    Repeat,
    Links,
    Burst,
}

impl Check {
    /// The name stored as a flag's `reason` and in event and audit details.
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Profanity => "profanity",
            Check::Words => "words",
            Check::Repeat => "repeat",
            Check::Links => "links",
            Check::Burst => "burst",
        }
    }
}

/// One check that fired on one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub check: Check,
    pub action: Action,
    /// What matched (a word, a count), stored with the flag.
    pub detail: Value,
}

/// Handles to the pipeline's metrics. The server registers them; the defaults are
/// unregistered (for tests and embedders without a registry).
#[derive(Clone)]
pub struct ModerationMetrics {
    /// Seconds from commit to decision, by `outcome`: `pass`, `flag` or `remove` (for a
    /// removal, until its event was committed and broadcast).
    pub seconds: HistogramVec,
    /// Checks dropped because the queue was full.
    pub dropped: IntCounter,
}

impl ModerationMetrics {
    /// `switchboard_moderation_seconds{outcome}` and `switchboard_moderation_dropped_total`.
    pub fn new() -> ModerationMetrics {
        ModerationMetrics {
            seconds: HistogramVec::new(
                HistogramOpts::new(
                    "switchboard_moderation_seconds",
                    "Moderation latency from commit to decision, by outcome",
                )
                .buckets(vec![
                    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
                &["outcome"],
            )
            .expect("valid metric"),
            dropped: IntCounter::new(
                "switchboard_moderation_dropped_total",
                "Moderation checks dropped because the queue was full",
            )
            .expect("valid metric"),
        }
    }
}

impl Default for ModerationMetrics {
    fn default() -> Self {
        ModerationMetrics::new()
    }
}

impl std::fmt::Debug for ModerationMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModerationMetrics")
            .field("dropped", &self.dropped.get())
            .finish_non_exhaustive()
    }
}

/// The pipeline's settings (the server's `[moderation]` section).
#[derive(Debug, Clone)]
pub struct ModerationConfig {
    /// Run the pipeline at all. Moderator actions work either way.
    pub enabled: bool,
    /// Messages waiting to be checked; beyond, checks are dropped (see the module docs).
    pub queue: usize,
    pub profanity: Action,
    pub profanity_level: Level,
    /// Words and phrases matched as whole words, ignoring case and punctuation.
    pub words: Vec<String>,
    pub words_action: Action,
    pub repeat: Action,
    /// Times one text may be sent per `repeat_window`.
    pub repeat_max: u32,
    pub repeat_window: Duration,
    pub links: Action,
    /// Links one message may carry.
    pub links_max: u32,
    pub burst: Action,
    /// Messages a user may send per `burst_window`.
    pub burst_max: u32,
    pub burst_window: Duration,
    pub metrics: ModerationMetrics,
}

impl Default for ModerationConfig {
    fn default() -> Self {
        ModerationConfig {
            enabled: true,
            queue: 4096,
            profanity: Action::Remove,
            profanity_level: Level::Moderate,
            words: Vec::new(),
            words_action: Action::Remove,
            repeat: Action::Flag,
            repeat_max: 3,
            repeat_window: Duration::from_secs(60),
            links: Action::Flag,
            links_max: 5,
            burst: Action::Flag,
            burst_max: 10,
            burst_window: Duration::from_secs(1),
            metrics: ModerationMetrics::default(),
        }
    }
}

// ----- the checks (no I/O) -----

/// A user's recent activity, for the rate checks. Times are `created_at` milliseconds.
#[derive(Default)]
struct Recent {
    /// Send times within the burst window, at most `burst_max + 1`.
    sends: VecDeque<i64>,
    /// (time, text hash) within the repeat window, at most [`TEXTS_PER_USER`].
    texts: VecDeque<(i64, u64)>,
    /// When this user was last flagged for repeat / burst.
    flagged_repeat: Option<i64>,
    flagged_burst: Option<i64>,
    last: i64,
}

/// The checks with their state. Plain data: the pipeline runs it on the blocking pool.
pub struct Checker {
    config: ModerationConfig,
    threshold: rustrict::Type,
    /// Configured words, normalized and padded with spaces (`" word "`).
    words: Vec<String>,
    users: HashMap<i64, Recent>,
    swept: i64,
}

/// Lower case, every run of non-alphanumeric characters as one space, padded with spaces:
/// `" hello big world "`. A phrase matches as whole words by substring on this form.
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push(' ');
    for c in text.chars().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() {
            out.push(c);
        } else if !out.ends_with(' ') {
            out.push(' ');
        }
    }
    if !out.ends_with(' ') {
        out.push(' ');
    }
    out
}

fn text_hash(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    for word in text.split_whitespace() {
        for c in word.chars().flat_map(char::to_lowercase) {
            c.hash(&mut h);
        }
        ' '.hash(&mut h);
    }
    h.finish()
}

fn count_links(text: &str) -> usize {
    text.split_whitespace()
        .filter(|t| {
            let t = t.to_ascii_lowercase();
            t.contains("http://") || t.contains("https://") || t.starts_with("www.")
        })
        .count()
}

/// rustrict's character replacements without digit-to-letter readings (see the module docs).
/// Built once; `Censor::with_replacements` wants a `'static`.
fn replacements() -> &'static rustrict::Replacements {
    static REPLACEMENTS: OnceLock<rustrict::Replacements> = OnceLock::new();
    REPLACEMENTS.get_or_init(|| {
        let mut r = rustrict::Replacements::default();
        for digit in '0'..='9' {
            for letter in ('a'..='z').chain('A'..='Z') {
                r.remove(digit, letter);
            }
        }
        r
    })
}

/// The filter's rating of `text`.
fn rate(text: &str) -> rustrict::Type {
    rustrict::Censor::from_str(text)
        .with_replacements(replacements())
        .analyze()
}

fn window_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Checker {
    pub fn new(config: ModerationConfig) -> Checker {
        use rustrict::Type;
        let level = match config.profanity_level {
            Level::Mild => Type::MILD_OR_HIGHER,
            Level::Moderate => Type::MODERATE_OR_HIGHER,
            Level::Severe => Type::SEVERE,
        };
        let words = config
            .words
            .iter()
            .map(|w| normalize(w))
            .filter(|w| !w.trim().is_empty())
            .collect();
        Checker {
            threshold: Type::INAPPROPRIATE & level,
            words,
            config,
            users: HashMap::new(),
            swept: i64::MIN,
        }
    }

    /// Builds the filter's tables now (they are built on first use), so the first message
    /// checked is not the slow one.
    pub fn warm_up(&self) {
        let _ = rate("warm up");
    }

    /// Every check that fires on `m`. `edit`: the text of an edit, checked for content only.
    pub fn check(&mut self, m: &Message, edit: bool) -> Vec<Violation> {
        let c = &self.config;
        let mut out = Vec::new();
        if c.profanity != Action::Off {
            let found = rate(&m.text);
            if found.is(self.threshold) {
                out.push(Violation {
                    check: Check::Profanity,
                    action: c.profanity,
                    detail: json!({"rating": format!("{found:?}")}),
                });
            }
        }
        if c.words_action != Action::Off && !self.words.is_empty() {
            let text = normalize(&m.text);
            if let Some(w) = self.words.iter().find(|w| text.contains(w.as_str())) {
                out.push(Violation {
                    check: Check::Words,
                    action: c.words_action,
                    detail: json!({"word": w.trim()}),
                });
            }
        }
        if c.links != Action::Off {
            let n = count_links(&m.text);
            if n > c.links_max as usize {
                out.push(Violation {
                    check: Check::Links,
                    action: c.links,
                    detail: json!({"links": n, "max": c.links_max}),
                });
            }
        }
        if !edit {
            self.rate_checks(m, &mut out);
        }
        out
    }

    fn rate_checks(&mut self, m: &Message, out: &mut Vec<Violation>) {
        if self.config.repeat == Action::Off && self.config.burst == Action::Off {
            return;
        }
        let now = m.created_at;
        self.sweep(now);
        let c = &self.config;
        let repeat_ms = window_ms(c.repeat_window);
        let burst_ms = window_ms(c.burst_window);
        let r = self.users.entry(m.user_id).or_default();
        r.last = r.last.max(now);

        if c.repeat != Action::Off && repeat_ms > 0 {
            while r.texts.front().is_some_and(|(t, _)| now - t >= repeat_ms) {
                r.texts.pop_front();
            }
            let h = text_hash(&m.text);
            let count = 1 + r.texts.iter().filter(|(_, x)| *x == h).count();
            if r.texts.len() == TEXTS_PER_USER {
                r.texts.pop_front();
            }
            r.texts.push_back((now, h));
            if count > c.repeat_max as usize
                && fresh(&mut r.flagged_repeat, c.repeat, now, repeat_ms)
            {
                out.push(Violation {
                    check: Check::Repeat,
                    action: c.repeat,
                    detail: json!({"count": count, "window_ms": repeat_ms}),
                });
            }
        }
        if c.burst != Action::Off && burst_ms > 0 {
            while r.sends.front().is_some_and(|t| now - t >= burst_ms) {
                r.sends.pop_front();
            }
            r.sends.push_back(now);
            let count = r.sends.len();
            while r.sends.len() > c.burst_max as usize + 1 {
                r.sends.pop_front();
            }
            if count > c.burst_max as usize && fresh(&mut r.flagged_burst, c.burst, now, burst_ms) {
                out.push(Violation {
                    check: Check::Burst,
                    action: c.burst,
                    detail: json!({"count": count, "window_ms": burst_ms}),
                });
            }
        }
    }

    /// Forgets users idle for longer than both windows, at most once per longest window,
    /// when more than [`USERS_MAX`] are remembered.
    fn sweep(&mut self, now: i64) {
        if self.users.len() < USERS_MAX {
            return;
        }
        let keep = window_ms(self.config.repeat_window).max(window_ms(self.config.burst_window));
        if now.saturating_sub(self.swept) < keep {
            return;
        }
        self.swept = now;
        self.users.retain(|_, r| now.saturating_sub(r.last) < keep);
    }

    /// Users whose spam state is remembered.
    pub fn users(&self) -> usize {
        self.users.len()
    }
}

/// Whether a rate violation should be reported: always for `remove`; for `flag`, once per
/// user and window.
fn fresh(last: &mut Option<i64>, action: Action, now: i64, window: i64) -> bool {
    if action == Action::Flag && last.is_some_and(|t| now - t < window) {
        return false;
    }
    *last = Some(now);
    true
}

/// The strongest action among `violations` (`Off` for none).
pub fn decide(violations: &[Violation]) -> Action {
    violations
        .iter()
        .map(|v| v.action)
        .max()
        .unwrap_or(Action::Off)
}

// ----- the pipeline -----

/// A committed message waiting to be checked.
pub(crate) struct Item {
    message: Message,
    committed: Instant,
    edit: bool,
}

/// The writer's end of the moderation queue. Never blocks (see the module docs).
pub(crate) struct Queue {
    tx: mpsc::Sender<Item>,
    dropped: IntCounter,
}

impl Queue {
    /// Hands `message` to the pipeline, or drops the check and counts it if the queue is full.
    pub(crate) fn offer(&self, message: &Message, committed: Instant, edit: bool) {
        match self.tx.try_reserve() {
            Ok(permit) => permit.send(Item {
                message: message.clone(),
                committed,
                edit,
            }),
            Err(mpsc::error::TrySendError::Full(())) => {
                self.dropped.inc();
                let n = self.dropped.get();
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "moderation queue full: checks dropped");
                }
            }
            Err(mpsc::error::TrySendError::Closed(())) => {}
        }
    }
}

/// The moderation task's state.
pub(crate) struct Pipeline {
    config: ModerationConfig,
    store: Arc<dyn Store>,
    writer: mpsc::Sender<Job>,
    rx: mpsc::Receiver<Item>,
}

/// The queue for the writer and the task to spawn.
pub(crate) fn start(
    config: &ModerationConfig,
    store: Arc<dyn Store>,
    writer: mpsc::Sender<Job>,
) -> (Queue, Pipeline) {
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    let queue = Queue {
        tx,
        dropped: config.metrics.dropped.clone(),
    };
    let pipeline = Pipeline {
        config: config.clone(),
        store,
        writer,
        rx,
    };
    (queue, pipeline)
}

impl Pipeline {
    /// Checks queued messages until `shutdown`; what is still queued then goes unchecked.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let checker = Checker::new(self.config.clone());
        let warm = tokio::task::spawn_blocking(move || {
            checker.warm_up();
            checker
        });
        let mut checker = match warm.await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "moderation: filter failed to start");
                return;
            }
        };
        let mut buf = Vec::with_capacity(BATCH);
        loop {
            let n = tokio::select! {
                n = self.rx.recv_many(&mut buf, BATCH) => n,
                _ = shutdown.cancelled() => break,
            };
            if n == 0 {
                break;
            }
            let items = std::mem::take(&mut buf);
            let mut c = checker
                .take()
                .unwrap_or_else(|| Checker::new(self.config.clone()));
            let checked = tokio::task::spawn_blocking(move || {
                let out: Vec<(Item, Vec<Violation>)> = items
                    .into_iter()
                    .map(|it| {
                        let v = c.check(&it.message, it.edit);
                        (it, v)
                    })
                    .collect();
                (c, out)
            })
            .await;
            match checked {
                Ok((c, decided)) => {
                    checker = Some(c);
                    self.apply(decided).await;
                }
                // A panic in the filter loses this batch's checks and the spam state, not
                // the pipeline: the next batch starts a fresh checker.
                Err(e) => tracing::error!(error = %e, "moderation: checks failed"),
            }
        }
        tracing::debug!("moderation pipeline stopped");
    }

    async fn apply(&self, decided: Vec<(Item, Vec<Violation>)>) {
        let seconds = &self.config.metrics.seconds;
        let mut flags = Vec::new();
        let mut flagged = Vec::new();
        let mut removals = Vec::new();
        for (item, violations) in decided {
            match decide(&violations) {
                Action::Off => seconds
                    .with_label_values(&["pass"])
                    .observe(item.committed.elapsed().as_secs_f64()),
                Action::Flag => {
                    let m = &item.message;
                    flags.extend(violations.into_iter().map(|v| NewFlag {
                        message_id: m.id,
                        room_id: m.room_id,
                        user_id: m.user_id,
                        reason: v.check.as_str().to_owned(),
                        detail: v.detail,
                    }));
                    flagged.push(item.committed);
                }
                Action::Remove => removals.push((item, violations)),
            }
        }
        // Removals first: they are what members see.
        for (item, violations) in removals {
            if self.remove(&item.message, &violations).await {
                seconds
                    .with_label_values(&["remove"])
                    .observe(item.committed.elapsed().as_secs_f64());
            }
        }
        if !flags.is_empty() {
            match self.store.add_flags(flags).await {
                Ok(_) => {
                    for committed in flagged {
                        seconds
                            .with_label_values(&["flag"])
                            .observe(committed.elapsed().as_secs_f64());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "moderation: storing flags failed"),
            }
        }
    }

    /// Removes `m` through the writer and audits it; true if it was removed.
    async fn remove(&self, m: &Message, violations: &[Violation]) -> bool {
        let checks: Vec<&str> = violations.iter().map(|v| v.check.as_str()).collect();
        let (tx, rx) = oneshot::channel();
        let event = NewEvent {
            room_id: m.room_id,
            message_id: m.id,
            user_id: SYSTEM_USER,
            kind: EventKind::Removed,
            text: None,
            data: json!({"reason": checks[0], "checks": checks, "auto": true}),
        };
        if self.writer.send(Job::Event(event, tx)).await.is_err() {
            return false; // the writer stopped: shutting down
        }
        match rx.await {
            Ok(Ok(_)) => {}
            // Removed or restored by a person meanwhile: theirs is the last word.
            Ok(Err(StoreError::Conflict(_) | StoreError::NotFound)) => return false,
            Ok(Err(e)) => {
                tracing::warn!(message = m.id, error = %e, "moderation: removal failed");
                return false;
            }
            Err(_) => return false,
        }
        tracing::debug!(
            message = m.id,
            room = m.room_id,
            ?checks,
            "moderation: removed"
        );
        let audit = NewAudit {
            actor_user_id: None,
            action: "message_removed".into(),
            target: format!("message:{}", m.id),
            detail: json!({"room_id": m.room_id, "user_id": m.user_id, "checks": checks, "auto": true}),
        };
        if let Err(e) = self.store.append_audit(audit).await {
            tracing::warn!(message = m.id, error = %e, "moderation: audit failed");
        }
        true
    }
}

// ----- moderator actions -----

/// Who acts: a user, and whether they are an `admin` (who may moderate every room).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moderator {
    pub user_id: i64,
    pub admin: bool,
}

fn now_ms() -> i64 {
    switchboard_store::now_ms()
}

impl Chat {
    /// `Ok` if `by` may moderate the room: an admin, or the room's owner or a moderator.
    /// `NotFound` for a room that does not exist, `Forbidden` for anyone else.
    pub async fn require_moderator(&self, by: Moderator, room_id: i64) -> Result<(), ChatError> {
        let store = self.store();
        if !by.admin {
            if let Some(m) = store.member(room_id, by.user_id).await? {
                return match m.role {
                    MemberRole::Owner | MemberRole::Moderator => Ok(()),
                    MemberRole::Member => Err(ChatError::Forbidden),
                };
            }
        }
        match store.room(room_id).await? {
            Some(_) if by.admin => Ok(()),
            Some(_) => Err(ChatError::Forbidden),
            None => Err(ChatError::NotFound),
        }
    }

    async fn audit(
        &self,
        by: Moderator,
        action: &str,
        target: String,
        detail: Value,
    ) -> Result<(), ChatError> {
        let entry = NewAudit {
            actor_user_id: Some(by.user_id),
            action: action.into(),
            target,
            detail,
        };
        self.store().append_audit(entry).await?;
        Ok(())
    }

    /// Removes (`EventKind::Removed`) or restores (`EventKind::Restored`) a message: an event
    /// under the room's next offset, broadcast to the room. Settles the message's open flags
    /// and writes `message_removed` / `message_restored` to the audit log. `Conflict` if the
    /// message is already in that state.
    pub async fn moderate_message(
        &self,
        by: Moderator,
        message_id: i64,
        kind: EventKind,
        reason: Option<String>,
    ) -> Result<Message, ChatError> {
        let (resolution, action) = match kind {
            EventKind::Removed => (FlagResolution::Removed, "message_removed"),
            EventKind::Restored => (FlagResolution::Restored, "message_restored"),
            other => return Err(ChatError::Invalid(format!("{other} is not a moderation"))),
        };
        let store = self.store();
        let msg = store
            .message(message_id)
            .await?
            .ok_or(ChatError::NotFound)?;
        self.require_moderator(by, msg.room_id).await?;
        let event = self
            .append_event(NewEvent {
                room_id: msg.room_id,
                message_id,
                user_id: by.user_id,
                kind,
                text: None,
                data: json!({"reason": reason, "auto": false}),
            })
            .await?;
        store
            .resolve_message_flags(message_id, Some(by.user_id), resolution)
            .await?;
        let detail = json!({"room_id": msg.room_id, "user_id": msg.user_id, "reason": reason, "auto": false});
        self.audit(by, action, format!("message:{message_id}"), detail)
            .await?;
        event.message.ok_or(ChatError::NotFound)
    }

    /// Mutes a member of a room until `until` (ms since the Unix epoch), or unmutes with
    /// `None`. Only an admin may mute the room's owner. Audited as `user_muted` /
    /// `user_unmuted`.
    pub async fn mute(
        &self,
        by: Moderator,
        room_id: i64,
        user_id: i64,
        until: Option<i64>,
    ) -> Result<Member, ChatError> {
        self.require_moderator(by, room_id).await?;
        if until.is_some_and(|t| t <= now_ms()) {
            return Err(ChatError::Invalid(
                "until must be in the future (null unmutes)".into(),
            ));
        }
        let store = self.store();
        let target = store
            .member(room_id, user_id)
            .await?
            .ok_or(ChatError::NotFound)?;
        if target.role == MemberRole::Owner && !by.admin {
            return Err(ChatError::Forbidden);
        }
        let member = store.set_member_muted(room_id, user_id, until).await?;
        let action = if until.is_some() {
            "user_muted"
        } else {
            "user_unmuted"
        };
        let detail = json!({"user_id": user_id, "until": until});
        self.audit(by, action, format!("room:{room_id}"), detail)
            .await?;
        Ok(member)
    }

    /// Bans a user from sending anywhere until `until` (`None`: until lifted). Admins only;
    /// not oneself. Audited as `user_banned`.
    pub async fn ban(
        &self,
        by: Moderator,
        user_id: i64,
        until: Option<i64>,
        reason: String,
    ) -> Result<Ban, ChatError> {
        if !by.admin {
            return Err(ChatError::Forbidden);
        }
        if user_id == by.user_id {
            return Err(ChatError::Invalid("you cannot ban yourself".into()));
        }
        if until.is_some_and(|t| t <= now_ms()) {
            return Err(ChatError::Invalid("until must be in the future".into()));
        }
        let ban = NewBan {
            until,
            reason: reason.clone(),
            created_by: Some(by.user_id),
        };
        let ban = self.store().set_ban(user_id, ban).await?;
        let detail = json!({"until": until, "reason": reason});
        self.audit(by, "user_banned", format!("user:{user_id}"), detail)
            .await?;
        Ok(ban)
    }

    /// Lifts a user's ban. Admins only. `NotFound` if there is none. Audited as
    /// `user_unbanned`.
    pub async fn unban(&self, by: Moderator, user_id: i64) -> Result<(), ChatError> {
        if !by.admin {
            return Err(ChatError::Forbidden);
        }
        if !self.store().lift_ban(user_id).await? {
            return Err(ChatError::NotFound);
        }
        self.audit(by, "user_unbanned", format!("user:{user_id}"), json!({}))
            .await
    }

    /// Flags, newest first: one room's (its moderators, or an admin), or every room's
    /// (admins only).
    pub async fn flags(&self, by: Moderator, query: FlagQuery) -> Result<Vec<Flag>, ChatError> {
        match query.room_id {
            Some(room) => self.require_moderator(by, room).await?,
            None if by.admin => {}
            None => return Err(ChatError::Forbidden),
        }
        Ok(self.store().flags(query).await?)
    }

    /// Dismisses a flag: the message stays as it is. Audited as `flag_dismissed`.
    pub async fn dismiss_flag(&self, by: Moderator, flag_id: i64) -> Result<Flag, ChatError> {
        let store = self.store();
        let flag = store.flag(flag_id).await?.ok_or(ChatError::NotFound)?;
        self.require_moderator(by, flag.room_id).await?;
        let flag = store
            .resolve_flag(flag_id, Some(by.user_id), FlagResolution::Dismissed)
            .await?;
        let detail =
            json!({"room_id": flag.room_id, "message_id": flag.message_id, "reason": flag.reason});
        self.audit(by, "flag_dismissed", format!("flag:{flag_id}"), detail)
            .await?;
        Ok(flag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModerationConfig {
        ModerationConfig::default()
    }

    fn msg(user_id: i64, at: i64, text: &str) -> Message {
        Message {
            id: at,
            room_id: 1,
            offset: 1,
            user_id,
            client_msg_id: None,
            text: text.into(),
            reply_to: None,
            created_at: at,
            edited_at: None,
            deleted: false,
            removed: false,
        }
    }

    fn checks(c: &mut Checker, m: &Message) -> Vec<Check> {
        c.check(m, false).iter().map(|v| v.check).collect()
    }

    #[test]
    fn profanity_is_caught_at_the_configured_level() {
        let mut c = Checker::new(config());
        assert_eq!(
            checks(&mut c, &msg(1, 0, "what the fuck")),
            [Check::Profanity]
        );
        assert_eq!(
            checks(&mut c, &msg(2, 0, "f u c k this")),
            [Check::Profanity]
        );
        assert!(checks(&mut c, &msg(3, 0, "hello, how are you?")).is_empty());
        assert!(checks(&mut c, &msg(4, 0, "an assassin in the class")).is_empty());
        assert!(checks(&mut c, &msg(5, 0, "'; DROP TABLE x;--<b>")).is_empty());
        // Digits are digits: ids, room numbers and years are not leetspeak.
        for clean in ["n34", "order #n199", "the 1994 season", "hello 69"] {
            assert!(checks(&mut c, &msg(7, 0, clean)).is_empty(), "{clean}");
        }
        for (i, bad) in ["sh1t", "f4ck", "what the f*ck"].iter().enumerate() {
            assert_eq!(
                checks(&mut c, &msg(8 + i as i64, 0, bad)),
                [Check::Profanity],
                "{bad}"
            );
        }
        // Mild words pass at the default level and are caught at `mild`.
        assert!(checks(&mut c, &msg(6, 0, "oh crap")).is_empty());
        let mut mild = Checker::new(ModerationConfig {
            profanity_level: Level::Mild,
            ..config()
        });
        assert_eq!(checks(&mut mild, &msg(6, 0, "oh crap")), [Check::Profanity]);
        let mut off = Checker::new(ModerationConfig {
            profanity: Action::Off,
            ..config()
        });
        assert!(checks(&mut off, &msg(1, 0, "what the fuck")).is_empty());
        let v = Checker::new(config()).check(&msg(1, 0, "fuck"), false);
        assert_eq!(v[0].action, Action::Remove, "profanity removes by default");
    }

    #[test]
    fn word_list_matches_whole_words_and_phrases_in_any_case() {
        let mut c = Checker::new(ModerationConfig {
            words: vec!["Kiwi".into(), "buy now".into(), "  ".into()],
            words_action: Action::Flag,
            ..config()
        });
        let v = c.check(&msg(1, 0, "I love KIWI!"), false);
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].check, v[0].action), (Check::Words, Action::Flag));
        assert_eq!(v[0].detail, json!({"word": "kiwi"}));
        assert_eq!(checks(&mut c, &msg(2, 0, "BUY... now!")), [Check::Words]);
        assert!(checks(&mut c, &msg(3, 0, "kiwis and buying")).is_empty());
        assert!(checks(&mut c, &msg(4, 0, "nothing here")).is_empty());
    }

    #[test]
    fn link_floods_are_counted_per_message() {
        let mut c = Checker::new(ModerationConfig {
            links_max: 2,
            ..config()
        });
        assert!(checks(
            &mut c,
            &msg(1, 0, "see https://a.example and www.b.example")
        )
        .is_empty());
        let v = c.check(
            &msg(2, 0, "http://a https://b HTTPS://c www.d.example"),
            false,
        );
        assert_eq!(v[0].check, Check::Links);
        assert_eq!(v[0].action, Action::Flag, "spam flags by default");
        assert_eq!(v[0].detail["links"], 4);
    }

    #[test]
    fn repeats_beyond_the_limit_within_the_window() {
        let mut c = Checker::new(ModerationConfig {
            repeat_max: 2,
            repeat_window: Duration::from_secs(10),
            repeat: Action::Remove,
            ..config()
        });
        assert!(checks(&mut c, &msg(1, 0, "Buy my stuff")).is_empty());
        assert!(checks(&mut c, &msg(1, 1_000, "buy   my STUFF")).is_empty());
        // Other users and other texts do not count.
        assert!(checks(&mut c, &msg(2, 1_500, "buy my stuff")).is_empty());
        assert!(checks(&mut c, &msg(1, 1_600, "something else")).is_empty());
        assert_eq!(
            checks(&mut c, &msg(1, 2_000, "buy my stuff")),
            [Check::Repeat]
        );
        // With `remove`, every message over the limit goes.
        assert_eq!(
            checks(&mut c, &msg(1, 2_100, "buy my stuff")),
            [Check::Repeat]
        );
        // After the window, the count starts again.
        assert!(checks(&mut c, &msg(1, 20_000, "buy my stuff")).is_empty());
    }

    #[test]
    fn bursts_flag_once_per_window() {
        let mut c = Checker::new(ModerationConfig {
            burst_max: 3,
            burst_window: Duration::from_secs(1),
            ..config()
        });
        for i in 0..3 {
            assert!(checks(&mut c, &msg(1, i * 10, &format!("m{i}"))).is_empty());
        }
        let v = c.check(&msg(1, 30, "m3"), false);
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].check, v[0].action), (Check::Burst, Action::Flag));
        assert_eq!(v[0].detail["count"], 4);
        // Still bursting within the window: already flagged.
        assert!(checks(&mut c, &msg(1, 40, "m4")).is_empty());
        // Another user is not affected.
        assert!(checks(&mut c, &msg(2, 40, "hi")).is_empty());
        // A calm second later, back to normal; a new burst is flagged again.
        assert!(checks(&mut c, &msg(1, 2_000, "calm")).is_empty());
        for i in 0..2 {
            assert!(checks(&mut c, &msg(1, 2_100 + i, &format!("a{i}"))).is_empty());
        }
        assert_eq!(checks(&mut c, &msg(1, 2_200, "again!")), [Check::Burst]);
    }

    #[test]
    fn edits_are_checked_for_content_only() {
        let mut c = Checker::new(ModerationConfig {
            burst_max: 1,
            repeat_max: 1,
            ..config()
        });
        for i in 0..5 {
            assert!(c.check(&msg(1, i, "same"), true).is_empty());
        }
        assert_eq!(c.users(), 0, "edits leave no rate state");
        let v = c.check(&msg(1, 10, "fuck"), true);
        assert_eq!(v[0].check, Check::Profanity);
    }

    #[test]
    fn the_strongest_action_wins() {
        let v = |check, action| Violation {
            check,
            action,
            detail: Value::Null,
        };
        assert_eq!(decide(&[]), Action::Off);
        assert_eq!(decide(&[v(Check::Burst, Action::Flag)]), Action::Flag);
        assert_eq!(
            decide(&[
                v(Check::Burst, Action::Flag),
                v(Check::Profanity, Action::Remove)
            ]),
            Action::Remove
        );
        let mut c = Checker::new(ModerationConfig {
            burst_max: 0,
            ..config()
        });
        let found = c.check(&msg(1, 0, "fuck"), false);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(decide(&found), Action::Remove);
    }

    #[test]
    fn spam_state_is_bounded() {
        let mut c = Checker::new(ModerationConfig {
            repeat_window: Duration::from_secs(1),
            burst_window: Duration::from_secs(1),
            ..config()
        });
        for u in 0..USERS_MAX as i64 {
            c.check(&msg(u, 0, "hi"), false);
        }
        assert_eq!(c.users(), USERS_MAX);
        // Past the windows, the next message sweeps the idle users.
        c.check(&msg(-1, 5_000, "hi"), false);
        assert_eq!(c.users(), 1);
        // Per user: at most TEXTS_PER_USER texts and burst_max + 1 send times.
        for i in 0..1000 {
            c.check(&msg(7, 6_000 + i, &format!("t{i}")), false);
        }
        let r = &c.users[&7];
        assert!(r.texts.len() <= TEXTS_PER_USER);
        assert!(r.sends.len() <= c.config.burst_max as usize + 1);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let (tx, mut rx) = mpsc::channel(2);
        let dropped = IntCounter::new("d", "d").unwrap();
        let q = Queue {
            tx,
            dropped: dropped.clone(),
        };
        let m = msg(1, 0, "x");
        for _ in 0..5 {
            q.offer(&m, Instant::now(), false);
        }
        assert_eq!(dropped.get(), 3);
        assert!(rx.recv().await.is_some());
        q.offer(&m, Instant::now(), false);
        assert_eq!(dropped.get(), 3, "room again after one was taken");
        drop(rx);
        q.offer(&m, Instant::now(), false);
        assert_eq!(dropped.get(), 3, "a stopped pipeline is not an overflow");
    }

    /// The whole pipeline over a real store and the chat writer: a profane message is
    /// removed through the writer (an event under the next offset), a burst is flagged once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removes_and_flags_through_the_writer() {
        use crate::{ChatConfig, Send};
        use switchboard_hub::{Broker, MemoryBroker};
        use switchboard_store::testing::TestDatabase;
        use switchboard_store::{NewRoom, NewUser, RoomKind, UserRole};
        use tokio_util::task::TaskTracker;

        let db = TestDatabase::sqlite();
        let store = db.open().await;
        let user = store
            .create_user(NewUser {
                username: "p".into(),
                password_hash: String::new(),
                display_name: "p".into(),
                role: UserRole::User,
            })
            .await
            .unwrap();
        let room = store
            .create_room(NewRoom {
                kind: RoomKind::Public,
                name: "r".into(),
                created_by: user.id,
            })
            .await
            .unwrap();
        let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::default());
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let metrics = ModerationMetrics::new();
        let config = ChatConfig {
            moderation: ModerationConfig {
                burst_max: 3,
                burst_window: Duration::from_secs(60),
                metrics: metrics.clone(),
                ..Default::default()
            },
            ..Default::default()
        };
        let chat = Chat::start(store.clone(), broker, config, &tracker, shutdown.clone());
        let send = |text: &str| Send {
            text: text.into(),
            client_msg_id: None,
            reply_to: None,
        };
        let bad = chat
            .send(user.id, room.id, send("well fuck you"))
            .await
            .unwrap();
        for i in 0..5 {
            chat.send(user.id, room.id, send(&format!("hello {i}")))
                .await
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let (removed, flags) = loop {
            let events = store.events(room.id, 0, 100).await.unwrap();
            let removed: Vec<_> = events
                .iter()
                .filter(|e| e.kind == EventKind::Removed)
                .cloned()
                .collect();
            let flags = store
                .flags(FlagQuery {
                    room_id: Some(room.id),
                    limit: 100,
                    ..Default::default()
                })
                .await
                .unwrap();
            if (!removed.is_empty() && !flags.is_empty()) || Instant::now() > deadline {
                break (removed, flags);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(removed.len(), 1, "{removed:?}");
        let e = &removed[0];
        assert_eq!((e.message_id, e.user_id), (bad.message.id, SYSTEM_USER));
        assert!(e.offset > bad.message.offset);
        assert_eq!(e.data["reason"], "profanity");
        assert!(e.message.as_ref().unwrap().removed);
        assert_eq!(flags.len(), 1, "one burst, one flag: {flags:?}");
        assert_eq!(flags[0].reason, "burst");
        let audit = store.audit_log(None, 10).await.unwrap();
        assert_eq!(audit[0].action, "message_removed");
        assert_eq!(audit[0].actor_user_id, None);
        let removals = metrics.seconds.with_label_values(&["remove"]);
        assert_eq!(removals.get_sample_count(), 1);
        assert_eq!(metrics.dropped.get(), 0);

        // Banned users may not send, anywhere.
        let by = Moderator {
            user_id: -5,
            admin: true,
        };
        chat.ban(by, user.id, None, "spam".into()).await.unwrap();
        let err = chat.send(user.id, room.id, send("hi")).await.unwrap_err();
        assert_eq!(err, ChatError::Muted);
        chat.unban(by, user.id).await.unwrap();
        chat.send(user.id, room.id, send("hi again")).await.unwrap();
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
