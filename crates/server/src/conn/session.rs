//! One client's protocol state and its command handlers. Runs inside the connection task, so
//! commands of one connection are handled in order, one at a time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard_hub::{BrokerError, HistoryFilter, PublishOptions, Subscriber};
use switchboard_protocol::client::{
    self as proto, ClientInfo, Command, ConnectResult, HistoryResult, Method, PresenceResult,
    PresenceStatsResult, RefreshResult, RpcResult, StreamPosition, SubRefreshResult, SubscribePush,
    SubscribeRequest, SubscribeResult, UnsubscribePush,
};
use switchboard_protocol::codes::{self, Disconnect, ErrorCode};
use switchboard_protocol::RawValue;

use crate::auth::{now_secs, TokenError};
use crate::config::NamespaceOptions;
use crate::conn::outbound::{Conn, Control};
use crate::node::{Node, RpcContext};

/// What a handler returns: `Err(Ok(e))` replies with error `e`, `Err(Err(d))` closes with `d`.
type Outcome = Result<(), Result<ErrorCode, Disconnect>>;

fn reply_err(e: ErrorCode) -> Result<ErrorCode, Disconnect> {
    Ok(e)
}

struct Subscription {
    presence: bool,
    join_leave: bool,
    /// Subscription token expiry (unix seconds).
    exp: Option<u64>,
    chan_info: Option<Box<RawValue>>,
    /// Made by the server (connect token, server API), not by a client subscribe.
    server_side: bool,
}

/// Token bucket: `rate` per second, up to `burst` at once.
struct RateLimit {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
    /// Commands refused since the last accepted one.
    strikes: u32,
}

impl RateLimit {
    fn new(rate: u32, burst: u32) -> Self {
        RateLimit {
            tokens: burst as f64,
            last: Instant::now(),
            rate: rate as f64,
            burst: burst as f64,
            strikes: 0,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            true
        } else {
            self.strikes += 1;
            false
        }
    }
}

pub struct Session {
    node: Arc<Node>,
    conn: Arc<Conn>,
    user: Option<String>,
    conn_info: Option<Box<RawValue>>,
    subs: HashMap<Arc<str>, Subscription>,
    /// Connection token expiry (unix seconds).
    exp: Option<u64>,
    opened: Instant,
    next_ping: Option<Instant>,
    pong_deadline: Option<Instant>,
    rate: RateLimit,
    /// Replies to the commands of the frame being handled, `\n`-joined.
    replies: Vec<u8>,
}

impl Session {
    pub fn new(node: Arc<Node>, conn: Arc<Conn>) -> Self {
        let c = &node.config.client;
        let rate = RateLimit::new(c.command_rate, c.command_burst);
        Session {
            node,
            conn,
            user: None,
            conn_info: None,
            subs: HashMap::new(),
            exp: None,
            opened: Instant::now(),
            next_ping: None,
            pong_deadline: None,
            rate,
            replies: Vec::new(),
        }
    }

    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    fn client_info(&self, chan_info: Option<Box<RawValue>>) -> ClientInfo {
        ClientInfo {
            user: self.user.clone().unwrap_or_default(),
            client: self.conn.id.to_string(),
            conn_info: self.conn_info.clone(),
            chan_info,
        }
    }

    fn reply<T: serde::Serialize>(&mut self, id: u32, key: &str, result: &T) {
        if !self.replies.is_empty() {
            self.replies.push(b'\n');
        }
        proto::encode_reply(&mut self.replies, id, key, result);
    }

    fn reply_error(&mut self, id: u32, e: ErrorCode) {
        if !self.replies.is_empty() {
            self.replies.push(b'\n');
        }
        proto::encode_error(&mut self.replies, id, &e);
    }

    /// Sends the replies gathered so far.
    fn flush_replies(&mut self) {
        if !self.replies.is_empty() {
            self.conn
                .send(Bytes::from(std::mem::take(&mut self.replies)));
        }
    }

