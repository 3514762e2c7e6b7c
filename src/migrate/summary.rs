//! How a migration ends: a [`Summary`] or a [`Failure`], each as words for
//! a person and as the `--json` result object.

use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use super::progress::{bits_per_sec, bytes, duration};

/// A migration that did not complete: the sentence and the exit code.
#[derive(Debug, Clone)]
pub struct Failure {
    pub sentence: String,
    pub exit_code: u8,
    /// The source VM's state when the sentence was written.
    pub source_status: Option<String>,
    pub migration_id: Option<String>,
}

impl Failure {
    pub(super) fn to_json(&self) -> Value {
        json!({
            "type": "result",
            "ok": false,
            "error": self.sentence,
            "exit_code": self.exit_code,
            "source_status": self.source_status,
            "migration_id": self.migration_id,
        })
    }
}

/// A completed migration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub mode: &'static str,
    pub migration_id: Option<String>,
    pub vm_uuid: Option<Uuid>,
    /// Our client certificate's DN (what the target authorizes).
    pub source_dn: String,
    /// The DN the target daemon admitted (gateway mode).
    pub admitted_dn: Option<String>,
    /// The target's certificate DN, as the source gateway verified it.
    pub target_dn: Option<String>,
    pub total_time_ms: u64,
    pub downtime_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    pub bytes: u64,
    pub throughput_bps: u64,
    pub passes: u64,
    pub channels: u32,
    /// The target VM's state (native TLS mode, where we can ask it).
    pub target_status: Option<String>,
    pub source_status: Option<String>,
    /// Set when the migration switched to postcopy (`--postcopy`).
    pub postcopy: Option<PostcopySummary>,
}

/// How a migration that did not converge in precopy ended in postcopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PostcopySummary {
    /// Passes over RAM precopy had completed when the switch was asked.
    pub after_passes: u64,
    /// Pages the target fetched on demand, because the VM touched them
    /// before the background copy sent them.
    pub requested_pages: u64,
}

impl Summary {
    pub(super) fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("a summary serialises");
        v["type"] = json!("result");
        v["ok"] = json!(true);
        v
    }

    /// The closing words: what happened, how fast, who was trusted.
    pub fn human(&self) -> String {
        let mut s = format!(
            "migration completed in {}",
            duration(Duration::from_millis(self.total_time_ms))
        );
        if let Some(d) = self.downtime_ms {
            s += &format!(" (guest paused {d} ms)");
        }
        s += &format!(
            ": {} sent at {} over {} channel{}",
            bytes(self.bytes),
            bits_per_sec(self.throughput_bps),
            self.channels,
            if self.channels == 1 { "" } else { "s" }
        );
        if self.passes > 0 {
            s += &format!(
                " in {} pass{}",
                self.passes,
                if self.passes == 1 { "" } else { "es" }
            );
        }
        if let Some(p) = &self.postcopy {
            s += &format!(
                "\n  switched to postcopy after {} pass{} of precopy; the target requested {} page{} from the source",
                p.after_passes,
                if p.after_passes == 1 { "" } else { "es" },
                p.requested_pages,
                if p.requested_pages == 1 { "" } else { "s" }
            );
        }
        match (&self.migration_id, &self.admitted_dn) {
            (Some(id), Some(dn)) => {
                s += &format!("\n  the target daemon admitted {dn} as migration {id}")
            }
            (Some(id), None) => s += &format!("\n  migration {id} at the target daemon"),
            _ => s += &format!("\n  the target QEMU authorized {}", self.source_dn),
        }
        if let Some(t) = &self.target_dn {
            s += &format!("; target certificate {t}");
        }
        if let Some(vm) = self.vm_uuid {
            s += &format!("\n  VM {vm}");
        }
        if let Some(t) = &self.target_status {
            s += &format!(" is {t} on the target");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_words() {
        let s = Summary {
            mode: "gateway",
            migration_id: Some("m-1".into()),
            vm_uuid: None,
            source_dn: "O=a,CN=src".into(),
            admitted_dn: Some("O=a,CN=src".into()),
            target_dn: Some("CN=localhost".into()),
            total_time_ms: 2300,
            downtime_ms: Some(41),
            setup_time_ms: Some(3),
            bytes: 70 << 20,
            throughput_bps: 255_000_000,
            passes: 3,
            channels: 1,
            target_status: None,
            source_status: Some("postmigrate".into()),
            postcopy: None,
        };
        assert_eq!(
            s.human(),
            "migration completed in 2.3 s (guest paused 41 ms): 70.0 MiB sent at 255 Mbit/s over 1 channel in 3 passes\n  \
             the target daemon admitted O=a,CN=src as migration m-1; target certificate CN=localhost"
        );
        let j = s.to_json();
        assert_eq!(j["type"], "result");
        assert_eq!(j["ok"], true);
        assert_eq!(j["downtime_ms"], 41);
        assert_eq!(j["postcopy"], Value::Null);
        let p = Summary {
            postcopy: Some(PostcopySummary {
                after_passes: 2,
                requested_pages: 1,
            }),
            ..s
        };
        assert!(
            p.human().contains(
                " in 3 passes\n  switched to postcopy after 2 passes of precopy; \
                 the target requested 1 page from the source\n  the target daemon admitted"
            ),
            "{}",
            p.human()
        );
        let j = p.to_json();
        assert_eq!(j["postcopy"]["after_passes"], 2);
        assert_eq!(j["postcopy"]["requested_pages"], 1);
    }
}
