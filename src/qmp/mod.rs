//! QMP client: drives QEMU over its JSON monitor socket.
//!
//! Small and typed on purpose: one connection, one command in flight at a
//! time, responses matched by `id`, asynchronous events queued in arrival
//! order so that a caller waiting for `MIGRATION` never loses one that came
//! in while it was executing a command.
//!
//! Reads go through our own line buffer (not `BufReader::read_line`) so every
//! method is cancel safe: a caller may wrap any call in `tokio::time::timeout`
//! and keep using the connection; a late response to a timed-out command is
//! recognised by its stale id and dropped.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use uuid::Uuid;

pub mod capabilities;
pub mod storage;

/// How long `execute` waits for a response unless told otherwise. QMP
/// commands answer promptly (migration runs in the background), so a long
/// silence means QEMU is wedged.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// `max-bandwidth` for "unlimited": QEMU's own default (32 MiB/s in 7.2)
/// would make a secure migration look slow for no reason. QEMU caps the
/// value at SIZE_MAX; 1 TiB/s is "unlimited" for any link.
pub const UNLIMITED_BANDWIDTH: u64 = 1 << 40;

/// One QMP line larger than this is a broken peer, not a real reply.
const MAX_LINE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("QMP protocol error: {detail}")]
    Protocol { detail: String },
    #[error("QMP connection closed by QEMU")]
    Closed,
    #[error("QEMU refused {command}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
}

impl QmpError {
    /// A peer that went away is `Closed` however the kernel words it: QEMU
    /// exiting with unread input resets the socket instead of a clean EOF.
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        use io::ErrorKind::*;
        match source.kind() {
            ConnectionReset | BrokenPipe | UnexpectedEof => QmpError::Closed,
            _ => QmpError::Io {
                context: context.into(),
                source,
            },
        }
    }

    fn protocol(detail: impl Into<String>) -> Self {
        QmpError::Protocol {
            detail: detail.into(),
        }
    }
}

/// Event timestamp as QEMU sends it (host wall clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

impl Timestamp {
    pub fn to_system_time(self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH
            + Duration::from_secs(self.seconds.max(0) as u64)
            + Duration::from_micros(self.microseconds.max(0) as u64)
    }
}

/// An asynchronous QMP event, e.g. `MIGRATION` with `{"status": "completed"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
    pub timestamp: Timestamp,
}

/// The `ram` member of `query-migrate` (QAPI `MigrationStats`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    #[serde(default)]
    pub duplicate: u64,
    #[serde(default)]
    pub skipped: u64,
    #[serde(default)]
    pub normal: u64,
    #[serde(default)]
    pub normal_bytes: u64,
    #[serde(default)]
    pub dirty_pages_rate: u64,
    #[serde(default)]
    pub mbps: f64,
    #[serde(default)]
    pub dirty_sync_count: u64,
    #[serde(default)]
    pub postcopy_requests: u64,
    #[serde(default)]
    pub page_size: u64,
    #[serde(default)]
    pub multifd_bytes: u64,
    #[serde(default)]
    pub pages_per_second: u64,
    #[serde(default)]
    pub precopy_bytes: Option<u64>,
    #[serde(default)]
    pub downtime_bytes: Option<u64>,
    #[serde(default)]
    pub postcopy_bytes: Option<u64>,
}

/// `query-migrate` result (QAPI `MigrationInfo`). Every member is optional:
/// QEMU omits what does not apply to the current state, and `status` is
/// absent before any migration was started.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    pub status: Option<String>,
    pub error_desc: Option<String>,
    pub ram: Option<RamStats>,
    /// Milliseconds.
    pub total_time: Option<u64>,
    /// Milliseconds.
    pub setup_time: Option<u64>,
    /// Milliseconds; only once completed.
    pub downtime: Option<u64>,
    /// Milliseconds; only while active.
    pub expected_downtime: Option<u64>,
    #[serde(default)]
    pub blocked_reasons: Option<Vec<String>>,
    #[serde(default)]
    pub cpu_throttle_percentage: Option<u64>,
    /// Everything as QEMU sent it, for members not modelled above.
    #[serde(skip)]
    pub raw: Value,
}

