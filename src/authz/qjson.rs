//! A JSON reader that accepts exactly what QEMU's `qobject_from_json()` accepts,
//! so an ACL file written for QEMU's authz-list-file loads here unchanged, and
//! one QEMU refuses is refused here too.
//!
//! serde_json is not used because QEMU's dialect differs from RFC 8259
//! (qobject/json-lexer.c, qobject/json-parser.c, qobject/qjson.c):
//! - single-quoted strings are accepted, and `\'` is a valid escape in both kinds;
//! - a duplicate key in an object is an error ("duplicate key");
//! - a trailing comma is an error (parse_array/parse_object expect a value or a
//!   key after every `,`);
//! - whitespace is only space, tab, CR, LF; literal names are `[a-z]+`, of which
//!   only true/false/null are valid;
//! - strings must be valid UTF-8 without control characters, surrogates or
//!   Unicode noncharacters (util/unicode.c mod_utf8_codepoint);
//! - input is a C string: it ends at the first NUL byte (g_file_get_contents
//!   followed by strlen);
//! - exactly one value: nothing is "Expecting a JSON value", two are "Expecting
//!   at most one JSON value";
//! - nesting is limited (json-streamer.c MAX_NESTING is 1024; the limit here
//!   is lower to bound recursion on small thread stacks, and any ACL nested
//!   deeper than 3 levels is refused by QEMU's schema check anyway).
//!
//! One deliberate difference: QEMU stores `\u0000` as modified UTF-8 (C0 80);
//! a Rust string cannot hold that and no certificate DN contains NUL, so it is
//! rejected with a clear message.

use std::fmt;

/// Where a value or an error starts: 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {} column {}", self.line, self.column)
    }
}

/// A parsed value with the position where it starts, kept so that schema
/// errors (bad policy, missing match) can point into the file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Number,
    String(String),
    Array(Vec<Node>),
    /// Members in document order; keys are unique (duplicates are refused).
    Object(Vec<(String, Node)>),
}

impl Value {
    /// The type name QEMU's input visitor uses in "expected: ..." messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JsonError {
    pub pos: Pos,
    pub message: String,
}

const MAX_NESTING: usize = 64;

