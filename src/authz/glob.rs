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
