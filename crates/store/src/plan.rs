//! Batch planning for `append_messages` and `append_sends`, shared by both backends and free
//! of SQL.
//!
//! A backend opens the transaction, looks up what the batch refers to ([`Lookup`]; for
//! `append_sends` also each sender's standing in its room), and lets [`Plan::new`] decide
//! per message: error, duplicate, or new. It then reserves
//! offsets per room in ascending room order ([`Plan::room_counts`]; a fixed lock order, so
//! two batches never deadlock on each other's rooms), writes [`Plan::new_rows`], commits, and
//! turns the plan into results with [`Plan::finish`].

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::model::{AppendedMessage, Message, NewMessage};
use crate::shared::check_text;
use crate::StoreError;

/// What the database said about the references of a batch.
#[derive(Debug, Default)]
pub(crate) struct Lookup {
    /// Stored messages by `(user_id, client_msg_id)`.
    pub existing: HashMap<(i64, String), Message>,
    pub users: HashSet<i64>,
    pub rooms: HashSet<i64>,
    /// Room of each stored message named by a `reply_to`.
    pub reply_rooms: HashMap<i64, i64>,
    /// For `append_sends`: the `(room_id, user_id)` pairs of the batch whose sender may not
    /// send there, and why; every other pair is a member in good standing (so its room
    /// exists and its user too). `None`: not checked, and `users` and `rooms` decide instead.
    pub refused: Option<HashMap<(i64, i64), Refusal>>,
}

/// Why a sender may not send in a room, as the batch's transaction read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    NoRoom,
    NotMember,
    /// Muted in the room or banned, at the batch's time.
    Muted,
}

impl Refusal {
    /// The code the senders lookup returns: 0 no room, 1 not a member, 2 muted or banned.
    pub fn from_code(code: i32) -> Refusal {
        match code {
            0 => Refusal::NoRoom,
            1 => Refusal::NotMember,
            _ => Refusal::Muted,
        }
    }

    fn error(self) -> StoreError {
        match self {
            Refusal::NoRoom => StoreError::NotFound,
            Refusal::NotMember => StoreError::Forbidden,
            Refusal::Muted => StoreError::Muted,
        }
    }
}

/// The WHERE clause and code of the senders lookup, shared by both backends: a pair is
/// refused if its room is missing, its user is not a member, or the member is muted or
/// banned at `$now` (a ban without `until_at` lasts until lifted). Aliases: `r` rooms,
/// `rm` room_members, `b` user_bans.
macro_rules! refusal_sql {
    (code) => {
        "CASE WHEN r.id IS NULL THEN 0 WHEN rm.user_id IS NULL THEN 1 ELSE 2 END"
    };
    (where $now:literal) => {
        concat!(
            "r.id IS NULL OR rm.user_id IS NULL OR rm.muted_until > ",
            $now,
            " OR (b.user_id IS NOT NULL AND (b.until_at IS NULL OR b.until_at > ",
            $now,
            "))"
        )
    };
}
pub(crate) use refusal_sql;

/// The keys a batch needs looked up.
pub(crate) struct Wanted {
    pub keys: Vec<(i64, String)>,
    pub users: Vec<i64>,
    pub rooms: Vec<i64>,
    pub replies: Vec<i64>,
    /// `(room_id, user_id)` of every message, for `append_sends` (which then needs no
    /// `users` or `rooms` lookup); empty otherwise.
    pub senders: Vec<(i64, i64)>,
}

impl Wanted {
    /// What `batch` refers to; with `senders`, each sender's standing in its room instead of
    /// the batch's users and rooms.
    pub fn of(batch: &[NewMessage], senders: bool) -> Wanted {
        let mut keys = Vec::new();
        let mut users = Vec::new();
        let mut rooms = Vec::new();
        let mut replies = Vec::new();
        let mut pairs = Vec::new();
        for m in batch {
            if senders {
                pairs.push((m.room_id, m.user_id));
            } else {
                users.push(m.user_id);
                rooms.push(m.room_id);
            }
            // A key with NUL is refused by `Plan::new`; PostgreSQL would refuse the lookup.
            if let Some(c) = m.client_msg_id.as_ref().filter(|c| !c.contains('\0')) {
                keys.push((m.user_id, c.clone()));
            }
            replies.extend(m.reply_to);
        }
        for v in [&mut users, &mut rooms, &mut replies] {
            v.sort_unstable();
            v.dedup();
        }
        keys.sort_unstable();
        keys.dedup();
        pairs.sort_unstable();
        pairs.dedup();
        Wanted {
            keys,
            users,
            rooms,
            replies,
            senders: pairs,
        }
    }
}

enum Slot {
    Failed(StoreError),
    /// A duplicate of a committed message.
    Existing(Message),
    /// A duplicate of an earlier new message of this batch (its index).
    SameAs(usize),
    /// To insert; the offset is filled in by `assign`.
    New(i64),
}

pub(crate) struct Plan {
    batch: Vec<NewMessage>,
    slots: Vec<Slot>,
    created_at: i64,
}

