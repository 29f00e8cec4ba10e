//! What every supervisor here needs: a free loopback port, and the end of a log file for
//! the message of a process that failed to start.

use anyhow::Context as _;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

/// How many lines of a log a start failure shows.
pub const LOG_TAIL_LINES: usize = 40;

/// A loopback port that was free a moment ago, picked at random below the kernel's
/// ephemeral range: a port from that range (what binding port 0 gives) can be taken by any
/// outgoing connection before the caller binds it.
pub fn free_port() -> anyhow::Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOWEST: u16 = 10_000;
    if ephemeral_low > LOWEST + 1_000 {
        for _ in 0..200 {
            let port = fastrand::u16(LOWEST..ephemeral_low);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The last [`LOG_TAIL_LINES`] lines of a log file; only its end is read.
pub fn log_tail(path: &Path) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return format!("(no log at {})\n", path.display());
    };
    let length = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(length.saturating_sub(16 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    tail_lines(&String::from_utf8_lossy(&bytes))
}

/// The last [`LOG_TAIL_LINES`] lines of a text.
pub fn tail_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    let mut tail = lines[start..].join("\n");
    tail.push('\n');
    tail
}