    /// Handles one text frame. `Err` closes the connection with that code.
    pub async fn handle_frame(&mut self, text: &str) -> Result<(), Disconnect> {
        let commands = match proto::decode_commands(text) {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(client = %self.conn.id, error = %e, "closing: malformed frame");
                return Err(codes::DISCONNECT_BAD_REQUEST);
            }
        };
        let mut result = Ok(());
        for cmd in commands {
            if let Err(d) = self.handle_command(cmd).await {
                result = Err(d);
                break;
            }
        }
        self.flush_replies();
        result
    }

    async fn handle_command(&mut self, cmd: Command<'_>) -> Result<(), Disconnect> {
        let method = cmd.method().map_err(|_| codes::DISCONNECT_BAD_REQUEST)?;
        if method == Method::Pong {
            self.pong_deadline = None;
            return Ok(());
        }
        let now = Instant::now();
        if !self.rate.take(now) {
            self.node.metrics.rate_limited.inc();
            if self.rate.strikes >= self.node.config.client.command_burst {
                tracing::info!(client = %self.conn.id, "closing: sustained command flood");
                return Err(codes::DISCONNECT_TOO_MANY_REQUESTS);
            }
            if cmd.id != 0 {
                self.reply_error(cmd.id, codes::ERROR_TOO_MANY_REQUESTS);
            }
            return Ok(());
        }
        if (self.user.is_none()) != (method == Method::Connect) {
            tracing::info!(client = %self.conn.id, method = method.name(), "closing: command out of order");
            return Err(codes::DISCONNECT_BAD_REQUEST);
        }
        if cmd.id == 0 && method != Method::Send {
            tracing::info!(client = %self.conn.id, method = method.name(), "closing: command without id");
            return Err(codes::DISCONNECT_BAD_REQUEST);
        }
        let id = cmd.id;
        let outcome = match method {
            Method::Connect => self.connect(id, cmd.connect.unwrap_or_default()).await,
            Method::Subscribe => self.subscribe(id, cmd.subscribe.unwrap_or_default()).await,
            Method::Unsubscribe => {
                let channel = cmd.unsubscribe.unwrap_or_default().channel;
                self.unsubscribe(&channel).await;
                self.reply(id, "unsubscribe", &serde_json::json!({}));
                Ok(())
            }
            Method::Publish => {
                let p = cmd.publish.expect("method matches field");
                self.publish(id, &p.channel, p.data).await
            }
            Method::Presence => {
                self.presence(id, &cmd.presence.unwrap_or_default().channel)
                    .await
            }
            Method::PresenceStats => {
                self.presence_stats(id, &cmd.presence_stats.unwrap_or_default().channel)
                    .await
            }
            Method::History => self.history(id, cmd.history.unwrap_or_default()).await,
            Method::Rpc => {
                let r = cmd.rpc.expect("method matches field");
                self.rpc(id, &r.method, r.data).await
            }
            Method::Send => {
                tracing::debug!(client = %self.conn.id, "async message ignored: no handler");
                Ok(())
            }
            Method::Refresh => self.refresh(id, &cmd.refresh.unwrap_or_default().token),
            Method::SubRefresh => self.sub_refresh(id, cmd.sub_refresh.unwrap_or_default()),
            Method::Pong => unreachable!("handled above"),
        };
        let m = &self.node.metrics;
        m.commands.with_label_values(&[method.name()]).inc();
        m.command_seconds
            .with_label_values(&[method.name()])
            .observe(now.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => Ok(()),
            Err(Ok(e)) => {
                self.reply_error(id, e);
                Ok(())
            }
            Err(Err(d)) => Err(d),
        }
    }

    async fn connect(&mut self, id: u32, req: proto::ConnectRequest<'_>) -> Outcome {
        let token = req.token.as_deref().unwrap_or("");
        if token.is_empty() {
            tracing::info!(client = %self.conn.id, "closing: connect without token");
            return Err(Err(codes::DISCONNECT_BAD_REQUEST));
        }
        let claims = match self.node.verifier.verify_connect(token) {
            Ok(c) => c,
            Err(TokenError::Expired) => return Err(reply_err(codes::ERROR_TOKEN_EXPIRED)),
            Err(TokenError::Invalid) => {
                tracing::info!(client = %self.conn.id, "closing: invalid connection token");
                return Err(Err(codes::DISCONNECT_INVALID_TOKEN));
            }
        };
        self.user = Some(claims.sub.clone());
        self.conn_info = claims.info.as_ref().map(to_raw);
        self.exp = claims.exp;
        self.node.add_client(&claims.sub, self.conn.clone());
        tracing::debug!(client = %self.conn.id, user = %claims.sub, "connected");

        let ping = self.node.config.client.ping_interval;
        self.next_ping = Some(Instant::now() + ping);
        let mut result = ConnectResult {
            client: self.conn.id.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ping: ping.as_secs().max(1) as u32,
            pong: true,
            node: self.node.config.name.clone(),
            ..Default::default()
        };
        if let Some(exp) = self.exp {
            result.expires = true;
            result.ttl = exp.saturating_sub(now_secs()).max(1) as u32;
        }
        // Server-side subscriptions from the token, recovering where the client asks to.
        let mut channels: Vec<(String, Option<Box<RawValue>>)> =
            claims.channels.iter().map(|c| (c.clone(), None)).collect();
        for (c, opts) in &claims.subs {
            channels.push((c.clone(), opts.info.as_ref().map(to_raw)));
        }
        let mut releases = Vec::new();
        for (channel, chan_info) in channels {
            if self.subs.contains_key(channel.as_str()) {
                continue;
            }
            let Some(ns) = self.node.config.namespace(&channel).cloned() else {
                tracing::warn!(
                    channel,
                    "token names a channel in an unknown namespace; skipped"
                );
                continue;
            };
            let want = req.subs.get(&channel);
            let recover = want.map(|s| (s.offset, s.epoch.as_deref().unwrap_or("").to_string()));
            match self
                .join_channel(&channel, &ns, recover, false, chan_info, None, true)
                .await
            {
                Ok((res, after)) => {
                    result.subs.insert(channel.clone(), res);
                    releases.push((channel, after));
                }
                Err(e) => tracing::warn!(channel, error = %e, "server-side subscribe failed"),
            }
        }
        self.reply(id, "connect", &result);
        self.flush_replies();
        for (channel, after) in releases {
            self.conn.release(&channel, after);
        }
        Ok(())
    }

    fn namespace(&self, channel: &str) -> Result<NamespaceOptions, ErrorCode> {
        if channel.is_empty() || channel.len() > 255 {
            return Err(codes::ERROR_BAD_REQUEST);
        }
        self.node
            .config
            .namespace(channel)
            .cloned()
            .ok_or(codes::ERROR_UNKNOWN_CHANNEL)
    }

    /// `ns:name#42,43` may only be used by users 42 and 43.
    fn user_allowed(&self, channel: &str) -> bool {
        match channel.rsplit_once('#') {
            None => true,
            Some((_, users)) => {
                let me = self.user.as_deref().unwrap_or("");
                users.split(',').any(|u| u == me)
            }
        }
    }

    async fn subscribe(&mut self, id: u32, req: SubscribeRequest<'_>) -> Outcome {
        let channel = req.channel.to_string();
        let ns = self.namespace(&channel).map_err(reply_err)?;
        if self.subs.contains_key(channel.as_str()) {
            return Err(reply_err(codes::ERROR_ALREADY_SUBSCRIBED));
        }
        if self.subs.len() >= self.node.config.client.max_channels {
            return Err(reply_err(codes::ERROR_LIMIT_EXCEEDED));
        }
        if !self.user_allowed(&channel) {
            return Err(reply_err(codes::ERROR_PERMISSION_DENIED));
        }
        let token = req.token.as_deref().unwrap_or("");
        let mut exp = None;
        let mut chan_info = None;
        if !token.is_empty() {
            let claims = match self.node.verifier.verify_subscribe(token) {
                Ok(c) => c,
                Err(TokenError::Expired) => return Err(reply_err(codes::ERROR_TOKEN_EXPIRED)),
                Err(TokenError::Invalid) => {
                    tracing::info!(client = %self.conn.id, channel, "closing: invalid subscription token");
                    return Err(Err(codes::DISCONNECT_INVALID_TOKEN));
                }
            };
            if claims.channel != channel || Some(claims.sub.as_str()) != self.user.as_deref() {
                return Err(reply_err(codes::ERROR_PERMISSION_DENIED));
            }
            exp = claims.exp;
            chan_info = claims.info.as_ref().map(to_raw);
        } else if ns.protected || !ns.allow_subscribe_for_client {
            return Err(reply_err(codes::ERROR_PERMISSION_DENIED));
        }
        if let Some(owner) = self.node.owner(&channel) {
            let user = self.user.as_deref().unwrap_or("");
            owner
                .can_subscribe(user, &channel)
                .await
                .map_err(reply_err)?;
        }
        let recover = req
            .recover
            .then(|| (req.offset, req.epoch.as_deref().unwrap_or("").to_string()));
        let (mut result, after) = self
            .join_channel(
                &channel,
                &ns,
                recover,
                req.join_leave,
                chan_info,
                exp,
                false,
            )
            .await
            .map_err(|e| {
                tracing::warn!(channel, error = %e, "subscribe failed");
                reply_err(codes::ERROR_INTERNAL)
            })?;
        if let Some(exp) = exp {
            result.expires = true;
            result.ttl = exp.saturating_sub(now_secs()).max(1) as u32;
        }
        self.reply(id, "subscribe", &result);
        self.flush_replies();
        self.conn.release(&channel, after);
        Ok(())
    }

    /// Subscribes this connection to `channel`: live first, then reads the stream position (and
    /// the missed publications when recovering). Pushes arriving meanwhile are held; the caller
    /// sends the reply and then calls `conn.release(channel, after)` with the returned offset.
    #[allow(clippy::too_many_arguments)]
    async fn join_channel(
        &mut self,
        channel: &str,
        ns: &NamespaceOptions,
        recover: Option<(u64, String)>,
        join_leave: bool,
        chan_info: Option<Box<RawValue>>,
        exp: Option<u64>,
        server_side: bool,
    ) -> Result<(SubscribeResult, u64), BrokerError> {
        let hub = &self.node.hub;
        let key: Arc<str> = Arc::from(channel);
        self.conn.hold(key.clone());
        let sub = Subscriber {
            client: self.conn.id.clone(),
            sink: self.conn.clone(),
            join_leave: join_leave && ns.join_leave,
        };
        if let Err(e) = hub.add_subscriber(channel, sub).await {
            self.conn.discard_hold(channel);
            return Err(e);
        }
        let mut result = SubscribeResult::default();
        let mut after = 0;
        if ns.history_size > 0 || self.node.owner(channel).is_some() {
            let read = self.read_position(channel, recover.as_ref()).await;
            let (page_pubs, position, recovered) = match read {
                Ok(v) => v,
                Err(e) => {
                    self.conn.discard_hold(channel);
                    let _ = hub.remove_subscriber(channel, &self.conn.id).await;
                    return Err(e);
                }
            };
            after = page_pubs.last().map_or(position.offset, |p| p.offset);
            hub.observe_position(channel, &position);
            result.positioned = true;
            result.recoverable = ns.allow_recovery;
            result.offset = position.offset;
            result.epoch = position.epoch;
            if recover.is_some() {
                result.was_recovering = true;
                result.recovered = recovered;
                result.publications = page_pubs;
            }
        }
        if ns.presence {
            let info = self.client_info(chan_info.clone());
            if let Err(e) = hub.presence.add(channel, &info).await {
                tracing::warn!(channel, error = %e, "presence add failed");
            }
        }
        if ns.join_leave {
            let info = self.client_info(chan_info.clone());
            let _ = hub.broker.publish_join(channel, &info).await;
        }
        self.subs.insert(
            key,
            Subscription {
                presence: ns.presence,
                join_leave: ns.join_leave,
                exp,
                chan_info,
                server_side,
            },
        );
        self.node.metrics.subscriptions.inc();
        Ok((result, after))
    }

    /// The stream's top position, plus the publications after `recover` when recovery succeeds
    /// (all of them, or none: recovery is all or nothing).
    async fn read_position(
        &self,
        channel: &str,
        recover: Option<&(u64, String)>,
    ) -> Result<(Vec<Arc<proto::Publication>>, StreamPosition, bool), BrokerError> {
        let top_only = HistoryFilter {
            since: None,
            limit: Some(0),
            reverse: false,
        };
        let Some((offset, epoch)) = recover else {
            let page = self.stream_history(channel, &top_only).await?;
            return Ok((Vec::new(), page.position, false));
        };
        let max = self.node.config.client.recovery_max_publications;
        let since = StreamPosition {
            offset: *offset,
            epoch: epoch.clone(),
        };
        let filter = HistoryFilter {
            since: Some(since),
            limit: Some(max + 1),
            reverse: false,
        };
        match self.stream_history(channel, &filter).await {
            Ok(page) => {
                let ok = recovers(&page, *offset, epoch, max);
                let pubs = if ok { page.publications } else { Vec::new() };
                Ok((pubs, page.position, ok))
            }
            Err(BrokerError::UnrecoverablePosition) => {
                let page = self.stream_history(channel, &top_only).await?;
                Ok((Vec::new(), page.position, false))
            }
            Err(e) => Err(e),
        }
    }

    async fn stream_history(
        &self,
        channel: &str,
        filter: &HistoryFilter,
    ) -> Result<switchboard_hub::HistoryPage, BrokerError> {
        self.node.stream_history(channel, filter).await
    }

    async fn unsubscribe(&mut self, channel: &str) -> bool {
        let Some(sub) = self.subs.remove(channel) else {
            return false;
        };
        self.leave_channel(channel, sub).await;
        true
    }

    async fn leave_channel(&self, channel: &str, sub: Subscription) {
        let hub = &self.node.hub;
        if let Err(e) = hub.remove_subscriber(channel, &self.conn.id).await {
            tracing::warn!(channel, error = %e, "unsubscribe from broker failed");
        }
        self.conn.forget(channel);
        if sub.presence {
            let _ = hub.presence.remove(channel, &self.conn.id).await;
        }
        if sub.join_leave {
            let _ = hub
                .broker
                .publish_leave(channel, &self.client_info(sub.chan_info))
                .await;
        }
        self.node.metrics.subscriptions.dec();
    }

    async fn publish(&mut self, id: u32, channel: &str, data: Option<&RawValue>) -> Outcome {
        let ns = self.namespace(channel).map_err(reply_err)?;
        let data = data.ok_or(Ok(codes::ERROR_BAD_REQUEST))?;
        let subscribed = self.subs.contains_key(channel);
        let allowed = self.user_allowed(channel)
            && (ns.allow_publish_for_client || (ns.allow_publish_for_subscriber && subscribed));
        if !allowed {
            return Err(reply_err(codes::ERROR_PERMISSION_DENIED));
        }
        if let Some(owner) = self.node.owner(channel) {
            let ctx = RpcContext {
                user: self.user.as_deref().unwrap_or(""),
                client: &self.conn.id,
            };
            owner.publish(ctx, channel, data).await.map_err(reply_err)?;
            self.reply(id, "publish", &serde_json::json!({}));
            return Ok(());
        }
        let info = self.subs.get(channel).and_then(|s| s.chan_info.clone());
        let opts = publish_options(&ns);
        match self
            .node
            .hub
            .broker
            .publish(
                channel,
                data.to_owned(),
                Some(self.client_info(info)),
                &opts,
            )
            .await
        {
            Ok(_) => {
                self.reply(id, "publish", &serde_json::json!({}));
                Ok(())
            }
            Err(e) => {
                tracing::warn!(channel, error = %e, "publish failed");
                Err(reply_err(codes::ERROR_INTERNAL))
            }
        }
    }

    /// Presence and history reads: the namespace must keep them, and the caller must be
    /// allowed (any client, or subscribers only).
    fn read_allowed(&self, channel: &str, for_client: bool, for_subscriber: bool) -> bool {
        self.user_allowed(channel)
            && (for_client || (for_subscriber && self.subs.contains_key(channel)))
    }

    /// A channel owner's channels (chat rooms) are read only by those it lets subscribe: the
    /// namespace options alone would let any client read a private room's history.
    async fn owner_allows_read(&self, channel: &str) -> Result<(), ErrorCode> {
        match self.node.owner(channel) {
            Some(owner) => {
                let user = self.user.as_deref().unwrap_or("");
                owner.can_subscribe(user, channel).await
            }
            None => Ok(()),
        }
    }

    async fn presence(&mut self, id: u32, channel: &str) -> Outcome {
        let ns = self.namespace(channel).map_err(reply_err)?;
        if !ns.presence {
            return Err(reply_err(codes::ERROR_NOT_AVAILABLE));
        }
        if !self.read_allowed(
            channel,
            ns.allow_presence_for_client,
            ns.allow_presence_for_subscriber,
        ) {
            return Err(reply_err(codes::ERROR_PERMISSION_DENIED));
        }
        self.owner_allows_read(channel).await.map_err(reply_err)?;
        let presence = self
            .node
            .hub
            .presence
            .presence(channel)
            .await
            .map_err(|e| {
                tracing::warn!(channel, error = %e, "presence failed");
                reply_err(codes::ERROR_INTERNAL)
            })?;
        self.reply(id, "presence", &PresenceResult { presence });
        Ok(())
    }

    async fn presence_stats(&mut self, id: u32, channel: &str) -> Outcome {
        let ns = self.namespace(channel).map_err(reply_err)?;
        if !ns.presence {
            return Err(reply_err(codes::ERROR_NOT_AVAILABLE));
        }
        if !self.read_allowed(
            channel,
            ns.allow_presence_for_client,
            ns.allow_presence_for_subscriber,
        ) {
            return Err(reply_err(codes::ERROR_PERMISSION_DENIED));
        }
        self.owner_allows_read(channel).await.map_err(reply_err)?;
        let (num_clients, num_users) = self
            .node
            .hub
            .presence
            .stats(channel)
            .await
            .map_err(|_| reply_err(codes::ERROR_INTERNAL))?;
        self.reply(
            id,
            "presence_stats",
            &PresenceStatsResult {
                num_clients,
                num_users,
            },
        );
        Ok(())
    }

    async fn history(&mut self, id: u32, req: proto::HistoryRequest<'_>) -> Outcome {
        let channel = req.channel.as_ref();
        let ns = self.namespace(channel).map_err(reply_err)?;
        if ns.history_size == 0 && self.node.owner(channel).is_none() {
            return Err(reply_err(codes::ERROR_NOT_AVAILABLE));
        }
        if !self.read_allowed(
            channel,
            ns.allow_history_for_client,
            ns.allow_history_for_subscriber,
        ) {
            return Err(reply_err(codes::ERROR_PERMISSION_DENIED));
        }
        self.owner_allows_read(channel).await.map_err(reply_err)?;
        let filter = history_filter(req.limit, req.since, req.reverse);
        match self.stream_history(channel, &filter).await {
            Ok(page) => {
                let result = HistoryResult {
                    publications: page.publications,
                    epoch: page.position.epoch,
                    offset: page.position.offset,
                };
                self.reply(id, "history", &result);
                Ok(())
            }
            Err(BrokerError::UnrecoverablePosition) => {
                Err(reply_err(codes::ERROR_UNRECOVERABLE_POSITION))
            }
            Err(e) => {
                tracing::warn!(channel, error = %e, "history failed");
                Err(reply_err(codes::ERROR_INTERNAL))
            }
        }
    }

    async fn rpc(&mut self, id: u32, method: &str, data: Option<&RawValue>) -> Outcome {
        let handler = self
            .node
            .rpc(method)
            .ok_or(Ok(codes::ERROR_METHOD_NOT_FOUND))?;
        let ctx = RpcContext {
            user: self.user.as_deref().unwrap_or(""),
            client: &self.conn.id,
        };
        let data = handler.call(ctx, data).await.map_err(reply_err)?;
        self.reply(id, "rpc", &RpcResult { data });
        Ok(())
    }

    fn refresh(&mut self, id: u32, token: &str) -> Outcome {
        let claims = match self.node.verifier.verify_connect(token) {
            Ok(c) => c,
            Err(TokenError::Expired) => return Err(reply_err(codes::ERROR_TOKEN_EXPIRED)),
            Err(TokenError::Invalid) => return Err(Err(codes::DISCONNECT_INVALID_TOKEN)),
        };
        if Some(claims.sub.as_str()) != self.user.as_deref() {
            tracing::info!(client = %self.conn.id, "closing: refresh token for another user");
            return Err(Err(codes::DISCONNECT_INVALID_TOKEN));
        }
        self.exp = claims.exp;
        let mut result = RefreshResult {
            client: self.conn.id.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        };
        if let Some(exp) = claims.exp {
            result.expires = true;
            result.ttl = exp.saturating_sub(now_secs()).max(1) as u32;
        }
        self.reply(id, "refresh", &result);
        Ok(())
    }

    fn sub_refresh(&mut self, id: u32, req: proto::SubRefreshRequest<'_>) -> Outcome {
        if !self.subs.contains_key(req.channel.as_ref()) {
            return Err(reply_err(codes::ERROR_PERMISSION_DENIED));
        }
        let claims = match self.node.verifier.verify_subscribe(&req.token) {
            Ok(c) => c,
            Err(TokenError::Expired) => return Err(reply_err(codes::ERROR_TOKEN_EXPIRED)),
            Err(TokenError::Invalid) => return Err(Err(codes::DISCONNECT_INVALID_TOKEN)),
        };
        if claims.channel != req.channel || Some(claims.sub.as_str()) != self.user.as_deref() {
            return Err(reply_err(codes::ERROR_PERMISSION_DENIED));
        }
        let sub = self
            .subs
            .get_mut(req.channel.as_ref())
            .expect("checked above");
        sub.exp = claims.exp;
        let mut result = SubRefreshResult::default();
        if let Some(exp) = claims.exp {
            result.expires = true;
            result.ttl = exp.saturating_sub(now_secs()).max(1) as u32;
        }
        self.reply(id, "sub_refresh", &result);
        Ok(())
    }

    /// Carries out a request from the server API.
    pub async fn handle_control(&mut self, c: Control) {
        if self.user.is_none() {
            return;
        }
        match c {
            Control::Subscribe { channel } => {
                if self.subs.contains_key(channel.as_str()) {
                    return;
                }
                let Some(ns) = self.node.config.namespace(&channel).cloned() else {
                    return;
                };
                match self
                    .join_channel(&channel, &ns, None, false, None, None, true)
                    .await
                {
                    Ok((res, after)) => {
                        let push = SubscribePush {
                            recoverable: res.recoverable,
                            epoch: res.epoch,
                            offset: res.offset,
                            positioned: res.positioned,
                            data: None,
                        };
                        let mut out = Vec::new();
                        proto::encode_push(&mut out, &channel, "subscribe", &push);
                        self.conn.send(Bytes::from(out));
                        self.conn.release(&channel, after);
                    }
                    Err(e) => tracing::warn!(channel, error = %e, "server subscribe failed"),
                }
            }
            Control::Unsubscribe { channel } => {
                if self.unsubscribe(&channel).await {
                    let (code, reason) = codes::UNSUBSCRIBE_SERVER;
                    let mut out = Vec::new();
                    proto::encode_push(
                        &mut out,
                        &channel,
                        "unsubscribe",
                        &UnsubscribePush { code, reason },
                    );
                    self.conn.send(Bytes::from(out));
                }
            }
            Control::Resubscribe { channel } => {
                let Some(sub) = self.subs.remove(channel.as_str()) else {
                    self.conn.forget(&channel);
                    return;
                };
                let server_side = sub.server_side;
                self.leave_channel(&channel, sub).await;
                if server_side {
                    // The SDK recovers server-side subscriptions by reconnecting.
                    self.conn.close(codes::DISCONNECT_INSUFFICIENT_STATE);
                } else {
                    let (code, reason) = codes::UNSUBSCRIBE_INSUFFICIENT_STATE;
                    let mut out = Vec::new();
                    proto::encode_push(
                        &mut out,
                        &channel,
                        "unsubscribe",
                        &UnsubscribePush { code, reason },
                    );
                    self.conn.send(Bytes::from(out));
                }
            }
        }
    }

    /// The next instant `on_timer` has work to do.
    pub fn next_deadline(&self) -> Instant {
        let c = &self.node.config.client;
        if self.user.is_none() {
            return self.opened + c.stale_timeout;
        }
        let mut next = self
            .next_ping
            .unwrap_or_else(|| Instant::now() + c.ping_interval);
        if let Some(p) = self.pong_deadline {
            next = next.min(p);
        }
        let grace = c.expired_close_delay;
        for exp in self
            .exp
            .iter()
            .chain(self.subs.values().filter_map(|s| s.exp.as_ref()))
        {
            next = next.min(unix_to_instant(*exp) + grace);
        }
        next
    }

    /// Pings, and closes stale, pong-less or expired connections.
    pub fn on_timer(&mut self) -> Result<(), Disconnect> {
        let now = Instant::now();
        let c = &self.node.config.client;
        if self.user.is_none() {
            if now >= self.opened + c.stale_timeout {
                tracing::info!(client = %self.conn.id, "closing: no connect command in time");
                return Err(codes::DISCONNECT_STALE);
            }
            return Ok(());
        }
        if self.pong_deadline.is_some_and(|d| now >= d) {
            tracing::info!(client = %self.conn.id, "closing: no pong");
            return Err(codes::DISCONNECT_NO_PONG);
        }
        let unix = now_secs();
        let grace = c.expired_close_delay.as_secs();
        if self.exp.is_some_and(|e| unix >= e + grace) {
            return Err(codes::DISCONNECT_EXPIRED);
        }
        if self
            .subs
            .values()
            .any(|s| s.exp.is_some_and(|e| unix >= e + grace))
        {
            return Err(codes::DISCONNECT_SUB_EXPIRED);
        }
        if self.next_ping.is_some_and(|p| now >= p) {
            self.conn.send(Bytes::from_static(proto::PING));
            if self.pong_deadline.is_none() {
                self.pong_deadline = Some(now + c.pong_timeout);
            }
            self.next_ping = Some(now + c.ping_interval);
        }
        Ok(())
    }

    /// Leaves every channel and unregisters the client. Runs once, when the connection ends.
    pub async fn cleanup(&mut self) {
        let subs: Vec<_> = self.subs.drain().collect();
        for (channel, sub) in subs {
            self.leave_channel(&channel, sub).await;
        }
        if let Some(user) = &self.user {
            self.node.remove_client(user, &self.conn.id);
        }
    }
}