/// Parses `input` as QEMU would parse the contents of an authz-list-file.
pub(crate) fn parse(input: &[u8]) -> Result<Node, JsonError> {
    // QEMU hands the file to the lexer as a C string.
    let end = input.iter().position(|&b| b == 0).unwrap_or(input.len());
    let mut p = Parser {
        s: &input[..end],
        i: 0,
        line: 1,
        column: 1,
    };
    p.skip_ws();
    if p.peek().is_none() {
        return Err(p.error_here("Expecting a JSON value"));
    }
    let node = p.value(0)?;
    p.skip_ws();
    if p.peek().is_some() {
        return Err(p.error_here("Expecting at most one JSON value"));
    }
    Ok(node)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    line: usize,
    column: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            column: self.column,
        }
    }

    fn bump(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.i += 1;
        if b == b'\n' {
            self.line += 1;
            self.column = 1;
        } else if b & 0xC0 != 0x80 {
            // Count characters, not UTF-8 continuation bytes.
            self.column += 1;
        }
        Some(b)
    }

    fn error_at(&self, pos: Pos, message: impl Into<String>) -> JsonError {
        JsonError {
            pos,
            message: message.into(),
        }
    }

    fn error_here(&self, message: impl Into<String>) -> JsonError {
        self.error_at(self.pos(), message)
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.bump();
        }
    }

    /// Describes the byte at the cursor for "unexpected ..." messages.
    fn describe_here(&self) -> String {
        match self.peek() {
            None => "end of input".to_string(),
            Some(b) if b.is_ascii_graphic() => format!("'{}'", b as char),
            Some(b) => format!("byte 0x{b:02x}"),
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node, JsonError> {
        self.skip_ws();
        let pos = self.pos();
        let value = match self.peek() {
            Some(b'{') => self.object(depth + 1)?,
            Some(b'[') => self.array(depth + 1)?,
            Some(q @ (b'"' | b'\'')) => Value::String(self.string(q)?),
            Some(b'-' | b'0'..=b'9') => {
                self.number()?;
                Value::Number
            }
            Some(b'a'..=b'z') => {
                let start = self.i;
                while matches!(self.peek(), Some(b'a'..=b'z')) {
                    self.bump();
                }
                match &self.s[start..self.i] {
                    b"true" => Value::Bool(true),
                    b"false" => Value::Bool(false),
                    b"null" => Value::Null,
                    other => {
                        let word = String::from_utf8_lossy(other);
                        return Err(self.error_at(pos, format!("invalid keyword '{word}'")));
                    }
                }
            }
            _ => {
                return Err(
                    self.error_here(format!("expecting a value, found {}", self.describe_here()))
                )
            }
        };
        Ok(Node { pos, value })
    }

    fn check_depth(&self, depth: usize) -> Result<(), JsonError> {
        if depth > MAX_NESTING {
            return Err(self.error_here("JSON nesting depth limit exceeded"));
        }
        Ok(())
    }

    fn object(&mut self, depth: usize) -> Result<Value, JsonError> {
        self.check_depth(depth)?;
        self.bump(); // '{'
        let mut members: Vec<(String, Node)> = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.bump();
            return Ok(Value::Object(members));
        }
        loop {
            self.skip_ws();
            let key_pos = self.pos();
            let key = match self.peek() {
                Some(q @ (b'"' | b'\'')) => self.string(q)?,
                Some(b'}') if !members.is_empty() => {
                    return Err(self.error_here(
                        "trailing comma before '}' (QEMU's JSON parser rejects it too)",
                    ))
                }
                _ => {
                    return Err(self.error_here(format!(
                        "expecting a string key in object, found {}",
                        self.describe_here()
                    )))
                }
            };
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.error_here(format!(
                    "missing ':' after key '{key}', found {}",
                    self.describe_here()
                )));
            }
            self.bump();
            let value = self.value(depth)?;
            if members.iter().any(|(k, _)| *k == key) {
                return Err(self.error_at(key_pos, format!("duplicate key '{key}'")));
            }
            members.push((key, value));
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.bump();
                }
                Some(b'}') => {
                    self.bump();
                    return Ok(Value::Object(members));
                }
                _ => {
                    return Err(self.error_here(format!(
                        "expecting ',' or '}}' in object, found {}",
                        self.describe_here()
                    )))
                }
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, JsonError> {
        self.check_depth(depth)?;
        self.bump(); // '['
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.bump();
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_ws();
            if self.peek() == Some(b']') {
                return Err(self
                    .error_here("trailing comma before ']' (QEMU's JSON parser rejects it too)"));
            }
            items.push(self.value(depth)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.bump();
                }
                Some(b']') => {
                    self.bump();
                    return Ok(Value::Array(items));
                }
                _ => {
                    return Err(self.error_here(format!(
                        "expecting ',' or ']' in array, found {}",
                        self.describe_here()
                    )))
                }
            }
        }
    }

    /// RFC 8259 number syntax; the value itself is never needed (no ACL field
    /// is numeric), only that it is a well-formed token.
    fn number(&mut self) -> Result<(), JsonError> {
        let start = self.pos();
        let bad = |p: &Self| p.error_at(start, "invalid number");
        if self.peek() == Some(b'-') {
            self.bump();
        }
        match self.peek() {
            Some(b'0') => {
                self.bump();
            }
            Some(b'1'..=b'9') => {
                while matches!(self.peek(), Some(b'0'..=b'9')) {
                    self.bump();
                }
            }
            _ => return Err(bad(self)),
        }
        if self.peek() == Some(b'.') {
            self.bump();
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(bad(self));
            }
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.bump();
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.bump();
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.bump();
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(bad(self));
            }
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.bump();
            }
        }
        Ok(())
    }

    fn hex4(&mut self) -> Option<u32> {
        let mut cp = 0u32;
        for _ in 0..4 {
            let d = (self.peek()? as char).to_digit(16)?;
            self.bump();
            cp = cp << 4 | d;
        }
        Some(cp)
    }

    fn string(&mut self, quote: u8) -> Result<String, JsonError> {
        let start = self.pos();
        self.bump(); // opening quote
        let mut out: Vec<u8> = Vec::new();
        loop {
            let here = self.pos();
            let Some(b) = self.peek() else {
                return Err(self.error_at(start, "unterminated string"));
            };
            if b == quote {
                self.bump();
                break;
            }
            if b < 0x20 {
                return Err(self.error_here("control character in string"));
            }
            if b != b'\\' {
                self.bump();
                out.push(b);
                continue;
            }
            self.bump();
            let e = self.bump();
            let c = match e {
                Some(b'"') => '"',
                Some(b'\'') => '\'',
                Some(b'\\') => '\\',
                Some(b'/') => '/',
                Some(b'b') => '\u{8}',
                Some(b'f') => '\u{c}',
                Some(b'n') => '\n',
                Some(b'r') => '\r',
                Some(b't') => '\t',
                Some(b'u') => {
                    let invalid =
                        |p: &Self| p.error_at(here, "\\u escape is not a valid Unicode character");
                    let mut cp = self.hex4().ok_or_else(|| invalid(self))?;
                    // A leading surrogate must be followed by a trailing one.
                    if (0xD800..=0xDBFF).contains(&cp)
                        && self.peek() == Some(b'\\')
                        && self.s.get(self.i + 1) == Some(&b'u')
                    {
                        self.bump();
                        self.bump();
                        let lo = self.hex4().ok_or_else(|| invalid(self))?;
                        if !(0xDC00..=0xDFFF).contains(&lo) {
                            return Err(invalid(self));
                        }
                        cp = 0x10000 + ((cp & 0x3FF) << 10) + (lo & 0x3FF);
                    }
                    if cp == 0 {
                        return Err(
                            self.error_at(here, "\\u0000 (NUL) in a string is not supported")
                        );
                    }
                    match char::from_u32(cp) {
                        Some(c) if !is_noncharacter(c) => c,
                        _ => return Err(invalid(self)),
                    }
                }
                _ => return Err(self.error_at(here, "invalid escape sequence in string")),
            };
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
        let s = String::from_utf8(out)
            .map_err(|_| self.error_at(start, "invalid UTF-8 sequence in string"))?;
        if s.chars().any(is_noncharacter) {
            return Err(self.error_at(start, "invalid UTF-8 sequence in string (noncharacter)"));
        }
        Ok(s)
    }
}

