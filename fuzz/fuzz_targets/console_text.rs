//! What a guest prints (its console, process names and tags, error text):
//! escaped before a terminal sees it. No control character survives but
//! newline and tab (when lines are kept), and a one-line cell is one line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn no_controls(s: &str, keep_lines: bool) -> bool {
    s.chars().all(|c| {
        let n = c as u32;
        let control = n < 0x20 || n == 0x7f || (0x80..0xa0).contains(&n);
        !control || (keep_lines && (c == '\n' || c == '\t'))
    })
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    assert!(no_controls(
        &banger_core::text::escape_control(&s, true),
        true
    ));
    assert!(no_controls(
        &banger_core::text::escape_control(&s, false),
        false
    ));
    let cell = banger_core::text::one_line(&s);
    assert!(
        !cell.contains('\n') && no_controls(&cell, false),
        "{cell:?}"
    );
});
