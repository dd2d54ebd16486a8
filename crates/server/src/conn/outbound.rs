//! A connection's shared half: its socket and the ordered, bounded path of everything written
//! to it.
//!
//! Fan-out calls [`Conn::deliver`] from the publisher's task. When nothing is waiting to be
//! written, the push (framed once per broadcast and shared by every subscriber) goes straight to
//! the socket with a non-blocking `try_write`: no queue, no task wake-up. Only what the socket
//! does not take is queued, and the connection's own task is woken to write it when the socket
//! becomes writable; it joins all queued messages into one frame (`\n`-separated) per write.
//!
//! **Corking.** While the connection's task runs the commands of a client frame, the
//! connection is corked ([`Conn::cork`]): pushes queue instead of going out, and when the
//! frame's replies are sent, [`Conn::uncork`] writes pushes and replies together, as one frame.
//! A publisher's reply and its own publication, which arrive microseconds apart, then cost one
//! write and one read instead of two. A cork lasts at most [`CORK_MAX`] (the task uncorks when
//! a command takes longer), so that is the most a push waits for a slow command.
//!
//! **Overflow policy:** the bytes waiting (queued plus held) are bounded by
//! `client.write_queue_max_bytes`. Past the bound the queue is dropped and the connection is
//! closed with 3008 (slow); the client then reconnects and recovers from history. Other
//! subscribers are never delayed by a slow one: the fan-out never waits.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, Bytes, BytesMut};
use switchboard_hub::{Delivery, Sink};
use switchboard_protocol::codes::{self, Disconnect};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::ws;

/// Largest frame the connection task builds from queued messages; more waits for the next write.
const BATCH_MAX_BYTES: usize = 64 * 1024;
/// Longest a connection stays corked while its task runs a frame's commands (module docs).
pub(crate) const CORK_MAX: std::time::Duration = std::time::Duration::from_millis(10);

enum Item {
    /// A JSON message, framed when written (so queued messages can share a frame).
    Msg(Bytes),
    /// Bytes already framed (control frames from the WebSocket reader).
    Raw(Bytes),
}

impl Item {
    fn len(&self) -> usize {
        match self {
            Item::Msg(b) | Item::Raw(b) => b.len(),
        }
    }
}

/// Pushes of a channel being subscribed, held until its subscribe reply has been written.
struct Held {
    channel: Arc<str>,
    items: Vec<(u64, Bytes)>,
}

/// Requests from other tasks (the server API) that the connection task carries out.
#[derive(Debug)]
pub enum Control {
    Subscribe {
        channel: String,
    },
    Unsubscribe {
        channel: String,
    },
    /// The hub cannot deliver the channel without a gap (see `Sink::resubscribe`).
    Resubscribe {
        channel: String,
    },
}

#[derive(Default)]
struct Outbound {
    /// The unwritten rest of a frame whose beginning is already on the wire.
    partial: Bytes,
    queue: VecDeque<Item>,
    /// Bytes in `partial`, `queue` and `held`, checked against the bound.
    waiting: usize,
    held: Vec<Held>,
    /// Per channel, the offset the client's position already covers: live pushes up to it
    /// are dropped (publications committed before the subscribe read but broadcast after
    /// it). An entry goes once a later offset arrives.
    floors: Vec<(Arc<str>, u64)>,
    /// Channels whose pushes are dropped until the session has them resubscribed.
    blocked: Vec<Arc<str>>,
    control: Vec<Control>,
    /// Writes queue instead of going out (see [`Conn::cork`]).
    corked: bool,
    /// Set once: the task closes the connection with this code.
    closing: Option<Disconnect>,
    /// A write failed: nothing more can be written.
    broken: bool,
}

impl Outbound {
    fn idle(&self) -> bool {
        self.partial.is_empty() && self.queue.is_empty()
    }

    /// A write may go straight to the socket: nothing waits before it and no cork holds it.
    fn writes_through(&self) -> bool {
        self.idle() && !self.corked
    }
}

pub struct Conn {
    pub id: Arc<str>,
    pub(crate) stream: TcpStream,
    /// std Mutex, not tokio's: it is held only around non-blocking writes and never across an
    /// await, and deliveries take it from synchronous fan-out.
    out: Mutex<Outbound>,
    /// Wakes the connection task: backlog appeared, a close was requested, or control arrived.
    pub(crate) wake: Notify,
    max_waiting: usize,
    metrics: Metrics,
}