impl MigrationInfo {
    /// `completed`, `failed` and `cancelled` end a migration; nothing moves
    /// the state machine out of them.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.status.as_deref(),
            Some("completed" | "failed" | "cancelled")
        )
    }

    /// The VM runs on the target and fetches missing pages from the
    /// source (`postcopy-active`), or did until the channels broke
    /// (`postcopy-paused`, `postcopy-recover*`): from here the source can
    /// no longer take the VM back.
    pub fn in_postcopy(&self) -> bool {
        self.status
            .as_deref()
            .is_some_and(|s| s.starts_with("postcopy-"))
    }
}

/// The `migrate-set-parameters` members miggate sets (QAPI
/// `MigrateSetParameters`); `other` carries members given as JSON by a
/// caller (the daemon's API passes the request's `parameters` through).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
    /// Bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u8>,
    /// The id of a tls-creds object; "" turns QEMU's own TLS off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    /// The id of an authz object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// The credentials (pid, uid) of the process serving the QMP socket at
/// `path`, without speaking QMP: the kernel hands the listener's
/// credentials to every connection, even one QEMU has not accepted yet
/// because another client holds the monitor. The connection is closed
/// again at once.
pub async fn server_cred(path: &Path) -> Result<tokio::net::unix::UCred, QmpError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| QmpError::io(format!("connecting to {}", path.display()), e))?;
    stream.peer_cred().map_err(|e| {
        QmpError::io(
            format!("reading the peer credentials of {}", path.display()),
            e,
        )
    })
}

/// A QMP connection with capabilities negotiated (command mode).
pub struct Qmp {
    stream: UnixStream,
    path: PathBuf,
    /// Bytes read but not yet split into lines.
    buf: Vec<u8>,
    events: VecDeque<Event>,
    next_id: u64,
    greeting: Value,
    command_timeout: Duration,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.path)
            .field("queued_events", &self.events.len())
            .finish()
    }
}

