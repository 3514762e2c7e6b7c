//! Progress of a running migration, from QEMU's `query-migrate`, shown as a
//! progress bar (on a terminal), as plain lines (a log, a pipe), or as one
//! JSON object per update (`--json`).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::qmp::MigrationInfo;

/// Without a terminal, one plain progress line this often: enough to see
/// a migration move in a log without flooding it.
pub const PLAIN_LINE_EVERY: Duration = Duration::from_secs(2);

/// QEMU reports x86 RAM in 4 KiB target pages; used when it omits `page-size`.
const DEFAULT_PAGE_SIZE: u64 = 4096;

/// One `query-migrate` answer, reduced to what an operator watches.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub status: String,
    /// Since our `migrate` command (QEMU 7.2's own `total-time` reads 0 for
    /// a guest that is not running).
    pub elapsed: Duration,
    pub transferred: u64,
    pub total: u64,
    pub remaining: u64,
    /// Bits per second, as QEMU measured the last iteration.
    pub throughput_bps: u64,
    /// Bytes per second the guest dirties.
    pub dirty_rate: u64,
    pub expected_downtime_ms: Option<u64>,
    /// Passes over RAM so far (QEMU's `dirty-sync-count`).
    pub pass: u64,
    /// Pages the target asked for because the VM touched them before they
    /// arrived (postcopy; QEMU's `postcopy-requests`).
    pub postcopy_requests: u64,
}

impl Snapshot {
    pub fn from_info(info: &MigrationInfo, elapsed: Duration) -> Snapshot {
        let ram = info.ram.clone().unwrap_or_default();
        let page = if ram.page_size == 0 {
            DEFAULT_PAGE_SIZE
        } else {
            ram.page_size
        };
        Snapshot {
            status: info.status.clone().unwrap_or_else(|| "none".into()),
            elapsed,
            transferred: ram.transferred,
            total: ram.total,
            remaining: ram.remaining,
            // QEMU's `mbps` is megabits per second.
            throughput_bps: (ram.mbps.max(0.0) * 1e6) as u64,
            dirty_rate: ram.dirty_pages_rate.saturating_mul(page),
            expected_downtime_ms: info.expected_downtime,
            pass: ram.dirty_sync_count,
            postcopy_requests: ram.postcopy_requests,
        }
    }

    /// The VM runs on the target (`postcopy-active`, `postcopy-paused`...).
    pub fn in_postcopy(&self) -> bool {
        self.status.starts_with("postcopy-")
    }

    /// RAM already on the target in this pass: what the bar shows. It can
    /// move back when a new pass starts over the pages dirtied meanwhile.
    pub fn done(&self) -> u64 {
        self.total.saturating_sub(self.remaining)
    }

    /// The bar's message: everything but the bar itself.
    pub fn line(&self) -> String {
        // Before QEMU has sized RAM (setup) there is nothing to count.
        if self.total == 0 {
            return self.status.clone();
        }
        let mut s = format!(
            "{}: {} of {} RAM sent",
            self.status,
            bytes(self.transferred),
            bytes(self.total)
        );
        if self.throughput_bps > 0 {
            s += &format!(" at {}", bits_per_sec(self.throughput_bps));
        }
        s += &format!(", {} remaining", bytes(self.remaining));
        if self.dirty_rate > 0 {
            s += &format!(", guest dirties {}/s", bytes(self.dirty_rate));
        }
        if let Some(d) = self.expected_downtime_ms {
            s += &format!(", expected downtime {d} ms");
        }
        if self.pass > 0 {
            s += &format!(", pass {}", self.pass);
        }
        if self.in_postcopy() {
            s += &format!(
                ", {} page{} requested by the target",
                self.postcopy_requests,
                if self.postcopy_requests == 1 { "" } else { "s" }
            );
        }
        s
    }

    pub fn to_json(&self) -> Value {
        json!({
            "type": "progress",
            "status": self.status,
            "elapsed_ms": self.elapsed.as_millis() as u64,
            "transferred": self.transferred,
            "total": self.total,
            "remaining": self.remaining,
            "throughput_bps": self.throughput_bps,
            "dirty_bytes_per_sec": self.dirty_rate,
            "expected_downtime_ms": self.expected_downtime_ms,
            "pass": self.pass,
            "postcopy_requests": self.postcopy_requests,
        })
    }
}