/// Whether a history page read from a client's position `(offset, epoch)` recovers it: the
/// same epoch, starting right after `offset` (or nothing missed), at most `max`
/// publications. The offset is the client's: `u64::MAX` is possible, and recovers nothing.
fn recovers(page: &switchboard_hub::HistoryPage, offset: u64, epoch: &str, max: usize) -> bool {
    let contiguous = match page.publications.first() {
        Some(first) => offset.checked_add(1) == Some(first.offset),
        None => page.position.offset == offset,
    };
    page.position.epoch == epoch && contiguous && page.publications.len() <= max
}

pub fn publish_options(ns: &NamespaceOptions) -> PublishOptions {
    PublishOptions {
        history_size: ns.history_size,
        history_ttl: ns.history_ttl,
        tags: None,
    }
}

/// Protocol history parameters to an engine filter: limit 0 asks for the position only, a
/// negative limit for everything kept.
pub fn history_filter(limit: i32, since: Option<StreamPosition>, reverse: bool) -> HistoryFilter {
    let limit = match limit {
        l if l < 0 => None,
        l => Some(l as usize),
    };
    HistoryFilter {
        since,
        limit,
        reverse,
    }
}

fn to_raw(v: &serde_json::Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).expect("a JSON value serializes")
}

fn unix_to_instant(unix: u64) -> Instant {
    let now = now_secs();
    let now_i = Instant::now();
    if unix >= now {
        now_i + Duration::from_secs(unix - now)
    } else {
        now_i
            .checked_sub(Duration::from_secs(now - unix))
            .unwrap_or(now_i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_hub::HistoryPage;

    fn page(offsets: &[u64], top: u64, epoch: &str) -> HistoryPage {
        HistoryPage {
            publications: offsets
                .iter()
                .map(|&offset| {
                    Arc::new(proto::Publication {
                        offset,
                        data: RawValue::from_string("{}".into()).unwrap(),
                        info: None,
                        tags: None,
                    })
                })
                .collect(),
            position: StreamPosition {
                offset: top,
                epoch: epoch.into(),
            },
        }
    }

    #[test]
    fn recovery_is_all_or_nothing() {
        assert!(recovers(&page(&[4, 5], 5, "e"), 3, "e", 2));
        assert!(recovers(&page(&[], 3, "e"), 3, "e", 2), "nothing missed");
        assert!(
            !recovers(&page(&[4, 5], 5, "e"), 3, "x", 2),
            "another epoch"
        );
        assert!(!recovers(&page(&[5], 5, "e"), 3, "e", 2), "a gap");
        assert!(
            !recovers(&page(&[4, 5, 6], 6, "e"), 3, "e", 2),
            "over the maximum"
        );
    }

    /// Regression: a client's offset of u64::MAX overflowed `offset + 1` (a panic in debug
    /// builds) when the stream returned publications (the chat stream read "after -1").
    #[test]
    fn a_maximal_client_offset_does_not_overflow() {
        assert!(!recovers(&page(&[1, 2], 2, "e"), u64::MAX, "e", 10));
        assert!(!recovers(&page(&[], 2, "e"), u64::MAX, "e", 10));
    }
}
