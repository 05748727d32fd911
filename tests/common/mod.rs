//! End-to-end harness: starts the real `controlnet-serve` binary on an ephemeral port with the
//! embedded default model, waits until it is ready, and stops it (SIGTERM) when dropped.
#![allow(dead_code)]
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Option<Child>,
    pub base: String,
    pub stderr_log: std::path::PathBuf,
}

impl Server {
    /// Starts the server with extra `serve` flags and `CNS_*` environment variables.
    pub fn start(flags: &[&str], env: &[(&str, &str)]) -> Server {
        let log = std::env::temp_dir().join(format!(
            "cns-e2e-{}-{}.log",
            std::process::id(),
            rand_suffix()
        ));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_controlnet-serve"));
        cmd.arg("serve")
            .arg("--bind")
            .arg("127.0.0.1:0")
            .args(flags);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().expect("starting controlnet-serve");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let first = lines
            .next()
            .expect("the server printed nothing")
            .expect("reading the server's stdout");
        let base = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let server = Server {
            child: Some(child),
            base,
            stderr_log: log,
        };
        server.wait_ready(Duration::from_secs(120));
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn wait_ready(&self, limit: Duration) {
        let started = Instant::now();
        loop {
            if get_status(&self.url("/ready")).is_ok_and(|s| s == 200) {
                return;
            }
            if started.elapsed() > limit {
                panic!("not ready after {limit:?}; log: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status (waits up to `limit`).
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        unsafe_kill(child.id(), "TERM");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn unsafe_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The status of a plain HTTP/1.0 GET (the harness needs no async runtime for this).
pub fn get_status(url: &str) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    Ok(buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// A small PNG, base64.
pub fn png_b64(w: u32, h: u32) -> String {
    use base64::Engine as _;
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}
