//! The admin socket's wire format, without the socket: lines in, JSON lines out.
//!
//! [`LineFramer`] cuts the bytes a peer sends into command lines, holding at most
//! [`MAX_COMMAND_BYTES`] of an unfinished line: a longer line is reported once as
//! [`Frame::TooLong`] and the rest of it is discarded, so a peer cannot make the server buffer
//! without bound and the connection stays usable. [`encode_reply`] turns a controller
//! [`Reply`] into the one-line JSON answer.

use crate::controller::Reply;

/// The longest command line accepted, in bytes, not counting its `\n`.
pub const MAX_COMMAND_BYTES: usize = 4096;

/// One unit of input for the server to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A whole line, without its `\n`.
    Line(String),
    /// A line longer than [`MAX_COMMAND_BYTES`]; its remaining bytes are skipped.
    TooLong,
    /// A line that is not UTF-8.
    NotUtf8,
}

/// The error text for [`Frame::TooLong`].
pub fn too_long_message() -> String {
    format!("command longer than {MAX_COMMAND_BYTES} bytes")
}

/// Splits a byte stream into [`Frame`]s.
#[derive(Debug, Default)]
pub struct LineFramer {
    /// The unfinished line so far; never longer than [`MAX_COMMAND_BYTES`].
    partial: Vec<u8>,
    /// True after [`Frame::TooLong`] until that line's `\n`.
    skipping_long_line: bool,
}

impl LineFramer {
    pub fn new() -> LineFramer {
        LineFramer::default()
    }

    /// Takes the next bytes read from the peer and returns the frames they complete, in order.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let line_end = bytes.iter().position(|&byte| byte == b'\n');
            let (piece, rest, ends_line) = match line_end {
                Some(end) => (&bytes[..end], &bytes[end + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            if self.skipping_long_line {
                self.skipping_long_line = !ends_line;
                continue;
            }
            if self.partial.len() + piece.len() > MAX_COMMAND_BYTES {
                self.partial.clear();
                self.skipping_long_line = !ends_line;
                frames.push(Frame::TooLong);
                continue;
            }
            self.partial.extend_from_slice(piece);
            if ends_line {
                frames.push(self.take_line());
            }
        }
        frames
    }

    /// The peer closed its side: a last line without `\n` still counts.
    pub fn finish(&mut self) -> Option<Frame> {
        if self.skipping_long_line || self.partial.is_empty() {
            self.skipping_long_line = false;
            self.partial.clear();
            None
        } else {
            Some(self.take_line())
        }
    }

    fn take_line(&mut self) -> Frame {
        let bytes = std::mem::take(&mut self.partial);
        match String::from_utf8(bytes) {
            Ok(line) => Frame::Line(line),
            Err(_) => Frame::NotUtf8,
        }
    }
}

/// The reply line (with its `\n`): `{"ok":true,...fields}` or `{"ok":false,"error":"why"}`.
/// `ok` comes first; an `ok` among the controller's fields is ignored.
pub fn encode_reply(reply: &Reply) -> String {
    let mut line = String::with_capacity(64);
    match reply {
        Ok(fields) => {
            line.push_str("{\"ok\":true");
            for (name, value) in fields.iter().filter(|(name, _)| name.as_str() != "ok") {
                line.push(',');
                line.push_str(&serde_json::Value::String(name.clone()).to_string());
                line.push(':');
                line.push_str(&value.to_string());
            }
            line.push('}');
        }
        Err(error) => {
            line.push_str("{\"ok\":false,\"error\":");
            line.push_str(&serde_json::Value::String(error.clone()).to_string());
            line.push('}');
        }
    }
    line.push('\n');
    line
}

/// A refusal line, for errors found before or instead of asking the controller.
pub fn encode_error(error: impl Into<String>) -> String {
    encode_reply(&Err(error.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(text: &str) -> Frame {
        Frame::Line(text.to_string())
    }

    #[test]
    fn lines_may_arrive_in_pieces_or_together() {
        let mut framer = LineFramer::new();
        assert_eq!(framer.push(b"sta"), vec![]);
        assert_eq!(framer.push(b"tus\nweight 4"), vec![line("status")]);
        assert_eq!(
            framer.push(b"0\r\n\nreload\n"),
            vec![line("weight 40\r"), line(""), line("reload")]
        );
        assert_eq!(framer.finish(), None);
    }

    #[test]
    fn a_last_line_without_newline_counts_at_the_end() {
        let mut framer = LineFramer::new();
        assert_eq!(framer.push(b"status"), vec![]);
        assert_eq!(framer.finish(), Some(line("status")));
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_accepted() {
        let mut framer = LineFramer::new();
        let long = "x".repeat(MAX_COMMAND_BYTES);
        assert_eq!(framer.push(long.as_bytes()), vec![]);
        assert_eq!(framer.push(b"\n"), vec![line(&long)]);
    }

    #[test]
    fn a_long_line_is_reported_once_and_skipped() {
        let mut framer = LineFramer::new();
        let mut frames = Vec::new();
        for _ in 0..10 {
            frames.extend(framer.push(&[b'a'; 1000]));
            assert!(framer.partial.len() <= MAX_COMMAND_BYTES);
        }
        frames.extend(framer.push(b"aaa\nstatus\n"));
        assert_eq!(frames, vec![Frame::TooLong, line("status")]);
    }

    #[test]
    fn a_long_line_in_one_chunk_is_skipped_to_its_end() {
        let mut framer = LineFramer::new();
        let mut bytes = vec![b'a'; MAX_COMMAND_BYTES + 1];
        bytes.extend_from_slice(b"\nstatus\n");
        assert_eq!(framer.push(&bytes), vec![Frame::TooLong, line("status")]);
    }

    #[test]
    fn a_long_unfinished_line_is_dropped_at_the_end() {
        let mut framer = LineFramer::new();
        assert_eq!(
            framer.push(&[b'a'; MAX_COMMAND_BYTES + 10]),
            vec![Frame::TooLong]
        );
        assert_eq!(framer.finish(), None);
    }

    #[test]
    fn non_utf8_lines_are_reported() {
        let mut framer = LineFramer::new();
        assert_eq!(
            framer.push(b"\xff\xfe\nstatus\n"),
            vec![Frame::NotUtf8, line("status")]
        );
    }

    #[test]
    fn replies_put_ok_first() {
        let mut fields = serde_json::Map::new();
        fields.insert("green_weight".into(), json!(40.0));
        fields.insert("ok".into(), json!("ignored"));
        fields.insert("note".into(), json!("a \"quoted\"\nline"));
        let text = encode_reply(&Ok(fields));
        assert!(text.starts_with("{\"ok\":true,"), "{text}");
        assert!(
            text.ends_with("}\n") && text.matches('\n').count() == 1,
            "{text}"
        );
        let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(
            value,
            json!({"ok": true, "green_weight": 40.0, "note": "a \"quoted\"\nline"})
        );
    }

    #[test]
    fn refusals_carry_the_error() {
        let text = encode_error("no \"such\" thing");
        assert_eq!(text, "{\"ok\":false,\"error\":\"no \\\"such\\\" thing\"}\n");
    }
}
