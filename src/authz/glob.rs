//! GLib's `g_pattern_match_simple()`, as QEMU's authz-list uses it for rules
//! with `"format": "glob"` (authz/list.c).
//!
//! Semantics, from glib/gpattern.c: `*` matches any run of characters
//! (including none), `?` matches exactly one character (`g_utf8_next_char`,
//! so one UTF-8 character, not one byte); every other character, `[`, `]` and
//! `\` included, matches itself; there is no escaping; the whole string must
//! match. Consecutive `*` collapse (g_pattern_spec_new), which is also what
//! the algorithm below does naturally.
//!
//! GLib's matcher recurses per `*`. This one is the iterative two-cursor form
//! that backtracks only to the most recent `*`: O(pattern x string) in the worst
//! case, never exponential, so a hostile ACL pattern cannot stall a handshake.

/// True if `text` matches the glob `pattern` in full.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    // Position just after the last `*` seen, and the text position it is
    // currently assumed to have consumed up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                pi += 1;
                star = Some((pi, ti));
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                // Let the last `*` swallow one more character and retry.
                // Earlier stars never need revisiting: anything they could
                // absorb, the last one can absorb instead.
                Some((sp, st)) => {
                    pi = sp;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn star_and_question() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "anything at all"));
        assert!(glob_match("dan*", "dan"));
        assert!(glob_match("dan*", "danb"));
        assert!(!glob_match("dan*", "da"));
        assert!(glob_match("*.example.com", "CN=x.example.com"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("a**b", "ab"));
        assert!(glob_match("?", "x"));
        assert!(!glob_match("?", ""));
        assert!(!glob_match("?", "xy"));
        assert!(glob_match("*?", "x"));
        assert!(!glob_match("*?", ""));
        assert!(glob_match("?*?", "ab"));
        assert!(glob_match("*a", "aaa"));
        assert!(glob_match("*ab*ab", "abababab"));
    }

    #[test]
    fn empty_pattern_matches_only_empty_string() {
        assert!(glob_match("", ""));
        assert!(!glob_match("", "a"));
    }

    #[test]
    fn whole_string_and_case_sensitive() {
        assert!(!glob_match("dan", "danb"));
        assert!(!glob_match("anb", "danb"));
        assert!(!glob_match("DAN*", "danb"));
    }

    #[test]
    fn brackets_and_backslash_are_literal() {
        assert!(glob_match("[ab]", "[ab]"));
        assert!(!glob_match("[ab]", "a"));
        assert!(glob_match("CN=[*]", "CN=[x]"));
        assert!(glob_match(r"a\*", r"a\bc"));
        assert!(!glob_match(r"a\*", "a*"), "backslash does not escape");
        assert!(glob_match(r"O=Foo\, Inc*", r"O=Foo\, Inc.,CN=x"));
    }

    #[test]
    fn question_mark_is_one_utf8_character() {
        assert!(glob_match("?", "é")); // 2 bytes
        assert!(glob_match("?", "€")); // 3 bytes
        assert!(glob_match("?", "😀")); // 4 bytes
        assert!(!glob_match("??", "é"));
        assert!(glob_match("CN=Jos?", "CN=José"));
        assert!(glob_match("*é?", "aéb"));
        assert!(glob_match("CN=?ü*", "CN=Müller"));
    }

    #[test]
    fn pathological_pattern_completes() {
        // Exponential for a naive backtracker; quadratic at worst here.
        let text = "a".repeat(20_000);
        assert!(!glob_match("*a*a*a*a*a*a*a*a*a*a*b", &text));
        let pat = "*a".repeat(500) + "b";
        assert!(!glob_match(&pat, &text));
        assert!(glob_match(&("*a".repeat(500) + "*"), &text));
    }
}

