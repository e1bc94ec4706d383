//! Small text helpers shared by the machines.

/// `text` cut to at most `max_bytes` bytes, at a character boundary (never splitting
/// a UTF-8 sequence). Used to bound error messages that come from user code.
pub fn truncate_at_char_boundary(mut text: String, max_bytes: usize) -> String {
    if text.len() > max_bytes {
        let mut end = max_bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_splits_a_character() {
        assert_eq!(truncate_at_char_boundary("héllo".to_owned(), 2), "h", "é is two bytes");
        assert_eq!(truncate_at_char_boundary("héllo".to_owned(), 3), "hé");
        assert_eq!(truncate_at_char_boundary("short".to_owned(), 100), "short");
        assert_eq!(truncate_at_char_boundary("abc".to_owned(), 0), "");
    }
}
