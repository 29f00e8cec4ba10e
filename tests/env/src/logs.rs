//! What every supervisor here needs: a free loopback port, and the end of a log file for
//! the message of a process that failed to start.

use anyhow::Context as _;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

/// How many lines of a log a start failure shows.
pub const LOG_TAIL_LINES: usize = 40;

/// A loopback port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
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
