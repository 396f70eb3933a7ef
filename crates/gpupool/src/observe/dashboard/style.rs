//! Whether and how renders are coloured.
//!
//! Colour is for people at a terminal: it is on only when the output stream is a terminal and
//! `NO_COLOR` is unset or empty (<https://no-color.org>). Logs, pipes, files and tests get
//! plain text, so their bytes do not depend on where they were produced.
#![forbid(unsafe_code)]

use std::io::IsTerminal;

/// How a render is styled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Style {
    /// Emit ANSI colour sequences.
    pub color: bool,
}

/// The colours a render uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Paint {
    /// Titles and section headings.
    Heading,
    /// Good news.
    Green,
    /// Worth a look.
    Yellow,
    /// Act on it.
    Red,
}

impl Style {
    /// Plain text.
    pub const PLAIN: Style = Style { color: false };
    /// ANSI colours.
    pub const COLOR: Style = Style { color: true };

    /// Colour when `stream` is a terminal and `NO_COLOR` is unset or empty.
    pub fn detect(stream: &impl IsTerminal) -> Style {
        Style::from_environment(stream.is_terminal(), std::env::var_os("NO_COLOR"))
    }

    /// Colour for standard output, as [`Style::detect`].
    pub fn for_stdout() -> Style {
        Style::detect(&std::io::stdout())
    }

    /// The rule behind [`Style::detect`], with its inputs explicit.
    pub fn from_environment(is_terminal: bool, no_color: Option<std::ffi::OsString>) -> Style {
        let suppressed = no_color.is_some_and(|value| !value.is_empty());
        Style {
            color: is_terminal && !suppressed,
        }
    }

    pub(crate) fn paint(self, paint: Paint, text: &str) -> String {
        if !self.color {
            return text.to_string();
        }
        let code = match paint {
            Paint::Heading => "1;36",
            Paint::Green => "32",
            Paint::Yellow => "33",
            Paint::Red => "1;31",
        };
        format!("\u{1b}[{code}m{text}\u{1b}[0m")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_needs_a_terminal_and_no_no_color() {
        assert!(Style::from_environment(true, None).color);
        assert!(Style::from_environment(true, Some("".into())).color);
        assert!(!Style::from_environment(true, Some("1".into())).color);
        assert!(!Style::from_environment(false, None).color);
        assert_eq!(Style::PLAIN.paint(Paint::Red, "x"), "x");
        assert_eq!(
            Style::COLOR.paint(Paint::Green, "x"),
            "\u{1b}[32mx\u{1b}[0m"
        );
    }
}