/// IEC units, three significant digits: "512 B", "1.50 MiB", "64.0 MiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    // 1023.99 KiB would print as "1024 KiB": say 1.00 MiB instead.
    if v >= 999.5 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    let digits = if v < 10.0 {
        2
    } else if v < 100.0 {
        1
    } else {
        0
    };
    format!("{v:.digits$} {}", UNITS[unit])
}

/// SI units, as network rates are quoted: "845 Mbit/s", "1.21 Gbit/s".
pub fn bits_per_sec(bps: u64) -> String {
    const UNITS: [&str; 5] = ["bit/s", "kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"];
    let mut v = bps as f64;
    let mut unit = 0;
    while v >= 999.5 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    let digits = if unit == 0 || v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$} {}", UNITS[unit])
}

/// "850 ms", "3.2 s", "2 min 05 s".
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} min {:02} s", ms / 60_000, (ms / 1000) % 60)
    }
}

/// Where the command's words go: human (steps and summary on stdout, the
/// bar on stderr) or JSON lines on stdout.
pub struct Reporter {
    json: bool,
    bar: Option<ProgressBar>,
    /// Plain lines instead of a bar when stderr is not a terminal.
    plain_last: Option<(Instant, String)>,
    stdout: Box<dyn Write + Send>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("json", &self.json)
            .finish()
    }
}

impl Reporter {
    pub fn new(json: bool) -> Reporter {
        Reporter {
            json,
            bar: None,
            plain_last: None,
            stdout: Box::new(std::io::stdout()),
        }
    }

    /// Writes to `out` instead of stdout, and never draws a bar (tests).
    pub fn to_writer(json: bool, out: Box<dyn Write + Send>) -> Reporter {
        Reporter {
            json,
            bar: None,
            plain_last: Some((Instant::now(), String::new())),
            stdout: out,
        }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// One thing the command did or learned, in plain words.
    pub fn step(&mut self, message: &str) {
        if self.json {
            self.emit(&json!({"type": "step", "message": message}));
        } else {
            self.print(message);
        }
    }

    /// Something the operator should know but that does not stop anything.
    pub fn note(&mut self, message: &str) {
        if self.json {
            self.emit(&json!({"type": "note", "message": message}));
        } else {
            self.print(&format!("note: {message}"));
        }
    }

    pub fn progress(&mut self, s: &Snapshot) {
        if self.json {
            self.emit(&s.to_json());
            return;
        }
        if self.bar.is_none() && self.plain_last.is_none() && std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(s.total.max(1));
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {elapsed:>4} [{bar:30}] {percent:>3}% {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_length(s.total.max(1));
            bar.set_position(s.done());
            bar.set_message(s.line());
            return;
        }
        // Plain lines: at a steady pace, and whenever the state changes.
        let due = match &self.plain_last {
            None => true,
            Some((at, status)) => *status != s.status || at.elapsed() >= PLAIN_LINE_EVERY,
        };
        if due {
            self.plain_last = Some((Instant::now(), s.status.clone()));
            let line = format!("  [{:>6}] {}", duration(s.elapsed), s.line());
            self.print(&line);
        }
    }

    /// Removes the bar (before the summary or the failure sentence).
    pub fn finish_progress(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// The final object of `--json`, or the final words.
    pub fn result(&mut self, json_value: &Value, human: &str) {
        self.finish_progress();
        if self.json {
            self.emit(json_value);
        } else {
            self.print(human);
        }
    }

    fn print(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| {
                let _ = writeln!(self.stdout, "{line}");
            }),
            None => {
                let _ = writeln!(self.stdout, "{line}");
            }
        }
        let _ = self.stdout.flush();
    }

