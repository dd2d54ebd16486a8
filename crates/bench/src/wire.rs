//! The receive hot path. A subscriber may get a million pushes per second, so this module
//! never builds a JSON tree. It splits a frame on `\n` and classifies each line by its prefix.
//! For a publication it finds the publisher's timestamp (`"t":<ns>`) by byte search.
//!
//! This relies on two things the protocol guarantees: `data` is relayed verbatim, and a push
//! is `{"push":{...,"pub":{...,"data":...}}}` with no whitespace added.

/// One line of a server frame, as far as the bench cares.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// `{}`, the server's application-level ping. Answer it with `{}`.
    Ping,
    /// A publication push, with the publisher's send time in ns if the data has one.
    Pub(Option<u64>),
    /// Replies and any other pushes.
    Other,
}

/// The non-empty lines of a frame.
pub(crate) fn lines(frame: &[u8]) -> impl Iterator<Item = &[u8]> {
    frame
        .split(|&b| b == b'\n')
        .map(trim)
        .filter(|l| !l.is_empty())
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if !first.is_ascii_whitespace() {
            break;
        }
        s = rest;
    }
    while let [rest @ .., last] = s {
        if !last.is_ascii_whitespace() {
            break;
        }
        s = rest;
    }
    s
}

pub(crate) fn classify(line: &[u8]) -> Line {
    if line == b"{}" {
        return Line::Ping;
    }
    if !line.starts_with(b"{\"push\":") {
        return Line::Other;
    }
    match find(line, b"\"pub\":") {
        Some(at) => Line::Pub(send_time(&line[at..])),
        None => Line::Other,
    }
}

/// Whether a reply line (`{"id":N,...}`) reports an error.
pub(crate) fn is_error_reply(line: &[u8]) -> bool {
    line.starts_with(b"{\"id\":") && find(line, b"\"error\":").is_some()
}

/// The integer after the first `"t":` that follows `"data":`.
fn send_time(publication: &[u8]) -> Option<u64> {
    let data = find(publication, b"\"data\":")?;
    let rest = &publication[data..];
    let t = find(rest, b"\"t\":")?;
    leading_u64(&rest[t..]).map(|(n, _)| n)
}

/// Position just past the first occurrence of `needle` in `hay`. `None` for an empty needle.
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let last = hay.len().checked_sub(needle.len())?;
    // Test the first byte before comparing the rest: most positions fail there.
    (0..=last)
        .find(|&i| hay[i] == first && &hay[i + 1..i + needle.len()] == rest)
        .map(|i| i + needle.len())
}

/// The decimal integer at the start of `s` (at most 19 digits) and how many bytes it took.
pub(crate) fn leading_u64(s: &[u8]) -> Option<(u64, usize)> {
    let len = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if len == 0 || len > 19 {
        return None;
    }
    let n = s[..len]
        .iter()
        .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
    Some((n, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_send_time_from_a_push() {
        let push = br#"{"push":{"channel":"bench","pub":{"offset":17,"data":{"t":1763916296123456789,"p":"xxxx"}}}}"#;
        assert_eq!(classify(push), Line::Pub(Some(1763916296123456789)));
    }

    #[test]
    fn field_order_and_info_do_not_matter() {
        let push = br#"{"push":{"pub":{"data":{"p":"x","t":42},"info":{"user":"u","client":"c"}},"channel":"bench"}}"#;
        assert_eq!(classify(push), Line::Pub(Some(42)));
        // A "t" key before the data is not taken for the timestamp.
        let push = br#"{"push":{"channel":"c","t":9,"pub":{"offset":1,"t":8,"data":{"t":7}}}}"#;
        assert_eq!(classify(push), Line::Pub(Some(7)));
    }

    #[test]
    fn foreign_publications_have_no_time() {
        assert_eq!(
            classify(br#"{"push":{"channel":"c","pub":{"data":{"text":"hi"}}}}"#),
            Line::Pub(None)
        );
        assert_eq!(
            classify(br#"{"push":{"channel":"c","pub":{"data":{"t":"str"}}}}"#),
            Line::Pub(None)
        );
        assert_eq!(
            classify(br#"{"push":{"channel":"c","pub":{"data":{"t":123456789012345678901}}}}"#),
            Line::Pub(None)
        );
    }

    #[test]
    fn pings_replies_and_other_pushes() {
        assert_eq!(classify(b"{}"), Line::Ping);
        assert_eq!(
            classify(br#"{"id":2,"subscribe":{"delta":false}}"#),
            Line::Other
        );
        assert_eq!(
            classify(br#"{"push":{"channel":"c","join":{"info":{"user":"u","client":"c"}}}}"#),
            Line::Other
        );
    }

    #[test]
    fn error_replies() {
        assert!(is_error_reply(
            br#"{"id":9,"error":{"code":103,"message":"permission denied"}}"#
        ));
        assert!(!is_error_reply(br#"{"id":9,"publish":{}}"#));
        assert!(!is_error_reply(
            br#"{"push":{"channel":"c","pub":{"data":{"error":1}}}}"#
        ));
    }

    #[test]
    fn find_and_leading_numbers() {
        assert_eq!(find(b"abcabd", b"abd"), Some(6));
        assert_eq!(find(b"abcabd", b"a"), Some(1));
        assert_eq!(find(b"ab", b"abc"), None);
        assert_eq!(find(b"abc", b""), None);
        assert_eq!(leading_u64(b"123,x"), Some((123, 3)));
        assert_eq!(leading_u64(b"x1"), None);
        assert_eq!(leading_u64(b"18446744073709551615"), None);
        assert_eq!(
            leading_u64(b"9999999999999999999"),
            Some((9_999_999_999_999_999_999, 19))
        );
    }

    #[test]
    fn splits_batched_frames() {
        let frame = b"{\"push\":{\"channel\":\"b\",\"pub\":{\"data\":{\"t\":1}}}}\n{}\n\n{\"push\":{\"channel\":\"b\",\"pub\":{\"data\":{\"t\":2}}}}\r\n";
        let got: Vec<Line> = lines(frame).map(classify).collect();
        assert_eq!(
            got,
            vec![Line::Pub(Some(1)), Line::Ping, Line::Pub(Some(2))]
        );
    }
}