impl Conn {
    pub fn new(id: Arc<str>, stream: TcpStream, max_waiting: usize, metrics: Metrics) -> Self {
        Conn {
            id,
            stream,
            out: Mutex::new(Outbound::default()),
            wake: Notify::new(),
            max_waiting,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Outbound> {
        self.out.lock().expect("outbound lock poisoned")
    }

    /// Sends one or more JSON messages (`\n`-joined) in order after everything before them.
    pub fn send(&self, msg: Bytes) {
        let mut o = self.lock();
        self.write_or_queue(&mut o, Item::Msg(msg), None);
    }

    /// Sends bytes that are already a WebSocket frame.
    pub(crate) fn send_raw(&self, frame: Bytes) {
        let mut o = self.lock();
        self.write_or_queue(&mut o, Item::Raw(frame), None);
    }

    fn write_or_queue(&self, o: &mut Outbound, item: Item, framed: Option<&Bytes>) {
        if o.broken || o.closing.is_some() {
            return;
        }
        if o.writes_through() {
            let owned;
            let bytes = match (framed, &item) {
                (Some(f), _) => f,
                (None, Item::Raw(r)) => r,
                (None, Item::Msg(m)) => {
                    owned = ws::text_frame(m);
                    &owned
                }
            };
            match self.stream.try_write(bytes) {
                Ok(n) if n == bytes.len() => {}
                Ok(n) => {
                    o.partial = bytes.slice(n..);
                    o.waiting += o.partial.len();
                    self.wake.notify_one();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    o.waiting += item.len();
                    o.queue.push_back(item);
                    self.wake.notify_one();
                }
                Err(_) => {
                    o.broken = true;
                    self.wake.notify_one();
                }
            }
        } else {
            // Corked, or the task is already waiting for the socket to become writable.
            o.waiting += item.len();
            o.queue.push_back(item);
            self.check_bound(o);
        }
    }

    fn check_bound(&self, o: &mut Outbound) {
        if o.waiting > self.max_waiting && o.closing.is_none() {
            o.queue.clear();
            o.held.clear();
            o.waiting = o.partial.len();
            o.closing = Some(codes::DISCONNECT_SLOW);
            self.metrics.slow_disconnects.inc();
            self.wake.notify_one();
        }
    }

    /// Queues the final Close frame behind what is pending. Nothing is sent after it.
    pub(crate) fn send_close(&self, frame: Bytes) {
        let mut o = self.lock();
        if !o.broken {
            o.waiting += frame.len();
            o.queue.push_back(Item::Raw(frame));
        }
    }

    /// Whether queued bytes wait for the socket.
    pub fn has_backlog(&self) -> bool {
        !self.lock().idle()
    }

    /// Writes queued bytes until the socket is full or the queue empty. Returns true when empty.
    pub fn flush(&self) -> io::Result<bool> {
        let mut o = self.lock();
        self.flush_locked(&mut o)
    }

    /// Starts queueing writes instead of sending them. Called by the connection's task before
    /// it runs a client frame's commands; the replies they send queue behind the pushes that
    /// arrive meanwhile, and [`Conn::uncork`] writes them all at once.
    pub(crate) fn cork(&self) {
        self.lock().corked = true;
    }

    /// Ends a cork: writes what queued, joined into as few frames as fit. What the socket
    /// does not take waits for the task's next write, as any backlog does.
    pub(crate) fn uncork(&self) {
        let mut o = self.lock();
        if !std::mem::take(&mut o.corked) || o.idle() || o.broken {
            return;
        }
        match self.flush_locked(&mut o) {
            Ok(true) => {}
            // The task sees the backlog (or the broken socket) when it next looks.
            Ok(false) | Err(_) => self.wake.notify_one(),
        }
    }

    fn flush_locked(&self, o: &mut Outbound) -> io::Result<bool> {
        loop {
            if !o.partial.is_empty() {
                match self.stream.try_write(&o.partial) {
                    Ok(n) => {
                        o.partial.advance(n);
                        o.waiting -= n;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => {
                        o.broken = true;
                        return Err(e);
                    }
                }
            }
            match o.queue.pop_front() {
                None => return Ok(true),
                Some(Item::Raw(frame)) => {
                    o.partial = frame;
                }
                Some(Item::Msg(first)) => {
                    let mut taken = first.len();
                    let mut body = BytesMut::with_capacity(first.len());
                    body.extend_from_slice(&first);
                    while let Some(Item::Msg(next)) = o.queue.front() {
                        if body.len() + 1 + next.len() > BATCH_MAX_BYTES {
                            break;
                        }
                        body.extend_from_slice(b"\n");
                        body.extend_from_slice(next);
                        taken += next.len();
                        o.queue.pop_front();
                    }
                    let frame = ws::text_frame(&body);
                    o.waiting = o.waiting - taken + frame.len();
                    o.partial = frame;
                }
            }
        }
    }

    /// Asks the connection task to close with `d`. The first request wins.
    pub fn close(&self, d: Disconnect) {
        let mut o = self.lock();
        if o.closing.is_none() {
            o.closing = Some(d);
            self.wake.notify_one();
        }
    }

    pub fn closing(&self) -> Option<Disconnect> {
        self.lock().closing
    }

    pub fn broken(&self) -> bool {
        self.lock().broken
    }

    pub fn control(&self, c: Control) {
        self.lock().control.push(c);
        self.wake.notify_one();
    }

    pub fn take_control(&self) -> Vec<Control> {
        std::mem::take(&mut self.lock().control)
    }

    /// Starts holding `channel`'s pushes (see [`Conn::release`]).
    pub fn hold(&self, channel: Arc<str>) {
        self.lock().held.push(Held {
            channel,
            items: Vec::new(),
        });
    }

    /// Stops holding `channel`'s pushes and sends those after `after` (an offset) in order.
    /// Pushes without an offset (joins, leaves) are always sent. Called after the subscribe
    /// reply was sent, so recovered and live publications reach the client merged by offset.
    pub fn release(&self, channel: &str, after: u64) {
        let mut o = self.lock();
        let Some(i) = o.held.iter().position(|h| &*h.channel == channel) else {
            return;
        };
        let held = o.held.swap_remove(i);
        let mut top = after;
        for (offset, payload) in held.items {
            o.waiting -= payload.len();
            if offset == 0 || offset > after {
                top = top.max(offset);
                self.write_or_queue(&mut o, Item::Msg(payload), None);
            }
        }
        if top == after && after > 0 {
            o.floors.push((held.channel, after));
        }
    }

    /// Forgets a channel's floor and block (it was unsubscribed).
    pub fn forget(&self, channel: &str) {
        let mut o = self.lock();
        o.floors.retain(|(c, _)| &**c != channel);
        o.blocked.retain(|c| &**c != channel);
    }

    /// Drops a hold without sending (the subscribe failed).
    pub fn discard_hold(&self, channel: &str) {
        let mut o = self.lock();
        if let Some(i) = o.held.iter().position(|h| &*h.channel == channel) {
            let held = o.held.swap_remove(i);
            o.waiting -= held.items.iter().map(|(_, p)| p.len()).sum::<usize>();
        }
    }
}

impl Sink for Conn {
    fn deliver(&self, d: &Delivery) {
        let mut o = self.lock();
        if !o.blocked.is_empty() && o.blocked.contains(&d.channel) {
            return;
        }
        if d.offset > 0 && !o.floors.is_empty() {
            if let Some(i) = o.floors.iter().position(|(c, _)| *c == d.channel) {
                if d.offset <= o.floors[i].1 {
                    return;
                }
                o.floors.swap_remove(i);
            }
        }
        if !o.held.is_empty() {
            if let Some(h) = o.held.iter_mut().find(|h| h.channel == d.channel) {
                h.items.push((d.offset, d.payload.clone()));
                o.waiting += d.payload.len();
                self.check_bound(&mut o);
                return;
            }
        }
        if o.writes_through() {
            let framed = d.framed(ws::text_frame);
            self.write_or_queue(&mut o, Item::Msg(d.payload.clone()), Some(framed));
        } else {
            self.write_or_queue(&mut o, Item::Msg(d.payload.clone()), None);
        }
    }

    fn resubscribe(&self, channel: &str) {
        let mut o = self.lock();
        if o.blocked.iter().any(|c| &**c == channel) {
            return;
        }
        o.blocked.push(Arc::from(channel));
        o.floors.retain(|(c, _)| &**c != channel);
        o.control.push(Control::Resubscribe {
            channel: channel.to_owned(),
        });
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A `Conn` on one end of a loopback connection, and the other end.
    async fn pair() -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let metrics = Metrics::new(&switchboard_hub::HubMetrics::default());
        let conn = Conn::new(Arc::from("c"), accepted.unwrap().0, 1 << 20, metrics);
        (conn, client.unwrap())
    }

    /// Reads what has arrived within a short wait.
    async fn received(peer: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) =
            tokio::time::timeout(std::time::Duration::from_millis(100), peer.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    fn push(body: &'static str) -> Delivery {
        Delivery::new(Arc::from("chat:1"), 1, Bytes::from_static(body.as_bytes()))
    }

    #[tokio::test]
    async fn a_cork_joins_pushes_and_replies_into_one_frame() {
        let (conn, mut peer) = pair().await;
        conn.cork();
        conn.deliver(&push(r#"{"push":1}"#));
        conn.send(Bytes::from_static(br#"{"id":7,"publish":{}}"#));
        assert!(
            received(&mut peer).await.is_empty(),
            "nothing leaves while corked"
        );
        conn.uncork();
        assert_eq!(
            received(&mut peer).await,
            ws::text_frame(br#"{"push":1}"#.iter().chain(b"\n").chain(br#"{"id":7,"publish":{}}"#).copied().collect::<Vec<u8>>().as_slice()).to_vec()
        );
        // Uncorked, a push goes out on its own at once.
        conn.deliver(&push(r#"{"push":2}"#));
        assert_eq!(
            received(&mut peer).await,
            ws::text_frame(br#"{"push":2}"#).to_vec()
        );
        // A second uncork is a no-op; the bound still holds while corked.
        conn.uncork();
        assert!(!conn.has_backlog());
    }

    #[tokio::test]
    async fn the_write_bound_holds_while_corked() {
        let (conn, _peer) = pair().await;
        conn.cork();
        let big = Bytes::from(vec![b'x'; 600 * 1024]);
        conn.send(big.clone());
        assert_eq!(conn.closing(), None);
        conn.send(big);
        assert_eq!(conn.closing(), Some(codes::DISCONNECT_SLOW));
    }
}
