//! The two databases behind pgshift: blue (the current one) and green (the new one).

use std::fmt;

/// One of the two backends a session can be routed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    /// Both colors, blue first; handy for per-color arrays indexed by [`Color::index`].
    pub const ALL: [Color; 2] = [Color::Blue, Color::Green];

    /// The color's position in per-color arrays (blue 0, green 1).
    pub fn index(self) -> usize {
        match self {
            Color::Blue => 0,
            Color::Green => 1,
        }
    }

    /// The other color.
    pub fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }

    /// The lowercase name used in config, logs, metrics labels and admin replies.
    pub fn as_str(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }

    /// Parses `blue` or `green` (exact, lowercase).
    pub fn parse(text: &str) -> Option<Color> {
        match text {
            "blue" => Some(Color::Blue),
            "green" => Some(Color::Green),
            _ => None,
        }
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
