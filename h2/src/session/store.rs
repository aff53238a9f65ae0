//! The stream store: a connection's streams in a slab, the index from stream ids to
//! slab keys, the ids this end hands out, and what became of the peer's streams no
//! longer kept (two bit masks over its latest ids).
//!
//! It keeps the books of which streams exist, not what they do: the protocol's
//! rules are in the receiving and sending halves of the session.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::{Index, IndexMut};
use std::task::Waker;

use bytes::Bytes;
use http::{HeaderMap, response};
use slab::Slab;

use super::Role;
use crate::error::Error;
use crate::frame;

/// How many of the peer's latest stream ids [`Store::past`] remembers.
const HISTORY: u32 = u128::BITS;

/// Stream ids are unique integers: a multiply is hash enough.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// What became of a stream id at or below the last one the client opened, once the
/// stream is no longer kept (or was never made).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Past {
    /// Skipped: the client opened a higher id first, which closed this one unused.
    Skipped,
    /// Opened, and closed normally, or by the client.
    Closed,
    /// This end reset it (or refused it): what the client sent before it knew is
    /// ignored (RFC 9113 §5.1).
    Reset,
    /// Too far back to tell.
    Unknown,
}

pub struct Stream {
    /// 0 until opened (a client stream waiting for the backend's stream limit).
    pub id: u32,
    /// Tells this stream from a later one in the same slab slot.
    pub(super) serial: u64,
    /// Handles alive: the stream is forgotten when none are and it is closed.
    pub(super) refs: u8,
    /// Counted in `Inner::active` (open, not yet closed both ways).
    pub(super) counted: bool,

    // Receiving.
    pub recv_closed: bool,
    /// A response head waiting for its [`crate::streams::ResponseFuture`].
    pub head: Option<response::Parts>,
    pub(super) got_head: bool,
    /// A HEAD request's response announces a length it does not carry.
    pub(super) head_request: bool,
    pub data: VecDeque<Bytes>,
    pub trailers: Option<HeaderMap>,
    pub(super) recv_window: i64,
    pub(super) recv_unreleased: u32,
    /// What content-length said is still to come.
    pub(super) expected: Option<u64>,
    pub recv_waker: Option<Waker>,
    /// No one reads this stream's data any more: what arrives is given back at once.
    pub(super) recv_dropped: bool,

    // Sending.
    pub(super) send_closed: bool,
    pub(super) send_window: i64,
    /// Data the windows hold back, and whether it ends the stream.
    pub(super) pending: Option<(Bytes, bool)>,
    pub(super) pending_trailers: Option<HeaderMap>,
    pub send_waker: Option<Waker>,
    /// In `Inner::blocked`, waiting for the scheduler.
    pub(super) queued: bool,
    /// A client stream's header block, encoded while it waits for a stream slot.
    pub(super) waiting_block: Option<(Vec<u8>, bool)>,

    /// Why the stream ended early, if it did.
    pub reset: Option<Error>,
}

impl Stream {
    /// A stream with `refs` handles, and the windows it starts with.
    pub(super) fn new(id: u32, refs: u8, recv_window: u32, send_window: u32) -> Stream {
        Stream {
            id,
            serial: 0,
            refs,
            counted: false,
            recv_closed: false,
            head: None,
            got_head: false,
            head_request: false,
            data: VecDeque::new(),
            trailers: None,
            recv_window: recv_window as i64,
            recv_unreleased: 0,
            expected: None,
            recv_waker: None,
            recv_dropped: false,
            send_closed: false,
            send_window: send_window as i64,
            pending: None,
            pending_trailers: None,
            send_waker: None,
            queued: false,
            waiting_block: None,
            reset: None,
        }
    }

    pub(super) fn wake_recv(&mut self) {
        if let Some(waker) = self.recv_waker.take() {
            waker.wake();
        }
    }

    pub(super) fn wake_send(&mut self) {
        if let Some(waker) = self.send_waker.take() {
            waker.wake();
        }
    }

    /// Done both ways, or reset.
    pub(super) fn closed(&self) -> bool {
        self.reset.is_some() || (self.recv_closed && self.send_closed)
    }

    /// Bytes received and not yet read.
    pub(super) fn unread(&self) -> usize {
        self.data.iter().map(Bytes::len).sum()
    }
}