impl Qmp {
    /// Connects to a QMP unix socket, reads the greeting and leaves
    /// capabilities negotiation mode.
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Qmp, QmpError> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|e| QmpError::io(format!("connecting to {}", path.display()), e))?;
        let mut qmp = Qmp {
            stream,
            path,
            buf: Vec::with_capacity(4096),
            events: VecDeque::new(),
            next_id: 1,
            greeting: Value::Null,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        };
        let timeout = qmp.command_timeout;
        let greeting = tokio::time::timeout(timeout, qmp.read_message())
            .await
            .map_err(|_| QmpError::Timeout {
                what: "the QMP greeting".into(),
                after: timeout,
            })??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::protocol(format!(
                "expected the QMP greeting, got {greeting}"
            )));
        }
        qmp.greeting = greeting;
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// The greeting QEMU sent (`{"QMP": {"version": .., "capabilities": ..}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// The QEMU process at the other end (`SO_PEERCRED`: its pid and uid,
    /// as of when it started listening on the QMP socket).
    pub fn peer_cred(&self) -> io::Result<tokio::net::unix::UCred> {
        self.stream.peer_cred()
    }

    /// QEMU's (major, minor, micro) from the greeting.
    pub fn qemu_version(&self) -> Option<(u64, u64, u64)> {
        let q = &self.greeting["QMP"]["version"]["qemu"];
        Some((
            q["major"].as_u64()?,
            q["minor"].as_u64()?,
            q["micro"].as_u64()?,
        ))
    }

    /// Changes how long `execute` waits for a response.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// Runs one command and returns its `return` value. Events that arrive
    /// before the response are queued for `next_event`.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&request).expect("a JSON value serialises");
        line.push(b'\n');
        tracing::trace!(target: "miggate::qmp", %request, "->");

        let timeout = self.command_timeout;
        let exchange = async {
            self.stream
                .write_all(&line)
                .await
                .map_err(|e| QmpError::io(format!("sending {command}"), e))?;
            loop {
                let msg = self.read_message().await?;
                if self.queue_if_event(&msg)? {
                    continue;
                }
                match msg.get("id").and_then(Value::as_u64) {
                    Some(got) if got == id => return response_value(command, msg),
                    // A late answer to a command whose caller gave up.
                    Some(got) if got < id => continue,
                    _ => {
                        return Err(QmpError::protocol(format!(
                            "response to {command} (id {id}) expected, got {msg}"
                        )))
                    }
                }
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| QmpError::Timeout {
                what: format!("the response to {command}"),
                after: timeout,
            })?
    }

    /// The next event: queued ones first, then from the socket. Waits
    /// forever; wrap in `tokio::time::timeout` or use `next_event_within`.
    pub async fn next_event(&mut self) -> Result<Event, QmpError> {
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Ok(ev);
            }
            let msg = self.read_message().await?;
            if !self.queue_if_event(&msg)? {
                // Only stale responses can arrive with no command in flight.
                if msg.get("id").and_then(Value::as_u64).is_none() {
                    return Err(QmpError::protocol(format!(
                        "unexpected message while waiting for an event: {msg}"
                    )));
                }
            }
        }
    }

    /// `next_event` with a deadline; `Ok(None)` when it passed.
    pub async fn next_event_within(&mut self, wait: Duration) -> Result<Option<Event>, QmpError> {
        match tokio::time::timeout(wait, self.next_event()).await {
            Ok(ev) => ev.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// The events queued so far, oldest first, left in the queue.
    pub fn queued_events(&self) -> impl Iterator<Item = &Event> {
        self.events.iter()
    }

    /// Drains and returns the events queued so far without reading more.
    pub fn take_queued_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// `migrate-set-capabilities`: each capability (QAPI
    /// `MigrationCapability`, e.g. `multifd`) on or off.
    pub async fn set_capabilities<S: AsRef<str>>(
        &mut self,
        caps: impl IntoIterator<Item = (S, bool)>,
    ) -> Result<(), QmpError> {
        let caps: Vec<Value> = caps
            .into_iter()
            .map(|(c, on)| json!({ "capability": c.as_ref(), "state": on }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": caps })),
        )
        .await
        .map(drop)
    }

    /// `migrate-set-parameters`: only the members that are set.
    pub async fn set_parameters(&mut self, params: &MigrationParameters) -> Result<(), QmpError> {
        let params = serde_json::to_value(params)
            .map_err(|e| QmpError::protocol(format!("migration parameters: {e}")))?;
        self.execute("migrate-set-parameters", Some(params))
            .await
            .map(drop)
    }

    /// `migrate-incoming`: the target QEMU listens on `uri` (e.g.
    /// `tcp:127.0.0.1:0`, `unix:PATH`) for one incoming migration.
    pub async fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// `migrate`: the source QEMU starts sending to `uri` in the background.
    pub async fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// `migrate` with `resume`: a source QEMU `postcopy-paused` resumes
    /// its migration to `uri`, where the target QEMU listens again
    /// (`migrate-recover`).
    pub async fn migrate_resume(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri, "resume": true })))
            .await
            .map(drop)
    }

    /// `migrate-recover`: a target QEMU `postcopy-paused` listens on `uri`
    /// for the source's resumed migration.
    pub async fn migrate_recover(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-recover", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// `migrate_cancel`: stops an outgoing migration (a no-op when none runs).
    pub async fn migrate_cancel(&mut self) -> Result<(), QmpError> {
        self.execute("migrate_cancel", None).await.map(drop)
    }

    /// `query-migrate-capabilities` with the QEMU's version: what
    /// [`capabilities::check`] checks a request against.
    pub async fn offered_capabilities(&mut self) -> Result<capabilities::Offered, QmpError> {
        let v = self.execute("query-migrate-capabilities", None).await?;
        let names = v
            .as_array()
            .map(|caps| {
                caps.iter()
                    .filter_map(|c| c.get("capability").and_then(Value::as_str))
                    .map(str::to_owned)
                    .collect()
            })
            .ok_or_else(|| {
                QmpError::protocol(format!("query-migrate-capabilities returned {v}"))
            })?;
        Ok(capabilities::Offered {
            version: self.qemu_version(),
            names,
        })
    }

    /// `migrate-start-postcopy`: the source switches to postcopy at its
    /// next iteration (the VM then runs on the target and fetches the
    /// pages it lacks from the source). Needs `postcopy-ram` on both ends.
    pub async fn migrate_start_postcopy(&mut self) -> Result<(), QmpError> {
        self.execute("migrate-start-postcopy", None).await.map(drop)
    }

    /// `migrate-pause`: a migration in postcopy stops using its channels
    /// and waits, `postcopy-paused`, for a recovery (only in postcopy).
    pub async fn migrate_pause(&mut self) -> Result<(), QmpError> {
        self.execute("migrate-pause", None).await.map(drop)
    }

    /// `query-uuid`: the VM's `-uuid` (the nil UUID when it was started
    /// without one).
    pub async fn query_uuid(&mut self) -> Result<Uuid, QmpError> {
        let v = self.execute("query-uuid", None).await?;
        v.get("UUID")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| QmpError::protocol(format!("query-uuid returned {v}")))
    }

    /// `object-add` with QOM properties (`qom-type`, `id`, ...).
    pub async fn object_add(&mut self, props: Value) -> Result<(), QmpError> {
        self.execute("object-add", Some(props)).await.map(drop)
    }

    /// The `qom-type`s `object-add` accepts, from `query-qmp-schema`. Not
    /// `qom-list-types`: that lists the QOM types compiled in, and QEMU
    /// 7.2 through 10.0 list `authz-list-file` there while `object-add`
    /// refuses it (its QAPI enum says `authz-listfile`); it also loads
    /// every QOM module into the running QEMU.
    pub async fn object_add_types(&mut self) -> Result<Vec<String>, QmpError> {
        let schema = self.execute("query-qmp-schema", None).await?;
        object_add_types_in(&schema).ok_or_else(|| {
            QmpError::protocol("query-qmp-schema describes no qom-type values for object-add")
        })
    }

    /// `object-del` of the object `id`.
    pub async fn object_del(&mut self, id: &str) -> Result<(), QmpError> {
        self.execute("object-del", Some(json!({ "id": id })))
            .await
            .map(drop)
    }

    pub async fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        let raw = self.execute("query-migrate", None).await?;
        let mut info: MigrationInfo = serde_json::from_value(raw.clone())
            .map_err(|e| QmpError::protocol(format!("query-migrate returned {raw}: {e}")))?;
        info.raw = raw;
        Ok(info)
    }

    /// The run state: "running", "paused", "inmigrate", "postmigrate", ...
    pub async fn query_status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| QmpError::protocol(format!("query-status returned {v}")))
    }

    /// Runs an HMP command through `human-monitor-command`, for what QMP
    /// lacks (e.g. `xp` to read guest memory).
    pub async fn hmp(&mut self, command_line: &str) -> Result<String, QmpError> {
        let v = self
            .execute(
                "human-monitor-command",
                Some(json!({ "command-line": command_line })),
            )
            .await?;
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| QmpError::protocol(format!("human-monitor-command returned {v}")))
    }

    fn queue_if_event(&mut self, msg: &Value) -> Result<bool, QmpError> {
        let Some(name) = msg.get("event") else {
            return Ok(false);
        };
        let name = name
            .as_str()
            .ok_or_else(|| QmpError::protocol(format!("event name is not a string: {msg}")))?;
        let timestamp = msg
            .get("timestamp")
            .and_then(|t| serde_json::from_value(t.clone()).ok())
            .unwrap_or_default();
        self.events.push_back(Event {
            name: name.to_owned(),
            data: msg.get("data").cloned().unwrap_or(Value::Null),
            timestamp,
        });
        Ok(true)
    }

    /// Reads one JSON message (QMP sends one per line). Cancel safe: bytes
    /// already read stay in `self.buf`.
    async fn read_message(&mut self) -> Result<Value, QmpError> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let text = line.trim_ascii();
                if text.is_empty() {
                    continue;
                }
                let msg: Value = serde_json::from_slice(text).map_err(|e| {
                    QmpError::protocol(format!(
                        "invalid JSON from QEMU ({e}): {}",
                        String::from_utf8_lossy(text)
                    ))
                })?;
                tracing::trace!(target: "miggate::qmp", %msg, "<-");
                return Ok(msg);
            }
            if self.buf.len() > MAX_LINE {
                return Err(QmpError::protocol("QMP line longer than 16 MiB"));
            }
            let mut chunk = [0u8; 8192];
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| QmpError::io("reading from QEMU", e))?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// In a `query-qmp-schema` answer: the values of the `qom-type` enum of
/// `object-add`'s argument type (a QAPI union since QEMU 6.0). Entity
/// names other than commands are masked numbers, so it follows the links.
fn object_add_types_in(schema: &Value) -> Option<Vec<String>> {
    let entities = schema.as_array()?;
    let named = |name: &str| entities.iter().find(|e| e["name"] == name);
    let args = named(named("object-add")?["arg-type"].as_str()?)?;
    let member = args["members"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == "qom-type")?;
    let enum_ = named(member["type"].as_str()?)?;
    let values = enum_["values"].as_array()?;
    values
        .iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect()
}

