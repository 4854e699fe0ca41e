//! Header-only framing of a typed message stream (everything after the startup packet).
//!
//! The relay keeps the bytes it has read in one buffer per direction and forwards them in large
//! chunks. A [`Framer`] walks that buffer message header by message header (1 type byte, 4
//! length bytes) without copying: a message whose type the caller does not inspect is released
//! for forwarding as soon as its header is read, and its body streams through however large it
//! is; a message the caller inspects is released only once it is whole in the buffer, so the
//! caller can read (or rewrite in place) its body first. Lengths are checked before anything is
//! trusted: below 4 or above the configured maximum is a protocol violation.

use std::ops::Range;

/// Inspected messages larger than this are streamed through without inspection.
pub const MAX_INSPECTED_MESSAGE: usize = 64 * 1024;

/// One message header met by the framer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    /// The message's whole length as on the wire (type byte included).
    pub wire_len: usize,
    /// Where the body lies in the buffer, for inspected messages that arrived whole.
    pub body: Option<Range<usize>>,
}

/// A message length that cannot be honest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid message length {length} for message type {tag:?} (limit {limit} bytes)", tag = *.tag as char)]
pub struct BadLength {
    pub tag: u8,
    pub length: u32,
    pub limit: usize,
}

/// The set of message types a direction inspects, as a 256-bit mask.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TagSet([u64; 4]);

impl TagSet {
    pub const fn of(tags: &[u8]) -> TagSet {
        let mut set = [0u64; 4];
        let mut index = 0;
        while index < tags.len() {
            let tag = tags[index] as usize;
            set[tag / 64] |= 1 << (tag % 64);
            index += 1;
        }
        TagSet(set)
    }

    #[inline]
    pub fn contains(&self, tag: u8) -> bool {
        self.0[tag as usize / 64] & (1 << (tag % 64)) != 0
    }
}

/// Walks message headers across reads. `released` is how far the buffer may be forwarded.
#[derive(Debug)]
pub struct Framer {
    /// Bytes of the current streamed message's body not yet in the buffer.
    body_remaining: usize,
    /// Offset in the buffer up to which bytes may be forwarded.
    released: usize,
    max_message_size: usize,
    inspected: TagSet,
}

impl Framer {
    pub fn new(inspected: TagSet, max_message_size: usize) -> Framer {
        Framer {
            body_remaining: 0,
            released: 0,
            max_message_size,
            inspected,
        }
    }

    /// Changes which message types are inspected (for example once login is over).
    pub fn set_inspected(&mut self, inspected: TagSet) {
        self.inspected = inspected;
    }

    /// How many bytes at the front of the buffer may be forwarded now.
    #[inline]
    pub fn released(&self) -> usize {
        self.released
    }

    /// True when the released bytes end exactly at a message boundary.
    #[inline]
    pub fn at_boundary(&self) -> bool {
        self.body_remaining == 0
    }

    /// Tells the framer that `count` bytes were taken off the front of the buffer.
    #[inline]
    pub fn consumed(&mut self, count: usize) {
        debug_assert!(count <= self.released);
        self.released -= count;
    }

    /// Advances over the buffer and returns the next message header, if one is complete.
    /// Call repeatedly until it returns `Ok(None)`; then wait for more bytes.
    #[inline]
    pub fn next_frame(&mut self, buffer: &[u8]) -> Result<Option<Frame>, BadLength> {
        if self.body_remaining > 0 {
            let available = buffer.len() - self.released;
            let step = available.min(self.body_remaining);
            self.released += step;
            self.body_remaining -= step;
            if self.body_remaining > 0 {
                return Ok(None);
            }
        }
        let start = self.released;
        let Some(header) = buffer.get(start..start + 5) else {
            return Ok(None);
        };
        let tag = header[0];
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if length < 4 || length as usize > self.max_message_size {
            return Err(BadLength {
                tag,
                length,
                limit: self.max_message_size,
            });
        }
        let wire_len = 1 + length as usize;
        if self.inspected.contains(tag) && wire_len <= MAX_INSPECTED_MESSAGE {
            if buffer.len() - start < wire_len {
                return Ok(None);
            }
            self.released = start + wire_len;
            return Ok(Some(Frame {
                tag,
                wire_len,
                body: Some(start + 5..start + wire_len),
            }));
        }
        let in_buffer = (buffer.len() - start).min(wire_len);
        self.released = start + in_buffer;
        self.body_remaining = wire_len - in_buffer;
        Ok(Some(Frame {
            tag,
            wire_len,
            body: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![tag];
        bytes.extend(((body.len() + 4) as u32).to_be_bytes());
        bytes.extend(body);
        bytes
    }

    fn drain(framer: &mut Framer, buffer: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(frame) = framer.next_frame(buffer).expect("valid") {
            frames.push(frame);
        }
        frames
    }

    #[test]
    fn streams_uninspected_and_holds_inspected_until_whole() {
        let mut framer = Framer::new(TagSet::of(b"Z"), 1 << 30);
        let mut stream = message(b'D', &[1; 10]);
        stream.extend(message(b'Z', b"I"));
        // Only the DataRow's header and part of its body have arrived.
        let frames = drain(&mut framer, &stream[..8]);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].tag, b'D');
        assert_eq!(framer.released(), 8);
        assert!(!framer.at_boundary());
        // The rest of the DataRow and half of the ReadyForQuery.
        assert!(drain(&mut framer, &stream[..18]).is_empty());
        assert_eq!(framer.released(), 15);
        assert!(framer.at_boundary());
        let frames = drain(&mut framer, &stream);
        assert_eq!(frames.len(), 1);
        assert_eq!(
            frames[0].body.clone().map(|range| &stream[range]),
            Some(&b"I"[..])
        );
        assert_eq!(framer.released(), stream.len());
    }

    #[test]
    fn consumed_shifts_offsets() {
        let mut framer = Framer::new(TagSet::of(b"E"), 1 << 30);
        let mut buffer = message(b'C', b"SELECT 1\0");
        drain(&mut framer, &buffer);
        let released = framer.released();
        buffer.drain(..released);
        framer.consumed(released);
        buffer.extend(message(b'E', b"C42P01\0\0"));
        let frames = drain(&mut framer, &buffer);
        assert_eq!(frames[0].body, Some(5..buffer.len()));
    }

    #[test]
    fn rejects_dishonest_lengths() {
        let mut framer = Framer::new(TagSet::default(), 1024);
        let err = framer.next_frame(&[b'Q', 0, 0, 0, 3]).unwrap_err();
        assert_eq!(err.length, 3);
        let mut framer = Framer::new(TagSet::default(), 1024);
        assert!(framer.next_frame(&[b'Q', 0, 0, 4, 1]).is_err());
        let mut framer = Framer::new(TagSet::default(), 1024);
        assert!(framer.next_frame(&[b'Q', 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn oversized_inspected_messages_stream_through() {
        let mut framer = Framer::new(TagSet::of(b"E"), 1 << 30);
        let body = vec![b'x'; MAX_INSPECTED_MESSAGE + 10];
        let stream = message(b'E', &body);
        let frames = drain(&mut framer, &stream[..100]);
        assert_eq!(frames[0].body, None);
        assert_eq!(framer.released(), 100);
    }
}