/// An independent matcher for the property tests: GLib's semantics written
/// the obvious way (recursion per `*`, exponential in the worst case), to
/// check [`glob_match`] against on small inputs.
#[cfg(test)]
pub(crate) fn reference_match(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|k| go(rest, &t[k..])),
            Some(('?', rest)) => !t.is_empty() && go(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

#[cfg(test)]
mod props {
    use super::{glob_match, reference_match};
    use proptest::prelude::*;

    /// Wildcards, the characters GLib takes literally although other globs
    /// do not, ASCII letters, and 2-, 3- and 4-byte UTF-8 characters (so
    /// that `?` consuming a byte instead of a character would show).
    const ALPHABET: &[char] = &['a', 'b', '*', '?', '[', ']', '\\', 'é', '€', '😀'];
    /// The same without the wildcards.
    const LITERALS: &[char] = &['a', 'b', '[', ']', '\\', 'é', '€', '😀'];

    fn string_over(chars: &'static [char], max: usize) -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(chars), 0..=max)
            .prop_map(|v| v.into_iter().collect())
    }

    /// A text that matches `pattern` by construction: each `*` replaced by
    /// `stars[i]`, each `?` by `ones[i]` (cycling through the choices).
    fn instantiate(pattern: &str, stars: &[String], ones: &[char]) -> String {
        let (mut si, mut oi) = (0, 0);
        let mut out = String::new();
        for c in pattern.chars() {
            match c {
                '*' => {
                    out.push_str(&stars[si % stars.len()]);
                    si += 1;
                }
                '?' => {
                    out.push(ones[oi % ones.len()]);
                    oi += 1;
                }
                c => out.push(c),
            }
        }
        out
    }

    /// A pattern and a text: either unrelated, or a matching instance of
    /// the pattern, possibly with one character changed, dropped or added
    /// (so that both outcomes are common, and near misses too).
    fn pattern_and_text() -> impl Strategy<Value = (String, String)> {
        let instance = (
            string_over(ALPHABET, 10),
            prop::collection::vec(string_over(ALPHABET, 4), 1..4),
            prop::collection::vec(prop::sample::select(ALPHABET), 1..4),
            0usize..4,
            any::<prop::sample::Index>(),
            prop::sample::select(ALPHABET),
        )
            .prop_map(|(p, stars, ones, edit, at, c)| {
                let mut t: Vec<char> = instantiate(&p, &stars, &ones).chars().collect();
                match edit {
                    1 if !t.is_empty() => {
                        let i = at.index(t.len());
                        t[i] = c;
                    }
                    2 if !t.is_empty() => {
                        t.remove(at.index(t.len()));
                    }
                    3 => t.insert(at.index(t.len() + 1), c),
                    _ => {}
                }
                (p, t.into_iter().collect())
            });
        prop_oneof![
            (string_over(ALPHABET, 10), string_over(ALPHABET, 12)),
            instance,
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn agrees_with_reference((pattern, text) in pattern_and_text()) {
            prop_assert_eq!(
                glob_match(&pattern, &text),
                reference_match(&pattern, &text),
                "pattern {:?} text {:?}", pattern, text
            );
        }

        #[test]
        fn an_instance_of_the_pattern_matches(
            pattern in string_over(ALPHABET, 10),
            stars in prop::collection::vec(string_over(ALPHABET, 4), 1..4),
            ones in prop::collection::vec(prop::sample::select(ALPHABET), 1..4),
        ) {
            let text = instantiate(&pattern, &stars, &ones);
            prop_assert!(glob_match(&pattern, &text), "pattern {:?} text {:?}", pattern, text);
        }

        #[test]
        fn without_wildcards_matches_only_itself(
            pattern in string_over(LITERALS, 8),
            text in string_over(LITERALS, 8),
        ) {
            prop_assert!(glob_match(&pattern, &pattern));
            prop_assert_eq!(glob_match(&pattern, &text), pattern == text);
        }

        #[test]
        fn star_matches_everything(text in string_over(ALPHABET, 16), n in 1usize..4) {
            prop_assert!(glob_match(&"*".repeat(n), &text));
        }

        /// g_pattern_spec_new collapses runs of `*`: doubling every star
        /// changes nothing.
        #[test]
        fn consecutive_stars_collapse((pattern, text) in pattern_and_text()) {
            let doubled = pattern.replace('*', "**");
            prop_assert_eq!(glob_match(&doubled, &text), glob_match(&pattern, &text));
        }
    }
}