    fn emit(&mut self, v: &Value) {
        let _ = writeln!(self.stdout, "{v}");
        let _ = self.stdout.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
        assert_eq!(bytes(134_750_208), "129 MiB");
        assert_eq!(bytes((1 << 20) - 1), "1.00 MiB");
        assert_eq!(bytes(3 << 30), "3.00 GiB");
        assert_eq!(bits_per_sec(0), "0 bit/s");
        assert_eq!(bits_per_sec(845_000_000), "845 Mbit/s");
        assert_eq!(bits_per_sec(1_210_000_000), "1.21 Gbit/s");
        assert_eq!(bits_per_sec(12_345_678), "12.3 Mbit/s");
        assert_eq!(duration(Duration::from_millis(850)), "850 ms");
        assert_eq!(duration(Duration::from_millis(3210)), "3.2 s");
        assert_eq!(duration(Duration::from_secs(125)), "2 min 05 s");
    }

    fn info() -> MigrationInfo {
        serde_json::from_value(json!({
            "status": "active", "expected-downtime": 300, "total-time": 1042,
            "ram": {"total": 67108864u64, "remaining": 16777216u64, "transferred": 50331648u64,
                    "mbps": 412.5, "dirty-pages-rate": 600, "page-size": 4096,
                    "dirty-sync-count": 2}
        }))
        .unwrap()
    }

    #[test]
    fn snapshot_from_query_migrate() {
        let s = Snapshot::from_info(&info(), Duration::from_millis(1500));
        assert_eq!(s.done(), 48 << 20);
        assert_eq!(s.throughput_bps, 412_500_000);
        assert_eq!(s.dirty_rate, 600 * 4096);
        assert_eq!(
            s.line(),
            "active: 48.0 MiB of 64.0 MiB RAM sent at 412 Mbit/s, 16.0 MiB remaining, \
             guest dirties 2.34 MiB/s, expected downtime 300 ms, pass 2"
        );
        let j = s.to_json();
        assert_eq!(j["type"], "progress");
        assert_eq!(j["elapsed_ms"], 1500);
        assert_eq!(j["remaining"], 16777216u64);
        assert_eq!(j["pass"], 2);
        assert_eq!(j["postcopy_requests"], 0);
        // Before QEMU has stats: no division by zero, no bogus numbers.
        let empty = Snapshot::from_info(&MigrationInfo::default(), Duration::ZERO);
        assert_eq!(empty.line(), "none");
        assert_eq!(empty.done(), 0);
    }

    #[test]
    fn postcopy_phase_shows_the_pages_the_target_asked_for() {
        let mut i = info();
        i.status = Some("postcopy-active".into());
        i.expected_downtime = None;
        if let Some(ram) = i.ram.as_mut() {
            ram.postcopy_requests = 37;
            ram.dirty_sync_count = 3;
        }
        let s = Snapshot::from_info(&i, Duration::from_secs(4));
        assert!(s.in_postcopy());
        assert_eq!(
            s.line(),
            "postcopy-active: 48.0 MiB of 64.0 MiB RAM sent at 412 Mbit/s, 16.0 MiB remaining, \
             guest dirties 2.34 MiB/s, pass 3, 37 pages requested by the target"
        );
        assert_eq!(s.to_json()["postcopy_requests"], 37);
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_reporter_writes_one_object_per_line() {
        let buf = Buf::default();
        let mut r = Reporter::to_writer(true, Box::new(buf.clone()));
        r.step("started");
        r.progress(&Snapshot::from_info(&info(), Duration::from_secs(1)));
        r.result(&json!({"type": "result", "ok": true}), "done");
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let objs: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let types: Vec<&str> = objs.iter().map(|o| o["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["step", "progress", "result"]);
    }

    #[test]
    fn plain_reporter_paces_lines_but_shows_state_changes() {
        let buf = Buf::default();
        let mut r = Reporter::to_writer(false, Box::new(buf.clone()));
        let mut s = Snapshot::from_info(&info(), Duration::from_secs(1));
        r.progress(&s); // state changed from nothing: shown
        r.progress(&s); // same state, too soon: not shown
        s.status = "completed".into();
        r.progress(&s); // new state: shown
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.lines().nth(1).unwrap().contains("completed:"));
    }
}