fn response_value(command: &str, msg: Value) -> Result<Value, QmpError> {
    if let Some(ret) = msg.get("return") {
        return Ok(ret.clone());
    }
    if let Some(err) = msg.get("error") {
        let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        return Err(QmpError::Command {
            command: command.to_owned(),
            class: field("class"),
            desc: field("desc"),
        });
    }
    Err(QmpError::protocol(format!(
        "response to {command} has neither return nor error: {msg}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_info_parses_qemu_7_2_output() {
        let raw = json!({
            "expected-downtime": 300, "status": "active", "setup-time": 3,
            "total-time": 1042,
            "ram": {"total": 134750208u64, "postcopy-requests": 0, "dirty-sync-count": 1,
                    "multifd-bytes": 0, "pages-per-second": 32710, "downtime-bytes": 0,
                    "page-size": 4096, "remaining": 1200, "postcopy-bytes": 0,
                    "mbps": 268.4, "transferred": 1000, "dirty-sync-missed-zero-copy": 0,
                    "precopy-bytes": 1000, "duplicate": 3, "dirty-pages-rate": 0,
                    "skipped": 0, "normal-bytes": 4096, "normal": 1}
        });
        let info: MigrationInfo = serde_json::from_value(raw).unwrap();
        assert_eq!(info.status.as_deref(), Some("active"));
        assert!(!info.is_terminal());
        let ram = info.ram.unwrap();
        assert_eq!(ram.total, 134750208);
        assert_eq!(ram.mbps, 268.4);
        assert_eq!(info.expected_downtime, Some(300));
    }

    /// The path through the schema as QEMU 7.2 and 10.0 answer it (their
    /// entity numbers differ; the shape does not).
    #[test]
    fn object_add_types_follow_the_schema() {
        let schema = json!([
            {"name": "object-add", "meta-type": "command", "arg-type": "183", "ret-type": "0"},
            {"name": "183", "meta-type": "object", "tag": "qom-type",
             "members": [{"name": "qom-type", "type": "428"}, {"name": "id", "type": "str"}],
             "variants": [{"case": "authz-list", "type": "429"}]},
            {"name": "428", "meta-type": "enum",
             "members": [{"name": "authz-list"}, {"name": "authz-listfile"}],
             "values": ["authz-list", "authz-listfile"]},
        ]);
        assert_eq!(
            object_add_types_in(&schema).unwrap(),
            ["authz-list", "authz-listfile"]
        );
        // Before QEMU 6.0 qom-type was a plain string: no list to give.
        let old = json!([
            {"name": "object-add", "meta-type": "command", "arg-type": "7"},
            {"name": "7", "meta-type": "object", "members": [{"name": "qom-type", "type": "str"}]},
            {"name": "str", "meta-type": "builtin", "json-type": "string"},
        ]);
        assert_eq!(object_add_types_in(&old), None);
    }

    #[test]
    fn error_response_becomes_command_error() {
        let msg = json!({"id": 3, "error": {"class": "CommandNotFound",
                         "desc": "The command nope has not been found"}});
        let err = response_value("nope", msg).unwrap_err();
        assert_eq!(
            err.to_string(),
            "QEMU refused nope: The command nope has not been found"
        );
    }

    #[test]
    fn parameters_send_only_what_is_set_in_qapi_names() {
        let mut other = serde_json::Map::new();
        other.insert("xbzrle-cache-size".into(), json!(1 << 20));
        let p = MigrationParameters {
            max_bandwidth: Some(UNLIMITED_BANDWIDTH),
            multifd_channels: Some(4),
            tls_creds: Some(String::new()),
            other,
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"max-bandwidth": 1u64 << 40, "multifd-channels": 4, "tls-creds": "",
                   "xbzrle-cache-size": 1 << 20})
        );
    }
}
