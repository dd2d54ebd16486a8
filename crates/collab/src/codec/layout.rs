//! Where the blocks of a Yjs update (v1) sit, per client, and the part of an update a
//! document can integrate without a hole.
//!
//! yrs 0.28.1 integrates a block that starts past its client's clock (when nothing it refers
//! to is missing) behind a "skip" hole, where Yjs keeps it pending. A later update whose
//! block spans such a hole is split twice while yrs trims what it already knows, and the
//! first piece keeps a pointer to the freed middle piece: a heap use-after-free inside yrs
//! (found by the `ywebsocket` fuzz target, input `fuzz/known/ywebsocket-yrs-use-after-free`).
//! The content of such a block is also in no effective update, so it is never relayed nor
//! persisted. Both need a hole in the document, so none is ever made: the server hands yrs
//! only the blocks that continue what the document has ([`Layout::fit`]), and asks the
//! sender for the rest (see `Document::apply`).
//!
//! The walk reads each block with yrs's own content decoder, so clocks and lengths are
//! exactly the ones yrs will assign. It also refuses what yrs would accept but misplace: a
//! client listed twice (its blocks would not be in clock order) and clocks past `u32::MAX`;
//! and the legacy JSON content (Yjs's `ContentJSON`, which Yjs 13 no longer writes), which
//! yrs decodes with one string more than it encodes, so that the document's own updates of
//! it never load again; and subdocuments (a `Y.Doc` inside a document), whose yrs 0.28.1
//! documents are never freed (a reference cycle: LeakSanitizer saw every load of such a
//! document leak it whole). Both found by the `ywebsocket` fuzz target.

use std::collections::HashSet;
use std::sync::Arc;

use yrs::block::{ClientID, ItemContent};
use yrs::encoding::read::{Cursor, Error, Read};
use yrs::encoding::write::Write;
use yrs::updates::decoder::Decoder;
use yrs::{Any, StateVector, ID};

/// yrs's info byte values and flags (the Yjs v1 encoding).
const GC: u8 = 0;
const SKIP: u8 = 10;
const HAS_ORIGIN: u8 = 0b1000_0000;
const HAS_RIGHT_ORIGIN: u8 = 0b0100_0000;
const HAS_PARENT_SUB: u8 = 0b0010_0000;
/// The content kinds (low four bits of an item's info) of legacy JSON content and of
/// subdocuments.
const CONTENT_JSON: u8 = 2;
const CONTENT_DOC: u8 = 9;

/// The block sections of an update, in the order they are encoded.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    sections: Vec<Section>,
    /// Where the delete set starts.
    delete_set: usize,
}

/// One client's blocks.
#[derive(Debug, Clone)]
struct Section {
    client: ClientID,
    /// Byte offset just after the block count.
    after_count: usize,
    blocks: Vec<Block>,
}

#[derive(Debug, Clone, Copy)]
struct Block {
    clock: u32,
    len: u32,
    /// A skip (content the sender does not have) or an item yrs drops (zero length):
    /// nothing is integrated for it.
    inert: bool,
    /// Byte offset just after the block.
    end: usize,
}

/// The part of an update that continues what a document has.
pub(crate) enum Fit {
    /// All of it.
    Whole,
    /// Blocks start past what the document has of their client: this update (encoded v1)
    /// holds the rest, which may be empty of blocks (its delete set is kept).
    Trimmed(Vec<u8>),
}

impl Layout {
    /// Walks an update; `None` if it does not decode or is misplaced (see the module docs).
    /// Must run inside a panic guard: yrs's decoders assert on some hostile values.
    pub(crate) fn of(bytes: &[u8]) -> Option<Layout> {
        walk(bytes).ok()
    }

    /// Whether the document with state vector `known` can integrate every block, and if not
    /// the update cut before the first block of each client that would leave a hole.
    pub(crate) fn fit(&self, bytes: &[u8], known: &StateVector) -> Fit {
        let cuts: Vec<usize> = self
            .sections
            .iter()
            .map(|s| s.holeless_prefix(known.get(&s.client)))
            .collect();
        if cuts
            .iter()
            .zip(&self.sections)
            .all(|(&cut, s)| cut == s.blocks.len())
        {
            return Fit::Whole;
        }
        let kept: Vec<(&Section, usize)> = self
            .sections
            .iter()
            .zip(cuts)
            .filter(|(_, cut)| *cut > 0)
            .collect();
        let mut out = Vec::with_capacity(bytes.len());
        out.write_var(kept.len() as u64);
        for (s, cut) in kept {
            out.write_var(cut as u64);
            // The client id, the first clock and the kept blocks, as they were.
            out.extend_from_slice(&bytes[s.after_count..s.blocks[cut - 1].end]);
        }
        out.extend_from_slice(&bytes[self.delete_set..]);
        Fit::Trimmed(out)
    }
}

