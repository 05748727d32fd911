//! The command line: `serve` is the default subcommand, so its flags work without its name.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_controlnet-serve");

#[test]
fn serve_flags_work_without_the_subcommand() {
    let mut child = Command::new(BIN)
        .args(["--bind", "127.0.0.1:0", "--max-batch", "1"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting controlnet-serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn serve_flags_and_another_subcommand_do_not_mix() {
    let out = Command::new(BIN)
        .args(["--bind", "127.0.0.1:0", "openapi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}

#[test]
fn key_variables_do_not_count_as_flags_for_other_subcommands() {
    // CNS_API_KEY feeds serve's --api-key; it must not make `openapi` a conflict.
    let out = Command::new(BIN)
        .arg("openapi")
        .env("CNS_API_KEY", "secret")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("openapi:"));
}