pub struct Store {
    role: Role,
    slab: Slab<Stream>,
    ids: HashMap<u32, usize, BuildHasherDefault<IdHasher>>,
    next_serial: u64,
    /// The id the next stream this end opens gets (client).
    next_stream: u32,
    /// The highest id the peer opened a stream with (server).
    last_peer_stream: u32,
    /// Of the client's stream ids below and at `last_peer_stream` (server), bit `i`
    /// for `last_peer_stream - 2i`: those it opened, and those of them this end
    /// reset. Shifted only when a stream opens: see [`Store::past`].
    peer_opened: u128,
    peer_reset: u128,
}

impl Store {
    pub fn new(role: Role) -> Store {
        Store {
            role,
            slab: Slab::new(),
            ids: HashMap::default(),
            next_serial: 0,
            next_stream: 1,
            last_peer_stream: 0,
            peer_opened: 0,
            peer_reset: 0,
        }
    }

    /// Keeps `stream` (indexed by its id unless it has none yet); its key comes back.
    pub fn insert(&mut self, mut stream: Stream) -> usize {
        self.next_serial += 1;
        stream.serial = self.next_serial;
        let id = stream.id;
        let key = self.slab.insert(stream);
        if id != 0 {
            self.ids.insert(id, key);
        }
        key
    }

    /// Gives the stream at `key` the next id of this end's (client).
    pub fn assign_id(&mut self, key: usize) -> u32 {
        let id = self.next_stream;
        self.next_stream += 2;
        self.ids.insert(id, key);
        self.slab[key].id = id;
        id
    }

    /// Forgets the stream at `key`.
    pub fn remove(&mut self, key: usize) -> Stream {
        let stream = self.slab.remove(key);
        if stream.id != 0 {
            self.ids.remove(&stream.id);
        }
        stream
    }

    /// The key of the stream with id `id`, if it is kept.
    #[inline]
    pub fn key(&self, id: u32) -> Option<usize> {
        self.ids.get(&id).copied()
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut Stream> {
        self.slab.get_mut(key)
    }

    /// The stream at `key` if it is still the one `serial` was (a queue entry may
    /// outlive its stream, and the slot be reused).
    pub fn live(&mut self, key: usize, serial: u64) -> Option<&mut Stream> {
        self.slab.get_mut(key).filter(|s| s.serial == serial)
    }

    pub fn iter(&self) -> slab::Iter<'_, Stream> {
        self.slab.iter()
    }

    pub fn iter_mut(&mut self) -> slab::IterMut<'_, Stream> {
        self.slab.iter_mut()
    }

    /// Whether this end's stream ids are used up (client).
    pub fn ids_exhausted(&self) -> bool {
        self.next_stream > frame::MAX_WINDOW
    }

    /// The highest stream id the peer opened (what a GOAWAY names).
    pub fn last_peer_stream(&self) -> u32 {
        self.last_peer_stream
    }

    /// Whether `id` names a stream that was never opened (frames on it are errors).
    pub fn idle(&self, id: u32) -> bool {
        let peer_opens = (self.role == Role::Server) == (id % 2 == 1);
        if peer_opens {
            id > self.last_peer_stream
        } else {
            id >= self.next_stream
        }
    }

    /// The client opened stream `id`, above every id before (server).
    pub fn peer_opens(&mut self, id: u32) {
        let shift = (id - self.last_peer_stream) / 2;
        if shift >= HISTORY {
            (self.peer_opened, self.peer_reset) = (0, 0);
        } else {
            self.peer_opened <<= shift;
            self.peer_reset <<= shift;
        }
        self.peer_opened |= 1;
        self.last_peer_stream = id;
    }

    /// The history bit of the client's stream `id`, if it is recent enough.
    fn history_bit(&self, id: u32) -> Option<u128> {
        let back = self.last_peer_stream.checked_sub(id)? / 2;
        (back < HISTORY).then(|| 1 << back)
    }

    /// This end reset (or refused) the client's stream `id` (server).
    pub fn mark_reset(&mut self, id: u32) {
        if let Some(bit) = self.history_bit(id) {
            self.peer_reset |= bit;
        }
    }

    /// What became of the client's stream `id` (odd, at most `last_peer_stream`),
    /// which is no longer kept (server).
    pub fn past(&self, id: u32) -> Past {
        match self.history_bit(id) {
            None => Past::Unknown,
            Some(bit) if self.peer_opened & bit == 0 => Past::Skipped,
            Some(bit) if self.peer_reset & bit != 0 => Past::Reset,
            Some(_) => Past::Closed,
        }
    }

    /// Panics unless the id index and the streams agree. For tests.
    #[cfg(test)]
    pub fn check(&self) {
        for (&id, &key) in &self.ids {
            assert_eq!(
                self.slab[key].id, id,
                "the id index points at another stream"
            );
        }
        let with_ids = self.slab.iter().filter(|(_, s)| s.id != 0).count();
        assert_eq!(
            self.ids.len(),
            with_ids,
            "a stream with an id is not indexed"
        );
    }
}