impl Section {
    /// How many blocks, from the first, can be integrated on top of `clock` without a hole.
    fn holeless_prefix(&self, clock: u32) -> usize {
        let mut reach = clock;
        for (i, b) in self.blocks.iter().enumerate() {
            if b.inert {
                continue;
            }
            if b.clock > reach {
                return i;
            }
            reach = reach.max(b.clock + b.len);
        }
        self.blocks.len()
    }
}

fn walk(bytes: &[u8]) -> Result<Layout, Error> {
    let mut d = Walker {
        cursor: Cursor::new(bytes),
    };
    let clients: u32 = d.read_var()?;
    let mut seen = HashSet::new();
    // At least three bytes per section: checked by the caller (`update_counts_fit`).
    let mut sections = Vec::with_capacity(clients as usize);
    for _ in 0..clients {
        let count: u32 = d.read_var()?;
        let after_count = d.cursor.next;
        let client = d.read_client()?;
        let mut clock: u32 = d.read_var()?;
        let after_clock = d.cursor.next;
        if !seen.insert(client) {
            return Err(Error::UnexpectedValue);
        }
        // A block takes a byte at least.
        if count as usize > bytes.len() - after_clock {
            return Err(Error::EndOfBuffer(count as usize));
        }
        let mut blocks = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let (len, inert) = block(&mut d)?;
            blocks.push(Block {
                clock,
                len,
                inert: inert || len == 0,
                end: d.cursor.next,
            });
            clock = clock.checked_add(len).ok_or(Error::UnexpectedValue)?;
        }
        sections.push(Section {
            client,
            after_count,
            blocks,
        });
    }
    Ok(Layout {
        sections,
        delete_set: d.cursor.next,
    })
}

/// Reads one block as `Update::decode` does: its clock length, and whether it is inert.
fn block(d: &mut Walker<'_>) -> Result<(u32, bool), Error> {
    let info = d.read_info()?;
    match info {
        SKIP => nonzero(d.read_var()?).map(|len| (len, true)),
        GC => nonzero(d.read_len()?).map(|len| (len, false)),
        info => {
            if info & HAS_ORIGIN != 0 {
                d.read_left_id()?;
            }
            if info & HAS_RIGHT_ORIGIN != 0 {
                d.read_right_id()?;
            }
            if info & (HAS_ORIGIN | HAS_RIGHT_ORIGIN) == 0 {
                if d.read_parent_info()? {
                    d.read_string()?;
                } else {
                    d.read_left_id()?;
                }
                if info & HAS_PARENT_SUB != 0 {
                    d.read_string()?;
                }
            }
            if matches!(info & 0b1111, CONTENT_JSON | CONTENT_DOC) {
                return Err(Error::UnexpectedValue);
            }
            let content = ItemContent::decode(d, info)?;
            Ok((content.len_utf16(), false))
        }
    }
}

fn nonzero(len: u32) -> Result<u32, Error> {
    if len == 0 {
        Err(Error::UnexpectedValue)
    } else {
        Ok(len)
    }
}

/// yrs's v1 decoder, over a cursor whose position the walk reads.
struct Walker<'a> {
    cursor: Cursor<'a>,
}

impl Read for Walker<'_> {
    fn read_exact(&mut self, len: usize) -> Result<&[u8], Error> {
        self.cursor.read_exact(len)
    }

    fn read_u8(&mut self) -> Result<u8, Error> {
        self.cursor.read_u8()
    }
}

