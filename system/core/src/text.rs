//! Small text helpers shared by the machines, and bounded reading of text files.

/// Largest config or scenario file read (they are a few KiB).
pub const CONFIG_FILE_BYTES_MAX: u64 = 1 << 20;

/// Reads a UTF-8 file of at most `max_bytes`: a larger one is an error (`InvalidData`,
/// naming the bound) before more than the bound is read, so a file given by mistake (a
/// log, a device) cannot fill memory.
pub fn read_text_bounded(path: &std::path::Path, max_bytes: u64) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(max_bytes + 1).read_to_string(&mut text)?;
    if text.len() as u64 > max_bytes {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max_bytes} bytes; not a file of this kind"),
        ));
    }
    Ok(text)
}

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
    fn a_file_over_the_bound_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big.toml");
        std::fs::write(&path, vec![b'#'; 2048]).expect("write");
        assert_eq!(read_text_bounded(&path, 4096).expect("fits").len(), 2048);
        let err = read_text_bounded(&path, 1024).expect_err("too big");
        assert!(err.to_string().contains("larger than 1024 bytes"), "{err}");
    }

    #[test]
    fn never_splits_a_character() {
        assert_eq!(truncate_at_char_boundary("héllo".to_owned(), 2), "h", "é is two bytes");
        assert_eq!(truncate_at_char_boundary("héllo".to_owned(), 3), "hé");
        assert_eq!(truncate_at_char_boundary("short".to_owned(), 100), "short");
        assert_eq!(truncate_at_char_boundary("abc".to_owned(), 0), "");
    }
}
