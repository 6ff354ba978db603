//! Deterministic token text: a pure function of (request id, prompt, token index).
//!
//! The vocabulary is built to hurt parsers: multi-byte UTF-8 of every width (2, 3 and 4 bytes),
//! characters JSON must escape (`"`, `\`, newline, tab), and punctuation with no leading space.
//! Its length is prime, so every stride walks the whole vocabulary: any 23 consecutive tokens
//! of a response contain each entry exactly once, whatever the seed.

/// Token texts; the length must stay prime (see the module docs).
const VOCABULARY: [&str; 23] = [
    " The",
    " simulated",
    " model",
    " streams",
    " tokens",
    ",",
    ".",
    " é",
    "✓",
    " 日本",
    "語",
    " café",
    " naïve",
    " 🚀",
    " \"quoted\"",
    "\n",
    " back\\slash",
    " tab\t",
    " ok",
    " and",
    " ü",
    "—",
    " end",
];

/// Seeds the token sequence from what identifies the request (FNV-1a, 64 bit).
pub(crate) fn seed(request_id: &str, prompt_text: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    // The 0xff separator cannot occur in UTF-8, so ("ab", "c") and ("a", "bc") seed differently.
    for byte in request_id
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(prompt_text.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    hash
}

/// The text of token `index` (0-based) of the response seeded with `seed`.
pub(crate) fn token(seed: u64, index: u64) -> &'static str {
    let len = VOCABULARY.len() as u64;
    let start = seed % len;
    // Any stride in 1..len is coprime with the prime length.
    let stride = 1 + (seed >> 32) % (len - 1);
    let position = (start + (index % len) * stride) % len;
    VOCABULARY
        .get(usize::try_from(position).unwrap_or(0))
        .copied()
        .unwrap_or(" ")
}

/// Concatenated text of tokens `from..to`.
pub(crate) fn text(seed: u64, from: u64, to: u64) -> String {
    (from..to).map(|i| token(seed, i)).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn vocabulary_length_is_prime_so_every_stride_covers_it() {
        let len = VOCABULARY.len();
        assert!((2..len).all(|d| !len.is_multiple_of(d)));
    }

    #[test]
    fn any_window_of_vocabulary_length_holds_every_token_once() {
        for request in ["a", "b", "req-17", "日本"] {
            let seed = seed(request, "prompt");
            let window: HashSet<&str> = (5..5 + VOCABULARY.len() as u64)
                .map(|i| token(seed, i))
                .collect();
            assert_eq!(window.len(), VOCABULARY.len());
        }
    }

    #[test]
    fn vocabulary_has_two_three_and_four_byte_characters_and_json_escapes() {
        let widths: HashSet<usize> = VOCABULARY
            .iter()
            .flat_map(|t| t.chars())
            .map(char::len_utf8)
            .collect();
        assert!(widths.is_superset(&HashSet::from([1, 2, 3, 4])));
        for needs_escape in ['"', '\\', '\n', '\t'] {
            assert!(VOCABULARY.iter().any(|t| t.contains(needs_escape)));
        }
    }

    #[test]
    fn token_text_depends_only_on_request_id_prompt_and_index() {
        let a = text(seed("r1", "hello"), 0, 40);
        assert_eq!(a, text(seed("r1", "hello"), 0, 40));
        assert_ne!(a, text(seed("r2", "hello"), 0, 40));
        assert_ne!(a, text(seed("r1", "hellO"), 0, 40));
        assert_ne!(seed("ab", "c"), seed("a", "bc"));
    }
}