/// Unicode's 66 noncharacters, which QEMU's mod_utf8_codepoint() refuses.
fn is_noncharacter(c: char) -> bool {
    let cp = c as u32;
    (0xFDD0..=0xFDEF).contains(&cp) || cp & 0xFFFE == 0xFFFE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        parse(s.as_bytes()).unwrap_err().to_string_for_test()
    }

    impl JsonError {
        fn to_string_for_test(&self) -> String {
            format!("{}: {}", self.pos, self.message)
        }
    }

    #[test]
    fn accepts_qemu_extensions() {
        let n = parse(br#"{'a': 'it\'s "x"', "b": "\u00e9\ud83d\ude00"}"#).unwrap();
        let Value::Object(m) = n.value else { panic!() };
        assert_eq!(m[0].1.value, Value::String("it's \"x\"".into()));
        assert_eq!(m[1].1.value, Value::String("é😀".into()));
    }

    #[test]
    fn rejects_what_qemu_rejects() {
        assert!(err(r#"{"a": [1, 2,]}"#).contains("trailing comma before ']'"));
        assert!(err(r#"{"a": 1,}"#).contains("trailing comma before '}'"));
        assert!(err(r#"{"a": 1, "a": 2}"#).contains("duplicate key 'a'"));
        assert!(err("").contains("Expecting a JSON value"));
        assert!(err("{} {}").contains("Expecting at most one JSON value"));
        assert!(err("{\"a\": nul}").contains("invalid keyword 'nul'"));
        assert!(err("{\"a\": \"x\ty\"}").contains("control character"));
        assert!(err(r#"{"a": "\x"}"#).contains("invalid escape"));
        assert!(err(r#"{"a": "\ud800"}"#).contains("not a valid Unicode"));
        assert!(err(r#"{"a": "\uffff"}"#).contains("not a valid Unicode"));
        assert!(err("// c\n{}").contains("line 1 column 1"));
        assert!(
            parse(b"\xef\xbb\xbf{}").is_err(),
            "a BOM is a lexer error in QEMU"
        );
        let deep = "[".repeat(100_000);
        assert!(err(&deep).contains("nesting depth"));
    }

    #[test]
    fn positions_and_nul() {
        assert_eq!(
            err("{\n  \"a\": [1,\n  ]}"),
            "line 3 column 3: trailing comma before ']' (QEMU's JSON parser rejects it too)"
        );
        // Input ends at the first NUL, like QEMU's C string.
        assert!(parse(b"{}\0garbage").is_ok());
    }
}
