//! The access log: one line per request (JSON or logfmt), written by a plain thread fed
//! through a bounded queue so a slow disk never slows requests.

use std::io::Write;

use serde::Serialize;

use crate::config::{AccessLogConfig, LogFormat};

/// One access log line.
#[derive(Debug, Serialize)]
pub(super) struct AccessLine {
    pub time: String,
    pub direction: String,
    pub service: String,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub status: u16,
    pub duration_ms: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub transport: String,
    pub peer_identity: Option<String>,
    pub endpoint: Option<String>,
    pub attempts: u32,
    pub cache: Option<String>,
    pub error_kind: Option<String>,
    pub trace_id: Option<String>,
}

impl AccessLine {
    /// `key=value` pairs; values with spaces, quotes or `=` are quoted.
    pub(super) fn logfmt(&self) -> String {
        let value = serde_json::to_value(self).expect("plain struct");
        let mut out = String::new();
        if let serde_json::Value::Object(map) = value {
            for (k, v) in map {
                let text = match v {
                    serde_json::Value::Null => continue,
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                if !out.is_empty() {
                    out.push(' ');
                }
                let quote = text.is_empty() || text.contains([' ', '"', '=', '\\']);
                if quote {
                    out.push_str(&format!("{k}={:?}", text));
                } else {
                    out.push_str(&format!("{k}={text}"));
                }
            }
        }
        out
    }
}

/// Lines go to a writer thread through a bounded queue: a slow disk never slows requests; when
/// the queue is full the line is dropped and counted.
pub(super) struct AccessLog {
    tx: std::sync::mpsc::SyncSender<String>,
    format: LogFormat,
}

impl AccessLog {
    pub(super) fn open(cfg: &AccessLogConfig) -> Result<Self, std::io::Error> {
        let mut out: Box<dyn Write + Send> = match &cfg.path {
            None => Box::new(std::io::stdout()),
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(8192);
        std::thread::Builder::new()
            .name("quicar-access-log".into())
            .spawn(move || {
                while let Ok(line) = rx.recv() {
                    let _ = out.write_all(line.as_bytes());
                    // Batch what is queued, then flush once.
                    while let Ok(more) = rx.try_recv() {
                        let _ = out.write_all(more.as_bytes());
                    }
                    let _ = out.flush();
                }
            })?;
        Ok(Self {
            tx,
            format: cfg.format,
        })
    }

    pub(super) fn send(&self, line: &AccessLine) -> bool {
        let mut text = match self.format {
            LogFormat::Json => serde_json::to_string(line).expect("plain struct"),
            LogFormat::Logfmt => line.logfmt(),
        };
        text.push('\n');
        self.tx.try_send(text).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logfmt_quotes_what_needs_it() {
        let line = AccessLine {
            time: "t".into(),
            direction: "outbound".into(),
            service: "hello".into(),
            method: "GET".into(),
            authority: "hello".into(),
            path: "/a b".into(),
            status: 200,
            duration_ms: 1.5,
            bytes_in: 0,
            bytes_out: 2,
            transport: "quic".into(),
            peer_identity: None,
            endpoint: None,
            attempts: 1,
            cache: None,
            error_kind: None,
            trace_id: Some("abc".into()),
        };
        let text = line.logfmt();
        assert!(
            text.contains("path=\"/a b\"")
                && text.contains("status=200")
                && !text.contains("endpoint"),
            "{text}"
        );
    }
}