impl Decoder for Walker<'_> {
    fn reset_ds_cur_val(&mut self) {}

    fn read_ds_clock(&mut self) -> Result<u32, Error> {
        self.read_var()
    }

    fn read_ds_len(&mut self) -> Result<u32, Error> {
        self.read_var()
    }

    fn read_left_id(&mut self) -> Result<ID, Error> {
        let client: u64 = self.read_var()?;
        Ok(ID::new(ClientID::new(client), self.read_var()?))
    }

    fn read_right_id(&mut self) -> Result<ID, Error> {
        self.read_left_id()
    }

    fn read_client(&mut self) -> Result<ClientID, Error> {
        let client: u64 = self.read_var()?;
        Ok(ClientID::new(client))
    }

    fn read_info(&mut self) -> Result<u8, Error> {
        self.read_u8()
    }

    fn read_parent_info(&mut self) -> Result<bool, Error> {
        let info: u32 = self.read_var()?;
        Ok(info == 1)
    }

    fn read_type_ref(&mut self) -> Result<u8, Error> {
        self.read_u8()
    }

    fn read_len(&mut self) -> Result<u32, Error> {
        self.read_var()
    }

    fn read_any(&mut self) -> Result<Any, Error> {
        Any::decode(self)
    }

    fn read_json(&mut self) -> Result<Any, Error> {
        let src = self.read_string()?;
        Any::from_json(src)
    }

    fn read_key(&mut self) -> Result<Arc<str>, Error> {
        Ok(self.read_string()?.into())
    }

    fn read_to_end(&mut self) -> Result<&[u8], Error> {
        Ok(&self.cursor.buf[self.cursor.next..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::updates::decoder::Decode;
    use yrs::updates::encoder::Encode;
    use yrs::{
        Array, Doc, Map, ReadTxn, Text, Transact, Update, XmlElementPrelim, XmlFragment,
        XmlTextPrelim,
    };

    /// Every kind of content yrs encodes, from two clients, with deletions.
    fn rich_update() -> Vec<u8> {
        let a = Doc::with_client_id(1);
        let b = Doc::with_client_id(2);
        {
            let text = a.get_or_insert_text("content");
            let map = a.get_or_insert_map("meta");
            let list = a.get_or_insert_array("list");
            let xml = a.get_or_insert_xml_fragment("xml");
            let mut t = a.transact_mut();
            text.insert(&mut t, 0, "hello big world");
            text.format(&mut t, 0, 5, [("bold".into(), true.into())].into());
            text.insert_embed(&mut t, 3, yrs::Any::from("embed"));
            text.remove_range(&mut t, 6, 3);
            map.insert(&mut t, "n", 1.5);
            map.insert(&mut t, "s", "x");
            map.insert(&mut t, "bin", yrs::Any::from(vec![1u8, 2, 3]));
            map.insert(&mut t, "n", 2);
            list.insert_range(&mut t, 0, [1, 2, 3]);
            list.remove(&mut t, 1);
            let el = xml.insert(&mut t, 0, XmlElementPrelim::empty("p"));
            el.insert(&mut t, 0, XmlTextPrelim::new("para"));
        }
        let first = a
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        b.transact_mut()
            .apply_update(Update::decode_v1(&first).unwrap())
            .unwrap();
        {
            let text = b.get_or_insert_text("content");
            let mut t = b.transact_mut();
            text.insert(&mut t, 2, "B");
            text.push(&mut t, "😀é"); // two UTF-16 units and one: clocks count those
            text.remove_range(&mut t, 0, 1);
        }
        let bytes = b
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        bytes
    }

    /// The walk assigns the clocks yrs assigns.
    #[test]
    fn the_walk_agrees_with_yrs_on_every_block() {
        let bytes = rich_update();
        let layout = Layout::of(&bytes).expect("walks");
        let update = Update::decode_v1(&bytes).unwrap();
        let mut walked = yrs::IdSet::new();
        for s in &layout.sections {
            for b in s.blocks.iter().filter(|b| !b.inert) {
                walked.insert(ID::new(s.client, b.clock), b.len);
            }
        }
        let theirs = update.insertions(true);
        for client in [1, 2] {
            let client = ClientID::new(client);
            for clock in 0..64 {
                let id = ID::new(client, clock);
                assert_eq!(walked.contains(&id), theirs.contains(&id), "{id:?}");
            }
        }
        assert!(theirs.contains(&ID::new(ClientID::new(1), 10)));
        assert_eq!(layout.sections.len(), 2);
        assert_eq!(&bytes[layout.delete_set..], update.delete_set().encode_v1());
        // A document that has nothing takes all of it: clocks start at 0.
        assert!(matches!(
            layout.fit(&bytes, &StateVector::default()),
            Fit::Whole
        ));
    }

    fn one_block(client: u64, clock: u32, text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        out.write_var(1u32); // sections
        section(&mut out, client, clock, text);
        out.write_var(0u32); // empty delete set
        out
    }

    /// A section with one string block at the start of the root text `content`.
    fn section(out: &mut Vec<u8>, client: u64, clock: u32, text: &str) {
        out.write_var(1u32);
        out.write_var(client);
        out.write_var(clock);
        out.write_u8(4); // a string item, no origins: its parent follows
        out.write_var(1u32); // parent named by a string
        out.write_string("content");
        out.write_string(text);
    }

    #[test]
    fn blocks_past_their_clients_clock_are_cut_with_what_follows() {
        // Client 7 continues at 0; client 9 starts at 5 with nothing before it.
        let mut bytes = Vec::new();
        bytes.write_var(2u32);
        section(&mut bytes, 7, 0, "ab");
        section(&mut bytes, 9, 5, "cd");
        bytes.extend_from_slice(&[1, 7, 1, 0, 1]); // deletes 7:0
        let layout = Layout::of(&bytes).unwrap();
        let Fit::Trimmed(cut) = layout.fit(&bytes, &StateVector::default()) else {
            panic!("client 9 has a hole before it")
        };
        let cut = Update::decode_v1(&cut).unwrap();
        let sv = cut.state_vector();
        assert_eq!(sv.get(&ClientID::new(7)), 2);
        assert_eq!(sv.get(&ClientID::new(9)), 0);
        assert!(cut.insertions(true).contains(&ID::new(ClientID::new(7), 1)));
        assert!(!cut.insertions(true).contains(&ID::new(ClientID::new(9), 5)));
        assert!(!cut.delete_set().is_empty(), "the delete set is kept");

        // Once the document has client 9 up to 5, all of it fits.
        let mut known = StateVector::default();
        known.set_max(ClientID::new(9), 5);
        assert!(matches!(layout.fit(&bytes, &known), Fit::Whole));

        // And a cut that leaves nothing is still an update (of the delete set only).
        let lone = one_block(9, 5, "x");
        let Fit::Trimmed(cut) = Layout::of(&lone)
            .unwrap()
            .fit(&lone, &StateVector::default())
        else {
            panic!("a hole")
        };
        assert!(Update::decode_v1(&cut).unwrap().is_empty());
    }

    #[test]
    fn a_skip_inside_an_update_is_a_hole_unless_the_document_covers_it() {
        // Client 3: "ab" at 0, skip 2..4, "cd" at 4.
        let mut bytes = Vec::new();
        bytes.write_var(1u32);
        bytes.write_var(3u32);
        bytes.write_var(3u64);
        bytes.write_var(0u32);
        for (i, t) in ["ab", "", "cd"].iter().enumerate() {
            if i == 1 {
                bytes.write_u8(SKIP);
                bytes.write_var(2u32);
            } else {
                bytes.write_u8(4);
                bytes.write_var(1u32);
                bytes.write_string("content");
                bytes.write_string(t);
            }
        }
        bytes.write_var(0u32);
        let layout = Layout::of(&bytes).unwrap();
        let Fit::Trimmed(cut) = layout.fit(&bytes, &StateVector::default()) else {
            panic!("the skip is a hole")
        };
        let cut = Update::decode_v1(&cut).unwrap();
        assert_eq!(cut.state_vector().get(&ClientID::new(3)), 2);
        let mut known = StateVector::default();
        known.set_max(ClientID::new(3), 4);
        assert!(matches!(layout.fit(&bytes, &known), Fit::Whole));
    }

    #[test]
    fn a_client_listed_twice_or_clocks_past_u32_max_are_refused() {
        let mut twice = Vec::new();
        twice.write_var(2u32);
        section(&mut twice, 7, 5, "ab");
        section(&mut twice, 7, 0, "cd");
        twice.write_var(0u32);
        assert!(Update::decode_v1(&twice).is_ok(), "yrs takes it");
        assert!(Layout::of(&twice).is_none());

        let past = one_block(7, u32::MAX - 1, "abc");
        assert!(Layout::of(&past).is_none());
        assert!(Layout::of(&one_block(7, u32::MAX - 3, "abc")).is_some());
    }

    /// Regression (found by the `ywebsocket` target): yrs wrote this content back with
    /// one string fewer than it reads, so the persisted update did not load.
    #[test]
    fn legacy_json_content_is_refused() {
        let bytes: &[u8] = &[1, 1, 3, 0, 2, 1, 0, 0, 0, 0];
        let update = Update::decode_v1(bytes).expect("yrs takes it");
        assert!(
            Update::decode_v1(&update.encode_v1()).is_err(),
            "and cannot read back what it writes of it"
        );
        assert!(Layout::of(bytes).is_none());
    }

    /// Regression (found by the `ywebsocket` target, LeakSanitizer): a document holding a
    /// subdocument is never freed by yrs 0.28.1, so every load of it leaked.
    #[test]
    fn subdocuments_are_refused() {
        let doc = Doc::with_client_id(5);
        let map = doc.get_or_insert_map("m");
        let bytes = {
            let mut txn = doc.transact_mut();
            map.insert(&mut txn, "sub", Doc::new());
            txn.encode_update_v1()
        };
        assert!(Update::decode_v1(&bytes).is_ok(), "yrs takes it");
        assert!(Layout::of(&bytes).is_none());
    }

    #[test]
    fn truncated_updates_are_refused() {
        let bytes = rich_update();
        for n in 0..bytes.len() - 1 {
            // Only a cut inside the trailing delete set can still read as an update.
            if let Some(l) = Layout::of(&bytes[..n]) {
                assert!(n >= l.delete_set, "cut at {n}");
            }
        }
    }
}
