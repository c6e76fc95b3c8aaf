//! Text that came from a guest (its console, its hostname, an error quoting
//! either) made safe for a terminal: control characters are shown, never
//! interpreted, so a guest cannot move the cursor, retitle the window or
//! hide a line of `banger vm ls`.

/// `s` with every control character (C0, DEL, C1) escaped as `\xNN` or
/// `\u{NNNN}`; newlines and tabs are kept when `keep_lines`.
pub fn escape_control(s: &str, keep_lines: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' | '\t' if keep_lines => out.push(c),
            '\r' if keep_lines => {}
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if (0x80..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\u{{{:04x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// The first line of `s`, escaped, with a marker when lines were dropped:
/// what a table cell shows of a multi-line message.
pub fn one_line(s: &str) -> String {
    let mut lines = s.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or("");
    let mut out = escape_control(first.trim_end(), false);
    if lines.next().is_some() {
        out.push_str(" (...)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_interpreted() {
        let evil = "ok\x1b]0;pwned\x07\x1b[2J\r\nnext\u{9b}31m\x7f";
        let e = escape_control(evil, true);
        assert!(!e.chars().any(|c| c.is_control() && c != '\n'), "{e:?}");
        assert_eq!(e, "ok\\x1b]0;pwned\\x07\\x1b[2J\nnext\\u{009b}31m\\x7f");
        let e = escape_control("a\nb\tc", false);
        assert_eq!(e, "a\\x0ab\\x09c");
        assert_eq!(escape_control("héllo", false), "héllo");
    }

    #[test]
    fn one_line_keeps_the_first_line() {
        assert_eq!(one_line("boom\nmore\nlines"), "boom (...)");
        assert_eq!(one_line("\n\nonly\n"), "only");
        assert_eq!(one_line("x\x1b[31my"), "x\\x1b[31my");
        assert_eq!(one_line(""), "");
    }
}
