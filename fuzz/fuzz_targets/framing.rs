//! The header framer over an arbitrary byte stream, delivered in arbitrary chunks and
//! consumed in arbitrary amounts: no panic, released bytes never pass the buffer's end, bodies
//! of inspected messages lie inside the buffer, and a length below 4 or above the limit is
//! always refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgshift::protocol::framing::{Framer, TagSet};

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // The first bytes steer the run: how many bytes arrive per read, how much is consumed.
    let Some((&steer, rest)) = data.split_first() else {
        return;
    };
    let Some((&consume_steer, stream)) = rest.split_first() else {
        return;
    };
    let chunk = usize::from(steer % 64) + 1;
    let mut framer = Framer::new(TagSet::of(b"EZKRpS"), LIMIT);
    let mut buffer: Vec<u8> = Vec::new();
    let mut offset = 0;
    let mut fed = 0;
    while fed < stream.len() {
        let next = (fed + chunk).min(stream.len());
        buffer.extend_from_slice(&stream[fed..next]);
        fed = next;
        loop {
            match framer.next_frame(&buffer) {
                Ok(Some(frame)) => {
                    let length = frame.wire_len - 1;
                    assert!((4..=LIMIT).contains(&length));
                    if let Some(body) = frame.body {
                        assert!(body.end <= buffer.len());
                        assert_eq!(body.len(), frame.wire_len - 5);
                    }
                    assert!(framer.released() <= buffer.len());
                }
                Ok(None) => break,
                Err(error) => {
                    let length = error.length as usize;
                    assert!(!(4..=LIMIT).contains(&length));
                    return;
                }
            }
        }
        assert!(framer.released() <= buffer.len());
        // Forward some of what was released, as the relay does.
        let take = match consume_steer % 3 {
            0 => framer.released(),
            1 => framer.released() / 2,
            _ => 0,
        };
        buffer.drain(..take);
        framer.consumed(take);
        offset += take;
    }
    let _ = offset;
});
