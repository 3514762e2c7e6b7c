//! The one rendering of an error chain, for the edges that turn a typed
//! cause into words (the one-sentence failure, API reasons, reload refusals).

use std::error::Error;

/// An error and its sources on one line, `outer: inner: innermost`, without
/// repeating a source whose text its parent's message already includes
/// (thiserror messages often embed `{source}`).
pub fn chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let text = src.to_string();
        if !s.contains(&text) {
            s = format!("{s}: {text}");
        }
        cur = src.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains_do_not_repeat() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: inner broke")]
        struct Outer(#[source] Inner);
        #[derive(Debug, thiserror::Error)]
        #[error("inner broke")]
        struct Inner;
        #[derive(Debug, thiserror::Error)]
        #[error("cannot connect")]
        struct Conn(#[source] std::io::Error);
        assert_eq!(chain(&Outer(Inner)), "outer: inner broke");
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(chain(&Conn(io)), "cannot connect: no such file");
    }
}
