//! Text logs carry ANSI colour codes only on a terminal: not in a file,
//! a pipe or journald.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::gateway::{pki_init, BIN};

#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    pki_init(&pki, &[]);
    let mut child = Command::new(BIN)
        .args(["target", "--listen", "127.0.0.1:0", "--x509-dir"])
        .arg(&pki)
        .args(["--forward", "tcp:127.0.0.1:9", "--allow-any-verified-peer"])
        .env_remove("NO_COLOR")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("listening"), "{line:?}");
    assert!(!line.contains('\x1b'), "colour codes in a pipe: {line:?}");
}