impl Index<usize> for Store {
    type Output = Stream;

    #[inline]
    fn index(&self, key: usize) -> &Stream {
        &self.slab[key]
    }
}

impl IndexMut<usize> for Store {
    #[inline]
    fn index_mut(&mut self, key: usize) -> &mut Stream {
        &mut self.slab[key]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(id: u32) -> Stream {
        Stream::new(id, 1, 65_535, 65_535)
    }

    #[test]
    fn ids_index_the_streams_kept() {
        let mut store = Store::new(Role::Server);
        let a = store.insert(stream(1));
        let b = store.insert(stream(3));
        assert_eq!(
            (store.key(1), store.key(3), store.key(5)),
            (Some(a), Some(b), None)
        );
        store.check();
        let serial = store[a].serial;
        assert_eq!(store.remove(a).id, 1);
        assert_eq!(store.key(1), None);
        // The slot is reused: a queue entry for the old stream no longer finds it.
        let c = store.insert(stream(5));
        assert_eq!(c, a);
        assert!(store.live(c, serial).is_none());
        let serial = store[c].serial;
        assert!(store.live(c, serial).is_some());
        assert_eq!(store.iter().count(), 2);
        store.check();
    }

    #[test]
    fn a_client_hands_out_odd_ids_in_order() {
        let mut store = Store::new(Role::Client);
        let a = store.insert(stream(0));
        let b = store.insert(stream(0));
        assert_eq!(store.key(1), None, "no id until opened");
        assert!(store.idle(1));
        assert_eq!(store.assign_id(b), 1);
        assert_eq!(store.assign_id(a), 3);
        assert_eq!((store.key(1), store.key(3)), (Some(b), Some(a)));
        assert!(!store.idle(3) && store.idle(5));
        // Even ids are the server's: a client never sees one opened.
        assert!(store.idle(2));
        assert!(!store.ids_exhausted());
        store.check();
    }

    #[test]
    fn the_peers_past_streams_are_told_apart() {
        let mut store = Store::new(Role::Server);
        assert!(store.idle(1));
        store.peer_opens(1);
        store.peer_opens(5);
        store.mark_reset(5);
        store.peer_opens(7);
        assert_eq!(store.last_peer_stream(), 7);
        assert!(!store.idle(7) && store.idle(9));
        assert_eq!(store.past(1), Past::Closed);
        assert_eq!(store.past(3), Past::Skipped);
        assert_eq!(store.past(5), Past::Reset);
        assert_eq!(store.past(7), Past::Closed);
        // Marks outlive later streams, as far back as the history goes.
        for id in (9..=2 * HISTORY + 1).step_by(2) {
            store.peer_opens(id);
        }
        assert_eq!(store.past(5), Past::Reset);
        assert_eq!(store.past(3), Past::Skipped);
        assert_eq!(store.past(1), Past::Unknown);
        // A jump beyond the history forgets it all.
        let far = 2 * HISTORY + 1001;
        store.peer_opens(far);
        assert_eq!(store.past(far), Past::Closed);
        assert_eq!(store.past(far - 2), Past::Skipped);
        assert_eq!(store.past(5), Past::Unknown);
        // Ids the client never reached, or ours, are not its past.
        store.mark_reset(far + 2);
        assert!(store.idle(far + 2));
    }
}