impl Plan {
    pub fn new(batch: Vec<NewMessage>, lookup: Lookup, created_at: i64) -> Plan {
        let mut seen: HashMap<(i64, &str), usize> = HashMap::new();
        let mut slots = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            let slot = (|| {
                check_text("text", &m.text)?;
                if let Some(refused) = &lookup.refused {
                    // Before dedupe: a retry by a sender refused now is refused too.
                    if let Some(r) = refused.get(&(m.room_id, m.user_id)) {
                        return Err(r.error());
                    }
                }
                if let Some(c) = &m.client_msg_id {
                    check_text("client_msg_id", c)?;
                    if let Some(orig) = lookup.existing.get(&(m.user_id, c.clone())) {
                        return Ok(Slot::Existing(orig.clone()));
                    }
                    if let Some(&j) = seen.get(&(m.user_id, c.as_str())) {
                        return Ok(Slot::SameAs(j));
                    }
                }
                // A sender in good standing is a member: its room and user exist.
                if lookup.refused.is_none() {
                    if !lookup.rooms.contains(&m.room_id) {
                        return Err(StoreError::NotFound);
                    }
                    if !lookup.users.contains(&m.user_id) {
                        return Err(StoreError::Invalid(format!("unknown user {}", m.user_id)));
                    }
                }
                if let Some(r) = m.reply_to {
                    if lookup.reply_rooms.get(&r) != Some(&m.room_id) {
                        return Err(StoreError::Invalid(
                            "reply_to is not a message of this room".into(),
                        ));
                    }
                }
                Ok(Slot::New(0))
            })()
            .unwrap_or_else(Slot::Failed);
            if let (Slot::New(_), Some(c)) = (&slot, &m.client_msg_id) {
                seen.insert((m.user_id, c.as_str()), i);
            }
            slots.push(slot);
        }
        Plan {
            batch,
            slots,
            created_at,
        }
    }

    /// Gives the batch back, for a retry with a fresh lookup.
    pub fn into_batch(self) -> Vec<NewMessage> {
        self.batch
    }

    /// New messages per room, in ascending room id: the order to reserve offsets in.
    pub fn room_counts(&self) -> BTreeMap<i64, i64> {
        let mut counts = BTreeMap::new();
        for (m, s) in self.batch.iter().zip(&self.slots) {
            if let Slot::New(_) = s {
                *counts.entry(m.room_id).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Hands out offsets: `last[room]` is the room's last offset after reserving
    /// `room_counts()[room]` of them, so its new messages get the block just below it, in
    /// batch order.
    pub fn assign(&mut self, last: &BTreeMap<i64, i64>) {
        let counts = self.room_counts();
        let mut next: HashMap<i64, i64> = counts
            .iter()
            .map(|(room, n)| (*room, last[room] - n + 1))
            .collect();
        for (m, s) in self.batch.iter().zip(self.slots.iter_mut()) {
            if let Slot::New(offset) = s {
                let n = next.get_mut(&m.room_id).expect("room reserved");
                *offset = *n;
                *n += 1;
            }
        }
    }

    pub fn created_at(&self) -> i64 {
        self.created_at
    }

    /// The messages to insert with their offsets, in batch order.
    pub fn new_rows(&self) -> impl Iterator<Item = (&NewMessage, i64)> {
        self.batch
            .iter()
            .zip(&self.slots)
            .filter_map(|(m, s)| match s {
                Slot::New(offset) => Some((m, *offset)),
                _ => None,
            })
    }

    pub fn new_count(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::New(_)))
            .count()
    }

    /// Builds the results once the rows are committed; `ids` maps `(room_id, offset)` of
    /// every new row to its message id.
    pub fn finish(
        self,
        ids: &HashMap<(i64, i64), i64>,
    ) -> Vec<Result<AppendedMessage, StoreError>> {
        let created_at = self.created_at;
        let mut out: Vec<Result<AppendedMessage, StoreError>> =
            Vec::with_capacity(self.batch.len());
        for (m, s) in self.batch.into_iter().zip(self.slots) {
            out.push(match s {
                Slot::Failed(e) => Err(e),
                Slot::Existing(message) => Ok(AppendedMessage {
                    message,
                    duplicate: true,
                }),
                Slot::New(offset) => match ids.get(&(m.room_id, offset)) {
                    Some(&id) => Ok(AppendedMessage {
                        message: Message {
                            id,
                            room_id: m.room_id,
                            offset,
                            user_id: m.user_id,
                            client_msg_id: m.client_msg_id,
                            text: m.text,
                            reply_to: m.reply_to,
                            created_at,
                            edited_at: None,
                            deleted: false,
                            removed: false,
                        },
                        duplicate: false,
                    }),
                    None => Err(StoreError::other("inserted message id missing")),
                },
                Slot::SameAs(j) => match &out[j] {
                    Ok(orig) => Ok(AppendedMessage {
                        message: orig.message.clone(),
                        duplicate: true,
                    }),
                    Err(e) => Err(e.replicate()),
                },
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(room: i64, user: i64, cmid: Option<&str>) -> NewMessage {
        NewMessage {
            room_id: room,
            user_id: user,
            client_msg_id: cmid.map(str::to_owned),
            text: "hi".into(),
            reply_to: None,
        }
    }

    fn lookup() -> Lookup {
        Lookup {
            users: [1, 2].into(),
            rooms: [10, 20].into(),
            ..Lookup::default()
        }
    }

    #[test]
    fn offsets_follow_batch_order_per_room() {
        let batch = vec![
            msg(20, 1, Some("a")),
            msg(10, 1, Some("b")),
            msg(20, 2, Some("a")),
            msg(10, 1, Some("b")), // duplicate of index 1
            msg(99, 1, Some("c")), // no such room
            msg(10, 2, None),
        ];
        let mut plan = Plan::new(batch, lookup(), 5);
        let counts = plan.room_counts();
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            vec![(10, 2), (20, 2)]
        );
        // Room 10 was at 7 and reserved 2 (now 9); room 20 was at 0 (now 2).
        plan.assign(&[(10, 9), (20, 2)].into());
        let rows: Vec<_> = plan.new_rows().map(|(m, o)| (m.room_id, o)).collect();
        assert_eq!(rows, vec![(20, 1), (10, 8), (20, 2), (10, 9)]);
        let ids: HashMap<_, _> = [
            ((20, 1), 100),
            ((10, 8), 101),
            ((20, 2), 102),
            ((10, 9), 103),
        ]
        .into();
        let out = plan.finish(&ids);
        assert_eq!(out[1].as_ref().unwrap().message.id, 101);
        let dup = out[3].as_ref().unwrap();
        assert!(dup.duplicate);
        assert_eq!(dup.message.id, 101);
        assert!(matches!(out[4], Err(StoreError::NotFound)));
        assert_eq!(out[5].as_ref().unwrap().message.offset, 9);
    }

    #[test]
    fn a_failed_first_attempt_does_not_shadow_a_valid_retry() {
        let batch = vec![msg(99, 1, Some("x")), msg(10, 1, Some("x"))];
        let mut plan = Plan::new(batch, lookup(), 5);
        plan.assign(&[(10, 1)].into());
        let out = plan.finish(&[((10, 1), 7)].into());
        assert!(out[0].is_err());
        let second = out[1].as_ref().unwrap();
        assert!(!second.duplicate);
        assert_eq!(second.message.id, 7);
    }

    #[test]
    fn senders_are_checked_before_dedupe() {
        let refused = [
            ((10, 2), Refusal::NotMember),
            ((10, 3), Refusal::Muted),
            ((99, 1), Refusal::NoRoom),
        ]
        .into();
        let mut lk = Lookup {
            refused: Some(refused),
            ..Lookup::default()
        };
        let old = Message {
            id: 1,
            room_id: 10,
            offset: 1,
            user_id: 3,
            client_msg_id: Some("old".into()),
            text: "hi".into(),
            reply_to: None,
            created_at: 0,
            edited_at: None,
            deleted: false,
            removed: false,
        };
        lk.existing.insert((3, "old".into()), old);
        let batch = vec![
            msg(10, 1, None),
            msg(10, 2, None),
            msg(10, 3, Some("old")), // a retry of a stored message, but muted now
            msg(99, 1, None),
            msg(10, 4, None), // not refused: a member, although `users` is empty
        ];
        let mut plan = Plan::new(batch, lk, 50);
        assert_eq!(plan.new_count(), 2);
        plan.assign(&[(10, 2)].into());
        let out = plan.finish(&[((10, 1), 7), ((10, 2), 8)].into());
        assert_eq!(out[0].as_ref().unwrap().message.id, 7);
        assert!(matches!(out[1], Err(StoreError::Forbidden)));
        assert!(matches!(out[2], Err(StoreError::Muted)));
        assert!(matches!(out[3], Err(StoreError::NotFound)));
        assert_eq!(out[4].as_ref().unwrap().message.id, 8);
        let wanted = Wanted::of(&[msg(10, 1, None), msg(10, 1, None)], true);
        assert!(wanted.users.is_empty() && wanted.rooms.is_empty());
        assert_eq!(wanted.senders, vec![(10, 1)]);
    }

    #[test]
    fn invalid_input_is_refused_per_message() {
        let mut nul = msg(10, 1, None);
        nul.text = "a\0b".into();
        let mut reply = msg(10, 1, None);
        reply.reply_to = Some(5);
        let mut lk = lookup();
        lk.reply_rooms.insert(5, 20);
        let plan = Plan::new(vec![nul, reply, msg(10, 3, None)], lk, 0);
        assert_eq!(plan.new_count(), 0);
        let out = plan.finish(&HashMap::new());
        assert!(out.iter().all(|r| matches!(r, Err(StoreError::Invalid(_)))));
    }
}
